"""onepass from Python: what each command does, as a call on the objects a user holds.

    data = onepass.prepare(dataset, tokenizer)                     # a Dataset, list of dicts or files
    result = onepass.fit(model, data, onepass.TrainOptions(max_steps=100), tokenizer=tokenizer)
    rows = onepass.logprobs(model, tokenizer, conversations)       # log Pr(response | context) per message
    proof = onepass.check(model)                                   # the start-up check, as a value

(`fit` and `logprobs`, not `train` and `score`: those are the names of onepass's subpackages.)

The same checks and errors as the command line, which calls these. The model given is prepared for
the call (its attention, the accelerations, for training LoRA and the rest as the options say) and
given back with its own attention and modules afterwards (`train.handle.ModelHandle.restore`). What
the library says goes to the `onepass` logger: `logging.basicConfig(level="INFO")` shows it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from onepass.config import DataConfig, LoraConfig, TrainConfig, check_cross_fields
from onepass.data.cache import PreparedData
from onepass.data.records import Rows
from onepass.errors import OnepassError

log = logging.getLogger(__name__)

# The option trees of the config file, by the names the Python calls take them under
TrainOptions = TrainConfig
DataOptions = DataConfig
LoraOptions = LoraConfig


def data_entries(data: Any) -> list[str | Path | Rows]:
    """What `prepare` reads for `data`: a path or Hub id, a list of them, a `datasets.Dataset` or
    `IterableDataset`, or a list of records (dicts)."""
    if isinstance(data, (str, Path, Rows)):
        return [data]
    if isinstance(data, Sequence) and data and all(isinstance(item, (str, Path)) for item in data):
        return list(data)
    if isinstance(data, Sequence) and all(isinstance(item, dict) for item in data):
        if not data:
            raise OnepassError("no records given (an empty list). Fix: pass records, a Dataset or data files.")
        return [Rows(data, "records")]
    if type(data).__name__ in ("Dataset", "IterableDataset") or isinstance(data, Iterable):
        return [Rows(data, type(data).__name__)]
    raise OnepassError(f"cannot read data of type {type(data).__name__}. Fix: pass a datasets.Dataset, a list of "
                       "dicts, or data file paths.")


def prepare(data: Any, tokenizer: Any, options: DataOptions | None = None, *, max_seq_len: int | None = 2048,
            use_cache: bool = True, progress: bool | None = None) -> PreparedData:
    """Records → rendered, tokenized, masked `Example`s with the account of every record (`stats`), as
    `onepass prepare` makes them (cached on disk for files; records in memory are not cached)."""
    from onepass.data.chat_template import load_chat_template
    from onepass.data.prepare import prepare as prepare_files

    options = options or DataOptions()
    template = load_chat_template(tokenizer, options.chat_template, options.chat_template_kwargs)
    return prepare_files(data_entries(data), tokenizer, template, options.render_options(max_seq_len),
                         format_name=options.format, on_bad_record=options.on_bad_record,
                         num_workers=options.num_workers, cache_dir=options.cache_dir, use_cache=use_cache,
                         progress=progress)


def fit(model: Any, data: Any, options: TrainOptions | None = None, *, tokenizer: Any = None,
        eval_data: Any = None) -> Any:
    """Train `model` (a loaded transformers causal LM) on `data` (`prepare`'s result, or what `prepare`
    takes) with `options`, as `onepass train` does: LoRA, checkpointing, accelerations and compile as the
    options say, the start-up check, evaluation on `eval_data`, checkpoints and the export to
    `options.output_dir/final`. Returns the `TrainResult` (`.model`: the model trained, its LoRA wrapper
    under LoRA; `.metrics`; `.final_dir`). The model has its own attention and modules again after."""
    from onepass.accel import check_setting
    from onepass.data.tokenizer import load_tokenizer
    from onepass.train.run import build_run
    from onepass.train.trainer import Trainer

    options = dataclasses.replace(options) if options is not None else TrainOptions()
    check_setting(options.accelerations)
    check_cross_fields(options, held_out=eval_data is not None or bool(options.data.eval))
    if tokenizer is None:
        if not (options.tokenizer or options.model):
            raise OnepassError("train needs the tokenizer (the export saves it with the model). Fix: pass "
                               "tokenizer=..., or set options.tokenizer to its directory.")
        tokenizer = load_tokenizer(options.tokenizer or options.model)
    train_data = data if isinstance(data, PreparedData) else prepare(data, tokenizer, options.data,
                                                                       max_seq_len=options.max_seq_len)
    eval_examples = None
    if eval_data is not None:
        eval_examples = (eval_data if isinstance(eval_data, PreparedData) else prepare(
            eval_data, tokenizer, options.data, max_seq_len=options.max_seq_len)).examples
    run = build_run(options, model=model, tokenizer=tokenizer, train_data=train_data, eval_examples=eval_examples)
    try:
        result = Trainer(run).fit()
    finally:
        run.handle.restore()
    return dataclasses.replace(result, model=run.model)


def logprobs(model: Any, tokenizer: Any, conversations: Any, *, chat_template: str | None = None,
             loss_on: str = "assistant", accelerations: str | list[str] = "auto", check: bool = True,
             one_pass: bool = False, batch_tokens: int = 4096, format: str | None = None) -> list[dict[str, Any]]:
    """log Pr(response | context) of every message of every conversation (a Dataset, a list of records or
    data files), from one forward pass each, as `onepass score` gives them: one dict per conversation
    (`logprob_response`, `turn_logprobs`, per-message values, `method`). With `check`, the start-up check
    runs first; on a model it finds not prefix-consistent each turn is scored from its own prefix
    (unless `one_pass`)."""
    from onepass.data.chat_template import load_chat_template
    from onepass.data.prepare import load_conversations
    from onepass.data.stats import Stats
    from onepass.score.scoring import score_rows

    template = load_chat_template(tokenizer, chat_template)
    records = load_conversations(data_entries(conversations), format, "error", Stats(), [])
    with _prepared(model, accelerations, check, announce=True) as handle:
        per_turn = check and not handle.check.prefix_consistent and not one_pass
        if check and not handle.check.prefix_consistent:
            log.info("scoring: " + ("each turn from its own prefix, one pass per turn (exact by construction; "
                                    "--one-pass for one pass per conversation)" if per_turn else
                                    "one pass per conversation (--one-pass): per-turn values no K-pass "
                                    "evaluation reproduces on this model"))
        return score_rows(handle.model, tokenizer, template, records, loss_on, batch_tokens, per_turn,
                          handle.head_loss)


def rank(model: Any, tokenizer: Any, rows: Any, *, chat_template: str | None = None,
         accelerations: str | list[str] = "auto", check: bool = True, batch_tokens: int = 4096
         ) -> list[dict[str, Any]]:
    """Candidates ranked by log Pr(completion | prompt), as `onepass score` ranks rows of
    {prompt, completions: [...]}: each row's candidates one tree (the prompt once), one forward pass."""
    from onepass.data.chat_template import load_chat_template
    from onepass.data.prepare import files_of
    from onepass.data.records import read_records
    from onepass.score.scoring import rank_candidates

    template = load_chat_template(tokenizer, chat_template)
    records = [record for entry in data_entries(rows) for file in files_of(entry) for record in read_records(file)]
    bad = next((record for record in records if record.error is not None), None)
    if bad is not None:
        raise bad.error
    with _prepared(model, accelerations, check, announce=True) as handle:
        return rank_candidates(handle.model, tokenizer, template, records, batch_tokens, handle.head_loss)


def check(model: Any, *, accelerations: str | list[str] = "auto") -> Any:
    """The start-up check as a value (`train.check.PackingCheck`): onepass's path against the model's
    own forward, the packing that equals it, whether the model is prefix-consistent. Raises the check's
    error where neither packing equals it. The model is left as it came."""
    with _prepared(model, accelerations, True) as handle:
        return handle.check


def _prepared(model: Any, accelerations: str | list[str], check: bool, announce: bool = False) -> Any:
    """The model prepared for scoring in fp32 (`handle.prepare_model`), checked where asked (with
    `announce`, the check's line logged); the handle restores it when the `with` block ends."""
    from onepass.accel import check_setting
    from onepass.train.handle import check_model, prepare_model

    check_setting(accelerations)
    handle = prepare_model(model, accelerations)
    if check:
        check_model(handle)
        if announce:
            log.info(handle.check.describe())
    return handle
