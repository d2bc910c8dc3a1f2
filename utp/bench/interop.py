"""``python -m utp.bench interop``: our uTP against real clients.

In one run, for libtorrent (PyPI) and Transmission (Debian, libutp
inside), each with its default socket buffers: our Endpoint downloads a
torrent of random data from the client (we leech, it seeds) and uploads
it to the client (we seed, it leeches), over uTP, through the minimal peer
wire of :mod:`utp.bench.peerwire`.  For each peer and direction it prints
MB/s (from the first piece to the last, so Transmission's ~10 s rechoke
wait is left out), our retransmissions and timeouts, and the drops the
kernel counted at the receiver's UDP socket (ours: SO_RXQ_OVFL; theirs:
the ``drops`` column of /proc/PID/net/udp).  Then the upload to libtorrent
once more with its socket buffers at 8 MiB, and the ratio of the two
(issue 12's target: default buffers >= 50% of 8 MiB).

``--loss N`` runs the same through the NAT lab (root; the lab is a tool
of the checkout, not of the wheel: ``--natlab CHECKOUT/ci/natlab`` when
running from outside the checkout): the client on the lab's internet, us
behind a full-cone router that drops N% of the datagrams each way.

:func:`run_transfer` is what the interop tests call; a benchmark prints
numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import trio

from .peers import LibtorrentPeer, TransmissionPeer, in_netns
from .peerwire import HandshakeRefused, Torrent, WireError, leech, make_torrent, seed

__all__ = ["Placement", "RunResult", "run_transfer", "lab_placement", "PEERS", "DIRECTIONS"]

MiB = 1 << 20
T = TypeVar("T")
PEERS = ("libtorrent", "transmission")
DIRECTIONS = ("download", "upload")


@dataclass
class Placement:
    """Where the two sides run: our socket's namespace and address (and the
    address the peer must dial to reach us), the peer's namespace and
    address.  The default is plain loopback."""

    our_ns: str | None = None
    our_ip: str = "127.0.0.1"
    our_public_ip: str = "127.0.0.1"
    peer_ns: str | None = None
    peer_ip: str = "127.0.0.1"
    label: str = "loopback"


def lab_placement(lab: Any, loss: int) -> Placement:
    """In a natlab.Lab: the peer on the lab's internet, us behind a
    full-cone router dropping ``loss`` percent of the datagrams each way
    (a full cone, so the peer can also dial us)."""
    peer = lab.add_host("peer")
    us = lab.add_host("us", "full", loss=loss)
    return Placement(us.ns, us.ip, us.public_ip, peer.ns, peer.ip, f"lab, {loss}% loss each way")


@dataclass
class RunResult:
    """One transfer: what moved, how fast, and what it cost."""

    peer: str
    direction: str                  # download: the peer sends; upload: we send
    where: str
    size: int
    ok: bool = False
    sha256_equal: bool = False
    peer_saw_utp: bool = False      # the peer listed our connection as uTP
    seconds: float = 0.0            # first piece to last
    retransmits: int = 0
    timeout_retransmits: int = 0
    fast_retransmits: int = 0
    timeouts: int = 0
    receiver_drops: int | None = None
    peer_buffers: str = "default"
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        drops = "?" if self.receiver_drops is None else str(self.receiver_drops)
        head = (f"{self.peer:12} {self.direction:8} {self.peer_buffers:8} {self.where:24} ")
        if not self.ok:
            return head + f"FAILED: {self.error}"
        return head + (f"{self.mb_per_s:8.1f} MB/s  rexmit {self.retransmits:5} "
                       f"(rto {self.timeout_retransmits}, fast {self.fast_retransmits})  "
                       f"timeouts {self.timeouts:3}  receiver drops {drops:>5}  "
                       f"uTP at peer: {'yes' if self.peer_saw_utp else 'NO'}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mb_per_s"] = round(self.mb_per_s, 2)
        return d


def _make_peer(kind: str, workdir: str, placement: Placement, buffers: int | None) -> Any:
    if kind == "libtorrent":
        return LibtorrentPeer(placement.peer_ip, netns=placement.peer_ns, socket_buffers=buffers)
    if kind == "transmission":
        if buffers:
            raise ValueError("Transmission's socket buffers are not configurable here")
        return TransmissionPeer(os.path.join(workdir, "transmission"), placement.peer_ip,
                                netns=placement.peer_ns)
    raise ValueError(f"unknown peer {kind!r}; expected one of {PEERS}")


async def _watch_utp(peer: Any, result: RunResult, placement: Placement, stop: trio.Event,
                     progress_done: trio.Event | None) -> None:
    """Poll the peer: note whether it lists a connection from us as uTP,
    and (uploads) set ``progress_done`` once it has every piece."""
    while True:
        st = await peer.status()
        for p in st["peers"]:
            if p["ip"] in (placement.our_public_ip, placement.our_ip) and p["utp"]:
                result.peer_saw_utp = True
        if st.get("errors"):
            result.extra.setdefault("peer_errors", []).extend(st["errors"])
        if progress_done is not None and st["progress"] >= 1.0:
            progress_done.set()
            return
        if stop.is_set():
            return
        await trio.sleep(0.25)


async def _file_matches(path: Path, sha256: str, wait: float = 15.0) -> bool:
    """Whether the file the peer wrote has ``sha256``.  A client reports a
    piece done once it passed its hash check, which may be before its disk
    thread wrote it: allow ``wait`` seconds for the last writes."""
    with trio.move_on_after(wait):
        while True:
            data = path.read_bytes() if path.is_file() else b""
            if hashlib.sha256(data).hexdigest() == sha256:
                return True
            await trio.sleep(0.5)
    return False


def _endpoint_counters(ep: Any) -> dict[str, Any]:
    """The non-zero engine and socket counters of an Endpoint."""
    st = ep.statistics()
    out = {k: v for k, v in st.get("engine", {}).items() if isinstance(v, int) and v}
    out.update({f"io.{k}": v for k, v in st.get("io", {}).items() if isinstance(v, int) and v})
    return out


def _endpoint(placement: Placement) -> Any:
    """Our Endpoint, its socket created inside our namespace (the thread
    goes there only for the bind)."""
    from utp._endpoint import make_udp_endpoint
    with in_netns(placement.our_ns):
        return make_udp_endpoint(placement.our_ip, 0, family=None, recv_buffer=None,
                                 send_buffer=None, socket_buffer=None, linger=10.0,
                                 udp_mtu=None, options=None)


async def _dial(ep: Any, addr: tuple[str, int], result: RunResult,
                run: Callable[[Any], Awaitable[T]]) -> tuple[Any, T]:
    """Dial ``addr`` and ``run`` the peer wire on the stream; returns both.
    A peer that turns the connection down before its handshake is dialed
    again after a pause (1, 2, 4, 8 s), as BitTorrent clients retry peers,
    until the caller's deadline: Transmission closes every connection from
    an address while an earlier one from it is still half-open (its
    SYN-ACK lost in the lab).  The count is kept in ``handshake_refused``."""
    delay = 1.0
    while True:
        stream = await ep.connect(addr)
        result.extra["stream_obj"] = stream
        try:
            return stream, await run(stream)
        except HandshakeRefused:
            result.extra["handshake_refused"] = result.extra.get("handshake_refused", 0) + 1
            await stream.aclose()
            await trio.sleep(delay)
            delay = min(2 * delay, 8.0)


async def _download(peer: Any, ep: Any, torrent: Torrent, placement: Placement,
                    result: RunResult, marks: dict[str, float]) -> Any:
    """We dial the peer and leech; returns our stream."""
    stream, got = await _dial(ep, (placement.peer_ip, peer.port), result, lambda stream: leech(
        stream, torrent.info_hash, torrent.hashes, len(torrent.data), torrent.piece_length, marks))
    marks["done"] = trio.current_time()
    result.sha256_equal = hashlib.sha256(got).hexdigest() == torrent.sha256
    result.receiver_drops = ep.statistics()["io"].get("kernel_drops")
    return stream


async def _upload(kind: str, peer: Any, ep: Any, torrent: Torrent, placement: Placement,
                  result: RunResult, marks: dict[str, float], complete: trio.Event,
                  data_dir: str) -> Any:
    """We seed: libtorrent is told to dial us; Transmission cannot dial a
    given peer, so we dial it and seed on that connection.  Returns our
    stream once the peer has every piece."""
    if kind == "libtorrent":
        listener = ep.listen()
        await peer.connect_peer(placement.our_public_ip, ep.local_address[1])
        stream = await listener.accept()
        result.extra["stream_obj"] = stream
        await seed(stream, torrent, complete, marks)
    else:
        stream, _ = await _dial(ep, (placement.peer_ip, peer.port), result,
                                lambda stream: seed(stream, torrent, complete, marks))
    with trio.move_on_after(30):   # it may have hung up as it completed
        await complete.wait()
    if not complete.is_set():
        raise WireError(f"{kind} hung up before it had every piece")
    marks["done"] = trio.current_time()
    result.receiver_drops = peer.socket_drops()
    result.sha256_equal = await _file_matches(Path(data_dir, torrent.name), torrent.sha256)
    return stream


async def run_transfer(kind: str, direction: str, torrent: Torrent, workdir: str, *,
                       placement: Placement | None = None, peer_buffers: int | None = None,
                       timeout: float = 300.0) -> RunResult:
    """Move ``torrent`` between our Endpoint and a real ``kind`` client
    ("libtorrent" or "transmission") in ``direction`` ("download": it
    seeds, we leech; "upload": we seed, it leeches) and report.  Never
    raises for a failed transfer: ``ok`` False and ``error`` say what
    went wrong."""
    import utp

    if direction not in DIRECTIONS:
        raise ValueError(f"direction is one of {DIRECTIONS}, not {direction!r}")
    placement = placement or Placement()
    result = RunResult(kind, direction, placement.label, len(torrent.data),
                       peer_buffers=f"{peer_buffers // MiB} MiB" if peer_buffers else "default")
    run_dir = tempfile.mkdtemp(prefix=f"{kind}-{direction}-", dir=workdir)
    os.chmod(run_dir, 0o755)
    data_dir = os.path.join(run_dir, "data")
    os.makedirs(data_dir)
    if direction == "download":
        Path(data_dir, torrent.name).write_bytes(torrent.data)
    marks: dict[str, float] = {}
    try:
        with trio.fail_after(timeout):
            async with _make_peer(kind, run_dir, placement, peer_buffers) as peer:
                await peer.add(torrent.metainfo(), data_dir, seed=direction == "download")
                ep = _endpoint(placement)
                async with utp.run_endpoint(ep):
                    stop, complete = trio.Event(), trio.Event()
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_watch_utp, peer, result, placement, stop,
                                               complete if direction == "upload" else None)
                            if direction == "download":
                                stream = await _download(peer, ep, torrent, placement, result, marks)
                            else:
                                stream = await _upload(kind, peer, ep, torrent, placement, result,
                                                       marks, complete, data_dir)
                            stats = stream.statistics()
                            stop.set()   # the watcher polls once more while we are connected
                    except BaseException:
                        # What our engine saw, before the Endpoint closes.
                        result.extra["endpoint"] = _endpoint_counters(ep)
                        raise
                    await stream.aclose()
        result.seconds = marks["done"] - marks.get("first_piece", marks["done"])
        _take_stats(result, stats)
        result.ok = result.sha256_equal and result.peer_saw_utp
        if not result.sha256_equal:
            result.error = "the data that arrived differs (sha256)"
        elif not result.peer_saw_utp:
            result.error = f"{kind} never listed our connection as uTP"
    except Exception as exc:   # reported in the result: a failed run is a result too
        result.error = f"{type(exc).__name__}: {exc}"
        if "stream_obj" in result.extra:
            _take_stats(result, result.extra["stream_obj"].statistics())
        log = Path(run_dir, "transmission", "transmission.log")
        if log.is_file():
            result.extra["peer_log"] = log.read_text(errors="replace")[-2000:]
    finally:
        result.extra.pop("stream_obj", None)
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _take_stats(result: RunResult, stats: dict[str, Any]) -> None:
    for key in ("retransmits", "timeout_retransmits", "fast_retransmits", "timeouts"):
        setattr(result, key, int(stats.get(key, 0)))
    result.extra["stream"] = {k: stats[k] for k in ("bytes_sent", "bytes_received", "packets_sent",
                                                     "packets_received", "duplicates_received",
                                                     "mtu", "rtt_ms", "loss_events") if k in stats}


# ---- the benchmark ----------------------------------------------------------------------


def _load_natlab(path: str) -> Any:
    where = Path(path)
    spec = importlib.util.spec_from_file_location("natlab", where / "__init__.py",
                                                  submodule_search_locations=[str(where)])
    if spec is None or spec.loader is None or not (where / "__init__.py").is_file():
        raise SystemExit(f"utp.bench interop: no NAT lab at {where} (run from a checkout, or --natlab)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["natlab"] = module
    spec.loader.exec_module(module)
    return module


async def _bench(args: argparse.Namespace) -> int:
    torrent = make_torrent(args.size * MiB, args.piece_kib * 1024)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    print(f"interop: {args.size} MiB of random data, {args.piece_kib} KiB pieces, "
          f"each peer with its default socket buffers; MB/s from first piece to last")
    print(f"{'peer':12} {'dir':8} {'buffers':8} {'where':24} result")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="utp-interop-") as workdir:
        os.chmod(workdir, 0o755)
        lab = None
        natlab = _load_natlab(args.natlab) if args.loss else None
        if natlab is not None:
            why = natlab.can_build()
            if why:
                print(f"utp.bench interop: {why}", file=sys.stderr)
                return 1
        runs: list[tuple[str, str, int | None]] = [(p, d, None) for p in peers for d in DIRECTIONS]
        if "libtorrent" in peers:
            runs.append(("libtorrent", "upload", 8 * MiB))
        results = []
        for kind, direction, buffers in runs:
            if natlab is not None:
                with natlab.Lab() as lab:
                    placement = lab_placement(lab, args.loss)
                    r = await run_transfer(kind, direction, torrent, workdir, placement=placement,
                                           peer_buffers=buffers)
            else:
                r = await run_transfer(kind, direction, torrent, workdir, peer_buffers=buffers)
            print(r.line(), flush=True)
            failed += not r.ok
            results.append(r)
        small = [r for r in results if r.peer == "libtorrent" and r.direction == "upload"]
        if len(small) == 2 and all(r.ok for r in small):
            ratio = small[0].mb_per_s / small[1].mb_per_s
            print(f"libtorrent upload, default buffers vs 8 MiB: {small[0].mb_per_s:.1f} vs "
                  f"{small[1].mb_per_s:.1f} MB/s = {ratio:.0%} (target >= 50%)")
        if args.json:
            import json
            print(json.dumps([r.as_dict() for r in results], indent=1))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utp.bench interop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="MiB to move each way (default 64)")
    parser.add_argument("--piece-kib", type=int, default=1024, help="piece size in KiB (default 1024)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated (default {','.join(PEERS)})")
    parser.add_argument("--loss", type=int, default=0,
                        help="run through the NAT lab with this percent loss each way (root)")
    parser.add_argument("--natlab", default="ci/natlab", help="where the NAT lab is (default ci/natlab)")
    parser.add_argument("--json", action="store_true", help="also print every result as JSON")
    args = parser.parse_args(list(argv) if argv is not None else None)
    for p in args.peers.split(","):
        if p.strip() and p.strip() not in PEERS:
            parser.error(f"unknown peer {p!r}; choose from {','.join(PEERS)}")
    return trio.run(_bench, args)


if __name__ == "__main__":
    sys.exit(main())
