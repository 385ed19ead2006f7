"""onepass from Python: the calls take the objects a user holds, do what the commands do, and give the
model back as it came."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

import onepass
from onepass.demo.tiny import build_model, random_conversations

from conftest import write_jsonl


def onepass_attributes(model) -> list[str]:
    return [f"{name}.{key}" for name, module in model.named_modules() for key in vars(module) if "onepass" in key]


def options(tmp_path, **values):
    return onepass.TrainOptions(**{"max_steps": 3, "max_seq_len": 256, "batch_size": 2, "lr": 1e-3,
                                   "output_dir": str(tmp_path / "out"), "progress": False, **values})


def test_prepare_takes_a_dataset_a_list_of_records_and_files_alike(tokenizer, tmp_path):
    records = random_conversations(12, seed=3, max_turns=2)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    results = [onepass.prepare(data, tokenizer, max_seq_len=256)
               for data in (datasets.Dataset.from_list(records), records, str(path), [path])]
    for data in results:
        assert data.stats.records == 12 and len(data.examples) == len(results[0].examples)
        for got, expected in zip(data.examples, results[0].examples):
            assert np.array_equal(got.input_ids, expected.input_ids)
            assert np.array_equal(got.loss_mask, expected.loss_mask)
    assert results[0].examples[0].source == "Dataset" and results[1].examples[0].source == "records"


def test_a_bad_record_in_memory_is_one_error_naming_its_row_and_field(tokenizer):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "yo"}]}]
    with pytest.raises(onepass.OnepassError, match=r"records, row 2, field 'messages\[1\]\.role'.*Fix:"):
        onepass.prepare(records, tokenizer)
    skipped = onepass.prepare(records, tokenizer, onepass.DataOptions(on_bad_record="skip"))
    assert len(skipped.examples) == 1 and sum(skipped.stats.rejected.values()) == 1


def test_a_model_passed_in_trains_with_lora_from_the_options_and_comes_back_with_its_own_attention(
        tokenizer, tmp_path):
    """The issue's case: LoRA in the options and a model given, which used to train all its weights."""
    model = build_model(None, vocab_size=len(tokenizer))
    original = model.config._attn_implementation
    template_before = tokenizer.chat_template
    records = random_conversations(16, seed=4, max_turns=2)
    lora = onepass.LoraOptions(enabled=True, r=4)
    result = onepass.fit(model, records, options(tmp_path, lora=lora), tokenizer=tokenizer)
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in result.model.parameters())
    assert type(result.model).__name__ == "PeftModelForCausalLM" and 0 < trainable < total / 10
    assert result.steps == 3 and result.final_dir is not None
    assert model.config._attn_implementation == original and not onepass_attributes(model)
    assert not [name for name, module in model.named_modules() if "forward" in vars(module)]
    assert tokenizer.chat_template == template_before  # the export saved a copy with the template trained
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    merged = result.model.merge_and_unload()  # the export's weights are the adapters merged, to the bit
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, merged.state_dict()[name]), name


def test_logprobs_and_check_give_the_commands_values_and_leave_the_model_as_it_came(tokenizer, tmp_path):
    from onepass.cli.main import main

    model_dir = tmp_path / "model"
    model = build_model(model_dir, vocab_size=len(tokenizer), seed=2)
    tokenizer.save_pretrained(str(model_dir))
    records = random_conversations(5, seed=6, max_turns=3)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    original = model.config._attn_implementation
    rows = onepass.logprobs(model, tokenizer, datasets.Dataset.from_list(records))
    proof = onepass.check(model, accelerations="none")
    assert proof.packing == "packed" and proof.max_difference < 2e-4 and proof.prefix_consistent
    assert model.config._attn_implementation == original and not onepass_attributes(model)
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(model_dir), "--data", str(path), "--out", str(out)]) == 0
    cli_rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == [r["method"] for r in cli_rows] == ["one pass"] * 5
    np.testing.assert_allclose([r["logprob_response"] for r in rows], [r["logprob_response"] for r in cli_rows],
                               rtol=0, atol=1e-4)


def test_the_stock_core_and_the_accelerations_score_alike(tokenizer):
    model = build_model(None, vocab_size=len(tokenizer), seed=5)
    records = random_conversations(4, seed=8, max_turns=2)
    stock = onepass.logprobs(model, tokenizer, records, accelerations="none")
    accelerated = onepass.logprobs(model, tokenizer, records, accelerations="auto")
    np.testing.assert_allclose([r["logprob_response"] for r in accelerated], [r["logprob_response"] for r in stock],
                               rtol=0, atol=1e-4)


def test_importing_onepass_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, onepass; onepass.TrainOptions; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("why", ["a LoRA target it does not have", "a model the check refuses"])
def test_a_run_that_fails_before_it_starts_gives_the_model_back_as_it_came(tokenizer, tmp_path, why):
    import zoo_configs

    if why == "a model the check refuses":
        model, values = zoo_configs.build("hyperclovax"), {}
    else:
        model, values = build_model(None, vocab_size=len(tokenizer)), {
            "lora": onepass.LoraOptions(enabled=True, targets=["no_such_proj"])}
    model.eval()
    original = model.config._attn_implementation
    with pytest.raises(onepass.OnepassError):
        onepass.fit(model, random_conversations(16, seed=4, max_turns=2), options(tmp_path, **values),
                    tokenizer=tokenizer)
    assert model.config._attn_implementation == original and not onepass_attributes(model)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for module in model.modules():
        assert "forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks
