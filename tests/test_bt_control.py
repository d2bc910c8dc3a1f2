"""Torrent control through the Python API, on loopback between our own
sessions with real files: pause (connections dropped, nothing dialed or
accepted) and resume (the known peer dialed again), force recheck (a byte
changed on disk is found and fetched again), remove with and without the
data, and the state transitions every one of them reports to the
session's listeners."""

from __future__ import annotations

import contextlib
import os

import pytest
import trio

import bt
from bt.torrent import TorrentError
from testsupport import bt_content, sha256_files

PIECE = 32 * 1024
SIZES = (300_000, 0, 170_001, 123_456)


def _content(root):
    return bt_content(root, SIZES, seed=3, piece_length=PIECE)


def _recorder(session):
    seen: list[tuple[str | None, str]] = []
    session.state_listeners.append(
        lambda t, old, new: seen.append((None if old is None else str(old), str(new))))
    return seen


@contextlib.asynccontextmanager
async def _downloaded(tmp_path, data: bytes):
    """A seed session and a leecher session that downloaded ``data`` from
    it (into tmp_path/dl): yields (seed session, leecher session, seed
    torrent, leecher torrent)."""
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
        seed = await s.add_torrent(data)
        t = await ls.add_torrent(data)
        t.add_peer(("127.0.0.1", s.port))
        with trio.fail_after(60):
            await t.wait_finished()
        yield s, ls, seed, t


async def _until(pred, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


@pytest.mark.parametrize("dialer", ["leecher", "seed"])
async def test_pause_drops_peers_refuses_them_and_resume_finishes(tmp_path, dialer):
    """``dialer`` "seed": the leecher never had the seed's address; it
    learned the seed's listen port from its extension handshake and dials
    it on resume."""
    src, names, data = _content(tmp_path)
    # the leecher's download limit makes the transfer last a few seconds
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                            download_limit=150_000) as ls:
        seen = _recorder(ls)
        seed = await s.add_torrent(data)
        t = await ls.add_torrent(data)
        added = [(None, "checking"), ("checking", "downloading")]
        assert seen == added
        if dialer == "leecher":
            t.add_peer(("127.0.0.1", s.port))
        else:
            seed.add_peer(("127.0.0.1", ls.port))
        await _until(lambda: t.status().pieces_have >= 2)
        assert list(t.known_peers) == [("127.0.0.1", s.port)]
        await t.pause()
        st = t.status()
        assert st.state == "paused" and st.peers == 0 and not t.peers
        assert t.counters["closed.paused"] == 1
        await _until(lambda: not seed.peers)                # the seed saw it go
        have = st.pieces_have
        assert have < st.pieces_total
        # paused: the seed's dial is refused after the handshake, nothing moves
        seed.add_peer(("127.0.0.1", ls.port))
        await _until(lambda: ls.counters["handshake.paused"] == 1)
        t.add_peer(("127.0.0.1", s.port))                   # not dialed while paused
        await trio.sleep(1.0)
        assert list(t.known_peers) == [("127.0.0.1", s.port)]
        assert t.status().pieces_have == have and not t.peers and not seed.peers
        await t.pause()                                     # again: nothing changes
        assert seen == added + [("downloading", "paused")]
        await t.resume()
        assert t.state == "downloading"
        with trio.fail_after(60):
            await t.wait_finished()
        assert seen == added + [("downloading", "paused"), ("paused", "downloading"),
                                ("downloading", "seeding")]
        assert t.status().counters["pieces.passed"] == t.meta.num_pieces
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


async def test_force_recheck_finds_a_damaged_piece_and_fetches_it_again(tmp_path):
    src, names, data = _content(tmp_path)
    async with _downloaded(tmp_path, data) as (s, ls, _, t):
        seen = _recorder(ls)
        # an untouched recheck: every piece again, still seeding
        await t.force_recheck()
        assert t.state == "seeding" and t.status().pieces_have == t.meta.num_pieces
        assert t.counters["rechecks"] == 1
        # one byte of the first file changed behind the torrent's back
        victim = tmp_path / "dl" / "content" / names[0]
        raw = bytearray(victim.read_bytes())
        raw[PIECE + 5] ^= 0xFF
        victim.write_bytes(bytes(raw))
        checking: list[float | None] = []
        ls.state_listeners.append(lambda tt, old, new: checking.append(
            tt.status().checking_progress) if new == "checking" else None)
        await t.force_recheck()
        assert checking == [0.0]
        st = t.status()
        assert st.pieces_have == t.meta.num_pieces - 1 and not t.picker.has_piece(1)
        assert st.state == "downloading"
        with trio.fail_after(60):
            await t.wait_finished()             # the seed was dialed again
        assert seen == [("seeding", "checking"), ("checking", "seeding"),
                        ("seeding", "checking"), ("checking", "downloading"),
                        ("downloading", "seeding")]
        assert t.counters["rechecks"] == 2
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


async def test_recheck_of_a_paused_torrent_stays_paused(tmp_path):
    src, names, data = _content(tmp_path)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as s:
        t = await s.add_torrent(data)
        await t.pause()
        await t.force_recheck()
        assert t.state == "paused" and t.status().pieces_have == t.meta.num_pieces
        await t.resume()
        assert t.state == "seeding"


@pytest.mark.parametrize("delete_data", [False, True])
async def test_remove_torrent(tmp_path, delete_data):
    src, names, data = _content(tmp_path)
    dl = tmp_path / "dl"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the torrent's")
    async with _downloaded(tmp_path, data) as (s, ls, seed, t):
        seen = _recorder(ls)
        # something of the user's next to the torrent's files, and a symlink
        # among them leading out: neither may be deleted
        (dl / "content" / "mine.txt").write_text("keep")
        os.symlink(outside, dl / "content" / "sub" / "link")
        resume = dl / ".bt-resume" / (t.info_hash.hex() + ".resume")
        assert resume.exists()
        await _until(lambda: bool(seed.peers))
        await ls.remove_torrent(t, delete_data=delete_data)
        assert t.info_hash not in ls.torrents and t.state == "removed" and not t.peers
        assert seen == [("seeding", "removed")]
        assert not resume.exists()
        with pytest.raises(TorrentError, match="removed"):
            await t.pause()
        with pytest.raises(TorrentError, match="removed"):
            await t.force_recheck()
        with pytest.raises(bt.SessionError, match="not in this session"):
            await ls.remove_torrent(t)
        # the seed's connection is gone; dialing the removed torrent fails
        await _until(lambda: not seed.peers)
        seed.add_peer(("127.0.0.1", ls.port))
        await _until(lambda: ls.counters["handshake.unknown_infohash"] == 1)
    files = [dl / "content" / n for n in names]
    if delete_data:
        assert not any(f.exists() for f in files)
        # the user's file, the symlink (and so its directory) stay
        assert (dl / "content" / "mine.txt").read_text() == "keep"
        assert os.path.islink(dl / "content" / "sub" / "link")
    else:
        assert sha256_files(dl / "content", names) == sha256_files(src, names)
    assert outside.read_bytes() == b"not the torrent's" and dl.is_dir()


async def test_remove_with_data_deletes_the_directories_it_made(tmp_path):
    src, names, data = _content(tmp_path)
    dl = tmp_path / "dl"
    async with _downloaded(tmp_path, data) as (_, ls, _, t):
        await ls.remove_torrent(t, delete_data=True)
    assert not (dl / "content").exists() and dl.is_dir()
    assert src.is_dir() and sha256_files(src, names)        # the seed's copy is untouched



async def test_remove_during_a_recheck_and_with_a_waiter(tmp_path):
    """Removing waits for a running check to end before the files are
    closed and deleted; a task waiting for the download is told it was
    removed instead of waiting forever."""
    src, names, data = bt_content(tmp_path, (6_000_000, 2_000_000), seed=4,
                                  piece_length=PIECE)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
        seeding = await s.add_torrent(data)
        checking = trio.Event()
        s.state_listeners.append(lambda t, old, new: checking.set() if new == "checking" else None)
        leech = await ls.add_torrent(data)
        waiter_saw: list[BaseException] = []

        async def waiter():
            try:
                await leech.wait_finished()
            except TorrentError as exc:
                waiter_saw.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            nursery.start_soon(seeding.force_recheck)
            await checking.wait()
            await s.remove_torrent(seeding, delete_data=True)
            assert seeding.state == "removed" and not seeding._checking
            await ls.remove_torrent(leech)
        assert len(waiter_saw) == 1 and "removed" in str(waiter_saw[0])
    assert not src.exists() and src.parent.is_dir()


async def test_a_known_peer_is_dialed_again_until_it_answers(tmp_path):
    """The seed's address is added while nothing listens there: the first
    attempt fails, and the torrent dials it again (RECONNECT_FIRST, then
    twice that) until the seed, started later on that port, answers; no
    second ``add_peer``.  A torrent whose only peer dropped once (a lossy
    path, a peer that turned a connection down) must not stay idle."""
    from bt.torrent import RECONNECT_FIRST
    from utp.bench.peers import free_port

    src, names, data = _content(tmp_path)
    port = free_port()
    async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
        t = await ls.add_torrent(data)
        t.add_peer(("127.0.0.1", port))
        await _until(lambda: ls.counters["connect.tcp_failed"] >= 1)
        assert t.status().peers == 0
        async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1",
                                   port=port) as s:
            await s.add_torrent(data)
            with trio.fail_after(3 * RECONNECT_FIRST + 20):
                await t.wait_finished()
        assert ls.counters["connect.tcp_failed"] >= 1
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)
