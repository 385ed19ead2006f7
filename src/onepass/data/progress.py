"""The progress bar of data preparation: records and tokens per second, and the time left from the
bytes of the data files read so far (on stderr, when it is a terminal; `prepare`, and `train` and
`inspect` while they prepare)."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


class PrepareProgress:
    def __init__(self, total_bytes: int, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = Progress(
            TextColumn("[bold]prepare"), BarColumn(), TextColumn("{task.fields[records]:,} records"),
            TextColumn("{task.fields[records_per_sec]:,.0f} records/s"),
            TextColumn("{task.fields[tokens_per_sec]:,.0f} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
            transient=True, disable=not self.enabled)
        self._task = self._progress.add_task("prepare", total=max(total_bytes, 1), records=0, records_per_sec=0.0,
                                             tokens_per_sec=0.0)
        self._records = self._tokens = 0

    def __enter__(self) -> PrepareProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def read(self, size: int) -> None:
        """`size` more bytes of the data files read."""
        if size:
            self._progress.advance(self._task, size)

    def rendered(self, examples: int, tokens: int) -> None:
        self._records += examples
        self._tokens += tokens
        elapsed = self._progress.tasks[0].elapsed or 1e-9
        self._progress.update(self._task, records=self._records, records_per_sec=self._records / elapsed,
                              tokens_per_sec=self._tokens / elapsed)
