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

-- The roles Supabase has; a plain PostgreSQL lacks them. Roles belong to the whole server, so
-- another database being set up at the same moment may create one first: that is no error.
DO $$
DECLARE r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;
      END;
    END IF;
  END LOOP;
END
$$;

CREATE TABLE spool_meta (
  id int PRIMARY KEY CHECK (id = 1),
  schema_version bigint NOT NULL
);

-- As in Supabase: the API roles may use the schema; table grants and row-level security decide.
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
