/*
 * utp_internal.h -- structures and module interfaces shared inside the engine.
 *
 * Modules (one concern each):
 *   utp_packet.c   header/extension codec, SACK bitmaps, datagram classifier
 *   utp_context.c  context, callbacks, options, socket table, timer heap,
 *                  dispatch of incoming datagrams, RESETs, ICMP
 *   utp_socket.c   public socket calls and the connection state machine
 *   utp_output.c   retransmission buffer, packetisation, sending, ACK/SACK
 *                  processing and loss recovery
 *   utp_input.c    receive path: reorder buffer, delivery, FIN, SACK building
 *   utp_ledbat.c   RTT/RTO estimation and LEDBAT congestion control
 *   utp_mtu.c      packet size, DONTFRAG probing, ICMP fragmentation-needed
 *   utp_accept.c   incoming SYNs: strict validation, half-open limits, SYN
 *                  cookies, and the one gate for replies to unauthenticated
 *                  packets
 *
 * Internal functions return 0 on success or a negative UTP_ERR_* code.
 */
#ifndef UTP_INTERNAL_H
#define UTP_INTERNAL_H

#include "utp.h"

#include <stdint.h>
#include <string.h>
#include <stdlib.h>

/* ---- wire format (BEP 29) ---------------------------------------------- */

enum { ST_DATA = 0, ST_FIN = 1, ST_STATE = 2, ST_RESET = 3, ST_SYN = 4, ST_NUM_TYPES = 5 };

#define UTP_VERSION 1
#define UTP_HEADER_SIZE 20
#define UTP_EXT_NONE 0
#define UTP_EXT_SACK 1
/* Padding that makes an MTU probe out of an ordinary full packet; receivers
 * skip extensions they do not know (BEP 29), so its bytes are never data. */
#define UTP_EXT_PAD 0x7e

/* How far ahead of ack_nr we accept data, and how many packets we keep in
 * flight.  libutp's reorder buffer and our SACK bitmap both cover 1024
 * packets past the first hole, so sending further would only be dropped. */
#define UTP_REORDER_MAX 1024
#define UTP_WINDOW_PACKETS_MAX 1023
#define UTP_SACK_MAX_BYTES (UTP_REORDER_MAX / 8)
/* Retransmission buffer entries (in flight plus queued, not yet sent). */
#define UTP_OUTBUF_MAX 4096

/* Errors of internal functions. */
enum {
	UTP_ERR_MALFORMED = -1,  /* peer sent bytes that fail validation */
	UTP_ERR_NOMEM = -2,      /* allocation failed */
	UTP_ERR_STATE = -3,      /* call not valid in this state */
	UTP_ERR_INVALID = -4     /* bad argument from the application */
};

/* A parsed, validated packet header.  Pointers point into the datagram. */
typedef struct {
	uint8 type;
	uint16 conn_id;
	uint32 ts;          /* sender's timestamp, microseconds */
	uint32 ts_diff;     /* sender's last measured delay of our packets */
	uint32 wnd;         /* sender's advertised receive window, bytes */
	uint16 seq_nr;
	uint16 ack_nr;
	const byte *sack;   /* SACK bitmap or NULL */
	uint32 sack_len;
	const byte *payload;
	size_t payload_len;
} utp_packet;

/* Parses attacker-controlled bytes.  0, or UTP_ERR_MALFORMED. */
int utp_packet_parse_untrusted(const byte *buf, size_t len, utp_packet *pk);
/* Writes a header (and SACK extension when sack_len > 0) into out, which has
 * room for UTP_HEADER_SIZE + 2 + sack_len bytes.  Returns bytes written. */
size_t utp_packet_write_header(byte *out, int type, uint16 conn_id, uint32 ts,
                               uint32 ts_diff, uint32 wnd, uint16 seq_nr,
                               uint16 ack_nr, const byte *sack, uint32 sack_len);
/* Appends padding extensions of pad bytes in all (at least 2) to a header
 * just written by utp_packet_write_header; returns the new header length. */
size_t utp_packet_add_padding(byte *out, size_t hlen, size_t pad);
int utp_sack_bit(const byte *sack, uint32 sack_len, uint32 bit);

/* Wrap-around sequence arithmetic (16 bits). */
static inline int seq_lt(uint16 a, uint16 b) { return (int16)(uint16)(a - b) < 0; }
static inline int seq_le(uint16 a, uint16 b) { return (int16)(uint16)(a - b) <= 0; }
static inline uint16 seq_dist(uint16 from, uint16 to) { return (uint16)(to - from); }

/* ---- buffers -------------------------------------------------------------- */

/* Room in front of a packet's payload for the header and the longest SACK,
 * so a datagram is sent straight from the retransmission buffer. */
#define UTP_HEADROOM (UTP_HEADER_SIZE + 2 + UTP_SACK_MAX_BYTES)
/* Packets of up to this much payload share one allocation size and are
 * recycled through a per-context pool instead of malloc/free each time. */
#define UTP_POOL_CAP 1472
#define UTP_POOL_MAX 1024

/* One packet in the retransmission buffer. */
typedef struct {
	uint64 time_sent;      /* microseconds, last transmission */
	uint32 payload;        /* bytes used */
	uint32 cap;            /* bytes allocated for payload */
	uint16 seq_nr;
	uint16 transmissions;  /* 0: queued, not sent yet */
	uint8 in_flight;       /* counted in cur_window */
	uint8 lost;            /* marked lost, waiting for retransmission */
	uint8 lost_by_timeout; /* the mark came from a retransmission timeout */
	uint8 sacked;          /* selectively acknowledged */
	uint8 is_fin;
	uint8 is_probe;        /* its first transmission was a padded MTU probe */
	uint8 zwp;             /* sent as a zero-window probe, not yet acknowledged */
	uint8 pooled;          /* allocated with UTP_POOL_CAP bytes of payload room */
	byte room[UTP_HEADROOM];
	byte data[];
} utp_outpkt;

/* One out-of-order packet held for reassembly. */
typedef struct {
	uint32 len;
	uint16 seq_nr;
	uint8 is_fin;
	byte data[];
} utp_inpkt;

/* A ring of pointers indexed by sequence number; capacity is a power of two
 * and grows on demand up to a limit, so an idle socket costs little. */
typedef struct {
	void **slots;
	uint32 mask;           /* capacity - 1; capacity 0 means slots == NULL */
} utp_ring;

int utp_ring_reserve(utp_ring *r, uint16 base, uint32 span, uint32 limit);
/* The slot a sequence number maps to; the caller checks that what it finds
 * there carries that sequence number (a slot is shared by every number that
 * is equal modulo the capacity). */
static inline void *utp_ring_slot(const utp_ring *r, uint16 seq)
{
	return r->slots ? r->slots[seq & r->mask] : NULL;
}
static inline void utp_ring_put(utp_ring *r, uint16 seq, void *p) { r->slots[seq & r->mask] = p; }
void utp_ring_free(utp_ring *r);

/* LEDBAT delay history: a rolling minimum over whole minutes for the base
 * delay and a short window of recent samples for the current delay. */
#define UTP_DELAY_BASE_MINUTES 3
#define UTP_DELAY_CUR_SAMPLES 4
typedef struct {
	uint32 base_min[UTP_DELAY_BASE_MINUTES];
	uint64 minute_start;
	uint32 minute_idx;
	uint32 cur[UTP_DELAY_CUR_SAMPLES];
	uint32 cur_idx;
	uint32 nsamples;
	uint64 last_sample_time;
} utp_delay_hist;

/* ---- socket ---------------------------------------------------------------- */

struct UTPSocket {
	utp_context *ctx;
	void *userdata;

	struct sockaddr_storage addr;
	socklen_t addrlen;
	uint16 recv_id;
	uint16 send_id;

	int state;                 /* UTPKIT_SOCK_* */
	unsigned is_acceptor : 1;
	unsigned in_table : 1;     /* present in the (addr, recv_id) table */
	unsigned fin_queued : 1;   /* FIN is in the outbuf */
	unsigned fin_acked : 1;
	unsigned got_fin : 1;      /* peer's FIN seen; eof_seq valid */
	unsigned eof_reported : 1;
	unsigned app_closed : 1;   /* utp_close called */
	unsigned shut_wr : 1;
	unsigned shut_rd : 1;      /* utp_shutdown(SHUT_RD): incoming data is acked and dropped */
	unsigned want_writable : 1;
	unsigned ack_pending : 1;
	unsigned in_ack_list : 1;
	unsigned zombie : 1;       /* waiting in the context's free list */
	unsigned slow_start : 1;
	unsigned rtt_valid : 1;
	unsigned tlp_sent : 1;     /* tail loss probe sent since the last ACK progress */
	unsigned in_recovery : 1;
	unsigned confirmed : 1;    /* acceptor: the initiator has sent something after its SYN */
	unsigned half_open : 1;    /* counted in the context's half-open totals (utp_accept.c) */
	unsigned peer_sacks : 1;   /* the peer has sent a SACK: its ACKs say what they cover */
	unsigned speak_unconfirmed : 1; /* acceptor: held data goes out though unconfirmed */

	/* lists: all sockets, hash chain, deferred ACKs, zombies */
	utp_socket *next, *prev;
	utp_socket *hnext;
	utp_socket *ack_next;
	utp_socket *zombie_next;

	/* timer heap */
	int heap_idx;              /* -1 when not in the heap */
	uint64 deadline;

	/* ---- send side ---- */
	uint16 seq_nr;             /* next sequence number to assign */
	uint16 next_send;          /* first never-transmitted sequence number */
	uint16 acked_seq;          /* everything up to here is acknowledged */
	uint16 recovery_seq;       /* no new window cut until acked past this */
	uint16 syn_seq;            /* our SYN (initiator) or the peer's (acceptor) */
	uint16 isn;                /* our first sequence number (acceptor: its SYN-ACK's seq_nr) */
	utp_ring outbuf;
	uint32 out_count;          /* packets in outbuf */
	uint32 cur_window;         /* bytes in flight */
	uint32 queued_bytes;       /* payload bytes in outbuf, sent or not */
	uint32 lost_count;         /* packets marked lost, not yet resent */
	uint32 sacked_count;       /* packets selectively acknowledged */
	uint32 small_in_flight;    /* partial packets in flight (Nagle-style coalescing) */
	uint32 cwnd;               /* congestion window, bytes (cwnd_exact rounded down) */
	double cwnd_exact;         /* keeps the fractions of a byte per-ACK gains add up to */
	uint32 ssthresh;
	uint32 peer_wnd;
	uint32 dup_acks;

	/* timing, microseconds */
	uint32 srtt, rttvar, rto;
	uint32 min_rtt;            /* smallest RTT sample (0: none yet) */
	uint32 dupthresh;          /* SACKed packets above a hole that make it lost (3, grows on reordering) */
	uint32 reo_wnd_mult;       /* RACK reordering window in quarters of srtt (1, grows on reordering) */
	uint32 prior_cwnd;         /* window before the last loss cut, for undo */
	uint32 prior_ssthresh;
	uint32 spurious;           /* retransmissions found unnecessary */
	uint32 reordered;          /* packets seen arriving behind later ones */
	uint16 highest_sacked;     /* highest sequence number SACKed (valid while sacked_count > 0) */
	uint32 zwp_interval;       /* microseconds between zero-window probes */
	uint16 zwp_seq;            /* the zero-window probe in flight, if zwp_pending */
	uint8 zwp_pending;
	uint64 rto_deadline;       /* 0: not armed */
	uint64 tlp_deadline;       /* 0: not armed */
	uint64 reorder_deadline;   /* 0: not armed (time-based loss detection) */
	uint64 zwp_deadline;       /* 0: not armed (zero-window probe) */
	uint64 pace_deadline;      /* 0: not armed (the pacer lets the next packet go then) */
	uint64 pace_stamp;         /* when pace_tokens was last refilled */
	uint64 rack_xmit_ts;       /* RACK: latest send time of a packet known delivered (0: none) */
	uint16 sack_limit;         /* last sequence number the peer's latest ACK said anything about */
	double pace_tokens;        /* bytes that may leave back to back now */
	uint32 pace_burst;         /* most bytes back to back (shrinks after burst losses) */
	uint64 syn_deadline;       /* initiator: SYN resend; acceptor: SYN-ACK repeat while data is held.  0: not armed */
	uint64 keepalive_deadline; /* 0: not armed */
	uint64 ack_due;            /* deferred ACK must go by then; 0: none */
	uint64 last_recv;
	uint64 last_send;
	uint32 consecutive_timeouts;
	uint32 probes_unanswered;
	uint32 syn_tries;
	uint64 syn_sent;           /* first SYN transmission, for the first RTT sample */

	/* LEDBAT */
	utp_delay_hist our_hist;   /* delay of our packets to the peer */
	utp_delay_hist their_hist; /* delay of the peer's packets to us */
	uint32 reply_micro;        /* last delay of the peer's packets, sent back */
	uint32 timeouts;
	uint32 loss_events;

	/* MTU */
	uint32 mtu_ceiling;        /* largest UDP payload we may try */
	uint32 mtu_floor;          /* never go below */
	uint32 mtu_cur;            /* UDP payload size of a full packet now */
	uint16 mtu_probe_seq;
	uint32 mtu_probe_size;     /* 0: no probe outstanding */

	/* ---- receive side ---- */
	uint16 ack_nr;             /* last in-order sequence number received */
	uint16 eof_seq;
	utp_ring inbuf;
	uint32 reorder_count;
	uint32 reorder_bytes;
	uint16 reorder_top;        /* highest sequence number held in inbuf */
	uint32 in_seg;             /* the peer's full DATA payload size, lately */
	uint32 bytes_since_ack;
	uint32 last_adv_wnd;       /* window we advertised last */

	/* options */
	uint32 sndbuf, rcvbuf, target_delay;

	utp_socket_stats stats;
};

/* ---- context --------------------------------------------------------------- */

/* A connection closed gracefully, remembered for a while (TCP's TIME_WAIT,
 * without keeping the socket): if our last ACK was lost, the peer resends
 * its FIN, and it must get that ACK again, not a RESET. */
typedef struct {
	struct sockaddr_storage addr;
	socklen_t addrlen;
	uint16 recv_id;
	uint16 send_id;
	uint16 ack_nr;             /* the last sequence number we acknowledged */
	uint16 seq_nr;             /* our next sequence number, for the STATE */
	uint8 have_fin;            /* ack_nr is the peer's FIN */
	uint64 expires;
	uint64 rto;                /* the socket's retransmission timeout */
	uint64 linger_until;       /* see utpkit_timewait_linger; 0: nothing to wait for */
} utp_timewait;

#define UTP_TIMEWAIT_MAX 256

/* Per source address state of utp_accept.c, in a small open-addressed table
 * keyed by the address (no port).  Each address has a slot of its own: a
 * flood source whose hash falls next to a legitimate client's must not
 * drain that client's SYN-ACK budget.  When the UTP_SRC_PROBE slots an
 * address may use are all taken, the one refilled longest ago that holds
 * no half-open socket is reused (its source starts afresh). */
typedef struct {
	uint64 addr[2];            /* the source address, as addr_words() gives it */
	uint64 refill;             /* last refill of tokens, microseconds */
	uint32 tokens;             /* SYN replies this source may still get */
	uint32 half_open;          /* accepted, unconfirmed sockets from here */
	uint32 used;
} utp_src_slot;

#define UTP_SRC_SLOTS 1024
#define UTP_SRC_PROBE 8

struct struct_utp_context {
	void *userdata;
	utp_callback_t *callbacks[UTP_ARRAY_SIZE];

	int log_normal, log_mtu, log_debug;
	uint32 opt_sndbuf, opt_rcvbuf, opt_target_delay;
	uint32 min_rto_ms, max_rto_ms, max_sockets, syn_timeout_ms, syn_retries;
	uint32 ack_delay_ms, keepalive_ms, dead_retries, reset_rate, mtu_probing;
	uint32 half_open_max, half_open_per_addr, synack_rate;

	utp_context_stats stats;
	utpkit_counters counters;

	/* (addr, recv_id) -> socket */
	utp_socket **buckets;
	uint32 nbuckets;           /* power of two */
	uint32 ntable;

	utp_socket *all;           /* every live socket */
	utp_socket *ack_list;      /* sockets with a deferred ACK */
	utp_socket *zombies;       /* to be freed when the outermost call returns */

	utp_socket **heap;
	uint32 heap_len, heap_cap;

	int depth;                 /* nesting of public calls (callbacks re-enter) */
	uint64 now;                /* microseconds, read once per outermost call */

	utp_outpkt **pool;         /* recycled packets (UTP_POOL_CAP) */
	uint32 pool_n;

	utp_timewait timewait[UTP_TIMEWAIT_MAX];
	uint32 timewait_next;      /* ring: the oldest entry is overwritten */

	uint64 reset_refill;       /* token bucket for RESETs */
	uint32 reset_tokens;

	/* utp_accept.c: bytes of unauthenticated input not yet spent on
	 * replies, the per-source table (allocated on first use) and the key
	 * of SYN cookies (drawn on first use, from UTP_GET_RANDOM). */
	uint64 unauth_credit;
	uint64 unauth_allow_refill;
	uint32 unauth_allow;       /* the standing allowance, bytes (see utp_accept.c) */
	utp_src_slot *src;
	uint32 cookie_key[4];
	int cookie_keyed;
	uint64 cookie_slot;        /* time slot of the latest cookie issued, + 1 (0: never) */

	byte scratch[65536 + 256]; /* one outgoing datagram */
};

/* ---- utp_context.c --------------------------------------------------------- */
void utp_ctx_enter(utp_context *ctx);
void utp_ctx_leave(utp_context *ctx);
uint32 utp_random32(utp_context *ctx);
uint64 utp_cb(utp_context *ctx, int id, utp_socket *s, const byte *buf, size_t len);
uint64 utp_cb_args(utp_context *ctx, utp_callback_arguments *a);
void utp_log(utp_context *ctx, utp_socket *s, int level, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void utp_state_change(utp_socket *s, int state);
void utp_report_error(utp_socket *s, int code);
int utp_table_insert(utp_context *ctx, utp_socket *s);
void utp_table_remove(utp_context *ctx, utp_socket *s);
utp_socket *utp_table_find(utp_context *ctx, const struct sockaddr *addr, socklen_t len, uint16 recv_id);
/* An AF_INET or AF_INET6 address of at least its structure's length. */
int utp_addr_valid(const struct sockaddr *a, socklen_t len);
int utp_addr_equal(const struct sockaddr *a, socklen_t alen, const struct sockaddr *b, socklen_t blen);
void utp_timer_update(utp_socket *s);   /* recompute s->deadline and fix the heap */
void utp_ack_defer(utp_socket *s);      /* queue for utp_issue_deferred_acks */
void utp_send_datagram(utp_context *ctx, const struct sockaddr *to, socklen_t tolen,
                       const byte *buf, size_t len, uint32 flags);
void utp_send_reset_to(utp_context *ctx, const struct sockaddr *to, socklen_t tolen,
                       uint16 conn_id, uint16 ack_nr, int rate_limited);
void utp_socket_destroy_later(utp_socket *s);
void utp_timewait_add(utp_socket *s);
int utp_timewait_answer(utp_context *ctx, const utp_packet *pk, const struct sockaddr *from, socklen_t fromlen);

/* ---- utp_accept.c ----------------------------------------------------------- */
/* Kinds of replies to unauthenticated packets: RESETs share the
 * UTPKIT_RESET_RATE bucket, SYN replies the per-source UTPKIT_SYNACK_RATE
 * bucket; every kind is also bounded by the bytes such packets brought in. */
enum { UTP_UNAUTH_RESET = 0, UTP_UNAUTH_SYNACK = 1, UTP_UNAUTH_OTHER = 2 };
/* An unauthenticated datagram of len bytes arrived (a SYN, or a packet for
 * no connection): it adds to what replies may spend. */
void utp_unauth_in(utp_context *ctx, size_t len);
/* May a reply of len bytes go to `to`?  1 (and charged) or 0 (counted). */
int utp_unauth_permit(utp_context *ctx, const struct sockaddr *to, socklen_t tolen, size_t len, int kind);
/* A SYN for no existing socket: validated, then accepted with state, answered
 * with a cookie, or refused. */
void utp_accept_syn(utp_context *ctx, const utp_packet *pk, size_t len, const struct sockaddr *from,
                    socklen_t fromlen);
/* A DATA, FIN or STATE for no socket: if it carries a cookie we issued, the
 * connection is created and the packet processed; returns 1 then. */
int utp_accept_cookie(utp_context *ctx, const utp_packet *pk, const struct sockaddr *from, socklen_t fromlen);
/* The initiator of an accepted socket spoke: it is no longer half-open. */
void utp_accept_confirmed(utp_socket *s);
/* The socket goes away or failed: drop it from the half-open totals. */
void utp_accept_release(utp_socket *s);
void utp_accept_free(utp_context *ctx);

/* ---- utp_socket.c ---------------------------------------------------------- */
utp_socket *utp_socket_new(utp_context *ctx);
void utp_socket_free(utp_socket *s);
void utp_socket_set_addr(utp_socket *s, const struct sockaddr *a);
void utp_socket_on_timer(utp_socket *s);
void utp_socket_fail(utp_socket *s, int code);
void utp_socket_maybe_finish(utp_socket *s);
uint64 utp_socket_next_deadline(const utp_socket *s);

/* ---- utp_output.c ---------------------------------------------------------- */
void utp_pool_free(utp_context *ctx);
void utp_out_free_all(utp_socket *s);
size_t utp_out_queue(utp_socket *s, const struct utp_iovec *iov, size_t n);
int utp_out_queue_fin(utp_socket *s);
void utp_out_flush(utp_socket *s);
void utp_out_flush_probe(utp_socket *s);
void utp_out_send_ack(utp_socket *s);
void utp_out_send_synack(utp_socket *s);
void utp_out_send_syn(utp_socket *s);
void utp_out_send_keepalive(utp_socket *s);
int utp_out_on_ack(utp_socket *s, const utp_packet *pk);
void utp_out_repacketize(utp_socket *s);
void utp_out_on_rto(utp_socket *s);
void utp_out_on_tlp(utp_socket *s);
/* on_ack: called for an arriving ACK (the head rule applies), not a timer. */
void utp_out_detect_losses(utp_socket *s, int on_ack);
void utp_out_mark_lost(utp_socket *s, utp_outpkt *p, int by_timeout);
void utp_out_maybe_writable(utp_socket *s);
uint32 utp_out_payload_max(const utp_socket *s);

/* ---- utp_input.c ----------------------------------------------------------- */
void utp_in_free_all(utp_socket *s);
void utp_in_on_packet(utp_socket *s, const utp_packet *pk);
uint32 utp_in_build_sack(utp_socket *s, byte *out);
uint32 utp_in_window(utp_socket *s);

/* ---- utp_ledbat.c ---------------------------------------------------------- */
void utp_cc_init(utp_socket *s);
void utp_rtt_sample(utp_socket *s, uint32 rtt_us);
uint32 utp_rto_base(const utp_socket *s);
void utp_rto_backoff(utp_socket *s);
void utp_delay_add(utp_delay_hist *h, uint32 sample, uint64 now);
uint32 utp_delay_base(const utp_delay_hist *h);
uint32 utp_delay_queueing(const utp_delay_hist *h);
void utp_cc_on_ack(utp_socket *s, uint32 bytes_acked, uint32 flight_before);
void utp_cc_on_loss(utp_socket *s);
void utp_cc_on_timeout(utp_socket *s);
void utp_cc_undo(utp_socket *s);

/* Pacing (utp_ledbat.c): the window is spread over the round trip in bursts
 * of at most pace_burst bytes.  A receiver on a stock 208 KiB socket buffer
 * holds about 90 full packets (the kernel charges ~2.3 KiB each) behind a
 * busy reader: a connection starts with bursts of a third of that, grows
 * them by a packet per loss-free window up to one GSO batch (64 datagrams,
 * which an empty buffer still takes), and a run of consecutive losses halves
 * them. */
#define UTP_PACE_BURST_START (32 * 1400u)
#define UTP_PACE_BURST_MAX (64 * 1400u)
#define UTP_PACE_BURST_MIN (4 * 1400u)
/* Losing this many packets in a row is a burst loss: the burst was more than
 * the receiver's socket absorbed. */
#define UTP_BURST_LOSS_RUN 8
/* 0 when a packet of `bytes` may go now; otherwise the time it may. */
uint64 utp_pace_wait(utp_socket *s, uint32 bytes);
void utp_pace_consume(utp_socket *s, uint32 bytes);
void utp_pace_on_burst_loss(utp_socket *s, uint32 run);
void utp_pace_on_ack(utp_socket *s, uint32 bytes_acked);

/* ---- utp_mtu.c ------------------------------------------------------------- */
void utp_mtu_init(utp_socket *s);
uint32 utp_mtu_probe_size(const utp_socket *s);
void utp_mtu_probe_acked(utp_socket *s, uint32 size);
void utp_mtu_probe_lost(utp_socket *s, uint32 size);
void utp_mtu_on_icmp(utp_socket *s, uint16 next_hop_mtu, uint16 seq_nr, int have_seq);
void utp_mtu_on_blackhole(utp_socket *s);

#define UTP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define UTP_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif /* UTP_INTERNAL_H */
