/*
 * authdemo.c: the line's scenario on real sockets (see authdemo.h).
 */
#define _DEFAULT_SOURCE 1 /* struct timeval in SO_RCVTIMEO, inet_pton */
#include "authdemo.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <opqueue.h>

/* ---- the service: one thread, one connection at a time ------------------ */

struct service {
	int fd;
	uint16_t port;
	unsigned expire_after;
	pthread_t thread;
	/* owned by the service thread until it is joined */
	uint64_t tokens;  /* tokens issued: 1..tokens */
	uint32_t *served; /* requests each token served; UINT32_MAX once seen expired */
	size_t cap;
	uint64_t expiries;
};

/* Read one line (without its newline) into buf; 0 or an errno value. */
static int read_line(int fd, char *buf, size_t size)
{
	size_t len = 0;
	while (len + 1 < size) {
		ssize_t n = recv(fd, buf + len, 1, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n == 0 ? ECONNRESET : errno;
		if (buf[len] == '\n') {
			buf[len] = '\0';
			return 0;
		}
		len++;
	}
	return EMSGSIZE;
}

static int write_all(int fd, const char *s)
{
	size_t len = strlen(s);
	while (len) {
		ssize_t n = send(fd, s, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return errno;
		s += n;
		len -= (size_t)n;
	}
	return 0;
}

static void serve_one(struct service *sv, int fd)
{
	char line[64], reply[64];
	unsigned long long n;
	if (read_line(fd, line, sizeof(line)))
		return;
	if (strcmp(line, "AUTH") == 0) {
		/* Every token lives until it has served expire_after requests. */
		if (sv->tokens + 1 >= sv->cap) {
			size_t cap = sv->cap ? 2 * sv->cap : 64;
			uint32_t *p = realloc(sv->served, cap * sizeof(*p));
			if (!p) {
				write_all(fd, "503\n");
				return;
			}
			sv->served = p;
			sv->cap = cap;
		}
		sv->served[++sv->tokens] = 0;
		snprintf(reply, sizeof(reply), "TOKEN %llu\n", (unsigned long long)sv->tokens);
	} else if (sscanf(line, "GET %llu", &n) == 1) {
		if (n >= 1 && n <= sv->tokens && sv->served[n] < sv->expire_after) {
			sv->served[n]++;
			strcpy(reply, "200\n");
		} else {
			if (n >= 1 && n <= sv->tokens && sv->served[n] != UINT32_MAX) {
				sv->served[n] = UINT32_MAX; /* first 401 of a token that ran out */
				sv->expiries++;
			}
			strcpy(reply, "401\n");
		}
	} else {
		strcpy(reply, "400\n");
	}
	write_all(fd, reply);
}

static void *service_main(void *arg)
{
	struct service *sv = arg;
	for (;;) {
		int fd = accept(sv->fd, NULL, NULL);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			break; /* shut down */
		}
		serve_one(sv, fd);
		close(fd);
	}
	return NULL;
}

static int service_start(struct service *sv, unsigned expire_after)
{
	memset(sv, 0, sizeof(*sv));
	sv->expire_after = expire_after;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	socklen_t len = sizeof(sa);
	sv->fd = socket(AF_INET, SOCK_STREAM, 0);
	if (sv->fd < 0)
		return errno;
	if (bind(sv->fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(sv->fd, 128) ||
	    getsockname(sv->fd, (struct sockaddr *)&sa, &len)) {
		int rc = errno;
		close(sv->fd);
		return rc;
	}
	sv->port = ntohs(sa.sin_port);
	int rc = pthread_create(&sv->thread, NULL, service_main, sv);
	if (rc)
		close(sv->fd);
	return rc;
}

static void service_stop(struct service *sv)
{
	shutdown(sv->fd, SHUT_RDWR); /* accept() fails: the thread ends */
	pthread_join(sv->thread, NULL);
	close(sv->fd);
	free(sv->served);
}

/* ---- the client ------------------------------------------------------------ */

struct client {
	uint16_t port;
	int use_line;
	opq_line line;
	atomic_uint_fast64_t token;
	atomic_uint_fast64_t requests, ok, unauthorized, reauths, retries, failed;
};

/* Send one request line, read the answer line. 0 or an errno value. */
static int call(struct client *c, const char *request, char *answer, size_t size)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(c->port)};
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	struct timeval tv = {.tv_sec = 10}; /* a broken service fails, not hangs */
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return errno;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	int rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) ? errno : 0;
	if (!rc)
		rc = write_all(fd, request);
	if (!rc)
		rc = read_line(fd, answer, size);
	close(fd);
	return rc;
}

/* GET with the token: 200, 401, or a negated errno value. */
static int get(struct client *c, uint64_t token)
{
	char req[64], ans[64];
	snprintf(req, sizeof(req), "GET %llu\n", (unsigned long long)token);
	atomic_fetch_add(&c->requests, 1);
	int rc = call(c, req, ans, sizeof(ans));
	return rc ? -rc : atoi(ans);
}

static int reauth(struct client *c)
{
	char ans[64];
	unsigned long long token;
	int rc = call(c, "AUTH\n", ans, sizeof(ans));
	if (rc)
		return rc;
	if (sscanf(ans, "TOKEN %llu", &token) != 1)
		return EPROTO;
	atomic_store(&c->token, token);
	return 0;
}

/*
 * One request operation: the seed's retry loop. It reads the line's
 * generation before the request, so that a 401 that arrives after somebody
 * else already re-authenticated is recognised as stale (EALREADY).
 */
static void request_op(void *arg)
{
	struct client *c = arg;
	opq_line_ticket t = OPQ_LINE_TICKET_INITIALIZER;
	for (int attempt = 0; attempt < 10000; attempt++) {
		uint64_t gen;
		opq_line_generation(&c->line, &gen);
		int code = get(c, atomic_load(&c->token));
		if (code == 200) {
			atomic_fetch_add(&c->ok, 1);
			return;
		}
		if (code != 401)
			break;
		atomic_fetch_add(&c->unauthorized, 1);
		atomic_fetch_add(&c->retries, 1);
		if (!c->use_line) { /* naive: every 401 re-authenticates */
			atomic_fetch_add(&c->reauths, 1);
			if (reauth(c))
				break;
			continue;
		}
		int rc = opq_line_try_acquire(&c->line, gen, &t);
		if (rc == 0) { /* ours to fix; the others wait for us */
			atomic_fetch_add(&c->reauths, 1);
			int status = reauth(c);
			opq_line_release(&c->line, &t, status);
			if (status)
				break;
		} else if (rc == EBUSY) {
			int status = 0;
			struct timespec dl;
			opq_deadline_after(&dl, 10LL * 1000000000);
			rc = opq_line_wait(&c->line, &t, &dl, &status);
			if ((rc && rc != ESTALE) || status)
				break; /* timed out, or the holder's fix failed: give up */
		} else if (rc != EALREADY) {
			break;
		}
	}
	atomic_fetch_add(&c->failed, 1);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int authdemo_run(unsigned runners, unsigned ops, unsigned expire_after, int use_line,
                 struct authdemo_result *res)
{
	struct service sv;
	struct client c = {.use_line = use_line};
	opq_queue *q;
	int rc = service_start(&sv, expire_after);
	if (rc)
		return rc;
	c.port = sv.port;
	if ((rc = opq_line_init(&c.line)))
		goto out_service;
	if ((rc = reauth(&c))) /* the first token, before any request */
		goto out_line;
	if ((rc = opq_queue_create(&q, NULL)))
		goto out_line;
	double t0 = now_s();
	if ((rc = opq_queue_start(q, runners)))
		goto out_queue;
	for (unsigned i = 0; i < ops && !rc; i++)
		rc = opq_queue_enqueue_fn(q, request_op, NULL, &c);
	int stop_rc = opq_queue_stop(q, OPQ_STOP_DRAIN);
	if (!rc)
		rc = stop_rc;
	res->seconds = now_s() - t0;
out_queue:
	opq_queue_destroy(q);
out_line:
	opq_line_destroy(&c.line);
out_service:
	service_stop(&sv);
	res->requests = atomic_load(&c.requests);
	res->ok = atomic_load(&c.ok);
	res->unauthorized = atomic_load(&c.unauthorized);
	res->reauths = atomic_load(&c.reauths);
	res->retries = atomic_load(&c.retries);
	res->failed = atomic_load(&c.failed);
	res->expiries = sv.expiries;
	return rc;
}
