/*
 * check_authdemo.c: the demo's line scenario on real TCP sockets. With the
 * line, every token expiry causes exactly one re-authentication however
 * many requests saw the 401; the naive client re-authenticates per 401.
 */
#include "harness.h"

#include "../tools/authdemo.h"

START_TEST(test_line_one_reauth_per_expiry)
{
	enum { OPS = 400, K = 10 };
	for (int iter = 0; iter < 3; iter++) {
		struct authdemo_result r;
		ck_assert_int_eq(authdemo_run(8, OPS, K, 1, &r), 0);
		ck_assert_uint_eq(r.ok, OPS);
		ck_assert_uint_eq(r.failed, 0);
		ck_assert_uint_eq(r.reauths, r.expiries);
		/* OPS answers need OPS / K tokens: the first plus the re-auths */
		ck_assert_uint_ge(r.reauths, OPS / K - 1);
		ck_assert_uint_ge(r.unauthorized, r.expiries);
		ck_assert_uint_eq(r.requests, r.ok + r.unauthorized);
		ck_assert_uint_eq(r.retries, r.unauthorized);
	}
}
END_TEST

START_TEST(test_naive_reauth_per_401)
{
	enum { OPS = 200, K = 10 };
	struct authdemo_result r;
	ck_assert_int_eq(authdemo_run(8, OPS, K, 0, &r), 0);
	ck_assert_uint_eq(r.ok, OPS);
	ck_assert_uint_eq(r.failed, 0);
	ck_assert_uint_eq(r.reauths, r.unauthorized);
	ck_assert_uint_ge(r.reauths, r.expiries);
}
END_TEST

START_TEST(test_bad_arguments_fail_cleanly)
{
	struct authdemo_result r;
	/* 0 runners: the queue refuses to start; the service is still torn down. */
	ck_assert_int_eq(authdemo_run(0, 10, 10, 1, &r), EINVAL);
	ck_assert_uint_eq(r.ok, 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("authdemo");
	TCase *tc = t_tcase(s, "tcp", 120);
	tcase_add_test(tc, test_line_one_reauth_per_expiry);
	tcase_add_test(tc, test_naive_reauth_per_401);
	tcase_add_test(tc, test_bad_arguments_fail_cleanly);
	return t_run(s);
}
