/*
 * queue.pml: a Promela model of the queue's sleep/wake protocol in
 * lib/queue.c: runners sleeping on `work`, producers on `space`,
 * opq_queue_wait_idle on `idle`, opq_queue_stop on `change`, with the
 * counts that decide who signals whom. Checked by tests/spin.sh.
 *
 * What runs: R runners (runner_main), P producers that each enqueue OPS
 * operations (enqueue: opq_queue_enqueue, _timedenqueue or _tryenqueue,
 * the form chosen at random when it first matters, that is when the queue
 * is full), one thread in opq_queue_wait_idle (with or without a deadline,
 * chosen when it first has to wait), and one thread that calls
 * opq_queue_stop at any time, in a mode chosen then (DRAIN or DISCARD).
 * With RESIZE, one more thread calls opq_queue_set_runners(R - 1) at some
 * time; with GROW as well, it may call opq_queue_set_runners(R) afterwards,
 * which starts a runner in a spare slot. With CANCEL, one more thread
 * cancels one queued operation at some time (opq_queue_cancel).
 *
 * CAP is the capacity: 1 by default, 2, or 0 for an unbounded queue. A
 * runner's take gives it one operation from a bounded FIFO, and from an
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
 * Abstractions:
 * - operations are counts, not lists: the FIFO is `queued`, a runner's
 *   batch is `pending[r]` plus its one running operation; what an
 *   operation does is one step (running--, completed++), merged with the
 *   pop of the next pending one, since nobody reads `completed`;
 * - each stretch of C code that runs under q->mu is one atomic step,
 *   starting with the lock (or the relock after a wait) and ending with
 *   the unlock (or the unlock-and-block of a wait): nobody else can touch
 *   the protected fields meanwhile, so no interleaving that matters is
 *   lost;
 * - r->mu is not a variable: every section under a runner's r->mu (its
 *   own pop; a steal or a discard, inside a q->mu section) is a single
 *   atomic step, which is what the mutex guarantees;
 * - a thief looks at the other runners in the order me+1, me+2, ... and
 *   steals from the first with pending operations;
 * - one thread waits in opq_queue_wait_idle, so signal and broadcast on
 *   `idle` are the same here, and so on `change` (one stopper);
 * - memory (boxes, slabs), the inbox, affinity, names, timers, hooks and
 *   the order of operations are not modelled; nor is an operation that
 *   blocks, so stealing is checked as a rule (a runner never goes to sleep
 *   while another has pending operations) rather than for its liveness;
 * - set_runners is refused once stop began and never goes down to 0
 *   runners (with 0 runners nothing drains the queue, by design); stop is
 *   called once.
 *
 * Properties, as assertions (inv(), at the end of every step that changes
 * the shared state) and invalid end states (pan -DSAFETY):
 * - conservation: enqueued == completed + running + queued + sum(pending)
 *   + discarded, at every step;
 * - running <= alive; work_signals <= idle_runners and space_signals <=
 *   space_waiters (a signal is only counted for a counted waiter);
 * - no lost runner wakeup: while operations are queued, some live runner
 *   is not asleep unwoken on `work`; a runner only goes to sleep when the
 *   FIFO is empty and no runner has pending operations;
 * - a producer never sleeps unwoken while there is room: while some
 *   producer is blocked unwoken on `space`, queued + (producers woken but
 *   not yet back from the wait) >= CAP;
 * - wait_idle never sleeps unwoken on an idle queue (queued == 0 and
 *   busy == 0);
 * - no deadlock, no lost wakeup: every producer returns, wait_idle
 *   returns, every runner exits after stop and stop returns (a thread
 *   blocked for ever is an invalid end state); then every operation
 *   accepted was performed or discarded, and every count is back to 0
 *   (the end of init);
 * - every thread eventually returns: the LTL property all_return, checked
 *   for acceptance cycles under weak fairness (pan -a -f).
 *
 * Two flaws in the protocol as first written, found by this model, are
 * fixed here; each BROKEN_ flag below restores one, and tests/spin.sh
 * checks that spin rejects it:
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
 *
 * Deliberately broken variants that spin must reject (tests/spin.sh):
 * - BROKEN_NOWORKSIGNAL: enqueue never signals `work` (a lost wakeup);
 * - BROKEN_SIGNALCOUNT: a runner back from its wait does not consume a
 *   work signal, so the count runs ahead and later pushes do not signal;
 * - BROKEN_NOROOM: a runner's take does not make room (a producer sleeps
 *   while there is room);
 * - BROKEN_NOIDLE: the last busy runner does not broadcast `idle`;
 * - BROKEN_NOSTEALCHECK: a runner goes to sleep when the FIFO is empty
 *   without looking at the other runners' pending operations (CAP=0).
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
#define CAP 1			/* capacity; 0: unbounded */
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
/* what a runner does after a pass of its loop */
#define PERFORM 0
#define SLEEP 1
#define EXIT 2

#define OK 0
#define EAGAIN 11
#define ESHUTDOWN 108
#define ETIMEDOUT 110
#define PENDING 254		/* not returned yet */

/* struct opq_queue */
byte mu = NONE;			/* q->mu: the owner's thread number, or NONE */
byte queued = 0;		/* operations in the FIFO */
byte idle_runners = 0;
byte work_signals = 0;
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

inline inv()
{
	assert(enqueued == completed + running + queued + PENDSUM + discarded);
	assert(running <= alive);	/* one running operation per live runner at most */
	assert(work_signals <= idle_runners);
	assert(space_signals <= space_waiters);
	/* no lost runner wakeup: a queued operation always has a runner on its way */
	assert(queued == 0 || ASLEEP_RUNNERS < alive);
	/* a producer never sleeps unwoken while there is room for it */
	assert(CAP == 0 || ASLEEP_PRODUCERS == 0 ||
	       queued + space_waiters - ASLEEP_PRODUCERS >= CAP);
	/* wait_idle never sleeps unwoken on an idle queue */
	assert(!cv_idle || queued > 0 || busy > 0)
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
	atomic { cv[me] && spurious < MAXSPURIOUS -> spurious++; cv[me] = false }
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
 * The idle check, after busy or queued went down: if the queue is idle,
 * broadcast `idle`. The runner does it when it stops being busy; with the
 * fixes, so do stop(DISCARD) and cancel.
 */
inline idle_check()
{
	if
	:: busy == 0 && queued == 0 && idle_waiters > 0 -> cv_idle = false	/* broadcast(idle) */
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
 * One pass of runner_main's loop, from its top to the unlock (PERFORM,
 * EXIT) or to the wait on `work` (SLEEP): the surplus check, the take
 * (take()), the steal, the busy count, the stop check.
 */
inline runner_pass(me, busy_me, act, n, v)
{
	n = 0;
	if
	:: alive > target ->
		/*
		 * set_runners shrank the queue: a surplus runner leaves. The fix:
		 * it gives its busy count back first (it comes here after every
		 * batch); BROKEN_EXITBUSY leaves still counted busy.
		 */
#ifndef BROKEN_EXITBUSY
		busy_release(busy_me);
#endif
		alive--;
		cv_change = false;	/* broadcast(change) */
		act = EXIT
	:: else ->
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
		:: else ->
			busy_release(busy_me);
			if
			:: state == STOPPING ->
				alive--;
				cv_change = false;	/* broadcast(change) */
				act = EXIT
			:: else ->
				/* a runner only sleeps with nothing to take or steal */
				assert(queued == 0 && PENDSUM == 0);
				idle_runners++;
				act = SLEEP
			fi
		fi
	fi;
	n = 0; v = 0
}

/*
 * Stands for runner_main(): the loop, entered holding q->mu; a pass
 * (runner_pass) ends by unlocking to perform a batch, by leaving, or by
 * the wait on `work`, after which the runner relocks and comes back to the
 * top of the loop.
 */
proctype Runner(byte me)
{
	bool busy_me = false, waited = false;
	byte act, n, v;
	do
	:: spurious_wake(me)
	:: atomic {
		/* lock q->mu: at the start, after a batch, or when back from the wait */
		!cv[me] && mu == NONE -> mu = me;
		if
		:: waited ->
			waited = false;
			idle_runners--;
#ifndef BROKEN_SIGNALCOUNT
			if
			:: work_signals > 0 -> work_signals--
			:: else -> skip
			fi
#endif
		:: else -> skip
		fi;
		runner_pass(me, busy_me, act, n, v);
		if
		:: act == SLEEP -> waited = true; cond_block(me)
		:: else -> unlock(me)
		fi
	   }
	   if
	   :: act == EXIT -> break
	   :: act == PERFORM ->
		/* q->mu not held: perform the running operation, then pop the pending ones */
		do
		:: atomic {
			running--;	/* performed */
			completed++;
			if
			:: pending[me] > 0 -> pending[me]--; running++; inv()	/* pop, under r->mu */
			:: else -> inv(); break
			fi
		   }
		od
	   :: act == SLEEP -> skip
	   fi
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
	:: atomic { form == TIMED && cv[me] -> cv[me] = false; timedout = true }
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
			if
			:: idle_runners > work_signals ->
				work_signals++;
				cond_signal(WORK)
			:: else -> skip
			fi;
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

proctype Producer(byte j)
{
	byte i, form, rc;
	for (i : 1 .. OPS) {
		enqueue(PRODUCER(j), form, rc);
		atomic {
			assert(rc == OK || rc == EAGAIN || rc == ESHUTDOWN || rc == ETIMEDOUT);
			form = UNSET;
			rc = 0
		}
	}
	atomic {
		finished++;
		i = 0
	}
}

/*
 * Stands for opq_queue_wait_idle(q, deadline): idle_waiters++; wait on
 * `idle` while queued > 0 || busy > 0; idle_waiters--.
 */
proctype Idler()
{
	bool waiting = false, timedout = false;
	byte rc = PENDING, form = UNSET;
	do
	:: spurious_wake(IDLER)
	:: atomic { form == TIMED && cv_idle -> cv_idle = false; timedout = true }
	:: atomic {
		!cv_idle && mu == NONE -> mu = IDLER;
		if
		:: !waiting -> idle_waiters++
		:: else -> waiting = false
		fi;
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
 * Stands for opq_queue_stop(q, mode): state = STOPPING, broadcast `space`
 * and `work`, with DISCARD empty the FIFO and every runner's pending
 * list; then wait on `change` until no runner is alive: STOPPED.
 */
proctype Stopper()
{
	byte mode;
	bool waiting = false;
	do
	:: spurious_wake(STOPPER)
	:: atomic {
		!cv_change && mu == NONE -> mu = STOPPER;
		if
		:: !waiting ->
			if
			:: mode = DRAIN
			:: mode = DISCARD
			fi;
			state = STOPPING;
			cond_broadcast(SPACE);
			cond_broadcast(WORK);
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
			fi
		:: else -> waiting = false
		fi;
		if
		:: alive == 0 -> state = STOPPED; unlock(STOPPER); break
		:: else -> waiting = true; cond_block(STOPPER)
		fi
	   }
	od;
	mode = 0
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
			cond_broadcast(WORK)
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
 * Stands for opq_queue_cancel() of an operation still in the FIFO (it
 * leaves it, unperformed). Cancelling one already taken is not modelled.
 */
proctype Canceller()
{
	atomic {
		lock(CANCELLER);
		if
		:: queued > 0 ->
			queued--;
			discarded++;
			make_room();
			/* the fix: the idle check */
#ifndef BROKEN_CANCELIDLE
			idle_check()
#else
			skip
#endif
		:: else -> skip
		fi;
		unlock(CANCELLER)
	}
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
	assert(queued == 0 && PENDSUM == 0 && running == 0);
	assert(enqueued == completed + discarded);
	assert(alive == 0 && busy == 0 && idle_runners == 0 && work_signals == 0);
	assert(space_waiters == 0 && space_signals == 0 && idle_waiters == 0)
}

ltl all_return { <> (finished == P + 1 && state == STOPPED) }
