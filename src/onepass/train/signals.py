"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """SIGINT or SIGTERM during training asks the loop to finish its step, save a checkpoint and
    return; the same signal again stops at once (the last complete checkpoint stays valid: they are
    written atomically). Under torchrun, Ctrl-C reaches each rank as SIGINT from the terminal and
    SIGTERM from torchrun: that is one request, not two."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signum:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
