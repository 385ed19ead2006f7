"""Errors a user can cause and fix. The CLI prints them on one line, without a traceback."""

from __future__ import annotations


class OnepassError(Exception):
    """A problem with the user's input, config or environment (not a bug in onepass)."""


class ConfigError(OnepassError):
    """A config key has a wrong name, type or value."""


class DataError(OnepassError):
    """A record in a data file is malformed.

    The message always names where (file, line or record number, field), what was found,
    and how to fix it, so a user can go straight to the record.
    """

    def __init__(self, source: str, where: str, field: str | None, problem: str, fix: str = ""):
        self.source = source
        self.where = where
        self.field = field
        self.problem = problem
        self.fix = fix
        location = f"{source}, {where}" + (f", field '{field}'" if field else "")
        super().__init__(f"{location}: {problem}" + (f". Fix: {fix}" if fix else ""))

    def __reduce__(self) -> tuple:  # crosses process boundaries (parallel rendering workers)
        return (type(self), (self.source, self.where, self.field, self.problem, self.fix))

    def as_row(self) -> dict[str, str | None]:
        """The line written to rejects.jsonl for a skipped record."""
        return {"source": self.source, "where": self.where, "field": self.field, "reason": self.reason,
                "message": str(self)}

    @property
    def reason(self) -> str:
        """A short, stable reason used to count skipped records by kind."""
        return self.problem.split(":")[0].split(" (")[0]


class TemplateError(OnepassError):
    """The chat template renders a conversation in a way onepass cannot map back to messages."""


class TemplateRenderError(TemplateError):
    """The chat template refused one conversation (its `raise_exception`, or a Jinja error on its
    content): a problem of that record, skipped like any bad record with on_bad_record: skip."""
