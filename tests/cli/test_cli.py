"""`onepass inspect` / `prepare` as a user runs them: output, JSON lines, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onepass.cli.main import main

from conftest import chat, constant_model, write_jsonl


def test_inspect_prints_summary_and_coloured_examples(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "Of course! yes"), chat("q", "Of course! no")])
    assert main(["inspect", str(path), "--tokenizer", str(tokenizer_dir), "--chat-template", "chatml"]) == 0
    out = capsys.readouterr().out
    assert "onepass data summary" in out and "trained tokens" in out
    assert '100.0%  "Of course! ..."' in out
    assert "example 0" in out and "<|im_start|>assistant" in out


def test_inspect_json_gives_aligned_lists_per_example(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", "q2", "a2")])
    assert main(["inspect", str(path), "--tokenizer", str(tokenizer_dir), "--json", "--loss-on", "last"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(row["input_ids"]) == len(row["loss_mask"]) == len(row["turn"]) == len(row["parent"])
    assert row["parent"] == list(range(-1, len(row["input_ids"]) - 1))  # a sequence: each token's parent is t - 1
    assert {t for t, m in zip(row["turn"], row["loss_mask"]) if m} == {1}


def test_second_prepare_says_it_loaded_the_cache(tmp_path, tokenizer_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    main(["prepare", str(path), "--tokenizer", str(tokenizer_dir)])
    assert "written" in capsys.readouterr().out
    main(["prepare", str(path), "--tokenizer", str(tokenizer_dir)])
    assert "already cached, loaded" in capsys.readouterr().out


def test_user_error_exits_2_with_one_line_and_no_traceback(tmp_path, tokenizer_dir):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}\n')
    result = subprocess.run([sys.executable, "-m", "onepass", "inspect", str(path), "--tokenizer",
                             str(tokenizer_dir)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}, line 1, field 'messages[1].content': expected a string, got int. Fix: give a string"]


def test_score_and_chat_commands_on_a_saved_model(tmp_path, tokenizer_dir, capsys):
    import shutil

    from onepass.demo.tiny import build_model

    model_dir = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model_dir)
    build_model(model_dir, vocab_size=512)
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", "q2", "a2")])
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--check", "1"]) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["turn_logprobs"]) == 2 and "largest difference" in capsys.readouterr().err


def test_score_ranks_the_completion_a_model_is_certain_of_first(tmp_path, tokenizer, capsys):
    certain = constant_model(tmp_path / "model", tokenizer, "Paris")
    ranking = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "completions": ["no", certain, "blue sky"]}])
    assert main(["score", "--model", str(tmp_path / "model"), "--data", str(ranking)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ranking_by_sum"][0] == 1 and result["best_by_sum"] == 1 and result["best_by_mean"] == 1


def test_chat_prints_the_model_reply(tmp_path, tokenizer, capsys):
    certain = constant_model(tmp_path / "model", tokenizer, "Paris")
    assert main(["chat", "--model", str(tmp_path / "model"), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == (certain * 3).strip() + "\n"


def test_chat_with_tools_gives_the_model_their_schemas_or_refuses_a_template_that_renders_none(tmp_path, tokenizer,
                                                                                               capsys):
    constant_model(tmp_path / "model", tokenizer, "Paris")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}))
    chat = ["chat", "--model", str(tmp_path / "model"), "--prompt", "hello", "--max-new-tokens", "1", "--tools",
            str(tools)]
    assert main(chat + ["--chat-template", "chatml"]) == 0
    assert "tools: get_weather" in capsys.readouterr().err
    assert main(chat + ["--chat-template", "llama3"]) == 2
    assert "renders no tool schemas" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["lrr=1"], "error: unknown config key 'lrr'. Did you mean 'lr'?"),
    (["model=/nowhere"], "error: model directory not found: /nowhere."),
])
def test_train_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, tokenizer_dir, capsys, overrides,
                                                                 message):

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tmp_path}\ntokenizer: {tokenizer_dir}\ndata: {{train: [{data}]}}\n")
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["train", "--help"]])
def test_help_does_not_import_torch(argv):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "onepass", *argv], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "usage: onepass" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported


def test_the_console_script_points_at_a_callable_main():
    import importlib
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    module_name, function_name = project["scripts"]["onepass"].split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))


def test_inspect_json_with_skips_says_on_stderr_how_many_were_skipped_and_why(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n{broken\n" + json.dumps({"messages": [
        {"role": "bot", "content": "x"}]}) + "\n")
    assert main(["inspect", str(path), "--tokenizer", str(tokenizer_dir), "--json", "--on-bad-record", "skip"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    assert "rejected 2 (invalid JSON ×1, unknown role ×1)" in captured.err
    assert str(tmp_path / "d.rejects.jsonl") in captured.err


def test_inspect_json_prints_a_trees_parents(tmp_path, tokenizer_dir, capsys):
    data = chat("q1", "<think>r1</think>a1", "q2", "<think>r2</think>a2")
    path = write_jsonl(tmp_path / "d.jsonl", [data])
    assert main(["inspect", str(path), "--tokenizer", str(tokenizer_dir), "--json", "--chat-template", "qwen3"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    parent = row["parent"]
    assert parent[0] == -1 and all(p < i for i, p in enumerate(parent))
    assert parent != list(range(-1, len(parent) - 1))  # it branches: one tree, not a sequence


def test_check_proves_a_saved_model_exact_and_refuses_one_it_cannot_compute_with_one_line(tmp_path):
    import zoo_configs
    from onepass.demo.tiny import build_model

    build_model(tmp_path / "llama", vocab_size=128)
    result = subprocess.run([sys.executable, "-m", "onepass", "check", str(tmp_path / "llama"), "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exact"] and report["packing"] == "packed" and report["max_difference"] < 1e-4
    assert report["prefix_consistent"] and report["prefix_difference"] < 1e-4
    zoo_configs.build("modernbert-decoder").save_pretrained(tmp_path / "refused")
    result = subprocess.run([sys.executable, "-m", "onepass", "check", str(tmp_path / "refused")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "differ from the model's own forward" in line and "Fix:" in line


def test_check_says_when_a_models_own_forward_is_not_prefix_consistent(tmp_path):
    """CPM-Ant's positions depend on the sequence's length: one pass cannot give each turn's K-pass value."""
    import zoo_configs

    zoo_configs.build("cpmant").save_pretrained(tmp_path / "cpmant")
    result = subprocess.run([sys.executable, "-m", "onepass", "check", str(tmp_path / "cpmant")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("checked:")]
    assert "prefix-consistent: no: a token's log-prob depends on what follows, by up to" in line


def test_inspect_folds_a_records_tool_schemas_to_one_line_per_function(tmp_path, tokenizer_dir, capsys):
    from pathlib import Path

    trl = pytest.importorskip("trl")
    qwen25 = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    tools = Path(__file__).parents[2] / "examples" / "data" / "tools.jsonl"
    assert main(["inspect", str(tools), "--tokenizer", str(tokenizer_dir), "--chat-template", str(qwen25),
                 "--num-examples", "1", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "tokens of tool schemas, folded: 2 functions]" in out
    assert "  get_weather(city: string) - The weather in a city today." in out
    assert '"parameters"' not in out  # the schemas' JSON itself is folded away
    assert "<tool_call>" in out and "<|im_end|>" in out  # the rest of the example as before
