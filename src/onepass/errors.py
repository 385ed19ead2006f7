"""Errors a user can cause and fix. The CLI prints them on one line, without a traceback."""

from __future__ import annotations

from typing import Literal


class OnepassError(Exception):
    """A problem with the user's input, config or environment (not a bug in onepass)."""


class ConfigError(OnepassError):
    """A config key has a wrong name, type or value."""


# Why a record was rejected: a stable code (kept in rejects.jsonl) and the label skipped records are
# counted under. Messages can be reworded freely; counts and codes stay as they are.
REASONS: dict[str, str] = {
    "invalid_utf8": "invalid UTF-8 bytes",
    "nul_byte": "NUL byte",
    "invalid_json": "invalid JSON",
    "not_an_object": "record is not a JSON object",
    "ragged_row": "row has the wrong number of fields",
    "invalid_json_cell": "invalid JSON in CSV cell",
    "missing_value": "missing value",
    "wrong_type": "wrong type",
    "empty_content": "empty content",
    "empty_message_list": "empty message list",
    "unknown_role": "unknown role",
    "misplaced_tool_calls": "tool_calls not on an assistant message",
    "invalid_train_flag": "invalid train flag",
    "no_assistant": "no assistant message, so nothing would be trained",
    "unrecognised_record": "unrecognised record",
    "other_format": "record in another format",
    "template_refused": "chat template refused the record",
    "unsupported_part": "image, audio or video content",
    "invalid_tools": "malformed tool schema or tool call",
    "template_cannot_render": "chat template cannot show the record's tools or reasoning",
}
ReasonCode = Literal["invalid_utf8", "nul_byte", "invalid_json", "not_an_object", "ragged_row", "invalid_json_cell",
                     "missing_value", "wrong_type", "empty_content", "empty_message_list", "unknown_role",
                     "misplaced_tool_calls", "invalid_train_flag", "no_assistant", "unrecognised_record",
                     "other_format", "template_refused", "unsupported_part", "invalid_tools",
                     "template_cannot_render"]


class DataError(OnepassError):
    """A record in a data file is malformed.

    The message always names where (file, line or record number, field), what was found,
    and how to fix it, so a user can go straight to the record. `code` says why, stably.
    """

    def __init__(self, source: str, where: str, field: str | None, problem: str, fix: str = "", *,
                 code: ReasonCode):
        if code not in REASONS:
            raise ValueError(f"unknown reason code {code!r}")  # our bug
        self.source = source
        self.where = where
        self.field = field
        self.problem = problem
        self.fix = fix
        self.code = code
        location = f"{source}, {where}" + (f", field '{field}'" if field else "")
        super().__init__(f"{location}: {problem}" + (f". Fix: {fix}" if fix else ""))

    def __reduce__(self) -> tuple:  # crosses process boundaries (parallel rendering workers)
        return (_rebuild_data_error, (self.source, self.where, self.field, self.problem, self.fix, self.code))

    @property
    def reason(self) -> str:
        """The label skipped records are counted under."""
        return REASONS[self.code]

    def as_row(self) -> dict[str, str | None]:
        """The line written to rejects.jsonl for a skipped record."""
        return {"source": self.source, "where": self.where, "field": self.field, "code": self.code,
                "reason": self.reason, "message": str(self)}


def _rebuild_data_error(source: str, where: str, field: str | None, problem: str, fix: str, code: ReasonCode
                        ) -> DataError:
    return DataError(source, where, field, problem, fix, code=code)


class TemplateError(OnepassError):
    """The chat template renders a conversation in a way onepass cannot map back to messages."""


class TemplateRenderError(TemplateError):
    """The chat template refused one conversation (its `raise_exception`, or a Jinja error on its
    content): a problem of that record, skipped like any bad record with on_bad_record: skip."""
