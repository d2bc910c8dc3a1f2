"""Our uTP against real, independent stacks (issue 12): libtorrent 2.1.1
(PyPI wheel, forced to uTP) and Transmission 3.00 (Debian's daemon, libutp
inside), each with its default socket buffers.

Our Endpoint downloads 64 MiB from each (it seeds, we leech) and uploads
64 MiB to each (we seed, it leeches) over uTP, speaking just enough
BitTorrent for that (``utp.bench.peerwire``: handshake, bitfield,
interested/unchoke, request/piece; every piece checked against its SHA-1
by the leecher, and the whole file by sha256).  The peer itself must list
the connection as uTP.  Then the same through the NAT lab with 2% loss per
datagram each way (the client on the lab's internet, us behind a lossy
full-cone router).  Our retransmissions and timeouts are printed and kept
as a record_property per run; speed is the benchmark's business
(``python -m utp.bench interop``), not asserted here.

Needs libtorrent, transmission-daemon and (for the lab runs) root:
each skips without, and fails under CI=true.
"""

from __future__ import annotations

import shutil
import struct

import pytest
import trio
import trio.testing
from testsupport import load_natlab, unavailable

from utp.bench.interop import lab_placement, run_transfer
from utp.bench.peerwire import (BLOCK, INTERESTED, PIECE, REQUEST, PeerWire, Torrent, WireError,
                                leech, make_torrent, peer_id, seed)

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _lt_missing = f"libtorrent is not importable ({exc}); pip install libtorrent"

SIZE = 64 << 20
LOSS = 2


def _need(peer: str) -> None:
    if peer == "libtorrent" and lt is None:
        unavailable(_lt_missing, "libtorrent is in the test extra")
    if peer == "transmission" and shutil.which("transmission-daemon") is None:
        unavailable("transmission-daemon is not installed (Debian package transmission-daemon)")


@pytest.fixture(scope="module")
def torrent() -> Torrent:
    return make_torrent(SIZE, 1 << 20)


def test_metainfo_read_by_libtorrent():
    """Our .torrent is what a real client parses: same info-hash, pieces,
    length (the interop runs depend on it)."""
    _need("libtorrent")
    small = make_torrent(5 * 16384 + 7, 32768)
    info = lt.torrent_info(lt.bdecode(small.metainfo()))
    assert bytes.fromhex(str(info.info_hash())) == small.info_hash
    assert info.num_pieces() == small.num_pieces == 3
    assert info.total_size() == len(small.data)
    assert [bytes(info.hash_for_piece(i)) for i in range(3)] == small.hashes


# libtorrent gives every packet three transmissions (utp_num_resends = 3:
# the original, one fast resend, one timeout resend) and at the next
# timeout declares the socket dead ("[sock_read] Connection timed out").
# With 2% loss on the lab's link a packet is lost three times with
# probability 0.02**3 = 8e-6; a 64 MiB download is ~48,600 of libtorrent's
# packets, so about 1 - exp(-0.39) = 32% of these downloads die whatever the
# receiver does (captured on the wire: the fatal packet's three copies all
# lost in the lab).  Our receiver used to make it worse by dropping copies
# that did arrive (window ignoring the reorder buffer, then its slot limit:
# 49 of 68 packets libtorrent sent three times in one run) -- fixed, see
# tests/test_protocol_libtorrent_sender.py.  The upload dies the same way,
# from libtorrent's own packets (its requests): one of them is lost for
# good when each of its three round trips loses the packet or our ACK
# (1 - 0.98**2 = 4% each way round, 6e-5 for all three), seen once in
# about ten CI runs (libtorrent "Connection timed out" mid-upload, our side
# then hearing nothing).  So that one failure, in either direction, is an
# expected failure only when our engine dropped nothing (no drop_invalid:
# every copy that reached us was taken and acknowledged); anything else
# fails.
LT_TIMES_US_OUT = "disconnecting (uTP) [sock_read] [system]: Connection timed out"


async def test_peer_wire_leech_from_seed_over_memory_streams():
    """Our leech and seed against each other (the peer-wire code alone):
    an odd last piece, every byte; a wrong piece hash is caught."""
    t = make_torrent(5 * 32768 + 1000, 32768)
    a, b = trio.testing.memory_stream_pair()
    stop = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(seed, b, t, stop)
        got = await leech(a, t.info_hash, t.hashes, len(t.data), t.piece_length)
        stop.set()
    assert got == t.data
    a, b = trio.testing.memory_stream_pair()
    bad = list(t.hashes)
    bad[3] = bytes(20)
    async with trio.open_nursery() as n:
        n.start_soon(seed, b, t, trio.Event())
        with pytest.raises(WireError, match="piece 3"):
            await leech(a, t.info_hash, bad, len(t.data), t.piece_length)
        n.cancel_scope.cancel()


async def test_seed_ends_when_the_leecher_hangs_up():
    """A client that completes closes its connection to a seed: serving
    ends there (the caller checks the client's own progress)."""
    t = make_torrent(4 * BLOCK, 2 * BLOCK)
    a, b = trio.testing.memory_stream_pair()

    async def leecher():
        wire = PeerWire(a)
        await wire.handshake(t.info_hash, peer_id())
        await wire.send(INTERESTED)
        await wire.send(REQUEST, struct.pack(">III", 1, BLOCK, BLOCK))
        while (msg := await wire.receive()) is None or msg[0] != PIECE:
            pass
        assert msg[1][8:] == t.data[3 * BLOCK:]
        await a.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(leecher)
        assert await seed(b, t, trio.Event()) == BLOCK


def every_peer_and_direction(test):
    """Each real peer, each direction; slow, and an interop test."""
    for mark in (pytest.mark.parametrize("direction", ["download", "upload"]),
                 pytest.mark.parametrize("peer", ["libtorrent", "transmission"]),
                 pytest.mark.interop, pytest.mark.slow):
        test = mark(test)
    return test


async def _run(torrent, tmp_path, peer, direction, record_property, placement=None):
    result = await run_transfer(peer, direction, torrent, str(tmp_path), placement=placement,
                                timeout=240)
    record_property("interop", result.as_dict())
    print(result.line())
    ours = result.extra.get("endpoint")
    if (not result.ok and placement is not None and peer == "libtorrent"
            and any(LT_TIMES_US_OUT in e for e in result.extra.get("peer_errors", []))
            and ours is not None and not ours.get("drop_invalid")):
        pytest.xfail(f"libtorrent's three transmissions of one of its packets (or our ACKs of "
                     f"them) were all lost in the lab (we dropped nothing: {ours}): "
                     f"{result.line()}")
    assert result.ok, f"{result.line()}\n{result.extra}"
    assert result.sha256_equal and result.peer_saw_utp
    return result


@every_peer_and_direction
async def test_64_mib_with_a_real_peer_on_loopback(torrent, tmp_path, peer, direction,
                                                   record_property):
    _need(peer)
    tmp_path.chmod(0o755)
    await _run(torrent, tmp_path, peer, direction, record_property)


@every_peer_and_direction
async def test_64_mib_with_a_real_peer_through_2_percent_loss(torrent, tmp_path, peer, direction,
                                                              record_property):
    _need(peer)
    natlab = load_natlab()
    why = natlab.can_build()
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")
    tmp_path.chmod(0o755)
    with natlab.Lab() as lab:
        placement = lab_placement(lab, LOSS)
        await _run(torrent, tmp_path, peer, direction, record_property, placement)
        counts = await trio.to_thread.run_sync(lab.loss_counters, lab.hosts["us"])
    print(f"router: {counts}")
    # The loss really happened, per datagram: with ~50,000 packets through
    # it, 2% is 1,000 drops (sd ~30).
    assert 0.01 < counts["lost"] / counts["forwarded"] < 0.03, counts
