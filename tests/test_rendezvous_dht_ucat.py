"""``ucat --rendezvous KEY --bootstrap HOST:PORT`` on loopback: two ucats
meet through a ``python -m dht serve`` node (the only node anyone
contacts), punch (no NAT here: the same path) and copy both ways."""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
import tempfile
import time

import pytest


def _env() -> dict[str, str]:
    env = dict(os.environ)
    roots = []
    for name in ("utp", "dht", "ucat", "tracker"):
        root = os.path.dirname(os.path.dirname(importlib.util.find_spec(name).origin))
        if root not in roots:
            roots.append(root)
    env["PYTHONPATH"] = os.pathsep.join(roots)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture
def dht_node():
    """A DHT node on 127.0.0.1 (python -m dht serve); its (ip, port)."""
    proc = subprocess.Popen([sys.executable, "-m", "dht", "serve", "--bind", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=tempfile.gettempdir())
    try:
        line = proc.stdout.readline()
        assert line.startswith("dht: serving on 127.0.0.1:"), (line, proc.stderr.read())
        port = int(line.split()[3].rsplit(":", 1)[1])
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ucat_rendezvous_through_the_dht(dht_node, tmp_path):
    key = f"meet-dht-{secrets.token_hex(4)}"   # DHT entries are not withdrawn: a fresh key
    data = {side: os.urandom(1 << 20) for side in "ab"}
    procs = {}
    start = time.monotonic()
    for side in "ab":
        (tmp_path / f"{side}.in").write_bytes(data[side])
        with open(tmp_path / f"{side}.in", "rb") as fin, open(tmp_path / f"{side}.out", "wb") as fout:
            procs[side] = subprocess.Popen(
                [sys.executable, "-m", "ucat", "-d", "--rendezvous", key,
                 "--bootstrap", f"{dht_node[0]}:{dht_node[1]}", "-w", "15"],
                stdin=fin, stdout=fout, stderr=subprocess.PIPE, cwd=tmp_path, env=_env())
        time.sleep(0.2)
    errs = {}
    for side, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        errs[side] = err.decode()
        assert proc.returncode == 0, errs[side]
    assert (tmp_path / "a.out").read_bytes() == data["b"]
    assert (tmp_path / "b.out").read_bytes() == data["a"]
    for side in "ab":
        assert "(implied port): 1 node stored us" in errs[side], errs[side]
        assert "punching as the" in errs[side], errs[side]
    assert time.monotonic() - start < 20


def test_ucat_rendezvous_through_the_dht_alone_fails_clearly(dht_node):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ucat", "--rendezvous", f"alone-{secrets.token_hex(4)}",
                        "--bootstrap", f"{dht_node[0]}:{dht_node[1]}", "-w", "2"],
                       capture_output=True, text=True, env=_env(), cwd=tempfile.gettempdir(),
                       stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "no other peer announced the key" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10


def test_ucat_rendezvous_bootstrap_arguments():
    for argv, message in (
        (["--bootstrap", "127.0.0.1:1"], "--bootstrap needs --rendezvous"),
        (["--rendezvous", "k"], "or --bootstrap HOST:PORT"),
        (["--rendezvous", "k", "--bootstrap", "127.0.0.1:1", "--tracker", "udp://127.0.0.1:1"],
         "not both"),
        (["--rendezvous", "k", "--bootstrap", "127.0.0.1"], "want HOST:PORT"),
        (["--rendezvous", "k", "--bootstrap", "::1:5"], "want HOST:PORT"),
        (["--rendezvous", "k", "--bootstrap", "127.0.0.1:0"], "bad port"),
        (["--rendezvous", "k", "--bootstrap", "127.0.0.1:1", "-l"], "takes no host"),
    ):
        r = subprocess.run([sys.executable, "-m", "ucat", *argv], capture_output=True, text=True,
                           env=_env(), cwd=tempfile.gettempdir())
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
