/*
 * scope.c: structured concurrency on the operation queue.
 *
 * One lock per tree (tr->mu) guards every scope and task of the tree: the
 * child lists, states, counts, first errors, and each scope's cancel
 * context (cancel.c), whose lock it is.
 * Termination never blocks a runner: when a task's function returns, its
 * children are cancelled and, if none is left, it finishes at once;
 * otherwise the last child to terminate finishes it ("settle" walks up).
 * Explicit waits (opq_scope_wait, opq_task_wait, in scope_wait.c) made on
 * a runner of the tree's queue help: they take a queued task of the
 * subtree they wait for out of the FIFO and perform it inline
 * (opq__queue_help), so a queue with one runner runs a tree to
 * completion; the helper's stack grows with the tree's depth only (it
 * helps descendants of what it waits for), and stops growing at a bound
 * (scope_wait.c): deeper, a wait waits for another runner.
 *
 * Invariants, under tr->mu:
 * - a task is in its parent scope's child list from spawn until its done
 *   callback has run (state DONE); scope->nchildren counts that list;
 * - a cancelled scope's descendants are all cancelled, and a cancelled or
 *   closing scope accepts no spawn: so a cancel walk may stop at a node
 *   already cancelled;
 * - t->refs counts: the tree's link (until DONE), the caller's handle, and
 *   temporary pins (spawn, helpers, waiters); the task is freed at 0.
 *   tr->refs counts the root scope plus every task not yet freed.
 *
 * The thread's current cancel context is the scope of the task it runs
 * (task_run sets it; a done callback runs with none): every context ever
 * made current is a scope's, so the current scope is the one around it.
 *
 * A cancel takes the cancelled tasks that have not started out of the
 * queue at once (opq_queue_cancel), so that they end, run their done
 * callbacks and free their places in a bounded queue then, not when a
 * runner reaches them: whoever marks a QUEUED task cancelled (a cancel
 * walk, a deadline, a returning parent, a failing sibling) pins it onto
 * the pull list of its `struct after`, and once it has dropped tr->mu
 * calls opq_queue_cancel, whose discard callback (task_discard) ends the
 * task on that thread. A runner or a helper that took the task first
 * makes that call EBUSY and runs the task, which sees the cancel and
 * skips its function. Exactly one thread pulls a task: the one that saw
 * it QUEUED when it cancelled it, or spawn, for a task cancelled while it
 * was being enqueued.
 *
 * Lock order: object mutex (queue, line, stage) -> tr->mu. Nothing takes
 * an object mutex while holding tr->mu; cancellers wake blocked calls and
 * pull queued tasks after dropping it (after_run; opq__cancel_wake, see
 * cancel.c).
 */
#include "internal.h"

#include "list.h"

struct opq_scope_attr {
	int policy;
	bool has_deadline;
	struct timespec deadline;
};

static _Thread_local opq_task *tls_done_task; /* whose done callback this thread runs */

opq_task *opq__scope_done_task(void)
{
	return tls_done_task;
}

/* ---- attributes ---------------------------------------------------------- */

OPQ_EXPORT int opq_scope_attr_create(opq_scope_attr **attrp)
{
	if (!attrp)
		return EINVAL;
	opq_scope_attr *a = opq__calloc(1, sizeof(*a));
	if (!a)
		return ENOMEM;
	a->policy = OPQ_SCOPE_COLLECT;
	*attrp = a;
	return 0;
}

OPQ_EXPORT void opq_scope_attr_destroy(opq_scope_attr *attr)
{
	opq__free(attr);
}

OPQ_EXPORT int opq_scope_attr_set_policy(opq_scope_attr *attr, int policy)
{
	if (!attr || (policy != OPQ_SCOPE_COLLECT && policy != OPQ_SCOPE_FIRST_ERROR &&
	              policy != OPQ_SCOPE_ISOLATE))
		return EINVAL;
	attr->policy = policy;
	return 0;
}

OPQ_EXPORT int opq_scope_attr_set_deadline(opq_scope_attr *attr, const struct timespec *deadline)
{
	if (!attr || !opq__deadline_ok(deadline))
		return EINVAL;
	attr->has_deadline = deadline != NULL;
	if (deadline)
		attr->deadline = *deadline;
	return 0;
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

static bool scope_cancelled(const opq_scope *s)
{
	return opq__cancel_ctx_cancelled(&s->cx);
}

static void scope_init(opq_scope *s, struct opq__tree *tr, opq_task *owner,
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

/*
 * What a cancel leaves to do once tr->mu is dropped: the blocked calls to
 * wake, and the cancelled tasks that were still queued, each pinned, to
 * take out of the queue. Start it empty ({ 0 }).
 */
struct after {
	struct opq__cancel_reg *wake;
	opq_task *pull; /* by pull_next */
};

static bool after_empty(const struct after *af)
{
	return !af->wake && !af->pull;
}

/* Under tr->mu: mark s cancelled; its blocked calls and its queued task go onto af. */
static void mark_cancelled(opq_scope *s, struct after *af)
{
	opq_task *t = s->owner;
	if (t && t->state == OPQ__T_QUEUED && !scope_cancelled(s)) {
		t->refs++;
		t->pull_next = af->pull;
		af->pull = t;
	}
	opq__cancel_ctx_cancel(&s->cx, &af->wake);
	s->closing = true;
}

/* Under tr->mu: cancel s itself (if self) and every task below it. */
static void cancel_tree(opq_scope *s, bool self, struct after *af)
{
	if (self)
		mark_cancelled(s, af);
	s->closing = true;
	opq_task *t = opq__scope_first_child(s);
	while (t) {
		bool descend = false;
		if (!scope_cancelled(&t->scope)) {
			mark_cancelled(&t->scope, af);
			descend = true;
		}
		t = opq__scope_walk_next(s, t, descend);
	}
}

/*
 * Without tr->mu: wake af's blocked calls and take its tasks out of the
 * queue. opq_queue_cancel ends a task it takes out on this thread (its
 * discard callback, task_discard: done callbacks and all); EBUSY means a
 * runner or a helper took it first, and will skip its function. The
 * tasks stay pinned: after_unpin drops the pins.
 */
static void after_run(struct opq__tree *tr, const struct after *af)
{
	opq__cancel_wake(af->wake);
	for (opq_task *t = af->pull; t; t = t->pull_next)
		(void)opq_queue_cancel(tr->q, &t->op);
}

/* Under tr->mu: drop af's pins and empty it; true if the tree must be freed (after unlocking). */
static bool after_unpin(struct after *af)
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
	after_run(tr, af);
	opq__lock(&tr->mu);
	return after_unpin(af);
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

static void dl_remove(opq_scope *s)
{
	if (opq__list_linked(&s->dl))
		opq__list_remove(&s->dl);
}

static void child_unlink(opq_scope *p, opq_task *t)
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
	if (rc == ECANCELED && scope_cancelled(&child->scope))
		return;
	if (s->first_error)
		return;
	s->first_error = rc;
	if (s->policy == OPQ_SCOPE_FIRST_ERROR)
		cancel_tree(s, false, af);
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
		dl_remove(&t->scope);
		struct after now = *af;
		*af = (struct after){0};
		opq__unlock(&tr->mu);
		after_run(tr, &now);
		if (t->done) {
			struct opq__cancel_ctx *outer = opq__cancel_set_current(NULL);
			opq_task *outer_done = tls_done_task;
			tls_done_task = t;
			t->done(t->arg, t->done_arg, t->result);
			tls_done_task = outer_done;
			opq__cancel_set_current(outer);
		}
		opq__lock(&tr->mu);
		free_tree |= after_unpin(&now);
		t->state = OPQ__T_DONE;
		opq_scope *p = t->pscope;
		child_unlink(p, t);
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
	if (discarded && !scope_cancelled(&t->scope))
		cancel_tree(&t->scope, true, &af); /* dropped by a stopping queue: cancelled */
	bool skip = scope_cancelled(&t->scope);
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
	cancel_tree(&t->scope, false, &af); /* its children are sent cancel; queued ones pulled */
	bool free_tree = settle(tr, t, &af);
	free_tree |= opq__task_unref(t);
	opq__unlock(&tr->mu);
	if (free_tree)
		opq__tree_free(tr);
}

static void task_perform(opq_op *op)
{
	task_run(OPQ_CONTAINER_OF(op, opq_task, op), false);
}

static void task_discard(opq_op *op)
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
		dl_remove(s);
		struct after af = {0};
		if (!scope_cancelled(s)) {
			s->timed_out = true;
			if (!s->first_error)
				s->first_error = ETIMEDOUT;
			cancel_tree(s, true, &af);
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
static int tree_timer_ref(struct opq__tree *tr)
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
static void dl_arm(struct opq__tree *tr, opq_scope *s)
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

/* ---- root scopes --------------------------------------------------------- */

OPQ_EXPORT int opq_scope_create(opq_scope **scopep, opq_queue *q, const opq_scope_attr *attr)
{
	if (!scopep || !q)
		return EINVAL;
	struct opq__tree *tr = opq__calloc(1, sizeof(*tr));
	if (!tr)
		return ENOMEM;
	int rc = opq__mutex_init(&tr->mu);
	if (rc)
		goto fail_mu;
	if ((rc = opq__cond_init(&tr->cv)))
		goto fail_cv;
	tr->q = q;
	tr->refs = 1;
	opq__list_init(&tr->dl);
	scope_init(&tr->root, tr, NULL, attr);
	if (tr->root.has_deadline) {
		if ((rc = tree_timer_ref(tr)))
			goto fail_arm;
		opq__lock(&tr->mu);
		dl_arm(tr, &tr->root);
		opq__unlock(&tr->mu);
	}
	*scopep = &tr->root;
	return 0;

fail_arm:
	pthread_cond_destroy(&tr->cv);
fail_cv:
	pthread_mutex_destroy(&tr->mu);
fail_mu:
	opq__free(tr);
	return rc;
}

OPQ_EXPORT int opq_scope_destroy(opq_scope *s)
{
	if (!s)
		return 0;
	struct opq__tree *tr = s->tr;
	if (s != &tr->root)
		return EINVAL;
	opq__lock(&tr->mu);
	if (s->nchildren || tr->waiters || opq__cancel_ctx_busy(&s->cx)) {
		opq__unlock(&tr->mu);
		return EBUSY;
	}
	s->closing = true;
	dl_remove(s); /* the list is empty now: nothing arms the timer again */
	bool armed_once = atomic_load_explicit(&tr->timer_ref, memory_order_relaxed);
	opq__unlock(&tr->mu);
	if (armed_once)
		opq__timer_cancel(&tr->timer); /* waits for a dl_fire under way */
	opq__lock(&tr->mu);
	bool free_tree = --tr->refs == 0;
	opq__unlock(&tr->mu);
	if (free_tree)
		opq__tree_free(tr);
	return 0;
}

/* ---- spawn --------------------------------------------------------------- */

/*
 * Spawn, with the deadline of attr or, with `timeout`, the sooner of it and
 * timeout_ns from now (saturated: a timeout too far to count is none).
 */
static int spawn(opq_scope *s, const opq_scope_attr *attr, bool timeout, int64_t timeout_ns,
                 opq_task_fn *fn, void *arg, opq_task_done_fn *done, void *done_arg,
                 opq_task **taskp)
{
	if (!s || !fn)
		return EINVAL;
	struct timespec until = {0, 0};
	if (timeout) {
		int64_t now = opq__mono_ns();
		int64_t end = timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns;
		until = opq__ns_to_ts(end);
	}
	if (s->owner && opq__scope_current() != s)
		return EPERM; /* only a task spawns in its own scope */
	struct opq__tree *tr = s->tr;
	opq_task *t = opq__calloc(1, sizeof(*t));
	if (!t)
		return ENOMEM;
	opq_op_init(&t->op, task_perform, task_discard);
	scope_init(&t->scope, tr, t, attr);
	if (timeout && (!t->scope.has_deadline || opq__ts_before(&until, &t->scope.deadline))) {
		t->scope.has_deadline = true;
		t->scope.deadline = until;
	}
	t->pscope = s;
	t->fn = fn;
	t->arg = arg;
	t->done = done;
	t->done_arg = done_arg;
	t->state = OPQ__T_NEW;
	if (t->scope.has_deadline) {
		int rc = tree_timer_ref(tr);
		if (rc) {
			opq__free(t);
			return rc;
		}
	}

	opq__lock(&tr->mu);
	if (s->closing || scope_cancelled(s)) {
		opq__unlock(&tr->mu);
		opq__free(t);
		return ECANCELED;
	}
	if (t->scope.has_deadline)
		dl_arm(tr, &t->scope);
	t->refs = 2 + (taskp != NULL); /* the tree's link, our pin, the handle */
	tr->refs++;
	opq__list_push(&s->children, &t->sib);
	s->nchildren++;
	opq__unlock(&tr->mu);

	int rc = opq_queue_enqueue(tr->q, &t->op);

	opq__lock(&tr->mu);
	bool free_tree = false;
	if (rc) {
		/* Not spawned: unlink it as if it had never been. */
		dl_remove(&t->scope);
		child_unlink(s, t);
		if (tr->waiters)
			OPQ_CHECK(pthread_cond_broadcast(&tr->cv));
		opq__unlock(&tr->mu);
		opq__free(t);
		opq__lock(&tr->mu);
		free_tree = --tr->refs == 0;
		opq__unlock(&tr->mu);
		if (free_tree)
			opq__tree_free(tr);
		return rc;
	}
	if (t->state == OPQ__T_NEW)
		t->state = OPQ__T_QUEUED;
	/*
	 * Cancelled while it was being enqueued (nobody saw it QUEUED to pull
	 * it), or its deadline had passed already: take it out again. Our
	 * pin is the puller's.
	 */
	bool pull = t->state == OPQ__T_QUEUED && scope_cancelled(&t->scope);
	if (tr->waiters)
		OPQ_CHECK(pthread_cond_broadcast(&tr->cv)); /* helpers: new work */
	if (!pull)
		free_tree = opq__task_unref(t);
	opq__unlock(&tr->mu);
	if (taskp)
		*taskp = t;
	if (pull) {
		(void)opq_queue_cancel(tr->q, &t->op);
		opq__lock(&tr->mu);
		free_tree = opq__task_unref(t);
		opq__unlock(&tr->mu);
	}
	if (free_tree)
		opq__tree_free(tr);
	return 0;
}

OPQ_EXPORT int opq_scope_spawn(opq_scope *s, const opq_scope_attr *attr, opq_task_fn *fn, void *arg,
                               opq_task_done_fn *done, void *done_arg, opq_task **taskp)
{
	return spawn(s, attr, false, 0, fn, arg, done, done_arg, taskp);
}

OPQ_EXPORT int opq_scope_spawn_timeout(opq_scope *s, const opq_scope_attr *attr, int64_t timeout_ns,
                                       opq_task_fn *fn, void *arg, opq_task_done_fn *done,
                                       void *done_arg, opq_task **taskp)
{
	return spawn(s, attr, true, timeout_ns, fn, arg, done, done_arg, taskp);
}

OPQ_EXPORT opq_scope *opq_scope_current(void)
{
	return opq__scope_current();
}

/* ---- cancel -------------------------------------------------------------- */

OPQ_EXPORT int opq_scope_cancel(opq_scope *s)
{
	if (!s)
		return EINVAL;
	struct opq__tree *tr = s->tr;
	struct after af = {0};
	opq__lock(&tr->mu);
	if (!s->owner || s->owner->state < OPQ__T_FINISHING)
		cancel_tree(s, true, &af);
	opq__unlock(&tr->mu);
	after_run(tr, &af);
	if (af.pull) { /* the pins keep the tree */
		opq__lock(&tr->mu);
		bool free_tree = after_unpin(&af);
		opq__unlock(&tr->mu);
		if (free_tree)
			opq__tree_free(tr);
	}
	return 0;
}

OPQ_EXPORT int opq_task_cancel(opq_task *t)
{
	if (!t)
		return EINVAL;
	return opq_scope_cancel(&t->scope);
}

OPQ_EXPORT int opq_scope_cancelled(const opq_scope *s)
{
	return s && scope_cancelled(s);
}

OPQ_EXPORT int opq_task_cancelled(const opq_task *t)
{
	return t && scope_cancelled(&t->scope);
}

/* ---- handles ------------------------------------------------------------ */

OPQ_EXPORT int opq_task_release(opq_task *t)
{
	if (!t)
		return EINVAL;
	struct opq__tree *tr = t->scope.tr;
	opq__lock(&tr->mu);
	bool free_tree = opq__task_unref(t);
	opq__unlock(&tr->mu);
	if (free_tree)
		opq__tree_free(tr);
	return 0;
}
