/*
 * queue.c: the operation queue's attributes and lifecycle: create,
 * destroy, start, resize and stop (queue_impl.h has the design; enqueue.c
 * and runner.c the rest).
 *
 * Lifecycle invariants, under q->mu: `alive` counts runners still in their
 * loop, `threads` runner threads not yet finished (alive plus those in
 * their exit hook); a runner leaves its loop when alive > target (shrink)
 * or when the queue is stopping and it finds no work. Calls that create or
 * join runner threads drop q->mu meanwhile and count themselves in
 * `spawning` or `reaping`, so that stop and destroy wait for them.
 */
#define _GNU_SOURCE 1 /* PTHREAD_MUTEX_ADAPTIVE_NP */
#include "queue_impl.h"

#include <limits.h>
#include <signal.h>
#include <string.h>

/* ---- attributes ---------------------------------------------------------- */

static const struct opq_queue_attr default_attr = {.capacity = 0, .name = "opq"};

OPQ_EXPORT int opq_queue_attr_create(opq_queue_attr **attrp)
{
	if (!attrp)
		return EINVAL;
	opq_queue_attr *a = opq__malloc(sizeof(*a));
	if (!a)
		return ENOMEM;
	*a = default_attr;
	*attrp = a;
	return 0;
}

OPQ_EXPORT void opq_queue_attr_destroy(opq_queue_attr *attr)
{
	opq__free(attr);
}

OPQ_EXPORT int opq_queue_attr_set_capacity(opq_queue_attr *attr, size_t capacity)
{
	if (!attr)
		return EINVAL;
	attr->capacity = capacity;
	return 0;
}

OPQ_EXPORT int opq_queue_attr_get_capacity(const opq_queue_attr *attr, size_t *capacity)
{
	if (!attr || !capacity)
		return EINVAL;
	*capacity = attr->capacity;
	return 0;
}

OPQ_EXPORT int opq_queue_attr_set_name(opq_queue_attr *attr, const char *prefix)
{
	if (!attr || !prefix || !*prefix || strlen(prefix) > OPQ_NAME_MAX)
		return EINVAL;
	strcpy(attr->name, prefix);
	return 0;
}

OPQ_EXPORT int opq_queue_attr_set_hooks(opq_queue_attr *attr, opq_runner_hook *on_start,
                                        opq_runner_hook *on_exit, void *arg)
{
	if (!attr)
		return EINVAL;
	attr->on_start = on_start;
	attr->on_exit = on_exit;
	attr->hook_arg = arg;
	return 0;
}

OPQ_EXPORT int opq_queue_attr_set_stack_size(opq_queue_attr *attr, size_t size)
{
	if (!attr || (size != 0 && size < (size_t)PTHREAD_STACK_MIN))
		return EINVAL;
	attr->stack_size = size;
	return 0;
}

OPQ_EXPORT int opq_queue_attr_get_stack_size(const opq_queue_attr *attr, size_t *size)
{
	if (!attr || !size)
		return EINVAL;
	*size = attr->stack_size;
	return 0;
}

/* ---- runner threads ------------------------------------------------------ */

static void free_runner(struct runner *r)
{
	pthread_mutex_destroy(&r->mu);
	opq__free(r);
}

/*
 * Join and free the runners that have finished their loop and exit hook.
 * Called with q->mu held; drops it while joining.
 */
static void reap(opq_queue *q)
{
	struct opq__link done;
	opq__list_init(&done);
	for (struct opq__link *l = q->runners.opq__next, *next; l != &q->runners; l = next) {
		next = l->opq__next;
		if (OPQ_CONTAINER_OF(l, struct runner, link)->finished) {
			opq__list_remove(l);
			opq__list_push(&done, l);
		}
	}
	if (opq__list_empty(&done))
		return;
	q->reaping++;
	opq__unlock(&q->mu);
	for (struct opq__link *l; (l = opq__list_pop(&done));) {
		struct runner *r = OPQ_CONTAINER_OF(l, struct runner, link);
		OPQ_CHECK(pthread_join(r->thread, NULL));
		free_runner(r);
	}
	opq__lock(&q->mu);
	q->reaping--;
	OPQ_CHECK(pthread_cond_broadcast(&q->change));
}

/* Thread attributes for a runner stack of `size` bytes: 0 or an error. */
static int stack_attr(pthread_attr_t *ta, size_t size)
{
	int rc = pthread_attr_init(ta);
	if (rc)
		return rc;
	if ((rc = pthread_attr_setstacksize(ta, size)))
		OPQ_CHECK(pthread_attr_destroy(ta));
	return rc;
}

/*
 * Start `count` more runners and wait until each has run its start hook.
 * Called with q->mu held; drops it while creating threads. On failure the
 * runners made so far keep running and the error is returned.
 */
static int spawn(opq_queue *q, unsigned count)
{
	int rc = 0;
	sigset_t all, old;
	pthread_attr_t ta, *tap = NULL; /* NULL: the system's default stack */

	q->spawning++;
	opq__unlock(&q->mu);
	if (q->attr.stack_size && (rc = stack_attr(&ta, q->attr.stack_size)) == 0)
		tap = &ta;
	/* Runners block every signal: the daemon's own threads handle them. */
	sigfillset(&all);
	OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &all, &old));
	for (unsigned made = 0; rc == 0 && made < count; made++) {
		struct runner *r = opq__calloc(1, sizeof(*r));
		if (!r) {
			rc = ENOMEM;
			break;
		}
		if ((rc = opq__mutex_init(&r->mu))) {
			opq__free(r);
			break;
		}
		r->q = q;
		opq__list_init(&r->batch);
		opq__lock(&q->mu);
		r->index = q->next_index++;
		q->alive++;
		q->threads++;
		q->unstarted++;
		rc = pthread_create(&r->thread, tap, opq__runner_main, r);
		if (rc) {
			q->alive--;
			q->threads--;
			q->unstarted--;
			opq__unlock(&q->mu);
			free_runner(r);
			break;
		}
		opq__list_push(&q->runners, &r->link);
		opq__unlock(&q->mu);
	}
	OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &old, NULL));
	if (tap)
		OPQ_CHECK(pthread_attr_destroy(tap));
	opq__lock(&q->mu);
	while (q->unstarted)
		OPQ_CHECK(pthread_cond_wait(&q->change, &q->mu));
	q->spawning--;
	OPQ_CHECK(pthread_cond_broadcast(&q->change));
	return rc;
}

/* Wait until no runner is left and no call creates or joins one; join all. */
static void wait_runners_gone(opq_queue *q)
{
	for (;;) {
		bool joinable = !opq__list_empty(&q->runners);
		if (q->threads == 0 && q->spawning == 0 && q->reaping == 0 && !joinable)
			return;
		if (joinable)
			reap(q);
		if (q->threads || q->spawning || q->reaping)
			OPQ_CHECK(pthread_cond_wait(&q->change, &q->mu));
	}
}

/* Wake every idle runner: to leave (shrink, stop), or to look again. Under q->mu. */
static void wake_runners(opq_queue *q)
{
	SET_WORK_SIGNALS(q, q->idle_runners);
	OPQ_CHECK(pthread_cond_broadcast(&q->work));
}

/* ---- lifecycle ----------------------------------------------------------- */

/*
 * q->mu is held for a few dozen instructions at a time by producers and
 * runners: glibc's adaptive mutex spins briefly before it sleeps in the
 * kernel, which saves most futex calls when two of them meet.
 */
static int queue_mutex_init(pthread_mutex_t *mu)
{
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP) && !defined(OPQ_DEBUG)
	pthread_mutexattr_t ma;
	int rc = pthread_mutexattr_init(&ma);
	if (rc)
		return rc;
	pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
	rc = pthread_mutex_init(mu, &ma);
	pthread_mutexattr_destroy(&ma);
	return rc;
#else
	return opq__mutex_init(mu);
#endif
}

OPQ_EXPORT int opq_queue_create(opq_queue **qp, const opq_queue_attr *attr)
{
	if (!qp)
		return EINVAL;
	opq_queue *q = opq__calloc(1, sizeof(*q));
	if (!q)
		return ENOMEM;
	q->attr = attr ? *attr : default_attr;
	q->capacity = q->attr.capacity;
	q->state = ST_NEW;
	opq__list_init(&q->fifo);
	opq__list_init(&q->runners);

	int rc = queue_mutex_init(&q->mu);
	if (rc)
		goto fail_mu;
	if ((rc = opq__mutex_init(&q->box_mu)))
		goto fail_box_mu;
	if ((rc = opq__cond_init(&q->work)))
		goto fail_work;
	if ((rc = opq__cond_init(&q->space)))
		goto fail_space;
	if ((rc = opq__cond_init(&q->idle)))
		goto fail_idle;
	if ((rc = opq__cond_init(&q->change)))
		goto fail_change;
	*qp = q;
	return 0;

fail_change:
	pthread_cond_destroy(&q->idle);
fail_idle:
	pthread_cond_destroy(&q->space);
fail_space:
	pthread_cond_destroy(&q->work);
fail_work:
	pthread_mutex_destroy(&q->box_mu);
fail_box_mu:
	pthread_mutex_destroy(&q->mu);
fail_mu:
	opq__free(q);
	return rc;
}

OPQ_EXPORT int opq_queue_destroy(opq_queue *q)
{
	if (!q)
		return 0;
	opq__lock(&q->mu);
	if (q->state == ST_RUNNING || q->state == ST_STOPPING || q->callers || q->threads ||
	    q->spawning || q->reaping || q->destroying) {
		opq__unlock(&q->mu);
		return EBUSY;
	}
	/* The discard callbacks below run without the lock and may call q:
	 * it takes nothing more (enqueue ESHUTDOWN, start and destroy EBUSY). */
	q->destroying = true;
	q->state = ST_STOPPED;
	opq__inbox_close(q);
	opq_op *list = opq__take_all(q);
	opq__unlock(&q->mu);
	opq__discard_list(list);
	opq__boxes_free(q->boxes);
	opq__boxes_free(q->spare);
	if (q->timer_ref)
		opq__timer_unref();

	pthread_cond_destroy(&q->change);
	pthread_cond_destroy(&q->idle);
	pthread_cond_destroy(&q->space);
	pthread_cond_destroy(&q->work);
	pthread_mutex_destroy(&q->box_mu);
	pthread_mutex_destroy(&q->mu);
	opq__free(q);
	return 0;
}

int opq__queue_timer_ref(opq_queue *q)
{
	int rc = 0;
	opq__lock(&q->mu); /* then the timer's own locks: it never takes q->mu with them */
	if (!q->timer_ref && (rc = opq__timer_ref()) == 0)
		q->timer_ref = true;
	opq__unlock(&q->mu);
	return rc;
}

size_t opq__queue_stack_size(const opq_queue *q)
{
	return q->attr.stack_size; /* set at create, read only */
}

OPQ_EXPORT int opq_queue_start(opq_queue *q, unsigned runners)
{
	if (!q || runners == 0)
		return EINVAL;
	opq__lock(&q->mu);
	if (q->state == ST_RUNNING || q->state == ST_STOPPING || q->destroying) {
		int rc = q->state == ST_RUNNING ? EALREADY : EBUSY;
		opq__unlock(&q->mu);
		return rc;
	}
	int prev = q->state;
	q->state = ST_RUNNING;
	opq__inbox_open(q); /* after a stop */
	q->target = runners;
	q->next_index = 0;
	int rc = spawn(q, runners);
	if (rc && q->state == ST_RUNNING) {
		/* All or nothing: let the runners made so far go, and roll back. */
		q->target = 0;
		wake_runners(q);
		wait_runners_gone(q);
		q->state = prev;
		if (prev == ST_STOPPED)
			opq__inbox_close(q);
	}
	opq__unlock(&q->mu);
	return rc;
}

OPQ_EXPORT int opq_queue_set_runners(opq_queue *q, unsigned runners)
{
	if (!q || runners == 0)
		return EINVAL;
	if (opq__tls_in_start_hook && opq__tls_queue == q)
		return EDEADLK; /* spawn would wait for this very runner to start */
	opq__lock(&q->mu);
	/* target 0: a failed start is letting its runners go (it waits for
	 * them with q->mu dropped); new ones would keep it waiting. */
	if (q->state != ST_RUNNING || q->target == 0) {
		opq__unlock(&q->mu);
		return ESRCH;
	}
	q->callers++;
	q->target = runners;
	int rc = 0;
	if (q->alive < runners)
		rc = spawn(q, runners - q->alive);
	else if (q->alive > runners)
		wake_runners(q);
	reap(q);
	q->callers--;
	opq__unlock(&q->mu);
	return rc;
}

/* Perform what is queued on the calling thread, in FIFO order (a stop that drains a queue never
 * started). */
static void drain_here(opq_queue *q)
{
	opq_queue *outer = opq__tls_queue;
	for (struct opq__link *l; (l = opq__list_pop(&q->fifo));) {
		opq_op *op = OP_OF(l);
		q->queued--;
		OP_SET_STATE(op, OP_TAKEN);
		q->helping++;
		opq__unlock(&q->mu);
		opq__tls_queue = q;
		opq__op_perform(op);
		opq__tls_queue = outer;
		opq__lock(&q->mu);
		opq__helped_done(q);
	}
}

OPQ_EXPORT int opq_queue_stop(opq_queue *q, int mode)
{
	if (!q || (mode != OPQ_STOP_DRAIN && mode != OPQ_STOP_DISCARD))
		return EINVAL;
	if (opq__tls_queue == q)
		return EDEADLK;

	opq__lock(&q->mu);
	if (q->state == ST_STOPPED) {
		opq__unlock(&q->mu);
		return 0;
	}
	/* A discard callback of this thread's own stop: that stop cannot end
	 * before the callback returns. */
	if (q->state == ST_STOPPING && pthread_equal(q->stop_leader, pthread_self())) {
		opq__unlock(&q->mu);
		return EDEADLK;
	}
	q->callers++;
	bool leader = q->state != ST_STOPPING;
	if (leader)
		q->stop_leader = pthread_self();
	int prev = q->state;
	uint64_t stops = q->stops;
	q->state = ST_STOPPING;
	opq__inbox_close(q);
	OPQ_CHECK(pthread_cond_broadcast(&q->space)); /* blocked enqueuers: ESHUTDOWN */
	wake_runners(q);

	if (mode == OPQ_STOP_DISCARD) {
		opq_op *list = opq__take_all(q);
		opq__unlock(&q->mu);
		opq__discard_list(list);
		opq__lock(&q->mu);
	} else if (leader && prev == ST_NEW) {
		drain_here(q);
	}

	if (leader) {
		wait_runners_gone(q);
		q->state = ST_STOPPED;
		q->stops++;
		OPQ_CHECK(pthread_cond_broadcast(&q->change));
	} else {
		while (q->stops == stops)
			OPQ_CHECK(pthread_cond_wait(&q->change, &q->mu));
	}
	q->callers--;
	opq__unlock(&q->mu);
	return 0;
}
