"""`onepass chat`: talk to a model in the terminal with its own chat template."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parsers(subparsers: Any) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    parser.add_argument("--model", required=True, help="local Hugging Face model directory or Hub id")
    parser.add_argument("--prompt", default=None, help="answer this once and exit")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--chat-template", default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tools", default=None, metavar="FILE.json",
                        help="JSON schemas of functions the model may call (a list, or {\"tools\": [...]}); "
                             "the model's reply shows the call it makes")
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from onepass.data.chat_template import load_chat_template
    from onepass.data.tokenizer import load_tokenizer
    from onepass.score.chat import reply, terminal_streamer
    from onepass.train.model import load_model

    tokenizer = load_tokenizer(args.model)
    template = load_chat_template(tokenizer, args.chat_template)
    if args.tools:
        template = with_tools(template, args.tools)
    model = load_model(args.model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    streamer = terminal_streamer(tokenizer) if sys.stdout.isatty() else None  # piped output: the reply, once
    if args.prompt is not None:
        answer = reply(model, tokenizer, template, messages + [{"role": "user", "content": args.prompt}],
                       streamer=streamer, **options)
        if streamer is None:
            print(answer)
        return 0
    print("onepass chat: type a message; an empty line or Ctrl-D ends.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return 0
        if not text:
            return 0
        messages.append({"role": "user", "content": text})
        if streamer is not None:
            print("model> ", end="", flush=True)
        answer = reply(model, tokenizer, template, messages, streamer=streamer, **options)
        messages.append({"role": "assistant", "content": answer})
        if streamer is None:
            print(f"model> {answer}")


def with_tools(template: Any, path: str) -> Any:
    """The template with the tool schemas of a JSON file, checked; refused where it renders no tools."""
    import json
    from pathlib import Path

    from onepass.data.formats import read_tools
    from onepass.data.types import Record
    from onepass.errors import OnepassError

    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise OnepassError(f"--tools {path}: cannot read it as JSON ({error}). Fix: give a JSON file with a list of "
                           "function schemas.") from None
    tools = read_tools(Record(path, "the file", {"tools": value.get("tools") if isinstance(value, dict) and
                                                 "tools" in value else value}))
    template = template.for_conversation(tools)
    if tools and not template.renders_tools:
        raise OnepassError(f"--tools {path}: chat template '{template.name}' renders no tool schemas, so the model "
                           "would not see them. Fix: --chat-template FILE.jinja with a template that renders tools.")
    names = [(tool.get("function") or tool)["name"] for tool in tools or ()]
    print(f"tools: {', '.join(names)}", file=sys.stderr)
    return template
