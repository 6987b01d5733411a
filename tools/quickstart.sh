#!/bin/sh
# quickstart.sh demo|test: set everything up on a Debian 12 machine and run
# the main job (demo) or the whole test suite (test).
#
#   demo  installs the Debian packages it needs, builds, runs opqueue-demo.
#   test  installs them, then runs `make check` on three out-of-tree builds
#         (normal with -Werror and debug checks, ThreadSanitizer,
#         AddressSanitizer+UBSan) and `make distcheck`; fails if any fails.
#
# Builds go to _build/<kind> under the source tree. JOBS sets make -j.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
what=${1:-}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

packages="autoconf automake libtool pkg-config make gcc clang libclang-rt-14-dev
	check libjemalloc-dev mandoc libglib2.0-dev libuv1-dev gnuplot-nox
	libsqlite3-dev sqlite3 postgresql libpq-dev spin"

install_missing() {
	missing=
	for p in $packages; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
			missing="$missing $p"
	done
	[ -z "$missing" ] && return 0
	echo "== installing:$missing"
	sudo=
	[ "$(id -u)" = 0 ] || sudo=sudo
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
}

bootstrap() {
	[ -x configure ] && [ configure -nt configure.ac ] && [ Makefile.in -nt Makefile.am ] ||
		./autogen.sh
}

# build KIND CONFIGURE-ARGS...: configure and build out of tree in _build/KIND.
build() {
	kind=$1
	shift
	mkdir -p "_build/$kind"
	(cd "_build/$kind" && "$top/configure" --enable-werror "$@" >configure.out &&
		make -j"$jobs" >make.out) ||
		{ echo "== $kind build failed"; tail -n 40 "_build/$kind/configure.out" "_build/$kind/make.out" 2>/dev/null; exit 1; }
}

check() {
	kind=$1
	echo "== make check ($kind)"
	if ! (cd "_build/$kind" && make -j"$jobs" check); then
		for log in "_build/$kind"/tests/*.log; do
			grep -q '^FAIL\|^ERROR' "$log" 2>/dev/null && cat "$log"
		done
		echo "== make check ($kind) FAILED"
		exit 1
	fi
}

case $what in
demo)
	install_missing
	bootstrap
	build default
	./_build/default/tools/opqueue-demo
	;;
test)
	install_missing
	bootstrap
	build default --enable-debug
	check default
	# The spin models (tests/spin.sh) check the protocols, not this build:
	# once, in the default build, is enough.
	build tsan CC=clang --enable-sanitizer=thread --enable-debug
	(export OPQ_SKIP_MODELS=1 TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" CK_TIMEOUT_MULTIPLIER=4
		check tsan)
	build asan CC=clang --enable-sanitizer=address --enable-debug
	(export OPQ_SKIP_MODELS=1 ASAN_OPTIONS="detect_leaks=1 abort_on_error=1" CK_TIMEOUT_MULTIPLIER=4 \
		UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1"
		check asan)
	echo "== make distcheck"
	(cd _build/default && OPQ_SKIP_MODELS=1 make -j"$jobs" distcheck >distcheck.out 2>&1) ||
		{ tail -n 60 _build/default/distcheck.out; echo "== make distcheck FAILED"; exit 1; }
	echo "== install, then build the README's example with pkg-config"
	stage="$top/_build/stage"
	rm -rf "$stage"
	(cd _build/default && make install DESTDIR="$stage" >install.out 2>&1)
	pc=$(find "$stage" -name opqueue.pc)
	cc -o _build/jobs examples/jobs.c \
		$(PKG_CONFIG_PATH="${pc%/*}" pkg-config --define-prefix --cflags --libs opqueue) \
		-Wl,-rpath,"${pc%/pkgconfig/*}"
	[ "$(./_build/jobs | grep -c '^job ')" = 10 ] || { echo "== example FAILED"; exit 1; }
	[ -n "$(find "$stage" -name opq_queue_tryenqueue.3)" ] || { echo "== man links missing"; exit 1; }
	echo "== all passed: check (default, tsan, asan), distcheck, installed example"
	# One closing line for readers of the log: Check's own counts, summed.
	cat _build/default/tests/*.log _build/tsan/tests/*.log _build/asan/tests/*.log |
		awk '/^[0-9]+%: Checks: / { gsub(",", ""); n += $3; f += $5 + $7 }
		     END { printf "checks: %d passed, %d failed\n", n - f, f }'
	;;
*)
	echo "usage: $0 demo|test" >&2
	exit 2
	;;
esac
