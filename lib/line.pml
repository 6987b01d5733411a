/*
 * line.pml: a Promela model of the line's generation/broadcast protocol in
 * lib/line.c, checked by tests/spin.sh.
 *
 * N threads each make ROUNDS failed requests: read the generation
 * (opq_line_generation), try to acquire the token (opq_line_try_acquire);
 * the winner "handles the failure" and releases with a status
 * (opq_line_release); the others wait for the release of the generation
 * they failed on (opq_line_wait), some of them with a deadline.
 *
 * The mutex and the condition variable are modelled as pthreads specifies
 * them: pthread_cond_wait unlocks and blocks in one atomic step and locks
 * again before it returns; pthread_cond_broadcast wakes every blocked
 * thread; a wakeup may be spurious (at most MAXSPURIOUS in a run, so that
 * a thread cannot spin forever on them); a timed wait may time out.
 *
 * Properties:
 * - mutual exclusion of the token: the assertion in Handle;
 * - every waiter receives the status of the generation it failed on, so a
 *   release is never missed and no waiter waits for a later holder: the
 *   assertions at the end of LineWait;
 * - no deadlock, no lost wakeup: a waiter blocked forever would be an
 *   invalid end state (pan -DSAFETY);
 * - every thread eventually finishes: the LTL property all_return, checked
 *   for acceptance cycles under weak fairness (pan -a -f);
 * - a destroy that succeeds never pulls the line from under a waiter: a
 *   thread that blocked in a wait is counted in waiters until its call
 *   returns, so whenever opq_line_destroy would find the line free (mutex
 *   not held, token free, no waiters) no thread is inside a wait: the
 *   assertion in Destroy.
 *
 * Deliberately broken variants that spin must reject (tests/spin.sh):
 * - BROKEN_NOGEN: opq_line_wait forgets the generation: it waits while the
 *   line is held, whoever holds it, and takes the latest status (what a
 *   plain "wait until free" would do);
 * - BROKEN_NOLOOP: the wait does not re-check its wait record after
 *   waking, so a spurious wakeup passes for a release;
 * - BROKEN_NOBCAST: release skips the broadcast (a lost wakeup);
 * - BROKEN_EARLYCOUNT: release zeroes waiters as it wakes them, as the line
 *   first did, although they have yet to take the mutex again and return
 *   (destroy then succeeded under them: a use after destroy).
 */

#ifndef N
#define N 3
#endif
#ifndef ROUNDS
#define ROUNDS 2
#endif
#define MAXSPURIOUS 1
#define HISTORY 8		/* OPQ_LINE_HISTORY */
#define NONE 255
#define GENS (N * ROUNDS + 1)

#define OK 0
#define EBUSY 16
#define EALREADY 114
#define ETIMEDOUT 110

/* struct opq_line */
byte mu = NONE;			/* opq__mu: the owner's thread number, or NONE */
bool cv[N];			/* opq__cv: cv[i] while thread i is blocked on it */
byte gen = 0;			/* opq__gen */
bool held = false;		/* opq__held */
byte waiters = 0;		/* opq__waiters: blocked in a wait, until it returns */
byte history[HISTORY];		/* opq__status */
/* struct wait_rec of each thread, and whether it is on opq__wq */
bool inwq[N];
bool wdone[N];
byte wstatus[N];

/* ghost variables, for the properties */
byte spurious = 0;
byte holders = 0;
byte inside = 0;		/* threads between blocking in a wait and its return */
byte finished = 0;
byte released[GENS];		/* the status generation g was released with */

inline lock(me)
{
	atomic { mu == NONE -> mu = me }
}

inline unlock(me)
{
	assert(mu == me);
	mu = NONE
}

/*
 * pthread_cond_wait / opq's line_cond_wait, in three steps: unlock and
 * block (one atomic step, as pthreads guarantees), wake up (a broadcast,
 * a spurious wakeup, or the deadline when timed), lock again. The caller
 * re-checks its condition afterwards, as the C code does; rc is ETIMEDOUT
 * when the deadline passed.
 */
inline cond_block(me)
{
	assert(mu == me);
	cv[me] = true;
	mu = NONE
}

inline cond_wake(me, timed, rc)
{
	if
	:: atomic { !cv[me] -> rc = OK }
	:: atomic { spurious < MAXSPURIOUS -> spurious++; cv[me] = false; rc = OK }
	:: atomic { timed -> cv[me] = false; rc = ETIMEDOUT }
	fi
}

inline broadcast()
{
	byte bi;
	for (bi : 0 .. N - 1) {
		cv[bi] = false
	}
	bi = 0
}

/* Stands for opq_line_generation(). */
inline LineGeneration(me, seen)
{
	atomic {
		lock(me);
		seen = gen;
		unlock(me)
	}
}

/* Stands for opq_line_try_acquire(line, seen, &ticket). */
inline LineTryAcquire(me, seen, tgen, rc)
{
	atomic {
		lock(me);
		if
		:: seen < gen -> tgen = seen; rc = EALREADY
		:: else ->
			if
			:: held -> tgen = gen; rc = EBUSY
			:: else -> held = true; tgen = gen; rc = OK
			fi
		fi;
		unlock(me)
	}
}

/* Stands for opq_line_release(line, &ticket, status). */
inline LineRelease(me, tgen, status)
{
	atomic {
		lock(me);
		assert(held && tgen == gen);
		history[gen % HISTORY] = status;
		released[gen] = status;
		gen++;
		held = false;
		byte ri;
		bool woke = false;
		for (ri : 0 .. N - 1) {
			if
			:: inwq[ri] -> inwq[ri] = false; wdone[ri] = true; wstatus[ri] = status; woke = true
			:: else -> skip
			fi
		}
		if
#ifndef BROKEN_NOGEN
		:: woke ->
#else
		:: waiters > 0 ->
			waiters = 0;
#endif
#ifdef BROKEN_EARLYCOUNT
			waiters = 0;
#endif
#ifndef BROKEN_NOBCAST
			broadcast()
#else
			skip
#endif
		:: else -> skip
		fi;
		woke = false;
		unlock(me)
	}
}

/*
 * Stands for opq_line_wait(line, &ticket, deadline, &status) and its
 * line_wait_gen(). Each atomic block is a stretch of code that runs with
 * the mutex held (or a single step of the condvar), so running it in one
 * step loses no interleaving that matters: nobody else can touch the
 * line's fields meanwhile.
 */
inline LineWait(me, tgen, timed, rc, status, blocking)
{
	atomic {
		lock(me);
		rc = OK;
#ifndef BROKEN_NOGEN
		if
		:: tgen == gen && held ->
			inwq[me] = true;
			wdone[me] = false;
			waiters++;
			inside++;
			blocking = true
		:: else ->
			/* released already (the model never waits on a free, never-held gen) */
			assert(tgen < gen);
			status = history[tgen % HISTORY];
			blocking = false
		fi
#else
		/* Broken: wait while the line is held, by anybody. */
		blocking = held
#endif
	}
	do
	:: blocking ->
		atomic {
#ifndef BROKEN_NOGEN
			if
			:: wdone[me] -> status = wstatus[me]; break	/* while (!w.done) */
			:: else -> cond_block(me)
			fi
#else
			if
			:: !held -> break
			:: else -> waiters++; cond_block(me)
			fi
#endif
		}
		cond_wake(me, timed, rc);
		atomic {
			lock(me);
#ifndef BROKEN_NOGEN
			if
			:: rc == ETIMEDOUT && !wdone[me] ->
				/* wq_unlink */
				inwq[me] = false;
				break
			:: else -> rc = OK
			fi;
#ifdef BROKEN_NOLOOP
			/* Broken: a wakeup is taken for the release, whatever the record says. */
			if
			:: !wdone[me] -> inwq[me] = false
			:: else -> skip
			fi;
			status = wstatus[me];
			break
#endif
#else
			if
			:: rc == ETIMEDOUT && waiters > 0 -> waiters--; break
			:: rc == ETIMEDOUT -> break
			:: else -> rc = OK
			fi
#endif
		}
	:: else -> break
	od;
	atomic {
#ifdef BROKEN_NOGEN
		if
		:: rc == OK -> status = history[(gen + HISTORY - 1) % HISTORY]
		:: else -> skip
		fi;
#endif
		if
		:: rc == OK ->
			/* the generation failed on was released, and this is its status */
			assert(tgen < gen);
			assert(status == released[tgen])
		:: else -> skip
		fi;
#ifndef BROKEN_NOGEN
		if
		:: blocking ->
			/* counted until the call returns (line_wait_gen's last step) */
#ifndef BROKEN_EARLYCOUNT
			waiters--;
#else
			/* the old line: only a waiter that took itself off the list */
			if
			:: rc == ETIMEDOUT -> waiters--
			:: else -> skip
			fi;
#endif
			inside--
		:: else -> skip
		fi;
#endif
		blocking = false;
		unlock(me)
	}
}

/*
 * Stands for opq_line_destroy() called at any moment: whenever it would
 * find the line free and destroy it, no thread may be inside a wait.
 */
proctype Destroy()
{
end:
	do
	:: atomic { mu == NONE && !held && waiters == 0 -> assert(inside == 0) }
	od
}

proctype Thread(byte me)
{
	byte round, seen, tgen, rc, status;
	bool timed, blocking;
	for (round : 1 .. ROUNDS) {
		LineGeneration(me, seen);
		/* ... the request fails ... */
		LineTryAcquire(me, seen, tgen, rc);
		if
		:: rc == OK ->
			/* Handle: the holder does the work alone. */
			atomic { holders++; assert(holders == 1) };
			holders--;
			LineRelease(me, tgen, me * ROUNDS + round)
		:: else ->
			if
			:: timed = false
			:: timed = true
			fi;
			LineWait(me, tgen, timed, rc, status, blocking)
		fi;
		seen = 0; tgen = 0; rc = 0; status = 0; timed = false
	}
	finished++
}

init
{
	byte i;
	atomic {
		for (i : 0 .. N - 1) {
			run Thread(i)
		}
		run Destroy()
	}
}

ltl all_return { <> (finished == N) }
