"""Tiny random models for every decoder-only text causal-LM architecture of the installed transformers.

    architectures() -> list of model_type names (decoder-only, text-only, buildable from a config)
    excluded()      -> {model_type: one-line reason} for the rest of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    tiny_config(t)  -> a small config of type t: vocab 128, width 64, 4 heads (2 kv) of 16, MLP 128,
                       256 positions, MoE 4 experts top-2, one layer of each distinct layer kind, sliding
                       windows 6, attention softcap 5, final softcap 3 (where the config has them)
    build(t, seed)  -> AutoModelForCausalLM.from_config(tiny_config(t)) in fp32, every parameter + N(0, 0.05²),
                       eval mode

Everything is derived from the config class's own default (`CONFIG_MAPPING[t]().to_dict()` and its
`attribute_map`): a size is set only under a key the config has; a layer structure (per-layer lists
such as `layer_types`, index sets such as `full_attn_idxs`, periods such as Jamba's
`attn_layer_period/offset`, prefixes such as `first_k_dense_replace`) is cut down to the first layer
of each distinct kind. What cannot be derived is in `FIXES`, each with the reason.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
POSITIONS = 256
EXPERTS = 4
TOP_K = 2
EXPERT_SIZE = 32
WINDOW = 6
ATTN_SOFTCAP = 5.0
FINAL_SOFTCAP = 3.0

# --- which architectures ------------------------------------------------------------------------

# Names the generic rules below would keep (or cannot decide) that are not decoder-only text LMs.
EXCLUDED = {
    "bert-generation": "BERT encoder used as a decoder (is_decoder flag), not a decoder-only LM",
    "trocr": "decoder half of the TrOCR image-to-text encoder-decoder",
    "xlnet": "permutation language model with two-stream attention and memory, not a causal decoder",
    "moshi": "speech-text model: the causal LM runs over audio codebooks as well as text",
    "gemma4_assistant": "speculative-decoding drafter: needs the target model's hidden states",
    "gemma4_unified_assistant": "speculative-decoding drafter: needs the target model's hidden states",
    "phi4_multimodal": "multimodal (vision and audio sub-configs); not a text-only causal LM",
    "git": "image-to-text model (GitForCausalLM with a vision encoder)",
    "reformer": "encoder by default (is_decoder=False, has a masked-LM head); LSH/chunked attention outside the "
                "attention interface",
}

# Mappings whose members are encoders, encoder-decoders or multimodal models (model_type in any of
# these: not a decoder-only text LM), with the reason given for each.
_NON_DECODER_MAPPINGS = {
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "encoder-decoder (the causal-LM class is its decoder)",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "has a masked-LM head: a bidirectional encoder used as a decoder",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES": "speech encoder-decoder",
    "MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES": "text-to-audio model",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "multimodal (image-text-to-text)",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES": "multimodal LM",
}


@functools.cache
def _classification() -> tuple[tuple[str, ...], dict[str, str]]:
    import transformers.models.auto.modeling_auto as auto
    from transformers import CONFIG_MAPPING
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # default configs warn about their special-token ids
    kept, dropped = [], {}
    names = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    text_types = {t for t in names if t.endswith("_text")}
    for model_type in names:
        reason = EXCLUDED.get(model_type)
        config_class = CONFIG_MAPPING[model_type]
        if reason is None and config_class.model_type != model_type:
            reason = f"alias: its config class is {config_class.__name__} ({config_class.model_type!r}), kept under that name"
        if reason is None:
            for mapping, why in _NON_DECODER_MAPPINGS.items():
                if model_type in getattr(auto, mapping, {}):
                    reason = why
                    break
        if reason is None:
            subs = set(getattr(config_class, "sub_configs", {}) or {})
            if subs & {"vision_config", "audio_config", "vq_config", "audio_encoder_config", "audio_encoder"}:
                reason = f"multimodal: sub-configs {sorted(subs)}"
            elif "text_config" in subs:
                reason = "composite config around a text sub-config" + (
                    f" ({model_type}_text is kept)" if f"{model_type}_text" in text_types else "")
        if reason is None:
            try:
                default = config_class()
                if getattr(default, "is_encoder_decoder", False):
                    reason = "encoder-decoder (config.is_encoder_decoder)"
            except Exception as error:  # a config that cannot even be built by default: keep, build() reports
                warnings.warn(f"{model_type}: default config fails: {error}")
        if reason is None:
            kept.append(model_type)
        else:
            dropped[model_type] = reason
    logging.set_verbosity(verbosity)
    return tuple(kept), dropped


def architectures() -> list[str]:
    return list(_classification()[0])


def excluded() -> dict[str, str]:
    return dict(_classification()[1])


# --- sizes ----------------------------------------------------------------------------------------

def _truthy(value: Any) -> bool:
    return value is not None and value is not False and value != 0


def _not_none(value: Any) -> bool:
    return value is not None


def _always(value: Any) -> bool:
    return True


# key -> (value, condition on the default value). Aliases of the same concept across old and new
# configs are all listed; only keys the config has are set (attribute_map names count).
SIZES: dict[str, tuple[Any, Callable[[Any], bool]]] = {}


def _size(value: Any, *keys: str, when: Callable[[Any], bool] = _always) -> None:
    for key in keys:
        SIZES[key] = (value, when)


_size(VOCAB, "vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input", when=_not_none)
_size(HIDDEN, "hidden_size", "hidden_size_global", "n_embd", "d_model", "embedding_dim", "emb_dim", "word_embed_proj_dim", "lru_width")
_size(HEADS, "num_attention_heads", "n_head", "n_heads", "attention_heads", "swa_num_attention_heads", "num_heads")
_size(KV_HEADS, "num_key_value_heads", "num_kv_heads", "kv_n_heads", "swa_num_key_value_heads",
      "num_query_groups")
_size(HEAD_DIM, "head_dim", "attention_head_size", "dim_head", "kv_channels", "swa_head_dim")
_size(INTERMEDIATE, "intermediate_size", "n_inner", "ffn_dim", "dff", "dim_ff", "ffn_hidden_size",
      "feed_forward_size", "intermediate_size_mlp", "dense_intermediate_size", "prefix_dense_intermediate_size",
      "first_dense_intermediate_size",
      when=_not_none)
_size(POSITIONS, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
      "model_max_length")
# mixture of experts
_size(EXPERTS, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
      when=lambda v: v != 0)  # None: the config's MoE has no default size (Dots1)
_size(TOP_K, "num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_top_k",
      when=lambda v: v != 0)
_size(EXPERT_SIZE, "moe_intermediate_size", "expert_ffn_hidden_size", "expert_intermediate_size",
      "shared_expert_intermediate_size", "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size",
      "shared_intermediate_size", "router_hidden_size", when=_truthy)
_size(1, "n_shared_experts", "num_shared_experts", "moe_num_shared_experts", when=lambda v: v != 0)
_size(1, "n_group", "num_expert_group", "topk_group", when=_truthy)
_size(2, "zero_expert_num", when=_truthy)
# multi-head latent attention and sparse (indexed) attention
_size(32, "q_lora_rank", when=_not_none)
_size(16, "kv_lora_rank", "o_lora_rank", "qk_head_dim", "v_head_dim", "index_head_dim", when=_not_none)
_size(8, "qk_rope_head_dim", "qk_nope_head_dim", when=_not_none)
_size(2, "index_n_heads", "o_groups", when=_not_none)
_size(4, "index_topk", "index_block_size", when=_not_none)  # fewer keys than the conversations: the index matters
_size(2, "index_topk_blocks", when=_not_none)
# state-space, convolution and linear-attention mixers
_size(8, "state_size", "mamba_d_state", "ssm_state_size", "time_step_rank", "mamba_dt_rank", "chunk_size",
      "mamba_chunk_size", when=_not_none)
_size(8, "mamba_n_heads", "mamba_num_heads")  # 8 heads of 16 = expand 2 x width 64
_size(16, "mamba_d_head", "mamba_head_dim", "mamba_headdim")
_size(1, "n_groups", "mamba_n_groups", "mamba_ngroups")
_size(128, "mamba_d_ssm", when=_not_none)
_size(2, "linear_num_key_heads")
_size(4, "linear_num_value_heads", "linear_num_heads")
_size(16, "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim")
# small side branches of some architectures
_size(8, "adapter_rank", "laurel_rank", "d_rel", "loop_gate_rank", "gated_norm_rank", when=_truthy)
_size(16, "hidden_size_per_layer_input", "hc_lowrank", "ple_embed_dim", when=_truthy)
_size(8, "rotary_dim", when=_not_none)
_size(256, "ngram_vocab_size_base", "encoder_hash_byte_group_vocab", when=_truthy)
_size(2, "heads_per_ngram", when=_truthy)
_size(32, "position_bias_num_buckets", when=_truthy)
# windows and soft-caps
_size(WINDOW, "sliding_window")  # also where the default is None: the model slides when it is set
_size(WINDOW, "window_size", "attention_window_size", "sliding_window_size",
      "local_attention_window_len", "attention_chunk_size", "keep_window_size", when=_not_none)
_size(ATTN_SOFTCAP, "attn_logit_softcapping", when=_not_none)
_size(FINAL_SOFTCAP, "final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap", when=_not_none)
# output-logit and width multipliers whose default is 1 (a no-op): set as in onepass's own
# architecture test, so that a path that forgets one of them differs
_size(4.0, "logits_scaling", when=_not_none)
_size(0.5, "lm_head_multiplier", when=_not_none)
_size(2.0, "embedding_multiplier", when=_not_none)
_size(0.5, "residual_multiplier", when=_not_none)
_size(0.3, "attention_multiplier", when=_not_none)
# no multi-token-prediction layers (not part of the causal-LM forward)
_size(0, "num_nextn_predict_layers", "num_mtp_layers", when=_truthy)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_blocks", "decoder_layers")
# per-layer lists whose entries are sizes: every entry becomes the tiny size
PER_LAYER_SIZES = {"intermediate_size": INTERMEDIATE, "num_attention_heads_per_layer": HEADS}
# lists of layer indices (a layer is in the set or not)
INDEX_SET_KEYS = ("full_attn_idxs", "moe_layers", "mlp_only_layers", "hybrid_layer_ids", "ple_layer_ids",
                  "local_layer_ids", "attn_layer_indices", "no_rope_layer_ids")


def _is_per_layer_list(key: str, value: Any, layers: int) -> bool:
    if not isinstance(value, list) or len(value) != layers or key in INDEX_SET_KEYS:
        return False
    return key.endswith("_types") or "layer" in key or key in (
        "block_types", "activation_sparsity_pattern", "intermediate_size", "layers_block_type")


# --- layer structures that are not lists: (member of layer i?, write the new members back) -------

def _periodic(period_key: str, offset_key: str):
    def member(d, i):
        return d[period_key] and i % d[period_key] == d[offset_key]

    def encode(kwargs, members):
        where = [j for j, m in enumerate(members) if m]
        if len(where) > 1:
            raise ValueError(f"{period_key}: {len(where)} members cannot be one period")
        kwargs[period_key], kwargs[offset_key] = len(members) + (0 if where else 1), where[0] if where else len(members)
    return (period_key, offset_key), member, encode


def _prefix(key: str):
    def member(d, i):
        return i < d[key]

    def encode(kwargs, members):
        count = sum(members)
        assert members[:count] == [True] * count, f"{key}: members are not a prefix"
        kwargs[key] = count
    return (key,), member, encode


def _suffix(key: str):
    def member(d, i):
        return i >= d["__layers__"] - d[key]

    def encode(kwargs, members):
        count = sum(members)
        assert members[len(members) - count:] == [True] * count, f"{key}: members are not a suffix"
        kwargs[key] = count
    return (key,), member, encode


def _from_index(key: str):  # layers i >= key are members (Qwen2's max_window_layers)
    def member(d, i):
        return d.get("use_sliding_window") is not False and i >= d[key]

    def encode(kwargs, members):
        kwargs[key] = members.index(True) if True in members else len(members)
    return (key,), member, encode


def _moe_range():  # Ernie 4.5: MoE at start <= i <= end, every interval
    keys = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")

    def member(d, i):
        start, end, step = (d[k] for k in keys)
        end = d["__layers__"] - 1 if end in (None, -1) else end
        return start <= i <= end and (i - start) % step == 0

    def encode(kwargs, members):
        first = members.index(True)
        kwargs.update(moe_layer_start_index=first, moe_layer_end_index=len(members) - 1, moe_layer_interval=1)
    return keys, member, encode


STRUCTURES = [
    _periodic("attn_layer_period", "attn_layer_offset"),  # Jamba, Zamba: attention every period
    _periodic("expert_layer_period", "expert_layer_offset"),  # Jamba: MoE every period
    _prefix("first_k_dense_replace"),  # DeepSeek-style: the first k layers dense, then MoE
    _prefix("num_dense_layers"),  # AFMoE, LFM2-MoE
    _suffix("num_kv_shared_layers"),  # Gemma-3n/4: the last layers reuse earlier layers' keys and values
    _from_index("max_window_layers"),  # Qwen2 family: sliding from this layer on (when enabled)
    _moe_range(),
]


def _layer_plan(d: dict[str, Any]) -> tuple[str | None, int, list[int]]:
    """(layer-count key, default count, indices of the first layer of each distinct kind)."""
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)), None)
    layers = d[key] if key else next((len(v) for k, v in d.items() if k == "layers_block_type"), 0)
    if not layers:
        return key, 0, []
    d = {**d, "__layers__": layers}
    lists = [k for k, v in d.items() if _is_per_layer_list(k, v, layers)]
    sets = [k for k in INDEX_SET_KEYS if isinstance(d.get(k), list)]
    structures = [(member) for keys, member, _ in STRUCTURES if all(d.get(k) is not None for k in keys[:1])
                  and all(k in d for k in keys)]
    per_layer_config = d.get("per_layer_config") or {}
    kinds, first = set(), []
    for i in range(layers):
        kind = (tuple(repr(d[k][i]) for k in lists)
                + tuple(i in d[k] for k in sets) + tuple(bool(m(d, i)) for m in structures)
                + (repr(sorted(per_layer_config.get(f"{i:02d}", per_layer_config.get(str(i), {})).keys())),))
        if kind not in kinds:
            kinds.add(kind)
            first.append(i)
    return key, layers, first


def _tiny_kwargs(config_class: Any, d: dict[str, Any]) -> dict[str, Any]:
    """Overrides for a config class whose default is `d` (recursing into sub-configs)."""
    aliases = dict(getattr(config_class, "attribute_map", {}) or {})
    kwargs: dict[str, Any] = {}
    for key, (value, when) in SIZES.items():
        real = aliases.get(key, key)
        if real in d and real not in kwargs and when(d[real]):
            if isinstance(d[real], list):  # a per-layer list of sizes (handled with the layers)
                continue
            kwargs[real] = value
    if d.get("qk_rope_head_dim") is not None and "head_dim" in kwargs:
        kwargs["head_dim"] = SIZES["qk_rope_head_dim"][0]  # multi-head latent attention: RoPE runs over head_dim
    if d.get("kv_lora_rank") is not None and "num_key_value_heads" in kwargs:
        kwargs["num_key_value_heads"] = HEADS  # latent attention expands keys to every head (no grouping)
    for key, value in d.items():  # special tokens inside the tiny vocabulary (ids 0-2; conversations use 3-127)
        if key.endswith("_token_id") and value is not None:
            small = {"pad_token_id": 0, "bos_token_id": 1}.get(key, 2)
            if isinstance(value, list):
                kwargs[key] = [v if 0 <= v < VOCAB else small for v in value]
            elif isinstance(value, int) and not 0 <= value < VOCAB:
                kwargs[key] = small
    # layers: the first of each distinct kind
    count_key, layers, first = _layer_plan(d)
    if count_key or first:
        if count_key:
            kwargs[count_key] = len(first)
        dd = {**d, "__layers__": layers}
        for key, value in d.items():
            if _is_per_layer_list(key, value, layers):
                if key in PER_LAYER_SIZES:
                    kwargs[key] = [PER_LAYER_SIZES[key]] * len(first)
                else:
                    kwargs[key] = [value[i] for i in first]
        for key in INDEX_SET_KEYS:
            if isinstance(d.get(key), list):
                kwargs[key] = [j for j, i in enumerate(first) if i in d[key]]
        for keys, member, encode in STRUCTURES:
            if all(k in d for k in keys) and d.get(keys[0]) is not None:
                encode(kwargs, [bool(member(dd, i)) for i in first])
        if d.get("per_layer_config"):
            plc = d["per_layer_config"]
            new = {}
            for j, i in enumerate(first):
                entry = plc.get(f"{i:02d}", plc.get(str(i)))
                if entry is not None:  # its sizes shrink like the config's own
                    new[f"{j:02d}"] = {k: _tiny_value(k, v) for k, v in entry.items()}
            kwargs["per_layer_config"] = new
    # sub-configs (DBRX's attn/ffn configs, MPT's attention config, BLT's four stacks)
    for key, sub_class in (getattr(config_class, "sub_configs", {}) or {}).items():
        sub = d.get(key)
        if isinstance(sub, dict) and sub_class is not None and hasattr(sub_class, "to_dict"):
            try:
                sub_default = sub_class(**{k: v for k, v in sub.items() if k not in ("model_type", "transformers_version")}).to_dict()
            except Exception:
                sub_default = sub
            kwargs[key] = sub_class(**{**_clean(sub), **_tiny_kwargs(sub_class, sub_default)})
    return kwargs


def _tiny_value(key: str, value: Any) -> Any:
    """A per-layer override's value at the tiny size: twice the tiny size where the default is larger
    than the config's own (Gemma-4's wider global heads), else the tiny size."""
    if key in SIZES and isinstance(value, int):
        tiny = SIZES[key][0]
        return tiny * 2 if key == "head_dim" else tiny
    return value


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "architectures")}


# --- per-architecture fixes ------------------------------------------------------------------------

def _enable_sliding(kwargs: dict[str, Any], d: dict[str, Any]) -> None:
    """The config can slide but its default does not: first layer full, second sliding."""
    kwargs["sliding_window"] = WINDOW
    if "use_sliding_window" in d:
        kwargs["use_sliding_window"] = True
    if "max_window_layers" in d:
        kwargs["max_window_layers"] = 1
    if "layer_types" in d:
        types = list(kwargs.get("layer_types") or d["layer_types"])
        if "sliding_attention" not in types:
            if len(types) > 1:  # the last layer slides (its other per-layer settings stay)
                kwargs["layer_types"] = types[:-1] + ["sliding_attention"]
                return
            kwargs["layer_types"] = types + ["sliding_attention"]  # a second layer like the first, sliding
            for key in LAYER_COUNT_KEYS:
                if key in kwargs:
                    kwargs[key] = 2
            for key, value in d.items():
                if key != "layer_types" and isinstance(kwargs.get(key), list) and len(kwargs[key]) == 1 \
                        and _is_per_layer_list(key, value, len(value)):
                    kwargs[key] = kwargs[key] * 2


def _fix(model_type: str, kwargs: dict[str, Any], d: dict[str, Any]) -> None:
    fix = FIXES.get(model_type)
    if fix is not None:
        fix(kwargs, d)


def _set(**values: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    return lambda kwargs, d: kwargs.update(values)


def _dbrx(kwargs: dict[str, Any], d: dict[str, Any]) -> None:
    # DbrxAttention reads attn_config.rope_theta, which the default DbrxAttentionConfig lacks (its
    # default model does not build either)
    attn = kwargs["attn_config"].to_dict()
    # and clamps q/k/v with max=clip_qkv even when it is None (the default): give it a bound
    attn.update(rope_theta=(d.get("rope_parameters") or {}).get("rope_theta", 10000.0), kv_n_heads=KV_HEADS,
                clip_qkv=8.0)
    kwargs["attn_config"] = _clean(attn)
    ffn = kwargs["ffn_config"].to_dict()
    ffn.update(moe_num_experts=EXPERTS, moe_top_k=TOP_K, ffn_hidden_size=EXPERT_SIZE)
    kwargs["ffn_config"] = _clean(ffn)


FIXES: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "dbrx": _dbrx,
    # to_dict() doubles Dory's layers (each an attention block then an "mlp" block) and __post_init__
    # halves them again; give the un-doubled layout: one input, one looped and one output layer
    "dory": _set(layer_types=["sliding_attention", "full_attention", "sliding_attention"], num_hidden_layers=3,
                 n_input_layers=1, n_recurrent_layers=1, n_output_layers=1, n_recurrent_loops=2),
    # Mamba-2 heads: num_heads x head_dim must be expand x width (2 x 64)
    "mamba2": _set(num_heads=8, head_dim=16),
    # hybrids whose default config has no attention layer at all: one Mamba layer, one attention layer
    "bamba": _set(num_hidden_layers=2, attn_layer_indices=[1]),
    "granitemoehybrid": _set(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
    # block_types cycles over the layers (recurrent, recurrent, attention): one of each
    "recurrent_gemma": _set(num_hidden_layers=2, block_types=["recurrent", "attention"]),
    # LFM2's default puts attention in every layer (full_attn_idxs = all); the real models mix in
    # short-convolution layers
    "lfm2": _set(num_hidden_layers=2, layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    # RWKV's weight init divides by num_hidden_layers - 1; its attention width is the model width
    "rwkv": _set(num_hidden_layers=2, attention_hidden_size=HIDDEN),
    # Zamba's shared attention block reads [hidden, embeddings] concatenated: twice the width; its
    # weights are tied across the hybrid layers, and the tie needs two of them
    "zamba": _set(attention_hidden_size=2 * HIDDEN, attention_head_dim=2 * HIDDEN // HEADS, num_hidden_layers=3,
                  layers_block_type=["linear_attention", "hybrid", "hybrid"], attn_layer_period=1,
                  attn_layer_offset=0),
    "zamba2": _set(attention_hidden_size=2 * HIDDEN, attention_head_dim=2 * HIDDEN // HEADS),
    # ZAYA's validation: "currently supports num_experts_per_tok=1 only"; its default layers are all
    # "hybrid" (full attention); the sliding variant is "hybrid_sliding"
    "zaya": _set(num_experts_per_tok=1, num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"]),
    # ModernBERT-decoder derives sliding_window = local_attention // 2 (local_attention is the span)
    "modernbert-decoder": _set(local_attention=2 * WINDOW),
    # Dots3's validation: num_key_value_heads must equal num_attention_heads
    # and its sliding layers' head_dim must be qk_nope_head_dim + qk_rope_head_dim (8 + 8)
    "dots3_note_text": lambda kwargs, d: (kwargs.update(num_key_value_heads=HEADS, head_dim=16), [
        entry.update(num_key_value_heads=HEADS) for entry in kwargs.get("per_layer_config", {}).values()
        if "num_key_value_heads" in entry]),
    # Qwen4-Exp's sparse-attention indexer has no default size (all None): 2 heads of 16, a budget of
    # 8 keys in blocks of 2 (fewer than the conversations, so it selects)
    "qwen4_exp_text": _set(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2),
    # xLSTM's native chunkwise kernel assumes query/key heads as wide as value heads (qk_dim_factor 0.5
    # fails with a shape error at every size)
    "xlstm": _set(qk_dim_factor=1.0),
    # Cohere Compass (North): per-layer-type RoPE, keyed by layer type; the sliding layers rotate and
    # the full layers do not (as in Cohere2-style models)
    "cohere_compass_text": lambda kwargs, d: (_enable_sliding(kwargs, d), kwargs.update(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": None})),
    # BLT's forward builds DynamicCache(config=BltConfig) when use_cache, and BltConfig has no
    # num_hidden_layers (AttributeError at any size): no cache
    "blt": _set(use_cache=False),
    # Inkling-2 Loop repeats layers loop_layer_index_start..end-1 loop_num_passes times, the bounds
    # multiples of n_layers_per_attn_res_block: two plain layers, then two looped ones, two passes
    "inkling2_loop_text": _set(num_hidden_layers=4, n_layers_per_attn_res_block=2, loop_layer_index_start=2,
                               loop_layer_index_end=4, loop_num_passes=2,
                               layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"]),
    # Kolibri 1.1: kv_source_layers holds layer indices (not per-layer values the generic cut can keep), and
    # its validator wants sliding layers reading their own K/V. One sliding layer (dense MLP), an indexer
    # and a reindexer that rescores the indexer's pool with the indexer's K/V (both MoE); the indexer
    # scores with the 2 query heads of key head 0, pools 8 of the keys in blocks of 2, and each query
    # keeps 4 of them besides 1 sink and 2 local tokens (fewer than the conversations: the index matters)
    "kolibri1_1": _set(num_hidden_layers=3,
                       layer_types=["sliding_attention", "indexed_attention", "indexed_attention"],
                       kv_source_layers=[0, 1, 1], index_layers=[1], mlp_only_layers=[0],
                       mlp_only_intermediate_size=INTERMEDIATE, index_num_heads=2, index_topk=4, index_pool_size=8,
                       index_compression=2, index_num_local_tokens=2, index_num_sink_tokens=1),
    # LFM2-MoE's default has no layer_types at all (attention everywhere): a dense conv layer, then an
    # attention layer with the MoE
    "lfm2_moe": _set(num_hidden_layers=2, layer_types=["conv", "full_attention"], num_dense_layers=1),
    # Their configs and models support sliding-window layers that the default config does not use
    # (use_sliding_window=False or all layer_types full); a tiny model should have one.
    **{name: _enable_sliding for name in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3", "dots1", "laguna",
                                         "mellum")},
}


def tiny_config(model_type: str) -> Any:
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    d = config_class().to_dict()
    kwargs = _tiny_kwargs(config_class, d)
    _fix(model_type, kwargs, d)
    return config_class(**kwargs)


def build(model_type: str, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    with torch.no_grad():  # zero-initialised norms, gates and biases get a value, so every path matters
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()
