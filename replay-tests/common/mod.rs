//! Shared by the integration tests: run the `spool` binary against a home.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SPOOL: &str = env!("CARGO_BIN_EXE_spool");

/// Runs `spool --home HOME ARGS` with `stdin`, giving up (and failing) after 60 s. Its output
/// is read while it runs, so a large one cannot fill the pipe and stall it.
pub fn spool(home: &Path, args: &[&str], stdin: &str) -> Output {
    run(Command::new(SPOOL), home, args, stdin)
}

/// As [`spool`], with the wall clock as libfaketime's `offset` sets it (`+5h`, `-1h`,
/// `@1970-01-01 00:10:00`); monotonic time stays real. `ops/ensure-faketime` installs it.
pub fn spool_at(offset: &str, home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut command = Command::new("faketime");
    command
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .args(["-f", offset, SPOOL]);
    run(command, home, args, stdin)
}

fn run(mut command: Command, home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = command
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SPOOL_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let text = stdin.to_owned();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("spool {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    feeder.join().unwrap();
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Copies a folder (a home with no daemon running on it) as `cp -a` does: a backup or a restore.
pub fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs under a faked clock (as [`spool_at`]) and insists on exit 0, returning stdout.
pub fn ok_at(offset: &str, home: &Path, args: &[&str], stdin: &str) -> String {
    succeeded(spool_at(offset, home, args, stdin), args)
}

/// Runs and insists on exit 0, returning stdout.
pub fn ok(home: &Path, args: &[&str], stdin: &str) -> String {
    succeeded(spool(home, args, stdin), args)
}

/// Runs and insists on a failure whose standard error says `said`; returns the output.
pub fn refused(home: &Path, args: &[&str], stdin: &str, said: &str) -> Output {
    let o = spool(home, args, stdin);
    assert!(!o.status.success(), "spool {args:?} succeeded");
    assert!(stderr(&o).contains(said), "{}", stderr(&o));
    o
}

fn succeeded(o: Output, args: &[&str]) -> String {
    assert!(
        o.status.success(),
        "spool {args:?} failed: {}\n{}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// One `activity.logged` request line.
pub fn activity(stream: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "activity.logged", "stream": stream, "actor": "test",
        "data": {"message": message},
    })
    .to_string()
}

/// How many rows of the home's projected `activity_log` carry `message` (a plain word).
pub fn activity_count(home: &Path, message: &str) -> u64 {
    let sql = format!("SELECT count(*) AS n FROM activity_log WHERE message = '{message}'");
    let out = ok(home, &["sql", &sql], "");
    serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["n"]
        .as_u64()
        .unwrap()
}

/// Makes `root` the root of a fleet that `others` join, as a person would: the root admits each
/// by its node.toml, exports, and each joins by ingesting that export.
pub fn fleet(root: &Path, others: &[&Path]) {
    for other in others {
        let node_file = other.join("node.toml");
        ok(root, &["fleet", "admit", node_file.to_str().unwrap()], "");
    }
    let file = root.with_extension("fleet.spool");
    ok(root, &["export", "--out", file.to_str().unwrap()], "");
    for other in others {
        ok(other, &["fleet", "join", file.to_str().unwrap()], "");
    }
    std::fs::remove_file(file).unwrap();
}
