"""The model call: the trunk's last hidden states of a packed batch, in the packing the model runs.

Packed (`model.PACKED`): one forward over the row; the attention keeps its conversations apart. One
conversation per forward (`model.SEPARATE`, where the start-up check found packed rows inexact): the
row's conversations regrouped by length, each group one forward of stacked rows (none padded), the
outputs laid back end to end. The loss (loss.py) and scoring take the hidden states from here and know
nothing of packing.
"""

from __future__ import annotations

from typing import Any

import torch

from onepass.errors import OnepassError
from onepass.train.batch import Batch
from onepass.train.model import backbone_and_head
from onepass.train.attention import SEPARATE, half_precision_for_flash, packing_of, refuse_trees


def hidden_states(model: Any, batch: Batch) -> torch.Tensor:
    """Last hidden states (1, T, d) of the packed batch (see `trunk_outputs`)."""
    return trunk_outputs(model, batch)[0]


def trunk_outputs(model: Any, batch: Batch, router_logits: bool = False
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Last hidden states (1, T, d) of the packed batch, and with `router_logits` each MoE layer's
    router logits (tokens × experts): one forward over the packed row, or, for a model that computes
    each conversation alone (`model.SEPARATE`), one forward per length of conversation, its
    conversations stacked as rows (none padded), laid back end to end."""
    trunk, _ = backbone_and_head(model)
    extra = {"output_router_logits": True} if router_logits else {}
    if packing_of(model) != SEPARATE:
        with half_precision_for_flash(model):
            output = trunk(**batch.model_kwargs(), use_cache=False, **extra)
        return output.last_hidden_state, _router_logits(output, router_logits)
    if batch.layout is not None and batch.layout.trees:
        refuse_trees(model)
    row = batch.input_ids[0]
    by_length: dict[int, list[int]] = {}
    for start, length in zip(batch.cu_seq_lens[:-1].tolist(), batch.cu_seq_lens.diff().tolist()):
        by_length.setdefault(length, []).append(start)
    pieces, order, routers = [], [], []
    for length, group in by_length.items():
        index = (torch.tensor(group, device=row.device)[:, None] + torch.arange(length, device=row.device)).flatten()
        output = trunk(input_ids=row[index].view(len(group), length), use_cache=False, **extra)
        pieces.append(output.last_hidden_state.flatten(0, 1))
        order.append(index)
        routers.append(_router_logits(output, router_logits))
    where = torch.empty_like(row)
    where[torch.cat(order)] = torch.arange(len(row), device=row.device)
    hidden = torch.cat(pieces).index_select(0, where)[None]
    if not router_logits:
        return hidden, None
    return hidden, tuple(torch.cat([group[layer] for group in routers]) for layer in range(len(routers[0])))


def _router_logits(output: Any, wanted: bool) -> tuple[torch.Tensor, ...] | None:
    if not wanted:
        return None
    logits = getattr(output, "router_logits", None)
    if not logits:
        raise OnepassError(f"{type(output).__name__} carries no router logits although the model's config sets "
                           "output_router_logits. Fix: report it; set output_router_logits: false in the model's "
                           "config.json to train without the router's auxiliary loss.")
    return tuple(layer.reshape(-1, layer.shape[-1]) for layer in logits)
