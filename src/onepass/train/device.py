"""Where and in what precision a process computes: its device, whether it runs bf16 autocast, and the
autocast context. A leaf: every other training module may import it, it imports none of them."""

from __future__ import annotations

from typing import Any, Literal

import torch

from onepass.compat import cpu_has_fast_bf16

Precision = Literal["auto", "fp32", "bf16"]


def default_device() -> torch.device:
    """The device one process computes on: CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def uses_bf16(precision: Precision, device: torch.device) -> bool:
    """`auto` is bf16 autocast (fp32 master weights) on CUDA and on CPUs with AMX or AVX512-BF16, fp32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def compute_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if uses_bf16(precision, device) else torch.float32


def describe_precision(precision: Precision, device: torch.device) -> str:
    """One line for the start of a run: what `precision` means on this device."""
    if not uses_bf16(precision, device):
        return f"precision: fp32 on {device.type}" + (" (auto: no bf16 matrix units found)" if precision == "auto" else "")
    why = " (auto: CUDA)" if device.type == "cuda" else " (auto: this CPU has AMX or AVX512-BF16)"
    return f"precision: bf16 autocast with fp32 weights on {device.type}" + (why if precision == "auto" else "")


def autocast(precision: Precision, device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))
