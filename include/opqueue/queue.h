/*
 * opqueue/queue.h: a pool of runner threads that perform boxed operations
 * taken from one FIFO.
 *
 * Ownership in one paragraph: the queue never frees an operation the caller
 * boxed itself (an opq_op embedded in the caller's struct). From a
 * successful enqueue until its perform or discard callback is called, the
 * operation belongs to the queue and the caller must not touch or free it;
 * inside that callback it belongs to the caller again (the callback may free
 * it). An operation with a completion (opq_op_set_completion, in
 * opqueue/chan.h) stays the library's until its completion runs on the
 * channel's thread: its perform must not free it, and instead of its
 * discard the completion runs with ECANCELED. When an enqueue fails, the
 * caller keeps the operation: nothing is lost. Function-pointer operations are boxed by the queue,
 * which owns the box (it frees it, or keeps it for reuse); `arg` is never touched.
 *
 * Every function but opq_queue_destroy is thread-safe and may be called from
 * inside an operation of any queue, including its own; a call that would
 * wait for itself returns EDEADLK. See opq_queue_create(3) and the other man
 * pages.
 */
#ifndef OPQUEUE_QUEUE_H
#define OPQUEUE_QUEUE_H

#include <opqueue/common.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct opq_queue opq_queue;
typedef struct opq_queue_attr opq_queue_attr;
typedef struct opq_op opq_op;
typedef struct opq_chan opq_chan; /* a completion channel: opqueue/chan.h */

/* Called on a runner to perform an operation, or instead of it to discard it. */
typedef void opq_op_fn(opq_op *op);
/* A function-pointer operation and its optional discard callback. */
typedef void opq_fn(void *arg);
/* A runner start or exit hook: `index` numbers the runners from 0. */
typedef void opq_runner_hook(void *arg, unsigned index);
/* An operation's completion, run by its channel's thread: status 0 after
 * perform, ECANCELED instead of perform (see opq_op_set_completion(3)). */
typedef void opq_complete_fn(opq_op *op, int status);

/*
 * The header of an operation the caller boxes itself: embed it in your own
 * struct and recover the struct in the callbacks with OPQ_CONTAINER_OF.
 * Initialise it with opq_op_init(). The opq__ fields are the queue's.
 */
struct opq_op {
	opq_op_fn *perform; /* required */
	opq_op_fn *discard; /* optional: called instead of perform when dropped */
	struct opq__link opq__link;
	void *opq__owner;
	uintptr_t opq__state;
	opq_chan *opq__chan; /* opq_op_set_completion */
	opq_complete_fn *opq__complete;
	int opq__status;
};

#define OPQ_CONTAINER_OF(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

/* How opq_queue_stop() treats operations still queued. */
enum opq_stop_mode {
	OPQ_STOP_DRAIN = 0,  /* perform them all, then stop */
	OPQ_STOP_DISCARD = 1 /* call their discard callbacks instead */
};

/* The longest runner thread name prefix; runners are named "PREFIX/N". */
#define OPQ_NAME_MAX 10

/*
 * Statistics, an exact snapshot taken under the queue's lock: completed +
 * running + queued + discarded is the number of operations accepted since
 * create. The reserved words (read as 0) let fields be added without
 * changing the struct's size.
 */
typedef struct opq_queue_stats {
	uint64_t queued;  /* not started: in the FIFO or a runner's batch (bounded: <= capacity) */
	uint64_t running; /* being performed now (see opq_queue_stats_get(3)) */
	uint64_t completed;  /* performed, since create */
	uint64_t discarded;  /* discarded by stop, cancel or destroy, since create */
	uint64_t cancelled;  /* of which by opq_queue_cancel() */
	uint64_t high_water; /* most operations ever in the FIFO at once */
	uint64_t runners;    /* runner threads alive now */
	uint64_t blocked;    /* enqueue calls waiting for room now */
	uint64_t opq__reserved[8];
} opq_queue_stats;

/* Prepare an operation header: perform is required, discard may be NULL. */
OPQ_EXPORT int opq_op_init(opq_op *op, opq_op_fn *perform, opq_op_fn *discard);

/*
 * Attributes for opq_queue_create(). opq_queue_attr_create allocates one with
 * the defaults (unbounded, name "opq", no hooks, the system's stack size);
 * the caller frees it with opq_queue_attr_destroy (NULL is a no-op) once the
 * queues are created: a queue copies what it needs. An attribute object is
 * not thread-safe.
 */
OPQ_EXPORT int opq_queue_attr_create(opq_queue_attr **attrp);
OPQ_EXPORT void opq_queue_attr_destroy(opq_queue_attr *attr);
/* 0 = unbounded (the default); otherwise enqueue blocks while `capacity` wait. */
OPQ_EXPORT int opq_queue_attr_set_capacity(opq_queue_attr *attr, size_t capacity);
OPQ_EXPORT int opq_queue_attr_get_capacity(const opq_queue_attr *attr, size_t *capacity);
/* Runner thread name prefix, at most OPQ_NAME_MAX bytes; copied. */
OPQ_EXPORT int opq_queue_attr_set_name(opq_queue_attr *attr, const char *prefix);
/* Hooks each runner calls on its own thread when it starts and before it exits. */
OPQ_EXPORT int opq_queue_attr_set_hooks(opq_queue_attr *attr, opq_runner_hook *on_start,
                                        opq_runner_hook *on_exit, void *arg);
/*
 * The stack size of each runner thread, in bytes; 0, the default, leaves it
 * to the system (pthread_create's default, often the stack rlimit: 8 MiB).
 * EINVAL if attr is NULL or size is not 0 and below PTHREAD_STACK_MIN.
 * opq_queue_start and opq_queue_set_runners fail with pthread_create's error
 * (EAGAIN, EINVAL) if the system cannot give a runner a stack of that size.
 * get stores the size set (0 if none) in *size; EINVAL if either is NULL.
 */
OPQ_EXPORT int opq_queue_attr_set_stack_size(opq_queue_attr *attr, size_t size);
OPQ_EXPORT int opq_queue_attr_get_stack_size(const opq_queue_attr *attr, size_t *size);

/*
 * Create a queue with no runners (enqueue works at once; operations wait for
 * opq_queue_start). attr may be NULL for the defaults. Destroy it with
 * opq_queue_destroy. Errors: EINVAL, ENOMEM, or a pthread init error.
 */
OPQ_EXPORT int opq_queue_create(opq_queue **qp, const opq_queue_attr *attr);

/*
 * Destroy a queue that is not running (never started, or stopped). As with a
 * pthreads object, no other call on q may be in progress or still start: the
 * caller makes sure of that (stop, join the threads that enqueue, then
 * destroy). Operations still queued get their discard callbacks first.
 * EBUSY while the queue is running or stopping, or while a call it can see
 * (blocked in an enqueue, a wait, a stop) is in progress; the queue is left
 * untouched then. NULL is a no-op returning 0.
 */
OPQ_EXPORT int opq_queue_destroy(opq_queue *q);

/*
 * Start `runners` runner threads; returns once each has started and run its
 * start hook. EINVAL for 0, EALREADY when running, EBUSY while a stop is in
 * progress, EAGAIN or ENOMEM when threads cannot be made (none are left
 * running then). A stopped queue may be started again.
 */
OPQ_EXPORT int opq_queue_start(opq_queue *q, unsigned runners);

/*
 * Change the number of runners of a running queue. Growing starts runners at
 * once; shrinking lets the surplus runners exit after their current
 * operation (the call does not wait for that). EINVAL for 0, ESRCH when the
 * queue is not running, EDEADLK from a start hook of q's own runners (it
 * would wait for that runner to start), EAGAIN/ENOMEM when new threads cannot be made (those
 * already made keep running).
 */
OPQ_EXPORT int opq_queue_set_runners(opq_queue *q, unsigned runners);

/*
 * Enqueue a caller-boxed operation at the tail of the FIFO; a sleeping runner
 * is woken. On an unbounded queue this takes no lock (one compare-and-swap
 * onto the queue's inbox, moved to the FIFO by the runners in push order); a
 * bounded queue's enqueue takes its mutex to count the capacity. On a full
 * bounded queue,
 * opq_queue_enqueue blocks until a place is made, opq_queue_tryenqueue
 * returns EAGAIN, and opq_queue_timedenqueue blocks until the absolute
 * CLOCK_MONOTONIC deadline (NULL: forever), then ETIMEDOUT. ESHUTDOWN once a
 * stop has begun (also for a thread blocked in enqueue when it begins),
 * EBUSY if op waits, not started, in this queue or another, EINVAL for NULL
 * arguments, an op without perform, or a deadline whose tv_nsec is outside
 * [0, 1e9). On any error the caller keeps op.
 * Runners take operations in FIFO order, each its share of the FIFO (the
 * operations waiting divided by the runners, rounded up, at most 32; one on
 * a bounded queue, so that the capacity counts every operation not started),
 * and start them in order; a runner that finds the FIFO empty takes the
 * older half of another runner's batch before it sleeps. So on an unbounded
 * queue the rest of a batch (up to 31 operations) waits behind a runner
 * blocked in one operation until another runner finds the FIFO empty.
 */
OPQ_EXPORT int opq_queue_enqueue(opq_queue *q, opq_op *op);
OPQ_EXPORT int opq_queue_tryenqueue(opq_queue *q, opq_op *op);
OPQ_EXPORT int opq_queue_timedenqueue(opq_queue *q, opq_op *op, const struct timespec *deadline);

/*
 * The same for a function pointer: the queue boxes (fn, discard_fn, arg),
 * calls fn(arg) on a runner, or discard_fn(arg) (when not NULL) if the
 * operation is dropped. ENOMEM when the box cannot be allocated; on any
 * error neither function is called. At most one allocation per call, usually
 * none: the queue keeps the boxes of performed operations for reuse.
 */
OPQ_EXPORT int opq_queue_enqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg);
OPQ_EXPORT int opq_queue_tryenqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg);
OPQ_EXPORT int opq_queue_timedenqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg,
                                         const struct timespec *deadline);

/*
 * Remove a caller-boxed operation that has not started (in the FIFO, or in
 * a runner's batch): its discard callback is called on the calling thread
 * before this returns 0. EBUSY when it is not waiting in q (started,
 * performed, discarded, or queued in another queue).
 */
OPQ_EXPORT int opq_queue_cancel(opq_queue *q, opq_op *op);

/*
 * Stop the queue. Enqueue fails with ESHUTDOWN from the moment stop begins.
 * OPQ_STOP_DRAIN performs everything queued, OPQ_STOP_DISCARD calls the
 * discard callbacks of queued operations (on the calling thread); running
 * operations always finish. Returns once every runner has exited and been
 * joined. Idempotent; concurrent calls all return after the runners are gone
 * (a DISCARD stop during a DRAIN stop discards what is left). On a queue
 * that was never started, DRAIN performs the queued operations on the
 * calling thread. EDEADLK when called from one of q's own operations,
 * EINVAL for a bad mode.
 */
OPQ_EXPORT int opq_queue_stop(opq_queue *q, int mode);

/*
 * Wait until nothing is queued and nothing is running, or until the absolute
 * CLOCK_MONOTONIC deadline (NULL: forever; ETIMEDOUT; EINVAL for a deadline
 * whose tv_nsec is outside [0, 1e9)). EDEADLK from one of
 * q's own operations (it would wait for itself).
 */
OPQ_EXPORT int opq_queue_wait_idle(opq_queue *q, const struct timespec *deadline);

/* Copy an exact snapshot of the statistics into *stats. */
OPQ_EXPORT int opq_queue_stats_get(opq_queue *q, opq_queue_stats *stats);

/*
 * The queue whose operation the calling thread is performing, or NULL.
 */
OPQ_EXPORT opq_queue *opq_queue_current(void);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_QUEUE_H */
