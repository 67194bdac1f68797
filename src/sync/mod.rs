//! Log shipping: what to send for a version vector, and when a shipped event may be applied.
//!
//! Invariants: an event is applied only after its predecessor in its origin's chain (whose hash
//! it names in `prev`) and every event its `deps` name; an event whose `(origin, seq)` is already
//! applied with another hash is a fork, never applied; an event that names the wrong
//! predecessor is refused. Applying the same event twice is a no-op.
//!
//! Boundary: no I/O and no storage. [`Causal`] is a state machine fed event metadata, told
//! what is applied, and answering what to do; the log's writer drives it with stored events,
//! a simulation with in-memory ones. The file transport is [`file`].

pub mod file;
pub mod hub;

use crate::input::shown;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::event::{Dep, EventId, EventRef, Hash, Origin};

/// Per origin, the highest seq held: what a node has, in the form `--since` takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vector(pub BTreeMap<Origin, u64>);

impl Vector {
    /// The seq held of `origin` (0 for none).
    pub fn seq(&self, origin: Origin) -> u64 {
        self.0.get(&origin).copied().unwrap_or(0)
    }

    /// `{"<origin hex>": seq, ...}`, the form `spool heads --json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|(o, s)| (o.to_hex(), serde_json::Value::from(*s)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// Reads the JSON form (`{"<origin hex>": seq}`), or `hex:seq,hex:seq` for a shell.
    pub fn parse(text: &str) -> Result<Vector, String> {
        let text = text.trim();
        let pairs: Vec<(String, u64)> = if text.starts_with('{') {
            let map: BTreeMap<String, u64> = serde_json::from_str(text).map_err(|e| {
                let (line, column) = (e.line(), e.column());
                format!(
                    "not a version vector ({{\"<origin>\": seq}}; line {line}, column {column})"
                )
            })?;
            map.into_iter().collect()
        } else {
            text.split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|pair| {
                    let (origin, seq) = pair
                        .trim()
                        .split_once(':')
                        .ok_or_else(|| format!("{} is not origin:seq", shown(pair)))?;
                    let seq = seq
                        .parse()
                        .map_err(|_| format!("{}: the seq is not a number", shown(pair)))?;
                    Ok((origin.to_owned(), seq))
                })
                .collect::<Result<_, String>>()?
        };
        let mut out = BTreeMap::new();
        for (origin, seq) in pairs {
            let origin = Origin::from_hex(&origin).map_err(|e| e.to_string())?;
            if out.insert(origin, seq).is_some() {
                return Err(format!("origin {origin} appears twice"));
            }
        }
        Ok(Vector(out))
    }
}

impl fmt::Display for Vector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json().to_string())
    }
}

/// Which events an export holds.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Only these origins (all when empty).
    pub origins: Vec<Origin>,
    /// Only what this vector lacks.
    pub since: Vector,
}

impl Selection {
    /// Reads a selection as `spool export` is given it: origins in hex, and a version vector as
    /// `spool heads --json` prints it. The error names the part refused (`origin`, `since`).
    pub fn parse(
        origins: &[String],
        since: Option<&str>,
    ) -> Result<Selection, (&'static str, String)> {
        let origins = origins
            .iter()
            .map(|o| Origin::from_hex(o).map_err(|e| ("origin", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let since = match since {
            Some(text) => Vector::parse(text).map_err(|e| ("since", e))?,
            None => Vector::default(),
        };
        Ok(Selection { origins, since })
    }

    /// Whether event `id` belongs in the export.
    pub fn wants(&self, id: EventId) -> bool {
        (self.origins.is_empty() || self.origins.contains(&id.origin))
            && id.seq > self.since.seq(id.origin)
    }
}

/// What a shipped event's bytes say about its place in the causal order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub id: EventId,
    pub hash: Hash,
    pub prev: Hash,
    pub deps: Vec<Dep>,
}

impl Meta {
    pub fn of(hash: Hash, event: &EventRef<'_>) -> Meta {
        Meta {
            id: event.id(),
            hash,
            prev: event.prev(),
            deps: event.deps(),
        }
    }
}

/// What to do with an offered event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Its predecessor and deps are applied: apply it now.
    Apply,
    /// Keep it until its predecessor and deps are applied.
    Wait,
    /// Already applied, or already waiting, with the same hash: nothing to do.
    Duplicate,
    /// A different event is applied at this `(origin, seq)`: keep as evidence, never apply.
    Fork { stored: Hash },
    /// A different event is waiting at this `(origin, seq)`.
    ForkWaiting { waiting: Hash },
    /// Its predecessor is applied, and is not the event it names.
    BrokenLink { expected: Hash },
}

/// The causal-apply state machine: applied heads, and the events waiting for theirs.
#[derive(Default)]
pub struct Causal {
    heads: HashMap<Origin, (u64, Hash)>,
    waiting: BTreeMap<EventId, Meta>,
    /// Event → waiting events that need it (as predecessor or dep).
    blocked_on: HashMap<EventId, Vec<EventId>>,
}

impl Causal {
    /// Starts from the applied heads (and, on reopening, the events still waiting).
    pub fn new(heads: impl IntoIterator<Item = (Origin, u64, Hash)>) -> Causal {
        Causal {
            heads: heads.into_iter().map(|(o, s, h)| (o, (s, h))).collect(),
            ..Causal::default()
        }
    }

    pub fn head(&self, origin: Origin) -> Option<(u64, Hash)> {
        self.heads.get(&origin).copied()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The vector of what is applied.
    pub fn vector(&self) -> Vector {
        Vector(self.heads.iter().map(|(o, (s, _))| (*o, *s)).collect())
    }

    fn is_applied(&self, dep: &Dep) -> bool {
        self.head(dep.origin).is_some_and(|(seq, _)| seq >= dep.seq)
    }

    /// Decides what to do with `meta`. `stored` gives the hash applied at an `(origin, seq)` at
    /// or below its head (the driver's storage lookup); it is asked only for such ids.
    pub fn decide(&self, meta: &Meta, stored: impl FnOnce(EventId) -> Option<Hash>) -> Decision {
        let (head_seq, head_hash) = self.head(meta.id.origin).unwrap_or((0, Hash::ZERO));
        if meta.id.seq <= head_seq {
            return match stored(meta.id) {
                Some(hash) if hash == meta.hash => Decision::Duplicate,
                Some(hash) => Decision::Fork { stored: hash },
                None if meta.id.seq == head_seq => match head_hash == meta.hash {
                    true => Decision::Duplicate,
                    false => Decision::Fork { stored: head_hash },
                },
                // The driver could not find an applied event: treat it as a fork with an unknown
                // hash rather than apply a second event at the seq.
                None => Decision::Fork { stored: Hash::ZERO },
            };
        }
        if let Some(other) = self.waiting.get(&meta.id) {
            return match other.hash == meta.hash {
                true => Decision::Duplicate,
                false => Decision::ForkWaiting {
                    waiting: other.hash,
                },
            };
        }
        if meta.id.seq == head_seq + 1 && meta.prev != head_hash {
            return Decision::BrokenLink {
                expected: head_hash,
            };
        }
        match meta.id.seq == head_seq + 1 && meta.deps.iter().all(|d| self.is_applied(d)) {
            true => Decision::Apply,
            false => Decision::Wait,
        }
    }

    /// Records that `meta` was applied (after [`Decision::Apply`], or released by
    /// [`Causal::released`]).
    pub fn applied(&mut self, meta: &Meta) {
        self.heads.insert(meta.id.origin, (meta.id.seq, meta.hash));
    }

    /// Records the head of an origin whose events the driver wrote itself (a node's own).
    pub fn set_head(&mut self, origin: Origin, seq: u64, hash: Hash) {
        self.heads.insert(origin, (seq, hash));
    }

    /// Keeps `meta` waiting (after [`Decision::Wait`]).
    pub fn wait(&mut self, meta: Meta) {
        for need in self.needs(&meta) {
            self.blocked_on.entry(need).or_default().push(meta.id);
        }
        self.waiting.insert(meta.id, meta);
    }

    /// What a waiting event still needs: its predecessor and its unapplied deps.
    fn needs(&self, meta: &Meta) -> Vec<EventId> {
        let mut needs = vec![EventId {
            origin: meta.id.origin,
            seq: meta.id.seq - 1,
        }];
        needs.extend(
            meta.deps
                .iter()
                .filter(|d| !self.is_applied(d))
                .map(|d| EventId {
                    origin: d.origin,
                    seq: d.seq,
                }),
        );
        needs
    }

    /// After `applied`: the waiting events that can now be applied, in an order that respects
    /// causality, each already recorded as applied. A released event whose chain link is wrong
    /// is dropped from waiting and returned in the second list; one that `admits` refuses (its
    /// origin was revoked while it waited) in the third, and what waits on it keeps waiting.
    pub fn released(
        &mut self,
        id: EventId,
        admits: impl Fn(EventId) -> bool,
    ) -> (Vec<Meta>, Vec<(Meta, Hash)>, Vec<Meta>) {
        let mut ready = Vec::new();
        let mut broken = Vec::new();
        let mut refused = Vec::new();
        let mut wake = vec![id];
        while let Some(done) = wake.pop() {
            // An origin's seqs are applied one by one, and the driver reports each, so waking
            // the exact ids waited on is enough.
            let Some(blocked) = self.blocked_on.remove(&done) else {
                continue;
            };
            for waiter in blocked {
                let Some(meta) = self.waiting.get(&waiter) else {
                    continue;
                };
                let (head_seq, head_hash) = self.head(meta.id.origin).unwrap_or((0, Hash::ZERO));
                if meta.id.seq != head_seq + 1 {
                    continue;
                }
                let missing = meta.deps.iter().find(|d| !self.is_applied(d)).copied();
                if let Some(dep) = missing {
                    // Still blocked: wait on that dep instead.
                    let dep = EventId {
                        origin: dep.origin,
                        seq: dep.seq,
                    };
                    self.blocked_on.entry(dep).or_default().push(waiter);
                    continue;
                }
                let meta = self.waiting.remove(&waiter).expect("looked up above");
                if meta.prev != head_hash {
                    broken.push((meta, head_hash));
                    continue;
                }
                if !admits(meta.id) {
                    refused.push(meta);
                    continue;
                }
                self.applied(&meta);
                wake.push(meta.id);
                ready.push(meta);
            }
        }
        (ready, broken, refused)
    }
}

#[cfg(test)]
mod tests;
