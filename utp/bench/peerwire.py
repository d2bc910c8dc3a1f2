"""Just enough BitTorrent to move a file to and from real clients over uTP.

What it is: a single-file metainfo builder (bencoded by
``_utpkit.bencode``) and the BEP 3 peer wire (handshake, bitfield, have, choke/unchoke, interested, request,
piece) as two coroutines over any trio stream: :func:`leech` downloads
every piece and checks it against its SHA-1, :func:`seed` serves requests
until told to stop.  The interop tests and ``python -m utp.bench interop``
use it to download from and upload to libtorrent and Transmission over a
:class:`utp.UTPStream`, so that our uTP can be checked against theirs
before the BitTorrent peer (package ``bt``) exists.

What it is not: a BitTorrent client.  No extension protocol, no fast
extension, no encryption, no endgame, one peer per call, the whole file in
memory; messages it does not use are read and ignored.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from _utpkit.bencode import encode as bencode

__all__ = ["Torrent", "make_torrent", "PeerWire", "WireError", "PeerClosed", "HandshakeRefused",
           "leech", "seed", "BLOCK", "peer_id"]

BLOCK = 16384                  # the request size every client accepts
PIPELINE = 128                 # requests kept outstanding (2 MiB)
MAX_MESSAGE = (1 << 20) + 64   # longest message we accept (a bitfield or a piece)
PROTOCOL = b"\x13BitTorrent protocol"

CHOKE, UNCHOKE, INTERESTED, NOT_INTERESTED, HAVE, BITFIELD, REQUEST, PIECE, CANCEL = range(9)


class WireError(Exception):
    """The peer broke the protocol (the message says how) or hung up early."""


class PeerClosed(WireError):
    """The peer closed the connection (EOF between or inside messages)."""


class HandshakeRefused(PeerClosed):
    """The peer closed the connection before its handshake arrived: it
    turned the connection down (Transmission does so while it still holds
    an earlier, half-open connection from the same address).  Clients
    retry such a peer later."""


@dataclass
class Torrent:
    """A single-file torrent whose data is in memory."""

    name: str
    data: bytes
    piece_length: int
    hashes: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.hashes = [hashlib.sha1(self.piece(i)).digest() for i in range(self.num_pieces)]

    @property
    def num_pieces(self) -> int:
        return (len(self.data) + self.piece_length - 1) // self.piece_length

    def piece_size(self, index: int) -> int:
        return min(self.piece_length, len(self.data) - index * self.piece_length)

    def piece(self, index: int) -> bytes:
        start = index * self.piece_length
        return self.data[start:start + self.piece_size(index)]

    @property
    def info(self) -> dict[str, Any]:
        return {"name": self.name, "length": len(self.data), "piece length": self.piece_length,
                "pieces": b"".join(self.hashes), "private": 1}

    @property
    def info_hash(self) -> bytes:
        return hashlib.sha1(bencode(self.info)).digest()

    def metainfo(self) -> bytes:
        """The .torrent file: no announce URL (private, trackerless: the
        peers are connected by hand, and nothing reaches out to the world)."""
        return bencode({"info": self.info, "created by": "utpkit interop"})

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def make_torrent(size: int, piece_length: int = 1 << 20, name: str = "utpkit-interop.bin") -> Torrent:
    """A torrent of ``size`` random bytes."""
    return Torrent(name, os.urandom(size), piece_length)


def peer_id() -> bytes:
    """Azureus-style: our client code, then random."""
    return b"-UK0001-" + os.urandom(6).hex().encode()


class PeerWire:
    """Length-prefixed BitTorrent messages over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self.remote_id = b""

    async def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some()
            if not chunk:
                raise PeerClosed(f"the peer closed the connection ({len(self._buf)} of {n} bytes read)")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def handshake(self, info_hash: bytes, my_id: bytes) -> None:
        """Send ours and read theirs (either side may go first: both send
        at once); the torrent must match."""
        await self.stream.send_all(PROTOCOL + bytes(8) + info_hash + my_id)
        try:
            theirs = await self._read(68)
        except PeerClosed as exc:
            raise HandshakeRefused(str(exc)) from None
        if theirs[:20] != PROTOCOL:
            raise WireError(f"not a BitTorrent handshake: {theirs[:20]!r}")
        if theirs[28:48] != info_hash:
            raise WireError(f"handshake for another torrent: {theirs[28:48].hex()}")
        self.remote_id = theirs[48:68]

    async def send(self, kind: int, payload: bytes = b"") -> None:
        await self.stream.send_all(struct.pack(">IB", len(payload) + 1, kind) + payload)

    async def receive(self) -> tuple[int, bytes] | None:
        """The next message as (id, payload); None for a keep-alive."""
        (length,) = struct.unpack(">I", await self._read(4))
        if length == 0:
            return None
        if length > MAX_MESSAGE:
            raise WireError(f"message of {length} bytes (limit {MAX_MESSAGE})")
        body = await self._read(length)
        return body[0], body[1:]


def _has(bitfield: bytes, index: int) -> bool:
    return index // 8 < len(bitfield) and bool(bitfield[index // 8] & (0x80 >> (index % 8)))


def full_bitfield(num_pieces: int) -> bytes:
    bits = bytearray(b"\xff" * ((num_pieces + 7) // 8))
    spare = len(bits) * 8 - num_pieces
    if spare:
        bits[-1] = (0xFF << spare) & 0xFF
    return bytes(bits)


async def leech(stream: trio.abc.Stream, info_hash: bytes, hashes: list[bytes], length: int,
                piece_length: int, marks: dict[str, float] | None = None) -> bytes:
    """Download the whole torrent from the peer on ``stream``; every piece
    is checked against its SHA-1 (WireError on a mismatch).  Returns the
    data.  ``marks["first_piece"]`` gets the trio time of the first block
    (peers wait seconds before they unchoke: not transfer time)."""
    wire = PeerWire(stream)
    await wire.handshake(info_hash, peer_id())
    await wire.send(INTERESTED)
    n = len(hashes)
    sizes = [min(piece_length, length - i * piece_length) for i in range(n)]
    pieces = [bytearray(s) for s in sizes]
    missing = [(s + BLOCK - 1) // BLOCK for s in sizes]
    todo = [(i, off, min(BLOCK, sizes[i] - off)) for i in range(n) for off in range(0, sizes[i], BLOCK)]
    todo.reverse()                                  # pop() from the end: piece 0 first
    outstanding: set[tuple[int, int, int]] = set()
    have = bytearray((n + 7) // 8)
    choked, done = True, 0

    async def fill() -> None:
        skipped = []
        while not choked and len(outstanding) < PIPELINE and todo:
            block = todo.pop()
            if not _has(have, block[0]):
                skipped.append(block)
                continue
            outstanding.add(block)
            await wire.send(REQUEST, struct.pack(">III", *block))
        todo.extend(reversed(skipped))

    while done < n:
        msg = await wire.receive()
        if msg is None:
            continue
        kind, payload = msg
        if kind == BITFIELD:
            have[:] = payload[:len(have)].ljust(len(have), b"\0")
        elif kind == HAVE and len(payload) == 4:
            (i,) = struct.unpack(">I", payload)
            if i < n:
                have[i // 8] |= 0x80 >> (i % 8)
        elif kind == 0x0E:                          # fast extension's have-all
            have[:] = full_bitfield(n)
        elif kind == UNCHOKE:
            choked = False
        elif kind == CHOKE:
            # Without the fast extension a choke drops every request.
            choked = True
            todo.extend(sorted(outstanding, reverse=True))
            outstanding.clear()
        elif kind == PIECE:
            i, off = struct.unpack(">II", payload[:8])
            block = (i, off, len(payload) - 8)
            if block not in outstanding:
                continue                            # late, after a choke: asked again
            outstanding.discard(block)
            if marks is not None:
                marks.setdefault("first_piece", trio.current_time())
            pieces[i][off:off + block[2]] = payload[8:]
            missing[i] -= 1
            if missing[i] == 0:
                if hashlib.sha1(pieces[i]).digest() != hashes[i]:
                    raise WireError(f"piece {i} does not match its SHA-1")
                done += 1
        await fill()
    return b"".join(pieces)


async def seed(stream: trio.abc.Stream, torrent: Torrent, stop: trio.Event,
               marks: dict[str, float] | None = None) -> int:
    """Serve ``torrent`` to the peer on ``stream`` (bitfield full, unchoke
    when interested, answer requests) until ``stop`` is set or the peer
    has every piece or hangs up (a client that completes closes its
    connections to seeds: whether it really has everything is for the
    caller to check on its side); returns the payload bytes served.
    ``marks["first_piece"]`` gets the trio time of the first request."""
    wire = PeerWire(stream)
    await wire.handshake(torrent.info_hash, peer_id())
    await wire.send(BITFIELD, full_bitfield(torrent.num_pieces))
    served = 0
    theirs: set[int] = set()
    with trio.move_on_after(float("inf")) as scope:
        async def watch() -> None:
            await stop.wait()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            while len(theirs) < torrent.num_pieces:
                try:
                    msg = await wire.receive()
                except PeerClosed:
                    break
                if msg is None:
                    continue
                kind, payload = msg
                if kind == INTERESTED:
                    await wire.send(UNCHOKE)
                elif kind == HAVE and len(payload) == 4:
                    theirs.add(struct.unpack(">I", payload)[0])
                elif kind == REQUEST and len(payload) == 12:
                    i, off, size = struct.unpack(">III", payload)
                    if i >= torrent.num_pieces or size > 1 << 17 or off + size > torrent.piece_size(i):
                        raise WireError(f"request out of range: piece {i} offset {off} length {size}")
                    start = i * torrent.piece_length + off
                    if marks is not None:
                        marks.setdefault("first_piece", trio.current_time())
                    await wire.send(PIECE, payload[:8] + torrent.data[start:start + size])
                    served += size
            nursery.cancel_scope.cancel()
    return served
