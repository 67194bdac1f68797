//! Durable append, group commit and verify, each beside a peer measured in the same run.
//!
//! `cargo bench --bench append`. Every figure is the median of `SPOOL_BENCH_RUNS` runs (default
//! 3); `SPOOL_BENCH_SCALE` (default 1.0) scales the event counts. The machine is shared and noisy:
//! read the ratios.

mod workload;

/// The spool binary's allocator, so the bench runs the code as `spool` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Instant;

use redb::{Database, TableDefinition};
use spool::event::Hash;
use spool::log::{Log, LogOptions};
use workload::{env_or, median, Workload};

fn main() {
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 3);
    let scale: f64 = env_or("SPOOL_BENCH_SCALE", 1.0);
    let n = |count: f64| ((count * scale) as usize).max(1);
    println!("spool append bench: {runs} runs per figure, medians; scale {scale}");
    println!("{:<58} {:>14}", "figure", "events/s");

    let single = median_of(runs, || append_rate(n(2_000.0), 1));
    report("spool durable append, 1 event per commit", single);
    let hundred = median_of(runs, || append_rate(n(200_000.0), 100));
    report("spool durable append, 100 events per commit", hundred);
    let batched = median_of(runs, || append_rate(n(1_000_000.0), 10_000));
    report("spool durable append, 10 000 events per commit", batched);
    let (grouped, group_size) = {
        let mut r: Vec<(f64, f64)> = (0..runs).map(|_| concurrent_rate(64, n(100.0))).collect();
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        r[r.len() / 2]
    };
    report(
        &format!("spool 64 concurrent single-event appenders (~{group_size:.0}/commit)"),
        grouped,
    );
    let (verify, log_events) = verify_rate(n(1_000_000.0), runs);
    report(
        &format!("spool verify of a {log_events}-event log, all cores"),
        verify,
    );

    println!("-- peers, same run --");
    let redb_raw = median_of(runs, || redb_rate(n(1_000_000.0), 1_000));
    report("redb alone: 250-byte records, 1 000 per commit", redb_raw);
    let blake = median_of(runs, || blake3_rate(n(1_000_000.0)));
    report("blake3 alone: hash 250-byte events, one core", blake);
    let sqlite = median_of(runs, || sqlite_upsert_rate(n(2_000.0)));
    report("SQLite WAL: one upsert per change (today's nodes)", sqlite);
    let floor = median_of(runs, || flush_floor_rate(n(2_000.0)));
    report(
        "the disk: 300-byte overwrite + fdatasync, one a commit",
        floor,
    );

    println!("-- ratios --");
    ratio(
        "batched append (10 000/commit) / redb alone",
        batched,
        redb_raw,
    );
    ratio(
        "batched append (10 000/commit) / SQLite upsert per change",
        batched,
        sqlite,
    );
    ratio(
        "1 event per commit / SQLite upsert per change",
        single,
        sqlite,
    );
    ratio("1 event per commit / the disk's flush alone", single, floor);
    ratio(
        "SQLite upsert per change / the disk's flush alone",
        sqlite,
        floor,
    );
    ratio(
        "group commit (64 appenders) / one commit per event",
        grouped,
        single,
    );
    ratio(
        "verify (all cores) / blake3 alone (one core)",
        verify,
        blake,
    );
    println!("-- targets --");
    target("batched append >= 500 000 events/s", batched >= 500_000.0);
    target("verify >= 3 000 000 events/s", verify >= 3_000_000.0);
    target(
        "group commit >= 10x one commit per event",
        grouped >= 10.0 * single,
    );
    target(
        "1 event per commit >= 1.2x SQLite upsert per change",
        single >= 1.2 * sqlite,
    );
}

/// Commits a second on the disk alone (`workload::flush_floor`).
fn flush_floor_rate(commits: usize) -> f64 {
    let took: std::time::Duration = workload::flush_floor(commits).into_iter().sum();
    commits as f64 / took.as_secs_f64()
}

fn append_rate(events: usize, per_commit: usize) -> f64 {
    let (_dir, log) = new_log();
    let mut w = Workload::new(1);
    let batches: Vec<_> = (0..events.div_ceil(per_commit))
        .map(|_| w.events(per_commit))
        .collect();
    let total: usize = batches.iter().map(Vec::len).sum();
    let started = Instant::now();
    for batch in batches {
        log.append(batch).unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Returns (events/s, mean events per commit).
fn concurrent_rate(appenders: usize, each: usize) -> (f64, f64) {
    let (_dir, log) = new_log();
    let log = Arc::new(log);
    let mut w = Workload::new(2);
    let work: Vec<Vec<_>> = (0..appenders).map(|_| w.events(each)).collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        for events in work {
            let log = log.clone();
            s.spawn(move || {
                for e in events {
                    log.append(vec![e]).unwrap();
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let stats = log.writer_stats();
    (
        stats.events as f64 / seconds,
        stats.events as f64 / stats.commits.max(1) as f64,
    )
}

fn verify_rate(events: usize, runs: usize) -> (f64, u64) {
    let (_dir, log) = new_log();
    let mut w = Workload::new(3);
    for _ in 0..events.div_ceil(10_000) {
        log.append(w.events(10_000)).unwrap();
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rate = median_of(runs, || {
        let started = Instant::now();
        let report = log.verify(threads).unwrap();
        assert!(report.ok());
        report.events as f64 / started.elapsed().as_secs_f64()
    });
    (rate, log.read().unwrap().last_position().unwrap())
}

/// An empty log in a fresh temporary directory (kept alive by the returned guard), as
/// `spool init` makes it: its origin bound to a key, the root of its own fleet.
fn new_log() -> (tempfile::TempDir, Log) {
    let dir = tempfile::tempdir().unwrap();
    let key = spool::identity::NodeKey::generate();
    let log = Log::create(
        &dir.path().join("log.redb"),
        key.origin(),
        LogOptions {
            signer: Some(key.public().0),
            fleet_root: Some(key.origin()),
            ..LogOptions::default()
        },
    )
    .unwrap();
    (dir, log)
}

fn redb_rate(records: usize, per_commit: usize) -> f64 {
    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("raw.redb")).unwrap();
    let value = vec![7u8; 250];
    let started = Instant::now();
    let mut key = 0u64;
    for _ in 0..records.div_ceil(per_commit) {
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            for _ in 0..per_commit {
                key += 1;
                t.insert(key, value.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    key as f64 / started.elapsed().as_secs_f64()
}

fn blake3_rate(events: usize) -> f64 {
    let mut w = Workload::new(4);
    let sample: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            let e = w.event();
            let mut bytes = e.payload.clone();
            bytes.extend_from_slice(e.stream.as_bytes());
            bytes.resize(250, i as u8);
            bytes
        })
        .collect();
    let started = Instant::now();
    let mut acc = 0u8;
    for i in 0..events {
        acc ^= Hash::of(&sample[i % sample.len()]).0[0];
    }
    std::hint::black_box(acc);
    events as f64 / started.elapsed().as_secs_f64()
}

/// Today's path: each change is one autocommitted upsert into a WAL-mode SQLite file with the
/// default (FULL) synchronous setting, as better-sqlite3 on the seed's nodes does.
fn sqlite_upsert_rate(changes: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = rusqlite::Connection::open(dir.path().join("optimalos.db")).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.execute_batch(
        "CREATE TABLE activity_log (id TEXT PRIMARY KEY, stream TEXT NOT NULL, actor TEXT NOT NULL,
         message TEXT NOT NULL, source TEXT, meta TEXT, created_at INTEGER NOT NULL)",
    )
    .unwrap();
    let mut w = Workload::new(1);
    let rows: Vec<_> = (0..changes).map(|_| workload::row(&w.request())).collect();
    let mut stmt = db
        .prepare(
            "INSERT INTO activity_log (id, stream, actor, message, source, meta, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(id) DO UPDATE SET message = excluded.message, meta = excluded.meta",
        )
        .unwrap();
    let started = Instant::now();
    for (i, (stream, actor, message, source, meta)) in rows.iter().enumerate() {
        stmt.execute(rusqlite::params![
            format!("a-{i}"),
            stream,
            actor,
            message,
            source,
            meta,
            i as i64
        ])
        .unwrap();
    }
    changes as f64 / started.elapsed().as_secs_f64()
}

/// The median of `runs` measurements.
fn median_of(runs: usize, mut f: impl FnMut() -> f64) -> f64 {
    median((0..runs.max(1)).map(|_| f()).collect())
}

fn report(what: &str, rate: f64) {
    println!("{what:<58} {rate:>14.0}");
}

fn ratio(what: &str, a: f64, b: f64) {
    println!("{what:<58} {:>13.2}x", a / b);
}

fn target(what: &str, met: bool) {
    println!("{what:<58} {:>14}", if met { "met" } else { "NOT MET" });
}
