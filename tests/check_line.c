/*
 * check_line.c: the line (one-track railway line): API and error paths,
 * the static initializer, the races the generation counter exists for,
 * status propagation, deadlines, late failures, and a stress of the retry
 * loop checking that at most one thread ever holds the token.
 */
#include "config.h"
#include "harness.h"

#include <string.h>

/* ---- helpers -------------------------------------------------------------- */

/* Wait until exactly n threads are blocked in a wait on the line. */
static unsigned line_waiters(opq_line *l)
{
	/* The count is private; the tests read it under the line's mutex. */
	pthread_mutex_lock(&l->opq__mu);
	unsigned n = l->opq__waiters;
	pthread_mutex_unlock(&l->opq__mu);
	return n;
}

struct waiter {
	pthread_t th;
	opq_line *line;
	opq_line_ticket ticket;
	int idle;           /* use wait_idle instead of wait */
	int leave;          /* do not touch the line after the wait returns */
	int64_t timeout_ns; /* 0: T_WAIT_NS */
	atomic_int done;
	int rc;
	int status;
	uint64_t gen_after;
};

static void *waiter_main(void *arg)
{
	struct waiter *w = arg;
	struct timespec dl = t_deadline(w->timeout_ns ? w->timeout_ns : T_WAIT_NS);
	w->status = -12345;
	if (w->idle)
		w->rc = opq_line_wait_idle(w->line, &dl, &w->status);
	else
		w->rc = opq_line_wait(w->line, &w->ticket, &dl, &w->status);
	if (!w->leave)
		opq_line_generation(w->line, &w->gen_after);
	atomic_store(&w->done, 1);
	return NULL;
}

static void waiter_start(struct waiter *w, opq_line *l, const opq_line_ticket *t)
{
	memset(w, 0, sizeof(*w));
	w->line = l;
	if (t)
		w->ticket = *t;
	else
		w->idle = 1;
	ck_assert_int_eq(pthread_create(&w->th, NULL, waiter_main, w), 0);
}

static void waiter_join(struct waiter *w)
{
	T_WAIT_UNTIL(atomic_load(&w->done));
	ck_assert_int_eq(pthread_join(w->th, NULL), 0);
}

/* ---- API and error paths -------------------------------------------------- */

START_TEST(test_api_errors)
{
	opq_line l, other;
	opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER, u = OPQ_LINE_TICKET_INITIALIZER;
	uint64_t g;
	int b, st;

	ck_assert_int_eq(opq_line_init(NULL), EINVAL);
	ck_assert_int_eq(opq_line_destroy(NULL), 0);
	ck_assert_int_eq(opq_line_init(&l), 0);
	ck_assert_int_eq(opq_line_init(&other), 0);

	ck_assert_int_eq(opq_line_generation(NULL, &g), EINVAL);
	ck_assert_int_eq(opq_line_generation(&l, NULL), EINVAL);
	ck_assert_int_eq(opq_line_busy(NULL, &b), EINVAL);
	ck_assert_int_eq(opq_line_busy(&l, NULL), EINVAL);
	ck_assert_int_eq(opq_line_try_acquire(NULL, OPQ_LINE_ANY, &t), EINVAL);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, NULL), EINVAL);
	ck_assert_int_eq(opq_line_wait(NULL, &t, NULL, &st), EINVAL);
	ck_assert_int_eq(opq_line_wait(&l, NULL, NULL, &st), EINVAL);
	ck_assert_int_eq(opq_line_release(NULL, &t, 0), EINVAL);
	ck_assert_int_eq(opq_line_release(&l, NULL, 0), EINVAL);
	ck_assert_int_eq(opq_line_wait_idle(NULL, NULL, &st), EINVAL);
	/* A fresh ticket belongs to no line: waiting or releasing it is EINVAL. */
	ck_assert_int_eq(opq_line_wait(&l, &t, NULL, &st), EINVAL);
	ck_assert_int_eq(opq_line_release(&l, &t, 0), EINVAL);
	/* A generation the line has not reached. */
	ck_assert_int_eq(opq_line_try_acquire(&l, 5, &t), EINVAL);

	ck_assert_int_eq(opq_line_generation(&l, &g), 0);
	ck_assert_uint_eq(g, 0);
	ck_assert_int_eq(opq_line_busy(&l, &b), 0);
	ck_assert_int_eq(b, 0);
	st = 7;
	ck_assert_int_eq(opq_line_wait_idle(&l, NULL, &st), 0);
	ck_assert_int_eq(st, 0);

	/* Acquire; "or token": acquiring again with the held ticket keeps it. */
	ck_assert_int_eq(opq_line_try_acquire(&l, g, &t), 0);
	ck_assert_int_eq(t.held, 1);
	ck_assert_ptr_eq(t.line, &l);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &t), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, g, &t), 0);
	ck_assert_int_eq(opq_line_busy(&l, &b), 0);
	ck_assert_int_eq(b, 1);
	/* The holder waiting on its own ticket would wait for itself. */
	ck_assert_int_eq(opq_line_wait(&l, &t, NULL, &st), EDEADLK);
	/* Another thread's try fails. */
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &u), EBUSY);
	ck_assert_int_eq(u.held, 0);
	ck_assert_uint_eq(u.gen, 0);
	/* Releasing a ticket that does not hold: EPERM. */
	ck_assert_int_eq(opq_line_release(&l, &u, 0), EPERM);
	/* A ticket of another line: EINVAL everywhere. */
	ck_assert_int_eq(opq_line_try_acquire(&other, OPQ_LINE_ANY, &t), EINVAL);
	ck_assert_int_eq(opq_line_release(&other, &t, 0), EINVAL);
	ck_assert_int_eq(opq_line_wait(&other, &u, NULL, &st), EINVAL);
	ck_assert_int_eq(opq_line_destroy(&l), EBUSY);

	/* A stale copy of the holder's ticket cannot release twice. */
	opq_line_ticket copy = t;
	ck_assert_int_eq(opq_line_release(&l, &t, 42), 0);
	ck_assert_int_eq(t.held, 0);
	ck_assert_int_eq(opq_line_release(&l, &t, 0), EPERM);
	ck_assert_int_eq(opq_line_release(&l, &copy, 0), EPERM);
	/* ... not even after somebody else acquired. */
	opq_line_ticket v = OPQ_LINE_TICKET_INITIALIZER;
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &v), 0);
	ck_assert_uint_eq(v.gen, 1);
	ck_assert_int_eq(opq_line_release(&l, &copy, 0), EPERM);
	/* and a stale "held" ticket cannot claim the token back. */
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &copy), EINVAL);
	ck_assert_int_eq(opq_line_busy(&l, &b), 0);
	ck_assert_int_eq(b, 1);
	ck_assert_int_eq(opq_line_release(&l, &v, 43), 0);

	/* u failed at generation 0: its wait returns at once with 42. */
	st = 0;
	ck_assert_int_eq(opq_line_wait(&l, &u, NULL, &st), 0);
	ck_assert_int_eq(st, 42);
	st = 0;
	ck_assert_int_eq(opq_line_wait_idle(&l, NULL, NULL), 0);
	ck_assert_int_eq(opq_line_wait_idle(&l, NULL, &st), 0);
	ck_assert_int_eq(st, 43);
	ck_assert_int_eq(opq_line_generation(&l, &g), 0);
	ck_assert_uint_eq(g, 2);

	/* A ticket of a generation the line has not reached. */
	opq_line_ticket future = {&l, 3, 0};
	ck_assert_int_eq(opq_line_wait(&l, &future, NULL, &st), EINVAL);

	ck_assert_int_eq(opq_line_destroy(&l), 0);
	ck_assert_int_eq(opq_line_destroy(&other), 0);
	/* A destroyed line can be initialised again. */
	ck_assert_int_eq(opq_line_init(&l), 0);
	ck_assert_int_eq(opq_line_destroy(&l), 0);
}
END_TEST

START_TEST(test_destroy_busy_with_waiter)
{
	opq_line l;
	opq_line_ticket h = OPQ_LINE_TICKET_INITIALIZER, f = OPQ_LINE_TICKET_INITIALIZER;
	struct waiter w;
	ck_assert_int_eq(opq_line_init(&l), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &h), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &f), EBUSY);
	waiter_start(&w, &l, &f);
	T_WAIT_UNTIL(line_waiters(&l) == 1);
	ck_assert_int_eq(opq_line_destroy(&l), EBUSY);
	ck_assert_int_eq(opq_line_release(&l, &h, 9), 0);
	waiter_join(&w);
	ck_assert_int_eq(w.rc, 0);
	ck_assert_int_eq(w.status, 9);
	ck_assert_int_eq(opq_line_destroy(&l), 0);
}
END_TEST

/*
 * Release and destroy at once, with waiters blocked: the woken waiters are
 * still inside their wait until they have taken the mutex again, so destroy
 * says EBUSY until each has returned, then 0. The line is freed as soon as
 * destroy returns 0, so that a waiter still touching it is a use after free
 * (ASan, TSan), and in a debug build a lock of a destroyed error-checking
 * mutex (an assertion).
 */
#define RD_ROUNDS  200
#define RD_WAITERS 4

START_TEST(test_release_then_destroy)
{
	int busy_rounds = 0;
	for (int round = 0; round < RD_ROUNDS; round++) {
		opq_line *l = malloc(sizeof(*l));
		ck_assert_ptr_nonnull(l);
		ck_assert_int_eq(opq_line_init(l), 0);
		opq_line_ticket h = OPQ_LINE_TICKET_INITIALIZER, f = OPQ_LINE_TICKET_INITIALIZER;
		ck_assert_int_eq(opq_line_try_acquire(l, OPQ_LINE_ANY, &h), 0);
		ck_assert_int_eq(opq_line_try_acquire(l, OPQ_LINE_ANY, &f), EBUSY);
		struct waiter w[RD_WAITERS];
		for (int i = 0; i < RD_WAITERS; i++) {
			/* Half wait on the failed ticket, half for idle: the same wait. */
			memset(&w[i], 0, sizeof(w[i]));
			w[i].line = l;
			w[i].ticket = f;
			w[i].idle = i % 2;
			w[i].leave = 1;
			ck_assert_int_eq(pthread_create(&w[i].th, NULL, waiter_main, &w[i]), 0);
		}
		T_WAIT_UNTIL(line_waiters(l) == RD_WAITERS);
		ck_assert_int_eq(opq_line_release(l, &h, round), 0);
		struct timespec dl = t_deadline(T_WAIT_NS);
		int rc;
		bool busy = false;
		for (;;) {
			/* Read before destroy: once every waiter has returned, 0. */
			bool all_returned = true;
			for (int i = 0; i < RD_WAITERS; i++)
				all_returned = all_returned && atomic_load(&w[i].done);
			rc = opq_line_destroy(l);
			if (rc != EBUSY)
				break;
			ck_assert_msg(!all_returned, "round %d: EBUSY with every waiter returned",
			              round);
			ck_assert_msg(!t_passed(&dl), "round %d: destroy still EBUSY", round);
			busy = true;
			sched_yield();
		}
		ck_assert_int_eq(rc, 0);
		free(l);
		for (int i = 0; i < RD_WAITERS; i++) {
			waiter_join(&w[i]);
			ck_assert_int_eq(w[i].rc, 0);
			ck_assert_int_eq(w[i].status, round);
		}
		busy_rounds += busy;
	}
	/*
	 * The release returns before the waiters it woke have run: a destroy
	 * right after it finds some of them still inside in many rounds (a
	 * quarter or more here; never before waiters were counted until they
	 * return).
	 */
	ck_assert_int_gt(busy_rounds, 0);
}
END_TEST

/* ---- static initializer --------------------------------------------------- */

static opq_line static_line = OPQ_LINE_INITIALIZER;

START_TEST(test_static_initializer)
{
	opq_line_ticket h = OPQ_LINE_TICKET_INITIALIZER, f = OPQ_LINE_TICKET_INITIALIZER;
	uint64_t g;
	int st = -1;
	ck_assert_int_eq(opq_line_generation(&static_line, &g), 0);
	ck_assert_uint_eq(g, 0);
	ck_assert_int_eq(opq_line_try_acquire(&static_line, g, &h), 0);
	ck_assert_int_eq(opq_line_try_acquire(&static_line, g, &f), EBUSY);
	/* A deadline wait on a statically initialised line: monotonic deadline. */
	struct timespec dl = t_deadline(20 * 1000000LL);
	ck_assert_int_eq(opq_line_wait(&static_line, &f, &dl, &st), ETIMEDOUT);
	ck_assert_int_eq(st, -1);
	ck_assert(t_passed(&dl));
	dl = t_deadline(0);
	ck_assert_int_eq(opq_line_wait_idle(&static_line, &dl, &st), ETIMEDOUT);
	/* And a waiter that is woken by the release. */
	struct waiter w;
	waiter_start(&w, &static_line, &f);
	T_WAIT_UNTIL(line_waiters(&static_line) == 1);
	ck_assert_int_eq(opq_line_release(&static_line, &h, 5), 0);
	waiter_join(&w);
	ck_assert_int_eq(w.rc, 0);
	ck_assert_int_eq(w.status, 5);
	ck_assert_int_eq(opq_line_destroy(&static_line), 0);
}
END_TEST

/* ---- the races ------------------------------------------------------------ */

/* The release happens between the failed try and the wait: no blocking. */
START_TEST(test_release_between_try_and_wait)
{
	opq_line l = OPQ_LINE_INITIALIZER;
	opq_line_ticket h = OPQ_LINE_TICKET_INITIALIZER, f = OPQ_LINE_TICKET_INITIALIZER;
	int st = 0;
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &h), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &f), EBUSY);
	ck_assert_int_eq(opq_line_release(&l, &h, 77), 0);
	/* NULL deadline: if this blocked, the test case would time out. */
	ck_assert_int_eq(opq_line_wait(&l, &f, NULL, &st), 0);
	ck_assert_int_eq(st, 77);
	ck_assert_int_eq(line_waiters(&l), 0);
	ck_assert_int_eq(opq_line_destroy(&l), 0);
}
END_TEST

/* A holds, B fails at g, A releases, C acquires: B does not wait for C. */
START_TEST(test_never_waits_for_later_holder)
{
	opq_line l = OPQ_LINE_INITIALIZER;
	opq_line_ticket a = OPQ_LINE_TICKET_INITIALIZER, b = OPQ_LINE_TICKET_INITIALIZER,
	                c = OPQ_LINE_TICKET_INITIALIZER;
	int st = 0;
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &a), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &b), EBUSY);
	ck_assert_int_eq(opq_line_release(&l, &a, 11), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &c), 0);
	ck_assert_int_eq(opq_line_wait(&l, &b, NULL, &st), 0);
	ck_assert_int_eq(st, 11);
	ck_assert_int_eq(opq_line_release(&l, &c, 12), 0);
	/* After several more releases the status of A's release is still A's. */
	for (int i = 0; i < OPQ_LINE_HISTORY - 2; i++) {
		opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
		ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &t), 0);
		ck_assert_int_eq(opq_line_release(&l, &t, 100 + i), 0);
	}
	st = 0;
	ck_assert_int_eq(opq_line_wait(&l, &b, NULL, &st), 0);
	ck_assert_int_eq(st, 11);
	/* One release more and it is forgotten: ESTALE, status untouched. */
	opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &t), 0);
	ck_assert_int_eq(opq_line_release(&l, &t, 200), 0);
	st = -1;
	ck_assert_int_eq(opq_line_wait(&l, &b, NULL, &st), ESTALE);
	ck_assert_int_eq(st, -1);
	ck_assert_int_eq(opq_line_destroy(&l), 0);
}
END_TEST

/* The same with B blocked first: B wakes with A's status although C holds. */
START_TEST(test_blocked_waiter_not_held_by_later_holder)
{
	opq_line l = OPQ_LINE_INITIALIZER;
	opq_line_ticket a = OPQ_LINE_TICKET_INITIALIZER, b = OPQ_LINE_TICKET_INITIALIZER,
	                c = OPQ_LINE_TICKET_INITIALIZER;
	struct waiter w;
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &a), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &b), EBUSY);
	waiter_start(&w, &l, &b);
	T_WAIT_UNTIL(line_waiters(&l) == 1);
	/* Release and re-acquire under the line's mutex, before B can run. */
	ck_assert_int_eq(opq_line_release(&l, &a, 21), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &c), 0);
	/* Many releases while B may not have woken yet: its status is exact. */
	for (int i = 0; i < 2 * OPQ_LINE_HISTORY; i++) {
		ck_assert_int_eq(opq_line_release(&l, &c, 1000 + i), 0);
		ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &c), 0);
	}
	waiter_join(&w);
	ck_assert_int_eq(w.rc, 0);
	ck_assert_int_eq(w.status, 21);
	ck_assert_int_eq(opq_line_busy(&l, &(int){0}), 0);
	ck_assert_int_eq(opq_line_release(&l, &c, 0), 0);
	ck_assert_int_eq(opq_line_destroy(&l), 0);
}
END_TEST

/* Every waiter of a generation gets its status, none of the next one. */
START_TEST(test_status_per_generation)
{
	enum { N = 8 };
	opq_line l;
	ck_assert_int_eq(opq_line_init(&l), 0);
	opq_line_ticket h = OPQ_LINE_TICKET_INITIALIZER;
	struct waiter w1[N], w2[N];
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &h), 0);
	for (int i = 0; i < N; i++) {
		opq_line_ticket f = OPQ_LINE_TICKET_INITIALIZER;
		ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &f), EBUSY);
		waiter_start(&w1[i], &l, i % 2 ? &f : NULL);
	}
	T_WAIT_UNTIL(line_waiters(&l) == N);
	ck_assert_int_eq(opq_line_release(&l, &h, 1), 0);
	/* The second generation starts before the first waiters are joined. */
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &h), 0);
	for (int i = 0; i < N; i++) {
		opq_line_ticket f = OPQ_LINE_TICKET_INITIALIZER;
		ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &f), EBUSY);
		ck_assert_uint_eq(f.gen, 1);
		waiter_start(&w2[i], &l, i % 2 ? &f : NULL);
	}
	for (int i = 0; i < N; i++) {
		waiter_join(&w1[i]);
		ck_assert_int_eq(w1[i].rc, 0);
		ck_assert_int_eq(w1[i].status, 1);
	}
	T_WAIT_UNTIL(line_waiters(&l) == N);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(atomic_load(&w2[i].done), 0);
	ck_assert_int_eq(opq_line_release(&l, &h, 2), 0);
	for (int i = 0; i < N; i++) {
		waiter_join(&w2[i]);
		ck_assert_int_eq(w2[i].rc, 0);
		ck_assert_int_eq(w2[i].status, 2);
		ck_assert_uint_ge(w2[i].gen_after, 2);
	}
	ck_assert_int_eq(opq_line_destroy(&l), 0);
}
END_TEST

/* A deadline passes: ETIMEDOUT, and the other waiters are not affected. */
START_TEST(test_deadline)
{
	opq_line l;
	ck_assert_int_eq(opq_line_init(&l), 0);
	opq_line_ticket h = OPQ_LINE_TICKET_INITIALIZER, f = OPQ_LINE_TICKET_INITIALIZER;
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &h), 0);
	ck_assert_int_eq(opq_line_try_acquire(&l, OPQ_LINE_ANY, &f), EBUSY);
	struct waiter keep, quit;
	waiter_start(&keep, &l, &f);
	T_WAIT_UNTIL(line_waiters(&l) == 1);
	memset(&quit, 0, sizeof(quit));
	quit.line = &l;
	quit.ticket = f;
	quit.timeout_ns = 10 * 1000000LL;
	ck_assert_int_eq(pthread_create(&quit.th, NULL, waiter_main, &quit), 0);
	waiter_join(&quit);
	ck_assert_int_eq(quit.rc, ETIMEDOUT);
	ck_assert_int_eq(quit.status, -12345);
	/* Nothing changed: still held, same generation, one waiter left. */
	int b;
	uint64_t g;
	ck_assert_int_eq(opq_line_busy(&l, &b), 0);
	ck_assert_int_eq(b, 1);
	ck_assert_int_eq(opq_line_generation(&l, &g), 0);
	ck_assert_uint_eq(g, 0);
	ck_assert_int_eq(line_waiters(&l), 1);
	ck_assert_int_eq(atomic_load(&keep.done), 0);
	/* A deadline already passed times out at once. */
	struct timespec past = t_deadline(-1000000000LL);
	ck_assert_int_eq(opq_line_wait(&l, &f, &past, NULL), ETIMEDOUT);
	ck_assert_int_eq(opq_line_wait_idle(&l, &past, NULL), ETIMEDOUT);
	ck_assert_int_eq(line_waiters(&l), 1);
	ck_assert_int_eq(opq_line_release(&l, &h, 3), 0);
	waiter_join(&keep);
	ck_assert_int_eq(keep.rc, 0);
	ck_assert_int_eq(keep.status, 3);
	/* After the release a passed deadline does not matter. */
	int st = 0;
	ck_assert_int_eq(opq_line_wait(&l, &f, &past, &st), 0);
	ck_assert_int_eq(st, 3);
	ck_assert_int_eq(opq_line_destroy(&l), 0);
}
END_TEST

/* ---- late failures -------------------------------------------------------- */

enum { LATE_THREADS = 16 };

struct late {
	opq_line line;
	pthread_barrier_t read, failed;
	atomic_int fixes, already, busy, acquired;
	atomic_long epoch; /* the server's credential epoch */
	atomic_long cred;  /* the epoch of the credentials we hold */
	int staged;        /* 1: thread 0 fixes before the others try */
};

static void *late_main(void *arg)
{
	struct late *s = ((void **)arg)[0];
	long id = (long)((void **)arg)[1];
	uint64_t g;
	ck_assert_int_eq(opq_line_generation(&s->line, &g), 0);
	/* The request goes out with the credentials we have now ... */
	long sent = atomic_load(&s->cred);
	pthread_barrier_wait(&s->read);
	/* ... and fails, late: they had expired. */
	ck_assert_int_ne(sent, atomic_load(&s->epoch));
	if (s->staged && id != 0)
		pthread_barrier_wait(&s->failed);
	opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
	int rc = opq_line_try_acquire(&s->line, g, &t);
	if (rc == 0) {
		atomic_fetch_add(&s->acquired, 1);
		if (atomic_load(&s->cred) != atomic_load(&s->epoch)) {
			atomic_fetch_add(&s->fixes, 1);
			atomic_store(&s->cred, atomic_load(&s->epoch));
		}
		ck_assert_int_eq(opq_line_release(&s->line, &t, 0), 0);
	} else if (rc == EBUSY) {
		atomic_fetch_add(&s->busy, 1);
		struct timespec dl = t_deadline(T_WAIT_NS);
		ck_assert_int_eq(opq_line_wait(&s->line, &t, &dl, NULL), 0);
	} else {
		ck_assert_int_eq(rc, EALREADY);
		atomic_fetch_add(&s->already, 1);
		int st = -1;
		ck_assert_int_eq(opq_line_wait(&s->line, &t, NULL, &st), 0);
		ck_assert_int_eq(st, 0);
	}
	if (s->staged && id == 0)
		pthread_barrier_wait(&s->failed);
	/* The retry succeeds. */
	ck_assert_int_eq(atomic_load(&s->cred), atomic_load(&s->epoch));
	return NULL;
}

static void late_run(int staged)
{
	struct late s;
	memset(&s, 0, sizeof(s));
	ck_assert_int_eq(opq_line_init(&s.line), 0);
	pthread_barrier_init(&s.read, NULL, LATE_THREADS + 1);
	pthread_barrier_init(&s.failed, NULL, LATE_THREADS);
	s.staged = staged;
	pthread_t th[LATE_THREADS];
	void *args[LATE_THREADS][2];
	for (long i = 0; i < LATE_THREADS; i++) {
		args[i][0] = &s;
		args[i][1] = (void *)i;
		ck_assert_int_eq(pthread_create(&th[i], NULL, late_main, args[i]), 0);
	}
	atomic_fetch_add(&s.epoch, 1); /* the credentials expire */
	pthread_barrier_wait(&s.read);
	for (int i = 0; i < LATE_THREADS; i++)
		ck_assert_int_eq(pthread_join(th[i], NULL), 0);
	ck_assert_int_eq(atomic_load(&s.fixes), 1);
	ck_assert_int_eq(atomic_load(&s.acquired), 1);
	ck_assert_int_eq(atomic_load(&s.acquired) + atomic_load(&s.busy) + atomic_load(&s.already),
	                 LATE_THREADS);
	if (staged)
		ck_assert_int_eq(atomic_load(&s.already), LATE_THREADS - 1);
	pthread_barrier_destroy(&s.read);
	pthread_barrier_destroy(&s.failed);
	ck_assert_int_eq(opq_line_destroy(&s.line), 0);
}

/* Thread 0 fixes and releases before the 15 others report their failure. */
START_TEST(test_late_failure_staged)
{
	late_run(1);
}
END_TEST

/* All 16 fail at once, repeatedly: still exactly one fix each time. */
START_TEST(test_late_failure_burst)
{
	for (long i = 0; i < t_scale(200); i++)
		late_run(0);
}
END_TEST

/* ---- stress: the retry loop ---------------------------------------------- */

enum { STRESS_THREADS = 16 };

struct stress {
	opq_line line;
	atomic_long epoch, cred;
	atomic_int holders;
	atomic_long fixes, expiries, waits, already;
	long iters;
};

static void *stress_main(void *arg)
{
	struct stress *s = arg;
	for (long i = 0; i < s->iters; i++) {
		if (i % 100 == 0)
			atomic_fetch_add(&s->expiries, 1), atomic_fetch_add(&s->epoch, 1);
		opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
		for (;;) {
			uint64_t g;
			ck_assert_int_eq(opq_line_generation(&s->line, &g), 0);
			/* The request: fails when the credentials' epoch is old. */
			if (atomic_load(&s->cred) == atomic_load(&s->epoch))
				break;
			int rc = opq_line_try_acquire(&s->line, g, &t);
			if (rc == 0) {
				ck_assert_int_eq(atomic_fetch_add(&s->holders, 1), 0);
				/* "Or token": a retry while holding keeps the token. */
				ck_assert_int_eq(opq_line_try_acquire(&s->line, OPQ_LINE_ANY, &t),
				                 0);
				atomic_fetch_add(&s->fixes, 1);
				atomic_store(&s->cred, atomic_load(&s->epoch));
				ck_assert_int_eq(atomic_fetch_sub(&s->holders, 1), 1);
				ck_assert_int_eq(opq_line_release(&s->line, &t, 0), 0);
			} else if (rc == EBUSY) {
				struct timespec dl = t_deadline(T_WAIT_NS);
				int st = -1;
				/* ESTALE: released so long ago that the status is forgotten. */
				int wrc = opq_line_wait(&s->line, &t, &dl, &st);
				ck_assert_msg(wrc == 0 || wrc == ESTALE, "wait: %d", wrc);
				ck_assert_int_eq(st, wrc == 0 ? 0 : -1);
				uint64_t after;
				ck_assert_int_eq(opq_line_generation(&s->line, &after), 0);
				ck_assert_uint_gt(after, t.gen);
				atomic_fetch_add(&s->waits, 1);
			} else {
				ck_assert_int_eq(rc, EALREADY);
				atomic_fetch_add(&s->already, 1);
			}
		}
	}
	return NULL;
}

START_TEST(test_stress_retry_loop)
{
	struct stress s;
	memset(&s, 0, sizeof(s));
	ck_assert_int_eq(opq_line_init(&s.line), 0);
	s.iters = t_scale(10000);
	pthread_t th[STRESS_THREADS];
	for (int i = 0; i < STRESS_THREADS; i++)
		ck_assert_int_eq(pthread_create(&th[i], NULL, stress_main, &s), 0);
	for (int i = 0; i < STRESS_THREADS; i++)
		ck_assert_int_eq(pthread_join(th[i], NULL), 0);
	/* Each fix needs an expiry since the previous fix: never more fixes. */
	ck_assert_int_ge(atomic_load(&s.fixes), 1);
	ck_assert_int_le(atomic_load(&s.fixes), atomic_load(&s.expiries));
	uint64_t g;
	ck_assert_int_eq(opq_line_generation(&s.line, &g), 0);
	ck_assert_uint_eq(g, (uint64_t)atomic_load(&s.fixes));
	ck_assert_int_eq(atomic_load(&s.holders), 0);
	ck_assert_int_eq(opq_line_destroy(&s.line), 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("line");
	TCase *tc = t_tcase(s, "api", 60);
	tcase_add_test(tc, test_api_errors);
	tcase_add_test(tc, test_destroy_busy_with_waiter);
	tcase_add_test(tc, test_static_initializer);
	tcase_add_test(tc, test_release_between_try_and_wait);
	tcase_add_test(tc, test_never_waits_for_later_holder);
	tcase_add_test(tc, test_blocked_waiter_not_held_by_later_holder);
	tcase_add_test(tc, test_status_per_generation);
	tcase_add_test(tc, test_deadline);
	tcase_add_test(tc, test_late_failure_staged);
	tc = t_tcase(s, "stress", 300);
	tcase_add_test(tc, test_release_then_destroy);
	tcase_add_test(tc, test_late_failure_burst);
	tcase_add_test(tc, test_stress_retry_loop);
	return t_run(s);
}
