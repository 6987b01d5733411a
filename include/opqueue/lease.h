/*
 * opqueue/lease.h: lease locks with fencing tokens (see opq_lease_create(3)).
 *
 * A lease lock gives its holder a named resource for a lease time. The
 * holder refreshes the lease while it works; if it dies, another owner
 * takes over once the lease has run out by the store's one clock. Every
 * successful acquire returns a fencing token, a 64-bit integer that strictly
 * increases per lock name across all holders, forever, so the resource can
 * refuse a holder whose lease has expired (a paused process that woke up).
 *
 * The store is a provider (a table of functions): the memory provider here
 * (threads of one process), SQLite (<opqueue/lease_sqlite.h>, library
 * -lopqueue-sqlite), PostgreSQL (<opqueue/lease_pg.h>, library
 * -lopqueue-pg), or the caller's own (opq_lease_provider_create).
 *
 * Ownership: a provider is created by its constructor and destroyed with
 * opq_lease_provider_destroy once no lease uses it. A lease handle is
 * created by opq_lease_create on one provider and destroyed with
 * opq_lease_destroy (which does not release the lock: call
 * opq_lease_release first). Every string and buffer argument is copied; the
 * caller keeps its own. A lease handle and a provider may be used from
 * several threads at once.
 */
#ifndef OPQUEUE_LEASE_H
#define OPQUEUE_LEASE_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <opqueue/common.h>
#include <opqueue/queue.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Limits: a lock name and an owner are 1..N bytes (no NUL inside); the data 0..N bytes. */
#define OPQ_LEASE_NAME_MAX  255
#define OPQ_LEASE_OWNER_MAX 255
#define OPQ_LEASE_DATA_MAX  1024

typedef struct opq_lease opq_lease;
typedef struct opq_lease_attr opq_lease_attr;
typedef struct opq_lease_provider opq_lease_provider;

/*
 * What a successful acquire or refresh tells its caller. A plain value
 * owned by the caller.
 *   token:    the fencing token (unchanged by refresh; >= 1).
 *   acquired: the local CLOCK_MONOTONIC instant taken just BEFORE the
 *             request was sent: the lease runs from there (the safe side).
 *   lease_ns: the lease duration granted.
 */
typedef struct opq_lease_grant {
	uint64_t token;
	struct timespec acquired;
	int64_t lease_ns;
} opq_lease_grant;

/* ---- attributes (pthread_attr style; every setter copies its argument) ---- */

/* Create attributes with the defaults: owner "HOST:PID:RANDOM", lease 10 s,
 * safety margin 1% of the lease + 10 ms, blocking acquire polls every 10 ms
 * growing to 1 s, no data. Errors: EINVAL, ENOMEM. */
OPQ_EXPORT int opq_lease_attr_create(opq_lease_attr **attr);
/* Free attributes (a handle keeps its own copy). Cannot fail; NULL is a no-op. */
OPQ_EXPORT void opq_lease_attr_destroy(opq_lease_attr *attr);
/* Owner identity: 1..OPQ_LEASE_OWNER_MAX bytes, else EINVAL. */
OPQ_EXPORT int opq_lease_attr_set_owner(opq_lease_attr *attr, const char *owner);
/* Lease duration in ns, > 0 (EINVAL otherwise). */
OPQ_EXPORT int opq_lease_attr_set_duration(opq_lease_attr *attr, int64_t lease_ns);
/* Safety margin for clock-rate drift: remaining() subtracts
 * lease_ns * ppm / 1e6 + fixed_ns. Both >= 0, and the margin must be
 * smaller than the lease (checked at opq_lease_create: EINVAL). */
OPQ_EXPORT int opq_lease_attr_set_margin(opq_lease_attr *attr, int64_t ppm, int64_t fixed_ns);
/* Blocking acquire polling: first wait min_ns, doubling (with jitter) up to
 * max_ns. 0 < min_ns <= max_ns, else EINVAL. */
OPQ_EXPORT int opq_lease_attr_set_poll(opq_lease_attr *attr, int64_t min_ns, int64_t max_ns);
/* Deliver the keepalive's lost callback as a completion on ch (called by
 * opq_chan_run on the loop's thread) instead of on the library's threads;
 * NULL (the default) for the library's threads. The channel must outlive
 * the handle's keepalives. Errors: EINVAL (attr NULL). */
OPQ_EXPORT int opq_lease_attr_set_chan(opq_lease_attr *attr, opq_chan *ch);
/* Small data stored with the lock while held (who, why): 0..OPQ_LEASE_DATA_MAX bytes. */
OPQ_EXPORT int opq_lease_attr_set_data(opq_lease_attr *attr, const void *data, size_t len);

/* ---- lease handles ---- */

/*
 * Create a handle for the lock `name` (1..OPQ_LEASE_NAME_MAX bytes) on
 * `provider`, with attributes `attr` (NULL: defaults; the attributes are
 * copied). Nothing is sent to the store. Errors: EINVAL, ENOMEM.
 */
OPQ_EXPORT int opq_lease_create(opq_lease **lease, opq_lease_provider *provider, const char *name,
                                const opq_lease_attr *attr);
/* Destroy a handle: stops its keepalive (waiting for a refresh in flight),
 * does NOT release the lock. EDEADLK when called from the handle's own
 * lost-callback; EBUSY (keepalive stopped, handle kept) while its lost
 * delivery waits in the handle's channel. NULL is a no-op returning 0. */
OPQ_EXPORT int opq_lease_destroy(opq_lease *lease);

/*
 * Try once to acquire: succeeds when the lock is free, released, expired
 * (by the store's clock), or already held by this owner (then the token is
 * unchanged and the lease is extended, so a retried acquire whose reply was
 * lost never mints a second token). The store call is bounded by one lease
 * time (plus the store's slack, opq_lease_acquire(3)). Errors: EBUSY (held
 * by another owner), EINVAL, or a store error (EIO, ECONNREFUSED,
 * ETIMEDOUT, ENOMEM, ...) with words from opq_lease_error. grant may be
 * NULL.
 */
OPQ_EXPORT int opq_lease_try_acquire(opq_lease *lease, opq_lease_grant *grant);
/*
 * Acquire, polling with backoff until `deadline` (NULL: forever) while the
 * lock is held by another owner or the store fails (the last failure's
 * words stay in opq_lease_error). Each try's store call is given the time
 * left (at most one lease time), so the call returns by the deadline plus
 * the store's slack (see opq_lease_acquire(3)). Errors: EINVAL, ETIMEDOUT
 * when the deadline passed, ECANCELED (opq_lease_cancel on the handle, or a
 * cancelled scope task); never EBUSY or a store failure, which are retried.
 */
OPQ_EXPORT int opq_lease_acquire(opq_lease *lease, const struct timespec *deadline,
                                 opq_lease_grant *grant);
/*
 * Cancel the handle's blocking acquires, from any thread (a daemon's signal
 * thread at shutdown): an opq_lease_acquire in progress returns ECANCELED
 * as soon as its current store call returns (at once when it is waiting
 * between tries), and every later one returns ECANCELED at once. The
 * cancel stays. opq_lease_try_acquire, refresh, release and the keepalive
 * are not affected, so the lease can still be released. Errors: EINVAL.
 */
OPQ_EXPORT int opq_lease_cancel(opq_lease *lease);
/*
 * Extend the lease held (conditional on owner and token at the store).
 * The store call is bounded by the lease's local end (acquired + lease -
 * margin), or by one lease time once that has passed. Errors: ENOLCK (not
 * held: it expired and was taken, or was released), EINVAL, or a store
 * error (the lease may still be ours). The token does not change; grant
 * (may be NULL) gets the new instant.
 */
OPQ_EXPORT int opq_lease_refresh(opq_lease *lease, opq_lease_grant *grant);
/* Release the lease (conditional on owner and token): 0 also when it was
 * not held any more (idempotent). The store call is bounded by one lease
 * time. Store errors as above. */
OPQ_EXPORT int opq_lease_release(opq_lease *lease);
/*
 * How long the holder may still act, in ns, from the local monotonic clock
 * at `now` (NULL: the current instant): acquired + lease - margin - now,
 * less the time the system was suspended since `acquired` (the monotonic
 * clock stands still then, the store's does not), or 0 when that has passed
 * or the lease is not held: stop mutating now.
 */
OPQ_EXPORT int opq_lease_remaining(opq_lease *lease, const struct timespec *now, int64_t *ns);
/* The current grant (ENOLCK if not held). */
OPQ_EXPORT int opq_lease_grant_get(opq_lease *lease, opq_lease_grant *grant);
/* Copy the words of the last store error on this handle into buf (always
 * NUL-terminated, truncated to len). EINVAL if buf is NULL or len is 0. */
OPQ_EXPORT int opq_lease_error(opq_lease *lease, char *buf, size_t len);

/* ---- keepalive ---- */

/* Why a lease was lost. */
enum opq_lease_lost_reason {
	/* The store could not be reached before the lease would end locally:
	 * the lease may still be ours at the store, but we cannot prove it. */
	OPQ_LEASE_UNREACHABLE = 1,
	/* The store says another owner holds it, or it was released elsewhere. */
	OPQ_LEASE_TAKEN = 2,
};
typedef void opq_lease_lost_fn(opq_lease *lease, enum opq_lease_lost_reason why, void *arg);

/*
 * Refresh the held lease every interval_ns (0: a third of lease - margin),
 * and call lost(lease, why, arg) once, before the lease ends locally
 * (acquired + lease - margin), if it cannot be confirmed by then; the
 * keepalive then ends. With `queue` NULL (the usual choice) the refreshes
 * run on a thread of the library's own, started for this keepalive and
 * named "opq-lease", so that no user work can delay them; with a queue
 * they are operations on it (a busy queue delays them, and a full one
 * refuses them). lost(OPQ_LEASE_UNREACHABLE) runs on the library's timer
 * thread ("opq-timer"); lost(OPQ_LEASE_TAKEN) on the thread that ran the
 * refresh ("opq-lease", or a runner of `queue`). Errors: ENOLCK (not
 * held), EBUSY (already running), EINVAL, ESHUTDOWN (queue stopping),
 * EAGAIN (a thread could not be started), EDEADLK (from the handle's own
 * lost callback).
 */
OPQ_EXPORT int opq_lease_keepalive_start(opq_lease *lease, opq_queue *queue, int64_t interval_ns,
                                         opq_lease_lost_fn *lost, void *arg);
/* Stop the keepalive, waiting for a refresh in flight; 0 also when none
 * runs. EDEADLK from the lost-callback. */
OPQ_EXPORT int opq_lease_keepalive_stop(opq_lease *lease);

/* ---- providers ---- */

/*
 * What the library hands a provider. All strings NUL-terminated and valid
 * for the call only. `token` is the token held (refresh, release) or 0.
 * A provider writes words about a failure into errbuf (errlen bytes,
 * NUL-terminated).
 */
typedef struct opq_lease_request {
	const char *name;
	const char *owner;
	int64_t lease_ns;
	const void *data;
	size_t data_len;
	uint64_t token;
	char *errbuf;
	size_t errlen;
	/* The store call returns by this CLOCK_MONOTONIC instant (see
	 * opq_lease_provider_create(3)); always set, possibly already past
	 * (then: do not wait for anything). */
	struct timespec deadline;
	/* The library's own: providers leave it alone (opq_lease_request_check). */
	const void *opq__call;
} opq_lease_request;

/*
 * For a provider that waits in steps (a busy handler, a retry loop):
 * whether to go on. 0: go on; ETIMEDOUT: the request's deadline passed;
 * ECANCELED: the blocking acquire that made the request was cancelled
 * (opq_lease_cancel, or its scope task); return that from the call.
 * EINVAL when req is NULL.
 */
OPQ_EXPORT int opq_lease_request_check(const opq_lease_request *req);

/*
 * A provider's functions. Each returns 0, or:
 *   acquire: EBUSY when another owner holds an unexpired lease; on success
 *            *token is the new token (or the current one when this owner
 *            already holds it: then the lease is extended);
 *   refresh: ENOLCK when the lock is not held by (owner, token) any more;
 *   release: 0 whether or not it was still held by (owner, token); never
 *            touches another owner's lease;
 *   any:     another positive errno for a store failure (unreachable,
 *            corrupt...), with words in errbuf.
 * Each must be safe to call from several threads at once on one store.
 * destroy (may be NULL) frees the store. Zero the whole struct first:
 * `reserved` is for later members.
 */
typedef struct opq_lease_provider_ops {
	int (*acquire)(void *store, const opq_lease_request *req, uint64_t *token);
	int (*refresh)(void *store, const opq_lease_request *req);
	int (*release)(void *store, const opq_lease_request *req);
	void (*destroy)(void *store);
	void *reserved[4];
} opq_lease_provider_ops;

/* Wrap the caller's own store (ops is copied; store is handed to every
 * call and to destroy). Errors: EINVAL (NULL or missing function), ENOMEM. */
OPQ_EXPORT int opq_lease_provider_create(opq_lease_provider **provider,
                                         const opq_lease_provider_ops *ops, void *store);
/* The memory provider: threads of one process; tokens live as long as it. */
OPQ_EXPORT int opq_lease_provider_memory_create(opq_lease_provider **provider);
/* Destroy a provider: EBUSY while a lease handle uses it. NULL is a no-op
 * returning 0. */
OPQ_EXPORT int opq_lease_provider_destroy(opq_lease_provider *provider);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_LEASE_H */
