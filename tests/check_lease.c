/*
 * check_lease.c: lease locks with fencing tokens: the core and the memory
 * provider (input checks, token rules, takeover at expiry, blocking
 * acquire, mutual exclusion under contention, allocation failures) and
 * the keepalive (keeps a short lease alive; lost(TAKEN) and
 * lost(UNREACHABLE) through a test provider that can fail or hang, fired
 * once and before the local lease end; stop and destroy during a refresh;
 * on the caller's queue and on the keepalive's own thread, which a busy
 * queue cannot starve), and time: the deadline each call hands its
 * provider, and opq_lease_cancel of an acquire in its backoff or in a
 * store call. Links the convenience library for the fault injector.
 */
#define _GNU_SOURCE 1 /* pthread_getname_np */
#include "harness.h"
#include "fault.h"
#include "internal.h"

#include <poll.h>
#include <string.h>

#define MS  1000000LL
#define SEC 1000000000LL

static int64_t ts_ns(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

/* The calling thread's name ("?" when unknown). */
static void thread_name(char *buf, size_t len)
{
	snprintf(buf, len, "?");
#if HAVE_DECL_PTHREAD_SETNAME_NP
	pthread_getname_np(pthread_self(), buf, len);
#endif
}

/* Let time pass (waiting for a lease to run out is the point, not a sync). */
static void pass_ns(int64_t ns)
{
	struct timespec ts = t_deadline(ns);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static opq_lease *mk(opq_lease_provider *p, const char *name, const char *owner, int64_t lease_ns)
{
	opq_lease_attr *a;
	ck_assert_int_eq(opq_lease_attr_create(&a), 0);
	if (owner)
		ck_assert_int_eq(opq_lease_attr_set_owner(a, owner), 0);
	ck_assert_int_eq(opq_lease_attr_set_duration(a, lease_ns), 0);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, 10000, 1 * MS), 0);
	ck_assert_int_eq(opq_lease_attr_set_poll(a, 1 * MS, 20 * MS), 0);
	opq_lease *l = NULL;
	ck_assert_int_eq(opq_lease_create(&l, p, name, a), 0);
	opq_lease_attr_destroy(a);
	return l;
}

/* ---- input checks ----------------------------------------------------------- */

/*
 * The destroys follow the library's one convention: an attribute object's
 * cannot fail and returns void (opq_queue_attr_destroy,
 * opq_scope_attr_destroy); an object's can refuse (EBUSY while in use,
 * EDEADLK from its own callback) and returns int (opq_queue_destroy,
 * opq_stage_destroy, opq_scope_destroy).
 */
#define FN_TYPE_IS(fn, type) _Generic(&(fn), type : 1, default : 0)

START_TEST(test_destroy_types)
{
	ck_assert(FN_TYPE_IS(opq_queue_attr_destroy, void (*)(opq_queue_attr *)));
	ck_assert(FN_TYPE_IS(opq_lease_attr_destroy, void (*)(opq_lease_attr *)));
	ck_assert(FN_TYPE_IS(opq_queue_destroy, int (*)(opq_queue *)));
	ck_assert(FN_TYPE_IS(opq_lease_destroy, int (*)(opq_lease *)));
	ck_assert(FN_TYPE_IS(opq_lease_provider_destroy, int (*)(opq_lease_provider *)));
}
END_TEST

START_TEST(test_bad_input)
{
	char big[OPQ_LEASE_NAME_MAX + 2];
	memset(big, 'n', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	char ok_name[OPQ_LEASE_NAME_MAX + 1];
	memset(ok_name, 'n', sizeof(ok_name) - 1);
	ok_name[sizeof(ok_name) - 1] = '\0';
	static unsigned char data[OPQ_LEASE_DATA_MAX + 1];

	opq_lease_attr *a;
	ck_assert_int_eq(opq_lease_attr_create(NULL), EINVAL);
	ck_assert_int_eq(opq_lease_attr_create(&a), 0);
	opq_lease_attr_destroy(NULL); /* a no-op */
	ck_assert_int_eq(opq_lease_attr_set_owner(NULL, "x"), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_owner(a, NULL), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_owner(a, ""), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_owner(a, big), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_owner(a, ok_name), 0);
	ck_assert_int_eq(opq_lease_attr_set_duration(NULL, 1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_duration(a, 0), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_duration(a, -5), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_margin(NULL, 0, 0), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, -1, 0), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, 0, -1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_poll(NULL, 1, 1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_poll(a, 0, 1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_poll(a, 2, 1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_data(NULL, data, 1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_data(a, NULL, 1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_data(a, data, OPQ_LEASE_DATA_MAX + 1), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_data(a, data, OPQ_LEASE_DATA_MAX), 0);
	ck_assert_int_eq(opq_lease_attr_set_data(a, NULL, 0), 0);

	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(NULL), EINVAL);
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease *l = NULL;
	ck_assert_int_eq(opq_lease_create(NULL, p, "x", NULL), EINVAL);
	ck_assert_int_eq(opq_lease_create(&l, NULL, "x", NULL), EINVAL);
	ck_assert_int_eq(opq_lease_create(&l, p, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_lease_create(&l, p, "", NULL), EINVAL);
	ck_assert_int_eq(opq_lease_create(&l, p, big, NULL), EINVAL);
	ck_assert_ptr_null(l);
	/* margin >= lease: 1 ms lease, 1 ms fixed margin; then 100% ppm */
	ck_assert_int_eq(opq_lease_attr_set_duration(a, 1 * MS), 0);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, 0, 1 * MS), 0);
	ck_assert_int_eq(opq_lease_create(&l, p, "x", a), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, 1000000, 0), 0);
	ck_assert_int_eq(opq_lease_create(&l, p, "x", a), EINVAL);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, 500000, MS / 2), 0);
	ck_assert_int_eq(opq_lease_create(&l, p, "x", a), EINVAL);
	ck_assert_ptr_null(l);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, 0, MS / 2), 0);
	ck_assert_int_eq(opq_lease_create(&l, p, ok_name, a), 0);
	opq_lease_attr_destroy(a);

	/* handle calls with NULLs and bad arguments */
	opq_lease_grant g;
	int64_t ns;
	char buf[8];
	struct timespec bad = {0, 1000000000L};
	ck_assert_int_eq(opq_lease_try_acquire(NULL, &g), EINVAL);
	ck_assert_int_eq(opq_lease_acquire(NULL, NULL, &g), EINVAL);
	ck_assert_int_eq(opq_lease_acquire(l, &bad, &g), EINVAL);
	ck_assert_int_eq(opq_lease_refresh(NULL, &g), EINVAL);
	ck_assert_int_eq(opq_lease_release(NULL), EINVAL);
	ck_assert_int_eq(opq_lease_remaining(NULL, NULL, &ns), EINVAL);
	ck_assert_int_eq(opq_lease_remaining(l, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_lease_remaining(l, &bad, &ns), EINVAL);
	ck_assert_int_eq(opq_lease_grant_get(NULL, &g), EINVAL);
	ck_assert_int_eq(opq_lease_grant_get(l, NULL), EINVAL);
	ck_assert_int_eq(opq_lease_error(NULL, buf, sizeof(buf)), EINVAL);
	ck_assert_int_eq(opq_lease_error(l, NULL, 8), EINVAL);
	ck_assert_int_eq(opq_lease_error(l, buf, 0), EINVAL);
	ck_assert_int_eq(opq_lease_destroy(NULL), 0);
	ck_assert_int_eq(opq_lease_keepalive_stop(NULL), EINVAL);
	ck_assert_int_eq(opq_lease_keepalive_stop(l), 0);

	/* not held: refresh ENOLCK, grant ENOLCK, remaining 0, release 0 */
	ck_assert_int_eq(opq_lease_refresh(l, &g), ENOLCK);
	ck_assert_int_eq(opq_lease_grant_get(l, &g), ENOLCK);
	ck_assert_int_eq(opq_lease_remaining(l, NULL, &ns), 0);
	ck_assert_int_eq(ns, 0);
	ck_assert_int_eq(opq_lease_release(l), 0);

	/* keepalive arguments */
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_lease_keepalive_start(l, q, 0, (opq_lease_lost_fn *)NULL, NULL),
	                 EINVAL);
	ck_assert_int_eq(opq_lease_keepalive_start(NULL, q, 0, NULL, NULL), EINVAL);

	/* provider table checks */
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	opq_lease_provider *p2 = NULL;
	ck_assert_int_eq(opq_lease_provider_create(NULL, &ops, NULL), EINVAL);
	ck_assert_int_eq(opq_lease_provider_create(&p2, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_lease_provider_create(&p2, &ops, NULL), EINVAL);
	ck_assert_ptr_null(p2);
	ck_assert_int_eq(opq_lease_provider_destroy(NULL), 0);

	/* still usable after all that; provider busy while the handle lives */
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	ck_assert_int_eq(g.token, 1);
	ck_assert_int_eq(opq_lease_provider_destroy(p), EBUSY);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

static void lost_never(opq_lease *l, enum opq_lease_lost_reason why, void *arg)
{
	(void)l;
	(void)why;
	atomic_fetch_add((atomic_int *)arg, 1);
}

START_TEST(test_default_owner_and_errors)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease *a, *b;
	/* Two default handles get different owners: they exclude each other. */
	ck_assert_int_eq(opq_lease_create(&a, p, "job", NULL), 0);
	ck_assert_int_eq(opq_lease_create(&b, p, "job", NULL), 0);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(a, &g), 0);
	ck_assert_int_eq(g.lease_ns, 10 * 1000000000LL);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
	int64_t ns;
	ck_assert_int_eq(opq_lease_remaining(a, &g.acquired, &ns), 0);
	/* default margin: 1% + 10 ms */
	ck_assert_int_eq(ns, 10 * 1000000000LL - 100 * MS - 10 * MS);
	char buf[4];
	ck_assert_int_eq(opq_lease_error(a, buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "");
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), 0);
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- token rules ------------------------------------------------------------ */

START_TEST(test_tokens)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease *a = mk(p, "res", "A", 1000 * MS);
	opq_lease *b = mk(p, "res", "B", 1000 * MS);
	opq_lease *other = mk(p, "other", "A", 1000 * MS);
	opq_lease_grant g, g2;
	uint64_t last = 0;

	/* acquire, release, acquire: a new token each time */
	ck_assert_int_eq(opq_lease_try_acquire(a, &g), 0);
	ck_assert_uint_gt(g.token, last);
	last = g.token;
	/* names are independent */
	ck_assert_int_eq(opq_lease_try_acquire(other, &g2), 0);
	ck_assert_uint_eq(g2.token, 1);
	/* same owner again: token kept, lease extended (later instant) */
	ck_assert_int_eq(opq_lease_try_acquire(a, &g2), 0);
	ck_assert_uint_eq(g2.token, last);
	ck_assert_int_ge(ts_ns(&g2.acquired), ts_ns(&g.acquired));
	/* refresh keeps the token */
	ck_assert_int_eq(opq_lease_refresh(a, &g2), 0);
	ck_assert_uint_eq(g2.token, last);
	ck_assert_int_eq(opq_lease_grant_get(a, &g), 0);
	ck_assert_uint_eq(g.token, last);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_release(a), 0); /* idempotent */
	ck_assert_int_eq(opq_lease_grant_get(a, &g), ENOLCK);
	ck_assert_int_eq(opq_lease_try_acquire(b, &g), 0);
	ck_assert_uint_gt(g.token, last);
	last = g.token;
	/* A's stale release does not touch B's lease */
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_try_acquire(a, NULL), EBUSY);
	ck_assert_int_eq(opq_lease_refresh(b, NULL), 0);
	/* expiry: B lets it run out, A takes over with a larger token */
	pass_ns(1010 * MS);
	ck_assert_int_eq(opq_lease_try_acquire(a, &g), 0);
	ck_assert_uint_gt(g.token, last);
	last = g.token;
	/* B's refresh after the takeover: ENOLCK, and it no longer holds */
	ck_assert_int_eq(opq_lease_refresh(b, &g2), ENOLCK);
	ck_assert_int_eq(opq_lease_grant_get(b, &g2), ENOLCK);
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(opq_lease_refresh(a, NULL), 0);
	/* the same owner re-acquiring after its own expiry gets a new token */
	pass_ns(1010 * MS);
	ck_assert_int_eq(opq_lease_refresh(a, NULL), ENOLCK);
	ck_assert_int_eq(opq_lease_try_acquire(a, &g), 0);
	ck_assert_uint_gt(g.token, last);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_release(other), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_destroy(other), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/*
 * A suspend of the system: CLOCK_MONOTONIC, on which grants are taken,
 * stands still, while the store's clock (the SQLite provider's boot clock,
 * a PostgreSQL server elsewhere) runs on. remaining() takes off the time
 * the system was suspended since the grant (simulated here), but not a
 * suspend before it.
 */
START_TEST(test_suspend)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease_attr *at;
	ck_assert_int_eq(opq_lease_attr_create(&at), 0);
	ck_assert_int_eq(opq_lease_attr_set_duration(at, 10 * SEC), 0);
	ck_assert_int_eq(opq_lease_attr_set_margin(at, 0, 10 * MS), 0);
	opq_lease *l;
	ck_assert_int_eq(opq_lease_create(&l, p, "suspend", at), 0);
	opq_lease_attr_destroy(at);
	opq__suspend_pretend(3600 * SEC); /* before the grant: not counted */
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	int64_t ns;
	ck_assert_int_eq(opq_lease_remaining(l, &g.acquired, &ns), 0);
	ck_assert_int_eq(ns, 10 * SEC - 10 * MS);
	opq__suspend_pretend(4 * SEC);
	ck_assert_int_eq(opq_lease_remaining(l, &g.acquired, &ns), 0);
	/* Within the clocks' reading error (microseconds; 1 ms allowed). */
	ck_assert_int_le(ns, 6 * SEC - 10 * MS + 1 * MS);
	ck_assert_int_ge(ns, 6 * SEC - 10 * MS - 1 * MS);
	opq__suspend_pretend(60 * SEC);
	ck_assert_int_eq(opq_lease_remaining(l, NULL, &ns), 0);
	ck_assert_int_eq(ns, 0);
	/* A refresh starts the count again. */
	ck_assert_int_eq(opq_lease_refresh(l, &g), 0);
	ck_assert_int_eq(opq_lease_remaining(l, &g.acquired, &ns), 0);
	ck_assert_int_eq(ns, 10 * SEC - 10 * MS);
	ck_assert_int_eq(opq_lease_release(l), 0);
	opq__suspend_pretend(-3664 * SEC);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

START_TEST(test_remaining)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease_attr *at;
	ck_assert_int_eq(opq_lease_attr_create(&at), 0);
	ck_assert_int_eq(opq_lease_attr_set_owner(at, "me"), 0);
	ck_assert_int_eq(opq_lease_attr_set_duration(at, 2000 * MS), 0);
	ck_assert_int_eq(opq_lease_attr_set_margin(at, 5000, 7 * MS), 0); /* 0.5% + 7 ms */
	opq_lease *l;
	ck_assert_int_eq(opq_lease_create(&l, p, "r", at), 0);
	opq_lease_attr_destroy(at);
	opq_lease_grant g;
	int64_t before = t_now_ns();
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	int64_t after = t_now_ns();
	/* the instant is taken before the request */
	ck_assert_int_ge(ts_ns(&g.acquired), before);
	ck_assert_int_le(ts_ns(&g.acquired), after);
	int64_t ns;
	ck_assert_int_eq(opq_lease_remaining(l, &g.acquired, &ns), 0);
	ck_assert_int_eq(ns, 2000 * MS - 10 * MS - 7 * MS);
	struct timespec later = g.acquired;
	later.tv_sec += 1;
	ck_assert_int_eq(opq_lease_remaining(l, &later, &ns), 0);
	ck_assert_int_eq(ns, 1000 * MS - 17 * MS);
	later.tv_sec += 1;
	ck_assert_int_eq(opq_lease_remaining(l, &later, &ns), 0);
	ck_assert_int_eq(ns, 0);
	ck_assert_int_eq(opq_lease_remaining(l, NULL, &ns), 0);
	ck_assert_int_gt(ns, 0);
	ck_assert_int_le(ns, 2000 * MS - 17 * MS);
	/* Instants out of nanosecond range saturate (UBSan: no overflow). */
	struct timespec past = {(time_t)(INT64_MIN / 1000000000), 0};
	ck_assert_int_eq(opq_lease_remaining(l, &past, &ns), 0);
	ck_assert_int_eq(ns, INT64_MAX);
	struct timespec future = {(time_t)INT64_MAX, 0};
	ck_assert_int_eq(opq_lease_remaining(l, &future, &ns), 0);
	ck_assert_int_eq(ns, 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_remaining(l, &g.acquired, &ns), 0);
	ck_assert_int_eq(ns, 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* Takeover happens exactly when the holder's lease runs out: not before. */
START_TEST(test_takeover_at_expiry)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	const int64_t L = 150 * MS;
	for (int round = 0; round < 3; round++) {
		opq_lease *a = mk(p, "t", "A", L);
		opq_lease *b = mk(p, "t", "B", L);
		opq_lease_grant ga, gb;
		ck_assert_int_eq(opq_lease_try_acquire(a, &ga), 0);
		int64_t a_after = t_now_ns();
		int64_t last_fail = 0, t0 = t_now_ns();
		int rc;
		while ((rc = opq_lease_try_acquire(b, &gb)) == EBUSY) {
			last_fail = t0; /* sent before the store's expiry */
			ck_assert_int_lt(last_fail - a_after, T_WAIT_NS);
			sched_yield();
			t0 = t_now_ns();
		}
		int64_t won = t_now_ns();
		ck_assert_int_eq(rc, 0);
		ck_assert_uint_gt(gb.token, ga.token);
		/* not before A's lease ran out from A's own instant */
		ck_assert_int_ge(won, ts_ns(&ga.acquired) + L);
		/* the store's expiry is at most a_after + L: refusals came before
		 * it, and the takeover right after it (we spin) */
		ck_assert_int_gt(last_fail, 0);
		ck_assert_int_lt(last_fail, a_after + L);
		ck_assert_int_lt(won - (a_after + L), 500 * MS);
		ck_assert_int_eq(opq_lease_refresh(a, NULL), ENOLCK);
		ck_assert_int_eq(opq_lease_release(b), 0);
		ck_assert_int_eq(opq_lease_destroy(a), 0);
		ck_assert_int_eq(opq_lease_destroy(b), 0);
	}
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- blocking acquire ------------------------------------------------------ */

struct releaser {
	opq_lease *l;
	int64_t after_ns;
	int64_t released_at;
};

static void *release_later(void *arg)
{
	struct releaser *r = arg;
	pass_ns(r->after_ns);
	r->released_at = t_now_ns();
	ck_assert_int_eq(opq_lease_release(r->l), 0);
	return NULL;
}

START_TEST(test_blocking_acquire)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease *a = mk(p, "b", "A", 10000 * MS);
	opq_lease *b = mk(p, "b", "B", 10000 * MS);
	opq_lease_grant ga, gb;
	ck_assert_int_eq(opq_lease_try_acquire(a, &ga), 0);
	/* deadline passes while A holds: ETIMEDOUT, at the deadline, not much after */
	struct timespec dl = t_deadline(80 * MS);
	ck_assert_int_eq(opq_lease_acquire(b, &dl, &gb), ETIMEDOUT);
	int64_t late = t_now_ns() - ts_ns(&dl);
	ck_assert_int_ge(late, 0);
	ck_assert_int_lt(late, 2000 * MS);
	/* a deadline in the past still tries once */
	struct timespec past = t_deadline(-1000 * MS);
	ck_assert_int_eq(opq_lease_acquire(b, &past, &gb), ETIMEDOUT);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_acquire(b, &past, &gb), 0);
	ck_assert_int_eq(opq_lease_release(b), 0);
	/* A holds, releases after 50 ms: B's blocking acquire gets it */
	ck_assert_int_eq(opq_lease_try_acquire(a, &ga), 0);
	struct releaser r = {a, 50 * MS, 0};
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, release_later, &r), 0);
	dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_lease_acquire(b, &dl, &gb), 0);
	int64_t got = t_now_ns();
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_int_ge(got, r.released_at);
	ck_assert_int_lt(got - r.released_at, 1000 * MS); /* poll max is 20 ms */
	ck_assert_uint_gt(gb.token, ga.token);
	/* forever (NULL deadline) on a free lock */
	ck_assert_int_eq(opq_lease_acquire(b, NULL, &gb), 0);
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- mutual exclusion -------------------------------------------------------- */

#define MX_THREADS 8

struct mx {
	opq_lease_provider *p;
	atomic_int holders;
	atomic_int max_holders;
	pthread_mutex_t mu;
	uint64_t last_token;
	long bad_order;
	long acquisitions;
	long iters;
};

struct mx_arg {
	struct mx *m;
	int id;
};

static void *mx_main(void *arg)
{
	struct mx_arg *ma = arg;
	struct mx *m = ma->m;
	char owner[32];
	snprintf(owner, sizeof(owner), "thread-%d", ma->id);
	opq_lease *l = mk(m->p, "mx", owner, 30000 * MS);
	for (long i = 0; i < m->iters; i++) {
		struct timespec dl = t_deadline(T_WAIT_NS);
		opq_lease_grant g;
		ck_assert_int_eq(opq_lease_acquire(l, &dl, &g), 0);
		int h = atomic_fetch_add(&m->holders, 1) + 1;
		int mh = atomic_load(&m->max_holders);
		while (h > mh && !atomic_compare_exchange_weak(&m->max_holders, &mh, h))
			;
		pthread_mutex_lock(&m->mu);
		if (g.token <= m->last_token)
			m->bad_order++;
		m->last_token = g.token;
		m->acquisitions++;
		pthread_mutex_unlock(&m->mu);
		if (i % 3 == 0)
			sched_yield();
		atomic_fetch_sub(&m->holders, 1);
		ck_assert_int_eq(opq_lease_release(l), 0);
	}
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	return NULL;
}

START_TEST(test_mutual_exclusion)
{
	struct mx m;
	memset(&m, 0, sizeof(m));
	pthread_mutex_init(&m.mu, NULL);
	m.iters = t_scale(300);
	ck_assert_int_eq(opq_lease_provider_memory_create(&m.p), 0);
	pthread_t th[MX_THREADS];
	struct mx_arg args[MX_THREADS];
	for (int i = 0; i < MX_THREADS; i++) {
		args[i].m = &m;
		args[i].id = i;
		ck_assert_int_eq(pthread_create(&th[i], NULL, mx_main, &args[i]), 0);
	}
	for (int i = 0; i < MX_THREADS; i++)
		ck_assert_int_eq(pthread_join(th[i], NULL), 0);
	ck_assert_int_eq(atomic_load(&m.max_holders), 1);
	ck_assert_int_eq(m.bad_order, 0);
	ck_assert_int_eq(m.acquisitions, MX_THREADS * m.iters);
	ck_assert_uint_eq(m.last_token, (uint64_t)(MX_THREADS * m.iters));
	ck_assert_int_eq(opq_lease_provider_destroy(m.p), 0);
	pthread_mutex_destroy(&m.mu);
}
END_TEST

/* ---- allocation failures ------------------------------------------------------ */

START_TEST(test_fault_sweep)
{
	opq_lease_attr *a = NULL;
	SWEEP(opq_lease_attr_create(&a), ck_assert_ptr_null(a));
	ck_assert_int_eq(opq_lease_attr_set_owner(a, "me"), 0);
	opq_lease_provider *p = NULL;
	SWEEP(opq_lease_provider_memory_create(&p), ck_assert_ptr_null(p));
	opq_lease *l = NULL;
	SWEEP(opq_lease_create(&l, p, "f", a), ck_assert_ptr_null(l));
	opq_lease_grant g;
	char words[128];
	SWEEP(opq_lease_try_acquire(l, &g), {
		ck_assert_int_eq(opq_lease_grant_get(l, &g), ENOLCK);
		ck_assert_int_eq(opq_lease_error(l, words, sizeof(words)), 0);
		ck_assert_ptr_nonnull(strstr(words, "out of memory"));
	});
	ck_assert_uint_eq(g.token, 1);
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	atomic_int lost = 0;
	/* the keepalive's own allocations: none beyond the timer thread's */
	SWEEP(opq_lease_keepalive_start(l, q, 0, lost_never, &lost), (void)0);
	ck_assert_int_eq(opq_lease_keepalive_stop(l), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	ck_assert_uint_eq(g.token, 2);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	opq_lease_attr_destroy(a);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(atomic_load(&lost), 0);
}
END_TEST

/* Only these calls allocate nothing: run each with the next allocation
 * armed to fail and check it made none (so no ENOMEM can come from it). */
#define NO_ALLOC(call)                                                                             \
	do {                                                                                       \
		opq__fault_set(1);                                                                 \
		int rc_ = (call);                                                                  \
		long made_ = opq__fault_count();                                                   \
		opq__fault_set(0);                                                                 \
		ck_assert_msg(made_ == 0, "%s allocated %ld", #call, made_);                       \
		ck_assert_msg(rc_ == 0 || rc_ == ENOLCK, "%s: %d", #call, rc_);                    \
	} while (0)

static int p_ok_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	(void)store;
	(void)req;
	*token = 1;
	return 0;
}

static int p_ok(void *store, const opq_lease_request *req)
{
	(void)store;
	(void)req;
	return 0;
}

START_TEST(test_fault_sweep_rest)
{
	/* provider_create allocates; a failed one leaves nothing behind. */
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	ops.acquire = p_ok_acquire;
	ops.refresh = p_ok;
	ops.release = p_ok;
	opq_lease_provider *own = NULL;
	SWEEP(opq_lease_provider_create(&own, &ops, NULL), ck_assert_ptr_null(own));
	ck_assert_int_eq(opq_lease_provider_destroy(own), 0);

	/* A blocking acquire of a new name: the memory store's record cannot
	 * be made (ENOMEM, a store failure): acquire retries and gets it on
	 * the next try; the words stay in the handle. */
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease_attr *a;
	ck_assert_int_eq(opq_lease_attr_create(&a), 0);
	ck_assert_int_eq(opq_lease_attr_set_poll(a, 1000000, 1000000), 0);
	for (int k = 0; k < 4; k++) {
		char name[16];
		snprintf(name, sizeof(name), "new-%d", k);
		opq_lease *l;
		ck_assert_int_eq(opq_lease_create(&l, p, name, a), 0);
		struct timespec dl = t_deadline(T_WAIT_NS);
		opq_lease_grant g;
		char words[128];
		opq__fault_set(1);
		int rc = opq_lease_acquire(l, &dl, &g);
		long made = opq__fault_count();
		opq__fault_set(0);
		ck_assert_int_eq(rc, 0);
		ck_assert_int_eq(made, 2); /* the failed record, then the one made */
		ck_assert_uint_eq(g.token, 1);
		ck_assert_int_eq(opq_lease_error(l, words, sizeof(words)), 0);
		ck_assert_ptr_nonnull(strstr(words, "out of memory"));
		/* A past deadline: ENOMEM is retried until the deadline, then ETIMEDOUT. */
		opq_lease *l2;
		snprintf(name, sizeof(name), "other-%d", k);
		ck_assert_int_eq(opq_lease_create(&l2, p, name, a), 0);
		struct timespec past = {0, 0};
		opq__fault_set(1);
		rc = opq_lease_acquire(l2, &past, &g);
		opq__fault_set(0);
		ck_assert_int_eq(rc, ETIMEDOUT);
		ck_assert_int_eq(opq_lease_try_acquire(l2, &g), 0);
		ck_assert_uint_eq(g.token, 1);

		/* Everything else allocates nothing. */
		opq_queue *q;
		ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		int64_t ns;
		NO_ALLOC(opq_lease_try_acquire(l, &g)); /* an existing record */
		NO_ALLOC(opq_lease_refresh(l, &g));
		NO_ALLOC(opq_lease_remaining(l, NULL, &ns));
		NO_ALLOC(opq_lease_grant_get(l, &g));
		NO_ALLOC(opq_lease_error(l, words, sizeof(words)));
		NO_ALLOC(opq_lease_keepalive_start(l, q, 0, lost_never, NULL));
		NO_ALLOC(opq_lease_keepalive_stop(l));
		NO_ALLOC(opq_lease_release(l));
		NO_ALLOC(opq_lease_release(l));
		NO_ALLOC(opq_lease_refresh(l, &g));
		NO_ALLOC(opq_lease_attr_set_owner(a, "someone"));
		NO_ALLOC(opq_lease_attr_set_duration(a, 5000000000LL));
		NO_ALLOC(opq_lease_attr_set_margin(a, 100, 1000));
		NO_ALLOC(opq_lease_attr_set_poll(a, 1000000, 1000000));
		NO_ALLOC(opq_lease_attr_set_data(a, "d", 1));
		NO_ALLOC(opq_lease_destroy(l2));
		NO_ALLOC(opq_lease_destroy(l));
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
	opq_lease_attr_destroy(a);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- keepalive ------------------------------------------------------------------ */

/*
 * A test store for one lock, written against the public provider
 * interface: it can be told to fail (EIO), to hang in refresh until let
 * go, or to have the lock stolen by another owner.
 */
enum tp_mode { TP_OK, TP_FAIL, TP_HANG };

struct tp {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	enum tp_mode mode;
	bool held;
	char owner[OPQ_LEASE_OWNER_MAX + 1];
	uint64_t token;
	int64_t expiry;
	int refreshes;
	int hanging; /* refresh calls blocked now */
	bool destroyed;
};

static int tp_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	struct tp *s = store;
	pthread_mutex_lock(&s->mu);
	int rc = 0;
	int64_t now = t_now_ns();
	if (s->mode == TP_FAIL) {
		snprintf(req->errbuf, req->errlen, "test store: down");
		rc = EIO;
	} else if (s->held && now < s->expiry && strcmp(s->owner, req->owner) != 0) {
		rc = EBUSY;
	} else {
		if (!(s->held && now < s->expiry))
			s->token++;
		s->held = true;
		snprintf(s->owner, sizeof(s->owner), "%s", req->owner);
		s->expiry = now + req->lease_ns;
		*token = s->token;
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

static int tp_refresh(void *store, const opq_lease_request *req)
{
	struct tp *s = store;
	pthread_mutex_lock(&s->mu);
	s->refreshes++;
	while (s->mode == TP_HANG) {
		s->hanging++;
		pthread_cond_broadcast(&s->cv);
		pthread_cond_wait(&s->cv, &s->mu);
		s->hanging--;
	}
	int rc = 0;
	int64_t now = t_now_ns();
	if (s->mode == TP_FAIL) {
		snprintf(req->errbuf, req->errlen, "test store: down");
		rc = EIO;
	} else if (!s->held || now >= s->expiry || s->token != req->token ||
	           strcmp(s->owner, req->owner) != 0) {
		rc = ENOLCK;
	} else {
		s->expiry = now + req->lease_ns;
	}
	pthread_mutex_unlock(&s->mu);
	return rc;
}

static int tp_release(void *store, const opq_lease_request *req)
{
	struct tp *s = store;
	pthread_mutex_lock(&s->mu);
	if (s->held && s->token == req->token && strcmp(s->owner, req->owner) == 0)
		s->held = false;
	pthread_mutex_unlock(&s->mu);
	return 0;
}

static void tp_destroy(void *store)
{
	struct tp *s = store;
	s->destroyed = true;
}

static opq_lease_provider *tp_provider(struct tp *s)
{
	memset(s, 0, sizeof(*s));
	pthread_mutex_init(&s->mu, NULL);
	pthread_cond_init(&s->cv, NULL);
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	ops.acquire = tp_acquire;
	ops.refresh = tp_refresh;
	ops.release = tp_release;
	ops.destroy = tp_destroy;
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_create(&p, &ops, s), 0);
	return p;
}

static void tp_set(struct tp *s, enum tp_mode mode)
{
	pthread_mutex_lock(&s->mu);
	s->mode = mode;
	pthread_cond_broadcast(&s->cv);
	pthread_mutex_unlock(&s->mu);
}

static int tp_get(struct tp *s, int *field)
{
	pthread_mutex_lock(&s->mu);
	int v = *field;
	pthread_mutex_unlock(&s->mu);
	return v;
}

static void tp_steal(struct tp *s)
{
	pthread_mutex_lock(&s->mu);
	snprintf(s->owner, sizeof(s->owner), "thief");
	s->token++;
	s->expiry = t_now_ns() + 10000 * MS;
	pthread_mutex_unlock(&s->mu);
}

static void tp_fini(struct tp *s)
{
	ck_assert(s->destroyed);
	pthread_cond_destroy(&s->cv);
	pthread_mutex_destroy(&s->mu);
}

struct lost_rec {
	atomic_int calls;
	atomic_int why;
	atomic_llong at; /* monotonic ns of the (first) call */
	int rc_stop, rc_destroy, rc_start;
	opq_queue *q;
	char thread[16]; /* the name of the thread that ran it */
};

static void on_lost(opq_lease *l, enum opq_lease_lost_reason why, void *arg)
{
	struct lost_rec *r = arg;
	long long t = t_now_ns();
	thread_name(r->thread, sizeof(r->thread));
	/* calls that would wait for this callback refuse */
	r->rc_stop = opq_lease_keepalive_stop(l);
	r->rc_destroy = opq_lease_destroy(l);
	r->rc_start = opq_lease_keepalive_start(l, r->q, 0, on_lost, r);
	atomic_store(&r->why, (int)why);
	atomic_store(&r->at, t);
	atomic_fetch_add(&r->calls, 1);
}

static opq_queue *mk_queue(unsigned runners)
{
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, runners), 0);
	return q;
}

static void end_queue(opq_queue *q)
{
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}

/* A 400 ms lease kept alive for 2 s while another owner keeps trying. */
START_TEST(test_keepalive_keeps)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_queue *q = mk_queue(2);
	opq_lease *a = mk(p, "k", "A", 400 * MS);
	opq_lease *b = mk(p, "k", "B", 400 * MS);
	opq_lease_grant g0, g;
	ck_assert_int_eq(opq_lease_try_acquire(a, &g0), 0);
	struct lost_rec r;
	memset(&r, 0, sizeof(r));
	r.q = q;
	ck_assert_int_eq(opq_lease_keepalive_start(a, q, 0, on_lost, &r), 0);
	ck_assert_int_eq(opq_lease_keepalive_start(a, q, 0, on_lost, &r), EBUSY);
	ck_assert_int_eq(opq_lease_keepalive_start(b, q, 0, on_lost, &r), ENOLCK);
	ck_assert_int_eq(opq_lease_keepalive_start(a, q, 100 * MS, on_lost, &r), EBUSY);
	ck_assert_int_eq(opq_lease_keepalive_start(a, q, 400 * MS, on_lost, &r), EINVAL);
	int64_t end = t_now_ns() + 2000 * MS;
	while (t_now_ns() < end) {
		ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
		int64_t left;
		ck_assert_int_eq(opq_lease_remaining(a, NULL, &left), 0);
		ck_assert_int_gt(left, 0);
		pass_ns(5 * MS);
	}
	ck_assert_int_eq(opq_lease_grant_get(a, &g), 0);
	ck_assert_uint_eq(g.token, g0.token);
	ck_assert_int_gt(ts_ns(&g.acquired), ts_ns(&g0.acquired) + 1500 * MS);
	ck_assert_int_eq(atomic_load(&r.calls), 0);
	ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
	ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
	/* start again, then release stops it */
	ck_assert_int_eq(opq_lease_keepalive_start(a, q, 20 * MS, on_lost, &r), 0);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, &g), 0);
	ck_assert_uint_gt(g.token, g0.token);
	pass_ns(100 * MS);
	ck_assert_int_eq(atomic_load(&r.calls), 0);
	/* a stopping queue: ESHUTDOWN */
	end_queue(q);
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_lease_keepalive_start(b, q, 0, on_lost, &r), ESHUTDOWN);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/*
 * Another owner takes the lock at the store: lost(TAKEN), exactly once, on
 * the thread that ran the refresh. The keepalive tests run twice (_i): 0
 * with the refreshes on the caller's queue, 1 on the keepalive's own thread.
 */
START_TEST(test_keepalive_taken)
{
	struct tp s;
	opq_lease_provider *p = tp_provider(&s);
	opq_queue *q = mk_queue(1);
	opq_queue *kq = _i ? NULL : q;
	opq_lease *a = mk(p, "k", "A", 1000 * MS);
	ck_assert_int_eq(opq_lease_try_acquire(a, NULL), 0);
	struct lost_rec r;
	memset(&r, 0, sizeof(r));
	r.q = kq;
	ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 30 * MS, on_lost, &r), 0);
	T_WAIT_UNTIL(tp_get(&s, &s.refreshes) >= 3);
	ck_assert_int_eq(atomic_load(&r.calls), 0);
	tp_steal(&s);
	int64_t stolen = t_now_ns();
	T_WAIT_UNTIL(atomic_load(&r.calls) == 1);
	ck_assert_int_eq(atomic_load(&r.why), OPQ_LEASE_TAKEN);
	ck_assert_int_lt(atomic_load(&r.at) - stolen, 2000 * MS);
	ck_assert_int_eq(r.rc_stop, EDEADLK);
	ck_assert_int_eq(r.rc_destroy, EDEADLK);
	ck_assert_int_eq(r.rc_start, EDEADLK);
	if (HAVE_DECL_PTHREAD_SETNAME_NP) /* the threads have names to tell */
		ck_assert_str_eq(r.thread, _i ? "opq-lease" : "opq/0");
	int before = tp_get(&s, &s.refreshes);
	pass_ns(150 * MS);
	ck_assert_int_eq(atomic_load(&r.calls), 1);         /* once */
	ck_assert_int_eq(tp_get(&s, &s.refreshes), before); /* and it ended */
	ck_assert_int_eq(opq_lease_grant_get(a, NULL), EINVAL);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_grant_get(a, &g), ENOLCK);
	ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 0, on_lost, &r), ENOLCK);
	ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	tp_fini(&s);
	end_queue(q);
}
END_TEST

/* The store fails (EIO) or hangs: lost(UNREACHABLE) before the local end,
 * on the timer thread. `own`: the keepalive's own thread refreshes. */
static void unreachable_case(enum tp_mode mode, bool own)
{
	struct tp s;
	opq_lease_provider *p = tp_provider(&s);
	opq_queue *q = mk_queue(1);
	opq_queue *kq = own ? NULL : q;
	const int64_t L = 1000 * MS;
	opq_lease *a = mk(p, "k", "A", L); /* margin 1% + 1 ms */
	ck_assert_int_eq(opq_lease_try_acquire(a, NULL), 0);
	struct lost_rec r;
	memset(&r, 0, sizeof(r));
	r.q = kq;
	ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 50 * MS, on_lost, &r), 0);
	T_WAIT_UNTIL(tp_get(&s, &s.refreshes) >= 2);
	tp_set(&s, mode);
	/* the last confirmed grant: the lost call must come before its end */
	if (mode == TP_HANG)
		T_WAIT_UNTIL(tp_get(&s, &s.hanging) == 1);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_grant_get(a, &g), 0);
	int64_t local_end = ts_ns(&g.acquired) + L - L / 100 - 1 * MS;
	T_WAIT_UNTIL(atomic_load(&r.calls) == 1);
	ck_assert_int_eq(atomic_load(&r.why), OPQ_LEASE_UNREACHABLE);
	if (HAVE_DECL_PTHREAD_SETNAME_NP)
		ck_assert_str_eq(r.thread, "opq-timer");
	ck_assert_msg(atomic_load(&r.at) < local_end, "lost %lld ns after the local end",
	              (long long)(atomic_load(&r.at) - local_end));
	/* not absurdly early either: not before the lease was half gone */
	ck_assert_int_gt(atomic_load(&r.at), ts_ns(&g.acquired) + L / 2);
	ck_assert_int_eq(r.rc_stop, EDEADLK);
	ck_assert_int_eq(r.rc_destroy, EDEADLK);
	if (mode == TP_FAIL) {
		char words[64];
		ck_assert_int_eq(opq_lease_error(a, words, sizeof(words)), 0);
		ck_assert_str_eq(words, "test store: down");
		/* the store is still down: the handle still thinks it holds */
		pass_ns(100 * MS);
		ck_assert_int_eq(atomic_load(&r.calls), 1);
		int64_t left;
		ck_assert_int_eq(opq_lease_remaining(a, NULL, &left), 0);
		ck_assert_int_eq(left, 0);
		ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
		tp_set(&s, TP_OK);
	} else {
		/* stop waits for the refresh stuck in the store */
		ck_assert_int_eq(tp_get(&s, &s.hanging), 1);
		struct releaser rel = {0};
		(void)rel;
		tp_set(&s, TP_OK);
		ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
		ck_assert_int_eq(tp_get(&s, &s.hanging), 0);
		ck_assert_int_eq(atomic_load(&r.calls), 1);
	}
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	tp_fini(&s);
	end_queue(q);
}

START_TEST(test_keepalive_unreachable_fail)
{
	unreachable_case(TP_FAIL, _i);
}
END_TEST

START_TEST(test_keepalive_unreachable_hang)
{
	unreachable_case(TP_HANG, _i);
}
END_TEST

struct stopper {
	opq_lease *l;
	bool destroy;
	atomic_int done;
	int rc;
};

static void *stop_main(void *arg)
{
	struct stopper *st = arg;
	st->rc = st->destroy ? opq_lease_destroy(st->l) : opq_lease_keepalive_stop(st->l);
	atomic_store(&st->done, 1);
	return NULL;
}

/* keepalive_stop and destroy while a refresh is in flight: they wait for it. */
static void stop_in_flight(bool destroy, bool own)
{
	struct tp s;
	opq_lease_provider *p = tp_provider(&s);
	opq_queue *q = mk_queue(1);
	opq_queue *kq = own ? NULL : q;
	opq_lease *a = mk(p, "k", "A", 10000 * MS);
	ck_assert_int_eq(opq_lease_try_acquire(a, NULL), 0);
	struct lost_rec r;
	memset(&r, 0, sizeof(r));
	r.q = kq;
	tp_set(&s, TP_HANG);
	ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 0, on_lost, &r), 0);
	T_WAIT_UNTIL(tp_get(&s, &s.hanging) == 1);
	struct stopper st = {.l = a, .destroy = destroy};
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, stop_main, &st), 0);
	pass_ns(50 * MS);
	ck_assert_int_eq(atomic_load(&st.done), 0); /* still waiting */
	tp_set(&s, TP_OK);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_int_eq(st.rc, 0);
	ck_assert_int_eq(atomic_load(&r.calls), 0);
	if (!destroy) {
		ck_assert_int_eq(opq_lease_refresh(a, NULL), 0);
		ck_assert_int_eq(opq_lease_release(a), 0);
		ck_assert_int_eq(opq_lease_destroy(a), 0);
	}
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	tp_fini(&s);
	end_queue(q);
}

START_TEST(test_keepalive_stop_in_flight)
{
	stop_in_flight(false, _i);
}
END_TEST

START_TEST(test_keepalive_destroy_in_flight)
{
	stop_in_flight(true, _i);
}
END_TEST

/* Many handles with keepalives on one queue, started and stopped at random. */
START_TEST(test_keepalive_churn)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_queue *q = mk_queue(2);
	opq_queue *kq = _i ? NULL : q;
	enum { N = 6 };
	opq_lease *l[N];
	struct lost_rec r;
	memset(&r, 0, sizeof(r));
	r.q = kq;
	for (int i = 0; i < N; i++) {
		char name[8];
		snprintf(name, sizeof(name), "c%d", i);
		/* Long enough that a slow turn of the loop (a loaded machine;
		 * each start and stop without a queue starts and joins a
		 * thread) never lets a stopped one run out before its restart. */
		l[i] = mk(p, name, "A", 2000 * MS);
		ck_assert_int_eq(opq_lease_try_acquire(l[i], NULL), 0);
	}
	long iters = t_scale(200);
	for (long it = 0; it < iters; it++) {
		int i = (int)(it % N);
		int rc = opq_lease_keepalive_start(l[i], kq, 1 * MS + it % 5 * MS, on_lost, &r);
		ck_assert_msg(rc == 0 || rc == EBUSY, "rc %d", rc);
		if (it % 3 == 0)
			ck_assert_int_eq(opq_lease_keepalive_stop(l[(i + 2) % N]), 0);
		if (it % 7 == 0)
			pass_ns(1 * MS);
	}
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(opq_lease_release(l[i]), 0);
		ck_assert_int_eq(opq_lease_destroy(l[i]), 0);
	}
	ck_assert_int_eq(atomic_load(&r.calls), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	end_queue(q);
}
END_TEST

START_TEST(test_round_trips)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease *l = mk(p, "rt", "A", 10000 * MS);
	long n = t_scale(200000);
	int64_t t0 = t_now_ns();
	for (long i = 0; i < n; i++) {
		ck_assert_int_eq(opq_lease_try_acquire(l, NULL), 0);
		ck_assert_int_eq(opq_lease_release(l), 0);
	}
	double s = (double)(t_now_ns() - t0) / 1e9;
	fprintf(stderr, "check_lease: memory provider %.0f acquire+release round trips/s\n",
	        (double)n / s);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	ck_assert_uint_eq(g.token, (uint64_t)n + 1);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* The longest lease: nothing overflows. */
START_TEST(test_huge_lease)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease_attr *at;
	ck_assert_int_eq(opq_lease_attr_create(&at), 0);
	ck_assert_int_eq(opq_lease_attr_set_duration(at, INT64_MAX), 0);
	ck_assert_int_eq(opq_lease_attr_set_margin(at, 999999, INT64_MAX / 2000000), 0);
	opq_lease *l, *other;
	ck_assert_int_eq(opq_lease_create(&l, p, "h", at), 0);
	ck_assert_int_eq(opq_lease_attr_set_owner(at, "other"), 0);
	ck_assert_int_eq(opq_lease_create(&other, p, "h", at), 0);
	opq_lease_attr_destroy(at);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	int64_t left;
	ck_assert_int_eq(opq_lease_remaining(l, NULL, &left), 0);
	ck_assert_int_gt(left, 0);
	ck_assert_int_eq(opq_lease_try_acquire(other, NULL), EBUSY);
	opq_queue *q = mk_queue(1);
	atomic_int lost = 0;
	ck_assert_int_eq(opq_lease_keepalive_start(l, q, 0, lost_never, &lost), 0);
	ck_assert_int_eq(opq_lease_refresh(l, NULL), 0);
	ck_assert_int_eq(opq_lease_keepalive_stop(l), 0);
	ck_assert_int_eq(atomic_load(&lost), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_destroy(other), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	end_queue(q);
}
END_TEST

/*
 * A keepalive that nothing can starve: the daemon's bounded work queue
 * (capacity 4, one runner) kept full of 300 ms jobs for 2.4 s, and a
 * 600 ms lease. On the keepalive's own thread (_i 1) the lease is kept
 * throughout; as operations on that queue (_i 0) its refreshes are refused
 * or wait behind the work, and the lease is lost.
 */
static int job_300ms(void *arg)
{
	(void)arg;
	pass_ns(300 * MS); /* the daemon's work */
	return 0;
}

static void job_fn(void *arg)
{
	(void)job_300ms(arg);
}

START_TEST(test_keepalive_starved)
{
	const int64_t L = 600 * MS;
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_queue_attr *qa;
	ck_assert_int_eq(opq_queue_attr_create(&qa), 0);
	ck_assert_int_eq(opq_queue_attr_set_capacity(qa, 4), 0);
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, qa), 0);
	opq_queue_attr_destroy(qa);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	opq_lease *a = mk(p, "starved", "A", L);
	opq_lease *b = mk(p, "starved", "B", L);
	opq_lease_grant g0, g;
	ck_assert_int_eq(opq_lease_try_acquire(a, &g0), 0);
	struct lost_rec r;
	memset(&r, 0, sizeof(r));
	r.q = _i ? NULL : q;
	ck_assert_int_eq(opq_lease_keepalive_start(a, r.q, 0, on_lost, &r), 0);
	int64_t start = t_now_ns();
	/* 8 jobs of 300 ms through a queue of 4: full for about 2.4 s */
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(opq_queue_enqueue_fn(q, job_fn, NULL, NULL), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	int64_t busy = t_now_ns() - start;
	int lost = atomic_load(&r.calls);
	char what[64] = "kept";
	if (lost)
		snprintf(what, sizeof(what), "lost %.0f ms after the work began",
		         (atomic_load(&r.at) - start) / 1e6);
	fprintf(stderr, "check_lease: keepalive %s, queue busy for %.0f ms, 600 ms lease: %s\n",
	        _i ? "on its own thread" : "on the busy queue", busy / 1e6, what);
	if (_i) {
		ck_assert_int_ge(busy, 2000 * MS);
		ck_assert_int_eq(lost, 0);
		ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
		ck_assert_int_eq(opq_lease_grant_get(a, &g), 0);
		ck_assert_uint_eq(g.token, g0.token);
		ck_assert_int_gt(ts_ns(&g.acquired), ts_ns(&g0.acquired) + 1500 * MS);
		int64_t left;
		ck_assert_int_eq(opq_lease_remaining(a, NULL, &left), 0);
		ck_assert_int_gt(left, 0);
	} else {
		ck_assert_int_eq(lost, 1);
		ck_assert_int_eq(atomic_load(&r.why), OPQ_LEASE_UNREACHABLE);
	}
	ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	end_queue(q);
}
END_TEST

/* ---- deadlines and cancel ---------------------------------------------------- */

/* How late a call may return past its deadline in these tests: the
 * library's slack is a few ms; the rest is for loaded machines and
 * sanitizers. */
static int64_t slack_ns(void)
{
	const char *m = getenv("CK_TIMEOUT_MULTIPLIER");
	int k = m && atoi(m) > 1 ? atoi(m) : 1;
	return 250 * MS * k;
}

/*
 * A provider that records the deadline of every request and, when told to,
 * waits in its acquire until opq_lease_request_check says stop (the way a
 * store waits for a lock), returning what it said.
 */
struct wp {
	pthread_mutex_t mu;
	bool wait;
	int entered; /* acquires that began */
	int last_rc; /* what the last waiting acquire returned */
	uint64_t token;
	struct timespec dl[3]; /* the last deadline of acquire, refresh, release */
};

static void wp_record(struct wp *w, int i, const opq_lease_request *req)
{
	pthread_mutex_lock(&w->mu);
	w->dl[i] = req->deadline;
	pthread_mutex_unlock(&w->mu);
}

static int wp_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	struct wp *w = store;
	pthread_mutex_lock(&w->mu);
	w->dl[0] = req->deadline;
	w->entered++;
	bool wait = w->wait;
	pthread_mutex_unlock(&w->mu);
	int rc = 0;
	if (wait) {
		while ((rc = opq_lease_request_check(req)) == 0) {
			struct timespec nap = {0, 1000000}; /* the store's own polling */
			nanosleep(&nap, NULL);
		}
		snprintf(req->errbuf, req->errlen, "wp: stopped waiting: %d", rc);
	}
	pthread_mutex_lock(&w->mu);
	if (wait)
		w->last_rc = rc;
	else
		*token = ++w->token;
	pthread_mutex_unlock(&w->mu);
	return rc;
}

static int wp_refresh(void *store, const opq_lease_request *req)
{
	wp_record(store, 1, req);
	return 0;
}

static int wp_release(void *store, const opq_lease_request *req)
{
	wp_record(store, 2, req);
	return 0;
}

static opq_lease_provider *wp_provider(struct wp *w)
{
	memset(w, 0, sizeof(*w));
	pthread_mutex_init(&w->mu, NULL);
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	ops.acquire = wp_acquire;
	ops.refresh = wp_refresh;
	ops.release = wp_release;
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_create(&p, &ops, w), 0);
	return p;
}

static int64_t wp_dl(struct wp *w, int i)
{
	pthread_mutex_lock(&w->mu);
	int64_t ns = ts_ns(&w->dl[i]);
	pthread_mutex_unlock(&w->mu);
	return ns;
}

static void wp_set_wait(struct wp *w, bool wait)
{
	pthread_mutex_lock(&w->mu);
	w->wait = wait;
	pthread_mutex_unlock(&w->mu);
}

static int wp_get(struct wp *w, int *field)
{
	pthread_mutex_lock(&w->mu);
	int v = *field;
	pthread_mutex_unlock(&w->mu);
	return v;
}

/* Every call hands its provider the deadline it documents, and a
 * provider that waits until then makes the call return by it. */
START_TEST(test_deadlines_passed_down)
{
	struct wp w;
	opq_lease_provider *p = wp_provider(&w);
	const int64_t L = 2000 * MS, margin = L / 100 + 1 * MS;
	opq_lease *l = mk(p, "dl", "A", L);
	opq_lease_grant g;
	/* try_acquire, release: one lease time */
	int64_t t0 = t_now_ns();
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	int64_t t1 = t_now_ns();
	ck_assert_int_ge(wp_dl(&w, 0), t0 + L);
	ck_assert_int_le(wp_dl(&w, 0), t1 + L);
	t0 = t_now_ns();
	ck_assert_int_eq(opq_lease_release(l), 0);
	t1 = t_now_ns();
	ck_assert_int_ge(wp_dl(&w, 2), t0 + L);
	ck_assert_int_le(wp_dl(&w, 2), t1 + L);
	/* acquire: the caller's deadline when it comes first, else one lease time */
	struct timespec dl = t_deadline(300 * MS);
	ck_assert_int_eq(opq_lease_acquire(l, &dl, &g), 0);
	ck_assert_int_eq(wp_dl(&w, 0), ts_ns(&dl));
	dl = t_deadline(60 * SEC);
	t0 = t_now_ns();
	ck_assert_int_eq(opq_lease_acquire(l, &dl, &g), 0);
	t1 = t_now_ns();
	ck_assert_int_ge(wp_dl(&w, 0), t0 + L);
	ck_assert_int_le(wp_dl(&w, 0), t1 + L);
	t0 = t_now_ns();
	ck_assert_int_eq(opq_lease_acquire(l, NULL, &g), 0);
	t1 = t_now_ns();
	ck_assert_int_ge(wp_dl(&w, 0), t0 + L);
	ck_assert_int_le(wp_dl(&w, 0), t1 + L);
	/* refresh: the lease's local end */
	ck_assert_int_eq(opq_lease_refresh(l, NULL), 0);
	ck_assert_int_eq(wp_dl(&w, 1), ts_ns(&g.acquired) + L - margin);
	/* a store that waits for its deadline: acquire returns ETIMEDOUT by
	 * the caller's deadline, plus a little */
	wp_set_wait(&w, true);
	dl = t_deadline(300 * MS);
	ck_assert_int_eq(opq_lease_acquire(l, &dl, NULL), ETIMEDOUT);
	int64_t late = t_now_ns() - ts_ns(&dl);
	ck_assert_int_eq(wp_get(&w, &w.last_rc), ETIMEDOUT);
	ck_assert_int_ge(late, 0);
	ck_assert_int_lt(late, slack_ns());
	/* a deadline already past: one try, which waits for nothing */
	dl = t_deadline(-5 * MS);
	t0 = t_now_ns();
	ck_assert_int_eq(opq_lease_acquire(l, &dl, NULL), ETIMEDOUT);
	ck_assert_int_lt(t_now_ns() - t0, slack_ns());
	ck_assert_int_eq(wp_dl(&w, 0), ts_ns(&dl));
	char words[64];
	ck_assert_int_eq(opq_lease_error(l, words, sizeof(words)), 0);
	ck_assert_msg(strstr(words, "wp: stopped waiting") != NULL, "%s", words);
	/* refresh once the local end has passed: one lease time */
	wp_set_wait(&w, false);
	opq_lease *s = mk(p, "dl-short", "A", 20 * MS);
	ck_assert_int_eq(opq_lease_try_acquire(s, &g), 0);
	pass_ns(30 * MS);
	t0 = t_now_ns();
	ck_assert_int_eq(opq_lease_refresh(s, NULL), 0);
	t1 = t_now_ns();
	ck_assert_int_ge(wp_dl(&w, 1), t0 + 20 * MS);
	ck_assert_int_le(wp_dl(&w, 1), t1 + 20 * MS);
	ck_assert_int_eq(opq_lease_destroy(s), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	pthread_mutex_destroy(&w.mu);
}
END_TEST

struct acquirer {
	opq_lease *l;
	struct t_gate started;
	atomic_int rc;
	atomic_llong returned_at;
};

static void *acquirer_main(void *arg)
{
	struct acquirer *a = arg;
	t_gate_open(&a->started);
	int rc = opq_lease_acquire(a->l, NULL, NULL); /* forever, unless cancelled */
	atomic_store(&a->returned_at, t_now_ns());
	atomic_store(&a->rc, rc);
	return NULL;
}

static void acquirer_start(struct acquirer *a, pthread_t *th, opq_lease *l)
{
	a->l = l;
	atomic_store(&a->rc, -1);
	t_gate_init(&a->started);
	ck_assert_int_eq(pthread_create(th, NULL, acquirer_main, a), 0);
	ck_assert(t_gate_wait(&a->started));
}

/*
 * A daemon's signal thread stops a blocked acquire: opq_lease_cancel from
 * another thread, at moments that find the acquire before its first try,
 * in a store call or in its backoff; it returns ECANCELED promptly, and
 * every later acquire at once. The lock stays usable.
 */
START_TEST(test_cancel_in_backoff)
{
	opq_lease_provider *p;
	ck_assert_int_eq(opq_lease_provider_memory_create(&p), 0);
	opq_lease *holder = mk(p, "cx", "H", 30 * SEC);
	ck_assert_int_eq(opq_lease_try_acquire(holder, NULL), 0);
	long iters = t_scale(40);
	for (long i = 0; i < iters; i++) {
		opq_lease *l = mk(p, "cx", "W", 30 * SEC); /* polls every 1..20 ms */
		struct acquirer a;
		pthread_t th;
		acquirer_start(&a, &th, l);
		if (i % 4)
			pass_ns((i % 4) * 7 * MS); /* cancel at varying points of the polling */
		int64_t cancelled = t_now_ns();
		ck_assert_int_eq(opq_lease_cancel(l), 0);
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_int_eq(atomic_load(&a.rc), ECANCELED);
		ck_assert_int_lt(atomic_load(&a.returned_at) - cancelled, slack_ns());
		t_gate_destroy(&a.started);
		/* later ones at once; the rest of the handle still works */
		struct timespec dl = t_deadline(T_WAIT_NS);
		ck_assert_int_eq(opq_lease_acquire(l, &dl, NULL), ECANCELED);
		ck_assert_int_eq(opq_lease_acquire(l, NULL, NULL), ECANCELED);
		ck_assert_int_eq(opq_lease_try_acquire(l, NULL), EBUSY);
		ck_assert_int_eq(opq_lease_destroy(l), 0);
	}
	/* a cancelled handle's non-blocking calls: it may still take and release */
	opq_lease *l = mk(p, "cx", "W", 30 * SEC);
	ck_assert_int_eq(opq_lease_cancel(l), 0);
	ck_assert_int_eq(opq_lease_release(holder), 0);
	ck_assert_int_eq(opq_lease_acquire(l, NULL, NULL), ECANCELED);
	ck_assert_int_eq(opq_lease_try_acquire(l, NULL), 0);
	ck_assert_int_eq(opq_lease_refresh(l, NULL), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_destroy(holder), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* A cancel reaches a store call in flight: the provider's check says so. */
START_TEST(test_cancel_in_store_call)
{
	struct wp w;
	opq_lease_provider *p = wp_provider(&w);
	wp_set_wait(&w, true);
	long iters = t_scale(20);
	for (long i = 0; i < iters; i++) {
		opq_lease *l = mk(p, "cs", "A", 30 * SEC);
		struct acquirer a;
		pthread_t th;
		int before = wp_get(&w, &w.entered);
		acquirer_start(&a, &th, l);
		T_WAIT_UNTIL(wp_get(&w, &w.entered) > before); /* in the store call */
		int64_t cancelled = t_now_ns();
		ck_assert_int_eq(opq_lease_cancel(l), 0);
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_int_eq(atomic_load(&a.rc), ECANCELED);
		ck_assert_int_eq(wp_get(&w, &w.last_rc), ECANCELED);
		ck_assert_int_lt(atomic_load(&a.returned_at) - cancelled, slack_ns());
		/* no try after the cancel: the store saw one acquire */
		ck_assert_int_eq(wp_get(&w, &w.entered), before + 1);
		t_gate_destroy(&a.started);
		/* a cancelled acquire's store failure is not the handle's error */
		char words[64];
		ck_assert_int_eq(opq_lease_error(l, words, sizeof(words)), 0);
		ck_assert_str_eq(words, "");
		/* try_acquire is not cancelled: its store call waits its bound */
		ck_assert_int_eq(opq_lease_destroy(l), 0);
	}
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	pthread_mutex_destroy(&w.mu);
}
END_TEST

/* A scope task's acquire, in a store call, when its scope is cancelled. */
struct scoped {
	opq_lease *l;
	atomic_int rc;
};

static int scoped_acquire(opq_scope *scope, void *arg)
{
	(void)scope;
	struct scoped *sa = arg;
	int rc = opq_lease_acquire(sa->l, NULL, NULL);
	atomic_store(&sa->rc, rc);
	return rc;
}

START_TEST(test_scope_cancel_in_store_call)
{
	struct wp w;
	opq_lease_provider *p = wp_provider(&w);
	wp_set_wait(&w, true);
	opq_queue *q = mk_queue(1);
	opq_lease *l = mk(p, "sc", "A", 30 * SEC);
	opq_scope *sc;
	ck_assert_int_eq(opq_scope_create(&sc, q, NULL), 0);
	struct scoped sa = {.l = l};
	atomic_store(&sa.rc, -1);
	ck_assert_int_eq(opq_scope_spawn(sc, NULL, scoped_acquire, &sa, NULL, NULL, NULL), 0);
	T_WAIT_UNTIL(wp_get(&w, &w.entered) == 1);
	ck_assert_int_eq(opq_scope_cancel(sc), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_scope_wait(sc, &dl, NULL), 0);
	ck_assert_int_eq(atomic_load(&sa.rc), ECANCELED);
	ck_assert_int_eq(wp_get(&w, &w.last_rc), ECANCELED);
	ck_assert_int_eq(opq_scope_destroy(sc), 0);
	/* the handle itself is not cancelled: outside the scope it waits again */
	wp_set_wait(&w, false);
	ck_assert_int_eq(opq_lease_acquire(l, NULL, NULL), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	end_queue(q);
	pthread_mutex_destroy(&w.mu);
}
END_TEST

/* ---- lost delivered on a channel ------------------------------------------------ */

/* A loop thread: polls the channel's descriptor and runs its completions
 * until told to quit. */
struct loop {
	opq_chan *ch;
	pthread_t thread;
	atomic_bool quit;
};

static void *loop_main(void *arg)
{
	struct loop *lp = arg;
	int fd;
	ck_assert_int_eq(opq_chan_fd(lp->ch, &fd), 0);
	while (!atomic_load(&lp->quit)) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		if (poll(&pfd, 1, 10) > 0)
			ck_assert_int_eq(opq_chan_run(lp->ch, 16, NULL), 0);
	}
	return NULL;
}

static void loop_start(struct loop *lp, opq_chan *ch)
{
	lp->ch = ch;
	atomic_store(&lp->quit, false);
	ck_assert_int_eq(pthread_create(&lp->thread, NULL, loop_main, lp), 0);
}

static void loop_end(struct loop *lp)
{
	atomic_store(&lp->quit, true);
	ck_assert_int_eq(pthread_join(lp->thread, NULL), 0);
}

struct chan_rec {
	atomic_int calls;
	atomic_int why;
	pthread_t thread;
	int rc_stop;
};

static void on_lost_chan(opq_lease *l, enum opq_lease_lost_reason why, void *arg)
{
	struct chan_rec *r = arg;
	r->thread = pthread_self();
	/* on the loop's thread nothing waits for the loop: stop returns */
	r->rc_stop = opq_lease_keepalive_stop(l);
	atomic_store(&r->why, (int)why);
	atomic_fetch_add(&r->calls, 1);
}

/* Whether the channel's descriptor becomes readable within 5 s. */
static bool chan_readable(opq_chan *ch)
{
	int fd;
	ck_assert_int_eq(opq_chan_fd(ch, &fd), 0);
	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	return poll(&pfd, 1, 5000) == 1;
}

/*
 * lost(TAKEN) (_i 0, 1) and lost(UNREACHABLE) (_i 2, 3) delivered on a
 * channel, on the loop's thread, exactly once; _i odd: refreshes on the
 * keepalive's own thread, even: on a queue. _i 4, 5: the loop runs all
 * along (TAKEN, UNREACHABLE); otherwise it starts only after the delivery
 * is in the channel, to check what refuses meanwhile.
 */
START_TEST(test_keepalive_lost_on_chan)
{
	bool unreachable = _i == 2 || _i == 3 || _i == 5;
	bool own = _i % 2 == 1;
	bool live = _i >= 4;
	struct tp s;
	opq_lease_provider *p = tp_provider(&s);
	opq_queue *q = mk_queue(1);
	opq_queue *kq = own ? NULL : q;
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	opq_lease_attr *at;
	ck_assert_int_eq(opq_lease_attr_create(&at), 0);
	ck_assert_int_eq(opq_lease_attr_set_owner(at, "A"), 0);
	ck_assert_int_eq(opq_lease_attr_set_duration(at, 600 * MS), 0);
	ck_assert_int_eq(opq_lease_attr_set_chan(at, ch), 0);
	opq_lease *a = NULL;
	ck_assert_int_eq(opq_lease_create(&a, p, "k", at), 0);
	opq_lease_attr_destroy(at);
	ck_assert_int_eq(opq_lease_try_acquire(a, NULL), 0);
	struct chan_rec r;
	memset(&r, 0, sizeof(r));
	/* a keepalive that only stops gives its acceptance back */
	ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 30 * MS, on_lost_chan, &r), 0);
	ck_assert_int_eq(opq_chan_destroy(ch), EBUSY);
	ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	/* the attributes were copied: point the handle at the new channel */
	a->a.chan = ch;
	struct loop lp;
	if (live)
		loop_start(&lp, ch);
	ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 30 * MS, on_lost_chan, &r), 0);
	T_WAIT_UNTIL(tp_get(&s, &s.refreshes) >= 2);
	if (unreachable)
		tp_set(&s, TP_FAIL);
	else
		tp_steal(&s);
	if (!live) {
		ck_assert(chan_readable(ch));
		ck_assert_int_eq(atomic_load(&r.calls), 0);
		/* the delivery waits in the channel: it refuses what would
		 * free it or start anew; stop returns at once */
		ck_assert_int_eq(opq_chan_destroy(ch), EBUSY);
		ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 0, on_lost_chan, &r),
		                 unreachable ? EBUSY : ENOLCK);
		ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
		ck_assert_int_eq(opq_lease_destroy(a), EBUSY);
		ck_assert_int_eq(opq_lease_destroy(a), EBUSY);
		ck_assert_int_eq(atomic_load(&r.calls), 0);
		loop_start(&lp, ch);
	}
	T_WAIT_UNTIL(atomic_load(&r.calls) == 1);
	ck_assert(pthread_equal(r.thread, lp.thread));
	ck_assert_int_eq(atomic_load(&r.why),
	                 unreachable ? OPQ_LEASE_UNREACHABLE : OPQ_LEASE_TAKEN);
	ck_assert_int_eq(r.rc_stop, 0);
	pass_ns(100 * MS);
	ck_assert_int_eq(atomic_load(&r.calls), 1); /* once */
	if (unreachable) {
		/* the store is back: a new keepalive may start (its grant may
		 * be locally over already: then it is lost again at once, and
		 * the channel may be free already) */
		tp_set(&s, TP_OK);
		ck_assert_int_eq(opq_lease_keepalive_start(a, kq, 30 * MS, on_lost_chan, &r), 0);
		ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
	}
	int rc;
	T_WAIT_UNTIL((rc = opq_lease_destroy(a)) != EBUSY);
	ck_assert_int_eq(rc, 0);
	loop_end(&lp);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	tp_fini(&s);
	end_queue(q);
}
END_TEST

/* Keepalives on one channel whose lock is stolen while the loop runs,
 * with stops racing the delivery: lost comes at most once (exactly once
 * without a stop), destroy succeeds once the loop ran it, and the
 * channel's count settles so that it can be destroyed. */
START_TEST(test_keepalive_lost_on_chan_churn)
{
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct loop lp;
	loop_start(&lp, ch);
	for (int it = 0; it < 40; it++) {
		struct tp s;
		opq_lease_provider *p = tp_provider(&s);
		opq_lease_attr *at;
		ck_assert_int_eq(opq_lease_attr_create(&at), 0);
		ck_assert_int_eq(opq_lease_attr_set_duration(at, 300 * MS), 0);
		ck_assert_int_eq(opq_lease_attr_set_chan(at, ch), 0);
		opq_lease *a = NULL;
		ck_assert_int_eq(opq_lease_create(&a, p, "c", at), 0);
		opq_lease_attr_destroy(at);
		ck_assert_int_eq(opq_lease_try_acquire(a, NULL), 0);
		struct chan_rec r;
		memset(&r, 0, sizeof(r));
		ck_assert_int_eq(opq_lease_keepalive_start(a, NULL, 2 * MS, on_lost_chan, &r), 0);
		T_WAIT_UNTIL(tp_get(&s, &s.refreshes) >= 1);
		tp_steal(&s);
		if (it % 2)
			ck_assert_int_eq(opq_lease_keepalive_stop(a), 0);
		else
			T_WAIT_UNTIL(atomic_load(&r.calls) == 1);
		int rc;
		T_WAIT_UNTIL((rc = opq_lease_destroy(a)) != EBUSY);
		ck_assert_int_eq(rc, 0);
		ck_assert_int_le(atomic_load(&r.calls), 1);
		if (atomic_load(&r.calls))
			ck_assert(pthread_equal(r.thread, lp.thread));
		ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
		tp_fini(&s);
	}
	loop_end(&lp);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("lease");
	TCase *tc = t_tcase(s, "memory", 120);
	tcase_add_test(tc, test_bad_input);
	tcase_add_test(tc, test_destroy_types);
	tcase_add_test(tc, test_default_owner_and_errors);
	tcase_add_test(tc, test_tokens);
	tcase_add_test(tc, test_remaining);
	tcase_add_test(tc, test_suspend);
	tcase_add_test(tc, test_takeover_at_expiry);
	tcase_add_test(tc, test_blocking_acquire);
	tcase_add_test(tc, test_mutual_exclusion);
	tcase_add_test(tc, test_fault_sweep);
	tcase_add_test(tc, test_fault_sweep_rest);
	tcase_add_test(tc, test_round_trips);
	tc = t_tcase(s, "keepalive", 120);
	tcase_add_test(tc, test_keepalive_keeps);
	tcase_add_loop_test(tc, test_keepalive_taken, 0, 2);
	tcase_add_loop_test(tc, test_keepalive_unreachable_fail, 0, 2);
	tcase_add_loop_test(tc, test_keepalive_unreachable_hang, 0, 2);
	tcase_add_loop_test(tc, test_keepalive_stop_in_flight, 0, 2);
	tcase_add_loop_test(tc, test_keepalive_destroy_in_flight, 0, 2);
	tcase_add_loop_test(tc, test_keepalive_churn, 0, 2);
	tcase_add_loop_test(tc, test_keepalive_starved, 0, 2);
	tcase_add_loop_test(tc, test_keepalive_lost_on_chan, 0, 6);
	tcase_add_test(tc, test_keepalive_lost_on_chan_churn);
	tc = t_tcase(s, "time", 120);
	tcase_add_test(tc, test_deadlines_passed_down);
	tcase_add_test(tc, test_cancel_in_backoff);
	tcase_add_test(tc, test_cancel_in_store_call);
	tcase_add_test(tc, test_scope_cancel_in_store_call);
	tcase_add_test(tc, test_huge_lease);
	return t_run(s);
}
