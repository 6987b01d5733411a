/*
 * lease.c: lease locks with fencing tokens, the core: the provider object,
 * and the handle with the algorithm (acquire, refresh, release, remaining)
 * and the deadlines of its store calls; see opq_lease_create(3) and
 * opq_lease_acquire(3). The attributes are in lease_attr.c, the keepalive
 * in lease_keepalive.c, the memory provider in lease_memory.c. The
 * handle's struct and its three locks, with their order, are in
 * internal.h.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NS_PER_S 1000000000LL

struct opq_lease_provider {
	opq_lease_provider_ops ops;
	void *store;
	pthread_mutex_t mu;
	unsigned long users; /* lease handles on this provider */
};

/* A suspend of the system shorter than this is taken as no suspend (see
 * opq_lease_remaining); the margin covers it. */
#define SUSPEND_MIN_NS 1000000

/* ---- small helpers ------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s ? *s : 0x9e3779b97f4a7c15ULL;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* lease * ppm / 1e6 + fixed, or -1 when that reaches the lease. */
static int64_t margin_of(int64_t lease, int64_t ppm, int64_t fixed)
{
	if (lease <= 0 || ppm < 0 || fixed < 0 || ppm >= 1000000)
		return -1;
	int64_t m = lease / 1000000 * ppm + lease % 1000000 * ppm / 1000000;
	if (fixed >= lease - m)
		return -1;
	return m + fixed;
}

int64_t opq__lease_sat_add(int64_t a, int64_t b)
{
	return a > INT64_MAX - b ? INT64_MAX : a + b;
}

static void set_err(opq_lease *l, int rc, const char *words)
{
	opq__lock(&l->mu);
	if (words && words[0]) {
		snprintf(l->err, sizeof(l->err), "%s", words);
	} else {
		char buf[128];
		if (strerror_r(rc, buf, sizeof(buf)) != 0)
			snprintf(buf, sizeof(buf), "error %d", rc);
		snprintf(l->err, sizeof(l->err), "lease store: %s", buf);
	}
	opq__unlock(&l->mu);
}

/* ---- providers ------------------------------------------------------------- */

OPQ_EXPORT int opq_lease_provider_create(opq_lease_provider **provider,
                                         const opq_lease_provider_ops *ops, void *store)
{
	if (!provider || !ops || !ops->acquire || !ops->refresh || !ops->release)
		return EINVAL;
	opq_lease_provider *p = opq__calloc(1, sizeof(*p));
	if (!p)
		return ENOMEM;
	int rc = opq__mutex_init(&p->mu);
	if (rc) {
		opq__free(p);
		return rc;
	}
	p->ops = *ops;
	p->store = store;
	*provider = p;
	return 0;
}

OPQ_EXPORT int opq_lease_provider_destroy(opq_lease_provider *provider)
{
	if (!provider)
		return 0;
	opq__lock(&provider->mu);
	unsigned long users = provider->users;
	opq__unlock(&provider->mu);
	if (users)
		return EBUSY;
	if (provider->ops.destroy)
		provider->ops.destroy(provider->store);
	OPQ_CHECK(pthread_mutex_destroy(&provider->mu));
	opq__free(provider);
	return 0;
}

/* ---- handles --------------------------------------------------------------- */

OPQ_EXPORT int opq_lease_create(opq_lease **lease, opq_lease_provider *provider, const char *name,
                                const opq_lease_attr *attr)
{
	size_t n = opq__lease_str_ok(name, OPQ_LEASE_NAME_MAX);
	if (!lease || !provider || !n)
		return EINVAL;
	struct opq_lease_attr defaults;
	if (!attr) {
		opq__lease_attr_defaults(&defaults);
		attr = &defaults;
	}
	int64_t margin = margin_of(attr->lease_ns, attr->ppm, attr->fixed_ns);
	if (margin < 0)
		return EINVAL;
	opq_lease *l = opq__calloc(1, sizeof(*l));
	if (!l)
		return ENOMEM;
	int rc = opq__mutex_init(&l->ka_mu);
	if (rc)
		goto fail0;
	rc = opq__mutex_init(&l->io);
	if (rc)
		goto fail1;
	rc = opq__mutex_init(&l->mu);
	if (rc)
		goto fail2;
	rc = opq__cond_init(&l->cv);
	if (rc)
		goto fail3;
	l->provider = provider;
	atomic_init(&l->cancelled, false);
	memcpy(l->name, name, n + 1);
	l->a = *attr;
	l->margin_ns = margin;
	opq__lease_random(&l->rng, sizeof(l->rng));
	opq__lock(&provider->mu);
	provider->users++;
	opq__unlock(&provider->mu);
	*lease = l;
	return 0;
fail3:
	pthread_mutex_destroy(&l->mu);
fail2:
	pthread_mutex_destroy(&l->io);
fail1:
	pthread_mutex_destroy(&l->ka_mu);
fail0:
	opq__free(l);
	return rc;
}

OPQ_EXPORT int opq_lease_destroy(opq_lease *lease)
{
	if (!lease)
		return 0;
	if (opq__lease_in_own_lost(lease))
		return EDEADLK;
	opq__lock(&lease->ka_mu);
	opq__lease_ka_stop_locked(lease);
	/* Stopped: no new delivery. One in the channel still uses lease. */
	opq__lock(&lease->mu);
	bool pending = lease->ka.lost_pending;
	opq__unlock(&lease->mu);
	opq__unlock(&lease->ka_mu);
	if (pending)
		return EBUSY;
	opq_lease_provider *p = lease->provider;
	opq__lock(&p->mu);
	p->users--;
	opq__unlock(&p->mu);
	OPQ_CHECK(pthread_cond_destroy(&lease->cv));
	OPQ_CHECK(pthread_mutex_destroy(&lease->mu));
	OPQ_CHECK(pthread_mutex_destroy(&lease->io));
	OPQ_CHECK(pthread_mutex_destroy(&lease->ka_mu));
	opq__free(lease);
	return 0;
}

enum call { CALL_ACQUIRE, CALL_REFRESH, CALL_RELEASE };

/*
 * What opq_lease_request.opq__call points to: whether the call may be
 * cancelled (the store calls of a blocking acquire), and by what.
 */
struct lease_call {
	opq_lease *l;
	struct opq__cancel_ctx *ctx; /* the calling thread's (a scope task's), or NULL */
	bool cancellable;
};

static bool call_cancelled(const struct lease_call *c)
{
	return c->cancellable && (atomic_load_explicit(&c->l->cancelled, memory_order_acquire) ||
	                          (c->ctx && opq__cancel_ctx_cancelled(c->ctx)));
}

OPQ_EXPORT int opq_lease_request_check(const opq_lease_request *req)
{
	if (!req)
		return EINVAL;
	const struct lease_call *c = req->opq__call;
	if (c && call_cancelled(c))
		return ECANCELED;
	return opq__mono_ns() >= opq__ts_to_ns(&req->deadline) ? ETIMEDOUT : 0;
}

/*
 * One store call (io held by the caller), to return by the monotonic
 * instant dl (ns). *before is the instant taken just before the request.
 * A provider's answer outside the errno range is made EIO; store failures
 * leave their words in the handle. `cancellable`: a blocking acquire's
 * try, which opq_lease_cancel may cut short (opq_lease_request_check).
 */
static int store_call(opq_lease *l, enum call what, uint64_t token, uint64_t *out,
                      struct timespec *before, int64_t *suspended, int64_t dl, bool cancellable)
{
	char words[OPQ__LEASE_ERR_MAX];
	words[0] = '\0';
	struct lease_call call = {
	    .l = l,
	    .ctx = cancellable ? opq__cancel_current() : NULL,
	    .cancellable = cancellable,
	};
	opq_lease_request req = {
	    .name = l->name,
	    .owner = l->a.owner,
	    .lease_ns = l->a.lease_ns,
	    .data = l->a.data_len ? l->a.data : NULL,
	    .data_len = l->a.data_len,
	    .token = token,
	    .errbuf = words,
	    .errlen = sizeof(words),
	    .deadline = opq__ns_to_ts(dl),
	    .opq__call = &call,
	};
	const opq_lease_provider_ops *ops = &l->provider->ops;
	void *store = l->provider->store;
	clock_gettime(CLOCK_MONOTONIC, before);
	if (suspended) /* for a grant: see opq_lease_remaining */
		*suspended = opq__suspended_ns();
	int rc;
	switch (what) {
	case CALL_ACQUIRE:
		*out = 0;
		rc = ops->acquire(store, &req, out);
		if (rc == 0 && *out == 0) {
			rc = EIO;
			snprintf(words, sizeof(words), "lease provider returned token 0 for %.*s",
			         64, l->name);
		}
		break;
	case CALL_REFRESH:
		rc = ops->refresh(store, &req);
		break;
	default:
		rc = ops->release(store, &req);
		break;
	}
	words[sizeof(words) - 1] = '\0';
	if (rc < 0)
		rc = EIO;
	bool expected = rc == 0 || (what == CALL_ACQUIRE && rc == EBUSY) ||
	                (what == CALL_REFRESH && rc == ENOLCK) ||
	                (rc == ECANCELED && call_cancelled(&call));
	if (!expected)
		set_err(l, rc, words);
	return rc;
}

/* The bound of a store call made now that has no deadline of its own: one lease time. */
static int64_t one_lease(const opq_lease *l)
{
	return opq__lease_sat_add(opq__mono_ns(), l->a.lease_ns);
}

/* One try: a store call bounded by dl (monotonic ns). */
static int lease_try(opq_lease *lease, opq_lease_grant *grant, int64_t dl, bool cancellable)
{
	opq__lock(&lease->io);
	uint64_t token;
	struct timespec before;
	int64_t suspended;
	int rc = store_call(lease, CALL_ACQUIRE, 0, &token, &before, &suspended, dl, cancellable);
	opq__lock(&lease->mu);
	if (rc == 0) {
		lease->held = true;
		lease->grant.token = token;
		lease->grant.acquired = before;
		lease->grant_suspended = suspended;
		lease->grant.lease_ns = lease->a.lease_ns;
		if (grant)
			*grant = lease->grant;
	} else if (rc == EBUSY) {
		lease->held = false;
	}
	opq__unlock(&lease->mu);
	opq__unlock(&lease->io);
	return rc;
}

OPQ_EXPORT int opq_lease_try_acquire(opq_lease *lease, opq_lease_grant *grant)
{
	if (!lease)
		return EINVAL;
	return lease_try(lease, grant, one_lease(lease), false);
}

/* Whether the handle, or the calling thread's scope task, is cancelled. */
static bool acquire_cancelled(opq_lease *l)
{
	struct opq__cancel_ctx *c = opq__cancel_current();
	return atomic_load_explicit(&l->cancelled, memory_order_acquire) ||
	       (c && opq__cancel_ctx_cancelled(c));
}

/*
 * The backoff between tries: sleep until the monotonic instant `at` (ns),
 * or until the handle or the calling thread's scope task is cancelled.
 * ETIMEDOUT or ECANCELED.
 */
static int backoff_sleep(opq_lease *l, int64_t at)
{
	struct timespec ts = opq__ns_to_ts(at);
	struct opq__cancel_reg r;
	opq__lock(&l->mu);
	int rc = opq__cancel_begin(&r, &l->mu, &l->cv);
	while (rc == 0) {
		if (atomic_load_explicit(&l->cancelled, memory_order_relaxed) ||
		    opq__cancel_pending(&r))
			rc = ECANCELED;
		else if (opq__cond_wait(&l->cv, &l->mu, &ts) == ETIMEDOUT)
			rc = atomic_load_explicit(&l->cancelled, memory_order_relaxed) ||
			             opq__cancel_pending(&r)
			         ? ECANCELED
			         : ETIMEDOUT;
	}
	opq__cancel_end(&r);
	opq__unlock(&l->mu);
	return rc;
}

OPQ_EXPORT int opq_lease_acquire(opq_lease *lease, const struct timespec *deadline,
                                 opq_lease_grant *grant)
{
	if (!lease || !opq__deadline_ok(deadline))
		return EINVAL;
	int64_t end = deadline ? opq__ts_to_ns(deadline) : INT64_MAX;
	int64_t step = lease->a.poll_min;
	for (;;) {
		if (acquire_cancelled(lease))
			return ECANCELED;
		/* The try gets the time left, at most one lease time: a store
		 * call never outlasts the caller's deadline, and never hangs
		 * for ever without one. A deadline already past still makes
		 * one try, which waits for nothing. */
		int64_t dl = one_lease(lease);
		int rc = lease_try(lease, grant, dl < end ? dl : end, true);
		if (rc == 0 || rc == EINVAL)
			return rc;
		if (rc == ECANCELED && acquire_cancelled(lease))
			return ECANCELED;
		/* EBUSY or a store failure: wait, then try again. */
		int64_t now = opq__mono_ns();
		if (now >= end)
			return ETIMEDOUT;
		opq__lock(&lease->mu);
		uint64_t r = rng_next(&lease->rng);
		opq__unlock(&lease->mu);
		/* Jitter: a random wait in [step/2, step]. */
		int64_t half = step / 2;
		int64_t wait = half + (int64_t)(r % (uint64_t)(step - half + 1));
		int64_t at = opq__lease_sat_add(now, wait);
		if (at > end)
			at = end;
		int src = backoff_sleep(lease, at);
		if (src != ETIMEDOUT)
			return src;
		step = step > lease->a.poll_max / 2 ? lease->a.poll_max : step * 2;
	}
}

OPQ_EXPORT int opq_lease_cancel(opq_lease *lease)
{
	if (!lease)
		return EINVAL;
	opq__lock(&lease->mu);
	atomic_store_explicit(&lease->cancelled, true, memory_order_release);
	OPQ_CHECK(pthread_cond_broadcast(&lease->cv));
	opq__unlock(&lease->mu);
	return 0;
}

/* The refresh itself, shared by the public call and the keepalive. */
int opq__lease_do_refresh(opq_lease *lease, opq_lease_grant *grant)
{
	opq__lock(&lease->io);
	opq__lock(&lease->mu);
	bool held = lease->held;
	uint64_t token = lease->grant.token;
	/* Bounded by the lease's local end; once that has passed, the
	 * refresh is a try to keep what the store may still count as ours,
	 * bounded like one. (A grant's lease is longer than the margin.) */
	int64_t dl = held ? opq__lease_sat_add(opq__ts_to_ns(&lease->grant.acquired),
	                                       lease->grant.lease_ns - lease->margin_ns)
	                  : 0;
	opq__unlock(&lease->mu);
	int rc = ENOLCK;
	if (held) {
		if (dl <= opq__mono_ns())
			dl = one_lease(lease);
		struct timespec before;
		int64_t suspended;
		rc = store_call(lease, CALL_REFRESH, token, NULL, &before, &suspended, dl, false);
		opq__lock(&lease->mu);
		if (rc == 0) {
			lease->grant.acquired = before;
			lease->grant_suspended = suspended;
			lease->grant.lease_ns = lease->a.lease_ns;
			if (grant)
				*grant = lease->grant;
		} else if (rc == ENOLCK) {
			lease->held = false;
		}
		opq__unlock(&lease->mu);
	}
	opq__unlock(&lease->io);
	return rc;
}

OPQ_EXPORT int opq_lease_refresh(opq_lease *lease, opq_lease_grant *grant)
{
	if (!lease)
		return EINVAL;
	return opq__lease_do_refresh(lease, grant);
}

OPQ_EXPORT int opq_lease_release(opq_lease *lease)
{
	if (!lease)
		return EINVAL;
	/* A keepalive would only find the lease gone: stop it first (from the
	 * lost callback it has already ended). */
	if (!opq__lease_in_own_lost(lease)) {
		opq__lock(&lease->ka_mu);
		opq__lease_ka_stop_locked(lease);
		opq__unlock(&lease->ka_mu);
	}
	opq__lock(&lease->io);
	opq__lock(&lease->mu);
	bool held = lease->held;
	uint64_t token = lease->grant.token;
	opq__unlock(&lease->mu);
	int rc = 0;
	if (held) {
		struct timespec before;
		rc = store_call(lease, CALL_RELEASE, token, NULL, &before, NULL, one_lease(lease),
		                false);
		if (rc == 0) {
			opq__lock(&lease->mu);
			lease->held = false;
			opq__unlock(&lease->mu);
		}
	}
	opq__unlock(&lease->io);
	return rc;
}

OPQ_EXPORT int opq_lease_remaining(opq_lease *lease, const struct timespec *now, int64_t *ns)
{
	if (!lease || !ns || (now && (now->tv_nsec < 0 || now->tv_nsec >= NS_PER_S)))
		return EINVAL;
	int64_t t = now ? opq__ts_to_ns(now) : opq__mono_ns();
	int64_t suspended = opq__suspended_ns();
	opq__lock(&lease->mu);
	int64_t left = 0;
	if (lease->held) {
		int64_t end = opq__lease_sat_add(opq__ts_to_ns(&lease->grant.acquired),
		                                 lease->grant.lease_ns - lease->margin_ns);
		/* Saturating: a caller's `now` may be far in the past. */
		left = end <= t ? 0 : t < 0 && end > INT64_MAX + t ? INT64_MAX : end - t;
		/* The monotonic clock stood still while the system was
		 * suspended; the store's clock did not. Less than
		 * SUSPEND_MIN_NS is the clocks' reading error, not a suspend. */
		int64_t asleep = suspended - lease->grant_suspended;
		if (asleep >= SUSPEND_MIN_NS)
			left = left > asleep ? left - asleep : 0;
	}
	opq__unlock(&lease->mu);
	*ns = left;
	return 0;
}

OPQ_EXPORT int opq_lease_grant_get(opq_lease *lease, opq_lease_grant *grant)
{
	if (!lease || !grant)
		return EINVAL;
	opq__lock(&lease->mu);
	int rc = lease->held ? 0 : ENOLCK;
	if (lease->held)
		*grant = lease->grant;
	opq__unlock(&lease->mu);
	return rc;
}

OPQ_EXPORT int opq_lease_error(opq_lease *lease, char *buf, size_t len)
{
	if (!lease || !buf || len == 0)
		return EINVAL;
	opq__lock(&lease->mu);
	snprintf(buf, len, "%s", lease->err);
	opq__unlock(&lease->mu);
	return 0;
}
