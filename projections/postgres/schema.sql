-- The Postgres (Supabase) projection: the OptimalOS table families of storage-layers.txt,
-- derived from the event log by `spool project postgres` and `spool backfill postgres`. Never
-- written directly.
--
-- Conventions, as in the SQLite projection: append-only rows are keyed by the event id
-- ('<origin hex>:<seq>') and inserted if absent; mutable rows carry a stamp per column group
-- (`*_stamp`, bytea: 8 bytes of HLC big-endian then the 16-byte origin, so bytewise order is the
-- stamp order) and a write lands only if its stamp is newer (older for first-writer-wins facts).
-- Combined values are generated columns. So any number of nodes, in any causal order, at the same
-- time, may project into one database and the rows converge.
--
-- This file runs once per database (roles, the schema version); tables.sql lays out the tables
-- in a schema: `public` for the live tables, a shadow schema while a backfill builds them.

-- The roles come first, from roles.sql (shared with the hub's hub.sql).

CREATE TABLE spool_meta (
  id int PRIMARY KEY CHECK (id = 1),
  schema_version bigint NOT NULL
);

-- As in Supabase: the API roles may use the schema; table grants and row-level security decide.
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
