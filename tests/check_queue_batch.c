/*
 * check_queue_batch.c: the queue's fast paths. Runners take batches of
 * operations; an operation in a batch that has not started can still be
 * cancelled, discarded by a stop, or taken over by an idle runner, and is
 * performed or discarded exactly once. Unbounded enqueues go through a
 * lock-free inbox and keep each producer's FIFO order. Function-pointer
 * boxes are reused. Links the convenience library for the allocation
 * counter.
 */
#define _GNU_SOURCE 1 /* sched_getcpu, CPU_* */
#include "harness.h"
#include "internal.h"

#include <limits.h>
#include <string.h>

struct bop {
	opq_op op;
	atomic_int performed;
	atomic_int discarded;
	struct t_gate *hold;   /* perform waits on it, when set */
	atomic_int *started;   /* set when perform begins */
	long producer, seq;    /* for the order check */
	long *last_seq;	       /* per producer: the last seq performed */
	atomic_int *disorder;  /* counts order violations */
};

static void bop_perform(opq_op *op)
{
	struct bop *b = OPQ_CONTAINER_OF(op, struct bop, op);
	if (b->started)
		atomic_store(b->started, 1);
	if (b->hold)
		ck_assert(t_gate_wait(b->hold));
	if (b->last_seq) {
		if (b->last_seq[b->producer] >= b->seq)
			atomic_fetch_add(b->disorder, 1);
		b->last_seq[b->producer] = b->seq;
	}
	atomic_fetch_add(&b->performed, 1);
}

static void bop_discard(opq_op *op)
{
	struct bop *b = OPQ_CONTAINER_OF(op, struct bop, op);
	atomic_fetch_add(&b->discarded, 1);
}

static void bop_init(struct bop *b)
{
	memset(b, 0, sizeof(*b));
	ck_assert_int_eq(opq_op_init(&b->op, bop_perform, bop_discard), 0);
}

static opq_queue_stats stats_of(opq_queue *q)
{
	opq_queue_stats st;
	ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
	return st;
}

/* Open `hold`, stop q draining, and check that b[0..n-1] were each performed once. */
static void release_and_drain(opq_queue *q, struct t_gate *hold, struct bop *b, long n)
{
	t_gate_open(hold);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	for (long i = 0; i < n; i++) {
		ck_assert_int_eq(b[i].performed, 1);
		ck_assert_int_eq(b[i].discarded, 0);
	}
}

/*
 * A queue holding b[0..3], queued before start, with `runners` runners: the
 * first to run, b[0], blocks on `hold` (opened by the caller); returns once
 * it has started.
 */
static opq_queue *held_queue(struct bop b[4], struct t_gate *hold, atomic_int *started,
			     unsigned runners)
{
	opq_queue *q;
	t_gate_init(hold);
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	for (int i = 0; i < 4; i++) {
		bop_init(&b[i]);
		ck_assert_int_eq(opq_queue_enqueue(q, &b[i].op), 0);
	}
	b[0].hold = hold;
	b[0].started = started;
	ck_assert_int_eq(opq_queue_start(q, runners), 0);
	T_WAIT_UNTIL(atomic_load(started));
	return q;
}

/*
 * Queued before start, the four operations reach the single runner as one
 * batch: the first blocks, and the others wait in the runner's slots.
 */
START_TEST(test_cancel_in_batch)
{
	struct t_gate hold;
	atomic_int started = 0;
	struct bop b[4];
	opq_queue *q = held_queue(b, &hold, &started, 1);
	/* The batch's pending operations still count as queued. */
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.queued, 3);
	ck_assert_uint_eq(st.running, 1);
	ck_assert_int_eq(opq_queue_cancel(q, &b[0].op), EBUSY); /* running */
	ck_assert_int_eq(opq_queue_enqueue(q, &b[2].op), EBUSY); /* queued already */
	ck_assert_int_eq(opq_queue_cancel(q, &b[2].op), 0);
	ck_assert_int_eq(b[2].discarded, 1);
	ck_assert_int_eq(opq_queue_cancel(q, &b[2].op), EBUSY); /* twice */
	st = stats_of(q);
	ck_assert_uint_eq(st.queued, 2);
	ck_assert_uint_eq(st.cancelled, 1);
	t_gate_open(&hold);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(b[0].performed + b[1].performed + b[3].performed, 3);
	ck_assert_int_eq(b[2].performed, 0);
	ck_assert_int_eq(opq_queue_cancel(q, &b[3].op), EBUSY); /* done */
	st = stats_of(q);
	ck_assert_uint_eq(st.completed, 3);
	ck_assert_uint_eq(st.queued + st.running, 0);
	/* A cancelled operation can be enqueued again. */
	ck_assert_int_eq(opq_queue_enqueue(q, &b[2].op), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(b[2].performed, 1);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	t_gate_destroy(&hold);
}
END_TEST

/*
 * Two runners, four operations queued before start: the runner that gets
 * the blocking one also holds the next in its batch; the other runner,
 * done with its own, takes that one over instead of leaving it behind.
 */
START_TEST(test_idle_runner_takes_over)
{
	for (int round = 0; round < 20; round++) {
		struct t_gate hold;
		atomic_int started = 0;
		struct bop b[4];
		opq_queue *q = held_queue(b, &hold, &started, 2);
		/* Everything but the blocked one runs while it blocks. */
		T_WAIT_UNTIL(b[1].performed + b[2].performed + b[3].performed == 3);
		ck_assert_int_eq(b[0].performed, 0);
		release_and_drain(q, &hold, b, 4);
		ck_assert_uint_eq(stats_of(q).completed, 4);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		t_gate_destroy(&hold);
	}
}
END_TEST

/*
 * A long batch, held in its middle: one runner takes all LONG_N operations
 * queued before start as one batch (LONG_N is at most OPQ__BATCH_MAX) and
 * blocks on the one at LONG_HELD; a runner added then takes over every
 * operation after it, in order (it looks from where the holder is), and none
 * twice.
 */
#define LONG_N (OPQ__BATCH_MAX < 600 ? OPQ__BATCH_MAX : 600)
#define LONG_HELD (LONG_N / 2)
START_TEST(test_idle_runner_takes_over_long_batch)
{
	for (int round = 0; round < 5; round++) {
		struct t_gate hold;
		atomic_int started = 0, disorder = 0;
		long last_seq = -1;
		struct bop *b = calloc(LONG_N, sizeof(*b));
		opq_queue *q;
		ck_assert_ptr_nonnull(b);
		t_gate_init(&hold);
		ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
		for (long i = 0; i < LONG_N; i++) {
			bop_init(&b[i]);
			b[i].seq = i;
			if (i != LONG_HELD) {
				b[i].last_seq = &last_seq;
				b[i].disorder = &disorder;
			}
			ck_assert_int_eq(opq_queue_enqueue(q, &b[i].op), 0);
		}
		b[LONG_HELD].hold = &hold;
		b[LONG_HELD].started = &started;
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		T_WAIT_UNTIL(atomic_load(&started));
		ck_assert_int_eq(opq_queue_set_runners(q, 2), 0);
		for (long i = LONG_HELD + 1; i < LONG_N; i++)
			T_WAIT_UNTIL(atomic_load(&b[i].performed));
		ck_assert_int_eq(b[LONG_HELD].performed, 0);
		release_and_drain(q, &hold, b, LONG_N);
		ck_assert_int_eq(atomic_load(&disorder), 0);
		ck_assert_uint_eq(stats_of(q).completed, LONG_N);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		t_gate_destroy(&hold);
		free(b);
	}
}
END_TEST

/*
 * A runner blocked in an operation does not hold back the rest of its batch
 * until the FIFO runs dry: with STUCK_FILL operations behind them in the
 * FIFO, a runner added later takes over the STUCK_N - 1 waiting behind the
 * blocked one first, in order, each once (checked by how many of the FIFO's
 * operations had run when each of them ran).
 */
#define STUCK_N (OPQ__BATCH_MAX < 600 ? OPQ__BATCH_MAX : 600)
#define STUCK_FILL 100000
static atomic_long fill_done;
static long fill_at[STUCK_N]; /* per operation: the FIFO's operations done when it ran */

static void fill_fn(void *arg)
{
	(void)arg;
	atomic_fetch_add(&fill_done, 1);
}

static void stuck_perform(opq_op *op)
{
	struct bop *b = OPQ_CONTAINER_OF(op, struct bop, op);
	fill_at[b->seq] = atomic_load(&fill_done);
	bop_perform(op);
}

START_TEST(test_blocked_runner_batch_taken_over_first)
{
	struct t_gate hold;
	atomic_int started = 0, disorder = 0;
	long last_seq = -1;
	struct bop *b = calloc(STUCK_N, sizeof(*b));
	opq_queue *q;
	ck_assert_ptr_nonnull(b);
	atomic_store(&fill_done, 0);
	t_gate_init(&hold);
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	for (long i = 0; i < STUCK_N; i++) {
		bop_init(&b[i]);
		b[i].op.perform = stuck_perform;
		b[i].seq = i;
		if (i > 0) { /* the order check: all but the blocked one */
			b[i].last_seq = &last_seq;
			b[i].disorder = &disorder;
		}
		ck_assert_int_eq(opq_queue_enqueue(q, &b[i].op), 0);
	}
	b[0].hold = &hold;
	b[0].started = &started;
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	T_WAIT_UNTIL(atomic_load(&started));
	for (long i = 0; i < STUCK_FILL; i++)
		ck_assert_int_eq(opq_queue_enqueue_fn(q, fill_fn, NULL, NULL), 0);
	ck_assert_int_eq(opq_queue_set_runners(q, 2), 0);
	for (long i = 1; i < STUCK_N; i++)
		T_WAIT_UNTIL(atomic_load(&b[i].performed));
	ck_assert_int_eq(b[0].performed, 0);
	for (long i = 1; i < STUCK_N; i++)
		ck_assert_msg(fill_at[i] < STUCK_FILL / 2,
			      "operation %ld waited for %ld of the FIFO's operations", i, fill_at[i]);
	release_and_drain(q, &hold, b, STUCK_N);
	ck_assert_int_eq(atomic_load(&disorder), 0);
	ck_assert_int_eq(atomic_load(&fill_done), STUCK_FILL);
	ck_assert_uint_eq(stats_of(q).completed, STUCK_N + STUCK_FILL);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	t_gate_destroy(&hold);
	free(b);
}
END_TEST

/*
 * Stepping aside. The start hook pins each runner to one CPU, aside_cpu.
 * `blocked` runners each take AS_N operations as a batch and are stuck in
 * the first, the rest waiting in their slots, on that CPU: spinning (runnable,
 * waiting for the CPU while another runs there) or asleep. One more runner
 * starts there too, but its hook then gives it back every CPU of the process
 * (it stays where it runs), and it performs operations from the FIFO. At a
 * batch it finds a runner stuck on its own CPU: if that one spins and there
 * are no more runners than CPUs, it steps aside onto another CPU, with its
 * mask whole again; next to a runner asleep, or with more runners than CPUs,
 * it never does. Either way it takes over the operations waiting behind the
 * stuck ones. The test's thread blocks meanwhile, so that nothing else makes
 * the kernel move that runner.
 */
#define AS_N 64
#define AS_FILL 4000
static int aside_cpu;
static cpu_set_t aside_all;
static unsigned aside_blocked;
static bool aside_spin;
static atomic_int aside_pin_failed, aside_bad_mask, aside_off_cpu, aside_release;
static struct t_gate aside_filled, aside_hold;

/* The first operation of a stuck runner's batch. */
static void aside_stuck_perform(opq_op *op)
{
	struct bop *b = OPQ_CONTAINER_OF(op, struct bop, op);
	atomic_store(b->started, 1);
	if (aside_spin) {
		int64_t end = t_now_ns() + T_WAIT_NS;
		while (!atomic_load(&aside_release) && t_now_ns() < end)
			;
	} else {
		t_gate_wait(&aside_hold);
	}
	atomic_fetch_add(&b->performed, 1);
}

static void aside_pin(void *arg, unsigned index)
{
	(void)arg;
	cpu_set_t one;
	CPU_ZERO(&one);
	CPU_SET(aside_cpu, &one);
	if (sched_setaffinity(0, sizeof(one), &one) ||
	    (index >= aside_blocked && sched_setaffinity(0, sizeof(aside_all), &aside_all)))
		atomic_fetch_add(&aside_pin_failed, 1);
}

static void aside_fill(void *arg)
{
	(void)arg;
	cpu_set_t now;
	if (sched_getaffinity(0, sizeof(now), &now) || !CPU_EQUAL(&now, &aside_all))
		atomic_fetch_add(&aside_bad_mask, 1);
	if (sched_getcpu() != aside_cpu)
		atomic_store(&aside_off_cpu, 1);
	if (atomic_fetch_add(&fill_done, 1) + 1 == AS_FILL)
		t_gate_open(&aside_filled);
}

/* Run the scenario above; returns the queue's statistics after the stop. */
static opq_queue_stats aside_run(unsigned blocked, bool spin)
{
	long n = (long)blocked * AS_N;
	struct bop *b = calloc((size_t)n, sizeof(*b));
	atomic_int *started = calloc(blocked, sizeof(*started));
	opq_queue *q;
	opq_queue_attr *a;
	ck_assert_ptr_nonnull(b);
	ck_assert_ptr_nonnull(started);
	ck_assert_int_eq(sched_getaffinity(0, sizeof(aside_all), &aside_all), 0);
	for (aside_cpu = 0; !CPU_ISSET(aside_cpu, &aside_all); aside_cpu++)
		;
	aside_blocked = blocked;
	aside_spin = spin;
	atomic_store(&aside_release, 0);
	atomic_store(&aside_pin_failed, 0);
	atomic_store(&aside_bad_mask, 0);
	atomic_store(&aside_off_cpu, 0);
	atomic_store(&fill_done, 0);
	t_gate_init(&aside_hold);
	t_gate_init(&aside_filled);
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_hooks(a, aside_pin, NULL, NULL), 0);
	ck_assert_int_eq(opq_queue_create(&q, a), 0);
	opq_queue_attr_destroy(a);
	for (unsigned k = 0; k < blocked; k++) {
		for (long i = k * AS_N; i < (k + 1) * AS_N; i++) {
			bop_init(&b[i]);
			if (i == k * AS_N) {
				b[i].op.perform = aside_stuck_perform;
				b[i].started = &started[k];
			}
			ck_assert_int_eq(opq_queue_enqueue(q, &b[i].op), 0);
		}
		if (k == 0)
			ck_assert_int_eq(opq_queue_start(q, 1), 0);
		else
			ck_assert_int_eq(opq_queue_set_runners(q, k + 1), 0);
		T_WAIT_UNTIL(atomic_load(&started[k]));
	}
	for (int i = 0; i < AS_FILL; i++)
		ck_assert_int_eq(opq_queue_enqueue_fn(q, aside_fill, NULL, NULL), 0);
	ck_assert_int_eq(opq_queue_set_runners(q, blocked + 1), 0);
	ck_assert(t_gate_wait(&aside_filled));
	for (long i = 0; i < n; i++) {
		if (i % AS_N)
			T_WAIT_UNTIL(atomic_load(&b[i].performed));
		else
			ck_assert_int_eq(b[i].performed, 0);
	}
	atomic_store(&aside_release, 1);
	release_and_drain(q, &aside_hold, b, n);
	int pin_failed = atomic_load(&aside_pin_failed), bad_mask = atomic_load(&aside_bad_mask);
	ck_assert_int_eq(pin_failed, 0);
	ck_assert_msg(bad_mask == 0, "%d operations ran with a CPU mask other than the process's",
		      bad_mask);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.completed, (uint64_t)n + AS_FILL);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	t_gate_destroy(&aside_hold);
	t_gate_destroy(&aside_filled);
	free(started);
	free(b);
	return st;
}

/*
 * Under valgrind one thread runs at a time, the others asleep, and a
 * spinning runner crowds out the rest: the scenarios with spinning runners
 * check nothing there (tests/valgrind.sh sets OPQ_TEST_VALGRIND).
 */
static bool aside_skip_valgrind(const char *test)
{
	if (!getenv("OPQ_TEST_VALGRIND"))
		return false;
	printf("%s: under valgrind, nothing to check\n", test);
	return true;
}

START_TEST(test_runner_steps_aside_off_a_shared_cpu)
{
	cpu_set_t mine;
	ck_assert_int_eq(sched_getaffinity(0, sizeof(mine), &mine), 0);
	if (CPU_COUNT(&mine) < 2) {
		printf("test_runner_steps_aside_off_a_shared_cpu: one CPU, nothing to check\n");
		return;
	}
	if (aside_skip_valgrind("test_runner_steps_aside_off_a_shared_cpu"))
		return;
	/* The kernel may move the second runner first (say, when it wakes the
	 * test's thread on that CPU): then the scenario is tried again. */
	opq_queue_stats st;
	for (int attempt = 0; attempt < 5; attempt++) {
		st = aside_run(1, true);
		if (st.asides)
			break;
	}
	ck_assert_uint_ge(st.asides, 1);
	int off_cpu = atomic_load(&aside_off_cpu);
	ck_assert_msg(off_cpu, "the second runner never left the first one's CPU");
}
END_TEST

START_TEST(test_no_aside_with_more_runners_than_cpus)
{
	if (aside_skip_valgrind("test_no_aside_with_more_runners_than_cpus"))
		return;
	cpu_set_t mine;
	ck_assert_int_eq(sched_getaffinity(0, sizeof(mine), &mine), 0);
	opq_queue_stats st = aside_run((unsigned)CPU_COUNT(&mine), true);
	ck_assert_uint_eq(st.asides, 0);
}
END_TEST

START_TEST(test_no_aside_for_a_runner_asleep)
{
	opq_queue_stats st = aside_run(1, false);
	ck_assert_uint_eq(st.asides, 0);
}
END_TEST

struct stopper {
	opq_queue *q;
	int rc;
};

/*
 * A bounded queue counts every operation accepted and not started: queued
 * before start into a queue of capacity 4, the four are not taken as a
 * batch (which would free the capacity while three still wait), so with
 * the first one running only one more place is free.
 */
START_TEST(test_bounded_counts_unstarted)
{
	for (int iter = 0; iter < 20; iter++) {
		opq_queue *q;
		opq_queue_attr *attr;
		struct t_gate hold;
		atomic_int started = 0;
		struct bop b[6];
		t_gate_init(&hold);
		ck_assert_int_eq(opq_queue_attr_create(&attr), 0);
		ck_assert_int_eq(opq_queue_attr_set_capacity(attr, 4), 0);
		ck_assert_int_eq(opq_queue_create(&q, attr), 0);
		opq_queue_attr_destroy(attr);
		for (int i = 0; i < 6; i++)
			bop_init(&b[i]);
		b[0].hold = &hold;
		b[0].started = &started;
		for (int i = 0; i < 4; i++)
			ck_assert_int_eq(opq_queue_enqueue(q, &b[i].op), 0);
		ck_assert_int_eq(opq_queue_tryenqueue(q, &b[4].op), EAGAIN);
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		T_WAIT_UNTIL(atomic_load(&started));
		ck_assert_int_eq(stats_of(q).queued, 3);
		ck_assert_int_eq(opq_queue_tryenqueue(q, &b[4].op), 0);
		ck_assert_int_eq(opq_queue_tryenqueue(q, &b[5].op), EAGAIN);
		t_gate_open(&hold);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		for (int i = 0; i < 5; i++)
			ck_assert_int_eq(atomic_load(&b[i].performed), 1);
		ck_assert_int_eq(atomic_load(&b[5].performed), 0);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
}
END_TEST

/*
 * An operation on a runner enqueues two and waits (keeping its runner) until
 * both have started; they wait for each other too. The runner that takes the first
 * must wake another for the second even when the producer saw it spinning
 * and woke nobody; else the second waits in the FIFO with every other
 * runner asleep (it did, before that wake was added).
 */
struct pair {
	opq_queue *q;
	atomic_int started;
	atomic_int done;
};

static void pair_child(void *arg)
{
	struct pair *p = arg;
	atomic_fetch_add(&p->started, 1);
	T_WAIT_UNTIL(atomic_load(&p->started) == 2);
}

static void pair_parent(void *arg)
{
	struct pair *p = arg;
	ck_assert_int_eq(opq_queue_enqueue_fn(p->q, pair_child, NULL, p), 0);
	ck_assert_int_eq(opq_queue_enqueue_fn(p->q, pair_child, NULL, p), 0);
	T_WAIT_UNTIL(atomic_load(&p->started) == 2); /* this runner stays busy */
	atomic_store(&p->done, 1);
}

START_TEST(test_work_left_behind_wakes_a_runner)
{
	for (long iter = 0; iter < t_scale(2000); iter++) {
		struct pair p = { 0 };
		ck_assert_int_eq(opq_queue_create(&p.q, NULL), 0);
		ck_assert_int_eq(opq_queue_start(p.q, 4), 0);
		ck_assert_int_eq(opq_queue_enqueue_fn(p.q, pair_parent, NULL, &p), 0);
		T_WAIT_UNTIL(atomic_load(&p.done));
		ck_assert_int_eq(opq_queue_stop(p.q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(atomic_load(&p.started), 2);
		ck_assert_int_eq(opq_queue_destroy(p.q), 0);
	}
}
END_TEST

static void *stop_discard(void *arg)
{
	struct stopper *s = arg;
	s->rc = opq_queue_stop(s->q, OPQ_STOP_DISCARD);
	return NULL;
}

/* A discarding stop discards the operations waiting in a runner's batch. */
START_TEST(test_stop_discards_batch)
{
	struct t_gate hold;
	atomic_int started = 0;
	struct bop b[4];
	opq_queue *q = held_queue(b, &hold, &started, 1);
	struct stopper s = { q, -1 };
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, stop_discard, &s), 0);
	T_WAIT_UNTIL(b[1].discarded + b[2].discarded + b[3].discarded == 3);
	t_gate_open(&hold);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_int_eq(s.rc, 0);
	ck_assert_int_eq(b[0].performed, 1);
	for (int i = 1; i < 4; i++)
		ck_assert_int_eq(b[i].performed, 0);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.completed, 1);
	ck_assert_uint_eq(st.discarded, 3);
	ck_assert_uint_eq(st.queued + st.running, 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &b[1].op), ESHUTDOWN);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	t_gate_destroy(&hold);
}
END_TEST

static void count_fn(void *arg)
{
	atomic_fetch_add((atomic_long *)arg, 1);
}

/* Function-pointer operations reuse their boxes: far fewer allocations than operations. */
START_TEST(test_fn_boxes_reused)
{
	opq_queue *q;
	atomic_long n = 0;
	const long ops = 2000;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	opq__fault_set(LONG_MAX); /* count, never fail */
	for (long i = 0; i < ops; i++) {
		ck_assert_int_eq(opq_queue_enqueue_fn(q, count_fn, NULL, &n), 0);
		if (i % 16 == 15) {
			struct timespec dl = t_deadline(T_WAIT_NS);
			ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
		}
	}
	long made = opq__fault_count();
	opq__fault_set(0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(atomic_load(&n), ops);
	ck_assert_msg(made <= ops / 8, "%ld allocations for %ld operations", made, ops);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/*
 * Slabs of boxes grow for a thread that carves them fast, and stay one chunk
 * for one that does not. The queue is not started, so every box is carved
 * (none comes back for reuse); each burst runs on a thread of its own, whose
 * slab sizes start afresh. Allocations are counted by the fault injector.
 */
struct carve {
	opq_queue *q;
	long ops;		/* enqueued in one go */
	int rounds;		/* bursts, with SLOW_GAP_NS between them */
	atomic_long *performed;
	long allocs;		/* result */
	int64_t burst_ns;	/* result: the longest burst */
	int rc;			/* result: the first failed enqueue's error, or 0 */
};

#define SLOW_GAP_NS 3000000	 /* longer than SLAB_GROW_NS per chunk */

static void *carve_thread(void *arg)
{
	struct carve *c = arg;
	opq__fault_set(LONG_MAX); /* count, never fail */
	for (int r = 0; r < c->rounds; r++) {
		if (r) {
			/* Time passing, not a wait for another thread. */
			struct timespec gap = { 0, SLOW_GAP_NS };
			nanosleep(&gap, NULL);
		}
		int64_t t0 = t_now_ns();
		for (long i = 0; i < c->ops && !c->rc; i++)
			c->rc = opq_queue_enqueue_fn(c->q, count_fn, NULL, c->performed);
		int64_t dt = t_now_ns() - t0;
		if (dt > c->burst_ns)
			c->burst_ns = dt;
	}
	c->allocs = opq__fault_count();
	opq__fault_set(0);
	return NULL;
}

static struct carve carve(long ops, int rounds)
{
	opq_queue *q;
	atomic_long performed = 0;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	struct carve c = { q, ops, rounds, &performed, 0, 0, 0 };
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, carve_thread, &c), 0);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_int_eq(c.rc, 0);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(atomic_load(&performed), ops * rounds);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	return c;
}

START_TEST(test_fn_slabs_grow_in_a_burst)
{
	/* 80 chunks' worth: one allocation per chunk without growth, 9 with
	 * it (1 + 2 + 4 + 8 chunks, then 16 five times, the last partly
	 * carved). A pause of 1 ms or more while a slab is carved starts the
	 * doubling again (about 4 more): at most half as many as chunks. */
	const long ops = 80 * (long)OPQ__CHUNK_BOXES;
	struct carve c = carve(ops, 1);
	/* Growth needs a chunk carved in under 1 ms; a burst at more than
	 * half that on average (a sanitizer build on a loaded machine)
	 * proves nothing. */
	if (c.burst_ns > 80 * 500000LL) {
		fprintf(stderr, "test_fn_slabs_grow_in_a_burst: burst took %lld ns, not checked\n",
			(long long)c.burst_ns);
		return;
	}
	ck_assert_msg(c.allocs <= 40, "%ld allocations for %ld boxes carved in %lld ns", c.allocs,
		      ops, (long long)c.burst_ns);
}
END_TEST

START_TEST(test_fn_slabs_stay_small_when_slow)
{
	/* Three chunks' worth, a chunk at a time with gaps: three slabs of
	 * one chunk. (Had the second grown, it would hold the third's boxes:
	 * two allocations.) */
	struct carve c = carve((long)OPQ__CHUNK_BOXES, 3);
	ck_assert_int_eq(c.allocs, 3);
}
END_TEST

/* ---- stress: producers, runners and a canceller at once -------------------- */

#define S_PRODUCERS 4

struct stress {
	opq_queue *q;
	struct bop *ops;
	long per;
	long producer;
	atomic_int *go;
	atomic_long *cancelled;
};

static void *stress_producer(void *arg)
{
	struct stress *s = arg;
	while (!atomic_load(s->go))
		sched_yield();
	for (long i = 0; i < s->per; i++) {
		struct bop *b = &s->ops[s->producer * s->per + i];
		ck_assert_int_eq(opq_queue_enqueue(s->q, &b->op), 0);
	}
	return NULL;
}

static void *stress_canceller(void *arg)
{
	struct stress *s = arg;
	long n = S_PRODUCERS * s->per;
	unsigned seed = 7;
	while (!atomic_load(s->go))
		sched_yield();
	for (long k = 0; k < n / 4; k++) {
		seed = seed * 1103515245u + 12345u;
		long i = (long)(seed >> 8) % n;
		if (opq_queue_cancel(s->q, &s->ops[i].op) == 0)
			atomic_fetch_add(s->cancelled, 1);
	}
	return NULL;
}

/*
 * One runner: each producer's operations are performed in its order, every
 * one exactly once. Several runners with a canceller: every operation is
 * performed or discarded, exactly once, and the statistics agree.
 */
START_TEST(test_stress_order_and_exactly_once)
{
	static const unsigned runners[] = { 1, 3 };
	for (int r = 0; r < 2; r++) {
		long per = t_scale(20000);
		long n = S_PRODUCERS * per;
		struct bop *ops = calloc((size_t)n, sizeof(*ops));
		long last_seq[S_PRODUCERS];
		atomic_int disorder = 0, go = 0;
		atomic_long cancelled = 0;
		ck_assert_ptr_nonnull(ops);
		for (long p = 0; p < S_PRODUCERS; p++)
			last_seq[p] = -1;
		for (long i = 0; i < n; i++) {
			bop_init(&ops[i]);
			ops[i].producer = i / per;
			ops[i].seq = i % per;
			if (runners[r] == 1) {
				ops[i].last_seq = last_seq;
				ops[i].disorder = &disorder;
			}
		}
		opq_queue *q;
		ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
		ck_assert_int_eq(opq_queue_start(q, runners[r]), 0);
		struct stress s[S_PRODUCERS + 1];
		pthread_t th[S_PRODUCERS + 1];
		int nth = runners[r] == 1 ? S_PRODUCERS : S_PRODUCERS + 1;
		for (int i = 0; i < nth; i++) {
			s[i] = (struct stress){ q, ops, per, i, &go, &cancelled };
			ck_assert_int_eq(pthread_create(&th[i], NULL,
							i < S_PRODUCERS ? stress_producer :
									  stress_canceller,
							&s[i]),
					 0);
		}
		atomic_store(&go, 1);
		for (int i = 0; i < nth; i++)
			ck_assert_int_eq(pthread_join(th[i], NULL), 0);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		long performed = 0, discarded = 0;
		for (long i = 0; i < n; i++) {
			ck_assert_int_eq(ops[i].performed + ops[i].discarded, 1);
			performed += ops[i].performed;
			discarded += ops[i].discarded;
		}
		opq_queue_stats st = stats_of(q);
		ck_assert_uint_eq(st.completed, (uint64_t)performed);
		ck_assert_uint_eq(st.cancelled, (uint64_t)atomic_load(&cancelled));
		ck_assert_int_eq(discarded, atomic_load(&cancelled));
		ck_assert_int_eq(atomic_load(&disorder), 0);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		free(ops);
	}
}
END_TEST

/*
 * A queue stopped and destroyed as soon as its operation has run, while the
 * thread that enqueued it may still be inside the enqueue call, after its
 * push: destroy waits until no producer's record names the queue. The
 * window in which a producer still reads the queue is a few instructions
 * wide, so this rarely lands in it (the argument for the wait is in
 * lib/queue.c, struct pusher); what it does check every round is that each
 * producer, a new thread, links its record and unlinks it when it exits
 * (with unlinking broken, records of exited threads corrupt the list and
 * this suite crashes).
 */
struct handoff {
	opq_op op;
	opq_queue *q;
	struct t_gate ran;
};

static void handoff_perform(opq_op *op)
{
	t_gate_open(&OPQ_CONTAINER_OF(op, struct handoff, op)->ran);
}

static void *handoff_producer(void *arg)
{
	struct handoff *h = arg;
	return (void *)(intptr_t)opq_queue_enqueue(h->q, &h->op);
}

START_TEST(test_destroy_while_producer_returns)
{
	long rounds = t_scale(2000);
	for (long i = 0; i < rounds; i++) {
		struct handoff h;
		memset(&h, 0, sizeof(h));
		t_gate_init(&h.ran);
		ck_assert_int_eq(opq_op_init(&h.op, handoff_perform, NULL), 0);
		ck_assert_int_eq(opq_queue_create(&h.q, NULL), 0);
		ck_assert_int_eq(opq_queue_start(h.q, 1), 0);
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, handoff_producer, &h), 0);
		ck_assert(t_gate_wait(&h.ran));
		ck_assert_int_eq(opq_queue_stop(h.q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(opq_queue_destroy(h.q), 0);
		void *rc;
		ck_assert_int_eq(pthread_join(th, &rc), 0);
		ck_assert_int_eq((int)(intptr_t)rc, 0);
		t_gate_destroy(&h.ran);
	}
}
END_TEST

#if !OPQ_TEST_TSAN /* see main() */
/*
 * A thread-exit helper that enqueues from a key destructor and re-arms its
 * key on every destructor round. The library's own destructor (its key is
 * older, so it runs first in each round) unlinks the thread's producer
 * record; the helper's later enqueues must not link it again: it would
 * outlive the thread, the next thread given the same stack would link its
 * own record into a loop, and every destroy would then scan forever. The
 * exiting thread's enqueues take the locked path instead, and all are
 * performed.
 */
static opq_queue *rearm_q;
static pthread_key_t rearm_key;
static atomic_int rearm_enqueued;

static void rearm_nop(void *arg)
{
	(void)arg;
}

static void rearm_dtor(void *v)
{
	(void)v;
	if (opq_queue_enqueue_fn(rearm_q, rearm_nop, NULL, NULL) == 0)
		atomic_fetch_add(&rearm_enqueued, 1);
	pthread_setspecific(rearm_key, (void *)1);
}

static void *rearm_thread(void *arg)
{
	(void)arg;
	pthread_setspecific(rearm_key, (void *)1);
	return NULL;
}

static void *enqueue_once_thread(void *arg)
{
	(void)arg;
	return (void *)(intptr_t)opq_queue_enqueue_fn(rearm_q, rearm_nop, NULL, NULL);
}

START_TEST(test_enqueue_from_key_destructor)
{
	const int rounds = 20;
	ck_assert_int_eq(opq_queue_create(&rearm_q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(rearm_q, 1), 0);
	/* The library's keys first, so that the helper's destructor runs after them. */
	ck_assert_int_eq(opq_queue_enqueue_fn(rearm_q, rearm_nop, NULL, NULL), 0);
	ck_assert_int_eq(pthread_key_create(&rearm_key, rearm_dtor), 0);
	for (int i = 0; i < rounds; i++) {
		pthread_t th;
		void *rc;
		ck_assert_int_eq(pthread_create(&th, NULL, rearm_thread, NULL), 0);
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_int_eq(pthread_create(&th, NULL, enqueue_once_thread, NULL), 0);
		ck_assert_int_eq(pthread_join(th, &rc), 0);
		ck_assert_int_eq((int)(intptr_t)rc, 0);
		opq_queue *q2;
		ck_assert_int_eq(opq_queue_create(&q2, NULL), 0);
		ck_assert_int_eq(opq_queue_destroy(q2), 0); /* scans every record */
	}
	ck_assert_int_eq(opq_queue_stop(rearm_q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_gt(atomic_load(&rearm_enqueued), rounds); /* several per exit */
	opq_queue_stats st = stats_of(rearm_q);
	ck_assert_uint_eq(st.completed, (uint64_t)(1 + rounds + atomic_load(&rearm_enqueued)));
	ck_assert_int_eq(opq_queue_destroy(rearm_q), 0);
	pthread_key_delete(rearm_key);
}
END_TEST
#endif

int main(void)
{
	Suite *s = suite_create("queue_batch");
	TCase *tc = t_tcase(s, "batch", 60);
	tcase_add_test(tc, test_cancel_in_batch);
	tcase_add_test(tc, test_idle_runner_takes_over);
	tcase_add_test(tc, test_idle_runner_takes_over_long_batch);
	tcase_add_test(tc, test_blocked_runner_batch_taken_over_first);
	tcase_add_test(tc, test_runner_steps_aside_off_a_shared_cpu);
	tcase_add_test(tc, test_no_aside_with_more_runners_than_cpus);
	tcase_add_test(tc, test_no_aside_for_a_runner_asleep);
	tcase_add_test(tc, test_stop_discards_batch);
	tcase_add_test(tc, test_bounded_counts_unstarted);
	tcase_add_test(tc, test_work_left_behind_wakes_a_runner);
	tcase_add_test(tc, test_fn_boxes_reused);
	tcase_add_test(tc, test_fn_slabs_grow_in_a_burst);
	tcase_add_test(tc, test_fn_slabs_stay_small_when_slow);
#if !OPQ_TEST_TSAN
	/* ThreadSanitizer finishes a thread in the last destructor round, before
	 * the destructors of later keys: instrumented code run there (this
	 * test's helper enqueues in every round) crashes inside its runtime. */
	tcase_add_test(tc, test_enqueue_from_key_destructor);
#endif
	tc = t_tcase(s, "stress", 300);
	tcase_add_test(tc, test_destroy_while_producer_returns);
	tcase_add_test(tc, test_stress_order_and_exactly_once);
	return t_run(s);
}
