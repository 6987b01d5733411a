/*
 * lease_memory.c: the memory lease provider (opq_lease_provider_memory_create,
 * see opq_lease_provider_create(3)): one process's threads share leases
 * through a hash table of lock names. Written against the provider
 * interface (opq_lease_provider_create), like the SQLite and PostgreSQL
 * providers; expiry by CLOCK_MONOTONIC.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

#define MEM_BUCKETS 64

struct mem_rec {
	struct mem_rec *next;
	bool held;
	uint64_t token; /* the last token minted for this name */
	int64_t expiry; /* CLOCK_MONOTONIC ns */
	size_t data_len;
	char name[OPQ_LEASE_NAME_MAX + 1];
	char owner[OPQ_LEASE_OWNER_MAX + 1];
	unsigned char data[OPQ_LEASE_DATA_MAX];
};

struct mem_store {
	pthread_mutex_t mu;
	struct mem_rec *bucket[MEM_BUCKETS];
};

static struct mem_rec **mem_slot(struct mem_store *s, const char *name)
{
	uint64_t h = 1469598103934665603ULL;
	for (const unsigned char *p = (const unsigned char *)name; *p; p++)
		h = (h ^ *p) * 1099511628211ULL;
	struct mem_rec **pp = &s->bucket[h % MEM_BUCKETS];
	while (*pp && strcmp((*pp)->name, name) != 0)
		pp = &(*pp)->next;
	return pp;
}

static bool mem_live(const struct mem_rec *r, int64_t now)
{
	return r->held && now < r->expiry;
}

static int mem_acquire(void *store, const opq_lease_request *req, uint64_t *token)
{
	struct mem_store *s = store;
	opq__lock(&s->mu);
	struct mem_rec **pp = mem_slot(s, req->name);
	struct mem_rec *r = *pp;
	if (!r) {
		r = opq__calloc(1, sizeof(*r));
		if (!r) {
			opq__unlock(&s->mu);
			snprintf(req->errbuf, req->errlen, "memory lease store: out of memory");
			return ENOMEM;
		}
		snprintf(r->name, sizeof(r->name), "%s", req->name);
		*pp = r;
	}
	int64_t now = opq__mono_ns();
	bool mine = strcmp(r->owner, req->owner) == 0;
	if (mem_live(r, now) && !mine) {
		opq__unlock(&s->mu);
		return EBUSY;
	}
	if (!mem_live(r, now)) { /* free, released or expired: a new token */
		r->token++;
		r->held = true;
		snprintf(r->owner, sizeof(r->owner), "%s", req->owner);
	}
	r->expiry = opq__lease_sat_add(now, req->lease_ns);
	r->data_len = req->data_len;
	if (req->data_len)
		memcpy(r->data, req->data, req->data_len);
	*token = r->token;
	opq__unlock(&s->mu);
	return 0;
}

static int mem_refresh(void *store, const opq_lease_request *req)
{
	struct mem_store *s = store;
	opq__lock(&s->mu);
	struct mem_rec *r = *mem_slot(s, req->name);
	int64_t now = opq__mono_ns();
	int rc = ENOLCK;
	if (r && mem_live(r, now) && r->token == req->token && strcmp(r->owner, req->owner) == 0) {
		r->expiry = opq__lease_sat_add(now, req->lease_ns);
		rc = 0;
	}
	opq__unlock(&s->mu);
	return rc;
}

static int mem_release(void *store, const opq_lease_request *req)
{
	struct mem_store *s = store;
	opq__lock(&s->mu);
	struct mem_rec *r = *mem_slot(s, req->name);
	if (r && r->held && r->token == req->token && strcmp(r->owner, req->owner) == 0) {
		r->held = false;
		r->data_len = 0;
	}
	opq__unlock(&s->mu);
	return 0;
}

static void mem_destroy(void *store)
{
	struct mem_store *s = store;
	for (int i = 0; i < MEM_BUCKETS; i++) {
		struct mem_rec *r = s->bucket[i];
		while (r) {
			struct mem_rec *next = r->next;
			opq__free(r);
			r = next;
		}
	}
	OPQ_CHECK(pthread_mutex_destroy(&s->mu));
	opq__free(s);
}

OPQ_EXPORT int opq_lease_provider_memory_create(opq_lease_provider **provider)
{
	if (!provider)
		return EINVAL;
	struct mem_store *s = opq__calloc(1, sizeof(*s));
	if (!s)
		return ENOMEM;
	int rc = opq__mutex_init(&s->mu);
	if (rc) {
		opq__free(s);
		return rc;
	}
	opq_lease_provider_ops ops;
	memset(&ops, 0, sizeof(ops));
	ops.acquire = mem_acquire;
	ops.refresh = mem_refresh;
	ops.release = mem_release;
	ops.destroy = mem_destroy;
	rc = opq_lease_provider_create(provider, &ops, s);
	if (rc) {
		OPQ_CHECK(pthread_mutex_destroy(&s->mu));
		opq__free(s);
	}
	return rc;
}
