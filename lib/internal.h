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
/* Boxes of function-pointer operations (jemalloc when configured). */
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
/* Whether instant a comes before instant b. */
OPQ_INTERNAL bool opq__ts_before(const struct timespec *a, const struct timespec *b);
/* Wait on cond until deadline (NULL: forever): 0 or ETIMEDOUT. */
OPQ_INTERNAL int opq__cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex,
				const struct timespec *deadline);

/*
 * Cancellation of blocking calls (scope.c). A task's function runs with a
 * thread-local "current scope". A blocking call of queue.c, line.c or
 * stage.c that is about to wait on (mu, cv) with mu held registers a
 * record with the current scope: opq__cancel_begin() returns ECANCELED if
 * the scope is already cancelled (nothing registered), else 0. While it
 * waits, opq__cancel_pending() tells whether a cancel arrived (cheap, an
 * atomic load). opq__cancel_end() unregisters (mu still held) and returns
 * whether the scope was cancelled. Outside any task these do nothing and
 * return 0/false, so calls made outside tasks behave as before.
 *
 * Lock order: the waiter's object mutex, then the scope tree's lock. A
 * canceller sets the flags and pins the records under the tree lock, drops
 * it, then for each record locks mu, broadcasts cv and unpins (the tree
 * lock again, inside mu). opq__cancel_end() waits on cv while its record
 * is pinned, so a record never vanishes under a canceller.
 */
struct opq__cancel_reg {
	struct opq__cancel_reg *next, *prev; /* in the scope's list */
	struct opq__cancel_reg *wnext;	     /* a canceller's wake list */
	pthread_mutex_t *mu;
	pthread_cond_t *cv;
	struct opq_scope *scope;	     /* NULL: not registered */
	bool pinned;
};
OPQ_INTERNAL int opq__cancel_begin(struct opq__cancel_reg *r, pthread_mutex_t *mu,
				   pthread_cond_t *cv);
OPQ_INTERNAL bool opq__cancel_pending(const struct opq__cancel_reg *r);
OPQ_INTERNAL bool opq__cancel_end(struct opq__cancel_reg *r);
/*
 * For blocking code outside those three files (the lease's backoff): sleep
 * until the CLOCK_MONOTONIC deadline on behalf of the current task.
 * ETIMEDOUT when the deadline passed, ECANCELED when the current task is
 * (or becomes) cancelled, EINVAL for a malformed deadline, EDEADLK for a
 * NULL deadline outside any task (it would sleep forever). Outside a task
 * it is a plain sleep until the deadline.
 */
OPQ_INTERNAL int opq__cancel_sleep_until(const struct timespec *deadline);

/*
 * enqueue.c: if op is still waiting in q (in the FIFO or a runner's batch),
 * take it out and perform it on the calling thread (counted as running,
 * then completed) and return true; else false. Lets a runner that waits
 * for tasks help run them.
 */
OPQ_INTERNAL bool opq__queue_help(opq_queue *q, opq_op *op);

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
	struct opq__timer *child, *sibling, *prev; /* the heap's links (timer.c) */
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

/*
 * The timer thread on behalf of q's scope trees (scope.c): the first call
 * takes a reference that q keeps until opq_queue_destroy, so that trees
 * coming and going one at a time do not start and join the thread each.
 */
OPQ_INTERNAL int opq__queue_timer_ref(opq_queue *q);

/* Monotonic nanoseconds and back. */
OPQ_INTERNAL int64_t opq__mono_ns(void);
OPQ_INTERNAL struct timespec opq__ns_to_ts(int64_t ns);
/* opq__ts_to_ns saturates at INT64_MAX / INT64_MIN for times out of range. */
OPQ_INTERNAL int64_t opq__ts_to_ns(const struct timespec *ts);
/*
 * How long the system has been suspended since boot, in ns: CLOCK_MONOTONIC
 * stops during a suspend, CLOCK_BOOTTIME does not (0 without a boot clock).
 * Only differences of two readings mean anything. Tests simulate a suspend
 * by adding to it with opq__suspend_pretend.
 */
OPQ_INTERNAL int64_t opq__suspended_ns(void);

/*
 * Tests: called by a canceller of a scope after it has pinned the records
 * of the calls blocked in it and dropped the tree's mutex, before it wakes
 * them (scope.c), so that a test can hold it there.
 */
OPQ_INTERNAL extern void (*opq__scope_wake_hook)(void);
OPQ_INTERNAL void opq__suspend_pretend(int64_t ns);

#endif /* OPQ_INTERNAL_H */
