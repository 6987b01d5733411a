/*
 * timer.c: the library's one timer thread.
 *
 * Armed timers sit in a pairing heap, soonest at the root: a process may
 * have many (one per running keepalive, one per scope tree with a pending
 * deadline), and arming, cancelling and firing each cost O(log n)
 * amortized, with the links in the timers themselves (nothing to allocate,
 * so arming cannot fail). The thread sleeps on a CLOCK_MONOTONIC condition
 * variable until the root is due, takes it off the heap, and calls its
 * function without holding the timer lock. The thread exists while
 * somebody holds a reference: the first opq__timer_ref starts it, the last
 * opq__timer_unref stops and joins it, so nothing is left running at exit
 * once every user has let go (sanitizers and valgrind see no leaked thread).
 *
 * Locks: life_mu serialises starting and joining the thread (never taken by
 * the thread); mu guards the heap and is never held while a timer fires.
 *
 * The thread names itself "opq-timer", so that top -H and gdb tell it from
 * the program's own threads.
 */
#define _GNU_SOURCE 1 /* pthread_setname_np */
#include "internal.h"

#include <signal.h>

static pthread_mutex_t life_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t cv_once = PTHREAD_ONCE_INIT;
static pthread_cond_t cv; /* the root changed, quit, or a timer finished firing */
static int cv_err;
static unsigned refs;           /* under life_mu */
static pthread_t thread;        /* valid while refs > 0 */
static bool quit;               /* under mu */
static struct opq__timer *root; /* the heap, under mu */
static struct opq__timer *firing;

int64_t opq__mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return opq__ts_to_ns(&ts);
}

/* What tests add to the suspended time (opq__suspend_pretend). */
static int64_t pretend_suspended;

int64_t opq__suspended_ns(void)
{
	int64_t extra = __atomic_load_n(&pretend_suspended, __ATOMIC_RELAXED);
#ifdef CLOCK_BOOTTIME
	/* The boot clock read between two monotonic reads: their midpoint is
	 * the monotonic instant of the boot clock's reading, to within half
	 * their distance; the closest of a few tries (a thread preempted
	 * between the reads would be off by the time it waited). */
	int64_t best = -1, diff = 0;
	for (int i = 0; i < 4 && (best < 0 || best > 20000); i++) {
		struct timespec m1, b, m2;
		clock_gettime(CLOCK_MONOTONIC, &m1);
		if (clock_gettime(CLOCK_BOOTTIME, &b) != 0)
			return extra;
		clock_gettime(CLOCK_MONOTONIC, &m2);
		int64_t t1 = opq__ts_to_ns(&m1), t2 = opq__ts_to_ns(&m2);
		if (best < 0 || t2 - t1 < best) {
			best = t2 - t1;
			diff = opq__ts_to_ns(&b) - (t1 + (t2 - t1) / 2);
		}
	}
	return diff + extra;
#else
	return extra;
#endif
}

void opq__suspend_pretend(int64_t ns)
{
	__atomic_fetch_add(&pretend_suspended, ns, __ATOMIC_RELAXED);
}

int64_t opq__ts_to_ns(const struct timespec *ts)
{
	/* Saturates: a deadline centuries away is "never", not a negative time. */
	if (ts->tv_sec >= INT64_MAX / 1000000000 - 1)
		return INT64_MAX;
	if (ts->tv_sec <= INT64_MIN / 1000000000 + 1)
		return INT64_MIN;
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

/* ---- the pairing heap (under mu) ------------------------------------------ */

/*
 * Each node's children are a list through `sibling`, leftmost first; `prev`
 * is the parent for a leftmost child, the left sibling otherwise, NULL at
 * the root.
 */
static bool sooner(const struct opq__timer *a, const struct opq__timer *b)
{
	return opq__ts_before(&a->when, &b->when);
}

/* Meld two heaps (roots with no siblings): the later root becomes the
 * sooner one's leftmost child. */
static struct opq__timer *meld(struct opq__timer *a, struct opq__timer *b)
{
	if (!a)
		return b;
	if (!b)
		return a;
	if (sooner(b, a)) {
		struct opq__timer *x = a;
		a = b;
		b = x;
	}
	b->prev = a;
	b->sibling = a->child;
	if (a->child)
		a->child->prev = b;
	a->child = b;
	return a;
}

/* Meld a list of siblings into one heap: pairs left to right, then the
 * pairs right to left. */
static struct opq__timer *meld_siblings(struct opq__timer *first)
{
	struct opq__timer *pairs = NULL; /* melded pairs, last first (by sibling) */
	while (first) {
		struct opq__timer *a = first, *b = a->sibling;
		first = b ? b->sibling : NULL;
		a->sibling = a->prev = NULL;
		if (b)
			b->sibling = b->prev = NULL;
		struct opq__timer *m = meld(a, b);
		m->sibling = pairs;
		pairs = m;
	}
	struct opq__timer *heap = NULL;
	while (pairs) {
		struct opq__timer *next = pairs->sibling;
		pairs->sibling = NULL;
		heap = meld(heap, pairs);
		pairs = next;
	}
	return heap;
}

static void heap_insert(struct opq__timer *t)
{
	t->child = t->sibling = t->prev = NULL;
	root = meld(root, t);
	root->prev = NULL;
	t->armed = true;
}

static void heap_remove(struct opq__timer *t)
{
	struct opq__timer *sub = meld_siblings(t->child);
	if (t == root) {
		root = sub;
	} else {
		if (t->prev->child == t)
			t->prev->child = t->sibling;
		else
			t->prev->sibling = t->sibling;
		if (t->sibling)
			t->sibling->prev = t->prev;
		root = meld(root, sub);
	}
	if (root)
		root->prev = NULL;
	t->child = t->sibling = t->prev = NULL;
	t->armed = false;
}

static void *timer_main(void *unused)
{
	(void)unused;
#if HAVE_DECL_PTHREAD_SETNAME_NP
	OPQ_CHECK(pthread_setname_np(pthread_self(), "opq-timer")); /* fits the kernel's 15 bytes */
#endif
	opq__lock(&mu);
	while (!quit) {
		struct opq__timer *first = root;
		if (!first) {
			opq__cond_wait(&cv, &mu, NULL);
			continue;
		}
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (opq__ts_before(&now, &first->when)) {
			struct timespec when = first->when;
			opq__cond_wait(&cv, &mu, &when);
			continue;
		}
		heap_remove(first);
		firing = first;
		/* Read under the lock: the timer may be re-armed (a new fn) while it fires. */
		void (*fn)(struct opq__timer * t) = first->fn;
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
	if (t->armed)
		heap_remove(t);
	t->when = *when;
	t->fn = fn;
	heap_insert(t);
	if (root == t) /* the thread sleeps until the root is due */
		OPQ_CHECK(pthread_cond_broadcast(&cv));
	opq__unlock(&mu);
}

void opq__timer_cancel(struct opq__timer *t)
{
	opq__lock(&mu);
	if (t->armed)
		heap_remove(t);
	while (firing == t)
		opq__cond_wait(&cv, &mu, NULL);
	opq__unlock(&mu);
}
