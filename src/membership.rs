//! Fleet membership: which origins a node takes events from, derived from the events themselves.
//!
//! Invariants:
//! - The root (the first node of the fleet) is a member.
//! - An origin becomes a member when an applied `device.paired` carries the key it is bound to
//!   (`identity::origin_of`). Only members' events are applied, so every admission counted was
//!   made by a member: trust flows from the root, admission by admission.
//! - A `device.revoked` names a device id: the origins paired under it, and the origin it spells
//!   if it is an origin id (`spool fleet revoke` writes that). Each such origin is revoked for
//!   good: its events after `through`, the seq the revocation's `deps` name for it (the last of
//!   its events causally before the revocation; the writer puts it there), are refused. Its
//!   events up to `through` stay valid wherever they arrive. Revocation is final: a later
//!   pairing of the same key does not undo it, so the outcome does not depend on the order in
//!   which a node learned of the two.
//! - Everything here is a function of the root and the set of applied membership events, so
//!   every node holding the same events agrees on the fleet.
//!
//! Boundary: a state machine without I/O. The log's writer feeds it every event it applies and
//! asks it before applying a shipped one; it is saved in the log's `meta` beside the heads.

use std::collections::{BTreeMap, BTreeSet};

use crate::event::{EventId, Origin};
use crate::identity::{origin_of, PublicKey};

/// Members a fleet may hold; an admission beyond it is ignored (and logged).
pub const MEMBERS_MAX: usize = 4096;

/// One member of the fleet (also as `spool fleet --json` shows it).
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Member {
    pub origin: Origin,
    /// The key the origin is bound to (hex), from its admission (`None` for the root, whose
    /// first event carries it).
    pub key: Option<String>,
    pub device_id: Option<String>,
    pub label: Option<String>,
    pub capabilities: Vec<String>,
    /// The `device.paired` that admitted it (`None` for the root).
    pub admitted_by: Option<EventId>,
    pub revoked: Option<Revocation>,
}

/// A member's revocation.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Revocation {
    /// The `device.revoked` event.
    pub by: EventId,
    /// The member's last event causally before it; later ones are refused.
    pub through: u64,
}

/// Why a shipped event is not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum NotTaken {
    #[error("origin {origin} is not a member of this fleet (root {root}): no member admitted its key; `spool fleet admit` on a member admits it")]
    NotMember { origin: Origin, root: Origin },
    #[error("origin {origin} was revoked by origin {} seq {}; only its events up to seq {through} are taken", by.origin, by.seq)]
    Revoked {
        origin: Origin,
        by: EventId,
        through: u64,
    },
}

/// A membership event, read from its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Paired {
        key: PublicKey,
        device_id: String,
        label: String,
        capabilities: Vec<String>,
    },
    Revoked {
        device_id: String,
    },
}

impl Change {
    /// The membership change an event makes, if it makes one. A payload that does not decode
    /// (the log checked it when it was written) or a key that is not an ed25519 point makes none.
    pub fn of(kind: &str, version: u16, payload: &[u8]) -> Option<Change> {
        if kind != "device.paired" && kind != "device.revoked" {
            return None;
        }
        let value = crate::kinds::decode(kind, version, payload).ok()?;
        let text = |field: &str| value[field].as_str().map(str::to_owned);
        match kind {
            "device.paired" => Some(Change::Paired {
                key: PublicKey::from_hex(value["signing_public_key"].as_str()?).ok()?,
                device_id: text("device_id")?,
                label: text("label")?,
                capabilities: value["capabilities"]
                    .as_array()?
                    .iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect(),
            }),
            _ => Some(Change::Revoked {
                device_id: text("device_id")?,
            }),
        }
    }
}

/// The fleet as this node knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    root: Origin,
    members: BTreeMap<Origin, Member>,
    /// Device ids revoked, with the revoking event and its deps (a pairing that arrives after
    /// its device's revocation starts revoked).
    revoked_devices: BTreeMap<String, (EventId, BTreeMap<Origin, u64>)>,
}

impl Membership {
    /// A fleet of one: its root.
    pub fn new(root: Origin) -> Membership {
        let mut members = BTreeMap::new();
        members.insert(
            root,
            Member {
                origin: root,
                key: None,
                device_id: None,
                label: None,
                capabilities: Vec::new(),
                admitted_by: None,
                revoked: None,
            },
        );
        Membership {
            root,
            members,
            revoked_devices: BTreeMap::new(),
        }
    }

    /// The bytes the log saves it as (JSON: a few hundred bytes a member).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a membership serializes")
    }

    /// Reads saved bytes; `None` if they are not a membership.
    pub fn from_bytes(bytes: &[u8]) -> Option<Membership> {
        serde_json::from_slice(bytes).ok()
    }

    pub fn root(&self) -> Origin {
        self.root
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member(&self, origin: Origin) -> Option<&Member> {
        self.members.get(&origin)
    }

    /// Whether an event of `id` may be taken.
    pub fn admits(&self, id: EventId) -> Result<(), NotTaken> {
        match self.members.get(&id.origin) {
            None => Err(NotTaken::NotMember {
                origin: id.origin,
                root: self.root,
            }),
            Some(Member {
                revoked: Some(r), ..
            }) if id.seq > r.through => Err(NotTaken::Revoked {
                origin: id.origin,
                by: r.by,
                through: r.through,
            }),
            Some(_) => Ok(()),
        }
    }

    /// The origins a revocation of `device_id` names.
    pub fn named_by(&self, device_id: &str) -> BTreeSet<Origin> {
        let mut out: BTreeSet<Origin> = self
            .members
            .values()
            .filter(|m| m.device_id.as_deref() == Some(device_id))
            .map(|m| m.origin)
            .collect();
        if let Ok(origin) = Origin::from_hex(device_id) {
            out.insert(origin);
        }
        out
    }

    /// Takes in an applied event's change, made by `id` with `deps` (the seqs of other origins
    /// it names; at most `DEPS_MAX`). Returns whether anything changed.
    pub fn observe(&mut self, id: EventId, deps: &BTreeMap<Origin, u64>, change: Change) -> bool {
        match change {
            Change::Paired {
                key,
                device_id,
                label,
                capabilities,
            } => {
                let origin = origin_of(&key);
                if self.members.contains_key(&origin) {
                    return false; // Admitted already: the first admission is the one kept.
                }
                if self.members.len() >= MEMBERS_MAX {
                    tracing::warn!(%origin, "the fleet holds {MEMBERS_MAX} members; admission ignored");
                    return false;
                }
                let revoked = self
                    .revoked_devices
                    .get(&device_id)
                    .map(|(by, deps)| Revocation {
                        by: *by,
                        through: deps.get(&origin).copied().unwrap_or(0),
                    });
                self.members.insert(
                    origin,
                    Member {
                        origin,
                        key: Some(key.to_hex()),
                        device_id: Some(device_id),
                        label: Some(label),
                        capabilities,
                        admitted_by: Some(id),
                        revoked,
                    },
                );
                true
            }
            Change::Revoked { device_id } => {
                let named = self.named_by(&device_id);
                let mut changed = false;
                for origin in named {
                    let through = if origin == id.origin {
                        id.seq // A member that revokes itself keeps what it wrote up to now.
                    } else {
                        deps.get(&origin).copied().unwrap_or(0)
                    };
                    if let Some(member) = self.members.get_mut(&origin) {
                        // The earliest cut is kept, so the order of two revocations is moot.
                        let keep = member.revoked.is_none_or(|r| through < r.through);
                        if keep {
                            member.revoked = Some(Revocation { by: id, through });
                            changed = true;
                        }
                    }
                }
                if !self.revoked_devices.contains_key(&device_id)
                    && self.revoked_devices.len() < MEMBERS_MAX
                {
                    self.revoked_devices.insert(device_id, (id, deps.clone()));
                    changed = true;
                }
                changed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;

    fn none() -> BTreeMap<Origin, u64> {
        BTreeMap::new()
    }

    fn id(origin: Origin, seq: u64) -> EventId {
        EventId { origin, seq }
    }

    fn paired(key: &NodeKey, device: &str) -> Change {
        Change::Paired {
            key: key.public(),
            device_id: device.into(),
            label: "node".into(),
            capabilities: vec!["sync".into()],
        }
    }

    #[test]
    fn trust_flows_from_the_root_and_a_revocation_cuts_at_its_deps() {
        let (root, b, c) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        let mut fleet = Membership::new(root.origin());
        assert!(fleet.admits(id(root.origin(), 9)).is_ok());
        assert!(matches!(
            fleet.admits(id(b.origin(), 1)),
            Err(NotTaken::NotMember { .. })
        ));
        assert!(fleet.observe(id(root.origin(), 2), &none(), paired(&b, "pi")));
        assert!(!fleet.observe(id(root.origin(), 3), &none(), paired(&b, "pi2")));
        assert!(fleet.admits(id(b.origin(), 1)).is_ok());
        assert_eq!(
            fleet.member(b.origin()).unwrap().admitted_by,
            Some(id(root.origin(), 2))
        );
        // Revoked with b's seq 4 in its deps: seq 4 is taken, seq 5 is not.
        let by = id(root.origin(), 9);
        let deps = BTreeMap::from([(b.origin(), 4)]);
        assert!(fleet.observe(
            by,
            &deps,
            Change::Revoked {
                device_id: "pi".into()
            }
        ));
        assert!(fleet.admits(id(b.origin(), 4)).is_ok());
        assert_eq!(
            fleet.admits(id(b.origin(), 5)),
            Err(NotTaken::Revoked {
                origin: b.origin(),
                by,
                through: 4
            })
        );
        // A revocation by origin id names the origin without a device id.
        let device = c.origin().to_hex();
        fleet.observe(id(root.origin(), 10), &none(), paired(&c, &device));
        fleet.observe(
            id(b.origin(), 3),
            &none(),
            Change::Revoked { device_id: device },
        );
        assert!(fleet.admits(id(c.origin(), 1)).is_err());
    }

    #[test]
    fn revocation_and_pairing_agree_in_either_order() {
        let (root, b) = (NodeKey::generate(), NodeKey::generate());
        let revoke = Change::Revoked {
            device_id: "pi".into(),
        };
        let deps = BTreeMap::from([(b.origin(), 2)]);
        let mut first = Membership::new(root.origin());
        first.observe(id(root.origin(), 1), &none(), paired(&b, "pi"));
        first.observe(id(root.origin(), 5), &deps, revoke.clone());
        let mut second = Membership::new(root.origin());
        second.observe(id(root.origin(), 5), &deps, revoke);
        second.observe(id(root.origin(), 1), &none(), paired(&b, "pi"));
        assert_eq!(
            first.member(b.origin()).unwrap().revoked,
            second.member(b.origin()).unwrap().revoked
        );
        assert!(second.admits(id(b.origin(), 3)).is_err());
    }

    #[test]
    fn a_payload_that_is_not_a_membership_change_makes_none() {
        assert_eq!(Change::of("task.created", 1, b""), None);
        assert_eq!(Change::of("device.paired", 1, b"not rkyv"), None);
    }
}
