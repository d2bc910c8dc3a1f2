"""bt.storage: the three levels over the file and memory backends, with real
files in temporary directories: sparse lazy files, pad files never on disk,
SHA-1 verification, the resume file (clean restart, crash with SIGKILL,
stale files), symlinks that lead out of the download directory, and a full
disk (a 1 MiB tmpfs)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from testsupport import unavailable

from _utpkit.bencode import encode
from bt.create import create_torrent
from bt.metainfo import Metainfo, parse_metainfo_untrusted
from bt.storage import AsyncTorrentStorage, MemoryStorage, StorageError
from bt.storage_file import FileStorage

PIECE = 16384


def _content(root: Path, sizes: dict[str, int], seed: int = 1) -> Path:
    rng = random.Random(seed)
    d = root / "content"
    for rel, size in sizes.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
    return d


SIZES = {"a.bin": 50_000, "empty": 0, "sub/b.bin": 30_000, "sub/c.bin": 70_000}


@pytest.fixture
def torrent(tmp_path) -> tuple[Metainfo, Path]:
    src = _content(tmp_path / "src", SIZES)
    return parse_metainfo_untrusted(create_torrent(src, piece_length=PIECE, pad_files=True)), src


def _piece_data(m: Metainfo, src: Path, index: int) -> bytes:
    out = bytearray()
    for s in m.map_piece(index):
        f = m.files[s.file_index]
        if f.pad:
            out += bytes(s.length)
        else:
            with open(src.parent / "/".join(f.path), "rb") as fh:
                fh.seek(s.file_offset)
                out += fh.read(s.length)
    return bytes(out)


def _store(t, m, src, pieces, block=PIECE // 4):
    """Write pieces block by block, as a peer's blocks arrive, and verify."""
    for i in pieces:
        data = _piece_data(m, src, i)
        p = t.piece(i)
        for off in range(0, len(data), block):
            p.write_at(off, data[off:off + block])
        assert p.hash_ok()
        p.mark_complete()


def _fi(m: Metainfo, rel: str) -> int:
    return next(k for k, f in enumerate(m.files) if "/".join(f.path[1:]) == rel)


def _same_tree(a: Path, b: Path) -> None:
    for rel in SIZES:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


# ---- the memory backend -------------------------------------------------------------------


def test_memory_backend_three_levels(torrent):
    m, src = torrent
    backend = MemoryStorage()
    t = backend.open_torrent(m)
    assert t.piece(0).read_at(0, 10) == bytes(10)
    _store(t, m, src, range(m.num_pieces))
    assert t.have == set(range(m.num_pieces))
    assert t.piece(3).read_at(5, 100) == _piece_data(m, src, 3)[5:105]
    # a verified piece is not overwritten (a late duplicate block)
    with pytest.raises(ValueError, match="piece 1 is verified"):
        t.piece(1).write_at(7, b"\xff\xfe")
    # a corrupted block fails the hash; the piece is not complete
    t.piece(1).mark_not_complete()
    t.piece(1).write_at(7, b"\xff\xfe")
    assert not t.piece(1).hash_ok()
    assert not t.piece(1).complete
    # reopening the same infohash sees the data but must check it again
    t2 = backend.open_torrent(m)
    assert t2.have == set()
    r = t2.check()
    assert r.have == frozenset(range(m.num_pieces)) - {1} and r.hashed == m.num_pieces
    with pytest.raises(ValueError):
        t2.piece(0).write_at(PIECE - 1, b"ab")
    with pytest.raises(IndexError):
        t2.piece(m.num_pieces)


# ---- the file backend ---------------------------------------------------------------------


def test_file_backend_stores_files_sparse_and_without_pad_files(tmp_path, torrent):
    m, src = torrent
    dl = tmp_path / "dl"
    t = FileStorage(dl, resume_dir=tmp_path / "resume").open_torrent(m)
    assert not dl.joinpath("content").exists()         # nothing until the first write
    last = m.num_pieces - 1
    _store(t, m, src, [last])
    c = dl / "content" / "sub" / "c.bin"
    st = os.stat(c)
    assert st.st_size == 70_000                        # sized at creation...
    assert st.st_blocks * 512 < 70_000                 # ...but sparse
    assert (dl / "content" / "empty").exists()         # empty files made with the first write
    assert t.piece(0).read_at(0, 100) == bytes(100)    # unwritten: zeros
    _store(t, m, src, range(last))
    t.close()
    _same_tree(src, dl / "content")
    assert not (dl / "content" / ".pad").exists()      # pad files never touch the disk
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == [m.info_hash.hex() + ".resume"]


def test_file_backend_hash_catches_corruption_on_disk(tmp_path, torrent):
    m, src = torrent
    t = FileStorage(tmp_path / "dl").open_torrent(m)
    _store(t, m, src, range(m.num_pieces))
    with open(tmp_path / "dl" / "content" / "a.bin", "r+b") as f:
        f.seek(PIECE + 3)
        f.write(b"\x00\x01\x02")
    r = t.check(full=True)
    assert r.have == frozenset(range(m.num_pieces)) - {1}
    assert not r.resumed and r.hashed == m.num_pieces
    t.close()


def test_seeding_existing_data_and_recheck_without_resume(tmp_path, torrent):
    m, src = torrent
    # the source tree itself is a complete download: check finds every piece
    t = FileStorage(src.parent).open_torrent(m)
    r = t.check()
    assert r.have == frozenset(range(m.num_pieces)) and r.hashed == m.num_pieces
    assert t.piece(2).read_at(0, PIECE) == _piece_data(m, src, 2)
    t.close()


def test_resume_after_clean_close_does_not_rehash(tmp_path, torrent):
    m, src = torrent
    backend = FileStorage(tmp_path / "dl", resume_dir=tmp_path / "resume")
    t = backend.open_torrent(m)
    _store(t, m, src, [0, 2, 5])
    t.close()
    t = backend.open_torrent(m)
    r = t.check()
    assert r.resumed and r.have == {0, 2, 5} and r.hashed == 0
    t.close()
    # a file changed behind our back: only its pieces are hashed again
    a = tmp_path / "dl" / "content" / "a.bin"
    with open(a, "r+b") as f:
        f.write(b"garbage")
    t = backend.open_torrent(m)
    r = t.check()
    assert r.resumed and r.have == {2, 5}
    assert r.hashed == len(m.file_pieces(_fi(m, "a.bin")))
    t.close()
    # the resume file gone (or torn): a full recheck
    resume = tmp_path / "resume" / (m.info_hash.hex() + ".resume")
    resume.write_bytes(resume.read_bytes()[:-5])
    t = backend.open_torrent(m)
    r = t.check()
    assert not r.resumed and r.have == {2, 5} and r.hashed == m.num_pieces
    t.close()


_CRASH = textwrap.dedent("""
    import os, signal, sys
    from bt.metainfo import load_metainfo
    from bt.storage_file import FileStorage
    m = load_metainfo(sys.argv[1])
    src, dl, resume = sys.argv[2], sys.argv[3], sys.argv[4]
    t = FileStorage(dl, resume_dir=resume, resume_interval=3600).open_torrent(m)
    seed = FileStorage(src).open_torrent(m)     # the source tree is a complete copy
    def put(i):
        p = t.piece(i)
        p.write_at(0, seed.piece(i).read_at(0, p.length))
        assert p.hash_ok()
        p.mark_complete()
    for i in map(int, sys.argv[5].split(",")):
        put(i)
    t.save_resume()
    for i in map(int, sys.argv[6].split(",")):
        put(i)
    # half a piece more, never verified
    t.piece(int(sys.argv[7])).write_at(0, b"x" * 100)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_resume_after_sigkill_keeps_every_verified_piece(tmp_path, torrent):
    m, src = torrent
    tf = tmp_path / "t.torrent"
    tf.write_bytes(create_torrent(src, piece_length=PIECE, pad_files=True))
    assert parse_metainfo_untrusted(tf.read_bytes()).info_hash == m.info_hash
    # a.bin holds pieces 0..3 (with its pad); c.bin the last ones
    a_pieces, c_pieces = list(m.file_pieces(_fi(m, "a.bin"))), list(m.file_pieces(_fi(m, "sub/c.bin")))
    before, after, partial = a_pieces[:2], [c_pieces[0]], c_pieces[1]
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tf), str(src.parent), str(tmp_path / "dl"),
                           str(tmp_path / "resume"), ",".join(map(str, before)),
                           ",".join(map(str, after)), str(partial)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    t = FileStorage(tmp_path / "dl", resume_dir=tmp_path / "resume").open_torrent(m)
    r = t.check()
    # the pieces verified before the save are trusted; c.bin changed after
    # the save, so its pieces were hashed again, finding the one verified
    # after the save and refusing the partial one
    assert r.resumed
    assert r.have == frozenset(before + after)
    assert r.hashed == len(c_pieces)
    _store(t, m, src, sorted(set(range(m.num_pieces)) - r.have))
    t.close()
    _same_tree(src, tmp_path / "dl" / "content")


def test_many_files_keep_a_bounded_number_open(tmp_path):
    from bt.storage_file import _MAX_OPEN_FILES
    n = _MAX_OPEN_FILES + 40
    src = _content(tmp_path / "src", {f"f{k:03d}": 3000 + k for k in range(n)})
    m = parse_metainfo_untrusted(create_torrent(src, piece_length=PIECE))
    fds_before = len(os.listdir("/proc/self/fd"))
    t = FileStorage(tmp_path / "dl", resume_dir=tmp_path / "r").open_torrent(m)
    _store(t, m, src, range(m.num_pieces))
    assert len(os.listdir("/proc/self/fd")) - fds_before <= _MAX_OPEN_FILES
    assert t.check(full=True).have == frozenset(range(m.num_pieces))
    t.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    for k in range(n):
        assert (tmp_path / "dl" / "content" / f"f{k:03d}").read_bytes() == (src / f"f{k:03d}").read_bytes()
    # the evicted files were flushed before the resume file claimed them
    t = FileStorage(tmp_path / "dl", resume_dir=tmp_path / "r").open_torrent(m)
    assert t.check().hashed == 0
    t.close()


# ---- symlinks on disk ---------------------------------------------------------------------


def test_symlink_leading_outside_is_refused(tmp_path, torrent):
    m, src = torrent
    outside = tmp_path / "outside"
    outside.mkdir()
    dl = tmp_path / "dl"
    (dl / "content").mkdir(parents=True)
    os.symlink(outside, dl / "content" / "sub")
    with pytest.raises(StorageError) as ei:
        FileStorage(dl).open_torrent(m)
    assert "refusing content/sub/b.bin" in str(ei.value) and "outside the download directory" in str(ei.value)
    # a file symlink to outside, too
    os.unlink(dl / "content" / "sub")
    os.symlink(outside / "x", dl / "content" / "a.bin")
    with pytest.raises(StorageError, match="refusing content/a.bin"):
        FileStorage(dl).open_torrent(m)
    assert list(outside.iterdir()) == []


def test_symlink_inside_the_download_directory_is_allowed(tmp_path, torrent):
    m, src = torrent
    dl = tmp_path / "dl"
    (dl / "elsewhere").mkdir(parents=True)
    (dl / "content").mkdir()
    os.symlink(dl / "elsewhere", dl / "content" / "sub")
    t = FileStorage(dl).open_torrent(m)
    _store(t, m, src, range(m.num_pieces))
    t.close()
    assert (dl / "elsewhere" / "c.bin").read_bytes() == (src / "sub" / "c.bin").read_bytes()


def test_symlink_appearing_after_open_is_refused_at_creation(tmp_path, torrent):
    m, src = torrent
    outside = tmp_path / "outside"
    outside.mkdir()
    dl = tmp_path / "dl"
    t = FileStorage(dl).open_torrent(m)
    (dl / "content").mkdir(parents=True)
    os.symlink(outside, dl / "content" / "sub")
    b_piece = m.file_pieces(_fi(m, "sub/b.bin"))[0]
    with pytest.raises(StorageError, match="refusing content/sub/b.bin"):
        _store(t, m, src, [b_piece])
    assert t.error is not None
    assert list(outside.iterdir()) == []
    t.close()


# ---- disk full ----------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("resume_on_the_full_disk", [False, True])
def test_disk_full_is_a_storage_error_and_keeps_verified_pieces(tmp_path, small_tmpfs, resume_on_the_full_disk):
    src = _content(tmp_path / "src", {"big.bin": 1_500_000, "small.bin": 10_000})
    m = parse_metainfo_untrusted(create_torrent(src, piece_length=PIECE))
    dl = small_tmpfs / "dl"
    resume = small_tmpfs / "resume" if resume_on_the_full_disk else tmp_path / "resume"
    t = FileStorage(dl, resume_dir=resume, resume_interval=0).open_torrent(m)
    stored: list[int] = []
    with pytest.raises(StorageError) as ei:
        for i in range(m.num_pieces):
            _store(t, m, src, [i])
            stored.append(i)
    err = ei.value
    assert "No space left on device" in str(err) and "\n" not in str(err)
    assert err.errno == 28 and t.error is err
    if resume_on_the_full_disk:
        # whichever write hit the full disk first, the message names it
        assert err.path.endswith(("big.bin", ".resume")) and os.path.basename(err.path) in str(err)
    else:
        assert err.path.endswith("big.bin") and str(err).startswith(f"cannot write {err.path}: ")
    assert len(stored) > 10
    try:
        t.close()       # the resume file may not fit: the one on disk stays whole
    except StorageError as exc:
        assert "No space left on device" in str(exc)
    t = FileStorage(dl, resume_dir=resume).open_torrent(m)
    r = t.check()
    assert r.resumed                # the resume file is readable, not torn
    assert set(stored) <= r.have    # nothing verified was lost
    try:
        t.close()
    except StorageError as exc:     # the disk is still full
        assert resume_on_the_full_disk and "No space left on device" in str(exc)


def test_read_only_filesystem_is_a_storage_error(tmp_path, small_tmpfs, torrent):
    m, src = torrent
    t = FileStorage(small_tmpfs / "dl").open_torrent(m)
    _store(t, m, src, [0])
    t.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        t = FileStorage(small_tmpfs / "dl").open_torrent(m)
        # what is there can still be read (seeding from read-only data)
        assert t.piece(0).hash_ok()
        last = m.num_pieces - 1
        with pytest.raises(StorageError, match=r"^cannot create .*c\.bin: Read-only file system$"):
            _store(t, m, src, [last])
        t.close()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)


# ---- async wrappers -----------------------------------------------------------------------


async def test_async_wrappers_run_in_threads(tmp_path, torrent):
    m, src = torrent
    s = AsyncTorrentStorage(FileStorage(tmp_path / "dl", resume_dir=tmp_path / "r").open_torrent(m),
                            trio.CapacityLimiter(2))
    async with trio.open_nursery() as n:
        for i in range(m.num_pieces):
            n.start_soon(s.write, i, 0, _piece_data(m, src, i))
    ok = [await s.verify(i) for i in range(m.num_pieces)]
    assert all(ok)
    with pytest.raises(ValueError):
        await s.write(0, 0, b"bad")
    s.storage.piece(0).mark_not_complete()
    await s.write(0, 0, b"bad")
    assert not await s.verify(0)
    assert await s.read(1, 10, 20) == _piece_data(m, src, 1)[10:30]
    await s.save_resume()
    await s.aclose()
    assert (await AsyncTorrentStorage(FileStorage(tmp_path / "dl", resume_dir=tmp_path / "r")
                                      .open_torrent(m)).check()).have == frozenset(range(1, m.num_pieces))


# ---- any layout, any write order ----------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 40_000), st.booleans()), min_size=1, max_size=6),
       st.sampled_from([16384, 32768]), st.randoms(use_true_random=False))
def test_any_layout_written_in_any_order_reads_back(tmp_path_factory, layout, piece_length, rnd):
    """Files of any sizes (empty ones, pad files anywhere), blocks written
    in a random order and split at random points: every piece verifies and
    every file on disk holds exactly its bytes."""
    files, content = [], bytearray()
    for k, (size, pad) in enumerate(layout):
        data = bytes(size) if pad else rnd.randbytes(size)
        files.append({b"length": size, b"path": [b".pad", b"%d" % size] if pad else [b"f%d" % k]}
                     | ({b"attr": b"p"} if pad else {}))
        content += data
    assume(any(size for size, pad in layout if not pad))   # else no data: not a torrent
    hashes = b"".join(hashlib.sha1(content[i:i + piece_length]).digest()
                      for i in range(0, len(content), piece_length))
    m = parse_metainfo_untrusted(encode({b"info": {b"name": b"t", b"piece length": piece_length,
                                                    b"pieces": hashes, b"files": files}}))
    root = tmp_path_factory.mktemp("layout")
    t = FileStorage(root).open_torrent(m)
    writes = []
    for i in range(m.num_pieces):
        base, size = i * piece_length, m.piece_size(i)
        cuts = sorted({0, size, *(rnd.randrange(size) for _ in range(3))})
        writes += [(i, a, content[base + a:base + b]) for a, b in zip(cuts, cuts[1:])]
    rnd.shuffle(writes)
    for i, off, data in writes:
        t.piece(i).write_at(off, data)
    assert t.check(full=True).have == frozenset(range(m.num_pieces))
    t.close()
    for f in m.files:
        on_disk = root.joinpath(*f.path)
        if f.pad:
            assert not on_disk.exists()
        else:
            assert on_disk.read_bytes() == bytes(content[f.offset:f.end])
