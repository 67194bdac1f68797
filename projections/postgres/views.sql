-- Readings of the projected tables that depend on when they are read, or join tables (the rules:
-- RULES.md). Made in `public` when a database is opened and again after a backfill's swap (which
-- drops the tables they read). security_invoker: a view reads with its reader's rights, so the
-- row-level security of the tables it reads holds (anon and authenticated see no vault rows).

-- A pairing's status now: its end event's, else 'expired' once its code's TTL has passed, else
-- 'pending'.
CREATE OR REPLACE VIEW pairing_tokens_live WITH (security_invoker = true) AS
SELECT pairing_id, code_hash, user_id, device_id, account_id, expires_at, requested_at,
  ended_at, end_reason,
  CASE WHEN end_status IS NOT NULL THEN end_status
       WHEN expires_at <= now() THEN 'expired'
       ELSE 'pending' END AS status
FROM pairing_tokens;

-- Entries still encrypted to a recipient that was removed (and not added again).
CREATE OR REPLACE VIEW vault_rewrap_due WITH (security_invoker = true) AS
SELECT e.entry_id, r.recipient_id, r.fingerprint, r.removed_at, r.remove_reason
FROM vault_entries e
CROSS JOIN LATERAL jsonb_array_elements_text(e.recipients) AS f(fingerprint)
JOIN vault_recipients r ON r.fingerprint = f.fingerprint
WHERE r.removed_at IS NOT NULL;

-- Entries listing a fingerprint that no recipient's row carries (written elsewhere: a node
-- refuses to write one).
CREATE OR REPLACE VIEW vault_unknown_recipients WITH (security_invoker = true) AS
SELECT e.entry_id, f.fingerprint
FROM vault_entries e
CROSS JOIN LATERAL jsonb_array_elements_text(e.recipients) AS f(fingerprint)
WHERE NOT EXISTS (SELECT 1 FROM vault_recipients r WHERE r.fingerprint = f.fingerprint);

-- Who holds each resource now: the latest claim not released by its own bot, while its TTL
-- (from the claim or the bot's last heartbeat, whichever is later) has not run out.
CREATE OR REPLACE VIEW bot_holders WITH (security_invoker = true) AS
SELECT c.resource, c.bot_id, c.claimed_at, c.ttl_ms
FROM bot_claims c LEFT JOIN bot_heartbeats h ON h.bot_id = c.bot_id
WHERE c.status = 'held' AND c.claimed_at IS NOT NULL
  AND GREATEST(c.claimed_at, COALESCE(h.last_seen_at, c.claimed_at))
      + c.ttl_ms * interval '1 millisecond' > now()
  AND NOT EXISTS (SELECT 1 FROM bot_claims d
                  WHERE d.resource = c.resource AND d.status = 'held' AND d.stamp > c.stamp);

GRANT SELECT ON pairing_tokens_live, vault_rewrap_due, bot_holders
  TO anon, authenticated, service_role;
