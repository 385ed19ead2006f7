"""Model helpers: evaluation mode is scoped and always restored; which attention runs; the export's dtype."""

from __future__ import annotations

import pytest
import torch

from onepass.demo.tiny import build_model
from onepass.train.model import PACKED_ATTENTION, choose_attention, evaluating

from conftest import make_config, trained


def test_evaluating_restores_training_mode_even_when_the_block_raises():
    model = build_model(None, vocab_size=64)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(model):
            assert not model.training and not torch.is_grad_enabled()
            raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled()
    model.eval()
    with evaluating(model):
        pass
    assert not model.training  # back to the mode it was in, not to training


@pytest.mark.parametrize("device, dtype, installed, expected", [
    ("cuda", torch.bfloat16, True, "flash_attention_2"),
    ("cuda", torch.float32, True, PACKED_ATTENTION),  # flash-attention rejects fp32: chat/score load fp32
    ("cuda", torch.bfloat16, False, PACKED_ATTENTION),  # transformers' own check says no (e.g. flash-attn < 2.3.3)
    ("cpu", torch.bfloat16, True, PACKED_ATTENTION),
])
def test_flash_attention_only_where_transformers_finds_it_usable_and_the_model_computes_in_half_precision(
        device, dtype, installed, expected):
    assert choose_attention(device, dtype, flash_available=lambda: installed) == expected


def test_the_export_keeps_the_base_models_dtype_and_loads_with_transformers(run_assets, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, tokenizer_dir, _, _ = run_assets
    AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    result = trained(make_config(run_assets, tmp_path / "out", f"model={tmp_path / 'bf16'}", "max_steps=1")).fit()
    with safe_open(result.final_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(result.final_dir).dtype == torch.bfloat16
