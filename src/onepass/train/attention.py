"""Packed attention: how the conversations of a packed row attend, each to itself alone.

- The layout (`AttentionLayout`): worked out once per micro-batch on the CPU, so that no layer has to
  (no `cu_seq_lens.tolist()`, no per-layer Python loop over conversations). Sequences are grouped into
  buckets of similar length; a bucket is one attention call over its conversations stacked as a batch
  (n, H, L, D), each padded at its end to the bucket's longest. Causal attention never lets a real
  query see a padded key (padding comes after every real token), so the padding needs no mask and
  costs only the padded queries' attention, never a dense (row x row) mask. Trees keep their
  path-by-path attention (`tree.path_blocks`). One `take` index then puts every token's output back in
  row order.
- The kernel (`packed_sdpa_attention`, registered with transformers' AttentionInterface): follows the
  layout, with a block-attention function (`sdpa_block`, the stock one; an acceleration registers
  another under its own name).
- The packing mode a model runs in (`PACKED` rows, or `SEPARATE`: one conversation per forward), which
  is its attention implementation itself, and the switches between them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from onepass.compat import (attention_implementation, base_model, sdpa_takes_grouped_heads, supports_sdpa,
                            takes_attention_interface)
from onepass.data.tree import path_blocks
from onepass.errors import OnepassError
from onepass.train.model import device_of

log = logging.getLogger(__name__)

LAYOUT_KWARG = "onepass_layout"  # passed through the model's forward to the packed attention

# A bucket holds conversations at least this fraction of its longest one's length: padding at most
# doubles a bucket's tokens, and a row of L-token conversations needs about log2(longest/shortest) calls.
BUCKET_RATIO = 0.5


@dataclass(frozen=True)
class TreeBlocks:
    """How a tree's attention is computed (see `tree.path_blocks`): each root-to-leaf path's nodes and
    where the nodes it owns start, and the permutation that puts the owned nodes' outputs back in order."""

    paths: tuple[tuple[torch.Tensor, int], ...]
    inverse: torch.Tensor

    @classmethod
    def of(cls, parent: np.ndarray) -> TreeBlocks:
        blocks = path_blocks(parent)
        order = np.concatenate([nodes[start:] for nodes, start in blocks])
        return cls(tuple((torch.from_numpy(nodes), start) for nodes, start in blocks),
                   torch.from_numpy(np.argsort(order)))

    def to(self, device: torch.device | str) -> TreeBlocks:
        return TreeBlocks(tuple((nodes.to(device), start) for nodes, start in self.paths), self.inverse.to(device))


@dataclass(frozen=True)
class AttentionLayout:
    """buckets: per bucket, the row positions of its conversations' tokens (n, L), each conversation
    padded by repeating its last position; trees: (start, end, blocks) of each tree; take: where each
    row position's output lies in the bucket outputs (flattened, in order) followed by the trees'
    outputs. A row that is one sequence has one bucket and no `take` (its output is already in order)."""

    buckets: tuple[torch.Tensor, ...]
    trees: tuple[tuple[int, int, TreeBlocks], ...] = ()
    take: torch.Tensor | None = None

    @classmethod
    def of(cls, lengths: Sequence[int], trees: Sequence[TreeBlocks | None] = ()) -> AttentionLayout:
        """The layout of conversations of these lengths laid end to end (`trees[i]`: the i-th one's
        blocks if it is a tree)."""
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        trees = list(trees) + [None] * (len(lengths) - len(trees))
        sequences = [i for i in range(len(lengths)) if trees[i] is None]
        if len(sequences) == len(lengths) == 1:
            return cls((torch.arange(lengths[0])[None],))
        take = np.empty(int(starts[-1]), dtype=np.int64)
        buckets, offset = [], 0
        for members in _buckets(sequences, lengths):
            width = lengths[members[0]]
            index = np.empty((len(members), width), dtype=np.int64)
            for row, i in enumerate(members):
                positions = np.arange(starts[i], starts[i + 1])
                index[row] = np.concatenate([positions, np.full(width - len(positions), positions[-1])])
                take[positions] = offset + row * width + np.arange(len(positions))
            buckets.append(torch.from_numpy(index))
            offset += index.size
        tree_blocks = []
        for i in (i for i in range(len(lengths)) if trees[i] is not None):
            take[starts[i]:starts[i + 1]] = offset + np.arange(lengths[i])
            tree_blocks.append((int(starts[i]), int(starts[i + 1]), trees[i]))
            offset += lengths[i]
        return cls(tuple(buckets), tuple(tree_blocks), torch.from_numpy(take))

    def to(self, device: torch.device | str) -> AttentionLayout:
        return AttentionLayout(tuple(index.to(device) for index in self.buckets),
                               tuple((start, end, blocks.to(device)) for start, end, blocks in self.trees),
                               None if self.take is None else self.take.to(device))


def _buckets(members: list[int], lengths: Sequence[int]) -> list[list[int]]:
    """Conversations (indices) grouped longest first; a bucket takes the next ones while they are at
    least BUCKET_RATIO of its first's length."""
    buckets: list[list[int]] = []
    for i in sorted(members, key=lambda i: -lengths[i]):
        if buckets and lengths[i] >= BUCKET_RATIO * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


# --- Packed attention -------------------------------------------------------------------------
# Several conversations share one row of tokens; each must attend only to itself. Flash-attention
# varlen does this on CUDA when installed (transformers detects packing from position_ids). The
# portable path below follows the batch's `AttentionLayout`: conversations of similar length stacked
# into one SDPA call per bucket, trees path by path, so a packed row never costs a dense
# (sum L_i)^2 attention and no layer loops over conversations in Python.
PACKED_ATTENTION = "onepass_packed"  # registered in transformers' AttentionInterface; variants add a suffix


def is_packed_attention(name: str | None) -> bool:
    """onepass's packed attention, with the stock block attention or another one (`register_packed_attention`)."""
    return bool(name) and name.startswith(PACKED_ATTENTION)


def is_packing_attention(name: str | None) -> bool:
    """An attention that keeps the conversations of a packed row apart: onepass's, or flash-attention varlen."""
    return is_packed_attention(name) or name == "flash_attention_2"


def sdpa_block(query: Any, key: Any, value: Any, mask: Any, scaling: float | None, dropout: float) -> Any:
    """The stock block attention: SDPA, causal where `mask` is None (queries == keys), else under the
    (queries × keys) boolean mask, with grouped key/value heads where SDPA takes them."""
    import torch.nn.functional as F

    grouped = query.shape[1] != key.shape[1]
    if grouped and not sdpa_takes_grouped_heads(mask, key, value):  # as the model's own SDPA attention does
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = (repeat_kv(t, query.shape[1] // key.shape[1]) for t in (key, value))
        grouped = False
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                          scale=scaling, enable_gqa=grouped)


def packed_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          scaling: float | None = None, dropout: float = 0.0, block: Any = sdpa_block,
                          **kwargs: Any) -> tuple[Any, None]:
    """Attention within each conversation of a packed row (query/key/value: 1, H, T, D), as the model
    computes it: causal, with its sliding window and its attention-logit soft-capping. `block`: how one
    block of conversations attends (`sdpa_block`; an acceleration may register another)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = kwargs.get(LAYOUT_KWARG)
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    extras = {k: v for k, v in kwargs.items() if k in MODEL_EAGER_ONLY and v is not None}
    if layout is None and cu_seq_lens is None:  # generation and unpacked inputs: the mask transformers built
        if extras:
            return _model_eager(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **extras)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **{k: v for k, v in kwargs.items() if k in ("is_causal", "sliding_window")})
    if layout is None:  # varlen kwargs from elsewhere: work the layout out here (a device sync)
        layout = AttentionLayout.of(cu_seq_lens.diff().tolist()).to(query.device)
    attend = functools.partial(_attention, module, scaling=scaling, dropout=dropout if module.training else 0.0,
                               window=kwargs.get("sliding_window"), extras=extras, block=block)
    if layout.take is None:  # one sequence: nothing to gather
        return attend(query, key, value).transpose(1, 2).contiguous(), None
    rows = [tensor[0].transpose(0, 1) for tensor in (query, key, value)]  # (T, H, D) views
    outputs = []
    for index in layout.buckets:  # (n, L): n conversations padded to L, one call
        stacked = [row.index_select(0, index.flatten()).unflatten(0, index.shape).transpose(1, 2) for row in rows]
        outputs.append(attend(*stacked).transpose(1, 2).flatten(0, 1))
    for start, end, tree in layout.trees:
        outputs.append(_tree_attention(attend, *(t[:, :, start:end] for t in (query, key, value)), tree))
    return torch.cat(outputs).index_select(0, layout.take)[None], None


# Attention features SDPA cannot compute; where a model passes one, its own eager attention runs.
MODEL_EAGER_ONLY = ("softcap", "s_aux")


def _tree_attention(attend: Any, query: Any, key: Any, value: Any, tree: TreeBlocks) -> Any:
    """A tree's attention (1, H, L, D) → (L, H, D), path by path: each node once, on the path that owns
    it (see `tree.path_blocks`)."""
    outputs = [attend(query[:, :, nodes[start:]], key[:, :, nodes], value[:, :, nodes])
               for nodes, start in tree.paths if start < len(nodes)]
    return torch.cat(outputs, dim=2)[0, :, tree.inverse].transpose(0, 1)


def _attention(module: Any, query: Any, key: Any, value: Any, scaling: float | None, dropout: float,
               window: int | None, extras: dict[str, Any], block: Any = sdpa_block) -> Any:
    """Causal attention of the last queries over the keys (query i sits at key position i + keys -
    queries: a path's owned nodes over the whole path), within the sliding window if there is one."""
    queries, keys = query.shape[2], key.shape[2]
    mask = None
    if queries != keys or (window is not None and window < keys) or extras:
        mask = _causal_mask(queries, keys, window, query.device)
    if extras:  # key j is seen from query i where the mask is True; the model's eager attention adds it
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~mask, torch.finfo(query.dtype).min)[None, None]
        output, _ = _model_eager(module)(module, query, key, value, additive, dropout=dropout, scaling=scaling,
                                         **extras)
        return output.transpose(1, 2)
    return block(query, key, value, mask, scaling, dropout)


def _causal_mask(queries: int, keys: int, window: int | None, device: Any) -> Any:
    """(queries × keys) bool, True where query i (at key position i + keys - queries) sees key j:
    j at or before it, and within the sliding window if there is one."""
    distance = torch.arange(keys - queries, keys, device=device)[:, None] - torch.arange(keys, device=device)[None, :]
    return (distance >= 0) & (distance < window) if window is not None else distance >= 0


def _model_eager(module: Any) -> Any:
    """The eager attention function of the module's own modeling file (it handles the model's extras)."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise OnepassError(f"{type(module).__name__} uses an attention feature onepass's packed attention cannot "
                           "compute, and its modeling file has no eager_attention_forward to fall back on. Fix: "
                           "report it; such a model cannot be trained with packing yet.")
    return function


def register_packed_attention(suffix: str = "", block: Any = sdpa_block) -> str:
    """Register onepass's packed attention with transformers (with `block` attending each block of
    conversations, under the name PACKED_ATTENTION + suffix); the name."""
    from transformers import AttentionInterface

    name = PACKED_ATTENTION + suffix
    function = packed_sdpa_attention if block is sdpa_block else functools.partial(packed_sdpa_attention, block=block)
    AttentionInterface.register(name, function)
    return name


def choose_attention(device_type: str, compute_dtype: Any = torch.float32, model_class: type | None = None,
                     flash_available: Callable[[], bool] | None = None) -> str:
    """flash_attention_2 where `flash_refusal` finds nothing against it; onepass's packed SDPA otherwise."""
    if flash_refusal(device_type, compute_dtype, model_class, flash_available) is None:
        return "flash_attention_2"
    register_packed_attention()
    return PACKED_ATTENTION


def flash_refusal(device_type: str, compute_dtype: Any, model_class: type | None = None,
                  flash_available: Callable[[], bool] | None = None) -> str | None:
    """Why flash-attention varlen cannot run here, or None: it needs CUDA, bf16/fp16 compute (it refuses
    fp32), a flash-attn that transformers finds usable (its own check: version, not just an import),
    and a model class that supports it (`_supports_flash_attn`; 28 causal-LM classes of transformers
    5.25 do not) with no Hub kernel of its own in its place (gpt-oss's `_compatible_flash_implementations`)."""
    if device_type != "cuda":
        return "not on CUDA"
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return "it refuses fp32"
    if model_class is not None and not getattr(model_class, "_supports_flash_attn", False):
        return f"{model_class.__name__} does not support it"
    if model_class is not None and getattr(model_class, "_compatible_flash_implementations", None):
        return f"{model_class.__name__} would take a Hub kernel instead"
    if flash_available is None:
        from transformers.utils import is_flash_attn_2_available as flash_available
    return None if flash_available() else "flash-attn is not installed or not usable with this torch"


def describe_attention(attention: str, why_not_flash: str | None = None) -> str:
    if is_packed_attention(attention):
        flash = f"; flash-attention not used: {why_not_flash}" if why_not_flash else ""
        return f"attention: onepass packed SDPA (conversations of similar length share one call per layer{flash})"
    return f"attention: {attention} (varlen: each conversation attends to itself only)"


# --- Packing: several conversations in one row, or each alone ----------------------------------
# `packed`: a micro-batch is one row of conversations laid end to end, kept apart by the attention
# (onepass's packed attention or flash-attention varlen) and by position ids restarting at 0. That is
# exact only where attention is the one place tokens meet: a state-space, convolution or
# linear-attention layer, or ALiBi, would carry one conversation into the next. `separate`: each
# conversation goes through the model's own forward alone (conversations of one length share a
# call, so no row is padded), with the model's own attention. `check.check_packing` decides which,
# on the user's model, at start-up. The mode is the model's attention implementation itself (nothing
# else is kept on the model): an attention that keeps conversations apart means packed rows, any other
# (a model onepass never prepared included) one conversation per forward.
PACKED, SEPARATE = "packed", "separate"


def packing_of(model: Any) -> str:
    return PACKED if is_packing_attention(attention_implementation(base_model(model))) else SEPARATE


def own_attention_name(model: Any) -> str:
    """The attention implementation the model runs when onepass does not set one: the current one where
    it is the model's own, else transformers' default for its class (SDPA where it supports it). A
    `ModelHandle` knows what a model came with, and gives it back on `restore()`."""
    base = base_model(model)
    current = attention_implementation(base)
    if not is_packing_attention(current):
        return current
    return "sdpa" if supports_sdpa(base) else "eager"


def set_packing(model: Any, packing: str, own: str | None = None) -> None:
    """Put the model in `packing` mode (see PACKED): `separate` runs the model's own attention (`own`:
    the one it came with, where known)."""
    if packing == SEPARATE:
        own_attention_of(model, own if own is not None and not is_packing_attention(own) else
                         own_attention_name(model))
    elif packing_of(model) != PACKED:
        use_packed_attention(model)


def own_attention_of(model: Any, name: str) -> None:
    base = base_model(model)
    if attention_implementation(base) != name:
        base.set_attn_implementation(name)


@contextlib.contextmanager
def own_attention(model: Any, own: str | None = None) -> Iterator[Any]:
    """The model with its own attention implementation for the block (generation, its own forward as
    an oracle; `own`: the one it came with, where known): onepass's packed attention knows packed rows,
    not KV caches, padding masks or windows in a prefill, and transformers builds no mask for an
    implementation it does not know."""
    base = base_model(model)
    current = attention_implementation(base)
    own = own if own is not None and not is_packing_attention(own) else own_attention_name(base)
    if current == own:
        yield model
        return
    base.set_attn_implementation(own)
    try:
        yield model
    finally:
        base.set_attn_implementation(current)


def use_fastest_packing(model: Any, compute_device_type: str, compute_dtype: Any) -> str:
    """Packed rows with flash-attention varlen where `flash_refusal` finds nothing against it (and it
    loads), else onepass's packed SDPA; a model whose attention layers do not take transformers'
    interface keeps its own (one conversation per forward). The attention chosen."""
    attention = choose_attention(compute_device_type, compute_dtype, type(base_model(model)))
    try:
        use_packing_attention(model, attention)
    except (ValueError, ImportError, RuntimeError):  # a flash-attn that does not load here: packed SDPA instead
        if is_packed_attention(attention):
            raise
        use_packed_attention(model)
    return attention_implementation(base_model(model))


def use_packed_attention(model: Any) -> Any:
    """Switch a model to onepass's packed attention (kept where it already runs a variant of it)."""
    if is_packed_attention(attention_implementation(base_model(model))):
        return model
    return use_packing_attention(model, register_packed_attention())


def use_packing_attention(model: Any, attention: str) -> Any:
    """Packed rows with `attention` (onepass's packed attention or flash-attention varlen); a model whose
    attention layers do not take transformers' interface computes each conversation alone instead."""
    base = base_model(model)
    if takes_attention_interface(base):
        if attention == PACKED_ATTENTION:  # registered in this process before use (every rank of a run)
            register_packed_attention()
        base.set_attn_implementation(attention)
    return model


def reads_layout(module: Any) -> bool:
    """Whether a forward of `module` (a model, or an objective or wrapper holding one) reads a batch's
    `AttentionLayout`: onepass's packed SDPA does, and one conversation per forward checks it for trees;
    flash-attention varlen takes `cu_seq_lens` only."""
    model = next((m for m in module.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")), None)
    return model is None or attention_implementation(model) != "flash_attention_2"


def half_precision_for_flash(model: Any) -> Any:
    """bf16 autocast for a forward of an fp32 model on flash-attention outside any autocast (scoring,
    replies and evaluation of a model built for bf16 training): flash-attention refuses fp32 inputs.
    Nothing where an autocast is already on, or the model runs another attention."""
    base = base_model(model)
    if attention_implementation(base) != "flash_attention_2" or torch.is_autocast_enabled(device_of(base).type):
        return contextlib.nullcontext()
    if next(base.parameters()).dtype not in (torch.float32,):
        return contextlib.nullcontext()
    return torch.autocast(device_of(base).type, dtype=torch.bfloat16)


def refuse_trees(model: Any) -> None:
    """Tree examples attend along their paths, which only packed attention computes: a model that
    computes each conversation alone refuses them."""
    if packing_of(model) != SEPARATE:
        return
    unprepared = (" (or it was not prepared: onepass.rank and onepass.logprobs prepare it, as "
                  "train.handle.prepare_model does)") if takes_attention_interface(base_model(model)) else ""
    raise OnepassError("the examples are trees (a chat template that rewrites past turns, or N completions of "
                       f"one prompt), and this model computes each conversation alone{unprepared}, so it cannot "
                       "attend along a tree. Fix: data.unstable_history: split (train), or score one turn or "
                       "completion per row.")


def use_tree_attention(model: Any) -> None:
    """Tree examples need onepass's packed attention (flash-attention varlen knows only sequences)."""
    base = base_model(model)
    refuse_trees(base)
    if not is_packed_attention(attention_implementation(base)):
        log.info("attention: the data has tree examples, so onepass's packed attention runs (SDPA per conversation) "
              "instead of flash-attention varlen")
        use_packed_attention(base)
