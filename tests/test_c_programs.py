"""Two real uncat processes (tests/c/uncat.c, a plain libutp program built
against utp/core's libutp.a) talking uTP over the loopback interface.

These need only the C sources in the repository and a C toolchain, not the
installed Python package.  Every subprocess is bounded by a timeout; traffic
goes to 127.0.0.1 or ::1 only.
"""

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from testsupport import unavailable, have_ipv6_loopback

REPO = Path(__file__).resolve().parent.parent
C_DIR = REPO / "tests" / "c"
UNCAT = C_DIR / "build" / "uncat"

SIZE = 4 * 1024 * 1024
BUILD_TIMEOUT = 600
TRANSFER_TIMEOUT = 120
LISTEN_TIMEOUT = 15


def _unavailable(reason):
    unavailable(reason, ".ci/run installs the C toolchain")


@pytest.fixture(scope="module")
def uncat():
    """Path of the uncat binary, built with `make -C tests/c uncat`."""
    if not (C_DIR / "Makefile").is_file():
        _unavailable("tests/c is not in this checkout")
    if shutil.which("make") is None:
        _unavailable("make is not installed")
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "cc", "gcc", "clang")):
        _unavailable("no C compiler (cc, gcc or clang) is installed")
    try:
        build = subprocess.run(
            ["make", "-C", str(C_DIR), "uncat"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"make -C tests/c uncat took more than {BUILD_TIMEOUT} s")
    if build.returncode != 0:
        pytest.fail("make -C tests/c uncat failed:\n" + build.stdout.decode(errors="replace"))
    assert UNCAT.is_file()
    return UNCAT


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def host(request):
    if request.param == "::1" and not have_ipv6_loopback():
        unavailable("no IPv6 loopback (::1) on this machine", "CI needs ::1 on lo")
    return request.param


class Procs:
    """Started processes, killed at teardown whatever happened."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        proc = subprocess.Popen([str(a) for a in args], **kw)
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def _feed(proc, data):
    """Write data into proc's stdin from a thread (a real pipe), then close it."""

    def run():
        try:
            proc.stdin.write(data)
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _start_listener(procs, uncat, host, tmp_path, stdin_data):
    """Start `uncat -d -l` on host, port 0; return (proc, port, stdout, stderr paths)."""
    out = tmp_path / "listener.out"
    err = tmp_path / "listener.err"
    proc = procs.start(
        [uncat, "-d", "-n", "-l", "-s", host, "-p", "0"],
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=out.open("wb"),
        stderr=err.open("wb"),
    )
    marker = f"listening on {host} port "
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while time.monotonic() < deadline:
        text = err.read_text(errors="replace")
        for line in text.splitlines():
            if marker in line:
                port = int(line.split(marker, 1)[1].split()[0])
                if stdin_data is not None:
                    _feed(proc, stdin_data)
                return proc, port, out, err
        if proc.poll() is not None:
            pytest.fail(f"listener exited with {proc.returncode}:\n{text}")
        time.sleep(0.02)
    pytest.fail(f"listener did not report its port in {LISTEN_TIMEOUT} s:\n"
                + err.read_text(errors="replace"))


def _wait(proc, name, err_path):
    try:
        return proc.wait(timeout=TRANSFER_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        tail = err_path.read_text(errors="replace")[-3000:]
        pytest.fail(f"{name} did not finish in {TRANSFER_TIMEOUT} s; stderr tail:\n{tail}")


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_transfer_one_way(uncat, host, procs, tmp_path):
    """4 MiB from a pipe into the connecting uncat arrive intact at the listener."""
    data = os.urandom(SIZE)
    listener, port, l_out, l_err = _start_listener(procs, uncat, host, tmp_path, None)
    c_out = tmp_path / "client.out"
    c_err = tmp_path / "client.err"
    client = procs.start(
        [uncat, "-d", "-n", host, port],
        stdin=subprocess.PIPE,
        stdout=c_out.open("wb"),
        stderr=c_err.open("wb"),
    )
    _feed(client, data)
    rc_c = _wait(client, "client", c_err)
    rc_l = _wait(listener, "listener", l_err)
    received = l_out.read_bytes()
    assert len(received) == SIZE, (len(received), l_err.read_text(errors="replace")[-2000:])
    assert _sha(received) == _sha(data)
    assert c_out.read_bytes() == b""
    assert rc_c == 0, c_err.read_text(errors="replace")[-2000:]
    assert rc_l == 0, l_err.read_text(errors="replace")[-2000:]


def test_transfer_both_ways(uncat, host, procs, tmp_path):
    """4 MiB each way at the same time; both sides exit 0 with the other's bytes."""
    to_listener = os.urandom(SIZE)
    to_client = os.urandom(SIZE)
    listener, port, l_out, l_err = _start_listener(procs, uncat, host, tmp_path, to_client)
    c_out = tmp_path / "client.out"
    c_err = tmp_path / "client.err"
    client = procs.start(
        [uncat, "-d", "-n", host, port],
        stdin=subprocess.PIPE,
        stdout=c_out.open("wb"),
        stderr=c_err.open("wb"),
    )
    _feed(client, to_listener)
    rc_c = _wait(client, "client", c_err)
    rc_l = _wait(listener, "listener", l_err)
    got_l = l_out.read_bytes()
    got_c = c_out.read_bytes()
    assert len(got_l) == SIZE and _sha(got_l) == _sha(to_listener), len(got_l)
    assert len(got_c) == SIZE and _sha(got_c) == _sha(to_client), len(got_c)
    assert rc_c == 0, c_err.read_text(errors="replace")[-2000:]
    assert rc_l == 0, l_err.read_text(errors="replace")[-2000:]


def _closed_udp_port(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_connect_to_closed_port_fails(uncat, host, procs, tmp_path):
    """Nobody listens: uncat exits non-zero and says why (refused or timed out)."""
    port = _closed_udp_port(host)
    err = tmp_path / "client.err"
    client = procs.start(
        [uncat, "-n", host, port],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=err.open("wb"),
    )
    _feed(client, b"nobody is listening\n")
    # Refusal comes from the ICMP port unreachable at once; without ICMP the
    # SYN retransmissions time out in about 15 s.
    rc = _wait(client, "client", err)
    message = err.read_text(errors="replace")
    assert rc != 0
    assert "connection error:" in message, message
