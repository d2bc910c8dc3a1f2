/*
 * test_accept.c -- the SYN defence of utp/core/utp_accept.c on the virtual
 * clock: strict SYN validation, half-open bounds, SYN cookies, the reply
 * budget for unauthenticated packets, and a legitimate connection that gets
 * through a 100,000-SYN flood.
 *
 * Usage: test_accept [substring...]   runs the tests whose names match.
 */
#include <arpa/inet.h>
#include <stdlib.h>

#include "check.h"

/* A spoofed IPv4 source 10.x.y.z:port (no node there: replies vanish). */
static void spoofed(struct sockaddr_storage *ss, socklen_t *len, unsigned i)
{
	struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
	memset(ss, 0, sizeof *ss);
	s4->sin_family = AF_INET;
	s4->sin_addr.s_addr = htonl(0x0a000000u | (1 + i % 250) << 8 | 7);
	s4->sin_port = htons((unsigned short)(1024 + i % 60000));
	*len = sizeof *s4;
}

static void inject_syn(struct sim_node *b, unsigned i)
{
	unsigned char p[20];
	struct sockaddr_storage from;
	socklen_t flen;
	spoofed(&from, &flen, i);
	sim_header(p, ST_SYN, 1, 0, (unsigned)sim_rand() & 0xffff, (unsigned)sim_now, 0, 65536,
	           (unsigned)sim_rand() & 0xffff, 0);
	sim_inject(b, p, sizeof p, (struct sockaddr *)&from, flen);
}

static int conn_done(void *arg)
{
	struct sim_conn *c = arg;
	return c->destroyed || c->error >= 0;
}

static int all_received(void *arg)
{
	struct sim_conn **pair = arg;
	return pair[1] != NULL && pair[1]->rx_len == pair[0]->tx_len;
}

/* The connection b accepted from node a (NULL if none yet). */
static struct sim_conn *accepted_from(struct sim_node *b)
{
	int i;
	for (i = 0; i < sim_nconns(); i++)
		if (sim_conn_at(i)->node == b && sim_conn_at(i)->accepted && sim_conn_at(i)->s) {
			struct sockaddr_storage ss;
			socklen_t len = sizeof ss;
			if (utp_getpeername(sim_conn_at(i)->s, (struct sockaddr *)&ss, &len) == 0 &&
			    ((struct sockaddr_in *)&ss)->sin_addr.s_addr == htonl(INADDR_LOOPBACK))
				return sim_conn_at(i);
		}
	return NULL;
}

/* ---- tests ------------------------------------------------------------------ */

static void test_syn_shape(void)
{
	struct sim_node *b;
	struct sockaddr_storage from;
	socklen_t flen;
	unsigned char p[1000];
	size_t n;
	int i;

	sim_init(101, START_US);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 64);
	sim_make_addr(&from, &flen, 5555, 0);
	/* 1,000 random bytes starting 0x41: a SYN with a payload, never a connection. */
	for (i = 0; i < 10000; i++) {
		size_t k;
		for (k = 0; k < sizeof p; k++)
			p[k] = (unsigned char)sim_rand();
		p[0] = 0x41;
		if (i % 2)
			p[1] = 0;  /* no extension: the payload follows the header */
		sim_inject(b, p, sizeof p, (struct sockaddr *)&from, flen);
	}
	CHECK_EQ(counters(b)->sockets_live, 0);
	CHECK_EQ(b->sent, 0);
	CHECK_EQ(counters(b)->syn_invalid + counters(b)->drop_malformed, 10000);
	/* A payload of one byte, too many extension bytes. */
	n = sim_header(p, ST_SYN, 1, 0, 100, 1, 0, 65536, 5, 0);
	p[n] = 'x';
	sim_inject(b, p, n + 1, (struct sockaddr *)&from, flen);
	n = sim_header(p, ST_SYN, 1, 0x7e, 100, 1, 0, 65536, 5, 0);
	p[n] = 0;
	p[n + 1] = 100;
	memset(p + n + 2, 0, 100);
	sim_inject(b, p, n + 102, (struct sockaddr *)&from, flen);
	CHECK_EQ(counters(b)->syn_invalid, 10000 - counters(b)->drop_malformed + 2);
	CHECK_EQ(counters(b)->sockets_live, 0);
	CHECK_EQ(b->sent, 0);
	/* A well-formed SYN with a short unknown extension is accepted. */
	n = sim_header(p, ST_SYN, 1, 0x7e, 100, 1, 0, 65536, 5, 0);
	p[n] = 0;
	p[n + 1] = 4;
	memset(p + n + 2, 0, 4);
	sim_inject(b, p, n + 6, (struct sockaddr *)&from, flen);
	CHECK_EQ(b->naccepted, 1);
	CHECK_EQ(counters(b)->half_open, 1);
	CHECK_EQ(b->sent_state, 1);
	/* So is a window of 0: libtorrent's SYNs advertise one. */
	n = sim_header(p, ST_SYN, 1, 0, 300, 1, 0, 0, 5, 0);
	sim_inject(b, p, n, (struct sockaddr *)&from, flen);
	CHECK_EQ(b->naccepted, 2);
	sim_free();
}

static void test_half_open_bounds(void)
{
	struct sim_node *b;
	struct sockaddr_storage from;
	socklen_t flen;
	unsigned char p[20];
	int i;

	sim_init(102, START_US);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 64);
	CHECK(utp_context_set_option(b->ctx, UTPKIT_HALF_OPEN_MAX, 20) == 0);
	CHECK(utp_context_set_option(b->ctx, UTPKIT_HALF_OPEN_PER_ADDR, 3) == 0);
	CHECK_EQ(utp_context_get_option(b->ctx, UTPKIT_HALF_OPEN_PER_ADDR), 3);
	/* One address: 3 sockets, then cookies. */
	sim_make_addr(&from, &flen, 5555, 0);
	for (i = 0; i < 10; i++) {
		sim_header(p, ST_SYN, 1, 0, 1000 + 2 * (unsigned)i, 1, 0, 65536, 77, 0);
		sim_inject(b, p, sizeof p, (struct sockaddr *)&from, flen);
	}
	CHECK_EQ(b->naccepted, 3);
	CHECK_EQ(counters(b)->half_open, 3);
	CHECK_EQ(counters(b)->syn_cookies, 7);
	CHECK_EQ(b->sent_state, 10);
	/* Many addresses: 20 in all, the rest cookies; the answers never
	 * outweigh the SYNs. */
	for (i = 0; i < 200; i++)
		inject_syn(b, (unsigned)i);
	CHECK_EQ(counters(b)->half_open, 20);
	CHECK_EQ(counters(b)->sockets_live, 20);
	CHECK_EQ(counters(b)->syn_cookies, 7 + 200 - 17);
	CHECK(counters(b)->unauth_bytes_out <= counters(b)->unauth_bytes_in);
	sim_free();
}

/* Every SYN answered with a cookie: the connection exists only once the
 * initiator's data arrives, and then works both ways -- also when the
 * initiator's first data packets were lost. */
static int drop_first_data(int from, int to, const unsigned char *buf, size_t len, void *arg)
{
	int *dropped = arg;
	(void)to;
	if (from == 0 && len > 20 && (buf[0] >> 4) == ST_DATA && *dropped < 2) {
		++*dropped;
		return 0;
	}
	return 1;
}

static void cookie_transfer(int lose_first)
{
	struct sim_node *a, *b;
	struct sim_conn *pair[2];
	unsigned char *tx = sim_pattern(200000, 7), *back = sim_pattern(50000, 8);
	int dropped = 0;

	sim_init(103 + (unsigned)lose_first, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_SHUTDOWN_WHEN_SENT, back, 50000, 300000);
	CHECK(utp_context_set_option(b->ctx, UTPKIT_HALF_OPEN_MAX, 0) == 0);
	if (lose_first) {
		sim_net.filter = drop_first_data;
		sim_net.filter_arg = &dropped;
	}
	pair[0] = sim_conn_new(a, C_SHUTDOWN_WHEN_SENT, tx, 200000, 100000);
	pair[1] = NULL;
	CHECK(sim_connect_node(pair[0], b) == 0);
	CHECK(sim_run(NULL, NULL, 300 * MS) == 0);
	CHECK(pair[0]->connected);
	CHECK_EQ(counters(b)->syn_cookies, 1);
	while (sim_now < START_US + 30 * SEC && !(pair[1] && all_received(pair) && pair[0]->rx_len == 50000)) {
		sim_run(NULL, NULL, 10 * MS);
		if (pair[1] == NULL)
			pair[1] = accepted_from(b);
	}
	CHECK(pair[1] != NULL);
	CHECK_EQ(b->naccepted, 1);
	CHECK_EQ(counters(b)->cookie_accepted, 1);
	CHECK_EQ(counters(b)->half_open, 0);
	if (pair[1]) {
		CHECK_EQ(pair[1]->rx_len, 200000);
		CHECK(memcmp(pair[1]->rx, tx, 200000) == 0);
	}
	CHECK_EQ(pair[0]->rx_len, 50000);
	CHECK(memcmp(pair[0]->rx, back, 50000) == 0);
	if (lose_first)
		CHECK_EQ(dropped, 2);
	sim_free();
	free(tx);
	free(back);
}

static void test_cookie_transfer(void) { cookie_transfer(0); }
static void test_cookie_first_data_lost(void) { cookie_transfer(1); }

/* Blind guesses at a cookie: DATA for no connection with random ids and
 * acks.  At most a handful in 20,000 may succeed (8 in 65,536 each). */
static void test_forged_cookies(void)
{
	struct sim_node *b;
	unsigned char p[120];
	struct sockaddr_storage from;
	socklen_t flen;
	int i;

	sim_init(105, START_US);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 64);
	CHECK(utp_context_set_option(b->ctx, UTPKIT_HALF_OPEN_MAX, 0) == 0);
	inject_syn(b, 1);  /* keys the cookies */
	CHECK_EQ(counters(b)->syn_cookies, 1);
	for (i = 0; i < 20000; i++) {
		spoofed(&from, &flen, (unsigned)i);
		sim_header(p, ST_DATA, 1, 0, (unsigned)sim_rand() & 0xffff, 1, 0, 65536,
		           (unsigned)sim_rand() & 0xffff, (unsigned)sim_rand() & 0xffff);
		memset(p + 20, 'z', 100);
		sim_inject(b, p, sizeof p, (struct sockaddr *)&from, flen);
	}
	CHECKF(counters(b)->cookie_accepted <= 12, "%llu forged cookies accepted",
	       (unsigned long long)counters(b)->cookie_accepted);
	CHECK(counters(b)->unauth_bytes_out <= counters(b)->unauth_bytes_in);
	sim_free();
}

/* 100,000 spoofed SYNs at 10,000/s from 250 addresses: a legitimate client
 * connecting in the middle of it is accepted at once and moves 1 MiB;
 * memory (sockets) stays bounded; replies never outweigh the flood. */
static void test_syn_flood(void)
{
	struct sim_node *a, *b;
	struct sim_conn *pair[2] = { NULL, NULL };
	unsigned char *tx = sim_pattern(1 << 20, 9);
	unsigned sent = 0, ms;
	unsigned long long t_connect = 0, t_accept = 0;
	const utpkit_counters *k;

	sim_init(106, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 2 << 20);
	for (ms = 0; ms < 10000; ms++) {
		while (sent < (ms + 1) * 10)
			inject_syn(b, sent++);
		if (ms == 3000) {
			pair[0] = sim_conn_new(a, C_SHUTDOWN_WHEN_SENT, tx, 1 << 20, 16);
			CHECK(sim_connect_node(pair[0], b) == 0);
			t_connect = sim_now;
		}
		if (pair[0] && !pair[1] && (pair[1] = accepted_from(b)) != NULL)
			t_accept = sim_now;
		sim_run(NULL, NULL, 1 * MS);
		CHECK(counters(b)->sockets_live <= 64 + 1);
	}
	k = counters(b);
	CHECK_EQ(sent, 100000);
	CHECK(pair[1] != NULL);
	CHECKF(t_accept - t_connect <= 1 * SEC, "accepted after %llu us", t_accept - t_connect);
	CHECK(sim_run(all_received, pair, 20 * SEC));
	if (pair[1])
		CHECK(pair[1]->rx_len == 1 << 20 && memcmp(pair[1]->rx, tx, 1 << 20) == 0);
	CHECK(k->half_open_peak <= 64);
	CHECK(k->syn_cookies > 10000 && k->syn_cookies < 90000);  /* 250 sources, 16/s each after a burst */
	CHECKF(k->unauth_bytes_out <= k->unauth_bytes_in, "%llu bytes out for %llu in",
	       (unsigned long long)k->unauth_bytes_out, (unsigned long long)k->unauth_bytes_in);
	printf("    flood: accepted after %llu us; %llu cookies, %llu limited, peak %u sockets\n",
	       t_accept - t_connect, (unsigned long long)k->syn_cookies,
	       (unsigned long long)k->unauth_limited, k->sockets_peak);
	(void)conn_done;
	sim_free();
	free(tx);
}

static void inject_syn_from(struct sim_node *b, unsigned host)
{
	unsigned char p[20];
	struct sockaddr_in s4;
	memset(&s4, 0, sizeof s4);
	s4.sin_family = AF_INET;
	s4.sin_addr.s_addr = htonl(host);
	s4.sin_port = htons(4000);
	sim_header(p, ST_SYN, 1, 0, (unsigned)sim_rand() & 0xffff, (unsigned)sim_now, 0, 65536,
	           (unsigned)sim_rand() & 0xffff, 0);
	sim_inject(b, p, sizeof p, (struct sockaddr *)&s4, sizeof s4);
}

/* 1,000 flooding sources, each past its SYN-ACK budget, fill the per-source
 * table; 20 new sources still get their first SYN answered.  Sources used
 * to share a slot when their hashes collided, so a client next to a flood
 * source got nothing until the flood ended (seen in tests/test_flood.py). */
static void test_new_sources_keep_their_own_budget(void)
{
	struct sim_node *b;
	unsigned i, ms;
	unsigned long long before;

	sim_init(107, START_US);
	sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 2 << 20);
	for (ms = 0; ms < 2000; ms++) {   /* 160 SYNs a source in 2 s: a burst of 64 and 16/s */
		for (i = 0; i < 80; i++) {
			unsigned src = (ms * 80 + i) % 1000;
			inject_syn_from(b, 0x0a000007u | (1 + src / 250) << 16 | (1 + src % 250) << 8);
		}
		sim_run(NULL, NULL, 1 * MS);
	}
	CHECK(counters(b)->unauth_limited > 10000);   /* the flood is past its budget */
	before = counters(b)->syn_cookies;
	for (i = 0; i < 20; i++)
		inject_syn_from(b, 0x0ac80007u | (1 + i) << 8);
	sim_run(NULL, NULL, 1 * MS);
	CHECKF(counters(b)->syn_cookies - before == 20, "%llu of 20 new sources answered",
	       (unsigned long long)(counters(b)->syn_cookies - before));
	sim_free();
}

/* A RESET for an unconfirmed connection the application refuses (a full
 * backlog) is a reply to an unauthenticated SYN: it passes the gate. */
static void test_abort_unconfirmed_is_limited(void)
{
	struct sim_node *b;
	int i;

	sim_init(107, START_US);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_CLOSE_ON_ACCEPT, NULL, 0, 64);
	CHECK(utp_context_set_option(b->ctx, UTPKIT_RESET_RATE, 10) == 0);
	for (i = 0; i < 1000; i++)
		inject_syn(b, (unsigned)i);
	/* utp_close of a connected, unconfirmed socket sends a FIN, not a
	 * RESET; what matters is that nothing escapes the budget. */
	CHECK(counters(b)->unauth_bytes_out <= counters(b)->unauth_bytes_in);
	for (i = 0; i < sim_nconns(); i++)
		if (sim_conn_at(i)->s)
			utpkit_abort(sim_conn_at(i)->s);
	CHECK(counters(b)->resets_sent <= 10);
	sim_free();
}

/* The firewall is asked before a cookie SYN-ACK too (no state, no answer but
 * a RESET), and again when a cookie comes back: a peer refused by then gets
 * a RESET and no socket. */
static int connected_or_failed(void *arg)
{
	struct sim_conn *c = arg;
	return c->connected || conn_done(arg);
}

static void test_firewall_before_cookies(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca;
	unsigned char *tx = sim_pattern(5000, 9);
	unsigned syn_id;

	sim_init(111, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 64);
	CHECK(utp_context_set_option(b->ctx, UTPKIT_HALF_OPEN_MAX, 0) == 0);
	b->firewall = 1;
	ca = sim_conn_new(a, C_CLOSE_ON_ERROR, NULL, 0, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(conn_done, ca, 10 * SEC));
	CHECK_EQ(ca->error, UTP_ECONNREFUSED);
	CHECK_EQ(b->fw_stages, 1u << UTPKIT_FIREWALL_COOKIE_SYN);  /* told its yes means a cookie */
	CHECK_EQ(counters(b)->syn_cookies, 0);
	CHECK_EQ(b->sent_state, 0);
	CHECK_EQ(counters(b)->sockets_created, 0);
	CHECK_EQ(b->naccepted, 0);

	/* Let the SYN through (a cookie SYN-ACK), refuse the cookie's return. */
	b->firewall = 0;
	ca = sim_conn_new(a, C_CLOSE_ON_ERROR, tx, 5000, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(connected_or_failed, ca, 10 * SEC));
	CHECK(ca->connected);
	CHECK_EQ(counters(b)->syn_cookies, 1);
	syn_id = b->fw_conn_id;
	b->firewall = 1;
	b->fw_stages = 0;
	CHECK(sim_run(conn_done, ca, 60 * SEC));
	CHECK_EQ(ca->error, UTP_ECONNRESET);
	/* Asked again, now for good, about the same SYN (its connection id). */
	CHECK_EQ(b->fw_stages, 1u << UTPKIT_FIREWALL_COOKIE_RETURN);
	CHECK_EQ(b->fw_conn_id, syn_id);
	CHECK_EQ(counters(b)->cookie_accepted, 0);
	CHECK_EQ(counters(b)->sockets_created, 0);
	CHECK_EQ(b->naccepted, 0);
	sim_free();
	free(tx);
}

static const struct check_test tests[] = {
	{ "firewall_before_cookies", test_firewall_before_cookies },
	{ "syn_shape", test_syn_shape },
	{ "half_open_bounds", test_half_open_bounds },
	{ "cookie_transfer", test_cookie_transfer },
	{ "cookie_first_data_lost", test_cookie_first_data_lost },
	{ "forged_cookies", test_forged_cookies },
	{ "syn_flood", test_syn_flood },
	{ "new_sources_keep_their_own_budget", test_new_sources_keep_their_own_budget },
	{ "abort_unconfirmed_is_limited", test_abort_unconfirmed_is_limited },
};

int main(int argc, char **argv)
{
	return check_main(tests, sizeof tests / sizeof tests[0], argc, argv);
}
