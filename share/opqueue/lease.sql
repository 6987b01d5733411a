-- lease.sql: the schema of the opqueue PostgreSQL lease provider
-- (opq_lease_provider_pg_create(3)). The provider creates the same objects itself
-- on first use when they are missing; apply this file beforehand where the
-- lease users may not run DDL:
--     psql -v ON_ERROR_STOP=1 -d DBNAME -f lease.sql
-- then grant them SELECT, INSERT, UPDATE on opq_lease and EXECUTE on
-- opq_lease_held. The objects go to the first schema of the search_path.
--
-- One row per lock name, kept forever: releasing clears owner and expires
-- but keeps the row, so the fencing token of a name only ever grows.
-- Expiry is by this server's clock (clock_timestamp()) alone.
CREATE TABLE IF NOT EXISTS opq_lease (
	name    text PRIMARY KEY,
	owner   text,
	token   bigint NOT NULL CHECK (token > 0),
	expires timestamptz,
	data    bytea
);

-- The guard for the users' own writes: true while the lease `lock_name` is
-- held with fencing token `lock_token` and has not expired by this server's
-- clock. It locks the lease row FOR SHARE, so no other owner can take the
-- lease over until the calling transaction ends:
--     UPDATE t SET ... WHERE ... AND opq_lease_held('jobs', 42);
CREATE OR REPLACE FUNCTION opq_lease_held(lock_name text, lock_token bigint)
RETURNS boolean LANGUAGE sql VOLATILE STRICT AS $$
	SELECT coalesce((SELECT l.owner IS NOT NULL AND l.expires > clock_timestamp()
			 FROM opq_lease l
			 WHERE l.name = lock_name AND l.token = lock_token
			 FOR SHARE), false)
$$;
