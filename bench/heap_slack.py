"""How much of a CPU run's peak is the allocator's slack, on glibc's malloc: the real-model run of
bench/real_model.py (SmolLM2-135M-Instruct, ~1,000 tokens a step), with glibc's own counters
(`mallinfo2`) sampled every millisecond through the steps. Reported: the most memory malloc had handed
out at once, the most it held from the system (heap and mappings), and the process's peak RSS. The
difference between the first two is free memory between live blocks. This script runs on the C
library's malloc on purpose (it reads glibc's counters), whatever ONEPASS_ALLOCATOR says.

    .venv/bin/python bench/heap_slack.py [--precision bf16|fp32] [--steps 20]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_model import onepass_run, setup  # noqa: E402

MIB = 2 ** 20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        raise SystemExit("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = MallInfo2
    import torch

    from onepass import allocator
    from onepass.train.step import train_step

    if allocator.active() != "system":
        raise SystemExit("run this under the C library's malloc (unset LD_PRELOAD)")
    torch.set_num_threads(2)
    peaks = {"in_use": 0.0, "held": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            info = libc.mallinfo2()
            peaks["in_use"] = max(peaks["in_use"], (info.uordblks + info.hblkhd) / MIB)
            peaks["held"] = max(peaks["held"], (info.arena + info.hblkhd) / MIB)
            time.sleep(0.001)

    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        run = onepass_run(work, setup(work, 160), args.precision)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for step in range(args.steps):
            train_step(run.objective, run.optimizer, run.scheduler, run.plan.step_batches(step), run.step_options)
        done.set()
        sampler.join()
    result = {"precision": args.precision, "steps": args.steps, "malloc_in_use_peak_mib": peaks["in_use"],
              "malloc_held_peak_mib": peaks["held"], "free_between_live_blocks_mib": peaks["held"] - peaks["in_use"],
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"{args.precision}, {args.steps} steps on glibc's malloc: at most {peaks['in_use']:,.0f} MiB in use at "
          f"once, {peaks['held']:,.0f} MiB held from the system, peak RSS {result['peak_rss_mib']:,.0f} MiB")
    out = Path(args.out or f"bench/results/heap_slack_{args.precision}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
