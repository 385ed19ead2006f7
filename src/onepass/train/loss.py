"""The SFT objective: weighted next-token negative log-likelihood on trained positions only.

Only the hidden states of positions with a label go through the output projection, chunk by
chunk, so the (tokens × vocabulary) logits tensor is never materialised and the loss's peak memory
does not grow with the number of prompt tokens. In training, each chunk's gradients are made in the
forward pass while its logits exist (`_FusedLinearNLL`: the loss is linear in each label's NLL, with
coefficients known up front), so nothing is kept or recomputed for the backward pass; soft-capped or
wrapped output layers take the same chunks with activation checkpointing instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onepass.train.batch import IGNORE_INDEX, Batch
from onepass.compat import load_balancing_loss_function
from onepass.errors import OnepassError
from onepass.train.model import SEPARATE, backbone_and_head, base_model, packing_of


def hidden_states(model: Any, batch: Batch) -> torch.Tensor:
    """Last hidden states (1, T, d) of the packed batch (see `trunk_outputs`)."""
    return trunk_outputs(model, batch)[0]


def trunk_outputs(model: Any, batch: Batch, router_logits: bool = False
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Last hidden states (1, T, d) of the packed batch, and with `router_logits` each MoE layer's
    router logits (tokens × experts): one forward over the packed row, or, for a model that computes
    each conversation alone (`model.SEPARATE`), one forward per length of conversation, its
    conversations stacked as rows (none padded), laid back end to end."""
    trunk, _ = backbone_and_head(model)
    extra = {"output_router_logits": True} if router_logits else {}
    if packing_of(model) != SEPARATE:
        output = trunk(**batch.model_kwargs(), use_cache=False, **extra)
        return output.last_hidden_state, _router_logits(output, router_logits)
    row = batch.input_ids[0]
    by_length: dict[int, list[int]] = {}
    for start, length in zip(batch.cu_seq_lens[:-1].tolist(), batch.cu_seq_lens.diff().tolist()):
        by_length.setdefault(length, []).append(start)
    pieces, order, routers = [], [], []
    for length, group in by_length.items():
        index = (torch.tensor(group, device=row.device)[:, None] + torch.arange(length, device=row.device)).flatten()
        output = trunk(input_ids=row[index].view(len(group), length), use_cache=False, **extra)
        pieces.append(output.last_hidden_state.flatten(0, 1))
        order.append(index)
        routers.append(_router_logits(output, router_logits))
    where = torch.empty_like(row)
    where[torch.cat(order)] = torch.arange(len(row), device=row.device)
    hidden = torch.cat(pieces).index_select(0, where)[None]
    if not router_logits:
        return hidden, None
    return hidden, tuple(torch.cat([group[layer] for group in routers]) for layer in range(len(routers[0])))


def _router_logits(output: Any, wanted: bool) -> tuple[torch.Tensor, ...] | None:
    if not wanted:
        return None
    logits = getattr(output, "router_logits", None)
    if not logits:
        raise OnepassError(f"{type(output).__name__} carries no router logits although the model's config sets "
                           "output_router_logits. Fix: report it; set output_router_logits: false in the model's "
                           "config.json to train without the router's auxiliary loss.")
    return tuple(layer.reshape(-1, layer.shape[-1]) for layer in logits)


@dataclass(frozen=True)
class RouterLoss:
    """The router's load-balancing loss of a mixture-of-experts model, added as the model's own forward
    adds it where its config turns router logits on (`output_router_logits`): `router_aux_loss_coef`
    times its modeling file's `load_balancing_loss_func` over every MoE layer's router logits. Over a
    packed row it is the model's value for one unpadded row of those tokens."""

    coefficient: float
    function: Any
    num_experts: int
    top_k: int

    @classmethod
    def of(cls, model: Any) -> RouterLoss | None:
        base = base_model(model)
        if not getattr(base.config, "output_router_logits", False):
            return None
        function = load_balancing_loss_function(base)
        values = [getattr(base, name, None) for name in ("router_aux_loss_coef", "num_experts", "num_experts_per_tok")]
        if function is None or any(value is None for value in values):
            raise OnepassError(f"{type(base).__name__}: its config sets output_router_logits, but onepass cannot "
                               "find how its forward adds the router's auxiliary loss. Fix: set "
                               "output_router_logits: false in the model's config.json, or report it.")
        coefficient, num_experts, top_k = values
        return cls(float(coefficient), function, int(num_experts), int(top_k))

    def __call__(self, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.coefficient * self.function(router_logits, self.num_experts, self.top_k, None).float()


@dataclass(frozen=True)
class OutputTransform:
    """What a model's own CausalLM.forward does to the output layer's logits, which onepass applies
    too (it calls the output layer directly): Cohere's `logit_scale`, Granite's `logits_scaling`,
    Gemma-2/3's final soft-capping."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: Any) -> OutputTransform:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        config, scale = model.config, 1.0
        if getattr(model, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
            scale *= float(model.logit_scale)
        if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
            scale /= float(config.logits_scaling)
        return cls(scale, getattr(config, "final_logit_softcapping", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if logits.dtype in (torch.bfloat16, torch.float16):  # the softmax always runs in at least fp32
            logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: Any, transform: OutputTransform) -> torch.Tensor:
    return F.cross_entropy(transform(head(hidden)), targets, reduction="none")


def _fusable(head: Any, transform: OutputTransform) -> bool:
    """The fused path covers a plain bias-free output layer (LoRA leaves it plain) and a logit scale;
    soft-capping (Gemma-2/3) and a wrapped or biased head take the checkpointed path."""
    return type(head) is torch.nn.Linear and head.bias is None and not transform.softcap


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


def _fused_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coefficients: torch.Tensor | None,
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


class _FusedLinearNLL(torch.autograd.Function):
    """Σ coefficients · NLL through the output layer, with the gradients made in the forward pass
    (the loss is linear in each label's NLL, and d loss / d nll = coefficients is known then): one
    output-layer matmul forward and two backward, one fp32 softmax pass, and no logits kept for the
    backward pass nor recomputed in it. Returns the weighted sum and the per-label NLL (no gradient)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                coefficients: torch.Tensor, scale: float, chunk_size: int, workspace: LossWorkspace | None = None,
                tie: TiedGradient | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        nll, grad_hidden, grad_weight = _fused_chunks(hidden, weight, targets, coefficients, scale, chunk_size,
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

    @classmethod
    def install(cls, model: Any) -> TiedGradient | None:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if type(embedding) is not torch.nn.Embedding or head is None or head.weight is not embedding.weight or \
                embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            return None
        tie = cls()
        embedding.register_forward_hook(tie._route)
        return tie

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


def trained_positions(batch: Batch) -> torch.Tensor:
    """Flat positions of the packed row that have a label."""
    return (batch.labels[0] != IGNORE_INDEX).nonzero().squeeze(1)


def label_nll(model: Any, batch: Batch, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label NLL (in label order) and the flat positions they belong to."""
    hidden = hidden_states(model, batch)[0]
    positions = trained_positions(batch)
    return nll_at(model, hidden, positions, batch.labels[0, positions], chunk_size), positions


def nll_at(model: Any, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
           chunk_size: int = 1024) -> torch.Tensor:
    """-log Pr(targets[i] | the hidden state at positions[i]): only those rows go through the output
    layer, `chunk_size` at a time (recomputed in the backward pass), so the (tokens × vocabulary)
    logits are never materialised. Positions may repeat (a tree node with several children)."""
    _, head = backbone_and_head(model)
    transform = OutputTransform.of(model)
    selected = hidden[positions]
    if _fusable(head, transform) and not torch.is_grad_enabled():
        return _fused_chunks(selected, head.weight, targets, None, transform.scale, chunk_size, False)[0]
    pieces = []
    for start in range(0, len(positions), chunk_size):
        args = (selected[start:start + chunk_size], targets[start:start + chunk_size], head, transform)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_nll, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(*args))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sft_loss(model: Any, batch: Batch, denominator: float, chunk_size: int = 1024,
             workspace: LossWorkspace | None = None, tie: TiedGradient | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step loss: sum(weight · nll) / denominator, where the
    denominator is the step's total units (trained tokens, sequences or turns, over every
    micro-batch and rank), so summing gradients over micro-batches is exact.

    Returns the loss to backpropagate and the unweighted NLL sum of the trained labels (for logging; a
    tensor, so a caller can sum micro-batches on the device and synchronise once)."""
    return loss_of_hidden(model, batch, hidden_states(model, batch)[0], denominator, chunk_size, workspace, tie)


def loss_of_hidden(model: Any, batch: Batch, hidden: torch.Tensor, denominator: float, chunk_size: int = 1024,
                   workspace: LossWorkspace | None = None, tie: TiedGradient | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sft_loss` from the trunk's last hidden states (T, d)."""
    positions = trained_positions(batch)
    targets, weights = batch.labels[0, positions], batch.label_weights[0, positions]
    _, head = backbone_and_head(model)
    transform = OutputTransform.of(model)
    if _fusable(head, transform) and torch.is_grad_enabled():
        weighted, nll = _FusedLinearNLL.apply(hidden[positions], head.weight, targets, weights.float(),
                                              transform.scale, chunk_size, workspace, tie)
    else:
        nll = nll_at(model, hidden, positions, targets, chunk_size)
        weighted = (nll * weights).sum()
    if positions.numel() == 0 and torch.is_grad_enabled():
        # No trained label here, so the output layer took no part; a zero term keeps it in the graph,
        # because DDP expects a gradient (here exactly zero) for every parameter on every rank.
        weighted = weighted + sum(p.sum() for p in head.parameters() if p.requires_grad) * 0.0
    if denominator <= 0:  # a step with no trained token: nothing to learn, and no division by zero
        return weighted * 0.0, weighted.new_zeros(())
    return weighted / denominator, nll.detach()[weights > 0].sum()  # a padding batch logs nothing


class SFTObjective(torch.nn.Module):
    """The model with the SFT loss as its forward, so DDP and FSDP2 wrap one module whose forward
    does all the work: their hooks (gradient all-reduce, parameter gathering) run around it. On the
    CPU it keeps the loss's workspace from one micro-batch to the next (a GPU's caching allocator
    already reuses those blocks). An output layer tied to the input embedding gets one gradient
    tensor (`TiedGradient`). A mixture-of-experts model whose config turns router logits on adds its
    router's auxiliary loss (`RouterLoss`)."""

    def __init__(self, model: Any, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.workspace = LossWorkspace()
        self.tie = TiedGradient.install(model)
        self.router = RouterLoss.of(model)

    def forward(self, batch: Batch, denominator: float, router_share: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss to backpropagate, the trained labels' NLL sum, and the router's auxiliary loss of
        this micro-batch (zero without one), which enters the loss times `router_share`: its share of
        the step (1 / the step's micro-batches over every rank, 0 for a padding pass), so that a step's
        router term is the mean over its micro-batches, as one batch of them all would have it."""
        on_cpu = batch.input_ids.device.type == "cpu"
        hidden, router_logits = trunk_outputs(self.model, batch, self.router is not None)
        loss, nll = loss_of_hidden(self.model, batch, hidden[0], denominator, self.chunk_size,
                                   self.workspace if on_cpu else None, self.tie)
        if self.router is None:
            return loss, nll, loss.new_zeros(())
        router_loss = self.router(router_logits)
        return loss + router_share * router_loss, nll, router_loss.detach()
