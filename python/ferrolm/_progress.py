"""The one progress line of long Python-side operations (sharding, training).

On a terminal the line is redrawn in place (carriage return) a few times a second. On a file or a
pipe (a log, ``| tee``, a batch job) carriage returns would pile every update onto one "line", so
there each update is a plain line, at most every ``LOG_EVERY_S`` seconds, as the Rust core's
tokenizer-training progress does.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_EVERY_S = 0.25
LOG_EVERY_S = 10.0


class ProgressLine:
    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = TTY_EVERY_S if self.tty else LOG_EVERY_S
        self.last: float | None = None
        self.open = False  # a redrawn line is on screen without its newline

    def due(self, final: bool = False) -> bool:
        """Whether an update now would be shown (``final`` ones always are)."""
        if not self.enabled:
            return False
        return final or self.last is None or time.perf_counter() - self.last >= self.every

    def show(self, text: str, final: bool = False) -> None:
        """Show ``text`` if an update is due; ``final`` ends the line."""
        if not self.due(final):
            return
        self.last = time.perf_counter()
        if self.tty:
            # Trailing spaces blank what a longer previous line left.
            self.stream.write("\r" + text + " " * 8 + ("\n" if final else ""))
            self.open = not final
        else:
            self.stream.write(text.rstrip() + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (an evaluation result, a checkpoint), below the progress line."""
        if not self.enabled:
            return
        self.stream.write(("\r" if self.open else "") + text + (" " * 20 if self.open else "") + "\n")
        self.open = False
        self.stream.flush()

    def close(self) -> None:
        """End a line left open on a terminal."""
        if self.enabled and self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
