"""bt.open_session against libtorrent (PyPI, in this process) on loopback:
our session downloads a multi-file torrent with pad files from a
libtorrent seed over uTP only and over TCP only, and libtorrent downloads
it from our session as seed (libtorrent dials us).  sha256 of every file
must match; libtorrent's own peer list must show the transport (peer_info
flag bit 17 = uTP socket, see ../shared/PEERS.md)."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio

import bt
from bt.create import create_torrent
from testsupport import unavailable

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _why = f"libtorrent is not importable ({exc}); pip install libtorrent"

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PIECE = 32 * 1024
SIZES = (1_000_000, 0, 300_001, 77_777, 500_000)
UTP_FLAG = 1 << 17          # peer_info::utp_socket (not exported by the bindings)


def _content(root):
    rng = random.Random(8)
    src = root / "src" / "multi"
    (src / "d").mkdir(parents=True)
    names = []
    for n, size in enumerate(SIZES):
        p = src / ("d" if n % 2 else ".") / f"f{n}.bin"
        p.write_bytes(rng.randbytes(size))
        names.append(p.relative_to(src))
    return src, names, create_torrent(src, piece_length=PIECE, pad_files=True)


def _sha(base, names):
    return {str(n): hashlib.sha256((base / n).read_bytes()).hexdigest() for n in names}


def _lt_session(transport: str):
    utp, tcp = transport == "utp", transport == "tcp"
    return lt.session({
        "listen_interfaces": "127.0.0.1:0",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
        "enable_natpmp": False, "dht_bootstrap_nodes": "",
        "enable_outgoing_utp": utp, "enable_incoming_utp": utp,
        "enable_outgoing_tcp": tcp, "enable_incoming_tcp": tcp,
        "in_enc_policy": 2, "out_enc_policy": 2,
        "allow_multiple_connections_per_ip": True,
        "recv_socket_buffer_size": 4194304, "send_socket_buffer_size": 4194304,
    })


def _add(ses, data: bytes, save_path):
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))
    atp.save_path = str(save_path)
    return ses.add_torrent(atp)


async def _watch_flags(handle, seen: list[int]) -> None:
    """Record libtorrent's peer flags while the transfer runs."""
    while True:
        for p in handle.get_peer_info():
            seen.append(int(p.flags))
        await trio.sleep(0.05)


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
    assert _sha(tmp_path / "dl" / "multi", names) == _sha(src, names)
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
    assert _sha(tmp_path / "lt" / "multi", names) == _sha(src, names)
    assert flags and {bool(f & UTP_FLAG) for f in flags} == {transport == "utp"}
