"""BEP 55 (ut_holepunch) in the NAT lab: our relay on the lab's internet,
a seed behind one port-restricted NAT and a leecher behind another, both
connected to the relay and nothing else.  The leecher learns the seed from
the relay's PEX, cannot reach it directly (the seed's NAT drops what it
did not ask for), asks the relay (``rendezvous``), both get ``connect``,
punch on their shared UDP sockets, and the whole download then runs over
that punched uTP connection: checked from the leecher's side (the
connection to the seed's peer id is marked punched, is uTP, goes to the
seed's public address, and brought every byte) and from the relay's
counters (it relayed; it downloaded nothing worth serving, as its
download limit keeps it from finishing a piece).

Needs root (network namespaces, nftables): skips without, fails under
CI=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import trio
from testsupport import load_natlab, unavailable

natlab = load_natlab()

pytestmark = [pytest.mark.slow]

PORT = 40000
SIZE = 3 * 1024 * 1024 + 12345
PIECE = 256 * 1024
BLOCK = 16 * 1024
VERBOSE = ["-v"] if os.environ.get("UTPKIT_LAB_VERBOSE") else []

# One peer: ROLE relay|seed|leech, the torrent, the download dir, our IP,
# the relay's address ("-" for none).  Prints "connected" once it has a
# peer; the leecher prints its result as JSON when done, seed and relay
# print theirs when stdin closes.
PEER = textwrap.dedent("""
    import json, sys, time, trio, bt
    role, torrent, ddir, ip, relay_at = sys.argv[1:6]
    async def main():
        # The relay stays a leecher (50 kB/s down: it stays connected to
        # the seed, as seeds drop seeds) and serves (next to) nothing: 1
        # byte/s after the limit's one-block burst.  The seed takes no
        # PEX, so it never dials the leecher itself (two peers dialing each
        # other at once through port-restricted NATs meet without any
        # relay: not this test).
        relay = role == "relay"
        async with bt.open_session(download_dir=ddir, host=ip, port=%(port)d, tcp=False,
                                   upload_limit=1 if relay else None,
                                   download_limit=50_000 if relay else None,
                                   pex=role != "seed") as s:
            t = await s.add_torrent(open(torrent, "rb").read())
            if relay_at != "-":
                h, p = relay_at.rsplit(":", 1)
                t.add_peer((h, int(p)))
            while not t.peers:
                await trio.sleep(0.05)
            print("connected", flush=True)
            t0 = time.monotonic()
            async def report():
                while True:
                    await trio.sleep(2)
                    print(role, round(time.monotonic() - t0, 1), dict(s.counters),
                          t.status().counters, file=sys.stderr, flush=True)
            if "-v" in sys.argv:
                s._nursery.start_soon(report)
            if role == "leech":
                with trio.fail_after(90):
                    await t.wait_finished()
            else:
                await trio.to_thread.run_sync(sys.stdin.read)
            st = t.status()
            print(json.dumps({
                "seconds": time.monotonic() - t0,
                "peer_id": s.peer_id.hex(), "session": dict(s.counters),
                "torrent": st.counters,
                "external": list(s.endpoint.external_address or ()),
                "peers": [{"peer_id": p.peer_id.hex(), "addr": list(p.addr),
                           "transport": p.transport, "punched": p.punched,
                           "down": p.down.total} for p in t.peers],
                "transfers": {x.peer_id.hex(): [x.downloaded, x.uploaded]
                              for x in st.transfers}}), flush=True)
    trio.run(main)
""") % {"port": PORT}


from natlab.matrix import _python_env as _env  # noqa: E402

from natlab import read_line as _readline  # noqa: E402


def _finish(proc: subprocess.Popen, what: str) -> dict:
    assert proc.stdin is not None
    proc.stdin.close()
    while not (line := _readline(proc, what, 15)).startswith("{"):
        pass
    return json.loads(line)


class _Swarm:
    """The lab of these tests: a relay on the lab's internet, a seed and a
    leecher behind port-restricted NATs, the torrent in a lab directory."""

    def __init__(self, lab) -> None:
        from bt.create import create_torrent
        self.lab = lab
        self.env = _env()
        self.relay = lab.add_host("relay", "none")
        self.seed = lab.add_host("seed", "restricted")
        self.leech = lab.add_host("leech", "restricted")
        self.dir = d = lab.tempdir()
        os.makedirs(f"{d}/seed")
        self.payload = os.urandom(SIZE)
        with open(f"{d}/seed/blob.bin", "wb") as f:
            f.write(self.payload)
        self.torrent_path = f"{d}/t.torrent"
        self.torrent = create_torrent(f"{d}/seed/blob.bin", piece_length=PIECE)
        with open(self.torrent_path, "wb") as f:
            f.write(self.torrent)

    def start(self, host, role: str, to: str) -> subprocess.Popen:
        """One of our peers (PEER) on ``host``; ``to``: the relay's address."""
        return host.popen([sys.executable, "-c", PEER, role, self.torrent_path,
                           f"{self.dir}/{role}", host.ip, to, *VERBOSE],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, text=True)

    def leech_through(self, relay_addr: str, seed_proc: subprocess.Popen | None) -> dict:
        """Our leecher joins once the seed is connected to the relay; its
        result, with the data checked."""
        if seed_proc is not None:
            assert _readline(seed_proc, "seed", 30) == "connected"
        proc = self.start(self.leech, "leech", relay_addr)
        assert _readline(proc, "leecher", 30) == "connected"
        got = json.loads(_readline(proc, "leecher's result", 120))
        with open(f"{self.dir}/leech/blob.bin", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(self.payload).digest()
        return got

    def check_punched(self, got: dict, seed_out: dict, relay_id: str | None, *,
                      relay_blocks: int = 2, both_sides: bool = True) -> None:
        """The one connection between seed and leecher is a punched uTP
        connection, from the leecher to the seed's public address, and
        brought (nearly) every byte.  The seed made exactly two
        connections (the relay, and the punched one), so what it uploaded
        to the leecher went over the punched one.  ``both_sides``: the
        leecher punched too (it got its connect message in time); else
        the seed's punch met the leecher's listener."""
        conns = [p for p in got["peers"] if p["peer_id"] == seed_out["peer_id"]]
        assert conns, got["peers"]
        assert all(p["transport"] == "utp" for p in conns), conns
        assert {p["addr"][0] for p in conns} == {self.seed.public_ip}, conns
        assert seed_out["session"].get("connections.utp") == 2, seed_out
        assert seed_out["session"].get("connections.punched") == 1, seed_out
        if both_sides:
            assert all(p["punched"] for p in conns), conns
            assert got["session"].get("connections.punched", 0) >= 1, got
        from_relay = got["transfers"].get(relay_id, [0, 0])[0] if relay_id else 0
        # what the relay's upload limit let through (ours: the burst and one
        # block on credit, then 1 byte/s)
        assert from_relay <= relay_blocks * BLOCK, got["transfers"]
        from_seed = got["transfers"][seed_out["peer_id"]][0]
        assert from_seed >= SIZE - from_relay, got["transfers"]
        assert seed_out["transfers"][got["peer_id"]][1] >= from_seed, seed_out["transfers"]
        assert got["external"][0] == self.leech.public_ip


@pytest.fixture
def sw():
    """A fresh lab with relay, seed and leecher hosts (skips without root)."""
    why = natlab.can_build()
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")
    with natlab.Lab() as lab:
        yield _Swarm(lab)


def _need_lt() -> None:
    try:
        import libtorrent  # noqa: F401
    except ImportError as exc:
        unavailable(f"libtorrent is not importable ({exc})",
                    "libtorrent is in the test extra; .ci/run installs it")


@pytest.mark.slow
def test_bep55_our_relay_two_port_restricted_nats(sw):
    relay_proc = sw.start(sw.relay, "relay", "-")
    time.sleep(1.0)      # the relay listens
    relay_addr = f"{sw.relay.ip}:{PORT}"
    seed_proc = sw.start(sw.seed, "seed", relay_addr)
    got = sw.leech_through(relay_addr, seed_proc)
    seed_out = _finish(seed_proc, "seed")
    relay_out = _finish(relay_proc, "relay")
    print(f"leecher finished {got['seconds']:.1f} s after joining; leecher {got['torrent']} "
          f"{got['session']}; relay {relay_out['torrent']}")
    # the relay introduced them
    assert relay_out["torrent"].get("holepunch.relayed", 0) >= 1, relay_out
    assert got["torrent"].get("holepunch.rendezvous_sent", 0) >= 1, got
    assert seed_out["torrent"].get("holepunch.connect_received", 0) >= 1, seed_out
    sw.check_punched(got, seed_out, relay_out["peer_id"])
    # the tie-break used each side's public address as the relay reported it
    assert seed_out["external"][0] == sw.seed.public_ip


@pytest.mark.slow
@pytest.mark.interop
async def test_bep55_libtorrent_relay(sw):
    # libtorrent (in the relay's namespace) parses our rendezvous and sends
    # its connect messages to both of our peers
    _need_lt()
    from utp.bench.peers import LibtorrentPeer
    async with LibtorrentPeer(sw.relay.ip, netns=sw.relay.ns) as relay:
        os.makedirs(f"{sw.dir}/relay")
        await relay.add(sw.torrent, f"{sw.dir}/relay", seed=False)
        # It stays a leecher connected to the seed, and serves little:
        # its limits count protocol bytes too, so at 1 byte/s even its
        # handshake would take a minute; 3 kB/s is a block per 5 s.
        await relay.set_limits(download=50_000, upload=3_000)
        await trio.sleep(2)     # libtorrent refuses connections while it checks the files
        relay_addr = f"{sw.relay.ip}:{relay.port}"
        seed_proc = sw.start(sw.seed, "seed", relay_addr)
        got = await trio.to_thread.run_sync(sw.leech_through, relay_addr, seed_proc)
        seed_out = _finish(seed_proc, "seed")
        status = await relay.status()
    print(f"leecher finished {got['seconds']:.1f} s after joining; leecher {got['torrent']} "
          f"{got['session']}; libtorrent relay errors {status['errors'][-5:]}")
    assert got["torrent"].get("holepunch.rendezvous_sent", 0) >= 1, got
    assert seed_out["torrent"].get("holepunch.connect_received", 0) >= 1, seed_out
    assert not any(k.startswith("holepunch.error_received") for k in got["torrent"]), got
    relay_ids = [pid for pid in got["transfers"] if bytes.fromhex(pid).startswith(b"-LT")]
    # libtorrent's upload limit may hold its connect to the leecher back
    # until the seed's punch has already reached the leecher's listener
    sw.check_punched(got, seed_out, relay_ids[0] if relay_ids else None, relay_blocks=4,
                     both_sides=False)


@pytest.mark.slow
@pytest.mark.interop
async def test_bep55_libtorrent_seed_behind_a_nat(sw):
    # libtorrent seeds behind a port-restricted NAT, our leecher sits behind
    # another, our relay introduces them.  libtorrent (PEX off, connected to
    # the relay alone) learns the leecher only from the relay's connect and
    # dials it at once; our leecher punches at the same time.  Whichever
    # SYN gets through first makes the connection (libtorrent's often
    # does: the leecher's failed direct dial left its NAT open towards the
    # seed), and the download runs over it: through both NATs, uTP, to the
    # seed's public address.
    _need_lt()
    from utp.bench.peers import LibtorrentPeer
    relay_proc = sw.start(sw.relay, "relay", "-")
    relay_addr = f"{sw.relay.ip}:{PORT}"
    async with LibtorrentPeer(sw.seed.ip, netns=sw.seed.ns) as seed:
        # no PEX for the seed (as for ours in the first test): it would
        # learn the leecher from the relay and dial it while the leecher
        # dials it, and the two would meet without the relay
        await seed.add(sw.torrent, f"{sw.dir}/seed", seed=True, pex=False)
        await trio.sleep(1)
        await seed.connect_peer(sw.relay.ip, PORT)
        with trio.fail_after(30):
            while not (await seed.status())["peers"]:
                await trio.sleep(0.2)
        got = await trio.to_thread.run_sync(sw.leech_through, relay_addr, None)
        status = await seed.status()
    relay_out = _finish(relay_proc, "relay")
    print(f"leecher finished {got['seconds']:.1f} s after joining; leecher {got['torrent']} "
          f"{got['session']}; relay {relay_out['torrent']}; libtorrent errors "
          f"{status['errors'][-5:]}")
    assert relay_out["torrent"].get("holepunch.relayed", 0) >= 1, relay_out
    assert got["torrent"].get("holepunch.rendezvous_sent", 0) >= 1, got
    assert got["torrent"].get("holepunch.connect_received", 0) >= 1, got
    assert got["session"].get("connect.utp_failed", 0) >= 1, got     # not reachable directly
    lt_ids = [pid for pid in got["transfers"] if bytes.fromhex(pid).startswith(b"-LT")]
    assert len(lt_ids) == 1, got["transfers"]
    conns = [p for p in got["peers"] if p["peer_id"] == lt_ids[0]]
    assert conns and all(p["transport"] == "utp" for p in conns), got["peers"]
    print("leecher's connection to libtorrent:",
          "our punch" if conns[0]["punched"] else "libtorrent's dial after connect")
    assert {p["addr"][0] for p in conns} == {sw.seed.public_ip}, conns
    from_relay = got["transfers"].get(relay_out["peer_id"], [0, 0])[0]
    assert from_relay <= 2 * BLOCK, got["transfers"]
    assert got["transfers"][lt_ids[0]][0] >= SIZE - from_relay, got["transfers"]
