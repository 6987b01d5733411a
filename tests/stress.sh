#!/bin/sh
# A bounded run of opqueue-stress (every module, random API sequences from
# many threads, invariants checked continuously). OPQ_STRESS_SECONDS sets
# the duration (10 by default); `make soak` runs it for longer. On a
# violation the tool prints the seed and the command line that reproduces it.
set -u
tool="${top_builddir:-.}/tools/opqueue-stress"
[ -x "$tool" ] || { echo "$tool not built"; exit 99; }
exec "$tool" -q -d "${OPQ_STRESS_SECONDS:-10}" -t "${OPQ_STRESS_THREADS:-8}"
