/*
 * scope_wait.c: waiting for scopes and tasks, and sleeping in a scope, on
 * top of the scope tree (scope.c; its invariants and lock order are there).
 * A wait made on a runner of the tree's queue helps: it performs queued
 * tasks of the subtree it waits for inline. Helping nests on the stack,
 * one level per helped task that waits in turn, so it is bounded: once
 * the helping on this thread has used half a runner's stack, a wait
 * waits without helping, and no tree shape overflows a runner's
 * stack (a chain of tasks each waiting for the next nested one level per
 * task: 100,000 of them overflowed an 8 MiB stack). A wait that could
 * never end (the waiter's own task, or the task whose done callback it
 * runs, is inside what it waits for) is EDEADLK.
 */
#include "scope_impl.h"

#include <sched.h>

/*
 * The bound is in bytes of stack, not in levels: a level costs about 320
 * bytes of the library's frames at -O2 (500-700 under sanitizers), plus
 * whatever the task's own function puts on the stack, so no count of
 * levels is both deep enough for small tasks and safe for large ones.
 * The budget is half the runners' stack: the queue's stack size
 * (opq_queue_attr_set_stack_size) if it has one, else the default stack
 * size (pthread_attr_getstacksize of a fresh attribute object: what
 * runners get then), and never more than half the default: a thread that
 * stops a queue that was never started performs its operations (and
 * helps) on its own stack, which is not the runners'. Half of the usual
 * 8 MiB is some 14,000 levels of small tasks, and leaves the other half to
 * the frames below the first helping wait and to the deepest task's work.
 */
#define DEFAULT_STACK_FALLBACK (2 * 1024 * 1024) /* if the default size is unknown */

static pthread_once_t default_stack_once = PTHREAD_ONCE_INIT;
static size_t default_stack;

static void default_stack_init(void)
{
	size_t size = 0;
	pthread_attr_t a;
	if (pthread_attr_init(&a) == 0) {
		if (pthread_attr_getstacksize(&a, &size) != 0)
			size = 0;
		pthread_attr_destroy(&a);
	}
	default_stack = size ? size : DEFAULT_STACK_FALLBACK;
}

static size_t help_budget(const opq_queue *q)
{
	OPQ_CHECK(pthread_once(&default_stack_once, default_stack_init));
	size_t size = opq__queue_stack_size(q);
	if (!size || size > default_stack)
		size = default_stack;
	return size / 2;
}

/* Helped tasks nested on this thread's stack now, and where the outermost helping wait is. */
static _Thread_local unsigned tls_help_depth;
static _Thread_local uintptr_t tls_help_base;

/*
 * May a wait of a tree on q whose frame is at `here` help (nest one more
 * task on this stack)? Every helping wait nested on one thread is for q:
 * a thread helps only the trees of the queue it is a runner of.
 */
static bool help_room(const opq_queue *q, uintptr_t here)
{
	if (tls_help_depth == 0)
		return true; /* the outermost helping wait: the base */
	/* Stacks grow down on every platform we know; either way is measured. */
	uintptr_t used = tls_help_base > here ? tls_help_base - here : here - tls_help_base;
	return used < help_budget(q);
}

/* ---- waiting ------------------------------------------------------------- */

/* Is the calling thread's task inside scope s (s is an ancestor scope of it)? */
static bool inside(const opq_scope *s)
{
	for (opq_scope *c = opq__scope_current(); c && c->owner; c = c->owner->pscope)
		if (c->owner->pscope == s)
			return true;
	return false;
}

/*
 * In a done callback (of task d): would waiting for s (a scope, or with
 * `task` the scope of a task) wait for d or one of its ancestors, which
 * cannot terminate before the callback returns?
 */
static bool in_done_of(const opq_scope *s, bool task)
{
	for (opq_task *d = opq__scope_done_task(); d; d = d->pscope->owner)
		if (d->pscope == s || (task && &d->scope == s))
			return true;
	return false;
}

/* Under tr->mu: a queued task in the subtree under s (or t itself), pinned; or NULL. */
static opq_task *find_queued(opq_scope *s, opq_task *self)
{
	if (self && self->state == OPQ__T_QUEUED) {
		self->refs++;
		return self;
	}
	for (opq_task *t = opq__scope_first_child(s); t; t = opq__scope_walk_next(s, t, true)) {
		if (t->state == OPQ__T_QUEUED) {
			t->refs++;
			return t;
		}
	}
	return NULL;
}

/*
 * Under tr->mu: wait until done(s, t) or the deadline; a runner of the
 * tree's queue performs queued tasks under s inline meanwhile, unless the
 * helping on its stack has reached its bound (help_room).
 */
static int wait_for(struct opq__tree *tr, opq_scope *s, opq_task *self,
                    const struct timespec *deadline)
{
	/* The frame itself, not a local's address (a sanitizer may move locals off the stack). */
	uintptr_t here = (uintptr_t)__builtin_frame_address(0);
	bool helper = opq_queue_current() == tr->q && help_room(tr->q, here);
	int rc = 0;
	tr->waiters++;
	for (;;) {
		if (self ? self->state == OPQ__T_DONE : s->nchildren == 0)
			break;
		opq_task *h = helper ? find_queued(s, self) : NULL;
		if (h) {
			opq__unlock(&tr->mu);
			if (tls_help_depth++ == 0)
				tls_help_base = here;
			bool ran = opq__queue_help(tr->q, &h->op);
			tls_help_depth--;
			opq__lock(&tr->mu);
			bool free_tree = opq__task_unref(h);
			assert(!free_tree); /* the waiter's scope keeps the tree */
			(void)free_tree;
			if (!ran) {
				/* A runner took it first and is about to mark it running. */
				opq__unlock(&tr->mu);
				sched_yield();
				opq__lock(&tr->mu);
			}
			continue;
		}
		if (opq__cond_wait(&tr->cv, &tr->mu, deadline) == ETIMEDOUT &&
		    !(self ? self->state == OPQ__T_DONE : s->nchildren == 0)) {
			rc = ETIMEDOUT;
			break;
		}
	}
	tr->waiters--;
	return rc;
}

OPQ_EXPORT int opq_scope_wait(opq_scope *s, const struct timespec *deadline, int *first_error)
{
	if (!s || !opq__deadline_ok(deadline))
		return EINVAL;
	if (inside(s) || in_done_of(s, false))
		return EDEADLK;
	struct opq__tree *tr = s->tr;
	opq__lock(&tr->mu);
	int rc = wait_for(tr, s, NULL, deadline);
	if (rc == 0 && first_error)
		*first_error = s->first_error;
	opq__unlock(&tr->mu);
	return rc;
}

OPQ_EXPORT int opq_task_wait(opq_task *t, const struct timespec *deadline, int *result)
{
	if (!t || !opq__deadline_ok(deadline))
		return EINVAL;
	if (opq__scope_current() == &t->scope || inside(&t->scope) || in_done_of(&t->scope, true))
		return EDEADLK;
	struct opq__tree *tr = t->scope.tr;
	opq__lock(&tr->mu);
	int rc = wait_for(tr, &t->scope, t, deadline);
	if (rc == 0 && result)
		*result = t->result;
	opq__unlock(&tr->mu);
	return rc;
}

/* ---- sleeping ----------------------------------------------------------- */

OPQ_EXPORT int opq_scope_sleep(opq_scope *s, const struct timespec *deadline)
{
	if (!s || !opq__deadline_ok(deadline))
		return EINVAL;
	int rc = opq__cancel_sleep(&s->cx, deadline);
	return rc == ETIMEDOUT ? 0 : rc;
}
