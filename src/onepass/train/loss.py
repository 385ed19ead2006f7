"""The SFT objective: weighted next-token negative log-likelihood on trained positions only.

Only the hidden states of positions with a label go through the output projection, chunk by
chunk, and each chunk is recomputed in the backward pass (activation checkpointing), so the
(tokens × vocabulary) logits tensor is never materialised and the loss's peak memory does not
grow with the number of prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onepass.train.batch import IGNORE_INDEX, Batch
from onepass.train.model import backbone_and_head


def hidden_states(model: Any, batch: Batch) -> torch.Tensor:
    """Last hidden states (1, T, d) of the packed batch."""
    trunk, _ = backbone_and_head(model)
    return trunk(**batch.model_kwargs(), use_cache=False).last_hidden_state


@dataclass(frozen=True)
class OutputTransform:
    """What a model's own CausalLM.forward does to the output layer's logits, which onepass applies
    too (it calls the output layer directly): Cohere's `logit_scale`, Granite's `logits_scaling`,
    Gemma-2/3's final soft-capping."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: Any) -> OutputTransform:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        config, scale = model.config, 1.0
        if getattr(model, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
            scale *= float(model.logit_scale)
        if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
            scale /= float(config.logits_scaling)
        return cls(scale, getattr(config, "final_logit_softcapping", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if logits.dtype in (torch.bfloat16, torch.float16):  # the softmax always runs in at least fp32
            logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: Any, transform: OutputTransform) -> torch.Tensor:
    return F.cross_entropy(transform(head(hidden)), targets, reduction="none")


def label_nll(model: Any, batch: Batch, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label NLL (in label order) and the flat positions they belong to."""
    hidden = hidden_states(model, batch)[0]
    positions = (batch.labels[0] != IGNORE_INDEX).nonzero().squeeze(1)
    return nll_at(model, hidden, positions, batch.labels[0, positions], chunk_size), positions


def nll_at(model: Any, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
           chunk_size: int = 1024) -> torch.Tensor:
    """-log Pr(targets[i] | the hidden state at positions[i]): only those rows go through the output
    layer, `chunk_size` at a time (recomputed in the backward pass), so the (tokens × vocabulary)
    logits are never materialised. Positions may repeat (a tree node with several children)."""
    _, head = backbone_and_head(model)
    transform = OutputTransform.of(model)
    selected = hidden[positions]
    pieces = []
    for start in range(0, len(positions), chunk_size):
        args = (selected[start:start + chunk_size], targets[start:start + chunk_size], head, transform)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_nll, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(*args))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sft_loss(model: Any, batch: Batch, denominator: float, chunk_size: int = 1024
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step loss: sum(weight · nll) / denominator, where the
    denominator is the step's total units (trained tokens, sequences or turns, over every
    micro-batch and rank), so summing gradients over micro-batches is exact.

    Returns the loss to backpropagate and the unweighted NLL sum of the trained labels (for logging; a
    tensor, so a caller can sum micro-batches on the device and synchronise once)."""
    nll, positions = label_nll(model, batch, chunk_size)
    weights = batch.label_weights[0, positions]
    weighted = (nll * weights).sum()
    if positions.numel() == 0 and torch.is_grad_enabled():
        # No trained label here, so the output layer took no part; a zero term keeps it in the graph,
        # because DDP expects a gradient (here exactly zero) for every parameter on every rank.
        _, head = backbone_and_head(model)
        weighted = weighted + sum(p.sum() for p in head.parameters() if p.requires_grad) * 0.0
    if denominator <= 0:  # a step with no trained token: nothing to learn, and no division by zero
        return weighted * 0.0, weighted.new_zeros(())
    return weighted / denominator, nll.detach()[weights > 0].sum()  # a padding batch logs nothing


class SFTObjective(torch.nn.Module):
    """The model with the SFT loss as its forward, so DDP and FSDP2 wrap one module whose forward
    does all the work: their hooks (gradient all-reduce, parameter gathering) run around it."""

    def __init__(self, model: Any, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: Batch, denominator: float) -> tuple[torch.Tensor, torch.Tensor]:
        return sft_loss(self.model, batch, denominator, self.chunk_size)
