/*
 * lease_etcd_impl.h: the etcd lease provider's private declarations, shared
 * by its three files: lease_etcd.c (the client object, the operations, the
 * guard), lease_etcd_http.c (the HTTP requests, the handle pool, failover
 * between members) and lease_etcd_json.c (request bodies, reply parsing,
 * base64). Never installed.
 *
 * libopqueue-etcd is its own library on libopqueue's public provider
 * interface only: this header stands in for lib/internal.h, which it does
 * not include. lease_etcd_json.c needs neither libcurl nor libopqueue, so
 * that the fuzz harness (tests/fuzz_etcd.c) builds it alone.
 */
#ifndef OPQ_LEASE_ETCD_IMPL_H
#define OPQ_LEASE_ETCD_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "opqueue/lease_etcd.h"

#ifndef OPQ_INTERNAL
#define OPQ_INTERNAL __attribute__((visibility("hidden")))
#endif

#define ETCD_POOL_MAX 8
/* Grants remembered for a release by revoke alone (see lease_etcd.c). */
#define ETCD_GRANTS_MAX 64
#define ETCD_NS_PER_S   1000000000LL
/* A lock key's value: the owner, a NUL byte, the lease's data. */
#define ETCD_VALUE_MAX (OPQ_LEASE_OWNER_MAX + 1 + OPQ_LEASE_DATA_MAX)

/* The calls of the v3 API the provider makes, and the replies they get. */
enum etcd_kind { ETCD_RANGE, ETCD_TXN, ETCD_GRANT, ETCD_KEEPALIVE, ETCD_REVOKE, ETCD_NKINDS };

/* One key-value pair of a reply; value only when it fits ETCD_VALUE_MAX. */
struct etcd_kv {
	bool present;
	int64_t create_revision, mod_revision, lease;
	bool value_long; /* longer than ETCD_VALUE_MAX: value not kept */
	size_t value_len;
	unsigned char value[ETCD_VALUE_MAX];
};

/* What the provider reads from a reply; fields a reply omits are 0. */
struct etcd_reply {
	int64_t revision;  /* header.revision */
	bool succeeded;    /* a txn's */
	struct etcd_kv kv; /* a range's first kv, or that of a txn's first response_range */
	int64_t id, ttl;   /* a lease grant's or keepalive's */
	int grpc_code;     /* an error reply's gRPC status code, else 0 */
	char message[160]; /* an error reply's message */
};

/* The client (opq_lease_etcd): shared by its providers and the guard. */
struct opq_lease_etcd {
	atomic_int refs;
	pthread_mutex_t mu;
	int nendpoints;
	char *endpoints[OPQ_LEASE_ETCD_ENDPOINTS_MAX];
	int current; /* under mu: the member that answered last */
	char prefix[OPQ_LEASE_ETCD_PREFIX_MAX + 1];
	size_t prefix_len;
	int64_t timeout_ns;
	int nidle; /* under mu, with idle: a stack of curl easy handles */
	void *idle[ETCD_POOL_MAX];
	/* Under mu: the lease of each token granted here lately (a ring). */
	struct {
		int64_t token, lease;
	} grants[ETCD_GRANTS_MAX];
	unsigned next_grant;
};

/* ---- lease_etcd_json.c ---- */

/*
 * Parse the body of a reply of `kind` (len bytes, not NUL-terminated) into
 * *r. 0: parsed (an error reply sets r->grpc_code and r->message); EPROTO:
 * not a reply of that kind (malformed JSON, a field of the wrong type, an
 * integer out of range, bad base64), with words in errbuf.
 */
OPQ_INTERNAL int opq__etcd_parse(enum etcd_kind kind, const char *buf, size_t len,
                                 struct etcd_reply *r, char *errbuf, size_t errlen);
/* Base64 (standard alphabet, padded) of len bytes into out (room for
 * opq__etcd_b64_len(len) + 1 bytes, NUL-terminated). */
OPQ_INTERNAL size_t opq__etcd_b64_len(size_t len);
OPQ_INTERNAL void opq__etcd_b64_encode(const void *in, size_t len, char *out);
/* Decode len chars of base64 into out (room for outmax bytes): 0 and *outlen,
 * EPROTO for bad input, ERANGE when it does not fit. */
OPQ_INTERNAL int opq__etcd_b64_decode(const char *in, size_t len, unsigned char *out, size_t outmax,
                                      size_t *outlen);
/* A heap string of the form printf makes (the bodies), or NULL. */
OPQ_INTERNAL char *opq__etcd_strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Base64 of len bytes on the heap, or NULL. */
OPQ_INTERNAL char *opq__etcd_b64(const void *in, size_t len);
/* Words into buf ("etcd: ..."), one line. */
OPQ_INTERNAL void opq__etcd_set_err(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- lease_etcd_http.c ---- */

/*
 * POST body to `path` (/v3/kv/txn ...) on a member, failing over to the
 * next on a transport failure or an unavailable member, all by `dl`; parse
 * the reply as `kind` into *r. 0 (an error reply of etcd's sets
 * r->grpc_code; its errno is opq__etcd_grpc_errno's), or an errno with
 * words in errbuf.
 */
OPQ_INTERNAL int opq__etcd_call(struct opq_lease_etcd *e, enum etcd_kind kind, const char *body,
                                const struct timespec *dl, struct etcd_reply *r, char *errbuf,
                                size_t errlen);
/* The errno for a gRPC status code. */
OPQ_INTERNAL int opq__etcd_grpc_errno(int code);
/* Free every pooled handle (the client's end). */
OPQ_INTERNAL void opq__etcd_pool_drain(struct opq_lease_etcd *e);

#endif /* OPQ_LEASE_ETCD_IMPL_H */
