#!/bin/sh
# links.sh install|uninstall MANDIR PAGE...: every name in a page's NAME
# section other than the page's own gets a .so link page, so that
# `man opq_queue_tryenqueue` finds opq_queue_enqueue(3).
set -eu
action=$1 mandir=$2
shift 2
for page in "$@"; do
	base=$(basename "$page")
	sect=${base##*.}
	self=${base%.*}
	for name in $(sed -n 's/^\.Nm \([a-z_0-9-]*\).*/\1/p' "$page" | sort -u); do
		[ "$name" = "$self" ] && continue
		link="$mandir/man$sect/$name.$sect"
		case $action in
		install) printf '.so man%s/%s\n' "$sect" "$base" > "$link" ;;
		uninstall) rm -f "$link" ;;
		esac
	done
done
