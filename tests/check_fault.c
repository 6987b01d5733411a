/*
 * check_fault.c: allocation failure. Each public call that allocates is run
 * with its 1st, 2nd, ... Nth allocation failing in turn: it must return
 * ENOMEM, leak nothing (the ASan build's LeakSanitizer checks), and leave
 * the queue usable. Links the convenience library to reach the hidden
 * opq__fault_set() hook.
 */
#include "harness.h"
#include "internal.h"

static void inc(void *arg)
{
	atomic_fetch_add((atomic_long *)arg, 1);
}

/*
 * Run `call` with allocation n failing, for n = 1, 2, ... until the call
 * makes fewer than n allocations; `check` runs after each failed call.
 */
#define SWEEP(call, on_enomem)                                              \
	for (long nth_ = 1;; nth_++) {                                            \
		opq__fault_set(nth_);                                          \
		int rc_ = (call);                                           \
		long made_ = opq__fault_count();                            \
		opq__fault_set(0);                                          \
		if (made_ < nth_) {                                            \
			ck_assert_int_eq(rc_, 0);                           \
			break;                                              \
		}                                                           \
		ck_assert_msg(rc_ == ENOMEM, "allocation %ld: rc %d", nth_, rc_); \
		on_enomem;                                                  \
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
	opq_stage_ticket *t[40] = { NULL };
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

int main(void)
{
	Suite *s = suite_create("fault");
	TCase *tc = t_tcase(s, "enomem", 120);
	tcase_add_test(tc, test_attr_and_create);
	tcase_add_test(tc, test_start_and_resize);
	tcase_add_test(tc, test_enqueue_fn);
	tcase_add_test(tc, test_intrusive_allocates_nothing);
	tcase_add_test(tc, test_stage);
	return t_run(s);
}
