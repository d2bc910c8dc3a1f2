/*
 * _udpio.c -- batched UDP socket I/O for one engine context (see _udpio.h).
 *
 * Linux only (recvmmsg, sendmmsg, IP_RECVERR, UDP_SEGMENT, UDP_GRO).  The
 * kernel constants and struct sock_extended_err are spelled out below when
 * the C library's headers lack them (musl), so only <sys/socket.h> and
 * the <netinet/> headers are needed.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "_udpio.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <poll.h>
#include <time.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef IP_RECVERR
#define IP_RECVERR 11
#endif
#ifndef IP_MTU
#define IP_MTU 14
#endif
#ifndef IP_MTU_DISCOVER
#define IP_MTU_DISCOVER 10
#endif
#ifndef IP_PMTUDISC_DO
#define IP_PMTUDISC_DO 2
#endif
#ifndef IPV6_MTU
#define IPV6_MTU 24
#endif
#ifndef IPV6_RECVERR
#define IPV6_RECVERR 25
#endif
#ifndef IPV6_DONTFRAG
#define IPV6_DONTFRAG 62
#endif
#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif
#ifndef SO_RCVBUFFORCE
#define SO_RCVBUFFORCE 33
#endif
#ifndef SO_SNDBUFFORCE
#define SO_SNDBUFFORCE 32
#endif

/* struct sock_extended_err of <linux/errqueue.h>: a stable kernel ABI. */
struct udpio_ee {
	uint32_t ee_errno;
	uint8_t ee_origin;
	uint8_t ee_type;
	uint8_t ee_code;
	uint8_t ee_pad;
	uint32_t ee_info;
	uint32_t ee_data;
};
#define EE_ORIGIN_LOCAL 1
#define EE_ORIGIN_ICMP 2
#define EE_ORIGIN_ICMP6 3

/* Receive ring: RX_BATCH slots of 64 KiB, so no datagram is ever truncated
 * (the largest UDP payload is 65507 bytes over IPv4, 65527 over IPv6) and a
 * GRO batch fits.  Only the pages a datagram touches become resident.  The
 * stride is not a power of two so the slots' first cache lines do not all
 * fall into the same L1/L2 sets. */
#define RX_BATCH 64
#define RX_SLOT 65536
#define RX_STRIDE (RX_SLOT + 320)
#define TX_BATCH 64
/* A GSO send: at most UDP_MAX_SEGMENTS (64 since Linux 4.18) segments and
 * one IP datagram's worth of payload. */
#define GSO_MAX_SEGS 64
#define GSO_MAX_BYTES 65000
#define GSO_MAX_FAILURES 8
/* Bounds of what waits for Python: take_other() is drained after every
 * batch, so these only stop a caller that never drains from growing memory. */
#define OTHER_MAX_N 65536
#define OTHER_MAX_BYTES (16u << 20)
/* ICMP reports waiting for the engine, and what is kept of each: the uTP
 * header (20 bytes) is all the engine looks at. */
#define PEND_MAX 128
#define UNREACH_MAX 32
#define PEND_PAYLOAD 64
#define ERRQ_MAX_PER_DRAIN 256
#define DEFAULT_BUF_CAP (8 << 20)

enum { PEND_UNREACH = 1, PEND_FRAG = 2 };

typedef struct {
	int kind;
	uint16_t mtu;
	uint16_t plen;
	socklen_t alen;
	struct sockaddr_storage addr;
	unsigned char payload[PEND_PAYLOAD];
} udpio_pending;

typedef union {
	struct cmsghdr align;
	char buf[64];
} udpio_ctl;

struct udpio {
	int fd;               /* the socket family/pmtu_default describe, -1: none */
	int family;
	int pmtu_default;     /* IP_MTU_DISCOVER to restore after a DONTFRAG send, -1: unknown */
	int gso;
	int gro;
	int errq_pending;     /* a send saw an error the error queue explains */
	int local_mtu;        /* ee_info of the last local EMSGSIZE report */
	unsigned char *rx;
	struct mmsghdr rmsg[RX_BATCH];
	struct iovec riov[RX_BATCH];
	struct sockaddr_storage rname[RX_BATCH];
	udpio_ctl rctl[RX_BATCH];
	struct mmsghdr smsg[TX_BATCH];
	struct iovec siov[TX_BATCH];
	struct sockaddr_storage sname[TX_BATCH];
	udpio_ctl sctl[TX_BATCH];
	size_t scount[TX_BATCH];
	int npend;
	udpio_pending pend[PEND_MAX];
	/* Port unreachable reports no uTP socket claimed (DHT and tracker
	 * destinations), newest last, for udpio_take_unreachable. */
	int nunreach;
	struct sockaddr_storage unreach[UNREACH_MAX];
	socklen_t unreach_len[UNREACH_MAX];
	udpio_queue other;
	udpio_stats st;
	uint64_t errs[2][UDPIO_NERRS];
};

/* ---- queues ------------------------------------------------------------ */

static int grow(void **p, size_t *cap, size_t need, size_t item, size_t minimum)
{
	size_t ncap = *cap;
	void *np;
	if (need <= ncap)
		return 0;
	if (ncap < minimum)
		ncap = minimum;
	while (ncap < need)
		ncap *= 2;
	np = realloc(*p, ncap * item);
	if (np == NULL)
		return -1;
	*p = np;
	*cap = ncap;
	return 0;
}

int udpio_queue_push(udpio_queue *q, const void *buf, size_t len, const struct sockaddr *addr,
                     socklen_t addrlen, uint32_t flags)
{
	udpio_dgram *d;
	if (addrlen > sizeof(struct sockaddr_storage))
		addrlen = sizeof(struct sockaddr_storage);
	if (grow((void **)&q->dg, &q->cap, q->n + 1, sizeof(udpio_dgram), 64) < 0 ||
	    grow((void **)&q->data, &q->data_cap, q->len + len, 1, 65536) < 0)
		return -1;
	d = &q->dg[q->n];
	d->offset = q->len;
	d->length = len;
	d->flags = flags;
	d->addrlen = addrlen;
	memset(&d->addr, 0, sizeof(d->addr));
	if (addr != NULL && addrlen > 0)
		memcpy(&d->addr, addr, addrlen);
	if (len > 0)
		memcpy(q->data + q->len, buf, len);
	q->len += len;
	q->n++;
	return 0;
}

void udpio_queue_clear(udpio_queue *q)
{
	q->n = 0;
	q->len = 0;
}

void udpio_queue_free(udpio_queue *q)
{
	free(q->dg);
	free(q->data);
	memset(q, 0, sizeof(*q));
}

/* Drop the first i entries, keeping the rest in order. */
static void queue_consume(udpio_queue *q, size_t i)
{
	size_t base, j;
	if (i == 0)
		return;
	if (i >= q->n) {
		q->n = 0;
		q->len = 0;
		return;
	}
	base = q->dg[i].offset;
	memmove(q->dg, q->dg + i, (q->n - i) * sizeof(udpio_dgram));
	q->n -= i;
	memmove(q->data, q->data + base, q->len - base);
	q->len -= base;
	for (j = 0; j < q->n; j++)
		q->dg[j].offset -= base;
}

/* ---- addresses ------------------------------------------------------------ */

static const unsigned char v4mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

socklen_t udpio_addr_convert(int family, const struct sockaddr *in, socklen_t inlen,
                             struct sockaddr_storage *out)
{
	memset(out, 0, sizeof(*out));
	if (inlen > sizeof(*out))
		inlen = sizeof(*out);
	if (family == AF_INET && in->sa_family == AF_INET6 && inlen >= sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)in;
		if (memcmp(s6->sin6_addr.s6_addr, v4mapped_prefix, 12) == 0) {
			struct sockaddr_in *s4 = (struct sockaddr_in *)out;
			s4->sin_family = AF_INET;
			s4->sin_port = s6->sin6_port;
			memcpy(&s4->sin_addr, s6->sin6_addr.s6_addr + 12, 4);
			return sizeof(struct sockaddr_in);
		}
	} else if (family == AF_INET6 && in->sa_family == AF_INET && inlen >= sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)in;
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)out;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = s4->sin_port;
		memcpy(s6->sin6_addr.s6_addr, v4mapped_prefix, 12);
		memcpy(s6->sin6_addr.s6_addr + 12, &s4->sin_addr, 4);
		return sizeof(struct sockaddr_in6);
	}
	memcpy(out, in, inlen);
	return inlen;
}

/* Does this destination (in any form) travel over IPv4? */
static int is_v4_path(const struct sockaddr_storage *a)
{
	const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)a;
	if (a->ss_family == AF_INET)
		return 1;
	return a->ss_family == AF_INET6 && memcmp(s6->sin6_addr.s6_addr, v4mapped_prefix, 12) == 0;
}

/* ---- state ---------------------------------------------------------------- */

udpio *udpio_new(void)
{
	udpio *io = calloc(1, sizeof(udpio));
	if (io == NULL)
		return NULL;
	io->fd = -1;
	io->pmtu_default = -1;
	return io;
}

void udpio_free(udpio *io)
{
	if (io == NULL)
		return;
	free(io->rx);
	udpio_queue_free(&io->other);
	free(io);
}

const udpio_stats *udpio_get_stats(const udpio *io)
{
	return &io->st;
}

uint64_t udpio_get_err(const udpio *io, int dir, int err)
{
	if (dir != UDPIO_RECV && dir != UDPIO_SEND)
		return 0;
	if (err <= 0 || err >= UDPIO_NERRS)
		err = 0;
	return io->errs[dir][err];
}

udpio_queue *udpio_other(udpio *io)
{
	return &io->other;
}

static void count_err(udpio *io, int dir, int err, uint64_t n)
{
	io->errs[dir][(err > 0 && err < UDPIO_NERRS) ? err : 0] += n;
}

/* The family of socket fd, from a cache refreshed when fd changes. */
static int sock_family(udpio *io, int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	if (fd == io->fd && io->family != 0)
		return io->family;
	memset(&ss, 0, sizeof(ss));
	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		return -errno;
	io->fd = fd;
	io->family = ss.ss_family;
	io->pmtu_default = -1;
	return io->family;
}

/* Errors after which the socket cannot be used at all. */
static int is_fatal(int err)
{
	return err == EBADF || err == ENOTSOCK || err == EFAULT || err == EOPNOTSUPP || err == ENOSYS;
}

/* ---- setup ---------------------------------------------------------------- */

static int read_proc_int(const char *path)
{
	char buf[32];
	ssize_t n;
	long v = 0;
	int i, fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	for (i = 0; i < n && buf[i] >= '0' && buf[i] <= '9'; i++) {
		v = v * 10 + (buf[i] - '0');
		if (v > 0x7fffffff)
			return 0x7fffffff;
	}
	return i ? (int)v : -1;
}

static int get_int(int fd, int level, int name)
{
	int v = -1;
	socklen_t len = sizeof(v);
	if (getsockopt(fd, level, name, &v, &len) < 0)
		return -1;
	return v;
}

static int set_int(int fd, int level, int name, int v)
{
	return setsockopt(fd, level, name, &v, sizeof(v));
}

static int set_buf(int fd, int name, int force_name, int want, int force, int explicit_size)
{
	/* The kernel doubles the request (for its bookkeeping) and reports the
	 * doubled value, so a default-size request only helps when it asks for
	 * more than half of what the socket has. */
	if (!explicit_size && (long)want * 2 <= (long)get_int(fd, SOL_SOCKET, name))
		return 0;
	if (force && set_int(fd, SOL_SOCKET, force_name, want) == 0)
		return 0;
	return set_int(fd, SOL_SOCKET, name, want);
}

int udpio_setup(udpio *io, int fd, int rcvbuf, int sndbuf, int force, int gso, int gro,
                udpio_setup_info *info)
{
	int fam, want, ok;
	memset(info, 0, sizeof(*info));
	io->fd = -1; /* re-read the family and the PMTU mode: fd may be a new socket */
	fam = sock_family(io, fd);
	if (fam < 0)
		return fam;
	if (get_int(fd, SOL_SOCKET, SO_TYPE) != SOCK_DGRAM)
		return -EPROTOTYPE;
	if (fam != AF_INET && fam != AF_INET6)
		return -EAFNOSUPPORT;
	info->family = fam;

	/* ICMP errors onto the error queue.  An AF_INET6 socket needs both: its
	 * IPv4-mapped traffic is IPv4 inside the kernel. */
	if (fam == AF_INET) {
		info->recverr = set_int(fd, IPPROTO_IP, IP_RECVERR, 1) == 0;
	} else {
		info->recverr = set_int(fd, IPPROTO_IPV6, IPV6_RECVERR, 1) == 0;
		(void)set_int(fd, IPPROTO_IP, IP_RECVERR, 1);
	}

	info->rmem_max = read_proc_int("/proc/sys/net/core/rmem_max");
	info->wmem_max = read_proc_int("/proc/sys/net/core/wmem_max");
	want = rcvbuf >= 0 ? rcvbuf : (info->rmem_max > 0 && info->rmem_max < DEFAULT_BUF_CAP ? info->rmem_max : DEFAULT_BUF_CAP);
	(void)set_buf(fd, SO_RCVBUF, SO_RCVBUFFORCE, want, force, rcvbuf >= 0);
	want = sndbuf >= 0 ? sndbuf : (info->wmem_max > 0 && info->wmem_max < DEFAULT_BUF_CAP ? info->wmem_max : DEFAULT_BUF_CAP);
	(void)set_buf(fd, SO_SNDBUF, SO_SNDBUFFORCE, want, force, sndbuf >= 0);
	info->rcvbuf = get_int(fd, SOL_SOCKET, SO_RCVBUF);
	info->sndbuf = get_int(fd, SOL_SOCKET, SO_SNDBUF);

	/* Drops for a full receive buffer, reported with every datagram. */
	(void)set_int(fd, SOL_SOCKET, SO_RXQ_OVFL, 1);

	/* GSO probe: 0 is the default segment size (off), so this changes nothing. */
	info->gso_supported = set_int(fd, SOL_UDP, UDP_SEGMENT, 0) == 0;
	io->gso = info->gso_supported && gso;
	info->gso = io->gso;
	ok = set_int(fd, SOL_UDP, UDP_GRO, gro ? 1 : 0) == 0;
	io->gro = gro && ok;
	info->gro = io->gro;

	io->pmtu_default = get_int(fd, IPPROTO_IP, IP_MTU_DISCOVER);
	return 0;
}

/* ---- the error queue -------------------------------------------------- */

static void pend_push(udpio *io, int kind, uint16_t mtu, const struct sockaddr_storage *addr,
                      socklen_t alen, const unsigned char *payload, size_t plen)
{
	udpio_pending *p;
	if (io->npend >= PEND_MAX) {
		io->st.icmp_dropped++;
		return;
	}
	p = &io->pend[io->npend++];
	p->kind = kind;
	p->mtu = mtu;
	p->alen = alen;
	memcpy(&p->addr, addr, sizeof(*addr));
	if (plen > PEND_PAYLOAD)
		plen = PEND_PAYLOAD;
	p->plen = (uint16_t)plen;
	memcpy(p->payload, payload, plen);
}

/* Remember a port unreachable report the engine did not claim; when the
 * list is full the oldest goes (the newest reports are what callers wait for). */
static void unreach_push(udpio *io, const struct sockaddr_storage *addr, socklen_t alen)
{
	if (io->nunreach >= UNREACH_MAX) {
		memmove(&io->unreach[0], &io->unreach[1], sizeof(io->unreach[0]) * (UNREACH_MAX - 1));
		memmove(&io->unreach_len[0], &io->unreach_len[1], sizeof(io->unreach_len[0]) * (UNREACH_MAX - 1));
		io->nunreach = UNREACH_MAX - 1;
	}
	memcpy(&io->unreach[io->nunreach], addr, sizeof(*addr));
	io->unreach_len[io->nunreach] = alen;
	io->nunreach++;
}

/* Read the error queue dry.  Port unreachable and fragmentation needed
 * become pending reports for the engine (the quoted payload identifies the
 * connection, msg_name is where we had sent it); local EMSGSIZE reports
 * carry the MTU for a DONTFRAG datagram that was refused (io->local_mtu). */
static void drain_errq(udpio *io, int fd)
{
	int k;
	io->errq_pending = 0;
	for (k = 0; k < ERRQ_MAX_PER_DRAIN; k++) {
		unsigned char buf[PEND_PAYLOAD];
		struct sockaddr_storage name, addr;
		union {
			struct cmsghdr align;
			char buf[512];
		} ctl;
		struct iovec iov;
		struct msghdr h;
		struct cmsghdr *c;
		const struct udpio_ee *ee = NULL;
		struct udpio_ee eev;
		socklen_t alen;
		ssize_t r;
		int kind = 0;
		uint16_t mtu = 0;

		memset(&h, 0, sizeof(h));
		memset(&name, 0, sizeof(name));
		iov.iov_base = buf;
		iov.iov_len = sizeof(buf);
		h.msg_name = &name;
		h.msg_namelen = sizeof(name);
		h.msg_iov = &iov;
		h.msg_iovlen = 1;
		h.msg_control = ctl.buf;
		h.msg_controllen = sizeof(ctl.buf);
		r = recvmsg(fd, &h, MSG_ERRQUEUE | MSG_DONTWAIT);
		io->st.errqueue_calls++;
		if (r < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		io->st.errqueue_msgs++;
		for (c = CMSG_FIRSTHDR(&h); c != NULL; c = CMSG_NXTHDR(&h, c)) {
			if ((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_RECVERR) ||
			    (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_RECVERR)) {
				if (c->cmsg_len >= CMSG_LEN(sizeof(eev))) {
					memcpy(&eev, CMSG_DATA(c), sizeof(eev));
					ee = &eev;
				}
			}
		}
		if (ee == NULL)
			continue;
		if (ee->ee_origin == EE_ORIGIN_ICMP) {
			if (ee->ee_type == 3 && ee->ee_code == 3)
				kind = PEND_UNREACH;      /* destination unreachable: port */
			else if (ee->ee_type == 3 && ee->ee_code == 4)
				kind = PEND_FRAG;         /* fragmentation needed and DF set */
		} else if (ee->ee_origin == EE_ORIGIN_ICMP6) {
			if (ee->ee_type == 1 && ee->ee_code == 4)
				kind = PEND_UNREACH;      /* destination unreachable: port */
			else if (ee->ee_type == 2)
				kind = PEND_FRAG;         /* packet too big */
		} else if (ee->ee_origin == EE_ORIGIN_LOCAL) {
			io->st.local_errors++;
			if (ee->ee_errno == EMSGSIZE)
				io->local_mtu = (int)ee->ee_info;
			continue;
		}
		if (kind == PEND_UNREACH) {
			io->st.icmp_unreach++;
		} else if (kind == PEND_FRAG) {
			io->st.icmp_frag++;
			mtu = ee->ee_info > 0xffff ? 0xffff : (uint16_t)ee->ee_info;
		} else {
			/* Host/network unreachable and the like: routers send them
			 * during route changes too, so they are soft errors (as in
			 * TCP); the engine's timeouts decide. */
			io->st.icmp_other++;
			continue;
		}
		if (h.msg_namelen == 0)
			continue;
		alen = udpio_addr_convert(AF_INET, (const struct sockaddr *)&name, h.msg_namelen, &addr);
		pend_push(io, kind, mtu, &addr, alen, buf, (size_t)r);
	}
}

int udpio_feedback(udpio *io, utp_context *ctx)
{
	int i, n = io->npend;
	io->npend = 0;
	for (i = 0; i < n; i++) {
		const udpio_pending *p = &io->pend[i];
		int r;
		if (p->kind == PEND_UNREACH)
			r = utp_process_icmp_error(ctx, p->payload, p->plen, (const struct sockaddr *)&p->addr, p->alen);
		else
			r = utp_process_icmp_fragmentation(ctx, p->payload, p->plen, (const struct sockaddr *)&p->addr,
			                                   p->alen, p->mtu);
		io->st.icmp_to_engine++;
		if (r)
			io->st.icmp_matched++;
		else if (p->kind == PEND_UNREACH)
			unreach_push(io, &p->addr, p->alen);
	}
	return n;
}

int udpio_take_unreachable(udpio *io, struct sockaddr_storage *out, socklen_t *lens, int max)
{
	int i, n = io->nunreach < max ? io->nunreach : max;
	for (i = 0; i < n; i++) {
		memcpy(&out[i], &io->unreach[i], sizeof(out[i]));
		lens[i] = io->unreach_len[i];
	}
	io->nunreach = 0;
	return n;
}

/* ---- receiving ------------------------------------------------------------ */

static void deliver(udpio *io, utp_context *ctx, const unsigned char *p, size_t n,
                    const struct sockaddr_storage *src, socklen_t alen)
{
	int cls = utpkit_classify(p, n);
	io->st.recv_datagrams++;
	io->st.recv_bytes += n;
	switch (cls) {
	case UTPKIT_CLASS_UTP:
		io->st.recv_utp++;
		utp_process_udp(ctx, p, n, (const struct sockaddr *)src, alen);
		return;
	case UTPKIT_CLASS_DHT:
		io->st.recv_dht++;
		break;
	case UTPKIT_CLASS_TRACKER:
		io->st.recv_tracker++;
		break;
	default:
		io->st.recv_other++;
		break;
	}
	if (io->other.n >= OTHER_MAX_N || io->other.len + n > OTHER_MAX_BYTES ||
	    udpio_queue_push(&io->other, p, n, (const struct sockaddr *)src, alen, (uint32_t)cls) < 0)
		io->st.other_dropped++;
}

static int rx_alloc(udpio *io)
{
	int i;
	if (io->rx != NULL)
		return 0;
	io->rx = malloc((size_t)RX_BATCH * RX_STRIDE);
	if (io->rx == NULL)
		return -1;
	for (i = 0; i < RX_BATCH; i++) {
		struct msghdr *h = &io->rmsg[i].msg_hdr;
		io->riov[i].iov_base = io->rx + (size_t)i * RX_STRIDE;
		io->riov[i].iov_len = RX_SLOT;
		memset(h, 0, sizeof(*h));
		h->msg_name = &io->rname[i];
		h->msg_iov = &io->riov[i];
		h->msg_iovlen = 1;
		h->msg_control = io->rctl[i].buf;
	}
	return 0;
}

int udpio_recv(udpio *io, utp_context *ctx, int fd, int budget)
{
	int got = 0, calls = 0, errloops = 0, i;
	if (rx_alloc(io) < 0)
		return -ENOMEM;
	if (io->errq_pending)
		drain_errq(io, fd);
	while (got < budget) {
		int want = budget - got < RX_BATCH ? budget - got : RX_BATCH;
		int r;
		for (i = 0; i < want; i++) {
			struct msghdr *h = &io->rmsg[i].msg_hdr;
			h->msg_namelen = sizeof(struct sockaddr_storage);
			h->msg_controllen = sizeof(io->rctl[i].buf);
			h->msg_flags = 0;
		}
		r = recvmmsg(fd, io->rmsg, (unsigned int)want, MSG_DONTWAIT, NULL);
		io->st.recv_calls++;
		calls++;
		if (r < 0) {
			int e = errno;
			if (e == EINTR)
				continue;
			if (e == EAGAIN || e == EWOULDBLOCK) {
				/* Woken with nothing to read: the wakeup was the
				 * error queue's (POLLERR). */
				if (got == 0 && calls == 1)
					drain_errq(io, fd);
				break;
			}
			if (is_fatal(e) || e == EINVAL) {
				udpio_feedback(io, ctx);
				return -e;
			}
			if (e == ENOMEM) {
				count_err(io, UDPIO_RECV, e, 1);
				break; /* the kernel is short of memory: try again later */
			}
			/* A pending asynchronous error (an ICMP report sets it
			 * along with queueing the details): read the details. */
			count_err(io, UDPIO_RECV, e, 1);
			drain_errq(io, fd);
			if (++errloops > 16)
				break;
			continue;
		}
		for (i = 0; i < r; i++) {
			struct msghdr *h = &io->rmsg[i].msg_hdr;
			const unsigned char *p = io->riov[i].iov_base;
			size_t len = io->rmsg[i].msg_len, seg = 0, off;
			struct sockaddr_storage src;
			socklen_t alen;
			struct cmsghdr *c;
			if (h->msg_flags & MSG_TRUNC) {
				io->st.truncated++;
				continue;
			}
			for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
				if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO &&
				    c->cmsg_len >= CMSG_LEN(sizeof(int))) {
					int g;
					memcpy(&g, CMSG_DATA(c), sizeof(g));
					seg = g > 0 ? (size_t)g : 0;
				} else if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL &&
				           c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
					uint32_t drops;
					memcpy(&drops, CMSG_DATA(c), sizeof(drops));
					io->st.kernel_drops = drops;
				}
			}
			alen = udpio_addr_convert(AF_INET, (const struct sockaddr *)&io->rname[i], h->msg_namelen, &src);
			if (seg == 0 || seg >= len) {
				deliver(io, ctx, p, len, &src, alen);
				got++;
				continue;
			}
			io->st.recv_gro_batches++;
			for (off = 0; off < len; off += seg) {
				deliver(io, ctx, p + off, len - off < seg ? len - off : seg, &src, alen);
				got++;
			}
		}
		/* A short batch means the queue was empty a moment ago: skip the
		 * call that would only say EAGAIN.  Anything newer wakes the
		 * caller's poll again. */
		if (r < want)
			break;
	}
	udpio_feedback(io, ctx);
	return got;
}

/* ---- sending ------------------------------------------------------------ */

/* One DONTFRAG datagram by itself, with DF set: per message for IPv6
 * (IPV6_DONTFRAG), by toggling the socket's IP_MTU_DISCOVER for IPv4 (Linux
 * has no per-message DF for IPv4).  Returns sendmsg's result, errno kept. */
static ssize_t send_dontfrag(udpio *io, const udpio_queue *q, size_t i, int fd, int fam)
{
	const udpio_dgram *d = &q->dg[i];
	struct sockaddr_storage to;
	struct msghdr h;
	struct iovec iov;
	udpio_ctl ctl;
	ssize_t r;
	int e, toggled = 0;

	memset(&h, 0, sizeof(h));
	h.msg_namelen = udpio_addr_convert(fam, (const struct sockaddr *)&d->addr, d->addrlen, &to);
	h.msg_name = &to;
	iov.iov_base = q->data + d->offset;
	iov.iov_len = d->length;
	h.msg_iov = &iov;
	h.msg_iovlen = 1;
	if (is_v4_path(&to)) {
		if (io->pmtu_default < 0)
			io->pmtu_default = get_int(fd, IPPROTO_IP, IP_MTU_DISCOVER);
		toggled = io->pmtu_default >= 0 && io->pmtu_default != IP_PMTUDISC_DO &&
		          set_int(fd, IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO) == 0;
	} else {
		struct cmsghdr *c;
		int one = 1;
		memset(&ctl, 0, sizeof(ctl));
		h.msg_control = ctl.buf;
		h.msg_controllen = CMSG_SPACE(sizeof(int));
		c = CMSG_FIRSTHDR(&h);
		c->cmsg_level = IPPROTO_IPV6;
		c->cmsg_type = IPV6_DONTFRAG;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &one, sizeof(one));
	}
	r = sendmsg(fd, &h, MSG_DONTWAIT);
	e = errno;
	if (toggled)
		(void)set_int(fd, IPPROTO_IP, IP_MTU_DISCOVER, io->pmtu_default);
	errno = e;
	return r;
}

/* The path MTU for a refused DONTFRAG datagram: IP_MTU works on a
 * connected socket; otherwise the kernel queued a local EMSGSIZE report
 * carrying it (IP_RECVERR).  0 when unknown: the engine then falls back to
 * its safe floor. */
static uint16_t refused_mtu(udpio *io, int fd, const struct sockaddr_storage *dest)
{
	int v4 = is_v4_path(dest);
	int mtu = get_int(fd, v4 ? IPPROTO_IP : IPPROTO_IPV6, v4 ? IP_MTU : IPV6_MTU);
	if (mtu <= 0) {
		io->local_mtu = 0;
		drain_errq(io, fd);
		mtu = io->local_mtu;
	}
	return (uint16_t)(mtu > 0 && mtu <= 0xffff ? mtu : 0);
}

/* Build up to TX_BATCH messages from q->dg[i..], stopping before a
 * DONTFRAG datagram.  Returns the number of messages. */
static int build_batch(udpio *io, const udpio_queue *q, size_t i, int fam, int use_gso)
{
	int k = 0;
	size_t n = q->n;
	while (i < n && k < TX_BATCH) {
		const udpio_dgram *d = &q->dg[i];
		struct msghdr *h = &io->smsg[k].msg_hdr;
		size_t c = 1, total = d->length;
		if (d->flags & UTP_UDP_DONTFRAG)
			break;
		if (use_gso && d->length > 0) {
			while (i + c < n && c < GSO_MAX_SEGS) {
				const udpio_dgram *e = &q->dg[i + c];
				if ((e->flags & UTP_UDP_DONTFRAG) || e->length == 0 || e->length > d->length ||
				    total + e->length > GSO_MAX_BYTES || e->addrlen != d->addrlen ||
				    memcmp(&e->addr, &d->addr, d->addrlen) != 0)
					break;
				total += e->length;
				c++;
				if (e->length < d->length)
					break; /* only the last segment may be shorter */
			}
		}
		h->msg_namelen = udpio_addr_convert(fam, (const struct sockaddr *)&d->addr, d->addrlen, &io->sname[k]);
		h->msg_name = &io->sname[k];
		io->siov[k].iov_base = q->data + d->offset; /* payloads are contiguous */
		io->siov[k].iov_len = total;
		h->msg_iov = &io->siov[k];
		h->msg_iovlen = 1;
		h->msg_flags = 0;
		if (c > 1) {
			struct cmsghdr *cm;
			uint16_t gso_size = (uint16_t)d->length;
			h->msg_control = io->sctl[k].buf;
			h->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
			cm = CMSG_FIRSTHDR(h);
			cm->cmsg_level = SOL_UDP;
			cm->cmsg_type = UDP_SEGMENT;
			cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
			memcpy(CMSG_DATA(cm), &gso_size, sizeof(gso_size));
		} else {
			h->msg_control = NULL;
			h->msg_controllen = 0;
		}
		io->scount[k] = c;
		k++;
		i += c;
	}
	return k;
}

int udpio_send(udpio *io, udpio_queue *q, int fd)
{
	size_t i = 0, retry_at = (size_t)-1;
	int fam, fatal = 0, blocked = 0, use_gso = io->gso;
	if (q->n == 0)
		return 0;
	fam = sock_family(io, fd);
	if (fam < 0)
		return fam;
	while (i < q->n) {
		const udpio_dgram *d = &q->dg[i];
		size_t c, m;
		int k = 0, e, df = (d->flags & UTP_UDP_DONTFRAG) != 0, gso_msg;
		ssize_t r;
		if (df) {
			r = send_dontfrag(io, q, i, fd, fam);
			io->st.send_calls++;
			if (r >= 0) {
				io->st.sent_datagrams++;
				io->st.sent_bytes += d->length;
				io->st.dontfrag_sent++;
				i++;
				continue;
			}
			c = 1;
			gso_msg = 0;
		} else {
			k = build_batch(io, q, i, fam, use_gso);
			r = sendmmsg(fd, io->smsg, (unsigned int)k, MSG_DONTWAIT);
			io->st.send_calls++;
			if (r > 0) {
				for (m = 0; m < (size_t)r; m++) {
					size_t cnt = io->scount[m];
					io->st.sent_datagrams += cnt;
					io->st.sent_bytes += io->siov[m].iov_len;
					if (cnt > 1) {
						io->st.gso_batches++;
						io->st.gso_datagrams += cnt;
					}
					i += cnt;
				}
				continue;
			}
			if (r == 0) { /* not expected from a non-empty batch; treat as full */
				blocked = 1;
				break;
			}
			c = io->scount[0];
			gso_msg = c > 1;
		}
		e = errno;
		if (e == EINTR)
			continue;
		if (e == EAGAIN || e == EWOULDBLOCK) {
			io->st.send_eagain++;
			blocked = 1;
			break;
		}
		if (e == ENOBUFS) {
			io->st.send_enobufs++;
			blocked = 1;
			break;
		}
		if (is_fatal(e)) {
			fatal = e;
			break;
		}
		count_err(io, UDPIO_SEND, e, 1);
		/* The error may not be this datagram's: an ICMP report for an
		 * earlier one leaves an error on the socket that the next send
		 * returns (and clears).  So the first failure is retried once,
		 * and the error queue read for the details. */
		io->errq_pending = 1;
		if (retry_at != i) {
			retry_at = i;
			io->st.send_retries++;
			continue;
		}
		if (gso_msg && (e == EINVAL || e == EIO || e == EMSGSIZE || e == ENOPROTOOPT)) {
			/* The kernel refuses this GSO send (segments larger than
			 * the route's MTU, a device without checksum offload):
			 * the rest of this flush goes one by one, and after
			 * repeated refusals GSO stays off. */
			use_gso = 0;
			if (++io->st.gso_failed >= GSO_MAX_FAILURES)
				io->gso = 0;
			retry_at = (size_t)-1;
			continue;
		}
		if (df && e == EMSGSIZE) {
			/* Too big for the path: tell the engine like an ICMP
			 * "fragmentation needed" would; it resends without DF. */
			io->st.emsgsize++;
			pend_push(io, PEND_FRAG, refused_mtu(io, fd, &d->addr), &d->addr, d->addrlen,
			          q->data + d->offset, d->length);
		}
		io->st.send_dropped += c;
		i += c;
	}
	queue_consume(q, i);
	if (fatal)
		return -fatal;
	return blocked ? (int)(q->n > 0x7fffffff ? 0x7fffffff : q->n) : 0;
}

/* ---- benchmark helpers ------------------------------------------------------ */

#define BLAST_BATCH 64

static double blast_now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

long udpio_blast_send(int fd, const struct sockaddr *to, socklen_t tolen, int size, long count)
{
	struct mmsghdr m[BLAST_BATCH];
	struct iovec iov;
	char *buf;
	long sent = 0;
	int i;
	if (size <= 0 || size > 65507 || (buf = calloc(1, (size_t)size)) == NULL)
		return -1;
	iov.iov_base = buf;
	iov.iov_len = (size_t)size;
	memset(m, 0, sizeof m);
	for (i = 0; i < BLAST_BATCH; i++) {
		m[i].msg_hdr.msg_name = (void *)to;
		m[i].msg_hdr.msg_namelen = tolen;
		m[i].msg_hdr.msg_iov = &iov;
		m[i].msg_hdr.msg_iovlen = 1;
	}
	while (sent < count) {
		unsigned n = (unsigned)(count - sent < BLAST_BATCH ? count - sent : BLAST_BATCH);
		int r = sendmmsg(fd, m, n, 0);
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == ENOBUFS) {
				struct pollfd p = {fd, POLLOUT, 0};
				poll(&p, 1, 10);
				continue;
			}
			break;
		}
		sent += r;
	}
	free(buf);
	return sent;
}

long udpio_blast_recv(int fd, long count, int idle_ms, long long *bytes, double *seconds)
{
	static char bufs[BLAST_BATCH][2048];
	struct mmsghdr m[BLAST_BATCH];
	struct iovec iov[BLAST_BATCH];
	double first = 0, last = 0;
	long got = 0;
	long long nbytes = 0;
	int i;
	for (i = 0; i < BLAST_BATCH; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = sizeof bufs[i];
		memset(&m[i], 0, sizeof m[i]);
		m[i].msg_hdr.msg_iov = &iov[i];
		m[i].msg_hdr.msg_iovlen = 1;
	}
	while (got < count) {
		struct pollfd p = {fd, POLLIN, 0};
		int r;
		if (poll(&p, 1, got ? idle_ms : 60000) <= 0)
			break;
		r = recvmmsg(fd, m, BLAST_BATCH, MSG_DONTWAIT, NULL);
		if (r <= 0)
			continue;
		if (got == 0)
			first = blast_now();
		for (i = 0; i < r; i++)
			nbytes += m[i].msg_len;
		got += r;
		last = blast_now();
	}
	*bytes = nbytes;
	*seconds = last - first;
	return got;
}
