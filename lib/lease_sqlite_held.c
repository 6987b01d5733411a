/*
 * lease_sqlite_held.c: the SQLite provider's guard for the users' own
 * writes (opq_lease_sqlite_held_register(3)): the SQL function
 * opq_lease_held(name, token) on the user's own connection, true while
 * the lock is held with that token by the provider's rules (held, this
 * boot, expiry ahead on CLOCK_BOOTTIME), like PostgreSQL's function of the
 * same name.
 */
#include <errno.h>
#include <sqlite3.h>
#include <stdlib.h>

#include "lease_sqlite_impl.h"

struct held_ctx {
	char boot_id[64];
};

static void held_fn(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	(void)argc;
	if (sqlite3_value_type(argv[0]) == SQLITE_NULL ||
	    sqlite3_value_type(argv[1]) == SQLITE_NULL) {
		sqlite3_result_null(ctx);
		return;
	}
	const struct held_ctx *h = sqlite3_user_data(ctx);
	sqlite3 *db = sqlite3_context_db_handle(ctx);
	sqlite3_stmt *st = NULL;
	int src = sqlite3_prepare_v2(db,
	                             "SELECT held = 1 AND boot_id = ?3 AND expiry_ns > ?4"
	                             " FROM opq_lease WHERE name = ?1 AND token = ?2",
	                             -1, &st, NULL);
	if (src != SQLITE_OK) {
		sqlite3_result_error(ctx, sqlite3_errmsg(db), -1);
		sqlite3_result_error_code(ctx, src);
		sqlite3_finalize(st);
		return;
	}
	sqlite3_bind_value(st, 1, argv[0]);
	sqlite3_bind_value(st, 2, argv[1]);
	sqlite3_bind_text(st, 3, h->boot_id, -1, SQLITE_STATIC);
	/* Read now, inside the caller's statement: the expiry is judged at
	 * the instant of the write's check. */
	sqlite3_bind_int64(st, 4, opq__sq_boot_ns());
	src = sqlite3_step(st);
	if (src == SQLITE_ROW)
		sqlite3_result_int(ctx, sqlite3_column_int(st, 0) != 0);
	else if (src == SQLITE_DONE)
		sqlite3_result_int(ctx, 0);
	else {
		sqlite3_result_error(ctx, sqlite3_errmsg(db), -1);
		sqlite3_result_error_code(ctx, src);
	}
	sqlite3_finalize(st);
}

OPQ_EXPORT int opq_lease_sqlite_held_register(struct sqlite3 *db)
{
	if (!db)
		return EINVAL;
	struct held_ctx *h = malloc(sizeof(*h));
	if (!h)
		return ENOMEM;
	int rc = opq__sq_read_boot_id(h->boot_id, sizeof(h->boot_id));
	if (rc) {
		free(h);
		return rc == EIO ? EIO : ENOENT;
	}
	/* Not deterministic (it reads the clock); SQLite frees h with the
	 * function (also when registering fails). */
	int src = sqlite3_create_function_v2(db, "opq_lease_held", 2, SQLITE_UTF8, h, held_fn, NULL,
	                                     NULL, free);
	if (src != SQLITE_OK)
		return src == SQLITE_NOMEM ? ENOMEM : EIO;
	return 0;
}
