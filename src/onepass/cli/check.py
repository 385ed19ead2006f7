"""`onepass check MODEL`: prove on this machine that onepass computes the model's own objective."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parsers(subparsers: Any) -> None:
    from onepass.cli.score import accelerations_setting

    parser = subparsers.add_parser(
        "check", help="compare onepass's packed path with the model's own forward (what train and score do at "
                      "start-up)")
    parser.add_argument("model", help="local Hugging Face model directory or Hub id")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--accelerations", default="auto", type=accelerations_setting,
                        help="auto (default), none (the stock core), or a comma-separated list")
    parser.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    from onepass import api
    from onepass.errors import OnepassError
    from onepass.train.model import load_model

    model = load_model(args.model)
    try:
        result = api.check(model, accelerations=args.accelerations)
    except OnepassError as error:
        if not args.json:
            raise
        print(json.dumps({"model": args.model, "exact": False, "error": str(error)}))
        return 2
    if args.json:
        print(json.dumps({"model": args.model, "exact": True, **result.to_json()}))
    else:
        print(result.describe(), file=sys.stderr)
    return 0
