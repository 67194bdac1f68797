//! A writer process killed with SIGKILL at random moments loses no acknowledged event, and the log
//! verifies after every reopen.
//!
//! The test binary re-runs itself as the child (`SPOOL_CRASH_CHILD=<home>`): four threads append
//! single events and small batches through group commit and print each acknowledgement only after
//! `append` returned. The parent kills it at a random moment, then reopens the log and checks
//! every acknowledgement it read. `SPOOL_CRASH_ROUNDS` and `SPOOL_CRASH_SEED` override the defaults.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use spool::event::{EventId, Hash, Origin};
use spool::home::Home;
use spool::input::parse_request;

const CHILD_ENV: &str = "SPOOL_CRASH_CHILD";

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_event() {
    if let Ok(home) = std::env::var(CHILD_ENV) {
        child(Path::new(&home));
    }
    let rounds: u32 = env_or("SPOOL_CRASH_ROUNDS", 200);
    let seed: u64 = env_or("SPOOL_CRASH_SEED", 0x5eed_c0de);
    eprintln!("crash test: {rounds} rounds, seed {seed:#x}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let home_dir = dir.path().join("node");
    let home = Home::init(&home_dir, "crash").unwrap();
    let mut acked: HashMap<u64, (Origin, u64, Hash)> = HashMap::new();
    let mut killed_mid_append = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_at_random_moments_loses_no_acknowledged_event",
                "--nocapture",
            ])
            .env(CHILD_ENV, &home_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Most rounds wait for the first acknowledgement so the kill lands among appends; some
        // kill at any moment, start-up included.
        let mut got = Vec::new();
        if rng.random_ratio(9, 10) {
            if let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) {
                got.push(line);
            }
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..30_000)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        reader.join().unwrap();
        got.extend(lines.try_iter());
        if status.code().is_none() && !got.is_empty() {
            killed_mid_append += 1;
        }
        for line in &got {
            // A line cut short by the kill is not an acknowledgement we can trust; skip it.
            let Some((position, origin, seq, hash)) = parse_ack(line) else {
                continue;
            };
            let previous = acked.insert(position, (origin, seq, hash));
            assert!(
                previous.is_none_or(|p| p == (origin, seq, hash)),
                "round {round}: position {position} acknowledged twice with different events"
            );
        }
        check(&home, &acked, round);
    }
    eprintln!(
        "crash test: {} acknowledged events survived {rounds} kills ({killed_mid_append} during appends)",
        acked.len()
    );
    assert!(
        killed_mid_append >= rounds / 2,
        "too few kills landed during appends"
    );
}

fn check(home: &Home, acked: &HashMap<u64, (Origin, u64, Hash)>, round: u32) {
    let log = home
        .open_log()
        .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
    let reader = log.read().unwrap();
    for (&position, &(origin, seq, hash)) in acked {
        let record = reader
            .get(position)
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: acknowledged position {position} lost"));
        assert_eq!(
            record.hash, hash,
            "round {round}: position {position} changed"
        );
        assert_eq!(record.event().id(), EventId { origin, seq });
        assert_eq!(
            reader.position_of(EventId { origin, seq }).unwrap(),
            Some(position)
        );
    }
    let report = log.verify(2).unwrap();
    assert!(report.ok(), "round {round}: {:?}", report.problems);
    assert!(report.events >= acked.len() as u64);
}

fn parse_ack(line: &str) -> Option<(u64, Origin, u64, Hash)> {
    let mut parts = line.split(' ');
    let (tag, position, origin, seq, hash) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if tag != "ack" || parts.next().is_some() {
        return None;
    }
    Some((
        position.parse().ok()?,
        Origin::from_hex(origin).ok()?,
        seq.parse().ok()?,
        Hash::from_hex(hash).ok()?,
    ))
}

/// The child: appends until killed (or, as a bound, for 20 s).
fn child(home: &Path) -> ! {
    let home = Home::open(home).unwrap();
    let log = home.open_log().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    std::thread::scope(|s| {
        for t in 0..4 {
            let log = &log;
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let n = if rng.random_ratio(1, 4) {
                        rng.random_range(2..20)
                    } else {
                        1
                    };
                    let batch = (0..n)
                        .map(|_| {
                            i += 1;
                            parse_request(&common::activity(
                                &format!("crash/{t}"),
                                &format!("{t}-{i}"),
                            ))
                            .unwrap()
                        })
                        .collect();
                    let appended = log.append(batch).unwrap();
                    let mut out = std::io::stdout().lock();
                    for a in appended {
                        writeln!(out, "ack {} {} {} {}", a.position, a.origin, a.seq, a.hash)
                            .unwrap();
                    }
                    out.flush().unwrap();
                }
            });
        }
    });
    std::process::exit(0)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `spool serve` killed with SIGKILL at random moments while a client appends single events
/// through its socket (each made durable in the write-ahead segment and committed to redb
/// without a flush): every acknowledged event is there after the restart, once, and the log
/// verifies. `SPOOL_DAEMON_CRASH_ROUNDS` overrides the 200 rounds.
#[test]
fn sigkill_of_the_daemon_during_single_event_appends_loses_no_acknowledged_event() {
    use spool::input::AppendRequest;
    use spool::node::Node;
    let rounds: u32 = env_or("SPOOL_DAEMON_CRASH_ROUNDS", 200);
    let seed: u64 = env_or("SPOOL_CRASH_SEED", 0x5eed_da7a);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let home_dir = dir.path().join("node");
    let home = Home::init(&home_dir, "crash").unwrap();
    drop(home);
    let socket = home_dir.join("spool.sock");
    let mut acked: HashMap<u64, (Origin, u64, Hash)> = HashMap::new();
    let mut killed_mid_append = 0;
    for round in 0..rounds {
        // A killed daemon leaves its socket file: the next one is ready once it made its own.
        let _ = std::fs::remove_file(&socket);
        let daemon = daemon::start(common::SPOOL, &home_dir);
        let (acks_tx, acks) = mpsc::channel();
        let appender = {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let Ok(Some(mut node)) = spool::serve::client::Remote::connect(&socket) else {
                    return;
                };
                for i in 0.. {
                    let request = AppendRequest {
                        kind: "activity.logged".into(),
                        stream: "crash/daemon".into(),
                        actor: "crash".into(),
                        data: serde_json::json!({"message": format!("round {round} event {i}")}),
                        key: None,
                        correlation: None,
                        causation: None,
                    };
                    match node.append(vec![request]) {
                        Ok(done) => {
                            if acks_tx.send(done[0]).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            })
        };
        // Most rounds kill among appends; some right after the start.
        let mut got = Vec::new();
        if rng.random_ratio(9, 10) {
            if let Ok(ack) = acks.recv_timeout(Duration::from_secs(30)) {
                got.push(ack);
            }
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..100_000)));
        daemon::send_signal(daemon.id(), "KILL");
        let status = daemon.wait_with_output().unwrap().status;
        appender.join().unwrap();
        got.extend(acks.try_iter());
        if status.code().is_none() && !got.is_empty() {
            killed_mid_append += 1;
        }
        for ack in got {
            let previous = acked.insert(ack.position, (ack.origin, ack.seq, ack.hash));
            assert!(
                previous.is_none_or(|p| p == (ack.origin, ack.seq, ack.hash)),
                "round {round}: position {} acknowledged twice with different events",
                ack.position
            );
        }
        // Every tenth round opens the log here (as a command would); the others leave the
        // replay to the next daemon.
        if round % 10 == 9 || round + 1 == rounds {
            check(&Home::open(&home_dir).unwrap(), &acked, round);
        }
    }
    eprintln!(
        "daemon crash test: {} acknowledged events survived {rounds} kills ({killed_mid_append} during appends)",
        acked.len()
    );
    assert!(
        killed_mid_append >= rounds / 2,
        "too few kills landed during appends"
    );
}
