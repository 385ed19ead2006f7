"""Casts under autocast: projections that read one tensor share one cast of it, the rotary tables arrive
in the compute dtype, and outside autocast nothing changes."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from onepass.demo.tiny import build_model
from onepass.accel.lean_activations import SavedBytes
from onepass.accel.cast_once import SharedInputCast, cast_once, is_rotary, recast_weights, share_input_casts
from onepass.train.attention import use_packed_attention

HIDDEN = 64


class ActivationCasts(TorchDispatchMode):
    """Counts fp32 → bf16 casts of activations (a last dimension of the hidden size, more than one row)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            source = args[0]
            if source.dtype == torch.float32 and source.dim() == 3 and source.shape[-1] == HIDDEN:
                self.count += 1
        return func(*args, **kwargs)


def with_cast_once(model):
    cast_once(model)
    return model


def tiny(seed: int = 0):
    return use_packed_attention(build_model(None, vocab_size=100, hidden_size=HIDDEN, seed=seed))


def forward_backward(model, ids, autocast: bool = True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_projections_reading_one_tensor_share_one_cast_of_it():
    """q/k/v read the attention norm's output and gate/up the MLP norm's: two casts a layer, not five
    (and one for the output layer)."""
    ids = torch.randint(3, 100, (1, 24))
    counts = []
    for hooked in (False, True):
        model = tiny()
        if hooked:
            cast_once(model)
        with ActivationCasts() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        counts.append(casts.count)
    layers = model.config.num_hidden_layers
    assert counts == [5 * layers + 1, 2 * layers + 1]


def test_a_shared_cast_computes_the_same_forward_pass_and_gradients_to_bf16_precision():
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 24))
    plain_logits, plain_grads = forward_backward(tiny(), ids)
    shared_logits, shared_grads = forward_backward(share_input_casts(tiny()), ids)
    assert torch.equal(plain_logits, shared_logits)  # the same rounding as autocast's own casts
    for name, grad in plain_grads.items():  # the input's gradient parts are summed in bf16 before its cast
        torch.testing.assert_close(shared_grads[name], grad, rtol=2e-2, atol=2e-2 * grad.abs().max().item())


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward under bf16 autocast (parameters left out)."""
    saved = SavedBytes(model.parameters())
    with saved, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().sum().backward()
    return saved.total


def test_linear_layers_keep_their_fp32_weight_for_backward_not_a_bf16_copy():
    ids = torch.randint(3, 100, (2, 24))
    plain_logits, plain_grads = forward_backward(share_input_casts(tiny()), ids)
    recast_logits, recast_grads = forward_backward(recast_weights(share_input_casts(tiny())), ids)
    assert torch.equal(plain_logits, recast_logits)
    for name, grad in plain_grads.items():  # the same bf16 matmuls; only their summation order may differ
        torch.testing.assert_close(recast_grads[name], grad, rtol=1e-2, atol=1e-3 * grad.abs().max().item())
    model = share_input_casts(tiny())
    copies = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert saved_bytes(model, ids) - saved_bytes(recast_weights(share_input_casts(tiny())), ids) == copies


def test_a_tensor_changed_in_place_between_two_readers_is_cast_again():
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    shared = SharedInputCast()
    seen = []
    for layer in (first, second):
        layer.register_forward_pre_hook(shared)
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first(x)
        second(x)
        assert seen[0] is seen[1] and seen[0].dtype == torch.bfloat16
        x.mul_(2)
        second(x)
    assert seen[2] is not seen[1]
    torch.testing.assert_close(seen[2].float(), (x.bfloat16()).float(), rtol=0, atol=0)


def test_rotary_tables_come_in_the_compute_dtype_under_autocast_only():
    model = with_cast_once(tiny())
    rotary = next(module for module in model.modules() if is_rotary(module))
    x, positions = torch.randn(1, 5, HIDDEN), torch.arange(5)[None]
    assert {t.dtype for t in rotary(x, positions)} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in rotary(x, positions)} == {torch.bfloat16}


def test_outside_autocast_the_hooks_change_nothing():
    ids = torch.randint(3, 100, (2, 24))
    plain_logits, plain_grads = forward_backward(tiny(), ids, autocast=False)
    hooked_logits, hooked_grads = forward_backward(with_cast_once(tiny()), ids, autocast=False)
    assert torch.equal(plain_logits, hooked_logits)
    assert all(torch.equal(hooked_grads[name], grad) for name, grad in plain_grads.items())


def test_with_both_casts_bf16_logits_still_track_fp32():
    ids = torch.randint(3, 100, (2, 24))
    reference, _ = forward_backward(tiny(), ids, autocast=False)
    logits, _ = forward_backward(with_cast_once(tiny()), ids)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0.05 * reference.abs().max().item())


def test_the_training_model_shares_casts_under_bf16_only(run_assets, tmp_path):
    from conftest import make_config

    from onepass.accel.cast_once import shares_input_casts
    from onepass.train.handle import build_model as build_training_model

    for precision, hooked in (("bf16", True), ("fp32", False)):
        config = make_config(run_assets, tmp_path / precision, f"precision={precision}")
        model = build_training_model(config, torch.device("cpu")).model
        linear = next(module for module in model.modules() if isinstance(module, torch.nn.Linear))
        assert shares_input_casts(model) is hooked
        assert any(isinstance(hook, SharedInputCast) for hook in linear._forward_pre_hooks.values()) is hooked


def test_lora_layers_and_their_frozen_base_recast_their_weights_with_the_same_gradients():
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 100, (2, 24))
    results = []
    for recast in (False, True):
        torch.manual_seed(1)
        model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
        share_input_casts(model)
        if recast:
            recast_weights(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_logits, plain_grads), (recast_logits, recast_grads) = results
    assert torch.equal(plain_logits, recast_logits)
    assert plain_grads.keys() == recast_grads.keys() and all("lora" in name for name in plain_grads)
    for name, grad in plain_grads.items():  # peft hands the adapters fp32 inputs: gradients meet in another order
        torch.testing.assert_close(recast_grads[name], grad, rtol=2e-2, atol=2e-2 * grad.abs().max().item())
