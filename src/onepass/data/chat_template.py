"""The Jinja chat template: where it comes from, and rendering message lists to text.

Rendering uses transformers' own Jinja environment (the same filters, `raise_exception`,
`tojson` and special-token variables as `tokenizer.apply_chat_template`), compiled once.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from onepass.compat import compile_jinja_template
from onepass.errors import OnepassError, TemplateRenderError

BUILTIN_TEMPLATES = ("chatml", "llama3", "gemma", "mistral", "qwen3")


def builtin_template(name: str) -> str:
    return resources.files("onepass").joinpath(f"templates/{name}.jinja").read_text()


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # where it came from, for error messages: "tokenizer", "chatml", a file path
    source: str
    variables: tuple[tuple[str, str], ...]  # special tokens visible to the template (bos_token, eos_token, ...)

    def variable(self, name: str) -> str | None:
        """A special token the template sees (eos_token, bos_token, ...), or None."""
        return dict(self.variables).get(name)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        template = compile_jinja_template(self.source)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **dict(self.variables))
        except Exception as error:  # jinja raises TemplateError, and templates raise via raise_exception
            raise TemplateRenderError(f"chat template '{self.name}' failed to render: {error}") from None


def load_chat_template(tokenizer: Any, chat_template: str | None = None) -> ChatTemplate:
    """The template to use: `chat_template` (a built-in name or a file), else the tokenizer's own."""
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
    return ChatTemplate(name, source, tuple(sorted(variables.items())))
