/*
 * procs.h: what the lease tests that run real processes and servers
 * (check_lease_pg.c, check_lease_etcd.c) share: bounded waits for a child
 * and for a pipe, and the check of the holds that K processes log on the
 * host's one monotonic clock.
 */
#ifndef OPQ_TEST_PROCS_H
#define OPQ_TEST_PROCS_H

#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

#define MS  1000000LL
#define SEC 1000000000LL

static inline int64_t ts_ns(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * SEC + ts->tv_nsec;
}

static inline void nap_ns(int64_t ns)
{
	struct timespec ts = {.tv_sec = ns / SEC, .tv_nsec = ns % SEC};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* Wait for a child with a bound; kill it if it overruns. Its exit status. */
static inline int child_wait(pid_t pid, int64_t timeout_ns)
{
	int64_t end = t_now_ns() + timeout_ns;
	int st = 0;
	for (;;) {
		pid_t r = waitpid(pid, &st, WNOHANG);
		if (r == pid)
			break;
		if (t_now_ns() > end) {
			kill(pid, SIGKILL);
			waitpid(pid, &st, 0);
			return -1;
		}
		nap_ns(2 * MS);
	}
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* Read exactly len bytes from fd within the bound; false otherwise. */
static inline bool read_full(int fd, void *buf, size_t len, int64_t timeout_ns)
{
	int64_t end = t_now_ns() + timeout_ns;
	size_t got = 0;
	while (got < len) {
		int64_t left = end - t_now_ns();
		if (left <= 0)
			return false;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int r = poll(&p, 1, (int)(left / MS) + 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return false;
		ssize_t n = read(fd, (char *)buf + got, len - got);
		if (n <= 0)
			return false;
		got += (size_t)n;
	}
	return true;
}

/* One hold of the lock by process `who`, as its child logs it. */
struct hold {
	uint64_t token;
	int64_t start, end;
	int who;
};

static inline int cmp_hold(const void *a, const void *b)
{
	const struct hold *x = a, *y = b;
	return x->start < y->start ? -1 : x->start > y->start;
}

/*
 * Read the k * m holds logged in `log` ("token start end who" a line),
 * remove it, and check that no two overlap and that tokens rise with
 * time. Prints a line; returns the holds sorted by start (free them).
 */
static inline struct hold *holds_check(const char *log, int k, int m)
{
	FILE *f = fopen(log, "r");
	ck_assert_ptr_nonnull(f);
	struct hold *h = calloc((size_t)(k * m + 1), sizeof *h);
	ck_assert_ptr_nonnull(h);
	int n = 0;
	while (n <= k * m && fscanf(f, "%" SCNu64 " %" SCNd64 " %" SCNd64 " %d", &h[n].token,
	                            &h[n].start, &h[n].end, &h[n].who) == 4)
		n++;
	fclose(f);
	unlink(log);
	ck_assert_int_eq(n, k * m);
	qsort(h, (size_t)n, sizeof *h, cmp_hold);
	int switches = 0;
	for (int i = 1; i < n; i++) {
		ck_assert_msg(h[i - 1].end < h[i].start, "holds %d and %d overlap", i - 1, i);
		ck_assert_msg(h[i - 1].token < h[i].token, "token %" PRIu64 " then %" PRIu64,
		              h[i - 1].token, h[i].token);
		switches += h[i].who != h[i - 1].who;
	}
	printf("exclusion: %d processes x %d holds, %d owner switches, tokens %" PRIu64 "..%" PRIu64
	       "\n",
	       k, m, switches, h[0].token, h[n - 1].token);
	return h;
}

/*
 * Run child(who, m, log) in k processes (it logs its holds and _exits 0),
 * wait for them all, and check their holds (holds_check).
 */
static inline struct hold *exclusion_run(int k, int m, void (*child)(int, int, const char *))
{
	char log[] = "/tmp/opq_excl_XXXXXX";
	int fd = mkstemp(log);
	ck_assert_int_ge(fd, 0);
	close(fd);
	pid_t pids[k];
	for (int i = 0; i < k; i++) {
		pids[i] = fork();
		ck_assert_int_ge(pids[i], 0);
		if (pids[i] == 0)
			child(i, m, log);
	}
	for (int i = 0; i < k; i++)
		ck_assert_int_eq(child_wait(pids[i], 100 * SEC), 0);
	return holds_check(log, k, m);
}

#endif /* OPQ_TEST_PROCS_H */
