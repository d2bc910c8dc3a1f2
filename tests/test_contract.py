"""Issue 15's contract: every datagram core conforms to the one Protocol
(and works when driven through it alone), the error family and event bases,
the Enums, the Endpoint's named seams (checked over the installed sources
with the AST), and the helpers shared in ``_utpkit``."""

from __future__ import annotations

import ast
import importlib.util
import random
import struct
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, strategies as st

import _utpkit
import dht
import tracker
import utp
from _utpkit.addr import addr_key, normalize_ip, parse_hostport, split_hostport, unmap_host
from _utpkit.bencode import BencodeError, decode_untrusted, encode
from _utpkit.contract import DatagramCore, Event, StreamCore
from _utpkit.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from _utpkit.excgroup import leaves, single, sole_leaf, unwrapped

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

PACKAGES = ("_utpkit", "utp", "dht", "tracker", "ucat", "bt")


# ---- the datagram contract --------------------------------------------------------------


def _pump(cores: dict[tuple, DatagramCore], now: float) -> int:
    """Deliver every datagram between ``cores`` (keyed by address) using
    nothing but the DatagramCore contract; returns how many moved."""
    moved = 0
    while True:
        batch = [(src, data, dst) for src, core in cores.items()
                 for data, dst in core.datagrams_to_send(now)]
        if not batch:
            return moved
        for src, data, dst in batch:
            if dst in cores:
                cores[dst].receive_datagram(data, src, now)
                moved += 1


def _events(core: DatagramCore) -> list[Event]:
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


def test_the_dht_core_conforms_and_runs_through_the_protocol_alone():
    a_addr, b_addr = ("10.0.0.1", 6881), ("10.0.0.2", 6881)
    a = dht.DHTCore(rng=random.Random(1), now=0.0)
    b = dht.DHTCore(rng=random.Random(2), now=0.0)
    assert isinstance(a, DatagramCore) and not isinstance(a, StreamCore)
    a.ping(b_addr, 0.0)
    assert _pump({a_addr: a, b_addr: b}, 0.1) >= 2          # the ping and its answer
    (done,) = [ev for ev in _events(a) if isinstance(ev, dht.PingDone)]
    assert isinstance(done, dht.Event) and isinstance(done, Event)
    assert done.node_id == b.id
    # A ping nobody answers fails on the timer, driven through the contract.
    a.ping(("10.0.0.9", 6881), 1.0)
    assert [addr for _, addr in a.datagrams_to_send(1.0)] == [("10.0.0.9", 6881)]
    now = 1.0
    for _ in range(10):
        now = max(now, a.get_timer())
        a.handle_timer(now)
        a.datagrams_to_send(now)
        failed = [ev for ev in _events(a) if isinstance(ev, dht.PingDone)]
        if failed:
            break
    assert failed and failed[0].node_id is None


def test_the_tracker_core_conforms_and_runs_through_the_protocol_alone():
    where = ("198.18.0.1", 6969)
    core = tracker.UDPTrackerProtocol(where, rng=random.Random(3), retry_base=1.0, max_retries=1)
    assert isinstance(core, DatagramCore) and not isinstance(core, StreamCore)
    assert core.get_timer() is None                          # nothing pending
    rid = core.announce(b"h" * 20, b"p" * 20, 6881, now=0.0)
    [(connect, dst)] = core.datagrams_to_send(0.0)
    assert dst == where and len(connect) == 16
    # A datagram from another address is dropped, however well formed.
    tid = struct.unpack_from(">I", connect, 12)[0]
    reply = struct.pack(">II", 0, tid) + b"\x11" * 8
    core.receive_datagram(reply, ("198.18.0.2", 6969), 0.1)
    assert core.datagrams_to_send(0.1) == [] and core.counters["dropped"] == 1
    # The same reply from the tracker's IPv4-mapped spelling is the tracker.
    core.receive_datagram(reply, ("::ffff:198.18.0.1", 6969, 0, 0), 0.1)
    [(announce, dst)] = core.datagrams_to_send(0.1)
    assert dst == where and len(announce) == 98
    # No answer: the timer resends once, then the request times out.
    t = core.get_timer()
    assert t == pytest.approx(1.1)
    core.handle_timer(t)
    assert len(core.datagrams_to_send(t)) == 1
    core.handle_timer(core.get_timer())
    [ev] = _events(core)
    assert isinstance(ev, tracker.RequestTimedOut) and isinstance(ev, tracker.Event)
    assert isinstance(ev, Event) and ev.request_id == rid


def test_cores_require_an_rng():
    with pytest.raises(TypeError):
        tracker.UDPTrackerProtocol(("198.18.0.1", 6969))     # type: ignore[call-arg]
    with pytest.raises(TypeError):
        tracker.UDPTrackerProtocol(("198.18.0.1", 6969), rng=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dht.DHTCore(now=0.0)                                  # type: ignore[call-arg]


def test_something_else_is_no_core():
    class HalfCore:
        def receive_datagram(self, data, addr, now): ...

    assert not isinstance(HalfCore(), DatagramCore)


# ---- errors, events, enums, names ---------------------------------------------------------


def test_one_error_family():
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(LocalProtocolError, ValueError)
    assert issubclass(RemoteProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ValueError)
    assert issubclass(BencodeError, RemoteProtocolError)
    assert dht.BencodeError is BencodeError
    assert issubclass(dht.KRPCError, RemoteProtocolError)
    assert tracker.LocalProtocolError is LocalProtocolError
    core = tracker.UDPTrackerProtocol(("198.18.0.1", 6969), rng=random.Random(1))
    with pytest.raises(ProtocolError, match="20 bytes"):
        core.announce(b"short", b"p" * 20, 6881, now=0.0)
    with pytest.raises(LocalProtocolError):
        encode({"a": 1, b"a": 2})
    with pytest.raises(RemoteProtocolError):
        decode_untrusted(b"i01e")


def test_network_errors_share_one_base():
    from _utpkit.errors import NetworkError
    import utp
    for cls in (utp.UTPError, utp.RendezvousError, tracker.TrackerError):
        assert issubclass(cls, NetworkError) and issubclass(cls, OSError)
    assert not issubclass(NetworkError, ProtocolError)
    assert utp.NetworkError is NetworkError
    err = utp.UTPError(utp.UTP_ECONNRESET)
    with pytest.raises(NetworkError, match="ECONNRESET"):
        raise err


def test_distinct_names_and_old_names_kept():
    assert dht.DHTAnnounceResult is not tracker.TrackerAnnounceResult
    assert dht.AnnounceResult is dht.DHTAnnounceResult
    assert tracker.AnnounceResult is tracker.TrackerAnnounceResult
    assert issubclass(tracker.TrackerAnnounceResult, tracker.Event)
    for name in ("PeersFound", "LookupDone", "PingDone", "ExternalAddressChanged"):
        assert issubclass(getattr(dht, name), dht.Event)


def test_state_and_kind_enums_compare_as_their_strings():
    assert dht.LookupKind.ANNOUNCE == "announce" and f"{dht.LookupKind.ANNOUNCE}" == "announce"
    assert tracker.RequestPhase.SENT == "sent"
    assert tracker.EVENT_STARTED is tracker.AnnounceEvent.STARTED and tracker.EVENT_STARTED == 2
    assert utp.EventKind.ACCEPT == "accept" and str(utp.EventKind.DESTROYED) == "destroyed"


def test_engine_constants_grouped_and_c_names_kept():
    assert not [n for n in utp.__all__ if n.startswith(("UTP_", "UTPKIT_"))]
    assert utp.Option.SNDBUF == utp.UTP_SNDBUF == utp.constants.UTP_SNDBUF
    assert utp.ErrorCode.TIMEDOUT == utp.UTP_ETIMEDOUT
    assert utp.SocketState.DESTROYED == utp.UTPKIT_SOCK_DESTROYED
    assert utp.DatagramClass.DHT == utp.classify(b"d1:ad1:id20:" + b"x" * 20 + b"e1:q4:ping1:t2:aa1:y1:qe")
    from utp import UTP_RCVBUF  # the libutp spelling still imports
    assert UTP_RCVBUF == utp.Option.RCVBUF
    with pytest.raises(AttributeError):
        utp.UTP_NO_SUCH_THING  # noqa: B018


async def test_binding_events_are_event_kinds():
    ctx = utp.Context(virtual_time=True)
    try:
        sock = ctx.create_socket()
        sock.connect(("127.0.0.1", 9))
        sock.abort()
        kinds = [kind for kind, _, _ in ctx.take_events()]
        assert kinds and all(isinstance(k, utp.EventKind) for k in kinds)
    finally:
        ctx.close()


# ---- the Endpoint's seams, over the installed sources --------------------------------------


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin).parent


def _sources():
    for pkg in PACKAGES:
        for path in sorted(_package_dir(pkg).rglob("*.py")):
            yield pkg, path


def _endpoint_members() -> set[str]:
    """The underscore members of Endpoint: its methods and the attributes
    its methods set on self."""
    tree = ast.parse((_package_dir("utp") / "_endpoint.py").read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Endpoint":
            for item in ast.walk(node):
                name = None
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = item.name
                elif (isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name)
                      and item.value.id == "self"):
                    name = item.attr
                if name and name.startswith("_") and not name.startswith("__"):
                    found.add(name)
    return found


_ENDPOINT_NAMES = {"ep", "endpoint", "_ep", "_endpoint"}


def _is_endpoint_expr(node: ast.expr) -> bool:
    """``ep``, ``endpoint``, ``self._ep``, ``x.endpoint``, ...: how every
    module spells an Endpoint."""
    if isinstance(node, ast.Name):
        return node.id in _ENDPOINT_NAMES
    return isinstance(node, ast.Attribute) and node.attr in _ENDPOINT_NAMES


def test_no_module_outside_endpoint_uses_an_underscore_member_of_endpoint():
    members = _endpoint_members()
    assert {"_ctx", "_queues", "_listener", "_after_engine"} <= members  # the check sees them
    offences = []
    checked = 0
    for pkg, path in _sources():
        if pkg == "utp" and path.name == "_endpoint.py":
            continue
        checked += 1
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and _is_endpoint_expr(node.value)):
                offences.append(f"{pkg}/{path.name}:{node.lineno}: {ast.unparse(node)}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in members):
                offences.append(f"{pkg}/{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert checked > 20
    assert not offences, "Endpoint internals used outside utp/_endpoint.py:\n" + "\n".join(offences)


def test_no_package_imports_another_packages_private_module():
    offences = []
    for pkg, path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if (parts[0] in PACKAGES and parts[0] not in (pkg, "_utpkit")
                        and any(p.startswith("_") for p in parts[1:])):
                    offences.append(f"{pkg}/{path.name}:{node.lineno}: {name}")
    assert not offences, "private modules imported across packages:\n" + "\n".join(offences)


async def test_named_seams_release_a_queue_and_pause_accepting():
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        q = ep.datagram_queue("other")
        with pytest.raises(RuntimeError):
            ep.datagram_queue("other")
        ep.release_datagram_queue(q)
        with pytest.raises(trio.ClosedResourceError):
            q.receive_nowait()
        ep.release_datagram_queue(ep.datagram_queue("other"))    # registers again
        assert ep.listener is None
        listener = ep.listen()
        assert ep.listener is listener
        listener.pause()
        async with utp.open_endpoint("127.0.0.1", 0) as other:
            with pytest.raises(ConnectionRefusedError):
                await other.connect(ep.local_address, timeout=2)
        await listener.aclose()
        assert ep.listener is None


# ---- the shared helpers ----------------------------------------------------------------------


def test_single_and_leaves():
    inner = ValueError("x")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [inner])])
    assert single(nested) is inner
    assert single(inner) is inner
    two = ExceptionGroup("two", [ValueError("a"), ExceptionGroup("g", [KeyError("b")])])
    assert single(two) is two
    assert [type(e) for e in leaves(two)] == [ValueError, KeyError]
    assert sole_leaf(two) is two
    assert isinstance(sole_leaf(two, (KeyError,)), ValueError)
    assert sole_leaf(inner) is inner


async def test_unwrapped_lets_a_single_exception_out_as_itself():
    with pytest.raises(KeyError):
        async with unwrapped():
            raise ExceptionGroup("g", [KeyError("k")])
    with pytest.raises(ExceptionGroup):
        async with unwrapped():
            raise ExceptionGroup("g", [KeyError("k"), ValueError("v")])
    with pytest.raises(KeyError):
        async with unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyError("from the body")


def test_addresses_normalised_once():
    assert normalize_ip("::ffff:10.0.0.1") == normalize_ip("10.0.0.1")
    assert normalize_ip("fe80::1%eth0").version == 6
    assert addr_key(("::ffff:10.0.0.1", 80, 0, 0)) == addr_key(("10.0.0.1", 80))
    assert unmap_host("::ffff:10.0.0.1") == "10.0.0.1" and unmap_host("::1") == "::1"
    with pytest.raises(ValueError):
        normalize_ip("example.org")


@pytest.mark.parametrize("text, bare, expected", [
    ("10.0.0.1:6881", False, ("10.0.0.1", 6881)),
    ("[::1]:6881", False, ("::1", 6881)),
    ("::1:6881", True, ("::1", 6881)),
])
def test_parse_hostport(text, bare, expected):
    assert parse_hostport(text, bare_ipv6=bare) == expected


@pytest.mark.parametrize("text", ["10.0.0.1", ":6881", "::1:6881", "[::1]6881",
                                  "10.0.0.1:65536", "10.0.0.1:x", "name:80"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_split_hostport_leaves_names_alone():
    assert split_hostport("tracker.example:80") == ("tracker.example", "80")


def _plain(v):
    """What decoding gives back for a value the encoder also accepts in
    other spellings (tuples, bytearrays, str)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {(k.encode() if isinstance(k, str) else bytes(k)): _plain(x) for k, x in v.items()}
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, bytearray):
        return bytes(v)
    return v


# Every spelling the encoder takes: the tracker and the peer wire build
# messages from str keys, tuples and bytearrays, not just the DHT's bytes.
_spellings = st.recursive(
    st.integers(-2**70, 2**70) | st.binary(max_size=30) | st.text(max_size=10)
    | st.binary(max_size=10).map(bytearray),
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                   | st.dictionaries(st.binary(max_size=6), inner, max_size=4)),
    max_leaves=16)


@given(_spellings)
def test_bencode_round_trip(v):
    data = encode(v)
    assert decode_untrusted(data) == _plain(v)
    assert encode(decode_untrusted(data)) == data       # canonical both ways


@given(st.dictionaries(st.text(max_size=6), st.integers(), max_size=6))
def test_bencode_str_keys_encode_as_utf8(d):
    assert decode_untrusted(encode(d)) == {k.encode(): v for k, v in d.items()}


def test_bencode_keeps_the_dhts_limits():
    with pytest.raises(BencodeError, match="exceeds"):
        decode_untrusted(b"0:" * 10, max_size=8)
    with pytest.raises(BencodeError, match="deeper"):
        decode_untrusted(b"l" * 17 + b"e" * 17)


def test_utpkit_is_installed_and_light():
    assert _utpkit.DatagramCore is DatagramCore
    # Shared by the CLI before it decides to start trio: no trio, no engine.
    tree = ast.parse((_package_dir("_utpkit") / "excgroup.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"trio", "utp", "utp._utp"} & imported
