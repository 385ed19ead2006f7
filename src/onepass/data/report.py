"""What the data stage made, for people: a summary table and examples with trained tokens coloured."""

from __future__ import annotations

import json
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from onepass.data.cache import PreparedData
from onepass.data.stats import Stats, describe_generation_marks
from onepass.data.types import Example
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


def coloured_example(example: Example, tokenizer: Any) -> Text:
    """The example's text, trained tokens coloured by turn, the rest dimmed."""
    text = Text()
    for token_id, trained, turn in zip(example.input_ids.tolist(), example.loss_mask.tolist(),
                                       example.turn.tolist()):
        piece = tokenizer.decode([token_id])
        if trained:
            text.append(piece, style=f"bold {TURN_COLOURS[max(turn, 0) % len(TURN_COLOURS)]}")
        else:
            text.append(piece, style="dim")
    return text


def print_report(data: PreparedData, tokenizer: Any, num_examples: int = 2, console: Console | None = None) -> None:
    console = console or Console()
    if data.from_cache:
        console.print(f"[bold]loaded prepared data from cache[/bold] {data.cache_path} (inputs unchanged)")
    console.print(summary_table(data.stats))
    for index, example in enumerate(data.examples[:num_examples]):
        console.rule(f"example {index} ({example.source}, {example.where}): "
                     f"{len(example)} tokens, {example.num_trained_tokens} trained (coloured)")
        console.print(coloured_example(example, tokenizer))


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
    for what in ("calls to undeclared functions", "messages with control tokens in their text"):
        if stats.agentic[what]:
            parts.append(f"{what} {stats.agentic[what]:,}")
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
