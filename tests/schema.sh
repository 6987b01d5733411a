#!/bin/sh
# The PostgreSQL provider creates its schema itself from a string in
# lib/lease_pg.c (opq__pg_schema_sql); share/opqueue/lease.sql is the same
# schema for a DBA to apply beforehand. The two must not drift: the
# statements of the C string (after its advisory lock) must be the lines of
# lease.sql that are neither comments nor blank.
set -u
src=${top_srcdir:-.}
c=$(awk '/^const char opq__pg_schema_sql\[\] =/ { f = 1; next }
	f { print } f && /;$/ { exit }' "$src/lib/lease_pg.c" |
	sed -e 's/^[[:space:]]*"//' -e 's/\\n";$//' -e 's/\\n"$//' |
	grep -v '^SELECT pg_advisory_xact_lock(')
sql=$(grep -v -e '^--' -e '^$' "$src/share/opqueue/lease.sql")
[ -n "$c" ] || { echo "opq__pg_schema_sql not found in lib/lease_pg.c"; exit 1; }
if [ "$c" != "$sql" ]; then
	echo "lib/lease_pg.c's opq__pg_schema_sql and share/opqueue/lease.sql differ:"
	printf '%s\n' "$c" >"${TMPDIR:-/tmp}/schema.c.$$"
	printf '%s\n' "$sql" >"${TMPDIR:-/tmp}/schema.sql.$$"
	diff -u "${TMPDIR:-/tmp}/schema.c.$$" "${TMPDIR:-/tmp}/schema.sql.$$"
	rm -f "${TMPDIR:-/tmp}/schema.c.$$" "${TMPDIR:-/tmp}/schema.sql.$$"
	exit 1
fi
echo "schema: $(printf '%s\n' "$sql" | wc -l) lines agree"
