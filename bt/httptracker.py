"""HTTP(S) tracker announces (BEP 3, BEP 23 compact peers, BEP 7 ``peers6``).

Two halves, as everywhere in utpkit:

- sans-I/O: :func:`announce_url` builds the GET URL from an
  :class:`AnnounceParams` (the infohash and peer id percent-encoded byte by
  byte, as BEP 3 wants: httpx must not re-encode them, so the query is
  built here and handed over as it is); :func:`parse_announce_response`
  turns the body into an :class:`HTTPAnnounceResult` or raises our own
  error -- :class:`TrackerRefused` (a :class:`tracker.TrackerError`) when
  the tracker refused (``failure reason``), :class:`~_utpkit.errors.RemoteProtocolError` when
  the body is not a tracker answer.  Never anything else, whatever the
  bytes (a hypothesis test holds it to that);
- I/O: :class:`HTTPTrackerClient`, one httpx ``AsyncClient`` (connection
  reuse, TLS, redirects) per session, running on trio through anyio, with
  a timeout per announce and a bound on the size of the answer.

Every error names the tracker URL it came from.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

from _utpkit.bencode import BencodeError, decode_untrusted
from _utpkit.errors import LocalProtocolError, NetworkError, RemoteProtocolError
from tracker import AnnounceEvent, TrackerError

__all__ = ["AnnounceParams", "HTTPAnnounceResult", "HTTPTrackerClient", "TrackerRefused", "announce_url",
           "parse_announce_response", "MAX_RESPONSE", "DEFAULT_INTERVAL"]

#: The largest answer we read (a compact list of 200 peers is 1.2 KB; a
#: dictionary list of them about 15 KB): a tracker that sends more is
#: broken or hostile, and we stop reading.
MAX_RESPONSE = 256 * 1024
#: The interval when a tracker leaves it out (libtorrent assumes 30 min).
DEFAULT_INTERVAL = 1800
_EVENT_NAMES = {AnnounceEvent.STARTED: "started", AnnounceEvent.COMPLETED: "completed",
                AnnounceEvent.STOPPED: "stopped"}


@dataclass(frozen=True, slots=True)
class AnnounceParams:
    """What an announce tells the tracker (BEP 3's query parameters)."""
    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int = 0
    downloaded: int = 0
    left: int = 0
    event: AnnounceEvent = AnnounceEvent.NONE
    numwant: int | None = None
    key: int | None = None
    tracker_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class HTTPAnnounceResult:
    """A tracker's successful answer.  ``peers`` merges ``peers`` (compact
    or dictionaries) and ``peers6``; ``dropped`` counts peer entries that
    were not an IP literal with a port in 1..65535.  ``complete`` /
    ``incomplete`` are the seeders and leechers, when the tracker says."""
    interval: int
    min_interval: int | None
    peers: tuple[tuple[str, int], ...]
    tracker_id: bytes | None = None
    warning: str | None = None
    complete: int | None = None
    incomplete: int | None = None
    dropped: int = 0
    #: BEP 24 ``external ip``: the address the tracker saw us come from (a
    #: vote for our external address), when it says.
    external_ip: str | None = None


class TrackerRefused(TrackerError):
    """The tracker answered with a ``failure reason`` (:attr:`reason`)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"tracker {url} refused the announce: {reason}")
        self.url = url
        self.reason = reason


def _quote(b: bytes) -> str:
    # Every byte outside 0-9 a-z A-Z . - _ ~ as %nn (BEP 3).
    return quote_from_bytes(b, safe="")


def announce_url(base: str, p: AnnounceParams) -> str:
    """The announce GET URL: ``base`` (which may carry its own query, e.g.
    a passkey) followed by BEP 3's parameters, ``compact=1`` (BEP 23) and
    ``no_peer_id=1``.  LocalProtocolError for values BEP 3 cannot carry."""
    if len(p.info_hash) != 20 or len(p.peer_id) != 20:
        raise LocalProtocolError("info_hash and peer_id must be 20 bytes each")
    if not 0 <= p.port <= 65535 or min(p.uploaded, p.downloaded, p.left) < 0:
        raise LocalProtocolError(f"port {p.port} or a byte count out of range")
    if "#" in base:
        base = base.split("#", 1)[0]
    q = [f"info_hash={_quote(p.info_hash)}", f"peer_id={_quote(p.peer_id)}", f"port={p.port}",
         f"uploaded={p.uploaded}", f"downloaded={p.downloaded}", f"left={p.left}",
         "compact=1", "no_peer_id=1"]
    if p.event in _EVENT_NAMES:
        q.append(f"event={_EVENT_NAMES[p.event]}")
    if p.numwant is not None:
        q.append(f"numwant={p.numwant}")
    if p.key is not None:
        q.append(f"key={p.key & 0xFFFFFFFF:08x}")
    if p.tracker_id is not None:
        q.append(f"trackerid={_quote(p.tracker_id)}")
    if "?" not in base:
        sep = "?"
    else:
        sep = "" if base.endswith(("?", "&")) else "&"
    return base + sep + "&".join(q)


def _text(v: Any, url: str, field: str) -> str:
    if not isinstance(v, bytes):
        raise RemoteProtocolError(f"tracker {url}: {field!r} is not a string")
    return v.decode("utf-8", "replace")


def _int(d: dict, key: bytes, url: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or v < 0:
        raise RemoteProtocolError(f"tracker {url}: {key.decode()!r} is not a non-negative integer")
    return v


def _compact(blob: bytes, size: int, url: str, field: str) -> list[tuple[str, int]]:
    if len(blob) % size:
        raise RemoteProtocolError(f"tracker {url}: {field!r} length {len(blob)} is not a multiple of {size}")
    out = []
    for i in range(0, len(blob), size):
        ip = str(ipaddress.ip_address(blob[i:i + size - 2]))
        out.append((ip, int.from_bytes(blob[i + size - 2:i + size], "big")))
    return out


def _peer_dicts(items: list, url: str) -> tuple[list[tuple[str, int]], int]:
    # BEP 3's original form: [{"peer id": ..., "ip": ..., "port": ...}, ...]
    out: list[tuple[str, int]] = []
    dropped = 0
    for item in items:
        if not isinstance(item, dict):
            raise RemoteProtocolError(f"tracker {url}: an entry of 'peers' is not a dictionary")
        ip, port = item.get(b"ip"), item.get(b"port")
        try:
            addr = str(ipaddress.ip_address(ip.decode("ascii"))) if isinstance(ip, bytes) else None
        except (ValueError, UnicodeDecodeError):
            addr = None             # a host name (BEP 3 allows it) or junk: not dialled
        if addr is None or not isinstance(port, int) or not 0 < port < 65536:
            dropped += 1
            continue
        out.append((addr, port))
    return out, dropped


def parse_announce_response(body: bytes, *, url: str = "") -> HTTPAnnounceResult:
    """Parse an announce answer.  Raises TrackerRefused with the tracker's
    ``failure reason``, RemoteProtocolError for anything that is not a
    tracker answer (not canonical bencode, not a dictionary, wrong types)."""
    try:
        d = decode_untrusted(body, max_size=MAX_RESPONSE)
    except BencodeError as exc:
        raise RemoteProtocolError(f"tracker {url}: the answer is not bencoded ({exc})") from None
    if not isinstance(d, dict):
        raise RemoteProtocolError(f"tracker {url}: the answer is not a dictionary")
    if b"failure reason" in d:
        raise TrackerRefused(url, _text(d[b"failure reason"], url, "failure reason"))
    interval = _int(d, b"interval", url)
    min_interval = _int(d, b"min interval", url)
    peers: list[tuple[str, int]] = []
    dropped = 0
    raw = d.get(b"peers", b"")
    if isinstance(raw, bytes):
        peers += _compact(raw, 6, url, "peers")
    elif isinstance(raw, list):
        found, dropped = _peer_dicts(raw, url)
        peers += found
    else:
        raise RemoteProtocolError(f"tracker {url}: 'peers' is neither a string nor a list")
    raw6 = d.get(b"peers6", b"")
    if not isinstance(raw6, bytes):
        raise RemoteProtocolError(f"tracker {url}: 'peers6' is not a string")
    peers += _compact(raw6, 18, url, "peers6")
    tid = d.get(b"tracker id")
    if tid is not None and not isinstance(tid, bytes):
        raise RemoteProtocolError(f"tracker {url}: 'tracker id' is not a string")
    warning = d.get(b"warning message")
    ext = d.get(b"external ip")
    external_ip = str(ipaddress.ip_address(ext)) \
        if isinstance(ext, bytes) and len(ext) in (4, 16) else None
    return HTTPAnnounceResult(
        interval=DEFAULT_INTERVAL if interval is None else interval, min_interval=min_interval,
        peers=tuple(peers), tracker_id=tid or None,
        warning=None if warning is None else _text(warning, url, "warning message"),
        complete=_int(d, b"complete", url), incomplete=_int(d, b"incomplete", url),
        dropped=dropped, external_ip=external_ip)


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError as exc:
        raise LocalProtocolError(f"tracker {url!r}: unusable URL: {exc}") from None
    if not ok:
        raise LocalProtocolError(f"not an HTTP tracker URL: {url!r}")


class HTTPTrackerClient:
    """Announces to HTTP(S) trackers over one httpx client.

    ``timeout``: seconds for a whole announce (connect, send, the answer);
    ``max_response``: the most bytes of an answer we read.  Errors:
    TrackerError (refused, or an HTTP error status), TimeoutError,
    NetworkError (could not connect, TLS, too many redirects),
    RemoteProtocolError (an answer that is not a tracker's) -- each naming
    the URL.  Environment proxies are ignored (``trust_env=False``): a
    tracker announce says where we listen, and through a proxy that is a
    lie.  No compression is asked for, so the size bound is on what is
    read.  Close it with :meth:`aclose`."""

    def __init__(self, *, timeout: float = 15.0, max_response: int = MAX_RESPONSE,
                 user_agent: str = "utpkit/0.1", verify: Any = True) -> None:
        import httpx
        self._httpx = httpx
        self.timeout = timeout
        self.max_response = max_response
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), follow_redirects=True, max_redirects=5,
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
            trust_env=False, verify=verify)

    async def announce(self, url: str, params: AnnounceParams) -> HTTPAnnounceResult:
        """One announce to the tracker at ``url`` (as written in the torrent)."""
        import trio
        _check_url(url)
        full = announce_url(url, params)
        httpx = self._httpx
        try:
            with trio.fail_after(self.timeout):
                async with self._client.stream("GET", full) as resp:
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_response:
                            raise TrackerError(f"tracker {url}: the answer is larger than "
                                               f"{self.max_response} bytes")
                    status = resp.status_code
        except (trio.TooSlowError, httpx.TimeoutException):
            raise TimeoutError(f"tracker {url} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise NetworkError(f"tracker {url}: {type(exc).__name__}: {exc}") from None
        except (httpx.InvalidURL, UnicodeError) as exc:    # control characters, too long
            raise LocalProtocolError(f"tracker {url!r}: unusable URL: {exc}") from None
        if status != 200:
            # Some trackers send their failure reason with a 4xx status.
            try:
                parse_announce_response(bytes(body), url=url)
            except RemoteProtocolError:
                pass
            raise TrackerError(f"tracker {url} answered HTTP {status}")
        return parse_announce_response(bytes(body), url=url)

    async def aclose(self) -> None:
        await self._client.aclose()
