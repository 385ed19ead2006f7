"""`onepass demo`: train a tiny model on CPU and show held-out accuracy before and after."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parsers(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="train a tiny model on CPU and show accuracy before/after")
    parser.add_argument("--output", default="runs/demo", help="where the model, metrics and plot go")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400; --task tools: 800; --real: 30)")
    parser.add_argument("--task", choices=["dialogue", "tools"], default="dialogue",
                        help="dialogue: three-turn dialogues; tools: calls to two functions and answers from their "
                             "replies")
    parser.add_argument("--real", action="store_true",
                        help="fine-tune the real SmolLM2-135M-Instruct instead (downloaded once, ~100 MB)")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.real:
        from onepass.demo.real import report_view, run_real_demo as demo

        output, steps = args.output if args.output != "runs/demo" else "runs/demo-real", args.steps or 30
    elif args.task == "tools":
        from onepass.demo.tools import report_view, run_tools_demo as demo

        output, steps = args.output if args.output != "runs/demo" else "runs/demo-tools", args.steps or 800
    else:
        from onepass.demo.run import report_view, run_demo as demo

        output, steps = args.output, args.steps or 400
    report = demo(output, steps=steps)
    console = Console()
    for item in report_view(report, Path(output)):
        console.print(item)
    return 0
