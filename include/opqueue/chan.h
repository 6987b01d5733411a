/*
 * opqueue/chan.h: completion channels, which bring the end of an operation
 * back to the thread of an event loop (epoll, libevent, libuv, GLib...).
 *
 * A loop thread creates a channel, watches its file descriptor for
 * readability, and calls opq_chan_run() when it is readable. An operation
 * that names the channel (opq_op_set_completion, or opq_queue_submit for a
 * function and its argument) ends exactly once in a completion that
 * opq_chan_run() calls on that thread: with status 0 after its perform
 * returned on a runner, or with ECANCELED when a cancel, a discarding stop
 * or a queue's destroy dropped it. Completions of one channel run in the
 * order their operations ended. Several queues may deliver into one
 * channel.
 *
 * Ownership: the loop's code owns the channel (opq_chan_destroy). An
 * operation with a completion is the library's from a successful enqueue
 * until its completion is called, and the caller's again inside it (the
 * completion may free it or enqueue it again). The channel allocates
 * nothing per operation; the runner's hand-off takes no lock, and a burst
 * of completions costs one write to the descriptor.
 *
 * opq_chan_run() is for one thread at a time (the loop's); every other
 * function is thread-safe. See opq_chan_create(3).
 */
#ifndef OPQUEUE_CHAN_H
#define OPQUEUE_CHAN_H

#include <opqueue/common.h>
#include <opqueue/queue.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The completion of a function-pointer operation: status 0 or ECANCELED. */
typedef void opq_after_fn(void *arg, int status);

/* Create a channel with its descriptor (eventfd, or a pipe without it). */
OPQ_EXPORT int opq_chan_create(opq_chan **chp);
/*
 * Close the descriptor and free the channel. EBUSY (nothing done) while an
 * operation that names it has not had its completion called, or from
 * inside opq_chan_run. NULL is a no-op.
 */
OPQ_EXPORT int opq_chan_destroy(opq_chan *ch);
/* The descriptor to poll for readability; the channel owns it. */
OPQ_EXPORT int opq_chan_fd(const opq_chan *ch, int *fd);
/*
 * Call up to `max` (> 0) ready completions on the calling thread, oldest
 * first, and store how many in *ran (ran may be NULL). The descriptor stays
 * readable while completions are ready. EBUSY: another call on this
 * channel is in progress (a completion calling it again included).
 */
OPQ_EXPORT int opq_chan_run(opq_chan *ch, unsigned max, unsigned *ran);

/*
 * Make `op` (initialised by opq_op_init) end in complete(op, status) on
 * ch's thread; ch and complete both NULL make it an ordinary operation
 * again. EBUSY while op is in a queue.
 */
OPQ_EXPORT int opq_op_set_completion(opq_op *op, opq_chan *ch, opq_complete_fn *complete);
/*
 * Perform work(arg) on a runner of q, then call after(arg, 0) on ch's
 * thread; after(arg, ECANCELED) instead if it is dropped. after may be
 * NULL. Allocates one box, freed before after is called. Waits for room
 * on a full bounded queue until deadline (NULL: no limit; a deadline
 * passed already makes it a try). Errors as opq_queue_timedenqueue, and
 * ENOMEM; after an error neither function is called.
 */
OPQ_EXPORT int opq_queue_submit(opq_queue *q, opq_chan *ch, opq_fn *work, opq_after_fn *after,
                                void *arg, const struct timespec *deadline);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_CHAN_H */
