/*
 * enqueue.c: putting operations into a queue and taking them back out:
 * enqueue with backpressure, the boxes of function-pointer operations,
 * cancel, and the scope's helping (queue_impl.h has the design).
 */
#include "queue_impl.h"

#include <string.h>

enum wait_kind { WAIT_BLOCK, WAIT_TRY };

OPQ_EXPORT int opq_op_init(opq_op *op, opq_op_fn *perform, opq_op_fn *discard)
{
	if (!op || !perform)
		return EINVAL;
	memset(op, 0, sizeof(*op));
	op->perform = perform;
	op->discard = discard;
	return 0;
}

OPQ_EXPORT int opq_op_set_completion(opq_op *op, opq_chan *ch, opq_complete_fn *complete)
{
	if (!op || !ch != !complete)
		return EINVAL;
	if (opq__op_busy(op, OP_STATE(op)))
		return EBUSY;
	op->opq__chan = ch;
	op->opq__complete = complete;
	return 0;
}

/* ---- boxes --------------------------------------------------------------- */

void opq__box_perform(opq_op *op)
{
	struct box *b = OPQ_CONTAINER_OF(op, struct box, op);
	opq_fn *fn = b->fn;
	void *arg = b->arg;
	opq__box_free(b, sizeof(*b));
	fn(arg);
}

void opq__op_discard(opq_op *op)
{
	if (op->opq__chan) {
		OP_SET_STATE(op, OP_ENDED);
		opq__chan_end(op, ECANCELED);
	} else if (op->perform == opq__box_perform) {
		struct box *b = OPQ_CONTAINER_OF(op, struct box, op);
		opq_fn *discard = (opq_fn *)op->discard;
		void *arg = b->arg;
		opq__box_free(b, sizeof(*b));
		if (discard)
			discard(arg);
	} else if (op->discard) {
		op->discard(op);
	}
}

void opq__discard_list(opq_op *op)
{
	while (op) {
		opq_op *next = (opq_op *)(void *)op->opq__link.opq__next;
		op->opq__link.opq__next = NULL;
		opq__op_discard(op);
		op = next;
	}
}

void opq__boxes_free(opq_op *box)
{
	while (box) {
		opq_op *next = (opq_op *)(void *)box->opq__link.opq__next;
		opq__box_free(box, sizeof(struct box));
		box = next;
	}
}

void opq__boxes_put(opq_queue *q, opq_op *first, opq_op *last, unsigned n)
{
	if (__atomic_load_n(&q->nspare, __ATOMIC_RELAXED) >= SPARE_MAX) {
		opq__boxes_free(first);
		return;
	}
	__atomic_fetch_add(&q->nspare, n, __ATOMIC_RELAXED);
	opq_op *top = __atomic_load_n(&q->spare, __ATOMIC_RELAXED);
	do
		last->opq__link.opq__next = (struct opq__link *)(void *)top;
	while (!__atomic_compare_exchange_n(&q->spare, &top, first, true, __ATOMIC_RELEASE,
	                                    __ATOMIC_RELAXED));
}

/* A box kept for reuse, else a new one (NULL without memory). */
static struct box *box_get(opq_queue *q)
{
	opq__lock(&q->box_mu);
	opq_op *op = q->boxes;
	if (!op && __atomic_load_n(&q->spare, __ATOMIC_RELAXED))
		op = __atomic_exchange_n(&q->spare, NULL, __ATOMIC_ACQUIRE);
	if (op) {
		q->boxes = (opq_op *)(void *)op->opq__link.opq__next;
		__atomic_fetch_sub(&q->nspare, 1, __ATOMIC_RELAXED);
	}
	opq__unlock(&q->box_mu);
	return op ? OPQ_CONTAINER_OF(op, struct box, op) : opq__box_alloc(sizeof(struct box));
}

/* ---- enqueue ------------------------------------------------------------- */

void opq__make_room(opq_queue *q)
{
	while (q->space_waiters > q->space_signals && q->space_signals < q->capacity - q->queued) {
		q->space_signals++;
		OPQ_CHECK(pthread_cond_signal(&q->space));
	}
}

/* Signal a runner if more sleep than have been signalled. Under q->mu. */
static void wake_runner(opq_queue *q)
{
	if (q->idle_runners > q->work_signals) {
		SET_WORK_SIGNALS(q, q->work_signals + 1);
		OPQ_CHECK(pthread_cond_signal(&q->work));
	}
}

/* Whether this thread is a runner of q that waiting for room could leave stuck forever. */
static bool would_deadlock(const opq_queue *q)
{
	/* Nobody is left to make room when every other runner waits too. A
	 * runner in its exit hook has left the runners: it waits forever only
	 * if every runner left waits too (or none is left). */
	if (opq__tls_queue != q)
		return false;
	if (opq__tls_in_exit_hook)
		return q->stuck_runners >= q->alive;
	return q->stuck_runners + 1 >= q->alive;
}

/*
 * Push op at the FIFO's tail once there is room. Called and returns with
 * q->mu held; on an error op is untouched.
 */
static int push(opq_queue *q, opq_op *op, enum wait_kind kind, const struct timespec *deadline)
{
	uintptr_t st = OP_STATE(op);
	if (opq__op_busy(op, st))
		return EBUSY;
	/* A stop that begins while this call waits for room fails it, even
	 * if the queue is started again before this thread looks. */
	uint64_t stops = q->stops;
	for (int rc = 0;;) {
		if (q->state == ST_STOPPING || q->state == ST_STOPPED || q->stops != stops)
			return ESHUTDOWN;
		/* Room is taken whatever woke this thread: make_room promised
		 * it to one waiter. */
		if (q->capacity == 0 || q->queued < q->capacity)
			break;
		if (rc)
			return rc;
		if (kind == WAIT_TRY)
			return EAGAIN;
		if (would_deadlock(q))
			return EDEADLK;
		/* Inside a task: a cancel of the task ends the wait. */
		struct opq__cancel_reg creg;
		if (opq__cancel_begin(&creg, &q->mu, &q->space))
			return ECANCELED;
		bool runner = opq__tls_queue == q && !opq__tls_in_exit_hook;
		q->stuck_runners += runner;
		q->space_waiters++;
		q->callers++;
		rc = opq__cond_wait(&q->space, &q->mu, deadline);
		q->space_waiters--;
		if (q->space_signals)
			q->space_signals--;
		q->stuck_runners -= runner;
		if (opq__cancel_end(&creg)) /* may wait for a canceller: still a caller */
			rc = ECANCELED;
		q->callers--;
	}
	/* Another queue's enqueue of op may have raced this one: one wins. */
	if (!__atomic_compare_exchange_n(&op->opq__state, &st, OP_QUEUED, false, __ATOMIC_ACQUIRE,
	                                 __ATOMIC_RELAXED))
		return EBUSY;
	if (op->opq__chan)
		opq__chan_accept(op->opq__chan);
	OP_SET_OWNER(op, q);
	opq__list_push(&q->fifo, &op->opq__link);
	if (++q->queued > q->high_water)
		q->high_water = q->queued;
	wake_runner(q);
	return 0;
}

/*
 * Push op onto an unbounded queue's inbox (see queue_impl.h). `boxed`: op
 * is a box made for this call, which no other thread can have.
 */
static int push_inbox(opq_queue *q, opq_op *op, bool boxed)
{
	uintptr_t st = OP_STATE(op);
	if (boxed)
		OP_SET_STATE(op, OP_INBOX);
	else if (opq__op_busy(op, st) ||
	         !__atomic_compare_exchange_n(&op->opq__state, &st, OP_INBOX, false,
	                                      __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
		return EBUSY; /* two threads enqueueing it at once: one gets it */
	opq_chan *ch = op->opq__chan;
	if (ch)
		opq__chan_accept(ch);
	struct opq__link *top = __atomic_load_n(&q->inbox, __ATOMIC_RELAXED);
	do {
		if (top == INBOX_CLOSED) {
			if (ch)
				opq__chan_unaccept(ch);
			OP_SET_STATE(op, st);
			return ESHUTDOWN;
		}
		op->opq__link.opq__next = top;
	} while (!__atomic_compare_exchange_n(&q->inbox, &top, &op->opq__link, true,
	                                      __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
	/* op may be performed and freed from here on. Every idle runner
	 * signalled already comes back and drains the inbox: the lock is
	 * needed only when one is not. */
	if (IDLE_RUNNERS(q) > WORK_SIGNALS(q)) {
		opq__lock(&q->mu);
		wake_runner(q);
		opq__unlock(&q->mu);
	}
	return 0;
}

static int enqueue(opq_queue *q, opq_op *op, enum wait_kind kind, const struct timespec *deadline)
{
	if (!q || !op || !op->perform || !opq__deadline_ok(deadline))
		return EINVAL;
	if (q->capacity == 0)
		return push_inbox(q, op, false);
	opq__lock(&q->mu);
	int rc = push(q, op, kind, deadline);
	opq__unlock(&q->mu);
	return rc;
}

OPQ_EXPORT int opq_queue_enqueue(opq_queue *q, opq_op *op)
{
	return enqueue(q, op, WAIT_BLOCK, NULL);
}

OPQ_EXPORT int opq_queue_tryenqueue(opq_queue *q, opq_op *op)
{
	return enqueue(q, op, WAIT_TRY, NULL);
}

OPQ_EXPORT int opq_queue_timedenqueue(opq_queue *q, opq_op *op, const struct timespec *deadline)
{
	return enqueue(q, op, WAIT_BLOCK, deadline);
}

static int enqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg, enum wait_kind kind,
                      const struct timespec *deadline)
{
	if (!q || !fn || !opq__deadline_ok(deadline))
		return EINVAL;
	struct box *b = box_get(q);
	if (!b)
		return ENOMEM;
	b->op.perform = opq__box_perform;
	b->op.discard = (opq_op_fn *)discard_fn; /* see struct box */
	b->op.opq__chan = NULL;
	OP_SET_STATE(&b->op, OP_IDLE);
	b->fn = fn;
	b->arg = arg;
	int rc;
	if (q->capacity == 0) {
		rc = push_inbox(q, &b->op, true);
	} else {
		opq__lock(&q->mu);
		rc = push(q, &b->op, kind, deadline);
		opq__unlock(&q->mu);
	}
	if (rc)
		opq__boxes_put(q, &b->op, &b->op, 1);
	return rc;
}

OPQ_EXPORT int opq_queue_enqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg)
{
	return enqueue_fn(q, fn, discard_fn, arg, WAIT_BLOCK, NULL);
}

OPQ_EXPORT int opq_queue_tryenqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg)
{
	return enqueue_fn(q, fn, discard_fn, arg, WAIT_TRY, NULL);
}

OPQ_EXPORT int opq_queue_timedenqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg,
                                         const struct timespec *deadline)
{
	return enqueue_fn(q, fn, discard_fn, arg, WAIT_BLOCK, deadline);
}

/* The box of opq_queue_submit: it travels to the channel, whose thread
 * frees it, so it is not one of the queue's reusable boxes; it comes from
 * the boxes' allocator (jemalloc when configured). */
struct work {
	opq_op op;
	opq_fn *work;
	opq_after_fn *after;
	void *arg;
};

static void work_perform(opq_op *op)
{
	struct work *w = OPQ_CONTAINER_OF(op, struct work, op);
	w->work(w->arg);
}

static void work_complete(opq_op *op, int status)
{
	struct work *w = OPQ_CONTAINER_OF(op, struct work, op);
	opq_after_fn *after = w->after;
	void *arg = w->arg;
	opq__box_free(w, sizeof(*w));
	if (after)
		after(arg, status);
}

OPQ_EXPORT int opq_queue_submit(opq_queue *q, opq_chan *ch, opq_fn *work, opq_after_fn *after,
                                void *arg, const struct timespec *deadline)
{
	if (!q || !ch || !work || !opq__deadline_ok(deadline))
		return EINVAL;
	struct work *w = opq__box_alloc(sizeof(*w));
	if (!w)
		return ENOMEM;
	opq_op_init(&w->op, work_perform, NULL);
	w->op.opq__chan = ch;
	w->op.opq__complete = work_complete;
	w->work = work;
	w->after = after;
	w->arg = arg;
	int rc = enqueue(q, &w->op, WAIT_BLOCK, deadline);
	if (rc)
		opq__box_free(w, sizeof(*w));
	return rc;
}

/* ---- taking an operation back out ----------------------------------------- */

/*
 * If op waits in q, in the FIFO or in a runner's batch, take it out (state
 * IDLE) and return true. Under q->mu.
 */
static bool take_out(opq_queue *q, opq_op *op)
{
	opq__inbox_drain(q); /* an operation still in the inbox is QUEUED then */
	uintptr_t st = OP_STATE(op);
	void *owner = OP_OWNER(op);
	if (st == OP_QUEUED && owner == q) {
		opq__list_remove(&op->opq__link);
		q->queued--;
		opq__make_room(q);
	} else if (st == OP_BATCHED) {
		/* The owner is a runner of q only if it is on q's list. */
		struct runner *r = NULL;
		opq__list_for_each(l, &q->runners)
		{
			if (OPQ_CONTAINER_OF(l, struct runner, link) == owner)
				r = owner;
		}
		if (!r)
			return false;
		opq__lock(&r->mu);
		bool waiting = OP_STATE(op) == OP_BATCHED; /* r may have started it */
		if (waiting) {
			opq__list_remove(&op->opq__link);
			r->nbatch--;
		}
		opq__unlock(&r->mu);
		if (!waiting)
			return false;
	} else {
		return false;
	}
	OP_SET_OWNER(op, NULL);
	OP_SET_STATE(op, OP_IDLE);
	return true;
}

OPQ_EXPORT int opq_queue_cancel(opq_queue *q, opq_op *op)
{
	if (!q || !op)
		return EINVAL;
	opq__lock(&q->mu);
	if (!take_out(q, op)) {
		opq__unlock(&q->mu);
		return EBUSY;
	}
	q->discarded++;
	q->cancelled++;
	if (q->idle_waiters && opq__is_idle(q))
		OPQ_CHECK(pthread_cond_broadcast(&q->idle));
	opq__unlock(&q->mu);
	opq__op_discard(op);
	return 0;
}

bool opq__queue_help(opq_queue *q, opq_op *op)
{
	opq__lock(&q->mu);
	if (!take_out(q, op)) {
		opq__unlock(&q->mu);
		return false;
	}
	OP_SET_STATE(op, OP_TAKEN);
	q->helping++;
	opq__unlock(&q->mu);

	opq__op_perform(op);

	opq__lock(&q->mu);
	opq__helped_done(q);
	opq__unlock(&q->mu);
	return true;
}
