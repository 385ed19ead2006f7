"""What the data stage made, for people: a summary table and examples with trained tokens coloured."""

from __future__ import annotations

import json
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from onepass.dataset import PreparedData, Stats
from onepass.render import Example

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
    table.add_row("history rewritten by template", f"{stats.unstable:,} (split into turns: {stats.split:,})")
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
                                 "turn": example.turn.tolist()}) + "\n")
