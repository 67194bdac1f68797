//! The live path between two daemons, shared by the hub and peers benches: a fleet of two homes
//! made with the `spool` binary, and the time from an append through one daemon to the other
//! daemon's live projection holding the event.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use spool::serve::client::Client;

use crate::workload::Workload;

pub const SPOOL: &str = env!("CARGO_BIN_EXE_spool");

/// Runs `spool --home HOME ARGS`, which must succeed.
pub fn run(home: &Path, args: &[&str]) {
    let out = Command::new(SPOOL)
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Homes `labels` under `dir`, the first the root of a fleet the others joined; `config(i)` is
/// appended to each one's spool.toml.
pub fn fleet(dir: &Path, labels: &[&str], config: impl Fn(usize) -> String) -> Vec<PathBuf> {
    let homes: Vec<PathBuf> = labels.iter().map(|l| dir.join(l)).collect();
    for (home, label) in homes.iter().zip(labels) {
        run(home, &["init", "--label", label]);
    }
    for other in &homes[1..] {
        run(
            &homes[0],
            &["fleet", "admit", other.join("node.toml").to_str().unwrap()],
        );
    }
    let file = dir.join("fleet.spool");
    run(&homes[0], &["export", "--out", file.to_str().unwrap()]);
    for other in &homes[1..] {
        run(other, &["fleet", "join", file.to_str().unwrap()]);
    }
    for (i, home) in homes.iter().enumerate() {
        let path = home.join("spool.toml");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&config(i));
        std::fs::write(&path, text).unwrap();
    }
    homes
}

/// The daemon's own part of `GET /v1/status`.
pub async fn status(client: &mut Client) -> spool::wire::DaemonStatus {
    let (code, body) = client
        .request("GET", "/v1/status", Vec::new())
        .await
        .unwrap();
    assert_eq!(code, 200);
    let status: spool::wire::Status = serde_json::from_slice(&body).unwrap();
    status.daemon.expect("the daemon's status")
}

/// Waits until every daemon of `homes` says `ready` and its projection is caught up; returns
/// the last one's projected position.
pub fn wait_ready(homes: &[&Path], ready: impl Fn(&spool::wire::DaemonStatus) -> bool) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let started = Instant::now();
        loop {
            let mut all = true;
            let mut projected = 0;
            for home in homes {
                let mut client = Client::connect(&home.join("spool.sock")).await.unwrap();
                let daemon = status(&mut client).await;
                all &= ready(&daemon) && daemon.lag_events == 0;
                projected = daemon.projected;
            }
            if all {
                return projected;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the daemons did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// What [`append_to_projection`] measured, per event.
pub struct Latencies {
    /// From the request until the receiving log held it.
    pub to_log: Vec<Duration>,
    /// From the request until the receiving projection held it.
    pub to_projection: Vec<Duration>,
}

/// `rate` single-event appends a second for `seconds` through the daemon of `from`, each timed
/// from its request until the daemon of `to` held it in its log and in its projection (its
/// event count and `projected` position past `base`, read every 2 ms; only `from` writes
/// meanwhile, and `to`'s log and projection stood at `base` when it began).
pub fn append_to_projection(
    from: &Path,
    to: &Path,
    base: u64,
    rate: f64,
    seconds: f64,
) -> Latencies {
    let events = (rate * seconds) as usize;
    let mut w = Workload::new(11);
    let bodies: Vec<Vec<u8>> = (0..events)
        .map(|_| {
            let r = w.request();
            serde_json::to_vec(&serde_json::json!({"kind": r.kind, "stream": r.stream, "actor": r.actor, "data": r.data}))
                .unwrap()
        })
        .collect();
    let (sent, seen) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                // Light reads, so that watching does not slow what is watched: the heads (the
                // log holds the sum of their seqs), and the projection's own checkpoint.
                let mut client = Client::connect(&to.join("spool.sock")).await.unwrap();
                let projection = rusqlite::Connection::open_with_flags(
                    to.join("projection.sqlite"),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .unwrap();
                let mut seen = Vec::with_capacity(events);
                let mut logged = Vec::with_capacity(events);
                let started = Instant::now();
                while seen.len() < events {
                    let (code, body) = client
                        .request("GET", "/v1/heads", Vec::new())
                        .await
                        .unwrap();
                    assert_eq!(code, 200);
                    let heads: spool::wire::Heads = serde_json::from_slice(&body).unwrap();
                    let held: u64 = heads.values().sum();
                    let projected: u64 = projection
                        .query_row(
                            "SELECT position FROM spool_checkpoint WHERE id = 1",
                            [],
                            |r| r.get::<_, i64>(0),
                        )
                        .map_or(0, |p| p as u64);
                    let now = Instant::now();
                    while (logged.len() as u64) < held.saturating_sub(base) {
                        logged.push(now);
                    }
                    while (seen.len() as u64) < projected.saturating_sub(base) {
                        seen.push(now);
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs_f64(seconds + 120.0),
                        "the receiving projection holds {} of {events}",
                        seen.len()
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                logged.truncate(events);
                (logged, seen)
            })
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sent = runtime.block_on(async {
            let mut client = Client::connect(&from.join("spool.sock")).await.unwrap();
            let started = Instant::now();
            let mut sent = Vec::with_capacity(events);
            for (i, body) in bodies.into_iter().enumerate() {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                sent.push(Instant::now());
                let (code, _) = client.request("POST", "/v1/events", body).await.unwrap();
                assert_eq!(code, 200);
            }
            sent
        });
        (sent, watcher.join().unwrap())
    });
    let (logged, seen) = seen;
    Latencies {
        to_log: sent.iter().zip(&logged).map(|(s, p)| *p - *s).collect(),
        to_projection: sent.iter().zip(&seen).map(|(s, p)| *p - *s).collect(),
    }
}

/// Prints the live figures and whether their p99 is within `target_ms`.
pub fn print(latencies: Latencies, rate: f64, seconds: f64, target_ms: f64) {
    let (l50, l99, lmax) = percentiles(latencies.to_log);
    let (p50, p99, max) = percentiles(latencies.to_projection);
    println!(
        "{:<58} {:>14}",
        format!("live: append to a peer's projection, {rate} events/s"),
        "p50/p99/max ms"
    );
    println!(
        "{:<58} {:>14}",
        format!("  {} events, one per request", (rate * seconds) as u64),
        format!("{p50:.0}/{p99:.0}/{max:.0}")
    );
    println!(
        "{:<58} {:>14}",
        "  of which to the peer's log",
        format!("{l50:.0}/{l99:.0}/{lmax:.0}")
    );
    let met = if p99 <= target_ms { "met" } else { "NOT MET" };
    println!("{:<58} {met:>14}", format!("live p99 <= {target_ms} ms"));
}

/// p50, p99 and the largest, in ms.
pub fn percentiles(mut latencies: Vec<Duration>) -> (f64, f64, f64) {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99), at(1.0))
}
