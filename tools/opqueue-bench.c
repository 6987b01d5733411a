/*
 * opqueue-bench: P producers enqueue M operations each into R runners; each
 * operation is empty or spins W nanoseconds. The same workload runs on
 * opqueue (intrusive and function-pointer paths) and on a plain
 * mutex/condvar pool that signals on every enqueue, each run in a child
 * process of its own (so that peak RSS is per variant), repeated; the table
 * shows medians and each variant's ratio to opqueue's intrusive path.
 * The clock runs from the moment the runners are up (and, for the intrusive
 * path, the operations initialised) until the last operation has been
 * performed and the runners joined.
 *
 * usage: opqueue-bench [-p PRODUCERS] [-m OPS_PER_PRODUCER] [-r RUNNERS]
 *                      [-w SPIN_NS] [-k REPEATS]
 *        opqueue-bench -l [-m ITERATIONS] [-k REPEATS]
 *
 * -l measures the line instead: an uncontended opq_line_try_acquire plus
 * opq_line_release, in nanoseconds per pair (median of K runs), and the time
 * from a release to the last of 1, 8 and 64 blocked waiters running again.
 */
#define _DEFAULT_SOURCE 1 /* wait4 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <opqueue.h>

static unsigned P = 1, R = 2, K = 5;
static long M = 1000000, W = 0;
static atomic_long performed;
static uint64_t t_start; /* set by each variant once its set-up is done */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void work(void)
{
	if (W > 0) {
		uint64_t end = now_ns() + (uint64_t)W;
		while (now_ns() < end)
			;
	}
	atomic_fetch_add_explicit(&performed, 1, memory_order_relaxed);
}

/* ---- opqueue ------------------------------------------------------------- */

static opq_queue *oq;
static opq_op *ops;

static void op_perform(opq_op *op)
{
	(void)op;
	work();
}

static void fn_perform(void *arg)
{
	(void)arg;
	work();
}

static void *opq_producer(void *arg)
{
	long base = (long)(intptr_t)arg * M;
	for (long i = 0; i < M; i++)
		if (opq_queue_enqueue(oq, &ops[base + i]))
			abort();
	return NULL;
}

static void *opq_fn_producer(void *arg)
{
	(void)arg;
	for (long i = 0; i < M; i++)
		if (opq_queue_enqueue_fn(oq, fn_perform, NULL, NULL))
			abort();
	return NULL;
}

static int run_opq(void *(*producer)(void *))
{
	if (producer == opq_producer) {
		ops = calloc((size_t)P * (size_t)M, sizeof(*ops));
		if (!ops)
			return ENOMEM;
		for (long i = 0; i < (long)P * M; i++)
			opq_op_init(&ops[i], op_perform, NULL);
	}
	int rc = opq_queue_create(&oq, NULL);
	if (rc || (rc = opq_queue_start(oq, R)))
		return rc;
	pthread_t th[P];
	t_start = now_ns();
	for (unsigned i = 0; i < P; i++)
		pthread_create(&th[i], NULL, producer, (void *)(intptr_t)i);
	for (unsigned i = 0; i < P; i++)
		pthread_join(th[i], NULL);
	rc = opq_queue_stop(oq, OPQ_STOP_DRAIN);
	opq_queue_destroy(oq);
	return rc;
}

static int run_opq_intrusive(void)
{
	return run_opq(opq_producer);
}

static int run_opq_fn(void)
{
	return run_opq(opq_fn_producer);
}

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
} plain = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0 };

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

static void *plain_producer(void *arg)
{
	(void)arg;
	for (long i = 0; i < M; i++) {
		struct plain_item *it = malloc(sizeof(*it));
		if (!it)
			abort();
		it->next = NULL;
		it->fn = fn_perform;
		it->arg = NULL;
		pthread_mutex_lock(&plain.mu);
		if (plain.tail)
			plain.tail->next = it;
		else
			plain.head = it;
		plain.tail = it;
		pthread_cond_signal(&plain.cv);
		pthread_mutex_unlock(&plain.mu);
	}
	return NULL;
}

static int run_plain(void)
{
	pthread_t rt[R], pt[P];
	for (unsigned i = 0; i < R; i++)
		pthread_create(&rt[i], NULL, plain_runner, NULL);
	t_start = now_ns();
	for (unsigned i = 0; i < P; i++)
		pthread_create(&pt[i], NULL, plain_producer, NULL);
	for (unsigned i = 0; i < P; i++)
		pthread_join(pt[i], NULL);
	pthread_mutex_lock(&plain.mu);
	plain.stop = 1;
	pthread_cond_broadcast(&plain.cv);
	pthread_mutex_unlock(&plain.mu);
	for (unsigned i = 0; i < R; i++)
		pthread_join(rt[i], NULL);
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}


/* ---- the line ------------------------------------------------------------- */

static opq_line wline;
static opq_line_ticket wheld;
static atomic_uint_fast64_t woken_last;

static void *line_waiter(void *arg)
{
	(void)arg;
	opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
	if (opq_line_try_acquire(&wline, OPQ_LINE_ANY, &t) != EBUSY ||
	    opq_line_wait(&wline, &t, NULL, NULL))
		abort();
	uint64_t now = now_ns(), seen = atomic_load(&woken_last);
	while (now > seen && !atomic_compare_exchange_weak(&woken_last, &seen, now))
		;
	return NULL;
}

/*
 * Median over 21 rounds of the time from opq_line_release to the moment the
 * last of n blocked waiters runs again, in microseconds. The bench reads
 * the line's private waiter count (under its mutex) to know that all n
 * are blocked; a library user has no need for that.
 */
static double line_wakeup_us(unsigned n)
{
	enum { ROUNDS = 21 };
	double us[ROUNDS];
	pthread_t th[n];
	for (int r = 0; r < ROUNDS; r++) {
		if (opq_line_init(&wline))
			return -1;
		wheld = (opq_line_ticket)OPQ_LINE_TICKET_INITIALIZER;
		if (opq_line_try_acquire(&wline, OPQ_LINE_ANY, &wheld))
			return -1;
		atomic_store(&woken_last, 0);
		for (unsigned i = 0; i < n; i++)
			pthread_create(&th[i], NULL, line_waiter, NULL);
		for (unsigned blocked = 0; blocked < n;) {
			sched_yield();
			pthread_mutex_lock(&wline.opq_mu);
			blocked = wline.opq_waiters;
			pthread_mutex_unlock(&wline.opq_mu);
		}
		uint64_t t0 = now_ns();
		opq_line_release(&wline, &wheld, 0);
		for (unsigned i = 0; i < n; i++)
			pthread_join(th[i], NULL);
		us[r] = (double)(atomic_load(&woken_last) - t0) / 1e3;
		opq_line_destroy(&wline);
	}
	qsort(us, ROUNDS, sizeof(double), cmp_double);
	return us[ROUNDS / 2];
}

static int run_line(void)
{
	printf("line: uncontended try_acquire + release, %ld iterations, median of %u runs\n", M, K);
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
	qsort(ns, K, sizeof(double), cmp_double);
	printf("%-22s %10.1f ns\n", "acquire + release", ns[K / 2]);
	if (opq_line_destroy(&line))
		return 1;
	static const unsigned counts[] = { 1, 8, 64 };
	for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
		double us = line_wakeup_us(counts[i]);
		if (us < 0)
			return 1;
		printf("release to last of %2u waiters %8.1f us\n", counts[i], us);
	}
	return 0;
}

/* ---- the driver ---------------------------------------------------------- */

struct variant {
	const char *name;
	int (*run)(void);
};

static const struct variant variants[] = {
	{ "opqueue (intrusive)", run_opq_intrusive },
	{ "opqueue (fn)", run_opq_fn },
	{ "plain mutex/condvar", run_plain },
};
#define NV (sizeof(variants) / sizeof(variants[0]))

struct result {
	double ops_per_s;
	long rss_kb;
};

/* One run of one variant in a child process; the child reports over a pipe. */
static int run_child(const struct variant *v, struct result *res)
{
	int fds[2];
	if (pipe(fds))
		return errno;
	pid_t pid = fork();
	if (pid < 0)
		return errno;
	if (pid == 0) {
		close(fds[0]);
		int rc = v->run();
		uint64_t t1 = now_ns(), t0 = t_start;
		long expect = (long)P * M;
		double rate = rc == 0 && atomic_load(&performed) == expect
				      ? (double)expect / ((double)(t1 - t0) / 1e9)
				      : -1.0;
		ssize_t w = write(fds[1], &rate, sizeof(rate));
		_exit(w == (ssize_t)sizeof(rate) ? 0 : 1);
	}
	close(fds[1]);
	double rate = -1;
	ssize_t r = read(fds[0], &rate, sizeof(rate));
	close(fds[0]);
	int status;
	struct rusage ru;
	if (wait4(pid, &status, 0, &ru) < 0)
		return errno;
	if (r != (ssize_t)sizeof(rate) || rate < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		return EIO;
	res->ops_per_s = rate;
	res->rss_kb = ru.ru_maxrss;
	return 0;
}

int main(int argc, char **argv)
{
	int opt, line_mode = 0;
	while ((opt = getopt(argc, argv, "lp:m:r:w:k:")) != -1) {
		switch (opt) {
		case 'l': line_mode = 1; break;
		case 'p': P = (unsigned)atoi(optarg); break;
		case 'm': M = atol(optarg); break;
		case 'r': R = (unsigned)atoi(optarg); break;
		case 'w': W = atol(optarg); break;
		case 'k': K = (unsigned)atoi(optarg); break;
		default:
			fprintf(stderr, "usage: opqueue-bench [-p PRODUCERS] [-m OPS_PER_PRODUCER] "
					"[-r RUNNERS] [-w SPIN_NS] [-k REPEATS]\n"
					"       opqueue-bench -l [-m ITERATIONS] [-k REPEATS]\n");
			return 2;
		}
	}
	if (P < 1 || R < 1 || M < 1 || K < 1 || W < 0 || P > 256 || R > 256) {
		fprintf(stderr, "opqueue-bench: bad arguments\n");
		return 2;
	}
	if (line_mode)
		return run_line();
	printf("burst: %u producer(s) x %ld ops, %u runners, %ld ns per op, median of %u runs\n",
	       P, M, R, W, K);
	printf("%-22s %14s %10s %12s\n", "variant", "ops/s", "ratio", "peak RSS kB");
	double base = 0;
	for (size_t v = 0; v < NV; v++) {
		double rates[K];
		long rss = 0;
		for (unsigned k = 0; k < K; k++) {
			struct result res = { 0, 0 };
			int rc = run_child(&variants[v], &res);
			if (rc) {
				fprintf(stderr, "opqueue-bench: %s failed: %s\n", variants[v].name,
					strerror(rc));
				return 1;
			}
			rates[k] = res.ops_per_s;
			if (res.rss_kb > rss)
				rss = res.rss_kb;
			fprintf(stderr, "\r%s run %u/%u", variants[v].name, k + 1, K);
		}
		fprintf(stderr, "\r%60s\r", "");
		qsort(rates, K, sizeof(double), cmp_double);
		double med = rates[K / 2];
		if (v == 0)
			base = med;
		printf("%-22s %14.0f %9.2fx %12ld\n", variants[v].name, med, med / base, rss);
	}
	return 0;
}
