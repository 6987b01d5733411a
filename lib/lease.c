/*
 * lease.c: lease locks with fencing tokens (the core and the memory
 * provider); see opq_lease_create(3).
 *
 * A handle has three locks, always taken in this order:
 *   ka_mu  serialises keepalive start/stop (and destroy, release);
 *   io     serialises the handle's store calls, so that a reply is applied
 *          to the state the request was made from (a refresh of token 5
 *          never clears a grant of token 6 made meanwhile);
 *   mu     guards the state: held, grant, error words, keepalive fields.
 * Store calls are made holding io but not mu, so remaining() and
 * grant_get() never wait for the store.
 *
 * Keepalive: the refresh is an operation (ka.op, embedded: no allocation)
 * on the caller's queue. The library's timer thread (timer.c) enqueues it
 * when due, and independently calls lost(UNREACHABLE) at
 * acquired + lease - margin - guard when no refresh has confirmed the
 * lease by then, so a refresh stuck in I/O cannot make the callback late.
 * A refresh answered ENOLCK calls lost(TAKEN) on the runner at once.
 */
#include "internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__has_include)
#if __has_include(<sys/random.h>)
#include <sys/random.h>
#define OPQ_HAVE_GETRANDOM 1
#endif
#endif

#define NS_PER_S 1000000000LL
#define ERR_MAX 256

struct opq_lease_attr {
	char owner[OPQ_LEASE_OWNER_MAX + 1];
	int64_t lease_ns;
	int64_t ppm, fixed_ns;
	int64_t poll_min, poll_max;
	size_t data_len;
	unsigned char data[OPQ_LEASE_DATA_MAX];
};

struct opq_lease_provider {
	opq_lease_provider_ops ops;
	void *store;
	pthread_mutex_t mu;
	unsigned long users; /* lease handles on this provider */
};

struct keepalive {
	bool on;       /* started and not yet cleaned up (holds a timer reference) */
	bool ended;    /* lost was called or stop began: no more refreshes */
	bool stopping; /* a stop is cleaning up */
	bool op_busy;  /* op is queued or being performed */
	bool in_lost;  /* the lost callback is running on lost_thread */
	pthread_t lost_thread;
	opq_queue *queue;
	int64_t interval_ns;
	opq_lease_lost_fn *lost;
	void *arg;
	int64_t refresh_at; /* next refresh (monotonic ns) */
	int64_t lost_at;    /* lost(UNREACHABLE) unless confirmed by then */
	opq_op op;
	struct opq__timer timer;
};

struct opq_lease {
	opq_lease_provider *provider;
	char name[OPQ_LEASE_NAME_MAX + 1];
	struct opq_lease_attr a;
	int64_t margin_ns;
	pthread_mutex_t ka_mu, io, mu;
	pthread_cond_t cv; /* keepalive: op_busy or in_lost went false */
	bool held;
	opq_lease_grant grant;
	int64_t grant_suspended; /* opq__suspended_ns() at grant.acquired */
	uint64_t rng;
	char err[ERR_MAX];
	struct keepalive ka;
};

/* A suspend of the system shorter than this is taken as no suspend (see
 * opq_lease_remaining); the margin covers it. */
#define SUSPEND_MIN_NS 1000000

/* ---- small helpers ------------------------------------------------------- */

static void random_bytes(void *buf, size_t len)
{
	size_t got = 0;
#ifdef OPQ_HAVE_GETRANDOM
	while (got < len) {
		ssize_t n = getrandom((char *)buf + got, len - got, 0);
		if (n <= 0)
			break;
		got += (size_t)n;
	}
#endif
	if (got < len) {
		int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			while (got < len) {
				ssize_t n = read(fd, (char *)buf + got, len - got);
				if (n <= 0)
					break;
				got += (size_t)n;
			}
			close(fd);
		}
	}
	if (got < len) { /* last resort: time and addresses, mixed */
		uint64_t x = (uint64_t)opq__mono_ns() ^ ((uint64_t)getpid() << 32) ^
			     (uint64_t)(uintptr_t)buf;
		for (size_t i = got; i < len; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			((unsigned char *)buf)[i] = (unsigned char)x;
		}
	}
}

static uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s ? *s : 0x9e3779b97f4a7c15ULL;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* 1..max bytes and no more: the length, or 0 when empty or too long. */
static size_t str_ok(const char *s, size_t max)
{
	if (!s)
		return 0;
	size_t n = strnlen(s, max + 1);
	return n >= 1 && n <= max ? n : 0;
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

static int64_t sat_add(int64_t a, int64_t b)
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

/* ---- attributes ------------------------------------------------------------ */

static void attr_defaults(struct opq_lease_attr *a)
{
	memset(a, 0, sizeof(*a));
	char host[128];
	if (gethostname(host, sizeof(host)) != 0)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	uint64_t r;
	random_bytes(&r, sizeof(r));
	snprintf(a->owner, sizeof(a->owner), "%s:%ld:%016llx", host, (long)getpid(),
		 (unsigned long long)r);
	a->lease_ns = 10 * NS_PER_S;
	a->ppm = 10000;
	a->fixed_ns = 10000000;
	a->poll_min = 10000000;
	a->poll_max = NS_PER_S;
}

OPQ_EXPORT int opq_lease_attr_create(opq_lease_attr **attr)
{
	if (!attr)
		return EINVAL;
	struct opq_lease_attr *a = opq__malloc(sizeof(*a));
	if (!a)
		return ENOMEM;
	attr_defaults(a);
	*attr = a;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_destroy(opq_lease_attr *attr)
{
	if (!attr)
		return EINVAL;
	opq__free(attr);
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_owner(opq_lease_attr *attr, const char *owner)
{
	size_t n = str_ok(owner, OPQ_LEASE_OWNER_MAX);
	if (!attr || !n)
		return EINVAL;
	memcpy(attr->owner, owner, n + 1);
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_duration(opq_lease_attr *attr, int64_t lease_ns)
{
	if (!attr || lease_ns <= 0)
		return EINVAL;
	attr->lease_ns = lease_ns;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_margin(opq_lease_attr *attr, int64_t ppm, int64_t fixed_ns)
{
	if (!attr || ppm < 0 || fixed_ns < 0)
		return EINVAL;
	attr->ppm = ppm;
	attr->fixed_ns = fixed_ns;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_poll(opq_lease_attr *attr, int64_t min_ns, int64_t max_ns)
{
	if (!attr || min_ns <= 0 || max_ns < min_ns)
		return EINVAL;
	attr->poll_min = min_ns;
	attr->poll_max = max_ns;
	return 0;
}

OPQ_EXPORT int opq_lease_attr_set_data(opq_lease_attr *attr, const void *data, size_t len)
{
	if (!attr || len > OPQ_LEASE_DATA_MAX || (len && !data))
		return EINVAL;
	if (len)
		memcpy(attr->data, data, len);
	attr->data_len = len;
	return 0;
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
		return EINVAL;
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
	size_t n = str_ok(name, OPQ_LEASE_NAME_MAX);
	if (!lease || !provider || !n)
		return EINVAL;
	struct opq_lease_attr defaults;
	if (!attr) {
		attr_defaults(&defaults);
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
	memcpy(l->name, name, n + 1);
	l->a = *attr;
	l->margin_ns = margin;
	random_bytes(&l->rng, sizeof(l->rng));
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

static bool in_own_lost(opq_lease *l)
{
	opq__lock(&l->mu);
	bool self = l->ka.in_lost && pthread_equal(l->ka.lost_thread, pthread_self());
	opq__unlock(&l->mu);
	return self;
}

static void ka_stop_locked(opq_lease *l);

OPQ_EXPORT int opq_lease_destroy(opq_lease *lease)
{
	if (!lease)
		return EINVAL;
	if (in_own_lost(lease))
		return EDEADLK;
	opq__lock(&lease->ka_mu);
	ka_stop_locked(lease);
	opq__unlock(&lease->ka_mu);
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
 * One store call (io held by the caller). *before is the instant taken
 * just before the request. A provider's answer outside the errno range is
 * made EIO; store failures leave their words in the handle.
 */
static int store_call(opq_lease *l, enum call what, uint64_t token, uint64_t *out,
		      struct timespec *before, int64_t *suspended)
{
	char words[ERR_MAX];
	words[0] = '\0';
	opq_lease_request req = {
		.name = l->name,
		.owner = l->a.owner,
		.lease_ns = l->a.lease_ns,
		.data = l->a.data_len ? l->a.data : NULL,
		.data_len = l->a.data_len,
		.token = token,
		.errbuf = words,
		.errlen = sizeof(words),
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
			(what == CALL_REFRESH && rc == ENOLCK);
	if (!expected)
		set_err(l, rc, words);
	return rc;
}

OPQ_EXPORT int opq_lease_try_acquire(opq_lease *lease, opq_lease_grant *grant)
{
	if (!lease)
		return EINVAL;
	opq__lock(&lease->io);
	uint64_t token;
	struct timespec before;
	int64_t suspended;
	int rc = store_call(lease, CALL_ACQUIRE, 0, &token, &before, &suspended);
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

OPQ_EXPORT int opq_lease_acquire(opq_lease *lease, const struct timespec *deadline,
				 opq_lease_grant *grant)
{
	if (!lease || !opq__deadline_ok(deadline))
		return EINVAL;
	int64_t end = deadline ? opq__ts_to_ns(deadline) : INT64_MAX;
	int64_t step = lease->a.poll_min;
	for (;;) {
		int rc = opq_lease_try_acquire(lease, grant);
		if (rc == 0 || rc == EINVAL)
			return rc;
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
		int64_t at = sat_add(now, wait);
		if (at > end)
			at = end;
		struct timespec ts = opq__ns_to_ts(at);
		/* Inside a scope task a cancel ends the wait (cancel.c). */
		int src = opq__cancel_sleep_until(&ts);
		if (src != ETIMEDOUT)
			return src;
		step = step > lease->a.poll_max / 2 ? lease->a.poll_max : step * 2;
	}
}

/* The refresh itself, shared by the public call and the keepalive. */
static int do_refresh(opq_lease *lease, opq_lease_grant *grant)
{
	opq__lock(&lease->io);
	opq__lock(&lease->mu);
	bool held = lease->held;
	uint64_t token = lease->grant.token;
	opq__unlock(&lease->mu);
	int rc = ENOLCK;
	if (held) {
		struct timespec before;
		int64_t suspended;
		rc = store_call(lease, CALL_REFRESH, token, NULL, &before, &suspended);
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
	return do_refresh(lease, grant);
}

OPQ_EXPORT int opq_lease_release(opq_lease *lease)
{
	if (!lease)
		return EINVAL;
	/* A keepalive would only find the lease gone: stop it first (from the
	 * lost callback it has already ended). */
	if (!in_own_lost(lease)) {
		opq__lock(&lease->ka_mu);
		ka_stop_locked(lease);
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
		rc = store_call(lease, CALL_RELEASE, token, NULL, &before, NULL);
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
		int64_t end = sat_add(opq__ts_to_ns(&lease->grant.acquired),
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

/* ---- keepalive --------------------------------------------------------------- */

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
	struct keepalive *k = &l->ka;
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
	struct keepalive *k = &l->ka;
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
	struct keepalive *k = &l->ka;
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
			k->refresh_at = sat_add(now, ka_retry(l));
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
	struct keepalive *k = &l->ka;
	opq__lock(&l->mu);
	bool skip = k->ended || k->stopping;
	opq__unlock(&l->mu);
	opq_lease_grant g;
	int rc = skip ? 0 : do_refresh(l, &g);
	opq__lock(&l->mu);
	if (!skip && !k->ended && !k->stopping) {
		if (rc == 0) {
			int64_t acquired = opq__ts_to_ns(&g.acquired);
			k->lost_at = sat_add(acquired, g.lease_ns - l->margin_ns - ka_guard(l));
			k->refresh_at = sat_add(acquired, k->interval_ns);
		} else if (rc == ENOLCK) {
			ka_call_lost(l, OPQ_LEASE_TAKEN);
		} else {
			k->refresh_at = sat_add(opq__mono_ns(), ka_retry(l));
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
	struct keepalive *k = &l->ka;
	opq__lock(&l->mu);
	k->op_busy = false;
	k->refresh_at = sat_add(opq__mono_ns(), ka_retry(l));
	ka_rearm(l);
	OPQ_CHECK(pthread_cond_broadcast(&l->cv));
	opq__unlock(&l->mu);
}

/* Stop and clean up the keepalive, if any (ka_mu held, not from lost). */
static void ka_stop_locked(opq_lease *l)
{
	struct keepalive *k = &l->ka;
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
	if (in_own_lost(lease))
		return EDEADLK;
	struct keepalive *k = &lease->ka;
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
		ka_stop_locked(lease);
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
	k->lost_at = sat_add(acquired, lease->grant.lease_ns - lease->margin_ns - ka_guard(lease));
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
		k->refresh_at = sat_add(k->refresh_at, ka_retry(lease));
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
	if (in_own_lost(lease))
		return EDEADLK;
	opq__lock(&lease->ka_mu);
	ka_stop_locked(lease);
	opq__unlock(&lease->ka_mu);
	return 0;
}

/* ---- the memory provider ------------------------------------------------------ */

#define MEM_BUCKETS 64

struct mem_rec {
	struct mem_rec *next;
	bool held;
	uint64_t token; /* the last token minted for this name */
	int64_t expiry; /* CLOCK_MONOTONIC ns */
	size_t data_len;
	char name[OPQ_LEASE_NAME_MAX + 1];
	char owner[OPQ_LEASE_OWNER_MAX + 1];
	unsigned char data[OPQ_LEASE_DATA_MAX];
};

struct mem_store {
	pthread_mutex_t mu;
	struct mem_rec *bucket[MEM_BUCKETS];
};

static struct mem_rec **mem_slot(struct mem_store *s, const char *name)
{
	uint64_t h = 1469598103934665603ULL;
	for (const unsigned char *p = (const unsigned char *)name; *p; p++)
		h = (h ^ *p) * 1099511628211ULL;
	struct mem_rec **pp = &s->bucket[h % MEM_BUCKETS];
	while (*pp && strcmp((*pp)->name, name) != 0)
		pp = &(*pp)->next;
	return pp;
}

static bool mem_live(const struct mem_rec *r, int64_t now)
{
	return r->held && now < r->expiry;
}

static int mem_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	struct mem_store *s = store;
	opq__lock(&s->mu);
	struct mem_rec **pp = mem_slot(s, req->name);
	struct mem_rec *r = *pp;
	if (!r) {
		r = opq__calloc(1, sizeof(*r));
		if (!r) {
			opq__unlock(&s->mu);
			snprintf(req->errbuf, req->errlen, "memory lease store: out of memory");
			return ENOMEM;
		}
		snprintf(r->name, sizeof(r->name), "%s", req->name);
		*pp = r;
	}
	int64_t now = opq__mono_ns();
	bool mine = strcmp(r->owner, req->owner) == 0;
	if (mem_live(r, now) && !mine) {
		opq__unlock(&s->mu);
		return EBUSY;
	}
	if (!mem_live(r, now)) { /* free, released or expired: a new token */
		r->token++;
		r->held = true;
		snprintf(r->owner, sizeof(r->owner), "%s", req->owner);
	}
	r->expiry = sat_add(now, req->lease_ns);
	r->data_len = req->data_len;
	if (req->data_len)
		memcpy(r->data, req->data, req->data_len);
	*token = r->token;
	opq__unlock(&s->mu);
	return 0;
}

static int mem_refresh(void *store, const opq_lease_request *req)
{
	struct mem_store *s = store;
	opq__lock(&s->mu);
	struct mem_rec *r = *mem_slot(s, req->name);
	int64_t now = opq__mono_ns();
	int rc = ENOLCK;
	if (r && mem_live(r, now) && r->token == req->token && strcmp(r->owner, req->owner) == 0) {
		r->expiry = sat_add(now, req->lease_ns);
		rc = 0;
	}
	opq__unlock(&s->mu);
	return rc;
}

static int mem_release(void *store, const opq_lease_request *req)
{
	struct mem_store *s = store;
	opq__lock(&s->mu);
	struct mem_rec *r = *mem_slot(s, req->name);
	if (r && r->held && r->token == req->token && strcmp(r->owner, req->owner) == 0) {
		r->held = false;
		r->data_len = 0;
	}
	opq__unlock(&s->mu);
	return 0;
}

static void mem_destroy(void *store)
{
	struct mem_store *s = store;
	for (int i = 0; i < MEM_BUCKETS; i++) {
		struct mem_rec *r = s->bucket[i];
		while (r) {
			struct mem_rec *next = r->next;
			opq__free(r);
			r = next;
		}
	}
	OPQ_CHECK(pthread_mutex_destroy(&s->mu));
	opq__free(s);
}

OPQ_EXPORT int opq_lease_provider_memory(opq_lease_provider **provider)
{
	if (!provider)
		return EINVAL;
	struct mem_store *s = opq__calloc(1, sizeof(*s));
	if (!s)
		return ENOMEM;
	int rc = opq__mutex_init(&s->mu);
	if (rc) {
		opq__free(s);
		return rc;
	}
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	ops.acquire = mem_acquire;
	ops.refresh = mem_refresh;
	ops.release = mem_release;
	ops.destroy = mem_destroy;
	rc = opq_lease_provider_create(provider, &ops, s);
	if (rc) {
		OPQ_CHECK(pthread_mutex_destroy(&s->mu));
		opq__free(s);
	}
	return rc;
}
