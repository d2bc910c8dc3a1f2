"""utp.bench -- benchmark scripts for utpkit: they print numbers and ratios
to compare one version of the engine with the next.

What it is: ``python -m utp.bench sim`` runs the engine over the simulated
network of ``utp.testing`` (virtual time, seeded, reproducible) and reports
goodput, retransmissions against packets lost, and queueing delay for the
scenarios of the protocol tests.

What it is not: a test (nothing here asserts; the tests under tests/ do),
and not a measure of real-socket throughput or CPU cost -- benchmarks over
real sockets come with the trio transport.
"""
