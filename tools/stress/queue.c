/*
 * The queue under stress. Two queues: one bounded (its runners take one
 * operation at a time, producers block for room), one unbounded (runners
 * take batches that other runners, once the FIFO is empty, and cancels take
 * operations out of, and operations that now and then spin a while so that
 * batches stall and other runners take from them). Every worker enqueues
 * caller-boxed and function-pointer operations (blocking, try, timed),
 * cancels its own, stops (drain or discard) and restarts the queues while
 * others enqueue, resizes them and waits for idle; operations enqueue
 * children from inside, and check that waiting for their own queue is
 * EDEADLK.
 *
 * Exactly once: every operation lives in a slot that is FREE or IN FLIGHT.
 * The enqueuer sets IN FLIGHT before the call; perform, discard, or the
 * enqueuer on a failed call (ESHUTDOWN, EAGAIN, ETIMEDOUT, EDEADLK) set it
 * back with a compare-and-swap, which fails if the operation was already
 * resolved: a second perform/discard or a perform after a failed enqueue
 * is caught at once. At the end every slot must be FREE (none lost) and
 * the queues' own statistics must match the counts seen by the callbacks.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "stress.h"

#define NQUEUES      2
#define WORKER_SLOTS 32
#define CHILD_SLOTS  1024
#define CAPACITY     48
#define SPIN_NS_MAX  20000

/* Queue 0 is bounded, queue 1 unbounded. */
static const unsigned capacity[NQUEUES] = {CAPACITY, 0};

enum { FREE = 0, IN_FLIGHT = 1 };

struct qmod;

struct slot {
	opq_op op;
	struct qmod *m;
	atomic_int state;
	unsigned qi;    /* the queue it was enqueued on */
	unsigned depth; /* 0: enqueued by a worker; 1, 2: by an operation */
	uint64_t rnd;   /* drives what perform does */
	bool fn;        /* enqueued as a function pointer */
};

struct qcount {
	_Atomic uint64_t attempts, accepted, performed, discarded, cancelled;
	_Atomic uint64_t eshutdown, eagain, etimedout, edeadlk;
	_Atomic uint64_t stops, starts, resizes, idles, inside;
};

struct qmod {
	opq_queue *q[NQUEUES];
	unsigned threads;
	struct slot *wslots; /* threads * WORKER_SLOTS, slot i*W.. owned by worker i */
	struct slot *cslots; /* CHILD_SLOTS, claimed by compare-and-swap */
	struct qcount c[NQUEUES];
	_Atomic uint64_t calls;
	_Atomic unsigned child_cursor;
};

#define CALL(m) atomic_fetch_add_explicit(&(m)->calls, 1, memory_order_relaxed)
#define INC(x)  atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)

static void resolve(struct slot *s, const char *how)
{
	int expected = IN_FLIGHT;
	if (!atomic_compare_exchange_strong(&s->state, &expected, FREE))
		stress_fail("queue",
		            "operation %p %s but it was not in flight (state %d): "
		            "resolved twice",
		            (void *)s, how, expected);
}

static void enqueue_child(struct qmod *m, struct slot *parent, struct stress_rng *r);

/* Runs on a runner (or on a stopper draining a never-started queue). */
static void perform_body(struct slot *s)
{
	struct qmod *m = s->m;
	unsigned qi = s->qi;
	struct stress_rng r = {s->rnd};
	opq_queue *q = m->q[qi];

	INC(m->c[qi].performed);
	if (opq_queue_current() != q)
		stress_fail("queue",
		            "opq_queue_current() is not the queue performing the operation");
	if (stress_pct(&r, 10)) {
		INC(m->c[qi].inside);
		CALL(m);
		int rc = stress_pct(&r, 50) ? opq_queue_wait_idle(q, NULL)
		                            : opq_queue_stop(q, (int)stress_below(&r, 2));
		if (rc != EDEADLK)
			stress_fail("queue",
			            "waiting for its own queue from inside an operation "
			            "returned %d, not EDEADLK",
			            rc);
	}
	if (s->depth < 2 && stress_pct(&r, 30))
		enqueue_child(m, s, &r);
	if (stress_pct(&r, 5)) {
		/* Hold this runner a while: its batch stalls, others take from it. */
		int64_t end = stress_now() + (int64_t)stress_below(&r, SPIN_NS_MAX);
		while (stress_now() < end)
			;
	}
	resolve(s, "performed"); /* the last touch: the slot may be reused from here */
}

static void perform_op(opq_op *op)
{
	perform_body(OPQ_CONTAINER_OF(op, struct slot, op));
}

static void discard_body(struct slot *s)
{
	INC(s->m->c[s->qi].discarded);
	resolve(s, "discarded");
}

static void discard_op(opq_op *op)
{
	discard_body(OPQ_CONTAINER_OF(op, struct slot, op));
}

static void perform_fn(void *arg)
{
	perform_body(arg);
}

static void discard_fn(void *arg)
{
	discard_body(arg);
}

/* Account for an enqueue's result; `allowed` lists the errors that may happen. */
static void enqueued(struct qmod *m, struct slot *s, unsigned qi, int rc, bool may_again,
                     bool may_timeout, bool may_deadlk)
{
	/* qi, not s->qi: once accepted, s may be performed and reused at once. */
	struct qcount *c = &m->c[qi];
	INC(c->attempts);
	if (rc == 0) {
		INC(c->accepted);
		return;
	}
	if (rc == ESHUTDOWN)
		INC(c->eshutdown);
	else if (rc == EAGAIN && may_again)
		INC(c->eagain);
	else if (rc == ETIMEDOUT && may_timeout)
		INC(c->etimedout);
	else if (rc == EDEADLK && may_deadlk)
		INC(c->edeadlk);
	else
		stress_fail("queue", "enqueue returned unexpected %d (%s)", rc, strerror(rc));
	resolve(s, "returned to its caller");
}

/* Enqueue s (already IN FLIGHT) with a random variant. */
static void enqueue_slot(struct qmod *m, struct slot *s, struct stress_rng *r, bool inside)
{
	unsigned qi = s->qi;
	opq_queue *q = m->q[qi];
	/*
	 * From inside an operation only the try and timed variants: a runner of
	 * queue A blocked without a deadline on a full queue B while B's
	 * runners block on A would be a cycle the library does not detect
	 * (opqueue(7)), a deadlock of the tool's own making.
	 */
	unsigned variant = inside ? 1 + stress_below(r, 2) : stress_below(r, 3);
	struct timespec dl = stress_after((int64_t)stress_below(r, 2000000));
	int rc;
	s->fn = stress_pct(r, 35);
	CALL(m);
	if (s->fn) {
		if (variant == 0)
			rc = opq_queue_enqueue_fn(q, perform_fn, discard_fn, s);
		else if (variant == 1)
			rc = opq_queue_tryenqueue_fn(q, perform_fn, discard_fn, s);
		else
			rc = opq_queue_timedenqueue_fn(q, perform_fn, discard_fn, s, &dl);
	} else {
		opq_op_init(&s->op, perform_op, discard_op);
		if (variant == 0)
			rc = opq_queue_enqueue(q, &s->op);
		else if (variant == 1)
			rc = opq_queue_tryenqueue(q, &s->op);
		else
			rc = opq_queue_timedenqueue(q, &s->op, &dl);
	}
	/* Only a bounded queue is ever full: try may then give EAGAIN, timed
	 * ETIMEDOUT, and a runner waiting for room in its own queue EDEADLK. */
	bool bounded = capacity[qi] != 0;
	enqueued(m, s, qi, rc, bounded && variant == 1, bounded && variant == 2,
	         bounded && variant == 2 && opq_queue_current() == q);
}

static void enqueue_child(struct qmod *m, struct slot *parent, struct stress_rng *r)
{
	unsigned start = atomic_fetch_add(&m->child_cursor, 1);
	for (unsigned i = 0; i < 8; i++) {
		struct slot *s = &m->cslots[(start * 8 + i) % CHILD_SLOTS];
		int expected = FREE;
		if (!atomic_compare_exchange_strong(&s->state, &expected, IN_FLIGHT))
			continue;
		s->m = m;
		s->qi = stress_below(r, NQUEUES);
		s->depth = parent->depth + 1;
		s->rnd = stress_next(r);
		enqueue_slot(m, s, r, true);
		return;
	}
}

static int setup(void **statep, unsigned threads, uint64_t seed)
{
	(void)seed;
	struct qmod *m = calloc(1, sizeof(*m));
	if (!m)
		return ENOMEM;
	m->threads = threads;
	m->wslots = calloc((size_t)threads * WORKER_SLOTS, sizeof(struct slot));
	m->cslots = calloc(CHILD_SLOTS, sizeof(struct slot));
	if (!m->wslots || !m->cslots)
		return ENOMEM;
	opq_queue_attr *a;
	int rc = opq_queue_attr_create(&a);
	if (rc)
		return rc;
	opq_queue_attr_set_name(a, "stress");
	for (unsigned i = 0; i < NQUEUES; i++) {
		opq_queue_attr_set_capacity(a, capacity[i]);
		if ((rc = opq_queue_create(&m->q[i], a)) || (rc = opq_queue_start(m->q[i], 2 + i)))
			break;
	}
	opq_queue_attr_destroy(a);
	if (rc)
		return rc;
	*statep = m;
	return 0;
}

static void step(void *state, struct stress_worker *w)
{
	struct qmod *m = state;
	struct stress_rng *r = &w->rng;
	unsigned qi = stress_below(r, NQUEUES);
	opq_queue *q = m->q[qi];
	struct slot *mine = &m->wslots[(size_t)w->index * WORKER_SLOTS];
	unsigned action = stress_below(r, 100);
	int rc;

	if (action < 60) {
		/* A burst of enqueues from outside. */
		unsigned n = 1 + stress_below(r, 8);
		for (unsigned k = 0; k < n; k++) {
			struct slot *s = &mine[stress_below(r, WORKER_SLOTS)];
			if (atomic_load(&s->state) != FREE)
				continue; /* still in flight: the queue has it */
			atomic_store(&s->state, IN_FLIGHT);
			s->m = m;
			s->qi = qi;
			s->depth = 0;
			s->rnd = stress_next(r);
			enqueue_slot(m, s, r, false);
		}
	} else if (action < 72) {
		/* Cancel some of my own caller-boxed operations that may still be queued. */
		for (unsigned k = 0; k < WORKER_SLOTS; k += 1 + stress_below(r, 4)) {
			struct slot *s = &mine[k];
			if (atomic_load(&s->state) != IN_FLIGHT || s->fn)
				continue;
			CALL(m);
			rc = opq_queue_cancel(m->q[s->qi], &s->op);
			if (rc == 0)
				INC(m->c[s->qi].cancelled);
			else if (rc != EBUSY)
				stress_fail("queue", "cancel returned %d", rc);
		}
	} else if (action < 74) {
		/* Stop, racing every other worker's enqueues, then maybe restart. */
		int mode = stress_pct(r, 50) ? OPQ_STOP_DRAIN : OPQ_STOP_DISCARD;
		CALL(m);
		if ((rc = opq_queue_stop(q, mode)) != 0)
			stress_fail("queue", "stop returned %d", rc);
		INC(m->c[qi].stops);
		if (stress_pct(r, 50)) {
			CALL(m);
			rc = opq_queue_start(q, 1 + stress_below(r, 4));
			if (rc != 0 && rc != EALREADY && rc != EBUSY)
				stress_fail("queue", "start after stop returned %d", rc);
			INC(m->c[qi].starts);
		}
	} else if (action < 84) {
		/* (10%: start, which fails with EALREADY on a running queue.) */
		CALL(m);
		rc = opq_queue_start(q, 1 + stress_below(r, 4));
		if (rc != 0 && rc != EALREADY && rc != EBUSY)
			stress_fail("queue", "start returned %d", rc);
		INC(m->c[qi].starts);
	} else if (action < 90) {
		CALL(m);
		rc = opq_queue_set_runners(q, 1 + stress_below(r, 4));
		if (rc != 0 && rc != ESRCH)
			stress_fail("queue", "set_runners returned %d", rc);
		INC(m->c[qi].resizes);
	} else if (action < 96) {
		struct timespec dl = stress_after((int64_t)stress_below(r, 1000000));
		CALL(m);
		rc = opq_queue_wait_idle(q, &dl);
		if (rc != 0 && rc != ETIMEDOUT)
			stress_fail("queue", "wait_idle returned %d", rc);
		INC(m->c[qi].idles);
	} else {
		opq_queue_stats st;
		CALL(m);
		if ((rc = opq_queue_stats_get(q, &st)) != 0)
			stress_fail("queue", "stats_get returned %d", rc);
		else if (capacity[qi] && st.queued > capacity[qi])
			stress_fail("queue", "%" PRIu64 " queued in a queue of capacity %u",
			            st.queued, capacity[qi]);
	}
}

static void check(void *state)
{
	struct qmod *m = state;
	for (unsigned i = 0; i < NQUEUES; i++) {
		/* The queue counts an operation completed after its perform
		 * callback returns, and discarded before it calls the discard
		 * callback (under its lock, then the callbacks without it): read
		 * each pair in the order in which the earlier count cannot have
		 * moved past the later one. */
		uint64_t discarded = atomic_load(&m->c[i].discarded);
		opq_queue_stats st;
		opq_queue_stats_get(m->q[i], &st);
		uint64_t performed = atomic_load(&m->c[i].performed);
		if (st.completed > performed || st.discarded < discarded)
			stress_fail("queue",
			            "queue %u counts %" PRIu64 " performed, %" PRIu64
			            " discarded, its callbacks saw %" PRIu64 " and %" PRIu64,
			            i, st.completed, st.discarded, performed, discarded);
	}
}

static void teardown(void *state, FILE *out)
{
	struct qmod *m = state;
	/* Drain: start any stopped queue so that its drain performs, then stop. */
	for (unsigned i = 0; i < NQUEUES; i++) {
		int rc = opq_queue_stop(m->q[i], OPQ_STOP_DRAIN);
		if (rc)
			stress_fail("queue", "final stop returned %d", rc);
	}
	for (unsigned i = 0; i < NQUEUES; i++) {
		opq_queue_stats st;
		opq_queue_stats_get(m->q[i], &st);
		struct qcount *c = &m->c[i];
		uint64_t performed = c->performed, discarded = c->discarded;
		uint64_t returned = c->eshutdown + c->eagain + c->etimedout + c->edeadlk;
		if (st.queued || st.running || st.runners)
			stress_fail("queue",
			            "queue %u stopped with %" PRIu64 " queued, %" PRIu64
			            " running, %" PRIu64 " runners",
			            i, st.queued, st.running, st.runners);
		if (c->attempts != c->accepted + returned)
			stress_fail("queue",
			            "queue %u: %" PRIu64 " enqueue calls, %" PRIu64
			            " accepted + %" PRIu64 " returned",
			            i, (uint64_t)c->attempts, (uint64_t)c->accepted, returned);
		if (c->accepted != performed + discarded)
			stress_fail("queue",
			            "queue %u: %" PRIu64 " accepted but %" PRIu64
			            " performed + %" PRIu64 " discarded: lost or duplicated",
			            i, (uint64_t)c->accepted, performed, discarded);
		if (st.completed != performed || st.discarded != discarded ||
		    st.cancelled != c->cancelled)
			stress_fail("queue",
			            "queue %u statistics (%" PRIu64 " completed, %" PRIu64
			            " discarded, %" PRIu64 " cancelled) differ from the "
			            "callbacks' counts (%" PRIu64 ", %" PRIu64 ", %" PRIu64 ")",
			            i, st.completed, st.discarded, st.cancelled, performed,
			            discarded, (uint64_t)c->cancelled);
		fprintf(
		    out,
		    "queue %u: %" PRIu64 " enqueue calls: %" PRIu64 " performed, %" PRIu64
		    " discarded (%" PRIu64 " by cancel), returned %" PRIu64 " ESHUTDOWN, %" PRIu64
		    " EAGAIN, %" PRIu64 " ETIMEDOUT, %" PRIu64 " EDEADLK; %" PRIu64
		    " stops, %" PRIu64 " starts, %" PRIu64 " resizes, %" PRIu64
		    " wait_idle, %" PRIu64 " self-waits; high water %" PRIu64 "\n",
		    i, (uint64_t)c->attempts, performed, discarded, (uint64_t)c->cancelled,
		    (uint64_t)c->eshutdown, (uint64_t)c->eagain, (uint64_t)c->etimedout,
		    (uint64_t)c->edeadlk, (uint64_t)c->stops, (uint64_t)c->starts,
		    (uint64_t)c->resizes, (uint64_t)c->idles, (uint64_t)c->inside, st.high_water);
	}
	size_t n = (size_t)m->threads * WORKER_SLOTS;
	for (size_t i = 0; i < n + CHILD_SLOTS; i++) {
		struct slot *s = i < n ? &m->wslots[i] : &m->cslots[i - n];
		if (atomic_load(&s->state) != FREE) {
			stress_fail("queue", "operation %p never performed, discarded or returned",
			            (void *)s);
			break;
		}
	}
	for (unsigned i = 0; i < NQUEUES; i++)
		if (opq_queue_destroy(m->q[i]))
			stress_fail("queue", "destroy of a stopped queue failed");
	free(m->wslots);
	free(m->cslots);
	free(m);
}

static uint64_t calls(void *state)
{
	return atomic_load_explicit(&((struct qmod *)state)->calls, memory_order_relaxed);
}

const struct stress_module stress_queue = {
    .name = "queue",
    .setup = setup,
    .step = step,
    .check = check,
    .teardown = teardown,
    .calls = calls,
};
