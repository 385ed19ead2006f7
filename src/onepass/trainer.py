"""`onepass train`: packed, padding-free SFT with exact loss normalisation and trustworthy resume.

The data order is a pure function of (seed, epoch): each epoch shuffles the examples, packs them
into rows (best-fit decreasing), shuffles the rows and cuts them into micro-batches and optimizer
steps of `grad_accum × ranks` micro-batches. So resuming at step N only needs N, every run with
the same seed sees the same data, and under torchrun each rank takes its share of each step
(see distributed.py): N ranks make the same updates as one process with the same global batch.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from onepass import distributed
from onepass.checkpoint import TrainerState, checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from onepass.collate import Batch, collate, padding_batch
from onepass.config import TrainConfig, save_config, to_dict
from onepass.dataset import PreparedData, prepare
from onepass.distributed import Cluster
from onepass.errors import OnepassError
from onepass.loss import SFTObjective
from onepass.metrics import MetricsLog, plot_loss, progress_bar
from onepass.packing import pack
from onepass.render import Example


def packed_micro_batches(lengths: list[int], config: TrainConfig, rng: np.random.Generator | None = None
                         ) -> list[list[int]]:
    """Example indices per micro-batch: packed rows (shuffled first when `rng` is given), `batch_size` rows each."""
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    rows = [[int(order[i]) for i in row] for row in pack([lengths[i] for i in order], config.max_seq_len)]
    if rng is not None:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return [sum(rows[i:i + config.batch_size], []) for i in range(0, len(rows), config.batch_size)]


def plan_epoch(lengths: list[int], config: TrainConfig, epoch: int, world_size: int = 1) -> list[list[list[int]]]:
    """Steps → micro-batches (of all ranks) → example indices, for one epoch (deterministic in seed
    and epoch). A step has `grad_accum × world_size` micro-batches."""
    micro_batches = packed_micro_batches(lengths, config, np.random.default_rng([config.seed, epoch]))
    per_step = config.grad_accum * world_size
    return [micro_batches[i:i + per_step] for i in range(0, len(micro_batches), per_step)]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    trained_tokens: int
    skipped: bool = False


@dataclass
class TrainResult:
    steps: int
    final_dir: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal ended the run early


class StopOnSignal:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) during training asks the loop to
    finish its step, save a checkpoint and return; the same signal again stops at once (the last
    complete checkpoint stays valid: they are written atomically). Under torchrun, Ctrl-C reaches
    each rank as SIGINT from the terminal and SIGTERM from torchrun: that is one request, not two."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signum:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def autocast(config: TrainConfig, device: torch.device) -> Any:
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_step(objective: Any, optimizer: Any, scheduler: Any, micro_batches: list[Batch], config: TrainConfig,
               cluster: Cluster = Cluster(), denominator: float | None = None) -> StepResult:
    """One optimizer step over this rank's micro-batches of it. The loss normaliser is the whole
    step's count, summed over micro-batches and ranks before any backward pass."""
    device = device_of(objective)
    if denominator is None:
        denominator = distributed.all_reduce_sum([sum(b.units for b in micro_batches)], cluster)[0]
    scale = distributed.gradient_scale(cluster)
    total_loss = 0.0
    for index, batch in enumerate(micro_batches):
        with distributed.gradient_sync(objective, enabled=index == len(micro_batches) - 1):
            with autocast(config, device):
                loss, _ = objective(batch.to(device), denominator)
            (loss * scale).backward()
        total_loss += float(loss.detach())
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = distributed.full_value(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    total_loss, tokens, trained = distributed.all_reduce_sum(
        [total_loss, sum(b.num_tokens for b in micro_batches), sum(b.num_trained_tokens for b in micro_batches)],
        cluster)
    tokens, trained = int(tokens), int(trained)
    if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        if config.on_nonfinite == "error":
            raise OnepassError(f"non-finite loss ({total_loss}) or gradient norm ({grad_norm}) at step "
                               f"{scheduler.last_epoch + 1}. Fix: lower lr, check the data, or set "
                               "on_nonfinite: skip_step.")
        scheduler.step()  # the step is spent, so the schedule stays aligned with the data
        return StepResult(total_loss, grad_norm, tokens, trained, skipped=True)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total_loss, grad_norm, tokens, trained)


@torch.no_grad()
def evaluate(objective: Any, examples: list[Example], config: TrainConfig, cluster: Cluster = Cluster()
             ) -> dict[str, float]:
    """Held-out response-only loss (mean NLL per trained token) and perplexity; each rank scores its
    share of the micro-batches."""
    if not examples:
        return {}
    was_training = objective.training
    objective.eval()
    device = device_of(objective)
    mine, padding = distributed.rank_share(packed_micro_batches([len(e) for e in examples], config), cluster)
    batches = [collate([examples[i] for i in micro], "token") for micro in mine]
    if padding:  # this rank's share is short: pass on the shortest example with zero weight
        batches += [padding_batch(min(examples, key=len))] * padding
    nll_sum, count = 0.0, 0
    for batch in batches:
        with autocast(config, device):
            _, batch_nll = objective(batch.to(device), 1.0)
        nll_sum += batch_nll
        count += batch.num_trained_tokens
    objective.train(was_training)
    nll_sum, count = distributed.all_reduce_sum([nll_sum, count], cluster)
    loss = nll_sum / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def build_optimizer(model: Any, config: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    from transformers import get_scheduler

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def build_model(config: TrainConfig, device: torch.device) -> Any:
    from onepass.model import load_model

    model = load_model(config.model, device.type).to(device)
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                          target_modules=config.lora.targets, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            raise OnepassError(f"lora.targets {config.lora.targets}: {error}") from None
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20 names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora.enabled:
            model.enable_input_require_grads()
    if config.compile:
        from onepass.model import backbone_and_head

        backbone_and_head(model)[0].compile()
    model.train()
    return model


class Trainer:
    """Holds a run's state; `fit()` trains to the end (or to `stop_at` steps) and exports. Under
    torchrun every rank builds a Trainer and calls `fit()`; files are written by rank 0."""

    def __init__(self, config: TrainConfig, model: Any = None, tokenizer: Any = None, train_data: PreparedData = None,
                 eval_examples: list[Example] | None = None):
        from onepass.chat_template import load_chat_template
        from onepass.model import check_model_dir, load_tokenizer

        self.config = config
        self.cluster = distributed.init()  # joins torchrun's process group if there is one (once)
        self.output_dir = Path(config.output_dir)
        self.device = self.cluster.device
        torch.manual_seed(config.seed)  # the same initial weights (e.g. LoRA adapters) on every rank
        if model is None:
            check_model_dir(config.model)  # a bad model dir fails now, not after data preparation
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.model)
        self.template = load_chat_template(self.tokenizer, config.data.chat_template)
        with distributed.main_first(self.cluster):  # rank 0 prepares and caches; the others load the cache
            self.train_data = train_data or self._prepare(config.data.train, "rejects.jsonl")
            eval_data = self._prepare(config.data.eval, "rejects.eval.jsonl") \
                if eval_examples is None and config.data.eval else None
        self.eval_examples = eval_examples if eval_examples is not None else (eval_data.examples if eval_data else [])
        self.lengths = [len(e) for e in self.train_data.examples]
        self.micro_batches_per_step = config.grad_accum * self.cluster.world_size
        self._check_data(eval_data)
        self.steps_per_epoch = len(plan_epoch(self.lengths, config, 0, self.cluster.world_size))
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.model = model if model is not None else build_model(config, self.device)
        self.objective = distributed.parallelize(SFTObjective(self.model, config.loss_chunk_size), self.cluster,
                                                 config.strategy)
        self.optimizer, self.scheduler = build_optimizer(distributed.unwrap(self.objective), config, self.total_steps)
        self.padding = padding_batch(min(self.train_data.examples, key=len))
        self.state = TrainerState(step=0, micro_batches_per_step=self.micro_batches_per_step)
        self._epoch_plan: tuple[int, list] = (-1, [])

    def _check_data(self, eval_data: PreparedData | None) -> None:
        """Say what became of every record, and stop before any training when the data cannot fill a step."""
        from onepass.dataset import nothing_left, summary_line

        config = self.config
        if self.cluster.is_main:
            print(summary_line("train data", self.train_data.stats), file=sys.stderr)
            if eval_data is not None:
                print(summary_line("eval data", eval_data.stats), file=sys.stderr)
            if self.train_data.rejects or (eval_data is not None and eval_data.rejects):
                print(f"skipped records and their reasons: {self.output_dir}/rejects*.jsonl", file=sys.stderr)
        if not self.train_data.examples:
            raise nothing_left("training", self.train_data.stats, config.max_seq_len)
        if eval_data is not None and not eval_data.examples:
            raise nothing_left("eval", eval_data.stats, config.max_seq_len)
        rows = len(pack(self.lengths, config.max_seq_len))
        rows_per_step = config.batch_size * self.micro_batches_per_step
        if rows < rows_per_step:
            raise OnepassError(
                f"one optimizer step takes batch_size × grad_accum × ranks = {config.batch_size} × "
                f"{config.grad_accum} × {self.cluster.world_size} = {rows_per_step} packed rows, but the training "
                f"data packs into only {rows} rows of max_seq_len={config.max_seq_len} tokens. Fix: lower "
                "batch_size or grad_accum, or add data.")

    def _prepare(self, paths: list[str], rejects_name: str) -> PreparedData:
        return prepare(paths, self.tokenizer, self.template, self.config.render_options(),
                       format_name=self.config.data.format, on_bad_record=self.config.data.on_bad_record,
                       num_workers=self.config.data.num_workers, cache_dir=self.config.data.cache_dir,
                       rejects_file=self.output_dir / rejects_name if self.cluster.is_main else None)

    def step_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step` (0-based), from the deterministic plan,
        padded so that every rank makes the same number of passes."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_plan[0] != epoch:
            self._epoch_plan = (epoch, plan_epoch(self.lengths, self.config, epoch, self.cluster.world_size))
        examples = self.train_data.examples
        mine, padding = distributed.rank_share(self._epoch_plan[1][index], self.cluster)
        return [collate([examples[i] for i in micro], self.config.loss_normalization) for micro in mine] + \
            [self.padding] * padding

    def resume(self) -> bool:
        if self.config.resume != "auto":
            return False
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            return False
        state = load_checkpoint(checkpoint, distributed.unwrap(self.objective), self.optimizer, self.scheduler,
                                self.cluster)
        if state.micro_batches_per_step not in (0, self.micro_batches_per_step) and self.cluster.is_main:
            print(f"warning: {checkpoint} was written with {state.micro_batches_per_step} micro-batches per step "
                  f"(grad_accum × ranks); this run has {self.micro_batches_per_step}, so the data order and batch "
                  "size differ from the run that wrote it. To continue it exactly, set grad_accum="
                  f"{state.micro_batches_per_step / self.cluster.world_size:g}.", file=sys.stderr)
        self.state = TrainerState(state.step, state.skipped_steps, self.micro_batches_per_step)
        return True

    def save(self) -> Path:
        existing = latest_checkpoint(self.output_dir)
        if existing == checkpoint_path(self.output_dir, self.state.step):
            return existing  # the same step is the same state: never replace a good checkpoint with itself
        return save_checkpoint(self.output_dir, distributed.unwrap(self.objective), self.optimizer, self.scheduler,
                               self.state, yaml.safe_dump(to_dict(self.config), sort_keys=False),
                               self.config.keep_last, self.cluster)

    def evaluate(self) -> dict[str, float]:
        return evaluate(distributed.unwrap(self.objective), self.eval_examples, self.config, self.cluster)

    def fit(self, stop_at: int | None = None) -> TrainResult:
        config, main = self.config, self.cluster.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
        resumed = self.resume()
        log = MetricsLog(self.output_dir, self.state.step if resumed else 0, config.tensorboard, enabled=main)
        eval_before = self.evaluate() if not resumed else None
        if eval_before:
            log.write({"step": 0, **eval_before})
        end = min(stop_at, self.total_steps) if stop_at is not None else self.total_steps
        with progress_bar(config.progress and main) as progress, StopOnSignal() as stop:
            task = progress.add_task("train", total=self.total_steps, completed=self.state.step, loss=float("nan"),
                                     tokens_per_sec=0.0, trained_tokens_per_sec=0.0)
            while self.state.step < end:
                self._one_step(log, progress, task)
                # every rank stops after the same step, even if the signal reached only some of them
                if distributed.all_reduce_sum([stop.received is not None], self.cluster)[0]:
                    break
            stopped_by = stop.received.name if stop.received is not None else (
                "a signal on another rank" if self.state.step < end else None)
            if self.state.step < self.total_steps:  # stopped early: leave a checkpoint to resume from
                self.save()
                log.close()
                return TrainResult(self.state.step, None, log.rows(), eval_before, stopped_by=stopped_by)
        eval_after = self.evaluate()
        if eval_after:
            log.write({"step": self.state.step, **eval_after})
        final_dir = self.export()
        if main:
            plot_loss(log.rows(), self.output_dir / "loss.png")
        log.close()
        return TrainResult(self.state.step, final_dir, log.rows(), eval_before, eval_after)

    def _one_step(self, log: MetricsLog, progress: Any, task: Any) -> None:
        config = self.config
        started = time.perf_counter()
        result = train_step(self.objective, self.optimizer, self.scheduler, self.step_batches(self.state.step),
                            config, self.cluster)
        seconds = time.perf_counter() - started
        self.state = TrainerState(self.state.step + 1, self.state.skipped_steps + result.skipped,
                                  self.micro_batches_per_step)
        row = {"step": self.state.step, "loss": result.loss, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": result.grad_norm, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
               "tokens_per_sec": result.tokens / seconds, "trained_tokens_per_sec": result.trained_tokens / seconds,
               "skipped_steps": self.state.skipped_steps}
        if config.eval_every and self.state.step % config.eval_every == 0 and self.state.step < self.total_steps:
            row.update(self.evaluate())
        if self.state.step % config.log_every == 0 or "eval_loss" in row:
            log.write(row)
        progress.update(task, completed=self.state.step, loss=result.loss, tokens_per_sec=row["tokens_per_sec"],
                        trained_tokens_per_sec=row["trained_tokens_per_sec"])
        if config.save_every and self.state.step % config.save_every == 0:
            self.save()

    def export(self) -> Path:
        """The final model as a Hugging Face directory (safetensors, tokenizer, chat template, config),
        written by rank 0. Collective under FSDP, which first gathers the full weights."""
        final = self.output_dir / "final"
        model = self._full_model()
        if self.cluster.is_main:
            if self.config.lora.enabled and self.config.lora.merge_on_export:
                model = model.merge_and_unload()
            model.save_pretrained(str(final))
            if hasattr(model, "config") and hasattr(model.config, "_attn_implementation"):
                _reset_attention_in_saved_config(final)
            self.tokenizer.chat_template = self.template.source
            self.tokenizer.save_pretrained(str(final))
            save_config(self.config, final / "onepass_config.yaml")
        distributed.barrier(self.cluster)
        return final

    def _full_model(self) -> Any:
        """The trained model, whole: as it is, or (under FSDP) rebuilt on rank 0's CPU from the gathered
        full state dict; None on the other ranks under FSDP."""
        if not (self.cluster.is_distributed and self.config.strategy == "fsdp"):
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.cluster.is_main:
            return None
        whole = build_model(dataclasses.replace(self.config, compile=False, gradient_checkpointing=False),
                            torch.device("cpu"))
        whole.load_state_dict(full)
        return whole


def _reset_attention_in_saved_config(final: Path) -> None:
    """Our packed attention is registered at run time; a saved model must load without onepass."""
    import json

    config_path = final / "config.json"
    if config_path.exists():
        values = json.loads(config_path.read_text())
        if values.get("_attn_implementation") or values.get("attn_implementation"):
            values.pop("_attn_implementation", None)
            values.pop("attn_implementation", None)
            config_path.write_text(json.dumps(values, indent=2))


def train(config: TrainConfig) -> TrainResult:
    return Trainer(config).fit()


def cmd_train(args: Any) -> int:
    from onepass.config import load_config

    cluster = distributed.init()  # under torchrun: join the process group first, so errors are reported once
    config = load_config(args.config, args.overrides)
    result = train(config)
    if result.stopped_by is not None:
        if cluster.is_main:
            print(f"stopped by {result.stopped_by} after step {result.steps}; checkpoint saved in "
                  f"{Path(config.output_dir) / 'checkpoints'}. Run the same command to resume.", file=sys.stderr)
        return 128 + (signal.SIGTERM if result.stopped_by == "SIGTERM" else signal.SIGINT)
    if cluster.is_main:
        print(f"trained {result.steps} steps; final model: {result.final_dir}; metrics: "
              f"{Path(config.output_dir) / 'metrics.jsonl'}; plot: {Path(config.output_dir) / 'loss.png'}")
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model: onepass train CONFIG.yaml [key=value ...]",
        epilog="Several GPUs: torchrun --nproc_per_node N -m onepass train CONFIG.yaml [strategy=ddp|fsdp]. "
               "SIGINT/SIGTERM save a checkpoint; the same command resumes.")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 data.loss_on=last")
    parser.set_defaults(handler=cmd_train)
