"""Checkpoints you can trust: a failed write leaves the previous one intact; half-written ones are ignored."""

from __future__ import annotations

import errno

import pytest
import torch

from onepass.train import checkpoint
from onepass.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from onepass.errors import OnepassError
from onepass.demo.tiny import build_model


def training_objects(seed=0):
    model = build_model(None, vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save(output_dir, objects, step):
    return save_checkpoint(output_dir, *objects, TrainerState(step), "seed: 0\n", keep_last=3)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     PermissionError(errno.EACCES, "Permission denied")])
@pytest.mark.parametrize("failing_write", ["torch.save", "dcp.save"])
def test_a_checkpoint_that_cannot_be_written_fails_loudly_and_leaves_the_previous_one_intact(
        tmp_path, monkeypatch, failure, failing_write):
    objects = training_objects()
    good = save(tmp_path, objects, step=1)
    before = {k: v.clone() for k, v in objects[0].state_dict().items()}

    def fail(*args, **kwargs):
        raise failure

    module, name = failing_write.split(".")
    monkeypatch.setattr(getattr(checkpoint, module), name, fail)
    with pytest.raises(OnepassError, match=r"could not write checkpoint .*step-00000002.*previous checkpoint is intact"):
        save(tmp_path, objects, step=2)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == good
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # nothing half-written left behind
    fresh = training_objects(seed=1)
    assert load_checkpoint(good, *fresh) == TrainerState(1)
    for key, value in fresh[0].state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_a_half_written_checkpoint_is_ignored_and_cleaned_up(tmp_path):
    objects = training_objects()
    good = save(tmp_path, objects, step=1)
    killed_while_renaming = tmp_path / "checkpoints" / "step-00000002"  # no COMPLETE marker
    killed_while_renaming.mkdir()
    (killed_while_renaming / "training_state.pt").write_bytes(b"\x80half")
    killed_while_writing = tmp_path / "checkpoints" / ".tmp-abc"
    killed_while_writing.mkdir()
    assert latest_checkpoint(tmp_path) == good
    save(tmp_path, objects, step=3)
    assert not killed_while_writing.exists()
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_a_checkpoint_restores_model_optimizer_and_scheduler_exactly(tmp_path):
    objects = training_objects()
    path = save(tmp_path, objects, step=7)
    fresh = training_objects(seed=5)
    assert load_checkpoint(path, *fresh).step == 7
    for (key, a), b in zip(objects[0].state_dict().items(), fresh[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    state_a, state_b = objects[1].state_dict()["state"], fresh[1].state_dict()["state"]
    for index in state_a:
        torch.testing.assert_close(state_a[index]["exp_avg"], state_b[index]["exp_avg"], rtol=0, atol=0)
    assert fresh[2].state_dict() == objects[2].state_dict()


def test_a_failure_that_is_not_the_disk_is_not_reported_as_one(tmp_path, monkeypatch):
    objects = training_objects()

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in state_dict")

    monkeypatch.setattr(checkpoint, "get_state_dict", bug)
    with pytest.raises(BaseException) as caught:  # DCP wraps it; it keeps its traceback
        save(tmp_path, objects, step=1)
    assert not isinstance(caught.value, OnepassError) and "a bug in state_dict" in str(caught.value)


def test_replacing_a_checkpoint_keeps_a_complete_one_under_a_name_at_every_moment(tmp_path, monkeypatch):
    """The old directory is renamed aside before the new one takes its name, and deleted only after:
    a kill between any two renames leaves a complete checkpoint that resume or prune can use."""
    objects = training_objects()
    final = save(tmp_path, objects, step=1)
    renames = []
    real_replace = checkpoint.os.replace

    def killed_after_first_rename(source, target):
        renames.append((str(source), str(target)))
        real_replace(source, target)
        if len(renames) == 1:
            raise KeyboardInterrupt  # the process dies between the two renames

    monkeypatch.setattr(checkpoint.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, objects, step=1)
    monkeypatch.undo()
    assert renames[0][0] == str(final)  # the old one went aside first
    aside = tmp_path / "checkpoints" / ".tmp-replaced-step-00000001"
    assert (aside / checkpoint.COMPLETE).exists() and not final.exists()  # complete, under the name set aside
    assert latest_checkpoint(tmp_path) == final  # a resume finds it back under its own name
    assert (final / checkpoint.COMPLETE).exists() and not aside.exists()
    assert load_checkpoint(final, *training_objects(seed=1)) == TrainerState(1)
    save(tmp_path, objects, step=1)  # and the next save replaces it cleanly
    assert (final / checkpoint.COMPLETE).exists() and not aside.exists()

