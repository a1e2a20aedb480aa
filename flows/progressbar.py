"""The terminal's progress bars: long steps as live rich bars below the run's log lines.

When stderr is a terminal, :class:`TerminalConsole` is the console log handler. It prints the log
lines through one rich Console, above a live :class:`rich.progress.Progress` fed by every call of
:class:`tasks.progress.LogProgress` (from any thread). A stage gets a bar on its first call. When it
ends, the bar goes and the stage's final progress line is printed in its place. The periodic lines that
the bar replaces stay off the console, but the log file and Prefect still get them. The live display
runs only while some stage is in progress, so the screen is left alone in between.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)

from tasks import progress

NO_PROGRESS = "LAFITE_NO_PROGRESS"


def for_terminal(stream: TextIO) -> TerminalConsole | None:
    """A :class:`TerminalConsole` on ``stream`` if it is a terminal that can redraw lines (not
    ``TERM=dumb``) and ``LAFITE_NO_PROGRESS`` is not set (to anything but 0); else None."""
    if os.environ.get(NO_PROGRESS, "0") not in ("", "0"):
        return None
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return None
    console = Console(file=stream)
    return TerminalConsole(console) if console.is_terminal and not console.is_dumb_terminal else None


class TerminalConsole(logging.Handler):
    """A log handler that writes to a rich Console and draws progress bars under the lines it writes.

    :meth:`update` is the ``progress(stage, done, total)`` sink (total 0: a count with no end).
    :meth:`close` stops the bars and detaches the handler from :mod:`tasks.progress`.
    """

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.bar: Progress | None = None
        self.stages: dict[str, tuple[TaskID, int]] = {}  # stage -> (its bar, done so far)
        self.guard = threading.Lock()  # taken before any of rich's locks, never inside one
        self.closed = False
        self.addFilter(lambda record: not getattr(record, progress.STEP, False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.out(self.format(record), highlight=False)
        except Exception:
            self.handleError(record)

    def update(self, stage: str, done: int, total: int) -> None:
        final = total > 0 and done >= total
        with self.guard:
            if self.closed or (final and stage not in self.stages):  # done in one call: its log line says so
                return
            if self.bar is None:
                self.bar = self._new_bar()
                self.bar.start()
            task, before = self.stages.get(stage, (None, 0))
            if task is not None and done < before:  # the same stage again (another category, a resumed run)
                self.bar.remove_task(task)
                task = None
            if task is None:
                task = self.bar.add_task(stage, total=total or None, completed=done)
            else:
                self.bar.update(task, total=total or None, completed=done)
            self.stages[stage] = (task, done)
            if final:
                self.bar.remove_task(task)
                del self.stages[stage]
                if self.stages:
                    self.bar.refresh()  # else the next log line redraws the finished bar
                else:
                    self._stop()

    def close(self) -> None:
        progress.clear_sink(self.update)
        with self.guard:
            self.closed = True
            self.stages.clear()
            self._stop()
        super().close()

    def _new_bar(self) -> Progress:
        # stdout stays as it is (results may be piped); stray writes to stderr go above the bars
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                        transient=True, redirect_stdout=False, redirect_stderr=True)

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
