"""What the data stage made, for people: a summary table and examples with trained tokens coloured."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from rich.table import Table
from rich.text import Text

from onepass.data.cache import PreparedData
from onepass.data.chat_template import ChatTemplate
from onepass.data.render import tokenize_rendered, tools_block
from onepass.data.stats import Stats, describe_generation_marks
from onepass.data.types import ChatConversation, Conversation, Example, RenderedText, RenderOptions
from onepass.errors import OnepassError

TURN_COLOURS = ("green", "cyan", "magenta", "yellow", "blue")


def summary_table(stats: Stats, top_openings: int = 5) -> Table:
    table = Table(title="onepass data summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("records", f"{stats.records:,}")
    for source, format_name in stats.formats.items():
        table.add_row("  format", f"{source}: {format_name}")
    table.add_row("examples", f"{stats.examples:,}")
    table.add_row("tokens", f"{stats.tokens:,}")
    table.add_row("trained tokens", f"{stats.trained_tokens:,} ({stats.trained_fraction:.1%})")
    percentiles = stats.length_percentiles()
    if percentiles:
        table.add_row("length (tokens)", "  ".join(f"{k} {v:,}" for k, v in percentiles.items()))
    table.add_row("rejected (bad records)", _reasons(stats.rejected))
    table.add_row("dropped", _reasons(stats.dropped))
    table.add_row("truncated", f"{stats.truncated:,}")
    table.add_row("history rewritten by template",
                  f"{stats.unstable:,} (one tree each: {stats.trees:,}; split into turns: {stats.split:,})")
    if stats.generation_marks:
        table.add_row("generation marks", describe_generation_marks(stats))
    if stats.agentic:
        table.add_row("tool use and reasoning", ", ".join(f"{what} {count:,}" for what, count in
                                                          sorted(stats.agentic.items())))
    for note, count in stats.template_notes.items():
        table.add_row("chat template", f"{note} ({count:,} conversations)")
    total = sum(stats.openings.values())
    if total:
        common = sorted(stats.openings.items(), key=lambda item: -item[1])[:top_openings]
        table.add_row("common response openings",
                      "\n".join(f"{count / total:6.1%}  \"{opening} ...\"" for opening, count in common))
    return table


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return "0"
    total = sum(counts.values())
    return f"{total:,}: " + ", ".join(f"{reason} ×{count}" for reason, count in sorted(counts.items()))


@dataclass(frozen=True)
class Fold:
    """Tokens [first, last) of an example shown as a few lines instead (a record's tool schemas)."""

    first: int
    last: int
    lines: tuple[str, ...]


def tool_line(tool: dict[str, Any]) -> str:
    """One function schema as one line: `name(arg: type, optional?: type) - description`."""
    function = tool.get("function", tool) if isinstance(tool, dict) else {}
    parameters = function.get("parameters") if isinstance(function.get("parameters"), dict) else {}
    properties = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
    required = set(parameters.get("required") or ())
    arguments = ", ".join(f"{name}{'' if name in required else '?'}: "
                          f"{schema.get('type', 'any') if isinstance(schema, dict) else 'any'}"
                          for name, schema in properties.items())
    description = str(function.get("description") or "").strip().splitlines()
    return f"{function.get('name', '?')}({arguments})" + (f" - {description[0]}" if description else "")


def tool_folds(examples: Sequence[Example], conversations: Iterable[Conversation], tokenizer: Any,
               template: ChatTemplate, options: RenderOptions, scan_limit: int = 10_000) -> dict[int, Fold]:
    """For each example with tool schemas (found among the first `scan_limit` conversations by file and
    line), the tokens its schemas render to, folded to one line per function."""
    wanted = {(example.source, example.where): index for index, example in enumerate(examples)}
    folds: dict[int, Fold] = {}
    for conversation in itertools.islice(conversations, scan_limit):
        index = wanted.pop((conversation.source, conversation.where), None)
        if index is not None and isinstance(conversation, ChatConversation) and conversation.tools:
            fold = _tools_fold(examples[index], conversation, tokenizer, template, options)
            if fold is not None:
                folds[index] = fold
        if not wanted:
            break
    return folds


def _tools_fold(example: Example, conversation: ChatConversation, tokenizer: Any, template: ChatTemplate,
                options: RenderOptions) -> Fold | None:
    found = tools_block(conversation, template, options)
    if found is None:
        return None
    text, start, end = found
    [(ids, offsets)] = tokenize_rendered(tokenizer, [RenderedText(text, ())])
    first = int(np.searchsorted(offsets[:, 1], start, side="right"))  # the first token ending after start
    last = int(np.searchsorted(offsets[:, 0], end, side="left"))  # the first token starting at or after end
    if last <= first or ids[:last].tolist() != example.input_ids[:last].tolist():
        return None  # the example is not this render (truncated, sanitized, ...): shown unfolded
    lines = tuple(tool_line(tool) for tool in conversation.tools or ())
    return Fold(first, last, (f"[{last - first} tokens of tool schemas, folded: {len(lines)} functions]",
                              *(f"  {line}" for line in lines)))


def coloured_example(example: Example, tokenizer: Any, fold: Fold | None = None) -> Text:
    """The example's text, trained tokens coloured by turn, the rest dimmed; the tokens of `fold`
    shown as its lines."""
    text = Text()
    for index, (token_id, trained, turn) in enumerate(zip(example.input_ids.tolist(), example.loss_mask.tolist(),
                                                          example.turn.tolist())):
        if fold is not None and fold.first <= index < fold.last:
            if index == fold.first:
                text.append("\n" + "\n".join(fold.lines) + "\n", style="italic")
            continue
        piece = tokenizer.decode([token_id])
        if trained:
            text.append(piece, style=f"bold {TURN_COLOURS[max(turn, 0) % len(TURN_COLOURS)]}")
        else:
            text.append(piece, style="dim")
    return text


def write_json_lines(data: PreparedData, stream: TextIO) -> None:
    for example in data.examples:
        stream.write(json.dumps({"input_ids": example.input_ids.tolist(), "loss_mask": example.loss_mask.tolist(),
                                 "turn": example.turn.tolist(), "parent": example.parents.tolist()}) + "\n")


def summary_line(name: str, stats: Stats) -> str:
    """One line saying what became of every record: examples, and what was rejected or dropped, and why."""
    parts = [f"{name}: {stats.records:,} records → {stats.examples:,} examples, {stats.tokens:,} tokens "
             f"({stats.trained_tokens:,} trained)"]
    for label, counts in (("rejected", stats.rejected), ("dropped", stats.dropped)):
        if counts:
            reasons = ", ".join(f"{reason} ×{count}" for reason, count in sorted(counts.items()))
            parts.append(f"{label} {sum(counts.values()):,} ({reasons})")
    if stats.truncated:
        parts.append(f"truncated {stats.truncated:,}")
    if stats.generation_marks:
        parts.append(describe_generation_marks(stats))
    for what in ("calls to undeclared functions", "messages with control tokens in their text",
                 "messages with control tokens in their text (encoded as text)"):
        if stats.agentic[what]:
            parts.append(f"{what} {stats.agentic[what]:,}")
    if stats.agentic["messages with control tokens in their text"]:
        parts.append("(they are trained as the tokens themselves; data.sanitize_control_tokens: true encodes "
                     "them as text)")
    return "; ".join(parts)


def nothing_left(name: str, stats: Stats, max_seq_len: int | None) -> OnepassError:
    """The error for data that prepared into no example at all, with the fix its reasons point to."""
    fixes = []
    if any("max_seq_len" in reason or "truncation" in reason for reason in stats.dropped):
        fixes.append(f"raise max_seq_len (now {max_seq_len}) or set data.overlong: truncate")
    if stats.rejected:
        fixes.append("fix the rejected records (each reason names the file, line and field)")
    if any(reason in ("no trained turn", "no trained tokens") for reason in stats.dropped):
        fixes.append("check data.loss_on and per-message train flags: nothing was left to train on")
    return OnepassError(f"no {name} examples left after preparation. {summary_line(name + ' data', stats)}. "
                        f"Fix: {'; '.join(fixes) or 'check the data'}.")
