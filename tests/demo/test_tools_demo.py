"""`onepass demo --task tools`: a tiny model learns to call the right function with the user's words as
arguments, and to answer from the tool's reply."""

from __future__ import annotations

import json

import pytest

from onepass.demo.tools import make_tool_dialogues, parsed_call, run_tools_demo


def test_each_call_takes_its_arguments_from_the_request_and_each_answer_from_the_tools_reply():
    for dialogue in make_tool_dialogues(40, seed=3):
        request, call, reply, answer = dialogue["messages"]
        arguments = call["tool_calls"][0]["function"]["arguments"]
        assert all(str(value) in request["content"] for value in arguments.values())
        assert all(word in answer["content"] for word in reply["content"].replace(",", "").split()[:2])
        assert {t["function"]["name"] for t in dialogue["tools"]} == {"get_weather", "convert"}


def test_a_call_is_read_from_the_reply_text_or_is_none():
    assert parsed_call('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>') == {"name": "f",
                                                                                          "arguments": {"x": 1}}
    assert parsed_call("it is sunny.") is None and parsed_call("<tool_call>{oops</tool_call>") is None


def test_the_tools_demo_writes_its_model_and_report(tmp_path):
    report = run_tools_demo(tmp_path, steps=3, num_train=40, num_eval=2, progress=False)
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["after"]) == {"calls", "answers"}


@pytest.mark.slow
def test_the_tools_demo_learns_to_call_and_to_answer_from_the_reply(tmp_path):
    report = run_tools_demo(tmp_path, progress=False)
    assert report["before"]["calls"] < 0.1 and report["before"]["answers"] < 0.1
    assert report["after"]["calls"] > 0.6 and report["after"]["answers"] > 0.6
