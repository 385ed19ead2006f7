"""Casts under autocast: what bf16 autocast would cast again at every use, cast once.

Autocast casts each matmul's fp32 input on its own. After a decoder layer's norm, the query, key and
value projections (and then the gate and up projections) each cast the same fp32 tensor to bf16, and
each keeps its own copy for the backward pass. The rotary tables come out of the model's rotary module
in fp32 (the residual stream's dtype), so the rotation of the bf16 queries and keys runs in fp32 and
autocast casts the result back down before attention. `cast_once(model)` makes the projections share
one cast of their input (the same rounding as autocast's, so the forward pass is unchanged; the input's
gradient contributions are summed in bf16 before the cast's backward) and hands the rotary tables over
in the compute dtype, as a model loaded in bf16 has them. Outside autocast, and inside a graph that
torch.compile traces, both hooks do nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

HOOKED = "_onepass_cast_once"


def _autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast this fp32 tensor to, or None when it would not."""
    device = tensor.device.type
    if tensor.dtype != torch.float32 or not torch.is_autocast_enabled(device) or torch.compiler.is_compiling():
        return None  # a compiled graph shares repeated casts by itself
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != torch.float32 else None


class SharedInputCast:
    """A forward pre-hook for linear layers: consecutive layers that read the same fp32 tensor get one
    autocast-dtype copy of it. Only weak references are kept: the copy lives as long as the autograd
    graph (or a consumer) holds it, and a tensor changed in place since (its version) is cast again."""

    def __init__(self) -> None:
        self._source: weakref.ref | None = None
        self._cast: weakref.ref | None = None
        self._version = -1

    def __call__(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        source = args[0]
        dtype = _autocast_dtype(source)
        if dtype is None:
            return None
        cast = self._cast() if self._cast is not None else None
        same = self._source is not None and self._source() is source and self._version == source._version
        if not (same and cast is not None and cast.dtype == dtype):
            cast = source.to(dtype)
            self._source, self._cast, self._version = weakref.ref(source), weakref.ref(cast), source._version
        return (cast, *args[1:])


def _rotary_in_compute_dtype(module: Any, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook for rotary-embedding modules: their (cos, sin) tables in the autocast dtype."""
    if not isinstance(output, tuple) or not all(isinstance(t, torch.Tensor) for t in output):
        return None
    dtypes = [_autocast_dtype(t) for t in output]
    if any(dtype is None for dtype in dtypes):
        return None
    return tuple(t.to(dtype) for t, dtype in zip(output, dtypes))


def is_rotary(module: Any) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding")


def share_input_casts(model: Any) -> Any:
    """One `SharedInputCast` on every linear layer of `model`."""
    shared = SharedInputCast()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(shared)
    return model


def cast_once(model: Any) -> Any:
    """Install both hooks on every linear layer and rotary-embedding module of `model` (once)."""
    if getattr(model, HOOKED, False):
        return model
    share_input_casts(model)
    for module in model.modules():
        if is_rotary(module):
            module.register_forward_hook(_rotary_in_compute_dtype)
    setattr(model, HOOKED, True)
    return model
