"""The start-up proof: on the user's own model, onepass's path equals the model's own forward.

A few short conversations go through onepass's path (packed in one row, the output layer and what
the model's forward does to its logits included) and each alone through the model's own `forward`
with its own attention implementation; their per-token log-probabilities are compared. Where the
packed row differs (a layer that carries one conversation into the next, an attention feature the
packed attention does not know) or fails, each conversation alone through onepass's path is tried
(`model.SEPARATE`); where that differs too, the model is refused: onepass would train something
other than the model's own objective.

The check also asks whether the model's own forward is prefix-consistent: whether a token's
log-probability is the same on a whole sequence as on a prefix that ends after it. Scoring every turn
from one pass (the seeds' identity) rests on it; sparse-attention indexers that pick keys by the
sequence's width, and CPM-Ant's positions, break it. Training goes on either way (it trains what the
model's whole-sequence forward computes); scoring then computes each turn from its own prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from onepass.data.types import Example
from onepass.errors import OnepassError
from onepass.train.batch import collate
from onepass.train.loss import STOCK_HEAD_LOSS, HeadLoss, label_nll
from onepass.compat import attention_implementation, base_model, takes_attention_interface
from onepass.train.model import device_of, evaluating
from onepass.train.attention import (PACKED, SEPARATE, own_attention, packing_of, set_packing, use_packed_attention,
                                     use_packing_attention)

# Nats of per-token log-probability by which onepass's path may differ from the model's own forward. The
# check runs in fp32 (autocast off), where reordered sums differ by ~1e-6 and a leak between packed
# conversations by ~1e-3 and more.
TOLERANCE = 2e-4
# The same for flash-attention against packed SDPA, both in bf16 (flash refuses fp32): bf16 rounds each
# per-token log-probability by ~1e-2 on its own; conversations that leak into one another differ by more.
FLASH_TOLERANCE = 1e-1
LENGTHS = (19, 11, 27)  # short, and of different lengths: the packed attention groups them as it would a batch
# One probe sequence, and the prefixes of it whose tokens are compared with the whole's: sparse indexers
# pick a few keys (top-k), so the prefixes are longer than the zoo's tiny top-k and windows
PREFIX_PROBE_LENGTH, PREFIX_CUTS = 64, (16, 32, 48)


@dataclass(frozen=True)
class PackingCheck:
    """What the start-up check found: the packing it chose and how far onepass's path is from the
    model's own forward with it (nats, the largest per-token difference)."""

    packing: str  # model.PACKED or model.SEPARATE
    max_difference: float
    packed_difference: float | None  # the packed row's, when it ran (None when it failed)
    packed_error: str | None
    prefix_difference: float  # the model's own forward on a whole sequence against on its prefixes
    tokens: int
    seconds: float
    flash: str | None = None  # with flash-attention varlen: how it compared with packed SDPA under bf16
    attention: str | None = None  # the attention implementation the chosen packing runs (`apply_check`)

    @property
    def prefix_consistent(self) -> bool:
        """Whether a token's log-probability does not depend on what follows it (one pass == K passes)."""
        return self.prefix_difference <= TOLERANCE

    def describe(self) -> str:
        line = f"checked: onepass == the model's own forward, max {self.max_difference:.1e} nats"
        if self.packing == SEPARATE:
            why = self.packed_error or (f"packed rows differ by {self.packed_difference:.1e} nats: a layer sees "
                                        "more than the attention keeps apart")
            line += f"; packing: one conversation per forward ({why})"
        if self.prefix_consistent:
            line += f"; prefix-consistent: yes, max {self.prefix_difference:.1e}"
        else:
            line += (f"; prefix-consistent: no: a token's log-prob depends on what follows, by up to "
                     f"{self.prefix_difference:.1e} nats")
        if self.flash:
            line += f"; {self.flash}"
        return line + f" ({self.seconds:.1f} s)"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "prefix_consistent": self.prefix_consistent}


def probe_examples(vocab_size: int, seed: int = 0) -> list[Example]:
    """Conversations of random tokens, every token trained (the check is of the arithmetic, not the data)."""
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(0, vocab_size, n).astype(np.int32), np.ones(n, np.int8), np.zeros(n, np.int32))
            for n in LENGTHS]


def own_forward_logprobs(model: Any, examples: list[Example], own: str | None = None) -> np.ndarray:
    """log Pr(token t | tokens < t), t >= 1, from the model's own forward (with its own attention, `own`
    where known) on each conversation alone."""
    device = device_of(model)
    values = []
    with own_attention(model, own), evaluating(model):
        for example in examples:
            ids = torch.from_numpy(example.input_ids.astype(np.int64))[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            values.append(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].cpu().numpy())
    return np.concatenate(values)


def prefix_difference(model: Any, vocab_size: int, own: str | None = None) -> float:
    """The largest difference, over the probe's first tokens, between the model's own log-probabilities
    on the whole probe and on a prefix of it alone (0 up to float rounding for a causal model)."""
    ids = np.random.default_rng(1).integers(0, vocab_size, PREFIX_PROBE_LENGTH).astype(np.int32)
    sequences = [Example(ids[:n], np.ones(n, np.int8), np.zeros(n, np.int32)) for n in (len(ids), *PREFIX_CUTS)]
    whole, *prefixes = (own_forward_logprobs(model, [sequence], own) for sequence in sequences)
    return max(_difference(whole[:len(prefix)], prefix) for prefix in prefixes)


def onepass_logprobs(model: Any, examples: list[Example], head_loss: HeadLoss = STOCK_HEAD_LOSS) -> np.ndarray:
    """The same log-probabilities through onepass's path (the training loss's), all in one batch."""
    with evaluating(model):
        nll, _ = label_nll(model, collate(examples).to(device_of(model)), head_loss=head_loss)
    return -nll.double().cpu().numpy()


def check_packing(model: Any, vocab_size: int | None = None, tolerance: float = TOLERANCE,
                  compare_flash: bool = True, head_loss: HeadLoss = STOCK_HEAD_LOSS,
                  own: str | None = None) -> PackingCheck:
    """Compare onepass's path (with `head_loss`) with the model's own forward (fp32, on the model's
    device) and choose the packing that equals it; raise a clear error when neither does. A model on
    flash-attention varlen (which refuses fp32) is checked on packed SDPA in fp32, and flash is then
    compared with packed SDPA under bf16: where it fails or differs, packed SDPA is chosen instead (not
    with `compare_flash` false: the model is not where it will run, e.g. in CPU memory before FSDP2
    shards it onto GPUs). `own`: the attention the model came with (its own forward's, the oracle's;
    default: the current one, or transformers' default for its class). The model is left as it came;
    `apply_check` puts it in the mode chosen."""
    base = base_model(model)
    start = attention_implementation(base)
    try:
        if packing_of(model) != PACKED and takes_attention_interface(base):  # a model on its own attention: try
            use_packed_attention(model)                                       # packed rows first
        result = _check_packing(model, vocab_size, tolerance, head_loss, own)
        if start == "flash_attention_2" and result.packing == PACKED:
            if not compare_flash:
                result = dataclasses.replace(result, flash="flash-attention not compared (checked before sharding)")
            else:
                result = dataclasses.replace(result, flash=check_flash(model, probe_examples(
                    vocab_size or model.get_output_embeddings().weight.shape[0]), head_loss))
        return dataclasses.replace(result, attention=attention_implementation(base))
    finally:
        if attention_implementation(base) != start:
            base.set_attn_implementation(start)


def apply_check(model: Any, packing: str, attention: str | None) -> None:
    """Put the model in the packing the check chose (`PackingCheck.packing`), on the attention it chose
    (`PackingCheck.attention`)."""
    set_packing(model, packing, own=attention if packing == SEPARATE else None)
    if packing == PACKED and attention and attention_implementation(base_model(model)) != attention:
        use_packing_attention(model, attention)


def check_flash(model: Any, examples: list[Example], head_loss: HeadLoss = STOCK_HEAD_LOSS) -> str:
    """Flash-attention varlen against onepass's packed SDPA on the probe, both under bf16 autocast (the
    precision flash runs in), within `FLASH_TOLERANCE`; the model is left on flash where they agree and
    on packed SDPA where flash fails or differs. What was found, for the check's line."""
    base = base_model(model)
    device = device_of(model)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        use_packed_attention(base)
        expected = onepass_logprobs(model, examples, head_loss)
        base.set_attn_implementation("flash_attention_2")
        try:
            difference = _difference(onepass_logprobs(model, examples, head_loss), expected)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a flash-attn build that fails here: packed SDPA instead
            use_packed_attention(base)
            return f"flash-attention fails ({_one_line(error)}): packed SDPA runs instead"
    if difference > FLASH_TOLERANCE:
        use_packed_attention(base)
        return (f"flash-attention differs from packed SDPA by {difference:.1e} nats under bf16 (allowed: "
                f"{FLASH_TOLERANCE:.0e}): packed SDPA runs instead")
    return f"flash-attention varlen == packed SDPA under bf16, max {difference:.1e}"


def _check_packing(model: Any, vocab_size: int | None, tolerance: float, head_loss: HeadLoss,
                   own: str | None) -> PackingCheck:
    started = time.perf_counter()
    vocab_size = vocab_size or model.get_output_embeddings().weight.shape[0]
    examples = probe_examples(vocab_size)
    device = device_of(model)
    with torch.autocast(device.type, enabled=False), exact_matmuls(), packed_attention_for_the_check(model):
        try:
            expected = own_forward_logprobs(model, examples, own)
            prefix = prefix_difference(model, vocab_size, own)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - the oracle itself fails: nothing to prove against
            raise OnepassError(f"{type(model).__name__}: the model's own forward fails on a short conversation "
                               f"({_one_line(error)}), so onepass cannot check it. Fix: check that transformers "
                               "runs this model, or report it.") from None
        packed_difference, packed_error = None, None
        if packing_of(model) == PACKED:
            try:
                packed_difference = _difference(onepass_logprobs(model, examples, head_loss), expected)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - a kernel that refuses packed rows: try them apart
                packed_error = f"packed rows fail: {_one_line(error)}"
            if packed_difference is not None and packed_difference <= tolerance:
                return PackingCheck(PACKED, packed_difference, packed_difference, None, prefix,
                                    expected.size + len(examples), time.perf_counter() - started)
            set_packing(model, SEPARATE, own)
        else:
            packed_error = "its attention layers do not take transformers' attention interface"
        try:
            separate = _difference(onepass_logprobs(model, examples, head_loss), expected)
        except Exception as error:  # noqa: BLE001 - onepass's path fails even on one conversation alone
            raise OnepassError(f"{type(model).__name__}: onepass's forward fails even with each conversation alone "
                               f"({_one_line(error)}; {packed_error or 'packed rows differ'}). Fix: report it with "
                               "`onepass check MODEL --json`.") from None
    result = PackingCheck(SEPARATE, separate, packed_difference, packed_error, prefix, expected.size + len(examples),
                          time.perf_counter() - started)
    if separate > tolerance:
        raise OnepassError(
            f"{type(model).__name__}: onepass's log-probabilities differ from the model's own forward by "
            f"{separate:.1e} nats even with each conversation alone (allowed: {tolerance:.0e}), so what the model "
            "computes after its last layer (a logit scale, multiplier or soft-cap) is not what onepass applies. "
            "Training would not follow the model's own objective. Fix: report it with `onepass check MODEL "
            "--json`; to train anyway, at your own risk, set check_model: false (onepass score: --no-check-model).")
    return result


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """fp32 matmuls in fp32 for the check (CUDA may run them in TF32, rounding at 1e-3), through
    `torch.set_float32_matmul_precision`: newer torch refuses the legacy `allow_tf32` flags once the
    precision API has been used, and the user's setting comes back after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    convolutions = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if convolutions is not None:  # convolution layers (Mamba's, hybrids') too, through the same kind of API
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        if convolutions is not None:
            torch.backends.cudnn.conv.fp32_precision = convolutions


@contextlib.contextmanager
def packed_attention_for_the_check(model: Any) -> Iterator[None]:
    """Flash-attention varlen refuses fp32, the check's precision: the check runs onepass's packed
    attention, which keeps conversations apart by the same `cu_seq_lens`, and the model goes back to
    flash-attention after (transformers' own varlen kernel, not what the check proves)."""
    base = base_model(model)
    current = attention_implementation(base)
    if current != "flash_attention_2":
        yield
        return
    use_packed_attention(base)
    try:
        yield
    finally:
        if packing_of(base) == PACKED:
            base.set_attn_implementation(current)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _difference(got: np.ndarray, expected: np.ndarray) -> float:
    if got.shape != expected.shape:
        return float("inf")
    difference = np.abs(got - expected)
    return float("inf") if not np.all(np.isfinite(difference)) else float(difference.max(initial=0.0))
