/*
 * internal.h: declarations shared by the library's modules; never installed.
 * Internal names start with opq__ and have hidden visibility.
 */
#ifndef OPQ_INTERNAL_H
#define OPQ_INTERNAL_H

#include "config.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "opqueue.h"

#define OPQ_INTERNAL __attribute__((visibility("hidden")))
#define OPQ_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define OPQ_LIKELY(x) __builtin_expect(!!(x), 1)

/*
 * Allocation. Every allocation of the library goes through these, so that
 * the test-only fault injector can make the Nth one fail.
 */
OPQ_INTERNAL void *opq__malloc(size_t size);
OPQ_INTERNAL void *opq__calloc(size_t n, size_t size);
OPQ_INTERNAL void opq__free(void *p);
/* Small fixed-size boxes for function-pointer operations (jemalloc when configured). */
OPQ_INTERNAL void *opq__box_alloc(size_t size);
OPQ_INTERNAL void opq__box_free(void *p, size_t size);

/*
 * Test-only fault injector: opq__fault_set(n) makes the nth allocation from
 * now fail (1: the next one), 0 turns it off. opq__fault_count() tells how
 * many allocations were made since the last opq__fault_set. Tests reach
 * these by linking the convenience library; they are not exported.
 */
OPQ_INTERNAL void opq__fault_set(long n);
OPQ_INTERNAL long opq__fault_count(void);

/* Condition variables waiting on CLOCK_MONOTONIC. */
OPQ_INTERNAL int opq__cond_init(pthread_cond_t *cond);
OPQ_INTERNAL int opq__mutex_init(pthread_mutex_t *mutex);
/* A deadline a public call may accept: NULL, or tv_nsec within [0, 1e9). */
OPQ_INTERNAL bool opq__deadline_ok(const struct timespec *deadline);
/* Wait on cond until deadline (NULL: forever): 0 or ETIMEDOUT. */
OPQ_INTERNAL int opq__cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex,
				const struct timespec *deadline);

/* pthread calls that cannot fail on a correct program: checked in debug builds. */
#ifdef OPQ_DEBUG
#define OPQ_CHECK(call)                     \
	do {                                \
		int opq__rc = (call);       \
		assert(opq__rc == 0);       \
		(void)opq__rc;              \
	} while (0)
#else
#define OPQ_CHECK(call) ((void)(call))
#endif
#define opq__lock(m) OPQ_CHECK(pthread_mutex_lock(m))
#define opq__unlock(m) OPQ_CHECK(pthread_mutex_unlock(m))

/*
 * The library's timer thread (timer.c): one thread, started by the first
 * opq__timer_ref and joined by the last opq__timer_unref, that calls each
 * armed timer's function on itself when its instant comes. A timer is
 * embedded in its owner's struct; fn must be short and must not call
 * opq__timer_cancel or opq__timer_unref. Lock order: a caller may hold
 * its own lock while arming; the timer thread holds no lock of its own
 * while calling fn.
 */
struct opq__timer {
	struct opq__timer *next;
	struct timespec when;
	void (*fn)(struct opq__timer *t);
	bool armed;
};
/* Take a reference on the timer thread, starting it if needed (EAGAIN, ENOMEM). */
OPQ_INTERNAL int opq__timer_ref(void);
/* Drop a reference; the last one stops and joins the thread. Never from fn. */
OPQ_INTERNAL void opq__timer_unref(void);
/* Arm (or re-arm) t for the CLOCK_MONOTONIC instant when; needs a reference. */
OPQ_INTERNAL void opq__timer_arm(struct opq__timer *t, const struct timespec *when,
				 void (*fn)(struct opq__timer *t));
/* Disarm t and wait until its fn is not running (never call from fn). */
OPQ_INTERNAL void opq__timer_cancel(struct opq__timer *t);

/* Monotonic nanoseconds and back. */
OPQ_INTERNAL int64_t opq__mono_ns(void);
OPQ_INTERNAL struct timespec opq__ns_to_ts(int64_t ns);
OPQ_INTERNAL int64_t opq__ts_to_ns(const struct timespec *ts);

#endif /* OPQ_INTERNAL_H */
