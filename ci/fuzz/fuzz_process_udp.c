/*
 * fuzz_process_udp.c -- libFuzzer harness for everything a peer controls:
 * utp_process_udp, utp_process_icmp_error and utp_process_icmp_fragmentation,
 * interleaved with the timer (utp_check_timeouts), deferred ACKs and the
 * application calls that change a connection's state.
 *
 * The target context X runs on a virtual clock with a seeded GET_RANDOM.
 * Before the input is read, two helper contexts (Y on 127.0.0.2, Z on [::1])
 * build live connections with X through an in-memory handshake, so inputs
 * reach real connection state rather than bouncing off the unknown-id path:
 *
 *   slot 0  Y -> X, established, idle
 *   slot 1  Y -> X, established, X has 8 KB in flight (never acknowledged)
 *   slot 2  Y -> X, established, X holds out-of-order data (a hole at the start)
 *   slot 3  X -> nowhere, SYN sent
 *   slot 4  X -> Y, established, X shut down its side (FIN unacknowledged)
 *   slot 5  Y -> X, Y closed: X saw the FIN
 *   slot 6  Z -> X over IPv6, established
 *
 * Input: a sequence of records, each an op byte, then (for datagrams and
 * ICMP) a 2-byte big-endian length and that many bytes:
 *
 *   op bits 0-2  action: 0-2 datagram, 3 ICMP error, 4 ICMP fragmentation
 *                (first 2 bytes of the body are the MTU), 5 advance the clock
 *                (1 byte: squared, in ms) and check timeouts, 6 application
 *                call (2 bytes: call, argument), 7 deferred ACKs + timeouts
 *   op bits 3-4  source address: Y, Z (IPv6), a stranger, nowhere
 *   op bits 5-7  0: use the datagram as is; k: aim it at slot k-1 -- its
 *                connection id, its peer's address, and seq/ack numbers
 *                near the slot's own (the input's bytes give the offsets).
 *                For ICMP: quote the last packet X sent to that peer.
 *
 * Every packet X sends is checked to be a well-formed uTP datagram, and
 * after every input the engine's counters and per-socket state are checked
 * for bounds; a violation aborts like a crash.  Leaks show through
 * LeakSanitizer, since the whole world is destroyed when it is reset.
 *
 * State is rebuilt from scratch every UTP_FUZZ_RESET_EVERY inputs (default
 * 1: each input starts from the same state, so every crash reproduces when
 * its file is run alone).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "utp.h"

#define NSLOTS 7
#define MAX_SOCKETS_X 24
#define RCVBUF_X (64 * 1024)

enum { ADDR_Y, ADDR_Z, ADDR_STRANGER, ADDR_NOWHERE, NADDR };

struct slot {
	utp_socket *s;           /* NULL when gone */
	unsigned recv_id;        /* connection id X expects on this socket */
	int peer;                /* ADDR_* of its peer */
};

struct pending {
	int to;                  /* 0: X, 1: Y, 2: Z */
	int from;                /* ADDR_* of the sender, or -1 for X */
	size_t len;
	unsigned char data[1500];
};

static uint64_t now_us;
static uint64_t rng_state;
static utp_context *X, *Y, *Z;
static struct sockaddr_storage addrs[NADDR + 1]; /* + X's own address */
static socklen_t addr_lens[NADDR + 1];
static struct slot slots[NSLOTS];
static int world_up;
static unsigned long inputs_since_reset;
static unsigned long reset_every = 1;
static int verbose;               /* UTP_FUZZ_VERBOSE=1: describe the world */

/* In-memory network used while the world is being built. */
static struct pending queue[512];
static size_t q_head, q_tail;
static int deliver_x_to_helpers;  /* 0: X's packets vanish */
static int drop_next_from_y;      /* drop this many of Y's next DATA packets */

/* The last packet X sent to each peer (ICMP quotes). */
static unsigned char last_to[NADDR][1500];
static size_t last_to_len[NADDR];

static unsigned last_syn_to_x;    /* conn id of the latest SYN X received */
static unsigned last_syn_from_x;  /* conn id of X's latest SYN */

static unsigned char app_data[64 * 1024];
static unsigned app_sockets;      /* sockets X created on the harness's request */

#define ADDR_X NADDR

static void die(const char *why)
{
	fprintf(stderr, "fuzz_process_udp: invariant violated: %s\n", why);
	abort();
}

static void make_addr(int i, int v6, const char *ip4, unsigned short port)
{
	memset(&addrs[i], 0, sizeof(addrs[i]));
	if (v6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addrs[i];
		a->sin6_family = AF_INET6;
		a->sin6_addr = in6addr_loopback;
		a->sin6_port = htons(port);
		addr_lens[i] = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&addrs[i];
		a->sin_family = AF_INET;
		inet_pton(AF_INET, ip4, &a->sin_addr);
		a->sin_port = htons(port);
		addr_lens[i] = sizeof(*a);
	}
}

static int addr_index(const struct sockaddr *sa, socklen_t len)
{
	int i;

	for (i = 0; i <= NADDR; i++)
		if (len == addr_lens[i] && memcmp(sa, &addrs[i], len) == 0)
			return i;
	return -1;
}

/* ---- callbacks ---------------------------------------------------------- */

static uint64 cb_us(utp_callback_arguments *a)
{
	(void)a;
	return now_us;
}

static uint64 cb_ms(utp_callback_arguments *a)
{
	(void)a;
	return now_us / 1000;
}

static uint64 cb_random(utp_callback_arguments *a)
{
	(void)a;
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/* Every datagram the engine emits must parse as uTP: header, version,
 * type, and an extension chain that ends exactly inside the datagram. */
static void check_outgoing(const unsigned char *b, size_t len)
{
	size_t off = 20;
	int ext;

	if (len < 20 || len > 65507)
		die("sent a datagram shorter than a header or longer than UDP allows");
	if ((b[0] & 15) != 1 || (b[0] >> 4) > 4)
		die("sent a datagram with a bad version or type");
	if (utpkit_classify(b, len) != UTPKIT_CLASS_UTP)
		die("sent a datagram the classifier does not call uTP");
	ext = b[1];
	while (ext != 0) {
		if (off + 2 > len)
			die("sent an extension header past the end");
		ext = b[off];
		if (off + 2 + b[off + 1] > len)
			die("sent an extension longer than the datagram");
		off += 2 + b[off + 1];
	}
}

static void enqueue(int to, int from, const unsigned char *buf, size_t len)
{
	struct pending *p;

	if (q_tail - q_head >= sizeof(queue) / sizeof(queue[0]) || len > sizeof(p->data))
		return;  /* a full network drops */
	p = &queue[q_tail++ % (sizeof(queue) / sizeof(queue[0]))];
	p->to = to;
	p->from = from;
	p->len = len;
	memcpy(p->data, buf, len);
}

static uint64 cb_sendto_x(utp_callback_arguments *a)
{
	int to = addr_index(a->address, a->address_len);

	check_outgoing(a->buf, a->len);
	if (a->len >= 4 && (a->buf[0] >> 4) == 4)
		last_syn_from_x = (unsigned)((a->buf[2] << 8) | a->buf[3]);
	if (to >= 0 && to < NADDR && a->len <= sizeof(last_to[0])) {
		memcpy(last_to[to], a->buf, a->len);
		last_to_len[to] = a->len;
	}
	if (deliver_x_to_helpers && (to == ADDR_Y || to == ADDR_Z))
		enqueue(to == ADDR_Y ? 1 : 2, ADDR_X, a->buf, a->len);
	return 0;
}

static uint64 cb_sendto_helper(utp_callback_arguments *a)
{
	int from = a->context == Y ? ADDR_Y : ADDR_Z;

	if (addr_index(a->address, a->address_len) != ADDR_X)
		return 0;
	if (from == ADDR_Y && drop_next_from_y > 0 && a->len > 20 && (a->buf[0] >> 4) == 0) {
		drop_next_from_y--;
		return 0;
	}
	enqueue(0, from, a->buf, a->len);
	return 0;
}

static uint64 cb_read(utp_callback_arguments *a)
{
	utp_read_drained(a->socket);
	return 0;
}

static uint64 cb_state_x(utp_callback_arguments *a)
{
	if (a->state == UTP_STATE_DESTROYING) {
		struct slot *sl = (struct slot *)utp_get_userdata(a->socket);
		if (sl)
			sl->s = NULL;
	}
	return 0;
}

static uint64 cb_error_x(utp_callback_arguments *a)
{
	(void)a;
	return 0;
}

static uint64 cb_accept_x(utp_callback_arguments *a)
{
	int i;

	/* During setup the next free slot takes it; later, nobody tracks it. */
	if (world_up)
		return 0;
	for (i = 0; i < NSLOTS; i++) {
		if (slots[i].s == NULL && slots[i].peer < 0) {
			slots[i].s = a->socket;
			slots[i].recv_id = (last_syn_to_x + 1) & 0xffff;
			slots[i].peer = addr_index(a->address, a->address_len);
			utp_set_userdata(a->socket, &slots[i]);
			return 0;
		}
	}
	return 0;
}

static uint64 cb_accept_helper(utp_callback_arguments *a)
{
	(void)a;
	return 0;
}

/* ---- world ------------------------------------------------------------ */

static void deliver_all(void)
{
	while (q_head != q_tail) {
		struct pending *p = &queue[q_head++ % (sizeof(queue) / sizeof(queue[0]))];
		utp_context *ctx = p->to == 0 ? X : p->to == 1 ? Y : Z;
		if (p->to == 0 && p->len >= 4 && (p->data[0] >> 4) == 4)
			last_syn_to_x = (unsigned)((p->data[2] << 8) | p->data[3]);
		utp_process_udp(ctx, p->data, p->len, (const struct sockaddr *)&addrs[p->from],
		                addr_lens[p->from]);
	}
	utp_issue_deferred_acks(X);
	utp_issue_deferred_acks(Y);
	utp_issue_deferred_acks(Z);
}

static void run_ms(unsigned ms)
{
	unsigned i;

	for (i = 0; i < ms; i++) {
		deliver_all();
		now_us += 1000;
		utp_check_timeouts(X);
		utp_check_timeouts(Y);
		utp_check_timeouts(Z);
	}
	deliver_all();
}

static utp_context *new_context(int is_x)
{
	utp_context *c = utp_init(2);

	if (!c)
		die("utp_init failed");
	utp_set_callback(c, UTP_GET_MICROSECONDS, &cb_us);
	utp_set_callback(c, UTP_GET_MILLISECONDS, &cb_ms);
	utp_set_callback(c, UTP_GET_RANDOM, &cb_random);
	utp_set_callback(c, UTP_ON_READ, &cb_read);
	utp_set_callback(c, UTP_SENDTO, is_x ? &cb_sendto_x : &cb_sendto_helper);
	utp_set_callback(c, UTP_ON_ACCEPT, is_x ? &cb_accept_x : &cb_accept_helper);
	if (is_x) {
		utp_set_callback(c, UTP_ON_STATE_CHANGE, &cb_state_x);
		utp_set_callback(c, UTP_ON_ERROR, &cb_error_x);
		utp_context_set_option(c, UTPKIT_MAX_SOCKETS, MAX_SOCKETS_X);
		utp_context_set_option(c, UTP_RCVBUF, RCVBUF_X);
	}
	return c;
}

/* A helper connects to X; the next free slot gets X's side. */
static utp_socket *helper_connect(utp_context *h, int hidx)
{
	utp_socket *s = utp_create_socket(h);

	(void)hidx;
	utp_connect(s, (const struct sockaddr *)&addrs[ADDR_X], addr_lens[ADDR_X]);
	run_ms(3);
	return s;
}

static void world_down(void)
{
	if (X)
		utp_destroy(X);
	if (Y)
		utp_destroy(Y);
	if (Z)
		utp_destroy(Z);
	X = Y = Z = NULL;
	world_up = 0;
	app_sockets = 0;
}

static void world_build(void)
{
	utp_socket *ys;
	int i;

	world_down();
	q_head = q_tail = 0;
	memset(last_to_len, 0, sizeof(last_to_len));
	for (i = 0; i < NSLOTS; i++) {
		slots[i].s = NULL;
		slots[i].peer = -1;
		slots[i].recv_id = 0;
	}
	/* 3 s before the 32-bit microsecond timestamps wrap. */
	now_us = 0x100000000ull - 3000000ull;
	rng_state = 0x9E3779B97F4A7C15ull;
	deliver_x_to_helpers = 1;
	drop_next_from_y = 0;

	X = new_context(1);
	Y = new_context(0);
	Z = new_context(0);

	/* slot 0: Y -> X idle */
	helper_connect(Y, 1);
	/* slot 1: Y -> X, X has data in flight that Y never acknowledges */
	helper_connect(Y, 1);
	/* slot 2: Y -> X, Y's first DATA lost: X buffers the rest out of order */
	ys = helper_connect(Y, 1);
	drop_next_from_y = 1;
	utp_write(ys, app_data, 4000);
	run_ms(3);
	/* slot 3: X -> nowhere, SYN sent */
	slots[3].s = utp_create_socket(X);
	slots[3].peer = ADDR_NOWHERE;
	utp_set_userdata(slots[3].s, &slots[3]);
	utp_connect(slots[3].s, (const struct sockaddr *)&addrs[ADDR_NOWHERE],
	            addr_lens[ADDR_NOWHERE]);
	slots[3].recv_id = last_syn_from_x;
	/* slot 4: X -> Y, established, then X shuts down with the FIN unacked */
	slots[4].s = utp_create_socket(X);
	slots[4].peer = ADDR_Y;
	utp_set_userdata(slots[4].s, &slots[4]);
	utp_connect(slots[4].s, (const struct sockaddr *)&addrs[ADDR_Y], addr_lens[ADDR_Y]);
	slots[4].recv_id = last_syn_from_x;
	run_ms(3);
	/* slot 5: Y -> X, then Y closes: X sees the FIN */
	ys = helper_connect(Y, 1);
	utp_close(ys);
	run_ms(3);
	/* slot 6: Z -> X over IPv6 */
	helper_connect(Z, 2);

	/* From here on X's packets go nowhere, so what X sends stays unacked. */
	deliver_x_to_helpers = 0;
	if (slots[1].s)
		utp_write(slots[1].s, app_data, 8192);
	if (slots[4].s)
		utp_shutdown(slots[4].s, SHUT_WR);
	deliver_all();
	world_up = 1;
	inputs_since_reset = 0;
	if (verbose) {
		for (i = 0; i < NSLOTS; i++) {
			utpkit_socket_info info;
			memset(&info, 0, sizeof(info));
			if (slots[i].s)
				utpkit_get_socket_info(slots[i].s, &info);
			fprintf(stderr, "slot %d: %s peer %d id %u state %d in_flight %u reorder %u "
			        "seq %u ack %u\n", i, slots[i].s ? "live" : "gone", slots[i].peer,
			        slots[i].recv_id, info.state, info.in_flight, info.reorder_bytes,
			        info.seq_nr, info.ack_nr);
		}
		fprintf(stderr, "live sockets in X: %u\n", utpkit_get_counters(X)->sockets_live);
	}
}

/* ---- input interpretation ------------------------------------------------ */

static void put16(unsigned char *p, unsigned v)
{
	p[0] = (unsigned char)(v >> 8);
	p[1] = (unsigned char)v;
}

static unsigned get16(const unsigned char *p)
{
	return (unsigned)((p[0] << 8) | p[1]);
}

/* Aim a datagram at a live slot: its connection id, seq/ack near its own. */
static void aim(unsigned char *b, size_t len, struct slot *sl)
{
	utpkit_socket_info info;
	int type = b[0] >> 4;
	unsigned id = sl->recv_id;

	if (len < 20 || !sl->s || utpkit_get_socket_info(sl->s, &info) != 0)
		return;
	if (type == 4) {
		id = (id - 1) & 0xffff;  /* a SYN carries the id one below */
	}
	put16(b + 2, id);
	/* seq: the next expected one plus a small signed offset from the input */
	put16(b + 16, (unsigned)(info.ack_nr + 1 + (int8_t)b[17]) & 0xffff);
	/* ack: our last sent minus a small offset from the input */
	put16(b + 18, (unsigned)(info.seq_nr - 1 - (b[19] & 0x1f)) & 0xffff);
}

static void app_call(struct slot *sl, unsigned call, unsigned arg)
{
	utp_socket *s = sl ? sl->s : NULL;

	switch (call % 10) {
	case 0:
		if (s)
			utp_write(s, app_data, (size_t)arg * 256);
		break;
	case 1:
		if (s)
			utp_read_drained(s);
		break;
	case 2:
		if (s)
			utp_shutdown(s, (int)(arg % 3));
		break;
	case 3:
		if (s) {
			/* A closed socket is not ours to touch any more (it may be
			 * freed inside utp_close). */
			utp_set_userdata(s, NULL);
			sl->s = NULL;
			utp_close(s);
		}
		break;
	case 4: {
		/* a new outgoing connection from X */
		utp_socket *n = utp_create_socket(X);
		int to = (int)(arg % NADDR);
		app_sockets++;
		if (n)
			utp_connect(n, (const struct sockaddr *)&addrs[to], addr_lens[to]);
		break;
	}
	case 5:
		if (s)
			utp_setsockopt(s, (int)(arg & 1 ? UTP_RCVBUF : UTP_SNDBUF), (int)(arg * 97));
		break;
	case 6:
		if (s) {
			struct utp_iovec iov[3];
			iov[0].iov_base = app_data;
			iov[0].iov_len = arg;
			iov[1].iov_base = app_data + 100;
			iov[1].iov_len = 0;
			iov[2].iov_base = app_data + 1000;
			iov[2].iov_len = (size_t)arg * 40;
			utp_writev(s, iov, 3);
		}
		break;
	case 7:
		if (s) {
			struct sockaddr_storage ss;
			socklen_t len = sizeof(ss);
			uint32 a, b, c;
			utp_getpeername(s, (struct sockaddr *)&ss, &len);
			utp_get_delays(s, &a, &b, &c);
			(void)utp_get_stats(s);
		}
		break;
	case 8:
		utp_context_set_option(X, UTP_TARGET_DELAY, (int)arg * 1000);
		break;
	default:
		(void)utpkit_next_timeout(X);
		(void)utp_get_context_stats(X);
		break;
	}
}

static void check_bounds(void)
{
	const utpkit_counters *k = utpkit_get_counters(X);
	int i;

	/* UTPKIT_MAX_SOCKETS caps what peers can make us create; the
	 * application's own sockets come on top. */
	if (k->sockets_live > MAX_SOCKETS_X + app_sockets)
		die("peers made more live sockets than UTPKIT_MAX_SOCKETS");
	for (i = 0; i < NSLOTS; i++) {
		utpkit_socket_info info;
		if (!slots[i].s)
			continue;
		if (utpkit_get_socket_info(slots[i].s, &info) != 0)
			continue;
		/* The reorder buffer counts against our window (plus two packets
		 * of slack for probes): a peer cannot make it grow past that. */
		if (info.reorder_bytes > RCVBUF_X + 4 * 1500)
			die("reorder buffer grew past the receive window");
		if (info.in_flight > info.send_queue + 1500 * 4)
			die("more bytes in flight than queued");
	}
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *e = getenv("UTP_FUZZ_RESET_EVERY");
	size_t i;

	(void)argc;
	(void)argv;
	if (e && atol(e) > 0)
		reset_every = (unsigned long)atol(e);
	verbose = getenv("UTP_FUZZ_VERBOSE") != NULL;
	for (i = 0; i < sizeof(app_data); i++)
		app_data[i] = (unsigned char)(i * 131 + 7);
	make_addr(ADDR_Y, 0, "127.0.0.2", 2000);
	make_addr(ADDR_Z, 1, NULL, 3000);
	make_addr(ADDR_STRANGER, 0, "127.0.0.3", 4000);
	make_addr(ADDR_NOWHERE, 0, "127.0.0.4", 5000);
	make_addr(ADDR_X, 0, "127.0.0.1", 1000);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t pos = 0;
	unsigned char buf[65536];
	int steps = 0;

	if (!world_up || inputs_since_reset >= reset_every)
		world_build();
	inputs_since_reset++;

	while (pos < size && steps++ < 256) {
		unsigned op = data[pos++];
		unsigned action = op & 7, src = (op >> 3) & 3, target = op >> 5;
		struct slot *sl = target ? &slots[(target - 1) % NSLOTS] : NULL;
		size_t len = 0;

		if (action <= 4) {
			if (pos + 2 > size)
				break;
			len = get16(data + pos);
			pos += 2;
			if (len > size - pos)
				len = size - pos;
			memcpy(buf, data + pos, len);
			pos += len;
		}
		switch (action) {
		case 0:
		case 1:
		case 2: {
			int from = (int)src;
			if (sl && sl->s && sl->peer >= 0) {
				aim(buf, len, sl);
				from = sl->peer;
			}
			utp_process_udp(X, buf, len, (const struct sockaddr *)&addrs[from],
			                addr_lens[from]);
			break;
		}
		case 3:
		case 4: {
			int to = (int)src;
			const unsigned char *quote = buf;
			size_t qlen = len;
			unsigned mtu = 0;
			if (action == 4 && len >= 2) {
				mtu = get16(buf);
				quote = buf + 2;
				qlen = len - 2;
			}
			if (sl && sl->peer >= 0 && last_to_len[sl->peer] > 0) {
				to = sl->peer;
				quote = last_to[to];
				if (qlen == 0 || qlen > last_to_len[to])
					qlen = last_to_len[to];
			}
			if (action == 3)
				utp_process_icmp_error(X, quote, qlen, (const struct sockaddr *)&addrs[to],
				                       addr_lens[to]);
			else
				utp_process_icmp_fragmentation(X, quote, qlen,
				                               (const struct sockaddr *)&addrs[to],
				                               addr_lens[to], (uint16)mtu);
			break;
		}
		case 5: {
			unsigned t = pos < size ? data[pos++] : 1;
			now_us += (uint64_t)t * t * 1000u;
			utp_check_timeouts(X);
			break;
		}
		case 6: {
			unsigned call = pos < size ? data[pos++] : 0;
			unsigned arg = pos < size ? data[pos++] : 0;
			app_call(sl, call, arg);
			break;
		}
		default:
			utp_issue_deferred_acks(X);
			now_us += 1000;
			utp_check_timeouts(X);
			break;
		}
		check_bounds();
	}
	utp_issue_deferred_acks(X);
	check_bounds();
	if (reset_every == 1)
		world_down();  /* leaves nothing for LeakSanitizer to miss */
	return 0;
}
