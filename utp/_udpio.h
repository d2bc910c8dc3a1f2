/*
 * _udpio.h -- the real-socket hot path of the binding utp._utp (Linux).
 *
 * Batched UDP I/O between one non-blocking socket and one engine context:
 * recvmmsg into a preallocated ring, classification in C, uTP datagrams
 * straight into utp_process_udp, everything else into a queue for Python;
 * the error queue (IP_RECVERR) turned into utp_process_icmp_* calls; the
 * engine's outgoing datagrams flushed with sendmmsg, with UDP GSO for runs
 * of equal-size datagrams to one destination.  No per-packet allocation, no
 * Python: utp/_utp.pyx calls these with the GIL released.
 *
 * The binding includes _udpio.c into its own translation unit (a unity
 * build: `cdef extern from "_udpio.c"` in utp/_utp.pxd), so setup.py needs
 * no extra source; the file also compiles on its own for a C-only harness.
 */
#ifndef UTPKIT_UDPIO_H
#define UTPKIT_UDPIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "utp.h"

/* One queued datagram.  Payloads live back to back in udpio_queue.data, in
 * queue order, so a run of datagrams is one contiguous byte range (which is
 * what a UDP GSO send wants).  `flags` holds UTP_UDP_DONTFRAG for outgoing
 * datagrams and the UTPKIT_CLASS_* of a received non-uTP datagram. */
typedef struct {
	size_t offset;
	size_t length;
	uint32_t flags;
	socklen_t addrlen;
	struct sockaddr_storage addr;
} udpio_dgram;

typedef struct {
	udpio_dgram *dg;
	size_t n;
	size_t cap;
	unsigned char *data;
	size_t len;
	size_t data_cap;
} udpio_queue;

/* Append a datagram: 0, or -1 when memory ran out (nothing was added). */
int udpio_queue_push(udpio_queue *q, const void *buf, size_t len, const struct sockaddr *addr,
                     socklen_t addrlen, uint32_t flags);
/* Forget every entry; keep the memory. */
void udpio_queue_clear(udpio_queue *q);
/* Free the memory; the queue is empty and usable afterwards. */
void udpio_queue_free(udpio_queue *q);

/* The one place where address forms change.  family AF_INET gives the
 * engine's form: an IPv4-mapped IPv6 address ::ffff:a.b.c.d becomes an
 * AF_INET one (so a peer reached over a dual-stack socket has exactly one
 * address form); family AF_INET6 gives what an AF_INET6 socket needs: an
 * AF_INET address becomes ::ffff:a.b.c.d.  Anything else is copied as is.
 * Returns the length of *out. */
socklen_t udpio_addr_convert(int family, const struct sockaddr *in, socklen_t inlen,
                             struct sockaddr_storage *out);

/* Counters; all only ever grow.  Error counts by errno are in udpio.errs. */
typedef struct {
	uint64_t recv_calls;        /* recvmmsg system calls */
	uint64_t recv_datagrams;    /* datagrams received (GRO segments counted one by one) */
	uint64_t recv_bytes;
	uint64_t recv_utp;          /* per class, as utpkit_classify says */
	uint64_t recv_dht;
	uint64_t recv_tracker;
	uint64_t recv_other;
	uint64_t recv_gro_batches;  /* received buffers that held several GRO segments */
	uint64_t truncated;         /* datagrams larger than the receive slot: dropped */
	uint64_t other_dropped;     /* non-uTP datagrams dropped: the take_other() queue was full */
	uint64_t kernel_drops;      /* the kernel's SO_RXQ_OVFL count: dropped for a full receive buffer */
	uint64_t errqueue_calls;    /* recvmsg(MSG_ERRQUEUE) system calls */
	uint64_t errqueue_msgs;     /* messages read from the error queue */
	uint64_t icmp_unreach;      /* port unreachable (ICMP or ICMPv6) */
	uint64_t icmp_frag;         /* fragmentation needed / packet too big */
	uint64_t icmp_other;        /* other ICMP errors: counted, not acted on */
	uint64_t local_errors;      /* locally generated errors (SO_EE_ORIGIN_LOCAL) */
	uint64_t icmp_to_engine;    /* utp_process_icmp_error/_fragmentation calls */
	uint64_t icmp_matched;      /* ... that the engine matched to a socket */
	uint64_t icmp_dropped;      /* ICMP reports lost: the pending list was full */
	uint64_t send_calls;        /* sendmmsg/sendmsg system calls */
	uint64_t sent_datagrams;
	uint64_t sent_bytes;
	uint64_t send_eagain;       /* sends stopped by a full socket buffer (EAGAIN) */
	uint64_t send_enobufs;      /* sends stopped by ENOBUFS (a full device queue) */
	uint64_t send_retries;      /* sends retried after an error that was a pending ICMP report */
	uint64_t send_dropped;      /* datagrams dropped for an error (by errno: udpio_get_err) */
	uint64_t gso_batches;       /* GSO sends (several datagrams in one message) */
	uint64_t gso_datagrams;     /* datagrams sent in those */
	uint64_t gso_failed;        /* GSO sends refused by the kernel (resent one by one; after 8, GSO is off) */
	uint64_t dontfrag_sent;     /* datagrams sent with DF set */
	uint64_t emsgsize;          /* DONTFRAG datagrams refused as too big: fed to the engine */
} udpio_stats;

/* Errors are counted by errno, apart for receiving (recvmmsg failures other
 * than EAGAIN: asynchronous errors left by ICMP reports) and sending (every
 * failed send other than EAGAIN/ENOBUFS, including the ones retried).
 * errno values past the table count in slot 0. */
#define UDPIO_NERRS 160
enum { UDPIO_RECV = 0, UDPIO_SEND = 1 };

/* The socket facts udpio_setup reports. */
typedef struct {
	int family;
	int rcvbuf;    /* getsockopt(SO_RCVBUF) after the request: what the kernel granted */
	int sndbuf;
	int rmem_max;  /* /proc/sys/net/core/rmem_max, -1 if unreadable */
	int wmem_max;
	int gso_supported; /* the kernel accepts UDP_SEGMENT */
	int gso;       /* ... and udpio_send will use it */
	int gro;       /* UDP_GRO enabled: udpio_recv splits coalesced datagrams */
	int recverr;   /* IP_RECVERR / IPV6_RECVERR enabled */
} udpio_setup_info;

typedef struct udpio udpio;

/* A new I/O state, or NULL when memory ran out.  The receive ring is
 * allocated on the first udpio_recv. */
udpio *udpio_new(void);
void udpio_free(udpio *io);
const udpio_stats *udpio_get_stats(const udpio *io);
/* The error count of one direction (UDPIO_RECV/UDPIO_SEND) for one errno. */
uint64_t udpio_get_err(const udpio *io, int dir, int err);
/* Non-uTP datagrams received, oldest first; the caller drains and clears it. */
udpio_queue *udpio_other(udpio *io);

/* Prepare socket fd: error queue, buffer sizes (rcvbuf/sndbuf < 0: as big
 * as rmem_max/wmem_max allow, capped at 8 MiB; otherwise exactly that
 * request), the kernel drop counter, GSO for sending (if gso != 0 and the
 * kernel has UDP_SEGMENT), GRO for receiving (if gro != 0 and the kernel has
 * UDP_GRO).  With force, SO_RCVBUFFORCE/SO_SNDBUFFORCE are tried first
 * (they need CAP_NET_ADMIN).  0, or -errno when fd is not a UDP socket. */
int udpio_setup(udpio *io, int fd, int rcvbuf, int sndbuf, int force, int gso, int gro,
                udpio_setup_info *info);

/* Read up to `budget` datagrams: uTP ones go to utp_process_udp, the others
 * into udpio_other(); errors waiting on the error queue go to the engine.
 * Returns the number of datagrams read, or -errno for an error that makes
 * the socket unusable (EBADF, ENOTSOCK, ...). */
int udpio_recv(udpio *io, utp_context *ctx, int fd, int budget);

/* Send what q holds, in order.  Never calls the engine: reports it must see
 * (a DONTFRAG datagram refused with EMSGSIZE) wait for udpio_feedback.  Sent
 * and dropped datagrams leave q; on EAGAIN/ENOBUFS the rest stays, in order.
 * Returns how many remain (0: all gone), or -errno for an unusable socket. */
int udpio_send(udpio *io, udpio_queue *q, int fd);

/* Hand pending ICMP and EMSGSIZE reports to the engine (which may queue new
 * datagrams).  Returns how many were handed over. */
int udpio_feedback(udpio *io, utp_context *ctx);

/* The destinations of port unreachable reports (ICMP/ICMPv6) that no uTP
 * socket claimed -- DHT and tracker traffic -- since the last call, oldest
 * first, at most `max` (and at most the last 32 kept).  Returns how many. */
int udpio_take_unreachable(udpio *io, struct sockaddr_storage *out, socklen_t *lens, int max);

/* Benchmark helpers (python -m utp.bench): the raw-UDP ceiling on this
 * machine, no protocol at all.  blast_send sends `count` datagrams of `size`
 * bytes to `to` with sendmmsg (waiting when the buffer is full) and returns
 * how many went; blast_recv reads with recvmmsg until `count` datagrams came
 * or none came for idle_ms, and reports the bytes and the seconds from the
 * first datagram to the last. */
long udpio_blast_send(int fd, const struct sockaddr *to, socklen_t tolen, int size, long count);
long udpio_blast_recv(int fd, long count, int idle_ms, long long *bytes, double *seconds);

#endif /* UTPKIT_UDPIO_H */
