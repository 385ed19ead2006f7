"""Reading data files: every supported container, and bad files named precisely."""

from __future__ import annotations

import json

import pytest

from onepass.errors import OnepassError
from onepass.data.records import read_records


def test_jsonl_records_carry_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    records = list(read_records(path))
    assert [r.where for r in records] == ["line 1", "line 3"]
    assert [r.data["text"] for r in records] == ["a", "b"]


def test_jsonl_bad_lines_become_records_with_errors_not_exceptions(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": \n\xff\xfe\n[1, 2]\n')
    records = list(read_records(path))
    assert records[0].error is None
    assert "line 2" in str(records[1].error) and "invalid JSON" in str(records[1].error)
    assert "line 3" in str(records[2].error) and "invalid UTF-8" in str(records[2].error)
    assert "line 4" in str(records[3].error) and "expected an object" in str(records[3].error)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert list(read_records(path))[0].data == {"text": "a"}


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r.where for r in read_records(path)] == ["record 1", "record 2"]


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}]), path)
    [record] = read_records(path)
    assert record.where == "row 1" and record.data == {"prompt": "p", "completion": "c"}


def test_csv_file_parses_json_message_columns_and_flags_ragged_rows(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    path.write_text('messages\n"' + messages.replace('"', '""') + '"\n"a",b\n')
    records = list(read_records(path))
    assert records[0].data["messages"][1]["content"] == "yo"
    assert "row has 2 fields but the header has 1" in str(records[1].error)


def test_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert [r.data["text"] for r in read_records(tmp_path / "ds")] == ["a", "b"]


def test_missing_path_and_plain_directory_are_clear_errors(tmp_path):
    with pytest.raises(OnepassError, match="data path not found"):
        list(read_records(tmp_path / "nope.jsonl"))
    with pytest.raises(OnepassError, match="is a directory, not a data file"):
        list(read_records(tmp_path))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(OnepassError, match="unknown data file type '.txt'"):
        list(read_records(tmp_path / "d.txt"))
