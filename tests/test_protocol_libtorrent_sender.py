"""Our receiver downloading from a sender that behaves like libtorrent's
(issue 12), on the virtual clock.

libtorrent counts selectively acknowledged packets as no longer in flight,
fast-resends a packet at most once and declares the connection dead at a
timeout whose first unacknowledged packet was already sent three times
(``utp.simsender``).  Each packet therefore has three transmissions, and a
receiver that drops a copy that did arrive spends one of them.  Our receive
window used to leave the reorder buffer out: while a hole waited for its
resend, the sender ran a whole window past the last SACKed packet, the
reorder buffer's memory bound dropped the excess unacknowledged, and in the
interop lab at 2% loss 49 of 68 packets that libtorrent sent three times had
had a copy dropped by us, so about half the downloads from libtorrent died.
"""

import pytest

from utp.simsender import ModelSender
from utp.testing import Network

MiB = 1 << 20

LINK = dict(delay_us=5_000, bandwidth_bps=200e6, queue_bytes=2_000_000)


def download(nbytes, loss, seed, payload=1382):
    net = Network(seed=seed)
    us = net.add_node("us")
    accepted = []
    us.listen(accepted.append)
    lt = ModelSender(net, "lt", us.addr, nbytes, loss=loss, seed=seed, payload=payload)
    net.link(lt, us, **LINK)
    with net:
        net.run(net.now + 120_000_000, condition=lambda: lt.done or lt.dead is not None)
        net.run(net.now + 100_000)
    return lt, accepted


# 1382 bytes: libtorrent's packets on a 1500-byte path; 600: after it has
# lowered its MTU, when a 1 MiB window holds more packets than the reorder
# buffer has slots (the window must then say so, or we drop what it sends).
@pytest.mark.parametrize("seed,payload", [(1, 1382), (2, 1382), (3, 1382), (4, 600)])
def test_no_copy_that_arrived_is_wasted(seed, payload):
    # 2% loss of the sender's transmissions (the ACK path is clean, so every
    # copy that reaches us is one we must acknowledge): many holes wait a
    # whole timeout for their resend while the sender keeps going.
    lt, accepted = download(8 * MiB, 0.02, seed, payload)
    assert lt.dead is None and lt.done, (lt.dead, lt.timeouts)
    assert len(accepted) == 1
    conn = accepted[0]
    assert conn.received == len(lt.data)
    import hashlib
    assert conn.received_sha256 == hashlib.sha256(lt.data).hexdigest()
    # A packet is resent only because a copy of it was lost on the way: one
    # transmission more than its lost copies, never more.
    wasted = {s: n for s, n in lt.transmissions.items() if n > lt.lost_copies.get(s, 0) + 1}
    assert not wasted, f"{len(wasted)} packets resent after a copy reached us: {sorted(wasted.items())[:10]}"
