"""Where onepass leans on another library's private API or on a version difference: here, and only
here, each with a test (tests/test_compat.py), so an upgrade that breaks one fails in one place."""

from __future__ import annotations

import ctypes
import inspect
import os
import sys
from typing import Any


def compile_jinja_template(source: str) -> Any:
    """A chat template compiled in transformers' own Jinja environment (its filters, `raise_exception`,
    `tojson`), as `apply_chat_template` does; cached by transformers."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


class JinjaRenderer:
    """`compile_jinja_template(source).render(**fixed, **variables)`, less Jinja's per-call cost: the
    template's globals (a ChainMap, iterated twice per `Template.render`) are merged with the fixed
    variables once, and each call builds the render context from that dict. Same context contents,
    same output (test); Jinja documents `Context` and `root_render_func` but not building one by hand."""

    def __init__(self, source: str, fixed: dict[str, Any]) -> None:
        from jinja2.runtime import Context

        self._template = compile_jinja_template(source)
        self._globals = dict(self._template.globals)
        self._base = {**self._globals, **fixed}
        self._context = Context

    def render(self, **variables: Any) -> str:
        template = self._template
        context = self._context(template.environment, {**self._base, **variables}, template.name, template.blocks,
                                globals=self._globals)
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()  # re-raises with the template's own traceback
            raise


def own_modules_load_kwargs() -> dict[str, Any]:
    """`from_pretrained` keywords that load the model with its own modules: transformers >= 5.25 loads with
    `use_kernels=True` by default, and then `model.train()`/`eval()` call `kernelize()`, which replaces
    `@use_kernel_forward_from_hub` layers' forwards (RMSNorm, ...) with Hub kernels (fetched over the
    network on CUDA) and pops the forwards onepass's accelerations installed. Older versions load their own
    modules unasked."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


# The names a message's reasoning goes by (transformers' `_REASONING_FIELDS`): the first is the one most
# chat templates read, gpt-oss and LFM2.5 read `thinking`, Gemma-4 `reasoning`.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as `apply_chat_template` hands them to a chat template: keys whose value is None left out,
    and reasoning under one name aliased to the others its templates read (transformers'
    `_alias_reasoning_fields`; the same rule where a transformers has none)."""
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        from transformers.utils.chat_template_utils import _alias_reasoning_fields
    except ImportError:
        return [_aliased(message) for message in messages]
    return _alias_reasoning_fields(messages)


def _aliased(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[key] for key in REASONING_KEYS if message.get(key) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


GENERATION_TAG = r"\{%-?\s*generation\s*-?%\}"


def generation_marks(source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     variables: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The text a template with `{% generation %}` blocks renders, and the character spans those blocks
    mark: what `apply_chat_template(..., return_assistant_tokens_mask=True)` trains (transformers'
    `render_jinja_template`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    [text], [spans] = render_jinja_template(conversations=[messages], tools=tools, chat_template=source,
                                            return_assistant_tokens_mask=True, **variables)
    return text, [(start, end) for start, end in spans]


def _chat_template_utils() -> Any:
    from transformers.utils import chat_template_utils

    if not hasattr(chat_template_utils, "mark_control_tokens"):
        from onepass.errors import OnepassError

        raise OnepassError("data.sanitize_control_tokens needs a transformers whose apply_chat_template has "
                           "sanitize_control_tokens (5.25 has it; the lock installs it). Fix: pip install -r "
                           "requirements.lock, or leave data.sanitize_control_tokens off.")
    return chat_template_utils


def chat_control_tokens(tokenizer: Any, source: str) -> tuple[str, ...]:
    """The tokens `apply_chat_template(..., chat_template=source, sanitize_control_tokens=True)` encodes as
    text where they appear in a message: the special tokens, and the added tokens the template writes
    (or the tokenizer's `chat_control_tokens`). Where a transformers has no such option: the special
    tokens."""
    own = getattr(tokenizer, "_get_control_tokens", None)
    if own is not None:
        return tuple(own(source))
    added = [str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
             if getattr(token, "special", False)]
    return tuple(sorted({token for token in [*getattr(tokenizer, "all_special_tokens", ()), *added] if token}))


def mark_control_tokens(value: Any, control_tokens: tuple[str, ...]) -> Any:
    """A message, tool schema or template kwarg with the control tokens in its strings wrapped in
    transformers' private markers, as `apply_chat_template(..., sanitize_control_tokens=True)` marks them
    before rendering (`encode_marked_chat` encodes what they wrap as text)."""
    utils = _chat_template_utils()
    control_re, _ = utils._get_control_token_patterns(tuple(control_tokens))
    return utils.mark_control_tokens(value, control_re)


def control_token_marks() -> tuple[str, str]:
    """transformers' two marker characters (private-use code points) around a marked control token."""
    utils = _chat_template_utils()
    return utils._CONTROL_TOKEN_START, utils._CONTROL_TOKEN_END


def control_token_markers(tokenizer: Any) -> Any:
    """The pattern that finds a marked token (group 1) or a lone marker in a rendered text, where
    `encode_marked_chat` splits it."""
    _, markers_re = _chat_template_utils()._get_control_token_patterns(tuple(tokenizer.added_tokens_encoder))
    return markers_re


def encode_token_as_text(tokenizer: Any, token: str) -> list[int]:
    """The ids of a control token's text spelled as plain text, as `encode_marked_chat` encodes a marked
    token in the middle of a chat (after a newline it then removes, so SentencePiece adds no space)."""
    utils = _chat_template_utils()
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)
    return utils._encode_chat_piece(tokenizer, token, True, newline_ids)


def sdpa_takes_grouped_heads(mask: Any, key: Any, value: Any) -> bool:
    """Whether SDPA may be given fewer key/value heads than query heads (`enable_gqa`) here, by
    transformers' own rule (`use_gqa_in_sdpa`): on CUDA a mask with `enable_gqa` leaves only the math
    kernel (fp32 scores kept for backward), so with a mask the key/value heads are repeated instead."""
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    if len(inspect.signature(use_gqa_in_sdpa).parameters) == 2:  # transformers < 5.x: (mask, key)
        return use_gqa_in_sdpa(mask, key)
    return use_gqa_in_sdpa(mask, key, value)


def base_model(model: Any) -> Any:
    """The model inside a peft wrapper (peft's `get_base_model`; the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_implementation(model: Any) -> str:
    """The attention implementation a transformers model runs (its config's private field)."""
    return model.config._attn_implementation


def supports_sdpa(model: Any) -> bool:
    """Whether transformers would run the model's class on SDPA by default (its private class flag)."""
    return bool(getattr(type(model), "_supports_sdpa", False))


def takes_attention_interface(model: Any) -> bool:
    """Whether the model's attention layers take their function from transformers' AttentionInterface,
    so that `set_attn_implementation` can route them to onepass's packed attention (older modeling
    files, e.g. Falcon's and BLOOM's, keep their own attention classes)."""
    return bool(type(model)._can_set_attn_implementation())


def load_balancing_loss_function(model: Any) -> Any:
    """The router's auxiliary loss function of a mixture-of-experts model: `load_balancing_loss_func` of
    its modeling file, the one its own forward calls (None where the file has none)."""
    return getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)


def distributed_store() -> Any:
    """The key-value store of the default process group (torch has no public accessor)."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def ddp_without_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel's keyword that turns off syncing buffers in forward (renamed in newer torch)."""
    from torch.nn.parallel import DistributedDataParallel

    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if newer else "broadcast_buffers": False}


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (transformers >= 5.20 renamed the method)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_activation_checkpointing(model: Any) -> None:
    """Activation checkpointing off (transformers >= 5.20 renamed the method)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


# oneDNN (the CPU's bf16 matmuls) and ideep keep a compiled kernel for every matrix shape they meet,
# up to 1,024 of each, at about half a MB apiece. Packed rows change length every step, so a long bf16
# run fills both caches: SmolLM2-135M's resident memory grew by ~12 MB a step until they were full
# (and the kernels pinned the heap between activations). A step meets a few dozen shapes.
KERNEL_CACHE_CAPACITY = 64


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive cache and ideep's LRU cache through their environment variables, which
    they read when first used: so call this before the process's first bf16 matmul (later it does
    nothing). A value the user set is kept."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16): there bf16 autocast
    is several times faster than fp32. torch's own checks are private; /proc/cpuinfo is the fallback."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def keep_freed_memory() -> bool:
    """glibc's malloc, for a CPU training loop: blocks up to 32 MB come from the heap (glibc's own
    threshold starts at 128 KiB and moves as blocks are freed), and freed memory at the heap's top is
    kept rather than returned to the system. A training step frees and re-allocates tensors of the
    same sizes every step; each from fresh pages costs a page fault per 4 KiB and the kernel zeroing
    it. Blocks over 32 MB (vocabulary-sized: logits chunks, the output layer's weight and gradient)
    still get their own mmap: serving those from the heap too (M_MMAP_MAX=0) cut faults 3x but let
    bf16 runs' resident memory grow to 7 GB over an epoch as the heap fragments. False where the C
    library has no `mallopt` (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h>
    settings = ((m_mmap_threshold, 32 * 2**20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 * 2**20))
    return all(mallopt(option, value) == 1 for option, value in settings)
