"""Real BitTorrent clients as uTP peers: libtorrent and Transmission.

What it is: drivers that start an independent client (optionally inside a
network namespace of the NAT lab), give it a torrent to seed or download,
tell it whom to connect to where it can, and report its progress, whether
it sees our connection as uTP, and the kernel's drop counter of its UDP
socket.  Used by ``python -m utp.bench interop`` and the interop tests.

- :class:`LibtorrentPeer`: libtorrent (PyPI wheel) in a subprocess
  (``python -m utp.bench.peers``, JSON lines on stdin/stdout), forced to
  uTP, its socket buffers left at the OS default unless asked; PEERS.md
  has the settings and why.
- :class:`TransmissionPeer`: Debian's ``transmission-daemon`` (3.00,
  libutp inside), driven over its JSON-RPC.  It cannot be told to connect
  to a peer: we connect to its peer port.

What it is not: a general client wrapper; every setting here serves the
interop checks (no DHT, LSD, PEX, UPnP, trackers: nothing leaves the
machine).
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

import trio

__all__ = ["LibtorrentPeer", "TransmissionPeer", "PeerError", "in_netns", "udp_drops",
           "free_port", "UTP_SOCKET_FLAG"]

UTP_SOCKET_FLAG = 1 << 17      # libtorrent peer_info.flags: utp_socket (not exported)
_CLONE_NEWNET = 0x40000000


class PeerError(RuntimeError):
    """A real peer could not be started or driven (the message says which
    and why)."""


@contextmanager
def in_netns(ns: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace ``ns`` (from
    ``ip netns add``); sockets created meanwhile stay in it.  None: no
    change.  setns(2) moves only the calling thread."""
    if ns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        new = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(new, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into network namespace {ns}: {os.strerror(err)}")
        finally:
            os.close(new)
        try:
            yield
        finally:
            if libc.setns(old, _CLONE_NEWNET) != 0:   # pragma: no cover - cannot fail once in
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
    finally:
        os.close(old)


def free_port(host: str = "127.0.0.1", ns: str | None = None) -> int:
    """A port free for both UDP and TCP on ``host`` (in namespace ``ns``)."""
    with in_netns(ns):
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, 0))
                port = u.getsockname()[1]
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                    try:
                        t.bind((host, port))
                    except OSError:
                        continue
                return port
    raise PeerError(f"no free port on {host}")


def udp_drops(pid: int, port: int) -> int | None:
    """The kernel's drop counter of the UDP socket bound to ``port`` in
    process ``pid``'s network namespace (the last column of
    /proc/PID/net/udp): datagrams lost because its receive buffer was
    full.  None if no such socket."""
    try:
        with open(f"/proc/{pid}/net/udp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    total, found = 0, False
    for line in lines:
        cols = line.split()
        if len(cols) >= 13 and int(cols[1].split(":")[1], 16) == port:
            total += int(cols[-1])
            found = True
    return total if found else None


def _netns_argv(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


# ---- libtorrent -----------------------------------------------------------------------


class LibtorrentPeer:
    """libtorrent in a subprocess (in namespace ``netns`` if given), bound
    to ``ip``, uTP only.  ``socket_buffers`` None leaves libtorrent's
    recv/send_socket_buffer_size at the OS default; a number sets both."""

    name = "libtorrent"

    def __init__(self, ip: str = "127.0.0.1", *, netns: str | None = None,
                 socket_buffers: int | None = None) -> None:
        self.ip, self.netns, self.socket_buffers = ip, netns, socket_buffers
        self.port = 0
        self._proc: trio.Process | None = None
        self._out = bytearray()
        self._lock = trio.Lock()

    async def __aenter__(self) -> LibtorrentPeer:
        argv = [*_netns_argv(self.netns), sys.executable, "-m", "utp.bench.peers", "libtorrent",
                self.ip, str(self.socket_buffers or 0)]
        # From "/": the source tree must not shadow the installed package.
        self._proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE,
                                                      stdout=subprocess.PIPE, cwd="/")
        try:
            self.port = (await self.call("hello"))["port"]
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request to the worker, its answer (PeerError on its error)."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise PeerError("libtorrent worker is not running")
        async with self._lock:
            await proc.stdin.send_all(json.dumps({"op": op, **args}).encode() + b"\n")
            with trio.fail_after(60):
                while b"\n" not in self._out:
                    chunk = await proc.stdout.receive_some()
                    if not chunk:
                        raise PeerError(f"libtorrent worker exited during {op!r}")
                    self._out += chunk
            line, _, rest = bytes(self._out).partition(b"\n")
            self._out[:] = rest
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"libtorrent {op}: {reply['error']}")
        return reply

    async def add(self, metainfo: bytes, save_path: str, *, seed: bool, pex: bool = True) -> None:
        """Add the torrent (``seed``: in seed mode; ``pex`` False: its
        ut_pex off, so it learns no peers from others)."""
        await self.call("add", torrent=base64.b64encode(metainfo).decode(), save_path=save_path,
                        seed=seed, pex=pex)

    async def set_limits(self, *, download: int = 0, upload: int = 0) -> None:
        """The torrent's download and upload limits in bytes/s (0: none)."""
        await self.call("limits", download=download, upload=upload)

    async def connect_peer(self, ip: str, port: int) -> None:
        await self.call("connect", ip=ip, port=port)

    async def status(self) -> dict[str, Any]:
        """progress (0..1), is_seeding, and peers: [{"ip", "port", "utp"}]."""
        return await self.call("status")

    def socket_drops(self) -> int | None:
        return udp_drops(self.pid, self.port)


def _libtorrent_worker(ip: str, buffers: int) -> None:
    """The subprocess: one session, JSON requests on stdin, answers on
    stdout."""
    import libtorrent as lt

    settings: dict[str, Any] = {
        "listen_interfaces": f"{ip}:0",
        "enable_outgoing_utp": True, "enable_incoming_utp": True,
        "enable_outgoing_tcp": False, "enable_incoming_tcp": False,
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "dht_bootstrap_nodes": "",
        "allow_multiple_connections_per_ip": True,
        "in_enc_policy": 2, "out_enc_policy": 2,          # plain handshakes
        # errors and why peers were dropped, reported by "status"
        "alert_mask": lt.alert_category.error | lt.alert_category.peer | lt.alert_category.connect,
    }
    if buffers:
        settings["recv_socket_buffer_size"] = buffers
        settings["send_socket_buffer_size"] = buffers
    ses = lt.session(settings)
    handle = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "hello":
                reply: dict[str, Any] = {"port": ses.listen_port()}
            elif op == "add":
                params = lt.add_torrent_params()
                params.ti = lt.torrent_info(lt.bdecode(base64.b64decode(req["torrent"])))
                params.save_path = req["save_path"]
                params.flags &= ~lt.torrent_flags.auto_managed
                params.flags &= ~lt.torrent_flags.paused
                if req["seed"]:
                    params.flags |= lt.torrent_flags.seed_mode
                if not req.get("pex", True):
                    params.flags |= lt.torrent_flags.disable_pex
                handle = ses.add_torrent(params)
                reply = {}
            elif op == "limits":
                # per-torrent rates in bytes/s (0: unlimited)
                assert handle is not None
                handle.set_download_limit(int(req["download"]))
                handle.set_upload_limit(int(req["upload"]))
                reply = {}
            elif op == "connect":
                assert handle is not None
                handle.connect_peer((req["ip"], req["port"]))
                reply = {}
            elif op == "status":
                assert handle is not None
                st = handle.status()
                peers = [{"ip": p.ip[0], "port": p.ip[1], "utp": bool(int(p.flags) & UTP_SOCKET_FLAG)}
                         for p in handle.get_peer_info()]
                reply = {"progress": st.progress, "is_seeding": st.is_seeding, "peers": peers,
                         "errors": [a.message() for a in ses.pop_alerts()
                                    if isinstance(a, (lt.peer_disconnected_alert, lt.peer_error_alert))
                                    or a.category() & lt.alert_category.error]}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # reported to the driver, which raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


# ---- Transmission ----------------------------------------------------------------------


class TransmissionPeer:
    """transmission-daemon (in namespace ``netns`` if given), peers on
    ``ip``, RPC on 127.0.0.1 of its namespace, everything that reaches out
    (DHT, LPD, PEX, port mapping) off, plain handshakes, no speed limits.
    ``utp`` False turns its uTP (libutp) off: TCP only.  (Transmission 3.00
    cannot turn TCP off; for uTP only, switch TCP off on the other side.)
    ``encryption`` is its setting of that name: 0 tolerated (plain
    handshakes preferred), 1 preferred, 2 required (MSE with RC4 only).

    Use as ``async with TransmissionPeer(workdir) as tr:``; :meth:`add` a
    torrent (its data directory given), :meth:`status` for progress and
    peers (``utp``: Transmission's ``isUTP``), :meth:`rpc` for the rest."""

    name = "transmission"

    @staticmethod
    def missing() -> str | None:
        """Why no daemon can run here (None when it can): for a test's skip."""
        if shutil.which("transmission-daemon") is None:
            return "transmission-daemon is not installed (Debian package transmission-daemon)"
        return None

    def __init__(self, workdir: str, ip: str = "127.0.0.1", *, netns: str | None = None,
                 utp: bool = True, encryption: int = 0) -> None:
        self.workdir, self.ip, self.netns, self.utp = os.fspath(workdir), ip, netns, utp
        self.encryption = encryption
        self.port = free_port(ip, netns)
        self.rpc_port = free_port("127.0.0.1", netns)
        self._session = ""
        self._proc: subprocess.Popen | None = None
        self.torrent_id: int | None = None

    async def __aenter__(self) -> TransmissionPeer:
        exe = shutil.which("transmission-daemon")
        if exe is None:
            raise PeerError(str(self.missing()))
        config = os.path.join(self.workdir, "config")
        os.makedirs(config, exist_ok=True)
        settings = {
            "bind-address-ipv4": self.ip, "bind-address-ipv6": "::1",
            "peer-port": self.port, "peer-port-random-on-start": False,
            "port-forwarding-enabled": False, "utp-enabled": self.utp,
            "dht-enabled": False, "lpd-enabled": False, "pex-enabled": False,
            "encryption": self.encryption,
            "rpc-enabled": True, "rpc-bind-address": "127.0.0.1", "rpc-port": self.rpc_port,
            "rpc-authentication-required": False, "rpc-whitelist-enabled": False,
            "rpc-host-whitelist-enabled": False,
            "speed-limit-down-enabled": False, "speed-limit-up-enabled": False,
            "alt-speed-enabled": False, "ratio-limit-enabled": False,
            "idle-seeding-limit-enabled": False, "incomplete-dir-enabled": False,
            "start-added-torrents": True, "download-dir": self.workdir,
            "message-level": 1,
        }
        with open(os.path.join(config, "settings.json"), "w") as f:
            json.dump(settings, f)
        self._log = open(os.path.join(self.workdir, "transmission.log"), "wb")
        self._proc = subprocess.Popen([*_netns_argv(self.netns), exe, "-f", "-g", config,
                                       "--log-error"], stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT, cwd="/")
        try:
            with trio.fail_after(20):
                while True:
                    try:
                        await self.rpc("session-get")
                        break
                    except (OSError, PeerError):
                        if self._proc.poll() is not None:
                            raise PeerError(f"transmission-daemon exited ({self._proc.returncode}); "
                                            f"see {self._log.name}") from None
                        await trio.sleep(0.2)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await trio.to_thread.run_sync(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    @property
    def pid(self) -> int:
        """The daemon's pid (``ip netns exec`` execs it, so the same)."""
        assert self._proc is not None
        return self._proc.pid

    def _post(self, body: bytes) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.rpc_port}/transmission/rpc"
        for _ in range(3):
            req = urllib.request.Request(url, data=body, headers={
                "Content-Type": "application/json", "X-Transmission-Session-Id": self._session})
            try:
                with in_netns(self.netns), urllib.request.urlopen(req, timeout=10) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code != 409:
                    raise PeerError(f"transmission RPC: HTTP {exc.code}") from None
                self._session = exc.headers.get("X-Transmission-Session-Id", "")
        raise PeerError("transmission RPC: no session id after 3 tries")

    async def rpc(self, method: str, **arguments: Any) -> dict[str, Any]:
        """One JSON-RPC call (in a thread: the RPC listens inside the
        daemon's namespace); its "arguments", PeerError unless "success"."""
        body = json.dumps({"method": method, "arguments": arguments}).encode()
        reply = await trio.to_thread.run_sync(self._post, body)
        if reply.get("result") != "success":
            raise PeerError(f"transmission {method}: {reply.get('result')}")
        return reply.get("arguments", {})

    async def add(self, metainfo: bytes, save_path: str | os.PathLike[str], *, seed: bool) -> None:
        """Add the torrent (its data in ``save_path`` when seeding: the
        daemon verifies it first) and wait until it runs: the daemon
        hangs up on handshakes for a torrent that is still being checked."""
        args = await self.rpc("torrent-add", metainfo=base64.b64encode(metainfo).decode(),
                              paused=False, **{"download-dir": os.fspath(save_path)})
        added = args.get("torrent-added") or args.get("torrent-duplicate")
        self.torrent_id = added["id"]
        with trio.fail_after(60):
            while True:
                st = await self.status()
                if st["state"] == (6 if seed else 4):   # seeding / downloading
                    break
                await trio.sleep(0.2)

    async def status(self) -> dict[str, Any]:
        """progress (0..1, verified pieces), state (Transmission's status:
        4 downloading, 6 seeding), and peers:
        [{"ip", "port", "utp", "encrypted"}]."""
        args = await self.rpc("torrent-get", ids=[self.torrent_id],
                              fields=["percentDone", "status", "peers", "error", "errorString"])
        t = args["torrents"][0]
        peers = [{"ip": p["address"], "port": p["port"], "utp": bool(p.get("isUTP")),
                  "encrypted": bool(p.get("isEncrypted"))} for p in t["peers"]]
        return {"progress": t["percentDone"], "state": t["status"], "peers": peers,
                "errors": [t["errorString"]] if t.get("error") else []}

    def socket_drops(self) -> int | None:
        return udp_drops(self.pid, self.port)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "libtorrent":
        _libtorrent_worker(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m utp.bench.peers libtorrent IP SOCKET_BUFFERS")
