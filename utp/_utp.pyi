"""Type stubs of the compiled binding utp._utp (see utp/_utp.pyx)."""

from typing import Any, Final, Literal, Protocol, TypeAlias, Union, final
from collections.abc import Callable

from _utpkit.contract import StrEnum as _StrEnum


_IPv4Address: TypeAlias = tuple[str, int]
_IPv6Address: TypeAlias = tuple[str, int, int, int]
_Address: TypeAlias = Union[_IPv4Address, _IPv6Address]
_Buffer: TypeAlias = Union[bytes, bytearray, memoryview]
_FileDescriptor: TypeAlias = Union[int, "_HasFileno"]

class _HasFileno(Protocol):
    def fileno(self) -> int: ...

class EventKind(_StrEnum):
    ACCEPT = "accept"
    CONNECT = "connect"
    WRITABLE = "writable"
    READABLE = "readable"
    EOF = "eof"
    ERROR = "error"
    DESTROYED = "destroyed"

_EventKind: TypeAlias = EventKind

__all__ = [
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

ERROR_NAMES: Final[tuple[str, str, str]]
DEFAULT_MTU_IPV4: Final = 1402
DEFAULT_MTU_IPV6: Final = 1232

UTP_UDP_DONTFRAG: Final = 2
UTP_STATE_CONNECT: Final = 1
UTP_STATE_WRITABLE: Final = 2
UTP_STATE_EOF: Final = 3
UTP_STATE_DESTROYING: Final = 4
UTP_ECONNREFUSED: Final = 0
UTP_ECONNRESET: Final = 1
UTP_ETIMEDOUT: Final = 2
UTP_ON_FIREWALL: Final = 0
UTP_ON_ACCEPT: Final = 1
UTP_ON_CONNECT: Final = 2
UTP_ON_ERROR: Final = 3
UTP_ON_READ: Final = 4
UTP_ON_OVERHEAD_STATISTICS: Final = 5
UTP_ON_STATE_CHANGE: Final = 6
UTP_GET_READ_BUFFER_SIZE: Final = 7
UTP_ON_DELAY_SAMPLE: Final = 8
UTP_GET_UDP_MTU: Final = 9
UTP_GET_UDP_OVERHEAD: Final = 10
UTP_GET_MILLISECONDS: Final = 11
UTP_GET_MICROSECONDS: Final = 12
UTP_GET_RANDOM: Final = 13
UTP_LOG: Final = 14
UTP_SENDTO: Final = 15
UTP_LOG_NORMAL: Final = 16
UTP_LOG_MTU: Final = 17
UTP_LOG_DEBUG: Final = 18
UTP_SNDBUF: Final = 19
UTP_RCVBUF: Final = 20
UTP_TARGET_DELAY: Final = 21
UTP_ARRAY_SIZE: Final = 22
UTP_IOV_MAX: Final = 1024
UTPKIT_MIN_RTO: Final = 100
UTPKIT_MAX_RTO: Final = 101
UTPKIT_MAX_SOCKETS: Final = 102
UTPKIT_SYN_TIMEOUT: Final = 103
UTPKIT_SYN_RETRIES: Final = 104
UTPKIT_ACK_DELAY: Final = 105
UTPKIT_KEEPALIVE: Final = 106
UTPKIT_DEAD_RETRIES: Final = 107
UTPKIT_RESET_RATE: Final = 108
UTPKIT_MTU_PROBING: Final = 109
UTPKIT_HALF_OPEN_MAX: Final = 110
UTPKIT_HALF_OPEN_PER_ADDR: Final = 111
UTPKIT_SYNACK_RATE: Final = 112
UTPKIT_OPTION_END: Final = 113
UTPKIT_SOCK_IDLE: Final = 0
UTPKIT_SOCK_SYN_SENT: Final = 1
UTPKIT_SOCK_CONNECTED: Final = 2
UTPKIT_SOCK_ERROR: Final = 3
UTPKIT_SOCK_CLOSING: Final = 4
UTPKIT_SOCK_DESTROYED: Final = 5
UTPKIT_CLASS_OTHER: Final = 0
UTPKIT_CLASS_UTP: Final = 1
UTPKIT_CLASS_DHT: Final = 2
UTPKIT_CLASS_TRACKER: Final = 3

class ClosedError(RuntimeError):
    """Use of a closed Context, a closed Socket, or a destroyed Socket."""

_Datagram: TypeAlias = tuple[bytes, _Address, int]
_Other: TypeAlias = tuple[int, bytes, _Address]
_Event: TypeAlias = tuple[_EventKind, "Socket", Any]

def udp_blast_send(fd: int, addr: tuple[Any, ...], size: int, count: int) -> int: ...
def udp_blast_receive(fd: int, count: int, idle_timeout: float = ...) -> tuple[int, int, float]: ...
def classify(data: _Buffer) -> int: ...

@final
class Context:
    def __init__(
        self,
        *,
        virtual_time: bool = False,
        seed: int | None = None,
        udp_mtu: int | None = None,
    ) -> None: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def virtual_time(self) -> bool: ...
    @property
    def now_us(self) -> int: ...
    @now_us.setter
    def now_us(self, value: int) -> None: ...
    @property
    def listening(self) -> bool: ...
    @listening.setter
    def listening(self, value: bool) -> None: ...
    @property
    def max_sockets(self) -> int: ...
    @max_sockets.setter
    def max_sockets(self, value: int) -> None: ...
    @property
    def firewall(self) -> Callable[[_Address], bool] | None: ...
    @firewall.setter
    def firewall(self, value: Callable[[_Address], bool] | None) -> None: ...
    @property
    def firewall_query(self) -> tuple[str, int] | None: ...
    def set_option(self, opt: int, value: int) -> None: ...
    def get_option(self, opt: int) -> int: ...
    def process_udp(self, data: _Buffer, addr: _Address) -> bool: ...
    def process_icmp_error(self, data: _Buffer, addr: _Address) -> bool: ...
    def process_icmp_fragmentation(
        self, data: _Buffer, addr: _Address, next_hop_mtu: int
    ) -> bool: ...
    def check_timeouts(self) -> None: ...
    def issue_deferred_acks(self) -> None: ...
    def next_timeout(self) -> int | None: ...
    def timewait_linger(self) -> int | None: ...
    def create_socket(self) -> Socket: ...
    def connect(self, addr: _Address) -> Socket: ...
    @property
    def pending_datagrams(self) -> int: ...
    def take_datagrams(self) -> list[_Datagram]: ...
    def take_events(self) -> list[_Event]: ...
    def setup_socket(
        self,
        fd: _FileDescriptor,
        *,
        rcvbuf: int | None = None,
        sndbuf: int | None = None,
        force: bool = False,
        gso: bool = True,
        gro: bool = True,
    ) -> dict[str, int | bool]: ...
    def recv_batch(self, fd: _FileDescriptor, budget: int = 256) -> int: ...
    def send_batch(self, fd: _FileDescriptor) -> int: ...
    def sendto(self, fd: _FileDescriptor, data: _Buffer, addr: _Address) -> bool: ...
    def take_other(self) -> list[_Other]: ...
    def take_unreachable(self) -> list[_Address]: ...
    def io_stats(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...

@final
class Socket:
    userdata: Any
    def connect(self, addr: _Address) -> None: ...
    def write(self, data: _Buffer) -> int: ...
    def read(self, max: int = -1) -> bytes: ...
    @property
    def readable(self) -> int: ...
    @property
    def extra_buffered(self) -> int: ...
    @extra_buffered.setter
    def extra_buffered(self, value: int) -> None: ...
    def shutdown_write(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def probe(self) -> bool: ...
    @property
    def connected(self) -> bool: ...
    @property
    def eof(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def destroyed(self) -> bool: ...
    @property
    def error(self) -> int | None: ...
    @property
    def peername(self) -> _Address | None: ...
    def stats(self) -> dict[str, int]: ...
    def info(self) -> dict[str, int]: ...
    def get_delays(self) -> tuple[int, int, int]: ...
    def set_option(self, opt: int, value: int) -> None: ...
    def get_option(self, opt: int) -> int: ...
