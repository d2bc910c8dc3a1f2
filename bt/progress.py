"""Progress bars on a terminal: one rich progress bar per torrent, with
event and log lines printed above them (``bt download``, ``bt seed``,
``bt daemon``).

Only for a terminal: when stderr is not one, the commands print plain
periodic lines instead (``bt._cli_run``), which scripts and logs read.
The display is refreshed by the caller (``auto_refresh=False``): no
thread of rich's own runs next to the event loop, and nothing is drawn
between two updates.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Bars"]


class Bars:
    """A rich progress display on stderr: :meth:`update` adds or moves a
    torrent's bar (by a key, e.g. its gid), :meth:`say` prints a line
    above the bars, :meth:`stop` leaves the last state on screen."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskID, TextColumn

        self.console = console if console is not None else Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=30),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[detail]}", markup=False),
            console=self.console, auto_refresh=False, transient=False)
        self._tasks: dict[str, TaskID] = {}
        self._running = False

    def update(self, key: str, name: str, completed: int, total: int, detail: str) -> None:
        """Show ``key``'s bar at ``completed`` of ``total`` bytes with a
        ``detail`` text (rates, peers, ETA), and redraw."""
        if not self._running:
            self._progress.start()
            self._running = True
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = self._progress.add_task(name, total=max(1, total),
                                                              detail="")
        self._progress.update(task, description=name, total=max(1, total),
                              completed=min(completed, max(1, total)), detail=detail)
        self._progress.refresh()

    def remove(self, key: str) -> None:
        """Take ``key``'s bar away (a removed download)."""
        task = self._tasks.pop(key, None)
        if task is not None:
            self._progress.remove_task(task)
            if self._running:
                self._progress.refresh()

    def keys(self) -> set[str]:
        return set(self._tasks)

    def say(self, line: str) -> None:
        """A line of its own, above the bars."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self._running:
            self._progress.refresh()
            self._progress.stop()
            self._running = False
