"""Tree examples: several token sequences that share prefixes, merged so each shared token is
computed once.

A tree is an `Example` with `parent`: token t's parent is the token before it on its path (-1 at the
root; t - 1 throughout for an ordinary sequence). Parents always come before their children. A token's
position id is its depth, and it attends to its ancestors and itself only, so every root-to-leaf path
computes exactly what that path alone computes.

Used for conversations whose chat template renders past turns differently from the turn as generated
(Qwen3 strips past reasoning): each turn's inference-time render is a path; and for N candidate
completions of one prompt: the prompt once, each completion a branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onepass.data.types import Example


@dataclass(frozen=True)
class TokenPath:
    """One root-to-leaf token sequence with its own loss mask and turn ids."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    turn: np.ndarray


@dataclass(frozen=True)
class Tree:
    input_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # int8: 1 where some path trains the node (each loss term once)
    turn: np.ndarray  # int32
    parent: np.ndarray  # int32, -1 at the root
    paths: tuple[np.ndarray, ...]  # the node indices of each input path, in order
    trained_on_path: tuple[np.ndarray, ...]  # bool, per path position: trained by that path (its own mask)


def merge_paths(paths: Sequence[TokenPath]) -> Tree:
    """The prefix tree of `paths`, nodes in insertion order (a parent always before its children).

    A token shared by several paths (same ids from the root) is one node; it is trained if any path
    trains it. A node never gets two trained children: where a path would add a second one (N
    completions after one prompt), the path branches one token earlier, copying the shared token,
    so every trained token keeps its own prediction position."""
    ids: list[int] = []
    mask: list[int] = []
    turns: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}  # (parent node, token id) → node
    trained_child: set[int] = set()  # nodes that already have a trained child
    walked = []
    for path in paths:
        node, nodes = -1, []
        for position, token in enumerate(path.input_ids.tolist()):
            trained = bool(path.loss_mask[position])
            existing = children.get((node, token))
            if existing is not None and not (trained and not mask[existing] and node in trained_child):
                if trained and not mask[existing]:
                    mask[existing], turns[existing] = 1, int(path.turn[position])
                    trained_child.add(node)
                node = existing
                nodes.append(node)
                continue
            if trained and node in trained_child and node >= 0:  # branch one token earlier
                node = _copy_node(node, ids, mask, turns, parents)
                nodes[-1] = node
            ids.append(token)
            mask.append(int(trained))
            turns.append(int(path.turn[position]))
            parents.append(node)
            new = len(ids) - 1
            children.setdefault((node, token), new)
            if trained:
                trained_child.add(node)
            node = new
            nodes.append(node)
        walked.append(np.asarray(nodes, dtype=np.int64))
    return Tree(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8), np.asarray(turns, dtype=np.int32),
                np.asarray(parents, dtype=np.int32), tuple(walked),
                tuple(path.loss_mask.astype(bool) for path in paths))


def _copy_node(node: int, ids: list[int], mask: list[int], turns: list[int], parents: list[int]) -> int:
    """A copy of `node` under the same parent (a sibling with the same token), not shared further."""
    ids.append(ids[node])
    mask.append(0)  # its token's loss term is the original's: counted once
    turns.append(turns[node])
    parents.append(parents[node])
    return len(ids) - 1


def depths(parent: np.ndarray) -> np.ndarray:
    """Each node's depth (the root's children are 0): its position id."""
    depth = np.zeros(len(parent), dtype=np.int64)
    for node, up in enumerate(parent.tolist()):
        depth[node] = depth[up] + 1 if up >= 0 else 0
    return depth


def path_blocks(parent: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """The tree's root-to-leaf paths, each with where the nodes it owns start (the nodes no earlier
    path has; always a suffix). A node attends to the nodes before it on its path, so computing each
    node's attention once, on the path that owns it, costs sum(owned × path length): never the
    (nodes × nodes) of a dense mask, and never a shared prefix's queries twice."""
    has_child = np.zeros(len(parent), dtype=bool)
    has_child[parent[parent >= 0]] = True
    owned = np.zeros(len(parent), dtype=bool)
    blocks = []
    for leaf in np.flatnonzero(~has_child).tolist():
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = int(parent[node])
        nodes = np.asarray(path[::-1], dtype=np.int64)
        start = int(np.argmin(owned[nodes])) if not owned[nodes].all() else len(nodes)
        owned[nodes[start:]] = True
        blocks.append((nodes, start))
    return blocks


def is_sequence(parent: np.ndarray) -> bool:
    return bool(np.array_equal(parent, np.arange(len(parent)) - 1))


def trained_children(loss_mask: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """For each node, the index of its trained child (whose token it predicts), or -1."""
    child = np.full(len(parent), -1, dtype=np.int64)
    trained = np.flatnonzero((loss_mask == 1) & (parent >= 0))
    child[parent[trained]] = trained
    return child


def tree_example(tree: Tree, source: str = "", where: str = "") -> Example:
    """The tree as an Example (an ordinary sequence when it never branches)."""
    parent = None if is_sequence(tree.parent) else tree.parent
    return Example(tree.input_ids, tree.loss_mask, tree.turn, source, where, parent)
