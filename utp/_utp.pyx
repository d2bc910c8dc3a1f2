# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, binding=True, embedsignature=True
"""Cython binding of the utpkit uTP engine (utp/core).

Python never runs inside an engine call.  The callbacks registered with the
engine are plain C: they record what happened (outgoing datagrams, socket
events, received payload) in C arrays owned by the context, and Python drains
those arrays after the engine call has returned (``take_datagrams()``,
``take_events()``, ``Socket.read()``).  So an exception can never be lost in
a callback, the engine can never be re-entered from Python, and no Python
object is created per packet while the engine runs.

Lifetimes (the uvloop pattern): every engine socket has a small malloc'd C
record as its userdata.  The record outlives the engine socket: it is freed
only once the engine has destroyed the socket, no Python ``Socket`` refers to
it any more and no undrained event names it.  So a queued event never points
at freed memory, even when one engine call accepts and destroys a socket.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memmove, memcmp, memset, strlen
from libc.stdint cimport uint64_t, int64_t, uint32_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import errno as _errno
import os as _os
import warnings as _warnings

from _utpkit.contract import StrEnum as _StrEnum

# --------------------------------------------------------------------------
# Constants of utp.h, as module attributes.
# --------------------------------------------------------------------------

# Every constant of utp.h under its C name (UTP_* and UTPKIT_*).  Cython
# cannot bind a module global to the name of a C constant, hence the dict.
globals().update({
    "UTP_UDP_DONTFRAG": UTP_UDP_DONTFRAG,
    "UTP_STATE_CONNECT": UTP_STATE_CONNECT,
    "UTP_STATE_WRITABLE": UTP_STATE_WRITABLE,
    "UTP_STATE_EOF": UTP_STATE_EOF,
    "UTP_STATE_DESTROYING": UTP_STATE_DESTROYING,
    "UTP_ECONNREFUSED": UTP_ECONNREFUSED,
    "UTP_ECONNRESET": UTP_ECONNRESET,
    "UTP_ETIMEDOUT": UTP_ETIMEDOUT,
    "UTP_ON_FIREWALL": UTP_ON_FIREWALL,
    "UTP_ON_ACCEPT": UTP_ON_ACCEPT,
    "UTP_ON_CONNECT": UTP_ON_CONNECT,
    "UTP_ON_ERROR": UTP_ON_ERROR,
    "UTP_ON_READ": UTP_ON_READ,
    "UTP_ON_OVERHEAD_STATISTICS": UTP_ON_OVERHEAD_STATISTICS,
    "UTP_ON_STATE_CHANGE": UTP_ON_STATE_CHANGE,
    "UTP_GET_READ_BUFFER_SIZE": UTP_GET_READ_BUFFER_SIZE,
    "UTP_ON_DELAY_SAMPLE": UTP_ON_DELAY_SAMPLE,
    "UTP_GET_UDP_MTU": UTP_GET_UDP_MTU,
    "UTP_GET_UDP_OVERHEAD": UTP_GET_UDP_OVERHEAD,
    "UTP_GET_MILLISECONDS": UTP_GET_MILLISECONDS,
    "UTP_GET_MICROSECONDS": UTP_GET_MICROSECONDS,
    "UTP_GET_RANDOM": UTP_GET_RANDOM,
    "UTP_LOG": UTP_LOG,
    "UTP_SENDTO": UTP_SENDTO,
    "UTP_LOG_NORMAL": UTP_LOG_NORMAL,
    "UTP_LOG_MTU": UTP_LOG_MTU,
    "UTP_LOG_DEBUG": UTP_LOG_DEBUG,
    "UTP_SNDBUF": UTP_SNDBUF,
    "UTP_RCVBUF": UTP_RCVBUF,
    "UTP_TARGET_DELAY": UTP_TARGET_DELAY,
    "UTP_ARRAY_SIZE": UTP_ARRAY_SIZE,
    "UTP_IOV_MAX": UTP_IOV_MAX,
    "UTPKIT_MIN_RTO": UTPKIT_MIN_RTO,
    "UTPKIT_MAX_RTO": UTPKIT_MAX_RTO,
    "UTPKIT_MAX_SOCKETS": UTPKIT_MAX_SOCKETS,
    "UTPKIT_SYN_TIMEOUT": UTPKIT_SYN_TIMEOUT,
    "UTPKIT_SYN_RETRIES": UTPKIT_SYN_RETRIES,
    "UTPKIT_ACK_DELAY": UTPKIT_ACK_DELAY,
    "UTPKIT_KEEPALIVE": UTPKIT_KEEPALIVE,
    "UTPKIT_DEAD_RETRIES": UTPKIT_DEAD_RETRIES,
    "UTPKIT_RESET_RATE": UTPKIT_RESET_RATE,
    "UTPKIT_MTU_PROBING": UTPKIT_MTU_PROBING,
    "UTPKIT_HALF_OPEN_MAX": UTPKIT_HALF_OPEN_MAX,
    "UTPKIT_HALF_OPEN_PER_ADDR": UTPKIT_HALF_OPEN_PER_ADDR,
    "UTPKIT_SYNACK_RATE": UTPKIT_SYNACK_RATE,
    "UTPKIT_OPTION_END": UTPKIT_OPTION_END,
    "UTPKIT_SOCK_IDLE": UTPKIT_SOCK_IDLE,
    "UTPKIT_SOCK_SYN_SENT": UTPKIT_SOCK_SYN_SENT,
    "UTPKIT_SOCK_CONNECTED": UTPKIT_SOCK_CONNECTED,
    "UTPKIT_SOCK_ERROR": UTPKIT_SOCK_ERROR,
    "UTPKIT_SOCK_CLOSING": UTPKIT_SOCK_CLOSING,
    "UTPKIT_SOCK_DESTROYED": UTPKIT_SOCK_DESTROYED,
    "UTPKIT_CLASS_OTHER": UTPKIT_CLASS_OTHER,
    "UTPKIT_CLASS_UTP": UTPKIT_CLASS_UTP,
    "UTPKIT_CLASS_DHT": UTPKIT_CLASS_DHT,
    "UTPKIT_CLASS_TRACKER": UTPKIT_CLASS_TRACKER,
})

__all__ = [  # the public names; utp/__init__.py re-exports them
    "Context",
    "Socket",
    "ClosedError",
    "classify",
    "EventKind",
    "ERROR_NAMES",
    "DEFAULT_MTU_IPV4",
    "DEFAULT_MTU_IPV6",
    "UTP_UDP_DONTFRAG",
    "UTP_STATE_CONNECT",
    "UTP_STATE_WRITABLE",
    "UTP_STATE_EOF",
    "UTP_STATE_DESTROYING",
    "UTP_ECONNREFUSED",
    "UTP_ECONNRESET",
    "UTP_ETIMEDOUT",
    "UTP_ON_FIREWALL",
    "UTP_ON_ACCEPT",
    "UTP_ON_CONNECT",
    "UTP_ON_ERROR",
    "UTP_ON_READ",
    "UTP_ON_OVERHEAD_STATISTICS",
    "UTP_ON_STATE_CHANGE",
    "UTP_GET_READ_BUFFER_SIZE",
    "UTP_ON_DELAY_SAMPLE",
    "UTP_GET_UDP_MTU",
    "UTP_GET_UDP_OVERHEAD",
    "UTP_GET_MILLISECONDS",
    "UTP_GET_MICROSECONDS",
    "UTP_GET_RANDOM",
    "UTP_LOG",
    "UTP_SENDTO",
    "UTP_LOG_NORMAL",
    "UTP_LOG_MTU",
    "UTP_LOG_DEBUG",
    "UTP_SNDBUF",
    "UTP_RCVBUF",
    "UTP_TARGET_DELAY",
    "UTP_ARRAY_SIZE",
    "UTP_IOV_MAX",
    "UTPKIT_MIN_RTO",
    "UTPKIT_MAX_RTO",
    "UTPKIT_MAX_SOCKETS",
    "UTPKIT_SYN_TIMEOUT",
    "UTPKIT_SYN_RETRIES",
    "UTPKIT_ACK_DELAY",
    "UTPKIT_KEEPALIVE",
    "UTPKIT_DEAD_RETRIES",
    "UTPKIT_RESET_RATE",
    "UTPKIT_MTU_PROBING",
    "UTPKIT_HALF_OPEN_MAX",
    "UTPKIT_HALF_OPEN_PER_ADDR",
    "UTPKIT_SYNACK_RATE",
    "UTPKIT_OPTION_END",
    "UTPKIT_SOCK_IDLE",
    "UTPKIT_SOCK_SYN_SENT",
    "UTPKIT_SOCK_CONNECTED",
    "UTPKIT_SOCK_ERROR",
    "UTPKIT_SOCK_CLOSING",
    "UTPKIT_SOCK_DESTROYED",
    "UTPKIT_CLASS_OTHER",
    "UTPKIT_CLASS_UTP",
    "UTPKIT_CLASS_DHT",
    "UTPKIT_CLASS_TRACKER",
]

# The engine's names of the error codes (utp_error_code_names).
ERROR_NAMES = tuple(
    (<bytes>utp_error_code_names[i]).decode("ascii") for i in range(3)
)

# Default packet budget per destination family when the caller gives none:
# 1402 is libutp's IPv4 default (fits 1500-byte Ethernet behind PPPoE and
# common tunnels); 1232 is the usual safe IPv6 UDP payload (1280-byte IPv6
# minimum MTU less 40 bytes of IPv6 and 8 of UDP).
cdef enum:
    MTU_IPV4 = 1402
    MTU_IPV6 = 1232

DEFAULT_MTU_IPV4 = MTU_IPV4
DEFAULT_MTU_IPV6 = MTU_IPV6


class ClosedError(RuntimeError):
    """Operation on a closed Context, a closed Socket, or a Socket whose
    engine socket has been destroyed."""


# --------------------------------------------------------------------------
# C-level state: written by the engine callbacks, drained by Python.
# --------------------------------------------------------------------------

# Event kinds recorded by the callbacks.
cdef enum:
    EV_ACCEPT = 1
    EV_CONNECT
    EV_WRITABLE
    EV_READABLE
    EV_EOF
    EV_ERROR
    EV_DESTROYED

class EventKind(_StrEnum):
    """The kind of a ``take_events()`` record.  Each member equals its
    string ("accept", ...), the form these events had before the Enum."""
    ACCEPT = "accept"
    CONNECT = "connect"
    WRITABLE = "writable"
    READABLE = "readable"
    EOF = "eof"
    ERROR = "error"
    DESTROYED = "destroyed"


# Indexed by the C event kind (EV_*); take_events() hands out the members.
_EVENT_NAMES = (None, EventKind.ACCEPT, EventKind.CONNECT, EventKind.WRITABLE,
                EventKind.READABLE, EventKind.EOF, EventKind.ERROR, EventKind.DESTROYED)

cdef struct Rec
cdef struct CtxState

cdef struct Event:
    int kind
    int arg
    Rec *rec

# Outgoing datagrams wait in CtxState.out (a udpio_queue of _udpio.h):
# payloads back to back in one byte buffer, each entry with its own
# destination, so the array maps one to one onto struct mmsghdr/iovec for
# sendmmsg() and a run of equal-size datagrams is one GSO send.

cdef struct Rec:
    utp_socket *sock           # NULL once the engine destroyed it (or the context closed)
    CtxState *cs
    PyObject *owner            # borrowed: the Python Socket, or NULL
    uint64_t serial
    Rec *prev
    Rec *next
    # receive buffer: bytes [rstart, rend) of rbuf are unread
    unsigned char *rbuf
    size_t rstart
    size_t rend
    size_t rcap
    size_t extra               # application-held bytes (Socket.extra_buffered)
    uint32_t pending           # queued events that point at this record
    int error                  # UTP_E* or -1
    bint connected
    bint eof
    bint destroyed
    bint user_closed
    bint orphaned              # its Python Socket has been deallocated
    bint readable_queued
    bint writable_queued
    bint have_final
    socklen_t peerlen
    sockaddr_storage peer
    utp_socket_stats final_stats
    utpkit_socket_info final_info

cdef struct CtxState:
    utp_context *ctx
    int refs                   # the Context plus one per record
    bint closed
    bint oom                   # a callback failed to allocate; raised on the next drain
    bint virtual_time
    bint listening
    int64_t now_us
    uint64_t rng
    int udp_mtu                # 0: per-family default
    uint32_t max_sockets
    uint32_t live              # records whose engine socket is alive
    uint64_t next_serial
    uint64_t dg_dropped        # datagrams lost to allocation failure
    PyObject *firewall         # borrowed (Context._firewall holds it): the admission callable, or NULL
    PyObject *fw_error         # owned: the first exception the firewall raised, not yet re-raised
    bint in_firewall           # the firewall is running: engine calls are refused
    uint32_t fw_stage          # while it runs: UTPKIT_FIREWALL_* (what a yes decides)
    uint32_t fw_conn_id        # while it runs: the SYN's connection id
    uint64_t fw_calls          # firewall calls
    uint64_t fw_refused        # SYNs it refused (exceptions included)
    uint64_t fw_errors         # exceptions it raised
    Rec *recs
    udpio_queue out            # outgoing datagrams, in order
    udpio *io                  # real-socket I/O state; NULL until first used
    Event *ev
    size_t ev_n
    size_t ev_cap


cdef inline int64_t _mono_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


cdef inline int64_t _now(CtxState *cs) noexcept nogil:
    if cs.virtual_time:
        return cs.now_us
    return _mono_us()


cdef inline uint64_t _splitmix64(uint64_t *state) noexcept nogil:
    # splitmix64 (Steele, Lea, Flood 2014): a full-period 64-bit generator
    # whose output is good enough for connection ids and jitter.
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef int _grow(void **ptr, size_t *cap, size_t need, size_t item, size_t minimum) noexcept nogil:
    """Make *ptr hold at least `need` items of `item` bytes; 0 or -1."""
    cdef size_t ncap = cap[0]
    cdef void *p
    if need <= ncap:
        return 0
    if ncap < minimum:
        ncap = minimum
    while ncap < need:
        ncap *= 2
    p = realloc(ptr[0], ncap * item)
    if p == NULL:
        return -1
    ptr[0] = p
    cap[0] = ncap
    return 0


cdef int _push_event(CtxState *cs, Rec *rec, int kind, int arg) noexcept nogil:
    if cs.ev_n == cs.ev_cap:
        if _grow(<void **>&cs.ev, &cs.ev_cap, cs.ev_n + 1, sizeof(Event), 64) < 0:
            cs.oom = True
            return -1
    cs.ev[cs.ev_n].kind = kind
    cs.ev[cs.ev_n].arg = arg
    cs.ev[cs.ev_n].rec = rec
    cs.ev_n += 1
    rec.pending += 1
    return 0


cdef Rec *_rec_new(CtxState *cs, utp_socket *sock) noexcept nogil:
    cdef Rec *rec = <Rec *>calloc(1, sizeof(Rec))
    if rec == NULL:
        return NULL
    rec.sock = sock
    rec.cs = cs
    rec.error = -1
    cs.next_serial += 1
    rec.serial = cs.next_serial
    rec.next = cs.recs
    if cs.recs != NULL:
        cs.recs.prev = rec
    cs.recs = rec
    cs.refs += 1
    cs.live += 1
    utp_set_userdata(sock, rec)
    return rec


cdef void _cs_release(CtxState *cs) noexcept nogil:
    cs.refs -= 1
    if cs.refs > 0:
        return
    udpio_queue_free(&cs.out)
    udpio_free(cs.io)
    free(cs.ev)
    free(cs)


cdef void _rec_maybe_free(Rec *rec) noexcept nogil:
    """Free the record once nothing can reach it any more."""
    cdef CtxState *cs = rec.cs
    if rec.sock != NULL or rec.owner != NULL or rec.pending != 0:
        return
    if rec.prev != NULL:
        rec.prev.next = rec.next
    else:
        cs.recs = rec.next
    if rec.next != NULL:
        rec.next.prev = rec.prev
    free(rec.rbuf)
    free(rec)
    _cs_release(cs)


cdef inline CtxState *_cs_of(utp_callback_arguments *a) noexcept nogil:
    return <CtxState *>utp_context_get_userdata(a.context)


cdef inline Rec *_rec_of(utp_callback_arguments *a) noexcept nogil:
    if a.socket == NULL:
        return NULL
    return <Rec *>utp_get_userdata(a.socket)


# ---- the callbacks: C only, no Python, no GIL -----------------------------

cdef uint64 _cb_sendto(utp_callback_arguments *a) noexcept nogil:
    cdef CtxState *cs = _cs_of(a)
    if cs == NULL or a.address == NULL:
        return 0
    if udpio_queue_push(&cs.out, a.buf, a.len, a.address, a.address_len, a.flags) < 0:
        # Behaves like a full socket buffer: the datagram is lost and the
        # protocol recovers it; counted so it shows up in stats().
        cs.dg_dropped += 1
    return 0


_FIREWALL_STAGES = {UTPKIT_FIREWALL_SYN: "syn", UTPKIT_FIREWALL_COOKIE_SYN: "cookie_syn",
                    UTPKIT_FIREWALL_COOKIE_RETURN: "cookie_return"}


cdef uint64 _cb_firewall(utp_callback_arguments *a) noexcept nogil:
    # The engine asks before it answers a SYN (or a cookie's ACK) at all:
    # a refusal here means no SYN-ACK, no socket and no "accept" event.
    cdef CtxState *cs = _cs_of(a)
    if cs == NULL or not cs.listening or cs.live >= cs.max_sockets:
        return 1
    if cs.firewall == NULL:
        return 0    # the common case: no Python, no GIL
    cs.fw_stage = a.flags
    cs.fw_conn_id = <uint32_t>a.len
    return _call_firewall(cs, a.address, a.address_len)


cdef uint64 _call_firewall(CtxState *cs, const sockaddr *sa, socklen_t salen) noexcept with gil:
    cdef bint ok = False
    cs.fw_calls += 1
    cs.in_firewall = True
    try:
        if sa != NULL:
            ok = bool((<object>cs.firewall)(_format_addr(sa, salen)))
    except BaseException as exc:
        # Refused, counted, and re-raised by the call that fed the engine
        # (process_udp / recv_batch) once the engine is done with the batch.
        cs.fw_errors += 1
        if cs.fw_error == NULL:
            Py_INCREF(exc)
            cs.fw_error = <PyObject *>exc
    finally:
        cs.in_firewall = False
    if ok:
        return 0
    cs.fw_refused += 1
    return 1


cdef int _raise_fw_error(CtxState *cs) except -1:
    cdef object exc
    if cs.fw_error != NULL:
        exc = <object>cs.fw_error
        Py_XDECREF(cs.fw_error)
        cs.fw_error = NULL
        raise exc
    return 0


cdef uint64 _cb_accept(utp_callback_arguments *a) noexcept nogil:
    cdef CtxState *cs = _cs_of(a)
    cdef Rec *rec
    cdef socklen_t alen
    if cs == NULL or a.socket == NULL:
        return 0
    rec = _rec_new(cs, a.socket)
    if rec == NULL:
        cs.oom = True
        utp_close(a.socket)
        return 0
    rec.connected = True
    if a.address != NULL:
        alen = a.address_len
        if alen > sizeof(sockaddr_storage):
            alen = sizeof(sockaddr_storage)
        memcpy(&rec.peer, a.address, alen)
        rec.peerlen = alen
    _push_event(cs, rec, EV_ACCEPT, 0)
    return 0


cdef void _on_connected(CtxState *cs, Rec *rec) noexcept nogil:
    if not rec.connected:
        rec.connected = True
        _push_event(cs, rec, EV_CONNECT, 0)


cdef uint64 _cb_connect(utp_callback_arguments *a) noexcept nogil:
    cdef Rec *rec = _rec_of(a)
    if rec != NULL:
        _on_connected(rec.cs, rec)
    return 0


cdef uint64 _cb_state(utp_callback_arguments *a) noexcept nogil:
    cdef Rec *rec = _rec_of(a)
    cdef CtxState *cs
    cdef utp_socket_stats *st
    if rec == NULL:
        return 0
    cs = rec.cs
    if a.state == UTP_STATE_CONNECT:
        _on_connected(cs, rec)
    elif a.state == UTP_STATE_WRITABLE:
        if not rec.writable_queued:
            if _push_event(cs, rec, EV_WRITABLE, 0) == 0:
                rec.writable_queued = True
    elif a.state == UTP_STATE_EOF:
        if not rec.eof:
            rec.eof = True
            _push_event(cs, rec, EV_EOF, 0)
    elif a.state == UTP_STATE_DESTROYING:
        # The last callback for this socket: keep what Python may still ask
        # for (stats, info), then forget the engine pointer for good.
        st = utp_get_stats(a.socket)
        if st != NULL and utpkit_get_socket_info(a.socket, &rec.final_info) == 0:
            memcpy(&rec.final_stats, st, sizeof(utp_socket_stats))
            rec.final_info.state = UTPKIT_SOCK_DESTROYED
            rec.have_final = True
        utp_set_userdata(a.socket, NULL)
        rec.sock = NULL
        rec.destroyed = True
        cs.live -= 1
        _push_event(cs, rec, EV_DESTROYED, 0)
    return 0


cdef uint64 _cb_error(utp_callback_arguments *a) noexcept nogil:
    cdef Rec *rec = _rec_of(a)
    if rec != NULL and rec.error < 0:
        rec.error = a.error_code
        _push_event(rec.cs, rec, EV_ERROR, a.error_code)
    return 0


cdef uint64 _cb_read(utp_callback_arguments *a) noexcept nogil:
    cdef Rec *rec = _rec_of(a)
    cdef size_t unread
    if rec == NULL or a.len == 0 or rec.user_closed:
        # After close() nobody can read it: do not hold it in memory.
        return 0
    if rec.rend + a.len > rec.rcap and rec.rstart > 0:
        unread = rec.rend - rec.rstart
        memmove(rec.rbuf, rec.rbuf + rec.rstart, unread)
        rec.rstart = 0
        rec.rend = unread
    if _grow(<void **>&rec.rbuf, &rec.rcap, rec.rend + a.len, 1, 16384) < 0:
        rec.cs.oom = True
        return 0
    memcpy(rec.rbuf + rec.rend, a.buf, a.len)
    rec.rend += a.len
    if not rec.readable_queued:
        if _push_event(rec.cs, rec, EV_READABLE, 0) == 0:
            rec.readable_queued = True
    return 0


cdef uint64 _cb_read_buffer_size(utp_callback_arguments *a) noexcept nogil:
    cdef Rec *rec = _rec_of(a)
    if rec == NULL:
        return 0
    return rec.rend - rec.rstart + rec.extra


cdef uint64 _cb_udp_mtu(utp_callback_arguments *a) noexcept nogil:
    cdef CtxState *cs = _cs_of(a)
    if cs != NULL and cs.udp_mtu > 0:
        return cs.udp_mtu
    if a.address != NULL and a.address.sa_family == AF_INET6:
        return MTU_IPV6
    return MTU_IPV4


cdef uint64 _cb_microseconds(utp_callback_arguments *a) noexcept nogil:
    return <uint64>_now(_cs_of(a))


cdef uint64 _cb_milliseconds(utp_callback_arguments *a) noexcept nogil:
    return <uint64>(_now(_cs_of(a)) // 1000)


cdef uint64 _cb_random(utp_callback_arguments *a) noexcept nogil:
    cdef CtxState *cs = _cs_of(a)
    return _splitmix64(&cs.rng)


# --------------------------------------------------------------------------
# Addresses: Python tuples as the socket module spells them <-> sockaddr.
# --------------------------------------------------------------------------

cdef int _parse_addr(object addr, sockaddr_storage *ss, socklen_t *sslen) except -1:
    cdef sockaddr_in *sin
    cdef sockaddr_in6 *sin6
    cdef bytes hostb
    cdef long port
    cdef unsigned long flowinfo = 0, scope_id = 0
    if not isinstance(addr, tuple) or len(addr) not in (2, 4):
        raise ValueError(
            f"invalid address {addr!r}: expected (host, port) or "
            f"(host, port, flowinfo, scope_id)")
    host = addr[0]
    if not isinstance(host, str):
        raise ValueError(f"invalid address {addr!r}: host must be a str holding a literal IP address")
    if "\0" in host:
        raise ValueError(f"invalid address {addr!r}: NUL in host")
    try:
        port = addr[1]
    except (TypeError, OverflowError):
        raise ValueError(f"invalid address {addr!r}: port must be an int") from None
    if not (0 <= port <= 65535):
        raise ValueError(f"invalid address {addr!r}: port out of range 0..65535")
    hostb = (<str>host).encode("ascii", "replace")
    memset(ss, 0, sizeof(sockaddr_storage))
    if len(addr) == 4 or ":" in host:
        if len(addr) == 4:
            try:
                flowinfo = addr[2]
                scope_id = addr[3]
            except (TypeError, OverflowError):
                raise ValueError(
                    f"invalid address {addr!r}: flowinfo and scope_id must be "
                    f"32-bit unsigned ints") from None
            if flowinfo > 0xFFFFFFFF or scope_id > 0xFFFFFFFF:
                raise ValueError(f"invalid address {addr!r}: flowinfo or scope_id out of range")
        sin6 = <sockaddr_in6 *>ss
        if inet_pton(AF_INET6, hostb, &sin6.sin6_addr) != 1:
            raise ValueError(f"invalid address {addr!r}: {host!r} is not a literal IPv6 address")
        sin6.sin6_family = AF_INET6
        sin6.sin6_port = htons(<unsigned short>port)
        sin6.sin6_flowinfo = htonl(<unsigned int>flowinfo)
        sin6.sin6_scope_id = <unsigned int>scope_id
        sslen[0] = sizeof(sockaddr_in6)
    else:
        sin = <sockaddr_in *>ss
        if inet_pton(AF_INET, hostb, &sin.sin_addr) != 1:
            raise ValueError(
                f"invalid address {addr!r}: {host!r} is not a literal IPv4 or IPv6 "
                f"address (host names are not resolved here)")
        sin.sin_family = AF_INET
        sin.sin_port = htons(<unsigned short>port)
        sslen[0] = sizeof(sockaddr_in)
    return 0


cdef object _format_addr(const sockaddr *sa, socklen_t salen):
    cdef char buf[64]
    cdef const sockaddr_in *sin
    cdef const sockaddr_in6 *sin6
    if sa == NULL or salen == 0:
        return None
    if sa.sa_family == AF_INET and salen >= sizeof(sockaddr_in):
        sin = <const sockaddr_in *>sa
        inet_ntop(AF_INET, &sin.sin_addr, buf, sizeof(buf))
        return ((<bytes>buf).decode("ascii"), ntohs(sin.sin_port))
    if sa.sa_family == AF_INET6 and salen >= sizeof(sockaddr_in6):
        sin6 = <const sockaddr_in6 *>sa
        inet_ntop(AF_INET6, &sin6.sin6_addr, buf, sizeof(buf))
        return ((<bytes>buf).decode("ascii"), ntohs(sin6.sin6_port),
                ntohl(sin6.sin6_flowinfo), sin6.sin6_scope_id)
    return None


def udp_blast_send(int fd, addr, int size, long count) -> int:
    """Benchmark helper: send `count` datagrams of `size` zero bytes to
    `addr` with sendmmsg, as fast as the socket takes them (the raw-UDP
    ceiling of python -m utp.bench).  Returns how many were sent."""
    cdef sockaddr_storage ss
    cdef socklen_t sslen
    cdef long r
    _parse_addr(addr, &ss, &sslen)
    with nogil:
        r = udpio_blast_send(fd, <const sockaddr *>&ss, sslen, size, count)
    if r < 0:
        raise ValueError(f"bad datagram size {size}")
    return r


def udp_blast_receive(int fd, long count, double idle_timeout=1.0) -> tuple:
    """Benchmark helper: receive with recvmmsg until `count` datagrams came
    or none came for `idle_timeout` seconds.  Returns (datagrams, bytes,
    seconds from the first to the last)."""
    cdef long long nbytes = 0
    cdef double seconds = 0
    cdef long got
    cdef int idle_ms = <int>(idle_timeout * 1000)
    with nogil:
        got = udpio_blast_recv(fd, count, idle_ms, &nbytes, &seconds)
    return got, nbytes, seconds


def classify(data) -> int:
    """Which protocol a datagram belongs to: CLASS_UTP, CLASS_DHT,
    CLASS_TRACKER or CLASS_OTHER (utpkit_classify; looks at the first bytes)."""
    cdef Py_buffer view
    cdef int r
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        r = utpkit_classify(<const byte *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return r


cdef inline int _fileno(object fd) except -1:
    if type(fd) is not int:
        fd = fd.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd!r}")
    return fd


cdef object _errno_name(int e):
    if e == 0:
        return "other"
    return _errno.errorcode.get(e, f"errno{e}")


cdef int _flush(CtxState *cs, udpio *io, int fd) noexcept nogil:
    """udpio_send, then the reports it collected to the engine; again while
    that queued new datagrams and the socket takes them (bounded)."""
    cdef int r = 0, rounds
    for rounds in range(4):
        r = udpio_send(io, &cs.out, fd)
        if udpio_feedback(io, cs.ctx) == 0 or r != 0 or cs.out.n == 0:
            return r
    return <int>cs.out.n


# --------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------

@cython.no_gc_clear
@cython.final
cdef class Context:
    """One uTP engine context (utp_init(2)): the sockets of one UDP port.

    Sans-I/O: feed received datagrams to ``process_udp()``, send what
    ``take_datagrams()`` returns, call ``check_timeouts()`` when
    ``next_timeout()`` says so and ``issue_deferred_acks()`` after each batch
    of received datagrams, and act on ``take_events()``.  Nothing is sent or
    read by the Context itself.

    Or let it do the socket work: ``setup_socket(fd)`` once, then
    ``recv_batch(fd)`` when the socket is readable and ``send_batch(fd)``
    to flush (the batched real-socket hot path; no Python per datagram).

    ``virtual_time=True`` makes the engine's clock the settable attribute
    ``now_us`` (integer microseconds, never moving backwards); otherwise the
    engine reads CLOCK_MONOTONIC.  ``seed`` makes the engine's random numbers
    (connection ids, initial sequence numbers) reproducible.  ``udp_mtu``
    overrides the packet budget the engine is told for every destination
    (default: DEFAULT_MTU_IPV4 / DEFAULT_MTU_IPV6 by address family).

    Resource handling: ``close()`` destroys the engine and every socket in
    it; a Context dropped without ``close()`` warns (ResourceWarning) and
    closes itself.  A Socket that the application closed is kept alive by
    its Context until its "destroyed" event has been drained, and every
    Socket keeps its Context alive.

    Threads: nothing here locks; use one Context (and its Sockets) from one
    thread at a time.  recv_batch(), send_batch() and sendto() release the
    GIL around their system calls and engine calls, so other threads run
    meanwhile, but they must not touch this Context then.
    """

    cdef CtxState *_cs
    cdef dict _keep
    # One-entry caches: a peer usually sends many datagrams in a row.
    cdef object _in_addr_obj
    cdef sockaddr_storage _in_addr
    cdef socklen_t _in_addrlen
    cdef object _out_addr_obj
    cdef sockaddr_storage _out_addr
    cdef socklen_t _out_addrlen
    cdef object _firewall

    def __cinit__(self, *, bint virtual_time=False, seed=None, udp_mtu=None):
        cdef CtxState *cs
        cdef utp_context *ctx
        cdef int mtu = 0
        if udp_mtu is not None:
            mtu = udp_mtu
            if not (68 <= mtu <= 65507):
                raise ValueError(f"udp_mtu {udp_mtu!r} out of range 68..65507")
        if seed is None:
            seed = int.from_bytes(_os.urandom(8), "little")
        elif not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, not {type(seed).__name__}")
        self._keep = {}
        cs = <CtxState *>calloc(1, sizeof(CtxState))
        if cs == NULL:
            raise MemoryError()
        ctx = utp_init(2)
        if ctx == NULL:
            free(cs)
            raise MemoryError("utp_init failed")
        cs.ctx = ctx
        cs.refs = 1
        cs.virtual_time = virtual_time
        cs.udp_mtu = mtu
        cs.rng = <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)
        self._cs = cs
        utp_context_set_userdata(ctx, cs)
        utp_set_callback(ctx, UTP_SENDTO, _cb_sendto)
        utp_set_callback(ctx, UTP_ON_FIREWALL, _cb_firewall)
        utp_set_callback(ctx, UTP_ON_ACCEPT, _cb_accept)
        utp_set_callback(ctx, UTP_ON_CONNECT, _cb_connect)
        utp_set_callback(ctx, UTP_ON_STATE_CHANGE, _cb_state)
        utp_set_callback(ctx, UTP_ON_ERROR, _cb_error)
        utp_set_callback(ctx, UTP_ON_READ, _cb_read)
        utp_set_callback(ctx, UTP_GET_READ_BUFFER_SIZE, _cb_read_buffer_size)
        utp_set_callback(ctx, UTP_GET_UDP_MTU, _cb_udp_mtu)
        utp_set_callback(ctx, UTP_GET_MICROSECONDS, _cb_microseconds)
        utp_set_callback(ctx, UTP_GET_MILLISECONDS, _cb_milliseconds)
        utp_set_callback(ctx, UTP_GET_RANDOM, _cb_random)
        cs.max_sockets = <uint32_t>utp_context_get_option(ctx, UTPKIT_MAX_SOCKETS)

    def __dealloc__(self):
        if self._cs == NULL:
            return
        self._close()
        try:
            _warnings.warn("unclosed utp.Context (call close())", ResourceWarning)
        except BaseException:
            pass

    cdef inline CtxState *_live(self) except NULL:
        if self._cs == NULL:
            raise ClosedError("the Context is closed")
        if self._cs.in_firewall:
            raise RuntimeError("the Context's firewall must not call the engine "
                               "(it runs in the middle of a received datagram)")
        if self._cs.oom:
            self._cs.oom = False
            raise MemoryError("an engine callback failed to allocate memory; "
                              "events or received data were lost")
        return self._cs

    cdef void _close(self) noexcept:
        cdef CtxState *cs = self._cs
        cdef Rec *rec
        cdef Rec *nxt
        if cs == NULL:
            return
        self._cs = NULL
        cs.closed = True
        cs.firewall = NULL
        self._firewall = None
        Py_XDECREF(cs.fw_error)
        cs.fw_error = NULL
        # DESTROYING callbacks fired by utp_destroy are recorded like any
        # other and then dropped with the rest of the queue.
        utp_destroy(cs.ctx)
        cs.ctx = NULL
        cs.ev_n = 0
        udpio_queue_clear(&cs.out)
        udpio_free(cs.io)
        cs.io = NULL
        rec = cs.recs
        while rec != NULL:
            nxt = rec.next
            rec.pending = 0
            if rec.sock != NULL:
                rec.sock = NULL
                cs.live -= 1
            rec.readable_queued = False
            rec.writable_queued = False
            _rec_maybe_free(rec)
            rec = nxt
        keep = self._keep
        self._keep = {}
        if keep:
            keep.clear()  # may free the records of closed Sockets
        _cs_release(cs)

    def close(self) -> None:
        """Destroy the engine and all its sockets (utp_destroy).  Idempotent.
        Queued datagrams and events are discarded; every Socket of this
        Context raises ClosedError from then on."""
        self._close()

    @property
    def closed(self) -> bool:
        return self._cs == NULL

    # ---- clock ----------------------------------------------------------

    @property
    def virtual_time(self) -> bool:
        return self._live().virtual_time

    @property
    def now_us(self) -> int:
        """The engine's clock in microseconds.  Settable (forward only) when
        the Context was made with virtual_time=True."""
        return _now(self._live())

    @now_us.setter
    def now_us(self, value):
        cdef CtxState *cs = self._live()
        cdef int64_t v = value
        if not cs.virtual_time:
            raise ValueError("now_us is settable only with virtual_time=True")
        if v < cs.now_us:
            raise ValueError(f"now_us must not move backwards ({v} < {cs.now_us})")
        cs.now_us = v

    # ---- accepting --------------------------------------------------------

    @property
    def listening(self) -> bool:
        """Accept incoming connections?  False (the default) refuses every
        SYN; True accepts while fewer than max_sockets sockets are alive."""
        return self._live().listening

    @listening.setter
    def listening(self, bint value):
        self._live().listening = value

    @property
    def firewall(self):
        """A callable deciding, before the engine answers a SYN at all,
        whether to accept a connection from the peer's address (given as
        ``(host, port)`` or ``(host, port, flowinfo, scope_id)``): false
        refuses it (a RESET, no SYN-ACK, no socket, no "accept" event,
        counted in stats() as "firewall_refused" and the engine's
        "syn_refused").  None (the default) accepts every SYN while
        ``listening``, without entering Python.

        It runs inside process_udp() / recv_batch(), so it must not call
        this Context or its Sockets (RuntimeError).  An exception it raises
        refuses the SYN, is counted ("firewall_errors") and is re-raised by
        that process_udp() / recv_batch() call after the whole batch was
        handled."""
        self._live()
        return self._firewall

    @firewall.setter
    def firewall(self, value):
        cdef CtxState *cs = self._live()
        if value is not None and not callable(value):
            raise TypeError(f"firewall must be callable or None, not {type(value).__name__}")
        self._firewall = value
        cs.firewall = NULL if value is None else <PyObject *>value

    @property
    def firewall_query(self):
        """While the firewall runs: ``(stage, syn_conn_id)``, what its answer
        decides and which SYN it is about; None at any other time.

        ``stage`` is "syn" (yes creates the connection now), "cookie_syn"
        (the engine is past its half-open bounds and answers with a
        stateless SYN cookie: yes sends the cookie, nothing is created) or
        "cookie_return" (a cookie came back: yes creates the connection).
        So under SYN-cookie load one connection is asked about twice; a
        firewall admitting only so many connections counts the "syn" and
        "cookie_return" calls, and tells a SYN's retransmission and its
        cookie's return from another SYN of the same peer by
        ``syn_conn_id``."""
        cdef CtxState *cs = self._cs   # not _live(): it refuses calls from the firewall
        if cs == NULL or not cs.in_firewall:
            return None
        return (_FIREWALL_STAGES.get(cs.fw_stage, "syn"), cs.fw_conn_id)

    @property
    def max_sockets(self) -> int:
        """Live sockets above which incoming SYNs are refused (the
        UTPKIT_MAX_SOCKETS option; setting one sets the other)."""
        return self._live().max_sockets

    @max_sockets.setter
    def max_sockets(self, int value):
        self.set_option(UTPKIT_MAX_SOCKETS, value)

    # ---- options ----------------------------------------------------------

    def set_option(self, int opt, int value) -> None:
        """utp_context_set_option; ValueError if the engine rejects it."""
        cdef CtxState *cs = self._live()
        if utp_context_set_option(cs.ctx, opt, value) < 0:
            raise ValueError(f"engine rejected context option {opt} = {value}")
        if opt == UTPKIT_MAX_SOCKETS:
            cs.max_sockets = <uint32_t>value

    def get_option(self, int opt) -> int:
        """utp_context_get_option; ValueError for an unknown option."""
        cdef CtxState *cs = self._live()
        cdef int r = utp_context_get_option(cs.ctx, opt)
        if r < 0:
            raise ValueError(f"unknown context option {opt}")
        return r

    # ---- input ------------------------------------------------------------

    cdef int _in_address(self, object addr) except -1:
        if addr is self._in_addr_obj or (self._in_addr_obj is not None
                                         and addr == self._in_addr_obj):
            return 0
        self._in_addr_obj = None
        _parse_addr(addr, &self._in_addr, &self._in_addrlen)
        self._in_addr_obj = addr
        return 0

    def process_udp(self, data, addr) -> bool:
        """Hand one received datagram to the engine (utp_process_udp).
        True if it was uTP (consumed), False if not: the caller keeps it."""
        cdef CtxState *cs = self._live()
        cdef Py_buffer view
        cdef int r
        self._in_address(addr)
        if type(data) is bytes:
            r = utp_process_udp(cs.ctx, <const byte *>PyBytes_AS_STRING(data),
                                <size_t>PyBytes_GET_SIZE(data),
                                <const sockaddr *>&self._in_addr, self._in_addrlen)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                r = utp_process_udp(cs.ctx, <const byte *>view.buf, <size_t>view.len,
                                    <const sockaddr *>&self._in_addr, self._in_addrlen)
            finally:
                PyBuffer_Release(&view)
        _raise_fw_error(cs)
        return r != 0

    def process_icmp_error(self, data, addr) -> bool:
        """An ICMP error quoting `data`, a datagram we sent to `addr`
        (utp_process_icmp_error).  True if it matched a socket."""
        cdef CtxState *cs = self._live()
        cdef Py_buffer view
        cdef int r
        cdef sockaddr_storage ss
        cdef socklen_t sslen
        _parse_addr(addr, &ss, &sslen)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            r = utp_process_icmp_error(cs.ctx, <const byte *>view.buf, <size_t>view.len,
                                       <const sockaddr *>&ss, sslen)
        finally:
            PyBuffer_Release(&view)
        return r != 0

    def process_icmp_fragmentation(self, data, addr, int next_hop_mtu) -> bool:
        """ICMP "fragmentation needed" quoting `data`, sent to `addr`, with the
        path's next-hop MTU (utp_process_icmp_fragmentation)."""
        cdef CtxState *cs = self._live()
        cdef Py_buffer view
        cdef int r
        cdef sockaddr_storage ss
        cdef socklen_t sslen
        if not (0 <= next_hop_mtu <= 65535):
            raise ValueError(f"next_hop_mtu {next_hop_mtu} out of range 0..65535")
        _parse_addr(addr, &ss, &sslen)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            r = utp_process_icmp_fragmentation(cs.ctx, <const byte *>view.buf,
                                               <size_t>view.len, <const sockaddr *>&ss,
                                               sslen, <uint16>next_hop_mtu)
        finally:
            PyBuffer_Release(&view)
        return r != 0

    def check_timeouts(self) -> None:
        """Run the engine's timers (utp_check_timeouts)."""
        utp_check_timeouts(self._live().ctx)

    def issue_deferred_acks(self) -> None:
        """Send the ACKs held back while a batch of datagrams was processed
        (utp_issue_deferred_acks); call after each receive batch."""
        utp_issue_deferred_acks(self._live().ctx)

    def next_timeout(self):
        """Microseconds until check_timeouts() is due (0: now), or None when
        no timer is armed (utpkit_next_timeout)."""
        cdef int64_t t = utpkit_next_timeout(self._live().ctx)
        if t < 0:
            return None
        return t

    def timewait_linger(self):
        """Microseconds to keep running before leaving, so connections that
        ended with the peer's FIN can ACK it again if our ACK was lost, or
        None when there are none (utpkit_timewait_linger)."""
        cdef int64_t t = utpkit_timewait_linger(self._live().ctx)
        if t < 0:
            return None
        return t

    # ---- sockets ----------------------------------------------------------

    def create_socket(self) -> Socket:
        """A new, unconnected engine socket (utp_create_socket)."""
        cdef CtxState *cs = self._live()
        cdef utp_socket *s = utp_create_socket(cs.ctx)
        cdef Rec *rec
        if s == NULL:
            raise RuntimeError("the engine refused to create a socket "
                               "(UTPKIT_MAX_SOCKETS reached?)")
        rec = _rec_new(cs, s)
        if rec == NULL:
            utp_close(s)
            raise MemoryError()
        return _wrap(rec, self)

    def connect(self, addr) -> Socket:
        """create_socket() and connect(addr) in one step."""
        cdef Socket sock = self.create_socket()
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    # ---- output -----------------------------------------------------------

    @property
    def pending_datagrams(self) -> int:
        """Datagrams waiting in the outgoing array."""
        return self._live().out.n

    def take_datagrams(self) -> list:
        """Remove and return every datagram the engine sent since the last
        call, in order, as (data, address, flags) tuples; flags may contain
        UDP_DONTFRAG."""
        cdef CtxState *cs = self._live()
        cdef size_t i, n = cs.out.n
        cdef udpio_dgram *d
        cdef list out = []
        if n == 0:
            return out
        for i in range(n):
            d = &cs.out.dg[i]
            if not (self._out_addr_obj is not None and d.addrlen == self._out_addrlen
                    and memcmp(&d.addr, &self._out_addr, d.addrlen) == 0):
                self._out_addr_obj = _format_addr(<const sockaddr *>&d.addr, d.addrlen)
                memcpy(&self._out_addr, &d.addr, d.addrlen)
                self._out_addrlen = d.addrlen
            out.append((PyBytes_FromStringAndSize(<char *>cs.out.data + d.offset, d.length),
                        self._out_addr_obj, d.flags))
        udpio_queue_clear(&cs.out)
        return out

    def take_events(self) -> list:
        """Remove and return what happened since the last call, in order, as
        (kind, socket, arg) tuples, ``kind`` an :class:`EventKind`:

        - ("accept", sock, peer_address): a new incoming connection (it is
          connected and writable at once; no "connect" follows)
        - ("connect", sock, None): an outgoing connection completed (writable)
        - ("writable", sock, None): the socket takes more data again
        - ("readable", sock, None): new data was added to the socket's receive
          buffer (once per drain per socket)
        - ("eof", sock, None): the peer finished sending; everything before
          its FIN is in the buffer
        - ("error", sock, code): ECONNREFUSED, ECONNRESET or ETIMEDOUT
        - ("destroyed", sock, None): the engine freed the socket; the last
          event for it

        Events of a Socket the application already dropped are discarded.
        """
        cdef CtxState *cs = self._live()
        cdef Event *ev
        cdef size_t i, cap, n = cs.ev_n
        cdef Rec *rec
        cdef int kind
        cdef list out = []
        cdef Socket sock
        if n == 0:
            return out
        # Detach the queue first: dropping a Python reference below can run a
        # Socket's __dealloc__, which calls into the engine and so may record
        # new events; those go to a fresh queue, not to the one being read.
        ev = cs.ev
        cap = cs.ev_cap
        cs.ev = NULL
        cs.ev_n = 0
        cs.ev_cap = 0
        try:
            for i in range(n):
                rec = ev[i].rec
                kind = ev[i].kind
                rec.pending -= 1
                if kind == EV_READABLE:
                    rec.readable_queued = False
                elif kind == EV_WRITABLE:
                    rec.writable_queued = False
                if rec.owner == NULL:
                    if kind != EV_ACCEPT or rec.orphaned:
                        _rec_maybe_free(rec)
                        continue
                    sock = _wrap(rec, self)
                else:
                    sock = <Socket>rec.owner
                if kind == EV_ACCEPT:
                    arg = _format_addr(<const sockaddr *>&rec.peer, rec.peerlen)
                elif kind == EV_ERROR:
                    arg = ev[i].arg
                else:
                    arg = None
                out.append((_EVENT_NAMES[kind], sock, arg))
                if kind == EV_DESTROYED:
                    self._keep.pop(rec.serial, None)
        finally:
            if cs.ev == NULL:
                cs.ev = ev
                cs.ev_cap = cap
            else:
                free(ev)
        return out

    # ---- the real-socket hot path (_udpio.c) ----------------------------
    #
    # The Endpoint owns one non-blocking UDP socket and calls these with its
    # file descriptor; no Python runs per datagram.  Its receive task does
    #
    #     await trio.lowlevel.wait_readable(sock)
    #     ctx.recv_batch(fd)            # uTP -> engine; the rest -> take_other()
    #     ctx.issue_deferred_acks()
    #     events = ctx.take_events(); others = ctx.take_other()
    #     ... then flushes: while ctx.send_batch(fd): await wait_writable(sock)
    #
    # and check_timeouts() runs when next_timeout() says so, followed by the
    # same flush.  After setup_socket(), read the socket only through
    # recv_batch(): with GRO enabled the kernel hands over coalesced
    # datagrams that only recv_batch() splits.

    cdef udpio *_udpio(self) except NULL:
        cdef CtxState *cs = self._live()
        if cs.io == NULL:
            cs.io = udpio_new()
            if cs.io == NULL:
                raise MemoryError()
        return cs.io

    def setup_socket(self, fd, *, rcvbuf=None, sndbuf=None, bint force=False,
                     bint gso=True, bint gro=True) -> dict:
        """Prepare the UDP socket `fd` (an int or an object with fileno())
        for recv_batch()/send_batch(); call once per socket.

        Turns on IP_RECVERR (and IPV6_RECVERR on an AF_INET6 socket) so ICMP
        errors reach the engine; asks for socket buffers of `rcvbuf` /
        `sndbuf` bytes, by default as large as net.core.rmem_max / wmem_max
        allow (capped at 8 MiB), with SO_RCVBUFFORCE/SO_SNDBUFFORCE first if
        `force` (needs CAP_NET_ADMIN); turns on SO_RXQ_OVFL (the kernel's drop
        count, see io_stats()); uses UDP GSO for sending if `gso` and the
        kernel has it, UDP GRO for receiving if `gro` and the kernel has it.

        Returns what the kernel granted: {"rcvbuf", "sndbuf"} as getsockopt
        reports them (the kernel doubles a request for its bookkeeping),
        {"rmem_max", "wmem_max"} (-1 if unreadable), "gso" (GSO will be
        used), "gso_supported", "gro", "recverr" and "family".
        OSError if `fd` is not a UDP socket."""
        cdef udpio *io = self._udpio()
        cdef udpio_setup_info info
        cdef int cfd = _fileno(fd)
        cdef int rb = -1, sb = -1, r
        if rcvbuf is not None:
            if not (0 <= rcvbuf <= 0x7fffffff):
                raise ValueError(f"rcvbuf {rcvbuf!r} out of range")
            rb = rcvbuf
        if sndbuf is not None:
            if not (0 <= sndbuf <= 0x7fffffff):
                raise ValueError(f"sndbuf {sndbuf!r} out of range")
            sb = sndbuf
        r = udpio_setup(io, cfd, rb, sb, force, gso, gro, &info)
        if r < 0:
            raise OSError(-r, _os.strerror(-r))
        return {
            "rcvbuf": info.rcvbuf,
            "sndbuf": info.sndbuf,
            "rmem_max": info.rmem_max,
            "wmem_max": info.wmem_max,
            "gso": bool(info.gso),
            "gso_supported": bool(info.gso_supported),
            "gro": bool(info.gro),
            "recverr": bool(info.recverr),
            "family": info.family,
        }

    def recv_batch(self, fd, int budget=256) -> int:
        """Read up to `budget` datagrams from the non-blocking socket `fd`
        with recvmmsg, until it has no more; the GIL is released meanwhile.

        uTP datagrams go straight to the engine (utp_process_udp); DHT,
        tracker and unrecognised ones wait for take_other(); errors on the
        socket's error queue become utp_process_icmp_error (port
        unreachable) and utp_process_icmp_fragmentation (fragmentation
        needed / packet too big) calls.  IPv4-mapped source addresses of a
        dual-stack socket are reported as IPv4.

        Returns the number of datagrams read (0 if none was waiting).
        Afterwards call issue_deferred_acks(), then take_events() and
        take_other(), then send_batch().  OSError only if the socket is
        unusable (EBADF, ENOTSOCK, ...); ICMP-caused errors are consumed."""
        cdef CtxState *cs = self._live()
        cdef udpio *io = self._udpio()
        cdef int cfd = _fileno(fd)
        cdef int r
        if budget <= 0:
            return 0
        with nogil:
            r = udpio_recv(io, cs.ctx, cfd, budget)
        _raise_fw_error(cs)
        if r < 0:
            raise OSError(-r, _os.strerror(-r))
        return r

    def send_batch(self, fd) -> int:
        """Send the queued datagrams (the engine's and sendto()'s, in order)
        with sendmmsg, using UDP GSO for runs of equal-size datagrams to one
        destination; the GIL is released meanwhile.

        Returns 0 when the queue is empty, or how many datagrams remain
        because the socket buffer is full (EAGAIN, or ENOBUFS from a full
        device queue): wait until `fd` is writable and call again.  A full
        buffer is never reported to the engine as loss.  Any other error
        drops that datagram and is counted (io_stats()["send_errors"]); a
        first failure is retried once, since it may be an earlier ICMP
        report's.  DONTFRAG datagrams go out with DF set; one refused as too
        big is reported to the engine like ICMP "fragmentation needed".
        OSError only if the socket is unusable (EBADF, ENOTSOCK, ...)."""
        cdef CtxState *cs = self._live()
        cdef udpio *io = self._udpio()
        cdef int cfd = _fileno(fd)
        cdef int r
        with nogil:
            r = _flush(cs, io, cfd)
        if r < 0:
            raise OSError(-r, _os.strerror(-r))
        return r

    def sendto(self, fd, data, addr) -> bool:
        """Send one datagram of another protocol (DHT, tracker) from `fd`,
        in order after the engine's queued datagrams: it joins the same
        queue, which is then flushed (send_batch()).

        True when the queue went out (this datagram was handed to the
        kernel, or dropped for an error counted in io_stats()); False when
        it waits behind a full socket buffer: call send_batch() once `fd`
        is writable."""
        cdef CtxState *cs = self._live()
        cdef udpio *io = self._udpio()
        cdef int cfd = _fileno(fd)
        cdef sockaddr_storage ss
        cdef socklen_t sslen
        cdef Py_buffer view
        cdef int r
        _parse_addr(addr, &ss, &sslen)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len > 65527:
                raise ValueError(f"datagram of {view.len} bytes is larger than UDP allows")
            r = udpio_queue_push(&cs.out, view.buf, <size_t>view.len,
                                 <const sockaddr *>&ss, sslen, 0)
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise MemoryError()
        with nogil:
            r = _flush(cs, io, cfd)
        if r < 0:
            raise OSError(-r, _os.strerror(-r))
        return r == 0

    def take_other(self) -> list:
        """Remove and return the non-uTP datagrams recv_batch() read, in
        order, as (class, data, address) tuples; class is CLASS_DHT,
        CLASS_TRACKER or CLASS_OTHER (utpkit_classify).  The queue holds at
        most 65536 datagrams / 16 MiB; more are counted as other_dropped."""
        cdef CtxState *cs = self._live()
        cdef udpio_queue *q
        cdef udpio_dgram *d
        cdef size_t i
        cdef list out = []
        cdef object addr = None
        cdef udpio_dgram *prev = NULL
        if cs.io == NULL:
            return out
        q = udpio_other(cs.io)
        for i in range(q.n):
            d = &q.dg[i]
            if not (prev != NULL and prev.addrlen == d.addrlen
                    and memcmp(&prev.addr, &d.addr, d.addrlen) == 0):
                addr = _format_addr(<const sockaddr *>&d.addr, d.addrlen)
            prev = d
            out.append((<int>d.flags,
                        PyBytes_FromStringAndSize(<char *>q.data + d.offset, d.length),
                        addr))
        if q.data_cap > (4 << 20):
            udpio_queue_free(q)  # a burst's memory is not kept
        else:
            udpio_queue_clear(q)
        return out

    def take_unreachable(self) -> list:
        """Remove and return the addresses that answered a datagram of ours
        with ICMP port unreachable when no uTP connection claimed the report
        (DHT and tracker destinations), oldest first; the last 32 are kept
        between calls."""
        cdef CtxState *cs = self._live()
        cdef sockaddr_storage addrs[32]
        cdef socklen_t lens[32]
        cdef int i, n
        if cs.io == NULL:
            return []
        n = udpio_take_unreachable(cs.io, addrs, lens, 32)
        return [_format_addr(<const sockaddr *>&addrs[i], lens[i]) for i in range(n)]

    def io_stats(self) -> dict:
        """Counters of the socket hot path: system calls, datagrams and
        bytes each way, received datagrams per class, truncated and
        kernel-dropped (SO_RXQ_OVFL) datagrams, error-queue messages and the
        ICMP reports passed to the engine, EAGAIN/ENOBUFS waits, GSO/GRO
        batches, and "recv_errors"/"send_errors": {errno name: count}.
        "queued" is the datagrams waiting to be sent, "other_queued" the
        ones waiting for take_other()."""
        cdef CtxState *cs = self._live()
        cdef udpio *io = self._udpio()
        cdef dict d = udpio_get_stats(io)[0]
        cdef int e, direction
        cdef uint64_t n
        for direction, key in ((UDPIO_RECV, "recv_errors"), (UDPIO_SEND, "send_errors")):
            errs = {}
            for e in range(UDPIO_NERRS):
                n = udpio_get_err(io, direction, e)
                if n:
                    errs[_errno_name(e)] = n
            d[key] = errs
        d["queued"] = cs.out.n
        d["other_queued"] = udpio_other(io).n
        return d

    # ---- statistics -------------------------------------------------------

    def stats(self) -> dict:
        """utp_context_stats (packet counts by size bucket, as lists
        "nraw_recv" and "nraw_send") and every utpkit_counters field, plus
        "sendto_dropped" (datagrams lost because the binding ran out of
        memory) and "live_sockets" (the binding's count)."""
        cdef CtxState *cs = self._live()
        cdef utp_context_stats *st = utp_get_context_stats(cs.ctx)
        cdef const utpkit_counters *c = utpkit_get_counters(cs.ctx)
        d = {
            "nraw_recv": [st._nraw_recv[i] for i in range(5)],
            "nraw_send": [st._nraw_send[i] for i in range(5)],
        }
        if c != NULL:
            d.update(c[0])
        d["sendto_dropped"] = cs.dg_dropped
        d["firewall_calls"] = cs.fw_calls
        d["firewall_refused"] = cs.fw_refused
        d["firewall_errors"] = cs.fw_errors
        d["live_sockets"] = cs.live
        return d

    def __repr__(self):
        if self._cs == NULL:
            return "<utp.Context closed>"
        return (f"<utp.Context sockets={self._cs.live}"
                f"{' listening' if self._cs.listening else ''}"
                f"{' virtual_time' if self._cs.virtual_time else ''}>")



include "_socket.pxi"
