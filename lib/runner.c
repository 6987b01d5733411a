/*
 * runner.c: the runners of a queue (taking batches, stealing, performing),
 * and what looks at them: wait_idle and the statistics (queue_impl.h has
 * the design and the sleep/wake rules).
 */
#define _GNU_SOURCE 1 /* pthread_setname_np */
#include "queue_impl.h"

#include <stdio.h>
#include <string.h>

_Thread_local opq_queue *opq__tls_queue;
_Thread_local bool opq__tls_in_start_hook;
_Thread_local bool opq__tls_in_exit_hook;

/* Append a stack taken from the inbox (newest first) to the FIFO, oldest first. */
static void fifo_append_stack(opq_queue *q, struct opq__link *top)
{
	/* Each is inserted before the one pushed after it. */
	struct opq__link *at = &q->fifo;
	size_t n = 0;
	for (struct opq__link *next; top; top = next, n++) {
		next = top->opq__next;
		OP_SET_OWNER(OP_OF(top), q);
		OP_SET_STATE(OP_OF(top), OP_QUEUED);
		opq__list_insert_before(at, top);
		at = top;
	}
	q->queued += n;
	if (q->queued > q->high_water)
		q->high_water = q->queued;
}

void opq__inbox_drain(opq_queue *q)
{
	if (INBOX_HOLDS(__atomic_load_n(&q->inbox, __ATOMIC_RELAXED)))
		fifo_append_stack(q, __atomic_exchange_n(&q->inbox, NULL, __ATOMIC_ACQUIRE));
}

void opq__inbox_close(opq_queue *q)
{
	struct opq__link *top = __atomic_exchange_n(&q->inbox, INBOX_CLOSED, __ATOMIC_SEQ_CST);
	if (top != INBOX_CLOSED)
		fifo_append_stack(q, top);
}

void opq__inbox_open(opq_queue *q)
{
	struct opq__link *closed = INBOX_CLOSED;
	__atomic_compare_exchange_n(&q->inbox, &closed, NULL, false, __ATOMIC_SEQ_CST,
	                            __ATOMIC_SEQ_CST);
}

bool opq__is_idle(opq_queue *q)
{
	opq__inbox_drain(q);
	return q->queued == 0 && q->busy == 0 && q->helping == 0;
}

static void idle_check(opq_queue *q)
{
	if (q->idle_waiters && opq__is_idle(q))
		OPQ_CHECK(pthread_cond_broadcast(&q->idle));
}

void opq__helped_done(opq_queue *q)
{
	q->helping--;
	q->completed++;
	idle_check(q);
}

/*
 * Make the operations of list `ops` (n >= 1 of them, in FIFO order) r's:
 * start the first, returned TAKEN with r->running set, and keep the rest
 * in r's batch (then r counts in q->holders until its next take). Under
 * q->mu and r->mu.
 */
static opq_op *batch_start(opq_queue *q, struct runner *r, struct opq__link *ops, unsigned n)
{
	if (n > 1 && !r->holds) {
		r->holds = true;
		q->holders++;
	}
	opq__list_for_each(l, ops)
	{
		OP_SET_OWNER(OP_OF(l), r);
		OP_SET_STATE(OP_OF(l), OP_BATCHED);
	}
	opq_op *op = OP_OF(opq__list_pop(ops));
	OP_SET_STATE(op, OP_TAKEN);
	opq__list_cut(ops, n - 1, &r->batch);
	r->nbatch += n - 1;
	r->running = true;
	return op;
}

/*
 * Take the older half of another runner's operations not started, rounded
 * up: they are older than anything in the FIFO, and their runner is busy
 * with one operation. Under q->mu (so one thief at a time: the victim's
 * lock and then the thief's are never taken the other way round).
 */
static opq_op *steal(opq_queue *q, struct runner *self)
{
	if (q->holders == 0)
		return NULL;
	opq__list_for_each(l, &q->runners)
	{
		struct runner *v = OPQ_CONTAINER_OF(l, struct runner, link);
		if (v == self || !v->holds)
			continue;
		opq__lock(&v->mu);
		if (v->nbatch == 0) {
			opq__unlock(&v->mu);
			continue;
		}
		/* The newer half stays, so the victim goes on in FIFO order
		 * and the thief starts what has waited longest. */
		unsigned n = (v->nbatch + 1) / 2;
		struct opq__link ops;
		opq__list_init(&ops);
		opq__list_cut(&v->batch, n, &ops);
		v->nbatch -= n;
		opq__unlock(&v->mu);
		opq__lock(&self->mu);
		opq_op *op = batch_start(q, self, &ops, n);
		opq__unlock(&self->mu);
		return op;
	}
	return NULL;
}

/*
 * Take work: the runner's share of the FIFO (one operation on a bounded
 * queue, so that the capacity counts every operation not started), or
 * else half of another runner's batch. Returns the operation to start
 * (TAKEN), or NULL when there is none. Under q->mu.
 */
static opq_op *take(opq_queue *q, struct runner *r)
{
	opq__inbox_drain(q);
	if (q->queued == 0)
		return steal(q, r);
	size_t n = 1;
	if (q->capacity == 0) {
		n = (q->queued + q->alive - 1) / q->alive;
		if (n > BATCH_MAX)
			n = BATCH_MAX;
	}
	struct opq__link ops;
	opq__list_init(&ops);
	opq__list_cut(&q->fifo, n, &ops);
	q->queued -= n;
	opq__lock(&r->mu);
	opq_op *op = batch_start(q, r, &ops, (unsigned)n);
	opq__unlock(&r->mu);
	if (q->capacity)
		opq__make_room(q);
	return op;
}

/*
 * Perform op and then the rest of r's batch, one operation at a time
 * under r->mu. Any operation may be freed by its perform; a box's function
 * is called here, and the batch's boxes are kept for reuse at its end.
 */
static void run_batch(opq_queue *q, struct runner *r, opq_op *op)
{
	opq_op *boxes = NULL, *last = NULL;
	unsigned nboxes = 0;
	for (;;) {
		if (op->perform == opq__box_perform) {
			struct box *b = OPQ_CONTAINER_OF(op, struct box, op);
			b->fn(b->arg);
			op->opq__link.opq__next = (struct opq__link *)(void *)boxes;
			boxes = op;
			last = last ? last : op;
			nboxes++;
		} else {
			opq__op_perform(op);
		}
		opq__lock(&r->mu);
		r->running = false;
		r->completed++;
		struct opq__link *l = opq__list_pop(&r->batch);
		if (l) {
			op = OP_OF(l);
			OP_SET_STATE(op, OP_TAKEN);
			r->nbatch--;
			r->running = true;
		}
		opq__unlock(&r->mu);
		if (!l)
			break;
	}
	if (boxes)
		opq__boxes_put(q, boxes, last, nboxes);
}

static void runner_name(opq_queue *q, unsigned index)
{
#if HAVE_DECL_PTHREAD_SETNAME_NP
	char name[32];
	snprintf(name, sizeof(name), "%s/%u", q->attr.name, index);
	name[15] = '\0'; /* the kernel's limit */
	pthread_setname_np(pthread_self(), name);
#else
	(void)q;
	(void)index;
#endif
}

void *opq__runner_main(void *arg)
{
	struct runner *r = arg;
	opq_queue *q = r->q;

	opq__tls_queue = q;
	runner_name(q, r->index);
	if (q->attr.on_start) {
		opq__tls_in_start_hook = true;
		q->attr.on_start(q->attr.hook_arg, r->index);
		opq__tls_in_start_hook = false;
	}

	opq__lock(&q->mu);
	if (--q->unstarted == 0)
		OPQ_CHECK(pthread_cond_broadcast(&q->change));
	for (;;) {
		if (r->holds) { /* its batch is done: nothing of it is left to steal */
			r->holds = false;
			q->holders--;
		}
		opq_op *op = q->alive > q->target ? NULL : take(q, r);
		if (op) {
			if (!r->busy) {
				r->busy = true;
				q->busy++;
			}
			opq__unlock(&q->mu);
			run_batch(q, r, op);
			opq__lock(&q->mu);
			continue;
		}
		if (r->busy) {
			r->busy = false;
			q->busy--;
			idle_check(q);
		}
		if (q->alive > q->target || q->state == ST_STOPPING)
			break;
		/* Counted idle, then one more look (see the inbox in queue_impl.h):
		 * at the FIFO too, where idle_check may have just drained a push. */
		SET_IDLE_RUNNERS(q, q->idle_runners + 1);
		if (q->queued || INBOX_HOLDS(__atomic_load_n(&q->inbox, __ATOMIC_SEQ_CST))) {
			SET_IDLE_RUNNERS(q, q->idle_runners - 1);
			continue;
		}
		OPQ_CHECK(pthread_cond_wait(&q->work, &q->mu));
		SET_IDLE_RUNNERS(q, q->idle_runners - 1);
		if (q->work_signals)
			SET_WORK_SIGNALS(q, q->work_signals - 1);
	}
	q->alive--;
	opq__lock(&r->mu);
	q->completed += r->completed; /* the statistics count it from q now */
	r->completed = 0;
	opq__unlock(&r->mu);
	opq__unlock(&q->mu);

	if (q->attr.on_exit) {
		opq__tls_in_exit_hook = true;
		q->attr.on_exit(q->attr.hook_arg, r->index);
		opq__tls_in_exit_hook = false;
	}

	opq__lock(&q->mu);
	r->finished = true;
	q->threads--;
	OPQ_CHECK(pthread_cond_broadcast(&q->change));
	opq__unlock(&q->mu);
	opq__tls_queue = NULL;
	return NULL;
}

opq_op *opq__take_all(opq_queue *q)
{
	opq__inbox_drain(q);
	struct opq__link all;
	opq__list_init(&all);
	size_t n = q->queued;
	opq__list_cut(&q->fifo, q->queued, &all);
	q->queued = 0;
	opq__list_for_each(l, &q->runners)
	{
		struct runner *r = OPQ_CONTAINER_OF(l, struct runner, link);
		opq__lock(&r->mu);
		opq__list_cut(&r->batch, r->nbatch, &all);
		n += r->nbatch;
		r->nbatch = 0;
		opq__unlock(&r->mu);
	}
	q->discarded += n;
	/* Into a NULL-terminated list by opq__next, each operation IDLE. */
	opq_op *list = NULL;
	for (struct opq__link *l; (l = all.opq__prev) != &all;) {
		opq__list_remove(l);
		opq_op *op = OP_OF(l);
		OP_SET_OWNER(op, NULL);
		OP_SET_STATE(op, OP_IDLE);
		l->opq__next = (struct opq__link *)(void *)list;
		list = op;
	}
	idle_check(q);
	return list;
}

OPQ_EXPORT int opq_queue_wait_idle(opq_queue *q, const struct timespec *deadline)
{
	if (!q || !opq__deadline_ok(deadline))
		return EINVAL;
	if (opq__tls_queue == q)
		return EDEADLK;
	int rc = 0;
	opq__lock(&q->mu);
	q->callers++;
	/* An idle queue beats a cancel or a deadline that came meanwhile. */
	while (!opq__is_idle(q) && rc == 0) {
		/* Inside a task: a cancel of the task ends the wait. */
		struct opq__cancel_reg creg;
		if (opq__cancel_begin(&creg, &q->mu, &q->idle)) {
			rc = ECANCELED;
			break;
		}
		q->idle_waiters++;
		rc = opq__cond_wait(&q->idle, &q->mu, deadline);
		q->idle_waiters--;
		if (opq__cancel_end(&creg)) /* may wait for a canceller: still a caller */
			rc = ECANCELED;
	}
	if (rc && opq__is_idle(q))
		rc = 0;
	q->callers--;
	opq__unlock(&q->mu);
	return rc;
}

OPQ_EXPORT int opq_queue_stats_get(opq_queue *q, opq_queue_stats *stats)
{
	if (!q || !stats)
		return EINVAL;
	memset(stats, 0, sizeof(*stats));
	opq__lock(&q->mu);
	opq__inbox_drain(q);
	/* q->mu keeps every operation where it is but for a runner's own
	 * moves inside its batch, which r->mu makes whole. */
	stats->queued = q->queued;
	stats->running = q->helping;
	stats->completed = q->completed;
	opq__list_for_each(l, &q->runners)
	{
		struct runner *r = OPQ_CONTAINER_OF(l, struct runner, link);
		opq__lock(&r->mu);
		stats->queued += r->nbatch;
		stats->running += r->running;
		stats->completed += r->completed;
		opq__unlock(&r->mu);
	}
	stats->discarded = q->discarded;
	stats->cancelled = q->cancelled;
	stats->high_water = q->high_water;
	stats->runners = q->alive;
	stats->blocked = q->space_waiters;
	opq__unlock(&q->mu);
	return 0;
}

OPQ_EXPORT opq_queue *opq_queue_current(void)
{
	return opq__tls_queue;
}
