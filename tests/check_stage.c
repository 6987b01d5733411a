/*
 * check_stage.c: the stage (leader/followers): API and error paths, the
 * latch window, promotion, close, deadlines, a real UDP test where 16
 * threads share one unconnected server socket that only the head reads, and
 * a stress where deadlines race notifications and nothing may be dropped.
 */
#define _GNU_SOURCE 1
#include "config.h"
#include "harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static opq_stage *make_stage(void)
{
	opq_stage *st;
	ck_assert_int_eq(opq_stage_create(&st), 0);
	return st;
}

static opq_stage_ticket *reg(opq_stage *st, const char *key)
{
	opq_stage_ticket *t;
	ck_assert_int_eq(opq_stage_register(st, key, strlen(key), &t), 0);
	return t;
}

static void unreg(opq_stage *st, opq_stage_ticket *t)
{
	void *ev = (void *)1;
	ck_assert_int_eq(opq_stage_unregister(st, t, &ev), 0);
	ck_assert_ptr_null(ev);
}

static opq_stage_stats stats_of(opq_stage *st)
{
	opq_stage_stats s;
	ck_assert_int_eq(opq_stage_stats_get(st, &s), 0);
	return s;
}

/* ---- API and error paths -------------------------------------------------- */

START_TEST(test_api_errors)
{
	opq_stage *st;
	opq_stage_ticket *t;
	void *ev;
	struct timespec dl = t_deadline(0);
	opq_stage_stats s;
	ck_assert_int_eq(opq_stage_create(NULL), EINVAL);
	ck_assert_int_eq(opq_stage_destroy(NULL), 0);
	st = make_stage();
	ck_assert_int_eq(opq_stage_register(NULL, "a", 1, &t), EINVAL);
	ck_assert_int_eq(opq_stage_register(st, NULL, 1, &t), EINVAL);
	ck_assert_int_eq(opq_stage_register(st, "a", 0, &t), EINVAL);
	ck_assert_int_eq(opq_stage_register(st, "a", 1, NULL), EINVAL);
	t = reg(st, "a");
	ck_assert_int_eq(opq_stage_enter(NULL, t, &dl, &ev), EINVAL);
	ck_assert_int_eq(opq_stage_enter(st, NULL, &dl, &ev), EINVAL);
	ck_assert_int_eq(opq_stage_enter(st, t, &dl, NULL), EINVAL);
	ck_assert_int_eq(opq_stage_leave(NULL, t), EINVAL);
	ck_assert_int_eq(opq_stage_leave(st, NULL), EINVAL);
	ck_assert_int_eq(opq_stage_leave(st, t), EPERM);
	ck_assert_int_eq(opq_stage_notify(NULL, "a", 1, NULL), EINVAL);
	ck_assert_int_eq(opq_stage_notify(st, NULL, 1, NULL), EINVAL);
	ck_assert_int_eq(opq_stage_notify(st, "a", 0, NULL), EINVAL);
	ck_assert_int_eq(opq_stage_notify(st, "b", 1, NULL), ENOENT);
	ck_assert_int_eq(opq_stage_notify(st, "ab", 2, NULL), ENOENT);
	ck_assert_int_eq(opq_stage_close(NULL, ECONNRESET), EINVAL);
	ck_assert_int_eq(opq_stage_close(st, 0), EINVAL);
	ck_assert_int_eq(opq_stage_close(st, -1), EINVAL);
	ck_assert_int_eq(opq_stage_close(st, OPQ_STAGE_HEAD), EINVAL);
	ck_assert_int_eq(opq_stage_stats_get(NULL, &s), EINVAL);
	ck_assert_int_eq(opq_stage_stats_get(st, NULL), EINVAL);
	ck_assert_int_eq(opq_stage_unregister(NULL, t, &ev), EINVAL);
	ck_assert_int_eq(opq_stage_unregister(st, NULL, &ev), EINVAL);
	ck_assert_int_eq(opq_stage_unregister(st, t, NULL), EINVAL);
	/* A ticket of another stage. */
	opq_stage *other = make_stage();
	ck_assert_int_eq(opq_stage_enter(other, t, &dl, &ev), EINVAL);
	ck_assert_int_eq(opq_stage_unregister(other, t, &ev), EINVAL);
	ck_assert_int_eq(opq_stage_destroy(other), 0);
	/* Results never collide with errno values. */
	ck_assert_int_ne(OPQ_STAGE_HEAD, OPQ_STAGE_NOTIFIED);
	ck_assert_int_gt(OPQ_STAGE_HEAD, 4095);
	ck_assert_int_gt(OPQ_STAGE_NOTIFIED, 4095);

	s = stats_of(st);
	ck_assert_uint_eq(s.tickets, 1);
	ck_assert_int_eq(opq_stage_destroy(st), EBUSY);
	unreg(st, t);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

START_TEST(test_duplicate_key)
{
	opq_stage *st = make_stage();
	opq_stage_ticket *a = reg(st, "peer"), *b;
	ck_assert_int_eq(opq_stage_register(st, "peer", 4, &b), EEXIST);
	/* Keys are bytes: a prefix is another key. */
	opq_stage_ticket *c = reg(st, "pee");
	ck_assert_uint_eq(stats_of(st).tickets, 2);
	unreg(st, a);
	b = reg(st, "peer"); /* free again once unregistered */
	unreg(st, b);
	unreg(st, c);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* Many keys: the table grows and every key still finds its own ticket. */
START_TEST(test_many_keys)
{
	enum { N = 2000 };
	opq_stage *st = make_stage();
	static opq_stage_ticket *t[N];
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(opq_stage_register(st, &i, sizeof(i), &t[i]), 0);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(opq_stage_notify(st, &i, sizeof(i), (void *)(intptr_t)(i + 1)), 0);
	int j = N;
	ck_assert_int_eq(opq_stage_notify(st, &j, sizeof(j), NULL), ENOENT);
	j = 7;
	ck_assert_int_eq(opq_stage_notify(st, &j, sizeof(j), NULL), EAGAIN);
	for (int i = 0; i < N; i++) {
		void *ev = NULL;
		if (i % 2) {
			ck_assert_int_eq(opq_stage_enter(st, t[i], NULL, &ev), OPQ_STAGE_NOTIFIED);
			ck_assert_ptr_eq(ev, (void *)(intptr_t)(i + 1));
			unreg(st, t[i]);
		} else {
			ck_assert_int_eq(opq_stage_unregister(st, t[i], &ev), OPQ_STAGE_NOTIFIED);
			ck_assert_ptr_eq(ev, (void *)(intptr_t)(i + 1));
		}
	}
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* Register, then a notify comes before the thread enters: latched. */
START_TEST(test_latch_window)
{
	opq_stage *st = make_stage();
	opq_stage_ticket *head = reg(st, "head"), *t = reg(st, "t");
	void *ev = NULL;
	int x;
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), OPQ_STAGE_HEAD);
	ck_assert_int_eq(opq_stage_notify(st, "t", 1, &x), 0);
	ck_assert_int_eq(opq_stage_notify(st, "t", 1, &x), EAGAIN); /* one at a time */
	struct timespec past = t_deadline(-1);
	ck_assert_int_eq(opq_stage_enter(st, t, &past, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(ev, &x);
	/* Taken: the next enter times out, nothing latched twice. */
	ck_assert_int_eq(opq_stage_enter(st, t, &past, &ev), ETIMEDOUT);
	/* A NULL event is an event too. */
	ck_assert_int_eq(opq_stage_notify(st, "t", 1, NULL), 0);
	ev = &x;
	ck_assert_int_eq(opq_stage_enter(st, t, &past, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_null(ev);
	/* The head notified for its own key: its next enter returns it, still head. */
	ck_assert_int_eq(opq_stage_notify(st, "head", 4, &x), 0);
	ck_assert_int_eq(opq_stage_enter(st, head, &past, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(ev, &x);
	ck_assert_int_eq(opq_stage_enter(st, head, &past, &ev), OPQ_STAGE_HEAD);
	ck_assert_int_eq(stats_of(st).head, 1);
	/* The head cannot unregister before leaving. */
	ck_assert_int_eq(opq_stage_unregister(st, head, &ev), EBUSY);
	ck_assert_int_eq(opq_stage_leave(st, t), EPERM);
	ck_assert_int_eq(opq_stage_leave(st, head), 0);
	ck_assert_int_eq(opq_stage_leave(st, head), EPERM);
	ck_assert_int_eq(stats_of(st).head, 0);
	/* A latched event is handed back by unregister, never dropped. */
	ck_assert_int_eq(opq_stage_notify(st, "t", 1, &x), 0);
	ck_assert_int_eq(opq_stage_unregister(st, t, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(ev, &x);
	ck_assert_int_eq(opq_stage_notify(st, "t", 1, &x), ENOENT);
	unreg(st, head);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* ---- threads waiting in enter --------------------------------------------- */

struct waiter {
	opq_stage *st;
	opq_stage_ticket *t;
	const struct timespec *deadline;
	void *event;
	atomic_int rc; /* 0 until enter returned */
	pthread_t thread;
};

static void *waiter_main(void *arg)
{
	struct waiter *w = arg;
	void *ev = NULL;
	int rc = opq_stage_enter(w->st, w->t, w->deadline, &ev);
	w->event = ev;
	atomic_store(&w->rc, rc);
	return NULL;
}

static void waiter_start(struct waiter *w, opq_stage *st, const char *key,
                         const struct timespec *deadline)
{
	memset(w, 0, sizeof(*w));
	w->st = st;
	w->t = reg(st, key);
	w->deadline = deadline;
	ck_assert_int_eq(pthread_create(&w->thread, NULL, waiter_main, w), 0);
}

static void waiter_join(struct waiter *w)
{
	T_WAIT_UNTIL(atomic_load(&w->rc) != 0);
	ck_assert_int_eq(pthread_join(w->thread, NULL), 0);
}

START_TEST(test_enter_empty_becomes_head)
{
	opq_stage *st = make_stage();
	opq_stage_ticket *t = reg(st, "x");
	void *ev;
	struct timespec past = t_deadline(-1);
	/* Heading needs no waiting: even a passed deadline gives the head. */
	ck_assert_int_eq(opq_stage_enter(st, t, &past, &ev), OPQ_STAGE_HEAD);
	ck_assert_int_eq(opq_stage_leave(st, t), 0);
	unreg(st, t);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

START_TEST(test_notify_wakes_waiter)
{
	opq_stage *st = make_stage();
	opq_stage_ticket *head = reg(st, "head");
	void *ev;
	int x;
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), OPQ_STAGE_HEAD);
	struct waiter a, b;
	waiter_start(&a, st, "a", NULL);
	waiter_start(&b, st, "b", NULL);
	T_WAIT_UNTIL(stats_of(st).waiting == 2);
	/* The thread in enter holds the ticket: nobody else may use it. */
	ck_assert_int_eq(opq_stage_enter(st, a.t, NULL, &ev), EBUSY);
	ck_assert_int_eq(opq_stage_unregister(st, a.t, &ev), EBUSY);
	ck_assert_int_eq(opq_stage_destroy(st), EBUSY);
	ck_assert_int_eq(opq_stage_notify(st, "b", 1, &x), 0);
	waiter_join(&b);
	ck_assert_int_eq(atomic_load(&b.rc), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(b.event, &x);
	ck_assert_int_eq(atomic_load(&a.rc), 0); /* only b was woken */
	ck_assert_uint_eq(stats_of(st).waiting, 1);
	ck_assert_int_eq(opq_stage_notify(st, "a", 1, NULL), 0);
	waiter_join(&a);
	ck_assert_int_eq(atomic_load(&a.rc), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_null(a.event);
	ck_assert_int_eq(opq_stage_leave(st, head), 0);
	unreg(st, a.t);
	unreg(st, b.t);
	unreg(st, head);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* The head leaves: exactly one waiter, the oldest, becomes head. */
START_TEST(test_promotion_oldest_first)
{
	enum { N = 5 };
	opq_stage *st = make_stage();
	opq_stage_ticket *head = reg(st, "head");
	void *ev;
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), OPQ_STAGE_HEAD);
	struct waiter w[N];
	char keys[N][2];
	for (int i = 0; i < N; i++) {
		keys[i][0] = (char)('a' + i);
		keys[i][1] = 0;
		waiter_start(&w[i], st, keys[i], NULL);
		T_WAIT_UNTIL(stats_of(st).waiting == (size_t)i + 1);
	}
	opq_stage_ticket *cur = head;
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(opq_stage_leave(st, cur), 0);
		waiter_join(&w[i]);
		ck_assert_int_eq(atomic_load(&w[i].rc), OPQ_STAGE_HEAD);
		/* Exactly one promoted: the others still wait. */
		ck_assert_uint_eq(stats_of(st).waiting, (size_t)(N - 1 - i));
		for (int j = i + 1; j < N; j++)
			ck_assert_int_eq(atomic_load(&w[j].rc), 0);
		ck_assert_int_eq(stats_of(st).head, 1);
		cur = w[i].t;
	}
	ck_assert_int_eq(opq_stage_leave(st, cur), 0);
	ck_assert_int_eq(stats_of(st).head, 0);
	for (int i = 0; i < N; i++)
		unreg(st, w[i].t);
	unreg(st, head);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* A notified waiter is no longer in line: leave promotes the next one. */
START_TEST(test_promotion_skips_notified)
{
	opq_stage *st = make_stage();
	opq_stage_ticket *head = reg(st, "head");
	void *ev;
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), OPQ_STAGE_HEAD);
	struct waiter a, b;
	waiter_start(&a, st, "a", NULL);
	T_WAIT_UNTIL(stats_of(st).waiting == 1);
	waiter_start(&b, st, "b", NULL);
	T_WAIT_UNTIL(stats_of(st).waiting == 2);
	ck_assert_int_eq(opq_stage_notify(st, "a", 1, NULL), 0);
	ck_assert_int_eq(opq_stage_leave(st, head), 0);
	waiter_join(&a);
	waiter_join(&b);
	ck_assert_int_eq(atomic_load(&a.rc), OPQ_STAGE_NOTIFIED);
	ck_assert_int_eq(atomic_load(&b.rc), OPQ_STAGE_HEAD);
	ck_assert_int_eq(opq_stage_leave(st, b.t), 0);
	unreg(st, a.t);
	unreg(st, b.t);
	unreg(st, head);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

START_TEST(test_close_wakes_all)
{
	enum { N = 6 };
	opq_stage *st = make_stage();
	opq_stage_ticket *head = reg(st, "head");
	void *ev;
	int x;
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), OPQ_STAGE_HEAD);
	struct waiter w[N];
	char keys[N][2];
	struct timespec far = t_deadline(3600LL * 1000000000LL);
	for (int i = 0; i < N; i++) {
		keys[i][0] = (char)('a' + i);
		keys[i][1] = 0;
		waiter_start(&w[i], st, keys[i], i % 2 ? &far : NULL);
	}
	T_WAIT_UNTIL(stats_of(st).waiting == N);
	ck_assert_int_eq(opq_stage_close(st, ECONNRESET), 0);
	ck_assert_int_eq(opq_stage_close(st, EPIPE), EALREADY);
	for (int i = 0; i < N; i++) {
		waiter_join(&w[i]);
		ck_assert_int_eq(atomic_load(&w[i].rc), ECONNRESET);
	}
	opq_stage_stats s = stats_of(st);
	ck_assert_uint_eq(s.waiting, 0);
	ck_assert_int_eq(s.closed, ECONNRESET);
	/* Later enters fail the same way, the head's too... */
	ck_assert_int_eq(opq_stage_enter(st, w[0].t, NULL, &ev), ECONNRESET);
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), ECONNRESET);
	/* ...but a latched event is still handed over, never dropped. */
	ck_assert_int_eq(opq_stage_notify(st, "a", 1, &x), 0);
	ck_assert_int_eq(opq_stage_enter(st, w[0].t, NULL, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(ev, &x);
	ck_assert_int_eq(opq_stage_leave(st, head), 0);
	ck_assert_int_eq(stats_of(st).head, 0);
	/* Nobody becomes head of a closed stage. */
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), ECONNRESET);
	ck_assert_int_eq(stats_of(st).head, 0);
	for (int i = 0; i < N; i++)
		unreg(st, w[i].t);
	unreg(st, head);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

START_TEST(test_deadline)
{
	opq_stage *st = make_stage();
	opq_stage_ticket *head = reg(st, "head");
	void *ev;
	int x;
	ck_assert_int_eq(opq_stage_enter(st, head, NULL, &ev), OPQ_STAGE_HEAD);
	opq_stage_ticket *t = reg(st, "t");
	struct timespec past = t_deadline(-1000000);
	ck_assert_int_eq(opq_stage_enter(st, t, &past, &ev), ETIMEDOUT);
	struct timespec soon = t_deadline(20 * 1000000);
	ck_assert_int_eq(opq_stage_enter(st, t, &soon, &ev), ETIMEDOUT);
	ck_assert(t_passed(&soon));
	ck_assert_uint_eq(stats_of(st).waiting, 0);
	/* A timed-out waiter stays registered: a late notify is latched. */
	ck_assert_int_eq(opq_stage_notify(st, "t", 1, &x), 0);
	ck_assert_int_eq(opq_stage_enter(st, t, &past, &ev), OPQ_STAGE_NOTIFIED);
	ck_assert_ptr_eq(ev, &x);
	/* A timed-out waiter is out of line: leave with nobody waiting. */
	ck_assert_int_eq(opq_stage_leave(st, head), 0);
	ck_assert_int_eq(stats_of(st).head, 0);
	ck_assert_int_eq(opq_stage_enter(st, t, &past, &ev), OPQ_STAGE_HEAD);
	ck_assert_int_eq(opq_stage_leave(st, t), 0);
	unreg(st, t);
	unreg(st, head);
	ck_assert_int_eq(opq_stage_destroy(st), 0);
}
END_TEST

/* ---- the real thing: one UDP socket, 16 threads --------------------------- */

enum { UDP_THREADS = 16 };

struct msg {
	uint32_t id;
	uint32_t round;
};

/* What the head could not hand over (EAGAIN/ENOENT), per thread. */
struct mailbox {
	pthread_mutex_t mu;
	struct msg *items[64];
	int n;
};

struct udp {
	opq_stage *st;
	int server;
	struct sockaddr_in server_addr;
	int peer[UDP_THREADS];
	uint16_t peer_port[UDP_THREADS];
	struct mailbox box[UDP_THREADS];
	long rounds;
	atomic_int heads;   /* threads that believe they head the stage */
	atomic_int in_recv; /* threads inside recvfrom on the server socket */
	atomic_long heads_taken;
	atomic_long notified, buffered, self;
	atomic_int failed;
	struct t_gate go;
};

struct udp_worker {
	struct udp *u;
	int id;
	pthread_t thread;
};

/*
 * The key of a peer: its address and port as bytes. The explicit pad
 * leaves the struct no padding bytes: those are not copied by a return by
 * value, so the key's bytes (hashed and compared by the stage) would be
 * partly uninitialised (valgrind's memcheck found it).
 */
struct peer_key {
	uint32_t addr;
	uint16_t port;
	uint16_t pad;
};

static struct peer_key key_of(const struct sockaddr_in *sa)
{
	struct peer_key k = {.addr = sa->sin_addr.s_addr, .port = sa->sin_port, .pad = 0};
	return k;
}

static int udp_socket(struct sockaddr_in *addr)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	ck_assert_int_ge(fd, 0);
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sa.sin_port = 0;
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	socklen_t len = sizeof(*addr);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)addr, &len), 0);
	ck_assert_int_ne(addr->sin_port, 0);
	return fd;
}

static void box_put(struct mailbox *b, struct msg *m)
{
	pthread_mutex_lock(&b->mu);
	ck_assert_int_lt(b->n, 64);
	b->items[b->n++] = m;
	pthread_mutex_unlock(&b->mu);
}

static struct msg *box_take(struct mailbox *b)
{
	struct msg *m = NULL;
	pthread_mutex_lock(&b->mu);
	if (b->n > 0) {
		m = b->items[0];
		memmove(&b->items[0], &b->items[1], (size_t)(b->n - 1) * sizeof(b->items[0]));
		b->n--;
	}
	pthread_mutex_unlock(&b->mu);
	return m;
}

/* As head: read one datagram (or none within the poll timeout) and route it. */
static void head_read_one(struct udp *u, int me)
{
	struct pollfd p = {.fd = u->server, .events = POLLIN};
	int n = poll(&p, 1, 20);
	ck_assert_int_ge(n, 0);
	if (n == 0)
		return;
	struct msg *m = malloc(sizeof(*m));
	ck_assert_ptr_nonnull(m);
	struct sockaddr_in from;
	socklen_t flen = sizeof(from);
	ck_assert_int_eq(atomic_load(&u->heads), 1);
	ck_assert_int_eq(atomic_fetch_add(&u->in_recv, 1), 0);
	ssize_t got =
	    recvfrom(u->server, m, sizeof(*m), MSG_DONTWAIT, (struct sockaddr *)&from, &flen);
	ck_assert_int_eq(atomic_fetch_sub(&u->in_recv, 1), 1);
	if (got < 0) {
		ck_assert(errno == EAGAIN || errno == EWOULDBLOCK);
		free(m);
		return;
	}
	ck_assert_int_eq(got, sizeof(*m));
	int to = -1;
	for (int i = 0; i < UDP_THREADS; i++)
		if (u->peer_port[i] == from.sin_port)
			to = i;
	ck_assert_int_ge(to, 0);
	if (to == me) {
		atomic_fetch_add(&u->self, 1);
		box_put(&u->box[me], m);
		return;
	}
	struct peer_key k = key_of(&from);
	int rc = opq_stage_notify(u->st, &k, sizeof(k), m);
	if (rc == 0) {
		atomic_fetch_add(&u->notified, 1);
	} else {
		ck_assert(rc == EAGAIN || rc == ENOENT);
		atomic_fetch_add(&u->buffered, 1);
		box_put(&u->box[to], m);
	}
}

static void *udp_main(void *arg)
{
	struct udp_worker *w = arg;
	struct udp *u = w->u;
	int me = w->id;
	struct sockaddr_in mine;
	socklen_t len = sizeof(mine);
	ck_assert_int_eq(getsockname(u->peer[me], (struct sockaddr *)&mine, &len), 0);
	struct peer_key k = key_of(&mine);
	opq_stage_ticket *t;
	ck_assert_int_eq(opq_stage_register(u->st, &k, sizeof(k), &t), 0);
	ck_assert(t_gate_wait(&u->go));
	for (long r = 0; r < u->rounds; r++) {
		struct msg out = {.id = (uint32_t)me, .round = (uint32_t)r};
		ck_assert_int_eq(sendto(u->peer[me], &out, sizeof(out), 0,
		                        (struct sockaddr *)&u->server_addr, sizeof(u->server_addr)),
		                 sizeof(out));
		struct timespec dl = t_deadline(T_WAIT_NS);
		struct msg *in = NULL;
		for (;;) {
			/* The ticket is registered: check our own buffer first. */
			in = box_take(&u->box[me]);
			if (in)
				break;
			ck_assert(!t_passed(&dl));
			void *ev = NULL;
			int rc = opq_stage_enter(u->st, t, &dl, &ev);
			if (rc == OPQ_STAGE_NOTIFIED) {
				in = ev;
				break;
			}
			ck_assert_int_eq(rc, OPQ_STAGE_HEAD);
			ck_assert_int_eq(atomic_fetch_add(&u->heads, 1), 0);
			atomic_fetch_add(&u->heads_taken, 1);
			while (!(in = box_take(&u->box[me]))) {
				ck_assert(!t_passed(&dl));
				head_read_one(u, me);
			}
			ck_assert_int_eq(atomic_fetch_sub(&u->heads, 1), 1);
			ck_assert_int_eq(opq_stage_leave(u->st, t), 0);
			break;
		}
		/* Exactly our own datagram, in order. */
		ck_assert_uint_eq(in->id, (uint32_t)me);
		ck_assert_uint_eq(in->round, (uint32_t)r);
		free(in);
	}
	void *ev = (void *)1;
	ck_assert_int_eq(opq_stage_unregister(u->st, t, &ev), 0);
	ck_assert_ptr_null(ev);
	ck_assert_ptr_null(box_take(&u->box[me]));
	return NULL;
}

START_TEST(test_udp_rounds)
{
	static struct udp u;
	memset(&u, 0, sizeof(u));
	u.rounds = t_scale(1000);
	u.st = make_stage();
	u.server = udp_socket(&u.server_addr);
	for (int i = 0; i < UDP_THREADS; i++) {
		struct sockaddr_in a;
		u.peer[i] = udp_socket(&a);
		u.peer_port[i] = a.sin_port;
		pthread_mutex_init(&u.box[i].mu, NULL);
	}
	t_gate_init(&u.go);
	struct udp_worker w[UDP_THREADS];
	for (int i = 0; i < UDP_THREADS; i++) {
		w[i].u = &u;
		w[i].id = i;
		ck_assert_int_eq(pthread_create(&w[i].thread, NULL, udp_main, &w[i]), 0);
	}
	T_WAIT_UNTIL(stats_of(u.st).tickets == UDP_THREADS);
	t_gate_open(&u.go);
	for (int i = 0; i < UDP_THREADS; i++)
		ck_assert_int_eq(pthread_join(w[i].thread, NULL), 0);
	long total = atomic_load(&u.notified) + atomic_load(&u.buffered) + atomic_load(&u.self);
	ck_assert_int_eq(total, (long)UDP_THREADS * u.rounds);
	ck_assert_int_gt(atomic_load(&u.heads_taken), 0);
	ck_assert_int_eq(atomic_load(&u.heads), 0);
	opq_stage_stats s = stats_of(u.st);
	ck_assert_uint_eq(s.tickets, 0);
	ck_assert_int_eq(s.head, 0);
	ck_assert_int_eq(opq_stage_destroy(u.st), 0);
	/* Nothing left unread. */
	struct pollfd p = {.fd = u.server, .events = POLLIN};
	ck_assert_int_eq(poll(&p, 1, 0), 0);
	close(u.server);
	for (int i = 0; i < UDP_THREADS; i++) {
		close(u.peer[i]);
		pthread_mutex_destroy(&u.box[i].mu);
	}
	t_gate_destroy(&u.go);
}
END_TEST

/* ---- stress: deadlines race notifications; nothing is dropped ------------- */

enum { RACE_THREADS = 8 };

struct race {
	opq_stage *st;
	atomic_int stop;
	atomic_long delivered, returned, rejected, timeouts, heads;
	atomic_uchar *seen; /* per event: how many times it came back */
	long events;
};

struct race_worker {
	struct race *r;
	int id;
	pthread_t thread;
};

static void race_seen(struct race *r, void *ev)
{
	long i = (long)(intptr_t)ev - 1;
	ck_assert(i >= 0 && i < r->events);
	ck_assert_int_eq(atomic_fetch_add(&r->seen[i], 1), 0);
}

static void *race_main(void *arg)
{
	struct race_worker *w = arg;
	struct race *r = w->r;
	opq_stage_ticket *t;
	ck_assert_int_eq(opq_stage_register(r->st, &w->id, sizeof(w->id), &t), 0);
	unsigned spin = (unsigned)w->id;
	while (!atomic_load(&r->stop)) {
		spin = spin * 1103515245u + 12345u;
		struct timespec dl = t_deadline((int64_t)((spin >> 8) % 200000)); /* < 200 us */
		void *ev = NULL;
		int rc = opq_stage_enter(r->st, t, &dl, &ev);
		if (rc == OPQ_STAGE_NOTIFIED) {
			race_seen(r, ev);
			atomic_fetch_add(&r->delivered, 1);
		} else if (rc == OPQ_STAGE_HEAD) {
			atomic_fetch_add(&r->heads, 1);
			ck_assert_int_eq(opq_stage_leave(r->st, t), 0);
		} else {
			ck_assert_int_eq(rc, ETIMEDOUT);
			atomic_fetch_add(&r->timeouts, 1);
		}
	}
	void *ev = NULL;
	int rc = opq_stage_unregister(r->st, t, &ev);
	if (rc == OPQ_STAGE_NOTIFIED) {
		race_seen(r, ev);
		atomic_fetch_add(&r->returned, 1);
	} else {
		ck_assert_int_eq(rc, 0);
	}
	return NULL;
}

START_TEST(test_stress_deadline_races_notify)
{
	static struct race r;
	memset(&r, 0, sizeof(r));
	r.events = t_scale(200000);
	r.seen = calloc((size_t)r.events, sizeof(*r.seen));
	ck_assert_ptr_nonnull(r.seen);
	r.st = make_stage();
	struct race_worker w[RACE_THREADS];
	for (int i = 0; i < RACE_THREADS; i++) {
		w[i].r = &r;
		w[i].id = i;
		ck_assert_int_eq(pthread_create(&w[i].thread, NULL, race_main, &w[i]), 0);
	}
	T_WAIT_UNTIL(stats_of(r.st).tickets == RACE_THREADS);
	/* The notifier: every event is either accepted (0) or kept (EAGAIN). */
	long accepted = 0;
	for (long i = 0; i < r.events; i++) {
		int id = (int)(i % RACE_THREADS);
		int rc = opq_stage_notify(r.st, &id, sizeof(id), (void *)(intptr_t)(i + 1));
		if (rc == 0) {
			accepted++;
		} else {
			ck_assert_int_eq(rc, EAGAIN);
			race_seen(&r, (void *)(intptr_t)(i + 1));
			atomic_fetch_add(&r.rejected, 1);
		}
	}
	atomic_store(&r.stop, 1);
	for (int i = 0; i < RACE_THREADS; i++)
		ck_assert_int_eq(pthread_join(w[i].thread, NULL), 0);
	long delivered = atomic_load(&r.delivered), returned = atomic_load(&r.returned);
	ck_assert_int_eq(accepted, delivered + returned);
	ck_assert_int_eq(r.events, accepted + atomic_load(&r.rejected));
	for (long i = 0; i < r.events; i++)
		ck_assert_int_eq(r.seen[i], 1);
	ck_assert_int_gt(delivered, 0);
	ck_assert_int_eq(opq_stage_destroy(r.st), 0);
	free(r.seen);
}
END_TEST

/* Waiters with deadlines, a head that leaves and re-enters, and close. */
START_TEST(test_stress_close_races_waiters)
{
	for (int round = 0; round < (int)t_scale(50); round++) {
		opq_stage *st = make_stage();
		struct waiter w[8];
		char keys[8][2];
		struct timespec dl = t_deadline(T_WAIT_NS);
		for (int i = 0; i < 8; i++) {
			keys[i][0] = (char)('a' + i);
			keys[i][1] = 0;
			waiter_start(&w[i], st, keys[i], &dl);
		}
		ck_assert_int_eq(opq_stage_close(st, ECONNRESET), 0);
		/* Each one headed (and must leave) or saw the close. */
		for (int i = 0; i < 8; i++) {
			waiter_join(&w[i]);
			int rc = atomic_load(&w[i].rc);
			if (rc == OPQ_STAGE_HEAD)
				ck_assert_int_eq(opq_stage_leave(st, w[i].t), 0);
			else
				ck_assert_int_eq(rc, ECONNRESET);
		}
		for (int i = 0; i < 8; i++)
			unreg(st, w[i].t);
		ck_assert_int_eq(opq_stage_destroy(st), 0);
	}
}
END_TEST

int main(void)
{
	Suite *s = suite_create("stage");
	TCase *tc = t_tcase(s, "api", 60);
	tcase_add_test(tc, test_api_errors);
	tcase_add_test(tc, test_duplicate_key);
	tcase_add_test(tc, test_many_keys);
	tcase_add_test(tc, test_latch_window);
	tcase_add_test(tc, test_enter_empty_becomes_head);
	tcase_add_test(tc, test_notify_wakes_waiter);
	tcase_add_test(tc, test_promotion_oldest_first);
	tcase_add_test(tc, test_promotion_skips_notified);
	tcase_add_test(tc, test_close_wakes_all);
	tcase_add_test(tc, test_deadline);
	tc = t_tcase(s, "stress", 300);
	tcase_add_test(tc, test_udp_rounds);
	tcase_add_test(tc, test_stress_deadline_races_notify);
	tcase_add_test(tc, test_stress_close_races_waiters);
	return t_run(s);
}
