"""Raw records → `Conversation`s, one per record, validated field by field.

Supported formats (detected per file from the keys of its records, or forced with `--format`):
- `messages`: OpenAI style, roles system/user/assistant/tool, optional `tool_calls`, optional
  per-message `train: true|false`.
- `prompt_completion`: `prompt` + `completion`, both strings (raw text, no chat template) or both
  message lists (rendered with the chat template).
- `sharegpt`: `conversations` of {from, value} with from in system/human/gpt/tool.
- `alpaca`: `instruction`, optional `input`, `output` (optional `system`).
- `text`: plain `text`, trained on every token.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from onepass.data.types import ChatConversation, Conversation, Message, RawConversation, Record
from onepass.errors import DataError, ReasonCode

FormatName = Literal["messages", "prompt_completion", "sharegpt", "alpaca", "text"]
FORMATS: tuple[str, ...] = ("messages", "prompt_completion", "sharegpt", "alpaca", "text")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's tool dialect (LLaMA-Factory, glaive): a `function_call` turn holds the call as JSON, an
# `observation` turn the tool's reply
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "tool": "tool",
                  "function_call": "assistant", "observation": "tool"}
# Message keys handed to the chat template as they are (besides role/content); the reasoning names are
# aliased to one another as transformers does (compat.template_messages).
PASSTHROUGH_KEYS = ("name", "tool_call_id", "reasoning_content", "thinking", "reasoning")


def detect_format(data: dict[str, Any]) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "text" in data:
        return "text"
    return None


def expected_keys(format_name: str) -> str:
    return {
        "messages": "'messages'",
        "sharegpt": "'conversations'",
        "prompt_completion": "'prompt' and 'completion'",
        "alpaca": "'instruction' and 'output'",
        "text": "'text'",
    }[format_name]


def to_conversation(record: Record, format_name: str) -> Conversation:
    """Validate one record in the given format; raises `DataError` naming the field."""
    assert record.data is not None  # records with read errors never reach here (our bug if they do)
    parse = {"messages": _from_messages, "sharegpt": _from_sharegpt, "prompt_completion": _from_prompt_completion,
             "alpaca": _from_alpaca, "text": _from_text}[format_name]
    return parse(record)


class _Check:
    """Raises `DataError`s that all point at the same record."""

    def __init__(self, record: Record):
        self.record = record

    def fail(self, field_name: str | None, problem: str, fix: str, code: ReasonCode) -> DataError:
        return DataError(self.record.source, self.record.where, field_name, problem, fix, code=code)

    def string(self, value: Any, field_name: str, *, allow_empty: bool = False) -> str:
        if value is None:
            raise self.fail(field_name, "missing value", "give a non-empty string", "missing_value")
        if not isinstance(value, str):
            raise self.fail(field_name, f"expected a string, got {type(value).__name__}", "give a string",
                            "wrong_type")
        if not allow_empty and not value.strip():
            raise self.fail(field_name, "empty content", "remove the message or give it text", "empty_content")
        return value

    def content(self, value: Any, field_name: str, *, allow_empty: bool = False) -> str:
        """A message's text: a string, or OpenAI-style parts [{"type": "text", "text": ...}, ...] joined."""
        if isinstance(value, list):
            texts = []
            for index, part in enumerate(value):
                where = f"{field_name}[{index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "image_url", "input_image", "audio", "input_audio", "video"):
                    raise self.fail(where, f"a content part of type {kind!r}: only text is supported so far",
                                    "remove the record, or train it with text parts only", "unsupported_part")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise self.fail(where, "expected a text part", 'write parts as {"type": "text", "text": "..."}',
                                    "wrong_type")
                texts.append(part["text"])
            value = "".join(texts)
        return self.string(value, field_name, allow_empty=allow_empty)

    def message_list(self, value: Any, field_name: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field_name, f"expected a list of messages, got {type(value).__name__}",
                            'give a list like [{"role": "user", "content": "..."}, ...]', "wrong_type")
        if not value:
            raise self.fail(field_name, "empty message list", "give at least one user and one assistant message",
                            "empty_message_list")
        return value


@dataclass(frozen=True)
class Dialect:
    """How a format writes a message: its key names and role names (mapped to ours)."""

    role_key: str
    content_key: str
    roles: dict[str, str]
    example: str


OPENAI = Dialect("role", "content", {role: role for role in ROLES}, '{"role": "user", "content": "..."}')
SHAREGPT = Dialect("from", "value", SHAREGPT_ROLES, '{"from": "human", "value": "..."}')


def _parse_messages(check: _Check, items: list[Any], field_name: str, dialect: Dialect = OPENAI) -> list[Message]:
    return [_parse_message(check, item, f"{field_name}[{index}]", dialect) for index, item in enumerate(items)]


def _parse_message(check: _Check, item: Any, where: str, dialect: Dialect) -> Message:
    if not isinstance(item, dict):
        raise check.fail(where, f"expected an object, got {type(item).__name__}",
                         f"write each message as {dialect.example}", "wrong_type")
    spoken = item.get(dialect.role_key)
    if not isinstance(spoken, str) or spoken not in dialect.roles:
        raise check.fail(f"{where}.{dialect.role_key}", f"unknown role {spoken!r}",
                         f"use one of {', '.join(dialect.roles)}", "unknown_role")
    role = dialect.roles[spoken]
    tool_calls = item.get("tool_calls")
    extra = {key: item[key] for key in PASSTHROUGH_KEYS if item.get(key) is not None} if len(item) > 2 else {}
    if spoken == "function_call" and dialect is SHAREGPT:  # the call, as JSON, in the value
        tool_calls = _sharegpt_calls(check, item.get(dialect.content_key), f"{where}.{dialect.content_key}")
        item = {key: value for key, value in item.items() if key != dialect.content_key}
    if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
        raise check.fail(f"{where}.tool_calls", "tool_calls must be a list on an assistant message",
                         "move tool calls to an assistant message as a list", "misplaced_tool_calls")
    content = item.get(dialect.content_key)
    if content is None and tool_calls:
        content = ""
    content = check.content(content, f"{where}.{dialect.content_key}", allow_empty=bool(tool_calls))
    train = item.get("train")
    if train is not None:
        if not isinstance(train, bool):
            raise check.fail(f"{where}.train", f"expected true or false, got {train!r}", "use true or false",
                             "invalid_train_flag")
        if role != "assistant":
            raise check.fail(f"{where}.train", f"'train' is set on a {role} message",
                             "only assistant messages can be trained; remove the key", "invalid_train_flag")
    return Message(role, content, train, _arguments_as_dicts(check, tool_calls, f"{where}.tool_calls"), extra)


def _arguments_as_dicts(check: _Check, tool_calls: list[Any] | None, where: str) -> list[Any] | None:
    """Each call checked (a function name, arguments as an object), its arguments given as a JSON string
    turned into the dict templates expect (the Hugging Face convention); a template that wants a string
    gets it back (`chat_template.with_json_arguments`)."""
    if not tool_calls:
        return tool_calls
    converted = []
    for index, call in enumerate(tool_calls):
        here = f"{where}[{index}]"
        wrapped = isinstance(call, dict) and isinstance(call.get("function"), dict)
        function = call["function"] if wrapped else call
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise check.fail(f"{here}.function.name" if wrapped else here, "a tool call without a function name",
                             'write calls as {"type": "function", "function": {"name": "...", "arguments": {...}}}',
                             "invalid_tools")
        arguments = function.get("arguments")
        if isinstance(arguments, str) and not arguments.strip():  # logged calls of argument-less functions
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise check.fail(f"{here}{'.function' if wrapped else ''}.arguments",
                                 f"arguments are not valid JSON ({error.msg} at character {error.pos})",
                                 "give the arguments as an object, or as a JSON string of one",
                                 "invalid_tools") from None
        if arguments is not None and not isinstance(arguments, dict):
            raise check.fail(f"{here}{'.function' if wrapped else ''}.arguments",
                             f"arguments must be an object, got {type(arguments).__name__}",
                             'give the arguments as an object, e.g. {"city": "Paris"}', "invalid_tools")
        if arguments is not None:
            function = {**function, "arguments": arguments}
        converted.append({**call, "function": function} if wrapped else function)
    return converted


def _sharegpt_calls(check: _Check, value: Any, where: str) -> list[dict[str, Any]]:
    """A `function_call` turn's value: {"name": ..., "arguments": ...} (or a list of them), as JSON."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise check.fail(where, f"the function call is not valid JSON ({error.msg} at character {error.pos})",
                         'write it as {"name": "...", "arguments": {...}}', "invalid_tools") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(call, dict) for call in calls):
        raise check.fail(where, "expected a function call object", 'write it as {"name": "...", "arguments": {...}}',
                         "invalid_tools")
    return [{"type": "function", "function": call} for call in calls]


def _tools(check: _Check) -> tuple[dict[str, Any], ...] | None:
    """The record's `tools`: JSON schemas of the functions the model may call, as a list or a JSON string
    of one (as many Hub datasets store them)."""
    tools = check.record.data.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise check.fail("tools", f"not valid JSON ({error.msg} at character {error.pos})",
                             "give a list of JSON schemas, or a JSON string of one", "invalid_tools") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise check.fail("tools", f"expected a list of JSON schemas, got {type(tools).__name__}",
                         'give [{"type": "function", "function": {"name": ..., "parameters": {...}}}, ...]',
                         "invalid_tools")
    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise check.fail(f"tools[{index}]", "a tool schema without a function name",
                             'write each as {"type": "function", "function": {"name": "...", "parameters": {...}}}',
                             "invalid_tools")
    return tuple(tools) or None


def read_tools(record: Record) -> tuple[dict[str, Any], ...] | None:
    """The `tools` of a record, checked (a list of JSON schemas, or a JSON string of one)."""
    return _tools(_Check(record))


def _template_kwargs(check: _Check) -> dict[str, Any] | None:
    kwargs = check.record.data.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError:
            pass
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise check.fail("chat_template_kwargs", f"expected an object, got {type(kwargs).__name__}",
                         'give e.g. {"enable_thinking": false}', "wrong_type")
    return kwargs or None


def _chat(check: _Check, messages: list[Message], field_name: str) -> ChatConversation:
    if not any(message.role == "assistant" for message in messages):
        raise check.fail(field_name, "no assistant message, so nothing would be trained",
                         "add an assistant reply, or use the 'text' format to train on every token", "no_assistant")
    return ChatConversation(check.record.source, check.record.where, tuple(messages), _tools(check),
                            _template_kwargs(check))


def _from_messages(record: Record) -> Conversation:
    check = _Check(record)
    items = check.message_list(record.data.get("messages"), "messages")
    return _chat(check, _parse_messages(check, items, "messages"), "messages")


def _from_sharegpt(record: Record) -> Conversation:
    check = _Check(record)
    items = check.message_list(record.data.get("conversations"), "conversations")
    return _chat(check, _parse_messages(check, items, "conversations", SHAREGPT), "conversations")


def _from_prompt_completion(record: Record) -> Conversation:
    check = _Check(record)
    prompt, completion = record.data.get("prompt"), record.data.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        check.string(prompt, "prompt", allow_empty=True)
        check.string(completion, "completion")
        return RawConversation(record.source, record.where, ((prompt, False), (completion, True)))
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt_messages = _parse_messages(check, check.message_list(prompt, "prompt"), "prompt")
        completion_messages = _parse_messages(check, check.message_list(completion, "completion"), "completion")
        if any(message.role == "assistant" and message.train is None for message in prompt_messages):
            # Assistant turns inside the prompt are context, not targets.
            prompt_messages = [dataclasses.replace(m, train=False) if m.role == "assistant" and m.train is None
                               else m for m in prompt_messages]
        return _chat(check, prompt_messages + completion_messages, "completion")
    bad = "prompt" if not isinstance(prompt, (str, list)) else "completion"
    value = record.data.get(bad)
    raise check.fail(bad, f"expected a string or a list of messages, got {type(value).__name__}",
                     "give prompt and completion both as strings or both as message lists", "wrong_type")


def _from_alpaca(record: Record) -> Conversation:
    check = _Check(record)
    instruction = check.string(record.data.get("instruction"), "instruction")
    extra_input = record.data.get("input") or ""
    check.string(extra_input, "input", allow_empty=True)
    output = check.string(record.data.get("output"), "output")
    messages = []
    if record.data.get("system"):
        messages.append(Message("system", check.string(record.data["system"], "system")))
    user = instruction if not extra_input.strip() else f"{instruction}\n\n{extra_input}"
    messages += [Message("user", user), Message("assistant", output)]
    return ChatConversation(record.source, record.where, tuple(messages))


def _from_text(record: Record) -> Conversation:
    check = _Check(record)
    text = check.string(record.data.get("text"), "text")
    return RawConversation(record.source, record.where, ((text, True),))
