//! Log shipping between homes through export files: convergence under random, partial and
//! duplicated exchanges with concurrent writers; cut, damaged and forged files; forks.

use std::collections::{BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spool::event::{self, Event, EventId, Hash, Origin};
use spool::input::{new_event, AppendRequest, NewEvent};
use spool::log::{Filter, Log, LogError, LogOptions, Refusal};
use spool::sync::file::{self as shipping, FileError};
use spool::sync::{Selection, Vector};

struct Home {
    dir: tempfile::TempDir,
    log: Log,
}

fn home(n: u8) -> Home {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::create(
        &dir.path().join("log.redb"),
        Origin([n; 16]),
        LogOptions::default(),
    )
    .unwrap();
    Home { dir, log }
}

fn activity(message: &str) -> NewEvent {
    new_event(AppendRequest {
        kind: "activity.logged".into(),
        stream: "board".into(),
        actor: "test".into(),
        data: serde_json::json!({ "message": message }),
        key: None,
        correlation: None,
        causation: None,
    })
    .unwrap()
}

fn export(log: &Log, selection: &Selection) -> Vec<u8> {
    shipping::export(&log.read().unwrap(), selection, Vec::new(), None, |_| {})
        .unwrap()
        .1
}

fn ingest(log: &Log, file: &[u8]) -> shipping::IngestSummary {
    shipping::ingest(log, file, |_| {}).unwrap()
}

fn vector(log: &Log) -> Vector {
    Vector(
        log.read()
            .unwrap()
            .heads()
            .unwrap()
            .iter()
            .map(|h| (h.origin, h.seq))
            .collect(),
    )
}

type Seen = (EventId, Hash, Hash, Vec<event::Dep>);

/// Every event, in position order: (id, hash, prev, deps).
fn events(log: &Log) -> Vec<Seen> {
    events_of(&log.read().unwrap())
}

fn events_of(reader: &spool::log::Reader) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = reader.scan(after, 1000, &Filter::default()).unwrap();
        let Some(last) = page.last_examined else {
            return out;
        };
        for r in &page.records {
            let e = r.event();
            out.push((e.id(), r.hash, e.prev(), e.deps()));
        }
        after = last;
    }
}

/// No event sits before its predecessor or any of its deps, and the heads agree.
fn check_causal_order(log: &Log) {
    // One snapshot: the homes' writers run concurrently.
    let reader = log.read().unwrap();
    let mut seen: HashMap<EventId, Hash> = HashMap::new();
    let mut heads = Vector::default();
    for (id, hash, prev, deps) in events_of(&reader) {
        if id.seq > 1 {
            let before = EventId {
                origin: id.origin,
                seq: id.seq - 1,
            };
            assert_eq!(
                seen.get(&before),
                Some(&prev),
                "{id:?} before its predecessor"
            );
        } else {
            assert_eq!(prev, Hash::ZERO);
        }
        for d in deps {
            let dep = EventId {
                origin: d.origin,
                seq: d.seq,
            };
            assert!(seen.contains_key(&dep), "{id:?} before its dep {dep:?}");
        }
        seen.insert(id, hash);
        heads.0.insert(id.origin, id.seq);
    }
    let stored = reader
        .heads()
        .unwrap()
        .iter()
        .map(|h| (h.origin, h.seq))
        .collect();
    assert_eq!(heads, Vector(stored));
}

fn event_set(log: &Log) -> BTreeSet<(EventId, Hash)> {
    events(log).into_iter().map(|(id, h, ..)| (id, h)).collect()
}

#[test]
fn three_homes_writing_and_exchanging_at_random_converge() {
    let (mut waited, mut cut) = (0, 0);
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let homes: Vec<Home> = (1..=3).map(home).collect();
        for round in 0..12 {
            // Every home writes while files move between them.
            std::thread::scope(|scope| {
                for (i, h) in homes.iter().enumerate() {
                    let n = rng.random_range(1..40);
                    scope.spawn(move || {
                        for k in 0..n {
                            let batch = (0..1 + k % 3)
                                .map(|j| activity(&format!("{seed}/{round}/{i}/{k}/{j}")))
                                .collect();
                            h.log.append(batch).unwrap();
                        }
                    });
                }
                for _ in 0..3 {
                    let from = rng.random_range(0..3);
                    let to = (from + rng.random_range(1..3)) % 3;
                    let selection = random_selection(&mut rng, &homes[from].log, &homes[to].log);
                    let mut file = export(&homes[from].log, &selection);
                    if rng.random_bool(0.25) {
                        let cut = rng.random_range(16..file.len());
                        file.truncate(cut);
                    }
                    let summary = ingest(&homes[to].log, &file);
                    assert!(summary.refused.is_none(), "{:?}", summary.refused);
                    waited += summary.report.waiting;
                    cut += u64::from(summary.file_error.is_some());
                    check_causal_order(&homes[to].log);
                    if rng.random_bool(0.3) {
                        let again = ingest(&homes[to].log, &file);
                        assert_eq!(again.report.applied, 0, "a second ingest changes nothing");
                        check_causal_order(&homes[to].log);
                    }
                }
            });
        }
        // Full exchange until everyone has everything.
        for _ in 0..2 {
            for from in 0..3 {
                for to in 0..3 {
                    if from != to {
                        let file = export(&homes[from].log, &Selection::default());
                        let summary = ingest(&homes[to].log, &file);
                        assert!(summary.file_error.is_none() && summary.refused.is_none());
                        check_causal_order(&homes[to].log);
                    }
                }
            }
        }
        let sets: Vec<_> = homes.iter().map(|h| event_set(&h.log)).collect();
        let vectors: Vec<_> = homes.iter().map(|h| vector(&h.log)).collect();
        assert_eq!(vectors[0].0.len(), 3);
        for i in 1..3 {
            assert_eq!(sets[i], sets[0], "seed {seed}: home {i} holds other events");
            assert_eq!(vectors[i], vectors[0], "seed {seed}");
        }
        for h in &homes {
            let reader = h.log.read().unwrap();
            assert_eq!(reader.pending().unwrap(), 0);
            assert!(reader.forks().unwrap().is_empty());
            assert!(h.log.verify(2).unwrap().ok());
        }
    }
    assert!(
        waited > 0 && cut > 0,
        "the exchanges made events wait ({waited}) and cut files ({cut})"
    );
}

/// All of `from`, or what `to` lacks, or one origin's, or what an older vector lacks.
fn random_selection(rng: &mut StdRng, from: &Log, to: &Log) -> Selection {
    match rng.random_range(0..4) {
        0 => Selection::default(),
        1 => Selection {
            since: vector(to),
            ..Selection::default()
        },
        2 => Selection {
            origins: vec![Origin([rng.random_range(1..=3u8); 16])],
            ..Selection::default()
        },
        _ => {
            let mut since = vector(from);
            for seq in since.0.values_mut() {
                *seq = rng.random_range(0..=*seq);
            }
            Selection {
                since,
                ..Selection::default()
            }
        }
    }
}

#[test]
fn events_wait_durably_for_their_dependencies() {
    let (a, b, c) = (home(1), home(2), home(3));
    a.log.append(vec![activity("a1")]).unwrap();
    ingest(&b.log, &export(&a.log, &Selection::default()));
    b.log.append(vec![activity("b1 after a1")]).unwrap();
    // c gets b's event alone: it depends on a1, so it waits, across a reopen.
    let only_b = Selection {
        origins: vec![Origin([2; 16])],
        ..Selection::default()
    };
    let summary = ingest(&c.log, &export(&b.log, &only_b));
    assert_eq!(
        (
            summary.report.applied,
            summary.report.waited,
            summary.report.waiting
        ),
        (0, 1, 1)
    );
    let path = c.dir.path().join("log.redb");
    drop(c.log);
    let c_log = Log::open(&path, Origin([3; 16]), LogOptions::default()).unwrap();
    assert_eq!(c_log.read().unwrap().pending().unwrap(), 1);
    let summary = ingest(&c_log, &export(&a.log, &Selection::default()));
    assert_eq!(
        (summary.report.applied, summary.report.released),
        (1, 1),
        "a1, then b1 released"
    );
    assert_eq!(c_log.read().unwrap().pending().unwrap(), 0);
    check_causal_order(&c_log);
    // c's next own event names what it applied.
    c_log.append(vec![activity("c1")]).unwrap();
    let (_, _, _, deps) = events(&c_log).pop().unwrap();
    let named: BTreeSet<_> = deps.iter().map(|d| (d.origin, d.seq)).collect();
    assert_eq!(
        named,
        [(Origin([1; 16]), 1), (Origin([2; 16]), 1)]
            .into_iter()
            .collect()
    );
}

#[test]
fn the_clock_moves_past_every_ingested_stamp() {
    // A peer's clock runs 30 s ahead (inside the allowed drift): after ingesting its event, this
    // node's next event must be stamped after it, although its own clock says earlier.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ahead = (now_ms + 30_000) << 16;
    let mut peer_event = {
        let a = home(1);
        a.log.append(vec![activity("a1")]).unwrap();
        let event = a
            .log
            .read()
            .unwrap()
            .get(1)
            .unwrap()
            .unwrap()
            .event()
            .to_event();
        event
    };
    peer_event.hlc = ahead;
    let b = home(2);
    let s = ingest(&b.log, &file_of(&[peer_event]));
    assert_eq!((s.report.applied, s.report.clamped), (1, 0));
    b.log.append(vec![activity("b1")]).unwrap();
    let reader = b.log.read().unwrap();
    let own = reader.get(2).unwrap().unwrap();
    assert_eq!(own.event().origin(), Origin([2; 16]));
    assert!(
        own.event().hlc() > ahead,
        "the clock moved past the ingested stamp"
    );
}

#[test]
fn a_cut_file_applies_its_valid_prefix_and_says_where_it_stopped() {
    let (a, b) = (home(1), home(2));
    for i in 0..50 {
        a.log.append(vec![activity(&format!("{i}"))]).unwrap();
    }
    let file = export(&a.log, &Selection::default());
    let cut = &file[..file.len() * 2 / 3];
    let summary = ingest(&b.log, cut);
    let Some(FileError::Truncated { offset, frames }) = summary.file_error else {
        panic!("{:?}", summary.file_error)
    };
    assert!(frames > 0 && frames < 50);
    assert!(offset < cut.len() as u64);
    assert_eq!(summary.report.applied, frames);
    assert_eq!(vector(&b.log).seq(Origin([1; 16])), frames);
    // The whole file later completes it; twice changes nothing more.
    assert_eq!(ingest(&b.log, &file).report.applied, 50 - frames);
    let again = ingest(&b.log, &file);
    assert_eq!((again.report.applied, again.report.duplicates), (0, 50));
    assert!(b.log.verify(2).unwrap().ok());
}

/// Frames of a file: (offset of the frame, length of its event bytes).
fn frames(file: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 16;
    loop {
        let len = u32::from_le_bytes(file[at..at + 4].try_into().unwrap());
        if len == u32::MAX {
            return out;
        }
        out.push((at, len as usize));
        at += 4 + 32 + len as usize;
    }
}

/// A file of one event, hashed and framed correctly.
fn file_of(events: &[Event]) -> Vec<u8> {
    let mut w = shipping::ExportWriter::new(Vec::new()).unwrap();
    for e in events {
        let bytes = event::encode(e);
        w.push(&Hash::of(&bytes), &bytes).unwrap();
    }
    w.finish().unwrap().1
}

#[test]
fn forged_events_are_refused_by_name_and_nothing_stored_is_lost() {
    let (a, b) = (home(1), home(2));
    for i in 0..5 {
        a.log.append(vec![activity(&format!("{i}"))]).unwrap();
    }
    let file = export(&a.log, &Selection::default());
    ingest(
        &b.log,
        &export(
            &a.log,
            &Selection {
                since: Vector::default(),
                origins: vec![],
            },
        ),
    );
    b.log.append(vec![activity("b1")]).unwrap();
    let before = event_set(&b.log);
    let third = frames(&file)[2];

    // A changed byte in an event: its bytes no longer hash to the frame's hash.
    let mut changed = file.clone();
    changed[third.0 + 36 + third.1 / 2] ^= 0x40;
    let fresh = home(3);
    let s = ingest(&fresh.log, &changed);
    let Some(FileError::Damaged {
        offset,
        index,
        problem,
    }) = &s.file_error
    else {
        panic!("{:?}", s.file_error)
    };
    assert_eq!((*offset, *index), (third.0 as u64, 2));
    assert!(problem.contains("hash mismatch"), "{problem}");
    assert_eq!(s.report.applied, 2, "the two frames before it are applied");

    // A changed hash: the frame claims another hash.
    let mut rehashed = file.clone();
    rehashed[third.0 + 4] ^= 1;
    let s = ingest(&home(4).log, &rehashed);
    assert!(matches!(
        s.file_error,
        Some(FileError::Damaged { index: 2, .. })
    ));

    let stored: Vec<Event> = {
        let reader = a.log.read().unwrap();
        (1..=5)
            .map(|p| reader.get(p).unwrap().unwrap().event().to_event())
            .collect()
    };
    // A wrong chain link: a well-formed, well-hashed sixth event naming another predecessor.
    let mut forged = stored[4].clone();
    forged.seq = 6;
    forged.prev = Hash([7; 32]);
    let s = ingest(&b.log, &file_of(&[forged]));
    let (_, refused) = s.refused.expect("refused");
    assert!(
        matches!(refused.reason, Refusal::BrokenLink { .. }),
        "{refused:?}"
    );
    assert_eq!(refused.id.seq, 6);

    // A spoofed origin: another node's event presented as a's.
    let c = home(3);
    c.log.append(vec![activity("c1"), activity("c2")]).unwrap();
    let mut spoofed = c
        .log
        .read()
        .unwrap()
        .get(2)
        .unwrap()
        .unwrap()
        .event()
        .to_event();
    spoofed.origin = Origin([1; 16]);
    spoofed.seq = 6;
    let s = ingest(&b.log, &file_of(&[spoofed.clone()]));
    assert!(matches!(
        s.refused.unwrap().1.reason,
        Refusal::BrokenLink { .. }
    ));
    spoofed.seq = 3;
    let s = ingest(&b.log, &file_of(&[spoofed]));
    assert!(matches!(s.refused.unwrap().1.reason, Refusal::Fork { .. }));

    // Nothing stored changed, and the refused events are kept as evidence.
    assert_eq!(event_set(&b.log), before);
    let reader = b.log.read().unwrap();
    assert!(!reader.forks().unwrap().is_empty());
    let report = b.log.verify(2).unwrap();
    assert!(!report.ok(), "verify reports the fork evidence");
    assert!(report
        .problems
        .iter()
        .all(|p| p.to_string().starts_with("fork")));
}

#[test]
fn a_stale_home_recovers_its_own_events_or_stops_writing_on_a_fork() {
    let a = home(1);
    for i in 0..3 {
        a.log.append(vec![activity(&format!("a{i}"))]).unwrap();
    }
    // A copy of the home taken now, while a writes on.
    let copy = tempfile::tempdir().unwrap();
    let backup = copy.path().join("log.redb");
    let path = a.dir.path().join("log.redb");
    let origin = a.log.origin();
    drop(a.log);
    std::fs::copy(&path, &backup).unwrap();
    let a_log = Log::open(&path, origin, LogOptions::default()).unwrap();
    a_log.append(vec![activity("a3"), activity("a4")]).unwrap();
    let a_file = export(&a_log, &Selection::default());

    // Restored and synced before writing: it takes its own seqs 4 and 5 back, then continues.
    let restored_dir = tempfile::tempdir().unwrap();
    let restored_path = restored_dir.path().join("log.redb");
    std::fs::copy(&backup, &restored_path).unwrap();
    let restored = Log::open(&restored_path, origin, LogOptions::default()).unwrap();
    assert_eq!(ingest(&restored, &a_file).report.applied, 2);
    let next = restored.append(vec![activity("a5")]).unwrap();
    assert_eq!(next[0].seq, 6);
    drop(restored);

    // Restored and written to first: its seq 4 differs from the fleet's, so ingest finds a fork
    // of its own origin and its own writes stop, across a reopen.
    let stale = Log::open(&backup, origin, LogOptions::default()).unwrap();
    stale
        .append(vec![activity("a3 again, differently")])
        .unwrap();
    let s = ingest(&stale, &a_file);
    let (_, refused) = s.refused.expect("refused");
    assert!(
        matches!(refused.reason, Refusal::OwnFork { .. }),
        "{refused:?}"
    );
    let err = stale.append(vec![activity("more")]).unwrap_err();
    assert!(matches!(err, LogError::Halted { .. }), "{err}");
    drop(stale);
    let stale = Log::open(&backup, origin, LogOptions::default()).unwrap();
    assert!(stale.read().unwrap().halted().unwrap().is_some());
    assert!(matches!(
        stale.append(vec![activity("more")]),
        Err(LogError::Halted { .. })
    ));

    // The fleet's copy refuses the stale home's seq 4 as a fork, and keeps it as evidence.
    let stale_file = export(&stale, &Selection::default());
    let s = ingest(&a_log, &stale_file);
    assert!(matches!(
        s.refused.unwrap().1.reason,
        Refusal::OwnFork { .. }
    ));
    let peer = home(9);
    ingest(&peer.log, &a_file);
    let s = ingest(&peer.log, &stale_file);
    assert!(matches!(s.refused.unwrap().1.reason, Refusal::Fork { .. }));
    assert_eq!(peer.log.read().unwrap().forks().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Issue 24: keyed homes in a fleet. Every export is signed; only members' events are taken.

/// A keyed node home, as `spool init` makes it, with its log open.
struct Member {
    /// Kept for the home's lifetime.
    _dir: tempfile::TempDir,
    home: spool::home::Home,
    key: spool::identity::NodeKey,
    log: Option<Log>,
}

impl Member {
    fn new(label: &str) -> Member {
        let dir = tempfile::tempdir().unwrap();
        let home = spool::home::Home::init(&dir.path().join("home"), label).unwrap();
        let key = home.node_key().unwrap().unwrap();
        let log = Some(home.open_log().unwrap());
        Member {
            _dir: dir,
            home,
            key,
            log,
        }
    }

    fn log(&self) -> &Log {
        self.log.as_ref().unwrap()
    }

    fn origin(&self) -> Origin {
        self.home.origin()
    }

    /// Its whole log as an export file, its own heads signed.
    fn export(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let reader = self.log().read().unwrap();
        shipping::export(
            &reader,
            &Selection::default(),
            &mut out,
            Some(&self.key),
            |_| {},
        )
        .unwrap();
        out
    }

    fn write(&self, message: &str) {
        self.log().append(vec![activity(message)]).unwrap();
    }

    fn admit(&self, other: &Member) {
        self.device_event(
            "device.paired",
            other,
            serde_json::json!({"device_id": other.origin().to_hex(), "label": "m",
                "capabilities": ["sync"], "signing_public_key": other.key.public().to_hex(),
                "pairing_id": null}),
        );
    }

    fn revoke(&self, other: &Member) {
        self.device_event(
            "device.revoked",
            other,
            serde_json::json!({"device_id": other.origin().to_hex(), "reason": "stolen"}),
        );
    }

    fn device_event(&self, kind: &str, other: &Member, data: serde_json::Value) {
        let request = AppendRequest {
            kind: kind.into(),
            stream: format!("device/{}", other.origin()),
            actor: "test".into(),
            data,
            key: None,
            correlation: None,
            causation: None,
        };
        self.log()
            .append(vec![new_event(request).unwrap()])
            .unwrap();
    }

    /// Joins `root`'s fleet by ingesting `file` (as `spool fleet join` does).
    fn join(&mut self, root: Origin, file: &[u8]) {
        drop(self.log.take());
        self.home.join_fleet(root).unwrap();
        self.log = Some(self.home.open_log().unwrap());
        let s = ingest(self.log(), file);
        assert!(s.stopped().is_none(), "{:?}", s.stopped());
    }

    /// Everything the log holds or keeps: events, evidence, forks.
    fn stored(&self) -> (BTreeSet<(EventId, Hash)>, usize, usize) {
        let reader = self.log().read().unwrap();
        (
            event_set(self.log()),
            reader.refused().unwrap().len(),
            reader.forks().unwrap().len(),
        )
    }
}

/// A root and `n` members admitted by it, each joined by the root's export.
fn fleet(n: usize) -> Vec<Member> {
    let mut all: Vec<Member> = (0..=n).map(|i| Member::new(&format!("m{i}"))).collect();
    for other in &all[1..] {
        all[0].admit(other);
    }
    let (file, root) = (all[0].export(), all[0].origin());
    for member in &mut all[1..] {
        member.join(root, &file);
    }
    all
}

/// `from`'s whole log into `to`.
fn send(from: &Member, to: &Member) -> shipping::IngestSummary {
    ingest(to.log(), &from.export())
}

/// An export file's frames: hash, stored bytes, and the signed head after it (key, signature).
type Framed = (Hash, Vec<u8>, Option<([u8; 32], [u8; 64])>);

fn read_frames(file: &[u8]) -> Vec<Framed> {
    let mut reader = shipping::ExportReader::new(file).unwrap();
    let mut out = Vec::new();
    while let Some(frame) = reader.next_frame().unwrap() {
        let s = frame.shipped;
        out.push((
            s.meta.hash,
            s.bytes,
            s.signed.map(|signed| (signed.0 .0, signed.1)),
        ));
    }
    out
}

/// A file of these frames; each head names the event before it, with the key and signature
/// given (a forger's choice).
fn write_frames(frames: &[Framed]) -> Vec<u8> {
    let mut w = shipping::ExportWriter::new(Vec::new()).unwrap();
    for (hash, bytes, head) in frames {
        w.push(hash, bytes).unwrap();
        if let Some((key, signature)) = head {
            let id = event::decode(bytes).unwrap().id();
            let head = spool::identity::SignedHead {
                origin: id.origin,
                seq: id.seq,
                hash: *hash,
                signature: *signature,
            };
            w.push_head(&spool::identity::PublicKey(*key), &head)
                .unwrap();
        }
    }
    w.finish().unwrap().1
}

/// The event after `last` in its origin's chain, as a forger who knows its hash writes it.
fn extend(last: &Framed, message: &str) -> (Event, Hash, Vec<u8>) {
    let mut e = event::decode(&last.1).unwrap().to_event();
    e.seq += 1;
    e.prev = last.0;
    e.signer = None;
    e.payload = spool::kinds::lookup("activity.logged")
        .unwrap()
        .encode(&serde_json::json!({ "message": message }))
        .unwrap();
    let bytes = event::encode(&e);
    (e, Hash::of(&bytes), bytes)
}

/// `frames`, then `e` under a head `by` signed over it.
fn signed_after(frames: &[Framed], by: &Member, e: &Event) -> Vec<u8> {
    let bytes = event::encode(e);
    let hash = Hash::of(&bytes);
    let signature = by.key.sign_head(e.seq, hash).signature;
    let mut frames = frames.to_vec();
    frames.push((hash, bytes, Some((by.key.public().0, signature))));
    write_frames(&frames)
}

/// Ingests `file` into `to` and insists it is refused saying `said`, with nothing stored
/// changed but one more piece of evidence kept.
fn refused_by_name(to: &Member, file: &[u8], said: &str) {
    let (events, evidence, forks) = to.stored();
    let s = ingest(to.log(), file);
    let why = s.stopped().unwrap_or_else(|| panic!("taken: {s:?}"));
    assert!(why.contains(said), "{why}");
    let (after, kept, forks_after) = to.stored();
    assert_eq!(after, events, "{said}: nothing stored changed");
    assert!(kept > evidence, "{said}: evidence kept");
    assert_eq!(forks_after, forks);
    let reader = to.log().read().unwrap();
    assert!(reader.halted().unwrap().is_none(), "{said}: never halts");
    assert!(to.log().verify(1).unwrap().ok(), "{said}: verify passes");
}

#[test]
fn forged_re_signed_non_member_and_malformed_events_are_refused_by_name() {
    let all = fleet(2);
    let (a, b, c) = (&all[0], &all[1], &all[2]);
    for i in 0..3 {
        a.write(&format!("a{i}"));
    }
    send(a, c);
    let genuine = read_frames(&a.export());
    let last = genuine.last().unwrap().clone();

    // A forged event: a4 extends a's chain, with no signature.
    let (_, hash, bytes) = extend(&last, "a forged order");
    let mut frames = genuine.clone();
    frames.push((hash, bytes, None));
    refused_by_name(c, &write_frames(&frames), "no signed head covers them");

    // A forged signature: a's key, a signature that is not a's over a4.
    let (_, hash, bytes) = extend(&last, "a second forged order");
    let mut frames = genuine.clone();
    let mut signature = last.2.unwrap().1;
    signature[5] ^= 1;
    frames.push((hash, bytes, Some((a.key.public().0, signature))));
    refused_by_name(c, &write_frames(&frames), "a forged or damaged signed head");

    // Re-signed by another member (b), who can sign only as itself.
    let (_, hash, bytes) = extend(&last, "a third forged order");
    let mut frames = genuine.clone();
    let b_head = b.key.sign_head(4, hash);
    frames.push((hash, bytes, Some((b.key.public().0, b_head.signature))));
    refused_by_name(c, &write_frames(&frames), "is bound to origin");

    // An origin no member admitted: its own signed export is refused whole.
    let stranger = Member::new("stranger");
    stranger.write("let me in");
    refused_by_name(c, &stranger.export(), "is not a member of this fleet");

    // Seq 0 and too many deps, from a member, signed: refused before they reach the log.
    let (mut e, _, _) = extend(&last, "seq zero");
    e.seq = 0;
    refused_by_name(c, &signed_after(&genuine, a, &e), "seq: must be 1 or more");
    let (mut e, _, _) = extend(&last, "too many deps");
    e.deps = (0..=event::DEPS_MAX as u16)
        .map(|i| {
            let mut origin = [1u8; 16];
            origin[..2].copy_from_slice(&i.to_le_bytes());
            event::Dep {
                origin: Origin(origin),
                seq: 1,
            }
        })
        .collect();
    refused_by_name(
        c,
        &signed_after(&genuine, a, &e),
        "deps: names more origins",
    );

    // The evidence is listed, each with its reason.
    let kept = c.log().read().unwrap().refused().unwrap();
    assert!(
        kept.iter().any(|e| e.reason.contains("not a member")),
        "{kept:?}"
    );
    assert!(kept.iter().all(|e| !e.reason.is_empty()));
    // And the genuine events still flow.
    a.write("a3");
    let s = send(a, c);
    assert!(s.stopped().is_none(), "{:?}", s.stopped());
    assert_eq!(s.report.applied, 1);
}

#[test]
fn a_revoked_origins_later_events_relayed_by_a_third_node_are_refused() {
    let all = fleet(2);
    let (a, b, c) = (&all[0], &all[1], &all[2]);
    b.write("b1");
    send(b, a);
    send(b, c);
    // a revokes b, having seen b1: b1 stays valid, what b writes after it does not.
    a.revoke(b);
    b.write("b2 after the revocation");
    // c has not heard of the revocation: it takes b2 and relays it to a.
    let s = send(b, c);
    assert_eq!(s.report.applied, 1);
    refused_by_name(a, &c.export(), "was revoked by origin");
    let kept = a.log().read().unwrap().refused().unwrap();
    assert!(kept
        .iter()
        .any(|e| e.id.origin == b.origin() && e.id.seq == 2));
    // Once c has the revocation, it refuses b's later events too.
    let before = c.stored().0;
    let s = ingest(c.log(), &write_frames(&read_frames(&a.export())));
    assert!(s.stopped().is_none(), "{:?}", s.stopped());
    b.write("b3");
    refused_by_name(c, &b.export(), "only its events up to seq 1 are taken");
    assert!(
        c.stored().0.len() > before.len(),
        "the revocation itself was taken"
    );
    // b learns of its revocation: its own writes stop, by name.
    send(a, b);
    let err = b.log().append(vec![activity("b4")]).unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
}

#[test]
fn a_genuine_own_fork_still_halts_and_a_forged_one_does_not() {
    let mut all = fleet(1);
    all[1].write("b1");
    // A backup of b's home, restored after b wrote b2: the restored home writes its own b2.
    drop(all[1].log.take());
    let backup = tempfile::tempdir().unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    copy(all[1].home.dir(), &backup.path().join("home"));
    all[1].log = Some(all[1].home.open_log().unwrap());
    all[1].write("b2");
    let restored_home = spool::home::Home::open(&backup.path().join("home")).unwrap();
    let restored = Member {
        key: restored_home.node_key().unwrap().unwrap(),
        log: Some(restored_home.open_log().unwrap()),
        home: restored_home,
        _dir: backup,
    };
    restored.write("b2, written again by the restored copy");
    // b's own export, signed by b's key, reaches the restored copy: the same key signed two
    // events at seq 2. That is a genuine fork of its own origin: its writes stop.
    let s = send(&all[1], &restored);
    let (_, refused) = s.refused.expect("refused");
    assert!(
        matches!(refused.reason, Refusal::OwnFork { .. }),
        "{refused:?}"
    );
    let err = restored.log().append(vec![activity("more")]).unwrap_err();
    assert!(matches!(err, LogError::Halted { .. }), "{err}");
    // The forged kind (an own event re-hashed, no signature for it) stops nothing.
    let genuine = read_frames(&all[1].export());
    let mut forged = genuine.clone();
    let (_, hash, bytes) = extend(&genuine[genuine.len() - 2], "forged b2");
    forged.push((hash, bytes, None));
    refused_by_name(
        &all[1],
        &write_frames(&forged),
        "no signed head covers them",
    );
    all[1].write("b3");
}
