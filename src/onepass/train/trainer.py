"""`Trainer`: the training loop over a built `Run` (see run.py). Each piece decides its own timing:
the evaluator when to evaluate, the checkpointer when to save, the metrics log when to write.

Under torchrun every rank runs the same loop and stops after the same step; files are written by rank 0.
"""

from __future__ import annotations

import dataclasses
import time
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
    it leaves a checkpoint to resume from. `fit` is the loop, top to bottom; the pieces it calls decide
    their own timing (the evaluator when to evaluate, the checkpointer when to save, the log when to write)."""

    def __init__(self, run: Run):
        self.run = run
        self.state = TrainerState(step=0, micro_batches_per_step=run.plan.micro_batches_per_step)

    def fit(self, stop_at: int | None = None) -> TrainResult:
        run, main = self.run, self.run.cluster.is_main
        if main:
            run.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(run.config, run.output_dir / "config.yaml")
        resumed = self._resume()
        start = self.state.step if resumed else 0
        trackers = Trackers(run.config.report_to, run.output_dir, to_dict(run.config), run.config.run_name,
                            start, enabled=main)
        log = MetricsLog(run.output_dir, start, trackers, enabled=main, log_every=run.config.log_every)
        end = min(stop_at, run.total_steps) if stop_at is not None else run.total_steps
        stopped_by = None
        try:  # the trackers get their last rows and are closed, whatever ends the run
            eval_before = None if resumed else self._evaluate(log)
            with progress_bar(run.config.progress and main) as progress, StopOnSignal() as stop:
                task = progress.add_task("train", total=run.total_steps, completed=self.state.step,
                                         loss=float("nan"), tokens_per_sec=0.0, trained_tokens_per_sec=0.0)
                while self.state.step < end and stopped_by is None:
                    micro_batches = run.plan.step_batches(self.state.step)
                    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps inside it)
                    started = time.perf_counter()
                    result = train_step(run.objective, run.optimizer, run.scheduler, micro_batches,
                                        run.step_options, run.cluster)
                    row = self._advance(result, lr, time.perf_counter() - started)
                    if run.evaluator.should_evaluate(self.state.step, run.total_steps):
                        row.update(self._evaluate_and_keep_best(log))
                    if log.should_log(row):
                        log.write(row)
                    progress.update(task, completed=self.state.step, loss=row["loss"],
                                    tokens_per_sec=row["tokens_per_sec"],
                                    trained_tokens_per_sec=row["trained_tokens_per_sec"])
                    if run.checkpointer.should_save(self.state.step):
                        self._save()
                    stopped_by = self._stop_reason(stop)  # the same answer on every rank
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

    def _advance(self, result: StepResult, lr: float, seconds: float) -> dict[str, Any]:
        """The state after a step, and the step's metrics row."""
        self.state = dataclasses.replace(self.state, step=self.state.step + 1,
                                         skipped_steps=self.state.skipped_steps + result.skipped)
        row = {"step": self.state.step, "loss": result.loss, "lr": lr,
               "grad_norm": result.grad_norm, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
               "tokens_per_sec": result.tokens / seconds, "trained_tokens_per_sec": result.trained_tokens / seconds,
               "skipped_steps": self.state.skipped_steps}
        if result.router_loss is not None:
            row["router_loss"] = result.router_loss  # apart from `loss`, which is the NLL term alone
        return row

    def _evaluate_and_keep_best(self, log: MetricsLog) -> dict[str, float]:
        """One decision from one held-out evaluation: its losses (and sample replies), whether it is the
        best so far (early stopping counts the others), and with keep_best the best checkpoint kept."""
        run = self.run
        results = run.evaluator.evaluate(run.objective)
        log.samples(self.state.step, run.samples.write(self.state.step, run.model, run.tokenizer, run.template))
        self.state, improved = run.early_stopping.update(self.state, results["eval_loss"])
        if improved and run.config.keep_best:
            run.checkpointer.save_best(self.state, distributed.unwrap(run.objective), run.optimizer, run.scheduler)
        return results

    def _stop_reason(self, stop: StopOnSignal) -> str | None:
        """Why the loop ends after this step, decided alike on every rank: early stopping, or a stop
        signal that reached any rank."""
        if self.run.early_stopping.should_stop(self.state):
            return EARLY_STOPPING
        if distributed.all_reduce_sum([stop.received is not None], self.run.cluster)[0]:
            return stop.received.name if stop.received is not None else "a signal on another rank"
        return None

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
