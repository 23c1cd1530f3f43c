"""Progress bars for the long training-side commands (eval, sweep), drawn with rich on stderr.

:func:`progress_bars` opens a :class:`rich.progress.Progress` and yields a task factory
``new_task(description, total) -> advance()``; :class:`ProgressGenerator` wraps a
:class:`training.evaluate.Generator` so that every ``generate`` / ``generate_rows`` call gets
its own bar advanced per finished answer, without the evaluation code knowing about bars.
``train`` has its own bar (the trainer's tqdm, see :mod:`training.trainers`). Disabled
(``enabled=False``) the factory returns no-op advances. When stderr is not a terminal (a log
file, CI), a live bar cannot redraw, so a plain line ``description: done/total (elapsed)`` is
printed at every tenth of a task instead. Not here: any evaluation logic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from training.evaluate import BASE, runtime_of

NewTask = Callable[[str, int], Callable[[], None]]


def _noop() -> None:
    pass


@contextmanager
def progress_bars(enabled: bool = True, console: Console | None = None) -> Iterator[NewTask]:
    """Yield ``new_task(description, total) -> advance()``; ``advance`` is thread-safe (engine callbacks)."""
    if not enabled:
        yield lambda description, total: _noop
        return
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn())
    lock = threading.Lock()
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield _plain_tasks(console, lock)
        return
    with Progress(*cols, console=console, transient=False) as bars:

        def new_task(description: str, total: int) -> Callable[[], None]:
            task = bars.add_task(description, total=total)

            def advance() -> None:
                with lock:
                    bars.advance(task)

            return advance

        yield new_task


def _plain_tasks(console: Console, lock: threading.Lock) -> NewTask:
    def new_task(description: str, total: int) -> Callable[[], None]:
        t0, done = time.perf_counter(), [0]
        step = max(1, total // 10)

        def advance() -> None:
            with lock:
                done[0] += 1
                if done[0] % step == 0 or done[0] == total:
                    console.print(f"{description}: {done[0]}/{total} ({time.perf_counter() - t0:.0f} s)")

        return advance

    return new_task


class ProgressGenerator:
    """A generator whose every call advances a fresh progress bar (one step per answer)."""

    def __init__(self, gen: Any, new_task: NewTask) -> None:
        self.gen = gen
        self.new_task = new_task
        self.base_name = gen.base_name

    def generate(self, prompts: list[str], model: str, max_tokens: int, on_answer=None) -> list[str]:
        label = "base" if model == BASE else model
        return self.gen.generate(prompts, model, max_tokens, on_answer or self.new_task(f"{label} answers", len(prompts)))

    def generate_rows(self, rows: list, max_tokens: int, on_answer=None) -> list[str]:
        return self.gen.generate_rows(rows, max_tokens, on_answer or self.new_task("answers", len(rows)))

    def runtime(self) -> dict[str, str]:
        """The wrapped generator's device and dtype (see :func:`training.evaluate.runtime_of`)."""
        return runtime_of(self.gen)["generation"]

    def close(self) -> None:
        self.gen.close()
