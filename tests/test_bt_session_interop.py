"""bt.open_session against libtorrent (PyPI, in this process) on loopback:
our session downloads a multi-file torrent with pad files from a
libtorrent seed over uTP only and over TCP only, and libtorrent downloads
it from our session as seed (libtorrent dials us).  sha256 of every file
must match; libtorrent's own peer list must show the transport (peer_info
flag bit 17 = uTP socket, see ../shared/PEERS.md)."""

from __future__ import annotations

import pytest
import trio

import bt
from bt.bench import libtorrent_settings
from testsupport import bt_content, lt_add_torrent, sha256_files, unavailable
from utp.bench.peers import TransmissionPeer

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _why = f"libtorrent is not importable ({exc}); pip install libtorrent"

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PIECE = 32 * 1024
# ~6 MB: long enough on loopback for the 20 ms peer-list poll to see the
# connection (libtorrent exempts local peers from its rate limits)
SIZES = (4_000_000, 0, 300_001, 77_777, 1_500_000)
UTP_FLAG = 1 << 17          # peer_info::utp_socket (not exported by the bindings)


def _content(root, pad_files: bool = True):
    return bt_content(root, SIZES, name="multi", seed=8, piece_length=PIECE, pad_files=pad_files)


def _lt_session(transport: str):
    return lt.session(libtorrent_settings("127.0.0.1", transport))


def _add(ses, data: bytes, save_path):
    return lt_add_torrent(lt, ses, data, save_path)


async def _watch_flags(handle, seen: list[int]) -> None:
    """Record libtorrent's peer flags while the transfer runs."""
    while True:
        for p in handle.get_peer_info():
            seen.append(int(p.flags))
        await trio.sleep(0.02)


def _need_lt() -> None:
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_download_from_libtorrent_seed(tmp_path, transport):
    _need_lt()
    src, names, data = _content(tmp_path)
    ses = _lt_session(transport)
    handle = _add(ses, data, src.parent)
    with trio.fail_after(20):
        while handle.status().state != lt.torrent_status.seeding:
            await trio.sleep(0.05)
    flags: list[int] = []
    try:
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   utp=transport == "utp", tcp=transport == "tcp") as ours, \
                trio.open_nursery() as nursery:
            nursery.start_soon(_watch_flags, handle, flags)
            t = await ours.add_torrent(data)
            t.add_peer(("127.0.0.1", ses.listen_port()))
            with trio.fail_after(60):
                await t.wait_finished()
            assert ours.counters[f"connections.{transport}"] == 1, ours.counters
            assert t.counters["pieces.failed"] == 0
            nursery.cancel_scope.cancel()
    finally:
        ses.remove_torrent(handle)
        del ses
    assert sha256_files(tmp_path / "dl" / "multi", names) == sha256_files(src, names)
    assert flags, "libtorrent never listed our peer"
    on_utp = {bool(f & UTP_FLAG) for f in flags}
    assert on_utp == {transport == "utp"}


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_libtorrent_downloads_from_our_seed(tmp_path, transport):
    _need_lt()
    src, names, data = _content(tmp_path)
    ses = _lt_session(transport)
    flags: list[int] = []
    try:
        async with bt.open_session(download_dir=src.parent, host="127.0.0.1",
                                   utp=transport == "utp", tcp=transport == "tcp") as ours, \
                trio.open_nursery() as nursery:
            t = await ours.add_torrent(data)
            assert t.status().state == "seeding"
            handle = _add(ses, data, tmp_path / "lt")
            nursery.start_soon(_watch_flags, handle, flags)
            handle.connect_peer(("127.0.0.1", ours.port))
            with trio.fail_after(60):
                while handle.status().state != lt.torrent_status.seeding:
                    await trio.sleep(0.05)
            assert ours.counters[f"connections.{transport}"] == 1, ours.counters
            assert t.status().uploaded >= sum(SIZES)
            nursery.cancel_scope.cancel()
        ses.remove_torrent(handle)
    finally:
        del ses
    assert sha256_files(tmp_path / "lt" / "multi", names) == sha256_files(src, names)
    assert flags and {bool(f & UTP_FLAG) for f in flags} == {transport == "utp"}


# ---- Transmission 3.00 (transmission-daemon; libutp inside) -----------------------------


def _need_transmission() -> None:
    why = TransmissionPeer.missing()
    if why is not None:
        unavailable(why, ".ci/run installs transmission-daemon")


async def _tr_watch_peers(tr: TransmissionPeer, seen: list[bool]) -> None:
    """Record Transmission's isUTP for each peer while the transfer runs."""
    while True:
        seen.extend(p["utp"] for p in (await tr.status())["peers"])
        await trio.sleep(0.2)


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_download_from_transmission_seed(tmp_path, transport):
    """Transmission unchokes ~10.7 s after the handshake (its rechoke
    timer, PEERS.md): the download takes that long at least.  No pad
    files: Transmission 3.00 predates BEP 47 and wants them on disk."""
    _need_transmission()
    src, names, data = _content(tmp_path, pad_files=False)
    async with TransmissionPeer(tmp_path / "tr", utp=transport == "utp") as tr:
        await tr.add(data, src.parent, seed=True)          # verified, seeding
        seen: list[bool] = []
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   utp=transport == "utp", tcp=transport == "tcp") as ours, \
                trio.open_nursery() as nursery:
            nursery.start_soon(_tr_watch_peers, tr, seen)
            t = await ours.add_torrent(data)
            t.add_peer(("127.0.0.1", tr.port))
            with trio.fail_after(60):
                await t.wait_finished()
            assert ours.counters[f"connections.{transport}"] == 1, ours.counters
            nursery.cancel_scope.cancel()
    assert sha256_files(tmp_path / "dl" / "multi", names) == sha256_files(src, names)
    assert seen and set(seen) == {transport == "utp"}


async def test_transmission_downloads_from_our_seed_over_utp(tmp_path):
    """Transmission has no RPC to add a peer: our seed dials it.  It first
    requests ~10.6 s after we unchoke it (its own timer, PEERS.md)."""
    _need_transmission()
    src, names, data = _content(tmp_path, pad_files=False)
    async with TransmissionPeer(tmp_path / "tr") as tr:
        await tr.add(data, tmp_path / "tr", seed=False)     # it drops peers while checking
        seen: list[bool] = []
        async with bt.open_session(download_dir=src.parent, host="127.0.0.1", tcp=False) as ours, \
                trio.open_nursery() as nursery:
            t = await ours.add_torrent(data)
            nursery.start_soon(_tr_watch_peers, tr, seen)
            t.add_peer(("127.0.0.1", tr.port))
            with trio.move_on_after(60):
                while (await tr.status())["progress"] != 1:
                    await trio.sleep(0.2)
            got = await tr.status()
            assert got["progress"] == 1, (got, ours.counters, t.counters, t.status())
            assert ours.counters["connections.utp"] == 1, ours.counters
            assert t.status().uploaded >= sum(SIZES)
            nursery.cancel_scope.cancel()
    # Transmission 3.00 does not create empty files: compare the others
    names = [n for n in names if (src / n).stat().st_size]
    assert sha256_files(tmp_path / "tr" / "multi", names) == sha256_files(src, names)
    assert seen and set(seen) == {True}
