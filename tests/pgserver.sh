#!/bin/sh
# pgserver.sh [COMMAND [ARG...]]: run COMMAND (default: the PostgreSQL lease
# tests, $top_builddir/tests/check_lease_pg and then OPQ_STRESS_SECONDS (10)
# of opqueue-stress's lease_pg module) against a private PostgreSQL server,
# and stop the server afterwards, also when the command fails or the script
# is interrupted. The stress runs after the tests, not as a test of its own
# that make -j2 would run next to them: it loads the server and the machine,
# and check_lease_pg times takeovers (its 300 ms bound failed so).
#
# The server lives in a mktemp -d directory: initdb there, listening on no
# TCP address, only on a Unix socket in that directory, fsync off. As root it
# runs as the unprivileged user `nobody` (PostgreSQL refuses to run as root).
# COMMAND gets:
#   OPQ_PG_CONNINFO  a libpq connection string for the server's superuser
#   OPQ_PG_STOP      a shell command that stops the server (waits)
#   OPQ_PG_START     a shell command that starts it again (waits)
#   OPQ_PG_CRASH     a shell command that stops it as a crash would
#                    (immediate mode: no checkpoint; recovery from the WAL)
#   OPQ_PG_DIR       the directory (data in $OPQ_PG_DIR/data)
# Exits 77 (skipped) only when the PostgreSQL server programs are absent.
set -u

bindir=
for d in ${PG_BINDIR:-} $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r) \
	$(pg_config --bindir 2>/dev/null); do
	if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then bindir=$d; break; fi
done
if [ -z "$bindir" ]; then
	echo "PostgreSQL server programs (initdb, pg_ctl) not found: skipped"
	exit 77
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/opqpg.XXXXXX") || exit 99
as=
if [ "$(id -u)" = 0 ]; then
	chown nobody "$dir" || { rm -rf "$dir"; exit 99; }
	chmod 0700 "$dir"
	as="runuser -u nobody --"
fi
# pg_ctl changes to no directory of ours; run it from one every user can enter.
ctl="cd / && $as $bindir/pg_ctl -D $dir/data -l $dir/log -w -t 60"
cleanup() {
	sh -c "$ctl -m immediate stop" >/dev/null 2>&1
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

(cd / && $as "$bindir/initdb" -D "$dir/data" -U opq -A trust -E UTF8 --no-locale \
	--no-sync >"$dir/initdb.log" 2>&1) ||
	{ cat "$dir/initdb.log"; exit 99; }
cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$dir'
port = 5432
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 60
shared_buffers = 16MB
EOF
sh -c "$ctl start" >"$dir/start.log" 2>&1 ||
	{ cat "$dir/start.log" "$dir/log"; exit 99; }

OPQ_PG_CONNINFO="host=$dir port=5432 dbname=postgres user=opq"
OPQ_PG_STOP="$ctl -m fast stop >/dev/null"
OPQ_PG_START="$ctl start >/dev/null"
OPQ_PG_CRASH="$ctl -m immediate stop >/dev/null"
OPQ_PG_DIR=$dir
export OPQ_PG_CONNINFO OPQ_PG_STOP OPQ_PG_START OPQ_PG_CRASH OPQ_PG_DIR

if [ $# -eq 0 ]; then
	# shellcheck disable=SC2016
	set -- sh -c '"$1/tests/check_lease_pg" && "$1/tools/opqueue-stress" -q -m lease_pg \
		-d "${OPQ_STRESS_SECONDS:-10}" -t "${OPQ_STRESS_THREADS:-8}"' sh "${top_builddir:-.}"
fi
"$@"
rc=$?
if [ $rc != 0 ] && [ $rc != 77 ]; then
	echo "== server log (last 40 lines)"
	tail -n 40 "$dir/log"
fi
exit $rc
