"""Port mapping (issue 10): the NAT-PMP/PCP codec as pure functions, and
the trio client against small NAT-PMP and PCP servers on loopback (real
UDP sockets, 127.0.0.1 only; the gateway is always given, so nothing is
sent to the machine's real default gateway)."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import utp
from utp import _portmap_codec as codec
from utp._portmap import default_gateway

NONCE = bytes(range(1, 13))


# ---- codec ---------------------------------------------------------------------------------

def test_natpmp_requests_have_the_rfc_layout():
    assert codec.encode_natpmp_external_address() == b"\x00\x00"
    # version 0, opcode 1 (UDP), reserved, internal 6881, external 6882, lifetime 7200
    assert codec.encode_natpmp_map("udp", 6881, 6882, 7200) == bytes.fromhex("0001 0000 1ae1 1ae2 00001c20")
    assert codec.encode_natpmp_map("tcp", 80, 0, 0)[:2] == b"\x00\x02"
    with pytest.raises(ValueError, match="protocol"):
        codec.encode_natpmp_map("sctp", 1, 1, 1)
    with pytest.raises(ValueError, match="internal_port"):
        codec.encode_natpmp_map("udp", 70000, 1, 1)


def test_natpmp_answers_decode():
    ans = codec.decode_natpmp_untrusted(bytes.fromhex("0080 0000 00000064 c6120005"))
    assert ans == codec.NatPmpExternalAddress(0, 100, "198.18.0.5")
    ans = codec.decode_natpmp_untrusted(bytes.fromhex("0081 0000 00000065 1ae1 9c40 0000003c"))
    assert ans == codec.NatPmpMapping(0, 101, "udp", 6881, 40000, 60)
    ans = codec.decode_natpmp_untrusted(bytes.fromhex("0082 0002 00000065 0050 0050 00000000"))
    assert ans.result == 2 and ans.protocol == "tcp"
    assert "not authorized" in codec.result_message("natpmp", 2)
    with pytest.raises(codec.VersionNotSupported):
        codec.decode_natpmp_untrusted(bytes.fromhex("0080 0001 00000000"))
    with pytest.raises(codec.PortMapProtocolError, match="request"):
        codec.decode_natpmp_untrusted(bytes.fromhex("0001 0000 1ae1 1ae2 00001c20"))
    with pytest.raises(codec.PortMapProtocolError, match="too short"):
        codec.decode_natpmp_untrusted(bytes.fromhex("0081 0000 0000"))


def _pcp_answer(*, result=0, lifetime=60, epoch=7, nonce=NONCE, proto=17, internal=6881,
                external=40000, ip="198.18.0.5", op=0x81, version=2) -> bytes:
    header = struct.pack(">BBBBII12x", version, op, 0, result, lifetime, epoch)
    addr = ipaddress.ip_address(ip)
    mapped = addr.packed if addr.version == 6 else bytes(10) + b"\xff\xff" + addr.packed
    return header + nonce + struct.pack(">B3xHH", proto, internal, external) + mapped


def test_pcp_map_request_layout():
    req = codec.encode_pcp_map(nonce=NONCE, protocol="udp", internal_port=6881,
                               client_ip="10.1.0.2", lifetime=7200)
    assert len(req) == 60
    assert req[:4] == b"\x02\x01\x00\x00" and struct.unpack_from(">I", req, 4)[0] == 7200
    assert req[8:24] == bytes(10) + b"\xff\xff" + bytes([10, 1, 0, 2])
    assert req[24:36] == NONCE and req[36] == 17
    assert struct.unpack_from(">HH", req, 40) == (6881, 0)
    assert req[44:60] == bytes(10) + b"\xff\xff" + bytes(4)
    with pytest.raises(ValueError, match="nonce"):
        codec.encode_pcp_map(nonce=b"x", protocol="udp", internal_port=1, client_ip="10.0.0.1", lifetime=1)


def test_pcp_answers_decode_and_version_fallback():
    ans = codec.decode_pcp_untrusted(_pcp_answer())
    assert ans == codec.PcpMapping(0, 60, 7, NONCE, "udp", 6881, 40000, "198.18.0.5")
    assert codec.decode_pcp_untrusted(_pcp_answer(result=8)).result == 8
    assert "no resources" in codec.result_message("pcp", 8)
    # A NAT-PMP-only gateway answers a PCP request with NAT-PMP's
    # "unsupported version" (RFC 6887 section 9).
    with pytest.raises(codec.VersionNotSupported) as info:
        codec.decode_pcp_untrusted(bytes.fromhex("0081 0001 00000000"))
    assert info.value.server_version == 0
    with pytest.raises(codec.VersionNotSupported):
        codec.decode_pcp_untrusted(_pcp_answer(result=1, version=1))
    with pytest.raises(codec.PortMapProtocolError, match="request"):
        codec.decode_pcp_untrusted(_pcp_answer(op=0x01))
    with pytest.raises(codec.PortMapProtocolError, match="not MAP"):
        codec.decode_pcp_untrusted(_pcp_answer(op=0x82))
    with pytest.raises(codec.PortMapProtocolError, match="multiple of 4"):
        codec.decode_pcp_untrusted(_pcp_answer() + b"\x00")


def test_gateway_announcements_decode():
    # What miniupnpd multicast to 224.0.0.1:5350 in the lab (SIGUSR1: its
    # external address changed; and at its start).
    ann = codec.decode_announcement_untrusted(bytes.fromhex("0080 0000 00000001 c612000a"))
    assert ann == codec.Announcement("natpmp", 1, "198.18.0.10")
    ann = codec.decode_announcement_untrusted(bytes.fromhex("0280 0000 00000000 00000007") + bytes(12))
    assert ann == codec.Announcement("pcp", 7)
    for junk, why in [("0081 0000 00000065 1ae1 9c40 0000003c", "no external address"),
                      ("0080 0003 00000001 c612000a", "no external address"),   # an error result
                      ("0281 0000" + "00" * 20, "ANNOUNCE"),                   # a MAP answer
                      ("0200 0000" + "00" * 20, "ANNOUNCE"),                   # a request
                      ("0280 0000" + "00" * 18, "24 or more")]:
        with pytest.raises(codec.PortMapProtocolError, match=why):
            codec.decode_announcement_untrusted(bytes.fromhex(junk))
    assert (codec.ANNOUNCE_GROUP, codec.ANNOUNCE_PORT) == ("224.0.0.1", 5350)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1200))
def test_decoders_parse_or_raise_their_own_error(data):
    for decode in (codec.decode_natpmp_untrusted, codec.decode_pcp_untrusted,
                   codec.decode_announcement_untrusted):
        try:
            decode(data)
        except codec.PortMapProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 13), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.binary(min_size=12, max_size=12), st.sampled_from([6, 17]), st.integers(0, 65535),
       st.integers(0, 65535))
def test_pcp_decoder_reads_back_every_field(result, lifetime, epoch, nonce, proto, internal, external):
    if result == 1:
        return
    ans = codec.decode_pcp_untrusted(_pcp_answer(result=result, lifetime=lifetime, epoch=epoch,
                                                 nonce=nonce, proto=proto, internal=internal,
                                                 external=external))
    assert (ans.result, ans.lifetime, ans.epoch, ans.nonce, ans.internal_port, ans.external_port) == \
        (result, lifetime, epoch, nonce, internal, external)
    assert ans.protocol == {6: "tcp", 17: "udp"}[proto]


def test_retransmission_schedules():
    assert list(codec.natpmp_retransmit_delays()) == [0.25 * 2**i for i in range(9)]
    rng = random.Random(5)
    it = codec.pcp_retransmit_delays(rng)
    delays = [next(it) for _ in range(14)]
    assert 2.7 <= delays[0] <= 3.3
    assert all(d <= 1024 * 1.1 for d in delays)
    assert delays[8] >= 1024 * 0.9          # reached the cap
    assert all(b >= a * 1.6 for a, b in zip(delays[:7], delays[1:8]))


def test_epoch_check():
    assert not codec.epoch_went_back(1000, 10.0, 1100, 110.0)   # in step
    assert not codec.epoch_went_back(1000, 10.0, 1001, 11.0)
    assert codec.epoch_went_back(1000, 10.0, 5, 20.0)           # restarted
    assert codec.epoch_went_back(1000, 10.0, 1010, 110.0)       # fell behind: restarted


def test_default_gateway_from_the_routing_table(tmp_path):
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t0100010A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n")
    assert default_gateway(str(table)) == "10.1.0.1"
    table.write_text("Iface\tDestination\tGateway\n")
    with pytest.raises(utp.PortMappingError, match="no default route"):
        default_gateway(str(table))


# ---- the client against servers on loopback --------------------------------------------------

class _Server:
    """A NAT-PMP or PCP server on 127.0.0.1, written from the RFCs'
    layouts with struct (not with the codec under test)."""

    def __init__(self, kind: str, host: str = "127.0.0.1") -> None:
        self.kind = kind
        self.host = host
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        self.sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        self.requests: list[bytes] = []
        self.maps: list[tuple[str, int, int, bytes]] = []   # proto, internal, lifetime, nonce
        self.epoch = 1000
        self.send_wrong_nonce_first = False
        self.restart_at: int | None = None     # before this request, the epoch restarts at 0
        self.silent_from: int | None = None    # from this request on, no answers
        self.external = bytes([198, 18, 9, 9])
        self.client_ips: list[ipaddress.IPv6Address] = []      # PCP: what each MAP said
        self.suggested_ips: list[ipaddress.IPv6Address] = []

    async def bind(self) -> int:
        await self.sock.bind((self.host, 0))
        return self.sock.getsockname()[1]

    async def serve(self) -> None:
        while True:
            data, addr = await self.sock.recvfrom(1500)
            self.requests.append(data)
            self.epoch += 1
            if len(self.requests) == self.restart_at:
                self.epoch, self.external = 0, bytes([198, 18, 9, 10])
            if self.silent_from is not None and len(self.requests) >= self.silent_from:
                continue
            for answer in self.answer(data):
                await self.sock.sendto(answer, addr)

    def answer(self, data: bytes) -> list[bytes]:
        if data[0] == 2:
            if self.kind != "pcp":
                return [struct.pack(">BBHI", 0, 128 + data[1], 1, self.epoch)]
            lifetime = struct.unpack_from(">I", data, 4)[0]
            nonce = data[24:36]
            proto, internal = data[36], struct.unpack_from(">H", data, 40)[0]
            self.maps.append(("udp" if proto == 17 else "tcp", internal, lifetime, nonce))
            out = []
            if self.send_wrong_nonce_first:
                out.append(_pcp_answer(nonce=bytes(12), internal=internal, external=1, proto=proto))
            self.client_ips.append(ipaddress.IPv6Address(data[8:24]))
            self.suggested_ips.append(ipaddress.IPv6Address(data[44:60]))
            # A firewall answers with the client's own address (an IPv6 pinhole).
            ext = str(self.client_ips[-1]) if ":" in self.host else "198.18.7.7"
            out.append(_pcp_answer(lifetime=lifetime, epoch=self.epoch, nonce=nonce, proto=proto,
                                   internal=internal, external=internal + 1000, ip=ext))
            return out
        if data[1] == 0:
            return [struct.pack(">BBHI4s", 0, 128, 0, self.epoch, self.external)]
        _, op, _, internal, external, lifetime = struct.unpack(">BBHHHI", data)
        self.maps.append(("udp" if op == 1 else "tcp", internal, lifetime, b""))
        return [struct.pack(">BBHIHHI", 0, 128 + op, 0, self.epoch, internal, internal + 2000, lifetime)]


async def test_natpmp_gateway_maps_renews_and_deletes_after_pcp_fallback():
    server = _Server("natpmp")
    port = await server.bind()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        async with utp.open_endpoint("127.0.0.1", 0) as ep:
            local = ep.local_address[1]
            async with utp.port_mapping(ep, tcp_port=7000, gateway="127.0.0.1", server_port=port,
                                        lifetime=2) as mapping:
                assert mapping.protocol == "natpmp"
                assert mapping.external_address == ("198.18.9.9", local + 2000)
                assert mapping.tcp_external_address == ("198.18.9.9", 9000)
                assert ep.external_address == ("198.18.9.9", local + 2000)
                assert any("pcp" in f and "NAT-PMP" in f for f in mapping.failures)
                await trio.sleep(2.5)
                assert mapping.renewals >= 1
            assert ep.external_address is None
        nursery.cancel_scope.cancel()
    udp = [m for m in server.maps if m[0] == "udp"]
    assert udp[-1] == ("udp", local, 0, b"")             # deleted on exit
    assert [m for m in server.maps if m[0] == "tcp"][-1][2] == 0
    assert len([m for m in udp if m[2] == 2]) >= 2       # mapped, then renewed
    assert server.requests[0][0] == 2                    # PCP was tried first


async def test_pcp_gateway_checks_nonces_and_deletes_with_the_same_nonce():
    server = _Server("pcp")
    server.send_wrong_nonce_first = True
    port = await server.bind()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        async with utp.open_endpoint("127.0.0.1", 0) as ep:
            local = ep.local_address[1]
            async with utp.port_mapping(ep, ("pcp",), gateway="127.0.0.1", server_port=port,
                                        lifetime=2) as mapping:
                # The answer with a foreign nonce (external port 1) was dropped.
                assert mapping.protocol == "pcp"
                assert mapping.external_address == ("198.18.7.7", local + 1000)
                await trio.sleep(1.5)
                assert mapping.renewals >= 1
        nursery.cancel_scope.cancel()
    nonces = {m[3] for m in server.maps}
    assert len(nonces) == 1 and server.maps[-1][2] == 0 and server.maps[0][2] == 2


async def test_pcp_over_ipv6_asks_for_a_pinhole_and_natpmp_says_it_cannot():
    server = _Server("pcp", "::1")
    port = await server.bind()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        async with utp.open_endpoint("::1", 0) as ep:
            local = ep.local_address[1]
            async with utp.port_mapping(ep, ("natpmp", "pcp"), gateway="::1", server_port=port,
                                        lifetime=2) as mapping:
                assert mapping.protocol == "pcp"
                assert mapping.external_address == ("::1", local + 1000)
                assert ep.external_address[:2] == ("::1", local + 1000)
                assert any("NAT-PMP is IPv4 only" in f for f in mapping.failures), mapping.failures
                await trio.sleep(1.5)
                assert mapping.renewals >= 1
        nursery.cancel_scope.cancel()
    # Our own IPv6 source address, no suggested external address (all zeros).
    assert set(server.client_ips) == {ipaddress.IPv6Address("::1")}
    assert set(server.suggested_ips) == {ipaddress.IPv6Address("::")}
    assert server.maps[-1][2] == 0          # deleted on exit


async def test_a_restarted_gateway_is_noticed_by_its_epoch():
    server = _Server("natpmp")
    # Requests: PCP (answered "unsupported version"), external address, UDP
    # map; the first renewal (4th) sees the epoch back at 0.
    server.restart_at = 4
    port = await server.bind()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        async with utp.open_endpoint("127.0.0.1", 0) as ep:
            async with utp.port_mapping(ep, gateway="127.0.0.1", server_port=port, lifetime=2) as mapping:
                assert mapping.external_address[0] == "198.18.9.9"
                await trio.sleep(1.5)
                assert mapping.renewals == 1
                assert any("restarted" in f for f in mapping.failures), mapping.failures
                # It asked for the external address again: the new one.
                assert mapping.external_address[0] == "198.18.9.10"
                assert ep.external_address == mapping.external_address
        nursery.cancel_scope.cancel()


async def test_a_lease_that_could_not_be_renewed_stops_being_the_external_address():
    server = _Server("natpmp")
    server.silent_from = 3          # external address, map, then silence
    port = await server.bind()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        async with utp.open_endpoint("127.0.0.1", 0) as ep:
            async with utp.port_mapping(ep, ("natpmp",), gateway="127.0.0.1", server_port=port,
                                        lifetime=2, timeout=0.5) as mapping:
                assert ep.external_address == mapping.external_address
                await trio.sleep(3.5)
                assert mapping.renewals == 0
                assert any("renewal failed" in f for f in mapping.failures)
                assert ep.external_address is None
        nursery.cancel_scope.cancel()


async def test_no_gateway_service_is_a_clear_error():
    closed = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        with pytest.raises(utp.PortMappingError) as info:
            async with utp.port_mapping(ep, ("pcp", "natpmp"), gateway="127.0.0.1",
                                        server_port=port, timeout=1.0):
                pass
        assert "pcp:" in str(info.value) and "natpmp:" in str(info.value)
        assert ep.external_address is None
    with pytest.raises(ValueError, match="unknown port mapping protocol"):
        async with utp.port_mapping(ep, ("stun",)):
            pass
