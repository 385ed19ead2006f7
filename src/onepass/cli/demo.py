"""`onepass demo`: train a tiny model on CPU and show held-out accuracy before and after."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="train a tiny model on CPU and show accuracy before/after")
    parser.add_argument("--output", default="runs/demo", help="where the model, metrics and plot go")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from onepass.demo.run import run_demo as demo

    demo(args.output, steps=args.steps)
    return 0
