"""Data files → raw records, each tagged with where it came from (file and line or row).

Readers never raise on a bad record: a record that cannot be read (invalid JSON, bad bytes,
a ragged CSV row) comes back with an `error`, so the caller can stop or count and skip it.
They do raise `OnepassError` on problems with the file itself (missing, a plain directory).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onepass.data.types import Record
from onepass.errors import DataError, OnepassError

JSON_LIST_COLUMNS = ("messages", "conversations", "prompt", "completion", "completions")
SUFFIXES = ".jsonl, .json, .parquet, .csv or a `datasets` directory saved with save_to_disk"


@dataclass(frozen=True, eq=False)
class Rows:
    """Records held in memory, read in place of a file: a `datasets.Dataset` or `IterableDataset` (read
    as it streams), or a list of dicts. Errors name them `name`, row by row ("rows, row 3")."""

    rows: Any
    name: str = "rows"

    def __str__(self) -> str:
        return self.name


def check_data_path(path: str | Path | Rows) -> Path | Rows:
    """The path, or the one error for a data path that does not exist."""
    if isinstance(path, Rows):
        return path
    path = Path(path)
    if not path.exists():
        raise OnepassError(f"data path not found: {path}. Fix: check the path (relative paths start at {Path.cwd()}).")
    return path


def read_records(path: str | Path | Rows) -> Iterator[Record]:
    """Yield every record of one data file (or `datasets` directory, or `Rows` in memory), in order."""
    path = check_data_path(path)
    if isinstance(path, Rows):
        for index, row in enumerate(path.rows, start=1):
            yield _object_or_error(path.name, f"row {index}", dict(row) if isinstance(row, Mapping) else row)
        return
    if path.is_dir():
        yield from _read_datasets_dir(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    else:
        raise OnepassError(f"{path}: unknown data file type '{suffix}'. Fix: use {SUFFIXES}.")


def _object_or_error(source: str, where: str, value: Any) -> Record:
    if isinstance(value, dict):
        return Record(source, where, value)
    error = DataError(source, where, None, f"record is a JSON {type(value).__name__}, expected an object",
                      'write each record as {"messages": [...]} or another supported format', code="not_an_object")
    return Record(source, where, None, error)


def _read_jsonl(path: Path) -> Iterator[Record]:
    source = str(path)
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"line {line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield Record(source, where, None, DataError(
                    source, where, None, f"invalid UTF-8 bytes (at byte {error.start})",
                    "re-save the file as UTF-8", code="invalid_utf8"))
                continue
            if not text.strip():
                continue  # blank lines separate nothing in JSONL; they are not records
            if "\x00" in text:
                yield Record(source, where, None, DataError(
                    source, where, None, "NUL byte in line", "remove the NUL (\\x00) characters", code="nul_byte"))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                yield Record(source, where, None, DataError(
                    source, where, None, f"invalid JSON: {error.msg} at column {error.colno}",
                    "each line must be one complete JSON object", code="invalid_json"))
                continue
            yield dataclasses.replace(_object_or_error(source, where, value), size=len(raw))


def _read_text(path: Path) -> str:
    """A whole file as text (a leading BOM dropped); bad bytes are a file-level error."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise OnepassError(f"{path}: invalid UTF-8 bytes at byte {error.start}. Fix: re-save the file as UTF-8.")


def _read_json(path: Path) -> Iterator[Record]:
    source = str(path)
    text = _read_text(path)
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("{") and "\n" in text.strip():
            yield from _read_jsonl(path)  # a JSON-lines file with a .json name
            return
        raise OnepassError(f"{source}: invalid JSON: {error.msg} at line {error.lineno} column {error.colno}. "
                           "Fix: a .json file holds one list of records; use .jsonl for one record per line.")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise OnepassError(f"{source}: the file holds a JSON {type(value).__name__}, expected a list of records.")
    for index, item in enumerate(value, start=1):
        yield _object_or_error(source, f"record {index}", item)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise OnepassError(f"{path}: not a readable Parquet file ({error}).")
    for index, row in enumerate(table.to_pylist(), start=1):
        yield Record(str(path), f"row {index}", row)


def _read_csv(path: Path) -> Iterator[Record]:
    source = str(path)
    text = _read_text(path)
    csv.field_size_limit(2**31 - 1)  # a cell may hold a long document; length is checked after tokenizing
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            return
        yield from _csv_rows(source, reader, header)
    except csv.Error as error:
        raise OnepassError(f"{source}, line {reader.line_num}: unreadable CSV ({error}). Fix: check the quoting "
                           "around that line.") from None


def _csv_rows(source: str, reader: Any, header: list[str]) -> Iterator[Record]:
    for row in reader:
        where = f"line {reader.line_num}"
        if not row:
            continue  # a blank line is not a record (a row of empty cells is, and is checked)
        if any("\x00" in cell for cell in row):
            yield Record(source, where, None, DataError(source, where, None, "NUL byte in row",
                                                        "remove the NUL (\\x00) characters", code="nul_byte"))
            continue
        if len(row) != len(header):
            yield Record(source, where, None, DataError(
                source, where, None, f"row has {len(row)} fields but the header has {len(header)}",
                "quote fields that contain commas, and give every row the header's columns", code="ragged_row"))
            continue
        record: dict[str, Any] = dict(zip(header, row))
        for column in JSON_LIST_COLUMNS:
            value = record.get(column)
            if isinstance(value, str) and value.lstrip().startswith("["):
                try:
                    record[column] = json.loads(value)
                except json.JSONDecodeError as error:
                    yield Record(source, where, None, DataError(
                        source, where, column, f"invalid JSON in CSV cell: {error.msg}",
                        "a list-valued CSV cell must hold valid JSON", code="invalid_json_cell"))
                    break
        else:
            yield Record(source, where, record)


def _read_datasets_dir(path: Path) -> Iterator[Record]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / marker).exists() for marker in markers):
        raise OnepassError(f"{path} is a directory, not a data file. Fix: give a {SUFFIXES}.")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1 and "train" not in loaded:
            raise OnepassError(f"{path} holds splits {sorted(loaded)}. Fix: give one split's folder, "
                               f"e.g. {path / sorted(loaded)[0]}.")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    for index, row in enumerate(loaded, start=1):
        yield Record(str(path), f"row {index}", row)
