"""Birthday probing's pieces that need no NAT (issue 10): the caps, the
mapping verdict from reported addresses, and the clear error for two
symmetric NATs, which comes at once and sends nothing.  The probing itself
runs across the kernel's NATs in tests/test_natlab_birthday.py (it opens
real UDP sockets, so it is off on the simulated network of test_punch.py).
"""

from __future__ import annotations

import pytest
import trio

import utp
from utp._birthday import BDAY_PREFIX, _datagram, _parse, mapping_from_reports


def test_limits_are_checked():
    assert utp.BirthdayLimits().ports == 256
    for bad, match in (({"ports": 0}, "ports must be 1..1024"),
                       ({"ports": 1025}, "ports must be 1..1024"),
                       ({"rate": 0}, "rate must be positive"),
                       ({"spray_rate": -1}, "spray_rate must be positive"),
                       ({"max_probes": 0}, "max_probes must be at least 1"),
                       ({"after": -1}, "after must be zero or positive"),
                       ({"refresh": 0}, "refresh must be positive")):
        with pytest.raises(ValueError, match=match):
            utp.BirthdayLimits(**bad)


def test_mapping_from_reports():
    # One report, or reports that agree, prove nothing.
    assert mapping_from_reports([]) is None
    assert mapping_from_reports([("198.18.0.5", 4000)]) is None
    assert mapping_from_reports([("198.18.0.5", 4000), ("::ffff:198.18.0.5", 4000)]) is None
    # Two nodes that saw one IP at two ports: a new mapping per destination.
    assert mapping_from_reports([("198.18.0.5", 4000), ("198.18.0.5", 51234)]) == "dependent"
    # Different IPs (two interfaces, dual stack) are not one mapping.
    assert mapping_from_reports([("198.18.0.5", 4000), ("198.18.0.6", 5000)]) is None
    assert mapping_from_reports([("not an ip", 1), ("198.18.0.5",)]) is None


def test_datagrams_are_not_ours_to_misread():
    assert _parse(_datagram(1, 77)) == (1, 77)
    assert _parse(BDAY_PREFIX) is None and _parse(b"utpkit-punch\x01") is None
    assert _parse(_datagram(2, 5) + b"x") is None


async def test_two_symmetric_nats_fail_at_once_sending_nothing():
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        t0 = trio.current_time()
        with pytest.raises(utp.NATTraversalError, match=r"both NATs map every destination to a "
                                                        r"new port \(symmetric\)"):
            await utp.punch(ep, ("127.0.0.2", 4000), timeout=10, mapping="dependent",
                            peer_mapping="dependent")
        assert trio.current_time() - t0 < 0.5
        assert isinstance(utp.NATTraversalError("x"), utp.NetworkError)
        assert ep.statistics()["io"]["sent_datagrams"] == 0


async def test_mapping_arguments_are_checked():
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        with pytest.raises(ValueError, match="mapping must be one of"):
            await utp.punch(ep, ("127.0.0.2", 4000), timeout=1, mapping="symmetric")
        with pytest.raises(ValueError, match="peer_mapping must be one of"):
            await utp.punch(ep, ("127.0.0.2", 4000), timeout=1, peer_mapping="cone")


async def test_rendezvous_told_both_nats_are_symmetric_fails_before_meeting():
    # Both sides fail at once; neither meets the other and then withdraws,
    # which would leave the other timing out at the tracker.
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        with pytest.raises(utp.NATTraversalError, match=r"cannot connect through the "
                                                        r"rendezvous: both NATs"):
            await utp.rendezvous(ep, "k", via=("127.0.0.1", 9), timeout=10,
                                 mapping="dependent", peer_mapping="dependent")
        assert ep.statistics()["io"]["sent_datagrams"] == 0
