"""Where a training step's time goes, on the real model: torch.profiler over a few onepass steps
(SmolLM2-135M-Instruct, packed rows of 512 tokens, 2 threads), CPU time by category: matmuls,
attention, elementwise/norm/rotary/activation, casts, loss (output layer + cross-entropy), optimizer,
and everything else (Python, collate, framework overhead = wall time not inside an op).

    .venv/bin/python bench/profile_step.py [--precision bf16|fp32] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_model import onepass_run, setup  # noqa: E402  (the same model, data and run as the real-model benchmark)

CATEGORIES = (  # first match wins; op names as torch.profiler reports them
    ("attention", ("scaled_dot_product", "_flash_attention", "attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "onednn", "mkldnn")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "_log_softmax")),
    ("optimizer", ("adam", "_foreach", "Optimizer.step")),
    ("cast", ("aten::to", "aten::_to_copy", "aten::copy_")),
    ("elementwise/norm/rotary", ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu",
                                 "aten::neg", "aten::cat", "aten::cos", "aten::sin", "aten::div", "aten::sum",
                                 "aten::tanh", "aten::sub")),
)


def category(name: str) -> str:
    return next((label for label, keys in CATEGORIES if any(k.lower() in name.lower() for k in keys)), "other ops")


def main() -> None:
    from onepass import allocator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    # the allocator `onepass train` runs on (ONEPASS_ALLOCATOR=system: glibc's); before torch is imported
    allocator.restart_on_mimalloc()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from onepass.train.step import train_step

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        model_dir = setup(work, 40)
        run = onepass_run(work, model_dir, args.precision)
        batches = [run.plan.step_batches(step) for step in range(args.steps + 1)]
        train_step(run.objective, run.optimizer, run.scheduler, batches[0], run.step_options)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            for micro_batches in batches[1:]:
                train_step(run.objective, run.optimizer, run.scheduler, micro_batches, run.step_options)
            wall = time.perf_counter() - start
    seconds = Counter()
    for event in profiler.key_averages():
        if event.key.startswith("aten::") or "Optimizer" in event.key:
            seconds[category(event.key)] += event.self_cpu_time_total / 1e6
    # ops' self times (on the thread that runs them) are disjoint; the rest of the wall time is outside
    # any op: Python, collate, framework overhead
    seconds["python/collate/overhead (wall - ops)"] = max(wall - sum(seconds.values()), 0.0)
    rows = {name: round(value, 3) for name, value in seconds.most_common()}
    print(f"{args.precision}: {args.steps} steps, {wall:.1f} s wall; seconds by category:")
    for name, value in rows.items():
        print(f"  {name:40s} {value:8.2f}  {value / wall:6.1%}")
    out = Path(args.out or f"bench/results/profile_step_{args.precision}.json")
    out.write_text(json.dumps({"precision": args.precision, "allocator": allocator.active(), "steps": args.steps,
                               "wall_seconds": wall,
                               "cpu_seconds_by_category": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
