"""Issue 10 in the NAT lab: birthday probing between a symmetric NAT and
port-restricted ones, the clear error for two symmetric NATs, double NAT
(a home NAT behind a carrier-grade NAT) and hairpin NAT -- all with
``ucat --rendezvous`` at an opentracker, data both ways, sha256-checked.

Needs root (network namespaces, nftables) and opentracker: skips without
them, fails under CI=true.
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import time

import pytest
from testsupport import load_natlab, unavailable

natlab = load_natlab()
from natlab.matrix import (_python_env, _run_pair, build_matrix_lab, by_birthday,  # noqa: E402
                           format_matrix, run_matrix, run_offsets, summarize)

SIZE = 1 << 20


@pytest.fixture(autouse=True)
def _need_lab():
    why = natlab.can_build()
    if why is None and shutil.which("opentracker") is None:
        why = "opentracker is not installed (Debian package opentracker)"
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")


@pytest.mark.slow
def test_symmetric_meets_port_restricted_and_answering_by_birthday_probing(capsys):
    pairs = [("symmetric", "restricted"), ("restricted", "symmetric"),
             ("symmetric", "answering"), ("answering", "symmetric")]
    results = run_matrix(["restricted", "symmetric", "answering"], pairs=pairs, size=SIZE,
                         deadline=15.0)
    with capsys.disabled():
        print("\n" + format_matrix(results, size=SIZE, loss=0, deadline=15.0))
    assert len(results) == 4
    for r in results:
        assert by_birthday(r.a, r.b)
        # Both ucats exit 0 and each received exactly what the other sent.
        assert r.ok and r.delivered, f"{r.a} -> {r.b}: {r.error}"
        # The sides agree on the probe that met; it took some (one per
        # random port of the symmetric side) and both counted what they sent.
        assert r.probes is not None and 1 <= r.probes <= 6000, r
        assert r.packets_a is not None and r.packets_b is not None
        assert max(r.packets_a, r.packets_b) >= r.probes
        assert r.connect_time is not None and r.connect_time < 15.0


@pytest.mark.slow
def test_symmetric_with_symmetric_ends_with_a_clear_error_before_the_deadline():
    deadline = 8.0
    results = run_matrix(["symmetric"], size=1000, deadline=deadline)
    (r,) = results
    assert not r.connected
    # Both sides, each naming what it tried and why it cannot work.
    assert r.error.count("hole punching to") == 2, r.error
    assert r.error.count("timed out after") == 2, r.error
    assert r.error.count("birthday probing opened 256 ports") == 2, r.error
    assert r.error.count("both NATs are likely symmetric") == 2, r.error
    assert r.elapsed < deadline + 5


@pytest.mark.slow
def test_double_nat_and_hairpin(capsys):
    kinds = ["restricted", "double", "hairpin"]
    pairs = [("double", "restricted"), ("restricted", "double"), ("double", "double"),
             ("hairpin", "hairpin")]
    results = run_matrix(kinds, pairs=pairs, size=SIZE, deadline=10.0)
    with capsys.disabled():
        print("\n" + format_matrix(results, size=SIZE, loss=0, deadline=10.0))
    failed = [f"{r.a} -> {r.b}: {r.error}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    # Directly: no birthday probing between cone NATs.
    assert all(r.probes is None for r in results)


def test_double_nat_translates_twice():
    """The double host's packets leave through the home NAT (to the
    carrier's 100.64.0.0/10 space) and then the carrier's NAT (to the
    public address): a public echo server sees the carrier's address."""
    echo = ("import socket\ns=socket.socket(2,2);s.bind(('0.0.0.0',7000))\n"
            "d,a=s.recvfrom(99);s.sendto(repr(a).encode(),a)")
    ask = ("import socket,sys\ns=socket.socket(2,2);s.bind(('0.0.0.0',41000));s.settimeout(5)\n"
           "s.sendto(b'x',(sys.argv[1],7000));print(s.recv(99).decode())")
    with natlab.Lab() as lab:
        server = lab.add_host("server")
        d = lab.add_host("d", "double")
        server.popen([sys.executable, "-c", echo])
        time.sleep(0.3)
        out = d.run([sys.executable, "-c", ask, server.ip], timeout=20)
        assert out.stdout.strip() == repr((d.public_ip, 41000)), out.stdout + out.stderr
        home = d.router(["cat", "/proc/net/nf_conntrack"]).stdout
        assert re.search(rf"src={re.escape(d.ip)} dst={re.escape(server.ip)} .*sport=41000 "
                         rf".*dst=100\.64\.\d+\.2 ", home), home
        assert not d.public_ip.startswith("100.64.")


@pytest.mark.slow
def test_hairpin_goes_through_the_routers_public_address():
    """Two hosts behind one NAT meet through its public address: the
    router's conntrack shows the hairpinned flow (LAN to the public
    address, translated to the other host)."""
    with natlab.Lab() as lab:
        meet = ("tracker", build_matrix_lab(lab, ["hairpin"]))
        a, b = lab.hosts["a-hairpin"], lab.hosts["b-hairpin"]
        assert a.public_ip == b.public_ip and a.router_ns == b.router_ns and a.ip != b.ip
        r = _run_pair(lab, meet, "hairpin", "hairpin", size=SIZE, deadline=10.0,
                      workdir=lab.tempdir(), env=_python_env())
        assert r.ok, r.error
        table = a.router(["cat", "/proc/net/nf_conntrack"]).stdout
    hairpinned = [line for line in table.splitlines()
                  if re.search(rf"src=10\.\S+ dst={re.escape(a.public_ip)} .*"
                               rf"src=10\.\S+ dst={re.escape(a.public_ip)} ", line)]
    assert hairpinned, table


@pytest.mark.slow
def test_birthday_probes_until_success_over_repeats(capsys):
    """Not a speed target: the figures (probes until a pair met, time to
    connect) over several runs, and every run connecting."""
    pairs = [("symmetric", "restricted"), ("answering", "symmetric")]
    results = run_matrix(["restricted", "symmetric", "answering"], pairs=pairs, size=100_000,
                         deadline=15.0, repeat=4)
    summary = summarize(results)
    with capsys.disabled():
        print("\n" + format_matrix(results, size=100_000, loss=0, deadline=15.0))
    for g in summary:
        assert g["connected"] == g["runs"] == 4, g
        assert g["probes"] is not None and g["probes"]["n"] == 4
    probes = [r.probes for r in results]
    assert statistics.median(probes) < 2000, probes


@pytest.mark.slow
def test_known_mapping_behaviours_pick_the_roles_and_refuse_two_symmetric_nats():
    """``ucat --nat-mapping``: the symmetric side only sprays, the cone side
    only scans (so neither sends the other role's datagrams); two sides
    that know only their own NAT is symmetric spray in vain and say so at
    the deadline; told the peer's too (``--peer-nat-mapping``), they fail
    at once."""
    deadline = 12.0
    with natlab.Lab() as lab:
        meet = ("tracker", build_matrix_lab(lab, ["restricted", "symmetric"]))
        workdir, env = lab.tempdir(), _python_env()
        known = {"a": ["--nat-mapping", "dependent"], "b": ["--nat-mapping", "independent"]}
        r = _run_pair(lab, meet, "symmetric", "restricted", size=SIZE, deadline=deadline,
                      workdir=workdir, env=env, extra=known)
        assert r.ok, r.error
        assert r.probes is not None
        logs = {side: open(f).read() for side, f in
                (("a", _err_file(workdir, "symmetric-restricted", "a")),
                 ("b", _err_file(workdir, "symmetric-restricted", "b")))}
        assert "(spraying; up to 256 ports" in logs["a"], logs["a"]
        assert "(scanning; up to 256 ports" in logs["b"], logs["b"]
        own = {"a": ["--nat-mapping", "dependent"], "b": ["--nat-mapping", "dependent"]}
        alone = _run_pair(lab, meet, "symmetric", "symmetric", size=1000, deadline=6.0,
                          workdir=workdir, env=env, extra=own)
        told = ["--peer-nat-mapping", "dependent"]
        both = {side: [*args, *told] for side, args in own.items()}
        r = _run_pair(lab, meet, "symmetric", "symmetric", size=1000, deadline=deadline,
                      workdir=workdir, env=env, extra=both)
    assert not alone.connected and alone.elapsed < 6.0 + 5
    assert alone.error.count("timed out after") == 2, alone.error
    assert alone.error.count("the peer's NAT is likely symmetric too") == 2, alone.error
    assert not r.connected
    assert r.error.count("both NATs map every destination to a new port (symmetric)") == 2, r.error
    # Right after the rendezvous, not at the deadline.
    assert r.elapsed < deadline / 2, r.elapsed


def _err_file(workdir: str, tag: str, side: str) -> str:
    import glob
    (path,) = glob.glob(f"{workdir}/{tag}-*.{side}.err")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("via", ["tracker", "dht"])
def test_birthday_probing_at_start_offsets(via, capsys):
    """Birthday probing when the two ucats start 3 s apart (either order),
    meeting at a tracker or through the DHT."""
    jobs = [("symmetric", "restricted", -3.0), ("symmetric", "restricted", 3.0),
            ("answering", "symmetric", -3.0), ("answering", "symmetric", 3.0)]
    results = run_offsets(["restricted", "symmetric", "answering"], jobs, size=100_000,
                          deadline=15.0, via=via)
    with capsys.disabled():
        for r in results:
            print(f"\n  {via}: {r.a} -> {r.b} offset {r.offset:+g} s: "
                  + (f"connected, probe #{r.probes}, A {r.connect_time} s, B {r.connect_time_b} s"
                     if r.ok else f"FAILED: {r.error}"))
    failed = [f"{r.a} -> {r.b} at {r.offset:+g} s: {r.error}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert all(r.probes is not None for r in results)
