/*
 * fanout.c: see fanout.h.
 */
#include "fanout.h"

#include <errno.h>
#include <opqueue.h>
#include <time.h>

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct request {
	struct fanout_backend *b;
	int64_t start_ms;
};

struct call {
	struct request *req;
	struct fanout_backend *b;
};

/* One backend: work for its latency unless cancelled, then answer or fail. */
static int backend(opq_scope *scope, void *arg)
{
	struct call *c = arg;
	struct timespec done;
	opq_deadline_after(&done, c->b->latency_ms * 1000000);
	int rc = opq_scope_sleep(scope, &done); /* ECANCELED when a sibling failed */
	return rc ? rc : c->b->error;
}

/* The done callback gets the task's argument: the call. */
static void backend_done(void *arg, void *done_arg, int result)
{
	struct call *c = arg;
	(void)done_arg;
	c->b->result = result;
	c->b->ended_ms = now_ms() - c->req->start_ms;
}

/* The request handler: fan out, wait for all, answer with the first error. */
static int handler(opq_scope *scope, void *arg)
{
	struct request *req = arg;
	struct call calls[FANOUT_BACKENDS];
	for (int i = 0; i < FANOUT_BACKENDS; i++) {
		calls[i].req = req;
		calls[i].b = &req->b[i];
		int rc = opq_scope_spawn(scope, NULL, backend, &calls[i], backend_done, NULL, NULL);
		if (rc) {
			/* Not spawned: cancel the others, wait for them, report. */
			opq_scope_cancel(scope);
			opq_scope_wait(scope, NULL, NULL);
			return rc;
		}
	}
	int first = 0;
	int rc = opq_scope_wait(scope, NULL, &first);
	return rc ? rc : first;
}

int fanout_run(unsigned runners, int first_error_cancels, int64_t deadline_ms,
               struct fanout_backend b[FANOUT_BACKENDS], struct fanout_result *res)
{
	opq_queue *q;
	opq_scope *root;
	opq_scope_attr *attr;
	opq_task *task;
	int rc = opq_queue_create(&q, NULL);
	if (rc)
		return rc;
	if ((rc = opq_queue_start(q, runners)))
		goto out_queue;
	if ((rc = opq_scope_create(&root, q, NULL)))
		goto out_queue;
	if ((rc = opq_scope_attr_create(&attr)))
		goto out_root;
	opq_scope_attr_set_policy(attr,
	                          first_error_cancels ? OPQ_SCOPE_FIRST_ERROR : OPQ_SCOPE_COLLECT);
	struct request req = {.b = b, .start_ms = now_ms()};
	for (int i = 0; i < FANOUT_BACKENDS; i++)
		b[i].result = -1;
	if (deadline_ms > 0) /* the request's deadline: the timeout counts from now */
		rc = opq_scope_spawn_timeout(root, attr, deadline_ms * 1000000, handler, &req, NULL,
		                             NULL, &task);
	else
		rc = opq_scope_spawn(root, attr, handler, &req, NULL, NULL, &task);
	opq_scope_attr_destroy(attr);
	if (rc)
		goto out_root;
	rc = opq_task_wait(task, NULL, &res->first_error);
	res->total_ms = now_ms() - req.start_ms;
	opq_task_release(task);
out_root:
	opq_scope_destroy(root);
out_queue:
	opq_queue_stop(q, OPQ_STOP_DRAIN);
	opq_queue_destroy(q);
	return rc;
}
