/*
 * test_header.c -- proves at compile time that utp/core/utp.h carries
 * libutp's API facts (shared/libutp-api.md): every id and its number, the
 * states and error codes, the structures' field order and field types, the
 * type names' sizes and signedness, and the exact type of each of the 28
 * functions.  A mismatch fails the build rather than a test run.
 *
 * Built twice: as C (gnu99) and as C++ (the same file through g++), the
 * second proving the header is usable from C++ through extern "C".  The few
 * runtime checks cover what a compiler cannot see: the name tables exist
 * and are long enough.
 *
 * Prints "N passed, M failed" and exits non-zero on failure.
 */
/* utp.h first: it must stand alone, as libutp's does. */
#include "utp.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* A compile-time assertion that works in C99 and C++98 alike: a negative
 * array size is an error in both.  One typedef per line keeps names unique. */
#define UT_CAT2(a, b) a##b
#define UT_CAT(a, b) UT_CAT2(a, b)
#define STATIC_CHECK(cond) \
	typedef char UT_CAT(static_check_line_, __LINE__)[(cond) ? 1 : -1]

/* Same type?  gcc's builtin in C; a partial specialisation in C++. */
#ifdef __cplusplus
template <typename A, typename B> struct ut_same { enum { value = 0 }; };
template <typename A> struct ut_same<A, A> { enum { value = 1 }; };
#define SAME_TYPE(a, b) (ut_same<a, b>::value)
#define FIELD_TYPE(T, f) __typeof__(((T *)0)->f)
#else
#define SAME_TYPE(a, b) __builtin_types_compatible_p(a, b)
#define FIELD_TYPE(T, f) __typeof__(((T *)0)->f)
#endif

#define FIELD_IS(T, f, type) STATIC_CHECK(SAME_TYPE(FIELD_TYPE(T, f), type))
#define BEFORE(T, a, b) STATIC_CHECK(offsetof(T, a) < offsetof(T, b))
#define SAME_PLACE(T, a, b) STATIC_CHECK(offsetof(T, a) == offsetof(T, b))

/* ---- constants ------------------------------------------------------- */

STATIC_CHECK(UTP_UDP_DONTFRAG == 2);
/* libutp spells it as an enum member, not a macro. */
#ifdef UTP_UDP_DONTFRAG
#error "UTP_UDP_DONTFRAG is a macro; libutp's utp.h makes it an enum member"
#endif
/* ...and programs use it as a constant expression and a flag bit. */
enum { UT_FLAGS_WITH_DONTFRAG = UTP_UDP_DONTFRAG | 1 };
STATIC_CHECK(UT_FLAGS_WITH_DONTFRAG == 3);
STATIC_CHECK(UTP_IOV_MAX == 1024);

STATIC_CHECK(UTP_STATE_CONNECT == 1);
STATIC_CHECK(UTP_STATE_WRITABLE == 2);
STATIC_CHECK(UTP_STATE_EOF == 3);
STATIC_CHECK(UTP_STATE_DESTROYING == 4);

STATIC_CHECK(UTP_ECONNREFUSED == 0);
STATIC_CHECK(UTP_ECONNRESET == 1);
STATIC_CHECK(UTP_ETIMEDOUT == 2);

STATIC_CHECK(UTP_ON_FIREWALL == 0);
STATIC_CHECK(UTP_ON_ACCEPT == 1);
STATIC_CHECK(UTP_ON_CONNECT == 2);
STATIC_CHECK(UTP_ON_ERROR == 3);
STATIC_CHECK(UTP_ON_READ == 4);
STATIC_CHECK(UTP_ON_OVERHEAD_STATISTICS == 5);
STATIC_CHECK(UTP_ON_STATE_CHANGE == 6);
STATIC_CHECK(UTP_GET_READ_BUFFER_SIZE == 7);
STATIC_CHECK(UTP_ON_DELAY_SAMPLE == 8);
STATIC_CHECK(UTP_GET_UDP_MTU == 9);
STATIC_CHECK(UTP_GET_UDP_OVERHEAD == 10);
STATIC_CHECK(UTP_GET_MILLISECONDS == 11);
STATIC_CHECK(UTP_GET_MICROSECONDS == 12);
STATIC_CHECK(UTP_GET_RANDOM == 13);
STATIC_CHECK(UTP_LOG == 14);
STATIC_CHECK(UTP_SENDTO == 15);
STATIC_CHECK(UTP_LOG_NORMAL == 16);
STATIC_CHECK(UTP_LOG_MTU == 17);
STATIC_CHECK(UTP_LOG_DEBUG == 18);
STATIC_CHECK(UTP_SNDBUF == 19);
STATIC_CHECK(UTP_RCVBUF == 20);
STATIC_CHECK(UTP_TARGET_DELAY == 21);
STATIC_CHECK(UTP_ARRAY_SIZE == 22);

/* utpkit's own option ids must never collide with libutp's. */
STATIC_CHECK((int)UTPKIT_MIN_RTO > (int)UTP_ARRAY_SIZE);

/* ---- type names ------------------------------------------------------ */

STATIC_CHECK(sizeof(byte) == 1 && (byte)-1 > 0);
STATIC_CHECK(sizeof(uint8) == 1 && (uint8)-1 > 0);
STATIC_CHECK(sizeof(int8) == 1 && (int8)-1 < 0);
STATIC_CHECK(sizeof(uint16) == 2 && (uint16)-1 > 0);
STATIC_CHECK(sizeof(int16) == 2 && (int16)-1 < 0);
STATIC_CHECK(sizeof(uint32) == 4 && (uint32)-1 > 0);
STATIC_CHECK(sizeof(int32) == 4 && (int32)-1 < 0);
STATIC_CHECK(sizeof(uint) == sizeof(unsigned int) && (uint)-1 > 0);
STATIC_CHECK(sizeof(uint64) == 8 && (uint64)-1 > 0);
STATIC_CHECK(sizeof(int64) == 8 && (int64)-1 < 0);
STATIC_CHECK(SAME_TYPE(byte, unsigned char));
STATIC_CHECK(SAME_TYPE(uint8, unsigned char));
STATIC_CHECK(SAME_TYPE(int8, signed char));
STATIC_CHECK(SAME_TYPE(uint16, unsigned short));
STATIC_CHECK(SAME_TYPE(int16, short));
STATIC_CHECK(SAME_TYPE(uint32, unsigned int));
STATIC_CHECK(SAME_TYPE(int32, int));
STATIC_CHECK(SAME_TYPE(uint, unsigned int));
STATIC_CHECK(SAME_TYPE(uint64, unsigned long long));
STATIC_CHECK(SAME_TYPE(int64, long long));

/* The header must pull in the socket API that libutp programs rely on
 * without including it themselves. */
STATIC_CHECK(SHUT_WR == 1);
STATIC_CHECK(sizeof(socklen_t) > 0 && sizeof(ssize_t) == sizeof(size_t));
STATIC_CHECK(sizeof(struct sockaddr_in) > 0 && sizeof(struct sockaddr_in6) > 0);

/* ---- utp_callback_arguments ------------------------------------------ */

FIELD_IS(utp_callback_arguments, context, utp_context *);
FIELD_IS(utp_callback_arguments, socket, utp_socket *);
FIELD_IS(utp_callback_arguments, len, size_t);
FIELD_IS(utp_callback_arguments, flags, uint32);
FIELD_IS(utp_callback_arguments, callback_type, int);
FIELD_IS(utp_callback_arguments, buf, const byte *);
FIELD_IS(utp_callback_arguments, address, const struct sockaddr *);
FIELD_IS(utp_callback_arguments, send, int);
FIELD_IS(utp_callback_arguments, sample_ms, int);
FIELD_IS(utp_callback_arguments, error_code, int);
FIELD_IS(utp_callback_arguments, state, int);
FIELD_IS(utp_callback_arguments, address_len, socklen_t);
FIELD_IS(utp_callback_arguments, type, int);

STATIC_CHECK(offsetof(utp_callback_arguments, context) == 0);
BEFORE(utp_callback_arguments, context, socket);
BEFORE(utp_callback_arguments, socket, len);
BEFORE(utp_callback_arguments, len, flags);
BEFORE(utp_callback_arguments, flags, callback_type);
BEFORE(utp_callback_arguments, callback_type, buf);
BEFORE(utp_callback_arguments, buf, address);
/* first anonymous union: address / send / sample_ms / error_code / state */
SAME_PLACE(utp_callback_arguments, address, send);
SAME_PLACE(utp_callback_arguments, address, sample_ms);
SAME_PLACE(utp_callback_arguments, address, error_code);
SAME_PLACE(utp_callback_arguments, address, state);
BEFORE(utp_callback_arguments, address, address_len);
/* second anonymous union: address_len / type */
SAME_PLACE(utp_callback_arguments, address_len, type);
STATIC_CHECK(offsetof(utp_callback_arguments, address_len) + sizeof(socklen_t)
             <= sizeof(utp_callback_arguments));
/* Nothing but the two unions after buf: the size fits exactly those. */
STATIC_CHECK(sizeof(utp_callback_arguments) <=
             offsetof(utp_callback_arguments, address_len) + sizeof(void *));

/* The callback type: uint64 (utp_callback_arguments *). */
static uint64 sample_callback(utp_callback_arguments *a)
{
	return a ? 1 : 0;
}
static utp_callback_t *const callback_type_check = &sample_callback;

/* ---- statistics structures ------------------------------------------- */

FIELD_IS(utp_context_stats, _nraw_recv, uint32[5]);
FIELD_IS(utp_context_stats, _nraw_send, uint32[5]);
STATIC_CHECK(offsetof(utp_context_stats, _nraw_recv) == 0);
STATIC_CHECK(offsetof(utp_context_stats, _nraw_send) == 5 * sizeof(uint32));
STATIC_CHECK(sizeof(utp_context_stats) == 10 * sizeof(uint32));

FIELD_IS(utp_socket_stats, nbytes_recv, uint64);
FIELD_IS(utp_socket_stats, nbytes_xmit, uint64);
FIELD_IS(utp_socket_stats, rexmit, uint32);
FIELD_IS(utp_socket_stats, fastrexmit, uint32);
FIELD_IS(utp_socket_stats, nxmit, uint32);
FIELD_IS(utp_socket_stats, nrecv, uint32);
FIELD_IS(utp_socket_stats, nduprecv, uint32);
FIELD_IS(utp_socket_stats, mtu_guess, uint32);
STATIC_CHECK(offsetof(utp_socket_stats, nbytes_recv) == 0);
STATIC_CHECK(offsetof(utp_socket_stats, nbytes_xmit) == 8);
STATIC_CHECK(offsetof(utp_socket_stats, rexmit) == 16);
STATIC_CHECK(offsetof(utp_socket_stats, fastrexmit) == 20);
STATIC_CHECK(offsetof(utp_socket_stats, nxmit) == 24);
STATIC_CHECK(offsetof(utp_socket_stats, nrecv) == 28);
STATIC_CHECK(offsetof(utp_socket_stats, nduprecv) == 32);
STATIC_CHECK(offsetof(utp_socket_stats, mtu_guess) == 36);
STATIC_CHECK(sizeof(utp_socket_stats) == 40);

FIELD_IS(struct utp_iovec, iov_base, void *);
FIELD_IS(struct utp_iovec, iov_len, size_t);
STATIC_CHECK(offsetof(struct utp_iovec, iov_base) == 0);
BEFORE(struct utp_iovec, iov_base, iov_len);
STATIC_CHECK(sizeof(struct utp_iovec) == sizeof(void *) + sizeof(size_t));

/* ---- the 28 functions, each with libutp's exact type ------------------
 * Assigning to a pointer of the written-out type fails to compile (C++) or
 * warns with -Werror=incompatible-pointer-types (C) on any difference in
 * result or parameter types. */
struct api_table {
	utp_context *(*init)(int);
	void (*destroy)(utp_context *);
	void (*set_callback)(utp_context *, int, utp_callback_t *);
	void *(*context_set_userdata)(utp_context *, void *);
	void *(*context_get_userdata)(utp_context *);
	int (*context_set_option)(utp_context *, int, int);
	int (*context_get_option)(utp_context *, int);
	int (*process_udp)(utp_context *, const byte *, size_t,
	                   const struct sockaddr *, socklen_t);
	int (*process_icmp_error)(utp_context *, const byte *, size_t,
	                          const struct sockaddr *, socklen_t);
	int (*process_icmp_fragmentation)(utp_context *, const byte *, size_t,
	                                  const struct sockaddr *, socklen_t, uint16);
	void (*check_timeouts)(utp_context *);
	void (*issue_deferred_acks)(utp_context *);
	utp_context_stats *(*get_context_stats)(utp_context *);
	utp_socket *(*create_socket)(utp_context *);
	void *(*set_userdata)(utp_socket *, void *);
	void *(*get_userdata)(utp_socket *);
	int (*setsockopt)(utp_socket *, int, int);
	int (*getsockopt)(utp_socket *, int);
	int (*connect)(utp_socket *, const struct sockaddr *, socklen_t);
	ssize_t (*write)(utp_socket *, void *, size_t);
	ssize_t (*writev)(utp_socket *, struct utp_iovec *, size_t);
	int (*getpeername)(utp_socket *, struct sockaddr *, socklen_t *);
	void (*read_drained)(utp_socket *);
	int (*get_delays)(utp_socket *, uint32 *, uint32 *, uint32 *);
	utp_socket_stats *(*get_stats)(utp_socket *);
	utp_context *(*get_context)(utp_socket *);
	void (*shutdown)(utp_socket *, int);
	void (*close)(utp_socket *);
};

/* Exactly 28 entries: a 29th or a missing one changes the size. */
STATIC_CHECK(sizeof(struct api_table) == 28 * sizeof(void (*)(void)));

/* The name tables are arrays of const char * (extern, unsized). */
STATIC_CHECK(SAME_TYPE(__typeof__(utp_state_names[0]), const char *));
STATIC_CHECK(SAME_TYPE(__typeof__(utp_error_code_names[0]), const char *));
STATIC_CHECK(SAME_TYPE(__typeof__(utp_callback_names[0]), const char *));

static int passed, failed;

static void check(int ok, const char *what)
{
	if (ok) {
		passed++;
	} else {
		failed++;
		printf("FAIL: %s\n", what);
	}
}

/* Taking every function's address also proves, once linked, that each is
 * defined with C linkage (the C++ build links against the C library). */
static void check_linked(void)
{
	struct api_table t;
	int i;

	t.init = &utp_init;
	t.destroy = &utp_destroy;
	t.set_callback = &utp_set_callback;
	t.context_set_userdata = &utp_context_set_userdata;
	t.context_get_userdata = &utp_context_get_userdata;
	t.context_set_option = &utp_context_set_option;
	t.context_get_option = &utp_context_get_option;
	t.process_udp = &utp_process_udp;
	t.process_icmp_error = &utp_process_icmp_error;
	t.process_icmp_fragmentation = &utp_process_icmp_fragmentation;
	t.check_timeouts = &utp_check_timeouts;
	t.issue_deferred_acks = &utp_issue_deferred_acks;
	t.get_context_stats = &utp_get_context_stats;
	t.create_socket = &utp_create_socket;
	t.set_userdata = &utp_set_userdata;
	t.get_userdata = &utp_get_userdata;
	t.setsockopt = &utp_setsockopt;
	t.getsockopt = &utp_getsockopt;
	t.connect = &utp_connect;
	t.write = &utp_write;
	t.writev = &utp_writev;
	t.getpeername = &utp_getpeername;
	t.read_drained = &utp_read_drained;
	t.get_delays = &utp_get_delays;
	t.get_stats = &utp_get_stats;
	t.get_context = &utp_get_context;
	t.shutdown = &utp_shutdown;
	t.close = &utp_close;
	check(t.init != NULL && t.close != NULL, "function table filled");

	/* Name tables: indexed by state, error code and callback id. */
	check(utp_state_names[UTP_STATE_DESTROYING] != NULL,
	      "utp_state_names[UTP_STATE_DESTROYING]");
	for (i = UTP_STATE_CONNECT; i <= UTP_STATE_DESTROYING; i++)
		check(utp_state_names[i] != NULL && utp_state_names[i][0] != '\0',
		      "utp_state_names[CONNECT..DESTROYING] non-empty");
	check(utp_error_code_names[UTP_ETIMEDOUT] != NULL,
	      "utp_error_code_names[UTP_ETIMEDOUT]");
	for (i = UTP_ECONNREFUSED; i <= UTP_ETIMEDOUT; i++)
		check(utp_error_code_names[i] != NULL && utp_error_code_names[i][0] != '\0',
		      "utp_error_code_names[0..2] non-empty");
	check(utp_callback_names[UTP_SENDTO] != NULL, "utp_callback_names[UTP_SENDTO]");
	for (i = UTP_ON_FIREWALL; i <= UTP_SENDTO; i++)
		check(utp_callback_names[i] != NULL && utp_callback_names[i][0] != '\0',
		      "utp_callback_names[0..15] non-empty");
	check(strcmp(utp_error_code_names[UTP_ECONNREFUSED],
	             utp_error_code_names[UTP_ETIMEDOUT]) != 0,
	      "error names are distinct");
}

/* libutp's own programs (ucat.c) write their log helpers with va_start,
 * relying on utp.h for <stdarg.h>; nothing else here includes it. */
static int sum_of(int n, ...)
{
	va_list ap;
	int total = 0;
	va_start(ap, n);
	while (n-- > 0)
		total += va_arg(ap, int);
	va_end(ap);
	return total;
}

/* As libutp's ucat.c tests a SENDTO callback's flags. */
static int wants_dontfrag(const utp_callback_arguments *a)
{
	return (a->flags & UTP_UDP_DONTFRAG) != 0;
}

int main(void)
{
	utp_callback_arguments a;

	check(sum_of(3, 1, 2, 39) == 42, "va_start/va_arg from utp.h's <stdarg.h>");
	memset(&a, 0, sizeof(a));
	a.flags = UTP_UDP_DONTFRAG;
	check(wants_dontfrag(&a), "UTP_UDP_DONTFRAG as a flag bit");

	/* The anonymous unions are reachable by their member names. */
	memset(&a, 0, sizeof(a));
	a.state = UTP_STATE_EOF;
	check(a.error_code == UTP_STATE_EOF && a.send == UTP_STATE_EOF,
	      "first union shares storage");
	a.address_len = 16;
	check(a.type == 16, "second union shares storage");
	check(callback_type_check(&a) == 1, "utp_callback_t callable");

	check_linked();

#ifdef __cplusplus
	printf("test_header_cxx: ");
#else
	printf("test_header: ");
#endif
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
