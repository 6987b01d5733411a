/*
 * lease_etcd.c: the etcd lease provider (opq_lease_provider_etcd_create(3)):
 * the client object and its attributes, the three operations and the guard.
 * The HTTP requests and failover are in lease_etcd_http.c, the bodies and
 * the parsing of replies in lease_etcd_json.c.
 *
 * Built as its own library, libopqueue-etcd, on the public provider
 * interface of libopqueue only.
 *
 * The store: one key per lock, PREFIX + name, whose value is the owner, a
 * NUL byte and the lease's data, attached to an etcd lease of the holder's.
 *   acquire  grant a lease of TTL = the lease time rounded up to whole
 *            seconds; one txn: if the key's create_revision is 0 (absent),
 *            put it with that lease, else read it. Put: the token is the
 *            txn's revision, which is the key's create_revision. Read, and
 *            the owner is ours: the key's lease is kept alive and its
 *            create_revision is the token again (a retried acquire mints no
 *            second token); another owner's: EBUSY. The lease granted and
 *            not used is revoked.
 *   refresh  read the key: absent or another create_revision: ENOLCK;
 *            else keep its lease alive (a TTL of 0 back: expired, ENOLCK).
 *   release  revoke the lease the key was put with, when this client
 *            granted it and remembers it (the last ETCD_GRANTS_MAX grants):
 *            etcd deletes the keys of a lease it revokes, and the lock key
 *            is the only key with that lease, so a revoke deletes the key if
 *            and only if it is still ours, in one request. Else one txn: if
 *            the key's create_revision is the token, read it and delete it;
 *            then revoke the lease it had.
 * etcd's leader counts every lease down on its own clock; when a lease
 * runs out, etcd deletes its key, and the next acquire creates the key at a
 * greater revision: tokens strictly increase across the whole cluster, and
 * a refresh (a keep-alive) never changes one. Each request may be repeated
 * on another member after a failure whose outcome is unknown: a grant
 * repeated leaves a lease unused that runs out by itself; the acquire txn
 * repeated finds the key ours with the same lease; a read, a keep-alive, a
 * release txn and a revoke are idempotent.
 */
#include "config.h"

#include "lease_etcd_impl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#define DEFAULT_PREFIX     "opq/lease/"
#define DEFAULT_TIMEOUT_NS (2 * ETCD_NS_PER_S)
/* etcd refuses a TTL above this many seconds (its MaxLeaseTTL). */
#define TTL_MAX_S 9000000000LL

struct opq_lease_etcd_attr {
	char prefix[OPQ_LEASE_ETCD_PREFIX_MAX + 1];
	int64_t timeout_ns;
};

static void attr_defaults(struct opq_lease_etcd_attr *a)
{
	snprintf(a->prefix, sizeof(a->prefix), "%s", DEFAULT_PREFIX);
	a->timeout_ns = DEFAULT_TIMEOUT_NS;
}

int opq_lease_etcd_attr_create(opq_lease_etcd_attr **attr)
{
	if (attr == NULL)
		return EINVAL;
	struct opq_lease_etcd_attr *a = malloc(sizeof(*a));
	if (a == NULL)
		return ENOMEM;
	attr_defaults(a);
	*attr = a;
	return 0;
}

void opq_lease_etcd_attr_destroy(opq_lease_etcd_attr *attr)
{
	free(attr);
}

int opq_lease_etcd_attr_set_prefix(opq_lease_etcd_attr *attr, const char *prefix)
{
	if (attr == NULL || prefix == NULL)
		return EINVAL;
	size_t n = strnlen(prefix, OPQ_LEASE_ETCD_PREFIX_MAX + 1);
	if (n > OPQ_LEASE_ETCD_PREFIX_MAX)
		return EINVAL;
	memcpy(attr->prefix, prefix, n + 1);
	return 0;
}

int opq_lease_etcd_attr_set_timeout(opq_lease_etcd_attr *attr, int64_t timeout_ns)
{
	if (attr == NULL || timeout_ns <= 0 || timeout_ns > 3600 * ETCD_NS_PER_S)
		return EINVAL;
	attr->timeout_ns = timeout_ns;
	return 0;
}

/* ---- the client ---- */

static void client_free(struct opq_lease_etcd *e)
{
	opq__etcd_pool_drain(e);
	for (int i = 0; i < e->nendpoints; i++)
		free(e->endpoints[i]);
	pthread_mutex_destroy(&e->mu);
	free(e);
	curl_global_cleanup();
}

static void client_unref(struct opq_lease_etcd *e)
{
	if (e != NULL && atomic_fetch_sub(&e->refs, 1) == 1)
		client_free(e);
}

/* Split the comma-separated URLs into e->endpoints. */
static int parse_endpoints(struct opq_lease_etcd *e, const char *list, char *errbuf, size_t errlen)
{
	const char *p = list;
	for (;;) {
		const char *end = strchr(p, ',');
		size_t n = end ? (size_t)(end - p) : strlen(p);
		bool http = n > 7 && strncmp(p, "http://", 7) == 0;
		bool https = n > 8 && strncmp(p, "https://", 8) == 0;
		if (!http && !https) {
			opq__etcd_set_err(errbuf, errlen,
			                  "endpoint %d is not an http:// or https:// URL: \"%.*s\"",
			                  e->nendpoints + 1, (int)(n > 100 ? 100 : n), p);
			return EINVAL;
		}
		for (size_t i = 0; i < n; i++)
			if ((unsigned char)p[i] <= ' ' || p[i] == 0x7f) {
				opq__etcd_set_err(errbuf, errlen,
				                  "endpoint %d has a blank or a control "
				                  "character",
				                  e->nendpoints + 1);
				return EINVAL;
			}
		if (n > 900) {
			opq__etcd_set_err(errbuf, errlen, "endpoint %d is too long",
			                  e->nendpoints + 1);
			return EINVAL;
		}
		if (e->nendpoints == OPQ_LEASE_ETCD_ENDPOINTS_MAX) {
			opq__etcd_set_err(errbuf, errlen, "more than %d endpoints",
			                  OPQ_LEASE_ETCD_ENDPOINTS_MAX);
			return EINVAL;
		}
		/* Without a trailing slash: the API's paths are appended. */
		while (n > 0 && p[n - 1] == '/')
			n--;
		char *u = strndup(p, n);
		if (u == NULL) {
			opq__etcd_set_err(errbuf, errlen, "out of memory");
			return ENOMEM;
		}
		e->endpoints[e->nendpoints++] = u;
		if (end == NULL)
			return 0;
		p = end + 1;
	}
}

int opq_lease_etcd_create(opq_lease_etcd **etcd, const char *endpoints,
                          const opq_lease_etcd_attr *attr, char *errbuf, size_t errlen)
{
	if (errbuf != NULL && errlen > 0)
		errbuf[0] = '\0';
	if (etcd == NULL || endpoints == NULL || (errbuf == NULL && errlen > 0)) {
		opq__etcd_set_err(errbuf, errlen, "NULL argument");
		return EINVAL;
	}
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
		opq__etcd_set_err(errbuf, errlen, "libcurl cannot be initialised");
		return ENOMEM;
	}
	struct opq_lease_etcd *e = calloc(1, sizeof(*e));
	if (e == NULL) {
		curl_global_cleanup();
		opq__etcd_set_err(errbuf, errlen, "out of memory");
		return ENOMEM;
	}
	if (pthread_mutex_init(&e->mu, NULL) != 0) {
		free(e);
		curl_global_cleanup();
		opq__etcd_set_err(errbuf, errlen, "cannot create a mutex");
		return ENOMEM;
	}
	atomic_init(&e->refs, 1);
	struct opq_lease_etcd_attr defaults;
	if (attr == NULL) {
		attr_defaults(&defaults);
		attr = &defaults;
	}
	memcpy(e->prefix, attr->prefix, sizeof(e->prefix));
	e->prefix_len = strlen(e->prefix);
	e->timeout_ns = attr->timeout_ns;
	int rc = parse_endpoints(e, endpoints, errbuf, errlen);
	if (rc != 0) {
		client_free(e);
		return rc;
	}
	*etcd = e;
	return 0;
}

void opq_lease_etcd_destroy(opq_lease_etcd *etcd)
{
	client_unref(etcd);
}

/* ---- the operations ---- */

/* The lock key of `name`, base64, on the heap (NULL: out of memory). */
static char *lock_key(struct opq_lease_etcd *e, const char *name)
{
	size_t n = strlen(name);
	char *raw = malloc(e->prefix_len + n);
	if (raw == NULL)
		return NULL;
	memcpy(raw, e->prefix, e->prefix_len);
	memcpy(raw + e->prefix_len, name, n);
	char *k = opq__etcd_b64(raw, e->prefix_len + n);
	free(raw);
	return k;
}

/* The value of the lock key: owner, NUL, data; base64 on the heap. */
static char *lock_value(const opq_lease_request *req)
{
	size_t on = strlen(req->owner);
	unsigned char raw[ETCD_VALUE_MAX];
	memcpy(raw, req->owner, on);
	raw[on] = '\0';
	if (req->data_len > 0)
		memcpy(raw + on + 1, req->data, req->data_len);
	return opq__etcd_b64(raw, on + 1 + req->data_len);
}

/* Whether kv's value names `owner`. */
static bool owned_by(const struct etcd_kv *kv, const char *owner)
{
	size_t on = strlen(owner);
	return !kv->value_long && kv->value_len > on && memcmp(kv->value, owner, on) == 0 &&
	       kv->value[on] == '\0';
}

static int check_req(const opq_lease_request *req)
{
	if (req == NULL || req->name == NULL || req->owner == NULL || req->name[0] == '\0' ||
	    req->owner[0] == '\0' || strlen(req->owner) > OPQ_LEASE_OWNER_MAX ||
	    (req->data == NULL && req->data_len > 0) || req->data_len > OPQ_LEASE_DATA_MAX)
		return EINVAL;
	return 0;
}

/* Make an error reply of etcd's an errno (words were written by the call). */
static int grpc_rc(int rc, const struct etcd_reply *r)
{
	return rc == 0 && r->grpc_code != 0 ? opq__etcd_grpc_errno(r->grpc_code) : rc;
}

static int call(struct opq_lease_etcd *e, enum etcd_kind kind, char *body,
                const opq_lease_request *req, struct etcd_reply *r)
{
	if (body == NULL) {
		opq__etcd_set_err(req->errbuf, req->errlen, "out of memory");
		return ENOMEM;
	}
	int rc = opq__etcd_call(e, kind, body, &req->deadline, r, req->errbuf, req->errlen);
	free(body);
	return grpc_rc(rc, r);
}

/* Keep lease id alive: 0 (alive), ENOLCK (gone), or a failure. */
static int keepalive(struct opq_lease_etcd *e, int64_t id, const opq_lease_request *req)
{
	struct etcd_reply r;
	int rc = call(e, ETCD_KEEPALIVE, opq__etcd_strf("{\"ID\":\"%" PRId64 "\"}", id), req, &r);
	if (rc == ENOENT || (rc == 0 && r.ttl <= 0))
		return ENOLCK;
	if (rc == 0 && r.id != id) {
		opq__etcd_set_err(req->errbuf, req->errlen,
		                  "a keep-alive of lease %" PRId64 " answered for lease %" PRId64,
		                  id, r.id);
		return EPROTO;
	}
	if (rc == 0 && r.ttl < (req->lease_ns - 1) / ETCD_NS_PER_S + 1 && r.ttl < TTL_MAX_S) {
		opq__etcd_set_err(req->errbuf, req->errlen,
		                  "lease %" PRId64 " has a TTL of %" PRId64
		                  " s, shorter than the holder's lease",
		                  id, r.ttl);
		return EIO;
	}
	return rc;
}

/* Remember (or, lease 0, forget) the lease of token. */
static void grant_note(struct opq_lease_etcd *e, int64_t token, int64_t lease)
{
	pthread_mutex_lock(&e->mu);
	int slot = -1;
	for (int i = 0; i < ETCD_GRANTS_MAX && slot < 0; i++)
		if (e->grants[i].token == token)
			slot = i;
	if (slot < 0 && lease != 0)
		slot = (int)(e->next_grant++ % ETCD_GRANTS_MAX);
	if (slot >= 0) {
		e->grants[slot].token = lease != 0 ? token : 0;
		e->grants[slot].lease = lease;
	}
	pthread_mutex_unlock(&e->mu);
}

/* The lease that token was granted with here, or 0. */
static int64_t grant_lease(struct opq_lease_etcd *e, int64_t token)
{
	int64_t lease = 0;
	pthread_mutex_lock(&e->mu);
	for (int i = 0; i < ETCD_GRANTS_MAX && lease == 0; i++)
		if (e->grants[i].token == token)
			lease = e->grants[i].lease;
	pthread_mutex_unlock(&e->mu);
	return lease;
}

/* Revoke lease id, best effort: 0 also when etcd no longer has it. */
static int revoke(struct opq_lease_etcd *e, int64_t id, const opq_lease_request *req)
{
	struct etcd_reply r;
	int rc = call(e, ETCD_REVOKE, opq__etcd_strf("{\"ID\":\"%" PRId64 "\"}", id), req, &r);
	return rc == ENOENT ? 0 : rc;
}

static int etcd_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	struct opq_lease_etcd *e = store;
	if (e == NULL || token == NULL || check_req(req) != 0 || req->lease_ns <= 0)
		return EINVAL;
	int64_t ttl = (req->lease_ns - 1) / ETCD_NS_PER_S + 1;
	if (ttl > TTL_MAX_S)
		ttl = TTL_MAX_S;
	struct etcd_reply r;
	int rc = call(e, ETCD_GRANT, opq__etcd_strf("{\"TTL\":\"%" PRId64 "\"}", ttl), req, &r);
	if (rc != 0)
		return rc;
	int64_t id = r.id;
	if (id == 0 || r.ttl < ttl) {
		opq__etcd_set_err(req->errbuf, req->errlen,
		                  "a lease grant came back with ID %" PRId64 " and TTL %" PRId64,
		                  id, r.ttl);
		return EPROTO;
	}
	char *key = lock_key(e, req->name);
	char *val = lock_value(req);
	char *body = key && val
	                 ? opq__etcd_strf("{\"compare\":[{\"target\":\"CREATE\",\"key\":\"%s\","
	                                  "\"create_revision\":\"0\"}],"
	                                  "\"success\":[{\"request_put\":{\"key\":\"%s\",\"value\":"
	                                  "\"%s\",\"lease\":\"%" PRId64 "\"}}],"
	                                  "\"failure\":[{\"request_range\":{\"key\":\"%s\"}}]}",
	                                  key, key, val, id, key)
	                 : NULL;
	free(key);
	free(val);
	rc = call(e, ETCD_TXN, body, req, &r);
	bool used = false;
	if (rc == 0 && r.succeeded) {
		if (r.revision <= 0) {
			opq__etcd_set_err(req->errbuf, req->errlen, "a txn without a revision");
			rc = EPROTO;
		} else {
			*token = (uint64_t)r.revision;
			used = true;
		}
	} else if (rc == 0) {
		if (!r.kv.present || r.kv.create_revision <= 0) {
			/* The key exists (the compare failed) and is read in the same txn. */
			opq__etcd_set_err(req->errbuf, req->errlen, "a failed txn without the key");
			rc = EPROTO;
		} else if (!owned_by(&r.kv, req->owner)) {
			rc = EBUSY;
		} else if (r.kv.lease == id) {
			used = true; /* our own put, repeated after a reply was lost */
			*token = (uint64_t)r.kv.create_revision;
		} else {
			/* Ours with an older lease: extend that one. */
			rc = r.kv.lease != 0 ? keepalive(e, r.kv.lease, req) : ENOLCK;
			if (rc == ENOLCK)
				rc = EBUSY; /* running out: its key goes shortly */
			if (rc == 0)
				*token = (uint64_t)r.kv.create_revision;
		}
	}
	if (rc == 0)
		grant_note(e, (int64_t)*token, used ? id : r.kv.lease);
	/* A failed txn may have put the key with this lease: revoking it
	 * deletes only that key, so the outcome is the same either way. */
	if (!used) {
		char words[64];
		opq_lease_request q = *req;
		q.errbuf = words;
		q.errlen = sizeof(words);
		revoke(e, id, &q);
	}
	return rc;
}

static int etcd_refresh(void *store, const opq_lease_request *req)
{
	struct opq_lease_etcd *e = store;
	if (e == NULL || check_req(req) != 0 || req->lease_ns <= 0 || req->token == 0 ||
	    req->token > INT64_MAX)
		return EINVAL;
	char *key = lock_key(e, req->name);
	struct etcd_reply r;
	int rc = call(e, ETCD_RANGE, key ? opq__etcd_strf("{\"key\":\"%s\"}", key) : NULL, req, &r);
	free(key);
	if (rc != 0)
		return rc;
	if (!r.kv.present || r.kv.create_revision != (int64_t)req->token || r.kv.lease == 0)
		return ENOLCK;
	return keepalive(e, r.kv.lease, req);
}

static int etcd_release(void *store, const opq_lease_request *req)
{
	struct opq_lease_etcd *e = store;
	if (e == NULL || check_req(req) != 0)
		return EINVAL;
	if (req->token == 0 || req->token > INT64_MAX)
		return 0; /* no such grant was ever made */
	int64_t lease = grant_lease(e, (int64_t)req->token);
	if (lease != 0) {
		int rc = revoke(e, lease, req);
		if (rc == 0)
			grant_note(e, (int64_t)req->token, 0);
		return rc;
	}
	char *key = lock_key(e, req->name);
	struct etcd_reply r;
	int rc = call(e, ETCD_TXN,
	              key ? opq__etcd_strf("{\"compare\":[{\"target\":\"CREATE\",\"key\":\"%s\","
	                                   "\"create_revision\":\"%" PRIu64 "\"}],"
	                                   "\"success\":[{\"request_range\":{\"key\":\"%s\"}},"
	                                   "{\"request_delete_range\":{\"key\":\"%s\"}}]}",
	                                   key, req->token, key, key)
	                  : NULL,
	              req, &r);
	free(key);
	if (rc != 0 || !r.succeeded || !r.kv.present || r.kv.lease == 0)
		return rc;
	/* The key is gone; its lease would run out by itself: end it now. */
	char words[64];
	opq_lease_request q = *req;
	q.errbuf = words;
	q.errlen = sizeof(words);
	revoke(e, r.kv.lease, &q);
	return 0;
}

static void etcd_destroy(void *store)
{
	client_unref(store);
}

int opq_lease_provider_etcd_create(opq_lease_provider **provider, opq_lease_etcd *etcd)
{
	if (provider == NULL || etcd == NULL)
		return EINVAL;
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	ops.acquire = etcd_acquire;
	ops.refresh = etcd_refresh;
	ops.release = etcd_release;
	ops.destroy = etcd_destroy;
	atomic_fetch_add(&etcd->refs, 1);
	int rc = opq_lease_provider_create(provider, &ops, etcd);
	if (rc != 0)
		client_unref(etcd);
	return rc;
}

/* ---- the guard ---- */

int opq_lease_etcd_put_if_held(opq_lease_etcd *etcd, const char *name, uint64_t token,
                               const void *key, size_t key_len, const void *value, size_t value_len,
                               const struct timespec *deadline, char *errbuf, size_t errlen)
{
	if (errbuf != NULL && errlen > 0)
		errbuf[0] = '\0';
	size_t nn = name ? strnlen(name, OPQ_LEASE_NAME_MAX + 1) : 0;
	if (etcd == NULL || nn == 0 || nn > OPQ_LEASE_NAME_MAX || token == 0 || token > INT64_MAX ||
	    key == NULL || key_len == 0 || (value == NULL && value_len > 0) ||
	    key_len > (1u << 20) || value_len > (1u << 20) || (errbuf == NULL && errlen > 0) ||
	    (deadline && (deadline->tv_nsec < 0 || deadline->tv_nsec >= ETCD_NS_PER_S))) {
		opq__etcd_set_err(errbuf, errlen, "invalid argument");
		return EINVAL;
	}
	char *lk = lock_key(etcd, name);
	char *k = opq__etcd_b64(key, key_len);
	char *v = opq__etcd_b64(value ? value : "", value_len);
	char *body = lk && k && v
	                 ? opq__etcd_strf("{\"compare\":[{\"target\":\"CREATE\",\"key\":\"%s\","
	                                  "\"create_revision\":\"%" PRIu64 "\"}],"
	                                  "\"success\":[{\"request_put\":{\"key\":\"%s\","
	                                  "\"value\":\"%s\"}}]}",
	                                  lk, token, k, v)
	                 : NULL;
	free(lk);
	free(k);
	free(v);
	if (body == NULL) {
		opq__etcd_set_err(errbuf, errlen, "out of memory");
		return ENOMEM;
	}
	struct etcd_reply r;
	int rc = opq__etcd_call(etcd, ETCD_TXN, body, deadline, &r, errbuf, errlen);
	free(body);
	rc = grpc_rc(rc, &r);
	if (rc == 0 && !r.succeeded) {
		opq__etcd_set_err(errbuf, errlen, "lock %.*s is not held with token %" PRIu64, 64,
		                  name, token);
		rc = ENOLCK;
	}
	return rc;
}
