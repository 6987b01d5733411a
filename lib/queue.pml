/*
 * queue.pml: a Promela model of the queue's sleep/wake protocol in
 * lib/queue.c, lib/enqueue.c and lib/runner.c: runners sleeping on `work`,
 * producers on `space`, opq_queue_wait_idle on `idle`, opq_queue_stop on
 * `change`, with the counts that decide who signals whom, and an unbounded
 * queue's lock-free enqueue onto the inbox. Checked by tests/spin.sh.
 *
 * What runs: R runners (runner_main), P producers that each enqueue OPS
 * operations, one thread in opq_queue_wait_idle (with or without a
 * deadline, chosen when it first has to wait), and one thread that calls
 * opq_queue_stop at any time, in a mode chosen then (DRAIN or DISCARD).
 * With RESIZE, one more thread calls opq_queue_set_runners(R - 1) at some
 * time; with GROW as well, it may call opq_queue_set_runners(R) afterwards,
 * which starts a runner in a spare slot. With CANCEL, one more thread
 * cancels one queued operation at some time (opq_queue_cancel).
 *
 * CAP is the capacity: 1 by default, 2, or 0 for an unbounded queue.
 * - A bounded queue's producer (enqueue: opq_queue_enqueue,
 *   _timedenqueue or _tryenqueue, the form chosen at random when it first
 *   matters, that is when the queue is full) pushes onto the FIFO under
 *   q->mu and calls wake_runner() there (push() in lib/enqueue.c).
 * - An unbounded queue's producer takes no lock (push_inbox()): it pushes
 *   the operation onto the inbox (one compare-and-swap; ESHUTDOWN once the
 *   inbox is closed), then reads idle_runners, then work_signals (two
 *   sequentially consistent loads, each a step of its own), and only if it
 *   saw more runners idle than signalled takes q->mu to call wake_runner().
 *   Whoever holds q->mu and needs the FIFO moves the inbox to it first
 *   (opq__inbox_drain: a runner's take, cancel, wait_idle's and the idle
 *   check's opq__is_idle, stop's close). A runner about to sleep counts
 *   itself in idle_runners and then looks once more (the inbox and, with
 *   the fix below, the FIFO): if there is something, it uncounts itself
 *   and takes it; else it waits on `work`. Stop closes the inbox under
 *   q->mu (an exchange with INBOX_CLOSED; what it held goes to the FIFO).
 * A runner's take gives it one operation from a bounded FIFO, and from an
 * unbounded one a share of min(K, ceil(queued / alive)), K = 2: the first
 * runs at once, the others go to the runner's `pending` list, which it
 * pops one at a time (under its own r->mu only) and which the other
 * runners may steal from (under q->mu, then the victim's r->mu).
 *
 * The mutex and the condition variables are modelled as pthreads specifies
 * them: pthread_cond_wait unlocks and blocks in one atomic step and locks
 * again before it returns; pthread_cond_signal wakes at least one blocked
 * waiter if there is any (any non-empty subset of them), and nobody
 * otherwise; pthread_cond_broadcast wakes every blocked waiter; a wakeup
 * may be spurious (at most MAXSPURIOUS in a run, so that nobody spins
 * forever on them); a timed wait may time out whenever it is blocked. A
 * woken thread is no longer blocked (a later signal goes to somebody else)
 * but has not relocked yet: that is a state of its own.
 *
 * The steps, and what they abstract:
 * - a stretch of C code under q->mu is one atomic step, from the lock (or
 *   the relock after a wait) to the unlock (or the unlock-and-block of a
 *   wait), as long as nobody touches what it touches without the lock:
 *   so on a bounded queue. On an unbounded one, producers push onto the
 *   inbox and read idle_runners and work_signals without the lock, so a
 *   stretch under q->mu is cut, q->mu held throughout, at each access to
 *   one of those three (each step holds one of them, in the C code's
 *   order): the runner's relock and idle_runners--; work_signals--; the
 *   take's drain; the idle check's drain; idle_runners++; the look at the
 *   inbox; idle_runners-- when it held something; stop's close and its
 *   wake_runners(); cancel's drain and its idle check's drain. A
 *   producer's push, its read of idle_runners and its read of
 *   work_signals are three steps, then its wake_runner() under q->mu a
 *   fourth. Two steps are left out where they could not change anything:
 *   the runner's work_signals-- when it is 0 (the C code writes nothing),
 *   and the producer's read of work_signals when it read idle_runners == 0
 *   (0 > work_signals whatever it reads);
 * - the inbox, idle_runners and work_signals are sequentially consistent,
 *   as in the C code (the push's compare-and-swap, the runner's count and
 *   look, the producer's loads: seq_cst); a drain's first, relaxed, load
 *   of the inbox can only miss a push that a sequentially consistent run
 *   would order after it, and the look that follows is seq_cst. The inbox
 *   is a count: the order the drain gives the FIFO is not modelled;
 * - what other threads do without q->mu and without touching those three
 *   (a runner performing or popping its pending operations, a spurious
 *   wakeup, a timeout) happens only while q->mu is free. Such a step
 *   commutes with every step of a stretch under q->mu but a steal from or
 *   a discard of the same runner's pending operations, or a wakeup of the
 *   same thread, and a stretch holds at most one of those that can meet
 *   it (a take that finds nothing leaves no pending operation anywhere,
 *   and nobody blocks while q->mu is held): so it can always be moved
 *   before the stretch or after it, and no state where q->mu is free is
 *   lost. (Spin's partial order reduction cannot see this: the variables
 *   are global.) The unbounded queue's extra steps are compiled in only
 *   with CAP=0: options never taken still cost the bounded runs a third
 *   more states, through that reduction;
 * - operations are counts, not lists: the FIFO is `queued`, a runner's
 *   batch is `pending[r]` plus its one running operation; what an
 *   operation does is one step (running--, completed++), merged with the
 *   pop of the next pending one, since nobody reads `completed`;
 * - r->mu is not a variable: every section under a runner's r->mu (its
 *   own pop; a steal or a discard, inside a q->mu section) is a single
 *   atomic step, which is what the mutex guarantees;
 * - a thief looks at the other runners in the order me+1, me+2, ... and
 *   steals from the first with pending operations;
 * - one thread waits in opq_queue_wait_idle, so signal and broadcast on
 *   `idle` are the same here, and so on `change` (one stopper); the drain
 *   of opq_queue_stats_get is the same as wait_idle's, and not modelled
 *   apart;
 * - memory (boxes, slabs), the operations' own states (the EBUSY of a
 *   double enqueue), affinity, names, timers, hooks, helping threads and
 *   the order of operations are not modelled; nor is an operation that
 *   blocks, so stealing is checked as a rule (a runner never goes to sleep
 *   while another has pending operations) rather than for its liveness;
 * - set_runners is refused once stop began and never goes down to 0
 *   runners (with 0 runners nothing drains the queue, by design); stop is
 *   called once, and the queue is not started again (inbox_open).
 *
 * Properties, as assertions (inv(), as q->mu is released; inv_always(),
 * at every step taken without it) and invalid end states (pan -DSAFETY):
 * - conservation: enqueued == completed + running + queued + inbox +
 *   sum(pending) + discarded, at every step;
 * - running <= alive; work_signals <= idle_runners and space_signals <=
 *   space_waiters (a signal is only counted for a counted waiter);
 * - no lost runner wakeup: while operations are in the FIFO or the inbox,
 *   some live runner is not asleep unwoken on `work`, or a producer has
 *   pushed one and has not yet decided whether to wake a runner (read
 *   idle_runners and work_signals, or called wake_runner()); a runner only
 *   goes to sleep when the FIFO is empty and no runner has pending
 *   operations;
 * - a producer never sleeps unwoken while there is room: while some
 *   producer is blocked unwoken on `space`, queued + (producers woken but
 *   not yet back from the wait) >= CAP;
 * - wait_idle never sleeps unwoken on an idle queue (nothing in the FIFO
 *   or the inbox, busy == 0);
 * - no deadlock, no lost wakeup: every producer returns, wait_idle
 *   returns, every runner exits after stop and stop returns (a thread
 *   blocked for ever is an invalid end state); then every operation
 *   accepted was performed or discarded, and every count is back to 0
 *   (the end of init);
 * - every thread eventually returns: the LTL property all_return, checked
 *   for acceptance cycles under weak fairness (pan -a -f).
 *
 * Three flaws in the protocol as first written, found by this model, are
 * fixed here, the first two in the C code as well; each BROKEN_ flag below
 * restores one, and tests/spin.sh checks that spin rejects it:
 * - BROKEN_EXITBUSY: a surplus runner (alive > target after set_runners
 *   shrank the queue) left from the top of its loop, which it reaches
 *   after every batch, still counted in `busy`: busy never came back to 0
 *   and wait_idle slept for ever. Fix: a surplus runner gives its busy
 *   count back, with the idle check, before it leaves.
 * - BROKEN_DISCARDIDLE, BROKEN_CANCELIDLE: stop(DISCARD) and cancel took
 *   operations out of the FIFO without the idle check: with no runner busy
 *   (none had taken anything yet, or the one signalled for the operation
 *   had not relocked), nobody ever broadcast `idle` and wait_idle slept for
 *   ever. Fix: whoever empties the FIFO other than a runner's take does the
 *   idle check (busy == 0 && queued == 0 && idle_waiters: broadcast idle).
 * - BROKEN_IDLEDRAIN, an unbounded queue's runner as lib/runner.c had it
 *   before this model found the flaw: after counting itself idle, it looked
 *   at the inbox only. But when it comes back from a batch and finds nothing, it
 *   stops being busy and makes the idle check, and if a thread waits in
 *   wait_idle, opq__is_idle() drains the inbox into the FIFO, after the
 *   take's drain and before the runner counts itself idle: an operation
 *   pushed in between (its producer read idle_runners before the runner
 *   counted itself: no wakeup) goes to the FIFO, the look finds the inbox
 *   empty and the runner sleeps with the operation queued. If it is the
 *   only runner (one started, or set_runners shrank the queue to one), the
 *   operation waits, and wait_idle with it, until some later enqueue,
 *   set_runners or stop; with another runner, the producer saw that one
 *   idle and woke it, or it comes back for the operation. Only the
 *   assertions see it: stop, which comes in every run here, wakes the
 *   runner, so all_return holds; a program that waits for the queue to be
 *   idle before it stops it waits for ever. Fix: the look is at the FIFO
 *   too (q->queued || INBOX_HOLDS(inbox)), so the runner uncounts itself
 *   and takes the operation.
 *
 * Deliberately broken variants that spin must reject (tests/spin.sh):
 * - BROKEN_NOWORKSIGNAL: enqueue never signals `work` (a lost wakeup);
 * - BROKEN_SIGNALCOUNT: a runner back from its wait does not consume a
 *   work signal, so the count runs ahead and later pushes do not signal;
 * - BROKEN_NOROOM: a runner's take does not make room (a producer sleeps
 *   while there is room);
 * - BROKEN_NOIDLE: the last busy runner does not broadcast `idle`;
 * - BROKEN_NOSTEALCHECK: a runner goes to sleep when the FIFO is empty
 *   without looking at the other runners' pending operations (CAP=0);
 * - BROKEN_NOLOOKAGAIN: an unbounded queue's runner does not look again
 *   after counting itself idle: an operation pushed after its take, whose
 *   producer read idle_runners before the count, is not taken by the only
 *   runner (CAP=0, R=1);
 * - BROKEN_LOCKFREECHECK: an unbounded queue's producer reads
 *   idle_runners before its push instead of after it (and wakes a runner
 *   if it saw one idle): a runner that counts itself idle and looks in
 *   between sleeps with the operation in the inbox (CAP=0).
 */

#ifndef R
#define R 2			/* runners: at most NR, NR - 1 with GROW */
#endif
#ifndef P
#define P 2			/* producers: 1 to 3 */
#endif
#ifndef OPS
#define OPS 2			/* operations each producer enqueues */
#endif
#ifndef CAP
#define CAP 1			/* capacity; 0: unbounded (the inbox) */
#endif
#define K 2			/* most operations one take gives an unbounded queue's runner */
#define MAXSPURIOUS 1
#define NR 3			/* runner slots: R, and a spare one for GROW */
#define NONE 255

/* thread numbers, as owners of q->mu */
#define PRODUCER(j) (NR + (j))
#define IDLER (NR + P)
#define STOPPER (NR + P + 1)
#define RESIZER (NR + P + 2)
#define CANCELLER (NR + P + 3)

/* q->state */
#define RUNNING 0
#define STOPPING 1
#define STOPPED 2
/* stop modes */
#define DRAIN 0
#define DISCARD 1
/* enqueue forms (chosen when the form first matters: the queue is full) */
#define UNSET 0
#define BLOCK 1
#define TIMED 2
#define TRY 3
/*
 * Where a runner is: after a section that ended with the unlock (PERFORM,
 * EXIT) or with the wait on `work` (SLEEP); or, on an unbounded queue,
 * holding q->mu between two steps of a section (each step holds one
 * access to the inbox, idle_runners or work_signals, which producers touch
 * or read without the lock): RELOCKED (back from the wait, idle_runners
 * given back; work_signals next), TAKE (the top of the loop: the take and
 * its drain next), CHECK (no longer busy: the idle check's drain next),
 * COUNT (idle_runners++ next), LOOK (counted idle: the look at the inbox
 * next), UNCOUNT (the inbox held operations: idle_runners-- next).
 */
#define PERFORM 0
#define SLEEP 1
#define EXIT 2
#define RELOCKED 3
#define TAKE 4
#define CHECK 5
#define COUNT 6
#define LOOK 7
#define UNCOUNT 8
#define START 9		/* at the start or after a batch: lock next */

#define OK 0
#define EAGAIN 11
#define ESHUTDOWN 108
#define ETIMEDOUT 110
#define PENDING 254		/* not returned yet */

/* struct opq_queue */
byte mu = NONE;			/* q->mu: the owner's thread number, or NONE */
byte queued = 0;		/* operations in the FIFO */
byte inbox = 0;			/* operations pushed onto the inbox, not yet drained */
bool closed = false;		/* the inbox is INBOX_CLOSED */
byte idle_runners = 0;		/* written under q->mu, read without it by producers */
byte work_signals = 0;		/* likewise */
byte space_waiters = 0;
byte space_signals = 0;
byte idle_waiters = 0;
byte busy = 0;
byte state = RUNNING;
byte alive = R;
byte target = R;
/* struct runner: its pending batch (operations taken, not started) */
byte pending[NR];
/*
 * The condition variables: cv[t] while thread t is blocked unwoken on the
 * one it waits on. Runners wait only on `work`, producers on `space`, the
 * wait_idle caller on `idle`, the stopper on `change`, so each condvar is
 * a range of thread numbers.
 */
#define NT (NR + P + 2)
bool cv[NT];
#define WORK NR, 0		/* cond_signal(WORK): `work` is cv[0 .. NR-1] */
#define SPACE P, NR		/* `space` is cv[NR .. NR+P-1] */
#define cv_idle cv[IDLER]
#define cv_change cv[STOPPER]

/* ghost variables, for the properties */
byte enqueued = 0;
byte completed = 0;
byte running = 0;
byte discarded = 0;
byte spurious = 0;
byte finished = 0;		/* producers and wait_idle callers that returned */
byte onway = 0;			/* producers between their push onto the inbox and their wake_runner (or their choice not to call it) */

/* scratch for the atomic steps below: not part of the state */
hidden byte si;
hidden byte sf;
hidden byte sw;

#define PENDSUM (pending[0] + pending[1] + pending[2])
#define ASLEEP_RUNNERS (cv[0] + cv[1] + cv[2])
#if P == 1
#define ASLEEP_PRODUCERS (cv[PRODUCER(0)])
#elif P == 2
#define ASLEEP_PRODUCERS (cv[PRODUCER(0)] + cv[PRODUCER(1)])
#else
#define ASLEEP_PRODUCERS (cv[PRODUCER(0)] + cv[PRODUCER(1)] + cv[PRODUCER(2)])
#endif

/* What holds at every step, q->mu held by somebody or not. */
inline inv_always()
{
	assert(enqueued == completed + running + queued + inbox + PENDSUM + discarded);
	assert(running <= alive);	/* one running operation per live runner at most */
	/*
	 * No lost runner wakeup: an operation queued or in the inbox always
	 * has a runner on its way, or a producer that pushed it and has not yet
	 * decided whether to wake one.
	 */
	assert(queued + inbox == 0 || ASLEEP_RUNNERS < alive || onway > 0)
}

/* What holds whenever q->mu is free (checked as it is released). */
inline inv()
{
	inv_always();
	assert(work_signals <= idle_runners);
	assert(space_signals <= space_waiters);
	/* a producer never sleeps unwoken while there is room for it */
	assert(CAP == 0 || ASLEEP_PRODUCERS == 0 ||
	       queued + space_waiters - ASLEEP_PRODUCERS >= CAP);
	/* wait_idle never sleeps unwoken on an idle queue */
	assert(!cv_idle || queued + inbox > 0 || busy > 0)
}

/* The check after a step taken without q->mu (a producer's, a runner's perform). */
inline check()
{
	if
	:: mu == NONE -> inv()
	:: else -> inv_always()
	fi
}

inline lock(me)
{
	mu == NONE -> mu = me
}

inline unlock(me)
{
	assert(mu == me);
	inv();
	mu = NONE
}

/* pthread_cond_wait, first half: unlock and block, in one atomic step */
inline cond_block(me)
{
	assert(mu == me);
	cv[me] = true;
	inv();
	mu = NONE
}

/* pthread_cond_signal: wakes any non-empty subset of the blocked waiters cv[lo .. lo+n-1] */
inline cond_signal(n, lo)
{
	sw = false;
	sf = NONE;
	for (si : lo .. lo + n - 1) {
		if
		:: cv[si] -> cv[si] = false; sw = true
		:: cv[si] -> if :: sf == NONE -> sf = si :: else -> skip fi
		:: else -> skip
		fi
	}
	if
	:: !sw && sf != NONE -> cv[sf] = false
	:: else -> skip
	fi;
	si = 0; sf = 0; sw = false
}

inline cond_broadcast(n, lo)
{
	for (si : lo .. lo + n - 1) {
		cv[si] = false
	}
	si = 0
}

/* a spurious wakeup, as a step of its own: the thread is then awake, not yet relocked */
inline spurious_wake(me)
{
	atomic { cv[me] && spurious < MAXSPURIOUS && mu == NONE -> spurious++; cv[me] = false }
}

/* make_room(): after `queued` decreased, wake as many space waiters as there is room for */
inline make_room()
{
	do
	:: CAP > 0 && space_waiters > space_signals && space_signals < CAP - queued ->
		cond_signal(SPACE);
		space_signals++
	:: else -> break
	od
}

/*
 * opq__inbox_drain(): move the inbox's operations to the FIFO's tail (an
 * exchange with NULL; nothing when it is empty or closed, closed holding
 * none). Under q->mu: one access to the inbox.
 */
inline drain()
{
	queued = queued + inbox;
	inbox = 0
}

/* wake_runner(): signal a runner if more are idle than signalled. Under q->mu. */
inline wake_runner()
{
	if
	:: idle_runners > work_signals ->
		work_signals++;
		cond_signal(WORK)
	:: else -> skip
	fi
}

/* wake_runners(): every idle runner, to leave or to look again. Under q->mu. */
inline wake_runners()
{
	work_signals = idle_runners;
	cond_broadcast(WORK)
}

/*
 * idle_check(), after busy or queued went down: if somebody waits for the
 * queue to be idle and it is (opq__is_idle, which drains the inbox first),
 * broadcast `idle`. The runner does it when it stops being busy; with the
 * fixes, so do stop(DISCARD) and cancel.
 */
inline idle_check()
{
	if
	:: idle_waiters > 0 ->
		drain();
		if
		:: busy == 0 && queued == 0 -> cv_idle = false	/* broadcast(idle) */
		:: else -> skip
		fi
	:: else -> skip
	fi
}

/* the runner stops counting as busy (it came back and found nothing) */
inline busy_release(busy_me)
{
	if
	:: busy_me ->
		busy_me = false;
		busy--;
#ifndef BROKEN_NOIDLE
		idle_check()
#else
		skip
#endif
	:: else -> skip
	fi
}

/*
 * After the busy count and its idle check: leave if stopping, else count
 * this runner idle and wait on `work`. A bounded queue's runner does it in
 * the same step; an unbounded one's goes on holding q->mu (COUNT).
 */
inline stop_or_sleep(me, act)
{
	if
	:: state == STOPPING ->
		alive--;
		cv_change = false;	/* broadcast(change) */
		act = EXIT
	:: else ->
		if
		:: CAP == 0 -> act = COUNT
		:: else ->
			/* a runner only sleeps with nothing to take or steal */
			assert(queued == 0 && PENDSUM == 0);
			idle_runners++;
			act = SLEEP
		fi
	fi
}

/*
 * From the top of runner_main's loop, holding q->mu: the surplus check,
 * the take (take(): drain the inbox, then the runner's share of the FIFO),
 * the steal, the busy count, the stop check. It ends with act PERFORM
 * (unlock, perform a batch), EXIT (unlock, leave), SLEEP (a bounded
 * queue's runner waits on `work`), or, on an unbounded queue, CHECK or
 * COUNT with q->mu still held.
 */
inline runner_pass(me, busy_me, act, n, v)
{
	n = 0;
	if
	:: alive > target ->
		/*
		 * set_runners shrank the queue: a surplus runner leaves, without
		 * a take. The fix: it gives its busy count back first (it comes
		 * here after every batch); BROKEN_EXITBUSY leaves still counted
		 * busy. One access to the inbox at most (the idle check's drain).
		 */
#ifndef BROKEN_EXITBUSY
		busy_release(busy_me);
#endif
		alive--;
		cv_change = false;	/* broadcast(change) */
		act = EXIT
	:: else ->
		drain();	/* take() begins with opq__inbox_drain() */
		if
		:: queued > 0 ->
			/* take: the runner's share of the FIFO */
			if
			:: CAP > 0 -> n = 1
			:: else ->
				n = (queued + alive - 1) / alive;
				if
				:: n > K -> n = K
				:: else -> skip
				fi
			fi;
			queued = queued - n;
			running++;
			pending[me] = n - 1;
#ifndef BROKEN_NOROOM
			make_room()
#endif
		:: else ->
#ifndef BROKEN_NOSTEALCHECK
			/* steal: the first other runner with pending operations (under its r->mu) */
			for (v : 1 .. NR - 1) {
				if
				:: n == 0 && pending[(me + v) % NR] > 0 ->
					n = (pending[(me + v) % NR] + 1) / 2;
					pending[(me + v) % NR] = pending[(me + v) % NR] - n;
					running++;
					pending[me] = n - 1
				:: else -> skip
				fi
			}
#else
			skip
#endif
		fi;
		if
		:: n > 0 ->
			if
			:: !busy_me -> busy_me = true; busy++
			:: else -> skip
			fi;
			act = PERFORM
#ifndef BROKEN_NOIDLE
		:: CAP == 0 && n == 0 && busy_me && idle_waiters > 0 ->
			/*
			 * The idle check drains the inbox again: a step of its
			 * own (CHECK), the second access to the inbox of this
			 * stretch under q->mu.
			 */
			busy_me = false;
			busy--;
			act = CHECK
#endif
		:: else ->
			/* (the idle check, if any, does not touch the inbox here) */
			busy_release(busy_me);
			stop_or_sleep(me, act)
		fi
	fi;
	n = 0; v = 0
}

/* How a runner's step under q->mu ends: unlock, wait on `work`, or go on holding q->mu. */
inline runner_end(me, act)
{
	if
	:: act == SLEEP -> cond_block(me)
	:: act == PERFORM || act == EXIT -> unlock(me)
	:: else -> skip
	fi
}

/*
 * Stands for runner_main(): the loop, entered holding q->mu; a pass
 * (runner_pass) ends by unlocking to perform a batch, by leaving, or by
 * the wait on `work`, after which the runner relocks and comes back to the
 * top of the loop. On an unbounded queue, the stretches under q->mu are
 * cut at each access to the inbox, idle_runners or work_signals, in the C
 * code's order, so that the producers' lock-free steps interleave with
 * them: relock and idle_runners--; work_signals--; the take (its drain);
 * the idle check (its drain); idle_runners++; the look at the inbox (and,
 * if it holds operations, idle_runners-- and back to the take).
 */
proctype Runner(byte me)
{
	bool busy_me = false;
	byte act = START, n, v;
	do
	:: spurious_wake(me)
	:: atomic {
		/*
		 * Lock q->mu: at the start, after a batch (START), or when back
		 * from the wait (SLEEP); or, on an unbounded queue, go on from
		 * the top of the loop with q->mu held (TAKE).
		 */
		((act == START || act == SLEEP) && !cv[me] && mu == NONE || act == TAKE) ->
		if
		:: act == SLEEP && CAP == 0 ->
			mu = me;
			idle_runners--;
			/* work_signals-- is a step of its own; none when there is nothing to consume */
			if
			:: work_signals > 0 -> act = RELOCKED
			:: else -> act = TAKE
			fi
		:: else ->
			if
			:: act == SLEEP ->
				mu = me;
				/* a bounded queue: nobody reads these without the lock */
				idle_runners--;
#ifndef BROKEN_SIGNALCOUNT
				if
				:: work_signals > 0 -> work_signals--
				:: else -> skip
				fi
#endif
			:: act == START -> mu = me
			:: else -> skip	/* TAKE: q->mu held */
			fi;
			runner_pass(me, busy_me, act, n, v);
			runner_end(me, act)
		fi
	   }
	   if
	   :: act == EXIT -> break
	   :: act == PERFORM ->
		/* q->mu not held: perform the running operation, then pop the pending ones */
		do
		:: atomic {
			mu == NONE ->
			running--;	/* performed */
			completed++;
			if
			:: pending[me] > 0 -> pending[me]--; running++; check()	/* pop, under r->mu */
			:: else -> act = START; check(); break
			fi
		   }
		od
	   :: else -> skip
	   fi
#if CAP == 0
	/* the steps of an unbounded queue's runner that go on holding q->mu */
	:: atomic {
		act == RELOCKED ->
#ifndef BROKEN_SIGNALCOUNT
		work_signals--;
#endif
		act = TAKE
	   }
	:: atomic {
		act == CHECK ->
		/* idle_check(): opq__is_idle() drains the inbox */
		drain();
		if
		:: busy == 0 && queued == 0 -> cv_idle = false	/* broadcast(idle) */
		:: else -> skip
		fi;
		stop_or_sleep(me, act);
		runner_end(me, act)
	   }
	   if
	   :: act == EXIT -> break
	   :: else -> skip
	   fi
	:: atomic {
		act == COUNT ->
		idle_runners++;
		act = LOOK
	   }
	:: atomic {
		act == LOOK ->
		/* counted idle, then one more look */
		if
#ifndef BROKEN_NOLOOKAGAIN
#ifndef BROKEN_IDLEDRAIN
		/*
		 * The fix: at the FIFO too, which the idle check may have
		 * filled from the inbox since the take; BROKEN_IDLEDRAIN looks
		 * at the inbox only.
		 */
		:: inbox > 0 || queued > 0 -> act = UNCOUNT
#else
		:: inbox > 0 -> act = UNCOUNT
#endif
#endif
		:: else ->
			/* a runner only sleeps with nothing to take or steal */
			assert(queued == 0 && PENDSUM == 0);
			act = SLEEP;
			cond_block(me)
		fi
	   }
	:: atomic {
		act == UNCOUNT ->
		idle_runners--;
		act = TAKE
	   }
#endif
	od
}

/*
 * Stands for enqueue(), behind opq_queue_enqueue (BLOCK),
 * opq_queue_timedenqueue (TIMED) and opq_queue_tryenqueue (TRY). The loop
 * of its do: the C loop, entered with q->mu held, back to its top after
 * each wait on `space`.
 */
inline enqueue(me, form, rc)
{
	bool waiting = false, timedout = false;
	rc = PENDING;
	do
	:: spurious_wake(me)
	:: atomic { form == TIMED && cv[me] && mu == NONE -> cv[me] = false; timedout = true }
	:: atomic {
		!cv[me] && mu == NONE -> mu = me;
		if
		:: waiting ->
			waiting = false;
			space_waiters--;
			if
			:: space_signals > 0 -> space_signals--
			:: else -> skip
			fi;
			/* a waiter that finds room takes it, timed out or not */
			if
			:: timedout && queued >= CAP -> rc = ETIMEDOUT
			:: else -> skip
			fi;
			timedout = false
		:: else -> skip
		fi;
		if
		:: rc == ETIMEDOUT -> unlock(me); break
		:: else -> skip
		fi;
		if
		:: state != RUNNING -> rc = ESHUTDOWN; unlock(me); break
		:: else -> skip
		fi;
		if
		:: CAP == 0 || queued < CAP ->
			queued++;	/* push at the tail */
			enqueued++;
#ifndef BROKEN_NOWORKSIGNAL
			wake_runner();
#endif
			rc = OK;
			unlock(me);
			break
		:: else -> skip
		fi;
		if
		:: form == UNSET ->
			if
			:: form = BLOCK
			:: form = TIMED
			:: form = TRY
			fi
		:: else -> skip
		fi;
		if
		:: form == TRY -> rc = EAGAIN; unlock(me); break
		:: else -> skip
		fi;
		space_waiters++;
		waiting = true;
		cond_block(me)
	   }
	od
	/* waiting and timedout are false again on every way out */
}

/*
 * Stands for push_inbox(), an unbounded queue's enqueue: the push (one
 * compare-and-swap; ESHUTDOWN on a closed inbox), then, without the lock,
 * the read of idle_runners and the read of work_signals, each a step of
 * its own; if more runners are idle than signalled, wake_runner() under
 * q->mu. `seen` holds what the first read saw, then whether to wake.
 */
inline enqueue_inbox(me, seen, rc)
{
#ifdef BROKEN_LOCKFREECHECK
	/* the producer looks at idle_runners before its push, not after */
	atomic { seen = (idle_runners > 0) };
#endif
	atomic {
		if
		:: closed -> rc = ESHUTDOWN
		:: else ->
			inbox++;	/* the push */
			enqueued++;
			rc = OK;
#ifdef BROKEN_LOCKFREECHECK
			if
			:: seen -> onway++
			:: else -> skip
			fi
#else
			onway++
#endif
		fi;
		check()
	}
	if
	:: rc == OK ->
#ifndef BROKEN_LOCKFREECHECK
		atomic {
			seen = idle_runners;
			if
			:: seen == 0 -> onway--; check()	/* 0 > work_signals is false, whatever the read of it returns */
			:: else -> skip
			fi
		}
		if
		:: seen > 0 ->
			atomic {
				seen = (seen > work_signals);
				if
				:: !seen -> onway--; check()
				:: else -> skip
				fi
			}
		:: else -> skip
		fi;
#endif
		if
		:: seen ->
			atomic {
				lock(me);
#ifndef BROKEN_NOWORKSIGNAL
				wake_runner();
#endif
				onway--;
				seen = 0;
				unlock(me)
			}
		:: else -> skip
		fi
	:: else -> skip
	fi
}

proctype Producer(byte j)
{
	byte i, form, rc;
#if CAP == 0
	byte seen = 0;
#endif
	for (i : 1 .. OPS) {
#if CAP == 0
		enqueue_inbox(PRODUCER(j), seen, rc);
#else
		enqueue(PRODUCER(j), form, rc);
#endif
		atomic {
			assert(rc == OK || rc == EAGAIN || rc == ESHUTDOWN || rc == ETIMEDOUT);
			form = UNSET;
			rc = 0;
#if CAP == 0
			seen = 0;
#endif
		}
	}
	atomic {
		finished++;
		i = 0
	}
}

/*
 * Stands for opq_queue_wait_idle(q, deadline): idle_waiters++; wait on
 * `idle` while queued > 0 || busy > 0 (opq__is_idle(), which drains the
 * inbox first); idle_waiters--.
 */
proctype Idler()
{
	bool waiting = false, timedout = false;
	byte rc = PENDING, form = UNSET;
	do
	:: spurious_wake(IDLER)
	:: atomic { form == TIMED && cv_idle && mu == NONE -> cv_idle = false; timedout = true }
	:: atomic {
		!cv_idle && mu == NONE -> mu = IDLER;
		if
		:: !waiting -> idle_waiters++
		:: else -> waiting = false
		fi;
		drain();
		if
		:: queued == 0 && busy == 0 -> rc = OK
		:: else ->
			if
			:: timedout -> rc = ETIMEDOUT
			:: else -> skip
			fi
		fi;
		if
		:: rc != PENDING -> idle_waiters--; unlock(IDLER); break
		:: else ->
			if
			:: form == UNSET ->
				/* the form (with a deadline or not) matters from here on */
				if
				:: form = BLOCK
				:: form = TIMED
				fi
			:: else -> skip
			fi;
			waiting = true;
			cond_block(IDLER)
		fi
	   }
	od;
	atomic {
		finished++;
		waiting = false; timedout = false; form = 0; rc = 0
	}
}

/*
 * The rest of opq_queue_stop's first stretch under q->mu, after the close:
 * wake_runners(); with DISCARD, opq__take_all() (the closed inbox holds
 * none) and the idle check; then STOPPED if no runner is alive, else the
 * wait on `change`.
 */
inline stop_rest(mode, phase)
{
	wake_runners();
	if
	:: mode == DISCARD ->
		/* every operation in the FIFO, then every runner's pending (under its r->mu) */
		discarded = discarded + queued;
		queued = 0;
		for (si : 0 .. NR - 1) {
			discarded = discarded + pending[si];
			pending[si] = 0
		}
		si = 0;
		/* make_room() is moot (stopping); the fix: the idle check */
#ifndef BROKEN_DISCARDIDLE
		idle_check()
#else
		skip
#endif
	:: else -> skip
	fi;
	phase = 2;
	if
	:: alive == 0 -> state = STOPPED; unlock(STOPPER); break
	:: else -> cond_block(STOPPER)
	fi
}

/*
 * Stands for opq_queue_stop(q, mode): state = STOPPING, close the inbox
 * (what it held goes to the FIFO), broadcast `space`, wake_runners(); with
 * DISCARD empty the FIFO and every runner's pending list; then wait on
 * `change` until no runner is alive: STOPPED. On an unbounded queue, the
 * close and wake_runners() (work_signals = idle_runners) are two steps,
 * q->mu held from one to the other.
 */
proctype Stopper()
{
	byte mode;
	byte phase = 0;		/* 0: not begun, 1: inbox closed (q->mu held), 2: waiting for the runners */
	do
	:: spurious_wake(STOPPER)
	:: atomic {
		phase == 0 && mu == NONE -> mu = STOPPER;
		if
		:: mode = DRAIN
		:: mode = DISCARD
		fi;
		state = STOPPING;
		/* opq__inbox_close(): an exchange with INBOX_CLOSED */
		closed = true;
		drain();
		cond_broadcast(SPACE);
#if CAP == 0
		phase = 1	/* wake_runners() is a step of its own */
#else
		stop_rest(mode, phase)
#endif
	   }
#if CAP == 0
	:: atomic { phase == 1 -> stop_rest(mode, phase) }
#endif
	:: atomic {
		phase == 2 && !cv_change && mu == NONE -> mu = STOPPER;
		if
		:: alive == 0 -> state = STOPPED; unlock(STOPPER); break
		:: else -> cond_block(STOPPER)
		fi
	   }
	od;
	atomic { mode = 0; phase = 0 }
}

/*
 * Stands for opq_queue_set_runners(): target = n, and a broadcast on
 * `work` when shrinking, so that sleeping surplus runners leave. It
 * shrinks to R - 1 runners; with GROW, it may grow back to R afterwards,
 * starting a runner in the spare slot if none is left to spare.
 */
proctype Resizer()
{
	atomic {
		lock(RESIZER);
		if
		:: state == RUNNING ->
			target = R - 1;
			wake_runners()
		:: else -> skip
		fi;
		unlock(RESIZER)
	}
#ifdef GROW
	;
	if
	:: atomic {
		lock(RESIZER);
		if
		:: state == RUNNING ->
			target = R;
			if
			:: alive < target -> alive++; run Runner(R)
			:: else -> skip
			fi
		:: else -> skip
		fi;
		unlock(RESIZER)
	   }
	:: skip
	fi
#endif
}

/*
 * Stands for opq_queue_cancel() of an operation still in the FIFO or the
 * inbox (take_out() drains the inbox first; the operation leaves,
 * unperformed). Cancelling one already taken is not modelled. On an
 * unbounded queue, the idle check's own drain is a step of its own.
 */
proctype Canceller()
{
#if CAP == 0
	bool held = false;
#endif
	atomic {
		lock(CANCELLER);
		drain();
		if
		:: queued > 0 ->
			queued--;
			discarded++;
			make_room();
			/* the fix: the idle check */
#ifndef BROKEN_CANCELIDLE
#if CAP == 0
			if
			:: idle_waiters > 0 -> held = true	/* its drain is a step of its own */
			:: else -> skip
			fi
#else
			idle_check()
#endif
#else
			skip
#endif
		:: else -> skip
		fi;
#if CAP == 0
		if
		:: !held -> unlock(CANCELLER)
		:: else -> skip
		fi
#else
		unlock(CANCELLER)
#endif
	}
#if CAP == 0
	;
	if
	:: held ->
		atomic {
			idle_check();
			held = false;
			unlock(CANCELLER)
		}
	:: else -> skip
	fi
#endif
}

init
{
	byte i;
	atomic {
		for (i : 0 .. R - 1) {
			run Runner(i)
		}
		for (i : 0 .. P - 1) {
			run Producer(i)
		}
		run Idler();
		run Stopper();
#ifdef RESIZE
		run Resizer();
#endif
#ifdef CANCEL
		run Canceller();
#endif
		i = 0
	}
	/* After everybody returned: every operation accepted was performed or discarded. */
	(finished == P + 1 && state == STOPPED) ->
	assert(queued == 0 && inbox == 0 && PENDSUM == 0 && running == 0);
	assert(enqueued == completed + discarded);
	assert(alive == 0 && busy == 0 && idle_runners == 0 && work_signals == 0);
	assert(space_waiters == 0 && space_signals == 0 && idle_waiters == 0);
	assert(closed && onway == 0)
}

ltl all_return { <> (finished == P + 1 && state == STOPPED) }
