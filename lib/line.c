/*
 * line.c: the line, a one-track railway line.
 *
 * Invariants, all under line->opq__mu:
 * - opq__gen counts releases; the holder of the token acquired it at
 *   generation opq__gen, and its release makes it opq__gen + 1;
 * - opq__status[g % OPQ_LINE_HISTORY] is the status of the release that
 *   ended generation g, for g in [opq__gen - OPQ_LINE_HISTORY, opq__gen);
 * - opq__wq lists the wait records of the threads blocked on the current
 *   holder (they all wait for the release of generation opq__gen); the
 *   release hands each its status and empties the list, so a blocked
 *   waiter gets its status however late it wakes. The public struct has
 *   room for one pointer only, so the list is a list.h ring without a head
 *   link: opq__wq points at one of the records (NULL: none);
 * - opq__waiters counts the threads that blocked in a wait, from the moment
 *   they join opq__wq until their call returns: a waiter the release took
 *   off the list still has to take the mutex again (and the condvar's
 *   internals) before it returns, so destroy must see it as busy;
 * - the condvar is broadcast only when somebody is on opq__wq (uncontended
 *   acquire and release make no system call).
 * The condvar has the default clock so that OPQ_LINE_INITIALIZER works;
 * deadlines on CLOCK_MONOTONIC go through pthread_cond_clockwait.
 * lib/line.pml models this protocol for the spin model checker
 * (tests/spin.sh): keep the two in step.
 */
#define _GNU_SOURCE 1 /* pthread_cond_clockwait */
#include "internal.h"

#include "list.h"

struct wait_rec {
	struct opq__link link; /* in the ring at opq__wq */
	int done;
	int status;
};

OPQ_EXPORT int opq_line_init(opq_line *line)
{
	if (!line)
		return EINVAL;
	int rc = opq__mutex_init(&line->opq__mu);
	if (rc)
		return rc;
	rc = pthread_cond_init(&line->opq__cv, NULL);
	if (rc) {
		pthread_mutex_destroy(&line->opq__mu);
		return rc;
	}
	line->opq__gen = 0;
	line->opq__held = 0;
	line->opq__waiters = 0;
	line->opq__wq = NULL;
	for (int i = 0; i < OPQ_LINE_HISTORY; i++)
		line->opq__status[i] = 0;
	return 0;
}

OPQ_EXPORT int opq_line_destroy(opq_line *line)
{
	if (!line)
		return 0;
	opq__lock(&line->opq__mu);
	int busy = line->opq__held || line->opq__waiters > 0;
	opq__unlock(&line->opq__mu);
	if (busy)
		return EBUSY;
	OPQ_CHECK(pthread_cond_destroy(&line->opq__cv));
	OPQ_CHECK(pthread_mutex_destroy(&line->opq__mu));
	return 0;
}

OPQ_EXPORT int opq_line_generation(opq_line *line, uint64_t *gen)
{
	if (!line || !gen)
		return EINVAL;
	opq__lock(&line->opq__mu);
	*gen = line->opq__gen;
	opq__unlock(&line->opq__mu);
	return 0;
}

OPQ_EXPORT int opq_line_busy(opq_line *line, int *busy)
{
	if (!line || !busy)
		return EINVAL;
	opq__lock(&line->opq__mu);
	*busy = line->opq__held;
	opq__unlock(&line->opq__mu);
	return 0;
}

OPQ_EXPORT int opq_line_try_acquire(opq_line *line, uint64_t seen_gen, opq_line_ticket *ticket)
{
	if (!line || !ticket || (ticket->line && ticket->line != line))
		return EINVAL;
	int rc;
	opq__lock(&line->opq__mu);
	uint64_t gen = line->opq__gen;
	if (ticket->held) {
		/* "Or token": the caller already holds it. */
		rc = line->opq__held && ticket->line == line && ticket->gen == gen ? 0 : EINVAL;
	} else if (seen_gen != OPQ_LINE_ANY && seen_gen > gen) {
		rc = EINVAL;
	} else if (seen_gen != OPQ_LINE_ANY && seen_gen < gen) {
		ticket->line = line;
		ticket->gen = seen_gen;
		rc = EALREADY;
	} else if (line->opq__held) {
		ticket->line = line;
		ticket->gen = gen;
		rc = EBUSY;
	} else {
		line->opq__held = 1;
		ticket->line = line;
		ticket->gen = gen;
		ticket->held = 1;
		rc = 0;
	}
	opq__unlock(&line->opq__mu);
	return rc;
}

OPQ_EXPORT int opq_line_release(opq_line *line, opq_line_ticket *held, int status)
{
	if (!line || !held || held->line != line)
		return EINVAL;
	opq__lock(&line->opq__mu);
	if (!held->held || !line->opq__held || held->gen != line->opq__gen) {
		opq__unlock(&line->opq__mu);
		return EPERM;
	}
	line->opq__status[line->opq__gen % OPQ_LINE_HISTORY] = status;
	line->opq__gen++;
	line->opq__held = 0;
	held->held = 0;
	struct opq__link *first = line->opq__wq;
	line->opq__wq = NULL;
	if (first) {
		/* A head link put into the ring makes it a list to pop. */
		struct opq__link wq;
		opq__list_insert_before(first, &wq);
		for (struct opq__link *l; (l = opq__list_pop(&wq));) {
			struct wait_rec *w = OPQ_CONTAINER_OF(l, struct wait_rec, link);
			w->done = 1;
			w->status = status;
		}
		/* The waiters stay counted in opq__waiters until they return. */
		OPQ_CHECK(pthread_cond_broadcast(&line->opq__cv));
	}
	opq__unlock(&line->opq__mu);
	return 0;
}

/* Wait on the condvar until the monotonic deadline: 0 or ETIMEDOUT. */
static int line_cond_wait(opq_line *line, const struct timespec *deadline)
{
	if (!deadline) {
		OPQ_CHECK(pthread_cond_wait(&line->opq__cv, &line->opq__mu));
		return 0;
	}
#if HAVE_DECL_PTHREAD_COND_CLOCKWAIT
	int rc = pthread_cond_clockwait(&line->opq__cv, &line->opq__mu, CLOCK_MONOTONIC, deadline);
#else
	/* Translate the monotonic deadline to the condvar's realtime clock. */
	struct timespec mono, real, abs;
	clock_gettime(CLOCK_MONOTONIC, &mono);
	clock_gettime(CLOCK_REALTIME, &real);
	int64_t left = (int64_t)(deadline->tv_sec - mono.tv_sec) * 1000000000 +
	               (deadline->tv_nsec - mono.tv_nsec);
	if (left <= 0)
		return ETIMEDOUT;
	int64_t ns = real.tv_nsec + left % 1000000000;
	abs.tv_sec = real.tv_sec + (time_t)(left / 1000000000) + (time_t)(ns / 1000000000);
	abs.tv_nsec = (long)(ns % 1000000000);
	int rc = pthread_cond_timedwait(&line->opq__cv, &line->opq__mu, &abs);
#endif
	return rc == ETIMEDOUT ? ETIMEDOUT : 0;
}

static void wq_add(opq_line *line, struct wait_rec *w)
{
	struct opq__link *first = line->opq__wq;
	if (first) {
		opq__list_insert_before(first, &w->link);
	} else {
		opq__list_init(&w->link);
		line->opq__wq = &w->link;
	}
}

static void wq_unlink(opq_line *line, struct wait_rec *w)
{
	struct opq__link *l = &w->link;
	if (line->opq__wq == l)
		line->opq__wq = l->opq__next == l ? NULL : l->opq__next;
	opq__list_remove(l);
}

/*
 * Under the mutex: wait until generation gen has been released, then give
 * its status. Blocks only while gen is the current, held generation.
 */
static int line_wait_gen(opq_line *line, uint64_t gen, const struct timespec *deadline, int *status)
{
	if (gen == line->opq__gen && line->opq__held) {
		/* Inside a task: a cancel of the task ends the wait (cancel.c). */
		struct opq__cancel_reg creg;
		if (opq__cancel_begin(&creg, &line->opq__mu, &line->opq__cv))
			return ECANCELED;
		struct wait_rec w = {.done = 0, .status = 0};
		wq_add(line, &w);
		line->opq__waiters++;
		int rc = 0;
		bool timed_out = false;
		while (!w.done) {
			if (timed_out || opq__cancel_pending(&creg)) {
				/* Unregister first: it may wait (mutex released) for a
				 * canceller, and a release may hand w its status meanwhile. */
				opq__cancel_end(&creg);
				if (w.done)
					break;
				wq_unlink(line, &w);
				rc = timed_out ? ETIMEDOUT : ECANCELED;
				break;
			}
			timed_out = line_cond_wait(line, deadline) == ETIMEDOUT;
		}
		opq__cancel_end(&creg); /* a no-op if already done */
		if (rc == 0 && status)
			*status = w.status;
		/* Done with the condvar and the canceller: the caller's unlock of
		 * the mutex is this call's last touch of the line. */
		line->opq__waiters--;
		return rc;
	}
	if (gen == line->opq__gen) {
		/* Free and never held at gen: nothing to wait for. */
		if (status)
			*status = gen > 0 ? line->opq__status[(gen - 1) % OPQ_LINE_HISTORY] : 0;
		return 0;
	}
	if (line->opq__gen - gen > OPQ_LINE_HISTORY)
		return ESTALE;
	if (status)
		*status = line->opq__status[gen % OPQ_LINE_HISTORY];
	return 0;
}

OPQ_EXPORT int opq_line_wait(opq_line *line, const opq_line_ticket *failed,
                             const struct timespec *deadline, int *status)
{
	if (!line || !failed || failed->line != line || !opq__deadline_ok(deadline))
		return EINVAL;
	opq__lock(&line->opq__mu);
	int rc;
	if (failed->held && line->opq__held && failed->gen == line->opq__gen)
		rc = EDEADLK;
	else if (failed->gen > line->opq__gen)
		rc = EINVAL;
	else
		rc = line_wait_gen(line, failed->gen, deadline, status);
	opq__unlock(&line->opq__mu);
	return rc;
}

OPQ_EXPORT int opq_line_wait_idle(opq_line *line, const struct timespec *deadline, int *status)
{
	if (!line || !opq__deadline_ok(deadline))
		return EINVAL;
	opq__lock(&line->opq__mu);
	int rc = line_wait_gen(line, line->opq__gen, deadline, status);
	opq__unlock(&line->opq__mu);
	return rc;
}
