"""Packed rows → one padding-free `Batch`: every row of a micro-batch is laid end to end in a
single sequence, with position ids restarting per conversation and `cu_seq_lens` marking where
each conversation starts (the varlen attention convention).

Labels are shifted here and nowhere else (`shift_labels`). Each trained label also carries a
weight for the chosen loss normalisation; the step's denominator (`units`) is counted here too,
so the trainer can sum it over micro-batches (and ranks) before any backward pass.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from onepass.data.tree import depths, trained_children
from onepass.data.types import Example
from onepass.train.attention import LAYOUT_KWARG, AttentionLayout, TreeBlocks

IGNORE_INDEX = -100
Normalization = Literal["token", "sequence", "turn"]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (1, T) int64
    position_ids: torch.Tensor  # (1, T): restarting at 0 for each conversation (a tree node's: its depth)
    labels: torch.Tensor  # (1, T): the next token where it is trained, else IGNORE_INDEX
    label_weights: torch.Tensor  # (1, T) float32: weight of each label's loss term (0 where ignored)
    cu_seq_lens: torch.Tensor  # (num_sequences + 1,) int32
    max_length: int
    units: float  # normaliser contribution: trained tokens, sequences or turns in this batch
    num_tokens: int
    num_trained_tokens: int
    layout: AttentionLayout | None = None  # how the packed attention runs (None: built from cu_seq_lens)
    # The positions that have a label, and their labels and weights, found on the host when the batch is
    # made: the loss gathers with them, so no step waits for the device to find them (`nonzero`)
    positions: torch.Tensor | None = None  # (n,) int64
    targets: torch.Tensor | None = None  # (n,) int64: labels[0, positions]
    weights: torch.Tensor | None = None  # (n,) float32: label_weights[0, positions]

    def to(self, device: torch.device | str, layout: bool = True) -> "Batch":
        """On `device`; without the `layout` where the attention does not read it (flash-attention varlen
        takes `cu_seq_lens`), so it is not copied."""
        device = torch.device(device)

        def move(tensor: torch.Tensor) -> torch.Tensor:  # from pinned memory, a copy the host need not wait for
            if device.type == "cuda" and tensor.device.type == "cpu":
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=True)

        moved = self.layout.to(device) if self.layout is not None and layout else None
        return Batch(move(self.input_ids), move(self.position_ids), move(self.labels), move(self.label_weights),
                     move(self.cu_seq_lens), self.max_length, self.units, self.num_tokens, self.num_trained_tokens,
                     moved, *(None if t is None else move(t) for t in (self.positions, self.targets, self.weights)))

    def model_kwargs(self) -> dict:
        """What the model's forward needs for packed attention (transformers' varlen kwargs, and onepass's
        layout, which flash-attention ignores)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_length, "max_length_k": self.max_length, LAYOUT_KWARG: self.layout}




def shift_labels(input_ids: np.ndarray, loss_mask: np.ndarray, parent: np.ndarray | None = None) -> np.ndarray:
    """labels[p] = input_ids[c] where token c is trained and p is the token before it (c - 1 in a
    sequence, its parent in a tree); every other position predicts nothing."""
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    child = trained_children(loss_mask, _parents(len(input_ids), parent))
    predicts = child >= 0
    labels[predicts] = input_ids[child[predicts]]
    return labels


def _parents(length: int, parent: np.ndarray | None) -> np.ndarray:
    return parent if parent is not None else np.arange(length, dtype=np.int32) - 1


def label_weights(example: Example, normalization: Normalization) -> tuple[np.ndarray, float]:
    """Per-position loss weights (aligned with `shift_labels`) and the units this example adds to the step."""
    child = trained_children(example.loss_mask, example.parents)
    trained = child >= 0
    weights = trained.astype(np.float64)
    count = int(trained.sum())
    if count == 0 or normalization == "token":
        return weights.astype(np.float32), float(count)
    if normalization == "sequence":  # each conversation weighs the same, whatever its length
        return (weights / count).astype(np.float32), 1.0
    turns = np.where(trained, example.turn[np.maximum(child, 0)], -2)
    turn_ids, counts = np.unique(turns[trained], return_counts=True)
    for turn_id, turn_count in zip(turn_ids, counts):  # each response weighs the same
        weights[trained & (turns == turn_id)] = 1.0 / turn_count
    return weights.astype(np.float32), float(len(turn_ids))


def collate(examples: Sequence[Example], normalization: Normalization = "token") -> Batch:
    """Lay the examples of one micro-batch end to end, with no padding."""
    input_ids = np.concatenate([e.input_ids for e in examples]).astype(np.int64)
    position_ids = np.concatenate([depths(e.parent) if e.is_tree else np.arange(len(e)) for e in examples])
    labels = np.concatenate([shift_labels(e.input_ids, e.loss_mask, e.parent) for e in examples])
    weights_and_units = [label_weights(e, normalization) for e in examples]
    weights = np.concatenate([w for w, _ in weights_and_units])
    lengths = [len(e) for e in examples]
    cu_seq_lens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    trees = tuple(TreeBlocks.of(e.parent) if e.is_tree else None for e in examples)
    positions = np.flatnonzero(labels != IGNORE_INDEX)
    return Batch(
        input_ids=torch.from_numpy(input_ids)[None],
        position_ids=torch.from_numpy(position_ids)[None],
        labels=torch.from_numpy(labels)[None],
        label_weights=torch.from_numpy(weights)[None],
        cu_seq_lens=torch.from_numpy(cu_seq_lens),
        max_length=max(lengths),
        units=sum(u for _, u in weights_and_units),
        num_tokens=int(len(input_ids)),
        num_trained_tokens=len(positions),
        layout=AttentionLayout.of(lengths, trees),
        positions=torch.from_numpy(positions),
        targets=torch.from_numpy(labels[positions]),
        weights=torch.from_numpy(weights[positions]),
    )


def padding_batch(example: Example) -> Batch:
    """A micro-batch that trains nothing (every loss weight zero, no units, no tokens counted).
    A rank whose share of a step is short runs it, so every rank makes the same number of passes."""
    batch = collate([example])
    return dataclasses.replace(batch, label_weights=torch.zeros_like(batch.label_weights), units=0.0, num_tokens=0,
                               num_trained_tokens=0, weights=torch.zeros_like(batch.weights))
