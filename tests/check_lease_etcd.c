/*
 * check_lease_etcd.c: the etcd lease provider against a real three-member
 * etcd cluster, with real processes. Run through tests/etcdcluster.sh,
 * which starts the members and exports OPQ_ETCD_ENDPOINTS,
 * OPQ_ETCD_ENDPOINT0..2 and OPQ_ETCD_CTL (kill, start, stop, cont a member;
 * print the leader's index).
 *
 * Children are forked from the test process and report through exit
 * statuses, pipes and an O_APPEND log; they never call Check. Each test
 * uses its own lock names. A test that stops or kills members brings them
 * back before it asserts, so that a failure does not break the next tests.
 */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "procs.h"
#include "lease_etcd_impl.h" /* the reply parser, compiled into this test too */
#include "opqueue/lease_etcd.h"

static const char *env(const char *name)
{
	const char *v = getenv(name);
	ck_assert_msg(v != NULL, "%s not set: run through tests/etcdcluster.sh", name);
	return v;
}

static int64_t slack(int64_t ns)
{
	const char *mult = getenv("CK_TIMEOUT_MULTIPLIER");
	return ns * (mult && atoi(mult) > 1 ? atoi(mult) : 1);
}

/* A client on `endpoints` (NULL: all three members), or NULL (child-safe). */
static opq_lease_etcd *client_on(const char *endpoints, int64_t timeout_ns)
{
	char err[256];
	opq_lease_etcd_attr *a = NULL;
	opq_lease_etcd *e = NULL;
	if (opq_lease_etcd_attr_create(&a) != 0)
		return NULL;
	if (timeout_ns > 0 && opq_lease_etcd_attr_set_timeout(a, timeout_ns) != 0)
		return NULL;
	int rc = opq_lease_etcd_create(&e, endpoints ? endpoints : getenv("OPQ_ETCD_ENDPOINTS"), a,
	                               err, sizeof err);
	opq_lease_etcd_attr_destroy(a);
	if (rc != 0)
		fprintf(stderr, "opq_lease_etcd_create: %d %s\n", rc, err);
	return rc == 0 ? e : NULL;
}

/* A provider on its own client (child-safe: NULL on failure). */
static opq_lease_provider *provider_on(const char *endpoints)
{
	opq_lease_etcd *e = client_on(endpoints, 0);
	opq_lease_provider *p = NULL;
	if (e == NULL)
		return NULL;
	int rc = opq_lease_provider_etcd_create(&p, e);
	opq_lease_etcd_destroy(e);
	return rc == 0 ? p : NULL;
}

static opq_lease *lease_new(opq_lease_provider *p, const char *name, const char *owner,
                            int64_t lease_ns)
{
	opq_lease_attr *a = NULL;
	opq_lease *l = NULL;
	if (p == NULL || opq_lease_attr_create(&a) != 0)
		return NULL;
	int rc = owner ? opq_lease_attr_set_owner(a, owner) : 0;
	if (rc == 0)
		rc = opq_lease_attr_set_duration(a, lease_ns);
	if (rc == 0)
		rc = opq_lease_attr_set_poll(a, 1 * MS, 20 * MS);
	if (rc == 0)
		rc = opq_lease_create(&l, p, name, a);
	opq_lease_attr_destroy(a);
	return rc == 0 ? l : NULL;
}

/* `$OPQ_ETCD_CTL verb i`: its exit status. */
static int ctl(const char *verb, int i)
{
	char cmd[4096];
	snprintf(cmd, sizeof cmd, "'%s' %s %d", env("OPQ_ETCD_CTL"), verb, i);
	int st = system(cmd);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static const char *member_url(int i)
{
	return env(i == 0   ? "OPQ_ETCD_ENDPOINT0"
	           : i == 1 ? "OPQ_ETCD_ENDPOINT1"
	                    : "OPQ_ETCD_ENDPOINT2");
}

/* The three members' URLs, member `first` first. */
static void members_from(int first, char *buf, size_t len)
{
	snprintf(buf, len, "%s,%s,%s", member_url(first), member_url((first + 1) % 3),
	         member_url((first + 2) % 3));
}

static int leader(void)
{
	char cmd[4096];
	snprintf(cmd, sizeof cmd, "'%s' leader", env("OPQ_ETCD_CTL"));
	FILE *f = popen(cmd, "r");
	ck_assert_ptr_nonnull(f);
	int i = -1;
	if (fscanf(f, "%d", &i) != 1)
		i = -1;
	pclose(f);
	ck_assert_msg(i >= 0 && i <= 2, "no leader");
	return i;
}

/* etcdctl against the cluster: its exit status; output into out (may be NULL). */
static int etcdctl(const char *args, char *out, size_t len)
{
	char cmd[4096];
	snprintf(cmd, sizeof cmd, "ETCDCTL_API=3 etcdctl --endpoints='%s' %s 2>&1",
	         env("OPQ_ETCD_ENDPOINTS"), args);
	FILE *f = popen(cmd, "r");
	ck_assert_ptr_nonnull(f);
	size_t n = 0;
	char buf[4096];
	size_t got;
	while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
		if (out && n + 1 < len) {
			size_t c = got < len - 1 - n ? got : len - 1 - n;
			memcpy(out + n, buf, c);
			n += c;
		}
	}
	if (out && len)
		out[n] = '\0';
	int st = pclose(f);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

struct lost_state {
	atomic_int calls;
	atomic_int why;
	_Atomic int64_t at;
};

static void on_lost(opq_lease *l, enum opq_lease_lost_reason why, void *arg)
{
	(void)l;
	struct lost_state *s = arg;
	atomic_store(&s->at, t_now_ns());
	atomic_store(&s->why, (int)why);
	atomic_fetch_add(&s->calls, 1);
}

/* ---- the reply parser, without a cluster ---- */

START_TEST(test_parse)
{
	struct etcd_reply r;
	char err[128];
#define PARSE(kind, text) opq__etcd_parse(kind, text, strlen(text), &r, err, sizeof err)
	/* What etcd 3.4 sends: 64-bit integers as strings, zero values left out. */
	ck_assert_int_eq(PARSE(ETCD_TXN, "{\"header\":{\"revision\":\"9\"},\"succeeded\":true}"),
	                 0);
	ck_assert_int_eq(r.revision, 9);
	ck_assert(r.succeeded);
	ck_assert(!r.kv.present);
	ck_assert_int_eq(
	    PARSE(ETCD_TXN, "{\"responses\":[{\"response_put\":{}},{\"response_range\":{\"kvs\":[{"
	                    "\"create_revision\":\"7\",\"lease\":\"-5\",\"value\":\"YQBi\"}]}}]}"),
	    0);
	ck_assert(!r.succeeded);
	ck_assert(r.kv.present);
	ck_assert_int_eq(r.kv.create_revision, 7);
	ck_assert_int_eq(r.kv.lease, -5);
	ck_assert_uint_eq(r.kv.value_len, 3);
	ck_assert_int_eq(memcmp(r.kv.value, "a\0b", 3), 0);
	ck_assert_int_eq(
	    PARSE(ETCD_KEEPALIVE, "{\"result\":{\"ID\":\"12\",\"TTL\":\"3\"}}\n{\"x\":1}"), 0);
	ck_assert_int_eq(r.id, 12);
	ck_assert_int_eq(r.ttl, 3);
	ck_assert_int_eq(PARSE(ETCD_KEEPALIVE, "{\"result\":{\"ID\":\"12\"}}"), 0);
	ck_assert_int_eq(r.ttl, 0); /* a lease etcd no longer has */
	ck_assert_int_eq(PARSE(ETCD_GRANT, "{\"ID\":9223372036854775807,\"TTL\":1}"), 0);
	ck_assert_int_eq(r.id, INT64_MAX);
	ck_assert_int_eq(PARSE(ETCD_REVOKE, "{\"error\":\"etcdserver: requested lease not found\","
	                                    "\"message\":\"not\\nfound\",\"code\":5}"),
	                 0);
	ck_assert_int_eq(r.grpc_code, 5);
	ck_assert_str_eq(r.message, "not found");
	ck_assert_int_eq(
	    PARSE(ETCD_KEEPALIVE, "{\"error\":{\"grpc_code\":14,\"message\":\"no leader\"}}"), 0);
	ck_assert_int_eq(r.grpc_code, 14);
	ck_assert_int_eq(PARSE(ETCD_RANGE, "{\"error\":\"x\",\"code\":0}"), 0);
	ck_assert_int_eq(r.grpc_code, 2); /* an error without a code is still one */
	/* Anything else is EPROTO, with words, and nothing is taken from it. */
	static const char *const bad[] = {
	    "",
	    "null",
	    "[]",
	    "{\"header\":{\"revision\":\"9\"}",
	    "{\"header\":{\"revision\":\"9\"}} trailing",
	    "{\"header\":[]}",
	    "{\"header\":{\"revision\":\"9223372036854775808\"}}",
	    "{\"header\":{\"revision\":\"-\"}}",
	    "{\"header\":{\"revision\":\"1e3\"}}",
	    "{\"header\":{\"revision\":\" 12\"}}",
	    "{\"header\":{\"revision\":true}}",
	    "{\"header\":{\"revision\":\"1\",\"revision\":\"2\"}}",
	    "{\"kvs\":{}}",
	    "{\"kvs\":[1]}",
	    "{\"kvs\":[{\"create_revision\":\"-1\"}]}",
	    "{\"kvs\":[{\"value\":\"YQB\"}]}",
	    "{\"kvs\":[{\"value\":\"YR==\"}]}",
	    "{\"kvs\":[{\"value\":\"Y*==\"}]}",
	    "{\"kvs\":[{\"value\":7}]}",
	    "{\"error\":\"x\",\"code\":\"five\"}",
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		err[0] = '\0';
		ck_assert_msg(PARSE(ETCD_RANGE, bad[i]) == EPROTO, "accepted %s", bad[i]);
		ck_assert_msg(strncmp(err, "etcd: malformed reply", 21) == 0, "%s: %s", bad[i],
		              err);
		ck_assert(!r.kv.present && r.revision == 0);
	}
	ck_assert_int_eq(PARSE(ETCD_TXN, "{\"succeeded\":\"yes\"}"), EPROTO);
	ck_assert_int_eq(PARSE(ETCD_TXN, "{\"responses\":{}}"), EPROTO);
	ck_assert_int_eq(PARSE(ETCD_TXN, "{\"responses\":[7]}"), EPROTO);
	ck_assert_int_eq(PARSE(ETCD_KEEPALIVE, "{\"header\":{}}"), EPROTO);
	ck_assert_int_eq(PARSE(ETCD_GRANT, "{\"ID\":1.5}"), EPROTO);
	ck_assert_int_eq(opq__etcd_parse(ETCD_NKINDS, "{}", 2, &r, err, sizeof err), EPROTO);
	ck_assert_int_eq(opq__etcd_parse(ETCD_RANGE, NULL, 0, &r, err, sizeof err), EPROTO);
	/* Not NUL-terminated: only len bytes are read. */
	ck_assert_int_eq(opq__etcd_parse(ETCD_RANGE, "{}xxxx", 2, &r, NULL, 0), 0);
	/* A value too long to keep is flagged, not truncated. */
	size_t big = ETCD_VALUE_MAX + 3;
	unsigned char *raw = calloc(1, big);
	char *b64 = opq__etcd_b64(raw, big);
	char *text =
	    opq__etcd_strf("{\"kvs\":[{\"create_revision\":\"1\",\"value\":\"%s\"}]}", b64);
	ck_assert_int_eq(PARSE(ETCD_RANGE, text), 0);
	ck_assert(r.kv.value_long);
	ck_assert_uint_eq(r.kv.value_len, 0);
	free(raw);
	free(b64);
	free(text);
	/* A reply nested deeper than jansson's limit: refused, not a stack overflow. */
	size_t depth = 100000;
	char *deep = malloc(depth * 2 + 1);
	memset(deep, '[', depth);
	memset(deep + depth, ']', depth);
	deep[depth * 2] = '\0';
	ck_assert_int_eq(PARSE(ETCD_RANGE, deep), EPROTO);
	free(deep);
#undef PARSE
}
END_TEST

/* ---- the operations, one process ---- */

START_TEST(test_basics)
{
	opq_lease_provider *p = provider_on(NULL);
	ck_assert_ptr_nonnull(p);
	opq_lease *a = lease_new(p, "basics", "basics-A", 2 * SEC);
	opq_lease *b = lease_new(p, "basics", "basics-B", 2 * SEC);
	ck_assert_ptr_nonnull(a);
	ck_assert_ptr_nonnull(b);
	opq_lease_grant g1, g2;
	ck_assert_int_eq(opq_lease_try_acquire(a, &g1), 0);
	ck_assert_uint_gt(g1.token, 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
	/* A retried acquire by the holder keeps the token (its lease is extended). */
	ck_assert_int_eq(opq_lease_try_acquire(a, &g2), 0);
	ck_assert_uint_eq(g2.token, g1.token);
	ck_assert_int_eq(opq_lease_refresh(a, &g2), 0);
	ck_assert_uint_eq(g2.token, g1.token);
	/* The key: the prefix and the name; the value: owner, NUL, data. */
	char out[4096];
	ck_assert_int_eq(etcdctl("get opq/lease/basics --print-value-only", out, sizeof out), 0);
	ck_assert_msg(strncmp(out, "basics-A", 8) == 0, "%s", out);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_release(a), 0); /* idempotent */
	ck_assert_int_eq(opq_lease_refresh(a, NULL), ENOLCK);
	ck_assert_int_eq(etcdctl("get opq/lease/basics", out, sizeof out), 0);
	ck_assert_msg(out[0] == '\0', "the key is still there: %s", out);
	/* A release once the client has forgotten the grant's lease (it keeps
	 * the last 64): the transaction, then the revoke. */
	ck_assert_int_eq(opq_lease_try_acquire(a, &g1), 0);
	opq_lease *other = lease_new(p, "basics-other", "basics-A", 2 * SEC);
	ck_assert_ptr_nonnull(other);
	for (int i = 0; i < 70; i++) {
		ck_assert_int_eq(opq_lease_try_acquire(other, NULL), 0);
		ck_assert_int_eq(opq_lease_release(other), 0);
	}
	ck_assert_int_eq(opq_lease_destroy(other), 0);
	ck_assert_int_eq(opq_lease_try_acquire(b, NULL), EBUSY);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(etcdctl("get opq/lease/basics", out, sizeof out), 0);
	ck_assert_msg(out[0] == '\0', "the key is still there: %s", out);
	/* Released: B gets a greater token; A's stale release does not touch it. */
	ck_assert_int_eq(opq_lease_try_acquire(b, &g2), 0);
	ck_assert_uint_gt(g2.token, g1.token);
	ck_assert_int_eq(opq_lease_try_acquire(a, NULL), EBUSY);
	ck_assert_int_eq(opq_lease_release(a), 0);
	ck_assert_int_eq(opq_lease_refresh(b, NULL), 0);
	ck_assert_int_eq(opq_lease_release(b), 0);
	/* The longest name and data. */
	char name[OPQ_LEASE_NAME_MAX + 1];
	memset(name, 'n', OPQ_LEASE_NAME_MAX);
	name[OPQ_LEASE_NAME_MAX] = '\0';
	opq_lease_attr *at = NULL;
	ck_assert_int_eq(opq_lease_attr_create(&at), 0);
	unsigned char data[OPQ_LEASE_DATA_MAX];
	for (size_t i = 0; i < sizeof data; i++)
		data[i] = (unsigned char)i;
	ck_assert_int_eq(opq_lease_attr_set_data(at, data, sizeof data), 0);
	opq_lease *l = NULL;
	ck_assert_int_eq(opq_lease_create(&l, p, name, at), 0);
	opq_lease_attr_destroy(at);
	ck_assert_int_eq(opq_lease_try_acquire(l, &g1), 0);
	ck_assert_int_eq(opq_lease_try_acquire(l, &g2), 0);
	ck_assert_uint_eq(g1.token, g2.token);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* The guard: a write goes through only while the lock has the holder's token. */
START_TEST(test_guard)
{
	opq_lease_etcd *e = client_on(NULL, 0);
	ck_assert_ptr_nonnull(e);
	opq_lease_provider *p = NULL;
	ck_assert_int_eq(opq_lease_provider_etcd_create(&p, e), 0);
	opq_lease *a = lease_new(p, "guard", "guard-A", 1 * SEC);
	opq_lease *b = lease_new(p, "guard", "guard-B", 5 * SEC);
	ck_assert_ptr_nonnull(a);
	ck_assert_ptr_nonnull(b);
	opq_lease_grant ga, gb;
	ck_assert_int_eq(opq_lease_try_acquire(a, &ga), 0);
	char err[256];
	struct timespec dl = t_deadline(10 * SEC);
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "guard", ga.token, "guarded/x", 9, "A1", 2,
	                                            &dl, err, sizeof err),
	                 0);
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "guard", ga.token + 1, "guarded/x", 9, "A?",
	                                            2, &dl, err, sizeof err),
	                 ENOLCK);
	ck_assert_msg(strstr(err, "not held") != NULL, "%s", err);
	/* A pauses past its lease (it never refreshes); B takes over once
	 * etcd has revoked A's lease. */
	dl = t_deadline(20 * SEC);
	ck_assert_int_eq(opq_lease_acquire(b, &dl, &gb), 0);
	ck_assert_uint_gt(gb.token, ga.token);
	/* A wakes up and writes with its old token: refused. B's goes through. */
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "guard", ga.token, "guarded/x", 9, "A2", 2,
	                                            NULL, err, sizeof err),
	                 ENOLCK);
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "guard", gb.token, "guarded/x", 9, "B1", 2,
	                                            NULL, err, sizeof err),
	                 0);
	ck_assert_int_eq(opq_lease_refresh(a, NULL), ENOLCK);
	ck_assert_int_eq(opq_lease_release(a), 0); /* does not touch B's lock */
	ck_assert_int_eq(opq_lease_refresh(b, NULL), 0);
	char out[256];
	ck_assert_int_eq(etcdctl("get guarded/x --print-value-only", out, sizeof out), 0);
	ck_assert_msg(strncmp(out, "B1", 2) == 0, "%s", out);
	ck_assert_int_eq(opq_lease_release(b), 0);
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "guard", gb.token, "guarded/x", 9, "B2", 2,
	                                            NULL, err, sizeof err),
	                 ENOLCK);
	/* A value of zero bytes. */
	ck_assert_int_eq(opq_lease_try_acquire(b, &gb), 0);
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "guard", gb.token, "guarded/y", 9, NULL, 0,
	                                            NULL, err, sizeof err),
	                 0);
	ck_assert_int_eq(opq_lease_release(b), 0);
	opq_lease_etcd_destroy(e); /* the provider keeps its reference */
	ck_assert_int_eq(opq_lease_destroy(a), 0);
	ck_assert_int_eq(opq_lease_destroy(b), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* Taken away at the store (an administrator deletes the key): lost(TAKEN). */
START_TEST(test_taken)
{
	opq_lease_provider *p = provider_on(NULL);
	opq_lease *l = lease_new(p, "taken", "taken-1", 3 * SEC);
	ck_assert_ptr_nonnull(l);
	opq_queue *q = NULL;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	ck_assert_int_eq(opq_lease_try_acquire(l, NULL), 0);
	struct lost_state st = {0};
	ck_assert_int_eq(opq_lease_keepalive_start(l, q, 100 * MS, on_lost, &st), 0);
	ck_assert_int_eq(etcdctl("del opq/lease/taken", NULL, 0), 0);
	int64_t t0 = t_now_ns();
	T_WAIT_UNTIL(atomic_load(&st.calls) > 0);
	ck_assert_int_eq(atomic_load(&st.why), OPQ_LEASE_TAKEN);
	ck_assert_int_lt(atomic_load(&st.at) - t0, 1 * SEC + slack(500 * MS));
	ck_assert_int_eq(opq_lease_keepalive_stop(l), 0);
	ck_assert_int_eq(opq_lease_refresh(l, NULL), ENOLCK);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- bad input, and a cluster that is not there ---- */

START_TEST(test_bad_input)
{
	char err[256];
	opq_lease_etcd *e = NULL;
	const char *ep = env("OPQ_ETCD_ENDPOINTS");
	ck_assert_int_eq(opq_lease_etcd_create(NULL, ep, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_create(&e, NULL, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_create(&e, ep, NULL, NULL, 5), EINVAL);
	static const char *const bad[] = {"",
	                                  "127.0.0.1:2379",
	                                  "http://",
	                                  "ftp://127.0.0.1:2379",
	                                  "http://127.0.0.1:2379,",
	                                  "http://127.0.0.1:2379,,http://127.0.0.1:2380",
	                                  "http://127.0.0.1:2379 ",
	                                  "http://a b:1"};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		ck_assert_msg(opq_lease_etcd_create(&e, bad[i], NULL, err, sizeof err) == EINVAL,
		              "accepted \"%s\"", bad[i]);
		ck_assert_msg(strncmp(err, "etcd: ", 6) == 0, "%s", err);
	}
	char many[2048] = "";
	for (int i = 0; i <= OPQ_LEASE_ETCD_ENDPOINTS_MAX; i++)
		snprintf(many + strlen(many), sizeof many - strlen(many), "%shttp://127.0.0.1:%d",
		         i ? "," : "", 1000 + i);
	ck_assert_int_eq(opq_lease_etcd_create(&e, many, NULL, err, sizeof err), EINVAL);
	ck_assert_msg(strstr(err, "more than") != NULL, "%s", err);
	ck_assert_int_eq(opq_lease_etcd_create(&e, ep, NULL, err, 4), 0); /* short errbuf: fine */
	opq_lease_etcd_destroy(e);
	opq_lease_etcd_destroy(NULL);

	opq_lease_etcd_attr *a = NULL;
	ck_assert_int_eq(opq_lease_etcd_attr_create(NULL), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_attr_create(&a), 0);
	ck_assert_int_eq(opq_lease_etcd_attr_set_prefix(NULL, "x"), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_attr_set_prefix(a, NULL), EINVAL);
	char prefix[OPQ_LEASE_ETCD_PREFIX_MAX + 2];
	memset(prefix, 'p', sizeof prefix - 1);
	prefix[sizeof prefix - 1] = '\0';
	ck_assert_int_eq(opq_lease_etcd_attr_set_prefix(a, prefix), EINVAL);
	prefix[OPQ_LEASE_ETCD_PREFIX_MAX] = '\0';
	ck_assert_int_eq(opq_lease_etcd_attr_set_prefix(a, prefix), 0);
	ck_assert_int_eq(opq_lease_etcd_attr_set_prefix(a, ""), 0);
	ck_assert_int_eq(opq_lease_etcd_attr_set_timeout(NULL, SEC), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_attr_set_timeout(a, 0), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_attr_set_timeout(a, -1), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_attr_set_timeout(a, 3601 * SEC), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_attr_set_timeout(a, 3600 * SEC), 0);
	/* Another prefix: another key space, so another lock. */
	ck_assert_int_eq(opq_lease_etcd_attr_set_prefix(a, "other/"), 0);
	ck_assert_int_eq(opq_lease_etcd_create(&e, ep, a, err, sizeof err), 0);
	opq_lease_etcd_attr_destroy(a);
	opq_lease_etcd_attr_destroy(NULL);
	opq_lease_provider *po = NULL, *p = provider_on(NULL);
	ck_assert_int_eq(opq_lease_provider_etcd_create(NULL, e), EINVAL);
	ck_assert_int_eq(opq_lease_provider_etcd_create(&po, NULL), EINVAL);
	ck_assert_int_eq(opq_lease_provider_etcd_create(&po, e), 0);
	opq_lease *l1 = lease_new(p, "prefixed", "owner-1", SEC);
	opq_lease *l2 = lease_new(po, "prefixed", "owner-2", SEC);
	ck_assert_int_eq(opq_lease_try_acquire(l1, NULL), 0);
	ck_assert_int_eq(opq_lease_try_acquire(l2, NULL), 0);
	char out[512];
	ck_assert_int_eq(etcdctl("get other/prefixed --print-value-only", out, sizeof out), 0);
	ck_assert_msg(strncmp(out, "owner-2", 7) == 0, "%s", out);
	ck_assert_int_eq(opq_lease_release(l1), 0);
	ck_assert_int_eq(opq_lease_release(l2), 0);
	ck_assert_int_eq(opq_lease_destroy(l1), 0);
	ck_assert_int_eq(opq_lease_destroy(l2), 0);

	/* The guard's arguments. */
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(NULL, "n", 1, "k", 1, "v", 1, NULL, err, sizeof err),
	    EINVAL);
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, NULL, 1, "k", 1, "v", 1, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, "", 1, "k", 1, "v", 1, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, "n", 0, "k", 1, "v", 1, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "n", (uint64_t)INT64_MAX + 1, "k", 1, "v", 1,
	                                            NULL, err, sizeof err),
	                 EINVAL);
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, "n", 1, NULL, 1, "v", 1, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, "n", 1, "k", 0, "v", 1, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, "n", 1, "k", 1, NULL, 1, NULL, err, sizeof err), EINVAL);
	ck_assert_int_eq(opq_lease_etcd_put_if_held(e, "n", 1, "k", 1, "v", 1, NULL, NULL, 3),
	                 EINVAL);
	struct timespec baddl = {.tv_sec = 1, .tv_nsec = SEC};
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, "n", 1, "k", 1, "v", 1, &baddl, err, sizeof err), EINVAL);
	/* A deadline already past: no request, ETIMEDOUT. */
	struct timespec past = {.tv_sec = 0, .tv_nsec = 0};
	ck_assert_int_eq(
	    opq_lease_etcd_put_if_held(e, "n", 1, "k", 1, "v", 1, &past, err, sizeof err),
	    ETIMEDOUT);
	opq_lease_etcd_destroy(e);
	ck_assert_int_eq(opq_lease_provider_destroy(po), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);

	/* No member listening: ECONNREFUSED with the URL in the words, every time. */
	opq_lease_provider *none = provider_on("http://127.0.0.1:1,http://127.0.0.1:9");
	ck_assert_ptr_nonnull(none);
	opq_lease *l = lease_new(none, "none", NULL, SEC);
	ck_assert_ptr_nonnull(l);
	for (int i = 0; i < 5; i++) {
		ck_assert_int_eq(opq_lease_try_acquire(l, NULL), ECONNREFUSED);
		ck_assert_int_eq(opq_lease_error(l, err, sizeof err), 0);
		ck_assert_msg(strstr(err, "http://127.0.0.1:") != NULL, "%s", err);
	}
	struct timespec dl = t_deadline(50 * MS);
	ck_assert_int_eq(opq_lease_acquire(l, &dl, NULL), ETIMEDOUT);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(none), 0);
}
END_TEST

/* ---- failover: a dead URL first, and a member killed while in use ---- */

START_TEST(test_failover)
{
	char eps[1024];
	/* Port 1 refuses: every call goes on to the members. */
	snprintf(eps, sizeof eps, "http://127.0.0.1:1,%s", env("OPQ_ETCD_ENDPOINTS"));
	opq_lease_provider *p = provider_on(eps);
	opq_lease *l = lease_new(p, "failover", NULL, 5 * SEC);
	ck_assert_ptr_nonnull(l);
	opq_lease_grant g, g2;
	ck_assert_int_eq(opq_lease_try_acquire(l, &g), 0);
	/* Kill a follower that the second client uses first. */
	int lead = leader();
	int victim = (lead + 1) % 3;
	char first[1024];
	members_from(victim, first, sizeof first);
	opq_lease_provider *p2 = provider_on(first);
	opq_lease *l2 = lease_new(p2, "failover-2", NULL, 5 * SEC);
	ck_assert_ptr_nonnull(l2);
	ck_assert_int_eq(opq_lease_try_acquire(l2, &g2), 0);
	int killed = ctl("kill", victim);
	int r1 = opq_lease_refresh(l, NULL);
	int r2 = opq_lease_refresh(l2, NULL);
	int r3 = opq_lease_release(l2);
	int r4 = opq_lease_try_acquire(l2, NULL);
	int started = ctl("start", victim);
	ck_assert_int_eq(killed, 0);
	ck_assert_int_eq(started, 0);
	ck_assert_int_eq(r1, 0);
	ck_assert_int_eq(r2, 0);
	ck_assert_int_eq(r3, 0);
	ck_assert_int_eq(r4, 0);
	ck_assert_int_eq(opq_lease_release(l2), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l2), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p2), 0);
}
END_TEST

/* ---- tokens strictly increase while the leader is killed and restarted ---- */

struct churn {
	opq_lease *l;
	atomic_bool stop;
	atomic_int grants;
	int failures;
	uint64_t last;
	bool unreleased; /* the last release failed: the lock may still be ours */
	int bad, again;
};

static void *churn_main(void *arg)
{
	struct churn *c = arg;
	while (!atomic_load(&c->stop)) {
		opq_lease_grant g;
		struct timespec dl;
		opq_deadline_after(&dl, 500 * MS);
		int rc = opq_lease_acquire(c->l, &dl, &g);
		if (rc != 0) {
			c->failures++;
			continue;
		}
		/* After a failed release the lock may still be ours: then the
		 * acquire hands the same token back (never a smaller one). */
		if (g.token == c->last && c->unreleased)
			c->again++;
		else if (g.token <= c->last)
			c->bad++;
		c->last = g.token;
		atomic_fetch_add(&c->grants, 1);
		c->unreleased = opq_lease_release(c->l) != 0;
		c->failures += c->unreleased;
	}
	return NULL;
}

START_TEST(test_leader_killed)
{
	opq_lease_provider *p = provider_on(NULL);
	struct churn c = {.l = lease_new(p, "churn", NULL, 1 * SEC)};
	ck_assert_ptr_nonnull(c.l);
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, churn_main, &c), 0);
	int rounds = 2, ok = 0;
	for (int r = 0; r < rounds; r++) {
		int before = atomic_load(&c.grants);
		T_WAIT_UNTIL(atomic_load(&c.grants) >= before + 5);
		int lead = leader();
		ok += ctl("kill", lead) == 0;
		int at_kill = atomic_load(&c.grants);
		/* Acquires go on without it (a new leader within about a second). */
		struct timespec dl = t_deadline(30 * SEC);
		while (atomic_load(&c.grants) < at_kill + 5 && !t_passed(&dl))
			nap_ns(10 * MS);
		bool went_on = atomic_load(&c.grants) >= at_kill + 5;
		ok += ctl("start", lead) == 0;
		ck_assert_msg(went_on, "round %d: acquires stopped with the leader killed", r);
	}
	int before = atomic_load(&c.grants);
	T_WAIT_UNTIL(atomic_load(&c.grants) >= before + 5);
	atomic_store(&c.stop, true);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_int_eq(ok, 2 * rounds);
	printf("leader killed %d times: %d grants, tokens up to %" PRIu64 ", %d calls failed, "
	       "%d tokens handed back after a failed release, out of order: %d\n",
	       rounds, atomic_load(&c.grants), c.last, c.failures, c.again, c.bad);
	ck_assert_int_eq(c.bad, 0);
	ck_assert_int_eq(opq_lease_destroy(c.l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- mutual exclusion: K processes x M holds on one lock, one clock ---- */

static void excl_child(int who, int m, const char *log)
{
	int fd = open(log, O_WRONLY | O_APPEND);
	opq_lease_provider *p = provider_on(NULL);
	char owner[32];
	snprintf(owner, sizeof owner, "excl-%d-%d", who, (int)getpid());
	opq_lease *l = lease_new(p, "excl", owner, 2 * SEC);
	if (fd < 0 || l == NULL)
		_exit(20);
	for (int i = 0; i < m; i++) {
		opq_lease_grant g;
		struct timespec dl;
		opq_deadline_after(&dl, 60 * SEC);
		if (opq_lease_acquire(l, &dl, &g) != 0)
			_exit(23);
		int64_t start = t_now_ns(), left = 0;
		if (opq_lease_remaining(l, NULL, &left) != 0 || left <= 0)
			_exit(24);
		while (t_now_ns() - start < 300000)
			;
		int64_t end = t_now_ns();
		struct timespec e = {.tv_sec = end / SEC, .tv_nsec = end % SEC};
		if (opq_lease_remaining(l, &e, &left) != 0 || left <= 0)
			_exit(25);
		char line[128];
		int n = snprintf(line, sizeof line, "%" PRIu64 " %" PRId64 " %" PRId64 " %d\n",
		                 g.token, start, end, who);
		if (write(fd, line, (size_t)n) != n)
			_exit(26);
		int rc;
		while ((rc = opq_lease_release(l)) != 0) /* a store failure: again */
			if (opq_lease_remaining(l, NULL, &left) != 0 || left == 0)
				break;
	}
	opq_lease_destroy(l);
	opq_lease_provider_destroy(p);
	close(fd);
	_exit(0);
}

START_TEST(test_mutual_exclusion)
{
	enum { K = 3 };
	int m = (int)t_scale(20);
	struct hold *h = exclusion_run(K, m, excl_child);
	free(h);
}
END_TEST

/* ---- the holder killed: another process takes over within TTL + 1.5 s ---- */

struct victim_report {
	uint64_t token;
	int64_t acquired;
};

START_TEST(test_crash_takeover)
{
	const int64_t lease_ns = 1 * SEC; /* TTL 1 s */
	int fds[2];
	ck_assert_int_eq(pipe(fds), 0);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(fds[0]);
		opq_lease *l = lease_new(provider_on(NULL), "crash", "crash-victim", lease_ns);
		opq_lease_grant g;
		if (l == NULL || opq_lease_try_acquire(l, &g) != 0)
			_exit(22);
		struct victim_report r = {g.token, ts_ns(&g.acquired)};
		if (write(fds[1], &r, sizeof r) != (ssize_t)sizeof r)
			_exit(23);
		for (;;)
			pause();
	}
	close(fds[1]);
	struct victim_report v;
	ck_assert(read_full(fds[0], &v, sizeof v, 30 * SEC));
	close(fds[0]);
	opq_lease_provider *p = provider_on(NULL);
	opq_lease *l = lease_new(p, "crash", "crash-taker", lease_ns);
	ck_assert_ptr_nonnull(l);
	ck_assert_int_eq(opq_lease_try_acquire(l, NULL), EBUSY);
	ck_assert_int_eq(kill(pid, SIGKILL), 0);
	ck_assert_int_eq(child_wait(pid, 10 * SEC), 128 + SIGKILL);
	opq_lease_grant g;
	int busy = 0, rc;
	int64_t end = t_now_ns() + 30 * SEC;
	while ((rc = opq_lease_try_acquire(l, &g)) == EBUSY) {
		busy++;
		ck_assert_msg(t_now_ns() < end, "never taken over");
		nap_ns(5 * MS);
	}
	int64_t got = t_now_ns();
	ck_assert_int_eq(rc, 0);
	ck_assert_uint_gt(g.token, v.token);
	int64_t expiry = v.acquired + lease_ns;
	ck_assert_msg(got >= expiry, "taken over %lld us before the lease ran out",
	              (long long)((expiry - got) / 1000));
	/* The bound: etcd looks for expired leases every 500 ms, then one Raft
	 * round for the revoke, our poll; 1.5 s leaves room for a busy machine. */
	int64_t late = got - expiry;
	ck_assert_msg(late <= slack(1500 * MS), "taken over %lld ms after the lease ran out",
	              (long long)(late / MS));
	printf("crash: taken over %.0f ms after the dead holder's lease (TTL 1 s) ran out, "
	       "%d refusals before\n",
	       late / 1e6, busy);
	ck_assert_int_gt(busy, 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- the keepalive loses contact: UNREACHABLE before the local end ---- */

/*
 * A holder with a keepalive; then `cut` runs (freeze or kill members);
 * lost(UNREACHABLE) must come before the lease ends locally; `heal` runs
 * before anything is asserted.
 */
static void unreachable_case(const char *name, const char *endpoints, void (*cut)(int),
                             void (*heal)(int), int arg)
{
	const int64_t lease_ns = 2 * SEC;
	opq_lease_etcd *e = client_on(endpoints, 0);
	ck_assert_ptr_nonnull(e);
	opq_lease_provider *p = NULL;
	ck_assert_int_eq(opq_lease_provider_etcd_create(&p, e), 0);
	opq_lease_etcd_destroy(e);
	opq_lease *l = lease_new(p, name, NULL, lease_ns);
	ck_assert_ptr_nonnull(l);
	opq_queue *q = NULL;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	opq_lease_grant g0, g;
	ck_assert_int_eq(opq_lease_try_acquire(l, &g0), 0);
	struct lost_state st = {0};
	ck_assert_int_eq(opq_lease_keepalive_start(l, q, 0, on_lost, &st), 0);
	T_WAIT_UNTIL(opq_lease_grant_get(l, &g) == 0 && ts_ns(&g.acquired) > ts_ns(&g0.acquired));
	int64_t down = t_now_ns();
	cut(arg);
	struct timespec dl = t_deadline(20 * SEC);
	while (atomic_load(&st.calls) == 0 && !t_passed(&dl))
		nap_ns(5 * MS);
	int calls = atomic_load(&st.calls);
	/* The last grant the keepalive confirmed (it stays while the lost
	 * callback ran for UNREACHABLE). */
	int grc = opq_lease_grant_get(l, &g);
	heal(arg);
	ck_assert_int_eq(calls, 1);
	ck_assert_int_eq(grc, 0);
	int64_t at = atomic_load(&st.at);
	ck_assert_int_eq(atomic_load(&st.why), OPQ_LEASE_UNREACHABLE);
	int64_t local_end = ts_ns(&g.acquired) + g.lease_ns;
	ck_assert_msg(at < local_end, "lost-callback %lld us after the local lease end",
	              (long long)((at - local_end) / 1000));
	printf("%s: lost(UNREACHABLE) %.1f ms before the local lease end, %.1f ms after the cut\n",
	       name, (local_end - at) / 1e6, (at - down) / 1e6);
	ck_assert_int_eq(opq_lease_keepalive_stop(l), 0);
	/* Back: the same owner gets it again (the same token if etcd kept
	 * the lease, a greater one if it ran out). */
	dl = t_deadline(30 * SEC);
	ck_assert_int_eq(opq_lease_acquire(l, &dl, &g), 0);
	ck_assert_uint_ge(g.token, g0.token);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}

static void freeze(int i)
{
	ck_assert_int_eq(ctl("stop", i), 0);
}

static void thaw(int i)
{
	ctl("cont", i);
}

static int majority[2];

static void kill_majority(int unused)
{
	(void)unused;
	ck_assert_int_eq(ctl("kill", majority[0]), 0);
	ck_assert_int_eq(ctl("kill", majority[1]), 0);
}

static void restart_majority(int unused)
{
	(void)unused;
	ctl("start", majority[0]);
	ctl("start", majority[1]);
}

/* A holder that talks to one member only, which freezes (SIGSTOP). */
START_TEST(test_member_frozen)
{
	int i = (leader() + 1) % 3; /* a follower: the cluster goes on */
	unreachable_case("frozen", member_url(i), freeze, thaw, i);
}
END_TEST

/* A holder that knows every member; two of them are killed. */
START_TEST(test_majority_lost)
{
	int lead = leader();
	majority[0] = (lead + 1) % 3;
	majority[1] = (lead + 2) % 3;
	unreachable_case("majority", NULL, kill_majority, restart_majority, 0);
}
END_TEST

/* A holder that knows every member keeps its lease while one of them is frozen. */
START_TEST(test_frozen_failover)
{
	int i = (leader() + 1) % 3;
	char eps[1024];
	members_from(i, eps, sizeof eps);
	opq_lease_provider *p = provider_on(eps);
	opq_lease *l = lease_new(p, "frozen-failover", NULL, 3 * SEC);
	ck_assert_ptr_nonnull(l);
	opq_queue *q = NULL;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, 1), 0);
	opq_lease_grant g0, g;
	ck_assert_int_eq(opq_lease_try_acquire(l, &g0), 0);
	struct lost_state st = {0};
	ck_assert_int_eq(opq_lease_keepalive_start(l, q, 0, on_lost, &st), 0);
	ck_assert_int_eq(ctl("stop", i), 0);
	/* Three refreshes confirmed after the freeze, none lost. */
	int64_t frozen = t_now_ns();
	int confirmed = 0;
	int64_t last = ts_ns(&g0.acquired);
	struct timespec dl = t_deadline(20 * SEC);
	while (confirmed < 3 && atomic_load(&st.calls) == 0 && !t_passed(&dl)) {
		if (opq_lease_grant_get(l, &g) == 0 && ts_ns(&g.acquired) > last &&
		    ts_ns(&g.acquired) > frozen) {
			last = ts_ns(&g.acquired);
			confirmed++;
		}
		nap_ns(5 * MS);
	}
	ctl("cont", i);
	char words[256] = "";
	opq_lease_error(l, words, sizeof words);
	ck_assert_msg(atomic_load(&st.calls) == 0,
	              "lost (%d) %.0f ms after the freeze, %d refreshes confirmed; last error: %s",
	              atomic_load(&st.why), (atomic_load(&st.at) - frozen) / 1e6, confirmed, words);
	ck_assert_int_eq(confirmed, 3);
	ck_assert_int_eq(opq_lease_keepalive_stop(l), 0);
	ck_assert_int_eq(opq_lease_release(l), 0);
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

/* ---- threads of one process share a provider; pairs per second ---- */

START_TEST(test_speed)
{
	opq_lease_provider *p = provider_on(NULL);
	opq_lease *l = lease_new(p, "speed", NULL, 5 * SEC);
	ck_assert_ptr_nonnull(l);
	int n = (int)t_scale(200);
	int64_t t0 = t_now_ns();
	for (int i = 0; i < n; i++) {
		ck_assert_int_eq(opq_lease_try_acquire(l, NULL), 0);
		ck_assert_int_eq(opq_lease_release(l), 0);
	}
	double secs = (t_now_ns() - t0) / 1e9;
	printf("speed: %.0f acquire+release pairs per second (%d in %.2f s)\n", n / secs, n, secs);
	ck_assert_int_eq(opq_lease_destroy(l), 0);
	ck_assert_int_eq(opq_lease_provider_destroy(p), 0);
}
END_TEST

int main(void)
{
	setvbuf(stdout, NULL, _IONBF, 0);
	Suite *s = suite_create("lease_etcd");
	tcase_add_test(t_tcase(s, "parse", 60), test_parse);
	if (getenv("OPQ_ETCD_ENDPOINTS") == NULL) {
		/* Only the parser: the rest needs tests/etcdcluster.sh's cluster. */
		printf("OPQ_ETCD_ENDPOINTS not set: the cluster's tests skipped\n");
		int rc = t_run(s);
		return rc == EXIT_SUCCESS ? 77 : rc;
	}
	tcase_add_test(t_tcase(s, "bad_input", 60), test_bad_input);
	tcase_add_test(t_tcase(s, "basics", 60), test_basics);
	tcase_add_test(t_tcase(s, "guard", 60), test_guard);
	tcase_add_test(t_tcase(s, "taken", 60), test_taken);
	tcase_add_test(t_tcase(s, "speed", 60), test_speed);
	tcase_add_test(t_tcase(s, "exclusion", 120), test_mutual_exclusion);
	tcase_add_test(t_tcase(s, "crash", 60), test_crash_takeover);
	tcase_add_test(t_tcase(s, "failover", 90), test_failover);
	tcase_add_test(t_tcase(s, "frozen_failover", 90), test_frozen_failover);
	tcase_add_test(t_tcase(s, "frozen", 90), test_member_frozen);
	tcase_add_test(t_tcase(s, "majority", 120), test_majority_lost);
	tcase_add_test(t_tcase(s, "leader_killed", 120), test_leader_killed);
	return t_run(s);
}
