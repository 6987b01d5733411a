/*
 * check_lease_sqlite.c: the SQLite lease provider with real processes and
 * real database files (in a mkdtemp directory): bad input, tokens across
 * closing and reopening the database, rows from another boot, K processes
 * contending (holding intervals never overlap, tokens strictly increase),
 * takeover after `kill -9` of the holder (not before the lease ran out,
 * not much after), and the guarded write of a stale holder refused.
 */
#define _GNU_SOURCE 1 /* CLOCK_BOOTTIME, mkdtemp */
#include "harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "opqueue/lease_sqlite.h"

#define MS 1000000LL

static char dir[256];
static char db_path[300];

static int64_t ts_ns(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static void setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/opq-lease-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(db_path, sizeof(db_path), "%s/locks.db", dir);
}

static void teardown(void)
{
	char cmd[400];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
}

static opq_lease_provider *open_store(void)
{
	char err[256];
	opq_lease_provider *p = NULL;
	int rc = opq_lease_provider_sqlite_create(&p, db_path, err, sizeof(err));
	ck_assert_msg(rc == 0, "open %s: %d %s", db_path, rc, err);
	return p;
}

static opq_lease *mk(opq_lease_provider *p, const char *name, const char *owner, int64_t lease_ns,
                     int64_t poll_max)
{
	opq_lease_attr *a;
	ck_assert_int_eq(opq_lease_attr_create(&a), 0);
	if (owner)
		ck_assert_int_eq(opq_lease_attr_set_owner(a, owner), 0);
	ck_assert_int_eq(opq_lease_attr_set_duration(a, lease_ns), 0);
	ck_assert_int_eq(opq_lease_attr_set_margin(a, 10000, 1 * MS), 0);
	ck_assert_int_eq(opq_lease_attr_set_poll(a, 1 * MS, poll_max), 0);
	opq_lease *l = NULL;
	ck_assert_int_eq(opq_lease_create(&l, p, name, a), 0);
	opq_lease_attr_destroy(a);
	return l;
}

START_TEST(test_bad_input)
{
	char err[256];
	opq_lease_provider *p = NULL;
	ck_assert_int_eq(opq_lease_provider_sqlite_create(NULL, db_path, err, sizeof(err)), EINVAL);
	ck_assert_int_eq(opq_lease_provider_sqlite_create(&p, NULL, err, sizeof(err)), EINVAL);
	ck_assert_int_eq(opq_lease_provider_sqlite_create(&p, "", err, sizeof(err)), EINVAL);
	ck_assert_int_eq(opq_lease_provider_sqlite_create(&p, db_path, NULL, 5), EINVAL);
	/* a directory that does not exist */
	char path[400];
	snprintf(path, sizeof(path), "%s/no/such/dir/x.db", dir);
	int rc = opq_lease_provider_sqlite_create(&p, path, err, sizeof(err));
	ck_assert_int_eq(rc, ENOENT);
	ck_assert_ptr_null(p);
	ck_assert_msg(strstr(err, path) && strstr(err, "open"), "words: %s", err);
	/* a directory the process may search but not write in: EACCES, not
	 * ENOENT (as root, which may write anywhere, a child that is nobody
	 * tries; it may search the test's directory and this one) */
	ck_assert_int_eq(chmod(dir, 0711), 0);
	snprintf(path, sizeof(path), "%s/locked", dir);
	ck_assert_int_eq(mkdir(path, 0755), 0);
	ck_assert_int_eq(chmod(path, 0555), 0);
	snprintf(path, sizeof(path), "%s/locked/x.db", dir);
	int pfd[2];
	ck_assert_int_eq(pipe(pfd), 0);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(pfd[0]);
		if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
			_exit(3);
		int crc = opq_lease_provider_sqlite_create(&p, path, err, sizeof(err));
		dprintf(pfd[1], "%d %s", crc, err);
		_exit(crc == EACCES && p == NULL && strstr(err, "open") ? 0 : 4);
	}
	close(pfd[1]);
	char got[300] = "";
	ssize_t gn = read(pfd[0], got, sizeof(got) - 1);
	close(pfd[0]);
	got[gn > 0 ? gn : 0] = '\0';
	int status;
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d, child got: %s",
	              status, got);
	/* a file that is not a database */
	snprintf(path, sizeof(path), "%s/junk", dir);
	FILE *f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	for (int i = 0; i < 200; i++)
		fputs("this is certainly not an SQLite database file\n", f);
	fclose(f);
	rc = opq_lease_provider_sqlite_create(&p, path, err, sizeof(err));
	ck_assert_int_eq(rc, EIO);
	ck_assert_ptr_null(p);
	ck_assert_msg(strstr(err, "not a database"), "words: %s", err);
	/* errbuf NULL with errlen 0 is fine; the good path still works */
	rc = opq_lease_provider_sqlite_create(&p, path, NULL, 0);
	ck_assert_int_eq(rc, EIO);
	p = open_store();
	opq_lease *l = mk(p, "x", "A", 1000 * MS, 10 * MS);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	ck_assert_uint_eq(g.token, 1);
	ck_assert_int_eq(opq_lease_provider_destroy(p), EBUSY);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* The token rules, and tokens surviving a close and reopen (store restart). */
START_TEST(test_tokens_and_restart)
{
	opq_lease_provider *p = open_store();
	opq_lease *a = mk(p, "r", "A", 10000 * MS, 10 * MS);
	opq_lease *b = mk(p, "r", "B", 1000 * MS, 10 * MS);
	opq_lease_grant g, g2;
	ck_assert_int_eq(opq_lease_try_acquire(a, &g), 0);
	ck_assert_uint_eq(g.token, 1);
	ck_assert_int_eq(opq_lease_try_acquire(a, &g2), 0); /* same owner: same token */
	ck_assert_uint_eq(g2.token, 1);
	ck_assert_int_eq(opq_lease_refresh(a, &g2), 0);
	ck_assert_uint_eq(g2.token, 1);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, &g), 0);
	ck_assert_uint_eq(g.token, 2);
	ck_assert_int_eq(opq_lease_release(a), 0); /* stale: B keeps it */
	ck_assert_int_eq(opq_lease_try_acquire(a, NULL), EBUSY);
	/* B's lease runs out; A takes over; B's refresh is refused */
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_lease_acquire(a, &dl, &g), 0);
	ck_assert_uint_eq(g.token, 3);
	ck_assert_int_eq(opq_lease_refresh(b, NULL), ENOLCK);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	/* reopen: the lock is still held by A (the row survived), and the
	 * next token is 4 */
	p = open_store();
	a = mk(p, "r", "A", 150 * MS, 10 * MS);
	b = mk(p, "r", "B", 150 * MS, 10 * MS);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
	ck_assert_int_eq(opq_lease_try_acquire(a, &g), 0);
	ck_assert_uint_eq(g.token, 3); /* A already held it: same token */
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, &g), 0);
	ck_assert_uint_eq(g.token, 4);
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

static void sql_exec(const char *sql)
{
	sqlite3 *db;
	ck_assert_int_eq(sqlite3_open(db_path, &db), SQLITE_OK);
	sqlite3_busy_timeout(db, 5000);
	char *msg = NULL;
	int src = sqlite3_exec(db, sql, NULL, NULL, &msg);
	ck_assert_msg(src == SQLITE_OK, "%s: %s", sql, msg ? msg : "?");
	sqlite3_close(db);
}

/* A row written in another boot is expired: its holder died with the reboot. */
START_TEST(test_other_boot)
{
	opq_lease_provider *p = open_store();
	opq_lease *a = mk(p, "boot", "A", 3600 * 1000 * MS, 10 * MS);
	opq_lease *b = mk(p, "boot", "B", 3600 * 1000 * MS, 10 * MS);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(a, &g), 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
	/* as if written before a reboot: another boot id, an expiry far ahead */
	sql_exec("UPDATE opq_lease SET boot_id = '00000000-0000-0000-0000-000000000000',"
	         " expiry_ns = 9000000000000000000 WHERE name = 'boot'");
	ck_assert_int_eq(opq_lease_try_acquire(b, &g), 0);
	ck_assert_uint_eq(g.token, 2);
	ck_assert_int_eq(opq_lease_refresh(a, NULL), ENOLCK);
	ck_assert_int_eq(opq_lease_refresh(b, NULL), 0);
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- processes -------------------------------------------------------------- */

#define K_PROCS 4

/* A child contending for the lock: exit status 0 when all went well. */
static int contender(int id, long iters, const char *log_path)
{
	char err[256];
	opq_lease_provider *p;
	if (opq_lease_provider_sqlite_create(&p, db_path, err, sizeof(err)) != 0)
		return 10;
	opq_lease_attr *a;
	char owner[32];
	snprintf(owner, sizeof(owner), "proc-%d", id);
	if (opq_lease_attr_create(&a) || opq_lease_attr_set_owner(a, owner) ||
	    opq_lease_attr_set_duration(a, 30000 * MS) ||
	    opq_lease_attr_set_poll(a, 1 * MS, 10 * MS))
		return 11;
	opq_lease *l;
	if (opq_lease_create(&l, p, "mx", a))
		return 12;
	opq_lease_attr_destroy(a);
	int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT, 0644);
	if (fd < 0)
		return 13;
	for (long i = 0; i < iters; i++) {
		struct timespec dl = t_deadline(120 * 1000 * MS);
		opq_lease_grant g;
		int rc = opq_lease_acquire(l, &dl, &g);
		if (rc) {
			opq_lease_error(l, err, sizeof(err));
			fprintf(stderr, "proc %d: acquire %d %s\n", id, rc, err);
			return 14;
		}
		int64_t start = t_now_ns();
		struct timespec nap = {0, 200000}; /* hold it a little */
		nanosleep(&nap, NULL);
		int64_t end = t_now_ns();
		char line[128];
		int n = snprintf(line, sizeof(line), "%llu %lld %lld %d\n",
		                 (unsigned long long)g.token, (long long)start, (long long)end, id);
		if (write(fd, line, (size_t)n) != n)
			return 15;
		if (opq_lease_release(l))
			return 16;
	}
	close(fd);
	if (opq_lease_destroy(l) || opq_lease_provider_destroy(p))
		return 17;
	return 0;
}

struct entry {
	unsigned long long token;
	long long start, end;
	int id;
};

static int by_start(const void *x, const void *y)
{
	const struct entry *a = x, *b = y;
	return a->start < b->start ? -1 : a->start > b->start;
}

START_TEST(test_processes_exclude)
{
	/* create the table first so that the children only contend for rows */
	opq_lease_provider *p = open_store();
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	char log_path[400];
	snprintf(log_path, sizeof(log_path), "%s/holders.log", dir);
	long iters = t_scale(40);
	pid_t pid[K_PROCS];
	for (int i = 0; i < K_PROCS; i++) {
		pid[i] = fork();
		ck_assert_int_ge(pid[i], 0);
		if (pid[i] == 0)
			_exit(contender(i, iters, log_path));
	}
	for (int i = 0; i < K_PROCS; i++) {
		int st;
		ck_assert_int_eq(waitpid(pid[i], &st, 0), pid[i]);
		ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %d: status %d", i, st);
	}
	FILE *f = fopen(log_path, "r");
	ck_assert_ptr_nonnull(f);
	long n = K_PROCS * iters;
	struct entry *e = calloc((size_t)n + 1, sizeof(*e));
	long got = 0;
	while (got <= n && fscanf(f, "%llu %lld %lld %d", &e[got].token, &e[got].start, &e[got].end,
	                          &e[got].id) == 4)
		got++;
	fclose(f);
	ck_assert_int_eq(got, n);
	qsort(e, (size_t)n, sizeof(*e), by_start);
	int ids_seen = 0;
	for (long i = 0; i < n; i++) {
		ids_seen |= 1 << e[i].id;
		if (i == 0)
			continue;
		ck_assert_msg(e[i].start >= e[i - 1].end, "intervals %ld and %ld overlap", i - 1,
		              i);
		ck_assert_msg(e[i].token > e[i - 1].token, "token %llu after %llu", e[i].token,
		              e[i - 1].token);
	}
	ck_assert_int_eq(ids_seen, (1 << K_PROCS) - 1);
	free(e);
}
END_TEST

/*
 * Crash: a child acquires with lease L and is killed with SIGKILL; this
 * process's blocking acquire takes over once L has run out, not before,
 * and within poll max + slack after.
 */
START_TEST(test_crash_takeover)
{
	const int64_t L = 500 * MS, POLL_MAX = 20 * MS;
	opq_lease_provider *p0 = open_store();
	ck_assert_int_eq(opq_lease_provider_destroy(p0), 0);
	int fds[2];
	ck_assert_int_eq(pipe(fds), 0);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(fds[0]);
		char err[256];
		opq_lease_provider *p;
		if (opq_lease_provider_sqlite_create(&p, db_path, err, sizeof(err)))
			_exit(1);
		opq_lease_attr *a;
		opq_lease *l;
		if (opq_lease_attr_create(&a) || opq_lease_attr_set_owner(a, "victim") ||
		    opq_lease_attr_set_duration(a, L) || opq_lease_create(&l, p, "crash", a))
			_exit(2);
		opq_lease_grant g;
		if (opq_lease_try_acquire(l, &g))
			_exit(3);
		int64_t times[2] = {ts_ns(&g.acquired), t_now_ns()};
		if (write(fds[1], times, sizeof(times)) != (ssize_t)sizeof(times))
			_exit(4);
		for (;;)
			pause();
	}
	close(fds[1]);
	int64_t times[2];
	ck_assert_int_eq(read(fds[0], times, sizeof(times)), (ssize_t)sizeof(times));
	close(fds[0]);
	ck_assert_int_eq(kill(pid, SIGKILL), 0);
	int st;
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert(WIFSIGNALED(st));
	opq_lease_provider *p = open_store();
	opq_lease *l = mk(p, "crash", "heir", L, POLL_MAX);
	ck_assert_int_eq(opq_lease_try_acquire(l, NULL), EBUSY);
	struct timespec dl = t_deadline(T_WAIT_NS);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_acquire(l, &dl, &g), 0);
	int64_t won = t_now_ns();
	ck_assert_uint_eq(g.token, 2);
	/* not before the victim's lease ran out (from its instant before sending) */
	ck_assert_int_ge(won, times[0] + L);
	/* and not much after: its store expiry is at most times[1] + L */
	int64_t late = won - (times[1] + L);
	fprintf(stderr,
	        "check_lease_sqlite: takeover %.1f ms after the lease ran out "
	        "(lease %lld ms, poll max %lld ms)\n",
	        (double)late / 1e6, (long long)(L / MS), (long long)(POLL_MAX / MS));
	ck_assert_int_lt(late, POLL_MAX + 250 * MS);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- the guard for the user's own writes --------------------------------------- */

static int64_t boot_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void boot_id(char *buf, size_t len)
{
	FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
	ck_assert_ptr_nonnull(f);
	ck_assert_ptr_nonnull(fgets(buf, (int)len, f));
	fclose(f);
	buf[strcspn(buf, "\n")] = '\0';
}

/* The guarded write with opq_lease_held (opq_lease_sqlite_held_register):
 * 1 when the row was written, 0 when refused. */
static int held_write(sqlite3 *db, const char *name, uint64_t token, const char *value)
{
	ck_assert_int_eq(sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK);
	sqlite3_stmt *st;
	ck_assert_int_eq(sqlite3_prepare_v2(db,
	                                    "UPDATE account SET v = ?1 WHERE id = 1"
	                                    " AND opq_lease_held(?2, ?3)",
	                                    -1, &st, NULL),
	                 SQLITE_OK);
	sqlite3_bind_text(st, 1, value, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 3, (int64_t)token);
	ck_assert_int_eq(sqlite3_step(st), SQLITE_DONE);
	int changed = sqlite3_changes(db);
	sqlite3_finalize(st);
	ck_assert_int_eq(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
	return changed;
}

/* opq_lease_held(name, token) as a value: 1, 0, or -1 for NULL. */
static int held_value(sqlite3 *db, const char *sql)
{
	sqlite3_stmt *st;
	ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
	ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
	int v = sqlite3_column_type(st, 0) == SQLITE_NULL ? -1 : sqlite3_column_int(st, 0);
	sqlite3_finalize(st);
	return v;
}

/* The documented guarded write by hand: 1 when the row was written, 0 when refused. */
static int guarded_write(sqlite3 *db, const char *name, const char *owner, uint64_t token,
                         const char *value)
{
	ck_assert_int_eq(sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK);
	char boot[64];
	boot_id(boot, sizeof(boot));
	sqlite3_stmt *st;
	ck_assert_int_eq(
	    sqlite3_prepare_v2(db,
	                       "UPDATE account SET v = ?1 WHERE id = 1 AND EXISTS"
	                       " (SELECT 1 FROM opq_lease WHERE name = ?2 AND owner = ?3"
	                       " AND token = ?4 AND held = 1 AND boot_id = ?5"
	                       " AND expiry_ns > ?6)",
	                       -1, &st, NULL),
	    SQLITE_OK);
	sqlite3_bind_text(st, 1, value, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 3, owner, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 4, (int64_t)token);
	sqlite3_bind_text(st, 5, boot, -1, SQLITE_TRANSIENT);
	sqlite3_bind_int64(st, 6, boot_now()); /* taken inside the transaction */
	ck_assert_int_eq(sqlite3_step(st), SQLITE_DONE);
	int changed = sqlite3_changes(db);
	sqlite3_finalize(st);
	ck_assert_int_eq(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
	return changed;
}

static void read_value(sqlite3 *db, char *buf, size_t len)
{
	sqlite3_stmt *st;
	ck_assert_int_eq(
	    sqlite3_prepare_v2(db, "SELECT v FROM account WHERE id = 1", -1, &st, NULL), SQLITE_OK);
	ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
	snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
	sqlite3_finalize(st);
}

START_TEST(test_guarded_write)
{
	opq_lease_provider *p = open_store();
	sql_exec("CREATE TABLE account (id INTEGER PRIMARY KEY, v TEXT);"
	         "INSERT INTO account VALUES (1, 'initial')");
	sqlite3 *db;
	ck_assert_int_eq(sqlite3_open(db_path, &db), SQLITE_OK);
	sqlite3_busy_timeout(db, 5000);
	const int64_t L = 200 * MS;
	opq_lease *a = mk(p, "acct", "A", L, 5 * MS);
	opq_lease *b = mk(p, "acct", "B", L, 5 * MS);
	opq_lease_grant ga, gb;
	ck_assert_int_eq(opq_lease_try_acquire(a, &ga), 0);
	ck_assert_int_eq(guarded_write(db, "acct", "A", ga.token, "by A"), 1);
	/* a wrong token or owner is refused even while A holds */
	ck_assert_int_eq(guarded_write(db, "acct", "A", ga.token + 1, "forged"), 0);
	ck_assert_int_eq(guarded_write(db, "acct", "B", ga.token, "forged"), 0);
	/* A pauses past its lease: refused by the expiry condition alone */
	struct timespec dl = t_deadline(L + 20 * MS);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL) == EINTR)
		;
	ck_assert_int_eq(guarded_write(db, "acct", "A", ga.token, "late A"), 0);
	/* B takes over; A's stale write stays refused, B's goes through */
	ck_assert_int_eq(opq_lease_try_acquire(b, &gb), 0);
	ck_assert_uint_gt(gb.token, ga.token);
	ck_assert_int_eq(guarded_write(db, "acct", "A", ga.token, "stale A"), 0);
	ck_assert_int_eq(guarded_write(db, "acct", "B", gb.token, "by B"), 1);
	char v[32];
	read_value(db, v, sizeof(v));
	ck_assert_str_eq(v, "by B");
	/* after release nobody's write goes through */
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(guarded_write(db, "acct", "B", gb.token, "after release"), 0);
	read_value(db, v, sizeof(v));
	ck_assert_str_eq(v, "by B");

	/* The same with the helper, opq_lease_held(name, token) */
	ck_assert_int_eq(opq_lease_sqlite_held_register(NULL), EINVAL);
	ck_assert_int_eq(opq_lease_sqlite_held_register(db), 0);
	ck_assert_int_eq(held_value(db, "SELECT opq_lease_held('acct', NULL)"), -1);
	ck_assert_int_eq(held_value(db, "SELECT opq_lease_held(NULL, 1)"), -1);
	ck_assert_int_eq(held_value(db, "SELECT opq_lease_held('no such lock', 1)"), 0);
	ck_assert_int_eq(opq_lease_try_acquire(a, &ga), 0);
	ck_assert_uint_gt(ga.token, gb.token);
	ck_assert_int_eq(held_write(db, "acct", ga.token, "held by A"), 1);
	ck_assert_int_eq(held_write(db, "acct", ga.token + 1, "forged"), 0);
	ck_assert_int_eq(held_write(db, "acct", gb.token, "stale B"), 0);
	ck_assert_int_eq(held_write(db, "other", ga.token, "other lock"), 0);
	dl = t_deadline(L + 20 * MS); /* A pauses past its lease */
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL) == EINTR)
		;
	ck_assert_int_eq(held_write(db, "acct", ga.token, "late A"), 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, &gb), 0);
	ck_assert_int_eq(held_write(db, "acct", ga.token, "stale A"), 0);
	ck_assert_int_eq(held_write(db, "acct", gb.token, "held by B"), 1);
	/* a row from another boot is not held, whatever its expiry */
	sql_exec("UPDATE opq_lease SET boot_id = '00000000-0000-0000-0000-000000000000',"
	         " expiry_ns = 9000000000000000000 WHERE name = 'acct'");
	ck_assert_int_eq(held_write(db, "acct", gb.token, "other boot"), 0);
	read_value(db, v, sizeof(v));
	ck_assert_str_eq(v, "held by B");
	ck_assert_int_eq(opq_lease_release(b), 0);
	sqlite3_close(db);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* Threads of one process share one provider (one connection under a mutex). */
struct th_arg {
	opq_lease_provider *p;
	int id;
	long iters;
	atomic_int *holders;
	atomic_int *max;
};

static void *th_main(void *arg)
{
	struct th_arg *t = arg;
	char owner[16];
	snprintf(owner, sizeof(owner), "t%d", t->id);
	opq_lease *l = mk(t->p, "th", owner, 30000 * MS, 5 * MS);
	for (long i = 0; i < t->iters; i++) {
		struct timespec dl = t_deadline(T_WAIT_NS);
		ck_assert_int_eq(opq_lease_acquire(l, &dl, NULL), 0);
		int h = atomic_fetch_add(t->holders, 1) + 1;
		if (h > atomic_load(t->max))
			atomic_store(t->max, h);
		sched_yield();
		atomic_fetch_sub(t->holders, 1);
		ck_assert_int_eq(opq_lease_release(l), 0);
	}
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	return NULL;
}

START_TEST(test_threads_share_provider)
{
	opq_lease_provider *p = open_store();
	atomic_int holders = 0, max = 0;
	pthread_t th[4];
	struct th_arg args[4];
	for (int i = 0; i < 4; i++) {
		args[i] = (struct th_arg){p, i, t_scale(30), &holders, &max};
		ck_assert_int_eq(pthread_create(&th[i], NULL, th_main, &args[i]), 0);
	}
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(pthread_join(th[i], NULL), 0);
	ck_assert_int_eq(atomic_load(&max), 1);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- a locked database: waited for, never a spurious failure ------------------- */

struct locker {
	int64_t hold_ns;
	struct t_gate locked;
	int64_t unlocked_at;
};

static void *locker_main(void *arg)
{
	struct locker *k = arg;
	sqlite3 *db;
	ck_assert_int_eq(sqlite3_open(db_path, &db), SQLITE_OK);
	ck_assert_int_eq(sqlite3_exec(db, "BEGIN EXCLUSIVE", NULL, NULL, NULL), SQLITE_OK);
	t_gate_open(&k->locked);
	struct timespec until = t_deadline(k->hold_ns);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
		;
	k->unlocked_at = t_now_ns();
	ck_assert_int_eq(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	return NULL;
}

START_TEST(test_locked_database)
{
	opq_lease_provider *p = open_store();
	opq_lease *l = mk(p, "busy", "A", 10000 * MS, 10 * MS);
	opq_lease_grant g;
	/* locked for 300 ms: the acquire waits and succeeds */
	struct locker k = {.hold_ns = 300 * MS};
	t_gate_init(&k.locked);
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, locker_main, &k), 0);
	ck_assert(t_gate_wait(&k.locked));
	int64_t t0 = t_now_ns();
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	int64_t waited = t_now_ns() - t0;
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_int_ge(t_now_ns(), k.unlocked_at);
	ck_assert_int_gt(waited, 200 * MS);
	t_gate_destroy(&k.locked);
	ck_assert_int_eq(opq_lease_refresh(l, NULL), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- deadlines against a database another process keeps locked ------------------ */

/* How late a call may return past its deadline in these tests: SQLite's
 * slack is a few ms (a busy-handler step is cut at the deadline); the rest
 * is for loaded machines and sanitizers. */
static int64_t slack_ns(void)
{
	const char *m = getenv("CK_TIMEOUT_MULTIPLIER");
	int k = m && atoi(m) > 1 ? atoi(m) : 1;
	return 250 * MS * k;
}

/*
 * A process that locks a database file when told: forked before this
 * process opens SQLite (SQLite must not cross a fork). Commands through a
 * pipe, one byte each, answered with one byte: 'L' BEGIN EXCLUSIVE on
 * db_path (after creating the lease table), 'R' BEGIN EXCLUSIVE on a new
 * database `raw.db` in rollback-journal mode, 'U' COMMIT. EOF (this
 * process closed its end, or died): it commits and exits.
 */
struct locker_proc {
	pid_t pid;
	int cmd, ans;
};

static int locker_child(int cmd, int ans)
{
	char err[256];
	opq_lease_provider *p;
	if (opq_lease_provider_sqlite_create(&p, db_path, err, sizeof(err)) != 0 ||
	    opq_lease_provider_destroy(p) != 0)
		return 1;
	char raw[400];
	snprintf(raw, sizeof(raw), "%s/raw.db", dir);
	sqlite3 *db = NULL, *rdb = NULL;
	if (sqlite3_open(db_path, &db) != SQLITE_OK || sqlite3_open(raw, &rdb) != SQLITE_OK)
		return 2;
	sqlite3_busy_timeout(db, 10000);
	sqlite3 *locked = NULL;
	char c;
	while (read(cmd, &c, 1) == 1) {
		int src = SQLITE_OK;
		if (c == 'L' || c == 'R') {
			locked = c == 'L' ? db : rdb;
			src = sqlite3_exec(locked, "BEGIN EXCLUSIVE", NULL, NULL, NULL);
			if (src == SQLITE_OK && c == 'R') /* something to lock in the file */
				src = sqlite3_exec(locked, "CREATE TABLE IF NOT EXISTS t (x)", NULL,
				                   NULL, NULL);
		} else if (c == 'U' && locked) {
			src = sqlite3_exec(locked, "COMMIT", NULL, NULL, NULL);
			locked = NULL;
		}
		char a = src == SQLITE_OK ? 'k' : 'e';
		if (write(ans, &a, 1) != 1)
			return 3;
	}
	if (locked)
		sqlite3_exec(locked, "COMMIT", NULL, NULL, NULL);
	sqlite3_close(db);
	sqlite3_close(rdb);
	return 0;
}

static struct locker_proc locker_fork(void)
{
	int cmd[2], ans[2];
	ck_assert_int_eq(pipe(cmd), 0);
	ck_assert_int_eq(pipe(ans), 0);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(cmd[1]);
		close(ans[0]);
		_exit(locker_child(cmd[0], ans[1]));
	}
	close(cmd[0]);
	close(ans[1]);
	return (struct locker_proc){pid, cmd[1], ans[0]};
}

/* Send a command and wait for its answer (a dead child: EOF, the test fails). */
static void locker_do(struct locker_proc *k, char c)
{
	ck_assert_int_eq(write(k->cmd, &c, 1), 1);
	char a = 0;
	ck_assert_int_eq(read(k->ans, &a, 1), 1);
	ck_assert_msg(a == 'k', "locker: command %c failed", c);
}

static void locker_end(struct locker_proc *k)
{
	close(k->cmd);
	close(k->ans);
	int st;
	ck_assert_int_eq(waitpid(k->pid, &st, 0), k->pid);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "locker status %d", st);
}

/* Whether the call that returned at `t` (rc) kept its deadline `dl`: by
 * it plus the slack, and, having waited for the lock, not before it. */
static void assert_kept(const char *what, int rc, int want, int64_t t, int64_t dl)
{
	fprintf(stderr, "check_lease_sqlite: %s: %d after %+.1f ms from its deadline\n", what, rc,
	        (t - dl) / 1e6);
	ck_assert_msg(rc == want, "%s: %d, not %d", what, rc, want);
	ck_assert_msg(t - dl < slack_ns(), "%s: %.1f ms late", what, (t - dl) / 1e6);
}

/*
 * Another process holds BEGIN EXCLUSIVE on the database: every call
 * returns by its deadline (the figures: a 1 s deadline took 5 s,
 * a deadline already passed 5 s), and the store works again once it is
 * unlocked.
 */
START_TEST(test_deadlines_locked)
{
	struct locker_proc k = locker_fork();
	locker_do(&k, 'U'); /* the table exists: the child created it */
	opq_lease_provider *p = open_store();
	opq_lease *a = mk(p, "dl", "A", 10000 * MS, 50 * MS);
	opq_lease *b = mk(p, "dl", "B", 1000 * MS, 50 * MS);
	opq_lease_grant g;
	ck_assert_int_eq(opq_lease_try_acquire(b, &g), 0); /* B holds a 1 s lease */
	locker_do(&k, 'L');

	/* refresh: by the lease's local end; the lease may still be B's */
	opq_lease_grant gb;
	ck_assert_int_eq(opq_lease_grant_get(b, &gb), 0);
	int64_t local_end = ts_ns(&gb.acquired) + 1000 * MS - 10 * MS - 1 * MS;
	int rc = opq_lease_refresh(b, NULL);
	assert_kept("refresh, 1 s lease", rc, EAGAIN, t_now_ns(), local_end);
	ck_assert_int_ge(t_now_ns(), local_end);
	ck_assert_int_eq(opq_lease_grant_get(b, &gb), 0);
	/* acquire with a 1 s deadline: ETIMEDOUT by then */
	struct timespec dl = t_deadline(1000 * MS);
	rc = opq_lease_acquire(a, &dl, &g);
	assert_kept("acquire, 1 s deadline", rc, ETIMEDOUT, t_now_ns(), ts_ns(&dl));
	ck_assert_int_ge(t_now_ns(), ts_ns(&dl));
	char words[256];
	ck_assert_int_eq(opq_lease_error(a, words, sizeof(words)), 0);
	ck_assert_msg(strstr(words, "locked"), "words: %s", words);
	/* a deadline already passed: one try that does not wait */
	dl = t_deadline(-10 * MS);
	int64_t t0 = t_now_ns();
	rc = opq_lease_acquire(a, &dl, &g);
	assert_kept("acquire, deadline passed", rc, ETIMEDOUT, t_now_ns(), t0);
	/* try_acquire and release: one lease time */
	t0 = t_now_ns();
	rc = opq_lease_try_acquire(b, NULL);
	assert_kept("try_acquire, 1 s lease", rc, EAGAIN, t_now_ns(), t0 + 1000 * MS);
	t0 = t_now_ns();
	rc = opq_lease_release(b);
	assert_kept("release, 1 s lease", rc, EAGAIN, t_now_ns(), t0 + 1000 * MS);

	locker_do(&k, 'U');
	ck_assert_int_eq(opq_lease_release(b), 0);
	dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_lease_acquire(a, &dl, &g), 0);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	locker_end(&k);
}
END_TEST

/*
 * Creating a provider on a database locked in rollback-journal mode (the
 * pragmas wait for it) gives up after the 5 s its page says, not 2 s.
 */
START_TEST(test_open_locked)
{
	struct locker_proc k = locker_fork();
	locker_do(&k, 'R');
	char raw[400], err[256];
	snprintf(raw, sizeof(raw), "%s/raw.db", dir);
	opq_lease_provider *p = NULL;
	int64_t t0 = t_now_ns();
	int rc = opq_lease_provider_sqlite_create(&p, raw, err, sizeof(err));
	int64_t t1 = t_now_ns();
	assert_kept("create on a locked database", rc, EAGAIN, t1, t0 + 5000 * MS);
	ck_assert_int_ge(t1 - t0, 5000 * MS);
	ck_assert_ptr_null(p);
	ck_assert_msg(strstr(err, "locked") && strstr(err, raw), "words: %s", err);
	locker_do(&k, 'U');
	ck_assert_int_eq(opq_lease_provider_sqlite_create(&p, raw, err, sizeof(err)), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	locker_end(&k);
}
END_TEST

struct acq_thread {
	opq_lease *l;
	struct t_gate started;
	int rc;
	int64_t returned_at;
};

static void *acq_main(void *arg)
{
	struct acq_thread *t = arg;
	t_gate_open(&t->started);
	t->rc = opq_lease_acquire(t->l, NULL, NULL);
	t->returned_at = t_now_ns();
	return NULL;
}

/*
 * A daemon's signal thread cancels an acquire that waits for the locked
 * database (a store call bounded by one 30 s lease), at moments that find
 * it before, in and between its store calls: ECANCELED promptly.
 */
START_TEST(test_cancel_locked)
{
	struct locker_proc k = locker_fork();
	locker_do(&k, 'U');
	opq_lease_provider *p = open_store();
	locker_do(&k, 'L');
	static const int64_t after[] = {0, 5 * MS, 50 * MS, 300 * MS};
	for (int i = 0; i < 8; i++) {
		opq_lease *l = mk(p, "cancel", "A", 30000 * MS, 50 * MS);
		struct acq_thread t = {.l = l, .rc = -1};
		t_gate_init(&t.started);
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, acq_main, &t), 0);
		ck_assert(t_gate_wait(&t.started));
		struct timespec until = t_deadline(after[i % 4]); /* a moment to cancel at */
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
			;
		int64_t cancelled = t_now_ns();
		ck_assert_int_eq(opq_lease_cancel(l), 0);
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_int_eq(t.rc, ECANCELED);
		ck_assert_msg(t.returned_at - cancelled < slack_ns(), "returned %.1f ms after",
		              (t.returned_at - cancelled) / 1e6);
		t_gate_destroy(&t.started);
		ck_assert_int_eq(opq_lease_destroy(l), 0);
	}
	locker_do(&k, 'U');
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	locker_end(&k);
}
END_TEST

/* ---- keepalive on SQLite, and round trips per second ----------------------------- */

static void lost_count(opq_lease *l, enum opq_lease_lost_reason why, void *arg)
{
	int64_t left = -1;
	opq_lease_remaining(l, NULL, &left);
	char words[256];
	opq_lease_error(l, words, sizeof(words));
	fprintf(stderr, "lost: why %d, remaining %lld ns, last error: %s\n", (int)why,
	        (long long)left, words);
	atomic_fetch_add((atomic_int *)arg, 1);
}

/*
 * Keepalive against a real store: another process keeps trying for three
 * leases and never gets it. The lease is 1 s so that a commit slowed by a
 * busy disk (a shared CI machine) does not count as the store being down. The child is forked
 * before this process opens SQLite or starts threads (SQLite must not cross a fork), and starts
 * when told through a pipe.
 */
START_TEST(test_keepalive_sqlite)
{
	const int64_t L = 1000 * MS;
	int go[2];
	ck_assert_int_eq(pipe(go), 0);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(go[1]);
		char c;
		if (read(go[0], &c, 1) != 1)
			_exit(5);
		char err[256];
		opq_lease_provider *cp;
		if (opq_lease_provider_sqlite_create(&cp, db_path, err, sizeof(err))) {
			fprintf(stderr, "child: %s\n", err);
			_exit(1);
		}
		opq_lease_attr *at;
		opq_lease *b;
		if (opq_lease_attr_create(&at) || opq_lease_attr_set_owner(at, "B") ||
		    opq_lease_attr_set_duration(at, L) || opq_lease_create(&b, cp, "ka", at))
			_exit(2);
		int64_t end = t_now_ns() + 3 * L;
		while (t_now_ns() < end) {
			int rc = opq_lease_try_acquire(b, NULL);
			if (rc != EBUSY) {
				fprintf(stderr, "child: try_acquire %d\n", rc);
				_exit(3);
			}
			struct timespec nap = {0, 5000000};
			nanosleep(&nap, NULL);
		}
		_exit(0);
	}
	close(go[0]);
	opq_lease_provider *p = open_store();
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	opq_lease *a = mk(p, "ka", "A", L, 10 * MS);
	opq_lease_grant g0, g;
	ck_assert_int_eq(opq_lease_try_acquire(a, &g0), 0);
	atomic_int lost = 0;
	ck_assert_int_eq(opq_lease_keepalive_start(a, q, 0, lost_count, &lost), 0);
	ck_assert_int_eq(write(go[1], "g", 1), 1);
	close(go[1]);
	int st;
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
	ck_assert_int_eq(atomic_load(&lost), 0);
	ck_assert_int_eq(opq_lease_grant_get(a, &g), 0);
	ck_assert_uint_eq(g.token, g0.token);
	ck_assert_int_gt(ts_ns(&g.acquired), ts_ns(&g0.acquired) + 2 * L);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

START_TEST(test_round_trips)
{
	opq_lease_provider *p = open_store();
	opq_lease *l = mk(p, "rt", "A", 10000 * MS, 10 * MS);
	long n = t_scale(300);
	int64_t t0 = t_now_ns();
	uint64_t last = 0;
	for (long i = 0; i < n; i++) {
		opq_lease_grant g;
		ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
		ck_assert_uint_gt(g.token, last);
		last = g.token;
		ck_assert_int_eq(opq_lease_release(l), 0);
	}
	double s = (double)(t_now_ns() - t0) / 1e9;
	fprintf(stderr, "check_lease_sqlite: %.0f acquire+release round trips/s (%ld in %.2f s)\n",
	        (double)n / s, n, s);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("lease_sqlite");
	TCase *tc = t_tcase(s, "sqlite", 240);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_bad_input);
	tcase_add_test(tc, test_tokens_and_restart);
	tcase_add_test(tc, test_other_boot);
	tcase_add_test(tc, test_guarded_write);
	tcase_add_test(tc, test_threads_share_provider);
	tcase_add_test(tc, test_processes_exclude);
	tcase_add_test(tc, test_crash_takeover);
	tcase_add_test(tc, test_locked_database);
	tcase_add_test(tc, test_deadlines_locked);
	tcase_add_test(tc, test_open_locked);
	tcase_add_test(tc, test_cancel_locked);
	tcase_add_test(tc, test_keepalive_sqlite);
	tcase_add_test(tc, test_round_trips);
	return t_run(s);
}
