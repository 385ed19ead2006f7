"""The data order of a run: examples → packed rows → micro-batches → optimizer steps.

The order is a pure function of (seed, epoch): each epoch shuffles the examples, packs them into
rows of at most `max_seq_len` tokens (best-fit decreasing), shuffles the rows and cuts them into
micro-batches of `batch_size` rows and steps of `grad_accum × ranks` micro-batches. So resuming at
step N only needs N, every run with the same seed sees the same data, and under torchrun each rank
takes its share of each step: N ranks make the same updates as one process with the same global batch.

A row is just a list of example indices: the conversations in it stay whole, keep their own
position ids and never attend to each other (see `batch.collate` and `attention.packed_sdpa_attention`).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np

from onepass.data.types import Example, lengths_of
from onepass.errors import OnepassError
from onepass.train.batch import Batch, Normalization, collate, padding_batch
from onepass.train.distributed import Cluster, rank_share
from onepass.train.mixture import Mixture


def pack(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: each example goes to the fullest row it still fits in (of those
    equally full, the first opened).

    Ties keep the input order, so a shuffled input gives a shuffled, reproducible packing. The rows with
    room are kept by their free space (a sorted list of the distinct free spaces, at most `max_seq_len`
    of them, and a heap of row numbers for each), so placing an example costs a bisect and a heap
    operation, not a search through every open row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_seq_len:
        index = int(np.argmax(lengths))
        raise ValueError(f"example {index} has {int(lengths[index])} tokens > max_seq_len {max_seq_len}")  # our bug
    order = np.argsort(-lengths, kind="stable").tolist()  # stable: ties keep input order
    sizes = lengths.tolist()
    rows: list[list[int]] = []
    spaces: list[int] = []  # distinct free spaces of rows with room, sorted
    rows_with: dict[int, list[int]] = {}  # free space -> heap of row numbers
    for index in order:
        length = sizes[index]
        slot = bisect.bisect_left(spaces, length)
        if slot < len(spaces):
            space = spaces[slot]
            waiting = rows_with[space]
            row = heapq.heappop(waiting)
            if not waiting:
                del spaces[slot], rows_with[space]
        else:
            space, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        left = space - length
        if left > 0:
            if left not in rows_with:
                rows_with[left] = []
                bisect.insort(spaces, left)
            heapq.heappush(rows_with[left], row)
    return rows


def packed_micro_batches(lengths: Sequence[int], max_seq_len: int, batch_size: int,
                         rng: np.random.Generator | None = None) -> list[list[int]]:
    """Example indices per micro-batch: packed rows (shuffled first when `rng` is given), `batch_size` rows each."""
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    rows = [[int(order[i]) for i in row] for row in pack([lengths[i] for i in order], max_seq_len)]
    if rng is not None:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return [sum(rows[i:i + batch_size], []) for i in range(0, len(rows), batch_size)]


def plan_epoch(lengths: Sequence[int], max_seq_len: int, batch_size: int, micro_batches_per_step: int, seed: int,
               epoch: int) -> list[list[list[int]]]:
    """Steps → micro-batches (of all ranks) → example indices, for one epoch (deterministic in seed and epoch)."""
    micro_batches = packed_micro_batches(lengths, max_seq_len, batch_size, np.random.default_rng([seed, epoch]))
    per_step = micro_batches_per_step
    return [micro_batches[i:i + per_step] for i in range(0, len(micro_batches), per_step)]


class StepPlan:
    """The micro-batches of every optimizer step of a run, for this rank. With a weighted `mixture`,
    each epoch trains on the examples it draws (so epochs may differ in steps by a row or two)."""

    def __init__(self, examples: list[Example], max_seq_len: int, batch_size: int, grad_accum: int, seed: int,
                 normalization: Normalization, cluster: Cluster = Cluster(), mixture: Mixture | None = None):
        self.examples = examples
        self.lengths = lengths_of(examples).tolist()
        self.max_seq_len, self.batch_size, self.seed = max_seq_len, batch_size, seed
        self.normalization = normalization
        self.cluster = cluster
        self.mixture = mixture
        self.micro_batches_per_step = grad_accum * cluster.world_size
        self.rows = len(pack([self.lengths[i] for i in self.chosen(0)], max_seq_len))
        self._check_fills_a_step(grad_accum)
        self._epoch_steps: list[int] = []  # steps of epochs 0, 1, ... (worked out as needed)
        self.steps_per_epoch = self.epoch_steps(0)
        self.padding = padding_batch(examples[int(np.argmin(self.lengths))])
        self._cached: tuple[int, list] = (-1, [])

    def _check_fills_a_step(self, grad_accum: int) -> None:
        rows_per_step = self.batch_size * self.micro_batches_per_step
        if self.rows < rows_per_step:
            raise OnepassError(
                f"one optimizer step takes batch_size × grad_accum × ranks = {self.batch_size} × "
                f"{grad_accum} × {self.cluster.world_size} = {rows_per_step} packed rows, but the training "
                f"data packs into only {self.rows} rows of max_seq_len={self.max_seq_len} tokens. Fix: lower "
                "batch_size or grad_accum, or add data.")

    def chosen(self, epoch: int) -> np.ndarray:
        """The example indices epoch `epoch` trains on (each once, unless the mixture weighs them)."""
        if self.mixture is None:
            return np.arange(len(self.examples))
        return self.mixture.epoch_indices(self.seed, epoch)

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        chosen = self.chosen(epoch)
        steps = plan_epoch([self.lengths[i] for i in chosen], self.max_seq_len, self.batch_size,
                           self.micro_batches_per_step, self.seed, epoch)
        return [[[int(chosen[i]) for i in micro] for micro in step] for step in steps]

    def epoch_steps(self, epoch: int) -> int:
        while len(self._epoch_steps) <= epoch:
            known = len(self._epoch_steps)
            same = self.mixture is None and known > 0  # without a mixture every epoch packs the same lengths
            self._epoch_steps.append(self._epoch_steps[0] if same else len(self.epoch(known)))
        return self._epoch_steps[epoch]

    def total_steps(self, epochs: int) -> int:
        return sum(self.epoch_steps(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of optimizer step `step` (0-based)."""
        epoch = 0
        while step >= self.epoch_steps(epoch):
            step -= self.epoch_steps(epoch)
            epoch += 1
        return epoch, step

    def step_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step` (0-based), padded so that every rank makes
        the same number of passes."""
        epoch, index = self.locate(step)
        if self._cached[0] != epoch:
            self._cached = (epoch, self.epoch(epoch))
        mine, padding = rank_share(self._cached[1][index], self.cluster)
        return [collate([self.examples[i] for i in micro], self.normalization) for micro in mine] + \
            [self.padding] * padding
