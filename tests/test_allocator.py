"""onepass.allocator: the commands that run a model start again on mimalloc, once, in the same process;
the user can keep the C library's malloc; training is the same either way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import final_weights
from onepass import allocator
from onepass.errors import OnepassError

needs_mimalloc = pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.mimalloc_library() is None,
                                    reason="mimalloc's wheel is a Linux dependency")

# what `onepass train` does first, then which allocator it runs on, printed from each start of the process
PROBE = ("import os; from onepass import allocator; print('start', os.getpid(), flush=True); "
         "allocator.restart_on_mimalloc(); print('running', os.getpid(), allocator.active())")


def clean_environment(**values: str) -> dict[str, str]:
    """This environment without any allocator setting of the test runner's own, plus `values`."""
    names = ("LD_PRELOAD", allocator.STARTED, allocator.SWITCH, "MIMALLOC_PURGE_DELAY")
    return {**{k: v for k, v in os.environ.items() if k not in names}, **values}


def probe(**values: str) -> list[list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=clean_environment(**values), check=True)
    return [line.split() for line in done.stdout.splitlines()]


@needs_mimalloc
def test_a_model_command_starts_again_once_on_mimalloc_as_the_same_process():
    lines = probe()
    assert [line[0] for line in lines] == ["start", "start", "running"]
    assert len({line[1] for line in lines}) == 1  # one pid: torchrun and a terminal's signals still reach it
    assert lines[-1][2] == "mimalloc"


def test_onepass_allocator_system_keeps_the_c_librarys_malloc():
    assert [line[0] for line in probe(ONEPASS_ALLOCATOR="system")] == ["start", "running"]
    assert probe(ONEPASS_ALLOCATOR="system")[-1][2] == "system"


def test_a_users_own_preload_and_an_already_restarted_process_are_left_alone():
    assert allocator.preload_environment({"LD_PRELOAD": "/opt/lib/libprofiler.so"}) is None
    assert allocator.preload_environment({allocator.STARTED: "1"}) is None


@needs_mimalloc
def test_the_restart_preloads_the_library_and_keeps_freed_memory_unless_the_user_says_otherwise():
    environment = allocator.preload_environment({"PATH": "/usr/bin"})
    assert Path(environment["LD_PRELOAD"]).is_file() and environment["PATH"] == "/usr/bin"
    assert environment["MIMALLOC_PURGE_DELAY"] == "-1"
    assert allocator.preload_environment({"MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"


def test_an_unknown_allocator_is_an_error_that_names_the_variable_and_the_choices():
    with pytest.raises(OnepassError, match=r"ONEPASS_ALLOCATOR='jemalloc'.*Fix: set it to mimalloc or system"):
        allocator.preload_environment({"ONEPASS_ALLOCATOR": "jemalloc"})


@needs_mimalloc
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_mimalloc_gives_the_same_weights_as_on_the_c_librarys_malloc(run_assets, tmp_path, precision):
    """The allocator changes where tensors live, never what is computed: a buffer read before it is
    written would show here, as the two allocators hand out memory with different old contents."""
    root, tokenizer_dir, data, _ = run_assets
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": str(root / "model"), "tokenizer": str(tokenizer_dir),
                                      "data": {"train": [str(data)]}, "max_seq_len": 256, "batch_size": 2,
                                      "lr": 1e-3, "max_steps": 4, "progress": False, "precision": precision}))
    weights, told = {}, {}
    for name in ("mimalloc", "system"):
        done = subprocess.run([sys.executable, "-m", "onepass", "train", str(config), f"output_dir={tmp_path / name}"],
                              capture_output=True, text=True, env=clean_environment(ONEPASS_ALLOCATOR=name,
                                                                                    OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr
        weights[name] = final_weights(tmp_path / name)
        told[name] = next(line for line in done.stderr.splitlines() if line.startswith("allocator:"))
    assert told["mimalloc"].startswith("allocator: mimalloc") and "C library's malloc" in told["system"]
    assert weights["mimalloc"].keys() == weights["system"].keys()
    for key, value in weights["mimalloc"].items():
        assert torch.equal(value, weights["system"][key]), key
