-- The hub: the fleet's logs in one table, for `spool sync hub`. Nodes push the events they hold
-- (their stored bytes, each with the signed head kept with it, if any) and pull what they lack;
-- every pulled event goes through the checks an ingested file does (hash, chain, signature,
-- membership, field rules), so the hub is trusted with nothing. Runs on every push and pull:
-- every statement is idempotent. roles.sql runs first.

CREATE TABLE IF NOT EXISTS spool_hub_events (
  origin bytea NOT NULL CHECK (length(origin) = 16),
  seq bigint NOT NULL CHECK (seq >= 1),
  hash bytea NOT NULL CHECK (length(hash) = 32),
  bytes bytea NOT NULL,
  -- The origin's signed head over this event (key ++ signature), when one came with it.
  head bytea CHECK (head IS NULL OR length(head) = 96),
  PRIMARY KEY (origin, seq)
);

-- A different event pushed at an (origin, seq) the hub already holds: kept, never applied.
CREATE TABLE IF NOT EXISTS spool_hub_forks (
  origin bytea NOT NULL,
  seq bigint NOT NULL,
  hash bytea NOT NULL,
  bytes bytea NOT NULL,
  PRIMARY KEY (origin, seq, hash)
);

-- Each node's projection digest beside the vector of events it covers: two nodes with equal
-- vectors and unequal digests have diverged (the divergence alarm of `status` and `/metrics`).
CREATE TABLE IF NOT EXISTS spool_hub_nodes (
  origin bytea PRIMARY KEY CHECK (length(origin) = 16),
  vector text NOT NULL,
  digest text NOT NULL,
  published_at timestamptz NOT NULL DEFAULT now()
);

-- As the seed's vault tables: only service_role (and owners, superusers, BYPASSRLS roles) see
-- or write rows; anon and authenticated see nothing and write nothing.
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['spool_hub_events', 'spool_hub_forks', 'spool_hub_nodes'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE tablename = t AND policyname = 'service_role_all') THEN
      EXECUTE format('CREATE POLICY service_role_all ON %I FOR ALL TO service_role USING (true) WITH CHECK (true)', t);
    END IF;
    EXECUTE format('REVOKE ALL ON %I FROM anon, authenticated', t);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I TO service_role', t);
  END LOOP;
END
$$;
