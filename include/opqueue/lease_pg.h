/*
 * opqueue/lease_pg.h: the PostgreSQL lease provider (opq_lease_provider_pg_create(3)).
 *
 * Library: -lopqueue-pg (pkg-config opqueue-pg), which links libpq; a
 * program that does not use this header does not need either.
 *
 * Lease locks shared by the hosts of one PostgreSQL server: one table,
 * opq_lease, created on first use when missing (or beforehand from the
 * installed share/opqueue/lease.sql); expiry by the server's clock alone; a
 * guard function, opq_lease_held(name, token), for the users' own writes in
 * the same database. Ownership: the provider is destroyed with
 * opq_lease_provider_destroy, which closes its connections.
 */
#ifndef OPQUEUE_LEASE_PG_H
#define OPQUEUE_LEASE_PG_H

#include <stddef.h>

#include <opqueue/lease.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Create a provider on the PostgreSQL server named by the libpq connection
 * string `conninfo` ("host=db1 dbname=app user=locks", or a postgresql://
 * URI; copied). Nothing is sent yet: connections are made on first use,
 * each bounded by the string's connect_timeout (default 5 s), which also
 * bounds every statement. Errors: EINVAL (NULL argument, or a connection
 * string that does not parse: words in errbuf), ENOMEM. errbuf (errlen
 * bytes, may be NULL when errlen is 0) gets the words of a failure.
 */
OPQ_EXPORT int opq_lease_provider_pg_create(opq_lease_provider **provider, const char *conninfo,
                                            char *errbuf, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_LEASE_PG_H */
