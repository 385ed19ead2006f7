"""Data files → validated, rendered, length-checked `Example`s, with a full account of what was
skipped, dropped, truncated or split, cached on disk.

This is the data stage's driver: `records` reads, `formats` validates, `render` tokenizes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onepass.data.cache import CacheWriter, PreparedData, cache_key, default_cache_dir, is_cached, load_cache
from onepass.data.progress import PrepareProgress
from onepass.data.chat_template import ChatTemplate
from onepass.data.formats import FORMATS, detect_format, expected_keys, to_conversation
from onepass.data.records import Rows, check_data_path, read_records
from onepass.hub import dataset_files
from onepass.data.render import (cut_point, generation_marks_agree, has_generation_marks, mask_tokens,
                                 render_conversation, tokenize_rendered)
from onepass.data.stats import Stats, count_agentic
from onepass.data.tree import TokenPath, merge_paths, tree_example
from onepass.data.types import ChatConversation, Conversation, Example, OnBadRecord, RenderedText, RenderOptions
from onepass.errors import DataError, OnepassError, TemplateRenderError

OPENING_WORDS = 2
CHUNK_SIZE = 512  # conversations per tokenizer batch and per worker task


def load_conversations(paths: Sequence[str | Path], format_name: str | None, on_bad_record: OnBadRecord,
                       stats: Stats, rejects: list[dict[str, Any]], limit: int | None = None) -> list[Conversation]:
    """Read and validate every record of every file (or until `limit` conversations are read); bad ones
    raise or are counted and kept in `rejects`."""
    return list(itertools.islice(iter_conversations(paths, format_name, on_bad_record, stats, rejects), limit))


def iter_conversations(paths: Sequence[str | Path], format_name: str | None, on_bad_record: OnBadRecord,
                       stats: Stats, rejects: list[dict[str, Any]],
                       progress: Callable[[int], None] = lambda size: None) -> Iterator[Conversation]:
    """Every valid conversation of every file, in order, as it is read (`stats` counts as it goes;
    `progress` is told the bytes of the files read)."""
    if format_name is not None and format_name not in FORMATS:
        raise OnepassError(f"unknown format '{format_name}'. Fix: use one of {', '.join(FORMATS)}.")
    for path in [file for entry in paths for file in files_of(entry)]:  # a Hub id: its train split's files
        file_format, detected_at = format_name, None
        records_in_file, read = 0, 0
        for record in read_records(path):
            records_in_file += 1
            stats.records += 1
            read += record.size
            progress(record.size)
            try:
                if record.error is not None:
                    raise record.error
                record_format = detect_format(record.data)
                if file_format is None:
                    if record_format is None:
                        raise DataError(record.source, record.where, None,
                                        f"unrecognised record (keys {sorted(record.data)[:8]})",
                                        "give 'messages', 'conversations', 'prompt'+'completion', "
                                        "'instruction'+'output' or 'text'", code="unrecognised_record")
                    file_format, detected_at = record_format, record.where
                elif format_name is None and record_format != file_format:
                    raise DataError(record.source, record.where, None,
                                    f"record in another format (keys {sorted(record.data)[:8]}; this file is "
                                    f"in '{file_format}' format, detected from {detected_at})",
                                    f"give every record {expected_keys(file_format)}, or split the file by format",
                                    code="other_format")
                conversation = to_conversation(record, file_format)
            except DataError as error:
                if on_bad_record == "error":
                    raise
                stats.rejected[error.reason] += 1
                rejects.append(error.as_row())
                continue
            stats.conversations += 1
            count_agentic(conversation, stats)
            yield conversation
        if records_in_file == 0:
            raise OnepassError(f"{path}: no records found (the file is empty). Fix: check the file, or remove it "
                               "from the data list.")
        progress(max(0, _size(path) - read))  # readers that do not count bytes: the file at its end
        stats.formats[str(path)] = file_format or "unknown"


def files_of(entry: str | Path | Rows) -> list[Path | Rows]:
    """The files a data entry stands for: a Hub id's (onepass.hub), a path's own, or records in memory."""
    return [entry] if isinstance(entry, Rows) else dataset_files(entry)


def _size(path: Path | Rows) -> int:
    if isinstance(path, Rows):
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _openings(conversations: list[Conversation], stats: Stats) -> None:
    for conversation in conversations:
        for response in conversation.responses():
            words = response.split()[:OPENING_WORDS]
            if words:
                stats.openings[" ".join(words)] += 1


@dataclass(frozen=True)
class _Unit:
    """What becomes one example: a conversation's text, or (a tree) its paths' texts."""

    conversation: Conversation
    texts: tuple[RenderedText, ...]
    tree: bool = False


def _render_chunk(tokenizer: Any, template: ChatTemplate, options: RenderOptions, on_bad_record: OnBadRecord,
                  conversations: list[Conversation]) -> tuple[list[Example], Stats, list[dict[str, Any]]]:
    """Render, tokenize and length-check one chunk; returns its examples, its part of the stats, and
    the conversations the chat template refused (as rejects rows, when skipping)."""
    stats, rejects = Stats(), []
    units = _render_units(conversations, tokenizer, template, options, on_bad_record, stats, rejects)
    if options.max_seq_len is not None and options.overlong != "truncate":
        units = _drop_certainly_overlong(units, tokenizer, options, stats)
    tokenized = iter(tokenize_rendered(tokenizer, [text for unit in units for text in unit.texts]))
    examples = []
    for unit in units:
        tokens = [next(tokenized) for _ in unit.texts]
        if unit.tree:
            made = [_tree_example(unit, tokens, options, stats)]
        else:
            made = [_sequence_example(unit.conversation, item, ids, offsets, options, stats)
                    for item, (ids, offsets) in zip(unit.texts, tokens)]
        examples += [example for example in made if example is not None]
    return examples, stats, rejects


def _render_units(conversations: list[Conversation], tokenizer: Any, template: ChatTemplate, options: RenderOptions,
                  on_bad_record: OnBadRecord, stats: Stats, rejects: list[dict[str, Any]]) -> list[_Unit]:
    units = []
    controls = template.control_tokens
    marks = has_generation_marks(template)
    for conversation in conversations:
        if controls and isinstance(conversation, ChatConversation):  # a user pasting `<|im_end|>`: counted
            texts = [message.content for message in conversation.messages]
            everything = "\n".join(texts)  # one scan per token for the whole conversation, mostly all it takes
            if any(token in everything for token in controls):
                found = sum(any(token in text for token in controls) for text in texts)
                stats.agentic["messages with control tokens in their text" + (
                    " (encoded as text)" if options.sanitize_control_tokens else "")] += found
        try:
            result = render_conversation(conversation, template, options, tokenizer.eos_token)
        except DataError as error:  # tools or reasoning the template cannot show
            if on_bad_record == "error":
                raise
            stats.rejected[error.reason] += 1
            rejects.append(error.as_row())
            continue
        except TemplateRenderError as refusal:
            fix = "fix the record so the chat template accepts it (e.g. roles in the order it expects)"
            if "system" in str(refusal).lower() and options.system_message == "keep":
                fix = ("set data.system_message: fold (--system-message fold) to fold the system message into the "
                       "first user message, or " + fix)
            error = DataError(conversation.source, conversation.where, None, str(refusal), fix, code="template_refused")
            if on_bad_record == "error":
                raise error from None
            stats.rejected[error.reason] += 1
            rejects.append(error.as_row())
            continue
        if marks and isinstance(conversation, ChatConversation) and len(result.texts) == 1 and not result.unstable:
            agree = generation_marks_agree(conversation, template, options, result.texts[0])
            if agree is not None:
                stats.generation_marks["agree" if agree else "differ"] += 1
        stats.unstable += result.unstable
        stats.split += result.split
        stats.trees += result.tree
        stats.template_notes.update(result.notes)
        if not result.texts:
            stats.dropped["no trained turn"] += 1
        elif result.tree:
            units.append(_Unit(conversation, result.texts, tree=True))
        else:
            units += [_Unit(conversation, (text,)) for text in result.texts]
    return units


def _overlong_error(conversation: Conversation, length: str, options: RenderOptions) -> OnepassError:
    return OnepassError(f"{conversation.source}, {conversation.where}: {length}, more than max_seq_len="
                        f"{options.max_seq_len}. Fix: raise max_seq_len, or set overlong: truncate or drop.")


def _sequence_example(conversation: Conversation, item: RenderedText, ids: Any, offsets: Any, options: RenderOptions,
                      stats: Stats) -> Example | None:
    keep = len(ids)
    if options.max_seq_len is not None and len(ids) > options.max_seq_len:
        if options.overlong == "error":
            raise _overlong_error(conversation, f"{len(ids)} tokens", options)
        if options.overlong == "drop":
            stats.dropped["longer than max_seq_len"] += 1
            return None
        keep = cut_point(item, offsets, options.max_seq_len)
        stats.truncated += 1
    loss_mask, turn = mask_tokens(item, offsets[:keep])
    if not loss_mask.any():
        stats.dropped["no trained tokens after truncation" if keep < len(ids) else "no trained tokens"] += 1
        return None
    return Example(ids[:keep], loss_mask, turn, conversation.source, conversation.where)


def _tree_example(unit: _Unit, tokens: list[tuple[Any, Any]], options: RenderOptions, stats: Stats) -> Example | None:
    """The paths (each turn's inference-time render) merged into one tree. Too many nodes: `truncate`
    keeps the leading paths (whole turns) that fit, each later turn dropped and counted."""
    paths = [TokenPath(ids, *mask_tokens(item, offsets)) for item, (ids, offsets) in zip(unit.texts, tokens)]
    tree = merge_paths(paths)
    limit = options.max_seq_len
    if limit is not None and len(tree.input_ids) > limit:
        if options.overlong == "error":
            raise _overlong_error(unit.conversation, f"{len(tree.input_ids)} tree nodes", options)
        if options.overlong == "drop":
            stats.dropped["longer than max_seq_len"] += 1
            return None
        while len(paths) > 1 and len(tree.input_ids) > limit:
            paths.pop()
            stats.dropped["turn cut by max_seq_len"] += 1
            tree = merge_paths(paths)
        if len(tree.input_ids) > limit:
            stats.dropped["longer than max_seq_len"] += 1
            return None
        stats.truncated += 1
    if not tree.loss_mask.any():
        stats.dropped["no trained tokens"] += 1
        return None
    return tree_example(tree, unit.conversation.source, unit.conversation.where)


def _drop_certainly_overlong(units: list[_Unit], tokenizer: Any, options: RenderOptions, stats: Stats) -> list[_Unit]:
    """Texts so long they cannot fit (e.g. a 10 MB line) are dropped (or refused) before tokenizing,
    which would take seconds each for nothing."""
    limit = options.max_seq_len * _longest_token_chars(tokenizer) * 4  # margin for normalisers
    kept = []
    for unit in units:
        longest = max(len(text.text) for text in unit.texts)
        if longest <= limit:
            kept.append(unit)
        elif options.overlong == "error":
            raise _overlong_error(unit.conversation, f"{longest:,} characters, far", options)
        else:
            stats.dropped["longer than max_seq_len"] += 1
    return kept


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


def render_stream(chunks: Iterable[list[Conversation]], tokenizer: Any, template: ChatTemplate,
                  options: RenderOptions, num_workers: int = 1, on_bad_record: OnBadRecord = "error"
                  ) -> Iterator[tuple[list[Example], Stats, list[dict[str, Any]]]]:
    """Each chunk of conversations → (its examples, its stats, its rejects), in order, as they are done:
    `num_workers` processes render at once, with at most two chunks each in flight (memory stays flat)."""
    chunks = iter(chunks)
    first = list(itertools.islice(chunks, 2))
    if num_workers <= 1 or len(first) < 2:  # one chunk: not worth starting processes for
        for chunk in itertools.chain(first, chunks):
            yield _render_chunk(tokenizer, template, options, on_bad_record, chunk)
        return
    with ProcessPoolExecutor(num_workers, initializer=_worker_init,
                             initargs=(tokenizer, template, options, on_bad_record)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain(first, chunks):
            pending.append(pool.submit(_worker_render, chunk))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def render_all(conversations: list[Conversation], tokenizer: Any, template: ChatTemplate, options: RenderOptions,
               num_workers: int = 1, on_bad_record: OnBadRecord = "error",
               rejects: list[dict[str, Any]] | None = None) -> tuple[list[Example], Stats]:
    """Every conversation → examples, with the counts of what was dropped, truncated, split or (when the
    chat template refuses a conversation and on_bad_record is skip) rejected, appended to `rejects`."""
    chunks = [conversations[i:i + CHUNK_SIZE] for i in range(0, len(conversations), CHUNK_SIZE)]
    examples, stats = [], Stats()
    for part_examples, part_stats, part_rejects in render_stream(chunks, tokenizer, template, options, num_workers,
                                                                 on_bad_record):
        examples.extend(part_examples)
        if rejects is not None:
            rejects.extend(part_rejects)
        stats.merge(part_stats)
    return examples, stats


def default_workers() -> int:
    """Processes that render and tokenize: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(paths: Sequence[str | Path], tokenizer: Any, template: ChatTemplate, options: RenderOptions, *,
            format_name: str | None = None, on_bad_record: OnBadRecord = "error", num_workers: int | None = None,
            cache_dir: str | Path | None = None, use_cache: bool = True,
            rejects_file: str | Path | None = None, progress: bool | None = None) -> PreparedData:
    """Every data file → `Example`s and `Stats`, from the on-disk cache when the inputs are unchanged.
    Records stream through in chunks and, with the cache, are written as they go, so memory does not
    grow with the data; the examples are then the cache entry's arrays. `num_workers`: default the
    machine's cores; `progress`: a bar on stderr (default: when it is a terminal)."""
    if not paths:
        raise OnepassError("no data files given. Fix: set data.train (a file or a list of files).")
    paths = [check_data_path(file) for entry in paths for file in files_of(entry)]
    num_workers = num_workers or default_workers()  # 0 or None: the machine's cores
    cache_path = None
    if use_cache and not any(isinstance(path, Rows) for path in paths):  # records in memory: nothing to key on
        key = cache_key(paths, tokenizer, template, options, format_name, on_bad_record)
        cache_path = Path(cache_dir or default_cache_dir()) / "prepared" / key
        if is_cached(cache_path):
            data = load_cache(cache_path, paths)
            write_rejects(data.rejects, rejects_file)
            return data
    examples: list[Example] = []
    writer = CacheWriter(cache_path) if cache_path is not None else None
    try:
        stats, rejects = _stream(paths, tokenizer, template, options, format_name, on_bad_record, num_workers,
                                 writer.add if writer is not None else examples.extend, progress)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    write_rejects(rejects, rejects_file)
    if writer is None:
        return PreparedData(examples, stats, None, rejects=rejects)
    writer.finish(stats, rejects, paths)
    return dataclasses.replace(load_cache(cache_path, paths), from_cache=False)


def _stream(paths: list[Path], tokenizer: Any, template: ChatTemplate, options: RenderOptions,
            format_name: str | None, on_bad_record: OnBadRecord, num_workers: int,
            sink: Callable[[list[Example]], None], progress: bool | None) -> tuple[Stats, list[dict[str, Any]]]:
    """Read, render and tokenize chunk by chunk, handing each chunk's examples to `sink`; the stats
    are merged per chunk."""
    stats, rejects = Stats(), []
    with PrepareProgress(sum(_size(p) for p in paths), progress) as bar:
        conversations = iter_conversations(paths, format_name, on_bad_record, stats, rejects, bar.read)

        def chunks() -> Iterator[list[Conversation]]:
            while chunk := list(itertools.islice(conversations, CHUNK_SIZE)):
                _openings(chunk, stats)
                yield chunk

        rendered = Stats()
        for part_examples, part_stats, part_rejects in render_stream(chunks(), tokenizer, template, options,
                                                                     num_workers, on_bad_record):
            sink(part_examples)
            rejects.extend(part_rejects)
            rendered.merge(part_stats)
            lengths = [len(e) for e in part_examples]
            stats.lengths.extend(lengths)
            stats.examples += len(part_examples)
            stats.tokens += sum(lengths)
            stats.trained_tokens += sum(e.num_trained_tokens for e in part_examples)
            bar.rendered(len(part_examples), sum(lengths))
    stats.merge(rendered)
    stats.conversations -= sum(rendered.rejected.values())  # the chat template refused these
    return stats, rejects


def write_rejects(rejects: list[dict[str, Any]], path: str | Path | None) -> None:
    """One JSON line per skipped record (file, line, field, reason), for a user to fix and retry."""
    if rejects and path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rejects)


