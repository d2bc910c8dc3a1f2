"""Hook commands on download events, as aria2's ``--on-download-*`` options.

    hooks = Hooks({EventKind.COMPLETE: "/usr/local/bin/done.sh"}, timeout=60)
    hooks.install(session)          # a listener on session.notifier

Each command gets aria2's three arguments: the gid, the number of files,
and the path of the first file (the ``path`` of the first entry of
aria2.getFiles: the save directory joined with the torrent's file path,
so ``DIR/NAME`` for a single-file torrent and ``DIR/NAME/dir/file`` for
a multi-file one; BEP 47 pad files are not files here; no files: ``0``
and an empty path).  As in aria2 the directory is passed as it was given
(a relative one stays relative: the command runs in our working
directory).

Like aria2, the option value is the *command itself*, run directly (the
PATH is searched when it has no slash), never through a shell and never
split: ``--on-download-complete "/opt/my hooks/done.sh"`` runs that file.
A command needing arguments of its own goes in a small script.

Which command runs (aria2's ``executeStopHook``): start, pause and
bt-complete run their own; when a download ends, complete and error run
theirs, falling back to the ``stop`` command when theirs is not set; a
plain stop runs the ``stop`` command.

Never blocking the session: the listener only starts a task (the
session's, via :meth:`bt.events.Notifier.start_soon`); at most
``max_running`` commands run at once (the others wait their turn); a
command still running after ``timeout`` seconds is terminated (SIGTERM,
then SIGKILL after 5 s, as trio does) and that is logged.  stdin is
/dev/null; stdout and stderr are the session process's.  Each result is
logged on the ``bt.hooks`` logger (exit 0 at INFO, another status, a
signal or a command that cannot start at WARNING) and counted in the
session's counters (``hooks.ok``, ``hooks.failed``, ``hooks.timeout``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import TYPE_CHECKING, Mapping

import trio

from .events import DownloadEvent, EventKind

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Hooks", "hook_arguments", "HOOK_TIMEOUT", "MAX_RUNNING"]

log = logging.getLogger("bt.hooks")

#: Seconds a hook may run before it is terminated.
HOOK_TIMEOUT = 60.0
#: Hook commands running at once; more wait (a thousand downloads
#: completing together must not fork a thousand processes).
MAX_RUNNING = 16


def hook_arguments(event: DownloadEvent) -> list[str]:
    """aria2's three hook arguments for ``event``: gid, number of files,
    path of the first file."""
    torrent = event.torrent
    files = [f for f in torrent.meta.files if not f.pad]
    first = os.path.join(torrent.save_path, *files[0].path) if files else ""
    return [event.gid, str(len(files)), first]


class Hooks:
    """Hook commands by event kind; see the module docstring."""

    def __init__(self, commands: Mapping[EventKind | str, str | None], *,
                 timeout: float = HOOK_TIMEOUT, max_running: int = MAX_RUNNING) -> None:
        self.commands: dict[EventKind, str] = {}
        for kind, command in commands.items():
            if command:
                self.commands[EventKind(kind)] = os.fspath(command)
        if not timeout > 0:
            raise ValueError(f"hook timeout must be > 0 seconds, not {timeout!r}")
        self.timeout = float(timeout)
        self._limiter = trio.CapacityLimiter(max_running)
        self._session: Session | None = None

    def command_for(self, kind: EventKind) -> str | None:
        """The command ``kind`` runs, with aria2's fallback to the stop
        command for complete and error."""
        command = self.commands.get(kind)
        if command is None and kind in (EventKind.COMPLETE, EventKind.ERROR):
            command = self.commands.get(EventKind.STOP)
        return command

    def install(self, session: "Session") -> None:
        """Run the hooks on ``session``'s events."""
        if self._session is not None:
            raise ValueError("these hooks are already installed on a session")
        self._session = session
        session.add_listener(self)

    def uninstall(self) -> None:
        """Stop running hooks for new events (running ones go on)."""
        if self._session is not None:
            self._session.remove_listener(self)
            self._session = None

    def __call__(self, event: DownloadEvent) -> None:
        command = self.command_for(event.kind)
        if command is not None and self._session is not None:
            self._session.notifier.start_soon(self._run, command, event)

    async def _run(self, command: str, event: DownloadEvent) -> None:
        assert self._session is not None
        counters = self._session.counters
        argv = [command, *hook_arguments(event)]
        what = f"hook {event.kind.option} {command!r} for {event.gid}"
        async with self._limiter:
            with trio.move_on_after(self.timeout) as scope:
                try:
                    proc = await trio.run_process(argv, stdin=subprocess.DEVNULL, check=False)
                except OSError as exc:
                    counters["hooks.failed"] += 1
                    log.warning("%s could not start: %s", what, exc.strerror or exc)
                    return
        if scope.cancelled_caught:
            counters["hooks.timeout"] += 1
            log.warning("%s was still running after %g s: terminated", what, self.timeout)
        elif proc.returncode == 0:
            counters["hooks.ok"] += 1
            log.info("%s exited with status 0", what)
        else:
            counters["hooks.failed"] += 1
            how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 \
                else f"exited with status {proc.returncode}"
            log.warning("%s %s", what, how)
