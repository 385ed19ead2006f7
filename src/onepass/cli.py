"""`onepass` command line: train | prepare | inspect | score | chat | demo.

User errors end with one line on stderr and exit status 2; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from onepass.errors import OnepassError

DATA_FLAG_SKIP = ("train", "eval")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Every data option of the config is also a flag: data.loss_on → --loss-on."""
    from onepass.config import DataConfig

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
        else:
            parser.add_argument(flag, default=None, choices=choices)
    parser.add_argument("--max-seq-len", type=int, default=None)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _data_config(args: argparse.Namespace) -> Any:
    from onepass.config import DataConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)
              if f.name not in DATA_FLAG_SKIP and getattr(args, f.name, None) is not None}
    return DataConfig(train=list(args.data), **values)


def _prepare_from_args(args: argparse.Namespace, use_cache: bool) -> tuple[Any, Any]:
    from onepass.chat_template import load_chat_template
    from onepass.dataset import prepare
    from onepass.model import load_tokenizer
    data_config = _data_config(args)
    tokenizer = load_tokenizer(args.tokenizer)
    template = load_chat_template(tokenizer, data_config.chat_template)
    options = data_config.render_options(args.max_seq_len)
    rejects = Path(args.data[0]).with_suffix(".rejects.jsonl") if data_config.on_bad_record == "skip" else None
    data = prepare(data_config.train, tokenizer, template, options, format_name=data_config.format,
                   on_bad_record=data_config.on_bad_record, num_workers=data_config.num_workers,
                   cache_dir=data_config.cache_dir, use_cache=use_cache, rejects_file=rejects)
    if rejects is not None and data.stats.rejected:
        print(f"skipped records and their reasons: {rejects}", file=sys.stderr)
    return data, tokenizer


def cmd_inspect(args: argparse.Namespace) -> int:
    from onepass.report import print_report, write_json_lines

    data, tokenizer = _prepare_from_args(args, use_cache=not args.no_cache)
    if args.json:
        write_json_lines(data, sys.stdout)
    else:
        print_report(data, tokenizer, num_examples=args.num_examples)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from onepass.report import summary_table
    from rich.console import Console

    data, _ = _prepare_from_args(args, use_cache=True)
    console = Console()
    console.print(summary_table(data.stats))
    state = "already cached, loaded" if data.from_cache else "written"
    console.print(f"prepared data {state}: {data.cache_path}")
    return 0


def _data_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("data", nargs="+", help="data files (.jsonl .json .parquet .csv) or datasets directories")
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face model or tokenizer directory")
    _add_data_flags(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onepass", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", required=True)

    inspect = _data_parser(subparsers, "inspect", "summarise data and show which tokens are trained")
    inspect.add_argument("--json", action="store_true", help="one JSON object per example: input_ids, loss_mask, turn")
    inspect.add_argument("--num-examples", type=int, default=2, help="examples to print with trained tokens coloured")
    inspect.add_argument("--no-cache", action="store_true", help="re-tokenize even when a cache exists")
    inspect.set_defaults(handler=cmd_inspect)

    prepare = _data_parser(subparsers, "prepare", "tokenize data into the on-disk cache")
    prepare.set_defaults(handler=cmd_prepare)

    for register in _optional_commands():
        register(subparsers)
    return parser


def _optional_commands() -> list[Any]:
    """Subcommands that live in their own modules (kept out of import time for a fast `inspect`)."""
    registers = []
    for module_name in ("onepass.trainer", "onepass.demo", "onepass.scoring", "onepass.chat"):
        try:
            module = __import__(module_name, fromlist=["register_cli"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        registers.append(module.register_cli)
    return registers


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except OnepassError as error:
        if args.debug:
            raise
        if "torch.distributed" in sys.modules:  # under torchrun: the first failing rank prints, once
            from onepass.distributed import current, report_error

            report_error(str(error), current())
        else:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onepass inspect --json | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    finally:
        if "torch.distributed" in sys.modules:
            from onepass.distributed import shutdown

            shutdown()
