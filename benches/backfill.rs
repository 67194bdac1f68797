//! `spool backfill postgres` from a 1 000 000-event log into a throwaway PostgreSQL cluster,
//! beside, in the same run and on the same server, the way rows reach Supabase today: one
//! upsert per change, each its own autocommit statement (measured on the first
//! `SPOOL_BENCH_PEER_EVENTS` events, default 20 000, and reported per event).
//!
//! `cargo bench --bench backfill`. Medians of `SPOOL_BENCH_RUNS` (default 3);
//! `SPOOL_BENCH_SCALE` scales the event count. The cluster is durable (fsync and synchronous
//! commit on), as Supabase's is: the per-row peer then waits for the WAL at every statement, as
//! it does in production. `SPOOL_BENCH_PG_FSYNC=off` runs both sides with the test harness's
//! fsync off instead, which favours the peer.

#[path = "../replay-tests/common/pg.rs"]
mod pg;
mod workload;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use postgres::types::ToSql;
use spool::event::Origin;
use spool::log::{Filter, Log, LogOptions};
use spool::project::postgres::Postgres;
use spool::project::{self, Context, Until, Val, Write};
use workload::{env_or, median, Mixed};

fn main() {
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 3);
    let scale: f64 = env_or("SPOOL_BENCH_SCALE", 1.0);
    let peer_events: usize = env_or("SPOOL_BENCH_PEER_EVENTS", 20_000);
    let events = ((1_000_000.0 * scale) as usize / 10_000).max(1) * 10_000;
    let durable = std::env::var("SPOOL_BENCH_PG_FSYNC").as_deref() != Ok("off");
    // Set before any thread starts: the cluster reads it when it is first used.
    if durable {
        std::env::set_var("SPOOL_TEST_PG_DURABLE", "1");
    }
    println!(
        "spool backfill bench: {events} events (tasks, scores, Loom, heartbeats, activity), {runs} runs, medians; Postgres fsync {}",
        if durable { "on" } else { "off" }
    );
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin([1; 16]);
    let log = Log::create(&dir.path().join("log.redb"), origin, LogOptions::default()).unwrap();
    let mut w = Mixed::new(11);
    for _ in 0..events / 10_000 {
        log.append(w.events(10_000)).unwrap();
    }
    // Closed and opened again, so the backfill reads the file as `spool backfill postgres`
    // does, not pages the appends left in the log's cache.
    drop(log);
    let log = Log::open(&dir.path().join("log.redb"), origin, LogOptions::default()).unwrap();
    let reader = log.read().unwrap();
    let last = reader.last_position().unwrap();
    let mut backfills = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..runs.max(1) {
        let url = pg::database();
        let started = Instant::now();
        let (mut target, pinned) = Postgres::backfill(&url, origin, last).unwrap();
        let until = Until {
            position: Some(pinned),
            time_ms: None,
        };
        let mut streamed = None;
        let applied = project::resume(&reader, &mut target, until, |p| {
            if p == pinned {
                streamed = Some(started.elapsed());
            }
        })
        .unwrap();
        let replayed = started.elapsed();
        target.swap().unwrap();
        let took = started.elapsed();
        let streamed = streamed.unwrap_or(replayed);
        println!(
            "  events projected and append-only rows copied {:.2} s, merged rows and commit {:.2} s, indexes, keys and swap {:.2} s",
            streamed.as_secs_f64(),
            (replayed - streamed).as_secs_f64(),
            (took - replayed).as_secs_f64()
        );
        backfills.push(applied as f64 / took.as_secs_f64());
        peers.push(row_upserts(&reader, &pg::database(), origin, peer_events));
    }
    let (backfill, peer) = (median(backfills), median(peers));
    println!("{:<64} {:>12}", "figure", "events/s");
    println!(
        "{:<64} {backfill:>12.0}",
        "spool backfill postgres (binary COPY into shadow tables, swap)"
    );
    println!(
        "{:<64} {peer:>12.0}",
        format!("one upsert per change, autocommit (first {peer_events} events)")
    );
    println!(
        "{:<64} {:>11.1}x",
        "backfill / row upserts",
        backfill / peer
    );
    let met = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!(
        "{:<64} {:>12}",
        "backfill >= 250 000 events/s",
        met(backfill >= 250_000.0)
    );
    println!(
        "{:<64} {:>12}",
        "backfill >= 50x row upserts",
        met(backfill >= 50.0 * peer)
    );
}

/// Today's path: every change is one `INSERT ... ON CONFLICT DO UPDATE` of the row's new values
/// (append-only rows: `DO NOTHING`), sent on its own in autocommit. Returns events/s.
fn row_upserts(reader: &spool::log::Reader, url: &str, origin: Origin, events: usize) -> f64 {
    // The tables, made by the live target.
    drop(Postgres::connect(url, origin).unwrap());
    let mut client = pg::connect(url);
    let page = reader.scan(0, events, &Filter::default()).unwrap();
    let mut writes = Vec::new();
    for record in &page.records {
        let event = record.event();
        let body = spool::kinds::body(event.kind(), event.version(), event.payload()).unwrap();
        // A single-node log: its causal orders are its stamps.
        writes.push(project::writes(&Context::of(&event, event.hlc()), &body));
    }
    let mut statements = std::collections::HashMap::new();
    let started = Instant::now();
    for event in &writes {
        for write in event {
            let (sql, values) = upsert_of(write);
            if !statements.contains_key(&sql) {
                let prepared = client.prepare(&sql).unwrap();
                statements.insert(sql.clone(), prepared);
            }
            let params: Vec<&(dyn ToSql + Sync)> =
                values.iter().map(|v| *v as &(dyn ToSql + Sync)).collect();
            client.execute(&statements[&sql], &params).unwrap();
        }
    }
    page.records.len() as f64 / started.elapsed().as_secs_f64()
}

/// A plain row upsert: the write's columns replace the stored ones (no stamps compared).
fn upsert_of(write: &Write) -> (String, Vec<&Val>) {
    match write {
        Write::Insert { table, cols } => {
            let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
            let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
            (
                format!(
                    "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT DO NOTHING",
                    names.join(", "),
                    marks.join(", ")
                ),
                cols.iter().map(|c| &c.1).collect(),
            )
        }
        Write::Upsert {
            table, key, groups, ..
        } => {
            let mut names: Vec<&str> = key.iter().map(|c| c.0).collect();
            let mut values: Vec<&Val> = key.iter().map(|c| &c.1).collect();
            for g in groups {
                names.extend(g.cols.iter().map(|c| c.0));
                values.extend(g.cols.iter().map(|c| &c.1));
            }
            let keys: Vec<&str> = key.iter().map(|c| c.0).collect();
            let sets: Vec<String> = names[keys.len()..]
                .iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
            let action = match sets.is_empty() {
                true => "NOTHING".to_owned(),
                false => format!("UPDATE SET {}", sets.join(", ")),
            };
            (
                format!(
                    "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
                    names.join(", "),
                    marks.join(", "),
                    keys.join(", ")
                ),
                values,
            )
        }
    }
}
