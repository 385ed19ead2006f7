"""Checkpoints you can trust: written to a temp dir and renamed into place only when complete,
so a crash at any moment leaves the previous checkpoint intact; the last N are kept.

A checkpoint holds everything needed to continue exactly: model weights and optimizer state
(torch.distributed.checkpoint: each rank writes its own shard under FSDP, and a checkpoint
loads on any number of ranks, sharded or not), scheduler state, each rank's RNG state, the
step reached, and the resolved config.
"""

from __future__ import annotations

import logging
import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from onepass.errors import OnepassError
from onepass.train.distributed import Cluster, agree_on_error, broadcast

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written last; a directory without it is ignored (and cleaned up)
BEST = "BEST"  # in checkpoints/: the name of the checkpoint with the lowest held-out loss (keep_best)
PREFIX = "step-"


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed
    skipped_steps: int = 0
    micro_batches_per_step: int = 0  # grad_accum × ranks: the data order depends on it
    best_eval_loss: float | None = None  # the lowest held-out loss so far, at best_step
    best_step: int = 0
    evaluations_since_best: int = 0


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"{PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's own device (each rank saves its own state)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]  # older checkpoints hold a list, one state per visible device
        torch.cuda.set_rng_state(saved[torch.cuda.current_device()] if isinstance(saved, list) else saved)


class ModelAndOptimizer(Stateful):
    """Model and optimizer state under their parameter names, whatever the wrapping (plain, DDP or
    FSDP2): what torch.distributed.checkpoint saves and reshards on load."""

    def __init__(self, model: Any, optimizer: Any):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def save_checkpoint(output_dir: str | Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState,
                    config_yaml: str, keep_last: int, cluster: Cluster = Cluster()) -> Path:
    """Write `checkpoints/step-N` atomically (every rank writes its shard, rank 0 the rest and the
    rename), then prune to the newest `keep_last`. Collective: every rank calls it."""
    root = checkpoint_dir(output_dir)
    final = checkpoint_path(output_dir, state.step)
    temp, error = None, None
    if cluster.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            temp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        except OSError as failure:
            error = _reason(failure)
    temp, error = broadcast((temp, error), cluster)
    if error is None:
        try:
            with _single_process_quiet():
                dcp.save({"train": ModelAndOptimizer(model, optimizer)}, checkpoint_id=temp / "model_and_optimizer",
                         no_dist=not cluster.is_distributed)
            torch.save(rng_state(), temp / f"rng-rank{cluster.rank}.pt")
        except (OSError, CheckpointException) as failure:  # DCP wraps each rank's error (a BaseException)
            if not isinstance(_cause(failure), OSError):
                raise  # not the disk: a bug, which deserves its traceback
            error = _reason(failure)
        error = agree_on_error(error, cluster)
    if error is None and cluster.is_main:
        try:
            torch.save({"scheduler": scheduler.state_dict()}, temp / "training_state.pt")
            (temp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state)))
            (temp / "config.yaml").write_text(config_yaml)
            (temp / COMPLETE).write_text("")
            _fsync_tree(temp)
            _swap_into_place(temp, final)
        except OSError as failure:
            error = _reason(failure)
    error = broadcast(error, cluster)
    if error is not None:
        if cluster.is_main and temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        raise OnepassError(f"could not write checkpoint {final}: {error}. The previous checkpoint is intact. "
                           "Fix: free disk space or fix permissions of the output directory, then resume.")
    if cluster.is_main:
        prune(root, keep_last)
    return final


def _swap_into_place(temp: Path, final: Path) -> None:
    """Rename the complete `temp` to `final`. An existing `final` is renamed aside first and deleted only
    once the new one is in place, so a kill at any moment leaves a complete checkpoint under one of the
    two names (the one aside is a `.tmp-` directory, so an interrupted swap's leftover is pruned)."""
    aside = None
    if final.exists():
        aside = final.with_name(f"{SET_ASIDE}{final.name}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(temp, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _cause(failure: BaseException) -> BaseException:
    """The error underneath DCP's CheckpointException (the first failing rank's)."""
    if isinstance(failure, CheckpointException) and failure.failures:
        return next(iter(failure.failures.values()))[0]
    return failure


def _reason(failure: BaseException) -> str:
    """One line for a failed write: the underlying error, not DCP's per-rank tracebacks."""
    cause = _cause(failure)
    return f"{type(cause).__name__}: {cause}"


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns when it runs without a process group; for one process that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


SET_ASIDE = ".tmp-replaced-"  # a checkpoint renamed aside while its replacement takes its name


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    for aside in root.glob(f"{SET_ASIDE}*"):  # killed between the two renames: the old one goes back
        original = root / aside.name[len(SET_ASIDE):]
        if not original.exists() and (aside / COMPLETE).exists():
            os.replace(aside, original)
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).exists())


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints, and the best one if there is a BEST marker."""
    for stale in root.glob(".tmp-*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    best = best_checkpoint(root.parent)
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)


def best_checkpoint(output_dir: str | Path) -> Path | None:
    marker = checkpoint_dir(output_dir) / BEST
    if not marker.exists():
        return None
    path = checkpoint_dir(output_dir) / marker.read_text().strip()
    return path if (path / COMPLETE).exists() else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any,
                    cluster: Cluster = Cluster()) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG in place (on any number of ranks); returns the step
    to continue from. Collective: every rank calls it."""
    with _single_process_quiet():
        dcp.load({"train": ModelAndOptimizer(model, optimizer)}, checkpoint_id=path / "model_and_optimizer",
                 no_dist=not cluster.is_distributed)
    scheduler.load_state_dict(torch.load(path / "training_state.pt", weights_only=False)["scheduler"])
    rng_file = path / f"rng-rank{cluster.rank}.pt"
    if rng_file.exists():  # a rank the checkpoint did not have keeps its seeded state
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


class Checkpointer:
    """A run's checkpoints: when to save (every `save_every` steps, and when stopped early), saving,
    and resuming from the newest complete one. Collective: every rank calls each method."""

    def __init__(self, output_dir: str | Path, save_every: int, keep_last: int, config_yaml: str,
                 cluster: Cluster = Cluster()):
        self.output_dir = Path(output_dir)
        self.save_every, self.keep_last, self.config_yaml, self.cluster = save_every, keep_last, config_yaml, cluster

    def should_save(self, step: int) -> bool:
        return bool(self.save_every) and step % self.save_every == 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint as rank 0 sees it, on every rank: ranks listing a shared
        filesystem with attribute caching (NFS) may see different directories, and every collective
        that follows (saving, loading) needs them to agree."""
        return broadcast(self.list_latest() if self.cluster.is_main else None, self.cluster)

    def list_latest(self) -> Path | None:
        """This process's own listing of the output directory (rank 0's decides, see `latest`)."""
        return latest_checkpoint(self.output_dir)

    def save(self, state: TrainerState, model: Any, optimizer: Any, scheduler: Any) -> Path:
        existing = self.latest()
        if existing == checkpoint_path(self.output_dir, state.step):
            return existing  # the same step is the same state: never replace a good checkpoint with itself
        return save_checkpoint(self.output_dir, model, optimizer, scheduler, state, self.config_yaml,
                               self.keep_last, self.cluster)

    def resume(self, model: Any, optimizer: Any, scheduler: Any, micro_batches_per_step: int) -> TrainerState | None:
        """Restore the newest complete checkpoint in place and return its state (None when there is none).
        Warns when it was written with another number of micro-batches per step (the data order differs)."""
        checkpoint = self.latest()
        if checkpoint is None:
            return None
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, self.cluster)
        if state.micro_batches_per_step not in (0, micro_batches_per_step) and self.cluster.is_main:
            log.warning(f"warning: {checkpoint} was written with {state.micro_batches_per_step} micro-batches per step "
                  f"(grad_accum × ranks); this run has {micro_batches_per_step}, so the data order and batch "
                  "size differ from the run that wrote it. To continue it exactly, set grad_accum="
                  f"{state.micro_batches_per_step / self.cluster.world_size:g}.")
        return dataclasses.replace(state, micro_batches_per_step=micro_batches_per_step)

    def save_best(self, state: TrainerState, model: Any, optimizer: Any, scheduler: Any) -> Path:
        """Save this step's checkpoint and mark it the best (kept beside the last N)."""
        path = self.save(state, model, optimizer, scheduler)
        if self.cluster.is_main:
            marker = checkpoint_dir(self.output_dir) / BEST
            temp = marker.with_suffix(".tmp")
            temp.write_text(path.name)
            os.replace(temp, marker)
            prune(checkpoint_dir(self.output_dir), self.keep_last)
        return path

    def restore_best(self, model: Any, optimizer: Any, scheduler: Any) -> TrainerState | None:
        """Load the best checkpoint's weights (and optimizer state) in place; None if there is none."""
        path = broadcast(best_checkpoint(self.output_dir), self.cluster)
        return load_checkpoint(path, model, optimizer, scheduler, self.cluster) if path is not None else None
