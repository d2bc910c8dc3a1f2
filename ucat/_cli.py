"""ucat's command line: arguments, stdin/stdout plumbing, error reporting.

The flags are libutp's ucat's (-h -d -l -p -s -B -n, same letters, same
meanings; -B sizes the engine's socket buffers), plus -w, --progress and --version.  What
differs is the behaviour at the edges, where libutp's ucat hangs, spins or
loses data:

- EOF is a half-close in each direction: stdin's EOF sends FIN, the peer's
  FIN closes stdout (so a reader downstream sees EOF at once), and ucat exits
  when both directions are finished.  Status 0 means exactly that.
- stdin and stdout can be pipes, terminals, sockets, regular files or
  /dev/null.  epoll refuses regular files and some character devices, so
  those are read and written in a worker thread; everything else goes
  through trio's FdStream.
- Every failure ends with one line ``ucat: <what went wrong>`` on stderr and
  a non-zero status, never a traceback (unless it is a bug in ucat).

Exit statuses: 0 both directions finished; 1 the connection or a local
resource failed; 2 bad arguments; 130 interrupted (SIGINT); 141 the reader of
stdout went away (EPIPE, the status SIGPIPE would give); 143 SIGTERM.

Importing this module imports neither trio nor utp, so ``ucat -h`` and
``ucat --version`` work without the compiled engine.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import select
import signal
import socket
import stat
import sys
import time
import traceback

from _utpkit.addr import split_hostport
from _utpkit.excgroup import leaves as _leaves
from _utpkit.excgroup import sole_leaf

PROG = "ucat"

# Reads from stdin and from the stream ask for this much at once: large
# enough that per-chunk overhead (a thread hop for regular files, a Python
# loop turn) is noise next to the copy, small enough to stay in L2.
CHUNK = 256 * 1024

# How long a connect may take when -w is not given: the default deadline of
# Endpoint.connect, so both layers agree.
DEFAULT_CONNECT_TIMEOUT = 10.0

# --rendezvous: how long finding the peer and punching may take when -w is
# not given.  Both sides start by hand, so allow for the second one to be
# started a while after the first.
DEFAULT_RENDEZVOUS_TIMEOUT = 30.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C (SIGTERM: 143)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `yes | head -1` gives `yes`


class Failure(Exception):
    """Ends ucat with the one line ``ucat: <message>`` and ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Interrupted(Exception):
    """SIGINT or SIGTERM: exit quietly with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StdoutGone(Exception):
    """Whoever read our stdout went away (EPIPE).  Like a process killed by
    SIGPIPE, ucat then exits quietly with 141."""


# --- messages ------------------------------------------------------------


def _say(message: str) -> None:
    """One line on stderr.  A broken or non-blocking stderr must not turn
    into a second error, so failures to write are dropped."""
    try:
        sys.stderr.write(f"{PROG}: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class _Log:
    """The -d output: ``ucat: +SECONDS message``, seconds since start."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._start = time.monotonic()

    def __call__(self, message: str, level: int = 1) -> None:
        if self.level >= level:
            _say(f"+{time.monotonic() - self._start:.3f}s {message}")


def _why(exc: BaseException) -> str:
    """The human part of an OSError: its strerror, else its text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def format_address(address) -> str:
    """HOST:PORT, with brackets around an IPv6 host ([::1]:4000)."""
    host, port = address[0], address[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


# --- arguments -----------------------------------------------------------

_USAGE = """\
ucat [-h] [-d] [-n] [-B bufsize] [-s local-address] [-p local-port] [-w timeout] [--map] [--progress] host port
       ucat -l [-d] [-n] [-B bufsize] [-s local-address] [-p port] [-w timeout] [--map] [--progress]
       ucat --rendezvous KEY (--tracker udp://HOST:PORT | --bootstrap HOST:PORT ...) [-d] [-B bufsize] [-s local-address] [-p port] [-w timeout] [--map] [--progress]
            [--birthday-ports N] [--birthday-rate PER_SECOND] [--birthday-max N]
            [--nat-mapping independent|dependent] [--peer-nat-mapping independent|dependent]
       ucat --version"""

_DESCRIPTION = """\
netcat over uTP (BEP 29): copy stdin to a uTP stream and the stream to stdout.
The first form connects to host:port; with -l, ucat accepts one connection
and then behaves exactly like the connecting side.  With --rendezvous, two
ucats that use the same KEY find each other at a UDP tracker (--tracker) or
through the Mainline DHT (--bootstrap: the DHT nodes to start from; no
other node is contacted) and connect through their NATs (hole punching);
then each behaves as above."""

_EPILOG = """\
behaviour:
  At EOF on stdin ucat sends FIN; the peer's FIN closes stdout.  ucat exits
  once both directions are finished.  stdin and stdout may be pipes,
  terminals, regular files or /dev/null.  A terminal is read only while
  ucat owns it (is in the foreground): started in the background of a
  shell (`ucat -l -p 9000 > file &`), ucat takes stdin as empty and sends
  FIN at once, instead of being stopped by the shell (SIGTTIN).
  With -l, ucat prints "ucat: listening on HOST:PORT" to stderr when -d is
  given or the system chose the port (no -p, or -p 0).
  With -l, ucat takes the first connection that completes the handshake and
  then sends data or a FIN (or answers a keepalive probe, if it waits for us
  to speak first) -- not merely the first SYN.  A connection reset
  (or found dead) before that is dropped and ucat keeps listening; so do the
  others once one is taken.  -d also prints the engine's counters of refused
  SYNs, cookies and suppressed replies (hostile or stray traffic).
  -w bounds the connect and, after it, any stretch in which no data moves in
  either direction; it does not bound the wait for a connection under -l.
  With --rendezvous it bounds finding the peer and punching together
  (default 30 s); the tracker must accept sha1(KEY) as an info hash.  Over
  the DHT, entries expire but are never withdrawn: use a fresh KEY for each
  meeting.
  When direct punching hears nothing from the peer (a symmetric NAT facing
  a port-restricted one), ucat falls back to birthday probing: the
  symmetric side opens up to --birthday-ports extra ports towards the peer
  while the other probes random ports of its address, at most
  --birthday-rate datagrams a second each and --birthday-max probes; -d
  shows how many probes it took.  Two symmetric NATs end with an error.
  --map (off by default) first asks the gateway -- the default route's
  gateway, on UDP port 5351 for PCP and NAT-PMP, or a UPnP IGD found by an
  SSDP search on the LAN -- to forward a public port to ucat's UDP port,
  and prints "ucat: mapped PUBLIC to LOCAL at the gateway GW (PROTOCOL)".
  That address is ucat's external address (what a peer can connect to with
  no hole punching); the lease is renewed at half its lifetime and deleted
  at exit.  If no protocol works, ucat says why and goes on without.

exit status:
  0    both directions finished cleanly
  1    the connection failed (refused, timed out, reset, idle past -w) or a
       local error (bind, resolve, reading stdin, writing stdout)
  2    bad arguments
  130  interrupted (Ctrl-C); 143 for SIGTERM
  141  the reader of stdout went away"""


def _version() -> str:
    """utpkit's installed version, else utp.__version__, else "unknown"."""
    try:
        from importlib.metadata import version

        return version("utpkit")
    except Exception:
        pass
    try:
        import utp

        found = getattr(utp, "__version__", None)
        if found:
            return str(found)
    except Exception:
        pass
    return "unknown"


class _VersionAction(argparse.Action):
    """--version, computed only when asked for (it may import utp)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"{PROG} (utpkit) {_version()}\n")
        sys.stdout.flush()
        parser.exit(0)


def _size(text: str) -> int:
    """-B: bytes, optionally with a binary suffix k, m or g (256k, 4m)."""
    match = re.fullmatch(r"([0-9]{1,12})([kKmMgG]?)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad buffer size {text!r}: want bytes, e.g. 4194304 or 4m")
    value = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    if not 1 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"bad buffer size {text!r}: want 1 byte to 2 GiB")
    return value


def _seconds(text: str) -> float:
    """-w: positive seconds, fractions allowed."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"bad timeout {text!r}: want a positive number of seconds")
    return value


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """A decimal port number; service names are not looked up."""
    low = 0 if allow_zero else 1
    if text.isascii() and text.isdigit() and len(text) <= 6 and low <= int(text) <= 65535:
        return int(text)
    raise Failure(f"bad port {text!r}: want a number from {low} to 65535", EXIT_USAGE)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host_name(host: str) -> None:
    """Refuse, before any resolver is asked, a host that is neither an IP
    literal nor a syntactically valid DNS name (RFC 1123 labels; underscores
    allowed, as /etc/hosts files have them).  A typo then fails at once and
    locally, with a message saying what is wrong with the name."""
    if ":" in host:
        return  # an IPv6 literal (maybe with %scope); getaddrinfo judges it
    name = host[:-1] if host.endswith(".") else host
    if name and not name.isascii():
        try:
            import idna  # trio's dependency: IDNA 2008, as trio resolves

            name = idna.encode(name, uts46=True).decode("ascii")
        except (ImportError, UnicodeError, ValueError):
            raise Failure(f"bad host name {host!r}", EXIT_USAGE) from None
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise Failure(f"bad host name {host!r}", EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, ``ucat: <what> (see ucat -h)``, like
    every other failure; the four-line usage is for -h."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{PROG}: {message} (see {PROG} -h)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=_USAGE,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-d", dest="debug", action="count", default=0,
        help="debug output on stderr: state changes with timestamps, and the "
        "connection statistics at the end; -dd also logs every chunk",
    )
    parser.add_argument("-l", dest="listen", action="store_true", help="listen for one connection")
    parser.add_argument("-p", dest="local_port", metavar="port", help="local port (with -l: the port to listen on)")
    parser.add_argument("-s", dest="local_address", metavar="local-address", help="local address to bind")
    parser.add_argument(
        "-B", dest="bufsize", metavar="bufsize", type=_size,
        help="uTP receive and send buffer size in bytes (k, m, g suffixes allowed)",
    )
    parser.add_argument("-n", dest="numeric", action="store_true", help="numeric addresses only: no DNS")
    parser.add_argument(
        "-w", dest="timeout", metavar="timeout", type=_seconds,
        help="connect timeout, then idle timeout, in seconds "
        f"(default: {DEFAULT_CONNECT_TIMEOUT:g} s to connect, no idle timeout)",
    )
    parser.add_argument(
        "--rendezvous", dest="rendezvous", metavar="KEY",
        help="meet the peer that uses the same KEY (at the tracker or through the DHT) "
        "and connect through NATs",
    )
    parser.add_argument(
        "--tracker", dest="tracker", metavar="udp://HOST:PORT",
        help="the UDP tracker (BEP 15) to meet at, with --rendezvous",
    )
    parser.add_argument(
        "--bootstrap", dest="bootstrap", metavar="HOST:PORT", action="append",
        help="meet through the Mainline DHT, starting from this node (repeatable), "
        "with --rendezvous",
    )
    parser.add_argument(
        "--birthday-ports", dest="birthday_ports", metavar="N", type=int, default=256,
        help="with --rendezvous, behind a symmetric NAT: extra UDP ports to open towards a "
        "port-restricted peer for birthday probing (default 256; 0 turns birthday probing off)",
    )
    parser.add_argument(
        "--birthday-rate", dest="birthday_rate", metavar="PER_SECOND", type=float, default=400.0,
        help="birthday probing: probes per second (default 400); the extra ports are "
        "opened at most 5 times as fast",
    )
    parser.add_argument(
        "--birthday-max", dest="birthday_max", metavar="N", type=int, default=6000,
        help="birthday probing: random ports of the peer to probe at most (default 6000)",
    )
    parser.add_argument(
        "--nat-mapping", dest="nat_mapping", choices=("independent", "dependent"),
        help="with --rendezvous: our NAT's mapping behaviour, when known (dependent: a "
        "symmetric NAT); picks the birthday probing role",
    )
    parser.add_argument(
        "--peer-nat-mapping", dest="peer_nat_mapping", choices=("independent", "dependent"),
        help="with --rendezvous: the peer's NAT's mapping behaviour, when known (told out of "
        "band); with --nat-mapping dependent too, ucat fails at once: two symmetric NATs "
        "cannot be punched",
    )
    parser.add_argument(
        "--map", dest="map", action="store_true",
        help="ask the gateway to forward a public port to ucat's UDP port (PCP, NAT-PMP, "
        "then UPnP IGD), renew it while ucat runs and remove it at exit; the mapped "
        "address is printed and used as ucat's external address (off by default)",
    )
    parser.add_argument(
        "--progress", dest="progress", action="store_true",
        help="a progress line on stderr: bytes the peer acknowledged and bytes received, "
        "rate, and the time left when stdin is a regular file",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("host", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("port", nargs="?", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line.  Flag syntax errors exit 2 through
    argparse (usage plus a message); the checks argparse cannot express
    raise Failure(..., EXIT_USAGE) with a one-line message."""
    opts = _parser().parse_args(argv)
    if opts.tracker is not None and opts.rendezvous is None:
        raise Failure("--tracker needs --rendezvous KEY", EXIT_USAGE)
    if opts.bootstrap is not None and opts.rendezvous is None:
        raise Failure("--bootstrap needs --rendezvous KEY", EXIT_USAGE)
    if opts.rendezvous is not None:
        return _check_rendezvous(opts)
    if opts.listen:
        if opts.host is not None:
            raise Failure(
                "-l takes no host or port; listen with: ucat -l [-p port] [-s local-address]", EXIT_USAGE
            )
    elif opts.host is None or opts.port is None:
        raise Failure("need a host and a port to connect to, or -l to listen (see ucat -h)", EXIT_USAGE)
    if opts.host is not None:
        opts.port = parse_port(opts.port)
        check_host_name(opts.host)
    opts.local_port = 0 if opts.local_port is None else parse_port(opts.local_port, allow_zero=True)
    if opts.local_address is not None:
        check_host_name(opts.local_address)
    return opts


def _birthday_limits(opts):
    """The --birthday-* caps as utp.BirthdayLimits (None: turned off)."""
    if opts.birthday_ports == 0:
        return None
    return _utp_module().BirthdayLimits(ports=opts.birthday_ports, rate=opts.birthday_rate,
                                        spray_rate=5 * opts.birthday_rate,
                                        max_probes=opts.birthday_max)


def _check_rendezvous(opts) -> argparse.Namespace:
    if opts.listen or opts.host is not None:
        raise Failure("--rendezvous takes no host, port or -l: the tracker says where the peer is",
                      EXIT_USAGE)
    if not opts.rendezvous:
        raise Failure("--rendezvous needs a non-empty KEY", EXIT_USAGE)
    try:
        opts.birthday_limits = _birthday_limits(opts)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    if opts.tracker is None and opts.bootstrap is None:
        raise Failure("--rendezvous needs --tracker udp://HOST:PORT or --bootstrap HOST:PORT",
                      EXIT_USAGE)
    if opts.tracker is not None and opts.bootstrap is not None:
        raise Failure("--rendezvous meets at a tracker or through the DHT: give --tracker or "
                      "--bootstrap, not both", EXIT_USAGE)
    if opts.bootstrap is not None:
        opts.bootstrap_addresses = [parse_hostport(text) for text in opts.bootstrap]
        opts.tracker_address = None
        return _check_local(opts)
    try:
        from tracker import parse_tracker_url
    except ImportError as exc:
        raise Failure(f"cannot load the tracker client: {exc}") from None
    try:
        opts.tracker_address = parse_tracker_url(opts.tracker)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    check_host_name(opts.tracker_address[0])
    return _check_local(opts)


def _check_local(opts) -> argparse.Namespace:
    opts.local_port = 0 if opts.local_port is None else parse_port(opts.local_port, allow_zero=True)
    if opts.local_address is not None:
        check_host_name(opts.local_address)
    return opts


# --- name resolution -----------------------------------------------------


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6ADDR]:PORT`` (a --bootstrap node)."""
    try:
        host, port = split_hostport(text)  # an IPv6 address needs its brackets
    except ValueError:
        raise Failure(f"bad node {text!r}: want HOST:PORT, or [IPV6]:PORT", EXIT_USAGE) from None
    check_host_name(host)
    return host, parse_port(port)


async def _resolve(host: str, port: int, *, numeric: bool, family: int = 0, passive: bool = False):
    """[(family, (host, port))] for host, in getaddrinfo's order, without
    duplicates.  With -n (numeric) no resolver is asked at all."""
    import trio

    flags = (socket.AI_NUMERICHOST if numeric else 0) | (socket.AI_PASSIVE if passive else 0)
    try:
        infos = await trio.socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, 0, flags)
    except socket.gaierror as exc:
        if family and exc.errno in (socket.EAI_FAMILY, getattr(socket, "EAI_ADDRFAMILY", None)):
            other = "IPv6" if family == socket.AF_INET6 else "IPv4"
            raise Failure(f"{host!r} has no {other} address, and -s binds an {other} address") from None
        if numeric and exc.errno == socket.EAI_NONAME:
            raise Failure(f"-n: {host!r} is not a numeric address") from None
        raise Failure(f"cannot resolve {host!r}: {_why(exc)}") from None
    except (UnicodeError, ValueError) as exc:
        raise Failure(f"bad host name {host!r}: {exc}") from None
    found = []
    for fam, _type, _proto, _canon, sockaddr in infos:
        if fam not in (socket.AF_INET, socket.AF_INET6):
            continue
        entry = (fam, (sockaddr[0], sockaddr[1]))
        if entry not in found:
            found.append(entry)
    if not found:
        raise Failure(f"cannot resolve {host!r}: no IPv4 or IPv6 address")
    return found


async def _local(opts):
    """(family, host) to bind: -s resolved, else (0, None) for the default."""
    if opts.local_address is None:
        return 0, None
    found = await _resolve(opts.local_address, opts.local_port, numeric=opts.numeric, passive=True)
    return found[0][0], found[0][1][0]


# --- stdin and stdout ----------------------------------------------------


def _pollable(fd: int, st: os.stat_result) -> bool:
    """Whether epoll accepts fd.  It refuses regular files and directories,
    and some character devices (/dev/null, /dev/zero) with EPERM."""
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return False
    if not hasattr(select, "epoll"):
        return True
    poller = select.epoll()
    try:
        poller.register(fd, select.EPOLLIN | select.EPOLLOUT)
    except OSError:
        return False
    finally:
        poller.close()
    return True


def _write_all(fd: int, data) -> None:
    """Blocking write of all of data (run in a worker thread)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class StdFds:
    """Guards fds 0, 1 and 2 for the run.

    A closed standard fd is reopened on /dev/null before any socket exists,
    or the UDP socket could land on fd 1 and receive what we "print".  The
    blocking mode of 0 and 1 is restored at the end: FdStream makes the
    file description non-blocking, and a terminal is shared with the shell
    that ucat returns to."""

    def __init__(self) -> None:
        self.closed = set()
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
            except OSError:
                self.closed.add(fd)
        for fd in sorted(self.closed):
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
        self._blocking = {}
        for fd in (0, 1):
            try:
                self._blocking[fd] = os.get_blocking(fd)
            except OSError:
                pass
        self.same_file = self._same_file()

    @staticmethod
    def _same_file() -> bool:
        # A terminal on both, or one socket (inetd style): closing one
        # direction early must not touch the other's file description.
        try:
            a, b = os.fstat(0), os.fstat(1)
        except OSError:
            return True
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or os.isatty(0) or os.isatty(1)

    def restore(self) -> None:
        for fd, blocking in self._blocking.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass


def _terminal_not_ours(fd: int) -> bool:
    """fd is a terminal whose foreground process group is not ours: we run
    in the background of an interactive shell (``ucat -l ... &``).  Reading
    it would stop us with SIGTTIN, and the input belongs to the shell."""
    try:
        return os.isatty(fd) and os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False


class Input:
    """stdin as an async source of chunks; b"" at EOF.

    A terminal ucat does not own (started with ``&``, or sent to the
    background later) is never read: it counts as an empty stdin, so the
    peer gets EOF at once, as with ``< /dev/null``."""

    def __init__(self, fds: StdFds, log: _Log) -> None:
        import trio

        self._trio = trio
        self._stream = None
        self._fd = None
        self._log = log
        self.kind = "closed"
        self.size = None  # bytes left to read, when stdin is a regular file
        self._tty = False
        if 0 in fds.closed:
            return
        st = os.fstat(0)
        if _terminal_not_ours(0):
            self.kind = "a terminal of the shell that runs ucat in the background: not read (EOF)"
            return
        if stat.S_ISREG(st.st_mode):
            try:
                self.size = max(st.st_size - os.lseek(0, 0, os.SEEK_CUR), 0)
            except OSError:
                pass
        if os.isatty(0):
            self._tty = True
            # A race with job control (`bg` after the check above) must end
            # in EIO, which we take for EOF, not in a stop.
            signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        if _pollable(0, st):
            # Our own dup: FdStream closes its fd, and fd 0 must stay open so
            # its blocking mode can be restored.
            self._stream = trio.lowlevel.FdStream(os.dup(0))
            self.kind = "a terminal" if os.isatty(0) else "a pipe or socket"
        else:
            self._fd = os.dup(0)
            self.kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not pollable (read in a thread)"

    async def read(self) -> bytes:
        trio = self._trio
        if self._tty and _terminal_not_ours(0):
            self._log("stdin: the terminal now belongs to another job; taking it as EOF")
            return b""
        try:
            if self._stream is not None and self._tty:
                # Job control can take the terminal away while we wait
                # (Ctrl-Z, bg): look again now and then.  A cancelled wait
                # has read nothing, so no input is lost.
                while True:
                    with trio.move_on_after(0.25):
                        return await self._stream.receive_some(CHUNK)
                    if _terminal_not_ours(0):
                        self._log("stdin: the terminal now belongs to another job; taking it as EOF")
                        return b""
            if self._stream is not None:
                return await self._stream.receive_some(CHUNK)
            if self._fd is not None:
                return await trio.to_thread.run_sync(os.read, self._fd, CHUNK)
        except (trio.BrokenResourceError, OSError) as exc:
            cause = exc.__cause__ or exc
            if self._tty and getattr(cause, "errno", None) == errno.EIO:
                self._log("stdin: the terminal is not ours (EIO); taking it as EOF")
                return b""
            raise Failure(f"cannot read stdin: {_why(cause)}") from None
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class Output:
    """stdout as an async sink.  finish() closes it, so whoever reads it
    sees EOF as soon as the peer's FIN arrives, even while ucat still sends."""

    def __init__(self, fds: StdFds, log: _Log) -> None:
        import trio

        self._trio = trio
        self._stream = None
        self._fd = None
        self._log = log
        self._keep_open = fds.same_file
        self.closed_at_start = 1 in fds.closed
        if self.closed_at_start:
            return
        st = os.fstat(1)
        if _pollable(1, st):
            self._stream = trio.lowlevel.FdStream(os.dup(1))
        else:
            self._fd = os.dup(1)

    async def write(self, data) -> None:
        trio = self._trio
        if self.closed_at_start:
            raise Failure("stdout is closed: nowhere to put the peer's data")
        try:
            if self._stream is not None:
                await self._stream.send_all(data)
            else:
                await trio.to_thread.run_sync(_write_all, self._fd, data)
        except (trio.BrokenResourceError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if isinstance(cause, BrokenPipeError):
                raise StdoutGone() from None
            raise Failure(f"cannot write stdout: {_why(cause or exc)}") from None

    async def finish(self) -> None:
        """The peer's FIN: close stdout now.  A terminal (or a description
        shared with stdin) stays open until the end instead."""
        if self._keep_open:
            return
        await self.aclose()
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        except OSError:
            pass

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


# --- the connection ------------------------------------------------------

_ERROR_MESSAGES = {
    "UTP_ECONNRESET": "connection reset by {peer}",
    "UTP_ETIMEDOUT": "connection to {peer} timed out: the peer stopped answering",
    "UTP_ECONNREFUSED": "connection refused by {peer}",
}


def _broken(exc: BaseException, peer: str) -> Failure:
    """The Failure for a stream that broke (BrokenResourceError from utp,
    whose __cause__ is a utp.UTPError with .name)."""
    cause = exc.__cause__
    template = _ERROR_MESSAGES.get(str(getattr(cause, "name", "")))
    if template:
        return Failure(template.format(peer=peer))
    detail = cause if cause is not None else exc
    return Failure(f"connection to {peer} failed: {_why(detail)}")


def _bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _acknowledged(stream, queued: int) -> int:
    """Bytes of the `queued` ones (handed to send_all) the peer has
    acknowledged: the rest is still in the send buffer or in flight."""
    try:
        s = stream.statistics()
        return max(queued - int(s.get("send_queue", 0)) - int(s.get("in_flight", 0)), 0)
    except Exception:
        return queued


class _Progress:
    """--progress: one line on stderr, rewritten in place (\\r) on a
    terminal, else one line every few seconds."""

    def __init__(self, stream, moved: dict, size: int | None, start: float) -> None:
        self._stream = stream
        self._moved = moved
        self._size = size
        self._start = start
        self._tty = sys.stderr.isatty()
        self.interval = 0.5 if self._tty else 5.0
        self._width = 0

    def line(self, now: float) -> str:
        acked = _acknowledged(self._stream, self._moved["out"])
        elapsed = max(now - self._start, 1e-9)
        rate = acked / elapsed
        sent = f"sent {_bytes(acked)}"
        if self._size:
            sent += f" of {_bytes(self._size)} ({min(acked / self._size, 1.0):.0%})"
        text = f"{sent}, received {_bytes(self._moved['in'])}, " \
               f"{(acked + self._moved['in']) / elapsed / 1e6:.1f} MB/s"
        if self._size and rate > 0 and acked < self._size:
            left = int((self._size - acked) / rate)
            text += f", {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left"
        return f"{PROG}: {text}"

    def show(self, now: float, final: bool = False) -> None:
        text = self.line(now)
        try:
            if self._tty:
                pad = " " * max(self._width - len(text), 0)
                self._width = len(text)
                sys.stderr.write(f"\r{text}{pad}" + ("\n" if final else ""))
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _log_statistics(log: _Log, stream, elapsed: float, moved: dict) -> None:
    try:
        s = stream.statistics()
    except Exception as exc:  # statistics are a courtesy; never fail on them
        log(f"statistics: unavailable ({exc!r})")
        return

    def g(key):
        value = s.get(key, "?")
        return f"{value:g}" if isinstance(value, float) else value

    total = moved["in"] + moved["out"]
    rate = total / elapsed / 1e6 if elapsed > 0 else 0.0
    acked = _acknowledged(stream, moved["out"])
    log(f"statistics after {elapsed:.3f} s:")
    log(f"  stdin: {moved['out']} bytes read and queued for the peer, {acked} of them "
        f"acknowledged by the peer")
    log(f"  stdout: {moved['in']} bytes received from the peer and written; "
        f"{rate:.1f} MB/s both ways together")
    log(f"  on the wire: payload bytes sent {g('bytes_sent')} (retransmissions included), "
        f"received {g('bytes_received')}")
    log(f"  packets (data and acks): sent {g('packets_sent')}, received {g('packets_received')}")
    log(f"  retransmits {g('retransmits')} (fast {g('fast_retransmits')}), "
        f"duplicates received {g('duplicates_received')}")
    log(f"  rtt {g('rtt_ms')} ms, rto {g('rto_ms')} ms, cwnd {g('cwnd')} bytes, mtu {g('mtu')}")


async def _abort(stream) -> None:
    """Close a failing or interrupted session with a RESET.  A graceful
    close would send FIN, and the peer would take a transfer we gave up on
    halfway for a complete one (and exit 0 with truncated data)."""
    import trio

    try:
        stream.abort()
    except Exception:
        pass  # the graceful close below still releases everything
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _wait_delivered(stream, peer: str) -> None:
    """Return once the peer has acknowledged every byte we sent: what makes
    exit status 0 mean "delivered", not just "handed to the engine"."""
    import trio

    try:
        # Returns once nothing is outstanding, even if the peer has closed
        # or reset the connection since; raises if data was left unacknowledged.
        await stream.wait_send_complete()
    except trio.BrokenResourceError as exc:
        raise _broken(exc, peer) from None
    except trio.ClosedResourceError:
        raise Failure(f"connection to {peer} ended before the peer acknowledged all data") from None


async def run_session(stream, opts, fds: StdFds, log: _Log) -> None:
    """Copy stdin to stream and stream to stdout until both directions are
    finished, then close the stream.  Raises Failure or StdoutGone."""
    import trio

    peer = format_address(stream.peer_address)
    if log.level:
        try:
            # "writable" comes every time the send buffer drains to half:
            # noise at -d, so it waits for -dd.
            stream.on_state_change = lambda state: log(f"state: {state}", 2 if state == "writable" else 1)
        except AttributeError:
            pass
    stdin = Input(fds, log)
    stdout = Output(fds, log)
    log(f"stdin is {stdin.kind}")
    moved = {"in": 0, "out": 0}
    idle = trio.CancelScope()
    start = trio.current_time()

    def progress():
        if opts.timeout:
            idle.deadline = trio.current_time() + opts.timeout

    async def upstream():
        while True:
            data = await stdin.read()
            if not data:
                break
            progress()
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError as exc:
                raise _broken(exc, peer) from None
            moved["out"] += len(data)
            log(f"sent {len(data)} bytes", 2)
            progress()
        log(f"stdin: EOF after {moved['out']} bytes; sending FIN")
        await stdin.aclose()
        try:
            await stream.send_eof()
        except trio.BrokenResourceError as exc:
            raise _broken(exc, peer) from None

    async def downstream():
        while True:
            try:
                data = await stream.receive_some(CHUNK)
            except trio.BrokenResourceError as exc:
                raise _broken(exc, peer) from None
            if not data:
                break
            progress()
            await stdout.write(data)
            moved["in"] += len(data)
            log(f"received {len(data)} bytes", 2)
        log(f"peer: EOF after {moved['in']} bytes; closing stdout")
        await stdout.finish()

    meter = _Progress(stream, moved, stdin.size, start) if opts.progress else None

    async def show_progress():
        while True:
            await trio.sleep(meter.interval)
            meter.show(trio.current_time())

    closed = False
    try:
        progress()
        with idle:
            async with trio.open_nursery() as nursery:
                if meter is not None:
                    nursery.start_soon(show_progress)
                async with trio.open_nursery() as transfer:
                    transfer.start_soon(upstream)
                    transfer.start_soon(downstream)
                nursery.cancel_scope.cancel()
            log("both directions finished; waiting for the peer to acknowledge everything")
            await _wait_delivered(stream, peer)
            await stream.aclose()
            closed = True
        if idle.cancelled_caught:
            raise Failure(f"no data moved for {opts.timeout:g} s (-w); giving up on {peer}")
        log("closed")
    finally:
        if meter is not None:
            meter.show(trio.current_time(), final=True)
        if log.level:
            _log_statistics(log, stream, trio.current_time() - start, moved)
        if not closed:
            await _abort(stream)
        with trio.CancelScope(shield=True):
            await stdout.aclose()
            await stdin.aclose()


def _utp_module():
    try:
        import utp
    except ImportError as exc:
        raise Failure(f"cannot load the uTP library: {exc}") from None
    if not hasattr(utp, "open_endpoint"):
        raise Failure("this utp package has no trio layer (utp.open_endpoint is missing)")
    return utp


async def _with_endpoint(utp, opts, host, port, family, body):
    """Run body(ep) inside utp.open_endpoint(...); a failure to open the
    endpoint (bind) becomes a Failure, errors of the body pass through."""
    entered = False
    kwargs = {}
    if opts.timeout:
        # On the way out the Endpoint lingers for the FIN exchange; -w bounds
        # that wait too (the data itself was acknowledged before).
        kwargs["linger"] = min(opts.timeout, 10.0)
    if family:
        kwargs["family"] = family
    if opts.bufsize:
        kwargs["recv_buffer"] = opts.bufsize
        kwargs["send_buffer"] = opts.bufsize
    try:
        async with utp.open_endpoint(host, port, **kwargs) as ep:
            entered = True
            async with contextlib.AsyncExitStack() as stack:
                if opts.map:
                    await _map_port(utp, ep, stack)
                return await body(ep)
    except BaseException as exc:
        if entered:
            raise
        leaf = _sole_leaf(exc)
        if isinstance(leaf, OSError):
            where = format_address((host or "the default address", port))
            why = _why(leaf)
            if leaf.errno is None or why == os.strerror(leaf.errno):
                why = f"cannot bind to {where}: {why}"
            raise Failure(why) from None
        raise


async def _map_port(utp, ep, stack) -> None:
    """--map: ask the gateway (PCP, NAT-PMP, then UPnP IGD) to forward a
    public port to ep for as long as ucat runs.  A failure is reported and
    ucat goes on without: hole punching and direct connects still work."""
    try:
        mapping = await stack.enter_async_context(utp.port_mapping(ep))
    except utp.PortMappingError as exc:
        _say(f"{exc}; going on without a port mapping")
        return
    _say(f"mapped {format_address(mapping.external_address)} to {format_address(ep.local_address)} "
         f"at the gateway {mapping.gateway} ({mapping.protocol})")


async def _connect_mode(opts, fds: StdFds, log: _Log) -> None:
    import trio

    utp = _utp_module()
    local_family, local_host = await _local(opts)
    candidates = await _resolve(opts.host, opts.port, numeric=opts.numeric, family=local_family)
    budget = opts.timeout or DEFAULT_CONNECT_TIMEOUT
    deadline = trio.current_time() + budget
    failure = None
    for family, address in candidates:
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            break
        peer = format_address(address)
        bind_host = local_host or ("::" if family == socket.AF_INET6 else "0.0.0.0")

        async def body(ep, address=address, peer=peer, remaining=remaining):
            log(f"bound to {format_address(ep.local_address)}")
            log(f"connecting to {peer}")
            stream = None
            try:
                # A backstop in case connect overran its own deadline.
                with trio.move_on_after(remaining + 1.0):
                    stream = await ep.connect(address, timeout=remaining)
            except ConnectionRefusedError:
                return f"connection refused by {peer}"
            except TimeoutError:
                return f"timed out connecting to {peer} after {budget:g} s"
            except OSError as exc:
                return f"cannot connect to {peer}: {_why(exc)}"
            if stream is None:
                return f"timed out connecting to {peer} after {budget:g} s"
            log(f"connected to {peer} from {format_address(stream.local_address)}")
            await run_session(stream, opts, fds, log)
            return None

        failure = await _with_endpoint(utp, opts, bind_host, opts.local_port, family, body)
        if failure is None:
            return
        log(failure)
    raise Failure(failure or f"timed out connecting to {opts.host} after {budget:g} s")


async def _listen_mode(opts, fds: StdFds, log: _Log) -> None:
    utp = _utp_module()
    family, host = await _local(opts)

    async def body(ep):
        listener = ep.listen()
        where = f"listening on {format_address(ep.local_address)}"
        if log.level:
            log(where)
        elif opts.local_port == 0:
            _say(where)
        # One connection, as in libutp's ucat: close the listener once it is
        # taken, so later SYNs are refused rather than left waiting.
        try:
            stream = await _first_speaker(listener, log)
        finally:
            await listener.aclose()
        log(f"accepted a connection from {format_address(stream.peer_address)}")
        _log_engine_counters(log, ep)
        try:
            await run_session(stream, opts, fds, log)
        finally:
            _log_engine_counters(log, ep)

    await _with_endpoint(utp, opts, host, opts.local_port, family, body)


# Connections -l watches at once while waiting for one to speak; past this
# the oldest silent one is reset (a flood of handshakes cannot pile up).
_MAX_CANDIDATES = 64

# Engine counters worth seeing on a listener (utpkit_counters).
_ENGINE_COUNTERS = ("syn_invalid", "syn_refused", "syn_cookies", "cookie_accepted", "half_open_peak",
                    "unauth_limited", "resets_limited", "drop_malformed", "drop_unknown", "not_utp")


class _Prefetched:
    """A stream whose first receive_some() returns what _first_speaker
    already read (data, or b"" for an immediate FIN); everything else goes
    to the stream itself."""

    def __init__(self, stream, first: bytes) -> None:
        object.__setattr__(self, "_stream", stream)
        object.__setattr__(self, "_first", first)

    async def receive_some(self, max_bytes=None):
        first = self._first
        if first is not None:
            object.__setattr__(self, "_first", None)
            return first
        return await self._stream.receive_some(max_bytes)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __setattr__(self, name, value):
        setattr(self._stream, name, value)


async def _first_speaker(listener, log: _Log):
    """Accept connections until one proves its peer is really there: it
    sends data or a FIN, or answers a keepalive probe (a silent initiator
    waiting for us to speak); return it, with a first read kept for
    run_session.  Connections reset before that are dropped; the others are
    reset once one wins.  A handshake alone proves little: a forged SYN
    completes one too, and its address never answers."""
    import trio

    won: list = []
    waiting: dict = {}

    async def watch(stream, nursery):
        peer = format_address(stream.peer_address)
        data = None
        probes = 0
        try:
            while data is None:
                # Probe a silent peer now and then: a real initiator answers,
                # a forged SYN's address never does.
                if probes < 8:
                    stream.peer_confirmed(probe=True)
                    probes += 1
                with trio.move_on_after(0.05 * 2 ** min(probes, 4)):
                    data = await stream.receive_some(CHUNK)
                if data is None and stream.peer_confirmed():
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log(f"dropped a connection from {peer} that ended before sending anything ({_why(exc)})")
            waiting.pop(id(stream), None)
            await _abort(stream)
            return
        waiting.pop(id(stream), None)
        if not won:
            won.append(_Prefetched(stream, data) if data is not None else stream)
            nursery.cancel_scope.cancel()
        else:
            await _abort(stream)

    try:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                log(f"handshake from {format_address(stream.peer_address)}; waiting for it to send", 2)
                if len(waiting) >= _MAX_CANDIDATES:
                    oldest = next(iter(waiting))
                    await _abort(waiting.pop(oldest))
                waiting[id(stream)] = stream
                nursery.start_soon(watch, stream, nursery)
    finally:
        for stream in waiting.values():
            await _abort(stream)
    return won[0]


def _log_engine_counters(log: _Log, ep) -> None:
    """-d: what the engine refused or dropped so far on this endpoint."""
    if not log.level:
        return
    try:
        engine = ep.statistics().get("engine", {})
    except Exception as exc:  # statistics are a courtesy; never fail on them
        log(f"engine counters: unavailable ({exc!r})")
        return
    log("engine: " + ", ".join(f"{k} {engine.get(k, '?')}" for k in _ENGINE_COUNTERS))


async def _rendezvous_mode(opts, fds: StdFds, log: _Log) -> None:
    import trio

    utp = _utp_module()
    local_family, local_host = await _local(opts)
    if opts.tracker_address is not None:
        thost, tport = opts.tracker_address
        found = await _resolve(thost, tport, numeric=opts.numeric, family=local_family)
        family, tracker_addr = found[0]
        via = tracker_addr
        where = f"at {format_address(tracker_addr)}"
    else:
        # The first node fixes the family (unless -s did); the others must
        # have an address of that family.
        family, nodes = local_family, []
        for host, port in opts.bootstrap_addresses:
            found = await _resolve(host, port, numeric=opts.numeric, family=family)
            family = found[0][0]
            nodes.append((found[0][1][0], found[0][1][1]))
        via = ("dht", nodes)
        where = "through the DHT (bootstrap " + ", ".join(format_address(n) for n in nodes) + ")"
    budget = opts.timeout or DEFAULT_RENDEZVOUS_TIMEOUT
    deadline = trio.current_time() + budget
    bind_host = local_host or ("::" if family == socket.AF_INET6 else "0.0.0.0")

    async def body(ep):
        log(f"bound to {format_address(ep.local_address)}")
        start = trio.current_time()
        stream = None
        try:
            with trio.move_on_at(deadline + 1.0):  # a backstop
                extra = {k: v for k, v in (("mapping", opts.nat_mapping),
                                           ("peer_mapping", opts.peer_nat_mapping)) if v}
                stream = await utp.rendezvous(ep, opts.rendezvous, via=via,
                                              deadline=deadline, log=log,
                                              birthday=opts.birthday_limits, **extra)
        except BaseException as exc:  # the tracker client and the DHT node run nurseries
            leaf = _sole_leaf(exc)
            if isinstance(leaf, TimeoutError) or (isinstance(leaf, OSError) and leaf.errno is None):
                raise Failure(str(leaf)) from None  # utp's and the tracker's messages name the party
            if isinstance(leaf, OSError):
                raise Failure(f"rendezvous {where} failed: {_why(leaf)}") from None
            raise
        if stream is None:
            raise Failure(f"rendezvous {where} timed out after {budget:g} s")
        log(f"connected to {format_address(stream.peer_address)} after "
            f"{trio.current_time() - start:.3f} s")
        await run_session(stream, opts, fds, log)

    await _with_endpoint(utp, opts, bind_host, opts.local_port, family, body)


async def _amain(opts, fds: StdFds) -> None:
    """Run one ucat session.  SIGINT and SIGTERM cancel it at the next
    checkpoint, so cleanup (closing the connection, restoring the terminal)
    runs instead of a KeyboardInterrupt landing in the middle of anything."""
    import trio

    log = _Log(opts.debug)
    caught = []

    async def watch_signals(scope, task_status=trio.TASK_STATUS_IGNORED):
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                caught.append(signum)
                scope.cancel()
                return

    with trio.CancelScope() as work:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals, work)
            try:
                if opts.rendezvous is not None:
                    await _rendezvous_mode(opts, fds, log)
                elif opts.listen:
                    await _listen_mode(opts, fds, log)
                else:
                    await _connect_mode(opts, fds, log)
            finally:
                nursery.cancel_scope.cancel()
    if caught:
        raise Interrupted(caught[0])


# --- exceptions to exit statuses ---------------------------------------


def _sole_leaf(exc: BaseException) -> BaseException:
    """The one exception that matters in exc: trio's Cancelled aside, the
    only leaf; with several, exc itself.  (Without trio imported there can
    be no Cancelled, and ``ucat -h`` does not import it.)"""
    trio = sys.modules.get("trio")
    return sole_leaf(exc, (trio.Cancelled,) if trio is not None else ())


def exit_status(exc: BaseException, debug: int) -> int:
    """Report exc (one line, or nothing) and return the exit status."""
    leaves = list(_leaves(exc))
    for e in leaves:
        if isinstance(e, Interrupted):
            return 128 + e.signum
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return EXIT_INTERRUPTED
    if any(isinstance(e, StdoutGone) for e in leaves):
        return EXIT_BROKEN_PIPE
    for e in leaves:
        if isinstance(e, SystemExit):
            raise e
    for e in leaves:
        if isinstance(e, Failure):
            _say(e.message)
            return e.status
    # A bug in ucat or below: still one line, the traceback only under -d.
    real = [e for e in leaves if type(e).__name__ != "Cancelled"] or leaves
    first = real[0]
    _say(f"internal error: {type(first).__name__}: {first}")
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return EXIT_FAILURE


def main(argv=None) -> int:
    """The ``ucat`` console script; returns the exit status."""
    try:
        opts = parse_args(argv)
    except Failure as failure:
        _say(failure.message)
        return failure.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    fds = StdFds()
    try:
        import trio

        trio.run(_amain, opts, fds)
        return EXIT_OK
    except BaseException as exc:
        return exit_status(exc, opts.debug)
    finally:
        fds.restore()
