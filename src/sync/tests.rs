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
    /// Second events at an (origin, seq) it holds or waits for: kept aside, never applied.
    forks: u64,
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
            forks: 0,
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
        if self.node.by_id.get(&item.meta.id) == Some(&item.meta.hash) {
            return; // Held: nothing to check (ingest counts it as a duplicate).
        }
        let signed = signed(&item);
        self.take(item, signed);
    }

    /// As [`receive`], the signature's verdict given.
    ///
    /// [`receive`]: Member::receive
    fn take(&mut self, item: Item, signed: bool) {
        let m = &item.meta;
        if self.node.by_id.get(&m.id) == Some(&m.hash) {
            return;
        }
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
            Decision::Fork { .. } | Decision::ForkWaiting { .. } | Decision::BrokenLink { .. } => {
                self.forks += 1
            }
        }
    }

    fn release(&mut self, id: EventId) {
        let fleet = &self.fleet;
        let (ready, broken, refused) = self.node.causal.released(id, |id| fleet.admits(id).is_ok());
        // A waiting event whose predecessor came with another hash: a fork, kept aside.
        for waited in broken {
            self.waiting.remove(&waited.0.id);
            self.forks += 1;
        }
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

/// Whether the head that came with an event is its origin's signature over exactly it.
fn signed(item: &Item) -> bool {
    let m = &item.meta;
    item.head.origin == m.id.origin
        && item.head.seq == m.id.seq
        && item.head.hash == m.hash
        && crate::identity::origin_of(&item.key) == m.id.origin
        && item.head.verify(&item.key).is_ok()
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
        for &i in &honest {
            assert_eq!(nodes[i].forks, 0, "seed {seed}: an honest fleet forked");
        }
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

/// A message in flight: items from one node to another, delivered at a later step.
struct Message {
    at: u32,
    from: usize,
    to: usize,
    items: Vec<Item>,
}

/// The protocol without storage, under a hostile network: messages lost, duplicated, reordered
/// and delayed; partitions; crashes that lose everything not applied (what was waiting, and
/// what was in flight to or from the node); a node admitted midway; a relay forging a share of
/// what it passes on; and in some seeds a node restored from an old backup that writes again
/// at a seq it had used (a fork of its own origin). Every honest node ends with the same
/// events of every other origin, none applied before its predecessor and deps, no forged one
/// applied; two nodes holding different events at one (origin, seq) have each detected the
/// fork. `SPOOL_SIM_SEEDS` seeds (default 10 000), on every core.
#[test]
fn the_protocol_holds_under_loss_delay_partitions_crashes_and_forks() {
    let seeds = crate::testing::env_count("SPOOL_SIM_SEEDS", 10_000);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let (forked, refused) = std::thread::scope(|s| {
        let runs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let (mut forked, mut refused) = (0u64, 0u64);
                    for seed in (t..seeds).step_by(threads as usize) {
                        let (f, r) = simulate(seed);
                        forked += u64::from(f);
                        refused += r;
                    }
                    (forked, refused)
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    // The simulation did what it says: forks detected, forgeries refused.
    if seeds >= 100 {
        assert!(
            forked > 0 && refused > 0,
            "{forked} seeds forked, {refused} refused"
        );
    }
}

/// A node opened again after a crash or a restore: what it had applied (`items`, in apply
/// order) is read back as the log is at open, without asking again; nothing else survives.
fn reopened(secret: &[u8; 32], root: Origin, items: Vec<Item>) -> Member {
    let mut node = Member::new(crate::identity::NodeKey::from_secret(*secret), root);
    for item in items {
        node.node.apply(item.meta.clone());
        node.took(item);
    }
    node
}

/// One seed: whether a fork was detected, and how many events were refused.
fn simulate(seed: u64) -> (bool, u64) {
    use crate::identity::NodeKey;
    const NODES: usize = 4;
    const RELAY: usize = 2;
    const LATE: usize = 3;
    const STEPS: u32 = 90;
    let mut rng = StdRng::seed_from_u64(seed);
    let secrets: Vec<[u8; 32]> = (0..NODES).map(|_| rng.random()).collect();
    let keys: Vec<NodeKey> = secrets.iter().map(|s| NodeKey::from_secret(*s)).collect();
    let root = keys[0].origin();
    let mut nodes: Vec<Member> = secrets
        .iter()
        .map(|s| Member::new(NodeKey::from_secret(*s), root))
        .collect();
    // Every event an origin wrote (both versions of a forked seq), as it wrote them.
    let mut written: HashMap<EventId, Vec<Hash>> = HashMap::new();
    let mut wrote = |node: &Member| {
        let meta = &node.items.last().expect("just written").meta;
        written.entry(meta.id).or_default().push(meta.hash);
    };
    for k in &keys[1..LATE] {
        nodes[0].write(paired(k));
        wrote(&nodes[0]);
    }
    // Signature checks, each done once per seed (the same verdict every node would reach).
    let mut verdicts: HashMap<(EventId, Hash, [u8; 32]), bool> = HashMap::new();
    let mut verdict = |item: &Item| -> bool {
        *verdicts
            .entry((item.meta.id, item.meta.hash, item.key.0))
            .or_insert_with(|| signed(item))
    };
    let mut active: Vec<usize> = (0..LATE).collect();
    let mut partitioned = [0u32; NODES];
    let mut flight: Vec<Message> = Vec::new();
    // The node restored from a backup, its backup (the step's items), and whether it forked.
    let restorer = 1;
    let backup_at = if rng.random_bool(0.3) {
        Some(rng.random_range(10..40))
    } else {
        None
    };
    let mut backup: Option<Vec<Item>> = None;
    let mut forked = false;
    for step in 0..STEPS {
        // What is due arrives, in the order it was sent or not.
        flight.shuffle(&mut rng);
        let (due, later): (Vec<Message>, Vec<Message>) =
            flight.into_iter().partition(|m| m.at <= step);
        flight = later;
        for message in due {
            if partitioned[message.to] > step || partitioned[message.from] > step {
                continue;
            }
            for item in message.items {
                let ok = verdict(&item);
                nodes[message.to].take(item, ok);
            }
            check_released_order(&nodes[message.to].node);
        }
        if step == 20 {
            nodes[0].write(paired(&keys[LATE]));
            wrote(&nodes[0]);
            active.push(LATE);
        }
        if backup_at == Some(step) {
            backup = Some(nodes[restorer].items.clone());
        }
        let from = active[rng.random_range(0..active.len())];
        match rng.random_range(0..100) {
            0..35 => {
                if !(forked && from == restorer) {
                    nodes[from].write(None);
                    wrote(&nodes[from]);
                }
            }
            35..85 => {
                let to = active[rng.random_range(0..active.len())];
                if to == from {
                    continue;
                }
                let mut items = Vec::new();
                for item in random_part(&mut rng, &nodes[from].items) {
                    let others = item.meta.id.origin != keys[RELAY].origin();
                    let item = match from == RELAY && others && rng.random_bool(0.2) {
                        true => forge(&mut rng, &keys[RELAY], &item),
                        false => item,
                    };
                    items.push(item);
                }
                // Lost whole, or sent (a second copy sometimes), each after a delay.
                if rng.random_bool(0.1) {
                    continue;
                }
                let copies = if rng.random_bool(0.1) { 2 } else { 1 };
                for _ in 0..copies {
                    flight.push(Message {
                        at: step + rng.random_range(0..8),
                        from,
                        to,
                        items: items.clone(),
                    });
                }
            }
            85..93 => partitioned[from] = step + rng.random_range(5..25),
            93..98 => {
                // A crash: what was waiting and what was in flight to or from it is lost;
                // what was applied is durable.
                flight.retain(|m| m.to != from && m.from != from);
                let kept = nodes[from].items.clone();
                nodes[from] = reopened(&secrets[from], root, kept);
            }
            _ => {
                // The restorer comes back from its backup and writes again: its next seq was
                // used already if it wrote after the backup.
                if let Some(items) = backup.take() {
                    flight.retain(|m| m.to != restorer && m.from != restorer);
                    nodes[restorer] = reopened(&secrets[restorer], root, items);
                    let (seq, prev) = nodes[restorer]
                        .node
                        .causal
                        .head(keys[restorer].origin())
                        .unwrap_or((0, Hash::ZERO));
                    let id = EventId {
                        origin: keys[restorer].origin(),
                        seq: seq + 1,
                    };
                    let meta = Meta {
                        id,
                        hash: Hash::of(format!("restored {id:?} {prev:?}").as_bytes()),
                        prev,
                        deps: Vec::new(),
                    };
                    nodes[restorer].node.apply(meta.clone());
                    let head = nodes[restorer].key.sign_head(id.seq, meta.hash);
                    let item = Item {
                        meta,
                        key: keys[restorer].public(),
                        head,
                        change: None,
                    };
                    nodes[restorer].took(item);
                    wrote(&nodes[restorer]);
                    // It halts once it learns of the fork; here it writes no more.
                    forked = true;
                }
            }
        }
    }
    // The network heals; every honest node sends everything to every other, until nothing
    // changes (an event released by another's may itself release more, round after round).
    let honest: Vec<usize> = (0..NODES).filter(|&i| i != RELAY).collect();
    let held = |nodes: &[Member]| nodes.iter().map(|n| n.node.by_id.len()).sum::<usize>();
    let mut before = usize::MAX;
    while held(&nodes) != before {
        before = held(&nodes);
        for &from in &honest {
            for &to in &honest {
                let all = nodes[from].items.clone();
                for item in all {
                    let ok = verdict(&item);
                    nodes[to].take(item, ok);
                }
            }
        }
    }
    let genuine = written;
    let restored = keys[restorer].origin();
    for &i in &honest {
        let n = &nodes[i];
        check_released_order(&n.node);
        for (id, hash) in &n.node.by_id {
            assert!(
                genuine.get(id).is_some_and(|h| h.contains(hash)),
                "seed {seed}: a forged event was applied at node {i}"
            );
        }
        for &j in &honest {
            let other = &nodes[j];
            // Two nodes that took different versions of the restored origin's chain may also
            // hold different events that depend on it: only the fork's detection is asked of
            // them.
            let apart = forked
                && n.node.by_id.iter().any(|(id, hash)| {
                    id.origin == restored && other.node.by_id.get(id).is_some_and(|h| h != hash)
                });
            for (id, hash) in &n.node.by_id {
                if id.origin == restored && forked {
                    // Two versions at one seq: both holders detected the fork.
                    if other.node.by_id.get(id).is_some_and(|h| h != hash) {
                        assert!(
                            n.forks > 0 && other.forks > 0,
                            "seed {seed}: a fork went undetected"
                        );
                    }
                    continue;
                }
                if !apart {
                    assert_eq!(
                        other.node.by_id.get(id),
                        Some(hash),
                        "seed {seed}: node {j} lacks {id:?} that node {i} holds"
                    );
                }
            }
        }
        if !forked {
            assert_eq!(n.forks, 0, "seed {seed}: a fork without a restore");
        }
    }
    (
        honest.iter().any(|&i| nodes[i].forks > 0),
        honest.iter().map(|&i| nodes[i].refused).sum(),
    )
}
