"""Data files → validated, rendered, length-checked `Example`s, with a full account of what was
skipped, dropped, truncated or split, cached on disk.

This is the data stage's driver: `records` reads, `formats` validates, `render` tokenizes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

import onepass
from onepass.chat_template import ChatTemplate
from onepass.errors import DataError, OnepassError, TemplateRenderError
from onepass.formats import FORMATS, Conversation, detect_format, expected_keys, to_conversation
from onepass.records import read_records
from onepass.render import (Example, RenderedText, RenderOptions, cut_point, mask_tokens, render_conversation,
                            tokenize_rendered)

OnBadRecord = Literal["error", "skip"]
OPENING_WORDS = 2
CHUNK_SIZE = 512  # conversations per tokenizer batch and per worker task
ARRAYS = {"input_ids": np.int32, "loss_mask": np.int8, "turn": np.int32}  # an Example's arrays, as cached


@dataclass
class Stats:
    """What happened to every record: nothing is lost without being counted here."""

    records: int = 0
    conversations: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # bad records skipped, by reason
    dropped: dict[str, int] = field(default_factory=dict)  # valid records not trained, by reason
    truncated: int = 0
    unstable: int = 0  # conversations whose template rewrites history
    split: int = 0  # ... that became one example per assistant turn
    lengths: list[int] = field(default_factory=list)
    openings: dict[str, int] = field(default_factory=dict)  # first words of responses → count
    formats: dict[str, str] = field(default_factory=dict)  # file → detected format

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def length_percentiles(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        values = np.percentile(np.asarray(self.lengths), [50, 90, 99, 100])
        return {name: int(value) for name, value in zip(("p50", "p90", "p99", "max"), values)}


@dataclass
class PreparedData:
    examples: list[Example]
    stats: Stats
    cache_path: Path | None = None
    from_cache: bool = False
    rejects: list[dict[str, Any]] = field(default_factory=list)  # one row per skipped record, with its reason


def _add(counter: dict[str, int], key: str, amount: int = 1) -> None:
    counter[key] = counter.get(key, 0) + amount


def load_conversations(paths: Sequence[str | Path], format_name: str | None, on_bad_record: OnBadRecord,
                       stats: Stats, rejects: list[dict[str, Any]]) -> list[Conversation]:
    """Read and validate every record of every file; bad ones raise or are counted and kept in `rejects`."""
    if format_name is not None and format_name not in FORMATS:
        raise OnepassError(f"unknown format '{format_name}'. Fix: use one of {', '.join(FORMATS)}.")
    conversations = []
    for path in paths:
        file_format, detected_at = format_name, None
        records_in_file = 0
        for record in read_records(path):
            records_in_file += 1
            stats.records += 1
            try:
                if record.error is not None:
                    raise record.error
                record_format = detect_format(record.data)
                if file_format is None:
                    if record_format is None:
                        raise DataError(record.source, record.where, None,
                                        f"unrecognised record (keys {sorted(record.data)[:8]})",
                                        "give 'messages', 'conversations', 'prompt'+'completion', "
                                        "'instruction'+'output' or 'text'")
                    file_format, detected_at = record_format, record.where
                elif format_name is None and record_format != file_format:
                    raise DataError(record.source, record.where, None,
                                    f"record in another format (keys {sorted(record.data)[:8]}; this file is "
                                    f"in '{file_format}' format, detected from {detected_at})",
                                    f"give every record {expected_keys(file_format)}, or split the file by format")
                conversations.append(to_conversation(record, file_format))
            except DataError as error:
                if on_bad_record == "error":
                    raise
                _add(stats.rejected, error.reason)
                rejects.append(error.as_row())
        if records_in_file == 0:
            raise OnepassError(f"{path}: no records found (the file is empty). Fix: check the file, or remove it "
                               "from the data list.")
        stats.formats[str(path)] = file_format or "unknown"
    stats.conversations = len(conversations)
    return conversations


def _openings(conversations: list[Conversation], stats: Stats) -> None:
    for conversation in conversations:
        if conversation.kind == "raw":
            responses = [text for text, trained in conversation.segments if trained]
        else:
            responses = [conversation.messages[i].content for i in conversation.assistant_indices
                         if conversation.messages[i].train is not False]
        for response in responses:
            words = response.split()[:OPENING_WORDS]
            if words:
                _add(stats.openings, " ".join(words))


def _render_chunk(tokenizer: Any, template: ChatTemplate, options: RenderOptions, on_bad_record: OnBadRecord,
                  conversations: list[Conversation]) -> tuple[list[Example], Stats, list[dict[str, Any]]]:
    """Render, tokenize and length-check one chunk; returns its examples, its part of the stats, and
    the conversations the chat template refused (as rejects rows, when skipping)."""
    stats, rejects = Stats(), []
    rendered, owners = [], []
    for conversation in conversations:
        try:
            result = render_conversation(conversation, template, options, tokenizer.eos_token)
        except TemplateRenderError as refusal:
            error = DataError(conversation.source, conversation.where, None, str(refusal),
                              "fix the record so the chat template accepts it (e.g. roles in the order it expects)")
            if on_bad_record == "error":
                raise error from None
            _add(stats.rejected, error.reason)
            rejects.append(error.as_row())
            continue
        stats.unstable += result.unstable
        stats.split += result.split
        if not result.texts:
            _add(stats.dropped, "no trained turn")
        rendered.extend(result.texts)
        owners.extend([conversation] * len(result.texts))
    examples = []
    if options.max_seq_len is not None and options.overlong != "truncate":
        rendered, owners = _drop_certainly_overlong(rendered, owners, tokenizer, options, stats)
    for item, conversation, (ids, offsets) in zip(rendered, owners, tokenize_rendered(tokenizer, rendered)):
        keep = len(ids)
        if options.max_seq_len is not None and len(ids) > options.max_seq_len:
            if options.overlong == "error":
                raise OnepassError(f"{conversation.source}, {conversation.where}: {len(ids)} tokens, more than "
                                   f"max_seq_len={options.max_seq_len}. Fix: raise max_seq_len, or set overlong: "
                                   "truncate or drop.")
            if options.overlong == "drop":
                _add(stats.dropped, "longer than max_seq_len")
                continue
            keep = cut_point(item, offsets, options.max_seq_len)
            stats.truncated += 1
        loss_mask, turn = mask_tokens(item, offsets[:keep])
        if not loss_mask.any():
            _add(stats.dropped, "no trained tokens after truncation" if keep < len(ids) else "no trained tokens")
            continue
        examples.append(Example(ids[:keep], loss_mask, turn, conversation.source, conversation.where))
    return examples, stats, rejects


def _drop_certainly_overlong(rendered: list[RenderedText], owners: list[Conversation], tokenizer: Any,
                             options: RenderOptions, stats: Stats) -> tuple[list[RenderedText], list[Conversation]]:
    """Texts so long they cannot fit (e.g. a 10 MB line) are dropped (or refused) before tokenizing,
    which would take seconds each for nothing."""
    limit = options.max_seq_len * _longest_token_chars(tokenizer) * 4  # margin for normalisers
    kept_texts, kept_owners = [], []
    for item, conversation in zip(rendered, owners):
        if len(item.text) <= limit:
            kept_texts.append(item)
            kept_owners.append(conversation)
        elif options.overlong == "error":
            raise OnepassError(f"{conversation.source}, {conversation.where}: {len(item.text):,} characters, far "
                               f"more than max_seq_len={options.max_seq_len} tokens. Fix: shorten the record, or "
                               "set overlong: truncate or drop.")
        else:
            _add(stats.dropped, "longer than max_seq_len")
    return kept_texts, kept_owners


@functools.lru_cache(maxsize=8)
def _longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token stands for (a text longer than max_seq_len times this, with
    margin for normalisers, cannot fit and is dropped without being tokenized)."""
    return max(1, max((len(token) for token in tokenizer.get_vocab()), default=1))


_worker_state: dict[str, Any] = {}


def _worker_init(tokenizer: Any, template: ChatTemplate, options: RenderOptions, on_bad_record: OnBadRecord) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_state.update(tokenizer=tokenizer, template=template, options=options, on_bad_record=on_bad_record)


def _worker_render(conversations: list[Conversation]) -> tuple[list[Example], Stats, list[dict[str, Any]]]:
    return _render_chunk(_worker_state["tokenizer"], _worker_state["template"], _worker_state["options"],
                         _worker_state["on_bad_record"], conversations)


def render_all(conversations: list[Conversation], tokenizer: Any, template: ChatTemplate, options: RenderOptions,
               num_workers: int = 1, on_bad_record: OnBadRecord = "error",
               rejects: list[dict[str, Any]] | None = None) -> tuple[list[Example], Stats]:
    """Every conversation → examples, with the counts of what was dropped, truncated, split or (when the
    chat template refuses a conversation and on_bad_record is skip) rejected, appended to `rejects`."""
    chunks = [conversations[i:i + CHUNK_SIZE] for i in range(0, len(conversations), CHUNK_SIZE)]
    if num_workers <= 1 or len(chunks) <= 1:
        parts = [_render_chunk(tokenizer, template, options, on_bad_record, chunk) for chunk in chunks]
    else:
        with ProcessPoolExecutor(num_workers, initializer=_worker_init,
                                 initargs=(tokenizer, template, options, on_bad_record)) as pool:
            parts = list(pool.map(_worker_render, chunks))
    examples, stats = [], Stats()
    for part_examples, part_stats, part_rejects in parts:
        examples.extend(part_examples)
        if rejects is not None:
            rejects.extend(part_rejects)
        for reason, count in part_stats.rejected.items():
            _add(stats.rejected, reason, count)
        stats.unstable += part_stats.unstable
        stats.split += part_stats.split
        stats.truncated += part_stats.truncated
        for reason, count in part_stats.dropped.items():
            _add(stats.dropped, reason, count)
    return examples, stats


def _cache_key(paths: Sequence[str | Path], tokenizer: Any, template: ChatTemplate, options: RenderOptions,
               format_name: str | None, on_bad_record: str) -> str:
    digest = hashlib.sha256()
    digest.update(onepass.__version__.encode())
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.name).encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(template.variables).encode() + template.source.encode())
    digest.update(json.dumps([asdict(options), format_name, on_bad_record]).encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONEPASS_CACHE", Path.home() / ".cache" / "onepass"))


def save_cache(path: Path, data: PreparedData) -> None:
    """Write atomically: a temp dir renamed into place, so a killed run never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    np.save(temp / "lengths.npy", np.asarray([len(e) for e in data.examples], dtype=np.int64))
    for name, dtype in ARRAYS.items():
        values = [getattr(e, name) for e in data.examples]
        np.save(temp / f"{name}.npy", (np.concatenate(values) if values else np.zeros(0)).astype(dtype))
    meta = {"stats": asdict(data.stats), "sources": [[e.source, e.where] for e in data.examples],
            "rejects": data.rejects}
    (temp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(temp, path)
    except OSError:  # another process (a rank on the same node) just wrote the same cache entry
        shutil.rmtree(temp, ignore_errors=True)
        if not is_cached(path):
            raise


def is_cached(path: Path) -> bool:
    return all((path / name).exists() for name in ("meta.json", "lengths.npy", *(f"{a}.npy" for a in ARRAYS)))


def load_cache(path: Path) -> PreparedData:
    """Examples as views into memory-mapped arrays: ranks on one machine share the pages, and each
    reads only the rows it trains on."""
    meta = json.loads((path / "meta.json").read_text())
    bounds = np.concatenate([[0], np.cumsum(np.load(path / "lengths.npy"))])
    input_ids, loss_mask, turn = (np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS)
    examples = [Example(input_ids[a:b], loss_mask[a:b], turn[a:b], source, where)
                for (a, b), (source, where) in zip(zip(bounds[:-1], bounds[1:]), meta["sources"])]
    return PreparedData(examples, Stats(**meta["stats"]), path, from_cache=True, rejects=meta.get("rejects", []))


def prepare(paths: Sequence[str | Path], tokenizer: Any, template: ChatTemplate, options: RenderOptions, *,
            format_name: str | None = None, on_bad_record: OnBadRecord = "error", num_workers: int = 1,
            cache_dir: str | Path | None = None, use_cache: bool = True,
            rejects_file: str | Path | None = None) -> PreparedData:
    """Every data file → `Example`s and `Stats`, from the on-disk cache when the inputs are unchanged."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise OnepassError("no data files given. Fix: set data.train (a file or a list of files).")
    for path in paths:
        if not path.exists():
            raise OnepassError(f"data path not found: {path}. Fix: check the path.")
    cache_path = None
    if use_cache:
        key = _cache_key(paths, tokenizer, template, options, format_name, on_bad_record)
        cache_path = Path(cache_dir or default_cache_dir()) / "prepared" / key
        if is_cached(cache_path):
            data = load_cache(cache_path)
            write_rejects(data.rejects, rejects_file)
            return data
    stats, rejects = Stats(), []
    conversations = load_conversations(paths, format_name, on_bad_record, stats, rejects)
    _openings(conversations, stats)
    examples, render_stats = render_all(conversations, tokenizer, template, options, num_workers, on_bad_record,
                                        rejects)
    write_rejects(rejects, rejects_file)
    for reason, count in render_stats.rejected.items():
        _add(stats.rejected, reason, count)
    stats.conversations -= sum(render_stats.rejected.values())
    stats.unstable, stats.split, stats.truncated = render_stats.unstable, render_stats.split, render_stats.truncated
    stats.dropped = render_stats.dropped
    stats.examples = len(examples)
    stats.lengths = [len(e) for e in examples]
    stats.tokens = sum(stats.lengths)
    stats.trained_tokens = sum(e.num_trained_tokens for e in examples)
    data = PreparedData(examples, stats, cache_path, rejects=rejects)
    if cache_path is not None:
        save_cache(cache_path, data)
    return data


def write_rejects(rejects: list[dict[str, Any]], path: str | Path | None) -> None:
    """One JSON line per skipped record (file, line, field, reason), for a user to fix and retry."""
    if rejects and path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rejects)


def summary_line(name: str, stats: Stats) -> str:
    """One line saying what became of every record: examples, and what was rejected or dropped, and why."""
    parts = [f"{name}: {stats.records:,} records → {stats.examples:,} examples, {stats.tokens:,} tokens "
             f"({stats.trained_tokens:,} trained)"]
    for label, counts in (("rejected", stats.rejected), ("dropped", stats.dropped)):
        if counts:
            reasons = ", ".join(f"{reason} ×{count}" for reason, count in sorted(counts.items()))
            parts.append(f"{label} {sum(counts.values()):,} ({reasons})")
    if stats.truncated:
        parts.append(f"truncated {stats.truncated:,}")
    return "; ".join(parts)


def nothing_left(name: str, stats: Stats, max_seq_len: int | None) -> OnepassError:
    """The error for data that prepared into no example at all, with the fix its reasons point to."""
    fixes = []
    if any("max_seq_len" in reason or "truncation" in reason for reason in stats.dropped):
        fixes.append(f"raise max_seq_len (now {max_seq_len}) or set data.overlong: truncate")
    if stats.rejected:
        fixes.append("fix the rejected records (each reason names the file, line and field)")
    if any(reason in ("no trained turn", "no trained tokens") for reason in stats.dropped):
        fixes.append("check data.loss_on and per-message train flags: nothing was left to train on")
    return OnepassError(f"no {name} examples left after preparation. {summary_line(name + ' data', stats)}. "
                        f"Fix: {'; '.join(fixes) or 'check the data'}.")
