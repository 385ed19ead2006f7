"""`onepass demo`: train a tiny model on CPU and show held-out accuracy before and after."""

from __future__ import annotations

import argparse
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
    if args.real:
        from onepass.demo.real import run_real_demo

        run_real_demo(args.output if args.output != "runs/demo" else "runs/demo-real", steps=args.steps or 30)
        return 0
    if args.task == "tools":
        from onepass.demo.tools import run_tools_demo

        run_tools_demo(args.output if args.output != "runs/demo" else "runs/demo-tools", steps=args.steps or 800)
        return 0
    from onepass.demo.run import run_demo as demo

    demo(args.output, steps=args.steps or 400)
    return 0
