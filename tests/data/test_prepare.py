"""The data stage end to end: files → examples + an account of every record, cached."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onepass.data.chat_template import load_chat_template
from onepass.data.prepare import prepare
from onepass.errors import DataError, OnepassError
from onepass.data.types import RenderOptions

from conftest import chat, write_jsonl


def run(paths, tokenizer, **kwargs):
    options = kwargs.pop("options", RenderOptions())
    return prepare(paths, tokenizer, load_chat_template(tokenizer, "chatml"), options, **kwargs)


def test_every_format_in_one_run_is_detected_per_file(tmp_path, tokenizer):
    files = [
        write_jsonl(tmp_path / "m.jsonl", [chat("q", "a")]),
        write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                              {"from": "gpt", "value": "a"}]}]),
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a"}]),
        write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}]),
        write_jsonl(tmp_path / "t.jsonl", [{"text": "plain text"}]),
    ]
    data = run(files, tokenizer, use_cache=False)
    assert list(data.stats.formats.values()) == ["messages", "sharegpt", "prompt_completion", "alpaca", "text"]
    assert data.stats.examples == 5 and data.stats.records == 5


def test_bad_record_stops_by_default_with_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2, field 'messages\[0\].role': unknown role 'bot'"):
        run([path], tokenizer, use_cache=False)


def test_skip_counts_every_bad_record_and_writes_rejects(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n{broken\n" + json.dumps({"messages": [
        {"role": "user", "content": "only a question"}]}) + "\n" + json.dumps({"text": "other format"}) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    data = run([path], tokenizer, use_cache=False, on_bad_record="skip", rejects_file=rejects)
    assert data.stats.examples == 1
    assert data.stats.rejected == {"invalid JSON": 1, "no assistant message, so nothing would be trained": 1,
                                   "record in another format": 1}
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [row["where"] for row in rows] == ["line 2", "line 3", "line 4"]
    assert data.stats.records == 4


def test_forced_format_overrides_detection(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "t", "messages": "ignored"}])
    assert run([path], tokenizer, use_cache=False, format_name="text").stats.examples == 1


def test_empty_file_and_no_files_are_clear_errors(tmp_path, tokenizer):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(OnepassError, match="no records found"):
        run([tmp_path / "e.jsonl"], tokenizer, use_cache=False)
    with pytest.raises(OnepassError, match="no data files given"):
        run([], tokenizer)


def test_second_run_with_same_inputs_loads_the_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", "q2", "a2")] * 3)
    first = run([path], tokenizer, cache_dir=tmp_path / "c")
    second = run([path], tokenizer, cache_dir=tmp_path / "c")
    assert not first.from_cache and second.from_cache
    assert second.stats.examples == first.stats.examples == 3
    for a, b in zip(first.examples, second.examples):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.turn, b.turn)
    # memory-mapped: ranks on one machine share the pages and each reads only the rows it trains on
    assert all(isinstance(e.input_ids.base, np.memmap) or isinstance(e.input_ids, np.memmap)
               for e in second.examples)
    third = run([path], tokenizer, cache_dir=tmp_path / "c", options=RenderOptions(loss_on="last"))
    assert not third.from_cache  # a different option is a different cache entry
    path.write_text(path.read_text() + json.dumps(chat("new", "data")) + "\n")
    assert not run([path], tokenizer, cache_dir=tmp_path / "c").from_cache


def test_parallel_workers_give_the_same_examples_as_one(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("onepass.data.prepare.CHUNK_SIZE", 4)
    records = [chat(f"question {i}", f"answer {i}", "and?", f"more {i}") for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    serial = run([path], tokenizer, use_cache=False)
    parallel = run([path], tokenizer, use_cache=False, num_workers=2)
    assert [e.input_ids.tolist() for e in serial.examples] == [e.input_ids.tolist() for e in parallel.examples]
    assert [e.loss_mask.tolist() for e in serial.examples] == [e.loss_mask.tolist() for e in parallel.examples]


def test_response_openings_are_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "Of course! Paris."), chat("q", "Of course! Rome."),
                                              chat("q", "No.")])
    assert run([path], tokenizer, use_cache=False).stats.openings == {"Of course!": 2, "No.": 1}


def test_load_conversations_with_a_limit_reads_only_that_many_records(tmp_path):
    """eval_samples: N reads the first N held-out conversations, not the whole file."""
    from onepass.data.prepare import load_conversations
    from onepass.data.stats import Stats

    first = tmp_path / "a.jsonl"
    write_jsonl(first, [chat("hi", "hello"), {"messages": []}, chat("one", "two")])
    second = tmp_path / "b.jsonl"
    second.write_text(json.dumps(chat("three", "four")) + "\n" + "{not json\n")
    stats, rejects = Stats(), []
    conversations = load_conversations([first, second], None, "skip", stats, rejects, limit=3)
    assert [c.messages[0].content for c in conversations] == ["hi", "one", "three"]
    assert stats.records == 4 and stats.conversations == 3 and len(rejects) == 1  # the broken line is not read
    everything = load_conversations([first, second], None, "skip", Stats(), [])
    assert len(everything) == 3


def test_a_model_directory_that_gains_a_generation_config_gets_masks_from_its_stop_tokens(tmp_path, tokenizer):
    """GLM-style stop tokens come from generation_config.json: a cached entry made without it is not served."""
    import shutil

    from onepass.data.tokenizer import load_tokenizer

    shutil.copytree(tokenizer.name_or_path, tmp_path / "model")
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    cache = tmp_path / "cache"
    before = prepare([path], load_tokenizer(tmp_path / "model"),
                     load_chat_template(load_tokenizer(tmp_path / "model"), "chatml"), RenderOptions(), cache_dir=cache)
    stop = tokenizer.convert_tokens_to_ids("<|im_start|>")
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, stop]}))
    grown = load_tokenizer(tmp_path / "model")
    after = prepare([path], grown, load_chat_template(grown, "chatml"), RenderOptions(), cache_dir=cache)
    assert not after.from_cache and after.cache_path != before.cache_path


def test_a_change_to_the_data_stages_code_is_a_new_cache_entry(tmp_path):
    import shutil

    import onepass.data
    from onepass.data.cache import data_stage_version

    package = tmp_path / "data"
    shutil.copytree(next(iter(onepass.data.__path__)), package, ignore=shutil.ignore_patterns("__pycache__"))
    before = data_stage_version(package)
    assert data_stage_version(package) == before  # the same code, the same version
    render = package / "render.py"
    render.write_text(render.read_text() + "\n# a fix to how masks are found\n")
    data_stage_version.cache_clear()
    assert data_stage_version(package) != before


def test_the_same_files_elsewhere_hit_the_cache_and_train_a_weighted_mixture_from_their_new_place(
        tmp_path, tokenizer):
    import shutil

    from onepass.config import DataSource
    from onepass.train.mixture import Mixture

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    write_jsonl(tmp_path / "a" / "main.jsonl", [chat("q", "a"), chat("q2", "a2")])
    write_jsonl(tmp_path / "a" / "style.jsonl", [chat("q3", "a3")])
    for name in ("main.jsonl", "style.jsonl"):
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    cache = tmp_path / "cache"
    shares = []
    for name in ("a", "b"):
        paths = [str(tmp_path / name / "main.jsonl"), str(tmp_path / name / "style.jsonl")]
        data = run(paths, tokenizer, cache_dir=cache)
        assert data.from_cache == (name == "b")
        assert {e.source for e in data.examples} == set(paths)
        mixture = Mixture(data.examples, [DataSource(paths[0], 1.0), DataSource(paths[1], 3.0)])
        shares.append([(s.examples, s.per_epoch, s.trained_token_share) for s in mixture.shares()])
    assert shares[0] == shares[1]


def test_prepare_streams_chunks_through_worker_processes_into_the_cache_and_serves_them_as_arrays(
        tmp_path, tokenizer):
    """More records than two chunks, two workers: the cache entry written chunk by chunk holds exactly
    the examples of an in-memory run, in order, and its examples are views of arrays, made when used."""
    from onepass.data.cache import CachedExamples
    from onepass.data.prepare import CHUNK_SIZE

    records = [chat(f"question {i}", f"answer {i} " * (1 + i % 5), f"again {i}", f"more {i}")
               for i in range(2 * CHUNK_SIZE + 37)]
    path = write_jsonl(tmp_path / "d.jsonl", records + [{"messages": "bad"}])
    memory = run([path], tokenizer, use_cache=False, num_workers=1, on_bad_record="skip")
    cached = run([path], tokenizer, cache_dir=tmp_path / "cache", num_workers=2, on_bad_record="skip")
    assert isinstance(cached.examples, CachedExamples) and not cached.from_cache
    assert len(cached.examples) == len(memory.examples) == len(records) and cached.stats.rejected == memory.stats.rejected
    np.testing.assert_array_equal(cached.examples.lengths, [len(e) for e in memory.examples])
    for index in (0, CHUNK_SIZE, len(records) - 1):
        a, b = memory.examples[index], cached.examples[index]
        assert (a.source, a.where) == (b.source, b.where)
        for name in ("input_ids", "loss_mask", "turn", "parents"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert memory.stats.to_dict() == cached.stats.to_dict()
    again = run([path], tokenizer, cache_dir=tmp_path / "cache", on_bad_record="skip")
    assert again.from_cache and len(again.examples) == len(records)
