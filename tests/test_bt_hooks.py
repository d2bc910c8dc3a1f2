"""Hook commands (bt.hooks) on real sessions over loopback: each of
aria2's six hooks runs with aria2's arguments (a small script writes its
argv to a file), the stop command stands in for complete and error, and
a failing, a missing and a hanging hook neither stop nor slow the
session (the hanging one is terminated at its timeout, and logged)."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import trio

import bt
from bt.events import EventKind
from bt.hooks import Hooks
from testsupport import bt_content

PIECE = 32 * 1024
SIZES = (300_000, 0, 170_001, 123_456)


async def _until(pred, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _recording_hooks(tmp_path, kinds) -> tuple[dict[EventKind, str], object]:
    """One script per kind, each appending ``argc|arg1|arg2|arg3`` to
    out/KIND; returns the commands and a reader of the calls so far."""
    out = tmp_path / "out"
    out.mkdir()
    commands = {}
    for kind in kinds:
        commands[kind] = _script(tmp_path / f"hook-{kind.value}",
                                 f"printf '%s|%s|%s|%s\\n' \"$#\" \"$1\" \"$2\" \"$3\" >> "
                                 f"'{out}/{kind.value}'")

    def calls(kind: EventKind) -> list[list[str]]:
        f = out / kind.value
        return [line.split("|") for line in f.read_text().splitlines()] if f.exists() else []
    return commands, calls


async def test_each_hook_runs_with_aria2s_arguments(tmp_path):
    _, _, data = bt_content(tmp_path, SIZES, seed=6, piece_length=PIECE)
    commands, calls = _recording_hooks(tmp_path, list(EventKind))
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                            download_limit=300_000) as ls:
        Hooks(commands).install(ls)
        await s.add_torrent(data)
        t = await ls.add_torrent(data)
        # 4 files (the empty one counts, BEP 47 pad files do not); the first
        # file's path is the save directory joined with the torrent's path
        args = ["3", t.gid, "4", str(tmp_path / "dl" / "content" / "file0.bin")]
        await _until(lambda: calls(EventKind.START) == [args])
        t.add_peer(("127.0.0.1", s.port))
        await _until(lambda: t.status().pieces_have >= 2)
        await t.pause()
        await _until(lambda: calls(EventKind.PAUSE) == [args])
        await t.resume()
        await _until(lambda: len(calls(EventKind.START)) == 2)
        with trio.fail_after(60):
            await t.wait_finished()
        await _until(lambda: calls(EventKind.BT_COMPLETE) == [args])
        await ls.remove_torrent(t)
        await _until(lambda: calls(EventKind.COMPLETE) == [args])
        assert calls(EventKind.START) == [args, args]
        # a second download stopped before it has its data: the stop hook
        _, _, one = bt_content(tmp_path / "one", (50_000,), name="single", seed=7)
        t2 = await ls.add_torrent(one)
        await ls.remove_torrent(t2)
        await _until(lambda: len(calls(EventKind.STOP)) == 1)
        assert calls(EventKind.STOP)[0][1] == t2.gid and calls(EventKind.ERROR) == []
        await _until(lambda: [c[1] for c in calls(EventKind.START)] == [t.gid, t.gid, t2.gid])
    assert ls.counters["hooks.ok"] == 7 and "hooks.failed" not in ls.counters


async def test_the_stop_hook_stands_in_for_complete_and_error(tmp_path):
    """aria2's executeStopHook: without --on-download-complete or
    --on-download-error, the --on-download-stop command runs for them;
    a single-file torrent gives 1 and DIR/NAME."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "single.bin").write_bytes(os.urandom(70_000))
    data = bt.create_torrent(src / "single.bin", piece_length=PIECE)
    commands, calls = _recording_hooks(tmp_path, [EventKind.STOP])
    async with bt.open_session(download_dir=src, host="127.0.0.1") as s:
        Hooks({EventKind.STOP: commands[EventKind.STOP]}).install(s)
        t = await s.add_torrent(data)               # complete: seeding
        await s.remove_torrent(t)                   # -> complete -> the stop command
        await _until(lambda: calls(EventKind.STOP) == [["3", t.gid, "1",
                                                        str(src / "single.bin")]])
    hooks = Hooks({"stop": "/x/stop", "complete": "/x/done", "start": None})
    assert hooks.command_for(EventKind.COMPLETE) == "/x/done"
    assert hooks.command_for(EventKind.ERROR) == "/x/stop"
    assert hooks.command_for(EventKind.START) is None
    assert hooks.command_for(EventKind.PAUSE) is None
    with pytest.raises(ValueError):
        Hooks({"finish": "/x"})
    with pytest.raises(ValueError, match="timeout"):
        Hooks({}, timeout=0)


async def test_failing_missing_and_hanging_hooks_do_not_stop_the_session(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bt.hooks")
    _, _, data = bt_content(tmp_path, SIZES, seed=8, piece_length=PIECE)
    pidfile = tmp_path / "hang.pid"
    hang = _script(tmp_path / "hang", f"echo $$ > '{pidfile}'\nexec sleep 120")
    fail = _script(tmp_path / "fail", "exit 3")
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
        Hooks({EventKind.START: hang, EventKind.BT_COMPLETE: fail,
               EventKind.COMPLETE: str(tmp_path / "no-such-hook")}, timeout=2.0).install(ls)
        await s.add_torrent(data)
        t = await ls.add_torrent(data)
        t.add_peer(("127.0.0.1", s.port))
        await _until(lambda: pidfile.exists() and pidfile.read_text().strip())
        pid = int(pidfile.read_text())
        with trio.fail_after(60):
            await t.wait_finished()     # while the start hook hangs
        await _until(lambda: ls.counters["hooks.timeout"] == 1)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)             # terminated and reaped
        await _until(lambda: ls.counters["hooks.failed"] == 1)
        await ls.remove_torrent(t)      # complete: a command that does not exist
        await _until(lambda: ls.counters["hooks.failed"] == 2)
        assert t.status().pieces_have == t.meta.num_pieces
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"hook on-download-start {hang!r} for {t.gid} was still running after 2 s: " \
           f"terminated" in text
    assert f"hook on-bt-download-complete {fail!r} for {t.gid} exited with status 3" in text
    assert "hook on-download-complete" in text and "could not start" in text


def test_bt_seed_runs_hooks_and_logs_events(tmp_path):
    """``bt seed`` with hook options: start and bt-complete as it starts
    seeding, complete when SIGINT ends the seeding (aria2: the download
    finished), each event a ``[GID] KIND: NAME`` line, a failing hook's
    status on its own line; the argument errors are usage errors."""
    import re
    import signal
    import subprocess
    import sys
    src, _, data = bt_content(tmp_path, (100_000, 5_000), seed=3, piece_length=PIECE)
    torrent = tmp_path / "c.torrent"
    torrent.write_bytes(data)
    commands, calls = _recording_hooks(tmp_path, [EventKind.START, EventKind.COMPLETE])
    fail = _script(tmp_path / "fail", "exit 7")
    base = [sys.executable, "-m", "bt", "seed", str(torrent), "-d", str(src.parent),
            "--bind", "127.0.0.1", "--status-interval", "60"]
    proc = subprocess.Popen(
        base + ["--on-download-start", commands[EventKind.START],
                "--on-download-complete", commands[EventKind.COMPLETE],
                "--on-bt-download-complete", fail, "--hook-timeout", "5"],
        stderr=subprocess.PIPE, text=True, cwd="/",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "listening on port" in proc.stderr.readline()
        start = proc.stderr.readline()
        m = re.fullmatch(r"\[([0-9a-f]{16})\] start: content\n", start)
        assert m, start
        gid = m.group(1)
        assert proc.stderr.readline() == f"[{gid}] bt-complete: content\n"
        want = f"bt seed: hook on-bt-download-complete {fail!r} for {gid} " \
               f"exited with status 7\n"
        started = f"bt seed: hook on-download-start {commands[EventKind.START]!r} for {gid} " \
                  f"exited with status 0\n"
        lines: list[str] = []           # progress lines too
        while not {want, started} <= set(lines) and len(lines) < 10:
            lines.append(proc.stderr.readline())
        assert want in lines and started in lines, lines
        first = str(src / "file0.bin")
        assert calls(EventKind.START) == [["3", gid, "2", first]]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"[{gid}] complete: content\n" in err and err.rstrip().endswith("bt seed: interrupted")
    assert calls(EventKind.COMPLETE) == [["3", gid, "2", first]]
    for bad in ("0", "-1", "soon", "inf"):
        r = subprocess.run(base + ["--hook-timeout", bad], capture_output=True, text=True,
                           timeout=30, cwd="/")
        assert r.returncode == 2 and "expected a number of seconds > 0" in r.stderr, r.stderr
