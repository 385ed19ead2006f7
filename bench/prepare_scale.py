"""Data preparation at scale: conversations/s, peak memory, and a training run's start-up on the cache.

Synthetic 1-4-turn conversations (the demo's generator), the demo's byte-level tokenizer, `prepare`
with the machine's cores as workers, into a fresh cache; each size in a fresh process, whose peak
resident memory (and its workers') is read from getrusage. Then, on that cache, what a training run
does before its first step with the data: load the entry and plan the epoch (StepPlan).

    .venv/bin/python bench/prepare_scale.py [--conversations 100000,1000000] [--out bench/results/prepare_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
stage, data, tokenizer_dir, cache = sys.argv[1:5]
from onepass.data.chat_template import load_chat_template
from onepass.data.prepare import prepare
from onepass.data.tokenizer import load_tokenizer
from onepass.data.types import RenderOptions
tokenizer = load_tokenizer(tokenizer_dir)
template = load_chat_template(tokenizer, "chatml")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
prepared = prepare([data], tokenizer, template, RenderOptions(max_seq_len=4096), cache_dir=cache, progress=False)
result = {"from_cache": prepared.from_cache, "examples": len(prepared.examples), "tokens": prepared.stats.tokens}
if stage == "start":
    from onepass.train.plan import StepPlan
    plan = StepPlan(prepared.examples, 4096, 4, 1, 0, "token")
    result["steps_per_epoch"] = plan.steps_per_epoch
result["seconds"] = time.perf_counter() - start
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result["rss_before_mib"] = before / 1024
result["workers_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(result))
"""


def write_conversations(path: Path, count: int) -> None:
    from onepass.demo.tiny import random_conversations

    with path.open("w") as handle:
        for start in range(0, count, 10_000):
            batch = random_conversations(min(10_000, count - start), seed=start, max_turns=4)
            handle.writelines(json.dumps(r) + "\n" for r in batch)


def child(stage: str, data: Path, tokenizer_dir: Path, cache: Path) -> dict:
    output = subprocess.run([sys.executable, "-c", CHILD, stage, str(data), str(tokenizer_dir), str(cache)],
                            capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", default="100000,1000000")
    parser.add_argument("--out", default="bench/results/prepare_scale.json")
    args = parser.parse_args()
    from onepass.demo.tiny import build_tokenizer
    from onepass.data.prepare import default_workers

    results = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "workers": default_workers(), "sizes": []}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tokenizer_dir = work / "tokenizer"
        build_tokenizer(tokenizer_dir)
        for count in (int(n) for n in args.conversations.split(",")):
            data = work / f"conversations-{count}.jsonl"
            write_conversations(data, count)
            cache = work / f"cache-{count}"
            prepared = child("prepare", data, tokenizer_dir, cache)
            started = child("start", data, tokenizer_dir, cache)
            row = {"conversations": count, "file_mib": data.stat().st_size / 2**20,
                   "prepare_seconds": prepared["seconds"], "conversations_per_sec": count / prepared["seconds"],
                   "tokens_per_sec": prepared["tokens"] / prepared["seconds"],
                   "prepare_peak_rss_mib": prepared["peak_rss_mib"],
                   "prepare_workers_peak_rss_mib": prepared["workers_peak_rss_mib"],
                   "start_seconds": started["seconds"], "start_peak_rss_mib": started["peak_rss_mib"],
                   "start_rss_before_mib": started["rss_before_mib"], "examples": started["examples"],
                   "tokens": prepared["tokens"], "steps_per_epoch": started["steps_per_epoch"]}
            print(json.dumps(row), flush=True)
            results["sizes"].append(row)
            data.unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
