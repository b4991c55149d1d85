"""Progress reporting for long jobs (exports, checks): rich bars on a terminal, plain lines elsewhere
(a log file or CI must see that something is happening)."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
PLAIN_EVERY_S = 5.0  # at most one plain progress line per bar this often
PLAIN_START_S = 1.0  # a plain step's first line once it has run this long
PLAIN_DONE_S = 2.0  # a plain "done" line only for work that took at least this long


class Progress:
    """Silent progress: the interface exporters call. `RichProgress` draws it."""

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items

    @contextlib.contextmanager
    def step(self, description: str):
        yield

    def log(self, message: str) -> None:
        pass


class RichProgress(Progress):
    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.plain = not self.console.is_terminal
        self._bars = None if self.plain else RP(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=True)

    def __enter__(self):
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc):
        if self._bars is not None:
            self._bars.stop()

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def track(self, items, description, total=None):
        if not self.plain:
            yield from self._bars.track(items, description=description, total=total)
            return
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        started = last = time.perf_counter()
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= PLAIN_EVERY_S:
                last = now
                self._line(f"{description}: {done}/{total if total is not None else '?'}")
        if time.perf_counter() - started >= PLAIN_DONE_S:
            self._line(f"{description}: {done} done in {time.perf_counter() - started:.1f} s")

    @contextlib.contextmanager
    def step(self, description):
        if self.plain:  # quick steps print nothing; a slow one says what it is doing, then when it ends
            started = time.perf_counter()
            timer = threading.Timer(PLAIN_START_S, self._line, (f"{description} ...",))
            timer.daemon = True
            timer.start()
            try:
                yield
            finally:
                timer.cancel()
            if time.perf_counter() - started >= PLAIN_DONE_S:
                self._line(f"{description}: done in {time.perf_counter() - started:.1f} s")
            return
        task = self._bars.add_task(description, total=1)
        yield
        self._bars.update(task, completed=1)

    def log(self, message):
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)  # no log-time/source columns
