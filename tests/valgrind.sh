#!/bin/sh
# valgrind over the test suite (`make valgrind`; not part of make check: it
# takes minutes). memcheck runs every Check binary in one process
# (CK_FORK=no) with full leak checking, every leak kind an error; helgrind
# and DRD run the queue and line tests as a second opinion next to TSan.
# (Not check_scope: helgrind takes its C11 atomics, the scopes' cancel
# flags, for races, and the test calls ck_assert from runner threads, which
# Check's nofork messaging does not survive under helgrind's scheduling.)
# Stress sizes are divided by OPQ_TEST_DIVISOR (10 unless set), tests that
# need threads running at once see OPQ_TEST_VALGRIND; memcheck
# also runs opqueue-stress for OPQ_VALGRIND_STRESS_SECONDS (5).
# Prints one line per run; exits 1 if any run reports an error.
# Usage: tests/valgrind.sh [memcheck|helgrind|drd|all] (from the build dir).
set -u
args=
what=${1:-all}
top_builddir=${top_builddir:-.}
libtool=${LIBTOOL:-$top_builddir/libtool}
command -v valgrind >/dev/null 2>&1 || { echo "valgrind not installed: skipped"; exit 77; }
export CK_FORK=no OPQ_TEST_DIVISOR=${OPQ_TEST_DIVISOR:-10} OPQ_TEST_VALGRIND=1
logs=$top_builddir/tests/valgrind
mkdir -p "$logs"
fail=0

# run TOOL TEST [VALGRIND-OPTIONS...]; TEST is tests/TEST, or a tool with its
# arguments in $args.
run() {
	tool=$1 test=$2
	shift 2
	case $test in
	opqueue-*) bin=$top_builddir/tools/$test ;;
	*) bin=$top_builddir/tests/$test args= ;;
	esac
	[ -x "$bin" ] || { echo "$test: not built"; fail=1; return; }
	log=$logs/$test.$tool.log
	start=$(date +%s)
	# shellcheck disable=SC2086
	$libtool --mode=execute valgrind --tool="$tool" --error-exitcode=1 --log-file="$log" \
		"$@" "$bin" $args >"$log.out" 2>&1
	rc=$?
	secs=$(($(date +%s) - start))
	errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) errors.*/\1/p' "$log" | tail -n 1)
	heap=$(sed -n 's/.*total heap usage: \(.*\)/\1/p' "$log" | tail -n 1)
	checks=$(grep -o -e '[0-9]*%: Checks: [0-9]*, Failures: [0-9]*, Errors: [0-9]*' \
		-e '^calls: [0-9]*' -e '^violations: [0-9]*' "$log.out" | tr '\n' ' ')
	printf '%-9s %-15s rc %d, %s errors, %ss%s%s\n' "$tool" "$test" "$rc" "${errors:-?}" "$secs" \
		"${heap:+, heap: $heap}" "${checks:+; $checks}"
	[ "$rc" = 0 ] && [ "${errors:-1}" = 0 ] || { fail=1; echo "  see $log"; }
}

tests="check_queue check_queue_batch check_line check_stage check_fault check_badinput
	check_authdemo check_lease check_scope check_fanout"
case $what in memcheck | all)
	for t in $tests; do
		run memcheck "$t" --leak-check=full --show-leak-kinds=all \
			--errors-for-leak-kinds=all
	done
	# Every module at once, briefly.
	args="-q -d ${OPQ_VALGRIND_STRESS_SECONDS:-5} -t 4"
	run memcheck opqueue-stress --leak-check=full --show-leak-kinds=all \
		--errors-for-leak-kinds=all ;;
esac
supp=--suppressions=${top_srcdir:-$(dirname "$0")/..}/tests/valgrind.supp
case $what in helgrind | all)
	for t in check_queue check_line; do run helgrind "$t" "$supp"; done ;;
esac
case $what in drd | all)
	for t in check_queue check_line; do run drd "$t" "$supp"; done ;;
esac
exit $fail
