"""bt.create: torrents we make, checked against libtorrent (it loads them
with the same infohash), and torrents libtorrent makes (v1, with pad files,
v1+v2 hybrid) loaded by us with the same v1 infohash, files and pieces."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pytest

from bt.create import (CreateError, SourceFile, create_torrent, create_torrent_async, hash_pieces,
                       piece_size_for, write_torrent)
from bt.metainfo import load_metainfo, parse_metainfo_untrusted

lt = pytest.importorskip("libtorrent", reason="libtorrent (the test extra) is needed for cross-checks")

# libtorrent 2.x's Python binding marks files() and trackers() deprecated;
# they are still the simplest way to read a torrent_info back.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")


def _tree(root: Path) -> Path:
    """A small directory with awkward sizes: a file not piece-aligned, an
    empty one, an executable one in a subdirectory."""
    d = root / "content"
    (d / "sub" / "deeper").mkdir(parents=True)
    rng = __import__("random").Random(7)
    (d / "a.bin").write_bytes(rng.randbytes(100_000))
    (d / "empty").write_bytes(b"")
    (d / "sub" / "b.txt").write_bytes(rng.randbytes(5_000))
    (d / "sub" / "deeper" / "c.dat").write_bytes(rng.randbytes(40_000))
    os.chmod(d / "sub" / "b.txt", 0o755)
    return d


def _lt_info(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return lt.torrent_info(data)


def _lt_files(ti) -> list[tuple[str, int, bool]]:
    fs = ti.files()
    return [(fs.file_path(i), fs.file_size(i), bool(fs.file_flags(i) & lt.file_storage.flag_pad_file))
            for i in range(fs.num_files())]


def _our_files(m) -> list[tuple[str, int, bool]]:
    return [("/".join(f.path), f.length, f.pad) for f in m.files]


# ---- piece size ---------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 2684354, 2684355, 2684356, 10 << 20, 100 << 20, 1 << 30, 3 << 30,
                                   (10 << 30) + 1, 50 << 30, 700 << 30, 703687441777, 703687441778, 4 << 40])
def test_piece_size_matches_libtorrent(total):
    fs = lt.file_storage()
    fs.add_file("x/big", total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = lt.create_torrent(fs, 0, lt.create_torrent.v1_only).piece_length()
    assert piece_size_for(total) == theirs


def test_piece_size_table_endpoints():
    assert piece_size_for(2684355) == 16384 and piece_size_for(2684356) == 32768
    assert piece_size_for(1 << 30) == 512 * 1024 and piece_size_for(4 << 30) == 1 << 20
    assert piece_size_for(1 << 50) == 16 << 20


# ---- ours into libtorrent -----------------------------------------------------------------


def test_single_file_torrent_loads_in_libtorrent(tmp_path):
    f = tmp_path / "one.bin"
    f.write_bytes(os.urandom(300_000))
    data = create_torrent(f, trackers=["http://127.0.0.1:6969/announce"], piece_length=65536)
    m = parse_metainfo_untrusted(data)
    ti = _lt_info(data)
    assert str(ti.info_hashes().v1) == m.info_hash.hex()
    assert (ti.num_pieces(), ti.piece_length(), ti.total_size()) == (5, 65536, 300_000)
    assert _lt_files(ti) == [("one.bin", 300_000, False)]
    assert [t.url for t in ti.trackers()] == ["http://127.0.0.1:6969/announce"]
    # and the hashes are right: piece 2 is bytes 131072..196607
    assert m.piece_hash(2) == hashlib.sha1(f.read_bytes()[131072:196608]).digest()
    assert bytes(ti.hash_for_piece(4)) == hashlib.sha1(f.read_bytes()[262144:]).digest()


@pytest.mark.parametrize("pad_files", [False, True])
def test_directory_torrent_loads_in_libtorrent(tmp_path, pad_files):
    d = _tree(tmp_path)
    data = create_torrent(d, trackers=["udp://127.0.0.1:1", ["http://127.0.0.1:2/a", "http://127.0.0.1:3/a"]],
                          private=True, pad_files=pad_files, creation_date=0)
    m = parse_metainfo_untrusted(data)
    ti = _lt_info(data)
    assert str(ti.info_hashes().v1) == m.info_hash.hex()
    assert ti.priv() and m.private
    assert _lt_files(ti) == _our_files(m)
    assert ti.num_pieces() == m.num_pieces
    assert [(t.url, t.tier) for t in ti.trackers()] == [("udp://127.0.0.1:1", 0), ("http://127.0.0.1:2/a", 1),
                                                        ("http://127.0.0.1:3/a", 1)]
    names = [p for p, _, pad in _our_files(m) if not pad]
    assert names == ["content/a.bin", "content/empty", "content/sub/b.txt", "content/sub/deeper/c.dat"]
    assert [f.executable for f in m.files if not f.pad] == [False, False, True, False]
    if pad_files:
        # every real, non-empty file starts on a piece boundary
        assert all(f.offset % m.piece_length == 0 for f in m.files if not f.pad and f.length)
        assert any(f.pad for f in m.files)
    else:
        assert not any(f.pad for f in m.files)


def test_reproducible_and_written_atomically(tmp_path):
    d = _tree(tmp_path)
    a = create_torrent(d, creation_date=0, created_by=None)
    b = create_torrent(d, creation_date=0, created_by=None)
    assert a == b
    out = tmp_path / "x.torrent"
    write_torrent(a, out)
    assert out.read_bytes() == a and load_metainfo(out).info_hash == parse_metainfo_untrusted(a).info_hash
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_create_errors_name_the_problem(tmp_path):
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CreateError, match="no files in the directory"):
        create_torrent(tmp_path / "emptydir")
    (tmp_path / "zero").write_bytes(b"")
    with pytest.raises(CreateError, match="no data to share"):
        create_torrent(tmp_path / "zero")
    with pytest.raises(CreateError, match="No such file"):
        create_torrent(tmp_path / "missing")
    (tmp_path / "f").write_bytes(b"x")
    for bad in (1000, 16383, 3 * 16384):
        with pytest.raises(CreateError, match=f"piece size: {bad} is not a power of two"):
            create_torrent(tmp_path / "f", piece_length=bad)
    with pytest.raises(CreateError, match="stop"):
        def stop(done, total):
            raise CreateError("stop")
        create_torrent(tmp_path / "f", progress=stop)


async def test_create_async_runs_in_a_thread(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(70_000))
    seen = []
    data = await create_torrent_async(f, piece_length=16384, progress=lambda d, t: seen.append((d, t)))
    assert parse_metainfo_untrusted(data).num_pieces == 5
    assert seen[-1] == (5, 5)


# ---- libtorrent's into ours ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v1", "v1-pad", "hybrid", "single-hybrid"])
def test_libtorrent_torrents_load_in_ours(tmp_path, kind):
    d = _tree(tmp_path)
    src = d / "a.bin" if kind == "single-hybrid" else d
    flags = {"v1": lt.create_torrent.v1_only,
             "v1-pad": lt.create_torrent.v1_only | lt.create_torrent.canonical_files,
             "hybrid": 0, "single-hybrid": 0}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = lt.file_storage()
        lt.add_files(fs, str(src))
        ct = lt.create_torrent(fs, 0, flags)
        ct.add_tracker("udp://127.0.0.1:1", 0)
        ct.add_tracker("udp://127.0.0.1:2", 1)
        ct.set_priv(True)
        lt.set_piece_hashes(ct, str(src.parent))
        data = lt.bencode(ct.generate())
    ti = _lt_info(data)
    m = parse_metainfo_untrusted(data)
    assert m.info_hash.hex() == str(ti.info_hashes().v1)
    assert _our_files(m) == _lt_files(ti)
    assert (m.num_pieces, m.piece_length, m.total_length) == (ti.num_pieces(), ti.piece_length(), ti.total_size())
    assert m.private and m.trackers == (("udp://127.0.0.1:1",), ("udp://127.0.0.1:2",))
    for i in range(m.num_pieces):
        assert m.piece_hash(i) == bytes(ti.hash_for_piece(i))
    if kind in ("hybrid", "single-hybrid"):
        assert m.hybrid and m.info_hash_v2.hex() == str(ti.info_hashes().v2)
    else:
        assert not m.hybrid
    if kind in ("v1-pad", "hybrid"):
        assert any(f.pad for f in m.files)
    # our hasher, run over libtorrent's layout (its file order, its pad
    # files, a tail pad in hybrids), computes libtorrent's piece hashes
    layout = [SourceFile(f.path[1:] if m.multi_file else (), f.length,
                         None if f.pad else str(tmp_path / "/".join(f.path) if m.multi_file else src))
              for f in m.files]
    assert hash_pieces(layout, m.piece_length) == m.pieces
