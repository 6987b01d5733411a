/*
 * lease_keepalive.c: the lease keepalive (opq_lease_keepalive_start(3)):
 * refreshes a held lease and calls the owner back when it is lost. The
 * handle and its locks are in lease.c and internal.h.
 *
 * The refresh is an operation (ka.op, embedded). By default (no queue) the
 * keepalive's own thread, "opq-lease", performs it: no user work shares
 * that thread, so none can delay a refresh. With the caller's queue it is
 * an operation on that queue. The library's timer thread (timer.c) starts
 * it when due (sets ka.run for the thread, or enqueues it), and
 * independently calls lost(UNREACHABLE) at acquired + lease - margin -
 * guard when no refresh has confirmed the lease by then, so a refresh
 * stuck in I/O cannot make the callback late. A refresh answered ENOLCK
 * calls lost(TAKEN) on the thread that performed it at once.
 *
 * With a channel (opq_lease_attr_set_chan), lost is instead the completion
 * of ka.lost_op on that channel. The keepalive accepts one delivery on the
 * channel when it starts (so opq_chan_destroy refuses while it could
 * deliver), hands lost_op to it in place of calling lost, and gives the
 * acceptance back at stop if it never did. A delivery handed over stays:
 * stop does not withdraw it (the channel's stack cannot), and the handle
 * refuses destroy and a new start (EBUSY) until the loop has taken it, so
 * the completion never touches a freed handle and stop never waits for
 * the loop.
 */
#define _GNU_SOURCE 1 /* pthread_setname_np */
#include "internal.h"

#include <signal.h>

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

/* lost_op's completion, on the channel's loop thread: the delivery is
 * over before lost is called, so lost may stop, restart or destroy. */
static void ka_lost_complete(opq_op *op, int status)
{
	opq_lease *l = OPQ_CONTAINER_OF(op, opq_lease, ka.lost_op);
	struct opq__lease_keepalive *k = &l->ka;
	opq__lock(&l->mu);
	opq_lease_lost_fn *lost = k->lost;
	void *arg = k->arg;
	k->lost_pending = false;
	opq__unlock(&l->mu);
	lost(l, (enum opq_lease_lost_reason)status, arg);
}

/* Call the lost callback on this thread, or hand it to the channel (mu
 * held on entry and exit). */
static void ka_call_lost(opq_lease *l, enum opq_lease_lost_reason why)
{
	struct opq__lease_keepalive *k = &l->ka;
	k->ended = true;
	if (k->chan) {
		/* The completion takes mu, and stop and destroy wait for this
		 * thread (timer cancel, op_busy), so l outlives this call. */
		k->lost_sent = true;
		k->lost_pending = true;
		opq__chan_end(&k->lost_op, (int)why);
		return;
	}
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
	} else if (!k->op_busy && now >= k->refresh_at && !k->queue) {
		k->op_busy = true;
		k->run = true;
		OPQ_CHECK(pthread_cond_broadcast(&l->cv));
		ka_rearm(l);
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

/* The keepalive's own thread, when it has no queue: performs op when told. */
static void *ka_thread_main(void *arg)
{
	opq_lease *l = arg;
	struct opq__lease_keepalive *k = &l->ka;
#if HAVE_DECL_PTHREAD_SETNAME_NP
	OPQ_CHECK(pthread_setname_np(pthread_self(), "opq-lease"));
#endif
	opq__lock(&l->mu);
	for (;;) {
		while (!k->run && !k->quit)
			opq__cond_wait(&l->cv, &l->mu, NULL);
		if (k->quit)
			break;
		k->run = false;
		opq__unlock(&l->mu);
		ka_perform(&k->op);
		opq__lock(&l->mu);
	}
	opq__unlock(&l->mu);
	return NULL;
}

/* Start the keepalive's thread (ka_mu held). It takes no signals: they
 * belong to the host program. */
static int ka_thread_start(opq_lease *l)
{
	sigset_t all, old;
	sigfillset(&all);
	OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &all, &old));
	int rc = pthread_create(&l->ka.thread, NULL, ka_thread_main, l);
	OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &old, NULL));
	if (rc)
		return rc;
	l->ka.has_thread = true;
	return 0;
}

/* Stop and join the keepalive's thread, if any (ka_mu held, op not busy). */
static void ka_thread_stop(opq_lease *l)
{
	struct opq__lease_keepalive *k = &l->ka;
	if (!k->has_thread)
		return;
	opq__lock(&l->mu);
	k->quit = true;
	OPQ_CHECK(pthread_cond_broadcast(&l->cv));
	opq__unlock(&l->mu);
	OPQ_CHECK(pthread_join(k->thread, NULL));
	k->has_thread = false;
	k->quit = false;
	k->run = false;
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
	 * one being performed is waited for (the thread skips one it has not
	 * begun: stopping is set). */
	if (busy && k->queue)
		(void)opq_queue_cancel(k->queue, &k->op);
	opq__lock(&l->mu);
	while (k->op_busy || k->in_lost)
		opq__cond_wait(&l->cv, &l->mu, NULL);
	opq__unlock(&l->mu);
	/* A discard or refresh that finished meanwhile may have re-armed it. */
	opq__timer_cancel(&k->timer);
	ka_thread_stop(l);
	opq__lock(&l->mu);
	if (k->chan && !k->lost_sent) /* no delivery: give the acceptance back */
		opq__chan_unaccept(k->chan);
	k->chan = NULL;
	k->on = false;
	k->ended = true;
	k->stopping = false;
	opq__unlock(&l->mu);
	opq__timer_unref();
}

OPQ_EXPORT int opq_lease_keepalive_start(opq_lease *lease, opq_queue *queue, int64_t interval_ns,
                                         opq_lease_lost_fn *lost, void *arg)
{
	if (!lease || !lost || interval_ns < 0)
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
	int rc = !lease->held ? ENOLCK : (k->on && !k->ended) ? EBUSY : k->lost_pending ? EBUSY : 0;
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
	if (!queue && (rc = ka_thread_start(lease)) != 0) {
		opq__timer_unref();
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
	k->chan = lease->a.chan;
	k->lost_sent = false;
	if (k->chan) {
		OPQ_CHECK(opq_op_init(&k->lost_op, ka_perform, NULL)); /* never performed */
		k->lost_op.opq__chan = k->chan;
		k->lost_op.opq__complete = ka_lost_complete;
		opq__chan_accept(k->chan);
	}
	int64_t acquired = opq__ts_to_ns(&lease->grant.acquired);
	k->lost_at = opq__lease_sat_add(acquired,
	                                lease->grant.lease_ns - lease->margin_ns - ka_guard(lease));
	k->refresh_at = opq__mono_ns();
	OPQ_CHECK(opq_op_init(&k->op, ka_perform, ka_discard));
	k->op_busy = true;
	if (!queue) { /* the first refresh goes at once, on the thread */
		k->run = true;
		OPQ_CHECK(pthread_cond_broadcast(&lease->cv));
		ka_rearm(lease);
		opq__unlock(&lease->mu);
		opq__unlock(&lease->ka_mu);
		return 0;
	}
	opq__unlock(&lease->mu);
	/* The first refresh goes at once: it confirms the lease and tells
	 * whether the queue takes operations at all. */
	rc = opq_queue_tryenqueue(queue, &k->op);
	opq__lock(&lease->mu);
	if (rc == ESHUTDOWN || rc == EINVAL) {
		k->op_busy = false;
		k->on = false;
		k->ended = true;
		if (k->chan)
			opq__chan_unaccept(k->chan);
		k->chan = NULL;
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
