/*
 * opqueue/line.h: the line, a one-track railway line (see opq_line_try_acquire(3)).
 *
 * Many threads hit the same failure (expired credentials, a dropped
 * connection); exactly one of them handles it: it acquires the line's token,
 * does the work and releases the token with a status. The others wait for
 * that release and then retry their own request without acquiring the token:
 * the holder has already done the work.
 *
 * The line counts its releases: its generation. A failed acquirer records
 * the generation it saw in its ticket and waits until the generation moves
 * on, so a release between the failed try and the wait is never missed and a
 * later holder never makes earlier waiters wait again.
 */
#ifndef OPQUEUE_LINE_H
#define OPQUEUE_LINE_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#include <opqueue/common.h>

#ifdef __cplusplus
extern "C" {
#endif

/* How many release statuses a line remembers for late waiters. */
#define OPQ_LINE_HISTORY 8

/* opq_line_try_acquire's seen_gen when the caller read no generation. */
#define OPQ_LINE_ANY UINT64_MAX

/*
 * A line. The struct is public only so that OPQ_LINE_INITIALIZER can
 * initialise a static one; every field is private to the library and may
 * change between releases together with the soname. Initialise it with
 * OPQ_LINE_INITIALIZER or opq_line_init, destroy it with opq_line_destroy.
 * A line must not be copied or moved.
 */
typedef struct opq_line {
	pthread_mutex_t opq__mu;           /* private: guards the rest */
	pthread_cond_t opq__cv;            /* private: broadcast on release */
	uint64_t opq__gen;                 /* private: releases so far */
	int opq__held;                     /* private: the token is taken */
	unsigned opq__waiters;             /* private: threads in a wait that blocked */
	void *opq__wq;                     /* private: their wait records */
	int opq__status[OPQ_LINE_HISTORY]; /* private: status of release g at [g % N] */
} opq_line;

#define OPQ_LINE_INITIALIZER                                                                       \
	{                                                                                          \
		PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL,                \
		{                                                                                  \
			0                                                                          \
		}                                                                                  \
	}

/*
 * A ticket: what opq_line_try_acquire tells its caller. A plain value owned
 * by the caller; start it as OPQ_LINE_TICKET_INITIALIZER (or all zeroes)
 * and use it with one line only. `held` says the caller holds the token;
 * `gen` is the generation the ticket is about (the one held, or the one
 * whose release a failed acquirer waits for).
 */
typedef struct opq_line_ticket {
	opq_line *line;
	uint64_t gen;
	int held;
} opq_line_ticket;

#define OPQ_LINE_TICKET_INITIALIZER                                                                \
	{                                                                                          \
		NULL, 0, 0                                                                         \
	}

/*
 * Initialise a line: free, generation 0. The same as OPQ_LINE_INITIALIZER
 * (in debug builds the mutex is error-checking). Errors: EINVAL if line is
 * NULL, or a pthread init error (EAGAIN, ENOMEM).
 */
OPQ_EXPORT int opq_line_init(opq_line *line);

/*
 * Destroy a line. EBUSY, leaving it untouched, while the token is held or a
 * thread that blocked in opq_line_wait or opq_line_wait_idle has not yet
 * returned from it: a release wakes its waiters, but each is counted until
 * its call returns, so a destroy right after a release gives EBUSY until
 * they are out. NULL is a no-op returning 0. Other calls on the same line
 * must not begin while it is being destroyed.
 */
OPQ_EXPORT int opq_line_destroy(opq_line *line);

/*
 * Store the line's generation (the number of releases so far) in *gen. A
 * request reads it when it begins, so that if it fails it can tell
 * opq_line_try_acquire what it saw. Errors: EINVAL.
 */
OPQ_EXPORT int opq_line_generation(opq_line *line, uint64_t *gen);

/*
 * Try to acquire the token, never blocking. *ticket is in/out:
 * - 0: the caller holds the token (ticket->held is 1). If *ticket already
 *   holds this line's token (an earlier iteration of a retry loop), the
 *   caller keeps it and gets 0 again.
 * - EALREADY: seen_gen is not OPQ_LINE_ANY and the line was released since
 *   the caller read seen_gen: its failure is stale, somebody has handled it.
 *   Retry the request, do not wait. ticket->gen is seen_gen; opq_line_wait
 *   on it returns at once with that release's status.
 * - EBUSY: another thread holds the token; ticket->gen is the generation to
 *   pass to opq_line_wait.
 * - EINVAL: line or ticket is NULL, the ticket belongs to another line, it
 *   claims to hold a token it does not hold, or seen_gen is a generation
 *   the line has not reached.
 */
OPQ_EXPORT int opq_line_try_acquire(opq_line *line, uint64_t seen_gen, opq_line_ticket *ticket);

/*
 * Wait until the holder of generation failed->gen has released the line,
 * then store its release status in *status (status may be NULL). Returns at
 * once if it has already released; never waits for a later holder. The
 * caller does not hold the token afterwards. deadline is an absolute
 * CLOCK_MONOTONIC instant, NULL meaning forever. Errors: EINVAL (NULL line
 * or ticket, ticket of another line or of a future generation), EDEADLK
 * (the ticket holds the token: the caller would wait for itself),
 * ETIMEDOUT (nothing changes for anybody else), ECANCELED (the caller is
 * a scope task that is cancelled and the release has not happened: do not
 * retry), ESTALE (released, but more than OPQ_LINE_HISTORY releases ago and
 * the caller was not yet waiting: the status is forgotten and *status is
 * left alone; retry as after 0).
 */
OPQ_EXPORT int opq_line_wait(opq_line *line, const opq_line_ticket *failed,
                             const struct timespec *deadline, int *status);

/*
 * Release the token held by *held, record status for the waiters, advance
 * the generation and wake every waiter; held->held becomes 0. Errors:
 * EINVAL (NULL, a ticket of another line, or a blank ticket that no call
 * on this line filled in), EPERM (the ticket does not hold the token: its
 * try failed, it was already released, or it is a stale copy). On error
 * nothing changes.
 */
OPQ_EXPORT int opq_line_release(opq_line *line, opq_line_ticket *held, int status);

/* Store in *busy whether the token is held (1) or not (0). Errors: EINVAL. */
OPQ_EXPORT int opq_line_busy(opq_line *line, int *busy);

/*
 * Wait, without having failed first, until the current holder (if any)
 * releases; then store that release's status in *status (status may be
 * NULL). On a free line, returns 0 at once with the status of the last
 * release (0 if none). Errors: EINVAL, ETIMEDOUT, ECANCELED (the caller is
 * a scope task that is cancelled); EDEADLK is not detected:
 * a holder that waits for idle waits for itself until its deadline.
 */
OPQ_EXPORT int opq_line_wait_idle(opq_line *line, const struct timespec *deadline, int *status);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_LINE_H */
