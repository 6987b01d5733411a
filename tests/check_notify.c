/*
 * check_notify: the end of a channel's life right after its last
 * completion. A runner hands an ended operation to the channel with one
 * compare-and-swap and only then writes to the channel's descriptor (when
 * the stack was empty). The loop may see the operation as soon as it is
 * pushed, without waiting for the descriptor, run its completion, and
 * destroy the channel, which opq_chan_destroy allows once every completion
 * has run: the runner's write must not then touch the freed channel, nor
 * write into a descriptor number closed and given to something else.
 *
 * The loop here calls opq_chan_run without waiting for readiness (as a loop
 * does that runs the channel on every turn), then destroys the channel and
 * at once opens a pipe, whose write end takes the number the channel's
 * descriptor had. Many rounds, real threads; the ThreadSanitizer and
 * AddressSanitizer builds see an access to freed memory, every build sees
 * bytes in the pipe that nobody wrote to it.
 */
#include "harness.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

static atomic_int ended;

static void nothing(opq_op *op)
{
	(void)op;
}

static void complete(opq_op *op, int status)
{
	(void)op;
	ck_assert_int_eq(status, 0);
	atomic_store(&ended, 1);
}

/* Bytes waiting in fd, without blocking. */
static int pending_bytes(int fd)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static void rounds(unsigned runners, int n)
{
	opq_queue *q;
	ck_assert_int_eq(opq_queue_create(&q, NULL), 0);
	ck_assert_int_eq(opq_queue_start(q, runners), 0);
	int stray = 0;
	for (int i = 0; i < n; i++) {
		opq_chan *ch;
		int cfd;
		ck_assert_int_eq(opq_chan_create(&ch), 0);
		ck_assert_int_eq(opq_chan_fd(ch, &cfd), 0);
		opq_op op;
		ck_assert_int_eq(opq_op_init(&op, nothing, NULL), 0);
		ck_assert_int_eq(opq_op_set_completion(&op, ch, complete), 0);
		atomic_store(&ended, 0);
		ck_assert_int_eq(opq_queue_enqueue(q, &op), 0);
		struct timespec dl = t_deadline(T_WAIT_NS);
		while (!atomic_load(&ended)) {
			ck_assert_int_eq(opq_chan_run(ch, 1, NULL), 0);
			ck_assert_msg(!t_passed(&dl), "the completion did not run");
		}
		ck_assert_int_eq(opq_chan_destroy(ch), 0);
		/* The channel's number, now free, for a pipe's write end (the
		 * lowest free number goes to the read end: move it). */
		int fds[2];
		ck_assert_int_eq(pipe(fds), 0);
		int w = fds[1];
		if (fds[0] == cfd) { /* took it for the read end: swap */
			int r = dup(fds[0]);
			ck_assert_int_ge(r, 0);
			ck_assert_int_eq(dup2(fds[1], cfd), cfd);
			close(fds[1]);
			fds[0] = r;
			w = cfd;
		}
		(void)w;
		/* Let a late write land: the runner is done once the queue is idle. */
		ck_assert_int_eq(opq_queue_wait_idle(q, NULL), 0);
		if (pending_bytes(fds[0]))
			stray++;
		close(fds[0]);
		close(w);
	}
	ck_assert_int_eq(opq_queue_stop(q, OPQ_STOP_DRAIN), 0);
	ck_assert_int_eq(opq_queue_destroy(q), 0);
	ck_assert_msg(stray == 0, "%d rounds: a runner wrote into a descriptor closed by destroy",
	              stray);
}

START_TEST(destroy_after_last_completion_one_runner)
{
	rounds(1, 20000);
}
END_TEST

START_TEST(destroy_after_last_completion_two_runners)
{
	rounds(2, 20000);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("notify");
	TCase *tc = tcase_create("destroy");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, destroy_after_last_completion_one_runner);
	tcase_add_test(tc, destroy_after_last_completion_two_runners);
	suite_add_tcase(s, tc);
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
