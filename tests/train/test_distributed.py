"""Data parallelism: 2 ranks (torchrun, gloo on CPU) make the same updates as 1 process with the
same global batch, for DDP and FSDP2; checkpoints move between rank counts; errors show once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from onepass.train import distributed
from onepass.train.distributed import Cluster, rank_share
from onepass.demo.tiny import build_model

from conftest import final_weights, sums, write_jsonl


def test_every_rank_gets_the_same_number_of_passes_when_micro_batches_do_not_divide():
    items = list(range(5))
    shares = [rank_share(items, Cluster(rank=r, world_size=2)) for r in range(2)]
    assert shares == [([0, 2, 4], 0), ([1, 3], 1)]
    assert sorted(i for mine, _ in shares for i in mine) == items
    assert rank_share(items[:1], Cluster(rank=1, world_size=2)) == ([], 1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("distributed")
    build_model(root / "model", vocab_size=512, hidden_size=32, intermediate_size=64)
    write_jsonl(root / "train.jsonl", sums(46, seed=1))  # 5 steps per epoch, the last of 3 micro-batches
    write_jsonl(root / "eval.jsonl", sums(12, seed=2))
    return root, tokenizer_dir


def write_config(assets, path, **values):
    root, tokenizer_dir = assets
    config = {"model": str(root / "model"), "tokenizer": str(tokenizer_dir), "output_dir": str(path / "out"),
              "data": {"train": [str(root / "train.jsonl")], "eval": [str(root / "eval.jsonl")]},
              "max_seq_len": 128, "batch_size": 1, "lr": 3e-3, "warmup_steps": 1, "epochs": 2,
              "progress": False, "keep_last": 10, "precision": "fp32", **values}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path / "config.yaml"


def onepass_train(config, nproc=None, *overrides, check=True):
    """`onepass train` as a user runs it: one plain process, or torchrun with `nproc` ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "-m", "onepass", "train", str(config), *overrides], capture_output=True,
                            text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_the_test_data_leaves_an_uneven_last_step(assets, tokenizer):
    """So the tests below also cover a rank that runs a padding pass."""
    from onepass.data.chat_template import load_chat_template
    from onepass.config import load_config
    from onepass.data.prepare import prepare
    from onepass.train.plan import plan_epoch

    root, _ = assets
    config = load_config(None, [f"model={root / 'model'}", f"data.train=[{root / 'train.jsonl'}]", "max_seq_len=128",
                                "batch_size=1", "grad_accum=2"])
    data = prepare(config.data.train_paths(), tokenizer, load_chat_template(tokenizer), config.render_options())
    plan = plan_epoch([len(e) for e in data.examples], config.max_seq_len, config.batch_size, config.grad_accum * 2,
                      config.seed, 0)
    assert len(plan[-1]) % 2 == 1


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """The reference: one process, 4 micro-batches per step."""
    path = tmp_path_factory.mktemp("one")
    onepass_train(write_config(assets, path, grad_accum=4, save_every=3))
    return path / "out"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_loss_curve_and_weights_of_one_process_with_the_same_global_batch(
        assets, one_process, tmp_path, strategy):
    onepass_train(write_config(assets, tmp_path, grad_accum=2, strategy=strategy), 2)
    expected_train, expected_eval = losses(one_process)
    got_train, got_eval = losses(tmp_path / "out")
    assert len(got_train) == len(expected_train) >= 4 and len(expected_eval) == 2
    torch.testing.assert_close(got_train, expected_train, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_eval, expected_eval, rtol=0, atol=1e-5)
    expected, got = final_weights(one_process), final_weights(tmp_path / "out")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_saved_by_two_ranks_resumes_in_one_process(assets, one_process, tmp_path, strategy):
    config = write_config(assets, tmp_path, grad_accum=2, strategy=strategy, save_every=3)
    onepass_train(config, 2)
    out = tmp_path / "out"
    shutil.rmtree(out / "final")
    for checkpoint in (out / "checkpoints").iterdir():  # as if the job had died after step 3
        if checkpoint.name != "step-00000003":
            shutil.rmtree(checkpoint)
    onepass_train(config, None, "grad_accum=4")  # one process, same global batch
    assert losses(out)[0] == pytest.approx(losses(one_process)[0], abs=1e-5)
    expected, got = final_weights(one_process), final_weights(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)


def test_a_user_error_stops_every_rank_and_is_shown_once(assets, tmp_path):
    config = write_config(assets, tmp_path, data={"train": [str(tmp_path / "missing.jsonl")]})
    result = onepass_train(config, 2, check=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "missing.jsonl" in ours[0]
    # torchrun prints its own summary of the failed workers; no traceback comes from onepass's code
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith("File") and "onepass" in line]


def test_fsdp_with_lora_and_gradient_checkpointing_matches_one_process(assets, tmp_path):
    """Frozen and trained parameters share FSDP's shards; layers recompute in the backward pass."""
    extra = {"lora": {"enabled": True, "r": 4}, "gradient_checkpointing": True, "epochs": 1}
    onepass_train(write_config(assets, tmp_path / "one", grad_accum=4, **extra))
    onepass_train(write_config(assets, tmp_path / "two", grad_accum=2, strategy="fsdp", **extra), 2)
    expected_train, expected_eval = losses(tmp_path / "one" / "out")
    got_train, got_eval = losses(tmp_path / "two" / "out")
    torch.testing.assert_close(got_train, expected_train, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_eval, expected_eval, rtol=0, atol=1e-5)
    expected, got = final_weights(tmp_path / "one" / "out"), final_weights(tmp_path / "two" / "out")
    assert expected.keys() == got.keys() and not any("lora" in name for name in got)  # merged on export
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)
    from safetensors.torch import load_file

    base = load_file(str(assets[0] / "model" / "model.safetensors"))
    assert max((got[name] - base[name]).abs().max().item() for name in base) > 1e-3  # the adapters learned


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_tied_output_layer_trains_on_two_ranks_as_in_one_process(assets, tmp_path, strategy):
    """The tied weight's one gradient (the loss's, with the embedding's rows added in place) is what
    DDP all-reduces and FSDP2 reduce-scatters."""
    build_model(tmp_path / "tied", vocab_size=512, hidden_size=32, intermediate_size=64, tie_embeddings=True)
    extra = {"model": str(tmp_path / "tied"), "epochs": 1}
    onepass_train(write_config(assets, tmp_path / "one", grad_accum=4, **extra))
    onepass_train(write_config(assets, tmp_path / "two", grad_accum=2, strategy=strategy, **extra), 2)
    torch.testing.assert_close(losses(tmp_path / "two" / "out"), losses(tmp_path / "one" / "out"), rtol=0, atol=1e-5)
    expected, got = final_weights(tmp_path / "one" / "out"), final_weights(tmp_path / "two" / "out")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)


def torchrun_script(tmp_path, text, *args, timeout=300):
    """A script run as 2 torchrun ranks (gloo, one thread each), as the test scripts below are."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


MAIN_FIRST_SCRIPT = """
import sys, time
import torch.distributed as dist
from onepass.cli.main import show_logs
from onepass.train import distributed

show_logs()  # the library's log lines on stderr, as the command line shows them
cluster = distributed.init(timeout_minutes=1 / 60)  # collectives give up after one second
with distributed.main_first(cluster, notice_seconds=0.5):
    print(f"rank {cluster.rank} enters at {time.time()}", flush=True)
    if cluster.rank == 0:
        time.sleep(3)  # preparing data, three times the process group's timeout
    print(f"rank {cluster.rank} leaves at {time.time()}", flush=True)
with distributed.main_first(cluster):  # a second use keeps the waves apart too
    print(f"rank {cluster.rank} enters again at {time.time()}", flush=True)
distributed.end_process(0)
"""


def test_ranks_wait_for_rank_0_to_prepare_data_longer_than_the_process_group_timeout(tmp_path):
    result = torchrun_script(tmp_path, MAIN_FIRST_SCRIPT, timeout=120)
    assert result.returncode == 0, result.stderr
    times = {" ".join(line.split()[:-2]): float(line.split()[-1]) for line in result.stdout.splitlines()}
    assert times["rank 1 enters"] >= times["rank 0 leaves"] >= times["rank 0 enters"] + 3
    assert times["rank 1 enters again"] >= times["rank 0 enters again"]
    assert "rank 1: waiting for rank 0 to prepare the data" in result.stderr


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_fsdp_in_bf16_gathers_bf16_parameters_keeps_fp32_masters_and_tracks_one_process(assets, tmp_path,
                                                                                        normalization):
    """FSDP2's mixed-precision policy: bf16 all-gathers and compute, fp32 gradient reduction and
    sharded fp32 master weights; the loss curve follows one process's bf16 autocast run, with the
    loss weights of sequence normalisation kept in fp32 (the root casts no inputs)."""
    extra = {"precision": "bf16", "epochs": 1, "loss_normalization": normalization}
    onepass_train(write_config(assets, tmp_path / "one", grad_accum=4, **extra))
    result = onepass_train(write_config(assets, tmp_path / "two", grad_accum=2, strategy="fsdp", **extra), 2)
    assert "FSDP2 gathers parameters in bf16 and reduces gradients in fp32" in result.stderr
    expected_train, _ = losses(tmp_path / "one" / "out")
    got_train, _ = losses(tmp_path / "two" / "out")
    torch.testing.assert_close(got_train, expected_train, rtol=2e-4, atol=0)  # bf16 noise: ~5e-5; a rounded weight: 1e-3
    weights = final_weights(tmp_path / "two" / "out")
    assert {w.dtype for w in weights.values()} == {torch.float32}


@pytest.mark.parametrize("bf16", [False, True])
def test_fsdp_computes_with_bf16_copies_of_fp32_sharded_parameters_under_bf16(tmp_path, bf16):
    import torch.distributed as dist

    from onepass.train import distributed
    from onepass.data.types import Example
    from onepass.train.batch import collate
    from onepass.train.loss import SFTObjective

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(None, vocab_size=64, hidden_size=32, intermediate_size=64)
        layer = distributed.decoder_layers(model)[0]
        objective = distributed.parallelize(SFTObjective(model), distributed.current(), "fsdp", bf16=bf16)
        seen = []
        layer.mlp.up_proj.register_forward_hook(lambda module, args, out: seen.append(module.weight.dtype))
        example = Example(np.array([1, 2, 3, 4], dtype=np.int32), np.array([0, 0, 1, 1], dtype=np.int8),
                          np.array([0, 0, 0, 0], dtype=np.int32))
        loss, _, _ = objective(collate([example]), 2.0)
        loss.backward()
        assert seen == [torch.bfloat16 if bf16 else torch.float32]
        # the sharded masters the optimizer steps, and their gradients, stay fp32
        assert {(p.dtype, p.grad.dtype) for p in model.parameters()} == {(torch.float32, torch.float32)}
    finally:
        dist.destroy_process_group()


FSDP_LOAD_SCRIPT = """
import sys
import torch
from safetensors.torch import load_file
import onepass.train.run as run_module
from onepass.config import load_config
from onepass.train import distributed

built = []
build_model = run_module.build_model
def recording_build_model(*args, **kwargs):
    handle = build_model(*args, **kwargs)
    built.append(next(handle.model.parameters()).device.type)
    return handle
run_module.build_model = recording_build_model
run = run_module.build_run(load_config(sys.argv[1]))
rank = run.cluster.rank
on_disk = load_file(sys.argv[2])
model = distributed.unwrap(run.objective).model
state = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for name, p in model.state_dict().items()}
same = all(torch.equal(state[name], tensor) for name, tensor in on_disk.items() if name in state)
buffers = [b for b in model.buffers() if b.device.type == "meta"]
print(f"rank {rank} built on {built[0]}; weights equal the file: {same}; meta buffers left: {len(buffers)}", flush=True)
distributed.end_process(0)
"""


def test_under_fsdp_only_rank_0_reads_the_weights_and_the_others_receive_them(assets, tmp_path):
    """Ranks other than 0 build the model on the meta device (no memory, no file read) and end with
    rank 0's weights, shard by shard, and its buffers (rotary tables)."""
    config = write_config(assets, tmp_path, strategy="fsdp")
    result = torchrun_script(tmp_path, FSDP_LOAD_SCRIPT, config, assets[0] / "model" / "model.safetensors")
    assert result.returncode == 0, result.stderr
    import re

    lines = sorted(re.findall(r"rank \d built on [a-z]+; weights equal the file: \w+; meta buffers left: \d+",
                              result.stdout))  # the ranks' lines may interleave
    assert lines == ["rank 0 built on cpu; weights equal the file: True; meta buffers left: 0",
                     "rank 1 built on meta; weights equal the file: True; meta buffers left: 0"]


DISK_VIEW_SCRIPT = """
import sys
from pathlib import Path
import torch
from onepass.demo.tiny import build_model
from onepass.train import distributed
from onepass.train.checkpoint import Checkpointer, TrainerState, checkpoint_path

cluster = distributed.init(timeout_minutes=0.5)  # a rank left waiting in a collective fails, not hangs


class LaggingListing(Checkpointer):
    # rank 1 lists the shared output directory through a stale attribute cache (NFS): it always sees step 2
    def list_latest(self):
        return checkpoint_path(self.output_dir, 2)


out = Path(sys.argv[1])
model = build_model(None, vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, seed=0)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
checkpointer = (LaggingListing if cluster.rank == 1 else Checkpointer)(out, 1, 5, "seed: 0\\n", cluster)
for step in (1, 2, 3):  # at step 2 rank 1 believes the checkpoint exists already
    checkpointer.save(TrainerState(step), model, optimizer, scheduler)
state = checkpointer.resume(model, optimizer, scheduler, micro_batches_per_step=0)
print(f"rank {cluster.rank} resumed at step {state.step}", flush=True)
distributed.end_process(0)
"""


def test_every_rank_follows_rank_0s_view_of_the_checkpoints_on_disk(tmp_path):
    result = torchrun_script(tmp_path, DISK_VIEW_SCRIPT, tmp_path / "out", timeout=180)
    assert result.returncode == 0, result.stderr
    import re

    assert sorted(re.findall(r"rank \d resumed at step \d", result.stdout)) == [
        "rank 0 resumed at step 3", "rank 1 resumed at step 3"]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002", "step-00000003"]


@pytest.mark.parametrize("visible, expected", [(8, 3), (1, 0)])
def test_each_rank_binds_its_own_gpu_and_hands_it_to_the_process_group(monkeypatch, visible, expected):
    """LOCAL_RANK 3 on a node showing the rank all 8 GPUs is cuda:3; where the launcher shows each rank only
    its own GPU, cuda:0 (not "invalid device ordinal"); NCCL gets the device when the group is made."""
    calls = {}
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: calls.setdefault("group", (backend, kwargs)))
    distributed.init()
    assert calls["set_device"] == torch.device("cuda", expected)
    backend, kwargs = calls["group"]
    assert backend == "nccl" and kwargs["device_id"] == torch.device("cuda", expected)


def test_under_fsdp_on_gpus_rank_0_loads_the_model_into_cpu_memory_not_onto_one_gpu(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    gpu = Cluster(rank=0, world_size=2, device=torch.device("cuda", 0))
    assert distributed.loading_device(gpu, "fsdp") == torch.device("cpu")
    assert distributed.loading_device(gpu, "ddp") == torch.device("cuda", 0)  # DDP replicates: each its own GPU
    cpu = Cluster(rank=0, world_size=2, device=torch.device("cpu"))
    assert distributed.loading_device(cpu, "fsdp") == torch.device("cpu")
