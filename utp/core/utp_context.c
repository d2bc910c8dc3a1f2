/*
 * utp_context.c -- the context: callbacks, options, the (address, id) socket
 * table, the timer heap, dispatch of incoming datagrams, RESETs and ICMP.
 */
#include "utp_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <sys/random.h>

const char *utp_state_names[] = {
	NULL, "UTP_STATE_CONNECT", "UTP_STATE_WRITABLE", "UTP_STATE_EOF", "UTP_STATE_DESTROYING",
};

const char *utp_error_code_names[] = {
	"UTP_ECONNREFUSED", "UTP_ECONNRESET", "UTP_ETIMEDOUT",
};

const char *utp_callback_names[] = {
	"UTP_ON_FIREWALL", "UTP_ON_ACCEPT", "UTP_ON_CONNECT", "UTP_ON_ERROR", "UTP_ON_READ",
	"UTP_ON_OVERHEAD_STATISTICS", "UTP_ON_STATE_CHANGE", "UTP_GET_READ_BUFFER_SIZE",
	"UTP_ON_DELAY_SAMPLE", "UTP_GET_UDP_MTU", "UTP_GET_UDP_OVERHEAD", "UTP_GET_MILLISECONDS",
	"UTP_GET_MICROSECONDS", "UTP_GET_RANDOM", "UTP_LOG", "UTP_SENDTO",
};

/* ---- defaults for the callbacks libutp gives defaults for ------------------- */

static uint64 default_microseconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64)ts.tv_sec * 1000000u + (uint64)ts.tv_nsec / 1000u;
}

static uint64 default_random(void)
{
	uint32 r;
	if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
		r = (uint32)default_microseconds() * 2654435761u;
	return r;
}

/* 1402 / 1232: what fits after IP, UDP and the common tunnel headers
 * (PPPoE, GRE, Teredo) -- the same safe default as libutp's. */
static uint64 default_udp_mtu(const struct sockaddr *a)
{
	return (a && a->sa_family == AF_INET6) ? 1232 : 1402;
}

static uint64 default_udp_overhead(const struct sockaddr *a)
{
	return (a && a->sa_family == AF_INET6) ? 48 : 28;
}

/* ---- context lifecycle ------------------------------------------------------ */

utp_context *utp_init(int version)
{
	utp_context *ctx;
	if (version != 2)
		return NULL;
	ctx = calloc(1, sizeof *ctx);
	if (ctx == NULL)
		return NULL;
	ctx->opt_sndbuf = 1024 * 1024;
	ctx->opt_rcvbuf = 1024 * 1024;
	ctx->opt_target_delay = 100000;
	ctx->min_rto_ms = 500;
	ctx->max_rto_ms = 60000;
	ctx->max_sockets = 3000;
	ctx->syn_timeout_ms = 1000;
	ctx->syn_retries = 3;
	ctx->ack_delay_ms = 20;
	ctx->keepalive_ms = 29000;  /* home NATs drop idle UDP mappings after ~30 s */
	ctx->dead_retries = 5;
	ctx->reset_rate = 100;
	ctx->mtu_probing = 1;
	ctx->half_open_max = 64;
	ctx->half_open_per_addr = 8;
	ctx->synack_rate = 16;
	ctx->nbuckets = 64;
	ctx->buckets = calloc(ctx->nbuckets, sizeof *ctx->buckets);
	if (ctx->buckets == NULL) {
		free(ctx);
		return NULL;
	}
	ctx->reset_tokens = ctx->reset_rate;
	return ctx;
}

void utp_destroy(utp_context *ctx)
{
	utp_socket *s;
	if (ctx == NULL)
		return;
	ctx->depth++;
	ctx->now = UTP_MAX(ctx->now, 1);
	for (s = ctx->all; s; s = s->next)
		utp_socket_destroy_later(s);
	ctx->depth--;
	/* Re-enter once so the zombies are reaped with DESTROYING callbacks. */
	utp_ctx_enter(ctx);
	utp_ctx_leave(ctx);
	utp_pool_free(ctx);
	utp_accept_free(ctx);
	free(ctx->buckets);
	free(ctx->heap);
	free(ctx);
}

void utp_set_callback(utp_context *ctx, int callback_name, utp_callback_t *proc)
{
	if (ctx && callback_name >= 0 && callback_name < UTP_LOG_NORMAL)
		ctx->callbacks[callback_name] = proc;
}

void *utp_context_set_userdata(utp_context *ctx, void *userdata)
{
	void *old;
	if (ctx == NULL)
		return NULL;
	old = ctx->userdata;
	ctx->userdata = userdata;
	return old;
}

void *utp_context_get_userdata(utp_context *ctx) { return ctx ? ctx->userdata : NULL; }

utp_context_stats *utp_get_context_stats(utp_context *ctx) { return ctx ? &ctx->stats : NULL; }

const utpkit_counters *utpkit_get_counters(utp_context *ctx) { return ctx ? &ctx->counters : NULL; }

/* ---- options ---------------------------------------------------------------- */

typedef struct {
	int id;
	size_t offset;
	int64 lo, hi;
} option_spec;

#define OPT(id, field, lo, hi) { id, offsetof(utp_context, field), lo, hi }
static const option_spec option_table[] = {
	OPT(UTP_SNDBUF, opt_sndbuf, 1024, 256 * 1024 * 1024),
	OPT(UTP_RCVBUF, opt_rcvbuf, 1024, 256 * 1024 * 1024),
	OPT(UTP_TARGET_DELAY, opt_target_delay, 1000, 10000000),
	OPT(UTPKIT_MIN_RTO, min_rto_ms, 1, 60000),
	OPT(UTPKIT_MAX_RTO, max_rto_ms, 100, 3600000),
	OPT(UTPKIT_MAX_SOCKETS, max_sockets, 0, 10000000),
	OPT(UTPKIT_SYN_TIMEOUT, syn_timeout_ms, 1, 600000),
	OPT(UTPKIT_SYN_RETRIES, syn_retries, 0, 30),
	OPT(UTPKIT_ACK_DELAY, ack_delay_ms, 1, 1000),
	OPT(UTPKIT_KEEPALIVE, keepalive_ms, 1000, 3600000),
	OPT(UTPKIT_DEAD_RETRIES, dead_retries, 1, 30),
	OPT(UTPKIT_RESET_RATE, reset_rate, 0, 1000000),
	OPT(UTPKIT_MTU_PROBING, mtu_probing, 0, 1),
	OPT(UTPKIT_HALF_OPEN_MAX, half_open_max, 0, 10000000),
	OPT(UTPKIT_HALF_OPEN_PER_ADDR, half_open_per_addr, 0, 10000000),
	OPT(UTPKIT_SYNACK_RATE, synack_rate, 0, 1000000),
};
#undef OPT

static int *log_option(utp_context *ctx, int opt)
{
	switch (opt) {
	case UTP_LOG_NORMAL: return &ctx->log_normal;
	case UTP_LOG_MTU: return &ctx->log_mtu;
	case UTP_LOG_DEBUG: return &ctx->log_debug;
	default: return NULL;
	}
}

int utp_context_set_option(utp_context *ctx, int opt, int val)
{
	size_t i;
	int *flag;
	if (ctx == NULL)
		return -1;
	if ((flag = log_option(ctx, opt)) != NULL) {
		*flag = val != 0;
		return 0;
	}
	for (i = 0; i < sizeof option_table / sizeof option_table[0]; i++) {
		const option_spec *o = &option_table[i];
		if (o->id != opt)
			continue;
		if (val < o->lo || val > o->hi)
			return -1;
		*(uint32 *)((char *)ctx + o->offset) = (uint32)val;
		if (opt == UTPKIT_RESET_RATE)
			ctx->reset_tokens = UTP_MIN(ctx->reset_tokens, (uint32)val);
		return 0;
	}
	return -1;
}

int utp_context_get_option(utp_context *ctx, int opt)
{
	size_t i;
	int *flag;
	if (ctx == NULL)
		return -1;
	if ((flag = log_option(ctx, opt)) != NULL)
		return *flag;
	for (i = 0; i < sizeof option_table / sizeof option_table[0]; i++)
		if (option_table[i].id == opt)
			return (int)*(uint32 *)((char *)ctx + option_table[i].offset);
	return -1;
}

/* ---- callbacks ------------------------------------------------------------- */

uint64 utp_cb_args(utp_context *ctx, utp_callback_arguments *a)
{
	utp_callback_t *cb = ctx->callbacks[a->callback_type];
	a->context = ctx;
	if (cb)
		return cb(a);
	switch (a->callback_type) {
	case UTP_GET_UDP_MTU: return default_udp_mtu(a->address);
	case UTP_GET_UDP_OVERHEAD: return default_udp_overhead(a->address);
	case UTP_GET_MICROSECONDS: return default_microseconds();
	case UTP_GET_MILLISECONDS: return default_microseconds() / 1000;
	case UTP_GET_RANDOM: return default_random();
	default: return 0;
	}
}

uint64 utp_cb(utp_context *ctx, int id, utp_socket *s, const byte *buf, size_t len)
{
	utp_callback_arguments a;
	memset(&a, 0, sizeof a);
	a.callback_type = id;
	a.socket = s;
	a.buf = buf;
	a.len = len;
	if (s) {
		a.address = (const struct sockaddr *)&s->addr;
		a.address_len = s->addrlen;
	}
	return utp_cb_args(ctx, &a);
}

uint32 utp_random32(utp_context *ctx) { return (uint32)utp_cb(ctx, UTP_GET_RANDOM, NULL, NULL, 0); }

static uint64 read_clock(utp_context *ctx)
{
	if (ctx->callbacks[UTP_GET_MICROSECONDS] == NULL && ctx->callbacks[UTP_GET_MILLISECONDS] != NULL)
		return utp_cb(ctx, UTP_GET_MILLISECONDS, NULL, NULL, 0) * 1000u;
	return utp_cb(ctx, UTP_GET_MICROSECONDS, NULL, NULL, 0);
}

void utp_log(utp_context *ctx, utp_socket *s, int level, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	int on = level == UTP_LOG_MTU ? ctx->log_mtu : level == UTP_LOG_DEBUG ? ctx->log_debug : ctx->log_normal;
	if (!on || ctx->callbacks[UTP_LOG] == NULL)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	utp_cb(ctx, UTP_LOG, s, (const byte *)msg, strlen(msg));
}

void utp_state_change(utp_socket *s, int state)
{
	utp_callback_arguments a;
	memset(&a, 0, sizeof a);
	a.callback_type = UTP_ON_STATE_CHANGE;
	a.socket = s;
	a.state = state;
	utp_cb_args(s->ctx, &a);
}

void utp_report_error(utp_socket *s, int code)
{
	utp_callback_arguments a;
	memset(&a, 0, sizeof a);
	a.callback_type = UTP_ON_ERROR;
	a.socket = s;
	a.error_code = code;
	utp_cb_args(s->ctx, &a);
}

/* Every public entry point brackets its work with enter/leave: the clock is
 * read once per outermost call, and sockets closed during the call (possibly
 * from inside a callback) are freed only when the outermost call returns,
 * so no frame below ever sees freed memory. */
void utp_ctx_enter(utp_context *ctx)
{
	if (ctx->depth++ == 0) {
		uint64 t = read_clock(ctx);
		if (t > ctx->now)
			ctx->now = t;
	}
}

void utp_ctx_leave(utp_context *ctx)
{
	if (ctx->depth == 1) {
		while (ctx->zombies) {
			utp_socket *s = ctx->zombies;
			ctx->zombies = s->zombie_next;
			utp_state_change(s, UTP_STATE_DESTROYING);
			utp_socket_free(s);
		}
	}
	ctx->depth--;
}

/* ---- the (address, recv_id) table -------------------------------------------- */

int utp_addr_equal(const struct sockaddr *a, socklen_t alen, const struct sockaddr *b, socklen_t blen)
{
	if (a->sa_family != b->sa_family)
		return 0;
	if (a->sa_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
		(void)alen; (void)blen;
		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	if (a->sa_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
		return x->sin6_port == y->sin6_port && x->sin6_scope_id == y->sin6_scope_id &&
		       memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
	}
	return alen == blen && memcmp(a, b, alen) == 0;
}

static uint32 addr_hash(const struct sockaddr *a, uint16 id)
{
	uint32 h = 2166136261u ^ id;
	const byte *p = NULL;
	size_t n = 0, i;
	uint16 port = 0;
	if (a->sa_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a;
		p = (const byte *)&x->sin_addr;
		n = 4;
		port = x->sin_port;
	} else if (a->sa_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a;
		p = (const byte *)&x->sin6_addr;
		n = 16;
		port = x->sin6_port;
	}
	for (i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	h = (h ^ port) * 16777619u;
	return h ^ (h >> 15);
}

static int table_grow(utp_context *ctx)
{
	uint32 n = ctx->nbuckets * 2, i;
	utp_socket **b = calloc(n, sizeof *b);
	if (b == NULL)
		return UTP_ERR_NOMEM;
	for (i = 0; i < ctx->nbuckets; i++) {
		utp_socket *s = ctx->buckets[i], *next;
		for (; s; s = next) {
			uint32 k = addr_hash((struct sockaddr *)&s->addr, s->recv_id) & (n - 1);
			next = s->hnext;
			s->hnext = b[k];
			b[k] = s;
		}
	}
	free(ctx->buckets);
	ctx->buckets = b;
	ctx->nbuckets = n;
	return 0;
}

int utp_table_insert(utp_context *ctx, utp_socket *s)
{
	uint32 k;
	if (ctx->ntable >= ctx->nbuckets && table_grow(ctx) != 0 && ctx->ntable >= ctx->nbuckets * 8)
		return UTP_ERR_NOMEM;
	k = addr_hash((struct sockaddr *)&s->addr, s->recv_id) & (ctx->nbuckets - 1);
	s->hnext = ctx->buckets[k];
	ctx->buckets[k] = s;
	s->in_table = 1;
	ctx->ntable++;
	return 0;
}

void utp_table_remove(utp_context *ctx, utp_socket *s)
{
	utp_socket **pp;
	if (!s->in_table)
		return;
	pp = &ctx->buckets[addr_hash((struct sockaddr *)&s->addr, s->recv_id) & (ctx->nbuckets - 1)];
	for (; *pp; pp = &(*pp)->hnext) {
		if (*pp == s) {
			*pp = s->hnext;
			break;
		}
	}
	s->in_table = 0;
	ctx->ntable--;
}

utp_socket *utp_table_find(utp_context *ctx, const struct sockaddr *addr, socklen_t len, uint16 recv_id)
{
	utp_socket *s = ctx->buckets[addr_hash(addr, recv_id) & (ctx->nbuckets - 1)];
	for (; s; s = s->hnext)
		if (s->recv_id == recv_id && utp_addr_equal((struct sockaddr *)&s->addr, s->addrlen, addr, len))
			return s;
	return NULL;
}

/* ---- timer heap (min-heap on deadline) ----------------------------------------- */

static void heap_swap(utp_context *ctx, uint32 i, uint32 j)
{
	utp_socket *t = ctx->heap[i];
	ctx->heap[i] = ctx->heap[j];
	ctx->heap[j] = t;
	ctx->heap[i]->heap_idx = (int)i;
	ctx->heap[j]->heap_idx = (int)j;
}

static void heap_fix(utp_context *ctx, uint32 i)
{
	while (i > 0 && ctx->heap[(i - 1) / 2]->deadline > ctx->heap[i]->deadline) {
		heap_swap(ctx, i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
	for (;;) {
		uint32 l = 2 * i + 1, r = l + 1, m = i;
		if (l < ctx->heap_len && ctx->heap[l]->deadline < ctx->heap[m]->deadline)
			m = l;
		if (r < ctx->heap_len && ctx->heap[r]->deadline < ctx->heap[m]->deadline)
			m = r;
		if (m == i)
			return;
		heap_swap(ctx, i, m);
		i = m;
	}
}

static void heap_remove(utp_context *ctx, utp_socket *s)
{
	uint32 i = (uint32)s->heap_idx;
	if (s->heap_idx < 0)
		return;
	s->heap_idx = -1;
	if (--ctx->heap_len == i)
		return;
	ctx->heap[i] = ctx->heap[ctx->heap_len];
	ctx->heap[i]->heap_idx = (int)i;
	heap_fix(ctx, i);
}

void utp_timer_update(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	uint64 d = s->zombie ? 0 : utp_socket_next_deadline(s);
	if (d == 0) {
		heap_remove(ctx, s);
		return;
	}
	s->deadline = d;
	if (s->heap_idx < 0) {
		if (ctx->heap_len == ctx->heap_cap) {
			uint32 cap = ctx->heap_cap ? ctx->heap_cap * 2 : 64;
			utp_socket **h = realloc(ctx->heap, cap * sizeof *h);
			if (h == NULL)
				return;  /* the socket's timers stay idle; check_timeouts cannot fire them */
			ctx->heap = h;
			ctx->heap_cap = cap;
		}
		s->heap_idx = (int)ctx->heap_len;
		ctx->heap[ctx->heap_len++] = s;
	}
	heap_fix(ctx, (uint32)s->heap_idx);
}

int64 utpkit_next_timeout(utp_context *ctx)
{
	uint64 now;
	if (ctx == NULL)
		return -1;
	if (ctx->heap_len == 0)
		return -1;
	now = UTP_MAX(read_clock(ctx), ctx->now);
	return ctx->heap[0]->deadline <= now ? 0 : (int64)(ctx->heap[0]->deadline - now);
}

void utp_check_timeouts(utp_context *ctx)
{
	uint32 budget;
	if (ctx == NULL)
		return;
	utp_ctx_enter(ctx);
	budget = 2 * ctx->heap_len + 16;
	while (ctx->heap_len > 0 && ctx->heap[0]->deadline <= ctx->now && budget-- > 0) {
		utp_socket *s = ctx->heap[0];
		utp_socket_on_timer(s);
		if (s->heap_idx == 0 && s->deadline <= ctx->now) {
			/* A handler that left its own deadline in the past would spin. */
			s->deadline = ctx->now + 1000;
			heap_fix(ctx, 0);
		}
	}
	utp_ctx_leave(ctx);
}

/* ---- deferred ACKs ---------------------------------------------------------------- */

void utp_ack_defer(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	s->ack_pending = 1;
	if (!s->in_ack_list) {
		s->in_ack_list = 1;
		s->ack_next = ctx->ack_list;
		ctx->ack_list = s;
	}
	if (s->ack_due == 0) {
		s->ack_due = ctx->now + (uint64)ctx->ack_delay_ms * 1000u;
		utp_timer_update(s);
	}
}

void utp_issue_deferred_acks(utp_context *ctx)
{
	if (ctx == NULL)
		return;
	utp_ctx_enter(ctx);
	while (ctx->ack_list) {
		utp_socket *s = ctx->ack_list;
		ctx->ack_list = s->ack_next;
		s->in_ack_list = 0;
		s->ack_next = NULL;
		if (s->ack_pending && !s->zombie)
			utp_out_send_ack(s);
	}
	utp_ctx_leave(ctx);
}

/* ---- sending ------------------------------------------------------------------------- */

static void count_size(uint32 *buckets, size_t len)
{
	buckets[len <= 23 ? 0 : len <= 373 ? 1 : len <= 723 ? 2 : len <= 1400 ? 3 : 4]++;
}

void utp_send_datagram(utp_context *ctx, const struct sockaddr *to, socklen_t tolen,
                       const byte *buf, size_t len, uint32 flags)
{
	utp_callback_arguments a;
	memset(&a, 0, sizeof a);
	a.callback_type = UTP_SENDTO;
	a.buf = buf;
	a.len = len;
	a.flags = flags;
	a.address = to;
	a.address_len = tolen;
	count_size(ctx->stats._nraw_send, len);
	ctx->counters.packets_out++;
	ctx->counters.bytes_out += len;
	utp_cb_args(ctx, &a);
}

void utp_send_reset_to(utp_context *ctx, const struct sockaddr *to, socklen_t tolen,
                       uint16 conn_id, uint16 ack_nr, int rate_limited)
{
	byte pkt[UTP_HEADER_SIZE];
	/* A RESET answering an unauthenticated packet passes the one gate for
	 * such replies (utp_accept.c), so a flood cannot make us a reflector. */
	if (rate_limited) {
		if (!utp_unauth_permit(ctx, to, tolen, sizeof pkt, UTP_UNAUTH_RESET)) {
			ctx->counters.resets_limited++;
			return;
		}
		ctx->counters.resets_sent++;
	}
	utp_packet_write_header(pkt, ST_RESET, conn_id, (uint32)ctx->now, 0, 0,
	                        (uint16)utp_random32(ctx), ack_nr, NULL, 0);
	utp_send_datagram(ctx, to, tolen, pkt, sizeof pkt, 0);
}

/* ---- TIME_WAIT ---------------------------------------------------------------------------- */

/* How long an application that is leaving should stay to answer for an entry
 * whose last packet was the peer's FIN: the peer waits for our ACK of it and,
 * if that ACK was lost, resends the FIN after its retransmission timeout
 * (about ours).  Two RTOs and a little catch one such loss; capped, so a
 * long RTO never holds an exit for long. */
static void timewait_set_linger(utp_context *ctx, utp_timewait *tw)
{
	tw->linger_until = ctx->now + UTP_MIN(2 * tw->rto + 100000u, (uint64)5000000u);
	if (tw->linger_until > tw->expires)
		tw->linger_until = tw->expires;
}

int64 utpkit_timewait_linger(utp_context *ctx)
{
	uint64 now, last = 0;
	uint32 i;
	if (ctx == NULL)
		return -1;
	now = UTP_MAX(read_clock(ctx), ctx->now);
	for (i = 0; i < UTP_TIMEWAIT_MAX; i++) {
		const utp_timewait *tw = &ctx->timewait[i];
		if (tw->expires != 0 && tw->have_fin && tw->linger_until > now && tw->linger_until > last)
			last = tw->linger_until;
	}
	return last ? (int64)(last - now) : -1;
}

void utp_timewait_add(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	utp_timewait *tw = &ctx->timewait[ctx->timewait_next];
	uint64 hold = 4 * (uint64)UTP_MAX(s->rto, 500000u);
	ctx->timewait_next = (ctx->timewait_next + 1) % UTP_TIMEWAIT_MAX;
	memcpy(&tw->addr, &s->addr, sizeof tw->addr);
	tw->addrlen = s->addrlen;
	tw->recv_id = s->recv_id;
	tw->send_id = s->send_id;
	tw->ack_nr = s->ack_nr;
	tw->seq_nr = s->next_send;
	tw->have_fin = s->got_fin && s->ack_nr == s->eof_seq;
	/* Long enough for the peer's FIN retransmissions (RTO backoff). */
	tw->expires = ctx->now + UTP_MIN(hold, (uint64)30000000u);
	tw->rto = UTP_MAX(s->rto, 500000u);
	tw->linger_until = 0;
	if (tw->have_fin)
		timewait_set_linger(ctx, tw);
}

/* A FIN (or a duplicate) for a connection we closed a moment ago: ACK it
 * as the socket would have.  A FIN we had not seen yet, arriving right
 * after we left, is acknowledged too: the peer ends cleanly.  So is a
 * retransmission of data we already have (the peer lost our ACKs of its
 * tail while we finished): the ACK tells it everything arrived.  Anything
 * carrying new data still gets a RESET.  Returns 1 when answered. */
int utp_timewait_answer(utp_context *ctx, const utp_packet *pk, const struct sockaddr *from, socklen_t fromlen)
{
	uint32 i;
	for (i = 0; i < UTP_TIMEWAIT_MAX; i++) {
		utp_timewait *tw = &ctx->timewait[i];
		uint16 d;
		byte pkt[UTP_HEADER_SIZE];
		if (tw->expires == 0 || tw->expires < ctx->now || tw->recv_id != pk->conn_id ||
		    !utp_addr_equal((struct sockaddr *)&tw->addr, tw->addrlen, from, fromlen))
			continue;
		d = seq_dist((uint16)(tw->ack_nr + 1), pk->seq_nr);
		if (pk->type == ST_STATE)
			return 1;  /* an ACK of ours being answered: nothing to say */
		if (pk->type == ST_FIN && d == 0 && !tw->have_fin) {
			tw->ack_nr = pk->seq_nr;
			tw->have_fin = 1;
			timewait_set_linger(ctx, tw);
		} else if (d < 0x8000) {
			return 0;  /* new data: the RESET path */
		}
		utp_packet_write_header(pkt, ST_STATE, tw->send_id, (uint32)ctx->now, 0, 0, tw->seq_nr,
		                        tw->ack_nr, NULL, 0);
		if (utp_unauth_permit(ctx, from, fromlen, sizeof pkt, UTP_UNAUTH_OTHER))
			utp_send_datagram(ctx, from, fromlen, pkt, sizeof pkt, 0);
		return 1;
	}
	return 0;
}

/* ---- incoming datagrams ----------------------------------------------------------------- */

int utp_addr_valid(const struct sockaddr *a, socklen_t len)
{
	if (a == NULL)
		return 0;
	if (a->sa_family == AF_INET)
		return len >= (socklen_t)sizeof(struct sockaddr_in);
	if (a->sa_family == AF_INET6)
		return len >= (socklen_t)sizeof(struct sockaddr_in6);
	return 0;
}

/* The socket whose send id is `id`: our send id is recv_id + 1 for the side
 * that connected and recv_id - 1 for the side that accepted. */
static utp_socket *find_by_send_id(utp_context *ctx, const struct sockaddr *addr, socklen_t len, uint16 id)
{
	utp_socket *s = utp_table_find(ctx, addr, len, (uint16)(id - 1));
	if (s && s->send_id == id)
		return s;
	s = utp_table_find(ctx, addr, len, (uint16)(id + 1));
	if (s && s->send_id == id)
		return s;
	return NULL;
}

/* A RESET names either our receive id or our send id (libutp echoes the id
 * of the packet it refuses). */
/* The socket a RESET is for.  A peer aborting sends it on our receive id; a
 * peer answering a packet it has no connection for sends it on our send id,
 * echoing that packet's seq_nr as ack_nr (libutp, libtorrent and we do so).
 * Many connections from one address make send ids of one socket collide
 * with ids of another's stray RESETs (a given-up attempt's), so the send-id
 * route needs that echo to name a packet we sent: *stray is set otherwise. */
static utp_socket *find_reset_target(utp_context *ctx, const struct sockaddr *from, socklen_t fromlen,
                                     const utp_packet *pk, int *stray)
{
	utp_socket *s = utp_table_find(ctx, from, fromlen, pk->conn_id);
	uint16 back;
	*stray = 0;
	if (s != NULL)
		return s;
	s = find_by_send_id(ctx, from, fromlen, pk->conn_id);
	if (s == NULL)
		return NULL;
	/* How far behind our newest sequence number the echo is: within what is
	 * in flight, with room for keepalives and the SYN. */
	back = (uint16)(s->seq_nr - 1 - pk->ack_nr);
	if (back <= (uint16)(s->seq_nr - s->acked_seq) + 256u)
		return s;
	*stray = 1;
	return NULL;
}

int utp_process_udp(utp_context *ctx, const byte *buf, size_t len, const struct sockaddr *from,
                    socklen_t fromlen)
{
	utp_packet pk;
	utp_socket *s;

	if (ctx == NULL || buf == NULL || !utp_addr_valid(from, fromlen))
		return 0;
	if (utpkit_classify(buf, len) != UTPKIT_CLASS_UTP) {
		ctx->counters.not_utp++;
		return 0;
	}
	utp_ctx_enter(ctx);
	count_size(ctx->stats._nraw_recv, len);
	ctx->counters.packets_in++;
	ctx->counters.bytes_in += len;

	if (utp_packet_parse_untrusted(buf, len, &pk) != 0) {
		ctx->counters.drop_malformed++;
	} else if (pk.type == ST_SYN) {
		utp_unauth_in(ctx, len);
		s = utp_table_find(ctx, from, fromlen, (uint16)(pk.conn_id + 1));
		if (s == NULL) {
			utp_accept_syn(ctx, &pk, len, from, fromlen);
		} else if (s->is_acceptor && s->syn_seq == pk.seq_nr && s->state != UTPKIT_SOCK_DESTROYED) {
			/* Our reply was lost: answer again, create nothing. */
			ctx->counters.syn_duplicate++;
			if (utp_unauth_permit(ctx, from, fromlen, UTP_HEADER_SIZE, UTP_UNAUTH_OTHER))
				utp_out_send_synack(s);
		} else {
			ctx->counters.drop_invalid++;
		}
	} else if (pk.type == ST_RESET) {
		int stray;
		s = find_reset_target(ctx, from, fromlen, &pk, &stray);
		if (s)
			utp_in_on_packet(s, &pk);
		else if (stray)
			ctx->counters.drop_invalid++;
		else
			ctx->counters.drop_unknown++;  /* never answer a RESET */
	} else {
		s = utp_table_find(ctx, from, fromlen, pk.conn_id);
		if (s) {
			utp_in_on_packet(s, &pk);
		} else {
			utp_unauth_in(ctx, len);
			/* First: the initiator of a connection we answered with a cookie. */
			if (!utp_accept_cookie(ctx, &pk, from, fromlen) &&
			    !utp_timewait_answer(ctx, &pk, from, fromlen)) {
				ctx->counters.drop_unknown++;
				utp_send_reset_to(ctx, from, fromlen, pk.conn_id, pk.seq_nr, 1);
			}
		}
	}
	utp_ctx_leave(ctx);
	return 1;
}

/* The ICMP entry points receive the datagram we sent, as quoted by the ICMP
 * error.  Only its first bytes are needed: type, connection id, seq_nr. */
static utp_socket *icmp_socket(utp_context *ctx, const byte *buf, size_t len, const struct sockaddr *to,
                               socklen_t tolen)
{
	uint16 id;
	utp_socket *s;
	if (buf == NULL || len < 4 || !utp_addr_valid(to, tolen) || (buf[0] & 0x0f) != UTP_VERSION)
		return NULL;
	id = (uint16)((buf[2] << 8) | buf[3]);
	if ((buf[0] >> 4) == ST_SYN) {
		s = utp_table_find(ctx, to, tolen, id);
		return (s && !s->is_acceptor) ? s : NULL;
	}
	return find_by_send_id(ctx, to, tolen, id);
}

int utp_process_icmp_error(utp_context *ctx, const byte *buffer, size_t len, const struct sockaddr *to,
                           socklen_t tolen)
{
	utp_socket *s;
	if (ctx == NULL)
		return 0;
	utp_ctx_enter(ctx);
	s = icmp_socket(ctx, buffer, len, to, tolen);
	if (s) {
		ctx->counters.icmp_handled++;
		/* Port unreachable: nobody listens there (refused while connecting),
		 * or the peer went away (reset). */
		utp_socket_fail(s, s->state == UTPKIT_SOCK_SYN_SENT ? UTP_ECONNREFUSED : UTP_ECONNRESET);
	}
	utp_ctx_leave(ctx);
	return s != NULL;
}

int utp_process_icmp_fragmentation(utp_context *ctx, const byte *buffer, size_t len,
                                   const struct sockaddr *to, socklen_t tolen, uint16 next_hop_mtu)
{
	utp_socket *s;
	if (ctx == NULL)
		return 0;
	utp_ctx_enter(ctx);
	s = icmp_socket(ctx, buffer, len, to, tolen);
	if (s) {
		ctx->counters.icmp_handled++;
		utp_mtu_on_icmp(s, next_hop_mtu, len >= 18 ? (uint16)((buffer[16] << 8) | buffer[17]) : 0,
		                len >= 18);
	}
	utp_ctx_leave(ctx);
	return s != NULL;
}
