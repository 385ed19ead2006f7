"""The trained model as an ordinary Hugging Face directory: weights (LoRA merged), tokenizer with the
chat template used for training, and the run's config. Loads with transformers alone. Written from the
objects trained (the caller's tokenizer is left as it is)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from onepass.config import TrainConfig, save_config
from onepass.data.chat_template import ChatTemplate
from onepass.train import distributed
from onepass.train.distributed import Cluster
from onepass.hub import local_or_hub
from onepass.compat import base_model
from onepass.train.handle import build_model


def export_model(model: Any, tokenizer: Any, template: ChatTemplate, config: TrainConfig, output_dir: Path,
                 cluster: Cluster = Cluster()) -> Path:
    """Write `output_dir/final` from rank 0. Collective under FSDP, which first gathers the full weights."""
    final = output_dir / "final"
    whole = full_model(model, config, cluster)
    if cluster.is_main:
        dtype = saved_dtype(whole, config.model)
        state = whole.state_dict()
        if config.lora.enabled and config.lora.merge_on_export:
            whole, state = whole.get_base_model(), merged_state_dict(whole)
        whole.save_pretrained(str(final), state_dict={name: value.to(dtype) if value.is_floating_point() else value
                                                      for name, value in state.items()})
        _fix_saved_config(final, dtype)
        saved = copy.copy(tokenizer)  # the template trained with, written without changing the caller's tokenizer
        saved.chat_template = template.source
        saved.save_pretrained(str(final))
        save_config(config, final / "onepass_config.yaml")
    distributed.barrier(cluster)
    return final


def full_model(model: Any, config: TrainConfig, cluster: Cluster) -> Any:
    """The trained model, whole: as it is, or (under FSDP) rebuilt on rank 0's CPU from the gathered
    full state dict; None on the other ranks under FSDP."""
    if not (cluster.is_distributed and config.strategy == "fsdp"):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not cluster.is_main:
        return None
    whole = build_model(dataclasses.replace(config, compile=False, gradient_checkpointing=False),
                        torch.device("cpu")).model
    whole.load_state_dict(full)
    return whole


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA model with its adapters merged into the weights they adapt (peft's own
    `get_delta_weight`), under the base model's own names, made layer by layer: the LoRA model itself
    is not changed (a library caller gets it back as trained), and no second copy of the model is made.
    A weight shared by two names (an output layer tied to the embedding) gets its delta under both. What
    onepass's config never makes but a model given to it may carry (modules to save, DoRA, LoRA biases,
    adapters already merged) is merged by peft itself, on a copy."""
    base = model.get_base_model()
    if _needs_peft_merge(base):
        return copy.deepcopy(model).merge_and_unload().state_dict()
    deltas: dict[int, torch.Tensor] = {}  # id of the adapted weight -> the sum of its adapters' deltas
    for module in base.modules():
        if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        adapters = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
        for adapter in module.active_adapters:
            if adapter in adapters:
                key, delta = id(module.base_layer.weight), module.get_delta_weight(adapter)
                deltas[key] = delta if key not in deltas else deltas[key] + delta
    state = {}
    for key, value in base.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        delta = deltas.get(id(value))
        value = value.detach()
        state[key.replace(".base_layer.", ".")] = value if delta is None else value + delta.to(value.dtype)
    return state


def _needs_peft_merge(model: Any) -> bool:
    for module in model.modules():
        if type(module).__name__ == "ModulesToSaveWrapper" or getattr(module, "merged", False):
            return True
        if any(getattr(module, "use_dora", {}).values()) or any(getattr(module, "lora_bias", {}).values()):
            return True
    return False


def saved_dtype(model: Any, model_dir: str | Path) -> torch.dtype:
    """The dtype to write: the base model's (`base_dtype`) where it was loaded from a directory, else
    what the model's config says it was made in (fp32 if nothing)."""
    if model_dir:
        return base_dtype(model_dir)
    config = getattr(base_model(model), "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def base_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the base model was saved in (config.json's dtype / torch_dtype; fp32 if it says none):
    training keeps fp32 master weights, the export goes back to the base model's dtype."""
    config_path = local_or_hub(model_dir, "model") / "config.json"
    values = json.loads(config_path.read_text()) if config_path.exists() else {}
    name = values.get("dtype") or values.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _fix_saved_config(final: Path, dtype: torch.dtype) -> None:
    """The saved config names the weights' dtype, and not our packed attention (registered at run time:
    a saved model must load without onepass)."""
    config_path = final / "config.json"
    if config_path.exists():
        values = json.loads(config_path.read_text())
        values.pop("_attn_implementation", None)
        values.pop("attn_implementation", None)
        values.pop("torch_dtype", None)
        values["dtype"] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(values, indent=2))
