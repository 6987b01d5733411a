#!/bin/sh
# fuzz_etcd.sh: build tests/fuzz_etcd.c with clang's libFuzzer
# (-fsanitize=fuzzer,address,undefined) against lib/lease_etcd_json.c and
# run it for FUZZ_SECONDS (5 by default; longer by hand) from the seed
# corpus tests/fuzz_etcd_corpus. New inputs go to a temporary directory,
# not into the source tree; a crash leaves its input in the build
# directory (tests/fuzz_etcd-crash-*) and fails the test. Skipped (77)
# without clang or its libFuzzer runtime (Debian: clang, libclang-rt-14-dev).
set -u
cc=${FUZZ_CC:-clang}
src=${top_srcdir:-.}
bld=${top_builddir:-.}
command -v "$cc" >/dev/null 2>&1 || { echo "$cc not found: skipped"; exit 77; }
work=$(mktemp -d "${TMPDIR:-/tmp}/opqfuzz.XXXXXX") || exit 99
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

flags="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -g -O1"
printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
	>"$work/probe.c"
if ! "$cc" $flags "$work/probe.c" -o "$work/probe" >/dev/null 2>&1; then
	echo "$cc cannot build with $flags (Debian: libclang-rt-14-dev): skipped"
	exit 77
fi
bin="$bld/tests/fuzz_etcd"
# shellcheck disable=SC2086
"$cc" $flags -std=c11 -D_POSIX_C_SOURCE=200809L -I"$bld" -I"$src/include" -I"$src/lib" \
	${ETCD_DEPS_CFLAGS:-} "$src/tests/fuzz_etcd.c" "$src/lib/lease_etcd_json.c" \
	${JANSSON_LIBS:--ljansson} -o "$bin" || { echo "cannot build the fuzzer"; exit 99; }
mkdir "$work/corpus"
"$bin" -max_total_time="${FUZZ_SECONDS:-5}" -timeout=10 -rss_limit_mb=2048 \
	-print_final_stats=1 -artifact_prefix="$bld/tests/fuzz_etcd-" \
	"$work/corpus" "$src/tests/fuzz_etcd_corpus" >"$work/log" 2>&1
rc=$?
grep -E '^(INFO: seed corpus|stat::number_of_executed_units|stat::new_units_added|#[0-9]+.*DONE)' \
	"$work/log"
if [ $rc != 0 ]; then
	tail -n 60 "$work/log"
	echo "fuzzer failed ($rc)"
	exit 1
fi
echo "fuzz_etcd: no crash"
