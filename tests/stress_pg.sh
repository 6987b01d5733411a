#!/bin/sh
# A bounded run of opqueue-stress's lease_pg module (the lease module's
# random API sequences and holding-interval checks on the PostgreSQL
# provider) against a private PostgreSQL server that tests/pgserver.sh
# starts for it and stops afterwards. OPQ_STRESS_SECONDS sets the duration
# (10 by default). Skipped (77) when the PostgreSQL server programs are absent.
set -u
tool="${top_builddir:-.}/tools/opqueue-stress"
[ -x "$tool" ] || { echo "$tool not built"; exit 99; }
exec sh "${top_srcdir:-.}/tests/pgserver.sh" "$tool" -q -m lease_pg \
	-d "${OPQ_STRESS_SECONDS:-10}" -t "${OPQ_STRESS_THREADS:-8}"
