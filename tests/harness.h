/*
 * harness.h: helpers shared by the Check tests. Every wait is bounded: a
 * broken build fails a test instead of hanging CI.
 */
#ifndef OPQ_TEST_HARNESS_H
#define OPQ_TEST_HARNESS_H

#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "opqueue.h"

/* How long any single wait in a test may take before the test fails. */
#define T_WAIT_NS (30LL * 1000000000LL)

static inline struct timespec t_deadline(int64_t ns)
{
	struct timespec ts;
	ck_assert_int_eq(opq_deadline_after(&ts, ns), 0);
	return ts;
}

/* The instant ns (>= 0, < 1 s) after t. */
static inline struct timespec t_plus(struct timespec t, long ns)
{
	t.tv_nsec += ns;
	if (t.tv_nsec >= 1000000000L) {
		t.tv_sec++;
		t.tv_nsec -= 1000000000L;
	}
	return t;
}

/* CLOCK_MONOTONIC in nanoseconds. */
static inline int64_t t_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline bool t_passed(const struct timespec *deadline)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec > deadline->tv_sec ||
	       (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec);
}

/* Poll `cond` (yielding) until it holds; fail the test after T_WAIT_NS. */
#define T_WAIT_UNTIL(cond)                                                                         \
	do {                                                                                       \
		struct timespec t_dl_ = t_deadline(T_WAIT_NS);                                     \
		while (!(cond)) {                                                                  \
			ck_assert_msg(!t_passed(&t_dl_), "timed out waiting for: %s", #cond);      \
			sched_yield();                                                             \
		}                                                                                  \
	} while (0)

/* A one-shot gate: threads wait until it is opened. */
struct t_gate {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool open;
};

static inline void t_gate_init(struct t_gate *g)
{
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_mutex_init(&g->mu, NULL);
	pthread_cond_init(&g->cv, &ca);
	pthread_condattr_destroy(&ca);
	g->open = false;
}

static inline void t_gate_open(struct t_gate *g)
{
	pthread_mutex_lock(&g->mu);
	g->open = true;
	pthread_cond_broadcast(&g->cv);
	pthread_mutex_unlock(&g->mu);
}

/* Wait for the gate; returns false when T_WAIT_NS passed first. */
static inline bool t_gate_wait(struct t_gate *g)
{
	struct timespec dl = t_deadline(T_WAIT_NS);
	int rc = 0;
	pthread_mutex_lock(&g->mu);
	while (!g->open && rc != ETIMEDOUT)
		rc = pthread_cond_timedwait(&g->cv, &g->mu, &dl);
	bool open = g->open;
	pthread_mutex_unlock(&g->mu);
	return open;
}

static inline void t_gate_destroy(struct t_gate *g)
{
	pthread_cond_destroy(&g->cv);
	pthread_mutex_destroy(&g->mu);
}

/* 1 in a ThreadSanitizer build (clang's or gcc's). */
#if defined(__SANITIZE_THREAD__)
#define OPQ_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define OPQ_TEST_TSAN 1
#endif
#endif
#ifndef OPQ_TEST_TSAN
#define OPQ_TEST_TSAN 0
#endif

/* Stress sizes are divided by OPQ_TEST_DIVISOR (sanitizer builds set it). */
static inline long t_scale(long n)
{
	const char *d = getenv("OPQ_TEST_DIVISOR");
	long div = d ? atol(d) : 1;
	if (div < 1)
		div = 1;
	return n / div > 0 ? n / div : 1;
}

/* Run a suite in fork mode, each test case with a timeout; exit status. */
static inline int t_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

static inline TCase *t_tcase(Suite *s, const char *name, int timeout_s)
{
	TCase *tc = tcase_create(name);
	tcase_set_timeout(tc, timeout_s);
	suite_add_tcase(s, tc);
	return tc;
}

#endif /* OPQ_TEST_HARNESS_H */
