//! Sync between peers over TLS with the node keys (issue 26), on loopback: `spool sync peer`
//! exchanges both directions with a daemon's peers' door; a node of another fleet, a plaintext
//! client and an unknown key are refused before any request is read; two daemons listing each
//! other in `[[peers]]` keep each other current.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};

use serde_json::Value;

use common::{activity, ok, spool};

fn homes(dir: &Path, labels: &[&str]) -> Vec<PathBuf> {
    labels
        .iter()
        .map(|label| {
            let home = dir.join(label);
            ok(&home, &["init", "--label", label], "");
            home
        })
        .collect()
}

/// Appends `config` to the home's spool.toml.
fn configure(home: &Path, config: &str) {
    let path = home.join("spool.toml");
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    text.push_str(config);
    std::fs::write(&path, text).unwrap();
}

fn heads(home: &Path) -> Value {
    serde_json::from_str(&ok(home, &["heads", "--json"], "")).unwrap()
}

fn id(home: &Path) -> String {
    spool::home::Home::open(home).unwrap().origin().to_hex()
}

#[test]
fn sync_peer_exchanges_both_ways_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = homes(dir.path(), &["desk", "pi", "stranger"]);
    let (desk, pi, stranger) = (&h[0], &h[1], &h[2]);
    common::fleet(desk, &[pi]);
    let lines = |what: &str| -> String {
        (0..20)
            .map(|i| activity("board", &format!("{what} {i}")) + "\n")
            .collect()
    };
    ok(desk, &["append"], &lines("desk"));
    ok(pi, &["append"], &lines("pi"));
    let addr = daemon::free_loopback_addr();
    configure(desk, &format!("\n[peer]\nlisten = {addr:?}\n"));
    let served = daemon::start(common::SPOOL, desk);
    let out = ok(pi, &["sync", "peer", &addr, "--once", "--json"], "");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["peer"], id(desk), "{summary}");
    assert_eq!(summary["refused"], Value::Null, "{summary}");
    assert_eq!(summary["sent"], 20, "{summary}");
    assert!(summary["received"].as_u64().unwrap() >= 20, "{summary}");
    assert_eq!(heads(pi), heads(desk));
    // Again: nothing left to send either way.
    let again: Value =
        serde_json::from_str(ok(pi, &["sync", "peer", &addr, "--once", "--json"], "").trim())
            .unwrap();
    assert_eq!(
        (again["sent"].as_u64(), again["received"].as_u64()),
        (Some(0), Some(0))
    );
    // The same events on both sides: the same tables, no alarm.
    assert_eq!(again["divergent"], false, "{again}");
    // A projection changed behind spool's back: the same events, another digest.
    let db = rusqlite::Connection::open(pi.join("projection.sqlite")).unwrap();
    let changed = db
        .execute(
            "UPDATE activity_log SET message = 'changed by hand' WHERE message = 'pi 3'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    // The desk's daemon projects at idle priority: its digest is compared once its projection
    // covers what the Pi's does.
    let started = std::time::Instant::now();
    loop {
        let status: Value = serde_json::from_str(&ok(desk, &["status", "--json"], "")).unwrap();
        if status["daemon"]["lag_events"] == 0 {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = ok(pi, &["sync", "peer", &addr, "--once"], "");
    assert!(out.contains("DIVERGED"), "{out}");
    // Pinned to another origin: the desk's key is refused by the client.
    let pinned = spool(
        pi,
        &["sync", "peer", &addr, "--once", "--origin", &id(stranger)],
        "",
    );
    assert!(!pinned.status.success());
    // A node of another fleet is refused at the handshake, and learns nothing.
    let refused = spool(stranger, &["sync", "peer", &addr, "--once"], "");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("TLS handshake") || said.contains(&addr),
        "{said}"
    );
    assert_eq!(heads(stranger).get(id(desk)), None, "{}", heads(stranger));
    // Plaintext HTTP gets no answer: the connection ends without a byte of HTTP.
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    use std::io::{Read, Write};
    plain
        .write_all(b"GET /v1/heads HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1"),
        "{answer:?}"
    );
    daemon::stop(served);
}

#[test]
fn daemons_listing_each_other_keep_each_other_current() {
    let dir = tempfile::tempdir().unwrap();
    let h = homes(dir.path(), &["desk", "pi"]);
    let (desk, pi) = (&h[0], &h[1]);
    common::fleet(desk, &[pi]);
    let (desk_addr, pi_addr) = (daemon::free_loopback_addr(), daemon::free_loopback_addr());
    configure(
        desk,
        &format!("\n[peer]\nlisten = {desk_addr:?}\n\n[[peers]]\naddress = {pi_addr:?}\n"),
    );
    configure(
        pi,
        &format!("\n[peer]\nlisten = {pi_addr:?}\n\n[[peers]]\naddress = {desk_addr:?}\n"),
    );
    let daemons = [
        daemon::start(common::SPOOL, desk),
        daemon::start(common::SPOOL, pi),
    ];
    let count = |home: &Path| common::activity_count(home, "live");
    // Both have reached each other once.
    let ready = std::time::Instant::now();
    while [desk, pi].iter().any(|home| {
        let status: Value = serde_json::from_str(&ok(home, &["status", "--json"], "")).unwrap();
        status["daemon"]["peers"][0]["syncs"].as_u64().unwrap_or(0) == 0
    }) {
        assert!(
            ready.elapsed() < std::time::Duration::from_secs(60),
            "no first exchange"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let started = std::time::Instant::now();
    ok(desk, &["append"], &(activity("board", "live") + "\n"));
    while count(pi) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the event did not reach the Pi's projection"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // With the CLI's own start (a debug build) in it: `cargo bench --bench peers` measures it.
    println!(
        "append on the desk to the Pi's projection through the peers' door: {} ms",
        started.elapsed().as_millis()
    );
    ok(pi, &["append"], &(activity("board", "live") + "\n"));
    let started = std::time::Instant::now();
    while count(desk) < 2 {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status: Value = serde_json::from_str(&ok(pi, &["status", "--json"], "")).unwrap();
    let peer = &status["daemon"]["peers"][0];
    assert_eq!(peer["address"], desk_addr.as_str(), "{peer}");
    assert_eq!(peer["peer"], id(desk), "{peer}");
    assert_eq!(peer["reachable"], true, "{peer}");
    assert!(peer["syncs"].as_u64().unwrap() >= 1, "{peer}");
    for daemon in daemons {
        daemon::stop(daemon);
    }
    assert_eq!(heads(pi), heads(desk));
}

/// `spool pair code` on a member, `spool pair join` on a new device: the device is admitted
/// and takes the fleet's log; every step is an event; a 4th pending code, a wrong code, a used
/// code, two devices racing for one code and a brute-force run are each refused by name.
#[test]
fn a_device_pairs_by_code_and_every_misuse_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let h = homes(dir.path(), &["desk", "laptop", "phone", "tablet", "watch"]);
    let (desk, laptop, phone, tablet, watch) = (&h[0], &h[1], &h[2], &h[3], &h[4]);
    ok(
        desk,
        &["append"],
        &(activity("board", "before pairing") + "\n"),
    );
    let addr = daemon::free_loopback_addr();
    configure(desk, &format!("\n[peer]\nlisten = {addr:?}\n"));
    let served = daemon::start(common::SPOOL, desk);
    let mint = || -> Value {
        serde_json::from_str(ok(desk, &["pair", "code", "--json"], "").trim()).unwrap()
    };
    let first = mint();
    let code = first["code"].as_str().unwrap().to_owned();
    let fingerprint = first["fingerprint"].as_str().unwrap().to_owned();
    assert_eq!(fingerprint, id(desk));
    assert_eq!(first["address"], addr.as_str());
    let (second, third) = (mint(), mint());
    // A 4th pending code.
    let fourth = spool(desk, &["pair", "code"], "");
    assert!(!fourth.status.success());
    assert!(
        String::from_utf8_lossy(&fourth.stderr).contains("3 pairing codes are pending"),
        "{fourth:?}"
    );
    let join = |home: &Path, code: &str| {
        spool(
            home,
            &["pair", "join", &addr, code, "--origin", &fingerprint],
            "",
        )
    };
    let said = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // A wrong code.
    let wrong = join(laptop, "ABCDEFGH");
    assert!(!wrong.status.success());
    assert!(
        said(&wrong).contains("not one this node minted"),
        "{}",
        said(&wrong)
    );
    // The right one: the laptop is admitted and holds the desk's log.
    let joined = join(laptop, &code);
    assert!(joined.status.success(), "{}", said(&joined));
    assert!(heads(laptop).get(id(desk)).is_some(), "{}", heads(laptop));
    let fleet: Value = serde_json::from_str(&ok(laptop, &["fleet", "--json"], "")).unwrap();
    assert_eq!(fleet["root"], id(desk));
    let config = std::fs::read_to_string(laptop.join("spool.toml")).unwrap();
    assert!(config.contains(&addr), "{config}");
    // The same code again.
    let used = join(phone, &code);
    assert!(said(&used).contains("used already"), "{}", said(&used));
    // Two devices racing for one code: one has it.
    let racing = second["code"].as_str().unwrap().to_owned();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| join(phone, &racing));
        let b = s.spawn(|| join(tablet, &racing));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        [a.status.success(), b.status.success()]
            .iter()
            .filter(|&&won| won)
            .count(),
        1,
        "{}\n{}",
        said(&a),
        said(&b)
    );
    let loser = if a.status.success() { &b } else { &a };
    assert!(said(loser).contains("used already"), "{}", said(loser));
    // A brute-force run: the 5th failure since codes were last all settled cancels every
    // pending code, and the third code no longer works.
    let guesses: Vec<String> = ["AAAAAAAA", "BBBBBBBB", "CCCCCCCC"]
        .iter()
        .map(|guess| said(&join(watch, guess)))
        .collect();
    assert!(
        guesses
            .iter()
            .any(|g| g.contains("every pending code is cancelled")),
        "{guesses:?}"
    );
    let after = join(watch, third["code"].as_str().unwrap());
    assert!(!after.status.success());
    // A revoked device is never admitted again, whatever code it holds.
    ok(desk, &["fleet", "revoke", &id(laptop)], "");
    let fresh = mint();
    let again = join(laptop, fresh["code"].as_str().unwrap());
    assert!(said(&again).contains("revoked"), "{}", said(&again));
    // Every step is an event of the desk's pairing stream.
    let events = ok(
        desk,
        &["log", "--stream", &format!("pairing/{}", id(desk))],
        "",
    );
    for kind in [
        "pairing.requested",
        "pairing.completed",
        "pairing.attempt_failed",
        "pairing.cancelled",
    ] {
        assert!(events.contains(kind), "{kind}: {events}");
    }
    assert!(!events.contains(&code), "a code in the log");
    daemon::stop(served);
}

/// Starts `spool serve` for `home` with the wall clock `offset` ahead (libfaketime; monotonic
/// time stays real).
fn start_at(offset: &str, home: &Path) -> std::process::Child {
    let _ = std::fs::remove_file(home.join("spool.sock"));
    // The library itself, preloaded (the `faketime` wrapper would stand between the test and
    // the daemon's signals); multithreaded, as the daemon is.
    let library = glob_one("/usr/lib", "faketime/libfaketimeMT.so.1")
        .expect("libfaketime (ops/ensure-faketime installs it)");
    let mut command = std::process::Command::new(common::SPOOL);
    command
        .env("LD_PRELOAD", library)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    daemon::start_with(command, home)
}

/// `dir/*/tail`, the first that exists.
fn glob_one(dir: &str, tail: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(tail))
        .find(|p| p.exists())
}

/// A code past its 60 minutes is refused by name and marked `pairing.expired`; one minted later
/// still works. The member's clock is moved with libfaketime.
#[test]
fn an_expired_code_is_refused_and_marked_expired() {
    let dir = tempfile::tempdir().unwrap();
    let h = homes(dir.path(), &["desk", "laptop"]);
    let (desk, laptop) = (&h[0], &h[1]);
    let addr = daemon::free_loopback_addr();
    configure(desk, &format!("\n[peer]\nlisten = {addr:?}\n"));
    let mint = || -> Value {
        serde_json::from_str(ok(desk, &["pair", "code", "--json"], "").trim()).unwrap()
    };
    let served = start_at("+0s", desk);
    let early = mint();
    daemon::stop(served);
    let served = start_at("+50m", desk);
    let later = mint();
    daemon::stop(served);
    // 70 minutes on: the first code is past its time, the second is not.
    let served = start_at("+70m", desk);
    let fingerprint = early["fingerprint"].as_str().unwrap();
    let join = |code: &Value| {
        spool(
            laptop,
            &[
                "pair",
                "join",
                &addr,
                code["code"].as_str().unwrap(),
                "--origin",
                fingerprint,
            ],
            "",
        )
    };
    let expired = join(&early);
    let said = String::from_utf8_lossy(&expired.stderr).into_owned();
    assert!(!expired.status.success());
    assert!(said.contains("the code expired"), "{said}");
    let pairings: Value = serde_json::from_str(ok(desk, &["pair", "--json"], "").trim()).unwrap();
    let state = |id: &Value| {
        pairings
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pairing_id"] == *id)
            .map(|p| p["state"].clone())
    };
    assert_eq!(
        state(&early["pairing_id"]),
        Some(Value::from("expired")),
        "{pairings}"
    );
    assert_eq!(
        state(&later["pairing_id"]),
        Some(Value::from("pending")),
        "{pairings}"
    );
    let joined = join(&later);
    assert!(
        joined.status.success(),
        "{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    daemon::stop(served);
}

/// Events relay: the Pi and the desk reach only the cloud VM (each lists it in `[[peers]]`; only
/// the VM listens), and an event written on the desk reaches the Pi through it.
#[test]
fn events_relay_through_a_peer_both_reach() {
    let dir = tempfile::tempdir().unwrap();
    let h = homes(dir.path(), &["vm", "desk", "pi"]);
    let (vm, desk, pi) = (&h[0], &h[1], &h[2]);
    common::fleet(vm, &[desk, pi]);
    let addr = daemon::free_loopback_addr();
    configure(vm, &format!("\n[peer]\nlisten = {addr:?}\n"));
    for home in [desk, pi] {
        configure(home, &format!("\n[[peers]]\naddress = {addr:?}\n"));
    }
    let daemons: Vec<_> = [vm, desk, pi]
        .iter()
        .map(|home| daemon::start(common::SPOOL, home))
        .collect();
    ok(desk, &["append"], &(activity("board", "relayed") + "\n"));
    let started = std::time::Instant::now();
    while heads(pi).get(id(desk)).is_none() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the desk's event did not reach the Pi through the VM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for daemon in daemons {
        daemon::stop(daemon);
    }
    assert_eq!(heads(pi), heads(desk));
}
