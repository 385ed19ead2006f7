"""Why short attention blocks run in fp32 under bf16 on the CPU: SDPA forward + backward over 1,024 tokens
cut into n blocks of L (causal, 9 query heads and 3 key/value heads of 64: SmolLM2-135M's shape), in bf16
and in fp32, per block length. onepass's packed attention switches at `model.CPU_BF16_MIN_KEYS`.

    .venv/bin/python bench/attention_blocks.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def seconds(blocks: int, length: int, dtype, repeats: int = 5) -> float:
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(blocks, heads, length, 64, dtype=dtype, requires_grad=True) for heads in (9, 3, 3))
    for _ in range(2):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    import torch

    from onepass.train.model import CPU_BF16_MIN_KEYS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/attention_blocks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"block length  blocks   bf16 ms   fp32 ms  bf16/fp32   (fp32 below {CPU_BF16_MIN_KEYS} keys)")
    for length in (16, 32, 64, 128, 256, 384, 512, 1024):
        blocks = max(1, 1024 // length)
        bf16, fp32 = seconds(blocks, length, torch.bfloat16), seconds(blocks, length, torch.float32)
        rows.append({"length": length, "blocks": blocks, "bf16_ms": bf16 * 1e3, "fp32_ms": fp32 * 1e3})
        print(f"{length:12d} {blocks:7d} {bf16 * 1e3:9.1f} {fp32 * 1e3:9.1f} {bf16 / fp32:10.2f}")
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
