/*
 * opqueue-bench: opqueue against the thread pools a C daemon author would
 * otherwise pick, on the same workload, in the same run.
 *
 * usage: opqueue-bench [burst|latency|bounded|line|push|loop] [options]
 *
 * burst    P producers enqueue M operations each into R runners; each
 *          operation is empty or spins W ns. Variants: opqueue intrusive
 *          (opq_op embedded in the caller's struct), opqueue fn
 *          (opq_queue_enqueue_fn), GLib's GThreadPool (R exclusive threads),
 *          libuv's uv_queue_work (UV_THREADPOOL_SIZE=R, one loop per
 *          producer: libuv wants work queued from the loop's thread), a plain
 *          mutex/condvar pool that mallocs an item and signals on every
 *          enqueue, and the ceiling: the same operations split across R
 *          threads directly, no queue. The clock runs from the moment the
 *          pool is up until the last operation has been performed and the
 *          pool has stopped. The peers' code is in bench-peers.c.
 * latency  one operation at a time on an idle pool: the time from just
 *          before the enqueue to the start of perform; p50, p99, p99.9.
 * bounded  opqueue with a bounded FIFO (capacity -c) and producers faster
 *          than the runners, against the unbounded queue and the ceiling.
 * line     uncontended opq_line_try_acquire + release, and the time from a
 *          release to the last of 1, 8 and 64 blocked waiters running again
 *          (the same threads over 21 rounds), against a plain mutex/condvar
 *          broadcast to as many waiters.
 * push     the floor under any enqueue that keeps one FIFO order across
 *          its producers: P threads each push M 64-byte nodes (written
 *          before the clock starts) onto one stack with a compare-and-swap,
 *          and nothing else; ns per push, median of -k runs, for each P of -p.
 * loop     round trips from one event loop's thread (submit, perform on R
 *          runners, completion back on the loop): per second with -i LIST
 *          operations in flight (default 1,64,1024), M round trips, and the
 *          latency of one on an idle loop (-n samples); opqueue's completion
 *          channel (intrusive, and opq_queue_submit as "fn") on an epoll
 *          loop against libuv's uv_queue_work with after_work_cb
 *          (bench-loop.c).
 *
 * In burst, latency and bounded, every run of every variant happens in a
 * child process of its own (peak RSS is per variant), after untimed
 * warm-up runs of the same workload in that process until the allocator
 * has stopped faulting in fresh memory (not for latency; --cold: none), and
 * checks that each operation ran exactly once (each thread logs what it
 * performed; the log is counted afterwards). Tables show medians over -k
 * runs; burst tables also show the minor page faults in the timed window
 * per operation ("flt/op"), the process's CPU time (every thread) over the
 * timed window per operation, which a noisy machine disturbs less, and the
 * part of it spent by the producer threads ("enq ns/op": enqueueing; for
 * libuv also the loop's completions). A separate
 * run per variant counts allocations (a malloc wrapper in this program; it
 * also sees jemalloc's mallocx) per operation.
 *
 * options: -p LIST producers (burst; comma list)     -r N runners
 *          -m N ops per producer                     -w LIST spin ns per op
 *          -k N repeats (median)                     -n N latency samples
 *          -c N capacity (bounded)                   -V LIST variants:
 *          intrusive,fn,glib,libuv,plain,ceiling     -F no fork, one run
 *          -P FILE.svg / --plot FILE.svg: draw the results with gnuplot
 *          --cold: no warm-up run
 *          -l: the line (same as the mode `line`)
 */
#define _GNU_SOURCE 1
#include "config.h"

#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <opqueue.h>

#include "bench.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define NO_MALLOC_HOOK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||                         \
    __has_feature(memory_sanitizer)
#define NO_MALLOC_HOOK 1
#endif
#endif

#define MAXLIST 8

unsigned P = 1, R = 2;
static unsigned K = 5;
static long plist[MAXLIST] = {1}, rlist[MAXLIST] = {2}, wlist[MAXLIST] = {0};
static size_t np = 1, nr = 1, nw = 1; /* -p, -r and -w: burst runs each combination */
static long ilist[MAXLIST] = {1, 64, 1024};
static size_t ni = 3; /* -i: operations in flight (loop) */
long M = 1000000, W = 0;
static long L = 10000, CAP = 64;
static int no_fork;
static int cold; /* --cold: no untimed warm-up run before each timed burst run */
long nops;       /* operations in this run */
static uint64_t t_start, t_end;
static uint64_t cpu_start, cpu_end; /* the process's CPU time at t_start and t_end */
static long flt_start, flt_end;     /* the process's minor page faults then */
static atomic_ullong producers_cpu; /* CPU time of the producer threads of a run */

uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static long minor_faults(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_minflt;
}

/* A producer thread, at its end: its CPU time counts as enqueueing. */
void producer_done(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	atomic_fetch_add(&producers_cpu, (unsigned long long)ts.tv_sec * 1000000000u +
	                                     (unsigned long long)ts.tv_nsec);
}

/* The timed window of a run: wall clock and the CPU time of every thread. */
void clock_start(void)
{
	atomic_store(&producers_cpu, 0);
	flt_start = minor_faults();
	cpu_start = cpu_ns();
	t_start = now_ns();
}

void clock_stop(void)
{
	t_end = now_ns();
	cpu_end = cpu_ns();
	flt_end = minor_faults();
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

/* ---- counting allocations ------------------------------------------------ */

static atomic_long allocs;
static atomic_int counting;

#ifndef NO_MALLOC_HOOK
/*
 * This program's malloc family forwards to the C library's and, while
 * `counting`, counts. jemalloc's mallocx (which libopqueue uses for boxes
 * when configured with jemalloc) is wrapped too.
 */
void *__libc_malloc(size_t);
void *__libc_calloc(size_t, size_t);
void *__libc_realloc(void *, size_t);
void *__libc_memalign(size_t, size_t);
void __libc_free(void *);

static inline void count_one(void)
{
	if (atomic_load_explicit(&counting, memory_order_relaxed))
		atomic_fetch_add_explicit(&allocs, 1, memory_order_relaxed);
}

void *malloc(size_t n)
{
	count_one();
	return __libc_malloc(n);
}

void *calloc(size_t n, size_t size)
{
	count_one();
	return __libc_calloc(n, size);
}

void *realloc(void *p, size_t n)
{
	if (!p)
		count_one();
	return __libc_realloc(p, n);
}

void free(void *p)
{
	__libc_free(p);
}

int posix_memalign(void **p, size_t align, size_t n)
{
	count_one();
	void *m = __libc_memalign(align, n);
	if (!m)
		return ENOMEM;
	*p = m;
	return 0;
}

void *aligned_alloc(size_t align, size_t n)
{
	count_one();
	return __libc_memalign(align, n);
}

void *memalign(size_t align, size_t n)
{
	count_one();
	return __libc_memalign(align, n);
}

void *mallocx(size_t size, int flags);
void *mallocx(size_t size, int flags)
{
	static void *(*real)(size_t, int);
	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "mallocx");
	count_one();
	return real(size, flags);
}
#endif

/* ---- the work ------------------------------------------------------------ */

/*
 * The exactly-once check. Each thread that performs operations appends their
 * indices to a log shared by all, in chunks of LOG_CHUNK entries that it
 * claims one at a time with an atomic addition; after the run the log is
 * counted. Threads write to chunks of their own (a shared array of counters
 * would put the runners of a queue on the same cache lines as they take
 * neighbouring operations, a cost the ceiling, which splits the operations
 * into halves, would not pay). The log holds every operation plus a partly
 * used chunk per thread; it is allocated, filled with LOG_EMPTY and so
 * touched before the clock starts.
 */
#define LOG_CHUNK 4096
#define LOG_EMPTY UINT32_MAX
static uint32_t *logbuf;
static atomic_long log_next; /* the next chunk to claim */
static atomic_uint log_gen;  /* bumped before each run: threads claim chunks anew */
static _Thread_local unsigned my_gen;
static _Thread_local uint32_t *my_pos, *my_end;
bool recording = true; /* false while a pool is warmed up off the clock */

/* Threads that may perform operations in one run: the runners, and a margin. */
static long log_threads(void)
{
	return R + 8 > 64 ? (long)R + 8 : 64;
}

static long log_entries(void)
{
	return nops + log_threads() * LOG_CHUNK;
}

/* The log's size, not counted in the peak RSS reported. */
static long logs_kb(void)
{
	return log_entries() * (long)sizeof(uint32_t) / 1024;
}

static void record(long i)
{
	unsigned gen = atomic_load_explicit(&log_gen, memory_order_relaxed);
	if (my_gen != gen || my_pos == my_end) {
		long at = atomic_fetch_add_explicit(&log_next, LOG_CHUNK, memory_order_relaxed);
		if (at + LOG_CHUNK > log_entries()) {
			fprintf(stderr,
			        "opqueue-bench: the log is full: more operations performed "
			        "than enqueued, or more than %ld threads performed them\n",
			        log_threads());
			abort();
		}
		my_pos = logbuf + at;
		my_end = my_pos + LOG_CHUNK;
		my_gen = gen;
	}
	*my_pos++ = (uint32_t)i;
}

void work(long i)
{
	if (W > 0) {
		uint64_t end = now_ns() + (uint64_t)W;
		while (now_ns() < end)
			;
	}
	if (recording)
		record(i);
}

/* Latency mode: each operation records when perform started. */
static uint64_t *lat_start;
static atomic_long lat_done;

static void lat_work(long i)
{
	lat_start[i] = now_ns();
	record(i);
	atomic_store_explicit(&lat_done, i + 1, memory_order_release);
}

void (*perform_cb)(long) = work;

void spawn_join(unsigned n, void *(*fn)(void *))
{
	pthread_t th[n];
	for (unsigned i = 0; i < n; i++)
		if (pthread_create(&th[i], NULL, fn, (void *)(intptr_t)i))
			abort();
	for (unsigned i = 0; i < n; i++)
		pthread_join(th[i], NULL);
}

/* ---- opqueue ------------------------------------------------------------- */

struct bop {
	opq_op op;
	long i;
};

static opq_queue *oq;
static struct bop *bops;
static size_t cur_capacity;

static void bop_perform(opq_op *op)
{
	perform_cb(OPQ_CONTAINER_OF(op, struct bop, op)->i);
}

void fn_perform(void *arg)
{
	perform_cb((long)(intptr_t)arg);
}

static void *opq_producer(void *arg)
{
	long base = (long)(intptr_t)arg * M;
	for (long i = base; i < base + M; i++)
		if (opq_queue_enqueue(oq, &bops[i].op))
			abort();
	producer_done();
	return NULL;
}

static void *opq_fn_producer(void *arg)
{
	long base = (long)(intptr_t)arg * M;
	for (long i = base; i < base + M; i++)
		if (opq_queue_enqueue_fn(oq, fn_perform, NULL, (void *)(intptr_t)i))
			abort();
	producer_done();
	return NULL;
}

static int opq_setup(bool intrusive, size_t capacity)
{
	if (intrusive) {
		bops = malloc((size_t)nops * sizeof(*bops));
		if (!bops)
			return ENOMEM;
		for (long i = 0; i < nops; i++) {
			opq_op_init(&bops[i].op, bop_perform, NULL);
			bops[i].i = i;
		}
	}
	cur_capacity = capacity;
	opq_queue_attr *a;
	int rc = opq_queue_attr_create(&a);
	if (rc)
		return rc;
	opq_queue_attr_set_capacity(a, capacity);
	opq_queue_attr_set_name(a, "bench");
	rc = opq_queue_create(&oq, a);
	opq_queue_attr_destroy(a);
	if (rc || (rc = opq_queue_start(oq, R)))
		return rc;
	return 0;
}

static int opq_teardown(void)
{
	int rc = opq_queue_stop(oq, OPQ_STOP_DRAIN);
	clock_stop();
	opq_queue_stats st;
	if (!rc && !(rc = opq_queue_stats_get(oq, &st)) && st.completed != (uint64_t)nops)
		rc = EPROTO;
	if (!rc && cur_capacity && st.high_water > cur_capacity)
		rc = EPROTO; /* a bounded FIFO held more than its capacity */
	opq_queue_destroy(oq);
	free(bops);
	bops = NULL;
	return rc;
}

static int burst_opq(bool intrusive, size_t capacity)
{
	int rc = opq_setup(intrusive, capacity);
	if (rc)
		return rc;
	clock_start();
	spawn_join(P, intrusive ? opq_producer : opq_fn_producer);
	return opq_teardown();
}

static int burst_intrusive(void)
{
	return burst_opq(true, 0);
}

static int burst_fn(void)
{
	return burst_opq(false, 0);
}

static int burst_bounded_intrusive(void)
{
	return burst_opq(true, (size_t)CAP);
}

static int burst_bounded_fn(void)
{
	return burst_opq(false, (size_t)CAP);
}

/* ---- the ceiling: the same operations split across R threads, no queue ---- */

/*
 * The ceiling's threads exist before its clock starts, as a queue's runners
 * do: they wait on `ready` (created) and then on `go`, which the timed
 * window opens, so that creating them is not charged to the ceiling.
 */
static pthread_barrier_t ceiling_ready, ceiling_go;

static void *ceiling_thread(void *arg)
{
	long r = (long)(intptr_t)arg;
	long from = nops * r / (long)R, to = nops * (r + 1) / (long)R;
	pthread_barrier_wait(&ceiling_ready);
	pthread_barrier_wait(&ceiling_go);
	for (long i = from; i < to; i++)
		work(i);
	return NULL;
}

static int burst_ceiling(void)
{
	pthread_t th[R];
	if (pthread_barrier_init(&ceiling_ready, NULL, R + 1) ||
	    pthread_barrier_init(&ceiling_go, NULL, R + 1))
		abort();
	for (unsigned i = 0; i < R; i++)
		if (pthread_create(&th[i], NULL, ceiling_thread, (void *)(intptr_t)i))
			abort();
	pthread_barrier_wait(&ceiling_ready);
	clock_start();
	pthread_barrier_wait(&ceiling_go);
	for (unsigned i = 0; i < R; i++)
		pthread_join(th[i], NULL);
	clock_stop();
	pthread_barrier_destroy(&ceiling_go);
	pthread_barrier_destroy(&ceiling_ready);
	return 0;
}

/* ---- latency: one operation at a time ------------------------------------ */

static uint64_t *lat_t0;

static void lat_wait(long i)
{
	while (atomic_load_explicit(&lat_done, memory_order_acquire) != i + 1)
		cpu_relax();
}

int latency_run(int (*setup)(void), void (*submit)(long), int (*teardown)(void))
{
	lat_start = calloc((size_t)nops, sizeof(*lat_start));
	lat_t0 = calloc((size_t)nops, sizeof(*lat_t0));
	if (!lat_start || !lat_t0)
		return ENOMEM;
	for (long i = 0; i < nops; i++)
		lat_start[i] = lat_t0[i] = 1; /* written now: no page fault while timing */
	perform_cb = lat_work;
	atomic_store(&lat_done, 0);
	int rc = setup();
	if (rc)
		return rc;
	clock_start();
	for (long i = 0; i < nops; i++) {
		lat_t0[i] = now_ns();
		submit(i);
		lat_wait(i);
	}
	return teardown();
}

static void lat_submit_intrusive(long i)
{
	if (opq_queue_enqueue(oq, &bops[i].op))
		abort();
}

static void lat_submit_fn(long i)
{
	if (opq_queue_enqueue_fn(oq, fn_perform, NULL, (void *)(intptr_t)i))
		abort();
}

static int lat_setup_intrusive(void)
{
	return opq_setup(true, 0);
}

static int lat_setup_fn(void)
{
	return opq_setup(false, 0);
}

static int latency_intrusive(void)
{
	return latency_run(lat_setup_intrusive, lat_submit_intrusive, opq_teardown);
}

static int latency_fn(void)
{
	return latency_run(lat_setup_fn, lat_submit_fn, opq_teardown);
}

/* ---- variants ------------------------------------------------------------ */

/*
 * A variant of the other build (-O, "old"), such as old-intrusive, is its
 * `base` variant run by that build's program: the same workload, linked
 * against another libopqueue.
 */
struct variant {
	const char *name;  /* for -V */
	const char *label; /* for tables and plots */
	int (*burst)(void);
	int (*latency)(void);
	const char *missing; /* why it is not built, or NULL */
	const char *base;    /* of the other build (-O): its variant of this name */
};

static char old_intrusive_label[64], old_fn_label[64]; /* "opqueue (old) intrusive" */

static struct variant variants[] = {
    {"intrusive", "opqueue intrusive", burst_intrusive, latency_intrusive, NULL, NULL},
    {"fn", "opqueue fn", burst_fn, latency_fn, NULL, NULL},
    {"old-intrusive", old_intrusive_label, burst_intrusive, latency_intrusive, NULL, "intrusive"},
    {"old-fn", old_fn_label, burst_fn, latency_fn, NULL, "fn"},
#ifdef HAVE_GLIB
    {"glib", "GThreadPool", burst_glib, latency_glib, NULL, NULL},
#else
    {"glib", "GThreadPool", NULL, NULL, "built without glib-2.0 (install libglib2.0-dev)", NULL},
#endif
#ifdef HAVE_LIBUV
    {"libuv", "libuv uv_queue_work", burst_libuv, latency_libuv, NULL, NULL},
#else
    {"libuv", "libuv uv_queue_work", NULL, NULL, "built without libuv (install libuv1-dev)", NULL},
#endif
    {"plain", "plain mutex/condvar", burst_plain, latency_plain, NULL, NULL},
    {"ceiling", "no queue (ceiling)", burst_ceiling, NULL, NULL, NULL},
};
#define NV (sizeof(variants) / sizeof(variants[0]))
static bool selected[NV];
static const char *old_exe;           /* -O: the program of the other build */
static const char *old_label = "old"; /* -L: what its rows are called */

struct result {
	int rc;
	double rate;           /* operations per second */
	double p50, p99, p999; /* latency, microseconds */
	long allocs;
	long rss_kb;
	double cpu_per_op; /* CPU ns per operation over the timed window */
	double enq_per_op; /* of which the producer threads', per operation */
	double flt_per_op; /* minor page faults in the timed window, per operation */
};

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* The median of a[0..n-1] (the upper one for even n); sorts a. */
static double median(double *a, size_t n)
{
	qsort(a, n, sizeof(*a), cmp_double);
	return a[n / 2];
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* Start a run: the log empty (and touched), every thread claims chunks anew. */
static void logs_reset(void)
{
	memset(logbuf, 0xff, (size_t)log_entries() * sizeof(*logbuf)); /* LOG_EMPTY */
	atomic_store(&log_next, 0);
	atomic_fetch_add(&log_gen, 1);
}

static int logs_create(void)
{
	if (nops >= (long)LOG_EMPTY)
		return EOVERFLOW;
	logbuf = malloc((size_t)log_entries() * sizeof(*logbuf));
	return logbuf ? 0 : ENOMEM;
}

static void logs_destroy(void)
{
	free(logbuf);
	logbuf = NULL;
}

/* 0 if the log names every operation exactly once. */
static int logs_check(void)
{
	unsigned char *seen = calloc((size_t)nops, 1);
	if (!seen)
		return ENOMEM;
	long used = atomic_load(&log_next);
	for (long j = 0; j < used && j < log_entries(); j++)
		if (logbuf[j] != LOG_EMPTY && seen[logbuf[j]] < 255)
			seen[logbuf[j]]++;
	int rc = 0;
	for (long i = 0; i < nops && !rc; i++)
		if (seen[i] != 1) {
			fprintf(stderr, "opqueue-bench: operation %ld ran %d times\n", i, seen[i]);
			rc = EPROTO;
		}
	free(seen);
	return rc;
}

#define WARM_MAX    8
#define WARM_FAULTS 2000
#define WARM_FLOOR  16

/* Run fn here and check that every operation ran exactly once. */
static void run_here(int (*fn)(void), bool count, bool latency, struct result *res)
{
	if ((res->rc = logs_create())) {
		logs_destroy();
		return;
	}
	perform_cb = work;
	if (!latency && !cold) {
		/*
		 * Warm up: the same run, untimed, in this process, so that every
		 * variant meets memory its allocator has touched before, as in a
		 * daemon that has been running for a while. Once is not always
		 * enough: a run that met fewer page faults enqueues faster, so
		 * more operations wait at once, and their boxes or nodes need
		 * memory the run before did not touch. Repeat until a run takes
		 * at most one fault per WARM_FAULTS operations in its timed
		 * window, or WARM_FLOOR in a small run (a fault cost 5 to 14 us
		 * on the test machines; what a variant's setup touches before
		 * the clock does not count), WARM_MAX runs at most.
		 */
		for (int i = 0; i < WARM_MAX; i++) {
			logs_reset();
			res->rc = fn();
			if (res->rc) {
				logs_destroy();
				return;
			}
			long limit = nops / WARM_FAULTS;
			if (flt_end - flt_start <= (limit > WARM_FLOOR ? limit : WARM_FLOOR))
				break;
		}
	}
	logs_reset();
	atomic_store(&allocs, 0);
	atomic_store(&counting, count);
	res->rc = fn();
	atomic_store(&counting, 0);
	res->allocs = atomic_load(&allocs);
	if (!res->rc)
		res->rc = logs_check();
	if (!res->rc) {
		res->rate = (double)nops / ((double)(t_end - t_start) / 1e9);
		res->cpu_per_op = (double)(cpu_end - cpu_start) / (double)nops;
		res->enq_per_op = (double)atomic_load(&producers_cpu) / (double)nops;
		res->flt_per_op = (double)(flt_end - flt_start) / (double)nops;
	}
	if (!res->rc && latency) {
		uint64_t *d = lat_t0; /* reuse: latencies in ns */
		for (long i = 0; i < nops; i++)
			d[i] = lat_start[i] - lat_t0[i];
		qsort(d, (size_t)nops, sizeof(*d), cmp_u64);
		res->p50 = (double)d[nops / 2] / 1e3;
		res->p99 = (double)d[nops * 99 / 100] / 1e3;
		res->p999 = (double)d[nops * 999 / 1000] / 1e3;
		free(lat_start);
		free(lat_t0);
	}
	logs_destroy();
}

typedef int run_fn(void);

/*
 * A run's workload, as named on the command line of a child: "burst:NAME"
 * and "latency:NAME" for the variant NAME (not one of the other build's),
 * "bounded:intrusive" and "bounded:fn". NULL if there is no such workload.
 */
static run_fn *spec_fn(const char *spec, bool *latency)
{
	const char *name = strchr(spec, ':');
	if (!name)
		return NULL;
	size_t n = (size_t)(name - spec);
	name++;
	*latency = n == 7 && !strncmp(spec, "latency", 7);
	if (n == 7 && !strncmp(spec, "bounded", 7))
		return !strcmp(name, "intrusive") ? burst_bounded_intrusive
		       : !strcmp(name, "fn")      ? burst_bounded_fn
		                                  : NULL;
	if (!*latency && !(n == 5 && !strncmp(spec, "burst", 5)))
		return NULL;
	for (size_t v = 0; v < NV; v++)
		if (!variants[v].base && !strcmp(variants[v].name, name))
			return *latency ? variants[v].latency : variants[v].burst;
	return NULL;
}

/*
 * One run of the workload spec (see spec_fn) with the current P, R, M, W,
 * CAP and L. It runs in a process of its own: this program (or, with old,
 * the other build's, -O) executed afresh with --child, which reports its
 * result on standard output; with -F, here.
 */
static int run_one(const char *spec, bool old, bool count, struct result *res)
{
	memset(res, 0, sizeof(*res));
	bool latency;
	run_fn *fn = spec_fn(spec, &latency);
	if (!fn)
		return EINVAL;
	if (no_fork) {
		run_here(fn, count, latency, res);
		struct rusage ru;
		getrusage(RUSAGE_SELF, &ru);
		res->rss_kb = ru.ru_maxrss - logs_kb();
		return res->rc;
	}
	char a[6][24];
	snprintf(a[0], sizeof(a[0]), "%u", P);
	snprintf(a[1], sizeof(a[1]), "%u", R);
	snprintf(a[2], sizeof(a[2]), "%ld", M);
	snprintf(a[3], sizeof(a[3]), "%ld", W);
	snprintf(a[4], sizeof(a[4]), "%ld", CAP);
	snprintf(a[5], sizeof(a[5]), "%ld", L);
	const char *exe = old ? old_exe : "/proc/self/exe";
	static const char *const opts[] = {"-p", "-r", "-m", "-w", "-c", "-n"};
	const char *argv[20] = {old ? exe : "opqueue-bench", "--child", spec};
	size_t argc = 3;
	for (size_t i = 0; i < 6; i++) {
		argv[argc++] = opts[i];
		argv[argc++] = a[i];
	}
	if (cold)
		argv[argc++] = "--cold";
	if (count)
		argv[argc++] = "--count";
	argv[argc] = NULL;
	fflush(NULL);
	int fds[2];
	if (pipe(fds))
		return errno;
	pid_t pid = fork();
	if (pid < 0)
		return errno;
	if (pid == 0) {
		close(fds[0]);
		if (dup2(fds[1], STDOUT_FILENO) < 0)
			_exit(127);
		execv(exe, (char *const *)argv);
		fprintf(stderr, "opqueue-bench: %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	close(fds[1]);
	char buf[512];
	size_t got = 0;
	ssize_t r;
	while (got < sizeof(buf) - 1 && (r = read(fds[0], buf + got, sizeof(buf) - 1 - got)) != 0) {
		if (r < 0 && errno != EINTR)
			break;
		if (r > 0)
			got += (size_t)r;
	}
	buf[got] = '\0';
	close(fds[0]);
	int status;
	struct rusage ru;
	if (wait4(pid, &status, 0, &ru) < 0)
		return errno;
	if (sscanf(buf, "result %d %la %la %la %la %ld %la %la %la", &res->rc, &res->rate,
	           &res->p50, &res->p99, &res->p999, &res->allocs, &res->cpu_per_op,
	           &res->enq_per_op, &res->flt_per_op) != 9)
		res->rc = res->rc ? res->rc : EIO;
	else if (!WIFEXITED(status) || (WEXITSTATUS(status) && !res->rc))
		res->rc = EIO;
	res->rss_kb = ru.ru_maxrss - logs_kb();
	return res->rc;
}

/* --child SPEC: one run (the -p, -r and -w given are single values); the result on stdout. */
static int run_child(const char *spec, bool count)
{
	bool latency;
	run_fn *fn = spec_fn(spec, &latency);
	if (!fn) {
		fprintf(stderr, "opqueue-bench: no workload %s in this build\n", spec);
		return 2;
	}
	P = latency ? 1 : (unsigned)plist[0];
	W = wlist[0];
	nops = latency ? L : (long)P * M;
	struct result res;
	memset(&res, 0, sizeof(res));
	run_here(fn, count, latency, &res);
	printf("result %d %a %a %a %a %ld %a %a %a\n", res.rc, res.rate, res.p50, res.p99, res.p999,
	       res.allocs, res.cpu_per_op, res.enq_per_op, res.flt_per_op);
	return fflush(stdout) || res.rc ? 1 : 0;
}

/* ---- progress ------------------------------------------------------------ */

static uint64_t progress_t0;
static bool progress_shown;

/* On a terminal only: redirected, \r and the erase sequence would end up in the file. */
static void progress(const char *fmt, ...)
{
	static int tty = -1;
	if (tty < 0)
		tty = isatty(STDERR_FILENO);
	if (!tty || now_ns() - progress_t0 < 1000000000u)
		return;
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "\r\033[K");
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	progress_shown = true;
}

static void progress_done(void)
{
	if (progress_shown)
		fprintf(stderr, "\r\033[K");
	progress_shown = false;
}

/* ---- plotting ------------------------------------------------------------ */

/* Draw the panels side by side into an SVG file with gnuplot (bench.h). */
int plot(const char *file, const char *title, const struct panel *panels, size_t npanels)
{
	char tmp[4][32];
	size_t made = 0;
	int rc = 0;
	for (; made < npanels && made < 4; made++) {
		const struct panel *p = &panels[made];
		snprintf(tmp[made], sizeof(tmp[made]), "/tmp/opqueue-bench-XXXXXX");
		int fd = mkstemp(tmp[made]);
		FILE *f = fd < 0 ? NULL : fdopen(fd, "w");
		if (!f) {
			rc = errno;
			break;
		}
		fprintf(f, "workload");
		for (size_t c = 0; c < p->ncols; c++)
			fprintf(f, "\t\"%s\"", p->cols[c]);
		fprintf(f, "\n");
		for (size_t r = 0; r < p->nrows; r++) {
			fprintf(f, "\"%s\"", p->rows[r]);
			for (size_t c = 0; c < p->ncols; c++)
				fprintf(f, "\t%g", p->data[r * p->ncols + c]);
			fprintf(f, "\n");
		}
		fclose(f);
	}
	FILE *g = rc ? NULL : popen("gnuplot", "w");
	if (g) {
		fprintf(g,
		        "set terminal svg size %d,600 dynamic noenhanced font 'sans,12' "
		        "background '#ffffff'\n"
		        "set output '%s'\n"
		        "set multiplot layout 1,%zu title \"%s\"\n"
		        "set style data histograms\n"
		        "set style histogram clustered gap 1\n"
		        "set style fill solid 0.85 border -1\n"
		        "set grid ytics\n"
		        "set key below\n"
		        "set datafile separator '\\t'\n",
		        npanels > 1 ? 1280 : 960, file, made, title);
		for (size_t i = 0; i < made; i++) {
			const struct panel *p = &panels[i];
			fprintf(g,
			        "set title \"%s\"\n"
			        "set xlabel \"%s\"\n"
			        "set ylabel \"%s\"\n"
			        "%s\n"
			        "plot for [c=2:%zu] '%s' using c:xtic(1) title columnheader(c)\n",
			        p->title, p->xlabel, p->ylabel,
			        p->logy ? "set logscale y; set yrange [0.05:*]"
			                : "unset logscale y; set yrange [0:*]",
			        p->ncols + 1, tmp[i]);
		}
		fprintf(g, "unset multiplot\n");
		if (pclose(g))
			rc = EIO;
	} else if (!rc) {
		rc = errno ? errno : EIO;
	}
	for (size_t i = 0; i < made; i++)
		unlink(tmp[i]);
	if (rc)
		fprintf(stderr, "opqueue-bench: gnuplot failed (is gnuplot installed?)\n");
	return rc;
}

/* ---- modes --------------------------------------------------------------- */

static const char *plot_file;

static size_t parse_list(const char *s, long *out)
{
	size_t n = 0;
	char *end;
	while (*s && n < MAXLIST) {
		out[n++] = strtol(s, &end, 10);
		if (end == s)
			return 0;
		s = *end == ',' ? end + 1 : end;
		if (*end && *end != ',')
			return 0;
	}
	return n;
}

static void print_missing(void)
{
	for (size_t v = 0; v < NV; v++)
		if (selected[v] && variants[v].missing)
			printf("(%s: not measured, %s)\n", variants[v].label, variants[v].missing);
}

/* Is variant v measured in this run? */
static bool measured(size_t v, bool latency)
{
	return selected[v] && (latency ? variants[v].latency : variants[v].burst) &&
	       (!variants[v].base || old_exe);
}

/* The width of the variant column: the longest label measured, at least 22. */
static int label_width(void)
{
	int w = 22;
	for (size_t v = 0; v < NV; v++)
		if (selected[v] && (!variants[v].base || old_exe) &&
		    (int)strlen(variants[v].label) > w)
			w = (int)strlen(variants[v].label);
	return w;
}

/*
 * The variant at position i of round k. Rounds alternate the order, forward
 * then backward, so that no variant always runs right after the same one.
 */
static size_t round_order(unsigned k, size_t i, size_t n)
{
	return k % 2 ? n - 1 - i : i;
}

/* The spec of variant v for run_one: "MODE:NAME" of this build or the other's. */
static const char *variant_spec(size_t v, const char *mode, char *buf, size_t size)
{
	snprintf(buf, size, "%s:%s", mode, variants[v].base ? variants[v].base : variants[v].name);
	return buf;
}

#define MAXROWS (MAXLIST * MAXLIST * MAXLIST)

static int run_burst(void)
{
	size_t nrows = np * nr * nw, ceiling = NV;
	static double table[MAXROWS][NV];
	static char rowname[MAXROWS][64];
	const char *rows[MAXROWS];
	int lw = label_width();
	for (size_t v = 0; v < NV; v++)
		if (variants[v].burst == burst_ceiling && measured(v, false))
			ceiling = v;
	progress_t0 = now_ns();
	print_missing();
	for (size_t row = 0; row < nrows; row++) {
		P = (unsigned)plist[row / (nr * nw)];
		R = (unsigned)rlist[row / nw % nr];
		W = wlist[row % nw];
		nops = (long)P * M;
		char what[32] = "empty ops";
		if (W)
			snprintf(what, sizeof(what), "%ld ns ops", W);
		snprintf(rowname[row], sizeof(rowname[row]), "P=%u R=%u %s", P, R, what);
		rows[row] = rowname[row];
		printf("\nburst: %u producer(s) x %ld ops, %u runners, %s, median of %u runs\n", P,
		       M, R, what, K);
		printf("%-*s %12s %9s %9s %9s %10s %9s %10s %10s %10s\n", lw, "variant", "ops/s",
		       "intr/this", "fn/this", "%ceiling", "allocs/op", "flt/op", "RSS kB",
		       "CPU ns/op", "enq ns/op");
		double med[NV], per_op[NV], cpu_med[NV], enq_med[NV], flt_med[NV];
		long rss[NV];
		/*
		 * Round k runs every variant once, so that each variant's runs
		 * spread over the same stretch of time: on a machine whose load
		 * changes, the ratios stay fair (the old build's too).
		 */
		double rates[NV][K], cpus[NV][K], enqs[NV][K], flts[NV][K];
		for (size_t v = 0; v < NV; v++) {
			med[v] = 0;
			cpu_med[v] = 0;
			enq_med[v] = 0;
			flt_med[v] = 0;
			rss[v] = 0;
			table[row][v] = 0;
		}
		for (unsigned k = 0; k < K; k++)
			for (size_t i = 0; i < NV; i++) {
				size_t v = round_order(k, i, NV);
				if (!measured(v, false))
					continue;
				progress("%s: round %u/%u, %s", rowname[row], k + 1, K,
				         variants[v].label);
				struct result res;
				char spec[64];
				int rc = run_one(variant_spec(v, "burst", spec, sizeof(spec)),
				                 variants[v].base != NULL, false, &res);
				if (rc) {
					progress_done();
					fprintf(stderr, "opqueue-bench: %s failed: %s\n",
					        variants[v].label, strerror(rc));
					return 1;
				}
				rates[v][k] = res.rate;
				cpus[v][k] = res.cpu_per_op;
				enqs[v][k] = res.enq_per_op;
				flts[v][k] = res.flt_per_op;
				if (res.rss_kb > rss[v])
					rss[v] = res.rss_kb;
			}
		for (size_t v = 0; v < NV; v++) {
			if (!measured(v, false))
				continue;
			med[v] = median(rates[v], K);
			cpu_med[v] = median(cpus[v], K);
			enq_med[v] = median(enqs[v], K);
			flt_med[v] = median(flts[v], K);
			table[row][v] = med[v] / 1e6;
			/* One more run, smaller, counting allocations. */
			long saved = M;
			if (M > 100000)
				M = 100000;
			nops = (long)P * M;
			long counted = nops;
			progress("%s: counting allocations, %s", rowname[row], variants[v].label);
			struct result res;
			char spec[64];
			int rc = run_one(variant_spec(v, "burst", spec, sizeof(spec)),
			                 variants[v].base != NULL, true, &res);
			M = saved;
			nops = (long)P * M;
			if (rc) {
				progress_done();
				fprintf(stderr,
				        "opqueue-bench: %s (counting allocations) failed: %s\n",
				        variants[v].label, strerror(rc));
				return 1;
			}
			per_op[v] = (double)res.allocs / (double)counted;
		}
		progress_done();
		for (size_t v = 0; v < NV; v++) {
			if (!measured(v, false))
				continue;
			char ri[16] = "-", rf[16] = "-", rc[16] = "-";
			if (med[0] > 0)
				snprintf(ri, sizeof(ri), "%.2fx", med[0] / med[v]);
			if (med[1] > 0)
				snprintf(rf, sizeof(rf), "%.2fx", med[1] / med[v]);
			if (ceiling < NV && med[ceiling] > 0)
				snprintf(rc, sizeof(rc), "%.1f%%", 100 * med[v] / med[ceiling]);
			char al[16] = "n/a"; /* no malloc wrapper under a sanitizer */
#ifndef NO_MALLOC_HOOK
			snprintf(al, sizeof(al), "%.3f", per_op[v]);
#endif
			printf("%-*s %12.0f %9s %9s %9s %10s %9.4f %10ld %10.1f %10.1f\n", lw,
			       variants[v].label, med[v], ri, rf, rc, al, flt_med[v], rss[v],
			       cpu_med[v], enq_med[v]);
		}
		fflush(stdout);
	}
	progress_done();
	if (plot_file) {
		/* Empty operations without the ceiling (it dwarfs them), then spinning ones with
		 * it. */
		struct panel pn[2];
		static const char *cols[2][NV], *prow[2][MAXROWS];
		static double data[2][MAXROWS * NV];
		size_t npn = 0;
		for (int spin = 0; spin < 2; spin++) {
			size_t nc = 0, npr = 0;
			for (size_t v = 0; v < NV; v++)
				if (measured(v, false) && (spin || v != ceiling))
					cols[spin][nc++] = variants[v].label;
			for (size_t r = 0; r < nrows; r++) {
				if ((wlist[r % nw] > 0) != spin)
					continue;
				size_t c = 0;
				for (size_t v = 0; v < NV; v++)
					if (measured(v, false) && (spin || v != ceiling))
						data[spin][npr * nc + c++] = table[r][v];
				prow[spin][npr++] = rows[r];
			}
			if (npr == 0 || nc == 0)
				continue;
			pn[npn++] =
			    (struct panel){spin ? "operations that spin (with the no-queue ceiling)"
			                        : "empty operations",
			                   "workload: P producers, R runners, work per operation",
			                   "throughput (million operations per second)",
			                   false,
			                   prow[spin],
			                   npr,
			                   cols[spin],
			                   nc,
			                   data[spin]};
		}
		char title[128];
		snprintf(title, sizeof(title),
		         "opqueue-bench burst: %ld operations per producer, median of %u runs", M,
		         K);
		if (npn && plot(plot_file, title, pn, npn))
			return 1;
	}
	return 0;
}

static int run_latency(void)
{
	nops = L;
	P = 1;
	int lw = label_width();
	progress_t0 = now_ns();
	print_missing();
	printf("\nlatency: enqueue to start of perform, one operation at a time, %ld samples,\n"
	       "%u runners; microseconds, median over %u runs of each percentile\n",
	       L, R, K);
	printf("%-*s %9s %9s %9s %12s\n", lw, "variant", "p50 us", "p99 us", "p99.9 us",
	       "p50/intr");
	double data[NV * 3];
	const char *rows[NV];
	size_t nrow = 0;
	double base = 0;
	double p50[NV][K], p99[NV][K], p999[NV][K];
	/* Round k runs every variant once (see run_burst). */
	for (unsigned k = 0; k < K; k++)
		for (size_t i = 0; i < NV; i++) {
			size_t v = round_order(k, i, NV);
			if (!measured(v, true))
				continue;
			progress("latency: round %u/%u, %s", k + 1, K, variants[v].label);
			struct result res;
			char spec[64];
			int rc = run_one(variant_spec(v, "latency", spec, sizeof(spec)),
			                 variants[v].base != NULL, false, &res);
			if (rc) {
				progress_done();
				fprintf(stderr, "opqueue-bench: %s failed: %s\n", variants[v].label,
				        strerror(rc));
				return 1;
			}
			p50[v][k] = res.p50;
			p99[v][k] = res.p99;
			p999[v][k] = res.p999;
		}
	progress_done();
	for (size_t v = 0; v < NV; v++) {
		if (!measured(v, true))
			continue;
		double a = median(p50[v], K), b = median(p99[v], K), c = median(p999[v], K);
		if (nrow == 0)
			base = a;
		printf("%-*s %9.2f %9.2f %9.2f %11.2fx\n", lw, variants[v].label, a, b, c,
		       a / base);
		fflush(stdout);
		rows[nrow] = variants[v].label;
		data[nrow * 3] = a;
		data[nrow * 3 + 1] = b;
		data[nrow * 3 + 2] = c;
		nrow++;
	}
	if (plot_file) {
		static const char *const cols[] = {"p50", "p99", "p99.9"};
		char title[128];
		snprintf(title, sizeof(title),
		         "opqueue-bench latency: %u runners, %ld samples, median of %u runs", R, L,
		         K);
		struct panel pn = {"p50, p99 and p99.9 of each variant",
		                   "thread pool",
		                   "enqueue to start of perform (microseconds, log scale)",
		                   true,
		                   rows,
		                   nrow,
		                   cols,
		                   3,
		                   data};
		if (plot(plot_file, title, &pn, 1))
			return 1;
	}
	return 0;
}

/*
 * The bounded queue against the unbounded one and the ceiling; with -O,
 * also the other build's bounded and unbounded queue.
 */
static int run_bounded(void)
{
	P = (unsigned)plist[0];
	W = wlist[0];
	nops = (long)P * M;
	progress_t0 = now_ns();
	printf("\nbounded: %u producer(s) x %ld ops, %u runners, %ld ns per op, capacity %ld,\n"
	       "median of %u runs\n",
	       P, M, R, W, CAP, K);
	char lbl[6][96];
	const struct {
		const char *label;
		const char *spec;
		bool old;
	} all[] = {
	    {"opqueue intrusive, bounded", "bounded:intrusive", false},
	    {"opqueue fn, bounded", "bounded:fn", false},
	    {lbl[0], "bounded:intrusive", true},
	    {lbl[1], "bounded:fn", true},
	    {"opqueue intrusive, unbounded", "burst:intrusive", false},
	    {lbl[2], "burst:intrusive", true},
	    {"no queue (ceiling)", "burst:ceiling", false},
	};
	snprintf(lbl[0], sizeof(lbl[0]), "%s, bounded", old_intrusive_label);
	snprintf(lbl[1], sizeof(lbl[1]), "%s, bounded", old_fn_label);
	snprintf(lbl[2], sizeof(lbl[2]), "%s, unbounded", old_intrusive_label);
	enum { NB = sizeof(all) / sizeof(all[0]) };
	int lw = 30;
	for (size_t v = 0; v < NB; v++)
		if ((!all[v].old || old_exe) && (int)strlen(all[v].label) > lw)
			lw = (int)strlen(all[v].label);
	printf("%-*s %12s %14s\n", lw, "variant", "ops/s", "this/ceiling");
	double med[NB], rates[NB][K];
	/* Round k runs every variant once (see run_burst). */
	for (unsigned k = 0; k < K; k++)
		for (size_t i = 0; i < NB; i++) {
			size_t v = round_order(k, i, NB);
			if (all[v].old && !old_exe)
				continue;
			progress("bounded: round %u/%u, %s", k + 1, K, all[v].label);
			struct result res;
			int rc = run_one(all[v].spec, all[v].old, false, &res);
			if (rc) {
				progress_done();
				fprintf(stderr, "opqueue-bench: %s failed: %s\n", all[v].label,
				        strerror(rc));
				return 1;
			}
			rates[v][k] = res.rate;
		}
	progress_done();
	for (size_t v = 0; v < NB; v++)
		med[v] = all[v].old && !old_exe ? 0 : median(rates[v], K);
	for (size_t v = 0; v < NB; v++)
		if (!all[v].old || old_exe)
			printf("%-*s %12.0f %13.1f%%\n", lw, all[v].label, med[v],
			       100 * med[v] / med[NB - 1]);
	return 0;
}

/* ---- the line ------------------------------------------------------------- */

/*
 * Release to wakeup: n waiter threads, made once and kept over the rounds
 * (as in a daemon), block on the line's holder (or, for the peer, on a
 * plain mutex/condvar broadcast); the time is from the release to the
 * moment the last of them runs again. Between rounds the woken ones block
 * on a barrier, so that nothing spins while the others wake. A round starts
 * when every waiter is counted as waiting and the kernel shows each asleep:
 * one counted but still on its way into the kernel would be "woken" at no
 * cost (measured: 1.1 us in some runs of 1 waiter, 15 us in the others).
 */
enum { WAKE_ROUNDS = 21 };

struct wake_run {
	bool line; /* the line, else the plain condvar */
	opq_line wline;
	opq_line_ticket held;
	pthread_mutex_t mu; /* the plain peer: */
	pthread_cond_t cv;
	unsigned gen, blocked;
	pthread_barrier_t woke, next;
	atomic_uint_fast64_t last;
	pid_t *tids; /* the waiters' thread ids: slots taken, ntids of them written */
	atomic_uint tid_slots, ntids;
};

/* Is thread tid of this process asleep? Taken as asleep where /proc cannot tell. */
static bool thread_asleep(pid_t tid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	FILE *f = fopen(path, "r");
	if (!f)
		return true;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	const char *p = strrchr(buf, ')'); /* "tid (name) state ...": the name may hold ')' */
	return !p || p[1] != ' ' || p[2] == 'S';
}

static void wake_note(struct wake_run *w)
{
	uint64_t now = now_ns(), seen = atomic_load(&w->last);
	while (now > seen && !atomic_compare_exchange_weak(&w->last, &seen, now))
		;
}

static void *wake_waiter(void *arg)
{
	struct wake_run *w = arg;
	w->tids[atomic_fetch_add(&w->tid_slots, 1)] = (pid_t)syscall(SYS_gettid);
	atomic_fetch_add(&w->ntids, 1); /* after the write: wake_wait_blocked reads it then */
	for (int r = 0; r < WAKE_ROUNDS; r++) {
		if (w->line) {
			opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
			if (opq_line_try_acquire(&w->wline, OPQ_LINE_ANY, &t) != EBUSY ||
			    opq_line_wait(&w->wline, &t, NULL, NULL))
				abort();
		} else {
			pthread_mutex_lock(&w->mu);
			unsigned g = w->gen;
			w->blocked++;
			while (w->gen == g)
				pthread_cond_wait(&w->cv, &w->mu);
			pthread_mutex_unlock(&w->mu);
		}
		wake_note(w);
		pthread_barrier_wait(&w->woke);
		pthread_barrier_wait(&w->next);
	}
	return NULL;
}

/* The line's private fields: opq_-prefixed in the trees before 2026-12-07
 * (the old queue's build of this program defines OPQ_BENCH_OLD_LINE). */
#ifdef OPQ_BENCH_OLD_LINE
#define LINE_FIELD(f) opq_##f
#else
#define LINE_FIELD(f) opq__##f
#endif

/* How many waiters are blocked (the bench reads the line's private count
 * under its mutex; a library user has no need for that). */
static unsigned wake_blocked(struct wake_run *w)
{
	pthread_mutex_t *mu = w->line ? &w->wline.LINE_FIELD(mu) : &w->mu;
	pthread_mutex_lock(mu);
	unsigned n = w->line ? w->wline.LINE_FIELD(waiters) : w->blocked;
	pthread_mutex_unlock(mu);
	return n;
}

/* Wait until all n waiters are counted as waiting and asleep. */
static void wake_wait_blocked(struct wake_run *w, unsigned n)
{
	for (;;) {
		unsigned asleep = 0;
		if (wake_blocked(w) == n && atomic_load(&w->ntids) == n)
			while (asleep < n && thread_asleep(w->tids[asleep]))
				asleep++;
		if (asleep == n)
			return;
		sched_yield();
	}
}

static void wake_hold(struct wake_run *w)
{
	if (w->line) {
		w->held = (opq_line_ticket)OPQ_LINE_TICKET_INITIALIZER;
		if (opq_line_try_acquire(&w->wline, OPQ_LINE_ANY, &w->held))
			abort();
	} else {
		w->blocked = 0;
	}
}

static void wake_release(struct wake_run *w)
{
	if (w->line) {
		opq_line_release(&w->wline, &w->held, 0);
	} else {
		pthread_mutex_lock(&w->mu);
		w->gen++;
		pthread_cond_broadcast(&w->cv);
		pthread_mutex_unlock(&w->mu);
	}
}

/* Median over WAKE_ROUNDS rounds, in microseconds; < 0 on failure. */
static double wakeup_us(bool line, unsigned n)
{
	pid_t tids[n];
	struct wake_run w = {.line = line, .tids = tids};
	double us[WAKE_ROUNDS];
	pthread_t th[n];
	if (opq_line_init(&w.wline) || pthread_mutex_init(&w.mu, NULL) ||
	    pthread_cond_init(&w.cv, NULL) || pthread_barrier_init(&w.woke, NULL, n + 1) ||
	    pthread_barrier_init(&w.next, NULL, n + 1))
		return -1;
	wake_hold(&w);
	for (unsigned i = 0; i < n; i++)
		if (pthread_create(&th[i], NULL, wake_waiter, &w))
			abort();
	for (int r = 0; r < WAKE_ROUNDS; r++) {
		wake_wait_blocked(&w, n);
		atomic_store(&w.last, 0);
		uint64_t t0 = now_ns();
		wake_release(&w);
		pthread_barrier_wait(&w.woke);
		us[r] = (double)(atomic_load(&w.last) - t0) / 1e3;
		wake_hold(&w); /* before any waiter comes back for the next round */
		pthread_barrier_wait(&w.next);
	}
	for (unsigned i = 0; i < n; i++)
		pthread_join(th[i], NULL);
	if (line)
		opq_line_release(&w.wline, &w.held, 0);
	int rc = opq_line_destroy(&w.wline);
	pthread_barrier_destroy(&w.next);
	pthread_barrier_destroy(&w.woke);
	pthread_cond_destroy(&w.cv);
	pthread_mutex_destroy(&w.mu);
	return rc ? -1 : median(us, WAKE_ROUNDS);
}

static int run_line(void)
{
	printf("\nline: uncontended try_acquire + release, %ld iterations, median of %u runs\n", M,
	       K);
	opq_line line = OPQ_LINE_INITIALIZER;
	double ns[K];
	for (unsigned k = 0; k < K; k++) {
		opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
		uint64_t t0 = now_ns();
		for (long i = 0; i < M; i++) {
			if (opq_line_try_acquire(&line, OPQ_LINE_ANY, &t) ||
			    opq_line_release(&line, &t, 0)) {
				fprintf(stderr, "opqueue-bench: line: unexpected failure\n");
				return 1;
			}
		}
		ns[k] = (double)(now_ns() - t0) / (double)M;
	}
	printf("%-22s %10.1f ns\n", "acquire + release", median(ns, K));
	if (opq_line_destroy(&line))
		return 1;
	static const unsigned counts[] = {1, 8, 64};
	printf(
	    "\nrelease to the last waiter running, us, median of %d rounds with the same threads\n",
	    WAKE_ROUNDS);
	printf("%-8s %14s %17s %12s\n", "waiters", "opqueue line", "plain condvar", "line/plain");
	for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
		double l = wakeup_us(true, counts[i]), p = wakeup_us(false, counts[i]);
		if (l < 0 || p < 0)
			return 1;
		printf("%-8u %14.1f %17.1f %11.2fx\n", counts[i], l, p, l / p);
	}
	return 0;
}

/* ---- main ---------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: opqueue-bench [burst|latency|bounded|line|push|loop] [-p LIST] [-r LIST]\n"
	    "         [-m OPS_PER_PRODUCER] [-w LIST_NS] [-k REPEATS] [-n SAMPLES] [-c CAPACITY]\n"
	    "         [-V intrusive,fn,old-intrusive,old-fn,glib,libuv,plain,ceiling]\n"
	    "         [-O OTHER_BUILD_PROGRAM [-L LABEL]] [-F] [--plot FILE.svg] [--cold]\n"
	    "       opqueue-bench -l [-m ITERATIONS] [-k REPEATS]\n"
	    "       opqueue-bench loop [-r RUNNERS] [-m ROUND_TRIPS] [-w LIST_NS] [-i "
	    "LIST_IN_FLIGHT]\n"
	    "         [-n SAMPLES] [-k REPEATS] [-V intrusive,fn,libuv] [-F] [--plot FILE.svg]\n"
	    "       opqueue-bench [-O OTHER_BUILD_PROGRAM] --library\n");
}

/* --library: the file of the libopqueue this program runs with (and the other build's). */
static int print_library(void)
{
	int (*fp)(opq_queue **, const opq_queue_attr *) = opq_queue_create;
	void *addr;
	Dl_info info;
	memcpy(&addr, &fp, sizeof(addr));
	if (!dladdr(addr, &info) || !info.dli_fname)
		return 1;
	printf("%s\n", info.dli_fname);
	if (!old_exe)
		return 0;
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		execl(old_exe, old_exe, "--library", (char *)NULL);
		fprintf(stderr, "opqueue-bench: %s: %s\n", old_exe, strerror(errno));
		_exit(127);
	}
	int status;
	return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
	               !WEXITSTATUS(status)
	           ? 0
	           : 1;
}

static bool select_variants(const char *list)
{
	memset(selected, 0, sizeof(selected));
	char buf[256];
	snprintf(buf, sizeof(buf), "%s", list);
	for (char *save, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		size_t v = 0;
		while (v < NV && strcmp(variants[v].name, t))
			v++;
		if (v == NV)
			return false;
		selected[v] = true;
	}
	return true;
}

/* ---- push: one compare-and-swap push per node onto one shared stack ----- */

struct push_node {
	struct push_node *next;
	char pad[56];
};
static struct push_node *push_nodes;
static struct push_node *_Atomic push_top;
static pthread_barrier_t push_ready, push_go;

static void *push_thread(void *arg)
{
	long base = (long)(intptr_t)arg * M;
	pthread_barrier_wait(&push_ready);
	pthread_barrier_wait(&push_go);
	for (long i = base; i < base + M; i++) {
		struct push_node *n = &push_nodes[i];
		struct push_node *top = atomic_load_explicit(&push_top, memory_order_relaxed);
		do
			n->next = top;
		while (!atomic_compare_exchange_weak(&push_top, &top, n));
	}
	return NULL;
}

static int run_push(void)
{
	printf("\npush: P threads each push %ld nodes onto one stack (a compare-and-swap each),\n"
	       "ns per push (the wall time of each thread's pushes), median of %u runs\n",
	       M, K);
	printf("%-12s %12s\n", "threads", "ns/push");
	for (size_t pi = 0; pi < np; pi++) {
		unsigned p = (unsigned)plist[pi];
		double ns[K];
		push_nodes = calloc((size_t)p * (size_t)M, sizeof(*push_nodes));
		if (!push_nodes)
			return 1;
		for (unsigned k = 0; k < K; k++) {
			memset(push_nodes, 0, (size_t)p * (size_t)M * sizeof(*push_nodes));
			atomic_store(&push_top, NULL);
			pthread_t th[p];
			if (pthread_barrier_init(&push_ready, NULL, p + 1) ||
			    pthread_barrier_init(&push_go, NULL, p + 1))
				return 1;
			for (unsigned i = 0; i < p; i++)
				if (pthread_create(&th[i], NULL, push_thread, (void *)(intptr_t)i))
					return 1;
			pthread_barrier_wait(&push_ready); /* made: their start-up is not timed */
			uint64_t t0 = now_ns();
			pthread_barrier_wait(&push_go);
			for (unsigned i = 0; i < p; i++)
				pthread_join(th[i], NULL);
			ns[k] = (double)(now_ns() - t0) / (double)M;
			pthread_barrier_destroy(&push_go);
			pthread_barrier_destroy(&push_ready);
			long n = 0, want = (long)p * M; /* every push is on the stack once */
			for (struct push_node *e = atomic_load(&push_top); e && n <= want;
			     e = e->next)
				n++;
			if (n != want) {
				fprintf(stderr,
				        "opqueue-bench: push: %ld nodes on the stack, not %ld\n", n,
				        want);
				return 1;
			}
		}
		printf("%-12u %12.1f\n", p, median(ns, K));
		free(push_nodes);
	}
	return 0;
}

int main(int argc, char **argv)
{
	enum { OPT_CHILD = 256, OPT_COUNT, OPT_LIBRARY };
	static const struct option longopts[] = {{"plot", required_argument, NULL, 'P'},
	                                         {"help", no_argument, NULL, 'h'},
	                                         {"cold", no_argument, NULL, 'C'},
	                                         {"old", required_argument, NULL, 'O'},
	                                         {"old-label", required_argument, NULL, 'L'},
	                                         {"child", required_argument, NULL, OPT_CHILD},
	                                         {"count", no_argument, NULL, OPT_COUNT},
	                                         {"library", no_argument, NULL, OPT_LIBRARY},
	                                         {NULL, 0, NULL, 0}};
	const char *mode = "burst", *child = NULL, *vlist = NULL;
	bool child_count = false, library = false;
	int opt;
	for (size_t v = 0; v < NV; v++)
		selected[v] = true;
	if (argc > 1 && argv[1][0] != '-') {
		mode = argv[1];
		argv++;
		argc--;
	}
	while ((opt = getopt_long(argc, argv, "lp:m:r:w:k:n:c:i:V:FP:O:L:h", longopts, NULL)) !=
	       -1) {
		switch (opt) {
		case 'l':
			mode = "line";
			break;
		case 'p':
			np = parse_list(optarg, plist);
			break;
		case 'm':
			M = atol(optarg);
			break;
		case 'r':
			nr = parse_list(optarg, rlist);
			break;
		case 'w':
			nw = parse_list(optarg, wlist);
			break;
		case 'k':
			K = (unsigned)atoi(optarg);
			break;
		case 'n':
			L = atol(optarg);
			break;
		case 'c':
			CAP = atol(optarg);
			break;
		case 'i':
			ni = parse_list(optarg, ilist);
			break;
		case 'F':
			no_fork = 1;
			break;
		case 'C':
			cold = 1;
			break;
		case 'P':
			plot_file = optarg;
			break;
		case 'O':
			old_exe = optarg;
			break;
		case 'L':
			old_label = optarg;
			break;
		case 'V':
			vlist = optarg;
			break;
		case OPT_CHILD:
			child = optarg;
			break;
		case OPT_COUNT:
			child_count = true;
			break;
		case OPT_LIBRARY:
			library = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (vlist && !select_variants(vlist)) {
		fprintf(stderr, "opqueue-bench: unknown variant in %s\n", vlist);
		return 2;
	}
	const char *bad = NULL;
	if (optind != argc)
		bad = "unexpected argument";
	else if (np == 0)
		bad = "-p takes a comma-separated list of producer counts";
	else if (nr == 0)
		bad = "-r takes a comma-separated list of runner counts";
	else if (nw == 0)
		bad = "-w takes a comma-separated list of nanoseconds";
	else if (ni == 0)
		bad = "-i takes a comma-separated list of operations in flight";
	else if (M < 1)
		bad = "-m takes at least 1";
	else if (K < 1 || K > 1000)
		bad = "-k takes 1 to 1000 repeats";
	else if (L < 1000)
		bad = "-n takes at least 1000 samples";
	else if (CAP < 1)
		bad = "-c takes a capacity of at least 1";
	else if (no_fork && nr > 1)
		bad = "-F takes one runner count (libuv sizes its pool once per process)";
	else if (no_fork && old_exe)
		bad = "-O runs the other build in processes of its own: not with -F";
	else if (strlen(old_label) > 32)
		bad = "-L takes a label of at most 32 characters";
	for (size_t i = 0; i < np && !bad; i++)
		if (plist[i] < 1 || plist[i] > 256)
			bad = "-p takes 1 to 256 producers";
	for (size_t i = 0; i < nr && !bad; i++)
		if (rlist[i] < 1 || rlist[i] > 256)
			bad = "-r takes 1 to 256 runners";
	for (size_t i = 0; i < nw && !bad; i++)
		if (wlist[i] < 0)
			bad = "-w takes no negative times";
	for (size_t i = 0; i < ni && !bad; i++)
		if (ilist[i] < 1 || ilist[i] > 1000000)
			bad = "-i takes 1 to 1000000 operations in flight";
	for (size_t v = 0; v < NV && !bad; v++)
		if (vlist && selected[v] && variants[v].base && !old_exe)
			bad = "-V old-intrusive and old-fn need -O";
	if (bad) {
		fprintf(stderr, "opqueue-bench: %s\n", bad);
		usage(stderr);
		return 2;
	}
	snprintf(old_intrusive_label, sizeof(old_intrusive_label), "opqueue (%s) intrusive",
	         old_label);
	snprintf(old_fn_label, sizeof(old_fn_label), "opqueue (%s) fn", old_label);
	R = (unsigned)rlist[0]; /* burst takes each of -r in turn; the other modes the first */
	if (no_fork)
		K = 1;
#ifdef HAVE_LIBUV
	uv_set_size(); /* read by libuv once, on first use */
#endif
	if (library)
		return print_library();
	if (child)
		return run_child(child, child_count);
	if (!strcmp(mode, "burst"))
		return run_burst();
	if (!strcmp(mode, "latency"))
		return run_latency();
	if (!strcmp(mode, "bounded"))
		return run_bounded();
	if (!strcmp(mode, "line"))
		return run_line();
	if (!strcmp(mode, "push"))
		return run_push();
	if (!strcmp(mode, "loop")) {
		size_t vi = 0, vf = 1, vu = 0;
		while (vu < NV && strcmp(variants[vu].name, "libuv"))
			vu++;
		struct loop_opts lo = {.runners = R,
		                       .repeats = K,
		                       .trips = M,
		                       .samples = L,
		                       .spins = wlist,
		                       .nspins = nw,
		                       .windows = ilist,
		                       .nwindows = ni,
		                       .intrusive = selected[vi],
		                       .submit = selected[vf],
		                       .libuv = vu < NV && selected[vu],
		                       .no_fork = no_fork,
		                       .plot = plot_file};
		return run_loop(&lo);
	}
	fprintf(stderr, "opqueue-bench: unknown workload %s\n", mode);
	usage(stderr);
	return 2;
}
