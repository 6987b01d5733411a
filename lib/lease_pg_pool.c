/*
 * lease_pg_pool.c: the PostgreSQL lease provider's connections: libpq
 * without blocking, every wait bounded by a deadline; a connection's
 * setup (session settings, schema, prepared statements); the pool of idle
 * connections; and opq__pg_call, which runs one prepared statement on a
 * pooled connection. The SQL and the operations are in lease_pg.c.
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
 * and token, so the retry cannot mint a second token. One whose call ran
 * out of time (the caller's deadline, which may be a few ms) is kept aside
 * as late, not closed: the next call that finds no idle connection looks
 * whether the late answer has come, without waiting, and then reuses it.
 * Closing it would make every short deadline cost a new connection, and
 * under short deadlines the calls would do nothing else (the stress's 2 ms
 * leases ran 96000 store failures and 27 grants in 10 s so). A late
 * connection whose server is stopped stays late until the server's
 * statement_timeout ends its statement. For the same reason a call with
 * less time left than the last new connection took to set up does not
 * open one (ETIMEDOUT at once). Idle connections are a stack: the one given back last is
 * taken first, so those at the bottom are the ones no call has needed for
 * the longest; once one has been idle for the provider's idle timeout
 * (opq_lease_pg_attr_set_idle_timeout, default 30 s), the next connection
 * given back closes it. So the pool shrinks back to what the calls use
 * after a burst (a fleet's hosts would otherwise each keep their peak
 * until they stop).
 */
#include "lease_pg_impl.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* A statement bound never below this, however short the lease. */
#define MIN_BOUND_NS (200LL * 1000000LL)

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
			opq__pg_set_err(errbuf, errlen, "timed out sending to the server", NULL);
			return ETIMEDOUT;
		}
		if (rc != 0 || !PQconsumeInput(c)) {
			f = -1;
			break;
		}
	}
	if (f < 0) {
		opq__pg_set_err(errbuf, errlen, "sending to the server failed", PQerrorMessage(c));
		return ECONNRESET;
	}
	PGresult *last = NULL;
	for (;;) {
		while (PQisBusy(c)) {
			int rc = wait_fd(PQsocket(c), POLLIN, dl);
			if (rc == ETIMEDOUT) {
				PQclear(last);
				opq__pg_set_err(errbuf, errlen, "timed out waiting for the server",
				                NULL);
				return ETIMEDOUT;
			}
			if (rc != 0 || !PQconsumeInput(c)) {
				PQclear(last);
				opq__pg_set_err(errbuf, errlen, "connection lost",
				                PQerrorMessage(c));
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
		opq__pg_set_err(errbuf, errlen, "no result", PQerrorMessage(c));
		return PQstatus(c) == CONNECTION_BAD ? ECONNRESET : EIO;
	}
	ExecStatusType st = PQresultStatus(last);
	if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
		const char *state = PQresultErrorField(last, PG_DIAG_SQLSTATE);
		int rc = state ? sqlstate_errno(state)
		               : (PQstatus(c) == CONNECTION_BAD ? ECONNRESET : EIO);
		opq__pg_set_err(errbuf, errlen, "", PQresultErrorMessage(last));
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
		opq__pg_set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
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
	PGconn *c =
	    PQconnectStartParams((const char *const *)s->keys, (const char *const *)s->vals, 0);
	if (c == NULL) {
		opq__pg_set_err(errbuf, errlen, "out of memory for a connection", NULL);
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
		opq__pg_set_err(errbuf, errlen, "timed out connecting to the server",
		                PQerrorMessage(c));
		PQfinish(c);
		return ETIMEDOUT;
	}
	if (ps != PGRES_POLLING_OK) {
		opq__pg_set_err(errbuf, errlen, "cannot connect", PQerrorMessage(c));
		PQfinish(c);
		return ECONNREFUSED;
	}
	PQsetNoticeProcessor(c, no_notices, NULL);
	if (PQsetnonblocking(c, 1) != 0) {
		opq__pg_set_err(errbuf, errlen, "cannot make the connection non-blocking",
		                PQerrorMessage(c));
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
		opq__pg_set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
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
		rc = pg_simple(c, opq__pg_schema_present_sql, dl, &r, errbuf, errlen);
		if (rc == 0) {
			bool present = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
			PQclear(r);
			if (!present)
				rc = pg_simple(c, opq__pg_schema_sql, dl, NULL, errbuf, errlen);
		}
		if (rc == 0) {
			pthread_mutex_lock(&s->mu);
			s->schema_ok = true;
			pthread_mutex_unlock(&s->mu);
		}
	}
	for (int i = 0; rc == 0 && i < ST_COUNT; i++) {
		if (!PQsendPrepare(c, opq__pg_stmts[i].name, opq__pg_stmts[i].sql,
		                   opq__pg_stmts[i].nparams, opq__pg_stmts[i].types)) {
			opq__pg_set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
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

/* Close every idle and late connection (after one was found dead: a server restart). */
void opq__pg_drain(struct pg_store *s)
{
	PGconn *dead[2 * POOL_MAX];
	pthread_mutex_lock(&s->mu);
	int n = s->nidle, m = s->nlate;
	memcpy(dead, s->idle, sizeof(PGconn *) * (size_t)n);
	memcpy(dead + n, s->late, sizeof(PGconn *) * (size_t)m);
	s->nidle = 0;
	s->nlate = 0;
	pthread_mutex_unlock(&s->mu);
	for (int i = 0; i < n + m; i++)
		PQfinish(dead[i]);
}

/* Whether a late connection's answer has come, without waiting: 1 (then
 * it is idle again), 0 (not yet), -1 (it is dead: close it). */
static int late_done(PGconn *c)
{
	if (PQstatus(c) != CONNECTION_OK)
		return -1;
	int f = PQflush(c);
	if (f < 0 || !PQconsumeInput(c))
		return -1;
	if (f == 1)
		return 0;
	while (!PQisBusy(c)) {
		PGresult *r = PQgetResult(c);
		if (r == NULL)
			return PQtransactionStatus(c) == PQTRANS_IDLE ? 1 : -1;
		PQclear(r);
	}
	return 0;
}

/* Keep c aside until its late answer comes (late_take), or close it if the pool is full. */
static void late_keep(struct pg_store *s, PGconn *c)
{
	pthread_mutex_lock(&s->mu);
	bool kept = s->nlate < POOL_MAX;
	if (kept)
		s->late[s->nlate++] = c;
	pthread_mutex_unlock(&s->mu);
	if (!kept)
		PQfinish(c);
}

/* A late connection whose answer has come, or NULL; looks at the oldest
 * few, and puts one not done yet back at the end. */
static PGconn *late_take(struct pg_store *s)
{
	for (int tries = 0; tries < 2; tries++) {
		PGconn *c = NULL;
		pthread_mutex_lock(&s->mu);
		if (s->nlate > 0) {
			c = s->late[0];
			memmove(s->late, s->late + 1, sizeof(PGconn *) * (size_t)--s->nlate);
		}
		pthread_mutex_unlock(&s->mu);
		if (c == NULL)
			return NULL;
		int done = late_done(c);
		if (done > 0)
			return c;
		if (done < 0) {
			PQfinish(c);
			continue;
		}
		late_keep(s, c);
	}
	return NULL;
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
	PGconn *p = late_take(s);
	if (p != NULL) {
		*c = p;
		*fresh = false;
		return 0;
	}
	*fresh = true;
	/* A call with less time left than the last new connection took does
	 * not start one: it would only cost the server a process that is
	 * closed before it serves anything. */
	pthread_mutex_lock(&s->mu);
	int64_t need = s->connect_ns;
	pthread_mutex_unlock(&s->mu);
	if (ns_until(dl) < need) {
		char ms[64];
		snprintf(ms, sizeof ms, "the last one took %.1f ms", need / 1e6);
		opq__pg_set_err(errbuf, errlen, "no time left to connect", ms);
		return ETIMEDOUT;
	}
	int64_t t0 = mono_ns();
	int rc = pg_open(s, dl, c, errbuf, errlen);
	if (rc == 0) {
		pthread_mutex_lock(&s->mu);
		s->connect_ns = mono_ns() - t0;
		pthread_mutex_unlock(&s->mu);
	}
	return rc;
}

/*
 * Give c back after a call: kept if it is fine and fewer than POOL_MAX are
 * idle, else closed. `broken`: its call failed (timed out or lost), so its
 * state is unknown. Only a lost one (`dead`: the server closed it, as after
 * a restart) makes the idle ones suspect too; a call that merely timed out
 * on a slow server leaves them alone, since closing them would make the
 * next calls each open a connection, slower still. `late`: its call ran
 * out of time with the statement sent; it is kept aside until its answer
 * comes (late_take).
 */
static void pg_give(struct pg_store *s, PGconn *c, bool broken, bool dead, bool late)
{
	if (late && !dead && PQstatus(c) == CONNECTION_OK) {
		late_keep(s, c);
		return;
	}
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
		opq__pg_drain(s);
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
int opq__pg_call(struct pg_store *s, enum stmt st, const char *const *values, const int *lengths,
                 const int *formats, const opq_lease_request *req, PGresult **res)
{
	char *errbuf = req->errbuf;
	size_t errlen = req->errlen;
	/* The caller's deadline, or the store's own bound if that comes first. */
	struct timespec dl = add_ns(mono_now(), call_bound(s, req->lease_ns));
	if (ns_until(&req->deadline) < ns_until(&dl))
		dl = req->deadline;
	/* No time for a round trip: fail before taking a connection, which a
	 * statement cut short would leave in an unknown state (closed). */
	if (ns_until(&dl) <= 0) {
		opq__pg_set_err(errbuf, errlen, "no time left for a round trip to the server",
		                NULL);
		return ETIMEDOUT;
	}
	for (int attempt = 0;; attempt++) {
		/* A cancelled acquire makes no (further) round trip. */
		if (opq_lease_request_check(req) == ECANCELED) {
			opq__pg_set_err(errbuf, errlen, "the acquire was cancelled", NULL);
			return ECANCELED;
		}
		PGconn *c = NULL;
		bool fresh = true;
		int rc = pg_take(s, &dl, &c, &fresh, errbuf, errlen);
		if (rc != 0)
			return rc;
		if (!PQsendQueryPrepared(c, opq__pg_stmts[st].name, opq__pg_stmts[st].nparams,
		                         values, lengths, formats, 0)) {
			opq__pg_set_err(errbuf, errlen, "sending failed", PQerrorMessage(c));
			rc = ECONNRESET;
		} else {
			rc = pg_finish(c, &dl, res, errbuf, errlen);
		}
		/* A timed-out connection is reused only once its answer came. */
		bool dead = PQstatus(c) == CONNECTION_BAD || rc == ECONNRESET;
		bool broken = dead || rc == ETIMEDOUT;
		pg_give(s, c, broken, dead, rc == ETIMEDOUT);
		if (broken && rc != ETIMEDOUT && !fresh && attempt == 0 && ns_until(&dl) > 0)
			continue;
		return rc;
	}
}
