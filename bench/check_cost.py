"""What the start-up check costs: `check_packing` (train.check) on SmolLM2-135M-Instruct on this machine,
five times after one load, in fp32 as the check runs, with the packing it chose and its difference.

    .venv/bin/python bench/check_cost.py [--out bench/results/check_cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/check_cost.json")
    args = parser.parse_args()
    from onepass import api
    from onepass.demo.smollm2 import smollm2
    from onepass.train.model import load_model

    started = time.perf_counter()
    model = load_model(smollm2(), "cpu")
    load_seconds = time.perf_counter() - started
    runs = [api.check(model).to_json() for _ in range(args.repeats)]  # as `onepass check` runs it
    result = {"model": "SmolLM2-135M-Instruct", "machine": platform.processor() or platform.machine(),
              "load_seconds": load_seconds, "check_seconds": [run["seconds"] for run in runs],
              "packing": runs[-1]["packing"], "max_difference_nats": runs[-1]["max_difference"],
              "prefix_consistent": runs[-1]["prefix_consistent"],
              "prefix_difference_nats": runs[-1]["prefix_difference"]}
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
