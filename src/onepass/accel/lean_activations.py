"""Activations a decoder layer keeps for the backward pass: fewer of them, the same gradients.

Autograd keeps every intermediate some backward formula reads. In a Llama-style layer that is, per
token: the RMSNorm's fp32 input and its fp32 normalised output (the weight's gradient reads the
latter), twice per layer; and in the SwiGLU MLP the gate and up projections' outputs, SiLU's output,
their product (the down projection's input) and the down projection's weight in the compute dtype
(autocast's bf16 copy). Each is cheap to make again from fewer tensors:

- `RMSNormFunction` keeps the input and one fp32 scale per token, and recomputes the normalised
  output in backward (half the norm's saved bytes);
- `SwiGLUFunction` runs silu(gate) * up and the down projection as one function that keeps the gate
  and up outputs and the down weight as it is (fp32 master weight: no second copy), and recomputes
  SiLU, the product and the weight's cast in backward (from four (tokens x intermediate) tensors and a
  weight copy to two).

The backward formulas are autograd's own (`aten.silu_backward`, the same matmuls and the same roundings
to the input's dtype), so gradients agree with the modules' autograd to float rounding
(tests/accel/test_lean_activations.py); forward outputs are bit-identical. bench/memory.py measures the
peak memory they save (docs/speed.md). `lean_activations(model)` installs both on the modules whose code is the Llama
formula (compared by bytecode, so the ~140 transformers classes that copy it qualify, and a norm that
differs, e.g. Gemma's 1 + weight, does not) and whose MLP activation is SiLU over plain linear layers
(a LoRA-wrapped projection keeps the module's own forward). Inside a graph torch.compile traces, both
stand aside: the compiler chooses what to recompute by itself.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from onepass.accel.cast_once import linear_backward



class RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x²) + eps)) in fp32, as transformers' Llama RMSNorm computes it,
    keeping x and the per-token scale instead of x and the fp32 normalised output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, scale)
        return weight * (x32 * scale).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, scale = ctx.saved_tensors
        normalised = x.to(torch.float32) * scale
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normalised.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        # autograd rounds the normalised output's gradient to the input's dtype before the fp32 norm
        grad_normalised = (grad * weight).to(x.dtype).to(torch.float32)
        grad_x = scale * (grad_normalised - normalised * (grad_normalised * normalised).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    """down(silu(gate) * up) with the down projection's weight cast to the activations' dtype here
    (autocast's cast) and again in backward, keeping only gate, up and the weight itself."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        with torch.autocast(gate.device.type, enabled=False):
            return F.linear(F.silu(gate) * up, weight.to(gate.dtype), None if bias is None else bias.to(gate.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, weight = ctx.saved_tensors
        activation = F.silu(gate)
        needs = ctx.needs_input_grad
        grad_product, grad_weight, grad_bias = linear_backward(grad, activation * up, weight, ctx.has_bias,
                                                               (True, needs[2], needs[3]))
        grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate) if needs[0] else None
        grad_up = grad_product * activation if needs[1] else None
        return grad_gate, grad_up, grad_weight, grad_bias


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Inside the block, counts the bytes autograd keeps for backward: each storage once, `parameters`
    (kept anyway) left out. For tests and bench/memory.py; it keeps no tensor alive."""

    def __init__(self, parameters: Any = ()) -> None:
        self._parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self._storages: dict[int, int] = {}
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameters:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self._storages.values())


def _code(function: Any) -> tuple[Any, ...]:
    code = function.__code__
    return code.co_code, code.co_consts, code.co_names


def _llama_forwards() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    from transformers.models.llama import modeling_llama

    return _code(modeling_llama.LlamaRMSNorm.forward), _code(modeling_llama.LlamaMLP.forward)


def _is_silu(module: Any) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(module, (torch.nn.SiLU, SiLUActivation))


def _plain_linear(module: Any) -> bool:
    return type(module) is torch.nn.Linear


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    if torch.compiler.is_compiling() or not _plain_linear(down):
        return type(self).forward(self, x)
    return SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x), down.weight, down.bias)


def installed_modules(model: Any) -> list[Any]:
    """The modules of `model` that run a lean forward."""
    return [module for module in model.modules()
            if getattr(module.__dict__.get("forward"), "__func__", None) in (_norm_forward, _mlp_forward)]


def lean_activations(model: Any) -> Callable[[], None]:
    """Install `RMSNormFunction` and `SwiGLUFunction` on the modules of `model` that compute exactly
    what they replace (those that have them already are left as they are); what takes them out again."""
    norm_code, mlp_code = _llama_forwards()
    changed = []
    for module in model.modules():
        if "forward" in module.__dict__:  # a forward of its own already (this one's, or another's): left alone
            continue
        forward = getattr(type(module), "forward", None)
        if forward is None or not hasattr(forward, "__code__"):
            continue
        if _code(forward) == norm_code and isinstance(getattr(module, "weight", None), torch.Tensor) \
                and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
            changed.append(module)
        elif _code(forward) == mlp_code and _is_silu(getattr(module, "act_fn", None)) \
                and all(_plain_linear(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_mlp_forward, module)
            changed.append(module)

    def undo() -> None:
        for module in changed:
            module.__dict__.pop("forward", None)
    return undo
