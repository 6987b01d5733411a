/*
 * check_badinput.c: a table of every public function of the queue, the
 * line, the stage and the common calls, each called with NULL, zero,
 * out-of-range (malformed deadlines, 0 runners, huge values) or
 * wrong-state arguments. Each row asserts the errno its man page
 * documents; then every object of the fixture must still work (a queue
 * performs an operation, a line is acquired and released, a stage routes a
 * notification) and be destroyed cleanly (no EBUSY left behind).
 */
#include <limits.h>
#include <string.h>

#include "harness.h"

static atomic_long performed;

static void perform(opq_op *op)
{
	(void)op;
	atomic_fetch_add(&performed, 1);
}

static void fn(void *arg)
{
	(void)arg;
	atomic_fetch_add(&performed, 1);
}

static void hook(void *arg, unsigned index)
{
	(void)arg;
	(void)index;
}

/* The fixture: a fresh set of objects for every row. */
struct fx {
	opq_queue *q;  /* created, not started */
	opq_queue *qr; /* running, 2 runners */
	opq_queue *qs; /* started, then stopped */
	opq_queue *qb; /* capacity 1, not started, full (ob queued) */
	opq_queue_attr *attr;
	opq_op op, ob, zero;
	opq_line line; /* free, 10 releases so far */
	opq_line lh;   /* held by th */
	opq_line_ticket th, blank;
	opq_stage *st, *st2;
	opq_stage_ticket *t, *t2, *th_st; /* keys "a" on st, "a" on st2, "h" on st (heads st) */
	struct timespec bad_hi, bad_neg, past;
	opq_queue_stats stats;
	void *ev;
	uint64_t gen;
	int i;
	size_t sz;
};

static struct fx F;

static void fx_setup(void)
{
	struct fx *f = &F;
	memset(f, 0, sizeof(*f));
	ck_assert_int_eq(opq_queue_create(&f->q, NULL), 0);
	ck_assert_int_eq(opq_queue_create(&f->qr, NULL), 0);
	ck_assert_int_eq(opq_queue_start(f->qr, 2), 0);
	ck_assert_int_eq(opq_queue_create(&f->qs, NULL), 0);
	ck_assert_int_eq(opq_queue_start(f->qs, 1), 0);
	ck_assert_int_eq(opq_queue_stop(f->qs, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_attr_create(&f->attr), 0);
	ck_assert_int_eq(opq_queue_attr_set_capacity(f->attr, 1), 0);
	ck_assert_int_eq(opq_queue_create(&f->qb, f->attr), 0);
	ck_assert_int_eq(opq_op_init(&f->op, perform, NULL), 0);
	ck_assert_int_eq(opq_op_init(&f->ob, perform, NULL), 0);
	ck_assert_int_eq(opq_queue_enqueue(f->qb, &f->ob), 0);

	ck_assert_int_eq(opq_line_init(&f->line), 0);
	for (int k = 0; k < 10; k++) {
		opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
		ck_assert_int_eq(opq_line_try_acquire(&f->line, OPQ_LINE_ANY, &t), 0);
		ck_assert_int_eq(opq_line_release(&f->line, &t, k), 0);
	}
	ck_assert_int_eq(opq_line_init(&f->lh), 0);
	ck_assert_int_eq(opq_line_try_acquire(&f->lh, OPQ_LINE_ANY, &f->th), 0);

	ck_assert_int_eq(opq_stage_create(&f->st), 0);
	ck_assert_int_eq(opq_stage_create(&f->st2), 0);
	ck_assert_int_eq(opq_stage_register(f->st, "a", 1, &f->t), 0);
	ck_assert_int_eq(opq_stage_register(f->st2, "a", 1, &f->t2), 0);
	ck_assert_int_eq(opq_stage_register(f->st, "h", 1, &f->th_st), 0);
	ck_assert_int_eq(opq_stage_enter(f->st, f->th_st, NULL, &f->ev), OPQ_STAGE_HEAD);

	f->bad_hi = (struct timespec){.tv_sec = 0, .tv_nsec = 1000000000};
	f->bad_neg = (struct timespec){.tv_sec = 0, .tv_nsec = -1};
	f->past = (struct timespec){.tv_sec = 0, .tv_nsec = 0};
	atomic_store(&performed, 0);
}

/* Every object still works, then is destroyed without EBUSY. */
static void fx_check_and_teardown(void)
{
	struct fx *f = &F;
	struct timespec dl = t_deadline(T_WAIT_NS);
	opq_queue *qs[] = {f->q, f->qr, f->qs, f->qb};
	for (size_t k = 0; k < sizeof(qs) / sizeof(qs[0]); k++) {
		int rc = opq_queue_start(qs[k], 1);
		ck_assert_msg(rc == 0 || rc == EALREADY, "queue %zu: start %d", k, rc);
		long before = atomic_load(&performed);
		ck_assert_int_eq(opq_queue_enqueue_fn(qs[k], fn, NULL, NULL), 0);
		ck_assert_int_eq(opq_queue_wait_idle(qs[k], &dl), 0);
		ck_assert_int_ge(atomic_load(&performed), before + 1);
		ck_assert_int_eq(opq_queue_stop(qs[k], OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(opq_queue_stats_get(qs[k], &f->stats), 0);
		ck_assert_uint_eq(f->stats.queued, 0);
		ck_assert_int_eq(opq_queue_destroy(qs[k]), 0);
	}
	opq_queue_attr_destroy(f->attr);

	/* The lines: the holder releases; both lines can be acquired and released. */
	if (f->th.held)
		ck_assert_int_eq(opq_line_release(&f->lh, &f->th, 0), 0);
	opq_line *ls[] = {&f->line, &f->lh};
	for (size_t k = 0; k < 2; k++) {
		opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
		int busy = -1;
		ck_assert_int_eq(opq_line_try_acquire(ls[k], OPQ_LINE_ANY, &t), 0);
		ck_assert_int_eq(opq_line_busy(ls[k], &busy), 0);
		ck_assert_int_eq(busy, 1);
		ck_assert_int_eq(opq_line_release(ls[k], &t, 7), 0);
		int status = -1;
		ck_assert_int_eq(opq_line_wait(ls[k], &t, NULL, &status), 0);
		ck_assert_int_eq(status, 7);
		ck_assert_int_eq(opq_line_destroy(ls[k]), 0);
	}

	/* The stages: route a notification, then unregister everything. */
	void *ev = NULL;
	int rc = opq_stage_leave(f->st, f->th_st);
	ck_assert_msg(rc == 0 || rc == EPERM, "leave %d", rc);
	opq_stage_stats ss;
	ck_assert_int_eq(opq_stage_stats_get(f->st, &ss), 0);
	if (!ss.closed) {
		ck_assert_int_eq(opq_stage_notify(f->st, "a", 1, &F), 0);
		ck_assert_int_eq(opq_stage_enter(f->st, f->t, &dl, &ev), OPQ_STAGE_NOTIFIED);
		ck_assert_ptr_eq(ev, &F);
		ck_assert_int_eq(opq_stage_enter(f->st, f->t, &dl, &ev), OPQ_STAGE_HEAD);
		ck_assert_int_eq(opq_stage_leave(f->st, f->t), 0);
	}
	opq_stage_ticket *ts[] = {f->t, f->th_st};
	for (size_t k = 0; k < 2; k++) {
		rc = opq_stage_unregister(f->st, ts[k], &ev);
		ck_assert_msg(rc == 0 || rc == OPQ_STAGE_NOTIFIED, "unregister %d", rc);
	}
	ck_assert_int_eq(opq_stage_unregister(f->st2, f->t2, &ev), 0);
	ck_assert_int_eq(opq_stage_destroy(f->st), 0);
	ck_assert_int_eq(opq_stage_destroy(f->st2), 0);
}

/* ---- the rows ---------------------------------------------------------- */

#define R(name) static int name(struct fx *f)
#define UNUSED  (void)f

/* One row per line: a table reads better than clang-format's layout. */
/* clang-format off */

/* common */
R(deadline_null) { UNUSED; return opq_deadline_after(NULL, 0); }
R(deadline_max)
{
	struct timespec ts;
	int rc = opq_deadline_after(&ts, INT64_MAX);
	(void)f;
	return rc ? rc : (ts.tv_nsec >= 0 && ts.tv_nsec < 1000000000 && ts.tv_sec > 0) ? 0 : -1;
}
R(deadline_min)
{
	struct timespec ts;
	int rc = opq_deadline_after(&ts, INT64_MIN);
	(void)f;
	return rc ? rc : (ts.tv_nsec >= 0 && ts.tv_nsec < 1000000000) ? 0 : -1;
}
R(deadline_negative)
{
	struct timespec ts;
	int rc = opq_deadline_after(&ts, -1);
	(void)f;
	return rc ? rc : (ts.tv_nsec >= 0 && ts.tv_nsec < 1000000000) ? 0 : -1;
}
R(version) { UNUSED; return opq_version() && strlen(opq_version()) > 0 ? 0 : -1; }

/* queue: attributes */
R(attr_create_null) { UNUSED; return opq_queue_attr_create(NULL); }
R(attr_destroy_null) { UNUSED; opq_queue_attr_destroy(NULL); return 0; }
R(attr_cap_null) { UNUSED; return opq_queue_attr_set_capacity(NULL, 1); }
R(attr_cap_huge) { return opq_queue_attr_set_capacity(f->attr, SIZE_MAX); }
R(attr_getcap_null_attr) { return opq_queue_attr_get_capacity(NULL, &f->sz); }
R(attr_getcap_null_out) { return opq_queue_attr_get_capacity(f->attr, NULL); }
R(attr_name_null_attr) { UNUSED; return opq_queue_attr_set_name(NULL, "x"); }
R(attr_name_null) { return opq_queue_attr_set_name(f->attr, NULL); }
R(attr_name_empty) { return opq_queue_attr_set_name(f->attr, ""); }
R(attr_name_too_long) { return opq_queue_attr_set_name(f->attr, "abcdefghijk"); }
R(attr_name_longest) { return opq_queue_attr_set_name(f->attr, "abcdefghij"); }
R(attr_hooks_null_attr) { UNUSED; return opq_queue_attr_set_hooks(NULL, hook, hook, NULL); }
R(attr_hooks_none) { return opq_queue_attr_set_hooks(f->attr, NULL, NULL, NULL); }
/* queue: lifecycle */
R(create_null) { UNUSED; return opq_queue_create(NULL, NULL); }
R(destroy_null) { UNUSED; return opq_queue_destroy(NULL); }
R(destroy_running) { return opq_queue_destroy(f->qr); }
R(start_null) { UNUSED; return opq_queue_start(NULL, 1); }
R(start_zero) { return opq_queue_start(f->q, 0); }
R(start_twice) { return opq_queue_start(f->qr, 1); }
R(start_stopped_again) { return opq_queue_start(f->qs, 1); }
R(runners_null) { UNUSED; return opq_queue_set_runners(NULL, 1); }
R(runners_zero) { return opq_queue_set_runners(f->qr, 0); }
R(runners_not_started) { return opq_queue_set_runners(f->q, 2); }
R(runners_stopped) { return opq_queue_set_runners(f->qs, 2); }
R(stop_null) { UNUSED; return opq_queue_stop(NULL, OPQ_STOP_DRAIN); }
R(stop_bad_mode) { return opq_queue_stop(f->qr, 2); }
R(stop_negative_mode) { return opq_queue_stop(f->qr, -1); }
R(stop_twice) { return opq_queue_stop(f->qs, OPQ_STOP_DISCARD); }
R(stop_never_started_drains)
{
	ck_assert_int_eq(opq_queue_enqueue(f->q, &f->op), 0);
	int rc = opq_queue_stop(f->q, OPQ_STOP_DRAIN);
	return rc ? rc : atomic_load(&performed) == 1 ? 0 : -1;
}
/* queue: operations */
R(op_init_null) { UNUSED; return opq_op_init(NULL, perform, NULL); }
R(op_init_no_perform) { return opq_op_init(&f->op, NULL, NULL); }
R(enqueue_null_q) { return opq_queue_enqueue(NULL, &f->op); }
R(enqueue_null_op) { return opq_queue_enqueue(f->q, NULL); }
R(enqueue_no_perform) { return opq_queue_enqueue(f->q, &f->zero); }
R(tryenqueue_null_q) { return opq_queue_tryenqueue(NULL, &f->op); }
R(tryenqueue_null_op) { return opq_queue_tryenqueue(f->q, NULL); }
R(tryenqueue_no_perform) { return opq_queue_tryenqueue(f->q, &f->zero); }
R(timed_null_q) { return opq_queue_timedenqueue(NULL, &f->op, NULL); }
R(timed_null_op) { return opq_queue_timedenqueue(f->q, NULL, NULL); }
R(timed_no_perform) { return opq_queue_timedenqueue(f->q, &f->zero, NULL); }
R(timed_nsec_1e9) { return opq_queue_timedenqueue(f->q, &f->op, &f->bad_hi); }
R(timed_nsec_negative) { return opq_queue_timedenqueue(f->q, &f->op, &f->bad_neg); }
R(timed_bad_deadline_full) { return opq_queue_timedenqueue(f->qb, &f->op, &f->bad_hi); }
R(enqueue_twice)
{
	ck_assert_int_eq(opq_queue_enqueue(f->q, &f->op), 0);
	int rc = opq_queue_enqueue(f->q, &f->op);
	ck_assert_int_eq(opq_queue_stats_get(f->q, &f->stats), 0);
	ck_assert_uint_eq(f->stats.queued, 1);
	return rc;
}
R(tryenqueue_twice)
{
	ck_assert_int_eq(opq_queue_tryenqueue(f->q, &f->op), 0);
	return opq_queue_tryenqueue(f->q, &f->op);
}
R(enqueue_stopped) { return opq_queue_enqueue(f->qs, &f->op); }
R(tryenqueue_stopped) { return opq_queue_tryenqueue(f->qs, &f->op); }
R(timed_stopped) { return opq_queue_timedenqueue(f->qs, &f->op, &f->past); }
R(enqueue_fn_stopped) { return opq_queue_enqueue_fn(f->qs, fn, NULL, NULL); }
R(tryenqueue_full) { return opq_queue_tryenqueue(f->qb, &f->op); }
R(tryenqueue_fn_full) { return opq_queue_tryenqueue_fn(f->qb, fn, NULL, NULL); }
R(timed_full_past) { return opq_queue_timedenqueue(f->qb, &f->op, &f->past); }
R(timed_fn_full_past) { return opq_queue_timedenqueue_fn(f->qb, fn, NULL, NULL, &f->past); }
R(enqueue_fn_null_q) { UNUSED; return opq_queue_enqueue_fn(NULL, fn, NULL, NULL); }
R(enqueue_fn_null_fn) { return opq_queue_enqueue_fn(f->q, NULL, fn, NULL); }
R(tryenqueue_fn_null_fn) { return opq_queue_tryenqueue_fn(f->q, NULL, NULL, NULL); }
R(timed_fn_null_fn) { return opq_queue_timedenqueue_fn(f->q, NULL, NULL, NULL, NULL); }
R(timed_fn_nsec_1e9) { return opq_queue_timedenqueue_fn(f->q, fn, NULL, NULL, &f->bad_hi); }
R(timed_fn_nsec_negative) { return opq_queue_timedenqueue_fn(f->q, fn, NULL, NULL, &f->bad_neg); }
R(cancel_null_q) { return opq_queue_cancel(NULL, &f->op); }
R(cancel_null_op) { return opq_queue_cancel(f->q, NULL); }
R(cancel_not_queued) { return opq_queue_cancel(f->q, &f->op); }
R(cancel_other_queue) { return opq_queue_cancel(f->q, &f->ob); }
R(cancel_twice)
{
	ck_assert_int_eq(opq_queue_cancel(f->qb, &f->ob), 0);
	return opq_queue_cancel(f->qb, &f->ob);
}
R(wait_idle_null) { UNUSED; return opq_queue_wait_idle(NULL, NULL); }
R(wait_idle_nsec_1e9) { return opq_queue_wait_idle(f->q, &f->bad_hi); }
R(wait_idle_nsec_negative) { return opq_queue_wait_idle(f->q, &f->bad_neg); }
R(wait_idle_busy_past) { return opq_queue_wait_idle(f->qb, &f->past); }
R(wait_idle_idle_past) { return opq_queue_wait_idle(f->q, &f->past); }
R(stats_null_q) { return opq_queue_stats_get(NULL, &f->stats); }
R(stats_null_out) { return opq_queue_stats_get(f->q, NULL); }
R(current_outside) { UNUSED; return opq_queue_current() == NULL ? 0 : -1; }

/* line */
R(line_init_null) { UNUSED; return opq_line_init(NULL); }
R(line_destroy_null) { UNUSED; return opq_line_destroy(NULL); }
R(line_destroy_held) { return opq_line_destroy(&f->lh); }
R(line_gen_null_line) { return opq_line_generation(NULL, &f->gen); }
R(line_gen_null_out) { return opq_line_generation(&f->line, NULL); }
R(line_busy_null_line) { return opq_line_busy(NULL, &f->i); }
R(line_busy_null_out) { return opq_line_busy(&f->line, NULL); }
R(try_null_line) { opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER; (void)f; return opq_line_try_acquire(NULL, OPQ_LINE_ANY, &t); }
R(try_null_ticket) { return opq_line_try_acquire(&f->line, OPQ_LINE_ANY, NULL); }
R(try_other_line) { return opq_line_try_acquire(&f->line, OPQ_LINE_ANY, &f->th); }
R(try_future_gen) { opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER; return opq_line_try_acquire(&f->line, 11, &t); }
R(try_false_claim) { opq_line_ticket t = { &f->line, 10, 1 }; return opq_line_try_acquire(&f->line, OPQ_LINE_ANY, &t); }
R(try_busy) { opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER; return opq_line_try_acquire(&f->lh, OPQ_LINE_ANY, &t); }
R(try_stale) { opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER; return opq_line_try_acquire(&f->line, 3, &t); }
R(try_or_token) { return opq_line_try_acquire(&f->lh, OPQ_LINE_ANY, &f->th); }
R(wait_null_line) { return opq_line_wait(NULL, &f->th, NULL, NULL); }
R(wait_null_ticket) { return opq_line_wait(&f->line, NULL, NULL, NULL); }
R(wait_blank_ticket) { return opq_line_wait(&f->line, &f->blank, NULL, NULL); }
R(wait_other_line) { return opq_line_wait(&f->line, &f->th, NULL, NULL); }
R(wait_future_gen) { opq_line_ticket t = { &f->line, 11, 0 }; return opq_line_wait(&f->line, &t, NULL, NULL); }
R(wait_holder) { return opq_line_wait(&f->lh, &f->th, NULL, NULL); }
R(wait_nsec_1e9) { opq_line_ticket t = { &f->lh, 0, 0 }; return opq_line_wait(&f->lh, &t, &f->bad_hi, NULL); }
R(wait_nsec_negative) { opq_line_ticket t = { &f->lh, 0, 0 }; return opq_line_wait(&f->lh, &t, &f->bad_neg, NULL); }
R(wait_busy_past) { opq_line_ticket t = { &f->lh, 0, 0 }; return opq_line_wait(&f->lh, &t, &f->past, NULL); }
R(wait_forgotten) { opq_line_ticket t = { &f->line, 0, 0 }; f->i = -5; int rc = opq_line_wait(&f->line, &t, NULL, &f->i); return rc == ESTALE && f->i != -5 ? -1 : rc; }
R(wait_remembered) { opq_line_ticket t = { &f->line, 9, 0 }; int rc = opq_line_wait(&f->line, &t, NULL, &f->i); return rc ? rc : f->i == 9 ? 0 : -1; }
R(release_null_line) { return opq_line_release(NULL, &f->th, 0); }
R(release_null_ticket) { return opq_line_release(&f->lh, NULL, 0); }
R(release_other_line) { return opq_line_release(&f->line, &f->th, 0); }
R(release_blank_ticket) { return opq_line_release(&f->lh, &f->blank, 0); }
R(release_not_holder) { opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER; ck_assert_int_eq(opq_line_try_acquire(&f->lh, OPQ_LINE_ANY, &t), EBUSY); return opq_line_release(&f->lh, &t, 0); }
R(release_stale_copy)
{
	opq_line_ticket copy = f->th;
	ck_assert_int_eq(opq_line_release(&f->lh, &f->th, 1), 0);
	return opq_line_release(&f->lh, &copy, 2);
}
R(release_twice)
{
	ck_assert_int_eq(opq_line_release(&f->lh, &f->th, 1), 0);
	return opq_line_release(&f->lh, &f->th, 2);
}
R(line_idle_null) { UNUSED; return opq_line_wait_idle(NULL, NULL, NULL); }
R(line_idle_nsec_1e9) { return opq_line_wait_idle(&f->line, &f->bad_hi, NULL); }
R(line_idle_nsec_negative) { return opq_line_wait_idle(&f->line, &f->bad_neg, NULL); }
R(line_idle_held_past) { return opq_line_wait_idle(&f->lh, &f->past, NULL); }
R(line_idle_free) { int rc = opq_line_wait_idle(&f->line, &f->past, &f->i); return rc ? rc : f->i == 9 ? 0 : -1; }

/* stage */
R(stage_create_null) { UNUSED; return opq_stage_create(NULL); }
R(stage_destroy_null) { UNUSED; return opq_stage_destroy(NULL); }
R(stage_destroy_registered) { return opq_stage_destroy(f->st2); }
R(register_null_st) { opq_stage_ticket *t; (void)f; return opq_stage_register(NULL, "k", 1, &t); }
R(register_null_key) { opq_stage_ticket *t; return opq_stage_register(f->st, NULL, 1, &t); }
R(register_zero_len) { opq_stage_ticket *t; return opq_stage_register(f->st, "k", 0, &t); }
R(register_null_out) { return opq_stage_register(f->st, "k", 1, NULL); }
R(register_huge_len) { opq_stage_ticket *t; return opq_stage_register(f->st, "k", SIZE_MAX, &t); }
R(register_duplicate) { opq_stage_ticket *t; return opq_stage_register(f->st, "a", 1, &t); }
R(unregister_null_st) { return opq_stage_unregister(NULL, f->t, &f->ev); }
R(unregister_null_t) { return opq_stage_unregister(f->st, NULL, &f->ev); }
R(unregister_null_out) { return opq_stage_unregister(f->st, f->t, NULL); }
R(unregister_other_stage) { return opq_stage_unregister(f->st, f->t2, &f->ev); }
R(unregister_head) { return opq_stage_unregister(f->st, f->th_st, &f->ev); }
R(enter_null_st) { return opq_stage_enter(NULL, f->t, NULL, &f->ev); }
R(enter_null_t) { return opq_stage_enter(f->st, NULL, NULL, &f->ev); }
R(enter_null_out) { return opq_stage_enter(f->st, f->t, NULL, NULL); }
R(enter_other_stage) { return opq_stage_enter(f->st, f->t2, NULL, &f->ev); }
R(enter_nsec_1e9) { return opq_stage_enter(f->st, f->t, &f->bad_hi, &f->ev); }
R(enter_nsec_negative) { return opq_stage_enter(f->st, f->t, &f->bad_neg, &f->ev); }
R(enter_past) { return opq_stage_enter(f->st, f->t, &f->past, &f->ev); }
R(enter_head_again) { return opq_stage_enter(f->st, f->th_st, NULL, &f->ev); }
R(enter_closed)
{
	ck_assert_int_eq(opq_stage_close(f->st, ECONNRESET), 0);
	return opq_stage_enter(f->st, f->t, NULL, &f->ev);
}
R(leave_null_st) { return opq_stage_leave(NULL, f->th_st); }
R(leave_null_t) { return opq_stage_leave(f->st, NULL); }
R(leave_not_head) { return opq_stage_leave(f->st, f->t); }
R(leave_other_stage) { return opq_stage_leave(f->st, f->t2); }
R(notify_null_st) { UNUSED; return opq_stage_notify(NULL, "a", 1, NULL); }
R(notify_null_key) { return opq_stage_notify(f->st, NULL, 1, NULL); }
R(notify_zero_len) { return opq_stage_notify(f->st, "a", 0, NULL); }
R(notify_unknown) { return opq_stage_notify(f->st, "z", 1, NULL); }
R(notify_twice)
{
	ck_assert_int_eq(opq_stage_notify(f->st, "a", 1, &F), 0);
	int rc = opq_stage_notify(f->st, "a", 1, NULL);
	ck_assert_int_eq(opq_stage_enter(f->st, f->t, NULL, &f->ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(f->ev, &F);
	return rc;
}
R(close_null) { UNUSED; return opq_stage_close(NULL, ECONNRESET); }
R(close_zero) { return opq_stage_close(f->st, 0); }
R(close_negative) { return opq_stage_close(f->st, -1); }
R(close_not_errno) { return opq_stage_close(f->st, OPQ_STAGE_HEAD); }
R(close_twice)
{
	ck_assert_int_eq(opq_stage_close(f->st, ECONNRESET), 0);
	return opq_stage_close(f->st, EPIPE);
}
R(stage_stats_null_st) { opq_stage_stats s; (void)f; return opq_stage_stats_get(NULL, &s); }
R(stage_stats_null_out) { return opq_stage_stats_get(f->st, NULL); }

/* clang-format on */

struct row {
	const char *name;
	int (*call)(struct fx *);
	int expect;
};

#define ROW(name, expect)                                                                          \
	{                                                                                          \
#name, name, expect                                                                \
	}
static const struct row rows[] = {
    ROW(deadline_null, EINVAL),
    ROW(deadline_max, 0),
    ROW(deadline_min, 0),
    ROW(deadline_negative, 0),
    ROW(version, 0),

    ROW(attr_create_null, EINVAL),
    ROW(attr_destroy_null, 0),
    ROW(attr_cap_null, EINVAL),
    ROW(attr_cap_huge, 0),
    ROW(attr_getcap_null_attr, EINVAL),
    ROW(attr_getcap_null_out, EINVAL),
    ROW(attr_name_null_attr, EINVAL),
    ROW(attr_name_null, EINVAL),
    ROW(attr_name_empty, EINVAL),
    ROW(attr_name_too_long, EINVAL),
    ROW(attr_name_longest, 0),
    ROW(attr_hooks_null_attr, EINVAL),
    ROW(attr_hooks_none, 0),
    ROW(create_null, EINVAL),
    ROW(destroy_null, 0),
    ROW(destroy_running, EBUSY),
    ROW(start_null, EINVAL),
    ROW(start_zero, EINVAL),
    ROW(start_twice, EALREADY),
    ROW(start_stopped_again, 0),
    ROW(runners_null, EINVAL),
    ROW(runners_zero, EINVAL),
    ROW(runners_not_started, ESRCH),
    ROW(runners_stopped, ESRCH),
    ROW(stop_null, EINVAL),
    ROW(stop_bad_mode, EINVAL),
    ROW(stop_negative_mode, EINVAL),
    ROW(stop_twice, 0),
    ROW(stop_never_started_drains, 0),
    ROW(op_init_null, EINVAL),
    ROW(op_init_no_perform, EINVAL),
    ROW(enqueue_null_q, EINVAL),
    ROW(enqueue_null_op, EINVAL),
    ROW(enqueue_no_perform, EINVAL),
    ROW(tryenqueue_null_q, EINVAL),
    ROW(tryenqueue_null_op, EINVAL),
    ROW(tryenqueue_no_perform, EINVAL),
    ROW(timed_null_q, EINVAL),
    ROW(timed_null_op, EINVAL),
    ROW(timed_no_perform, EINVAL),
    ROW(timed_nsec_1e9, EINVAL),
    ROW(timed_nsec_negative, EINVAL),
    ROW(timed_bad_deadline_full, EINVAL),
    ROW(enqueue_twice, EBUSY),
    ROW(tryenqueue_twice, EBUSY),
    ROW(enqueue_stopped, ESHUTDOWN),
    ROW(tryenqueue_stopped, ESHUTDOWN),
    ROW(timed_stopped, ESHUTDOWN),
    ROW(enqueue_fn_stopped, ESHUTDOWN),
    ROW(tryenqueue_full, EAGAIN),
    ROW(tryenqueue_fn_full, EAGAIN),
    ROW(timed_full_past, ETIMEDOUT),
    ROW(timed_fn_full_past, ETIMEDOUT),
    ROW(enqueue_fn_null_q, EINVAL),
    ROW(enqueue_fn_null_fn, EINVAL),
    ROW(tryenqueue_fn_null_fn, EINVAL),
    ROW(timed_fn_null_fn, EINVAL),
    ROW(timed_fn_nsec_1e9, EINVAL),
    ROW(timed_fn_nsec_negative, EINVAL),
    ROW(cancel_null_q, EINVAL),
    ROW(cancel_null_op, EINVAL),
    ROW(cancel_not_queued, EBUSY),
    ROW(cancel_other_queue, EBUSY),
    ROW(cancel_twice, EBUSY),
    ROW(wait_idle_null, EINVAL),
    ROW(wait_idle_nsec_1e9, EINVAL),
    ROW(wait_idle_nsec_negative, EINVAL),
    ROW(wait_idle_busy_past, ETIMEDOUT),
    ROW(wait_idle_idle_past, 0),
    ROW(stats_null_q, EINVAL),
    ROW(stats_null_out, EINVAL),
    ROW(current_outside, 0),

    ROW(line_init_null, EINVAL),
    ROW(line_destroy_null, 0),
    ROW(line_destroy_held, EBUSY),
    ROW(line_gen_null_line, EINVAL),
    ROW(line_gen_null_out, EINVAL),
    ROW(line_busy_null_line, EINVAL),
    ROW(line_busy_null_out, EINVAL),
    ROW(try_null_line, EINVAL),
    ROW(try_null_ticket, EINVAL),
    ROW(try_other_line, EINVAL),
    ROW(try_future_gen, EINVAL),
    ROW(try_false_claim, EINVAL),
    ROW(try_busy, EBUSY),
    ROW(try_stale, EALREADY),
    ROW(try_or_token, 0),
    ROW(wait_null_line, EINVAL),
    ROW(wait_null_ticket, EINVAL),
    ROW(wait_blank_ticket, EINVAL),
    ROW(wait_other_line, EINVAL),
    ROW(wait_future_gen, EINVAL),
    ROW(wait_holder, EDEADLK),
    ROW(wait_nsec_1e9, EINVAL),
    ROW(wait_nsec_negative, EINVAL),
    ROW(wait_busy_past, ETIMEDOUT),
    ROW(wait_forgotten, ESTALE),
    ROW(wait_remembered, 0),
    ROW(release_null_line, EINVAL),
    ROW(release_null_ticket, EINVAL),
    ROW(release_other_line, EINVAL),
    ROW(release_blank_ticket, EINVAL),
    ROW(release_not_holder, EPERM),
    ROW(release_stale_copy, EPERM),
    ROW(release_twice, EPERM),
    ROW(line_idle_null, EINVAL),
    ROW(line_idle_nsec_1e9, EINVAL),
    ROW(line_idle_nsec_negative, EINVAL),
    ROW(line_idle_held_past, ETIMEDOUT),
    ROW(line_idle_free, 0),

    ROW(stage_create_null, EINVAL),
    ROW(stage_destroy_null, 0),
    ROW(stage_destroy_registered, EBUSY),
    ROW(register_null_st, EINVAL),
    ROW(register_null_key, EINVAL),
    ROW(register_zero_len, EINVAL),
    ROW(register_null_out, EINVAL),
    ROW(register_huge_len, ENOMEM),
    ROW(register_duplicate, EEXIST),
    ROW(unregister_null_st, EINVAL),
    ROW(unregister_null_t, EINVAL),
    ROW(unregister_null_out, EINVAL),
    ROW(unregister_other_stage, EINVAL),
    ROW(unregister_head, EBUSY),
    ROW(enter_null_st, EINVAL),
    ROW(enter_null_t, EINVAL),
    ROW(enter_null_out, EINVAL),
    ROW(enter_other_stage, EINVAL),
    ROW(enter_nsec_1e9, EINVAL),
    ROW(enter_nsec_negative, EINVAL),
    ROW(enter_past, ETIMEDOUT),
    ROW(enter_head_again, OPQ_STAGE_HEAD),
    ROW(enter_closed, ECONNRESET),
    ROW(leave_null_st, EINVAL),
    ROW(leave_null_t, EINVAL),
    ROW(leave_not_head, EPERM),
    ROW(leave_other_stage, EPERM),
    ROW(notify_null_st, EINVAL),
    ROW(notify_null_key, EINVAL),
    ROW(notify_zero_len, EINVAL),
    ROW(notify_unknown, ENOENT),
    ROW(notify_twice, EAGAIN),
    ROW(close_null, EINVAL),
    ROW(close_zero, EINVAL),
    ROW(close_negative, EINVAL),
    ROW(close_not_errno, EINVAL),
    ROW(close_twice, EALREADY),
    ROW(stage_stats_null_st, EINVAL),
    ROW(stage_stats_null_out, EINVAL),
};
#define NROWS ((int)(sizeof(rows) / sizeof(rows[0])))

START_TEST(test_row)
{
	const struct row *r = &rows[_i];
	fx_setup();
	int rc = r->call(&F);
	ck_assert_msg(rc == r->expect, "%s: returned %d (%s), the man page says %d (%s)", r->name,
	              rc, rc > 0 ? strerror(rc) : "-", r->expect,
	              r->expect > 0 ? strerror(r->expect) : "-");
	fx_check_and_teardown();
}
END_TEST

int main(void)
{
	Suite *s = suite_create("badinput");
	TCase *tc = t_tcase(s, "table", 60);
	tcase_add_loop_test(tc, test_row, 0, NROWS);
	printf("%d rows\n", NROWS);
	return t_run(s);
}
