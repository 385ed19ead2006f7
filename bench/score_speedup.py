"""One-pass scoring vs the K-pass way (one forward pass per response on its prefix), on multi-turn data.

Reports the measured speed-up next to the token-count ratio that bounds it:
sum over turns of prefix length / conversation length.

    .venv/bin/python bench/score_speedup.py [--conversations 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--out", default="bench/results/score_speedup.json")
    args = parser.parse_args()

    from onepass import accel
    from onepass.data.chat_template import load_chat_template
    from onepass.data.formats import detect_format, to_conversation
    from onepass.train.attention import use_packed_attention
    from onepass.data.types import Record
    from onepass.data.types import RenderOptions
    from onepass.score.scoring import k_pass_turn_logprobs, render_for_scoring, token_logprobs, turn_logprobs
    from onepass.demo.tiny import build_model, build_tokenizer, random_conversations

    records = random_conversations(args.conversations, seed=0, max_turns=6)
    with tempfile.TemporaryDirectory() as temp:
        tokenizer = build_tokenizer(Path(temp), extra_text=[m["content"] for r in records for m in r["messages"]],
                                    vocab_size=2048)
    model = use_packed_attention(build_model(None, vocab_size=len(tokenizer), hidden_size=256, num_layers=4,
                                             num_heads=8, num_kv_heads=4, intermediate_size=704,
                                             max_position_embeddings=8192)).eval()
    head_loss = accel.install(model, accel.choose("auto", "cpu", False, False)).head_loss  # as onepass score runs
    template = load_chat_template(tokenizer, "chatml")
    conversations = [to_conversation(Record("bench", str(i), r), detect_format(r)) for i, r in enumerate(records)]
    options = RenderOptions(unstable_history="warn")
    torch.set_grad_enabled(False)

    start = time.perf_counter()
    scored = render_for_scoring(conversations, tokenizer, template, options)
    logprobs = token_logprobs(model, [s.example for s in scored], batch_tokens=4096, head_loss=head_loss)
    one_pass = [turn_logprobs(s, lp) for s, lp in zip(scored, logprobs)]
    one_seconds = time.perf_counter() - start

    start = time.perf_counter()
    k_pass = [k_pass_turn_logprobs(model, tokenizer, template, c, options) for c in conversations]
    k_seconds = time.perf_counter() - start

    full_tokens = sum(len(s.example) for s in scored)
    prefix_tokens = 0
    for s in scored:
        turns = s.example.turn
        for k in sorted(set(turns[turns >= 0].tolist())):
            prefix_tokens += int((turns == k).nonzero()[0][-1]) + 1
    worst = max(abs(a - b) for x, y in zip(one_pass, k_pass) for a, b in zip(x, y))
    result = {"conversations": args.conversations, "one_pass_seconds": round(one_seconds, 3),
              "k_pass_seconds": round(k_seconds, 3), "speedup": round(k_seconds / one_seconds, 2),
              "token_ratio_bound": round(prefix_tokens / full_tokens, 2), "max_abs_difference_nats": worst,
              "mean_turns": round(sum(len(c.assistant_indices) for c in conversations) / len(conversations), 2)}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
