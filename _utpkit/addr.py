"""Addresses: IPv4-mapped normalisation and ``HOST:PORT`` parsing.

A dual-stack socket (bound to ``::``) reports an IPv4 peer as
``::ffff:a.b.c.d``; the same peer reached over an IPv4 socket, or listed by
a tracker or the DHT, is ``a.b.c.d``.  Anything that compares or stores
addresses normalises first, here, so the two spellings are one peer.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["normalize_ip", "addr_key", "unmap_host", "split_hostport", "parse_hostport"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_ip(host: Any) -> IPAddress:
    """``host`` (a literal, with or without an IPv6 ``%scope``) as an
    ipaddress object, IPv4-mapped IPv6 addresses as IPv4.  Raises
    ValueError for anything that is not an IP literal."""
    ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def addr_key(addr: Any) -> tuple[IPAddress, int]:
    """``(normalised ip, port)``: equal for the two spellings of one
    endpoint; a dictionary key.  Raises ValueError for a non-literal host."""
    return normalize_ip(addr[0]), int(addr[1])


def unmap_host(host: str) -> str:
    """``::ffff:a.b.c.d`` -> ``a.b.c.d``; any other host unchanged.  The
    cheap string form of :func:`normalize_ip` for a hot receive path."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def split_hostport(text: str, *, bare_ipv6: bool = False) -> tuple[str, str]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` -> ``(host, port text)``, with no
    check of either part.  An IPv6 address needs its brackets unless
    ``bare_ipv6`` (then the last colon splits: ``::1:6881`` is ``::1``
    port 6881).  Raises ValueError."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host and not bare_ipv6:
            sep = ""
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, not {text!r}")
    return host, port


def parse_hostport(text: str, *, bare_ipv6: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` with a literal IP address and a
    port 0..65535 (``bare_ipv6``: see :func:`split_hostport`).  Raises
    ValueError naming what is wrong."""
    host, port_text = split_hostport(text, bare_ipv6=bare_ipv6)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not a literal IP address") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, int(port_text)
