"""Accelerations: faster ways to compute what the stock core computes, each listed here with what it
replaces, where it applies, the test that proves it changes nothing and the bench script that measured
its gain. `accelerations: auto` (the default) installs those measured on this kind of device (the CPU
so far; none on CUDA until measured on a GPU), `none` runs the stock core (the model's own modules and
forward, the output layer in checkpointed chunks), a list installs those named. A run prints what it
installed.

The stock core knows none of them: the objective takes a head-loss strategy (`loss.HeadLoss`), the
packed attention a block-attention function (`attention.sdpa_block`), and the model's own modules run
their own forwards. `install` puts the faster ones in place, all here, and returns what it did as an
`Installed`, whose `restore()` takes them out again; nothing is recorded on the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from onepass.errors import OnepassError


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


@dataclass
class Installed:
    """What `install` put on a model: the names, the head-loss strategy the objective and scoring take,
    and how to take each change out again (`restore`)."""

    names: tuple[str, ...]
    head_loss: Any  # loss.HeadLoss: the stock one, or the fused loss's
    undo: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        """The model's own forwards, hooks and attention back, in the reverse order of installing."""
        while self.undo:
            self.undo.pop()()


def install(model: Any, names: tuple[str, ...], checkpointing: bool = False) -> Installed:
    """Install `names` on `model`; what was installed, to pass on (`head_loss`) and to `restore`."""
    from onepass.accel import grouped_attention
    from onepass.accel.cast_once import cast_once
    from onepass.accel.fused_loss import FusedHeadLoss, LossWorkspace, TiedGradient
    from onepass.accel.lean_activations import lean_activations
    from onepass.train.loss import STOCK_HEAD_LOSS

    installed = Installed(tuple(names), STOCK_HEAD_LOSS)
    if "fused-loss" in names:
        tie = TiedGradient.install(model) if "tied-gradient" in names else None
        if tie is not None:
            installed.undo.append(tie.remove)
        installed.head_loss = FusedHeadLoss(LossWorkspace() if "loss-workspace" in names else None, tie)
    if "grouped-attention" in names:
        installed.undo.append(grouped_attention.install(model))
    if "lean-activations" in names:
        installed.undo.append(lean_activations(model))
    if "cast-once" in names:
        installed.undo.append(cast_once(model, recast=not checkpointing))
    return installed


def describe(names: tuple[str, ...], device_type: str, bf16: bool) -> str:
    where = f"{device_type}, {'bf16' if bf16 else 'fp32'}"
    return f"accelerations: {', '.join(names)} ({where})" if names else \
        f"accelerations: none ({where}; the stock core)"
