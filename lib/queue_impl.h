/*
 * queue_impl.h: the operation queue's private structs and the functions
 * its three files share (queue.c: attributes and lifecycle; enqueue.c:
 * enqueue, backpressure, boxes and cancel; runner.c: the runners, wait_idle
 * and statistics).
 *
 * The design in one paragraph. One mutex, q->mu, guards the FIFO (a list of
 * operations), every counter and the lifecycle. A runner takes its share
 * of the FIFO under q->mu (a batch: one operation on a bounded queue, up to
 * BATCH_MAX on an unbounded one), starts the first at once and keeps the
 * rest in its own list, guarded by its own mutex r->mu, which only it takes
 * once per operation; others take r->mu only to cancel, steal, discard or
 * count. So a runner pays for q->mu once per batch and for an uncontended
 * lock per operation, and every operation not started stays where a
 * cancel, a stop or another runner can find it.
 *
 * Where an operation is (op->opq__state, op->opq__owner):
 * - IDLE: nowhere (after init, perform, discard or cancel); the caller's;
 * - INBOX: pushed onto an unbounded queue's inbox (below), not yet moved;
 * - QUEUED: in q->fifo, owner q;
 * - BATCHED: in runner r's list, owner r, not started;
 * - TAKEN: a runner (or a helping thread) performs it; the queue's until
 *   perform is called, the caller's from then on; with a completion, the
 *   library's until the completion is called;
 * - ENDED: an operation with a completion, on its channel's ready list
 *   (chan.c), which makes it IDLE again just before the completion.
 * opq__owner is written under q->mu only (by push, take, steal, cancel);
 * opq__state also under r->mu when r starts a BATCHED operation. Both are
 * relaxed atomics: a caller may enqueue an operation into one queue while
 * another thread, wrongly, looks for it in another.
 *
 * The inbox. An unbounded queue's enqueue takes no lock: it pushes the
 * operation onto q->inbox, a stack, with one compare-and-swap, and whoever
 * next holds q->mu with a need to see the FIFO (a runner's take, cancel,
 * stats, wait_idle, stop) moves the stack, reversed, to the FIFO's tail
 * (opq__inbox_drain). A stop swaps in INBOX_CLOSED: later pushes fail with
 * ESHUTDOWN. A pushing producer and a runner going to sleep meet on
 * idle_runners: the runner counts itself in it and then looks at the inbox
 * (and the FIFO, which its idle check may have drained the inbox into)
 * once more, the producer pushes and then reads it (both sequentially
 * consistent), so one of them sees the other. A producer that sees more
 * runners idle than signalled (work_signals, below) takes q->mu to signal
 * one; a runner signalled already comes back and drains. A bounded queue
 * counts its capacity under q->mu: its enqueue pushes onto the FIFO there.
 *
 * Sleep and wake, under q->mu (checked by the spin model lib/queue.pml):
 * - a runner sleeps on `work` only when the FIFO is empty and no runner
 *   holds operations not started (it steals half of them first; `holders`
 *   counts the runners that may, so that no search is made when none
 *   does), counted in idle_runners; an enqueue signals `work` when idle_runners exceeds
 *   work_signals (signals sent and not yet consumed) and counts the signal;
 *   a runner back from the wait consumes one. So work_signals <=
 *   idle_runners, and an operation pushed while a runner sleeps unsignalled
 *   always wakes one;
 * - a producer sleeps on `space` only when the bounded FIFO is full,
 *   counted in space_waiters; whoever takes operations out (make_room)
 *   signals as many as there are places not yet promised to a signalled
 *   producer. A producer that comes back and finds room takes it, timed
 *   out or not, so no promised place is left unused;
 * - `busy` counts runners holding work, from the take that gave them
 *   operations until they come back and find none; with `helping`
 *   (operations performed by a thread that is not a runner) and the FIFO
 *   it decides idleness, and the runner that makes the queue idle
 *   broadcasts `idle`.
 */
#ifndef OPQ_QUEUE_IMPL_H
#define OPQ_QUEUE_IMPL_H

#include "internal.h"
#include "list.h"

enum { ST_NEW, ST_RUNNING, ST_STOPPING, ST_STOPPED };
enum {
	OP_IDLE = 0,
	OP_INBOX = 0x6962,
	OP_QUEUED = 0x7175,
	OP_BATCHED = 0x6261,
	OP_TAKEN = 0x7461,
	OP_ENDED = 0x656e
};

/* Whether op is the library's: in a queue, or with a completion to come. */
static inline bool opq__op_busy(const opq_op *op, uintptr_t st)
{
	return st == OP_INBOX || st == OP_QUEUED || st == OP_BATCHED || st == OP_ENDED ||
	       (st == OP_TAKEN && op->opq__chan);
}

#define OP_STATE(op)         __atomic_load_n(&(op)->opq__state, __ATOMIC_RELAXED)
#define OP_SET_STATE(op, st) __atomic_store_n(&(op)->opq__state, (st), __ATOMIC_RELAXED)
#define OP_OWNER(op)         __atomic_load_n(&(op)->opq__owner, __ATOMIC_RELAXED)
#define OP_SET_OWNER(op, o)  __atomic_store_n(&(op)->opq__owner, (void *)(o), __ATOMIC_RELAXED)
#define OP_OF(link)          OPQ_CONTAINER_OF(link, opq_op, opq__link)

/* Perform op; one with a completion, which perform must not free, then
 * goes to its channel. */
static inline void opq__op_perform(opq_op *op)
{
	if (op->opq__chan) {
		op->perform(op);
		OP_SET_STATE(op, OP_ENDED);
		opq__chan_end(op, 0);
	} else {
		op->perform(op); /* op may be freed from here on */
	}
}

/* The most operations a runner of an unbounded queue takes at once. */
#define BATCH_MAX 32

struct opq_queue_attr {
	size_t capacity;
	char name[OPQ_NAME_MAX + 1];
	opq_runner_hook *on_start;
	opq_runner_hook *on_exit;
	void *hook_arg;
	size_t stack_size; /* of each runner; 0: the system's default */
};

struct runner {
	opq_queue *q;
	struct opq__link link; /* in q->runners, under q->mu */
	pthread_t thread;
	unsigned index;
	bool busy; /* counted in q->busy; under q->mu */
	/* Counted in q->holders from a take of more than one operation until
	 * its next take: a runner with operations not started holds; under q->mu. */
	bool holds;
	bool finished; /* its thread is done: join it; under q->mu */

	/* Under r->mu. */
	pthread_mutex_t mu;
	struct opq__link batch; /* operations taken, not started, in FIFO order */
	unsigned nbatch;
	bool running;       /* performing an operation now */
	uint64_t completed; /* performed by this runner */
};

struct opq_queue {
	pthread_mutex_t mu;
	pthread_cond_t work;   /* runners: an operation is queued, or leave */
	pthread_cond_t space;  /* producers: room in a bounded FIFO, or stop */
	pthread_cond_t idle;   /* wait_idle: nothing queued, nothing running */
	pthread_cond_t change; /* start/stop: runners started or finished, stop done */
	struct opq__link fifo;
	size_t queued; /* in the FIFO */
	size_t capacity;
	unsigned idle_runners; /* read without q->mu by a producer after its push */
	unsigned work_signals; /* also read without q->mu by a producer */
	unsigned space_waiters, space_signals;
	unsigned idle_waiters;
	unsigned busy;          /* runners holding work */
	unsigned holders;       /* runners that may hold operations not started */
	unsigned helping;       /* operations performed by other threads now */
	unsigned callers;       /* threads blocked in a call on q: destroy is EBUSY */
	unsigned target;        /* runners wanted */
	unsigned alive;         /* runners in their loop */
	unsigned threads;       /* runner threads not yet finished */
	unsigned spawning;      /* calls creating runner threads now */
	unsigned unstarted;     /* runners created that have not run their start hook */
	unsigned stuck_runners; /* runners of q blocked in enqueue on a full FIFO */
	unsigned reaping;       /* calls joining finished runners now */
	unsigned next_index;
	int state;
	bool timer_ref;           /* holds a timer thread reference (opq__queue_timer_ref) */
	bool destroying;          /* opq_queue_destroy is discarding what was queued */
	pthread_t stop_leader;    /* the thread leading the stop in progress */
	uint64_t stops;           /* completed stops: concurrent stoppers wait for it to move */
	struct opq__link runners; /* every runner not yet joined */
	/* completed: by runners that have exited and by other threads. */
	uint64_t completed, discarded, cancelled, high_water;
	struct opq_queue_attr attr;
	/*
	 * Boxes for reuse. Runners push the boxes they performed onto
	 * `spare` (a stack, one compare-and-swap per batch); an enqueue takes
	 * one from `boxes` under box_mu, moving the whole of `spare` there
	 * when it is empty. Only box_mu's holder takes from `spare`, so a
	 * box cannot leave and come back under a compare-and-swap (no ABA).
	 */
	pthread_mutex_t box_mu;
	opq_op *boxes;   /* under box_mu, by opq__link.opq__next */
	unsigned nspare; /* boxes kept, about: `spare` stops growing past SPARE_MAX */
	/*
	 * Pushed without the lock, each on a cache line of its own (q comes
	 * from calloc, not aligned to a line: 64 bytes on each side).
	 */
	char pad0_[64];
	opq_op *spare;
	char pad1_[64];
	struct opq__link *inbox;
	char pad2_[64];
};

/* The most boxes a queue keeps for reuse. */
#define SPARE_MAX 4096

#define INBOX_CLOSED ((struct opq__link *)(uintptr_t)1)
/* Whether an inbox's top holds operations (it is neither empty nor closed). */
#define INBOX_HOLDS(top)       ((uintptr_t)(top) > (uintptr_t)INBOX_CLOSED)
#define IDLE_RUNNERS(q)        __atomic_load_n(&(q)->idle_runners, __ATOMIC_SEQ_CST)
#define SET_IDLE_RUNNERS(q, n) __atomic_store_n(&(q)->idle_runners, (n), __ATOMIC_SEQ_CST)
#define WORK_SIGNALS(q)        __atomic_load_n(&(q)->work_signals, __ATOMIC_SEQ_CST)
#define SET_WORK_SIGNALS(q, n) __atomic_store_n(&(q)->work_signals, (n), __ATOMIC_SEQ_CST)

/*
 * A function-pointer operation boxed by the queue. A box is told from a
 * caller's operation by op.perform == opq__box_perform; op.discard holds
 * the caller's discard function (an opq_fn, converted), so every discard
 * goes through opq__op_discard().
 */
struct box {
	opq_op op;
	opq_fn *fn;
	void *arg;
};

/* The queue whose runner (or stop-drain, or helper) this thread is. */
OPQ_INTERNAL extern _Thread_local opq_queue *opq__tls_queue;
/* Set while a runner runs its start hook: start and resize wait for it. */
OPQ_INTERNAL extern _Thread_local bool opq__tls_in_start_hook;
/* Set while a runner runs its exit hook: it has left `alive`. */
OPQ_INTERNAL extern _Thread_local bool opq__tls_in_exit_hook;

/* enqueue.c */
/* Keep a chain of performed boxes (first..last, n of them) for reuse, or free it. */
OPQ_INTERNAL void opq__boxes_put(opq_queue *q, opq_op *first, opq_op *last, unsigned n);
/* Free a chain of boxes (by opq__link.opq__next). */
OPQ_INTERNAL void opq__boxes_free(opq_op *box);
OPQ_INTERNAL void opq__box_perform(opq_op *op);
OPQ_INTERNAL void opq__op_discard(opq_op *op);
/* Call the discard callbacks of a list of operations (by opq__link.opq__next). */
OPQ_INTERNAL void opq__discard_list(opq_op *op);
/* Signal producers waiting for room, one per place not promised. Under q->mu. */
OPQ_INTERNAL void opq__make_room(opq_queue *q);

/* runner.c */
OPQ_INTERNAL void *opq__runner_main(void *arg);
/*
 * Take every operation not started (FIFO and batches) out as a list for
 * opq__discard_list, counted discarded. Under q->mu.
 */
OPQ_INTERNAL opq_op *opq__take_all(opq_queue *q);
/* Move what producers pushed onto the inbox to the FIFO's tail. Under q->mu. */
OPQ_INTERNAL void opq__inbox_drain(opq_queue *q);
/* Close the inbox (later pushes fail with ESHUTDOWN), or open it again. Under q->mu. */
OPQ_INTERNAL void opq__inbox_close(opq_queue *q);
OPQ_INTERNAL void opq__inbox_open(opq_queue *q);
/* Whether nothing is queued and nothing is running (drains the inbox). Under q->mu. */
OPQ_INTERNAL bool opq__is_idle(opq_queue *q);
/* An operation performed by a thread that is not a runner is done. Under q->mu. */
OPQ_INTERNAL void opq__helped_done(opq_queue *q);

#endif /* OPQ_QUEUE_IMPL_H */
