//! Push and pull through the fleet's Postgres hub, over TLS to a local throwaway cluster (the
//! tests' harness, `replay-tests/common/pg.rs`; fsync off unless `SPOOL_TEST_PG_DURABLE=1`),
//! beside the batched append and the file ingest of the same events measured in the same run.
//!
//! Then the live path: two `spool serve` daemons in one fleet, each with `[hub] url`; events
//! appended one per request through the first at `SPOOL_BENCH_RATE` a second (default 1 000)
//! for `SPOOL_BENCH_SECONDS` (default 10), and for each the time from its request to the second
//! daemon's live projection holding it (its `projected` position, read every 2 ms): p50, p99,
//! max.
//!
//! `cargo bench --bench hub`. Every throughput figure is the median of `SPOOL_BENCH_RUNS` runs
//! (default 3); `SPOOL_BENCH_SCALE` (default 1.0) scales the event count (1 000 000).

#[path = "../replay-tests/common/daemon.rs"]
mod daemon;

mod live;
#[path = "../replay-tests/common/pg.rs"]
mod pg;
mod workload;

/// The spool binary's allocator, so the bench runs the code as `spool` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use spool::identity::NodeKey;
use spool::log::{Log, LogOptions};
use spool::sync::hub::Hub;
use spool::sync::{file as shipping, Selection};
use workload::{env_or, median, Workload};

fn main() {
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 3);
    let scale: f64 = env_or("SPOOL_BENCH_SCALE", 1.0);
    let events = ((1_000_000.0 * scale) as usize).max(10_000);
    println!("spool hub bench: {events} events, {runs} runs per figure, medians");
    let (admin, url) = tls_cluster();
    let (mut appends, mut ingests, mut pushes, mut pulls) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs.max(1) {
        let dir = tempfile::tempdir().unwrap();
        let source_key = NodeKey::generate();
        let source = node(&dir, "source", &source_key);
        let mut w = Workload::new(7);
        let batches: Vec<_> = (0..events / 10_000).map(|_| w.events(10_000)).collect();
        let started = Instant::now();
        for batch in batches {
            source.append(batch).unwrap();
        }
        appends.push(events as f64 / started.elapsed().as_secs_f64());

        // The same events by file, into a member of the source's fleet.
        let file = dir.path().join("export.spool");
        let out = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        shipping::export(
            &source.read().unwrap(),
            &Selection::default(),
            out,
            Some(&source_key),
            |_| {},
        )
        .unwrap();
        let by_file = member(&dir, "by-file", &source_key);
        let input = std::io::BufReader::new(std::fs::File::open(&file).unwrap());
        let started = Instant::now();
        let summary = shipping::ingest(&by_file, input, |_| {}).unwrap();
        ingests.push(events as f64 / started.elapsed().as_secs_f64());
        assert_eq!(summary.report.applied, events as u64);

        // Push into an empty hub, then pull into another member.
        let db = format!("hub_bench_{run}");
        pg::connect(&admin)
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
        let url = format!("{url} dbname={db}");
        let mut hub = Hub::open(&url).unwrap();
        let started = Instant::now();
        let pushed = hub.sync(&source, Some(&source_key), |_| {}).unwrap();
        pushes.push(events as f64 / started.elapsed().as_secs_f64());
        assert_eq!(pushed.pushed, events as u64);
        let puller_key = NodeKey::generate();
        let puller = member_with(&dir, "by-hub", &puller_key, &source_key);
        let mut hub = Hub::open(&url).unwrap();
        let started = Instant::now();
        let pulled = hub.sync(&puller, Some(&puller_key), |_| {}).unwrap();
        pulls.push(events as f64 / started.elapsed().as_secs_f64());
        assert_eq!(
            pulled.applied + pulled.released,
            events as u64,
            "{pulled:?}"
        );
        assert!(pulled.refused().next().is_none(), "{pulled:?}");
        // The next run starts on a cluster without this one's million rows (with them left in
        // place, the push's median of 3 rounds was a fifth below a single round's).
        drop(hub);
        pg::connect(&admin)
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .unwrap();
    }
    let (append, ingest, push, pull) = (
        median(appends),
        median(ingests),
        median(pushes),
        median(pulls),
    );
    println!("{:<58} {:>14}", "figure", "events/s");
    println!(
        "{:<58} {append:>14.0}",
        "spool durable append, 10 000 events per commit"
    );
    println!(
        "{:<58} {ingest:>14.0}",
        "spool ingest of the signed export file"
    );
    println!(
        "{:<58} {push:>14.0}",
        "push to the hub (TLS, COPY), from empty"
    );
    println!(
        "{:<58} {pull:>14.0}",
        "pull from the hub (TLS), every event checked"
    );
    println!("{:<58} {:>13.2}x", "push / append", push / append);
    println!("{:<58} {:>13.2}x", "pull / ingest", pull / ingest);
    for (name, value) in [
        ("push >= 100 000 events/s", push),
        ("pull >= 100 000 events/s", pull),
    ] {
        let met = if value >= 100_000.0 { "met" } else { "NOT MET" };
        println!("{name:<58} {met:>14}");
    }
    let rate: f64 = env_or("SPOOL_BENCH_RATE", 1_000.0);
    let seconds: f64 = env_or("SPOOL_BENCH_SECONDS", 10.0);
    live::print(live(&admin, &url, rate, seconds), rate, seconds, 1_000.0);
}

/// Two daemons of one fleet syncing through the hub; `rate` single-event appends a second
/// through the first for `seconds`. Returns each event's time from request to the second's
/// projection.
fn live(admin: &str, url: &str, rate: f64, seconds: f64) -> live::Latencies {
    let db = "hub_bench_live";
    pg::connect(admin)
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let url = format!("{url} dbname={db}");
    let dir = tempfile::tempdir().unwrap();
    let homes = live::fleet(dir.path(), &["desk", "pi"], |_| {
        format!("\n[hub]\nurl = {url:?}\n")
    });
    let daemons: Vec<_> = homes
        .iter()
        .map(|h| daemon::start(live::SPOOL, h))
        .collect();
    // Both have done a first round (the hub's tables exist, LISTEN is on).
    let base = live::wait_ready(&[&homes[0], &homes[1]], |d| {
        d.hub.as_ref().is_some_and(|h| h.syncs > 0)
    });
    let latencies = live::append_to_projection(&homes[0], &homes[1], base, rate, seconds);
    for daemon in daemons {
        daemon::stop(daemon);
    }
    latencies
}

/// A TLS-only cluster; the admin URL (Unix socket) and a `verify-full` URL without a database.
fn tls_cluster() -> (String, String) {
    let (admin, port, ca_pem) = pg::start_tls_with_new_ca();
    let ca_file =
        std::env::temp_dir().join(format!("spool-hub-bench-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!(
        "host=localhost port={port} user=postgres sslmode=verify-full sslrootcert={}",
        ca_file.display()
    );
    (admin, url)
}

/// A keyed node, the root of its own fleet.
fn node(dir: &tempfile::TempDir, name: &str, key: &NodeKey) -> Log {
    member_with(dir, name, key, key)
}

/// A new node (its own key) in the fleet of `root`: it takes the root's events.
fn member(dir: &tempfile::TempDir, name: &str, root: &NodeKey) -> Log {
    member_with(dir, name, &NodeKey::generate(), root)
}

/// A node with `key` in the fleet of `root`.
fn member_with(dir: &tempfile::TempDir, name: &str, key: &NodeKey, root: &NodeKey) -> Log {
    Log::create(
        &dir.path().join(format!("{name}.redb")),
        key.origin(),
        LogOptions {
            signer: Some(key.public().0),
            fleet_root: Some(root.origin()),
            ..LogOptions::default()
        },
    )
    .unwrap()
}
