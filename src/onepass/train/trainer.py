"""`Trainer`: the training loop over a built `Run` (see run.py). Each piece decides its own timing:
the evaluator when to evaluate, the checkpointer when to save, the metrics log when to write.

Under torchrun every rank runs the same loop and stops after the same step; files are written by rank 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onepass.config import TrainConfig, save_config, to_dict
from onepass.train import distributed
from onepass.train.checkpoint import TrainerState
from onepass.train.export import export_model
from onepass.train.metrics import MetricsLog, plot_loss, progress_bar
from onepass.train.run import Run, build_run
from onepass.train.signals import StopOnSignal
from onepass.train.step import StepResult, train_step
from onepass.train.trackers import Trackers


EARLY_STOPPING = "early stopping"


@dataclass
class TrainResult:
    steps: int
    final_dir: Path | None  # None when the run stopped before its last step
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal ended the run early, or "early stopping"
    model: Any = None  # the model trained (onepass.train gives it back here)


class Trainer:
    """Trains a `Run` to its end (or to `stop_at` steps), then evaluates and exports; stopped early,
    it leaves a checkpoint to resume from. `step` is the optimizer-step function (injectable)."""

    def __init__(self, run: Run, step: Callable[..., StepResult] = train_step):
        self.run = run
        self.step = step
        self.state = TrainerState(step=0, micro_batches_per_step=run.plan.micro_batches_per_step)

    def fit(self, stop_at: int | None = None) -> TrainResult:
        run, main = self.run, self.run.cluster.is_main
        if main:
            run.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(run.config, run.output_dir / "config.yaml")
        resumed = self._resume()
        resume_step = self.state.step if resumed else 0
        trackers = Trackers(run.config.report_to, run.output_dir, to_dict(run.config), run.config.run_name,
                            resume_step, enabled=main)
        log = MetricsLog(run.output_dir, resume_step, trackers, enabled=main, log_every=run.config.log_every)
        try:  # the trackers get their last rows and are closed, whatever ends the run
            eval_before = None if resumed else self._evaluate(log)
            end = min(stop_at, run.total_steps) if stop_at is not None else run.total_steps
            stopped_by = self._loop(end, log)
            eval_after = final_dir = None
            if self.state.step < run.total_steps and stopped_by != EARLY_STOPPING:  # leave a checkpoint to resume
                self._save()
            else:
                eval_after = self._best_or_last(self._evaluate(log), log)
                final_dir = export_model(run.model, run.tokenizer, run.template, run.config, run.output_dir,
                                         run.cluster)
                if main:
                    plot_loss(log.rows(), run.output_dir / "loss.png")
        finally:
            log.close()
        return TrainResult(self.state.step, final_dir, log.rows(), eval_before, eval_after, stopped_by)

    def _loop(self, end: int, log: MetricsLog) -> str | None:
        """Steps until `end` or a stop signal (on any rank); returns what stopped it early, if anything."""
        run = self.run
        with progress_bar(run.config.progress and run.cluster.is_main) as progress, StopOnSignal() as stop:
            task = progress.add_task("train", total=run.total_steps, completed=self.state.step, loss=float("nan"),
                                     tokens_per_sec=0.0, trained_tokens_per_sec=0.0)
            while self.state.step < end:
                row = self._one_step(log)
                progress.update(task, completed=self.state.step, loss=row["loss"],
                                tokens_per_sec=row["tokens_per_sec"],
                                trained_tokens_per_sec=row["trained_tokens_per_sec"])
                if run.early_stopping.should_stop(self.state):  # the same decision on every rank
                    return EARLY_STOPPING
                # every rank stops after the same step, even if the signal reached only some of them
                if distributed.all_reduce_sum([stop.received is not None], run.cluster)[0]:
                    break
        if stop.received is not None:
            return stop.received.name
        return "a signal on another rank" if self.state.step < end else None

    def _one_step(self, log: MetricsLog) -> dict[str, Any]:
        run = self.run
        lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps inside it)
        started = time.perf_counter()
        result = self.step(run.objective, run.optimizer, run.scheduler, run.plan.step_batches(self.state.step),
                           run.step_options, run.cluster)
        seconds = time.perf_counter() - started
        self.state = dataclasses.replace(self.state, step=self.state.step + 1,
                                         skipped_steps=self.state.skipped_steps + result.skipped)
        row = {"step": self.state.step, "loss": result.loss, "lr": lr,
               "grad_norm": result.grad_norm, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
               "tokens_per_sec": result.tokens / seconds, "trained_tokens_per_sec": result.trained_tokens / seconds,
               "skipped_steps": self.state.skipped_steps}
        if result.router_loss is not None:
            row["router_loss"] = result.router_loss  # apart from `loss`, which is the NLL term alone
        if run.evaluator.should_evaluate(self.state.step, run.total_steps):
            row.update(run.evaluator.evaluate(run.objective))
            log.samples(self.state.step, run.samples.write(self.state.step, run.model, run.tokenizer, run.template))
            self.state, improved = run.early_stopping.update(self.state, row["eval_loss"])
            if improved and run.config.keep_best:
                run.checkpointer.save_best(self.state, distributed.unwrap(run.objective), run.optimizer,
                                           run.scheduler)
        if log.should_log(row):
            log.write(row)
        if run.checkpointer.should_save(self.state.step):
            self._save()
        return row

    def _best_or_last(self, last: dict[str, float], log: MetricsLog) -> dict[str, float]:
        """With keep_best, the weights of the best held-out evaluation, unless the last is at least as good."""
        run, best = self.run, self.state.best_eval_loss
        if not (run.config.keep_best and last and best is not None and best < last["eval_loss"]):
            return last
        run.checkpointer.restore_best(distributed.unwrap(run.objective), run.optimizer, run.scheduler)
        results = run.evaluator.evaluate(run.objective)
        log.write({"step": self.state.step, "exported_best_step": self.state.best_step, **results})
        return results

    def _evaluate(self, log: MetricsLog) -> dict[str, float]:
        results = self.run.evaluator.evaluate(self.run.objective)
        log.samples(self.state.step, self.run.samples.write(self.state.step, self.run.model, self.run.tokenizer,
                                                            self.run.template))
        if results:
            log.write({"step": self.state.step, **results})
        return results

    def _resume(self) -> bool:
        run = self.run
        if run.config.resume != "auto":
            return False
        state = run.checkpointer.resume(distributed.unwrap(run.objective), run.optimizer, run.scheduler,
                                        run.plan.micro_batches_per_step)
        if state is not None:
            self.state = state
        return state is not None

    def _save(self) -> Path:
        run = self.run
        return run.checkpointer.save(self.state, distributed.unwrap(run.objective), run.optimizer, run.scheduler)


def train(config: TrainConfig) -> TrainResult:
    return Trainer(build_run(config)).fit()
