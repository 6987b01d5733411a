/*
 * check_fanout.c: the fan-out example's outcome. With "first error cancels
 * the siblings" the failing backend's error is the answer and the slow
 * backend is cancelled long before its latency; with "collect" every
 * backend runs to its end; a deadline cancels them all with ETIMEDOUT.
 */
#include "harness.h"

#include <errno.h>

#include "../tools/fanout.h"

static void backends(struct fanout_backend b[FANOUT_BACKENDS])
{
	struct fanout_backend init[FANOUT_BACKENDS] = {
	    {.name = "fast", .latency_ms = 5},
	    {.name = "failing", .latency_ms = 30, .error = EIO},
	    {.name = "slow", .latency_ms = 20000},
	};
	for (int i = 0; i < FANOUT_BACKENDS; i++)
		b[i] = init[i];
}

START_TEST(test_first_error_cancels_siblings)
{
	for (unsigned runners = 1; runners <= 4; runners++) {
		struct fanout_backend b[FANOUT_BACKENDS];
		struct fanout_result r;
		backends(b);
		ck_assert_int_eq(fanout_run(runners, 1, 0, b, &r), 0);
		ck_assert_int_eq(r.first_error, EIO);
		ck_assert_int_eq(b[1].result, EIO);
		ck_assert_int_eq(b[2].result, ECANCELED);
		ck_assert_int_lt(r.total_ms, 10000); /* far less than the slow backend's 20 s */
		ck_assert_int_le(b[1].ended_ms, b[2].ended_ms);
		/* One runner: the waiting handler performs its backends inline, oldest first. */
		ck_assert_int_eq(b[0].result, 0);
	}
}
END_TEST

START_TEST(test_collect_runs_all)
{
	struct fanout_backend b[FANOUT_BACKENDS];
	struct fanout_result r;
	backends(b);
	b[2].latency_ms = 100;
	ck_assert_int_eq(fanout_run(3, 0, 0, b, &r), 0);
	ck_assert_int_eq(r.first_error, EIO);
	ck_assert_int_eq(b[0].result, 0);
	ck_assert_int_eq(b[1].result, EIO);
	ck_assert_int_eq(b[2].result, 0);
	ck_assert_int_ge(r.total_ms, 100);
}
END_TEST

START_TEST(test_deadline)
{
	struct fanout_backend b[FANOUT_BACKENDS];
	struct fanout_result r;
	backends(b);
	b[1].error = 0;
	b[1].latency_ms = 20000;
	/* The deadline leaves the 5 ms backend room on a loaded machine. */
	ck_assert_int_eq(fanout_run(3, 1, 1000, b, &r), 0);
	ck_assert_int_eq(r.first_error, ETIMEDOUT);
	ck_assert_int_eq(b[0].result, 0);
	ck_assert_int_eq(b[1].result, ECANCELED);
	ck_assert_int_eq(b[2].result, ECANCELED);
	ck_assert_int_lt(r.total_ms, 10000);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("fanout");
	TCase *tc = t_tcase(s, "fanout", 120);
	tcase_add_test(tc, test_first_error_cancels_siblings);
	tcase_add_test(tc, test_collect_runs_all);
	tcase_add_test(tc, test_deadline);
	return t_run(s);
}
