"""``bt create`` and ``bt info`` (``python -m bt`` and the console script):
what they print, that libtorrent loads what create writes, one-line errors
and exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from testsupport import console_script

from _utpkit.bencode import encode
from bt.metainfo import load_metainfo

TIMEOUT = 60


def bt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bt", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd or "/")


def _tree(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    (d / "docs").mkdir(parents=True)
    (d / "movie.bin").write_bytes(os.urandom(300_000))
    (d / "docs" / "readme.txt").write_bytes(b"hello\n" * 1000)
    return d


def test_create_then_info(tmp_path):
    d = _tree(tmp_path)
    out = tmp_path / "share.torrent"
    r = bt("create", d, "-o", out, "--tracker", "udp://127.0.0.1:6969", "--tracker",
           "http://127.0.0.1:8000/announce", "--piece-size", "32K", "--private", "--pad-files")
    assert r.returncode == 0, r.stderr
    m = load_metainfo(out)
    assert r.stdout.startswith(f"{out}: share, ")
    assert r.stdout.endswith(f" KiB in {m.num_pieces} pieces of 32 KiB, info hash {m.info_hash.hex()}\n")
    assert m.piece_length == 32768 and m.private and any(f.pad for f in m.files)
    assert m.trackers == (("udp://127.0.0.1:6969",), ("http://127.0.0.1:8000/announce",))

    r = bt("info", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "name:        share"
    assert f"info hash:   {m.info_hash.hex()}" in lines
    assert f"pieces:      {m.num_pieces} of 32 KiB" in lines
    assert "private:     yes" in lines
    assert "  tier 0: udp://127.0.0.1:6969" in lines and "  tier 1: http://127.0.0.1:8000/announce" in lines
    assert "files:       2 (and 1 pad files)" in lines
    assert any(line.endswith("  share/docs/readme.txt") and "6000" in line for line in lines)

    r = bt("info", "--json", out)
    j = json.loads(r.stdout)
    assert j["info_hash"] == m.info_hash.hex() and j["pieces"] == m.num_pieces
    assert [f["path"] for f in j["files"] if "p" not in f["attr"]] == ["share/docs/readme.txt", "share/movie.bin"]

    lt = pytest.importorskip("libtorrent", reason="libtorrent (the test extra) cross-checks the output")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert str(lt.torrent_info(str(out)).info_hashes().v1) == m.info_hash.hex()


def test_default_piece_size_and_single_file(tmp_path):
    f = tmp_path / "one.iso"
    f.write_bytes(os.urandom(3_000_000))     # just over libtorrent's 16 KiB threshold
    r = bt("create", f, "-o", tmp_path / "one.torrent")
    assert r.returncode == 0, r.stderr
    m = load_metainfo(tmp_path / "one.torrent")
    assert m.piece_length == 32768 and not m.multi_file and m.trackers == ()
    r = bt("info", tmp_path / "one.torrent")
    assert "trackers:    none" in r.stdout


@pytest.mark.parametrize("args, status, pattern", [
    (["create", "/nonexistent-path", "-o", "/tmp/x.torrent"], 1,
     "bt create: /nonexistent-path: No such file or directory"),
    (["create", "/etc/hostname", "-o", "/tmp/x.torrent", "--piece-size", "1000"], 1,
     "bt create: piece size: 1000 is not a power of two from 16 KiB to 128 MiB"),
    (["create", "/etc/hostname", "-o", "/tmp/x.torrent", "--piece-size", "lots"], 2,
     "expected a size like 262144, 256K or 1M"),
    (["create", "/etc/hostname"], 2, "the following arguments are required: -o/--output"),
    (["info", "/nonexistent.torrent"], 1, "bt info: /nonexistent.torrent: No such file or directory"),
    (["download", "x.torrent"], 2, "the following arguments are required: -d/--dir"),
    (["upload", "x.torrent"], 2, "invalid choice: 'upload'"),
    ([], 2, "the following arguments are required: command"),
])
def test_errors_are_one_line_with_a_status(args, status, pattern):
    r = bt(*args)
    assert r.returncode == status
    assert pattern in r.stderr
    if status == 1:
        assert r.stderr.count("\n") == 1 and r.stdout == ""


def test_info_of_a_malformed_torrent_names_the_field(tmp_path):
    bad = tmp_path / "bad.torrent"
    bad.write_bytes(encode({b"info": {b"name": b"x", b"piece length": 16384, b"pieces": b"a" * 41,
                                      b"length": 10}}))
    r = bt("info", bad)
    assert r.returncode == 1
    assert r.stderr == f"bt info: {bad}: info.pieces: length 41 is not a multiple of 20\n"
    evil = tmp_path / "evil.torrent"
    evil.write_bytes(encode({b"info": {b"name": b"x", b"piece length": 16384, b"pieces": b"a" * 20,
                                       b"files": [{b"length": 10, b"path": [b"..", b"..", b"etc", b"cron"]}]}}))
    r = bt("info", evil)
    assert r.returncode == 1
    assert r.stderr == f"bt info: {evil}: info.files[0].path: unsafe path component '..' in '../../etc/cron'\n"


def test_console_script(tmp_path):
    """The `bt` entry point of an installed utpkit (skipped in a checkout)."""
    script = console_script("bt")
    f = tmp_path / "f"
    f.write_bytes(b"data" * 5000)
    r = subprocess.run([str(script), "create", str(f), "-o", str(tmp_path / "f.torrent")],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert load_metainfo(tmp_path / "f.torrent").total_length == 20000


def test_info_of_a_libtorrent_hybrid(tmp_path):
    lt = pytest.importorskip("libtorrent", reason="libtorrent (the test extra) makes the hybrid torrent")
    d = _tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = lt.file_storage()
        lt.add_files(fs, str(d))
        ct = lt.create_torrent(fs)          # libtorrent 2's default: v1 + v2
        lt.set_piece_hashes(ct, str(tmp_path))
        (tmp_path / "h.torrent").write_bytes(lt.bencode(ct.generate()))
        ti = lt.torrent_info(str(tmp_path / "h.torrent"))
    r = bt("info", tmp_path / "h.torrent")
    assert r.returncode == 0, r.stderr
    assert f"info hash:   {ti.info_hashes().v1}" in r.stdout.splitlines()
    assert f"v2 hash:     {ti.info_hashes().v2} (hybrid v1+v2; used through its v1 side)" in r.stdout
    assert "files:       2 (and 2 pad files)" in r.stdout
