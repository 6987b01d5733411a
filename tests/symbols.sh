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
# The PostgreSQL provider's library: opq_* only, and the main library
# never needs libpq (a daemon that only wants the queue does not pull it in).
pglib="$top_builddir/lib/.libs/libopqueue-pg.so"
if [ -f "$pglib" ]; then
	bad=$(${NM:-nm} -D --defined-only "$pglib" | awk '{print $NF}' | grep -v '^opq_[a-z]' | grep -v '^$' || true)
	[ -z "$bad" ] || { echo "libopqueue-pg exports outside opq_*:"; printf '%s\n' "$bad"; exit 1; }
fi
# The etcd provider's library: opq_* only.
etcdlib="$top_builddir/lib/.libs/libopqueue-etcd.so"
if [ -f "$etcdlib" ]; then
	bad=$(${NM:-nm} -D --defined-only "$etcdlib" | awk '{print $NF}' | grep -v '^opq_[a-z]' | grep -v '^$' || true)
	[ -z "$bad" ] || { echo "libopqueue-etcd exports outside opq_*:"; printf '%s
' "$bad"; exit 1; }
fi
# The SQLite provider's library exports its constructor and the guard
# helper, and nothing else.
sqlib="$top_builddir/lib/.libs/libopqueue-sqlite.so"
if [ -f "$sqlib" ]; then
	got=$(${NM:-nm} -D --defined-only "$sqlib" | awk '$2 == "T" {print $3}' | sort | tr '\n' ' ')
	want="opq_lease_provider_sqlite_create opq_lease_sqlite_held_register "
	[ "$got" = "$want" ] ||
		{ echo "libopqueue-sqlite exports, instead of $want:"; printf '%s\n' "$got"; exit 1; }
fi
# A library never reads the environment (DESIGN.md): none of ours imports
# getenv or secure_getenv.
for l in "$lib" "$pglib" "$sqlib" "$etcdlib"; do
	[ -f "$l" ] || continue
	if ${NM:-nm} -D --undefined-only "$l" | awk '{print $NF}' | grep -q -E '^(secure_)?getenv(@|$)'; then
		echo "$(basename "$l") reads the environment (imports getenv)"; exit 1
	fi
done
if command -v objdump >/dev/null 2>&1 && objdump -p "$lib" | grep NEEDED | grep -q libpq; then
	echo "libopqueue needs libpq"; exit 1
fi
echo "$n symbols exported, all opq_*"
