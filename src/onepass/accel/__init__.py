"""Accelerations: faster ways to compute what the stock core computes, each listed here with what it
replaces, where it applies, the test that proves it changes nothing and the bench script that measured
its gain. `accelerations: auto` (the default) installs those measured on this kind of device (the CPU
so far; none on CUDA until measured on a GPU), `none` runs the stock core (the model's own modules and
forward, the output layer in checkpointed chunks), a list installs those named. A run prints what it
installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onepass.compat import base_model
from onepass.errors import OnepassError

ATTRIBUTE = "onepass_accelerations"  # on the Hugging Face model: the names installed


@dataclass(frozen=True)
class Acceleration:
    name: str
    replaces: str
    devices: tuple[str, ...]  # where it was measured to pay: `auto` installs it there only
    bf16_only: bool  # it changes something only under bf16 autocast
    off_under_checkpointing: bool  # activation checkpointing keeps one layer's activations: nothing to save
    proof: str  # the tests that show it changes nothing
    measured_by: str  # the bench script of its gain


REGISTRY = (
    Acceleration("fused-loss", "the output layer + cross-entropy over chunks recomputed in backward "
                 "(loss.nll_at): gradients made in forward while the chunk's logits exist (accel/fused_loss.py)",
                 ("cpu",), False, False, "tests/train/test_loss.py", "bench/profile_step.py"),
    Acceleration("tied-gradient", "autograd's dense gradient of an input embedding tied to the output layer, "
                 "then added: its rows added into the fused loss's gradient in place (accel/fused_loss.py)",
                 ("cpu",), False, False, "tests/train/test_loss.py, tests/train/test_distributed.py",
                 "bench/real_model.py"),
    Acceleration("loss-workspace", "fresh vocabulary-sized temporaries in every micro-batch under bf16: buffers "
                 "kept from one to the next (accel/fused_loss.py LossWorkspace)", ("cpu",), True, False,
                 "tests/train/test_loss.py", "bench/profile_step.py"),
    Acceleration("grouped-attention", "SDPA on blocks of up to 256 keys under bf16: two grouped bf16 matmuls "
                 "(accel/grouped_attention.py)", ("cpu",), True, False, "tests/train/test_packing.py",
                 "bench/attention_blocks.py"),
    Acceleration("lean-activations", "RMSNorm and SwiGLU MLP forwards of modules whose code is Llama's: the "
                 "same outputs, fewer tensors kept for backward (accel/lean_activations.py)", ("cpu",), False,
                 True, "tests/accel/test_lean_activations.py, tests/train/test_architectures.py", "bench/memory.py"),
    Acceleration("cast-once", "autocast's cast of one input per projection, rotary tables in fp32 and kept "
                 "bf16 weight copies: one shared cast, tables in bf16, weights recast in backward "
                 "(accel/cast_once.py)", ("cpu",), True, False, "tests/accel/test_cast_once.py",
                 "bench/real_model.py"),
)
NAMES = tuple(a.name for a in REGISTRY)


def choose(setting: str | list[str], device_type: str, bf16: bool, checkpointing: bool) -> tuple[str, ...]:
    """The names to install for `accelerations: setting` on this device and precision."""
    if setting == "none":
        return ()
    if setting == "auto":
        return tuple(a.name for a in REGISTRY if device_type in a.devices and (bf16 or not a.bf16_only)
                     and not (checkpointing and a.off_under_checkpointing))
    names = check_setting(setting)
    return tuple(name for name in NAMES if name in names)


def check_setting(setting: Any) -> list[str]:
    """The names an `accelerations:` setting lists (auto and none list none), or a one-line error."""
    if setting in ("auto", "none"):
        return []
    names = [setting] if isinstance(setting, str) else setting
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise OnepassError(f"config key 'accelerations': {setting!r} is not allowed. Fix: auto, none, or a list of "
                           f"{', '.join(NAMES)}.")
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise OnepassError(f"config key 'accelerations': unknown {', '.join(map(repr, unknown))}. Fix: auto, none, "
                           f"or a list of {', '.join(NAMES)}.")
    return names


def install(model: Any, names: tuple[str, ...], checkpointing: bool = False) -> tuple[str, ...]:
    """Install `names` on `model` (once); the names installed."""
    from onepass.accel import grouped_attention
    from onepass.accel.cast_once import cast_once
    from onepass.accel.lean_activations import lean_activations

    setattr(base_model(model), ATTRIBUTE, frozenset(names))
    grouped_attention.mark(model, "grouped-attention" in names)
    if "lean-activations" in names:
        lean_activations(model)
    if "cast-once" in names:
        cast_once(model, recast=not checkpointing)
    return names


# What runs for a model onepass did not build with `build_model` (scoring, chat, a test's or a script's
# model): the accelerations that need nothing installed, where they were measured
UNINSTALLED = ("fused-loss", "tied-gradient", "loss-workspace")


def enabled(model: Any, name: str) -> bool:
    """Whether `name` runs for `model`: what `install` put on it, else `UNINSTALLED` on the devices
    they were measured on."""
    base = base_model(model)
    installed = getattr(base, ATTRIBUTE, None)
    if installed is not None:
        return name in installed
    if name not in UNINSTALLED:
        return False
    device = next(base.parameters()).device.type
    return device in next(a for a in REGISTRY if a.name == name).devices


def describe(names: tuple[str, ...], device_type: str, bf16: bool) -> str:
    where = f"{device_type}, {'bf16' if bf16 else 'fp32'}"
    return f"accelerations: {', '.join(names)} ({where})" if names else \
        f"accelerations: none ({where}; the stock core)"
