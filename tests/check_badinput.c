/*
 * check_badinput.c: a table of every public function of the queue, the
 * line, the stage, the lease (memory provider), the scope and the common
 * calls, each called with NULL, zero,
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
	opq_lease_provider *pm;           /* memory provider; la and lb use it */
	opq_lease *la, *lb;    /* lock "x": la (owner A) holds it, lb (owner B) does not */
	opq_lease_attr *lattr; /* owner B */
	opq_lease_grant grant;
	int64_t ns;
	char buf[64];
	opq_scope *sc; /* root scope on qr */
	opq_scope_attr *sattr;
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

	ck_assert_int_eq(opq_lease_provider_memory_create(&f->pm), 0);
	ck_assert_int_eq(opq_lease_attr_create(&f->lattr), 0);
	ck_assert_int_eq(opq_lease_attr_set_owner(f->lattr, "A"), 0);
	ck_assert_int_eq(opq_lease_create(&f->la, f->pm, "x", f->lattr), 0);
	ck_assert_int_eq(opq_lease_attr_set_owner(f->lattr, "B"), 0);
	ck_assert_int_eq(opq_lease_create(&f->lb, f->pm, "x", f->lattr), 0);
	ck_assert_int_eq(opq_lease_try_acquire(f->la, &f->grant), 0);
	ck_assert_int_eq(opq_scope_create(&f->sc, f->qr, NULL), 0);
	ck_assert_int_eq(opq_scope_attr_create(&f->sattr), 0);

	f->bad_hi = (struct timespec){.tv_sec = 0, .tv_nsec = 1000000000};
	f->bad_neg = (struct timespec){.tv_sec = 0, .tv_nsec = -1};
	f->past = (struct timespec){.tv_sec = 0, .tv_nsec = 0};
	atomic_store(&performed, 0);
}

static int task_ok(opq_scope *scope, void *arg)
{
	(void)scope;
	atomic_fetch_add((atomic_long *)arg, 1);
	return 0;
}

/* Sleeps until cancelled; *arg (an opq_scope **) gets its scope first. */
static int task_block(opq_scope *scope, void *arg)
{
	*(opq_scope * _Atomic *)arg = scope;
	return opq_scope_sleep(scope, NULL);
}

static atomic_int inner_rc;

/* Waits for the root scope it runs in: EDEADLK. */
static int task_wait_root(opq_scope *scope, void *arg)
{
	(void)scope;
	atomic_store(&inner_rc, opq_scope_wait(arg, NULL, NULL));
	return 0;
}

static void lost(opq_lease *lease, enum opq_lease_lost_reason why, void *arg)
{
	(void)lease;
	(void)why;
	(void)arg;
}

static int p_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	(void)store;
	(void)req;
	*token = 1;
	return 0;
}

static int p_other(void *store, const opq_lease_request *req)
{
	(void)store;
	(void)req;
	return 0;
}

/* The lease handles and the scope still work, then go cleanly. */
static void fx_lease_scope_teardown(struct fx *f)
{
	struct timespec dl = t_deadline(T_WAIT_NS);
	/* The scope: whatever a row left is cancelled and waited for; a fresh
	 * root on the same queue runs a task. */
	ck_assert_int_eq(opq_scope_cancel(f->sc), 0);
	ck_assert_int_eq(opq_scope_wait(f->sc, &dl, NULL), 0);
	ck_assert_int_eq(opq_scope_destroy(f->sc), 0);
	opq_scope_attr_destroy(f->sattr);
	atomic_long ran = 0;
	opq_scope *s;
	int first = -1;
	ck_assert_int_eq(opq_scope_create(&s, f->qr, NULL), 0);
	ck_assert_int_eq(opq_scope_spawn(s, NULL, task_ok, &ran, NULL, NULL, NULL), 0);
	ck_assert_int_eq(opq_scope_wait(s, &dl, &first), 0);
	ck_assert_int_eq(first, 0);
	ck_assert_int_eq(atomic_load(&ran), 1);
	ck_assert_int_eq(opq_scope_destroy(s), 0);

	/* The leases: A releases; B takes the lock with a new token and gives it back. */
	ck_assert_int_eq(opq_lease_release(f->la), 0);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(f->lb, &g), 0);
	ck_assert_uint_gt(g.token, f->grant.token);
	ck_assert_int_eq(opq_lease_refresh(f->lb, NULL), 0);
	ck_assert_int_eq(opq_lease_release(f->lb), 0);
	ck_assert_int_eq(opq_lease_grant_get(f->lb, &g), ENOLCK);
	ck_assert_int_eq(opq_lease_destroy(f->la), 0);
	ck_assert_int_eq(opq_lease_destroy(f->lb), 0);
	opq_lease_attr_destroy(f->lattr);
	ck_assert_int_eq(opq_lease_provider_destroy(f->pm), 0);
}

/* Every object still works, then is destroyed without EBUSY. */
static void fx_check_and_teardown(void)
{
	struct fx *f = &F;
	struct timespec dl = t_deadline(T_WAIT_NS);
	fx_lease_scope_teardown(f);
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
R(attr_stack_null_attr) { UNUSED; return opq_queue_attr_set_stack_size(NULL, 1 << 20); }
R(attr_stack_tiny) { return opq_queue_attr_set_stack_size(f->attr, 1); }
R(attr_stack_below_min) { return opq_queue_attr_set_stack_size(f->attr, PTHREAD_STACK_MIN - 1); }
R(attr_stack_default) { return opq_queue_attr_set_stack_size(f->attr, 0); }
R(attr_stack_huge) { return opq_queue_attr_set_stack_size(f->attr, SIZE_MAX); }
R(attr_getstack_null_attr) { return opq_queue_attr_get_stack_size(NULL, &f->sz); }
R(attr_getstack_null_out) { return opq_queue_attr_get_stack_size(f->attr, NULL); }
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

/* lease: attributes */
R(lattr_create_null) { UNUSED; return opq_lease_attr_create(NULL); }
R(lattr_destroy_null) { UNUSED; opq_lease_attr_destroy(NULL); return 0; }
R(lattr_chan_null_attr) { UNUSED; return opq_lease_attr_set_chan(NULL, NULL); }
R(lattr_chan_none) { return opq_lease_attr_set_chan(f->lattr, NULL); }
R(lattr_owner_null_attr) { UNUSED; return opq_lease_attr_set_owner(NULL, "o"); }
R(lattr_owner_null) { return opq_lease_attr_set_owner(f->lattr, NULL); }
R(lattr_owner_empty) { return opq_lease_attr_set_owner(f->lattr, ""); }
R(lattr_owner_too_long) { char o[OPQ_LEASE_OWNER_MAX + 2]; memset(o, 'o', sizeof(o) - 1); o[sizeof(o) - 1] = 0; return opq_lease_attr_set_owner(f->lattr, o); }
R(lattr_owner_longest) { char o[OPQ_LEASE_OWNER_MAX + 1]; memset(o, 'o', sizeof(o) - 1); o[sizeof(o) - 1] = 0; return opq_lease_attr_set_owner(f->lattr, o); }
R(lattr_duration_null) { UNUSED; return opq_lease_attr_set_duration(NULL, 1000); }
R(lattr_duration_zero) { return opq_lease_attr_set_duration(f->lattr, 0); }
R(lattr_duration_negative) { return opq_lease_attr_set_duration(f->lattr, -1); }
R(lattr_duration_max) { return opq_lease_attr_set_duration(f->lattr, INT64_MAX); }
R(lattr_margin_null) { UNUSED; return opq_lease_attr_set_margin(NULL, 0, 0); }
R(lattr_margin_neg_ppm) { return opq_lease_attr_set_margin(f->lattr, -1, 0); }
R(lattr_margin_neg_fixed) { return opq_lease_attr_set_margin(f->lattr, 0, -1); }
R(lattr_margin_zero) { return opq_lease_attr_set_margin(f->lattr, 0, 0); }
R(lattr_poll_null) { UNUSED; return opq_lease_attr_set_poll(NULL, 1, 1); }
R(lattr_poll_zero) { return opq_lease_attr_set_poll(f->lattr, 0, 1); }
R(lattr_poll_min_gt_max) { return opq_lease_attr_set_poll(f->lattr, 2, 1); }
R(lattr_poll_equal) { return opq_lease_attr_set_poll(f->lattr, 5, 5); }
R(lattr_data_null_attr) { UNUSED; return opq_lease_attr_set_data(NULL, "d", 1); }
R(lattr_data_null_len) { return opq_lease_attr_set_data(f->lattr, NULL, 1); }
R(lattr_data_too_long) { static char d[OPQ_LEASE_DATA_MAX + 1]; return opq_lease_attr_set_data(f->lattr, d, sizeof(d)); }
R(lattr_data_longest) { static char d[OPQ_LEASE_DATA_MAX]; return opq_lease_attr_set_data(f->lattr, d, sizeof(d)); }
R(lattr_data_none) { return opq_lease_attr_set_data(f->lattr, NULL, 0); }
/* lease: handles */
R(lcreate_null_out) { return opq_lease_create(NULL, f->pm, "y", NULL); }
R(lcreate_null_provider) { opq_lease *l; UNUSED; return opq_lease_create(&l, NULL, "y", NULL); }
R(lcreate_null_name) { opq_lease *l; return opq_lease_create(&l, f->pm, NULL, NULL); }
R(lcreate_empty_name) { opq_lease *l; return opq_lease_create(&l, f->pm, "", NULL); }
R(lcreate_name_too_long) { opq_lease *l; char n[OPQ_LEASE_NAME_MAX + 2]; memset(n, 'n', sizeof(n) - 1); n[sizeof(n) - 1] = 0; return opq_lease_create(&l, f->pm, n, NULL); }
R(lcreate_name_longest)
{
	opq_lease *l;
	char n[OPQ_LEASE_NAME_MAX + 1];
	memset(n, 'n', sizeof(n) - 1);
	n[sizeof(n) - 1] = 0;
	int rc = opq_lease_create(&l, f->pm, n, NULL);
	if (rc)
		return rc;
	ck_assert_int_eq(opq_lease_try_acquire(l, NULL), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	return opq_lease_destroy(l);
}
R(lcreate_margin_eq_lease) { opq_lease *l; ck_assert_int_eq(opq_lease_attr_set_duration(f->lattr, 10000000), 0); ck_assert_int_eq(opq_lease_attr_set_margin(f->lattr, 0, 10000000), 0); return opq_lease_create(&l, f->pm, "y", f->lattr); }
R(lcreate_margin_gt_lease) { opq_lease *l; ck_assert_int_eq(opq_lease_attr_set_duration(f->lattr, 10000000), 0); ck_assert_int_eq(opq_lease_attr_set_margin(f->lattr, 0, 20000000), 0); return opq_lease_create(&l, f->pm, "y", f->lattr); }
R(lcreate_margin_ppm_all) { opq_lease *l; ck_assert_int_eq(opq_lease_attr_set_margin(f->lattr, 1000000, 0), 0); return opq_lease_create(&l, f->pm, "y", f->lattr); }
R(lcreate_margin_just_below)
{
	opq_lease *l;
	ck_assert_int_eq(opq_lease_attr_set_duration(f->lattr, 10000000), 0);
	ck_assert_int_eq(opq_lease_attr_set_margin(f->lattr, 0, 9999999), 0);
	int rc = opq_lease_create(&l, f->pm, "y", f->lattr);
	return rc ? rc : opq_lease_destroy(l);
}
R(ldestroy_null) { UNUSED; return opq_lease_destroy(NULL); }
R(ltry_null) { return opq_lease_try_acquire(NULL, &f->grant); }
R(ltry_held_by_other) { int rc = opq_lease_try_acquire(f->lb, &f->grant); ck_assert_int_eq(opq_lease_grant_get(f->lb, &f->grant), ENOLCK); return rc; }
R(ltry_holder_again) { opq_lease_grant g; int rc = opq_lease_try_acquire(f->la, &g); return rc ? rc : g.token == f->grant.token ? 0 : -1; }
R(lacquire_null) { UNUSED; return opq_lease_acquire(NULL, NULL, NULL); }
R(lacquire_nsec_1e9) { return opq_lease_acquire(f->lb, &f->bad_hi, NULL); }
R(lacquire_nsec_negative) { return opq_lease_acquire(f->lb, &f->bad_neg, NULL); }
R(lacquire_busy_past) { return opq_lease_acquire(f->lb, &f->past, NULL); }
R(lcancel_null) { UNUSED; return opq_lease_cancel(NULL); }
R(lcancel_twice) { ck_assert_int_eq(opq_lease_cancel(f->lb), 0); return opq_lease_cancel(f->lb); }
R(lcancel_then_acquire) { ck_assert_int_eq(opq_lease_cancel(f->lb), 0); return opq_lease_acquire(f->lb, NULL, NULL); }
R(lcancel_then_try) { ck_assert_int_eq(opq_lease_cancel(f->la), 0); return opq_lease_try_acquire(f->la, NULL); }
R(lcancel_then_release) { ck_assert_int_eq(opq_lease_cancel(f->la), 0); int rc = opq_lease_release(f->la); ck_assert_int_eq(opq_lease_try_acquire(f->la, &f->grant), 0); return rc; }
R(lrequest_check_null) { UNUSED; return opq_lease_request_check(NULL); }
R(lrefresh_null) { return opq_lease_refresh(NULL, &f->grant); }
R(lrefresh_not_held) { return opq_lease_refresh(f->lb, NULL); }
R(lrefresh_after_release) { ck_assert_int_eq(opq_lease_release(f->la), 0); int rc = opq_lease_refresh(f->la, NULL); ck_assert_int_eq(opq_lease_try_acquire(f->la, &f->grant), 0); return rc; }
R(lrefresh_same_token) { opq_lease_grant g; int rc = opq_lease_refresh(f->la, &g); return rc ? rc : g.token == f->grant.token ? 0 : -1; }
R(lrelease_null) { UNUSED; return opq_lease_release(NULL); }
R(lrelease_not_held) { return opq_lease_release(f->lb); }
R(lrelease_twice) { ck_assert_int_eq(opq_lease_release(f->la), 0); int rc = opq_lease_release(f->la); ck_assert_int_eq(opq_lease_try_acquire(f->la, &f->grant), 0); return rc; }
R(lremaining_null) { return opq_lease_remaining(NULL, NULL, &f->ns); }
R(lremaining_null_out) { return opq_lease_remaining(f->la, NULL, NULL); }
R(lremaining_nsec_1e9) { return opq_lease_remaining(f->la, &f->bad_hi, &f->ns); }
R(lremaining_nsec_negative) { return opq_lease_remaining(f->la, &f->bad_neg, &f->ns); }
R(lremaining_not_held) { f->ns = -1; int rc = opq_lease_remaining(f->lb, NULL, &f->ns); return rc ? rc : f->ns == 0 ? 0 : -1; }
R(lremaining_held) { f->ns = -1; int rc = opq_lease_remaining(f->la, NULL, &f->ns); return rc ? rc : f->ns > 0 ? 0 : -1; }
R(lgrant_null) { return opq_lease_grant_get(NULL, &f->grant); }
R(lgrant_null_out) { return opq_lease_grant_get(f->la, NULL); }
R(lgrant_not_held) { return opq_lease_grant_get(f->lb, &f->grant); }
R(lerror_null) { return opq_lease_error(NULL, f->buf, sizeof(f->buf)); }
R(lerror_null_buf) { return opq_lease_error(f->la, NULL, 8); }
R(lerror_len_zero) { return opq_lease_error(f->la, f->buf, 0); }
R(lerror_len_one) { f->buf[0] = 'z'; int rc = opq_lease_error(f->la, f->buf, 1); return rc ? rc : f->buf[0] == 0 ? 0 : -1; }
/* lease: keepalive */
R(lka_null_lease) { return opq_lease_keepalive_start(NULL, f->qr, 0, lost, NULL); }
R(lka_null_queue) { return opq_lease_keepalive_start(f->la, NULL, 0, lost, NULL); } /* its own thread */
R(lka_null_queue_twice) { ck_assert_int_eq(opq_lease_keepalive_start(f->la, NULL, 0, lost, NULL), 0); return opq_lease_keepalive_start(f->la, f->qr, 0, lost, NULL); }
R(lka_null_queue_restart) { ck_assert_int_eq(opq_lease_keepalive_start(f->la, NULL, 0, lost, NULL), 0); ck_assert_int_eq(opq_lease_keepalive_stop(f->la), 0); return opq_lease_keepalive_start(f->la, NULL, 0, lost, NULL); }
R(lka_null_lost) { return opq_lease_keepalive_start(f->la, f->qr, 0, NULL, NULL); }
R(lka_negative_interval) { return opq_lease_keepalive_start(f->la, f->qr, -1, lost, NULL); }
R(lka_interval_too_long) { return opq_lease_keepalive_start(f->la, f->qr, 10000000000LL, lost, NULL); }
R(lka_not_held) { return opq_lease_keepalive_start(f->lb, f->qr, 0, lost, NULL); }
R(lka_twice) { ck_assert_int_eq(opq_lease_keepalive_start(f->la, f->qr, 0, lost, NULL), 0); return opq_lease_keepalive_start(f->la, f->qr, 0, lost, NULL); }
R(lka_stopped_queue) { return opq_lease_keepalive_start(f->la, f->qs, 0, lost, NULL); }
R(lka_stop_null) { UNUSED; return opq_lease_keepalive_stop(NULL); }
R(lka_stop_none) { return opq_lease_keepalive_stop(f->la); }
R(lka_stop_twice) { ck_assert_int_eq(opq_lease_keepalive_start(f->la, f->qr, 0, lost, NULL), 0); ck_assert_int_eq(opq_lease_keepalive_stop(f->la), 0); return opq_lease_keepalive_stop(f->la); }
R(lka_restart) { ck_assert_int_eq(opq_lease_keepalive_start(f->la, f->qr, 0, lost, NULL), 0); ck_assert_int_eq(opq_lease_keepalive_stop(f->la), 0); return opq_lease_keepalive_start(f->la, f->qr, 0, lost, NULL); }
/* lease: providers */
R(lprov_null_out) { opq_lease_provider_ops o = {.acquire = p_acquire, .refresh = p_other, .release = p_other}; (void)f; return opq_lease_provider_create(NULL, &o, NULL); }
R(lprov_null_ops) { opq_lease_provider *p; (void)f; return opq_lease_provider_create(&p, NULL, NULL); }
R(lprov_no_acquire) { opq_lease_provider *p; opq_lease_provider_ops o = {.refresh = p_other, .release = p_other}; (void)f; return opq_lease_provider_create(&p, &o, NULL); }
R(lprov_no_refresh) { opq_lease_provider *p; opq_lease_provider_ops o = {.acquire = p_acquire, .release = p_other}; (void)f; return opq_lease_provider_create(&p, &o, NULL); }
R(lprov_no_release) { opq_lease_provider *p; opq_lease_provider_ops o = {.acquire = p_acquire, .refresh = p_other}; (void)f; return opq_lease_provider_create(&p, &o, NULL); }
R(lprov_no_destroy)
{
	opq_lease_provider *p;
	opq_lease_provider_ops o = {.acquire = p_acquire, .refresh = p_other, .release = p_other};
	opq_lease *l;
	(void)f;
	int rc = opq_lease_provider_create(&p, &o, NULL);
	if (rc)
		return rc;
	ck_assert_int_eq(opq_lease_create(&l, p, "y", NULL), 0);
	ck_assert_int_eq(opq_lease_try_acquire(l, NULL), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	return opq_lease_provider_destroy(p);
}
R(lprov_memory_null) { UNUSED; return opq_lease_provider_memory_create(NULL); }
R(lprov_destroy_null) { UNUSED; return opq_lease_provider_destroy(NULL); }
R(lprov_destroy_in_use) { return opq_lease_provider_destroy(f->pm); }

/* scope: attributes */
R(sattr_create_null) { UNUSED; return opq_scope_attr_create(NULL); }
R(sattr_destroy_null) { UNUSED; opq_scope_attr_destroy(NULL); return 0; }
R(sattr_policy_null) { UNUSED; return opq_scope_attr_set_policy(NULL, OPQ_SCOPE_COLLECT); }
R(sattr_policy_bad) { return opq_scope_attr_set_policy(f->sattr, 3); }
R(sattr_policy_negative) { return opq_scope_attr_set_policy(f->sattr, -1); }
R(sattr_policy_first_error) { return opq_scope_attr_set_policy(f->sattr, OPQ_SCOPE_FIRST_ERROR); }
R(sattr_policy_isolate) { return opq_scope_attr_set_policy(f->sattr, OPQ_SCOPE_ISOLATE); }
R(sattr_deadline_null_attr) { return opq_scope_attr_set_deadline(NULL, &f->past); }
R(sattr_deadline_nsec_1e9) { return opq_scope_attr_set_deadline(f->sattr, &f->bad_hi); }
R(sattr_deadline_nsec_negative) { return opq_scope_attr_set_deadline(f->sattr, &f->bad_neg); }
R(sattr_deadline_none) { return opq_scope_attr_set_deadline(f->sattr, NULL); }
/* scope: roots */
R(screate_null_out) { return opq_scope_create(NULL, f->qr, NULL); }
R(screate_null_queue) { opq_scope *s; UNUSED; return opq_scope_create(&s, NULL, NULL); }
R(screate_past_deadline)
{
	/* A root whose deadline has passed: cancelled at once, takes no spawn. */
	opq_scope *s;
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_scope_attr_set_deadline(f->sattr, &f->past), 0);
	ck_assert_int_eq(opq_scope_create(&s, f->qr, f->sattr), 0);
	while (!opq_scope_cancelled(s))
		ck_assert_int_eq(opq_scope_sleep(s, &dl), ECANCELED);
	int rc = opq_scope_spawn(s, NULL, task_ok, &performed, NULL, NULL, NULL);
	int first = 0;
	ck_assert_int_eq(opq_scope_wait(s, &dl, &first), 0);
	ck_assert_int_eq(first, ETIMEDOUT);
	ck_assert_int_eq(opq_scope_destroy(s), 0);
	return rc;
}
R(sdestroy_null) { UNUSED; return opq_scope_destroy(NULL); }
R(sdestroy_busy)
{
	opq_scope *_Atomic ts = NULL;
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_scope_spawn(f->sc, NULL, task_block, (void *)&ts, NULL, NULL, NULL), 0);
	T_WAIT_UNTIL(atomic_load(&ts) != NULL);
	int rc = opq_scope_destroy(f->sc);
	ck_assert_int_eq(opq_scope_wait(f->sc, &f->past, NULL), ETIMEDOUT);
	ck_assert_int_eq(opq_scope_cancel(f->sc), 0);
	ck_assert_int_eq(opq_scope_wait(f->sc, &dl, NULL), 0);
	return rc;
}
R(sdestroy_task_scope)
{
	opq_scope *_Atomic ts = NULL;
	opq_task *t;
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_scope_spawn(f->sc, NULL, task_block, (void *)&ts, NULL, NULL, &t), 0);
	T_WAIT_UNTIL(atomic_load(&ts) != NULL);
	int rc = opq_scope_destroy(atomic_load(&ts));
	/* And from outside the task, its scope takes no spawn. */
	ck_assert_int_eq(opq_scope_spawn(atomic_load(&ts), NULL, task_ok, &performed, NULL, NULL, NULL), EPERM);
	ck_assert_int_eq(opq_task_cancel(t), 0);
	int res = 0;
	ck_assert_int_eq(opq_task_wait(t, &dl, &res), 0);
	ck_assert_int_eq(res, ECANCELED);
	ck_assert_int_eq(opq_task_release(t), 0);
	return rc;
}
/* scope: spawn */
R(spawn_null_scope) { UNUSED; return opq_scope_spawn(NULL, NULL, task_ok, &performed, NULL, NULL, NULL); }
R(spawn_null_fn) { return opq_scope_spawn(f->sc, NULL, NULL, NULL, NULL, NULL, NULL); }
R(spawn_after_cancel) { ck_assert_int_eq(opq_scope_cancel(f->sc), 0); return opq_scope_spawn(f->sc, NULL, task_ok, &performed, NULL, NULL, NULL); }
R(spawn_timeout_null_scope) { UNUSED; return opq_scope_spawn_timeout(NULL, NULL, 1000, task_ok, &performed, NULL, NULL, NULL); }
R(spawn_timeout_null_fn) { return opq_scope_spawn_timeout(f->sc, NULL, 1000, NULL, NULL, NULL, NULL, NULL); }
R(spawn_timeout_after_cancel) { ck_assert_int_eq(opq_scope_cancel(f->sc), 0); return opq_scope_spawn_timeout(f->sc, NULL, 1000, task_ok, &performed, NULL, NULL, NULL); }
R(spawn_timeout_negative)
{
	/* Timed out at once: spawned, ends with ETIMEDOUT, never runs. */
	opq_task *t;
	int res = -1;
	struct timespec dl = t_deadline(T_WAIT_NS);
	int rc = opq_scope_spawn_timeout(f->sc, NULL, INT64_MIN, task_ok, &performed, NULL, NULL, &t);
	if (rc)
		return rc;
	ck_assert_int_eq(opq_task_wait(t, &dl, &res), 0);
	ck_assert_int_eq(res, ETIMEDOUT);
	return opq_task_release(t);
}
R(spawn_stopped_queue)
{
	opq_scope *s;
	ck_assert_int_eq(opq_scope_create(&s, f->qs, NULL), 0);
	int rc = opq_scope_spawn(s, NULL, task_ok, &performed, NULL, NULL, NULL);
	ck_assert_int_eq(opq_scope_wait(s, &f->past, NULL), 0);
	ck_assert_int_eq(opq_scope_destroy(s), 0);
	return rc;
}
R(spawn_past_deadline_attr)
{
	/* A task whose own deadline has passed: spawned, ends with ETIMEDOUT or runs. */
	opq_task *t;
	int res = -1;
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_scope_attr_set_deadline(f->sattr, &f->past), 0);
	opq_scope *_Atomic ts = NULL;
	int rc = opq_scope_spawn(f->sc, f->sattr, task_block, (void *)&ts, NULL, NULL, &t);
	if (rc)
		return rc;
	ck_assert_int_eq(opq_task_wait(t, &dl, &res), 0);
	ck_assert_int_eq(res, ETIMEDOUT);
	return opq_task_release(t);
}
R(current_outside_task) { UNUSED; return opq_scope_current() == NULL ? 0 : -1; }
/* scope: cancel */
R(scancel_null) { UNUSED; return opq_scope_cancel(NULL); }
R(tcancel_null) { UNUSED; return opq_task_cancel(NULL); }
R(scancel_twice) { ck_assert_int_eq(opq_scope_cancel(f->sc), 0); return opq_scope_cancel(f->sc); }
R(scancelled_null) { UNUSED; return opq_scope_cancelled(NULL); }
R(tcancelled_null) { UNUSED; return opq_task_cancelled(NULL); }
R(scancelled_fresh) { return opq_scope_cancelled(f->sc); }
/* scope: waits */
R(swait_null) { UNUSED; return opq_scope_wait(NULL, NULL, NULL); }
R(swait_nsec_1e9) { return opq_scope_wait(f->sc, &f->bad_hi, NULL); }
R(swait_nsec_negative) { return opq_scope_wait(f->sc, &f->bad_neg, NULL); }
R(swait_empty_past) { f->i = -1; int rc = opq_scope_wait(f->sc, &f->past, &f->i); return rc ? rc : f->i == 0 ? 0 : -1; }
R(swait_from_inside)
{
	struct timespec dl = t_deadline(T_WAIT_NS);
	atomic_store(&inner_rc, -1);
	ck_assert_int_eq(opq_scope_spawn(f->sc, NULL, task_wait_root, f->sc, NULL, NULL, NULL), 0);
	ck_assert_int_eq(opq_scope_wait(f->sc, &dl, NULL), 0);
	return atomic_load(&inner_rc);
}
R(twait_null) { UNUSED; return opq_task_wait(NULL, NULL, NULL); }
R(twait_nsec_1e9)
{
	opq_task *t;
	ck_assert_int_eq(opq_scope_spawn(f->sc, NULL, task_ok, &performed, NULL, NULL, &t), 0);
	int rc = opq_task_wait(t, &f->bad_hi, NULL);
	ck_assert_int_eq(opq_task_release(t), 0);
	return rc;
}
R(twait_twice)
{
	opq_task *t;
	int r1 = -1, r2 = -1;
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_scope_spawn(f->sc, NULL, task_ok, &performed, NULL, NULL, &t), 0);
	ck_assert_int_eq(opq_task_wait(t, &dl, &r1), 0);
	int rc = opq_task_wait(t, &dl, &r2);
	ck_assert_int_eq(opq_task_release(t), 0);
	return rc ? rc : r1 == 0 && r2 == 0 ? 0 : -1;
}
R(twait_busy_past)
{
	opq_scope *_Atomic ts = NULL;
	opq_task *t;
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_scope_spawn(f->sc, NULL, task_block, (void *)&ts, NULL, NULL, &t), 0);
	int rc = opq_task_wait(t, &f->past, NULL);
	ck_assert_int_eq(opq_task_cancel(t), 0);
	ck_assert_int_eq(opq_task_wait(t, &dl, NULL), 0);
	ck_assert_int_eq(opq_task_release(t), 0);
	return rc;
}
R(trelease_null) { UNUSED; return opq_task_release(NULL); }
/* scope: sleep */
R(ssleep_null) { return opq_scope_sleep(NULL, &f->past); }
R(ssleep_nsec_1e9) { return opq_scope_sleep(f->sc, &f->bad_hi); }
R(ssleep_nsec_negative) { return opq_scope_sleep(f->sc, &f->bad_neg); }
R(ssleep_past) { return opq_scope_sleep(f->sc, &f->past); }
R(ssleep_cancelled) { ck_assert_int_eq(opq_scope_cancel(f->sc), 0); return opq_scope_sleep(f->sc, NULL); }

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
    ROW(attr_stack_null_attr, EINVAL),
    ROW(attr_stack_tiny, EINVAL),
    ROW(attr_stack_below_min, EINVAL),
    ROW(attr_stack_default, 0),
    ROW(attr_stack_huge, 0),
    ROW(attr_getstack_null_attr, EINVAL),
    ROW(attr_getstack_null_out, EINVAL),
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

    ROW(lattr_create_null, EINVAL),
    ROW(lattr_destroy_null, 0),
    ROW(lattr_chan_null_attr, EINVAL),
    ROW(lattr_chan_none, 0),
    ROW(lattr_owner_null_attr, EINVAL),
    ROW(lattr_owner_null, EINVAL),
    ROW(lattr_owner_empty, EINVAL),
    ROW(lattr_owner_too_long, EINVAL),
    ROW(lattr_owner_longest, 0),
    ROW(lattr_duration_null, EINVAL),
    ROW(lattr_duration_zero, EINVAL),
    ROW(lattr_duration_negative, EINVAL),
    ROW(lattr_duration_max, 0),
    ROW(lattr_margin_null, EINVAL),
    ROW(lattr_margin_neg_ppm, EINVAL),
    ROW(lattr_margin_neg_fixed, EINVAL),
    ROW(lattr_margin_zero, 0),
    ROW(lattr_poll_null, EINVAL),
    ROW(lattr_poll_zero, EINVAL),
    ROW(lattr_poll_min_gt_max, EINVAL),
    ROW(lattr_poll_equal, 0),
    ROW(lattr_data_null_attr, EINVAL),
    ROW(lattr_data_null_len, EINVAL),
    ROW(lattr_data_too_long, EINVAL),
    ROW(lattr_data_longest, 0),
    ROW(lattr_data_none, 0),
    ROW(lcreate_null_out, EINVAL),
    ROW(lcreate_null_provider, EINVAL),
    ROW(lcreate_null_name, EINVAL),
    ROW(lcreate_empty_name, EINVAL),
    ROW(lcreate_name_too_long, EINVAL),
    ROW(lcreate_name_longest, 0),
    ROW(lcreate_margin_eq_lease, EINVAL),
    ROW(lcreate_margin_gt_lease, EINVAL),
    ROW(lcreate_margin_ppm_all, EINVAL),
    ROW(lcreate_margin_just_below, 0),
    ROW(ldestroy_null, 0),
    ROW(ltry_null, EINVAL),
    ROW(ltry_held_by_other, EBUSY),
    ROW(ltry_holder_again, 0),
    ROW(lacquire_null, EINVAL),
    ROW(lacquire_nsec_1e9, EINVAL),
    ROW(lacquire_nsec_negative, EINVAL),
    ROW(lacquire_busy_past, ETIMEDOUT),
    ROW(lcancel_null, EINVAL),
    ROW(lcancel_twice, 0),
    ROW(lcancel_then_acquire, ECANCELED),
    ROW(lcancel_then_try, 0),
    ROW(lcancel_then_release, 0),
    ROW(lrequest_check_null, EINVAL),
    ROW(lrefresh_null, EINVAL),
    ROW(lrefresh_not_held, ENOLCK),
    ROW(lrefresh_after_release, ENOLCK),
    ROW(lrefresh_same_token, 0),
    ROW(lrelease_null, EINVAL),
    ROW(lrelease_not_held, 0),
    ROW(lrelease_twice, 0),
    ROW(lremaining_null, EINVAL),
    ROW(lremaining_null_out, EINVAL),
    ROW(lremaining_nsec_1e9, EINVAL),
    ROW(lremaining_nsec_negative, EINVAL),
    ROW(lremaining_not_held, 0),
    ROW(lremaining_held, 0),
    ROW(lgrant_null, EINVAL),
    ROW(lgrant_null_out, EINVAL),
    ROW(lgrant_not_held, ENOLCK),
    ROW(lerror_null, EINVAL),
    ROW(lerror_null_buf, EINVAL),
    ROW(lerror_len_zero, EINVAL),
    ROW(lerror_len_one, 0),
    ROW(lka_null_lease, EINVAL),
    ROW(lka_null_queue, 0),
    ROW(lka_null_queue_twice, EBUSY),
    ROW(lka_null_queue_restart, 0),
    ROW(lka_null_lost, EINVAL),
    ROW(lka_negative_interval, EINVAL),
    ROW(lka_interval_too_long, EINVAL),
    ROW(lka_not_held, ENOLCK),
    ROW(lka_twice, EBUSY),
    ROW(lka_stopped_queue, ESHUTDOWN),
    ROW(lka_stop_null, EINVAL),
    ROW(lka_stop_none, 0),
    ROW(lka_stop_twice, 0),
    ROW(lka_restart, 0),
    ROW(lprov_null_out, EINVAL),
    ROW(lprov_null_ops, EINVAL),
    ROW(lprov_no_acquire, EINVAL),
    ROW(lprov_no_refresh, EINVAL),
    ROW(lprov_no_release, EINVAL),
    ROW(lprov_no_destroy, 0),
    ROW(lprov_memory_null, EINVAL),
    ROW(lprov_destroy_null, 0),
    ROW(lprov_destroy_in_use, EBUSY),

    ROW(sattr_create_null, EINVAL),
    ROW(sattr_destroy_null, 0),
    ROW(sattr_policy_null, EINVAL),
    ROW(sattr_policy_bad, EINVAL),
    ROW(sattr_policy_negative, EINVAL),
    ROW(sattr_policy_first_error, 0),
    ROW(sattr_policy_isolate, 0),
    ROW(sattr_deadline_null_attr, EINVAL),
    ROW(sattr_deadline_nsec_1e9, EINVAL),
    ROW(sattr_deadline_nsec_negative, EINVAL),
    ROW(sattr_deadline_none, 0),
    ROW(screate_null_out, EINVAL),
    ROW(screate_null_queue, EINVAL),
    ROW(screate_past_deadline, ECANCELED),
    ROW(sdestroy_null, 0),
    ROW(sdestroy_busy, EBUSY),
    ROW(sdestroy_task_scope, EINVAL),
    ROW(spawn_null_scope, EINVAL),
    ROW(spawn_null_fn, EINVAL),
    ROW(spawn_after_cancel, ECANCELED),
    ROW(spawn_timeout_null_scope, EINVAL),
    ROW(spawn_timeout_null_fn, EINVAL),
    ROW(spawn_timeout_after_cancel, ECANCELED),
    ROW(spawn_timeout_negative, 0),
    ROW(spawn_stopped_queue, ESHUTDOWN),
    ROW(spawn_past_deadline_attr, 0),
    ROW(current_outside_task, 0),
    ROW(scancel_null, EINVAL),
    ROW(tcancel_null, EINVAL),
    ROW(scancel_twice, 0),
    ROW(scancelled_null, 0),
    ROW(tcancelled_null, 0),
    ROW(scancelled_fresh, 0),
    ROW(swait_null, EINVAL),
    ROW(swait_nsec_1e9, EINVAL),
    ROW(swait_nsec_negative, EINVAL),
    ROW(swait_empty_past, 0),
    ROW(swait_from_inside, EDEADLK),
    ROW(twait_null, EINVAL),
    ROW(twait_nsec_1e9, EINVAL),
    ROW(twait_twice, 0),
    ROW(twait_busy_past, ETIMEDOUT),
    ROW(trelease_null, EINVAL),
    ROW(ssleep_null, EINVAL),
    ROW(ssleep_nsec_1e9, EINVAL),
    ROW(ssleep_nsec_negative, EINVAL),
    ROW(ssleep_past, 0),
    ROW(ssleep_cancelled, ECANCELED),
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
