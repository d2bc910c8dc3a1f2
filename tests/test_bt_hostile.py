"""A hostile peer on real sockets, over uTP and over TCP: test code that
speaks BEP 3 itself (bt.wire's encoders, and bytes no encoder would
produce) from 127.0.0.2 to our sessions on 127.0.0.1.

Against our leecher it sends corrupt blocks (a piece that fails its hash),
an unrequested block, an invalid piece index, an oversized message, then
corrupt blocks again from a new connection: the second hash failure bans
its IP for the session, and its next connection is refused before a byte
is read.  Against our seed it floods requests.  Every violation is counted
with its reason in the torrent's and the session's counters; the download
then completes from the honest seed (also on 127.0.0.1, so the ban must be
by IP and not hit it), and the pieces that failed are fetched again."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest
import trio

import bt
from bt.wire import (Bitfield, Handshake, Have, Interested, Piece, Request, Unchoke,
                     encode_message)
from testsupport import ScriptedPeer, bt_content, sha256_files

PIECE = 16 * 1024           # one block per piece: each request names a whole piece
SIZES = (400_000, 123_457)
HOSTILE_IP = "127.0.0.2"


def _raw(msg) -> bytes:
    return b"".join(bytes(c) for c in encode_message(msg))


class Hostile(ScriptedPeer):
    """One connection of the scripted peer: the handshake and message
    parsing go through a PeerWire core (so our session's messages are
    checked too); the misbehaviour is written as raw bytes."""

    def __init__(self, stream, meta) -> None:
        super().__init__(stream, meta)
        self.requests: list[Request] = []
        self.unchoked = False

    def on_event(self, ev) -> None:
        if isinstance(ev, Request):
            self.requests.append(ev)
        elif isinstance(ev, Unchoke):
            self.unchoked = True

    async def handshake(self) -> None:
        # no Fast Extension: a plain BEP 3 peer (a full bitfield, no have-all)
        self.core.send(Handshake.make(self.meta.info_hash, b"-XX0001-" + bytes(12), fast=False))
        await self.flush()
        with trio.fail_after(10):
            while self.core.peer_handshake is None:
                await self.pump()

    async def send_raw(self, data: bytes) -> None:
        await self.flush()
        await self.stream.send_all(data)

    async def offer_everything(self) -> None:
        n = self.geometry.num_pieces
        self.core.send(Bitfield.from_indices(range(n), n))
        self.core.send(Unchoke())
        await self.flush()

    async def next_request(self) -> Request:
        with trio.fail_after(20):
            while not self.requests:
                await self.pump()
                assert not self.closed, "our session hung up before requesting"
        return self.requests.pop(0)

    async def send_corrupt_answer(self, req: Request) -> None:
        junk = random.Random(req.index).randbytes(req.length)
        self.core.send(Piece(req.index, req.begin, junk))      # requested, wrong bytes
        await self.flush()

    async def wait_closed(self, *, parse: bool = True) -> None:
        """Our session must hang up on us.  ``parse`` False: only read (after
        raw requests, the blocks answering them are news to the core)."""
        with trio.fail_after(20):
            while not self.closed:
                if parse:
                    await self.pump()
                    continue
                try:
                    self.closed = not await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.closed = True


@contextlib.asynccontextmanager
async def _dialer(transport: str):
    """Yields connect(port) -> stream, from HOSTILE_IP."""
    if transport == "utp":
        import utp
        async with utp.open_endpoint(HOSTILE_IP, 0, linger=1.0) as ep:
            yield lambda port: ep.connect(("127.0.0.1", port), timeout=10)
    else:
        yield lambda port: trio.open_tcp_stream("127.0.0.1", port, local_address=HOSTILE_IP)


async def _until(pred, what: str, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_hostile_peer_is_counted_banned_and_the_download_completes(tmp_path, transport):
    src, names, data = bt_content(tmp_path, SIZES, seed=11, piece_length=PIECE, pad_files=False)
    kw = {"host": "127.0.0.1", "utp": transport == "utp", "tcp": transport == "tcp"}
    async with bt.open_session(download_dir=tmp_path / "src", **kw) as s, \
            bt.open_session(download_dir=tmp_path / "dl", **kw) as ls, \
            _dialer(transport) as dial:
        seed = await s.add_torrent(data)
        t = await ls.add_torrent(data)
        meta = t.meta

        async def connect(port: int) -> Hostile:
            h = Hostile(await dial(port), meta)
            await h.handshake()
            return h

        # 1. corrupt blocks: the piece fails its hash (strike one) ...
        h = await connect(ls.port)
        await h.offer_everything()
        first = await h.next_request()
        await h.send_corrupt_answer(first)
        await _until(lambda: t.counters["pieces.failed"] == 1, "first hash failure")
        assert ls.strikes[HOSTILE_IP] == 1 and not ls.banned
        # ... then a block never requested (a valid range no request of ours has)
        await h.send_raw(_raw(Piece(0, 100, b"x" * 1000)))
        await h.wait_closed()
        await _until(lambda: t.counters["violation.unrequested_piece"] == 1, "unrequested")

        # 2. a piece index beyond the torrent
        h = await connect(ls.port)
        await h.send_raw(_raw(Have(meta.num_pieces + 7)))
        await h.wait_closed()
        await _until(lambda: t.counters["violation.bad_index"] == 1, "bad index")

        # 3. a message of 16 MiB announced
        h = await connect(ls.port)
        await h.send_raw(struct.pack(">IB", 1 << 24, 7) + bytes(100))
        await h.wait_closed()
        await _until(lambda: t.counters["violation.message_too_long"] == 1, "oversized")

        # 4. corrupt blocks again: the second strike bans the IP, this
        #    connection is closed at once
        h = await connect(ls.port)
        await h.offer_everything()
        second = await h.next_request()
        await h.send_corrupt_answer(second)
        await h.wait_closed()
        await _until(lambda: t.counters["pieces.failed"] == 2, "second hash failure")
        assert ls.banned == {HOSTILE_IP} and ls.status().banned == frozenset({HOSTILE_IP})
        assert ls.counters["peers.banned"] == 1 and t.counters["peers.banned"] == 1
        await _until(lambda: t.counters["closed.banned"] == 1, "closed for the ban")

        # 5. it comes back: refused before its handshake is read
        refused = ls.counters["refused.banned"]
        with contextlib.suppress(OSError, trio.BrokenResourceError, TimeoutError):
            stream = await dial(ls.port)
            h = Hostile(stream, meta)
            h.core.send(Handshake.make(meta.info_hash, b"-XX0001-" + bytes(12)))
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await h.flush()
            await h.wait_closed()
            assert h.core.peer_handshake is None        # we never answered it
        await _until(lambda: ls.counters["refused.banned"] == refused + 1, "refused again")
        # and we do not dial it either
        t.add_peer((HOSTILE_IP, 9))
        await _until(lambda: ls.counters["refused.banned"] == refused + 2, "not dialed")

        # 6. a request flood against our seed (unchoked, it would serve them):
        #    more distinct requests than the reqq we advertise
        h = await connect(s.port)
        h.core.send(Interested())
        await h.flush()
        with trio.fail_after(20):
            while not h.unchoked:
                await h.pump()
        # Distinct blocks of almost 16 KiB each; we read nothing meanwhile,
        # so the seed's sends stall after what the socket buffers take (at
        # most a few hundred blocks) and the rest stays outstanding.
        full = meta.num_pieces - 1                  # the last piece is short
        flood = b"".join(_raw(Request(i % full, 0, PIECE - i // full)) for i in range(4000))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await h.send_raw(flood)
        await _until(lambda: seed.counters["violation.request_flood"] == 1, "flood")
        await h.wait_closed(parse=False)
        await _until(lambda: seed.counters["violation.request_flood"] == 1, "flood")
        assert s.counters["violation.request_flood"] == 1 and not s.banned

        # the honest seed (127.0.0.1 too) completes the download
        t.add_peer(("127.0.0.1", s.port))
        with trio.fail_after(60):
            await t.wait_finished()
        st = t.status()
        assert st.state == "seeding" and st.counters["pieces.failed"] == 2
        # the two failed pieces were fetched again
        assert set(t.hash_failures) == {first.index, second.index}
        assert st.counters["pieces.passed"] == meta.num_pieces
        for reason in ("unrequested_piece", "bad_index", "message_too_long"):
            assert st.counters[f"violation.{reason}"] == 1, st.counters
            assert ls.counters[f"violation.{reason}"] == 1, ls.counters
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)
