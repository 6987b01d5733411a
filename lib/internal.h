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
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "opqueue.h"

#define OPQ_INTERNAL    __attribute__((visibility("hidden")))
#define OPQ_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define OPQ_LIKELY(x)   __builtin_expect(!!(x), 1)

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
 * Completion channels (chan.c), below the queue. A queue calls
 * opq__chan_accept(ch) before an operation naming ch can be seen by a
 * runner (opq__chan_unaccept if the enqueue then fails), and
 * opq__chan_end(op, status) once op has ended: after its perform (0) or
 * instead of its discard (ECANCELED). Neither blocks nor takes a lock.
 */
OPQ_INTERNAL void opq__chan_accept(opq_chan *ch);
OPQ_INTERNAL void opq__chan_unaccept(opq_chan *ch);
OPQ_INTERNAL void opq__chan_end(opq_op *op, int status);

/*
 * The thread's cancellation point (cancel.c), below queue, line and stage.
 * A cancel context is something that can be cancelled: a flag, and the
 * records of the calls blocked in it, guarded by a lock its owner passes
 * to opq__cancel_ctx_init. Each thread has a current context (NULL: none);
 * scope.c makes a task's scope current while the task's function runs and
 * cancels the contexts of cancelled scopes.
 *
 * A blocking call of queue.c, line.c or stage.c that is about to wait on
 * (mu, cv) with mu held registers a record with the current context:
 * opq__cancel_begin() returns ECANCELED if the context is already
 * cancelled (nothing registered), else 0. While it waits,
 * opq__cancel_pending() tells whether a cancel arrived (cheap, an atomic
 * load). opq__cancel_end() unregisters (mu still held; it may release and
 * retake mu while a canceller finishes waking it) and returns whether the
 * context was cancelled. With no current context these do nothing and
 * return 0/false: a call made outside any task is not cancellable.
 *
 * Lock order: the waiter's object mutex (mu), then the context's lock. A
 * canceller calls opq__cancel_ctx_cancel under the context's lock, which
 * sets the flag and pins the records onto its wake list, drops the lock,
 * then calls opq__cancel_wake: for each record it locks mu, broadcasts cv
 * and unpins (the context's lock again, inside mu). opq__cancel_end()
 * waits on cv while its record is pinned, so a record never vanishes under
 * a canceller. The invariants are written out at the top of cancel.c.
 */
struct opq__cancel_ctx {
	pthread_mutex_t *mu;   /* the owner's lock: guards regs */
	struct opq__link regs; /* records of the calls blocked in it */
	atomic_bool cancelled; /* set once, under mu; read without it */
};
struct opq__cancel_reg {
	struct opq__link link;         /* in its context's regs */
	struct opq__cancel_reg *wnext; /* a canceller's wake list */
	pthread_mutex_t *mu;
	pthread_cond_t *cv;
	struct opq__cancel_ctx *ctx; /* NULL: not registered */
	bool pinned;
};
OPQ_INTERNAL int opq__cancel_begin(struct opq__cancel_reg *r, pthread_mutex_t *mu,
                                   pthread_cond_t *cv);
OPQ_INTERNAL bool opq__cancel_pending(const struct opq__cancel_reg *r);
OPQ_INTERNAL bool opq__cancel_end(struct opq__cancel_reg *r);
/*
 * For blocking code outside those three files (the lease's backoff): sleep
 * until the CLOCK_MONOTONIC deadline in the current context. ETIMEDOUT
 * when the deadline passed, ECANCELED when the context is (or becomes)
 * cancelled, EINVAL for a malformed deadline, EDEADLK for a NULL deadline
 * with no current context (it would sleep forever). With no current
 * context it is a plain sleep until the deadline.
 */
OPQ_INTERNAL int opq__cancel_sleep_until(const struct timespec *deadline);
/*
 * The same in context c (NULL: a plain sleep; then deadline must not be
 * NULL), whether or not it is the current one; or a pthread init error.
 */
OPQ_INTERNAL int opq__cancel_sleep(struct opq__cancel_ctx *c, const struct timespec *deadline);

/* For the contexts' owner. Init: not cancelled, no record; mu guards it. */
OPQ_INTERNAL void opq__cancel_ctx_init(struct opq__cancel_ctx *c, pthread_mutex_t *mu);
/* The calling thread's current context, and setting it (returns the one it replaces). */
OPQ_INTERNAL struct opq__cancel_ctx *opq__cancel_current(void);
OPQ_INTERNAL struct opq__cancel_ctx *opq__cancel_set_current(struct opq__cancel_ctx *c);
/* Whether c is cancelled (an acquire load; with or without c->mu). */
OPQ_INTERNAL bool opq__cancel_ctx_cancelled(const struct opq__cancel_ctx *c);
/* Under c->mu: whether calls are registered with c (c must not be freed then). */
OPQ_INTERNAL bool opq__cancel_ctx_busy(const struct opq__cancel_ctx *c);
/*
 * Under c->mu: cancel c, pushing the records to wake onto the caller's
 * *wake list (start it NULL; one list may gather several contexts).
 */
OPQ_INTERNAL void opq__cancel_ctx_cancel(struct opq__cancel_ctx *c, struct opq__cancel_reg **wake);
/* Holding neither the contexts' locks nor any object mutex: wake the list's records. */
OPQ_INTERNAL void opq__cancel_wake(struct opq__cancel_reg *wake);
/*
 * Tests: called by opq__cancel_wake, when it has records to wake, before
 * it wakes them (the canceller has pinned them and dropped the context's
 * lock), so that a test can hold a canceller there.
 */
OPQ_INTERNAL extern void (*opq__cancel_wake_hook)(void);

/*
 * enqueue.c: if op is still waiting in q (in the FIFO or a runner's batch),
 * take it out and perform it on the calling thread (counted as running,
 * then completed) and return true; else false. Lets a runner that waits
 * for tasks help run them.
 */
OPQ_INTERNAL bool opq__queue_help(opq_queue *q, opq_op *op);

/* pthread calls that cannot fail on a correct program: checked in debug builds. */
#ifdef OPQ_DEBUG
#define OPQ_CHECK(call)                                                                            \
	do {                                                                                       \
		int opq__rc = (call);                                                              \
		assert(opq__rc == 0);                                                              \
		(void)opq__rc;                                                                     \
	} while (0)
#else
#define OPQ_CHECK(call) ((void)(call))
#endif
#define opq__lock(m)   OPQ_CHECK(pthread_mutex_lock(m))
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
/* The runners' stack size set at create (0: the system's default). */
OPQ_INTERNAL size_t opq__queue_stack_size(const opq_queue *q);

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
OPQ_INTERNAL void opq__suspend_pretend(int64_t ns);

/*
 * Lease locks: lease.c (the provider object, the handle and its store
 * calls), lease_attr.c (attributes), lease_keepalive.c (the keepalive),
 * lease_memory.c (the
 * memory provider).
 *
 * A handle has three locks, always taken in this order:
 *   ka_mu  serialises keepalive start/stop (and destroy, release);
 *   io     serialises the handle's store calls, so that a reply is applied
 *          to the state the request was made from (a refresh of token 5
 *          never clears a grant of token 6 made meanwhile);
 *   mu     guards the state: held, grant, error words, keepalive fields.
 * Store calls are made holding io but not mu, so remaining() and
 * grant_get() never wait for the store.
 */
#define OPQ__LEASE_ERR_MAX 256

struct opq_lease_attr {
	char owner[OPQ_LEASE_OWNER_MAX + 1];
	int64_t lease_ns;
	int64_t ppm, fixed_ns;
	int64_t poll_min, poll_max;
	size_t data_len;
	unsigned char data[OPQ_LEASE_DATA_MAX];
	opq_chan *chan; /* lost is delivered on it (NULL: on the library's threads) */
};

struct opq__lease_keepalive {
	bool on;       /* started and not yet cleaned up (holds a timer reference) */
	bool ended;    /* lost was called or stop began: no more refreshes */
	bool stopping; /* a stop is cleaning up */
	bool op_busy;  /* op is queued or being performed */
	bool in_lost;  /* the lost callback is running on lost_thread */
	pthread_t lost_thread;
	opq_queue *queue; /* NULL: refreshes run on `thread` */
	bool has_thread;  /* `thread` was started and is not joined yet */
	bool run;         /* `thread`: perform op now */
	bool quit;        /* `thread`: exit */
	pthread_t thread; /* "opq-lease": performs op when `run` is set */
	int64_t interval_ns;
	opq_lease_lost_fn *lost;
	void *arg;
	int64_t refresh_at; /* next refresh (monotonic ns) */
	int64_t lost_at;    /* lost(UNREACHABLE) unless confirmed by then */
	opq_op op;
	struct opq__timer timer;
	/* With a channel (a.chan at start): the keepalive holds one accepted
	 * delivery on it from start; lost is lost_op's completion. */
	opq_chan *chan;
	bool lost_sent;    /* lost_op was handed to chan (its acceptance used) */
	bool lost_pending; /* lost_op is in chan, its completion not yet begun */
	opq_op lost_op;
};

struct opq_lease {
	opq_lease_provider *provider;
	char name[OPQ_LEASE_NAME_MAX + 1];
	struct opq_lease_attr a;
	int64_t margin_ns;
	pthread_mutex_t ka_mu, io, mu;
	pthread_cond_t cv;     /* keepalive: op_busy, in_lost, run or quit changed; cancelled set */
	atomic_bool cancelled; /* opq_lease_cancel was called (set under mu; read without) */
	bool held;
	opq_lease_grant grant;
	int64_t grant_suspended; /* opq__suspended_ns() at grant.acquired */
	uint64_t rng;
	char err[OPQ__LEASE_ERR_MAX];
	struct opq__lease_keepalive ka;
};

/* lease_attr.c: the defaults of attributes (a fresh random owner). */
OPQ_INTERNAL void opq__lease_attr_defaults(struct opq_lease_attr *a);
/* lease_attr.c: len random bytes (getrandom, /dev/urandom, or a mix of the time). */
OPQ_INTERNAL void opq__lease_random(void *buf, size_t len);
/* lease_attr.c: the length of s if it is 1..max bytes, else 0 (also for NULL). */
OPQ_INTERNAL size_t opq__lease_str_ok(const char *s, size_t max);
/* lease.c: a + b for b >= 0, saturating at INT64_MAX. */
OPQ_INTERNAL int64_t opq__lease_sat_add(int64_t a, int64_t b);
/*
 * lease.c: the refresh itself (io, then mu), shared by opq_lease_refresh
 * and the keepalive: 0 (*grant, if not NULL, gets the new grant), ENOLCK
 * when not held or no longer held, or a store error.
 */
OPQ_INTERNAL int opq__lease_do_refresh(opq_lease *lease, opq_lease_grant *grant);
/* lease_keepalive.c: whether the calling thread runs l's lost callback (takes mu). */
OPQ_INTERNAL bool opq__lease_in_own_lost(opq_lease *l);
/* lease_keepalive.c: stop and clean up l's keepalive, if any (ka_mu held, not from lost). */
OPQ_INTERNAL void opq__lease_ka_stop_locked(opq_lease *l);

#endif /* OPQ_INTERNAL_H */
