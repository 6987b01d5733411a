/*
 * opqueue-stress: drives every module of libopqueue at once with random API
 * sequences from many threads and checks their invariants continuously.
 * See opqueue-stress(1).
 *
 * Reproducibility: worker i draws its choices from a PRNG seeded with a
 * mix of the seed and i, so the sequence of API calls each worker makes is
 * the same from run to run as long as the calls return the same results
 * (the interleaving of threads is the operating system's).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stress.h"

/* The modules: add one line to add one. */
static const struct stress_module *const modules[] = {
    &stress_queue,        &stress_line, &stress_stage, &stress_lease,
#ifdef HAVE_SQLITE3
    &stress_lease_sqlite,
#endif
#ifdef HAVE_LIBPQ
    &stress_lease_pg,
#endif
#ifdef HAVE_ETCD
    &stress_lease_etcd,
#endif
    &stress_scope,
};
#define NMODULES (sizeof(modules) / sizeof(modules[0]))

struct worker {
	struct stress_worker w;
	pthread_t thread;
	_Atomic uint64_t iterations;
	atomic_bool done;
};

static unsigned nthreads = 8;
static double duration = 10;
static uint64_t iterations_per_thread; /* -n: 0 means run for -d seconds */
static uint64_t seed;
static unsigned watchdog = 120;
static bool quiet;
static bool selected[NMODULES];
static void *state[NMODULES];
static unsigned active[NMODULES], nactive;
static struct worker *workers;
static atomic_bool stopping;
static atomic_int failed;
static int saved_argc;
static char **saved_argv;
static pthread_mutex_t fail_mu = PTHREAD_MUTEX_INITIALIZER;

bool stress_stopping(void)
{
	return atomic_load_explicit(&stopping, memory_order_relaxed);
}

/* The command line that reproduces this run, with the seed made explicit. */
static void print_reproduce(FILE *out)
{
	fprintf(out, "reproduce with:");
	bool has_seed = false;
	for (int i = 0; i < saved_argc; i++) {
		fprintf(out, " %s", saved_argv[i]);
		if (strcmp(saved_argv[i], "-s") == 0 || strncmp(saved_argv[i], "-s", 2) == 0)
			has_seed = true;
	}
	if (!has_seed)
		fprintf(out, " -s %" PRIu64, seed);
	fprintf(out, "\n");
}

void stress_fail(const char *module, const char *fmt, ...)
{
	pthread_mutex_lock(&fail_mu);
	int n = atomic_fetch_add(&failed, 1);
	if (n < 10) {
		va_list ap;
		va_start(ap, fmt);
		fprintf(stderr, "opqueue-stress: VIOLATION in %s: ", module);
		vfprintf(stderr, fmt, ap);
		fprintf(stderr, " (seed %" PRIu64 ")\n", seed);
		va_end(ap);
		if (n == 0)
			print_reproduce(stderr);
		fflush(stderr);
	}
	atomic_store(&stopping, true);
	pthread_mutex_unlock(&fail_mu);
}

static uint64_t mix(uint64_t x)
{
	struct stress_rng r = {x};
	return stress_next(&r);
}

static void *worker_main(void *arg)
{
	struct worker *wk = arg;
	for (;;) {
		if (stress_stopping())
			break;
		if (iterations_per_thread &&
		    atomic_load_explicit(&wk->iterations, memory_order_relaxed) >=
		        iterations_per_thread)
			break;
		unsigned m = active[stress_below(&wk->w.rng, nactive)];
		modules[m]->step(state[m], &wk->w);
		atomic_fetch_add_explicit(&wk->iterations, 1, memory_order_relaxed);
	}
	atomic_store(&wk->done, true);
	return NULL;
}

static uint64_t total_iterations(void)
{
	uint64_t n = 0;
	for (unsigned i = 0; i < nthreads; i++)
		n += atomic_load_explicit(&workers[i].iterations, memory_order_relaxed);
	return n;
}

static uint64_t total_calls(void)
{
	uint64_t n = 0;
	for (unsigned k = 0; k < nactive; k++)
		n += modules[active[k]]->calls(state[active[k]]);
	return n;
}

static void usage(FILE *out)
{
	fprintf(out, "usage: opqueue-stress [-q] [-d SECONDS | -n ITERATIONS] [-s SEED] "
	             "[-t THREADS] [-m MODULE,...] [-w SECONDS]\nmodules:");
	for (unsigned m = 0; m < NMODULES; m++)
		fprintf(out, " %s%s", modules[m]->name,
		        modules[m]->named_only ? " (by name only)" : "");
	fprintf(out, "\n");
}

static int select_modules(const char *list)
{
	char *copy = strdup(list);
	if (!copy)
		return ENOMEM;
	int rc = 0;
	for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		unsigned m;
		for (m = 0; m < NMODULES; m++)
			if (strcmp(tok, modules[m]->name) == 0 ||
			    (strcmp(tok, "all") == 0 && !modules[m]->named_only))
				selected[m] = true;
		for (m = 0; m < NMODULES && strcmp(tok, modules[m]->name) != 0; m++)
			;
		if (m == NMODULES && strcmp(tok, "all") != 0) {
			fprintf(stderr, "opqueue-stress: no module named %s\n", tok);
			rc = EINVAL;
		}
	}
	free(copy);
	return rc;
}

static bool parse_u64(const char *s, uint64_t *v)
{
	char *end;
	errno = 0;
	unsigned long long x = strtoull(s, &end, 0);
	if (errno || end == s || *end || *s == '-')
		return false;
	*v = x;
	return true;
}

int main(int argc, char **argv)
{
	saved_argc = argc;
	saved_argv = argv;
	bool have_seed = false, have_modules = false;
	uint64_t v;
	int opt;
	while ((opt = getopt(argc, argv, "d:n:s:t:m:w:qh")) != -1) {
		switch (opt) {
		case 'd': {
			char *end;
			duration = strtod(optarg, &end);
			if (end == optarg || *end || duration <= 0) {
				usage(stderr);
				return 2;
			}
			break;
		}
		case 'n':
			if (!parse_u64(optarg, &iterations_per_thread) || !iterations_per_thread) {
				usage(stderr);
				return 2;
			}
			break;
		case 's':
			if (!parse_u64(optarg, &seed)) {
				usage(stderr);
				return 2;
			}
			have_seed = true;
			break;
		case 't':
			if (!parse_u64(optarg, &v) || v == 0 || v > 1024) {
				usage(stderr);
				return 2;
			}
			nthreads = (unsigned)v;
			break;
		case 'w':
			if (!parse_u64(optarg, &v) || v == 0) {
				usage(stderr);
				return 2;
			}
			watchdog = (unsigned)v;
			break;
		case 'm':
			if (select_modules(optarg)) {
				usage(stderr);
				return 2;
			}
			have_modules = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 2;
	}
	if (!have_seed) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		seed = mix(((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec) ^
		           ((uint64_t)getpid() << 32));
	}
	for (unsigned m = 0; m < NMODULES; m++)
		if (have_modules ? selected[m] : !modules[m]->named_only)
			active[nactive++] = m;

	printf("opqueue-stress %s: seed %" PRIu64 ", %u threads, ", opq_version(), seed, nthreads);
	if (iterations_per_thread)
		printf("%" PRIu64 " iterations per thread", iterations_per_thread);
	else
		printf("%g s", duration);
	printf(", modules");
	for (unsigned k = 0; k < nactive; k++)
		printf("%s%s", k ? "," : " ", modules[active[k]]->name);
	printf("\n");
	fflush(stdout);

	for (unsigned k = 0; k < nactive; k++) {
		unsigned m = active[k];
		int rc = modules[m]->setup(&state[m], nthreads, mix(seed ^ (0x1000u + m)));
		if (rc) {
			fprintf(stderr, "opqueue-stress: %s: setup failed: %s\n", modules[m]->name,
			        strerror(rc));
			return 2;
		}
	}

	workers = calloc(nthreads, sizeof(*workers));
	if (!workers)
		return 2;
	int64_t start = stress_now();
	for (unsigned i = 0; i < nthreads; i++) {
		workers[i].w.index = i;
		workers[i].w.rng.s = mix(seed + 0x51ed2701u * (uint64_t)(i + 1));
		int rc = pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]);
		if (rc) {
			fprintf(stderr, "opqueue-stress: pthread_create: %s\n", strerror(rc));
			return 2;
		}
	}

	/* Monitor: progress, invariant checks and the watchdog, once a second. */
	uint64_t *last = calloc(nthreads, sizeof(*last));
	int64_t *since = calloc(nthreads, sizeof(*since));
	if (!last || !since)
		return 2;
	int64_t last_print = start;
	for (;;) {
		int64_t left = (int64_t)(duration * 1e9) - (stress_now() - start);
		int64_t wait = 1000000000LL;
		if (!iterations_per_thread && !stress_stopping() && left > 0 && left < wait)
			wait = left;
		if (stress_stopping())
			wait = 20000000; /* winding down: notice soon that the workers are done */
		struct timespec tick = stress_after(wait);
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &tick, NULL) == EINTR)
			;
		double elapsed = (double)(stress_now() - start) / 1e9;
		if (!iterations_per_thread && elapsed >= duration)
			atomic_store(&stopping, true);
		bool all_done = true;
		for (unsigned i = 0; i < nthreads; i++) {
			uint64_t it = atomic_load(&workers[i].iterations);
			bool done = atomic_load(&workers[i].done);
			all_done = all_done && done;
			if (done || it != last[i] || !since[i]) {
				since[i] = stress_now();
			} else if (stress_now() - since[i] >= (int64_t)watchdog * 1000000000LL) {
				stress_fail(
				    "driver",
				    "worker %u made no progress for %u s (iteration %" PRIu64
				    "): deadlock or lost wakeup",
				    i, watchdog, it);
				fflush(NULL);
				_exit(1); /* its threads are stuck: no clean exit */
			}
			last[i] = it;
		}
		for (unsigned k = 0; k < nactive; k++)
			if (modules[active[k]]->check)
				modules[active[k]]->check(state[active[k]]);
		if (!quiet && (stress_now() - last_print >= 999000000LL || all_done) &&
		    (last_print = stress_now()))
			fprintf(stderr, "[%6.1fs] %" PRIu64 " iterations, %" PRIu64 " calls%s\n",
			        elapsed, total_iterations(), total_calls(),
			        atomic_load(&failed) ? ", VIOLATIONS" : "");
		if (all_done)
			break;
	}
	for (unsigned i = 0; i < nthreads; i++)
		pthread_join(workers[i].thread, NULL);
	double elapsed = (double)(stress_now() - start) / 1e9;
	uint64_t iters = total_iterations();
	for (unsigned k = 0; k < nactive; k++)
		modules[active[k]]->check(state[active[k]]);
	uint64_t calls = total_calls();
	printf("seconds: %.1f\niterations: %" PRIu64 "\ncalls: %" PRIu64 " (%.0f/s)\n", elapsed,
	       iters, calls, elapsed > 0 ? (double)calls / elapsed : 0.0);
	for (unsigned k = 0; k < nactive; k++)
		modules[active[k]]->teardown(state[active[k]], stdout);
	int nf = atomic_load(&failed);
	printf("violations: %d\n", nf);
	free(last);
	free(since);
	free(workers);
	return nf ? 1 : 0;
}
