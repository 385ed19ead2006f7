"""Held-out evaluation: response-only loss and perplexity, every `eval_every` steps and at both ends."""

from __future__ import annotations

import logging
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onepass.data.types import Example, lengths_of
from onepass.train import distributed
from onepass.train.batch import collate, padding_batch
from onepass.train.checkpoint import TrainerState
from onepass.train.distributed import Cluster
from onepass.train.model import device_of, evaluating
from onepass.train.attention import reads_layout
from onepass.train.plan import packed_micro_batches
from onepass.train.device import Precision, autocast

log = logging.getLogger(__name__)


def evaluate(objective: Any, examples: list[Example], max_seq_len: int, batch_size: int,
             precision: Precision = "fp32", cluster: Cluster = Cluster()) -> dict[str, float]:
    """Held-out response-only loss (mean NLL per trained token) and perplexity; each rank scores its
    share of the micro-batches."""
    if not examples:
        return {}
    lengths = lengths_of(examples).tolist()
    micro_batches = packed_micro_batches(lengths, max_seq_len, batch_size)
    mine, padding = distributed.rank_share(micro_batches, cluster)
    batches = [collate([examples[i] for i in micro], "token") for micro in mine]
    if padding:  # this rank's share is short: pass on the shortest example with zero weight
        batches += [padding_batch(examples[lengths.index(min(lengths))])] * padding
    with evaluating(objective):
        device, layout = device_of(objective), reads_layout(objective)
        nll_sum, count = torch.zeros((), device=device), 0
        for batch in batches:
            with autocast(precision, device):
                _, batch_nll, _ = objective(batch.to(device, layout), 1.0)
            nll_sum += batch_nll.float()
            count += batch.num_trained_tokens
    nll_sum, count = distributed.all_reduce_sum([float(nll_sum), count], cluster)  # one device sync
    loss = nll_sum / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


class Evaluator:
    """Evaluates the held-out examples when it is time to: before training, every `eval_every` steps,
    and at the end. Without held-out examples it never does."""

    def __init__(self, examples: list[Example], max_seq_len: int, batch_size: int, eval_every: int,
                 precision: Precision = "fp32", cluster: Cluster = Cluster()):
        self.examples, self.eval_every = examples, eval_every
        self.max_seq_len, self.batch_size, self.precision, self.cluster = max_seq_len, batch_size, precision, cluster

    def should_evaluate(self, step: int, total_steps: int) -> bool:
        """During training: every `eval_every` steps, but not at the last step (the final evaluation is)."""
        return bool(self.examples) and bool(self.eval_every) and step % self.eval_every == 0 and step < total_steps

    def evaluate(self, objective: Any) -> dict[str, float]:
        return evaluate(distributed.unwrap(objective), self.examples, self.max_seq_len, self.batch_size,
                        self.precision, self.cluster)


@dataclass(frozen=True)
class EarlyStopping:
    """Tracks the best held-out loss (in the run's TrainerState, so a resumed run continues exactly) and
    says when `patience` evaluations in a row have not improved it by more than `min_delta`. Every
    rank sees the same all-reduced loss, so every rank stops after the same step."""

    patience: int = 0  # 0: never stop early
    min_delta: float = 0.0

    def update(self, state: TrainerState, loss: float) -> tuple[TrainerState, bool]:
        """The state after an evaluation during training, and whether it is a new best."""
        if state.best_eval_loss is None or loss < state.best_eval_loss - self.min_delta:
            return dataclasses.replace(state, best_eval_loss=loss, best_step=state.step,
                                       evaluations_since_best=0), True
        return dataclasses.replace(state, evaluations_since_best=state.evaluations_since_best + 1), False

    def should_stop(self, state: TrainerState) -> bool:
        return self.patience > 0 and state.evaluations_since_best >= self.patience


class SampleReplies:
    """At each evaluation, the model's greedy replies to the first held-out prompts (each conversation up
    to its last assistant turn), appended to OUTPUT_DIR/samples.jsonl with the step and printed, so a
    person sees behaviour change, not only loss. Written by rank 0 (with its full copy of the model)."""

    def __init__(self, conversations: list[Any], output_dir: Path, max_new_tokens: int = 64,
                 enabled: bool = True, options: Any = None, own_attention: str | None = None):
        self.prompts = [(dataclasses.replace(c, messages=c.messages[:c.assistant_indices[-1]]),
                         c.messages[c.assistant_indices[-1]].content)
                        for c in conversations if getattr(c, "assistant_indices", None)]
        self.path, self.max_new_tokens, self.enabled = output_dir / "samples.jsonl", max_new_tokens, enabled
        self.options = options  # the run's RenderOptions (drop_tools, ...): prompts render as training did
        self.own_attention = own_attention  # the attention the model came with: replies generate with it

    def write(self, step: int, model: Any, tokenizer: Any, template: Any) -> list[dict[str, Any]]:
        from onepass.data.render import as_the_template_sees_it
        from onepass.data.types import RenderOptions
        from onepass.score.chat import reply

        if not (self.enabled and self.prompts):
            return []
        rows = []
        for conversation, reference in self.prompts:  # each with its own tools and template kwargs
            own_template, prompt, _ = as_the_template_sees_it(conversation, template, self.options or RenderOptions())
            rows.append({"step": step, "prompt": prompt[-1]["content"], "reply": reply(
                model, tokenizer, own_template, prompt, max_new_tokens=self.max_new_tokens, own=self.own_attention),
                "reference": reference})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        for row in rows:
            log.info(f"sample at step {step}: {row['prompt'][:60]!r} → {row['reply'][:100]!r}")
        return rows
