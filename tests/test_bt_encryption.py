"""MSE in the session, end to end on loopback: our leecher and our seed
with every pair of policies over uTP and TCP (the method each side
records, the retries, the refusals), and against real peers: downloads
from libtorrent and from Transmission with encryption *required* on their
side, over uTP and TCP, and libtorrent downloading from our seed set to
``required``.  Where the other side shows it (libtorrent's peer_info
flags, Transmission's isEncrypted) the test checks it saw encryption."""

from __future__ import annotations

import pytest
import trio

import bt
from bt.bench import libtorrent_settings
from testsupport import bt_content, lt_add_torrent, sha256_files, unavailable
from utp.bench.peers import TransmissionPeer

PIECE = 32 * 1024
SIZES = (100_000, 0, 30_001)
#: The seed's upload limit in the policy tests: the transfer takes ~2 s,
#: so the connection is still there to be looked at.
SLOW = 64 * 1024

# (leecher policy, seed policy) -> what the connection ends up as, or None
# for a refusal; and the retry the leecher makes on the way.
PAIRS = [
    ("disabled", "disabled", "none", None),
    ("disabled", "preferred", "none", None),
    ("enabled", "preferred", "none", None),
    ("preferred", "preferred", "rc4", None),
    ("preferred", "enabled", "plaintext", None),      # enabled picks plaintext of both
    ("preferred", "disabled", "none", "mse.retry_plain"),
    ("enabled", "required", "rc4", "mse.retry_encrypted"),
    ("required", "enabled", "rc4", None),
    ("required", "required", "rc4", None),
    ("disabled", "required", None, None),
    ("required", "disabled", None, None),
]


def _content(root):
    return bt_content(root, SIZES, seed=4, piece_length=PIECE)


@pytest.mark.parametrize("transport", ["utp", "tcp"])
@pytest.mark.parametrize("leech_policy,seed_policy,method,retry", PAIRS)
async def test_policy_pairs(tmp_path, transport, leech_policy, seed_policy, method, retry):
    src, names, data = _content(tmp_path)
    utp, tcp = transport == "utp", transport == "tcp"
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1", utp=utp,
                               tcp=tcp, encryption=seed_policy,
                               upload_limit=SLOW) as seed_ses, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1", utp=utp, tcp=tcp,
                            encryption=leech_policy) as leech_ses:
        seed = await seed_ses.add_torrent(data)
        leech = await leech_ses.add_torrent(data)
        leech.add_peer(("127.0.0.1", seed_ses.port))
        if method is None:
            # refused: the seed counts why, and no connection is made
            why = ("mse.failed.plaintext_refused" if seed_policy == "required"
                   else "handshake.failed.WireError")
            with trio.fail_after(30):
                while not seed_ses.counters[why]:
                    await trio.sleep(0.05)
            await trio.sleep(0.3)
            assert not seed_ses.counters[f"connections.{transport}"], seed_ses.counters
            assert not leech.peers and leech.status().pieces_have == 0
            return
        with trio.fail_after(30):
            while not (leech.peers and seed.peers):
                await trio.sleep(0.02)
        for ses, t in ((leech_ses, leech), (seed_ses, seed)):
            (peer,) = t.peers
            assert peer.encryption == method, (ses.counters, t.counters)
            assert peer.encrypted == (method != "none")
            assert t.status().peers_encrypted == (method != "none")
            assert t.status().peers_rc4 == (method == "rc4")
        if method != "none":
            assert leech_ses.counters[f"mse.out.{method}"] == 1, leech_ses.counters
            assert seed_ses.counters[f"mse.in.{method}"] == 1, seed_ses.counters
        if retry is not None:
            assert leech_ses.counters[retry] == 1, leech_ses.counters
        else:
            assert not any(k.startswith("mse.retry") for k in leech_ses.counters)
        with trio.fail_after(30):
            await leech.wait_finished()
        assert leech.counters["pieces.failed"] == 0
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)


async def test_a_bad_policy_name_is_an_error(tmp_path):
    with pytest.raises(bt.session.SessionError, match="encryption must be one of"):
        async with bt.open_session(download_dir=tmp_path, encryption="sometimes"):
            pass


async def test_garbage_instead_of_a_handshake_is_counted(tmp_path):
    """A stream of junk that is neither a plain handshake nor a sync within
    the pad bound: the responder hangs up and counts the reason."""
    async with bt.open_session(download_dir=tmp_path, host="127.0.0.1", utp=False) as ses:
        stream = await trio.open_tcp_stream("127.0.0.1", ses.port)
        await stream.send_all(b"\xff" * 96 + bytes(2000))      # a bad DH key, then zeros
        with trio.fail_after(10):
            while not ses.counters["mse.failed.bad_dh_key"]:
                await trio.sleep(0.02)
        stream2 = await trio.open_tcp_stream("127.0.0.1", ses.port)
        await stream2.send_all(pow(2, 99, bt.mse.P).to_bytes(96, "big") + bytes(600))
        with trio.fail_after(10):
            while not ses.counters["mse.failed.sync_not_found"]:
                await trio.sleep(0.02)
        for s in (stream, stream2):
            with trio.fail_after(10):       # and they hung up
                try:
                    while await s.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
            await s.aclose()


# ---- real peers with encryption required ---------------------------------------------------

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _why = f"libtorrent is not importable ({exc}); pip install libtorrent"

# libtorrent's enc_policy / enc_level values and peer_info flags
PE_FORCED, PE_RC4 = 0, 2          # settings_pack::pe_forced, pe_rc4 (pe_plaintext is 1)
RC4_ENCRYPTED = 1 << 19             # peer_info::rc4_encrypted (plaintext_encrypted: 1 << 20)
UTP_FLAG = 1 << 17


def _need_lt() -> None:
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")


def _lt_required(transport: str):
    settings = libtorrent_settings("127.0.0.1", transport)
    settings.update(out_enc_policy=PE_FORCED, in_enc_policy=PE_FORCED,
                    allowed_enc_level=PE_RC4, prefer_rc4=True)
    return lt.session(settings)


def _lt_add(ses, data: bytes, save_path):
    return lt_add_torrent(lt, ses, data, save_path)


async def _download_over_rc4(ours, data: bytes, port: int, transport: str) -> None:
    """Our session (default policy) downloads from the peer at ``port``,
    which requires encryption: one connection, RC4."""
    t = await ours.add_torrent(data)
    t.add_peer(("127.0.0.1", port))
    with trio.fail_after(60):
        while not t.peers:
            await trio.sleep(0.02)
        assert next(iter(t.peers)).encryption == "rc4"
        await t.wait_finished()
    assert ours.counters["mse.out.rc4"] == 1, ours.counters
    assert ours.counters[f"connections.{transport}"] == 1, ours.counters


async def _lt_flags(handle, seen: list[int]) -> None:
    while True:
        seen.extend(int(p.flags) for p in handle.get_peer_info())
        await trio.sleep(0.02)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_download_from_libtorrent_requiring_encryption(tmp_path, transport):
    """Our default policy (preferred) meets libtorrent's forced RC4."""
    _need_lt()
    src, names, data = bt_content(tmp_path, (3_000_000, 500_001), seed=5, piece_length=PIECE)
    ses = _lt_required(transport)
    handle = _lt_add(ses, data, src.parent)
    flags: list[int] = []
    try:
        with trio.fail_after(20):
            while handle.status().state != lt.torrent_status.seeding:
                await trio.sleep(0.05)
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   utp=transport == "utp", tcp=transport == "tcp") as ours, \
                trio.open_nursery() as nursery:
            nursery.start_soon(_lt_flags, handle, flags)
            await _download_over_rc4(ours, data, ses.listen_port(), transport)
            nursery.cancel_scope.cancel()
    finally:
        ses.remove_torrent(handle)
        del ses
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)
    assert flags, "libtorrent never listed our peer"
    assert all(f & RC4_ENCRYPTED for f in flags), [hex(f) for f in flags]
    assert {bool(f & UTP_FLAG) for f in flags} == {transport == "utp"}


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_libtorrent_downloads_from_our_seed_requiring_encryption(tmp_path, transport):
    """libtorrent dials us with its default policy (MSE first, both
    methods offered); our seed requires RC4."""
    _need_lt()
    src, names, data = bt_content(tmp_path, (3_000_000, 500_001), seed=6, piece_length=PIECE)
    settings = libtorrent_settings("127.0.0.1", transport)
    for k in ("out_enc_policy", "in_enc_policy", "allowed_enc_level", "prefer_rc4"):
        settings.pop(k, None)           # libtorrent's defaults: enabled, both, plaintext first
    ses = lt.session(settings)
    flags: list[int] = []
    try:
        async with bt.open_session(download_dir=src.parent, host="127.0.0.1",
                                   utp=transport == "utp", tcp=transport == "tcp",
                                   encryption="required") as ours, \
                trio.open_nursery() as nursery:
            t = await ours.add_torrent(data)
            handle = _lt_add(ses, data, tmp_path / "lt")
            nursery.start_soon(_lt_flags, handle, flags)
            handle.connect_peer(("127.0.0.1", ours.port))
            with trio.fail_after(60):
                while handle.status().state != lt.torrent_status.seeding:
                    await trio.sleep(0.05)
            assert ours.counters["mse.in.rc4"] >= 1, ours.counters
            assert t.status().uploaded >= 3_500_001
            nursery.cancel_scope.cancel()
        ses.remove_torrent(handle)
    finally:
        del ses
    assert sha256_files(tmp_path / "lt" / "content", names) == sha256_files(src, names)
    assert flags and all(f & RC4_ENCRYPTED for f in flags), [hex(f) for f in flags]
    assert {bool(f & UTP_FLAG) for f in flags} == {transport == "utp"}


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_download_from_transmission_requiring_encryption(tmp_path, transport):
    """Transmission's ``encryption: 2``: MSE with RC4 only.  It unchokes
    ~10.7 s after the handshake (PEERS.md)."""
    why = TransmissionPeer.missing()
    if why is not None:
        unavailable(why, ".ci/run installs transmission-daemon")
    src, names, data = bt_content(tmp_path, (3_000_000, 500_001), seed=7, piece_length=PIECE,
                                  pad_files=False)
    async with TransmissionPeer(tmp_path / "tr", utp=transport == "utp", encryption=2) as tr:
        await tr.add(data, src.parent, seed=True)
        seen: list[dict] = []
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   utp=transport == "utp", tcp=transport == "tcp") as ours, \
                trio.open_nursery() as nursery:
            async def watch():
                while True:
                    seen.extend((await tr.status())["peers"])
                    await trio.sleep(0.2)
            nursery.start_soon(watch)
            await _download_over_rc4(ours, data, tr.port, transport)
            nursery.cancel_scope.cancel()
    assert sha256_files(tmp_path / "dl" / "content", names) == sha256_files(src, names)
    assert seen and all(p["encrypted"] for p in seen), seen
    assert {p["utp"] for p in seen} == {transport == "utp"}
