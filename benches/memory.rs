//! Peak memory of `spool ingest` and `spool rebuild sqlite` as the input grows tenfold: both
//! hold a byte budget (ingest batches of 32 MiB, the replay's read-ahead of 1 MiB chunks), so
//! their peak resident set stays flat while the input grows. Events carry a large `meta`
//! (256 KiB each by default), the case where budgets counted in events let memory follow the
//! data. The peer printed beside each figure is the input's own size.
//!
//! `cargo bench --bench memory`. `SPOOL_BENCH_MIB` (default 200, above what the budgets hold,
//! so the 1x run already fills them) is the 1x input in MiB of payload; `SPOOL_BENCH_EVENT_KIB`
//! (default 256) an event's payload.

mod workload;

use std::path::Path;
use std::process::Command;

use serde_json::json;
use spool::home::Home;
use spool::input::{new_event, AppendRequest};
use workload::env_or;

const SPOOL: &str = env!("CARGO_BIN_EXE_spool");

fn main() {
    let base_mib: usize = env_or("SPOOL_BENCH_MIB", 200);
    let event_kib: usize = env_or("SPOOL_BENCH_EVENT_KIB", 256);
    println!(
        "spool memory bench: events of {event_kib} KiB, inputs of {base_mib} and {} MiB",
        base_mib * 10
    );
    let mut table = Vec::new();
    for scale in [1, 10] {
        let dir = tempfile::tempdir().unwrap();
        let events = base_mib * 1024 / event_kib * scale;
        let source = dir.path().join("source");
        fill(&source, events, event_kib);
        let file = dir.path().join("export.spool");
        run(&source, &["export", "--out", file.to_str().unwrap()]);
        let file_mib = std::fs::metadata(&file).unwrap().len() as f64 / (1 << 20) as f64;

        let target = dir.path().join("target");
        run(&target, &["init", "--label", "target"]);
        let ingest_mib = run(&target, &["ingest", file.to_str().unwrap()]);
        let rebuild_mib = run(&target, &["rebuild", "sqlite"]);
        println!(
            "{scale:>2}x: {events} events, export {file_mib:.0} MiB: peak RSS ingest {ingest_mib:.0} MiB, rebuild {rebuild_mib:.0} MiB"
        );
        table.push((file_mib, ingest_mib, rebuild_mib));
        if std::env::var_os("SPOOL_BENCH_KEEP").is_some() {
            println!("kept {}", dir.keep().display());
        }
    }
    let (small, large) = (table[0], table[1]);
    println!(
        "input grew {:.1}x; peak RSS grew {:.2}x (ingest) and {:.2}x (rebuild)",
        large.0 / small.0,
        large.1 / small.1,
        large.2 / small.2
    );
}

/// A home holding `events` events of `event_kib` KiB of payload each, appended in batches.
fn fill(home: &Path, events: usize, event_kib: usize) {
    let home = Home::init(home, "source").unwrap();
    let log = home.open_log().unwrap();
    let blob = "x".repeat(event_kib * 1024 - 64);
    let mut batch = Vec::new();
    for i in 0..events {
        let request: AppendRequest = serde_json::from_value(json!({
            "kind": "activity.logged", "stream": format!("s/{}", i % 16), "actor": "bench",
            "data": {"message": format!("event {i}"), "meta": {"blob": blob}},
        }))
        .unwrap();
        batch.push(new_event(request).unwrap());
        if batch.len() == 64 {
            log.append(std::mem::take(&mut batch)).unwrap();
        }
    }
    if !batch.is_empty() {
        log.append(batch).unwrap();
    }
}

/// Runs `spool --home HOME ARGS` to its end; returns its peak resident set in MiB.
// The child is reaped by `wait4` (which also reports its peak), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run(home: &Path, args: &[&str]) -> f64 {
    let child = Command::new(SPOOL)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SPOOL_HOME")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (status, kib) = wait_with_peak(child.id());
    assert!(status == 0, "spool {args:?} exited {status}");
    kib as f64 / 1024.0
}

/// Waits for a child and returns its exit status and peak resident set (KiB), from `wait4`.
fn wait_with_peak(pid: u32) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value, and wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid as i32, "wait4");
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}
