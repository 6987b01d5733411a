/*
 * lease_sqlite_impl.h: what the SQLite provider's two files share
 * (lease_sqlite.c: the provider; lease_sqlite_held.c: the guard function).
 * Never installed. Like the provider, written against the public
 * interface only: it stands in for lib/internal.h, which it does not
 * include.
 */
#ifndef OPQ_LEASE_SQLITE_IMPL_H
#define OPQ_LEASE_SQLITE_IMPL_H

#include "config.h"

#include <stddef.h>
#include <stdint.h>

#include <opqueue/lease.h>
#include <opqueue/lease_sqlite.h>

#ifndef OPQ_INTERNAL
#define OPQ_INTERNAL __attribute__((visibility("hidden")))
#endif

/* CLOCK_BOOTTIME in ns: the host's one clock, which counts during suspend. */
OPQ_INTERNAL int64_t opq__sq_boot_ns(void);
/* This boot's id (/proc/sys/kernel/random/boot_id, without the newline)
 * into buf: 0, or an errno value (EIO when empty). */
OPQ_INTERNAL int opq__sq_read_boot_id(char *buf, size_t len);

#endif /* OPQ_LEASE_SQLITE_IMPL_H */
