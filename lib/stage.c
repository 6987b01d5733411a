/*
 * stage.c: leader/followers. Tickets live in a chained hash table keyed by
 * their bytes; threads blocked in enter wait in a FIFO, each on its own
 * ticket's condvar, so a notification or a promotion wakes exactly the
 * thread it is for.
 *
 * Invariants, all under st->mu:
 * - the FIFO holds exactly the tickets whose thread is blocked in enter
 *   with nothing to return yet: not head, no latched event, stage open.
 *   Whoever gives a waiter something to return (notify, leave, close)
 *   unlinks it from the FIFO and signals it; a waiter that times out
 *   unlinks itself. So a promotion always reaches a thread that will head;
 * - a notified event is stored in its ticket (`latched`) until an enter or
 *   unregister hands it back: it is never dropped, whatever races it;
 * - st->head is the ticket heading the stage, or NULL.
 * lib/stage.pml models this protocol for the spin model checker
 * (tests/spin.sh): keep the two in step.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#include "list.h"

struct opq_stage_ticket {
	opq_stage *st;
	opq_stage_ticket *chain; /* next in its hash bucket */
	struct opq__link link;   /* in the FIFO of waiters, or unlinked */
	pthread_cond_t cv;
	uint64_t hash;
	bool inside;  /* a thread is in enter with it */
	bool latched; /* `event` holds a notified event */
	void *event;
	size_t keylen;
	unsigned char key[];
};

struct opq_stage {
	pthread_mutex_t mu;
	opq_stage_ticket **buckets;
	size_t nbuckets; /* a power of two */
	size_t tickets;
	size_t waiting;
	struct opq__link fifo; /* waiting tickets, oldest first */
	opq_stage_ticket *head;
	int closed;
};

#define INITIAL_BUCKETS 16

/* FNV-1a, 64 bits. */
static uint64_t hash_key(const void *key, size_t len)
{
	const unsigned char *p = key;
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 1099511628211ULL;
	}
	return h;
}

static opq_stage_ticket **bucket_of(opq_stage *st, uint64_t hash)
{
	return &st->buckets[hash & (st->nbuckets - 1)];
}

static opq_stage_ticket *find(opq_stage *st, const void *key, size_t len, uint64_t hash)
{
	for (opq_stage_ticket *t = *bucket_of(st, hash); t; t = t->chain)
		if (t->hash == hash && t->keylen == len && memcmp(t->key, key, len) == 0)
			return t;
	return NULL;
}

/* Double the table when it is full; on ENOMEM keep the longer chains. */
static void maybe_grow(opq_stage *st)
{
	if (st->tickets < st->nbuckets)
		return;
	size_t n = st->nbuckets * 2;
	opq_stage_ticket **b = opq__calloc(n, sizeof(*b));
	if (!b)
		return;
	for (size_t i = 0; i < st->nbuckets; i++) {
		opq_stage_ticket *t = st->buckets[i];
		while (t) {
			opq_stage_ticket *next = t->chain;
			opq_stage_ticket **slot = &b[t->hash & (n - 1)];
			t->chain = *slot;
			*slot = t;
			t = next;
		}
	}
	opq__free(st->buckets);
	st->buckets = b;
	st->nbuckets = n;
}

/* Whether t is in the FIFO. */
static bool in_fifo(const opq_stage_ticket *t)
{
	return opq__list_linked(&t->link);
}

static void fifo_push(opq_stage *st, opq_stage_ticket *t)
{
	opq__list_push(&st->fifo, &t->link);
	st->waiting++;
}

static void fifo_unlink(opq_stage *st, opq_stage_ticket *t)
{
	assert(in_fifo(t));
	opq__list_remove(&t->link);
	st->waiting--;
}

/* The oldest waiting ticket, unlinked; or NULL. */
static opq_stage_ticket *fifo_pop(opq_stage *st)
{
	struct opq__link *l = opq__list_pop(&st->fifo);
	if (!l)
		return NULL;
	st->waiting--;
	return OPQ_CONTAINER_OF(l, opq_stage_ticket, link);
}

OPQ_EXPORT int opq_stage_create(opq_stage **stp)
{
	if (!stp)
		return EINVAL;
	opq_stage *st = opq__calloc(1, sizeof(*st));
	if (!st)
		return ENOMEM;
	st->buckets = opq__calloc(INITIAL_BUCKETS, sizeof(*st->buckets));
	if (!st->buckets) {
		opq__free(st);
		return ENOMEM;
	}
	st->nbuckets = INITIAL_BUCKETS;
	opq__list_init(&st->fifo);
	int rc = opq__mutex_init(&st->mu);
	if (rc) {
		opq__free(st->buckets);
		opq__free(st);
		return rc;
	}
	*stp = st;
	return 0;
}

OPQ_EXPORT int opq_stage_destroy(opq_stage *st)
{
	if (!st)
		return 0;
	opq__lock(&st->mu);
	bool busy = st->tickets != 0;
	opq__unlock(&st->mu);
	if (busy)
		return EBUSY;
	pthread_mutex_destroy(&st->mu);
	opq__free(st->buckets);
	opq__free(st);
	return 0;
}

OPQ_EXPORT int opq_stage_register(opq_stage *st, const void *key, size_t keylen,
                                  opq_stage_ticket **tp)
{
	if (!st || !key || keylen == 0 || !tp)
		return EINVAL;
	if (keylen > SIZE_MAX - sizeof(opq_stage_ticket))
		return ENOMEM;
	opq_stage_ticket *t = opq__malloc(sizeof(*t) + keylen);
	if (!t)
		return ENOMEM;
	memset(t, 0, sizeof(*t));
	int rc = opq__cond_init(&t->cv);
	if (rc) {
		opq__free(t);
		return rc;
	}
	t->st = st;
	t->keylen = keylen;
	memcpy(t->key, key, keylen);
	t->hash = hash_key(key, keylen);

	opq__lock(&st->mu);
	if (find(st, key, keylen, t->hash)) {
		opq__unlock(&st->mu);
		pthread_cond_destroy(&t->cv);
		opq__free(t);
		return EEXIST;
	}
	opq_stage_ticket **slot = bucket_of(st, t->hash);
	t->chain = *slot;
	*slot = t;
	st->tickets++;
	maybe_grow(st);
	opq__unlock(&st->mu);
	*tp = t;
	return 0;
}

OPQ_EXPORT int opq_stage_unregister(opq_stage *st, opq_stage_ticket *t, void **event)
{
	if (!st || !t || !event || t->st != st)
		return EINVAL;
	opq__lock(&st->mu);
	if (t->inside || st->head == t) {
		opq__unlock(&st->mu);
		return EBUSY;
	}
	opq_stage_ticket **slot = bucket_of(st, t->hash);
	while (*slot != t)
		slot = &(*slot)->chain;
	*slot = t->chain;
	st->tickets--;
	bool latched = t->latched;
	void *ev = t->event;
	opq__unlock(&st->mu);

	pthread_cond_destroy(&t->cv);
	opq__free(t);
	*event = latched ? ev : NULL;
	return latched ? OPQ_STAGE_NOTIFIED : 0;
}

/* Take the latched event of t into *event. */
static int take_event(opq_stage_ticket *t, void **event)
{
	*event = t->event;
	t->event = NULL;
	t->latched = false;
	return OPQ_STAGE_NOTIFIED;
}

OPQ_EXPORT int opq_stage_enter(opq_stage *st, opq_stage_ticket *t, const struct timespec *deadline,
                               void **event)
{
	if (!st || !t || !event || t->st != st || !opq__deadline_ok(deadline))
		return EINVAL;
	opq__lock(&st->mu);
	if (t->inside) {
		opq__unlock(&st->mu);
		return EBUSY;
	}
	int rc;
	if (t->latched) {
		rc = take_event(t, event);
	} else if (st->closed) {
		rc = st->closed;
	} else if (st->head == t) {
		rc = OPQ_STAGE_HEAD;
	} else if (!st->head) {
		st->head = t;
		rc = OPQ_STAGE_HEAD;
	} else {
		/* Inside a task: a cancel of the task ends the wait (cancel.c). */
		struct opq__cancel_reg creg;
		if (opq__cancel_begin(&creg, &st->mu, &t->cv)) {
			opq__unlock(&st->mu);
			return ECANCELED;
		}
		t->inside = true;
		fifo_push(st, t);
		bool timed_out = false;
		for (;;) {
			/* Whoever gave t a result unlinked it from the FIFO. */
			if (!in_fifo(t)) {
				if (st->head == t)
					rc = OPQ_STAGE_HEAD;
				else if (t->latched)
					rc = take_event(t, event);
				else
					rc = st->closed;
				assert(rc != 0);
				break;
			}
			if (timed_out || opq__cancel_pending(&creg)) {
				fifo_unlink(st, t);
				rc = timed_out ? ETIMEDOUT : ECANCELED;
				break;
			}
			timed_out = opq__cond_wait(&t->cv, &st->mu, deadline) == ETIMEDOUT;
		}
		opq__cancel_end(&creg);
		t->inside = false;
	}
	opq__unlock(&st->mu);
	return rc;
}

OPQ_EXPORT int opq_stage_leave(opq_stage *st, opq_stage_ticket *t)
{
	if (!st || !t)
		return EINVAL;
	opq__lock(&st->mu);
	if (st->head != t) {
		opq__unlock(&st->mu);
		return EPERM;
	}
	st->head = NULL;
	opq_stage_ticket *next = fifo_pop(st);
	if (next) {
		st->head = next;
		OPQ_CHECK(pthread_cond_signal(&next->cv));
	}
	opq__unlock(&st->mu);
	return 0;
}

OPQ_EXPORT int opq_stage_notify(opq_stage *st, const void *key, size_t keylen, void *event)
{
	if (!st || !key || keylen == 0)
		return EINVAL;
	uint64_t hash = hash_key(key, keylen);
	int rc = 0;
	opq__lock(&st->mu);
	opq_stage_ticket *t = find(st, key, keylen, hash);
	if (!t) {
		rc = ENOENT;
	} else if (t->latched) {
		rc = EAGAIN;
	} else {
		t->latched = true;
		t->event = event;
		if (in_fifo(t)) {
			fifo_unlink(st, t);
			OPQ_CHECK(pthread_cond_signal(&t->cv));
		}
	}
	opq__unlock(&st->mu);
	return rc;
}

OPQ_EXPORT int opq_stage_close(opq_stage *st, int error)
{
	if (!st || error <= 0 || error >= OPQ_STAGE_HEAD)
		return EINVAL;
	opq__lock(&st->mu);
	if (st->closed) {
		opq__unlock(&st->mu);
		return EALREADY;
	}
	st->closed = error;
	for (opq_stage_ticket *t; (t = fifo_pop(st));)
		OPQ_CHECK(pthread_cond_signal(&t->cv));
	opq__unlock(&st->mu);
	return 0;
}

OPQ_EXPORT int opq_stage_stats_get(opq_stage *st, opq_stage_stats *stats)
{
	if (!st || !stats)
		return EINVAL;
	memset(stats, 0, sizeof(*stats));
	opq__lock(&st->mu);
	stats->tickets = st->tickets;
	stats->waiting = st->waiting;
	stats->head = st->head != NULL;
	stats->closed = st->closed;
	opq__unlock(&st->mu);
	return 0;
}
