"""Seeing a run: a progress bar (loss, tokens/s, trained tokens/s, ETA), `metrics.jsonl` (and the
trackers of `report_to`, see trackers.py), and `loss.png` at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from onepass.train.trackers import Trackers


class MetricsLog:
    """Appends one JSON line per step; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, output_dir: str | Path, resume_step: int = 0, trackers: Trackers | None = None,
                 enabled: bool = True, log_every: int = 1):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled  # off on every rank but 0
        self.log_every = log_every
        self.trackers = trackers
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if (row := _parse(line)) is not None and row.get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def should_log(self, row: dict[str, Any]) -> bool:
        """Every `log_every` steps, and every row with a held-out result."""
        return row["step"] % self.log_every == 0 or "eval_loss" in row

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """An evaluation's sample replies (already in samples.jsonl), to the trackers."""
        if self.enabled and self.trackers is not None:
            self.trackers.samples(step, rows)

    def rows(self) -> list[dict[str, Any]]:
        if not self.enabled:
            return []
        return [row for line in self.path.read_text().splitlines() if (row := _parse(line)) is not None]

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


def _parse(line: str) -> dict[str, Any] | None:
    """A metrics row, or None for a blank line or the half-written last line of a killed run."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def plot_loss(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """loss.png: training loss per step, and held-out loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not held_out:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1)
    if held_out:
        axis.plot(*zip(*held_out), "o-", label="held-out loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats per trained token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tokens_per_sec]:,.0f} tok/s"),
        TextColumn("{task.fields[trained_tokens_per_sec]:,.0f} trained tok/s"), TextColumn("ETA"),
        TimeRemainingColumn(), disable=not enabled)
