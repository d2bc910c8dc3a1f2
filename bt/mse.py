"""Message stream encryption (MSE, "protocol encryption"): the handshake
core, sans-I/O, for both roles.

The handshake (the Vuze/Azureus wiki's "Message Stream Encryption", as
libtorrent and Transmission speak it), A the initiator, B the responder::

    1 A->B: Ya, PadA
    2 B->A: Yb, PadB
    3 A->B: HASH('req1', S), HASH('req2', SKEY) xor HASH('req3', S),
            ENCRYPT(VC, crypto_provide, len(PadC), PadC, len(IA)), ENCRYPT(IA)
    4 B->A: ENCRYPT(VC, crypto_select, len(PadD), PadD), ENCRYPT2(payload)
    5 A->B: ENCRYPT2(payload)

Y is a Diffie-Hellman public key over the 768-bit prime below with
generator 2 (96 bytes, big-endian), S the shared secret, SKEY the torrent's
infohash, HASH SHA-1, VC eight zero bytes, every pad 0..512 random bytes.
ENCRYPT is RC4 keyed with HASH('keyA', S, SKEY) from A to B and
HASH('keyB', S, SKEY) from B to A, the first 1024 bytes of each keystream
discarded; ENCRYPT2 is what B selected: RC4 continued (0x02) or plaintext
(0x01).  IA (our BitTorrent handshake) is always RC4.

The sync points bound what a peer can make us read: B looks for
HASH('req1', S) in at most 512 + 20 bytes after Ya, A for ENCRYPT(VC) in at
most 512 + 8 bytes after Yb (libtorrent's limits, from the pad bound).
The responder also tells a plain BitTorrent handshake (``\\x13BitTorrent
protocol``) from a DH key by its first 20 bytes, as libtorrent does, and
finds SKEY by trying every infohash it serves.

Every fault of the peer raises :class:`MSEError` with a :class:`MSEReason`
(a driver counts them); the core then stays failed.  Drive it like any
stream core: ``receive_data(data, now)``, ``data_to_send()``,
``next_event()`` (one :class:`Established`), ``get_timer()`` /
``handle_timer(now)``.  After :class:`Established` the caller moves the
byte stream to :class:`RC4` objects (``encryptor`` / ``decryptor``), or
none for plaintext.
"""

from __future__ import annotations

import enum
import hashlib
import random
import struct
from dataclasses import dataclass
from typing import Any, Iterable

from _utpkit.contract import StrEnum
from _utpkit.errors import LocalProtocolError, RemoteProtocolError

from .wire import PROTOCOL, Event

__all__ = ["MSEHandshake", "MSEError", "MSEReason", "CryptoMethod", "Established", "RC4",
           "P", "G", "DH_KEY_LEN", "MAX_PAD", "CRYPTO_PLAINTEXT", "CRYPTO_RC4", "MAX_IA"]

#: The MSE prime (768 bits) and generator.
P = int("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0"
        "8798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9"
        "A63A36210000000000090563", 16)
G = 2
DH_KEY_LEN = 96
#: The spec's bound on every pad (A to D).
MAX_PAD = 512
#: Private keys: 160 bits, as the spec recommends (more costs time, adds nothing).
PRIVATE_KEY_BITS = 160
VC = bytes(8)
CRYPTO_PLAINTEXT = 0x01
CRYPTO_RC4 = 0x02
#: len(IA) is a 16-bit field; its whole range is a bounded buffer.
MAX_IA = 0xFFFF
#: RC4's first bytes are biased: MSE discards 1024 of each keystream.
RC4_DISCARD = 1024
_U16 = struct.Struct(">H")
_SELECT = struct.Struct(">IH")


def _arc4() -> Any:
    """cryptography's ARC4: under ``hazmat.decrepit`` since release 43, in
    ``primitives.ciphers.algorithms`` before (removed there in 48)."""
    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
    except ImportError:             # pragma: no cover - older cryptography
        from cryptography.hazmat.primitives.ciphers.algorithms import ARC4
    return ARC4


class RC4:
    """One RC4 keystream (cryptography's OpenSSL-backed ARC4): ``process``
    encrypts or decrypts, continuing the stream.  ``discard`` keystream
    bytes are dropped first (MSE: 1024)."""

    __slots__ = ("_ctx",)

    def __init__(self, key: bytes, discard: int = 0) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher
        self._ctx = Cipher(_arc4()(key), mode=None).encryptor()
        if discard:
            self._ctx.update(bytes(discard))

    def process(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._ctx.update(data) if data else b""


class CryptoMethod(StrEnum):
    """How the payload travels: ``none`` (no MSE: a plain BitTorrent
    handshake), ``plaintext`` (MSE handshake, payload in the clear: only
    the handshake is hidden) or ``rc4``."""
    NONE = "none"
    PLAINTEXT = "plaintext"
    RC4 = "rc4"


class MSEReason(StrEnum):
    """Why an MSE handshake failed: one counter each."""
    BAD_DH_KEY = "bad_dh_key"               # Y outside [2, P-2]
    SYNC_NOT_FOUND = "sync_not_found"       # no HASH('req1', S) within PadA's bound
    VC_NOT_FOUND = "vc_not_found"           # no ENCRYPT(VC) within PadB's bound
    UNKNOWN_INFOHASH = "unknown_infohash"   # SKEY is none of our torrents
    BAD_VC = "bad_vc"
    NO_COMMON_METHOD = "no_common_method"   # crypto_provide has nothing we allow
    BAD_SELECT = "bad_select"               # crypto_select not one method we provided
    BAD_PAD_LENGTH = "bad_pad_length"       # len(PadC) / len(PadD) above 512
    PLAINTEXT_REFUSED = "plaintext_refused"  # a plain handshake where MSE is required
    TIMEOUT = "timeout"
    CLOSED = "closed"                       # the peer closed the stream midway


class MSEError(RemoteProtocolError):
    """The peer broke the MSE handshake (or let it time out); ``reason``
    says how."""

    def __init__(self, reason: MSEReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Established(Event):
    """The handshake is done.  ``method`` is what carries the payload
    (``none``: the responder saw a plain BitTorrent handshake);
    ``info_hash`` the SKEY (None for ``none``); ``payload`` the peer's
    bytes after the handshake, already decrypted: its IA and whatever
    followed (for ``none``, everything read so far)."""
    method: CryptoMethod
    info_hash: bytes | None
    payload: bytes


def _sha1(*parts: bytes) -> bytes:
    return hashlib.sha1(b"".join(parts)).digest()


class _State(enum.Enum):
    DETECT = enum.auto()        # responder: plain handshake or DH key?
    READ_Y = enum.auto()        # the peer's public key
    FIND_REQ1 = enum.auto()     # responder: HASH('req1', S) after PadA
    READ_PROVIDE = enum.auto()  # responder: SKEY hash, VC, crypto_provide, len(PadC)
    READ_PADC = enum.auto()     # responder: PadC, len(IA)
    READ_IA = enum.auto()
    FIND_VC = enum.auto()       # initiator: ENCRYPT(VC) after PadB
    READ_SELECT = enum.auto()   # initiator: crypto_select, len(PadD)
    READ_PADD = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


class MSEHandshake:
    """One side of an MSE handshake (see the module docstring).

    Initiator: ``info_hash`` (SKEY) and ``ia`` (our BitTorrent handshake,
    sent encrypted in step 3) are required.  Responder: ``skeys`` is every
    infohash we serve (read when step 3 arrives, so a live view works);
    ``accept_plaintext`` lets a plain BitTorrent handshake through as
    :attr:`CryptoMethod.NONE` instead of failing with PLAINTEXT_REFUSED.

    ``allowed`` is the mask of payload methods we accept (CRYPTO_PLAINTEXT
    | CRYPTO_RC4), which the initiator offers as crypto_provide; with both
    offered the responder picks RC4 if ``prefer_rc4``, else plaintext
    (libtorrent's ``prefer_rc4``).  ``rng`` draws the private key and the
    pads: the default is the system's CSPRNG; pass a seeded
    ``random.Random`` only in tests.
    """

    def __init__(self, *, initiator: bool, now: float, timeout: float,
                 info_hash: bytes | None = None, ia: bytes = b"",
                 skeys: Iterable[bytes] = (), accept_plaintext: bool = False,
                 allowed: int = CRYPTO_PLAINTEXT | CRYPTO_RC4, prefer_rc4: bool = True,
                 rng: random.Random | None = None) -> None:
        if allowed & ~(CRYPTO_PLAINTEXT | CRYPTO_RC4) or not allowed:
            raise LocalProtocolError(f"allowed must be a non-empty mask of 0x01|0x02, "
                                     f"not {allowed!r}")
        if initiator and (info_hash is None or len(info_hash) != 20):
            raise LocalProtocolError("an initiator needs the 20-byte infohash (SKEY)")
        if len(ia) > MAX_IA:
            raise LocalProtocolError(f"IA of {len(ia)} bytes does not fit len(IA)")
        self.initiator = initiator
        self._rng = rng if rng is not None else random.SystemRandom()
        self._deadline = now + timeout
        self._skey = info_hash
        self._ia = ia
        self._skeys = skeys
        self._accept_plaintext = accept_plaintext
        self.allowed = allowed
        self.prefer_rc4 = prefer_rc4
        self._x = 0
        while self._x < 2:
            self._x = self._rng.getrandbits(PRIVATE_KEY_BITS)
        self._s = b""                       # the shared secret, 96 bytes
        self._buf = bytearray()
        self._out = bytearray()
        self._events: list[Established] = []
        self._need = 0                      # a length read from the peer
        self._method = CryptoMethod.NONE
        #: After Established: the RC4 of each direction (None: plaintext).
        self.encryptor: RC4 | None = None
        self.decryptor: RC4 | None = None
        self._enc: RC4 | None = None        # keystreams of the handshake itself
        self._dec: RC4 | None = None
        self._enc_vc = b""
        self._req1 = b""
        self.error: MSEError | None = None
        if initiator:
            self._send_public_key()
            self.state = _State.READ_Y
        else:
            self.state = _State.DETECT

    # ---- the core contract ---------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the peer (``b""``: it closed).  Raises MSEError
        on any fault; LocalProtocolError after the handshake ended."""
        if self.error is not None:
            raise self.error
        if self.state is _State.DONE:
            raise LocalProtocolError("the MSE handshake is over: the stream carries payload")
        try:
            if now >= self._deadline:
                raise MSEError(MSEReason.TIMEOUT, "the handshake took too long")
            if not data:
                raise MSEError(MSEReason.CLOSED, f"the peer closed the stream in {self.state.name}")
            self._buf += data
            while self._step():
                pass
        except MSEError as exc:
            self.state = _State.ERROR
            self.error = exc
            raise

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Established | None:
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        return None if self.state in (_State.DONE, _State.ERROR) else self._deadline

    def handle_timer(self, now: float) -> None:
        if self.state in (_State.DONE, _State.ERROR) or now < self._deadline:
            return
        self.state = _State.ERROR
        self.error = MSEError(MSEReason.TIMEOUT, "the handshake took too long")
        raise self.error

    @property
    def method(self) -> CryptoMethod:
        return self._method

    # ---- the steps -----------------------------------------------------------------------

    def _step(self) -> bool:
        """Advance one state if the buffer allows; True if it did."""
        handler = getattr(self, f"_on_{self.state.name.lower()}", None)
        return bool(handler()) if handler is not None else False

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _send_public_key(self) -> None:
        y = pow(G, self._x, P)
        self._out += y.to_bytes(DH_KEY_LEN, "big")
        self._out += self._rng.randbytes(self._rng.randint(0, MAX_PAD))

    def _on_detect(self) -> bool:
        n = min(len(self._buf), len(PROTOCOL))
        if self._buf[:n] != PROTOCOL[:n]:
            self.state = _State.READ_Y          # not a plain handshake: a DH key
            return True
        if n < len(PROTOCOL):
            return False
        if not self._accept_plaintext:
            raise MSEError(MSEReason.PLAINTEXT_REFUSED, "a plain BitTorrent handshake, "
                           "but encryption is required")
        self._finish(CryptoMethod.NONE, None, self._take(len(self._buf)))
        return False

    def _on_read_y(self) -> bool:
        if len(self._buf) < DH_KEY_LEN:
            return False
        y = int.from_bytes(self._take(DH_KEY_LEN), "big")
        if not 1 < y < P - 1:
            raise MSEError(MSEReason.BAD_DH_KEY, "the peer's public key is out of range")
        self._s = pow(y, self._x, P).to_bytes(DH_KEY_LEN, "big")
        if self.initiator:
            self._send_step3()
            self.state = _State.FIND_VC
        else:
            self._send_public_key()
            self._req1 = _sha1(b"req1", self._s)
            self.state = _State.FIND_REQ1
        return True

    def _keys(self, skey: bytes) -> tuple[RC4, RC4]:
        """(A-to-B, B-to-A) keystreams for SKEY."""
        return (RC4(_sha1(b"keyA", self._s, skey), RC4_DISCARD),
                RC4(_sha1(b"keyB", self._s, skey), RC4_DISCARD))

    def _send_step3(self) -> None:
        assert self._skey is not None
        a2b, b2a = self._keys(self._skey)
        self._enc, self._dec = a2b, b2a
        self._enc_vc = b2a.process(VC)          # what B's ENCRYPT(VC) looks like
        mask = bytes(x ^ y for x, y in zip(_sha1(b"req2", self._skey), _sha1(b"req3", self._s)))
        pad = self._rng.randbytes(self._rng.randint(0, MAX_PAD))
        clear = (VC + struct.pack(">I", self.allowed) + _U16.pack(len(pad)) + pad
                 + _U16.pack(len(self._ia)) + self._ia)
        self._out += _sha1(b"req1", self._s) + mask + a2b.process(clear)
        self._ia = b""

    def _sync(self, mark: bytes, reason: MSEReason, then: _State) -> bool:
        """Find ``mark`` after at most MAX_PAD bytes of pad; fail once the
        window is past without it."""
        i = self._buf.find(mark)
        if i < 0 or i > MAX_PAD:
            if len(self._buf) >= MAX_PAD + len(mark) or i > MAX_PAD:
                raise MSEError(reason, f"not within {MAX_PAD} bytes of pad after the DH key")
            return False
        del self._buf[:i + len(mark)]
        self.state = then
        return True

    def _on_find_req1(self) -> bool:
        return self._sync(self._req1, MSEReason.SYNC_NOT_FOUND, _State.READ_PROVIDE)

    def _on_read_provide(self) -> bool:
        if len(self._buf) < 20 + 8 + 4 + 2:
            return False
        mask = _sha1(b"req3", self._s)
        want = bytes(x ^ y for x, y in zip(self._take(20), mask))
        skey = next((ih for ih in list(self._skeys) if _sha1(b"req2", ih) == want), None)
        if skey is None:
            raise MSEError(MSEReason.UNKNOWN_INFOHASH, "SKEY is none of our torrents")
        self._skey = skey
        self._dec, self._enc = self._keys(skey)
        clear = self._dec.process(self._take(14))
        if clear[:8] != VC:
            raise MSEError(MSEReason.BAD_VC, "the verification constant is not zero")
        provide, pad_len = _SELECT.unpack(clear[8:])
        common = provide & self.allowed
        if not common:
            raise MSEError(MSEReason.NO_COMMON_METHOD, f"crypto_provide {provide:#x}, we "
                           f"allow {self.allowed:#x}")
        if pad_len > MAX_PAD:
            raise MSEError(MSEReason.BAD_PAD_LENGTH, f"len(PadC) {pad_len}")
        if common == CRYPTO_PLAINTEXT | CRYPTO_RC4:
            common = CRYPTO_RC4 if self.prefer_rc4 else CRYPTO_PLAINTEXT
        self._method = CryptoMethod.RC4 if common == CRYPTO_RC4 else CryptoMethod.PLAINTEXT
        pad = self._rng.randbytes(self._rng.randint(0, MAX_PAD))
        self._out += self._enc.process(VC + _SELECT.pack(common, len(pad)) + pad)
        self._need = pad_len
        self.state = _State.READ_PADC
        return True

    def _on_read_padc(self) -> bool:
        if len(self._buf) < self._need + 2:
            return False
        assert self._dec is not None
        clear = self._dec.process(self._take(self._need + 2))
        (self._need,) = _U16.unpack(clear[-2:])
        self.state = _State.READ_IA
        return True

    def _on_read_ia(self) -> bool:
        if len(self._buf) < self._need:
            return False
        assert self._dec is not None
        ia = self._dec.process(self._take(self._need))
        self._finish(self._method, self._skey, ia + self._rest())
        return False

    def _on_find_vc(self) -> bool:
        return self._sync(self._enc_vc, MSEReason.VC_NOT_FOUND, _State.READ_SELECT)

    def _on_read_select(self) -> bool:
        if len(self._buf) < 6:
            return False
        assert self._dec is not None
        select, pad_len = _SELECT.unpack(self._dec.process(self._take(6)))
        if select not in (CRYPTO_PLAINTEXT, CRYPTO_RC4) or not select & self.allowed:
            raise MSEError(MSEReason.BAD_SELECT, f"crypto_select {select:#x}, we provided "
                           f"{self.allowed:#x}")
        if pad_len > MAX_PAD:
            raise MSEError(MSEReason.BAD_PAD_LENGTH, f"len(PadD) {pad_len}")
        self._method = CryptoMethod.RC4 if select == CRYPTO_RC4 else CryptoMethod.PLAINTEXT
        self._need = pad_len
        self.state = _State.READ_PADD
        return True

    def _on_read_padd(self) -> bool:
        if len(self._buf) < self._need:
            return False
        assert self._dec is not None
        self._dec.process(self._take(self._need))
        self._finish(self._method, self._skey, self._rest())
        return False

    def _rest(self) -> bytes:
        """What followed the handshake: ENCRYPT2 payload."""
        rest = self._take(len(self._buf))
        if self._method is CryptoMethod.RC4:
            assert self._dec is not None
            return self._dec.process(rest)
        return rest

    def _finish(self, method: CryptoMethod, skey: bytes | None, payload: bytes) -> None:
        self._method = method
        if method is CryptoMethod.RC4:
            self.encryptor, self.decryptor = self._enc, self._dec
        self._enc = self._dec = None
        self._s = b""
        self.state = _State.DONE
        self._events.append(Established(method, skey, payload))
