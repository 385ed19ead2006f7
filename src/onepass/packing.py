"""Examples → packed rows of at most `max_seq_len` tokens, by best-fit decreasing.

A row is just a list of example indices: the conversations in it stay whole, keep their own
position ids and never attend to each other (see `collate` and `model.packed_sdpa_attention`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: each example goes to the fullest row it still fits in.

    Ties keep the input order, so a shuffled input gives a shuffled, reproducible packing.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for index in order:
        length = lengths[index]
        if length > max_seq_len:
            raise ValueError(f"example {index} has {length} tokens > max_seq_len {max_seq_len}")  # our bug
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, row))
    return rows
