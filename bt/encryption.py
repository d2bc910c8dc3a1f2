"""MSE on trio streams: the policy, the handshake drivers and the RC4
stream that carries a connection once the handshake selected RC4.

Policies (``bt download/seed --encryption``), in libtorrent's terms:

- ``disabled``: plain handshakes only; an incoming MSE handshake is not
  understood (it fails as a bad BitTorrent handshake).
- ``enabled``: incoming plain and MSE accepted; outgoing plain first, and
  MSE on a new connection if the peer closed the plain one before its
  handshake (a peer that requires encryption does).  As MSE responder we
  pick plaintext when offered both (libtorrent's ``prefer_rc4=false``).
- ``preferred`` (the default): outgoing MSE first, offering RC4 and
  plaintext, and a plain handshake on a new connection if the MSE one
  fails -- what libtorrent does by default (``out_enc_policy`` and
  ``in_enc_policy`` ``pe_enabled``, ``allowed_enc_level`` ``pe_both``:
  ``fast_reconnect`` in plain after a failed encrypted attempt); incoming
  both.  As responder we pick RC4 when offered both (libtorrent picks
  plaintext there unless ``prefer_rc4``: a user who prefers encryption
  gets it).
- ``required``: MSE with RC4 only, both ways; plain handshakes and MSE
  offering only plaintext are refused (Transmission's "required" offers
  only RC4 too).

:class:`RC4Stream` is a ``trio.abc.HalfCloseableStream`` over the uTP or
TCP stream, so :class:`bt.peer.PeerConnection` runs on it unchanged.  A
connection that selected plaintext needs no wrapper: the bytes that came
with the handshake go straight to the peer-wire core.
"""

from __future__ import annotations

import random
from typing import Iterable

import trio

from _utpkit.contract import StrEnum

from .mse import (CRYPTO_PLAINTEXT, CRYPTO_RC4, RC4, CryptoMethod, Established, MSEError,
                  MSEHandshake, MSEReason)

__all__ = ["EncryptionPolicy", "DEFAULT_POLICY", "RC4Stream", "initiate", "accept",
           "outgoing_attempts", "MSEError", "MSEReason", "CryptoMethod"]

#: Bytes per read during the handshake: the largest step is 96 + 512 + 20 +
#: 34 + 512 + 2 + IA; reading more only moves payload into the leftovers.
_READ = 16 * 1024


class EncryptionPolicy(StrEnum):
    DISABLED = "disabled"
    ENABLED = "enabled"
    PREFERRED = "preferred"
    REQUIRED = "required"


#: libtorrent's default behaviour (see the module docstring).
DEFAULT_POLICY = EncryptionPolicy.PREFERRED


def outgoing_attempts(policy: EncryptionPolicy) -> tuple[bool, ...]:
    """Whether each outgoing attempt uses MSE, in order; a later attempt
    is made only when the earlier one failed before the peer's handshake."""
    return {EncryptionPolicy.DISABLED: (False,), EncryptionPolicy.ENABLED: (False, True),
            EncryptionPolicy.PREFERRED: (True, False),
            EncryptionPolicy.REQUIRED: (True,)}[EncryptionPolicy(policy)]


def _allowed(policy: EncryptionPolicy) -> int:
    return CRYPTO_RC4 if policy == EncryptionPolicy.REQUIRED else CRYPTO_PLAINTEXT | CRYPTO_RC4


class RC4Stream(trio.abc.HalfCloseableStream):
    """A stream whose bytes are RC4 both ways, over ``transport_stream``.

    Each direction's keystream advances with the bytes, so ``send_all``
    encrypts under the transport's own conflict detection (one sender at a
    time, as trio's streams require) before its first await.

    Cancellation: as the transport's; a cancelled ``send_all`` leaves the
    stream in an unknown state (trio's rule), so the connection must end.
    Resource handling: ``aclose`` closes the transport."""

    def __init__(self, transport_stream: trio.abc.Stream, encryptor: RC4, decryptor: RC4) -> None:
        self.transport_stream = transport_stream
        self._enc = encryptor
        self._dec = decryptor
        self._sending = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            out = self._enc.process(data)
            await self.transport_stream.send_all(out)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.transport_stream.receive_some(max_bytes)
        return self._dec.process(data)

    async def send_eof(self) -> None:
        send_eof = getattr(self.transport_stream, "send_eof", None)
        if send_eof is None:
            raise trio.ClosedResourceError("the transport cannot half-close")
        await send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


async def _drive(stream: trio.abc.Stream, core: MSEHandshake) -> Established:
    """Run ``core`` over ``stream`` to its Established event.  MSEError for
    the peer's faults, closing and the timeout; the transport's own errors
    (BrokenResourceError, OSError) pass through."""
    while True:
        out = core.data_to_send()
        if out:
            await stream.send_all(out)
        ev = core.next_event()
        if ev is not None:
            return ev
        timer = core.get_timer()
        with trio.move_on_at(timer if timer is not None else float("inf")):
            data = await stream.receive_some(_READ)
            core.receive_data(data, trio.current_time())
            continue
        core.handle_timer(trio.current_time())


async def initiate(stream: trio.abc.Stream, info_hash: bytes, ia: bytes,
                   policy: EncryptionPolicy, *, timeout: float,
                   rng: random.Random | None = None) -> tuple[trio.abc.Stream, Established]:
    """MSE as initiator over ``stream`` for ``info_hash``, sending ``ia``
    (our BitTorrent handshake) inside step 3.  Returns the stream to use
    (an :class:`RC4Stream` if RC4 was selected, else ``stream``) and the
    event, whose ``payload`` starts the peer's plain byte stream.
    MSEError if the handshake fails."""
    core = MSEHandshake(initiator=True, now=trio.current_time(), timeout=timeout,
                        info_hash=info_hash, ia=ia, allowed=_allowed(policy),
                        prefer_rc4=policy != EncryptionPolicy.ENABLED, rng=rng)
    ev = await _drive(stream, core)
    return _wrap(stream, core, ev), ev


async def accept(stream: trio.abc.Stream, skeys: Iterable[bytes], policy: EncryptionPolicy,
                 *, timeout: float,
                 rng: random.Random | None = None) -> tuple[trio.abc.Stream, Established]:
    """Read an incoming connection's opening: a plain BitTorrent handshake
    (method ``none``, refused with PLAINTEXT_REFUSED under ``required``) or
    an MSE handshake for one of ``skeys``.  Returns as :func:`initiate`."""
    core = MSEHandshake(initiator=False, now=trio.current_time(), timeout=timeout,
                        skeys=skeys, allowed=_allowed(policy),
                        accept_plaintext=policy != EncryptionPolicy.REQUIRED,
                        prefer_rc4=policy != EncryptionPolicy.ENABLED, rng=rng)
    ev = await _drive(stream, core)
    return _wrap(stream, core, ev), ev


def _wrap(stream: trio.abc.Stream, core: MSEHandshake, ev: Established) -> trio.abc.Stream:
    if ev.method is CryptoMethod.RC4:
        assert core.encryptor is not None and core.decryptor is not None
        return RC4Stream(stream, core.encryptor, core.decryptor)
    return stream

