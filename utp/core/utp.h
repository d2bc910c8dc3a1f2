/*
 * utp.h -- public interface of the utpkit uTP engine (BEP 29).
 *
 * Source-compatible with libutp's utp.h: the same functions, callback ids,
 * option ids, states, error codes, structures and type names, so a program
 * written for libutp compiles against this header unchanged.  Everything
 * utpkit adds is prefixed UTPKIT_ / utpkit_ and lives at the end.
 *
 * The engine is sans-I/O: datagrams enter through utp_process_udp(), leave
 * through the UTP_SENDTO callback, and time and randomness come only from
 * the UTP_GET_MICROSECONDS / UTP_GET_MILLISECONDS / UTP_GET_RANDOM callbacks.
 */
#ifndef __UTP_H__
#define __UTP_H__

#ifdef __cplusplus
extern "C" {
#endif

/* What libutp's utp.h and utp_types.h pull in: programs written for libutp
 * use va_start & co. and the socket API without including them. */
#include <stdarg.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

/* libutp's type names (utp_types.h); programs written for libutp use them. */
#ifndef UTP_TYPES_DEFINED
#define UTP_TYPES_DEFINED
typedef unsigned char byte;
typedef unsigned char uint8;
typedef signed char int8;
typedef unsigned short uint16;
typedef signed short int16;
typedef unsigned int uint;
typedef unsigned int uint32;
typedef signed int int32;
typedef unsigned long long uint64;
typedef long long int64;
#endif

#define UTP_EXPORT __attribute__((visibility("default")))

typedef struct UTPSocket utp_socket;
typedef struct struct_utp_context utp_context;

/* Flag passed to UTP_SENDTO for MTU probes: send with "don't fragment".
 * An enum member, as in libutp (a program may test it with #ifdef only to
 * find it absent there, and must see the same here). */
enum {
	UTP_UDP_DONTFRAG = 2
};

/* Socket states reported through UTP_ON_STATE_CHANGE. */
enum {
	UTP_STATE_CONNECT = 1,    /* outgoing connection completed (implies writable) */
	UTP_STATE_WRITABLE = 2,   /* the socket can take more data */
	UTP_STATE_EOF = 3,        /* peer sent FIN and every byte before it arrived */
	UTP_STATE_DESTROYING = 4  /* the socket is being freed: never touch it again */
};

extern UTP_EXPORT const char *utp_state_names[];

/* Error codes reported through UTP_ON_ERROR. */
enum {
	UTP_ECONNREFUSED = 0,
	UTP_ECONNRESET,
	UTP_ETIMEDOUT
};

extern UTP_EXPORT const char *utp_error_code_names[];

/* Callback ids (utp_set_callback) followed by option ids
 * (utp_context_set_option / utp_setsockopt); the numbering is libutp's. */
enum {
	UTP_ON_FIREWALL = 0,
	UTP_ON_ACCEPT,
	UTP_ON_CONNECT,
	UTP_ON_ERROR,
	UTP_ON_READ,
	UTP_ON_OVERHEAD_STATISTICS,
	UTP_ON_STATE_CHANGE,
	UTP_GET_READ_BUFFER_SIZE,
	UTP_ON_DELAY_SAMPLE,
	UTP_GET_UDP_MTU,
	UTP_GET_UDP_OVERHEAD,
	UTP_GET_MILLISECONDS,
	UTP_GET_MICROSECONDS,
	UTP_GET_RANDOM,
	UTP_LOG,
	UTP_SENDTO,

	/* context and socket options */
	UTP_LOG_NORMAL,
	UTP_LOG_MTU,
	UTP_LOG_DEBUG,
	UTP_SNDBUF,
	UTP_RCVBUF,
	UTP_TARGET_DELAY,

	UTP_ARRAY_SIZE /* last */
};

extern UTP_EXPORT const char *utp_callback_names[];

typedef struct {
	utp_context *context;
	utp_socket *socket;
	size_t len;
	uint32 flags;
	int callback_type;
	const byte *buf;

	union {
		const struct sockaddr *address;
		int send;
		int sample_ms;
		int error_code;
		int state;
	};

	union {
		socklen_t address_len;
		int type;
	};
} utp_callback_arguments;

typedef uint64 utp_callback_t(utp_callback_arguments *);

/* UTP_ON_FIREWALL (utpkit): what the answer decides, in args->flags, and the
 * SYN's connection id in args->len.  Past its half-open bounds the engine
 * answers a SYN with a stateless cookie, so one connection can be asked
 * about twice: provisionally for the SYN (no socket yet) and for good when
 * the cookie comes back.  A firewall that admits a limited number of
 * connections counts only the calls that create one (not COOKIE_SYN) and
 * can tell the SYNs apart by (address, connection id). */
enum {
	UTPKIT_FIREWALL_SYN = 0,           /* a SYN: yes creates the socket now */
	UTPKIT_FIREWALL_COOKIE_SYN = 1,    /* a SYN: yes sends a cookie, no socket */
	UTPKIT_FIREWALL_COOKIE_RETURN = 2  /* a returned cookie: yes creates the socket */
};

/* Packet counts bucketed by datagram size: <=23, <=373, <=723, <=1400, >1400. */
typedef struct {
	uint32 _nraw_recv[5];
	uint32 _nraw_send[5];
} utp_context_stats;

typedef struct {
	uint64 nbytes_recv;   /* payload bytes received */
	uint64 nbytes_xmit;   /* payload bytes sent, retransmissions included */
	uint32 rexmit;        /* packets retransmitted after a timeout */
	uint32 fastrexmit;    /* packets retransmitted on ACK/SACK evidence */
	uint32 nxmit;         /* packets sent */
	uint32 nrecv;         /* packets received */
	uint32 nduprecv;      /* duplicate data packets received */
	uint32 mtu_guess;     /* current packet size (bytes of UDP payload) */
} utp_socket_stats;

#define UTP_IOV_MAX 1024

struct utp_iovec {
	void *iov_base;
	size_t iov_len;
};

/* The 28 functions of libutp's API. */
UTP_EXPORT utp_context *utp_init(int version);
UTP_EXPORT void utp_destroy(utp_context *ctx);
UTP_EXPORT void utp_set_callback(utp_context *ctx, int callback_name, utp_callback_t *proc);
UTP_EXPORT void *utp_context_set_userdata(utp_context *ctx, void *userdata);
UTP_EXPORT void *utp_context_get_userdata(utp_context *ctx);
UTP_EXPORT int utp_context_set_option(utp_context *ctx, int opt, int val);
UTP_EXPORT int utp_context_get_option(utp_context *ctx, int opt);
UTP_EXPORT int utp_process_udp(utp_context *ctx, const byte *buf, size_t len,
                               const struct sockaddr *to, socklen_t tolen);
UTP_EXPORT int utp_process_icmp_error(utp_context *ctx, const byte *buffer, size_t len,
                                      const struct sockaddr *to, socklen_t tolen);
UTP_EXPORT int utp_process_icmp_fragmentation(utp_context *ctx, const byte *buffer, size_t len,
                                              const struct sockaddr *to, socklen_t tolen,
                                              uint16 next_hop_mtu);
UTP_EXPORT void utp_check_timeouts(utp_context *ctx);
UTP_EXPORT void utp_issue_deferred_acks(utp_context *ctx);
UTP_EXPORT utp_context_stats *utp_get_context_stats(utp_context *ctx);
UTP_EXPORT utp_socket *utp_create_socket(utp_context *ctx);
UTP_EXPORT void *utp_set_userdata(utp_socket *s, void *userdata);
UTP_EXPORT void *utp_get_userdata(utp_socket *s);
UTP_EXPORT int utp_setsockopt(utp_socket *s, int opt, int val);
UTP_EXPORT int utp_getsockopt(utp_socket *s, int opt);
UTP_EXPORT int utp_connect(utp_socket *s, const struct sockaddr *to, socklen_t tolen);
UTP_EXPORT ssize_t utp_write(utp_socket *s, void *buf, size_t count);
UTP_EXPORT ssize_t utp_writev(utp_socket *s, struct utp_iovec *iovec, size_t num_iovecs);
UTP_EXPORT int utp_getpeername(utp_socket *s, struct sockaddr *addr, socklen_t *addrlen);
UTP_EXPORT void utp_read_drained(utp_socket *s);
UTP_EXPORT int utp_get_delays(utp_socket *s, uint32 *ours, uint32 *theirs, uint32 *age);
UTP_EXPORT utp_socket_stats *utp_get_stats(utp_socket *s);
UTP_EXPORT utp_context *utp_get_context(utp_socket *s);
UTP_EXPORT void utp_shutdown(utp_socket *s, int how);
UTP_EXPORT void utp_close(utp_socket *s);

/* ------------------------------------------------------------------------
 * utpkit extensions.  Not part of libutp; a libutp program never needs them.
 * ------------------------------------------------------------------------ */

/* Extra context options for utp_context_set_option / utp_context_get_option.
 * Numbered far from libutp's ids so they can never collide with them. */
enum {
	UTPKIT_MIN_RTO = 100,   /* ms; floor of the retransmission timeout (500) */
	UTPKIT_MAX_RTO,         /* ms; cap of the backed-off timeout (60000) */
	UTPKIT_MAX_SOCKETS,     /* live sockets; SYNs past it are refused (3000) */
	UTPKIT_SYN_TIMEOUT,     /* ms before the first SYN retransmission (1000) */
	UTPKIT_SYN_RETRIES,     /* SYN retransmissions before ETIMEDOUT (3); each wait doubles */
	UTPKIT_ACK_DELAY,       /* ms a deferred ACK may wait for utp_issue_deferred_acks (20) */
	UTPKIT_KEEPALIVE,       /* ms of silence before a keepalive probe (29000) */
	UTPKIT_DEAD_RETRIES,    /* unanswered timeouts in a row before ETIMEDOUT (5) */
	UTPKIT_RESET_RATE,      /* RESETs per second to unknown connections (100) */
	UTPKIT_MTU_PROBING,     /* 1: probe for a larger packet size with DONTFRAG (1) */
	UTPKIT_HALF_OPEN_MAX,   /* accepted, unconfirmed sockets kept; past it SYNs get a cookie (64) */
	UTPKIT_HALF_OPEN_PER_ADDR, /* the same, per source address (8) */
	UTPKIT_SYNACK_RATE,     /* cookie SYN-ACKs per second to one source address, burst 4x (16) */
	UTPKIT_OPTION_END
};

/* Socket states as reported by utpkit_get_socket_info(). */
enum {
	UTPKIT_SOCK_IDLE = 0,     /* created, not connected */
	UTPKIT_SOCK_SYN_SENT,     /* connecting */
	UTPKIT_SOCK_CONNECTED,    /* established (initiator or acceptor) */
	UTPKIT_SOCK_ERROR,        /* reset, refused or timed out; only utp_close is useful */
	UTPKIT_SOCK_CLOSING,      /* utp_close called; finishing FIN exchange */
	UTPKIT_SOCK_DESTROYED     /* waiting to be freed */
};

/* Counters of one context: what arrived, what was sent, what was dropped and why. */
typedef struct {
	uint64 packets_in;        /* uTP datagrams handled by utp_process_udp */
	uint64 packets_out;       /* datagrams given to UTP_SENDTO */
	uint64 bytes_in;
	uint64 bytes_out;
	uint64 not_utp;           /* datagrams utp_process_udp returned 0 for */
	uint64 drop_malformed;    /* uTP-looking datagrams that failed validation */
	uint64 drop_unknown;      /* packets for no known connection */
	uint64 drop_invalid;      /* well-formed packets out of window or in the wrong state */
	uint64 resets_sent;       /* RESETs answering packets for unknown connections */
	uint64 resets_limited;    /* RESETs not sent because of UTPKIT_RESET_RATE */
	uint64 syn_refused;       /* SYNs refused: no listener, firewall or socket cap */
	uint64 syn_duplicate;     /* duplicate SYNs answered again */
	uint64 icmp_handled;      /* ICMP errors matched to a socket */
	uint64 sockets_created;
	uint64 sockets_freed;
	uint32 sockets_live;
	uint32 sockets_peak;
	/* SYN defence (utp_accept.c) and replies to unauthenticated packets. */
	uint64 syn_invalid;       /* SYNs of the wrong shape (a payload, long extensions): dropped */
	uint64 syn_cookies;       /* SYNs answered statelessly with a cookie SYN-ACK */
	uint64 cookie_accepted;   /* connections created when a cookie came back */
	uint64 unauth_limited;    /* replies to unauthenticated packets not sent (rate or byte budget) */
	uint64 unauth_bytes_in;   /* bytes of SYNs and of packets for no connection */
	uint64 unauth_bytes_out;  /* bytes sent in answer to them (RESET, SYN-ACK, TIME_WAIT ACK) */
	uint32 half_open;         /* accepted sockets the initiator has not confirmed yet */
	uint32 half_open_peak;
	uint64 syn_abandoned;     /* connection attempts given up: a RESET clears the peer's half-open socket */
} utpkit_counters;

/* A snapshot of one connection's transport state. */
typedef struct {
	int state;                /* UTPKIT_SOCK_* */
	uint32 srtt_us;           /* smoothed round-trip time (0 before the first sample) */
	uint32 rttvar_us;
	uint32 rto_ms;            /* current retransmission timeout, backoff included */
	uint32 cwnd;              /* congestion window, bytes */
	uint32 ssthresh;          /* slow start threshold, bytes */
	uint32 in_flight;         /* bytes sent and not yet acknowledged */
	uint32 peer_wnd;          /* receive window the peer advertised, bytes */
	uint32 send_queue;        /* bytes accepted by utp_write, not yet acknowledged */
	uint32 reorder_bytes;     /* out-of-order payload held for reassembly */
	uint32 packet_size;       /* current UDP payload size of a full packet */
	uint32 our_delay_us;      /* queueing delay of our packets (LEDBAT) */
	uint32 base_delay_us;     /* minimum one-way delay seen (LEDBAT base) */
	uint32 timeouts;          /* retransmission timeouts so far */
	uint32 loss_events;       /* window reductions caused by loss */
	int slow_start;           /* 1 while in slow start */
	uint16 seq_nr;            /* next sequence number we send */
	uint16 ack_nr;            /* last in-order sequence number received */
	int peer_confirmed;       /* the peer has sent a packet after the handshake (always 1 for
	                           * an initiator once connected): its address is not forged */
} utpkit_socket_info;

/* Microseconds until the earliest engine timer is due (0: due now), or -1
 * when no timer is armed.  Lets the caller sleep exactly as long as needed
 * and then call utp_check_timeouts(). */
UTP_EXPORT int64 utpkit_next_timeout(utp_context *ctx);
/* Microseconds an application that is leaving should keep the context
 * running (receiving and timing) so recently closed connections whose last
 * packet was the peer's FIN can still ACK a resent FIN (TCP's TIME_WAIT,
 * bounded to about two RTOs, at most 5 s); -1 when there are none. */
UTP_EXPORT int64 utpkit_timewait_linger(utp_context *ctx);
UTP_EXPORT const utpkit_counters *utpkit_get_counters(utp_context *ctx);
UTP_EXPORT int utpkit_get_socket_info(utp_socket *s, utpkit_socket_info *info);
/* Abortive close: a connected socket sends RESET to its peer (which sees
 * UTP_ECONNRESET), queued data is discarded, and the socket is destroyed
 * (UTP_STATE_DESTROYING follows).  For refusing a peer after accepting it
 * and for closes that must not wait.  Valid in every state. */
UTP_EXPORT void utpkit_abort(utp_socket *s);
/* Ask a connected peer to answer now: a zero-length keepalive probe, which
 * every uTP peer acknowledges.  An accepted connection whose initiator has
 * sent nothing yet becomes peer_confirmed when the answer comes; a forged
 * SYN's never does.  A probe of an unconfirmed connection counts as a reply
 * to an unauthenticated packet (rate and byte limited).  -1 if not connected. */
UTP_EXPORT int utpkit_probe(utp_socket *s);

/* What kind of datagram is this?  Used by the demultiplexer in front of the
 * engine so one UDP socket can carry uTP, the DHT and UDP tracker traffic. */
enum {
	UTPKIT_CLASS_OTHER = 0,
	UTPKIT_CLASS_UTP = 1,
	UTPKIT_CLASS_DHT = 2,
	UTPKIT_CLASS_TRACKER = 3
};
UTP_EXPORT int utpkit_classify(const byte *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* __UTP_H__ */
