"""The listen loop's status on stderr: state (listening / thinking / answering) and a live input level meter.

On a terminal, one line is redrawn in place (at most every `METER_INTERVAL_S`) and cleared before the answer
streams to stdout, so stdout carries only answers. When stderr is not a terminal (a log, a test), no meter is drawn
and each state change is one plain line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["StatusLine"]

METER_INTERVAL_S = 0.1
METER_WIDTH = 24
FLOOR_DB = -60.0


class StatusLine:
    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.quiet = quiet
        self.state = ""
        self._detail = ""
        self._drawn = False
        self._last_draw = 0.0

    def set_state(self, state: str, detail: str = "") -> None:
        if self.quiet or (state == self.state and detail == self._detail):
            return
        self.state, self._detail = state, detail
        if self.live:
            self._draw(None)
        else:
            self.stream.write(f"[{state}]{' ' + detail if detail else ''}\n")
            self.stream.flush()

    def answering(self) -> None:
        """The answer is about to stream to stdout: on a terminal, only clear the line (stdout and stderr share
        it); otherwise log the state change."""
        if self.live:
            self.state, self._detail = "answering", ""
            self.clear()
        else:
            self.set_state("answering")

    def level(self, dbfs: float) -> None:
        """The input level of the latest frame; redrawn on a terminal, ignored otherwise."""
        if self.quiet or not self.live:
            return
        now = time.monotonic()
        if now - self._last_draw >= METER_INTERVAL_S:
            self._draw(dbfs)

    def _draw(self, dbfs: float | None) -> None:
        text = f"[{self.state}]"
        if dbfs is not None:
            filled = int(round(max(0.0, min(1.0, (dbfs - FLOOR_DB) / -FLOOR_DB)) * METER_WIDTH))
            text += f" |{'#' * filled}{'.' * (METER_WIDTH - filled)}| {dbfs:5.0f} dBFS"
        if self._detail:
            text += f" {self._detail}"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True
        self._last_draw = time.monotonic()

    def clear(self) -> None:
        """Erase the status line (before the answer or a message is printed)."""
        if self.live and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def message(self, text: str) -> None:
        """A line that stays (latency report, warnings)."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
