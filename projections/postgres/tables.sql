-- The projected tables, laid out in the current schema (`public`, or a backfill's shadow schema
-- that is swapped in whole). Each projecting node keeps its checkpoint in spool_checkpoints,
-- written in the same transaction as the rows it covers; a swapped-in backfill brings only its
-- own node's checkpoint, so other nodes re-apply their events (idempotently) after a swap.

CREATE TABLE spool_checkpoints (
  node text PRIMARY KEY,       -- the projecting node's origin (hex)
  position bigint NOT NULL,    -- the last position of that node's log applied
  hash bytea NOT NULL,         -- that event's hash
  events bigint NOT NULL,      -- events applied
  heads text,                  -- per origin, the last event applied: {"<origin>": {"seq", "hash"}};
                               -- means the same on every node, so it survives a restore
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
  id text PRIMARY KEY,
  title text, title_stamp bytea,
  description text, description_stamp bytea,
  status text, status_stamp bytea,
  lane text, lane_stamp bytea,
  track text, track_stamp bytea,
  tags jsonb, tags_stamp bytea,
  created_at timestamptz, created_by text, created_stamp bytea,
  archived_at timestamptz, archive_reason text, archived_stamp bytea,
  current_score double precision, current_lane text, current_rank bigint, last_scored_at timestamptz, score_stamp bytea,
  score_locked boolean NOT NULL DEFAULT false, locked_lane text, lock_stamp bytea,
  -- The lane the board shows (projections/RULES.md, "The lane shown").
  shown_lane text GENERATED ALWAYS AS
    (CASE WHEN score_locked THEN locked_lane
          WHEN score_stamp IS NULL OR (lane_stamp IS NOT NULL AND lane_stamp > score_stamp)
            THEN COALESCE(lane, current_lane)
          ELSE current_lane END) STORED
);

CREATE TABLE briefs (
  id text PRIMARY KEY,
  source text, body text, tags jsonb, created_at timestamptz, added_stamp bytea,
  consumed_in_run_id text, consumed_at timestamptz, consumed_stamp bytea
);

CREATE TABLE triage_runs (
  id text PRIMARY KEY,
  started_at timestamptz, model text, trigger text, host text, start_stamp bytea,
  completed_at timestamptz, end_status text, end_model text, tokens_in bigint, tokens_out bigint,
  tasks_scored bigint, summaries jsonb, error text, end_stamp bytea,
  status text GENERATED ALWAYS AS (COALESCE(end_status, 'running')) STORED
);

CREATE TABLE score_history (
  id text PRIMARY KEY,
  task_id text NOT NULL, run_id text NOT NULL,
  i bigint NOT NULL, u bigint NOT NULL, c bigint NOT NULL, e bigint NOT NULL,
  score double precision NOT NULL, rank bigint NOT NULL, lane text NOT NULL,
  reasoning text, clash_resolution text, sources_used jsonb, scored_at timestamptz NOT NULL
);

CREATE TABLE score_overrides (
  id text PRIMARY KEY,
  task_id text NOT NULL, dimension text NOT NULL, old_value bigint NOT NULL,
  new_value bigint NOT NULL, reason text, applied_to_run_id text, created_at timestamptz NOT NULL
);

CREATE TABLE loom_runs (
  run_id text PRIMARY KEY,
  workflow_id text, trigger text, host text, started_at timestamptz, source text, start_stamp bytea,
  end_status text, error text, finished_at timestamptz, summary text, end_stamp bytea,
  status text GENERATED ALWAYS AS (COALESCE(end_status, 'running')) STORED
);

CREATE TABLE loom_step_runs (
  run_id text NOT NULL, step_id text NOT NULL,
  started_at timestamptz, start_stamp bytea,
  end_status text, exit_code bigint, output_tail text, result jsonb, error text, finished_at timestamptz,
  end_stamp bytea,
  ack_at timestamptz, ack_note text, ack_stamp bytea,
  status text GENERATED ALWAYS AS
    (COALESCE(end_status, CASE WHEN started_at IS NULL THEN 'pending' ELSE 'running' END)) STORED,
  PRIMARY KEY (run_id, step_id)
);

-- Events this build could not read when it projected them (a kind or version from a newer
-- build): skipped, listed here until an upgraded spool projects them.
CREATE TABLE spool_unreadable (
  id text PRIMARY KEY,
  kind text NOT NULL, version bigint NOT NULL, stream text NOT NULL, problem text NOT NULL,
  created_at timestamptz NOT NULL
);

CREATE TABLE activity_log (
  id text PRIMARY KEY,
  stream text NOT NULL, actor text NOT NULL, message text NOT NULL, source text, meta jsonb,
  created_at timestamptz NOT NULL
);

CREATE TABLE loom_workflow_defs (
  workflow_id text PRIMARY KEY,
  name text, host text, source_path text, schedule text, steps jsonb, mirrored_at timestamptz, stamp bytea
);

-- The steps of each mirrored definition. A step that a later definition dropped stays with its
-- older stamp: the current steps are those whose stamp equals their definition's.
CREATE TABLE loom_workflow_steps (
  workflow_id text NOT NULL, step_id text NOT NULL,
  ordinal bigint, name text, command text, depends_on jsonb, target_host text, stamp bytea,
  PRIMARY KEY (workflow_id, step_id)
);

CREATE TABLE loom_workflows (
  workflow_id text NOT NULL, host text NOT NULL,
  schedule text, registered boolean, reason text, changed_at timestamptz, stamp bytea,
  PRIMARY KEY (workflow_id, host)
);

CREATE TABLE loom_job_queue (
  job_id text PRIMARY KEY,
  workflow_id text, target_host text, input jsonb, enqueued_at timestamptz, enqueue_stamp bytea,
  claimed_by text, claimed_at timestamptz, claim_stamp bytea,
  end_status text, run_id text, error text, completed_at timestamptz, end_stamp bytea,
  status text GENERATED ALWAYS AS (CASE WHEN end_status IS NOT NULL THEN end_status
    WHEN claimed_by IS NOT NULL THEN 'claimed' ELSE 'queued' END) STORED
);

CREATE TABLE openclaw_instances (
  host text PRIMARY KEY,
  role text, capabilities jsonb, version text, last_heartbeat_at timestamptz, stamp bytea
);

CREATE TABLE bot_heartbeats (
  bot_id text PRIMARY KEY,
  host text, status text, last_seen_at timestamptz, stamp bytea
);

-- One row per (resource, bot): only a bot's own release ends its claim (RULES.md, "Bot claims").
CREATE TABLE bot_claims (
  resource text NOT NULL, bot_id text NOT NULL,
  ttl_ms bigint, claimed_at timestamptz, stamp bytea,
  released_at timestamptz, release_stamp bytea,
  status text GENERATED ALWAYS AS
    (CASE WHEN release_stamp IS NOT NULL AND (stamp IS NULL OR release_stamp > stamp)
     THEN 'released' ELSE 'held' END) STORED,
  PRIMARY KEY (resource, bot_id)
);

CREATE TABLE vault_install (
  install_id text PRIMARY KEY,
  kdf text, salt text, memory_kib bigint, iterations bigint, parallelism bigint,
  created_at timestamptz, stamp bytea
);

CREATE TABLE vault_recipients (
  recipient_id text PRIMARY KEY,
  device_id text, label text, public_key text, fingerprint text, added_at timestamptz, add_stamp bytea,
  removed_at timestamptz, remove_reason text, remove_stamp bytea
);

-- Ciphertext only: entries are age-encrypted on the client before they become events.
CREATE TABLE vault_entries (
  entry_id text PRIMARY KEY,
  ciphertext text, recipients jsonb, updated_at timestamptz, rewrap_reason text,
  removed_at timestamptz, remove_reason text, stamp bytea
);

CREATE TABLE vault_access_log (
  id text PRIMARY KEY,
  entry_id text NOT NULL, device_id text NOT NULL, recipient text NOT NULL, purpose text,
  unlocked_at timestamptz NOT NULL
);

CREATE TABLE devices (
  device_id text PRIMARY KEY,
  label text, capabilities jsonb, signing_public_key text, pairing_id text, paired_at timestamptz,
  pair_stamp bytea,
  revoked_at timestamptz, revoke_reason text, revoke_stamp bytea
);

-- Only a keyed hash of each code is stored, never the code.
CREATE TABLE pairing_tokens (
  pairing_id text PRIMARY KEY,
  code_hash text, user_id text, device_id text, account_id text, expires_at timestamptz,
  requested_at timestamptz, request_stamp bytea,
  end_status text, ended_at timestamptz, end_reason text, end_stamp bytea
  -- No status column: pending lasts only until expires_at, which depends on when it is read.
  -- The view pairing_tokens_live says it (RULES.md, "Pairings").
);

CREATE TABLE pairing_attempts (
  id text PRIMARY KEY,
  pairing_id text, device_id text NOT NULL, failure text NOT NULL, attempted_at timestamptz NOT NULL
);

-- OpenClaw's own stores (openclaw-persistence.md), from the openclaw.* events: the session
-- index, config values (agent_id '' is the global config) and auth profiles, whose credential
-- is a vault reference, never the key.
CREATE TABLE openclaw_sessions (
  session_id text PRIMARY KEY,
  agent_id text, created_at timestamptz, created_stamp bytea,
  session_key text, key_stamp bytea,
  session_file text, file_stamp bytea,
  updated_at timestamptz, updated_stamp bytea
);

CREATE TABLE openclaw_config (
  agent_id text NOT NULL, path text NOT NULL,
  value jsonb, set_at timestamptz, stamp bytea,
  PRIMARY KEY (agent_id, path)
);

CREATE TABLE openclaw_auth_profiles (
  agent_id text NOT NULL, profile_id text NOT NULL,
  provider text, mode text, credential_ref text, expires_at timestamptz, email text,
  updated_at timestamptz, stamp bytea,
  PRIMARY KEY (agent_id, profile_id)
);

CREATE INDEX score_history_task ON score_history (task_id, scored_at);
CREATE INDEX activity_log_time ON activity_log (created_at);

-- As in Supabase: the API roles hold table privileges, and row-level security decides.
DO $$
DECLARE t text;
BEGIN
  FOR t IN SELECT tablename FROM pg_tables
           WHERE schemaname = current_schema() AND tablename NOT LIKE 'spool\_%' LOOP
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.%I TO anon, authenticated, service_role', current_schema(), t);
  END LOOP;
END
$$;

-- The six OptimalVault tables, and OpenClaw's auth profiles (which name where credentials are
-- kept): RLS forced, one service_role policy each, anon and authenticated denied by default (no
-- policy admits them).
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['vault_entries', 'vault_recipients', 'vault_access_log', 'devices',
                           'pairing_tokens', 'vault_install', 'openclaw_auth_profiles'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY service_role_all ON %I FOR ALL TO service_role USING (true) WITH CHECK (true)', t);
  END LOOP;
END
$$;
