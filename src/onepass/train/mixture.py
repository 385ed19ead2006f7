"""Weighted dataset mixing: which examples an epoch trains on when `data.train` sources carry weights.

A source's weight is how many times each of its examples is trained on per epoch: 3 repeats every
example three times, 0.5 trains a different random half each epoch. The epoch's examples are a pure
function of (seed, epoch), so a resumed run sees the same data. The objective is a sum over trained
tokens, so a source's pull on the model is its share of trained tokens, not of records: both are
reported at the start of a run (`Mixture.shares`).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onepass.config import DataSource
from onepass.data.types import Example, trained_tokens_of
from onepass.errors import OnepassError


@dataclass(frozen=True)
class SourceShare:
    source: DataSource
    examples: int  # prepared examples from this source
    per_epoch: int  # examples trained on per epoch (weight × examples, rounded)
    record_share: float  # of the epoch's examples
    trained_token_share: float  # of the epoch's trained tokens (expected, for fractional weights)


class Mixture:
    """Maps each example to its source and draws an epoch's example indices."""

    def __init__(self, examples: list[Example], sources: list[DataSource], files: list[list[Path]] | None = None):
        """`files`: each source's files where they are not its path (a Hub dataset's, onepass.hub)."""
        self.sources = sources
        files = files or [[Path(s.path)] for s in sources]
        self.source_of = _source_indices(examples, sources, files)
        self.trained = trained_tokens_of(examples)

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray:
        """The examples of one epoch: each source's whole copies, then a random part of it for the fraction."""
        picked = []
        for index, source in enumerate(self.sources):
            members = np.flatnonzero(self.source_of == index)
            whole, extra = _copies(source.weight, len(members))
            picked.extend([members] * whole)
            if extra:
                rng = np.random.default_rng([seed, epoch, index])
                picked.append(np.sort(rng.choice(members, size=extra, replace=False)))
        return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)

    def shares(self) -> list[SourceShare]:
        sizes = [int((self.source_of == i).sum()) for i in range(len(self.sources))]
        per_epoch = [whole * n + extra for n, s in zip(sizes, self.sources) for whole, extra in [_copies(s.weight, n)]]
        tokens = [s.weight * int(self.trained[self.source_of == i].sum()) for i, s in enumerate(self.sources)]
        return [SourceShare(s, sizes[i], per_epoch[i], per_epoch[i] / max(sum(per_epoch), 1),
                            tokens[i] / max(sum(tokens), 1e-9)) for i, s in enumerate(self.sources)]


def _copies(weight: float, examples: int) -> tuple[int, int]:
    """Whole copies of a source per epoch, and how many of its examples the fraction adds."""
    whole = int(weight + 1e-9)
    return whole, int(round((weight - whole) * examples))


def _source_indices(examples: Sequence[Example], sources: list[DataSource], files: list[list[Path]]) -> np.ndarray:
    """Each example's source index: per distinct file of a cache entry (its `source_ids`), else per example."""
    names = getattr(examples, "sources", None)
    if names is not None:
        of_file = np.asarray([_source_index(Example(np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.int32),
                                                    name), sources, files) for name in names] or [0], dtype=np.int64)
        return of_file[examples.source_ids]
    return np.asarray([_source_index(e, sources, files) for e in examples], dtype=np.int64)


def _source_index(example: Example, sources: list[DataSource], files: list[list[Path]]) -> int:
    """The source an example came from: one of its files, or a directory that holds its file."""
    file = Path(example.source)
    for index, paths in enumerate(files):
        if any(file == path or path in file.parents for path in paths):
            return index
    raise OnepassError(f"{example.source}: this example matches no data.train source "
                       f"({', '.join(s.path for s in sources)}); our bug, please report it.")


def describe(shares: list[SourceShare]) -> str:
    """Lines for the start of a run: each source's weight and its shares of records and trained tokens."""
    lines = ["train mixture (per epoch):"]
    for share in shares:
        lines.append(f"  {share.source.path}: weight {share.source.weight:g}, {share.examples:,} examples → "
                     f"{share.per_epoch:,.0f} per epoch = {share.record_share:.1%} of examples, "
                     f"{share.trained_token_share:.1%} of trained tokens")
    return "\n".join(lines)
