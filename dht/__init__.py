"""Mainline DHT (BEP 5) for utpkit.  Not written yet: this package is a placeholder.

It will hold a sans-I/O KRPC core (bencoded queries and replies in, bytes and
events out, time passed in as ``now``) and a thin trio driver that sends and
receives through the shared uTP Endpoint socket, so the address other nodes
see is the same NAT mapping the uTP connections use.  It is not a general
key-value store: it finds peers for an info-hash and announces ours.
"""
