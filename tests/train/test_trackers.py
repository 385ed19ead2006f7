"""Experiment trackers: what a run sends to TensorBoard and (offline) Weights & Biases is read back
and equals metrics.jsonl and samples.jsonl."""

from __future__ import annotations

import json
import struct

import pytest

from onepass.config import load_config
from onepass.errors import ConfigError, OnepassError
from onepass.train.trackers import check_trackers

from conftest import make_config, trained


def wandb_records(run_file):
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks, each record
    split into chunks with a 7-byte header: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks, records = 7, [], []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def test_tensorboard_and_wandb_receive_the_config_every_metrics_row_and_the_sample_replies(run_assets, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "out"
    config = make_config(run_assets, output, "max_steps=4", "eval_every=2", "eval_samples=1",
                         "report_to=[tensorboard, wandb]", "run_name=trackers-test")
    trained(config).fit()
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    eval_losses = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert {e.step: pytest.approx(e.value) for e in events.Scalars("loss")} == losses
    assert {e.step: pytest.approx(e.value) for e in events.Scalars("eval_loss")} == eval_losses
    texts = {tag: [e.step for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    assert texts["samples/text_summary"] == sorted({s["step"] for s in samples})
    assert "config/text_summary" in texts

    (run_file,) = (output / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "trackers-test"
    config_values = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config_values["lr"] == pytest.approx(config.lr) and config_values["eval_samples"] == 1
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert {h["_step"]: pytest.approx(h["loss"]) for h in history if "loss" in h} == losses
    assert {h["_step"]: pytest.approx(h["eval_loss"]) for h in history if "eval_loss" in h} == eval_losses
    tables = sorted(run_file.parent.glob("files/media/table/samples_*.table.json"),
                    key=lambda p: int(p.name.split("_")[1]))
    logged = [row for table in tables for row in json.loads(table.read_text())["data"]]
    assert logged == [[s["step"], s["prompt"], s["reply"], s["reference"]] for s in samples]


def test_a_resumed_run_continues_its_tensorboard_log_with_each_step_once(run_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(run_assets, tmp_path / "out", "max_steps=4", "save_every=1", "report_to=[tensorboard]")
    assert trained(config).fit(stop_at=2).steps == 2
    trained(config).fit()
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows if "loss" in r])


def test_a_missing_tracker_package_is_a_one_line_error_naming_the_extra():
    with pytest.raises(OnepassError, match=r"pip install 'onepass\[wandb\]'"):
        check_trackers(["wandb"], find_spec=lambda name: None)


def test_the_old_tensorboard_key_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"report_to: \[tensorboard\]"):
        load_config(None, ["model=m", "data.train=[d.jsonl]", "tensorboard=true"])
