"""Progress on a terminal: ``bt download`` and ``bt daemon`` with their
stderr on a real pty draw rich progress bars (one per torrent) with the
event lines above them; the same commands without a terminal print plain
lines (tests/test_bt_cli_transfer.py checks those)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time

import trio

import bt
from testsupport import bt_content, console_script

PIECE = 32 * 1024
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _spawn_on_pty(argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """``argv`` with stderr (and stdin, stdout) on a new pty; returns the
    process and the pty's master end."""
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="160", LINES="40", TERM="xterm-256color")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd="/",
                            start_new_session=True)
    os.close(slave)
    return proc, master


def _read_until(master: int, pattern: bytes, timeout: float) -> bytes:
    """Everything the pty printed until ``pattern`` (escapes removed) shows."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        import select
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:           # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
            if re.search(pattern, ANSI.sub(b"", out)):
                return out
    raise AssertionError(f"no {pattern!r} on the terminal within {timeout} s:\n"
                         f"{ANSI.sub(b'', out).decode(errors='replace')[-2000:]}")


async def test_bt_download_draws_a_rich_bar_on_a_terminal(tmp_path):
    bt_exe = console_script("bt")
    src, names, data = bt_content(tmp_path, (600_000, 300_000), seed=12, piece_length=PIECE)
    torrent = tmp_path / "x.torrent"
    torrent.write_bytes(data)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as seed:
        await seed.add_torrent(data)
        proc, master = _spawn_on_pty([str(bt_exe), "download", str(torrent), "-d",
                                      str(tmp_path / "dl"), "--bind", "127.0.0.1",
                                      "--peer", f"127.0.0.1:{seed.port}",
                                      "--max-download-rate", "300K"])
        try:
            out = await trio.to_thread.run_sync(_read_until, master, rb"complete, every piece", 60)
            assert await trio.to_thread.run_sync(proc.wait, 30) == 0
        finally:
            proc.kill()
            os.close(master)
    text = ANSI.sub(b"", out).decode(errors="replace")
    # rich's bar (heavy horizontal lines), the torrent's name, a percentage
    # and our status text, redrawn in place with cursor movements
    assert "━" in text and "content" in text and "100.0%" in text, text[-2000:]
    assert re.search(r"peers \d+ \(\d+ uTP\)", text), text[-2000:]
    assert b"\x1b[" in out                      # drawn with escapes, not plain lines
    assert "] start: content" in text           # the event line, above the bar


async def test_bt_daemon_draws_a_bar_per_download_on_a_terminal(tmp_path):
    bt_exe = console_script("bt")
    _, _, a = bt_content(tmp_path / "a", (200_000,), name="alpha", seed=13, piece_length=PIECE)
    _, _, b = bt_content(tmp_path / "b", (100_000,), name="beta", seed=14, piece_length=PIECE)
    (tmp_path / "a.torrent").write_bytes(a)
    (tmp_path / "b.torrent").write_bytes(b)
    session_file = tmp_path / "session.txt"
    session_file.write_text(f"{tmp_path / 'a.torrent'}\n{tmp_path / 'b.torrent'}\n")
    proc, master = _spawn_on_pty([str(bt_exe), "daemon", "-d", str(tmp_path / "dl"),
                                  "--bind", "127.0.0.1", "--rpc-listen", "127.0.0.1:0",
                                  "--input-file", str(session_file)])
    try:
        bars = "(alpha\\s+━(.|\n)*beta\\s+━|beta\\s+━(.|\n)*alpha\\s+━)".encode()
        out = await trio.to_thread.run_sync(_read_until, master, b"JSON-RPC on(.|\n)*" + bars, 60)
    finally:
        proc.terminate()
        await trio.to_thread.run_sync(proc.wait, 30)
        os.close(master)
    text = ANSI.sub(b"", out).decode(errors="replace")
    assert "━" in text and "JSON-RPC on" in text, text[-2000:]
    assert re.search(r"alpha\s+━+.*%", text) and re.search(r"beta\s+━+.*%", text), text[-2000:]
