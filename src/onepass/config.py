"""One typed config tree: YAML file + `key.sub=value` overrides, validated on load.

Errors name the key, the value and what is allowed (with a did-you-mean for unknown keys).
Variants are picked with `Literal`s; no dotted-path strings (the accelerations are names from onepass.accel's
one list).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from onepass.hub import is_hub_id
from onepass.errors import ConfigError
from onepass.data.types import RenderOptions


@dataclass
class DataSource:
    """A training file (or directory) and its weight: how many times each of its records is trained on
    per epoch. 3 repeats every record three times; 0.5 trains a different random half each epoch."""

    path: str  # a local file or directory, or a Hugging Face Hub dataset id (org/name)
    weight: float = 1.0
    split: str | None = None  # of a Hub dataset (default: train)
    subset: str | None = None  # of a Hub dataset: its configuration's folder or file-name part
    revision: str | None = None  # of a Hub dataset: a branch, tag or commit


@dataclass
class DataConfig:
    train: list[str | DataSource] = field(default_factory=list)  # a path, or {path: ..., weight: ...}
    eval: list[str | DataSource] = field(default_factory=list)  # the same entries as train (weights unused)
    format: Literal["messages", "prompt_completion", "sharegpt", "alpaca", "text"] | None = None
    chat_template: str | None = None  # a .jinja file or a built-in name; default: the tokenizer's own
    loss_on: Literal["assistant", "last", "all"] = "assistant"
    train_on_eot: bool = True
    overlong: Literal["drop", "truncate", "error"] = "drop"
    on_bad_record: Literal["error", "skip"] = "error"
    unstable_history: Literal["tree", "error", "warn", "split"] = "tree"
    system_message: Literal["keep", "fold"] = "keep"  # fold: prepend it to the first user message (Gemma)
    # variables for the chat template, as apply_chat_template(..., **kwargs) takes them (enable_thinking:
    # false, reasoning_effort: low, ...); a record's own chat_template_kwargs override these
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    drop_tools: bool = False  # records with tools, a template that renders none: train without them (else error)
    drop_reasoning: bool = False  # reasoning, a template that shows none: train without it (else error)
    # control tokens in message text (a user pasting <|im_end|>) encoded as text, as apply_chat_template(...,
    # sanitize_control_tokens=True) does; else they are the tokens themselves (counted in the account)
    sanitize_control_tokens: bool = False
    num_workers: int = 0  # processes that render and tokenize; 0: the machine's cores
    cache_dir: str | None = None

    def sources(self) -> list[DataSource]:
        return [s if isinstance(s, DataSource) else DataSource(s) for s in self.train]

    def weighted(self) -> bool:
        return any(s.weight != 1.0 for s in self.sources())

    def train_paths(self) -> list[str]:
        return [s.path for s in self.sources()]

    def eval_sources(self) -> list[DataSource]:
        return [s if isinstance(s, DataSource) else DataSource(s) for s in self.eval]

    def render_options(self, max_seq_len: int | None) -> RenderOptions:
        return RenderOptions(loss_on=self.loss_on, train_on_eot=self.train_on_eot, max_seq_len=max_seq_len,
                             overlong=self.overlong, unstable_history=self.unstable_history,
                             system_message=self.system_message, drop_tools=self.drop_tools,
                             drop_reasoning=self.drop_reasoning,
                             sanitize_control_tokens=self.sanitize_control_tokens)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_on_export: bool = True


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # held-out evaluations without improvement before stopping; 0: never stop early
    min_delta: float = 0.0  # an improvement is a held-out loss lower than the best by more than this


@dataclass
class TrainConfig:
    model: str = ""  # a local Hugging Face model directory
    tokenizer: str | None = None  # default: the model directory
    output_dir: str = "runs/onepass"
    data: DataConfig = field(default_factory=DataConfig)
    max_seq_len: int = 2048
    batch_size: int = 4  # packed rows per micro-batch
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # default: epochs over the data
    epochs: int = 1
    seed: int = 0
    loss_normalization: Literal["token", "sequence", "turn"] = "token"
    loss_chunk_size: int = 1024  # trained positions per chunk of the output projection
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA and AMX/AVX512-BF16 CPUs
    gradient_checkpointing: bool = False
    compile: bool = False
    accelerations: str | list[str] = "auto"  # auto | none | [names]: see onepass.accel (the run lists them)
    check_model: bool = True  # at start-up, prove onepass's path equals the model's own forward (train.check)
    lora: LoraConfig = field(default_factory=LoraConfig)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # data parallelism under torchrun; one process trains as it is
    ddp_find_unused_parameters: bool = False  # true for models whose forward skips parameters (MoE routing)
    eval_every: int = 0  # steps; 0: evaluate before and after training only
    eval_samples: int = 0  # at each evaluation, greedy replies to the first N held-out prompts → samples.jsonl
    save_every: int = 0  # steps; 0: only the final model
    keep_last: int = 2
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    keep_best: bool = False  # keep the checkpoint with the lowest held-out loss, and export it as final
    resume: Literal["auto", "never"] = "auto"
    log_every: int = 1
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # trackers, rank 0 only
    run_name: str | None = None  # the trackers' name for the run; default: output_dir's name
    on_nonfinite: Literal["error", "skip_step"] = "error"
    progress: bool = True

    def render_options(self) -> RenderOptions:
        return self.data.render_options(self.max_seq_len)


POSITIVE = ("max_seq_len", "batch_size", "grad_accum", "epochs", "loss_chunk_size", "keep_last", "log_every",
            "r", "alpha", "weight")
NON_NEGATIVE = ("num_workers", "lr", "weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "eval_samples", "save_every",
                "dropout",
                "patience", "min_delta")


RENAMED = {"tensorboard": "write report_to: [tensorboard] instead of tensorboard: true."}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[-1] if isinstance(value, dict) else errors[0])  # a mapping: the dataclass's error
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not allowed. Fix: use one of "
                              f"{', '.join(repr(a) for a in args)}.")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}.")
        return dict(value)
    if origin is list:
        items = value if isinstance(value, list) else [value]  # a single path is a list of one
        return [_convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(items)]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}.")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(hint)}")  # our bug


def from_dict(cls: type, values: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking every key and value."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '(top level)'}': expected a mapping, got {values!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key in RENAMED and key not in names:
            raise ConfigError(f"config key '{prefix}{key}' is gone. Fix: {RENAMED[key]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
            raise ConfigError(f"unknown config key '{prefix}{key}'.{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
        if key in POSITIVE and kwargs[key] is not None and kwargs[key] <= 0:
            raise ConfigError(f"config key '{prefix}{key}': must be positive, got {value!r}.")
        if key in NON_NEGATIVE and kwargs[key] is not None and kwargs[key] < 0:
            raise ConfigError(f"config key '{prefix}{key}': must be zero or more, got {value!r}.")
    return cls(**kwargs)


def apply_override(values: dict[str, Any], override: str) -> None:
    """`a.b=value` sets values['a']['b'] (the value is parsed as YAML: 3, 1e-4, true, [a, b])."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value (e.g. lr=1e-4, data.loss_on=last).")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section.")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (or none), apply overrides, validate, and resolve relative paths."""
    values: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from None
        base = path.parent
    for override in overrides:
        apply_override(values, override)
    config = from_dict(TrainConfig, values)
    from onepass.accel import check_setting  # no torch: the registry's names only

    check_setting(config.accelerations)
    check_cross_fields(config, held_out=bool(config.data.eval))
    if not config.model:
        raise ConfigError("config key 'model' is required: a local Hugging Face model directory.")
    if not config.data.train:
        raise ConfigError("config key 'data.train' is required: one or more data files.")
    # a relative path is relative to the config file, unless it exists from the working directory, or it is a
    # Hub id (org/name) that is not a path under the config's folder (onepass.hub resolves it when used)
    def resolve(p: str) -> str:
        if Path(p).is_absolute() or Path(p).exists() or (is_hub_id(p) and not (base / p).exists()):
            return str(p)
        return str(base / p)

    config.data.train = [dataclasses.replace(s, path=resolve(s.path)) for s in config.data.sources()]
    config.data.eval = [dataclasses.replace(s, path=resolve(s.path)) for s in config.data.eval_sources()]
    config.model = resolve(config.model)
    if config.tokenizer:
        config.tokenizer = resolve(config.tokenizer)
    return config


def check_cross_fields(config: TrainConfig, held_out: bool) -> None:
    """The rules between keys, one error each: when the config loads (`held_out`: data.eval is given) and
    again when a run is built (`held_out`: held-out examples exist, from data.eval or given from Python)."""
    if (config.early_stopping.patience or config.keep_best) and not (held_out and config.eval_every):
        raise ConfigError("early_stopping and keep_best compare held-out losses during training. Fix: give "
                          "data.eval and eval_every > 0, or set early_stopping.patience: 0 and keep_best: false.")
    if config.eval_samples and not config.data.eval:
        raise ConfigError("eval_samples shows replies to held-out prompts. Fix: give data.eval, or set "
                          "eval_samples: 0.")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
