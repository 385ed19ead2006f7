"""The trainer: exact normalisation across micro-batches, exact resume, and a model transformers loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onepass.train.batch import collate
from onepass.config import load_config
from onepass.train.loss import sft_loss
from onepass.train.attention import use_packed_attention
from onepass.data.types import Example
from onepass.demo.tiny import build_model, random_conversations
from onepass.train.plan import plan_epoch
from onepass.train.run import build_run
from onepass.train.trainer import Trainer

from conftest import final_weights, make_config, trained, write_jsonl


def random_example(rng, length, turns=3, vocab=100):
    mask = (rng.random(length) < 0.6).astype(np.int8)
    turn = np.where(mask == 1, rng.integers(0, turns, length), -1).astype(np.int32)
    return Example(rng.integers(3, vocab, length).astype(np.int32), mask, turn)


def gradients(model, micro_batches, denominator):
    model.zero_grad()
    for batch in micro_batches:
        sft_loss(model, batch, denominator)[0].backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("normalization", ["token", "sequence", "turn"])
def test_k_micro_batches_give_the_same_gradients_as_one_batch_of_k_times_b(normalization):
    torch.manual_seed(0)
    model = use_packed_attention(build_model(None, vocab_size=100)).double()
    rng = np.random.default_rng(3)
    examples = [random_example(rng, int(n)) for n in rng.integers(4, 30, size=12)]
    one = collate(examples, normalization)
    micro = [collate(examples[i:i + 3], normalization) for i in range(0, 12, 3)]
    assert sum(b.units for b in micro) == one.units
    big = gradients(model, [one], one.units)
    accumulated = gradients(model, micro, sum(b.units for b in micro))
    # fp64, yet transformers computes RMSNorm and the rotary tables in fp32 whatever the model's dtype, and a
    # vectorised fp32 sum or cos rounds a row by an ulp differently where the row lies differently in memory
    # (its alignment varies from process to process): the two batchings agree to fp32 rounding carried
    # through the layers (seen: up to 1.7e-7 where the largest gradient is 0.085, in about 1 run of 10), not
    # to fp64's; a wrong normaliser would differ by a factor
    scale = max(float(g.abs().max()) for g in big)
    for a, b in zip(big, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5 * scale)


def test_sequence_normalisation_weighs_each_conversation_the_same():
    rng = np.random.default_rng(4)
    short, long = random_example(rng, 5), random_example(rng, 50)
    batch = collate([short, long], "sequence")
    cut = len(short)
    assert batch.units == 2
    assert batch.label_weights[0, :cut].sum().item() == pytest.approx(1.0)
    assert batch.label_weights[0, cut:].sum().item() == pytest.approx(1.0)


def test_turn_normalisation_weighs_each_response_the_same():
    rng = np.random.default_rng(5)
    example = random_example(rng, 40, turns=3)
    batch = collate([example], "turn")
    labels_turn = np.append(example.turn[1:], -1)
    trained = batch.labels[0].numpy() != -100
    for turn in set(labels_turn[trained].tolist()):
        assert batch.label_weights[0].numpy()[trained & (labels_turn == turn)].sum() == pytest.approx(1.0)


def test_epoch_plan_covers_every_example_once_and_is_reproducible():
    config = load_config(None, ["model=m", "data.train=[d]", "max_seq_len=64", "batch_size=2", "grad_accum=2"])
    lengths = list(np.random.default_rng(0).integers(5, 60, size=40))
    def plan(epoch):
        return plan_epoch(lengths, config.max_seq_len, config.batch_size, config.grad_accum, config.seed, epoch)

    seen = sorted(i for step in plan(0) for micro in step for i in micro)
    assert seen == list(range(40))
    assert plan(0) == plan(0) and plan(0) != plan(1)


def test_resumed_run_equals_an_uninterrupted_run(run_assets, tmp_path):
    straight = make_config(run_assets, tmp_path / "straight", "max_steps=20")
    trained(straight).fit()
    interrupted = make_config(run_assets, tmp_path / "resumed", "max_steps=20")
    first = trained(interrupted).fit(stop_at=10)
    assert first.steps == 10 and first.final_dir is None
    second = trained(interrupted).fit()  # a new process would do the same: everything comes from disk
    assert second.steps == 20
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))


def test_training_writes_metrics_plot_and_a_model_transformers_loads(run_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = trained(make_config(run_assets, tmp_path / "out", "max_steps=6", "eval_every=3")).fit()
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    rows = result.metrics
    step_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_sec"} <= set(step_rows[0])
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "final"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "final"))
    assert tokenizer.chat_template and model.config.vocab_size == 512
    assert (tmp_path / "out" / "final" / "onepass_config.yaml").exists()


def test_lora_trains_adapters_and_exports_a_merged_model(run_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    config = make_config(run_assets, tmp_path / "lora", "max_steps=3", "lora.enabled=true", "lora.r=4")
    run = build_run(config)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in run.model.parameters())
    assert 0 < trainable < total / 4
    Trainer(run).fit()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / "final"))
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_checkpoints_keep_the_last_n(run_assets, tmp_path):
    trained(make_config(run_assets, tmp_path / "ck", "max_steps=6", "save_every=2", "keep_last=2")).fit()
    names = sorted(p.name for p in (tmp_path / "ck" / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]
    assert (tmp_path / "ck" / "checkpoints" / "step-00000006" / "config.yaml").exists()


def test_resuming_with_a_different_global_batch_warns_that_the_data_order_changes(run_assets, tmp_path, capsys):
    trained(make_config(run_assets, tmp_path / "out", "max_steps=6")).fit(stop_at=2)
    capsys.readouterr()
    trained(make_config(run_assets, tmp_path / "out", "max_steps=6", "grad_accum=1")).fit(stop_at=3)
    err = capsys.readouterr().err
    assert "written with 2 micro-batches per step" in err and "set grad_accum=2" in err


def test_bf16_autocast_training_tracks_fp32_within_two_percent(run_assets, tmp_path):
    """bf16 autocast (fp32 master weights) follows the fp32 loss curve: every step's loss within 2% of
    fp32's, on the same data from the same initial weights."""
    curves = {}
    for precision in ("fp32", "bf16"):
        result = trained(make_config(run_assets, tmp_path / precision, "max_steps=12", f"precision={precision}",
                                     "eval_every=0")).fit()
        curves[precision] = np.array([r["loss"] for r in result.metrics if "loss" in r])
    assert len(curves["bf16"]) == 12
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=0.02)
    assert curves["bf16"][-1] < curves["bf16"][0]


def test_auto_precision_is_bf16_where_the_cpu_multiplies_bf16_natively():
    from onepass.compat import cpu_has_fast_bf16
    from onepass.train.device import uses_bf16

    cpu = torch.device("cpu")
    assert uses_bf16("auto", cpu) == cpu_has_fast_bf16()
    assert uses_bf16("auto", torch.device("cuda")) and uses_bf16("bf16", cpu) and not uses_bf16("fp32", cpu)


def test_early_stopping_stops_after_patience_evaluations_without_improvement_and_exports(run_assets, tmp_path):
    config = make_config(run_assets, tmp_path / "out", "max_steps=20", "lr=0", "eval_every=2",
                         "early_stopping.patience=2")
    result = trained(config).fit()  # lr 0: the held-out loss never improves after the first evaluation
    assert result.stopped_by == "early stopping" and result.steps == 6
    assert result.final_dir is not None and (result.final_dir / "model.safetensors").exists()


def test_keep_best_keeps_and_exports_the_checkpoint_with_the_lowest_held_out_loss(run_assets, tmp_path):
    from onepass.train.checkpoint import best_checkpoint

    config = make_config(run_assets, tmp_path / "out", "max_steps=8", "eval_every=2", "keep_best=true",
                         "save_every=1", "keep_last=1", "lr=3e-3")
    run = build_run(config)

    def break_the_model_after_step_4(optimizer, args, kwargs):  # after each optimizer step: from step 5 on,
        if trainer.state.step + 1 > 4:                          # the weights get worse
            with torch.no_grad():
                for parameter in run.model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.05)

    run.optimizer.register_step_post_hook(break_the_model_after_step_4)
    trainer = Trainer(run)
    result = trainer.fit()
    evals = {r["step"]: r["eval_loss"] for r in result.metrics if "eval_loss" in r and r["step"] in (2, 4, 6)}
    assert trainer.state.best_step == 4 and evals[4] < evals[6]
    assert best_checkpoint(tmp_path / "out").name == "step-00000004"  # kept beside the last one
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*")) == ["step-00000004",
                                                                                          "step-00000008"]
    assert result.eval_after["eval_loss"] == pytest.approx(evals[4], rel=1e-6)  # the exported model is the best


def test_early_stopping_without_held_out_data_is_a_config_error_when_the_config_loads(run_assets, tmp_path):
    from onepass.errors import ConfigError

    with pytest.raises(ConfigError, match="early_stopping and keep_best.*eval_every"):
        make_config(run_assets, tmp_path / "out", "max_steps=4", "keep_best=true")  # eval_every is 0
    config = make_config(run_assets, tmp_path / "out", "max_steps=4", "keep_best=true", "eval_every=2")
    with pytest.raises(ConfigError, match="early_stopping and keep_best"):  # held-out data that prepares to none
        build_run(config, eval_examples=[])
    with pytest.raises(ConfigError, match="eval_samples shows replies"):
        make_config(run_assets, tmp_path / "out", "eval_samples=2", "data.eval=[]")


def test_eval_samples_writes_greedy_replies_to_held_out_prompts_at_each_evaluation(run_assets, tmp_path):
    config = make_config(run_assets, tmp_path / "out", "max_steps=4", "eval_every=2", "eval_samples=2")
    trained(config).fit()
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2, 4, 4]  # before, during and after training
    assert all({"prompt", "reply", "reference"} <= set(r) and isinstance(r["reply"], str) for r in rows)
    held_out = [json.loads(line) for line in run_assets[3].read_text().splitlines()][:2]
    assert [r["reference"] for r in rows[:2]] == [h["messages"][-1]["content"] for h in held_out]


def test_the_logged_lr_is_the_rate_each_step_used_starting_with_the_first_warmup_rate(run_assets, tmp_path):
    trained(make_config(run_assets, tmp_path, "max_steps=4", "warmup_steps=2", "lr=1e-3",
                        "schedule=constant")).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_building_a_run_changes_nothing_in_the_process(run_assets, tmp_path, monkeypatch):
    """Allocator, malloc settings and environment variables are the entry points' (cli.main), not the library's."""
    import os

    from onepass import allocator, compat

    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    touched = []
    monkeypatch.setattr(compat, "keep_freed_memory", lambda: touched.append("mallopt"))
    monkeypatch.setattr(allocator, "restart_on_mimalloc", lambda: touched.append("restart"))
    before = dict(os.environ)
    trained(make_config(run_assets, tmp_path, "max_steps=1"))
    assert dict(os.environ) == before and not touched
