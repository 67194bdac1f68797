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
            for meta in random_part(&mut rng, &nodes[from].log) {
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

/// What travels between simulated fleet nodes: an event, the head its origin signed over it
/// (with the key offered for it), and the membership change it makes.
#[derive(Clone)]
struct Item {
    meta: Meta,
    key: crate::identity::PublicKey,
    head: crate::identity::SignedHead,
    change: Option<crate::membership::Change>,
}

/// A fleet node: the causal state machine, the membership, and the checks ingest makes in
/// front of them (a head signed by the origin's own key over exactly this event; a member;
/// not past a revocation).
struct Member {
    node: Node,
    key: crate::identity::NodeKey,
    fleet: crate::membership::Membership,
    /// What this node holds, to pass on: every applied item, in apply order.
    items: Vec<Item>,
    waiting: HashMap<EventId, Item>,
    /// Events refused, by reason.
    refused: u64,
}

impl Member {
    fn new(key: crate::identity::NodeKey, root: Origin) -> Member {
        let mut node = Node::new(0);
        node.origin = key.origin();
        Member {
            node,
            key,
            fleet: crate::membership::Membership::new(root),
            items: Vec::new(),
            waiting: HashMap::new(),
            refused: 0,
        }
    }

    fn write(&mut self, change: Option<crate::membership::Change>) {
        self.node.write();
        let meta = self.node.log.last().expect("just written").clone();
        let head = self.key.sign_head(meta.id.seq, meta.hash);
        let item = Item {
            meta,
            key: self.key.public(),
            head,
            change,
        };
        self.took(item);
    }

    /// After the causal state applied `item`: keep it, and take in its membership change.
    fn took(&mut self, item: Item) {
        if let Some(change) = item.change.clone() {
            let deps = item.meta.deps.iter().map(|d| (d.origin, d.seq)).collect();
            self.fleet.observe(item.meta.id, &deps, change);
        }
        self.items.push(item);
    }

    /// Ingest's checks, then the causal decision.
    fn receive(&mut self, item: Item) {
        let m = &item.meta;
        if self.node.by_id.get(&m.id) == Some(&m.hash) {
            return; // Held: nothing to check (ingest counts it as a duplicate).
        }
        let signed = item.head.origin == m.id.origin
            && item.head.seq == m.id.seq
            && item.head.hash == m.hash
            && item.head.verify(&item.key).is_ok();
        if !signed {
            self.refused += 1;
            return;
        }
        let by_id = &self.node.by_id;
        let decision = self.node.causal.decide(m, |id| by_id.get(&id).copied());
        if matches!(decision, Decision::Apply | Decision::Wait) && self.fleet.admits(m.id).is_err()
        {
            self.refused += 1;
            return;
        }
        match decision {
            Decision::Apply => {
                let id = m.id;
                self.node.apply(item.meta.clone());
                self.took(item);
                self.release(id);
            }
            Decision::Wait => {
                self.node.causal.wait(item.meta.clone());
                self.waiting.insert(item.meta.id, item);
            }
            Decision::Duplicate => {}
            other => panic!("an honest fleet forked: {:?}: {other:?}", m.id),
        }
    }

    fn release(&mut self, id: EventId) {
        let fleet = &self.fleet;
        let (ready, broken, refused) = self.node.causal.released(id, |id| fleet.admits(id).is_ok());
        assert!(broken.is_empty());
        for meta in refused {
            self.waiting.remove(&meta.id);
            self.refused += 1;
        }
        for meta in ready {
            let item = self.waiting.remove(&meta.id).expect("waited");
            self.node.by_id.insert(meta.id, meta.hash);
            self.node.log.push(meta);
            self.took(item);
        }
    }
}

fn paired(key: &crate::identity::NodeKey) -> Option<crate::membership::Change> {
    Some(crate::membership::Change::Paired {
        key: key.public(),
        device_id: key.origin().to_hex(),
        label: "node".into(),
        capabilities: vec!["sync".into()],
    })
}

/// A relay's forgeries of what it passes on: an event changed under its origin's signature,
/// an event made up for another origin and signed with the relay's own key, and an event of
/// a key no member admitted.
fn forge(rng: &mut StdRng, relay: &crate::identity::NodeKey, genuine: &Item) -> Item {
    let mut item = genuine.clone();
    match rng.random_range(0..3) {
        0 => {
            item.meta.hash = Hash::of(format!("changed {:?}", item.meta.id).as_bytes());
        }
        1 => {
            item.meta.id.seq += 1;
            item.meta.prev = genuine.meta.hash;
            item.meta.hash = Hash::of(format!("made up {:?}", item.meta.id).as_bytes());
            item.head = relay.sign_head(item.meta.id.seq, item.meta.hash);
            item.key = relay.public();
        }
        _ => {
            let stranger = crate::identity::NodeKey::generate();
            item.meta = Meta {
                id: EventId {
                    origin: stranger.origin(),
                    seq: 1,
                },
                hash: Hash::of(b"a stranger's event"),
                prev: Hash::ZERO,
                deps: Vec::new(),
            };
            item.head = stranger.sign_head(1, item.meta.hash);
            item.key = stranger.public();
            item.change = None;
        }
    }
    item
}

/// Issue 24's fleet: a root admits three nodes; a fourth is admitted midway; one retires and
/// is revoked; one member is a relay that forges a share of what it passes on. Exchanges are
/// random, partial, shuffled and repeated. No forged event is ever applied, and every honest
/// node ends with the same events.
#[test]
fn a_fleet_with_signatures_admissions_a_revocation_and_a_forging_relay_converges() {
    use crate::identity::NodeKey;
    const RELAY: usize = 2;
    const RETIRED: usize = 3;
    const LATE: usize = 4;
    for seed in 0..40 {
        let mut rng = StdRng::seed_from_u64(seed);
        let secrets: Vec<[u8; 32]> = (0..5).map(|_| rng.random()).collect();
        let keys: Vec<NodeKey> = secrets.iter().map(|s| NodeKey::from_secret(*s)).collect();
        let root = keys[0].origin();
        let mut nodes: Vec<Member> = secrets
            .iter()
            .map(|s| Member::new(NodeKey::from_secret(*s), root))
            .collect();
        for k in &keys[1..LATE] {
            nodes[0].write(paired(k));
        }
        let mut genuine: HashMap<EventId, Hash> = HashMap::new();
        let mut active = vec![0, 1, 2, 3];
        let mut retired_at = None;
        for step in 0..120 {
            if step == 40 {
                nodes[0].write(paired(&keys[LATE]));
                active.push(LATE);
            }
            if step == 70 {
                // The retired node stops writing; once the root holds all it wrote, it is revoked.
                active.retain(|&i| i != RETIRED);
                retired_at = Some(step);
            }
            if retired_at.is_some_and(|at| step == at + 10) {
                // The root gathers what every node holds, so it holds all the retired node
                // wrote (and what that depends on) before it revokes it.
                for i in 1..nodes.len() {
                    let all = nodes[i].items.clone();
                    for item in all {
                        nodes[0].receive(item);
                    }
                }
                nodes[0].write(Some(crate::membership::Change::Revoked {
                    device_id: keys[RETIRED].origin().to_hex(),
                }));
            }
            let from = active[rng.random_range(0..active.len())];
            if rng.random_bool(0.4) {
                nodes[from].write(None);
                continue;
            }
            let to = active[rng.random_range(0..active.len())];
            if to == from {
                continue;
            }
            for item in random_part(&mut rng, &nodes[from].items) {
                // (Its own events it passes on as they are: a member that signs two events
                // at one seq forks its own origin, which is another test's matter.)
                let others = item.meta.id.origin != keys[RELAY].origin();
                let item = match from == RELAY && others && rng.random_bool(0.3) {
                    true => forge(&mut rng, &keys[RELAY], &item),
                    false => item,
                };
                nodes[to].receive(item);
            }
            check_released_order(&nodes[to].node);
        }
        for n in &nodes {
            for item in &n.items {
                if item.meta.id.origin == n.node.origin {
                    genuine.insert(item.meta.id, item.meta.hash);
                }
            }
        }
        // Then every honest node sends everything to every other, twice.
        let honest = [0, 1, 3, 4];
        for _ in 0..2 {
            for &from in &honest {
                for &to in &honest {
                    let all = nodes[from].items.clone();
                    for item in all {
                        nodes[to].receive(item);
                    }
                }
            }
        }
        let forged_refused: u64 = honest.iter().map(|&i| nodes[i].refused).sum();
        for &i in &honest {
            let n = &nodes[i].node;
            assert_eq!(
                n.causal.vector(),
                nodes[0].node.causal.vector(),
                "seed {seed}"
            );
            assert_eq!(n.by_id, nodes[0].node.by_id, "seed {seed}");
            for (id, hash) in &n.by_id {
                assert_eq!(
                    genuine.get(id),
                    Some(hash),
                    "seed {seed}: a forged event was applied"
                );
            }
            assert!(nodes[i]
                .fleet
                .admits(EventId {
                    origin: keys[LATE].origin(),
                    seq: 1
                })
                .is_ok());
            assert!(matches!(
                nodes[i].fleet.admits(EventId {
                    origin: keys[RETIRED].origin(),
                    seq: u64::MAX
                }),
                Err(crate::membership::NotTaken::Revoked { .. })
            ));
        }
        assert!(forged_refused > 0, "seed {seed}: the relay forged nothing");
    }
}

/// A random part of what a node holds, shuffled, some of it twice.
fn random_part<T: Clone>(rng: &mut StdRng, held: &[T]) -> Vec<T> {
    let mut batch: Vec<T> = held
        .iter()
        .filter(|_| rng.random_bool(0.6))
        .cloned()
        .collect();
    let again: Vec<T> = batch
        .iter()
        .filter(|_| rng.random_bool(0.2))
        .cloned()
        .collect();
    batch.extend(again);
    batch.shuffle(rng);
    batch
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
