"""Checkpoints you can trust: written to a temp dir and renamed into place only when complete,
so a crash at any moment leaves the previous checkpoint intact; the last N are kept.

A checkpoint holds everything needed to continue exactly: model weights (safetensors),
optimizer and scheduler state, RNG states, the step reached, and the resolved config.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from onepass.errors import OnepassError

COMPLETE = "COMPLETE"  # written last; a directory without it is ignored (and cleaned up)
PREFIX = "step-"


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed
    skipped_steps: int = 0


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState,
                    config_yaml: str, keep_last: int) -> Path:
    """Write `checkpoints/step-N` atomically, then prune to the newest `keep_last`."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:08d}"
    temp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_model(model, str(temp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   temp / "training_state.pt")
        (temp / "trainer_state.json").write_text(json.dumps(state.__dict__))
        (temp / "config.yaml").write_text(config_yaml)
        (temp / COMPLETE).write_text("")
        _fsync_dir(temp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise OnepassError(f"could not write checkpoint {final}: {error}. The previous checkpoint is intact. "
                           "Fix: free disk space or fix permissions of the output directory, then resume.") from None
    prune(root, keep_last)
    return final


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).exists())


def prune(root: Path, keep_last: int) -> None:
    for stale in root.glob(".tmp-*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG in place; returns the step to continue from."""
    load_model(model, str(path / "model.safetensors"))
    training = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    set_rng_state(training["rng"])
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
