/*
 * lease-bench: acquire + release pairs per second on each lease provider
 * the build has, in one run, side by side: memory, SQLite (a database file
 * made in TMPDIR for the run), PostgreSQL (the server OPQ_PG_CONNINFO
 * names) and etcd (the members OPQ_ETCD_ENDPOINTS lists); a provider
 * whose variable is unset is left out. For each: one thread on one lock,
 * then T threads each on a lock of its own (the store's throughput), N
 * pairs per thread, the median of K runs. Not installed; run it against
 * the test servers:
 *   tests/pgserver.sh tests/etcdcluster.sh _build/d/tools/lease-bench [N [T [K]]]
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <opqueue.h>
#ifdef HAVE_SQLITE3
#include <opqueue/lease_sqlite.h>
#endif
#ifdef HAVE_LIBPQ
#include <opqueue/lease_pg.h>
#endif
#ifdef HAVE_ETCD
#include <opqueue/lease_etcd.h>
#endif

static int N = 200, T = 4, K = 3;

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct job {
	opq_lease_provider *p;
	int index;
	int failed;
};

static void *pairs(void *arg)
{
	struct job *j = arg;
	char name[32];
	snprintf(name, sizeof(name), "bench-%d-%d", j->index, (int)getpid());
	opq_lease *l;
	if (opq_lease_create(&l, j->p, name, NULL)) {
		j->failed = 1;
		return NULL;
	}
	for (int i = 0; i < N; i++)
		if (opq_lease_try_acquire(l, NULL) || opq_lease_release(l))
			j->failed = 1;
	opq_lease_destroy(l);
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Pairs per second with t threads, the median of K runs (0: a call failed). */
static double rate(opq_lease_provider *p, int t)
{
	double r[16];
	for (int k = 0; k < K; k++) {
		pthread_t th[64];
		struct job jobs[64];
		double t0 = now_s();
		for (int i = 0; i < t; i++) {
			jobs[i] = (struct job){p, i, 0};
			pthread_create(&th[i], NULL, pairs, &jobs[i]);
		}
		int failed = 0;
		for (int i = 0; i < t; i++) {
			pthread_join(th[i], NULL);
			failed |= jobs[i].failed;
		}
		if (failed)
			return 0;
		r[k] = (double)N * t / (now_s() - t0);
	}
	qsort(r, (size_t)K, sizeof(r[0]), cmp);
	return r[K / 2];
}

static void row(const char *name, opq_lease_provider *p)
{
	if (!p) {
		printf("%-34s %12s %12s\n", name, "-", "-");
		return;
	}
	double one = rate(p, 1), many = rate(p, T);
	printf("%-34s %12.0f %12.0f\n", name, one, many);
	opq_lease_provider_destroy(p);
}

int main(int argc, char **argv)
{
	if (argc > 1)
		N = atoi(argv[1]);
	if (argc > 2)
		T = atoi(argv[2]);
	if (argc > 3)
		K = atoi(argv[3]);
	if (N < 1 || T < 1 || T > 64 || K < 1 || K > 16) {
		fprintf(stderr, "usage: lease-bench [pairs [threads (1..64) [runs (1..16)]]]\n");
		return 2;
	}
	char err[512];
	printf("acquire+release pairs per second, %d pairs a thread, median of %d runs\n", N, K);
	char many[32];
	snprintf(many, sizeof(many), "%d threads", T);
	printf("%-34s %12s %12s\n", "provider", "1 thread", many);
	opq_lease_provider *p = NULL;
	opq_lease_provider_memory_create(&p);
	row("memory", p);
#ifdef HAVE_SQLITE3
	char path[4096];
	const char *dir = getenv("TMPDIR");
	snprintf(path, sizeof(path), "%s/lease-bench-XXXXXX", dir && *dir ? dir : "/tmp");
	int fd = mkstemp(path);
	p = NULL;
	if (fd >= 0) {
		close(fd);
		if (opq_lease_provider_sqlite_create(&p, path, err, sizeof(err)))
			fprintf(stderr, "sqlite: %s\n", err);
	}
	row("SQLite (a file in TMPDIR)", p);
	if (fd >= 0) {
		static const char *const sfx[] = {"", "-wal", "-shm", "-journal"};
		for (int i = 0; i < 4; i++) {
			char f[4200];
			snprintf(f, sizeof(f), "%s%s", path, sfx[i]);
			unlink(f);
		}
	}
#endif
#ifdef HAVE_LIBPQ
	const char *ci = getenv("OPQ_PG_CONNINFO");
	p = NULL;
	if (ci && opq_lease_provider_pg_create(&p, ci, NULL, err, sizeof(err)))
		fprintf(stderr, "pg: %s\n", err);
	row("PostgreSQL (OPQ_PG_CONNINFO)", p);
#endif
#ifdef HAVE_ETCD
	const char *eps = getenv("OPQ_ETCD_ENDPOINTS");
	p = NULL;
	opq_lease_etcd *e = NULL;
	if (eps && opq_lease_etcd_create(&e, eps, NULL, err, sizeof(err)) == 0) {
		opq_lease_provider_etcd_create(&p, e);
		opq_lease_etcd_destroy(e);
	} else if (eps) {
		fprintf(stderr, "etcd: %s\n", err);
	}
	row("etcd (OPQ_ETCD_ENDPOINTS)", p);
#endif
	return 0;
}
