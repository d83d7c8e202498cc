"""Progress on long work (bulk loads, sync, benchmark stages, chaos rounds).

A bar is drawn on stderr, and only when stderr is a terminal: piped or
redirected output, CI logs and ``--json`` runs (callers pass
``enabled=False``) get nothing, so what scripts read never changes.  No
dependency: one line, redrawn in place with ``\\r`` at most every
``interval`` seconds.  Bars opened inside one another share that line, the
outer one first::

    bench [##......] 2/6 cold_sync | sync 1M [#####...] 62% 620k/1.0M 310k/s ETA 0:01

Other terminal output must clear the line first: :func:`echo` and
:meth:`Progress.echo` clear it, print, and draw it again.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

BAR_CELLS = 20
_CLEAR = "\r\x1b[K"

_active: list[Progress] = []  # open, drawing bars, outermost first


def is_terminal(stream: TextIO) -> bool:
    """True if ``stream`` is an interactive terminal that progress may draw on."""
    if os.environ.get("NVO3_NO_PROGRESS") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _count(n: float) -> str:
    if n < 10_000:
        return f"{n:.0f}"
    if n < 1_000_000:
        return f"{n / 1000:.0f}k"
    return f"{n / 1_000_000:.1f}M"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """One bar: ``with Progress("load", total) as bar: ... bar.advance()``.

    ``total=None`` shows a count without a bar.  Everything is a no-op when the
    stream is not a terminal or ``enabled`` is false.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.note = ""
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and is_terminal(self.stream)
        self.interval = interval
        self._clock = clock
        self._start = clock()
        self._drawn_at: float | None = None

    # -- lifecycle

    def __enter__(self) -> Progress:
        if self.enabled:
            self._start = self._clock()
            _active.append(self)
            self._draw(force=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self not in _active:
            return
        _active.remove(self)
        rest = [bar for bar in _active if bar.stream is self.stream]
        if rest:
            rest[-1]._draw(force=True)
        else:
            self._write(_CLEAR)

    # -- updates

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str | None = None) -> None:
        if not self.enabled:
            return
        self.done = done
        if note is not None:
            self.note = note
        self._draw(force=note is not None or (self.total is not None and done >= self.total))

    def set_note(self, note: str) -> None:
        self.update(self.done, note)

    def echo(self, text: str, file: TextIO | None = None) -> None:
        """Print a line (to ``file``, default this bar's stream) without tearing the bar."""
        echo(text, file if file is not None else self.stream)

    # -- drawing

    def render(self) -> str:
        """This bar's segment of the line."""
        parts = [self.label]
        elapsed = self._clock() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(max(self.done / self.total, 0.0), 1.0)
            filled = int(frac * BAR_CELLS)
            parts.append("[" + "#" * filled + "." * (BAR_CELLS - filled) + "]")
            if self.total > 20:
                parts.append(f"{frac:4.0%} {_count(self.done)}/{_count(self.total)}")
            else:
                parts.append(f"{self.done}/{self.total}")
        elif self.done:
            parts.append(_count(self.done))
        if self.done and elapsed >= 1.0 and (self.total is None or self.total > 20):
            parts.append(f"{_count(rate)}/s")
        if self.total and self.done and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        else:
            parts.append(_duration(elapsed))
        if self.note:
            parts.append(self.note)
        return " ".join(parts)

    def _draw(self, force: bool = False) -> None:
        now = self._clock()
        if not force and self._drawn_at is not None and now - self._drawn_at < self.interval:
            return
        self._drawn_at = now
        self._write(_CLEAR + _line(self.stream))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: stop drawing
            self.enabled = False
            if self in _active:
                _active.remove(self)


def _line(stream: TextIO) -> str:
    line = " | ".join(bar.render() for bar in _active if bar.stream is stream)
    width = shutil.get_terminal_size((80, 24)).columns
    return line[: max(width - 1, 10)]


def echo(text: str, file: TextIO | None = None) -> None:
    """Print ``text`` as a line, clearing and then redrawing any open bars around it."""
    out = file if file is not None else sys.stderr
    streams = list(dict.fromkeys(bar.stream for bar in _active))
    for stream in streams:
        stream.write(_CLEAR)
        stream.flush()
    print(text, file=out, flush=True)
    for stream in streams:
        stream.write(_CLEAR + _line(stream))
        stream.flush()
