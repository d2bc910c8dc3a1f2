"""bt.mse, the MSE handshake core, and bt.encryption's RC4 stream: RC4
against RFC 6229's published keystreams, both roles against each other
(every method choice, byte by byte and whole), the limits (pad bounds, sync
windows, timeout, unknown infohash, plain handshakes), and Hypothesis
feeding hostile bytes to both roles: every input parses or raises MSEError.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bt.encryption import RC4Stream
from bt.wire import PROTOCOL
from bt.mse import (CRYPTO_PLAINTEXT, CRYPTO_RC4, DH_KEY_LEN, MAX_PAD, RC4,
                    CryptoMethod, Established, MSEError, MSEHandshake, MSEReason, P)

IH = hashlib.sha1(b"torrent").digest()
OTHER = hashlib.sha1(b"another torrent").digest()
IA = PROTOCOL + bytes(8) + IH + b"-UK0100-" + bytes(12)

# ---- RC4 (RFC 6229, section 2: keystream bytes at the given offsets) ---------------------

RFC6229 = {
    "0102030405": {0: "b2396305f03dc027ccc3524a0a1118a8", 16: "6982944f18fc82d589c403a47a0d0919",
                   240: "28cb1132c96ce286421dcaadb8b69eae", 256: "1cfcf62b03eddb641d77dfcf7f8d8c93",
                   1008: "45129048e6a0ed0b56b490338f078da5",
                   1024: "30abbcc7c20b01609f23ee2d5f6bb7df",
                   4096: "ff25b58995996707e51fbdf08b34d875"},
    "0102030405060708090a0b0c0d0e0f10": {
        0: "9ac7cc9a609d1ef7b2932899cde41b97", 16: "5248c4959014126a6e8a84f11d1a9e1c",
        1024: "bdf0324e6083dcc6d3cedd3ca8c53c16", 4096: "a36a4c301ae8ac13610ccbc12256cacc"},
    "ebb46227c6cc8b37641910833222772a": {
        0: "720c94b63edf44e131d950ca211a5a30", 1024: "b515a8c5011754f59003058bdb81514e",
        3072: "84a9218fc36e8a5f2ccfbeae53a27d25"},
}


@pytest.mark.parametrize("key", sorted(RFC6229))
def test_rc4_matches_rfc6229(key):
    stream = RC4(bytes.fromhex(key)).process(bytes(4112))
    for offset, want in RFC6229[key].items():
        assert stream[offset:offset + 16].hex() == want, offset


@pytest.mark.parametrize("key", sorted(RFC6229))
def test_rc4_discard_skips_the_keystream_start(key):
    """MSE drops the first 1024 bytes: the next ones are RFC 6229's at 1024."""
    assert RC4(bytes.fromhex(key), 1024).process(bytes(16)).hex() == RFC6229[key][1024]


def _rc4_reference(key: bytes, data: bytes) -> bytes:
    """A textbook RC4 (KSA + PRGA), to check the library on random keys."""
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) & 255
        s[i], s[j] = s[j], s[i]
    out = bytearray()
    i = j = 0
    for b in data:
        i = (i + 1) & 255
        j = (j + s[i]) & 255
        s[i], s[j] = s[j], s[i]
        out.append(b ^ s[(s[i] + s[j]) & 255])
    return bytes(out)


# the key sizes cryptography's ARC4 takes (MSE's are 20 bytes)
_KEYS = st.sampled_from([5, 7, 8, 10, 16, 20, 24, 32]).flatmap(
    lambda n: st.binary(min_size=n, max_size=n))


@given(key=_KEYS, data=st.binary(max_size=600),
       cuts=st.lists(st.integers(0, 600), max_size=5))
@settings(max_examples=50, deadline=None)
def test_rc4_is_a_continuing_stream_and_round_trips(key, data, cuts):
    enc = RC4(key)
    out = b""
    prev = 0
    for cut in sorted(cuts) + [len(data)]:
        cut = min(cut, len(data))
        out += enc.process(data[prev:cut])
        prev = max(prev, cut)
    assert out == _rc4_reference(key, data)
    assert RC4(key).process(out) == data


# ---- the handshake between our two roles -------------------------------------------------


def _pair(*, a_allowed=CRYPTO_PLAINTEXT | CRYPTO_RC4, b_allowed=CRYPTO_PLAINTEXT | CRYPTO_RC4,
          prefer_rc4=True, seed=1, ia=IA, skeys=(OTHER, IH)):
    a = MSEHandshake(initiator=True, now=0.0, timeout=30, info_hash=IH, ia=ia,
                     allowed=a_allowed, rng=random.Random(seed))
    b = MSEHandshake(initiator=False, now=0.0, timeout=30, skeys=skeys, allowed=b_allowed,
                     prefer_rc4=prefer_rc4, rng=random.Random(seed + 1000))
    return a, b


def _run(a, b, *, chunk=None):
    """Shuttle bytes until neither side has more; ``chunk`` bytes at a time."""
    for _ in range(200):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if not data:
                continue
            moved = True
            step = chunk or len(data)
            for i in range(0, len(data), step):
                dst.receive_data(data[i:i + step], 1.0)
        if not moved:
            break
    return a.next_event(), b.next_event()


@pytest.mark.parametrize("a_allowed,b_allowed,prefer_rc4,method", [
    (3, 3, True, "rc4"), (3, 3, False, "plaintext"), (2, 3, False, "rc4"),
    (1, 3, True, "plaintext"), (3, 2, False, "rc4"), (3, 1, True, "plaintext")])
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_both_roles_agree(a_allowed, b_allowed, prefer_rc4, method, chunk):
    a, b = _pair(a_allowed=a_allowed, b_allowed=b_allowed, prefer_rc4=prefer_rc4)
    ea, eb = _run(a, b, chunk=chunk)
    assert ea == Established(CryptoMethod(method), IH, b"")
    assert eb == Established(CryptoMethod(method), IH, IA)    # the IA, decrypted
    if method == "rc4":
        assert b.decryptor.process(a.encryptor.process(b"ping")) == b"ping"
        assert a.decryptor.process(b.encryptor.process(b"pong")) == b"pong"
    else:
        assert a.encryptor is a.decryptor is b.encryptor is b.decryptor is None
    assert a.get_timer() is None and b.get_timer() is None


def test_payload_after_the_handshake_is_handed_over_decrypted():
    """Bytes that arrive with the last handshake step belong to the stream."""
    a, b = _pair()
    b.receive_data(a.data_to_send(), 1.0)               # Ya, PadA
    a.receive_data(b.data_to_send(), 1.0)               # Yb, PadB
    b.receive_data(a.data_to_send(), 1.0)               # step 3 with IA
    step4 = b.data_to_send()
    ev_b = b.next_event()
    assert ev_b.method == "rc4" and ev_b.payload == IA
    a.receive_data(step4 + b.encryptor.process(b"handshake back"), 1.0)
    assert a.next_event().payload == b"handshake back"


def test_no_common_method_and_a_select_we_did_not_offer():
    a, b = _pair(a_allowed=CRYPTO_PLAINTEXT, b_allowed=CRYPTO_RC4)
    with pytest.raises(MSEError) as err:
        _run(a, b)
    assert err.value.reason == MSEReason.NO_COMMON_METHOD
    assert b.error is err.value


def test_unknown_infohash():
    a, b = _pair(skeys=(OTHER,))
    with pytest.raises(MSEError) as err:
        _run(a, b)
    assert err.value.reason == MSEReason.UNKNOWN_INFOHASH


def test_skeys_are_read_when_step3_arrives():
    """A live view (the session's torrents) sees a torrent added midway."""
    live: dict[bytes, None] = {}
    a, b = _pair(skeys=live.keys())
    b.receive_data(a.data_to_send(), 1.0)
    a.receive_data(b.data_to_send(), 1.0)
    live[IH] = None
    b.receive_data(a.data_to_send(), 1.0)
    assert b.next_event().info_hash == IH


def test_plain_handshake_is_told_apart():
    b = MSEHandshake(initiator=False, now=0.0, timeout=30, skeys=(IH,), accept_plaintext=True)
    for byte in IA[:19]:
        b.receive_data(bytes([byte]), 1.0)
        assert b.next_event() is None
    b.receive_data(IA[19:], 1.0)
    assert b.next_event() == Established(CryptoMethod.NONE, None, IA)
    assert b.data_to_send() == b""          # nothing of MSE went out


def test_plain_handshake_refused_when_encryption_is_required():
    b = MSEHandshake(initiator=False, now=0.0, timeout=30, skeys=(IH,))
    with pytest.raises(MSEError) as err:
        b.receive_data(IA, 1.0)
    assert err.value.reason == MSEReason.PLAINTEXT_REFUSED
    with pytest.raises(MSEError):           # and it stays failed
        b.receive_data(b"more", 2.0)


def _dh_key(x: int = 12345) -> bytes:
    return pow(2, x, P).to_bytes(DH_KEY_LEN, "big")


@pytest.mark.parametrize("y", [0, 1, P - 1, P, (1 << 768) - 1])
def test_bad_public_keys(y):
    b = MSEHandshake(initiator=False, now=0.0, timeout=30, skeys=(IH,))
    with pytest.raises(MSEError) as err:
        b.receive_data(y.to_bytes(DH_KEY_LEN, "big"), 1.0)
    assert err.value.reason == MSEReason.BAD_DH_KEY


def test_responder_gives_up_after_512_bytes_of_pad():
    b = MSEHandshake(initiator=False, now=0.0, timeout=30, skeys=(IH,))
    b.receive_data(_dh_key(), 1.0)
    assert b.data_to_send()[:DH_KEY_LEN]    # Yb went out
    b.receive_data(bytes(MAX_PAD + 19), 1.0)    # the sync hash could still come
    with pytest.raises(MSEError) as err:
        b.receive_data(bytes(1), 1.0)
    assert err.value.reason == MSEReason.SYNC_NOT_FOUND


def test_initiator_gives_up_after_512_bytes_of_pad():
    a = MSEHandshake(initiator=True, now=0.0, timeout=30, info_hash=IH, ia=IA)
    a.receive_data(_dh_key(), 1.0)
    a.receive_data(bytes(MAX_PAD + 7), 1.0)
    with pytest.raises(MSEError) as err:
        a.receive_data(bytes(1), 1.0)
    assert err.value.reason == MSEReason.VC_NOT_FOUND


def test_timeout_and_close():
    a = MSEHandshake(initiator=True, now=0.0, timeout=10, info_hash=IH, ia=IA)
    assert a.get_timer() == 10
    a.handle_timer(9.9)                     # not yet
    with pytest.raises(MSEError) as err:
        a.handle_timer(10)
    assert err.value.reason == MSEReason.TIMEOUT
    b = MSEHandshake(initiator=False, now=0.0, timeout=10, skeys=(IH,))
    b.receive_data(_dh_key()[:50], 1.0)
    with pytest.raises(MSEError) as err:
        b.receive_data(b"", 2.0)
    assert err.value.reason == MSEReason.CLOSED
    c = MSEHandshake(initiator=False, now=0.0, timeout=10, skeys=(IH,))
    with pytest.raises(MSEError) as err:
        c.receive_data(_dh_key(), 10.5)     # data past the deadline
    assert err.value.reason == MSEReason.TIMEOUT


# ---- Hypothesis: hostile bytes into both roles -------------------------------------------


def _feed(core, data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` in pieces; any failure must be our MSEError."""
    prev = 0
    try:
        for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
            if cut > prev:
                core.receive_data(data[prev:cut], 1.0)
                core.data_to_send()
                prev = cut
    except MSEError as exc:
        assert isinstance(exc.reason, MSEReason)
        assert core.error is exc
    else:
        ev = core.next_event()
        assert ev is None or isinstance(ev, Established)


_fuzz = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8),
       plain=st.booleans())
@_fuzz
def test_responder_takes_any_bytes(data, cuts, plain):
    b = MSEHandshake(initiator=False, now=0.0, timeout=30, skeys=(IH,), accept_plaintext=plain)
    _feed(b, data, cuts)
    # nothing queued beyond Yb and PadB
    assert len(b.data_to_send()) <= DH_KEY_LEN + MAX_PAD


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8))
@_fuzz
def test_initiator_takes_any_bytes(data, cuts):
    a = MSEHandshake(initiator=True, now=0.0, timeout=30, info_hash=IH, ia=IA)
    _feed(a, data, cuts)


@given(seed=st.integers(0, 2**32), where=st.integers(0, 10_000), flip=st.integers(1, 255),
       extra=st.binary(max_size=64), chunk=st.sampled_from([None, 1, 13]),
       to_initiator=st.booleans())
@_fuzz
def test_a_real_handshake_with_one_byte_damaged(seed, where, flip, extra, chunk, to_initiator):
    """A valid exchange with one byte changed (and junk appended) in what
    one side receives: it completes or fails with MSEError, never anything
    else."""
    a, b = _pair(seed=seed)
    victim, sender = (a, b) if to_initiator else (b, a)
    sent = {id(a): 0, id(b): 0}
    try:
        for _ in range(10):
            for src, dst in ((a, b), (b, a)):
                data = bytearray(src.data_to_send())
                if not data:
                    continue
                if dst is victim:
                    pos = where - sent[id(victim)]
                    if 0 <= pos < len(data):
                        data[pos] ^= flip
                    sent[id(victim)] += len(data)
                step = chunk or len(data)
                for i in range(0, len(data), step):
                    dst.receive_data(bytes(data[i:i + step]), 1.0)
        if victim.next_event() is not None:
            return
        victim.receive_data(extra or b"x", 1.0)
    except MSEError as exc:
        assert isinstance(exc.reason, MSEReason)
    except Exception as exc:            # LocalProtocolError after DONE is our own misuse
        assert type(exc).__name__ == "LocalProtocolError", exc


# ---- the RC4 stream ---------------------------------------------------------------------


async def test_rc4_stream_is_a_half_closeable_stream():
    async def maker():
        x, y = trio.testing.memory_stream_pair()
        k1, k2 = hashlib.sha1(b"one way").digest(), hashlib.sha1(b"the other").digest()
        return (RC4Stream(x, RC4(k1, 1024), RC4(k2, 1024)),
                RC4Stream(y, RC4(k2, 1024), RC4(k1, 1024)))
    await trio.testing.check_half_closeable_stream(maker, None)


async def test_rc4_stream_really_encrypts():
    x, y = trio.testing.memory_stream_pair()
    k, j = hashlib.sha1(b"k").digest(), hashlib.sha1(b"j").digest()
    s = RC4Stream(x, RC4(k, 1024), RC4(j, 1024))
    await s.send_all(IA)
    raw = await y.receive_some()
    assert raw != IA and len(raw) == len(IA)
    assert RC4(k, 1024).process(raw) == IA
    await y.send_all(RC4(j, 1024).process(b"back"))
    assert await s.receive_some() == b"back"
