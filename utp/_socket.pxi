# utp/_socket.pxi -- the Socket class of utp._utp, included by _utp.pyx
# (Cython `include`: it shares the module's C declarations and helpers).

# --------------------------------------------------------------------------
# Socket
# --------------------------------------------------------------------------

cdef Socket _wrap(Rec *rec, Context ctx):
    cdef Socket sock = Socket.__new__(Socket)
    sock._rec = rec
    sock._ctx = ctx
    rec.owner = <PyObject *>sock
    return sock


@cython.final
cdef class Socket:
    """One uTP connection of a Context.  Made by Context.create_socket(),
    Context.connect() or an "accept" event; never instantiated directly.

    Received payload collects in a C buffer until ``read()``; the engine
    advertises a window shrunk by ``readable + extra_buffered``, so a slow
    reader slows the sender.

    Resource handling: ``close()`` starts the orderly close (utp_close); the
    Socket stays usable for ``stats()``/``info()`` and reading leftover data
    until its "destroyed" event.  A Socket garbage-collected without
    ``close()`` warns (ResourceWarning) and is closed.
    """

    cdef Rec *_rec
    # A strong reference, so a Context lives as long as any of its Sockets.
    # Nothing below needs it to free the C record: records are reference
    # counted in C, so the order in which the GC breaks a cycle is harmless.
    cdef Context _ctx
    cdef public object userdata

    def __init__(self, *args, **kwargs):
        raise TypeError("utp.Socket cannot be created directly; "
                        "use Context.create_socket() or Context.connect()")

    def __dealloc__(self):
        cdef Rec *rec = self._rec
        cdef bint warn = False
        cdef uint64_t serial
        if rec == NULL:
            return
        self._rec = NULL
        rec.owner = NULL
        rec.orphaned = True
        serial = rec.serial
        if rec.sock != NULL and not rec.user_closed and not rec.cs.closed:
            warn = True
            rec.user_closed = True
            utp_close(rec.sock)
        _rec_maybe_free(rec)
        if warn:
            try:
                _warnings.warn(f"unclosed utp.Socket #{serial} (call close())",
                               ResourceWarning)
            except BaseException:
                pass

    cdef inline Rec *_usable(self) except NULL:
        """The record of a socket whose engine socket is alive and open."""
        cdef Rec *rec = self._rec
        if rec == NULL:
            raise ClosedError("uninitialised utp.Socket")
        if rec.cs.closed:
            raise ClosedError("the socket's Context is closed")
        if rec.cs.in_firewall:
            raise RuntimeError("the Context's firewall must not call the engine")
        if rec.user_closed:
            raise ClosedError("the socket is closed")
        if rec.sock == NULL:
            raise ClosedError("the socket was destroyed by the engine")
        return rec

    cdef inline Rec *_any(self) except NULL:
        cdef Rec *rec = self._rec
        if rec == NULL:
            raise ClosedError("uninitialised utp.Socket")
        if rec.cs.closed:
            raise ClosedError("the socket's Context is closed")
        return rec

    # ---- connection -------------------------------------------------------

    def connect(self, addr) -> None:
        """Start connecting to addr (utp_connect sends the SYN); a "connect"
        or "error" event follows."""
        cdef Rec *rec = self._usable()
        cdef sockaddr_storage ss
        cdef socklen_t sslen
        _parse_addr(addr, &ss, &sslen)
        if utp_connect(rec.sock, <const sockaddr *>&ss, sslen) < 0:
            raise ValueError(f"engine refused to connect to {addr!r} "
                             f"(socket already connected?)")
        memcpy(&rec.peer, &ss, sslen)
        rec.peerlen = sslen

    def write(self, data) -> int:
        """Queue bytes for sending (utp_write).  Returns how many the engine
        accepted: 0 when its send buffer is full; a "writable" event follows
        when it takes more."""
        cdef Rec *rec = self._usable()
        cdef Py_buffer view
        cdef ssize_t r
        cdef utpkit_socket_info inf
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len == 0:
                return 0
            r = utp_write(rec.sock, view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            if utpkit_get_socket_info(rec.sock, &inf) == 0 and inf.state == UTPKIT_SOCK_IDLE:
                raise ValueError("write on a socket that was never connected")
            raise ClosedError("the engine refused the write (the socket is shut "
                              "down for writing, failed or closing)")
        return r

    def read(self, Py_ssize_t max=-1) -> bytes:
        """Take up to `max` (all if negative) buffered bytes; b"" when none.
        Tells the engine (utp_read_drained) so the advertised window reopens."""
        cdef Rec *rec = self._any()
        cdef size_t avail, n
        cdef bytes out
        if rec.user_closed:
            raise ClosedError("the socket is closed")
        avail = rec.rend - rec.rstart
        n = avail if (max < 0 or <size_t>max > avail) else <size_t>max
        if n == 0:
            return b""
        out = PyBytes_FromStringAndSize(<char *>rec.rbuf + rec.rstart, n)
        rec.rstart += n
        if rec.rstart == rec.rend:
            rec.rstart = rec.rend = 0
            if rec.rcap > (1 << 20):
                # Do not keep a burst's worth of memory per idle connection.
                free(rec.rbuf)
                rec.rbuf = NULL
                rec.rcap = 0
        if rec.sock != NULL:
            utp_read_drained(rec.sock)
        return out

    @property
    def readable(self) -> int:
        """Bytes in the receive buffer."""
        cdef Rec *rec = self._rec
        if rec == NULL:
            return 0
        return rec.rend - rec.rstart

    @property
    def extra_buffered(self) -> int:
        """Bytes the application holds elsewhere; counted against the
        advertised receive window (GET_READ_BUFFER_SIZE)."""
        return self._any().extra

    @extra_buffered.setter
    def extra_buffered(self, Py_ssize_t value):
        if value < 0:
            raise ValueError("extra_buffered must be >= 0")
        self._any().extra = <size_t>value

    def shutdown_write(self) -> None:
        """Send FIN after the queued data (utp_shutdown SHUT_WR)."""
        utp_shutdown(self._usable().sock, SHUT_WR)

    def close(self) -> None:
        """Close (utp_close): the engine finishes the FIN exchange, then a
        "destroyed" event follows.  Idempotent."""
        cdef Rec *rec = self._rec
        if rec == NULL or rec.user_closed:
            return
        rec.user_closed = True
        if rec.cs.closed or rec.sock == NULL:
            return
        if self._ctx is not None and self._ctx._cs != NULL:
            self._ctx._keep[rec.serial] = self
        utp_close(rec.sock)

    def abort(self) -> None:
        """Abortive close (utpkit_abort): a connected socket sends RESET (the
        peer sees ECONNRESET), queued data is discarded and the socket is
        destroyed at once; its "destroyed" event follows.  Also ends a
        close() that is still finishing.  Idempotent."""
        cdef Rec *rec = self._rec
        if rec == NULL or rec.cs.closed or rec.sock == NULL:
            return
        rec.user_closed = True
        if self._ctx is not None and self._ctx._cs != NULL:
            self._ctx._keep[rec.serial] = self
        utpkit_abort(rec.sock)

    def probe(self) -> bool:
        """utpkit_probe: ask the peer to answer now (a keepalive it must
        acknowledge); info()["peer_confirmed"] turns true when it does.
        False if the socket is not connected or the probe was rate limited."""
        cdef Rec *rec = self._rec
        if rec == NULL or rec.cs.closed or rec.sock == NULL:
            return False
        return utpkit_probe(rec.sock) == 0

    # ---- state ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The handshake completed (outgoing) or the socket was accepted."""
        return self._rec != NULL and self._rec.connected

    @property
    def eof(self) -> bool:
        """The peer's FIN arrived."""
        return self._rec != NULL and self._rec.eof

    @property
    def closed(self) -> bool:
        """close() was called (or the Context was closed)."""
        return self._rec == NULL or self._rec.user_closed or self._rec.cs.closed

    @property
    def destroyed(self) -> bool:
        """The engine socket is gone (destroyed, or the Context closed)."""
        return self._rec == NULL or self._rec.sock == NULL

    @property
    def error(self):
        """None, or the UTP_E* code of the first error."""
        if self._rec == NULL or self._rec.error < 0:
            return None
        return self._rec.error

    @property
    def peername(self):
        """The peer's address tuple, or None before connect."""
        if self._rec == NULL:
            return None
        return _format_addr(<const sockaddr *>&self._rec.peer, self._rec.peerlen)

    # ---- introspection ----------------------------------------------------

    def stats(self) -> dict:
        """utp_socket_stats as a dict.  After "destroyed", the values the
        socket had when it was destroyed."""
        cdef Rec *rec = self._any()
        cdef utp_socket_stats st
        if rec.sock != NULL:
            st = utp_get_stats(rec.sock)[0]
        elif rec.have_final:
            st = rec.final_stats
        else:
            raise ClosedError("the socket was destroyed and no statistics were kept")
        return st

    def info(self) -> dict:
        """utpkit_get_socket_info as a dict (state is a SOCK_* value).  After
        "destroyed", the last snapshot with state SOCK_DESTROYED."""
        cdef Rec *rec = self._any()
        cdef utpkit_socket_info inf
        if rec.sock != NULL:
            if utpkit_get_socket_info(rec.sock, &inf) < 0:
                raise RuntimeError("utpkit_get_socket_info failed")
        elif rec.have_final:
            inf = rec.final_info
        else:
            raise ClosedError("the socket was destroyed and no snapshot was kept")
        return inf

    def get_delays(self) -> tuple:
        """(ours, theirs, age) from utp_get_delays: our and the peer's
        measured queuing delay and how old the peer's figure is."""
        cdef Rec *rec = self._usable()
        cdef uint32 ours = 0, theirs = 0, age = 0
        utp_get_delays(rec.sock, &ours, &theirs, &age)
        return (ours, theirs, age)

    def set_option(self, int opt, int value) -> None:
        """utp_setsockopt (SNDBUF, RCVBUF, TARGET_DELAY); ValueError if
        the engine rejects it."""
        if utp_setsockopt(self._usable().sock, opt, value) < 0:
            raise ValueError(f"engine rejected socket option {opt} = {value}")

    def get_option(self, int opt) -> int:
        """utp_getsockopt; ValueError for an unknown option."""
        cdef int r = utp_getsockopt(self._usable().sock, opt)
        if r < 0:
            raise ValueError(f"unknown socket option {opt}")
        return r

    def __repr__(self):
        cdef Rec *rec = self._rec
        if rec == NULL:
            return "<utp.Socket uninitialised>"
        flags = []
        if rec.connected:
            flags.append("connected")
        if rec.eof:
            flags.append("eof")
        if rec.error >= 0:
            flags.append(f"error={ERROR_NAMES[rec.error] if rec.error < 3 else rec.error}")
        if rec.user_closed:
            flags.append("closed")
        if rec.sock == NULL:
            flags.append("destroyed")
        return (f"<utp.Socket #{rec.serial} peer={self.peername!r}"
                f"{' ' if flags else ''}{' '.join(flags)}>")
