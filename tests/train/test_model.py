"""Model helpers: evaluation mode is scoped and always restored; which attention runs; the export's dtype."""

from __future__ import annotations

import pytest
import torch

from onepass.demo.tiny import build_model
from onepass.train.model import evaluating
from onepass.train.attention import PACKED_ATTENTION, choose_attention

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


def test_flash_attention_only_for_model_classes_that_support_it_without_a_hub_kernel():
    """Asked of each class of the zoo, built on the meta device: Gemma-3/4 conditional generation, Llama-4,
    Mllama and others say `_supports_flash_attn = False`; gpt-oss would be redirected to a Hub kernel."""
    import zoo_configs
    from transformers import AutoModelForCausalLM

    from onepass.train.attention import flash_refusal

    chosen = {}
    for name in ("llama", "qwen3", "gpt_oss", "mllama", "gemma3", "mamba"):
        config = zoo_configs.tiny_config(name) if name in zoo_configs.architectures() else None
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.for_model(name)
        with torch.device("meta"):
            model_class = type(AutoModelForCausalLM.from_config(config))
        chosen[name] = choose_attention("cuda", torch.bfloat16, model_class, flash_available=lambda: True)
        supported = getattr(model_class, "_supports_flash_attn", False) and not getattr(
            model_class, "_compatible_flash_implementations", None)
        assert (chosen[name] == "flash_attention_2") is bool(supported), name
        assert (flash_refusal("cuda", torch.bfloat16, model_class, lambda: True) is None) is bool(supported)
    assert chosen["llama"] == chosen["qwen3"] == "flash_attention_2"
    assert chosen["gpt_oss"] == chosen["mllama"] == PACKED_ATTENTION


def test_the_export_keeps_the_base_models_dtype_and_loads_with_transformers(run_assets, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, tokenizer_dir, _, _ = run_assets
    AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    result = trained(make_config(run_assets, tmp_path / "out", f"model={tmp_path / 'bf16'}", "max_steps=1")).fit()
    with safe_open(result.final_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(result.final_dir).dtype == torch.bfloat16


def tiny_vision_language_model(path):
    """A Gemma-3 conditional-generation checkpoint (SigLIP tower + projector + language model), tiny."""
    import transformers as t

    text = t.Gemma3TextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                              bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = t.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = t.Gemma3ForConditionalGeneration(t.Gemma3Config(text_config=text, vision_config=vision,
                                                            mm_tokens_per_image=4))
    model.save_pretrained(path)
    return model


def test_a_vision_language_checkpoint_trains_its_language_model_on_text_and_exports_as_its_own_class(
        run_assets, tmp_path):
    """The vision tower stays frozen, LoRA's default targets (q_proj, ... which SigLIP's layers share)
    attach inside the language model only, and the export is the same conditional-generation class."""
    from transformers import AutoModelForImageTextToText

    original = tiny_vision_language_model(tmp_path / "vlm")
    trainer = trained(make_config(run_assets, tmp_path / "out", f"model={tmp_path / 'vlm'}", "lora.enabled=true",
                                  "max_steps=3", "lr=1e-2"))
    model = trainer.run.model
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted and all(".language_model." in name for name in adapted)
    assert not any(p.requires_grad for name, p in model.named_parameters()
                   if "vision_tower" in name or "multi_modal_projector" in name)
    result = trainer.fit()
    exported = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    assert type(exported).__name__ == "Gemma3ForConditionalGeneration"
    saved = exported.state_dict()
    before = original.state_dict()
    vision = [name for name in before if "vision_tower" in name]
    assert vision and all(torch.equal(saved[name], before[name]) for name in vision)
    language = [name for name in before if "language_model" in name and "q_proj" in name]
    assert any(not torch.equal(saved[name], before[name]) for name in language)  # the adapters, merged, trained


def test_full_fine_tuning_of_a_vision_language_checkpoint_leaves_its_vision_tower_frozen(run_assets, tmp_path):
    tiny_vision_language_model(tmp_path / "vlm")
    model = trained(make_config(run_assets, tmp_path / "out", f"model={tmp_path / 'vlm'}")).run.model
    tower = {name: p.requires_grad for name, p in model.named_parameters()
             if "vision_tower" in name or "multi_modal_projector" in name}
    assert tower and not any(tower.values())
    assert all(p.requires_grad for name, p in model.named_parameters() if "language_model" in name)


def test_the_check_runs_fp32_matmuls_at_full_precision_and_gives_the_users_setting_back():
    """Through torch's precision API, not the legacy allow_tf32 flags newer torch refuses to mix with it."""
    from onepass.train.check import exact_matmuls

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as many GPU users set it
    try:
        with exact_matmuls():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
