//! Sync through the fleet's Postgres hub (issue 25), against a throwaway cluster that takes TLS
//! only (`common/pg.rs`, a CA made here): homes that talk only to the hub converge, one offline
//! for a while catches up, two pushing the same events at once store them once, forged rows
//! are refused by name and the rest syncs, and `anon` and `authenticated` see nothing.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/pg.rs"]
mod pg;

use std::path::{Path, PathBuf};

use serde_json::Value;

use common::{activity, ok, spool};

struct TlsHub {
    admin: String,
    url: String,
    _dir: tempfile::TempDir,
}

/// A TLS-only cluster with a database for the hub; `url` connects with `verify-full`.
fn tls_hub() -> TlsHub {
    let (admin, port, ca_pem) = pg::start_tls_with_new_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let name = format!("hub{:08x}", rand::random::<u32>());
    pg::connect(&admin)
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    TlsHub {
        admin: format!("{admin} dbname={name}"),
        url: format!(
            "host=localhost port={port} user=postgres dbname={name} sslmode=verify-full sslrootcert={}",
            ca_file.display()
        ),
        _dir: dir,
    }
}

fn sync(home: &Path, hub: &TlsHub) -> Value {
    let out = ok(
        home,
        &["sync", "hub", "--url", &hub.url, "--once", "--json"],
        "",
    );
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn heads(home: &Path) -> String {
    ok(home, &["heads", "--json"], "")
}

fn digest(home: &Path) -> String {
    ok(home, &["digest", "sqlite"], "")
}

fn homes(dir: &Path) -> Vec<PathBuf> {
    let homes: Vec<PathBuf> = ["desk", "pi", "vm"]
        .iter()
        .map(|label| {
            let home = dir.join(label);
            ok(&home, &["init", "--label", label], "");
            home
        })
        .collect();
    common::fleet(&homes[0], &[&homes[1], &homes[2]]);
    homes
}

#[test]
fn homes_that_talk_only_to_the_hub_converge_and_forged_rows_are_refused() {
    let hub = tls_hub();
    let dir = tempfile::tempdir().unwrap();
    let homes = homes(dir.path());
    let (desk, pi, vm) = (&homes[0], &homes[1], &homes[2]);
    let hub_ref = &hub;
    // Three rounds: the desk and the Pi write at once and sync; the VM is offline.
    for round in 0..3 {
        std::thread::scope(|s| {
            for home in [desk, pi] {
                s.spawn(move || {
                    let lines: String = (0..50)
                        .map(|i| activity("board", &format!("round {round} event {i}")) + "\n")
                        .collect();
                    ok(home, &["append"], &lines);
                    sync(home, hub_ref);
                });
            }
        });
    }
    // Two pushes of the same events at once: stored once, no fork; each says, per origin, what
    // of it was new.
    ok(
        desk,
        &["append"],
        &(activity("board", "pushed twice") + "\n"),
    );
    let relayed = dir.path().join("relayed.spool");
    ok(desk, &["export", "--out", relayed.to_str().unwrap()], "");
    ok(pi, &["ingest", relayed.to_str().unwrap()], "");
    ok(
        desk,
        &["append"],
        &(activity("board", "pushed twice") + "\n"),
    );
    ok(pi, &["append"], &(activity("board", "pushed twice") + "\n"));
    let both: Vec<Value> = std::thread::scope(|s| {
        let runs: Vec<_> = [desk, pi]
            .into_iter()
            .map(|home| s.spawn(move || sync(home, hub_ref)))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut pushed_per_origin = 0;
    for summary in &both {
        let per_origin: u64 = summary["origins"]
            .as_object()
            .unwrap()
            .values()
            .map(|o| o["pushed"].as_u64().unwrap())
            .sum();
        assert_eq!(Some(per_origin), summary["pushed"].as_u64(), "{summary}");
        pushed_per_origin += per_origin;
    }
    assert_eq!(pushed_per_origin, 3, "{both:?}");
    for home in [desk, pi] {
        sync(home, &hub);
    }
    // Rows of an origin that is no member of the fleet, written straight into the hub: a
    // member never reads them (nothing refused, the round succeeds).
    let stranger = "0102030405060708090a0b0c0d0e0f10";
    pg::connect(&hub.admin)
        .execute(
            "INSERT INTO spool_hub_events (origin, seq, hash, bytes) \
             SELECT decode($1, 'hex'), s, sha256(s::text::bytea), '\\x00'::bytea FROM generate_series(1, 100) s",
            &[&stranger],
        )
        .unwrap();
    // The VM was offline all along: it catches up in one run.
    let caught = sync(vm, &hub);
    assert_eq!(caught["origins"][stranger], Value::Null, "{caught}");
    pg::connect(&hub.admin)
        .execute(
            "DELETE FROM spool_hub_events WHERE origin = decode($1, 'hex')",
            &[&stranger],
        )
        .unwrap();
    let landed = caught["applied"].as_u64().unwrap() + caught["released"].as_u64().unwrap();
    assert_eq!(landed, 303, "{caught}");
    // Per origin: what the hub held, what the VM holds now, what it pulled of each.
    for home in [desk, pi] {
        let o = &caught["origins"][id(home)];
        assert_eq!(o["hub_holds"], o["held"], "{caught}");
        assert_eq!(o["lag"], 0, "{caught}");
        assert!(o["pulled"].as_u64().unwrap() >= 151, "{caught}");
        assert_eq!(o["refused"], Value::Null, "{caught}");
    }
    for home in [desk, pi] {
        sync(home, &hub);
    }
    assert_eq!(heads(desk), heads(pi));
    assert_eq!(heads(pi), heads(vm));
    assert_eq!(digest(desk), digest(pi));
    assert_eq!(digest(pi), digest(vm));
    // Each published its projection's digest beside the events it covers: equal, no alarm.
    for home in [desk, pi, vm] {
        assert_eq!(sync(home, &hub)["divergent"], serde_json::json!([]));
    }
    let mut admin = pg::connect(&hub.admin);
    // A node that published the desk's events with other tables raises the alarm.
    admin
        .execute(
            "INSERT INTO spool_hub_nodes (origin, vector, digest) \
             SELECT '\\x0102030405060708090a0b0c0d0e0f10'::bytea, vector, 'not the same digest' \
             FROM spool_hub_nodes WHERE origin = decode($1, 'hex')",
            &[&id(desk)],
        )
        .unwrap();
    let alarm = sync(desk, &hub);
    assert_eq!(
        alarm["divergent"],
        serde_json::json!(["0102030405060708090a0b0c0d0e0f10"]),
        "{alarm}"
    );
    admin
        .execute("DELETE FROM spool_hub_nodes WHERE origin = '\\x0102030405060708090a0b0c0d0e0f10'::bytea", &[])
        .unwrap();
    let (rows, forks): (i64, i64) = {
        let r = admin
            .query_one(
                "SELECT (SELECT count(*) FROM spool_hub_events), (SELECT count(*) FROM spool_hub_forks)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let events: i64 = serde_json::from_str::<Value>(&ok(desk, &["status", "--json"], "")).unwrap()
        ["events"]
        .as_i64()
        .unwrap();
    assert_eq!((rows, forks), (events, 0), "every event once, no fork");

    // A forged row, written straight into the hub by someone holding its key: the desk's newest
    // event altered. The VM refuses it by name, takes nothing more of the desk, and still takes
    // the Pi's new event.
    ok(desk, &["append"], &(activity("board", "genuine") + "\n"));
    ok(pi, &["append"], &(activity("board", "genuine too") + "\n"));
    sync(desk, &hub);
    sync(pi, &hub);
    let desk_origin = id(desk);
    admin
        .execute(
            "UPDATE spool_hub_events SET bytes = overlay(bytes placing '\\x00'::bytea from 40 for 1) \
             WHERE origin = decode($1, 'hex') AND seq = (SELECT max(seq) FROM spool_hub_events WHERE origin = decode($1, 'hex'))",
            &[&desk_origin],
        )
        .unwrap();
    let before: Value = serde_json::from_str(&heads(vm)).unwrap();
    refused_round(vm, &hub, &desk_origin, "hash mismatch");
    let after: Value = serde_json::from_str(&heads(vm)).unwrap();
    assert_eq!(
        after[&desk_origin], before[&desk_origin],
        "nothing of the forged origin taken"
    );
    assert_eq!(
        after[id(pi)].as_u64(),
        before[id(pi)].as_u64().map(|s| s + 1),
        "the rest synced"
    );
    // `verify-full` against a name the server's certificate does not carry is refused by name,
    // before anything is read or written.
    let wrong_host = hub.url.replace("host=localhost", "host=127.0.0.1");
    let refused = spool(vm, &["sync", "hub", "--url", &wrong_host, "--once"], "");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("host 127.0.0.1") && said.contains("not valid for name"),
        "{said}"
    );
    assert_eq!(serde_json::from_str::<Value>(&heads(vm)).unwrap(), after);
    // The API roles see and write nothing of the hub.
    for role in ["anon", "authenticated"] {
        let mut tx = admin.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE {role}")).unwrap();
        let seen = tx.query("SELECT 1 FROM spool_hub_events LIMIT 1", &[]);
        assert!(
            seen.is_err() || seen.unwrap().is_empty(),
            "{role} reads the hub"
        );
        drop(tx);
        let mut tx = admin.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE {role}")).unwrap();
        let wrote = tx.execute(
            "INSERT INTO spool_hub_events (origin, seq, hash, bytes) VALUES ('\\x00'::bytea, 1, '\\x00'::bytea, '\\x00'::bytea)",
            &[],
        );
        assert!(wrote.is_err(), "{role} writes the hub");
    }
}

fn id(home: &Path) -> String {
    spool::home::Home::open(home).unwrap().origin().to_hex()
}

/// Two daemons with `[hub] url` set: an event appended through one reaches the other's
/// projection through the hub, woken by LISTEN/NOTIFY; the time it took is printed. Status and
/// metrics report the hub.
#[test]
fn an_event_reaches_a_peers_projection_through_the_hub_live() {
    let hub = tls_hub();
    let dir = tempfile::tempdir().unwrap();
    let homes = homes(dir.path());
    let (desk, pi) = (&homes[0], &homes[1]);
    for home in [desk, pi] {
        let config = home.join("spool.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("\n[hub]\nurl = {:?}\n", hub.url));
        std::fs::write(&config, text).unwrap();
    }
    let daemons: Vec<_> = [desk, pi]
        .iter()
        .map(|home| daemon::start(common::SPOOL, home))
        .collect();
    let count = |home: &Path| common::activity_count(home, "live");
    // Both daemons have done a first round (the hub's tables exist, LISTEN is on).
    let ready = std::time::Instant::now();
    while [desk, pi].iter().any(|h| {
        let status: Value = serde_json::from_str(&ok(h, &["status", "--json"], "")).unwrap();
        status["daemon"]["hub"]["syncs"].as_u64().unwrap_or(0) == 0
    }) {
        assert!(
            ready.elapsed() < std::time::Duration::from_secs(60),
            "no first hub round"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let started = std::time::Instant::now();
    ok(desk, &["append"], &(activity("board", "live") + "\n"));
    while count(pi) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the event did not reach the Pi's projection"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!(
        "append on the desk to the Pi's projection through the hub: {} ms",
        started.elapsed().as_millis()
    );
    let status: Value = serde_json::from_str(&ok(pi, &["status", "--json"], "")).unwrap();
    let report = &status["daemon"]["hub"];
    assert!(report["pulled"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["last_error"], Value::Null, "{report}");
    let desk_there = &report["origins"][id(desk)];
    assert!(desk_there["pulled"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(desk_there["refused"], Value::Null, "{report}");
    // `heads` through the daemon says what the hub holds of each origin beside this node's.
    let listed = ok(pi, &["heads"], "");
    let desk_line = listed
        .lines()
        .find(|l| l.starts_with(&id(desk)))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        desk_line.contains(&format!("hub seq {}", desk_there["hub_holds"])),
        "{listed}"
    );
    let metrics = daemon_metrics(pi);
    for name in [
        "spool_hub_pulled_events_total",
        "spool_hub_lag_events",
        "spool_hub_refused_origins 0",
    ] {
        assert!(metrics.contains(name), "{name}: {metrics}");
    }
    for daemon in daemons {
        daemon::stop(daemon);
    }
}

fn daemon_metrics(home: &Path) -> String {
    let socket = home.join(spool::serve::SOCKET);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = spool::serve::client::Client::connect(&socket)
            .await
            .unwrap();
        let (_, body) = client.request("GET", "/metrics", Vec::new()).await.unwrap();
        String::from_utf8_lossy(&body).into_owned()
    })
}

/// A push and a pull killed at a moment in their middle resume on the next run without loss
/// or duplicates; rows cut from the hub's end are refused by name.
#[test]
fn killed_syncs_resume_and_a_truncated_hub_is_refused_by_name() {
    let hub = tls_hub();
    let dir = tempfile::tempdir().unwrap();
    let homes = homes(dir.path());
    let (desk, vm) = (&homes[0], &homes[2]);
    let lines: String = (0..30_000)
        .map(|i| activity("board", &format!("bulk {i}")) + "\n")
        .collect();
    ok(desk, &["append"], &lines);
    let killed_run = |home: &Path, after_ms: u64| {
        let mut child = std::process::Command::new(common::SPOOL)
            .args([
                "--home",
                home.to_str().unwrap(),
                "sync",
                "hub",
                "--once",
                "--url",
                &hub.url,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(after_ms));
        let _ = child.kill();
        child.wait().unwrap();
    };
    let mut admin = pg::connect(&hub.admin);
    let count = |admin: &mut postgres::Client, sql: &str| -> i64 {
        admin.query_one(sql, &[]).unwrap().get(0)
    };
    let hub_rows = |admin: &mut postgres::Client| {
        let exists: bool = admin
            .query_one("SELECT to_regclass('spool_hub_events') IS NOT NULL", &[])
            .unwrap()
            .get(0);
        match exists {
            true => count(admin, "SELECT count(*) FROM spool_hub_events"),
            false => 0,
        }
    };
    let events: i64 = serde_json::from_str::<Value>(&ok(desk, &["status", "--json"], "")).unwrap()
        ["events"]
        .as_i64()
        .unwrap();
    // Killed later and later until a kill lands in the middle of the push.
    let mut after_ms = 200;
    let partial = loop {
        killed_run(desk, after_ms);
        let rows = hub_rows(&mut admin);
        if rows > 0 || after_ms > 20_000 {
            break rows;
        }
        after_ms += 200;
    };
    eprintln!("a push killed after {after_ms} ms left {partial} of {events} rows in the hub");
    assert!(
        partial > 0 && partial < events,
        "no kill landed mid-push: {partial} of {events}"
    );
    sync(desk, &hub);
    assert_eq!(
        count(&mut admin, "SELECT count(*) FROM spool_hub_events"),
        events
    );
    assert_eq!(count(&mut admin, "SELECT count(*) FROM spool_hub_forks"), 0);
    let held = |home: &Path| -> u64 {
        let heads: Value = serde_json::from_str(&heads(home)).unwrap();
        heads
            .as_object()
            .unwrap()
            .values()
            .map(|s| s.as_u64().unwrap())
            .sum()
    };
    let (start, all) = (held(vm), held(desk));
    let mut after_ms = 200;
    loop {
        killed_run(vm, after_ms);
        if held(vm) > start || after_ms > 20_000 {
            break;
        }
        after_ms += 200;
    }
    eprintln!(
        "a pull killed after {after_ms} ms left the VM with {} of {all}",
        held(vm)
    );
    assert!(
        held(vm) > start && held(vm) < all,
        "no kill landed mid-pull"
    );
    sync(vm, &hub);
    assert_eq!(heads(vm), heads(desk));
    assert_eq!(digest(vm), digest(desk));

    // The desk writes more; the hub loses its newest rows (those a signed head covered last).
    ok(desk, &["append"], &(activity("board", "after") + "\n"));
    ok(
        desk,
        &["append"],
        &(activity("board", "after, again") + "\n"),
    );
    sync(desk, &hub);
    let desk_id = id(desk);
    admin
        .execute(
            "DELETE FROM spool_hub_events WHERE origin = decode($1, 'hex') AND seq = \
             (SELECT max(seq) FROM spool_hub_events WHERE origin = decode($1, 'hex'))",
            &[&desk_id],
        )
        .unwrap();
    let before = heads(vm);
    refused_round(vm, &hub, &desk_id, "no signed head covering them");
    assert_eq!(heads(vm), before, "nothing uncovered was taken");
    // The desk pushes again what the hub lacks; the VM then takes both.
    sync(desk, &hub);
    sync(vm, &hub);
    assert_eq!(heads(vm), heads(desk));

    // Rows reordered: two of the desk's next events, neither with a head, swapped whole
    // (hash, bytes) between their seqs. Each row is self-consistent; their chain is not.
    let lines: String = (0..5)
        .map(|i| activity("board", &format!("later {i}")) + "\n")
        .collect();
    ok(desk, &["append"], &lines);
    sync(desk, &hub);
    let swapped = admin
        .execute(
            "WITH pick AS (SELECT max(seq) - 3 AS a FROM spool_hub_events WHERE origin = decode($1, 'hex')), \
                  rows AS (SELECT e.seq, e.hash, e.bytes FROM spool_hub_events e, pick \
                           WHERE e.origin = decode($1, 'hex') AND e.seq IN (pick.a, pick.a + 1) AND e.head IS NULL) \
             UPDATE spool_hub_events e SET hash = o.hash, bytes = o.bytes \
             FROM rows r JOIN rows o ON o.seq <> r.seq \
             WHERE e.origin = decode($1, 'hex') AND e.seq = r.seq",
            &[&desk_id],
        )
        .unwrap();
    assert_eq!(swapped, 2);
    let before = heads(vm);
    refused_round(vm, &hub, &desk_id, "is not on the chain");
    assert_eq!(heads(vm), before, "nothing of the reordered run was taken");

    // A row far longer than any event (written by SQL): its bytes are not even fetched.
    admin
        .execute(
            "UPDATE spool_hub_events SET bytes = decode(repeat('00', 4000000), 'hex') \
             WHERE origin = decode($1, 'hex') AND seq = \
             (SELECT max(seq) FROM spool_hub_events WHERE origin = decode($1, 'hex'))",
            &[&desk_id],
        )
        .unwrap();
    refused_round(
        vm,
        &hub,
        &desk_id,
        "4000000 bytes, more than an event may be",
    );
    assert_eq!(heads(vm), before, "nothing past the long row was taken");
}

/// A `sync hub --once` round on `home` that ends with exit 2, `origin`'s pull refused saying
/// `said`.
fn refused_round(home: &Path, hub: &TlsHub, origin: &str, said: &str) {
    let out = spool(
        home,
        &["sync", "hub", "--url", &hub.url, "--once", "--json"],
        "",
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let why = summary["origins"][origin]["refused"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains(said), "{summary}");
}
