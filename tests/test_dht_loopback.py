"""The DHT over real UDP on loopback: IPv6 (BEP 32) and dual-stack
Endpoints, and the ``dht`` command line (serve, announce, get-peers, ping)."""

from __future__ import annotations

import hashlib
import signal
import json
import os
import socket
import subprocess
import sys

import pytest
import trio

import dht
import utp

needs_ipv6 = pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")


async def test_ipv4_nodes_on_loopback():
    async with utp.open_endpoint("127.0.0.1", 0) as e1, utp.open_endpoint("127.0.0.1", 0) as e2, \
            utp.open_endpoint("127.0.0.1", 0) as e3:
        async with dht.open_node(e1) as n1:
            a1 = e1.local_address
            async with dht.open_node(e2, bootstrap=[a1]) as n2, dht.open_node(e3, bootstrap=[a1]) as n3:
                ih = hashlib.sha1(b"loopback").digest()
                with trio.fail_after(10):
                    res = await n2.announce(ih)
                    assert res.accepted >= 1
                    peers = [p async for p in n3.get_peers(ih)]
                assert peers == [("127.0.0.1", e2.local_address[1])]
                assert n1.statistics()["counters"]["rx_query_announce_peer"] >= 1


@needs_ipv6
async def test_ipv6_and_dual_stack_nodes6():
    async with utp.open_endpoint("::1", 0) as e6, utp.open_endpoint("127.0.0.1", 0) as e4, \
            utp.open_endpoint(None, 0) as dual, utp.open_endpoint("::1", 0) as e6b:
        async with dht.open_node(e6) as n6, dht.open_node(e4) as n4:
            a6 = e6.local_address[:2]
            a4 = e4.local_address[:2]
            async with dht.open_node(dual, bootstrap=[a6, a4]) as nd:
                assert nd.core.families == (4, 6)
                stats = nd.statistics()
                assert stats["nodes"] == {"ipv4": 1, "ipv6": 1}
                # an IPv6-only node learns IPv6 nodes through nodes6 (BEP 32)
                async with dht.open_node(e6b, bootstrap=[("::1", dual.local_address[1])]) as nb:
                    with trio.fail_after(10):
                        found = await nb.find_node(n6.node_id)
                    assert (n6.node_id, a6) in found
                    ih = hashlib.sha1(b"six").digest()
                    with trio.fail_after(10):
                        assert (await nb.announce(ih)).accepted >= 1
                        peers = [p async for p in nd.get_peers(ih)]
                    assert ("::1", e6b.local_address[1]) in peers
                assert nd.external_address is None or nd.external_address[1] == dual.local_address[1]


# ---- the command line ------------------------------------------------------------------

# Child processes import the same dht/utp these tests imported (the
# installed wheel in CI, the source tree in development), never whatever
# happens to sit in the current directory.
_IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dht.__file__)))
_CHILD_ENV = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=_IMPORT_ROOT)
_CHILD_CWD = "/"


def _dht(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "dht", *args], capture_output=True, text=True,
                          timeout=timeout, env=_CHILD_ENV, cwd=_CHILD_CWD)


@pytest.fixture
def server():
    p = subprocess.Popen([sys.executable, "-m", "dht", "serve", "--bind", "127.0.0.1:0", "--json"],
                         stdout=subprocess.PIPE, text=True, env=_CHILD_ENV, cwd=_CHILD_CWD)
    try:
        line = json.loads(p.stdout.readline())
        assert line["event"] == "serving"
        yield line["address"]
    finally:
        p.terminate()
        p.wait(10)


def test_cli_announce_get_peers_ping(server):
    ih = hashlib.sha1(b"cli").hexdigest()
    r = _dht("announce", ih, "--port", "4242", "--bootstrap", server)
    assert r.returncode == 0, r.stderr
    assert "announced to 1 of 1" in r.stdout
    r = _dht("get-peers", ih, "--bootstrap", server)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["127.0.0.1:4242"]
    r = _dht("--json", "--bootstrap", server, "get-peers", ih)
    doc = json.loads(r.stdout)
    assert doc["peers"] == ["127.0.0.1:4242"] and doc["nodes"][0]["address"] == server
    r = _dht("ping", server, "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["id"]) == 40


def test_cli_failures():
    ih = "00" * 20
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:   # a port nobody answers on
        s.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % s.getsockname()[1]
        r = _dht("ping", dead, "--timeout", "10")
        assert r.returncode == 1 and "no answer" in r.stderr
        r = _dht("announce", ih, "--bootstrap", dead)
        assert r.returncode == 1 and "no DHT node answered" in r.stderr
    r = _dht("get-peers", ih)                        # no bootstrap: contacts nobody
    assert r.returncode == 1 and "--bootstrap" in r.stderr
    assert _dht("get-peers", "xyz").returncode == 2


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dht"), stderr
    assert "Errno" not in stderr and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_resolves_host_names(server):
    """HOST:PORT takes names everywhere (issue 13): ping, --bootstrap, --bind."""
    port = server.rsplit(":", 1)[1]
    r = _dht("ping", f"localhost:{port}", "--bind", "localhost:0", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"127.0.0.1:{port} id ")
    ih = hashlib.sha1(b"names").hexdigest()
    r = _dht("announce", ih, "--port", "4343", "--bootstrap", f"localhost:{port}")
    assert r.returncode == 0, r.stderr
    r = _dht("get-peers", ih, "--bootstrap", f"localhost:{port}")
    assert r.returncode == 0 and r.stdout.split() == ["127.0.0.1:4343"], r.stderr


def test_cli_ping_to_a_closed_port_is_refused_at_once():
    """The ICMP port unreachable the Endpoint reports ends the ping with a
    'refused' line, long before the ping's own timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = _dht("ping", f"127.0.0.1:{closed}", "--timeout", "30")
    assert r.returncode == 1
    line = _one_line(r.stderr)
    assert f"127.0.0.1:{closed} refused the ping: ICMP port unreachable" in line, line
    r = _dht("get-peers", "00" * 20, "--bootstrap", f"127.0.0.1:{closed}", "--timeout", "30")
    assert r.returncode == 1
    assert f"127.0.0.1:{closed}: ICMP port unreachable" in _one_line(r.stderr)


def test_cli_messages(server):
    """--version; get-peers without peers says so and exits 1; a port in
    use and bad arguments are one line each, with no raw errno."""
    r = _dht("--version")
    assert r.returncode == 0 and r.stdout.startswith("dht (utpkit) "), r
    ih = hashlib.sha1(b"nobody announced this").hexdigest()
    r = _dht("get-peers", ih, "--bootstrap", server)
    assert r.returncode == 1 and r.stdout == ""
    assert f"no peers for {ih}: asked 1 node" in _one_line(r.stderr)
    r = _dht("get-peers", "-h")
    assert "INFOHASH" in r.stdout and "40 hex digits" in r.stdout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        busy = s.getsockname()[1]
        r = _dht("serve", "--bind", f"127.0.0.1:{busy}")
    assert r.returncode == 1
    assert f"cannot bind to 127.0.0.1:{busy}" in _one_line(r.stderr)
    r = _dht("ping", "127.0.0.1:99999")
    assert r.returncode == 2 and "bad port" in _one_line(r.stderr)
    r = _dht("get-peers", "xyz")
    assert r.returncode == 2 and "INFOHASH" in _one_line(r.stderr)


def test_cli_serve_saves_state_on_sigterm(server, tmp_path):
    state = tmp_path / "node.json"
    p = subprocess.Popen([sys.executable, "-m", "dht", "serve", "--bind", "127.0.0.1:0", "--json",
                          "--bootstrap", server, "--state", str(state)], stdout=subprocess.PIPE, text=True,
                         env=_CHILD_ENV, cwd=_CHILD_CWD)
    try:
        first = json.loads(p.stdout.readline())
        r = _dht("ping", first["address"])
        assert r.returncode == 0
    finally:
        p.terminate()
        assert p.wait(10) == 0
    doc = json.loads(state.read_text())
    assert doc["id"] == first["id"]
    assert int(server.rsplit(":", 1)[1]) in [n["port"] for n in doc["nodes"]]


def test_bench_runs(capsys):
    """python -m dht.bench keeps working (tiny sizes; the numbers are not checked)."""
    from dht import bench
    bench.bench_virtual(60, 5)
    bench.bench_loopback(3, 3, 300)
    bench.bench_memory(2000, 100)
    bench.bench_core_qps(0.1)
    out = capsys.readouterr().out
    for word in ("exact k closest", "queries/s", "per 1,000 peers", "latency"):
        assert word in out


def test_cli_serve_prints_counters_on_sigusr1_and_every_n_minutes(server):
    """dht serve: SIGUSR1 prints the counters (queries answered, rate
    limiting, the queue's drops, the engine's refusals); --stats N prints
    them every N minutes as well."""
    p = subprocess.Popen([sys.executable, "-m", "dht", "serve", "--bind", "127.0.0.1:0", "--json",
                          "--stats", "0.01"], stdout=subprocess.PIPE, text=True, env=_CHILD_ENV,
                         cwd=_CHILD_CWD)
    try:
        first = json.loads(p.stdout.readline())
        assert _dht("ping", first["address"]).returncode == 0
        periodic = json.loads(p.stdout.readline())          # 0.6 s later
        assert periodic["event"] == "stats" and periodic["why"].startswith("every")
        p.send_signal(signal.SIGUSR1)
        doc = periodic
        while doc["why"] != "SIGUSR1":
            doc = json.loads(p.stdout.readline())
        assert doc["counters"]["rx_query_ping"] == 1 and doc["counters"]["tx_response"] >= 1
        assert doc["queue"]["dropped"] == 0 and doc["queue"]["received"] >= 1
        assert set(doc["engine"]) >= {"syn_invalid", "syn_cookies", "unauth_limited"}
    finally:
        p.terminate()
        assert p.wait(10) == 0
    r = _dht("serve", "--stats", "0")
    assert r.returncode == 2 and "positive" in r.stderr
