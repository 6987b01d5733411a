/*
 * check_chan.c: completion channels (opqueue/chan.h). Every operation that
 * names a channel ends exactly once, in a completion run by the thread that
 * calls opq_chan_run: status 0 after its perform, ECANCELED when a cancel,
 * a discarding stop or a queue's destroy drops it (its discard is never
 * called). Completions run in the order their performs finished, at most
 * `max` per call, and a burst costs one write to the descriptor. The test's
 * thread is the loop here (tests/check_chan_loops.c drives real loops).
 * Links the convenience library for the fault injector.
 */
#include "harness.h"
#include "fault.h"
#include "internal.h"

#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

/* What the loop saw: every completion is counted here, on the loop thread. */
struct tally {
	pthread_t loop;        /* the thread that must run every completion */
	atomic_long ended;     /* completions run */
	atomic_long ok;        /* ... with status 0 */
	atomic_long cancelled; /* ... with ECANCELED */
	atomic_long bad;       /* wrong thread, wrong status, or twice */
	long *order;           /* ids in completion order, when set */
	long norder, maxorder;
};

static void tally_init(struct tally *t)
{
	memset(t, 0, sizeof(*t));
	t->loop = pthread_self();
}

static void tally_end(struct tally *t, long id, int status)
{
	if (!pthread_equal(pthread_self(), t->loop))
		atomic_fetch_add(&t->bad, 1);
	if (status == 0)
		atomic_fetch_add(&t->ok, 1);
	else if (status == ECANCELED)
		atomic_fetch_add(&t->cancelled, 1);
	else
		atomic_fetch_add(&t->bad, 1);
	if (t->order && t->norder < t->maxorder)
		t->order[t->norder++] = id;
	atomic_fetch_add(&t->ended, 1);
}

/* An intrusive operation with a completion. */
struct cop {
	opq_op op;
	long id;
	atomic_int performed, discarded, completed;
	int status;
	struct t_gate *hold;   /* perform waits on it, when set */
	atomic_int *started;   /* set when perform begins */
	atomic_long *finished; /* perform's end: the next number, in fin */
	long fin;
	struct tally *t;
};

static void cop_perform(opq_op *op)
{
	struct cop *c = OPQ_CONTAINER_OF(op, struct cop, op);
	if (c->started)
		atomic_store(c->started, 1);
	if (c->hold)
		ck_assert(t_gate_wait(c->hold));
	atomic_fetch_add(&c->performed, 1);
	if (c->finished)
		c->fin = atomic_fetch_add(c->finished, 1);
}

static void cop_discard(opq_op *op)
{
	struct cop *c = OPQ_CONTAINER_OF(op, struct cop, op);
	atomic_fetch_add(&c->discarded, 1);
}

static void cop_complete(opq_op *op, int status)
{
	struct cop *c = OPQ_CONTAINER_OF(op, struct cop, op);
	if (atomic_fetch_add(&c->completed, 1) != 0)
		atomic_fetch_add(&c->t->bad, 1);
	c->status = status;
	tally_end(c->t, c->id, status);
}

static void cop_init(struct cop *c, long id, opq_chan *ch, struct tally *t)
{
	memset(c, 0, sizeof(*c));
	ck_assert_int_eq(opq_op_init(&c->op, cop_perform, cop_discard), 0);
	ck_assert_int_eq(opq_op_set_completion(&c->op, ch, cop_complete), 0);
	c->id = id;
	c->t = t;
}

static struct cop *cops_new(long n, opq_chan *ch, struct tally *t)
{
	struct cop *c = calloc((size_t)n, sizeof(*c));
	ck_assert_ptr_nonnull(c);
	for (long i = 0; i < n; i++)
		cop_init(&c[i], i, ch, t);
	return c;
}

/* The argument of a function-pointer operation (opq_queue_submit). */
struct sub {
	long id;
	atomic_int performed, completed;
	int status;
	struct tally *t;
};

static void sub_work(void *arg)
{
	atomic_fetch_add(&((struct sub *)arg)->performed, 1);
}

static void sub_after(void *arg, int status)
{
	struct sub *s = arg;
	if (atomic_fetch_add(&s->completed, 1) != 0)
		atomic_fetch_add(&s->t->bad, 1);
	s->status = status;
	tally_end(s->t, s->id, status);
}

static bool readable(opq_chan *ch)
{
	int fd;
	ck_assert_int_eq(opq_chan_fd(ch, &fd), 0);
	struct pollfd p = {.fd = fd, .events = POLLIN};
	int n = poll(&p, 1, 0);
	ck_assert_int_ge(n, 0);
	return n == 1 && (p.revents & POLLIN);
}

/*
 * Be the loop: wait for the descriptor, run up to `max` completions a call,
 * until t has seen `target`. Then one more call finds nothing and leaves the
 * descriptor quiet. Fails after T_WAIT_NS.
 */
static void pump(opq_chan *ch, struct tally *t, long target, unsigned max)
{
	int fd;
	ck_assert_int_eq(opq_chan_fd(ch, &fd), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	while (atomic_load(&t->ended) < target) {
		ck_assert_msg(!t_passed(&dl), "%ld of %ld completions",
		              (long)atomic_load(&t->ended), target);
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int n = poll(&p, 1, 100);
		ck_assert_int_ge(n, 0);
		if (n == 0)
			continue;
		unsigned ran = max + 1;
		ck_assert_int_eq(opq_chan_run(ch, max, &ran), 0);
		ck_assert_uint_le(ran, max);
	}
	ck_assert_int_eq(atomic_load(&t->ended), target);
	unsigned ran = 1;
	ck_assert_int_eq(opq_chan_run(ch, 1000, &ran), 0);
	ck_assert_uint_eq(ran, 0);
	ck_assert(!readable(ch));
	ck_assert_int_eq(atomic_load(&t->bad), 0);
}

static opq_queue *queue_new(size_t capacity, unsigned runners)
{
	opq_queue_attr *a;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_capacity(a, capacity), 0);
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, a), 0);
	opq_queue_attr_destroy(a);
	if (runners)
		ck_assert_int_eq(opq_queue_start(q, runners), 0);
	return q;
}

static void queue_end(opq_queue *q)
{
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}

/* ---- bad input and refusals ----------------------------------------------- */

START_TEST(test_bad_input)
{
	ck_assert_int_eq(opq_chan_create(NULL), EINVAL);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	int fd = -1;
	ck_assert_int_eq(opq_chan_fd(NULL, &fd), EINVAL);
	ck_assert_int_eq(opq_chan_fd(ch, NULL), EINVAL);
	ck_assert_int_eq(opq_chan_fd(ch, &fd), 0);
	ck_assert_int_ge(fd, 0);
	ck_assert(fcntl(fd, F_GETFL) & O_NONBLOCK);
	ck_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	ck_assert(!readable(ch));

	unsigned ran = 7;
	ck_assert_int_eq(opq_chan_run(NULL, 1, &ran), EINVAL);
	ck_assert_int_eq(opq_chan_run(ch, 0, &ran), EINVAL);
	ck_assert_uint_eq(ran, 7);
	ck_assert_int_eq(opq_chan_run(ch, 1, &ran), 0);
	ck_assert_uint_eq(ran, 0);
	ck_assert_int_eq(opq_chan_run(ch, 1, NULL), 0);

	struct tally t;
	tally_init(&t);
	struct cop c;
	cop_init(&c, 0, ch, &t);
	ck_assert_int_eq(opq_op_set_completion(NULL, ch, cop_complete), EINVAL);
	ck_assert_int_eq(opq_op_set_completion(&c.op, ch, NULL), EINVAL);
	ck_assert_int_eq(opq_op_set_completion(&c.op, NULL, cop_complete), EINVAL);

	opq_queue *q = queue_new(0, 0);
	int x;
	struct timespec bad = {.tv_sec = 0, .tv_nsec = -1};
	ck_assert_int_eq(opq_queue_submit(NULL, ch, sub_work, sub_after, &x, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_submit(q, NULL, sub_work, sub_after, &x, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_submit(q, ch, NULL, sub_after, &x, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &x, &bad), EINVAL);

	/* ch and complete both NULL: an ordinary operation again, discarded. */
	ck_assert_int_eq(opq_op_set_completion(&c.op, NULL, NULL), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0); /* c does not name it */
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(c.discarded, 1);
	ck_assert_int_eq(c.completed, 0);
	ck_assert_int_eq(opq_chan_destroy(NULL), 0);
}
END_TEST

START_TEST(test_set_completion_queued_and_destroy_busy)
{
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	struct cop c[2];
	cop_init(&c[0], 0, ch, &t);
	cop_init(&c[1], 1, ch, &t);
	struct sub s = {.id = 2, .t = &t};
	opq_queue *q = queue_new(0, 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c[0].op), 0);
	ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s, NULL), 0);
	ck_assert_int_eq(opq_op_set_completion(&c[0].op, ch, cop_complete), EBUSY);
	ck_assert_int_eq(opq_op_set_completion(&c[0].op, NULL, NULL), EBUSY);
	/* Queued, not ended: destroy refuses and leaves the channel working. */
	ck_assert_int_eq(opq_chan_destroy(ch), EBUSY);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	/* Ended, completion not run: destroy still refuses. */
	ck_assert(readable(ch));
	ck_assert_int_eq(opq_chan_destroy(ch), EBUSY);
	ck_assert(readable(ch));
	pump(ch, &t, 2, 64);
	/* Completed: c[0] is the caller's again. */
	ck_assert_int_eq(opq_op_set_completion(&c[0].op, ch, cop_complete), 0);
	ck_assert_int_eq(c[0].performed, 1);
	ck_assert_int_eq(c[0].status, 0);
	ck_assert_int_eq(s.performed, 1);
	ck_assert_int_eq(s.status, 0);
	ck_assert_int_eq(c[1].completed, 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

/*
 * An operation with a completion is the library's from its enqueue until
 * its completion: from inside its perform, and while it waits on the
 * channel, neither opq_op_set_completion nor an enqueue may take it
 * (EBUSY), so it cannot be moved to another channel or ended twice.
 */
struct owned {
	opq_op op;
	opq_queue *q;
	opq_chan *other;
	int set_rc, clear_rc, enqueue_rc, completed, status;
};

static void owned_perform(opq_op *op)
{
	struct owned *o = OPQ_CONTAINER_OF(op, struct owned, op);
	o->set_rc = opq_op_set_completion(op, o->other, cop_complete);
	o->clear_rc = opq_op_set_completion(op, NULL, NULL);
	o->enqueue_rc = opq_queue_enqueue(o->q, op);
}

static void owned_complete(opq_op *op, int status)
{
	struct owned *o = OPQ_CONTAINER_OF(op, struct owned, op);
	o->completed++;
	o->status = status;
}

START_TEST(test_owned_until_completion)
{
	opq_chan *ch, *other;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	ck_assert_int_eq(opq_chan_create(&other), 0);
	for (size_t capacity = 0; capacity <= 4; capacity += 4) {
		opq_queue *q = queue_new(capacity, 1);
		struct owned o = {.q = q, .other = other};
		ck_assert_int_eq(opq_op_init(&o.op, owned_perform, NULL), 0);
		ck_assert_int_eq(opq_op_set_completion(&o.op, ch, owned_complete), 0);
		ck_assert_int_eq(opq_queue_enqueue(q, &o.op), 0);
		ck_assert_int_eq(opq_queue_wait_idle(q, NULL), 0);
		ck_assert_int_eq(o.set_rc, EBUSY);
		ck_assert_int_eq(o.clear_rc, EBUSY);
		ck_assert_int_eq(o.enqueue_rc, EBUSY);
		/* Ended, waiting on the channel: still the library's. */
		ck_assert(readable(ch));
		ck_assert_int_eq(opq_op_set_completion(&o.op, other, owned_complete), EBUSY);
		ck_assert_int_eq(opq_queue_enqueue(q, &o.op), EBUSY);
		ck_assert_int_eq(opq_chan_destroy(ch), EBUSY);
		unsigned ran = 0;
		ck_assert_int_eq(opq_chan_run(ch, 64, &ran), 0);
		ck_assert_uint_eq(ran, 1);
		ck_assert_int_eq(o.completed, 1);
		ck_assert_int_eq(o.status, 0);
		/* Completed: the caller's again, to move or to enqueue. */
		ck_assert_int_eq(opq_op_set_completion(&o.op, other, owned_complete), 0);
		ck_assert_int_eq(opq_op_set_completion(&o.op, ch, owned_complete), 0);
		queue_end(q);
	}
	ck_assert_int_eq(opq_chan_destroy(other), 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

/* A completion that calls run and destroy on its own channel: both EBUSY. */
struct nested {
	opq_op op;
	opq_chan *ch;
	int run_rc, destroy_rc, calls;
};

static void nested_perform(opq_op *op)
{
	(void)op;
}

static void nested_complete(opq_op *op, int status)
{
	struct nested *n = OPQ_CONTAINER_OF(op, struct nested, op);
	ck_assert_int_eq(status, 0);
	unsigned ran = 9;
	n->run_rc = opq_chan_run(n->ch, 10, &ran);
	ck_assert_uint_eq(ran, 9);
	n->destroy_rc = opq_chan_destroy(n->ch);
	n->calls++;
}

START_TEST(test_nested_run)
{
	struct nested n = {.run_rc = -1, .destroy_rc = -1};
	ck_assert_int_eq(opq_chan_create(&n.ch), 0);
	ck_assert_int_eq(opq_op_init(&n.op, nested_perform, NULL), 0);
	ck_assert_int_eq(opq_op_set_completion(&n.op, n.ch, nested_complete), 0);
	opq_queue *q = queue_new(0, 1);
	ck_assert_int_eq(opq_queue_enqueue(q, &n.op), 0);
	queue_end(q);
	unsigned ran = 0;
	ck_assert_int_eq(opq_chan_run(n.ch, 10, &ran), 0);
	ck_assert_uint_eq(ran, 1);
	ck_assert_int_eq(n.calls, 1);
	ck_assert_int_eq(n.run_rc, EBUSY);
	ck_assert_int_eq(n.destroy_rc, EBUSY);
	ck_assert_int_eq(opq_chan_destroy(n.ch), 0);
}
END_TEST

/* ---- exactly once under load ---------------------------------------------- */

struct producer {
	opq_queue *q;
	opq_chan *ch;
	struct cop *cops; /* intrusive ones, even ids */
	struct sub *subs; /* submitted ones, odd ids */
	long n;
	struct t_gate *go;
	int rc;
};

static void *produce(void *arg)
{
	struct producer *p = arg;
	if (!t_gate_wait(p->go)) {
		p->rc = ETIMEDOUT;
		return NULL;
	}
	for (long i = 0; i < p->n && !p->rc; i++) {
		if (i % 2 == 0)
			p->rc = opq_queue_enqueue(p->q, &p->cops[i].op);
		else
			p->rc =
			    opq_queue_submit(p->q, p->ch, sub_work, sub_after, &p->subs[i], NULL);
	}
	return NULL;
}

/* nprod producers, n operations each (half of each form), into q; the
 * test's thread pumps ch with `max` until all have completed once. */
static void load(opq_queue *q, opq_chan *ch, int nprod, long n, unsigned max)
{
	struct tally t;
	tally_init(&t);
	struct producer p[8];
	pthread_t th[8];
	struct t_gate go;
	t_gate_init(&go);
	for (int k = 0; k < nprod; k++) {
		p[k] = (struct producer){.q = q, .ch = ch, .n = n, .go = &go};
		p[k].cops = cops_new(n, ch, &t);
		p[k].subs = calloc((size_t)n, sizeof(struct sub));
		ck_assert_ptr_nonnull(p[k].subs);
		for (long i = 0; i < n; i++)
			p[k].subs[i] = (struct sub){.id = i, .t = &t};
		ck_assert_int_eq(pthread_create(&th[k], NULL, produce, &p[k]), 0);
	}
	t_gate_open(&go);
	pump(ch, &t, nprod * n, max);
	for (int k = 0; k < nprod; k++) {
		ck_assert_int_eq(pthread_join(th[k], NULL), 0);
		ck_assert_int_eq(p[k].rc, 0);
		for (long i = 0; i < n; i++) {
			if (i % 2 == 0) {
				struct cop *c = &p[k].cops[i];
				ck_assert_int_eq(c->performed, 1);
				ck_assert_int_eq(c->completed, 1);
				ck_assert_int_eq(c->discarded, 0);
				ck_assert_int_eq(c->status, 0);
			} else {
				struct sub *s = &p[k].subs[i];
				ck_assert_int_eq(s->performed, 1);
				ck_assert_int_eq(s->completed, 1);
				ck_assert_int_eq(s->status, 0);
			}
		}
		free(p[k].cops);
		free(p[k].subs);
	}
	ck_assert_int_eq(t.ok, nprod * n);
	ck_assert_int_eq(t.cancelled, 0);
	t_gate_destroy(&go);
}

START_TEST(test_exactly_once_load)
{
	static const unsigned runners[] = {2, 3, 8};
	static const size_t capacity[] = {0, 16, 0};
	static const unsigned max[] = {64, 1, 7};
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	for (int round = 0; round < 3; round++) {
		int i = round % 3;
		opq_queue *q = queue_new(capacity[i], runners[i]);
		load(q, ch, 4, t_scale(4000), max[i]);
		queue_end(q);
	}
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

/* ---- order, max, and one write per burst ---------------------------------- */

/* Completions in the order the performs finished: with one runner, the FIFO
 * order. ops[i].fin numbers the performs' ends. */
static void check_order(struct cop *c, struct tally *t, long n)
{
	ck_assert_int_eq(t->norder, n);
	for (long i = 0; i < n; i++) {
		ck_assert_int_eq(t->order[i], i);
		ck_assert_int_eq(c[i].fin, i);
	}
}

START_TEST(test_order_one_runner)
{
	long n = t_scale(20000);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	for (size_t capacity = 0; capacity <= 8; capacity += 8) {
		struct tally t;
		tally_init(&t);
		t.order = calloc((size_t)n, sizeof(long));
		t.maxorder = n;
		struct cop *c = cops_new(n, ch, &t);
		atomic_long finished = 0;
		opq_queue *q = queue_new(capacity, 1);
		for (long i = 0; i < n; i++) {
			c[i].finished = &finished;
			ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
			/* Take some while the runner still works. */
			if (i % 1000 == 999)
				ck_assert_int_eq(opq_chan_run(ch, 500, NULL), 0);
		}
		pump(ch, &t, n, 33);
		check_order(c, &t, n);
		queue_end(q);
		free(c);
		free(t.order);
	}
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

/* With several runners, the numbers the performs took at their end come
 * back in order per runner; across runners a completion may overtake one
 * whose perform finished just before (the push is after the number), so
 * only "each op once, in an order consistent with each queue" is checked
 * with several queues, one runner each, into one channel. */
START_TEST(test_several_queues_one_channel)
{
	enum { NQ = 3 };
	long n = t_scale(5000);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	t.order = calloc((size_t)(NQ * n), sizeof(long));
	t.maxorder = NQ * n;
	struct cop *c = cops_new(NQ * n, ch, &t);
	opq_queue *q[NQ];
	for (int k = 0; k < NQ; k++)
		q[k] = queue_new(k == 1 ? 4 : 0, 1);
	for (long i = 0; i < n; i++)
		for (int k = 0; k < NQ; k++)
			ck_assert_int_eq(opq_queue_enqueue(q[k], &c[i * NQ + k].op), 0);
	pump(ch, &t, NQ * n, 16);
	long last[NQ] = {-1, -1, -1};
	for (long j = 0; j < NQ * n; j++) {
		long id = t.order[j];
		int k = (int)(id % NQ);
		ck_assert_int_gt(id / NQ, last[k]);
		last[k] = id / NQ;
	}
	for (long i = 0; i < NQ * n; i++)
		ck_assert_int_eq(c[i].status, 0);
	for (int k = 0; k < NQ; k++)
		queue_end(q[k]);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	free(c);
	free(t.order);
}
END_TEST

START_TEST(test_max_keeps_readable)
{
	enum { N = 10 };
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	long order[N];
	t.order = order;
	t.maxorder = N;
	struct cop *c = cops_new(N, ch, &t);
	opq_queue *q = queue_new(0, 1);
	for (long i = 0; i < N; i++)
		ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
	queue_end(q); /* every perform and hand-off is done */
	unsigned ran = 0;
	for (int k = 0; k < 3; k++) {
		ck_assert(readable(ch));
		ck_assert_int_eq(opq_chan_run(ch, 3, &ran), 0);
		ck_assert_uint_eq(ran, 3);
	}
	ck_assert(readable(ch));
	ck_assert_int_eq(opq_chan_run(ch, 3, &ran), 0);
	ck_assert_uint_eq(ran, 1);
	ck_assert(!readable(ch));
	ck_assert_int_eq(opq_chan_run(ch, 3, &ran), 0);
	ck_assert_uint_eq(ran, 0);
	ck_assert_int_eq(t.norder, N);
	for (long i = 0; i < N; i++)
		ck_assert_int_eq(order[i], i);
	ck_assert_int_eq(t.bad, 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	free(c);
}
END_TEST

/* Read the descriptor as the loop would not: how many writes it holds
 * (an eventfd's counter; a pipe's bytes). */
static long fd_writes(opq_chan *ch)
{
	int fd;
	ck_assert_int_eq(opq_chan_fd(ch, &fd), 0);
#ifdef HAVE_SYS_EVENTFD_H
	uint64_t v = 0;
	ssize_t r = read(fd, &v, sizeof(v));
	return r == (ssize_t)sizeof(v) ? (long)v : 0;
#else
	char buf[4096];
	ssize_t r = read(fd, buf, sizeof(buf));
	return r > 0 ? (long)r : 0;
#endif
}

START_TEST(test_one_write_per_burst)
{
	long n = t_scale(3000);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	struct cop *c = cops_new(n, ch, &t);
	struct sub *s = calloc((size_t)n, sizeof(*s));
	for (int burst = 1; burst <= 3; burst++) {
		opq_queue *q = queue_new(burst == 2 ? 8 : 0, 4);
		for (long i = 0; i < n; i++) {
			if (i % 2 == 0) {
				atomic_store(&c[i].completed, 0);
				ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
			} else {
				s[i] = (struct sub){.id = i, .t = &t};
				ck_assert_int_eq(
				    opq_queue_submit(q, ch, sub_work, sub_after, &s[i], NULL), 0);
			}
		}
		queue_end(q); /* all n ended, none run: one write */
		ck_assert_int_eq(fd_writes(ch), 1);
		ck_assert(!readable(ch));
		unsigned ran = 0;
		ck_assert_int_eq(opq_chan_run(ch, (unsigned)n, &ran), 0);
		ck_assert_uint_eq(ran, n);
		ck_assert_int_eq(t.ended, burst * n);
		ck_assert_int_eq(fd_writes(ch), 0);
	}
	ck_assert_int_eq(t.ok, 3 * n);
	ck_assert_int_eq(t.bad, 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	free(c);
	free(s);
}
END_TEST

/* ---- ended without perform: ECANCELED, never discard ---------------------- */

START_TEST(test_cancel)
{
	enum { N = 40 };
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	struct cop *c = cops_new(N, ch, &t);
	struct t_gate hold;
	t_gate_init(&hold);
	atomic_int started = 0;
	c[0].hold = &hold;
	c[0].started = &started;
	/* Queued before the start. Unbounded: the runner takes a batch of
	 * them (the rest stay in the FIFO), starting c[0]; bounded: they
	 * wait in the FIFO. Either way each is cancellable until started. */
	for (size_t capacity = 0; capacity <= N; capacity += N) {
		opq_queue *q = queue_new(capacity, 0);
		for (long i = 0; i < N; i++) {
			atomic_store(&c[i].completed, 0);
			atomic_store(&c[i].performed, 0);
			ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
		}
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		T_WAIT_UNTIL(atomic_load(&started));
		ck_assert_int_eq(opq_queue_cancel(q, &c[0].op), EBUSY); /* running */
		long cancelled = 0;
		for (long i = 1; i < N; i += 2, cancelled++)
			ck_assert_int_eq(opq_queue_cancel(q, &c[i].op), 0);
		ck_assert_int_eq(opq_queue_cancel(q, &c[1].op), EBUSY); /* gone already */
		pump(ch, &t, t.ended + cancelled, 5);
		t_gate_open(&hold);
		queue_end(q);
		pump(ch, &t, t.ended + N - cancelled, 5);
		for (long i = 0; i < N; i++) {
			ck_assert_int_eq(c[i].completed, 1);
			ck_assert_int_eq(c[i].discarded, 0);
			ck_assert_int_eq(c[i].performed, i % 2 == 0);
			ck_assert_int_eq(c[i].status, i % 2 == 0 ? 0 : ECANCELED);
		}
		t_gate_destroy(&hold);
		t_gate_init(&hold);
		atomic_store(&started, 0);
	}
	ck_assert_int_eq(t.cancelled, N);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	t_gate_destroy(&hold);
	free(c);
}
END_TEST

struct stopper {
	opq_queue *q;
	int rc;
};

static void *stop_discard(void *arg)
{
	struct stopper *s = arg;
	s->rc = opq_queue_stop(s->q, OPQ_STOP_DISCARD);
	return NULL;
}

/* A discarding stop while a perform runs: the queued ones come back with
 * ECANCELED while the stop still waits, the running one with 0. */
START_TEST(test_stop_discard)
{
	long n = t_scale(2000);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	for (size_t capacity = 0; capacity <= 2 * (size_t)n; capacity += 2 * (size_t)n) {
		struct tally t;
		tally_init(&t);
		struct cop *c = cops_new(n, ch, &t);
		struct sub *s = calloc((size_t)n, sizeof(*s));
		struct t_gate hold;
		t_gate_init(&hold);
		atomic_int started = 0;
		c[0].hold = &hold;
		c[0].started = &started;
		opq_queue *q = queue_new(capacity, 1);
		ck_assert_int_eq(opq_queue_enqueue(q, &c[0].op), 0);
		T_WAIT_UNTIL(atomic_load(&started));
		for (long i = 1; i < n; i++) {
			s[i] = (struct sub){.id = i, .t = &t};
			ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
			ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s[i], NULL),
			                 0);
		}
		struct stopper st = {.q = q, .rc = -1};
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, stop_discard, &st), 0);
		pump(ch, &t, 2 * (n - 1), 100);
		ck_assert_int_eq(t.cancelled, 2 * (n - 1));
		ck_assert_int_eq(c[0].completed, 0);
		t_gate_open(&hold);
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_int_eq(st.rc, 0);
		pump(ch, &t, 2 * n - 1, 100);
		ck_assert_int_eq(c[0].status, 0);
		ck_assert_int_eq(c[0].performed, 1);
		for (long i = 1; i < n; i++) {
			ck_assert_int_eq(c[i].performed, 0);
			ck_assert_int_eq(c[i].discarded, 0);
			ck_assert_int_eq(c[i].status, ECANCELED);
			ck_assert_int_eq(s[i].performed, 0);
			ck_assert_int_eq(s[i].completed, 1);
			ck_assert_int_eq(s[i].status, ECANCELED);
		}
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		t_gate_destroy(&hold);
		free(c);
		free(s);
	}
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

START_TEST(test_queue_destroy_drops)
{
	long n = t_scale(1000);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	struct cop *c = cops_new(n, ch, &t);
	struct sub *s = calloc((size_t)n, sizeof(*s));
	opq_queue *q = queue_new(0, 0); /* never started */
	for (long i = 0; i < n; i++) {
		s[i] = (struct sub){.id = i, .t = &t};
		ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
		ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s[i], NULL), 0);
	}
	ck_assert_int_eq(opq_chan_destroy(ch), EBUSY);
	ck_assert(!readable(ch));
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	pump(ch, &t, 2 * n, 64);
	ck_assert_int_eq(t.cancelled, 2 * n);
	for (long i = 0; i < n; i++) {
		ck_assert_int_eq(c[i].discarded, 0);
		ck_assert_int_eq(c[i].status, ECANCELED);
		ck_assert_int_eq(s[i].status, ECANCELED);
	}
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	free(c);
	free(s);
}
END_TEST

/* ---- submit's errors -------------------------------------------------------- */

START_TEST(test_submit_bounded_deadline)
{
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	struct sub s[3] = {{.id = 0, .t = &t}, {.id = 1, .t = &t}, {.id = 2, .t = &t}};
	opq_queue *q = queue_new(1, 0);
	ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s[0], NULL), 0);
	struct timespec past = t_deadline(0);
	ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s[1], &past), ETIMEDOUT);
	struct timespec soon = t_deadline(20 * 1000000LL);
	ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s[2], &soon), ETIMEDOUT);
	struct cop c;
	cop_init(&c, 3, ch, &t);
	ck_assert_int_eq(opq_queue_tryenqueue(q, &c.op), EAGAIN);
	ck_assert_int_eq(opq_queue_timedenqueue(q, &c.op, &past), ETIMEDOUT);
	ck_assert(!readable(ch));
	/* The failed ones do not count as pending: run the first and destroy. */
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	pump(ch, &t, 1, 8);
	ck_assert_int_eq(s[0].status, 0);
	for (int i = 1; i < 3; i++) {
		ck_assert_int_eq(s[i].performed, 0);
		ck_assert_int_eq(s[i].completed, 0);
	}
	ck_assert_int_eq(c.completed, 0);
	/* A stopped queue refuses, nothing called. */
	ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s[1], NULL), ESHUTDOWN);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	ck_assert_int_eq(s[1].completed, 0);
}
END_TEST

START_TEST(test_submit_enomem)
{
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	struct sub s = {.t = &t};
	for (size_t capacity = 0; capacity <= 4; capacity += 4) {
		opq_queue *q = queue_new(capacity, 1);
		int before = atomic_load(&s.performed);
		SWEEP(opq_queue_submit(q, ch, sub_work, sub_after, &s, NULL), {
			ck_assert(!readable(ch));
			ck_assert_int_eq(s.performed, before);
		});
		queue_end(q);
		pump(ch, &t, capacity ? 2 : 1, 8);
		ck_assert_int_eq(s.performed, capacity ? 2 : 1);
		atomic_store(&s.completed, 0);
	}
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	/* And the channel itself. */
	opq_chan *c2 = NULL;
	SWEEP(opq_chan_create(&c2), ck_assert_ptr_null(c2));
	ck_assert_int_eq(opq_chan_destroy(c2), 0);
}
END_TEST

/* ---- completions that enqueue more ------------------------------------------ */

struct chain {
	opq_op op;
	opq_queue *q;
	opq_chan *ch;
	long left; /* re-enqueues of op still to do */
	long subs; /* submits made from completions */
	atomic_long sub_done;
	struct tally *t;
	int rc;
};

static void chain_perform(opq_op *op)
{
	(void)op;
}

static void noop(void *arg)
{
	(void)arg;
}

static void chain_sub_after(void *arg, int status)
{
	struct chain *c = arg;
	tally_end(c->t, -1, status);
	atomic_fetch_add(&c->sub_done, 1);
}

static void chain_complete(opq_op *op, int status)
{
	struct chain *c = OPQ_CONTAINER_OF(op, struct chain, op);
	tally_end(c->t, c->left, status);
	if (c->left == 0 || c->rc)
		return;
	c->left--;
	if (c->left % 3 == 0 && !c->rc) {
		c->rc = opq_queue_submit(c->q, c->ch, noop, chain_sub_after, c, NULL);
		c->subs += !c->rc;
	}
	if (!c->rc)
		c->rc = opq_queue_enqueue(c->q, &c->op);
}

START_TEST(test_completion_enqueues)
{
	long n = t_scale(5000);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	for (size_t capacity = 0; capacity <= 2; capacity += 2) {
		opq_queue *q = queue_new(capacity, 2);
		struct chain c = {.q = q, .ch = ch, .left = n, .t = &t};
		ck_assert_int_eq(opq_op_init(&c.op, chain_perform, NULL), 0);
		ck_assert_int_eq(opq_op_set_completion(&c.op, ch, chain_complete), 0);
		long before = t.ended;
		ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
		/* n + 1 ends of op, and the submits: their count is known at the end. */
		struct timespec dl = t_deadline(T_WAIT_NS);
		int fd;
		ck_assert_int_eq(opq_chan_fd(ch, &fd), 0);
		while (c.left > 0 || t.ended < before + n + 1 + c.subs) {
			ck_assert(!t_passed(&dl));
			ck_assert_int_eq(c.rc, 0);
			struct pollfd p = {.fd = fd, .events = POLLIN};
			ck_assert_int_ge(poll(&p, 1, 100), 0);
			ck_assert_int_eq(opq_chan_run(ch, 10, NULL), 0);
		}
		ck_assert_int_eq(c.rc, 0);
		ck_assert_int_eq(c.subs, (n - 1) / 3 + 1); /* left = n-1 .. 0 */
		ck_assert_int_eq(c.sub_done, c.subs);
		pump(ch, &t, before + n + 1 + c.subs, 10);
		queue_end(q);
	}
	ck_assert_int_eq(t.cancelled, 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

/* An operation dropped by one queue is the caller's again in its
 * ECANCELED completion, which may enqueue it elsewhere (a retry). */
struct retry {
	opq_op op;
	opq_queue *again;
	int statuses[2], ncomplete, rc;
	atomic_int performed;
};

static void retry_perform(opq_op *op)
{
	atomic_fetch_add(&OPQ_CONTAINER_OF(op, struct retry, op)->performed, 1);
}

static void retry_complete(opq_op *op, int status)
{
	struct retry *r = OPQ_CONTAINER_OF(op, struct retry, op);
	if (r->ncomplete < 2)
		r->statuses[r->ncomplete] = status;
	r->ncomplete++;
	if (status == ECANCELED)
		r->rc = opq_queue_enqueue(r->again, op);
}

START_TEST(test_cancelled_completion_reenqueues)
{
	enum { N = 30 };
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	opq_queue *b = queue_new(0, 2);
	struct retry r[N];
	for (int how = 0; how < 3; how++) {
		opq_queue *a = queue_new(how == 1 ? N : 0, 0);
		for (int i = 0; i < N; i++) {
			memset(&r[i], 0, sizeof(r[i]));
			r[i].again = b;
			r[i].rc = -1;
			ck_assert_int_eq(opq_op_init(&r[i].op, retry_perform, NULL), 0);
			ck_assert_int_eq(opq_op_set_completion(&r[i].op, ch, retry_complete), 0);
			ck_assert_int_eq(opq_queue_enqueue(a, &r[i].op), 0);
		}
		if (how == 0)
			for (int i = 0; i < N; i++)
				ck_assert_int_eq(opq_queue_cancel(a, &r[i].op), 0);
		else if (how == 1)
			ck_assert_int_eq(opq_queue_stop(a, OPQ_STOP_DISCARD), 0);
		ck_assert_int_eq(opq_queue_destroy(a), 0);
		int fd;
		ck_assert_int_eq(opq_chan_fd(ch, &fd), 0);
		struct timespec dl = t_deadline(T_WAIT_NS);
		for (int i = 0; i < N; i++) {
			while (r[i].ncomplete < 2) {
				ck_assert(!t_passed(&dl));
				struct pollfd p = {.fd = fd, .events = POLLIN};
				ck_assert_int_ge(poll(&p, 1, 100), 0);
				ck_assert_int_eq(opq_chan_run(ch, 8, NULL), 0);
			}
			ck_assert_int_eq(r[i].ncomplete, 2);
			ck_assert_int_eq(r[i].statuses[0], ECANCELED);
			ck_assert_int_eq(r[i].statuses[1], 0);
			ck_assert_int_eq(r[i].rc, 0);
			ck_assert_int_eq(r[i].performed, 1);
		}
	}
	queue_end(b);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
}
END_TEST

/* ---- the loop is another thread ------------------------------------------- */

struct loop_arg {
	opq_chan *ch;
	struct tally *t;
	long target;
	struct t_gate ready;
};

static void *loop_main(void *arg)
{
	struct loop_arg *a = arg;
	a->t->loop = pthread_self();
	t_gate_open(&a->ready);
	pump(a->ch, a->t, a->target, 50);
	return NULL;
}

START_TEST(test_thread_identity)
{
	long n = t_scale(4000);
	opq_chan *ch;
	ck_assert_int_eq(opq_chan_create(&ch), 0);
	struct tally t;
	tally_init(&t);
	struct cop *c = cops_new(n, ch, &t);
	struct sub *s = calloc((size_t)n, sizeof(*s));
	int *cancel_rc = calloc((size_t)n / 7 + 1, sizeof(int));
	struct loop_arg a = {.ch = ch, .t = &t, .target = 2 * n};
	t_gate_init(&a.ready);
	pthread_t loop;
	ck_assert_int_eq(pthread_create(&loop, NULL, loop_main, &a), 0);
	ck_assert(t_gate_wait(&a.ready));
	opq_queue *q = queue_new(0, 3);
	for (long i = 0; i < n; i++) {
		s[i] = (struct sub){.id = i, .t = &t};
		ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
		ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s[i], NULL), 0);
		/* 0 or EBUSY, racing the runners: ECANCELED exactly when 0. */
		if (i % 7 == 0)
			cancel_rc[i / 7] = opq_queue_cancel(q, &c[i].op);
	}
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
	ck_assert_int_eq(pthread_join(loop, NULL), 0);
	ck_assert_int_eq(t.bad, 0);
	ck_assert_int_eq(t.ended, 2 * n);
	for (long i = 0; i < n; i++) {
		ck_assert_int_eq(c[i].completed, 1);
		ck_assert_int_eq(c[i].performed, c[i].status == 0);
		ck_assert_int_eq(s[i].completed, 1);
		ck_assert_int_eq(s[i].performed, s[i].status == 0);
		if (i % 7 == 0) {
			int rc = cancel_rc[i / 7];
			ck_assert_msg(rc == 0 || rc == EBUSY, "cancel: %d", rc);
			if (rc == 0)
				ck_assert_int_eq(c[i].status, ECANCELED);
		}
	}
	free(cancel_rc);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_chan_destroy(ch), 0);
	t_gate_destroy(&a.ready);
	free(c);
	free(s);
}
END_TEST

/*
 * The loop runs the last completion and destroys the channel at once, as a
 * daemon shutting down would, while the runner that handed the operation
 * over may not have written to the descriptor yet. That runner must not
 * touch the channel after destroy has returned: the ASan build sees a use
 * after free, and a late write into the next channel, which has the same
 * descriptor number, makes it readable with nothing ready.
 */
START_TEST(test_destroy_after_last_completion)
{
	long n = t_scale(20000);
	opq_queue *q = queue_new(0, 2);
	long spurious = 0;
	for (long i = 0; i < n; i++) {
		opq_chan *ch;
		ck_assert_int_eq(opq_chan_create(&ch), 0);
		spurious += readable(ch);
		struct tally t;
		tally_init(&t);
		struct sub s = {.id = i, .t = &t};
		ck_assert_int_eq(opq_queue_submit(q, ch, sub_work, sub_after, &s, NULL), 0);
		/* Spin on run, not on the descriptor: the completion is taken
		 * as soon as it is pushed. */
		struct timespec dl = t_deadline(T_WAIT_NS);
		while (atomic_load(&t.ended) == 0) {
			ck_assert(!t_passed(&dl));
			ck_assert_int_eq(opq_chan_run(ch, 1, NULL), 0);
		}
		ck_assert_int_eq(opq_chan_destroy(ch), 0);
		ck_assert_int_eq(s.status, 0);
	}
	queue_end(q);
	ck_assert_int_eq(spurious, 0);
}
END_TEST

static Suite *chan_suite(void)
{
	Suite *s = suite_create("chan");
	TCase *tc = t_tcase(s, "refusals", 30);
	tcase_add_test(tc, test_bad_input);
	tcase_add_test(tc, test_set_completion_queued_and_destroy_busy);
	tcase_add_test(tc, test_owned_until_completion);
	tcase_add_test(tc, test_nested_run);
	tc = t_tcase(s, "destroy", 60);
	tcase_add_test(tc, test_destroy_after_last_completion);
	tc = t_tcase(s, "load", 120);
	tcase_add_test(tc, test_exactly_once_load);
	tcase_add_test(tc, test_thread_identity);
	tcase_add_test(tc, test_completion_enqueues);
	tc = t_tcase(s, "order", 60);
	tcase_add_test(tc, test_order_one_runner);
	tcase_add_test(tc, test_several_queues_one_channel);
	tcase_add_test(tc, test_max_keeps_readable);
	tcase_add_test(tc, test_one_write_per_burst);
	tc = t_tcase(s, "dropped", 60);
	tcase_add_test(tc, test_cancel);
	tcase_add_test(tc, test_stop_discard);
	tcase_add_test(tc, test_queue_destroy_drops);
	tcase_add_test(tc, test_cancelled_completion_reenqueues);
	tc = t_tcase(s, "submit", 30);
	tcase_add_test(tc, test_submit_bounded_deadline);
	tcase_add_test(tc, test_submit_enomem);
	return s;
}

int main(void)
{
	return t_run(chan_suite());
}
