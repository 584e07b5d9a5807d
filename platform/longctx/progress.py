"""Progress lines: each printed once, with counts, rate, elapsed time and an ETA.

    from longctx.progress import Progress, emit
    bar = Progress("eval", total=120, unit="prompts")
    for i in ...:
        bar.update(i + 1)          # prints a line at most every `every_s` seconds, and at the end
    emit("[train] step 3/20 | ...")  # one line, once

`emit` writes straight to the process's stdout instead of calling `print`: inside Ray Train workers Ray patches
`print` to go through the root logger, and a step line printed that way shows up twice in `ray job logs`
(once from the logger's console handler, once from the worker's captured stdout).
"""

from __future__ import annotations

import os
import sys
import time


def emit(line: str) -> None:
    """Print one progress line, once (bypasses Ray Train's patched `print`)."""
    stream = sys.stdout if sys.stdout is not None else sys.__stdout__
    if stream is None:
        return
    stream.write(line + "\n")
    stream.flush()


def format_duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `1h02m`; `?` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta_seconds(done: float, total: float | None, elapsed: float) -> float | None:
    """Remaining time at the mean rate so far (None before the first unit or without a total)."""
    if not total or done <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0) * elapsed / done


def interactive() -> bool:
    """A terminal is attached (Ray Data's own progress bars are useful then); else periodic lines."""
    try:
        return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts of `total` with rate, elapsed and ETA; a line at most every `every_s` seconds and at the end.

    `every_s` defaults to LONGCTX_PROGRESS_EVERY_S (10 s)."""

    def __init__(self, what: str, total: int | None = None, unit: str = "items", every_s: float | None = None,
                 prefix: str = "[longctx]"):
        self.what, self.total, self.unit, self.prefix = what, total, unit, prefix
        self.every_s = float(os.environ.get("LONGCTX_PROGRESS_EVERY_S", 10.0)) if every_s is None else every_s
        self.t0 = time.perf_counter()
        self._last = -float("inf")
        self._finished = False
        self._first: tuple[float, int] | None = None  # (time, count) at the first unit
        self.done = 0
        self.lines: list[str] = []  # what was printed (tests, reports)
        self.note = ""  # extra counts shown after the main one (e.g. documents and tokens)

    def line(self, done: int | None = None) -> str:
        done = self.done if done is None else done
        elapsed = time.perf_counter() - self.t0
        count = f"{done:,}/{self.total:,}" if self.total else f"{done:,}"
        if done and self._first is None:
            self._first = (time.perf_counter(), done)
        rate = done / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:,.1f} {self.unit}/s" if rate >= 1 or not done else f"{60 * rate:,.1f} {self.unit}/min"
        parts = [f"{self.prefix} {self.what}: {count} {self.unit}"] + ([self.note] if self.note else []) + \
            [speed, f"elapsed {format_duration(elapsed)}"]
        if self.total:  # the rate since the first unit: start-up (actors, model loads) does not inflate the ETA
            eta = None
            if self._first is not None and done > self._first[1]:
                eta = eta_seconds(done - self._first[1], self.total - self._first[1],
                                  time.perf_counter() - self._first[0])
            parts.append(f"eta {format_duration(0 if done >= self.total else eta)}")
        return " | ".join(parts)

    def update(self, done: int, force: bool = False) -> str | None:
        """Record `done` units; print a line when `every_s` has passed, at the end (done == total), or forced."""
        self.done = done
        now = time.perf_counter()
        finished = bool(self.total) and done >= self.total and not self._finished
        if not (force or finished or now - self._last >= self.every_s):
            return None
        self._finished = self._finished or finished
        self._last = now
        text = self.line(done)
        emit(text)
        self.lines.append(text)
        return text

    def advance(self, n: int = 1) -> str | None:
        return self.update(self.done + n)
