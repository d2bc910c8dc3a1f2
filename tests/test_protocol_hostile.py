"""Malformed, truncated and hostile datagrams thrown at a node that has a live
connection (issue #2 §5).

Every crafted datagram is handed straight to the victim's engine
(``process_udp``) at a chosen virtual time, so the counter it must move can be
checked right there; the live transfer must still deliver every byte with the
right sha256.

uTP has no authentication: anybody who can send from the peer's address with
the connection's ids and an in-window sequence number can inject data, a FIN
or a RESET.  So the crafted packets here are the ones a correct engine must
*reject* (wrong ids, out of window, malformed, from the wrong address), and
the property tests check robustness (no crash, every datagram accounted for,
memory released) rather than delivery where an on-path forger is modelled.
"""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utp
from utp.testing import Network, transfer

MS = 1000
S = 1_000_000
KiB = 1024
MiB = 1 << 20

ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN = range(5)

COUNTERS = ("not_utp", "drop_malformed", "drop_unknown", "drop_invalid", "resets_sent",
            "resets_limited", "syn_refused", "syn_duplicate")


def pkt(ptype, conn_id, seq_nr, ack_nr, *, wnd=1 << 20, ts=0, ts_diff=0, version=1,
        ext=(), payload=b"", first_ext=None):
    """A BEP 29 datagram.  `ext` is a list of (type, body) extensions, chained
    in order; `first_ext` overrides the header's extension byte."""
    chain = b""
    for i, (_etype, body) in enumerate(ext):
        nxt = ext[i + 1][0] if i + 1 < len(ext) else 0
        chain += bytes([nxt, len(body)]) + body
    e = first_ext if first_ext is not None else (ext[0][0] if ext else 0)
    head = struct.pack(">BBHIIIHH", ((ptype & 15) << 4) | (version & 15), e & 255,
                       conn_id & 0xFFFF, ts & 0xFFFFFFFF, ts_diff & 0xFFFFFFFF,
                       wnd & 0xFFFFFFFF, seq_nr & 0xFFFF, ack_nr & 0xFFFF)
    return head + chain + payload


def fields(data):
    """(type, conn_id, seq_nr, ack_nr) of a datagram of at least 20 bytes."""
    _, _, conn_id, _, _, _, seq, ack = struct.unpack(">BBHIIIHH", data[:20])
    return data[0] >> 4, conn_id, seq, ack


class Sniffer:
    """Watches both links of a connection: the ids each side sends with and
    the newest sequence and acknowledgement numbers, plus the SYN."""

    def __init__(self, net, a, b):
        self.last = {}      # side -> (type, conn_id, seq, ack) of its newest packet
        self.syn = None
        self.sent = {"a": 0, "b": 0}
        net.get_link(a, b).filter = self._watch("a")
        net.get_link(b, a).filter = self._watch("b")

    def _watch(self, side):
        def filt(now, data, flags):
            self.sent[side] += 1
            if len(data) >= 20 and data[0] & 15 == 1:
                f = fields(data)
                if f[0] == ST_SYN and self.syn is None:
                    self.syn = data
                elif f[0] != ST_SYN:
                    self.last[side] = f
            return None
        return filt

    @property
    def ready(self):
        return "a" in self.last and "b" in self.last

    # Ids: a's packets to b carry b's receive id and vice versa.
    @property
    def id_to_b(self):
        return self.last["a"][1]

    @property
    def id_to_a(self):
        return self.last["b"][1]


class Harness:
    """A transfer a -> b with a third node m (an off-path attacker) and a way
    to hand crafted datagrams to either engine and check what they moved."""

    def __init__(self, seed=1, nbytes=2 * MiB, **link):
        self.net = Network(seed=seed)
        net = self.net
        self.a = net.add_node("a")
        self.b = net.add_node("b")
        self.m = net.add_node("m")
        net.link(self.a, self.b, **(link or dict(delay_us=10 * MS, bandwidth_bps=20e6,
                                                queue_bytes=200_000)))
        self.sniff = Sniffer(net, self.a, self.b)
        self.nbytes = nbytes
        self.checks = []
        self.injected = {"a": 0, "b": 0}

    def inject(self, victim, data, src, expect=None, taken=True):
        """Give `data` to `victim`'s engine as if from `src` (a Node or an
        address).  `expect`: the counter that must grow by exactly one (the
        others in COUNTERS must not move, resets aside), or None for a
        datagram that must be taken without any drop counter moving."""
        src_addr = src.addr if hasattr(src, "addr") else src
        before = victim.ctx.stats()
        r = victim.call(victim.ctx.process_udp, data, src_addr)
        after = victim.ctx.stats()
        self.injected[victim.name] += 1
        delta = {k: after[k] - before[k] for k in COUNTERS}
        self.checks.append((data[:24], expect, r, delta))
        assert r is taken, (data[:24], r)
        moved = {k for k, v in delta.items() if v and k not in ("resets_sent", "resets_limited")}
        if expect is None:
            assert moved == set(), (data[:24], delta)
        else:
            assert moved == {expect} and delta[expect] == 1, (data[:24], expect, delta)
        return delta

    def run(self, attacks, at_us=(200 * MS, 400 * MS, 700 * MS), keep_open=False):
        """Run the transfer; call attacks(h) at each time in `at_us` (from the
        start) once both sides have sent packets.  The engines are closed
        afterwards unless `keep_open`."""
        net = self.net
        t0 = net.now
        ran = []

        def go():
            if self.sniff.ready:
                ran.append(net.now)
                attacks(self)
        for t in at_us:
            net.call_at(t0 + t, go)
        try:
            r = transfer(net, self.a, self.b, self.nbytes)
            assert r.ok and r.clean_close, r
            assert r.conn_b.received_sha256 == r.conn_a.sent_sha256
            assert len(ran) == len(at_us), "attacks ran after the transfer ended"
            self.result = r
            return r
        finally:
            self.stats = {n.name: n.ctx.stats() for n in (self.a, self.b, self.m)
                          if not n.ctx.closed}
            if not keep_open:
                net.close()


# --- crafted packets, one case each -------------------------------------------

def test_truncated_headers_are_not_utp():
    h = Harness()

    def attack(h):
        ty, cid, seq, ack = h.sniff.last["a"]
        full = pkt(ST_STATE, cid, seq, ack)
        for n in range(20):  # shorter than a header: not uTP at all
            h.inject(h.b, full[:n], h.a, "not_utp", taken=False)
    h.run(attack)
    assert h.stats["b"]["not_utp"] == 60


@pytest.mark.parametrize("byte0", [
    0x00, 0x02, 0x0F,            # DATA with versions 0, 2, 15
    0x51, 0x61, 0xF1,            # types 5, 6, 15 with version 1
    0x40 | 0x02,                 # a SYN of version 2
])
def test_bad_version_or_type_is_not_utp(byte0):
    h = Harness()

    def attack(h):
        ty, cid, seq, ack = h.sniff.last["a"]
        data = bytearray(pkt(ST_STATE, cid, seq, ack))
        data[0] = byte0
        h.inject(h.b, bytes(data), h.a, "not_utp", taken=False)
        assert utp.classify(bytes(data)) != utp.UTPKIT_CLASS_UTP
    h.run(attack)


def test_bogus_extension_chains_are_malformed():
    h = Harness()

    def attack(h):
        _, cid, seq, ack = h.sniff.last["a"]
        base = pkt(ST_STATE, cid, seq, ack)
        malformed = [
            base[:1] + b"\x01" + base[2:],                      # SACK announced, no room
            base[:1] + b"\x02" + base[2:] + b"\x00",            # one byte of a link
            base[:1] + b"\x02" + base[2:] + b"\x00\x05ab",      # length past the end
            base[:1] + b"\x01" + base[2:] + b"\x00\xff" + b"\xff" * 100,
            # a SACK of 3 bytes whose link claims one more than is there
            base[:1] + b"\x01" + base[2:] + b"\x00\x04" + b"\xff" * 3,
            # the next link's header cut off after a good odd-length SACK
            base[:1] + b"\x01" + base[2:] + b"\x02\x03" + b"\xff" * 3 + b"\x00",
            # a chain that loops "forever": each link names another
            pkt(ST_STATE, cid, seq, ack, ext=[(7, b"")] * 40)[:-1],
        ]
        for data in malformed:
            h.inject(h.b, data, h.a, "drop_malformed")
        # The same damage on the sender's side, with its ids.
        _, cid_a, seq_b, ack_b = h.sniff.last["b"]
        h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, ack_b, ext=[(1, b"\xff" * 5)])[:-1], h.b,
                 "drop_malformed")
        h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, ack_b, first_ext=1), h.b, "drop_malformed")
    h.run(attack)
    assert h.stats["b"]["drop_malformed"] == 21
    assert h.stats["a"]["drop_malformed"] == 6


def test_sack_of_any_length_is_taken():
    """Real stacks send SACK bitmaps that are not multiples of 32 bits
    (libtorrent: (span + 7) / 8 bytes), empty ones, and libutp's
    extension-bits link (type 2, 8 bytes): all are parsed, none is dropped,
    and the cumulative ack_nr in them is honoured."""
    h = Harness()

    def attack(h):
        _, cid, seq, ack = h.sniff.last["a"]
        for n in (0, 1, 2, 3, 5, 6, 7, 11, 16, 21, 128, 255):
            h.inject(h.b, pkt(ST_STATE, cid, seq, ack, ext=[(1, b"\x00" * n)]), h.a)
        h.inject(h.b, pkt(ST_STATE, cid, seq, ack, ext=[(2, b"\x00" * 8), (1, b"\x00" * 3)]), h.a)
        h.inject(h.b, pkt(ST_STATE, cid, seq, ack, ext=[(1, b"\x00" * 6), (2, b"\x00" * 8)]), h.a)
        h.inject(h.b, pkt(ST_STATE, cid, seq, ack, ext=[(9, b"x"), (1, b"\x01")]), h.a)
        # On the sender: an odd-length bitmap about packets it sent.
        _, cid_a, seq_b, ack_b = h.sniff.last["b"]
        h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, ack_b, ext=[(1, b"\x00" * 5)]), h.b)
        h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, ack_b, ext=[(2, b"\x00" * 8)]), h.b)
    h.run(attack)
    assert h.stats["b"]["drop_malformed"] == 0
    assert h.stats["a"]["drop_malformed"] == 0


def test_unknown_extensions_are_skipped():
    """Unknown extension types are skipped (BEP 29), however many: a long
    chain of them in front of a well-formed ACK is taken like the ACK."""
    h = Harness()

    def attack(h):
        _, cid, seq, ack = h.sniff.last["a"]
        h.inject(h.b, pkt(ST_STATE, cid, seq, ack, ext=[(7, b"")] * 600), h.a)
        h.inject(h.b, pkt(ST_STATE, cid, seq, ack, ext=[(200, b"z" * 255)] * 4), h.a)
    h.run(attack)


def test_ack_far_outside_the_window_and_wrapped_acks():
    h = Harness()

    def attack(h):
        _, cid_a, seq_b, ack_b = h.sniff.last["b"]
        _, _, seq_a, _ = h.sniff.last["a"]
        # Acknowledges data the sender never sent: dropped and counted.
        for far in (2000, 10_000, 0x7FFF - 1100):
            h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, seq_a + far), h.b, "drop_invalid")
        # An ACK from "long ago" (half the sequence space back, wrapped):
        # indistinguishable from a late, reordered ACK, so it is ignored
        # without being counted.
        for back in (3000, 0x8000, 0x8001):
            h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, ack_b - back), h.b)
        # The receiver has nothing outstanding: any ack beyond its seq is bogus.
        _, cid_b, seq_a, _ = h.sniff.last["a"]
        h.inject(h.b, pkt(ST_STATE, cid_b, seq_a, seq_b + 5), h.a, "drop_invalid")
    h.run(attack)


def test_bogus_sack_bitmaps():
    h = Harness()

    def attack(h):
        _, cid_a, seq_b, ack_b = h.sniff.last["b"]
        _, cid_b, seq_a, ack_a = h.sniff.last["a"]
        ones = b"\xff" * 128
        # SACK riding on an ACK of unsent data: the whole packet is dropped
        # before its bitmap is looked at.
        h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, seq_a + 5000, ext=[(1, ones)]), h.b,
                 "drop_invalid")
        # A wrapped (old) ACK with a full bitmap: ignored.
        h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, ack_b - 0x5000, ext=[(1, ones)]), h.b)
        # The receiver has sent nothing: every bit names a packet never sent.
        h.inject(h.b, pkt(ST_STATE, cid_b, seq_a, seq_b - 1, ext=[(1, b"\xff" * 252)]), h.a)
        # The longest bitmap a datagram can carry, several of them chained.
        h.inject(h.b, pkt(ST_STATE, cid_b, seq_a, seq_b - 1,
                          ext=[(1, b"\xff" * 252), (1, b"\x00" * 252), (1, b"\xaa" * 4)]), h.a)
    h.run(attack)
    assert h.stats["b"]["sockets_live"] == 0


def test_huge_and_zero_windows_are_survived():
    """A forged ACK may advertise any window: a huge one lets the sender
    overrun the receive buffer until the next real ACK (the receiver drops
    what does not fit, counted), a zero one pauses it until the next real ACK.
    Neither breaks the transfer."""
    h = Harness()

    def attack(h):
        _, cid_a, seq_b, ack_b = h.sniff.last["b"]
        for wnd in (0xFFFFFFFF, 0, 0x80000000, 1):
            h.inject(h.a, pkt(ST_STATE, cid_a, seq_b, ack_b - 1, wnd=wnd), h.b)
        _, cid_b, seq_a, ack_a = h.sniff.last["a"]
        h.inject(h.b, pkt(ST_STATE, cid_b, seq_a, seq_b - 1, wnd=0xFFFFFFFF), h.a)
    h.run(attack)


def test_data_outside_the_receive_window():
    h = Harness()

    def attack(h):
        _, cid_b, seq_a, _ = h.sniff.last["a"]
        _, _, seq_b, ack_b = h.sniff.last["b"]  # ack_b: what b has in order
        payload = b"\xee" * 1000
        # Further ahead than the reorder buffer reaches.
        for ahead in (1100, 5000, 0x7FFF):
            h.inject(h.b, pkt(ST_DATA, cid_b, ack_b + ahead, seq_b - 1, payload=payload),
                     h.a, "drop_invalid")
            h.inject(h.b, pkt(ST_FIN, cid_b, ack_b + ahead, seq_b - 1), h.a, "drop_invalid")
        # Behind what was delivered: a duplicate, acknowledged and not delivered.
        for back in (0, 50, 0x7000):
            h.inject(h.b, pkt(ST_DATA, cid_b, ack_b - back, seq_b - 1, payload=payload), h.a)
    h.run(attack)
    assert h.result.b_stats["nduprecv"] >= 9


def test_resets_and_data_with_wrong_ids_or_from_elsewhere():
    h = Harness()

    def attack(h):
        _, cid_a, seq_b, ack_b = h.sniff.last["b"]
        _, cid_b, seq_a, ack_a = h.sniff.last["a"]
        # RESETs with ids that are not the connection's: never answered.
        for bad in (cid_b + 2, cid_b - 2, cid_b ^ 0x8000):
            h.inject(h.b, pkt(ST_RESET, bad, 1, 1), h.a, "drop_unknown")
            assert h.checks[-1][3]["resets_sent"] == 0
        # The right ids from another address (an off-path attacker).
        h.inject(h.b, pkt(ST_RESET, cid_b, seq_a, ack_a), h.m, "drop_unknown")
        h.inject(h.a, pkt(ST_RESET, cid_a, seq_b, ack_b), h.m, "drop_unknown")
        d = h.inject(h.b, pkt(ST_DATA, cid_b, ack_b + 1, seq_b, payload=b"x" * 500), h.m,
                     "drop_unknown")
        assert d["resets_sent"] + d["resets_limited"] == 1
        # Same address, other port.
        h.inject(h.b, pkt(ST_RESET, cid_b, seq_a, ack_a), (h.a.addr[0], h.a.addr[1] + 1),
                 "drop_unknown")
        # A SYN reusing the live connection's id with another sequence number.
        h.inject(h.b, pkt(ST_SYN, cid_b - 1, seq_a + 77, 0), h.a, "drop_invalid")
        # The original SYN replayed: answered again, nothing created.
        h.inject(h.b, h.sniff.syn, h.a, "syn_duplicate")
        assert h.b.ctx.stats()["sockets_live"] == 1
    h.run(attack)
    assert len(h.b.accepted) == 1


def test_flood_to_unknown_ids_is_rate_limited():
    """10,000 DATA packets to unknown connections in 2 s: RESETs are capped
    by UTPKIT_RESET_RATE (100/s, a burst of 100), the rest counted as
    limited; RESETs are never answered, so nothing bounces back and forth."""
    h = Harness(nbytes=8 * MiB)
    n, spacing = 10_000, 200  # one every 200 us for 2 s
    start = []
    t0 = h.net.now

    def fire(i):
        def go():
            if not start:
                start.append(h.net.now)
                start.append(h.b.ctx.stats())
            h.m.send_raw(pkt(ST_DATA, 40_000 + (i % 5000), i, 0, payload=b"f" * 100), h.b)
        return go
    for i in range(n):
        h.net.call_at(t0 + 100 * MS + i * spacing, fire(i))
    m_in = h.net.get_link(h.b, h.m)
    rate = h.b.ctx.get_option(utp.UTPKIT_RESET_RATE)
    h.run(lambda h: None)
    st_b = h.stats["b"]
    before = start[1]
    sent = st_b["resets_sent"] - before["resets_sent"]
    limited = st_b["resets_limited"] - before["resets_limited"]
    assert st_b["drop_unknown"] - before["drop_unknown"] == n
    assert sent + limited == n
    assert rate == 100
    assert sent <= rate + rate * 2         # the burst + 2 s of refill
    assert sent >= rate + 2 * rate * 0.95  # and the refill was not lost
    assert m_in.sent == sent               # every RESET sent reached m...
    st_m = h.stats["m"]
    assert st_m["resets_sent"] == 0        # ...and m answered none of them
    assert st_m["drop_unknown"] == sent


def test_syn_flood_past_the_socket_cap():
    """SYNs from many spoofed addresses beyond UTPKIT_MAX_SOCKETS: the
    excess is refused and counted, the live connection is unaffected, and
    the half-open sockets time out and free their slots."""
    h = Harness(nbytes=4 * MiB)
    cap, n = 40, 400
    h.b.ctx.max_sockets = cap
    assert h.b.ctx.get_option(utp.UTPKIT_MAX_SOCKETS) == cap
    base = h.b.ctx.stats()
    t0 = h.net.now

    def fire(i):
        def go():
            src = (f"198.51.100.{i % 250 + 1}", 1000 + i)   # no such node: unroutable
            h.b.call(h.b.ctx.process_udp, pkt(ST_SYN, 1000 + i, 7 * i, 0), src)
        return go
    for i in range(n):
        h.net.call_at(t0 + 150 * MS + i * 500, fire(i))
    h.run(lambda h: None, keep_open=True)
    st_b = h.b.ctx.stats()
    accepted = len(h.b.accepted) - 1   # the transfer's own connection
    assert accepted == cap - 1          # the live connection holds one slot
    assert st_b["syn_refused"] - base["syn_refused"] == n - accepted
    assert st_b["sockets_peak"] == cap
    # The half-open sockets' SYN-ACKs and probes go nowhere; keepalive
    # probing gives up on them within a minute or so (29 s + 5 probes).
    h2 = h.net
    with h2:
        h2.run(h2.now + 120 * S)
        assert h.b.ctx.stats()["sockets_live"] == 0
        errs = {c.error for c in h.b.accepted[1:]}
        assert errs == {utp.UTP_ETIMEDOUT}


# --- property tests -----------------------------------------------------------

_TEMPLATES = ("syn", "state", "data", "fin", "reset", "sack", "sack_odd", "ext_bits")


def _template(kind, cid, seq, ack):
    if kind == "syn":
        return pkt(ST_SYN, cid - 1, seq, 0)
    if kind == "state":
        return pkt(ST_STATE, cid, seq, ack)
    if kind == "data":
        return pkt(ST_DATA, cid, seq, ack, payload=b"D" * 300)
    if kind == "fin":
        return pkt(ST_FIN, cid, seq, ack)
    if kind == "reset":
        return pkt(ST_RESET, cid, seq, ack)
    if kind == "sack_odd":       # libtorrent's byte-granular bitmap
        return pkt(ST_STATE, cid, seq, ack, ext=[(1, b"\xf0\x0f\x55")])
    if kind == "ext_bits":       # libutp's extension-bits link, then a SACK
        return pkt(ST_STATE, cid, seq, ack, ext=[(2, b"\0" * 8), (1, b"\x0f" * 5)])
    return pkt(ST_STATE, cid, seq, ack, ext=[(1, b"\xf0\x0f\x55\xaa")])


@st.composite
def mutated(draw):
    """A datagram: random bytes, or a live-connection template with random
    damage: header fields overwritten, bytes flipped, truncated or extended."""
    if draw(st.integers(0, 4)) == 0:
        return ("raw", draw(st.binary(max_size=200)), ())
    kind = draw(st.sampled_from(_TEMPLATES))
    edits = draw(st.lists(st.one_of(
        st.tuples(st.just("byte"), st.integers(0, 400), st.integers(0, 255)),
        st.tuples(st.just("field"), st.sampled_from(["seq", "ack", "wnd", "id", "ts", "ext"]),
                  st.integers(0, 0xFFFFFFFF)),
        st.tuples(st.just("cut"), st.integers(0, 400), st.just(0)),
        st.tuples(st.just("tail"), st.binary(max_size=64), st.just(0)),
    ), max_size=5))
    return (kind, b"", tuple(edits))


_FIELD = {"ts": (4, ">I"), "wnd": (12, ">I"), "seq": (16, ">H"), "ack": (18, ">H"),
          "id": (2, ">H"), "ext": (1, ">B")}


def _apply(spec, cid, seq, ack):
    kind, raw, edits = spec
    if kind == "raw":
        return raw
    data = bytearray(_template(kind, cid, seq, ack))
    for op, x, y in edits:
        if op == "byte" and x < len(data):
            data[x] = y
        elif op == "field":
            off, fmt = _FIELD[x]
            if off + struct.calcsize(fmt) <= len(data):
                mask = (1 << (8 * struct.calcsize(fmt))) - 1
                struct.pack_into(fmt, data, off, y & mask)
        elif op == "cut":
            del data[x:]
        elif op == "tail":
            data += x
    return bytes(data)


def _accounted(net, name, stats, injected):
    """Every datagram given to the engine is counted, uTP or not."""
    delivered = sum(link.delivered for (src, dst), link in net.links.items() if dst == name)
    return stats["packets_in"] + stats["not_utp"] == delivered + injected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(mutated(), st.sampled_from(["a", "b"])), min_size=1,
                      max_size=25),
       seed=st.integers(0, 2**16))
def test_property_off_path_garbage_never_hurts(specs, seed):
    """From an address that is not the peer's, nothing can touch the live
    connection: random bytes and damaged copies of its own packets (its ids,
    in-window numbers) are all dropped or answered, never crash the engine,
    and the transfer completes with the right sha256."""
    h = Harness(seed=seed, nbytes=96 * KiB, delay_us=5 * MS, bandwidth_bps=20e6,
                queue_bytes=100_000)
    state = {"i": 0}

    def attack(h):
        for spec, side in specs[state["i"]::3]:
            victim = h.a if side == "a" else h.b
            peer = "b" if side == "a" else "a"
            _, cid, seq, ack = h.sniff.last[peer]
            data = _apply(spec, cid, seq, ack)
            victim.call(victim.ctx.process_udp, data, h.m.addr)
            h.injected[victim.name] += 1
        state["i"] += 1

    h.run(attack, at_us=(15 * MS, 25 * MS, 35 * MS))
    for name in ("a", "b"):
        assert _accounted(h.net, name, h.stats[name], h.injected[name])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(mutated(), st.sampled_from(["a", "b"])), min_size=1,
                      max_size=25),
       seed=st.integers(0, 2**16))
def test_property_on_path_forgeries_are_survived(specs, seed):
    """Damaged copies of the connection's own packets, forged from the
    peer's address.  Some of them may legitimately end or confuse the
    connection (uTP has no authentication), so the property is robustness:
    no crash, every datagram counted, both sockets freed after close, and
    both engines still carry a new transfer correctly afterwards."""
    net = Network(seed=seed)
    a, b = net.add_node("a"), net.add_node("b")
    net.link(a, b, delay_us=5 * MS, bandwidth_bps=20e6, queue_bytes=100_000)
    sniff = Sniffer(net, a, b)
    injected = {"a": 0, "b": 0}
    with net:
        b.listen()
        ca = a.connect(b)
        ca.send(96 * KiB, shutdown=True)
        net.run(net.now + 15 * MS)
        assert sniff.ready
        for i, (spec, side) in enumerate(specs):
            victim, peer = (a, b) if side == "a" else (b, a)
            _, cid, seq, ack = sniff.last[peer.name]
            victim.call(victim.ctx.process_udp, _apply(spec, cid, seq, ack), peer.addr)
            injected[side] += 1
            net.run(net.now + 2 * MS)
        net.run(net.now + 2 * S)
        for c in a.connections + b.connections:
            c.close()
        net.run(net.now + 300 * S)
        for node in (a, b):
            assert _accounted(net, node.name, node.ctx.stats(), injected[node.name])
        for node in (a, b):
            assert node.ctx.stats()["sockets_live"] == 0, node
        net.get_link(a, b).filter = None
        net.get_link(b, a).filter = None
        r = transfer(net, a, b, 64 * KiB)
        assert r.ok and r.clean_close
