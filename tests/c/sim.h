/*
 * sim.h -- an in-memory world for driving utpkit contexts in C tests.
 *
 * A virtual clock (the engine's GET_MICROSECONDS / GET_MILLISECONDS return
 * sim_now), a seeded GET_RANDOM, and a packet queue standing in for the
 * network: SENDTO enqueues a copy with a delivery time, sim_run() delivers
 * due packets through utp_process_udp, calls utp_issue_deferred_acks after
 * each batch and utp_check_timeouts every tick.  The network can drop,
 * duplicate and delay packets from a seeded generator, so every run is
 * reproducible.
 *
 * A "conn" is the application side of one uTP socket: data to send, a
 * buffer for what arrives, and what it does from inside callbacks (shut
 * down when done, close on EOF, close on error, ...).
 */
#ifndef UTPKIT_TESTS_SIM_H
#define UTPKIT_TESTS_SIM_H

#include <stddef.h>
#include "utp.h"

#define SIM_MAX_NODES 4
#define SIM_MAX_CONNS 512
#define SIM_TICK_US 1000u

/* What a conn does from inside engine callbacks. */
enum {
	C_SHUTDOWN_WHEN_SENT = 1 << 0,  /* utp_shutdown(SHUT_WR) once tx is all written */
	C_CLOSE_ON_EOF = 1 << 1,        /* utp_close once EOF seen and tx written */
	C_CLOSE_ON_ERROR = 1 << 2,      /* utp_close from inside ON_ERROR */
	C_CLOSE_ON_ACCEPT = 1 << 3,     /* utp_close from inside ON_ACCEPT */
	C_CLOSE_ON_CONNECT = 1 << 4,    /* utp_close from inside STATE_CONNECT */
	C_CLOSE_ON_FIRST_READ = 1 << 5, /* utp_close from inside the first ON_READ */
	C_USE_WRITEV = 1 << 6,          /* write with utp_writev (3 iovecs) */
	C_HOLD_READS = 1 << 7,          /* keep read bytes "unread" (flow control) */
	C_NO_WRITE = 1 << 8             /* never call utp_write (tests push data themselves) */
};

struct sim_node;

struct sim_conn {
	struct sim_node *node;
	utp_socket *s;          /* NULL once DESTROYING was seen */
	unsigned flags;
	const unsigned char *tx;
	size_t tx_len, tx_pos;
	unsigned char *rx;
	size_t rx_cap, rx_len;
	int rx_overflow;
	size_t held;            /* with C_HOLD_READS: bytes read but not drained */
	int accepted;
	int connected, eof, shut, closed, destroyed;
	int error;              /* -1: none; else UTP_E* */
	int errors;             /* how many ON_ERROR calls */
	int states_after_destroy;
	unsigned long long connect_at, eof_at, destroyed_at, error_at;
	utp_socket_stats stats; /* copied in DESTROYING */
	int have_stats;
	int reads;
};

struct sim_node {
	int index;
	utp_context *ctx;
	struct sockaddr_storage addr;
	socklen_t addrlen;
	int listening;          /* ON_ACCEPT installed */
	int firewall;           /* value ON_FIREWALL returns */
	unsigned fw_stages;     /* 1 << args->flags of every ON_FIREWALL call */
	unsigned fw_conn_id;    /* args->len (the SYN's connection id) of the last one */
	struct sim_conn accept_tmpl; /* flags/tx/rx_cap for accepted conns */
	int naccepted;
	/* What this node sent. */
	unsigned long long sent, sent_syn, sent_reset, sent_state, sent_data, sent_fin;
	unsigned char last_sent[2048];
	size_t last_sent_len;
	struct sockaddr_storage last_to;
	socklen_t last_to_len;
	int have_syn_id;
	unsigned short last_syn_id; /* connection id in our latest SYN */
	unsigned long long received;
};

struct sim_net {
	unsigned latency_us;    /* one-way, >= SIM_TICK_US */
	unsigned jitter_us;     /* extra uniform delay 0..jitter (reorders) */
	unsigned loss_permille;
	unsigned dup_permille;
	/* Return 0 to drop a packet from node `from` to node `to` (-1: nobody). */
	int (*filter)(int from, int to, const unsigned char *buf, size_t len, void *arg);
	void *filter_arg;
	unsigned long long dropped, blackholed, delivered, queued_peak;
};

extern unsigned long long sim_now;   /* microseconds */
extern struct sim_net sim_net;
extern struct sim_node sim_nodes[SIM_MAX_NODES];
extern int sim_nnodes;

/* Start a fresh world; `seed` drives the engine's GET_RANDOM and the
 * network's loss/duplication/jitter; `start_us` is the clock's start. */
void sim_init(unsigned long long seed, unsigned long long start_us);
/* Destroy every context (utp_destroy) and free everything. */
void sim_free(void);

/* A node with context and address 127.0.0.1:port (or [::1]:port). */
struct sim_node *sim_add_node(unsigned short port, int ipv6);
/* The node's process "restarts": utp_destroy, then a fresh context on the
 * same address, not listening. */
void sim_restart_node(struct sim_node *n);
/* Install ON_ACCEPT / ON_FIREWALL with the given template for accepted conns. */
void sim_listen(struct sim_node *n, unsigned flags, const unsigned char *tx, size_t tx_len,
                size_t rx_cap);
/* An address of node n (for utp_connect), or of nobody. */
const struct sockaddr *sim_addr(struct sim_node *n, socklen_t *len);
void sim_make_addr(struct sockaddr_storage *ss, socklen_t *len, unsigned short port, int ipv6);

struct sim_conn *sim_conn_new(struct sim_node *n, unsigned flags, const unsigned char *tx,
                              size_t tx_len, size_t rx_cap);
/* Create a socket for c and utp_connect it to `to`. */
int sim_connect(struct sim_conn *c, const struct sockaddr *to, socklen_t tolen);
int sim_connect_node(struct sim_conn *c, struct sim_node *to);
/* Push more tx (writes what the engine accepts now). */
void sim_pump(struct sim_conn *c);
/* Drain held bytes (C_HOLD_READS) and call utp_read_drained. */
void sim_drain(struct sim_conn *c);
struct sim_conn *sim_conn_at(int i);
int sim_nconns(void);

/* Deliver due packets, advance the clock a tick at a time.  Returns 1 as
 * soon as done(arg) is true (checked after every tick), 0 at the limit. */
int sim_run(int (*done)(void *), void *arg, unsigned long long max_us);
/* Inject a datagram into node `to` as if sent from `from` (delivered now). */
int sim_inject(struct sim_node *to, const unsigned char *buf, size_t len,
               const struct sockaddr *from, socklen_t fromlen);
size_t sim_queue_len(void);

/* Deterministic test data. */
unsigned char *sim_pattern(size_t len, unsigned long long seed);
unsigned long long sim_rand(void);

/* BEP 29 header writer: type, version, extension, conn id, timestamps,
 * wnd, seq, ack.  Writes 20 bytes; returns 20. */
size_t sim_header(unsigned char *b, int type, int ver, int ext, unsigned conn_id,
                  unsigned ts, unsigned ts_diff, unsigned wnd, unsigned seq, unsigned ack);
enum { ST_DATA = 0, ST_FIN = 1, ST_STATE = 2, ST_RESET = 3, ST_SYN = 4 };

#endif
