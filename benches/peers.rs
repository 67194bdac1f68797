//! Sync between peers over the TLS door on loopback (`serve::peer`): 1 000 000 events from a
//! node's daemon to a fresh member, one exchange, beside the ingest of the same events from an
//! export file into another fresh member, measured in the same run; then the live path, two
//! daemons listing each other in `[[peers]]`, 1 000 single-event appends a second through one,
//! each timed to the other's projection.
//!
//! `cargo bench --bench peers`. `SPOOL_BENCH_RUNS` (default 3) rounds, medians;
//! `SPOOL_BENCH_SCALE` (default 1.0) scales the event count; `SPOOL_BENCH_RATE` (1 000) and
//! `SPOOL_BENCH_SECONDS` (10) the live load.

#[path = "../replay-tests/common/daemon.rs"]
mod daemon;
mod live;
mod workload;

/// The spool binary's allocator, so the bench runs the code as `spool` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use spool::home::Home;
use spool::serve::peer::{self, Link};
use spool::sync::file as shipping;
use workload::{env_or, median, Workload};

fn main() {
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 3usize).max(1);
    let scale: f64 = env_or("SPOOL_BENCH_SCALE", 1.0);
    let events = ((1_000_000.0 * scale) as usize).max(10_000);
    println!("spool peers bench: {events} events, {runs} runs per figure, medians");
    let dir = tempfile::tempdir().unwrap();
    let addr = daemon::free_loopback_addr();
    // The source and one fresh member per run for each way in, all in one fleet.
    let mut labels = vec!["source".to_owned()];
    for run in 0..runs {
        labels.push(format!("by-file-{run}"));
        labels.push(format!("by-peer-{run}"));
    }
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let homes = live::fleet(dir.path(), &labels, |i| match i {
        0 => format!("\n[peer]\nlisten = {addr:?}\n"),
        _ => String::new(),
    });
    {
        let source = Home::open(&homes[0]).unwrap().open_log().unwrap();
        let mut w = Workload::new(7);
        for _ in 0..events / 10_000 {
            source.append(w.events(10_000)).unwrap();
        }
    }
    let file = dir.path().join("source.spool");
    live::run(&homes[0], &["export", "--out", file.to_str().unwrap()]);
    let served = daemon::start(live::SPOOL, &homes[0]);
    let (mut ingests, mut transfers) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let by_file = Home::open(&homes[1 + 2 * run]).unwrap().open_log().unwrap();
        let input = std::io::BufReader::new(std::fs::File::open(&file).unwrap());
        let started = Instant::now();
        let summary = shipping::ingest(&by_file, input, |_| {}).unwrap();
        let took = started.elapsed();
        assert!(summary.report.applied as usize >= events, "{summary:?}");
        ingests.push(events as f64 / took.as_secs_f64());
        drop(by_file);

        let home = Home::open(&homes[2 + 2 * run]).unwrap();
        let key = home.node_key().unwrap().unwrap();
        let log = std::sync::Arc::new(home.open_log().unwrap());
        let members = log.clone();
        let admit = peer::admit(move |k| peer::member_key(&members, k), None);
        let link = Link::new(&addr, &key, admit).unwrap();
        let started = Instant::now();
        let summary = peer::exchange(&log, Some(&key), &link).unwrap();
        let took = started.elapsed();
        assert!(summary.applied as usize >= events, "{summary:?}");
        assert_eq!(summary.refused, None);
        transfers.push((events as f64 / took.as_secs_f64(), took.as_secs_f64()));
    }
    daemon::stop(served);
    let ingest = median(ingests);
    let transfer = median(transfers.iter().map(|t| t.0).collect());
    let seconds = median(transfers.iter().map(|t| t.1).collect());
    println!("{:<58} {:>14}", "figure", "events/s");
    println!(
        "{:<58} {ingest:>14.0}",
        "spool ingest of the signed export file"
    );
    println!(
        "{:<58} {transfer:>14.0}",
        "to a fresh peer over the TLS door (one exchange)"
    );
    println!("{:<58} {:>13.2}x", "peer / ingest", transfer / ingest);
    println!("{:<58} {seconds:>13.2}s", "the transfer took");
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!(
        "{:<58} {:>14}",
        "peer >= 0.5x ingest",
        verdict(transfer >= 0.5 * ingest)
    );
    println!(
        "{:<58} {:>14}",
        "1 000 000 events <= 5 s",
        verdict(seconds * 1_000_000.0 / events as f64 <= 5.0)
    );

    // The live path: two daemons listing each other.
    let rate: f64 = env_or("SPOOL_BENCH_RATE", 1_000.0);
    let live_seconds: f64 = env_or("SPOOL_BENCH_SECONDS", 10.0);
    let live_dir = tempfile::tempdir().unwrap();
    let (a, b) = (daemon::free_loopback_addr(), daemon::free_loopback_addr());
    let pair = live::fleet(live_dir.path(), &["desk", "pi"], |i| {
        let (own, other) = if i == 0 { (&a, &b) } else { (&b, &a) };
        format!("\n[peer]\nlisten = {own:?}\n\n[[peers]]\naddress = {other:?}\n")
    });
    let daemons: Vec<_> = pair.iter().map(|h| daemon::start(live::SPOOL, h)).collect();
    let base = live::wait_ready(&[&pair[0], &pair[1]], |d| {
        d.peers.first().is_some_and(|p| p.syncs > 0)
    });
    let latencies = live::append_to_projection(&pair[0], &pair[1], base, rate, live_seconds);
    for daemon in daemons {
        daemon::stop(daemon);
    }
    live::print(latencies, rate, live_seconds, 100.0);
}
