/*
 * The lease under stress, on the memory provider ("lease"), on the SQLite
 * provider with a database file of its own ("lease_sqlite", when the build
 * has it), on the PostgreSQL provider on the server that OPQ_PG_CONNINFO
 * names ("lease_pg", when the build has it; only when -m names it, as
 * tests/pgserver.sh does with a server of its own) and on the etcd provider
 * (lease_etcd.c, through stress_lease_setup_remote): every worker has its own
 * handle (its own owner) on each of a few lock names, with short leases
 * (2..20 ms), and makes random try_acquire / acquire with short deadlines /
 * refresh / release / remaining / grant_get / keepalive start and stop
 * calls; the keepalives run as operations on one shared queue.
 *
 * Holding intervals: a holder believes it holds the lock from the instant
 * its acquire returned until the last `now + remaining(now)` it observed
 * (cut at the instant before its release). For every name the tool keeps
 * each handle's current interval and the last PAST finished ones and checks
 * at every observation, against all of them:
 *   - two intervals with different tokens never overlap (at most one holder
 *     that believes remaining() > 0 at any instant);
 *   - of two such intervals, the earlier one has the smaller token (tokens
 *     strictly increase across grants), and one token never goes to two
 *     owners;
 *   - a refresh never changes the token; a second release returns 0 and
 *     leaves nothing held; a refresh of a handle that holds nothing is
 *     ENOLCK; a blocking acquire never returns EBUSY;
 *   - a keepalive calls its lost callback at most once (and the callback
 *     gets EDEADLK for a stop of its own keepalive).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stress.h"
#ifdef HAVE_SQLITE3
#include <opqueue/lease_sqlite.h>
#endif
#ifdef HAVE_LIBPQ
#include <opqueue/lease_pg.h>
#endif

#define NNAMES 3
#define PAST   64

struct ival {
	uint64_t token; /* 0: none */
	unsigned owner;
	int64_t start, end; /* monotonic ns; empty when end <= start */
};

struct lname {
	pthread_mutex_t mu;
	struct ival *cur; /* one per worker */
	struct ival past[PAST];
	unsigned npast;
	uint64_t max_token;
};

struct lh;

/* One keepalive (one successful start): the lost callback's argument. */
struct karec {
	struct lh *h;
	atomic_int lost;      /* lost callbacks of this keepalive */
	atomic_int lost_stop; /* keepalive_stop inside the callback: 1 EDEADLK, 2 other */
};

/* One worker's handle on one name. */
struct lh {
	opq_lease *lease;
	unsigned worker, name;
	struct karec *ka; /* the keepalive started last, until stopped or released */
	struct lmod *m;
};

struct lmod {
	const char *name;    /* the module's */
	bool remote;         /* the store is a server: its failures are results, not violations */
	bool slow;           /* the store may run out of a call's time: ETIMEDOUT, EAGAIN */
	char path[PATH_MAX]; /* the SQLite database, or "" */
	opq_lease_provider *prov;
	opq_queue *q;
	unsigned threads;
	struct lname names[NNAMES];
	struct lh *h; /* threads * NNAMES */
	_Atomic uint64_t calls, grants, busy, timeouts, refreshes, enolck, releases;
	_Atomic uint64_t observations, ka_starts, ka_stops, lost_unreach, lost_taken;
	_Atomic uint64_t overlaps_checked, store_errors;
};

#define CALL(m) atomic_fetch_add_explicit(&(m)->calls, 1, memory_order_relaxed)
#define INC(x)  atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)

static const char *const lock_names[NNAMES] = {"stress-a", "stress-b", "stress-c"};

/*
 * A failure of the store itself (a timeout, a lost connection: EIO,
 * ETIMEDOUT, ECONNREFUSED...), which try_acquire, refresh and release may
 * return from a store on a server (opq_lease_acquire(3)): counted there,
 * a violation anywhere else. A store call that runs out of its time (one
 * lease time, 2 to 20 ms here, or the lease's local end: less than an
 * SQLite commit takes when 8 threads queue for one connection on a busy
 * disk) fails with ETIMEDOUT or EAGAIN: counted too, for SQLite.
 */
static bool store_failed(struct lmod *m, int rc)
{
	bool other = rc != 0 && rc != EBUSY && rc != ENOLCK && rc != EINVAL && rc != EDEADLK;
	bool failed = other && (m->remote || (m->slow && (rc == ETIMEDOUT || rc == EAGAIN)));
	if (failed)
		atomic_fetch_add_explicit(&m->store_errors, 1, memory_order_relaxed);
	return failed;
}

static bool nonempty(const struct ival *v)
{
	return v->token && v->end > v->start;
}

/* Check x against y (under the name's mutex). */
static void check_pair(struct lmod *m, unsigned n, const struct ival *x, const struct ival *y)
{
	if (!x->token || !y->token)
		return;
	if (x->token == y->token) {
		if (x->owner != y->owner)
			stress_fail(m->name, "%s: token %" PRIu64 " granted to workers %u and %u",
			            lock_names[n], x->token, x->owner, y->owner);
		return;
	}
	if (!nonempty(x) || !nonempty(y))
		return;
	INC(m->overlaps_checked);
	int64_t s = x->start > y->start ? x->start : y->start;
	int64_t e = x->end < y->end ? x->end : y->end;
	if (s < e)
		stress_fail(m->name,
		            "%s: worker %u (token %" PRIu64 ") and worker %u (token %" PRIu64
		            ") both believed they held it for %" PRId64 " ns",
		            lock_names[n], x->owner, x->token, y->owner, y->token, e - s);
	else if ((x->end <= y->start) != (x->token < y->token))
		stress_fail(m->name,
		            "%s: token %" PRIu64 " (worker %u) and token %" PRIu64
		            " (worker %u) out of order with their holding intervals",
		            lock_names[n], x->token, x->owner, y->token, y->owner);
}

static void check_against_all(struct lmod *m, unsigned n, const struct ival *x)
{
	struct lname *ln = &m->names[n];
	for (unsigned o = 0; o < m->threads; o++)
		if (&ln->cur[o] != x)
			check_pair(m, n, x, &ln->cur[o]);
	unsigned np = ln->npast < PAST ? ln->npast : PAST;
	for (unsigned i = 0; i < np; i++)
		check_pair(m, n, x, &ln->past[i]);
}

/*
 * Record that worker w holds token on name n from `start` (when the grant
 * is new) until at least `end`; cut: the holder stopped believing at `end`
 * (a release).
 */
static void record(struct lmod *m, unsigned w, unsigned n, uint64_t token, int64_t start,
                   int64_t end, bool cut)
{
	struct lname *ln = &m->names[n];
	pthread_mutex_lock(&ln->mu);
	struct ival *c = &ln->cur[w];
	if (cut) {
		if (c->token == token && c->end > end)
			c->end = end;
		pthread_mutex_unlock(&ln->mu);
		return;
	}
	if (c->token != token) {
		if (c->token) {
			if (token < c->token)
				stress_fail(m->name,
				            "%s: worker %u got token %" PRIu64 " after %" PRIu64,
				            lock_names[n], w, token, c->token);
			ln->past[ln->npast++ % PAST] = *c;
		}
		c->token = token;
		c->owner = w;
		c->start = start;
		c->end = end;
		if (token > ln->max_token)
			ln->max_token = token;
	} else if (end > start && end > c->end) {
		/* Only a belief extends it: a grant that came back already
		 * expired (empty) must not stretch the old one to its return. */
		c->end = end;
	}
	check_against_all(m, n, c);
	pthread_mutex_unlock(&ln->mu);
}

/* Ask the handle how long it may still act and record the belief. */
static void observe(struct lmod *m, struct lh *h, int64_t start_if_new)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	int64_t t = (int64_t)now.tv_sec * 1000000000LL + now.tv_nsec;
	int64_t left = -1;
	CALL(m);
	int rc = opq_lease_remaining(h->lease, &now, &left);
	INC(m->observations);
	if (rc || left < 0)
		stress_fail(m->name, "remaining returned %d, %" PRId64 " ns", rc, left);
	if (left <= 0)
		return;
	opq_lease_grant g;
	CALL(m);
	rc = opq_lease_grant_get(h->lease, &g);
	if (rc == ENOLCK)
		return; /* a keepalive refresh found it taken meanwhile */
	if (rc || g.token == 0)
		stress_fail(m->name, "grant_get returned %d, token %" PRIu64, rc, g.token);
	record(m, h->worker, h->name, g.token, start_if_new >= 0 ? start_if_new : t, t + left,
	       false);
}

/* After a successful acquire: the grant is new from the instant it returned. */
static void granted(struct lmod *m, struct lh *h, const opq_lease_grant *g)
{
	int64_t ret = stress_now();
	INC(m->grants);
	if (g->token == 0)
		stress_fail(m->name, "a grant with token 0");
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	int64_t t = (int64_t)now.tv_sec * 1000000000LL + now.tv_nsec, left = 0;
	CALL(m);
	opq_lease_remaining(h->lease, &now, &left);
	/* Record even an empty interval: the token is checked for uniqueness. */
	record(m, h->worker, h->name, g->token, ret, left > 0 ? t + left : ret, false);
}

static void lost_cb(opq_lease *lease, enum opq_lease_lost_reason why, void *arg)
{
	struct karec *k = arg;
	struct lh *h = k->h;
	struct lmod *m = h->m;
	if (lease != h->lease)
		stress_fail(m->name, "lost callback for another handle");
	if (why == OPQ_LEASE_UNREACHABLE)
		INC(m->lost_unreach);
	else if (why == OPQ_LEASE_TAKEN)
		INC(m->lost_taken);
	else
		stress_fail(m->name, "lost callback with reason %d", (int)why);
	if (atomic_fetch_add(&k->lost, 1) != 0)
		stress_fail(m->name, "worker %u, %s: a keepalive called lost twice", h->worker,
		            lock_names[h->name]);
	CALL(m);
	atomic_store(&k->lost_stop, opq_lease_keepalive_stop(lease) == EDEADLK ? 1 : 2);
}

/* Remove the SQLite database made for the run, and its side files. */
static void remove_db(struct lmod *m)
{
	if (!m->path[0])
		return;
	static const char *const suffix[] = {"", "-wal", "-shm", "-journal"};
	for (size_t i = 0; i < sizeof(suffix) / sizeof(suffix[0]); i++) {
		char f[sizeof(m->path) + 16];
		snprintf(f, sizeof(f), "%s%s", m->path, suffix[i]);
		unlink(f);
	}
	m->path[0] = '\0';
}

/* The lease times the handles draw from, by default: short, so that they run out. */
static const int64_t short_leases[4] = {2000000, 5000000, 10000000, 20000000};

static int setup_on(struct lmod *m, unsigned threads, uint64_t seed, const int64_t leases[4])
{
	m->threads = threads;
	int rc;
	if ((rc = opq_queue_create(&m->q, NULL)) || (rc = opq_queue_start(m->q, 2)))
		return rc;
	for (unsigned n = 0; n < NNAMES; n++) {
		pthread_mutex_init(&m->names[n].mu, NULL);
		m->names[n].cur = calloc(threads, sizeof(struct ival));
		if (!m->names[n].cur)
			return ENOMEM;
	}
	m->h = calloc((size_t)threads * NNAMES, sizeof(*m->h));
	if (!m->h)
		return ENOMEM;
	struct stress_rng r = {seed};
	for (unsigned w = 0; w < threads; w++) {
		for (unsigned n = 0; n < NNAMES; n++) {
			struct lh *h = &m->h[w * NNAMES + n];
			h->worker = w;
			h->name = n;
			h->m = m;
			opq_lease_attr *a;
			char owner[32];
			snprintf(owner, sizeof(owner), "stress-worker-%u", w);
			if ((rc = opq_lease_attr_create(&a)))
				return rc;
			if ((rc = opq_lease_attr_set_owner(a, owner)) ||
			    (rc = opq_lease_attr_set_duration(a, leases[stress_below(&r, 4)])) ||
			    (rc = opq_lease_attr_set_margin(a, 1000, 100000)) ||
			    (rc = opq_lease_attr_set_poll(a, 100000, 1000000)) ||
			    (rc = opq_lease_attr_set_data(a, owner, strlen(owner))) ||
			    (rc = opq_lease_create(&h->lease, m->prov, lock_names[n], a)))
				return rc;
			opq_lease_attr_destroy(a);
		}
	}
	return 0;
}

static int setup(void **statep, unsigned threads, uint64_t seed)
{
	struct lmod *m = calloc(1, sizeof(*m));
	if (!m)
		return ENOMEM;
	m->name = "lease";
	int rc = opq_lease_provider_memory_create(&m->prov);
	if (rc || (rc = setup_on(m, threads, seed, short_leases)))
		return rc;
	*statep = m;
	return 0;
}

/* A keepalive that has ended and been cleaned up: check it, free it. */
static void ka_done(struct karec *k)
{
	if (!k)
		return;
	struct lmod *m = k->h->m;
	if (atomic_load(&k->lost) > 1)
		stress_fail(m->name, "a keepalive called lost %d times", atomic_load(&k->lost));
	if (atomic_load(&k->lost_stop) == 2)
		stress_fail(m->name, "keepalive_stop from the lost callback was not EDEADLK");
	free(k);
}

static void ka_start(struct lmod *m, struct lh *h, struct stress_rng *r)
{
	struct karec *k = calloc(1, sizeof(*k));
	if (!k)
		return;
	k->h = h;
	int64_t interval = stress_pct(r, 50) ? 0 : 500000;
	bool ended = h->ka && atomic_load(&h->ka->lost) > 0;
	CALL(m);
	/* Half on the keepalive's own thread, half as operations on the queue. */
	opq_queue *kq = stress_pct(r, 50) ? NULL : m->q;
	int rc = opq_lease_keepalive_start(h->lease, kq, interval, lost_cb, k);
	INC(m->ka_starts);
	if (rc == 0) {
		if (h->ka && !ended && atomic_load(&h->ka->lost) == 0)
			stress_fail(m->name, "keepalive_start: 0 while one was running");
		ka_done(h->ka); /* the start cleaned up the one that ended */
		h->ka = k;
		return;
	}
	free(k);
	if (rc == EBUSY) {
		if (!h->ka || ended)
			stress_fail(m->name, "keepalive_start: EBUSY with none running");
	} else if (rc == EINVAL && interval) {
		/* 500 us is not below lease - margin for this handle: fine */
	} else if (rc != ENOLCK) {
		stress_fail(m->name, "keepalive_start returned %d", rc);
	}
}

static void ka_stop(struct lmod *m, struct lh *h)
{
	CALL(m);
	int rc = opq_lease_keepalive_stop(h->lease);
	INC(m->ka_stops);
	if (rc)
		stress_fail(m->name, "keepalive_stop returned %d", rc);
	ka_done(h->ka);
	h->ka = NULL;
}

static void release(struct lmod *m, struct lh *h, struct stress_rng *r)
{
	opq_lease_grant g;
	int grc = opq_lease_grant_get(h->lease, &g);
	int64_t before = stress_now();
	if (grc == 0)
		record(m, h->worker, h->name, g.token, 0, before, true);
	CALL(m);
	int rc = opq_lease_release(h->lease);
	INC(m->releases);
	/* After a failed release the lease may still be held at the store and
	 * the handle keeps its grant: try again while it has time left. */
	int64_t left = -1;
	bool ran_out = false;
	while (!ran_out && store_failed(m, rc)) {
		opq_lease_remaining(h->lease, NULL, &left);
		ran_out = left == 0;
		if (!ran_out) {
			CALL(m);
			rc = opq_lease_release(h->lease);
		}
	}
	/* Release stopped the keepalive, also when it failed. */
	ka_done(h->ka);
	h->ka = NULL;
	if (ran_out)
		return; /* nobody acts on it any more */
	if (rc)
		stress_fail(m->name, "release returned %d", rc);
	if (stress_pct(r, 30)) {
		CALL(m);
		if ((rc = opq_lease_release(h->lease)) != 0)
			stress_fail(m->name, "a second release returned %d", rc);
	}
	CALL(m);
	opq_lease_remaining(h->lease, NULL, &left);
	CALL(m);
	if (left != 0 || opq_lease_grant_get(h->lease, &g) != ENOLCK)
		stress_fail(m->name, "after release: remaining %" PRId64 ", still a grant", left);
	if (stress_pct(r, 30)) {
		CALL(m);
		if ((rc = opq_lease_refresh(h->lease, NULL)) != ENOLCK)
			stress_fail(m->name, "refresh after release returned %d, not ENOLCK", rc);
		INC(m->enolck);
	}
}

static void step(void *state, struct stress_worker *w)
{
	struct lmod *m = state;
	struct stress_rng *r = &w->rng;
	struct lh *h = &m->h[w->index * NNAMES + stress_below(r, NNAMES)];
	unsigned action = stress_below(r, 100);
	opq_lease_grant g;
	int rc;
	if (action < 30) {
		CALL(m);
		rc = opq_lease_try_acquire(h->lease, &g);
		if (rc == 0)
			granted(m, h, &g);
		else if (rc == EBUSY)
			INC(m->busy);
		else if (!store_failed(m, rc))
			stress_fail(m->name, "try_acquire returned %d", rc);
	} else if (action < 45) {
		struct timespec dl = stress_after((int64_t)stress_below(r, 3000000));
		CALL(m);
		rc = opq_lease_acquire(h->lease, &dl, &g);
		if (rc == 0)
			granted(m, h, &g);
		else if (rc == ETIMEDOUT)
			INC(m->timeouts);
		else
			stress_fail(m->name, "acquire returned %d", rc);
	} else if (action < 60) {
		opq_lease_grant before;
		int had = opq_lease_grant_get(h->lease, &before);
		CALL(m);
		rc = opq_lease_refresh(h->lease, &g);
		INC(m->refreshes);
		if (rc == 0) {
			if (had != 0)
				stress_fail(m->name,
				            "refresh succeeded on a handle holding nothing");
			else if (g.token != before.token)
				stress_fail(m->name,
				            "refresh changed the token from %" PRIu64
				            " to %" PRIu64,
				            before.token, g.token);
		} else if (rc == ENOLCK) {
			INC(m->enolck);
		} else if (!store_failed(m, rc)) {
			stress_fail(m->name, "refresh returned %d", rc);
		}
	} else if (action < 72) {
		release(m, h, r);
	} else if (action < 86) {
		/* Hold for a while, asking how long is left. */
		for (unsigned k = 1 + stress_below(r, 4); k > 0; k--) {
			observe(m, h, -1);
			sched_yield();
		}
	} else if (action < 94) {
		ka_start(m, h, r);
	} else {
		ka_stop(m, h);
	}
	observe(m, h, -1);
}

static void check(void *state)
{
	struct lmod *m = state;
	int64_t now = stress_now();
	for (unsigned n = 0; n < NNAMES; n++) {
		struct lname *ln = &m->names[n];
		pthread_mutex_lock(&ln->mu);
		unsigned believers = 0;
		for (unsigned w = 0; w < m->threads; w++)
			if (nonempty(&ln->cur[w]) && ln->cur[w].start <= now &&
			    now < ln->cur[w].end)
				believers++;
		pthread_mutex_unlock(&ln->mu);
		if (believers > 1)
			stress_fail(m->name, "%s: %u holders believe they hold it now",
			            lock_names[n], believers);
	}
}

static void teardown(void *state, FILE *out)
{
	struct lmod *m = state;
	unsigned nh = m->threads * NNAMES;
	for (unsigned i = 0; i < nh; i++) {
		ka_stop(m, &m->h[i]);
		/* A release is bounded by one lease time (2 to 20 ms), which a
		 * store on a server may not keep (a new connection can take
		 * longer): it is asked again for up to a second, and a store
		 * failure then is counted, not a violation; the lease runs out. */
		int rc;
		int64_t give_up = stress_now() + 1000000000;
		for (;;) {
			CALL(m);
			rc = opq_lease_release(m->h[i].lease);
			if (!rc || !store_failed(m, rc) || stress_now() >= give_up)
				break;
			struct timespec nap = {0, 1000000};
			nanosleep(&nap, NULL);
		}
		if (rc && !store_failed(m, rc))
			stress_fail(m->name, "release at the end failed: %d", rc);
		if (rc)
			continue;
		CALL(m);
		if (opq_lease_keepalive_start(m->h[i].lease, m->q, 0, lost_cb, NULL) != ENOLCK) {
			stress_fail(m->name, "keepalive_start on a released handle was not ENOLCK");
			opq_lease_keepalive_stop(m->h[i].lease);
		}
	}
	CALL(m);
	if (opq_lease_provider_destroy(m->prov) != EBUSY)
		stress_fail(m->name, "provider_destroy with live handles was not EBUSY");
	for (unsigned i = 0; i < nh; i++)
		if (opq_lease_destroy(m->h[i].lease))
			stress_fail(m->name, "destroy failed");
	if (opq_lease_provider_destroy(m->prov))
		stress_fail(m->name, "provider_destroy failed");
	remove_db(m);
	opq_queue_stop(m->q, OPQ_STOP_DRAIN);
	opq_queue_destroy(m->q);
	for (unsigned n = 0; n < NNAMES; n++)
		fprintf(out, "%s %s: %" PRIu64 " tokens\n", m->name, lock_names[n],
		        m->names[n].max_token);
	fprintf(out,
	        "%s: %" PRIu64 " grants, %" PRIu64 " EBUSY, %" PRIu64 " acquire timeouts, %" PRIu64
	        " refreshes (%" PRIu64 " ENOLCK), %" PRIu64 " releases, %" PRIu64
	        " observations, %" PRIu64 " interval pairs checked, %" PRIu64
	        " keepalive starts, %" PRIu64 " stops, lost %" PRIu64 " unreachable + %" PRIu64
	        " taken, %" PRIu64 " store failures\n",
	        m->name, (uint64_t)m->grants, (uint64_t)m->busy, (uint64_t)m->timeouts,
	        (uint64_t)m->refreshes, (uint64_t)m->enolck, (uint64_t)m->releases,
	        (uint64_t)m->observations, (uint64_t)m->overlaps_checked, (uint64_t)m->ka_starts,
	        (uint64_t)m->ka_stops, (uint64_t)m->lost_unreach, (uint64_t)m->lost_taken,
	        (uint64_t)m->store_errors);
	for (unsigned n = 0; n < NNAMES; n++) {
		pthread_mutex_destroy(&m->names[n].mu);
		free(m->names[n].cur);
	}
	free(m->h);
	free(m);
}

static uint64_t calls(void *state)
{
	return atomic_load_explicit(&((struct lmod *)state)->calls, memory_order_relaxed);
}

const struct stress_module stress_lease = {
    .name = "lease",
    .setup = setup,
    .step = step,
    .check = check,
    .teardown = teardown,
    .calls = calls,
};

#ifdef HAVE_SQLITE3
/* The same on the SQLite provider, with a database file made for the run. */
static int setup_sqlite(void **statep, unsigned threads, uint64_t seed)
{
	struct lmod *m = calloc(1, sizeof(*m));
	if (!m)
		return ENOMEM;
	m->name = "lease_sqlite";
	m->slow = true;
	const char *dir = getenv("TMPDIR");
	int n = snprintf(m->path, sizeof(m->path), "%s/opqueue-stress-XXXXXX",
	                 dir && *dir ? dir : "/tmp");
	if (n < 0 || (size_t)n >= sizeof(m->path)) {
		fprintf(stderr, "lease_sqlite: TMPDIR is too long for a path\n");
		free(m);
		return ENAMETOOLONG;
	}
	int fd = mkstemp(m->path);
	if (fd < 0) {
		int e = errno;
		fprintf(stderr, "lease_sqlite: mkstemp %s: %s\n", m->path, strerror(e));
		free(m);
		return e;
	}
	close(fd); /* an empty file is an empty database */
	char err[PATH_MAX + 256];
	int rc = opq_lease_provider_sqlite_create(&m->prov, m->path, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "lease_sqlite: %s\n", err);
		remove_db(m);
		free(m);
		return rc;
	}
	if ((rc = setup_on(m, threads, seed, short_leases))) {
		/* The process exits on a failed setup: only the file must go. */
		remove_db(m);
		return rc;
	}
	*statep = m;
	return 0;
}

const struct stress_module stress_lease_sqlite = {
    .name = "lease_sqlite",
    .setup = setup_sqlite,
    .step = step,
    .check = check,
    .teardown = teardown,
    .calls = calls,
};
#endif

/*
 * A lease module on a provider of a server (lease_pg here, lease_etcd in
 * lease_etcd.c): setup makes one round trip first, so that a server that
 * is not there fails the setup, not the first call of a worker (which would
 * read as a violation). Takes the provider (destroyed on failure).
 */
int stress_lease_setup_remote(void **statep, const char *name, opq_lease_provider *prov,
                              unsigned threads, uint64_t seed, const int64_t leases[4])
{
	struct lmod *m = calloc(1, sizeof(*m));
	if (!m) {
		opq_lease_provider_destroy(prov);
		return ENOMEM;
	}
	m->name = name;
	m->remote = true;
	m->prov = prov;
	opq_lease *probe;
	int rc;
	if ((rc = opq_lease_create(&probe, m->prov, "stress-probe", NULL)))
		return rc;
	rc = opq_lease_try_acquire(probe, NULL);
	if (rc == 0)
		rc = opq_lease_release(probe);
	else if (rc == EBUSY)
		rc = 0; /* another run's probe: the server answered */
	char words[256] = "";
	if (rc)
		opq_lease_error(probe, words, sizeof(words));
	opq_lease_destroy(probe);
	if (rc) {
		fprintf(stderr, "%s: the server: %s: %s\n", name, strerror(rc), words);
		return rc;
	}
	if ((rc = setup_on(m, threads, seed, leases ? leases : short_leases)))
		return rc;
	*statep = m;
	return 0;
}

void stress_lease_step(void *state, struct stress_worker *w)
{
	step(state, w);
}

void stress_lease_check(void *state)
{
	check(state);
}

void stress_lease_teardown(void *state, FILE *out)
{
	teardown(state, out);
}

uint64_t stress_lease_calls(void *state)
{
	return calls(state);
}

#ifdef HAVE_LIBPQ
/* The same on the PostgreSQL provider, on the server OPQ_PG_CONNINFO names. */
static int setup_pg(void **statep, unsigned threads, uint64_t seed)
{
	const char *conninfo = getenv("OPQ_PG_CONNINFO");
	if (!conninfo || !*conninfo) {
		fprintf(stderr, "lease_pg: set OPQ_PG_CONNINFO to a libpq connection string "
		                "(tests/pgserver.sh starts a server and sets it)\n");
		return EINVAL;
	}
	char err[512];
	opq_lease_provider *prov;
	int rc = opq_lease_provider_pg_create(&prov, conninfo, NULL, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "lease_pg: %s\n", err);
		return rc;
	}
	return stress_lease_setup_remote(statep, "lease_pg", prov, threads, seed, NULL);
}

const struct stress_module stress_lease_pg = {
    .name = "lease_pg",
    .setup = setup_pg,
    .step = step,
    .check = check,
    .teardown = teardown,
    .calls = calls,
    .named_only = true,
};
#endif
