/*
 * opqueue-bench's peers: the thread pools a C daemon author would otherwise
 * pick, each driven through the same workloads as opqueue (see
 * opqueue-bench.c, which runs them and keeps the books): GLib's GThreadPool,
 * libuv's uv_queue_work, and a plain mutex/condvar pool that mallocs an
 * item and signals on every enqueue.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef HAVE_GLIB
#include <glib.h>
#endif
#ifdef HAVE_LIBUV
#include <uv.h>
#endif

#include "bench.h"

/* ---- GLib's GThreadPool --------------------------------------------------- */

#ifdef HAVE_GLIB
static GThreadPool *gpool;

static void glib_func(gpointer data, gpointer user)
{
	(void)user;
	perform_cb((long)(intptr_t)data - 1);
}

static void *glib_producer(void *arg)
{
	long base = (long)(intptr_t)arg * M;
	for (long i = base; i < base + M; i++)
		if (!g_thread_pool_push(gpool, (gpointer)(intptr_t)(i + 1), NULL))
			abort();
	producer_done();
	return NULL;
}

static int glib_setup(void)
{
	gpool = g_thread_pool_new(glib_func, NULL, (gint)R, TRUE, NULL);
	return gpool ? 0 : EAGAIN;
}

static int glib_teardown(void)
{
	g_thread_pool_free(gpool, FALSE, TRUE);
	clock_stop();
	return 0;
}

int burst_glib(void)
{
	int rc = glib_setup();
	if (rc)
		return rc;
	clock_start();
	spawn_join(P, glib_producer);
	return glib_teardown();
}

static void lat_submit_glib(long i)
{
	if (!g_thread_pool_push(gpool, (gpointer)(intptr_t)(i + 1), NULL))
		abort();
}

int latency_glib(void)
{
	return latency_run(glib_setup, lat_submit_glib, glib_teardown);
}
#endif

/* ---- libuv's uv_queue_work ------------------------------------------------ */

#ifdef HAVE_LIBUV
static uv_work_t *uvreqs;

static void uv_work(uv_work_t *req)
{
	perform_cb((long)(intptr_t)req->data);
}

static void uv_after(uv_work_t *req, int status)
{
	(void)req;
	if (status)
		abort();
}

void uv_set_size(void)
{
	char n[16];
	snprintf(n, sizeof(n), "%u", R);
	setenv("UV_THREADPOOL_SIZE", n, 1);
}

/*
 * The requests, each written before the clock as opq_setup writes its
 * operations: calloc's fresh pages would otherwise fault in the timed
 * window (one fault per 32 requests, 5 to 14 us each on the test machines).
 */
static int uv_reqs_create(void)
{
	uvreqs = calloc((size_t)nops, sizeof(*uvreqs));
	if (!uvreqs)
		return ENOMEM;
	for (long i = 0; i < nops; i++)
		uvreqs[i].data = (void *)(intptr_t)i;
	return 0;
}

/* libuv starts its pool on first use: start it before the clock. */
static int uv_warm(void)
{
	uv_set_size();
	uv_loop_t loop;
	uv_work_t req = {.data = NULL};
	if (uv_loop_init(&loop))
		return EAGAIN;
	void (*saved)(long) = perform_cb;
	recording = false;
	perform_cb = work;
	long w = W;
	W = 0;
	int rc = uv_queue_work(&loop, &req, uv_work, uv_after);
	if (!rc)
		uv_run(&loop, UV_RUN_DEFAULT);
	W = w;
	recording = true;
	perform_cb = saved;
	uv_loop_close(&loop);
	return rc ? EAGAIN : 0;
}

static void *uv_producer(void *arg)
{
	long base = (long)(intptr_t)arg * M;
	uv_loop_t loop;
	if (uv_loop_init(&loop))
		abort();
	for (long i = base; i < base + M; i++) {
		uvreqs[i].data = (void *)(intptr_t)i;
		if (uv_queue_work(&loop, &uvreqs[i], uv_work, uv_after))
			abort();
	}
	uv_run(&loop, UV_RUN_DEFAULT);
	uv_loop_close(&loop);
	producer_done();
	return NULL;
}

int burst_libuv(void)
{
	if (uv_reqs_create() || uv_warm())
		return ENOMEM;
	clock_start();
	spawn_join(P, uv_producer);
	clock_stop();
	free(uvreqs);
	return 0;
}

static uv_loop_t lat_loop;

static int lat_setup_libuv(void)
{
	if (uv_reqs_create() || uv_warm() || uv_loop_init(&lat_loop))
		return ENOMEM;
	return 0;
}

static void lat_submit_libuv(long i)
{
	uvreqs[i].data = (void *)(intptr_t)i;
	if (uv_queue_work(&lat_loop, &uvreqs[i], uv_work, uv_after))
		abort();
	if (i % 64 == 63)
		uv_run(&lat_loop, UV_RUN_NOWAIT); /* reap completions now and then */
}

static int lat_teardown_libuv(void)
{
	uv_run(&lat_loop, UV_RUN_DEFAULT);
	uv_loop_close(&lat_loop);
	clock_stop();
	free(uvreqs);
	return 0;
}

int latency_libuv(void)
{
	return latency_run(lat_setup_libuv, lat_submit_libuv, lat_teardown_libuv);
}
#endif

/* ---- a plain mutex/condvar pool that signals on every enqueue ----------- */

struct plain_item {
	struct plain_item *next;
	void (*fn)(void *);
	void *arg;
};

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct plain_item *head, *tail;
	int stop;
	pthread_t th[256];
} plain = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, {0}};

static void *plain_runner(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&plain.mu);
	for (;;) {
		struct plain_item *it = plain.head;
		if (!it) {
			if (plain.stop)
				break;
			pthread_cond_wait(&plain.cv, &plain.mu);
			continue;
		}
		plain.head = it->next;
		if (!plain.head)
			plain.tail = NULL;
		pthread_mutex_unlock(&plain.mu);
		it->fn(it->arg);
		free(it);
		pthread_mutex_lock(&plain.mu);
	}
	pthread_mutex_unlock(&plain.mu);
	return NULL;
}

static void plain_enqueue(void (*fn)(void *), void *arg)
{
	struct plain_item *it = malloc(sizeof(*it));
	if (!it)
		abort();
	it->next = NULL;
	it->fn = fn;
	it->arg = arg;
	pthread_mutex_lock(&plain.mu);
	if (plain.tail)
		plain.tail->next = it;
	else
		plain.head = it;
	plain.tail = it;
	pthread_cond_signal(&plain.cv);
	pthread_mutex_unlock(&plain.mu);
}

static void *plain_producer(void *arg)
{
	long base = (long)(intptr_t)arg * M;
	for (long i = base; i < base + M; i++)
		plain_enqueue(fn_perform, (void *)(intptr_t)i);
	producer_done();
	return NULL;
}

static int plain_setup(void)
{
	plain.stop = 0;
	for (unsigned i = 0; i < R; i++)
		if (pthread_create(&plain.th[i], NULL, plain_runner, NULL))
			return EAGAIN;
	return 0;
}

static int plain_teardown(void)
{
	pthread_mutex_lock(&plain.mu);
	plain.stop = 1;
	pthread_cond_broadcast(&plain.cv);
	pthread_mutex_unlock(&plain.mu);
	for (unsigned i = 0; i < R; i++)
		pthread_join(plain.th[i], NULL);
	clock_stop();
	return 0;
}

int burst_plain(void)
{
	int rc = plain_setup();
	if (rc)
		return rc;
	clock_start();
	spawn_join(P, plain_producer);
	return plain_teardown();
}

static void lat_submit_plain(long i)
{
	plain_enqueue(fn_perform, (void *)(intptr_t)i);
}

int latency_plain(void)
{
	return latency_run(plain_setup, lat_submit_plain, plain_teardown);
}
