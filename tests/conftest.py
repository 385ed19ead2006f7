"""Shared test assets, all built locally: a tiny BPE tokenizer, tiny models, small data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from onepass.config import load_config
from onepass.demo.tiny import build_model, build_tokenizer, random_conversations


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from onepass.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session", autouse=True)
def library_logs_on_stderr():
    """The library's log lines on stderr, as the command line shows them (tests read them with capsys)."""
    from onepass.cli.main import show_logs

    show_logs()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEPASS_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chat(*turns: str, system: str | None = None) -> dict:
    """{"messages": [...]} from alternating user/assistant texts."""
    messages = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def sums(count: int, seed: int) -> list[dict]:
    """Short conversations of 1 to 3 turns ("What is 3 + 4?" / "3 + 4 = 7."): quick to train on."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        turns = []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            turns += [f"What is {a} + {b}?", f"{a} + {b} = {a + b}."]
        records.append(chat(*turns))
    return records


def final_weights(output_dir: Path) -> dict:
    """The weights of a run's exported model (output_dir/final)."""
    from safetensors.torch import load_file

    return load_file(str(output_dir / "final" / "model.safetensors"))


def constant_model(model_dir: Path, tokenizer, word: str) -> str:
    """Save a Llama-style model to `model_dir` that predicts the first token of `word` after any
    context, with near certainty: every token embeds to the same vector, the blocks add nothing, and
    only that token's output row points along it. Returns the token's text. Its greedy replies and
    its rankings are known in advance."""
    import shutil

    import torch

    from onepass.demo.tiny import build_model

    token = tokenizer.backend_tokenizer.encode(word, add_special_tokens=False).ids[0]
    model = build_model(None, vocab_size=len(tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.get_output_embeddings().weight
        head.zero_()
        head[token] = 1.0  # logit = hidden size (64) for this token, 0 for every other
    shutil.copytree(Path(tokenizer.name_or_path), model_dir, dirs_exist_ok=True)
    model.save_pretrained(str(model_dir))
    return tokenizer.decode([token])


def tree_paths(example) -> list[list[int]]:
    """Each leaf's path from the root of an example (one path for a sequence), as node indices."""
    parent = example.parents
    paths = []
    for leaf in sorted(set(range(len(parent))) - set(parent.tolist())):
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = int(parent[node])
        paths.append(path[::-1])
    return paths


# --- a training run on a tiny model (tests/train) ---

@pytest.fixture(scope="session")
def run_assets(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("run")
    build_model(root / "model", vocab_size=512, hidden_size=32, intermediate_size=64)
    data = write_jsonl(root / "train.jsonl", random_conversations(40, seed=1, max_turns=2))
    held_out = write_jsonl(root / "eval.jsonl", random_conversations(8, seed=2, max_turns=2))
    return root, tokenizer_dir, data, held_out


def make_config(run_assets, output_dir, *overrides):
    root, tokenizer_dir, data, held_out = run_assets
    return load_config(None, [f"model={root / 'model'}", f"tokenizer={tokenizer_dir}", f"data.train=[{data}]",
                              f"data.eval=[{held_out}]", f"output_dir={output_dir}", "max_seq_len=256",
                              "batch_size=2", "grad_accum=2", "lr=1e-3", "progress=false", "warmup_steps=2", "precision=fp32",
                              *overrides])


def trained(config):
    from onepass.train.run import build_run
    from onepass.train.trainer import Trainer

    return Trainer(build_run(config))




@pytest.fixture
def fake_flash(monkeypatch):
    """flash-attn on the CPU, for the CUDA branches CI cannot run: a `flash_attn` module whose varlen
    kernel is SDPA over each `cu_seqlens` segment, and which checks what the real one requires (bf16/fp16
    inputs, int32 `cu_seqlens` on the inputs' device). Plugged in under transformers' own flash dispatch
    (`modeling_flash_attention_utils`), so onepass's kwargs go through transformers' real code. Yields
    `calls` (each call's dtype and number of segments) and `leak` (set it: the kernel attends across
    segments, as a broken one would)."""
    import sys
    import types

    import torch
    import torch.nn.functional as F
    import transformers.modeling_flash_attention_utils as flash_utils

    state = types.SimpleNamespace(calls=[], leak=False)

    def attend(q, k, v, scale, causal, window):  # (L, H, D) each
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        queries, keys = q.shape[2], k.shape[2]
        distance = torch.arange(keys - queries, keys)[:, None] - torch.arange(keys)[None, :]
        mask = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
        if window is not None and window[0] >= 0:
            mask &= distance <= window[0]
        if k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0].transpose(0, 1)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.device == q.device, (cu.dtype, cu.device)
        state.calls.append((q.dtype, len(cu_seqlens_q) - 1))
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        if state.leak:
            bounds_q, bounds_k = [0, bounds_q[-1]], [0, bounds_k[-1]]
        return torch.cat([attend(q[a:b], k[c:d], v[c:d], softmax_scale, causal, window_size)
                          for a, b, c, d in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])])

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        return torch.stack([attend(a, b, c, softmax_scale, causal, window_size) for a, b, c in zip(q, k, v)])

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func, module.flash_attn_with_kvcache = (
        flash_attn_func, flash_attn_varlen_func, None)
    module.__version__ = "2.8.3"
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = flash_utils._pad_input, flash_utils._unpad_input
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(flash_utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(flash_utils, "is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(flash_utils, "is_flash_attn_4_available", lambda: False)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    yield state


def use_fake_flash(model):
    """The model on flash_attention_2. transformers' own switch refuses flash on a CPU model (and, with
    `kernels` installed, would look for a Hub kernel), so this model's switch sets its config's field."""
    def switch(name):
        model.config._attn_implementation = name

    model.set_attn_implementation = switch
    switch("flash_attention_2")
    return model
