"""Trees: tokens processed and time for conversations whose template rewrites history (Qwen3 strips
past reasoning) and for ranking N completions of one prompt: one tree vs one example per turn or per
completion (split), next to the full render as the template shows the whole conversation (one pass,
but the contexts trained on are not the inference-time ones) and the token-count bound.

Tiny Llama-style model (built from a config), forward + backward (training) or forward (ranking),
one thread; the timings are medians of repeated passes. Token counts do not depend on the machine.

    .venv/bin/python bench/tree_speedup.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=704)


def reasoning_conversations(turns: int, count: int = 4) -> list[dict]:
    from onepass.demo.tiny import random_conversations

    records = random_conversations(count, seed=turns, max_turns=turns)
    out = []
    for record in records:
        messages = record["messages"]
        while sum(m["role"] == "assistant" for m in messages) < turns:
            messages = messages + messages[-2:]
        messages = [m for m in messages if m["role"] != "system"][:2 * turns]
        for message in messages:
            if message["role"] == "assistant":
                message["reasoning_content"] = "Let me think. " + message["content"][:120]
        out.append({"messages": messages})
    return out


def examples_for(records: list[dict], tokenizer, policy: str) -> list:
    from onepass.data.chat_template import load_chat_template
    from onepass.data.formats import to_conversation
    from onepass.data.prepare import render_all
    from onepass.data.types import Record, RenderOptions

    conversations = [to_conversation(Record("b", f"line {i}", r), "messages") for i, r in enumerate(records)]
    examples, _ = render_all(conversations, tokenizer, load_chat_template(tokenizer, "qwen3"),
                             RenderOptions(unstable_history=policy))
    return examples


def seconds_per_pass(model, examples, backward: bool, repeats: int = 3, head_loss=None) -> float:
    import torch

    from onepass.train.batch import collate
    from onepass.train.loss import sft_loss

    batch = collate(examples)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            loss, _ = sft_loss(model, batch, max(batch.units, 1.0),
                               **({} if head_loss is None else {"head_loss": head_loss}))
            if backward:
                loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    import torch

    from onepass import accel
    from onepass.demo.tiny import build_model, build_tokenizer
    from onepass.train.attention import use_packed_attention

    torch.set_num_threads(1)
    results = {"reasoning": {}, "ranking": {}}
    with tempfile.TemporaryDirectory() as temp:
        tokenizer = build_tokenizer(Path(temp), vocab_size=1024)
        model = use_packed_attention(build_model(None, vocab_size=len(tokenizer), **MODEL))
        head_loss = accel.install(model, accel.choose("auto", "cpu", False, False)).head_loss  # as a run installs
        for turns in (2, 4, 8):
            records = reasoning_conversations(turns)
            row = {}
            for policy in ("tree", "split", "warn"):
                examples = examples_for(records, tokenizer, policy)
                row[policy] = {"examples": len(examples), "tokens": sum(len(e) for e in examples),
                               "seconds": seconds_per_pass(model, examples, backward=True, head_loss=head_loss)}
            row["tree_vs_split_tokens"] = row["split"]["tokens"] / row["tree"]["tokens"]
            row["tree_vs_split_time"] = row["split"]["seconds"] / row["tree"]["seconds"]
            results["reasoning"][f"K={turns}"] = row
            print(f"reasoning K={turns}: tree {row['tree']['tokens']:,} tokens {row['tree']['seconds']:.3f} s | "
                  f"split {row['split']['tokens']:,} tokens {row['split']['seconds']:.3f} s | full render "
                  f"{row['warn']['tokens']:,} tokens | split/tree: tokens {row['tree_vs_split_tokens']:.2f}x, "
                  f"time {row['tree_vs_split_time']:.2f}x")
        for count in (2, 4, 16):
            results["ranking"][f"N={count}"] = row = ranking(model, tokenizer, count)
            print(f"ranking N={count}: tree {row['tree']['tokens']:,} tokens {row['tree']['seconds']:.3f} s | "
                  f"separate {row['separate']['tokens']:,} tokens {row['separate']['seconds']:.3f} s | "
                  f"tokens {row['tokens_ratio']:.2f}x, time {row['time_ratio']:.2f}x")
    out = Path("bench/results/tree_speedup.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def ranking(model, tokenizer, count: int) -> dict:
    """8 prompts, each with the same `count` candidate completions: one tree per prompt vs one pass each."""
    import numpy as np

    from onepass.data.chat_template import load_chat_template
    from onepass.data.tree import tree_example
    from onepass.data.types import Example
    from onepass.demo.tiny import random_conversations
    from onepass.score.scoring import candidate_tree, candidate_conversations

    template = load_chat_template(tokenizer, "chatml")
    prompts = [r["messages"][0]["content"] for r in random_conversations(8, seed=count)]
    completions = [r["messages"][1]["content"] for r in random_conversations(count, seed=100 + count)]
    trees, separate = [], []
    for prompt in prompts:
        row = {"prompt": [{"role": "user", "content": prompt}], "completions": completions}
        tree = candidate_tree(candidate_conversations(row, "b", "line 1"), tokenizer, template)
        trees.append(tree_example(tree))
        for nodes, trained in zip(tree.paths, tree.trained_on_path):
            ids = tree.input_ids[nodes]
            separate.append(Example(ids, trained.astype(np.int8), np.zeros(len(ids), np.int32)))
    result = {"tree": {"tokens": sum(len(t) for t in trees), "seconds": seconds_per_pass(model, trees, False)},
              "separate": {"tokens": sum(len(e) for e in separate),
                           "seconds": seconds_per_pass(model, separate, False)}}
    result["tokens_ratio"] = result["separate"]["tokens"] / result["tree"]["tokens"]
    result["time_ratio"] = result["separate"]["seconds"] / result["tree"]["seconds"]
    return result


if __name__ == "__main__":
    sys.exit(main())
