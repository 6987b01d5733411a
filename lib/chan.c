/*
 * chan.c: completion channels (opqueue/chan.h).
 *
 * A channel is a stack of ended operations and a descriptor. Whoever ends
 * an operation (a runner after perform, or a cancel, stop or destroy that
 * drops it) pushes it onto ch->ready with one compare-and-swap and, only
 * when the stack was empty, writes to the descriptor: a burst costs one
 * write. The loop's thread, in opq_chan_run, first empties the descriptor,
 * then swaps the whole stack out and reverses it into ch->local, its own
 * list in the order the operations ended, and calls the completions from
 * there. A push that comes after the swap finds the stack empty and
 * writes again, so no wakeup is lost; one that comes between the read and
 * the swap leaves the descriptor readable with nothing to do, which costs
 * a spurious wakeup only. Completions left over by `max` keep the
 * descriptor readable: opq_chan_run writes to it itself.
 *
 * ch->pending counts operations that name the channel and have been
 * accepted by a queue but not completed: a queue adds one before the
 * operation can be seen by a runner (opq__chan_accept), opq_chan_run takes
 * it away before the completion is called, so destroy can refuse while
 * anything could still reach the channel.
 *
 * The pusher that found the stack empty still uses ch after its push, to
 * write to the descriptor, and the loop may by then have run that
 * operation's completion, the last one, and called destroy. Each stack
 * that take_ready swaps out holds exactly one such pusher's operation, at
 * its bottom: ch->batches counts those stacks (the loop's), ch->notified
 * the pushers done with ch (they add one after their write, their last
 * touch of ch). Destroy, once nothing is pending, waits until the two are
 * equal: a few instructions and one write(2) of a runner, and it costs
 * one atomic add per burst.
 *
 * This file is below the queue: the queue (and the lease keepalive, for
 * its lost callback) calls opq__chan_accept and opq__chan_end, and nothing
 * here calls them; the one thing it knows of the queue is that an
 * operation's state 0 means the caller's (opq_chan_run sets it).
 */
#include "internal.h"

#include <fcntl.h>
#include <opqueue/chan.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#ifdef HAVE_SYS_EVENTFD_H
#include <sys/eventfd.h>
#endif

struct opq_chan {
	opq_op *ready;     /* stack of ended operations, newest on top */
	uint64_t pending;  /* accepted, not yet completed (atomic) */
	bool running;      /* opq_chan_run in progress (atomic) */
	opq_op *local;     /* the loop's: ended operations, oldest first */
	uint64_t batches;  /* stacks take_ready swapped out (written under running) */
	uint64_t notified; /* pushers onto an empty stack done with ch (atomic) */
	int rfd, wfd;      /* the same eventfd, or a pipe's two ends */
};

OPQ_EXPORT int opq_chan_create(opq_chan **chp)
{
	if (!chp)
		return EINVAL;
	opq_chan *ch = opq__calloc(1, sizeof(*ch));
	if (!ch)
		return ENOMEM;
#ifdef HAVE_SYS_EVENTFD_H
	ch->rfd = ch->wfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (ch->rfd < 0) {
		int rc = errno;
		opq__free(ch);
		return rc;
	}
#else
	int fds[2];
	if (pipe(fds) != 0) {
		int rc = errno;
		opq__free(ch);
		return rc;
	}
	for (int i = 0; i < 2; i++) {
		fcntl(fds[i], F_SETFD, FD_CLOEXEC);
		fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK);
	}
	ch->rfd = fds[0];
	ch->wfd = fds[1];
#endif
	*chp = ch;
	return 0;
}

OPQ_EXPORT int opq_chan_destroy(opq_chan *ch)
{
	if (!ch)
		return 0;
	if (__atomic_load_n(&ch->running, __ATOMIC_ACQUIRE) ||
	    __atomic_load_n(&ch->pending, __ATOMIC_ACQUIRE))
		return EBUSY;
	/* Every operation has completed; the last pushers may still be
	 * writing to the descriptor. */
	uint64_t batches = __atomic_load_n(&ch->batches, __ATOMIC_RELAXED);
	while (__atomic_load_n(&ch->notified, __ATOMIC_ACQUIRE) != batches)
		sched_yield();
	close(ch->rfd);
	if (ch->wfd != ch->rfd)
		close(ch->wfd);
	opq__free(ch);
	return 0;
}

OPQ_EXPORT int opq_chan_fd(const opq_chan *ch, int *fd)
{
	if (!ch || !fd)
		return EINVAL;
	*fd = ch->rfd;
	return 0;
}

/* Make the descriptor readable. EAGAIN means it is (an eventfd's counter
 * or a pipe is full). */
static void notify(opq_chan *ch)
{
	uint64_t one = 1;
	ssize_t n;
	do
		n = write(ch->wfd, &one, ch->wfd == ch->rfd ? sizeof(one) : 1);
	while (n < 0 && errno == EINTR);
}

/* Empty the descriptor: an eventfd in one read, a pipe until EAGAIN. */
static void drain(opq_chan *ch)
{
	uint64_t buf[8];
	ssize_t n;
	do
		n = read(ch->rfd, buf, sizeof(buf));
	while (ch->wfd != ch->rfd && n > 0);
}

void opq__chan_accept(opq_chan *ch)
{
	__atomic_fetch_add(&ch->pending, 1, __ATOMIC_RELAXED);
}

void opq__chan_unaccept(opq_chan *ch)
{
	__atomic_fetch_sub(&ch->pending, 1, __ATOMIC_RELEASE);
}

void opq__chan_end(opq_op *op, int status)
{
	opq_chan *ch = op->opq__chan;
	op->opq__status = status;
	opq_op *top = __atomic_load_n(&ch->ready, __ATOMIC_RELAXED);
	do
		op->opq__link.opq__next = (struct opq__link *)(void *)top;
	while (!__atomic_compare_exchange_n(&ch->ready, &top, op, true, __ATOMIC_RELEASE,
	                                    __ATOMIC_RELAXED));
	/* op may be completed and freed from here on, and, unless this
	 * thread will write, ch destroyed. */
	if (!top) {
		notify(ch);
		__atomic_fetch_add(&ch->notified, 1, __ATOMIC_RELEASE);
	}
}

/* Move what has ended to ch->local, oldest first; false if nothing had. */
static bool take_ready(opq_chan *ch)
{
	drain(ch);
	opq_op *op = __atomic_exchange_n(&ch->ready, NULL, __ATOMIC_ACQUIRE);
	if (!op)
		return false;
	__atomic_store_n(&ch->batches, ch->batches + 1, __ATOMIC_RELAXED);
	opq_op *list = NULL;
	while (op) {
		opq_op *next = (opq_op *)(void *)op->opq__link.opq__next;
		op->opq__link.opq__next = (struct opq__link *)(void *)list;
		list = op;
		op = next;
	}
	ch->local = list;
	return true;
}

OPQ_EXPORT int opq_chan_run(opq_chan *ch, unsigned max, unsigned *ran)
{
	if (!ch || max == 0)
		return EINVAL;
	if (__atomic_exchange_n(&ch->running, true, __ATOMIC_ACQUIRE))
		return EBUSY;
	unsigned n = 0;
	while (n < max && (ch->local || take_ready(ch))) {
		opq_op *op = ch->local;
		ch->local = (opq_op *)(void *)op->opq__link.opq__next;
		op->opq__link.opq__next = NULL;
		n++;
		/* The completion may free, re-enqueue or destroy: done with op
		 * and, once pending reads 0, with ch. */
		__atomic_fetch_sub(&ch->pending, 1, __ATOMIC_RELEASE);
		/* The queue's IDLE (queue_impl.h): the caller's again. */
		__atomic_store_n(&op->opq__state, 0, __ATOMIC_RELAXED);
		op->opq__complete(op, op->opq__status);
	}
	if (ch->local)
		notify(ch);
	__atomic_store_n(&ch->running, false, __ATOMIC_RELEASE);
	if (ran)
		*ran = n;
	return 0;
}
