"""Casts under autocast: what bf16 autocast would cast again at every use, cast once.

Autocast casts each matmul's fp32 input on its own. After a decoder layer's norm, the query, key and
value projections (and then the gate and up projections) each cast the same fp32 tensor to bf16, and
each keeps its own copy for the backward pass. The rotary tables come out of the model's rotary module
in fp32 (the residual stream's dtype), so the rotation of the bf16 queries and keys runs in fp32 and
autocast casts the result back down before attention. `cast_once(model)` makes the projections share
one cast of their input (the same rounding as autocast's, so the forward pass is unchanged; the input's
gradient contributions are summed in bf16 before the cast's backward) and hands the rotary tables over
in the compute dtype, as a model loaded in bf16 has them.

Autocast also keeps each linear layer's bf16 weight copy for the backward pass: a bf16 copy of the
whole model lives from the forward pass to the end of backward. `recast_weights(model)` makes linear
layers keep their fp32 weight (the parameter itself, no copy) and cast it again in backward
(`RecastLinearFunction`): the same matmuls on the same bf16 values, one more cast per layer, and no
bf16 copy of the weights kept through the step (bench/memory.py measures it, with the lean
activations of accel/lean_activations.py). Outside autocast, and inside a graph that torch.compile
traces, all of these do nothing.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F



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


class RecastLinearFunction(torch.autograd.Function):
    """F.linear of a compute-dtype input with the weight (and bias) cast to that dtype, as autocast
    runs it, keeping the input and the weight as it is; backward casts the weight again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        return linear_backward(grad, x, weight, ctx.has_bias, ctx.needs_input_grad)


def linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                    needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """The gradients of F.linear(x, weight.to(x.dtype), bias) for x, the weight and the bias (each where
    `needs` says), the weight's and bias's in the weight's dtype, with autograd's matmuls."""
    grad_rows = grad.reshape(-1, grad.shape[-1])
    grad_x = grad.matmul(weight.to(x.dtype)) if needs[0] else None
    grad_weight = grad_rows.t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype) if needs[1] else None
    grad_bias = grad_rows.sum(0).to(weight.dtype) if has_bias and needs[2] else None
    return grad_x, grad_weight, grad_bias


def _recast_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    dtype = _autocast_dtype(self.weight)
    if dtype is None or not torch.is_grad_enabled():
        return torch.nn.Linear.forward(self, x)
    return RecastLinearFunction.apply(x.to(dtype), self.weight, self.bias)


def recast_weights(model: Any) -> Any:
    """Every plain linear layer of `model` keeps its fp32 weight for backward instead of autocast's copy."""
    _recast_weights(model)
    return model


def _recast_weights(model: Any) -> list[Any]:
    changed = [module for module in model.modules() if type(module) is torch.nn.Linear
               and "forward" not in module.__dict__]
    for module in changed:
        module.forward = types.MethodType(_recast_forward, module)
    return changed


def is_rotary(module: Any) -> bool:
    """A rotary embedding: a module holding an `inv_freq` buffer, as every transformers rotary embedding
    keeps its frequencies (whatever the class is called)."""
    return isinstance(module, torch.nn.Module) and isinstance(getattr(module, "inv_freq", None), torch.Tensor) \
        and "inv_freq" in dict(module.named_buffers(recurse=False))


def share_input_casts(model: Any) -> Any:
    """One `SharedInputCast` on every linear layer of `model`."""
    _share_input_casts(model)
    return model


def _share_input_casts(model: Any) -> list[Any]:
    shared = SharedInputCast()
    return [module.register_forward_pre_hook(shared) for module in model.modules()
            if isinstance(module, torch.nn.Linear)]


def shares_input_casts(model: Any) -> bool:
    """Whether the linear layers of `model` share their input casts (`cast_once` is installed)."""
    return any(isinstance(hook, SharedInputCast) for module in model.modules() if isinstance(module, torch.nn.Linear)
               for hook in module._forward_pre_hooks.values())


def cast_once(model: Any, recast: bool = True) -> Callable[[], None]:
    """Install the shared input casts (and with `recast` the weight recast) on every linear layer, and
    the rotary hook on every rotary-embedding module of `model` (once); what takes them out again."""
    if shares_input_casts(model):
        return lambda: None
    handles = _share_input_casts(model)
    recast_modules = _recast_weights(model) if recast else []
    handles += [module.register_forward_hook(_rotary_in_compute_dtype) for module in model.modules()
                if is_rotary(module)]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        for module in recast_modules:
            module.__dict__.pop("forward", None)
    return undo
