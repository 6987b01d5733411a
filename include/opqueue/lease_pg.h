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
#include <stdint.h>

#include <opqueue/lease.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct opq_lease_pg_attr opq_lease_pg_attr;

/*
 * Attributes of a PostgreSQL provider (pthread_attr style: options are
 * added as setters). opq_lease_pg_attr_create allocates one with the
 * defaults (idle timeout 30 s); the caller frees it with
 * opq_lease_pg_attr_destroy (NULL is a no-op) once its providers are
 * created: a provider copies what it needs. Not thread-safe.
 * Errors: EINVAL (attr NULL), ENOMEM.
 */
OPQ_EXPORT int opq_lease_pg_attr_create(opq_lease_pg_attr **attr);
OPQ_EXPORT void opq_lease_pg_attr_destroy(opq_lease_pg_attr *attr);
/*
 * How long, in ns, a pooled connection may stay idle while the calls do
 * not need it: once it has, the next connection given back closes it.
 * >= 0 (0: keep only the connection given back last); EINVAL otherwise.
 */
OPQ_EXPORT int opq_lease_pg_attr_set_idle_timeout(opq_lease_pg_attr *attr, int64_t idle_ns);

/*
 * Create a provider on the PostgreSQL server named by the libpq connection
 * string `conninfo` ("host=db1 dbname=app user=locks", or a postgresql://
 * URI; copied), with attributes `attr` (NULL: the defaults; copied).
 * Nothing is sent yet: connections are made on first use, each bounded by
 * the string's connect_timeout (default 5 s), which also bounds every
 * statement. Errors: EINVAL (NULL argument, or a connection string that
 * does not parse: words in errbuf), ENOMEM. errbuf (errlen bytes, may be
 * NULL when errlen is 0) gets the words of a failure.
 */
OPQ_EXPORT int opq_lease_provider_pg_create(opq_lease_provider **provider, const char *conninfo,
                                            const opq_lease_pg_attr *attr, char *errbuf,
                                            size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_LEASE_PG_H */
