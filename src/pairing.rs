//! Pairing codes (the seed's `pairing_tokens`): what a node's pairing events say is pending, and
//! what a code presented at its peers' door comes to. A state machine without I/O: the daemon
//! (`serve::pair`) reads the node's own pairing events (its stream `pairing/<origin>`), asks,
//! and appends what it decides, so every step is an event.
//!
//! A code is 8 characters from A–Z and 2–9, lives 60 minutes, is used once; at most 3 are
//! pending at a time. Only a keyed hash of it is stored (blake3, keyed by a secret derived from
//! the node key: the log, which other nodes hold, does not let them try codes offline). After 5
//! failed attempts since codes were last all settled, every pending code is cancelled.

use serde_json::Value;

/// The characters a code is made of.
pub const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ23456789";
/// Characters in a code.
pub const CODE_LEN: usize = 8;
/// How long a code works.
pub const TTL_MS: u64 = 60 * 60 * 1000;
/// Codes pending at once, at most.
pub const PENDING_MAX: usize = 3;
/// Failed attempts that cancel every pending code.
pub const FAILURES_MAX: usize = 5;
/// How the reason of a cancellation by the lock begins.
pub const LOCKED: &str = "locked after";
/// The stream a node's pairing events go to.
pub fn stream(origin: crate::event::Origin) -> String {
    format!("pairing/{origin}")
}

/// A new code from the operating system's randomness.
pub fn new_code() -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..CODE_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A code as a person may type it (lower case, spaces or dashes between groups), in its one
/// form; `None` if it cannot be a code.
pub fn normalise(typed: &str) -> Option<String> {
    let code: String = typed
        .chars()
        .filter(|c| !matches!(c, ' ' | '-'))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == CODE_LEN && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

/// The keyed hash of a code, as `pairing.requested` stores it.
pub fn code_hash(secret: &[u8; 32], code: &str) -> String {
    blake3::keyed_hash(secret, code.as_bytes())
        .to_hex()
        .to_string()
}

/// Where a code stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Completed { device_id: String },
    Expired,
    Cancelled { reason: Option<String> },
}

/// A code this node minted (never the code itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Code {
    pub pairing_id: String,
    pub code_hash: String,
    pub device: String,
    pub expires_at_ms: u64,
    pub state: State,
}

/// What a presented code comes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A pending code: the pairing to complete.
    Accepted(String),
    /// No code this node minted.
    Wrong,
    /// A code past its time (its pairing id: marked expired if it is not yet).
    Expired(String),
    /// A code used already.
    Used(String),
    /// A code cancelled: by the lock after failed attempts (`true`), or by hand.
    Cancelled(String, bool),
}

/// A node's pairing codes, from its pairing events in order.
#[derive(Clone, Debug, Default)]
pub struct Pairings {
    codes: Vec<Code>,
    /// Failed attempts since the last moment no code was pending.
    failures: usize,
}

impl Pairings {
    /// Takes in one of the node's pairing events (`kind`, its `data`); others are ignored.
    pub fn observe(&mut self, kind: &str, data: &Value) {
        let text = |field: &str| data.get(field).and_then(Value::as_str).map(str::to_owned);
        let id = text("pairing_id");
        let mut settle = |id: &Option<String>, state: State| {
            if let Some(code) = self
                .codes
                .iter_mut()
                .find(|c| Some(&c.pairing_id) == id.as_ref())
            {
                if code.state == State::Pending {
                    code.state = state;
                }
            }
        };
        match kind {
            "pairing.requested" => {
                let (Some(pairing_id), Some(code_hash)) = (id, text("code_hash")) else {
                    return;
                };
                if !self.codes.iter().any(|c| c.state == State::Pending) {
                    self.failures = 0;
                }
                self.codes.push(Code {
                    pairing_id,
                    code_hash,
                    device: text("device_id").unwrap_or_default(),
                    expires_at_ms: data
                        .get("expires_at_ms")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    state: State::Pending,
                });
            }
            "pairing.completed" => settle(
                &id,
                State::Completed {
                    device_id: text("device_id").unwrap_or_default(),
                },
            ),
            "pairing.expired" => settle(&id, State::Expired),
            "pairing.cancelled" => settle(
                &id,
                State::Cancelled {
                    reason: text("reason"),
                },
            ),
            "pairing.attempt_failed" => self.failures += 1,
            _ => {}
        }
    }

    /// Every code, oldest first.
    pub fn codes(&self) -> &[Code] {
        &self.codes
    }

    /// Codes that work now.
    pub fn pending(&self, now_ms: u64) -> impl Iterator<Item = &Code> {
        self.codes
            .iter()
            .filter(move |c| c.state == State::Pending && now_ms < c.expires_at_ms)
    }

    /// Codes still marked pending whose time has passed: each gets `pairing.expired`.
    pub fn overdue(&self, now_ms: u64) -> Vec<String> {
        self.codes
            .iter()
            .filter(|c| c.state == State::Pending && now_ms >= c.expires_at_ms)
            .map(|c| c.pairing_id.clone())
            .collect()
    }

    /// Until when (ms) the peers' door lets a key that is no member ask to pair: the latest
    /// expiry of a pending code (0: none pending).
    pub fn open_until(&self, now_ms: u64) -> u64 {
        self.pending(now_ms)
            .map(|c| c.expires_at_ms)
            .max()
            .unwrap_or(0)
    }

    /// Whether another code may be minted now; if not, why.
    pub fn may_mint(&self, now_ms: u64) -> Result<(), String> {
        let pending = self.pending(now_ms).count();
        if pending >= PENDING_MAX {
            return Err(format!(
                "{pending} pairing codes are pending, the most there may be: use one, let one \
                 expire, or `spool pair cancel PAIRING_ID`"
            ));
        }
        Ok(())
    }

    /// Failed attempts since codes were last all settled.
    pub fn failures(&self) -> usize {
        self.failures
    }

    /// What a code whose keyed hash is `hash` comes to at `now_ms`.
    pub fn attempt(&self, hash: &str, now_ms: u64) -> Attempt {
        // The latest code with this hash (a code minted again after an old one settled).
        let Some(code) = self.codes.iter().rev().find(|c| c.code_hash == hash) else {
            return Attempt::Wrong;
        };
        let id = code.pairing_id.clone();
        match &code.state {
            State::Pending if now_ms < code.expires_at_ms => Attempt::Accepted(id),
            State::Pending | State::Expired => Attempt::Expired(id),
            State::Completed { .. } => Attempt::Used(id),
            State::Cancelled { reason } => {
                Attempt::Cancelled(id, reason.as_deref().is_some_and(|r| r.starts_with(LOCKED)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn requested(p: &mut Pairings, id: &str, hash: &str, expires: u64) {
        p.observe(
            "pairing.requested",
            &json!({"pairing_id": id, "code_hash": hash, "device_id": "d", "user_id": "u", "expires_at_ms": expires}),
        );
    }

    #[test]
    fn codes_are_eight_of_the_alphabet_and_typed_forms_normalise() {
        for _ in 0..1000 {
            let code = new_code();
            assert_eq!(normalise(&code), Some(code.clone()));
            assert_eq!(code.len(), 8);
        }
        assert_eq!(normalise("abcd-efgh"), Some("ABCDEFGH".into()));
        assert_eq!(normalise("ABCD EFG1"), None, "1 is not in the alphabet");
        assert_eq!(normalise("ABCDEFG"), None);
        let secret = [7; 32];
        assert_ne!(
            code_hash(&secret, "ABCDEFGH"),
            code_hash(&[8; 32], "ABCDEFGH")
        );
    }

    #[test]
    fn a_code_is_used_once_expires_and_at_most_three_are_pending() {
        let mut p = Pairings::default();
        requested(&mut p, "a", "ha", 100);
        requested(&mut p, "b", "hb", 100);
        assert!(p.may_mint(10).is_ok());
        requested(&mut p, "c", "hc", 200);
        assert!(p
            .may_mint(10)
            .unwrap_err()
            .contains("3 pairing codes are pending"));
        assert_eq!(p.attempt("ha", 10), Attempt::Accepted("a".into()));
        p.observe(
            "pairing.completed",
            &json!({"pairing_id": "a", "device_id": "x"}),
        );
        assert_eq!(p.attempt("ha", 10), Attempt::Used("a".into()));
        assert_eq!(p.attempt("nope", 10), Attempt::Wrong);
        // b's time passes.
        assert_eq!(p.attempt("hb", 100), Attempt::Expired("b".into()));
        assert_eq!(p.overdue(100), vec!["b".to_owned()]);
        assert_eq!(p.open_until(100), 200);
        p.observe("pairing.expired", &json!({"pairing_id": "b"}));
        assert!(p.overdue(150).is_empty());
        p.observe("pairing.cancelled", &json!({"pairing_id": "c"}));
        assert_eq!(p.attempt("hc", 10), Attempt::Cancelled("c".into(), false));
        assert_eq!(p.open_until(10), 0);
    }

    #[test]
    fn failures_count_from_when_codes_were_last_all_settled() {
        let mut p = Pairings::default();
        requested(&mut p, "a", "ha", 100);
        for _ in 0..3 {
            p.observe(
                "pairing.attempt_failed",
                &json!({"device_id": "x", "failure": "wrong code"}),
            );
        }
        assert_eq!(p.failures(), 3);
        // Another code while one is pending: the count goes on.
        requested(&mut p, "b", "hb", 100);
        assert_eq!(p.failures(), 3);
        p.observe("pairing.cancelled", &json!({"pairing_id": "a"}));
        p.observe("pairing.cancelled", &json!({"pairing_id": "b"}));
        // None pending: a new code starts afresh.
        requested(&mut p, "c", "hc", 100);
        assert_eq!(p.failures(), 0);
    }
}
