/*
 * The stage under stress, over real loopback UDP sockets. One unconnected
 * socket is the shared resource; each worker has its own socket, whose
 * address is its key. A step: the worker (re)registers its ticket, sends
 * a datagram {worker, sequence} from its socket to the shared one, and
 * waits for it to come back through the stage: the head reads the shared
 * socket and routes each datagram by its source address with
 * opq_stage_notify(), keeping those nobody can take in a mailbox that
 * their owner checks after registering.
 *
 * Invariants: at most one head at a time; every event a worker receives
 * comes from its own address and carries its own index and the sequence
 * number it is waiting for (none misrouted, none duplicated); every
 * datagram comes back within LOST_NS (none lost); unregister never hands
 * back an event nobody sent; at the end nothing is left anywhere.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "stress.h"

#define LOST_NS (30LL * 1000000000LL)

struct skey {
	uint32_t addr;
	uint16_t port;
};
#define KEYLEN 6

/* What a datagram carries; no padding bytes (they would go out uninitialised). */
struct wire {
	uint32_t worker;
	uint32_t pad;
	uint64_t seq;
};

struct msg {
	struct msg *next;
	unsigned char key[KEYLEN];
	struct wire w;
};

struct sworker {
	int fd;
	unsigned char key[KEYLEN];
	opq_stage_ticket *t; /* NULL while unregistered */
	uint64_t seq;
};

struct smod {
	opq_stage *st;
	int fd; /* the shared socket */
	struct sockaddr_in addr;
	unsigned threads;
	struct sworker *w;
	pthread_mutex_t mu; /* the mailbox */
	struct msg *mailbox;
	atomic_int heads;
	_Atomic uint64_t calls, sent, delivered, by_mailbox, headships, routed, buffered;
	_Atomic uint64_t timeouts, reregisters, read_by_head;
};

#define CALL(m) atomic_fetch_add_explicit(&(m)->calls, 1, memory_order_relaxed)
#define INC(x)  atomic_fetch_add_explicit(&(x), 1, memory_order_relaxed)

static void key_of(const struct sockaddr_in *a, unsigned char *key)
{
	memcpy(key, &a->sin_addr.s_addr, 4);
	memcpy(key + 4, &a->sin_port, 2);
}

static int udp_socket(struct sockaddr_in *addr)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		return -1;
	memset(addr, 0, sizeof(*addr));
	addr->sin_family = AF_INET;
	addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t len = sizeof(*addr);
	int big = 1 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	if (bind(fd, (struct sockaddr *)addr, sizeof(*addr)) < 0 ||
	    getsockname(fd, (struct sockaddr *)addr, &len) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static int setup(void **statep, unsigned threads, uint64_t seed)
{
	(void)seed;
	struct smod *m = calloc(1, sizeof(*m));
	if (!m)
		return ENOMEM;
	m->threads = threads;
	m->w = calloc(threads, sizeof(*m->w));
	if (!m->w)
		return ENOMEM;
	pthread_mutex_init(&m->mu, NULL);
	int rc = opq_stage_create(&m->st);
	if (rc)
		return rc;
	if ((m->fd = udp_socket(&m->addr)) < 0)
		return errno;
	for (unsigned i = 0; i < threads; i++) {
		struct sockaddr_in a;
		if ((m->w[i].fd = udp_socket(&a)) < 0)
			return errno;
		key_of(&a, m->w[i].key);
	}
	*statep = m;
	return 0;
}

/* Check an event handed to worker i, then free it. */
static void received(struct smod *m, unsigned i, struct msg *msg, const char *how)
{
	struct sworker *w = &m->w[i];
	if (!msg) {
		stress_fail("stage", "worker %u got a NULL event (%s)", i, how);
		return;
	}
	if (memcmp(msg->key, w->key, KEYLEN) != 0 || msg->w.worker != i)
		stress_fail("stage", "misrouted: worker %u got worker %u's datagram (%s)", i,
		            msg->w.worker, how);
	else if (msg->w.seq != w->seq)
		stress_fail("stage",
		            "worker %u got sequence %" PRIu64 ", waits for %" PRIu64 " (%s)", i,
		            msg->w.seq, w->seq, how);
	INC(m->delivered);
	free(msg);
}

/* My datagram from the mailbox, if a head left it there. */
static struct msg *mailbox_take(struct smod *m, const unsigned char *key)
{
	pthread_mutex_lock(&m->mu);
	struct msg **pp = &m->mailbox, *found = NULL;
	for (; *pp; pp = &(*pp)->next) {
		if (memcmp((*pp)->key, key, KEYLEN) == 0) {
			found = *pp;
			*pp = found->next;
			break;
		}
	}
	pthread_mutex_unlock(&m->mu);
	return found;
}

/* As the head: read what is there (briefly) and route it. */
static void head_reads(struct smod *m, struct stress_rng *r)
{
	struct pollfd p = {.fd = m->fd, .events = POLLIN};
	if (poll(&p, 1, 1 + (int)stress_below(r, 3)) <= 0)
		return;
	for (int k = 0; k < 32; k++) {
		struct sockaddr_in from;
		socklen_t len = sizeof(from);
		struct wire wire;
		ssize_t n = recvfrom(m->fd, &wire, sizeof(wire), MSG_DONTWAIT,
		                     (struct sockaddr *)&from, &len);
		if (n < 0)
			break;
		if (n != (ssize_t)sizeof(wire)) {
			stress_fail("stage", "a datagram of %zd bytes", n);
			continue;
		}
		INC(m->read_by_head);
		struct msg *msg = malloc(sizeof(*msg));
		if (!msg) {
			stress_fail("stage", "out of memory");
			return;
		}
		msg->w = wire;
		key_of(&from, msg->key);
		/*
		 * Notify and, failing that, buffer under the mailbox lock, which
		 * a late registration also takes: either the ticket is there
		 * for notify, or the datagram is in the mailbox by the time
		 * its owner looks.
		 */
		pthread_mutex_lock(&m->mu);
		CALL(m);
		int rc = opq_stage_notify(m->st, msg->key, KEYLEN, msg);
		if (rc == 0) {
			INC(m->routed);
		} else {
			if (rc != ENOENT && rc != EAGAIN)
				stress_fail("stage", "notify returned %d", rc);
			INC(m->buffered);
			msg->next = m->mailbox;
			m->mailbox = msg;
		}
		pthread_mutex_unlock(&m->mu);
	}
}

static void do_register(struct smod *m, struct sworker *w, unsigned i)
{
	CALL(m);
	pthread_mutex_lock(&m->mu);
	int rc = opq_stage_register(m->st, w->key, KEYLEN, &w->t);
	pthread_mutex_unlock(&m->mu);
	if (rc) {
		stress_fail("stage", "worker %u: register returned %d", i, rc);
		w->t = NULL;
	}
}

static void step(void *state, struct stress_worker *sw)
{
	struct smod *m = state;
	struct stress_rng *r = &sw->rng;
	unsigned i = sw->index;
	struct sworker *w = &m->w[i];
	int rc;

	/* Register before or after sending: both must work (the mailbox covers the latter). */
	bool late = !w->t && stress_pct(r, 50);
	if (!w->t && !late)
		do_register(m, w, i);
	w->seq++;
	struct wire wire = {.worker = i, .pad = 0, .seq = w->seq};
	if (sendto(w->fd, &wire, sizeof(wire), 0, (struct sockaddr *)&m->addr, sizeof(m->addr)) !=
	    (ssize_t)sizeof(wire)) {
		stress_fail("stage", "sendto: %s", strerror(errno));
		return;
	}
	INC(m->sent);
	if (late)
		do_register(m, w, i);
	if (!w->t)
		return;

	int64_t give_up = stress_now() + LOST_NS;
	for (;;) {
		struct msg *mine = mailbox_take(m, w->key);
		if (mine) {
			INC(m->by_mailbox);
			received(m, i, mine, "mailbox");
			break;
		}
		if (stress_now() > give_up) {
			stress_fail("stage",
			            "worker %u: datagram %" PRIu64 " lost (not back in %lld s)", i,
			            w->seq, LOST_NS / 1000000000LL);
			return;
		}
		struct timespec dl = stress_after(1000000 + (int64_t)stress_below(r, 20000000));
		void *ev = NULL;
		CALL(m);
		rc = opq_stage_enter(m->st, w->t, stress_pct(r, 30) ? NULL : &dl, &ev);
		if (rc == OPQ_STAGE_NOTIFIED) {
			received(m, i, ev, "notified");
			break;
		}
		if (rc == ETIMEDOUT) {
			INC(m->timeouts);
			continue;
		}
		if (rc != OPQ_STAGE_HEAD) {
			stress_fail("stage", "enter returned %d", rc);
			return;
		}
		INC(m->headships);
		if (atomic_fetch_add(&m->heads, 1) != 0)
			stress_fail("stage", "two heads at once");
		head_reads(m, r);
		/* The head's own event, if it routed it to itself, is latched for it. */
		ev = NULL;
		CALL(m);
		rc = opq_stage_enter(m->st, w->t, &dl, &ev);
		atomic_fetch_sub(&m->heads, 1);
		CALL(m);
		int lrc = opq_stage_leave(m->st, w->t);
		if (lrc)
			stress_fail("stage", "leave returned %d", lrc);
		if (rc == OPQ_STAGE_NOTIFIED) {
			received(m, i, ev, "notified to the head");
			break;
		}
		if (rc != OPQ_STAGE_HEAD)
			stress_fail("stage", "the head's enter returned %d", rc);
	}

	if (stress_pct(r, 30)) {
		void *ev = NULL;
		CALL(m);
		rc = opq_stage_unregister(m->st, w->t, &ev);
		w->t = NULL;
		INC(m->reregisters);
		if (rc != 0 || ev)
			stress_fail("stage",
			            "unregister with nothing outstanding returned %d, event %p", rc,
			            ev);
	}
}

static void check(void *state)
{
	struct smod *m = state;
	int h = atomic_load(&m->heads);
	if (h < 0 || h > 1)
		stress_fail("stage", "%d heads", h);
	opq_stage_stats s;
	if (opq_stage_stats_get(m->st, &s) || s.tickets > m->threads || s.waiting > m->threads)
		stress_fail("stage", "stats: %zu tickets, %zu waiting for %u workers", s.tickets,
		            s.waiting, m->threads);
}

static void teardown(void *state, FILE *out)
{
	struct smod *m = state;
	for (unsigned i = 0; i < m->threads; i++) {
		if (m->w[i].t) {
			void *ev = NULL;
			int rc = opq_stage_unregister(m->st, m->w[i].t, &ev);
			if (rc != 0 || ev)
				stress_fail("stage", "final unregister returned %d, event %p", rc,
				            ev);
		}
		close(m->w[i].fd);
	}
	if (m->mailbox)
		stress_fail("stage", "datagrams left in the mailbox");
	char c;
	if (recv(m->fd, &c, 1, MSG_DONTWAIT) >= 0)
		stress_fail("stage", "a datagram left unread in the shared socket");
	if (opq_stage_destroy(m->st))
		stress_fail("stage", "destroy with no ticket failed");
	close(m->fd);
	if (m->sent != m->delivered)
		stress_fail("stage", "%" PRIu64 " datagrams sent, %" PRIu64 " delivered",
		            (uint64_t)m->sent, (uint64_t)m->delivered);
	fprintf(out,
	        "stage: %" PRIu64 " datagrams sent, %" PRIu64 " delivered (%" PRIu64
	        " through the mailbox), %" PRIu64 " read by %" PRIu64 " heads, %" PRIu64
	        " routed by notify, %" PRIu64 " to the mailbox, %" PRIu64
	        " enter timeouts, %" PRIu64 " unregisters\n",
	        (uint64_t)m->sent, (uint64_t)m->delivered, (uint64_t)m->by_mailbox,
	        (uint64_t)m->read_by_head, (uint64_t)m->headships, (uint64_t)m->routed,
	        (uint64_t)m->buffered, (uint64_t)m->timeouts, (uint64_t)m->reregisters);
	pthread_mutex_destroy(&m->mu);
	free(m->w);
	free(m);
}

static uint64_t calls(void *state)
{
	return atomic_load_explicit(&((struct smod *)state)->calls, memory_order_relaxed);
}

const struct stress_module stress_stage = {
    .name = "stage",
    .setup = setup,
    .step = step,
    .check = check,
    .teardown = teardown,
    .calls = calls,
};
