"""Leaner saved activations: the same forward pass bit for bit, the same gradients to float rounding,
and fewer bytes kept for the backward pass (counted, not timed)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from onepass.demo.tiny import build_model
from onepass.accel.lean_activations import (RMSNormFunction, SavedBytes, SwiGLUFunction, installed_modules,
                                            lean_activations)
from onepass.accel.cast_once import cast_once
from onepass.train.attention import use_packed_attention

HIDDEN, INTERMEDIATE, LAYERS = 64, 160, 2


def with_cast_once(model):
    cast_once(model)
    return model


def tiny():
    model = build_model(None, vocab_size=100, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                        num_layers=LAYERS)
    return use_packed_attention(model)


def forward_backward(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}


def saved_bytes(model, ids, autocast: bool) -> int:
    saved = SavedBytes(model.parameters())
    with saved, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids).logits.float().sum().backward()
    return saved.total


def test_lean_norms_and_mlps_compute_the_same_forward_pass_and_the_same_gradients_in_fp32():
    ids = torch.randint(3, 100, (2, 24))
    plain_logits, plain_grads = forward_backward(tiny(), ids, autocast=False)
    model = tiny()
    lean_activations(model)
    assert len(installed_modules(model)) == 3 * LAYERS + 1  # two norms and an MLP a layer, and the final norm
    lean_logits, lean_grads = forward_backward(model, ids, autocast=False)
    assert torch.equal(plain_logits, lean_logits)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_lean_norms_and_mlps_compute_the_same_forward_pass_and_the_same_gradients_under_bf16_autocast():
    ids = torch.randint(3, 100, (2, 24))
    plain_logits, plain_grads = forward_backward(with_cast_once(tiny()), ids, autocast=True)
    model = tiny()
    lean_activations(model)
    lean_logits, lean_grads = forward_backward(with_cast_once(model), ids, autocast=True)
    assert torch.equal(plain_logits, lean_logits)
    for name, grad in plain_grads.items():  # the same bf16 roundings; only the fp32 norm's sums may differ
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-2, atol=1e-3 * grad.abs().max().item())


def test_each_layer_keeps_its_norms_normalised_outputs_and_its_mlps_activation_and_product_no_more():
    ids = torch.randint(3, 100, (1, 24))
    plain = saved_bytes(tiny(), ids, autocast=False)
    model = tiny()
    lean_activations(model)
    lean = saved_bytes(model, ids, autocast=False)
    tokens = ids.numel()
    # per token: each norm drops its fp32 normalised output (the final norm too), each MLP SiLU's
    # output and the down projection's input (fp32 here)
    assert plain - lean == tokens * 4 * ((2 * LAYERS + 1) * HIDDEN + LAYERS * 2 * INTERMEDIATE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_function_equals_transformers_llama_rmsnorm(dtype):
    """fp32 is the residual stream under autocast; bf16 inputs reach Qwen3's query and key norms."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(HIDDEN) * 0.1)
    x = torch.randn(3, 5, HIDDEN, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, HIDDEN)
    expected = norm(x)
    expected_x, expected_weight = torch.autograd.grad(expected, (x, norm.weight), grad)
    out = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    got_x, got_weight = torch.autograd.grad(out, (x, norm.weight), grad)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_x, expected_x, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got_weight, expected_weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_swiglu_function_with_a_biased_down_projection_equals_the_modules_autograd(autocast):
    torch.manual_seed(0)
    gate, up = torch.nn.Linear(HIDDEN, INTERMEDIATE), torch.nn.Linear(HIDDEN, INTERMEDIATE)
    down = torch.nn.Linear(INTERMEDIATE, HIDDEN)
    x = torch.randn(2, 7, HIDDEN, requires_grad=True)
    parameters = (x, *gate.parameters(), *up.parameters(), *down.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = down(torch.nn.functional.silu(gate(x)) * up(x))
        out = SwiGLUFunction.apply(gate(x), up(x), down.weight, down.bias)
    grad = torch.randn_like(expected)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    for got, want in zip(torch.autograd.grad(out, parameters, grad), torch.autograd.grad(expected, parameters, grad)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_norm_with_other_arithmetic_and_a_lora_wrapped_mlp_keep_their_own_forward():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GemmaConfig

    gemma = AutoModelForCausalLM.from_config(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=4,
                                                         num_key_value_heads=2, head_dim=8))
    lean_activations(gemma)
    assert installed_modules(gemma) == []  # Gemma's norm scales by 1 + weight, its MLP runs GELU
    lora = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["down_proj"], task_type="CAUSAL_LM"))
    lean_activations(lora)
    assert len(installed_modules(lora)) == 2 * LAYERS + 1  # the norms only
    mlp = lora.get_base_model().model.layers[0].mlp
    assert "forward" not in vars(mlp)


def test_the_training_model_keeps_fewer_activations_and_no_weight_copies_unless_it_checkpoints(run_assets, tmp_path):
    """Under activation checkpointing one layer's activations are alive at a time: nothing to gain."""
    from conftest import make_config

    from onepass.train.handle import build_model as build_training_model

    for checkpointing, lean in (("false", True), ("true", False)):
        config = make_config(run_assets, tmp_path / checkpointing, "precision=bf16",
                             f"gradient_checkpointing={checkpointing}")
        model = build_training_model(config, torch.device("cpu")).model
        replaced = [type(m).__name__ for m in model.modules() if "forward" in vars(m)]
        assert any(name.endswith("RMSNorm") for name in replaced) is lean
        assert any(name.endswith("MLP") for name in replaced) is lean
        assert ("Linear" in replaced) is lean


def test_installed_accelerations_stay_installed_through_train_and_eval_switches(run_assets, tmp_path):
    """transformers >= 5.25 kernelizes a model loaded with its default `use_kernels=True` at every
    train()/eval() switch, which pops the forwards the accelerations installed: the run's printed list
    would then be untrue. onepass loads the model's own modules (compat.own_modules_load_kwargs)."""
    from conftest import make_config

    from onepass.train.handle import build_model as build_training_model

    config = make_config(run_assets, tmp_path, "precision=bf16", "accelerations=[lean-activations,cast-once]")
    model = build_training_model(config, torch.device("cpu")).model
    installed = {name: module.forward for name, module in model.named_modules() if "forward" in vars(module)}
    assert any(name.endswith("norm") for name in installed) and any(name.endswith("mlp") for name in installed)
    model.train()
    model.eval()
    model.train()
    assert {name: module.forward for name, module in model.named_modules() if "forward" in vars(module)} == installed


def test_restoring_the_handle_gives_the_model_back_its_own_modules_hooks_and_attention(run_assets, tmp_path):
    """What onepass installs is held by the handle, not the model: after `restore()` no module has a
    forward of its own, no hook is left, the attention is the one the model came with, and no attribute
    named onepass is on the model or any of its modules."""
    from conftest import make_config

    from onepass.compat import attention_implementation
    from onepass.train.handle import prepare_for_training

    config = make_config(run_assets, tmp_path, "precision=bf16")
    model = tiny()
    model.set_attn_implementation("eager")
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    handle = prepare_for_training(model, config, torch.device("cpu"))
    assert handle.accelerations.names and any("forward" in vars(m) for m in model.modules())
    assert attention_implementation(model).startswith("onepass_packed")
    assert handle.restore() is model
    assert attention_implementation(model) == "eager"
    for module in model.modules():
        assert "forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks
        assert not [name for name in vars(module) if "onepass" in name.lower()]
    assert all(torch.equal(p, parameters[name]) for name, p in model.named_parameters())
