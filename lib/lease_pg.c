/*
 * lease_pg.c: the PostgreSQL lease provider (opq_lease_provider_pg(3)).
 *
 * Built as its own library, libopqueue-pg, on top of the public provider
 * interface of libopqueue (opq_lease_provider_create): nothing here reaches
 * the core's internals, and a program that only wants the queue never links
 * libpq.
 *
 * The store is one table, one row per lock name, kept forever so the token
 * counter of a name never goes back:
 *   acquire  one INSERT ... ON CONFLICT DO UPDATE ... WHERE free, expired or
 *            ours ... RETURNING token: no row back means another owner
 *            holds an unexpired lease (EBUSY). The token grows unless the
 *            same owner still holds the lease (a retried acquire);
 *   refresh  UPDATE ... WHERE name, owner, token and not expired RETURNING;
 *   release  UPDATE owner and expiry to NULL WHERE name, owner and token.
 * Every expiry is judged by the server's clock_timestamp() inside the one
 * statement: no two hosts' clocks are ever compared.
 *
 * Connections: a pool. A call takes an idle connection (or opens one) for
 * the length of one statement and gives it back; up to POOL_MAX idle ones
 * are kept, as many as the calls that ran at once. So concurrent callers (a
 * keepalive and an acquire) never wait behind each other's round trip, and
 * they do not open and close a connection each time either: a new one costs
 * a server process and the statements' preparation (up to 160 ms for one
 * statement on the 2-core test machines, in the server's log), against a
 * bound of 200 ms; with 4 kept, 8 threads of opqueue-stress opened 256
 * connections in 10 s and about 30 calls timed out; with 16, 11 and 1.
 * Every connection is non-blocking and every wait is a poll() with a
 * deadline: a stopped or unreachable server gives an error within the bound
 * (the connection string's connect_timeout, default 5 s, and at most half
 * the lease), never a hang, which the keepalive depends on. A connection
 * that was lost is closed with every idle one (after a server restart they
 * are all dead), and a call whose pooled connection turned out dead retries
 * once on a new one: all three statements are idempotent for the same owner
 * and token, so the retry cannot mint a second token. One that timed out is
 * closed alone. Idle connections are a stack: the one given back last is
 * taken first, so those at the bottom are the ones no call has needed for
 * the longest; once one has been idle for IDLE_MS (OPQ_PG_IDLE_MS in the
 * environment overrides it), the next connection given back closes it. So
 * the pool shrinks back to what the calls use after a burst (a fleet's
 * hosts would otherwise each keep their peak until they stop).
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "opqueue/lease_pg.h"

#define POOL_MAX 16
#define IDLE_MS 30000
#define DEFAULT_BOUND_S 5
/* A statement bound never below this, however short the lease. */
#define MIN_BOUND_NS (200LL * 1000000LL)
#define NS_PER_S 1000000000LL

/* Type OIDs of the parameters (pg_type.h values, stable across versions). */
#define OID_BYTEA 17
#define OID_INT8 20
#define OID_TEXT 25

/*
 * The schema: the same text as share/opqueue/lease.sql (tests/schema.sh
 * compares them), run under a transaction-scoped advisory lock (several
 * processes may start at once, and concurrent CREATE ... IF NOT EXISTS can
 * still collide) in one multi-statement string, which PostgreSQL runs as one
 * transaction.
 */
static const char SCHEMA_SQL[] =
	"SELECT pg_advisory_xact_lock(7306914650713286145);\n"
	"CREATE TABLE IF NOT EXISTS opq_lease (\n"
	"	name    text PRIMARY KEY,\n"
	"	owner   text,\n"
	"	token   bigint NOT NULL CHECK (token > 0),\n"
	"	expires timestamptz,\n"
	"	data    bytea\n"
	");\n"
	"CREATE OR REPLACE FUNCTION opq_lease_held(lock_name text, lock_token bigint)\n"
	"RETURNS boolean LANGUAGE sql VOLATILE STRICT AS $$\n"
	"	SELECT coalesce((SELECT l.owner IS NOT NULL AND l.expires > clock_timestamp()\n"
	"			 FROM opq_lease l\n"
	"			 WHERE l.name = lock_name AND l.token = lock_token\n"
	"			 FOR SHARE), false)\n"
	"$$;\n";

static const char SCHEMA_PRESENT_SQL[] =
	"SELECT to_regclass('opq_lease') IS NOT NULL"
	" AND to_regprocedure('opq_lease_held(text,bigint)') IS NOT NULL";

/*
 * The expiry of a lease of $N microseconds from now. A timestamp ends in the
 * year 294276: a lease of 100 years or more never expires in the store
 * ('infinity'; the holder's own count runs out first).
 */
#define EXPIRES(n)                                                                  \
	"(CASE WHEN " n " >= 3155760000000000 THEN 'infinity'::timestamptz"         \
	" ELSE clock_timestamp() + " n " * interval '1 microsecond' END)"

/* $1 name, $2 owner, $3 lease in microseconds, $4 data. */
static const char ACQUIRE_SQL[] =
	"INSERT INTO opq_lease AS l (name, owner, token, expires, data)"
	" VALUES ($1, $2, 1, " EXPIRES("$3") ", $4)"
	" ON CONFLICT (name) DO UPDATE SET"
	"  token = CASE WHEN l.owner = excluded.owner AND l.expires > clock_timestamp()"
	"          THEN l.token ELSE l.token + 1 END,"
	"  owner = excluded.owner,"
	"  expires = " EXPIRES("$3") ","
	"  data = excluded.data"
	" WHERE l.owner IS NULL OR l.expires IS NULL OR l.expires <= clock_timestamp()"
	"  OR l.owner = excluded.owner"
	" RETURNING l.token";

/* $1 name, $2 owner, $3 token, $4 lease in microseconds, $5 data. */
static const char REFRESH_SQL[] =
	"UPDATE opq_lease SET expires = " EXPIRES("$4") ","
	" data = $5"
	" WHERE name = $1 AND owner = $2 AND token = $3 AND expires > clock_timestamp()"
	" RETURNING token";

/* $1 name, $2 owner, $3 token. */
static const char RELEASE_SQL[] =
	"UPDATE opq_lease SET owner = NULL, expires = NULL, data = NULL"
	" WHERE name = $1 AND owner = $2 AND token = $3";

enum stmt { ST_ACQUIRE, ST_REFRESH, ST_RELEASE, ST_COUNT };

static const struct {
	const char *name;
	const char *sql;
	int nparams;
	Oid types[5];
} stmts[ST_COUNT] = {
	[ST_ACQUIRE] = {"opq_lease_acquire", ACQUIRE_SQL, 4, {OID_TEXT, OID_TEXT, OID_INT8, OID_BYTEA}},
	[ST_REFRESH] = {"opq_lease_refresh", REFRESH_SQL, 5,
			{OID_TEXT, OID_TEXT, OID_INT8, OID_INT8, OID_BYTEA}},
	[ST_RELEASE] = {"opq_lease_release", RELEASE_SQL, 3, {OID_TEXT, OID_TEXT, OID_INT8}},
};

struct pg_store {
	pthread_mutex_t mu;
	/* The parsed connection string, NULL-terminated, for PQconnectStartParams. */
	char **keys;
	char **vals;
	int64_t bound_ns;
	bool schema_ok; /* under mu */
	int64_t idle_max_ns;
	int nidle; /* under mu, with the two arrays: a stack, the top at nidle - 1 */
	PGconn *idle[POOL_MAX];
	int64_t idle_since[POOL_MAX]; /* when each was given back (monotonic ns) */
};

static void set_err(char *buf, size_t len, const char *what, const char *msg)
{
	if (buf == NULL || len == 0)
		return;
	snprintf(buf, len, "PostgreSQL: %s%s%s", what, *what && msg && *msg ? ": " : "",
		 msg ? msg : "");
	/* libpq's messages end with a newline and may span lines: one line,
	 * runs of white space squeezed to one space. */
	size_t n = 0;
	for (const char *p = buf; *p; p++) {
		bool space = *p == '\n' || *p == '\r' || *p == '\t' || *p == ' ';
		if (space && (n == 0 || buf[n - 1] == ' '))
			continue;
		buf[n++] = space ? ' ' : *p;
	}
	while (n > 0 && buf[n - 1] == ' ')
		n--;
	buf[n] = '\0';
}

static struct timespec mono_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts;
}

static struct timespec add_ns(struct timespec t, int64_t ns)
{
	t.tv_sec += (time_t)(ns / NS_PER_S);
	t.tv_nsec += (long)(ns % NS_PER_S);
	if (t.tv_nsec >= NS_PER_S) {
		t.tv_sec++;
		t.tv_nsec -= NS_PER_S;
	}
	return t;
}

static int64_t mono_ns(void)
{
	struct timespec now = mono_now();
	return (int64_t)now.tv_sec * NS_PER_S + now.tv_nsec;
}

static int64_t ns_until(const struct timespec *dl)
{
	struct timespec now = mono_now();
	return (int64_t)(dl->tv_sec - now.tv_sec) * NS_PER_S + (dl->tv_nsec - now.tv_nsec);
}

/* Wait until fd is ready for `events` or the deadline passes: 0, ETIMEDOUT, or EIO. */
static int wait_fd(int fd, short events, const struct timespec *dl)
{
	if (fd < 0)
		return EIO;
	for (;;) {
		int64_t left = ns_until(dl);
		if (left <= 0)
			return ETIMEDOUT;
		int ms = left / 1000000 + 1;
		struct pollfd p = {.fd = fd, .events = events};
		int r = poll(&p, 1, ms);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return EIO;
	}
}

/* The errno for a server error, by SQLSTATE. */
static int sqlstate_errno(const char *state)
{
	if (state == NULL)
		return EIO;
	if (strcmp(state, "57014") == 0) /* query_canceled: statement_timeout */
		return ETIMEDOUT;
	if (strcmp(state, "57P03") == 0) /* cannot_connect_now: starting up */
		return ECONNREFUSED;
	if (strncmp(state, "08", 2) == 0 || strncmp(state, "57P", 3) == 0) /* shutdown, crash */
		return ECONNRESET;
	if (strncmp(state, "22", 2) == 0) /* data exception: bad encoding of a name */
		return EINVAL;
	if (strcmp(state, "53200") == 0) /* out_of_memory */
		return ENOMEM;
	if (strncmp(state, "53", 2) == 0 || strncmp(state, "40", 2) == 0 ||
	    strcmp(state, "55P03") == 0) /* too many connections, deadlock, lock timeout */
		return EAGAIN;
	if (strcmp(state, "42501") == 0 || strncmp(state, "28", 2) == 0) /* privilege, auth */
		return EACCES;
	return EIO;
}

/*
 * After a PQsend*: flush, then collect every result until the deadline.
 * Returns 0 with *res the (last) result, or an errno with words in errbuf.
 */
static int pg_finish(PGconn *c, const struct timespec *dl, PGresult **res, char *errbuf,
		     size_t errlen)
{
	*res = NULL;
	int f;
	while ((f = PQflush(c)) == 1) {
		int rc = wait_fd(PQsocket(c), POLLOUT | POLLIN, dl);
		if (rc == ETIMEDOUT) {
			set_err(errbuf, errlen, "timed out sending to the server", NULL);
			return ETIMEDOUT;
		}
		if (rc != 0 || !PQconsumeInput(c)) {
			f = -1;
			break;
		}
	}
	if (f < 0) {
		set_err(errbuf, errlen, "sending to the server failed", PQerrorMessage(c));
		return ECONNRESET;
	}
	PGresult *last = NULL;
	for (;;) {
		while (PQisBusy(c)) {
			int rc = wait_fd(PQsocket(c), POLLIN, dl);
			if (rc == ETIMEDOUT) {
				PQclear(last);
				set_err(errbuf, errlen, "timed out waiting for the server", NULL);
				return ETIMEDOUT;
			}
			if (rc != 0 || !PQconsumeInput(c)) {
				PQclear(last);
				set_err(errbuf, errlen, "connection lost", PQerrorMessage(c));
				return ECONNRESET;
			}
		}
		PGresult *r = PQgetResult(c);
		if (r == NULL)
			break;
		/* Keep the first error of a multi-statement string, else the last result. */
		if (last != NULL && PQresultStatus(last) == PGRES_FATAL_ERROR) {
			PQclear(r);
			continue;
		}
		PQclear(last);
		last = r;
	}
	if (last == NULL) {
		set_err(errbuf, errlen, "no result", PQerrorMessage(c));
		return PQstatus(c) == CONNECTION_BAD ? ECONNRESET : EIO;
	}
	ExecStatusType st = PQresultStatus(last);
	if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
		const char *state = PQresultErrorField(last, PG_DIAG_SQLSTATE);
		int rc = state ? sqlstate_errno(state)
			       : (PQstatus(c) == CONNECTION_BAD ? ECONNRESET : EIO);
		set_err(errbuf, errlen, "", PQresultErrorMessage(last));
		PQclear(last);
		return rc;
	}
	*res = last;
	return 0;
}

/* Run a parameterless query (ours, no values) and expect success. */
static int pg_simple(PGconn *c, const char *sql, const struct timespec *dl, PGresult **res,
		     char *errbuf, size_t errlen)
{
	if (!PQsendQuery(c, sql)) {
		set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
		return PQstatus(c) == CONNECTION_BAD ? ECONNRESET : EIO;
	}
	PGresult *r = NULL;
	int rc = pg_finish(c, dl, &r, errbuf, errlen);
	if (res != NULL)
		*res = r;
	else
		PQclear(r);
	return rc;
}

static void no_notices(void *arg, const char *msg)
{
	(void)arg;
	(void)msg;
}

/* A new connection, set up: schema present, statements prepared. */
static int pg_open(struct pg_store *s, const struct timespec *dl, PGconn **out, char *errbuf,
		   size_t errlen)
{
	*out = NULL;
	PGconn *c = PQconnectStartParams((const char *const *)s->keys,
					 (const char *const *)s->vals, 0);
	if (c == NULL) {
		set_err(errbuf, errlen, "out of memory for a connection", NULL);
		return ENOMEM;
	}
	PostgresPollingStatusType ps = PGRES_POLLING_WRITING;
	int rc = 0;
	if (PQstatus(c) == CONNECTION_BAD)
		ps = PGRES_POLLING_FAILED;
	while (ps != PGRES_POLLING_OK && ps != PGRES_POLLING_FAILED) {
		rc = wait_fd(PQsocket(c), ps == PGRES_POLLING_READING ? POLLIN : POLLOUT, dl);
		if (rc != 0)
			break;
		ps = PQconnectPoll(c);
	}
	if (rc == ETIMEDOUT) {
		set_err(errbuf, errlen, "timed out connecting to the server", PQerrorMessage(c));
		PQfinish(c);
		return ETIMEDOUT;
	}
	if (ps != PGRES_POLLING_OK) {
		set_err(errbuf, errlen, "cannot connect", PQerrorMessage(c));
		PQfinish(c);
		return ECONNREFUSED;
	}
	PQsetNoticeProcessor(c, no_notices, NULL);
	if (PQsetnonblocking(c, 1) != 0) {
		set_err(errbuf, errlen, "cannot make the connection non-blocking", PQerrorMessage(c));
		PQfinish(c);
		return EIO;
	}

	/* The server stops a statement of ours that overruns the bound too.
	 * And a grant is on disk before it is returned, whatever the server's
	 * default: with synchronous_commit off, a server crash loses the last
	 * commits, and the next acquire is handed a token again. */
	char ms[32];
	snprintf(ms, sizeof ms, "%lld", (long long)(s->bound_ns / 1000000));
	const char *v[1] = {ms};
	if (!PQsendQueryParams(c,
			       "SELECT set_config('statement_timeout', $1, false), "
			       "set_config('synchronous_commit', 'on', false)",
			       1, NULL, v, NULL, NULL, 0)) {
		rc = ECONNRESET;
		set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
	} else {
		PGresult *r = NULL;
		rc = pg_finish(c, dl, &r, errbuf, errlen);
		PQclear(r);
	}

	pthread_mutex_lock(&s->mu);
	bool schema_ok = s->schema_ok;
	pthread_mutex_unlock(&s->mu);
	if (rc == 0 && !schema_ok) {
		PGresult *r = NULL;
		rc = pg_simple(c, SCHEMA_PRESENT_SQL, dl, &r, errbuf, errlen);
		if (rc == 0) {
			bool present = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
			PQclear(r);
			if (!present)
				rc = pg_simple(c, SCHEMA_SQL, dl, NULL, errbuf, errlen);
		}
		if (rc == 0) {
			pthread_mutex_lock(&s->mu);
			s->schema_ok = true;
			pthread_mutex_unlock(&s->mu);
		}
	}
	for (int i = 0; rc == 0 && i < ST_COUNT; i++) {
		if (!PQsendPrepare(c, stmts[i].name, stmts[i].sql, stmts[i].nparams,
				   stmts[i].types)) {
			set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
			rc = ECONNRESET;
			break;
		}
		PGresult *r = NULL;
		rc = pg_finish(c, dl, &r, errbuf, errlen);
		PQclear(r);
	}
	if (rc != 0) {
		PQfinish(c);
		return rc;
	}
	*out = c;
	return 0;
}

/* Close every idle connection (after one was found dead: a server restart). */
static void pg_drain(struct pg_store *s)
{
	PGconn *dead[POOL_MAX];
	pthread_mutex_lock(&s->mu);
	int n = s->nidle;
	memcpy(dead, s->idle, sizeof(PGconn *) * (size_t)n);
	s->nidle = 0;
	pthread_mutex_unlock(&s->mu);
	for (int i = 0; i < n; i++)
		PQfinish(dead[i]);
}

static int pg_take(struct pg_store *s, const struct timespec *dl, PGconn **c, bool *fresh,
		   char *errbuf, size_t errlen)
{
	for (;;) {
		PGconn *p = NULL;
		pthread_mutex_lock(&s->mu);
		if (s->nidle > 0)
			p = s->idle[--s->nidle];
		pthread_mutex_unlock(&s->mu);
		if (p == NULL)
			break;
		if (PQstatus(p) == CONNECTION_OK && PQtransactionStatus(p) == PQTRANS_IDLE) {
			*c = p;
			*fresh = false;
			return 0;
		}
		PQfinish(p);
	}
	*fresh = true;
	return pg_open(s, dl, c, errbuf, errlen);
}

/*
 * Give c back after a call: kept if it is fine and fewer than POOL_MAX are
 * idle, else closed. `broken`: its call failed (timed out or lost), so its
 * state is unknown. Only a lost one (`dead`: the server closed it, as after
 * a restart) makes the idle ones suspect too; a call that merely timed out
 * on a slow server leaves them alone, since closing them would make the
 * next calls each open a connection, slower still.
 */
static void pg_give(struct pg_store *s, PGconn *c, bool broken, bool dead)
{
	if (!broken && PQstatus(c) == CONNECTION_OK && PQtransactionStatus(c) == PQTRANS_IDLE) {
		/* Keep c on top; close those at the bottom idle for too long. */
		PGconn *old[POOL_MAX];
		int64_t now = mono_ns();
		int n = 0;
		pthread_mutex_lock(&s->mu);
		while (n < s->nidle && now - s->idle_since[n] > s->idle_max_ns)
			n++;
		memcpy(old, s->idle, sizeof(PGconn *) * (size_t)n);
		s->nidle -= n;
		memmove(s->idle, s->idle + n, sizeof(PGconn *) * (size_t)s->nidle);
		memmove(s->idle_since, s->idle_since + n, sizeof(int64_t) * (size_t)s->nidle);
		bool kept = s->nidle < POOL_MAX;
		if (kept) {
			s->idle[s->nidle] = c;
			s->idle_since[s->nidle++] = now;
		}
		pthread_mutex_unlock(&s->mu);
		for (int i = 0; i < n; i++)
			PQfinish(old[i]);
		if (!kept)
			PQfinish(c);
		return;
	}
	PQfinish(c);
	if (dead)
		pg_drain(s);
}

/* The bound of one call: the store's, but at most half the lease. */
static int64_t call_bound(const struct pg_store *s, int64_t lease_ns)
{
	int64_t b = s->bound_ns;
	if (lease_ns > 0) {
		int64_t half = lease_ns / 2 > MIN_BOUND_NS ? lease_ns / 2 : MIN_BOUND_NS;
		if (half < b)
			b = half;
	}
	return b;
}

/*
 * Run prepared statement `st` with text/binary parameters; *res gets the
 * result on 0. A pooled connection found dead is replaced once.
 */
static int pg_call(struct pg_store *s, enum stmt st, const char *const *values,
		   const int *lengths, const int *formats, int64_t lease_ns, PGresult **res,
		   char *errbuf, size_t errlen)
{
	struct timespec dl = add_ns(mono_now(), call_bound(s, lease_ns));
	for (int attempt = 0;; attempt++) {
		PGconn *c = NULL;
		bool fresh = true;
		int rc = pg_take(s, &dl, &c, &fresh, errbuf, errlen);
		if (rc != 0)
			return rc;
		if (!PQsendQueryPrepared(c, stmts[st].name, stmts[st].nparams, values, lengths,
					 formats, 0)) {
			set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
			rc = ECONNRESET;
		} else {
			rc = pg_finish(c, &dl, res, errbuf, errlen);
		}
		/* A timed-out connection is in an unknown state: never reused. */
		bool dead = PQstatus(c) == CONNECTION_BAD || rc == ECONNRESET;
		bool broken = dead || rc == ETIMEDOUT;
		pg_give(s, c, broken, dead);
		if (broken && rc != ETIMEDOUT && !fresh && attempt == 0 && ns_until(&dl) > 0)
			continue;
		return rc;
	}
}

static int check_req(const opq_lease_request *req)
{
	if (req == NULL || req->name == NULL || req->owner == NULL || req->name[0] == '\0' ||
	    req->owner[0] == '\0' || (req->data == NULL && req->data_len > 0) ||
	    req->data_len > INT_MAX)
		return EINVAL;
	return 0;
}

static void lease_us(char *buf, size_t len, int64_t lease_ns)
{
	/* Rounded up: the store's lease is never shorter than the holder's. */
	snprintf(buf, len, "%lld", (long long)(lease_ns / 1000 + (lease_ns % 1000 != 0)));
}

static int parse_token(PGresult *r, uint64_t *token, char *errbuf, size_t errlen)
{
	char *end = NULL;
	errno = 0;
	unsigned long long t = strtoull(PQgetvalue(r, 0, 0), &end, 10);
	if (errno != 0 || end == NULL || *end != '\0' || t == 0) {
		set_err(errbuf, errlen, "the store returned a malformed token", PQgetvalue(r, 0, 0));
		return EIO;
	}
	*token = (uint64_t)t;
	return 0;
}

static int pg_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	struct pg_store *s = store;
	if (s == NULL || token == NULL || check_req(req) != 0 || req->lease_ns <= 0)
		return EINVAL;
	char us[32];
	lease_us(us, sizeof us, req->lease_ns);
	const char *values[4] = {req->name, req->owner, us,
				 req->data_len > 0 ? (const char *)req->data : NULL};
	int lengths[4] = {0, 0, 0, (int)req->data_len};
	int formats[4] = {0, 0, 0, 1};
	PGresult *r = NULL;
	int rc = pg_call(s, ST_ACQUIRE, values, lengths, formats, req->lease_ns, &r, req->errbuf,
			 req->errlen);
	if (rc != 0)
		return rc;
	if (PQntuples(r) == 0)
		rc = EBUSY;
	else
		rc = parse_token(r, token, req->errbuf, req->errlen);
	PQclear(r);
	return rc;
}

static int pg_refresh(void *store, const opq_lease_request *req)
{
	struct pg_store *s = store;
	if (s == NULL || check_req(req) != 0 || req->lease_ns <= 0 || req->token == 0 ||
	    req->token > INT64_MAX)
		return EINVAL;
	char us[32], tok[32];
	lease_us(us, sizeof us, req->lease_ns);
	snprintf(tok, sizeof tok, "%llu", (unsigned long long)req->token);
	const char *values[5] = {req->name, req->owner, tok, us,
				 req->data_len > 0 ? (const char *)req->data : NULL};
	int lengths[5] = {0, 0, 0, 0, (int)req->data_len};
	int formats[5] = {0, 0, 0, 0, 1};
	PGresult *r = NULL;
	int rc = pg_call(s, ST_REFRESH, values, lengths, formats, req->lease_ns, &r, req->errbuf,
			 req->errlen);
	if (rc != 0)
		return rc;
	rc = PQntuples(r) == 0 ? ENOLCK : 0;
	PQclear(r);
	return rc;
}

static int pg_release(void *store, const opq_lease_request *req)
{
	struct pg_store *s = store;
	if (s == NULL || check_req(req) != 0)
		return EINVAL;
	if (req->token == 0 || req->token > INT64_MAX)
		return 0; /* no such grant was ever made: nothing of ours to release */
	char tok[32];
	snprintf(tok, sizeof tok, "%llu", (unsigned long long)req->token);
	const char *values[3] = {req->name, req->owner, tok};
	PGresult *r = NULL;
	int rc = pg_call(s, ST_RELEASE, values, NULL, NULL, req->lease_ns, &r, req->errbuf,
			 req->errlen);
	PQclear(r);
	return rc;
}

static void free_strv(char **v)
{
	if (v == NULL)
		return;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
}

static void pg_destroy(void *store)
{
	struct pg_store *s = store;
	if (s == NULL)
		return;
	pg_drain(s);
	free_strv(s->keys);
	free_strv(s->vals);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

/* Parse conninfo into s->keys/vals, adding connect_timeout when missing. */
static int parse_conninfo(struct pg_store *s, const char *conninfo, char *errbuf, size_t errlen)
{
	char *perr = NULL;
	PQconninfoOption *opts = PQconninfoParse(conninfo, &perr);
	if (opts == NULL) {
		if (perr == NULL) {
			set_err(errbuf, errlen, "out of memory parsing the connection string", NULL);
			return ENOMEM;
		}
		set_err(errbuf, errlen, "bad connection string", perr);
		PQfreemem(perr);
		return EINVAL;
	}
	size_t n = 0;
	bool has_timeout = false;
	for (PQconninfoOption *o = opts; o->keyword; o++)
		if (o->val != NULL)
			n++;
	s->keys = calloc(n + 2, sizeof(char *));
	s->vals = calloc(n + 2, sizeof(char *));
	int rc = (s->keys && s->vals) ? 0 : ENOMEM;
	size_t i = 0;
	for (PQconninfoOption *o = opts; rc == 0 && o->keyword; o++) {
		if (o->val == NULL)
			continue;
		if (strcmp(o->keyword, "connect_timeout") == 0) {
			char *end = NULL;
			long t = strtol(o->val, &end, 10);
			if (end == o->val || *end != '\0' || t < 0) {
				set_err(errbuf, errlen, "bad connect_timeout in the connection string",
					o->val);
				rc = EINVAL;
				break;
			}
			has_timeout = t > 0;
			if (t > 0)
				s->bound_ns = (int64_t)(t > 3600 ? 3600 : t) * NS_PER_S;
			if (t == 0)
				continue; /* "wait forever": ours is the default bound */
		}
		s->keys[i] = strdup(o->keyword);
		s->vals[i] = strdup(o->val);
		if (s->keys[i] == NULL || s->vals[i] == NULL)
			rc = ENOMEM;
		i++;
	}
	if (rc == 0 && !has_timeout) {
		char t[16];
		snprintf(t, sizeof t, "%d", DEFAULT_BOUND_S);
		s->keys[i] = strdup("connect_timeout");
		s->vals[i] = strdup(t);
		if (s->keys[i] == NULL || s->vals[i] == NULL)
			rc = ENOMEM;
	}
	PQconninfoFree(opts);
	if (rc == ENOMEM)
		set_err(errbuf, errlen, "out of memory parsing the connection string", NULL);
	return rc;
}

int opq_lease_provider_pg(opq_lease_provider **provider, const char *conninfo, char *errbuf,
			  size_t errlen)
{
	if (errbuf != NULL && errlen > 0)
		errbuf[0] = '\0';
	if (provider == NULL || conninfo == NULL || (errbuf == NULL && errlen > 0)) {
		set_err(errbuf, errlen, "NULL argument", NULL);
		return EINVAL;
	}
	struct pg_store *s = calloc(1, sizeof *s);
	if (s == NULL) {
		set_err(errbuf, errlen, "out of memory", NULL);
		return ENOMEM;
	}
	if (pthread_mutex_init(&s->mu, NULL) != 0) {
		free(s);
		set_err(errbuf, errlen, "cannot create a mutex", NULL);
		return ENOMEM;
	}
	s->bound_ns = DEFAULT_BOUND_S * NS_PER_S;
	s->idle_max_ns = IDLE_MS * 1000000LL;
	const char *idle = getenv("OPQ_PG_IDLE_MS");
	if (idle != NULL) {
		char *end;
		errno = 0;
		long long ms = strtoll(idle, &end, 10);
		if (errno == 0 && end != idle && *end == '\0' && ms >= 0 && ms <= 86400000LL)
			s->idle_max_ns = ms * 1000000LL;
	}
	int rc = parse_conninfo(s, conninfo, errbuf, errlen);
	if (rc != 0) {
		pg_destroy(s);
		return rc;
	}
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof ops);
	ops.acquire = pg_acquire;
	ops.refresh = pg_refresh;
	ops.release = pg_release;
	ops.destroy = pg_destroy;
	rc = opq_lease_provider_create(provider, &ops, s);
	if (rc != 0) {
		set_err(errbuf, errlen, rc == ENOMEM ? "out of memory" : "cannot create the provider", NULL);
		pg_destroy(s);
	}
	return rc;
}
