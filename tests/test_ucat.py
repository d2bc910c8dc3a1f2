"""ucat end to end: real ``ucat`` processes talking uTP over loopback.

Every process is ``sys.executable -m ucat`` (so the tests work from a source
checkout and against an installed wheel alike), runs with its working
directory in a temporary folder (so a checkout in the current directory
cannot shadow the installed package), and is bounded by a timeout and killed
at teardown whatever happened.  Traffic goes to 127.0.0.1 or ::1 only, and no
test makes ucat ask a DNS server anything: hosts are IP literals or are
rejected before resolution.

Listeners are started as ``ucat -l -d -n -s HOST -p 0``: the system picks
the port and ucat reports it on stderr as ``listening on HOST:PORT``
(``[HOST]:PORT`` for IPv6), which the tests read.

Run with ``-s`` to see the throughput of the 64 MiB transfer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pty
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from testsupport import console_script, unavailable, have_ipv6_loopback

BIG = 64 * 1024 * 1024
SMALL = 4 * 1024 * 1024
LISTEN_TIMEOUT = 20      # a listener reports its port (interpreter start-up included)
TRANSFER_TIMEOUT = 240   # 64 MiB both ways on a slow, busy CI machine
QUICK = 20               # argument errors, refusals: interpreter start-up plus a little
DEAD_PEER_TIMEOUT = 60   # the engine gives up on a silent peer after about 31 s


# --- running ucat -------------------------------------------------------


def _package_root(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    # Not resolved: a symlinked package must be found where it was found here.
    return str(Path(os.path.abspath(spec.origin)).parent.parent)


def _child_env() -> dict[str, str]:
    """The environment for ucat processes: the same ucat and utp this
    interpreter imports, first on the path, and unbuffered stderr."""
    env = dict(os.environ)
    roots = []
    for name in ("ucat", "utp"):
        root = _package_root(name)
        if root and root not in roots:
            roots.append(root)
    if env.get("PYTHONPATH"):
        roots.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(roots)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSTARTUP", None)
    return env


ENV = _child_env()


def ucat(*args) -> list[str]:
    return [sys.executable, "-m", "ucat", *map(str, args)]


def _free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Proc:
    """One ucat process; stderr goes to a file so it can be read any time."""

    def __init__(self, args, tmp_path: Path, name: str, **kw) -> None:
        self.name = name
        self.err_path = tmp_path / f"{name}.err"
        self._err = self.err_path.open("wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(args, stderr=self._err, cwd=tmp_path, env=ENV, **kw)

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish in {timeout} s; stderr:\n{self.err()[-3000:]}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.kill()
        for f in (self.popen.stdin, self.popen.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._err.close()


class Procs:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.all: list[Proc] = []

    def start(self, args, name: str, **kw) -> Proc:
        proc = Proc(args, self.tmp_path, name, **kw)
        self.all.append(proc)
        return proc

    def listener(self, host: str, *extra, name: str = "listener", **kw) -> tuple[Proc, int]:
        """Start ``ucat -l -d -n -s host -p 0 ...``; return it and its port."""
        proc = self.start(ucat("-l", "-d", "-n", "-s", host, "-p", "0", *extra), name, **kw)
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while time.monotonic() < deadline:
            match = re.search(r"listening on (\S+)", proc.err())
            if match:
                where = match.group(1)
                assert where.rsplit(":", 1)[0].strip("[]") == host, where
                return proc, int(where.rsplit(":", 1)[1])
            if proc.popen.poll() is not None:
                pytest.fail(f"{name} exited with {proc.popen.returncode}:\n{proc.err()}")
            time.sleep(0.02)
        pytest.fail(f"{name} did not report its port in {LISTEN_TIMEOUT} s:\n{proc.err()}")

    def wait_for(self, proc: Proc, pattern: str, timeout: float = LISTEN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, proc.err()):
                return
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.err()}")
            time.sleep(0.02)
        pytest.fail(f"{proc.name}: no {pattern!r} on stderr in {timeout} s:\n{proc.err()}")

    def close(self) -> None:
        for proc in self.all:
            proc.close()


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def host(request):
    if request.param == "::1" and not have_ipv6_loopback():
        unavailable("no IPv6 loopback (::1) on this machine", "CI needs ::1 on lo")
    return request.param


def _feed(pipe, data: bytes, chunk: int = 1 << 20) -> threading.Thread:
    """Write data into a pipe from a thread, then close it."""

    def run():
        try:
            view = memoryview(data)
            for i in range(0, len(view), chunk):
                pipe.write(view[i:i + chunk])
        except (BrokenPipeError, OSError, ValueError):
            pass
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class _Digest:
    """Reads a pipe to its end in a thread, hashing and counting."""

    def __init__(self, pipe) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self._pipe = pipe
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            block = self._pipe.read1(1 << 20) if hasattr(self._pipe, "read1") else self._pipe.read(1 << 20)
            if not block:
                break
            self.sha.update(block)
            self.size += len(block)

    def result(self, timeout: float) -> tuple[int, str]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stdout of ucat never reached EOF"
        return self.size, self.sha.hexdigest()


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _assert_one_line_error(proc: Proc, pattern: str = "") -> str:
    """stderr ends with exactly one ``ucat: ...`` line matching pattern and
    holds no traceback."""
    text = proc.err()
    assert "Traceback" not in text, text
    assert "internal error" not in text, text
    lines = text.strip().splitlines()
    assert lines, f"{proc.name} failed without a message"
    last = lines[-1]
    assert last.startswith("ucat: "), text
    assert re.search(pattern, last), f"{last!r} does not match {pattern!r}"
    return last


# --- arguments ------------------------------------------------------------


def test_version():
    out = subprocess.run(ucat("--version"), capture_output=True, timeout=QUICK, env=ENV, cwd="/")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rb"ucat \(utpkit\) \S+\n", out.stdout), out.stdout
    assert out.stderr == b""


def test_help_lists_libutp_flags():
    out = subprocess.run(ucat("-h"), capture_output=True, timeout=QUICK, env=ENV, cwd="/")
    assert out.returncode == 0, out.stderr
    for flag in (b"-d", b"-l", b"-p", b"-s", b"-B", b"-n", b"-w", b"--version", b"exit status"):
        assert flag in out.stdout


def test_console_script():
    """The `ucat` entry point of an installed utpkit (skipped in a checkout)."""
    script = console_script("ucat")
    out = subprocess.run([str(script), "--version"], capture_output=True, timeout=QUICK, env=ENV, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"ucat (utpkit) ")


@pytest.mark.parametrize(
    "args, status, pattern",
    [
        (["-Z", "127.0.0.1", "4000"], 2, r"unrecognized arguments: -Z"),
        (["127.0.0.1"], 2, r"need a host and a port"),
        ([], 2, r"need a host and a port"),
        (["127.0.0.1", "4000", "extra"], 2, r"unrecognized arguments"),
        (["127.0.0.1", "0"], 2, r"bad port '0'"),
        (["127.0.0.1", "65536"], 2, r"bad port '65536'"),
        (["127.0.0.1", "http"], 2, r"bad port 'http'"),
        (["127.0.0.1", "-1"], 2, r"bad port '-1'"),
        (["-l", "-p", "70000"], 2, r"bad port '70000'"),
        (["-l", "127.0.0.1", "4000"], 2, r"-l takes no host or port"),
        (["-l", "4000"], 2, r"-l takes no host or port"),
        (["-B", "lots", "127.0.0.1", "4000"], 2, r"argument -B: bad buffer size"),
        (["-w", "0", "127.0.0.1", "4000"], 2, r"argument -w: bad timeout"),
        (["-w", "soon", "127.0.0.1", "4000"], 2, r"argument -w: bad timeout"),
        (["-p"], 2, r"argument -p: expected one argument"),
        (["no such host", "4000"], 2, r"bad host name 'no such host'"),
        (["bad..host", "4000"], 2, r"bad host name"),
        (["-s", "not an address", "127.0.0.1", "4000"], 2, r"bad host name"),
        (["-n", "localhost", "4000"], 1, r"-n: 'localhost' is not a numeric address"),
        (["-n", "-s", "::1", "127.0.0.1", "4000"], 1, r"'127\.0\.0\.1' has no IPv6 address"),
        (["--rendezvous", "k", "--tracker", "udp://127.0.0.1:9", "--birthday-ports", "5000"], 2,
         r"birthday ports must be 1\.\.1024, not 5000"),
        (["--rendezvous", "k", "--tracker", "udp://127.0.0.1:9", "--birthday-rate", "0"], 2,
         r"birthday rate must be positive"),
    ],
)
def test_bad_arguments(procs, args, status, pattern):
    """Bad flags, ports and hosts: a one-line message and a non-zero status,
    at once (no DNS is asked: these names are rejected before resolution)."""
    proc = procs.start(ucat(*args), "ucat", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.wait(QUICK) == status, proc.err()
    assert proc.popen.stdout.read() == b""
    _assert_one_line_error(proc, pattern)


def test_bind_address_in_use(procs):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = procs.start(ucat("-l", "-n", "-s", "127.0.0.1", "-p", port), "listener",
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        assert proc.wait(QUICK) == 1
    _assert_one_line_error(proc, r"already in use")


# --- connection failures ------------------------------------------------


def test_nothing_listening(procs):
    """A port where nothing listens: the ICMP port-unreachable makes it a
    refusal within a fraction of a second, reported in one line."""
    port = _free_udp_port()
    proc = procs.start(ucat("-n", "127.0.0.1", port), "connector",
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.wait(QUICK) == 1
    elapsed = time.monotonic() - proc.started
    line = _assert_one_line_error(proc, r"refused by 127\.0\.0\.1:%d" % port)
    print(f"\nnothing listening: {line!r} after {elapsed:.2f} s")
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_second_connection_refused(procs, tmp_path):
    """-l accepts one connection; a second connector is refused at once."""
    listener, port = procs.listener("127.0.0.1", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    first = procs.start(ucat("-n", "127.0.0.1", port), "first", stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL)
    procs.wait_for(listener, r"accepted a connection")
    second = procs.start(ucat("-n", "-w", "5", "127.0.0.1", port), "second",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    assert second.wait(QUICK) == 1
    elapsed = time.monotonic() - second.started
    _assert_one_line_error(second, r"refused")
    assert elapsed < 5, f"refusal took {elapsed:.1f} s"
    # The first connection is unharmed and ends cleanly.
    first.popen.stdin.write(b"still here\n")
    first.popen.stdin.close()
    listener.popen.stdin.close()
    assert first.wait(QUICK) == 0, first.err()
    assert listener.wait(QUICK) == 0, listener.err()


# --- transfers ----------------------------------------------------------


def test_64mib_both_ways(procs, tmp_path, record_property):
    """64 MiB each way at once: the listener reads a regular file and writes
    one; the connector reads a pipe and writes a pipe.  Both sides get the
    other's bytes exactly, and both exit 0."""
    to_connector = tmp_path / "to_connector"
    sha_to_connector = _random_file(to_connector, BIG)
    to_listener = os.urandom(BIG)
    sha_to_listener = hashlib.sha256(to_listener).hexdigest()
    listener_out = tmp_path / "listener.out"

    with to_connector.open("rb") as lin, listener_out.open("wb") as lout:
        listener, port = procs.listener("127.0.0.1", stdin=lin, stdout=lout)
    start = time.monotonic()
    connector = procs.start(ucat("-d", "-n", "127.0.0.1", port), "connector",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _feed(connector.popen.stdin, to_listener)
    received = _Digest(connector.popen.stdout)
    rc_c = connector.wait(TRANSFER_TIMEOUT)
    rc_l = listener.wait(TRANSFER_TIMEOUT)
    elapsed = time.monotonic() - start
    size, sha = received.result(30)

    assert rc_c == 0, connector.err()[-3000:]
    assert rc_l == 0, listener.err()[-3000:]
    assert size == BIG
    assert sha == sha_to_connector
    assert listener_out.stat().st_size == BIG
    assert _sha_file(listener_out) == sha_to_listener
    rate = 2 * BIG / elapsed / 1e6
    record_property("seconds", round(elapsed, 3))
    record_property("mb_per_s", round(rate, 1))
    print(f"\n64 MiB both ways: {elapsed:.2f} s, {rate:.1f} MB/s both directions together "
          f"(interpreter start-up included)")


def test_from_a_pipe(procs, tmp_path):
    """`cat file | ucat host port`: the pipe's bytes arrive; both exit 0."""
    data = tmp_path / "data"
    sha = _random_file(data, SMALL)
    out = tmp_path / "listener.out"
    with out.open("wb") as lout:
        listener, port = procs.listener("127.0.0.1", stdin=subprocess.DEVNULL, stdout=lout)
    command = f"cat {shlex.quote(str(data))} | exec {shlex.join(ucat('-n', '127.0.0.1', port))}"
    connector = procs.start(["sh", "-c", command], "connector", stdout=subprocess.PIPE)
    assert connector.wait(TRANSFER_TIMEOUT) == 0, connector.err()
    assert listener.wait(TRANSFER_TIMEOUT) == 0, listener.err()
    assert connector.popen.stdout.read() == b""
    assert _sha_file(out) == sha


def test_file_to_file(procs, tmp_path):
    """`ucat host port < file` into `ucat -l > file`."""
    data = tmp_path / "data"
    sha = _random_file(data, SMALL)
    out = tmp_path / "listener.out"
    with out.open("wb") as lout:
        listener, port = procs.listener("127.0.0.1", stdin=subprocess.DEVNULL, stdout=lout)
    with data.open("rb") as cin:
        connector = procs.start(ucat("-n", "127.0.0.1", port), "connector", stdin=cin,
                                stdout=subprocess.DEVNULL)
    assert connector.wait(TRANSFER_TIMEOUT) == 0, connector.err()
    assert listener.wait(TRANSFER_TIMEOUT) == 0, listener.err()
    assert out.stat().st_size == SMALL
    assert _sha_file(out) == sha


@pytest.mark.parametrize("connector_stdin", ["devnull", "closed"])
def test_listener_only_sends(procs, tmp_path, connector_stdin):
    """The listener sends a file; the connector sends nothing (its stdin is
    /dev/null, or closed) and writes what it gets to a regular file."""
    data = tmp_path / "data"
    sha = _random_file(data, SMALL)
    out = tmp_path / "connector.out"
    with data.open("rb") as lin:
        listener, port = procs.listener("127.0.0.1", stdin=lin, stdout=subprocess.PIPE)
    args = ucat("-n", "127.0.0.1", port)
    with out.open("wb") as cout:
        if connector_stdin == "devnull":
            connector = procs.start(args, "connector", stdin=subprocess.DEVNULL, stdout=cout)
        else:
            connector = procs.start(["sh", "-c", 'exec "$@" <&-', "sh", *args], "connector", stdout=cout)
    assert connector.wait(TRANSFER_TIMEOUT) == 0, connector.err()
    assert listener.wait(TRANSFER_TIMEOUT) == 0, listener.err()
    assert listener.popen.stdout.read() == b""
    assert out.stat().st_size == SMALL
    assert _sha_file(out) == sha


def test_both_ways_loopback(procs, tmp_path, host):
    """Both directions at once on IPv4 and IPv6 loopback, pipes on both sides."""
    a, b = os.urandom(SMALL), os.urandom(SMALL // 2)
    listener, port = procs.listener(host, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _feed(listener.popen.stdin, a)
    got_l = _Digest(listener.popen.stdout)
    connector = procs.start(ucat("-d", "-n", host, port), "connector", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    _feed(connector.popen.stdin, b)
    got_c = _Digest(connector.popen.stdout)
    assert connector.wait(TRANSFER_TIMEOUT) == 0, connector.err()
    assert listener.wait(TRANSFER_TIMEOUT) == 0, listener.err()
    assert got_c.result(30) == (len(a), hashlib.sha256(a).hexdigest())
    assert got_l.result(30) == (len(b), hashlib.sha256(b).hexdigest())
    expected = f"[{host}]" if ":" in host else host
    assert f"connected to {expected}:{port}" in connector.err()


def test_debug_reports_states_and_statistics(procs, tmp_path):
    """-d: timestamped state changes and, at the end, bytes, packets,
    retransmits and RTT."""
    listener, port = procs.listener("127.0.0.1", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    connector = procs.start(ucat("-d", "-n", "127.0.0.1", port), "connector", stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    _feed(connector.popen.stdin, b"x" * 100_000)
    assert connector.wait(TRANSFER_TIMEOUT) == 0, connector.err()
    assert listener.wait(TRANSFER_TIMEOUT) == 0, listener.err()
    text = connector.err()
    assert re.search(r"^ucat: \+\d+\.\d{3}s connected to 127\.0\.0\.1:%d" % port, text, re.M), text
    assert re.search(r"^ucat: \+\d+\.\d{3}s state: \w+", text, re.M), text
    assert "peer: EOF after 0 bytes" in text, text
    assert re.search(r"on the wire: payload bytes sent \d+ \(retransmissions included\), "
                     r"received \d+", text), text
    assert re.search(r"packets \(data and acks\): sent \d+, received \d+", text), text
    assert re.search(r"retransmits \d+", text), text
    assert re.search(r"rtt [\d.]+ ms", text), text
    # Each figure says what it counts (issue 13): read from stdin, and how
    # much of it the peer acknowledged (all of it, after a clean exit).
    assert "stdin: 100000 bytes read and queued for the peer, 100000 of them acknowledged" in text, text
    assert "stdout: 0 bytes received from the peer and written" in text, text


# --- one side goes away -----------------------------------------------------


def test_listener_killed_mid_transfer(procs, tmp_path):
    """kill -9 of the listener while the connector streams /dev/zero to it:
    the connector ends with one line and a non-zero status, in bounded time."""
    listener, port = procs.listener("127.0.0.1", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    with open("/dev/zero", "rb") as zero:
        connector = procs.start(ucat("-n", "127.0.0.1", port), "connector", stdin=zero,
                                stdout=subprocess.DEVNULL)
    procs.wait_for(listener, r"accepted a connection")
    time.sleep(0.5)
    assert connector.popen.poll() is None, connector.err()
    listener.popen.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    status = connector.wait(DEAD_PEER_TIMEOUT)
    elapsed = time.monotonic() - killed
    assert status == 1, connector.err()
    # ICMP port-unreachable makes it a reset at once; without ICMP (a
    # firewall eating it) the engine gives up after about 31 s.
    line = _assert_one_line_error(connector, r"127\.0\.0\.1:%d" % port)
    print(f"\nlistener killed: connector said {line!r} {elapsed:.1f} s later")


def test_idle_timeout(procs):
    """-w: no data either way for that long ends the connection with one line."""
    listener, port = procs.listener("127.0.0.1", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    connector = procs.start(ucat("-n", "-w", "1", "127.0.0.1", port), "connector",
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    procs.wait_for(listener, r"accepted a connection")
    assert connector.wait(QUICK) == 1
    _assert_one_line_error(connector, r"no data moved for 1 s")
    # The listener is not left waiting, nor fooled into a clean exit: the
    # connector gave up, so it resets the connection.
    assert listener.wait(QUICK) == 1, listener.err()
    _assert_one_line_error(listener, r"reset")


def test_ctrl_c(procs):
    """SIGINT mid-transfer: exit 130 quietly (no traceback, no error line),
    and the peer is told with a reset: it must not mistake the cut-off
    stream for a complete one and exit 0."""
    listener, port = procs.listener("127.0.0.1", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    with open("/dev/zero", "rb") as zero:
        connector = procs.start(ucat("-d", "-n", "127.0.0.1", port), "connector", stdin=zero,
                                stdout=subprocess.DEVNULL)
    procs.wait_for(connector, r"connected to")
    time.sleep(0.3)
    connector.popen.send_signal(signal.SIGINT)
    assert connector.wait(QUICK) == 130, connector.err()
    text = connector.err()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "internal error" not in text, text
    assert not re.search(r"^ucat: [^+]", text, re.M), text
    assert listener.wait(QUICK) == 1, listener.err()
    _assert_one_line_error(listener, r"reset")


def test_stdout_reader_goes_away(procs):
    """The reader of ucat's stdout exits (EPIPE): ucat exits quietly with 141."""
    with open("/dev/zero", "rb") as zero:
        listener, port = procs.listener("127.0.0.1", stdin=zero, stdout=subprocess.DEVNULL)
    connector = procs.start(ucat("-n", "127.0.0.1", port), "connector", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert len(connector.popen.stdout.read(65536)) > 0
    connector.popen.stdout.close()
    assert connector.wait(QUICK) == 141, connector.err()
    assert connector.err() == ""


def test_sigterm(procs):
    """SIGTERM: cleanup, then exit 143 quietly."""
    listener, port = procs.listener("127.0.0.1", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    connector = procs.start(ucat("-d", "-n", "127.0.0.1", port), "connector", stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    procs.wait_for(connector, r"connected to")
    connector.popen.terminate()
    assert connector.wait(QUICK) == 143, connector.err()
    assert "Traceback" not in connector.err()


def test_terminal(procs):
    """stdin and stdout on a terminal: typed lines go out, Ctrl-D ends them,
    the peer's data is shown, and the terminal is left in blocking mode."""
    listener, port = procs.listener("127.0.0.1", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    listener.popen.stdin.write(b"hello from the listener\n")
    listener.popen.stdin.close()
    master, slave = pty.openpty()
    try:
        connector = procs.start(ucat("-n", "127.0.0.1", port), "connector", stdin=slave, stdout=slave)
        shown = b""
        deadline = time.monotonic() + QUICK
        while b"hello from the listener" not in shown and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                shown += os.read(master, 4096)
        assert b"hello from the listener" in shown, (shown, connector.err())
        eof = termios.tcgetattr(slave)[6][termios.VEOF]
        os.write(master, b"typed line\n" + eof)
        assert connector.wait(QUICK) == 0, connector.err()
        assert listener.wait(QUICK) == 0, listener.err()
        assert listener.popen.stdout.read() == b"typed line\n"
        assert os.get_blocking(slave), "ucat left the terminal non-blocking"
    finally:
        os.close(master)
        os.close(slave)


def test_usage_errors_are_one_line():
    """An argparse error is one line like every other failure (the README
    promises that), with where to find the usage."""
    out = subprocess.run(ucat("-Z", "127.0.0.1", "4000"), capture_output=True, timeout=QUICK,
                         env=ENV, cwd="/")
    assert out.returncode == 2
    assert out.stderr == b"ucat: unrecognized arguments: -Z (see ucat -h)\n", out.stderr


def test_rendezvous_at_a_closed_tracker_port_names_the_tracker(procs):
    """Nothing listens where the tracker should be: the ICMP port
    unreachable ends ucat at once with a line that blames the tracker, not
    the peer, and never "internal error" (issue 13)."""
    port = _free_udp_port()
    proc = procs.start(ucat("--rendezvous", "k", "--tracker", f"udp://127.0.0.1:{port}", "-w", "20"),
                       "ucat", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    assert proc.wait(QUICK) == 1
    line = _assert_one_line_error(proc, r"tracker udp://127\.0\.0\.1:%d did not answer" % port)
    assert "ICMP port unreachable" in line
    assert time.monotonic() - proc.started < 15, "waited for the deadline instead of the ICMP"
