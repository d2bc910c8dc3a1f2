/*
 * utp_accept.c -- incoming SYNs under hostile load, and the one gate every
 * reply to an unauthenticated packet passes.
 *
 * A SYN costs its sender 20 bytes and no proof of its source address, so a
 * flood of spoofed SYNs must neither fill the socket table nor turn us into a
 * reflector.  What this module does:
 *
 * 1. Strict shape.  A SYN is exactly a header plus well-formed extensions (at
 *    most UTP_SYN_EXT_MAX bytes of them) and no payload.
 *    Anything else is dropped without an answer and counted (syn_invalid):
 *    random datagrams that happen to start with 0x41 never pass.
 *
 * 2. Cheap half-open state, bounded twice.  While fewer than
 *    UTPKIT_HALF_OPEN_MAX accepted sockets are unconfirmed (the initiator has
 *    sent nothing after its SYN), and fewer than UTPKIT_HALF_OPEN_PER_ADDR of
 *    them come from the SYN's source address, a SYN is accepted as before:
 *    socket, SYN-ACK, ON_ACCEPT, and the acceptor may speak first.
 *
 * 3. SYN cookies past those bounds.  The SYN is answered statelessly: the
 *    SYN-ACK's seq_nr -- the one field of the handshake the acceptor chooses
 *    and the initiator echoes (as ack_nr + 1 of every later packet) -- is a
 *    keyed hash of the source address and port, the SYN's connection id, the
 *    SYN's seq_nr and a coarse time slot.  No state is kept; the socket is
 *    created (and ON_ACCEPT fires) when a DATA, FIN or STATE for no socket
 *    carries a cookie we issued.  The initiator's seq_nr tells which SYN it
 *    belongs to: its first packet after the SYN carries syn_seq + 1, and we
 *    also try the next few in case the first ones were lost.
 *
 *    The trade-off: with a cookie the acceptor cannot speak first, since it
 *    does not exist until the initiator sends something.  libutp and
 *    libtorrent never need that -- libutp completes an incoming connection
 *    only on the initiator's ST_DATA, so a BitTorrent initiator always sends
 *    first -- but a utpkit application whose protocol starts with the
 *    acceptor waits, under a flood, until the initiator sends anything (our
 *    own initiators send a keepalive after UTPKIT_KEEPALIVE).  Cookies are
 *    only 16 bits, so a blind attacker creates a connection with about one
 *    packet in 8,192; such a connection is confirmed garbage that times out
 *    like any dead peer, and it costs the attacker thousands of packets.
 *    Cookies are checked only while they are being issued (within two time
 *    slots of the latest), so outside a flood no guess can succeed.
 *    Eviction of old half-open sockets was the alternative: it keeps
 *    acceptor-first protocols working under load but delivers every spoofed
 *    SYN to the application (ON_ACCEPT, then a reset), and a legitimate
 *    half-open socket loses the race as soon as the flood outpaces its round
 *    trip.  Cookies only come into play past the bounds, so an unloaded
 *    listener behaves exactly as before.
 *    The application's firewall (UTP_ON_FIREWALL) is asked before the
 *    cookie goes out and again when it comes back; args->flags says which
 *    (UTPKIT_FIREWALL_COOKIE_SYN, _COOKIE_RETURN; a socket's SYN is
 *    UTPKIT_FIREWALL_SYN) and args->len carries the SYN's connection id, so
 *    a firewall that admits one connection (hole punching's) can admit the
 *    same SYN twice and still refuse the peer's other attempts.
 *
 * 4. One gate for replies to unauthenticated packets (RESETs to unknown
 *    connections, refusals, SYN-ACKs of both kinds, repeated SYN-ACKs, the
 *    TIME_WAIT ACK, RESETs of unconfirmed sockets the application refuses):
 *    utp_unauth_permit.  Every reply is paid for from the bytes such packets
 *    brought in, so bytes out never exceed bytes in -- plus a small standing
 *    allowance (UTP_UNAUTH_ALLOW bytes, refilled at UTP_UNAUTH_ALLOW_RATE
 *    bytes/s), without which an idle listener could not both answer a SYN
 *    and later refuse that connection with a RESET (a full backlog): that
 *    exchange is 40 bytes out for 20 in.  Then a token bucket: RESETs share
 *    UTPKIT_RESET_RATE; cookie SYN-ACKs are limited per source address by
 *    UTPKIT_SYNACK_RATE (a burst of four seconds' worth), so a victim whose
 *    address is spoofed gets little from us and a flood from a few hundred
 *    addresses is answered only in part.  SYN-ACKs of sockets (no pressure)
 *    pay only bytes: 10,000 quick connections from one address stay quick.
 */
#include "utp_internal.h"

/* Extension bytes a SYN may carry (libutp and libtorrent send none). */
#define UTP_SYN_EXT_MAX 64
/* Most unauthenticated bytes kept as credit for replies. */
#define UTP_UNAUTH_CREDIT_MAX (256u * 1024u)
#define UTP_UNAUTH_ALLOW 4096u
#define UTP_UNAUTH_ALLOW_RATE 1024u
/* A cookie is valid in the time slot it was issued in and the next one
 * (2^23 us, about 8.4 s each): initiators answer a SYN-ACK at once. */
#define UTP_COOKIE_SLOT_SHIFT 23
/* Initiator packets that may be lost before the one that reaches us. */
#define UTP_COOKIE_SEQ_SLACK 4

/* ---- keyed hashing (SipHash-2-4 over 64-bit words) ------------------------ */

static uint64_t rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

typedef struct { uint64_t v0, v1, v2, v3; } sip_state;

static void sip_round(sip_state *s)
{
	s->v0 += s->v1; s->v1 = rotl(s->v1, 13); s->v1 ^= s->v0; s->v0 = rotl(s->v0, 32);
	s->v2 += s->v3; s->v3 = rotl(s->v3, 16); s->v3 ^= s->v2;
	s->v0 += s->v3; s->v3 = rotl(s->v3, 21); s->v3 ^= s->v0;
	s->v2 += s->v1; s->v1 = rotl(s->v1, 17); s->v1 ^= s->v2; s->v2 = rotl(s->v2, 32);
}

static uint64_t siphash_words(const uint32 key[4], const uint64_t *m, int n)
{
	uint64_t k0 = ((uint64_t)key[0] << 32) | key[1], k1 = ((uint64_t)key[2] << 32) | key[3];
	sip_state s = { k0 ^ 0x736f6d6570736575ull, k1 ^ 0x646f72616e646f6dull,
	                k0 ^ 0x6c7967656e657261ull, k1 ^ 0x7465646279746573ull };
	uint64_t last = (uint64_t)(8 * n) << 56;
	int i;
	for (i = 0; i <= n; i++) {
		uint64_t w = i < n ? m[i] : last;
		s.v3 ^= w;
		sip_round(&s);
		sip_round(&s);
		s.v0 ^= w;
	}
	s.v2 ^= 0xff;
	for (i = 0; i < 4; i++)
		sip_round(&s);
	return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

static void ensure_key(utp_context *ctx)
{
	int i;
	if (ctx->cookie_keyed)
		return;
	for (i = 0; i < 4; i++)
		ctx->cookie_key[i] = utp_random32(ctx);
	ctx->cookie_keyed = 1;
}

/* The address as two 64-bit words (IPv4: the 4 bytes; IPv6: all 16). */
static void addr_words(const struct sockaddr *a, uint64_t w[2], uint16 *port)
{
	w[0] = w[1] = 0;
	*port = 0;
	if (a->sa_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a;
		memcpy(&w[0], &x->sin_addr, 4);
		*port = x->sin_port;
	} else if (a->sa_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a;
		memcpy(w, &x->sin6_addr, 16);
		*port = x->sin6_port;
	}
}

static uint16 cookie_of(utp_context *ctx, const struct sockaddr *from, uint16 syn_conn_id, uint16 syn_seq,
                        uint64 slot)
{
	uint64_t m[4];
	uint16 port;
	uint64_t h;
	addr_words(from, m, &port);
	m[2] = ((uint64_t)port << 32) | ((uint64_t)syn_conn_id << 16) | syn_seq;
	m[3] = slot;
	h = siphash_words(ctx->cookie_key, m, 4);
	return (uint16)(h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48));
}

/* ---- per-source table ---------------------------------------------------------- */

static utp_src_slot *src_slot(utp_context *ctx, const struct sockaddr *a)
{
	uint64_t w[3], h;
	uint16 port;
	utp_src_slot *victim = NULL;
	int i;
	if (ctx->src == NULL) {
		ctx->src = calloc(UTP_SRC_SLOTS, sizeof *ctx->src);
		if (ctx->src == NULL)
			return NULL;
	}
	ensure_key(ctx);
	addr_words(a, w, &port);
	w[2] = 0x5352430000000000ull;  /* domain separation from cookies */
	h = siphash_words(ctx->cookie_key, w, 3);
	for (i = 0; i < UTP_SRC_PROBE; i++) {
		utp_src_slot *sl = &ctx->src[(h + i) & (UTP_SRC_SLOTS - 1)];
		if (sl->used && sl->addr[0] == w[0] && sl->addr[1] == w[1])
			return sl;
		if (!sl->used) {
			if (victim == NULL || victim->used)
				victim = sl;   /* the first free slot */
		} else if (sl->half_open == 0 && (victim == NULL || (victim->used && sl->refill < victim->refill))) {
			victim = sl;       /* else the stalest one without half-open sockets */
		}
	}
	if (victim == NULL)
		return NULL;   /* all hold half-open sockets of other sources: refused, as a full table */
	memset(victim, 0, sizeof *victim);
	victim->used = 1;
	victim->addr[0] = w[0];
	victim->addr[1] = w[1];
	return victim;
}

void utp_accept_free(utp_context *ctx)
{
	free(ctx->src);
	ctx->src = NULL;
}

/* ---- the gate for replies to unauthenticated packets ---------------------------- */

void utp_unauth_in(utp_context *ctx, size_t len)
{
	ctx->counters.unauth_bytes_in += len;
	ctx->unauth_credit = UTP_MIN((uint64)UTP_UNAUTH_CREDIT_MAX, ctx->unauth_credit + len);
}

static int take_reset_token(utp_context *ctx)
{
	uint64 add = (ctx->now - ctx->reset_refill) * ctx->reset_rate / 1000000u;
	if (add > 0) {
		ctx->reset_tokens = (uint32)UTP_MIN((uint64)ctx->reset_rate, ctx->reset_tokens + add);
		ctx->reset_refill = ctx->now;
	}
	if (ctx->reset_tokens == 0)
		return 0;
	ctx->reset_tokens--;
	return 1;
}

static int take_synack_token(utp_context *ctx, const struct sockaddr *to)
{
	utp_src_slot *sl = src_slot(ctx, to);
	uint64 add;
	if (sl == NULL)
		return 0;
	if (sl->refill == 0) {
		sl->tokens = 4 * ctx->synack_rate;
		sl->refill = ctx->now;
	}
	add = (ctx->now - sl->refill) * ctx->synack_rate / 1000000u;
	if (add > 0) {
		sl->tokens = (uint32)UTP_MIN(4 * (uint64)ctx->synack_rate, sl->tokens + add);
		sl->refill = ctx->now;
	}
	if (sl->tokens == 0)
		return 0;
	sl->tokens--;
	return 1;
}

/* Pays len bytes from the credit, else from the allowance; 0 if neither has them. */
static int pay_bytes(utp_context *ctx, size_t len, int commit)
{
	uint64 add = (ctx->now - ctx->unauth_allow_refill) * UTP_UNAUTH_ALLOW_RATE / 1000000u;
	if (add > 0 || ctx->unauth_allow_refill == 0) {
		ctx->unauth_allow = (uint32)UTP_MIN((uint64)UTP_UNAUTH_ALLOW,
		                                    ctx->unauth_allow_refill == 0 ? UTP_UNAUTH_ALLOW : ctx->unauth_allow + add);
		ctx->unauth_allow_refill = ctx->now ? ctx->now : 1;
	}
	if (ctx->unauth_credit >= len) {
		if (commit)
			ctx->unauth_credit -= len;
		return 1;
	}
	if (ctx->unauth_allow >= len) {
		if (commit)
			ctx->unauth_allow -= (uint32)len;
		return 1;
	}
	return 0;
}

int utp_unauth_permit(utp_context *ctx, const struct sockaddr *to, socklen_t tolen, size_t len, int kind)
{
	int ok;
	(void)tolen;
	if (!pay_bytes(ctx, len, 0)) {
		ok = 0;
	} else if (kind == UTP_UNAUTH_RESET) {
		ok = take_reset_token(ctx);
	} else if (kind == UTP_UNAUTH_SYNACK) {
		ok = take_synack_token(ctx, to);
	} else {
		ok = 1;
	}
	if (!ok) {
		ctx->counters.unauth_limited++;
		return 0;
	}
	pay_bytes(ctx, len, 1);
	ctx->counters.unauth_bytes_out += len;
	return 1;
}

/* ---- half-open accounting --------------------------------------------------------- */

static void half_open_add(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	utp_src_slot *sl = src_slot(ctx, (struct sockaddr *)&s->addr);
	s->half_open = 1;
	if (sl)
		sl->half_open++;
	if (++ctx->counters.half_open > ctx->counters.half_open_peak)
		ctx->counters.half_open_peak = ctx->counters.half_open;
}

void utp_accept_release(utp_socket *s)
{
	utp_context *ctx = s->ctx;
	utp_src_slot *sl;
	if (!s->half_open)
		return;
	s->half_open = 0;
	sl = src_slot(ctx, (struct sockaddr *)&s->addr);
	if (sl && sl->half_open > 0)
		sl->half_open--;
	ctx->counters.half_open--;
}

void utp_accept_confirmed(utp_socket *s)
{
	if (s->is_acceptor && !s->confirmed)
		s->syn_deadline = 0;   /* no more SYN-ACK repeats: held data goes with the next flush */
	s->confirmed = 1;
	utp_accept_release(s);
}

/* ---- accepting -------------------------------------------------------------------- */

/* Exactly a header and well-formed extensions of modest length, no payload.
 * (The parser has already checked that the chain fits.)  The window cannot
 * be part of it: libtorrent's SYN advertises a window of 0. */
static int syn_well_formed(const utp_packet *pk, size_t len)
{
	return pk->payload_len == 0 && len <= UTP_HEADER_SIZE + UTP_SYN_EXT_MAX;
}

/* Would the application take a connection from here now?  stage is one of
 * UTPKIT_FIREWALL_* (utp.h), syn_conn_id the SYN's connection id: both go
 * to the firewall, which may be asked twice about a cookie's connection. */
static int may_accept(utp_context *ctx, const struct sockaddr *from, socklen_t fromlen, int stage,
                      uint16 syn_conn_id)
{
	utp_callback_arguments a;
	if (ctx->callbacks[UTP_ON_ACCEPT] == NULL || ctx->counters.sockets_live >= ctx->max_sockets)
		return 0;
	if (ctx->callbacks[UTP_ON_FIREWALL] == NULL)
		return 1;
	memset(&a, 0, sizeof a);
	a.callback_type = UTP_ON_FIREWALL;
	a.address = from;
	a.address_len = fromlen;
	a.flags = (uint32)stage;
	a.len = syn_conn_id;
	return utp_cb_args(ctx, &a) == 0;
}

static void refuse(utp_context *ctx, const utp_packet *pk, const struct sockaddr *from, socklen_t fromlen)
{
	/* A RESET tells the initiator at once (UTP_ECONNREFUSED) instead of
	 * letting it wait out its SYN retries; it passes the gate. */
	ctx->counters.syn_refused++;
	utp_send_reset_to(ctx, from, fromlen, pk->conn_id, pk->seq_nr, 1);
}

/* The acceptor's socket for the SYN (syn_conn_id, syn_seq) from `from`,
 * with our first sequence number isn; connected and in the table, or NULL. */
static utp_socket *new_acceptor(utp_context *ctx, const struct sockaddr *from, uint16 syn_conn_id,
                                uint16 syn_seq, uint16 isn, uint32 wnd)
{
	utp_socket *s = utp_socket_new(ctx);
	if (s == NULL)
		return NULL;
	utp_socket_set_addr(s, from);
	s->is_acceptor = 1;
	s->recv_id = (uint16)(syn_conn_id + 1);
	s->send_id = syn_conn_id;
	s->syn_seq = syn_seq;
	s->ack_nr = syn_seq;
	s->isn = isn;
	s->seq_nr = s->next_send = isn;
	s->acked_seq = (uint16)(isn - 1);
	s->peer_wnd = wnd;
	s->last_recv = ctx->now;
	utp_mtu_init(s);
	utp_cc_init(s);
	if (utp_table_insert(ctx, s) != 0) {
		utp_socket_destroy_later(s);
		return NULL;
	}
	/* Unlike libutp, an accepted connection is established at once: it may
	 * send before the initiator has sent anything. */
	s->state = UTPKIT_SOCK_CONNECTED;
	return s;
}

static void announce(utp_context *ctx, utp_socket *s)
{
	utp_callback_arguments a;
	memset(&a, 0, sizeof a);
	a.callback_type = UTP_ON_ACCEPT;
	a.socket = s;
	a.address = (const struct sockaddr *)&s->addr;
	a.address_len = s->addrlen;
	utp_cb_args(ctx, &a);
}

static void send_cookie(utp_context *ctx, const utp_packet *pk, const struct sockaddr *from, socklen_t fromlen)
{
	byte out[UTP_HEADER_SIZE];
	uint16 c = cookie_of(ctx, from, pk->conn_id, pk->seq_nr, ctx->now >> UTP_COOKIE_SLOT_SHIFT);
	/* What a socket's SYN-ACK would say: our window, the delay of the SYN
	 * for the initiator's LEDBAT, our first seq_nr, its SYN acknowledged. */
	utp_packet_write_header(out, ST_STATE, pk->conn_id, (uint32)ctx->now, (uint32)ctx->now - pk->ts,
	                        ctx->opt_rcvbuf, c, pk->seq_nr, NULL, 0);
	ctx->counters.syn_cookies++;
	ctx->cookie_slot = (ctx->now >> UTP_COOKIE_SLOT_SHIFT) + 1;
	utp_send_datagram(ctx, from, fromlen, out, sizeof out, 0);
}

void utp_accept_syn(utp_context *ctx, const utp_packet *pk, size_t len, const struct sockaddr *from,
                    socklen_t fromlen)
{
	utp_src_slot *sl;
	utp_socket *s;
	int cookie;

	if (!syn_well_formed(pk, len)) {
		ctx->counters.syn_invalid++;
		return;
	}
	/* Cookie or socket is decided first, so the firewall knows which its
	 * yes would mean (it is asked before anything is answered either way). */
	ensure_key(ctx);
	sl = src_slot(ctx, from);
	cookie = ctx->counters.half_open >= ctx->half_open_max || sl == NULL ||
	         sl->half_open >= ctx->half_open_per_addr;
	if (!may_accept(ctx, from, fromlen, cookie ? UTPKIT_FIREWALL_COOKIE_SYN : UTPKIT_FIREWALL_SYN,
	                pk->conn_id)) {
		refuse(ctx, pk, from, fromlen);
		return;
	}
	if (cookie) {
		if (utp_unauth_permit(ctx, from, fromlen, UTP_HEADER_SIZE, UTP_UNAUTH_SYNACK))
			send_cookie(ctx, pk, from, fromlen);
		return;
	}
	if (!utp_unauth_permit(ctx, from, fromlen, UTP_HEADER_SIZE, UTP_UNAUTH_OTHER))
		return;
	s = new_acceptor(ctx, from, pk->conn_id, pk->seq_nr, (uint16)utp_random32(ctx), pk->wnd);
	if (s == NULL) {
		ctx->counters.syn_refused++;
		return;
	}
	half_open_add(s);
	s->reply_micro = (uint32)ctx->now - pk->ts;
	s->stats.nrecv++;
	utp_out_send_synack(s);
	announce(ctx, s);
	if (!s->zombie)
		utp_timer_update(s);
}

int utp_accept_cookie(utp_context *ctx, const utp_packet *pk, const struct sockaddr *from, socklen_t fromlen)
{
	uint64 slot = ctx->now >> UTP_COOKIE_SLOT_SHIFT;
	uint16 want = (uint16)(pk->ack_nr + 1), syn_conn_id = (uint16)(pk->conn_id - 1), syn_seq = 0;
	int k, age, slack = pk->type == ST_STATE ? 1 : UTP_COOKIE_SEQ_SLACK, found = 0;
	utp_socket *s;

	/* Only while cookies are in use (one issued in this slot or the one
	 * before): otherwise no packet can carry one, and a blind guess should
	 * not get its one-in-thousands chance. */
	if ((pk->type != ST_DATA && pk->type != ST_FIN && pk->type != ST_STATE) || ctx->cookie_slot == 0 ||
	    ctx->cookie_slot < slot || ctx->callbacks[UTP_ON_ACCEPT] == NULL)
		return 0;
	for (age = 0; age < 2 && !found && slot >= (uint64)age; age++) {
		for (k = 0; k < slack && !found; k++) {
			syn_seq = (uint16)(pk->seq_nr - 1 - k);
			found = cookie_of(ctx, from, syn_conn_id, syn_seq, slot - (uint64)age) == want;
		}
	}
	if (!found)
		return 0;
	if (!may_accept(ctx, from, fromlen, UTPKIT_FIREWALL_COOKIE_RETURN, syn_conn_id)) {
		ctx->counters.syn_refused++;
		utp_send_reset_to(ctx, from, fromlen, syn_conn_id, pk->seq_nr, 1);
		return 1;
	}
	s = new_acceptor(ctx, from, syn_conn_id, syn_seq, want, pk->wnd);
	if (s == NULL) {
		ctx->counters.syn_refused++;
		return 1;
	}
	ctx->counters.cookie_accepted++;
	s->confirmed = 1;
	announce(ctx, s);
	if (!s->zombie)
		utp_in_on_packet(s, pk);
	if (!s->zombie)
		utp_timer_update(s);
	return 1;
}
