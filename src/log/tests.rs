use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::*;
use crate::input::parse_request;

fn activity(stream: &str, message: &str, key: Option<&str>) -> NewEvent {
    let key = key.map(|k| format!(r#","key":"{k}""#)).unwrap_or_default();
    parse_request(&format!(
        r#"{{"kind":"activity.logged","stream":"{stream}","actor":"test","data":{{"message":"{message}"}}{key}}}"#
    ))
    .unwrap()
}

fn origin() -> Origin {
    Origin([0x11; 16])
}

fn temp_log() -> (tempfile::TempDir, Log) {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::create(
        &dir.path().join("log.redb"),
        origin(),
        LogOptions::default(),
    )
    .unwrap();
    (dir, log)
}

#[test]
fn appends_chain_and_read_back() {
    let (_dir, log) = temp_log();
    let a = log.append(vec![activity("s1", "one", None)]).unwrap();
    let b = log
        .append(vec![
            activity("s2", "two", None),
            activity("s1", "three", None),
        ])
        .unwrap();
    assert_eq!((a[0].seq, a[0].position), (1, 1));
    assert_eq!(
        b.iter().map(|x| (x.seq, x.position)).collect::<Vec<_>>(),
        [(2, 2), (3, 3)]
    );
    let reader = log.read().unwrap();
    let all = reader.scan(0, 100, &Filter::default()).unwrap().records;
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].event().prev(), Hash::ZERO);
    assert_eq!(all[1].event().prev(), all[0].hash);
    assert_eq!(all[2].event().prev(), all[1].hash);
    assert!(all[0].event().hlc() < all[1].event().hlc());
    let s1 = Filter {
        stream: Some("s1".into()),
        ..Filter::default()
    };
    let positions: Vec<u64> = reader
        .scan(0, 100, &s1)
        .unwrap()
        .records
        .iter()
        .map(|r| r.position)
        .collect();
    assert_eq!(positions, [1, 3]);
    assert_eq!(reader.scan(1, 100, &s1).unwrap().records.len(), 1);
    assert_eq!(
        reader.heads().unwrap(),
        vec![Head {
            origin: origin(),
            seq: 3,
            hash: all[2].hash
        }]
    );
    assert_eq!(
        reader
            .position_of(EventId {
                origin: origin(),
                seq: 2
            })
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        reader
            .position_of(EventId {
                origin: origin(),
                seq: 4
            })
            .unwrap(),
        None
    );
    assert!(log.verify(2).unwrap().ok());
}

#[test]
fn an_idempotency_key_writes_once() {
    let (_dir, log) = temp_log();
    let first = log.append(vec![activity("s", "m", Some("k1"))]).unwrap()[0];
    let again = log.append(vec![activity("s", "m", Some("k1"))]).unwrap()[0];
    assert!(!first.existing && again.existing);
    assert_eq!(
        (again.position, again.hash, again.seq),
        (first.position, first.hash, first.seq)
    );
    // The same key twice inside one batch: the second is the first.
    let batch = log
        .append(vec![
            activity("s", "a", Some("k2")),
            activity("s", "a", Some("k2")),
        ])
        .unwrap();
    assert_eq!(batch[0].position, batch[1].position);
    assert!(batch[1].existing);
    assert_eq!(log.read().unwrap().len().unwrap(), 2);
}

#[test]
fn held_events_answer_keys_and_reads_before_and_after_they_reach_redb() {
    let disk = Disks::default();
    let options = LogOptions {
        held_events_max: 4,
        ..LogOptions::default()
    };
    let log = log_on(&disk, true, options.clone());
    let mut acked = log.append(vec![activity("s", "k", Some("k1"))]).unwrap();
    // Held: the key answers from memory, and a different request under it is refused.
    let again = log.append(vec![activity("s", "k", Some("k1"))]).unwrap()[0];
    assert!(again.existing);
    assert_eq!(
        (again.position, again.hash),
        (acked[0].position, acked[0].hash)
    );
    let refused = log.append(vec![activity("s", "other", Some("k1"))]);
    assert!(matches!(refused, Err(LogError::KeyConflict { index: 0 })));
    // Five more: the fourth held event commits them, two stay held.
    for i in 0..5 {
        acked.extend(
            log.append(vec![activity("s", &format!("m{i}"), None)])
                .unwrap(),
        );
    }
    let again = log.append(vec![activity("s", "k", Some("k1"))]).unwrap()[0];
    assert_eq!(
        (again.position, again.hash),
        (acked[0].position, acked[0].hash)
    );
    // A large group (past a segment record) commits what is held first, then itself.
    let large: Vec<NewEvent> = (0..3)
        .map(|i| activity("s", &format!("{i}{}", "x".repeat(30_000)), None))
        .collect();
    acked.extend(log.append(large).unwrap());
    acked.extend(log.append(vec![activity("s", "last", Some("k2"))]).unwrap());
    let check = |log: &Log, acked: &[Appended]| {
        let reader = log.read().unwrap();
        assert_eq!(reader.len().unwrap(), acked.len() as u64);
        for (i, a) in acked.iter().enumerate() {
            assert_eq!(a.position, i as u64 + 1);
            let record = reader.get(a.position).unwrap().unwrap();
            assert_eq!((record.hash, record.event().seq()), (a.hash, a.seq));
        }
        assert!(log.verify(1).unwrap().ok());
    };
    check(&log, &acked);
    let again = log.append(vec![activity("s", "last", Some("k2"))]).unwrap()[0];
    assert!(again.existing);
    acked.extend(log.append(vec![activity("s", "after", None)]).unwrap());
    // A clean close commits what is held, and a power cut after it keeps all of it.
    drop(log);
    let disk = disk.after_crash();
    let log = log_on(&disk, false, options);
    check(&log, &acked);
    let again = log.append(vec![activity("s", "k", Some("k1"))]).unwrap()[0];
    assert_eq!(
        (again.position, again.hash),
        (acked[0].position, acked[0].hash)
    );
}

#[test]
fn a_pairing_is_never_held_so_the_fleet_reads_it_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let root = crate::identity::NodeKey::generate();
    let log = Log::create(
        &dir.path().join("log.redb"),
        root.origin(),
        LogOptions {
            signer: Some(root.public().0),
            fleet_root: Some(root.origin()),
            ..LogOptions::default()
        },
    )
    .unwrap();
    let first = log.append(vec![activity("s", "held", None)]).unwrap()[0];
    let peer = crate::identity::NodeKey::generate();
    let paired = parse_request(&format!(
        r#"{{"kind":"device.paired","stream":"device/{o}","actor":"test","data":{{"device_id":"{o}","label":"peer","capabilities":["sync"],"signing_public_key":"{k}","pairing_id":null}}}}"#,
        o = peer.origin().to_hex(),
        k = peer.public().to_hex(),
    ))
    .unwrap();
    log.append(vec![paired]).unwrap();
    // `Log::fleet` reads what redb holds, without asking the writer: the pairing and what was
    // held before it are there.
    let fleet = log.fleet().unwrap().unwrap();
    assert!(fleet.member(peer.origin()).is_some());
    let reader = Reader {
        txn: log.db.begin_read().unwrap(),
    };
    assert_eq!(
        reader.get(first.position).unwrap().unwrap().hash,
        first.hash
    );
    assert_eq!(reader.len().unwrap(), 2);
}

#[test]
fn a_key_reused_for_a_different_request_is_refused_whole() {
    let (_dir, log) = temp_log();
    log.append(vec![activity("s", "m", Some("k1"))]).unwrap();
    // Against a stored event: another message, another stream.
    for other in [
        activity("s", "other", Some("k1")),
        activity("t", "m", Some("k1")),
    ] {
        let refused = log.append(vec![activity("s", "fresh", None), other]);
        assert!(
            matches!(refused, Err(LogError::KeyConflict { index: 1 })),
            "{refused:?}"
        );
    }
    // Inside one batch.
    let refused = log.append(vec![
        activity("s", "a", Some("k2")),
        activity("s", "b", Some("k2")),
    ]);
    assert!(matches!(refused, Err(LogError::KeyConflict { index: 1 })));
    // Nothing of a refused batch was written, and the key k2 is still free.
    assert_eq!(log.read().unwrap().len().unwrap(), 1);
    let k2 = log.append(vec![activity("s", "b", Some("k2"))]).unwrap()[0];
    assert!(!k2.existing);
    assert!(log.verify(2).unwrap().ok());
}

#[test]
fn reopening_continues_seq_position_and_clock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let last_hlc = {
        let log = Log::create(&path, origin(), LogOptions::default()).unwrap();
        log.append(vec![activity("s", "a", None), activity("t", "b", None)])
            .unwrap();
        let reader = log.read().unwrap();
        reader.get(2).unwrap().unwrap().event().hlc()
    };
    let log = Log::open(&path, origin(), LogOptions::default()).unwrap();
    let c = log.append(vec![activity("s", "c", None)]).unwrap()[0];
    assert_eq!((c.seq, c.position), (3, 3));
    let reader = log.read().unwrap();
    assert!(reader.get(3).unwrap().unwrap().event().hlc() > last_hlc);
    assert_eq!(reader.stream_positions("s", 0, 10).unwrap(), [1, 3]);
    assert!(log.verify(1).unwrap().ok());
}

#[test]
fn opening_checks_format_node_and_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    assert!(matches!(
        Log::open(&path, origin(), LogOptions::default()),
        Err(LogError::NotALog { .. })
    ));
    std::fs::write(&path, b"not a database at all").unwrap();
    assert!(matches!(
        Log::open(&path, origin(), LogOptions::default()),
        Err(LogError::NotALog { .. })
    ));
    std::fs::remove_file(&path).unwrap();
    let log = Log::create(&path, origin(), LogOptions::default()).unwrap();
    assert!(matches!(
        Log::create(&path, origin(), LogOptions::default()),
        Err(LogError::Exists { .. })
    ));
    let err = Log::open(&path, origin(), LogOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, LogError::Locked { .. }), "{err}");
    drop(log);
    let other = Origin([0x22; 16]);
    assert!(matches!(
        Log::open(&path, other, LogOptions::default()),
        Err(LogError::WrongNode { .. })
    ));
    // A newer format is refused, not misread.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format", 3u32.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Log::open(&path, origin(), LogOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(err, LogError::NewerFormat { found: 3, .. }),
        "{err}"
    );
}

#[test]
fn concurrent_appenders_share_commits_and_lose_nothing() {
    let (_dir, log) = temp_log();
    let log = Arc::new(log);
    let threads = 8;
    let per_thread = 100;
    let acked: Vec<Appended> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let log = log.clone();
                s.spawn(move || {
                    (0..per_thread)
                        .map(|i| {
                            log.append(vec![activity(&format!("t{t}"), &format!("{i}"), None)])
                                .unwrap()[0]
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut positions: Vec<u64> = acked.iter().map(|a| a.position).collect();
    positions.sort();
    assert_eq!(
        positions,
        (1..=(threads * per_thread) as u64).collect::<Vec<_>>()
    );
    let reader = log.read().unwrap();
    for a in &acked {
        assert_eq!(reader.get(a.position).unwrap().unwrap().hash, a.hash);
    }
    let report = log.verify(2).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.events, (threads * per_thread) as u64);
}

#[test]
fn a_read_begun_after_an_answer_sees_it_while_others_append() {
    let (_dir, log) = temp_log();
    let log = Arc::new(log);
    // Half the threads read after every append, half only append: reads publish held events
    // while groups are being held and committed around them.
    std::thread::scope(|s| {
        for t in 0..6 {
            let log = log.clone();
            s.spawn(move || {
                for i in 0..150 {
                    let key = (i % 10 == 0).then(|| format!("t{t}-{i}"));
                    let event = activity(&format!("t{t}"), &format!("{i}"), key.as_deref());
                    let a = log.append(vec![event]).unwrap()[0];
                    if t % 2 == 0 {
                        let record = log.read().unwrap().get(a.position).unwrap();
                        assert_eq!(record.map(|r| r.hash), Some(a.hash), "t{t} {i}");
                    }
                }
            });
        }
    });
    let report = log.verify(2).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.events, 6 * 150);
}

/// A disk that keeps what was written apart from what a sync made durable, and can fail or hold
/// a sync on demand.
#[derive(Debug, Default)]
struct Disk {
    written: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
    fail_sync: AtomicBool,
    /// A sync panics, as a bug in a commit would.
    panic_sync: AtomicBool,
    hold_sync: Mutex<bool>,
    released: Condvar,
}

impl Disk {
    /// The disk as a power cut leaves it: only what was synced.
    fn after_crash(&self) -> Arc<Disk> {
        let durable = self.durable.lock().unwrap().clone();
        Arc::new(Disk {
            written: Mutex::new(durable.clone()),
            durable: Mutex::new(durable),
            ..Disk::default()
        })
    }
}

#[derive(Debug)]
struct Backend(Arc<Disk>);

impl redb::StorageBackend for Backend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.written.lock().unwrap().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let data = self.0.written.lock().unwrap();
        let start = offset as usize;
        let src = data
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.written.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut held = self.0.hold_sync.lock().unwrap();
        while *held {
            held = self.0.released.wait(held).unwrap();
        }
        if self.0.fail_sync.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        assert!(!self.0.panic_sync.load(Ordering::SeqCst), "injected panic");
        *self.0.durable.lock().unwrap() = self.0.written.lock().unwrap().clone();
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut written = self.0.written.lock().unwrap();
        let end = offset as usize + data.len();
        if written.len() < end {
            written.resize(end, 0);
        }
        written[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// The log's file and its write-ahead segment's, failing or holding their syncs together.
#[derive(Debug, Default)]
struct Disks {
    data: Arc<Disk>,
    wal: Arc<Disk>,
}

impl Disks {
    fn fail_sync(&self, fail: bool) {
        for disk in [&self.data, &self.wal] {
            disk.fail_sync.store(fail, Ordering::SeqCst);
        }
    }

    fn panic_sync(&self, panic: bool) {
        for disk in [&self.data, &self.wal] {
            disk.panic_sync.store(panic, Ordering::SeqCst);
        }
    }

    fn hold_sync(&self, hold: bool) {
        for disk in [&self.data, &self.wal] {
            *disk.hold_sync.lock().unwrap() = hold;
            disk.released.notify_all();
        }
    }

    fn after_crash(&self) -> Disks {
        Disks {
            data: self.data.after_crash(),
            wal: self.wal.after_crash(),
        }
    }
}

fn log_on(disks: &Disks, create: bool, options: LogOptions) -> Log {
    Log::with_backend(
        Backend(disks.data.clone()),
        Backend(disks.wal.clone()),
        Path::new("mem"),
        origin(),
        options,
        create,
    )
    .unwrap()
}

#[test]
fn a_failed_fsync_poisons_the_writer_and_loses_nothing_acknowledged() {
    let disk = Disks::default();
    let log = log_on(&disk, true, LogOptions::default());
    let acked = log
        .append(vec![activity("s", "a", None), activity("s", "b", None)])
        .unwrap();

    disk.fail_sync(true);
    let err = log.append(vec![activity("s", "lost", None)]).unwrap_err();
    assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
    assert!(err.to_string().contains("injected fsync failure"), "{err}");
    // The acknowledged events were held in memory (a small group, durable in the segment):
    // reads still see them, and not the failed one.
    let reader = log.read().unwrap();
    assert_eq!(reader.len().unwrap(), 2);
    for a in &acked {
        assert_eq!(reader.get(a.position).unwrap().unwrap().hash, a.hash);
    }
    drop(reader);
    // The disk recovers, the writer does not: no retry after a failed fsync.
    disk.fail_sync(false);
    let err = log.append(vec![activity("s", "later", None)]).unwrap_err();
    assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
    drop(log);

    // Power cut: only synced bytes survive. Every acknowledged event is there.
    let disk = disk.after_crash();
    let log = log_on(&disk, false, LogOptions::default());
    let reader = log.read().unwrap();
    assert_eq!(reader.len().unwrap(), 2);
    for a in &acked {
        assert_eq!(reader.get(a.position).unwrap().unwrap().hash, a.hash);
    }
    drop(reader);
    let next = log.append(vec![activity("s", "c", None)]).unwrap()[0];
    assert_eq!((next.seq, next.position), (3, 3));
    assert!(log.verify(1).unwrap().ok());
}

#[test]
fn held_keys_survive_a_failed_fsync_and_a_reopen() {
    let disk = Disks::default();
    let log = log_on(&disk, true, LogOptions::default());
    let keyed = log.append(vec![activity("s", "k", Some("k1"))]).unwrap()[0];
    disk.fail_sync(true);
    let err = log
        .append(vec![activity("s", "lost", Some("k2"))])
        .unwrap_err();
    assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
    disk.fail_sync(false);
    drop(log);
    // Reopened from what was written (no power cut): the key answers with its event. The
    // failed request's record was written, if not flushed: it comes back whole or not at all.
    let log = log_on(&disk, false, LogOptions::default());
    let again = log.append(vec![activity("s", "k", Some("k1"))]).unwrap()[0];
    assert!(again.existing);
    assert_eq!((again.position, again.hash), (keyed.position, keyed.hash));
    let lost = log.append(vec![activity("s", "lost", Some("k2"))]).unwrap()[0];
    assert_eq!(lost.position, 2);
    assert_eq!(log.read().unwrap().len().unwrap(), 2);
    assert!(log.verify(1).unwrap().ok());
}

#[test]
fn a_commit_that_panics_leaves_the_writer_gone_not_the_appender_unwound() {
    let disk = Disks::default();
    let log = log_on(&disk, true, LogOptions::default());
    let acked = log.append(vec![activity("s", "a", None)]).unwrap();

    // Nothing else is writing: the appender commits on its own thread, and the panic stops
    // there.
    disk.panic_sync(true);
    let err = log.append(vec![activity("s", "lost", None)]).unwrap_err();
    assert!(matches!(err, LogError::WriterGone), "{err}");
    // What the commit left half-done is not built on, whichever way a request comes.
    disk.panic_sync(false);
    let err = log.append(vec![activity("s", "later", None)]).unwrap_err();
    assert!(matches!(err, LogError::WriterGone), "{err}");
    let err = log
        .submit(vec![activity("s", "queued", None)])
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(matches!(err, LogError::WriterGone), "{err}");
    drop(log);

    let disk = disk.after_crash();
    let log = log_on(&disk, false, LogOptions::default());
    let reader = log.read().unwrap();
    assert_eq!(reader.len().unwrap(), 1);
    assert_eq!(reader.get(1).unwrap().unwrap().hash, acked[0].hash);
    drop(reader);
    assert!(log.verify(1).unwrap().ok());
}

#[test]
fn a_full_queue_answers_busy_instead_of_growing() {
    let disk = Disks::default();
    let options = LogOptions {
        queue_requests_max: 1,
        ..LogOptions::default()
    };
    let log = log_on(&disk, true, options);
    disk.hold_sync(true);
    let mut pending = Vec::new();
    let mut busy = false;
    for i in 0..50 {
        match log
            .writer
            .submit(vec![activity("s", &format!("{i}"), None)])
        {
            Ok(answer) => pending.push(answer),
            Err(LogError::Busy(1)) => {
                busy = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(busy, "the writer never said busy with its sync held");
    disk.hold_sync(false);
    for answer in pending {
        assert!(answer.wait().is_ok());
    }
    assert!(log.verify(1).unwrap().ok());
}

#[test]
fn verify_names_a_damaged_event() {
    let disk = Disks::default();
    let log = log_on(&disk, true, LogOptions::default());
    let acked = log
        .append(
            (0..5)
                .map(|i| activity("s", &format!("needle-{i}"), None))
                .collect(),
        )
        .unwrap();
    drop(log);
    {
        let mut bytes = disk.data.written.lock().unwrap();
        let needle = b"needle-3";
        let mut hits = 0;
        for i in 0..bytes.len() - needle.len() {
            if &bytes[i..i + needle.len()] == needle {
                bytes[i] ^= 0x20;
                hits += 1;
            }
        }
        assert!(hits > 0);
    }
    let log = log_on(&disk, false, LogOptions::default());
    let report = log.verify(2).unwrap();
    assert!(!report.ok());
    match &report.problems[0] {
        Corruption::HashMismatch {
            position,
            id,
            expected,
            actual,
        } => {
            assert_eq!(*position, acked[3].position);
            assert_eq!(
                *id,
                Some(EventId {
                    origin: origin(),
                    seq: 4
                })
            );
            assert_eq!(*expected, acked[3].hash);
            assert_ne!(actual, expected);
        }
        other => panic!("unexpected first problem {other}"),
    }
    // Reads refuse the damaged event instead of returning it.
    let reader = log.read().unwrap();
    assert!(matches!(
        reader.get(acked[3].position),
        Err(LogError::Corrupt(_))
    ));
    // So does the replay's read, whose chunk holds the damaged event; the events after it
    // still read.
    let mut chunk = Checked::default();
    match reader.read_checked(0, 10, usize::MAX, &mut chunk) {
        Err(LogError::Corrupt(Corruption::HashMismatch { position, .. })) => {
            assert_eq!(position, acked[3].position)
        }
        other => panic!("expected a hash mismatch, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        reader
            .read_checked(acked[3].position, 10, usize::MAX, &mut chunk)
            .unwrap(),
        Some(acked[4].position)
    );
    assert_eq!(chunk.last(), Some((acked[4].position, acked[4].hash)));
}

#[test]
fn the_stream_index_flushes_in_bulk_and_rebuilds_its_tail_after_a_crash() {
    let options = LogOptions {
        stream_flush_events: 50,
        ..LogOptions::default()
    };
    let disk = Disks::default();
    let log = log_on(&disk, true, options.clone());
    let mut want: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let append = |log: &Log, n: usize, want: &mut std::collections::BTreeMap<String, Vec<u64>>| {
        let batch: Vec<NewEvent> = (0..n)
            .map(|i| activity(&format!("task/{}", i % 3), "m", None))
            .collect();
        let streams: Vec<String> = batch.iter().map(|e| e.stream.clone()).collect();
        for (a, stream) in log.append(batch).unwrap().iter().zip(streams) {
            want.entry(stream).or_default().push(a.position);
        }
    };
    let check = |log: &Log, want: &std::collections::BTreeMap<String, Vec<u64>>| {
        let reader = log.read().unwrap();
        for (stream, positions) in want {
            assert_eq!(
                &reader.stream_positions(stream, 0, usize::MAX).unwrap(),
                positions
            );
            let after = positions[positions.len() / 2];
            let tail: Vec<u64> = positions.iter().copied().filter(|p| *p > after).collect();
            assert_eq!(
                reader.stream_positions(stream, after, usize::MAX).unwrap(),
                tail
            );
            assert_eq!(
                reader.stream_positions(stream, 0, 2).unwrap(),
                positions[..2]
            );
        }
    };
    for _ in 0..4 {
        append(&log, 20, &mut want); // flushes at 60 events: some postings on disk, some in the tail
    }
    check(&log, &want);
    // Power cut before the close flush: the tail's postings exist only in the events.
    let crashed = disk.after_crash();
    drop(log);
    let log = log_on(&crashed, false, options.clone());
    check(&log, &want);
    for _ in 0..3 {
        append(&log, 20, &mut want);
    }
    check(&log, &want);
    drop(log);
    let log = log_on(&crashed, false, options);
    check(&log, &want);
    assert!(log.verify(2).unwrap().ok());
}

#[test]
fn large_events_and_many_small_ones_share_blocks_correctly() {
    let (_dir, log) = temp_log();
    let big = parse_request(
        &serde_json::json!({
            "kind": "activity.logged", "stream": "s", "actor": "test",
            "data": {"message": "big", "meta": {"blob": "x".repeat(200_000)}},
        })
        .to_string(),
    )
    .unwrap();
    let mut batch: Vec<NewEvent> = (0..300)
        .map(|i| activity("s", &format!("{i}"), None))
        .collect();
    batch.insert(150, big);
    let acked = log.append(batch).unwrap();
    let reader = log.read().unwrap();
    for a in &acked {
        assert_eq!(reader.get(a.position).unwrap().unwrap().hash, a.hash);
    }
    assert_eq!(
        reader
            .get(acked.len() as u64 + 1)
            .unwrap()
            .map(|r| r.position),
        None
    );
    assert_eq!(reader.last_position().unwrap(), 301);
    let page = reader.scan(140, 20, &Filter::default()).unwrap();
    assert_eq!(page.records.first().map(|r| r.position), Some(141));
    assert_eq!(page.last_examined, Some(160));
    // The replay's read, in chunks of 7 into one reused buffer, returns every event as stored.
    let mut chunk = Checked::default();
    let mut after = 0;
    let mut read = Vec::new();
    while let Some(last) = reader
        .read_checked(after, 7, usize::MAX, &mut chunk)
        .unwrap()
    {
        assert!(chunk.iter().count() <= 7);
        for c in chunk.iter() {
            let (position, hash, event) = (c.position, c.hash, c.event);
            let stored = reader.get(position).unwrap().unwrap();
            assert_eq!((hash, event.id()), (stored.hash, stored.event().id()));
            assert_eq!(event.payload(), stored.event().payload());
            read.push(position);
        }
        assert_eq!(chunk.last().map(|(p, _)| p), Some(last));
        after = last;
    }
    assert_eq!(read, (1..=301).collect::<Vec<u64>>());
    // Bounded in bytes too: past its first event a chunk stops before it would exceed them, and
    // an event larger than the bound still comes, alone.
    let (mut after, mut read) = (0, 0);
    while let Some(last) = reader.read_checked(after, 1_000, 600, &mut chunk).unwrap() {
        let events = chunk.iter().count();
        assert!(events == 1 || chunk.bytes.len() <= 600, "{events} events");
        read += events;
        after = last;
    }
    assert_eq!(read, 301);
    let mut one = Checked::default();
    reader.read_checked(0, 1_000, 1, &mut one).unwrap();
    assert_eq!(one.iter().count(), 1);
    assert!(log.verify(2).unwrap().ok());
}

#[test]
fn a_large_group_chains_on_the_helper_exactly_as_a_small_one() {
    // 3 000 new events take the writer's parallel path; keys repeated inside the batch and keys
    // already stored must still answer with the first event's position and hash.
    let (_dir, log) = temp_log();
    let early = log
        .append(vec![activity("s", "early", Some("k-old"))])
        .unwrap()[0];
    let mut batch = Vec::new();
    for i in 0..3_000 {
        let key = match i % 500 {
            7 => Some(format!("k-{}", i / 500)),
            9 => Some(format!("k-{}", i / 500)), // Repeats the key two events back.
            11 => Some("k-old".to_owned()),
            _ => None,
        };
        // A repeated key comes with the same request (else it is a conflict).
        let event = match (i % 500, &key) {
            (11, _) => activity("s", "early", key.as_deref()),
            (9, _) => activity(
                &format!("s{}", (i - 2) % 37),
                &format!("{}", i - 2),
                key.as_deref(),
            ),
            _ => activity(&format!("s{}", i % 37), &format!("{i}"), key.as_deref()),
        };
        batch.push(event);
    }
    let acked = log.append(batch).unwrap();
    assert_eq!(acked.len(), 3_000);
    let reader = log.read().unwrap();
    let mut previous: Option<Appended> = Some(early);
    for (i, a) in acked.iter().enumerate() {
        let stored = reader.get(a.position).unwrap().unwrap();
        assert_eq!(stored.hash, a.hash, "answer {i}");
        assert_eq!(stored.event().seq(), a.seq);
        match i % 500 {
            9 => assert_eq!((a.existing, a.position), (true, acked[i - 2].position)),
            11 => assert_eq!((a.existing, a.position, a.hash), (true, 1, early.hash)),
            _ => {
                assert!(!a.existing);
                let p = previous.unwrap();
                assert_eq!((a.seq, a.position), (p.seq + 1, p.position + 1));
                assert_eq!(stored.event().prev(), p.hash);
                previous = Some(*a);
            }
        }
    }
    assert_eq!(reader.len().unwrap(), 1 + 3_000 - 12);
    let s5 = Filter {
        stream: Some("s5".into()),
        ..Filter::default()
    };
    let positions: Vec<u64> = reader
        .scan(0, 10_000, &s5)
        .unwrap()
        .records
        .iter()
        .map(|r| r.position)
        .collect();
    let expected: Vec<u64> = acked
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.existing && i % 37 == 5)
        .map(|(_, a)| a.position)
        .collect();
    assert_eq!(positions, expected);
    assert!(log.verify(2).unwrap().ok());
}

#[test]
fn a_group_holds_at_most_its_cap_and_a_larger_request_commits_whole() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        group_events_max: 3,
        ..LogOptions::default()
    };
    let log = Log::create(&dir.path().join("log.redb"), origin(), options).unwrap();
    let start = log.writer_stats();
    let five: Vec<NewEvent> = (0..5)
        .map(|i| activity("s", &format!("big {i}"), None))
        .collect();
    let positions: Vec<u64> = log
        .append(five)
        .unwrap()
        .iter()
        .map(|a| a.position)
        .collect();
    assert_eq!(positions, [1, 2, 3, 4, 5]);
    let big = log.writer_stats();
    assert_eq!(
        (big.commits - start.commits, big.events - start.events),
        (1, 5)
    );
    // Twelve single-event requests queued at once: no group takes more than three of them.
    let answers: Vec<_> = (0..12)
        .map(|i| {
            log.submit(vec![activity("s", &format!("one {i}"), None)])
                .unwrap()
        })
        .collect();
    for answer in answers {
        answer.wait().unwrap();
    }
    let end = log.writer_stats();
    assert_eq!(end.events - big.events, 12);
    assert!(
        end.commits - big.commits >= 4,
        "12 events in {} commits",
        end.commits - big.commits
    );
}

/// Pages of `path` in the kernel's page cache, among its first `len` bytes (`mincore` over a
/// read-only mapping).
fn cached_pages(path: &std::path::Path, len: u64) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let page = 4096;
    let pages = len.div_ceil(page) as usize;
    let mut flags = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of an open file, only passed to mincore, then unmapped.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED);
        assert_eq!(libc::mincore(at, len as usize, flags.as_mut_ptr()), 0);
        libc::munmap(at, len as usize);
    }
    (flags.iter().filter(|f| *f & 1 == 1).count(), pages)
}

#[test]
fn the_writer_leaves_only_the_end_of_the_log_in_the_kernels_cache() {
    let keep: u64 = 4 * 1024 * 1024;
    let message = "x".repeat(60_000);
    let mut written = Vec::new();
    for kernel_cache_bytes in [keep, 0] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let options = LogOptions {
            kernel_cache_bytes,
            ..LogOptions::default()
        };
        let log = Log::create(&path, origin(), options).unwrap();
        // 48 MB of events, in commits of 8: two drops.
        for batch in 0..100 {
            let events = (0..8)
                .map(|i| activity("big", &format!("{batch}.{i} {message}"), None))
                .collect();
            log.append(events).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        let (cached, pages) = cached_pages(&path, len - keep);
        written.push((kernel_cache_bytes, cached, pages));
        // Nothing is lost: every event reads back and the log verifies.
        let reader = log.read().unwrap();
        let all = reader.scan(0, 1000, &Filter::default()).unwrap().records;
        assert_eq!(all.len(), 800);
        assert!(log.verify(1).unwrap().ok());
    }
    let (_, dropped_cached, _) = written[0];
    let (_, kept_cached, _) = written[1];
    let page = 4096;
    // Before the last `keep` bytes, what stays is at most what commits wrote since the last
    // drop (under one step), and a few pages of redb's own (its header, allocator state).
    assert!(
        dropped_cached * page <= writer::KERNEL_CACHE_STEP as usize + (1 << 20),
        "{written:?}"
    );
    // The same log written with the bound off keeps them all: the check sees what it claims.
    assert!(
        kept_cached * page > 2 * writer::KERNEL_CACHE_STEP as usize,
        "{written:?}"
    );
}

/// An event of `origin` as another node ships it: stamped `hlc`, after `prev`, with `deps`.
fn shipped(origin: Origin, seq: u64, prev: Hash, hlc: u64, deps: Vec<event::Dep>) -> Shipped {
    let (hash, bytes) = shipped_bytes(origin, seq, prev, hlc, deps);
    Shipped::verify(hash, bytes).unwrap()
}

/// The hash and stored bytes of such an event, unchecked.
fn shipped_bytes(
    origin: Origin,
    seq: u64,
    prev: Hash,
    hlc: u64,
    deps: Vec<event::Dep>,
) -> (Hash, Vec<u8>) {
    let new = activity("t", "shipped", None);
    let mut event = event::Event {
        origin,
        seq,
        hlc,
        prev,
        deps,
        stream: new.stream,
        actor: new.actor,
        kind: new.kind,
        version: new.version,
        correlation: None,
        causation: None,
        key: None,
        payload: new.payload,
        signer: None,
    };
    let mut bytes = event::append_stored(&mut event, Vec::new());
    let hash = event::chain(&mut bytes, prev);
    (hash, bytes)
}

/// Every event's (origin, seq, hlc, order), in position order.
fn orders(log: &Log) -> Vec<(Origin, u64, u64, u64)> {
    let reader = log.read().unwrap();
    let mut chunk = Checked::default();
    reader
        .read_checked(0, 1_000, usize::MAX, &mut chunk)
        .unwrap();
    chunk
        .iter()
        .map(|c| (c.event.origin(), c.event.seq(), c.event.hlc(), c.order))
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn an_event_is_ordered_after_its_causes_whatever_the_clocks_said() {
    let (_dir, vm) = temp_log();
    let desktop = Origin([0x22; 16]);
    // The desktop's clock runs five hours ahead; the VM clamps its own clock.
    let ahead = crate::hlc::pack(now_ms() + 5 * 3_600_000, 0);
    let created = shipped(desktop, 1, Hash::ZERO, ahead, vec![]);
    assert_eq!(vm.ingest(vec![created.clone()]).unwrap().clamped, 1);
    let edit = vm.append(vec![activity("t", "edited", None)]).unwrap()[0];
    vm.append(vec![activity("t", "again", None)]).unwrap();
    let got = orders(&vm);
    let (created_at, edit_at, again_at) = (got[0], got[1], got[2]);
    assert!(
        edit_at.2 < created_at.2,
        "the edit's own stamp stays clamped"
    );
    assert_eq!(
        created_at.3, ahead,
        "an order is the stamp when nothing precedes it"
    );
    assert!(edit_at.3 > created_at.3, "{got:?}");
    assert!(again_at.3 > edit_at.3, "{got:?}");
    assert!(vm.verify(2).unwrap().ok());

    // A third node (a Pi whose clock says 1970 would clamp everything) receiving both, the
    // edit first, computes the same orders once the edit's dep arrives.
    let dir = tempfile::tempdir().unwrap();
    let pi = Log::create(
        &dir.path().join("log.redb"),
        Origin([0x33; 16]),
        LogOptions::default(),
    )
    .unwrap();
    let reader = vm.read().unwrap();
    let ship = |position| {
        let r = reader.get(position).unwrap().unwrap();
        Shipped::verify(r.hash, r.bytes().to_vec()).unwrap()
    };
    let report = pi.ingest(vec![ship(2), ship(3), ship(1)]).unwrap();
    assert_eq!((report.waited, report.released), (2, 2));
    let mut there = orders(&pi);
    there.sort();
    let mut here = got.clone();
    here.sort();
    assert_eq!(there, here);
    assert_eq!(edit.seq, 1);
    assert!(pi.verify(2).unwrap().ok());
}

#[test]
fn a_format_1_log_gets_its_orders_when_opened_and_verify_names_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let before = {
        let log = Log::create(&path, origin(), LogOptions::default()).unwrap();
        let other = Origin([0x22; 16]);
        let far = crate::hlc::pack(now_ms() + 3_600_000, 0);
        let first = shipped(other, 1, Hash::ZERO, far, vec![]);
        log.ingest(vec![first.clone()]).unwrap();
        for i in 0..300 {
            log.append(vec![activity("s", &format!("m{i}"), None)])
                .unwrap();
        }
        let dep = event::Dep {
            origin: origin(),
            seq: 5,
        };
        log.ingest(vec![shipped(other, 2, first.meta.hash, 1, vec![dep])])
            .unwrap();
        orders(&log)
    };
    // As format 1 stored it: the same blocks without their orders.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut events = txn.open_table(EVENTS).unwrap();
            let old: Vec<(u64, Vec<u8>)> = events
                .iter()
                .unwrap()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (k.value(), block::as_v1(v.value()))
                })
                .collect();
            for (k, v) in old {
                events.insert(k, v.as_slice()).unwrap();
            }
            txn.open_table(META)
                .unwrap()
                .insert("format", 1u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let log = Log::open(&path, origin(), LogOptions::default()).unwrap();
    assert_eq!(orders(&log), before);
    assert!(log.verify(2).unwrap().ok());
    drop(log);

    // An order changed on disk is named by verify.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            // The block holding position 3, and the event's order in its footer: `count`
            // orders, then `count` ends and the count.
            let mut events = txn.open_table(EVENTS).unwrap();
            let (first, mut value) = {
                let (k, v) = events.range(..=3u64).unwrap().next_back().unwrap().unwrap();
                (k.value(), v.value().to_vec())
            };
            let count = u32::from_le_bytes(value[value.len() - 4..].try_into().unwrap()) as usize;
            let at = value.len() - 4 - 12 * count + 8 * (3 - first) as usize;
            value[at..at + 8].copy_from_slice(&7u64.to_le_bytes());
            events.insert(first, value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let log = Log::open(&path, origin(), LogOptions::default()).unwrap();
    let report = log.verify(2).unwrap();
    assert!(
        report.problems.iter().any(|p| matches!(
            p,
            Corruption::Order {
                position: 3,
                found: 7,
                ..
            }
        )),
        "{:?}",
        report.problems
    );
}

#[test]
fn seq_0_and_too_many_deps_are_refused_by_name_not_taken_for_forks() {
    let other = Origin([0x22; 16]);
    let zero = shipped_bytes(other, 0, Hash::ZERO, 1, vec![]);
    let err = Shipped::verify(zero.0, zero.1).unwrap_err();
    assert!(
        matches!(&err, ShippedError::Refused { problem, .. } if problem.starts_with("seq")),
        "{err}"
    );
    let deps = (0..=event::DEPS_MAX as u64)
        .map(|i| event::Dep {
            origin: Origin([(i % 200) as u8; 16]),
            seq: i + 1,
        })
        .collect();
    let many = shipped_bytes(other, 1, Hash::ZERO, 1, deps);
    let err = Shipped::verify(many.0, many.1).unwrap_err();
    assert!(
        matches!(&err, ShippedError::Refused { problem, .. } if problem.starts_with("deps")),
        "{err}"
    );
}

#[test]
fn a_signer_not_bound_to_its_origin_or_past_seq_1_is_refused_by_name() {
    let key = crate::identity::NodeKey::generate();
    let encode_with = |origin: Origin, seq: u64, signer: [u8; 32]| {
        let new = activity("t", "first", None);
        let mut event = event::Event {
            origin,
            seq,
            hlc: 1,
            prev: Hash::ZERO,
            deps: vec![],
            stream: new.stream,
            actor: new.actor,
            kind: new.kind,
            version: new.version,
            correlation: None,
            causation: None,
            key: None,
            payload: new.payload,
            signer: Some(signer),
        };
        let bytes = event::encode(&event);
        event.signer = None;
        (Hash::of(&bytes), bytes)
    };
    // Its own origin: accepted, and the key is there to read.
    let (hash, bytes) = encode_with(key.origin(), 1, key.public().0);
    let shipped = Shipped::verify(hash, bytes).unwrap();
    assert_eq!(
        event::decode(&shipped.bytes).unwrap().signer(),
        Some(key.public().0)
    );
    // Another origin's first event claiming this key: a forged genesis.
    let (hash, bytes) = encode_with(Origin([0x22; 16]), 1, key.public().0);
    let err = Shipped::verify(hash, bytes).unwrap_err().to_string();
    assert!(err.contains("signer: the key is bound to origin"), "{err}");
    // A key on a later event.
    let (hash, bytes) = encode_with(key.origin(), 2, key.public().0);
    let err = Shipped::verify(hash, bytes).unwrap_err().to_string();
    assert!(err.contains("only an origin's first event"), "{err}");
}

#[test]
fn a_signed_head_is_checked_kept_with_its_event_and_verified_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let log = Log::create(&path, origin(), LogOptions::default()).unwrap();
    let key = crate::identity::NodeKey::generate();
    let a = key.origin();
    let e1 = shipped(a, 1, Hash::ZERO, 1, vec![]);
    let e2 = shipped(a, 2, e1.meta.hash, 2, vec![]);
    let e3 = shipped(a, 3, e2.meta.hash, 3, vec![]);
    let head = key.sign_head(3, e3.meta.hash);
    // Another member's key, or a signature another key made: refused before the log sees it.
    let other = crate::identity::NodeKey::generate();
    let theirs = other.sign_head(3, e3.meta.hash);
    let err = e3
        .clone()
        .signed(other.public(), theirs.signature)
        .unwrap_err();
    assert!(err.to_string().contains("is bound to origin"), "{err}");
    let err = e3
        .clone()
        .signed(key.public(), theirs.signature)
        .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    let e3 = e3.signed(key.public(), head.signature).unwrap();
    log.ingest(vec![e1, e2, e3]).unwrap();
    let kept = log.read().unwrap().signed_heads(a).unwrap();
    assert_eq!(kept, vec![(key.public(), head)]);
    assert!(log.verify(2).unwrap().ok());
    drop(log);

    // A signature changed on disk is named by verify.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(SIGNATURES).unwrap();
            let mut value = table.get((a.0, 3)).unwrap().unwrap().value().to_vec();
            value[40] ^= 1;
            table.insert((a.0, 3), value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let log = Log::open(&path, origin(), LogOptions::default()).unwrap();
    let report = log.verify(2).unwrap();
    assert!(
        report.problems.iter().any(
            |p| matches!(p, Corruption::BadSignature { id, .. } if id.origin == a && id.seq == 3)
        ),
        "{:?}",
        report.problems
    );
}

/// The vault's recipients live in `meta.recipients`; a log written before they were saved
/// reads them from its events at open. Either way an entry must list current recipients only.
#[test]
fn vault_entries_list_only_current_recipients_and_a_log_without_the_saved_set_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let log = Log::create(&path, origin(), LogOptions::default()).unwrap();
    let key = crate::vault::Identity::generate().recipient();
    let fingerprint = crate::vault::fingerprint(&key);
    let request = |kind: &str, data: serde_json::Value| {
        parse_request(
            &serde_json::json!({"kind": kind, "stream": "vault/x", "actor": "t", "data": data})
                .to_string(),
        )
        .unwrap()
    };
    let added = request(
        "vault.recipient_added",
        serde_json::json!({"recipient_id": "r", "device_id": "d", "label": "l",
                           "public_key": key, "fingerprint": fingerprint}),
    );
    let entry = || {
        request(
            "vault.entry_written",
            serde_json::json!({"entry_id": "x",
                "ciphertext": crate::vault::encrypt(b"s", std::slice::from_ref(&key)).unwrap(),
                "recipients": [fingerprint]}),
        )
    };
    // Refused whole, naming the event of the batch; taken once the recipient comes first in
    // the same request.
    let err = log
        .append(vec![activity("a", "m", None), entry()])
        .unwrap_err();
    assert!(
        matches!(&err, LogError::Unregistered { index: 1, error } if error.field == "/recipients/0"),
        "{err}"
    );
    assert_eq!(log.stats().unwrap().events, 0);
    log.append(vec![added, entry()]).unwrap();
    drop(log);
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        assert!(txn
            .open_table(META)
            .unwrap()
            .remove("recipients")
            .unwrap()
            .is_some());
        txn.commit().unwrap();
    }
    let log = Log::open(&path, origin(), LogOptions::default()).unwrap();
    log.append(vec![entry()]).unwrap();
    let removed = request(
        "vault.recipient_removed",
        serde_json::json!({"recipient_id": "r", "fingerprint": fingerprint}),
    );
    log.append(vec![removed]).unwrap();
    let err = log.append(vec![entry()]).unwrap_err();
    assert!(
        matches!(&err, LogError::Unregistered { index: 0, error } if error.problem.contains("removed")),
        "{err}"
    );
    assert!(log.verify(2).unwrap().ok());
}

/// The storage fault layer: files of one machine whose writes are kept apart from what a sync
/// made durable (as redb's own crash tests do). Every write and every sync is a numbered point;
/// at the chosen one the machine crashes: that operation and every later one fail, as a dead
/// process's would. `image` is what the disks hold after the crash: only what was synced, or
/// that plus the last unflushed write torn (a prefix of it, garbage after it).
///
/// The segment (file 1) is torn anywhere, and garbage follows the prefix even where the file
/// held other bytes: its format must survive any tail. The log's redb file (file 0) is torn at
/// a 512-byte sector, and the rest of that write keeps what the sectors held before (garbage
/// only past the file's old end): redb's commit relies on a sector being written whole, as
/// disks do, and a torn header sector is not a crash a disk makes.
#[derive(Debug, Default)]
struct Machine {
    state: Mutex<MachineState>,
}

#[derive(Debug, Default)]
struct MachineState {
    files: Vec<FaultyFile>,
    points: u64,
    crash_at: Option<u64>,
    crashed: bool,
    /// The last write not yet synced: (file, offset, bytes).
    last_unsynced: Option<(usize, u64, Vec<u8>)>,
}

#[derive(Clone, Debug, Default)]
struct FaultyFile {
    written: Vec<u8>,
    durable: Vec<u8>,
    /// Ranges of `written` changed since the last sync (a sync copies only these).
    dirty: Vec<(usize, usize)>,
}

/// Sets `bytes`' length to `len`, new bytes zero. (`Vec::resize` fills byte by byte in this
/// crate's unoptimized test build, and was a third of the fault test's time.)
fn set_size(bytes: &mut Vec<u8>, len: usize) {
    if len <= bytes.len() {
        bytes.truncate(len);
    } else {
        bytes.extend_from_slice(&vec![0u8; len - bytes.len()]);
    }
}

impl Machine {
    fn new(files: usize) -> Arc<Machine> {
        let machine = Machine::default();
        machine.state.lock().unwrap().files = vec![FaultyFile::default(); files];
        Arc::new(machine)
    }

    fn file(self: &Arc<Machine>, index: usize) -> FaultyBackend {
        FaultyBackend(self.clone(), index)
    }

    /// Counts a point; false once the machine has crashed (at this point or before).
    fn point(state: &mut MachineState) -> bool {
        state.points += 1;
        if state.crash_at == Some(state.points) {
            state.crashed = true;
        }
        !state.crashed
    }

    fn crashed(self: &Arc<Machine>) -> bool {
        self.state.lock().unwrap().crashed
    }

    /// The machine as it comes back: each file as synced, and with `tear` the last unflushed
    /// write applied in part (`keep` of its bytes, then garbage to its end).
    fn image(self: &Arc<Machine>, tear: Option<(usize, u8)>) -> Arc<Machine> {
        let state = self.state.lock().unwrap();
        let mut files: Vec<FaultyFile> = state
            .files
            .iter()
            .map(|f| FaultyFile {
                written: f.durable.clone(),
                durable: f.durable.clone(),
                dirty: Vec::new(),
            })
            .collect();
        if let (Some((keep, garbage)), Some((index, offset, bytes))) = (tear, &state.last_unsynced)
        {
            let file = &mut files[*index];
            let (offset, old_len) = (*offset as usize, file.durable.len());
            let keep = match index {
                1 => keep.min(bytes.len()),
                _ => (keep.min(bytes.len()) / 512) * 512,
            };
            let end = offset + bytes.len();
            if file.written.len() < end {
                set_size(&mut file.written, end);
            }
            for (i, &byte) in bytes.iter().enumerate() {
                let at = offset + i;
                file.written[at] = match (i < keep, index) {
                    (true, _) => byte,
                    (false, 0) if at < old_len => file.durable[at],
                    (false, _) => garbage,
                };
            }
            file.durable = file.written.clone();
        }
        let machine = Machine::default();
        machine.state.lock().unwrap().files = files;
        Arc::new(machine)
    }
}

#[derive(Debug)]
struct FaultyBackend(Arc<Machine>, usize);

fn crashed() -> std::io::Error {
    std::io::Error::other("the machine crashed")
}

impl redb::StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.state.lock().unwrap().files[self.1].written.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let state = self.0.state.lock().unwrap();
        let data = &state.files[self.1].written;
        let src = data
            .get(offset as usize..offset as usize + out.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut state = self.0.state.lock().unwrap();
        if !Machine::point(&mut state) {
            return Err(crashed());
        }
        // A length is durable with the next sync, as data is.
        let file = &mut state.files[self.1];
        let (old, len) = (file.written.len(), len as usize);
        set_size(&mut file.written, len);
        file.dirty.push((old.min(len), old.max(len)));
        Ok(())
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut state = self.0.state.lock().unwrap();
        if !Machine::point(&mut state) {
            return Err(crashed());
        }
        let file = &mut state.files[self.1];
        set_size(&mut file.durable, file.written.len());
        for (start, end) in std::mem::take(&mut file.dirty) {
            let end = end.min(file.written.len());
            if start < end {
                file.durable[start..end].copy_from_slice(&file.written[start..end]);
            }
        }
        if state
            .last_unsynced
            .as_ref()
            .is_some_and(|(i, ..)| *i == self.1)
        {
            state.last_unsynced = None;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut state = self.0.state.lock().unwrap();
        if !Machine::point(&mut state) {
            return Err(crashed());
        }
        let file = &mut state.files[self.1];
        let end = offset as usize + data.len();
        if file.written.len() < end {
            set_size(&mut file.written, end);
        }
        file.written[offset as usize..end].copy_from_slice(data);
        file.dirty.push((offset as usize, end));
        state.last_unsynced = Some((self.1, offset, data.to_vec()));
        Ok(())
    }
}

/// One step of the crash workload.
enum Step {
    /// A request of this many events; keyed requests repeat their key once.
    Append(usize, Option<String>),
    /// A shipped event of another node (an ingest commits durably).
    Ingest,
    /// A clean close and open (a durable commit, and the segment starts again).
    Reopen,
    /// A read, which sees every event acknowledged (held ones are committed first).
    Read,
}

fn crash_workload(rng: &mut impl rand::Rng, steps: usize) -> Vec<Step> {
    (0..steps)
        .map(|i| match rng.random_range(0..100) {
            0..64 => Step::Append(1, None),
            64..76 => Step::Append(rng.random_range(2..5), None),
            76..84 => Step::Append(1, Some(format!("key-{}", i / 2))),
            84..89 => Step::Ingest,
            89..95 => Step::Read,
            _ => Step::Reopen,
        })
        .collect()
}

fn crash_options(durable_every_commit: bool) -> LogOptions {
    LogOptions {
        segment_bytes: 2048,
        // Reached in a short workload: held events are also committed at the bound.
        held_events_max: 3,
        cache_bytes: 1024 * 1024,
        durable_every: match durable_every_commit {
            true => std::time::Duration::ZERO,
            false => std::time::Duration::MAX,
        },
        ..LogOptions::default()
    }
}

/// What a run acknowledged, and the request in flight when it stopped.
#[derive(Default)]
struct Acked {
    /// (origin, seq) → hash of every acknowledged event.
    events: HashMap<(Origin, u64), Hash>,
    /// Events of the request that failed (it may be whole, or absent, never in part).
    in_flight: usize,
    /// The log was made (a crash while making it leaves nothing to open).
    created: bool,
}

/// Runs `steps` on `machine` until it crashes (or to the end); returns what was acknowledged.
fn run_crash_workload(machine: &Arc<Machine>, steps: &[Step], options: &LogOptions) -> Acked {
    let mut acked = Acked::default();
    let open = |create: bool| {
        Log::with_backend(
            machine.file(0),
            machine.file(1),
            Path::new("mem"),
            origin(),
            options.clone(),
            create,
        )
    };
    let Ok(mut log) = open(true) else {
        return acked;
    };
    acked.created = true;
    let other = Origin([0x33; 16]);
    let mut shipped_head = (0u64, Hash::ZERO);
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Append(n, key) => {
                let batch: Vec<NewEvent> = (0..*n)
                    .map(|j| activity("s", &format!("e{i}-{j}"), key.as_deref()))
                    .collect();
                match log.append(batch) {
                    Ok(done) => {
                        for a in done {
                            acked.events.insert((a.origin, a.seq), a.hash);
                        }
                    }
                    Err(_) => {
                        acked.in_flight = *n;
                        return acked;
                    }
                }
            }
            Step::Ingest => {
                let (seq, prev) = shipped_head;
                let event = shipped(other, seq + 1, prev, now_ms() << 16, Vec::new());
                let hash = event.meta.hash;
                match log.ingest(vec![event]) {
                    Ok(report) if report.applied == 1 => {
                        acked.events.insert((other, seq + 1), hash);
                        shipped_head = (seq + 1, hash);
                    }
                    _ => return acked,
                }
            }
            Step::Read => {
                let Ok(reader) = log.read() else {
                    return acked;
                };
                // Before a crash, the read sees what was acknowledged.
                if !machine.crashed() {
                    assert_eq!(reader.len().unwrap(), acked.events.len() as u64);
                }
            }
            Step::Reopen => {
                drop(log);
                if machine.crashed() {
                    return acked;
                }
                match open(false) {
                    Ok(reopened) => log = reopened,
                    Err(_) => return acked,
                }
            }
        }
        if machine.crashed() {
            return acked;
        }
    }
    acked
}

/// After a crash: every acknowledged event is present once, the request in flight whole or
/// absent, verify passes, and the log takes the next append after them.
fn check_after_crash(image: &Arc<Machine>, acked: &Acked, options: &LogOptions, what: &str) {
    let log = Log::with_backend(
        image.file(0),
        image.file(1),
        Path::new("mem"),
        origin(),
        options.clone(),
        false,
    )
    .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    let held: Vec<(Origin, u64)> = orders(&log).iter().map(|o| (o.0, o.1)).collect();
    let reader = log.read().unwrap();
    let mut seen = HashSet::new();
    for (position, id) in held.iter().enumerate() {
        assert!(seen.insert(*id), "{what}: {id:?} held twice");
        if let Some(hash) = acked.events.get(id) {
            let record = reader.get(position as u64 + 1).unwrap().unwrap();
            assert_eq!(record.hash, *hash, "{what}: {id:?} is another event");
        }
    }
    for id in acked.events.keys() {
        assert!(seen.contains(id), "{what}: acknowledged {id:?} lost");
    }
    let own_acked = acked.events.keys().filter(|id| id.0 == origin()).count();
    let own_held = held.iter().filter(|id| id.0 == origin()).count();
    assert!(
        own_held == own_acked || own_held == own_acked + acked.in_flight,
        "{what}: {own_held} own events held, {own_acked} acknowledged, {} in flight",
        acked.in_flight
    );
    drop(reader);
    let report = log.verify(1).unwrap();
    assert!(report.ok(), "{what}: {:?}", report.problems);
    let next = log.append(vec![activity("s", "after", None)]).unwrap()[0];
    assert_eq!(next.seq, own_held as u64 + 1, "{what}");
}

/// Crashes a seeded workload at every write and sync point, drops what was not synced (and
/// again with the last unflushed write torn), reopens and checks (`check_after_crash`).
/// `SPOOL_CRASH_POINTS` (default 10 000) bounds the points; seeds run until it is reached.
#[test]
fn a_crash_at_every_write_and_flush_loses_nothing_acknowledged_and_shows_nothing_in_part() {
    use rand::{Rng, SeedableRng};
    let wanted = crate::testing::env_count("SPOOL_CRASH_POINTS", 10_000);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let points = std::sync::atomic::AtomicU64::new(0);
    let next_seed = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                if points.load(Ordering::SeqCst) >= wanted {
                    return;
                }
                let seed = next_seed.fetch_add(1, Ordering::SeqCst);
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let steps = crash_workload(&mut rng, 8);
                let options = crash_options(seed.is_multiple_of(4));
                // A run without a crash counts the points the workload passes.
                let dry = Machine::new(2);
                run_crash_workload(&dry, &steps, &options);
                let total = dry.state.lock().unwrap().points;
                for at in 1..=total {
                    let machine = Machine::new(2);
                    machine.state.lock().unwrap().crash_at = Some(at);
                    let acked = run_crash_workload(&machine, &steps, &options);
                    // A crash inside making the log leaves no log to open.
                    if !acked.created {
                        continue;
                    }
                    let tear = (rng.random_range(0..4096), rng.random::<u8>());
                    let images = [
                        (machine.image(None), "synced"),
                        (machine.image(Some(tear)), "torn"),
                    ];
                    for (image, how) in images {
                        let what = format!("seed {seed}, point {at} of {total}, {how}");
                        check_after_crash(&image, &acked, &options, &what);
                    }
                    points.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    eprintln!(
        "crash points: {} over {} seeds",
        points.load(Ordering::SeqCst),
        next_seed.load(Ordering::SeqCst)
    );
}

/// A machine holding a log whose last three appends are only in the segment (redb committed
/// them without a flush, and the crash dropped them); `hostile` then writes over the segment.
fn segment_only_appends(hostile: impl FnOnce(&Arc<Machine>)) -> (Arc<Machine>, Vec<Appended>) {
    let machine = Machine::new(2);
    let options = crash_options(false);
    let log = Log::with_backend(
        machine.file(0),
        machine.file(1),
        Path::new("mem"),
        origin(),
        options,
        true,
    )
    .unwrap();
    let acked: Vec<Appended> = (0..3)
        .flat_map(|i| {
            log.append(vec![activity("s", &format!("e{i}"), None)])
                .unwrap()
        })
        .collect();
    // A crash: the machine as synced, taken before the clean close the drop makes.
    let image = machine.image(None);
    drop(log);
    hostile(&image);
    (image, acked)
}

fn open_image(image: &Arc<Machine>) -> Result<Log, LogError> {
    Log::with_backend(
        image.file(0),
        image.file(1),
        Path::new("mem"),
        origin(),
        crash_options(false),
        false,
    )
}

/// Writes `records` from the segment's start, as a writer would.
fn write_records(image: &Arc<Machine>, records: &[Vec<(Hash, Vec<u8>)>]) {
    let (mut wal, _) = wal::Wal::open(Box::new(image.file(1)), 2048).unwrap();
    wal.restart();
    for record in records {
        wal.begin();
        for (hash, bytes) in record {
            wal.push(hash, bytes);
        }
        wal.commit(record.len() as u32).unwrap();
    }
}

#[test]
fn a_segment_that_does_not_follow_its_log_is_refused_by_name_and_kept_as_it_was() {
    // The segment as the writer left it: the three appends come back.
    let (image, acked) = segment_only_appends(|_| {});
    let log = open_image(&image).unwrap();
    let reader = log.read().unwrap();
    for a in &acked {
        assert_eq!(reader.get(a.position).unwrap().unwrap().hash, a.hash);
    }
    drop(reader);
    drop(log);

    let other = shipped(
        Origin([0x33; 16]),
        1,
        Hash::ZERO,
        now_ms() << 16,
        Vec::new(),
    );
    let unlinked = shipped_bytes(origin(), 1, Hash([9; 32]), now_ms() << 16, Vec::new());
    let first = shipped_bytes(origin(), 1, Hash::ZERO, now_ms() << 16, Vec::new());
    let third = shipped_bytes(origin(), 3, first.0, now_ms() << 16, Vec::new());
    let misnamed = first.1.clone();
    type Hostile = Box<dyn FnOnce(&Arc<Machine>)>;
    let cases: Vec<(&str, Hostile, &str)> = vec![
        (
            "another origin's event",
            Box::new(move |m| write_records(m, &[vec![(other.meta.hash, other.bytes.to_vec())]])),
            "holds an event of origin",
        ),
        (
            "an event whose chain does not link",
            Box::new(move |m| write_records(m, &[vec![unlinked]])),
            "do not follow the log's own",
        ),
        (
            "bytes that are not the event their hash names",
            Box::new(move |m| write_records(m, &[vec![(Hash([7; 32]), misnamed)]])),
            "hash mismatch",
        ),
        (
            "a damaged record in the middle",
            Box::new(|m| {
                let mut state = m.state.lock().unwrap();
                let file = &mut state.files[1];
                let second = memchr::memmem::find_iter(&file.written, b"spw1")
                    .nth(1)
                    .unwrap();
                file.written[second + 40] ^= 1;
                file.durable = file.written.clone();
            }),
            "hides the records after it (seq 3 on)",
        ),
        (
            "records that skip a seq",
            Box::new(move |m| write_records(m, &[vec![first], vec![third]])),
            "skip from seq 2 to seq 3",
        ),
        (
            "a file larger than a segment can be",
            Box::new(|m| {
                let mut state = m.state.lock().unwrap();
                let file = &mut state.files[1];
                file.written.resize(wal::SEGMENT_BYTES_MAX as usize + 1, 0);
                file.durable = file.written.clone();
            }),
            "more than a segment can be",
        ),
    ];
    for (what, hostile, named) in cases {
        let (image, _) = segment_only_appends(hostile);
        let segment = image.state.lock().unwrap().files[1].written.clone();
        match open_image(&image) {
            Err(LogError::Corrupt(Corruption::Wal { detail, .. })) => {
                assert!(detail.contains(named), "{what}: {detail}")
            }
            Err(other) => panic!("{what}: refused as {other}"),
            Ok(_) => panic!("{what}: opened"),
        }
        // The segment is kept as it was, for whoever looks at it; moved aside, the log opens
        // as redb last made it durable, and verifies.
        let mut state = image.state.lock().unwrap();
        assert!(
            state.files[1].written == segment,
            "{what}: the segment changed"
        );
        state.files[1] = FaultyFile::default();
        drop(state);
        let log = open_image(&image).unwrap_or_else(|e| panic!("{what}: aside: {e}"));
        let held = log
            .read()
            .unwrap()
            .get(1)
            .unwrap()
            .map(|r| format!("{:?}", r.hash));
        assert!(held.is_none(), "{what}: {held:?} {:?}", orders(&log));
        let report = log.verify(1).unwrap();
        assert!(report.ok(), "{what}: {:?}", report.problems);
    }

    // A frame whose header claims more than a record can be is not read (the writer never
    // writes one): nothing that size is allocated, and the records after it, which it hides,
    // are named.
    let (image, _) = segment_only_appends(|m| {
        let mut state = m.state.lock().unwrap();
        let file = &mut state.files[1];
        file.written.resize(wal::SEGMENT_BYTES_MAX as usize, 0);
        file.written[..4].copy_from_slice(b"spw1");
        file.written[4..8].copy_from_slice(&(60u32 << 20).to_le_bytes());
        file.durable = file.written.clone();
    });
    match open_image(&image) {
        Err(LogError::Corrupt(Corruption::Wal { detail, .. })) => {
            assert!(
                detail.contains("hides the records after it (seq 2 on)"),
                "{detail}"
            )
        }
        Err(other) => panic!("refused as {other}"),
        Ok(_) => panic!("opened"),
    }
}
