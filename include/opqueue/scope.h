/*
 * opqueue/scope.h: structured concurrency on an operation queue.
 *
 * A root scope is made on a queue; tasks spawned in a scope run as
 * operations on the queue's runners. Each task has its own child scope,
 * passed to its function, in which it (and only it) spawns its children.
 * The tasks form a tree and no task outlives its parent: a task terminates
 * when its function has returned (or it was cancelled before it ran) AND
 * all its children have terminated. In order: the function returns or a
 * cancel arrives; its children are cancelled; they all terminate; its done
 * callback runs; then its parent is told (its scope's count drops, its
 * first error is recorded, waiters wake).
 *
 * Cancellation is cooperative: opq_task_cancelled() / opq_scope_cancelled()
 * tell a task it should stop, and the library's blocking calls made by a
 * task's function on its runner thread (opq_queue_enqueue on a full queue,
 * opq_queue_wait_idle, opq_line_wait, opq_line_wait_idle, opq_stage_enter,
 * opq_lease_acquire's backoff, opq_scope_sleep) return ECANCELED promptly
 * once the task is cancelled. A call that could
 * complete without blocking completes: a result beats a cancel.
 *
 * Ownership in one paragraph: the library allocates and frees tasks. A
 * task is freed once it has terminated and its handle has been released
 * (opq_task_release); a task spawned without a handle (taskp NULL) is
 * freed when it terminates. `arg` and `done_arg` are never touched. A
 * task's child scope belongs to the task and is valid while the task's
 * function runs. A root scope is freed by opq_scope_destroy(), which
 * fails with EBUSY while it has live tasks or waiters; handles still held
 * after it remain valid until released.
 *
 * A cancel (or a deadline) takes the tasks it cancels that have not
 * started out of the queue at once (opq_queue_cancel): they end then, with
 * ECANCELED (ETIMEDOUT for their own deadline), their places in a bounded
 * queue are free, and the queue counts them cancelled, not completed.
 *
 * The done callback runs exactly once per task, on whichever thread
 * completed the task's termination: the runner that ran the function, the
 * runner of the last child to terminate, the thread that cancelled a task
 * that had not started (before the cancel returns), the library's timer
 * thread for one that a deadline took out of the queue, or the thread that
 * stopped the queue with OPQ_STOP_DISCARD. It runs with no lock held and
 * may call any opqueue function; a wait on the task itself, its ancestors
 * or their scopes (which cannot terminate before it returns) is EDEADLK. It
 * should be short, and must not block: on the timer thread no other
 * deadline or lease keepalive fires while it runs.
 *
 * Threads. A root scope takes spawns, cancels, waits and sleeps from any
 * number of threads at once; opq_scope_destroy must not race with them. A
 * task's child scope takes spawns only from its task's function (EPERM)
 * and the rest from any thread while that function runs. A task handle
 * may be used by any number of threads at once until it is released,
 * once, after the others are done with it. An attribute object is not
 * thread-safe while it changes (its setters and destroy must not race
 * with any use of it); unchanged, any number of threads may pass it to
 * opq_scope_create and the spawns at once: they only read it, and copy what
 * they need.
 */
#ifndef OPQUEUE_SCOPE_H
#define OPQUEUE_SCOPE_H

#include <opqueue/common.h>
#include <opqueue/queue.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct opq_scope opq_scope;
typedef struct opq_task opq_task;
typedef struct opq_scope_attr opq_scope_attr;

/* A task's function: `scope` is the task's own child scope. Returns 0 or an errno value. */
typedef int opq_task_fn(opq_scope *scope, void *arg);
/*
 * Called once when the task has terminated: `arg` is the task's argument
 * (the one its function got), `done_arg` the callback's own, `result` the
 * task's result.
 */
typedef void opq_task_done_fn(void *arg, void *done_arg, int result);

/* Error policy of a scope. */
enum opq_scope_policy {
	OPQ_SCOPE_COLLECT = 0,     /* every child runs to its end; the first error is kept */
	OPQ_SCOPE_FIRST_ERROR = 1, /* the first child error cancels the other children */
	OPQ_SCOPE_ISOLATE = 2      /* a child's error cancels nobody and is kept by nobody:
	                              only its own done callback sees it (long-lived roots) */
};

/*
 * Attributes: policy (default OPQ_SCOPE_COLLECT) and deadline (default
 * none). Setting them must not race with other uses of the object.
 */
OPQ_EXPORT int opq_scope_attr_create(opq_scope_attr **attrp);
OPQ_EXPORT void opq_scope_attr_destroy(opq_scope_attr *attr);
OPQ_EXPORT int opq_scope_attr_set_policy(opq_scope_attr *attr, int policy);
/* An absolute CLOCK_MONOTONIC deadline, NULL for none: the scope cancels itself when it passes. */
OPQ_EXPORT int opq_scope_attr_set_deadline(opq_scope_attr *attr, const struct timespec *deadline);

/* A root scope on q (attr may be NULL). The caller owns it. */
OPQ_EXPORT int opq_scope_create(opq_scope **scopep, opq_queue *q, const opq_scope_attr *attr);
/* Free a root scope: EBUSY while tasks or waiters remain, EINVAL for a task's scope. */
OPQ_EXPORT int opq_scope_destroy(opq_scope *scope);

/*
 * Spawn fn(child_scope, arg) in scope. attr (may be NULL) configures the
 * task's child scope; its deadline cancels the task. done (may be NULL)
 * runs once when the task terminates, with arg, done_arg and the task's
 * result (so a request needs to be passed only once, as arg). taskp
 * NULL: detached, else *taskp is a handle the caller must release.
 * ECANCELED once the scope is
 * terminating or cancelled, EPERM from a thread that is not the scope's
 * task, ENOMEM, ESHUTDOWN (queue stopping); on failure nothing was
 * spawned and done is not called.
 */
OPQ_EXPORT int opq_scope_spawn(opq_scope *scope, const opq_scope_attr *attr, opq_task_fn *fn,
                               void *arg, opq_task_done_fn *done, void *done_arg, opq_task **taskp);
/*
 * opq_scope_spawn with a relative timeout: the task is cancelled (result
 * ETIMEDOUT if it never ran or its function returns ECANCELED)
 * timeout_ns nanoseconds after this call, or at attr's deadline if that
 * comes first; 0 or less: at once. A per-request deadline is this one call,
 * with a shared attr (or NULL) that nobody modifies meanwhile.
 */
OPQ_EXPORT int opq_scope_spawn_timeout(opq_scope *scope, const opq_scope_attr *attr,
                                       int64_t timeout_ns, opq_task_fn *fn, void *arg,
                                       opq_task_done_fn *done, void *done_arg, opq_task **taskp);
/* The child scope of the task running on this thread, or NULL. */
OPQ_EXPORT opq_scope *opq_scope_current(void);

/* Cancel: a scope (its owner task, or every task of a root scope), or a task. Idempotent. */
OPQ_EXPORT int opq_scope_cancel(opq_scope *scope);
OPQ_EXPORT int opq_task_cancel(opq_task *task);
/* Predicates: 1 if cancelled, else 0 (also for NULL). */
OPQ_EXPORT int opq_scope_cancelled(const opq_scope *scope);
OPQ_EXPORT int opq_task_cancelled(const opq_task *task);

/*
 * Wait until every task spawned in scope so far has terminated, or until
 * deadline: 0 (and the scope's first error in *first_error, may be NULL),
 * ETIMEDOUT, EDEADLK (called from a task inside scope). A runner of the
 * scope's queue helps: it performs queued tasks of the scope inline, nested
 * on its stack up to a bound, half the runners' stack size (deeper, it
 * waits without helping: another runner, a cancel or a deadline must end
 * the wait), so no tree shape overflows a runner's stack.
 */
OPQ_EXPORT int opq_scope_wait(opq_scope *scope, const struct timespec *deadline, int *first_error);
/* Wait for one task to terminate: 0 and its result, ETIMEDOUT, EDEADLK. */
OPQ_EXPORT int opq_task_wait(opq_task *task, const struct timespec *deadline, int *result);
/* Drop a handle (the task runs on, detached). */
OPQ_EXPORT int opq_task_release(opq_task *task);

/* Sleep until deadline (NULL: until cancelled): 0, or ECANCELED when scope is cancelled. */
OPQ_EXPORT int opq_scope_sleep(opq_scope *scope, const struct timespec *deadline);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_SCOPE_H */
