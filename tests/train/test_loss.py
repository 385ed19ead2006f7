"""The fused output layer + NLL (gradients made in the forward pass) is the plain one: F.linear,
logit scale, cross-entropy, autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from onepass import accel
from onepass.data.types import Example
from onepass.train.batch import collate
from onepass.accel.fused_loss import LossWorkspace, FusedLinearNLL, fused_chunks
from onepass.train.loss import SFTObjective, sft_loss
from onepass.train.model import backbone_and_head
from onepass.train.attention import own_attention, use_packed_attention


def reference(hidden, weight, targets, coefficients, scale):
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale  # the softmax in fp32 at least
    nll = F.cross_entropy(logits, targets, reduction="none")
    return (nll * coefficients).sum(), nll


def inputs(dtype, vocab=37, width=8, rows=23, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, width, generator=generator, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    coefficients = torch.rand(rows, generator=generator, dtype=torch.float64 if dtype == torch.float64 else None)
    return hidden, weight, targets, coefficients


@pytest.mark.parametrize("scale", [1.0, 0.0625])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_fused_loss_and_gradients_equal_linear_then_cross_entropy(scale, chunk_size):
    hidden, weight, targets, coefficients = inputs(torch.float64)
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, nll = FusedLinearNLL.apply(h, w, targets, coefficients, scale, chunk_size) if fused \
            else reference(h, w, targets, coefficients, scale)
        (loss * 3.0).backward()  # the upstream gradient scales both gradients
        results.append((loss.detach(), nll.detach(), h.grad, w.grad))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_fused_loss_under_bf16_autocast_matches_autocast_linear_then_cross_entropy():
    hidden, weight, targets, coefficients = inputs(torch.float32, vocab=300, width=64, rows=50)
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, nll = FusedLinearNLL.apply(h, w, targets, coefficients, 1.0, 16) if fused \
                else reference(h, w, targets, coefficients, 1.0)
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == torch.float32
        results.append((loss.detach(), nll.detach(), h.grad, w.grad))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("autocast", [False, True])
def test_softmax_blocks_of_a_few_rows_compute_what_one_block_does(monkeypatch, autocast):
    """On the CPU the softmax runs a few rows at a time (CPU_SOFTMAX_BLOCK_BYTES): blocks that split a
    chunk unevenly give the loss and gradients of the whole chunk at once."""
    from onepass.accel import fused_loss as module

    dtype = torch.float32 if autocast else torch.float64
    hidden, weight, targets, coefficients = inputs(dtype, vocab=300, width=64, rows=50)
    results = []
    for block_bytes in (2**30, 3 * 300 * 8):  # one block per chunk; 3 rows (6 when the softmax is fp32)
        monkeypatch.setattr(module, "CPU_SOFTMAX_BLOCK_BYTES", block_bytes)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, nll = FusedLinearNLL.apply(h, w, targets, coefficients, 0.5, 16)
        (loss * 2.0).backward()
        assert w.grad.dtype == dtype
        results.append((loss.detach(), nll, h.grad, w.grad))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_reused_workspace_changes_no_result_and_nothing_returned_lies_in_it():
    """The CPU loss reuses its vocabulary-sized bf16 temporaries from call to call (`LossWorkspace`): calls of
    different sizes give exactly what they give without one, and the gradients they return (which
    autograd keeps and accumulates) are their own memory, so a later call cannot overwrite them."""
    workspace = LossWorkspace()
    kept = []
    for rows, chunk_size in ((50, 16), (23, 1024), (40, 7)):
        hidden, weight, targets, coefficients = inputs(torch.float32, vocab=300, width=64, rows=rows, seed=rows)
        results = []
        for space in (None, workspace):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, nll = FusedLinearNLL.apply(h, w, targets, coefficients, 1.0, chunk_size, space)
            loss.backward()
            results.append((loss.detach(), nll, h.grad, w.grad))
        for expected, got in zip(*results):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        kept.append((results[1][3], results[1][3].clone()))
    buffers = [b.untyped_storage().data_ptr() for b in workspace._buffers.values()]
    assert buffers and all(grad.untyped_storage().data_ptr() not in buffers for grad, _ in kept)
    for grad, copy in kept:  # untouched by the calls after it
        assert torch.equal(grad, copy)


def test_a_frozen_output_layer_gets_no_gradient_and_no_gradient_work():
    hidden, weight, targets, coefficients = inputs(torch.float64)
    h = hidden.clone().requires_grad_()
    loss, _ = FusedLinearNLL.apply(h, weight, targets, coefficients, 1.0, 8)
    loss.backward()
    assert weight.grad is None and h.grad is not None
    assert fused_chunks(hidden, weight, targets, coefficients, 1.0, 8, want_weight_grad=False)[2] is None


def test_without_gradients_only_the_nll_is_computed():
    hidden, weight, targets, _ = inputs(torch.float64)
    nll, grad_hidden, grad_weight = fused_chunks(hidden, weight, targets, None, 1.0, 8, want_weight_grad=True)
    torch.testing.assert_close(nll, reference(hidden, weight, targets, torch.ones(len(targets), dtype=torch.float64),
                                              1.0)[1], rtol=1e-10, atol=1e-12)
    assert grad_hidden is None and grad_weight is None


def tied_model(seed: int = 0):
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return use_packed_attention(LlamaForCausalLM(config)).to(torch.float64)


class Calls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **kwargs or {})


def test_a_tied_output_layer_gets_the_embedding_rows_added_into_the_loss_gradient_in_place():
    """With the output layer tied to the input embedding, the embedding's backward adds its rows into the
    fused loss's weight gradient (`TiedGradient`) instead of autograd making a dense zeros gradient and
    adding the two: the same gradient, the padding id's row included (it gets the output layer's part only)."""
    rng = np.random.default_rng(0)
    examples = []
    for length in (9, 14, 6):
        ids = rng.integers(0, 50, length).astype(np.int32)
        ids[1] = 2  # the padding id appears in the input
        mask = (rng.random(length) < 0.6).astype(np.int8)
        examples.append(Example(ids, mask, np.where(mask == 1, 0, -1).astype(np.int32)))
    batch = collate(examples)
    grads, calls = [], []
    for tied in (False, True):
        model = tied_model()
        installed = accel.install(model, ("fused-loss", "tied-gradient") if tied else ("fused-loss",))
        objective = SFTObjective(model, head_loss=installed.head_loss) if tied else None
        assert (objective is not None and objective.head_loss.tie is not None) or not tied
        with Calls() as seen:
            loss = objective(batch, 7.0)[0] if tied else sft_loss(model, batch, 7.0, head_loss=installed.head_loss)[0]
            loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        calls.append(seen.names)
    assert "embedding_dense_backward.default" in calls[0] and "embedding_dense_backward.default" not in calls[1]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-12, atol=1e-14)


def test_a_compiled_trunk_leaves_a_tied_output_layer_to_autograd_with_the_same_gradients():
    """torch.compile does not replay `TiedGradient`'s state from a traced graph, so under it the tie
    stands aside and autograd sums the two gradients (before, the compiled run lost a part)."""
    rng = np.random.default_rng(1)
    examples = [Example(rng.integers(3, 50, n).astype(np.int32), np.ones(n, dtype=np.int8), np.zeros(n, np.int32))
                for n in (11, 7)]
    batch = collate(examples)
    grads = []
    for compiled in (False, True):
        model = tied_model().float()
        objective = SFTObjective(model, head_loss=accel.install(model, ("fused-loss", "tied-gradient")).head_loss)
        if compiled:
            backbone_and_head(model)[0].compile()
        objective(batch, 5.0)[0].backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5)


def test_a_moe_models_router_loss_is_added_as_its_own_forward_adds_it():
    """Where the config turns router logits on, onepass's loss on one unpacked conversation is the
    model's own `loss`: mean NLL + router_aux_loss_coef × load-balancing loss; the router term is
    returned apart, for logging."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5)
    model = use_packed_attention(MixtralForCausalLM(config))  # fp32: the grouped expert matmuls take no fp64
    ids = np.random.default_rng(0).integers(0, 64, 23).astype(np.int32)
    batch = collate([Example(ids, np.ones(23, np.int8), np.zeros(23, np.int32))])
    objective = SFTObjective(model)
    loss, _, router_loss = objective(batch, batch.units, router_share=1.0)
    with own_attention(model):
        own = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], labels=torch.from_numpy(
            ids.astype(np.int64))[None])
    torch.testing.assert_close(loss, own.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(router_loss, (0.5 * own.aux_loss).detach(), rtol=1e-6, atol=1e-6)
    assert router_loss > 0
    config.output_router_logits = False  # off: no router term, as in the model's own forward
    assert SFTObjective(model).router is None


def test_the_loss_finds_its_trained_positions_on_the_host_not_by_a_device_sync(monkeypatch):
    """`nonzero` on the device makes the host wait for the GPU every micro-batch: collate finds the
    positions, their labels and weights in numpy, and the loss only gathers with them."""
    import numpy as np

    from onepass.data.types import Example
    from onepass.demo.tiny import build_model
    from onepass.train.batch import IGNORE_INDEX, collate, padding_batch
    from onepass.train.loss import sft_loss
    from onepass.train.attention import use_packed_attention

    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(3, 100, n).astype(np.int32), (rng.random(n) < 0.5).astype(np.int8),
                        np.zeros(n, np.int32)) for n in (12, 30, 7)]
    batch = collate(examples, "sequence")
    labels = batch.labels[0].numpy()
    assert np.array_equal(batch.positions.numpy(), np.flatnonzero(labels != IGNORE_INDEX))
    assert np.array_equal(batch.targets.numpy(), labels[batch.positions.numpy()])
    assert np.array_equal(batch.weights.numpy(), batch.label_weights[0].numpy()[batch.positions.numpy()])
    model = use_packed_attention(build_model(None, vocab_size=100))
    expected = sft_loss(model, batch, batch.units)[0].item()
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: (_ for _ in ()).throw(AssertionError("nonzero")))
    loss, nll = sft_loss(model, batch, batch.units)
    assert loss.item() == expected
    assert sft_loss(model, padding_batch(examples[0]), 1.0)[1].item() == 0.0  # a padding pass logs nothing
