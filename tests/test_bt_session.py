"""bt.open_session end to end on loopback, our sessions only: a seed and
leechers over uTP and over TCP, real sockets and real files; the data
must arrive byte for byte and the counters must show the transport and
who uploaded to whom."""

from __future__ import annotations

import os

import pytest
import trio

import bt
from bt.session import SessionError
from testsupport import bt_content, sha256_files

PIECE = 32 * 1024


def make_content(root, seed: int = 1, sizes=(300_000, 0, 70_001, 123_456)):
    """A multi-file directory (with an empty file) and its torrent bytes,
    with BEP 47 pad entries."""
    return bt_content(root, sizes, seed=seed, piece_length=PIECE)


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_our_leecher_downloads_from_our_seed(tmp_path, transport):
    src, names, data = make_content(tmp_path)
    utp, tcp = transport == "utp", transport == "tcp"
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1",
                               utp=utp, tcp=tcp) as seed_ses, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                            utp=utp, tcp=tcp) as leech_ses:
        seed = await seed_ses.add_torrent(data)
        assert seed.status().state == "seeding" and seed.status().progress == 1.0
        leech = await leech_ses.add_torrent(data)
        assert leech.status().pieces_have == 0
        leech.add_peer(("127.0.0.1", seed_ses.port))
        with trio.fail_after(60):
            await leech.wait_finished()
        st = leech.status()
        assert st.state == "seeding" and st.progress == 1.0
        assert st.pieces_have == st.pieces_total == leech.meta.num_pieces
        assert leech_ses.counters[f"connections.{transport}"] == 1
        assert seed_ses.counters[f"connections.{transport}"] == 1
        assert leech.counters["pieces.passed"] == leech.meta.num_pieces
        assert leech.counters["pieces.failed"] == 0
        assert seed.status().uploaded >= sum(s for s in (300_000, 70_001, 123_456))
        # two seeds hang up; the per-peer totals outlive the connection
        with trio.fail_after(20):
            while leech.peers:
                await trio.sleep(0.05)
        st = leech.status()
        assert [(x.peer_id, x.downloaded, x.uploaded) for x in st.transfers] == \
            [(seed_ses.peer_id, st.downloaded, 0)]
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


async def test_self_connection_is_detected(tmp_path):
    _, _, data = make_content(tmp_path)
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as ses:
        t = await ses.add_torrent(data)
        t.add_peer(("127.0.0.1", ses.port))
        with trio.fail_after(20):
            # the accepting end sees our own id and hangs up before answering
            while not ses.counters["handshake.self"]:
                await trio.sleep(0.05)
        assert ses.counters["handshake.self"] == 1, ses.counters
        assert not t.peers and not ses.counters["connections.utp"]


async def test_unknown_infohash_is_refused(tmp_path):
    _, _, data = make_content(tmp_path)
    _, _, other = make_content(tmp_path / "o", seed=2)
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as a, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as b:
        await a.add_torrent(data)
        t = await b.add_torrent(other)
        t.add_peer(("127.0.0.1", a.port))
        with trio.fail_after(20):
            while not a.counters["handshake.unknown_infohash"]:
                await trio.sleep(0.05)
        assert not t.peers


async def test_no_transport_is_an_error(tmp_path):
    with pytest.raises(SessionError, match="both uTP and TCP"):
        async with bt.open_session(download_dir=tmp_path, utp=False, tcp=False):
            pass


async def test_three_sessions_swarm_and_leechers_trade(tmp_path):
    """One seed that only serves for a while, two leechers connected to it
    and to each other: both finish, and each leecher uploaded to the other
    (the counters say so)."""
    src, names, data = make_content(tmp_path, sizes=(600_000, 400_000))
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "a", host="127.0.0.1") as a, \
            bt.open_session(download_dir=tmp_path / "b", host="127.0.0.1") as b:
        seed = await s.add_torrent(data)
        ta = await a.add_torrent(data)
        tb = await b.add_torrent(data)
        ta.add_peer(("127.0.0.1", b.port))
        with trio.fail_after(20):
            while not (ta.peers and tb.peers):
                await trio.sleep(0.05)
        ta.add_peer(("127.0.0.1", s.port))
        tb.add_peer(("127.0.0.1", s.port))
        with trio.fail_after(90):
            await ta.wait_finished()
            await tb.wait_finished()
        assert seed.status().uploaded > 0
        assert ta.status().uploaded > 0 and tb.status().uploaded > 0, \
            (ta.status(), tb.status())
    for d in ("a", "b"):
        assert sha256_files(tmp_path / d / "content", names) == sha256_files(src, names)
    assert os.path.isdir(tmp_path / "a" / ".bt-resume")
