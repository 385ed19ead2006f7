"""`onepass score`: log Pr(response | context) per message from one forward pass, or candidate ranking."""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
    parser.add_argument("--no-check-model", dest="check_model", action="store_false",
                        help="skip the start-up comparison of onepass's path with the model's own forward")
    parser.add_argument("--one-pass", action="store_true",
                        help="score every turn from one pass even where the check finds the model not "
                             "prefix-consistent (the default there: each turn from its own prefix)")
    parser.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from onepass.data.chat_template import load_chat_template
    from onepass.data.records import read_records
    from onepass.data.tokenizer import load_tokenizer
    from onepass.score.scoring import largest_k_pass_difference, rank_candidates, score_file, write_jsonl
    from onepass.train.model import load_model

    tokenizer = load_tokenizer(args.model)
    template = load_chat_template(tokenizer, args.chat_template)
    model = load_model(args.model)
    per_turn = False
    if args.check_model:
        from onepass.train.check import check_packing

        result = check_packing(model)
        print(result.describe(), file=sys.stderr)
        if not result.prefix_consistent:
            per_turn = not args.one_pass
            print("scoring: " + ("each turn from its own prefix, one pass per turn (exact by construction; --one-pass "
                                 "for one pass per conversation)" if per_turn else
                                 "one pass per conversation (--one-pass): per-turn values no K-pass evaluation "
                                 "reproduces on this model"), file=sys.stderr)
    from onepass.hub import dataset_files

    records = [record for file in dataset_files(args.data) for record in read_records(file)]
    if records and records[0].data is not None and "completions" in records[0].data:
        bad = next((r for r in records if r.error is not None), None)
        if bad is not None:
            raise bad.error
        write_jsonl(rank_candidates(model, tokenizer, template, records, args.batch_tokens), args.out)
        return 0
    rows, conversations = score_file(model, tokenizer, template, args.data, args.loss_on, args.format,
                                     args.batch_tokens, per_turn=per_turn)
    write_jsonl(rows, args.out)
    if args.check:
        worst = largest_k_pass_difference(model, tokenizer, template, conversations[:args.check],
                                          rows[:args.check], args.loss_on)
        print(f"check: {min(args.check, len(rows))} conversations re-scored with one pass per turn; "
              f"largest difference {worst:.2e} nats", file=sys.stderr)
    return 0
