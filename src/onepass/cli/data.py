"""`onepass inspect` and `onepass prepare`: the data stage on its own, before any training."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from onepass.config import DataConfig

DATA_FLAG_SKIP = ("train", "eval")


def add_parsers(subparsers: Any) -> None:
    inspect = _data_parser(subparsers, "inspect", "summarise data and show which tokens are trained")
    inspect.add_argument("--json", action="store_true", help="one JSON object per example: input_ids, loss_mask, turn, parent")
    inspect.add_argument("--num-examples", type=int, default=2, help="examples to print with trained tokens coloured")
    inspect.add_argument("--no-cache", action="store_true", help="re-tokenize even when a cache exists")
    inspect.set_defaults(handler=run_inspect)
    prepare = _data_parser(subparsers, "prepare", "tokenize data into the on-disk cache")
    prepare.set_defaults(handler=run_prepare)


def run_inspect(args: argparse.Namespace) -> int:
    from onepass.data.report import write_json_lines

    data, tokenizer = _prepare_from_args(args, use_cache=not args.no_cache)
    if args.json:
        write_json_lines(data, sys.stdout)
    else:
        print_report(data, tokenizer, num_examples=args.num_examples, folds=_tool_folds(args, data, tokenizer))
    return 0


def _tool_folds(args: argparse.Namespace, data: Any, tokenizer: Any) -> dict:
    """The shown examples' tool schemas, folded to one line per function (their records read again)."""
    from onepass.data.chat_template import load_chat_template
    from onepass.data.prepare import iter_conversations
    from onepass.data.report import tool_folds
    from onepass.data.stats import Stats

    shown = data.examples[:args.num_examples]
    if not data.stats.agentic.get("records with tools") or not len(shown):
        return {}
    data_config = _data_config(args)
    template = load_chat_template(tokenizer, data_config.chat_template, data_config.chat_template_kwargs)
    conversations = iter_conversations(data_config.train_paths(), data_config.format, "skip", Stats(), [])
    return tool_folds(list(shown), conversations, tokenizer, template, data_config.render_options(args.max_seq_len))


def run_prepare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from onepass.data.report import summary_table

    data, _ = _prepare_from_args(args, use_cache=True)
    console = Console()
    console.print(summary_table(data.stats))
    state = "already cached, loaded" if data.from_cache else "written"
    console.print(f"prepared data {state}: {data.cache_path}")
    return 0


def _prepare_from_args(args: argparse.Namespace, use_cache: bool) -> tuple[Any, Any]:
    from onepass.data.chat_template import load_chat_template
    from onepass.data.prepare import prepare
    from onepass.data.tokenizer import load_tokenizer

    data_config = _data_config(args)
    tokenizer = load_tokenizer(args.tokenizer)
    template = load_chat_template(tokenizer, data_config.chat_template, data_config.chat_template_kwargs)
    options = data_config.render_options(args.max_seq_len)
    rejects = Path(args.data[0]).with_suffix(".rejects.jsonl") if data_config.on_bad_record == "skip" else None
    data = prepare(data_config.train, tokenizer, template, options, format_name=data_config.format,
                   on_bad_record=data_config.on_bad_record, num_workers=data_config.num_workers,
                   cache_dir=data_config.cache_dir, use_cache=use_cache, rejects_file=rejects)
    if rejects is not None and data.stats.rejected:
        from onepass.data.report import summary_line

        print(summary_line("data", data.stats), file=sys.stderr)
        print(f"skipped records and their reasons: {rejects}", file=sys.stderr)
    return data, tokenizer


def _data_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("data", nargs="+", help="data files (.jsonl .json .parquet .csv) or datasets directories")
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face model or tokenizer directory")
    _add_data_flags(parser)
    return parser


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Every data option of the config is also a flag: data.loss_on → --loss-on."""
    hints = typing.get_type_hints(DataConfig)
    for config_field in dataclasses.fields(DataConfig):
        if config_field.name in DATA_FLAG_SKIP:
            continue
        flag = "--" + config_field.name.replace("_", "-")
        hint = hints[config_field.name]
        choices = [a for a in typing.get_args(hint) if isinstance(a, str)] or None
        if typing.get_origin(hint) in (typing.Union,) and not choices:
            choices = next((list(typing.get_args(a)) for a in typing.get_args(hint)
                            if typing.get_origin(a) is typing.Literal), None)
        if hint is bool:
            parser.add_argument(flag, default=None, type=_parse_bool, metavar="true|false")
        elif hint is int:
            parser.add_argument(flag, default=None, type=int)
        elif typing.get_origin(hint) is dict:
            parser.add_argument(flag, default=None, type=_parse_json_object, metavar='\'{"key": value}\'')
        else:
            parser.add_argument(flag, default=None, choices=choices)
    parser.add_argument("--max-seq-len", type=int, default=None)


def _parse_json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"enable_thinking\": false}}' ({error})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _data_config(args: argparse.Namespace) -> DataConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)
              if f.name not in DATA_FLAG_SKIP and getattr(args, f.name, None) is not None}
    return DataConfig(train=list(args.data), **values)


def print_report(data: Any, tokenizer: Any, num_examples: int = 2, folds: dict[int, Any] | None = None) -> None:
    """The summary table, then examples with their trained tokens coloured (tool schemas folded)."""
    from rich.console import Console

    from onepass.data.report import coloured_example, summary_table

    console = Console()
    if data.from_cache:
        console.print(f"[bold]loaded prepared data from cache[/bold] {data.cache_path} (inputs unchanged)")
    console.print(summary_table(data.stats))
    for index, example in enumerate(data.examples[:num_examples]):
        console.rule(f"example {index} ({example.source}, {example.where}): "
                     f"{len(example)} tokens, {example.num_trained_tokens} trained (coloured)")
        console.print(coloured_example(example, tokenizer, (folds or {}).get(index)))
