/*
 * check.h -- the tiny test framework of the C engine tests (test_engine.c,
 * test_accept.c): CHECK macros that record a failure and go on, time units,
 * and a main() body that runs the tests whose names match the arguments.
 * Header-only; each test program includes it once.
 */
#ifndef UTPKIT_TESTS_CHECK_H
#define UTPKIT_TESTS_CHECK_H

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "sim.h"

static int test_failed;
static int fail_lines;

static void fail_at(int line, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail_at(int line, const char *fmt, ...)
{
	va_list ap;

	test_failed = 1;
	if (++fail_lines > 25)
		return;
	printf("    line %d: ", line);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

#define CHECK(cond) \
	do { if (!(cond)) fail_at(__LINE__, "%s", #cond); } while (0)
#define CHECKF(cond, ...) \
	do { if (!(cond)) fail_at(__LINE__, __VA_ARGS__); } while (0)
#define CHECK_EQ(a, b) \
	do { long long va_ = (long long)(a), vb_ = (long long)(b); \
	     if (va_ != vb_) fail_at(__LINE__, "%s == %s (%lld != %lld)", #a, #b, va_, vb_); } while (0)

#define MS 1000ull
#define SEC 1000000ull
#define MIB (1024u * 1024u)

/* Start the clock 5 s before the 32-bit microsecond timestamps on the wire
 * wrap, so every test crosses the wrap early. */
#define START_US (0x100000000ull - 5 * SEC)

static inline const utpkit_counters *counters(struct sim_node *n)
{
	return utpkit_get_counters(n->ctx);
}

struct check_test {
	const char *name;
	void (*fn)(void);
};

/* Runs the tests whose names contain one of the arguments (all without
 * arguments); prints "N passed, M failed"; returns the exit status. */
static inline int check_main(const struct check_test *tests, size_t n, int argc, char **argv)
{
	size_t i;
	int passed = 0, failed = 0, j;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 0; i < n; i++) {
		int selected = argc < 2;
		for (j = 1; j < argc; j++)
			if (strstr(tests[i].name, argv[j]))
				selected = 1;
		if (!selected)
			continue;
		test_failed = 0;
		fail_lines = 0;
		printf("%s ...\n", tests[i].name);
		tests[i].fn();
		if (test_failed) {
			printf("FAIL %s\n", tests[i].name);
			failed++;
		} else {
			printf("ok   %s\n", tests[i].name);
			passed++;
		}
	}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}

#endif
