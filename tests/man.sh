#!/bin/sh
# Man pages: every page lints clean with mandoc -Tlint -Wstyle, every
# exported opq_ function is named in the NAME section of an installed page,
# every page in man/ is installed (listed in dist_man_MANS), and every
# installed program (bin_PROGRAMS, in BIN_PROGRAMS) has its page
# man/<program>.1 installed.
set -u
fail=0
[ "${MANDOC:-no}" != no ] || { echo "mandoc not found: skipped"; exit 77; }
# Whether a referenced page exists depends on the machine's mandoc.db, so
# those lints are left out here and our own references are checked below.
# mandoc looks in an empty MANPATH: an outdated system mandoc.db made it
# print garbled lines that no filter catches.
nodb=$(mktemp -d "${TMPDIR:-/tmp}/opq-man.XXXXXX") || exit 99
trap 'rmdir "$nodb"' EXIT
for page in $MAN_PAGES; do
	out=$(MANPATH=$nodb "$MANDOC" -Tlint -Wstyle "$top_srcdir/$page" 2>&1 |
		grep -v -e 'referenced manual not found' -e 'outdated mandoc.db')
	if [ -n "$out" ]; then echo "$out"; fail=1; fi
done
names=$(for page in $MAN_PAGES; do sed -n 's/^\.Nm \([a-z_0-9]*\).*/\1/p' "$top_srcdir/$page"; done | sort -u)
for page in $MAN_PAGES; do
	for ref in $(sed -n 's/^\.Xr \(opq[a-z_0-9]*\) .*/\1/p' "$top_srcdir/$page"); do
		if ! printf '%s\n' "$names" | grep -qx "$ref"; then
			echo "$page: reference to a page that does not exist: $ref"; fail=1
		fi
	done
done
lib="$top_builddir/lib/.libs/libopqueue.so"
if [ -f "$lib" ]; then
	for sym in $(${NM:-nm} -D --defined-only "$lib" | awk '$2 == "T" && $3 ~ /^opq_/ {print $3}'); do
		if ! printf '%s\n' "$names" | grep -qx "$sym"; then
			echo "exported function without a man page: $sym"; fail=1
		fi
	done
fi
for page in "$top_srcdir"/man/*.[0-9]; do
	base=$(basename "$page")
	case " $MAN_PAGES " in
	*" man/$base "*) ;;
	*) echo "page not installed (not in dist_man_MANS): $base"; fail=1 ;;
	esac
done
for prog in $BIN_PROGRAMS; do
	base=$(basename "$prog" .exe)
	case " $MAN_PAGES " in
	*" man/$base.1 "*) ;;
	*) echo "program without a man page (man/$base.1 not in dist_man_MANS): $base"; fail=1 ;;
	esac
done
[ $fail = 0 ] && echo "$(echo $MAN_PAGES | wc -w) pages lint clean; every exported function and every program has one"
exit $fail
