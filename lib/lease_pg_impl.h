/*
 * lease_pg_impl.h: the PostgreSQL lease provider's private declarations,
 * shared by its two files (lease_pg.c: the SQL, the operations and the
 * provider's creation; lease_pg_pool.c: the connections and their pool).
 * Never installed.
 *
 * libopqueue-pg is its own library, built on libopqueue's public provider
 * interface only: this header stands in for lib/internal.h, which it does
 * not include. Its names start with opq__pg_ and have hidden visibility.
 */
#ifndef OPQ_LEASE_PG_IMPL_H
#define OPQ_LEASE_PG_IMPL_H

#include "config.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <libpq-fe.h>

#include "opqueue/lease_pg.h"

/* As in internal.h. */
#ifndef OPQ_INTERNAL
#define OPQ_INTERNAL __attribute__((visibility("hidden")))
#endif

#define POOL_MAX 16
#define NS_PER_S 1000000000LL

/* The prepared statements (lease_pg.c), prepared on every connection. */
enum stmt { ST_ACQUIRE, ST_REFRESH, ST_RELEASE, ST_COUNT };

struct pg_stmt {
	const char *name;
	const char *sql;
	int nparams;
	Oid types[5];
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
	/* Connections whose call ran out of time while the server worked on
	 * it: reused once the late answer has come (under mu; oldest first). */
	int nlate;
	PGconn *late[POOL_MAX];
	int64_t connect_ns; /* under mu: how long the last new connection took to set up */
};

/* lease_pg.c: the statements, indexed by enum stmt. */
OPQ_INTERNAL extern const struct pg_stmt opq__pg_stmts[ST_COUNT];
/* lease_pg.c: the schema (created when missing), and the query that tells whether it is there. */
OPQ_INTERNAL extern const char opq__pg_schema_sql[];
OPQ_INTERNAL extern const char opq__pg_schema_present_sql[];
/*
 * lease_pg.c: write "PostgreSQL: what: msg" into buf (len bytes; nothing
 * when buf is NULL or len 0), on one line.
 */
OPQ_INTERNAL void opq__pg_set_err(char *buf, size_t len, const char *what, const char *msg);

/*
 * lease_pg_pool.c: run prepared statement st on a pooled connection for
 * the request req, by its deadline or the store's own bound (the
 * connection string's connect_timeout, at most half the lease) if that
 * comes first: 0 with *res the result, or an errno with words in
 * req->errbuf.
 */
OPQ_INTERNAL int opq__pg_call(struct pg_store *s, enum stmt st, const char *const *values,
                              const int *lengths, const int *formats, const opq_lease_request *req,
                              PGresult **res);
/* lease_pg_pool.c: close every idle (and late) connection (a server restart; the store's destroy).
 */
OPQ_INTERNAL void opq__pg_drain(struct pg_store *s);

#endif /* OPQ_LEASE_PG_IMPL_H */
