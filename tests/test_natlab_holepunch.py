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
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
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


def _env() -> dict[str, str]:
    """Import bt and utp in the lab from where this process does (the
    source tree's bt by hand, the installed wheel in CI)."""
    env = dict(os.environ)
    roots: list[str] = []
    for name in ("bt", "utp", "_utpkit"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            root = os.path.dirname(os.path.dirname(spec.origin))
            if root not in roots:
                roots.append(root)
    env["PYTHONPATH"] = os.pathsep.join(roots + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                 else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _readline(proc: subprocess.Popen, what: str, timeout: float) -> str:
    import select
    end = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if r:
            line = proc.stdout.readline()
            if not line:
                break
            return line.strip()
    raise AssertionError(f"{what}: no output within {timeout} s (exit code {proc.poll()})")


def _finish(proc: subprocess.Popen, what: str) -> dict:
    assert proc.stdin is not None
    proc.stdin.close()
    while not (line := _readline(proc, what, 15)).startswith("{"):
        pass
    return json.loads(line)


@pytest.mark.slow
def test_bep55_our_relay_two_port_restricted_nats(tmp_path):
    why = natlab.can_build()
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")
    from bt.create import create_torrent
    env = _env()
    with natlab.Lab() as lab:
        relay = lab.add_host("relay", "none")
        seed = lab.add_host("seed", "restricted")
        leech = lab.add_host("leech", "restricted")
        d = lab.tempdir()
        os.makedirs(f"{d}/seed")
        payload = os.urandom(SIZE)
        with open(f"{d}/seed/blob.bin", "wb") as f:
            f.write(payload)
        with open(f"{d}/t.torrent", "wb") as f:
            f.write(create_torrent(f"{d}/seed/blob.bin", piece_length=PIECE))
        relay_addr = f"{relay.ip}:{PORT}"

        def start(host, role: str, ddir: str, to: str):
            return host.popen([sys.executable, "-c", PEER, role, f"{d}/t.torrent", ddir,
                               host.ip, to, *VERBOSE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True)

        procs = {"relay": start(relay, "relay", f"{d}/relay", "-")}
        time.sleep(1.0)      # the relay listens
        procs["seed"] = start(seed, "seed", f"{d}/seed", relay_addr)
        assert _readline(procs["seed"], "seed", 30) == "connected"
        procs["leech"] = start(leech, "leech", f"{d}/leech", relay_addr)
        assert _readline(procs["leech"], "leecher", 30) == "connected"
        got = json.loads(_readline(procs["leech"], "leecher's result", 120))
        seed_out = _finish(procs["seed"], "seed")
        relay_out = _finish(procs["relay"], "relay")
        with open(f"{d}/leech/blob.bin", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()

    seed_id = seed_out["peer_id"]
    print(f"leecher finished {got['seconds']:.1f} s after joining; leecher {got['torrent']} "
          f"{got['session']}; relay {relay_out['torrent']}")
    # the relay introduced them
    assert relay_out["torrent"].get("holepunch.relayed", 0) >= 1, relay_out
    assert got["torrent"].get("holepunch.rendezvous_sent", 0) + \
        seed_out["torrent"].get("holepunch.rendezvous_sent", 0) >= 1, (got, seed_out)
    assert got["session"].get("holepunch.punched", 0) >= 1, got
    # the leecher's connection to the seed is the punched uTP connection, to
    # the seed's public address, and it brought every byte
    conns = [p for p in got["peers"] if p["peer_id"] == seed_id]
    assert conns, got["peers"]
    assert all(p["punched"] and p["transport"] == "utp" for p in conns), conns
    assert {p["addr"][0] for p in conns} == {seed.public_ip}, conns
    from_relay = got["transfers"].get(relay_out["peer_id"], [0, 0])[0]
    # at most the limit's burst and one block on credit (1 byte/s after that)
    assert from_relay <= 2 * BLOCK, got["transfers"]
    assert got["transfers"][seed_id][0] >= SIZE - from_relay, got["transfers"]
    assert got["session"].get("connections.punched", 0) >= 1
    # the tie-break used each side's public address as the relay reported it
    assert got["external"][0] == leech.public_ip and seed_out["external"][0] == seed.public_ip
