/*
 * opqueue/lease_etcd.h: the etcd lease provider (opq_lease_provider_etcd_create(3)).
 *
 * Library: -lopqueue-etcd (pkg-config opqueue-etcd), which links libcurl
 * and jansson; a program that does not use this header needs neither.
 *
 * Lease locks kept in an etcd cluster (the v3 API, through the JSON
 * gateway that etcd 3.4 serves on its client URLs): a lock is the key
 * PREFIX + name, attached to an etcd lease whose TTL etcd's leader counts
 * down; the fencing token is the key's create_revision. A client object
 * (opq_lease_etcd) holds the members' URLs and the connections; the
 * provider and the guard opq_lease_etcd_put_if_held(3) use it.
 *
 * Ownership: opq_lease_etcd_create makes a client; opq_lease_etcd_destroy
 * drops the caller's reference, and a provider made from it keeps its own
 * until opq_lease_provider_destroy, so the two may be destroyed in either
 * order. Every string argument is copied.
 */
#ifndef OPQUEUE_LEASE_ETCD_H
#define OPQUEUE_LEASE_ETCD_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <opqueue/lease.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Limits: the key prefix, and the endpoints (members) of one client. */
#define OPQ_LEASE_ETCD_PREFIX_MAX    255
#define OPQ_LEASE_ETCD_ENDPOINTS_MAX 16

typedef struct opq_lease_etcd opq_lease_etcd;
typedef struct opq_lease_etcd_attr opq_lease_etcd_attr;

/*
 * Attributes of an etcd client (pthread_attr style). Defaults: key prefix
 * "opq/lease/", request timeout 2 s. The caller frees them with
 * opq_lease_etcd_attr_destroy (NULL is a no-op) once its clients are
 * created: a client copies them. Not thread-safe.
 * Errors: EINVAL (attr NULL), ENOMEM.
 */
OPQ_EXPORT int opq_lease_etcd_attr_create(opq_lease_etcd_attr **attr);
OPQ_EXPORT void opq_lease_etcd_attr_destroy(opq_lease_etcd_attr *attr);
/* The prefix of every lock key: 0..OPQ_LEASE_ETCD_PREFIX_MAX bytes, no NUL; EINVAL otherwise. */
OPQ_EXPORT int opq_lease_etcd_attr_set_prefix(opq_lease_etcd_attr *attr, const char *prefix);
/*
 * The longest one HTTP request to one member may take, in ns (> 0, at most
 * one hour; EINVAL otherwise). A call also ends by its own deadline, and
 * shares what is left of it among the members it has not tried yet, so
 * that a frozen member leaves time to fail over to the next.
 */
OPQ_EXPORT int opq_lease_etcd_attr_set_timeout(opq_lease_etcd_attr *attr, int64_t timeout_ns);

/*
 * Make a client for the etcd cluster whose members' client URLs are in
 * `endpoints`, comma-separated ("http://10.0.0.1:2379,http://10.0.0.2:2379";
 * 1..OPQ_LEASE_ETCD_ENDPOINTS_MAX of them, http:// or https://), with
 * attributes attr (NULL: the defaults). Nothing is sent yet. Errors: EINVAL
 * (NULL argument or a malformed list: words in errbuf), ENOMEM. errbuf
 * (errlen bytes; may be NULL when errlen is 0) gets the words of a failure.
 */
OPQ_EXPORT int opq_lease_etcd_create(opq_lease_etcd **etcd, const char *endpoints,
                                     const opq_lease_etcd_attr *attr, char *errbuf, size_t errlen);
/* Drop the caller's reference to a client (see above). NULL is a no-op. */
OPQ_EXPORT void opq_lease_etcd_destroy(opq_lease_etcd *etcd);

/*
 * A lease provider on the client `etcd` (which it keeps a reference to).
 * Destroyed with opq_lease_provider_destroy. Errors: EINVAL, ENOMEM.
 */
OPQ_EXPORT int opq_lease_provider_etcd_create(opq_lease_provider **provider, opq_lease_etcd *etcd);

/*
 * The guard for the holder's own writes: put `value` (value_len bytes) at
 * `key` (key_len bytes, >= 1) in one etcd transaction that succeeds only if
 * the lock `name` is still held with the fencing token `token` (its key
 * still has that create_revision). Returns 0 when written, ENOLCK when the
 * lock is not held with that token (nothing written), EINVAL, or a store
 * failure (ETIMEDOUT, ECONNREFUSED, EIO, ...; the write may or may not have
 * happened) with words in errbuf. deadline: absolute CLOCK_MONOTONIC, NULL:
 * each member is tried once within the client's request timeout.
 */
OPQ_EXPORT int opq_lease_etcd_put_if_held(opq_lease_etcd *etcd, const char *name, uint64_t token,
                                          const void *key, size_t key_len, const void *value,
                                          size_t value_len, const struct timespec *deadline,
                                          char *errbuf, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_LEASE_ETCD_H */
