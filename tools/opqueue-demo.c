/*
 * opqueue-demo: the README's main job. It shows the operation queue doing
 * real work: it counts the primes below a limit by splitting the range into
 * chunks, each a caller-boxed operation (no allocation per operation), fed
 * through a bounded queue (backpressure) into one runner per core; then it
 * checks the answer against a single-threaded count and prints the queue's
 * statistics.
 *
 * Then the line, on real sockets: a token service on 127.0.0.1 whose
 * tokens expire every K requests, and request operations that meet the
 * 401s either with a line (exactly one re-authentication per expiry) or
 * naively (one per 401). See authdemo.h.
 *
 * usage: opqueue-demo [-h] [-n LIMIT] [-r RUNNERS] [-c CHUNK] [-q REQUESTS] [-k EXPIRE_AFTER]
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <opqueue.h>

#include "authdemo.h"

struct chunk {
	opq_op op; /* the queue's header, embedded */
	uint64_t lo, hi;
	uint64_t primes;
	atomic_uint_fast64_t *total;
};

static int is_prime(uint64_t n)
{
	if (n < 2)
		return 0;
	if (n % 2 == 0)
		return n == 2;
	for (uint64_t d = 3; d * d <= n; d += 2)
		if (n % d == 0)
			return 0;
	return 1;
}

static uint64_t count_primes(uint64_t lo, uint64_t hi)
{
	uint64_t c = 0;
	for (uint64_t n = lo; n < hi; n++)
		c += (uint64_t)is_prime(n);
	return c;
}

static void chunk_perform(opq_op *op)
{
	struct chunk *c = OPQ_CONTAINER_OF(op, struct chunk, op);
	c->primes = count_primes(c->lo, c->hi);
	atomic_fetch_add(c->total, c->primes);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int fail(const char *what, int rc)
{
	fprintf(stderr, "opqueue-demo: %s: %s\n", what, strerror(rc));
	return 1;
}

int main(int argc, char **argv)
{
	uint64_t limit = 4000000, chunk = 20000;
	unsigned requests = 2000, expire_after = 50;
	long cores = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned runners = cores > 0 ? (unsigned)cores : 2;
	int opt;
	while ((opt = getopt(argc, argv, "n:r:c:q:k:h")) != -1) {
		switch (opt) {
		case 'n':
			limit = strtoull(optarg, NULL, 10);
			break;
		case 'r':
			runners = (unsigned)strtoul(optarg, NULL, 10);
			break;
		case 'c':
			chunk = strtoull(optarg, NULL, 10);
			break;
		case 'q':
			requests = (unsigned)strtoul(optarg, NULL, 10);
			break;
		case 'k':
			expire_after = (unsigned)strtoul(optarg, NULL, 10);
			break;
		default:
			fprintf(opt == 'h' ? stdout : stderr,
			        "usage: opqueue-demo [-h] [-n LIMIT] [-r RUNNERS] "
			        "[-c CHUNK] [-q REQUESTS] [-k EXPIRE_AFTER]\n");
			return opt == 'h' ? 0 : 2;
		}
	}
	if (chunk == 0 || runners == 0 || limit == 0 || requests == 0 || expire_after == 0) {
		fprintf(stderr, "opqueue-demo: every argument must be positive\n");
		return 2;
	}
	if (runners > 256) {
		fprintf(stderr, "opqueue-demo: -r takes 1 to 256 runners\n");
		return 2;
	}
	size_t nchunks = (size_t)((limit + chunk - 1) / chunk);
	struct chunk *chunks = calloc(nchunks, sizeof(*chunks));
	if (!chunks)
		return fail("calloc", ENOMEM);
	atomic_uint_fast64_t total = 0;

	printf("opqueue %s demo: primes below %llu in %zu operations on %u runners\n",
	       opq_version(), (unsigned long long)limit, nchunks, runners);

	opq_queue_attr *attr;
	opq_queue *q;
	int rc = opq_queue_attr_create(&attr);
	if (rc)
		return fail("opq_queue_attr_create", rc);
	opq_queue_attr_set_capacity(attr, 4 * (size_t)runners); /* backpressure */
	opq_queue_attr_set_name(attr, "demo");
	rc = opq_queue_create(&q, attr);
	opq_queue_attr_destroy(attr);
	if (rc)
		return fail("opq_queue_create", rc);
	if ((rc = opq_queue_start(q, runners)))
		return fail("opq_queue_start", rc);

	double t0 = now_s();
	for (size_t i = 0; i < nchunks; i++) {
		struct chunk *c = &chunks[i];
		opq_op_init(&c->op, chunk_perform, NULL);
		c->lo = i * chunk;
		c->hi = c->lo + chunk < limit ? c->lo + chunk : limit;
		c->total = &total;
		if ((rc = opq_queue_enqueue(q, &c->op))) /* blocks while the queue is full */
			return fail("opq_queue_enqueue", rc);
	}
	if ((rc = opq_queue_stop(q, OPQ_STOP_DRAIN))) /* performs the rest, joins runners */
		return fail("opq_queue_stop", rc);
	double parallel = now_s() - t0;

	opq_queue_stats st;
	opq_queue_stats_get(q, &st);
	opq_queue_destroy(q);

	t0 = now_s();
	uint64_t expect = count_primes(0, limit);
	double serial = now_s() - t0;

	uint64_t got = atomic_load(&total), sum = 0;
	for (size_t i = 0; i < nchunks; i++)
		sum += chunks[i].primes;
	free(chunks);

	printf("primes found:        %llu (single thread: %llu) %s\n", (unsigned long long)got,
	       (unsigned long long)expect, got == expect && sum == expect ? "OK" : "MISMATCH");
	printf("operations:          %llu completed, %llu discarded, queue high-water %llu of %u\n",
	       (unsigned long long)st.completed, (unsigned long long)st.discarded,
	       (unsigned long long)st.high_water, 4 * runners);
	printf("time:                %.3f s on %u runners, %.3f s on one thread (%.2fx)\n",
	       parallel, runners, serial, serial / parallel);
	int ok = got == expect && sum == expect && st.completed == nchunks;

	/* The line: 8 request operations in flight against an expiring token. */
	printf(
	    "\nline: %u requests on 8 runners, tokens expire every %u requests (127.0.0.1/TCP)\n",
	    requests, expire_after);
	printf("%-8s %9s %6s %9s %9s %8s %7s %8s\n", "client", "requests", "401s", "expiries",
	       "re-auths", "retries", "failed", "time s");
	for (int use_line = 1; use_line >= 0; use_line--) {
		struct authdemo_result r;
		rc = authdemo_run(8, requests, expire_after, use_line, &r);
		if (rc)
			return fail("authdemo_run", rc);
		printf("%-8s %9llu %6llu %9llu %9llu %8llu %7llu %8.3f\n",
		       use_line ? "line" : "naive", (unsigned long long)r.requests,
		       (unsigned long long)r.unauthorized, (unsigned long long)r.expiries,
		       (unsigned long long)r.reauths, (unsigned long long)r.retries,
		       (unsigned long long)r.failed, r.seconds);
		if (use_line)
			ok = ok && r.reauths == r.expiries && r.ok == requests && r.failed == 0;
	}
	printf("with the line, re-auths equal expiries: %s\n", ok ? "OK" : "MISMATCH");
	return ok ? 0 : 1;
}
