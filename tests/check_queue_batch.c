/*
 * check_queue_batch.c: runners take batches of operations; an operation in
 * a batch that has not started can still be cancelled, discarded by a stop,
 * or taken over by an idle runner, and is performed or discarded exactly
 * once, in each producer's FIFO order. A function-pointer operation
 * allocates at most one box (boxes are reused), a caller-boxed one nothing.
 * Links the convenience library for the allocation counter and the batch
 * size.
 */
#include "harness.h"
#include "queue_impl.h"

#include <limits.h>
#include <string.h>

struct bop {
	opq_op op;
	atomic_int performed;
	atomic_int discarded;
	struct t_gate *hold;  /* perform waits on it, when set */
	atomic_int *started;  /* set when perform begins */
	long producer, seq;   /* for the order check */
	long *last_seq;       /* per producer: the last seq performed */
	atomic_int *disorder; /* counts order violations */
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
 * batch: the first blocks, and the others wait in the runner's batch.
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
	ck_assert_int_eq(opq_queue_cancel(q, &b[0].op), EBUSY);  /* running */
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
 * queued before start as one batch (LONG_N is at most BATCH_MAX) and
 * blocks on the one at LONG_HELD; a runner added then takes over every
 * operation after it, in order (it looks from where the holder is), and none
 * twice.
 */
#define LONG_N    (BATCH_MAX < 600 ? BATCH_MAX : 600)
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
		struct pair p = {0};
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
	struct stopper s = {q, -1};
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

/* Boxes of function-pointer operations are reused: far fewer allocations than operations. */
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
 * Allocations: a function-pointer operation allocates at most its box (the
 * leak checkers see that every box is freed), and a caller-boxed operation
 * allocates nothing, in an unbounded and in a bounded queue.
 */

START_TEST(test_allocations_per_operation)
{
	for (size_t capacity = 0; capacity <= 64; capacity += 64) {
		opq_queue_attr *a;
		opq_queue *q;
		atomic_long n = 0;
		const long ops = 2000;
		struct bop *b = calloc((size_t)ops, sizeof(*b));
		ck_assert_ptr_nonnull(b);
		ck_assert_int_eq(opq_queue_attr_create(&a), 0);
		ck_assert_int_eq(opq_queue_attr_set_capacity(a, capacity), 0);
		ck_assert_int_eq(opq_queue_create(&q, a), 0);
		opq_queue_attr_destroy(a);
		ck_assert_int_eq(opq_queue_start(q, 2), 0);
		opq__fault_set(LONG_MAX); /* count, never fail */
		for (long i = 0; i < ops; i++)
			ck_assert_int_eq(opq_queue_enqueue_fn(q, count_fn, NULL, &n), 0);
		long made = opq__fault_count();
		opq__fault_set(LONG_MAX);
		for (long i = 0; i < ops; i++) {
			bop_init(&b[i]);
			ck_assert_int_eq(opq_queue_enqueue(q, &b[i].op), 0);
		}
		long made_intrusive = opq__fault_count();
		opq__fault_set(0);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(atomic_load(&n), ops);
		for (long i = 0; i < ops; i++)
			ck_assert_int_eq(b[i].performed, 1);
		ck_assert_int_le(made, ops);
		ck_assert_int_eq(made_intrusive, 0);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		free(b);
	}
}
END_TEST

/*
 * Statistics are exact at every snapshot, sampled while two producers feed
 * two runners: running never exceeds the runners; every operation whose
 * perform had returned before the snapshot is counted completed, or still
 * running on its runner's way back; completed never counts one that has not
 * returned; and completed + running + queued + discarded equals the
 * operations accepted (each producer counts an operation before its enqueue
 * call, so at most one per producer is counted and not yet accepted).
 */
#define SX_PRODUCERS 2
#define SX_RUNNERS   2
static atomic_long sx_offered, sx_returned;
static atomic_int sx_finished;

/* A little work, so that the producers outrun the runners and batches fill. */
static void sx_fn(void *arg)
{
	(void)arg;
	for (volatile int i = 0; i < 200; i++)
		;
	atomic_fetch_add(&sx_returned, 1);
}

static void *sx_producer(void *arg)
{
	opq_queue *q = arg;
	long n = t_scale(200000);
	for (long i = 0; i < n; i++) {
		atomic_fetch_add(&sx_offered, 1);
		if (opq_queue_enqueue_fn(q, sx_fn, NULL, NULL) != 0)
			break;
	}
	atomic_fetch_add(&sx_finished, 1);
	return NULL;
}

START_TEST(test_stats_exact_under_load)
{
	opq_queue *q;
	pthread_t th[SX_PRODUCERS];
	atomic_store(&sx_offered, 0);
	atomic_store(&sx_returned, 0);
	atomic_store(&sx_finished, 0);
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, SX_RUNNERS), 0);
	for (int i = 0; i < SX_PRODUCERS; i++)
		ck_assert_int_eq(pthread_create(&th[i], NULL, sx_producer, q), 0);
	long samples = 0;
	while (atomic_load(&sx_finished) < SX_PRODUCERS) {
		long offered_before = atomic_load(&sx_offered);
		long returned_before = atomic_load(&sx_returned);
		opq_queue_stats st = stats_of(q);
		long offered_after = atomic_load(&sx_offered);
		long returned_after = atomic_load(&sx_returned);
		uint64_t sum = st.completed + st.running + st.queued + st.discarded;
		ck_assert_uint_le(st.running, SX_RUNNERS);
		ck_assert_uint_eq(st.runners, SX_RUNNERS);
		ck_assert_uint_ge(st.completed + st.running, (uint64_t)returned_before);
		ck_assert_uint_le(st.completed, (uint64_t)returned_after);
		ck_assert_uint_le(sum, (uint64_t)offered_after);
		ck_assert_uint_ge(sum + SX_PRODUCERS, (uint64_t)offered_before);
		ck_assert_uint_eq(st.discarded, 0);
		samples++;
	}
	for (int i = 0; i < SX_PRODUCERS; i++)
		ck_assert_int_eq(pthread_join(th[i], NULL), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.completed, (uint64_t)(2 * t_scale(200000)));
	ck_assert_uint_eq(st.completed, (uint64_t)atomic_load(&sx_offered));
	ck_assert_uint_eq(st.running + st.queued, 0);
	ck_assert_int_gt(samples, 10);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
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
	static const unsigned runners[] = {1, 3};
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
			s[i] = (struct stress){q, ops, per, i, &go, &cancelled};
			ck_assert_int_eq(
			    pthread_create(&th[i], NULL,
			                   i < S_PRODUCERS ? stress_producer : stress_canceller,
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

int main(void)
{
	Suite *s = suite_create("queue_batch");
	TCase *tc = t_tcase(s, "batch", 60);
	tcase_add_test(tc, test_cancel_in_batch);
	tcase_add_test(tc, test_idle_runner_takes_over);
	tcase_add_test(tc, test_idle_runner_takes_over_long_batch);
	tcase_add_test(tc, test_stop_discards_batch);
	tcase_add_test(tc, test_bounded_counts_unstarted);
	tcase_add_test(tc, test_work_left_behind_wakes_a_runner);
	tcase_add_test(tc, test_fn_boxes_reused);
	tcase_add_test(tc, test_allocations_per_operation);
	tc = t_tcase(s, "stress", 300);
	tcase_add_test(tc, test_stress_order_and_exactly_once);
	tcase_add_test(tc, test_stats_exact_under_load);
	return t_run(s);
}
