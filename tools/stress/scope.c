/*
 * Scopes under stress: every iteration builds a random task tree in a root
 * scope of its own on a shared queue. Tasks spawn children from inside
 * (up to depth 4), fail with EIO, sleep cancellably, cancel their own scope
 * or a child, wait for their own children, use any error policy and short
 * deadlines (absolute, or a timeout at spawn); the worker cancels the root
 * or single tasks at random,
 * drops or keeps handles, waits for tasks twice, then waits for the root
 * and destroys it.
 *
 * Invariants: no task's function is observed running after its parent's
 * done callback started (and a parent's done callback finds none of its
 * children running or not yet done); every done callback runs exactly once;
 * every spawned task terminates (the root wait returns within 60 s); a
 * scope with a child that failed with EIO reports an error (first error
 * nonzero, COLLECT and FIRST_ERROR), an isolating scope none but its own
 * timeout (0 or ETIMEDOUT); a done callback gets EIO when the function
 * returned EIO; a spawn into a cancelled root is ECANCELED; a handle gives
 * the same result to every wait; a root scope with a live task is EBUSY.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "stress.h"

#define MAXNODES 48
#define MAXDEPTH 4

struct node;

struct tree {
	struct smod *m;
	struct node *nodes;
	atomic_uint used;
};

struct node {
	struct tree *tr;
	struct node *parent;
	unsigned depth;
	uint64_t seed;
	atomic_int running;       /* 1 while the function runs */
	atomic_int done_calls;    /* done callbacks so far */
	atomic_bool done_started; /* the done callback began */
	atomic_int live_children; /* spawned, done callback not yet run */
	atomic_int fn_rc;         /* what the function returned; -1 before */
	atomic_bool ran;
	atomic_bool failed_child; /* a child's function returned EIO */
	int policy;               /* of its own (child) scope */
};

struct smod {
	opq_queue *q;
	_Atomic uint64_t calls, trees, tasks, ran, failed, cancels, timeouts, sleeps;
	_Atomic uint64_t inner_waits, handles, handle_waits, spawn_cancelled, first_errors;
	_Atomic uint64_t done_calls;
};

#define CALL(m) atomic_fetch_add_explicit(&(m)->calls, 1, memory_order_relaxed)
#define INC(x)  atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)

static struct node *node_new(struct tree *tr, struct node *parent, uint64_t seed)
{
	unsigned i = atomic_fetch_add(&tr->used, 1);
	if (i >= MAXNODES)
		return NULL;
	struct node *n = &tr->nodes[i];
	n->tr = tr;
	n->parent = parent;
	n->depth = parent ? parent->depth + 1 : 0;
	n->seed = seed;
	atomic_store(&n->fn_rc, -1);
	if (parent)
		atomic_fetch_add(&parent->live_children, 1);
	return n;
}

static void task_done(void *arg, void *done_arg, int result)
{
	struct node *n = arg;
	struct smod *m = n->tr->m;
	INC(m->done_calls);
	if (done_arg != m)
		stress_fail("scope", "a done callback got %p as its own argument, not %p", done_arg,
		            (void *)m);
	atomic_store(&n->done_started, true);
	if (atomic_fetch_add(&n->done_calls, 1) != 0)
		stress_fail("scope", "a done callback ran twice");
	if (atomic_load(&n->running))
		stress_fail("scope", "a done callback ran while its function runs");
	int lc = atomic_load(&n->live_children);
	if (lc != 0)
		stress_fail("scope", "a done callback ran with %d children not yet done", lc);
	int rc = atomic_load(&n->fn_rc);
	if (rc == EIO && result != EIO)
		stress_fail("scope", "the function returned EIO, the done callback got %d", result);
	if (!atomic_load(&n->ran) && result != ECANCELED && result != ETIMEDOUT)
		stress_fail("scope", "a task that never ran ended with %d", result);
	if (n->parent) {
		if (atomic_load(&n->parent->done_started))
			stress_fail("scope", "a child finished after its parent's done callback");
		if (rc == EIO)
			atomic_store(&n->parent->failed_child, true);
		atomic_fetch_sub(&n->parent->live_children, 1);
	}
}

static void check_parent(struct node *n)
{
	if (n->parent && atomic_load(&n->parent->done_started))
		stress_fail("scope", "a child runs after its parent's done callback");
}

static int task_fn(opq_scope *scope, void *arg);

static int random_policy(struct stress_rng *r)
{
	unsigned p = stress_below(r, 3);
	return p == 0 ? OPQ_SCOPE_COLLECT : p == 1 ? OPQ_SCOPE_FIRST_ERROR : OPQ_SCOPE_ISOLATE;
}

/* Check the first error a wait of a scope with this policy returned. */
static void check_first_error(int policy, bool failed_child, int fe, const char *what)
{
	if (policy == OPQ_SCOPE_ISOLATE) {
		if (fe != 0 && fe != ETIMEDOUT)
			stress_fail("scope", "%s: an isolating scope reported %d", what, fe);
	} else if (failed_child && fe == 0) {
		stress_fail("scope", "%s: a child failed with EIO, first error is 0", what);
	}
}

/* Spawn a child of n (or of the root when n is NULL) into scope. */
static int spawn(struct tree *tr, struct node *n, opq_scope *scope, struct stress_rng *r,
                 opq_task **taskp, struct node **out)
{
	struct smod *m = tr->m;
	struct node *c = node_new(tr, n, stress_next(r));
	if (!c)
		return ENOSPC;
	if (out)
		*out = c;
	opq_scope_attr *a = NULL;
	int64_t timeout = -1; /* none */
	c->policy = OPQ_SCOPE_COLLECT;
	if (stress_pct(r, 40)) {
		CALL(m);
		if (opq_scope_attr_create(&a) == 0) {
			c->policy = random_policy(r);
			CALL(m);
			opq_scope_attr_set_policy(a, c->policy);
			if (stress_pct(r, 30)) {
				int64_t ns = (int64_t)stress_below(r, 2000000);
				if (stress_pct(r, 50)) {
					timeout = ns;
				} else {
					struct timespec dl = stress_after(ns);
					CALL(m);
					opq_scope_attr_set_deadline(a, &dl);
				}
			}
		}
	}
	CALL(m);
	int rc = timeout < 0
	             ? opq_scope_spawn(scope, a, task_fn, c, task_done, m, taskp)
	             : opq_scope_spawn_timeout(scope, a, timeout, task_fn, c, task_done, m, taskp);
	opq_scope_attr_destroy(a);
	if (rc == 0) {
		INC(m->tasks);
	} else {
		/* Not spawned: its done callback never comes. */
		atomic_store(&c->done_calls, 1);
		atomic_store(&c->done_started, true);
		if (n)
			atomic_fetch_sub(&n->live_children, 1);
		if (rc == ECANCELED)
			INC(m->spawn_cancelled);
		else
			stress_fail("scope", "spawn returned %d", rc);
	}
	return rc;
}

static int task_fn(opq_scope *scope, void *arg)
{
	struct node *n = arg;
	struct tree *tr = n->tr;
	struct smod *m = tr->m;
	struct stress_rng rng = {n->seed}, *r = &rng;
	atomic_store(&n->ran, true);
	atomic_store(&n->running, 1);
	check_parent(n);
	INC(m->ran);
	CALL(m);
	if (opq_scope_current() != scope)
		stress_fail("scope", "opq_scope_current is not the task's scope");
	int rc = 0;
	opq_task *kid = NULL;
	unsigned nkids = n->depth < MAXDEPTH ? stress_below(r, 4) : 0;
	for (unsigned k = 0; k < nkids; k++) {
		bool keep = !kid && stress_pct(r, 30);
		if (spawn(tr, n, scope, r, keep ? &kid : NULL, NULL) != 0)
			break;
	}
	unsigned what = stress_below(r, 100);
	if (what < 20) {
		struct timespec dl = stress_after((int64_t)stress_below(r, 1000000));
		CALL(m);
		INC(m->sleeps);
		rc = opq_scope_sleep(scope, &dl);
		if (rc && rc != ECANCELED)
			stress_fail("scope", "sleep returned %d", rc);
	} else if (what < 30 && kid) {
		CALL(m);
		INC(m->cancels);
		opq_task_cancel(kid);
	} else if (what < 35) {
		CALL(m);
		INC(m->cancels);
		opq_scope_cancel(scope);
		CALL(m);
		if (!opq_scope_cancelled(scope))
			stress_fail("scope", "a cancelled scope says it is not");
	} else if (what < 60) {
		/* Wait for its own children (a runner helps: performs them inline). */
		struct timespec dl = stress_after(stress_pct(r, 50) ? 2000000 : 60000000000LL);
		int fe = 0;
		CALL(m);
		INC(m->inner_waits);
		int wrc = opq_scope_wait(scope, &dl, &fe);
		if (wrc == 0) {
			if (atomic_load(&n->live_children) != 0)
				stress_fail("scope", "scope_wait returned with children not done");
			check_first_error(n->policy, atomic_load(&n->failed_child), fe, "task");
		} else if (wrc != ETIMEDOUT) {
			stress_fail("scope", "scope_wait in a task returned %d", wrc);
		}
	}
	if (kid) {
		if (stress_pct(r, 50)) {
			struct timespec dl = stress_after(1000000);
			int res;
			CALL(m);
			int wrc = opq_task_wait(kid, &dl, &res);
			if (wrc && wrc != ETIMEDOUT)
				stress_fail("scope", "task_wait in a task returned %d", wrc);
		}
		CALL(m);
		opq_task_release(kid);
	}
	if (rc == 0 && stress_pct(r, 15))
		rc = EIO;
	if (rc == EIO)
		INC(m->failed);
	check_parent(n);
	atomic_store(&n->fn_rc, rc);
	atomic_store(&n->running, 0);
	return rc;
}

static int setup(void **statep, unsigned threads, uint64_t seed)
{
	(void)seed;
	struct smod *m = calloc(1, sizeof(*m));
	if (!m)
		return ENOMEM;
	opq_queue_attr *a;
	int rc = opq_queue_attr_create(&a);
	if (rc)
		return rc;
	opq_queue_attr_set_capacity(a, 0);
	rc = opq_queue_create(&m->q, a);
	opq_queue_attr_destroy(a);
	if (rc || (rc = opq_queue_start(m->q, threads < 4 ? 2 : threads / 2)))
		return rc;
	*statep = m;
	return 0;
}

#define NHANDLES 4

static void step(void *state, struct stress_worker *w)
{
	struct smod *m = state;
	struct stress_rng *r = &w->rng;
	struct node nodes[MAXNODES];
	memset(nodes, 0, sizeof(nodes));
	struct tree tr = {.m = m, .nodes = nodes};
	atomic_init(&tr.used, 0);
	INC(m->trees);

	opq_scope_attr *a = NULL;
	int root_policy = OPQ_SCOPE_COLLECT;
	if (stress_pct(r, 50)) {
		CALL(m);
		if (opq_scope_attr_create(&a))
			stress_fail("scope", "attr_create failed");
		root_policy = random_policy(r);
		CALL(m);
		opq_scope_attr_set_policy(a, root_policy);
		if (stress_pct(r, 20)) {
			struct timespec dl = stress_after((int64_t)stress_below(r, 3000000));
			CALL(m);
			opq_scope_attr_set_deadline(a, &dl);
		}
	}
	opq_scope *root;
	CALL(m);
	int rc = opq_scope_create(&root, m->q, a);
	opq_scope_attr_destroy(a);
	if (rc) {
		stress_fail("scope", "scope_create returned %d", rc);
		return;
	}
	opq_task *h[NHANDLES];
	int hres[NHANDLES];
	unsigned nh = 0;
	bool cancelled = false, failed_child = false;
	unsigned ntop = 1 + stress_below(r, 4);
	struct node *top[8];
	unsigned ntops = 0;
	for (unsigned k = 0; k < ntop; k++) {
		opq_task **tp = nh < NHANDLES && stress_pct(r, 50) ? &h[nh] : NULL;
		struct node *c = NULL;
		rc = spawn(&tr, NULL, root, r, tp, &c);
		if (rc == 0) {
			top[ntops++] = c;
			if (tp) {
				hres[nh] = -1;
				nh++;
				INC(m->handles);
			}
		}
		if (stress_pct(r, 10)) {
			CALL(m);
			INC(m->cancels);
			opq_scope_cancel(root);
			cancelled = true;
		}
		if (nh && stress_pct(r, 15)) {
			CALL(m);
			INC(m->cancels);
			opq_task_cancel(h[stress_below(r, nh)]);
		}
	}
	if (cancelled) {
		CALL(m);
		rc = opq_scope_spawn(root, NULL, task_fn, NULL, NULL, NULL, NULL);
		if (rc != ECANCELED)
			stress_fail("scope", "spawn into a cancelled root returned %d", rc);
	}
	/* Handles: drop some now, wait for others (twice, same result). */
	for (unsigned i = 0; i < nh; i++) {
		if (stress_pct(r, 30)) {
			CALL(m);
			opq_task_release(h[i]);
			h[i] = NULL;
			continue;
		}
		if (stress_pct(r, 50)) {
			struct timespec dl = stress_after(60000000000LL);
			CALL(m);
			INC(m->handle_waits);
			if ((rc = opq_task_wait(h[i], &dl, &hres[i])) != 0)
				stress_fail("scope",
				            "task_wait returned %d: a task did not terminate", rc);
		}
	}
	if (atomic_load(&tr.used) > 0 && stress_pct(r, 20)) {
		CALL(m);
		rc = opq_scope_destroy(root);
		if (rc != 0 && rc != EBUSY)
			stress_fail("scope", "destroy of a busy root returned %d", rc);
		if (rc == 0) {
			/* Everything had terminated already: nothing more to do. */
			for (unsigned i = 0; i < nh; i++)
				if (h[i])
					opq_task_release(h[i]);
			goto check_nodes;
		}
	}
	struct timespec dl = stress_after(60000000000LL);
	int fe = 0;
	CALL(m);
	rc = opq_scope_wait(root, &dl, &fe);
	if (rc) {
		stress_fail("scope", "the root wait returned %d: tasks did not terminate", rc);
		return; /* the nodes are still in use: leave them (the run ends) */
	}
	for (unsigned i = 0; i < ntops; i++)
		if (atomic_load(&top[i]->fn_rc) == EIO)
			failed_child = true;
	if (failed_child)
		INC(m->first_errors);
	check_first_error(root_policy, failed_child, fe, "root");
	for (unsigned i = 0; i < nh; i++) {
		if (!h[i])
			continue;
		int res = -1;
		CALL(m);
		if ((rc = opq_task_wait(h[i], NULL, &res)) != 0)
			stress_fail("scope", "task_wait after the root wait returned %d", rc);
		if (hres[i] != -1 && hres[i] != res)
			stress_fail("scope", "two waits for one task: %d then %d", hres[i], res);
		CALL(m);
		opq_task_release(h[i]);
	}
	CALL(m);
	if ((rc = opq_scope_destroy(root)) != 0)
		stress_fail("scope", "destroy of a finished root returned %d", rc);
check_nodes:;
	unsigned used = atomic_load(&tr.used);
	if (used > MAXNODES)
		used = MAXNODES;
	for (unsigned i = 0; i < used; i++) {
		int dc = atomic_load(&nodes[i].done_calls);
		if (dc != 1)
			stress_fail("scope", "a task's done callback ran %d times", dc);
		if (atomic_load(&nodes[i].running))
			stress_fail("scope", "a task still runs after the root wait");
	}
}

static void check(void *state)
{
	(void)state;
}

static void teardown(void *state, FILE *out)
{
	struct smod *m = state;
	opq_queue_stop(m->q, OPQ_STOP_DRAIN);
	opq_queue_destroy(m->q);
	if (m->done_calls != m->tasks)
		stress_fail("scope", "%" PRIu64 " tasks spawned, %" PRIu64 " done callbacks",
		            (uint64_t)m->tasks, (uint64_t)m->done_calls);
	fprintf(out,
	        "scope: %" PRIu64 " trees, %" PRIu64 " tasks (%" PRIu64 " ran, %" PRIu64
	        " failed), %" PRIu64 " done callbacks, %" PRIu64 " cancels, %" PRIu64
	        " spawns refused (ECANCELED), %" PRIu64 " sleeps, %" PRIu64
	        " waits inside tasks, %" PRIu64 " handles (%" PRIu64 " waited), %" PRIu64
	        " roots with a failed child\n",
	        (uint64_t)m->trees, (uint64_t)m->tasks, (uint64_t)m->ran, (uint64_t)m->failed,
	        (uint64_t)m->done_calls, (uint64_t)m->cancels, (uint64_t)m->spawn_cancelled,
	        (uint64_t)m->sleeps, (uint64_t)m->inner_waits, (uint64_t)m->handles,
	        (uint64_t)m->handle_waits, (uint64_t)m->first_errors);
	free(m);
}

static uint64_t calls(void *state)
{
	return atomic_load_explicit(&((struct smod *)state)->calls, memory_order_relaxed);
}

const struct stress_module stress_scope = {
    .name = "scope",
    .setup = setup,
    .step = step,
    .check = check,
    .teardown = teardown,
    .calls = calls,
};
