/*
 * cancel.c: the thread's cancellation point.
 *
 * A cancel context (struct opq__cancel_ctx) is something that can be
 * cancelled: a flag, and the records of the calls blocked in it. Each
 * thread has a current context (NULL: none); a blocking call of queue.c,
 * line.c or stage.c, about to wait on (mu, cv) with mu held, registers a
 * record (struct opq__cancel_reg) with it, and a canceller wakes every
 * record registered with the context it cancels. The contexts' owner sets
 * the current context and cancels contexts; this file knows nothing of it.
 *
 * Invariants, under c->mu (the owner's lock, which guards the context):
 * - a record is on c->regs from an opq__cancel_begin that returned 0 until
 *   its opq__cancel_end, and r->ctx is c meanwhile;
 * - c->cancelled only goes from false to true, and is set before any
 *   record of c is pinned: a record registered after it is never needed
 *   (begin saw the flag and registered nothing);
 * - r->pinned while exactly one canceller has r on its wake list: that
 *   canceller will lock r->mu, broadcast r->cv and unpin r under c->mu.
 *   opq__cancel_end waits (on r->cv, with r->mu) until r is unpinned and
 *   keeps r listed meanwhile, so a record never vanishes under its
 *   canceller, and its context is still in use (its owner must not free
 *   it while records are listed: opq__cancel_ctx_busy) when the canceller
 *   takes c->mu to unpin.
 * No wakeup is lost: the waiter holds r->mu from its opq__cancel_pending
 * check until pthread_cond_wait releases it, and the canceller sets the
 * flag before it locks r->mu to broadcast.
 *
 * Lock order: the waiter's object mutex (r->mu), then the context's lock
 * (c->mu). A canceller pins records under c->mu and wakes them only after
 * dropping it; nothing takes an object mutex while holding c->mu.
 */
#include "internal.h"

#include <string.h>

#include "list.h"

static _Thread_local struct opq__cancel_ctx *tls_ctx;

void (*opq__cancel_wake_hook)(void);

void opq__cancel_ctx_init(struct opq__cancel_ctx *c, pthread_mutex_t *mu)
{
	c->mu = mu;
	opq__list_init(&c->regs);
	atomic_init(&c->cancelled, false);
}

struct opq__cancel_ctx *opq__cancel_current(void)
{
	return tls_ctx;
}

struct opq__cancel_ctx *opq__cancel_set_current(struct opq__cancel_ctx *c)
{
	struct opq__cancel_ctx *outer = tls_ctx;
	tls_ctx = c;
	return outer;
}

bool opq__cancel_ctx_cancelled(const struct opq__cancel_ctx *c)
{
	return atomic_load_explicit(&c->cancelled, memory_order_acquire);
}

bool opq__cancel_ctx_busy(const struct opq__cancel_ctx *c)
{
	return !opq__list_empty(&c->regs);
}

void opq__cancel_ctx_cancel(struct opq__cancel_ctx *c, struct opq__cancel_reg **wake)
{
	atomic_store_explicit(&c->cancelled, true, memory_order_release);
	opq__list_for_each(l, &c->regs)
	{
		struct opq__cancel_reg *r = OPQ_CONTAINER_OF(l, struct opq__cancel_reg, link);
		if (r->pinned)
			continue; /* another canceller wakes it, after the flag was set */
		r->pinned = true;
		r->wnext = *wake;
		*wake = r;
	}
}

void opq__cancel_wake(struct opq__cancel_reg *wake)
{
	if (wake && opq__cancel_wake_hook)
		opq__cancel_wake_hook();
	while (wake) {
		struct opq__cancel_reg *r = wake;
		wake = r->wnext;
		pthread_mutex_t *mu = r->mu;
		pthread_mutex_t *cmu = r->ctx->mu;
		opq__lock(mu);
		OPQ_CHECK(pthread_cond_broadcast(r->cv));
		opq__lock(cmu);
		r->pinned = false; /* r may vanish once we drop mu */
		opq__unlock(cmu);
		opq__unlock(mu);
	}
}

static int reg_begin(struct opq__cancel_reg *r, struct opq__cancel_ctx *c, pthread_mutex_t *mu,
                     pthread_cond_t *cv)
{
	memset(r, 0, sizeof(*r));
	if (!c)
		return 0;
	opq__lock(c->mu);
	if (atomic_load_explicit(&c->cancelled, memory_order_relaxed)) {
		opq__unlock(c->mu);
		return ECANCELED;
	}
	r->mu = mu;
	r->cv = cv;
	r->ctx = c;
	opq__list_push(&c->regs, &r->link);
	opq__unlock(c->mu);
	return 0;
}

int opq__cancel_begin(struct opq__cancel_reg *r, pthread_mutex_t *mu, pthread_cond_t *cv)
{
	return reg_begin(r, tls_ctx, mu, cv);
}

bool opq__cancel_pending(const struct opq__cancel_reg *r)
{
	return r->ctx && atomic_load_explicit(&r->ctx->cancelled, memory_order_acquire);
}

bool opq__cancel_end(struct opq__cancel_reg *r)
{
	struct opq__cancel_ctx *c = r->ctx;
	if (!c)
		return false;
	opq__lock(c->mu);
	while (r->pinned) {
		opq__unlock(c->mu);
		OPQ_CHECK(pthread_cond_wait(r->cv, r->mu));
		opq__lock(c->mu);
	}
	opq__list_remove(&r->link);
	bool cancelled = atomic_load_explicit(&c->cancelled, memory_order_relaxed);
	opq__unlock(c->mu);
	r->ctx = NULL;
	return cancelled;
}

int opq__cancel_sleep(struct opq__cancel_ctx *c, const struct timespec *deadline)
{
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int rc = opq__mutex_init(&mu);
	if (rc)
		return rc;
	if ((rc = opq__cond_init(&cv))) {
		pthread_mutex_destroy(&mu);
		return rc;
	}
	struct opq__cancel_reg r;
	opq__lock(&mu);
	rc = reg_begin(&r, c, &mu, &cv);
	while (rc == 0) {
		if (opq__cancel_pending(&r))
			rc = ECANCELED;
		else if (opq__cond_wait(&cv, &mu, deadline) == ETIMEDOUT)
			rc = opq__cancel_pending(&r) ? ECANCELED : ETIMEDOUT;
	}
	opq__cancel_end(&r);
	opq__unlock(&mu);
	pthread_cond_destroy(&cv);
	pthread_mutex_destroy(&mu);
	return rc;
}

int opq__cancel_sleep_until(const struct timespec *deadline)
{
	if (!opq__deadline_ok(deadline))
		return EINVAL;
	if (!deadline && !tls_ctx)
		return EDEADLK;
	return opq__cancel_sleep(tls_ctx, deadline);
}
