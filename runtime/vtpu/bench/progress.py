"""Progress for `vtpu bench` on stderr: a redrawn bar on a terminal, one line per workload else.

A log file or a CI console cannot take carriage returns, so without a TTY (and without
`--progress`) each finished workload prints one plain line instead of a bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_BAR_WIDTH = 24
_REDRAW_SECONDS = 0.1  # a bar redrawn on every tick would cost more than a tiny workload


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def summary_line(result: dict) -> str:
    """One line about a finished workload: its time, its ratio, and whether it was right."""
    if result.get("error"):
        return f"ERROR: {result['error']}"
    parts = []
    seconds = result.get("seconds")
    if seconds is not None:
        parts.append(f"{seconds * 1e3:.3g} ms")
    if result.get("speedup") is not None:
        parts.append(f"{result['speedup']:.2f}x vs {result.get('baseline')}")
    extras = result.get("extras") or {}
    for key, unit in (("ns_per_lookup", "ns/lookup"), ("ns_per_siw", "ns/SIW")):
        if extras.get(key) is not None:
            parts.append(f"{extras[key]:.3g} {unit}")
    correct = result.get("correct")
    parts.append("correct" if correct else "not checked" if correct is None else "INCORRECT")
    return ", ".join(parts)


class ProgressBar:
    """The `progress` callback of run_suite: workload i of n, its name, a bar, elapsed time."""

    def __init__(self, stream: TextIO | None = None, *, force: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.live = force or bool(isatty())
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._width = 0

    def __call__(
        self, index: int, total: int, name: str, fraction: float, result: dict | None = None
    ) -> None:
        """index is 1-based; fraction of this workload done in [0, 1]; result once it finished."""
        elapsed = time.monotonic() - self.started
        head = f"[{index:>{len(str(total))}}/{total}] {name}"
        if result is not None:
            line = f"{head}: {summary_line(result)} ({_clock(elapsed)})"
            if self.live:
                self._draw(line, final=True)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
            return
        if not self.live:
            return
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_draw < _REDRAW_SECONDS and fraction > 0.0:
            return
        self._last_draw = now
        filled = round(_BAR_WIDTH * min(max(fraction, 0.0), 1.0))
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        self._draw(f"{head:<34} [{bar}] {fraction * 100:3.0f}%  {_clock(elapsed)}", final=False)

    def _draw(self, line: str, *, final: bool) -> None:
        # Pad with spaces so a shorter line fully covers the previous one.
        padded = line.ljust(self._width)
        self._width = 0 if final else len(line)
        self.stream.write("\r" + padded + ("\n" if final else ""))
        self.stream.flush()
