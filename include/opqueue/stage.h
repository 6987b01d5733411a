/*
 * opqueue/stage.h: leader/followers over one resource. Many threads wait
 * for events (datagrams from their own peer) that all arrive through one
 * resource (one unconnected UDP socket) that only one thread may read at a
 * time: the head. The head reads and routes what it reads to the waiter
 * whose key it belongs to with opq_stage_notify(); when it is done it
 * leaves, and exactly one waiter (the oldest) is promoted to head.
 *
 * Ownership in one paragraph: a ticket is allocated by opq_stage_register()
 * and freed only by opq_stage_unregister(); the stage copies the key. The
 * `event` pointers are the program's: the stage never reads, copies or
 * frees them. An event handed to a successful notify belongs to the
 * ticket's thread, which gets it back from opq_stage_enter() (NOTIFIED) or,
 * if it never enters again, from opq_stage_unregister(). When notify fails
 * (ENOENT: no ticket has the key; EAGAIN: the ticket still holds an event
 * not yet taken) the caller keeps the event: nothing is ever dropped.
 *
 * Every function is thread-safe. See opq_stage_create(3), opq_stage_enter(3)
 * and opq_stage_register(3).
 */
#ifndef OPQUEUE_STAGE_H
#define OPQUEUE_STAGE_H

#include <opqueue/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct opq_stage opq_stage;
typedef struct opq_stage_ticket opq_stage_ticket;

/*
 * Results of opq_stage_enter() (and OPQ_STAGE_NOTIFIED of
 * opq_stage_unregister()). Both are positive and larger than any errno
 * value, so they never collide with an error.
 */
#define OPQ_STAGE_HEAD     0x5701 /* the caller now heads the stage */
#define OPQ_STAGE_NOTIFIED 0x5702 /* the caller's key was notified */

/*
 * A snapshot of a stage, for monitoring and tests. The reserved words let
 * fields be added without changing the struct's size; they read as 0.
 */
typedef struct opq_stage_stats {
	size_t tickets; /* registered tickets */
	size_t waiting; /* threads blocked in opq_stage_enter() */
	int head;       /* 1 while a ticket heads the stage, else 0 */
	int closed;     /* the close error, 0 while open */
	uint64_t opq__reserved[4];
} opq_stage_stats;

/*
 * Create an empty, open stage in *stp. Returns 0, EINVAL if stp is NULL,
 * ENOMEM, or an error from pthread initialisation.
 */
OPQ_EXPORT int opq_stage_create(opq_stage **stp);

/*
 * Destroy a stage. Returns 0 (also for NULL, a no-op) or EBUSY while a
 * ticket is still registered (which covers every waiting thread and the
 * head); the stage is then left as it was.
 */
OPQ_EXPORT int opq_stage_destroy(opq_stage *st);

/*
 * Register a ticket for the key (keylen bytes, copied) in *tp. Register
 * BEFORE checking the program's own buffer of events: from this moment a
 * notification for the key is latched in the ticket, never lost. One
 * ticket per key: a second registration of a registered key fails with
 * EEXIST. Returns 0, EINVAL (NULL argument or keylen 0), EEXIST, ENOMEM.
 * The ticket is the caller's until opq_stage_unregister() frees it; it may
 * be used for any number of enters. One thread at a time may use a ticket.
 */
OPQ_EXPORT int opq_stage_register(opq_stage *st, const void *key, size_t keylen,
                                  opq_stage_ticket **tp);

/*
 * Unregister and free a ticket. If an event was notified to it and not yet
 * taken by an enter, it is stored in *event and OPQ_STAGE_NOTIFIED is
 * returned; otherwise *event is set to NULL and 0 returned. EINVAL for a
 * NULL argument; EBUSY (nothing done) while a thread waits with the ticket
 * in opq_stage_enter() or while the ticket heads the stage (leave first).
 */
OPQ_EXPORT int opq_stage_unregister(opq_stage *st, opq_stage_ticket *t, void **event);

/*
 * Enter the stage with a registered ticket and wait until one of:
 * - an event was notified to the ticket (also before this call: latched):
 *   stores the event in *event and returns OPQ_STAGE_NOTIFIED. This has
 *   priority over everything else, even a closed stage;
 * - the caller heads the stage (nobody did and it was open, or the head
 *   left and this is the oldest waiter): returns OPQ_STAGE_HEAD. The head
 *   must read and route, then call opq_stage_leave();
 * - the deadline (absolute CLOCK_MONOTONIC, NULL: never) passed: ETIMEDOUT;
 *   the ticket stays registered and still latches notifications;
 * - the stage is closed: returns the close error;
 * - the caller is a scope task and the task is cancelled: ECANCELED; the
 *   ticket stays registered, as after a timeout.
 * The head may call enter too (for instance after notifying its own key):
 * it never waits; it gets its latched event (NOTIFIED), the close error, or
 * OPQ_STAGE_HEAD, and heads the stage in every case until it leaves.
 * EINVAL for NULL st, t or event, a ticket of another stage, or a deadline
 * whose tv_nsec is outside [0, 1e9); EBUSY if another thread is in enter
 * with the same ticket.
 */
OPQ_EXPORT int opq_stage_enter(opq_stage *st, opq_stage_ticket *t, const struct timespec *deadline,
                               void **event);

/*
 * The head gives up the stage: exactly one waiting thread, the oldest, is
 * promoted to head (its enter returns OPQ_STAGE_HEAD); with no waiter the
 * stage has no head until a thread enters. Returns 0, EINVAL for NULL, or
 * EPERM if t does not head the stage.
 */
OPQ_EXPORT int opq_stage_leave(opq_stage *st, opq_stage_ticket *t);

/*
 * Hand `event` (any pointer, even NULL) to the ticket registered for the
 * key, waking its thread if it waits, latching the event otherwise. Any
 * thread may notify; usually the head does. Keys are hashed: O(1)
 * expected. Returns 0 (the event now belongs to the ticket's thread),
 * ENOENT if no ticket has the key, EAGAIN if the ticket still holds an
 * event not yet taken (one at a time), EINVAL for NULL or keylen 0. On
 * failure the caller keeps the event, e.g. in a buffer the ticket's thread
 * checks after registering.
 */
OPQ_EXPORT int opq_stage_notify(opq_stage *st, const void *key, size_t keylen, void *event);

/*
 * The resource died: every waiting thread returns `error` (a positive
 * errno value such as ECONNRESET) at once, and so does every later enter
 * that has no latched event. The first close wins; a later one returns
 * EALREADY. EINVAL for NULL st or error not a positive errno value.
 * Tickets stay registered and must still be unregistered.
 */
OPQ_EXPORT int opq_stage_close(opq_stage *st, int error);

/* Copy a snapshot of the stage into *stats. EINVAL for NULL. */
OPQ_EXPORT int opq_stage_stats_get(opq_stage *st, opq_stage_stats *stats);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_STAGE_H */
