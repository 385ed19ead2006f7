"""The CUDA flash-attention branches, run on the CPU through transformers' real flash dispatch with a
stand-in kernel (conftest.fake_flash): what onepass hands flash-attention varlen is right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import use_fake_flash
from onepass.data.types import Example
from onepass.demo.tiny import build_model
from onepass.train.batch import collate
from onepass.train.loss import label_nll
from onepass.train.attention import use_packed_attention


def conversations(vocab: int = 100) -> list[Example]:
    rng = np.random.default_rng(0)
    return [Example(rng.integers(3, vocab, n).astype(np.int32), np.ones(n, np.int8), np.zeros(n, np.int32))
            for n in (13, 40, 7, 22)]


def sliding_model():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=6))


@pytest.mark.parametrize("build", [lambda: build_model(None, vocab_size=100), sliding_model],
                         ids=["llama", "sliding-window"])
def test_packed_rows_through_flash_varlen_equal_onepass_packed_sdpa_under_bf16(fake_flash, build):
    model = use_packed_attention(build()).eval()
    batch = collate(conversations())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa, _ = label_nll(model, batch)
        use_fake_flash(model)
        flash, _ = label_nll(model, batch)
    assert fake_flash.calls and {dtype for dtype, _ in fake_flash.calls} == {torch.bfloat16}
    assert {segments for _, segments in fake_flash.calls} == {4}  # one varlen call per layer, four conversations
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=0, atol=3e-2)


def test_the_stand_in_refuses_fp32_as_flash_attention_does(fake_flash):
    model = use_fake_flash(use_packed_attention(build_model(None, vocab_size=100)).eval())
    with torch.no_grad(), pytest.raises(RuntimeError, match="fp16 and bf16"):
        model.model(**collate(conversations()).model_kwargs())  # the model's own trunk, fp32, no autocast


def test_scoring_a_model_on_flash_outside_autocast_computes_in_bf16_instead_of_failing(fake_flash):
    """The real demo scores and replies with the model it built for bf16 training, outside the trainer's
    autocast: flash-attention would refuse the fp32 inputs."""
    from onepass.score.scoring import token_logprobs

    model = use_packed_attention(build_model(None, vocab_size=100)).eval()
    examples = conversations()
    expected = np.concatenate(token_logprobs(model, examples))  # packed SDPA, fp32
    got = np.concatenate(token_logprobs(use_fake_flash(model), examples))
    assert fake_flash.calls and np.abs(got - expected).max() < 5e-2


def test_the_start_up_check_compares_flash_with_packed_sdpa_and_keeps_flash_where_they_agree(fake_flash):
    from onepass.compat import attention_implementation
    from onepass.train.check import check_packing

    model = use_fake_flash(use_packed_attention(build_model(None, vocab_size=100)))
    result = check_packing(model)
    assert result.max_difference < 2e-4 and "flash-attention varlen == packed SDPA under bf16" in result.describe()
    assert result.attention == "flash_attention_2" and fake_flash.calls
    assert attention_implementation(model) == "flash_attention_2"  # the check left the model as it came


def test_the_start_up_check_falls_back_to_packed_sdpa_where_flash_lets_conversations_leak(fake_flash):
    from onepass.compat import attention_implementation
    from onepass.train.check import apply_check, check_packing
    from onepass.train.attention import PACKED_ATTENTION

    fake_flash.leak = True
    model = use_fake_flash(use_packed_attention(build_model(None, vocab_size=100)))
    result = check_packing(model)
    assert "flash-attention differs from packed SDPA" in result.describe() and "packed SDPA runs instead" in \
        result.describe()
    assert result.attention == PACKED_ATTENTION and attention_implementation(model) == "flash_attention_2"
    apply_check(model, result.packing, result.attention)  # what a run then does with it
    assert attention_implementation(model) == PACKED_ATTENTION


def test_a_training_step_on_flash_copies_no_attention_layout_to_the_device(fake_flash, monkeypatch):
    """flash-attention varlen takes cu_seq_lens: the packed SDPA's layout is not moved for it."""
    from onepass.train.attention import AttentionLayout
    from onepass.train.loss import SFTObjective
    from onepass.train.step import StepOptions, train_step

    model = use_fake_flash(use_packed_attention(build_model(None, vocab_size=100)))
    objective = SFTObjective(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    moved = []
    original = AttentionLayout.to
    monkeypatch.setattr(AttentionLayout, "to", lambda self, device: moved.append(device) or original(self, device))
    result = train_step(objective, optimizer, scheduler, [collate(conversations())], StepOptions("bf16"))
    assert math.isfinite(result.loss) and fake_flash.calls and not moved
    model.config._attn_implementation = "onepass_packed"
    train_step(objective, optimizer, scheduler, [collate(conversations())], StepOptions("bf16"))
    assert moved  # packed SDPA reads it
