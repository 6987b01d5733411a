#!/bin/sh
# quickstart.sh demo|test|debs: set everything up on a Debian 12 machine and run
# the main job (demo) or the whole test suite (test).
#
#   demo  installs the Debian packages it needs, builds, runs opqueue-demo.
#   test  installs them, then runs `make check` on three out-of-tree builds
#         (normal with -Werror and debug checks, ThreadSanitizer,
#         AddressSanitizer+UBSan) and `make distcheck`, builds the README's
#         example against a staged install, then builds the Debian packages
#         (debian/), checks them with lintian, installs them, builds and runs
#         the example against them and removes them; fails if any fails.
#   debs  installs them, then only the Debian packages' step of test.
#
# Builds go to _build/<kind> under the source tree. JOBS sets make -j.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
what=${1:-}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

packages="autoconf automake libtool pkg-config make gcc clang libclang-rt-14-dev
	check libjemalloc-dev mandoc libglib2.0-dev libuv1-dev libevent-dev gnuplot-nox
	libsqlite3-dev sqlite3 postgresql libpq-dev spin
	libcurl4-openssl-dev libjansson-dev etcd-server etcd-client curl
	build-essential dpkg-dev debhelper lintian clang-format"

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

# debian_packages: build the Debian packages from the tracked files (with
# their uncommitted changes) in _build/deb/src, so that neither the build nor
# dpkg-buildpackage's ../*.deb touches the checkout; lintian must find no
# error; install them, build and run the README's example against them with
# pkg-config from /usr, then remove the packages this step installed.
debian_packages() {
	echo "== Debian packages: build, lintian, install, the README's example against them"
	[ -d debian ] && git rev-parse --git-dir >/dev/null 2>&1 ||
		{ echo "== no debian/ or not a git checkout: Debian packages skipped"; return 0; }
	deb="$top/_build/deb"
	rm -rf "$deb"
	mkdir -p "$deb/src"
	# git stash create: a commit of the work tree's tracked changes, if any,
	# made without touching the tree or the stash list.
	rev=$(git stash create 2>/dev/null) || rev=
	git archive "${rev:-HEAD}" | tar -x -C "$deb/src"
	# noddebs: no -dbgsym packages, so that *.deb is what a user installs.
	(cd "$deb/src" && DEB_BUILD_OPTIONS="noddebs parallel=$jobs" \
		dpkg-buildpackage -us -uc -b >../build.out 2>&1) ||
		{ tail -n 60 "$deb/build.out"; echo "== Debian package build FAILED"; exit 1; }
	lintian --fail-on error "$deb"/*.changes >"$deb/lintian.out" 2>&1 ||
		{ cat "$deb/lintian.out"; echo "== lintian FAILED"; exit 1; }
	grep -c '^W: ' "$deb/lintian.out" | sed 's/^/   lintian warnings: /'
	debs=$(cd "$deb" && ls *.deb)
	names=$(for d in $debs; do echo "${d%%_*}"; done)
	# Only what this step installs is removed afterwards.
	fresh=
	for p in $names; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || fresh="$fresh $p"
	done
	sudo=
	[ "$(id -u)" = 0 ] || sudo=sudo
	remove_debs() {
		[ -z "$fresh" ] || DEBIAN_FRONTEND=noninteractive $sudo apt-get remove -y -qq $fresh >/dev/null
	}
	trap remove_debs EXIT
	(cd "$deb" && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
		$(for d in $debs; do echo "./$d"; done) >install.out 2>&1) ||
		{ cat "$deb/install.out"; echo "== Debian package install FAILED"; exit 1; }
	ok=1
	no() { echo "== installed packages: $*"; ok=0; }
	pkgc="env -u PKG_CONFIG_PATH -u PKG_CONFIG_LIBDIR pkg-config"
	$pkgc --exists opqueue opqueue-pg opqueue-sqlite opqueue-etcd || no "pkg-config files do not resolve"
	cc -o "$deb/jobs" examples/jobs.c $($pkgc --cflags --libs opqueue) || no "the example does not build"
	ldd "$deb/jobs" | grep -Eq '=> (/usr)?/lib/[^ ]*/libopqueue\.so\.0 ' || no "the example does not use the package's libopqueue.so.0"
	[ "$("$deb/jobs" | grep -c '^job ')" = 10 ] || no "the example did not run its 10 jobs"
	dpkg -L libopqueue-dev | grep -q '/man3/opq_queue_tryenqueue\.3\.gz$' || no "man links missing"
	# The queue's package pulls neither libpq, SQLite nor libcurl; the tools run.
	! dpkg-query -W -f='${Depends}' libopqueue0 | grep -q 'libpq\|sqlite\|curl\|jansson' || no "libopqueue0 depends on a provider's library"
	opqueue-fanout >/dev/null || no "opqueue-fanout failed"
	remove_debs
	trap - EXIT
	[ $ok = 1 ] || { echo "== Debian packages FAILED"; exit 1; }
	echo "   packages:" $names
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
	debian_packages
	echo "== all passed: check (default, tsan, asan), distcheck, installed example, Debian packages"
	# One closing line for readers of the log: Check's own counts, summed.
	cat _build/default/tests/*.log _build/tsan/tests/*.log _build/asan/tests/*.log |
		awk '/^[0-9]+%: Checks: / { gsub(",", ""); n += $3; f += $5 + $7 }
		     END { printf "checks: %d passed, %d failed\n", n - f, f }'
	;;
debs)
	install_missing
	debian_packages
	;;
*)
	echo "usage: $0 demo|test|debs" >&2
	exit 2
	;;
esac
