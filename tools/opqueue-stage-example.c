/*
 * opqueue-stage-example: many threads talk to their own UDP peer through
 * ONE unconnected socket, with a stage (leader/followers) deciding which
 * thread reads it. Each worker sends a request from the shared socket to
 * its peer; an echo thread answers from the peer; the reply arrives on the
 * shared socket, where the current head reads it and routes it by source
 * address to the worker it belongs to. Prints round trips per second.
 *
 * With -N it runs the naive alternative instead, for comparison: every
 * worker polls and reads the shared socket itself and re-queues what is not
 * its own into the owner's mailbox, which the owner checks between reads.
 *
 * usage: opqueue-stage-example [-hN] [-t THREADS] [-n ROUNDS]
 */
#define _GNU_SOURCE 1
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <opqueue.h>

#define MAX_THREADS 256
#define ROUND_NS    (5LL * 1000000000LL)

struct msg {
	uint32_t id, round;
};

struct key {
	uint32_t addr;
	uint16_t port;
	uint16_t pad;
};

/* Replies the head could not hand over (the worker was not registered). */
struct mailbox {
	pthread_mutex_t mu;
	struct msg *items[8];
	int n;
};

static opq_stage *stage;
static int shared_fd;
static int nthreads = 16;
static long rounds = 10000;
static int peer_fd[MAX_THREADS];
static struct sockaddr_in peer_addr[MAX_THREADS];
static struct mailbox box[MAX_THREADS];
static int naive;
static atomic_int stop_echo;
static atomic_int failed;

static int bind_loopback(struct sockaddr_in *addr)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		return -1;
	memset(addr, 0, sizeof(*addr));
	addr->sin_family = AF_INET;
	addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t len = sizeof(*addr);
	if (bind(fd, (struct sockaddr *)addr, sizeof(*addr)) != 0 ||
	    getsockname(fd, (struct sockaddr *)addr, &len) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static struct key key_of(const struct sockaddr_in *sa)
{
	struct key k = {sa->sin_addr.s_addr, sa->sin_port, 0};
	return k;
}

static int index_of(const struct sockaddr_in *sa)
{
	for (int i = 0; i < nthreads; i++)
		if (peer_addr[i].sin_port == sa->sin_port)
			return i;
	return -1;
}

static int box_put(int i, struct msg *m)
{
	int ok = 0;
	pthread_mutex_lock(&box[i].mu);
	if (box[i].n < 8) {
		box[i].items[box[i].n++] = m;
		ok = 1;
	}
	pthread_mutex_unlock(&box[i].mu);
	return ok;
}

static struct msg *box_take(int i)
{
	struct msg *m = NULL;
	pthread_mutex_lock(&box[i].mu);
	if (box[i].n > 0) {
		m = box[i].items[0];
		memmove(&box[i].items[0], &box[i].items[1], (size_t)(box[i].n - 1) * sizeof(m));
		box[i].n--;
	}
	pthread_mutex_unlock(&box[i].mu);
	return m;
}

/* The peers: answer every request with the same bytes. */
static void *echo_main(void *arg)
{
	(void)arg;
	struct pollfd p[MAX_THREADS];
	for (int i = 0; i < nthreads; i++)
		p[i] = (struct pollfd){.fd = peer_fd[i], .events = POLLIN};
	while (!atomic_load(&stop_echo)) {
		if (poll(p, (nfds_t)nthreads, 50) <= 0)
			continue;
		for (int i = 0; i < nthreads; i++) {
			if (!(p[i].revents & POLLIN))
				continue;
			struct msg m;
			struct sockaddr_in from;
			socklen_t flen = sizeof(from);
			ssize_t n = recvfrom(peer_fd[i], &m, sizeof(m), MSG_DONTWAIT,
			                     (struct sockaddr *)&from, &flen);
			if (n == (ssize_t)sizeof(m))
				sendto(peer_fd[i], &m, sizeof(m), 0, (struct sockaddr *)&from,
				       flen);
		}
	}
	return NULL;
}

/* As head: read at most one reply from the shared socket and route it. */
static void head_read_one(int me)
{
	struct pollfd p = {.fd = shared_fd, .events = POLLIN};
	if (poll(&p, 1, 20) <= 0)
		return;
	struct msg *m = malloc(sizeof(*m));
	if (!m)
		return;
	struct sockaddr_in from;
	socklen_t flen = sizeof(from);
	ssize_t n =
	    recvfrom(shared_fd, m, sizeof(*m), MSG_DONTWAIT, (struct sockaddr *)&from, &flen);
	int to = n == (ssize_t)sizeof(*m) ? index_of(&from) : -1;
	if (to < 0) {
		free(m);
		return;
	}
	if (to != me) {
		struct key k = key_of(&from);
		if (opq_stage_notify(stage, &k, sizeof(k), m) == 0)
			return;
	}
	if (!box_put(to, m))
		free(m); /* a stray duplicate: the worker is not waiting for it */
}

/* The naive way: read the shared socket whenever our reply is not in. */
static struct msg *naive_wait(int me, const struct timespec *dl)
{
	struct msg *in;
	struct timespec now;
	while (!(in = box_take(me))) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec > dl->tv_sec)
			return NULL;
		struct pollfd p = {.fd = shared_fd, .events = POLLIN};
		if (poll(&p, 1, 1) <= 0)
			continue;
		struct msg *m = malloc(sizeof(*m));
		if (!m)
			continue;
		struct sockaddr_in from;
		socklen_t flen = sizeof(from);
		ssize_t n = recvfrom(shared_fd, m, sizeof(*m), MSG_DONTWAIT,
		                     (struct sockaddr *)&from, &flen);
		int to = n == (ssize_t)sizeof(*m) ? index_of(&from) : -1;
		if (to == me)
			return m;
		if (to < 0 || !box_put(to, m))
			free(m);
	}
	return in;
}

static void *worker_main(void *arg)
{
	int me = (int)(intptr_t)arg;
	struct key k = key_of(&peer_addr[me]);
	opq_stage_ticket *t;
	int rc = opq_stage_register(stage, &k, sizeof(k), &t);
	if (rc) {
		fprintf(stderr, "register: %s\n", strerror(rc));
		atomic_store(&failed, 1);
		return NULL;
	}
	for (long r = 0; r < rounds && !atomic_load(&failed); r++) {
		struct msg out = {(uint32_t)me, (uint32_t)r};
		sendto(shared_fd, &out, sizeof(out), 0, (struct sockaddr *)&peer_addr[me],
		       sizeof(peer_addr[me]));
		struct timespec dl;
		opq_deadline_after(&dl, ROUND_NS);
		struct msg *in = naive ? naive_wait(me, &dl) : NULL;
		if (naive && !in) {
			fprintf(stderr, "thread %d round %ld: timed out\n", me, r);
			atomic_store(&failed, 1);
		}
		while (!in && !naive) {
			if ((in = box_take(me)))
				break;
			void *ev = NULL;
			rc = opq_stage_enter(stage, t, &dl, &ev);
			if (rc == OPQ_STAGE_NOTIFIED) {
				in = ev;
			} else if (rc == OPQ_STAGE_HEAD) {
				struct timespec now;
				while (!(in = box_take(me))) {
					clock_gettime(CLOCK_MONOTONIC, &now);
					if (now.tv_sec > dl.tv_sec)
						break;
					head_read_one(me);
				}
				opq_stage_leave(stage, t);
				if (!in)
					rc = ETIMEDOUT;
			}
			if (!in) {
				fprintf(stderr, "thread %d round %ld: %s\n", me, r, strerror(rc));
				atomic_store(&failed, 1);
				break;
			}
		}
		if (in && (in->id != (uint32_t)me || in->round != (uint32_t)r)) {
			fprintf(stderr, "thread %d got %u/%u for round %ld\n", me, in->id,
			        in->round, r);
			atomic_store(&failed, 1);
		}
		free(in);
	}
	void *ev = NULL;
	if (opq_stage_unregister(stage, t, &ev) == OPQ_STAGE_NOTIFIED)
		free(ev);
	return NULL;
}

int main(int argc, char **argv)
{
	int c;
	while ((c = getopt(argc, argv, "Nt:n:h")) != -1) {
		switch (c) {
		case 'N':
			naive = 1;
			break;
		case 't':
			nthreads = atoi(optarg);
			break;
		case 'n':
			rounds = atol(optarg);
			break;
		default:
			fprintf(c == 'h' ? stdout : stderr,
			        "usage: %s [-hN] [-t THREADS] [-n ROUNDS]\n", argv[0]);
			return c == 'h' ? 0 : 2;
		}
	}
	if (nthreads < 1 || nthreads > MAX_THREADS || rounds < 1) {
		fprintf(stderr, "threads must be 1..%d and rounds at least 1\n", MAX_THREADS);
		return 2;
	}
	struct sockaddr_in shared_addr;
	if ((shared_fd = bind_loopback(&shared_addr)) < 0) {
		perror("socket");
		return 1;
	}
	for (int i = 0; i < nthreads; i++) {
		if ((peer_fd[i] = bind_loopback(&peer_addr[i])) < 0) {
			perror("socket");
			return 1;
		}
		pthread_mutex_init(&box[i].mu, NULL);
	}
	int rc = opq_stage_create(&stage);
	if (rc) {
		fprintf(stderr, "opq_stage_create: %s\n", strerror(rc));
		return 1;
	}
	pthread_t echo, th[MAX_THREADS];
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	pthread_create(&echo, NULL, echo_main, NULL);
	for (int i = 0; i < nthreads; i++)
		pthread_create(&th[i], NULL, worker_main, (void *)(intptr_t)i);
	for (int i = 0; i < nthreads; i++)
		pthread_join(th[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	atomic_store(&stop_echo, 1);
	pthread_join(echo, NULL);

	double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	double total = (double)nthreads * (double)rounds;
	printf("%s: %d threads x %ld rounds through one UDP socket: %.0f round trips in %.3f s, "
	       "%.0f round trips/s\n",
	       naive ? "naive (every thread reads)" : "stage", nthreads, rounds, total, secs,
	       total / secs);
	opq_stage_destroy(stage);
	for (int i = 0; i < nthreads; i++) {
		close(peer_fd[i]);
		pthread_mutex_destroy(&box[i].mu);
	}
	close(shared_fd);
	return atomic_load(&failed) ? 1 : 0;
}
