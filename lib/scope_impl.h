/*
 * scope_impl.h: the scope tree's private structs and the functions its
 * three files share: scope.c (attributes, root scopes, spawn, cancel,
 * handles), scope_tree.c (cancel walks, settling terminated tasks, running
 * a task, deadlines) and scope_wait.c (the waits, which help).
 *
 * One lock per tree (tr->mu) guards every scope and task of the tree: the
 * child lists, states, counts, first errors, and each scope's cancel
 * context (cancel.c), whose lock it is.
 * Termination never blocks a runner: when a task's function returns, its
 * children are cancelled and, if none is left, it finishes at once;
 * otherwise the last child to terminate finishes it ("settle" walks up).
 * Explicit waits (opq_scope_wait, opq_task_wait, in scope_wait.c) made on
 * a runner of the tree's queue help: they take a queued task of the
 * subtree they wait for out of the FIFO and perform it inline
 * (opq__queue_help), so a queue with one runner runs a tree to
 * completion; the helper's stack grows with the tree's depth only (it
 * helps descendants of what it waits for), and stops growing at a bound
 * (scope_wait.c): deeper, a wait waits for another runner.
 *
 * Invariants, under tr->mu:
 * - a task is in its parent scope's child list from spawn until its done
 *   callback has run (state DONE); scope->nchildren counts that list;
 * - a cancelled scope's descendants are all cancelled, and a cancelled or
 *   closing scope accepts no spawn: so a cancel walk may stop at a node
 *   already cancelled;
 * - t->refs counts: the tree's link (until DONE), the caller's handle, and
 *   temporary pins (spawn, helpers, waiters); the task is freed at 0.
 *   tr->refs counts the root scope plus every task not yet freed.
 *
 * The thread's current cancel context is the scope of the task it runs
 * (task_run sets it; a done callback runs with none): every context ever
 * made current is a scope's, so the current scope is the one around it.
 *
 * A cancel takes the cancelled tasks that have not started out of the
 * queue at once (opq_queue_cancel), so that they end, run their done
 * callbacks and free their places in a bounded queue then, not when a
 * runner reaches them: whoever marks a QUEUED task cancelled (a cancel
 * walk, a deadline, a returning parent, a failing sibling) pins it onto
 * the pull list of its `struct after`, and once it has dropped tr->mu
 * calls opq_queue_cancel, whose discard callback (opq__task_discard) ends the
 * task on that thread. A runner or a helper that took the task first
 * makes that call EBUSY and runs the task, which sees the cancel and
 * skips its function. Exactly one thread pulls a task: the one that saw
 * it QUEUED when it cancelled it, or spawn, for a task cancelled while it
 * was being enqueued.
 *
 * Lock order: object mutex (queue, line, stage) -> tr->mu. Nothing takes
 * an object mutex while holding tr->mu; cancellers wake blocked calls and
 * pull queued tasks after dropping it (opq__after_run; opq__cancel_wake, see
 * cancel.c).
 */
#ifndef OPQ_SCOPE_IMPL_H
#define OPQ_SCOPE_IMPL_H

#include "internal.h"

struct opq_scope_attr {
	int policy;
	bool has_deadline;
	struct timespec deadline;
};

enum { OPQ__T_NEW, OPQ__T_QUEUED, OPQ__T_RUNNING, OPQ__T_RETURNED, OPQ__T_FINISHING, OPQ__T_DONE };
struct opq__tree;

struct opq_scope {
	struct opq__tree *tr;
	opq_task *owner;           /* NULL for the root scope */
	struct opq__link children; /* live children, oldest first (helpers go in FIFO order) */
	size_t nchildren;
	struct opq__cancel_ctx cx; /* cancelled?, and the calls blocked in it */
	bool closing;              /* no more spawns */
	bool timed_out;            /* its deadline fired */
	int policy;
	int first_error;
	bool has_deadline;
	struct timespec deadline;
	struct opq__link dl; /* in the tree's deadline list, or unlinked */
};

struct opq_task {
	opq_op op;
	opq_scope scope;      /* the task's own child scope */
	opq_scope *pscope;    /* the scope it was spawned in */
	struct opq__link sib; /* in pscope's children */
	opq_task_fn *fn;
	void *arg;
	opq_task_done_fn *done;
	void *done_arg;
	int state;
	int result;
	unsigned refs;
	opq_task *pull_next; /* on a canceller's list of queued tasks to take out (scope.c) */
};

struct opq__tree {
	pthread_mutex_t mu;
	pthread_cond_t cv; /* a task terminated, or one was queued: waiters look */
	opq_queue *q;
	unsigned refs;
	unsigned waiters;        /* threads in opq_scope_wait / opq_task_wait */
	struct opq__link dl;     /* scopes whose deadline has not fired, soonest first */
	struct opq__timer timer; /* on the library's timer thread: the first one's deadline */
	atomic_bool timer_ref;   /* q holds a timer thread reference for the tree */
	opq_scope root;
};

/* The scope of the task the calling thread runs, or NULL. */
OPQ_INTERNAL opq_scope *opq__scope_current(void);
/* The task whose done callback the calling thread runs, or NULL. */
OPQ_INTERNAL opq_task *opq__scope_done_task(void);
/* Under tr->mu: s's oldest child, or NULL. */
OPQ_INTERNAL opq_task *opq__scope_first_child(const opq_scope *s);
/* Under tr->mu: the next task of a depth-first walk of the subtree under top, after t. */
OPQ_INTERNAL opq_task *opq__scope_walk_next(opq_scope *top, opq_task *t, bool descend);
/* Under tr->mu: drop a reference to t; true if the tree must be freed (after unlocking). */
OPQ_INTERNAL bool opq__task_unref(opq_task *t);
OPQ_INTERNAL void opq__tree_free(struct opq__tree *tr);

/* Under tr->mu. */
static inline bool opq__scope_cancelled(const opq_scope *s)
{
	return opq__cancel_ctx_cancelled(&s->cx);
}

/*
 * What a cancel leaves to do once tr->mu is dropped: the blocked calls to
 * wake, and the cancelled tasks that were still queued, each pinned, to
 * take out of the queue. Start it empty ({ 0 }).
 */
struct after {
	struct opq__cancel_reg *wake;
	opq_task *pull; /* by pull_next */
};

OPQ_INTERNAL void opq__scope_init(opq_scope *s, struct opq__tree *tr, opq_task *owner,
                                  const opq_scope_attr *attr);
/* Under tr->mu: cancel s itself (if self) and every task below it. */
OPQ_INTERNAL void opq__cancel_tree(opq_scope *s, bool self, struct after *af);
/* Without tr->mu: wake af's blocked calls and take its tasks out of the queue. */
OPQ_INTERNAL void opq__after_run(struct opq__tree *tr, const struct after *af);
/* Under tr->mu: drop af's pins and empty it; true if the tree must be freed. */
OPQ_INTERNAL bool opq__after_unpin(struct after *af);
/* Under tr->mu: unlink s from the tree's deadline list, and t from p's children. */
OPQ_INTERNAL void opq__dl_remove(opq_scope *s);
OPQ_INTERNAL void opq__child_unlink(opq_scope *p, opq_task *t);
/* Without tr->mu: make sure the timer thread runs before a deadline is armed. */
OPQ_INTERNAL int opq__tree_timer_ref(struct opq__tree *tr);
/* Under tr->mu, after opq__tree_timer_ref: arm s's deadline. */
OPQ_INTERNAL void opq__dl_arm(struct opq__tree *tr, opq_scope *s);
/* A task's operation callbacks: run it, or end it unrun. */
OPQ_INTERNAL void opq__task_perform(opq_op *op);
OPQ_INTERNAL void opq__task_discard(opq_op *op);

#endif /* OPQ_SCOPE_IMPL_H */
