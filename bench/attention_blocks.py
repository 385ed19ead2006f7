"""Why short attention blocks run as two bf16 matmuls under bf16 on the CPU: forward + backward over 1,024
tokens cut into n blocks of L (causal, 9 query heads and 3 key/value heads of 64: SmolLM2-135M's shape),
per block length, for SDPA (flash) in bf16 and in fp32 and for onepass's grouped matmul attention in bf16,
with the probabilities the latter keeps for the backward pass (MiB a layer). onepass's packed attention
takes the matmuls up to `accel/grouped_attention.py`'s `CPU_MATH_MAX_KEYS` keys.

    .venv/bin/python bench/attention_blocks.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def seconds(blocks: int, length: int, dtype, grouped: bool = False, repeats: int = 5) -> float:
    import torch
    import torch.nn.functional as F

    from onepass.accel.grouped_attention import attention as grouped_attention

    q, k, v = (torch.randn(blocks, heads, length, 64, dtype=dtype, requires_grad=True) for heads in (9, 3, 3))

    def attend():
        if grouped:
            return grouped_attention(q, k, v, torch.ones(length, length, dtype=torch.bool).tril(), None)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    for _ in range(2):
        attend().sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        attend().sum().backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    import torch

    from onepass.compat import keep_freed_memory
    from onepass.accel.grouped_attention import CPU_MATH_MAX_KEYS

    keep_freed_memory()  # as a training run does: each repeat re-allocates the same tensors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/attention_blocks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"block length  blocks  flash bf16 ms  flash fp32 ms  matmuls bf16 ms  kept MiB   "
          f"(matmuls up to {CPU_MATH_MAX_KEYS} keys)")
    for length in (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 1024):
        blocks = max(1, 1024 // length)
        bf16, fp32 = seconds(blocks, length, torch.bfloat16), seconds(blocks, length, torch.float32)
        grouped = seconds(blocks, length, torch.bfloat16, grouped=True)
        kept = blocks * 9 * length * length * 2 / 2**20  # bf16 probabilities, one layer
        rows.append({"length": length, "blocks": blocks, "bf16_ms": bf16 * 1e3, "fp32_ms": fp32 * 1e3,
                     "grouped_bf16_ms": grouped * 1e3, "grouped_kept_mib": kept})
        print(f"{length:12d} {blocks:7d} {bf16 * 1e3:14.1f} {fp32 * 1e3:14.1f} {grouped * 1e3:16.1f} {kept:9.1f}")
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
