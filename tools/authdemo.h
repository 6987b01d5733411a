/*
 * authdemo.h: the line's scenario on real sockets, shared by opqueue-demo
 * and tests/check_authdemo.c.
 *
 * A line-protocol service on 127.0.0.1 (TCP, one connection per request)
 * hands out access tokens ("AUTH\n" -> "TOKEN n\n") and answers
 * "GET n\n" with "200\n", or "401\n" once token n has served `expire_after`
 * requests (every token issued lives until then). Requests run as operations on an opqueue queue;
 * on a 401 they either use a line (one re-authentication per expiry, the
 * others wait and retry) or, the naive way, each re-authenticates itself.
 */
#ifndef OPQ_AUTHDEMO_H
#define OPQ_AUTHDEMO_H

#include <stdint.h>

struct authdemo_result {
	uint64_t requests;     /* requests sent, retries included */
	uint64_t ok;           /* requests answered 200 (one per operation) */
	uint64_t unauthorized; /* 401 answers */
	uint64_t reauths;      /* AUTH requests made by the clients */
	uint64_t expiries;     /* tokens that the service saw used after they ran out */
	uint64_t retries;      /* requests sent again after a 401 */
	uint64_t failed;       /* operations that gave up (I/O errors) */
	double seconds;        /* wall time */
};

/*
 * Run `ops` request operations on `runners` runners against a fresh service
 * whose tokens expire after `expire_after` requests; use_line selects the
 * line (1) or the naive client (0). Returns 0 or an errno value.
 */
int authdemo_run(unsigned runners, unsigned ops, unsigned expire_after, int use_line,
                 struct authdemo_result *res);

#endif /* OPQ_AUTHDEMO_H */
