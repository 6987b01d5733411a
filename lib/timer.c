/*
 * timer.c: the library's one timer thread.
 *
 * Armed timers sit in an unsorted list (a process has few: one per running
 * keepalive); the thread sleeps on a CLOCK_MONOTONIC condition variable
 * until the earliest is due, takes it off the list, and calls its function
 * without holding the timer lock. The thread exists while somebody holds a
 * reference: the first opq__timer_ref starts it, the last opq__timer_unref
 * stops and joins it, so nothing is left running at exit once every user
 * has let go (sanitizers and valgrind see no leaked thread).
 *
 * Locks: life_mu serialises starting and joining the thread (never taken by
 * the thread); mu guards the list and is never held while a timer fires.
 */
#include "internal.h"

#include <signal.h>

static pthread_mutex_t life_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t cv_once = PTHREAD_ONCE_INIT;
static pthread_cond_t cv; /* list changed, quit, or a timer finished firing */
static int cv_err;
static unsigned refs;    /* under life_mu */
static pthread_t thread; /* valid while refs > 0 */
static bool quit;        /* under mu */
static struct opq__timer *list;
static struct opq__timer *firing;

int64_t opq__mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return opq__ts_to_ns(&ts);
}

int64_t opq__ts_to_ns(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

struct timespec opq__ns_to_ts(int64_t ns)
{
	struct timespec ts;
	ts.tv_sec = (time_t)(ns / 1000000000);
	ts.tv_nsec = (long)(ns % 1000000000);
	if (ts.tv_nsec < 0) {
		ts.tv_nsec += 1000000000;
		ts.tv_sec--;
	}
	return ts;
}

static void cv_init(void)
{
	cv_err = opq__cond_init(&cv);
}

static void unlink_timer(struct opq__timer *t)
{
	for (struct opq__timer **pp = &list; *pp; pp = &(*pp)->next) {
		if (*pp == t) {
			*pp = t->next;
			break;
		}
	}
	t->next = NULL;
	t->armed = false;
}

static void *timer_main(void *unused)
{
	(void)unused;
	opq__lock(&mu);
	while (!quit) {
		struct opq__timer *first = NULL;
		for (struct opq__timer *t = list; t; t = t->next)
			if (!first || opq__ts_to_ns(&t->when) < opq__ts_to_ns(&first->when))
				first = t;
		if (!first) {
			opq__cond_wait(&cv, &mu, NULL);
			continue;
		}
		if (opq__mono_ns() < opq__ts_to_ns(&first->when)) {
			struct timespec when = first->when;
			opq__cond_wait(&cv, &mu, &when);
			continue;
		}
		unlink_timer(first);
		firing = first;
		/* Read under the lock: the timer may be re-armed (a new fn) while it fires. */
		void (*fn)(struct opq__timer *t) = first->fn;
		opq__unlock(&mu);
		fn(first);
		opq__lock(&mu);
		firing = NULL;
		OPQ_CHECK(pthread_cond_broadcast(&cv));
	}
	opq__unlock(&mu);
	return NULL;
}

int opq__timer_ref(void)
{
	OPQ_CHECK(pthread_once(&cv_once, cv_init));
	if (cv_err)
		return cv_err;
	int rc = 0;
	opq__lock(&life_mu);
	if (refs == 0) {
		opq__lock(&mu);
		quit = false;
		opq__unlock(&mu);
		/* The thread takes no signals: they belong to the host program. */
		sigset_t all, old;
		sigfillset(&all);
		OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &all, &old));
		rc = pthread_create(&thread, NULL, timer_main, NULL);
		OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &old, NULL));
	}
	if (rc == 0)
		refs++;
	opq__unlock(&life_mu);
	return rc;
}

void opq__timer_unref(void)
{
	opq__lock(&life_mu);
	assert(refs > 0);
	if (--refs == 0) {
		opq__lock(&mu);
		quit = true;
		OPQ_CHECK(pthread_cond_broadcast(&cv));
		opq__unlock(&mu);
		OPQ_CHECK(pthread_join(thread, NULL));
	}
	opq__unlock(&life_mu);
}

void opq__timer_arm(struct opq__timer *t, const struct timespec *when,
		    void (*fn)(struct opq__timer *t))
{
	opq__lock(&mu);
	if (!t->armed) {
		t->next = list;
		list = t;
		t->armed = true;
	}
	t->when = *when;
	t->fn = fn;
	OPQ_CHECK(pthread_cond_broadcast(&cv));
	opq__unlock(&mu);
}

void opq__timer_cancel(struct opq__timer *t)
{
	opq__lock(&mu);
	if (t->armed)
		unlink_timer(t);
	while (firing == t)
		opq__cond_wait(&cv, &mu, NULL);
	opq__unlock(&mu);
}
