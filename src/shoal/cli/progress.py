"""The CLI's consoles and progress bars: rich's on a terminal, plain lines in a log file or a pipe."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_WIDTH = 200
"""Columns of output that is not a terminal: rich's default there, 80, cut a search's progress line and wrapped its
messages; a line as long as this is written whole."""
LOG_EVERY = 30.0
"""Seconds between a task's progress lines where stderr is not a terminal."""


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader of the output went away (`| head`): raised for the CLI to stop as SIGPIPE stops a command
        (exit 141), where rich would exit 1, the code of a bug."""
        raise BrokenPipeError


def console(stderr: bool = False) -> Console:
    """A console on stdout or stderr; where that is not a terminal, LOG_WIDTH wide. On stderr, messages are lines that
    are never wrapped (a terminal wraps them itself; a log file keeps each whole, for grep)."""
    out = _Console(stderr=stderr, soft_wrap=stderr)
    if not out.is_terminal:
        out.width = LOG_WIDTH
    return out


class Bar(Progress):
    """rich's live progress bar on stderr when it is a terminal. Elsewhere (a log file, a pipe), where rich would draw
    nothing until the work ends and then one line cut at the console's width, each task's line is printed whole
    when it starts, at most every LOG_EVERY seconds while it advances, and when it finishes or the bar stops
    (nothing at all with disable)."""

    def __init__(self, *columns: str | ProgressColumn, disable: bool = False, every: float = LOG_EVERY) -> None:
        out = console(stderr=True)
        self._logged = not out.is_terminal and not disable
        super().__init__(*columns, console=out, transient=self._logged, disable=disable)
        self._every = every
        self._shown: dict[TaskID, tuple[float, float]] = {}
        """Each task's last printed line: when, and at how many done."""

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        if self._logged and self.live.is_started:
            self._log(next(t for t in self.tasks if t.id == task_id), due=False)

    def stop(self) -> None:
        if not self._logged:
            super().stop()
            return
        if not self.live.is_started:
            return
        for task in self.tasks:
            self._log(task, due=True)
        self.live.stop()  # not Progress.stop, which ends output that is not a terminal with a blank line

    def _log(self, task: Task, due: bool) -> None:
        """Print task's line unless it was printed at this count, or (unless due or finished) under LOG_EVERY ago."""
        now = time.monotonic()
        shown = self._shown.get(task.id)
        if shown is not None and (shown[1] == task.completed or not (due or task.finished)
                                  and now - shown[0] < self._every):
            return
        self._shown[task.id] = (now, task.completed)
        self.console.print(self.make_tasks_table([task]))


def bar(disable: bool = False) -> Bar:
    """A progress bar for a loop: description, bar, done of total, time taken and left."""
    return Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=disable,
    )
