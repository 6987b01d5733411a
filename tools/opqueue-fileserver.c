/*
 * opqueue-fileserver: an event-driven TCP file server on one epoll loop that
 * hands each file read (open, fstat, pread: the part that blocks) to an
 * opqueue queue and gets the result back on the loop's thread through a
 * completion channel, in the spirit of nginx's "aio threads". With -c it is
 * the client that checks the server: K connections, many requests, every
 * reply compared byte for byte with the files on disk.
 *
 *   opqueue-fileserver [-d dir] [-a addr] [-p port] [-P portfile] [-r runners]
 *   opqueue-fileserver -c [-H] -p port [-d dir] [-a addr] [-k connections] [-n requests]
 *
 * The protocol, one request per line: "GET name\n" is answered with
 * "OK <length>\n" and the file's bytes, or "ERR <errno>\n" (2 for a missing
 * file, 22 for a name with '/' or the names "." and ".."). Requests may be
 * pipelined; each connection's replies come in the order of its requests;
 * after a half-close the requests sent are still answered.
 *
 * Each connection embeds one operation (struct req): the loop enqueues it
 * when a request line is complete, a runner performs the read, and the
 * completion, on the loop thread, queues the reply for non-blocking sends.
 * Nothing but the file's bytes is allocated per request. SIGINT and SIGTERM
 * arrive through a signalfd in the loop: the server stops accepting, stops
 * the queue discarding what waits (those completions run with ECANCELED),
 * runs the channel until it can be destroyed, and exits 0.
 */
#define _GNU_SOURCE 1
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <opqueue.h>

#define NAME_LEN  255            /* longest file name served */
#define LINE_LEN  (NAME_LEN + 8) /* "GET " + name + "\r\n" fits */
#define FILE_MAX  (64L << 20)    /* larger files are refused with EFBIG */
#define RUN_BATCH 64             /* completions per opq_chan_run: the loop stays fair */

/* ---- the server ---------------------------------------------------------- */

/* One request's read: performed on a runner, completed on the loop. */
struct req {
	opq_op op;
	char name[NAME_LEN + 1];
	int err;    /* 0, or the errno the read failed with */
	char *data; /* the file's bytes (malloc'd by perform, the connection's after) */
	size_t len;
};

struct conn {
	int fd;            /* -1 once closed */
	uint32_t events;   /* what epoll watches now */
	bool busy;         /* req is in the queue or being completed */
	bool eof;          /* the peer has sent all it will: answer, then close */
	struct req req;    /* the connection's one read in flight */
	char in[LINE_LEN]; /* request bytes not yet handled */
	size_t inlen;
	char hdr[32]; /* the reply being sent: its header line, then data */
	size_t hdrlen, hdroff;
	char *data;
	size_t datalen, dataoff;
	struct conn *prev, *next; /* every connection, for the shutdown */
};

static int dirfd_ = -1; /* the directory served */
static int ep = -1;     /* the epoll instance */
static opq_queue *q;
static opq_chan *ch;
static struct conn *conns; /* open, or closed with a read in flight */
static struct conn *dead;  /* closed: freed after the current batch of events */
static bool stopping;
static unsigned long served, failed, accepted;
/* epoll_event.data.ptr of the descriptors that are not connections */
static char tag_listen, tag_signal, tag_chan;

/* On a runner: open the file, check it, read all of it. */
static void read_file(opq_op *op)
{
	struct req *r = OPQ_CONTAINER_OF(op, struct req, op);
	r->data = NULL;
	r->len = 0;
	r->err = 0;
	int fd = openat(dirfd_, r->name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0) {
		r->err = errno;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		r->err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
		goto out;
	}
	if (st.st_size > FILE_MAX) {
		r->err = EFBIG;
		goto out;
	}
	size_t size = (size_t)st.st_size;
	r->data = malloc(size ? size : 1);
	if (!r->data) {
		r->err = ENOMEM;
		goto out;
	}
	while (r->len < size) { /* a file that shrinks meanwhile is sent as read */
		ssize_t n = pread(fd, r->data + r->len, size - r->len, (off_t)r->len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r->err = errno;
			break;
		}
		if (n == 0)
			break;
		r->len += (size_t)n;
	}
out:
	if (r->err) {
		free(r->data);
		r->data = NULL;
	}
	if (fd >= 0)
		close(fd);
}

static void conn_watch(struct conn *c)
{
	uint32_t want = (!c->eof && c->inlen < sizeof(c->in) ? EPOLLIN : 0) |
	                (c->hdrlen > c->hdroff || c->datalen > c->dataoff ? EPOLLOUT : 0);
	if (want != c->events) {
		struct epoll_event ev = {.events = want, .data.ptr = c};
		epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
		c->events = want;
	}
}

/*
 * Close the socket; the connection itself goes once its read has completed,
 * and not before the loop is done with the events it has in hand (a later
 * event of the same batch may name it).
 */
static void conn_close(struct conn *c)
{
	if (c->fd >= 0) {
		close(c->fd); /* leaves the epoll set too */
		c->fd = -1;
	}
	if (c->busy)
		return;
	if (c->prev)
		c->prev->next = c->next;
	else
		conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = NULL;
	c->next = dead;
	dead = c;
}

static void free_dead(void)
{
	while (dead) {
		struct conn *c = dead;
		dead = c->next;
		free(c->data);
		free(c->req.data);
		free(c);
	}
}

static void conn_process(struct conn *c);

/* Send what is left of the reply; the next request once it is all sent. */
static void conn_flush(struct conn *c)
{
	while (c->hdrlen > c->hdroff || c->datalen > c->dataoff) {
		struct iovec iov[2] = {{c->hdr + c->hdroff, c->hdrlen - c->hdroff}, {NULL, 0}};
		if (c->data) /* none for an error or an empty file */
			iov[1] = (struct iovec){c->data + c->dataoff, c->datalen - c->dataoff};
		struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
		ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			conn_watch(c); /* EPOLLOUT until it is sent */
			return;
		}
		if (n < 0) {
			conn_close(c);
			return;
		}
		size_t h = c->hdrlen - c->hdroff < (size_t)n ? c->hdrlen - c->hdroff : (size_t)n;
		c->hdroff += h;
		c->dataoff += (size_t)n - h;
	}
	free(c->data);
	c->data = NULL;
	c->hdrlen = c->hdroff = c->datalen = c->dataoff = 0;
	conn_process(c);
}

static void reply_error(struct conn *c, int err)
{
	c->hdrlen = (size_t)snprintf(c->hdr, sizeof(c->hdr), "ERR %d\n", err);
	failed++;
	conn_flush(c);
}

/* On the loop thread: the read is done (0) or was dropped (ECANCELED). */
static void read_done(opq_op *op, int status)
{
	struct req *r = OPQ_CONTAINER_OF(op, struct req, op);
	struct conn *c = OPQ_CONTAINER_OF(r, struct conn, req);
	c->busy = false;
	if (status != 0 || stopping || c->fd < 0) {
		free(r->data);
		r->data = NULL;
		conn_close(c);
		return;
	}
	if (r->err) {
		reply_error(c, r->err);
		return;
	}
	c->data = r->data;
	c->datalen = r->len;
	r->data = NULL;
	c->hdrlen = (size_t)snprintf(c->hdr, sizeof(c->hdr), "OK %zu\n", c->datalen);
	served++;
	conn_flush(c);
}

/* A name the server refuses: empty, too long, with a '/', "." or "..". */
static bool bad_name(const char *name, size_t len)
{
	return len == 0 || len > NAME_LEN || memchr(name, '/', len) || memchr(name, '\0', len) ||
	       (len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.');
}

/* Handle the next complete request line, unless a reply is under way. */
static void conn_process(struct conn *c)
{
	if (c->fd < 0 || c->busy || c->hdrlen || stopping)
		return;
	char *nl = memchr(c->in, '\n', c->inlen);
	if (!nl) {
		if (c->eof || c->inlen == sizeof(c->in))
			conn_close(c); /* all answered, or a line longer than any request */
		else
			conn_watch(c);
		return;
	}
	size_t len = (size_t)(nl - c->in);
	if (len && c->in[len - 1] == '\r')
		len--;
	char line[LINE_LEN];
	memcpy(line, c->in, len);
	c->inlen -= (size_t)(nl + 1 - c->in);
	memmove(c->in, nl + 1, c->inlen);
	if (len < 4 || memcmp(line, "GET ", 4) || bad_name(line + 4, len - 4)) {
		reply_error(c, EINVAL);
		return;
	}
	memcpy(c->req.name, line + 4, len - 4);
	c->req.name[len - 4] = '\0';
	c->busy = true;
	int rc = opq_queue_enqueue(q, &c->req.op);
	if (rc) {
		c->busy = false;
		reply_error(c, rc);
		return;
	}
	conn_watch(c);
}

static void conn_readable(struct conn *c)
{
	while (c->inlen < sizeof(c->in)) {
		ssize_t n = recv(c->fd, c->in + c->inlen, sizeof(c->in) - c->inlen, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n == 0) {
			c->eof = true; /* a half-close: the requests sent still get replies */
			break;
		}
		if (n < 0) {
			conn_close(c); /* reset */
			return;
		}
		c->inlen += (size_t)n;
	}
	conn_process(c);
}

static void accept_all(int lfd)
{
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return; /* EAGAIN, or out of descriptors: try at the next readiness */
		struct conn *c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->events = EPOLLIN;
		opq_op_init(&c->req.op, read_file, NULL);
		opq_op_set_completion(&c->req.op, ch, read_done);
		struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
			close(fd);
			free(c);
			continue;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		c->next = conns;
		if (conns)
			conns->prev = c;
		conns = c;
		accepted++;
	}
}

/* Run the channel until every read has completed, then destroy it. */
static int drain_channel(void)
{
	int fd, rc;
	opq_chan_fd(ch, &fd);
	while ((rc = opq_chan_destroy(ch)) == EBUSY) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		if (poll(&p, 1, 10000) == 0) {
			fprintf(stderr,
			        "opqueue-fileserver: completions still missing after 10 s\n");
			return ETIMEDOUT;
		}
		if ((rc = opq_chan_run(ch, RUN_BATCH, NULL)))
			return rc;
	}
	ch = NULL;
	return rc;
}

static int listen_on(const char *addr, int port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
		fprintf(stderr, "opqueue-fileserver: %s is not an IPv4 address\n", addr);
		return -1;
	}
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int one = 1;
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 128)) {
		fprintf(stderr, "opqueue-fileserver: %s:%d: %s\n", addr, port, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* Write the port to file: to a temporary name first, so a reader sees all of it. */
static int write_port(const char *file, int port)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", file);
	FILE *f = fopen(tmp, "w");
	if (!f || fprintf(f, "%d\n", port) < 0 || fclose(f) || rename(tmp, file)) {
		fprintf(stderr, "opqueue-fileserver: %s: %s\n", file, strerror(errno));
		return -1;
	}
	return 0;
}

static int serve(const char *dir, const char *addr, int port, const char *portfile,
                 unsigned runners)
{
	dirfd_ = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd_ < 0) {
		fprintf(stderr, "opqueue-fileserver: %s: %s\n", dir, strerror(errno));
		return 1;
	}
	/* Before the runners exist, so that they inherit the mask: the
	 * signals wait for the signalfd, whatever thread they are sent to. */
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	int sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
	int lfd = listen_on(addr, port);
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (sfd < 0 || lfd < 0 || ep < 0)
		return 1;
	struct sockaddr_in sa;
	socklen_t salen = sizeof(sa);
	getsockname(lfd, (struct sockaddr *)&sa, &salen);
	port = ntohs(sa.sin_port);

	opq_queue_attr *attr;
	int rc, cfd;
	if ((rc = opq_queue_attr_create(&attr)) == 0) {
		opq_queue_attr_set_name(attr, "fsrv");
		rc = opq_queue_create(&q, attr);
		opq_queue_attr_destroy(attr);
	}
	if (rc || (rc = opq_chan_create(&ch)) || (rc = opq_chan_fd(ch, &cfd)) ||
	    (rc = opq_queue_start(q, runners))) {
		fprintf(stderr, "opqueue-fileserver: %s\n", strerror(rc));
		return 1;
	}
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &tag_chan};
	epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev);
	ev.data.ptr = &tag_listen;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	ev.data.ptr = &tag_signal;
	epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
	if (portfile && write_port(portfile, port))
		return 1;
	printf("opqueue-fileserver: serving %s on %s:%d with %u runners\n", dir, addr, port,
	       runners);
	fflush(stdout);

	while (!stopping) {
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, -1);
		if (n < 0 && errno != EINTR) {
			perror("opqueue-fileserver: epoll_wait");
			break;
		}
		for (int i = 0; i < n && !stopping; i++) {
			void *p = evs[i].data.ptr;
			if (p == &tag_chan) {
				opq_chan_run(ch, RUN_BATCH, NULL);
			} else if (p == &tag_listen) {
				accept_all(lfd);
			} else if (p == &tag_signal) {
				stopping = true;
			} else {
				/* closed by an earlier event of this batch, perhaps */
				struct conn *c = p;
				if (c->fd < 0)
					continue;
				if (evs[i].events & (EPOLLHUP | EPOLLERR))
					conn_close(c); /* no reply can reach the peer */
				else if (evs[i].events & EPOLLIN)
					conn_readable(c);
				if (c->fd >= 0 && (evs[i].events & EPOLLOUT))
					conn_flush(c);
			}
		}
		free_dead();
	}

	/* Shut down: no new connections, the waiting reads dropped (their
	 * completions run with ECANCELED), the running ones finished. */
	close(lfd);
	rc = opq_queue_stop(q, OPQ_STOP_DISCARD);
	if (!rc)
		rc = drain_channel();
	if (!rc)
		rc = opq_queue_destroy(q);
	while (conns) {
		conns->busy = false;
		conn_close(conns);
	}
	free_dead();
	close(sfd);
	close(ep);
	close(dirfd_);
	fprintf(stderr,
	        "opqueue-fileserver: stopped: %lu connections, %lu files sent, %lu errors\n",
	        accepted, served, failed);
	if (rc)
		fprintf(stderr, "opqueue-fileserver: shutdown: %s\n", strerror(rc));
	return rc ? 1 : 0;
}

/* ---- the client ---------------------------------------------------------- */

/* What a name should get: the file's bytes, or ERR with err. */
struct expect {
	char name[NAME_LEN + 1];
	int err;
	char *data;
	size_t len;
};

static struct expect *names;
static size_t nnames;
static struct sockaddr_in server;
static long per_conn;
static bool half_close;     /* -H */
#define HALF_CLOSE_MAX 1000 /* requests per connection with -H */

struct client {
	pthread_t th;
	unsigned seed;
	long ok, errs, wrong;
	int fd;
	char buf[65536];
	size_t have, off;
};

/* Read exactly len bytes into dst (NULL: compare with cmp instead); -1 on EOF or error. */
static int client_read(struct client *cl, char *dst, const char *cmp, size_t len, bool *same)
{
	while (len) {
		if (cl->off == cl->have) {
			ssize_t n = recv(cl->fd, cl->buf, sizeof(cl->buf), 0);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return -1;
			cl->have = (size_t)n;
			cl->off = 0;
		}
		size_t k = cl->have - cl->off < len ? cl->have - cl->off : len;
		if (dst) {
			memcpy(dst, cl->buf + cl->off, k);
			dst += k;
		} else if (memcmp(cmp, cl->buf + cl->off, k)) {
			*same = false;
		}
		if (cmp)
			cmp += k;
		cl->off += k;
		len -= k;
	}
	return 0;
}

/* Read one reply and check it against e: 1 right, 0 wrong, -1 connection lost. */
static int client_check(struct client *cl, const struct expect *e)
{
	char line[64];
	size_t n = 0;
	for (;;) {
		if (n == sizeof(line) - 1 || client_read(cl, line + n, NULL, 1, NULL))
			return -1;
		if (line[n++] == '\n')
			break;
	}
	line[n] = '\0';
	char want[64];
	if (e->err) {
		snprintf(want, sizeof(want), "ERR %d\n", e->err);
		if (strcmp(line, want)) {
			fprintf(stderr, "opqueue-fileserver: %s: got \"%.*s\", want \"%.*s\"\n",
			        e->name, (int)n - 1, line, (int)strlen(want) - 1, want);
			return 0;
		}
		return 1;
	}
	snprintf(want, sizeof(want), "OK %zu\n", e->len);
	if (strcmp(line, want)) {
		fprintf(stderr, "opqueue-fileserver: %s: got \"%.*s\", want \"%.*s\"\n", e->name,
		        (int)n - 1, line, (int)strlen(want) - 1, want);
		return 0; /* the stream cannot be followed any more: the caller stops */
	}
	bool same = true;
	if (client_read(cl, NULL, e->data, e->len, &same))
		return -1;
	if (!same)
		fprintf(stderr, "opqueue-fileserver: %s: the bytes differ from the file's\n",
		        e->name);
	return same ? 1 : 0;
}

static int send_all(int fd, const char *p, size_t len)
{
	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * -H: every request of the connection at once, then a half-close, then the
 * replies, then the server's close. The requests fit in the socket's
 * buffers (at most HALF_CLOSE_MAX of them), so that sending all of them
 * before reading cannot block for good.
 */
static void client_half_close(struct client *cl)
{
	const struct expect **e = calloc((size_t)per_conn, sizeof(*e));
	char *req = malloc((size_t)per_conn * (NAME_LEN + 6));
	size_t len = 0;
	if (!e || !req) {
		cl->wrong++;
		goto out;
	}
	for (long i = 0; i < per_conn; i++) {
		e[i] = &names[(size_t)rand_r(&cl->seed) % nnames];
		len += (size_t)sprintf(req + len, "GET %s\n", e[i]->name);
	}
	if (send_all(cl->fd, req, len) || shutdown(cl->fd, SHUT_WR)) {
		fprintf(stderr, "opqueue-fileserver: send: %s\n", strerror(errno));
		cl->wrong++;
		goto out;
	}
	for (long i = 0; i < per_conn; i++) {
		int r = client_check(cl, e[i]);
		if (r < 0)
			fprintf(stderr, "opqueue-fileserver: %s: connection lost\n", e[i]->name);
		if (r <= 0) {
			cl->wrong++;
			goto out;
		}
		if (e[i]->err)
			cl->errs++;
		else
			cl->ok++;
	}
	char c;
	if (client_read(cl, &c, NULL, 1, NULL) == 0) {
		fprintf(stderr, "opqueue-fileserver: bytes after the last reply\n");
		cl->wrong++;
	}
out:
	free(e);
	free(req);
}

/* One connection: requests one at a time, every eighth time two at once (pipelined). */
static void *client_run(void *arg)
{
	struct client *cl = arg;
	cl->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct timeval tv = {.tv_sec = 60};
	if (cl->fd < 0 || setsockopt(cl->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) ||
	    connect(cl->fd, (struct sockaddr *)&server, sizeof(server))) {
		fprintf(stderr, "opqueue-fileserver: connect: %s\n", strerror(errno));
		cl->wrong++;
		return NULL;
	}
	if (half_close) {
		client_half_close(cl);
		goto out;
	}
	for (long i = 0; i < per_conn;) {
		const struct expect *e[2];
		int k = (i % 8 == 7 && i + 1 < per_conn) ? 2 : 1;
		char req[2 * (NAME_LEN + 6)];
		size_t len = 0;
		for (int j = 0; j < k; j++) {
			e[j] = &names[(size_t)rand_r(&cl->seed) % nnames];
			len +=
			    (size_t)snprintf(req + len, sizeof(req) - len, "GET %s\n", e[j]->name);
		}
		if (send_all(cl->fd, req, len)) {
			fprintf(stderr, "opqueue-fileserver: send: %s\n", strerror(errno));
			cl->wrong++;
			break;
		}
		for (int j = 0; j < k; j++, i++) {
			int r = client_check(cl, e[j]);
			if (r < 0)
				fprintf(stderr, "opqueue-fileserver: %s: connection lost\n",
				        e[j]->name);
			if (r <= 0) {
				cl->wrong++;
				goto out;
			}
			if (e[j]->err)
				cl->errs++;
			else
				cl->ok++;
		}
	}
out:
	close(cl->fd);
	return NULL;
}

static int add_name(const char *name, int err, char *data, size_t len)
{
	struct expect *n = realloc(names, (nnames + 1) * sizeof(*names));
	if (!n)
		return -1;
	names = n;
	struct expect *e = &names[nnames++];
	snprintf(e->name, sizeof(e->name), "%s", name);
	e->err = err;
	e->data = data;
	e->len = len;
	return 0;
}

/* Every regular file of dir with its bytes, some missing names, some refused ones. */
static int load_names(const char *dir)
{
	DIR *d = opendir(dir);
	if (!d) {
		fprintf(stderr, "opqueue-fileserver: %s: %s\n", dir, strerror(errno));
		return -1;
	}
	int dfd = dirfd(d);
	struct dirent *de;
	while ((de = readdir(d))) {
		struct stat st;
		if (de->d_name[0] == '.' || strlen(de->d_name) > NAME_LEN ||
		    fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) || !S_ISREG(st.st_mode) ||
		    st.st_size > FILE_MAX)
			continue;
		size_t size = (size_t)st.st_size, got = 0;
		char *data = malloc(size ? size : 1);
		int fd = openat(dfd, de->d_name, O_RDONLY | O_CLOEXEC);
		while (data && fd >= 0 && got < size) {
			ssize_t n = pread(fd, data + got, size - got, (off_t)got);
			if (n <= 0)
				break;
			got += (size_t)n;
		}
		if (fd >= 0)
			close(fd);
		if (!data || got != size || add_name(de->d_name, 0, data, size)) {
			fprintf(stderr, "opqueue-fileserver: cannot read %s/%s\n", dir, de->d_name);
			free(data);
			closedir(d);
			return -1;
		}
	}
	closedir(d);
	if (nnames == 0) {
		fprintf(stderr, "opqueue-fileserver: no regular files in %s\n", dir);
		return -1;
	}
	size_t files = nnames;
	for (int i = 0; i < 3; i++) {
		char name[64];
		snprintf(name, sizeof(name), "no-such-file-%d", i);
		if (access(name, F_OK) == 0)
			continue;
		if (add_name(name, ENOENT, NULL, 0))
			return -1;
	}
	static const char *const refused[] = {"..", ".", "../etc/passwd", "a/b", "/etc/passwd"};
	for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++)
		if (add_name(refused[i], EINVAL, NULL, 0))
			return -1;
	/* Files twice as often as the rest: most requests carry bytes. */
	size_t others = nnames - files;
	for (size_t i = 0; i < files && others; i++) {
		struct expect e = names[i]; /* add_name moves names */
		if (add_name(e.name, 0, e.data, e.len))
			return -1;
	}
	return 0;
}

static int client(const char *dir, const char *addr, int port, unsigned k, long n)
{
	server = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, addr, &server.sin_addr) != 1) {
		fprintf(stderr, "opqueue-fileserver: %s is not an IPv4 address\n", addr);
		return 2;
	}
	if (chdir(dir)) { /* where load_names looks */
		fprintf(stderr, "opqueue-fileserver: %s: %s\n", dir, strerror(errno));
		return 1;
	}
	if (load_names("."))
		return 1;
	per_conn = (n + (long)k - 1) / (long)k;
	struct client *cl = calloc(k, sizeof(*cl));
	if (!cl)
		return 1;
	for (unsigned i = 0; i < k; i++) {
		cl[i].seed = 12345u + i;
		if (pthread_create(&cl[i].th, NULL, client_run, &cl[i])) {
			fprintf(stderr, "opqueue-fileserver: cannot start a client thread\n");
			return 1;
		}
	}
	long ok = 0, errs = 0, wrong = 0;
	for (unsigned i = 0; i < k; i++) {
		pthread_join(cl[i].th, NULL);
		ok += cl[i].ok;
		errs += cl[i].errs;
		wrong += cl[i].wrong;
	}
	free(cl);
	printf("opqueue-fileserver: %ld requests on %u connections: %ld files, %ld errors as "
	       "expected, %ld wrong\n",
	       ok + errs, k, ok, errs, wrong);
	return wrong || ok + errs != per_conn * (long)k ? 1 : 0;
}

/* ---- main ----------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(f, "usage: opqueue-fileserver [-d dir] [-a addr] [-p port] [-P portfile] "
	           "[-r runners]\n"
	           "       opqueue-fileserver -c [-H] -p port [-d dir] [-a addr] [-k connections] "
	           "[-n requests]\n");
}

int main(int argc, char **argv)
{
	const char *dir = ".", *addr = "127.0.0.1", *portfile = NULL;
	int port = -1, opt;
	bool client_mode = false;
	long runners = 2, k = 4, n = 1000;
	while ((opt = getopt(argc, argv, "a:cd:Hk:n:p:P:r:h")) != -1) {
		switch (opt) {
		case 'a':
			addr = optarg;
			break;
		case 'c':
			client_mode = true;
			break;
		case 'H':
			half_close = true;
			break;
		case 'd':
			dir = optarg;
			break;
		case 'k':
			k = atol(optarg);
			break;
		case 'n':
			n = atol(optarg);
			break;
		case 'p':
			port = atoi(optarg);
			break;
		case 'P':
			portfile = optarg;
			break;
		case 'r':
			runners = atol(optarg);
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	const char *bad = NULL;
	if (optind != argc)
		bad = "unexpected argument";
	else if (runners < 1 || runners > 256)
		bad = "-r takes 1 to 256 runners";
	else if (k < 1 || k > 1024)
		bad = "-k takes 1 to 1024 connections";
	else if (n < 1)
		bad = "-n takes at least 1 request";
	else if (half_close && (n + k - 1) / k > HALF_CLOSE_MAX)
		bad = "-H takes at most 1000 requests per connection";
	else if (port > 65535 || (client_mode && port < 1))
		bad = client_mode ? "-c needs -p with the server's port" : "-p takes a port";
	if (bad) {
		fprintf(stderr, "opqueue-fileserver: %s\n", bad);
		usage(stderr);
		return 2;
	}
	if (client_mode)
		return client(dir, addr, port, (unsigned)k, n);
	return serve(dir, addr, port < 0 ? 0 : port, portfile, (unsigned)runners);
}
