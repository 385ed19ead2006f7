"""One optimizer step: forward and backward over its micro-batches, clip, update (or skip a non-finite step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from onepass.errors import OnepassError
from onepass.train import distributed
from onepass.train.batch import Batch
from onepass.train.device import Precision, autocast
from onepass.train.distributed import Cluster
from onepass.train.model import device_of
from onepass.train.attention import reads_layout

OnNonfinite = Literal["error", "skip_step"]


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    trained_tokens: int
    skipped: bool = False
    router_loss: float | None = None  # the MoE router's auxiliary loss, mean over the step's micro-batches


@dataclass(frozen=True)
class StepOptions:
    precision: Precision = "fp32"
    max_grad_norm: float = 0.0  # 0: no clipping
    on_nonfinite: OnNonfinite = "error"


def train_step(objective: Any, optimizer: Any, scheduler: Any, micro_batches: list[Batch],
               options: StepOptions = StepOptions(), cluster: Cluster = Cluster(),
               denominator: float | None = None) -> StepResult:
    """One optimizer step over this rank's micro-batches of it. The loss normaliser is the whole
    step's count, summed over micro-batches and ranks before any backward pass."""
    real = sum(b.num_tokens > 0 for b in micro_batches)  # a padding pass has no tokens and no share
    units, real = distributed.all_reduce_sum([sum(b.units for b in micro_batches), real], cluster)
    denominator = units if denominator is None else denominator
    total_loss, router_loss = _accumulate_gradients(objective, micro_batches, denominator, 1.0 / max(real, 1.0),
                                                    options.precision, cluster)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = options.max_grad_norm if options.max_grad_norm > 0 else float("inf")
    grad_norm = distributed.full_value(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    total_loss, tokens, trained, router_loss = distributed.all_reduce_sum(
        [total_loss, sum(b.num_tokens for b in micro_batches), sum(b.num_trained_tokens for b in micro_batches),
         router_loss], cluster)
    router = router_loss if getattr(distributed.unwrap(objective), "router", None) is not None else None
    tokens, trained = int(tokens), int(trained)
    if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        if options.on_nonfinite == "error":
            raise OnepassError(f"non-finite loss ({total_loss}) or gradient norm ({grad_norm}) at step "
                               f"{scheduler.last_epoch + 1}. Fix: lower lr, check the data, or set "
                               "on_nonfinite: skip_step.")
        scheduler.step()  # the step is spent, so the schedule stays aligned with the data
        return StepResult(total_loss, grad_norm, tokens, trained, skipped=True, router_loss=router)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total_loss, grad_norm, tokens, trained, router_loss=router)


def _accumulate_gradients(objective: Any, micro_batches: list[Batch], denominator: float, router_share: float,
                          precision: Precision, cluster: Cluster) -> tuple[float, float]:
    """Forward and backward over the micro-batches, syncing gradients across ranks only on the last.
    Returns this rank's part of the step's loss and of its router loss (each a sum over its micro-batches)."""
    device = device_of(objective)
    layout = reads_layout(objective)
    scale = distributed.gradient_scale(cluster)
    total_loss = torch.zeros((), device=device)
    total_router = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        share = router_share if batch.num_tokens > 0 else 0.0
        with distributed.gradient_sync(objective, enabled=index == len(micro_batches) - 1):
            with autocast(precision, device):
                loss, _, router_loss = objective(batch.to(device, layout), denominator, share)
            (loss * scale).backward()
        total_loss += (loss.detach() - share * router_loss).float()
        total_router += share * router_loss.float()
    loss, router = torch.stack([total_loss, total_router]).tolist()  # one device sync per step
    return loss, router
