"""The data stage's contracts: what each step hands the next.

records → `Record` → formats → `Conversation` (a `ChatConversation` or a
`RawConversation`) → render → `RenderedText` → tokenize and mask → `Example`.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from onepass.errors import DataError

LossOn = Literal["assistant", "last", "all"]
Overlong = Literal["drop", "truncate", "error"]
UnstableHistory = Literal["tree", "error", "warn", "split"]
OnBadRecord = Literal["error", "skip"]
SystemMessage = Literal["keep", "fold"]


@dataclass(frozen=True)
class Record:
    """One record as read from a file, or the reason it could not be read."""

    source: str
    where: str  # "line 12", "record 3", "row 7": what a user searches for in the file
    data: dict[str, Any] | None
    error: DataError | None = None
    size: int = 0  # bytes of the file it took, where the reader knows (for progress bars)


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool | None = None  # per-message override of the loss_on policy (assistant messages only)
    tool_calls: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_template(self) -> dict[str, Any]:
        """The dict a Jinja chat template sees."""
        message: dict[str, Any] = {"role": self.role, "content": self.content, **self.extra}
        if self.tool_calls is not None:
            message["tool_calls"] = self.tool_calls
        return message


@dataclass(frozen=True)
class ChatConversation:
    """A record of messages, rendered with the chat template."""

    source: str
    where: str  # "line 12", "record 3", "row 7": what a user searches for in the file
    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] | None = None  # JSON schemas of the functions the model may call
    template_kwargs: dict[str, Any] | None = None  # the record's chat_template_kwargs (enable_thinking, ...)

    @property
    def assistant_indices(self) -> list[int]:
        return [i for i, message in enumerate(self.messages) if message.role == "assistant"]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(message.role for message in self.messages)

    def responses(self) -> list[str]:
        """The texts of the responses that may be trained (not explicitly switched off)."""
        return [self.messages[i].content for i in self.assistant_indices if self.messages[i].train is not False]


@dataclass(frozen=True)
class RawConversation:
    """Text without a chat template: (text, trained) pieces concatenated as they are
    (a prompt/completion pair of strings, or a plain `text`)."""

    source: str
    where: str
    segments: tuple[tuple[str, bool], ...]

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prompt", "completion") if len(self.segments) == 2 else ("text",)

    def responses(self) -> list[str]:
        return [text for text, trained in self.segments if trained]


Conversation = ChatConversation | RawConversation


@dataclass(frozen=True)
class RenderOptions:
    loss_on: LossOn = "assistant"
    train_on_eot: bool = True
    max_seq_len: int | None = None
    overlong: Overlong = "drop"
    unstable_history: UnstableHistory = "tree"
    system_message: SystemMessage = "keep"  # fold: into the first user message, for templates without a system role
    drop_tools: bool = False  # a template that renders no tool schemas: train without them (else an error)
    drop_reasoning: bool = False  # a template that shows no reasoning: train without it (else an error)
    sanitize_control_tokens: bool = False  # control tokens in message text encoded as text (see render.py)


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of one assistant turn in a rendered text; `boundary` is where the turn
    ends (after its end-of-turn text): the only places a too-long example may be cut."""

    start: int
    end: int
    turn: int
    trained: bool
    boundary: int


@dataclass(frozen=True)
class RenderedText:
    """One text to tokenize, with the character spans of its turns."""

    text: str
    spans: tuple[Span, ...]
    train_all: bool = False  # loss_on == "all": every token is trained
    add_special_tokens: bool = False  # raw text: the tokenizer adds its own BOS; templates write theirs
    cut_anywhere: bool = False  # plain text may be truncated at any token
    marked: bool = False  # holds control tokens marked to be encoded as text (sanitize_control_tokens)


@dataclass(frozen=True)
class Example:
    """One training sequence, or a tree of them. `loss_mask[t] == 1` means token t is trained; `turn[t]`
    is the index of the assistant message (0, 1, ...) that token t belongs to, or -1."""

    input_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # int8, 1 = trained
    turn: np.ndarray  # int32
    source: str = ""
    where: str = ""
    parent: np.ndarray | None = None  # int32, for a tree (see data/tree.py); None: a sequence (parent of t is t - 1)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def is_tree(self) -> bool:
        return self.parent is not None

    @property
    def parents(self) -> np.ndarray:
        """Each token's parent: the token before it on its path, -1 at the root."""
        return self.parent if self.parent is not None else np.arange(len(self.input_ids), dtype=np.int32) - 1

    @property
    def num_trained_tokens(self) -> int:
        return int(self.loss_mask.sum())


def lengths_of(examples: Sequence[Example]) -> np.ndarray:
    """Tokens per example (int64): from the arrays of a cache entry, without making its Examples."""
    lengths = getattr(examples, "lengths", None)
    return lengths if lengths is not None else np.asarray([len(e) for e in examples], dtype=np.int64)


def trained_tokens_of(examples: Sequence[Example]) -> np.ndarray:
    trained = getattr(examples, "trained", None)
    return trained if trained is not None else np.asarray([e.num_trained_tokens for e in examples], dtype=np.int64)


def has_trees(examples: Sequence[Example]) -> bool:
    trees = getattr(examples, "trees", None)
    return bool(trees.any()) if trees is not None else any(e.is_tree for e in examples)
