"""`Stats`: what happened to every record. Nothing is lost without being counted here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onepass.compat import REASONING_KEYS


@dataclass
class Stats:
    records: int = 0
    conversations: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # bad records skipped, by reason
    dropped: Counter[str] = field(default_factory=Counter)  # valid records not trained, by reason
    truncated: int = 0
    unstable: int = 0  # conversations whose template rewrites history
    split: int = 0  # ... that became one example per assistant turn
    trees: int = 0  # ... that became one tree example (each turn's inference-time render a path)
    lengths: list[int] = field(default_factory=list)
    openings: Counter[str] = field(default_factory=Counter)  # first words of responses → count
    formats: dict[str, str] = field(default_factory=dict)  # file → detected format
    template_notes: Counter[str] = field(default_factory=Counter)  # what was done about the template → count
    # tool use and reasoning: records with tools, tool calls, calls to functions the record does not declare,
    # tool replies, messages with reasoning, messages whose text holds the tokenizer's control tokens
    agentic: Counter[str] = field(default_factory=Counter)
    # onepass's masks against the template's own {% generation %} marks, where it has them: agree / differ
    generation_marks: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Stats) -> Stats:
        """Add `other`'s counts to these (e.g. a worker's chunk), in place."""
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(mine, dict) and not isinstance(mine, Counter):
                mine.update(value)
            else:
                setattr(self, name, mine + value)
        return self

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def length_percentiles(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        values = np.percentile(np.asarray(self.lengths), [50, 90, 99, 100])
        return {name: int(value) for name, value in zip(("p50", "p90", "p99", "max"), values)}

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would rebuild each Counter from (key, count) pairs and count the pairs
        return {name: dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
                for name, value in vars(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Stats:
        stats = cls(**{"template_notes": {}, "trees": 0, "agentic": {}, "generation_marks": {}, **values})
        for name in ("rejected", "dropped", "openings", "template_notes", "agentic", "generation_marks"):
            setattr(stats, name, Counter(getattr(stats, name)))
        return stats


def describe_generation_marks(stats: Stats) -> str:
    """ "masks agree with the template's generation marks: 2,000/2,000", or "" where none were compared."""
    compared = sum(stats.generation_marks.values())
    if not compared:
        return ""
    return f"masks agree with the template's generation marks: {stats.generation_marks['agree']:,}/{compared:,}"


def count_agentic(conversation: Any, stats: Stats) -> None:
    """Add a conversation's tool use and reasoning to `stats.agentic` (nothing for plain chat)."""
    messages = getattr(conversation, "messages", ())
    tools = getattr(conversation, "tools", None)
    if not tools and not any(m.tool_calls or m.extra or m.role == "tool" for m in messages):
        return
    if tools:
        stats.agentic["records with tools"] += 1
    declared = {(tool.get("function") or tool).get("name") for tool in tools or ()}
    for message in messages:
        for call in message.tool_calls or ():
            stats.agentic["tool calls"] += 1
            if (call.get("function") or call).get("name") not in declared:
                stats.agentic["calls to undeclared functions"] += 1
        if message.role == "tool":
            stats.agentic["tool replies"] += 1
        if any(message.extra.get(key) for key in REASONING_KEYS):
            stats.agentic["messages with reasoning"] += 1
