"""Progress of long loops: a tqdm bar on a terminal, plain log lines anywhere else.

A tqdm bar redraws itself with carriage returns; written to a pipe, a log file or CI it becomes one endless
line. Off a terminal `Progress` prints instead one line at most every `interval` seconds and one at the end,
each complete and newline-terminated, with the same counts, rate and postfix the bar would show.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LOG_SECONDS = 30.0


def is_terminal(stream: IO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """`tqdm`'s core interface (update, set_postfix, write, close, iteration) for either output."""

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        interval: float = LOG_SECONDS,
        stream: IO | None = None,
        leave: bool = True,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.n, self.initial = desc, unit, initial, initial
        self.enabled, self.interval = enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream)
        self.postfix = ""
        self.start = self.logged = time.perf_counter()
        self.logged_n = initial
        self.bar = tqdm(
            total=self.total, initial=initial, desc=desc, unit=unit, file=self.stream,
            disable=not (enabled and self.tty), dynamic_ncols=True, leave=leave,
        )  # fmt: skip

    @property
    def plain(self) -> bool:
        """Whether plain lines are printed (enabled, not on a terminal)."""
        return self.enabled and not self.tty

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.plain and time.perf_counter() - self.logged >= self.interval:
            self._line()

    def set_postfix(self, text: str = "", **values: object) -> None:
        """Extra figures after the counts (`loss/head=2.31`); on a bar they refresh with it."""
        self.postfix = ", ".join([text] * bool(text) + [f"{k}={v}" for k, v in values.items()])
        self.bar.set_postfix_str(self.postfix, refresh=False)

    def write(self, line: str) -> None:
        """A message line that does not break the bar (stdout, like `tqdm.write`)."""
        if self.tty and self.enabled:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self) -> None:
        """Print a plain line now (off a terminal), e.g. when a unit of work was saved."""
        if self.plain:
            self._line()

    def close(self) -> None:
        self.bar.close()
        if self.plain and self.n != self.logged_n:
            self._line()
        self.logged_n = self.n

    def _line(self) -> None:
        now = time.perf_counter()
        self.logged, self.logged_n = now, self.n
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        parts = [f"{done} {self.unit}{pct}"]
        if rate > 0:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s/{self.unit}")
        if self.postfix:
            parts.append(self.postfix)
        label = f"{self.desc}: " if self.desc else ""
        print(label + ", ".join(parts), file=self.stream, flush=True)
