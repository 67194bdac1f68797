//! `spool serve`: concurrent clients over the Unix socket, SIGKILL under load, the SIGTERM
//! drain, refusals, and every CLI command (appends, reads and the long jobs) through the daemon.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/pg.rs"]
mod pg;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use spool::event::Origin;
use spool::log::{Log, LogOptions};
use spool::serve::client::Client;

use common::{spool, SPOOL};

/// An acknowledged event: where the daemon said it landed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Ack {
    position: u64,
    seq: u64,
    hash: String,
}

fn ack(v: &Value) -> Ack {
    Ack {
        position: v["position"].as_u64().unwrap(),
        seq: v["seq"].as_u64().unwrap(),
        hash: v["hash"].as_str().unwrap().to_owned(),
    }
}

fn home(dir: &Path) -> PathBuf {
    let home = dir.join("node");
    let out = spool(&home, &["init", "--label", "desk"], "");
    assert!(out.status.success(), "{out:?}");
    home
}

fn start(home: &Path) -> Child {
    daemon::start(SPOOL, home)
}

/// Sends signal `name` to the daemon `after` this long, from a thread of its own.
fn signal_after(child: &Child, name: &'static str, after: Duration) -> std::thread::JoinHandle<()> {
    let pid = child.id();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        daemon::send_signal(pid, name);
    })
}

fn event(client: usize, i: usize) -> Value {
    json!({"kind": "activity.logged", "stream": format!("client/{client}"), "actor": "agent:load",
           "data": {"message": format!("client {client} event {i}")},
           "key": format!("c{client}-e{i}")})
}

/// `clients` tasks each sending `per_client` single-event requests (or until the daemon goes);
/// returns every acknowledgement received.
fn load(socket: &Path, clients: usize, per_client: usize) -> Vec<Ack> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acks = Arc::new(Mutex::new(Vec::new()));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (socket, acks) = (socket.to_owned(), acks.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(mut client) = Client::connect(&socket).await else {
                    return;
                };
                for i in 0..per_client {
                    let body = serde_json::to_vec(&event(c, i)).unwrap();
                    let Ok((status, reply)) = client.request("POST", "/v1/events", body).await
                    else {
                        return;
                    };
                    match status {
                        200 => {
                            let v: Value = serde_json::from_slice(&reply).unwrap();
                            acks.lock().unwrap().push(ack(&v));
                        }
                        503 => tokio::time::sleep(Duration::from_millis(10)).await,
                        other => panic!("{other}: {}", String::from_utf8_lossy(&reply)),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    Arc::try_unwrap(acks).unwrap().into_inner().unwrap()
}

/// Every acknowledgement names an event the log holds, with that hash; the log verifies.
fn check_durable(home: &Path, acks: &[Ack]) -> u64 {
    let out = spool(home, &["verify"], "");
    assert!(out.status.success(), "verify: {out:?}");
    let node: toml::Value =
        toml::from_str(&std::fs::read_to_string(home.join("node.toml")).unwrap()).unwrap();
    let origin = Origin::from_hex(node["id"].as_str().unwrap()).unwrap();
    let log = Log::open(&home.join("log.redb"), origin, LogOptions::default()).unwrap();
    let reader = log.read().unwrap();
    for a in acks {
        let record = reader
            .get(a.position)
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged position {} is not in the log", a.position));
        assert_eq!(record.hash.to_hex(), a.hash, "position {}", a.position);
    }
    reader.last_position().unwrap()
}

#[test]
fn sixty_four_clients_append_a_thousand_each_and_every_event_is_there_once() {
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path());
    let daemon = start(&home);
    let mut acks = load(&home.join("spool.sock"), 64, 1_000);
    daemon::stop(daemon);
    assert_eq!(acks.len(), 64_000);
    acks.sort();
    let positions: Vec<u64> = acks.iter().map(|a| a.position).collect();
    assert_eq!(
        positions,
        (1..=64_000).collect::<Vec<_>>(),
        "each event once"
    );
    let seqs: std::collections::BTreeSet<u64> = acks.iter().map(|a| a.seq).collect();
    assert_eq!(seqs.len(), 64_000);
    assert_eq!(check_durable(&home, &acks), 64_000);
}

#[test]
fn a_daemon_killed_under_load_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path());
    let daemon = start(&home);
    let socket = home.join("spool.sock");
    let killer = signal_after(&daemon, "KILL", Duration::from_millis(1_500));
    let acks = load(&socket, 16, 100_000);
    killer.join().unwrap();
    let mut daemon = daemon;
    daemon.wait().unwrap();
    println!("{} events acknowledged before the SIGKILL", acks.len());
    assert!(!acks.is_empty(), "the load ran before the kill");
    let held = check_durable(&home, &acks);
    assert!(held >= acks.len() as u64);
    // The stale socket does not stop the node: append falls back to the log itself.
    assert!(socket.exists());
    let out = spool(
        &home,
        &[
            "append",
            "--kind",
            "activity.logged",
            "--stream",
            "b",
            "--actor",
            "a:b",
            "--data",
            r#"{"message":"after"}"#,
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_answers_what_was_accepted_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path());
    let daemon = start(&home);
    let socket = home.join("spool.sock");
    let stopper = signal_after(&daemon, "TERM", Duration::from_millis(1_000));
    let acks = load(&socket, 16, 100_000);
    stopper.join().unwrap();
    let out = daemon.wait_with_output().unwrap();
    assert!(out.status.success(), "exit after SIGTERM: {}", out.status);
    assert!(!socket.exists(), "the socket is removed");
    println!("{} events acknowledged before the drain", acks.len());
    assert!(!acks.is_empty());
    assert_eq!(
        check_durable(&home, &acks),
        acks.len() as u64,
        "nothing beyond the acknowledged"
    );
}

#[test]
fn bad_requests_are_refused_by_name_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path());
    let daemon = start(&home);
    let socket = home.join("spool.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(&socket).await.unwrap();
        async fn post(client: &mut Client, body: Vec<u8>) -> (u16, Value) {
            let (status, reply) = client.request("POST", "/v1/events", body).await.unwrap();
            (
                status,
                serde_json::from_slice::<Value>(&reply).unwrap_or(Value::Null),
            )
        }
        let (status, reply) = post(&mut client, b"{not json".to_vec()).await;
        assert_eq!(status, 400, "{reply}");
        let (status, reply) = post(
            &mut client,
            serde_json::to_vec(&json!({"kind": "activity.logged", "stream": "b", "actor": "a:b", "data": {"message": 7}}))
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(
            (reply["code"].as_str(), reply["field"].as_str()),
            (Some("invalid_data"), Some("/data/message")),
            "{reply}"
        );
        // A batch with one bad event writes none of them.
        let (status, reply) = post(
            &mut client,
            serde_json::to_vec(&json!([event(0, 0), {"kind": "no.such", "stream": "b", "actor": "a:b", "data": {}}]))
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(
            (reply["code"].as_str(), reply["field"].as_str(), reply["index"].as_u64()),
            (Some("unknown_kind"), Some("/kind"), Some(1)),
            "{reply}"
        );
    });
    // Over the limit: refused once the body passes it (the rest is never read).
    {
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut writer = raw.try_clone().unwrap();
        let feeder = std::thread::spawn(move || {
            let size = spool::serve::REQUEST_BYTES_MAX + 1;
            let _ = write!(
                writer,
                "POST /v1/events HTTP/1.1\r\nHost: spool\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
            );
            let _ = writer.write_all(&vec![b' '; 1 << 20]);
        });
        let mut head = [0u8; 12];
        raw.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 413");
        drop(raw);
        feeder.join().unwrap();
    }
    let runtime2 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status: Value = runtime2.block_on(async {
        let mut client = Client::connect(&socket).await.unwrap();
        let (_, body) = client.request("GET", "/v1/status", vec![]).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    });
    assert_eq!(status["events"], 0, "{status}");
    // The CLI appends through the daemon while it runs.
    let out = spool(
        &home,
        &[
            "append",
            "--kind",
            "activity.logged",
            "--stream",
            "b",
            "--actor",
            "a:b",
            "--data",
            r#"{"message":"via the daemon"}"#,
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["position"], 1);
    daemon::stop(daemon);
}

/// One HTTP/1.1 request on a fresh connection (closed after the answer); the status and body.
fn http_once(stream: impl std::io::Read + std::io::Write, head: &str, body: &str) -> (u16, Value) {
    let mut stream = stream;
    write!(
        stream,
        "{head}\r\nHost: spool\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn the_http_listener_takes_only_the_bearer_token_and_the_socket_none() {
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path());
    let addr = daemon::free_loopback_addr();
    let daemon = std::process::Command::new(SPOOL)
        .arg("--home")
        .arg(&home)
        .args(["serve", "--http", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = home.join("spool.sock");
    let tcp = || {
        for _ in 0..1500 {
            if let Ok(stream) = std::net::TcpStream::connect(&addr) {
                return stream;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nothing listens on {addr}");
    };
    let append = "POST /v1/events HTTP/1.1";
    let body = event(0, 0).to_string();
    drop(tcp()); // Listening: the token is made before the listener starts.
    let token = std::fs::read_to_string(home.join("serve.token")).unwrap();
    let token = token.trim();
    assert!(!token.is_empty());
    for (auth, why) in [
        (String::new(), "no token"),
        (
            "\r\nAuthorization: Bearer wrong".to_owned(),
            "a wrong token",
        ),
        (
            format!("\r\nAuthorization: Basic {token}"),
            "not a bearer token",
        ),
        (
            format!("\r\nAuthorization: Bearer {token}x"),
            "a longer token",
        ),
    ] {
        let (status, reply) = http_once(tcp(), &format!("{append}{auth}"), &body);
        assert_eq!(status, 401, "{why}: {reply}");
        assert_eq!(
            (&reply["code"], &reply["message"]),
            (&json!("unauthorized"), &json!("a bearer token is required")),
            "{why}"
        );
    }
    let (status, reply) = http_once(
        tcp(),
        &format!("{append}\r\nAuthorization: Bearer {token}"),
        &body,
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["position"], 1, "{reply}");
    // The socket, guarded by its file mode, asks for no token.
    let (status, reply) = http_once(
        std::os::unix::net::UnixStream::connect(&socket).unwrap(),
        append,
        &event(0, 1).to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["position"], 2, "{reply}");
    // Only the two accepted appends were written.
    let (status, reply) = http_once(
        std::os::unix::net::UnixStream::connect(&socket).unwrap(),
        "GET /v1/status HTTP/1.1",
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(reply["events"], 2, "{reply}");
    daemon::stop(daemon);
}

/// `GET /v1/events?after=POS` streams what is there after POS, then each event as it commits;
/// SIGTERM ends the stream and the daemon still exits 0.
#[test]
fn the_event_stream_follows_commits_and_ends_at_sigterm() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path());
    let daemon = start(&home);
    let append = |message: &str| {
        let data = json!({ "message": message }).to_string();
        let out = spool(
            &home,
            &[
                "append",
                "--kind",
                "activity.logged",
                "--stream",
                "b",
                "--actor",
                "a:b",
                "--data",
                &data,
            ],
            "",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    append("one");
    append("two");
    let mut raw = std::os::unix::net::UnixStream::connect(home.join("spool.sock")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        raw,
        "GET /v1/events?after=1 HTTP/1.1\r\nHost: spool\r\n\r\n"
    )
    .unwrap();
    let mut lines = BufReader::new(raw).lines();
    let mut next_event = || -> (u64, Value) {
        let mut id = None;
        loop {
            let line = lines.next().expect("the stream is open").unwrap();
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse().unwrap());
            } else if let Some(v) = line.strip_prefix("data: ") {
                return (id.expect("an id first"), serde_json::from_str(v).unwrap());
            }
        }
    };
    let (id, event) = next_event();
    assert_eq!((id, event["data"]["message"].as_str()), (2, Some("two")));
    append("three");
    let (id, event) = next_event();
    assert_eq!((id, event["data"]["message"].as_str()), (3, Some("three")));
    // status and heads answer through the daemon, which holds the log.
    let out = spool(&home, &["status", "--json"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["events"], 3);
    let out = spool(&home, &["heads", "--json"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let heads: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(heads.as_object().unwrap().values().next().unwrap(), 3);
    daemon::stop(daemon);
}

/// `spool ingest` goes through a running daemon: another node's export is applied by it, and
/// ingesting it again holds everything already.
#[test]
fn ingest_goes_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    assert!(spool(&other, &["init", "--label", "pi"], "")
        .status
        .success());
    let home = home(dir.path());
    common::fleet(&home, &[&other]);
    let lines: String = (0..300).map(|i| format!("{}\n", event(9, i))).collect();
    assert!(spool(&other, &["append"], &lines).status.success());
    let file = dir.path().join("pi.spool");
    let out = spool(&other, &["export", "--out", file.to_str().unwrap()], "");
    assert!(out.status.success(), "{out:?}");
    let daemon = start(&home);
    let out = spool(&home, &["ingest", file.to_str().unwrap(), "--json"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["read"].as_u64(), summary["applied"].as_u64()),
        (Some(301), Some(300)),
        "the pi's 300 events and the admission it joined by"
    );
    let again: Value = serde_json::from_slice(
        &spool(&home, &["ingest", file.to_str().unwrap(), "--json"], "").stdout,
    )
    .unwrap();
    assert_eq!(again["duplicates"], 301);
    let status: Value =
        serde_json::from_slice(&spool(&home, &["status", "--json"], "").stdout).unwrap();
    assert_eq!(status["events"], 301);
    daemon::stop(daemon);
}

/// While the daemon holds the log, `log`, `verify`, `sql` and `digest` answer through it (or
/// from the projection it keeps live) with what they print without it.
#[test]
fn reading_commands_work_while_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let home = home_with_events(dir.path(), 1_500);
    let stopped: Vec<Vec<u8>> = [
        vec!["log", "--stream", "client/1", "--limit", "600"],
        vec!["log", "--after", "700"],
        vec!["sql", "SELECT count(*) AS n FROM activity_log"],
        vec!["digest", "sqlite", "--json"],
    ]
    .iter()
    .map(|args| {
        let out = spool(&home, args, "");
        assert!(out.status.success(), "{args:?}: {out:?}");
        out.stdout
    })
    .collect();
    let daemon = start(&home);
    let running: Vec<Vec<u8>> = [
        vec!["log", "--stream", "client/1", "--limit", "600"],
        vec!["log", "--after", "700"],
        vec!["sql", "SELECT count(*) AS n FROM activity_log"],
        vec!["digest", "sqlite", "--json"],
    ]
    .iter()
    .map(|args| ok_bytes(&home, args))
    .collect();
    assert_eq!(running, stopped);
    assert_eq!(String::from_utf8_lossy(&running[0]).lines().count(), 500);
    let out = spool(&home, &["verify", "--json"], "");
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["ok"].as_bool(), report["events"].as_u64()),
        (Some(true), Some(1_500))
    );
    // A bad line refused through the daemon is named as it is without one, and adds nothing.
    let bad = format!("{}\n{{\"kind\": \"activity.logged\"}}\n", event(0, 9_999));
    let out = spool(&home, &["append"], &bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{out:?}"
    );
    let out = ok_bytes(&home, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(status["events"].as_u64(), Some(1_500));
    daemon::stop(daemon);
}

/// A node in `dir` holding `n` events of three clients, appended without a daemon.
fn home_with_events(dir: &Path, n: usize) -> PathBuf {
    let home = home(dir);
    let lines: String = (0..n).map(|i| format!("{}\n", event(i % 3, i))).collect();
    assert!(spool(&home, &["append"], &lines).status.success());
    home
}

/// What `spool args` printed, once it succeeded.
fn ok_bytes(home: &Path, args: &[&str]) -> Vec<u8> {
    let out = spool(home, args, "");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn export_rebuild_project_and_backfill_work_while_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let home = home_with_events(dir.path(), 1_500);
    let file = |name: &str| dir.path().join(name).display().to_string();
    let ok = |args: &[&str]| ok_bytes(&home, args);
    ok(&["export", "--out", &file("direct.spool")]);
    let digest = ok(&["digest", "sqlite", "--json"]);

    let daemon = start(&home);
    // The export is the same file, whether to a file or to standard output.
    ok(&["export", "--out", &file("served.spool")]);
    let direct = std::fs::read(file("direct.spool")).unwrap();
    assert_eq!(std::fs::read(file("served.spool")).unwrap(), direct);
    assert_eq!(ok(&["export"]), direct);
    // A rebuild into another file (a new one, in the home) holds the same rows.
    let rebuilt = home.join("rebuilt.db").display().to_string();
    ok(&["rebuild", "sqlite", "--into", &rebuilt]);
    assert_eq!(
        ok(&["digest", "sqlite", "--db", &rebuilt, "--json"]),
        digest
    );
    // A rebuild of the node's own projection: the live projector carries on in the new file.
    ok(&["rebuild", "sqlite"]);
    let more: String = (1_500..1_510)
        .map(|i| format!("{}\n", event(0, i)))
        .collect();
    assert!(spool(&home, &["append"], &more).status.success());
    // Read right after the writes: `sql` waits for the daemon's projection to hold them.
    let count = ok(&["sql", "SELECT count(*) AS n FROM activity_log"]);
    assert_eq!(String::from_utf8_lossy(&count).trim(), r#"{"n":1510}"#);
    // Postgres: a projection pass and a backfill, each into a database of its own.
    for (job, what) in [("project", "applied"), ("backfill", "events")] {
        let url = pg::database();
        let out = ok(&[job, "postgres", "--url", &url, "--json"]);
        let summary: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(summary[what].as_u64(), Some(1_510), "{job}: {summary}");
        let rows: i64 = pg::connect(&url)
            .query_one("SELECT count(*) FROM activity_log", &[])
            .unwrap()
            .get(0);
        assert_eq!(rows, 1_510, "{job}");
    }
    // A bad request to a job is refused by name.
    let out = spool(&home, &["rebuild", "sqlite", "--as-of", "yesterday"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--as-of"),
        "{out:?}"
    );
    daemon::stop(daemon);
}
