/*
 * check_chan_loops.c: the completion channel driven from real event loops,
 * each on a thread of its own: a plain epoll loop, libevent (an event on
 * the descriptor, EV_READ|EV_PERSIST), libuv (a uv_poll_t) and GLib (a
 * g_unix_fd source on a GMainContext of the loop thread's own). The same
 * scenario runs under each: operations performed while the loop runs, then
 * with the runners held, more queued, some of them cancelled, and a
 * discarding stop dropping the rest. Every operation must complete exactly
 * once, on the loop's thread, with 0 if it was performed and ECANCELED if
 * not; the channel's destroy must then succeed. Every wait is bounded: a
 * loop that never gets its completions fails the test. libevent, libuv and
 * GLib are tested when configure found them (config.h).
 */
#include "config.h"
#include "harness.h"

#include <poll.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#ifdef HAVE_LIBEVENT
#include <event2/event.h>
#endif
#ifdef HAVE_LIBUV
#include <uv.h>
#endif
#ifdef HAVE_GLIB
#include <glib-unix.h>
#include <glib.h>
#endif

/* Completions per opq_chan_run call: small, so that a loop turns often. */
#define RUN_MAX 16U
/* The loops' own deadline, in milliseconds. */
#define LOOP_WAIT_MS (T_WAIT_NS / 1000000)

struct scen;

/* One operation; even ones are intrusive (op), odd ones submitted (arg). */
struct slot {
	opq_op op;
	struct scen *s;
	struct t_gate *hold; /* perform waits on it, when set */
	atomic_int performed, completed;
	int status;
};

struct scen {
	opq_chan *ch;
	int fd;
	long n;
	struct slot *slots;
	pthread_t loop;          /* the loop's thread, set by itself */
	struct t_gate ready;     /* the loop watches the descriptor */
	atomic_long ended;       /* completions run */
	atomic_long bad;         /* on another thread, twice, or a wrong status */
	atomic_long runs;        /* opq_chan_run calls */
	atomic_int started;      /* held performs begun */
	atomic_int timed_out;    /* the loop's deadline passed */
	atomic_int loop_rc;      /* an error of the loop's library, or 0 */
	const char *loop_failed; /* which call */
};

static void slot_work(void *arg)
{
	struct slot *sl = arg;
	if (sl->hold) {
		atomic_fetch_add(&sl->s->started, 1);
		ck_assert(t_gate_wait(sl->hold));
	}
	atomic_fetch_add(&sl->performed, 1);
}

static void slot_perform(opq_op *op)
{
	slot_work(OPQ_CONTAINER_OF(op, struct slot, op));
}

static void slot_after(void *arg, int status)
{
	struct slot *sl = arg;
	struct scen *s = sl->s;
	if (!pthread_equal(pthread_self(), s->loop))
		atomic_fetch_add(&s->bad, 1);
	if (atomic_fetch_add(&sl->completed, 1) != 0)
		atomic_fetch_add(&s->bad, 1);
	if (status != 0 && status != ECANCELED)
		atomic_fetch_add(&s->bad, 1);
	sl->status = status;
	atomic_fetch_add(&s->ended, 1);
}

static void slot_complete(opq_op *op, int status)
{
	slot_after(OPQ_CONTAINER_OF(op, struct slot, op), status);
}

static int slot_enqueue(opq_queue *q, struct scen *s, long i)
{
	struct slot *sl = &s->slots[i];
	if (i % 2 == 0)
		return opq_queue_enqueue(q, &sl->op);
	return opq_queue_submit(q, s->ch, slot_work, slot_after, sl, NULL);
}

/*
 * What every loop does when the descriptor is readable: run up to RUN_MAX
 * completions. True once all n have completed (the loop then stops).
 */
static bool on_readable(struct scen *s)
{
	unsigned ran = RUN_MAX + 1;
	int rc = opq_chan_run(s->ch, RUN_MAX, &ran);
	atomic_fetch_add(&s->runs, 1);
	if (rc != 0 || ran > RUN_MAX)
		atomic_fetch_add(&s->bad, 1);
	return atomic_load(&s->ended) >= s->n;
}

/* The loop thread's start: it owns s->loop from here. */
static void loop_begin(struct scen *s)
{
	s->loop = pthread_self();
}

static void loop_fail(struct scen *s, const char *what, int rc)
{
	s->loop_failed = what;
	atomic_store(&s->loop_rc, rc ? rc : -1);
	t_gate_open(&s->ready); /* the test must not wait for it */
}

/* ---- the loops -------------------------------------------------------------- */

static void *epoll_loop(void *arg)
{
	struct scen *s = arg;
	loop_begin(s);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0) {
		loop_fail(s, "epoll_create1", errno);
		return NULL;
	}
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s}; /* level-triggered */
	if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) != 0) {
		loop_fail(s, "epoll_ctl", errno);
		close(ep);
		return NULL;
	}
	t_gate_open(&s->ready);
	struct timespec dl = t_deadline(T_WAIT_NS);
	bool done = false;
	while (!done) {
		if (t_passed(&dl)) {
			atomic_store(&s->timed_out, 1);
			break;
		}
		struct epoll_event got[4];
		int n = epoll_wait(ep, got, 4, 100);
		if (n < 0 && errno != EINTR) {
			loop_fail(s, "epoll_wait", errno);
			break;
		}
		for (int i = 0; i < n && !done; i++)
			if (got[i].data.ptr == s && (got[i].events & EPOLLIN))
				done = on_readable(got[i].data.ptr);
	}
	close(ep);
	return NULL;
}

#ifdef HAVE_LIBEVENT
struct ev_loop {
	struct scen *s;
	struct event_base *base;
};

static void ev_readable(evutil_socket_t fd, short what, void *arg)
{
	struct ev_loop *l = arg;
	(void)fd;
	if ((what & EV_READ) && on_readable(l->s))
		event_base_loopbreak(l->base);
}

static void ev_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct ev_loop *l = arg;
	(void)fd;
	(void)what;
	atomic_store(&l->s->timed_out, 1);
	event_base_loopbreak(l->base);
}

static void *libevent_loop(void *arg)
{
	struct scen *s = arg;
	loop_begin(s);
	struct ev_loop l = {.s = s, .base = event_base_new()};
	if (!l.base) {
		loop_fail(s, "event_base_new", 0);
		return NULL;
	}
	struct event *rd = event_new(l.base, s->fd, EV_READ | EV_PERSIST, ev_readable, &l);
	struct event *dl = evtimer_new(l.base, ev_deadline, &l);
	struct timeval tv = {.tv_sec = LOOP_WAIT_MS / 1000};
	if (!rd || !dl || event_add(rd, NULL) != 0 || evtimer_add(dl, &tv) != 0) {
		loop_fail(s, "event_new/event_add", 0);
	} else {
		t_gate_open(&s->ready);
		if (event_base_dispatch(l.base) < 0)
			loop_fail(s, "event_base_dispatch", 0);
	}
	if (rd)
		event_free(rd);
	if (dl)
		event_free(dl);
	event_base_free(l.base);
	return NULL;
}
#endif

#ifdef HAVE_LIBUV
static void uv_readable(uv_poll_t *p, int status, int events)
{
	struct scen *s = p->data;
	if (status < 0) {
		loop_fail(s, "uv_poll callback", -status);
		uv_stop(p->loop);
	} else if ((events & UV_READABLE) && on_readable(s)) {
		uv_stop(p->loop);
	}
}

static void uv_deadline(uv_timer_t *t)
{
	struct scen *s = t->data;
	atomic_store(&s->timed_out, 1);
	uv_stop(t->loop);
}

static void *libuv_loop(void *arg)
{
	struct scen *s = arg;
	loop_begin(s);
	uv_loop_t loop;
	uv_poll_t poll;
	uv_timer_t timer;
	int rc = uv_loop_init(&loop);
	if (rc) {
		loop_fail(s, "uv_loop_init", -rc);
		return NULL;
	}
	poll.data = timer.data = s;
	if ((rc = uv_poll_init(&loop, &poll, s->fd)) != 0) {
		loop_fail(s, "uv_poll_init", -rc);
		uv_loop_close(&loop);
		return NULL;
	}
	uv_timer_init(&loop, &timer);
	if ((rc = uv_poll_start(&poll, UV_READABLE, uv_readable)) != 0 ||
	    (rc = uv_timer_start(&timer, uv_deadline, LOOP_WAIT_MS, 0)) != 0) {
		loop_fail(s, "uv_poll_start/uv_timer_start", -rc);
	} else {
		t_gate_open(&s->ready);
		uv_run(&loop, UV_RUN_DEFAULT);
	}
	uv_close((uv_handle_t *)&poll, NULL);
	uv_close((uv_handle_t *)&timer, NULL);
	uv_run(&loop, UV_RUN_DEFAULT); /* the closes */
	if ((rc = uv_loop_close(&loop)) != 0)
		loop_fail(s, "uv_loop_close", -rc);
	return NULL;
}
#endif

#ifdef HAVE_GLIB
struct g_loop {
	struct scen *s;
	GMainLoop *ml;
};

static gboolean g_readable(gint fd, GIOCondition cond, gpointer arg)
{
	struct g_loop *l = arg;
	(void)fd;
	if ((cond & G_IO_IN) && on_readable(l->s))
		g_main_loop_quit(l->ml);
	return G_SOURCE_CONTINUE;
}

static gboolean g_deadline(gpointer arg)
{
	struct g_loop *l = arg;
	atomic_store(&l->s->timed_out, 1);
	g_main_loop_quit(l->ml);
	return G_SOURCE_REMOVE;
}

/* g_unix_fd_add attaches to the global default context: the loop thread
 * attaches the same source, g_unix_fd_source_new, to its own instead. */
static void *glib_loop(void *arg)
{
	struct scen *s = arg;
	loop_begin(s);
	GMainContext *ctx = g_main_context_new();
	g_main_context_push_thread_default(ctx);
	struct g_loop l = {.s = s, .ml = g_main_loop_new(ctx, FALSE)};
	GSource *rd = g_unix_fd_source_new(s->fd, G_IO_IN);
	g_source_set_callback(rd, G_SOURCE_FUNC(g_readable), &l, NULL);
	g_source_attach(rd, ctx);
	GSource *dl = g_timeout_source_new(LOOP_WAIT_MS);
	g_source_set_callback(dl, g_deadline, &l, NULL);
	g_source_attach(dl, ctx);
	t_gate_open(&s->ready);
	g_main_loop_run(l.ml);
	g_source_destroy(rd);
	g_source_unref(rd);
	g_source_destroy(dl);
	g_source_unref(dl);
	g_main_loop_unref(l.ml);
	g_main_context_pop_thread_default(ctx);
	g_main_context_unref(ctx);
	return NULL;
}
#endif

/* ---- the scenario ----------------------------------------------------------- */

struct stopper {
	opq_queue *q;
	int rc;
};

static void *stop_discard(void *arg)
{
	struct stopper *st = arg;
	st->rc = opq_queue_stop(st->q, OPQ_STOP_DISCARD);
	return NULL;
}

/*
 * n operations, 2 runners, the loop on its own thread: the first half
 * performed while the loop runs; then two that hold both runners; the
 * rest queued behind them, every third intrusive one cancelled, and a
 * discarding stop drops what is left while the two still hold. Returns
 * after the checks.
 */
static void scenario(void *(*loop_main)(void *), long n)
{
	struct scen s;
	memset(&s, 0, sizeof(s));
	s.n = n;
	t_gate_init(&s.ready);
	ck_assert_int_eq(opq_chan_create(&s.ch), 0);
	ck_assert_int_eq(opq_chan_fd(s.ch, &s.fd), 0);
	s.slots = calloc((size_t)n, sizeof(*s.slots));
	ck_assert_ptr_nonnull(s.slots);
	struct t_gate hold;
	t_gate_init(&hold);
	long half = n / 2;
	for (long i = 0; i < n; i++) {
		struct slot *sl = &s.slots[i];
		sl->s = &s;
		sl->status = -1;
		if (i == half || i == half + 1)
			sl->hold = &hold;
		if (i % 2 == 0) {
			ck_assert_int_eq(opq_op_init(&sl->op, slot_perform, NULL), 0);
			ck_assert_int_eq(opq_op_set_completion(&sl->op, s.ch, slot_complete), 0);
		}
	}

	pthread_t loop;
	ck_assert_int_eq(pthread_create(&loop, NULL, loop_main, &s), 0);
	ck_assert(t_gate_wait(&s.ready));
	ck_assert_msg(s.loop_rc == 0, "%s: %d", s.loop_failed, s.loop_rc);
	ck_assert(!pthread_equal(s.loop, pthread_self()));

	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	for (long i = 0; i < half + 2; i++)
		ck_assert_int_eq(slot_enqueue(q, &s, i), 0);
	T_WAIT_UNTIL(atomic_load(&s.started) == 2); /* both runners held */
	long cancelled = 0;
	for (long i = half + 2; i < n; i++) {
		ck_assert_int_eq(slot_enqueue(q, &s, i), 0);
		if (i % 2 == 0 && i % 3 == 0) {
			ck_assert_int_eq(opq_queue_cancel(q, &s.slots[i].op), 0);
			cancelled++;
		}
	}
	ck_assert_int_gt(cancelled, 0);
	struct stopper st = {.q = q, .rc = -1};
	pthread_t stopper;
	ck_assert_int_eq(pthread_create(&stopper, NULL, stop_discard, &st), 0);
	/* Everything but the two held ends, on the loop, while the stop waits. */
	T_WAIT_UNTIL(atomic_load(&s.ended) == n - 2 || atomic_load(&s.timed_out) ||
	             atomic_load(&s.loop_rc));
	ck_assert_int_eq(s.slots[half].completed, 0);
	t_gate_open(&hold);
	ck_assert_int_eq(pthread_join(stopper, NULL), 0);
	ck_assert_int_eq(st.rc, 0);
	ck_assert_int_eq(pthread_join(loop, NULL), 0);

	ck_assert_msg(s.loop_rc == 0, "%s: %d", s.loop_failed, s.loop_rc);
	ck_assert_int_eq(s.timed_out, 0);
	ck_assert_int_eq(s.bad, 0);
	ck_assert_int_eq(s.ended, n);
	ck_assert_int_gt(s.runs, 0);
	for (long i = 0; i < n; i++) {
		struct slot *sl = &s.slots[i];
		ck_assert_msg(sl->completed == 1, "operation %ld: %d completions", i,
		              sl->completed);
		if (i < half + 2) {
			ck_assert_int_eq(sl->status, 0);
			ck_assert_int_eq(sl->performed, 1);
		} else {
			ck_assert_int_eq(sl->status, ECANCELED);
			ck_assert_int_eq(sl->performed, 0);
		}
	}
	/* Nothing left: the descriptor is quiet once emptied, and destroy succeeds. */
	unsigned ran = 1;
	ck_assert_int_eq(opq_chan_run(s.ch, RUN_MAX, &ran), 0);
	ck_assert_uint_eq(ran, 0);
	struct pollfd p = {.fd = s.fd, .events = POLLIN};
	ck_assert_int_eq(poll(&p, 1, 0), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_chan_destroy(s.ch), 0);
	t_gate_destroy(&hold);
	t_gate_destroy(&s.ready);
	free(s.slots);
}

static void scenarios(void *(*loop_main)(void *))
{
	for (int round = 0; round < 5; round++)
		scenario(loop_main, t_scale(round % 2 ? 3001 : 8000));
}

START_TEST(test_epoll)
{
	scenarios(epoll_loop);
}
END_TEST

#ifdef HAVE_LIBEVENT
START_TEST(test_libevent)
{
	scenarios(libevent_loop);
}
END_TEST
#endif

#ifdef HAVE_LIBUV
START_TEST(test_libuv)
{
	scenarios(libuv_loop);
}
END_TEST
#endif

#ifdef HAVE_GLIB
START_TEST(test_glib)
{
	scenarios(glib_loop);
}
END_TEST
#endif

static Suite *loops_suite(void)
{
	Suite *s = suite_create("chan_loops");
	TCase *tc = t_tcase(s, "loops", 120);
	tcase_add_test(tc, test_epoll);
#ifdef HAVE_LIBEVENT
	tcase_add_test(tc, test_libevent);
#endif
#ifdef HAVE_LIBUV
	tcase_add_test(tc, test_libuv);
#endif
#ifdef HAVE_GLIB
	tcase_add_test(tc, test_glib);
#endif
	return s;
}

int main(void)
{
	return t_run(loops_suite());
}
