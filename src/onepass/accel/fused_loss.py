"""The fused output layer + NLL, and the tied embedding's single gradient: accelerations of the loss
(see onepass.accel). The stock path (`loss.nll_at`) runs the output layer and cross-entropy over chunks
of the trained positions, recomputed in the backward pass.

Only the hidden states of positions with a label go through the output projection in either. Here,
each chunk's gradients are made in the forward pass while its logits exist (`FusedLinearNLL`: the loss
is linear in each label's NLL, with coefficients known up front), so nothing is kept or recomputed for
the backward pass. It covers a plain bias-free output layer and a logit scale; soft-capped or wrapped
output layers take the stock path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from onepass.train.loss import HeadLoss, OutputTransform


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class LossWorkspace:
    """Buffers the fused loss reuses from one micro-batch to the next on the CPU, for its temporaries
    of vocabulary size under bf16 autocast: the output layer's bf16 weight, a chunk's logits, the
    output layer's gradient before it is cast to the weight's dtype. Tensors that large are each a
    fresh mapping from the system when allocated (glibc serves blocks over 32 MB by mmap), paid for in
    page faults on every use; these are the same size every step, and they are alive at the loss
    anyway, where a step's memory peaks. Nothing returned from the loss lies in them."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape`, in the buffer called `name` (grown when too small)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            self._buffers.pop(name, None)  # the old buffer goes before the new one is allocated
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


# The softmax of a chunk's logits runs this many bytes of rows at a time on the CPU: each block's
# passes (max, exp, sum, softmax - one-hot) stay in cache, and the fp32 copy of bf16 logits is a small
# block the allocator reuses, never a fresh (rows × vocabulary) tensor. On a GPU the chunk is one block.
CPU_SOFTMAX_BLOCK_BYTES = 4 * 2**20


def fused_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coefficients: torch.Tensor | None,
                  scale: float, chunk_size: int, want_weight_grad: bool, workspace: LossWorkspace | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-label NLL of `targets` under softmax(scale · hidden @ weightᵀ), chunk by chunk, in the
    compute dtype (bf16 under autocast) with the softmax in fp32 (or fp64). With `coefficients` (d loss / d nll
    per label), also the gradients of Σ coefficients · nll with respect to hidden (in the compute dtype) and
    weight (in the weight's dtype, summed over chunks in at least fp32), made from the same chunk's logits
    while they exist: softmax − one-hot, written over the logits block by block. A `workspace` holds
    the temporaries of vocabulary size."""
    dtype = _compute_dtype(weight)
    softmax_dtype = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 where the model is
    grad_dtype = torch.promote_types(weight.dtype, softmax_dtype)  # the weight's gradient is summed in this

    def temporary(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """A workspace buffer for the compute-dtype temporaries under autocast. In fp32 the logits are
        the only one, and keeping them would add to the peak that the backward pass reaches."""
        return workspace.take(name, shape, dtype, weight.device) if workspace is not None and \
            dtype != weight.dtype else None

    with torch.autocast(weight.device.type, enabled=False):
        h_all = hidden.to(dtype)
        buffer = temporary("weight", tuple(weight.shape))
        w = buffer.copy_(weight) if buffer is not None else weight.to(dtype)  # .to: the weight itself in fp32
        nll = torch.empty(len(targets), dtype=softmax_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(h_all) if coefficients is not None else None
        grad_weight = None
        block = max(1, CPU_SOFTMAX_BLOCK_BYTES // (w.shape[0] * softmax_dtype.itemsize)) \
            if w.device.type == "cpu" else chunk_size
        for start in range(0, len(targets), chunk_size):
            end = min(start + chunk_size, len(targets))
            h = h_all[start:end]
            logits = torch.mm(h, w.T, out=temporary("logits", (end - start, w.shape[0])))
            for first in range(start, end, block):
                last = min(first + block, end)
                _softmax_block(logits[first - start:last - start], targets[first:last], nll[first:last],
                               None if coefficients is None else coefficients[first:last], scale, softmax_dtype)
            if coefficients is None:
                continue
            grad_hidden[start:end] = logits @ w  # the logits now hold d loss / d logits
            if want_weight_grad:  # a temporary only where it is cast or added to the sum, never returned
                part = torch.mm(logits.T, h, out=temporary("part", tuple(w.shape))
                                if grad_weight is not None or dtype != grad_dtype else None)
                grad_weight = part.to(grad_dtype) if grad_weight is None else grad_weight.add_(part)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return nll, grad_hidden, grad_weight


def _softmax_block(logits: torch.Tensor, targets: torch.Tensor, nll: torch.Tensor, coefficients: torch.Tensor | None,
                   scale: float, softmax_dtype: torch.dtype) -> None:
    """NLL of a block of logit rows into `nll`; with `coefficients`, the rows are overwritten with
    coefficient · d nll / d logits = coefficient · scale · (softmax − one-hot), in their own dtype."""
    values = logits.to(softmax_dtype)  # a copy for bf16 logits; the rows themselves when already fp32
    if scale != 1.0:
        values.mul_(scale)
    # log-sum-exp by hand so that its exp is the softmax's too, all in the block's memory
    peak = values.amax(dim=-1, keepdim=True)
    target = values.gather(1, targets[:, None]).squeeze(1)
    exps = values.sub_(peak).exp_()
    total = exps.sum(dim=-1)
    nll.copy_(peak.squeeze(1) + total.log() - target)
    if coefficients is None:
        return
    # d nll / d logits = softmax - one-hot = (exps - total · one-hot) / total, times the coefficient
    exps[torch.arange(len(targets), device=exps.device), targets] -= total
    exps.mul_((coefficients * scale / total)[:, None])
    if exps.data_ptr() != logits.data_ptr():
        logits.copy_(exps)


class FusedLinearNLL(torch.autograd.Function):
    """Σ coefficients · NLL through the output layer, with the gradients made in the forward pass
    (the loss is linear in each label's NLL, and d loss / d nll = coefficients is known then): one
    output-layer matmul forward and two backward, one fp32 softmax pass, and no logits kept for the
    backward pass nor recomputed in it. Returns the weighted sum and the per-label NLL (no gradient)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                coefficients: torch.Tensor, scale: float, chunk_size: int, workspace: LossWorkspace | None = None,
                tie: TiedGradient | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        nll, grad_hidden, grad_weight = fused_chunks(hidden, weight, targets, coefficients, scale, chunk_size,
                                                      ctx.needs_input_grad[1], workspace)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.tie = tie.claim() if tie is not None else None
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(nll)
        return (nll * coefficients).sum(), nll

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_nll: Any) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = (grad_hidden * grad_loss).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        if grad_weight is not None:  # the output layer's (vocabulary × width) gradient: scaled where it lies
            grad_weight = grad_weight.mul_(grad_loss)
            if ctx.tie is not None:  # the tied input embedding's backward adds its rows and returns the sum
                ctx.tie.gradient, grad_weight = grad_weight, None
        return grad_hidden, grad_weight, None, None, None, None, None, None


class TiedGradient:
    """Where the output layer shares its weight with a plain input embedding (SmolLM2, Llama-3.2, small
    Qwen models), the weight gets one gradient tensor: the fused loss's (vocabulary × width) gradient,
    into which the embedding's backward adds its rows (`index_add_`) before returning it. Autograd
    would make the embedding's own gradient a fresh dense zeros tensor of vocabulary size and then add
    the two: two more such tensors and two more passes over them in every micro-batch. The embedding
    hands over only when it ran with gradients in this forward pass (`claim`), so a loss without it,
    or without a weight gradient, leaves autograd to sum as usual."""

    def __init__(self) -> None:
        self.pending = False  # the embedding ran in this forward pass and will take the loss's gradient
        self.gradient: torch.Tensor | None = None
        self.hook: Any = None

    @classmethod
    def install(cls, model: Any) -> TiedGradient | None:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if type(embedding) is not torch.nn.Embedding or head is None or head.weight is not embedding.weight or \
                embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            return None
        tie = cls()
        tie.hook = embedding.register_forward_hook(tie._route)
        return tie

    def remove(self) -> None:
        """The embedding's own backward again."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def _route(self, module: torch.nn.Embedding, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        self.pending, self.gradient = False, None
        if not torch.is_grad_enabled() or not module.weight.requires_grad or torch.compiler.is_compiling():
            return None  # (a traced graph would not replay this object's state): autograd sums as usual
        self.pending = True
        return _TiedEmbedding.apply(args[0], module.weight, module.padding_idx, self)

    def claim(self) -> TiedGradient | None:
        """This forward pass's tie, taken by the loss (at most once), or None when the embedding did not run."""
        claimed, self.pending = self.pending, False
        return self if claimed else None

    def take(self) -> torch.Tensor | None:
        gradient, self.gradient = self.gradient, None
        return gradient


class _TiedEmbedding(torch.autograd.Function):
    """The embedding lookup, whose weight gradient is added into the tied loss gradient in place."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None,
                tie: TiedGradient) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.tie, ctx.weight_shape, ctx.weight_dtype = padding_idx, tie, weight.shape, weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (ids,) = ctx.saved_tensors
        gradient = ctx.tie.take()
        if gradient is None:
            gradient = grad.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in torch's embedding
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        return None, gradient.index_add_(0, ids, rows.to(gradient.dtype)), None, None


class FusedHeadLoss(HeadLoss):
    """The head-loss strategy with the fused loss (`FusedLinearNLL`; without gradients, `fused_chunks`)
    where it covers the output layer: a plain bias-free linear layer (LoRA leaves it plain) and a logit
    scale. Soft-capping (Gemma-2/3) and a wrapped or biased head take the stock checkpointed path. On
    the CPU, `workspace` holds its temporaries; `tie` routes a tied embedding's gradient."""

    name = "fused"

    def __init__(self, workspace: LossWorkspace | None = None, tie: TiedGradient | None = None) -> None:
        self.workspace = workspace
        self.tie = tie

    @staticmethod
    def covers(head: Any, transform: OutputTransform) -> bool:
        return type(head) is torch.nn.Linear and head.bias is None and not transform.softcap

    def nll(self, rows: torch.Tensor, targets: torch.Tensor, head: Any, transform: OutputTransform,
            chunk_size: int) -> torch.Tensor:
        if self.covers(head, transform) and not torch.is_grad_enabled():
            return fused_chunks(rows, head.weight, targets, None, transform.scale, chunk_size, False)[0]
        return super().nll(rows, targets, head, transform, chunk_size)

    def weighted(self, rows: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, head: Any,
                 transform: OutputTransform, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.covers(head, transform) and torch.is_grad_enabled()):
            return super().weighted(rows, targets, weights, head, transform, chunk_size)
        workspace = self.workspace if rows.device.type == "cpu" else None  # a GPU's allocator reuses the blocks
        return FusedLinearNLL.apply(rows, head.weight, targets, weights.float(), transform.scale, chunk_size,
                                    workspace, self.tie)
