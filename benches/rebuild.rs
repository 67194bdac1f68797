//! Rebuild of the SQLite projection from a 1 000 000-event log, beside a plain bulk insert of
//! the same final rows into SQLite in the same run.
//!
//! `cargo bench --bench rebuild`. Medians of `SPOOL_BENCH_RUNS` (default 3); `SPOOL_BENCH_SCALE`
//! scales the event count; `SPOOL_BENCH_HELD_MIB` sets the upserts held a commit (default: the
//! rebuild's).

mod workload;

/// The spool binary's allocator, so the bench runs the code as `spool` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use rusqlite::Connection;
use spool::event::Origin;
use spool::log::{Log, LogOptions};
use spool::project::sqlite::{Durability, Sqlite, HELD_BYTES_REBUILD, INDEXES, PAGE_BYTES, SCHEMA};
use spool::project::{self, Until};
use workload::{env_or, median, Mixed};

fn main() {
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 3);
    let scale: f64 = env_or("SPOOL_BENCH_SCALE", 1.0);
    let held_mib: usize = env_or("SPOOL_BENCH_HELD_MIB", HELD_BYTES_REBUILD >> 20);
    let events = ((1_000_000.0 * scale) as usize / 10_000).max(1) * 10_000;
    println!("spool rebuild bench: {events} events (tasks, scores, Loom, heartbeats, activity), {runs} runs, medians");
    let dir = tempfile::tempdir().unwrap();
    let log = Log::create(
        &dir.path().join("log.redb"),
        Origin([1; 16]),
        LogOptions::default(),
    )
    .unwrap();
    let mut w = Mixed::new(11);
    for _ in 0..events / 10_000 {
        log.append(w.events(10_000)).unwrap();
    }
    // Closed and opened again, so the rebuild reads the file as `spool rebuild sqlite` does,
    // not pages the appends left in the log's cache.
    drop(log);
    let log = Log::open(
        &dir.path().join("log.redb"),
        Origin([1; 16]),
        LogOptions::default(),
    )
    .unwrap();
    let reader = log.read().unwrap();
    let mut rebuilds = Vec::new();
    let mut inserts = Vec::new();
    let mut rows = 0;
    for run in 0..runs.max(1) {
        let path = dir.path().join(format!("p{run}.sqlite"));
        let started = Instant::now();
        let mut db = Sqlite::open(&path, Durability::Rebuild).unwrap();
        db.hold_at_most(held_mib << 20);
        let last = reader.last_position().unwrap();
        let mut streamed = None;
        let applied = project::replay(&reader, &mut db, 0, Until::default(), |p| {
            if p == last {
                streamed = Some(started.elapsed());
            }
        })
        .unwrap();
        let replayed = started.elapsed();
        db.finish().unwrap();
        let took = started.elapsed();
        let streamed = streamed.unwrap_or(replayed);
        println!(
            "  run {run}: events projected and append-only rows written {:.2} s, merged rows and commit {:.2} s, indexes {:.2} s",
            streamed.as_secs_f64(),
            (replayed - streamed).as_secs_f64(),
            (took - replayed).as_secs_f64()
        );
        rebuilds.push(applied as f64 / took.as_secs_f64());
        let (seconds, n) = plain_insert(&path, &dir.path().join(format!("plain{run}.sqlite")));
        rows = n;
        inserts.push(applied as f64 / seconds);
    }
    let (rebuild, insert) = (median(rebuilds), median(inserts));
    println!("{:<64} {:>12}", "figure", "events/s");
    println!(
        "{:<64} {rebuild:>12.0}",
        format!("spool rebuild sqlite (upserts held up to {held_mib} MiB a commit)")
    );
    println!(
        "{:<64} {insert:>12.0}",
        format!("plain bulk insert of the same {rows} final rows, one transaction")
    );
    println!(
        "{:<64} {:>11.2}x",
        "rebuild / plain insert",
        rebuild / insert
    );
    let met = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!(
        "{:<64} {:>12}",
        "rebuild >= 400 000 events/s",
        met(rebuild >= 400_000.0)
    );
    println!(
        "{:<64} {:>12}",
        "rebuild >= 0.5x plain insert",
        met(rebuild >= 0.5 * insert)
    );
}

/// Copies every row of the projection at `from` into a new file with the same schema, with
/// one prepared INSERT per table in one transaction: the floor for writing these rows. Returns
/// the seconds the copy took and the row count.
fn plain_insert(from: &std::path::Path, to: &std::path::Path) -> (f64, u64) {
    let source = Connection::open(from).unwrap();
    let tables: Vec<String> = {
        let mut s = source
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type='table' AND name NOT LIKE 'sqlite_%'",
            )
            .unwrap();
        s.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // The rows, in memory, with the column names the insert needs (generated columns skipped).
    let mut data: Vec<(String, Vec<String>, Vec<Vec<rusqlite::types::Value>>)> = Vec::new();
    for t in &tables {
        let cols: Vec<String> = {
            let mut s = source
                .prepare("SELECT name FROM pragma_table_xinfo(?1) WHERE hidden = 0")
                .unwrap();
            s.query_map([t], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let mut s = source
            .prepare(&format!("SELECT {} FROM {t}", cols.join(", ")))
            .unwrap();
        let rows = s
            .query_map([], |r| {
                (0..cols.len())
                    .map(|i| r.get(i))
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        data.push((t.clone(), cols, rows));
    }
    let db = Connection::open(to).unwrap();
    // The projection's page size, so the peer differs only in how it gets its rows.
    db.pragma_update(None, "page_size", PAGE_BYTES).unwrap();
    db.pragma_update(None, "journal_mode", "OFF").unwrap();
    db.pragma_update(None, "synchronous", "OFF").unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db.execute_batch(INDEXES).unwrap();
    let started = Instant::now();
    let tx = db.unchecked_transaction().unwrap();
    let mut n = 0;
    for (t, cols, rows) in &data {
        let marks = vec!["?"; cols.len()].join(", ");
        let mut stmt = tx
            .prepare(&format!(
                "INSERT INTO {t} ({}) VALUES ({marks})",
                cols.join(", ")
            ))
            .unwrap();
        for row in rows {
            stmt.execute(rusqlite::params_from_iter(row.iter()))
                .unwrap();
            n += 1;
        }
    }
    tx.commit().unwrap();
    drop(db);
    (started.elapsed().as_secs_f64(), n)
}
