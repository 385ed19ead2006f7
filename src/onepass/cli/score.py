"""`onepass score`: log Pr(response | context) per message from one forward pass, or candidate ranking."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("onepass.score")


def add_parsers(subparsers: Any) -> None:
    parser = subparsers.add_parser("score", help="log Pr(response | context) per message from one forward pass")
    parser.add_argument("--model", required=True, help="local Hugging Face model directory or Hub id")
    parser.add_argument("--data", required=True, help="conversations, or rows of {prompt, completions: [...]}")
    parser.add_argument("--out", default=None, help="output JSONL (default: stdout)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed forward pass")
    parser.add_argument("--check", type=int, default=0, help="re-score N conversations the slow K-pass way")
    parser.add_argument("--chat-template", default=None)
    parser.add_argument("--loss-on", default="assistant", choices=["assistant", "last", "all"])
    parser.add_argument("--format", default=None)
    parser.add_argument("--accelerations", default="auto", type=accelerations_setting,
                        help="auto (default: those measured on this device), none (the stock core), or a "
                             "comma-separated list, as the training config's `accelerations`")
    parser.add_argument("--no-check-model", dest="check_model", action="store_false",
                        help="skip the start-up comparison of onepass's path with the model's own forward")
    parser.add_argument("--one-pass", action="store_true",
                        help="score every turn from one pass even where the check finds the model not "
                             "prefix-consistent (the default there: each turn from its own prefix)")
    parser.set_defaults(handler=run_score)


def accelerations_setting(text: str) -> str | list[str]:
    """`--accelerations auto|none|a,b`: the config key's value."""
    return text if text in ("auto", "none") else [name.strip() for name in text.split(",") if name.strip()]


def run_score(args: argparse.Namespace) -> int:
    from onepass import api
    from onepass.data.chat_template import load_chat_template
    from onepass.data.prepare import files_of, load_conversations
    from onepass.data.records import read_records
    from onepass.data.stats import Stats
    from onepass.data.tokenizer import load_tokenizer
    from onepass.score.scoring import largest_k_pass_difference
    from onepass.train.model import load_model

    tokenizer = load_tokenizer(args.model)
    template = load_chat_template(tokenizer, args.chat_template)  # a bad template fails before the model loads
    model = load_model(args.model)
    first = next(iter(read_records(files_of(args.data)[0])), None)
    options = dict(chat_template=args.chat_template, accelerations=args.accelerations, check=args.check_model,
                   batch_tokens=args.batch_tokens)
    if first is not None and first.data is not None and "completions" in first.data:
        write_jsonl(api.rank(model, tokenizer, args.data, **options), args.out)
        return 0
    rows = api.logprobs(model, tokenizer, args.data, loss_on=args.loss_on, one_pass=args.one_pass, format=args.format,
                     **options)
    write_jsonl(rows, args.out)
    if args.check:
        conversations = load_conversations([args.data], args.format, "error", Stats(), [])
        worst = largest_k_pass_difference(model, tokenizer, template, conversations[:args.check],
                                          rows[:args.check], args.loss_on)
        log.info(f"check: {min(args.check, len(rows))} conversations re-scored with one pass per turn; "
                 f"largest difference {worst:.2e} nats")
    return 0


def write_jsonl(rows: list[dict[str, Any]], path: str | Path | None) -> None:
    """The rows as JSON lines, to `path` or to stdout."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path is None:
        print(text, end="")
    else:
        Path(path).write_text(text)
