/*
 * lease_pg.c: the PostgreSQL lease provider (opq_lease_provider_pg_create(3)):
 * its SQL, the three operations, the connection string and the
 * provider's creation. The connection pool that runs the statements is
 * in lease_pg_pool.c; lease_pg_impl.h has what the two files share.
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
 */
#include "lease_pg_impl.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IDLE_MS         30000
#define DEFAULT_BOUND_S 5

/* Type OIDs of the parameters (pg_type.h values, stable across versions). */
#define OID_BYTEA 17
#define OID_INT8  20
#define OID_TEXT  25

/*
 * The schema: the same text as share/opqueue/lease.sql (tests/schema.sh
 * compares them), run under a transaction-scoped advisory lock (several
 * processes may start at once, and concurrent CREATE ... IF NOT EXISTS can
 * still collide) in one multi-statement string, which PostgreSQL runs as one
 * transaction.
 */
const char opq__pg_schema_sql[] =
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

const char opq__pg_schema_present_sql[] =
    "SELECT to_regclass('opq_lease') IS NOT NULL"
    " AND to_regprocedure('opq_lease_held(text,bigint)') IS NOT NULL";

/*
 * The expiry of a lease of $N microseconds from now. A timestamp ends in the
 * year 294276: a lease of 100 years or more never expires in the store
 * ('infinity'; the holder's own count runs out first).
 */
#define EXPIRES(n)                                                                                 \
	"(CASE WHEN " n " >= 3155760000000000 THEN 'infinity'::timestamptz"                        \
	" ELSE clock_timestamp() + " n " * interval '1 microsecond' END)"

/* $1 name, $2 owner, $3 lease in microseconds, $4 data. */
static const char ACQUIRE_SQL[] =
    "INSERT INTO opq_lease AS l (name, owner, token, expires, data)"
    " VALUES ($1, $2, 1, " EXPIRES(
        "$3") ", $4)"
              " ON CONFLICT (name) DO UPDATE SET"
              "  token = CASE WHEN l.owner = excluded.owner AND l.expires > clock_timestamp()"
              "          THEN l.token ELSE l.token + 1 END,"
              "  owner = excluded.owner,"
              "  expires = " EXPIRES("$3") ","
                                           "  data = excluded.data"
                                           " WHERE l.owner IS NULL OR l.expires IS NULL OR "
                                           "l.expires <= clock_timestamp()"
                                           "  OR l.owner = excluded.owner"
                                           " RETURNING l.token";

/* $1 name, $2 owner, $3 token, $4 lease in microseconds, $5 data. */
static const char REFRESH_SQL[] = "UPDATE opq_lease SET expires = " EXPIRES(
    "$4") ","
          " data = $5"
          " WHERE name = $1 AND owner = $2 AND token = $3 AND expires > clock_timestamp()"
          " RETURNING token";

/* $1 name, $2 owner, $3 token. */
static const char RELEASE_SQL[] = "UPDATE opq_lease SET owner = NULL, expires = NULL, data = NULL"
                                  " WHERE name = $1 AND owner = $2 AND token = $3";

const struct pg_stmt opq__pg_stmts[ST_COUNT] = {
    [ST_ACQUIRE] = {"opq_lease_acquire", ACQUIRE_SQL, 4, {OID_TEXT, OID_TEXT, OID_INT8, OID_BYTEA}},
    [ST_REFRESH] = {"opq_lease_refresh",
                    REFRESH_SQL,
                    5,
                    {OID_TEXT, OID_TEXT, OID_INT8, OID_INT8, OID_BYTEA}},
    [ST_RELEASE] = {"opq_lease_release", RELEASE_SQL, 3, {OID_TEXT, OID_TEXT, OID_INT8}},
};

void opq__pg_set_err(char *buf, size_t len, const char *what, const char *msg)
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
		opq__pg_set_err(errbuf, errlen, "the store returned a malformed token",
		                PQgetvalue(r, 0, 0));
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
	int rc = opq__pg_call(s, ST_ACQUIRE, values, lengths, formats, req, &r);
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
	int rc = opq__pg_call(s, ST_REFRESH, values, lengths, formats, req, &r);
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
	int rc = opq__pg_call(s, ST_RELEASE, values, NULL, NULL, req, &r);
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
	opq__pg_drain(s);
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
			opq__pg_set_err(errbuf, errlen,
			                "out of memory parsing the connection string", NULL);
			return ENOMEM;
		}
		opq__pg_set_err(errbuf, errlen, "bad connection string", perr);
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
				opq__pg_set_err(errbuf, errlen,
				                "bad connect_timeout in the connection string",
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
		opq__pg_set_err(errbuf, errlen, "out of memory parsing the connection string",
		                NULL);
	return rc;
}

struct opq_lease_pg_attr {
	int64_t idle_ns;
};

static void pg_attr_defaults(struct opq_lease_pg_attr *a)
{
	a->idle_ns = IDLE_MS * 1000000LL;
}

int opq_lease_pg_attr_create(opq_lease_pg_attr **attr)
{
	if (attr == NULL)
		return EINVAL;
	struct opq_lease_pg_attr *a = malloc(sizeof *a);
	if (a == NULL)
		return ENOMEM;
	pg_attr_defaults(a);
	*attr = a;
	return 0;
}

void opq_lease_pg_attr_destroy(opq_lease_pg_attr *attr)
{
	free(attr);
}

int opq_lease_pg_attr_set_idle_timeout(opq_lease_pg_attr *attr, int64_t idle_ns)
{
	if (attr == NULL || idle_ns < 0)
		return EINVAL;
	attr->idle_ns = idle_ns;
	return 0;
}

int opq_lease_provider_pg_create(opq_lease_provider **provider, const char *conninfo,
                                 const opq_lease_pg_attr *attr, char *errbuf, size_t errlen)
{
	if (errbuf != NULL && errlen > 0)
		errbuf[0] = '\0';
	if (provider == NULL || conninfo == NULL || (errbuf == NULL && errlen > 0)) {
		opq__pg_set_err(errbuf, errlen, "NULL argument", NULL);
		return EINVAL;
	}
	struct pg_store *s = calloc(1, sizeof *s);
	if (s == NULL) {
		opq__pg_set_err(errbuf, errlen, "out of memory", NULL);
		return ENOMEM;
	}
	if (pthread_mutex_init(&s->mu, NULL) != 0) {
		free(s);
		opq__pg_set_err(errbuf, errlen, "cannot create a mutex", NULL);
		return ENOMEM;
	}
	s->bound_ns = DEFAULT_BOUND_S * NS_PER_S;
	struct opq_lease_pg_attr defaults;
	if (attr == NULL) {
		pg_attr_defaults(&defaults);
		attr = &defaults;
	}
	s->idle_max_ns = attr->idle_ns;
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
		opq__pg_set_err(errbuf, errlen,
		                rc == ENOMEM ? "out of memory" : "cannot create the provider",
		                NULL);
		pg_destroy(s);
	}
	return rc;
}
