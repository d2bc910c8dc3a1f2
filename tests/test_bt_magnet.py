"""Magnet links and ut_metadata (BEP 9): the link parser, the metadata
codec and fetcher (sans-I/O, hostile input through hypothesis), and our
sessions end to end on loopback: a leecher that knows only a magnet link
with ``x.pe`` peers fetches the info dictionary and then the data; a peer
serving a false info dictionary is dropped and the honest one completes
the download."""

from __future__ import annotations

import base64
import hashlib

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import bt
from bt.magnet import Magnet, MagnetError, magnet_from_metainfo, parse_magnet
from bt.metainfo import parse_metainfo_untrusted
from bt.ut_metadata import (METADATA_PIECE, MetadataError, MetadataFetcher, MetadataMessage,
                            MsgType, UtMetadata, UtMetadataHandler,
                            decode_metadata_message_untrusted, encode_metadata_message)
from testsupport import bt_content, sha256_files

IH = hashlib.sha1(b"x").digest()


# ---- magnet links ------------------------------------------------------------------------

def test_parse_hex_and_base32_with_everything():
    b32 = base64.b32encode(IH).decode()
    for xt in (IH.hex(), IH.hex().upper(), b32, b32.lower()):
        m = parse_magnet(f"magnet:?xt=urn:btih:{xt}&dn=My+File%20x&tr=udp%3A%2F%2Ft.example%3A1"
                         f"&tr.1=http://a/announce&tr=http://a/announce"
                         f"&x.pe=10.0.0.1:6881&x.pe=[::1]:51413&xl=123&ws=http://w/")
        assert m.info_hash == IH
        assert m.name == "My File x"
        assert m.trackers == ("udp://t.example:1", "http://a/announce")
        assert m.peers == (("10.0.0.1", 6881), ("::1", 51413))
    again = parse_magnet(str(m))
    assert again == m
    assert str(m).startswith(f"magnet:?xt=urn:btih:{IH.hex()}&dn=My%20File%20x&tr=")


@pytest.mark.parametrize("link, words", [
    ("http://x", "magnet:?"),
    ("magnet:?dn=x", "xt=urn:btih"),
    ("magnet:?xt=urn:btih:abc", "40 hex digits or 32 base32"),
    ("magnet:?xt=urn:btih:" + "g" * 40, "not 40 hex digits"),
    ("magnet:?xt=urn:btih:" + "1" * 32, "not 32 base32"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=example.com:1", "x.pe"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=1.2.3.4:99999", "x.pe"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=::1:80", "x.pe"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=1.2.3.4:0", "port 0"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&tr=", "tr"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&tr=nourl", "tr"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&xt=urn:btih:{'0' * 40}", "two different"),
    (f"magnet:?xt=urn:btih:{IH.hex()}&dn=%ff", "UTF-8"),
])
def test_errors_name_the_part(link, words):
    with pytest.raises(MagnetError) as exc:
        parse_magnet(link)
    assert words in str(exc.value) and "\n" not in str(exc.value)


@given(st.text(max_size=300))
def test_parser_never_fails_otherwise(text):
    for link in (text, "magnet:?" + text, f"magnet:?xt=urn:btih:{IH.hex()}&" + text):
        try:
            m = parse_magnet(link)
        except MagnetError:
            continue
        assert isinstance(m, Magnet) and len(m.info_hash) == 20
        assert parse_magnet(str(m)) == m


@given(st.binary(min_size=20, max_size=20), st.text(max_size=30),
       st.lists(st.sampled_from(["udp://a:1", "http://b/x?y=1&z=2", "https://c/ann"]), max_size=3),
       st.lists(st.tuples(st.sampled_from(["1.2.3.4", "::1", "fe80::2"]),
                          st.integers(1, 65535)), max_size=3, unique=True))
def test_format_round_trips(ih, name, trackers, peers):
    m = Magnet(ih, name or None, tuple(dict.fromkeys(trackers)), tuple(peers))
    assert parse_magnet(m.format()) == m


def test_magnet_of_a_torrent_and_the_cli(tmp_path, capsys):
    _, _, data = bt_content(tmp_path, [1000, 2000])
    meta = parse_metainfo_untrusted(data)
    m = magnet_from_metainfo(meta)
    assert m.info_hash == meta.info_hash and m.name == meta.name
    (tmp_path / "x.torrent").write_bytes(data)
    from bt._cli import main
    assert main(["magnet", str(tmp_path / "x.torrent"), "--peer", "127.0.0.1:7"]) == 0
    out = capsys.readouterr().out.strip()
    assert parse_magnet(out) == magnet_from_metainfo(meta, peers=(("127.0.0.1", 7),))


# ---- ut_metadata codec and fetcher ------------------------------------------------------

def test_codec_round_trip():
    for msg in (MetadataMessage(MsgType.REQUEST, 3), MetadataMessage(MsgType.REJECT, 0),
                MetadataMessage(MsgType.DATA, 1, 20000, b"x" * 3616)):
        assert decode_metadata_message_untrusted(encode_metadata_message(msg)) == msg


@given(st.binary(max_size=300))
def test_decoder_parses_or_raises_its_error(payload):
    for p in (payload, b"d8:msg_typei1e5:piecei0e10:total_sizei5ee" + payload,
              b"d8:msg_typei0e5:piecei" + payload + b"ee"):
        try:
            msg = decode_metadata_message_untrusted(p)
        except MetadataError:
            continue
        assert isinstance(msg, MetadataMessage)


@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda t, p, n, d: encode_metadata_message(MetadataMessage(t, p, n, d)),
              st.integers(0, 3), st.integers(0, 4), st.one_of(st.none(), st.integers(1, 70000)),
              st.binary(max_size=40))), max_size=8))
@settings(deadline=None, max_examples=200)
def test_handler_on_hostile_payloads_raises_only_its_error(payloads):
    """A fetching handler and a serving one fed arbitrary messages: each
    is handled or raises MetadataError; the fetcher never takes a piece it
    did not ask for, and never completes with a wrong dictionary."""
    from bt.wire import ExtensionHandshake
    info = b"d4:name1:x12:piece lengthi16384e6:pieces20:" + bytes(20) + b"6:lengthi1ee"
    fetching = _Source(ih=hashlib.sha1(info).digest())
    for src in (fetching, _Source(info)):
        h = UtMetadataHandler(src)
        h.peer_supports = True
        h.on_handshake(ExtensionHandshake(m={"ut_metadata": 1}, metadata_size=70000), 0.0)
        for p in payloads:
            try:
                h.receive_untrusted(p, 1.0)
            except MetadataError:
                pass
        h.take_payloads()
    assert all(o.info_bytes in (None, info) for o in fetching.outcomes)


def fetch_all(f, peer, info, now=0.0, lie=None):
    """Serve every piece ``f`` asks ``peer`` for; returns the outcome."""
    outcome = None
    while (pieces := f.requests_for(peer, now)):
        for i in pieces:
            chunk = (lie or info)[i * METADATA_PIECE:(i + 1) * METADATA_PIECE]
            outcome = f.on_data(peer, i, len(info), chunk, now) or outcome
    return outcome


def test_fetcher_assembles_verifies_and_drops_a_liar():
    info = bytes(range(256)) * 150          # 38,400 bytes: 3 pieces
    ih = hashlib.sha1(info).digest()
    f = MetadataFetcher(ih)
    assert not f.add_peer("huge", 9 * 1024 * 1024)       # over the size limit
    assert f.add_peer("liar", len(info)) and f.add_peer("honest", len(info))
    assert f.num_pieces == 3
    lie = b"\xff" + info[1:]
    # the liar alone sends every piece: proven, dropped, never asked again
    out = None
    for _ in range(3):
        for i in f.requests_for("liar", 0.0):
            out = f.on_data("liar", i, len(info), lie[i * METADATA_PIECE:][:METADATA_PIECE], 0.0) \
                or out
    assert out is not None and out.info_bytes is None and out.liars == ("liar",)
    assert not f.add_peer("liar", len(info)) and f.requests_for("liar", 0.0) == []
    out = fetch_all(f, "honest", info)
    assert out.info_bytes == info and f.progress == 1.0


def test_mixed_failure_goes_single_source_and_timeouts_move_requests():
    info = bytes(range(256)) * 150
    ih = hashlib.sha1(info).digest()
    f = MetadataFetcher(ih, timeout=5.0, per_peer=2)
    f.add_peer("a", len(info))
    f.add_peer("b", len(info))
    ra, rb = f.requests_for("a", 0.0), f.requests_for("b", 0.0)
    assert ra == [0, 1] and rb == [2]                   # several peers in parallel
    f.expire(5.0)                                       # b never answers piece 2
    assert f.counters["timeouts"] == 3
    assert f.requests_for("b", 6.0) == []               # resting
    lie = b"\xff" + info[1:]
    for i in ra:
        f.on_data("a", i, len(info), lie[i * METADATA_PIECE:][:METADATA_PIECE], 0.0)
    # (a's answers came after its requests expired: dropped, not counted)
    assert f.progress == 0.0
    ra = f.requests_for("a", 11.0)
    rb = f.requests_for("b", 11.0)
    assert ra == [0, 1] and rb == [2]
    for i in ra:
        f.on_data("a", i, len(info), lie[i * METADATA_PIECE:][:METADATA_PIECE], 11.0)
    out = f.on_data("b", 2, len(info), info[2 * METADATA_PIECE:], 11.0)
    assert out is not None and out.info_bytes is None and out.liars == ()   # who lied?
    # single source now: only one peer is asked, and its answer decides
    asked = {p: f.requests_for(p, 12.0) for p in ("a", "b")}
    assert sorted(len(v) > 0 for v in asked.values()) == [False, True]
    src = next(p for p, v in asked.items() if v)
    out = None
    pieces = asked[src]
    while pieces:
        for i in pieces:
            data = (lie if src == "a" else info)[i * METADATA_PIECE:][:METADATA_PIECE]
            out = f.on_data(src, i, len(info), data, 12.0) or out
        pieces = f.requests_for(src, 12.0)
    if src == "a":
        assert out.liars == ("a",)
        out = fetch_all(f, "b", info, 13.0)
    assert out.info_bytes == info


class _Source:
    def __init__(self, info=None, ih=IH):
        self.info_bytes = info
        self.metadata_fetcher = None if info is not None else MetadataFetcher(ih)
        self.outcomes = []

    def metadata_fetched(self, outcome):
        self.outcomes.append(outcome)
        if outcome.info_bytes is not None:
            self.info_bytes, self.metadata_fetcher = outcome.info_bytes, None


def test_handlers_serve_and_fetch_each_other():
    from bt.wire import ExtensionHandshake
    info = b"d4:name1:x12:piece lengthi16384e6:pieces20:" + bytes(20) + b"6:lengthi1ee"
    ih = hashlib.sha1(info).digest()
    seed, leech = _Source(info), _Source(ih=ih)
    hs_, hl = UtMetadataHandler(seed), UtMetadataHandler(leech)
    assert hs_.handshake_fields() == {b"metadata_size": len(info)}
    assert hl.handshake_fields() == {}
    hs_.peer_supports = hl.peer_supports = True
    hs_.on_handshake(ExtensionHandshake(m={"ut_metadata": 3}), 0.0)
    hl.on_handshake(ExtensionHandshake(m={"ut_metadata": 2}, metadata_size=len(info)), 0.0)
    for _ in range(3):
        for p in hl.take_payloads():
            hs_.receive_untrusted(p, 0.0)
        for p in hs_.take_payloads():
            hl.receive_untrusted(p, 0.0)
    assert leech.info_bytes == info and hs_.counters["served"] == 1
    # a peer without the metadata rejects requests
    hl2 = UtMetadataHandler(_Source(ih=ih))
    hl2.peer_supports = True
    hl2.receive_untrusted(encode_metadata_message(MetadataMessage(MsgType.REQUEST, 0)), 0.0)
    assert decode_metadata_message_untrusted(hl2.take_payloads()[0]).msg_type == MsgType.REJECT


# ---- sessions on loopback -------------------------------------------------------------------

def _link(meta, *ports):
    return str(magnet_from_metainfo(meta, peers=tuple(("127.0.0.1", p) for p in ports)))


async def test_our_leecher_fetches_metadata_and_data_by_magnet(tmp_path):
    # 500 files: an info dictionary of two 16 KiB metadata pieces
    src, names, data = bt_content(tmp_path, [100 + n for n in range(500)], pad_files=False,
                                  piece_length=16384)
    meta = parse_metainfo_untrusted(data)
    assert len(meta.info_bytes) > METADATA_PIECE
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as seed_ses, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as leech_ses:
        await seed_ses.add_torrent(data)
        leech = await leech_ses.add_torrent(_link(meta, seed_ses.port))
        assert not leech.has_metadata and leech.status().state == "metadata"
        assert parse_magnet(leech.magnet_link).info_hash == meta.info_hash
        assert leech.status().metadata_progress == 0.0
        with trio.fail_after(60):
            await leech.wait_metadata()
            assert leech.meta.info_hash == meta.info_hash and leech.name == meta.name
            assert parse_magnet(leech.magnet_link) == magnet_from_metainfo(meta)
            await leech.wait_finished()
        assert leech.counters["metadata.fetched"] == 1
        assert leech.status().transfers[0].downloaded >= meta.total_length
        # each side's BEP 10 yourip is a vote in the other's Endpoint tally
        votes = leech_ses.endpoint.statistics()["external_address"]
        assert votes["by_source"].get("bt", 0) >= 1
        assert votes["winner"] == ("127.0.0.1", leech_ses.port)
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


class _LyingSource:
    """A torrent's view with a false info dictionary of the right size."""

    def __init__(self, torrent):
        self.torrent = torrent
        self.metadata_fetcher = None

    @property
    def info_bytes(self):
        real = self.torrent.info_bytes
        return real.replace(b"file1.bin", b"file1.exe")

    def metadata_fetched(self, outcome):
        pass


class _LyingUtMetadata(UtMetadata):
    def handler(self, peer):
        h = UtMetadataHandler(_LyingSource(peer.torrent))
        h.peer = peer
        return h


async def test_a_peer_serving_a_false_info_dict_is_dropped(tmp_path):
    src, names, data = bt_content(tmp_path, [40_000, 50_000])
    meta = parse_metainfo_untrusted(data)
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as liar_ses, \
            bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as honest_ses, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as leech_ses:
        liar_ses.extensions.unregister("ut_metadata")
        liar_ses.extensions.register(_LyingUtMetadata())
        await liar_ses.add_torrent(data)
        await honest_ses.add_torrent(data)
        leech = await leech_ses.add_torrent(_link(meta, liar_ses.port))
        with trio.fail_after(30):
            while leech.counters["metadata.liars"] < 1:
                await trio.sleep(0.05)
        assert not leech.has_metadata
        assert leech.counters["metadata.hash_failures"] == 1
        leech.add_peer(("127.0.0.1", honest_ses.port))
        with trio.fail_after(60):
            await leech.wait_finished()
        assert leech.counters["metadata.fetched"] == 1
        assert leech.counters["closed.bad metadata"] == 1
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


@pytest.mark.slow
async def test_magnet_through_our_dht_only(tmp_path):
    """No x.pe, no tracker: the leecher's only lead is the seed's DHT node
    (its bootstrap node); the seed announces with implied_port, the leecher
    finds it and fetches metadata and data."""
    src, names, data = bt_content(tmp_path, [60_000, 30_000])
    meta = parse_metainfo_untrusted(data)
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as seed_ses:
        assert seed_ses.dht is not None
        await seed_ses.add_torrent(data)
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   dht_bootstrap=[("127.0.0.1", seed_ses.port)]) as leech_ses:
            leech = await leech_ses.add_torrent(str(magnet_from_metainfo(meta)))
            with trio.fail_after(90):
                await leech.wait_finished()
            assert leech.counters["dht.peers"] >= 1
            assert leech_ses.counters["connections.utp"] >= 1       # uTP first
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)
    assert (tmp_path / "dl" / ".bt-resume" / "dht.json").exists()


@pytest.mark.slow
async def test_magnet_trackers_alone_bring_the_peers(tmp_path):
    """DHT off, no x.pe: the link's ``tr`` (opentracker, UDP) is the only
    lead, announced to while the torrent is still in ``metadata``."""
    from testsupport import opentracker
    src, names, data = bt_content(tmp_path, [50_000, 20_000])
    meta = parse_metainfo_untrusted(data)
    with opentracker([meta.info_hash]) as (ip, port):
        url = f"udp://{ip}:{port}"
        async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1",
                                   dht=False, tracker_timeout=2) as seed_ses, \
                bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                dht=False, tracker_timeout=2) as leech_ses:
            assert leech_ses.dht is None
            await seed_ses.add_torrent(data, trackers=[url])
            link = str(Magnet(meta.info_hash, "content", (url,)))
            leech = await leech_ses.add_torrent(link)
            with trio.fail_after(60):
                await leech.wait_finished()
            assert leech.status().trackers[0].announces >= 1
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


@pytest.mark.slow
async def test_private_torrents_stay_off_the_dht_and_the_node_id_follows_the_vote(tmp_path):
    from dht._wire import is_secure_id
    _, _, public = bt_content(tmp_path / "a", [30_000], name="pub")
    _, _, private = bt_content(tmp_path / "b", [30_000], name="priv")
    from bt.create import create_torrent
    private = create_torrent(tmp_path / "b" / "src" / "priv", private=True, piece_length=16384)
    async with bt.open_session(download_dir=tmp_path / "x", host="127.0.0.1") as a, \
            bt.open_session(download_dir=tmp_path / "y", host="127.0.0.1",
                            dht_bootstrap=[("127.0.0.1", a.port)]) as b:
        pub = await b.add_torrent(public)
        priv = await b.add_torrent(private)
        assert priv.private and not pub.private
        with trio.fail_after(10):
            while pub.counters["dht.announces"] < 1:
                await trio.sleep(0.1)
        await trio.sleep(1.0)
        assert priv.counters["dht.announces"] == 0
        assert b.dht.stored_peers(priv.info_hash) == a.dht.stored_peers(priv.info_hash) == []
        # BEP 42: three reporters (here: trackers, BEP 24) agree on a public
        # address; the node takes an id derived from it
        public_ip = "124.31.75.21"
        assert not is_secure_id(b.dht.node_id, public_ip)
        for n in range(3):
            b.vote_external_address(public_ip, (f"http://t{n}/announce",), source="tracker")
        with trio.fail_after(15):
            while not is_secure_id(b.dht.node_id, public_ip):
                await trio.sleep(0.2)


async def test_a_magnet_leecher_serves_the_metadata_it_fetched(tmp_path):
    """B knows only A, and A (a magnet leecher itself) knows only the seed:
    once A has the info dictionary it says so in a new extension handshake
    (metadata_size), B fetches it from A, then the data."""
    src, names, data = bt_content(tmp_path, [80_000, 10_000])
    meta = parse_metainfo_untrusted(data)
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1",
                               dht=False) as s_ses, \
            bt.open_session(download_dir=tmp_path / "a", host="127.0.0.1", dht=False) as a_ses, \
            bt.open_session(download_dir=tmp_path / "b", host="127.0.0.1", dht=False) as b_ses:
        a = await a_ses.add_torrent(_link(meta))
        b = await b_ses.add_torrent(_link(meta, a_ses.port))
        with trio.fail_after(30):
            while not b.peers:                  # B is connected to A before A has anything
                await trio.sleep(0.02)
        assert b.status().state == a.status().state == "metadata"
        await s_ses.add_torrent(data)
        a.add_peer(("127.0.0.1", s_ses.port))
        with trio.fail_after(60):
            await b.wait_finished()
        assert a.counters["metadata.fetched"] == b.counters["metadata.fetched"] == 1
        assert {p.peer_id for p in b.peers} <= {a_ses.peer_id}
    assert sha256_files(tmp_path / "b" / "content", names) == sha256_files(src, names)
