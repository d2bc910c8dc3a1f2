"""Strict bencode (BEP 3): one decoder and one encoder for every package
(the DHT's KRPC, the tracker, the BitTorrent peer).

Our own decoder rather than a PyPI one: a KRPC message is attacker-controlled
and at most one UDP datagram, and what the DHT needs from a decoder is narrow
and easy to state -- canonical input only (no leading zeros, no ``-0``,
dictionary keys sorted and unique, nothing after the value), a nesting limit,
and a size limit -- plus a single exception type with the offset.  The
decoder is iterative over a byte index with no slicing of the input except
for string values, so a hostile datagram costs time linear in its length.
"""

from __future__ import annotations

from typing import Any, Union

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["BencodeError", "encode", "decode_untrusted", "decode_with_spans_untrusted",
           "decode_prefix_untrusted", "MAX_DEPTH", "MAX_SIZE"]

MAX_DEPTH = 16      # KRPC nests three deep (dict > dict > list); 16 is generous
MAX_SIZE = 65536    # one UDP datagram

Value = Union[int, bytes, list, dict]


class BencodeError(RemoteProtocolError, ValueError):
    """Input that is not canonical bencode (or is too large or too deep).

    A :class:`RemoteProtocolError` (the bytes came from a peer) and, as it
    always was, a ValueError."""


_DIGITS = b"0123456789"


def decode_untrusted(data: bytes, *, max_depth: int = MAX_DEPTH, max_size: int = MAX_SIZE) -> Any:
    """Decode one canonical bencoded value that spans all of ``data``.

    Raises BencodeError for anything else.  Strings come back as ``bytes``;
    dictionaries as ``dict`` with ``bytes`` keys."""
    data = _input(data, max_size)
    n = len(data)
    value, i = _decode(data, 0, n, 0, max_depth)
    if i != n:
        raise BencodeError(f"trailing data at offset {i}")
    return value


def decode_prefix_untrusted(data: bytes, *, max_depth: int = MAX_DEPTH,
                            max_size: int = MAX_SIZE) -> tuple[Any, int]:
    """Decode the one canonical bencoded value at the start of ``data`` and
    return it with the offset where it ends: for messages that put raw
    bytes after a dictionary (BEP 9's ut_metadata data).  Raises
    BencodeError as :func:`decode_untrusted` does, except for trailing
    data."""
    data = _input(data, max_size)
    return _decode(data, 0, len(data), 0, max_depth)


def decode_with_spans_untrusted(data: bytes, *, max_depth: int = MAX_DEPTH,
                                max_size: int = MAX_SIZE) -> tuple[dict, dict[bytes, tuple[int, int]]]:
    """Decode a canonical bencoded *dictionary* that spans all of ``data``,
    and say where each of its values lies in ``data``.

    Returns ``(value, spans)`` with ``spans[key] == (start, end)``, so that
    ``data[start:end]`` are the exact bytes of ``value[key]`` as received.
    Why: a torrent's infohash is the SHA-1 of its ``info`` dictionary's
    bytes as the creator wrote them; re-encoding the decoded value would
    hash something else whenever a creator's encoding differs from ours.
    Raises BencodeError for anything that :func:`decode_untrusted` refuses,
    and when the top-level value is not a dictionary."""
    data = _input(data, max_size)
    n = len(data)
    if n == 0 or data[0] != 0x64:
        raise BencodeError("the top-level value is not a dictionary")
    if max_depth <= 0:
        raise BencodeError(f"nesting deeper than {max_depth} at offset 0")
    spans: dict[bytes, tuple[int, int]] = {}
    d, i = _decode_dict(data, 1, n, 0, max_depth, spans)
    if i != n:
        raise BencodeError(f"trailing data at offset {i}")
    return d, spans


def _input(data: Any, max_size: int) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("bencode input must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise BencodeError(f"input of {len(data)} bytes exceeds {max_size}")
    return data


def _decode_int(data: bytes, i: int, n: int, end: int) -> tuple[int, int]:
    # data[i] is 'i'; the integer ends at the next 'e'.
    j = data.find(b"e", i + 1, min(n, i + 1 + 64))
    if j < 0:
        raise BencodeError(f"unterminated or oversized integer at offset {i}")
    s = data[i + 1:j]
    neg = s[:1] == b"-"
    digits = s[1:] if neg else s
    if not digits or any(c not in _DIGITS for c in digits):
        raise BencodeError(f"bad integer at offset {i}")
    if (digits[0:1] == b"0" and len(digits) > 1) or (neg and digits == b"0"):
        raise BencodeError(f"non-canonical integer at offset {i}")
    v = int(digits)
    return (-v if neg else v), j + 1


def _decode_str(data: bytes, i: int, n: int) -> tuple[bytes, int]:
    j = data.find(b":", i, min(n, i + 12))
    if j < 0:
        raise BencodeError(f"bad string length at offset {i}")
    s = data[i:j]
    if not s or any(c not in _DIGITS for c in s) or (s[0:1] == b"0" and len(s) > 1):
        raise BencodeError(f"bad string length at offset {i}")
    length = int(s)
    start = j + 1
    if start + length > n:
        raise BencodeError(f"string at offset {i} runs past the end")
    return data[start:start + length], start + length


def _decode(data: bytes, i: int, n: int, depth: int, max_depth: int) -> tuple[Any, int]:
    if i >= n:
        raise BencodeError("unexpected end of input")
    c = data[i]
    if c == 0x69:  # i
        return _decode_int(data, i, n, n)
    if 0x30 <= c <= 0x39:
        return _decode_str(data, i, n)
    if depth >= max_depth:
        raise BencodeError(f"nesting deeper than {max_depth} at offset {i}")
    if c == 0x6C:  # l
        out: list = []
        i += 1
        while True:
            if i >= n:
                raise BencodeError("unterminated list")
            if data[i] == 0x65:
                return out, i + 1
            v, i = _decode(data, i, n, depth + 1, max_depth)
            out.append(v)
    if c == 0x64:  # d
        return _decode_dict(data, i + 1, n, depth, max_depth, None)
    raise BencodeError(f"unexpected byte 0x{c:02x} at offset {i}")


def _decode_dict(data: bytes, i: int, n: int, depth: int, max_depth: int,
                 spans: dict[bytes, tuple[int, int]] | None) -> tuple[dict, int]:
    # data[i] is the first byte after the 'd'; ``spans`` (when given)
    # receives each value's (start, end) offsets.
    d: dict = {}
    last: bytes | None = None
    while True:
        if i >= n:
            raise BencodeError("unterminated dictionary")
        if data[i] == 0x65:
            return d, i + 1
        if not 0x30 <= data[i] <= 0x39:
            raise BencodeError(f"dictionary key at offset {i} is not a string")
        k, i = _decode_str(data, i, n)
        if last is not None and k <= last:
            raise BencodeError(f"dictionary key {k[:32]!r} unsorted or duplicated")
        last = k
        start = i
        d[k], i = _decode(data, i, n, depth + 1, max_depth)
        if spans is not None:
            spans[k] = (start, i)


def encode(value: Any) -> bytes:
    """Bencode ``value`` (int, bytes, str as UTF-8, list/tuple, dict with
    bytes or str keys), keys sorted as BEP 3 requires."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(v: Any, out: list[bytes]) -> None:
    t = type(v)
    if t is bytes:      # the common cases first: KRPC is mostly strings
        out.append(b"%d:" % len(v))
        out.append(v)
    elif t is dict:
        _encode_dict(v, out)
    elif t is int:
        out.append(b"i%de" % v)
    elif t is list or t is tuple:
        out.append(b"l")
        for x in v:
            if type(x) is bytes:
                out.append(b"%d:" % len(x))
                out.append(x)
            else:
                _encode(x, out)
        out.append(b"e")
    elif isinstance(v, bool):
        raise TypeError("bencode has no booleans")
    elif isinstance(v, int):
        out.append(b"i%de" % v)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        _encode(bytes(v), out)
    elif isinstance(v, str):
        _encode(v.encode(), out)
    elif isinstance(v, (list, tuple)):
        _encode(list(v), out)
    elif isinstance(v, dict):
        _encode_dict(v, out)
    else:
        raise TypeError(f"cannot bencode {type(v).__name__}")


def _encode_dict(v: dict, out: list[bytes]) -> None:
    items = sorted(((k.encode() if isinstance(k, str) else bytes(k)), x) for k, x in v.items())
    out.append(b"d")
    prev = None
    for k, x in items:
        if k == prev:
            raise LocalProtocolError(f"cannot bencode a dictionary with the key {k!r} twice "
                                     f"(once as str, once as bytes)")
        prev = k
        out.append(b"%d:" % len(k))
        out.append(k)
        _encode(x, out)
    out.append(b"e")
