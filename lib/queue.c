/*
 * queue.c: the operation queue. Runner threads take operations from one
 * doubly-linked FIFO guarded by q->mu.
 *
 * Invariants, all under q->mu:
 * - every operation handed to a successful enqueue is in exactly one place:
 *   the FIFO (state QUEUED), a runner's hands (TAKEN: performed exactly
 *   once), or a discard list being drained by stop/cancel/destroy;
 * - `alive` counts runners still in their loop, `threads` runner threads not
 *   yet finished (alive plus those running their exit hook); a runner leaves
 *   its loop when alive > target (shrink) or when the queue is stopping and
 *   the FIFO is empty;
 * - a condvar is signalled only when somebody waits on it (sleepers,
 *   space_waiters, idle_waiters count the waiters); a runner is woken only
 *   when the FIFO holds more operations than runners already awake and
 *   looking (spinning, or woken and not yet running): `sleepers` counts
 *   runners waiting and not yet signalled, `wakes` signals not yet consumed.
 *
 * Batches: a runner takes up to BATCH_MAX operations (its share of the FIFO:
 * queued / runners, rounded up) under one lock into the slots of its struct
 * runner, and performs them in FIFO order without the lock. An operation in
 * a slot is BATCHED; its slot's state says who has it: PENDING (nobody yet),
 * OWNER (the runner performs it), STOLEN (an idle runner took it over),
 * CANCELLED (opq_queue_cancel or a discarding stop took it). Every claim is a
 * compare-and-swap from PENDING, so exactly one party gets each operation;
 * only the winner touches the operation afterwards. Batched operations count
 * as `running` (stats report the PENDING ones as queued), and each party
 * that claims one takes it off `running` when it is done with it. BATCH_MAX
 * is large (1024) because a batch has a fixed cost, the lock and the queue's
 * cache lines moving between cores (about 1.5 us on the 2-core test
 * machines), that its operations share. So that a long batch does not
 * leave its operations waiting: a runner that finds the FIFO empty takes
 * over another runner's next operation, one at a time; and a runner about
 * to take a batch from the FIFO first looks at the others, and takes half of
 * what waits in the batch of one that has not moved since the last look
 * (blocked in one operation, or preempted) as its own batch, since those
 * operations are older than the FIFO's. Looks start at batch_first(): the
 * slots before a runner's `pos` and its `steal_pos` are claimed already.
 *
 * The inbox: an unbounded queue's enqueue takes no lock. It pushes the
 * operation (state INBOX) onto `inbox`, a lock-free LIFO stack, and whoever
 * holds q->mu next with a need to see the FIFO (a runner before each batch
 * it takes, cancel, stats, wait_idle, stop) moves the whole stack, reversed,
 * to the FIFO's tail: the FIFO order is the order of the successful pushes.
 * Runners move it every time, not only when the FIFO is empty: what was
 * pushed since the last batch is likely still in cache, while a stack left
 * to grow while a deep FIFO drains would be walked cold, and under the lock.
 * Stopping swaps in INBOX_CLOSED, which makes later pushes fail with
 * ESHUTDOWN. A runner about to sleep counts itself in `sleepers` and then
 * looks at the inbox once more; a producer pushes and then reads `sleepers`
 * (both sequentially consistent), so one of them sees the other: no
 * operation is left with every runner asleep. A producer names q in a
 * record of its own thread from before its push until after its last access
 * to q (plain stores: no read-modify-write of a shared counter); destroy
 * closes the inbox and then waits until no thread's record names q (see
 * pushers_wait).
 */
#define _GNU_SOURCE 1 /* pthread_setname_np */
#include "internal.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { ST_NEW, ST_RUNNING, ST_STOPPING, ST_STOPPED };

/*
 * opq_op.opq__state: IDLE after init, QUEUED in a FIFO, BATCHED in a runner's
 * slot, TAKEN by a runner. Accessed atomically: a runner marks an operation
 * TAKEN without the lock (see the batches above).
 */
enum { OP_IDLE = 0, OP_QUEUED = 0x7175, OP_BATCHED = 0x6261, OP_TAKEN = 0x7461, OP_INBOX = 0x6962 };

#define INBOX_CLOSED ((opq_op *)(uintptr_t)1)
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)

#define OP_STATE(op) __atomic_load_n(&(op)->opq__state, __ATOMIC_RELAXED)
#define OP_SET_STATE(op, st) __atomic_store_n(&(op)->opq__state, (st), __ATOMIC_RELAXED)

/* The most operations a runner takes at once, and its slots' states. */
#define BATCH_MAX OPQ__BATCH_MAX
enum { SLOT_PENDING = 1, SLOT_OWNER, SLOT_STOLEN, SLOT_CANCELLED };

struct slot {
	opq_op *op;
	atomic_int state;
};

/*
 * How long a runner that found nothing keeps looking before it sleeps, in
 * nanoseconds: long enough for a producer's next operation in a ping-pong,
 * short next to a futex wakeup's cost in CPU time.
 */
#ifndef OPQ_SPIN_NS
#define OPQ_SPIN_NS 10000
#endif
/*
 * Boxes of function-pointer operations are reused: runners push the boxes of
 * the operations they performed onto their queue's `spare` stack (up to
 * SPARE_MAX), a producer that has none takes that whole stack into a cache
 * of its own thread (up to TLS_BOXES_MAX; freed when the thread exits).
 */
#define SPARE_MAX 65536
#define TLS_BOXES_MAX 4096

struct opq_queue_attr {
	size_t capacity;
	char name[OPQ_NAME_MAX + 1];
	opq_runner_hook *on_start;
	opq_runner_hook *on_exit;
	void *hook_arg;
};

struct runner {
	opq_queue *q;
	struct runner *next;
	pthread_t thread;
	unsigned index;
	bool finished;
	unsigned nslots; /* slots of the current batch, under q->mu */
	atomic_uint pos; /* the slot it is at, written by this runner alone */
	/* Under q->mu: slots before steal_pos are claimed too; batches taken,
	 * and what the last look at this runner saw (see take_over_stuck). */
	unsigned steal_pos, batches, seen_batches, seen_pos;
	/* Under q->mu: the CPU it took its last batch on (-1: none yet), and
	 * when it may look at stepping aside next (see step_aside); its
	 * thread id, set before it first takes q->mu. */
	int cpu;
	int64_t aside_at;
	pid_t tid;
	struct slot slots[BATCH_MAX];
};

struct opq_queue {
	pthread_mutex_t mu;
	pthread_cond_t work;	 /* runners: an operation is queued, or leave */
	pthread_cond_t space;	 /* producers: room in a bounded FIFO, or stop */
	pthread_cond_t idle;	 /* wait_idle: nothing queued, nothing running */
	pthread_cond_t change;	 /* start/stop: runners started, finished, stop done */
	opq_op *head, *tail;
	size_t queued;
	size_t capacity;
	unsigned running;
	unsigned wakes;		 /* signals on work not yet consumed */
	unsigned space_waiters;
	unsigned space_woken;	 /* of them, signalled and not yet back (space_made) */
	unsigned idle_waiters;
	unsigned callers;	 /* threads blocked in a call on q: destroy is EBUSY */
	unsigned target;	 /* runners wanted */
	unsigned alive;		 /* runners in their loop */
	unsigned threads;	 /* runner threads not yet finished */
	unsigned spawning;	 /* calls creating runner threads right now */
	unsigned unstarted;	 /* runners created that have not run their start hook */
	unsigned stuck_runners;	 /* runners of q blocked in enqueue on a full FIFO */
	unsigned reaping;	 /* calls joining finished runners right now */
	unsigned next_index;
	int state;
	bool timer_ref;		 /* holds a timer thread reference (opq__queue_timer_ref) */
	bool destroying;	 /* opq_queue_destroy is discarding what was queued */
	pthread_t stop_leader;	 /* the thread leading the stop in progress (ST_STOPPING) */
	uint64_t stops;		 /* completed stops: concurrent stoppers wait for it to move */
	struct runner *runners;	 /* every runner not yet joined */
	uint64_t completed, discarded, cancelled, high_water, asides;
	struct opq_queue_attr attr;

	/*
	 * Written by producers without the lock; then fields producers read
	 * without the lock, seldom written. The padding keeps each group off
	 * the cache lines of the others (the struct comes from calloc, so
	 * it is not aligned to a line: 64 bytes of padding on each side).
	 */
	char pad0_[64];
	opq_op *inbox; /* lock-free pushes of unbounded enqueues (see above) */
	char pad1_[64];
	unsigned sleepers;  /* runners waiting on work, not yet signalled */
	unsigned spinning;  /* runners looking at the FIFO before sleeping */
	size_t capacity_ro; /* = capacity, for the lock-free path */
	char pad2_[64];
	opq_op *spare;	 /* boxes for reuse (lock-free stack, by opq__next) */
	unsigned nspare; /* about how many */
	char pad3_[64];
};

/*
 * A function-pointer operation boxed by the queue: one cache line on LP64.
 * A box is told from a caller's operation by op.perform == box_perform; its
 * op.discard holds the caller's discard function (an opq_fn, converted),
 * so every discard goes through op_discard().
 */
struct box {
	opq_op op;
	opq_fn *fn;
	void *arg;
};

/*
 * Boxes are carved, in order, from slabs that a thread allocates for itself.
 * A slab is 1 to SLAB_CHUNKS_MAX chunks of CHUNK_SIZE bytes, aligned to
 * CHUNK_SIZE. Each chunk is a header line and then CHUNK_BOXES boxes: a box
 * finds its chunk by masking its address, and the chunk's header names the
 * slab's first chunk, whose header holds `live`, the boxes of the slab not
 * yet released plus those not yet carved; the last release frees the slab.
 *
 * A thread's slabs grow: one that carved its last slab at more than a box
 * per SLAB_GROW_NS / CHUNK_BOXES gets one twice as large next (up to
 * SLAB_CHUNKS_MAX chunks), others get one chunk. A burst of enqueues then
 * costs one allocation per SLAB_CHUNKS_MAX chunks, where allocating and
 * freeing a chunk at a time cost the burst of bench/RESULTS.md several ns
 * per operation; a thread that enqueues now and then holds one chunk.
 */
#define CHUNK_SIZE OPQ__CHUNK_SIZE
#define CHUNK_HEADER 64
#define CHUNK_BOXES ((CHUNK_SIZE - CHUNK_HEADER) / sizeof(struct box))
_Static_assert(CHUNK_BOXES == OPQ__CHUNK_BOXES, "internal.h counts boxes as queue.c does");
#define SLAB_CHUNKS_MAX 16
#define SLAB_GROW_NS 1000000
struct chunk {
	union {
		struct {
			struct chunk *slab; /* the slab's first chunk */
			atomic_uint live;   /* in the first chunk only */
			unsigned chunks;    /* in the first chunk only: the slab's size */
		} h;
		char line_[CHUNK_HEADER];
	};
	struct box boxes[CHUNK_BOXES];
};
_Static_assert(sizeof(struct chunk) <= CHUNK_SIZE, "a chunk fits its alignment");

/* The first chunk of the slab that holds b. */
static struct chunk *box_slab(struct box *b)
{
	return ((struct chunk *)(void *)((uintptr_t)b & ~(uintptr_t)(CHUNK_SIZE - 1)))->h.slab;
}

/* Release n boxes (or boxes not carved) of slab s: the last release frees it. */
static void slab_release(struct chunk *s, unsigned n)
{
	if (atomic_fetch_sub_explicit(&s->h.live, n, memory_order_acq_rel) == n)
		opq__slab_free(s, (size_t)s->h.chunks * CHUNK_SIZE, CHUNK_SIZE);
}

/* A slab of `chunks` chunks whose first chunk's header is written; NULL without memory. */
static struct chunk *slab_new(unsigned chunks)
{
	struct chunk *s = opq__slab_alloc((size_t)chunks * CHUNK_SIZE, CHUNK_SIZE);
	if (s) {
		s->h.slab = s;
		atomic_init(&s->h.live, (unsigned)(chunks * CHUNK_BOXES));
		s->h.chunks = chunks;
	}
	return s;
}

static void box_release(struct box *b)
{
	slab_release(box_slab(b), 1);
}

static _Thread_local opq_queue *tls_queue;
/* Set while a runner runs its start hook: start and resize wait for it. */
static _Thread_local bool tls_in_start_hook;
static _Thread_local bool tls_in_exit_hook; /* out of `alive`: performs nothing more */

/* ---- attributes ---------------------------------------------------------- */

static const struct opq_queue_attr default_attr = { .capacity = 0, .name = "opq" };

OPQ_EXPORT int opq_queue_attr_create(opq_queue_attr **attrp)
{
	if (!attrp)
		return EINVAL;
	opq_queue_attr *a = opq__malloc(sizeof(*a));
	if (!a)
		return ENOMEM;
	*a = default_attr;
	*attrp = a;
	return 0;
}

OPQ_EXPORT void opq_queue_attr_destroy(opq_queue_attr *attr)
{
	opq__free(attr);
}

OPQ_EXPORT int opq_queue_attr_set_capacity(opq_queue_attr *attr, size_t capacity)
{
	if (!attr)
		return EINVAL;
	attr->capacity = capacity;
	return 0;
}

OPQ_EXPORT int opq_queue_attr_get_capacity(const opq_queue_attr *attr, size_t *capacity)
{
	if (!attr || !capacity)
		return EINVAL;
	*capacity = attr->capacity;
	return 0;
}

OPQ_EXPORT int opq_queue_attr_set_name(opq_queue_attr *attr, const char *prefix)
{
	if (!attr || !prefix || !*prefix || strlen(prefix) > OPQ_NAME_MAX)
		return EINVAL;
	strcpy(attr->name, prefix);
	return 0;
}

OPQ_EXPORT int opq_queue_attr_set_hooks(opq_queue_attr *attr, opq_runner_hook *on_start,
					opq_runner_hook *on_exit, void *arg)
{
	if (!attr)
		return EINVAL;
	attr->on_start = on_start;
	attr->on_exit = on_exit;
	attr->hook_arg = arg;
	return 0;
}

/* ---- the FIFO ------------------------------------------------------------ */

OPQ_EXPORT int opq_op_init(opq_op *op, opq_op_fn *perform, opq_op_fn *discard)
{
	if (!op || !perform)
		return EINVAL;
	memset(op, 0, sizeof(*op));
	op->perform = perform;
	op->discard = discard;
	return 0;
}

static void fifo_push(opq_queue *q, opq_op *op)
{
	op->opq__next = NULL;
	op->opq__prev = q->tail;
	op->opq__owner = q;
	OP_SET_STATE(op, OP_QUEUED);
	if (q->tail)
		q->tail->opq__next = op;
	else
		__atomic_store_n(&q->head, op, __ATOMIC_RELAXED);
	q->tail = op;
	if (++q->queued > q->high_water)
		q->high_water = q->queued;
}

static void fifo_unlink(opq_queue *q, opq_op *op, uintptr_t state)
{
	if (op->opq__prev)
		op->opq__prev->opq__next = op->opq__next;
	else
		__atomic_store_n(&q->head, op->opq__next, __ATOMIC_RELAXED);
	if (op->opq__next)
		op->opq__next->opq__prev = op->opq__prev;
	else
		q->tail = op->opq__prev;
	op->opq__next = op->opq__prev = NULL;
	op->opq__owner = NULL;
	OP_SET_STATE(op, state);
	q->queued--;
}

/*
 * Append an inbox stack (newest first, linked by opq__next) to the FIFO,
 * oldest first. One pass, newest to oldest, touching each operation once:
 * reversing the links makes the FIFO's next links, and the op visited
 * before (the next newer one) gets its prev link. Under q->mu.
 */
static void fifo_push_stack(opq_queue *q, opq_op *stack)
{
	if (!stack)
		return;
	opq_op *newest = stack, *list = NULL;
	size_t n = 0;
	while (stack) {
		opq_op *older = stack->opq__next;
		stack->opq__next = list;
		if (list)
			list->opq__prev = stack;
		stack->opq__owner = q;
		OP_SET_STATE(stack, OP_QUEUED);
		list = stack;
		stack = older;
		n++;
	}
	list->opq__prev = q->tail; /* list: the oldest */
	if (q->tail)
		q->tail->opq__next = list;
	else
		__atomic_store_n(&q->head, list, __ATOMIC_RELAXED);
	q->tail = newest;
	q->queued += n;
	if (q->queued > q->high_water)
		q->high_water = q->queued;
}

/* Move the inbox to the FIFO. Under q->mu. */
static void inbox_drain(opq_queue *q)
{
	opq_op *top = __atomic_load_n(&q->inbox, __ATOMIC_ACQUIRE);
	if (!top || top == INBOX_CLOSED)
		return;
	fifo_push_stack(q, __atomic_exchange_n(&q->inbox, NULL, __ATOMIC_SEQ_CST));
}

/* Close the inbox (later pushes fail) and move what it held to the FIFO. Under q->mu. */
static void inbox_close(opq_queue *q)
{
	opq_op *top = __atomic_exchange_n(&q->inbox, INBOX_CLOSED, __ATOMIC_SEQ_CST);
	if (top != INBOX_CLOSED)
		fifo_push_stack(q, top);
}

/*
 * Backpressure: producers blocked on a full bounded FIFO are woken when it
 * has drained to half its capacity, as many as there are places then, and
 * not one for each operation taken. A wakeup per operation costs two context
 * switches, and they come out of the runners' time: with producers faster
 * than the runners, the queue ran at 17% of the no-queue ceiling (see
 * bench/RESULTS.md). So that places left free above half, when the runners
 * stop taking (all blocked in their operations), are not lost, a blocked
 * producer also looks again every ROOM_LOOK_NS. Under q->mu.
 */
#define ROOM_LOOK_NS 10000000
static void space_made(opq_queue *q)
{
	if (q->space_woken >= q->space_waiters || q->queued > q->capacity / 2)
		return;
	/* Wake one per free place, less those signalled already: each take
	 * below half would otherwise signal all over again. */
	size_t room = q->capacity - q->queued;
	if (room >= q->space_waiters) {
		OPQ_CHECK(pthread_cond_broadcast(&q->space));
		q->space_woken = q->space_waiters;
		return;
	}
	for (; q->space_woken < room; q->space_woken++)
		OPQ_CHECK(pthread_cond_signal(&q->space));
}

/* After the FIFO shrank or an operation finished: wake who waits for that. */
static void fifo_shrunk(opq_queue *q)
{
	space_made(q);
	if (q->idle_waiters && q->queued == 0 && q->running == 0)
		OPQ_CHECK(pthread_cond_broadcast(&q->idle));
}

/*
 * Take the whole FIFO out as a singly linked list (opq__next), marking each
 * operation discarded. Called under q->mu; the caller calls discard_list()
 * after unlocking.
 */
static opq_op *fifo_take_all(opq_queue *q)
{
	opq_op *list = q->head;
	for (opq_op *op = list; op; op = op->opq__next) {
		op->opq__owner = NULL;
		OP_SET_STATE(op, OP_IDLE);
	}
	q->discarded += q->queued;
	__atomic_store_n(&q->head, NULL, __ATOMIC_RELAXED);
	q->tail = NULL;
	q->queued = 0;
	fifo_shrunk(q);
	return list;
}

static void box_perform(opq_op *op);
static void box_discard(opq_op *op);

/* Call op's discard callback, if it has one (a box: the caller's discard_fn). */
static void op_discard(opq_op *op)
{
	if (op->perform == box_perform)
		box_discard(op);
	else if (op->discard)
		op->discard(op);
}

static void discard_list(opq_op *op)
{
	while (op) {
		opq_op *next = op->opq__next;
		op->opq__next = op->opq__prev = NULL;
		op_discard(op);
		op = next;
	}
}

/* ---- runners ------------------------------------------------------------- */

static void runner_name(opq_queue *q, unsigned index)
{
#if HAVE_DECL_PTHREAD_SETNAME_NP
	char name[32];
	snprintf(name, sizeof(name), "%s/%u", q->attr.name, index);
	name[15] = '\0'; /* the kernel's limit */
	pthread_setname_np(pthread_self(), name);
#else
	(void)q;
	(void)index;
#endif
}

/* Wake one sleeping runner, or all of them. Under q->mu. */
static void wake_one(opq_queue *q)
{
	if (q->sleepers) {
		STORE(q->sleepers, q->sleepers - 1);
		q->wakes++;
		OPQ_CHECK(pthread_cond_signal(&q->work));
	}
}

static void wake_all(opq_queue *q)
{
	q->wakes += q->sleepers;
	STORE(q->sleepers, 0);
	OPQ_CHECK(pthread_cond_broadcast(&q->work));
}

/*
 * Where runners run, for stepping aside (see should_step_aside): where the
 * system lacks the calls, runners never step aside.
 */
#if HAVE_DECL_SCHED_GETCPU && HAVE_DECL_SCHED_GETAFFINITY && HAVE_DECL_SCHED_SETAFFINITY
#define CAN_STEP_ASIDE 1

static int this_cpu(void)
{
	return sched_getcpu();
}

static pid_t this_tid(void)
{
	return (pid_t)syscall(SYS_gettid);
}

/*
 * Is thread `tid` of this process runnable and queued on `cpu`? From its
 * /proc stat line: the state after the parenthesized name, and field 39,
 * the CPU it is on. False when that cannot be read.
 */
static bool runnable_on(pid_t tid, int cpu)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	char *p = strrchr(buf, ')');
	if (!p || p[1] != ' ' || p[2] != 'R')
		return false;
	/* p + 2 is field 3; skip to field 39. */
	p += 2;
	for (int field = 3; field < 39 && p; field++) {
		p = strchr(p, ' ');
		if (p)
			p++;
	}
	return p && atoi(p) == cpu;
}
#else
#define CAN_STEP_ASIDE 0
static int this_cpu(void)
{
	return -1;
}

static pid_t this_tid(void)
{
	return 0;
}
#endif

/* Put op into slot i of r's next batch. Under q->mu. */
static void batch_add(struct runner *r, unsigned i, opq_op *op)
{
	op->opq__next = NULL;
	op->opq__prev = (opq_op *)(void *)&r->slots[i];
	OP_SET_STATE(op, OP_BATCHED);
	r->slots[i].op = op;
	atomic_store_explicit(&r->slots[i].state, SLOT_PENDING, memory_order_relaxed);
}

/* The first slot of r's batch that may still be PENDING. Under q->mu. */
static unsigned batch_first(struct runner *r)
{
	unsigned pos = atomic_load_explicit(&r->pos, memory_order_relaxed);
	return pos > r->steal_pos ? pos : r->steal_pos;
}

/* r's slots 0..n-1 are its new batch. Under q->mu. */
static void batch_begin(struct runner *r, unsigned n)
{
	r->cpu = this_cpu(); /* for the others' look (see should_step_aside) */
	r->nslots = n;
	atomic_store_explicit(&r->pos, 0, memory_order_relaxed);
	r->steal_pos = 0;
	r->batches++;
}

/*
 * Claim the slots of every runner's batch still PENDING for a discarding
 * stop: the operations join `list` (to be discarded), in batch order, ahead
 * of it. Under q->mu.
 */
static opq_op *batches_take_all(opq_queue *q, opq_op *list)
{
	opq_op *head = NULL, **tailp = &head;
	for (struct runner *r = q->runners; r; r = r->next) {
		for (unsigned i = batch_first(r); i < r->nslots; i++) {
			int pending = SLOT_PENDING;
			if (!atomic_compare_exchange_strong(&r->slots[i].state, &pending,
							    SLOT_CANCELLED))
				continue;
			opq_op *op = r->slots[i].op;
			op->opq__owner = NULL;
			op->opq__prev = NULL;
			OP_SET_STATE(op, OP_IDLE);
			q->running--;
			q->discarded++;
			*tailp = op;
			tailp = &op->opq__next;
		}
	}
	*tailp = list;
	return head;
}

/* Take this runner's share of the FIFO into its slots. Under q->mu. */
static void take_batch(opq_queue *q, struct runner *r)
{
	unsigned alive = q->alive ? q->alive : 1;
	size_t n = (q->queued + alive - 1) / alive;
	if (n > BATCH_MAX)
		n = BATCH_MAX;
	/* A bounded queue's capacity counts what has not started: there a
	 * runner takes one operation at a time, so none waits outside the FIFO
	 * uncounted. */
	if (n == 0 || q->capacity)
		n = 1;
	/* Detach the first n from the head in one walk: each operation's
	 * fields are written once (opq__prev points to its slot), and only
	 * the new head's prev link is cleared. */
	opq_op *op = q->head;
	for (unsigned i = 0; i < n; i++) {
		opq_op *next = op->opq__next;
		batch_add(r, i, op);
		op = next;
	}
	__atomic_store_n(&q->head, op, __ATOMIC_RELAXED);
	if (op)
		op->opq__prev = NULL;
	else
		q->tail = NULL;
	q->queued -= n;
	batch_begin(r, (unsigned)n);
	q->running += n;
	space_made(q);
}

/*
 * Perform the batch without the lock: each PENDING slot is claimed first,
 * so that an operation cancelled or stolen meanwhile is left alone. The
 * boxes of function-pointer operations go to *boxes for reuse. Returns how
 * many operations this runner performed.
 */
static size_t run_batch(struct runner *r, opq_op **boxes, opq_op **last, unsigned *nboxes)
{
	size_t performed = 0;
	for (unsigned i = 0; i < r->nslots; i++) {
		if (i + 1 < r->nslots)
			__builtin_prefetch(r->slots[i + 1].op);
		atomic_store_explicit(&r->pos, i, memory_order_relaxed);
		int pending = SLOT_PENDING;
		if (!atomic_compare_exchange_strong_explicit(&r->slots[i].state, &pending, SLOT_OWNER,
							     memory_order_acquire,
							     memory_order_relaxed))
			continue;
		opq_op *op = r->slots[i].op;
		OP_SET_STATE(op, OP_TAKEN);
		performed++;
		if (op->perform == box_perform) {
			struct box *b = OPQ_CONTAINER_OF(op, struct box, op);
			opq_fn *fn = b->fn;
			void *arg = b->arg;
			op->opq__next = *boxes;
			if (!*boxes)
				*last = op;
			*boxes = op;
			++*nboxes;
			fn(arg);
		} else {
			op->perform(op); /* op may be freed from here on */
		}
	}
	return performed;
}

/*
 * Claim a PENDING slot of another runner's batch for this one. Look first: a
 * failed compare-and-swap still takes the slot's cache line from the runner
 * that owns it.
 */
static bool slot_steal(struct slot *s)
{
	int pending = SLOT_PENDING;
	return atomic_load_explicit(&s->state, memory_order_relaxed) == SLOT_PENDING &&
	       atomic_compare_exchange_strong(&s->state, &pending, SLOT_STOLEN);
}

/*
 * Take over the first PENDING operation of r's batch. The slots before r's
 * position and before steal_pos are claimed already; the next look starts
 * after the one taken (r may be blocked: a long batch taken over one
 * operation at a time is not scanned again for each). Under q->mu.
 */
static opq_op *steal_from(struct runner *r)
{
	for (unsigned i = batch_first(r); i < r->nslots; i++) {
		if (slot_steal(&r->slots[i])) {
			r->steal_pos = i + 1;
			opq_op *op = r->slots[i].op;
			OP_SET_STATE(op, OP_TAKEN);
			return op;
		}
	}
	return NULL;
}

/* For a runner that found the FIFO empty: another runner's next operation. Under q->mu. */
static opq_op *steal(opq_queue *q, struct runner *self)
{
	for (struct runner *r = q->runners; r; r = r->next) {
		opq_op *op;
		if (r != self && (op = steal_from(r)))
			return op;
	}
	return NULL;
}

/*
 * Stepping aside. With no more runners than CPUs, two runners should not
 * share a CPU while another CPU idles, but the kernel leaves them so for a
 * while: a runner woken while every CPU was busy (say, with the producer)
 * lands next to another runner, and when the producer goes to sleep its CPU
 * stays idle until a load balance moves one of them: on the 2-CPU machines
 * measured, up to 28 ms later. A runner that slept a moment to be placed
 * anew was mostly put back on its busy CPU (bench/RESULTS.md). So a runner
 * about to take a batch that finds another runner stuck (not moved since
 * the last look, with work waiting in its batch) that took its batch on
 * this runner's CPU, and that the kernel shows runnable on this CPU (so
 * preempted by this one, not asleep in an operation), moves itself to a CPU
 * where no runner of the queue works: it narrows its CPU affinity to those
 * CPUs and at once restores the mask it had. It looks into this at most once
 * every ASIDE_WAIT: the look makes system calls.
 */
#define ASIDE_WAIT 1000000

/*
 * Should self, about to take a batch, look into stepping aside for `stuck`
 * (see above)? The checks that need no system call. Under q->mu.
 */
static bool should_step_aside(struct runner *self, struct runner *stuck)
{
	/* Work waits in stuck's batch if the slot it is at, or the next, is PENDING. */
	unsigned i = batch_first(stuck);
	bool waiting = false;
	for (unsigned k = i; k < stuck->nslots && k < i + 2 && !waiting; k++)
		waiting = atomic_load_explicit(&stuck->slots[k].state, memory_order_relaxed) ==
			  SLOT_PENDING;
	if (!waiting || stuck->cpu < 0 || this_cpu() != stuck->cpu)
		return false;
	int64_t now = opq__mono_ns();
	if (now < self->aside_at)
		return false;
	self->aside_at = now + ASIDE_WAIT;
	return true;
}

/*
 * The rest of the look, and the move (see above). Called under q->mu;
 * drops it meanwhile.
 */
static void step_aside(opq_queue *q, struct runner *stuck)
{
#if CAN_STEP_ASIDE
	cpu_set_t busy, mine;
	CPU_ZERO(&busy);
	for (struct runner *r = q->runners; r; r = r->next)
		if (r->nslots && r->cpu >= 0 && r->cpu < CPU_SETSIZE)
			CPU_SET(r->cpu, &busy);
	unsigned alive = q->alive;
	pid_t tid = stuck->tid;
	int cpu = stuck->cpu;
	bool moved = false;
	opq__unlock(&q->mu);
	if (!sched_getaffinity(0, sizeof(mine), &mine) && (unsigned)CPU_COUNT(&mine) >= alive &&
	    runnable_on(tid, cpu)) {
		cpu_set_t there;
		CPU_XOR(&there, &mine, &busy);
		CPU_AND(&there, &there, &mine); /* mine less busy: cpu is in busy */
		moved = CPU_COUNT(&there) && !sched_setaffinity(0, sizeof(there), &there);
		if (moved) /* fails only if the cpuset changed meanwhile */
			(void)sched_setaffinity(0, sizeof(mine), &mine);
	}
	opq__lock(&q->mu);
	q->asides += moved;
#else
	(void)q;
	(void)stuck;
#endif
}

/*
 * For a runner about to take a batch from the FIFO: if another runner has
 * not moved since the last look at it (by any runner), it is blocked in one
 * operation (or preempted), and what waits behind it in its batch is older
 * than anything in the FIFO. Take half of that over as this runner's batch
 * (the operations stay counted as running): TOOK. Or, if that runner is
 * stuck on this one's CPU, look into stepping aside first (see above):
 * ASIDE, and q->mu was dropped meanwhile. Under q->mu.
 */
enum take_over { TOOK_NONE, TOOK, ASIDE };
static enum take_over take_over_stuck(opq_queue *q, struct runner *self)
{
	for (struct runner *r = q->runners; r; r = r->next) {
		if (r == self)
			continue;
		unsigned pos = atomic_load_explicit(&r->pos, memory_order_relaxed);
		bool still = r->batches == r->seen_batches && pos == r->seen_pos;
		r->seen_batches = r->batches;
		r->seen_pos = pos;
		unsigned i = batch_first(r);
		if (!still || i >= r->nslots)
			continue;
		if (should_step_aside(self, r)) {
			step_aside(q, r);
			return ASIDE;
		}
		unsigned want = (r->nslots - i + 1) / 2, n = 0;
		for (; i < r->nslots && n < want; i++)
			if (slot_steal(&r->slots[i]))
				batch_add(self, n++, r->slots[i].op);
		r->steal_pos = i;
		if (n) {
			batch_begin(self, n);
			return TOOK;
		}
	}
	return TOOK_NONE;
}

/* Look at the FIFO for a while without the lock: true if it has work. */
static bool spin(opq_queue *q)
{
	int64_t end = opq__mono_ns() + OPQ_SPIN_NS;
	for (unsigned i = 1;; i++) {
		if (i % 32 == 0 && opq__mono_ns() >= end)
			return false;
		if (__atomic_load_n(&q->head, __ATOMIC_RELAXED))
			return true;
		opq_op *top = __atomic_load_n(&q->inbox, __ATOMIC_RELAXED);
		if (top && top != INBOX_CLOSED)
			return true;
#if defined(__x86_64__) || defined(__i386__)
		__builtin_ia32_pause();
#elif defined(__aarch64__)
		__asm__ __volatile__("yield");
#endif
	}
}

/* Release a list of boxes, with one release per run of boxes of the same slab. */
static void free_boxes(opq_op *op)
{
	while (op) {
		struct chunk *s = box_slab(OPQ_CONTAINER_OF(op, struct box, op));
		unsigned n = 0;
		do {
			op = op->opq__next;
			n++;
		} while (op && box_slab(OPQ_CONTAINER_OF(op, struct box, op)) == s);
		slab_release(s, n);
	}
}

/*
 * n operations taken as running were performed: count them, and wake
 * wait_idle if that left the queue idle (an inbox not yet drained counts
 * as work). Under q->mu.
 */
static void performed_done(opq_queue *q, size_t n)
{
	q->running -= n;
	q->completed += n;
	if (q->idle_waiters && q->queued == 0 && q->running == 0) {
		inbox_drain(q);
		if (q->queued == 0)
			OPQ_CHECK(pthread_cond_broadcast(&q->idle));
	}
}

/* Give the boxes first..last back to q's spare stack, or free them if it is full. */
static void spare_push(opq_queue *q, opq_op *first, opq_op *last, unsigned n)
{
	if (__atomic_load_n(&q->nspare, __ATOMIC_RELAXED) >= SPARE_MAX) {
		free_boxes(first);
		return;
	}
	opq_op *top = __atomic_load_n(&q->spare, __ATOMIC_RELAXED);
	do
		last->opq__next = top;
	while (!__atomic_compare_exchange_n(&q->spare, &top, first, true, __ATOMIC_RELEASE,
					    __ATOMIC_RELAXED));
	__atomic_fetch_add(&q->nspare, n, __ATOMIC_RELAXED);
}

static void *runner_main(void *arg)
{
	struct runner *r = arg;
	opq_queue *q = r->q;
	bool spun = false;

	tls_queue = q;
	r->tid = this_tid();
	runner_name(q, r->index);
	if (q->attr.on_start) {
		tls_in_start_hook = true;
		q->attr.on_start(q->attr.hook_arg, r->index);
		tls_in_start_hook = false;
	}

	opq__lock(&q->mu);
	if (--q->unstarted == 0)
		OPQ_CHECK(pthread_cond_broadcast(&q->change));
	for (;;) {
		if (q->alive > q->target)
			break;
		inbox_drain(q); /* every time: see the inbox above */
		if (q->head) {
			enum take_over t = take_over_stuck(q, r);
			if (t == ASIDE)
				continue;
			if (t == TOOK_NONE)
				take_batch(q, r);
			/* Work left behind: a producer that saw a runner spinning
			 * (this one) woke nobody, so wake the next runner here
			 * (a chain, not a herd), or it waits for our whole batch. */
			if (q->head && q->sleepers && q->queued > q->spinning + q->wakes)
				wake_one(q);
			opq__unlock(&q->mu);

			opq_op *boxes = NULL, *last = NULL;
			unsigned nboxes = 0;
			size_t performed = run_batch(r, &boxes, &last, &nboxes);
			if (boxes)
				spare_push(q, boxes, last, nboxes);

			opq__lock(&q->mu);
			r->nslots = 0;
			performed_done(q, performed);
			spun = false;
			continue;
		}
		opq_op *op = steal(q, r);
		if (op) {
			opq__unlock(&q->mu);
			op->perform(op); /* op may be freed from here on */
			opq__lock(&q->mu);
			performed_done(q, 1);
			continue;
		}
		if (q->state == ST_STOPPING)
			break;
		if (!spun) {
			/* Look again for a moment: a runner awake is cheaper than a wakeup. */
			spun = true;
			STORE(q->spinning, q->spinning + 1);
			opq__unlock(&q->mu);
			spin(q);
			opq__lock(&q->mu);
			STORE(q->spinning, q->spinning - 1);
			continue;
		}
		spun = false;
		STORE(q->sleepers, q->sleepers + 1);
		inbox_drain(q); /* after counting in sleepers: see the inbox above */
		if (q->head) {
			/* Nobody signalled us: that takes q->mu, which we held. */
			STORE(q->sleepers, q->sleepers - 1);
			continue;
		}
		OPQ_CHECK(pthread_cond_wait(&q->work, &q->mu));
		if (q->wakes)
			q->wakes--;
		else
			STORE(q->sleepers, q->sleepers - 1); /* woken without a signal of its own */
	}
	q->alive--;
	opq__unlock(&q->mu);

	if (q->attr.on_exit) {
		tls_in_exit_hook = true;
		q->attr.on_exit(q->attr.hook_arg, r->index);
		tls_in_exit_hook = false;
	}

	opq__lock(&q->mu);
	r->finished = true;
	q->threads--;
	OPQ_CHECK(pthread_cond_broadcast(&q->change));
	opq__unlock(&q->mu);
	tls_queue = NULL;
	return NULL;
}

/*
 * Join and free the runners that have finished their loop and exit hook.
 * Called with q->mu held; drops it while joining.
 */
static void reap(opq_queue *q)
{
	struct runner *done = NULL, **pp = &q->runners;
	while (*pp) {
		struct runner *r = *pp;
		if (r->finished) {
			*pp = r->next;
			r->next = done;
			done = r;
		} else {
			pp = &r->next;
		}
	}
	if (!done)
		return;
	q->reaping++;
	opq__unlock(&q->mu);
	while (done) {
		struct runner *next = done->next;
		OPQ_CHECK(pthread_join(done->thread, NULL));
		opq__free(done);
		done = next;
	}
	opq__lock(&q->mu);
	q->reaping--;
	OPQ_CHECK(pthread_cond_broadcast(&q->change));
}

/*
 * Start `count` more runners and wait until each has run its start hook.
 * Called with q->mu held; drops it while creating threads. On failure the
 * runners made so far keep running and the error is returned.
 */
static int spawn(opq_queue *q, unsigned count)
{
	unsigned made = 0;
	int rc = 0;
	sigset_t all, old;

	q->spawning++;
	opq__unlock(&q->mu);
	/* Runners block every signal: the daemon's own threads handle them. */
	sigfillset(&all);
	OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &all, &old));
	for (; made < count; made++) {
		struct runner *r = opq__calloc(1, sizeof(*r));
		if (!r) {
			rc = ENOMEM;
			break;
		}
		r->q = q;
		r->cpu = -1;
		opq__lock(&q->mu);
		r->index = q->next_index++;
		q->alive++;
		q->threads++;
		q->unstarted++;
		rc = pthread_create(&r->thread, NULL, runner_main, r);
		if (rc) {
			q->alive--;
			q->threads--;
			q->unstarted--;
			opq__unlock(&q->mu);
			opq__free(r);
			break;
		}
		r->next = q->runners;
		q->runners = r;
		opq__unlock(&q->mu);
	}
	OPQ_CHECK(pthread_sigmask(SIG_SETMASK, &old, NULL));
	opq__lock(&q->mu);
	while (q->unstarted)
		OPQ_CHECK(pthread_cond_wait(&q->change, &q->mu));
	q->spawning--;
	OPQ_CHECK(pthread_cond_broadcast(&q->change));
	return rc;
}

/* Wait until no runner is left and no call creates or joins one; join all. */
static void wait_runners_gone(opq_queue *q)
{
	for (;;) {
		if (q->threads == 0 && q->spawning == 0 && q->reaping == 0 && !q->runners)
			return;
		if (q->runners)
			reap(q);
		if (q->threads || q->spawning || q->reaping)
			OPQ_CHECK(pthread_cond_wait(&q->change, &q->mu));
	}
}

/* ---- lifecycle ----------------------------------------------------------- */

/*
 * The queue's mutex is taken by producers and runners for a few dozen
 * instructions at a time: an adaptive mutex (glibc) spins a little before
 * it sleeps in the kernel, which saves most futex calls under contention.
 */
static int queue_mutex_init(pthread_mutex_t *mu)
{
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP) && !defined(OPQ_DEBUG)
	pthread_mutexattr_t ma;
	int rc = pthread_mutexattr_init(&ma);
	if (rc)
		return rc;
	pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
	rc = pthread_mutex_init(mu, &ma);
	pthread_mutexattr_destroy(&ma);
	return rc;
#else
	return opq__mutex_init(mu);
#endif
}

OPQ_EXPORT int opq_queue_create(opq_queue **qp, const opq_queue_attr *attr)
{
	if (!qp)
		return EINVAL;
	opq_queue *q = opq__calloc(1, sizeof(*q));
	if (!q)
		return ENOMEM;
	q->attr = attr ? *attr : default_attr;
	q->capacity = q->capacity_ro = q->attr.capacity;
	q->state = ST_NEW;

	int rc = queue_mutex_init(&q->mu);
	if (rc)
		goto fail_mu;
	if ((rc = opq__cond_init(&q->work)))
		goto fail_work;
	if ((rc = opq__cond_init(&q->space)))
		goto fail_space;
	if ((rc = opq__cond_init(&q->idle)))
		goto fail_idle;
	if ((rc = opq__cond_init(&q->change)))
		goto fail_change;
	*qp = q;
	return 0;

fail_change:
	pthread_cond_destroy(&q->idle);
fail_idle:
	pthread_cond_destroy(&q->space);
fail_space:
	pthread_cond_destroy(&q->work);
fail_work:
	pthread_mutex_destroy(&q->mu);
fail_mu:
	opq__free(q);
	return rc;
}

static void pushers_wait(opq_queue *q);

OPQ_EXPORT int opq_queue_destroy(opq_queue *q)
{
	if (!q)
		return 0;
	opq__lock(&q->mu);
	if (q->state == ST_RUNNING || q->state == ST_STOPPING || q->callers || q->threads ||
	    q->spawning || q->reaping || q->destroying) {
		opq__unlock(&q->mu);
		return EBUSY;
	}
	/* The discard callbacks below run without the lock and may call q:
	 * it takes nothing more (enqueue ESHUTDOWN, start and destroy EBUSY). */
	q->destroying = true;
	q->state = ST_STOPPED;
	inbox_close(q);
	opq__unlock(&q->mu);
	pushers_wait(q); /* producers that pushed before the close may still look at q */
	opq__lock(&q->mu);
	opq_op *list = fifo_take_all(q);
	opq_op *boxes = q->spare;
	q->spare = NULL;
	opq__unlock(&q->mu);
	discard_list(list);
	free_boxes(boxes);
	if (q->timer_ref)
		opq__timer_unref();

	pthread_cond_destroy(&q->change);
	pthread_cond_destroy(&q->idle);
	pthread_cond_destroy(&q->space);
	pthread_cond_destroy(&q->work);
	pthread_mutex_destroy(&q->mu);
	opq__free(q);
	return 0;
}

int opq__queue_timer_ref(opq_queue *q)
{
	int rc = 0;
	opq__lock(&q->mu); /* then the timer's own locks: it never takes q->mu with them */
	if (!q->timer_ref && (rc = opq__timer_ref()) == 0)
		q->timer_ref = true;
	opq__unlock(&q->mu);
	return rc;
}

OPQ_EXPORT int opq_queue_start(opq_queue *q, unsigned runners)
{
	if (!q || runners == 0)
		return EINVAL;
	opq__lock(&q->mu);
	if (q->state == ST_RUNNING || q->state == ST_STOPPING || q->destroying) {
		int rc = q->state == ST_RUNNING ? EALREADY : EBUSY;
		opq__unlock(&q->mu);
		return rc;
	}
	int prev = q->state;
	q->state = ST_RUNNING;
	opq_op *closed = INBOX_CLOSED;
	__atomic_compare_exchange_n(&q->inbox, &closed, NULL, false, __ATOMIC_SEQ_CST,
				    __ATOMIC_SEQ_CST); /* reopen after a stop */
	q->target = runners;
	q->next_index = 0;
	int rc = spawn(q, runners);
	if (rc && q->state == ST_RUNNING) {
		/* All or nothing: let the runners made so far go, and roll back. */
		q->target = 0;
		wake_all(q);
		wait_runners_gone(q);
		q->state = prev;
		if (prev == ST_STOPPED)
			inbox_close(q);
	}
	opq__unlock(&q->mu);
	return rc;
}

OPQ_EXPORT int opq_queue_set_runners(opq_queue *q, unsigned runners)
{
	if (!q || runners == 0)
		return EINVAL;
	if (tls_in_start_hook && tls_queue == q)
		return EDEADLK; /* spawn would wait for this very runner to start */
	opq__lock(&q->mu);
	/* target 0: a failed start is letting its runners go (it waits for
	 * them with q->mu dropped); new ones would keep it waiting. */
	if (q->state != ST_RUNNING || q->target == 0) {
		opq__unlock(&q->mu);
		return ESRCH;
	}
	q->callers++;
	q->target = runners;
	int rc = 0;
	if (q->alive < runners)
		rc = spawn(q, runners - q->alive);
	else if (q->alive > runners)
		wake_all(q);
	reap(q);
	q->callers--;
	opq__unlock(&q->mu);
	return rc;
}

OPQ_EXPORT int opq_queue_stop(opq_queue *q, int mode)
{
	if (!q || (mode != OPQ_STOP_DRAIN && mode != OPQ_STOP_DISCARD))
		return EINVAL;
	if (tls_queue == q)
		return EDEADLK;

	opq__lock(&q->mu);
	if (q->state == ST_STOPPED) {
		opq__unlock(&q->mu);
		return 0;
	}
	/* A discard callback of this thread's own stop: that stop cannot end
	 * before the callback returns. */
	if (q->state == ST_STOPPING && pthread_equal(q->stop_leader, pthread_self())) {
		opq__unlock(&q->mu);
		return EDEADLK;
	}
	q->callers++;
	bool leader = q->state != ST_STOPPING;
	if (leader)
		q->stop_leader = pthread_self();
	int prev = q->state;
	uint64_t stops = q->stops;
	q->state = ST_STOPPING;
	inbox_close(q);
	OPQ_CHECK(pthread_cond_broadcast(&q->space)); /* blocked enqueuers: ESHUTDOWN */
	wake_all(q);

	if (mode == OPQ_STOP_DISCARD) {
		opq_op *list = batches_take_all(q, fifo_take_all(q));
		opq__unlock(&q->mu);
		discard_list(list);
		opq__lock(&q->mu);
	} else if (leader && prev == ST_NEW) {
		/* Never started: drain on the calling thread, in FIFO order. */
		opq_queue *outer = tls_queue;
		opq_op *op;
		while ((op = q->head)) {
			fifo_unlink(q, op, OP_TAKEN);
			q->running++;
			opq__unlock(&q->mu);
			tls_queue = q;
			op->perform(op);
			tls_queue = outer;
			opq__lock(&q->mu);
			q->running--;
			q->completed++;
			fifo_shrunk(q);
		}
	}

	if (leader) {
		wait_runners_gone(q);
		q->state = ST_STOPPED;
		q->stops++;
		OPQ_CHECK(pthread_cond_broadcast(&q->change));
	} else {
		while (q->stops == stops)
			OPQ_CHECK(pthread_cond_wait(&q->change, &q->mu));
	}
	q->callers--;
	opq__unlock(&q->mu);
	return 0;
}

/* ---- enqueue ------------------------------------------------------------- */

enum wait_kind { WAIT_BLOCK, WAIT_TRY };

/*
 * The enqueue path's thread-locals use the initial-exec model: a plain
 * offset from the thread pointer instead of a __tls_get_addr call (a few
 * dozen bytes of the static TLS reserve, also when dlopen()ed).
 */
#define TLS_FAST __attribute__((tls_model("initial-exec")))

/*
 * Producers in the lock-free path. Each thread that enqueues there has a
 * record, linked into `pushers` on its first such enqueue and unlinked when
 * the thread exits (a key's destructor). `q` names the queue the thread is
 * pushing into, from before its push until after its last access to that
 * queue, written only by its thread. A push is a read-modify-write of
 * q->inbox, and so is every later change of it, up to destroy's closing
 * exchange: that exchange synchronizes with every successful push, so the
 * record's store made before a push is visible to destroy's scan after it.
 */
struct pusher {
	opq_queue *q;
	struct pusher *next, *prev;
	bool linked;
	bool exited; /* unlinked by the destructor: the thread is exiting, never link again */
};
static _Thread_local struct pusher tls_pusher TLS_FAST;
static pthread_mutex_t pushers_mu = PTHREAD_MUTEX_INITIALIZER;
static struct pusher *pushers;
static pthread_key_t pusher_key;
static pthread_once_t pusher_once = PTHREAD_ONCE_INIT;
static bool pusher_key_ok;

static void pusher_unlink(void *arg)
{
	struct pusher *p = arg;
	OPQ_CHECK(pthread_mutex_lock(&pushers_mu));
	if (p->prev)
		p->prev->next = p->next;
	else
		pushers = p->next;
	if (p->next)
		p->next->prev = p->prev;
	p->linked = false;
	/* Another key's destructor may still enqueue on this thread: a record
	 * linked again now could outlive the thread (its last destructor round
	 * may be over), so from here on this thread takes the locked path. */
	p->exited = true;
	OPQ_CHECK(pthread_mutex_unlock(&pushers_mu));
}

static void pusher_key_create(void)
{
	pusher_key_ok = pthread_key_create(&pusher_key, pusher_unlink) == 0;
}

/* This thread's record, linked; NULL if it cannot be (the caller then takes the lock). */
static struct pusher *pusher_self(void)
{
	struct pusher *p = &tls_pusher;
	if (p->linked)
		return p;
	if (p->exited)
		return NULL;
	pthread_once(&pusher_once, pusher_key_create);
	if (!pusher_key_ok || pthread_setspecific(pusher_key, p))
		return NULL;
	OPQ_CHECK(pthread_mutex_lock(&pushers_mu));
	p->prev = NULL;
	p->next = pushers;
	if (pushers)
		pushers->prev = p;
	pushers = p;
	p->linked = true;
	OPQ_CHECK(pthread_mutex_unlock(&pushers_mu));
	return p;
}

/*
 * Wait until no producer's record names q. Called after q's inbox is closed,
 * so a record names q only for the rest of one enqueue call. The list's lock
 * is not held while waiting (other threads' first enqueues and exits need
 * it): the scan starts over after each wait.
 */
static void pushers_wait(opq_queue *q)
{
	bool busy;
	do {
		busy = false;
		OPQ_CHECK(pthread_mutex_lock(&pushers_mu));
		for (struct pusher *p = pushers; p && !busy; p = p->next)
			busy = __atomic_load_n(&p->q, __ATOMIC_ACQUIRE) == q;
		OPQ_CHECK(pthread_mutex_unlock(&pushers_mu));
		if (busy)
			sched_yield();
	} while (busy);
}

/*
 * The lock-free enqueue of an unbounded queue (see the inbox above). The
 * caller made sure the queue is unbounded. Returns EAGAIN when the operation
 * looks queued already, or when this thread has no producer record, so that
 * the locked path decides under the lock. A caller's operation is marked
 * INBOX by a compare-and-swap, so that of two threads enqueueing it at once
 * one gets EBUSY; a box (`boxed`) was made for this call and no other thread
 * has it, so a plain store does.
 */
static int enqueue_inbox(opq_queue *q, opq_op *op, bool boxed)
{
	uintptr_t st = OP_STATE(op);
	if (boxed)
		OP_SET_STATE(op, OP_INBOX); /* made for this call: no other thread has it */
	else if (st == OP_QUEUED || st == OP_BATCHED || st == OP_INBOX ||
		 !__atomic_compare_exchange_n(&op->opq__state, &st, OP_INBOX, false,
					      __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
		return EAGAIN;
	struct pusher *self = pusher_self();
	if (!self) {
		OP_SET_STATE(op, st);
		return EAGAIN;
	}
	__atomic_store_n(&self->q, q, __ATOMIC_RELEASE); /* published by the push (see struct pusher) */
	op->opq__owner = q;
	op->opq__prev = NULL;
	opq_op *top = __atomic_load_n(&q->inbox, __ATOMIC_RELAXED);
	do {
		if (top == INBOX_CLOSED) {
			op->opq__owner = NULL;
			OP_SET_STATE(op, st);
			__atomic_store_n(&self->q, NULL, __ATOMIC_RELEASE);
			return ESHUTDOWN;
		}
		op->opq__next = top;
	} while (!__atomic_compare_exchange_n(&q->inbox, &top, op, true, __ATOMIC_SEQ_CST,
					      __ATOMIC_RELAXED));
	/* op may be performed and freed from here on. */
	if (LOAD(q->sleepers) && !LOAD(q->spinning)) {
		opq__lock(&q->mu);
		inbox_drain(q);
		if (q->sleepers && q->queued > q->spinning + q->wakes)
			wake_one(q);
		opq__unlock(&q->mu);
	}
	__atomic_store_n(&self->q, NULL, __ATOMIC_RELEASE); /* the last access to q */
	return 0;
}

static int enqueue(opq_queue *q, opq_op *op, enum wait_kind kind, const struct timespec *deadline)
{
	opq__lock(&q->mu);
	uintptr_t st = OP_STATE(op);
	/* INBOX: another thread is pushing it onto an inbox right now, and
	 * may not have named the queue in it yet (enqueue_inbox). */
	if (st == OP_INBOX || ((st == OP_QUEUED || st == OP_BATCHED) && op->opq__owner == q)) {
		opq__unlock(&q->mu);
		return EBUSY;
	}
	/* A stop that begins while this call waits for room fails it, even
	 * if the queue is started again before this thread looks. */
	uint64_t stops = q->stops;
	for (;;) {
		if (q->state == ST_STOPPING || q->state == ST_STOPPED || q->stops != stops) {
			opq__unlock(&q->mu);
			return ESHUTDOWN;
		}
		if (q->capacity == 0 || q->queued < q->capacity)
			break;
		if (kind == WAIT_TRY) {
			opq__unlock(&q->mu);
			return EAGAIN;
		}
		/* A runner of q that would wait while every other runner waits too
		 * would wait forever: nobody is left to make room. One in its
		 * exit hook has left the runners: it waits forever only if every
		 * runner left waits too (or none is left), and is not counted. */
		bool runner = tls_queue == q && !tls_in_exit_hook;
		if ((runner && q->stuck_runners + 1 >= q->alive) ||
		    (tls_queue == q && tls_in_exit_hook && q->stuck_runners >= q->alive)) {
			opq__unlock(&q->mu);
			return EDEADLK;
		}
		/* Inside a task: a cancel of the task ends the wait (scope.c). */
		struct opq__cancel_reg creg;
		if (opq__cancel_begin(&creg, &q->mu, &q->space)) {
			opq__unlock(&q->mu);
			return ECANCELED;
		}
		q->stuck_runners += runner;
		q->space_waiters++;
		q->callers++;
		/* Woken at half (see space_made), or look again in a while. */
		struct timespec look;
		opq_deadline_after(&look, ROOM_LOOK_NS);
		bool looking = !deadline || opq__ts_before(&look, deadline);
		int rc = opq__cond_wait(&q->space, &q->mu, looking ? &look : deadline);
		if (looking)
			rc = 0;
		q->space_waiters--;
		/* Back for whatever reason: at worst one more is signalled. */
		q->space_woken -= q->space_woken > 0;
		q->stuck_runners -= runner;
		bool cancelled = opq__cancel_end(&creg); /* may wait for a canceller: still a caller */
		q->callers--;
		if (cancelled && q->queued >= q->capacity && q->state != ST_STOPPING &&
		    q->state != ST_STOPPED) {
			opq__unlock(&q->mu);
			return ECANCELED;
		}
		if (rc == ETIMEDOUT && q->queued >= q->capacity && q->state != ST_STOPPING &&
		    q->state != ST_STOPPED) {
			opq__unlock(&q->mu);
			return ETIMEDOUT;
		}
	}
	inbox_drain(q); /* what was pushed before goes first */
	fifo_push(q, op);
	/* Wake a runner only if those awake and looking are too few. */
	if (q->sleepers && q->queued > q->spinning + q->wakes)
		wake_one(q);
	opq__unlock(&q->mu);
	return 0;
}

/* The lock-free path when the queue is unbounded, else (or in doubt) the locked one. */
static int enqueue_op(opq_queue *q, opq_op *op, bool boxed, enum wait_kind kind,
		      const struct timespec *deadline)
{
	if (q->capacity_ro == 0) {
		int rc = enqueue_inbox(q, op, boxed);
		if (rc != EAGAIN)
			return rc;
	}
	return enqueue(q, op, kind, deadline);
}

OPQ_EXPORT int opq_queue_enqueue(opq_queue *q, opq_op *op)
{
	if (!q || !op || !op->perform)
		return EINVAL;
	return enqueue_op(q, op, false, WAIT_BLOCK, NULL);
}

OPQ_EXPORT int opq_queue_tryenqueue(opq_queue *q, opq_op *op)
{
	if (!q || !op || !op->perform)
		return EINVAL;
	return enqueue_op(q, op, false, WAIT_TRY, NULL);
}

OPQ_EXPORT int opq_queue_timedenqueue(opq_queue *q, opq_op *op, const struct timespec *deadline)
{
	if (!q || !op || !op->perform || !opq__deadline_ok(deadline))
		return EINVAL;
	return enqueue_op(q, op, false, WAIT_BLOCK, deadline);
}

static void box_perform(opq_op *op)
{
	struct box *b = OPQ_CONTAINER_OF(op, struct box, op);
	opq_fn *fn = b->fn;
	void *arg = b->arg;
	box_release(b);
	fn(arg);
}

static void box_discard(opq_op *op)
{
	struct box *b = OPQ_CONTAINER_OF(op, struct box, op);
	opq_fn *discard = (opq_fn *)op->discard;
	void *arg = b->arg;
	box_release(b);
	if (discard)
		discard(arg);
}

/* This thread's spare boxes (see SPARE_MAX), freed when it exits. */
static _Thread_local opq_op *tls_boxes TLS_FAST;
static _Thread_local unsigned tls_nboxes TLS_FAST;
static _Thread_local bool tls_boxes_registered TLS_FAST;
/* The slab being carved: its chunk tls_chunk, from box tls_carved on, and the chunks after. */
static _Thread_local struct chunk *tls_slab TLS_FAST;
static _Thread_local unsigned tls_chunk TLS_FAST;
static _Thread_local unsigned tls_carved TLS_FAST;
/* The size of this thread's last slab, and when it was allocated (see SLAB_GROW_NS). */
static _Thread_local unsigned tls_slab_chunks TLS_FAST;
static _Thread_local int64_t tls_slab_at TLS_FAST;
static _Thread_local bool tls_boxes_exited TLS_FAST; /* the cache's destructor ran */
static pthread_key_t boxes_key;
static pthread_once_t boxes_once = PTHREAD_ONCE_INIT;
static bool boxes_key_ok;

static void tls_boxes_free(void *unused)
{
	(void)unused;
	free_boxes(tls_boxes);
	tls_boxes = NULL;
	tls_nboxes = 0;
	tls_boxes_registered = false;
	struct chunk *s = tls_slab;
	tls_slab = NULL;
	if (s)
		slab_release(s, (unsigned)((s->h.chunks - tls_chunk) * CHUNK_BOXES - tls_carved));
	/* The thread is exiting: a cache made again by a later destructor's
	 * enqueue might never be freed (its last destructor round may be over). */
	tls_boxes_exited = true;
}

/*
 * The thread that calls exit() (usually the main thread) runs no
 * thread-specific destructors: give its cache and slab back here, so that
 * nothing of the queue's is left at exit (valgrind's "still reachable").
 * Boxes still in a queue keep their slab until they are released.
 */
__attribute__((destructor)) static void boxes_at_exit(void)
{
	tls_boxes_free(NULL);
}

static void boxes_key_create(void)
{
	boxes_key_ok = pthread_key_create(&boxes_key, tls_boxes_free) == 0;
}

/* Make sure this thread's cache is freed when it exits: false if it cannot be. */
static bool tls_boxes_register(void)
{
	if (!tls_boxes_registered && !tls_boxes_exited) {
		pthread_once(&boxes_once, boxes_key_create);
		tls_boxes_registered = boxes_key_ok && pthread_setspecific(boxes_key, &tls_boxes) == 0;
	}
	return tls_boxes_registered;
}

/* Keep b in this thread's cache, or free it. */
static void box_put(struct box *b)
{
	if (tls_nboxes < TLS_BOXES_MAX && tls_boxes_register()) {
		b->op.opq__next = tls_boxes;
		tls_boxes = &b->op;
		tls_nboxes++;
		return;
	}
	box_release(b);
}

/*
 * A box: from this thread's cache, else q's spare stack (all of it), else new
 * (from this thread's slab, or a slab of its own once the thread is exiting).
 */
static struct box *box_get(opq_queue *q)
{
	if (tls_boxes_exited) {
		/* No cache on an exiting thread: a slab for this box alone. */
		struct chunk *s = slab_new(1);
		if (!s)
			return NULL;
		atomic_store_explicit(&s->h.live, 1, memory_order_relaxed);
		return &s->boxes[0];
	}
	if (!tls_boxes && __atomic_load_n(&q->spare, __ATOMIC_RELAXED)) {
		if (tls_boxes_register()) {
			tls_boxes = __atomic_exchange_n(&q->spare, NULL, __ATOMIC_ACQUIRE);
			tls_nboxes = __atomic_exchange_n(&q->nspare, 0, __ATOMIC_RELAXED);
		}
	}
	opq_op *op = tls_boxes;
	if (op) {
		tls_boxes = op->opq__next;
		if (tls_boxes)
			__builtin_prefetch(tls_boxes, 1); /* the next call's box */
		if (tls_nboxes)
			tls_nboxes--;
		return OPQ_CONTAINER_OF(op, struct box, op);
	}
	/* Carve one from this thread's slab, or from a new slab. */
	if (!tls_slab) {
		int64_t now = opq__mono_ns();
		unsigned chunks = 1;
		if (tls_slab_chunks && now - tls_slab_at < tls_slab_chunks * (int64_t)SLAB_GROW_NS)
			chunks = tls_slab_chunks < SLAB_CHUNKS_MAX ? 2 * tls_slab_chunks : SLAB_CHUNKS_MAX;
		struct chunk *s;
		if (!tls_boxes_register() || !(s = slab_new(chunks)))
			return NULL;
		tls_slab = s;
		tls_chunk = 0;
		tls_carved = 0;
		tls_slab_chunks = chunks;
		tls_slab_at = now;
	}
	struct chunk *c = (struct chunk *)(void *)((char *)tls_slab + (size_t)tls_chunk * CHUNK_SIZE);
	if (tls_carved == 0)
		c->h.slab = tls_slab;
	struct box *b = &c->boxes[tls_carved];
	if (++tls_carved == CHUNK_BOXES) {
		tls_carved = 0;
		if (++tls_chunk == tls_slab->h.chunks)
			tls_slab = NULL; /* all carved: its boxes free it */
	}
	return b;
}

static int enqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg, enum wait_kind kind,
		      const struct timespec *deadline)
{
	if (!q || !fn || !opq__deadline_ok(deadline))
		return EINVAL;
	struct box *b = box_get(q);
	if (!b)
		return ENOMEM;
	b->op.perform = box_perform;
	b->op.discard = (opq_op_fn *)discard_fn; /* see struct box */
	b->op.opq__owner = NULL;
	OP_SET_STATE(&b->op, OP_IDLE);
	b->fn = fn;
	b->arg = arg;
	int rc = enqueue_op(q, &b->op, true, kind, deadline);
	if (rc)
		box_put(b);
	return rc;
}

OPQ_EXPORT int opq_queue_enqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg)
{
	return enqueue_fn(q, fn, discard_fn, arg, WAIT_BLOCK, NULL);
}

OPQ_EXPORT int opq_queue_tryenqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg)
{
	return enqueue_fn(q, fn, discard_fn, arg, WAIT_TRY, NULL);
}

OPQ_EXPORT int opq_queue_timedenqueue_fn(opq_queue *q, opq_fn *fn, opq_fn *discard_fn, void *arg,
					 const struct timespec *deadline)
{
	return enqueue_fn(q, fn, discard_fn, arg, WAIT_BLOCK, deadline);
}

/* ---- cancel, wait, statistics ------------------------------------------- */

OPQ_EXPORT int opq_queue_cancel(opq_queue *q, opq_op *op)
{
	if (!q || !op)
		return EINVAL;
	opq__lock(&q->mu);
	inbox_drain(q);
	uintptr_t st = OP_STATE(op);
	/* The state first: an operation still INBOX is not queued yet. */
	if ((st != OP_QUEUED && st != OP_BATCHED) || op->opq__owner != q) {
		opq__unlock(&q->mu);
		return EBUSY;
	}
	if (st == OP_QUEUED) {
		fifo_unlink(q, op, OP_IDLE);
	} else {
		/* In a runner's batch: ours only if we claim its slot first. */
		struct slot *slot = (struct slot *)(void *)op->opq__prev;
		int pending = SLOT_PENDING;
		if (slot->op != op ||
		    !atomic_compare_exchange_strong(&slot->state, &pending, SLOT_CANCELLED)) {
			opq__unlock(&q->mu);
			return EBUSY;
		}
		op->opq__owner = NULL;
		op->opq__prev = NULL;
		OP_SET_STATE(op, OP_IDLE);
		q->running--;
	}
	q->discarded++;
	q->cancelled++;
	fifo_shrunk(q);
	opq__unlock(&q->mu);
	op_discard(op);
	return 0;
}

OPQ_EXPORT int opq_queue_wait_idle(opq_queue *q, const struct timespec *deadline)
{
	if (!q || !opq__deadline_ok(deadline))
		return EINVAL;
	if (tls_queue == q)
		return EDEADLK;
	int rc = 0;
	opq__lock(&q->mu);
	q->callers++;
	q->idle_waiters++;
	for (;;) {
		inbox_drain(q);
		if (!q->queued && !q->running)
			break;
		if (opq__cond_wait(&q->idle, &q->mu, deadline) == ETIMEDOUT) {
			inbox_drain(q);
			if (!q->queued && !q->running)
				break;
			rc = ETIMEDOUT;
			break;
		}
	}
	q->idle_waiters--;
	q->callers--;
	opq__unlock(&q->mu);
	return rc;
}

OPQ_EXPORT int opq_queue_stats_get(opq_queue *q, opq_queue_stats *stats)
{
	if (!q || !stats)
		return EINVAL;
	memset(stats, 0, sizeof(*stats));
	opq__lock(&q->mu);
	inbox_drain(q);
	/* Operations in a batch that nobody has claimed yet are still queued.
	 * A bounded queue's runners take one at a time: the operation a runner
	 * took is its to start, running, so queued never exceeds the capacity. */
	size_t pending = 0;
	for (struct runner *r = q->capacity ? NULL : q->runners; r; r = r->next)
		for (unsigned i = batch_first(r); i < r->nslots; i++)
			pending += atomic_load_explicit(&r->slots[i].state, memory_order_relaxed) ==
				   SLOT_PENDING;
	stats->queued = q->queued + pending;
	stats->running = q->running - pending;
	stats->completed = q->completed;
	stats->discarded = q->discarded;
	stats->cancelled = q->cancelled;
	stats->high_water = q->high_water;
	stats->asides = q->asides;
	stats->runners = q->alive;
	stats->blocked = q->space_waiters;
	opq__unlock(&q->mu);
	return 0;
}

bool opq__queue_help(opq_queue *q, opq_op *op)
{
	opq__lock(&q->mu);
	inbox_drain(q); /* an operation still in the inbox becomes QUEUED */
	uintptr_t st = OP_STATE(op);
	if ((st != OP_QUEUED && st != OP_BATCHED) || op->opq__owner != q) {
		opq__unlock(&q->mu);
		return false;
	}
	if (st == OP_QUEUED) {
		fifo_unlink(q, op, OP_TAKEN);
		q->running++;
		fifo_shrunk(q);
	} else {
		/* In a runner's batch (maybe our own): ours if we claim its slot
		 * first, as a stealing runner does; it is counted as running. */
		struct slot *slot = (struct slot *)(void *)op->opq__prev;
		int pending = SLOT_PENDING;
		if (slot->op != op ||
		    !atomic_compare_exchange_strong(&slot->state, &pending, SLOT_STOLEN)) {
			opq__unlock(&q->mu);
			return false;
		}
		OP_SET_STATE(op, OP_TAKEN);
	}
	opq__unlock(&q->mu);

	op->perform(op); /* op may be freed from here on */

	opq__lock(&q->mu);
	performed_done(q, 1);
	opq__unlock(&q->mu);
	return true;
}

OPQ_EXPORT opq_queue *opq_queue_current(void)
{
	return tls_queue;
}
