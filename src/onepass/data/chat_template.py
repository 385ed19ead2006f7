"""The Jinja chat template: where it comes from, and rendering message lists to text.

Rendering uses transformers' own Jinja environment (the same filters, `raise_exception`,
`tojson` and special-token variables as `tokenizer.apply_chat_template`), compiled once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from onepass.compat import JinjaRenderer, chat_control_tokens
from onepass.errors import OnepassError, TemplateRenderError

BUILTIN_TEMPLATES = ("chatml", "llama3", "gemma", "mistral", "qwen3")


def builtin_template(name: str) -> str:
    return resources.files("onepass").joinpath(f"templates/{name}.jinja").read_text()


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # where it came from, for error messages: "tokenizer", "chatml", a file path
    source: str
    # What the template sees besides messages: the special tokens (bos_token, eos_token, ...) and template
    # kwargs (enable_thinking, ...), as `apply_chat_template` passes them
    variables: tuple[tuple[str, Any], ...]
    # Texts of the tokens generation stops at (EOS, and the model's generation config's eos_token_id list):
    # where a template writes nothing after a response, the stop token that follows is its end of turn.
    stop_texts: tuple[str, ...] = ()
    tools: tuple[dict[str, Any], ...] | None = None  # the tool schemas of the conversation being rendered
    # The tokens `apply_chat_template(..., sanitize_control_tokens=True)` would encode as text in a message
    # (the special tokens, and the added tokens this template writes): counted, and sanitized on request.
    control_tokens: tuple[str, ...] = ()

    def variable(self, name: str) -> Any:
        """A special token or template kwarg the template sees (eos_token, enable_thinking, ...), or None."""
        return dict(self.variables).get(name)

    def for_conversation(self, tools: tuple[dict[str, Any], ...] | None = None,
                         kwargs: dict[str, Any] | None = None) -> ChatTemplate:
        """The template as one conversation renders it: with its tool schemas and its template kwargs
        (which override the template's own, as `apply_chat_template(..., **kwargs)` does)."""
        if not tools and not kwargs:
            return self if self.tools is None else dataclasses.replace(self, tools=None)
        variables = template_variables({**dict(self.variables), **(kwargs or {})}) if kwargs else self.variables
        return dataclasses.replace(self, variables=variables, tools=tuple(tools) if tools else None)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages` (as `compat.template_messages` normalises them), given in the
        shape it renders (see `adapt`), with this conversation's tools."""
        return _render(self.source, self.variables, self.name, self.adapt(messages), add_generation_prompt,
                       list(self.tools) if self.tools else None)

    @property
    def renders_tools(self) -> bool:
        """Whether the template shows tool schemas to the model (found once per template with a probe)."""
        return _renders_tools(self.source, self.variables)

    def adapt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages in the shape this template renders: string contents as a list of text parts for a
        template that renders only that (vision-language templates), tool-call arguments as a JSON
        string for one that fails on a dict (DeepSeek-V3). Each is found once per template by a probe."""
        if _wants_text_parts(self.source, self.variables):
            messages = [as_text_parts(message) for message in messages]
        if _wants_json_arguments(self.source, self.variables):
            messages = [with_json_arguments(message) for message in messages]
        return messages


def as_text_parts(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    return {**message, "content": [{"type": "text", "text": content}]} if isinstance(content, str) else message


def with_json_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """Tool-call arguments as a JSON string (data holds them as a dict, the Hugging Face convention), its
    text as written (like the templates' `tojson`), so that marked control tokens stay marked."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), dict):
            arguments = json.dumps(function["arguments"], ensure_ascii=False)
            call = {**call, "function": {**function, "arguments": arguments}}
        converted.append(call)
    return {**message, "tool_calls": converted}


def _render(source: str, variables: tuple[tuple[str, Any], ...], name: str, messages: list[dict[str, Any]],
            add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> str:
    try:
        return _renderer(source, variables).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   tools=tools)
    except Exception as error:  # jinja raises TemplateError, and templates raise via raise_exception
        raise TemplateRenderError(f"chat template '{name}' failed to render: {error}") from None


class JSONValue(str):
    """A template variable that is a list or an object (e.g. gpt-oss's `builtin_tools`), held as its JSON
    text so that the variables stay hashable (they key the cached renderer and probes)."""


def template_variables(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((key, JSONValue(json.dumps(value, sort_keys=True)) if isinstance(value, (list, dict))
                         else value) for key, value in values.items()))


@functools.lru_cache(maxsize=64)
def _renderer(source: str, variables: tuple[tuple[str, Any], ...]) -> JinjaRenderer:
    values = {key: json.loads(value) if isinstance(value, JSONValue) else value for key, value in variables}
    return JinjaRenderer(source, {"tools": None, "documents": None, **values})


PROBE_TOOL = {"type": "function", "function": {
    "name": "onepass_probe_function", "description": "onepass probe description",
    "parameters": {"type": "object", "properties": {"onepass_probe_argument": {"type": "string"}},
                   "required": ["onepass_probe_argument"]}}}


@functools.lru_cache(maxsize=64)
def _renders_tools(source: str, variables: tuple[tuple[str, Any], ...]) -> bool:
    probe = [{"role": "user", "content": "onepass probe question"}]
    for add_generation_prompt in (True, False):  # some templates index the last message, some need a reply
        try:
            text = _render(source, variables, "probe", probe, add_generation_prompt, [PROBE_TOOL])
        except TemplateRenderError:
            continue
        return "onepass_probe_function" in text
    return False


@functools.lru_cache(maxsize=64)
def _wants_text_parts(source: str, variables: tuple[tuple[str, str], ...]) -> bool:
    """Whether the template renders message text only when content is a list of parts (found once,
    by rendering a probe both ways)."""
    probe = "onepass probe text"

    def renders_probe(message: dict[str, Any]) -> bool:
        try:
            return probe in _render(source, variables, "probe", [message], False)
        except TemplateRenderError:
            return False

    plain = {"role": "user", "content": probe}
    return not renders_probe(plain) and renders_probe(as_text_parts(plain))


def load_chat_template(tokenizer: Any, chat_template: str | None = None,
                       kwargs: dict[str, Any] | None = None) -> ChatTemplate:
    """The template to use: `chat_template` (a built-in name or a file), else the tokenizer's own; `kwargs`:
    template variables, as `apply_chat_template(..., **kwargs)` takes them (e.g. enable_thinking)."""
    if chat_template:
        if chat_template in BUILTIN_TEMPLATES:
            name, source = chat_template, builtin_template(chat_template)
        elif Path(chat_template).is_file():
            name, source = chat_template, Path(chat_template).read_text()
        else:
            raise OnepassError(f"chat template '{chat_template}' is neither a file nor a built-in template. "
                               f"Fix: give a .jinja file or one of {', '.join(BUILTIN_TEMPLATES)}.")
    elif isinstance(getattr(tokenizer, "chat_template", None), str) and tokenizer.chat_template:
        name, source = "tokenizer", tokenizer.chat_template
    else:
        where = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise OnepassError(f"{where} has no chat template. Fix: pass --chat-template FILE.jinja, or a built-in "
                           f"one ({', '.join(BUILTIN_TEMPLATES)}), e.g. --chat-template chatml.")
    variables = {key: value for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    variables.update(kwargs or {})
    return ChatTemplate(name, source, template_variables(variables), stop_texts(tokenizer),
                        control_tokens=chat_control_tokens(tokenizer, source))


def stop_texts(tokenizer: Any) -> tuple[str, ...]:
    """EOS and the stop tokens of the model's generation_config.json (beside the tokenizer), as text."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids.update(generation_stop_ids(Path(getattr(tokenizer, "name_or_path", "") or ".") / "generation_config.json"))
    texts = (tokenizer.convert_ids_to_tokens(int(i)) for i in ids if 0 <= int(i) < len(tokenizer))
    return tuple(sorted(t for t in texts if t))


def generation_stop_ids(config_file: Path) -> list[int]:
    """The `eos_token_id` of a generation_config.json (an id or a list of ids; none when the file is
    absent), checked like every other input."""
    if not config_file.is_file():
        return []
    try:
        listed = json.loads(config_file.read_text()).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise OnepassError(f"{config_file}: not a readable JSON object ({type(error).__name__}: {error}). Fix: "
                           "repair or remove the file.") from None
    if listed is None:
        return []
    values = listed if isinstance(listed, list) else [listed]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise OnepassError(f"{config_file}, field 'eos_token_id': {json.dumps(listed)} is not a token id or a "
                           "list of token ids. Fix: give non-negative integers, e.g. [2, 32000].")
    return values


@functools.lru_cache(maxsize=64)
def _wants_json_arguments(source: str, variables: tuple[tuple[str, str], ...]) -> bool:
    """Whether the template fails on tool-call arguments given as a dict but renders them as a JSON
    string (DeepSeek-V3 concatenates them as text); found once with a probe call."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "probe", "arguments": {"x": 1}}}]}
    probe = [{"role": "user", "content": "q"}, call]
    try:
        _render(source, variables, "probe", probe, False)
        return False
    except TemplateRenderError:
        pass
    try:
        _render(source, variables, "probe", [probe[0], with_json_arguments(call)], False)
        return True
    except TemplateRenderError:
        return False
