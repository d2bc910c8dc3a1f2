/*
 * test_engine.c -- C-level tests of the uTP engine on a virtual clock.
 *
 * Two or more contexts talk through sim.c's in-memory network: handshake,
 * bulk transfers in both directions at once (clean and lossy), the
 * callbacks that programs call back into the engine from, refusal and
 * timeouts, closing never-connected sockets, hostile packets, flow control,
 * ICMP, and many connections at once.  LeakSanitizer (SANITIZE=1) checks
 * that nothing leaks at exit.
 *
 * Usage: test_engine [substring...]   runs the tests whose names match.
 * Prints "N passed, M failed" and exits non-zero on failure.
 */
#include <stdlib.h>

#include "check.h"

static unsigned long long drops(const utpkit_counters *c)
{
	return c->not_utp + c->drop_malformed + c->drop_unknown + c->drop_invalid;
}

/* ---- predicates for sim_run ------------------------------------------ */

static int all_destroyed(void *arg)
{
	int i;

	(void)arg;
	for (i = 0; i < sim_nconns(); i++)
		if (!sim_conn_at(i)->destroyed)
			return 0;
	return 1;
}

static int conn_connected(void *arg)
{
	return ((struct sim_conn *)arg)->connected;
}

static int conn_destroyed(void *arg)
{
	return ((struct sim_conn *)arg)->destroyed;
}

static int conn_errored(void *arg)
{
	return ((struct sim_conn *)arg)->error >= 0;
}


static int node_accepted(void *arg)
{
	return ((struct sim_node *)arg)->naccepted > 0;
}

struct rx_goal {
	struct sim_conn *c;
	size_t bytes;
};

static int rx_reached(void *arg)
{
	struct rx_goal *g = arg;
	return g->c->rx_len >= g->bytes;
}

/* Connect a (on node A) to B; run until A sees CONNECT and B accepted. */
static struct sim_conn *connect_pair(struct sim_node *a, struct sim_node *b, unsigned flags,
                                     const unsigned char *tx, size_t tx_len, size_t rx_cap)
{
	struct sim_conn *c = sim_conn_new(a, flags, tx, tx_len, rx_cap);

	CHECK(sim_connect_node(c, b) == 0);
	CHECK(sim_run(conn_connected, c, 5 * SEC));
	return c;
}

static struct sim_conn *accepted_conn(struct sim_node *b)
{
	int i;

	for (i = 0; i < sim_nconns(); i++)
		if (sim_conn_at(i)->node == b && sim_conn_at(i)->accepted)
			return sim_conn_at(i);
	return NULL;
}

static void check_all_freed(struct sim_node *n)
{
	const utpkit_counters *k = counters(n);
	CHECKF(k->sockets_live == 0, "node %d: %u sockets still live", n->index, k->sockets_live);
	CHECKF(k->sockets_created == k->sockets_freed, "node %d: created %llu freed %llu",
	       n->index, (unsigned long long)k->sockets_created,
	       (unsigned long long)k->sockets_freed);
}

static void check_clean_conn(struct sim_conn *c, const char *who)
{
	CHECKF(c->error < 0, "%s: unexpected ON_ERROR %d (%s)", who, c->error,
	       c->error >= 0 ? utp_error_code_names[c->error] : "");
	CHECKF(c->rx_overflow == 0, "%s: receive overflow / bad write count", who);
	CHECKF(c->states_after_destroy == 0, "%s: state change after DESTROYING", who);
}

/* ---- tests ----------------------------------------------------------- */

static void test_handshake(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;
	struct sockaddr_storage peer;
	socklen_t plen = sizeof(peer);
	utpkit_socket_info info;
	int token = 0;

	sim_init(1, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_CLOSE_ON_EOF, NULL, 0, 16);

	ca = connect_pair(a, b, 0, NULL, 0, 16);
	CHECK(ca->connected);
	CHECKF(ca->connect_at - START_US >= 20 * MS && ca->connect_at - START_US <= 22 * MS,
	       "CONNECT after one round trip (20 ms), got %llu us", ca->connect_at - START_US);
	CHECK(sim_run(node_accepted, b, 1 * SEC));
	cb = accepted_conn(b);
	CHECK(cb != NULL);
	if (!cb)
		goto out;

	/* Peer names are what the network says. */
	CHECK(utp_getpeername(ca->s, (struct sockaddr *)&peer, &plen) == 0);
	CHECK(plen == b->addrlen && memcmp(&peer, &b->addr, b->addrlen) == 0);
	plen = sizeof(peer);
	CHECK(utp_getpeername(cb->s, (struct sockaddr *)&peer, &plen) == 0);
	CHECK(plen == a->addrlen && memcmp(&peer, &a->addr, a->addrlen) == 0);

	CHECK(utp_get_context(ca->s) == a->ctx);
	CHECK(utp_get_context(cb->s) == b->ctx);
	CHECK(utp_get_userdata(ca->s) == ca);
	CHECK(utp_set_userdata(ca->s, &token) == ca);
	CHECK(utp_get_userdata(ca->s) == &token);
	utp_set_userdata(ca->s, ca);
	CHECK(utpkit_get_socket_info(ca->s, &info) == 0 && info.state == UTPKIT_SOCK_CONNECTED);
	CHECK(utpkit_get_socket_info(cb->s, &info) == 0 && info.state == UTPKIT_SOCK_CONNECTED);
	CHECK(utp_get_stats(ca->s) != NULL);
	CHECK(counters(a)->sockets_live == 1 && counters(b)->sockets_live == 1);

	/* The connection id rule of BEP 29: the acceptor's reply carries the
	 * id of the SYN; A sent exactly one SYN. */
	CHECK_EQ(a->sent_syn, 1);
	CHECK_EQ(b->sent_syn, 0);

	/* A closes; B sees EOF and closes from inside the callback. */
	utp_close(ca->s);
	ca->closed = 1;
	CHECK(sim_run(all_destroyed, NULL, 60 * SEC));
	CHECK(ca->destroyed && cb->destroyed);
	CHECK(cb->eof);
	check_clean_conn(ca, "A");
	check_clean_conn(cb, "B");
	check_all_freed(a);
	check_all_freed(b);
out:
	sim_free();
}

/* Bulk transfer of `len` bytes each way at once, shutdown and close from
 * inside callbacks; returns through pointers the two conns' stats. */
static void transfer_both_ways(size_t len, unsigned loss, unsigned dup, unsigned jitter_us,
                               unsigned long long seed, unsigned long long max_us, int ipv6,
                               unsigned extra_flags, utp_socket_stats *out_a)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;
	unsigned char *tx_a = sim_pattern(len, seed * 2 + 1);
	unsigned char *tx_b = sim_pattern(len, seed * 2 + 2);
	unsigned flags = C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF | extra_flags;
	int finished;

	sim_init(seed, START_US);
	sim_net.loss_permille = loss;
	sim_net.dup_permille = dup;
	sim_net.jitter_us = jitter_us;
	a = sim_add_node(1000, ipv6);
	b = sim_add_node(2000, ipv6);
	sim_listen(b, flags, tx_b, len, len);
	ca = sim_conn_new(a, flags, tx_a, len, len);
	CHECK(sim_connect_node(ca, b) == 0);

	finished = sim_run(all_destroyed, NULL, max_us);
	CHECKF(finished, "transfer did not finish in %llu s (virtual)", max_us / SEC);
	cb = accepted_conn(b);
	CHECK(cb != NULL);
	if (cb) {
		CHECKF(cb->rx_len == len && memcmp(cb->rx, tx_a, len) == 0,
		       "A->B: %zu of %zu bytes, %s", cb->rx_len, len,
		       cb->rx_len == len ? "content differs" : "length differs");
		CHECKF(ca->rx_len == len && memcmp(ca->rx, tx_b, len) == 0,
		       "B->A: %zu of %zu bytes, %s", ca->rx_len, len,
		       ca->rx_len == len ? "content differs" : "length differs");
		CHECK(ca->eof && cb->eof);
		check_clean_conn(ca, "A");
		check_clean_conn(cb, "B");
		CHECK(ca->have_stats && cb->have_stats);
		if (ca->have_stats) {
			CHECKF(ca->stats.nbytes_recv == len, "A nbytes_recv %llu",
			       (unsigned long long)ca->stats.nbytes_recv);
			CHECK(ca->stats.nbytes_xmit >= len);
			CHECK(ca->stats.nxmit > 0 && ca->stats.nrecv > 0);
			if (out_a)
				*out_a = ca->stats;
		}
		if (finished) {
			check_all_freed(a);
			check_all_freed(b);
		}
	}
	printf("    %zu bytes each way in %.2f s virtual, %llu packets delivered, %llu dropped\n",
	       len, (double)(sim_now - START_US) / SEC, sim_net.delivered, sim_net.dropped);
	sim_free();
	free(tx_a);
	free(tx_b);
}

static void test_transfer_4mib_both_ways(void)
{
	transfer_both_ways(4 * MIB, 0, 0, 0, 7, 300 * SEC, 0, 0, NULL);
}

static void test_transfer_writev_ipv6(void)
{
	transfer_both_ways(512 * 1024, 0, 0, 0, 8, 300 * SEC, 1, C_USE_WRITEV, NULL);
}

static void test_transfer_lossy(void)
{
	utp_socket_stats st;

	memset(&st, 0, sizeof(st));
	/* 3% loss, 1% duplication, up to 8 ms of jitter (reordering). */
	transfer_both_ways(1 * MIB, 30, 10, 8 * MS, 11, 900 * SEC, 0, 0, &st);
	CHECKF(st.rexmit + st.fastrexmit > 0, "no retransmissions under loss");
}

/* Drop the first `arg` packets node B sends. */
static int drop_first_from_b(int from, int to, const unsigned char *buf, size_t len, void *arg)
{
	int *left = arg;

	(void)to; (void)buf; (void)len;
	if (from == 1 && *left > 0) {
		(*left)--;
		return 0;
	}
	return 1;
}

/* The acceptor writes from inside ON_ACCEPT, so its first DATA packets
 * follow its STATE reply at once.  When the STATE and the first DATA are
 * lost, the initiator first hears of the connection from the second DATA:
 * that must not make it skip the first one (which is retransmitted). */
static int never(void *arg)
{
	(void)arg;
	return 0;
}

/* After a graceful close both ways, the side whose last packet was the
 * peer's FIN is told to stay (utpkit_timewait_linger) about two RTOs, at
 * most 5 s, so it can ACK a resent FIN; afterwards nothing is pending. */
static void test_timewait_linger(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca;
	size_t len = 20000;
	unsigned char *tx_a = sim_pattern(len, 31), *tx_b = sim_pattern(len, 32);
	unsigned flags = C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF;
	int64 la, lb;

	sim_init(17, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	CHECK(utpkit_timewait_linger(a->ctx) == -1);
	CHECK(utpkit_timewait_linger(NULL) == -1);
	sim_listen(b, flags, tx_b, len, len);
	ca = sim_conn_new(a, flags, tx_a, len, len);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(all_destroyed, NULL, 30 * SEC));
	la = utpkit_timewait_linger(a->ctx);
	lb = utpkit_timewait_linger(b->ctx);
	CHECKF(la > 0 || lb > 0, "linger a %lld b %lld", (long long)la, (long long)lb);
	CHECKF(la <= 5 * (int64)SEC && lb <= 5 * (int64)SEC, "linger a %lld b %lld",
	       (long long)la, (long long)lb);
	sim_run(never, NULL, 6 * SEC);
	CHECK(utpkit_timewait_linger(a->ctx) == -1 && utpkit_timewait_linger(b->ctx) == -1);
	sim_free();
	free(tx_a);
	free(tx_b);
}

static void test_data_before_syn_ack(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;
	size_t len = 20000;
	unsigned char *tx = sim_pattern(len, 30);
	int drop = 2;

	sim_init(30, START_US);
	sim_net.filter = drop_first_from_b;
	sim_net.filter_arg = &drop;
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF, tx, len, 16);
	ca = sim_conn_new(a, C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF, NULL, 0, len);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(all_destroyed, NULL, 120 * SEC));
	cb = accepted_conn(b);
	CHECK(cb != NULL);
	CHECKF(ca->rx_len == len && memcmp(ca->rx, tx, len) == 0,
	       "initiator got %zu of %zu bytes%s", ca->rx_len, len,
	       ca->rx_len == len ? " (content differs)" : "");
	check_clean_conn(ca, "A");
	sim_free();
	free(tx);
}

static void test_callbacks_reentrant(void)
{
	/* B writes and shuts down from inside ON_ACCEPT; A writes from inside
	 * CONNECT, shuts down when written, closes from inside EOF. */
	static const unsigned char hello[] = "hello from the acceptor";
	static const unsigned char world[] = "and hello back from the initiator";
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;

	sim_init(2, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF, hello, sizeof(hello), 256);
	ca = sim_conn_new(a, C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF, world, sizeof(world), 256);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(all_destroyed, NULL, 60 * SEC));
	cb = accepted_conn(b);
	CHECK(cb != NULL);
	if (cb) {
		CHECK(ca->rx_len == sizeof(hello) && memcmp(ca->rx, hello, sizeof(hello)) == 0);
		CHECK(cb->rx_len == sizeof(world) && memcmp(cb->rx, world, sizeof(world)) == 0);
		check_clean_conn(ca, "A");
		check_clean_conn(cb, "B");
	}
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
}

static void test_close_in_on_accept(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;

	sim_init(3, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_CLOSE_ON_ACCEPT, NULL, 0, 16);
	ca = sim_conn_new(a, C_CLOSE_ON_EOF | C_CLOSE_ON_ERROR, NULL, 0, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	/* A learns the peer went away (EOF or an error) and closes. */
	CHECK(sim_run(all_destroyed, NULL, 120 * SEC));
	cb = accepted_conn(b);
	CHECK(cb && cb->destroyed);
	CHECKF(ca->eof || ca->error >= 0, "A never learned the acceptor closed");
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
}

static void test_close_in_on_connect(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca;

	sim_init(4, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_CLOSE_ON_EOF | C_CLOSE_ON_ERROR, NULL, 0, 16);
	ca = sim_conn_new(a, C_CLOSE_ON_CONNECT, NULL, 0, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(all_destroyed, NULL, 120 * SEC));
	CHECK(ca->destroyed);
	check_clean_conn(ca, "A");
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
}

static void test_close_in_on_read(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;
	unsigned char *tx = sim_pattern(200 * 1024, 5);

	sim_init(5, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_CLOSE_ON_FIRST_READ, NULL, 0, 200 * 1024);
	ca = sim_conn_new(a, C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF | C_CLOSE_ON_ERROR,
	                  tx, 200 * 1024, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	/* B closes after its first read; A keeps sending into a closing peer.
	 * Both must end (FIN exchange, RESET or timeout), nothing may leak. */
	CHECK(sim_run(all_destroyed, NULL, 300 * SEC));
	cb = accepted_conn(b);
	CHECK(cb && cb->destroyed && cb->reads >= 1);
	CHECK(ca->destroyed);
	if (cb)
		CHECK(memcmp(cb->rx, tx, cb->rx_len < 200 * 1024 ? cb->rx_len : 200 * 1024) == 0);
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
	free(tx);
}

static void test_refused_without_on_accept(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca;

	sim_init(6, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);  /* no sim_listen: no ON_ACCEPT */
	ca = sim_conn_new(a, C_CLOSE_ON_ERROR, NULL, 0, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(conn_errored, ca, 30 * SEC));
	CHECKF(ca->error == UTP_ECONNREFUSED, "error %d, want ECONNREFUSED", ca->error);
	CHECKF(ca->error_at - START_US <= 25 * MS, "refusal took %llu us, want one RTT",
	       ca->error_at - START_US);
	CHECK(!ca->connected);
	CHECK(counters(b)->syn_refused >= 1);
	CHECK(counters(b)->sockets_live == 0);
	CHECK(sim_run(conn_destroyed, ca, 10 * SEC));
	CHECK_EQ(ca->errors, 1);
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
}

static void test_refused_by_firewall(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca;

	sim_init(7, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 16);
	b->firewall = 1;
	ca = sim_conn_new(a, C_CLOSE_ON_ERROR, NULL, 0, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	CHECK(sim_run(conn_errored, ca, 60 * SEC));
	CHECKF(ca->error == UTP_ECONNREFUSED || ca->error == UTP_ETIMEDOUT,
	       "error %d, want a refusal", ca->error);
	CHECK_EQ(b->naccepted, 0);
	CHECK(counters(b)->syn_refused >= 1);
	CHECK(counters(b)->sockets_live == 0);
	/* Refused outright, before anything else: a RESET, never a SYN-ACK
	 * (plain or cookie), and no socket was ever made (so no ON_ACCEPT). */
	CHECK(b->sent_reset >= 1);
	CHECK_EQ(b->sent_state, 0);
	CHECK_EQ(b->sent, b->sent_reset);
	CHECK_EQ(counters(b)->sockets_created, 0);
	CHECK_EQ(counters(b)->syn_cookies, 0);
	CHECK(sim_run(conn_destroyed, ca, 10 * SEC));
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
}

static void syn_timeout_case(int timeout_ms, int retries)
{
	struct sim_node *a;
	struct sim_conn *ca;
	struct sockaddr_storage nowhere;
	socklen_t nlen;
	unsigned long long want_us = 0, w = (unsigned long long)timeout_ms * MS;
	int i;

	sim_init(8, START_US);
	a = sim_add_node(1000, 0);
	if (timeout_ms > 0) {
		CHECK(utp_context_set_option(a->ctx, UTPKIT_SYN_TIMEOUT, timeout_ms) == 0);
		CHECK(utp_context_set_option(a->ctx, UTPKIT_SYN_RETRIES, retries) == 0);
		CHECK_EQ(utp_context_get_option(a->ctx, UTPKIT_SYN_TIMEOUT), timeout_ms);
	} else {
		timeout_ms = 1000;
		retries = 3;
		w = 1000 * MS;
	}
	/* Each wait doubles: the first SYN and `retries` retransmissions, then
	 * ETIMEDOUT after the last wait. */
	for (i = 0; i <= retries; i++, w *= 2)
		want_us += w;
	sim_make_addr(&nowhere, &nlen, 4444, 0);
	ca = sim_conn_new(a, C_CLOSE_ON_ERROR, NULL, 0, 16);
	CHECK(sim_connect(ca, (struct sockaddr *)&nowhere, nlen) == 0);
	CHECK(sim_run(conn_errored, ca, 600 * SEC));
	CHECKF(ca->error == UTP_ETIMEDOUT, "error %d, want ETIMEDOUT", ca->error);
	CHECKF((unsigned long long)(retries + 1) == a->sent_syn, "%llu SYNs sent, want %d",
	       a->sent_syn, retries + 1);
	CHECKF(ca->error_at - START_US >= want_us - 2 * MS &&
	       ca->error_at - START_US <= want_us + 2 * MS,
	       "ETIMEDOUT after %llu ms, want %llu ms", (ca->error_at - START_US) / MS,
	       want_us / MS);
	CHECK(!ca->connected);
	CHECK(sim_run(conn_destroyed, ca, 10 * SEC));
	check_all_freed(a);
	sim_free();
}

static void test_syn_timeout_defaults(void)
{
	syn_timeout_case(0, 0);
}

static void test_syn_timeout_options(void)
{
	syn_timeout_case(300, 1);
}

static void test_close_never_connected(void)
{
	struct sim_node *a;
	struct sim_conn *c1, *c2;
	utp_socket *leaked;

	sim_init(9, START_US);
	a = sim_add_node(1000, 0);
	c1 = sim_conn_new(a, 0, NULL, 0, 16);
	c1->s = utp_create_socket(a->ctx);
	CHECK(c1->s != NULL);
	utp_set_userdata(c1->s, c1);
	CHECK(counters(a)->sockets_live == 1);
	utp_close(c1->s);
	c1->closed = 1;
	CHECK(sim_run(conn_destroyed, c1, 5 * SEC));
	CHECK(c1->destroyed);
	CHECK_EQ(a->sent, 0);  /* nothing to tell anybody */
	check_all_freed(a);

	/* A socket that is connecting when closed goes away too. */
	c2 = sim_conn_new(a, 0, NULL, 0, 16);
	{
		struct sockaddr_storage nowhere;
		socklen_t nlen;
		sim_make_addr(&nowhere, &nlen, 4444, 0);
		CHECK(sim_connect(c2, (struct sockaddr *)&nowhere, nlen) == 0);
	}
	sim_run(NULL, NULL, 300 * MS);
	utp_close(c2->s);
	c2->closed = 1;
	CHECK(sim_run(conn_destroyed, c2, 60 * SEC));
	check_all_freed(a);

	/* One created and never touched again: utp_destroy frees it
	 * (LeakSanitizer checks at exit). */
	leaked = utp_create_socket(a->ctx);
	CHECK(leaked != NULL);
	sim_free();
}

static void test_destroy_with_live_connections(void)
{
	struct sim_node *a, *b;
	unsigned char *tx = sim_pattern(300 * 1024, 10);
	int i;

	sim_init(10, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, tx, 300 * 1024, 300 * 1024);
	for (i = 0; i < 4; i++) {
		struct sim_conn *c = sim_conn_new(a, C_HOLD_READS, tx, 300 * 1024, 300 * 1024);
		CHECK(sim_connect_node(c, b) == 0);
	}
	/* Mid-transfer: data in flight, reorder buffers, held reads. */
	sim_run(NULL, NULL, 60 * MS);
	sim_free();  /* utp_destroy on both; LSan reports anything left */
	free(tx);
}

/* ---- hostile packets --------------------------------------------------- */

struct hostile {
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;
	unsigned b_recv_id;  /* id B expects from A: the SYN's id + 1 */
	unsigned a_recv_id;  /* id A expects from B: the SYN's id */
	int during;          /* a transfer is running */
};

/* A packet to B that looks like A's next one.  On an idle connection its
 * ack_nr is exactly B's last sent packet.  During a transfer that would
 * acknowledge packets A may not have yet (a forged ACK, which no receiver
 * can tell from a real one), so the ack_nr is an old one instead. */
static size_t legit_to_b(struct hostile *h, unsigned char *p, int type)
{
	utpkit_socket_info bi;
	unsigned ack;

	memset(&bi, 0, sizeof(bi));
	utpkit_get_socket_info(h->cb->s, &bi);
	ack = (unsigned)(bi.seq_nr - 1 - (h->during ? 0x9000 : 0)) & 0xffff;
	return sim_header(p, type, 1, 0, h->b_recv_id, (unsigned)sim_now, 0, 65536,
	                  (unsigned)(bi.ack_nr + 1) & 0xffff, ack);
}

static int inject_b(struct hostile *h, const unsigned char *p, size_t len)
{
	socklen_t alen;
	const struct sockaddr *from = sim_addr(h->a, &alen);
	return sim_inject(h->b, p, len, from, alen);
}

/* Each hostile packet must be dropped and counted, or be harmless. */
static void hostile_barrage(struct hostile *h, int during_transfer)
{
	unsigned char p[1600];
	utpkit_counters before, after;
	utpkit_socket_info bi;
	size_t n, i;
	int r;

	h->during = during_transfer;
	memset(&bi, 0, sizeof(bi));
	CHECK(utpkit_get_socket_info(h->cb->s, &bi) == 0);

	/* Truncated headers: shorter than 20 bytes is not uTP. */
	n = legit_to_b(h, p, ST_STATE);
	for (i = 0; i < n; i++) {
		before = *counters(h->b);
		r = inject_b(h, p, i);
		after = *counters(h->b);
		CHECKF(r == 0, "truncated header of %zu bytes returned %d", i, r);
		CHECKF(drops(&after) == drops(&before) + 1, "truncated %zu bytes not counted", i);
	}

	/* Wrong versions, and types past RESET/SYN. */
	for (i = 0; i < 16; i++) {
		if (i == 1)
			continue;
		legit_to_b(h, p, ST_STATE);
		p[0] = (unsigned char)((ST_STATE << 4) | i);
		before = *counters(h->b);
		r = inject_b(h, p, 20);
		after = *counters(h->b);
		CHECKF(r == 0, "version %zu returned %d", i, r);
		CHECKF(drops(&after) == drops(&before) + 1, "version %zu not counted", i);
	}
	for (i = 5; i < 16; i++) {
		legit_to_b(h, p, ST_STATE);
		p[0] = (unsigned char)((i << 4) | 1);
		before = *counters(h->b);
		r = inject_b(h, p, 20);
		after = *counters(h->b);
		CHECKF(r == 0, "type %zu returned %d", i, r);
		CHECKF(drops(&after) == drops(&before) + 1, "type %zu not counted", i);
	}

	/* Bogus extension lengths: longer than the datagram, chains that run
	 * off the end, an extension header cut in half. */
	{
		static const struct { int ext; unsigned char tail[8]; size_t tail_len; } bad[] = {
			{1, {0, 200}, 2},                 /* SACK claims 200 bytes, has none */
			{1, {0, 4, 0xff, 0xff}, 4},       /* SACK claims 4, has 2 */
			{2, {1, 4, 0, 0, 0, 0}, 6},       /* chains to a SACK with no header */
			{1, {0}, 1},                      /* extension header cut in half */
			{7, {0, 255, 1, 2, 3}, 5},        /* unknown type, 255 claimed */
			{1, {3, 0}, 2},                   /* zero-length then missing next */
		};
		for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
			n = legit_to_b(h, p, ST_STATE);
			p[1] = (unsigned char)bad[i].ext;
			memcpy(p + n, bad[i].tail, bad[i].tail_len);
			before = *counters(h->b);
			inject_b(h, p, n + bad[i].tail_len);
			after = *counters(h->b);
			CHECKF(after.drop_malformed == before.drop_malformed + 1,
			       "bogus extension case %zu not counted as malformed", i);
		}
	}
	/* A long chain of empty unknown extensions is well-formed but must be
	 * walked in bounded time. */
	n = legit_to_b(h, p, ST_STATE);
	p[1] = 9;
	for (i = 0; i < 600; i++) {
		p[n + 2 * i] = (unsigned char)(i == 599 ? 0 : 9);
		p[n + 2 * i + 1] = 0;
	}
	inject_b(h, p, n + 1200);

	/* An unknown extension with a correct length is skipped. */
	n = legit_to_b(h, p, ST_STATE);
	p[1] = 2;
	p[n] = 0;
	p[n + 1] = 8;
	memset(p + n + 2, 0xab, 8);
	inject_b(h, p, n + 10);

	/* ack_nr acknowledging packets never sent: must be rejected, or the
	 * sender would forget data the receiver never got. */
	{
		/* (0x8000 and more behind reads as an old ACK: ignored, maybe
		 * not counted.) */
		int deltas[] = {2, 100, 1000, 20000, 30000, -20000};
		for (i = 0; i < sizeof(deltas) / sizeof(deltas[0]); i++) {
			n = legit_to_b(h, p, ST_STATE);
			utpkit_get_socket_info(h->cb->s, &bi);
			if (deltas[i] < 0 && during_transfer)
				continue;  /* might be in flight: a forged ACK */
			p[18] = (unsigned char)((bi.seq_nr - 1 + deltas[i]) >> 8);
			p[19] = (unsigned char)(bi.seq_nr - 1 + deltas[i]);
			before = *counters(h->b);
			inject_b(h, p, n);
			after = *counters(h->b);
			if (deltas[i] > 0)
				CHECKF(after.drop_invalid == before.drop_invalid + 1,
				       "ack_nr %d past seq_nr accepted", deltas[i]);
		}
	}

	/* SACK bits pointing anywhere, with an ack_nr that acknowledges only
	 * what was acknowledged already (the cumulative ack B last had is not
	 * known; use an old one far behind) or one past what was sent. */
	for (i = 0; i < 64; i++) {
		/* Any length 1..255: real stacks send odd ones (libtorrent). */
		size_t sack_len = 1 + sim_rand() % 255;
		size_t j;
		n = legit_to_b(h, p, ST_STATE);
		utpkit_get_socket_info(h->cb->s, &bi);
		if (i & 1) {
			p[18] = (unsigned char)((bi.seq_nr + 5) >> 8);
			p[19] = (unsigned char)(bi.seq_nr + 5);
		} else if (during_transfer) {
			p[18] = (unsigned char)((bi.seq_nr - 30000) >> 8);
			p[19] = (unsigned char)(bi.seq_nr - 30000);
		}
		/* On an idle connection (nothing in flight) the legit ack with
		 * SACK bits refers only to packets never sent: must be ignored. */
		p[1] = 1;
		p[n] = 0;
		p[n + 1] = (unsigned char)sack_len;
		for (j = 0; j < sack_len; j++)
			p[n + 2 + j] = (unsigned char)sim_rand();
		inject_b(h, p, n + 2 + sack_len);
	}

	/* A huge and a zero window, garbage timestamps, on old acks. */
	{
		unsigned wnds[] = {0xffffffffu, 0, 1, 0x7fffffffu};
		for (i = 0; i < 4; i++) {
			utpkit_get_socket_info(h->cb->s, &bi);
			n = sim_header(p, ST_STATE, 1, 0, h->b_recv_id, 0xffffffffu - (unsigned)i,
			               0x80000000u + (unsigned)i, wnds[i], (bi.ack_nr + 1) & 0xffff,
			               during_transfer ? (unsigned)(bi.seq_nr - 30000) & 0xffff
			                               : (unsigned)(bi.seq_nr - 1) & 0xffff);
			inject_b(h, p, n);
		}
		/* Leave a sane window behind on an idle connection. */
		if (!during_transfer) {
			n = legit_to_b(h, p, ST_STATE);
			inject_b(h, p, n);
		}
	}

	/* DATA far outside the receive window: dropped, nothing buffered. */
	{
		int deltas[] = {5000, 20000, 32768, 40000, 65000};
		utpkit_socket_info bi2;
		for (i = 0; i < sizeof(deltas) / sizeof(deltas[0]); i++) {
			n = legit_to_b(h, p, ST_DATA);
			utpkit_get_socket_info(h->cb->s, &bi);
			p[16] = (unsigned char)((bi.ack_nr + deltas[i]) >> 8);
			p[17] = (unsigned char)(bi.ack_nr + deltas[i]);
			memset(p + n, 0x5a, 1000);
			before = *counters(h->b);
			inject_b(h, p, n + 1000);
			after = *counters(h->b);
			utpkit_get_socket_info(h->cb->s, &bi2);
			/* 32768 and more ahead reads as "already received". */
			if (deltas[i] < 0x8000)
				CHECKF(after.drop_invalid > before.drop_invalid,
				       "DATA %d ahead not counted as invalid", deltas[i]);
			CHECKF(bi2.reorder_bytes <= bi.reorder_bytes,
			       "DATA %d ahead was buffered (%u -> %u)", deltas[i],
			       bi.reorder_bytes, bi2.reorder_bytes);
		}
		/* A FIN far ahead must not end the stream. */
		n = legit_to_b(h, p, ST_FIN);
		p[16] = (unsigned char)((bi.ack_nr + 30000) >> 8);
		p[17] = (unsigned char)(bi.ack_nr + 30000);
		inject_b(h, p, n);
	}

	/* Old DATA (already delivered): a duplicate, not new bytes. */
	if (bi.ack_nr > 3) {
		utpkit_get_socket_info(h->cb->s, &bi);
		n = legit_to_b(h, p, ST_DATA);
		p[16] = (unsigned char)((bi.ack_nr - 2) >> 8);
		p[17] = (unsigned char)(bi.ack_nr - 2);
		memset(p + n, 0xee, 500);
		inject_b(h, p, n + 500);
	}

	/* RESETs and DATA for connection ids nobody has. */
	for (i = 0; i < 20; i++) {
		unsigned id = (h->b_recv_id + 1000 + (unsigned)i * 7) & 0xffff;
		unsigned long long sent_before = h->b->sent;
		n = sim_header(p, ST_RESET, 1, 0, id, 1, 0, 0, 1, 1);
		before = *counters(h->b);
		inject_b(h, p, n);
		after = *counters(h->b);
		CHECKF(after.drop_unknown == before.drop_unknown + 1, "unknown RESET not counted");
		CHECKF(h->b->sent == sent_before, "answered a RESET with a packet");
	}

	/* The right id from the wrong address is somebody else's connection. */
	{
		struct sockaddr_storage other;
		socklen_t olen;
		sim_make_addr(&other, &olen, 3333, 0);
		n = legit_to_b(h, p, ST_STATE);
		before = *counters(h->b);
		sim_inject(h->b, p, n, (struct sockaddr *)&other, olen);
		after = *counters(h->b);
		CHECK(after.drop_unknown == before.drop_unknown + 1);
		/* A RESET from the wrong address must not kill the connection. */
		n = sim_header(p, ST_RESET, 1, 0, h->b_recv_id, 1, 0, 0, 1, 1);
		sim_inject(h->b, p, n, (struct sockaddr *)&other, olen);
	}

	/* A duplicate SYN from the same peer and id must not make a second
	 * socket. */
	{
		unsigned live = counters(h->b)->sockets_live;
		n = sim_header(p, ST_SYN, 1, 0, (h->b_recv_id - 1) & 0xffff, (unsigned)sim_now, 0,
		               65536, 1, 0);
		inject_b(h, p, n);
		CHECK_EQ(counters(h->b)->sockets_live, live);
	}
	CHECK(h->cb->s != NULL && h->cb->error < 0);
}

static void test_hostile_packets(void)
{
	struct hostile h;
	size_t len = 1 * MIB;
	unsigned char *tx_a = sim_pattern(len, 21), *tx_b = sim_pattern(len, 22);
	unsigned flags = C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF;
	int rounds = 0, finished = 0;

	memset(&h, 0, sizeof(h));
	sim_init(12, START_US);
	h.a = sim_add_node(1000, 0);
	h.b = sim_add_node(2000, 0);
	sim_listen(h.b, flags | C_NO_WRITE, tx_b, len, len);
	h.ca = sim_conn_new(h.a, flags | C_NO_WRITE, tx_a, len, len);
	CHECK(sim_connect_node(h.ca, h.b) == 0);
	CHECK(sim_run(conn_connected, h.ca, 5 * SEC));
	CHECK(sim_run(NULL, NULL, 50 * MS) == 0);
	h.cb = accepted_conn(h.b);
	CHECK(h.cb != NULL && h.a->have_syn_id);
	if (!h.cb || !h.a->have_syn_id)
		goto out;
	h.a_recv_id = h.a->last_syn_id;
	h.b_recv_id = (h.a->last_syn_id + 1) & 0xffff;

	/* Phase 1: an idle connection takes the full barrage. */
	hostile_barrage(&h, 0);
	CHECK(sim_run(NULL, NULL, 200 * MS) == 0);
	CHECK(h.ca->error < 0 && h.cb->error < 0);

	/* Phase 2: transfer both ways while hostile packets keep coming. */
	h.ca->flags &= ~(unsigned)C_NO_WRITE;
	h.cb->flags &= ~(unsigned)C_NO_WRITE;
	sim_pump(h.ca);
	sim_pump(h.cb);
	while (!finished && rounds < 3000) {
		finished = sim_run(all_destroyed, NULL, 100 * MS);
		if (!finished && h.cb->s && !h.cb->closed && h.cb->error < 0 && (rounds % 5) == 0)
			hostile_barrage(&h, 1);
		rounds++;
	}
	CHECKF(finished, "transfer under attack did not finish");
	CHECKF(h.cb->rx_len == len && memcmp(h.cb->rx, tx_a, len) == 0,
	       "A->B under attack: %zu of %zu bytes", h.cb->rx_len, len);
	CHECKF(h.ca->rx_len == len && memcmp(h.ca->rx, tx_b, len) == 0,
	       "B->A under attack: %zu of %zu bytes", h.ca->rx_len, len);
	check_clean_conn(h.ca, "A");
	check_clean_conn(h.cb, "B");
	check_all_freed(h.a);
	check_all_freed(h.b);
	printf("    B counted: malformed %llu, unknown %llu, invalid %llu, not uTP %llu\n",
	       (unsigned long long)counters(h.b)->drop_malformed,
	       (unsigned long long)counters(h.b)->drop_unknown,
	       (unsigned long long)counters(h.b)->drop_invalid,
	       (unsigned long long)counters(h.b)->not_utp);
out:
	sim_free();
	free(tx_a);
	free(tx_b);
}

static void test_not_utp(void)
{
	static const char dht[] = "d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe";
	unsigned char tracker[16] = {0, 0, 0x04, 0x17, 0x27, 0x10, 0x19, 0x80, 0, 0, 0, 0,
	                             1, 2, 3, 4};
	unsigned char buf[64];
	struct sim_node *a;
	struct sockaddr_storage from;
	socklen_t flen;
	utpkit_counters before;
	int i;

	sim_init(13, START_US);
	a = sim_add_node(1000, 0);
	sim_listen(a, 0, NULL, 0, 16);
	sim_make_addr(&from, &flen, 5555, 0);
	before = *counters(a);
	CHECK(utp_process_udp(a->ctx, (const byte *)dht, sizeof(dht) - 1,
	                      (struct sockaddr *)&from, flen) == 0);
	CHECK(utp_process_udp(a->ctx, tracker, sizeof(tracker), (struct sockaddr *)&from, flen) == 0);
	CHECK(utp_process_udp(a->ctx, buf, 0, (struct sockaddr *)&from, flen) == 0);
	memset(buf, 0, sizeof(buf));
	CHECK(utp_process_udp(a->ctx, buf, 19, (struct sockaddr *)&from, flen) == 0);
	for (i = 0; i < 200; i++) {
		int j;
		for (j = 0; j < 64; j++)
			buf[j] = (unsigned char)sim_rand();
		if ((buf[0] & 15) == 1 && (buf[0] >> 4) <= 4)
			buf[0] = (unsigned char)(buf[0] ^ 0x02);  /* keep it not-uTP */
		CHECK(utp_process_udp(a->ctx, buf, 20 + (size_t)(i % 44),
		                      (struct sockaddr *)&from, flen) == 0);
	}
	CHECK_EQ(counters(a)->not_utp, before.not_utp + 204);
	CHECK_EQ(a->sent, 0);
	CHECK(counters(a)->sockets_live == 0);
	CHECK_EQ(utpkit_classify((const byte *)dht, sizeof(dht) - 1), UTPKIT_CLASS_DHT);
	CHECK_EQ(utpkit_classify(tracker, sizeof(tracker)), UTPKIT_CLASS_TRACKER);
	sim_free();
}

static void test_unknown_connection_resets(void)
{
	struct sim_node *a;
	struct sockaddr_storage from;
	socklen_t flen;
	unsigned char p[64];
	size_t n;
	int i;
	const utpkit_counters *k;

	sim_init(14, START_US);
	a = sim_add_node(1000, 0);
	sim_make_addr(&from, &flen, 5555, 0);
	/* DATA for a connection nobody has: answered with a RESET. */
	n = sim_header(p, ST_DATA, 1, 0, 777, 1, 0, 65536, 10, 20);
	memset(p + n, 1, 10);
	CHECK(utp_process_udp(a->ctx, p, n + 10, (struct sockaddr *)&from, flen) == 1);
	k = counters(a);
	CHECK_EQ(k->resets_sent, 1);
	CHECK_EQ(a->sent_reset, 1);
	CHECK(a->last_sent_len >= 20 && (a->last_sent[0] >> 4) == ST_RESET &&
	      ((a->last_sent[2] << 8) | a->last_sent[3]) == 777);
	/* A flood of them is rate limited. */
	for (i = 0; i < 2000; i++) {
		sim_header(p, ST_DATA, 1, 0, (unsigned)i, 1, 0, 65536, 10, 20);
		utp_process_udp(a->ctx, p, n + 10, (struct sockaddr *)&from, flen);
	}
	CHECKF(k->resets_sent <= 200, "%llu RESETs for a burst at 100/s",
	       (unsigned long long)k->resets_sent);
	CHECK(k->resets_limited > 0);
	CHECK(k->resets_sent + k->resets_limited == 2001);
	CHECK(k->sockets_live == 0);
	sim_free();
}

static void test_flow_control(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;
	size_t len = 2 * MIB, rcvbuf = 128 * 1024;
	unsigned char *tx = sim_pattern(len, 15);
	struct rx_goal g;
	int rounds;

	sim_init(15, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	CHECK(utp_context_set_option(b->ctx, UTP_RCVBUF, (int)rcvbuf) == 0);
	CHECK_EQ(utp_context_get_option(b->ctx, UTP_RCVBUF), rcvbuf);
	sim_listen(b, C_HOLD_READS | C_CLOSE_ON_EOF, NULL, 0, len);
	ca = sim_conn_new(a, C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF, tx, len, 16);
	CHECK(sim_connect_node(ca, b) == 0);
	sim_run(NULL, NULL, 5 * SEC);
	cb = accepted_conn(b);
	CHECK(cb != NULL);
	if (!cb)
		goto out;
	/* The reader never drained: the sender must stop near RCVBUF. */
	CHECKF(cb->rx_len <= rcvbuf + 2 * 1500, "received %zu with a %zu-byte window never drained",
	       cb->rx_len, rcvbuf);
	CHECK(cb->rx_len > 0);
	CHECK(ca->error < 0);
	/* Drain slowly: the transfer completes, never past the window. */
	for (rounds = 0; rounds < 20000 && !cb->eof; rounds++) {
		size_t before = cb->rx_len;
		sim_drain(cb);
		g.c = cb;
		g.bytes = before + 1;
		sim_run(rx_reached, &g, 2 * SEC);
		CHECKF(cb->held <= rcvbuf + 2 * 1500, "held %zu past the window", cb->held);
		if (test_failed)
			break;
		sim_run(NULL, NULL, 20 * MS);
	}
	sim_drain(cb);
	CHECK(sim_run(all_destroyed, NULL, 120 * SEC));
	CHECKF(cb->rx_len == len && memcmp(cb->rx, tx, len) == 0, "%zu of %zu bytes", cb->rx_len,
	       len);
	check_clean_conn(ca, "A");
	check_clean_conn(cb, "B");
out:
	sim_free();
	free(tx);
}

static void test_options(void)
{
	struct sim_node *a;
	utp_socket *s;
	int x, y;

	sim_init(16, START_US);
	a = sim_add_node(1000, 0);
	CHECK(utp_context_get_userdata(a->ctx) == a);
	CHECK(utp_context_set_userdata(a->ctx, &x) == a);
	CHECK(utp_context_get_userdata(a->ctx) == &x);
	utp_context_set_userdata(a->ctx, a);

	CHECK(utp_context_set_option(a->ctx, UTP_SNDBUF, 300000) == 0);
	CHECK_EQ(utp_context_get_option(a->ctx, UTP_SNDBUF), 300000);
	CHECK(utp_context_set_option(a->ctx, UTP_TARGET_DELAY, 50000) == 0);
	CHECK_EQ(utp_context_get_option(a->ctx, UTP_TARGET_DELAY), 50000);
	CHECK(utp_context_set_option(a->ctx, UTP_LOG_DEBUG, 0) == 0);
	CHECK(utp_context_set_option(a->ctx, 12345, 1) == -1);
	CHECK(utp_context_get_option(a->ctx, 12345) == -1);
	CHECK(utp_context_set_option(a->ctx, UTP_ON_READ, 1) == -1);  /* a callback id */
	CHECK(utp_context_set_option(a->ctx, UTPKIT_MIN_RTO, 300) == 0);
	CHECK_EQ(utp_context_get_option(a->ctx, UTPKIT_MIN_RTO), 300);
	CHECK(utp_context_set_option(a->ctx, UTPKIT_OPTION_END, 1) == -1);

	s = utp_create_socket(a->ctx);
	CHECK(s != NULL);
	/* New sockets start from the context's values. */
	CHECK_EQ(utp_getsockopt(s, UTP_SNDBUF), 300000);
	CHECK(utp_setsockopt(s, UTP_RCVBUF, 200000) == 0);
	CHECK_EQ(utp_getsockopt(s, UTP_RCVBUF), 200000);
	CHECK(utp_setsockopt(s, UTP_TARGET_DELAY, 25000) == 0);
	CHECK_EQ(utp_getsockopt(s, UTP_TARGET_DELAY), 25000);
	CHECK(utp_setsockopt(s, 12345, 1) == -1);
	CHECK(utp_getsockopt(s, 12345) == -1);
	CHECK(utp_get_context(s) == a->ctx);
	{
		uint32 ours = 1, theirs = 1, age = 1;
		utp_get_delays(s, &ours, &theirs, &age);  /* must not crash before any sample */
	}
	y = 0;
	CHECK(utp_set_userdata(s, &y) == NULL);
	CHECK(utp_get_userdata(s) == &y);
	CHECK(utp_get_context_stats(a->ctx) != NULL);
	CHECK(utpkit_next_timeout(a->ctx) >= -1);
	/* sim.c's callbacks take a socket's userdata for its sim_conn: an int
	 * there would be written over when the socket is destroyed. */
	utp_set_userdata(s, NULL);
	utp_close(s);
	sim_run(NULL, NULL, 100 * MS);
	check_all_freed(a);
	sim_free();
}

static void test_icmp(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cc;
	struct sockaddr_storage nowhere;
	socklen_t nlen;
	unsigned char syn[2048];
	size_t syn_len;
	utpkit_socket_info info;
	unsigned char *tx = sim_pattern(64 * 1024, 17);
	int r;

	sim_init(17, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_CLOSE_ON_EOF, NULL, 0, 64 * 1024);

	/* Port unreachable quoting our SYN: the connect is refused at once. */
	sim_make_addr(&nowhere, &nlen, 4444, 0);
	cc = sim_conn_new(a, C_CLOSE_ON_ERROR, NULL, 0, 16);
	CHECK(sim_connect(cc, (struct sockaddr *)&nowhere, nlen) == 0);
	CHECK(a->last_sent_len >= 20 && (a->last_sent[0] >> 4) == ST_SYN);
	syn_len = a->last_sent_len;
	memcpy(syn, a->last_sent, syn_len);
	/* Garbage and a quote from the wrong address change nothing. */
	/* (4 bytes already name the connection; fewer cannot.) */
	CHECK(utp_process_icmp_error(a->ctx, syn, 3, (struct sockaddr *)&nowhere, nlen) == 0);
	CHECK(utp_process_icmp_error(a->ctx, NULL, 0, (struct sockaddr *)&nowhere, nlen) == 0);
	CHECK(utp_process_icmp_error(a->ctx, syn, syn_len, sim_addr(b, &nlen), nlen) == 0);
	CHECK(cc->error < 0);
	sim_make_addr(&nowhere, &nlen, 4444, 0);
	r = utp_process_icmp_error(a->ctx, syn, syn_len, (struct sockaddr *)&nowhere, nlen);
	CHECK(r == 1);
	CHECKF(cc->error == UTP_ECONNREFUSED, "ICMP on a SYN gave error %d", cc->error);
	CHECK(counters(a)->icmp_handled >= 1);
	CHECK(sim_run(conn_destroyed, cc, 10 * SEC));

	/* Fragmentation needed, quoting a data packet: the packet size drops. */
	ca = connect_pair(a, b, C_NO_WRITE, tx, 64 * 1024, 16);
	ca->flags &= ~(unsigned)C_NO_WRITE;
	sim_pump(ca);
	CHECK(a->last_sent_len > 20 && (a->last_sent[0] >> 4) == ST_DATA);
	CHECK(utpkit_get_socket_info(ca->s, &info) == 0);
	if (info.packet_size > 548) {
		utpkit_socket_info after;
		r = utp_process_icmp_fragmentation(a->ctx, a->last_sent, a->last_sent_len,
		                                   sim_addr(b, &nlen), nlen, 576);
		CHECK(r == 1);
		CHECK(utpkit_get_socket_info(ca->s, &after) == 0);
		CHECKF(after.packet_size <= 576 - 28, "packet size %u after a 576-byte MTU",
		       after.packet_size);
	}
	/* Garbage fragmentation reports: no crash, no effect. */
	CHECK(utp_process_icmp_fragmentation(a->ctx, syn, 3, sim_addr(b, &nlen), nlen, 0) == 0);
	utp_process_icmp_fragmentation(a->ctx, a->last_sent, a->last_sent_len, sim_addr(b, &nlen),
	                               nlen, 0);
	utp_process_icmp_fragmentation(a->ctx, a->last_sent, a->last_sent_len, sim_addr(b, &nlen),
	                               nlen, 65535);
	ca->flags |= C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF;
	sim_pump(ca);
	utp_shutdown(ca->s, SHUT_WR);  /* harmless if already shut */
	ca->shut = 1;
	CHECK(sim_run(all_destroyed, NULL, 120 * SEC));
	CHECK(accepted_conn(b) && accepted_conn(b)->rx_len == 64 * 1024 &&
	      memcmp(accepted_conn(b)->rx, tx, 64 * 1024) == 0);
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
	free(tx);
}

static void test_many_connections(void)
{
	enum { N = 40 };
	struct sim_node *a, *b;
	size_t len = 64 * 1024;
	unsigned char *tx = sim_pattern(len, 18);
	unsigned flags = C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF;
	int i, ok = 0;

	sim_init(18, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, flags, tx, len, len);
	for (i = 0; i < N; i++) {
		struct sim_conn *c = sim_conn_new(a, flags, tx, len, len);
		CHECK(sim_connect_node(c, b) == 0);
	}
	CHECK(sim_run(all_destroyed, NULL, 300 * SEC));
	for (i = 0; i < sim_nconns(); i++) {
		struct sim_conn *c = sim_conn_at(i);
		if (c->rx_len == len && memcmp(c->rx, tx, len) == 0 && c->error < 0)
			ok++;
	}
	CHECKF(ok == 2 * N, "%d of %d endpoints got their bytes", ok, 2 * N);
	CHECK_EQ(b->naccepted, N);
	CHECK_EQ(counters(b)->sockets_peak, N);
	check_all_freed(a);
	check_all_freed(b);
	sim_free();
	free(tx);
}

static void test_socket_cap(void)
{
	enum { N = 12, CAP = 5 };
	struct sim_node *a, *b;
	int i, refused = 0;

	sim_init(19, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	CHECK(utp_context_set_option(b->ctx, UTPKIT_MAX_SOCKETS, CAP) == 0);
	sim_listen(b, 0, NULL, 0, 16);
	for (i = 0; i < N; i++) {
		struct sim_conn *c = sim_conn_new(a, C_CLOSE_ON_ERROR, NULL, 0, 16);
		CHECK(sim_connect_node(c, b) == 0);
	}
	sim_run(NULL, NULL, 20 * SEC);
	for (i = 0; i < sim_nconns(); i++)
		if (sim_conn_at(i)->node == a && sim_conn_at(i)->error >= 0)
			refused++;
	CHECK_EQ(b->naccepted, CAP);
	CHECK(counters(b)->sockets_live <= CAP);
	CHECK_EQ(counters(b)->syn_refused, N - CAP);
	CHECK_EQ(refused, N - CAP);
	sim_free();
}

static void test_idle_keepalive(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca, *cb;
	unsigned long long sent_before;
	unsigned char msg[] = "still there";

	sim_init(20, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, C_CLOSE_ON_EOF, NULL, 0, 64);
	ca = connect_pair(a, b, C_SHUTDOWN_WHEN_SENT | C_CLOSE_ON_EOF | C_NO_WRITE, msg,
	                  sizeof(msg), 64);
	sent_before = a->sent + b->sent;
	/* Five idle minutes: keepalives keep NAT mappings open, no error. */
	sim_run(NULL, NULL, 300 * SEC);
	CHECK(ca->error < 0);
	cb = accepted_conn(b);
	CHECK(cb && cb->error < 0);
	CHECKF(a->sent + b->sent - sent_before >= 5, "only %llu packets in 300 idle seconds",
	       a->sent + b->sent - sent_before);
	CHECKF(a->sent + b->sent - sent_before <= 200, "%llu packets in 300 idle seconds",
	       a->sent + b->sent - sent_before);
	ca->flags &= ~(unsigned)C_NO_WRITE;
	sim_pump(ca);
	CHECK(sim_run(all_destroyed, NULL, 60 * SEC));
	CHECK(cb && cb->rx_len == sizeof(msg) && memcmp(cb->rx, msg, sizeof(msg)) == 0);
	sim_free();
}

static int drop_everything(int from, int to, const unsigned char *buf, size_t len, void *arg)
{
	(void)from; (void)to; (void)buf; (void)len; (void)arg;
	return 0;
}

static void test_peer_vanishes(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca;
	unsigned char *tx = sim_pattern(100 * 1024, 21);

	sim_init(21, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 100 * 1024);
	ca = connect_pair(a, b, C_NO_WRITE | C_CLOSE_ON_ERROR, tx, 100 * 1024, 16);
	sim_net.filter = drop_everything;
	ca->flags &= ~(unsigned)C_NO_WRITE;
	sim_pump(ca);
	/* Backed-off retransmissions, then ETIMEDOUT; bounded by the RTO cap. */
	CHECK(sim_run(conn_errored, ca, 1200 * SEC));
	CHECKF(ca->error == UTP_ETIMEDOUT, "error %d, want ETIMEDOUT", ca->error);
	printf("    gave up after %.1f s (virtual)\n", (double)(ca->error_at - ca->connect_at) / SEC);
	CHECK(sim_run(conn_destroyed, ca, 120 * SEC));
	sim_free();
	free(tx);
}

static void test_peer_restarted_resets(void)
{
	struct sim_node *a, *b;
	struct sim_conn *ca;
	unsigned char *tx = sim_pattern(50 * 1024, 22);

	sim_init(22, START_US);
	a = sim_add_node(1000, 0);
	b = sim_add_node(2000, 0);
	sim_listen(b, 0, NULL, 0, 100 * 1024);
	ca = connect_pair(a, b, C_NO_WRITE | C_CLOSE_ON_ERROR, tx, 50 * 1024, 16);
	/* B's process dies and a new one binds the same port: A's next
	 * packets reach a context that has never heard of the connection. */
	sim_restart_node(b);
	ca->flags &= ~(unsigned)C_NO_WRITE;
	sim_pump(ca);
	CHECK(sim_run(conn_errored, ca, 30 * SEC));
	CHECKF(ca->error == UTP_ECONNRESET, "error %d, want ECONNRESET", ca->error);
	CHECK(counters(b)->resets_sent >= 1);
	CHECK(sim_run(conn_destroyed, ca, 60 * SEC));
	check_all_freed(a);
	sim_free();
	free(tx);
}

/* ---- runner ------------------------------------------------------------ */

static const struct check_test tests[] = {
	{"handshake", test_handshake},
	{"transfer_4mib_both_ways", test_transfer_4mib_both_ways},
	{"transfer_writev_ipv6", test_transfer_writev_ipv6},
	{"transfer_lossy", test_transfer_lossy},
	{"timewait_linger", test_timewait_linger},
	{"data_before_syn_ack", test_data_before_syn_ack},
	{"callbacks_reentrant", test_callbacks_reentrant},
	{"close_in_on_accept", test_close_in_on_accept},
	{"close_in_on_connect", test_close_in_on_connect},
	{"close_in_on_read", test_close_in_on_read},
	{"refused_without_on_accept", test_refused_without_on_accept},
	{"refused_by_firewall", test_refused_by_firewall},
	{"syn_timeout_defaults", test_syn_timeout_defaults},
	{"syn_timeout_options", test_syn_timeout_options},
	{"close_never_connected", test_close_never_connected},
	{"destroy_with_live_connections", test_destroy_with_live_connections},
	{"hostile_packets", test_hostile_packets},
	{"not_utp", test_not_utp},
	{"unknown_connection_resets", test_unknown_connection_resets},
	{"flow_control", test_flow_control},
	{"options", test_options},
	{"icmp", test_icmp},
	{"many_connections", test_many_connections},
	{"socket_cap", test_socket_cap},
	{"idle_keepalive", test_idle_keepalive},
	{"peer_vanishes", test_peer_vanishes},
	{"peer_restarted_resets", test_peer_restarted_resets},
};

int main(int argc, char **argv)
{
	return check_main(tests, sizeof tests / sizeof tests[0], argc, argv);
}
