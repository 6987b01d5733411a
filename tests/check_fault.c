/*
 * check_fault.c: allocation failure. Each public call that allocates is run
 * with its 1st, 2nd, ... Nth allocation failing in turn: it must return
 * ENOMEM, leak nothing (the ASan build's LeakSanitizer checks), and leave
 * the queue usable. Links the convenience library to reach the hidden
 * opq__fault_set() hook.
 */
#include "harness.h"
#include "fault.h"
#include "internal.h"

static void inc(void *arg)
{
	atomic_fetch_add((atomic_long *)arg, 1);
}

START_TEST(test_attr_and_create)
{
	opq_queue_attr *a = NULL;
	SWEEP(opq_queue_attr_create(&a), ck_assert_ptr_null(a));
	opq_queue *q = NULL;
	SWEEP(opq_queue_create(&q, a), ck_assert_ptr_null(q));
	opq_queue_attr_destroy(a);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

START_TEST(test_start_and_resize)
{
	atomic_long n = 0;
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_enqueue_fn(q, inc, NULL, &n), 0);
	/* A failed start leaves no runner, and the queue can be started later. */
	SWEEP(opq_queue_start(q, 4), {
		opq_queue_stats st;
		ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
		ck_assert_uint_eq(st.runners, 0);
		ck_assert_int_eq(opq_queue_enqueue_fn(q, inc, NULL, &n), 0);
	});
	/* A failed grow keeps the runners it made; the queue keeps working. */
	SWEEP(opq_queue_set_runners(q, 8), {
		ck_assert_int_eq(opq_queue_enqueue_fn(q, inc, NULL, &n), 0);
		ck_assert_int_eq(opq_queue_set_runners(q, 4), 0);
	});
	opq_queue_stats st;
	ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
	ck_assert_uint_eq(st.runners, 8);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
	ck_assert_int_eq(atomic_load(&n), (long)st.completed);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/*
 * opq_queue_set_runners while a failed start lets the runners it made go:
 * ESRCH, and the start returns ENOMEM with no runner left (new runners, or
 * a raised target, would keep it waiting for ever). The exit hook of the
 * runner let go holds it back until the other call has returned, so the
 * call lands inside the start's wait.
 */
static opq_queue *rb_q;
static atomic_int rb_exits, rb_go, rb_resized, rb_started;
static int rb_resize_rc, rb_start_rc;

static void rb_on_exit(void *arg, unsigned index)
{
	(void)arg;
	(void)index;
	if (atomic_fetch_add(&rb_exits, 1) != 0)
		return;
	atomic_store(&rb_go, 1);
	struct timespec dl = t_deadline(T_WAIT_NS);
	while (!atomic_load(&rb_resized) && !t_passed(&dl))
		sched_yield();
}

static void *rb_resizer(void *arg)
{
	(void)arg;
	struct timespec dl = t_deadline(T_WAIT_NS);
	while (!atomic_load(&rb_go) && !t_passed(&dl))
		sched_yield();
	rb_resize_rc = opq_queue_set_runners(rb_q, 1);
	atomic_store(&rb_resized, 1);
	return NULL;
}

static void *rb_starter(void *arg)
{
	(void)arg;
	opq__fault_set(2); /* the first runner is made, the second is not */
	rb_start_rc = opq_queue_start(rb_q, 2);
	opq__fault_set(0);
	atomic_store(&rb_started, 1);
	return NULL;
}

START_TEST(test_resize_during_failed_start)
{
	opq_queue_attr *a;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_hooks(a, NULL, rb_on_exit, NULL), 0);
	ck_assert_int_eq(opq_queue_create(&rb_q, a), 0);
	opq_queue_attr_destroy(a);
	pthread_t rs, st;
	ck_assert_int_eq(pthread_create(&rs, NULL, rb_resizer, NULL), 0);
	ck_assert_int_eq(pthread_create(&st, NULL, rb_starter, NULL), 0);
	T_WAIT_UNTIL(atomic_load(&rb_started));
	ck_assert_int_eq(pthread_join(st, NULL), 0);
	ck_assert_int_eq(pthread_join(rs, NULL), 0);
	ck_assert_int_eq(rb_start_rc, ENOMEM);
	ck_assert_int_eq(rb_resize_rc, ESRCH);
	opq_queue_stats stats;
	ck_assert_int_eq(opq_queue_stats_get(rb_q, &stats), 0);
	ck_assert_uint_eq(stats.runners, 0);
	ck_assert_int_eq(opq_queue_start(rb_q, 2), 0); /* usable */
	ck_assert_int_eq(opq_queue_stop(rb_q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(rb_q), 0);
}
END_TEST

START_TEST(test_enqueue_fn)
{
	atomic_long n = 0;
	long accepted = 0;
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	SWEEP(opq_queue_enqueue_fn(q, inc, NULL, &n), (void)0);
	accepted++;
	SWEEP(opq_queue_tryenqueue_fn(q, inc, NULL, &n), (void)0);
	accepted++;
	SWEEP(opq_queue_timedenqueue_fn(q, inc, NULL, &n, NULL), (void)0);
	accepted++;
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(atomic_load(&n), accepted);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

static void noop(opq_op *op)
{
	(void)op;
}

/* The intrusive path allocates nothing at all. */
START_TEST(test_intrusive_allocates_nothing)
{
	opq_queue *q;
	opq_op op;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_op_init(&op, noop, NULL), 0);
	opq__fault_set(1);
	ck_assert_int_eq(opq_queue_enqueue(q, &op), 0);
	ck_assert_int_eq(opq_queue_cancel(q, &op), 0);
	ck_assert_int_eq(opq_queue_tryenqueue(q, &op), 0);
	ck_assert_int_eq(opq__fault_count(), 0);
	opq__fault_set(0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/* The stage: create and register fail cleanly; a failed table growth is not an error. */
START_TEST(test_stage)
{
	opq_stage *st = NULL;
	SWEEP(opq_stage_create(&st), ck_assert_ptr_null(st));
	opq_stage_ticket *t[40] = {NULL};
	int k = 0;
	SWEEP(opq_stage_register(st, &k, sizeof(k), &t[0]), ck_assert_ptr_null(t[0]));
	for (k = 1; k < 40; k++) {
		/* The 2nd allocation, when there is one, grows the hash table. */
		opq__fault_set(2);
		ck_assert_int_eq(opq_stage_register(st, &k, sizeof(k), &t[k]), 0);
		opq__fault_set(0);
	}
	for (k = 0; k < 40; k++)
		ck_assert_int_eq(opq_stage_notify(st, &k, sizeof(k), &t[k]), 0);
	for (k = 0; k < 40; k++) {
		void *ev = NULL;
		ck_assert_int_eq(opq_stage_unregister(st, t[k], &ev), OPQ_STAGE_NOTIFIED);
		ck_assert_ptr_eq(ev, &t[k]);
	}
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/*
 * The stage's table growth: the 16th registration doubles the table. Its
 * 1st allocation (the ticket) failing is ENOMEM with nothing registered;
 * its 2nd (the new table) failing is not an error: the ticket is
 * registered and found, the table grows at a later registration.
 */
START_TEST(test_stage_growth)
{
	opq_stage *st;
	ck_assert_int_eq(opq_stage_create(&st), 0);
	opq_stage_ticket *t[64] = {NULL};
	opq_stage_stats ss;
	int growth_failures = 0;
	for (int k = 0; k < 64; k++) {
		for (long nth = 1;; nth++) {
			opq__fault_set(nth);
			int rc = opq_stage_register(st, &k, sizeof(k), &t[k]);
			long made = opq__fault_count();
			opq__fault_set(0);
			if (made < nth) {
				ck_assert_int_eq(rc, 0);
				break;
			}
			if (nth == 1) {
				/* The ticket: ENOMEM, nothing registered, the key unknown. */
				ck_assert_int_eq(rc, ENOMEM);
				ck_assert_ptr_null(t[k]);
				ck_assert_int_eq(opq_stage_stats_get(st, &ss), 0);
				ck_assert_uint_eq(ss.tickets, (size_t)k);
				ck_assert_int_eq(opq_stage_notify(st, &k, sizeof(k), NULL), ENOENT);
			} else {
				/* The growth: registered anyway; undo it and try again. */
				ck_assert_int_eq(rc, 0);
				growth_failures++;
				ck_assert_int_eq(opq_stage_notify(st, &k, sizeof(k), &t[k]), 0);
				void *ev = NULL;
				ck_assert_int_eq(opq_stage_unregister(st, t[k], &ev),
				                 OPQ_STAGE_NOTIFIED);
				ck_assert_ptr_eq(ev, &t[k]);
				t[k] = NULL;
			}
		}
	}
	/* 16 -> 32 -> 64 -> 128 buckets: three growths, each failed once first. */
	ck_assert_int_eq(growth_failures, 3);
	/* Every key is found, whichever growths failed. */
	for (int k = 0; k < 64; k++)
		ck_assert_int_eq(opq_stage_notify(st, &k, sizeof(k), &t[k]), 0);
	for (int k = 0; k < 64; k++) {
		void *ev = NULL;
		ck_assert_int_eq(opq_stage_unregister(st, t[k], &ev), OPQ_STAGE_NOTIFIED);
		ck_assert_ptr_eq(ev, &t[k]);
	}
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* Failed registrations leave the stage usable: the same call then succeeds. */
START_TEST(test_stage_register_usable)
{
	opq_stage *st;
	opq_stage_ticket *a, *b;
	void *ev;
	ck_assert_int_eq(opq_stage_create(&st), 0);
	ck_assert_int_eq(opq_stage_register(st, "a", 1, &a), 0);
	ck_assert_int_eq(opq_stage_enter(st, a, NULL, &ev), OPQ_STAGE_HEAD);
	opq__fault_set(1);
	ck_assert_int_eq(opq_stage_register(st, "b", 1, &b), ENOMEM);
	opq__fault_set(0);
	/* The head keeps heading; notify and leave work; then b registers. */
	ck_assert_int_eq(opq_stage_notify(st, "b", 1, NULL), ENOENT);
	ck_assert_int_eq(opq_stage_register(st, "b", 1, &b), 0);
	ck_assert_int_eq(opq_stage_notify(st, "b", 1, &b), 0);
	ck_assert_int_eq(opq_stage_enter(st, b, NULL, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(ev, &b);
	ck_assert_int_eq(opq_stage_leave(st, a), 0);
	ck_assert_int_eq(opq_stage_unregister(st, a, &ev), 0);
	ck_assert_int_eq(opq_stage_unregister(st, b, &ev), 0);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* Everything but create and register: no allocation at all, so no ENOMEM. */
START_TEST(test_stage_rest_allocates_nothing)
{
	opq_stage *st;
	opq_stage_ticket *a, *b;
	void *ev;
	struct timespec past = {0, 0};
	opq_stage_stats ss;
	ck_assert_int_eq(opq_stage_create(&st), 0);
	ck_assert_int_eq(opq_stage_register(st, "a", 1, &a), 0);
	ck_assert_int_eq(opq_stage_register(st, "b", 1, &b), 0);
	opq__fault_set(1);
	ck_assert_int_eq(opq_stage_enter(st, a, NULL, &ev), OPQ_STAGE_HEAD);
	ck_assert_int_eq(opq_stage_enter(st, b, &past, &ev), ETIMEDOUT);
	ck_assert_int_eq(opq_stage_notify(st, "b", 1, NULL), 0);
	ck_assert_int_eq(opq_stage_notify(st, "b", 1, NULL), EAGAIN);
	ck_assert_int_eq(opq_stage_enter(st, b, NULL, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_int_eq(opq_stage_leave(st, a), 0);
	ck_assert_int_eq(opq_stage_stats_get(st, &ss), 0);
	ck_assert_int_eq(opq_stage_close(st, ECONNRESET), 0);
	ck_assert_int_eq(opq_stage_enter(st, a, NULL, &ev), ECONNRESET);
	ck_assert_int_eq(opq_stage_unregister(st, a, &ev), 0);
	ck_assert_int_eq(opq_stage_unregister(st, b, &ev), 0);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
	ck_assert_int_eq(opq__fault_count(), 0);
	opq__fault_set(0);
}
END_TEST

struct line_waiter {
	opq_line *line;
	opq_line_ticket t;
	int rc, status;
};

static void *line_wait_thread(void *arg)
{
	struct line_waiter *w = arg;
	struct timespec dl;
	opq_deadline_after(&dl, T_WAIT_NS);
	w->rc = opq_line_wait(w->line, &w->t, &dl, &w->status);
	return NULL;
}

/* The line allocates nothing, not even when a thread waits: no ENOMEM anywhere. */
START_TEST(test_line_allocates_nothing)
{
	opq_line line;
	opq_line_ticket h = OPQ_LINE_TICKET_INITIALIZER;
	struct line_waiter w = {.line = &line, .t = OPQ_LINE_TICKET_INITIALIZER, .rc = -1};
	uint64_t gen;
	int busy, status;
	pthread_t th;
	struct timespec past = {0, 0};

	opq__fault_set(1);
	ck_assert_int_eq(opq_line_init(&line), 0);
	ck_assert_int_eq(opq_line_generation(&line, &gen), 0);
	ck_assert_int_eq(opq_line_try_acquire(&line, gen, &h), 0);
	ck_assert_int_eq(opq_line_try_acquire(&line, gen, &w.t), EBUSY);
	ck_assert_int_eq(pthread_create(&th, NULL, line_wait_thread, &w), 0);
	/* Let the waiter block (the count is read under the line's own mutex). */
	for (unsigned waiting = 0; !waiting;) {
		pthread_mutex_lock(&line.opq__mu);
		waiting = line.opq__waiters;
		pthread_mutex_unlock(&line.opq__mu);
		if (!waiting)
			sched_yield();
	}
	ck_assert_int_eq(opq_line_busy(&line, &busy), 0);
	ck_assert_int_eq(opq_line_wait_idle(&line, &past, &status), ETIMEDOUT);
	ck_assert_int_eq(opq_line_release(&line, &h, 42), 0);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_int_eq(w.rc, 0);
	ck_assert_int_eq(w.status, 42);
	ck_assert_int_eq(opq_line_wait_idle(&line, NULL, &status), 0);
	ck_assert_int_eq(opq_line_destroy(&line), 0);
	ck_assert_int_eq(opq__fault_count(), 0);
	opq__fault_set(0);
}
END_TEST

/* The queue's calls other than create, start, resize and the _fn enqueues allocate nothing. */
START_TEST(test_queue_rest_allocates_nothing)
{
	atomic_long n = 0;
	opq_queue *q;
	opq_queue_attr *a;
	opq_op op;
	opq_queue_stats st;
	struct timespec dl;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	ck_assert_int_eq(opq_queue_enqueue_fn(q, inc, NULL, &n), 0);
	ck_assert_int_eq(opq_op_init(&op, noop, NULL), 0);
	opq__fault_set(1);
	ck_assert_int_eq(opq_queue_attr_set_capacity(a, 4), 0);
	ck_assert_int_eq(opq_queue_attr_set_name(a, "x"), 0);
	ck_assert_int_eq(opq_queue_attr_set_hooks(a, NULL, NULL, NULL), 0);
	ck_assert_int_eq(opq_queue_timedenqueue(q, &op, NULL), 0);
	ck_assert_int_eq(opq_queue_set_runners(q, 1), 0); /* shrinking makes no thread */
	opq_deadline_after(&dl, T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(opq_queue_cancel(q, &op), EBUSY);
	ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	opq_queue_attr_destroy(a);
	ck_assert_int_eq(opq__fault_count(), 0);
	opq__fault_set(0);
	ck_assert_int_eq(atomic_load(&n), 1);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("fault");
	TCase *tc = t_tcase(s, "enomem", 120);
	tcase_add_test(tc, test_attr_and_create);
	tcase_add_test(tc, test_start_and_resize);
	tcase_add_test(tc, test_resize_during_failed_start);
	tcase_add_test(tc, test_enqueue_fn);
	tcase_add_test(tc, test_intrusive_allocates_nothing);
	tcase_add_test(tc, test_stage);
	tcase_add_test(tc, test_stage_growth);
	tcase_add_test(tc, test_stage_register_usable);
	tcase_add_test(tc, test_stage_rest_allocates_nothing);
	tcase_add_test(tc, test_line_allocates_nothing);
	tcase_add_test(tc, test_queue_rest_allocates_nothing);
	return t_run(s);
}
