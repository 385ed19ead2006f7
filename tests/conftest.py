"""Shared test assets, all built locally: a tiny BPE tokenizer, tiny models, small data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from onepass.demo.tiny import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from onepass.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


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
