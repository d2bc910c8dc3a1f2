"""``bt seed`` and ``bt download`` as processes: a seed and a leecher on
loopback (uTP only, and TCP only), exit statuses, the progress lines on a
non-terminal stderr, SIGINT, and one-line errors."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from bt.create import create_torrent, write_torrent

TIMEOUT = 60


def _reset_sigint() -> None:
    # a shell's background job starts with SIGINT ignored, and so would we
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def bt_popen(*args):
    return subprocess.Popen([sys.executable, "-m", "bt", *map(str, args)], cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_reset_sigint)


def bt_run(*args):
    return subprocess.run([sys.executable, "-m", "bt", *map(str, args)], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd="/")


@pytest.fixture
def content(tmp_path):
    rng = random.Random(5)
    src = tmp_path / "src" / "stuff"
    (src / "in").mkdir(parents=True)
    (src / "a.bin").write_bytes(rng.randbytes(700_000))
    (src / "in" / "b.bin").write_bytes(rng.randbytes(33_333))
    torrent = tmp_path / "stuff.torrent"
    write_torrent(create_torrent(src, piece_length=32768), torrent)
    return src, torrent


def _check_download(r, dl, src) -> None:
    """``bt download`` said it completed and its files equal the seed's."""
    assert "complete, every piece verified" in r.stderr
    for rel in ("a.bin", "in/b.bin"):
        assert (dl / "stuff" / rel).read_bytes() == (src / rel).read_bytes()


def _listening_port(proc) -> tuple[int, str]:
    line = proc.stderr.readline()
    m = re.search(r"listening on port (\d+)", line)
    assert m, f"no port in {line!r}"
    return int(m.group(1)), line


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["--no-tcp", "--no-utp"])
def test_seed_then_download_between_processes(tmp_path, content, transport):
    src, torrent = content
    seed = bt_popen("seed", torrent, "-d", src.parent, "--bind", "127.0.0.1", transport,
                    "--status-interval", "0.5")
    try:
        port, first = _listening_port(seed)
        assert first.startswith("stuff: 23/23 pieces (716.1 KiB of 716.1 KiB) already here")
        r = bt_run("download", torrent, "-d", tmp_path / "dl", "--bind", "127.0.0.1",
                   "--peer", f"127.0.0.1:{port}", transport, "--status-interval", "0.2")
        assert r.returncode == 0, r.stderr
        assert "complete, every piece verified" in r.stderr
        assert "\r" not in r.stderr and "downloading" in r.stderr    # plain lines, not a bar
        lines = r.stderr.splitlines()
        done = lines.index("stuff: complete, every piece verified")
        final = lines[done - 1]                    # the line forced out at completion
        # the download's events, one line each: started after the first line,
        # its data complete (before the line above), ended as it exits
        gid = re.fullmatch(r"\[([0-9a-f]{16})\] start: stuff", lines[1]).group(1)
        assert f"[{gid}] bt-complete: stuff" in lines[2:done - 1]
        assert lines[done + 1:] == [f"[{gid}] complete: stuff"]
        utp = 1 if transport == "--no-tcp" else 0
        assert final.startswith("seeding 100.0%") and f"peers 1 ({utp} uTP)" in final, final
        for rel in ("a.bin", "in/b.bin"):
            assert (tmp_path / "dl" / "stuff" / rel).read_bytes() == (src / rel).read_bytes()
        seed.send_signal(signal.SIGINT)
        out, err = seed.communicate(timeout=TIMEOUT)
        assert seed.returncode == 0, err           # complete data, interrupted: success
        assert err.rstrip().endswith("bt seed: interrupted")
    finally:
        if seed.poll() is None:
            seed.kill()
            seed.wait()


def test_download_errors_are_one_line(tmp_path, content):
    _, torrent = content
    r = bt_run("download", tmp_path / "missing.torrent", "-d", tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    bad = tmp_path / "bad.torrent"
    bad.write_bytes(b"d4:infod6:lengthi5eee")
    r = bt_run("download", bad, "-d", tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"bt download: {bad}: ") and "info." in r.stderr
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    r = bt_run("download", torrent, "-d", blocker / "sub")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(blocker) in r.stderr
    r = bt_run("download", torrent, "-d", tmp_path, "--no-utp", "--no-tcp")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    assert not os.path.exists(tmp_path / "stuff")


@pytest.mark.slow
def test_seed_and_download_meet_through_a_tracker(tmp_path, content):
    """No --peer: the seed announces to opentracker over UDP and the
    leecher over HTTP (both added with --tracker to a torrent that has
    none); the leecher finds the seed there and completes."""
    from bt.metainfo import load_metainfo
    from testsupport import opentracker
    src, torrent = content
    with opentracker([load_metainfo(torrent).info_hash]) as (ip, port):
        seed = bt_popen("seed", torrent, "-d", src.parent, "--bind", "127.0.0.1",
                        "--tracker", f"udp://{ip}:{port}", "--status-interval", "0.5")
        try:
            _listening_port(seed)
            want = f"tracker udp://{ip}:{port}: working, 1 peers\n"
            lines: list[str] = []
            while want not in lines and len(lines) < 20:    # a progress line each 0.5 s
                lines.append(seed.stderr.readline())
            assert want in lines, lines
            r = bt_run("download", torrent, "-d", tmp_path / "dl", "--bind", "127.0.0.1",
                       "--tracker", f"http://{ip}:{port}/announce", "--status-interval", "0.2")
            assert r.returncode == 0, r.stderr
            assert f"tracker http://{ip}:{port}/announce: working, 2 peers" in r.stderr
            _check_download(r, tmp_path / "dl", src)
        finally:
            seed.kill()
            seed.wait()
def test_rate_options_parse_and_reject_bad_values(tmp_path, content):
    from bt._cli_run import parse_rate
    assert [parse_rate(t) for t in ("65536", "500K", "1.5M", "2MiB/s", "1g", "0", "64kB/s")] == \
        [65536, 512_000, 1_572_864, 2 * 1024 ** 2, 1024 ** 3, 0, 65536]
    _, torrent = content
    for bad in ("fast", "-1M", "1T", "1e6", ""):
        r = bt_run("download", torrent, "-d", tmp_path, f"--max-download-rate={bad}")
        assert r.returncode == 2, (bad, r.stderr)
        assert f"expected a rate in bytes/s such as 65536, 500K or 1.5M (0: unlimited), " \
               f"not {bad!r}" in r.stderr, r.stderr


@pytest.mark.slow
def test_seed_upload_limit_slows_the_download(tmp_path, content):
    """``bt seed --max-upload-rate 256K``: the 716 KiB take at least the
    2.8 s the limit allows, less the bucket's 0.1 s burst and 15%."""
    import time
    src, torrent = content
    seed = bt_popen("seed", torrent, "-d", src.parent, "--bind", "127.0.0.1",
                    "--max-upload-rate", "256K")
    try:
        port, _ = _listening_port(seed)
        start = time.monotonic()
        r = bt_run("download", torrent, "-d", tmp_path / "dl", "--bind", "127.0.0.1",
                   "--peer", f"127.0.0.1:{port}", "--max-download-rate", "10M")
        elapsed = time.monotonic() - start
        assert r.returncode == 0, r.stderr
        assert elapsed >= 0.85 * (716.1 - 25.6) / 256, elapsed
    finally:
        seed.send_signal(signal.SIGINT)
        seed.communicate(timeout=TIMEOUT)


@pytest.mark.slow
def test_encryption_option(tmp_path, content):
    """``--encryption required`` on both processes: the download completes
    (over MSE with RC4: tests/test_bt_encryption.py checks the method); a
    ``--encryption disabled`` leecher gets nothing from that seed; an
    unknown policy is a usage error."""
    src, torrent = content
    r = bt_run("download", torrent, "-d", tmp_path, "--encryption", "sometimes")
    assert r.returncode == 2 and "--encryption" in r.stderr, r.stderr
    seed = bt_popen("seed", torrent, "-d", src.parent, "--bind", "127.0.0.1",
                    "--encryption", "required", "--status-interval", "0.5")
    try:
        port, _ = _listening_port(seed)
        plain = bt_popen("download", torrent, "-d", tmp_path / "plain", "--bind", "127.0.0.1",
                         "--peer", f"127.0.0.1:{port}", "--encryption", "disabled",
                         "--status-interval", "0.5")
        time.sleep(3)
        plain.send_signal(signal.SIGINT)
        _, err = plain.communicate(timeout=TIMEOUT)
        assert plain.returncode != 0 and "downloading   0.0%" in err and "peers 0" in err, err
        assert "peers 1" not in err, err
        r = bt_run("download", torrent, "-d", tmp_path / "dl", "--bind", "127.0.0.1",
                   "--peer", f"127.0.0.1:{port}", "--encryption", "required")
        assert r.returncode == 0, r.stderr
        _check_download(r, tmp_path / "dl", src)
    finally:
        seed.kill()
        seed.wait()
