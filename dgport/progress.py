"""Progress reporting for long jobs (exports): rich bars on a terminal, silence elsewhere."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


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
        self._bars = RP(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.console, transient=True)

    def __enter__(self):
        self._bars.start()
        return self

    def __exit__(self, *exc):
        self._bars.stop()

    def track(self, items, description, total=None):
        yield from self._bars.track(items, description=description, total=total)

    @contextlib.contextmanager
    def step(self, description):
        task = self._bars.add_task(description, total=1)
        yield
        self._bars.update(task, completed=1)

    def log(self, message):
        self._bars.console.log(message)
