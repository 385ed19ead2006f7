"""The tokenizer's own chat template is the oracle: on every real template TRL ships, onepass's training
input is the text `tokenizer.apply_chat_template(messages, tools=..., **kwargs)` renders, with tool schemas,
tool calls (arguments as an object or a JSON string, parallel, beside words), tool replies, reasoning under
each of its names, template kwargs and a system message; or, where the template itself cannot show the
record's tools or reasoning, one clear error (and, with data.drop_tools / drop_reasoning, the render
without them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from onepass.compat import REASONING_KEYS
from onepass.data.chat_template import ChatTemplate
from onepass.data.formats import to_conversation
from onepass.data.render import render_conversation
from onepass.data.types import Record, RenderOptions
from onepass.errors import DataError, TemplateRenderError

trl = pytest.importorskip("trl")  # installed with onepass[test]
CORPUS = Path(trl.__file__).parent / "chat_templates"
TEMPLATES = sorted(p.stem for p in CORPUS.glob("*.jinja"))

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}
CONVERT = {"type": "function", "function": {
    "name": "convert", "description": "Convert an amount between currencies.",
    "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                                    "to": {"type": "string"}}, "required": ["amount", "from", "to"]}}}


def call(name: str, arguments: dict, as_json: bool = False, index: int = 0) -> dict:
    return {"id": f"call_{index}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments) if as_json else arguments}}


def agentic(reasoning_key: str = "reasoning_content", as_json: bool = False) -> dict:
    return {"tools": [WEATHER, CONVERT], "messages": [
        {"role": "system", "content": "You are a travel assistant."},
        {"role": "user", "content": "What is the weather in Paris, and 20 EUR in USD?"},
        {"role": "assistant", "content": "", reasoning_key: "I need both tools.",
         "tool_calls": [call("get_weather", {"city": "Paris"}, as_json), call("convert", {"amount": 20, "from": "EUR",
                                                                                          "to": "USD"}, as_json, 1)]},
        {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_1", "name": "convert", "content": "21.7"},
        {"role": "assistant", "content": "Sunny and 21 C; 20 EUR is 21.70 USD.", reasoning_key: "Both answered."}]}


RECORDS = {
    "reasoning_content": agentic("reasoning_content"),
    "thinking": agentic("thinking"),
    "reasoning": agentic("reasoning"),
    "json_arguments": agentic(as_json=True),
    "words_beside_a_call": {"tools": json.dumps([WEATHER]), "messages": [  # tools as a JSON string, as on the Hub
        {"role": "user", "content": "Is it warm in Oslo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "call_0", "content": "cold, 2 C"},
        {"role": "assistant", "content": "No: 2 C."}]},
    "template_kwargs": {"chat_template_kwargs": {"enable_thinking": False}, "messages": [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
}


def variables(tokenizer) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)))


def oracle(tokenizer, source: str, conversation, messages_end: int | None = None, tools=True) -> str:
    """What the tokenizer's own apply_chat_template renders for the record (its messages as onepass
    parsed them, in the shape the template renders: `ChatTemplate.adapt`)."""
    template = ChatTemplate("oracle", source, variables(tokenizer))
    messages = template.adapt([m.to_template() for m in conversation.messages[:messages_end]])
    return tokenizer.apply_chat_template(messages, tools=list(conversation.tools) if tools and conversation.tools
                                         else None,
                                         chat_template=source, tokenize=False, **(conversation.template_kwargs or {}))


def renders(source: str, record: dict, options: RenderOptions, tokenizer):
    conversation = to_conversation(Record("d.jsonl", "line 1", record), "messages")
    template = ChatTemplate("t", source, variables(tokenizer))
    return conversation, render_conversation(conversation, template, options, tokenizer.eos_token)


def without_reasoning(conversation, tokenizer, source):
    """The conversation less the reasoning the template does not show in the message's own turn (the
    turn rendered as the last message, by the tokenizer's own apply_chat_template): what
    data.drop_reasoning drops. Reasoning the template shows is kept."""
    def shown(index, message):
        reasoning = next((v for k, v in message.extra.items() if k in REASONING_KEYS), None)
        return reasoning is None or reasoning in oracle(tokenizer, source, conversation, index + 1)

    return dataclasses.replace(conversation, messages=tuple(
        m if m.role != "assistant" or shown(i, m) else
        dataclasses.replace(m, extra={k: v for k, v in m.extra.items() if k not in REASONING_KEYS})
        for i, m in enumerate(conversation.messages)))


def assert_renders_as_the_oracle(tokenizer, source: str, conversation, result, tools: bool = True) -> None:
    if result.tree or result.split:  # history rewritten: each path is a turn's inference-time render
        turns = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
        assert len(result.texts) == len(turns)
        for text, index in zip(result.texts, turns):
            assert text.text.rstrip() == oracle(tokenizer, source, conversation, index + 1, tools).rstrip()
    else:
        assert result.texts[0].text == oracle(tokenizer, source, conversation, tools=tools)


@pytest.mark.parametrize("record", sorted(RECORDS))
@pytest.mark.parametrize("name", TEMPLATES)
def test_the_training_input_is_what_the_tokenizers_own_apply_chat_template_renders(tokenizer, name, record):
    source = (CORPUS / f"{name}.jinja").read_text()
    conversation = to_conversation(Record("d.jsonl", "line 1", RECORDS[record]), "messages")
    try:
        expected = oracle(tokenizer, source, conversation)
    except Exception:  # the template itself refuses the record: so does onepass, naming it
        with pytest.raises((TemplateRenderError, DataError)):
            renders(source, RECORDS[record], RenderOptions(), tokenizer)
        return
    try:
        _, result = renders(source, RECORDS[record], RenderOptions(), tokenizer)
    except DataError as error:  # only where the template itself cannot show the record's tools or reasoning
        assert error.code == "template_cannot_render" and "line 1" in str(error), error
        if error.field == "tools":
            assert expected == oracle(tokenizer, source, conversation, tools=False)  # it ignores the schemas
        else:
            index = int(error.field.split("[")[1].split("]")[0])
            reasoning = next(v for k, v in conversation.messages[index].extra.items() if k in REASONING_KEYS)
            assert reasoning not in oracle(tokenizer, source, conversation, index + 1)
        _, result = renders(source, RECORDS[record], RenderOptions(drop_tools=True, drop_reasoning=True), tokenizer)
        if any("reasoning dropped" in note for note in result.notes):
            conversation = without_reasoning(conversation, tokenizer, source)
        tools = not any("tool schemas dropped" in note for note in result.notes)
        assert_renders_as_the_oracle(tokenizer, source, conversation, result, tools)
        return
    assert not any("dropped" in note for note in result.notes)
    assert_renders_as_the_oracle(tokenizer, source, conversation, result)


def pasted_control_tokens(tokens: tuple[str, ...]) -> dict:
    """The agentic record with the tokenizer's control tokens pasted into every kind of string a user
    supplies: system and user text, a reply, reasoning, a call's arguments, a tool reply, a schema."""
    pasted = " ".join(tokens[:4])
    record = json.loads(json.dumps(agentic()))
    record["tools"][0]["function"]["description"] += f" {pasted}"
    for message in record["messages"]:
        if message["content"]:
            message["content"] += f" {pasted}"
        if "reasoning_content" in message:
            message["reasoning_content"] += f" {pasted}"
    record["messages"][2]["tool_calls"][0]["function"]["arguments"]["city"] += pasted
    return record


def sanitized_oracle_ids(tokenizer, source: str, conversation, tools: bool) -> list[int]:
    template = ChatTemplate("oracle", source, variables(tokenizer))
    messages = template.adapt([m.to_template() for m in conversation.messages])
    out = tokenizer.apply_chat_template(messages, tools=list(conversation.tools) if tools and conversation.tools
                                        else None, chat_template=source, tokenize=True,
                                        sanitize_control_tokens=True, return_dict=False)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def without_trailing_space(tokenizer, ids: list[int]) -> list[int]:
    while ids and not tokenizer.decode(ids[-1:]).strip():
        ids = ids[:-1]
    return ids


@pytest.mark.parametrize("name", TEMPLATES)
def test_with_sanitize_control_tokens_the_token_ids_are_apply_chat_templates_with_that_option(tokenizer, name):
    """A user pasting `<|im_end|>` into any string: with data.sanitize_control_tokens, onepass's token ids
    are `apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)`'s, to the id."""
    from onepass.compat import chat_control_tokens
    from onepass.data.render import tokenize_rendered

    source = (CORPUS / f"{name}.jinja").read_text()
    tokens = chat_control_tokens(tokenizer, source)
    record = pasted_control_tokens(tokens)
    conversation = to_conversation(Record("d.jsonl", "line 1", record), "messages")
    template = ChatTemplate("t", source, variables(tokenizer), control_tokens=tokens)
    options = RenderOptions(sanitize_control_tokens=True, drop_tools=True, drop_reasoning=True)
    try:
        expected = sanitized_oracle_ids(tokenizer, source, conversation, tools=True)
    except Exception:  # the template itself refuses the record: so does onepass
        with pytest.raises((TemplateRenderError, DataError)):
            render_conversation(conversation, template, options, tokenizer.eos_token)
        return
    result = render_conversation(conversation, template, options, tokenizer.eos_token)
    if any("reasoning dropped" in note for note in result.notes):
        conversation = without_reasoning(conversation, tokenizer, source)
    tools = not any("tool schemas dropped" in note for note in result.notes)
    if not tools or any("reasoning dropped" in note for note in result.notes):
        expected = sanitized_oracle_ids(tokenizer, source, conversation, tools)
    ids, _ = tokenize_rendered(tokenizer, [result.texts[-1]])[0]  # a tree's last path is the whole conversation
    assert result.texts[-1].marked
    if result.tree or result.split:
        assert without_trailing_space(tokenizer, ids.tolist()) == without_trailing_space(tokenizer, expected)
    else:
        assert ids.tolist() == expected
