/*
 * fault.h: the allocation-failure sweep shared by the tests that link the
 * convenience library (they reach the hidden opq__fault_set and
 * opq__fault_count of lib/internal.h).
 */
#ifndef OPQ_TEST_FAULT_H
#define OPQ_TEST_FAULT_H

#include "internal.h"

#include <check.h>
#include <errno.h>

/*
 * Run `call` with allocation n failing, for n = 1, 2, ... until the call
 * makes fewer than n allocations (then it must succeed); `on_enomem` runs
 * after each failed call, which must have returned ENOMEM.
 */
#define SWEEP(call, on_enomem)                                                                     \
	for (long nth_ = 1;; nth_++) {                                                             \
		opq__fault_set(nth_);                                                              \
		int rc_ = (call);                                                                  \
		long made_ = opq__fault_count();                                                   \
		opq__fault_set(0);                                                                 \
		if (made_ < nth_) {                                                                \
			ck_assert_int_eq(rc_, 0);                                                  \
			break;                                                                     \
		}                                                                                  \
		ck_assert_msg(rc_ == ENOMEM, "allocation %ld: rc %d", nth_, rc_);                  \
		on_enomem;                                                                         \
	}

#endif /* OPQ_TEST_FAULT_H */
