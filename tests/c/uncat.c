/*
 * uncat -- netcat over uTP, written the way a libutp user writes it.
 *
 * It uses only libutp's 28 functions and libutp's names (no utpkit_*
 * extension), so it doubles as proof that a libutp program builds and runs
 * against utpkit unchanged.  One non-blocking UDP socket, one poll() loop:
 *
 *   datagram in   -> utp_process_udp; once the socket is drained,
 *                    utp_issue_deferred_acks
 *   every ~50 ms  -> utp_check_timeouts
 *   stdin         -> utp_write (bytes the engine refuses wait for WRITABLE)
 *   stdin EOF     -> utp_shutdown(SHUT_WR) once everything was written
 *   peer EOF and our side done -> utp_close; exit 0 on DESTROYING
 *   ON_ERROR      -> message with the error's name, exit 1
 *   ICMP (IP_RECVERR / IPV6_RECVERR error queue) -> utp_process_icmp_error
 *                    or utp_process_icmp_fragmentation
 *
 * Usage:
 *   uncat [-d] [-n] [-B bufsize] [-s local-addr] [-p local-port] host port
 *   uncat -l [-d] [-n] [-B bufsize] [-s local-addr] [-p port]
 *
 * -d prints state changes and, at exit, the socket's and the context's
 * statistics to stderr; in listen mode it also prints the bound address
 * ("uncat: listening on ADDR port N"), which lets a test use port 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <arpa/inet.h>

#ifdef __linux__
#include <linux/errqueue.h>
#endif

#include "utp.h"

/* ICMP types and codes we act on (RFC 792, RFC 4443). */
#define ICMP4_DEST_UNREACH 3
#define ICMP4_PORT_UNREACH 3
#define ICMP4_FRAG_NEEDED 4
#define ICMP6_DEST_UNREACH 1
#define ICMP6_PORT_UNREACH 4
#define ICMP6_PACKET_TOO_BIG 2

static struct {
	int debug;
	int listen;
	int numeric;
	size_t buf_size;
	const char *local_addr;
	const char *local_port;
	const char *remote_host;
	const char *remote_port;
} opt;

static utp_context *ctx;
static utp_socket *sock;        /* our one connection, NULL before/after */
static int fd = -1;             /* the UDP socket */
static int family;

static unsigned char *outbuf;   /* stdin bytes the engine has not taken yet */
static size_t out_start, out_end;
static int stdin_eof;           /* read() returned 0 */
static int connected;           /* CONNECT seen, or the socket was accepted */
static int shut_wr;             /* utp_shutdown(SHUT_WR) done */
static int peer_eof;            /* UTP_STATE_EOF seen */
static int closing;             /* utp_close called */
static int finished;            /* leave the loop */
static int exit_code;
static int pmtu_mode = -1;      /* IP(V6)_MTU_DISCOVER value last set */

static void debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void debug(const char *fmt, ...)
{
	va_list ap;

	if (!opt.debug)
		return;
	fputs("uncat: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void die(const char *what)
{
	fprintf(stderr, "uncat: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr,
	        "usage: uncat [-d] [-n] [-B bufsize] [-s local-addr] [-p local-port] host port\n"
	        "       uncat -l [-d] [-n] [-B bufsize] [-s local-addr] [-p port]\n");
	exit(2);
}

static const char *addr_str(const struct sockaddr *sa, char *out, size_t outlen)
{
	char host[INET6_ADDRSTRLEN];
	int port = 0;

	host[0] = '\0';
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
		inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
		port = ntohs(sin->sin_port);
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
		inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
		port = ntohs(sin6->sin6_port);
	}
	snprintf(out, outlen, "%s port %d", host[0] ? host : "?", port);
	return out;
}

static uint64 monotonic_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64)ts.tv_sec * 1000u + (uint64)ts.tv_nsec / 1000000u;
}

/* Called whenever something may let the connection make progress: pushes
 * buffered stdin bytes into the engine, then half-closes or closes once
 * both directions are done.  Safe to call from inside callbacks. */
static void pump(void)
{
	if (!sock || closing)
		return;
	if (connected) {
		while (out_start < out_end) {
			ssize_t n = utp_write(sock, outbuf + out_start, out_end - out_start);
			if (n < 0) {
				fprintf(stderr, "uncat: utp_write failed\n");
				exit_code = 1;
				closing = 1;
				utp_close(sock);
				return;
			}
			if (n == 0)
				break;  /* UTP_STATE_WRITABLE will call us again */
			out_start += (size_t)n;
		}
		if (out_start == out_end)
			out_start = out_end = 0;
		if (stdin_eof && out_end == 0 && !shut_wr) {
			debug("all input written; shutting down the write side");
			shut_wr = 1;
			utp_shutdown(sock, SHUT_WR);
		}
	}
	if (sock && !closing && shut_wr && peer_eof) {
		debug("both directions done; closing");
		closing = 1;
		utp_close(sock);
	}
}

static uint64 on_sendto(utp_callback_arguments *a)
{
#if defined(IP_MTU_DISCOVER) && defined(IPV6_MTU_DISCOVER)
	/* MTU probes ask for "don't fragment"; everything else may be
	 * fragmented.  Switch the socket's mode only when it changes. */
	int want = (a->flags & UTP_UDP_DONTFRAG) ? 1 : 0;
	if (want != pmtu_mode) {
		int v;
		if (family == AF_INET6) {
			v = want ? IPV6_PMTUDISC_DO : IPV6_PMTUDISC_DONT;
			setsockopt(fd, IPPROTO_IPV6, IPV6_MTU_DISCOVER, &v, sizeof(v));
		} else {
			v = want ? IP_PMTUDISC_DO : IP_PMTUDISC_DONT;
			setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, &v, sizeof(v));
		}
		pmtu_mode = want;
	}
#endif
	/* Losing a datagram here (EAGAIN, EMSGSIZE, a queued ICMP error) is
	 * what uTP's retransmission is for; errors worth acting on also
	 * arrive through the error queue. */
	if (sendto(fd, a->buf, a->len, 0, a->address, a->address_len) < 0 && opt.debug > 1)
		debug("sendto: %s", strerror(errno));
	return 0;
}

static uint64 on_firewall(utp_callback_arguments *a)
{
	char where[80];

	if (!opt.listen || sock) {
		debug("refusing connection from %s",
		      addr_str(a->address, where, sizeof(where)));
		return 1;
	}
	return 0;
}

static uint64 on_accept(utp_callback_arguments *a)
{
	char where[80];

	if (sock) {
		/* on_firewall should have kept this out; be safe anyway. */
		utp_close(a->socket);
		return 0;
	}
	sock = a->socket;
	connected = 1;
	debug("accepted connection from %s", addr_str(a->address, where, sizeof(where)));
	pump();
	return 0;
}

static uint64 on_error(utp_callback_arguments *a)
{
	fprintf(stderr, "uncat: connection error: %s\n", utp_error_code_names[a->error_code]);
	exit_code = 1;
	if (a->socket && !closing) {
		closing = 1;
		utp_close(a->socket);
	}
	return 0;
}

static uint64 on_read(utp_callback_arguments *a)
{
	const unsigned char *p = a->buf;
	size_t left = a->len;

	while (left > 0) {
		ssize_t n = write(STDOUT_FILENO, p, left);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("write stdout");
		}
		p += n;
		left -= (size_t)n;
	}
	utp_read_drained(a->socket);
	return 0;
}

static void print_socket_stats(utp_socket *s)
{
	utp_socket_stats *st = utp_get_stats(s);
	uint32 ours = 0, theirs = 0, age = 0;

	if (!opt.debug)
		return;
	if (st) {
		debug("socket stats: bytes recv %llu, bytes sent %llu",
		      (unsigned long long)st->nbytes_recv, (unsigned long long)st->nbytes_xmit);
		debug("socket stats: packets recv %u, sent %u, duplicate recv %u",
		      st->nrecv, st->nxmit, st->nduprecv);
		debug("socket stats: retransmits %u, fast retransmits %u, mtu guess %u",
		      st->rexmit, st->fastrexmit, st->mtu_guess);
	}
	if (utp_get_delays(s, &ours, &theirs, &age) == 0)
		debug("delays: ours %u us, theirs %u us, age %u ms", ours, theirs, age);
}

static uint64 on_state_change(utp_callback_arguments *a)
{
	debug("state: %s", utp_state_names[a->state]);
	switch (a->state) {
	case UTP_STATE_CONNECT:
		connected = 1;
		pump();
		break;
	case UTP_STATE_WRITABLE:
		pump();
		break;
	case UTP_STATE_EOF:
		peer_eof = 1;
		pump();
		break;
	case UTP_STATE_DESTROYING:
		if (a->socket == sock) {
			print_socket_stats(a->socket);
			sock = NULL;
			finished = 1;
		}
		break;
	}
	return 0;
}

static uint64 on_log(utp_callback_arguments *a)
{
	fprintf(stderr, "uncat: log: %s\n", (const char *)a->buf);
	return 0;
}

#ifdef __linux__
/* Drain the error queue that IP_RECVERR / IPV6_RECVERR fill with ICMP
 * errors.  The data read is the payload of our datagram that the ICMP
 * message quotes, and msg_name is where it was going: exactly what
 * utp_process_icmp_* want. */
static void drain_error_queue(void)
{
	for (;;) {
		unsigned char data[2048];
		union {
			char buf[512];
			struct cmsghdr align;
		} control;
		struct sockaddr_storage dest;
		struct iovec iov;
		struct msghdr msg;
		struct cmsghdr *cm;
		ssize_t len;

		iov.iov_base = data;
		iov.iov_len = sizeof(data);
		memset(&msg, 0, sizeof(msg));
		msg.msg_name = &dest;
		msg.msg_namelen = sizeof(dest);
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = control.buf;
		msg.msg_controllen = sizeof(control.buf);

		len = recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT);
		if (len < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return;
			if (errno == EINTR)
				continue;
			die("recvmsg(MSG_ERRQUEUE)");
		}
		for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
			struct sock_extended_err ee;
			int frag = 0, unreach = 0;

			if (!((cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_RECVERR) ||
			      (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_RECVERR)))
				continue;
			memcpy(&ee, CMSG_DATA(cm), sizeof(ee));
			if (ee.ee_origin == SO_EE_ORIGIN_ICMP) {
				frag = ee.ee_type == ICMP4_DEST_UNREACH && ee.ee_code == ICMP4_FRAG_NEEDED;
				unreach = ee.ee_type == ICMP4_DEST_UNREACH && !frag;
			} else if (ee.ee_origin == SO_EE_ORIGIN_ICMP6) {
				frag = ee.ee_type == ICMP6_PACKET_TOO_BIG;
				unreach = ee.ee_type == ICMP6_DEST_UNREACH;
			} else if (ee.ee_origin == SO_EE_ORIGIN_LOCAL && ee.ee_errno == EMSGSIZE) {
				frag = 1;  /* our own stack knows the path MTU */
			}
			debug("error queue: origin %u type %u code %u info %u (%s)",
			      ee.ee_origin, ee.ee_type, ee.ee_code, ee.ee_info,
			      frag ? "fragmentation needed" : unreach ? "unreachable" : "ignored");
			if (frag)
				utp_process_icmp_fragmentation(ctx, data, (size_t)len,
				                               (struct sockaddr *)&dest, msg.msg_namelen,
				                               (uint16)(ee.ee_info > 0xffff ? 0xffff : ee.ee_info));
			else if (unreach)
				utp_process_icmp_error(ctx, data, (size_t)len,
				                       (struct sockaddr *)&dest, msg.msg_namelen);
		}
	}
}
#endif

static void drain_udp(void)
{
	unsigned char data[65536];

	for (;;) {
		struct sockaddr_storage from;
		socklen_t fromlen = sizeof(from);
		ssize_t len = recvfrom(fd, data, sizeof(data), MSG_DONTWAIT,
		                       (struct sockaddr *)&from, &fromlen);
		if (len < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			if (errno == EINTR)
				continue;
			/* A pending ICMP error surfaces here once as ECONNREFUSED
			 * and friends; the error queue carries the details. */
			if (errno == ECONNREFUSED || errno == EHOSTUNREACH ||
			    errno == ENETUNREACH || errno == EMSGSIZE)
				continue;
			die("recvfrom");
		}
		if (!utp_process_udp(ctx, data, (size_t)len, (struct sockaddr *)&from, fromlen))
			debug("ignored a %zd-byte datagram that is not uTP", len);
	}
	utp_issue_deferred_acks(ctx);
}

static void read_stdin(void)
{
	ssize_t n;

	if (out_start > 0 && out_start == out_end)
		out_start = out_end = 0;
	if (out_start > 0) {  /* make room at the end */
		memmove(outbuf, outbuf + out_start, out_end - out_start);
		out_end -= out_start;
		out_start = 0;
	}
	n = read(STDIN_FILENO, outbuf + out_end, opt.buf_size - out_end);
	if (n < 0) {
		if (errno == EINTR || errno == EAGAIN)
			return;
		die("read stdin");
	}
	if (n == 0) {
		debug("end of input");
		stdin_eof = 1;
	} else {
		out_end += (size_t)n;
	}
	pump();
}

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

static struct addrinfo *resolve(const char *host, const char *port, int fam, int passive)
{
	struct addrinfo hints, *res = NULL;
	int err;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = fam;
	hints.ai_socktype = SOCK_DGRAM;
	hints.ai_protocol = IPPROTO_UDP;
	hints.ai_flags = (opt.numeric ? AI_NUMERICHOST : 0) | (passive ? AI_PASSIVE : 0);
	err = getaddrinfo(host, port, &hints, &res);
	if (err) {
		fprintf(stderr, "uncat: %s: %s\n", host ? host : "(any)", gai_strerror(err));
		exit(1);
	}
	return res;
}

static void setup(void)
{
	struct addrinfo *remote = NULL, *local;
	struct sockaddr_storage bound;
	socklen_t boundlen = sizeof(bound);
	char where[80];
	int on = 1;

	if (!opt.listen) {
		remote = resolve(opt.remote_host, opt.remote_port, AF_UNSPEC, 0);
		family = remote->ai_family;
	} else if (opt.local_addr) {
		struct addrinfo *probe = resolve(opt.local_addr, NULL, AF_UNSPEC, 1);
		family = probe->ai_family;
		freeaddrinfo(probe);
	} else {
		family = AF_INET;
	}

	fd = socket(family, SOCK_DGRAM, IPPROTO_UDP);
	if (fd < 0)
		die("socket");
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
		die("fcntl");
#ifdef __linux__
	if (family == AF_INET6) {
		if (setsockopt(fd, IPPROTO_IPV6, IPV6_RECVERR, &on, sizeof(on)) < 0)
			die("setsockopt(IPV6_RECVERR)");
	} else {
		if (setsockopt(fd, IPPROTO_IP, IP_RECVERR, &on, sizeof(on)) < 0)
			die("setsockopt(IP_RECVERR)");
	}
#endif
	(void)on;

	local = resolve(opt.local_addr, opt.local_port ? opt.local_port : "0", family, 1);
	if (bind(fd, local->ai_addr, local->ai_addrlen) < 0)
		die("bind");
	freeaddrinfo(local);
	if (getsockname(fd, (struct sockaddr *)&bound, &boundlen) < 0)
		die("getsockname");

	ctx = utp_init(2);
	if (!ctx) {
		fprintf(stderr, "uncat: utp_init failed\n");
		exit(1);
	}
	utp_set_callback(ctx, UTP_SENDTO, &on_sendto);
	utp_set_callback(ctx, UTP_ON_ERROR, &on_error);
	utp_set_callback(ctx, UTP_ON_STATE_CHANGE, &on_state_change);
	utp_set_callback(ctx, UTP_ON_READ, &on_read);
	utp_set_callback(ctx, UTP_ON_FIREWALL, &on_firewall);
	utp_set_callback(ctx, UTP_ON_ACCEPT, &on_accept);
	utp_set_callback(ctx, UTP_LOG, &on_log);
	if (opt.debug > 2) {
		utp_context_set_option(ctx, UTP_LOG_NORMAL, 1);
		utp_context_set_option(ctx, UTP_LOG_MTU, 1);
		utp_context_set_option(ctx, UTP_LOG_DEBUG, 1);
	}

	if (opt.listen) {
		/* Printed unconditionally under -d so a test can bind port 0. */
		debug("listening on %s", addr_str((struct sockaddr *)&bound, where, sizeof(where)));
	} else {
		debug("bound to %s", addr_str((struct sockaddr *)&bound, where, sizeof(where)));
		sock = utp_create_socket(ctx);
		if (!sock) {
			fprintf(stderr, "uncat: utp_create_socket failed\n");
			exit(1);
		}
		debug("connecting to %s", addr_str(remote->ai_addr, where, sizeof(where)));
		if (utp_connect(sock, remote->ai_addr, remote->ai_addrlen) < 0) {
			fprintf(stderr, "uncat: utp_connect failed\n");
			exit(1);
		}
		freeaddrinfo(remote);
	}
}

static void print_context_stats(void)
{
	utp_context_stats *st = utp_get_context_stats(ctx);
	int i;

	if (!opt.debug || !st)
		return;
	fprintf(stderr, "uncat: packet sizes      <=23  <=373  <=723 <=1400  >1400\n");
	fprintf(stderr, "uncat: packets sent  ");
	for (i = 0; i < 5; i++)
		fprintf(stderr, " %6u", st->_nraw_send[i]);
	fprintf(stderr, "\nuncat: packets recv  ");
	for (i = 0; i < 5; i++)
		fprintf(stderr, " %6u", st->_nraw_recv[i]);
	fprintf(stderr, "\n");
}

static void loop(void)
{
	uint64 last_check = monotonic_ms();

	while (!finished) {
		struct pollfd p[2];
		int nfds = 1, r;
		uint64 now;

		if (interrupted) {
			/* First signal: close politely; second: just leave. */
			debug("interrupted");
			exit_code = 1;
			if (!sock || closing)
				break;
			closing = 1;
			utp_close(sock);
			interrupted = 0;
		}

		p[0].fd = fd;
		p[0].events = POLLIN;
		p[0].revents = 0;
		/* Read stdin only while there is room; a full buffer waits for
		 * UTP_STATE_WRITABLE, which is the flow control. */
		if (!stdin_eof && out_end < opt.buf_size && !closing) {
			p[1].fd = STDIN_FILENO;
			p[1].events = POLLIN;
			p[1].revents = 0;
			nfds = 2;
		}
		r = poll(p, (nfds_t)nfds, 50);
		if (r < 0 && errno != EINTR)
			die("poll");
		if (r > 0) {
#ifdef __linux__
			if (p[0].revents & POLLERR)
				drain_error_queue();
#endif
			if (p[0].revents & POLLIN)
				drain_udp();
			if (nfds == 2 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
				read_stdin();
		}
		now = monotonic_ms();
		if (now - last_check >= 50) {
			last_check = now;
			utp_check_timeouts(ctx);
		}
		/* A listener whose input ended before anyone connected just
		 * keeps waiting, like nc -l. */
	}
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	int c;

	opt.buf_size = 65536;
	while ((c = getopt(argc, argv, "hdlnB:s:p:")) != -1) {
		switch (c) {
		case 'd': opt.debug++; break;
		case 'l': opt.listen = 1; break;
		case 'n': opt.numeric = 1; break;
		case 'B': {
			long v = atol(optarg);
			if (v < 1 || v > (1L << 26))
				usage();
			opt.buf_size = (size_t)v;
			break;
		}
		case 's': opt.local_addr = optarg; break;
		case 'p': opt.local_port = optarg; break;
		default: usage();
		}
	}
	if (opt.listen) {
		if (optind != argc)
			usage();
	} else {
		if (argc - optind != 2)
			usage();
		opt.remote_host = argv[optind];
		opt.remote_port = argv[optind + 1];
	}

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	outbuf = malloc(opt.buf_size);
	if (!outbuf)
		die("malloc");

	setup();
	loop();

	if (out_end > out_start) {
		fprintf(stderr, "uncat: %zu bytes of input were never sent\n", out_end - out_start);
		exit_code = 1;
	}
	print_context_stats();
	utp_destroy(ctx);
	close(fd);
	free(outbuf);
	debug("exit %d", exit_code);
	return exit_code;
}
