/*
 * scope_tree.c: the scope tree's cancel walks, the settling of terminated
 * tasks (done callbacks, first errors), running a task, and deadlines
 * (scope_impl.h has the design and the invariants).
 */
#include "scope_impl.h"

#include "list.h"

static _Thread_local opq_task *tls_done_task; /* whose done callback this thread runs */

opq_task *opq__scope_done_task(void)
{
	return tls_done_task;
}

/* ---- helpers ------------------------------------------------------------- */

static bool ts_passed(const struct timespec *dl)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec > dl->tv_sec || (now.tv_sec == dl->tv_sec && now.tv_nsec >= dl->tv_nsec);
}

opq_scope *opq__scope_current(void)
{
	struct opq__cancel_ctx *c = opq__cancel_current();
	return c ? OPQ_CONTAINER_OF(c, opq_scope, cx) : NULL;
}

void opq__scope_init(opq_scope *s, struct opq__tree *tr, opq_task *owner,
                     const opq_scope_attr *attr)
{
	s->tr = tr;
	opq__list_init(&s->children);
	opq__cancel_ctx_init(&s->cx, &tr->mu);
	s->owner = owner;
	s->policy = attr ? attr->policy : OPQ_SCOPE_COLLECT;
	s->has_deadline = attr && attr->has_deadline;
	if (s->has_deadline)
		s->deadline = attr->deadline;
}

opq_task *opq__scope_first_child(const opq_scope *s)
{
	struct opq__link *l = opq__list_first(&s->children);
	return l ? OPQ_CONTAINER_OF(l, opq_task, sib) : NULL;
}

opq_task *opq__scope_walk_next(opq_scope *top, opq_task *t, bool descend)
{
	if (descend && !opq__list_empty(&t->scope.children))
		return opq__scope_first_child(&t->scope);
	for (;;) {
		if (t->sib.opq__next != &t->pscope->children)
			return OPQ_CONTAINER_OF(t->sib.opq__next, opq_task, sib);
		if (t->pscope == top)
			return NULL;
		t = t->pscope->owner;
	}
}

static bool after_empty(const struct after *af)
{
	return !af->wake && !af->pull;
}

/* Under tr->mu: mark s cancelled; its blocked calls and its queued task go onto af. */
static void mark_cancelled(opq_scope *s, struct after *af)
{
	opq_task *t = s->owner;
	if (t && t->state == OPQ__T_QUEUED && !opq__scope_cancelled(s)) {
		t->refs++;
		t->pull_next = af->pull;
		af->pull = t;
	}
	opq__cancel_ctx_cancel(&s->cx, &af->wake);
	s->closing = true;
}

/* Under tr->mu: cancel s itself (if self) and every task below it. */
void opq__cancel_tree(opq_scope *s, bool self, struct after *af)
{
	if (self)
		mark_cancelled(s, af);
	s->closing = true;
	opq_task *t = opq__scope_first_child(s);
	while (t) {
		bool descend = false;
		if (!opq__scope_cancelled(&t->scope)) {
			mark_cancelled(&t->scope, af);
			descend = true;
		}
		t = opq__scope_walk_next(s, t, descend);
	}
}

/*
 * Without tr->mu: wake af's blocked calls and take its tasks out of the
 * queue. opq_queue_cancel ends a task it takes out on this thread (its
 * discard callback, opq__task_discard: done callbacks and all); EBUSY means a
 * runner or a helper took it first, and will skip its function. The
 * tasks stay pinned: after_unpin drops the pins.
 */
void opq__after_run(struct opq__tree *tr, const struct after *af)
{
	opq__cancel_wake(af->wake);
	for (opq_task *t = af->pull; t; t = t->pull_next)
		(void)opq_queue_cancel(tr->q, &t->op);
}

/* Under tr->mu: drop af's pins and empty it; true if the tree must be freed (after unlocking). */
bool opq__after_unpin(struct after *af)
{
	bool free_tree = false;
	for (opq_task *t = af->pull, *next; t; t = next) {
		next = t->pull_next;
		free_tree |= opq__task_unref(t);
	}
	*af = (struct after){0};
	return free_tree;
}

/* Under tr->mu: drop it, do what af holds, take it again. True: free the tree after unlocking. */
static bool relock_after(struct opq__tree *tr, struct after *af)
{
	if (after_empty(af))
		return false;
	opq__unlock(&tr->mu);
	opq__after_run(tr, af);
	opq__lock(&tr->mu);
	return opq__after_unpin(af);
}

void opq__tree_free(struct opq__tree *tr)
{
	pthread_cond_destroy(&tr->cv);
	pthread_mutex_destroy(&tr->mu);
	opq__free(tr);
}

bool opq__task_unref(opq_task *t)
{
	struct opq__tree *tr = t->scope.tr;
	if (--t->refs)
		return false;
	opq__free(t);
	return --tr->refs == 0;
}

void opq__dl_remove(opq_scope *s)
{
	if (opq__list_linked(&s->dl))
		opq__list_remove(&s->dl);
}

void opq__child_unlink(opq_scope *p, opq_task *t)
{
	opq__list_remove(&t->sib);
	p->nchildren--;
}

/*
 * Under tr->mu: record the first error of scope s from a child's result.
 * An isolating scope records none: the child's done callback had it.
 */
static void child_result(opq_scope *s, opq_task *child, struct after *af)
{
	int rc = child->result;
	if (rc == 0 || s->policy == OPQ_SCOPE_ISOLATE)
		return;
	/* ECANCELED from a cancelled child is the effect of a cancel, not a cause. */
	if (rc == ECANCELED && opq__scope_cancelled(&child->scope))
		return;
	if (s->first_error)
		return;
	s->first_error = rc;
	if (s->policy == OPQ_SCOPE_FIRST_ERROR)
		opq__cancel_tree(s, false, af);
}

/*
 * Under tr->mu, with a pin on t: finish t if it is ready (its function
 * returned and no child is left), then walk up to its parent. Drops and
 * retakes tr->mu to do what *af holds (and what the walk adds to it) and
 * to run done callbacks. Returns true if the tree must be freed after
 * unlocking.
 */
static bool settle(struct opq__tree *tr, opq_task *t, struct after *af)
{
	bool free_tree = false;
	opq_task *pinned = t;
	while (t && t->state == OPQ__T_RETURNED && t->scope.nchildren == 0) {
		t->state = OPQ__T_FINISHING;
		opq__dl_remove(&t->scope);
		struct after now = *af;
		*af = (struct after){0};
		opq__unlock(&tr->mu);
		opq__after_run(tr, &now);
		if (t->done) {
			struct opq__cancel_ctx *outer = opq__cancel_set_current(NULL);
			opq_task *outer_done = tls_done_task;
			tls_done_task = t;
			t->done(t->arg, t->done_arg, t->result);
			tls_done_task = outer_done;
			opq__cancel_set_current(outer);
		}
		opq__lock(&tr->mu);
		free_tree |= opq__after_unpin(&now);
		t->state = OPQ__T_DONE;
		opq_scope *p = t->pscope;
		opq__child_unlink(p, t);
		child_result(p, t, af);
		if (tr->waiters)
			OPQ_CHECK(pthread_cond_broadcast(&tr->cv));
		opq_task *up = p->owner;
		if (up)
			up->refs++; /* pin the parent while we look at it */
		if (t != pinned)
			free_tree |= opq__task_unref(t); /* the pin taken when we walked up */
		free_tree |= opq__task_unref(t);         /* the tree's link */
		t = up;
	}
	if (t && t != pinned)
		free_tree |= opq__task_unref(t);
	free_tree |= relock_after(tr, af);
	return free_tree;
}

/* ---- running a task ------------------------------------------------------ */

/*
 * Run t: perform it (from a runner or a helper), or end it unrun when the
 * queue discards it (a stopping queue, or a cancel that pulled it).
 */
static void task_run(opq_task *t, bool discarded)
{
	struct opq__tree *tr = t->scope.tr;
	struct after af = {0};
	opq__lock(&tr->mu);
	t->state = OPQ__T_RUNNING; /* not QUEUED: nobody pulls it now */
	if (discarded && !opq__scope_cancelled(&t->scope))
		opq__cancel_tree(&t->scope, true, &af); /* dropped by a stopping queue: cancelled */
	bool skip = opq__scope_cancelled(&t->scope);
	t->refs++; /* our pin */
	opq__unlock(&tr->mu);

	int rc = ECANCELED;
	if (!skip) {
		struct opq__cancel_ctx *outer = opq__cancel_set_current(&t->scope.cx);
		rc = t->fn(&t->scope, t->arg);
		opq__cancel_set_current(outer);
	}

	opq__lock(&tr->mu);
	if (rc == ECANCELED && t->scope.timed_out)
		rc = ETIMEDOUT;
	t->result = rc;
	t->state = OPQ__T_RETURNED;
	opq__cancel_tree(&t->scope, false,
	                 &af); /* its children are sent cancel; queued ones pulled */
	bool free_tree = settle(tr, t, &af);
	free_tree |= opq__task_unref(t);
	opq__unlock(&tr->mu);
	if (free_tree)
		opq__tree_free(tr);
}

void opq__task_perform(opq_op *op)
{
	task_run(OPQ_CONTAINER_OF(op, opq_task, op), false);
}

void opq__task_discard(opq_op *op)
{
	task_run(OPQ_CONTAINER_OF(op, opq_task, op), true);
}

/* ---- deadlines ----------------------------------------------------------- */

/*
 * The tree's timer fires (on the library's timer thread): time out every
 * scope whose deadline has passed, soonest first, and arm the timer again
 * for the next one.
 */
static opq_scope *dl_first(struct opq__tree *tr)
{
	struct opq__link *l = opq__list_first(&tr->dl);
	return l ? OPQ_CONTAINER_OF(l, opq_scope, dl) : NULL;
}

static void dl_fire(struct opq__timer *timer)
{
	struct opq__tree *tr = OPQ_CONTAINER_OF(timer, struct opq__tree, timer);
	opq__lock(&tr->mu);
	opq_scope *s;
	while ((s = dl_first(tr)) && ts_passed(&s->deadline)) {
		opq__dl_remove(s);
		struct after af = {0};
		if (!opq__scope_cancelled(s)) {
			s->timed_out = true;
			if (!s->first_error)
				s->first_error = ETIMEDOUT;
			opq__cancel_tree(s, true, &af);
		}
		/*
		 * The tasks pulled end on this thread, done callbacks and all.
		 * The tree outlives this: opq_scope_destroy waits for us
		 * (opq__timer_cancel) before it drops the root's reference.
		 */
		bool free_tree = relock_after(tr, &af);
		assert(!free_tree);
		(void)free_tree;
	}
	if (s)
		opq__timer_arm(&tr->timer, &s->deadline, dl_fire);
	opq__unlock(&tr->mu);
}

/*
 * Before arming a deadline, without tr->mu (it takes q->mu, and nothing
 * takes an object mutex under tr->mu): make sure the timer thread runs.
 */
int opq__tree_timer_ref(struct opq__tree *tr)
{
	if (atomic_load_explicit(&tr->timer_ref, memory_order_acquire))
		return 0;
	int rc = opq__queue_timer_ref(tr->q);
	if (rc == 0)
		atomic_store_explicit(&tr->timer_ref, true, memory_order_release);
	return rc;
}

/*
 * Under tr->mu, after tree_timer_ref: arm s's deadline. One that has passed
 * already cancels s at once (s is new: nothing runs or waits in it yet),
 * not when the timer thread gets to it: a task must not start meanwhile.
 */
void opq__dl_arm(struct opq__tree *tr, opq_scope *s)
{
	if (ts_passed(&s->deadline)) {
		struct after af = {0};
		s->timed_out = true;
		if (!s->first_error)
			s->first_error = ETIMEDOUT;
		mark_cancelled(s, &af); /* new: nothing blocks in it, its task is not queued */
		assert(after_empty(&af));
		return;
	}
	struct opq__link *at = tr->dl.opq__next;
	while (at != &tr->dl &&
	       !opq__ts_before(&s->deadline, &OPQ_CONTAINER_OF(at, opq_scope, dl)->deadline))
		at = at->opq__next;
	opq__list_insert_before(at, &s->dl);
	if (dl_first(tr) == s)
		opq__timer_arm(&tr->timer, &s->deadline, dl_fire);
}
