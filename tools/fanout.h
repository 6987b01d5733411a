/*
 * fanout.h: a request handler that fans out to three simulated backends in
 * a scope, shared by opqueue-fanout and tests/check_fanout.c.
 *
 * The handler is a task whose child scope has the policy "first error
 * cancels the siblings" and a deadline. It spawns one task per backend;
 * each backend "works" for its latency (a cancellable opq_scope_sleep) and
 * then answers, or fails with its error. The handler waits for its scope
 * and answers with the first error, or 0 when every backend answered.
 */
#ifndef OPQ_FANOUT_H
#define OPQ_FANOUT_H

#include <stdint.h>

#define FANOUT_BACKENDS 3

struct fanout_backend {
	const char *name;
	int64_t latency_ms; /* simulated work */
	int error;          /* 0: answers; else fails with this errno after its latency */
	/* filled in by fanout_run: */
	int result;       /* what the backend's task returned (ECANCELED when cut short) */
	int64_t ended_ms; /* when it ended, from the start of the request */
};

struct fanout_result {
	int first_error;  /* what the handler answered: 0 or the first backend error */
	int64_t total_ms; /* the request's wall time */
};

/*
 * Handle one request on a queue of `runners` runners, with the policy
 * OPQ_SCOPE_FIRST_ERROR (first_error_cancels 1) or OPQ_SCOPE_COLLECT (0),
 * and a deadline of deadline_ms (0: none). Returns 0 or an errno value.
 */
int fanout_run(unsigned runners, int first_error_cancels, int64_t deadline_ms,
               struct fanout_backend b[FANOUT_BACKENDS], struct fanout_result *res);

#endif /* OPQ_FANOUT_H */
