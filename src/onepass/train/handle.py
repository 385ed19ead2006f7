"""A model as onepass prepares it, for training or for scoring, and the way back: `ModelHandle`.

Preparing chooses the attention (packed rows on onepass's packed SDPA or flash-attention varlen, where
the model's attention layers take transformers' interface), installs the accelerations asked for
(onepass.accel) and, for training, applies the rest in one order: freeze → LoRA → checkpointing →
accelerations → compile (data parallelism wraps the objective afterwards, in run.py). Everything
onepass changed is held by the handle, not on the model: the attention the model came with, the
accelerations' hooks and replaced forwards, the frozen parameters. `restore()` gives the model back as
it came, with its own attention and modules (LoRA adapters, once trained, stay: they are the result).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from onepass import accel
from onepass.compat import (attention_implementation, base_model, disable_activation_checkpointing,
                            enable_activation_checkpointing)
from onepass.errors import OnepassError
from onepass.train.device import uses_bf16
from onepass.train.loss import STOCK_HEAD_LOSS
from onepass.train.model import (backbone_and_head, device_of, freeze_outside_language_model, language_model_targets,
                                 load_model)
from onepass.train.attention import (describe_attention, flash_refusal, is_packed_attention, own_attention_of,
                                     packing_of, use_fastest_packing)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from onepass.config import TrainConfig
    from onepass.train.check import PackingCheck


@dataclass
class ModelHandle:
    """A model prepared by onepass: `model` is what to train or score (the model given, or its LoRA
    wrapper), `head_loss` the output layer's loss the objective and scoring take, `check` the start-up
    proof where it ran. `restore()` undoes the preparation."""

    model: Any
    original_attention: str
    accelerations: accel.Installed
    check: PackingCheck | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)

    @property
    def head_loss(self) -> Any:
        return self.accelerations.head_loss

    @property
    def packing(self) -> str:
        return packing_of(self.model)

    def restore(self) -> Any:
        """The model with its own attention, modules and trainable parameters again; returns `model`."""
        self.accelerations.restore()
        while self.undo:
            self.undo.pop()()
        own_attention_of(self.model, self.original_attention)
        return self.model

    def __enter__(self) -> ModelHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def prepare_model(model: Any, accelerations: str | list[str] = "auto") -> ModelHandle:
    """`model` on packed attention where it can be (flash-attention varlen on CUDA where usable), with the
    accelerations `accelerations` names for its device outside autocast (no bf16-only ones): what
    `onepass.logprobs`, `rank` and `check` run (training's is `prepare_for_training`)."""
    base = base_model(model)
    original = attention_implementation(base)
    device = device_of(model)
    use_fastest_packing(model, device.type, next(base.parameters()).dtype)
    try:
        installed = accel.install(model, accel.choose(accelerations, device.type, bf16=False, checkpointing=False))
    except BaseException:
        own_attention_of(model, original)
        raise
    return ModelHandle(model, original, installed)


def check_model(handle: ModelHandle, compare_flash: bool = True) -> ModelHandle:
    """The start-up proof on the handle's model (`check.check_packing`, with its head loss), kept on the
    handle; a model the check refuses is restored before the error."""
    from onepass.train.check import apply_check, check_packing

    try:
        handle.check = check_packing(handle.model, compare_flash=compare_flash, head_loss=handle.head_loss,
                                     own=handle.original_attention)
    except BaseException:
        handle.restore()
        raise
    apply_check(handle.model, handle.check.packing, handle.check.attention)
    return handle


def prepare_for_training(model: Any, config: TrainConfig, device: torch.device, announce: bool = False
                         ) -> ModelHandle:
    """The model to train, prepared in one order: packed attention, the language model alone trainable
    (`freeze_outside_language_model`), LoRA adapters, activation checkpointing, the configured
    accelerations, compile. Works the same on a model onepass loaded and on one given to it; where a
    step fails, what the steps before it did is undone before the error."""
    bf16 = uses_bf16(config.precision, device)
    base = base_model(model)
    handle = ModelHandle(model, attention_implementation(base), accel.Installed((), STOCK_HEAD_LOSS))
    was_training = model.training
    handle.undo.append(lambda: model.train(was_training))
    try:
        attention = use_fastest_packing(model, device.type, torch.bfloat16 if bf16 else torch.float32)
        if announce:
            why = None
            if device.type == "cuda" and is_packed_attention(attention):  # flash was refused, or failed to load
                why = flash_refusal(device.type, torch.bfloat16 if bf16 else torch.float32, type(base)) or \
                    "flash-attn failed to load"
            log.info(describe_attention(attention, why))
        _freeze_outside_language_model(handle, announce)
        if config.lora.enabled:
            handle.model = _with_lora(model, config)
        if config.gradient_checkpointing:
            handle.undo.append(with_activation_checkpointing(handle.model, input_grads=config.lora.enabled))
        handle.accelerations = accel.install(handle.model, accel.choose(
            config.accelerations, device.type, bf16, config.gradient_checkpointing), config.gradient_checkpointing)
        if announce:
            log.info(accel.describe(handle.accelerations.names, device.type, bf16))
        if config.compile:
            trunk = backbone_and_head(handle.model)[0]
            trunk.compile()
            handle.undo.append(lambda: setattr(trunk, "_compiled_call_impl", None))
        handle.model.train()
    except BaseException:
        handle.restore()
        raise
    return handle


def _freeze_outside_language_model(handle: ModelHandle, announce: bool) -> None:
    frozen = freeze_outside_language_model(handle.model)
    if not frozen:
        return
    parameters = dict(handle.model.named_parameters())
    handle.undo.append(lambda: [parameters[name].requires_grad_(True) for name in frozen])
    if announce:
        parts = sorted({name.split(".")[1] if name.count(".") > 1 else name.split(".")[0] for name in frozen})
        log.info(f"frozen: {len(frozen)} parameters outside the language model ({', '.join(parts)}); text trains "
                 "the language model only")


def with_activation_checkpointing(model: Any, input_grads: bool = False) -> Callable[[], None]:
    """Activation checkpointing on (with `input_grads`, the input embeddings' outputs requiring gradients,
    as LoRA over a frozen model needs); what turns it off again, the hooks transformers added included."""
    embeddings = base_model(model).get_input_embeddings()
    before = set(embeddings._forward_hooks) if embeddings is not None else set()
    enable_activation_checkpointing(model)
    if input_grads:
        model.enable_input_require_grads()

    def undo() -> None:
        disable_activation_checkpointing(model)
        if embeddings is not None:
            for key in set(embeddings._forward_hooks) - before:
                embeddings._forward_hooks.pop(key, None)
    return undo


def _with_lora(model: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=language_model_targets(model, config.lora.targets), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise OnepassError(f"lora.targets {config.lora.targets}: {error}") from None


def build_model(config: TrainConfig, device: torch.device, announce: bool = False, weights: bool = True,
                compute_device: torch.device | None = None) -> ModelHandle:
    """The model of `config.model` loaded (see `load_model`; without `weights` on the meta device) and
    prepared for training (`prepare_for_training`)."""
    compute_device = compute_device or device  # FSDP2's rank 0 loads into CPU memory, computes on the GPU
    model = load_model(config.model, device, weights=weights)
    return prepare_for_training(model, config, compute_device, announce)
