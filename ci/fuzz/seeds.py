#!/usr/bin/env python3
"""Write the seed corpus for fuzz_process_udp into a directory.

    python3 ci/fuzz/seeds.py OUT_DIR

Each seed is a list of records in the harness's input format (see the
comment at the top of fuzz_process_udp.c): valid BEP 29 packets of every
type -- SYN, STATE, DATA, FIN, RESET -- with and without a SACK extension
and an unknown extension, aimed at the harness's live connections, plus
clock advances, ICMP reports and application calls.  The directory is meant
to live outside the tracked tree (run.sh uses ci/fuzz/corpus-run/, which git
ignores).
"""

import os
import struct
import sys

ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN = range(5)

# Action numbers and source addresses of the harness.
A_DGRAM, A_ICMP, A_FRAG, A_TIME, A_APP, A_ACKS = 0, 3, 4, 5, 6, 7
SRC_Y, SRC_Z, SRC_STRANGER, SRC_NOWHERE = range(4)

# Slots of the harness (1-based in the op byte; 0 means "not aimed").
IDLE, IN_FLIGHT, OUT_OF_ORDER, SYN_SENT, SHUT_DOWN, PEER_CLOSED, IPV6 = range(7)


def header(ptype, conn_id=0, seq=0, ack=0, ext=0, wnd=65536, ts=1000, ts_diff=0, seq_off=0, ack_off=0):
    """A 20-byte uTP header.  When the record is aimed, the harness replaces
    conn_id, and seq/ack with values near the slot's own: the low byte of
    seq is then a signed offset, the low bits of ack an offset back."""
    if seq_off:
        seq = seq_off & 0xFF
    if ack_off:
        ack = ack_off & 0x1F
    return struct.pack(">BBHIIIHH", (ptype << 4) | 1, ext, conn_id & 0xFFFF, ts, ts_diff, wnd, seq & 0xFFFF, ack & 0xFFFF)


def sack_ext(bits, next_ext=0):
    return struct.pack(">BB", next_ext, len(bits)) + bytes(bits)


def unknown_ext(payload, next_ext=0):
    return struct.pack(">BB", next_ext, len(payload)) + payload


def dgram(body, slot=None, src=SRC_Y):
    op = A_DGRAM | (src << 3) | ((0 if slot is None else slot + 1) << 5)
    return bytes([op]) + struct.pack(">H", len(body)) + body


def icmp(slot, length=0, src=SRC_NOWHERE):
    op = A_ICMP | (src << 3) | ((slot + 1) << 5)
    return bytes([op]) + struct.pack(">H", length) + b"\0" * length


def frag(slot, mtu):
    op = A_FRAG | ((slot + 1) << 5)
    return bytes([op]) + struct.pack(">HH", 2, mtu)


def advance(root_ms):
    return bytes([A_TIME, root_ms])


def acks():
    return bytes([A_ACKS])


def app(slot, call, arg):
    return bytes([A_APP | ((slot + 1) << 5), call, arg])


def seeds():
    payload = bytes(range(256)) * 4
    s = {}

    # One packet of each type at each live connection.
    for slot in range(7):
        s[f"state_{slot}"] = dgram(header(ST_STATE), slot)
        s[f"data_{slot}"] = dgram(header(ST_DATA) + payload[:500], slot) + acks()
        s[f"data_ooo_{slot}"] = dgram(header(ST_DATA, seq_off=3) + payload[:300], slot) + acks()
        s[f"fin_{slot}"] = dgram(header(ST_FIN), slot) + advance(30)
        s[f"reset_{slot}"] = dgram(header(ST_RESET), slot) + advance(5)

    # SACK: bits after a hole, on the connection with data in flight.
    s["sack_in_flight"] = (
        dgram(header(ST_STATE, ext=1) + sack_ext([0b10110110, 0xFF, 0, 0]), IN_FLIGHT, SRC_Y)
        + dgram(header(ST_STATE, ext=1, ack_off=1) + sack_ext([0xFF] * 4), IN_FLIGHT)
        + dgram(header(ST_STATE, ext=1, ack_off=2) + sack_ext([0x0F] * 8), IN_FLIGHT)
        + advance(10)
    )
    # SACK bitmaps of the lengths real stacks send: libtorrent's byte-granular
    # (span + 7) / 8 bytes, libutp's extension-bits link (type 2) in front.
    s["sack_odd_lengths"] = (
        dgram(header(ST_STATE, ext=1) + sack_ext([0b11111110]), IN_FLIGHT)
        + dgram(header(ST_STATE, ext=1) + sack_ext([0xFE, 0xFF, 0x03]), IN_FLIGHT)
        + dgram(header(ST_STATE, ext=1, ack_off=1) + sack_ext([0xFF] * 11), IN_FLIGHT)
        + dgram(header(ST_STATE, ext=2) + unknown_ext(b"\0" * 8, next_ext=1) + sack_ext([0x0F] * 6), IN_FLIGHT)
        + dgram(header(ST_STATE, ext=1, ack_off=2) + sack_ext([]), IN_FLIGHT)
        + advance(10)
    )
    # Three duplicate ACKs: fast retransmit.
    s["dup_acks"] = b"".join(dgram(header(ST_STATE, ack_off=5), IN_FLIGHT) for _ in range(4)) + acks()
    # Unknown extension (type 7) skipped, then a SACK chained after one.
    s["unknown_ext"] = dgram(header(ST_STATE, ext=7) + unknown_ext(b"hello"), IDLE)
    s["ext_chain"] = dgram(
        header(ST_DATA, ext=7) + unknown_ext(b"\x01\x02\x03", next_ext=1) + sack_ext([1, 0, 0, 0]) + payload[:200],
        OUT_OF_ORDER,
    )
    # Filling the hole of the out-of-order connection.
    s["fill_hole"] = dgram(header(ST_DATA) + payload[:1000], OUT_OF_ORDER) + acks()

    # A stranger connects, sends data and closes (unaimed: raw ids).
    s["stranger_session"] = (
        dgram(header(ST_SYN, conn_id=1234, seq=100), src=SRC_STRANGER)
        + dgram(header(ST_DATA, conn_id=1235, seq=101, ack=0) + payload[:100], src=SRC_STRANGER)
        + dgram(header(ST_FIN, conn_id=1235, seq=102, ack=0), src=SRC_STRANGER)
        + acks()
        + advance(100)
    )
    s["syn_v6"] = dgram(header(ST_SYN, conn_id=999, seq=7), src=SRC_Z) + advance(40)
    s["syn_duplicate"] = dgram(header(ST_SYN), IDLE) + dgram(header(ST_SYN), IDLE)
    # Completing the SYN-sent connection: a STATE from "nowhere".
    s["syn_ack"] = dgram(header(ST_STATE), SYN_SENT) + dgram(header(ST_DATA) + payload[:50], SYN_SENT)
    # Packets for nobody: answered with RESET (rate limited), RESET ignored.
    s["unknown_data"] = b"".join(
        dgram(header(ST_DATA, conn_id=40000 + i, seq=5) + b"x", src=SRC_STRANGER) for i in range(5)
    )
    s["unknown_reset"] = dgram(header(ST_RESET, conn_id=555), src=SRC_STRANGER)

    # ICMP: port unreachable on the connecting socket, fragmentation needed
    # on the one with data in flight.
    s["icmp_refused"] = icmp(SYN_SENT)
    s["icmp_reset"] = icmp(IDLE, src=SRC_Y)
    s["icmp_frag"] = frag(IN_FLIGHT, 576) + advance(20)
    s["icmp_frag_tiny"] = frag(IPV6, 68)

    # Application calls: write, shut down, close, reconnect, then timers.
    s["app_write_ack"] = app(IDLE, 0, 40) + dgram(header(ST_STATE), IDLE) + advance(3) + acks()
    s["app_writev"] = app(IPV6, 6, 30) + advance(2)
    s["app_shutdown_close"] = app(IDLE, 2, 1) + dgram(header(ST_FIN), IDLE) + app(IDLE, 3, 0) + advance(50)
    s["app_connect"] = app(IDLE, 4, SRC_STRANGER) + advance(25)
    s["app_small_rcvbuf"] = app(OUT_OF_ORDER, 5, 1) + dgram(header(ST_DATA, seq_off=1) + payload, OUT_OF_ORDER)

    # Long silences: retransmission timeouts, keepalives, giving up.
    s["timeouts"] = advance(30) + advance(60) + advance(120) + advance(250) + advance(255)

    # Not uTP: a DHT query, a tracker reply, runt datagrams.
    s["not_utp"] = (
        dgram(b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe", src=SRC_STRANGER)
        + dgram(struct.pack(">IIQ", 0, 1234, 0x41727101980), src=SRC_STRANGER)
        + dgram(b"\x01" * 7)
        + dgram(b"")
    )
    return s


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    for name, data in seeds().items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
