/*
 * lease_sqlite.c: the SQLite lease provider. It is written only against
 * the public provider interface (opq_lease_provider_create), as an
 * example for writing one's own. The guard function for the users' own
 * writes is in lease_sqlite_held.c.
 *
 * One table, created on first use:
 *   opq_lease(name TEXT PRIMARY KEY, owner TEXT, token INTEGER, held INTEGER,
 *             boot_id TEXT, expiry_ns INTEGER, data BLOB)
 * A lock is live when held = 1, its boot_id is this boot's and
 * expiry_ns (CLOCK_BOOTTIME) is still ahead. Rows are never deleted, so
 * a name's token only grows.
 *
 * Connection: one per provider, used by one call at a time. Each
 * call is one short transaction, so threads of one process gain nothing
 * from several connections (SQLite lets one writer in at a time anyway),
 * and one connection needs no per-thread cleanup. Processes coordinate
 * through SQLite's file locks: acquire is BEGIN IMMEDIATE (the write
 * lock up front, so read-then-write cannot deadlock), SELECT, then INSERT
 * or a conditional UPDATE; refresh and release are single conditional
 * UPDATEs. The database is put in WAL mode with synchronous=FULL (a
 * commit is on disk before the grant is returned).
 *
 * Time: every call returns by its request's deadline. A locked database is
 * waited for by a busy handler that sleeps in short steps, never past the
 * deadline, and asks opq_lease_request_check between them (a cancelled
 * acquire stops waiting); a statement still locked out at the deadline
 * fails the call with EAGAIN. A thread waits for another thread's call on
 * the connection (the gate) until its own deadline only. Creating the
 * provider waits up to OPQ_SQLITE_OPEN_NS for a locked database.
 */
#define _GNU_SOURCE 1 /* CLOCK_BOOTTIME */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lease_sqlite_impl.h"

#define OPQ_SQLITE_OPEN_NS 5000000000LL /* creating a provider gives up after this long */
#define MS                 1000000LL

enum {
	ST_BEGIN,
	ST_COMMIT,
	ST_ROLLBACK,
	ST_SELECT,
	ST_INSERT,
	ST_TAKE,
	ST_EXTEND,
	ST_REFRESH,
	ST_RELEASE,
	ST_N
};

static const char *const sql_text[ST_N] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_SELECT] = "SELECT owner, token, held, boot_id, expiry_ns FROM opq_lease WHERE name = ?1",
    [ST_INSERT] = "INSERT INTO opq_lease (name, owner, token, held, boot_id, expiry_ns, data)"
                  " VALUES (?1, ?2, 1, 1, ?3, ?4, ?5)",
    [ST_TAKE] = "UPDATE opq_lease SET owner = ?2, token = token + 1, held = 1, boot_id = ?3,"
                " expiry_ns = ?4, data = ?5 WHERE name = ?1",
    [ST_EXTEND] = "UPDATE opq_lease SET boot_id = ?3, expiry_ns = ?4, data = ?5 WHERE name = ?1",
    [ST_REFRESH] = "UPDATE opq_lease SET expiry_ns = ?4 WHERE name = ?1 AND owner = ?2"
                   " AND token = ?6 AND held = 1 AND boot_id = ?3 AND expiry_ns > ?7",
    [ST_RELEASE] = "UPDATE opq_lease SET held = 0, data = NULL WHERE name = ?1 AND owner = ?2"
                   " AND token = ?6 AND held = 1",
};

static const char schema[] = "CREATE TABLE IF NOT EXISTS opq_lease ("
                             " name TEXT PRIMARY KEY NOT NULL,"
                             " owner TEXT NOT NULL,"
                             " token INTEGER NOT NULL,"
                             " held INTEGER NOT NULL,"
                             " boot_id TEXT NOT NULL,"
                             " expiry_ns INTEGER NOT NULL,"
                             " data BLOB)";

struct sq_store {
	/* The gate: one call at a time uses the connection. */
	pthread_mutex_t mu;
	pthread_cond_t cv; /* CLOCK_MONOTONIC; busy went false */
	bool busy;
	/* The call on the connection (the gate's holder's): for the busy handler. */
	const opq_lease_request *req; /* NULL while creating the provider */
	int64_t dl;                   /* its deadline, monotonic ns */
	int stop;                     /* why the busy handler gave up: ETIMEDOUT, ECANCELED */
	sqlite3 *db;
	sqlite3_stmt *st[ST_N];
	char boot_id[64];
	char path[256]; /* for error words */
};

int64_t opq__sq_boot_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec ns_ts(int64_t ns)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000LL),
	                      .tv_nsec = (long)(ns % 1000000000LL)};
	return ts;
}

static void nap_until(int64_t until, int64_t step)
{
	int64_t now = mono_ns();
	if (until > now + step)
		until = now + step;
	struct timespec ts = ns_ts(until);
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

/* Whether the call on the connection should stop waiting: 0, ETIMEDOUT or ECANCELED. */
static int sq_check(struct sq_store *s)
{
	if (s->req)
		return opq_lease_request_check(s->req);
	return mono_ns() >= s->dl ? ETIMEDOUT : 0;
}

/*
 * SQLite's busy handler: the database is locked by another connection.
 * Sleep a short step (growing from 1 to 20 ms, never past the deadline)
 * and let SQLite try again, or give up (0) at the deadline or a cancel.
 */
static int sq_busy(void *arg, int count)
{
	static const int step_ms[] = {1, 2, 5, 10, 15, 20};
	struct sq_store *s = arg;
	int rc = sq_check(s);
	if (rc) {
		s->stop = rc;
		return 0;
	}
	int n = (int)(sizeof(step_ms) / sizeof(step_ms[0]));
	nap_until(s->dl, step_ms[count < n ? count : n - 1] * MS);
	return 1;
}

/* Take the connection for one call, waiting for another thread's call
 * until the request's deadline: 0 or ETIMEDOUT (words in errbuf). */
static int sq_enter(struct sq_store *s, const opq_lease_request *req)
{
	struct timespec dl = req->deadline;
	int rc = 0;
	pthread_mutex_lock(&s->mu);
	while (s->busy && rc == 0)
		rc = pthread_cond_timedwait(&s->cv, &s->mu, &dl);
	if (!s->busy) {
		s->busy = true;
		rc = 0;
	}
	pthread_mutex_unlock(&s->mu);
	if (rc) {
		snprintf(
		    req->errbuf, req->errlen,
		    "sqlite lease store: another call of this process kept the connection past "
		    "the deadline (%s)",
		    s->path);
		return ETIMEDOUT;
	}
	s->req = req;
	s->dl = (int64_t)req->deadline.tv_sec * 1000000000LL + req->deadline.tv_nsec;
	s->stop = 0;
	return 0;
}

static void sq_leave(struct sq_store *s)
{
	s->req = NULL;
	pthread_mutex_lock(&s->mu);
	s->busy = false;
	pthread_cond_signal(&s->cv);
	pthread_mutex_unlock(&s->mu);
}

int opq__sq_read_boot_id(char *buf, size_t len)
{
	int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	ssize_t n = read(fd, buf, len - 1);
	int err = errno;
	close(fd);
	if (n <= 0)
		return n < 0 ? err : EIO;
	buf[n] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	return buf[0] ? 0 : EIO;
}

/*
 * Why a database file that does not exist could not be created. SQLite
 * opens read-write (creating), and when that fails tries read-only, whose
 * error (ENOENT: no such file) is the one sqlite3_system_errno keeps. The
 * first failure is the one that explains: when the directory exists but
 * the process may not write in it, EACCES (or EROFS); else ENOENT.
 */
static int create_errno(const char *path)
{
	char dir[sizeof(((struct sq_store *)0)->path)];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == dir)
		dir[1] = '\0';
	else
		*slash = '\0';
	struct stat st;
	if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
		return ENOENT;
	if (faccessat(AT_FDCWD, dir, W_OK | X_OK, AT_EACCESS) != 0 &&
	    (errno == EACCES || errno == EPERM || errno == EROFS))
		return errno;
	return ENOENT;
}

/* An SQLite result code as an errno value. */
static int sq_errno(int src)
{
	switch (src & 0xff) {
	case SQLITE_BUSY:
	case SQLITE_LOCKED:
		return EAGAIN;
	case SQLITE_NOMEM:
		return ENOMEM;
	case SQLITE_CANTOPEN:
		return ENOENT;
	case SQLITE_PERM:
	case SQLITE_AUTH:
		return EACCES;
	case SQLITE_READONLY:
		return EROFS;
	case SQLITE_FULL:
		return ENOSPC;
	default:
		return EIO;
	}
}

static int sq_fail(struct sq_store *s, int src, const char *what, char *errbuf, size_t errlen)
{
	if (errbuf && errlen)
		/* The reason before the path, which may be long. */
		snprintf(errbuf, errlen, "sqlite lease store: %s: %s (%s)", what,
		         s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(src), s->path);
	/* A cancelled acquire gave up waiting for a locked database. */
	if (s->stop == ECANCELED && ((src & 0xff) == SQLITE_BUSY || (src & 0xff) == SQLITE_LOCKED))
		return ECANCELED;
	/* A file that cannot be opened: the system's reason tells a missing
	 * directory from one the process may not write in. */
	int sys = s->db && (src & 0xff) == SQLITE_CANTOPEN ? sqlite3_system_errno(s->db) : 0;
	if (sys == ENOENT)
		sys = create_errno(s->path);
	if (sys == EACCES || sys == EPERM)
		return EACCES;
	if (sys == EROFS)
		return EROFS;
	return sq_errno(src);
}

/* Step a statement to completion, retrying while the database is locked
 * (the busy handler waits; some locks in WAL mode do not call it) until
 * the call's deadline or a cancel. */
static int sq_step(struct sq_store *s, sqlite3_stmt *st, bool *row)
{
	for (;;) {
		int src = sqlite3_step(st);
		if (src == SQLITE_ROW) {
			if (row)
				*row = true;
			return SQLITE_OK; /* the caller reads the row, then resets */
		}
		if (src == SQLITE_DONE) {
			if (row)
				*row = false;
			sqlite3_reset(st);
			return SQLITE_OK;
		}
		sqlite3_reset(st);
		if ((src == SQLITE_BUSY || src == SQLITE_LOCKED) && s->stop == 0 &&
		    (s->stop = sq_check(s)) == 0) {
			nap_until(s->dl, 1 * MS);
			continue;
		}
		return src;
	}
}

static void bind_common(struct sq_store *s, sqlite3_stmt *st, const opq_lease_request *req,
                        int64_t now)
{
	sqlite3_clear_bindings(st);
	int n = sqlite3_bind_parameter_count(st);
	if (n >= 1)
		sqlite3_bind_text(st, 1, req->name, -1, SQLITE_STATIC);
	if (n >= 2)
		sqlite3_bind_text(st, 2, req->owner, -1, SQLITE_STATIC);
	if (n >= 3)
		sqlite3_bind_text(st, 3, s->boot_id, -1, SQLITE_STATIC);
	if (n >= 4) {
		int64_t exp = now > INT64_MAX - req->lease_ns ? INT64_MAX : now + req->lease_ns;
		sqlite3_bind_int64(st, 4, exp);
	}
	if (n >= 5) {
		if (req->data_len)
			sqlite3_bind_blob(st, 5, req->data, (int)req->data_len, SQLITE_STATIC);
		else
			sqlite3_bind_null(st, 5);
	}
	if (n >= 6)
		sqlite3_bind_int64(st, 6, (int64_t)req->token);
	if (n >= 7)
		sqlite3_bind_int64(st, 7, now);
}

static int sq_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	struct sq_store *s = store;
	int rc = sq_enter(s, req);
	if (rc)
		return rc;
	int src = sq_step(s, s->st[ST_BEGIN], NULL);
	if (src != SQLITE_OK) {
		rc = sq_fail(s, src, "begin", req->errbuf, req->errlen);
		goto out;
	}
	int64_t now = opq__sq_boot_ns();
	sqlite3_stmt *sel = s->st[ST_SELECT];
	bind_common(s, sel, req, now);
	bool row = false;
	src = sq_step(s, sel, &row);
	if (src != SQLITE_OK) {
		rc = sq_fail(s, src, "select", req->errbuf, req->errlen);
		goto rollback;
	}
	sqlite3_stmt *w;
	if (!row) {
		w = s->st[ST_INSERT];
		*token = 1;
	} else {
		const char *owner = (const char *)sqlite3_column_text(sel, 0);
		int64_t cur = sqlite3_column_int64(sel, 1);
		bool held = sqlite3_column_int(sel, 2) != 0;
		const char *boot = (const char *)sqlite3_column_text(sel, 3);
		int64_t expiry = sqlite3_column_int64(sel, 4);
		bool live = held && boot && strcmp(boot, s->boot_id) == 0 && expiry > now;
		bool mine = owner && strcmp(owner, req->owner) == 0;
		sqlite3_reset(sel);
		if (live && !mine) {
			rc = EBUSY;
			goto rollback;
		}
		w = live ? s->st[ST_EXTEND] : s->st[ST_TAKE];
		*token = live ? (uint64_t)cur : (uint64_t)cur + 1;
	}
	bind_common(s, w, req, now);
	src = sq_step(s, w, NULL);
	if (src != SQLITE_OK) {
		rc = sq_fail(s, src, "write", req->errbuf, req->errlen);
		goto rollback;
	}
	src = sq_step(s, s->st[ST_COMMIT], NULL);
	if (src != SQLITE_OK) {
		rc = sq_fail(s, src, "commit", req->errbuf, req->errlen);
		goto rollback;
	}
	goto out;
rollback:
	/* A rollback needs no lock it does not hold: it cannot be locked out. */
	if (sqlite3_get_autocommit(s->db) == 0)
		(void)sq_step(s, s->st[ST_ROLLBACK], NULL);
out:
	sq_leave(s);
	return rc;
}

/* One conditional UPDATE; *changed tells whether it matched the row. */
static int sq_update(struct sq_store *s, int which, const opq_lease_request *req, bool *changed)
{
	int rc = sq_enter(s, req);
	if (rc)
		return rc;
	sqlite3_stmt *st = s->st[which];
	bind_common(s, st, req, opq__sq_boot_ns());
	int src = sq_step(s, st, NULL);
	if (src != SQLITE_OK)
		rc = sq_fail(s, src, which == ST_REFRESH ? "refresh" : "release", req->errbuf,
		             req->errlen);
	else
		*changed = sqlite3_changes(s->db) == 1;
	sq_leave(s);
	return rc;
}

static int sq_refresh(void *store, const opq_lease_request *req)
{
	bool changed = false;
	int rc = sq_update(store, ST_REFRESH, req, &changed);
	return rc ? rc : changed ? 0 : ENOLCK;
}

static int sq_release(void *store, const opq_lease_request *req)
{
	bool changed;
	return sq_update(store, ST_RELEASE, req, &changed);
}

static void sq_destroy(void *store)
{
	struct sq_store *s = store;
	for (int i = 0; i < ST_N; i++)
		sqlite3_finalize(s->st[i]);
	sqlite3_close(s->db);
	pthread_cond_destroy(&s->cv);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

/* Run one statement of the provider's setup, retrying while the database
 * is locked until the setup's deadline. */
static int sq_setup_exec(struct sq_store *s, const char *sql)
{
	int src;
	while ((src = sqlite3_exec(s->db, sql, NULL, NULL, NULL)) == SQLITE_BUSY ||
	       src == SQLITE_LOCKED) {
		if (mono_ns() >= s->dl)
			break;
		nap_until(s->dl, 1 * MS);
	}
	return src;
}

OPQ_EXPORT int opq_lease_provider_sqlite_create(opq_lease_provider **provider, const char *path,
                                                char *errbuf, size_t errlen)
{
	if (errbuf && errlen)
		errbuf[0] = '\0';
	if (!provider || !path || !path[0] || (!errbuf && errlen)) {
		if (errbuf && errlen)
			snprintf(errbuf, errlen, "sqlite lease store: no provider pointer or path");
		return EINVAL;
	}
	struct sq_store *s = calloc(1, sizeof(*s));
	if (!s) {
		if (errbuf && errlen)
			snprintf(errbuf, errlen, "sqlite lease store: out of memory");
		return ENOMEM;
	}
	snprintf(s->path, sizeof(s->path), "%s", path);
	int rc = opq__sq_read_boot_id(s->boot_id, sizeof(s->boot_id));
	if (rc) {
		if (errbuf && errlen)
			snprintf(errbuf, errlen, "sqlite lease store: cannot read the boot id: %s",
			         strerror(rc));
		free(s);
		return rc;
	}
	rc = pthread_mutex_init(&s->mu, NULL);
	if (rc) {
		free(s);
		return rc;
	}
	pthread_condattr_t ca;
	rc = pthread_condattr_init(&ca);
	if (rc == 0) {
		rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		if (rc == 0)
			rc = pthread_cond_init(&s->cv, &ca);
		pthread_condattr_destroy(&ca);
	}
	if (rc) {
		pthread_mutex_destroy(&s->mu);
		free(s);
		return rc;
	}
	int src = sqlite3_open_v2(
	    path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, NULL);
	if (src != SQLITE_OK) {
		rc = sq_fail(s, src, "open", errbuf, errlen);
		goto fail;
	}
	sqlite3_extended_result_codes(s->db, 0);
	/* Setup waits for a locked database up to OPQ_SQLITE_OPEN_NS in all;
	 * each call then up to its own deadline. */
	s->dl = mono_ns() + OPQ_SQLITE_OPEN_NS;
	sqlite3_busy_handler(s->db, sq_busy, s);
	/* Write-ahead log, synced at every commit: one fsync per grant
	 * instead of the rollback journal's several, and still durable. If
	 * the mode cannot be changed (another connection keeps the file in
	 * its mode), the file keeps its mode, which is correct too. */
	src = sq_setup_exec(s, "PRAGMA journal_mode = WAL");
	if (src == SQLITE_BUSY || src == SQLITE_LOCKED) {
		rc = sq_fail(s, src, "pragma journal_mode", errbuf, errlen);
		goto fail;
	}
	src = sq_setup_exec(s, "PRAGMA synchronous = FULL");
	if (src != SQLITE_OK) {
		rc = sq_fail(s, src, "pragma synchronous", errbuf, errlen);
		goto fail;
	}
	src = sq_setup_exec(s, schema);
	if (src != SQLITE_OK) {
		rc = sq_fail(s, src, "create table opq_lease", errbuf, errlen);
		goto fail;
	}
	for (int i = 0; i < ST_N; i++) {
		src = sqlite3_prepare_v3(s->db, sql_text[i], -1, SQLITE_PREPARE_PERSISTENT,
		                         &s->st[i], NULL);
		if (src != SQLITE_OK) {
			rc = sq_fail(s, src, "prepare", errbuf, errlen);
			goto fail;
		}
	}
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	ops.acquire = sq_acquire;
	ops.refresh = sq_refresh;
	ops.release = sq_release;
	ops.destroy = sq_destroy;
	rc = opq_lease_provider_create(provider, &ops, s);
	if (rc) {
		if (errbuf && errlen)
			snprintf(errbuf, errlen, "sqlite lease store: %s", strerror(rc));
		goto fail;
	}
	return 0;
fail:
	for (int i = 0; i < ST_N; i++)
		sqlite3_finalize(s->st[i]);
	sqlite3_close(s->db);
	pthread_cond_destroy(&s->cv);
	pthread_mutex_destroy(&s->mu);
	free(s);
	return rc;
}
