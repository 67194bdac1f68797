-- The local SQLite projection: the tables of storage-layers.txt, derived from the event log.
-- Never written directly: `spool rebuild sqlite` recreates them from the events.
--
-- Conventions. Append-only rows are keyed by the event id ('<origin hex>:<seq>') and inserted
-- if absent. Mutable rows carry a stamp per column group (`*_stamp`: 8 bytes of the event's causal
-- order, big-endian: its HLC stamp raised past every event before it, so a causally later write
-- always wins whatever the clocks said; then the 16-byte origin, so bytewise order is the stamp
-- order); a write lands only if its
-- stamp is newer (last writer wins), or older for first-writer-wins facts (job claims). Values
-- that combine groups (`status`, `shown_lane`) are generated from stored columns. Every write
-- to a group sets all of its columns, so which write lands never depends on arrival order. Times are
-- RFC 3339 UTC with milliseconds, from the event's HLC stamp.
-- Secondary indexes are in indexes.sql: a rebuild builds them once its rows are in.

CREATE TABLE spool_checkpoint (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  position INTEGER NOT NULL,  -- the last log position applied
  hash BLOB NOT NULL,        -- that event's hash
  events INTEGER NOT NULL,   -- events applied
  heads TEXT                 -- per origin, the last event applied: {"<origin>": {"seq", "hash"}};
                             -- means the same on every node, so it survives a restore
);

CREATE TABLE tasks (
  id TEXT PRIMARY KEY,
  title TEXT, title_stamp BLOB,
  description TEXT, description_stamp BLOB,
  status TEXT, status_stamp BLOB,
  lane TEXT, lane_stamp BLOB,
  track TEXT, track_stamp BLOB,
  tags TEXT, tags_stamp BLOB,
  created_at TEXT, created_by TEXT, created_stamp BLOB,
  archived_at TEXT, archive_reason TEXT, archived_stamp BLOB,
  current_score REAL, current_lane TEXT, current_rank INTEGER, last_scored_at TEXT, score_stamp BLOB,
  score_locked INTEGER NOT NULL DEFAULT 0, locked_lane TEXT, lock_stamp BLOB,
  -- The lane the board shows (projections/RULES.md, "The lane shown"): the locked lane while the
  -- score is locked; else the later of the user's last move and the triage's last score.
  shown_lane TEXT GENERATED ALWAYS AS
    (CASE WHEN score_locked = 1 THEN locked_lane
          WHEN score_stamp IS NULL OR (lane_stamp IS NOT NULL AND lane_stamp > score_stamp)
            THEN COALESCE(lane, current_lane)
          ELSE current_lane END) VIRTUAL
);

CREATE TABLE briefs (
  id TEXT PRIMARY KEY,
  source TEXT, body TEXT, tags TEXT, created_at TEXT, added_stamp BLOB,
  consumed_in_run_id TEXT, consumed_at TEXT, consumed_stamp BLOB
);

CREATE TABLE triage_runs (
  id TEXT PRIMARY KEY,
  started_at TEXT, model TEXT, trigger TEXT, host TEXT, start_stamp BLOB,
  completed_at TEXT, end_status TEXT, end_model TEXT, tokens_in INTEGER, tokens_out INTEGER,
  tasks_scored INTEGER, summaries TEXT, error TEXT, end_stamp BLOB,
  status TEXT GENERATED ALWAYS AS (COALESCE(end_status, 'running')) VIRTUAL
);

CREATE TABLE score_history (
  id TEXT PRIMARY KEY,
  task_id TEXT NOT NULL, run_id TEXT NOT NULL,
  i INTEGER NOT NULL, u INTEGER NOT NULL, c INTEGER NOT NULL, e INTEGER NOT NULL,
  score REAL NOT NULL, rank INTEGER NOT NULL, lane TEXT NOT NULL,
  reasoning TEXT, clash_resolution TEXT, sources_used TEXT, scored_at TEXT NOT NULL
);

CREATE TABLE score_overrides (
  id TEXT PRIMARY KEY,
  task_id TEXT NOT NULL, dimension TEXT NOT NULL, old_value INTEGER NOT NULL,
  new_value INTEGER NOT NULL, reason TEXT, applied_to_run_id TEXT, created_at TEXT NOT NULL
);

CREATE TABLE loom_runs (
  run_id TEXT PRIMARY KEY,
  workflow_id TEXT, trigger TEXT, host TEXT, started_at TEXT, source TEXT, start_stamp BLOB,
  end_status TEXT, error TEXT, finished_at TEXT, summary TEXT, end_stamp BLOB,
  status TEXT GENERATED ALWAYS AS (COALESCE(end_status, 'running')) VIRTUAL
);

CREATE TABLE loom_step_runs (
  run_id TEXT NOT NULL, step_id TEXT NOT NULL,
  started_at TEXT, start_stamp BLOB,
  end_status TEXT, exit_code INTEGER, output_tail TEXT, result TEXT, error TEXT, finished_at TEXT,
  end_stamp BLOB,
  ack_at TEXT, ack_note TEXT, ack_stamp BLOB,
  status TEXT GENERATED ALWAYS AS
    (COALESCE(end_status, CASE WHEN started_at IS NULL THEN 'pending' ELSE 'running' END)) VIRTUAL,
  PRIMARY KEY (run_id, step_id)
);

-- Events this build could not read when it projected them (a kind or version from a newer
-- build): kept in the log, skipped by the projection, listed here until an upgraded spool
-- rebuilds the projection.
CREATE TABLE spool_unreadable (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL, version INTEGER NOT NULL, stream TEXT NOT NULL, problem TEXT NOT NULL,
  created_at TEXT NOT NULL
);

CREATE TABLE activity_log (
  id TEXT PRIMARY KEY,
  stream TEXT NOT NULL, actor TEXT NOT NULL, message TEXT NOT NULL, source TEXT, meta TEXT,
  created_at TEXT NOT NULL
);

CREATE TABLE loom_workflow_defs (
  workflow_id TEXT PRIMARY KEY,
  name TEXT, host TEXT, source_path TEXT, schedule TEXT, steps TEXT, mirrored_at TEXT, stamp BLOB
);

-- The steps of each mirrored definition. A step that a later definition dropped stays with its
-- older stamp: the current steps are those whose stamp equals their definition's.
CREATE TABLE loom_workflow_steps (
  workflow_id TEXT NOT NULL, step_id TEXT NOT NULL,
  ordinal INTEGER, name TEXT, command TEXT, depends_on TEXT, target_host TEXT, stamp BLOB,
  PRIMARY KEY (workflow_id, step_id)
);

CREATE TABLE loom_workflows (
  workflow_id TEXT NOT NULL, host TEXT NOT NULL,
  schedule TEXT, registered INTEGER, reason TEXT, changed_at TEXT, stamp BLOB,
  PRIMARY KEY (workflow_id, host)
);

CREATE TABLE loom_job_queue (
  job_id TEXT PRIMARY KEY,
  workflow_id TEXT, target_host TEXT, input TEXT, enqueued_at TEXT, enqueue_stamp BLOB,
  claimed_by TEXT, claimed_at TEXT, claim_stamp BLOB,
  end_status TEXT, run_id TEXT, error TEXT, completed_at TEXT, end_stamp BLOB,
  status TEXT GENERATED ALWAYS AS (CASE WHEN end_status IS NOT NULL THEN end_status
    WHEN claimed_by IS NOT NULL THEN 'claimed' ELSE 'queued' END) VIRTUAL
);

CREATE TABLE openclaw_instances (
  host TEXT PRIMARY KEY,
  role TEXT, capabilities TEXT, version TEXT, last_heartbeat_at TEXT, stamp BLOB
);

CREATE TABLE bot_heartbeats (
  bot_id TEXT PRIMARY KEY,
  host TEXT, status TEXT, last_seen_at TEXT, stamp BLOB
);

-- One row per (resource, bot): only a bot's own release ends its claim (RULES.md, "Bot claims").
CREATE TABLE bot_claims (
  resource TEXT NOT NULL, bot_id TEXT NOT NULL,
  ttl_ms INTEGER, claimed_at TEXT, stamp BLOB,
  released_at TEXT, release_stamp BLOB,
  status TEXT GENERATED ALWAYS AS
    (CASE WHEN release_stamp IS NOT NULL AND (stamp IS NULL OR release_stamp > stamp)
     THEN 'released' ELSE 'held' END) VIRTUAL,
  PRIMARY KEY (resource, bot_id)
);

CREATE TABLE vault_install (
  install_id TEXT PRIMARY KEY,
  kdf TEXT, salt TEXT, memory_kib INTEGER, iterations INTEGER, parallelism INTEGER,
  created_at TEXT, stamp BLOB
);

CREATE TABLE vault_recipients (
  recipient_id TEXT PRIMARY KEY,
  device_id TEXT, label TEXT, public_key TEXT, fingerprint TEXT, added_at TEXT, add_stamp BLOB,
  removed_at TEXT, remove_reason TEXT, remove_stamp BLOB
);

-- Ciphertext only: entries are age-encrypted on the client before they become events.
CREATE TABLE vault_entries (
  entry_id TEXT PRIMARY KEY,
  ciphertext TEXT, recipients TEXT, updated_at TEXT, rewrap_reason TEXT, removed_at TEXT,
  remove_reason TEXT, stamp BLOB
);

CREATE TABLE vault_access_log (
  id TEXT PRIMARY KEY,
  entry_id TEXT NOT NULL, device_id TEXT NOT NULL, recipient TEXT NOT NULL, purpose TEXT,
  unlocked_at TEXT NOT NULL
);

CREATE TABLE devices (
  device_id TEXT PRIMARY KEY,
  label TEXT, capabilities TEXT, signing_public_key TEXT, pairing_id TEXT, paired_at TEXT,
  pair_stamp BLOB,
  revoked_at TEXT, revoke_reason TEXT, revoke_stamp BLOB
);

-- Only a keyed hash of each code is stored, never the code.
CREATE TABLE pairing_tokens (
  pairing_id TEXT PRIMARY KEY,
  code_hash TEXT, user_id TEXT, device_id TEXT, account_id TEXT, expires_at TEXT,
  requested_at TEXT, request_stamp BLOB,
  end_status TEXT, ended_at TEXT, end_reason TEXT, end_stamp BLOB
  -- No status column: a pairing without an end event is pending only until expires_at, which
  -- depends on when it is read. The view pairing_tokens_live says it (RULES.md, "Pairings").
);

CREATE TABLE pairing_attempts (
  id TEXT PRIMARY KEY,
  pairing_id TEXT, device_id TEXT NOT NULL, failure TEXT NOT NULL, attempted_at TEXT NOT NULL
);

-- OpenClaw's own stores (openclaw-persistence.md), projected from the openclaw.* events.
-- The session index (`sessions.json`: sessionKey -> entry).
CREATE TABLE openclaw_sessions (
  session_id TEXT PRIMARY KEY,
  agent_id TEXT, created_at TEXT, created_stamp BLOB,
  session_key TEXT, key_stamp BLOB,
  session_file TEXT, file_stamp BLOB,
  updated_at TEXT, updated_stamp BLOB
);

-- Config values (`openclaw.json`, and per-agent overrides): agent_id '' is the global config.
CREATE TABLE openclaw_config (
  agent_id TEXT NOT NULL, path TEXT NOT NULL,
  value TEXT, set_at TEXT, stamp BLOB,
  PRIMARY KEY (agent_id, path)
);

-- Auth profiles (`auth-profiles.json`): the credential is a vault reference, never the key.
CREATE TABLE openclaw_auth_profiles (
  agent_id TEXT NOT NULL, profile_id TEXT NOT NULL,
  provider TEXT, mode TEXT, credential_ref TEXT, expires_at TEXT, email TEXT, updated_at TEXT,
  stamp BLOB,
  PRIMARY KEY (agent_id, profile_id)
);
