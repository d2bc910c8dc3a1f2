"""The NAT lab itself (ci/natlab) and uTP through its kernel NATs: each
NAT kind maps and filters as named, teardown always happens, a plain
connect() gets out from behind a NAT, and an idle punched connection
survives long silence through its keepalives.

These need root (network namespaces, nftables).  Without it they skip --
except under CI=true, where they fail: CI runs as root and must run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from testsupport import load_natlab, unavailable

natlab = load_natlab()


def _need_lab(tracker: bool = False) -> None:
    why = natlab.can_build()
    if why is None and tracker and not _which("opentracker"):
        why = "opentracker is not installed (Debian package opentracker)"
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")


def _which(name: str) -> bool:
    import shutil
    return shutil.which(name) is not None


@pytest.fixture
def lab():
    _need_lab()
    with natlab.Lab() as lab:
        yield lab


def _env() -> dict[str, str]:
    from natlab.matrix import _python_env
    return _python_env()


ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    while True:
        data, addr = s.recvfrom(100)
        s.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)
""")

# Send from one local port to two echo servers; print the source address
# each saw, then whether an unsolicited datagram from a third party (sent
# to the first mapping by the "poke" server) gets in.
PROBE = textwrap.dedent("""
    import socket, sys
    t, p1, p2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5555))
    s.settimeout(0.5)
    seen = []
    for port in (p1, p2):
        for attempt in range(20):   # the echo server may still be starting
            s.sendto(b"hi", (t, port))
            try:
                seen.append(s.recvfrom(100)[0].decode())
                break
            except OSError:
                continue
    print(" ".join(seen))
""")


def test_nat_kinds_map_and_filter_as_named(lab):
    t = lab.add_host("t")
    other = lab.add_host("other")
    hosts = {kind: lab.add_host(kind, kind) for kind in ("full", "restricted", "symmetric")}
    env = _env()
    for port in (7000, 7001):
        t.popen([sys.executable, "-c", ECHO, str(port)], env=env)
    import time
    time.sleep(0.5)
    mapped = {}
    for kind, host in hosts.items():
        r = host.run([sys.executable, "-c", PROBE, t.ip, "7000", "7001"], env=env)
        assert r.returncode == 0, r.stderr
        first, second = r.stdout.split()
        assert first.split(":")[0] == host.public_ip == second.split(":")[0]
        mapped[kind] = (first, second)
    # Full cone and port-restricted keep the port for every destination
    # (Linux preserves it when free); symmetric picks a new one per destination.
    assert mapped["full"] == (f"{hosts['full'].public_ip}:5555",) * 2
    assert mapped["restricted"] == (f"{hosts['restricted'].public_ip}:5555",) * 2
    a, b = mapped["symmetric"]
    assert a != b
    # Filtering: an unsolicited datagram from a third host reaches the host
    # behind a full cone, and nothing else.
    listen = textwrap.dedent("""
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 5555))
        s.settimeout(1.5)
        s.sendto(b"open", (sys.argv[1], 7000))   # open a mapping towards t only
        s.recvfrom(100)
        print("ready", flush=True)
        try:
            s.recvfrom(100)
            print("reached")
        except OSError:
            print("filtered")
    """)
    for kind, host in hosts.items():
        proc = host.popen([sys.executable, "-c", listen, t.ip], env=env, stdout=subprocess.PIPE,
                          text=True)
        assert proc.stdout.readline().strip() == "ready"
        port = mapped[kind][0].split(":")[1]
        other.run([sys.executable, "-c",
                   f"import socket;socket.socket(socket.AF_INET,socket.SOCK_DGRAM)"
                   f".sendto(b'poke',('{host.public_ip}',{port}))"])
        out, _ = proc.communicate(timeout=10)
        assert out.strip() == ("reached" if kind == "full" else "filtered"), kind
    assert hosts["restricted"].router(["nft", "list", "chain", "ip", "natlab", "input"]).returncode == 0


def test_teardown_always_and_names_unique():
    _need_lab()
    listed = lambda: subprocess.run(["ip", "netns", "list"], capture_output=True,  # noqa: E731
                                    text=True).stdout
    with pytest.raises(ZeroDivisionError):
        with natlab.Lab() as one, natlab.Lab() as two:
            one.add_host("x", "restricted")
            two.add_host("x", "symmetric")
            assert one.prefix != two.prefix
            names = one.namespaces + two.namespaces
            assert len(set(names)) == len(names) == 6  # inet, router, host each
            sleeper = one.hosts["x"].popen(["sleep", "600"])
            assert all(n in listed() for n in names)
            1 / 0
    assert sleeper.poll() is not None
    assert not any(n in listed() for n in names)


def test_teardown_on_keyboard_interrupt():
    _need_lab()
    with pytest.raises(KeyboardInterrupt):
        with natlab.Lab() as lab:
            lab.add_host("x", "full")
            names = list(lab.namespaces)
            raise KeyboardInterrupt
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in out for n in names)


def test_connect_with_retry_from_behind_a_nat_to_a_public_listener(lab):
    server = lab.add_host("server")
    client = lab.add_host("client", "restricted", loss=5)
    env = _env()
    data = os.urandom(1 << 20)
    listener = server.popen([sys.executable, "-m", "ucat", "-l", "-p", "4000"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import time
    time.sleep(0.8)
    r = subprocess.run(client.cmd([sys.executable, "-m", "ucat", "-w", "20", server.ip, "4000"]),
                       input=data, capture_output=True, env=env, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    out, err = listener.communicate(timeout=30)
    assert listener.returncode == 0, err.decode()
    assert out == data


IDLE_SCRIPT = textwrap.dedent("""
    import sys, trio, utp
    key, th, tp, idle, keepalive_ms, me = sys.argv[1:7]

    async def main():
        opts = {utp.UTPKIT_KEEPALIVE: int(keepalive_ms)}
        async with utp.open_endpoint("0.0.0.0", 0, options=opts) as ep:
            s = await utp.rendezvous(ep, key, via=(th, int(tp)), timeout=20)
            print("connected", flush=True)
            await trio.sleep(float(idle))   # the application says nothing
            # Only a speaks first: b's NAT must still hold its mapping for
            # a's packet to get in (both sending at once would re-punch).
            if me == "b":
                with trio.move_on_after(10):
                    got = await s.receive_some()
                    print(got.decode(), flush=True)
                    await s.send_all(b"hello from b")
                    await s.wait_send_complete()
                    await s.aclose()
                    return
                print("nothing arrived", flush=True)
                sys.exit(3)
            await s.send_all(b"hello from a after the silence")
            with trio.move_on_after(10):
                print((await s.receive_some()).decode(), flush=True)
                await s.aclose()
                return
            sys.exit(3)

    trio.run(main)
""")


def _idle_pair(idle: int, keepalive_ms: int) -> list[tuple[int, str, str]]:
    import hashlib
    key = f"idle-{os.getpid()}-{idle}-{keepalive_ms}"
    with natlab.Lab(udp_timeout=10) as lab:
        t = lab.add_host("tracker")
        a = lab.add_host("a", "restricted")
        b = lab.add_host("b", "restricted")
        tracker = lab.start_opentracker(t, [hashlib.sha1(key.encode()).digest()])
        # The mapping really does expire without traffic: the routers'
        # conntrack timeout is what we set.
        assert natlab.read_sysctl(a.router_ns, "net.netfilter.nf_conntrack_udp_timeout_stream") == "10"
        env = _env()
        procs = [h.popen([sys.executable, "-c", IDLE_SCRIPT, key, tracker[0], str(tracker[1]),
                          str(idle), str(keepalive_ms), h.name], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True) for h in (a, b)]
        outs = [p.communicate(timeout=idle + 80) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_idle_punched_connection_survives_two_minutes_of_silence():
    # Conntrack forgets an idle UDP mapping after 10 s here (home NATs: ~30
    # s); uTP keepalives every 4 s keep both mappings across 120 s of
    # silence from the application, 12 times the mapping's lifetime.
    _need_lab(tracker=True)
    (ca, outa, erra), (cb, outb, errb) = _idle_pair(120, 4000)
    assert ca == 0 and cb == 0, (erra, errb)
    assert "hello from a after the silence" in outb and "hello from b" in outa


def test_without_keepalives_the_mapping_expires():
    # The control: keepalives every 60 s, 30 s of silence: b's NAT has
    # forgotten a, and a's first word after the silence never arrives.
    _need_lab(tracker=True)
    (ca, outa, erra), (cb, outb, errb) = _idle_pair(30, 60000)
    assert "connected" in outa and "connected" in outb, (erra, errb)
    assert cb == 3 and "nothing arrived" in outb
    assert ca == 3
