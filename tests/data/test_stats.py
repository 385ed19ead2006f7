"""Stats: counts from parallel chunks add up to the counts of one pass, and survive the cache."""

from __future__ import annotations

from collections import Counter

from onepass.data.stats import Stats


def test_merging_chunk_stats_adds_every_count():
    a = Stats(records=2, rejected=Counter({"invalid JSON": 1}), dropped=Counter({"no trained tokens": 2}),
              truncated=1, lengths=[3, 4], openings=Counter({"Of course!": 1}), formats={"a.jsonl": "messages"})
    b = Stats(records=3, rejected=Counter({"invalid JSON": 2, "unknown role": 1}), split=2, lengths=[5],
              openings=Counter({"Of course!": 2}), formats={"b.jsonl": "text"})
    merged = Stats().merge(a).merge(b)
    assert merged.records == 5 and merged.truncated == 1 and merged.split == 2
    assert merged.rejected == {"invalid JSON": 3, "unknown role": 1}
    assert merged.dropped == {"no trained tokens": 2} and merged.openings == {"Of course!": 3}
    assert merged.lengths == [3, 4, 5] and merged.formats == {"a.jsonl": "messages", "b.jsonl": "text"}


def test_stats_round_trip_through_their_cached_form():
    stats = Stats(records=4, rejected=Counter({"invalid JSON": 2}), openings=Counter({"Hi there": 3}), lengths=[7])
    again = Stats.from_dict(stats.to_dict())
    assert again == stats and isinstance(again.rejected, Counter)
    again.rejected["invalid JSON"] += 1  # still counts
    assert again.rejected["invalid JSON"] == 3
