"""Our sender against receivers that acknowledge like other stacks (issue 12),
on the virtual clock: libutp's (one ACK per read batch, a 4-byte SACK of 30
bits) and libtorrent's (SACK bitmaps of (span + 7) / 8 bytes), each behind
a 208 KiB socket buffer with a reader of finite speed that drops what does
not fit -- the setting in which bursts overflow the receiver and holes must
be repaired from thin SACK information.

Speed is measured by ``python -m utp.bench sim -k peers``; these tests
assert delivery, the hashes, and that repair happens without timeouts.
"""

import pytest

from utp.simpeers import ModelReceiver, sack_bitmap, transfer_to_peer
from utp.testing import Network, transfer

MiB = 1 << 20

# A fast path (1 Gbit/s, 1 ms RTT) into a receiver that reads at most
# 100 MB/s in 1 ms batches: the sender can outrun it, so its socket buffer
# fills and drops, as on loopback with stock buffers.
LINK = dict(delay_us=500, bandwidth_bps=1e9, queue_bytes=1_000_000)
SOCKBUF = dict(capacity=212_992, read_rate=100e6, interval_us=1000)


def run_peer(style, nbytes, seed=1, **link):
    net = Network(seed=seed)
    a = net.add_node("a")
    peer = ModelReceiver(net, "p", style, socket_buffer=SOCKBUF)
    net.link(a, peer, **{**LINK, **link})
    with net:
        return transfer_to_peer(net, a, peer, nbytes, timeout_us=300_000_000)


def test_sack_bitmaps_of_the_models():
    # Bit k stands for ack_nr + 2 + k.  libutp: always 4 bytes, 30 bits, so
    # 41 (bit 30) is held but not shown.
    assert sack_bitmap("libutp", {12, 14, 41}, 9) == bytes([0x0A, 0, 0, 0])
    # libtorrent: just the bytes the highest bit needs, at most 32.
    assert sack_bitmap("libtorrent", {12}, 9) == bytes([0x02])
    assert sack_bitmap("libtorrent", {12, 30}, 9) == bytes([0x02, 0, 0x08])
    assert len(sack_bitmap("libtorrent", {9 + 2 + 400}, 9)) == 32


@pytest.mark.parametrize("style", ["libutp", "libtorrent"])
def test_transfer_through_a_full_socket_buffer(style):
    r = run_peer(style, 16 * MiB)
    assert r.ok, r
    # The receiver's buffer did overflow: the repair was exercised ...
    assert r.socket_buffer["dropped"] > 0, r.socket_buffer
    # ... and done from ACK/SACK evidence, never by a timeout.
    assert r.timeouts == 0, r.sender
    assert r.sender["rexmit"] == 0, r.sender
    # Repairs stay in proportion to what was dropped (no go-back-N).
    assert r.sender["fastrexmit"] <= 3 * r.socket_buffer["dropped"] + 10, (r.sender, r.socket_buffer)


def test_odd_length_sacks_repair_random_loss():
    """libtorrent-style bitmaps that are not multiples of 4 bytes are used:
    with 2% random loss on the path (and no socket-buffer trouble) every
    hole is repaired, mostly from the SACKs."""
    net = Network(seed=7)
    a = net.add_node("a")
    peer = ModelReceiver(net, "p", "libtorrent")
    net.link(a, peer, delay_us=10_000, bandwidth_bps=50e6, queue_bytes=300_000, loss=0.02)
    with net:
        r = transfer_to_peer(net, a, peer, 4 * MiB, timeout_us=300_000_000)
    assert r.ok, r
    odd = sum(n for length, n in r.sack_lengths.items() if length % 4)
    assert odd > 0, r.sack_lengths
    assert r.sender["fastrexmit"] >= r.a_to_peer["dropped_loss"] // 2, (r.sender, r.a_to_peer)
    assert r.sender["fastrexmit"] > r.sender["rexmit"], r.sender


def test_64_mib_to_libutp_like_receiver_without_timeouts():
    """The issue's target, as a correctness bound: 64 MiB loss-free to a
    libutp-like receiver with a 208 KiB buffer, no retransmission timeout."""
    r = run_peer("libutp", 64 * MiB)
    assert r.ok, r
    assert r.timeouts == 0, r.sender
    assert r.sender["rexmit"] == 0, r.sender


def test_own_receiver_behind_a_socket_buffer():
    """The same socket-buffer model in front of our own engine: the transfer
    completes with equal hashes and no timeout."""
    net = Network(seed=1)
    a = net.add_node("a")
    b = net.add_node("b")
    net.link(a, b, **LINK)
    sb = b.set_socket_buffer(**SOCKBUF)
    with net:
        r = transfer(net, a, b, 16 * MiB)
    assert r.ok and r.clean_close, r
    assert sb.dropped > 0 and sb.batches > 0
    assert r.conn_a.final_info["timeouts"] == 0
