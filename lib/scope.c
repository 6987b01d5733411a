/*
 * scope.c: structured concurrency on the operation queue: attributes, root
 * scopes, spawn, cancel and task handles. scope_impl.h has the design.
 */
#include "scope_impl.h"

#include "list.h"

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
	opq__scope_init(&tr->root, tr, NULL, attr);
	if (tr->root.has_deadline) {
		if ((rc = opq__tree_timer_ref(tr)))
			goto fail_arm;
		opq__lock(&tr->mu);
		opq__dl_arm(tr, &tr->root);
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
	opq__dl_remove(s); /* the list is empty now: nothing arms the timer again */
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
	opq_op_init(&t->op, opq__task_perform, opq__task_discard);
	opq__scope_init(&t->scope, tr, t, attr);
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
		int rc = opq__tree_timer_ref(tr);
		if (rc) {
			opq__free(t);
			return rc;
		}
	}

	opq__lock(&tr->mu);
	if (s->closing || opq__scope_cancelled(s)) {
		opq__unlock(&tr->mu);
		opq__free(t);
		return ECANCELED;
	}
	if (t->scope.has_deadline)
		opq__dl_arm(tr, &t->scope);
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
		opq__dl_remove(&t->scope);
		opq__child_unlink(s, t);
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
	bool pull = t->state == OPQ__T_QUEUED && opq__scope_cancelled(&t->scope);
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
		opq__cancel_tree(s, true, &af);
	opq__unlock(&tr->mu);
	opq__after_run(tr, &af);
	if (af.pull) { /* the pins keep the tree */
		opq__lock(&tr->mu);
		bool free_tree = opq__after_unpin(&af);
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
	return s && opq__scope_cancelled(s);
}

OPQ_EXPORT int opq_task_cancelled(const opq_task *t)
{
	return t && opq__scope_cancelled(&t->scope);
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
