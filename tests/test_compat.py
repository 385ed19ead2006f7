"""Each shim over another library's private API or version difference still does its job."""

from __future__ import annotations

import ctypes
import inspect
import os

import pytest
import torch

from onepass import compat


def test_jinja_templates_compile_in_transformers_environment_with_its_helpers():
    template = compat.compile_jinja_template(
        "{{ messages[0]['content'] | tojson }}{% if x %}{{ raise_exception('refused') }}{% endif %}")
    assert template.render(messages=[{"content": "hi"}]) == '"hi"'
    with pytest.raises(Exception, match="refused"):
        template.render(messages=[{"content": "hi"}], x=True)


def test_jinja_renderer_renders_what_the_template_renders():
    source = ("{% set ns = namespace(n=0) %}{% set greeting = 'hi' %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
              "{{ greeting }} {{ m['content'] | tojson }} {{ eos_token }}{{ ns.n }}{% endfor %}"
              "{% if add_generation_prompt %}{{ strftime_now('%Y') | length }}{% endif %}"
              "{% if tools %}{{ raise_exception('no tools here') }}{% endif %}")
    renderer = compat.JinjaRenderer(source, {"eos_token": "</s>", "tools": None})
    template = compat.compile_jinja_template(source)
    messages = [{"content": "a"}, {"content": "b"}]
    for prompt in (False, True):
        expected = template.render(messages=messages, add_generation_prompt=prompt, eos_token="</s>", tools=None)
        assert renderer.render(messages=messages, add_generation_prompt=prompt) == expected
    assert renderer.render(messages=[], add_generation_prompt=False) == ""  # no state kept between calls
    with pytest.raises(Exception, match="no tools here"):
        renderer.render(messages=messages, tools=[{"name": "x"}])


def test_ddp_buffer_sync_keyword_is_one_distributed_data_parallel_accepts():
    from torch.nn.parallel import DistributedDataParallel

    [(keyword, value)] = compat.ddp_without_buffer_sync().items()
    assert keyword in inspect.signature(DistributedDataParallel).parameters and value is False


def test_the_default_store_is_reachable_under_a_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        store = compat.distributed_store()
        assert store.add("onepass/test", 1) == 1 and store.add("onepass/test", 1) == 2
    finally:
        dist.destroy_process_group()


def test_activation_checkpointing_is_switched_on_without_reentrant_checkpoints():
    from onepass.demo.tiny import build_model

    model = build_model(None, vocab_size=64)
    compat.enable_activation_checkpointing(model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    loss = model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss
    loss.backward()  # runs through the checkpointed layers
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_bf16_matrix_units_are_found_as_proc_cpuinfo_lists_them():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert compat.cpu_has_fast_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_after_keep_freed_memory_training_steps_reuse_their_memory_without_page_faults():
    """Steps that allocate and free the same mix of tensors of 1.5-28 MB (weight casts, activations,
    gradients): without the setting glibc returns and re-faults much of it every step."""
    import random
    import resource

    if not compat.keep_freed_memory():
        pytest.skip("not glibc")
    sizes = random.Random(0).choices([400_000, 885_000, 3 * 2**20, 7_000_000], k=20)

    def step() -> None:
        tensors = [torch.empty(n).fill_(1.0) for n in sizes]
        del tensors

    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 15_000  # glibc by default: about 34,000


KERNEL_CACHE_PROBE = """
import ctypes, sys
import torch
from onepass import compat
if sys.argv[1] == "bounded":
    compat.bound_kernel_caches()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
weight = torch.randn(256, 256, dtype=torch.bfloat16)
torch.randn(8, 256, dtype=torch.bfloat16) @ weight
before = libc.mallinfo2().uordblks
for rows in range(100, 400):  # a packed row of a new length every step
    torch.randn(rows, 256, dtype=torch.bfloat16) @ weight
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


def test_bf16_matmuls_of_ever_new_shapes_keep_a_bounded_number_of_kernels_after_bound_kernel_caches():
    """oneDNN and ideep cache a kernel per matmul shape (1,024 each by default, ~0.5 MB apiece); packed
    rows meet a new length every step. 300 new shapes: ~160 MB held by default, ~30 with the cap."""
    import subprocess
    import sys

    if not compat.cpu_has_fast_bf16():
        pytest.skip("bf16 matmuls do not go through oneDNN's bf16 kernels here")
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}

    def held_mib(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", KERNEL_CACHE_PROBE, mode], capture_output=True, text=True,
                              env=env, check=True)
        return float(done.stdout.split()[-1])

    unbounded, bounded = held_mib("default"), held_mib("bounded")
    assert bounded < 60 < unbounded, (bounded, unbounded)


def test_bound_kernel_caches_keeps_a_capacity_the_user_set(monkeypatch):
    monkeypatch.setattr(os, "environ", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"})
    compat.bound_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
    assert os.environ["LRU_CACHE_CAPACITY"] == str(compat.KERNEL_CACHE_CAPACITY)


def test_the_model_private_flags_onepass_reads_are_what_transformers_sets():
    import transformers as t

    from onepass.demo.tiny import build_model

    llama = build_model(None, vocab_size=64)
    gemma2 = t.Gemma2ForCausalLM(t.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=16))
    bloom = t.BloomForCausalLM(t.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    assert compat.supports_sdpa(llama) and not compat.supports_sdpa(gemma2)  # soft-capping: eager
    assert compat.takes_attention_interface(llama) and not compat.takes_attention_interface(bloom)
    assert compat.attention_implementation(llama) == llama.config._attn_implementation
    mixtral = t.MixtralForCausalLM(t.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                   num_local_experts=2))
    assert compat.load_balancing_loss_function(mixtral).__name__ == "load_balancing_loss_func"
    assert compat.load_balancing_loss_function(llama) is None
    assert compat.base_model(llama) is llama


def test_models_load_with_their_own_modules_and_no_hub_kernels(run_assets):
    from transformers import AutoModelForCausalLM

    from onepass.compat import own_modules_load_kwargs

    model = AutoModelForCausalLM.from_pretrained(run_assets[0] / "model", **own_modules_load_kwargs())
    model.train()
    model.eval()
    assert not getattr(model, "use_kernels", False)
