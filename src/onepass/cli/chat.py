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
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from onepass.data.chat_template import load_chat_template
    from onepass.data.tokenizer import load_tokenizer
    from onepass.score.chat import reply, terminal_streamer
    from onepass.train.model import load_model

    tokenizer = load_tokenizer(args.model)
    template = load_chat_template(tokenizer, args.chat_template)
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
