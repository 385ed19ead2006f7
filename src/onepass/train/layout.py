"""The attention layout of a packed row: which tokens attend to which, worked out once per micro-batch
on the CPU, so that no layer has to (no `cu_seq_lens.tolist()`, no per-layer Python loop over
conversations).

Sequences are grouped into buckets of similar length; a bucket is one attention call over its
conversations stacked as a batch (n, H, L, D), each padded at its end to the bucket's longest. Causal
attention never lets a real query see a padded key (padding comes after every real token), so the
padding needs no mask and costs only the padded queries' attention, never a dense (row x row) mask.
Trees keep their path-by-path attention (`tree.path_blocks`). One `take` index then puts every
token's output back in row order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from onepass.data.tree import path_blocks

# A bucket holds conversations at least this fraction of its longest one's length: padding at most
# doubles a bucket's tokens, and a row of L-token conversations needs about log2(longest/shortest) calls.
BUCKET_RATIO = 0.5


@dataclass(frozen=True)
class TreeBlocks:
    """How a tree's attention is computed (see `tree.path_blocks`): each root-to-leaf path's nodes and
    where the nodes it owns start, and the permutation that puts the owned nodes' outputs back in order."""

    paths: tuple[tuple[torch.Tensor, int], ...]
    inverse: torch.Tensor

    @classmethod
    def of(cls, parent: np.ndarray) -> TreeBlocks:
        blocks = path_blocks(parent)
        order = np.concatenate([nodes[start:] for nodes, start in blocks])
        return cls(tuple((torch.from_numpy(nodes), start) for nodes, start in blocks),
                   torch.from_numpy(np.argsort(order)))

    def to(self, device: torch.device | str) -> TreeBlocks:
        return TreeBlocks(tuple((nodes.to(device), start) for nodes, start in self.paths), self.inverse.to(device))


@dataclass(frozen=True)
class AttentionLayout:
    """buckets: per bucket, the row positions of its conversations' tokens (n, L), each conversation
    padded by repeating its last position; trees: (start, end, blocks) of each tree; take: where each
    row position's output lies in the bucket outputs (flattened, in order) followed by the trees'
    outputs. A row that is one sequence has one bucket and no `take` (its output is already in order)."""

    buckets: tuple[torch.Tensor, ...]
    trees: tuple[tuple[int, int, TreeBlocks], ...] = ()
    take: torch.Tensor | None = None

    @classmethod
    def of(cls, lengths: Sequence[int], trees: Sequence[TreeBlocks | None] = ()) -> AttentionLayout:
        """The layout of conversations of these lengths laid end to end (`trees[i]`: the i-th one's
        blocks if it is a tree)."""
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        trees = list(trees) + [None] * (len(lengths) - len(trees))
        sequences = [i for i in range(len(lengths)) if trees[i] is None]
        if len(sequences) == len(lengths) == 1:
            return cls((torch.arange(lengths[0])[None],))
        take = np.empty(int(starts[-1]), dtype=np.int64)
        buckets, offset = [], 0
        for members in _buckets(sequences, lengths):
            width = lengths[members[0]]
            index = np.empty((len(members), width), dtype=np.int64)
            for row, i in enumerate(members):
                positions = np.arange(starts[i], starts[i + 1])
                index[row] = np.concatenate([positions, np.full(width - len(positions), positions[-1])])
                take[positions] = offset + row * width + np.arange(len(positions))
            buckets.append(torch.from_numpy(index))
            offset += index.size
        tree_blocks = []
        for i in (i for i in range(len(lengths)) if trees[i] is not None):
            take[starts[i]:starts[i + 1]] = offset + np.arange(lengths[i])
            tree_blocks.append((int(starts[i]), int(starts[i + 1]), trees[i]))
            offset += lengths[i]
        return cls(tuple(buckets), tuple(tree_blocks), torch.from_numpy(take))

    def to(self, device: torch.device | str) -> AttentionLayout:
        return AttentionLayout(tuple(index.to(device) for index in self.buckets),
                               tuple((start, end, blocks.to(device)) for start, end, blocks in self.trees),
                               None if self.take is None else self.take.to(device))


def _buckets(members: list[int], lengths: Sequence[int]) -> list[list[int]]:
    """Conversations (indices) grouped longest first; a bucket takes the next ones while they are at
    least BUCKET_RATIO of its first's length."""
    buckets: list[list[int]] = []
    for i in sorted(members, key=lambda i: -lengths[i]):
        if buckets and lengths[i] >= BUCKET_RATIO * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets
