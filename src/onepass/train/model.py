"""The model: loading a Hugging Face causal LM as transformers loads it (its own attention and
modules), and reaching its trunk, output layer and language model. The packed attention and the
packing mode are attention.py's; preparing a model for training or scoring (and undoing it) is
handle.py's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from onepass.compat import base_model, own_modules_load_kwargs
from onepass.errors import OnepassError
from onepass.hub import local_or_hub
from onepass.train.device import default_device

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_dir(path: str | Path) -> Path:
    """The local model directory `path` names (a Hub id: its snapshot, onepass.hub), checked."""
    path = local_or_hub(path, "model")
    if not path.is_dir():
        raise OnepassError(f"model directory not found: {path}. Fix: give a local Hugging Face model directory or a "
                           "Hub id (org/name).")
    if not (path / "config.json").exists():
        raise OnepassError(f"{path} has no config.json, so it is not a Hugging Face model directory.")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise OnepassError(f"{path} has no weights ({', '.join(WEIGHT_FILES[::2])}). Fix: save the model with "
                           "model.save_pretrained(path).")
    return path


def load_model(path: str | Path, device: torch.device | str | None = None, dtype: Any = None,
               weights: bool = True) -> Any:
    """AutoModelForCausalLM from a local directory or Hub id, on `device` (default: the process's
    device), as transformers loads it (its own attention and modules: onepass prepares it for training
    or scoring in handle.py). Without `weights`, the model is built from its config on the meta device
    (no memory; FSDP ranks that receive their shards from rank 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_model_dir(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    try:
        if not weights:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **own_modules_load_kwargs())
    except (OSError, ValueError, ImportError) as error:
        raise OnepassError(f"{path}: could not load the model ({error}).") from None
    return model if not weights else model.to(device)


def language_model_parameters(model: Any) -> set[int]:
    """ids of the parameters of the text path: the decoder (`get_decoder`: the whole trunk of a causal
    LM, the language model of a vision-language one) and the output layer."""
    base = base_model(model)
    modules = [base.get_decoder(), base.get_output_embeddings(), base.get_input_embeddings()]
    return {id(p) for module in modules if module is not None for p in module.parameters()}


def freeze_outside_language_model(model: Any) -> list[str]:
    """A checkpoint that loads with a vision or audio tower (Gemma-3 4B and up, Qwen-VL) fine-tunes its
    language model on text conversations: everything outside it (the tower, its projector) stays
    frozen, as it gets no gradient from text. Returns the names of the frozen parameters."""
    keep = language_model_parameters(model)
    frozen = []
    for name, parameter in model.named_parameters():
        if id(parameter) not in keep and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def language_model_targets(model: Any, targets: list[str]) -> list[str] | str:
    """LoRA's target modules (names like `q_proj`) inside the language model only: SigLIP's and other
    vision towers' attention layers have the same names. The model's own names where it has nothing
    outside its language model."""
    keep = language_model_parameters(model)
    inside, outside = [], []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            own = list(module.parameters())
            (inside if own and all(id(p) in keep for p in own) else outside).append(name)
    return inside if outside and inside else targets


def backbone_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer trunk (input ids → hidden states) and the output projection of a causal LM,
    through a peft wrapper if there is one (LoRA layers live inside the trunk's modules)."""
    model = base_model(model)
    # base_model_prefix names the trunk, except where a class shares it with its multimodal parent
    # (Llama-4's causal LM says `language_model` and keeps its trunk as `model`)
    trunk = getattr(model, model.base_model_prefix, None)
    if trunk is None:
        trunk = model.get_decoder()
    if trunk is model:
        trunk = model.model
    return trunk, model.get_output_embeddings()


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[Any]:
    """The model in eval mode and without gradients for the block, then back in the mode it was in,
    even when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
