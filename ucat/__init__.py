"""ucat: netcat over uTP.

What it is: a command-line tool that joins stdin and stdout to one uTP
stream (BEP 29), flag-compatible with libutp's ucat (``-h -d -B -n -s -l
-p``) plus ``-w`` and ``--version``.  It connects (``ucat host port``) or
accepts one connection (``ucat -l -p port``), half-closes cleanly at EOF in
each direction and exits 0 only when both directions finished.  Run it as
``ucat`` or ``python -m ucat``; ``ucat -h`` documents the flags and the exit
statuses.

What it is not: a library.  It is a thin layer over the public ``utp`` trio
API (``utp.open_endpoint``, ``Endpoint.connect``/``listen``, ``UTPStream``)
and has no hole punching or rendezvous of its own yet.  Importing this
package imports neither trio nor ``utp``; ``ucat._cli.main`` does, when run.
"""

__all__ = ["main"]


def main(argv=None):
    """Run ucat with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    from ucat._cli import main as _main

    return _main(argv)
