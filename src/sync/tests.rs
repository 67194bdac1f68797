use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;

/// A node in the simulation: its state machine and what it applied, in order.
struct Node {
    origin: Origin,
    causal: Causal,
    log: Vec<Meta>,
    by_id: HashMap<EventId, Hash>,
}

impl Node {
    fn new(i: u8) -> Node {
        Node {
            origin: Origin([i; 16]),
            causal: Causal::default(),
            log: Vec::new(),
            by_id: HashMap::new(),
        }
    }

    /// Writes an own event depending on everything applied from other origins.
    fn write(&mut self) {
        let (seq, prev) = self.causal.head(self.origin).unwrap_or((0, Hash::ZERO));
        let deps = self
            .causal
            .vector()
            .0
            .into_iter()
            .filter(|(o, _)| *o != self.origin)
            .map(|(origin, seq)| Dep { origin, seq })
            .collect();
        let id = EventId {
            origin: self.origin,
            seq: seq + 1,
        };
        let hash = Hash::of(format!("{id:?}{prev:?}").as_bytes());
        self.apply(Meta {
            id,
            hash,
            prev,
            deps,
        });
    }

    /// Applies, checking that the predecessor and every dep came first.
    fn apply(&mut self, meta: Meta) {
        if meta.id.seq > 1 {
            let before = EventId {
                origin: meta.id.origin,
                seq: meta.id.seq - 1,
            };
            assert_eq!(self.by_id.get(&before), Some(&meta.prev), "{:?}", meta.id);
        }
        for d in &meta.deps {
            let dep = EventId {
                origin: d.origin,
                seq: d.seq,
            };
            assert!(
                self.by_id.contains_key(&dep),
                "{:?} before its dep {dep:?}",
                meta.id
            );
        }
        self.causal.applied(&meta);
        self.by_id.insert(meta.id, meta.hash);
        self.log.push(meta);
    }

    fn receive(&mut self, meta: Meta) {
        let by_id = &self.by_id;
        match self.causal.decide(&meta, |id| by_id.get(&id).copied()) {
            Decision::Apply => {
                let id = meta.id;
                self.apply(meta);
                self.release(id);
            }
            Decision::Wait => self.causal.wait(meta),
            Decision::Duplicate => {}
            other => panic!("{:?}: {other:?}", meta.id),
        }
    }

    fn release(&mut self, id: EventId) {
        let (ready, broken, _) = self.causal.released(id, |_| true);
        assert!(broken.is_empty());
        for meta in ready {
            // `released` recorded them as applied; check the order and keep them.
            let id = meta.id;
            self.by_id.insert(id, meta.hash);
            self.log.push(meta);
        }
    }
}

#[test]
fn random_exchanges_converge_and_never_apply_before_dependencies() {
    for seed in 0..40 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes: Vec<Node> = (1..=3).map(Node::new).collect();
        for _ in 0..60 {
            let from = rng.random_range(0..3);
            if rng.random_bool(0.5) {
                nodes[from].write();
                continue;
            }
            let to = (from + rng.random_range(1..3)) % 3;
            // A random part of what `from` holds, shuffled, some of it twice.
            let mut batch: Vec<Meta> = nodes[from]
                .log
                .iter()
                .filter(|_| rng.random_bool(0.6))
                .cloned()
                .collect();
            let again: Vec<Meta> = batch
                .iter()
                .filter(|_| rng.random_bool(0.2))
                .cloned()
                .collect();
            batch.extend(again);
            batch.shuffle(&mut rng);
            for meta in batch {
                nodes[to].receive(meta);
            }
            check_released_order(&nodes[to]);
        }
        // Then everyone sends everything to everyone.
        for from in 0..3 {
            for to in 0..3 {
                let all = nodes[from].log.clone();
                for meta in all {
                    nodes[to].receive(meta);
                }
            }
        }
        for from in 0..3 {
            for to in 0..3 {
                let all = nodes[from].log.clone();
                for meta in all {
                    nodes[to].receive(meta);
                }
            }
        }
        let vectors: Vec<Vector> = nodes.iter().map(|n| n.causal.vector()).collect();
        assert_eq!(vectors[0], vectors[1], "seed {seed}");
        assert_eq!(vectors[1], vectors[2], "seed {seed}");
        for n in &nodes {
            assert_eq!(n.causal.waiting(), 0, "seed {seed}");
            assert_eq!(n.by_id, nodes[0].by_id, "seed {seed}");
        }
    }
}

/// Every event in a node's apply order comes after its predecessor and deps.
fn check_released_order(node: &Node) {
    let mut seen = HashMap::new();
    for meta in &node.log {
        if meta.id.seq > 1 {
            let before = EventId {
                origin: meta.id.origin,
                seq: meta.id.seq - 1,
            };
            assert_eq!(seen.get(&before), Some(&meta.prev));
        }
        for d in &meta.deps {
            assert!(seen.contains_key(&EventId {
                origin: d.origin,
                seq: d.seq
            }));
        }
        seen.insert(meta.id, meta.hash);
    }
}

fn meta(origin: u8, seq: u64, prev: Hash, deps: Vec<Dep>) -> Meta {
    let id = EventId {
        origin: Origin([origin; 16]),
        seq,
    };
    Meta {
        id,
        hash: Hash::of(format!("{id:?}{prev:?}{deps:?}").as_bytes()),
        prev,
        deps,
    }
}

#[test]
fn forks_and_broken_links_are_named_never_applied() {
    let mut c = Causal::default();
    let a1 = meta(1, 1, Hash::ZERO, vec![]);
    assert_eq!(c.decide(&a1, |_| None), Decision::Apply);
    c.applied(&a1);
    let stored = |id: EventId| (id == a1.id).then_some(a1.hash);
    assert_eq!(c.decide(&a1, stored), Decision::Duplicate);
    let other1 = meta(1, 1, Hash([9; 32]), vec![]);
    assert_eq!(
        c.decide(&other1, stored),
        Decision::Fork { stored: a1.hash }
    );
    let wrong_link = meta(1, 2, Hash([7; 32]), vec![]);
    assert_eq!(
        c.decide(&wrong_link, stored),
        Decision::BrokenLink { expected: a1.hash }
    );
    // Waiting for seq 2, a seq 3 whose prev turns out wrong is released as broken.
    let a2 = meta(1, 2, a1.hash, vec![]);
    let a3_bad = meta(1, 3, Hash([5; 32]), vec![]);
    assert_eq!(c.decide(&a3_bad, stored), Decision::Wait);
    c.wait(a3_bad.clone());
    let twin = meta(1, 3, Hash([6; 32]), vec![]);
    assert!(matches!(
        c.decide(&twin, stored),
        Decision::ForkWaiting { .. }
    ));
    assert_eq!(c.decide(&a2, stored), Decision::Apply);
    c.applied(&a2);
    let (ready, broken, _) = c.released(a2.id, |_| true);
    assert!(ready.is_empty());
    assert_eq!(broken, vec![(a3_bad, a2.hash)]);
    assert_eq!(c.waiting(), 0);
}

#[test]
fn an_event_waits_for_its_deps_then_is_released_with_its_successors() {
    let mut c = Causal::default();
    let b1 = meta(2, 1, Hash::ZERO, vec![]);
    let a1 = meta(
        1,
        1,
        Hash::ZERO,
        vec![Dep {
            origin: b1.id.origin,
            seq: 1,
        }],
    );
    let a2 = meta(1, 2, a1.hash, vec![]);
    for m in [&a2, &a1] {
        assert_eq!(c.decide(m, |_| None), Decision::Wait);
        c.wait(m.clone());
    }
    assert_eq!(c.decide(&b1, |_| None), Decision::Apply);
    c.applied(&b1);
    let (ready, broken, _) = c.released(b1.id, |_| true);
    assert!(broken.is_empty());
    assert_eq!(ready, vec![a1, a2]);
    assert_eq!(c.vector().seq(Origin([1; 16])), 2);
}

#[test]
fn vectors_parse_both_forms_and_refuse_nonsense() {
    let a = Origin([0xaa; 16]);
    let b = Origin([0xbb; 16]);
    let v = Vector([(a, 3), (b, 10)].into_iter().collect());
    assert_eq!(Vector::parse(&v.to_string()).unwrap(), v);
    assert_eq!(Vector::parse(&format!("{a}:3, {b}:10")).unwrap(), v);
    assert_eq!(Vector::parse("").unwrap(), Vector::default());
    for bad in [
        "{\"zz\": 1}",
        "abc",
        &format!("{a}:x"),
        &format!("{a}:1,{a}:2"),
        "{\"a\":",
    ] {
        assert!(Vector::parse(bad).is_err(), "{bad}");
    }
    let sel = Selection {
        origins: vec![a],
        since: Vector([(a, 3)].into_iter().collect()),
    };
    assert!(!sel.wants(EventId { origin: a, seq: 3 }));
    assert!(sel.wants(EventId { origin: a, seq: 4 }));
    assert!(!sel.wants(EventId { origin: b, seq: 4 }));
}
