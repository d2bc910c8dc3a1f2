"""Helpers shared by several test files.

Tests run with ``--import-mode=importlib`` against the installed wheel, so
they cannot import each other; tests/conftest.py registers this file as the
module ``testsupport`` before any test module is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent


def unavailable(reason: str, fix: str = ".ci/run installs what the tests need") -> None:
    """A capability this test needs is missing (a tool, a package, root,
    network namespaces).  Skip with `reason` on a developer machine; under
    CI=true a missing capability is a broken machine, so fail instead."""
    if not reason.strip():
        raise ValueError("unavailable() needs the missing capability as its reason")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: {fix})")
    pytest.skip(f"missing capability: {reason} (to run it: {fix})")


def require_libtorrent() -> ModuleType:
    """The libtorrent module (PyPI wheel); skips the test without it (fails
    under CI=true)."""
    try:
        import libtorrent
    except ImportError as exc:
        unavailable(f"libtorrent is not importable ({exc}); pip install libtorrent",
                    "libtorrent is in the test extra; .ci/run installs it")
    return libtorrent


def require_no_inplace_extension() -> None:
    """Tests of what a fresh clone does need a checkout whose utp/ has no
    compiled module; a developer's `pip install -e` builds one in place."""
    built = sorted(p.name for p in (ROOT / "utp").glob("_utp*.so"))
    if built:
        unavailable(f"needs a checkout without an in-place built extension; found utp/{built[0]} "
                    f"(from pip install -e)", "CI runs on a fresh clone, which has none")


def console_script(name: str) -> Path:
    """The `name` entry point of an installed utpkit, next to the running
    interpreter or on PATH; skips the test in a plain checkout, where no
    console script exists (ci/test.sh always installs the wheel, so under
    CI=true a missing script fails)."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return script
    found = shutil.which(name)
    if found is None:
        unavailable(f"utpkit is not installed: no {name} console script",
                    "ci/test.sh installs the wheel into a venv")
    return Path(found)


def load_natlab() -> ModuleType:
    """ci/natlab from the checkout, as the module ``natlab`` (it is a tool,
    not part of the wheel)."""
    if "natlab" in sys.modules:
        return sys.modules["natlab"]
    where = ROOT / "ci" / "natlab"
    spec = importlib.util.spec_from_file_location("natlab", where / "__init__.py",
                                                  submodule_search_locations=[str(where)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["natlab"] = module
    spec.loader.exec_module(module)
    return module


async def exchange(sa, sb, size: int = 100_000) -> None:
    """Send `size` bytes and EOF from sa to sb; check they all arrived."""
    data = bytes(range(256)) * (size // 256)
    got = bytearray()

    async def send():
        await sa.send_all(data)
        await sa.send_eof()

    async def recv():
        while True:
            chunk = await sb.receive_some()
            if not chunk:
                break
            got.extend(chunk)

    async with trio.open_nursery() as n:
        n.start_soon(send)
        n.start_soon(recv)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


# ---- opentracker (Debian) ---------------------------------------------------------------


def free_udp_tcp_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP right now
    (opentracker serves UDP and HTTP announces on one port number)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_udp_tcp_port()
    return port


@contextlib.contextmanager
def opentracker(hashes):
    """opentracker on 127.0.0.1 (UDP and HTTP on one port) with ``hashes``
    (20-byte infohashes) on its whitelist; yields ``(ip, port)`` once it
    answers a BEP 15 connect and has loaded the whitelist.  Skips (fails
    under CI) without the Debian package."""
    import socket
    import struct
    import subprocess
    import tempfile
    import time
    exe = shutil.which("opentracker")
    if exe is None:
        unavailable("opentracker is not installed (apt-get install opentracker)",
                    ".ci/run installs the Debian package opentracker")
    d = tempfile.mkdtemp(prefix="utpkit-opentracker-")
    os.chmod(d, 0o755)  # it drops to nobody, who must read the whitelist
    with open(os.path.join(d, "whitelist.txt"), "w") as f:
        f.write("".join(h.hex() + "\n" for h in hashes))
    os.chmod(os.path.join(d, "whitelist.txt"), 0o644)
    port = free_udp_tcp_port()
    cmd = [exe, "-i", "127.0.0.1", "-p", str(port), "-P", str(port), "-d", d, "-w", "/whitelist.txt"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Ready once a connect is answered and the whitelist is loaded
        # (it loads it in a thread after starting).
        deadline = time.monotonic() + 10
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    s.sendto(struct.pack(">QII", 0x41727101980, 0, 1), ("127.0.0.1", port))
                    s.recvfrom(64)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("opentracker did not answer") from None
        time.sleep(0.3)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)


# ---- BitTorrent content -----------------------------------------------------------------


def bt_content(root: Path, sizes, *, name: str = "content", seed: int = 1,
               piece_length: int = 32768, pad_files: bool = True):
    """A multi-file directory ``root/src/NAME`` (every other file in a
    subdirectory; a size of 0 makes an empty file) and its torrent bytes.
    Returns (directory, relative file paths, torrent bytes)."""
    import random

    from bt.create import create_torrent
    rng = random.Random(seed)
    src = root / "src" / name
    (src / "sub").mkdir(parents=True)
    names = []
    for n, size in enumerate(sizes):
        p = src / ("sub" if n % 2 else ".") / f"file{n}.bin"
        p.write_bytes(rng.randbytes(size))
        names.append(p.relative_to(src))
    return src, names, create_torrent(src, piece_length=piece_length, pad_files=pad_files)


def lt_add_torrent(lt: ModuleType, ses, data: bytes, save_path):
    """Add the torrent ``data`` (bencoded bytes) to libtorrent session
    ``ses``, its files under ``save_path``; the handle."""
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))
    atp.save_path = str(save_path)
    return ses.add_torrent(atp)


def sha256_files(base: Path, names) -> dict[str, str]:
    """sha256 of each named file under ``base``."""
    return {str(n): hashlib.sha256((base / n).read_bytes()).hexdigest() for n in names}


async def clog(stream, *, quiet: float = 1.0) -> None:
    """Fill `stream` until send_all blocks, then cancel that send_all (as
    trio's own socket tests build their clogged streams).  "Blocks" means no
    progress for `quiet` seconds (real or virtual time), so packets still in
    flight have filled the peer's receive window by then."""
    chunk = b"x" * 65536
    while True:
        with trio.move_on_after(quiet) as scope:
            await stream.send_all(chunk)
        if scope.cancelled_caught:
            return


def clogged(maker, *, quiet: float = 1.0):
    """A clogged-stream maker for trio.testing.check_*_stream from a maker
    of connected (a, b) pairs: both directions are clogged (see clog)."""
    async def make():
        a, b = await maker()
        await clog(a, quiet=quiet)
        await clog(b, quiet=quiet)
        return a, b
    return make


def have_ipv6_loopback() -> bool:
    """Whether this machine can bind UDP on ::1 (tests over IPv6 need it)."""
    import socket
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class ScriptedPeer:
    """One connection of a peer that a test scripts, over a real stream to
    one of our sessions: a PeerWire core parses what our session sends
    (so its messages are checked too) and hands each event to
    :meth:`on_event`; the test writes what it sends, valid or not."""

    def __init__(self, stream, meta) -> None:
        from bt.peerwire import PeerWire
        from bt.wire import Geometry
        import trio
        self.stream = stream
        self.meta = meta
        self.geometry = Geometry(meta.total_length, meta.piece_length)
        self.core = PeerWire(now=trio.current_time(), geometry=self.geometry)
        self.closed = False

    def on_event(self, ev) -> None:
        """An event from our session (override to collect what matters)."""

    async def flush(self) -> None:
        out = self.core.data_to_send()
        if out:
            await self.stream.send_all(out)

    async def pump(self) -> None:
        """Read once and hand over what our session sent."""
        import trio
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self.closed = True
            return
        self.core.receive_data(data, trio.current_time())
        while (ev := self.core.next_event()) is not None:
            self.on_event(ev)


class BtDaemon:
    """`bt daemon ARGS` as a subprocess with its RPC on an ephemeral
    loopback port: ``rpc_port`` and ``peer_port`` are parsed from its
    first line, every stderr line is kept in ``lines`` (a thread drains
    the pipe).  A context manager: leaving it stops the daemon (SIGTERM,
    then SIGKILL after 10 s)."""

    def __init__(self, *args: str, timeout: float = 30.0) -> None:
        import re
        import subprocess
        import threading
        import time
        cmd = [str(console_script("bt")), "daemon", "--rpc-listen", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd="/")
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        first = re.compile(r"peers on port (\d+); JSON-RPC on http://127\.0\.0\.1:(\d+)/jsonrpc")
        assert self.proc.stderr is not None
        while True:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"bt daemon did not start: {self.lines + [line]}")
            self.lines.append(line.rstrip("\n"))
            m = first.search(line)
            if m:
                self.peer_port, self.rpc_port = int(m.group(1)), int(m.group(2))
                break
        self.url = f"http://127.0.0.1:{self.rpc_port}/jsonrpc"

        def drain() -> None:
            for line in self.proc.stderr:            # type: ignore[union-attr]
                self.lines.append(line.rstrip("\n"))
        threading.Thread(target=drain, daemon=True).start()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def __enter__(self) -> "BtDaemon":
        return self

    def __exit__(self, *exc: object) -> None:
        from bt.bench import stop_process
        stop_process(self.proc)


def wait_until(what: str, cond, timeout: float = 30.0, *, log: list[str] | None = None,
               ignore: tuple[type[BaseException], ...] = ()):
    """Poll ``cond()`` every 0.1 s (blocking: for synchronous tests driving
    a subprocess) until it returns something true, and return that.  An
    exception in ``ignore`` counts as "not yet".  AssertionError naming
    ``what`` (and the last lines of ``log``) after ``timeout`` seconds."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "\n".join((log or [])[-15:])
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{tail}")
        time.sleep(0.1)

