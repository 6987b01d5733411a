/*
 * lease_keepalive.c: the lease keepalive (opq_lease_keepalive_start(3)):
 * refreshes a held lease on the caller's queue and calls the owner back
 * when it is lost. The handle and its locks are in lease.c and internal.h.
 *
 * The refresh is an operation (ka.op, embedded: no allocation) on the
 * caller's queue. The library's timer thread (timer.c) enqueues it when
 * due, and independently calls lost(UNREACHABLE) at
 * acquired + lease - margin - guard when no refresh has confirmed the
 * lease by then, so a refresh stuck in I/O cannot make the callback late.
 * A refresh answered ENOLCK calls lost(TAKEN) on the runner at once.
 */
#include "internal.h"

bool opq__lease_in_own_lost(opq_lease *l)
{
	opq__lock(&l->mu);
	bool self = l->ka.in_lost && pthread_equal(l->ka.lost_thread, pthread_self());
	opq__unlock(&l->mu);
	return self;
}

/* How much before the local lease end lost(UNREACHABLE) fires: room for a
 * late timer thread and the callback itself. */
static int64_t ka_guard(const opq_lease *l)
{
	int64_t usable = l->a.lease_ns - l->margin_ns;
	int64_t g = usable / 10;
	return g < 100000000 ? g : 100000000;
}

/* After a store error, or a full or stopping queue: try again this soon. */
static int64_t ka_retry(const opq_lease *l)
{
	int64_t r = l->ka.interval_ns / 4;
	return r > 1000000 ? r : 1000000;
}

static void ka_timer_fire(struct opq__timer *t);

/* Arm the timer for the next thing due (under mu). */
static void ka_rearm(opq_lease *l)
{
	struct opq__lease_keepalive *k = &l->ka;
	if (!k->on || k->ended || k->stopping)
		return;
	int64_t when = k->lost_at;
	if (!k->op_busy && k->refresh_at < when)
		when = k->refresh_at;
	struct timespec ts = opq__ns_to_ts(when);
	opq__timer_arm(&k->timer, &ts, ka_timer_fire);
}

/* Call the lost callback on this thread (mu held on entry and exit). */
static void ka_call_lost(opq_lease *l, enum opq_lease_lost_reason why)
{
	struct opq__lease_keepalive *k = &l->ka;
	k->ended = true;
	k->in_lost = true;
	k->lost_thread = pthread_self();
	opq__unlock(&l->mu);
	k->lost(l, why, k->arg);
	opq__lock(&l->mu);
	k->in_lost = false;
	OPQ_CHECK(pthread_cond_broadcast(&l->cv));
}

static void ka_timer_fire(struct opq__timer *t)
{
	opq_lease *l = OPQ_CONTAINER_OF(t, opq_lease, ka.timer);
	struct opq__lease_keepalive *k = &l->ka;
	opq__lock(&l->mu);
	if (k->ended || k->stopping) {
		opq__unlock(&l->mu);
		return;
	}
	int64_t now = opq__mono_ns();
	if (now >= k->lost_at) {
		ka_call_lost(l, OPQ_LEASE_UNREACHABLE);
	} else if (!k->op_busy && now >= k->refresh_at) {
		k->op_busy = true;
		opq__unlock(&l->mu);
		int rc = opq_queue_tryenqueue(k->queue, &k->op);
		opq__lock(&l->mu);
		if (rc) { /* full or stopping: try again soon, until lost_at */
			k->op_busy = false;
			k->refresh_at = opq__lease_sat_add(now, ka_retry(l));
			OPQ_CHECK(pthread_cond_broadcast(&l->cv));
		}
		ka_rearm(l);
	} else {
		ka_rearm(l);
	}
	opq__unlock(&l->mu);
}

static void ka_perform(opq_op *op)
{
	opq_lease *l = OPQ_CONTAINER_OF(op, opq_lease, ka.op);
	struct opq__lease_keepalive *k = &l->ka;
	opq__lock(&l->mu);
	bool skip = k->ended || k->stopping;
	opq__unlock(&l->mu);
	opq_lease_grant g;
	int rc = skip ? 0 : opq__lease_do_refresh(l, &g);
	opq__lock(&l->mu);
	if (!skip && !k->ended && !k->stopping) {
		if (rc == 0) {
			int64_t acquired = opq__ts_to_ns(&g.acquired);
			k->lost_at =
			    opq__lease_sat_add(acquired, g.lease_ns - l->margin_ns - ka_guard(l));
			k->refresh_at = opq__lease_sat_add(acquired, k->interval_ns);
		} else if (rc == ENOLCK) {
			ka_call_lost(l, OPQ_LEASE_TAKEN);
		} else {
			k->refresh_at = opq__lease_sat_add(opq__mono_ns(), ka_retry(l));
		}
	}
	k->op_busy = false;
	ka_rearm(l);
	OPQ_CHECK(pthread_cond_broadcast(&l->cv));
	opq__unlock(&l->mu);
}

/* The queue dropped the refresh (stopped without draining, or our cancel). */
static void ka_discard(opq_op *op)
{
	opq_lease *l = OPQ_CONTAINER_OF(op, opq_lease, ka.op);
	struct opq__lease_keepalive *k = &l->ka;
	opq__lock(&l->mu);
	k->op_busy = false;
	k->refresh_at = opq__lease_sat_add(opq__mono_ns(), ka_retry(l));
	ka_rearm(l);
	OPQ_CHECK(pthread_cond_broadcast(&l->cv));
	opq__unlock(&l->mu);
}

/* Stop and clean up the keepalive, if any (ka_mu held, not from lost). */
void opq__lease_ka_stop_locked(opq_lease *l)
{
	struct opq__lease_keepalive *k = &l->ka;
	opq__lock(&l->mu);
	if (!k->on) {
		opq__unlock(&l->mu);
		return;
	}
	k->stopping = true;
	opq__unlock(&l->mu);
	/* No new timer firings; waits for one firing now (a lost callback). */
	opq__timer_cancel(&k->timer);
	opq__lock(&l->mu);
	bool busy = k->op_busy;
	opq__unlock(&l->mu);
	/* A refresh still queued is taken back (its discard clears op_busy);
	 * one being performed is waited for. */
	if (busy)
		(void)opq_queue_cancel(k->queue, &k->op);
	opq__lock(&l->mu);
	while (k->op_busy || k->in_lost)
		opq__cond_wait(&l->cv, &l->mu, NULL);
	opq__unlock(&l->mu);
	/* A discard or refresh that finished meanwhile may have re-armed it. */
	opq__timer_cancel(&k->timer);
	opq__lock(&l->mu);
	k->on = false;
	k->ended = true;
	k->stopping = false;
	opq__unlock(&l->mu);
	opq__timer_unref();
}

OPQ_EXPORT int opq_lease_keepalive_start(opq_lease *lease, opq_queue *queue, int64_t interval_ns,
                                         opq_lease_lost_fn *lost, void *arg)
{
	if (!lease || !queue || !lost || interval_ns < 0)
		return EINVAL;
	int64_t usable = lease->a.lease_ns - lease->margin_ns;
	if (interval_ns == 0)
		interval_ns = usable / 3 > 0 ? usable / 3 : 1;
	if (interval_ns >= usable)
		return EINVAL;
	if (opq__lease_in_own_lost(lease))
		return EDEADLK;
	struct opq__lease_keepalive *k = &lease->ka;
	opq__lock(&lease->ka_mu);
	opq__lock(&lease->mu);
	int rc = !lease->held ? ENOLCK : (k->on && !k->ended) ? EBUSY : 0;
	bool stale = k->on;
	opq__unlock(&lease->mu);
	if (rc) {
		opq__unlock(&lease->ka_mu);
		return rc;
	}
	if (stale) /* one that ended with its lost callback: clean it up */
		opq__lease_ka_stop_locked(lease);
	rc = opq__timer_ref();
	if (rc) {
		opq__unlock(&lease->ka_mu);
		return rc;
	}
	opq__lock(&lease->mu);
	k->on = true;
	k->ended = false;
	k->stopping = false;
	k->queue = queue;
	k->interval_ns = interval_ns;
	k->lost = lost;
	k->arg = arg;
	int64_t acquired = opq__ts_to_ns(&lease->grant.acquired);
	k->lost_at = opq__lease_sat_add(acquired,
	                                lease->grant.lease_ns - lease->margin_ns - ka_guard(lease));
	k->refresh_at = opq__mono_ns();
	OPQ_CHECK(opq_op_init(&k->op, ka_perform, ka_discard));
	k->op_busy = true;
	opq__unlock(&lease->mu);
	/* The first refresh goes at once: it confirms the lease and tells
	 * whether the queue takes operations at all. */
	rc = opq_queue_tryenqueue(queue, &k->op);
	opq__lock(&lease->mu);
	if (rc == ESHUTDOWN || rc == EINVAL) {
		k->op_busy = false;
		k->on = false;
		k->ended = true;
		opq__unlock(&lease->mu);
		opq__timer_unref();
		opq__unlock(&lease->ka_mu);
		return rc;
	}
	if (rc) { /* full: the timer tries again */
		k->op_busy = false;
		k->refresh_at = opq__lease_sat_add(k->refresh_at, ka_retry(lease));
	}
	ka_rearm(lease);
	opq__unlock(&lease->mu);
	opq__unlock(&lease->ka_mu);
	return 0;
}

OPQ_EXPORT int opq_lease_keepalive_stop(opq_lease *lease)
{
	if (!lease)
		return EINVAL;
	if (opq__lease_in_own_lost(lease))
		return EDEADLK;
	opq__lock(&lease->ka_mu);
	opq__lease_ka_stop_locked(lease);
	opq__unlock(&lease->ka_mu);
	return 0;
}
