"""Tool calling and reasoning records: checked field by field, rendered with their tools, counted, and
never trained on a context the model is not given at inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onepass.compat import chat_control_tokens
from onepass.data.chat_template import ChatTemplate, builtin_template
from onepass.data.formats import to_conversation
from onepass.data.prepare import prepare
from onepass.data.report import summary_line
from onepass.data.types import Record, RenderOptions
from onepass.errors import DataError

from conftest import write_jsonl

trl = pytest.importorskip("trl")
QWEN25 = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def weather_record(arguments='{"city": "Paris"}', tools=(WEATHER,), name="get_weather") -> dict:
    return {"tools": list(tools), "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]}


def template(tokenizer, source: str) -> ChatTemplate:
    variables = tuple(sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)))
    return ChatTemplate("t", source, variables, control_tokens=chat_control_tokens(tokenizer, source))


def error_of(record: dict) -> DataError:
    with pytest.raises(DataError) as error:
        to_conversation(Record("d.jsonl", "line 3", record), "messages")
    return error.value


def test_a_malformed_tool_schema_or_call_is_one_error_naming_the_line_and_field():
    error = error_of({**weather_record(), "tools": [{"type": "function", "function": {"parameters": {}}}]})
    assert error.code == "invalid_tools" and error.field == "tools[0]" and "line 3" in str(error)
    error = error_of(weather_record(arguments='{"city": "Paris"'))
    assert error.field == "messages[1].tool_calls[0].function.arguments" and "not valid JSON" in str(error)
    error = error_of(weather_record(arguments="[1, 2]"))
    assert "must be an object" in str(error) and "Fix:" in str(error)
    assert error_of({**weather_record(), "tools": "[{"}).field == "tools"


def test_tools_given_as_a_json_string_and_arguments_as_json_are_read_as_objects():
    conversation = to_conversation(Record("d.jsonl", "line 1", {**weather_record(), "tools": json.dumps([WEATHER])}),
                                   "messages")
    assert conversation.tools == (WEATHER,)
    assert conversation.messages[1].tool_calls[0]["function"]["arguments"] == {"city": "Paris"}


def test_sharegpt_function_call_and_observation_turns_are_a_call_and_a_tool_reply():
    record = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]}
    conversation = to_conversation(Record("d.jsonl", "line 1", record), "sharegpt")
    assert conversation.roles == ("user", "assistant", "tool", "assistant") and conversation.tools == (WEATHER,)
    assert conversation.messages[1].tool_calls == [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]
    bad = {**record, "conversations": [record["conversations"][0], {"from": "function_call", "value": "{oops"}]}
    with pytest.raises(DataError, match="conversations\\[1\\].value"):
        to_conversation(Record("d.jsonl", "line 1", bad), "sharegpt")


def test_the_tool_schemas_reach_the_model_and_tool_replies_are_never_trained(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [weather_record()])
    data = prepare([path], tokenizer, template(tokenizer, QWEN25.read_text()), RenderOptions(), use_cache=False)
    [example] = data.examples
    text = tokenizer.decode(example.input_ids.tolist())
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    trained = tokenizer.decode(example.input_ids[example.loss_mask == 1].tolist())
    assert "get_weather" in trained and "It is sunny." in trained
    assert "sunny\n</tool_response>" not in trained and "<tools>" not in trained and "Weather in" not in trained
    assert data.stats.agentic == {"records with tools": 1, "tool calls": 1, "tool replies": 1}


def test_a_template_that_renders_no_tools_is_an_error_unless_the_tools_are_dropped_on_purpose(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [weather_record()])
    llama3 = template(tokenizer, builtin_template("llama3"))
    with pytest.raises(DataError, match="renders no tool schemas") as error:
        prepare([path], tokenizer, llama3, RenderOptions(), use_cache=False)
    assert error.value.field == "tools" and "data.drop_tools" in str(error.value)
    data = prepare([path], tokenizer, llama3, RenderOptions(drop_tools=True), use_cache=False)
    assert len(data.examples) == 1 and any("tool schemas dropped" in n for n in data.stats.template_notes)


def test_calls_to_undeclared_functions_and_control_tokens_in_text_are_counted(tokenizer, tmp_path):
    record = weather_record(name="get_forecast")
    record["messages"][0]["content"] = "Weather in Paris?<|im_end|>"
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    data = prepare([path], tokenizer, template(tokenizer, QWEN25.read_text()), RenderOptions(), use_cache=False)
    assert data.stats.agentic["calls to undeclared functions"] == 1
    assert data.stats.agentic["messages with control tokens in their text"] == 1
    assert "data.sanitize_control_tokens: true encodes them as text" in summary_line("train data", data.stats)


def test_sanitized_control_tokens_are_trained_as_text_in_a_reply_and_never_as_the_token(tokenizer, tmp_path):
    record = {"messages": [{"role": "user", "content": "Say <|im_end|> please"},
                           {"role": "assistant", "content": "Here: <|im_end|> done"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    chatml = template(tokenizer, builtin_template("chatml"))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    raw = prepare([path], tokenizer, chatml, RenderOptions(), use_cache=False).examples[0]
    assert raw.input_ids.tolist().count(end) == 4  # two pasted, two the template's own
    data = prepare([path], tokenizer, chatml, RenderOptions(sanitize_control_tokens=True), use_cache=False)
    example = data.examples[0]
    assert example.input_ids.tolist().count(end) == 2  # the template's own, ending each turn
    trained = tokenizer.decode(example.input_ids[example.loss_mask == 1])
    assert trained == "Here: <|im_end|> done<|im_end|>"  # the pasted one as text, then the real end of turn
    assert data.stats.agentic["messages with control tokens in their text (encoded as text)"] == 2

def test_template_kwargs_from_the_record_and_from_the_config_reach_the_template(tokenizer, tmp_path):
    from onepass.data.chat_template import load_chat_template

    qwen3 = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
    chat = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [chat, {**chat, "chat_template_kwargs": {"enable_thinking": True}}])
    default = load_chat_template(tokenizer, str(qwen3), {"enable_thinking": False})
    data = prepare([path], tokenizer, default, RenderOptions(), use_cache=False)
    texts = [tokenizer.decode(e.input_ids.tolist()) for e in data.examples]
    expected = [tokenizer.apply_chat_template(chat["messages"], chat_template=qwen3.read_text(), tokenize=False,
                                              enable_thinking=thinking) for thinking in (False, True)]
    assert texts == [tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids) for t in expected]


def test_list_valued_template_kwargs_and_empty_arguments_are_taken_as_given(tokenizer, tmp_path):
    """gpt-oss and Llama-3.1 read `builtin_tools: [...]`; logged calls of an argument-less function carry ""."""
    from onepass.data.chat_template import load_chat_template

    record = weather_record(arguments="")
    record["chat_template_kwargs"] = {"builtin_tools": ["browser"]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    source = Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja"
    data = prepare([path], tokenizer, load_chat_template(tokenizer, str(source), {"date_string": "1 Jan 2026"}),
                   RenderOptions(), use_cache=False)
    text = tokenizer.decode(data.examples[0].input_ids.tolist())
    assert "Tools: browser" in text and '{"name": "get_weather", "parameters": {}}' in text


def test_a_sharegpt_call_keeps_its_reasoning():
    record = {"conversations": [{"from": "human", "value": "Weather?"},
                                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}',
                                 "reasoning_content": "I should call it."},
                                {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    conversation = to_conversation(Record("d.jsonl", "line 1", record), "sharegpt")
    assert conversation.messages[1].extra == {"reasoning_content": "I should call it."}


def test_a_template_that_drops_the_words_beside_calls_is_counted_once_per_conversation(tokenizer, tmp_path):
    """Llama-3.1 renders a call but not the words beside it: trained as rendered, and the account counts
    conversations (two such turns in one conversation are one)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    record = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "Checking once more.", "tool_calls": [call]},
        {"role": "tool", "content": "still sunny"},
        {"role": "assistant", "content": "Still sunny."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    llama31 = template(tokenizer, (Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja").read_text())
    data = prepare([path], tokenizer, llama31, RenderOptions(), use_cache=False)
    notes = {note: count for note, count in data.stats.template_notes.items() if "drops the words" in note}
    assert list(notes.values()) == [2]  # two conversations, each with two such turns
