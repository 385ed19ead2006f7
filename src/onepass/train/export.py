"""The trained model as an ordinary Hugging Face directory: weights (LoRA merged), tokenizer with the
chat template used for training, and the run's config. Loads with transformers alone."""

from __future__ import annotations

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
from onepass.train.model import build_model


def export_model(model: Any, tokenizer: Any, template: ChatTemplate, config: TrainConfig, output_dir: Path,
                 cluster: Cluster = Cluster()) -> Path:
    """Write `output_dir/final` from rank 0. Collective under FSDP, which first gathers the full weights."""
    final = output_dir / "final"
    whole = full_model(model, config, cluster)
    if cluster.is_main:
        if config.lora.enabled and config.lora.merge_on_export:
            whole = whole.merge_and_unload()
        dtype = base_dtype(config.model)
        whole.save_pretrained(str(final), state_dict={name: value.to(dtype) if value.is_floating_point() else value
                                                      for name, value in whole.state_dict().items()})
        _fix_saved_config(final, dtype)
        tokenizer.chat_template = template.source
        tokenizer.save_pretrained(str(final))
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
    whole = build_model(dataclasses.replace(config, compile=False, gradient_checkpointing=False), torch.device("cpu"))
    whole.load_state_dict(full)
    return whole


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
