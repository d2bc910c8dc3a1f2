/*
 * sim.c -- the in-memory world of sim.h: virtual clock, seeded randomness,
 * a packet queue ordered by delivery time, and the application callbacks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"

unsigned long long sim_now;
struct sim_net sim_net;
struct sim_node sim_nodes[SIM_MAX_NODES];
int sim_nnodes;

static struct sim_conn conns[SIM_MAX_CONNS];
static int nconns;

struct packet {
	struct packet *next;
	unsigned long long at;
	int from, to;
	size_t len;
	unsigned char data[];
};

static struct packet *q_head, *q_tail;
static size_t q_len;

static unsigned long long engine_rng, net_rng;

static unsigned long long xorshift(unsigned long long *s)
{
	unsigned long long x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

unsigned long long sim_rand(void)
{
	return xorshift(&net_rng);
}

unsigned char *sim_pattern(size_t len, unsigned long long seed)
{
	unsigned char *p = malloc(len ? len : 1);
	unsigned long long s = seed * 2654435761u + 88172645463325252ull;
	size_t i;

	if (!p)
		abort();
	for (i = 0; i < len; i++) {
		if ((i & 7) == 0)
			xorshift(&s);
		p[i] = (unsigned char)(s >> ((i & 7) * 8));
	}
	return p;
}

size_t sim_header(unsigned char *b, int type, int ver, int ext, unsigned conn_id,
                  unsigned ts, unsigned ts_diff, unsigned wnd, unsigned seq, unsigned ack)
{
	b[0] = (unsigned char)(((type & 15) << 4) | (ver & 15));
	b[1] = (unsigned char)ext;
	b[2] = (unsigned char)(conn_id >> 8);
	b[3] = (unsigned char)conn_id;
	b[4] = (unsigned char)(ts >> 24);
	b[5] = (unsigned char)(ts >> 16);
	b[6] = (unsigned char)(ts >> 8);
	b[7] = (unsigned char)ts;
	b[8] = (unsigned char)(ts_diff >> 24);
	b[9] = (unsigned char)(ts_diff >> 16);
	b[10] = (unsigned char)(ts_diff >> 8);
	b[11] = (unsigned char)ts_diff;
	b[12] = (unsigned char)(wnd >> 24);
	b[13] = (unsigned char)(wnd >> 16);
	b[14] = (unsigned char)(wnd >> 8);
	b[15] = (unsigned char)wnd;
	b[16] = (unsigned char)(seq >> 8);
	b[17] = (unsigned char)seq;
	b[18] = (unsigned char)(ack >> 8);
	b[19] = (unsigned char)ack;
	return 20;
}

/* ---- addresses ------------------------------------------------------- */

void sim_make_addr(struct sockaddr_storage *ss, socklen_t *len, unsigned short port, int ipv6)
{
	memset(ss, 0, sizeof(*ss));
	if (ipv6) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		s6->sin6_addr = in6addr_loopback;
		*len = sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		s4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		*len = sizeof(*s4);
	}
}

static int same_addr(const struct sockaddr *a, const struct sockaddr *b)
{
	if (a->sa_family != b->sa_family)
		return 0;
	if (a->sa_family == AF_INET) {
		const struct sockaddr_in *x = (const struct sockaddr_in *)a;
		const struct sockaddr_in *y = (const struct sockaddr_in *)b;
		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	if (a->sa_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
		const struct sockaddr_in6 *y = (const struct sockaddr_in6 *)b;
		return x->sin6_port == y->sin6_port &&
		       memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
	}
	return 0;
}

static int node_by_addr(const struct sockaddr *sa)
{
	int i;

	for (i = 0; i < sim_nnodes; i++)
		if (sim_nodes[i].ctx && same_addr(sa, (const struct sockaddr *)&sim_nodes[i].addr))
			return i;
	return -1;
}

const struct sockaddr *sim_addr(struct sim_node *n, socklen_t *len)
{
	*len = n->addrlen;
	return (const struct sockaddr *)&n->addr;
}

/* ---- packet queue ---------------------------------------------------- */

static void enqueue(struct packet *p)
{
	if (!q_tail || q_tail->at <= p->at) {
		p->next = NULL;
		if (q_tail)
			q_tail->next = p;
		else
			q_head = p;
		q_tail = p;
	} else if (p->at < q_head->at) {
		p->next = q_head;
		q_head = p;
	} else {
		struct packet *it = q_head;
		while (it->next && it->next->at <= p->at)
			it = it->next;
		p->next = it->next;
		it->next = p;
	}
	q_len++;
	if (q_len > sim_net.queued_peak)
		sim_net.queued_peak = q_len;
}

size_t sim_queue_len(void)
{
	return q_len;
}

static void queue_copy(int from, int to, const unsigned char *buf, size_t len)
{
	struct packet *p = malloc(sizeof(*p) + len);

	if (!p)
		abort();
	p->from = from;
	p->to = to;
	p->len = len;
	memcpy(p->data, buf, len);
	p->at = sim_now + sim_net.latency_us;
	if (sim_net.jitter_us)
		p->at += sim_rand() % (sim_net.jitter_us + 1);
	enqueue(p);
}

/* ---- engine callbacks ------------------------------------------------ */

static struct sim_node *node_of(utp_callback_arguments *a)
{
	return (struct sim_node *)utp_context_get_userdata(a->context);
}

static uint64 cb_sendto(utp_callback_arguments *a)
{
	struct sim_node *n = node_of(a);
	int to = node_by_addr(a->address);
	int type = a->len >= 1 ? a->buf[0] >> 4 : -1;

	n->sent++;
	switch (type) {
	case ST_SYN:
		n->sent_syn++;
		if (a->len >= 4) {
			n->have_syn_id = 1;
			n->last_syn_id = (unsigned short)((a->buf[2] << 8) | a->buf[3]);
		}
		break;
	case ST_RESET: n->sent_reset++; break;
	case ST_STATE: n->sent_state++; break;
	case ST_DATA: n->sent_data++; break;
	case ST_FIN: n->sent_fin++; break;
	}
	if (a->len <= sizeof(n->last_sent)) {
		memcpy(n->last_sent, a->buf, a->len);
		n->last_sent_len = a->len;
		memcpy(&n->last_to, a->address, a->address_len);
		n->last_to_len = a->address_len;
	}
	if (sim_net.filter && !sim_net.filter(n->index, to, a->buf, a->len, sim_net.filter_arg)) {
		sim_net.dropped++;
		return 0;
	}
	if (to < 0) {
		sim_net.blackholed++;
		return 0;
	}
	if (sim_net.loss_permille && sim_rand() % 1000 < sim_net.loss_permille) {
		sim_net.dropped++;
		return 0;
	}
	queue_copy(n->index, to, a->buf, a->len);
	if (sim_net.dup_permille && sim_rand() % 1000 < sim_net.dup_permille)
		queue_copy(n->index, to, a->buf, a->len);
	return 0;
}

static uint64 cb_ms(utp_callback_arguments *a)
{
	(void)a;
	return sim_now / 1000u;
}

static uint64 cb_us(utp_callback_arguments *a)
{
	(void)a;
	return sim_now;
}

static uint64 cb_random(utp_callback_arguments *a)
{
	(void)a;
	return xorshift(&engine_rng);
}

static uint64 cb_log(utp_callback_arguments *a)
{
	(void)a;
	return 0;
}

static struct sim_conn *conn_of(utp_socket *s)
{
	return s ? (struct sim_conn *)utp_get_userdata(s) : NULL;
}

static void maybe_finish(struct sim_conn *c)
{
	if (!c->s || c->closed)
		return;
	if ((c->flags & C_SHUTDOWN_WHEN_SENT) && !c->shut && c->tx_pos == c->tx_len &&
	    (c->connected || c->accepted)) {
		c->shut = 1;
		utp_shutdown(c->s, SHUT_WR);
	}
	if ((c->flags & C_CLOSE_ON_EOF) && c->eof && c->tx_pos == c->tx_len &&
	    (c->shut || !(c->flags & C_SHUTDOWN_WHEN_SENT))) {
		c->closed = 1;
		utp_close(c->s);
	}
}

void sim_pump(struct sim_conn *c)
{
	if (!c->s || c->closed || (c->flags & C_NO_WRITE))
		return;
	if (!c->connected && !c->accepted)
		return;
	while (c->tx_pos < c->tx_len) {
		size_t left = c->tx_len - c->tx_pos;
		ssize_t n;

		if ((c->flags & C_USE_WRITEV) && left >= 3) {
			struct utp_iovec iov[3];
			size_t a = left / 3, b = left / 3;
			iov[0].iov_base = (void *)(c->tx + c->tx_pos);
			iov[0].iov_len = a;
			iov[1].iov_base = (void *)(c->tx + c->tx_pos + a);
			iov[1].iov_len = b;
			iov[2].iov_base = (void *)(c->tx + c->tx_pos + a + b);
			iov[2].iov_len = left - a - b;
			n = utp_writev(c->s, iov, 3);
		} else {
			n = utp_write(c->s, (void *)(c->tx + c->tx_pos), left);
		}
		if (n <= 0)
			break;
		if ((size_t)n > left) {  /* the engine claims more than offered */
			c->rx_overflow = 2;
			break;
		}
		c->tx_pos += (size_t)n;
		if (!c->s)  /* a callback inside the write closed us */
			return;
	}
	maybe_finish(c);
}

void sim_drain(struct sim_conn *c)
{
	c->held = 0;
	if (c->s)
		utp_read_drained(c->s);
}

static uint64 cb_on_read(utp_callback_arguments *a)
{
	struct sim_conn *c = conn_of(a->socket);

	if (!c)
		return 0;
	c->reads++;
	if (c->rx_len + a->len > c->rx_cap) {
		c->rx_overflow = 1;
	} else {
		memcpy(c->rx + c->rx_len, a->buf, a->len);
	}
	c->rx_len += a->len;
	if (c->flags & C_HOLD_READS)
		c->held += a->len;
	else
		utp_read_drained(a->socket);
	if ((c->flags & C_CLOSE_ON_FIRST_READ) && c->reads == 1 && !c->closed) {
		c->closed = 1;
		utp_close(a->socket);
	}
	return 0;
}

static uint64 cb_read_buffer_size(utp_callback_arguments *a)
{
	struct sim_conn *c = conn_of(a->socket);
	return c ? c->held : 0;
}

static uint64 cb_on_state(utp_callback_arguments *a)
{
	struct sim_conn *c = conn_of(a->socket);

	if (!c)
		return 0;
	if (c->destroyed) {
		c->states_after_destroy++;
		return 0;
	}
	switch (a->state) {
	case UTP_STATE_CONNECT:
		if (!c->connected)
			c->connect_at = sim_now;
		c->connected = 1;
		if ((c->flags & C_CLOSE_ON_CONNECT) && !c->closed) {
			c->closed = 1;
			utp_close(a->socket);
			break;
		}
		sim_pump(c);
		break;
	case UTP_STATE_WRITABLE:
		sim_pump(c);
		break;
	case UTP_STATE_EOF:
		if (!c->eof)
			c->eof_at = sim_now;
		c->eof = 1;
		maybe_finish(c);
		break;
	case UTP_STATE_DESTROYING: {
		utp_socket_stats *st = utp_get_stats(a->socket);
		if (st) {
			c->stats = *st;
			c->have_stats = 1;
		}
		c->destroyed = 1;
		c->destroyed_at = sim_now;
		c->s = NULL;
		break;
	}
	}
	return 0;
}

static uint64 cb_on_error(utp_callback_arguments *a)
{
	struct sim_conn *c = conn_of(a->socket);

	if (!c)
		return 0;
	c->errors++;
	if (c->error < 0) {
		c->error = a->error_code;
		c->error_at = sim_now;
	}
	if ((c->flags & C_CLOSE_ON_ERROR) && !c->closed && c->s) {
		c->closed = 1;
		utp_close(a->socket);
	}
	return 0;
}

static uint64 cb_on_firewall(utp_callback_arguments *a)
{
	struct sim_node *n = node_of(a);
	n->fw_stages |= 1u << a->flags;
	n->fw_conn_id = (unsigned)a->len;
	return (uint64)n->firewall;
}

static struct sim_conn *conn_alloc(struct sim_node *n)
{
	struct sim_conn *c;

	if (nconns >= SIM_MAX_CONNS) {
		fprintf(stderr, "sim: too many conns\n");
		abort();
	}
	c = &conns[nconns++];
	memset(c, 0, sizeof(*c));
	c->node = n;
	c->error = -1;
	return c;
}

static uint64 cb_on_accept(utp_callback_arguments *a)
{
	struct sim_node *n = node_of(a);
	struct sim_conn *c = conn_alloc(n);
	const struct sim_conn *t = &n->accept_tmpl;

	c->s = a->socket;
	c->flags = t->flags;
	c->tx = t->tx;
	c->tx_len = t->tx_len;
	c->rx_cap = t->rx_cap;
	c->rx = malloc(c->rx_cap ? c->rx_cap : 1);
	if (!c->rx)
		abort();
	c->accepted = 1;
	c->connect_at = sim_now;
	n->naccepted++;
	utp_set_userdata(a->socket, c);
	if (c->flags & C_CLOSE_ON_ACCEPT) {
		c->closed = 1;
		utp_close(a->socket);
		return 0;
	}
	sim_pump(c);
	return 0;
}

/* ---- world ----------------------------------------------------------- */

void sim_init(unsigned long long seed, unsigned long long start_us)
{
	memset(&sim_net, 0, sizeof(sim_net));
	sim_net.latency_us = 10 * SIM_TICK_US;
	memset(sim_nodes, 0, sizeof(sim_nodes));
	sim_nnodes = 0;
	nconns = 0;
	q_head = q_tail = NULL;
	q_len = 0;
	engine_rng = seed * 6364136223846793005ull + 1442695040888963407ull;
	net_rng = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
	if (!engine_rng)
		engine_rng = 1;
	if (!net_rng)
		net_rng = 1;
	sim_now = start_us;
}

void sim_free(void)
{
	int i;

	for (i = 0; i < sim_nnodes; i++) {
		if (sim_nodes[i].ctx)
			utp_destroy(sim_nodes[i].ctx);
		sim_nodes[i].ctx = NULL;
	}
	while (q_head) {
		struct packet *p = q_head;
		q_head = p->next;
		free(p);
	}
	q_tail = NULL;
	q_len = 0;
	for (i = 0; i < nconns; i++) {
		free(conns[i].rx);
		conns[i].rx = NULL;
	}
	nconns = 0;
	sim_nnodes = 0;
}

static void node_start(struct sim_node *n)
{
	n->ctx = utp_init(2);
	if (!n->ctx)
		abort();
	utp_context_set_userdata(n->ctx, n);
	utp_set_callback(n->ctx, UTP_SENDTO, &cb_sendto);
	utp_set_callback(n->ctx, UTP_GET_MILLISECONDS, &cb_ms);
	utp_set_callback(n->ctx, UTP_GET_MICROSECONDS, &cb_us);
	utp_set_callback(n->ctx, UTP_GET_RANDOM, &cb_random);
	utp_set_callback(n->ctx, UTP_LOG, &cb_log);
	utp_set_callback(n->ctx, UTP_ON_READ, &cb_on_read);
	utp_set_callback(n->ctx, UTP_GET_READ_BUFFER_SIZE, &cb_read_buffer_size);
	utp_set_callback(n->ctx, UTP_ON_STATE_CHANGE, &cb_on_state);
	utp_set_callback(n->ctx, UTP_ON_ERROR, &cb_on_error);
}

struct sim_node *sim_add_node(unsigned short port, int ipv6)
{
	struct sim_node *n = &sim_nodes[sim_nnodes];

	memset(n, 0, sizeof(*n));
	n->index = sim_nnodes++;
	sim_make_addr(&n->addr, &n->addrlen, port, ipv6);
	node_start(n);
	return n;
}

void sim_restart_node(struct sim_node *n)
{
	utp_destroy(n->ctx);
	n->listening = 0;
	n->naccepted = 0;
	node_start(n);
}

void sim_listen(struct sim_node *n, unsigned flags, const unsigned char *tx, size_t tx_len,
                size_t rx_cap)
{
	memset(&n->accept_tmpl, 0, sizeof(n->accept_tmpl));
	n->accept_tmpl.flags = flags;
	n->accept_tmpl.tx = tx;
	n->accept_tmpl.tx_len = tx_len;
	n->accept_tmpl.rx_cap = rx_cap;
	n->listening = 1;
	utp_set_callback(n->ctx, UTP_ON_ACCEPT, &cb_on_accept);
	utp_set_callback(n->ctx, UTP_ON_FIREWALL, &cb_on_firewall);
}

struct sim_conn *sim_conn_new(struct sim_node *n, unsigned flags, const unsigned char *tx,
                              size_t tx_len, size_t rx_cap)
{
	struct sim_conn *c = conn_alloc(n);

	c->flags = flags;
	c->tx = tx;
	c->tx_len = tx_len;
	c->rx_cap = rx_cap;
	c->rx = malloc(rx_cap ? rx_cap : 1);
	if (!c->rx)
		abort();
	return c;
}

int sim_connect(struct sim_conn *c, const struct sockaddr *to, socklen_t tolen)
{
	c->s = utp_create_socket(c->node->ctx);
	if (!c->s)
		return -1;
	utp_set_userdata(c->s, c);
	return utp_connect(c->s, to, tolen);
}

int sim_connect_node(struct sim_conn *c, struct sim_node *to)
{
	return sim_connect(c, (const struct sockaddr *)&to->addr, to->addrlen);
}

struct sim_conn *sim_conn_at(int i)
{
	return &conns[i];
}

int sim_nconns(void)
{
	return nconns;
}

static int deliver_due(void)
{
	int got[SIM_MAX_NODES] = {0};
	int any = 0, i;

	while (q_head && q_head->at <= sim_now) {
		struct packet *p = q_head;
		q_head = p->next;
		if (!q_head)
			q_tail = NULL;
		q_len--;
		if (sim_nodes[p->to].ctx) {
			utp_process_udp(sim_nodes[p->to].ctx, p->data, p->len,
			                (const struct sockaddr *)&sim_nodes[p->from].addr,
			                sim_nodes[p->from].addrlen);
			sim_nodes[p->to].received++;
			sim_net.delivered++;
			got[p->to] = 1;
			any = 1;
		}
		free(p);
	}
	for (i = 0; i < sim_nnodes; i++)
		if (got[i] && sim_nodes[i].ctx)
			utp_issue_deferred_acks(sim_nodes[i].ctx);
	return any;
}

int sim_run(int (*done)(void *), void *arg, unsigned long long max_us)
{
	unsigned long long end = sim_now + max_us;
	int i;

	for (;;) {
		deliver_due();
		if (done && done(arg))
			return 1;
		if (sim_now >= end)
			return 0;
		sim_now += SIM_TICK_US;
		for (i = 0; i < sim_nnodes; i++)
			if (sim_nodes[i].ctx)
				utp_check_timeouts(sim_nodes[i].ctx);
	}
}

int sim_inject(struct sim_node *to, const unsigned char *buf, size_t len,
               const struct sockaddr *from, socklen_t fromlen)
{
	int r = utp_process_udp(to->ctx, buf, len, from, fromlen);
	utp_issue_deferred_acks(to->ctx);
	return r;
}
