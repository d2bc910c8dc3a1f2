"""PEX (BEP 11) in a real swarm on loopback: three of our sessions and one
libtorrent seed (PyPI libtorrent, in this process).  A peer that knows
only one other learns the rest through ut_pex and connects to them:

- ``ours``: C knows only A; A (connected to libtorrent and B) tells C;
- ``libtorrent``: C knows only the libtorrent seed, whose ut_pex message
  (an independent encoder) names A and B.

Also: a private torrent offers no ut_pex at all, so nothing is learned;
and PEX over IPv6 (added6) between our sessions on ::1."""

from __future__ import annotations

import pytest
import trio

import bt
from bt.bench import libtorrent_settings
from testsupport import bt_content, sha256_files, unavailable, have_ipv6_loopback

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _why = f"libtorrent is not importable ({exc}); pip install libtorrent"

pytestmark = [pytest.mark.slow]

SIZES = (1_500_000, 700_001)
LIMIT = 150_000         # bytes/s


def _need_lt() -> None:
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")


async def _until(cond, what: str, timeout: float = 30, state=lambda: "") -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.05)
    assert cond(), f"timed out waiting for {what}: {state()}"


@pytest.mark.interop
@pytest.mark.parametrize("first_contact", ["ours", "libtorrent"])
async def test_peer_learns_the_swarm_through_pex(tmp_path, first_contact):
    _need_lt()
    src, names, data = bt_content(tmp_path, SIZES, name="pex", seed=11, piece_length=32768)
    ses = lt.session(libtorrent_settings("127.0.0.1", "utp"))
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))
    atp.save_path = str(src.parent)
    handle = ses.add_torrent(atp)
    lt_addr = ("127.0.0.1", ses.listen_port())
    try:
        with trio.fail_after(20):
            while handle.status().state != lt.torrent_status.seeding:
                await trio.sleep(0.05)
        # Download limits keep A and B leechers while C joins (a seed closes
        # its connections to other seeds, and would have no peers to tell),
        # and C a leecher until it has met everyone.
        async with bt.open_session(download_dir=tmp_path / "a", host="127.0.0.1",
                                   download_limit=LIMIT) as a, \
                bt.open_session(download_dir=tmp_path / "b", host="127.0.0.1",
                                download_limit=LIMIT) as b, \
                bt.open_session(download_dir=tmp_path / "c", host="127.0.0.1",
                                download_limit=2 * LIMIT) as c:
            ta, tb = await a.add_torrent(data), await b.add_torrent(data)
            ta.add_peer(lt_addr)
            tb.add_peer(lt_addr)
            ta.add_peer(("127.0.0.1", b.port))
            await _until(lambda: len(ta.peers) >= 2 and len(tb.peers) >= 1,
                         "A connected to libtorrent and B, B to libtorrent")
            tc = await c.add_torrent(data)
            tc.add_peer(lt_addr if first_contact == "libtorrent" else ("127.0.0.1", a.port))
            others = {a.peer_id, b.peer_id} if first_contact == "libtorrent" \
                else {b.peer_id}

            def met() -> set[bytes]:
                return {t.peer_id for t in tc.status().transfers}

            def met_lt() -> bool:
                return any(pid.startswith(b"-LT") for pid in met())

            await _until(lambda: others <= met() and met_lt(),
                         f"C meeting {len(others) + 1} peers it was not told of",
                         state=lambda: (met(), tc.status().counters, c.counters,
                                        ta.status().counters, tc.pex_learned))
            c.set_limits(download=None)
            with trio.fail_after(60):
                await tc.wait_finished()
            counters = tc.status().counters
            assert counters["pex.received"] >= 1, counters
            # C dialed what it learned; a peer may also have dialed C first,
            # having learned C's address from the PEX of another
            assert counters["pex.learned"] >= 1, counters
            assert counters.get("violation.bad_extended", 0) == 0, counters
            if first_contact == "ours":
                assert ta.status().counters["pex.sent"] >= 1
                # libtorrent parsed A's message too: B (connected to it
                # directly) is also marked as a peer PEX told it of
                pex_src = int(lt.peer_info.pex)

                def lt_heard_of_b() -> bool:
                    return any(tuple(p.ip) == ("127.0.0.1", b.port) and p.source & pex_src
                               for p in handle.get_peer_info())
                await _until(lt_heard_of_b, "libtorrent listing B with source pex",
                             state=lambda: [(p.ip, p.source) for p in handle.get_peer_info()])
            assert c.counters["connections.utp"] >= 3, c.counters
    finally:
        ses.remove_torrent(handle)
        del ses
    assert sha256_files(tmp_path / "c" / "pex", names) == sha256_files(src, names)


async def test_private_torrent_offers_no_pex(tmp_path):
    from bt.create import create_torrent
    src, _, _ = bt_content(tmp_path, (300_000,), name="priv", seed=3)
    data = create_torrent(src, piece_length=32768, private=True)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as a, \
            bt.open_session(download_dir=tmp_path / "b", host="127.0.0.1") as b, \
            bt.open_session(download_dir=tmp_path / "c", host="127.0.0.1") as c:
        ta = await a.add_torrent(data)
        tb = await b.add_torrent(data)
        tb.add_peer(("127.0.0.1", a.port))
        tc = await c.add_torrent(data)
        tc.add_peer(("127.0.0.1", a.port))
        with trio.fail_after(30):
            await tb.wait_finished()
            await tc.wait_finished()
        await trio.sleep(2.5)           # ticks in which a PEX message would go out
        for t in (ta, tb, tc):
            for p in t.peers:
                assert "ut_pex" not in p.core.peer_extensions
                assert "ut_holepunch" in p.core.peer_extensions
        assert tc.status().counters.get("pex.learned", 0) == 0
        assert ta.status().counters.get("pex.sent", 0) == 0


async def test_pex_over_ipv6(tmp_path):
    # added6 / added6.f: C, knowing only A at ::1, learns B from A's PEX
    if not have_ipv6_loopback():
        unavailable("no IPv6 loopback (::1) here", "CI machines have ::1")
    src, names, data = bt_content(tmp_path, SIZES, name="pex6", seed=12, piece_length=32768)
    async with bt.open_session(download_dir=src.parent, host="::1") as a, \
            bt.open_session(download_dir=tmp_path / "b", host="::1",
                            download_limit=LIMIT) as b, \
            bt.open_session(download_dir=tmp_path / "c", host="::1",
                            download_limit=2 * LIMIT) as c:
        ta = await a.add_torrent(data)
        tb = await b.add_torrent(data)
        tb.add_peer(("::1", a.port))
        await _until(lambda: len(ta.peers) >= 1, "B connected to A")
        tc = await c.add_torrent(data)
        tc.add_peer(("::1", a.port))
        await _until(lambda: b.peer_id in {t.peer_id for t in tc.status().transfers},
                     "C meeting B", state=lambda: (tc.status().counters, ta.status().counters))
        c.set_limits(download=None)
        with trio.fail_after(60):
            await tc.wait_finished()
        assert ta.status().counters["pex.sent"] >= 1
        assert tc.status().counters["pex.received"] >= 1
        assert any(":" in a_[0] for a_ in tc.pex_learned) or \
            any(":" in a_[0] for a_ in tb.pex_learned), (tc.pex_learned, tb.pex_learned)
    assert sha256_files(tmp_path / "c" / "pex6", names) == sha256_files(src, names)
