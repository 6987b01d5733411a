/*
 * opqueue/lease_sqlite.h: the SQLite lease provider (see
 * opq_lease_provider_sqlite_create(3)). Library -lopqueue-sqlite
 * (`pkg-config opqueue-sqlite`), which links -lopqueue and -lsqlite3; a
 * program that does not include this header does not pull SQLite in.
 *
 * Processes on one host share a database file; expiry is kept on the
 * host's boot clock (CLOCK_BOOTTIME plus the kernel's boot id), so a lock
 * whose holder died in a reboot counts as expired.
 */
#ifndef OPQUEUE_LEASE_SQLITE_H
#define OPQUEUE_LEASE_SQLITE_H

#include <stddef.h>

#include <opqueue/lease.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Open (creating if needed) the SQLite database at `path` and its table
 * opq_lease, and make a provider on it. The caller destroys it with
 * opq_lease_provider_destroy (which closes the database). Do not use a
 * provider across fork(): make one in the process that uses it. On
 * failure, words about it go to errbuf (errlen bytes, NUL-terminated;
 * errbuf may be NULL when errlen is 0). Errors: EINVAL, ENOMEM, ENOENT
 * (cannot open: no such directory...), EACCES, EROFS, EIO (not a
 * database, corrupt), EAGAIN (the database stayed locked).
 */
OPQ_EXPORT int opq_lease_provider_sqlite_create(opq_lease_provider **provider, const char *path,
                                                char *errbuf, size_t errlen);

struct sqlite3;

/*
 * The guard for the user's own writes (opq_lease_sqlite_held_register(3)):
 * register the SQL function opq_lease_held(name, token) on the caller's
 * own connection `db` to the database file of the leases. It is 1 while
 * the lock `name` is held with fencing token `token` and its lease has
 * not run out by this host's boot clock, else 0 (NULL when an argument is
 * NULL), as PostgreSQL's function of the same name is. A write that puts
 * it in its WHERE clause, in a write transaction (BEGIN IMMEDIATE), is
 * refused once the lease was lost: no takeover can commit between the
 * check and the write. The caller keeps db; the function lives as long as
 * the connection. Errors: EINVAL (db NULL), ENOENT (cannot read the boot
 * id), ENOMEM, EIO (SQLite refused the function).
 */
OPQ_EXPORT int opq_lease_sqlite_held_register(struct sqlite3 *db);

#ifdef __cplusplus
}
#endif

#endif /* OPQUEUE_LEASE_SQLITE_H */
