/*
 * stage.pml: a Promela model of the stage's ticket / enter / promotion /
 * notify protocol in lib/stage.c, checked by tests/spin.sh.
 *
 * N threads each register a ticket for their own key
 * (opq_stage_register), enter the stage ROUNDS times (opq_stage_enter),
 * some with a deadline, and unregister (opq_stage_unregister). A thread
 * that becomes the head "reads" one event and routes it to a key chosen
 * at random, its own included (opq_stage_notify), may enter again as the
 * head to collect its own latched event, and leaves (opq_stage_leave),
 * promoting the oldest waiter. With CLOSE defined, one more process
 * closes the stage at some point (opq_stage_close).
 *
 * The mutex and the per-ticket condition variables are modelled as
 * pthreads specifies them: pthread_cond_wait unlocks and blocks in one
 * atomic step and locks again before it returns; pthread_cond_signal wakes
 * the thread blocked on that ticket's condvar; a wakeup may be spurious (at
 * most MAXSPURIOUS per run); a timed wait may time out. Each atomic block
 * below is a stretch of C code that runs with the stage's mutex held.
 *
 * Properties:
 * - mutual exclusion of the head: the assertion after OPQ_STAGE_HEAD;
 * - no misrouted event: a thread only ever receives events sent to its key;
 * - notifications are never lost: every notify that returned 0 is
 *   received exactly once, by enter or by unregister (the final assertions
 *   in Check);
 * - no deadlock, no lost wakeup: a thread blocked in enter forever would be
 *   an invalid end state (pan -DSAFETY);
 * - every thread eventually finishes: the LTL property all_return, checked
 *   for acceptance cycles under weak fairness (pan -a -f).
 *
 * Deliberately broken variants that spin must reject (tests/spin.sh):
 * - BROKEN_NOLATCH: notify hands the event over only to a thread that is
 *   already waiting, and drops it otherwise;
 * - BROKEN_NOPROMOTE: leave does not promote the oldest waiter;
 * - BROKEN_NOHEADCHECK: enter makes the caller head even when there is one.
 */

#ifndef N
#define N 3
#endif
#ifndef ROUNDS
#define ROUNDS 2
#endif
#define MAXSPURIOUS 1
#define NONE 255
#define NOEVENT 255

#define OK 0
#define ENOENT 2
#define EAGAIN 11
#define ETIMEDOUT 110
#define ECONNRESET 104
#define HEAD 201		/* OPQ_STAGE_HEAD */
#define NOTIFIED 202		/* OPQ_STAGE_NOTIFIED */

/* struct opq_stage */
byte mu = NONE;			/* the mutex: owner or NONE */
byte head = NONE;		/* st->head: the ticket heading the stage */
byte fifo[N];			/* st->fifo: waiting tickets, oldest first */
byte nwaiting = 0;		/* st->waiting */
byte closed = 0;		/* st->closed */
/* struct opq_stage_ticket, one per thread (ticket i belongs to thread i) */
bool registered[N];
bool waiting[N];		/* in the FIFO (in_fifo(t)) */
bool inside[N];
bool latched[N];
byte event[N];
bool cv[N];			/* t->cv: cv[i] while thread i is blocked on it */

/* ghost variables, for the properties */
byte spurious = 0;
byte heads = 0;
byte sent[N];			/* events notify accepted for key i */
byte received[N];		/* events thread i received */
byte finished = 0;

inline lock(me)
{
	mu == NONE -> mu = me
}

inline unlock(me)
{
	assert(mu == me);
	mu = NONE
}

inline fifo_push(t)
{
	fifo[nwaiting] = t;
	nwaiting++;
	waiting[t] = true
}

/* fifo_unlink(st, t): remove t, keeping the others in order. */
inline fifo_unlink(t)
{
	byte ui = 0;
	do
	:: ui < nwaiting && fifo[ui] != t -> ui++
	:: else -> break
	od;
	assert(ui < nwaiting);
	do
	:: ui + 1 < nwaiting -> fifo[ui] = fifo[ui + 1]; ui++
	:: else -> break
	od;
	nwaiting--;
	fifo[nwaiting] = 0;
	waiting[t] = false;
	ui = 0
}

inline signal(t)
{
	cv[t] = false
}

inline cond_wake(me, timed, rc)
{
	if
	:: atomic { !cv[me] -> rc = OK }
	:: atomic { spurious < MAXSPURIOUS -> spurious++; cv[me] = false; rc = OK }
	:: atomic { timed -> cv[me] = false; rc = ETIMEDOUT }
	fi
}

/* Stands for opq_stage_register(st, key, keylen, &t). */
inline StageRegister(me)
{
	atomic {
		lock(me);
		registered[me] = true;
		unlock(me)
	}
}

/* take_event(t, &event) */
inline take_event(me, ev, rc)
{
	ev = event[me];
	event[me] = NOEVENT;
	latched[me] = false;
	rc = NOTIFIED
}

/* Stands for opq_stage_enter(st, t, deadline, &event). */
inline StageEnter(me, timed, rc, ev, timedout)
{
	atomic {
		lock(me);
		assert(registered[me] && !inside[me]);
		rc = OK;
		if
		:: latched[me] -> take_event(me, ev, rc)
		:: else ->
			if
			:: closed -> rc = closed
			:: else ->
				if
				:: head == me -> rc = HEAD
#ifndef BROKEN_NOHEADCHECK
				:: else ->
					if
					:: head == NONE -> head = me; rc = HEAD
					:: else ->
						inside[me] = true;
						fifo_push(me);
						timedout = false
					fi
#else
				:: else -> head = me; rc = HEAD
#endif
				fi
			fi
		fi
	}
	do
	:: rc == OK ->
		atomic {
			if
			:: !waiting[me] ->
				/* whoever gave me a result unlinked me */
				if
				:: head == me -> rc = HEAD
				:: else ->
					if
					:: latched[me] -> take_event(me, ev, rc)
					:: else -> rc = closed
					fi
				fi;
				assert(rc != OK);
				inside[me] = false;
				break
			:: else ->
				if
				:: timedout ->
					fifo_unlink(me);
					rc = ETIMEDOUT;
					inside[me] = false;
					break
				:: else ->
					/* opq__cond_wait: unlock and block */
					cv[me] = true;
					mu = NONE
				fi
			fi
		}
		cond_wake(me, timed, rc);
		atomic {
			lock(me);
			timedout = (rc == ETIMEDOUT);
			rc = OK
		}
	:: else -> break
	od;
	atomic {
		timedout = false;
		unlock(me)
	}
}

/* Stands for opq_stage_leave(st, t). */
inline StageLeave(me)
{
	atomic {
		lock(me);
		assert(head == me);
		head = NONE;
#ifndef BROKEN_NOPROMOTE
		if
		:: nwaiting > 0 ->
			byte next = fifo[0];
			fifo_unlink(next);
			head = next;
			signal(next);
			next = 0
		:: else -> skip
		fi;
#endif
		unlock(me)
	}
}

/* Stands for opq_stage_notify(st, key, keylen, ev): the event is the key's number. */
inline StageNotify(me, k, rc)
{
	atomic {
		lock(me);
		if
		:: !registered[k] -> rc = ENOENT
		:: else ->
			if
			:: latched[k] -> rc = EAGAIN
			:: else ->
				rc = OK;
				sent[k]++;
#ifndef BROKEN_NOLATCH
				latched[k] = true;
				event[k] = k;
				if
				:: waiting[k] -> fifo_unlink(k); signal(k)
				:: else -> skip
				fi
#else
				if
				:: waiting[k] ->
					latched[k] = true;
					event[k] = k;
					fifo_unlink(k);
					signal(k)
				:: else -> skip	/* dropped */
				fi
#endif
			fi
		fi;
		unlock(me)
	}
}

/* Stands for opq_stage_close(st, error). */
inline StageClose(me)
{
	atomic {
		lock(me);
		if
		:: closed == 0 ->
			closed = ECONNRESET;
			do
			:: nwaiting > 0 ->
				byte c = fifo[0];
				fifo_unlink(c);
				signal(c);
				c = 0
			:: else -> break
			od
		:: else -> skip
		fi;
		unlock(me)
	}
}

/* Stands for opq_stage_unregister(st, t, &event). */
inline StageUnregister(me, ev, rc)
{
	atomic {
		lock(me);
		assert(!inside[me] && head != me);
		registered[me] = false;
		if
		:: latched[me] -> take_event(me, ev, rc)
		:: else -> rc = OK
		fi;
		unlock(me)
	}
}

inline got(me, ev)
{
	assert(ev == me);	/* not misrouted */
	received[me]++;
	ev = NOEVENT
}

proctype Thread(byte me)
{
	byte round, rc, ev = NOEVENT, k;
	bool timed, timedout;
	StageRegister(me);
	for (round : 1 .. ROUNDS) {
		if
		:: timed = false
		:: timed = true
		fi;
		StageEnter(me, timed, rc, ev, timedout);
		if
		:: rc == HEAD ->
			atomic { heads++; assert(heads == 1) };
			/* read one event and route it by its key */
			if
			:: k = 0
			:: k = 1
			:: k = N - 1
			fi;
			StageNotify(me, k, rc);
			/* collect my own event as the head (enter never waits then) */
			if
			:: k == me && rc == OK ->
				StageEnter(me, timed, rc, ev, timedout);
				assert(rc == NOTIFIED);
				got(me, ev)
			:: else -> skip
			fi;
			heads--;
			StageLeave(me)
		:: rc == NOTIFIED -> got(me, ev)
		:: else -> assert(rc == ETIMEDOUT || rc == ECONNRESET)
		fi;
		rc = 0; k = 0; timed = false
	}
	StageUnregister(me, ev, rc);
	if
	:: rc == NOTIFIED -> got(me, ev)
	:: else -> skip
	fi;
	finished++
}

proctype Closer()
{
	StageClose(N)
}

/* After everybody finished: every accepted notification was received once. */
proctype Check()
{
	byte i;
	finished == N;
	for (i : 0 .. N - 1) {
		assert(sent[i] == received[i]);
		assert(!registered[i] && !latched[i])
	}
	assert(head == NONE && nwaiting == 0)
}

init
{
	byte i;
	atomic {
		for (i : 0 .. N - 1) {
			event[i] = NOEVENT;
			run Thread(i)
		}
#ifdef CLOSE
		run Closer();
#endif
		run Check()
	}
}

ltl all_return { <> (finished == N) }
