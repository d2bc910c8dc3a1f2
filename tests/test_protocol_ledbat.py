"""LEDBAT congestion control on a simulated bottleneck (issue #2 §5,
RFC 6817, BEP 29).

A 10 Mbit/s bottleneck with 50 ms of round trip and a deep drop-tail queue
(1 MB, 800 ms at the link rate): LEDBAT must keep the link full while holding
the queue near its target delay (UTP_TARGET_DELAY, 100 ms), and flows
started together must share the link.  Steady state is the second half of a
60 s run; queueing delays are the bottleneck queue's own (the time each
packet waited before its transmission began), not the engine's estimate.
"""

import statistics

import pytest

import utp
from utp.testing import Network

MS = 1000
S = 1_000_000
MiB = 1 << 20

RATE = 10e6
RUN = 60 * S
HALF = 30 * S
IP_UDP = 28              # bytes of IPv4 + UDP header per datagram
PACKET = 1402            # UDP payload of a full packet (IPv4 default)
PAYLOAD = PACKET - 20    # minus the uTP header


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


class Bottleneck:
    """`flows` bulk connections a -> b over one bottleneck, measured over
    the second half of the run."""

    def __init__(self, flows=1, *, seed=1, queue_bytes=1_000_000, target_us=None,
                 delay_us=25 * MS):
        opts = {utp.UTP_TARGET_DELAY: target_us} if target_us else None
        self.net = net = Network(seed=seed)
        self.a = net.add_node("a", options=opts)
        self.b = net.add_node("b", options=opts)
        self.link, _ = net.link(self.a, self.b, delay_us=delay_us, bandwidth_bps=RATE,
                                queue_bytes=queue_bytes)
        self.b.listen()
        self.conns = [self.a.connect(self.b) for _ in range(flows)]
        for c in self.conns:
            c.send(1000 * MiB)
        self.mark = {}
        net.call_at(HALF, self._mark)
        with net:
            net.run(RUN)
            self.receivers = list(self.b.accepted)
            assert len(self.receivers) == flows
            for c in self.conns + self.receivers:
                assert c.error is None
            self._measure()

    def _mark(self):
        link = self.link
        self.mark = dict(n=len(link.queue_delays), bytes=link.bytes_delivered,
                         pkts=link.delivered, rx=[c.received for c in self.b.accepted])

    def _measure(self):
        link, m = self.link, self.mark
        secs = (RUN - HALF) / S
        wire = (link.bytes_delivered - m["bytes"]) + IP_UDP * (link.delivered - m["pkts"])
        # Utilisation: everything the bottleneck delivered, headers included,
        # against its rate.
        self.utilisation = wire * 8 / secs / RATE
        # Goodput: application bytes received, against the most a link of
        # this rate can carry in full packets (1382 of every 1430 bytes).
        self.goodput = [(c.received - r0) / secs for c, r0 in zip(self.receivers, m["rx"])]
        self.goodput_whole = [c.received / (RUN / S) for c in self.receivers]
        self.payload_capacity = RATE / 8 * PAYLOAD / (PACKET + IP_UDP)
        delays = link.queue_delays[m["n"]:]
        self.q_median = statistics.median(delays)
        self.q_p10 = pct(delays, 0.10)
        self.q_p90 = pct(delays, 0.90)
        self.drops = link.dropped


@pytest.fixture(scope="module")
def one_flow():
    return Bottleneck(1)


@pytest.fixture(scope="module")
def two_flows():
    return Bottleneck(2)


def test_one_flow_fills_the_link(one_flow):
    # Measured: 100.0% of the link, goodput 1.208 MB/s = 100% of what full
    # packets can carry.
    assert one_flow.utilisation >= 0.95
    assert sum(one_flow.goodput) >= 0.95 * one_flow.payload_capacity
    assert one_flow.drops == 0


def test_one_flow_holds_the_queue_at_the_target(one_flow):
    # Measured: median 96.4 ms, 10th-90th percentile 94.1-98.7 ms.
    target = 100 * MS
    for q in (one_flow.q_median, one_flow.q_p10, one_flow.q_p90):
        assert 0.8 * target <= q <= 1.2 * target


def test_two_flows_share_the_link(two_flows):
    # Measured: 0.649 / 0.556 MB/s over the whole run, 0.633 / 0.575 MB/s
    # in the second half.
    for rates in (two_flows.goodput, two_flows.goodput_whole):
        assert min(rates) >= 0.8 * max(rates)
    assert two_flows.utilisation >= 0.95
    assert sum(two_flows.goodput) >= 0.95 * two_flows.payload_capacity
    for q in (two_flows.q_median, two_flows.q_p10, two_flows.q_p90):
        assert 0.8 * 100 * MS <= q <= 1.2 * 100 * MS


def test_three_flows_share_the_link():
    three = Bottleneck(3, seed=2)
    assert min(three.goodput) >= 0.8 * max(three.goodput)
    assert three.utilisation >= 0.95
    assert 80 * MS <= three.q_median <= 120 * MS


@pytest.mark.parametrize("target_ms", [25, 50])
def test_target_delay_option(target_ms):
    """UTP_TARGET_DELAY (microseconds) moves the queue LEDBAT keeps."""
    run = Bottleneck(1, target_us=target_ms * MS)
    assert run.utilisation >= 0.95
    assert 0.8 * target_ms * MS <= run.q_median <= 1.2 * target_ms * MS
    assert run.q_p90 <= 1.2 * target_ms * MS


def test_shallow_queue_still_full_link():
    """A queue (60 kB, 48 ms) shallower than the target: LEDBAT cannot reach
    its target delay and falls back to loss-based behaviour, keeping the
    link busy."""
    run = Bottleneck(1, queue_bytes=60_000)
    assert run.utilisation >= 0.95
    assert run.q_p90 <= 60_000 * 8 / RATE * S
