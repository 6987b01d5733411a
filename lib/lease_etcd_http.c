/*
 * lease_etcd_http.c: the etcd provider's requests: one POST to a member's
 * JSON gateway with libcurl, failover between members, the handle pool.
 *
 * Handles: a pool of curl easy handles, a stack of up to ETCD_POOL_MAX
 * idle ones. A call takes one (or makes one) for its requests and gives it
 * back, so concurrent calls (a keepalive and an acquire) never wait behind
 * each other's round trip, and each handle's connection cache keeps its
 * connections to the members open between calls.
 *
 * Failover: a call starts at the member that answered last and, on a
 * failure of the transport (refused, reset, timed out, a reply that is not
 * the gateway's) or of the member (etcd's Unavailable, as a member without
 * a leader answers, DeadlineExceeded, ResourceExhausted), tries the next,
 * until every member was tried once or the deadline passed. Each attempt
 * is bounded by the client's request timeout and by its share of what is
 * left of the deadline (what is left divided by the members not tried yet),
 * so a frozen member, which accepts the connection and never answers,
 * leaves time for the others. Every request the provider makes is safe to
 * repeat on another member after a failure whose outcome is unknown
 * (lease_etcd.c says why for each).
 *
 * The library never reads the environment, so no proxy is taken from
 * http_proxy and its kin (CURLOPT_PROXY ""). libcurl runs with CURLOPT_NOSIGNAL (the library
 * installs no signal handler and raises no SIGALRM); on Linux it sends with MSG_NOSIGNAL, so a
 * member that closed its end raises no SIGPIPE either.
 */
#include "config.h"

#include "lease_etcd_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

/* A reply larger than this is not one of ours. */
#define REPLY_MAX (1 << 20)
/* An attempt's share of the deadline is never below this (when left). */
#define ATTEMPT_MIN_NS (100LL * 1000000LL)

static const char *const PATHS[ETCD_NKINDS] = {
    [ETCD_RANGE] = "/v3/kv/range",      [ETCD_TXN] = "/v3/kv/txn",
    [ETCD_GRANT] = "/v3/lease/grant",   [ETCD_KEEPALIVE] = "/v3/lease/keepalive",
    [ETCD_REVOKE] = "/v3/lease/revoke",
};

static int64_t ns_until(const struct timespec *dl)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(dl->tv_sec - now.tv_sec) * ETCD_NS_PER_S + (dl->tv_nsec - now.tv_nsec);
}

int opq__etcd_grpc_errno(int code)
{
	switch (code) {
	case 0:
		return 0;
	case 1: /* Cancelled */
	case 4: /* DeadlineExceeded */
		return ETIMEDOUT;
	case 3:  /* InvalidArgument */
	case 11: /* OutOfRange */
		return EINVAL;
	case 5: /* NotFound */
		return ENOENT;
	case 7:  /* PermissionDenied */
	case 16: /* Unauthenticated */
		return EACCES;
	case 8:  /* ResourceExhausted */
	case 14: /* Unavailable */
		return EAGAIN;
	case 12: /* Unimplemented */
		return ENOSYS;
	default:
		return EIO;
	}
}

/* An error of etcd's after which another member may do better. */
static bool member_failed(int code)
{
	return code == 4 || code == 8 || code == 14;
}

struct body {
	char *buf;
	size_t len, cap;
	bool over;
};

static size_t on_data(char *ptr, size_t size, size_t n, void *arg)
{
	struct body *b = arg;
	size_t add = size * n;
	if (b->len + add > REPLY_MAX) {
		b->over = true;
		return 0; /* ends the transfer with CURLE_WRITE_ERROR */
	}
	if (b->len + add > b->cap) {
		size_t cap = b->cap ? b->cap : 1024;
		while (cap < b->len + add)
			cap *= 2;
		char *nb = realloc(b->buf, cap);
		if (nb == NULL)
			return 0;
		b->buf = nb;
		b->cap = cap;
	}
	memcpy(b->buf + b->len, ptr, add);
	b->len += add;
	return add;
}

static CURL *take(struct opq_lease_etcd *e)
{
	CURL *h = NULL;
	pthread_mutex_lock(&e->mu);
	if (e->nidle > 0)
		h = e->idle[--e->nidle];
	pthread_mutex_unlock(&e->mu);
	return h ? h : curl_easy_init();
}

static void give(struct opq_lease_etcd *e, CURL *h)
{
	pthread_mutex_lock(&e->mu);
	bool kept = e->nidle < ETCD_POOL_MAX;
	if (kept)
		e->idle[e->nidle++] = h;
	pthread_mutex_unlock(&e->mu);
	if (!kept)
		curl_easy_cleanup(h);
}

void opq__etcd_pool_drain(struct opq_lease_etcd *e)
{
	pthread_mutex_lock(&e->mu);
	int n = e->nidle;
	void *h[ETCD_POOL_MAX];
	memcpy(h, e->idle, sizeof(void *) * (size_t)n);
	e->nidle = 0;
	pthread_mutex_unlock(&e->mu);
	for (int i = 0; i < n; i++)
		curl_easy_cleanup(h[i]);
}

/* The errno for a failed transfer. */
static int curl_errno(CURLcode c)
{
	switch (c) {
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
		return ECONNREFUSED;
	case CURLE_OPERATION_TIMEDOUT:
		return ETIMEDOUT;
	case CURLE_OUT_OF_MEMORY:
		return ENOMEM;
	case CURLE_GOT_NOTHING:
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_PARTIAL_FILE:
		return ECONNRESET;
	default:
		return EIO;
	}
}

/*
 * One attempt on member i, bounded by ms. 0 with *r parsed (maybe an error
 * reply), or an errno with words.
 */
static int attempt(struct opq_lease_etcd *e, CURL *h, int i, enum etcd_kind kind, const char *body,
                   long ms, struct curl_slist *hdr, struct etcd_reply *r, char *errbuf,
                   size_t errlen)
{
	char url[1024];
	snprintf(url, sizeof(url), "%s%s", e->endpoints[i], PATHS[kind]);
	struct body b = {0};
	char cerr[CURL_ERROR_SIZE];
	cerr[0] = '\0';
	curl_easy_reset(h);
	curl_easy_setopt(h, CURLOPT_URL, url);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	/* No proxy: libcurl would otherwise take one from the environment. */
	curl_easy_setopt(h, CURLOPT_PROXY, "");
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_POST, 1L);
	curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, ms);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, ms);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
	CURLcode c = curl_easy_perform(h);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
	int rc;
	if (b.over) {
		opq__etcd_set_err(errbuf, errlen, "%s: reply longer than %d bytes", e->endpoints[i],
		                  REPLY_MAX);
		rc = EPROTO;
	} else if (c != CURLE_OK) {
		opq__etcd_set_err(errbuf, errlen, "%s: %s", e->endpoints[i],
		                  cerr[0] ? cerr : curl_easy_strerror(c));
		rc = curl_errno(c);
	} else {
		rc = opq__etcd_parse(kind, b.buf ? b.buf : "", b.len, r, errbuf, errlen);
		long status = 0;
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
		if (rc == 0 && r->grpc_code == 0 && status != 200) {
			opq__etcd_set_err(errbuf, errlen, "%s: HTTP status %ld", e->endpoints[i],
			                  status);
			rc = EPROTO;
		} else if (rc == EPROTO) {
			char why[200];
			snprintf(why, sizeof(why), "%s",
			         errbuf ? errbuf + (errlen > 6 ? 6 : 0) : "");
			opq__etcd_set_err(errbuf, errlen, "%s (HTTP %ld): %s", e->endpoints[i],
			                  status, why);
		}
	}
	free(b.buf);
	return rc;
}

int opq__etcd_call(struct opq_lease_etcd *e, enum etcd_kind kind, const char *body,
                   const struct timespec *dl, struct etcd_reply *r, char *errbuf, size_t errlen)
{
	CURL *h = take(e);
	if (h == NULL) {
		opq__etcd_set_err(errbuf, errlen, "out of memory for a connection");
		return ENOMEM;
	}
	struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
	/* No "Expect: 100-continue" wait before a larger body. */
	struct curl_slist *h2 = hdr ? curl_slist_append(hdr, "Expect:") : NULL;
	if (h2 == NULL) {
		curl_slist_free_all(hdr);
		give(e, h);
		opq__etcd_set_err(errbuf, errlen, "out of memory");
		return ENOMEM;
	}
	pthread_mutex_lock(&e->mu);
	int start = e->current;
	pthread_mutex_unlock(&e->mu);
	int n = e->nendpoints;
	int rc = ETIMEDOUT;
	bool tried_any = false;
	for (int k = 0; k < n; k++) {
		int i = (start + k) % n;
		int64_t left = dl ? ns_until(dl) : e->timeout_ns;
		if (left <= 0)
			break;
		int64_t bound = left < e->timeout_ns ? left : e->timeout_ns;
		int64_t share = left / (n - k);
		if (share < ATTEMPT_MIN_NS)
			share = ATTEMPT_MIN_NS;
		if (dl != NULL && share < bound) /* no deadline: each the whole timeout */
			bound = share;
		long ms = (long)((bound + 999999) / 1000000);
		tried_any = true;
		rc = attempt(e, h, i, kind, body, ms < 1 ? 1 : ms, h2, r, errbuf, errlen);
		if (rc == 0 && r->grpc_code != 0) {
			opq__etcd_set_err(errbuf, errlen, "%s: %s", e->endpoints[i], r->message);
			if (member_failed(r->grpc_code)) {
				rc = opq__etcd_grpc_errno(r->grpc_code);
				continue;
			}
		}
		if (rc == 0) {
			pthread_mutex_lock(&e->mu);
			e->current = i;
			pthread_mutex_unlock(&e->mu);
			break;
		}
		if (rc == ENOMEM)
			break;
		/* Transport failures and replies that are not the gateway's: the next member. */
		pthread_mutex_lock(&e->mu);
		if (e->current == i)
			e->current = (i + 1) % n;
		pthread_mutex_unlock(&e->mu);
	}
	if (!tried_any)
		opq__etcd_set_err(errbuf, errlen, "deadline passed before a request was sent");
	curl_slist_free_all(h2);
	give(e, h);
	return rc;
}
