#!/bin/sh
# Model checking: the Promela models next to the code they model
# (lib/line.pml, lib/stage.pml, lib/queue.pml) are checked exhaustively by
# spin:
# assertions and invalid end states (deadlocks, lost wakeups) with
# pan -DSAFETY, and the LTL property "every thread eventually returns" as
# acceptance cycles under weak fairness (pan -a -f). Then each deliberately
# broken variant (a -DBROKEN_* flag that removes one piece of the protocol)
# must be rejected, so that this test can fail. Skipped (77) without spin.
set -u
# The models do not depend on how the library was built: quickstart.sh runs
# them in the default build only and sets OPQ_SKIP_MODELS=1 for the others.
[ "${OPQ_SKIP_MODELS:-0}" = 1 ] && { echo "OPQ_SKIP_MODELS=1: skipped"; exit 77; }
command -v spin >/dev/null 2>&1 || { echo "spin not installed: skipped"; exit 77; }
cc=${SPIN_CC:-cc}
command -v "$cc" >/dev/null 2>&1 || { echo "no C compiler ($cc): skipped"; exit 77; }
src=${top_srcdir:-.}/lib
src=$(cd "$src" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/opq-spin.XXXXXX") || exit 99
trap 'rm -rf "$work"' EXIT INT TERM
fail=0

# run NAME MODEL MODE EXPECT [SPIN-FLAGS...]: MODE is safety or liveness,
# EXPECT is pass (no error, exhaustive) or fail (spin finds an error).
run() {
	name=$1 model=$2 mode=$3 expect=$4
	shift 4
	dir="$work/$name"
	mkdir -p "$dir"
	cp "$src/$model" "$dir/"
	start=$(date +%s)
	if ! (cd "$dir" && spin "$@" -a "$model" >spin.out 2>&1); then
		echo "FAIL $name: spin -a failed"; cat "$dir/spin.out"; fail=1; return
	fi
	case $mode in
	safety) ccflags="-DSAFETY -DNOCLAIM" panflags="" ;;
	liveness) ccflags="" panflags="-a -f" ;;
	esac
	# COLLAPSE (for the larger stage model, and the queue's safety runs)
	# compresses the state vectors without losing any state: less memory,
	# more time (much more for the queue's liveness runs, which are small).
	# The queue model runs up to 9 processes: weak fairness needs NFAIR=3.
	case $model:$mode in
	stage.pml:*|queue.pml:safety) ccflags="$ccflags -DCOLLAPSE" ;;
	esac
	case $model in queue.pml) ccflags="$ccflags -DNFAIR=3" ;; esac
	# A broken variant stops at its first error: compiling it without
	# optimisation saves more time (2s a run) than its search loses.
	case $expect in pass) opt=-O2 ;; fail) opt=-O0 ;; esac
	if ! (cd "$dir" && $cc -w $opt $ccflags -o pan pan.c >cc.out 2>&1); then
		echo "FAIL $name: cannot compile pan"; cat "$dir/cc.out"; fail=1; return
	fi
	(cd "$dir" && ./pan -m100000 $panflags >pan.out 2>&1)
	secs=$(($(date +%s) - start))
	out="$dir/pan.out"
	states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' "$out")
	trans=$(sed -n 's/^ *\([0-9.e+]*\) transitions.*/\1/p' "$out")
	errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$out")
	what=$(grep -m1 -e 'assertion violated' -e 'invalid end state' -e 'acceptance cycle' "$out" |
		sed 's/^pan:[0-9]*: *//; s/ (at depth.*//')
	if grep -q 'max search depth too small' "$out"; then
		echo "FAIL $name: search depth too small"; fail=1; return
	fi
	case $expect in
	pass)
		if [ "$errors" = 0 ]; then
			echo "ok   $name ($mode${*:+ $*}): errors: 0, $states states stored, $trans transitions, ${secs}s"
		else
			echo "FAIL $name: $what"; sed -n 1,20p "$out"; fail=1
		fi ;;
	fail)
		if [ -n "$errors" ] && [ "$errors" -gt 0 ]; then
			echo "ok   $name ($mode${*:+ $*}) rejected as it must be: $what ($states states stored, ${secs}s)"
		else
			echo "FAIL $name: the broken model passed (errors: ${errors:-?})"; fail=1
		fi ;;
	esac
}

run line-safety line.pml safety pass
run line-liveness line.pml liveness pass
run line-broken-nogen line.pml safety fail -DBROKEN_NOGEN
run line-broken-noloop line.pml safety fail -DBROKEN_NOLOOP
run line-broken-nobcast line.pml safety fail -DBROKEN_NOBCAST
run line-broken-nobcast-live line.pml liveness fail -DBROKEN_NOBCAST
run line-broken-earlycount line.pml safety fail -DBROKEN_EARLYCOUNT

run stage-safety stage.pml safety pass
run stage-close stage.pml safety pass -DCLOSE -DROUNDS=1
run stage-liveness stage.pml liveness pass -DROUNDS=1
run stage-broken-nolatch stage.pml safety fail -DBROKEN_NOLATCH
run stage-broken-nopromote stage.pml safety fail -DBROKEN_NOPROMOTE
run stage-broken-nopromote-live stage.pml liveness fail -DBROKEN_NOPROMOTE -DROUNDS=1
run stage-broken-noheadcheck stage.pml safety fail -DBROKEN_NOHEADCHECK

# The queue: bounded (CAP=1 by default, 2) with set_runners shrinking it,
# or cancel; unbounded (CAP=0: the lock-free inbox, batches, pending lists,
# steals) with two producers of two operations each and two runners or one,
# then with one producer and set_runners shrinking and growing it, or
# cancel. Liveness: bounded with one operation per producer and set_runners
# shrinking the queue; unbounded with two producers of one operation each
# (more would take this test past three minutes). EXITBUSY, DISCARDIDLE and
# CANCELIDLE are the protocol as first written, before the fixes the model
# found; IDLEDRAIN is the runner's last look before it sleeps as lib/runner.c
# first had it (at the inbox only, not the FIFO), which lets an operation
# wait in the FIFO while the only runner sleeps (see lib/queue.pml).
# IDLEDRAIN and NOLOOKAGAIN lose an operation only when the runner is the
# only one (with another, the producer wakes that one, or it comes back for
# the operation): they run with one runner.
run queue-safety queue.pml safety pass -DRESIZE
run queue-cap2-cancel queue.pml safety pass -DCAP=2 -DCANCEL
run queue-unbounded queue.pml safety pass -DCAP=0
run queue-unbounded-1runner queue.pml safety pass -DCAP=0 -DR=1
run queue-unbounded-resize queue.pml safety pass -DCAP=0 -DP=1 -DRESIZE -DGROW
run queue-unbounded-cancel queue.pml safety pass -DCAP=0 -DP=1 -DCANCEL
run queue-liveness queue.pml liveness pass -DRESIZE -DOPS=1
run queue-unbounded-liveness queue.pml liveness pass -DCAP=0 -DOPS=1
run queue-broken-noworksignal queue.pml safety fail -DBROKEN_NOWORKSIGNAL
run queue-broken-signalcount queue.pml safety fail -DBROKEN_SIGNALCOUNT
run queue-broken-noroom queue.pml safety fail -DBROKEN_NOROOM
run queue-broken-noidle queue.pml safety fail -DBROKEN_NOIDLE
run queue-broken-nostealcheck queue.pml safety fail -DCAP=0 -DBROKEN_NOSTEALCHECK
run queue-broken-exitbusy queue.pml safety fail -DRESIZE -DBROKEN_EXITBUSY
run queue-broken-exitbusy-live queue.pml liveness fail -DRESIZE -DOPS=1 -DBROKEN_EXITBUSY
run queue-broken-discardidle queue.pml safety fail -DBROKEN_DISCARDIDLE
run queue-broken-cancelidle queue.pml safety fail -DCAP=2 -DCANCEL -DOPS=1 -DBROKEN_CANCELIDLE
run queue-broken-idledrain queue.pml safety fail -DCAP=0 -DR=1 -DP=1 -DBROKEN_IDLEDRAIN
run queue-broken-nolookagain queue.pml safety fail -DCAP=0 -DR=1 -DP=1 -DBROKEN_NOLOOKAGAIN
run queue-broken-lockfreecheck queue.pml safety fail -DCAP=0 -DP=1 -DBROKEN_LOCKFREECHECK
exit $fail
