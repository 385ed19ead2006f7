"""Packing: rows fit, nothing is lost, and a packed row computes exactly what each conversation alone does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onepass.train.batch import collate
from onepass.train.attention import AttentionLayout
from onepass.train.forward import hidden_states
from onepass.train.loss import sft_loss
from onepass.train.attention import use_packed_attention
from onepass.train.plan import pack
from onepass.data.types import Example
from onepass.demo.tiny import build_model


def random_example(rng: np.random.Generator, length: int, vocab: int = 100) -> Example:
    mask = (rng.random(length) < 0.5).astype(np.int8)
    mask[-1] = 1
    turn = np.where(mask == 1, rng.integers(0, 3, length), -1).astype(np.int32)
    return Example(rng.integers(3, vocab, length).astype(np.int32), mask, turn)


def test_best_fit_decreasing_fills_rows_and_keeps_every_example():
    lengths = [7, 3, 5, 2, 8, 1, 4, 6]
    rows = pack(lengths, max_seq_len=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 36 tokens need at least 4 rows of 10


def best_fit_decreasing(lengths, max_seq_len):
    """The definition, one open row at a time: longest first (ties in input order), each to the row with
    the least room that still fits it (of those, the first opened), else a new row."""
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[index]]
        row = min(fits, key=lambda r: (room[r], r)) if fits else len(rows)
        if row == len(rows):
            rows.append([])
            room.append(max_seq_len)
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_packing_is_exactly_best_fit_decreasing_ties_included(seed):
    rng = np.random.default_rng(seed)
    for max_seq_len in (16, 64, 100):
        lengths = rng.integers(1, max_seq_len + 1, 300).tolist()
        assert pack(lengths, max_seq_len) == best_fit_decreasing(lengths, max_seq_len)
        equal = (rng.integers(1, 5, 300) * (max_seq_len // 4)).tolist()  # many equal lengths and equal rooms
        assert pack(equal, max_seq_len) == best_fit_decreasing(equal, max_seq_len)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return use_packed_attention(build_model(None, vocab_size=100)).eval()


def test_packed_rows_do_not_attend_across_conversations(model):
    rng = np.random.default_rng(0)
    examples = [random_example(rng, n) for n in (5, 9, 3)]
    with torch.no_grad():
        packed = hidden_states(model, collate(examples))[0]
        alone = torch.cat([hidden_states(model, collate([e]))[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    # and the separation is real: the same tokens as one conversation give different states
    with torch.no_grad():
        merged = Example(np.concatenate([e.input_ids for e in examples]), np.concatenate([e.loss_mask for e in examples]),
                         np.concatenate([e.turn for e in examples]))
        assert not torch.allclose(hidden_states(model, collate([merged]))[0], packed, atol=1e-3)


def test_conversations_of_any_length_share_one_attention_call_per_length_bucket_and_equal_each_alone(model):
    lengths = (1, 40, 2, 13, 3, 21, 5, 34, 8, 1)
    layout = AttentionLayout.of(lengths)
    # longest first; a bucket keeps conversations at least half its longest: 40,34,21 | 13,8 | 5,3 | 2,1,1
    assert [tuple(index.shape) for index in layout.buckets] == [(3, 40), (2, 13), (2, 5), (3, 2)]
    assert len(set(layout.take.tolist())) == sum(lengths)  # every token's output taken once
    rng = np.random.default_rng(2)
    examples = [random_example(rng, n) for n in lengths]
    with torch.no_grad():
        packed = hidden_states(model, collate(examples))[0]
        alone = torch.cat([hidden_states(model, collate([e]))[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_packed_logits_equal_each_conversation_run_alone_with_plain_transformers(model):
    rng = np.random.default_rng(1)
    examples = [random_example(rng, n) for n in (6, 11, 4)]
    with torch.no_grad():
        packed = model.lm_head(hidden_states(model, collate(examples))[0])
        model.set_attn_implementation("eager")
        try:
            alone = torch.cat([model(input_ids=torch.from_numpy(e.input_ids.astype(np.int64))[None]).logits[0]
                               for e in examples])
        finally:
            use_packed_attention(model)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_packed_loss_and_gradients_equal_unpacked(model):
    rng = np.random.default_rng(2)
    examples = [random_example(rng, n) for n in (8, 5, 12)]
    model.zero_grad()
    batch = collate(examples)
    sft_loss(model, batch, batch.units)[0].backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    packed_loss = sft_loss(model, batch, batch.units)[0].item()
    model.zero_grad()
    total = 0.0
    for example in examples:
        loss, _ = sft_loss(model, collate([example]), batch.units)
        loss.backward()
        total += loss.item()
    for packed_grad, parameter in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, parameter.grad, rtol=1e-5, atol=1e-7)
    assert abs(packed_loss - total) < 1e-6


@pytest.mark.parametrize("fused", [False, True])
def test_output_projection_sees_only_trained_positions_in_bounded_chunks(model, fused):
    """Every matmul with the vocabulary in its shape (logits, and the two gradients from them) works
    on at most chunk_size trained positions; the stock head loss makes the logits again in backward
    (checkpointed chunks), the fused one (an acceleration) makes them once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from onepass.accel.fused_loss import FusedHeadLoss
    from onepass.train.loss import STOCK_HEAD_LOSS

    vocab = model.config.vocab_size
    logits_rows, chunk_rows = [], []

    class MatmulShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = args[-2], args[-1]
                if vocab in (*a.shape, *b.shape):
                    chunk_rows.append(min(n for n in (*a.shape, *b.shape) if n != vocab))
                if out.shape[-1] == vocab:
                    logits_rows.append(out.shape[0])
            return out

    rng = np.random.default_rng(6)
    batch = collate([random_example(rng, n) for n in (40, 70)])  # 110 tokens: no other shape equals the vocab
    with MatmulShapes():
        sft_loss(model, batch, batch.units, chunk_size=16,
                 head_loss=FusedHeadLoss() if fused else STOCK_HEAD_LOSS)[0].backward()
    trained = batch.num_trained_tokens
    assert trained < batch.num_tokens
    assert max(chunk_rows) <= 16  # never a (tokens x vocabulary) tensor, whatever the prompt length
    assert sum(logits_rows) == trained * (1 if fused else 2)  # only trained positions


def _attention_and_grads(attend, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.float().pow(2).sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("queries", [20, 7])  # a whole block, and a tree path's last nodes over all its keys
def test_short_blocks_under_bf16_autocast_attend_as_grouped_bf16_matmuls_equal_to_sdpa(queries):
    """Under bf16 on the CPU, blocks of up to CPU_MATH_MAX_KEYS keys attend as two bf16 matmuls with the
    query heads of each key/value head stacked (bench/attention_blocks.py: faster than either flash
    kernel there). Output and gradients equal fp32 SDPA to bf16 precision, with grouped-query heads and
    with fewer queries than keys."""
    import torch.nn.functional as F

    from onepass.accel import grouped_attention
    from onepass.accel.grouped_attention import CPU_MATH_MAX_KEYS
    from onepass.accel.grouped_attention import attention as grouped
    from onepass.train.attention import _attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, queries, 16), torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    distance = torch.arange(20 - queries, 20)[:, None] - torch.arange(20)[None, :]
    mask = None if queries == 20 else distance >= 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = _attention(None, q, k, v.bfloat16(), None, 0.0, None, {}, block=grouped_attention.block)
        full_mask = mask if mask is not None else distance >= 0
        got = _attention_and_grads(lambda *t: grouped(*t, full_mask, None), q, k, v)
    assert 20 <= CPU_MATH_MAX_KEYS and routed.dtype == torch.bfloat16 and torch.equal(routed, got[0])
    expected = _attention_and_grads(lambda *t: F.scaled_dot_product_attention(
        *t, attn_mask=mask, is_causal=mask is None, enable_gqa=True), q, k, v)
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value.float(), reference, atol=3e-2, rtol=3e-2)


def test_blocks_longer_than_the_matmul_limit_attend_with_sdpa(monkeypatch):
    import torch.nn.functional as F

    from onepass.accel import grouped_attention
    from onepass.train import attention as model

    monkeypatch.setattr(grouped_attention, "CPU_MATH_MAX_KEYS", 10)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 20, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model._attention(None, q, k, v, None, 0.0, None, {}, block=grouped_attention.block)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(got, expected)


def test_no_sdpa_call_passes_both_a_mask_and_grouped_heads(monkeypatch):
    """With a mask, `enable_gqa` leaves CUDA only the math kernel: key/value heads are repeated instead,
    as transformers' own SDPA attention does (trees and sliding windows pass masks)."""
    import torch.nn.functional as F

    from onepass.train import attention as model_module

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is not None, kwargs.get("enable_gqa", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    windowed = model_module._attention(None, q, k, v, None, 0.0, 5, {})
    path = model_module._attention(None, q[:, :, 8:], k, v, None, 0.0, None, {})  # a tree path's own nodes
    causal = model_module._attention(None, q, k, v, None, 0.0, None, {})
    assert (True, True) not in calls and (False, True) in calls  # no mask: grouped heads stay grouped
    expanded = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    mask = model_module._causal_mask(12, 12, 5, q.device)
    torch.testing.assert_close(windowed, sdpa(q, *expanded, attn_mask=mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(path, causal[:, :, 8:], rtol=0, atol=1e-6)
