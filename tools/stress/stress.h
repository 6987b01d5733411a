/*
 * stress.h: the interface between opqueue-stress's driver (main.c) and its
 * modules. A module is one file defining one `const struct stress_module`
 * and one line in the table in main.c: the driver starts the worker
 * threads, gives each a reproducible PRNG, calls the modules' step
 * functions, runs their invariant checks once a second and prints the
 * progress and the summary.
 */
#ifndef OPQ_STRESS_H
#define OPQ_STRESS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include <opqueue.h>

/* A splitmix64 PRNG: small, fast, and the same sequence on every machine. */
struct stress_rng {
	uint64_t s;
};

static inline uint64_t stress_next(struct stress_rng *r)
{
	uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* A number in [0, n). */
static inline unsigned stress_below(struct stress_rng *r, unsigned n)
{
	return n ? (unsigned)(stress_next(r) % n) : 0;
}

/* True with probability pct percent. */
static inline bool stress_pct(struct stress_rng *r, unsigned pct)
{
	return stress_below(r, 100) < pct;
}

/* One worker thread, as the modules see it. */
struct stress_worker {
	unsigned index;        /* 0 .. threads-1 */
	struct stress_rng rng; /* derived from the seed and the index */
};

struct stress_module {
	const char *name;
	/* Make the module's shared state for `threads` workers: 0 or an errno. */
	int (*setup)(void **state, unsigned threads, uint64_t seed);
	/* One random API sequence by worker w (w's PRNG decides what). */
	void (*step)(void *state, struct stress_worker *w);
	/* Check the invariants that must hold at any time (called once a second). */
	void (*check)(void *state);
	/*
	 * After every worker has returned: quiesce, check the final
	 * invariants, print the module's counts on out (lines starting with
	 * "NAME: "), free everything.
	 */
	void (*teardown)(void *state, FILE *out);
	/* Library calls made so far (for the progress line). */
	uint64_t (*calls)(void *state);
	/* Run only when -m names it (it needs a server from outside). */
	bool named_only;
};

/*
 * Record a violation of an invariant: the first one is printed with the
 * seed and the command line that reproduces it, the run stops and the
 * exit status is 1. Thread-safe; returns (the caller carries on cleanly).
 */
void stress_fail(const char *module, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* True once the run should wind down (time or iterations up, or a violation). */
bool stress_stopping(void);

/* The CLOCK_MONOTONIC instant ns nanoseconds from now. */
static inline struct timespec stress_after(int64_t ns)
{
	struct timespec ts;
	opq_deadline_after(&ts, ns);
	return ts;
}

/* Nanoseconds on CLOCK_MONOTONIC. */
static inline int64_t stress_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The modules. */
extern const struct stress_module stress_queue;
extern const struct stress_module stress_line;
extern const struct stress_module stress_stage;
extern const struct stress_module stress_lease;
#ifdef HAVE_SQLITE3
extern const struct stress_module stress_lease_sqlite;
#endif
#ifdef HAVE_LIBPQ
extern const struct stress_module stress_lease_pg;
#endif
#ifdef HAVE_ETCD
extern const struct stress_module stress_lease_etcd;
#endif
extern const struct stress_module stress_scope;

/*
 * lease.c's module on another provider of a server (lease_etcd.c): takes
 * `prov`, probes it with one acquire, and draws each handle's lease time
 * from leases (NULL: lease.c's 2..20 ms). The step, check, teardown and
 * calls functions to put in the module.
 */
int stress_lease_setup_remote(void **statep, const char *name, opq_lease_provider *prov,
                              unsigned threads, uint64_t seed, const int64_t leases[4]);
void stress_lease_step(void *state, struct stress_worker *w);
void stress_lease_check(void *state);
void stress_lease_teardown(void *state, FILE *out);
uint64_t stress_lease_calls(void *state);

#endif /* OPQ_STRESS_H */
