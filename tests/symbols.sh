#!/bin/sh
# The shared library exports opq_* symbols and nothing else.
set -u
lib="$top_builddir/lib/.libs/libopqueue.so"
[ -f "$lib" ] || { echo "no shared library at $lib: skipped"; exit 77; }
syms=$(${NM:-nm} -D --defined-only "$lib" | awk '{print $NF}')
bad=$(printf '%s\n' "$syms" | grep -v '^opq_[a-z]' | grep -v '^$' || true)
if [ -n "$bad" ]; then
	echo "exported symbols outside opq_*:"; printf '%s\n' "$bad"; exit 1
fi
n=$(printf '%s\n' "$syms" | grep -c '^opq_')
[ "$n" -gt 0 ] || { echo "no opq_ symbols exported"; exit 1; }
echo "$n symbols exported, all opq_*"
