/*
 * check_scope.c: scopes. Links the convenience library to reach the
 * fault injector and opq__cancel_sleep_until.
 */
#include "harness.h"
#include "fault.h"
#include "internal.h"
#include "queue_impl.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#define MS 1000000LL
/* How long a cancelled blocking call may take to return (generous: shared, sanitized machines). */
#define PROMPT_NS (2000 * MS)

static opq_queue *mkqueue(unsigned runners, size_t capacity)
{
	opq_queue_attr *a;
	opq_queue *q;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_capacity(a, capacity), 0);
	ck_assert_int_eq(opq_queue_create(&q, a), 0);
	opq_queue_attr_destroy(a);
	ck_assert_int_eq(opq_queue_start(q, runners), 0);
	return q;
}

static void rmqueue(opq_queue *q)
{
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}

static struct timespec t_forever(void)
{
	return t_deadline(T_WAIT_NS);
}

/* Wait for a whole scope with the test's bound. */
static int wait_scope(opq_scope *s)
{
	struct timespec dl = t_forever();
	int first = -1;
	ck_assert_int_eq(opq_scope_wait(s, &dl, &first), 0);
	return first;
}

static int wait_task(opq_task *t)
{
	struct timespec dl = t_forever();
	int result = -1;
	ck_assert_int_eq(opq_task_wait(t, &dl, &result), 0);
	return result;
}

/* ---- the order of termination ------------------------------------------ */

enum { EV_A_RETURNED, EV_B1_CANCELLED, EV_B2_CANCELLED, EV_B1_DONE, EV_B2_DONE, EV_A_DONE, EV_N };

static atomic_int ev_clock;
static atomic_int ev_at[EV_N];

static void ev(int e)
{
	atomic_store(&ev_at[e], atomic_fetch_add(&ev_clock, 1) + 1);
}

static atomic_int b_started;

static int sleeper_b(opq_scope *s, void *arg)
{
	atomic_fetch_add(&b_started, 1);
	int rc = opq_scope_sleep(s, NULL);
	ck_assert_int_eq(rc, ECANCELED);
	ev((int)(intptr_t)arg);
	return rc;
}

/* done_arg: the event to record; arg is the task's own (the sleeper's event or the order_arg). */
static void done_ev(void *arg, void *done_arg, int result)
{
	(void)arg;
	(void)result;
	ev((int)(intptr_t)done_arg);
}

struct order_arg {
	bool wait_for_cancel;
	struct t_gate started;
};

static int parent_a(opq_scope *s, void *arg)
{
	struct order_arg *oa = arg;
	ck_assert_ptr_eq(opq_scope_current(), s);
	ck_assert_int_eq(opq_scope_spawn(s, NULL, sleeper_b, (void *)(intptr_t)EV_B1_CANCELLED,
	                                 done_ev, (void *)(intptr_t)EV_B1_DONE, NULL),
	                 0);
	ck_assert_int_eq(opq_scope_spawn(s, NULL, sleeper_b, (void *)(intptr_t)EV_B2_CANCELLED,
	                                 done_ev, (void *)(intptr_t)EV_B2_DONE, NULL),
	                 0);
	/* Both running (a child cancelled while still queued never runs its function). */
	T_WAIT_UNTIL(atomic_load(&b_started) == 2);
	t_gate_open(&oa->started);
	int rc = 0;
	if (oa->wait_for_cancel)
		rc = opq_scope_sleep(s, NULL);
	ev(EV_A_RETURNED);
	return rc;
}

static void check_order(bool wait_for_cancel)
{
	for (int i = 0; i < EV_N; i++)
		atomic_store(&ev_at[i], 0);
	atomic_store(&ev_clock, 0);
	atomic_store(&b_started, 0);
	opq_queue *q = mkqueue(4, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	struct order_arg oa = {.wait_for_cancel = wait_for_cancel};
	t_gate_init(&oa.started);
	opq_task *a;
	ck_assert_int_eq(
	    opq_scope_spawn(root, NULL, parent_a, &oa, done_ev, (void *)(intptr_t)EV_A_DONE, &a),
	    0);
	ck_assert(t_gate_wait(&oa.started));
	if (wait_for_cancel)
		ck_assert_int_eq(opq_task_cancel(a), 0);
	int result = wait_task(a);
	int told = atomic_fetch_add(&ev_clock, 1) + 1; /* the parent (root) has been told */
	ck_assert_int_eq(result, wait_for_cancel ? ECANCELED : 0);
	ck_assert_int_eq(wait_scope(root), 0);
	if (!wait_for_cancel) {
		/* The function returned first, then the children were cancelled. */
		ck_assert_int_lt(ev_at[EV_A_RETURNED], ev_at[EV_B1_CANCELLED]);
		ck_assert_int_lt(ev_at[EV_A_RETURNED], ev_at[EV_B2_CANCELLED]);
	}
	ck_assert_int_lt(ev_at[EV_B1_CANCELLED], ev_at[EV_B1_DONE]);
	ck_assert_int_lt(ev_at[EV_B2_CANCELLED], ev_at[EV_B2_DONE]);
	ck_assert_int_lt(ev_at[EV_A_RETURNED], ev_at[EV_A_DONE]);
	ck_assert_int_lt(ev_at[EV_B1_DONE], ev_at[EV_A_DONE]);
	ck_assert_int_lt(ev_at[EV_B2_DONE], ev_at[EV_A_DONE]);
	ck_assert_int_lt(ev_at[EV_A_DONE], told);
	for (int i = 0; i < EV_N; i++)
		ck_assert_int_gt(ev_at[i], 0);
	ck_assert_int_eq(opq_task_cancelled(a), wait_for_cancel);
	ck_assert_int_eq(opq_task_release(a), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	t_gate_destroy(&oa.started);
	rmqueue(q);
}

START_TEST(test_order_return_first)
{
	for (int i = 0; i < 50; i++)
		check_order(false);
}
END_TEST

START_TEST(test_order_cancel_first)
{
	for (int i = 0; i < 50; i++)
		check_order(true);
}
END_TEST

/* ---- the cooperative flag ----------------------------------------------- */

static int spin_until_cancelled(opq_scope *s, void *arg)
{
	atomic_long *spins = arg;
	struct timespec dl = t_forever();
	while (!opq_scope_cancelled(s)) {
		ck_assert(!t_passed(&dl));
		atomic_fetch_add(spins, 1);
		sched_yield();
	}
	return EINTR;
}

START_TEST(test_cancel_flag)
{
	opq_queue *q = mkqueue(2, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	for (int i = 0; i < 100; i++) {
		atomic_long spins = 0;
		opq_task *t;
		ck_assert_int_eq(
		    opq_scope_spawn(root, NULL, spin_until_cancelled, &spins, NULL, NULL, &t), 0);
		T_WAIT_UNTIL(atomic_load(&spins) > 0);
		ck_assert_int_eq(opq_task_cancelled(t), 0);
		ck_assert_int_eq(opq_task_cancel(t), 0);
		ck_assert_int_eq(opq_task_cancel(t), 0); /* idempotent */
		ck_assert_int_eq(opq_task_cancelled(t), 1);
		ck_assert_int_eq(wait_task(t), EINTR);   /* the function's own result */
		ck_assert_int_eq(opq_task_cancel(t), 0); /* after termination: nothing */
		ck_assert_int_eq(opq_task_release(t), 0);
	}
	/* A cancelled task's ECANCELED is not an error of the scope; EINTR is. */
	ck_assert_int_eq(wait_scope(root), EINTR);
	ck_assert_int_eq(opq_scope_cancelled(root), 0);
	ck_assert_int_eq(opq_scope_cancelled(NULL), 0);
	ck_assert_int_eq(opq_task_cancelled(NULL), 0);
	ck_assert_ptr_null(opq_scope_current());
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

/* ---- blocking calls return ECANCELED ------------------------------------- */

struct blocker {
	int kind;
	opq_queue *full;
	opq_line *line;
	opq_stage *stage;
	opq_lease *lease;
	atomic_int entered;
	atomic_llong returned_at;
	int rc;
};

enum {
	B_ENQUEUE,
	B_TIMEDENQUEUE,
	B_LINE_WAIT,
	B_LINE_IDLE,
	B_STAGE,
	B_SLEEP,
	B_HOOK,
	B_LEASE,
	B_WAIT_IDLE,
	B_N
};

static void nop(void *arg)
{
	(void)arg;
}

/* An operation that holds its runner until the gate (arg) opens. */
static void gate_op(void *arg)
{
	ck_assert(t_gate_wait(arg));
}

static int blocker_fn(opq_scope *s, void *arg)
{
	struct blocker *b = arg;
	struct timespec far = t_deadline(T_WAIT_NS);
	int rc = -1;
	opq_line_ticket ticket = OPQ_LINE_TICKET_INITIALIZER;
	opq_stage_ticket *st = NULL;
	void *event;
	atomic_store(&b->entered, 1);
	switch (b->kind) {
	case B_ENQUEUE:
		rc = opq_queue_enqueue_fn(b->full, nop, NULL, NULL);
		break;
	case B_TIMEDENQUEUE:
		rc = opq_queue_timedenqueue_fn(b->full, nop, NULL, NULL, &far);
		break;
	case B_LINE_WAIT:
		ck_assert_int_eq(opq_line_try_acquire(b->line, OPQ_LINE_ANY, &ticket), EBUSY);
		rc = opq_line_wait(b->line, &ticket, &far, NULL);
		break;
	case B_LINE_IDLE:
		rc = opq_line_wait_idle(b->line, NULL, NULL);
		break;
	case B_STAGE:
		ck_assert_int_eq(opq_stage_register(b->stage, "b", 1, &st), 0);
		rc = opq_stage_enter(b->stage, st, &far, &event);
		ck_assert_int_eq(opq_stage_unregister(b->stage, st, &event), 0);
		break;
	case B_SLEEP:
		rc = opq_scope_sleep(s, &far);
		break;
	case B_HOOK:
		rc = opq__cancel_sleep_until(&far);
		break;
	case B_LEASE: /* held by another owner: acquire polls until cancelled */
		rc = opq_lease_acquire(b->lease, &far, NULL);
		break;
	case B_WAIT_IDLE: /* the full queue is never started: never idle */
		rc = opq_queue_wait_idle(b->full, &far);
		break;
	}
	atomic_store(&b->returned_at, t_now_ns());
	b->rc = rc;
	return rc;
}

/* Is the blocker blocked in its call yet? */
static bool blocked(struct blocker *b)
{
	if (!atomic_load(&b->entered))
		return false;
	switch (b->kind) {
	case B_ENQUEUE:
	case B_TIMEDENQUEUE: {
		opq_queue_stats st;
		ck_assert_int_eq(opq_queue_stats_get(b->full, &st), 0);
		return st.blocked == 1;
	}
	case B_LINE_WAIT:
	case B_LINE_IDLE: {
		pthread_mutex_lock(&b->line->opq__mu);
		bool w = b->line->opq__waiters == 1;
		pthread_mutex_unlock(&b->line->opq__mu);
		return w;
	}
	case B_STAGE: {
		opq_stage_stats st;
		ck_assert_int_eq(opq_stage_stats_get(b->stage, &st), 0);
		return st.waiting == 1;
	}
	case B_WAIT_IDLE: {
		pthread_mutex_lock(&b->full->mu);
		bool w = b->full->idle_waiters == 1;
		pthread_mutex_unlock(&b->full->mu);
		return w;
	}
	default:
		return true; /* a sleep: cancelling before or during it both must work */
	}
}

START_TEST(test_blocking_calls_cancelled)
{
	opq_queue *q = mkqueue(2, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	for (int iter = 0; iter < 10; iter++) {
		for (int kind = 0; kind < B_N; kind++) {
			struct blocker b = {.kind = kind};
			/* A full queue: capacity 1, never started. */
			opq_queue_attr *qa;
			ck_assert_int_eq(opq_queue_attr_create(&qa), 0);
			ck_assert_int_eq(opq_queue_attr_set_capacity(qa, 1), 0);
			ck_assert_int_eq(opq_queue_create(&b.full, qa), 0);
			opq_queue_attr_destroy(qa);
			ck_assert_int_eq(opq_queue_enqueue_fn(b.full, nop, NULL, NULL), 0);
			opq_line line;
			ck_assert_int_eq(opq_line_init(&line), 0);
			b.line = &line;
			opq_line_ticket held = OPQ_LINE_TICKET_INITIALIZER;
			ck_assert_int_eq(opq_line_try_acquire(&line, OPQ_LINE_ANY, &held), 0);
			ck_assert_int_eq(opq_stage_create(&b.stage), 0);
			opq_stage_ticket *head;
			void *event;
			ck_assert_int_eq(opq_stage_register(b.stage, "h", 1, &head), 0);
			ck_assert_int_eq(opq_stage_enter(b.stage, head, NULL, &event),
			                 OPQ_STAGE_HEAD);

			opq_lease_provider *lp;
			opq_lease *holder;
			ck_assert_int_eq(opq_lease_provider_memory_create(&lp), 0);
			ck_assert_int_eq(opq_lease_create(&holder, lp, "res", NULL), 0);
			ck_assert_int_eq(opq_lease_create(&b.lease, lp, "res", NULL), 0);
			ck_assert_int_eq(opq_lease_try_acquire(holder, NULL), 0);

			opq_task *t;
			ck_assert_int_eq(
			    opq_scope_spawn(root, NULL, blocker_fn, &b, NULL, NULL, &t), 0);
			T_WAIT_UNTIL(blocked(&b));
			int64_t t0 = t_now_ns();
			ck_assert_int_eq(opq_task_cancel(t), 0);
			ck_assert_int_eq(wait_task(t), ECANCELED);
			ck_assert_int_eq(b.rc, ECANCELED);
			int64_t took = atomic_load(&b.returned_at) - t0;
			ck_assert_msg(took < PROMPT_NS, "kind %d took %lld ns", kind,
			              (long long)took);
			ck_assert_int_eq(opq_task_release(t), 0);

			/* The objects are intact and usable. */
			opq_queue_stats qs;
			ck_assert_int_eq(opq_queue_stats_get(b.full, &qs), 0);
			ck_assert_int_eq(qs.queued, 1);
			ck_assert_int_eq(qs.blocked, 0);
			ck_assert_int_eq(opq_queue_destroy(b.full), 0);
			ck_assert_int_eq(opq_line_release(&line, &held, 0), 0);
			ck_assert_int_eq(opq_line_destroy(&line), 0);
			opq_stage_stats ss;
			ck_assert_int_eq(opq_stage_stats_get(b.stage, &ss), 0);
			ck_assert_int_eq(ss.waiting, 0);
			ck_assert_int_eq(ss.tickets, 1);
			ck_assert_int_eq(opq_stage_leave(b.stage, head), 0);
			ck_assert_int_eq(opq_stage_unregister(b.stage, head, &event), 0);
			ck_assert_int_eq(opq_stage_destroy(b.stage), 0);
			ck_assert_int_eq(opq_lease_try_acquire(b.lease, NULL), EBUSY);
			ck_assert_int_eq(opq_lease_release(holder), 0);
			ck_assert_int_eq(opq_lease_try_acquire(b.lease, NULL), 0);
			ck_assert_int_eq(opq_lease_destroy(b.lease), 0);
			ck_assert_int_eq(opq_lease_destroy(holder), 0);
			ck_assert_int_eq(opq_lease_provider_destroy(lp), 0);
		}
	}
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

/* A task that is cancelled already gets ECANCELED at once from a would-block call. */
static int precancelled(opq_scope *s, void *arg)
{
	(void)arg;
	ck_assert_int_eq(opq_scope_cancel(s), 0);
	ck_assert_int_eq(opq_scope_cancelled(s), 1);
	struct timespec far = t_forever();
	ck_assert_int_eq(opq_scope_sleep(s, &far), ECANCELED);
	ck_assert_int_eq(opq__cancel_sleep_until(&far), ECANCELED);
	opq_line line;
	ck_assert_int_eq(opq_line_init(&line), 0);
	opq_line_ticket held = OPQ_LINE_TICKET_INITIALIZER, t2 = OPQ_LINE_TICKET_INITIALIZER;
	ck_assert_int_eq(opq_line_try_acquire(&line, OPQ_LINE_ANY, &held), 0);
	/* The line is held: waiting would block, so ECANCELED at once. */
	ck_assert_int_eq(opq_line_wait_idle(&line, &far, NULL), ECANCELED);
	ck_assert_int_eq(opq_line_try_acquire(&line, OPQ_LINE_ANY, &t2), EBUSY);
	ck_assert_int_eq(opq_line_wait(&line, &t2, &far, NULL), ECANCELED);
	ck_assert_int_eq(opq_line_release(&line, &held, 7), 0);
	int st = 0;
	/* Released: a result beats a cancel. */
	ck_assert_int_eq(opq_line_wait(&line, &t2, &far, &st), 0);
	ck_assert_int_eq(st, 7);
	ck_assert_int_eq(opq_line_destroy(&line), 0);
	/* Waiting for another queue's idle state: an idle queue returns 0, a
	 * busy one (never started, holding an operation) ECANCELED at once. */
	opq_queue *other;
	ck_assert_int_eq(opq_queue_create(&other, NULL), 0);
	ck_assert_int_eq(opq_queue_wait_idle(other, &far), 0);
	ck_assert_int_eq(opq_queue_enqueue_fn(other, nop, NULL, NULL), 0);
	ck_assert_int_eq(opq_queue_wait_idle(other, &far), ECANCELED);
	ck_assert_int_eq(opq_queue_wait_idle(other, NULL), ECANCELED);
	ck_assert_int_eq(opq_queue_destroy(other), 0);
	/* Spawning in a cancelled scope fails. */
	ck_assert_int_eq(opq_scope_spawn(s, NULL, precancelled, NULL, NULL, NULL, NULL), ECANCELED);
	return 0;
}

START_TEST(test_cancelled_before_blocking)
{
	opq_queue *q = mkqueue(1, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	opq_task *t;
	ck_assert_int_eq(opq_scope_spawn(root, NULL, precancelled, NULL, NULL, NULL, &t), 0);
	ck_assert_int_eq(wait_task(t), 0);
	ck_assert_int_eq(opq_task_release(t), 0);
	/* Outside any task: the hook is a plain sleep; NULL would sleep forever. */
	struct timespec dl = t_deadline(MS);
	ck_assert_int_eq(opq__cancel_sleep_until(&dl), ETIMEDOUT);
	ck_assert_int_eq(opq__cancel_sleep_until(NULL), EDEADLK);
	struct timespec bad = {0, 1000000000};
	ck_assert_int_eq(opq__cancel_sleep_until(&bad), EINVAL);
	ck_assert_int_eq(opq_scope_sleep(root, &bad), EINVAL);
	ck_assert_int_eq(opq_scope_sleep(root, &dl), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

/* ---- waits with deadlines, scope deadlines ------------------------------ */

static int child_ok_fn(opq_scope *s, void *arg)
{
	(void)s;
	(void)arg;
	return 0;
}

static int count_run(opq_scope *s, void *arg)
{
	(void)s;
	atomic_fetch_add((atomic_int *)arg, 1);
	return 0;
}

static int sleep_forever(opq_scope *s, void *arg)
{
	(void)arg;
	return opq_scope_sleep(s, NULL);
}

START_TEST(test_wait_deadline)
{
	opq_queue *q = mkqueue(2, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	opq_task *t;
	ck_assert_int_eq(opq_scope_spawn(root, NULL, sleep_forever, NULL, NULL, NULL, &t), 0);
	struct timespec dl = t_deadline(30 * MS);
	int first = 12345, result = 12345;
	ck_assert_int_eq(opq_scope_wait(root, &dl, &first), ETIMEDOUT);
	ck_assert_int_eq(first, 12345);
	dl = t_deadline(10 * MS);
	ck_assert_int_eq(opq_task_wait(t, &dl, &result), ETIMEDOUT);
	ck_assert_int_eq(result, 12345);
	ck_assert_int_eq(opq_scope_destroy(root), EBUSY);
	struct timespec bad = {0, -1};
	ck_assert_int_eq(opq_scope_wait(root, &bad, NULL), EINVAL);
	ck_assert_int_eq(opq_task_wait(t, &bad, NULL), EINVAL);
	ck_assert_int_eq(opq_scope_cancel(root), 0);
	ck_assert_int_eq(wait_task(t), ECANCELED);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(opq_scope_spawn(root, NULL, sleep_forever, NULL, NULL, NULL, NULL),
	                 ECANCELED);
	ck_assert_int_eq(opq_task_release(t), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

START_TEST(test_scope_deadline)
{
	opq_queue *q = mkqueue(3, 0);
	for (int i = 0; i < 20; i++) {
		opq_scope_attr *a;
		ck_assert_int_eq(opq_scope_attr_create(&a), 0);
		struct timespec dl = t_deadline(20 * MS);
		ck_assert_int_eq(opq_scope_attr_set_deadline(a, &dl), 0);
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, a), 0);
		int64_t t0 = t_now_ns();
		ck_assert_int_eq(opq_scope_spawn(root, NULL, sleep_forever, NULL, NULL, NULL, NULL),
		                 0);
		ck_assert_int_eq(opq_scope_spawn(root, NULL, sleep_forever, NULL, NULL, NULL, NULL),
		                 0);
		/* The root's deadline cancels its tasks; the waiter learns ETIMEDOUT. */
		ck_assert_int_eq(wait_scope(root), ETIMEDOUT);
		ck_assert(t_passed(&dl)); /* not before its deadline */
		ck_assert_int_lt(t_now_ns() - t0, 20 * MS + PROMPT_NS);
		ck_assert_int_eq(opq_scope_cancelled(root), 1);
		ck_assert_int_eq(opq_scope_spawn(root, NULL, sleep_forever, NULL, NULL, NULL, NULL),
		                 ECANCELED);
		ck_assert_int_eq(opq_scope_destroy(root), 0);

		/* A task's own deadline (given at spawn): it is cancelled, its result ETIMEDOUT. */
		ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
		dl = t_deadline(10 * MS);
		ck_assert_int_eq(opq_scope_attr_set_deadline(a, &dl), 0);
		opq_task *t, *u;
		ck_assert_int_eq(opq_scope_spawn(root, a, sleep_forever, NULL, NULL, NULL, &t), 0);
		ck_assert_int_eq(opq_scope_spawn(root, NULL, sleep_forever, NULL, NULL, NULL, &u),
		                 0);
		ck_assert_int_eq(wait_task(t), ETIMEDOUT);
		ck_assert_int_eq(opq_task_cancelled(u), 0); /* a sibling is not affected */
		ck_assert_int_eq(opq_task_cancel(u), 0);
		ck_assert_int_eq(wait_scope(root), ETIMEDOUT);
		ck_assert_int_eq(opq_task_release(t), 0);
		ck_assert_int_eq(opq_task_release(u), 0);
		ck_assert_int_eq(opq_scope_destroy(root), 0);

		/* A deadline already passed at spawn: the task is cancelled at
		 * once, and its function never runs (the timer thread is not
		 * waited for). */
		ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
		dl = t_deadline(-MS);
		ck_assert_int_eq(opq_scope_attr_set_deadline(a, &dl), 0);
		ck_assert_int_eq(opq_scope_spawn(root, a, sleep_forever, NULL, NULL, NULL, &t), 0);
		ck_assert_int_eq(wait_task(t), ETIMEDOUT);
		ck_assert_int_eq(opq_task_release(t), 0);
		atomic_int ran = 0;
		for (int k = 0; k < 10; k++) {
			ck_assert_int_eq(opq_scope_spawn(root, a, count_run, &ran, NULL, NULL, &t),
			                 0);
			ck_assert_int_eq(wait_task(t), ETIMEDOUT);
			ck_assert_int_eq(opq_task_release(t), 0);
		}
		ck_assert_int_eq(atomic_load(&ran), 0);
		ck_assert_int_eq(opq_scope_attr_set_deadline(a, NULL), 0);
		ck_assert_int_eq(opq_scope_spawn(root, a, child_ok_fn, NULL, NULL, NULL, &t), 0);
		ck_assert_int_eq(wait_task(t), 0);
		ck_assert_int_eq(opq_task_release(t), 0);
		ck_assert_int_eq(wait_scope(root), ETIMEDOUT);
		ck_assert_int_eq(opq_scope_destroy(root), 0);

		/* A root made with a passed deadline is cancelled from the start. */
		dl = t_deadline(-MS);
		ck_assert_int_eq(opq_scope_attr_set_deadline(a, &dl), 0);
		ck_assert_int_eq(opq_scope_create(&root, q, a), 0);
		ck_assert_int_eq(opq_scope_cancelled(root), 1);
		ck_assert_int_eq(opq_scope_spawn(root, NULL, count_run, &ran, NULL, NULL, NULL),
		                 ECANCELED);
		ck_assert_int_eq(wait_scope(root), ETIMEDOUT);
		ck_assert_int_eq(opq_scope_destroy(root), 0);
		ck_assert_int_eq(atomic_load(&ran), 0);
		opq_scope_attr_destroy(a);
	}
	rmqueue(q);
}
END_TEST

/*
 * A cancel or a deadline takes the tasks it cancels that have not started
 * out of the queue at once: on a one-runner queue busy with a long
 * operation, their done callbacks run (with the cancel's error) before it
 * ends, the queue counts them cancelled and discarded, not completed, and
 * a bounded queue's places are free again.
 */
enum { PULL_TASKS = 4 };

struct pulled {
	atomic_int dones, ran;
	atomic_int result[PULL_TASKS];
	atomic_llong done_at[PULL_TASKS];
};

static int count_ran(opq_scope *s, void *arg)
{
	(void)s;
	atomic_fetch_add(&((struct pulled *)arg)->ran, 1);
	return 0;
}

static void pulled_done(void *arg, void *done_arg, int result)
{
	struct pulled *p = arg;
	int k = (int)(intptr_t)done_arg;
	atomic_store(&p->result[k], result);
	atomic_store(&p->done_at[k], t_now_ns());
	atomic_fetch_add(&p->dones, 1);
}

/* Wait until n done callbacks ran, for at most `ns`; false if they did not. */
static bool dones_within(struct pulled *p, int n, int64_t ns)
{
	int64_t end = t_now_ns() + ns;
	while (atomic_load(&p->dones) < n) {
		if (t_now_ns() > end)
			return false;
		sched_yield();
	}
	return true;
}

enum { PULL_TASK_DEADLINE, PULL_ROOT_DEADLINE, PULL_SCOPE_CANCEL, PULL_TASK_CANCEL, PULL_HOW_N };

START_TEST(test_cancel_pulls_queued)
{
	for (int how = 0; how < PULL_HOW_N; how++) {
		opq_queue *q = mkqueue(1, PULL_TASKS);
		struct t_gate long_op;
		t_gate_init(&long_op);
		opq_queue_stats st0, st;
		ck_assert_int_eq(opq_queue_enqueue_fn(q, gate_op, NULL, &long_op), 0);
		T_WAIT_UNTIL(opq_queue_stats_get(q, &st0) == 0 && st0.running == 1);

		opq_scope_attr *a;
		ck_assert_int_eq(opq_scope_attr_create(&a), 0);
		struct timespec dl = t_deadline(50 * MS);
		ck_assert_int_eq(opq_scope_attr_set_deadline(a, &dl), 0);
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, how == PULL_ROOT_DEADLINE ? a : NULL),
		                 0);
		struct pulled p = {0};
		opq_task *t[PULL_TASKS];
		for (int k = 0; k < PULL_TASKS; k++)
			ck_assert_int_eq(opq_scope_spawn(root, how == PULL_TASK_DEADLINE ? a : NULL,
			                                 count_ran, &p, pulled_done,
			                                 (void *)(intptr_t)k, &t[k]),
			                 0);
		/* The queue is full behind the long operation. */
		ck_assert_int_eq(opq_queue_tryenqueue_fn(q, nop, NULL, NULL), EAGAIN);

		int64_t t0 = t_now_ns();
		int want = ECANCELED, n = PULL_TASKS;
		switch (how) {
		case PULL_TASK_DEADLINE:
			want = ETIMEDOUT; /* each task's own deadline */
			                  /* fall through */
		case PULL_ROOT_DEADLINE:
			ck_assert_msg(
			    dones_within(&p, n, 50 * MS + PROMPT_NS),
			    "how %d: %d of %d done callbacks while the long operation runs", how,
			    atomic_load(&p.dones), n);
			ck_assert(t_passed(&dl)); /* not before the deadline */
			break;
		case PULL_SCOPE_CANCEL:
			/* On the cancelling thread, before the cancel returns. */
			ck_assert_int_eq(opq_scope_cancel(root), 0);
			ck_assert_int_eq(atomic_load(&p.dones), n);
			break;
		case PULL_TASK_CANCEL:
			ck_assert_int_eq(opq_task_cancel(t[1]), 0);
			ck_assert_int_eq(atomic_load(&p.dones), 1);
			n = 1;
			break;
		}
		for (int k = 0; k < PULL_TASKS; k++) {
			if (how == PULL_TASK_CANCEL && k != 1)
				continue;
			ck_assert_int_eq(atomic_load(&p.result[k]), want);
			ck_assert_int_lt(atomic_load(&p.done_at[k]) - t0, 50 * MS + PROMPT_NS);
		}
		/* Counted cancelled and discarded, not completed; their places are free. */
		ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
		ck_assert_int_eq(st.running, 1);
		ck_assert_int_eq(st.queued, (size_t)(PULL_TASKS - n));
		ck_assert_int_eq(st.completed, st0.completed);
		ck_assert_int_eq(st.cancelled - st0.cancelled, (uint64_t)n);
		ck_assert_int_eq(st.discarded - st0.discarded, (uint64_t)n);
		for (int k = 0; k < n; k++)
			ck_assert_int_eq(opq_queue_tryenqueue_fn(q, nop, NULL, NULL), 0);
		ck_assert_int_eq(opq_queue_tryenqueue_fn(q, nop, NULL, NULL), EAGAIN);
		for (int k = 0; k < PULL_TASKS; k++)
			if (how != PULL_TASK_CANCEL || k == 1)
				ck_assert_int_eq(wait_task(t[k]), want); /* terminated */

		t_gate_open(&long_op);
		/* A child's own timeout is an error of the root; so is the root's. */
		int first = how == PULL_TASK_DEADLINE || how == PULL_ROOT_DEADLINE ? ETIMEDOUT : 0;
		ck_assert_int_eq(wait_scope(root), first);
		ck_assert_int_eq(atomic_load(&p.ran), PULL_TASKS - n); /* never ran */
		ck_assert_int_eq(atomic_load(&p.dones), PULL_TASKS);
		for (int k = 0; k < PULL_TASKS; k++)
			ck_assert_int_eq(opq_task_release(t[k]), 0);
		ck_assert_int_eq(opq_scope_destroy(root), 0);
		opq_scope_attr_destroy(a);
		rmqueue(q);
		t_gate_destroy(&long_op);
	}
}
END_TEST

/*
 * A relative timeout at spawn: one call for a per-request deadline. The
 * deadline counts from the call, the sooner of it and the attribute's
 * wins, and an attribute shared by many spawning threads is only read.
 */
struct timed {
	atomic_int dones, ran;
	atomic_int result;
};

static int timed_fn(opq_scope *s, void *arg)
{
	struct timed *tm = arg;
	atomic_fetch_add(&tm->ran, 1);
	return opq_scope_sleep(s, NULL);
}

static int timed_quick(opq_scope *s, void *arg)
{
	(void)s;
	atomic_fetch_add(&((struct timed *)arg)->ran, 1);
	return 0;
}

static void timed_done(void *arg, void *done_arg, int result)
{
	struct timed *tm = arg;
	(void)done_arg;
	atomic_store(&tm->result, result);
	atomic_fetch_add(&tm->dones, 1);
}

struct timed_spawner {
	opq_scope *root;
	const opq_scope_attr *attr;
	struct timed tm[100];
};

static void *timed_spawner_thread(void *arg)
{
	struct timed_spawner *sp = arg;
	for (int i = 0; i < 100; i++)
		ck_assert_int_eq(opq_scope_spawn_timeout(sp->root, sp->attr, i % 2 ? 0 : 10 * MS,
		                                         i % 4 == 2 ? timed_quick : timed_fn,
		                                         &sp->tm[i], timed_done, NULL, NULL),
		                 0);
	return NULL;
}

START_TEST(test_spawn_timeout)
{
	opq_queue *q = mkqueue(3, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	opq_task *t;

	/* The timeout cancels the task, not before it passes: ETIMEDOUT. */
	struct timed tm = {0};
	struct timespec at = t_deadline(20 * MS);
	ck_assert_int_eq(
	    opq_scope_spawn_timeout(root, NULL, 20 * MS, timed_fn, &tm, timed_done, NULL, &t), 0);
	ck_assert_int_eq(wait_task(t), ETIMEDOUT);
	ck_assert(t_passed(&at));
	ck_assert_int_eq(atomic_load(&tm.dones), 1);
	ck_assert_int_eq(atomic_load(&tm.result), ETIMEDOUT);
	ck_assert_int_eq(opq_task_release(t), 0);

	/* A task that ends before its timeout is not affected. */
	tm = (struct timed){0};
	ck_assert_int_eq(opq_scope_spawn_timeout(root, NULL, 3600LL * 1000 * MS, timed_quick, &tm,
	                                         timed_done, NULL, &t),
	                 0);
	ck_assert_int_eq(wait_task(t), 0);
	ck_assert_int_eq(opq_task_release(t), 0);
	/* INT64_MAX: too far to count, so never. */
	tm = (struct timed){0};
	ck_assert_int_eq(
	    opq_scope_spawn_timeout(root, NULL, INT64_MAX, timed_quick, &tm, timed_done, NULL, &t),
	    0);
	ck_assert_int_eq(wait_task(t), 0);
	ck_assert_int_eq(opq_task_release(t), 0);

	/* 0 or less: timed out at once, the function never runs. */
	for (int64_t ns = 0; ns >= -2; ns--) {
		tm = (struct timed){0};
		ck_assert_int_eq(opq_scope_spawn_timeout(root, NULL, ns == -2 ? INT64_MIN : ns,
		                                         timed_quick, &tm, timed_done, NULL, &t),
		                 0);
		ck_assert_int_eq(wait_task(t), ETIMEDOUT);
		ck_assert_int_eq(atomic_load(&tm.ran), 0);
		ck_assert_int_eq(opq_task_release(t), 0);
	}

	/* With an attribute: the sooner deadline wins, and its policy applies. */
	opq_scope_attr *a;
	ck_assert_int_eq(opq_scope_attr_create(&a), 0);
	struct timespec past = t_deadline(-MS), far = t_deadline(3600LL * 1000 * MS);
	ck_assert_int_eq(opq_scope_attr_set_deadline(a, &past), 0);
	tm = (struct timed){0};
	ck_assert_int_eq(opq_scope_spawn_timeout(root, a, 3600LL * 1000 * MS, timed_quick, &tm,
	                                         timed_done, NULL, &t),
	                 0);
	ck_assert_int_eq(wait_task(t), ETIMEDOUT);
	ck_assert_int_eq(atomic_load(&tm.ran), 0);
	ck_assert_int_eq(opq_task_release(t), 0);
	ck_assert_int_eq(opq_scope_attr_set_deadline(a, &far), 0);
	ck_assert_int_eq(opq_scope_attr_set_policy(a, OPQ_SCOPE_FIRST_ERROR), 0);
	tm = (struct timed){0};
	at = t_deadline(20 * MS);
	ck_assert_int_eq(
	    opq_scope_spawn_timeout(root, a, 20 * MS, timed_fn, &tm, timed_done, NULL, &t), 0);
	ck_assert_int_eq(wait_task(t), ETIMEDOUT);
	ck_assert(t_passed(&at));
	ck_assert_int_eq(opq_task_release(t), 0);

	/* Bad arguments: nothing spawned. */
	ck_assert_int_eq(
	    opq_scope_spawn_timeout(NULL, NULL, MS, timed_quick, &tm, NULL, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_scope_spawn_timeout(root, NULL, MS, NULL, &tm, NULL, NULL, NULL),
	                 EINVAL);

	/* Four threads spawn with one attribute at once: it is only read. */
	opq_scope_attr_set_deadline(a, NULL);
	struct timed_spawner *sp = calloc(4, sizeof(*sp));
	ck_assert_ptr_nonnull(sp);
	pthread_t th[4];
	for (int k = 0; k < 4; k++) {
		sp[k].root = root;
		sp[k].attr = a;
		ck_assert_int_eq(pthread_create(&th[k], NULL, timed_spawner_thread, &sp[k]), 0);
	}
	for (int k = 0; k < 4; k++)
		ck_assert_int_eq(pthread_join(th[k], NULL), 0);
	ck_assert_int_eq(wait_scope(root), ETIMEDOUT);
	for (int k = 0; k < 4; k++)
		for (int i = 0; i < 100; i++) {
			struct timed *x = &sp[k].tm[i];
			int r = atomic_load(&x->result);
			ck_assert_int_eq(atomic_load(&x->dones), 1);
			if (i % 2) { /* timeout 0: timed out at once, never ran */
				ck_assert_int_eq(r, ETIMEDOUT);
				ck_assert_int_eq(atomic_load(&x->ran), 0);
			} else if (i % 4 == 2) { /* quick, 10 ms: ran in time, or timed out */
				ck_assert(r == 0 || r == ETIMEDOUT);
			} else { /* sleeps until cancelled: timed out */
				ck_assert_int_eq(r, ETIMEDOUT);
			}
		}
	free(sp);
	ck_assert_int_eq(opq_scope_cancel(root), 0);
	ck_assert_int_eq(
	    opq_scope_spawn_timeout(root, NULL, MS, timed_quick, &tm, NULL, NULL, NULL), ECANCELED);
	opq_scope_attr_destroy(a);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

/*
 * A sleep whose deadline passes while a canceller that has pinned it is
 * held (between dropping the tree's lock and waking it) waits for that
 * canceller, and meanwhile the scope is still in use: opq_scope_destroy is
 * EBUSY, not 0 (which freed the tree under the canceller).
 */
static struct t_gate held_gate;
static atomic_int held_in;

static void hold_canceller(void)
{
	atomic_store(&held_in, 1);
	ck_assert(t_gate_wait(&held_gate));
}

struct sleeper {
	opq_scope *s;
	struct timespec dl;
	atomic_int started, rc;
};

static void *sleeper_thread(void *arg)
{
	struct sleeper *z = arg;
	atomic_store(&z->started, 1);
	atomic_store(&z->rc, opq_scope_sleep(z->s, &z->dl));
	return NULL;
}

static void *cancel_thread(void *arg)
{
	ck_assert_int_eq(opq_scope_cancel(arg), 0);
	return NULL;
}

START_TEST(test_destroy_while_woken)
{
	opq_queue *q = mkqueue(1, 0);
	/* Rounds where the cancel came before the sleep had registered (and
	 * so had nothing to pin) do not count. */
	for (int held = 0, tries = 0; held < 3; tries++) {
		ck_assert_int_lt(tries, 1000);
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
		t_gate_init(&held_gate);
		atomic_store(&held_in, 0);
		opq__cancel_wake_hook = hold_canceller;
		struct sleeper z = {root, t_deadline(100 * MS), 0, -1};
		pthread_t st, ct;
		ck_assert_int_eq(pthread_create(&st, NULL, sleeper_thread, &z), 0);
		T_WAIT_UNTIL(atomic_load(&z.started));
		ck_assert_int_eq(pthread_create(&ct, NULL, cancel_thread, root), 0);
		T_WAIT_UNTIL(atomic_load(&held_in) || atomic_load(&z.rc) != -1);
		if (atomic_load(&held_in)) {
			/* The sleep's deadline passes; it ends, its record pinned. */
			struct timespec after = t_plus(z.dl, 50 * MS);
			while (!t_passed(&after))
				ck_assert_int_eq(opq_scope_destroy(root), EBUSY);
			ck_assert_int_eq(atomic_load(&z.rc), -1);
			held++;
		}
		t_gate_open(&held_gate);
		ck_assert_int_eq(pthread_join(ct, NULL), 0);
		ck_assert_int_eq(pthread_join(st, NULL), 0);
		/* Cancelled, or (on a slow machine) its deadline came first. */
		int rc = atomic_load(&z.rc);
		ck_assert_msg(rc == ECANCELED || rc == 0, "sleep: %d", rc);
		opq__cancel_wake_hook = NULL;
		ck_assert_int_eq(opq_scope_destroy(root), 0);
		t_gate_destroy(&held_gate);
	}
	rmqueue(q);
}
END_TEST

/*
 * A done callback that waits for its own task, for an ancestor task, or for
 * a scope those are in gets EDEADLK (they cannot terminate before it
 * returns), not a wait until its deadline.
 */
struct done_waits {
	struct t_gate go; /* the handles are stored */
	opq_scope *root;
	opq_task *parent;
	int rc_self, rc_parent, rc_root;
	atomic_int done;
};

static void done_waits_cb(void *arg, void *done_arg, int result)
{
	struct done_waits *w = done_arg;
	(void)arg;
	(void)result;
	struct timespec dl = t_deadline(2000 * MS);
	w->rc_parent = opq_task_wait(w->parent, &dl, NULL);
	w->rc_root = opq_scope_wait(w->root, &dl, NULL);
	atomic_store(&w->done, 1);
}

static int done_waits_child(opq_scope *s, void *arg)
{
	(void)s;
	(void)arg;
	return 0;
}

static void done_waits_self_cb(void *arg, void *done_arg, int result)
{
	struct done_waits *w = done_arg;
	(void)arg;
	(void)result;
	struct timespec dl = t_deadline(2000 * MS);
	w->rc_self = opq_task_wait(w->parent, &dl, NULL);
}

static int done_waits_parent(opq_scope *s, void *arg)
{
	struct done_waits *w = arg;
	if (!t_gate_wait(&w->go))
		return EIO;
	return opq_scope_spawn(s, NULL, done_waits_child, NULL, done_waits_cb, w, NULL);
}

START_TEST(test_done_waits_deadlock)
{
	opq_queue *q = mkqueue(2, 0);
	struct done_waits w = {.rc_self = -1, .rc_parent = -1, .rc_root = -1};
	t_gate_init(&w.go);
	ck_assert_int_eq(opq_scope_create(&w.root, q, NULL), 0);
	ck_assert_int_eq(
	    opq_scope_spawn(w.root, NULL, done_waits_parent, &w, done_waits_self_cb, &w, &w.parent),
	    0);
	t_gate_open(&w.go);
	T_WAIT_UNTIL(atomic_load(&w.done));
	ck_assert_int_eq(wait_task(w.parent), 0);
	ck_assert_int_eq(w.rc_parent, EDEADLK);
	ck_assert_int_eq(w.rc_root, EDEADLK);
	ck_assert_int_eq(w.rc_self, EDEADLK);
	ck_assert_int_eq(opq_task_release(w.parent), 0);
	ck_assert_int_eq(wait_scope(w.root), 0);
	ck_assert_int_eq(opq_scope_destroy(w.root), 0);
	t_gate_destroy(&w.go);
	rmqueue(q);
}
END_TEST

/* ---- the library's timer (timer.c), which runs the deadlines ----------- */

struct ttimer {
	struct opq__timer t;
	int64_t when, cancelled_at;
	atomic_int fired;
	int64_t fired_at;
	int order;
};

static atomic_int fire_seq;

static void tt_fire(struct opq__timer *t)
{
	struct ttimer *x = OPQ_CONTAINER_OF(t, struct ttimer, t);
	x->fired_at = t_now_ns();
	x->order = atomic_fetch_add(&fire_seq, 1);
	atomic_fetch_add(&x->fired, 1);
}

static void tt_arm(struct ttimer *x, int64_t when)
{
	x->when = when;
	struct timespec ts = opq__ns_to_ts(when);
	opq__timer_arm(&x->t, &ts, tt_fire);
}

static bool tt_all_fired(const struct ttimer *x, int n)
{
	for (int i = 0; i < n; i++)
		if (!x[i].cancelled_at && !atomic_load(&x[i].fired))
			return false;
	return true;
}

static int by_order(const void *a, const void *b)
{
	const struct ttimer *x = *(struct ttimer *const *)a, *y = *(struct ttimer *const *)b;
	return (x->order > y->order) - (x->order < y->order);
}

/* Many timers, armed, re-armed and cancelled: each fires once, in the order
 * of their instants, never early, and a cancelled one not at all. */
START_TEST(test_timer_heap)
{
	enum { N = 3000 };
	struct ttimer *x = calloc(N, sizeof(*x));
	struct ttimer **fired = calloc(N, sizeof(*fired));
	ck_assert(x && fired);
	atomic_store(&fire_seq, 0);
	ck_assert_int_eq(opq__timer_ref(), 0);
	unsigned seed = 12345;
	int64_t base = t_now_ns() + 300 * MS; /* arming all of them takes less */
	for (int i = 0; i < N; i++)
		tt_arm(&x[i], base + (int64_t)(rand_r(&seed) % 1000) * MS / 10);
	for (int i = 0; i < N; i += 3) /* later or sooner than before */
		tt_arm(&x[i], base + (int64_t)(rand_r(&seed) % 1000) * MS / 10);
	for (int i = 1; i < N; i += 10) {
		opq__timer_cancel(&x[i].t);
		x[i].cancelled_at = t_now_ns();
	}
	T_WAIT_UNTIL(tt_all_fired(x, N));
	int n = 0;
	for (int i = 0; i < N; i++) {
		int f = atomic_load(&x[i].fired);
		if (x[i].cancelled_at && x[i].cancelled_at < x[i].when)
			ck_assert_msg(f == 0, "timer %d fired after its cancel", i);
		ck_assert_msg(f <= 1, "timer %d fired %d times", i, f);
		if (f) {
			ck_assert_msg(x[i].fired_at >= x[i].when, "timer %d fired early", i);
			fired[n++] = &x[i];
		}
	}
	ck_assert_int_eq(n, atomic_load(&fire_seq));
	qsort(fired, (size_t)n, sizeof(*fired), by_order);
	for (int i = 1; i < n; i++)
		ck_assert_msg(fired[i - 1]->when <= fired[i]->when,
		              "fired out of order at %d: %lld after %lld", i,
		              (long long)fired[i]->when, (long long)fired[i - 1]->when);
	opq__timer_unref();
	free(fired);
	free(x);
}
END_TEST

static struct t_gate near_gate;

static void near_fire(struct opq__timer *t)
{
	tt_fire(t);
	t_gate_open(&near_gate);
}

static int64_t cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Instants too far away for nanoseconds in an int64_t are "never": such a
 * timer does not fire (it used to count as due: it fired at once, and a
 * deadline re-armed to it spun the timer thread), and the thread sleeps
 * while it is the soonest. */
START_TEST(test_timer_far_future)
{
	struct timespec w[3];
	ck_assert_int_eq(opq_deadline_after(&w[0], INT64_MAX), 0);
	w[1] = (struct timespec){(time_t)(INT64_MAX / 1000000000) + 1, 0};
	w[2] = (struct timespec){(time_t)INT64_MAX, 999999999};
	ck_assert_int_eq(opq__timer_ref(), 0);
	for (int i = 0; i < 3; i++) {
		struct ttimer far = {0}, near = {0};
		t_gate_init(&near_gate);
		opq__timer_arm(&far.t, &w[i], tt_fire);
		int64_t cpu0 = cpu_ns(), t0 = t_now_ns();
		near.when = t0 + 200 * MS;
		struct timespec ts = opq__ns_to_ts(near.when);
		opq__timer_arm(&near.t, &ts, near_fire);
		ck_assert(t_gate_wait(&near_gate));
		int64_t cpu = cpu_ns() - cpu0, wall = t_now_ns() - t0;
		/* Once this returns, the thread has looked at the far timer
		 * under its lock: it sleeps, or it has started firing it. */
		opq__timer_cancel(&near.t);
		opq__timer_cancel(&far.t); /* and waits for that firing */
		ck_assert_msg(atomic_load(&far.fired) == 0, "far timer %d fired", i);
		ck_assert_msg(cpu < wall / 2, "far timer %d: %lld ns of CPU in %lld ns", i,
		              (long long)cpu, (long long)wall);
		t_gate_destroy(&near_gate);
	}
	opq__timer_unref();
}
END_TEST

static int threads_now(void)
{
	DIR *d = opendir("/proc/self/task");
	ck_assert_ptr_nonnull(d);
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/* Trees with deadlines share the library's timer thread: no thread each. */
START_TEST(test_deadline_trees_share_timer)
{
	enum { TREES = 64 };
	opq_queue *q = mkqueue(2, 0);
	opq_scope_attr *a;
	ck_assert_int_eq(opq_scope_attr_create(&a), 0);
	struct timespec far = t_deadline(3600LL * 1000000000LL);
	ck_assert_int_eq(opq_scope_attr_set_deadline(a, &far), 0);
	int before = threads_now();
	opq_scope *roots[TREES];
	for (int i = 0; i < TREES; i++)
		ck_assert_int_eq(opq_scope_create(&roots[i], q, a), 0);
	ck_assert_int_le(threads_now(), before + 1);
	/* And they still time out: the soonest first, one tree at a time. */
	struct timespec soon = t_deadline(20 * MS);
	ck_assert_int_eq(opq_scope_attr_set_deadline(a, &soon), 0);
	opq_task *t;
	ck_assert_int_eq(opq_scope_spawn(roots[TREES / 2], a, sleep_forever, NULL, NULL, NULL, &t),
	                 0);
	ck_assert_int_eq(wait_task(t), ETIMEDOUT);
	ck_assert(t_passed(&soon));
	ck_assert_int_eq(opq_scope_cancelled(roots[TREES / 2 + 1]), 0);
	ck_assert_int_eq(opq_task_release(t), 0);
	for (int i = 0; i < TREES; i++)
		ck_assert_int_eq(opq_scope_destroy(roots[i]), 0);
	opq_scope_attr_destroy(a);
	rmqueue(q);
}
END_TEST

/* ---- error policies ------------------------------------------------------ */

struct backend {
	int64_t ms;
	int fail;
	atomic_int finished, cancelled;
};

static int backend_fn(opq_scope *s, void *arg)
{
	struct backend *b = arg;
	struct timespec dl = t_deadline(b->ms * MS);
	int rc = opq_scope_sleep(s, &dl);
	if (rc == ECANCELED) {
		atomic_fetch_add(&b->cancelled, 1);
		return rc;
	}
	atomic_fetch_add(&b->finished, 1);
	return b->fail;
}

START_TEST(test_policy_collect)
{
	opq_queue *q = mkqueue(3, 0);
	for (int i = 0; i < 10; i++) {
		struct backend b[3] = {
		    {.ms = 1, .fail = EIO}, {.ms = 40}, {.ms = 60, .fail = EPROTO}};
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
		for (int k = 0; k < 3; k++)
			ck_assert_int_eq(
			    opq_scope_spawn(root, NULL, backend_fn, &b[k], NULL, NULL, NULL), 0);
		ck_assert_int_eq(wait_scope(root), EIO);
		for (int k = 0; k < 3; k++) {
			ck_assert_int_eq(b[k].finished, 1);
			ck_assert_int_eq(b[k].cancelled, 0);
		}
		ck_assert_int_eq(opq_scope_destroy(root), 0);
	}
	rmqueue(q);
}
END_TEST

START_TEST(test_policy_first_error)
{
	opq_queue *q = mkqueue(3, 0);
	opq_scope_attr *a;
	ck_assert_int_eq(opq_scope_attr_create(&a), 0);
	ck_assert_int_eq(opq_scope_attr_set_policy(a, 7), EINVAL);
	ck_assert_int_eq(opq_scope_attr_set_policy(NULL, OPQ_SCOPE_COLLECT), EINVAL);
	ck_assert_int_eq(opq_scope_attr_set_policy(a, OPQ_SCOPE_FIRST_ERROR), 0);
	for (int i = 0; i < 10; i++) {
		struct backend b[3] = {{.ms = 5, .fail = EIO}, {.ms = 30000}, {.ms = 30000}};
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, a), 0);
		int64_t t0 = t_now_ns();
		for (int k = 0; k < 3; k++)
			ck_assert_int_eq(
			    opq_scope_spawn(root, NULL, backend_fn, &b[k], NULL, NULL, NULL), 0);
		ck_assert_int_eq(wait_scope(root), EIO);
		ck_assert_int_lt(t_now_ns() - t0, 5 * PROMPT_NS);
		ck_assert_int_eq(b[0].finished, 1);
		/* Cancelled while sleeping, or while still queued (then never ran). */
		ck_assert_int_eq(b[1].finished, 0);
		ck_assert_int_eq(b[2].finished, 0);
		ck_assert_int_le(b[1].cancelled, 1);
		ck_assert_int_le(b[2].cancelled, 1);
		/* The failed scope takes no more tasks. */
		ck_assert_int_eq(opq_scope_spawn(root, NULL, backend_fn, &b[0], NULL, NULL, NULL),
		                 ECANCELED);
		ck_assert_int_eq(opq_scope_destroy(root), 0);
	}
	opq_scope_attr_destroy(a);
	rmqueue(q);
}
END_TEST

/* Each child's result, as its done callback saw it (done_arg: the slot). */
static void store_result(void *arg, void *done_arg, int result)
{
	(void)arg;
	atomic_store((atomic_int *)done_arg, result);
}

START_TEST(test_policy_isolate)
{
	opq_queue *q = mkqueue(4, 0);
	opq_scope_attr *a, *timeout;
	ck_assert_int_eq(opq_scope_attr_create(&a), 0);
	ck_assert_int_eq(opq_scope_attr_set_policy(a, OPQ_SCOPE_ISOLATE), 0);
	ck_assert_int_eq(opq_scope_attr_create(&timeout), 0);
	for (int i = 0; i < 10; i++) {
		/* A failure, a task that times out, and two slow ones that succeed. */
		struct backend b[4] = {
		    {.ms = 1, .fail = EIO}, {.ms = 30000}, {.ms = 60}, {.ms = 60}};
		atomic_int res[4];
		for (int k = 0; k < 4; k++)
			atomic_init(&res[k], -1);
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, a), 0);
		struct timespec dl = t_deadline(5 * MS);
		ck_assert_int_eq(opq_scope_attr_set_deadline(timeout, &dl), 0);
		for (int k = 0; k < 4; k++)
			ck_assert_int_eq(opq_scope_spawn(root, k == 1 ? timeout : NULL, backend_fn,
			                                 &b[k], store_result, &res[k], NULL),
			                 0);
		/* The root's first error stays 0: nobody keeps a child's error. */
		ck_assert_int_eq(wait_scope(root), 0);
		ck_assert_int_eq(atomic_load(&res[0]), EIO);
		ck_assert_int_eq(atomic_load(&res[1]), ETIMEDOUT);
		/* Nobody was cancelled by them: the slow ones finished. */
		for (int k = 2; k < 4; k++) {
			ck_assert_int_eq(atomic_load(&res[k]), 0);
			ck_assert_int_eq(b[k].finished, 1);
			ck_assert_int_eq(b[k].cancelled, 0);
		}
		ck_assert_int_eq(opq_scope_cancelled(root), 0);
		/* The root still takes tasks. */
		atomic_int last = -1;
		ck_assert_int_eq(
		    opq_scope_spawn(root, NULL, child_ok_fn, NULL, store_result, &last, NULL), 0);
		ck_assert_int_eq(wait_scope(root), 0);
		ck_assert_int_eq(atomic_load(&last), 0);
		ck_assert_int_eq(opq_scope_destroy(root), 0);
	}
	opq_scope_attr_destroy(timeout);
	opq_scope_attr_destroy(a);
	rmqueue(q);
}
END_TEST

/* ---- nesting on one runner --------------------------------------------- */

#define DEPTH 10
#define WIDTH 3

static atomic_long tree_tasks, tree_dones;

static atomic_long tree_spawns;

static void count_done(void *arg, void *done_arg, int result)
{
	(void)arg;
	ck_assert(result == 0 || (done_arg && result == ECANCELED));
	atomic_fetch_add(&tree_dones, 1);
}

static int tree_node(opq_scope *s, void *arg)
{
	intptr_t depth = (intptr_t)arg;
	atomic_fetch_add(&tree_tasks, 1);
	if (depth == DEPTH)
		return 0;
	for (int i = 0; i < WIDTH; i++)
		ck_assert_int_eq(opq_scope_spawn(s, NULL, tree_node, (void *)(depth + 1),
		                                 count_done, NULL, NULL),
		                 0);
	/* Waiting on the only runner: the wait performs the children inline. */
	int first = -1;
	ck_assert_int_eq(opq_scope_wait(s, NULL, &first), 0);
	ck_assert_int_eq(first, 0);
	return 0;
}

START_TEST(test_one_runner_deep_tree)
{
	opq_queue *q = mkqueue(1, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	atomic_store(&tree_tasks, 0);
	atomic_store(&tree_dones, 0);
	ck_assert_int_eq(
	    opq_scope_spawn(root, NULL, tree_node, (void *)(intptr_t)1, count_done, NULL, NULL), 0);
	ck_assert_int_eq(wait_scope(root), 0);
	long expect = 0, level = 1;
	for (int d = 1; d <= DEPTH; d++, level *= WIDTH)
		expect += level; /* (3^10 - 1) / 2 = 29524 */
	ck_assert_int_eq(expect, 29524);
	ck_assert_int_eq(atomic_load(&tree_tasks), expect);
	ck_assert_int_eq(atomic_load(&tree_dones), expect);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

/* A task whose function returns without waiting: the children finish it later. */
static int fire_and_forget(opq_scope *s, void *arg)
{
	intptr_t depth = (intptr_t)arg;
	atomic_fetch_add(&tree_tasks, 1);
	if (depth < 6)
		for (int i = 0; i < WIDTH; i++) {
			ck_assert_int_eq(opq_scope_spawn(s, NULL, fire_and_forget,
			                                 (void *)(depth + 1), count_done, s, NULL),
			                 0);
			atomic_fetch_add(&tree_spawns, 1);
		}
	/* Returning cancels the children: those still queued never run. */
	return 0;
}

static int wait_grandchildren(opq_scope *s, void *arg)
{
	(void)arg;
	opq_task *t;
	ck_assert_int_eq(
	    opq_scope_spawn(s, NULL, fire_and_forget, (void *)(intptr_t)1, count_done, NULL, &t),
	    0);
	atomic_fetch_add(&tree_spawns, 1);
	/* t returns at once; its cancelled children are still queued on the only
	 * runner, which is this one: the wait must perform (discard) them. */
	ck_assert_int_eq(wait_task(t), 0);
	ck_assert_int_eq(opq_task_release(t), 0);
	ck_assert_int_eq(opq_task_wait(NULL, NULL, NULL), EINVAL);
	return 0;
}

START_TEST(test_one_runner_returned_parent)
{
	opq_queue *q = mkqueue(1, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	atomic_store(&tree_tasks, 0);
	atomic_store(&tree_dones, 0);
	atomic_store(&tree_spawns, 0);
	ck_assert_int_eq(opq_scope_spawn(root, NULL, wait_grandchildren, NULL, NULL, NULL, NULL),
	                 0);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(atomic_load(&tree_tasks), 1);
	ck_assert_int_eq(atomic_load(&tree_spawns), 4);
	ck_assert_int_eq(atomic_load(&tree_dones), 4);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

/*
 * A chain of tasks, each spawning the next and waiting for it. Helping
 * nested one level per task on the runner's stack: 100,000 of them
 * overflowed it (SIGSEGV). Helping now stops at a bound (half a default
 * stack: thousands of levels of these small tasks): on one runner the
 * chain stops growing there, and another runner takes it over.
 */
static struct chain {
	long length;
	atomic_long deepest, dones;
} chain;

static void chain_done(void *arg, void *done_arg, int result)
{
	(void)arg;
	(void)done_arg;
	(void)result;
	atomic_fetch_add(&chain.dones, 1);
}

static int chain_link(opq_scope *s, void *arg)
{
	long depth = (long)(intptr_t)arg;
	long d = atomic_load(&chain.deepest);
	while (d < depth && !atomic_compare_exchange_weak(&chain.deepest, &d, depth))
		;
	if (depth == chain.length)
		return 0;
	int rc = opq_scope_spawn(s, NULL, chain_link, (void *)(intptr_t)(depth + 1), chain_done,
	                         NULL, NULL);
	if (rc)
		return rc;
	return opq_scope_wait(s, NULL, NULL);
}

static void chain_start(opq_scope *root, long length)
{
	chain.length = length;
	atomic_store(&chain.deepest, 0);
	atomic_store(&chain.dones, 0);
	ck_assert_int_eq(
	    opq_scope_spawn(root, NULL, chain_link, (void *)(intptr_t)1, chain_done, NULL, NULL),
	    0);
}

/* Wait until the chain stops growing (for 200 ms) with its next link queued; its depth. */
static long chain_stalled(opq_queue *q)
{
	struct timespec give_up = t_forever();
	for (long d = -1;;) {
		ck_assert(!t_passed(&give_up));
		struct timespec dl = t_deadline(200 * MS);
		while (!t_passed(&dl))
			sched_yield();
		long now = atomic_load(&chain.deepest);
		opq_queue_stats st;
		ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
		/* Running: the link the runner took and those it helps, nested. */
		if (now == d && st.queued == 1 && st.running == (uint64_t)now)
			return now;
		d = now;
	}
}

START_TEST(test_chain_bounded_helping)
{
	/* One runner: it helps links below the one it runs up to the bound, then waits. */
	opq_queue *q = mkqueue(1, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	chain_start(root, 100000);
	long stall = chain_stalled(q);
	printf("chain: one runner helps %ld links deep\n", stall);
	ck_assert_int_ge(stall, 1000); /* deep enough for any sensible tree */
	ck_assert_int_lt(stall, 100000);
	ck_assert_int_eq(atomic_load(&chain.dones), 0);
	/* A cancel ends it: the queued link is taken out, the waits return. */
	ck_assert_int_eq(opq_scope_cancel(root), 0);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(atomic_load(&chain.dones), stall + 1);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);

	/* Two runners: the second takes the chain over where the first stopped helping. */
	q = mkqueue(2, 0);
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	long length = stall + stall / 2;
	chain_start(root, length);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(atomic_load(&chain.deepest), length);
	ck_assert_int_eq(atomic_load(&chain.dones), length);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);

	/* Runners with small stacks (opq_queue_attr_set_stack_size): the bound follows them. */
	opq_queue_attr *qa;
	ck_assert_int_eq(opq_queue_attr_create(&qa), 0);
	ck_assert_int_eq(opq_queue_attr_set_stack_size(qa, 256 * 1024), 0);
	ck_assert_int_eq(opq_queue_create(&q, qa), 0);
	opq_queue_attr_destroy(qa);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	chain_start(root, 100000);
	long small = chain_stalled(q);
	printf("chain: one runner with a 256 KiB stack helps %ld links deep\n", small);
	ck_assert_int_ge(small, 100);
	ck_assert_int_lt(small, stall);
	ck_assert_int_eq(opq_scope_cancel(root), 0);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(atomic_load(&chain.dones), small + 1);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	rmqueue(q);
}
END_TEST

/* ---- spawn rules, EPERM/EDEADLK, handles -------------------------------- */

static atomic_long dones;

static void inc_done(void *arg, void *done_arg, int result)
{
	(void)arg;
	(void)done_arg;
	(void)result;
	atomic_fetch_add(&dones, 1);
}

static int child_ok(opq_scope *s, void *arg)
{
	(void)s;
	(void)arg;
	return 0;
}

struct rules_arg {
	opq_scope *root;
	opq_scope *mine;
	opq_task *self;
	struct t_gate go;
};

static int rules_task(opq_scope *s, void *arg)
{
	struct rules_arg *ra = arg;
	__atomic_store_n(&ra->mine, s, __ATOMIC_SEQ_CST);
	/* Waiting for the scope one is in, or for oneself: EDEADLK. */
	ck_assert_int_eq(opq_scope_wait(ra->root, NULL, NULL), EDEADLK);
	ck_assert(t_gate_wait(&ra->go));
	ck_assert_int_eq(opq_task_wait(ra->self, NULL, NULL), EDEADLK);
	ck_assert_int_eq(opq_scope_spawn(s, NULL, child_ok, NULL, inc_done, NULL, NULL), 0);
	ck_assert_int_eq(opq_scope_cancel(s), 0);
	/* Termination began (cancelled): spawn fails, done is not called. */
	ck_assert_int_eq(opq_scope_spawn(s, NULL, child_ok, NULL, inc_done, NULL, NULL), ECANCELED);
	return 0;
}

START_TEST(test_spawn_rules)
{
	opq_queue *q = mkqueue(2, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	atomic_store(&dones, 0);
	struct rules_arg ra = {.root = root};
	t_gate_init(&ra.go);
	ck_assert_int_eq(opq_scope_spawn(root, NULL, rules_task, &ra, inc_done, NULL, &ra.self), 0);
	T_WAIT_UNTIL(__atomic_load_n(&ra.mine, __ATOMIC_SEQ_CST) != NULL);
	/* Only the task spawns in its scope. */
	ck_assert_int_eq(opq_scope_spawn(ra.mine, NULL, child_ok, NULL, NULL, NULL, NULL), EPERM);
	ck_assert_int_eq(opq_scope_destroy(ra.mine), EINVAL);
	t_gate_open(&ra.go);
	ck_assert_int_eq(wait_task(ra.self), 0);
	ck_assert_int_eq(atomic_load(&dones), 2);
	ck_assert_int_eq(opq_task_release(ra.self), 0);
	ck_assert_int_eq(opq_scope_spawn(NULL, NULL, child_ok, NULL, NULL, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_scope_spawn(root, NULL, NULL, NULL, NULL, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_scope_create(NULL, q, NULL), EINVAL);
	ck_assert_int_eq(opq_scope_create(&root, NULL, NULL) == EINVAL, 1);
	ck_assert_int_eq(opq_scope_cancel(NULL), EINVAL);
	ck_assert_int_eq(opq_task_cancel(NULL), EINVAL);
	ck_assert_int_eq(opq_task_release(NULL), EINVAL);
	ck_assert_int_eq(opq_scope_destroy(NULL), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	t_gate_destroy(&ra.go);
	/* A stopping queue: ESHUTDOWN, nothing spawned. */
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_scope_spawn(root, NULL, child_ok, NULL, inc_done, NULL, NULL),
	                 ESHUTDOWN);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(atomic_load(&dones), 2);
}
END_TEST

struct full_spawn {
	struct t_gate go, release;
	atomic_int spawn_rc;
};

static int spawn_into_full_queue(opq_scope *s, void *arg)
{
	struct full_spawn *fs = arg;
	ck_assert(t_gate_wait(&fs->go));
	/* The queue is full and every other runner is busy: spawn blocks until cancelled. */
	int rc = opq_scope_spawn(s, NULL, child_ok, NULL, inc_done, NULL, NULL);
	atomic_store(&fs->spawn_rc, rc);
	return rc;
}

START_TEST(test_spawn_cancelled_on_full_queue)
{
	for (int i = 0; i < 20; i++) {
		opq_queue *q = mkqueue(2, 1);
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
		struct full_spawn fs;
		t_gate_init(&fs.go);
		t_gate_init(&fs.release);
		atomic_store(&fs.spawn_rc, -1);
		atomic_store(&dones, 0);
		opq_queue_stats st;
		ck_assert_int_eq(opq_queue_enqueue_fn(q, gate_op, NULL, &fs.release), 0);
		T_WAIT_UNTIL(opq_queue_stats_get(q, &st) == 0 && st.running == 1);
		opq_task *t;
		ck_assert_int_eq(
		    opq_scope_spawn(root, NULL, spawn_into_full_queue, &fs, inc_done, NULL, &t), 0);
		T_WAIT_UNTIL(opq_queue_stats_get(q, &st) == 0 && st.running == 2);
		ck_assert_int_eq(opq_queue_enqueue_fn(q, nop, NULL, NULL), 0); /* now full */
		t_gate_open(&fs.go);
		T_WAIT_UNTIL(opq_queue_stats_get(q, &st) == 0 && st.blocked == 1);
		/* Outside any task, a blocked call is not affected by cancels. */
		struct timespec soon = t_deadline(10 * MS);
		ck_assert_int_eq(opq_queue_timedenqueue_fn(q, nop, NULL, NULL, &soon), ETIMEDOUT);
		ck_assert_int_eq(opq_task_cancel(t), 0);
		ck_assert_int_eq(wait_task(t), ECANCELED);
		ck_assert_int_eq(atomic_load(&fs.spawn_rc), ECANCELED);
		ck_assert_int_eq(atomic_load(&dones), 1); /* the child was never spawned */
		t_gate_open(&fs.release);
		ck_assert_int_eq(wait_scope(root), 0);
		ck_assert_int_eq(opq_task_release(t), 0);
		ck_assert_int_eq(opq_scope_destroy(root), 0);
		rmqueue(q);
		ck_assert_int_eq(atomic_load(&dones), 1);
		t_gate_destroy(&fs.go);
		t_gate_destroy(&fs.release);
	}
}
END_TEST

/*
 * The done callback gets the task's argument as well as its own, however
 * the task ended: performed, cancelled before it ran, or discarded by a
 * stopping queue.
 */
struct args_seen {
	atomic_int calls;
	void *arg, *done_arg;
	int result;
};

static int return_eproto(opq_scope *s, void *arg)
{
	(void)s;
	(void)arg;
	return EPROTO;
}

static void record_args(void *arg, void *done_arg, int result)
{
	struct args_seen *seen = done_arg;
	seen->arg = arg;
	seen->done_arg = done_arg;
	seen->result = result;
	atomic_fetch_add(&seen->calls, 1);
}

START_TEST(test_done_gets_task_arg)
{
	int request = 0;
	for (int how = 0; how < 3; how++) {
		opq_queue *q;
		ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
		opq_scope *root;
		ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
		struct args_seen seen = {0};
		opq_task *t;
		ck_assert_int_eq(
		    opq_scope_spawn(root, NULL, return_eproto, &request, record_args, &seen, &t),
		    0);
		int want = EPROTO;
		if (how == 0) {
			ck_assert_int_eq(opq_queue_start(q, 1), 0);
		} else if (how == 1) {
			ck_assert_int_eq(opq_task_cancel(t), 0);
			ck_assert_int_eq(opq_queue_start(q, 1), 0);
			want = ECANCELED;
		} else {
			ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
			want = ECANCELED;
		}
		ck_assert_int_eq(wait_task(t), want);
		ck_assert_int_eq(atomic_load(&seen.calls), 1);
		ck_assert_ptr_eq(seen.arg, &request);
		ck_assert_ptr_eq(seen.done_arg, &seen);
		ck_assert_int_eq(seen.result, want);
		ck_assert_int_eq(opq_task_release(t), 0);
		wait_scope(root);
		ck_assert_int_eq(opq_scope_destroy(root), 0);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
}
END_TEST

START_TEST(test_discarded_tasks)
{
	/* Tasks still queued when the queue stops discarding: cancelled, done runs once. */
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	atomic_store(&dones, 0);
	opq_task *t;
	ck_assert_int_eq(opq_scope_spawn(root, NULL, child_ok, NULL, inc_done, NULL, &t), 0);
	for (int i = 0; i < 99; i++)
		ck_assert_int_eq(opq_scope_spawn(root, NULL, child_ok, NULL, inc_done, NULL, NULL),
		                 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
	ck_assert_int_eq(atomic_load(&dones), 100);
	ck_assert_int_eq(wait_task(t), ECANCELED);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(opq_task_release(t), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

START_TEST(test_drop_handles)
{
	opq_queue *q = mkqueue(2, 0);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	atomic_store(&dones, 0);
	long n = t_scale(20000);
	for (long i = 0; i < n; i++) {
		opq_task *t = NULL;
		ck_assert_int_eq(opq_scope_spawn(root, NULL, child_ok, NULL, inc_done, NULL,
		                                 i % 3 == 2 ? NULL : &t),
		                 0);
		if (i % 3 == 0)
			ck_assert_int_eq(opq_task_release(t), 0); /* dropped, maybe before it ran */
		else if (i % 3 == 1) {
			if (i % 2)
				ck_assert_int_eq(opq_task_cancel(t), 0);
			ck_assert_int_eq(opq_task_release(t), 0);
		}
	}
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(atomic_load(&dones), n);
	/* Handles outliving the root scope stay valid until released. */
	opq_task *kept;
	ck_assert_int_eq(opq_scope_spawn(root, NULL, child_ok, NULL, NULL, NULL, &kept), 0);
	ck_assert_int_eq(wait_task(kept), 0);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	ck_assert_int_eq(wait_task(kept), 0);
	ck_assert_int_eq(opq_task_release(kept), 0);
	rmqueue(q);
}
END_TEST

/* ---- allocation failure ------------------------------------------------- */

static int spawn_sweep(opq_scope *s, void *arg)
{
	(void)arg;
	for (int i = 0; i < 5; i++) {
		opq_task *t = NULL;
		SWEEP(opq_scope_spawn(s, NULL, child_ok, NULL, inc_done, NULL, &t),
		      ck_assert_ptr_null(t));
		ck_assert_int_eq(opq_task_release(t), 0);
	}
	int first = -1;
	ck_assert_int_eq(opq_scope_wait(s, NULL, &first), 0);
	ck_assert_int_eq(first, 0);
	return 0;
}

START_TEST(test_enomem)
{
	opq_queue *q = mkqueue(1, 0);
	opq_scope_attr *a = NULL;
	SWEEP(opq_scope_attr_create(&a), ck_assert_ptr_null(a));
	opq_scope *root = NULL;
	SWEEP(opq_scope_create(&root, q, a), ck_assert_ptr_null(root));
	atomic_store(&dones, 0);
	opq_task *t = NULL;
	SWEEP(opq_scope_spawn(root, a, spawn_sweep, NULL, inc_done, NULL, &t),
	      ck_assert_ptr_null(t));
	ck_assert_int_eq(wait_task(t), 0);
	ck_assert_int_eq(wait_scope(root), 0);
	ck_assert_int_eq(atomic_load(&dones),
	                 6); /* 5 children and the task: failed spawns never ran */
	ck_assert_int_eq(opq_task_release(t), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	opq_scope_attr_destroy(a);
	rmqueue(q);
}
END_TEST

/* Spawns with a deadline attribute from inside a task (arg: the attr). */
static int spawn_sweep_deadline(opq_scope *s, void *arg)
{
	for (int i = 0; i < 3; i++) {
		opq_task *t = NULL;
		SWEEP(opq_scope_spawn(s, arg, child_ok, NULL, inc_done, NULL, &t),
		      ck_assert_ptr_null(t));
		ck_assert_int_eq(opq_task_release(t), 0);
	}
	opq_scope_attr *a = NULL;
	SWEEP(opq_scope_attr_create(&a), ck_assert_ptr_null(a));
	opq_scope_attr_destroy(a);
	int first = -1;
	ck_assert_int_eq(opq_scope_wait(s, NULL, &first), 0);
	ck_assert_int_eq(first, 0);
	return 0;
}

/* Run `call` with the next allocation armed to fail: it must make none. */
#define NO_ALLOC(call)                                                                             \
	do {                                                                                       \
		opq__fault_set(1);                                                                 \
		int rc_ = (call);                                                                  \
		long made_ = opq__fault_count();                                                   \
		opq__fault_set(0);                                                                 \
		ck_assert_msg(made_ == 0, "%s allocated %ld", #call, made_);                       \
		(void)rc_;                                                                         \
	} while (0)

START_TEST(test_enomem_deadlines)
{
	/* Roots and tasks with a (far) deadline: the deadline list and the
	 * library's timer add no allocation of their own. */
	opq_queue *q = mkqueue(2, 0);
	opq_scope_attr *a;
	ck_assert_int_eq(opq_scope_attr_create(&a), 0);
	struct timespec far = t_deadline(3600LL * 1000000000LL);
	ck_assert_int_eq(opq_scope_attr_set_deadline(a, &far), 0);
	ck_assert_int_eq(opq_scope_attr_set_policy(a, OPQ_SCOPE_FIRST_ERROR), 0);
	opq_scope *root = NULL;
	SWEEP(opq_scope_create(&root, q, a), ck_assert_ptr_null(root));
	atomic_store(&dones, 0);
	opq_task *t = NULL;
	SWEEP(opq_scope_spawn(root, a, spawn_sweep_deadline, a, inc_done, NULL, &t),
	      ck_assert_ptr_null(t));
	ck_assert_int_eq(wait_task(t), 0);
	ck_assert_int_eq(atomic_load(&dones), 4);
	/* The rest allocates nothing. */
	int res;
	NO_ALLOC(opq_task_wait(t, NULL, &res));
	NO_ALLOC(opq_task_cancel(t));
	NO_ALLOC(opq_task_cancelled(t));
	NO_ALLOC(opq_task_release(t));
	NO_ALLOC(opq_scope_wait(root, NULL, &res));
	NO_ALLOC(opq_scope_sleep(root, &(struct timespec){0, 0}));
	NO_ALLOC(opq_scope_attr_set_policy(a, OPQ_SCOPE_COLLECT));
	NO_ALLOC(opq_scope_attr_set_deadline(a, NULL));
	NO_ALLOC(opq_scope_cancel(root));
	NO_ALLOC(opq_scope_cancelled(root));
	NO_ALLOC(opq_scope_sleep(root, NULL));
	NO_ALLOC(opq_scope_destroy(root));
	opq_scope_attr_destroy(a);
	rmqueue(q);
}
END_TEST

/* ---- stress: random trees ---------------------------------------------- */

#define STRESS_MAX 10000

struct node {
	struct node *parent;
	atomic_int done; /* its done callback ran (how many times) */
	atomic_int spawned, children_done;
	_Atomic(opq_task *) handle;
};

struct stress {
	struct node nodes[STRESS_MAX + 1];
	atomic_long next;
	atomic_long budget;
	atomic_long violations;
	unsigned seed;
};

static struct stress *S;

static uint32_t rnd(uint32_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 17;
	*x ^= *x << 5;
	return *x;
}

static void check_parent_alive(struct node *n)
{
	if (n->parent && atomic_load(&n->parent->done))
		atomic_fetch_add(&S->violations, 1);
}

static int stress_node(opq_scope *s, void *arg);

static void stress_done(void *arg, void *done_arg, int result)
{
	(void)result;
	struct node *n = arg;
	if (done_arg != S)
		atomic_fetch_add(&S->violations, 1);
	check_parent_alive(n);
	if (atomic_load(&n->children_done) != atomic_load(&n->spawned))
		atomic_fetch_add(&S->violations, 1);
	if (atomic_fetch_add(&n->done, 1) != 0)
		atomic_fetch_add(&S->violations, 1);
	if (n->parent)
		atomic_fetch_add(&n->parent->children_done, 1);
}

static int stress_node(opq_scope *s, void *arg)
{
	struct node *n = arg;
	uint32_t x = S->seed ^ (uint32_t)(uintptr_t)(n - S->nodes) * 2654435761u;
	if (!x)
		x = 1;
	check_parent_alive(n);
	int kids = 1 + (int)(rnd(&x) % 4);
	opq_scope_attr *a = NULL;
	for (int i = 0; i < kids; i++) {
		if (atomic_fetch_sub(&S->budget, 1) <= 0)
			break;
		long idx = atomic_fetch_add(&S->next, 1);
		struct node *c = &S->nodes[idx];
		c->parent = n;
		const opq_scope_attr *ca = NULL;
		if (rnd(&x) % 32 == 0) {
			if (!a)
				ck_assert_int_eq(opq_scope_attr_create(&a), 0);
			struct timespec dl = t_deadline((int64_t)(rnd(&x) % 3000) * 1000);
			ck_assert_int_eq(opq_scope_attr_set_deadline(a, &dl), 0);
			ck_assert_int_eq(opq_scope_attr_set_policy(a, (int)(rnd(&x) % 2)), 0);
			ca = a;
		}
		bool keep = rnd(&x) % 2;
		opq_task *t = NULL;
		atomic_fetch_add(&n->spawned, 1); /* before: the child may finish at once */
		int rc = opq_scope_spawn(s, ca, stress_node, c, stress_done, S, keep ? &t : NULL);
		if (rc) {
			ck_assert_int_eq(rc, ECANCELED);
			c->parent = NULL; /* never spawned */
			atomic_fetch_sub(&n->spawned, 1);
			break;
		}
		if (t)
			atomic_store(&c->handle, t);
		check_parent_alive(n);
	}
	if (a)
		opq_scope_attr_destroy(a);
	uint32_t mode = rnd(&x) % 20;
	switch (mode < 17 ? 0 : mode < 19 ? 1 : mode < 20 ? 2 : 3) {
	case 0: { /* wait for the children (helping) */
		struct timespec dl = t_forever();
		ck_assert_int_eq(opq_scope_wait(s, &dl, NULL), 0);
		break;
	}
	case 1: { /* a short cancellable sleep */
		struct timespec dl = t_deadline((int64_t)(rnd(&x) % 200) * 1000);
		int rc = opq_scope_sleep(s, &dl);
		ck_assert(rc == 0 || rc == ECANCELED);
		break;
	}
	case 2:
		if (rnd(&x) % 16 == 0)
			opq_scope_cancel(s);
		break;
	default:
		break;
	}
	check_parent_alive(n);
	return rnd(&x) % 10 == 0 ? EIO : 0;
}

static void stress_round(opq_queue *q, unsigned seed, long size)
{
	memset(S, 0, sizeof(*S));
	S->seed = seed;
	atomic_store(&S->next, 1);
	atomic_store(&S->budget, size - 1);
	opq_scope *root;
	ck_assert_int_eq(opq_scope_create(&root, q, NULL), 0);
	S->nodes[0].parent = NULL;
	opq_task *rt;
	ck_assert_int_eq(
	    opq_scope_spawn(root, NULL, stress_node, &S->nodes[0], stress_done, S, &rt), 0);
	atomic_store(&S->nodes[0].handle, rt);
	/* Random cancellations from outside once the tree has grown. */
	T_WAIT_UNTIL(atomic_load(&S->next) >= size / 2 ||
	             opq_task_wait(rt, &(struct timespec){0, 0}, NULL) == 0);
	uint32_t x = seed | 1;
	for (int k = 0; k < 20; k++) {
		long hi = atomic_load(&S->next);
		long i = (long)(rnd(&x) % (uint32_t)hi);
		opq_task *t = atomic_load(&S->nodes[i].handle);
		if (t && i != 0)
			ck_assert_int_eq(opq_task_cancel(t), 0);
		if (rnd(&x) % 4 == 0)
			sched_yield();
	}
	int rrc = wait_task(rt);
	ck_assert(rrc == 0 || rrc == EIO || rrc == ECANCELED || rrc == ETIMEDOUT);
	wait_scope(root);
	long n = atomic_load(&S->next);
	for (long i = 0; i < n; i++) {
		struct node *nd = &S->nodes[i];
		ck_assert_int_eq(atomic_load(&nd->done), nd->parent || i == 0 ? 1 : 0);
		opq_task *t = atomic_load(&nd->handle);
		if (t)
			ck_assert_int_eq(opq_task_release(t), 0);
	}
	ck_assert_int_eq(atomic_load(&S->violations), 0);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
}

START_TEST(test_stress_random_trees)
{
	S = calloc(1, sizeof(*S));
	ck_assert_ptr_nonnull(S);
	opq_queue *q = mkqueue(3, 0);
	long rounds = t_scale(40);
	long total = 0, largest = 0, full = 0;
	for (long r = 0; r < rounds; r++) {
		stress_round(q, 0x9e3779b9u * (unsigned)(r + 1), STRESS_MAX);
		long n = atomic_load(&S->next);
		total += n;
		largest = n > largest ? n : largest;
		full += n == STRESS_MAX;
	}
	printf("stress: %ld trees, %ld tasks, largest %ld, %ld of %d tasks\n", rounds, total,
	       largest, full, STRESS_MAX);
	rmqueue(q);
	free(S);
}
END_TEST

START_TEST(test_stress_one_runner)
{
	S = calloc(1, sizeof(*S));
	ck_assert_ptr_nonnull(S);
	opq_queue *q = mkqueue(1, 0);
	long rounds = t_scale(5);
	for (long r = 0; r < rounds; r++)
		stress_round(q, 0x85ebca6bu * (unsigned)(r + 7), STRESS_MAX);
	rmqueue(q);
	free(S);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("scope");
	TCase *tc = t_tcase(s, "order", 120);
	tcase_add_test(tc, test_order_return_first);
	tcase_add_test(tc, test_order_cancel_first);
	tc = t_tcase(s, "cancel", 120);
	tcase_add_test(tc, test_cancel_flag);
	tcase_add_test(tc, test_blocking_calls_cancelled);
	tcase_add_test(tc, test_cancelled_before_blocking);
	tc = t_tcase(s, "wait", 120);
	tcase_add_test(tc, test_wait_deadline);
	tcase_add_test(tc, test_scope_deadline);
	tcase_add_test(tc, test_cancel_pulls_queued);
	tcase_add_test(tc, test_spawn_timeout);
	tcase_add_test(tc, test_destroy_while_woken);
	tcase_add_test(tc, test_done_waits_deadlock);
	tcase_add_test(tc, test_timer_heap);
	tcase_add_test(tc, test_timer_far_future);
	tcase_add_test(tc, test_deadline_trees_share_timer);
	tc = t_tcase(s, "policy", 120);
	tcase_add_test(tc, test_policy_collect);
	tcase_add_test(tc, test_policy_first_error);
	tcase_add_test(tc, test_policy_isolate);
	tc = t_tcase(s, "nesting", 300);
	tcase_add_test(tc, test_one_runner_deep_tree);
	tcase_add_test(tc, test_one_runner_returned_parent);
	tcase_add_test(tc, test_chain_bounded_helping);
	tc = t_tcase(s, "lifecycle", 120);
	tcase_add_test(tc, test_spawn_rules);
	tcase_add_test(tc, test_discarded_tasks);
	tcase_add_test(tc, test_done_gets_task_arg);
	tcase_add_test(tc, test_spawn_cancelled_on_full_queue);
	tcase_add_test(tc, test_drop_handles);
	tcase_add_test(tc, test_enomem);
	tcase_add_test(tc, test_enomem_deadlines);
	tc = t_tcase(s, "stress", 600);
	tcase_add_test(tc, test_stress_random_trees);
	tcase_add_test(tc, test_stress_one_runner);
	return t_run(s);
}
