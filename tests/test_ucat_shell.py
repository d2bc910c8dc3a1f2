"""ucat under job control: a real interactive bash on a pseudo-terminal.

The README's example puts the listener in the background of an interactive
shell (``ucat -l -p 9000 > received.bin &``).  Its stdin is then the
shell's terminal, which it does not own: reading it would get it stopped
by SIGTTIN (issue 13).  These tests run exactly that in ``bash -i`` on a
pty, with a real sender on loopback, and check that ucat never stops, that
a ucat stopped with Ctrl-Z ends on SIGTERM and SIGINT, and that --progress
reports what was sent.
"""

from __future__ import annotations

import os
import pty
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testsupport import unavailable

TIMEOUT = 30
_DONE = re.compile(rb"DONE-(\d+)-42")


def _ucat_command() -> list[str]:
    """The installed console script next to this interpreter (what the
    README runs), else ``python -m ucat``."""
    script = Path(sys.executable).with_name("ucat")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ucat"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    roots = []
    for name in ("ucat", "utp"):
        mod = __import__(name)
        roots.append(str(Path(os.path.abspath(mod.__file__)).parent.parent))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots))
    env.update(PS1="$ ", TERM="dumb", HISTFILE="/dev/null", PROMPT_COMMAND="")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_bound(port: int, timeout: float = TIMEOUT) -> None:
    """Until something has bound UDP `port` (the listener started by the
    shell is then ready: it binds and listens in one step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing bound UDP port {port} in {timeout} s")


class Shell:
    """``bash -i`` on a pty: job control on, the pty its controlling terminal."""

    def __init__(self, cwd: Path) -> None:
        if shutil.which("bash") is None:
            unavailable("bash is not installed")
        env = _env()
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.chdir(cwd)
                os.execve(shutil.which("bash"), ["bash", "--norc", "--noprofile", "-i"], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.out = b""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def run(self, line: str) -> None:
        self.send(line + "\n")

    def expect(self, pattern: re.Pattern | bytes, timeout: float = TIMEOUT) -> re.Match:
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        start = len(self.out)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.out, start)
            if match:
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {regex.pattern!r} from the shell in {timeout} s; it showed:\n"
                            f"{self.out.decode(errors='replace')[-3000:]}")
            import select
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if ready:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:
                    pass

    def status_of_last_job(self, timeout: float = TIMEOUT) -> int:
        """The exit status of job 1, through `wait`.  The marker's digits
        cannot come from the echo of the command line itself.  bash learns
        that a continued job runs again only from its next SIGCHLD, so
        right after `kill` (SIGTERM and SIGCONT) `wait` may still call the
        job stopped (status 128 + SIGTSTP or SIGTTIN): ask again until it
        ends; a job that really stays stopped fails the test at timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.run('wait %1; echo "DONE-$?-$((6*7))"')
            status = int(self.expect(_DONE).group(1))
            if status not in (128 + signal.SIGTSTP, 128 + signal.SIGTTIN) or time.monotonic() > deadline:
                return status
            time.sleep(0.2)

    def close(self) -> None:
        try:
            self.run("kill -KILL %1 2>/dev/null; exit")
        except OSError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def shell(tmp_path):
    sh = Shell(tmp_path)
    sh.run("echo READY-$((6*7))")
    sh.expect(b"READY-42")
    yield sh
    sh.close()


def _ucat_line(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in (*_ucat_command(), *args))


def _sender(tmp_path: Path, port: int, *, stdin, name: str = "sender") -> subprocess.Popen:
    err = (tmp_path / f"{name}.err").open("wb")
    return subprocess.Popen([*_ucat_command(), "-d", "-n", "127.0.0.1", str(port)], stdin=stdin,
                            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env=_env())


def _wait_text(path: Path, pattern: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} in {path.name} in {timeout} s:\n"
                f"{path.read_text(errors='replace') if path.exists() else ''}")


def test_listener_in_the_background_of_a_shell_does_not_stop(shell, tmp_path):
    """The README's two commands, the listener with `&` in bash -i: the
    transfer completes, both exit 0, and the job is never stopped."""
    port = _free_port()
    data = os.urandom(3 << 20)
    (tmp_path / "some-file").write_bytes(data)
    shell.run(_ucat_line("-l", "-p", str(port)) + " > received.bin &")
    _wait_bound(port)
    with (tmp_path / "some-file").open("rb") as f:
        sender = _sender(tmp_path, port, stdin=f)
        assert sender.wait(TIMEOUT) == 0, (tmp_path / "sender.err").read_text()
    assert shell.status_of_last_job() == 0
    assert b"Stopped" not in shell.out, shell.out.decode(errors="replace")
    assert (tmp_path / "received.bin").read_bytes() == data


def _foreground_listener_connected(shell, tmp_path):
    """A foreground `ucat -l` reading the terminal, with a sender connected
    whose stdin stays open; returns the sender and its stdin."""
    port = _free_port()
    shell.run(_ucat_line("-l", "-p", str(port)) + " > received.bin")
    _wait_bound(port)
    r, w = os.pipe()
    sender = _sender(tmp_path, port, stdin=r)
    os.close(r)
    _wait_text(tmp_path / "sender.err", r"connected to")
    return sender, w


@pytest.mark.parametrize("how, status", [("kill %1", 143), ("kill -INT %1; kill -CONT %1", 130)],
                         ids=["sigterm", "sigint"])
def test_stopped_ucat_ends_on_a_signal(shell, tmp_path, how, status):
    """Ctrl-Z stops the listener; SIGTERM (bash's `kill %1` adds SIGCONT)
    or SIGINT plus SIGCONT end it with 128 + the signal: it is not stopped
    again by reading the terminal in the background (bash's `wait` would
    then say 148, stopped by SIGTSTP, or 149, by SIGTTIN)."""
    sender, w = _foreground_listener_connected(shell, tmp_path)
    try:
        shell.send("\x1a")  # Ctrl-Z: SIGTSTP to the foreground job
        shell.expect(re.compile(rb"Stopped"))
        shell.run(how)
        assert shell.status_of_last_job() == status, shell.out.decode(errors="replace")
    finally:
        os.close(w)
        sender.kill()
        sender.wait()


def test_listener_sent_to_the_background_stops_reading_the_terminal(shell, tmp_path):
    """Ctrl-Z then `bg` while ucat reads the terminal: it takes the terminal
    as ended (sends FIN) instead of being stopped again by SIGTTIN, and the
    session finishes when the sender's input ends."""
    sender, w = _foreground_listener_connected(shell, tmp_path)
    try:
        shell.send("\x1a")
        shell.expect(re.compile(rb"Stopped"))
        shell.run("bg")
        os.write(w, b"from the sender\n")
        os.close(w)
        w = -1
        assert sender.wait(TIMEOUT) == 0, (tmp_path / "sender.err").read_text()
        assert shell.status_of_last_job() == 0, shell.out.decode(errors="replace")
        assert b"Stopped (tty input)" not in shell.out, shell.out.decode(errors="replace")
        assert (tmp_path / "received.bin").read_bytes() == b"from the sender\n"
    finally:
        if w >= 0:
            os.close(w)
        sender.kill()
        sender.wait()


def test_progress_reports_bytes_rate_and_time_left(tmp_path):
    """--progress with a regular file on stdin: the final line says all of
    it was sent (the size is known), with a rate."""
    port = _free_port()
    size = 2 << 20
    (tmp_path / "in").write_bytes(os.urandom(size))
    env = _env()
    listener = subprocess.Popen([*_ucat_command(), "-l", "-n", "-s", "127.0.0.1", "-p", str(port)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    _wait_bound(port)
    try:
        with (tmp_path / "in").open("rb") as f:
            out = subprocess.run([*_ucat_command(), "--progress", "-n", "127.0.0.1", str(port)],
                                 stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 cwd=tmp_path, env=env, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        last = out.stderr.decode().strip().splitlines()[-1]
        assert re.fullmatch(r"ucat: sent 2\.0 MiB of 2\.0 MiB \(100%\), received 0 B, "
                            r"[0-9.]+ MB/s", last), last
        assert listener.wait(TIMEOUT) == 0
    finally:
        listener.kill()
        listener.wait()
