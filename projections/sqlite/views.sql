-- Readings of the projected tables that depend on when they are read, or join tables. Views
-- hold no rows: digests and golden cases cover the tables they read. The rules: RULES.md.

-- A pairing's status now: its end event's, else 'expired' once its code's TTL has passed
-- (a code minted by a clock at 1970 reads as expired), else 'pending'.
CREATE VIEW IF NOT EXISTS pairing_tokens_live AS
SELECT pairing_id, code_hash, user_id, device_id, account_id, expires_at, requested_at,
  ended_at, end_reason,
  CASE WHEN end_status IS NOT NULL THEN end_status
       WHEN expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now') THEN 'expired'
       ELSE 'pending' END AS status
FROM pairing_tokens;

-- Entries still encrypted to a recipient that was removed (and not added again): each needs a
-- rewrap to its remaining recipients.
CREATE VIEW IF NOT EXISTS vault_rewrap_due AS
SELECT e.entry_id, r.recipient_id, r.fingerprint, r.removed_at, r.remove_reason
FROM vault_entries e, json_each(e.recipients) f
JOIN vault_recipients r ON r.fingerprint = f.value
WHERE r.removed_at IS NOT NULL;

-- Entries listing a fingerprint that no recipient's row carries. A node refuses to write one
-- (RULES.md, "Vault recipients"); one that arrives from another node is shown here, not refused.
CREATE VIEW IF NOT EXISTS vault_unknown_recipients AS
SELECT e.entry_id, f.value AS fingerprint
FROM vault_entries e, json_each(e.recipients) f
WHERE NOT EXISTS (SELECT 1 FROM vault_recipients r WHERE r.fingerprint = f.value);

-- Who holds each resource now: the latest claim not released by its own bot, while its TTL
-- (from the claim or the bot's last heartbeat, whichever is later) has not run out.
CREATE VIEW IF NOT EXISTS bot_holders AS
SELECT c.resource, c.bot_id, c.claimed_at, c.ttl_ms
FROM bot_claims c LEFT JOIN bot_heartbeats h ON h.bot_id = c.bot_id
WHERE c.status = 'held' AND c.claimed_at IS NOT NULL
  AND (julianday(max(c.claimed_at, COALESCE(h.last_seen_at, c.claimed_at))) * 86400000.0
       + c.ttl_ms) > julianday('now') * 86400000.0
  AND NOT EXISTS (SELECT 1 FROM bot_claims d
                  WHERE d.resource = c.resource AND d.status = 'held' AND d.stamp > c.stamp);
