"""The export of a LoRA run: the adapters merged into the weights, as peft's own merge makes them."""

from __future__ import annotations

import copy

import pytest
import torch

from onepass.demo.tiny import build_model
from onepass.train.export import merged_state_dict


@pytest.mark.parametrize("targets, tied", [(["q_proj", "v_proj"], False), (["embed_tokens", "q_proj"], False),
                                           (["lm_head", "q_proj"], True), (["embed_tokens"], True)])
def test_merged_weights_equal_peft_merge_and_unload_and_leave_the_lora_model_unchanged(targets, tied):
    """Attention and embedding adapters, and an adapted weight shared by two names (a tied output layer),
    merged to the bit as `merge_and_unload` merges them, with the LoRA model itself untouched."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(build_model(None, vocab_size=100, tie_embeddings=tied),
                          LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    before = {name: value.clone() for name, value in lora.state_dict().items()}
    merged = merged_state_dict(lora)
    expected = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name
    assert all(torch.equal(value, before[name]) for name, value in lora.state_dict().items())
