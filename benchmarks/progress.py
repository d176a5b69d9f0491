"""Progress lines for every long loop: a bar on a terminal, a rate line every few seconds otherwise.

    for step in progress(range(n), "finetune nf4-dq", unit="step"):
        ...
        bar.set(loss=3.21)               # optional extra fields shown after the rate

Output goes to stderr so that stdout stays machine-readable. No dependency (tqdm is not required).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

LOG_INTERVAL_S = 5.0  # rate line cadence when stderr is not a terminal


def _fmt_seconds(s: float) -> str:
    if math.isnan(s) or math.isinf(s):
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Iterate ``items`` and report ``label i/n rate eta [fields]``.

    Args:
        items: any iterable; ``total`` defaults to ``len(items)`` when it has one.
        label: what is running (shown first on every line).
        unit: what one item is ("step", "shape", ...).
        stream: where to write (default: stderr).
        interval_s: minimum seconds between two lines when not on a terminal.
    """

    def __init__(self, items: Iterable[T], label: str, total: int | None = None, unit: str = "it",
                 stream: TextIO | None = None, interval_s: float = LOG_INTERVAL_S) -> None:
        self.items = items
        self.label = label
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.fields: dict[str, object] = {}
        self.done = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0 = self._last = 0.0
        self._shown = -1

    def set(self, **fields: object) -> None:
        """Extra ``key=value`` fields for the next line (e.g. the current loss)."""
        self.fields.update(fields)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        eta = (self.total - self.done) / rate if (self.total is not None and rate > 0) else float("nan")
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())
        head = f"[{self.label}] {count} {self.unit}s  {rate:.3g} {self.unit}/s  elapsed {_fmt_seconds(elapsed)}"
        if self.total is not None and self.done < self.total:
            head += f"  eta {_fmt_seconds(eta)}"
        return head + (f"  {extra}" if extra else "")

    def _emit(self, final: bool = False) -> None:
        now = time.perf_counter()
        if final and self._shown == self.done and not self.tty:
            return  # the last line already shows the final count
        if not final and now - self._last < (0.2 if self.tty else self.interval_s):
            return
        self._last, self._shown = now, self.done
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def __iter__(self) -> Iterator[T]:
        self._t0 = self._last = time.perf_counter()
        self._last -= self.interval_s  # the first item always prints a line
        for item in self.items:
            yield item
            self.done += 1
            self._emit()
        self._emit(final=True)


def progress(items: Iterable[T], label: str, total: int | None = None, unit: str = "it",
             stream: TextIO | None = None) -> Progress:
    """Shorthand for :class:`Progress`."""
    return Progress(items, label, total=total, unit=unit, stream=stream)


def log(msg: str, stream: TextIO | None = None) -> None:
    """One status line on stderr (flushed)."""
    s = stream if stream is not None else sys.stderr
    s.write(msg + "\n")
    s.flush()
