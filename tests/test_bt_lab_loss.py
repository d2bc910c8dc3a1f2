"""Our BitTorrent session (``bt.open_session``, uTP only) against
libtorrent (PyPI) and Transmission (Debian) through the NAT lab with 2%
loss per datagram each way, in both directions, every client at its
default settings.

The other client runs on the lab's internet; our session behind a
full-cone router that drops 2% of the datagrams each way (the same
placement as the uTP interop runs of test_interop_peers.py, which speak
only enough BitTorrent to move one file).  Here it is the whole peer: a
multi-file torrent with a pad file, the picker, the choker, request
timeouts and, when a connection does not survive the loss (libtorrent
gives each packet three transmissions, then drops the connection; at 2%
that happens in some runs), the torrent dialing its peer again.  sha256
of every file must match, the other client must list our connection as
uTP, and the router must really have dropped about 2%.

Needs root (the lab), libtorrent and transmission-daemon: each skips
without, and fails under CI=true.
"""

from __future__ import annotations

import contextlib
import functools
import shutil

import pytest
import trio

import bt
from testsupport import bt_content, load_natlab, sha256_files, unavailable
from utp.bench.interop import lab_placement
from utp.bench.peers import LibtorrentPeer, TransmissionPeer, in_netns

pytestmark = [pytest.mark.interop, pytest.mark.slow]

LOSS = 2
PIECE = 256 * 1024
# ~12 MB: about 9,000 data packets through the lossy router each run
SIZES = (7_000_000, 0, 1_234_567, 3_500_001)


def _need(kind: str):
    natlab = load_natlab()
    why = natlab.can_build()
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")
    if kind == "libtorrent":
        try:
            import libtorrent  # noqa: F401
        except ImportError as exc:
            unavailable(f"libtorrent is not importable ({exc})", "libtorrent is in the test extra")
    elif TransmissionPeer.missing():
        unavailable(TransmissionPeer.missing() or "", "apt-get install transmission-daemon")
    return natlab


def _peer(kind: str, workdir, placement):
    if kind == "libtorrent":
        return LibtorrentPeer(placement.peer_ip, netns=placement.peer_ns)
    return TransmissionPeer(workdir, placement.peer_ip, netns=placement.peer_ns)


async def _watch_peer(peer, placement, saw_utp: list[bool], *, until_complete: bool) -> None:
    """Poll the client: note whether it lists our connection as uTP; with
    ``until_complete``, return once it has every piece (else run until
    cancelled: a seed has them all from the start)."""
    while True:
        st = await peer.status()
        if any(p["ip"] in (placement.our_public_ip, placement.our_ip) and p["utp"]
               for p in st["peers"]):
            saw_utp.append(True)
        if until_complete and st["progress"] >= 1.0:
            return
        await trio.sleep(0.25)


@pytest.mark.parametrize("direction", ["download", "upload"])
@pytest.mark.parametrize("kind", ["libtorrent", "transmission"])
async def test_session_with_a_real_client_through_2_percent_loss(tmp_path, kind, direction):
    natlab = _need(kind)
    tmp_path.chmod(0o755)                  # Transmission runs as another user
    # No pad files for Transmission 3.00: it predates BEP 47 and wants them on disk.
    src, names, data = bt_content(tmp_path, SIZES, name="lossy", seed=29, piece_length=PIECE,
                                  pad_files=kind == "libtorrent")
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    peer_dir.chmod(0o777)
    if direction == "download":            # the client seeds a copy of its own
        shutil.copytree(src, peer_dir / "lossy")
    ours_dir = src.parent if direction == "upload" else tmp_path / "dl"
    saw_utp: list[bool] = []
    with natlab.Lab() as lab:
        placement = lab_placement(lab, LOSS)
        async with contextlib.AsyncExitStack() as stack:
            peer = await stack.enter_async_context(_peer(kind, str(tmp_path), placement))
            await peer.add(data, str(peer_dir), seed=direction == "download")
            with in_netns(placement.our_ns):   # our Endpoint's socket lives behind the router
                ours = await stack.enter_async_context(bt.open_session(
                    download_dir=ours_dir, host=placement.our_ip, tcp=False))
            t = await ours.add_torrent(data)
            with trio.fail_after(240):
                if direction == "download":
                    t.add_peer((placement.peer_ip, peer.port))
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(functools.partial(
                            _watch_peer, peer, placement, saw_utp, until_complete=False))
                        await t.wait_finished()
                        # one more look at its peer list while we are connected
                        st = await peer.status()
                        saw_utp += [p["utp"] for p in st["peers"]
                                    if p["ip"] in (placement.our_public_ip, placement.our_ip)]
                        nursery.cancel_scope.cancel()
                else:
                    if kind == "libtorrent":
                        await peer.connect_peer(placement.our_public_ip, ours.port)
                    else:                  # Transmission cannot be told to dial a peer
                        t.add_peer((placement.peer_ip, peer.port))
                    await _watch_peer(peer, placement, saw_utp, until_complete=True)
            counters = dict(ours.counters)
        lost = await trio.to_thread.run_sync(lab.loss_counters, lab.hosts["us"])
    print(f"{kind} {direction}: session {counters}; router {lost}")
    assert any(saw_utp), f"{kind} never listed our connection as uTP"
    assert counters.get("connections.utp", 0) >= 1 and not counters.get("connections.tcp")
    if direction == "download":
        assert sha256_files(tmp_path / "dl" / "lossy", names) == sha256_files(src, names)
    else:
        # Transmission creates no empty files; and a client reports a piece
        # once it passed its hash, maybe before its disk thread wrote it.
        names = [n for n in names if (src / n).stat().st_size]
        with trio.move_on_after(15):
            while not all((peer_dir / "lossy" / n).is_file() for n in names) \
                    or sha256_files(peer_dir / "lossy", names) != sha256_files(src, names):
                await trio.sleep(0.5)
        assert sha256_files(peer_dir / "lossy", names) == sha256_files(src, names)
    assert 0.01 < lost["lost"] / lost["forwarded"] < 0.03, lost
