"""Packed attention under bf16 on the CPU: blocks of up to `CPU_MATH_MAX_KEYS` keys attend as two
grouped bf16 matmuls instead of SDPA. The CPU's bf16 flash kernel costs several times its fp32 one on
short blocks, and both cost more than the matmuls (bench/attention_blocks.py); longer blocks keep
flash attention, which keeps no (queries × keys) probabilities. An acceleration (onepass.accel):
`install` puts a model on the packed attention with `block` as its block attention (registered with
transformers under its own name), and `block` asks `applies` per block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

CPU_MATH_MAX_KEYS = 256
SUFFIX = "_grouped"  # the packed attention's name with this block attention: onepass_packed_grouped


def runs_in_bf16(*tensors: Any) -> bool:
    """Would attention run in bf16 here (a bf16 input, or bf16 autocast, which casts fp32 inputs down)?"""
    return any(t.dtype == torch.bfloat16 for t in tensors) or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def applies(query: Any, key: Any, value: Any, dropout: float) -> bool:
    """A short block in bf16 on the CPU, without dropout."""
    return query.device.type == "cpu" and key.shape[2] <= CPU_MATH_MAX_KEYS and dropout == 0.0 \
        and runs_in_bf16(query, key, value)


def block(query: Any, key: Any, value: Any, mask: Any, scaling: float | None, dropout: float) -> Any:
    """The packed attention's block attention with this acceleration: `attention` where it `applies`,
    the stock `sdpa_block` elsewhere (`mask` None: causal over as many keys as queries)."""
    from onepass.train.attention import _causal_mask, sdpa_block

    if not applies(query, key, value, dropout):
        return sdpa_block(query, key, value, mask, scaling, dropout)
    if mask is None:
        mask = _causal_mask(query.shape[2], key.shape[2], None, query.device)
    return attention(query, key, value, mask, scaling)


def attention(query: Any, key: Any, value: Any, mask: Any, scaling: float | None) -> Any:
    """Causal attention in bf16 as two batched matmuls (`mask`: queries × keys, True where seen): the query
    heads that share a key/value head are stacked as rows of one product (grouped-query attention without
    copying keys and values), the softmax runs over the whole (rows × keys) block, and autograd keeps the
    bf16 probabilities (tokens × heads × keys × 2 bytes a layer) for the backward pass."""
    with torch.autocast("cpu", enabled=False):
        n, heads, queries, dim = query.shape
        groups = key.shape[1]
        scale = scaling if scaling is not None else dim ** -0.5
        rows = (query.to(torch.bfloat16) * scale).reshape(n, groups, heads // groups * queries, dim)
        scores = rows @ key.to(torch.bfloat16).transpose(-1, -2)
        probabilities = scores.masked_fill_(~mask.repeat(heads // groups, 1), float("-inf")).softmax(-1)
        return (probabilities @ value.to(torch.bfloat16)).view(n, heads, queries, dim)


def install(model: Any) -> Callable[[], None]:
    """Put a model that runs onepass's packed attention on the variant with `block`; what undoes it."""
    from onepass.compat import attention_implementation, base_model
    from onepass.train.attention import PACKED_ATTENTION, register_packed_attention

    grouped = register_packed_attention(SUFFIX, block)
    base = base_model(model)
    if attention_implementation(base) != PACKED_ATTENTION:  # flash, or one conversation per forward: nothing to do
        return lambda: None
    base.set_attn_implementation(grouped)

    def undo() -> None:
        if attention_implementation(base) == grouped:
            base.set_attn_implementation(PACKED_ATTENTION)
    return undo
