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
from onepass.train.model import build_model


def export_model(model: Any, tokenizer: Any, template: ChatTemplate, config: TrainConfig, output_dir: Path,
                 cluster: Cluster = Cluster()) -> Path:
    """Write `output_dir/final` from rank 0. Collective under FSDP, which first gathers the full weights."""
    final = output_dir / "final"
    whole = full_model(model, config, cluster)
    if cluster.is_main:
        if config.lora.enabled and config.lora.merge_on_export:
            whole = whole.merge_and_unload()
        whole.save_pretrained(str(final))
        _reset_attention_in_saved_config(final)
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


def _reset_attention_in_saved_config(final: Path) -> None:
    """Our packed attention is registered at run time; a saved model must load without onepass."""
    config_path = final / "config.json"
    if config_path.exists():
        values = json.loads(config_path.read_text())
        if values.get("_attn_implementation") or values.get("attn_implementation"):
            values.pop("_attn_implementation", None)
            values.pop("attn_implementation", None)
            config_path.write_text(json.dumps(values, indent=2))
