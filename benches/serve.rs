//! `spool serve` under load over its Unix socket: 1, 16 and 64 clients sending single-event and
//! 100-event requests, each client waiting for its acknowledgement before the next request;
//! events/s and p50/p99 acknowledgement latency. Beside it, in the same run on the same machine,
//! a Postgres events table appended one INSERT per event in autocommit (the way a
//! Postgres-backed event store appends), on a throwaway cluster with fsync and synchronous
//! commit on, as spool's commits are durable.
//!
//! `cargo bench --bench serve`. `SPOOL_BENCH_SECONDS` (default 3) per configuration.

#[path = "../replay-tests/common/pg.rs"]
mod pg;
mod workload;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool::serve::client::Client;
use workload::{env_or, Workload};

/// Events per second, and the median and 99th percentile acknowledgement latency.
struct Figure {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() {
    let seconds: f64 = env_or("SPOOL_BENCH_SECONDS", 3.0);
    // Set before any thread starts: the cluster reads it when it is first used.
    std::env::set_var("SPOOL_TEST_PG_DURABLE", "1");
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    let spool = env!("CARGO_BIN_EXE_spool");
    let ok = Command::new(spool)
        .arg("--home")
        .arg(&home)
        .args(["init", "--label", "bench"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let mut daemon = Command::new(spool)
        .arg("--home")
        .arg(&home)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = home.join("spool.sock");
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = pg::database();
    let mut client = pg::connect(&url);
    client
        .batch_execute(
            "CREATE TABLE events (origin text NOT NULL, seq bigserial, stream text NOT NULL, \
             actor text NOT NULL, kind text NOT NULL, data jsonb NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (origin, seq))",
        )
        .unwrap();
    println!("spool serve load bench: {seconds} s per configuration; Postgres with fsync on");
    println!(
        "{:<48} {:>12} {:>9} {:>9}",
        "figure", "events/s", "p50 ms", "p99 ms"
    );
    let mut results = Vec::new();
    for batch in [1usize, 100] {
        for clients in [1usize, 16, 64] {
            let ours = spool_load(&socket, clients, batch, seconds);
            print(
                &format!("spool serve, {clients} clients x {batch}-event requests"),
                &ours,
            );
            if batch == 1 {
                let peer = postgres_load(&url, clients, seconds);
                print(
                    &format!("Postgres INSERT per event, {clients} clients"),
                    &peer,
                );
                println!(
                    "{:<48} {:>11.1}x",
                    "  spool / Postgres",
                    ours.rate / peer.rate
                );
            }
            results.push((clients, batch, ours));
        }
    }
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(
        daemon.wait().unwrap().success(),
        "spool serve drains and exits 0"
    );
    let find = |c, b| &results.iter().find(|r| r.0 == c && r.1 == b).unwrap().2;
    let met = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!(
        "{:<48} {:>12}",
        ">= 50 000 single-event appends/s, 64 clients",
        met(find(64, 1).rate >= 50_000.0)
    );
    let batched = results
        .iter()
        .filter(|r| r.1 == 100)
        .map(|r| r.2.rate)
        .fold(0.0, f64::max);
    println!(
        "{:<48} {:>12}",
        ">= 300 000 events/s in 100-event requests",
        met(batched >= 300_000.0)
    );
    println!(
        "{:<48} {:>12}",
        "p99 acknowledgement <= 5 ms, 16 clients",
        met(find(16, 1).p99_ms <= 5.0)
    );
}

fn print(label: &str, f: &Figure) {
    println!(
        "{label:<48} {:>12.0} {:>9.2} {:>9.2}",
        f.rate, f.p50_ms, f.p99_ms
    );
}

fn figure(events: u64, elapsed: Duration, mut latencies: Vec<Duration>) -> Figure {
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Figure {
        rate: events as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

/// `clients` connections, each sending `batch`-event requests back to back for `seconds`.
fn spool_load(socket: &Path, clients: usize, batch: usize, seconds: f64) -> Figure {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (socket, latencies, events) =
                (socket.to_owned(), latencies.clone(), events.clone());
            tasks.push(tokio::spawn(async move {
                let mut w = Workload::new(c as u64);
                let mut client = Client::connect(&socket).await.unwrap();
                let mut mine = Vec::new();
                while Instant::now() < until {
                    let body: Vec<serde_json::Value> =
                        (0..batch).map(|_| request_json(&mut w)).collect();
                    let body = match batch {
                        1 => serde_json::to_vec(&body[0]).unwrap(),
                        _ => serde_json::to_vec(&body).unwrap(),
                    };
                    let sent = Instant::now();
                    let (status, _) = client.request("POST", "/v1/events", body).await.unwrap();
                    match status {
                        200 => {
                            mine.push(sent.elapsed());
                            events.fetch_add(batch as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                        503 => tokio::time::sleep(Duration::from_millis(1)).await,
                        other => panic!("status {other}"),
                    }
                }
                latencies.lock().unwrap().extend(mine);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = started.elapsed();
    let latencies = Arc::try_unwrap(latencies).unwrap().into_inner().unwrap();
    figure(
        events.load(std::sync::atomic::Ordering::Relaxed),
        elapsed,
        latencies,
    )
}

fn request_json(w: &mut Workload) -> serde_json::Value {
    let r = w.request();
    serde_json::json!({"kind": r.kind, "stream": r.stream, "actor": r.actor, "data": r.data})
}

/// `clients` connections, each inserting one event row per statement in autocommit.
fn postgres_load(url: &str, clients: usize, seconds: f64) -> Figure {
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                let mut client = pg::connect(&url);
                let insert = client
                    .prepare(
                        "INSERT INTO events (origin, stream, actor, kind, data) \
                         VALUES ($1, $2, $3, $4, $5::text::jsonb)",
                    )
                    .unwrap();
                let mut w = Workload::new(1_000 + c as u64);
                let mut mine = Vec::new();
                while Instant::now() < until {
                    let r = w.request();
                    let data = r.data.to_string();
                    let sent = Instant::now();
                    client
                        .execute(
                            &insert,
                            &[&format!("node{c}"), &r.stream, &r.actor, &r.kind, &data],
                        )
                        .unwrap();
                    mine.push(sent.elapsed());
                }
                mine
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(t.join().unwrap());
    }
    let elapsed = started.elapsed();
    figure(latencies.len() as u64, elapsed, latencies)
}
