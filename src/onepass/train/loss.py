"""The SFT objective: weighted next-token negative log-likelihood on trained positions only.

Only the hidden states of positions with a label go through the output projection, chunk by
chunk, so the (tokens × vocabulary) logits tensor is never materialised and the loss's peak memory
does not grow with the number of prompt tokens. The stock path recomputes each chunk in the backward
pass (activation checkpointing): the stock `HeadLoss`. The fused loss (onepass.accel,
accel/fused_loss.py) is another head-loss strategy, which makes the gradients in the forward pass; the
objective and scoring take whichever they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onepass.compat import load_balancing_loss_function
from onepass.train.batch import IGNORE_INDEX, Batch
from onepass.errors import OnepassError
from onepass.train.forward import hidden_states, trunk_outputs
from onepass.train.model import backbone_and_head, base_model


@dataclass(frozen=True)
class RouterLoss:
    """The router's load-balancing loss of a mixture-of-experts model, added as the model's own forward
    adds it where its config turns router logits on (`output_router_logits`): `router_aux_loss_coef`
    times its modeling file's `load_balancing_loss_func` over every MoE layer's router logits. Over a
    packed row it is the model's value for one unpadded row of those tokens."""

    coefficient: float
    function: Any
    num_experts: int
    top_k: int

    @classmethod
    def of(cls, model: Any) -> RouterLoss | None:
        base = base_model(model)
        if not getattr(base.config, "output_router_logits", False):
            return None
        function = load_balancing_loss_function(base)
        values = [getattr(base, name, None) for name in ("router_aux_loss_coef", "num_experts", "num_experts_per_tok")]
        if function is None or any(value is None for value in values):
            raise OnepassError(f"{type(base).__name__}: its config sets output_router_logits, but onepass cannot "
                               "find how its forward adds the router's auxiliary loss. Fix: set "
                               "output_router_logits: false in the model's config.json, or report it.")
        coefficient, num_experts, top_k = values
        return cls(float(coefficient), function, int(num_experts), int(top_k))

    def __call__(self, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.coefficient * self.function(router_logits, self.num_experts, self.top_k, None).float()


@dataclass(frozen=True)
class OutputTransform:
    """What a model's own CausalLM.forward does to the output layer's logits, which onepass applies
    too (it calls the output layer directly): Cohere's `logit_scale`, Granite's `logits_scaling`,
    Falcon-H1's `lm_head_multiplier`, a muP width multiplier on the last hidden states, and the final
    soft-cap (Gemma-2/3/4, also where it lives in a multimodal model's `text_config`, RecurrentGemma,
    xLSTM). The start-up check (train.check) proves this list right on each model, or refuses it."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: Any) -> OutputTransform:
        model = base_model(model)
        config, scale = model.config, 1.0
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        setting = lambda name: getattr(config, name, None) or getattr(text, name, None)  # noqa: E731
        if getattr(model, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
            scale *= float(model.logit_scale)
        if setting("logits_scaling"):  # Granite: logits / logits_scaling
            scale /= float(setting("logits_scaling"))
        if setting("lm_head_multiplier"):  # Falcon-H1: logits * lm_head_multiplier
            scale *= float(setting("lm_head_multiplier"))
        if setting("logits_mup_width_multiplier"):  # Inkling: hidden states / multiplier, before the head
            scale /= float(setting("logits_mup_width_multiplier"))
        softcap = setting("final_logit_softcapping") or setting("logits_soft_cap") or setting("output_logit_soft_cap")
        return cls(scale, softcap)

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


class HeadLoss:
    """How the trained rows' hidden states become their NLL: the stock way, the output layer and
    cross-entropy over chunks of `chunk_size` rows, each recomputed in the backward pass, so the
    (rows × vocabulary) logits are never all alive. Accelerations give faster strategies (fused-loss)."""

    name = "stock"

    def nll(self, rows: torch.Tensor, targets: torch.Tensor, head: Any, transform: OutputTransform,
            chunk_size: int) -> torch.Tensor:
        """-log Pr(targets[i] | rows[i]) per row (fp32 at least)."""
        pieces = []
        for start in range(0, len(targets), chunk_size):
            args = (rows[start:start + chunk_size], targets[start:start + chunk_size], head, transform)
            if torch.is_grad_enabled():
                pieces.append(checkpoint(_chunk_nll, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_nll(*args))
        return torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)

    def weighted(self, rows: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, head: Any,
                 transform: OutputTransform, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ weights · nll (to backpropagate), and the per-row nll."""
        nll = self.nll(rows, targets, head, transform, chunk_size)
        return (nll * weights).sum(), nll


STOCK_HEAD_LOSS = HeadLoss()


def trained_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions of the packed row that have a label, their labels and their loss weights (found
    when the batch was made; a batch built by hand finds them here)."""
    if batch.positions is not None:
        return batch.positions, batch.targets, batch.weights
    positions = (batch.labels[0] != IGNORE_INDEX).nonzero().squeeze(1)
    return positions, batch.labels[0, positions], batch.label_weights[0, positions]


def label_nll(model: Any, batch: Batch, chunk_size: int = 1024, head_loss: HeadLoss = STOCK_HEAD_LOSS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label NLL (in label order) and the flat positions they belong to."""
    hidden = hidden_states(model, batch)[0]
    positions, targets, _ = trained_positions(batch)
    return nll_at(model, hidden, positions, targets, chunk_size, head_loss), positions


def nll_at(model: Any, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
           chunk_size: int = 1024, head_loss: HeadLoss = STOCK_HEAD_LOSS) -> torch.Tensor:
    """-log Pr(targets[i] | the hidden state at positions[i]): only those rows go through the output
    layer (`head_loss`: in chunks, recomputed in the backward pass), so the (tokens × vocabulary) logits
    are never materialised. Positions may repeat (a tree node with several children)."""
    _, head = backbone_and_head(model)
    return head_loss.nll(hidden[positions], targets, head, OutputTransform.of(model), chunk_size)


def sft_loss(model: Any, batch: Batch, denominator: float, chunk_size: int = 1024,
             head_loss: HeadLoss = STOCK_HEAD_LOSS) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step loss: sum(weight · nll) / denominator, where the
    denominator is the step's total units (trained tokens, sequences or turns, over every
    micro-batch and rank), so summing gradients over micro-batches is exact.

    Returns the loss to backpropagate and the unweighted NLL sum of the trained labels (for logging; a
    tensor, so a caller can sum micro-batches on the device and synchronise once)."""
    return loss_of_hidden(model, batch, hidden_states(model, batch)[0], denominator, chunk_size, head_loss)


def loss_of_hidden(model: Any, batch: Batch, hidden: torch.Tensor, denominator: float, chunk_size: int = 1024,
                   head_loss: HeadLoss = STOCK_HEAD_LOSS) -> tuple[torch.Tensor, torch.Tensor]:
    """`sft_loss` from the trunk's last hidden states (T, d)."""
    positions, targets, weights = trained_positions(batch)
    _, head = backbone_and_head(model)
    weighted, nll = head_loss.weighted(hidden[positions], targets, weights, head, OutputTransform.of(model),
                                       chunk_size)
    if positions.numel() == 0 and torch.is_grad_enabled():
        # No trained label here, so the output layer took no part; a zero term keeps it in the graph,
        # because DDP expects a gradient (here exactly zero) for every parameter on every rank.
        weighted = weighted + sum(p.sum() for p in head.parameters() if p.requires_grad) * 0.0
    if denominator <= 0:  # a step with no trained token: nothing to learn, and no division by zero
        return weighted * 0.0, weighted.new_zeros(())
    return weighted / denominator, torch.where(weights > 0, nll.detach(), 0.0).sum()  # a padding batch logs nothing


class SFTObjective(torch.nn.Module):
    """The model with the SFT loss as its forward, so DDP and FSDP2 wrap one module whose forward
    does all the work: their hooks (gradient all-reduce, parameter gathering) run around it. The output
    layer's loss is `head_loss`'s (the stock one, or an acceleration's). A mixture-of-experts model
    whose config turns router logits on adds its router's auxiliary loss (`RouterLoss`)."""

    def __init__(self, model: Any, chunk_size: int = 1024, head_loss: HeadLoss = STOCK_HEAD_LOSS):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.head_loss = head_loss
        self.router = RouterLoss.of(model)

    def forward(self, batch: Batch, denominator: float, router_share: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss to backpropagate, the trained labels' NLL sum, and the router's auxiliary loss of
        this micro-batch (zero without one), which enters the loss times `router_share`: its share of
        the step (1 / the step's micro-batches over every rank, 0 for a padding pass), so that a step's
        router term is the mean of its micro-batches' (the load-balancing loss is not a sum over tokens, so
        this is what Hugging Face's Trainer does under accumulation, not one big batch's value)."""
        hidden, router_logits = trunk_outputs(self.model, batch, self.router is not None)
        loss, nll = loss_of_hidden(self.model, batch, hidden[0], denominator, self.chunk_size, self.head_loss)
        if self.router is None:
            return loss, nll, loss.new_zeros(())
        router_loss = self.router(router_logits)
        return loss + router_share * router_loss, nll, router_loss.detach()
