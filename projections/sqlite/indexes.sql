-- Secondary indexes of the local SQLite projection (tables: schema.sql). A live projection
-- keeps them as it writes; a rebuild into a new file creates them after its last row, which
-- sorts each index once instead of inserting into it row by row.

CREATE INDEX IF NOT EXISTS score_history_task ON score_history (task_id, scored_at);
CREATE INDEX IF NOT EXISTS activity_log_time ON activity_log (created_at);
