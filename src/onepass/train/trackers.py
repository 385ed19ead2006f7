"""Experiment trackers (`report_to: [tensorboard, wandb]`): the resolved config once, every metrics
row, and the sample replies of each evaluation, from rank 0. Both packages are optional extras."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onepass.errors import OnepassError

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker → the package it needs (= onepass's extra)
SAMPLE_COLUMNS = ("step", "prompt", "reply", "reference")


def check_trackers(names: list[str], find_spec: Callable[[str], Any] = importlib.util.find_spec) -> None:
    """A missing tracker package is a one-line error before any data is prepared."""
    for name in names:
        if find_spec(EXTRAS[name]) is None:
            raise OnepassError(f"report_to: [{name}] needs the {EXTRAS[name]} package. Fix: .venv/bin/pip install "
                               f"'onepass[{name}]' (or pip install {EXTRAS[name]}), or remove {name} from report_to.")


class TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        import yaml

        # resumed: events a stopped run logged past its checkpoint are dropped, as in metrics.jsonl
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            self.writer.add_text("config", _code_block(yaml.safe_dump(config, sort_keys=False)), 0)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        lines = ["| prompt | reply | reference |", "|---|---|---|"]
        lines += [f"| {_cell(r['prompt'])} | {_cell(r['reply'])} | {_cell(r['reference'])} |" for r in rows]
        self.writer.add_text("samples", "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run in OUTPUT_DIR/wandb (project: $WANDB_PROJECT, default onepass); a resumed
    training run continues the same W&B run."""

    def __init__(self, output_dir: Path, config: dict[str, Any], run_name: str, resume_step: int):
        import wandb

        id_file = output_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if resume_step and id_file.exists() else uuid.uuid4().hex[:8]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "onepass"), name=run_name, id=run_id,
                              dir=str(output_dir), config=config, resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB}


class Trackers:
    """The configured trackers, or none (every rank but 0)."""

    def __init__(self, names: list[str], output_dir: str | Path, config: dict[str, Any], run_name: str | None = None,
                 resume_step: int = 0, enabled: bool = True):
        output_dir = Path(output_dir)  # the packages were checked by build_run (check_trackers)
        name = run_name or output_dir.resolve().name
        self.trackers = [TRACKERS[n](output_dir, config, name, resume_step) for n in names] if enabled else []

    def log(self, row: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(row)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if rows:
            for tracker in self.trackers:
                tracker.samples(step, rows)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown: TensorBoard's text plugin


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
