"""Hostile input: random and malformed files through the whole data stage. Every record ends as an
example, a counted drop, or a counted skip naming its file and line; the run as a whole either
prepares or stops with a one-line error. Never a traceback, a hang, or a record that vanishes."""

from __future__ import annotations

import csv
import io
import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onepass.data.chat_template import load_chat_template
from onepass.cli.main import main
from onepass.data.prepare import prepare
from onepass.errors import OnepassError
from onepass.data.types import RenderOptions

TEXT = st.text(alphabet=string.ascii_letters + " .?!\t\n\u00e9\u4e2d", max_size=40)
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=6)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", "USER", None, 3])


@st.composite
def messages_record(draw):
    messages = []
    for index in range(draw(st.integers(0, 5))):
        role = draw(ROLES) if draw(st.integers(0, 9)) == 0 else ("user", "assistant")[index % 2]
        content = draw(st.sampled_from(["", "   ", None]) if draw(st.integers(0, 9)) == 0 else TEXT)
        messages.append({"role": role, "content": content})
    return {"messages": messages}


VALID_SHAPES = st.one_of(
    messages_record(),
    st.builds(lambda p, c: {"prompt": p, "completion": c}, TEXT, TEXT),
    st.builds(lambda i, o: {"instruction": i, "input": "", "output": o}, TEXT, TEXT),
    st.builds(lambda h, g: {"conversations": [{"from": "human", "value": h}, {"from": "gpt", "value": g}]},
              TEXT, TEXT),
    st.builds(lambda t: {"text": t}, TEXT),
)


@st.composite
def record(draw):
    """A record of some format, then perhaps damaged: a field given a wrong type, or a key renamed."""
    value = draw(VALID_SHAPES)
    damage = draw(st.integers(0, 5))
    if damage == 0 and value:
        key = draw(st.sampled_from(sorted(value)))
        value[key] = draw(ANY_JSON)
    elif damage == 1 and value.get("messages"):
        message = draw(st.sampled_from(value["messages"]))
        message[draw(st.sampled_from(["role", "content", "train", "tool_calls"]))] = draw(ANY_JSON)
    elif damage == 2:
        value = draw(ANY_JSON)  # not an object at all
    return value


@st.composite
def jsonl_line(draw):
    """One line's bytes (never containing a newline): a record, or a broken one."""
    line = json.dumps(draw(record()), ensure_ascii=draw(st.booleans())).encode()
    kind = draw(st.integers(0, 9))
    if kind == 0:
        line = line[:draw(st.integers(0, max(len(line) - 1, 0)))]  # truncated
    elif kind == 1:
        position = draw(st.integers(0, len(line)))
        line = line[:position] + draw(st.sampled_from([b"\x00", b"\xff\xfe", b"\xc3", b"\x80"])) + line[position:]
    elif kind == 2:
        line = draw(st.sampled_from([b"", b"   ", b"\t"]))  # blank: not a record
    return line


def is_record_line(line: bytes) -> bool:
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True  # a line of bad bytes is a record that failed to read


@st.composite
def jsonl_file(draw):
    lines = draw(st.lists(jsonl_line(), max_size=12))
    data = b"\n".join(lines)
    if draw(st.booleans()):
        data = "\ufeff".encode() + data  # a BOM from a Windows editor
    expected = sum(is_record_line(line.removeprefix("\ufeff".encode()) if i == 0 else line)
                   for i, line in enumerate(lines))
    return data, expected


@st.composite
def csv_file(draw):
    header = draw(st.sampled_from([["prompt", "completion"], ["instruction", "output"], ["text"], ["messages"]]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    rows = draw(st.lists(st.lists(TEXT | st.sampled_from(["[1, 2", '[{"role": "user"}]']), min_size=1,
                                  max_size=len(header) + 1), max_size=8))  # ragged rows included
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue().encode("utf-8")


def prepare_file(path: Path, tokenizer, on_bad_record: str):
    return prepare([path], tokenizer, load_chat_template(tokenizer), RenderOptions(max_seq_len=256),
                   on_bad_record=on_bad_record, use_cache=False)


def assert_one_line_naming(error: Exception, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and path.name in message, message


def prepare_or_error(path: Path, tokenizer, on_bad_record: str):
    """The prepared data, or the OnepassError it stopped with (checked: one line, naming the file)."""
    try:
        return prepare_file(path, tokenizer, on_bad_record)
    except OnepassError as error:
        assert_one_line_naming(error, path)
        return error


def assert_every_record_accounted(data) -> None:
    stats = data.stats
    assert stats.conversations + sum(stats.rejected.values()) == stats.records
    assert stats.examples + sum(stats.dropped.values()) == stats.conversations  # chatml never splits
    assert len(data.rejects) == sum(stats.rejected.values())
    assert all(row["source"] and row["where"] for row in data.rejects)


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(jsonl_file(), st.sampled_from(["skip", "error"]))
def test_any_jsonl_file_prepares_or_fails_in_one_line_and_every_record_is_counted(
        tmp_path_factory, tokenizer, file, on_bad_record):
    data, expected_records = file
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(data)
    prepared = prepare_or_error(path, tokenizer, on_bad_record)
    if isinstance(prepared, OnepassError):
        if on_bad_record == "skip":
            assert expected_records == 0 or "no records" not in str(prepared)
        return
    assert prepared.stats.records == expected_records
    assert_every_record_accounted(prepared)


@SETTINGS
@given(csv_file(), st.sampled_from(["skip", "error"]))
def test_any_csv_file_prepares_or_fails_in_one_line_and_every_row_is_counted(
        tmp_path_factory, tokenizer, data, on_bad_record):
    path = tmp_path_factory.mktemp("fuzz") / "data.csv"
    path.write_bytes(data)
    prepared = prepare_or_error(path, tokenizer, on_bad_record)
    if isinstance(prepared, OnepassError):
        return
    assert prepared.stats.records == sum(1 for row in csv.reader(io.StringIO(data.decode())) if row) - 1
    assert_every_record_accounted(prepared)


@SETTINGS
@given(st.lists(record(), max_size=6) | ANY_JSON, st.sampled_from(["skip", "error"]))
def test_any_json_file_prepares_or_fails_in_one_line(tmp_path_factory, tokenizer, value, on_bad_record):
    path = tmp_path_factory.mktemp("fuzz") / "data.json"
    path.write_text(json.dumps(value))
    prepared = prepare_or_error(path, tokenizer, on_bad_record)
    if isinstance(prepared, OnepassError):
        return
    assert_every_record_accounted(prepared)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xff\xfe\x00garbage", b"\x00" * 100],
                         ids=["empty", "blank lines", "binary", "NULs"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_and_binary_files_are_one_line_errors_or_counted_skips(tmp_path, tokenizer, content, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    prepared = prepare_or_error(path, tokenizer, "skip")
    if isinstance(prepared, OnepassError):
        return
    assert prepared.stats.records == sum(prepared.stats.rejected.values()) > 0


def test_a_directory_or_a_missing_path_in_place_of_a_file_is_a_one_line_error(tmp_path, tokenizer):
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "folder", tmp_path / "missing.jsonl"):
        with pytest.raises(OnepassError) as error:
            prepare_file(path, tokenizer, "skip")
        assert_one_line_naming(error.value, path)


def test_a_10_mb_line_is_dropped_and_counted_without_tokenizing_it(tmp_path, tokenizer):
    huge = {"messages": [{"role": "user", "content": "a" * 10_000_000}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "data.jsonl"
    small = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}
    path.write_text(json.dumps(huge) + "\n" + json.dumps(small) + "\n")
    prepared = prepare_file(path, tokenizer, "error")
    assert prepared.stats.records == 2 and prepared.stats.examples == 1
    assert prepared.stats.dropped == {"longer than max_seq_len": 1}


def test_a_10_mb_csv_cell_is_read_and_dropped_as_overlong(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text(f"prompt,completion\n{'b' * 10_000_000},x\nhi,there\n")
    prepared = prepare_file(path, tokenizer, "error")
    assert prepared.stats.records == 2 and prepared.stats.dropped == {"longer than max_seq_len": 1}


def test_a_chat_template_that_refuses_a_record_skips_it_with_its_line(tmp_path, tokenizer):
    from onepass.data.chat_template import ChatTemplate

    strict = ChatTemplate("strict", "{% for m in messages %}{% if m['role'] == 'system' %}"
                                    "{{ raise_exception('no system messages') }}{% endif %}"
                                    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", ())
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]}) + "\n")
    prepared = prepare([path], tokenizer, strict, RenderOptions(), on_bad_record="skip", use_cache=False)
    assert prepared.stats.records == 2 and prepared.stats.examples == 1
    assert prepared.rejects[0]["where"] == "line 1" and "no system messages" in prepared.rejects[0]["message"]
    with pytest.raises(OnepassError, match=r"data.jsonl, line 1: .*no system messages"):
        prepare([path], tokenizer, strict, RenderOptions(), on_bad_record="error", use_cache=False)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(jsonl_file())
def test_onepass_inspect_never_shows_a_traceback(tmp_path_factory, tokenizer_dir, capsys, file):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(file[0])
    code = main(["inspect", str(path), "--tokenizer", str(tokenizer_dir), "--no-cache", "--num-examples", "1"])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1
