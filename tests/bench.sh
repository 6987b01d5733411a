#!/bin/sh
# The benchmark program, small: every workload runs, every operation of
# every variant ran exactly once (opqueue-bench checks that and exits
# non-zero otherwise), and each table has the rows it should. Speed is
# measured by bench/run, not here. In a sanitizer build the peers are left
# out: GLib and libuv are not instrumented (GLib's mutexes are bare futexes
# that ThreadSanitizer cannot see).
set -u
tool="${top_builddir:-.}/tools/opqueue-bench"
[ -x "$tool" ] || { echo "$tool not built"; exit 99; }
variants= old_variants=
[ -n "${SAN_CFLAGS:-}" ] && variants="-V intrusive,fn,plain,ceiling" &&
	old_variants="-V intrusive,fn,old-intrusive,old-fn,plain,ceiling"
out=$(mktemp "${TMPDIR:-/tmp}/opq-bench.XXXXXX") || exit 99
err=$(mktemp "${TMPDIR:-/tmp}/opq-bench.XXXXXX") || exit 99
trap 'rm -f "$out" "$err"' EXIT
fail=0

# run NAME ARGS...: run the tool, fail on a non-zero exit.
run() {
	name=$1
	shift
	if ! "$tool" "$@" >"$out" 2>"$err"; then
		echo "opqueue-bench $*: failed"
		cat "$out" "$err"
		fail=1
		return 1
	fi
}

# expect TEXT: the last run printed a line starting with TEXT.
expect() {
	grep -q "^$1" "$out" || { echo "$name: no line starting with '$1'"; cat "$out"; fail=1; }
}

if run burst burst $variants -p 1,2 -w 0,1000 -r 2 -m 2000 -k 1; then
	[ "$(grep -c '^burst:' "$out")" = 4 ] || { echo "burst: not 4 tables"; cat "$out"; fail=1; }
	expect "opqueue intrusive"
	expect "opqueue fn"
	expect "plain mutex/condvar"
	expect "no queue (ceiling)"
fi
# Oversubscribed pools: -r takes a list, one table per combination.
if run oversubscribed burst $variants -p 1,8 -r 16,64 -w 0,1000 -m 200 -k 1; then
	[ "$(grep -c '^burst:' "$out")" = 8 ] || { echo "oversubscribed: not 8 tables"; cat "$out"; fail=1; }
	expect "burst: 8 producer(s) x 200 ops, 64 runners, 1000 ns ops"
	expect "opqueue intrusive"
	expect "no queue (ceiling)"
fi
# Another build's rows (-O): here the same program stands in for it.
if run other burst -O "$tool" -L self -V intrusive,fn,old-intrusive,old-fn,ceiling \
	-p 1 -r 2 -m 2000 -k 1; then
	expect "opqueue (self) intrusive"
	expect "opqueue (self) fn"
fi
if run latency latency $old_variants -O "$tool" -r 2 -n 1000 -k 1; then
	expect "opqueue intrusive"
	expect "opqueue fn"
	expect "opqueue (old) intrusive"
	expect "opqueue (old) fn"
fi
if run bounded bounded -O "$tool" -p 2 -r 2 -w 1000 -m 2000 -c 64 -k 1; then
	expect "opqueue intrusive, bounded"
	expect "opqueue fn, bounded"
	expect "opqueue (old) intrusive, bounded"
	expect "opqueue (old) fn, bounded"
	expect "no queue (ceiling)"
fi
if run library -O "$tool" --library; then
	[ "$(grep -c . "$out")" = 2 ] || { echo "library: not 2 lines"; cat "$out"; fail=1; }
fi
if run line line -m 1000 -k 1; then
	expect "acquire + release"
	for n in 1 8 64; do expect "$n "; done
fi
if run push push -p 1,2 -m 1000 -k 1; then
	expect "1 "
	expect "2 "
fi
# The loop workload: round trips through a completion channel (and libuv's
# uv_queue_work), each operation performed and completed exactly once on
# the loop thread; the targets' lines are printed when libuv is measured.
if run loop loop $variants -m 3000 -n 1000 -w 0,1000 -i 1,64 -k 1; then
	[ "$(grep -c '^loop' "$out")" -ge 2 ] || { echo "loop: not 2 tables"; cat "$out"; fail=1; }
	expect "1          empty      opqueue intrusive"
	expect "64         1000 ns    opqueue submit"
	[ -n "$variants" ] || grep -q '^target: latency p50, opqueue intrusive' "$out" ||
		grep -q 'libuv uv_queue_work: not measured' "$out" ||
		{ echo "loop: neither libuv's rows nor why they are missing"; cat "$out"; fail=1; }
fi
[ $fail = 0 ] && echo "every workload ran; every operation exactly once"
exit $fail
