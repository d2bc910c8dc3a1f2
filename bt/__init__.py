"""BitTorrent peer for utpkit.  Not written yet: this package is a placeholder.

It will speak the peer wire protocol (BEP 3) over TCP and uTP, with magnet
links (BEP 9/10), peer exchange (BEP 11), UDP and HTTP trackers (BEP 15/23)
and holepunch (BEP 55), as sans-I/O cores with trio drivers on top, and
report download events to callbacks, hook commands and aria2-style JSON-RPC
notifications.  It is not a full client UI.
"""
