//! Ingest of a 1 000 000-event export into an empty home, beside the same node's batched
//! append rate in the same run. The source node has a key, so the export carries a signed head
//! every 1 000 events and ingest checks each and holds back every run until its head.
//!
//! `cargo bench --bench ingest`. Every figure is the median of `SPOOL_BENCH_RUNS` runs (default
//! 3); `SPOOL_BENCH_SCALE` (default 1.0) scales the event count.

mod workload;

/// The spool binary's allocator, so the bench runs the code as `spool` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufReader, BufWriter};
use std::time::Instant;

use spool::log::{Log, LogOptions};
use spool::sync::{file as shipping, Selection};
use workload::{env_or, median, Workload};

fn main() {
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 3);
    let scale: f64 = env_or("SPOOL_BENCH_SCALE", 1.0);
    let events = ((1_000_000.0 * scale) as usize).max(10_000);
    println!("spool ingest bench: {events} events, {runs} runs per figure, medians");
    let mut appends = Vec::new();
    let mut ingests = Vec::new();
    let mut verifies = Vec::new();
    let mut bytes = 0;
    for _ in 0..runs.max(1) {
        let dir = tempfile::tempdir().unwrap();
        let key = spool::identity::NodeKey::generate();
        let source = Log::create(
            &dir.path().join("source.redb"),
            key.origin(),
            LogOptions {
                signer: Some(key.public().0),
                ..LogOptions::default()
            },
        )
        .unwrap();
        let mut w = Workload::new(7);
        let batches: Vec<_> = (0..events / 10_000).map(|_| w.events(10_000)).collect();
        let started = Instant::now();
        for batch in batches {
            source.append(batch).unwrap();
        }
        appends.push(events as f64 / started.elapsed().as_secs_f64());

        let path = dir.path().join("export.spool");
        let out = BufWriter::new(std::fs::File::create(&path).unwrap());
        let reader = source.read().unwrap();
        shipping::export(&reader, &Selection::default(), out, Some(&key), |_| {}).unwrap();
        drop(reader);
        bytes = std::fs::metadata(&path).unwrap().len();

        // The receiving node is in a fleet that admitted the source: every event is asked of
        // the membership, and every run must come under a signed head.
        let target_key = spool::identity::NodeKey::generate();
        let target = Log::create(
            &dir.path().join("target.redb"),
            target_key.origin(),
            LogOptions {
                signer: Some(target_key.public().0),
                fleet_root: Some(target_key.origin()),
                ..LogOptions::default()
            },
        )
        .unwrap();
        target.append(vec![admission(&key)]).unwrap();
        let input = BufReader::new(std::fs::File::open(&path).unwrap());
        let started = Instant::now();
        let summary = shipping::ingest(&target, input, |_| {}).unwrap();
        ingests.push(events as f64 / started.elapsed().as_secs_f64());
        assert_eq!(summary.report.applied, events as u64);
        assert!(summary.file_error.is_none() && summary.refused.is_none());
        let heads = target.read().unwrap().signed_heads(key.origin()).unwrap();
        assert_eq!(
            heads.len(),
            events.div_ceil(1_000),
            "a signed head every 1 000 events"
        );
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let report = target.verify(threads).unwrap();
        assert!(report.ok() && report.signatures == heads.len() as u64);
        verifies.push(report.events as f64 / started.elapsed().as_secs_f64());
    }
    let (append, ingest) = (median(appends), median(ingests));
    println!("{:<58} {:>14}", "figure", "events/s");
    println!(
        "{:<58} {append:>14.0}",
        "spool durable append, 10 000 events per commit"
    );
    println!(
        "{:<58} {ingest:>14.0}",
        format!(
            "spool ingest of a {events}-event signed export ({} MB)",
            bytes >> 20
        )
    );
    println!("{:<58} {:>13.2}x", "ingest / append", ingest / append);
    println!(
        "{:<58} {:>14.0}",
        format!(
            "verify of the ingested log ({} signed heads), all cores",
            events.div_ceil(1_000)
        ),
        median(verifies)
    );
    let met = if ingest >= 0.5 * append {
        "met"
    } else {
        "NOT MET"
    };
    println!("{:<58} {met:>14}", "ingest >= 0.5x append");
}

/// The receiving node's admission of the source's key.
fn admission(key: &spool::identity::NodeKey) -> spool::event::NewEvent {
    spool::input::new_event(spool::input::AppendRequest {
        kind: "device.paired".into(),
        stream: format!("device/{}", key.origin()),
        actor: "bench".into(),
        data: serde_json::json!({"device_id": key.origin().to_hex(), "label": "source",
            "capabilities": ["sync"], "signing_public_key": key.public().to_hex(),
            "pairing_id": null}),
        key: None,
        correlation: None,
        causation: None,
    })
    .unwrap()
}
