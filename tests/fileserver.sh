#!/bin/sh
# The example file server (tools/opqueue-fileserver.c) against its own
# client mode: files of 0 bytes, 1 byte, 1 MiB and sizes in between, missing
# names and refused ones, several connections with pipelined requests; every
# reply is checked byte for byte. Then the shutdown: SIGTERM while another
# client keeps the runners busy (the reads that wait are dropped and their
# completions run with ECANCELED), and a clean exit (status 0, which the
# server gives only when every completion ran and the channel was destroyed).
# Every wait is bounded.
set -u
tool="${top_builddir:-.}/tools/opqueue-fileserver"
[ -x "$tool" ] || { echo "$tool not built"; exit 99; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/opq-fsrv.XXXXXX") || exit 99
spid= bpid=
cleanup() {
	for p in $bpid $spid; do kill -KILL "$p" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT
fail=0
dir=$tmp/files
mkdir "$dir" "$dir/a-directory"
: >"$dir/empty"
printf x >"$dir/one"
head -c 1048576 /dev/urandom >"$dir/mib"
head -c 4096 /dev/urandom >"$dir/page"
head -c 65537 /dev/urandom >"$dir/odd"
printf 'hello\n' >"$dir/with space"

# start_server N: start the server with N runners; its port in $port.
start_server() {
	rm -f "$tmp/port"
	"$tool" -d "$dir" -r "$1" -P "$tmp/port" >"$tmp/server.out" 2>"$tmp/server.err" &
	spid=$!
	i=0
	while [ ! -s "$tmp/port" ]; do
		kill -0 "$spid" 2>/dev/null || { echo "the server exited"; cat "$tmp/server.err"; exit 1; }
		i=$((i + 1))
		[ $i -le 300 ] || { echo "no port after 30 s"; exit 1; }
		sleep 0.1
	done
	port=$(cat "$tmp/port")
}

# stop_server: SIGTERM, then a clean exit within 60 s.
stop_server() {
	kill -TERM "$spid"
	i=0
	while kill -0 "$spid" 2>/dev/null; do
		i=$((i + 1))
		[ $i -le 600 ] || { echo "the server did not stop within 60 s"; fail=1; kill -KILL "$spid"; break; }
		sleep 0.1
	done
	wait "$spid"
	rc=$?
	spid=
	if [ $rc != 0 ] || ! grep -q '^opqueue-fileserver: stopped: ' "$tmp/server.err"; then
		echo "the server's exit status is $rc"
		cat "$tmp/server.err"
		fail=1
	fi
}

# Refused arguments.
"$tool" -c >/dev/null 2>&1 && { echo "-c without -p accepted"; fail=1; }
"$tool" -r 0 >/dev/null 2>&1 && { echo "-r 0 accepted"; fail=1; }
"$tool" -d "$tmp/nowhere" >/dev/null 2>&1 && { echo "a missing directory accepted"; fail=1; }

# Every reply right: 4 connections, then 16 over one runner.
start_server 2
timeout 300 "$tool" -c -p "$port" -d "$dir" -k 4 -n 2000 >"$tmp/client.out" 2>&1 ||
	{ echo "client, 4 connections:"; cat "$tmp/client.out"; fail=1; }
grep -q ' 0 wrong$' "$tmp/client.out" || { cat "$tmp/client.out"; fail=1; }
# Every request at once, then a half-close: all answered, then closed.
timeout 300 "$tool" -c -H -p "$port" -d "$dir" -k 4 -n 2000 >"$tmp/client.out" 2>&1 ||
	{ echo "client, half-close:"; cat "$tmp/client.out"; fail=1; }
"$tool" -c -H -p "$port" -d "$dir" -k 1 -n 1001 >/dev/null 2>&1 && { echo "-H beyond 1000 accepted"; fail=1; }
stop_server
start_server 1
timeout 300 "$tool" -c -p "$port" -d "$dir" -k 16 -n 1600 >"$tmp/client.out" 2>&1 ||
	{ echo "client, 16 connections:"; cat "$tmp/client.out"; fail=1; }

# Shutdown under load: a client that would run for long keeps the runner
# busy; another one, short, must be answered right meanwhile; then SIGTERM.
"$tool" -c -p "$port" -d "$dir" -k 32 -n 10000000 >"$tmp/busy.out" 2>&1 &
bpid=$!
timeout 300 "$tool" -c -p "$port" -d "$dir" -k 2 -n 400 >"$tmp/client.out" 2>&1 ||
	{ echo "client beside a busy one:"; cat "$tmp/client.out"; fail=1; }
stop_server
# The busy client loses its connections now; it must end, and not well.
i=0
while kill -0 "$bpid" 2>/dev/null; do
	i=$((i + 1))
	[ $i -le 600 ] || { echo "the busy client did not end"; fail=1; break; }
	sleep 0.1
done
wait "$bpid" && { echo "the busy client succeeded after the server stopped"; fail=1; }
bpid=
exit $fail
