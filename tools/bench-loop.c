/*
 * opqueue-bench loop: round trips from an event loop's thread, opqueue's
 * completion channel against libuv's uv_queue_work.
 *
 * A round trip is what a daemon does for each piece of blocking work: the
 * loop thread submits an operation, a runner performs it (empty, or
 * spinning W ns), and its completion runs back on the loop thread. Two
 * measures:
 *
 * throughput  the loop keeps N operations in flight (-i LIST) until M
 *             round trips (-m) have ended; each completion submits the
 *             next one itself. Round trips per second and the CPU time of
 *             the whole process per round trip.
 * latency     one round trip at a time on an idle loop: from just before
 *             the submit to the moment its completion runs on the loop;
 *             p50, p99, p99.9 over -n samples.
 *
 * Variants: "opqueue intrusive" (an opq_op with opq_op_set_completion,
 * enqueued again from its completion: nothing allocated), "opqueue submit"
 * (opq_queue_submit: a function, its argument and an after function), both
 * on a plain epoll loop that watches the channel's descriptor and calls
 * opq_chan_run(ch, 64) when it is readable, as the example file server
 * does; and "libuv uv_queue_work" with its after_work_cb on a uv loop
 * (uv_run), UV_THREADPOOL_SIZE=R. The queue has R runners.
 *
 * Each run is a child process of its own (fork, no exec: the parent has
 * started no thread and no libuv), which first runs the same workload
 * untimed (a tenth of it, at least 1000 round trips) so that the threads
 * exist and the memory is touched. Every run checks that every operation
 * was performed once and completed once, with status 0, on the loop
 * thread. Rounds alternate the order of the variants (forward, backward),
 * and every figure is the median over -k runs.
 */
#define _GNU_SOURCE 1
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <opqueue.h>
#ifdef HAVE_LIBUV
#include <uv.h>
#endif

#include "bench.h"

#ifndef OPQUEUE_CHAN_H
/* The build of an older tree (opqueue-bench-old) has no completion channel. */
int run_loop(const struct loop_opts *o)
{
	(void)o;
	fprintf(stderr, "opqueue-bench: loop: this build's opqueue has no completion channel\n");
	return 2;
}
#else

#define RUN_MAX 64 /* completions per opq_chan_run, as a daemon would bound it */

enum { V_INTRUSIVE, V_SUBMIT, V_LIBUV, NLV };
static const char *const vname[NLV] = {"opqueue intrusive", "opqueue submit",
                                       "libuv uv_queue_work"};

struct loop_result {
	int rc;
	double rate, cpu; /* round trips per second; CPU ns per round trip */
	double p50, p99, p999;
};

/* One run's state: this process's, on the loop thread unless noted. */
static long trips;   /* round trips to make (0 in latency runs: no resubmit) */
static long issued;  /* operations submitted */
static long ended;   /* completions run */
static long spin_ns; /* work per operation */
static unsigned char *performed, *completed; /* per operation: runners', loop's */
static uint64_t *t_end;                      /* latency: when each completion ran */
static long bad; /* completions with a status, on another thread, failed submits */
static pthread_t loop_thread;

/* On a runner: the operation's work, and the mark that it ran. */
static void perform_index(long i)
{
	if (spin_ns) {
		uint64_t t0 = now_ns();
		while (now_ns() - t0 < (uint64_t)spin_ns)
			;
	}
	performed[i]++; /* one runner per index; the completion reads it after */
}

/* On the loop: the completion of operation i; true if another is due. */
static bool end_index(long i, int status)
{
	if (status || !pthread_equal(pthread_self(), loop_thread))
		bad++;
	completed[i]++;
	if (t_end)
		t_end[i] = now_ns();
	ended++;
	return issued < trips;
}

/* ---- opqueue: the channel on a plain epoll loop ------------------------- */

struct lop {
	opq_op op;
	long i;
};

static opq_queue *lq;
static opq_chan *lch;
static int lep = -1;

static void lop_perform(opq_op *op)
{
	perform_index(OPQ_CONTAINER_OF(op, struct lop, op)->i);
}

static void lop_complete(opq_op *op, int status)
{
	struct lop *l = OPQ_CONTAINER_OF(op, struct lop, op);
	if (end_index(l->i, status)) {
		l->i = issued++;
		if (opq_queue_enqueue(lq, op))
			bad++;
	}
}

static void fn_work(void *arg)
{
	perform_index((long)(intptr_t)arg);
}

static void fn_after(void *arg, int status)
{
	if (end_index((long)(intptr_t)arg, status) &&
	    opq_queue_submit(lq, lch, fn_work, fn_after, (void *)(intptr_t)issued++, NULL))
		bad++;
}

static int opq_loop_setup(unsigned runners)
{
	opq_queue_attr *a;
	int rc = opq_queue_attr_create(&a), fd;
	if (rc)
		return rc;
	opq_queue_attr_set_name(a, "loop");
	rc = opq_queue_create(&lq, a);
	opq_queue_attr_destroy(a);
	if (rc || (rc = opq_chan_create(&lch)) || (rc = opq_chan_fd(lch, &fd)) ||
	    (rc = opq_queue_start(lq, runners)))
		return rc;
	lep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN};
	if (lep < 0 || epoll_ctl(lep, EPOLL_CTL_ADD, fd, &ev))
		return errno;
	return 0;
}

static int opq_loop_teardown(void)
{
	int rc = opq_queue_stop(lq, OPQ_STOP_DRAIN);
	if (!rc)
		rc = opq_queue_destroy(lq);
	if (!rc)
		rc = opq_chan_destroy(lch); /* EBUSY if a completion was never run */
	close(lep);
	return rc;
}

/* Wait for the channel's descriptor (10 s at most), run what is ready. */
static int opq_loop_once(void)
{
	struct epoll_event ev;
	int n = epoll_wait(lep, &ev, 1, 10000);
	if (n == 0)
		return ETIMEDOUT;
	if (n < 0)
		return errno == EINTR ? 0 : errno;
	return opq_chan_run(lch, RUN_MAX, NULL);
}

static int opq_submit(int v, struct lop *l, long i)
{
	if (v == V_SUBMIT)
		return opq_queue_submit(lq, lch, fn_work, fn_after, (void *)(intptr_t)i, NULL);
	l->i = i;
	return opq_queue_enqueue(lq, &l->op);
}

/* Throughput: `window` operations in flight until `trips` have ended. */
static int opq_trips(int v, long window)
{
	struct lop *ops = calloc((size_t)window, sizeof(*ops));
	if (!ops)
		return ENOMEM;
	for (long j = 0; j < window; j++) {
		opq_op_init(&ops[j].op, lop_perform, NULL);
		opq_op_set_completion(&ops[j].op, lch, lop_complete);
	}
	int rc = 0;
	for (long j = 0; j < window && issued < trips && !rc; j++)
		rc = opq_submit(v, &ops[j], issued++);
	while (!rc && ended < trips)
		rc = opq_loop_once();
	free(ops);
	return rc;
}

/* Latency: one at a time; t0[s] before the submit. */
static int opq_latency(int v, long samples, uint64_t *t0)
{
	struct lop l;
	opq_op_init(&l.op, lop_perform, NULL);
	opq_op_set_completion(&l.op, lch, lop_complete);
	int rc = 0;
	for (long s = 0; s < samples && !rc; s++) {
		long before = ended;
		t0[s] = now_ns();
		rc = opq_submit(v, &l, s);
		while (!rc && ended == before)
			rc = opq_loop_once();
	}
	return rc;
}

/* ---- libuv: uv_queue_work and its after_work_cb ----------------------- */

#ifdef HAVE_LIBUV
static uv_loop_t uvl;

static void uvl_work(uv_work_t *r)
{
	perform_index((long)(intptr_t)r->data);
}

static void uvl_after(uv_work_t *r, int status)
{
	if (end_index((long)(intptr_t)r->data, status)) {
		r->data = (void *)(intptr_t)issued++;
		if (uv_queue_work(r->loop, r, uvl_work, uvl_after))
			bad++;
	}
}

static int uv_trips(long window)
{
	uv_work_t *reqs = calloc((size_t)window, sizeof(*reqs));
	if (!reqs)
		return ENOMEM;
	int rc = 0;
	for (long j = 0; j < window && issued < trips && !rc; j++) {
		reqs[j].data = (void *)(intptr_t)issued++;
		rc = uv_queue_work(&uvl, &reqs[j], uvl_work, uvl_after) ? EAGAIN : 0;
	}
	if (!rc)
		uv_run(&uvl, UV_RUN_DEFAULT); /* returns when no work is left */
	free(reqs);
	return rc;
}

static int uv_latency(long samples, uint64_t *t0)
{
	uv_work_t r;
	for (long s = 0; s < samples; s++) {
		t0[s] = now_ns();
		r.data = (void *)(intptr_t)s;
		if (uv_queue_work(&uvl, &r, uvl_work, uvl_after))
			return EAGAIN;
		uv_run(&uvl, UV_RUN_DEFAULT); /* returns once the completion has run */
	}
	return 0;
}
#endif

/* ---- one run -------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* Every operation of 0..n-1 performed once and completed once. */
static int check_once(long n)
{
	for (long i = 0; i < n; i++)
		if (performed[i] != 1 || completed[i] != 1) {
			fprintf(stderr,
			        "opqueue-bench: loop: operation %ld performed %d and completed "
			        "%d times\n",
			        i, performed[i], completed[i]);
			return EPROTO;
		}
	if (bad) {
		fprintf(stderr,
		        "opqueue-bench: loop: %ld completions with a status, off the loop "
		        "thread, or failed submits\n",
		        bad);
		return EPROTO;
	}
	return 0;
}

/* A pass of the workload over n operations (timed or not). */
static int pass(int v, bool latency, long n, long window, uint64_t *t0)
{
	memset(performed, 0, (size_t)n);
	memset(completed, 0, (size_t)n);
	issued = ended = bad = 0;
	trips = latency ? 0 : n;
	int rc;
#ifdef HAVE_LIBUV
	if (v == V_LIBUV)
		rc = latency ? uv_latency(n, t0) : uv_trips(window);
	else
#endif
		rc = latency ? opq_latency(v, n, t0) : opq_trips(v, window);
	return rc ? rc : check_once(n);
}

static void run_here(const struct loop_opts *o, int v, bool latency, long window, long spin,
                     struct loop_result *res)
{
	memset(res, 0, sizeof(*res));
	long n = latency ? o->samples : o->trips, warm = n / 10 < 1000 ? 1000 : n / 10;
	if (warm > n)
		warm = n;
	spin_ns = spin;
	loop_thread = pthread_self();
	performed = calloc((size_t)n, 1);
	completed = calloc((size_t)n, 1);
	uint64_t *t0 = latency ? calloc((size_t)n, sizeof(*t0)) : NULL;
	t_end = latency ? calloc((size_t)n, sizeof(*t_end)) : NULL;
	if (!performed || !completed || (latency && (!t0 || !t_end))) {
		res->rc = ENOMEM;
		return;
	}
	if (latency)
		for (long i = 0; i < n; i++)
			t0[i] = t_end[i] = 1; /* touched now: no page fault while timing */
#ifdef HAVE_LIBUV
	if (v == V_LIBUV)
		res->rc = uv_loop_init(&uvl) ? EAGAIN : 0;
	else
#endif
		res->rc = opq_loop_setup(o->runners);
	if (!res->rc)
		res->rc = pass(v, latency, warm, window, t0); /* untimed */
	uint64_t w0 = now_ns(), c0 = cpu_ns();
	if (!res->rc)
		res->rc = pass(v, latency, n, window, t0);
	uint64_t w1 = now_ns(), c1 = cpu_ns();
	int rc;
#ifdef HAVE_LIBUV
	if (v == V_LIBUV)
		rc = uv_loop_close(&uvl) ? EBUSY : 0;
	else
#endif
		rc = opq_loop_teardown();
	if (!res->rc)
		res->rc = rc;
	if (!res->rc) {
		res->rate = (double)n / ((double)(w1 - w0) / 1e9);
		res->cpu = (double)(c1 - c0) / (double)n;
	}
	if (!res->rc && latency) {
		for (long i = 0; i < n; i++)
			t0[i] = t_end[i] - t0[i];
		qsort(t0, (size_t)n, sizeof(*t0), cmp_u64);
		res->p50 = (double)t0[n / 2] / 1e3;
		res->p99 = (double)t0[n * 99 / 100] / 1e3;
		res->p999 = (double)t0[n * 999 / 1000] / 1e3;
	}
	free(t0);
	free(t_end);
	t_end = NULL;
	free(performed);
	free(completed);
}

/* One run in a child process of its own (here with -F). */
static int run_one_loop(const struct loop_opts *o, int v, bool latency, long window, long spin,
                        struct loop_result *res)
{
	if (o->no_fork) {
		run_here(o, v, latency, window, spin, res);
		return res->rc;
	}
	int fds[2];
	if (pipe(fds))
		return errno;
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0)
		return errno;
	if (pid == 0) {
		close(fds[0]);
		alarm(600); /* a run that hangs ends the child, and the parent sees it */
		run_here(o, v, latency, window, spin, res);
		ssize_t w = write(fds[1], res, sizeof(*res));
		_exit(w == (ssize_t)sizeof(*res) && !res->rc ? 0 : 1);
	}
	close(fds[1]);
	ssize_t got;
	do
		got = read(fds[0], res, sizeof(*res));
	while (got < 0 && errno == EINTR);
	close(fds[0]);
	int status;
	if (waitpid(pid, &status, 0) != pid)
		return errno;
	if (got != (ssize_t)sizeof(*res))
		res->rc = EIO;
	else if (!res->rc && (!WIFEXITED(status) || WEXITSTATUS(status)))
		res->rc = EIO;
	return res->rc;
}

/* ---- the tables ----------------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double med(double *a, size_t n)
{
	qsort(a, n, sizeof(*a), cmp_double);
	return a[n / 2];
}

static bool chosen(const struct loop_opts *o, int v)
{
#ifndef HAVE_LIBUV
	if (v == V_LIBUV)
		return false;
#endif
	return v == V_INTRUSIVE ? o->intrusive : v == V_SUBMIT ? o->submit : o->libuv;
}

static int fail(int v, int rc)
{
	fprintf(stderr, "opqueue-bench: loop: %s failed: %s\n", vname[v], strerror(rc));
	return 1;
}

#define MAXLROWS 64

int run_loop(const struct loop_opts *o)
{
	unsigned K = o->repeats;
	size_t nrows = o->nspins * o->nwindows;
	if (nrows > MAXLROWS)
		return 2;
#ifndef HAVE_LIBUV
	if (o->libuv)
		printf("(libuv uv_queue_work: not measured, built without libuv (install "
		       "libuv1-dev))\n");
#endif
	printf("\nloop: round trips from one loop thread (submit, perform on a runner, "
	       "completion\non the loop), %u runners, %ld round trips, median of %u runs\n",
	       o->runners, o->trips, K);
	printf("%-10s %-10s %-22s %12s %11s %10s\n", "in flight", "work", "variant", "rt/s",
	       "this/libuv", "CPU ns/rt");
	static double rate[MAXLROWS][NLV];
	static char rowname[MAXLROWS][48];
	const char *rows[MAXLROWS];
	double *runs = calloc((size_t)K * 2, sizeof(double));
	if (!runs)
		return 1;
	double *cpus = runs + K;
	for (size_t row = 0; row < nrows; row++) {
		long spin = o->spins[row / o->nwindows], window = o->windows[row % o->nwindows];
		char work[16] = "empty";
		if (spin)
			snprintf(work, sizeof(work), "%ld ns", spin);
		snprintf(rowname[row], sizeof(rowname[row]), "%ld in flight, %s", window, work);
		rows[row] = rowname[row];
		double r[NLV][K], c[NLV][K], cm[NLV];
		for (unsigned k = 0; k < K; k++)
			for (int i = 0; i < NLV; i++) {
				int v = k % 2 ? NLV - 1 - i : i;
				if (!chosen(o, v))
					continue;
				struct loop_result res;
				int rc = run_one_loop(o, v, false, window, spin, &res);
				if (rc)
					return free(runs), fail(v, rc);
				r[v][k] = res.rate;
				c[v][k] = res.cpu;
			}
		for (int v = 0; v < NLV; v++) {
			rate[row][v] = cm[v] = 0;
			if (!chosen(o, v))
				continue;
			memcpy(runs, r[v], K * sizeof(double));
			memcpy(cpus, c[v], K * sizeof(double));
			rate[row][v] = med(runs, K);
			cm[v] = med(cpus, K);
		}
		for (int v = 0; v < NLV; v++) {
			if (!chosen(o, v))
				continue;
			char ratio[16] = "-";
			if (rate[row][V_LIBUV] > 0)
				snprintf(ratio, sizeof(ratio), "%.2fx",
				         rate[row][v] / rate[row][V_LIBUV]);
			printf("%-10ld %-10s %-22s %12.0f %11s %10.0f\n", window, work, vname[v],
			       rate[row][v], ratio, cm[v]);
		}
		fflush(stdout);
	}

	printf("\nloop latency: one round trip at a time on an idle loop, from before the "
	       "submit\nto its completion running on the loop, %ld samples, %u runners; "
	       "microseconds,\nmedian over %u runs of each percentile\n",
	       o->samples, o->runners, K);
	printf("%-22s %9s %9s %9s %10s\n", "variant", "p50 us", "p99 us", "p99.9 us", "p50/libuv");
	double lat[NLV][3];
	{
		double a[NLV][K], b[NLV][K], cc[NLV][K];
		for (unsigned k = 0; k < K; k++)
			for (int i = 0; i < NLV; i++) {
				int v = k % 2 ? NLV - 1 - i : i;
				if (!chosen(o, v))
					continue;
				struct loop_result res;
				int rc = run_one_loop(o, v, true, 1, 0, &res);
				if (rc)
					return free(runs), fail(v, rc);
				a[v][k] = res.p50;
				b[v][k] = res.p99;
				cc[v][k] = res.p999;
			}
		for (int v = 0; v < NLV; v++) {
			lat[v][0] = lat[v][1] = lat[v][2] = 0;
			if (!chosen(o, v))
				continue;
			memcpy(runs, a[v], K * sizeof(double));
			lat[v][0] = med(runs, K);
			memcpy(runs, b[v], K * sizeof(double));
			lat[v][1] = med(runs, K);
			memcpy(runs, cc[v], K * sizeof(double));
			lat[v][2] = med(runs, K);
		}
	}
	free(runs);
	for (int v = 0; v < NLV; v++) {
		if (!chosen(o, v))
			continue;
		char ratio[16] = "-";
		if (lat[V_LIBUV][0] > 0)
			snprintf(ratio, sizeof(ratio), "%.2fx", lat[v][0] / lat[V_LIBUV][0]);
		printf("%-22s %9.2f %9.2f %9.2f %10s\n", vname[v], lat[v][0], lat[v][1], lat[v][2],
		       ratio);
	}

	/* The targets of issue 22, read from the tables above. */
	if (chosen(o, V_LIBUV)) {
		printf("\nloop targets: round trips/s with empty operations at least 2x libuv's; "
		       "latency p50\nno worse than libuv's\n");
		for (size_t row = 0; row < nrows; row++) {
			if (o->spins[row / o->nwindows])
				continue;
			for (int v = V_INTRUSIVE; v <= V_SUBMIT; v++)
				if (chosen(o, v) && rate[row][V_LIBUV] > 0) {
					double x = rate[row][v] / rate[row][V_LIBUV];
					printf("target: rt/s %s, %s: %.2fx libuv: %s\n", rows[row],
					       vname[v], x, x >= 2 ? "met" : "MISSED");
				}
		}
		for (int v = V_INTRUSIVE; v <= V_SUBMIT; v++)
			if (chosen(o, v) && lat[V_LIBUV][0] > 0)
				printf("target: latency p50, %s: %.2f us vs libuv %.2f us: %s\n",
				       vname[v], lat[v][0], lat[V_LIBUV][0],
				       lat[v][0] <= lat[V_LIBUV][0] ? "met" : "MISSED");
	}
	fflush(stdout);

	if (o->plot) {
		const char *cols[NLV], *lrows[NLV];
		size_t nc = 0;
		static double tdata[MAXLROWS * NLV];
		double ldata[NLV * 3];
		for (int v = 0; v < NLV; v++)
			if (chosen(o, v)) {
				for (size_t row = 0; row < nrows; row++)
					tdata[row * NLV + nc] = rate[row][v] / 1e6;
				for (int p = 0; p < 3; p++)
					ldata[nc * 3 + p] = lat[v][p];
				cols[nc] = lrows[nc] = vname[v];
				nc++;
			}
		/* tdata rows were written NLV wide: pack them nc wide */
		for (size_t row = 0; row < nrows; row++)
			for (size_t cix = 0; cix < nc; cix++)
				tdata[row * nc + cix] = tdata[row * NLV + cix];
		static const char *const pcols[] = {"p50", "p99", "p99.9"};
		struct panel pn[2] = {
		    {"round trips per second", "operations in flight, work per operation",
		     "million round trips per second", false, rows, nrows, cols, nc, tdata},
		    {"one round trip on an idle loop", "variant",
		     "submit to completion on the loop (microseconds, log scale)", true, lrows, nc,
		     pcols, 3, ldata},
		};
		char title[160];
		snprintf(title, sizeof(title),
		         "opqueue-bench loop: %u runners, %ld round trips, %ld latency samples, "
		         "median of %u runs",
		         o->runners, o->trips, o->samples, K);
		if (plot(o->plot, title, pn, 2))
			return 1;
	}
	return 0;
}
#endif
