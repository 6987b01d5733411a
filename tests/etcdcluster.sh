#!/bin/sh
# etcdcluster.sh [COMMAND [ARG...]]: run COMMAND (default: the etcd lease
# tests, $top_builddir/tests/check_lease_etcd, then OPQ_STRESS_SECONDS (10)
# of opqueue-stress's lease_etcd module) against a private three-member etcd
# cluster on loopback ports, and stop every member afterwards, also when the
# command fails or the script is interrupted. The stress runs after the
# tests, not next to them (as in tests/pgserver.sh): check_lease_etcd times
# takeovers.
#
# The members live in a mktemp -d directory (under /dev/shm when it is
# writable: etcd syncs every write, and on a tmpfs that costs nothing),
# listen on 127.0.0.1 only, on six free ports probed from a base derived
# from the process id, with a 50 ms heartbeat and a 500 ms election timeout
# (etcd's smallest lease TTL is then 1 s). COMMAND gets:
#   OPQ_ETCD_ENDPOINTS   the three client URLs, comma-separated
#   OPQ_ETCD_ENDPOINT0..2  each member's client URL
#   OPQ_ETCD_CTL         a script: `$OPQ_ETCD_CTL VERB N` with VERB one of
#                        kill (SIGKILL, waits for the exit), start (starts
#                        member N again on its data, waits until it
#                        answers), stop (SIGSTOP), cont (SIGCONT), pid;
#                        `$OPQ_ETCD_CTL leader` prints the index of the
#                        member that leads now (waits for one, bounded)
#   OPQ_ETCD_DIR         the directory (logs in $OPQ_ETCD_DIR/mN.log)
# Exits 77 (skipped) only when the etcd program is absent.
set -u

etcd=$(command -v etcd 2>/dev/null) || etcd=
if [ -z "$etcd" ] || [ ! -x "$etcd" ]; then
	echo "etcd not found (Debian: etcd-server): skipped"
	exit 77
fi
# The script's health checks use curl, the tests etcdctl (Debian: curl, etcd-client).
command -v curl >/dev/null 2>&1 || { echo "curl not found"; exit 99; }
command -v etcdctl >/dev/null 2>&1 || { echo "etcdctl not found (Debian: etcd-client)"; exit 99; }

base=${TMPDIR:-/tmp}
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
dir=$(mktemp -d "$base/opqetcd.XXXXXX") || exit 99

# Six free ports: two per member (client, peer), from a base derived from
# our pid; a taken one moves the whole set on.
used=$(ss -Htan 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u)
port=$((20000 + ($$ * 7) % 30000))
tries=0
while :; do
	ok=1
	for p in $(seq "$port" $((port + 5))); do
		if printf '%s\n' "$used" | grep -qx "$p"; then ok=0; break; fi
	done
	[ $ok = 1 ] && break
	port=$((port + 6))
	[ $port -gt 64000 ] && port=20000
	tries=$((tries + 1))
	[ $tries -gt 1000 ] && { echo "no free ports"; rm -rf "$dir"; exit 99; }
done

cluster=
for i in 0 1 2; do
	cluster="${cluster:+$cluster,}m$i=http://127.0.0.1:$((port + 2 * i + 1))"
done

# The control script the tests drive the members with.
cat >"$dir/ctl" <<EOF
#!/bin/sh
# ctl VERB N | ctl leader: see tests/etcdcluster.sh.
set -u
dir=$dir
port=$port
cluster=$cluster
etcd=$etcd
EOF
cat >>"$dir/ctl" <<'EOF'
client() { echo "http://127.0.0.1:$((port + 2 * $1))"; }
healthy() {
	curl -s -m 1 -X POST -d '{"key":"AA=="}' "$(client "$1")/v3/kv/range" 2>/dev/null |
		grep -q '"header"'
}
pid() { cat "$dir/m$1.pid" 2>/dev/null; }
start() {
	i=$1
	# setsid: a member restarted by a test outlives the test's process
	# group, which Check kills when the test ends.
	(cd "$dir" && exec setsid "$etcd" --name "m$i" --data-dir "$dir/m$i" \
		--listen-client-urls "$(client "$i")" --advertise-client-urls "$(client "$i")" \
		--listen-peer-urls "http://127.0.0.1:$((port + 2 * i + 1))" \
		--initial-advertise-peer-urls "http://127.0.0.1:$((port + 2 * i + 1))" \
		--initial-cluster "$cluster" --initial-cluster-state new \
		--initial-cluster-token "opq-$port" \
		--heartbeat-interval 50 --election-timeout 500 \
		--logger zap --log-level warn \
		>>"$dir/m$i.log" 2>&1 </dev/null) &
	echo $! >"$dir/m$i.pid"
}
wait_healthy() {
	n=0
	until healthy "$1"; do
		n=$((n + 1))
		if [ $n -gt 300 ]; then echo "member $1 not healthy after 30 s" >&2; return 1; fi
		kill -0 "$(pid "$1")" 2>/dev/null || { echo "member $1 exited" >&2; return 1; }
		sleep 0.1
	done
}
case "${1:-}" in
init)
	for i in 0 1 2; do start "$i"; done
	for i in 0 1 2; do wait_healthy "$i" || exit 1; done ;;
start) start "$2" && wait_healthy "$2" ;;
kill)
	p=$(pid "$2")
	kill -9 "$p" 2>/dev/null
	n=0
	while kill -0 "$p" 2>/dev/null; do
		n=$((n + 1)); [ $n -gt 100 ] && exit 1; sleep 0.05
	done ;;
stop) kill -STOP "$(pid "$2")" ;;
cont) kill -CONT "$(pid "$2")" ;;
pid) pid "$2" ;;
leader)
	n=0
	while :; do
		for i in 0 1 2; do
			s=$(curl -s -m 1 -X POST -d '{}' "$(client "$i")/v3/maintenance/status" 2>/dev/null)
			m=$(printf '%s' "$s" | sed -n 's/.*"member_id":"\([0-9]*\)".*/\1/p')
			l=$(printf '%s' "$s" | sed -n 's/.*"leader":"\([0-9]*\)".*/\1/p')
			if [ -n "$m" ] && [ "$m" = "$l" ]; then echo "$i"; exit 0; fi
		done
		n=$((n + 1)); [ $n -gt 100 ] && { echo "no leader" >&2; exit 1; }
		sleep 0.1
	done ;;
all-down)
	for i in 0 1 2; do
		p=$(pid "$i")
		[ -n "$p" ] || continue
		kill -CONT "$p" 2>/dev/null
		kill -9 "$p" 2>/dev/null
	done ;;
*) echo "usage: ctl init|start N|kill N|stop N|cont N|pid N|leader|all-down" >&2; exit 2 ;;
esac
EOF
chmod +x "$dir/ctl"

cleanup() {
	"$dir/ctl" all-down
	for i in 0 1 2; do
		p=$(cat "$dir/m$i.pid" 2>/dev/null) || continue
		n=0
		while kill -0 "$p" 2>/dev/null && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.05; done
	done
	rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

if ! "$dir/ctl" init; then
	for i in 0 1 2; do echo "== m$i.log"; tail -n 20 "$dir/m$i.log"; done
	exit 99
fi

OPQ_ETCD_ENDPOINT0=http://127.0.0.1:$port
OPQ_ETCD_ENDPOINT1=http://127.0.0.1:$((port + 2))
OPQ_ETCD_ENDPOINT2=http://127.0.0.1:$((port + 4))
OPQ_ETCD_ENDPOINTS=$OPQ_ETCD_ENDPOINT0,$OPQ_ETCD_ENDPOINT1,$OPQ_ETCD_ENDPOINT2
OPQ_ETCD_CTL=$dir/ctl
OPQ_ETCD_DIR=$dir
export OPQ_ETCD_ENDPOINTS OPQ_ETCD_ENDPOINT0 OPQ_ETCD_ENDPOINT1 OPQ_ETCD_ENDPOINT2
export OPQ_ETCD_CTL OPQ_ETCD_DIR

if [ $# -eq 0 ]; then
	# shellcheck disable=SC2016
	set -- sh -c '"$1/tests/check_lease_etcd" && "$1/tools/opqueue-stress" -q -m lease_etcd \
		-d "${OPQ_STRESS_SECONDS:-10}" -t "${OPQ_STRESS_THREADS:-8}"' sh "${top_builddir:-.}"
fi
"$@"
rc=$?
if [ $rc != 0 ] && [ $rc != 77 ]; then
	for i in 0 1 2; do echo "== m$i.log (last 20 lines)"; tail -n 20 "$dir/m$i.log"; done
fi
exit $rc
