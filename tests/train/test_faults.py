"""Runs that go wrong: bad configs stop before any expensive work, numerical faults are caught at
their step, and runs that are interrupted or killed end with the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from onepass.train.batch import collate
from onepass.config import load_config
from onepass.errors import OnepassError
from onepass.data.types import Example
from onepass.demo.tiny import build_model, build_tokenizer
from onepass.train.run import build_run
from onepass.train.step import train_step
from onepass.train.trainer import Trainer

from conftest import final_weights, sums, write_jsonl


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("faults")
    build_model(root / "model", vocab_size=512, hidden_size=32, intermediate_size=64)
    write_jsonl(root / "train.jsonl", sums(60, seed=1))
    write_jsonl(root / "eval.jsonl", sums(8, seed=2))
    return root, tokenizer_dir


def config_values(assets, output_dir, **values):
    root, tokenizer_dir = assets
    return {"model": str(root / "model"), "tokenizer": str(tokenizer_dir), "output_dir": str(output_dir),
            "data": {"train": [str(root / "train.jsonl")]}, "max_seq_len": 128, "batch_size": 1,
            "grad_accum": 2, "lr": 3e-3, "progress": False, "precision": "fp32", **values}


def make_config(assets, output_dir, **values):
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in
                              config_values(assets, output_dir, **values).items()])


def must_not_prepare(*args, **kwargs):
    raise AssertionError("data preparation started before the config was checked")


# --- Bad configs: a clear error before any expensive work -------------------------------------

def test_a_model_dir_without_weights_fails_before_data_preparation(assets, tmp_path):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "config.json").write_text((assets[0] / "model" / "config.json").read_text())
    with pytest.raises(OnepassError, match="has no weights.*save_pretrained"):
        build_run(make_config(assets, tmp_path / "out", model=str(tmp_path / "empty_model")),
                  prepare_data=must_not_prepare)


def test_a_tokenizer_without_chat_template_and_none_given_fails_before_data_preparation(assets, tmp_path):
    tokenizer = build_tokenizer(tmp_path / "plain")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(tmp_path / "plain"))
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(OnepassError, match="chat template"):
        build_run(make_config(assets, tmp_path / "out", tokenizer=str(tmp_path / "plain")),
                  prepare_data=must_not_prepare)


def test_max_seq_len_shorter_than_every_example_is_an_error_that_says_which_key_to_change(assets, tmp_path):
    with pytest.raises(OnepassError, match=r"no training examples left.*longer than max_seq_len ×60.*raise max_seq_len"):
        build_run(make_config(assets, tmp_path / "out", max_seq_len=8))


def test_held_out_data_that_prepares_to_nothing_is_an_error_not_a_silent_skip(assets, tmp_path):
    write_jsonl(tmp_path / "long_eval.jsonl", [{"messages": [{"role": "user", "content": "hi " * 200},
                                                             {"role": "assistant", "content": "yes"}]}])
    config = make_config(assets, tmp_path / "out", data={"train": [str(assets[0] / "train.jsonl")],
                                                         "eval": [str(tmp_path / "long_eval.jsonl")]})
    with pytest.raises(OnepassError, match="no eval examples left"):
        build_run(config)


def test_a_batch_larger_than_the_data_is_an_error(assets, tmp_path):
    with pytest.raises(OnepassError, match=r"batch_size × grad_accum × ranks = 64 × 2 × 1 = 128 packed rows.*only"):
        build_run(make_config(assets, tmp_path / "out", batch_size=64))


def test_training_reports_what_became_of_every_record(assets, tmp_path, capsys):
    write_jsonl(tmp_path / "mixed.jsonl", sums(20, seed=3) + [{"messages": [{"role": "bot", "content": "x"}]}])
    config = make_config(assets, tmp_path / "out", data={"train": [str(tmp_path / "mixed.jsonl")],
                                                         "on_bad_record": "skip"})
    build_run(config)
    err = capsys.readouterr().err
    assert "train data: 21 records → 20 examples" in err and "rejected 1 (unknown role" in err
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and json.loads(rejects[0])["where"] == "line 21"


# --- Numerical faults ---------------------------------------------------------------------------

class PoisonedObjective(torch.nn.Module):
    """The trainer's objective, with a NaN loss on request (as a bad batch or an overflow would give):
    `poison` true, or a function that says so at each call."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective
        self.poison = False

    def forward(self, batch, denominator, router_share=0.0):
        loss, nll, router_loss = self.objective(batch, denominator, router_share)
        poisoned = self.poison() if callable(self.poison) else self.poison
        return (loss * float("nan"), nll, router_loss) if poisoned else (loss, nll, router_loss)


def snapshot(run):
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in run.optimizer.state_dict()["state"].items()}
    return weights, moments


def assert_same(a, b):
    for key in a[0]:
        torch.testing.assert_close(a[0][key], b[0][key], rtol=0, atol=0)
    for index in a[1]:
        for key in a[1][index]:
            torch.testing.assert_close(a[1][index][key], b[1][index][key], rtol=0, atol=0)


def poisoned_run(config):
    """A built run whose objective gives a NaN loss on request."""
    run = build_run(config)
    return dataclasses.replace(run, objective=PoisonedObjective(run.objective))


def step(run, index):
    return train_step(run.objective, run.optimizer, run.scheduler, run.plan.step_batches(index), run.step_options)


def test_skip_step_leaves_weights_and_optimizer_state_unchanged_and_is_counted(assets, tmp_path):
    run = poisoned_run(make_config(assets, tmp_path / "out", on_nonfinite="skip_step", max_steps=6))
    for index in range(2):
        step(run, index)
    before, lr_steps = snapshot(run), run.scheduler.last_epoch
    run.objective.poison = True
    result = step(run, 2)
    assert result.skipped and not np.isfinite(result.loss)
    assert_same(before, snapshot(run))
    assert run.scheduler.last_epoch == lr_steps + 1  # the step is spent: the schedule stays on the data
    assert all(p.grad is None for p in run.model.parameters())  # nothing leaks into the next step


def test_a_skipped_step_shows_in_the_metrics_and_training_goes_on(assets, tmp_path):
    run = poisoned_run(make_config(assets, tmp_path / "out", on_nonfinite="skip_step", max_steps=5))
    trainer = Trainer(run)
    run.objective.poison = lambda: trainer.state.step == 2  # the third step
    result = trainer.fit()
    rows = [r for r in result.metrics if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert result.final_dir is not None and all(np.isfinite(r["loss"]) for r in rows if r["step"] != 3)


def test_on_nonfinite_error_stops_at_the_step_where_it_happens(assets, tmp_path):
    run = poisoned_run(make_config(assets, tmp_path / "out", max_steps=4))
    run.objective.poison = True
    with pytest.raises(OnepassError, match=r"non-finite loss .* at step 1\b.*on_nonfinite: skip_step"):
        step(run, 0)


def test_a_step_with_no_trained_token_never_divides_by_zero(assets, tmp_path):
    run = build_run(make_config(assets, tmp_path / "out", max_steps=2, max_grad_norm=0.0))
    untrained = Example(np.arange(3, 20, dtype=np.int32), np.zeros(17, dtype=np.int8), np.full(17, -1, np.int32))
    batch = collate([untrained], "token")
    assert batch.units == 0
    before = snapshot(run)
    result = train_step(run.objective, run.optimizer, run.scheduler, [batch], run.step_options)
    assert result.loss == 0.0 and result.grad_norm == 0.0 and not result.skipped
    assert_same(before, (snapshot(run)[0], before[1]))  # zero gradients: the weights do not move


# --- Interrupted and killed runs (real subprocesses) --------------------------------------------

STEPS = 100  # long enough that a signal sent after step 5 always lands before the end

def write_config(assets, path, **values):
    path.mkdir(parents=True, exist_ok=True)
    config = config_values(assets, path / "out", max_steps=STEPS, warmup_steps=2, **values)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path / "config.yaml"


def start_training(config):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "onepass", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def steps_logged(output_dir):
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(process, output_dir, count, timeout=120):
    deadline = time.monotonic() + timeout
    while steps_logged(output_dir) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"training ended or stalled before step {count}: {finish(process)}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    path = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = finish(start_training(write_config(assets, path)))
    assert code == 0, err
    return final_weights(path / "out")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly_and_the_resumed_run_matches(
        assets, uninterrupted, tmp_path, sig):
    config = write_config(assets, tmp_path)
    process = start_training(config)
    wait_for_steps(process, tmp_path / "out", 5)
    process.send_signal(sig)
    code, _, err = finish(process)
    assert code == 128 + sig, err
    assert f"stopped by {sig.name} after step" in err and "Traceback" not in err
    step = int(err.split("after step ")[1].split(";")[0])
    assert 5 <= step < STEPS and (tmp_path / "out" / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()
    code, _, err = finish(start_training(config))
    assert code == 0, err
    got = final_weights(tmp_path / "out")
    for name, value in uninterrupted.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_checkpoint_that_resumes_wrongly(assets, uninterrupted, tmp_path):
    config = write_config(assets, tmp_path, save_every=1, keep_last=2)
    rng = random.Random(0)
    for kill in range(4):
        process = start_training(config)
        wait_for_steps(process, tmp_path / "out", 3 + 6 * kill)  # let each run get past its resume point
        time.sleep(rng.uniform(0.0, 0.4))  # checkpoints are written every step: often mid-write
        process.kill()
        process.wait()
    code, _, err = finish(start_training(config))
    assert code == 0, err
    got = final_weights(tmp_path / "out")
    for name, value in uninterrupted.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # one row per step, none twice
