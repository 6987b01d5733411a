/*
 * The line under stress: request retry loops against a shared "credential"
 * that expires at random. A request that fails tries to acquire the line's
 * token; the holder renews the credential and releases with a random
 * status; the others wait for that release and retry.
 *
 * Invariants: at most one holder at a time (a counter the holder raises
 * after acquiring and lowers before releasing); a waiter receives exactly
 * the status its generation's holder released with; the generation never
 * goes back; a holder's retry keeps its token ("or token"); a wait never
 * leaves the caller holding the token; a non-holder's release is EPERM.
 */
#include "config.h"

#include <errno.h>
#include <sched.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "stress.h"

#define NLINES 2
#define RING   4096 /* statuses remembered per line, by generation */

struct lstatus {
	_Atomic uint64_t gen; /* generation + 1 whose status this is; 0: none */
	atomic_int status;
};

struct lone {
	opq_line line;
	atomic_int holders;
	atomic_bool valid; /* the credential */
	struct lstatus ring[RING];
};

struct lmod {
	struct lone l[NLINES];
	unsigned threads;
	_Atomic uint64_t *seen; /* threads * NLINES: last generation each worker read */
	_Atomic uint64_t calls, requests, failures, acquired, waited, stale, estale, timeouts;
	_Atomic uint64_t statuses_checked, idles;
};

#define CALL(m) atomic_fetch_add_explicit(&(m)->calls, 1, memory_order_relaxed)
#define INC(x)  atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)

static int setup(void **statep, unsigned threads, uint64_t seed)
{
	(void)seed;
	struct lmod *m = calloc(1, sizeof(*m));
	if (!m)
		return ENOMEM;
	m->threads = threads;
	m->seen = calloc((size_t)threads * NLINES, sizeof(*m->seen));
	if (!m->seen)
		return ENOMEM;
	for (unsigned i = 0; i < NLINES; i++) {
		int rc = opq_line_init(&m->l[i].line);
		if (rc)
			return rc;
		atomic_store(&m->l[i].valid, true);
	}
	*statep = m;
	return 0;
}

/* The status the holder of generation gen released with, if still known. */
static bool expected_status(struct lone *l, uint64_t gen, int *status)
{
	struct lstatus *s = &l->ring[gen % RING];
	if (atomic_load(&s->gen) != gen + 1)
		return false;
	*status = atomic_load(&s->status);
	return atomic_load(&s->gen) == gen + 1;
}

static void check_status(struct lmod *m, struct lone *l, uint64_t gen, int got)
{
	int want;
	if (!expected_status(l, gen, &want))
		return;
	INC(m->statuses_checked);
	if (got != want)
		stress_fail("line",
		            "a waiter on generation %" PRIu64 " got status %d, its holder "
		            "released with %d",
		            gen, got, want);
}

static void read_gen(struct lmod *m, struct stress_worker *w, unsigned li, uint64_t *gen)
{
	CALL(m);
	int rc = opq_line_generation(&m->l[li].line, gen);
	if (rc)
		stress_fail("line", "generation returned %d", rc);
	_Atomic uint64_t *seen = &m->seen[w->index * NLINES + li];
	if (*gen < atomic_load(seen))
		stress_fail("line", "the generation went back from %" PRIu64 " to %" PRIu64,
		            (uint64_t)atomic_load(seen), *gen);
	atomic_store(seen, *gen);
}

/* The holder's work: renew the credential, release with a status. */
static void hold(struct lmod *m, struct stress_rng *r, unsigned li, opq_line_ticket *t)
{
	struct lone *l = &m->l[li];
	INC(m->acquired);
	if (atomic_fetch_add(&l->holders, 1) != 0)
		stress_fail("line", "two threads hold line %u's token", li);
	int busy = 0, rc;
	CALL(m);
	if ((rc = opq_line_busy(&l->line, &busy)) || !busy)
		stress_fail("line", "busy says %d (rc %d) to the holder", busy, rc);
	if (stress_pct(r, 30)) {
		/* The holder's own retry keeps its token. */
		CALL(m);
		if ((rc = opq_line_try_acquire(&l->line, OPQ_LINE_ANY, t)) != 0 || !t->held)
			stress_fail("line", "the holder's retry returned %d", rc);
	}
	if (stress_pct(r, 5)) {
		CALL(m);
		if ((rc = opq_line_wait(&l->line, t, NULL, NULL)) != EDEADLK)
			stress_fail("line", "the holder waiting for itself got %d, not EDEADLK",
			            rc);
	}
	/* The work (a re-authentication, say): give the others time to pile up. */
	for (unsigned k = stress_below(r, 4); k > 0; k--)
		sched_yield();
	atomic_store(&l->valid, true);
	int status = (int)stress_below(r, 1000);
	struct lstatus *s = &l->ring[t->gen % RING];
	atomic_store(&s->gen, 0);
	atomic_store(&s->status, status);
	atomic_store(&s->gen, t->gen + 1);
	atomic_fetch_sub(&l->holders, 1);
	CALL(m);
	if ((rc = opq_line_release(&l->line, t, status)) != 0 || t->held)
		stress_fail("line", "release returned %d", rc);
	if (stress_pct(r, 10)) {
		CALL(m);
		if ((rc = opq_line_release(&l->line, t, status)) != EPERM)
			stress_fail("line", "a second release returned %d, not EPERM", rc);
	}
}

/* A request with its retry loop. */
static void request(struct lmod *m, struct stress_worker *w, unsigned li)
{
	struct stress_rng *r = &w->rng;
	struct lone *l = &m->l[li];
	opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
	INC(m->requests);
	for (int attempt = 0; attempt < 100 && !stress_stopping(); attempt++) {
		uint64_t gen;
		read_gen(m, w, li, &gen);
		/* A slow request: others may release many times meanwhile (then ESTALE). */
		if (stress_pct(r, 3))
			for (unsigned k = 10 + stress_below(r, 200); k > 0; k--)
				sched_yield();
		/* The request: fails while the credential is expired; it expires at random. */
		if (stress_pct(r, 15))
			atomic_store(&l->valid, false);
		if (atomic_load(&l->valid))
			return;
		INC(m->failures);
		uint64_t seen = stress_pct(r, 20) ? OPQ_LINE_ANY : gen;
		CALL(m);
		int rc = opq_line_try_acquire(&l->line, seen, &t);
		if (rc == 0) {
			if (!t.held)
				stress_fail("line", "try_acquire returned 0 without the token");
			hold(m, r, li, &t);
			continue;
		}
		if (rc == EALREADY)
			INC(m->stale);
		else if (rc != EBUSY)
			stress_fail("line", "try_acquire returned %d", rc);
		if (t.held)
			stress_fail("line", "a failed try_acquire left the ticket holding");
		/* Wait for the holder of t.gen (returns at once after EALREADY). */
		struct timespec dl;
		const struct timespec *dlp = NULL;
		if (stress_pct(r, 40)) {
			dl = stress_after((int64_t)stress_below(r, 3000000));
			dlp = &dl;
		}
		int status = -1;
		CALL(m);
		rc = opq_line_wait(&l->line, &t, dlp, &status);
		if (rc == 0) {
			INC(m->waited);
			check_status(m, l, t.gen, status);
		} else if (rc == ESTALE) {
			INC(m->estale);
			if (status != -1)
				stress_fail("line", "ESTALE changed *status to %d", status);
		} else if (rc == ETIMEDOUT && dlp) {
			INC(m->timeouts);
		} else {
			stress_fail("line", "wait returned %d", rc);
		}
		if (t.held)
			stress_fail("line", "a wait left the ticket holding");
	}
}

static void step(void *state, struct stress_worker *w)
{
	struct lmod *m = state;
	struct stress_rng *r = &w->rng;
	unsigned li = stress_below(r, NLINES);
	unsigned action = stress_below(r, 100);
	if (action < 85) {
		request(m, w, li);
	} else if (action < 95) {
		struct timespec dl = stress_after((int64_t)stress_below(r, 2000000));
		int status;
		CALL(m);
		int rc =
		    opq_line_wait_idle(&m->l[li].line, stress_pct(r, 50) ? NULL : &dl, &status);
		INC(m->idles);
		if (rc != 0 && rc != ETIMEDOUT)
			stress_fail("line", "wait_idle returned %d", rc);
	} else {
		/* A ticket that never acquired cannot release. */
		opq_line_ticket t = {&m->l[li].line, 0, 0};
		CALL(m);
		int rc = opq_line_release(&m->l[li].line, &t, 0);
		if (rc != EPERM)
			stress_fail("line", "release without the token returned %d", rc);
	}
}

static void check(void *state)
{
	struct lmod *m = state;
	for (unsigned i = 0; i < NLINES; i++) {
		int h = atomic_load(&m->l[i].holders);
		if (h < 0 || h > 1)
			stress_fail("line", "line %u has %d holders", i, h);
	}
}

static void teardown(void *state, FILE *out)
{
	struct lmod *m = state;
	for (unsigned i = 0; i < NLINES; i++) {
		int busy = -1;
		uint64_t gen = 0;
		opq_line_busy(&m->l[i].line, &busy);
		opq_line_generation(&m->l[i].line, &gen);
		if (busy)
			stress_fail("line", "line %u still held at the end", i);
		if (opq_line_destroy(&m->l[i].line))
			stress_fail("line", "destroy of an idle line failed");
		fprintf(out, "line %u: %" PRIu64 " releases\n", i, gen);
	}
	fprintf(out,
	        "line: %" PRIu64 " requests, %" PRIu64 " failures, %" PRIu64 " acquired, %" PRIu64
	        " waited (%" PRIu64 " statuses checked), %" PRIu64
	        " already handled (EALREADY), %" PRIu64 " ESTALE, %" PRIu64 " timeouts, %" PRIu64
	        " wait_idle\n",
	        (uint64_t)m->requests, (uint64_t)m->failures, (uint64_t)m->acquired,
	        (uint64_t)m->waited, (uint64_t)m->statuses_checked, (uint64_t)m->stale,
	        (uint64_t)m->estale, (uint64_t)m->timeouts, (uint64_t)m->idles);
	free(m->seen);
	free(m);
}

static uint64_t calls(void *state)
{
	return atomic_load_explicit(&((struct lmod *)state)->calls, memory_order_relaxed);
}

const struct stress_module stress_line = {
    .name = "line",
    .setup = setup,
    .step = step,
    .check = check,
    .teardown = teardown,
    .calls = calls,
};
