"""Where onepass leans on another library's private API or on a version difference: here, and only
here, each with a test (tests/test_compat.py), so an upgrade that breaks one fails in one place."""

from __future__ import annotations

import inspect
from typing import Any


def compile_jinja_template(source: str) -> Any:
    """A chat template compiled in transformers' own Jinja environment (its filters, `raise_exception`,
    `tojson`), as `apply_chat_template` does; cached by transformers."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


def distributed_store() -> Any:
    """The key-value store of the default process group (torch has no public accessor)."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def ddp_without_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel's keyword that turns off syncing buffers in forward (renamed in newer torch)."""
    from torch.nn.parallel import DistributedDataParallel

    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if newer else "broadcast_buffers": False}


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (transformers >= 5.20 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16): there bf16 autocast
    is several times faster than fp32. torch's own checks are private; /proc/cpuinfo is the fallback."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
