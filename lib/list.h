/*
 * list.h: the library's one intrusive doubly-linked list.
 *
 * A list is a circular ring through a head link: an empty list's head
 * points at itself, so insertion and removal never test for the ends.
 * Elements embed a struct opq__link (opqueue/common.h) and are recovered
 * with OPQ_CONTAINER_OF. A link that is on no list has NULL pointers
 * (opq__list_remove leaves it so), which lets opq__list_linked tell.
 * Nothing here locks: the list's owner does.
 */
#ifndef OPQ_LIST_H
#define OPQ_LIST_H

#include <stdbool.h>
#include <stddef.h>

#include "opqueue/common.h"

static inline void opq__list_init(struct opq__link *head)
{
	head->opq__next = head->opq__prev = head;
}

static inline bool opq__list_empty(const struct opq__link *head)
{
	return head->opq__next == head;
}

static inline bool opq__list_linked(const struct opq__link *l)
{
	return l->opq__next != NULL;
}

/* Insert l before `at` (at the tail when `at` is the head). */
static inline void opq__list_insert_before(struct opq__link *at, struct opq__link *l)
{
	l->opq__next = at;
	l->opq__prev = at->opq__prev;
	at->opq__prev->opq__next = l;
	at->opq__prev = l;
}

static inline void opq__list_push(struct opq__link *head, struct opq__link *l)
{
	opq__list_insert_before(head, l);
}

static inline void opq__list_remove(struct opq__link *l)
{
	l->opq__prev->opq__next = l->opq__next;
	l->opq__next->opq__prev = l->opq__prev;
	l->opq__next = l->opq__prev = NULL;
}

/* The first element, or NULL when the list is empty. */
static inline struct opq__link *opq__list_first(const struct opq__link *head)
{
	return head->opq__next == head ? NULL : head->opq__next;
}

/* Remove and return the first element, or NULL when the list is empty. */
static inline struct opq__link *opq__list_pop(struct opq__link *head)
{
	struct opq__link *l = opq__list_first(head);
	if (l)
		opq__list_remove(l);
	return l;
}

/*
 * Move the first n elements of list `from` (it has at least n) to the tail
 * of list `to`, keeping their order.
 */
static inline void opq__list_cut(struct opq__link *from, size_t n, struct opq__link *to)
{
	if (n == 0)
		return;
	struct opq__link *first = from->opq__next, *last = first;
	while (--n)
		last = last->opq__next;
	from->opq__next = last->opq__next;
	last->opq__next->opq__prev = from;
	first->opq__prev = to->opq__prev;
	to->opq__prev->opq__next = first;
	last->opq__next = to;
	to->opq__prev = last;
}

#define opq__list_for_each(pos, head)                                                              \
	for (struct opq__link *pos = (head)->opq__next; pos != (head); pos = pos->opq__next)

#endif /* OPQ_LIST_H */
