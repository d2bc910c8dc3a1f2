"""Trackers for torrents: the HTTP announce (URL building and the sans-I/O
answer parser, also under hypothesis), the httpx client against a small
HTTP tracker run in the test on trio (exact query parameters, failure
reason, warning message, peers6, min interval, tracker id, stopped), and
our sessions finding each other through opentracker alone -- over http://
and over udp://, behind a first BEP 12 tier that does not answer."""

from __future__ import annotations

import functools
import socket
from urllib.parse import unquote_to_bytes

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import bt
import bt.announce
from _utpkit import bencode
from _utpkit.errors import NetworkError, RemoteProtocolError
from bt.httptracker import (
    MAX_RESPONSE, AnnounceParams, HTTPTrackerClient, TrackerRefused, announce_url,
    parse_announce_response,
)
from testsupport import bt_content, opentracker, sha256_files, unavailable
from tracker import AnnounceEvent, TrackerError

PIECE = 32 * 1024
# Every byte value class: unreserved (kept), reserved and high (escaped).
HASH = bytes([0x00, 0x41, 0x7E, 0x2E, 0x2D, 0x5F, 0x20, 0x25, 0x26, 0x3D, 0xFF, 0x80,
              0x7A, 0x30, 0x2F, 0x3F, 0x2B, 0x23, 0x0A, 0x5A])
PEER_ID = b"-UK0100-\x00\x01abc~.-_ %+"


# ---- URL and answer, sans I/O --------------------------------------------------------


def test_announce_url_encodes_every_byte_as_bep3_wants():
    url = announce_url("http://t.example/announce", AnnounceParams(
        HASH, PEER_ID, 6881, uploaded=1, downloaded=2, left=3, event=AnnounceEvent.STARTED,
        numwant=50, key=0xABC, tracker_id=b"t id"))
    assert url.startswith("http://t.example/announce?info_hash=%00A~.-_%20%25%26%3D%FF%80z0%2F%3F%2B%23%0AZ&")
    query = dict(kv.split("=", 1) for kv in url.split("?", 1)[1].split("&"))
    assert unquote_to_bytes(query["info_hash"]) == HASH
    assert unquote_to_bytes(query["peer_id"]) == PEER_ID
    assert query["port"] == "6881" and query["event"] == "started"
    assert (query["uploaded"], query["downloaded"], query["left"]) == ("1", "2", "3")
    assert query["compact"] == "1" and query["numwant"] == "50" and query["key"] == "00000abc"
    assert unquote_to_bytes(query["trackerid"]) == b"t id"
    # A passkey query in the torrent's URL is kept; no event for a regular one.
    url = announce_url("https://t.example/a?passkey=x", AnnounceParams(HASH, PEER_ID, 1))
    assert url.startswith("https://t.example/a?passkey=x&info_hash=") and "event=" not in url


@given(st.binary(min_size=20, max_size=20), st.binary(min_size=20, max_size=20))
def test_announce_url_round_trips_any_hash(info_hash, peer_id):
    url = announce_url("http://t/a", AnnounceParams(info_hash, peer_id, 1))
    query = dict(kv.split("=", 1) for kv in url.split("?", 1)[1].split("&"))
    assert unquote_to_bytes(query["info_hash"]) == info_hash
    assert unquote_to_bytes(query["peer_id"]) == peer_id
    # only BEP 3's unreserved characters go unescaped
    assert set(query["info_hash"].replace("%", "")) <= set(
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-_~")


def _answer(**fields) -> bytes:
    return bencode.encode({k.replace("_", " "): v for k, v in fields.items()})


def test_parse_compact_peers6_and_dictionary_peers():
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::7") + (6881).to_bytes(2, "big")
    r = parse_announce_response(_answer(
        interval=900, min_interval=300, peers=socket.inet_aton("10.0.0.1") + b"\x1a\xe1",
        peers6=six, complete=3, incomplete=4, tracker_id=b"abc", warning_message=b"be nice"))
    assert r.peers == (("10.0.0.1", 6881), ("2001:db8::7", 6881))
    assert (r.interval, r.min_interval, r.complete, r.incomplete) == (900, 300, 3, 4)
    assert r.tracker_id == b"abc" and r.warning == "be nice"
    r = parse_announce_response(_answer(interval=60, peers=[
        {"ip": b"10.0.0.2", "peer id": b"x" * 20, "port": 51413},
        {"ip": b"::1", "port": 1},
        {"ip": b"host.example", "port": 5},          # a name: not dialled
        {"ip": b"10.0.0.3", "port": 0}]))            # no port
    assert r.peers == (("10.0.0.2", 51413), ("::1", 1)) and r.dropped == 2
    assert r.min_interval is None and r.warning is None and r.external_ip is None
    # BEP 24: the address the tracker saw us at (a vote for our external address)
    r = parse_announce_response(_answer(interval=60, peers=b"", external_ip=bytes([203, 0, 113, 9])))
    assert r.external_ip == "203.0.113.9"
    r = parse_announce_response(_answer(interval=60, peers=b"", external_ip=b"bad"))
    assert r.external_ip is None


def test_parse_failure_reason_and_malformed_answers():
    with pytest.raises(TrackerError, match=r"tracker http://t/a refused the announce: not registered") as ei:
        parse_announce_response(_answer(failure_reason=b"not registered"), url="http://t/a")
    assert isinstance(ei.value, TrackerRefused) and ei.value.reason == "not registered"
    for body, what in [
            (b"<html>", "not bencoded"),
            (b"le", "not a dictionary"),
            (_answer(interval=1, peers=b"\x01" * 7), "not a multiple of 6"),
            (_answer(interval=1, peers6=b"\x01" * 6), "not a multiple of 18"),
            (_answer(interval=-1), "interval"),
            (_answer(interval=1, peers=5), "peers"),
            (_answer(interval=1, peers=[5]), "not a dictionary")]:
        with pytest.raises(RemoteProtocolError, match=what):
            parse_announce_response(body, url="http://t/a")


_bvalues = st.recursive(
    st.integers(-2**70, 2**70) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from([b"peers", b"peers6", b"interval", b"min interval",
                                       b"failure reason", b"warning message", b"tracker id",
                                       b"ip", b"port", b"complete", b"x"]), inner, max_size=5),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), _bvalues.map(bencode.encode)))
def test_parser_on_arbitrary_bytes_parses_or_raises_our_error(body):
    try:
        r = parse_announce_response(body, url="http://t/a")
    except (TrackerError, RemoteProtocolError):
        return
    assert r.interval >= 0
    for ip, port in r.peers:
        assert isinstance(ip, str) and 0 <= port <= 65535


# ---- a tracker of our own on trio --------------------------------------------------


class FakeTracker:
    """An HTTP tracker in the test: records each request's raw query (as
    bytes, percent-decoded) and answers with ``reply(query) -> (status, body)``."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict[str, bytes]] = []
        self.times: list[float] = []
        self.raw: list[bytes] = []
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED, host="127.0.0.1"):
        listeners = await trio.open_tcp_listeners(0, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/announce"

    async def _handle(self, stream):
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            target = data.split(b" ", 2)[1]
            self.raw.append(target)
            query = {k.decode(): unquote_to_bytes(v) for k, _, v in
                     (kv.partition(b"=") for kv in target.split(b"?", 1)[1].split(b"&"))}
            self.requests.append(query)
            self.times.append(trio.current_time())
            status, body = self.reply(query)
            if status is None:                          # never answer
                await trio.sleep_forever()
            await stream.send_all(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                                  % (status, len(body)) + body)


async def _wait_working(torrent, url: str) -> None:
    """Until ``url`` has answered (its answer processed, not only sent)."""
    with trio.fail_after(20):
        while not any(s.url == url and s.state == "working" for s in torrent.status().trackers):
            await trio.sleep(0.05)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_http_client_sends_bep3_query_and_surfaces_errors(nursery):
    six = socket.inet_pton(socket.AF_INET6, "::1") + (7000).to_bytes(2, "big")
    answers = {b"ok": (200, _answer(interval=60, peers=b"", peers6=six)),
               b"refuse": (200, _answer(failure_reason=b"torrent not registered")),
               b"refuse404": (404, _answer(failure_reason=b"gone")),
               b"404": (404, b"<html>not found</html>"),
               b"big": (200, b"d5:peers" + b"%d:" % (MAX_RESPONSE + 10) + b"\0" * (MAX_RESPONSE + 10) + b"e"),
               b"silent": (None, b"")}
    fake = await nursery.start(FakeTracker(lambda q: answers[q["mode"]]).serve)
    client = HTTPTrackerClient(timeout=1.0)
    params = AnnounceParams(HASH, PEER_ID, 6881, uploaded=10, downloaded=20, left=30,
                            event=AnnounceEvent.COMPLETED, numwant=5, key=7)
    try:
        r = await client.announce(fake.url + "?mode=ok", params)
        assert r.peers == (("::1", 7000),) and r.interval == 60
        q = fake.requests[-1]
        assert q["info_hash"] == HASH and q["peer_id"] == PEER_ID
        assert {k: q[k] for k in ("port", "uploaded", "downloaded", "left", "event", "compact",
                                  "numwant", "key")} == {
            "port": b"6881", "uploaded": b"10", "downloaded": b"20", "left": b"30",
            "event": b"completed", "compact": b"1", "numwant": b"5", "key": b"00000007"}
        # On the wire: the URL-encoding we chose, not one httpx redid.
        assert b"info_hash=%00A~.-_%20%25%26%3D%FF%80z0%2F%3F%2B%23%0AZ&" in fake.raw[-1]
        with pytest.raises(TrackerError, match=r"mode=refuse refused the announce: torrent not registered"):
            await client.announce(fake.url + "?mode=refuse", params)
        with pytest.raises(TrackerError, match="refused the announce: gone"):
            await client.announce(fake.url + "?mode=refuse404", params)
        with pytest.raises(TrackerError, match=r"mode=404 answered HTTP 404"):
            await client.announce(fake.url + "?mode=404", params)
        with pytest.raises(TrackerError, match=f"larger than {MAX_RESPONSE} bytes"):
            await client.announce(fake.url + "?mode=big", params)
        with pytest.raises(TimeoutError, match=r"mode=silent did not answer within 1 s"):
            await client.announce(fake.url + "?mode=silent", params)
        dead = f"http://127.0.0.1:{_closed_port()}/announce"
        with pytest.raises(NetworkError, match=f"tracker {dead}: ConnectError"):
            await client.announce(dead, params)
    finally:
        await client.aclose()


async def test_https_to_a_plain_port_and_udp_without_utp_fail_clearly(tmp_path, nursery):
    async def plain(stream):        # answers in clear text whatever it is sent
        async with stream:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nle")
            await trio.sleep(1)
    listeners = await nursery.start(functools.partial(trio.serve_tcp, plain, 0, host="127.0.0.1"))
    client = HTTPTrackerClient(timeout=2)
    tls = f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}/announce"
    try:
        with pytest.raises(NetworkError, match=f"tracker {tls}: ConnectError"):
            await client.announce(tls, AnnounceParams(HASH, PEER_ID, 1))
    finally:
        await client.aclose()
    _, _, data = _content(tmp_path)
    async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1", utp=False) as ses:
        t = await ses.add_torrent(data, trackers=["udp://127.0.0.1:9/announce"])
        with trio.fail_after(10):
            while t.status().trackers[0].state != "failing":
                await trio.sleep(0.05)
        assert "UDP trackers need the session's uTP Endpoint" in t.status().trackers[0].error


async def test_unusable_tracker_urls_fail_alone(tmp_path, nursery):
    """URLs from a torrent are untrusted: each bad one is that tracker's
    error, and the BEP 12 walk goes on to the tracker that works."""
    fake = await nursery.start(FakeTracker(lambda q: (200, _answer(interval=1800, peers=b""))).serve)
    bad = ["http://[::1", "http://\x00/", "http://127.0.0.1:1/\r\nX: y", "https://", "http:///x",
           "http://[zz]/", "udp://[::1", "udp://127.0.0.1:99999", "udp://", "ftp://x/",
           "http://127.0.0.1:1/" + "a" * 70000, "http://127.0.0.1:1/\udcff", "nothing"]
    _, _, data = _content(tmp_path)
    async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ses:
        t = await ses.add_torrent(data, trackers=[bad, [fake.url]])
        await _wait_working(t, fake.url)
        st = t.status().trackers
        assert {s.url for s in st if s.state == "working"} == {fake.url}
        assert all(s.error for s in st if s.url != fake.url), st
        assert sum(s.state == "unsupported" for s in st) == 2      # ftp://, nothing


def _content(tmp_path, seed=1):
    return bt_content(tmp_path, (150_000, 70_001), seed=seed, piece_length=PIECE)


async def test_announcer_tiers_events_intervals_and_stopped(tmp_path, monkeypatch):
    """A torrent whose first tier is a closed port and whose second is our
    tracker: started (with left), the tier walk, peers6, the warning, the
    tracker id echoed, the next announce no sooner than min interval, and
    stopped on close -- all visible in the requests and in status()."""
    monkeypatch.setattr(bt.announce, "INTERVAL_FLOOR", 0.2)
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::9") + (6000).to_bytes(2, "big")
    body = _answer(interval=1, min_interval=2, peers=b"", peers6=six, tracker_id=b"T-1",
                   warning_message=b"be kind", complete=0, incomplete=1)
    _, _, data = _content(tmp_path)
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(FakeTracker(lambda q: (200, body)).serve)
        dead = f"http://127.0.0.1:{_closed_port()}/announce"
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   tracker_timeout=2) as ses:
            t = await ses.add_torrent(data, trackers=[dead, fake.url, "wss://x/y"])
            size = sum(f.length for f in t.meta.files if not f.pad)
            with trio.fail_after(15):       # the answer to the second announce processed
                while not any(s.url == fake.url and s.announces == 2 for s in t.status().trackers):
                    await trio.sleep(0.05)
            st = {s.url: s for s in t.status().trackers}
            assert st[dead].state == "failing" and "ConnectError" in st[dead].error
            assert st[dead].tier == 0 and st[fake.url].tier == 1 and st["wss://x/y"].tier == 2
            assert st["wss://x/y"].state == "unsupported"
            w = st[fake.url]
            assert w.state == "working" and w.error is None and w.warning == "be kind"
            assert w.announces == 2 and w.peers_received == 2 and w.last_peers == 1
            assert (w.interval, w.min_interval, w.seeders, w.leechers) == (1, 2, 0, 1)
            assert 0 <= w.next_announce_in <= 2.1
            first, second = fake.requests[:2]
            assert first["event"] == b"started" and first["left"] == str(size).encode()
            assert first["info_hash"] == t.info_hash and first["peer_id"] == ses.peer_id
            assert first["port"] == str(ses.port).encode() and "trackerid" not in first
            assert "event" not in second and second["trackerid"] == b"T-1"
            assert fake.times[1] - fake.times[0] >= 1.9      # min interval, not interval
            # the peer from peers6 was handed to the torrent (and failed to dial)
            assert t.counters["tracker.peers_dialled"] >= 1
            n = len(fake.requests)
        # after the session closed
        last = fake.requests[n:]
        assert [q.get("event") for q in last][-1] == b"stopped", last
        assert last[-1]["trackerid"] == b"T-1" and last[-1]["numwant"] == b"0"
        nursery.cancel_scope.cancel()


async def test_a_week_long_interval_is_capped_at_an_hour(tmp_path):
    """A tracker asking for a week between announces (interval and min
    interval) gets one an hour: the torrent is not left without new peers."""
    body = _answer(interval=7 * 86400, min_interval=7 * 86400, peers=b"")
    _, _, data = _content(tmp_path)
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(FakeTracker(lambda q: (200, body)).serve)
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   tracker_timeout=2) as ses:
            t = await ses.add_torrent(data, trackers=[fake.url])
            with trio.fail_after(15):
                while not any(s.announces == 1 for s in t.status().trackers):
                    await trio.sleep(0.05)
            (w,) = t.status().trackers
            assert w.interval == 7 * 86400
            ceiling = bt.announce.INTERVAL_CEILING
            assert ceiling - 60 <= w.next_announce_in <= ceiling
        nursery.cancel_scope.cancel()


async def test_no_trackers_and_a_finished_torrent_announces_left_zero(tmp_path, monkeypatch):
    src, _, data = _content(tmp_path)
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(FakeTracker(lambda q: (200, _answer(interval=1800, peers=b""))).serve)
        async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as ses:
            off = await ses.add_torrent(data, trackers=[fake.url], use_trackers=False)
            assert off.status().trackers == ()
        assert fake.requests == []
        async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as ses:
            seed = await ses.add_torrent(data, trackers=[fake.url])
            await _wait_working(seed, fake.url)
            assert len(fake.requests) == 1
        assert [(q["event"], q["left"]) for q in fake.requests] == [(b"started", b"0"),
                                                                    (b"stopped", b"0")]
        nursery.cancel_scope.cancel()


async def test_working_tracker_moves_to_the_front_of_its_tier(tmp_path, nursery):
    fake = await nursery.start(FakeTracker(lambda q: (200, _answer(interval=1800, peers=b""))).serve)
    dead = f"http://127.0.0.1:{_closed_port()}/announce"
    _, _, data = _content(tmp_path)
    for _ in range(4):      # the tier is shuffled: whichever order it drew
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ses:
            t = await ses.add_torrent(data, trackers=[[dead, fake.url]])
            await _wait_working(t, fake.url)
            assert [s.url for s in t.status().trackers] == [fake.url, dead]
            assert all(s.tier == 0 for s in t.status().trackers)


async def test_leecher_finds_seed_in_compact_peers_and_says_completed(tmp_path, nursery):
    """A tracker that names the seed (compact peers) is all the leecher
    has; it downloads, then announces completed with left=0 at once
    (not after the 30-minute interval), and stopped at the end."""
    src, names, data = _content(tmp_path)
    seed_port = []
    fake = await nursery.start(FakeTracker(lambda q: (200, _answer(
        interval=1800, min_interval=1800,
        peers=socket.inet_aton("127.0.0.1") + seed_port[0].to_bytes(2, "big")))).serve)
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s_ses, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as l_ses:
        seed_port.append(s_ses.port)
        await s_ses.add_torrent(data, use_trackers=False)
        leech = await l_ses.add_torrent(data, trackers=[fake.url])
        size = sum(f.length for f in leech.meta.files if not f.pad)     # pad files are not left
        assert size == 150_000 + 70_001 < leech.meta.total_length
        with trio.fail_after(60):
            await leech.wait_finished()
            while leech.status().trackers[0].announces < 2:
                await trio.sleep(0.05)
        assert leech.status().trackers[0].peers_received == 2
    events = [(q.get("event"), q["left"]) for q in fake.requests]
    assert events == [(b"started", str(size).encode()), (b"completed", b"0"), (b"stopped", b"0")]
    assert int(fake.requests[1]["downloaded"]) >= size
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


async def test_over_ipv6_the_leecher_finds_the_seed_in_peers6(tmp_path, nursery):
    """BEP 7 end to end on ::1: the HTTP tracker is reached over IPv6 and
    names the seed in ``peers6`` only."""
    src, names, data = _content(tmp_path)
    seed_port = []
    fake = FakeTracker(lambda q: (200, _answer(
        interval=1800, peers=b"",
        peers6=socket.inet_pton(socket.AF_INET6, "::1") + seed_port[0].to_bytes(2, "big"))))
    try:
        await nursery.start(functools.partial(fake.serve, host="::1"))
    except OSError as exc:
        unavailable(f"no IPv6 loopback (::1): {exc}", "CI needs ::1 on lo")
    url = f"http://[::1]:{fake.port}/announce"
    async with bt.open_session(download_dir=tmp_path / "src", host="::1") as s_ses, \
            bt.open_session(download_dir=tmp_path / "dl", host="::1") as l_ses:
        seed_port.append(s_ses.port)
        await s_ses.add_torrent(data, use_trackers=False)
        leech = await l_ses.add_torrent(data, trackers=[url])
        with trio.fail_after(60):
            await leech.wait_finished()
        assert leech.status().trackers[0].state == "working"
    assert fake.requests[0]["port"] == str(l_ses.port).encode()
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


async def test_a_torrent_stopped_by_an_error_sends_stopped(tmp_path):
    """A storage error takes the torrent out of the swarm: its trackers
    hear stopped then, not only at session close, and only once."""
    from bt.storage import StorageError
    _, _, data = _content(tmp_path)
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(FakeTracker(lambda q: (200, _answer(interval=1800, peers=b""))).serve)
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ses:
            t = await ses.add_torrent(data, trackers=[fake.url])
            await _wait_working(t, fake.url)
            t.fail(StorageError("disk on fire"))
            with trio.fail_after(10):
                while len(fake.requests) < 2:
                    await trio.sleep(0.05)
            assert [q.get("event") for q in fake.requests] == [b"started", b"stopped"]
        assert len(fake.requests) == 2              # not sent twice at close
        nursery.cancel_scope.cancel()


async def test_removing_a_torrent_sends_stopped(tmp_path, nursery):
    """Session.remove_torrent: the torrent's trackers hear stopped then."""
    _, _, data = _content(tmp_path)
    fake = await nursery.start(FakeTracker(lambda q: (200, _answer(interval=1800, peers=b""))).serve)
    async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ses:
        t = await ses.add_torrent(data, trackers=[fake.url])
        await _wait_working(t, fake.url)
        await ses.remove_torrent(t)
        with trio.fail_after(10):
            while len(fake.requests) < 2:
                await trio.sleep(0.05)
        assert [q.get("event") for q in fake.requests] == [b"started", b"stopped"]
    assert len(fake.requests) == 2


async def test_pause_says_stopped_and_resume_started(tmp_path, nursery):
    """A paused torrent leaves the swarm: stopped, no announces; resume
    announces started again (and the session's close says stopped)."""
    _, _, data = _content(tmp_path)
    fake = await nursery.start(FakeTracker(lambda q: (200, _answer(interval=1800, peers=b""))).serve)
    async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ses:
        t = await ses.add_torrent(data, trackers=[fake.url])
        await _wait_working(t, fake.url)
        await t.pause()
        with trio.fail_after(10):
            while len(fake.requests) < 2:
                await trio.sleep(0.05)
        await t.resume()
        with trio.fail_after(10):
            while len(fake.requests) < 3:
                await trio.sleep(0.05)
    assert [q.get("event") for q in fake.requests] == [b"started", b"stopped", b"started", b"stopped"]


# ---- through opentracker: our two sessions find each other ---------------------------


async def _probe(url: str, info_hash: bytes) -> set[tuple[str, int]]:
    """The peers opentracker lists now, asked by a third peer."""
    client = HTTPTrackerClient(timeout=5)
    try:
        r = await client.announce(url, AnnounceParams(info_hash, b"-XX0000-probeprobepr", 1, left=1))
    finally:
        await client.aclose()
    return set(r.peers)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,host", [("http", "127.0.0.1"), ("udp", "127.0.0.1"),
                                         ("udp", None)])
async def test_sessions_find_each_other_through_opentracker(tmp_path, scheme, host):
    """Seed and leecher know only the torrent, whose tier 0 is a closed
    loopback port and tier 1 opentracker: no --peer, the tracker alone
    brings them together, and the leecher completes.  On close both send
    stopped, and opentracker lists neither afterwards."""
    from bt.create import create_torrent
    from bt.metainfo import parse_metainfo_untrusted
    src, names, plain = _content(tmp_path)
    info_hash = parse_metainfo_untrusted(plain).info_hash
    with opentracker([info_hash]) as (ip, port):
        path = "/announce" if scheme == "http" else ""
        live = f"{scheme}://{ip}:{port}{path}"
        dead = f"{scheme}://127.0.0.1:{_closed_port()}{path}"
        data = create_torrent(src, trackers=[[dead], [live]], piece_length=PIECE, pad_files=True)
        meta = parse_metainfo_untrusted(data)
        assert meta.info_hash == info_hash and meta.trackers == ((dead,), (live,))
        http_url = f"http://{ip}:{port}/announce"
        async with bt.open_session(download_dir=tmp_path / "src", host=host,
                                   tracker_timeout=2) as s_ses, \
                bt.open_session(download_dir=tmp_path / "dl", host=host,
                                tracker_timeout=2) as l_ses:
            seed = await s_ses.add_torrent(data)
            await _wait_working(seed, live)
            leech = await l_ses.add_torrent(data)
            with trio.fail_after(60):
                await leech.wait_finished()
            await _wait_working(leech, live)
            for t in (seed, leech):
                st = {s.url: s for s in t.status().trackers}
                assert st[dead].state == "failing" and st[dead].failures >= 1, st
                assert st[live].state == "working" and st[live].announces >= 1, st
            assert leech.status().trackers[1].peers_received >= 1
            assert leech.status().progress == 1.0
            assert seed.status().uploaded > 0
            assert leech.counters["pieces.passed"] == leech.meta.num_pieces
            listed = await _probe(http_url, info_hash)
            assert {("127.0.0.1", s_ses.port), ("127.0.0.1", l_ses.port)} <= listed, listed
            # the leecher told the tracker it completed
            with trio.fail_after(10):
                while leech.status().trackers[1].announces < 2:
                    await trio.sleep(0.05)
        listed = await _probe(http_url, info_hash)
        assert not {("127.0.0.1", s_ses.port), ("127.0.0.1", l_ses.port)} & listed, listed
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)



# ---- libtorrent finds our seed through opentracker -----------------------------------


@pytest.mark.slow
@pytest.mark.interop
async def test_libtorrent_finds_our_seed_through_opentracker(tmp_path):
    """libtorrent (PyPI) is given only the torrent (tier 0 a closed port,
    tier 1 opentracker over HTTP); it learns our seed's address from the
    tracker, connects and downloads every byte from us."""
    try:
        import libtorrent as lt
    except ImportError as exc:
        unavailable(f"libtorrent is not importable ({exc}); pip install libtorrent",
                    "libtorrent is in the test extra; .ci/run installs it")
    from bt.create import create_torrent
    from bt.metainfo import parse_metainfo_untrusted
    src, names, plain = bt_content(tmp_path, (1_000_000, 200_001), seed=3, piece_length=PIECE)
    info_hash = parse_metainfo_untrusted(plain).info_hash
    with opentracker([info_hash]) as (ip, port):
        live = f"http://{ip}:{port}/announce"
        dead = f"http://127.0.0.1:{_closed_port()}/announce"
        data = create_torrent(src, trackers=[[dead], [live]], piece_length=PIECE, pad_files=True)
        ses = lt.session({
            "listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False,
            "enable_upnp": False, "enable_natpmp": False, "dht_bootstrap_nodes": "",
            "in_enc_policy": 2, "out_enc_policy": 2, "allow_multiple_connections_per_ip": True})
        try:
            async with bt.open_session(download_dir=src.parent, host="127.0.0.1",
                                       tracker_timeout=2) as ours:
                t = await ours.add_torrent(data)
                await _wait_working(t, live)
                atp = lt.add_torrent_params()
                atp.ti = lt.torrent_info(lt.bdecode(data))
                atp.save_path = str(tmp_path / "lt")
                handle = ses.add_torrent(atp)
                with trio.fail_after(60):
                    while handle.status().state != lt.torrent_status.seeding:
                        await trio.sleep(0.05)
                conns = ours.counters["connections.utp"] + ours.counters["connections.tcp"]
                assert conns >= 1, ours.counters
                assert t.status().uploaded >= 1_200_001
                assert t.status().trackers[1].state == "working"
                ses.remove_torrent(handle)
        finally:
            del ses
    assert sha256_files(tmp_path / "lt" / "content", names) == sha256_files(src, names)

