"""Records → conversations: each format, and every validation error names file, line and field."""

from __future__ import annotations

import pytest

from onepass.errors import DataError
from onepass.data.formats import detect_format, to_conversation
from onepass.data.types import ChatConversation, RawConversation, Record


def convert(data: dict, format_name: str | None = None):
    return to_conversation(Record("data.jsonl", "line 7", data), format_name or detect_format(data))


def test_messages_format_keeps_roles_train_flags_and_tool_calls():
    conversation = convert({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "assistant", "content": "a", "train": False}]})
    assert [m.role for m in conversation.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conversation.messages[2].tool_calls == [{"name": "f"}]
    assert conversation.messages[3].extra == {"tool_call_id": "1"}
    assert conversation.messages[4].train is False
    assert conversation.assistant_indices == [2, 4]


def test_sharegpt_roles_map_to_chat_roles():
    conversation = convert({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                                               {"from": "gpt", "value": "g"}]})
    assert [(m.role, m.content) for m in conversation.messages] == [("system", "s"), ("user", "h"),
                                                                     ("assistant", "g")]


def test_alpaca_joins_instruction_and_input():
    conversation = convert({"instruction": "Do it", "input": "with this", "output": "done"})
    assert [(m.role, m.content) for m in conversation.messages] == [("user", "Do it\n\nwith this"),
                                                                     ("assistant", "done")]


def test_prompt_completion_strings_are_raw_segments_and_lists_are_chats():
    raw = convert({"prompt": "2+2=", "completion": "4"})
    assert isinstance(raw, RawConversation) and raw.segments == (("2+2=", False), ("4", True))
    chat = convert({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant",
                                                                                  "content": "a"}]})
    assert isinstance(chat, ChatConversation) and [m.role for m in chat.messages] == ["user", "assistant"]


def test_text_format_trains_every_token():
    assert convert({"text": "hello"}).segments == (("hello", True),)


@pytest.mark.parametrize("data, field, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "empty content"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "expected a string, got int"),
    ({"messages": "hi"}, "messages", "expected a list of messages, got str"),
    ({"messages": []}, "messages", "empty message list"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object, got str"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": "yes"}]},
     "messages[1].train", "expected true or false"),
    ({"messages": [{"role": "user", "content": "q", "train": True}, {"role": "assistant", "content": "a"}]},
     "messages[0].train", "'train' is set on a user message"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from", "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]},
     "conversations[0].value", "empty content"),
    ({"instruction": "", "output": "a"}, "instruction", "empty content"),
    ({"instruction": "i", "output": None}, "output", "missing value"),
    ({"prompt": 1, "completion": "c"}, "prompt", "expected a string or a list of messages"),
    ({"text": ["a"]}, "text", "expected a string, got list"),
])
def test_bad_record_error_names_file_line_field_and_fix(data, field, message):
    with pytest.raises(DataError) as caught:
        convert(data)
    text = str(caught.value)
    assert text.startswith(f"data.jsonl, line 7, field '{field}': ")
    assert message in text
    assert "Fix: " in text


def test_content_given_as_text_parts_is_the_same_message_as_a_string():
    parts = convert({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                {"type": "text", "text": "there"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]})
    plain = convert({"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]})
    assert parts == plain


def test_an_image_part_is_a_clear_error_naming_the_part():
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.content\[1\]': a content part of type 'image_url'") \
            as error:
        convert({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                           {"type": "image_url", "image_url": {"url": "x.png"}}]},
                              {"role": "assistant", "content": "A cat."}]})
    assert error.value.code == "unsupported_part"


def test_tool_call_arguments_as_a_json_string_or_a_dict_are_the_same_call():
    def with_arguments(arguments):
        return convert({"messages": [{"role": "user", "content": "Weather?"}, {
            "role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]})

    assert with_arguments('{"city": "Paris"}') == with_arguments({"city": "Paris"})
