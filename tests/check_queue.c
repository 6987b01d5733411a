/*
 * check_queue.c: the operation queue, its success and error paths, and
 * stress with real threads checking that every operation is performed,
 * discarded or returned exactly once.
 */
#define _GNU_SOURCE 1 /* pthread_getname_np, dladdr */
#include "config.h"
#include "harness.h"

#include <dirent.h>
#include <dlfcn.h>
#include <limits.h>
#include <signal.h>
#include <string.h>

/* ---- a counting operation ------------------------------------------------- */

struct cop {
	opq_op op;
	atomic_int performed;
	atomic_int discarded;
	long seq;
	long *log; /* where perform appends seq, when set */
	atomic_long *log_len;
	struct t_gate *hold; /* perform waits on it, when set */
	atomic_int *started; /* set to 1 when perform begins */
};

static void cop_perform(opq_op *op)
{
	struct cop *c = OPQ_CONTAINER_OF(op, struct cop, op);
	if (c->started)
		atomic_store(c->started, 1);
	if (c->hold)
		ck_assert(t_gate_wait(c->hold));
	if (c->log)
		c->log[atomic_fetch_add(c->log_len, 1)] = c->seq;
	atomic_fetch_add(&c->performed, 1);
}

static void cop_discard(opq_op *op)
{
	struct cop *c = OPQ_CONTAINER_OF(op, struct cop, op);
	atomic_fetch_add(&c->discarded, 1);
}

static void cop_init(struct cop *c)
{
	memset(c, 0, sizeof(*c));
	ck_assert_int_eq(opq_op_init(&c->op, cop_perform, cop_discard), 0);
}

static opq_queue *make_queue(size_t capacity)
{
	opq_queue_attr *a;
	opq_queue *q;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_capacity(a, capacity), 0);
	ck_assert_int_eq(opq_queue_create(&q, a), 0);
	opq_queue_attr_destroy(a);
	return q;
}

static opq_queue_stats stats_of(opq_queue *q)
{
	opq_queue_stats st;
	ck_assert_int_eq(opq_queue_stats_get(q, &st), 0);
	return st;
}

static atomic_long fn_count;
static void fn_inc(void *arg)
{
	atomic_fetch_add((atomic_long *)arg, 1);
}

/* ---- attributes, create, destroy ----------------------------------------- */

START_TEST(test_attr)
{
	opq_queue_attr *a;
	size_t cap = 99;
	ck_assert_int_eq(opq_queue_attr_create(NULL), EINVAL);
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_get_capacity(a, &cap), 0);
	ck_assert_uint_eq(cap, 0);
	ck_assert_int_eq(opq_queue_attr_set_capacity(a, 7), 0);
	ck_assert_int_eq(opq_queue_attr_get_capacity(a, &cap), 0);
	ck_assert_uint_eq(cap, 7);
	ck_assert_int_eq(opq_queue_attr_set_capacity(NULL, 7), EINVAL);
	ck_assert_int_eq(opq_queue_attr_get_capacity(NULL, &cap), EINVAL);
	ck_assert_int_eq(opq_queue_attr_get_capacity(a, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_name(a, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_name(a, ""), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_name(a, "elevenchars"), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_name(NULL, "x"), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_name(a, "tenchars10"), 0);
	ck_assert_int_eq(opq_queue_attr_set_hooks(NULL, NULL, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_hooks(a, NULL, NULL, NULL), 0);
	opq_queue_attr_destroy(a);
	opq_queue_attr_destroy(NULL);
}
END_TEST

START_TEST(test_create_destroy)
{
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.runners, 0);
	ck_assert_uint_eq(st.queued, 0);
	ck_assert_int_eq(opq_queue_stats_get(NULL, &st), EINVAL);
	ck_assert_int_eq(opq_queue_stats_get(q, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_queue_destroy(NULL), 0);
}
END_TEST

START_TEST(test_op_init_and_misc)
{
	opq_op op;
	struct timespec ts;
	ck_assert_int_eq(opq_op_init(NULL, cop_perform, NULL), EINVAL);
	ck_assert_int_eq(opq_op_init(&op, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_op_init(&op, cop_perform, NULL), 0);
	ck_assert_ptr_null(op.discard);
	ck_assert_int_eq(opq_deadline_after(NULL, 0), EINVAL);
	ck_assert_int_eq(opq_deadline_after(&ts, -1500000000), 0);
	ck_assert(t_passed(&ts));
	ck_assert_int_eq(opq_deadline_after(&ts, 3600LL * 1000000000LL), 0);
	ck_assert(!t_passed(&ts));
	ck_assert(ts.tv_nsec >= 0 && ts.tv_nsec < 1000000000);
	ck_assert_str_eq(opq_version(), PACKAGE_VERSION);
	ck_assert_ptr_null(opq_queue_current());
}
END_TEST

/* The library must not replace the host's malloc, with or without jemalloc. */
START_TEST(test_host_malloc_kept)
{
	Dl_info info;
	void *fp = dlsym(RTLD_DEFAULT, "malloc");
	ck_assert_ptr_nonnull(fp);
	ck_assert(dladdr(fp, &info) != 0);
	ck_assert_ptr_nonnull(info.dli_fname);
	ck_assert_msg(strstr(info.dli_fname, "jemalloc") == NULL, "malloc comes from %s",
	              info.dli_fname);
}
END_TEST

/* ---- start, FIFO, enqueue errors ----------------------------------------- */

START_TEST(test_start_errors)
{
	opq_queue *q = make_queue(0);
	ck_assert_int_eq(opq_queue_start(NULL, 1), EINVAL);
	ck_assert_int_eq(opq_queue_start(q, 0), EINVAL);
	ck_assert_int_eq(opq_queue_start(q, 3), 0);
	ck_assert_uint_eq(stats_of(q).runners, 3);
	ck_assert_int_eq(opq_queue_start(q, 1), EALREADY);
	ck_assert_uint_eq(stats_of(q).runners, 3);
	ck_assert_int_eq(opq_queue_destroy(q), EBUSY);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_uint_eq(stats_of(q).runners, 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

START_TEST(test_fifo_one_runner)
{
	enum { N = 2000 };
	opq_queue *q = make_queue(0);
	struct cop *ops = calloc(N, sizeof(*ops));
	long *log = calloc(N, sizeof(*log));
	atomic_long len = 0;
	/* Half before start (they wait for the runner), half after. */
	for (long i = 0; i < N; i++) {
		cop_init(&ops[i]);
		ops[i].seq = i;
		ops[i].log = log;
		ops[i].log_len = &len;
		if (i == N / 2)
			ck_assert_int_eq(opq_queue_start(q, 1), 0);
		ck_assert_int_eq(opq_queue_enqueue(q, &ops[i].op), 0);
	}
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(atomic_load(&len), N);
	for (long i = 0; i < N; i++) {
		ck_assert_int_eq(log[i], i);
		ck_assert_int_eq(ops[i].performed, 1);
		ck_assert_int_eq(ops[i].discarded, 0);
	}
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.completed, N);
	ck_assert_uint_eq(st.queued, 0);
	ck_assert_uint_ge(st.high_water, N / 2);
	ck_assert_uint_le(st.high_water, N);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	free(ops);
	free(log);
}
END_TEST

START_TEST(test_enqueue_errors)
{
	opq_queue *q = make_queue(0);
	struct cop c;
	opq_op bare;
	memset(&bare, 0, sizeof(bare));
	cop_init(&c);
	ck_assert_int_eq(opq_queue_enqueue(NULL, &c.op), EINVAL);
	ck_assert_int_eq(opq_queue_enqueue(q, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_enqueue(q, &bare), EINVAL);
	ck_assert_int_eq(opq_queue_tryenqueue(NULL, &c.op), EINVAL);
	ck_assert_int_eq(opq_queue_timedenqueue(q, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_enqueue_fn(NULL, fn_inc, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_enqueue_fn(q, NULL, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_tryenqueue_fn(q, NULL, NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_timedenqueue_fn(q, NULL, NULL, NULL, NULL), EINVAL);
	struct timespec bad = {.tv_sec = 1, .tv_nsec = 1000000000};
	ck_assert_int_eq(opq_queue_timedenqueue(q, &c.op, &bad), EINVAL);
	ck_assert_int_eq(opq_queue_timedenqueue_fn(q, fn_inc, NULL, NULL, &bad), EINVAL);
	ck_assert_int_eq(opq_queue_wait_idle(q, &bad), EINVAL);
	bad.tv_nsec = -1;
	ck_assert_int_eq(opq_queue_wait_idle(q, &bad), EINVAL);
	ck_assert_uint_eq(stats_of(q).queued, 0);
	/* The same op twice while queued: EBUSY, and it is still queued once. */
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), EBUSY);
	ck_assert_uint_eq(stats_of(q).queued, 1);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(c.performed, 1);
	ck_assert_int_eq(c.discarded, 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

static void fn_discard(void *arg)
{
	atomic_fetch_add((atomic_long *)arg, 1000);
}

START_TEST(test_fn_path)
{
	atomic_long n = 0;
	opq_queue *q = make_queue(0);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	for (int i = 0; i < 100; i++)
		ck_assert_int_eq(opq_queue_enqueue_fn(q, fn_inc, fn_discard, &n), 0);
	ck_assert_int_eq(opq_queue_tryenqueue_fn(q, fn_inc, NULL, &n), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_timedenqueue_fn(q, fn_inc, NULL, &n, &dl), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(atomic_load(&n), 102);
	/* Discarded boxes call discard_fn(arg), or nothing when it is NULL. */
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	opq_queue *q2 = make_queue(0);
	atomic_long m = 0;
	ck_assert_int_eq(opq_queue_enqueue_fn(q2, fn_inc, fn_discard, &m), 0);
	ck_assert_int_eq(opq_queue_enqueue_fn(q2, fn_inc, NULL, &m), 0);
	ck_assert_int_eq(opq_queue_stop(q2, OPQ_STOP_DISCARD), 0);
	ck_assert_int_eq(atomic_load(&m), 1000);
	ck_assert_uint_eq(stats_of(q2).discarded, 2);
	ck_assert_int_eq(opq_queue_destroy(q2), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/* ---- bounded queues -------------------------------------------------------- */

START_TEST(test_bounded_try_and_timed)
{
	opq_queue *q = make_queue(2);
	struct cop c[4];
	for (int i = 0; i < 4; i++)
		cop_init(&c[i]);
	ck_assert_int_eq(opq_queue_tryenqueue(q, &c[0].op), 0);
	ck_assert_int_eq(opq_queue_tryenqueue(q, &c[1].op), 0);
	ck_assert_int_eq(opq_queue_tryenqueue(q, &c[2].op), EAGAIN);
	ck_assert_int_eq(opq_queue_tryenqueue_fn(q, fn_inc, NULL, &fn_count), EAGAIN);
	struct timespec past = t_deadline(-1);
	ck_assert_int_eq(opq_queue_timedenqueue(q, &c[2].op, &past), ETIMEDOUT);
	struct timespec soon = t_deadline(20 * 1000000);
	ck_assert_int_eq(opq_queue_timedenqueue(q, &c[2].op, &soon), ETIMEDOUT);
	ck_assert(t_passed(&soon));
	ck_assert_int_eq(opq_queue_timedenqueue_fn(q, fn_inc, NULL, &fn_count, &past), ETIMEDOUT);
	/* The failed ops were neither performed nor discarded: the caller has them. */
	ck_assert_int_eq(c[2].performed + c[2].discarded, 0);
	ck_assert_uint_eq(stats_of(q).queued, 2);
	ck_assert_uint_eq(stats_of(q).high_water, 2);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c[2].op), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c[3].op), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(c[i].performed, 1);
	ck_assert_int_eq(atomic_load(&fn_count), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

struct producer {
	opq_queue *q;
	long n;
	atomic_long *counter;
	int rc;
};

static void *produce_fn(void *arg)
{
	struct producer *p = arg;
	for (long i = 0; i < p->n; i++) {
		p->rc = opq_queue_enqueue_fn(p->q, fn_inc, NULL, p->counter);
		if (p->rc)
			break;
	}
	return NULL;
}

START_TEST(test_bounded_backpressure)
{
	enum { P = 4, CAP = 8 };
	long n = t_scale(20000);
	atomic_long done = 0;
	opq_queue *q = make_queue(CAP);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	pthread_t th[P];
	struct producer pr[P];
	for (int i = 0; i < P; i++) {
		pr[i] = (struct producer){.q = q, .n = n, .counter = &done};
		pthread_create(&th[i], NULL, produce_fn, &pr[i]);
	}
	for (int i = 0; i < P; i++) {
		pthread_join(th[i], NULL);
		ck_assert_int_eq(pr[i].rc, 0);
	}
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(atomic_load(&done), P * n);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_le(st.high_water, CAP);
	ck_assert_uint_eq(st.completed, (uint64_t)(P * n));
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

struct blocked_enqueuer {
	opq_queue *q;
	struct cop c;
	int rc;
};

static void *enqueue_blocking(void *arg)
{
	struct blocked_enqueuer *b = arg;
	b->rc = opq_queue_enqueue(b->q, &b->c.op);
	return NULL;
}

/* A thread blocked on a full queue returns ESHUTDOWN when stop begins. */
START_TEST(test_blocked_enqueue_stop)
{
	for (int mode = OPQ_STOP_DRAIN; mode <= OPQ_STOP_DISCARD; mode++) {
		opq_queue *q = make_queue(1);
		struct cop first;
		cop_init(&first);
		ck_assert_int_eq(opq_queue_enqueue(q, &first.op), 0);
		struct blocked_enqueuer b = {.q = q};
		cop_init(&b.c);
		pthread_t th;
		pthread_create(&th, NULL, enqueue_blocking, &b);
		T_WAIT_UNTIL(stats_of(q).blocked == 1);
		ck_assert_int_eq(opq_queue_destroy(q), EBUSY); /* a caller waits in q */
		ck_assert_int_eq(opq_queue_stop(q, mode), 0);
		pthread_join(th, NULL);
		ck_assert_int_eq(b.rc, ESHUTDOWN);
		ck_assert_int_eq(b.c.performed + b.c.discarded, 0);
		ck_assert_int_eq(first.performed, mode == OPQ_STOP_DRAIN);
		ck_assert_int_eq(first.discarded, mode == OPQ_STOP_DISCARD);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
}
END_TEST

/*
 * Each place made in a full queue goes to one blocked producer at once, and
 * no more producers are woken than there are places.
 */
START_TEST(test_bounded_room_each_place)
{
	enum { CAP = 8, B = 3 };
	opq_queue *q = make_queue(CAP);
	struct cop c[CAP];
	for (int i = 0; i < CAP; i++) {
		cop_init(&c[i]);
		ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
	}
	struct blocked_enqueuer b[B];
	pthread_t th[B];
	for (int i = 0; i < B; i++) {
		b[i] = (struct blocked_enqueuer){.q = q};
		cop_init(&b[i].c);
		pthread_create(&th[i], NULL, enqueue_blocking, &b[i]);
	}
	T_WAIT_UNTIL(stats_of(q).blocked == B);
	/* One place: one producer gets it. */
	ck_assert_int_eq(opq_queue_cancel(q, &c[0].op), 0);
	T_WAIT_UNTIL(stats_of(q).blocked == B - 1);
	ck_assert_uint_eq(stats_of(q).queued, CAP);
	/* Four more places: the other two get in. */
	for (int i = 1; i <= CAP / 2; i++)
		ck_assert_int_eq(opq_queue_cancel(q, &c[i].op), 0);
	T_WAIT_UNTIL(stats_of(q).blocked == 0);
	ck_assert_uint_eq(stats_of(q).queued, CAP / 2 + B - 1);
	for (int i = 0; i < B; i++) {
		pthread_join(th[i], NULL);
		ck_assert_int_eq(b[i].rc, 0);
	}
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
	for (int i = 0; i < CAP; i++)
		ck_assert_int_eq(c[i].performed + c[i].discarded, 1);
	for (int i = 0; i < B; i++)
		ck_assert_int_eq(b[i].c.performed + b[i].c.discarded, 1);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.cancelled, CAP / 2 + 1);
	ck_assert_uint_eq(st.discarded, CAP + B);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/*
 * A producer never waits while there is room: a full queue whose one runner
 * takes an operation and then blocks in it has one place free, and the
 * producer blocked on it gets in at once, without any further take. The
 * time from start (which makes the runner take) to the producer's return is
 * a wakeup, not a poll: the median over the rounds must stay far below the
 * 10 ms a producer once waited between looks for room.
 */
struct timed_enqueuer {
	struct blocked_enqueuer b;
	int64_t returned_ns;
};

static void *enqueue_blocking_timed(void *arg)
{
	struct timed_enqueuer *t = arg;
	t->b.rc = opq_queue_enqueue(t->b.q, &t->b.c.op);
	t->returned_ns = t_now_ns();
	return NULL;
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

START_TEST(test_bounded_no_wait_while_room)
{
	enum { CAP = 8, ROUNDS = 21 };
	int64_t took[ROUNDS];
	for (int round = 0; round < ROUNDS; round++) {
		opq_queue *q = make_queue(CAP);
		struct cop c[CAP];
		struct t_gate hold;
		atomic_int started = 0;
		t_gate_init(&hold);
		for (int i = 0; i < CAP; i++) {
			cop_init(&c[i]);
			ck_assert_int_eq(opq_queue_enqueue(q, &c[i].op), 0);
		}
		c[0].hold = &hold;
		c[0].started = &started;
		struct timed_enqueuer t = {.b = {.q = q}};
		cop_init(&t.b.c);
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, enqueue_blocking_timed, &t), 0);
		T_WAIT_UNTIL(stats_of(q).blocked == 1);
		int64_t t0 = t_now_ns();
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		ck_assert_int_eq(pthread_join(th, NULL), 0); /* the runner stays blocked in c[0] */
		ck_assert_int_eq(t.b.rc, 0);
		T_WAIT_UNTIL(atomic_load(&started)); /* the room was made by its take */
		opq_queue_stats st = stats_of(q);
		ck_assert_uint_eq(st.queued, CAP);
		ck_assert_uint_eq(st.running, 1);
		took[round] = t.returned_ns - t0;
		t_gate_open(&hold);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		for (int i = 0; i < CAP; i++)
			ck_assert_int_eq(c[i].performed, 1);
		ck_assert_int_eq(t.b.c.performed, 1);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		t_gate_destroy(&hold);
	}
	qsort(took, ROUNDS, sizeof(took[0]), cmp_i64);
	ck_assert_msg(took[ROUNDS / 2] < 5000000, "the producer waited %lld ns (median) with room",
	              (long long)took[ROUNDS / 2]);
}
END_TEST

/* ---- stop ---------------------------------------------------------------- */

START_TEST(test_stop_modes)
{
	enum { N = 100 };
	for (int mode = OPQ_STOP_DRAIN; mode <= OPQ_STOP_DISCARD; mode++) {
		opq_queue *q = make_queue(0);
		struct t_gate hold;
		t_gate_init(&hold);
		atomic_int started = 0;
		struct cop blocker, ops[N], late;
		cop_init(&blocker);
		blocker.hold = &hold;
		blocker.started = &started;
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		ck_assert_int_eq(opq_queue_enqueue(q, &blocker.op), 0);
		T_WAIT_UNTIL(atomic_load(&started));
		for (int i = 0; i < N; i++) {
			cop_init(&ops[i]);
			ck_assert_int_eq(opq_queue_enqueue(q, &ops[i].op), 0);
		}
		/* Open the gate from an op-free thread only once stop has begun:
		 * here, stop blocks until the running op finishes, so open first. */
		t_gate_open(&hold);
		ck_assert_int_eq(opq_queue_stop(q, mode), 0);
		cop_init(&late);
		ck_assert_int_eq(opq_queue_enqueue(q, &late.op), ESHUTDOWN);
		ck_assert_int_eq(opq_queue_enqueue_fn(q, fn_inc, NULL, &fn_count), ESHUTDOWN);
		ck_assert_int_eq(late.performed + late.discarded, 0);
		ck_assert_int_eq(blocker.performed, 1);
		opq_queue_stats st = stats_of(q);
		long performed = 0, discarded = 0;
		for (int i = 0; i < N; i++) {
			ck_assert_int_eq(ops[i].performed + ops[i].discarded, 1);
			performed += ops[i].performed;
			discarded += ops[i].discarded;
		}
		ck_assert_uint_eq(st.completed, performed + 1);
		ck_assert_uint_eq(st.discarded, discarded);
		ck_assert_uint_eq(st.runners, 0);
		if (mode == OPQ_STOP_DRAIN)
			ck_assert_int_eq(performed, N);
		/* Stop is idempotent, in either mode. */
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
		ck_assert_int_eq(opq_queue_stop(q, 7), EINVAL);
		ck_assert_int_eq(opq_queue_stop(NULL, OPQ_STOP_DRAIN), EINVAL);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		t_gate_destroy(&hold);
	}
}
END_TEST

struct stopper {
	opq_queue *q;
	int mode;
	int rc;
};

static void *stop_thread(void *arg)
{
	struct stopper *s = arg;
	s->rc = opq_queue_stop(s->q, s->mode);
	return NULL;
}

/* Discard with a running op: queued ops are discarded at once, the running
 * op finishes, and stop returns only after that. */
START_TEST(test_stop_discard_while_running)
{
	enum { N = 50 };
	opq_queue *q = make_queue(0);
	struct t_gate hold;
	t_gate_init(&hold);
	atomic_int started = 0;
	struct cop blocker, ops[N];
	cop_init(&blocker);
	blocker.hold = &hold;
	blocker.started = &started;
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &blocker.op), 0);
	T_WAIT_UNTIL(atomic_load(&started));
	for (int i = 0; i < N; i++) {
		cop_init(&ops[i]);
		ck_assert_int_eq(opq_queue_enqueue(q, &ops[i].op), 0);
	}
	struct stopper s = {q, OPQ_STOP_DISCARD, -1};
	pthread_t th;
	pthread_create(&th, NULL, stop_thread, &s);
	/* discard callbacks run in FIFO order: the last one done means all are */
	T_WAIT_UNTIL(atomic_load(&ops[N - 1].discarded) == 1);
	ck_assert_uint_eq(stats_of(q).discarded, N);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(ops[i].discarded, 1);
	ck_assert_int_eq(blocker.performed, 0);
	ck_assert_uint_eq(stats_of(q).runners, 1);
	t_gate_open(&hold);
	pthread_join(th, NULL);
	ck_assert_int_eq(s.rc, 0);
	ck_assert_int_eq(blocker.performed, 1);
	ck_assert_uint_eq(stats_of(q).runners, 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	t_gate_destroy(&hold);
}
END_TEST

/*
 * A discard callback that stops the queue again, run by a DISCARD stop on
 * its own thread, gets EDEADLK: that stop cannot end before the callback
 * returns. On a never-started queue, and on a running one whose runner is
 * busy; either way the outer stop returns.
 */
static opq_queue *_Atomic again_q;
static atomic_int again_rc;

static void stop_again(opq_op *op)
{
	(void)op;
	atomic_store(&again_rc, opq_queue_stop(again_q, OPQ_STOP_DRAIN));
}

static void *stop_thread_done(void *arg)
{
	stop_thread(arg);
	atomic_store(&again_q, NULL); /* the outer stop returned */
	return NULL;
}

START_TEST(test_stop_from_discard)
{
	for (int started = 0; started < 2; started++) {
		struct t_gate hold;
		t_gate_init(&hold);
		atomic_int running = 0;
		struct cop blocker, c;
		cop_init(&blocker);
		blocker.hold = &hold;
		blocker.started = &running;
		cop_init(&c);
		c.op.discard = stop_again;
		opq_queue *q = make_queue(0);
		if (started) {
			ck_assert_int_eq(opq_queue_start(q, 1), 0);
			ck_assert_int_eq(opq_queue_enqueue(q, &blocker.op), 0);
			T_WAIT_UNTIL(atomic_load(&running));
		}
		ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
		atomic_store(&again_rc, -1);
		atomic_store(&again_q, q);
		struct stopper st = {q, OPQ_STOP_DISCARD, -1};
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, stop_thread_done, &st), 0);
		T_WAIT_UNTIL(atomic_load(&again_rc) != -1);
		ck_assert_int_eq(atomic_load(&again_rc), EDEADLK);
		t_gate_open(&hold);
		T_WAIT_UNTIL(atomic_load(&again_q) == NULL);
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_int_eq(st.rc, 0);
		ck_assert_int_eq(c.performed, 0);
		ck_assert_uint_eq(stats_of(q).discarded, 1);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		t_gate_destroy(&hold);
	}
}
END_TEST

/*
 * Two threads enqueue the same operation at once: one gets EBUSY, and the
 * operation is queued once. Fresh threads each round: a thread's first
 * lock-free enqueue is its slowest (it registers the thread), which is when
 * the other could take the locked path past it.
 */
struct twin {
	opq_queue *q;
	opq_op *op;
	atomic_int *ready, *go;
	int rc;
};

static void *twin_enqueue(void *arg)
{
	struct twin *t = arg;
	atomic_fetch_add(t->ready, 1);
	while (!atomic_load(t->go))
		sched_yield();
	t->rc = opq_queue_enqueue(t->q, t->op);
	return NULL;
}

START_TEST(test_enqueue_same_op_at_once)
{
	long rounds = t_scale(3000);
	for (long i = 0; i < rounds; i++) {
		struct cop c;
		cop_init(&c);
		opq_queue *q = make_queue(0);
		atomic_int ready = 0, go = 0;
		struct twin t[2] = {{q, &c.op, &ready, &go, -1}, {q, &c.op, &ready, &go, -1}};
		pthread_t th[2];
		for (int k = 0; k < 2; k++)
			ck_assert_int_eq(pthread_create(&th[k], NULL, twin_enqueue, &t[k]), 0);
		T_WAIT_UNTIL(atomic_load(&ready) == 2);
		atomic_store(&go, 1);
		for (int k = 0; k < 2; k++)
			ck_assert_int_eq(pthread_join(th[k], NULL), 0);
		ck_assert_msg((t[0].rc == 0 && t[1].rc == EBUSY) ||
		                  (t[0].rc == EBUSY && t[1].rc == 0),
		              "round %ld: %d and %d", i, t[0].rc, t[1].rc);
		ck_assert_uint_eq(stats_of(q).queued, 1);
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(c.performed, 1);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
}
END_TEST

/*
 * Calls on a queue from a discard callback run by its destroy: the queue
 * takes nothing more (enqueue ESHUTDOWN: the caller keeps the operation;
 * start and destroy EBUSY), so nothing is lost and destroy returns.
 */
static struct {
	opq_queue *q;
	struct cop *b;
	int rc_enqueue, rc_start, rc_destroy;
} from_destroy;

static void discard_calls_queue(opq_op *op)
{
	(void)op;
	from_destroy.rc_enqueue = opq_queue_enqueue(from_destroy.q, &from_destroy.b->op);
	from_destroy.rc_start = opq_queue_start(from_destroy.q, 1);
	from_destroy.rc_destroy = opq_queue_destroy(from_destroy.q);
}

struct destroyer {
	opq_queue *q;
	int rc;
	atomic_int done;
};

static void *destroy_thread(void *arg)
{
	struct destroyer *d = arg;
	d->rc = opq_queue_destroy(d->q);
	atomic_store(&d->done, 1);
	return NULL;
}

START_TEST(test_calls_from_destroy_discard)
{
	for (size_t capacity = 0; capacity <= 4; capacity += 4) {
		struct cop a, b;
		cop_init(&a);
		cop_init(&b);
		a.op.discard = discard_calls_queue;
		opq_queue *q = make_queue(capacity);
		from_destroy.q = q;
		from_destroy.b = &b;
		from_destroy.rc_enqueue = from_destroy.rc_start = from_destroy.rc_destroy = -1;
		ck_assert_int_eq(opq_queue_enqueue(q, &a.op), 0);
		struct destroyer d = {q, -1, 0};
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, destroy_thread, &d), 0);
		T_WAIT_UNTIL(atomic_load(&d.done));
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_int_eq(d.rc, 0);
		ck_assert_int_eq(from_destroy.rc_enqueue, ESHUTDOWN);
		ck_assert_int_eq(from_destroy.rc_start, EBUSY);
		ck_assert_int_eq(from_destroy.rc_destroy, EBUSY);
		ck_assert_int_eq(b.performed + b.discarded, 0); /* refused: still the caller's */
		ck_assert_int_eq(opq_op_init(&b.op, cop_perform, cop_discard), 0);
	}
}
END_TEST

/*
 * A producer blocked on a full queue when a stop begins gets ESHUTDOWN,
 * even when the queue is started again before it looks.
 */
START_TEST(test_blocked_producer_restart)
{
	for (int i = 0; i < 50; i++) {
		struct cop a;
		cop_init(&a);
		opq_queue *q = make_queue(1);
		ck_assert_int_eq(opq_queue_enqueue(q, &a.op), 0);
		struct blocked_enqueuer p = {.q = q, .rc = -1};
		cop_init(&p.c);
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, enqueue_blocking, &p), 0);
		T_WAIT_UNTIL(stats_of(q).blocked == 1);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
		ck_assert_int_eq(opq_queue_start(q, 1), 0);
		ck_assert_int_eq(pthread_join(th, NULL), 0);
		ck_assert_msg(p.rc == ESHUTDOWN, "run %d: %d", i, p.rc);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(p.c.performed + p.c.discarded, 0);
		ck_assert_int_eq(a.discarded, 1);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
}
END_TEST

/*
 * A runner leaving (the queue shrinks) whose exit hook enqueues into the
 * full queue waits for the runner that stays to make room: it has left the
 * runners, so it is not one that would wait for itself (EDEADLK before).
 */
static struct {
	opq_queue *q;
	struct cop fill[4], extra;
	atomic_int once, done;
	int rc;
} leaving;

static void leaving_hook(void *arg, unsigned index)
{
	(void)arg;
	(void)index;
	if (atomic_fetch_add(&leaving.once, 1) != 0)
		return;
	for (int i = 0; i < 4 && opq_queue_tryenqueue(leaving.q, &leaving.fill[i].op) == 0; i++)
		;
	struct timespec dl = t_deadline(T_WAIT_NS);
	leaving.rc = opq_queue_timedenqueue(leaving.q, &leaving.extra.op, &dl);
	atomic_store(&leaving.done, 1);
}

START_TEST(test_exit_hook_enqueue_full)
{
	struct t_gate hold;
	t_gate_init(&hold);
	atomic_int started = 0;
	struct cop blocker;
	cop_init(&blocker);
	blocker.hold = &hold;
	blocker.started = &started;
	for (int i = 0; i < 4; i++)
		cop_init(&leaving.fill[i]);
	cop_init(&leaving.extra);
	leaving.rc = -1;
	opq_queue_attr *a;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_capacity(a, 2), 0);
	ck_assert_int_eq(opq_queue_attr_set_hooks(a, NULL, leaving_hook, NULL), 0);
	ck_assert_int_eq(opq_queue_create(&leaving.q, a), 0);
	opq_queue_attr_destroy(a);
	ck_assert_int_eq(opq_queue_start(leaving.q, 2), 0);
	ck_assert_int_eq(opq_queue_enqueue(leaving.q, &blocker.op), 0);
	T_WAIT_UNTIL(atomic_load(&started));
	ck_assert_int_eq(opq_queue_set_runners(leaving.q, 1), 0); /* the idle one leaves */
	/* Its hook fills the queue and waits for room; then the one that
	 * stays goes on. */
	T_WAIT_UNTIL(stats_of(leaving.q).blocked == 1 || atomic_load(&leaving.done));
	t_gate_open(&hold);
	T_WAIT_UNTIL(atomic_load(&leaving.done));
	ck_assert_int_eq(leaving.rc, 0);
	ck_assert_int_eq(opq_queue_stop(leaving.q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(leaving.extra.performed, 1);
	ck_assert_int_eq(blocker.performed, 1);
	ck_assert_int_eq(opq_queue_destroy(leaving.q), 0);
	t_gate_destroy(&hold);
}
END_TEST

/* Several threads stop at once: all return 0, and only after the runners are gone. */
START_TEST(test_concurrent_stops)
{
	enum { S = 4, N = 2000 };
	for (int iter = 0; iter < 20; iter++) {
		atomic_long n = 0;
		opq_queue *q = make_queue(0);
		ck_assert_int_eq(opq_queue_start(q, 2), 0);
		for (int i = 0; i < N; i++)
			ck_assert_int_eq(opq_queue_enqueue_fn(q, fn_inc, NULL, &n), 0);
		struct stopper s[S];
		pthread_t th[S];
		for (int i = 0; i < S; i++) {
			s[i] = (struct stopper){q, OPQ_STOP_DRAIN, -1};
			pthread_create(&th[i], NULL, stop_thread, &s[i]);
		}
		for (int i = 0; i < S; i++) {
			pthread_join(th[i], NULL);
			ck_assert_int_eq(s[i].rc, 0);
		}
		ck_assert_int_eq(atomic_load(&n), N);
		ck_assert_uint_eq(stats_of(q).runners, 0);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
}
END_TEST

/* Calls from inside an operation of the same queue. */
struct inside {
	opq_op op;
	opq_queue *q;
	opq_queue *other;
	int stop_rc, idle_rc, other_stop_rc, enqueue_rc, destroy_rc;
	opq_queue *current;
	atomic_long *counter;
};

static void inside_perform(opq_op *op)
{
	struct inside *in = OPQ_CONTAINER_OF(op, struct inside, op);
	in->current = opq_queue_current();
	in->stop_rc = opq_queue_stop(in->q, OPQ_STOP_DRAIN);
	in->idle_rc = opq_queue_wait_idle(in->q, NULL);
	in->destroy_rc = opq_queue_destroy(in->q);
	in->enqueue_rc = opq_queue_enqueue_fn(in->q, fn_inc, NULL, in->counter);
	in->other_stop_rc = opq_queue_stop(in->other, OPQ_STOP_DRAIN);
}

START_TEST(test_calls_from_inside)
{
	atomic_long n = 0;
	opq_queue *q = make_queue(0), *other = make_queue(0);
	struct inside in = {.q = q, .other = other, .counter = &n};
	ck_assert_int_eq(opq_op_init(&in.op, inside_perform, NULL), 0);
	ck_assert_int_eq(opq_queue_start(other, 1), 0);
	ck_assert_int_eq(opq_queue_enqueue_fn(other, fn_inc, NULL, &n), 0);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &in.op), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_ptr_eq(in.current, q);
	ck_assert_int_eq(in.stop_rc, EDEADLK);
	ck_assert_int_eq(in.idle_rc, EDEADLK);
	ck_assert_int_eq(in.destroy_rc, EBUSY);
	ck_assert_int_eq(in.enqueue_rc, 0);
	ck_assert_int_eq(in.other_stop_rc, 0); /* another queue may be stopped */
	ck_assert_int_eq(atomic_load(&n), 2);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_queue_destroy(other), 0);
}
END_TEST

/* An op that enqueues the next link of a chain: enqueue from inside works. */
struct chain {
	opq_op op;
	opq_queue *q;
	atomic_long left;
	atomic_long done;
};

static void chain_perform(opq_op *op)
{
	struct chain *c = OPQ_CONTAINER_OF(op, struct chain, op);
	atomic_fetch_add(&c->done, 1);
	if (atomic_fetch_sub(&c->left, 1) > 1)
		ck_assert_int_eq(opq_queue_enqueue(c->q, &c->op), 0);
}

START_TEST(test_enqueue_chain)
{
	opq_queue *q = make_queue(0);
	struct chain c = {.q = q, .left = 10000};
	ck_assert_int_eq(opq_op_init(&c.op, chain_perform, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 2), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(atomic_load(&c.done), 10000);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/* A runner that would block on a full queue while no other runner can make room. */
struct self_fill {
	opq_op op;
	opq_queue *q;
	struct cop a, b;
	int rc_a, rc_b;
};

static void self_fill_perform(opq_op *op)
{
	struct self_fill *s = OPQ_CONTAINER_OF(op, struct self_fill, op);
	s->rc_a = opq_queue_enqueue(s->q, &s->a.op);
	s->rc_b = opq_queue_enqueue(s->q, &s->b.op);
}

START_TEST(test_enqueue_full_from_runner)
{
	opq_queue *q = make_queue(1);
	struct self_fill s = {.q = q};
	cop_init(&s.a);
	cop_init(&s.b);
	ck_assert_int_eq(opq_op_init(&s.op, self_fill_perform, NULL), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &s.op), 0);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(s.rc_a, 0);
	ck_assert_int_eq(s.rc_b, EDEADLK);
	ck_assert_int_eq(s.a.performed, 1);
	ck_assert_int_eq(s.b.performed + s.b.discarded, 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/* Stop on a never-started queue: DRAIN performs on the caller's thread. */
static pthread_t performer;
static void record_thread(void *arg)
{
	(void)arg;
	performer = pthread_self();
}

START_TEST(test_stop_never_started)
{
	opq_queue *q = make_queue(0);
	ck_assert_int_eq(opq_queue_enqueue_fn(q, record_thread, NULL, NULL), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert(pthread_equal(performer, pthread_self()));
	ck_assert_uint_eq(stats_of(q).completed, 1);
	ck_assert_int_eq(opq_queue_destroy(q), 0);

	struct cop c;
	cop_init(&c);
	q = make_queue(0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DISCARD), 0);
	ck_assert_int_eq(c.discarded, 1);
	ck_assert_int_eq(opq_queue_destroy(q), 0);

	/* Destroy discards what a never-started queue still holds. */
	cop_init(&c);
	q = make_queue(0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(c.discarded, 1);
	ck_assert_int_eq(c.performed, 0);
}
END_TEST

/* A stopped queue can be started again. */
START_TEST(test_restart)
{
	atomic_long n = 0;
	opq_queue *q = make_queue(0);
	for (int round = 1; round <= 5; round++) {
		ck_assert_int_eq(opq_queue_start(q, (unsigned)round), 0);
		ck_assert_uint_eq(stats_of(q).runners, (unsigned)round);
		for (int i = 0; i < 100; i++)
			ck_assert_int_eq(opq_queue_enqueue_fn(q, fn_inc, NULL, &n), 0);
		ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
		ck_assert_int_eq(atomic_load(&n), round * 100);
		ck_assert_int_eq(opq_queue_enqueue_fn(q, fn_inc, NULL, &n), ESHUTDOWN);
	}
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/* ---- cancel ---------------------------------------------------------------- */

START_TEST(test_cancel)
{
	opq_queue *q = make_queue(0), *other = make_queue(0);
	struct t_gate hold;
	t_gate_init(&hold);
	atomic_int started = 0;
	struct cop running, a, b, c;
	cop_init(&running);
	running.hold = &hold;
	running.started = &started;
	cop_init(&a);
	cop_init(&b);
	cop_init(&c);
	ck_assert_int_eq(opq_queue_cancel(NULL, &a.op), EINVAL);
	ck_assert_int_eq(opq_queue_cancel(q, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_cancel(q, &a.op), EBUSY); /* never queued */
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &running.op), 0);
	T_WAIT_UNTIL(atomic_load(&started));
	ck_assert_int_eq(opq_queue_enqueue(q, &a.op), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &b.op), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
	ck_assert_int_eq(opq_queue_cancel(q, &running.op), EBUSY); /* running */
	ck_assert_int_eq(opq_queue_cancel(other, &b.op), EBUSY);   /* not queued there */
	ck_assert_int_eq(opq_queue_cancel(q, &b.op), 0);           /* the middle one */
	ck_assert_int_eq(b.discarded, 1);
	ck_assert_int_eq(opq_queue_cancel(q, &b.op), EBUSY); /* twice */
	ck_assert_uint_eq(stats_of(q).queued, 2);
	t_gate_open(&hold);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(opq_queue_cancel(q, &a.op), EBUSY); /* done */
	ck_assert_int_eq(a.performed, 1);
	ck_assert_int_eq(b.performed, 0);
	ck_assert_int_eq(c.performed, 1);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.cancelled, 1);
	ck_assert_uint_eq(st.discarded, 1);
	ck_assert_uint_eq(st.completed, 3);
	/* A cancelled op can be enqueued again. */
	ck_assert_int_eq(opq_queue_enqueue(q, &b.op), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(b.performed, 1);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_queue_destroy(other), 0);
	t_gate_destroy(&hold);
}
END_TEST

/* ---- runners: resize, hooks, names, signals ------------------------------- */

START_TEST(test_set_runners)
{
	atomic_long n = 0;
	opq_queue *q = make_queue(0);
	ck_assert_int_eq(opq_queue_set_runners(q, 2), ESRCH);
	ck_assert_int_eq(opq_queue_set_runners(NULL, 2), EINVAL);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_set_runners(q, 0), EINVAL);
	for (int iter = 0; iter < 50; iter++) {
		unsigned want = 1 + (unsigned)(iter * 7 % 6);
		ck_assert_int_eq(opq_queue_set_runners(q, want), 0);
		for (int i = 0; i < 200; i++)
			ck_assert_int_eq(opq_queue_enqueue_fn(q, fn_inc, NULL, &n), 0);
		/* Growing is immediate; shrinking happens as runners finish an op. */
		T_WAIT_UNTIL(stats_of(q).runners == want);
	}
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(atomic_load(&n), 50 * 200);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_set_runners(q, 2), ESRCH);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

struct hooks {
	atomic_int started, exited;
	atomic_uint start_mask, exit_mask;
	atomic_int name_ok;
	atomic_int sigint_blocked;
};

static opq_queue *hook_queue;
static atomic_int hook_resize_rc = -1;

static void on_start(void *arg, unsigned index)
{
	struct hooks *h = arg;
	/* Resizing its own queue from a start hook would wait for itself. */
	atomic_store(&hook_resize_rc, opq_queue_set_runners(hook_queue, 8));
	atomic_fetch_add(&h->started, 1);
	atomic_fetch_or(&h->start_mask, 1u << index);
}

static void on_exit_hook(void *arg, unsigned index)
{
	struct hooks *h = arg;
	atomic_fetch_add(&h->exited, 1);
	atomic_fetch_or(&h->exit_mask, 1u << index);
}

static void check_thread(void *arg)
{
	struct hooks *h = arg;
	char name[16] = "";
	pthread_getname_np(pthread_self(), name, sizeof(name));
	if (strncmp(name, "hooktest/", 9) == 0)
		atomic_store(&h->name_ok, 1);
	sigset_t set;
	pthread_sigmask(SIG_BLOCK, NULL, &set);
	atomic_store(&h->sigint_blocked, sigismember(&set, SIGINT));
}

START_TEST(test_hooks_names_signals)
{
	struct hooks h = {0};
	opq_queue_attr *a;
	opq_queue *q;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_name(a, "hooktest"), 0);
	ck_assert_int_eq(opq_queue_attr_set_hooks(a, on_start, on_exit_hook, &h), 0);
	ck_assert_int_eq(opq_queue_create(&q, a), 0);
	hook_queue = q;
	opq_queue_attr_destroy(a); /* the queue keeps a copy */
	ck_assert_int_eq(opq_queue_start(q, 4), 0);
	/* start returns after every start hook ran */
	ck_assert_int_eq(atomic_load(&h.started), 4);
	ck_assert_int_eq(atomic_load(&hook_resize_rc), EDEADLK);
	ck_assert_uint_eq(atomic_load(&h.start_mask), 0xf);
	ck_assert_int_eq(opq_queue_enqueue_fn(q, check_thread, NULL, &h), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	/* stop returns after every exit hook ran */
	ck_assert_int_eq(atomic_load(&h.exited), 4);
	ck_assert_uint_eq(atomic_load(&h.exit_mask), 0xf);
	ck_assert_int_eq(atomic_load(&h.name_ok), 1);
	ck_assert_int_eq(atomic_load(&h.sigint_blocked), 1);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
}
END_TEST

/* ---- runner stack size ------------------------------------------------------ */

/* The stack size of the calling thread, as pthread_getattr_np reports it. */
static size_t own_stack_size(void)
{
	pthread_attr_t a;
	size_t size = 0;
	ck_assert_int_eq(pthread_getattr_np(pthread_self(), &a), 0);
	ck_assert_int_eq(pthread_attr_getstacksize(&a, &size), 0);
	ck_assert_int_eq(pthread_attr_destroy(&a), 0);
	return size;
}

static void *default_stack_main(void *arg)
{
	*(size_t *)arg = own_stack_size();
	return NULL;
}

struct stacks {
	atomic_size_t smallest;
	atomic_int runners;
};

static void on_start_stack(void *arg, unsigned index)
{
	struct stacks *st = arg;
	(void)index;
	size_t size = own_stack_size();
	size_t cur = atomic_load(&st->smallest);
	while ((cur == 0 || size < cur) && !atomic_compare_exchange_weak(&st->smallest, &cur, size))
		;
	atomic_fetch_add(&st->runners, 1);
}

/* Start 2 runners with stacks of `size` (0: default); what they saw. */
static struct stacks runner_stacks(size_t size)
{
	static struct stacks st; /* the hook's argument outlives the queue */
	opq_queue_attr *a;
	opq_queue *q;
	atomic_store(&st.smallest, 0);
	atomic_store(&st.runners, 0);
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_stack_size(a, size), 0);
	ck_assert_int_eq(opq_queue_attr_set_hooks(a, on_start_stack, NULL, &st), 0);
	ck_assert_int_eq(opq_queue_create(&q, a), 0);
	opq_queue_attr_destroy(a);
	ck_assert_int_eq(opq_queue_start(q, 2), 0); /* after every start hook */
	ck_assert_int_eq(atomic_load(&st.runners), 2);
	/* And a runner added later gets the same stack. */
	ck_assert_int_eq(opq_queue_set_runners(q, 3), 0);
	ck_assert_int_eq(atomic_load(&st.runners), 3);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	return st;
}

START_TEST(test_stack_size)
{
	opq_queue_attr *a;
	size_t size = 1;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_get_stack_size(a, &size), 0);
	ck_assert_uint_eq(size, 0); /* the system's default */
	ck_assert_int_eq(opq_queue_attr_set_stack_size(NULL, 1 << 20), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_stack_size(a, 1), EINVAL);
	ck_assert_int_eq(opq_queue_attr_set_stack_size(a, (size_t)PTHREAD_STACK_MIN - 1), EINVAL);
	ck_assert_int_eq(opq_queue_attr_get_stack_size(a, &size), 0);
	ck_assert_uint_eq(size, 0); /* a refused size changes nothing */
	ck_assert_int_eq(opq_queue_attr_set_stack_size(a, 3 << 20), 0);
	ck_assert_int_eq(opq_queue_attr_get_stack_size(a, &size), 0);
	ck_assert_uint_eq(size, 3 << 20);
	ck_assert_int_eq(opq_queue_attr_set_stack_size(a, 0), 0);
	ck_assert_int_eq(opq_queue_attr_get_stack_size(NULL, &size), EINVAL);
	ck_assert_int_eq(opq_queue_attr_get_stack_size(a, NULL), EINVAL);
	opq_queue_attr_destroy(a);

	/* What a thread gets by default, here. */
	size_t def = 0;
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, default_stack_main, &def), 0);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_uint_gt(def, 0);

	/*
	 * "At least": the C library may reuse the stack of an exited thread
	 * that is somewhat larger than asked (glibc keeps a cache of them).
	 * 0 first, so that no larger stack of this test is there to reuse.
	 */
	struct stacks st = runner_stacks(0);
	ck_assert_uint_ge(atomic_load(&st.smallest), def);
	/* Larger than the default: every runner's stack is at least that. */
	size_t big = 2 * def;
	st = runner_stacks(big);
	ck_assert_uint_ge(atomic_load(&st.smallest), big);

#if SIZE_MAX > 0xffffffffu
	/* A stack larger than the address space: start fails, nothing runs. */
	opq_queue *q;
	ck_assert_int_eq(opq_queue_attr_create(&a), 0);
	ck_assert_int_eq(opq_queue_attr_set_stack_size(a, (size_t)1 << 48), 0);
	ck_assert_int_eq(opq_queue_create(&q, a), 0);
	opq_queue_attr_destroy(a);
	int rc = opq_queue_start(q, 2);
	ck_assert_msg(rc == EAGAIN || rc == EINVAL || rc == ENOMEM, "start: %d", rc);
	ck_assert_uint_eq(stats_of(q).runners, 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
#endif
}
END_TEST

/* Threads of this process named `name` (/proc/self/task/TID/comm). */
static int threads_named(const char *name)
{
	DIR *d = opendir("/proc/self/task");
	ck_assert_ptr_nonnull(d);
	int n = 0;
	for (struct dirent *e; (e = readdir(d));) {
		if (e->d_name[0] == '.')
			continue;
		char path[sizeof("/proc/self/task//comm") + sizeof(e->d_name)], comm[32] = "";
		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
		FILE *f = fopen(path, "r");
		if (!f)
			continue; /* the thread has exited meanwhile */
		if (fgets(comm, sizeof(comm), f))
			comm[strcspn(comm, "\n")] = '\0';
		fclose(f);
		n += strcmp(comm, name) == 0;
	}
	closedir(d);
	return n;
}

/*
 * The library's timer thread, started for a queue's first scope deadline
 * and joined when the queue is destroyed, is named "opq-timer".
 */
START_TEST(test_timer_thread_named)
{
#if HAVE_DECL_PTHREAD_SETNAME_NP
	opq_queue *q = make_queue(0);
	opq_scope_attr *a;
	opq_scope *root;
	ck_assert_int_eq(threads_named("opq-timer"), 0);
	ck_assert_int_eq(opq_scope_attr_create(&a), 0);
	struct timespec far = t_deadline(3600LL * 1000000000LL);
	ck_assert_int_eq(opq_scope_attr_set_deadline(a, &far), 0);
	ck_assert_int_eq(opq_scope_create(&root, q, a), 0);
	/* The thread names itself as it starts. */
	T_WAIT_UNTIL(threads_named("opq-timer") == 1);
	ck_assert_int_eq(opq_scope_destroy(root), 0);
	opq_scope_attr_destroy(a);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(threads_named("opq-timer"), 0);
#endif
}
END_TEST

/* ---- wait idle -------------------------------------------------------------- */

START_TEST(test_wait_idle)
{
	opq_queue *q = make_queue(0);
	struct t_gate hold;
	t_gate_init(&hold);
	struct cop c;
	cop_init(&c);
	c.hold = &hold;
	ck_assert_int_eq(opq_queue_wait_idle(NULL, NULL), EINVAL);
	ck_assert_int_eq(opq_queue_wait_idle(q, NULL), 0); /* idle already */
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_queue_enqueue(q, &c.op), 0);
	struct timespec soon = t_deadline(20 * 1000000);
	ck_assert_int_eq(opq_queue_wait_idle(q, &soon), ETIMEDOUT);
	ck_assert(t_passed(&soon));
	t_gate_open(&hold);
	struct timespec dl = t_deadline(T_WAIT_NS);
	ck_assert_int_eq(opq_queue_wait_idle(q, &dl), 0);
	ck_assert_int_eq(c.performed, 1);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	t_gate_destroy(&hold);
}
END_TEST

/* ---- stress ------------------------------------------------------------------ */

/* P producers enqueue into R runners; every op is counted per op. */
struct sop {
	opq_op op;
	atomic_int performed;
};

static void sop_perform(opq_op *op)
{
	atomic_fetch_add(&OPQ_CONTAINER_OF(op, struct sop, op)->performed, 1);
}

struct sproducer {
	opq_queue *q;
	struct sop *ops;
	long n;
	atomic_long *fn_done;
	int rc;
};

static void *sproduce(void *arg)
{
	struct sproducer *p = arg;
	for (long i = 0; i < p->n && p->rc == 0; i++) {
		if (i % 4 == 3)
			p->rc = opq_queue_enqueue_fn(p->q, fn_inc, NULL, p->fn_done);
		else
			p->rc = opq_queue_enqueue(p->q, &p->ops[i].op);
	}
	return NULL;
}

START_TEST(test_stress_exactly_once)
{
	enum { P = 8, R = 4 };
	long n = t_scale(100000);
	atomic_long fn_done = 0;
	opq_queue *q = make_queue(0);
	struct sop *ops = calloc((size_t)(P * n), sizeof(*ops));
	ck_assert_ptr_nonnull(ops);
	for (long i = 0; i < P * n; i++)
		ck_assert_int_eq(opq_op_init(&ops[i].op, sop_perform, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, R), 0);
	pthread_t th[P];
	struct sproducer pr[P];
	for (int i = 0; i < P; i++) {
		pr[i] = (struct sproducer){q, ops + i * n, n, &fn_done, 0};
		pthread_create(&th[i], NULL, sproduce, &pr[i]);
	}
	for (int i = 0; i < P; i++) {
		pthread_join(th[i], NULL);
		ck_assert_int_eq(pr[i].rc, 0);
	}
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	long intrusive = 0;
	for (long i = 0; i < P * n; i++) {
		if (i % n % 4 == 3) {
			ck_assert_int_eq(ops[i].performed, 0);
		} else {
			ck_assert_int_eq(ops[i].performed, 1);
			intrusive++;
		}
	}
	ck_assert_int_eq(atomic_load(&fn_done) + intrusive, P * n);
	opq_queue_stats st = stats_of(q);
	ck_assert_uint_eq(st.completed, (uint64_t)(P * n));
	ck_assert_uint_eq(st.discarded, 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	free(ops);
}
END_TEST

/* Enqueue races stop: each op is performed, discarded or returned exactly once. */
struct rop {
	opq_op op;
	atomic_int performed, discarded;
	int returned;
};

static void rop_perform(opq_op *op)
{
	atomic_fetch_add(&OPQ_CONTAINER_OF(op, struct rop, op)->performed, 1);
}

static void rop_discard(opq_op *op)
{
	atomic_fetch_add(&OPQ_CONTAINER_OF(op, struct rop, op)->discarded, 1);
}

struct rproducer {
	opq_queue *q;
	struct rop *ops;
	long n;
};

static void *rproduce(void *arg)
{
	struct rproducer *p = arg;
	for (long i = 0; i < p->n; i++) {
		int rc = (i & 1) ? opq_queue_tryenqueue(p->q, &p->ops[i].op)
		                 : opq_queue_enqueue(p->q, &p->ops[i].op);
		if (rc) {
			ck_assert(rc == ESHUTDOWN || rc == EAGAIN);
			p->ops[i].returned = 1;
		}
	}
	return NULL;
}

START_TEST(test_stress_enqueue_races_stop)
{
	enum { P = 4, N = 2000 };
	int iters = (int)t_scale(60);
	struct rop *ops = calloc(P * N, sizeof(*ops));
	for (int iter = 0; iter < iters; iter++) {
		int mode = iter & 1 ? OPQ_STOP_DISCARD : OPQ_STOP_DRAIN;
		opq_queue *q = make_queue(iter % 3 == 0 ? 16 : 0);
		memset(ops, 0, P * N * sizeof(*ops));
		for (long i = 0; i < P * N; i++)
			ck_assert_int_eq(opq_op_init(&ops[i].op, rop_perform, rop_discard), 0);
		ck_assert_int_eq(opq_queue_start(q, 2), 0);
		pthread_t th[P];
		struct rproducer pr[P];
		for (int i = 0; i < P; i++) {
			pr[i] = (struct rproducer){q, ops + i * N, N};
			pthread_create(&th[i], NULL, rproduce, &pr[i]);
		}
		/* Stop once some work went through, while producers still run. */
		T_WAIT_UNTIL(stats_of(q).completed >= (uint64_t)(iter * 20 % N));
		ck_assert_int_eq(opq_queue_stop(q, mode), 0);
		for (int i = 0; i < P; i++)
			pthread_join(th[i], NULL);
		long performed = 0, discarded = 0;
		for (long i = 0; i < P * N; i++) {
			int total = ops[i].performed + ops[i].discarded + ops[i].returned;
			ck_assert_msg(total == 1, "op %ld: performed %d discarded %d returned %d",
			              i, (int)ops[i].performed, (int)ops[i].discarded,
			              ops[i].returned);
			performed += ops[i].performed;
			discarded += ops[i].discarded;
		}
		if (mode == OPQ_STOP_DRAIN)
			ck_assert_int_eq(discarded, 0);
		opq_queue_stats st = stats_of(q);
		ck_assert_uint_eq(st.completed, performed);
		ck_assert_uint_eq(st.discarded, discarded);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
	}
	free(ops);
}
END_TEST

enum { P_RESIZE_OPS = 3000 };

/* Start, resize and stop race each other and enqueuers. */
static void *resize_loop(void *arg)
{
	opq_queue *q = arg;
	for (int i = 0; i < 50; i++) {
		int rc = opq_queue_set_runners(q, 1 + (unsigned)(i % 4));
		if (rc == ESRCH)
			break;
		ck_assert_int_eq(rc, 0);
	}
	return NULL;
}

START_TEST(test_stress_resize_races_stop)
{
	int iters = (int)t_scale(40);
	for (int iter = 0; iter < iters; iter++) {
		struct rop *ops = calloc(P_RESIZE_OPS, sizeof(*ops));
		for (long i = 0; i < P_RESIZE_OPS; i++)
			ck_assert_int_eq(opq_op_init(&ops[i].op, rop_perform, rop_discard), 0);
		opq_queue *q = make_queue(0);
		ck_assert_int_eq(opq_queue_start(q, 2), 0);
		pthread_t resizer, producer;
		struct rproducer pr = {q, ops, P_RESIZE_OPS};
		pthread_create(&producer, NULL, rproduce, &pr);
		pthread_create(&resizer, NULL, resize_loop, q);
		ck_assert_int_eq(opq_queue_stop(q, iter & 1), 0);
		pthread_join(resizer, NULL);
		pthread_join(producer, NULL);
		ck_assert_uint_eq(stats_of(q).runners, 0);
		for (long i = 0; i < P_RESIZE_OPS; i++)
			ck_assert_int_eq(ops[i].performed + ops[i].discarded + ops[i].returned, 1);
		ck_assert_int_eq(opq_queue_destroy(q), 0);
		free(ops);
	}
}
END_TEST

int main(void)
{
	Suite *s = suite_create("queue");
	TCase *tc = t_tcase(s, "api", 60);
	tcase_add_test(tc, test_attr);
	tcase_add_test(tc, test_create_destroy);
	tcase_add_test(tc, test_op_init_and_misc);
	tcase_add_test(tc, test_host_malloc_kept);
	tcase_add_test(tc, test_start_errors);
	tcase_add_test(tc, test_fifo_one_runner);
	tcase_add_test(tc, test_enqueue_errors);
	tcase_add_test(tc, test_fn_path);
	tcase_add_test(tc, test_bounded_try_and_timed);
	tcase_add_test(tc, test_blocked_enqueue_stop);
	tcase_add_test(tc, test_bounded_room_each_place);
	tcase_add_test(tc, test_bounded_no_wait_while_room);
	tcase_add_test(tc, test_stop_modes);
	tcase_add_test(tc, test_stop_discard_while_running);
	tcase_add_test(tc, test_stop_from_discard);
	tcase_add_test(tc, test_calls_from_destroy_discard);
	tcase_add_test(tc, test_blocked_producer_restart);
	tcase_add_test(tc, test_exit_hook_enqueue_full);
	tcase_add_test(tc, test_calls_from_inside);
	tcase_add_test(tc, test_enqueue_chain);
	tcase_add_test(tc, test_enqueue_full_from_runner);
	tcase_add_test(tc, test_stop_never_started);
	tcase_add_test(tc, test_restart);
	tcase_add_test(tc, test_cancel);
	tcase_add_test(tc, test_set_runners);
	tcase_add_test(tc, test_hooks_names_signals);
	tcase_add_test(tc, test_timer_thread_named);
	tcase_add_test(tc, test_stack_size);
	tcase_add_test(tc, test_wait_idle);
	tc = t_tcase(s, "stress", 300);
	tcase_add_test(tc, test_bounded_backpressure);
	tcase_add_test(tc, test_concurrent_stops);
	tcase_add_test(tc, test_enqueue_same_op_at_once);
	tcase_add_test(tc, test_stress_exactly_once);
	tcase_add_test(tc, test_stress_enqueue_races_stop);
	tcase_add_test(tc, test_stress_resize_races_stop);
	return t_run(s);
}
