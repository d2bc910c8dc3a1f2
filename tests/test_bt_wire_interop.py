"""Our peer-wire core and picker against real peers over plain TCP on
loopback: libtorrent (PyPI ``libtorrent``, in this process) as seed and as
leecher, and Transmission 3.00 (Debian ``transmission-daemon``) as seed.

A small driver here -- a trio TCP stream feeding :class:`bt.PeerWire`, and
:class:`bt.picker.PiecePicker` choosing blocks -- does the BitTorrent
handshake with the Fast Extension and the extension protocol, exchanges
extension handshakes, and downloads every piece, each checked against the
SHA-1 in the torrent.  The torrent is made with libtorrent's own
create_torrent (bt's metainfo module is written separately).
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from dataclasses import dataclass, field

import pytest
from testsupport import unavailable
import trio

from bt.peerwire import PeerWire, RequestsDropped
from bt.picker import PiecePicker, request_queue_depth
from bt.wire import (AllowedFast, Bitfield, ExtensionHandshake, Geometry, Handshake, HaveAll, HaveNone,
                     Interested, Piece, Reject, Request, Unchoke, allowed_fast_set)
from utp.bench.peers import TransmissionPeer

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _why = f"libtorrent is not importable ({exc}); pip install libtorrent"

pytestmark = pytest.mark.interop

PIECE = 32768
SIZE = 40 * PIECE + 12345          # 41 pieces, the last one short, 3 blocks of it partial


def _make_torrent(where):
    """A v1-only torrent of one random file, made by libtorrent."""
    where.mkdir(parents=True, exist_ok=True)
    data = random.Random(42).randbytes(SIZE)
    (where / "payload.bin").write_bytes(data)
    with warnings.catch_warnings():
        # add_files / create_torrent(file_storage): deprecated in 2.1, still
        # the bindings' simplest way to make a v1-only torrent
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = lt.file_storage()
        lt.add_files(fs, str(where / "payload.bin"))
        ct = lt.create_torrent(fs, PIECE, flags=lt.create_torrent.v1_only)
    lt.set_piece_hashes(ct, str(where))
    return lt.torrent_info(ct.generate()), data


def _lt_session_with(ti, save_path):
    """A libtorrent session with one torrent, TCP only, encryption off."""
    ses = lt.session({
        "listen_interfaces": "127.0.0.1:0",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
        "enable_natpmp": False, "dht_bootstrap_nodes": "",
        "enable_outgoing_utp": False, "enable_incoming_utp": False,
        "in_enc_policy": 2, "out_enc_policy": 2,      # plain BitTorrent handshakes
        "allow_multiple_connections_per_ip": True,
    })
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(save_path)
    return ses, ses.add_torrent(atp)


@pytest.fixture
def lt_seed(tmp_path):
    """A libtorrent session seeding the torrent."""
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")
    ti, data = _make_torrent(tmp_path)
    ses, handle = _lt_session_with(ti, tmp_path)
    yield ses, handle, ti, data
    ses.remove_torrent(handle)
    del ses


@pytest.fixture
def lt_leecher(tmp_path):
    """A libtorrent session that has the torrent and none of its data."""
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")
    ti, data = _make_torrent(tmp_path / "ours")
    ses, handle = _lt_session_with(ti, tmp_path / "theirs")
    yield ses, handle, ti, data, tmp_path / "theirs" / "payload.bin"
    ses.remove_torrent(handle)
    del ses


async def _wait_seeding(handle) -> None:
    with trio.fail_after(20):
        while handle.status().state != lt.torrent_status.seeding:
            await trio.sleep(0.05)


@dataclass
class Download:
    """What one download through our core saw."""
    core: PeerWire
    data: bytes
    handshake: Handshake | None = None
    ext: ExtensionHandshake | None = None
    seen: list[str] = field(default_factory=list)    # message names, in order


async def _download_with_core(port: int, infohash: bytes, geometry: Geometry,
                              hashes: list[bytes], timeout: float) -> Download:
    """Connect to 127.0.0.1:port, and download every piece through a
    PeerWire core and a PiecePicker, checking each piece's SHA-1."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    core = PeerWire(now=trio.current_time(), geometry=geometry)
    picker = PiecePicker(geometry, random.Random(1))
    blocks: dict[int, dict[int, bytes]] = {}
    got: dict[int, bytes] = {}
    result = Download(core, b"")
    core.send(Handshake.make(infohash, b"-UK0001-" + os.urandom(12)))

    def fill_pipeline(now):
        if core.peer_choking or not core.am_interested:
            return
        depth = request_queue_depth(1e6, 0.001, peer_reqq=core.peer_reqq)
        for blk in picker.pick("seed", depth - core.outstanding):
            core.send(Request(*blk))
            picker.requested("seed", blk, now)

    async with stream:
        with trio.fail_after(timeout):
            await stream.send_all(core.data_to_send())
            while len(got) < geometry.num_pieces:
                chunk = await stream.receive_some(65536)
                now = trio.current_time()
                core.receive_data(chunk, now)
                assert chunk, "the seed closed the connection"
                while (ev := core.next_event()) is not None:
                    result.seen.append(type(ev).__name__)
                    if isinstance(ev, Handshake):
                        result.handshake = ev
                        core.send(ExtensionHandshake(m={}, v="utpkit-test", reqq=500))
                        core.send(HaveNone())
                    elif isinstance(ev, ExtensionHandshake):
                        result.ext = ev
                    elif isinstance(ev, (HaveAll, Bitfield)):
                        picker.add_peer("seed", ev if isinstance(ev, Bitfield) else None,
                                        have_all=isinstance(ev, HaveAll))
                        core.send(Interested())
                    elif isinstance(ev, Piece):
                        picker.received("seed", ev.key, now)
                        blocks.setdefault(ev.index, {})[ev.begin] = bytes(ev.data)
                        if picker.piece_complete(ev.index):
                            piece = b"".join(v for _, v in sorted(blocks.pop(ev.index).items()))
                            assert hashlib.sha1(piece).digest() == hashes[ev.index]
                            picker.piece_passed(ev.index)
                            got[ev.index] = piece
                    elif isinstance(ev, Reject):
                        picker.cancelled("seed", ev.key)
                    elif isinstance(ev, RequestsDropped):
                        for r in ev.requests:
                            picker.cancelled("seed", r.key)
                if now >= (core.get_timer() or now + 1):
                    core.handle_timer(now)
                fill_pipeline(now)
                out = core.data_to_send()
                if out:
                    await stream.send_all(out)
    assert picker.complete and core.outstanding == 0
    result.data = b"".join(got[i] for i in range(geometry.num_pieces))
    return result


async def test_download_from_libtorrent_seed_over_tcp(lt_seed):
    ses, handle, ti, data = lt_seed
    await _wait_seeding(handle)
    infohash = bytes.fromhex(str(ti.info_hashes().v1))
    hashes = [bytes(ti.hash_for_piece(i)) for i in range(ti.num_pieces())]
    geometry = Geometry(SIZE, PIECE)
    assert geometry.num_pieces == ti.num_pieces() == 41

    dl = await _download_with_core(ses.listen_port(), infohash, geometry, hashes, 30)
    assert dl.data == data
    # the handshakes: libtorrent sets the extension and fast bits, and
    # tells us the address it sees us at (BEP 10 yourip)
    assert dl.handshake is not None and dl.handshake.extensions and dl.handshake.fast
    assert dl.core.fast and dl.core.extensions
    ext = dl.ext
    assert ext is not None and ext.v and "libtorrent" in ext.v.lower()
    assert ext.yourip_address == "127.0.0.1"
    assert "ut_metadata" in ext.m and dl.core.peer_reqq == ext.reqq
    assert ext.metadata_size == len(ti.info_section())     # passed through
    assert "Unchoke" in dl.seen and ("HaveAll" in dl.seen or "Bitfield" in dl.seen)
    assert handle.status().total_payload_upload >= SIZE


async def test_libtorrent_downloads_from_our_core_as_acceptor(lt_leecher):
    """The accept side: libtorrent connects to us; our core reports its
    handshake, we confirm for that infohash, offer allowed-fast pieces
    while choking, then unchoke and serve every request."""
    ses, handle, ti, data, their_file = lt_leecher
    infohash = bytes.fromhex(str(ti.info_hashes().v1))
    geometry = Geometry(SIZE, PIECE)
    fast_set = allowed_fast_set("127.0.0.1", infohash, geometry.num_pieces, 4)
    served_choked: list[Request] = []
    served: list[Request] = []
    their_hs: list[Handshake] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve(stream):
        core = PeerWire(now=trio.current_time(), geometry=geometry)
        unchoke_at = None
        while True:
            with trio.move_on_after(0.05):
                chunk = await stream.receive_some(65536)
                core.receive_data(chunk, trio.current_time())
                if not chunk:
                    return
            now = trio.current_time()
            while (ev := core.next_event()) is not None:
                if isinstance(ev, Handshake):
                    their_hs.append(ev)
                    # one listener could serve many torrents: we pick by infohash
                    assert ev.infohash == infohash
                    core.send(Handshake.make(ev.infohash, b"-UK0001-" + os.urandom(12)))
                    core.send(ExtensionHandshake(v="utpkit-test", reqq=500,
                                                 yourip=bytes([127, 0, 0, 1])))
                    core.send(HaveAll())
                    for i in fast_set:
                        core.send(AllowedFast(i))
                elif isinstance(ev, Interested) and unchoke_at is None:
                    unchoke_at = now + 1.0        # first a second of allowed-fast only
                elif isinstance(ev, Request):
                    (served if not core.am_choking else served_choked).append(ev)
                    begin = ev.index * PIECE + ev.begin
                    core.send(Piece(ev.index, ev.begin, data[begin:begin + ev.length]))
            if unchoke_at is not None and now >= unchoke_at and core.am_choking:
                core.send(Unchoke())
            if now >= (core.get_timer() or now + 1):
                core.handle_timer(now)
            out = core.data_to_send()
            if out:
                await stream.send_all(out)

    async def accept_one():
        stream = await listeners[0].accept()
        async with stream:
            await serve(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_one)
        handle.connect_peer(("127.0.0.1", port))
        clients: set[str] = set()
        with trio.fail_after(30):
            while not handle.status().is_seeding:
                # (once it has everything libtorrent drops us, seed to seed)
                clients.update(p.client if isinstance(p.client, str) else p.client.decode()
                               for p in handle.get_peer_info())
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    await listeners[0].aclose()

    assert their_hs and their_hs[0].fast and their_hs[0].extensions
    assert "utpkit-test" in clients, clients       # it read our extension handshake
    # allowed-fast pieces were requested and served while we choked
    assert served_choked and {r.index for r in served_choked} <= set(fast_set)
    assert len(served) + len(served_choked) >= sum(geometry.num_blocks(i)
                                                    for i in range(geometry.num_pieces))
    assert their_file.read_bytes() == data


# ---- Transmission ------------------------------------------------------------------------


@pytest.mark.slow       # Transmission unchokes after its 10 s rechoke timer
async def test_download_from_transmission_seed_over_tcp(tmp_path):
    """Transmission sends its extension handshake *before* its bitfield
    (libtorrent sends it after): the first-message rule must allow that.
    It unchokes ~10.7 s after the handshake (its rechoke timer).
    transmission-daemon seeds over TCP only, encryption, DHT, LPD and PEX
    off (PEERS.md)."""
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")
    why = TransmissionPeer.missing()
    if why is not None:
        unavailable(why, ".ci/run installs transmission-daemon")
    ti, data = _make_torrent(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        metainfo = lt.bencode(lt.create_torrent(ti).generate())
    async with TransmissionPeer(tmp_path / "tr", utp=False) as tr:
        await tr.add(metainfo, tmp_path / "data", seed=True)     # verified, seeding
        infohash = bytes.fromhex(str(ti.info_hashes().v1))
        hashes = [bytes(ti.hash_for_piece(i)) for i in range(ti.num_pieces())]
        dl = await _download_with_core(tr.port, infohash, Geometry(SIZE, PIECE), hashes, 40)
    assert dl.data == data
    assert dl.handshake is not None and dl.core.extensions
    assert dl.ext is not None and dl.ext.v and "transmission" in dl.ext.v.lower()
    assert "Unchoke" in dl.seen and dl.core.fast
    have = "HaveAll" if "HaveAll" in dl.seen else "Bitfield"
    assert dl.seen.index("ExtensionHandshake") < dl.seen.index(have)    # measured order
