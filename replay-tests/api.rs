//! The node's API as one contract: every command prints the same `--json` whether or not the
//! daemon runs, refusals carry their code, field and index, keys conflict by name, event
//! streams resume, and a closed pipe ends a command quietly.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use common::{activity, copy_dir, ok, spool, SPOOL};

fn new_home(dir: &Path, name: &str) -> PathBuf {
    let home = dir.join(name);
    ok(&home, &["init", "--label", name], "");
    home
}

fn lines(n: usize, stream: &str) -> String {
    (0..n)
        .map(|i| activity(&format!("{stream}/{}", i % 3), &format!("m{i}")) + "\n")
        .collect()
}

/// Every JSON line of a command's output.
fn json_out(home: &Path, args: &[&str], stdin: &str) -> Vec<Value> {
    ok(home, args, stdin)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: {e}: {l}")))
        .collect()
}

/// Removes the fields documented as differing: where the home is, what only the daemon knows,
/// durations, and the file's size (redb grows it by its own commits).
fn comparable(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for field in [
            "home",
            "daemon",
            "seconds",
            "events_per_second",
            "path",
            "file_bytes",
        ] {
            o.remove(field);
        }
    }
    v
}

/// One keyed append from flags.
const KEYED: [&str; 11] = [
    "append",
    "--kind",
    "activity.logged",
    "--stream",
    "s",
    "--actor",
    "x",
    "--data",
    r#"{"message":"keyed"}"#,
    "--key",
    "k-1",
];

#[test]
fn every_command_prints_the_same_json_with_and_without_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let a = new_home(dir.path(), "a");
    // Another node's events to ingest: a member's.
    let c = new_home(dir.path(), "c");
    common::fleet(&a, &[&c]);
    ok(&a, &["append"], &lines(30, "task"));
    ok(&a, &KEYED, "");
    ok(&c, &["append"], &lines(12, "loom"));
    let file = dir.path().join("c.spool");
    ok(&c, &["export", "--out", file.to_str().unwrap()], "");
    // Two copies of one node: one reached directly, one through its daemon.
    let b = dir.path().join("b");
    copy_dir(&a, &b);
    let daemon = daemon::start(SPOOL, &b);
    let file = file.to_str().unwrap();
    let into_a = a.join("rebuilt.sqlite");
    let into_b = b.join("rebuilt.sqlite");
    type Args<'a> = Vec<&'a str>;
    let commands: Vec<(Args, Args, &str)> = vec![
        (
            vec!["ingest", file, "--json"],
            vec!["ingest", file, "--json"],
            "",
        ),
        (vec!["status", "--json"], vec!["status", "--json"], ""),
        (vec!["heads", "--json"], vec!["heads", "--json"], ""),
        (vec!["log"], vec!["log"], ""),
        (
            vec![
                "log",
                "--kind",
                "activity.logged",
                "--limit",
                "5",
                "--after",
                "3",
            ],
            vec![
                "log",
                "--kind",
                "activity.logged",
                "--limit",
                "5",
                "--after",
                "3",
            ],
            "",
        ),
        (vec!["verify", "--json"], vec!["verify", "--json"], ""),
        (
            vec!["schema", "list", "--json"],
            vec!["schema", "list", "--json"],
            "",
        ),
        (
            vec!["digest", "sqlite", "--json"],
            vec!["digest", "sqlite", "--json"],
            "",
        ),
        (
            vec!["sql", "SELECT count(*) AS n FROM activity_log"],
            vec!["sql", "SELECT count(*) AS n FROM activity_log"],
            "",
        ),
        (
            vec![
                "rebuild",
                "sqlite",
                "--json",
                "--into",
                into_a.to_str().unwrap(),
            ],
            vec![
                "rebuild",
                "sqlite",
                "--json",
                "--into",
                into_b.to_str().unwrap(),
            ],
            "",
        ),
        // The same keyed request again: a duplicate, answered with the first event.
        (KEYED.to_vec(), KEYED.to_vec(), ""),
    ];
    for (direct, served, stdin) in &commands {
        let (x, y) = (json_out(&a, direct, stdin), json_out(&b, served, stdin));
        assert!(!x.is_empty(), "{direct:?} printed nothing");
        let x: Vec<Value> = x.into_iter().map(comparable).collect();
        let y: Vec<Value> = y.into_iter().map(comparable).collect();
        assert_eq!(x, y, "{direct:?}");
    }
    // The export file is the same bytes either way.
    let (export_a, export_b) = (dir.path().join("a.spool"), dir.path().join("b.spool"));
    ok(&a, &["export", "--out", export_a.to_str().unwrap()], "");
    ok(&b, &["export", "--out", export_b.to_str().unwrap()], "");
    assert_eq!(
        std::fs::read(&export_a).unwrap(),
        std::fs::read(&export_b).unwrap()
    );
    // The daemon-only fields are there only through the daemon.
    let direct = &json_out(&a, &["status", "--json"], "")[0];
    let served = &json_out(&b, &["status", "--json"], "")[0];
    assert!(direct.get("daemon").is_none(), "{direct}");
    assert!(served["daemon"]["commits"].is_u64(), "{served}");
    assert_eq!(
        direct["node"],
        json!({"id": direct["node"]["id"], "label": "a"})
    );
    assert_eq!(served["node"]["label"], "a");
    // A fresh append answers the same fields either way (the stamps differ, so the hash does).
    let fresh = |home: &Path| {
        let mut ack = json_out(home, &["append"], &lines(1, "fresh")).remove(0);
        ack.as_object_mut().unwrap().remove("hash");
        ack
    };
    assert_eq!(fresh(&a), fresh(&b));
    // Refusals are the same sentence and exit code either way.
    for (args, stdin) in [
        (
            vec!["append"],
            "{\"kind\":\"activity.logged\"}\n".to_owned(),
        ),
        (
            vec!["append"],
            lines(2, "s") + &activity("s", "m").replace("activity.logged", "no.such"),
        ),
        (
            vec!["rebuild", "sqlite", "--into", "/etc/passwd"],
            String::new(),
        ),
    ] {
        let (x, y) = (spool(&a, &args, &stdin), spool(&b, &args, &stdin));
        assert_eq!(x.status.code(), Some(2), "{args:?}");
        assert_eq!(
            (x.status.code(), String::from_utf8_lossy(&x.stderr)),
            (y.status.code(), String::from_utf8_lossy(&y.stderr)),
            "{args:?}"
        );
    }
    daemon::stop(daemon);
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let home = new_home(dir.path(), "n");
    ok(&home, &["append"], &lines(3_000, "s"));
    for args in [
        vec!["log"],
        vec!["sql", "SELECT * FROM activity_log"],
        vec!["schema", "list"],
    ] {
        let mut child = std::process::Command::new(SPOOL)
            .arg("--home")
            .arg(&home)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read one line, then close the pipe, as `| head -1` does.
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut out, &mut first).unwrap();
        drop(out);
        let output = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?}: {:?} {said}",
            output.status
        );
        assert!(said.is_empty(), "{args:?}: {said}");
    }
}

/// Reads `n` events from `GET /v1/events?QUERY` on the socket (with `Last-Event-ID` when given),
/// then drops the connection: (id, event) pairs.
fn sse(socket: &Path, query: &str, last_id: Option<u64>, n: usize) -> Vec<(u64, Value)> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let last = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    write!(
        stream,
        "GET /v1/events?{query} HTTP/1.1\r\nHost: spool\r\n{last}\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let mut events = Vec::new();
    let mut id = None;
    while events.len() < n {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        // Chunked framing lines and keep-alive comments are skipped.
        if let Some(value) = line.trim_end().strip_prefix("id: ") {
            id = Some(value.parse::<u64>().unwrap());
        } else if let Some(data) = line.trim_end().strip_prefix("data: ") {
            events.push((id.take().unwrap(), serde_json::from_str(data).unwrap()));
        }
    }
    events
}

#[test]
fn event_streams_resume_after_the_last_id_and_take_the_log_filters() {
    let dir = tempfile::tempdir().unwrap();
    let home = new_home(dir.path(), "n");
    ok(&home, &["append"], &lines(9, "a"));
    let daemon = daemon::start(SPOOL, &home);
    let socket = home.join("spool.sock");
    let first = sse(&socket, "", None, 4);
    let ids: Vec<u64> = first.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    // The stamp is a string: JavaScript's numbers cannot hold it.
    assert!(first[0].1["hlc"].as_str().unwrap().parse::<u64>().unwrap() > 1 << 53);
    // Dropped after 4; a reconnect with its last id goes on at 5, without a duplicate.
    let resumed = sse(&socket, "", Some(4), 5);
    let ids: Vec<u64> = resumed.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [5, 6, 7, 8, 9]);
    // Filters, as `GET /v1/log` takes them; new events arrive as they commit.
    let stream = "a/1";
    let filtered = std::thread::scope(|s| {
        let reading = s.spawn(|| sse(&socket, &format!("stream={stream}&after=2"), None, 3));
        std::thread::sleep(std::time::Duration::from_millis(300));
        ok(&home, &["append"], &lines(3, "a"));
        reading.join().unwrap()
    });
    let ids: Vec<u64> = filtered.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [5, 8, 11], "{filtered:?}");
    assert!(filtered.iter().all(|(_, e)| e["stream"] == stream));
    let kinds = sse(&socket, "kind=activity.logged&after=10", None, 2);
    assert_eq!(
        kinds.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [11, 12]
    );
    // A filter it cannot use is refused by name, not ignored.
    let (status, body) = get(&socket, "/v1/events?kind=x&colour=red");
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_query")),
        "{body}"
    );
    let (status, body) = get(&socket, "/v1/events?origin=zz");
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("/origin")),
        "{body}"
    );
    // A Last-Event-ID that is not a position is refused by name, without its value.
    use std::io::{Read, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    write!(
        raw,
        "GET /v1/events HTTP/1.1\r\nHost: spool\r\nLast-Event-ID: 12abc-SECRET\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""field":"/Last-Event-ID""#), "{answer}");
    assert!(!answer.contains("SECRET"), "{answer}");
    daemon::stop(daemon);
}

/// One GET over the socket: status and JSON body.
fn get(socket: &Path, path: &str) -> (u16, Value) {
    call(socket, "GET", path, Vec::new())
}

fn call(socket: &Path, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = spool::serve::client::Client::connect(socket).await.unwrap();
        let (status, body) = client.request(method, path, body).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    })
}

#[test]
fn refusals_have_a_code_a_pointer_and_an_index_and_keys_conflict_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let home = new_home(dir.path(), "n");
    let daemon = daemon::start(SPOOL, &home);
    let socket = home.join("spool.sock");
    let event = |message: &str, key: Option<&str>| {
        json!({"kind": "activity.logged", "stream": "s", "actor": "a",
               "data": {"message": message}, "key": key})
    };
    let post = |body: Value| call(&socket, "POST", "/v1/events", body.to_string().into_bytes());
    let (status, first) = post(event("one", Some("k")));
    assert_eq!(
        (status, &first["duplicate"]),
        (200, &json!(false)),
        "{first}"
    );
    let (status, again) = post(event("one", Some("k")));
    assert_eq!(
        (status, &again["duplicate"]),
        (200, &json!(true)),
        "{again}"
    );
    assert_eq!(again["position"], first["position"]);
    // The key with another request: 409 key_conflict, naming the key; nothing written.
    let (status, conflict) = post(json!([event("fresh", None), event("two", Some("k"))]));
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(
        (&conflict["code"], &conflict["field"], &conflict["index"]),
        (&json!("key_conflict"), &json!("/key"), &json!(1))
    );
    // Each refusal names its place as a JSON Pointer, and a batch's event by its index.
    let cases = [
        (
            json!({"kind": "activity.logged", "stream": "s", "data": {}}),
            400,
            "invalid_field",
            "/actor",
            None,
        ),
        (
            json!([event("a", None), {"kind": "activity.logged", "stream": "s", "actor": "a", "data": {}}]),
            400,
            "invalid_data",
            "/data/message",
            Some(1),
        ),
        (
            json!([event("a", None), event("b", None), {"kind": "activity.logged", "stream": "s", "actor": "a", "data": {"message": 7}}]),
            400,
            "invalid_data",
            "/data/message",
            Some(2),
        ),
        (
            json!({"kind": "no.such", "stream": "s", "actor": "a", "data": {}}),
            400,
            "unknown_kind",
            "/kind",
            None,
        ),
        (
            json!({"kind": "activity.logged", "stream": "", "actor": "a", "data": {"message": "m"}}),
            400,
            "invalid_field",
            "/stream",
            None,
        ),
    ];
    for (body, want_status, code, field, index) in cases {
        let (status, refused) = post(body.clone());
        assert_eq!(status, want_status, "{body}: {refused}");
        assert_eq!(
            (
                refused["code"].as_str(),
                refused["field"].as_str(),
                refused["index"].as_u64()
            ),
            (Some(code), Some(field), index.map(|i: u64| i)),
            "{body}: {refused}"
        );
        assert!(refused["message"].is_string());
    }
    // What is not an endpoint, a method or a query, in the same shape.
    for (method, path, status, code) in [
        ("GET", "/v1/nowhere", 404, "not_found"),
        ("DELETE", "/v1/events", 405, "method_not_allowed"),
        ("GET", "/v1/log?after=-1", 400, "bad_query"),
    ] {
        let (got, body) = call(&socket, method, path, Vec::new());
        assert_eq!(
            (got, body["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
    let (_, status) = get(&socket, "/v1/status");
    assert_eq!(
        status["events"], 1,
        "only the first keyed event was written"
    );
    daemon::stop(daemon);
}

/// `GET /metrics` with an `Accept` header: status, content type, text.
fn scrape(socket: &Path, accept: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: spool\r\nConnection: close\r\n{accept}\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap()
        .to_owned();
    // The body is chunked or sized; the text is the lines that are not chunk sizes.
    let text = match head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        false => body.to_owned(),
        true => {
            let mut text = String::new();
            let mut rest = body;
            while let Some((size, after)) = rest.split_once("\r\n") {
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                if size == 0 {
                    break;
                }
                text.push_str(&after[..size]);
                rest = &after[size + 2..];
            }
            text
        }
    };
    (content_type, text)
}

#[test]
fn metrics_parse_as_prometheus_text_with_counters_as_counters() {
    use prometheus_parse::{Scrape, Value as Sample};
    let dir = tempfile::tempdir().unwrap();
    let home = new_home(dir.path(), "n");
    let daemon = daemon::start(SPOOL, &home);
    let socket = home.join("spool.sock");
    ok(&home, &["append"], &lines(5, "s"));
    // A keyed request repeated: written once, counted once.
    let keyed = json!({"kind": "activity.logged", "stream": "s", "actor": "a",
                       "data": {"message": "k"}, "key": "k"});
    for _ in 0..3 {
        call(
            &socket,
            "POST",
            "/v1/events",
            keyed.to_string().into_bytes(),
        );
    }
    let (content_type, text) = scrape(&socket, None);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(!text.contains("# EOF"));
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let sample = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    for counter in [
        "spool_appended_events_total",
        "spool_append_requests_total",
        "spool_writer_commits_total",
        "spool_writer_events_total",
        "spool_panics_total",
        "spool_refused_requests_total",
        "spool_busy_requests_total",
    ] {
        assert!(
            matches!(sample(counter).value, Sample::Counter(_)),
            "{counter} is not a counter: {:?}",
            sample(counter).value
        );
    }
    assert!(matches!(sample("spool_appended_events_total").value, Sample::Counter(n) if n == 6.0));
    assert!(matches!(sample("spool_append_requests_total").value, Sample::Counter(n) if n == 4.0));
    for gauge in [
        "spool_waiting_events",
        "spool_forks",
        "spool_halted",
        "spool_unreadable_events",
        "spool_event_streams",
        "spool_log_bytes",
        "spool_projection_lag_events",
        "spool_build_info",
    ] {
        assert!(matches!(sample(gauge).value, Sample::Gauge(_)), "{gauge}");
    }
    assert!(matches!(sample("spool_log_bytes").value, Sample::Gauge(n) if n > 0.0));
    assert_eq!(
        sample("spool_build_info").labels.get("version"),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(scrape.samples.iter().any(
        |s| s.metric == "spool_ack_latency_seconds" && matches!(s.value, Sample::Histogram(_))
    ));
    // OpenMetrics when asked for.
    let (content_type, text) = scrape_openmetrics(&socket);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.trim_end().ends_with("# EOF"));
    assert!(text.contains("# TYPE spool_appended_events counter"));
    daemon::stop(daemon);
}

fn scrape_openmetrics(socket: &Path) -> (String, String) {
    scrape(socket, Some("application/openmetrics-text; version=1.0.0"))
}

/// A group of this machine that `nobody` is not in, by name and id.
fn some_group() -> (String, u32) {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    for wanted in ["users", "staff", "adm"] {
        for line in groups.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4 && fields[0] == wanted && !fields[3].contains("nobody") {
                return (wanted.to_owned(), fields[2].parse().unwrap());
            }
        }
    }
    panic!("no group to test with in /etc/group");
}

/// Runs a copy of `spool` as `nobody`, with `groups` as its supplementary groups.
fn as_nobody(
    binary: &Path,
    home: &Path,
    args: &[&str],
    stdin: &str,
    groups: &[u32],
) -> std::process::Output {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let groups = groups.to_vec();
    let mut command = std::process::Command::new(binary);
    command
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SPOOL_HOME")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let ok = libc::setgroups(groups.len(), groups.as_ptr()) == 0
                && libc::setgid(65534) == 0
                && libc::setuid(65534) == 0;
            match ok {
                true => Ok(()),
                false => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Programs of another user in `[serve] socket_group` append through the daemon; a user outside
/// it is told which socket and what to do. (Needs root, as CI is, to act as `nobody`.)
#[test]
fn a_user_in_the_socket_group_appends_and_one_outside_is_told_why_not() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: a plain system call without arguments.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test acts as `nobody`: run it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let home = new_home(dir.path(), "n");
    let (group, gid) = some_group();
    std::fs::write(
        home.join("spool.toml"),
        format!("[serve]\nsocket_group = \"{group}\"\nsocket_mode = \"0660\"\n"),
    )
    .unwrap();
    let binary = dir.path().join("spool");
    std::fs::copy(SPOOL, &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = daemon::start(SPOOL, &home);
    let socket = home.join("spool.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
    // In the group: appends, reads its status, and the event is there.
    let o = as_nobody(&binary, &home, &["append"], &lines(2, "other-user"), &[gid]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    let o = as_nobody(&binary, &home, &["status", "--json"], "", &[gid]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let status: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["events"], 2);
    // Outside it: a clear refusal naming the socket and the remedy; nothing written.
    let o = as_nobody(&binary, &home, &["append"], &lines(1, "x"), &[]);
    assert_eq!(o.status.code(), Some(1));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains(socket.to_str().unwrap()) && said.contains("socket_group"),
        "{said}"
    );
    assert_eq!(json_out(&home, &["status", "--json"], "")[0]["events"], 2);
    daemon::stop(daemon);
}

/// Under systemd (`Type=notify`) the daemon says READY=1 once it listens, and STOPPING=1 on
/// SIGTERM.
#[test]
fn the_daemon_tells_systemd_when_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let home = new_home(dir.path(), "n");
    let notify = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let daemon = std::process::Command::new(SPOOL)
        .arg("--home")
        .arg(&home)
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut message = [0u8; 256];
    let n = listener.recv(&mut message).unwrap();
    assert_eq!(String::from_utf8_lossy(&message[..n]).trim(), "READY=1");
    // Ready means the socket answers.
    let (status, _) = get(&home.join("spool.sock"), "/v1/status");
    assert_eq!(status, 200);
    daemon::send_signal(daemon.id(), "TERM");
    let n = listener.recv(&mut message).unwrap();
    assert_eq!(String::from_utf8_lossy(&message[..n]).trim(), "STOPPING=1");
    assert!(daemon.wait_with_output().unwrap().status.success());
}

/// The OpenAPI description: served, equal to the shipped `clients/openapi.json` (made from the
/// wire types: `SPOOL_BLESS=1` rewrites the file), listing exactly the router's routes, each of
/// which answers.
#[test]
fn the_openapi_description_is_the_wire_types_and_the_routes() {
    let shipped_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/openapi.json");
    let document = spool::openapi::document();
    let text = serde_json::to_string_pretty(&document).unwrap() + "\n";
    if std::env::var("SPOOL_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&shipped_path, &text).unwrap();
    }
    let shipped = std::fs::read_to_string(&shipped_path).unwrap_or_default();
    assert!(
        shipped == text,
        "clients/openapi.json differs from the wire types: `SPOOL_BLESS=1 cargo test --test api openapi` rewrites it"
    );
    assert_eq!(document["openapi"], "3.1.0");
    // Every schema an operation names is in the components.
    let refs: Vec<String> = text
        .match_indices("#/components/schemas/")
        .map(|(at, _)| text[at + 21..].split('"').next().unwrap().to_owned())
        .collect();
    for name in &refs {
        assert!(
            document["components"]["schemas"].get(name).is_some(),
            "{name} is referred to but not described"
        );
    }
    // The README's table of codes lists exactly the wire type's codes.
    let mut codes: Vec<String> = document["components"]["schemas"]["Code"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|variant| match &variant["enum"] {
            Value::Array(names) => names.clone(),
            _ => vec![variant["const"].clone()],
        })
        .map(|name| name.as_str().unwrap().to_owned())
        .collect();
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let table = &readme[readme.find("| code | status | meaning |").unwrap()..];
    let table = &table[..table.find("\n\n").unwrap()];
    let mut listed: Vec<String> = table
        .lines()
        .skip(2)
        .filter_map(|row| row.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_owned))
        .collect();
    codes.sort();
    listed.sort();
    assert_eq!(
        listed, codes,
        "README's table of codes and the wire type's codes"
    );
    // The router's routes (read from its source) are the description's paths.
    let source =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/serve/mod.rs"))
            .unwrap();
    let mut routed: Vec<(String, String)> = Vec::new();
    for (at, _) in source.match_indices(".route(\"") {
        let rest = &source[at + 8..];
        let path = rest.split('"').next().unwrap().to_owned();
        let call = &rest[path.len() + 2..rest.find(")\n").unwrap()];
        for method in ["get", "post"] {
            if call.contains(&format!("{method}(")) {
                routed.push((method.to_owned(), path.clone()));
            }
        }
    }
    let mut documented: Vec<(String, String)> = spool::openapi::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    // The peers' door serves some of the same routes again.
    routed.sort();
    routed.dedup();
    documented.sort();
    assert_eq!(routed, documented);
    let paths: Vec<&String> = document["paths"].as_object().unwrap().keys().collect();
    for (_, path) in &documented {
        assert!(paths.contains(&path), "{path} is not in the description");
    }
    // Served, and every documented route answers (a refusal of an empty request is fine; a
    // route that does not exist is not).
    let dir = tempfile::tempdir().unwrap();
    let home = new_home(dir.path(), "n");
    let daemon = daemon::start(SPOOL, &home);
    let socket = home.join("spool.sock");
    let (status, served) = get(&socket, "/v1/openapi.json");
    assert_eq!((status, &served), (200, &document));
    for (method, path) in &documented {
        if path == "/v1/events" && method == "get" {
            continue; // A stream: it answers 200 and never ends (tested above).
        }
        if path.starts_with("/v1/peer/") || path == "/v1/pair/join" {
            continue; // The peers' door only (replay-tests/peers.rs).
        }
        let (status, body) = call(&socket, &method.to_uppercase(), path, b"{}".to_vec());
        assert!(
            status != 404 && status != 405,
            "{method} {path}: {status} {body}"
        );
    }
    daemon::stop(daemon);
}

/// Through the daemon, an ingest keeps the signed heads that came with the events, and an
/// export signs the node's own head with the key the daemon holds.
#[test]
fn the_daemon_keeps_and_signs_heads() {
    let dir = tempfile::tempdir().unwrap();
    let a = new_home(dir.path(), "a");
    let b = new_home(dir.path(), "b");
    let c = new_home(dir.path(), "c");
    common::fleet(&a, &[&b, &c]);
    for i in 0..2 {
        ok(&a, &["append"], &activity("s", &format!("a{i}")));
    }
    let file = dir.path().join("a.spool");
    ok(&a, &["export", "--out", file.to_str().unwrap()], "");
    let daemon = daemon::start(SPOOL, &b);
    ok(&b, &["ingest", file.to_str().unwrap()], "");
    ok(&b, &["append"], &activity("s", "b0"));
    let out = dir.path().join("b.spool");
    ok(&b, &["export", "--out", out.to_str().unwrap()], "");
    daemon::stop(daemon);
    let log = spool::home::Home::open(&b).unwrap().open_log().unwrap();
    let a_origin = spool::home::Home::open(&a).unwrap().origin();
    // a's head after admitting b and c (from joining), and after its two events.
    assert_eq!(log.read().unwrap().signed_heads(a_origin).unwrap().len(), 2);
    drop(log);
    // The daemon's export carries a's kept heads and b's own, signed.
    ok(&c, &["ingest", out.to_str().unwrap()], "");
    let log = spool::home::Home::open(&c).unwrap().open_log().unwrap();
    let reader = log.read().unwrap();
    let b_origin = spool::home::Home::open(&b).unwrap().origin();
    assert_eq!(reader.signed_heads(a_origin).unwrap().len(), 2);
    let own = reader.signed_heads(b_origin).unwrap();
    assert_eq!(own.len(), 1);
    own[0].1.verify(&own[0].0).unwrap();
}
