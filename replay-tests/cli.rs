//! The CLI contract that later tooling relies on.

mod common;

use common::*;
use serde_json::Value;

fn new_home() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    let id = ok(&home, &["init", "--label", "desk"], "");
    assert_eq!(id.trim().len(), 32, "{id}");
    assert!(id.trim().chars().all(|c| c.is_ascii_hexdigit()));
    (dir, home)
}

/// `append` with every flag but `--data`'s value given.
fn append_flags(data: &str) -> Vec<&str> {
    vec![
        "append",
        "--kind",
        "activity.logged",
        "--stream",
        "s",
        "--actor",
        "a",
        "--data",
        data,
    ]
}

fn count(home: &std::path::Path) -> usize {
    ok(home, &["log"], "").lines().count()
}

#[test]
fn append_from_flags_then_log_and_status() {
    let (_d, home) = new_home();
    let line = ok(
        &home,
        &[
            "append",
            "--kind",
            "activity.logged",
            "--stream",
            "board",
            "--actor",
            "cli",
            "--data",
            r#"{"message":"hello","source":"cli","meta":{"n":1}}"#,
            "--correlation",
            "c-1",
        ],
        "",
    );
    let acked = &json_lines(&line)[0];
    assert_eq!(
        (acked["seq"].as_u64(), acked["position"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(acked["hash"].as_str().unwrap().len(), 64);
    let events = json_lines(&ok(&home, &["log"], ""));
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(
        e["data"],
        serde_json::json!({"message":"hello","source":"cli","meta":{"n":1}})
    );
    assert_eq!(e["kind"], "activity.logged");
    assert_eq!(e["version"], 1);
    assert_eq!(e["correlation"], "c-1");
    assert_eq!(e["hash"], acked["hash"]);
    assert_eq!(e["origin"], acked["origin"]);
    assert_eq!(e["prev"], "0".repeat(64));
    let status: Value = serde_json::from_str(&ok(&home, &["status", "--json"], "")).unwrap();
    assert_eq!(status["node"]["label"], "desk");
    assert_eq!(status["events"], 1);
    assert_eq!(status["heads"][0]["seq"], 1);
    assert_eq!(status["heads"][0]["hash"], acked["hash"]);
    assert!(status["file_bytes"].as_u64().unwrap() > 0);
    let verify: Value = serde_json::from_str(&ok(&home, &["verify", "--json"], "")).unwrap();
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["events"], 1);
}

#[test]
fn a_stdin_batch_is_atomic() {
    let (_d, home) = new_home();
    let good: Vec<String> = (0..5).map(|i| activity("s", &format!("m{i}"))).collect();
    let out = ok(&home, &["append"], &good.join("\n"));
    let acked = json_lines(&out);
    let positions: Vec<u64> = acked
        .iter()
        .map(|a| a["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [1, 2, 3, 4, 5]);

    let mut bad = good.clone();
    bad.insert(
        2,
        r#"{"kind":"activity.logged","stream":"s","actor":"a","data":{"message":7}}"#.into(),
    );
    let o = spool(&home, &["append"], &bad.join("\n"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("line 3"), "{}", stderr(&o));
    assert!(stderr(&o).contains("data/message"), "{}", stderr(&o));
    assert_eq!(count(&home), 5, "a refused batch wrote something");
}

#[test]
fn a_repeated_idempotency_key_prints_the_first_line_and_writes_nothing() {
    let (_d, home) = new_home();
    let args = |msg: &'static str| {
        let mut args = append_flags(msg);
        args.extend(["--key", "run-42"]);
        args
    };
    let first = ok(&home, &args(r#"{"message":"one"}"#), "");
    assert!(first.contains(r#""duplicate":false"#), "{first}");
    let again = ok(&home, &args(r#"{"message":"one"}"#), "");
    assert_eq!(first.replace("false", "true"), again);
    // The same request as a line of stdin (fields in another order) is the same request.
    let line = r#"{"stream":"s","kind":"activity.logged","actor":"a","data":{"message":"one"},"key":"run-42"}"#;
    assert_eq!(ok(&home, &["append"], line), again);
    // Another request under the key is refused by name, and writes nothing.
    let conflict = spool(&home, &args(r#"{"message":"two"}"#), "");
    assert_eq!(conflict.status.code(), Some(2));
    let said = String::from_utf8_lossy(&conflict.stderr);
    assert!(said.contains("idempotency key"), "{said}");
    assert_eq!(count(&home), 1);
}

#[test]
fn bad_input_is_refused_by_name_and_changes_nothing() {
    let (_d, home) = new_home();
    ok(&home, &["append"], &activity("s", "keep me"));
    let huge = "x".repeat(2 * 1024 * 1024 + 10);
    let too_big = serde_json::json!({
        "kind": "activity.logged", "stream": "s", "actor": "a",
        "data": {"message": "m", "meta": {"blob": huge}},
    })
    .to_string();
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "not valid JSON"),
        (
            activity("s", "m").replace("activity.logged", "activity.vanished"),
            "unknown event kind \"activity.vanished\"",
        ),
        (
            activity("s", "m").replace(r#""message":"m""#, r#""message":["m"]"#),
            "data/message",
        ),
        (
            activity("s", "m").replace(r#""stream":"s""#, r#""stream":7"#),
            "field `stream`",
        ),
        (activity("", "m"), "field `stream`: must not be empty"),
        (
            activity("s", "m").replace(r#""actor":"test""#, r#""actor":"test","colour":1"#),
            "field `(the request)`: has an unknown field",
        ),
        (
            activity("s", "m").replace(r#"{"message":"m"}"#, r#"{"message":"m","extra":true}"#),
            "has a property activity.logged v1 does not define",
        ),
        (too_big, "over the limit"),
    ];
    for (line, want) in &cases {
        let o = spool(&home, &["append"], line);
        assert_eq!(o.status.code(), Some(2), "{want}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(want), "expected {want:?} in {err:?}");
        assert_eq!(err.trim().lines().count(), 1, "not one sentence: {err}");
    }
    let o = spool(&home, &append_flags("{"), "");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("field `data`: not valid JSON"),
        "{}",
        stderr(&o)
    );
    let o = spool(&home, &["append", "--kind", "activity.logged"], "");
    assert_eq!(o.status.code(), Some(2), "missing flags are bad usage");
    assert_eq!(count(&home), 1);
    assert!(spool(&home, &["verify"], "").status.success());
}

#[test]
fn log_filters() {
    let (_d, home) = new_home();
    let lines: Vec<String> = (0..30)
        .map(|i| activity(&format!("task/{}", i % 3), &format!("m{i}")))
        .collect();
    ok(&home, &["append"], &lines.join("\n"));
    let all = json_lines(&ok(&home, &["log"], ""));
    assert_eq!(all.len(), 30);
    let origin = all[0]["origin"].as_str().unwrap().to_owned();
    let positions = |args: &[&str]| -> Vec<u64> {
        json_lines(&ok(&home, args, ""))
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(positions(&["log", "--after", "25"]), [26, 27, 28, 29, 30]);
    assert_eq!(positions(&["log", "--after", "3", "--limit", "2"]), [4, 5]);
    assert_eq!(
        positions(&["log", "--stream", "task/1", "--limit", "3"]),
        [2, 5, 8]
    );
    assert_eq!(
        positions(&["log", "--stream", "task/1", "--after", "20"]),
        [23, 26, 29]
    );
    assert_eq!(positions(&["log", "--kind", "activity.logged"]).len(), 30);
    assert!(positions(&["log", "--kind", "task.created"]).is_empty());
    assert_eq!(positions(&["log", "--origin", &origin]).len(), 30);
    assert!(positions(&["log", "--origin", &"0".repeat(32)]).is_empty());
    let o = spool(&home, &["log", "--origin", "zz"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--origin: origin id must be 32 hex digits"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn homes_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let o = spool(dir.path(), &["status"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is not a spool home"), "{}", stderr(&o));
    let home = dir.path().join("n");
    ok(&home, &["init"], "");
    let o = spool(&home, &["init"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already a spool home"));
    std::fs::write(home.join("spool.toml"), "[writer]\nqueue = 3\n").unwrap();
    let o = spool(&home, &["status"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("spool.toml") && stderr(&o).contains("queue"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn schema_list_and_show_print_the_catalogue() {
    let dir = tempfile::tempdir().unwrap();
    let listed = json_lines(&ok(dir.path(), &["schema", "list", "--json"], ""));
    let kinds: Vec<&str> = listed.iter().map(|k| k["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.len(), spool::kinds::CATALOGUE.len());
    for kind in [
        "activity.logged",
        "task.scored",
        "loom.step_acked",
        "device.revoked",
    ] {
        assert!(kinds.contains(&kind), "{kind}");
    }
    let step = listed
        .iter()
        .find(|k| k["kind"] == "loom.step_finished")
        .unwrap();
    assert_eq!(step["readable"], serde_json::json!([1, 2]));
    assert!(!step["description"].as_str().unwrap().is_empty());
    let schema: Value =
        serde_json::from_str(&ok(dir.path(), &["schema", "show", "activity.logged"], "")).unwrap();
    assert_eq!(schema["required"], serde_json::json!(["message"]));
    let v1: Value = serde_json::from_str(&ok(
        dir.path(),
        &["schema", "show", "loom.step_finished", "--version", "1"],
        "",
    ))
    .unwrap();
    assert_eq!(v1["title"], "loom.step_finished v1");
    let o = spool(
        dir.path(),
        &["schema", "show", "loom.step_finished", "--version", "9"],
        "",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("has no version 9"), "{}", stderr(&o));
}

#[test]
fn every_kind_is_validated_at_append_and_the_refusal_names_line_and_field() {
    let (_d, home) = new_home();
    let good = r#"{"kind":"task.created","stream":"task/1","actor":"user:carlos","data":{"task_id":"1","title":"Renew snapshots","status":"todo"}}"#;
    let cases = [
        (
            r#""status":"todo""#,
            r#""status":"todo","colour":"red""#,
            "colour",
        ),
        (r#","status":"todo""#, "", "status"),
        (
            r#""title":"Renew snapshots""#,
            r#""title":42"#,
            "data/title",
        ),
    ];
    for (from, to, want) in cases {
        let bad = good.replace(from, to);
        let o = spool(&home, &["append"], &format!("{good}\n{bad}\n"));
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let err = stderr(&o);
        assert!(err.contains("line 2: task.created:"), "{err}");
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }
    assert_eq!(count(&home), 0, "a refused batch writes nothing");
    ok(&home, &["append"], good);
    let logged = json_lines(&ok(&home, &["log", "--kind", "task.created"], ""));
    assert_eq!(logged[0]["data"]["title"], "Renew snapshots");
}

#[test]
fn export_and_ingest_files_between_homes() {
    let (_a, a) = new_home();
    let (_b, b) = new_home();
    common::fleet(&a, &[&b]);
    for i in 0..3 {
        ok(&a, &["append"], &activity("s", &format!("a{i}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.spool");
    let file = file.to_str().unwrap();
    ok(&a, &["export", "--out", file], "");
    let report: Value = serde_json::from_str(&ok(&b, &["ingest", "--json", file], "")).unwrap();
    assert_eq!(
        (report["applied"].as_u64(), report["ok"].as_bool()),
        (Some(3), Some(true))
    );
    ok(&b, &["append"], &activity("s", "b0"));
    // `heads --json` is what `export --since` takes: b sends a only what a lacks.
    let since = ok(&a, &["heads", "--json"], "");
    let lacking = dir.path().join("b.spool");
    let lacking = lacking.to_str().unwrap();
    ok(
        &b,
        &["export", "--since", since.trim(), "--out", lacking],
        "",
    );
    let report: Value = serde_json::from_str(&ok(&a, &["ingest", "--json", lacking], "")).unwrap();
    assert_eq!(report["applied"], 1);
    assert_eq!(
        ok(&a, &["heads", "--json"], ""),
        ok(&b, &["heads", "--json"], "")
    );
    // A cut file: exit 2, a sentence saying where it stopped; the signed prefix is applied. Cut
    // before the signed head after a's last event, nothing of a's run is vouched for.
    let (_c, c) = new_home();
    let bytes = std::fs::read(file).unwrap();
    let cut = dir.path().join("cut.spool");
    std::fs::write(&cut, &bytes[..bytes.len() - 60]).unwrap();
    let o = spool(&c, &["ingest", cut.to_str().unwrap()], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cut short at byte"), "{}", stderr(&o));
    assert!(stdout(&o).contains("0 applied"), "{}", stdout(&o));
    let o = spool(&c, &["export", "--since", "nonsense"], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--since"), "{}", stderr(&o));
    assert!(spool(&a, &["verify"], "").status.success());
}

#[test]
fn the_demo_converges_three_nodes_and_says_where_to_look() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let out = ok(dir.path(), &["demo", "--dir", demo.to_str().unwrap()], "");
    assert!(out.contains("identical tables"), "{out}");
    assert!(out.contains("sql"), "{out}");
    let digests: Vec<String> = ["oracle", "pop-os", "ccx13"]
        .iter()
        .map(|n| {
            ok(&demo.join(n), &["digest", "sqlite"], "")
                .lines()
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[1], digests[2]);
    let tasks = json_lines(&ok(
        &demo.join("pop-os"),
        &["sql", "SELECT count(*) AS n FROM tasks"],
        "",
    ));
    assert!(tasks[0]["n"].as_u64().unwrap() > 10);
    let o = spool(dir.path(), &["demo", "--dir", demo.to_str().unwrap()], "");
    assert_eq!(o.status.code(), Some(2), "a used directory is refused");
}

/// Another spool process holding the log for a moment does not fail an append: it waits a
/// bounded time; past that it exits 75 (retry) saying so, and writes nothing.
#[test]
fn an_append_waits_for_another_process_holding_the_log_and_else_says_retry() {
    let (_d, home) = new_home();
    // Twenty appends at once, each its own process opening the log.
    let appends: Vec<_> = (0..20)
        .map(|i| {
            let home = home.clone();
            std::thread::spawn(move || spool(&home, &["append"], &activity("s", &format!("m{i}"))))
        })
        .collect();
    for append in appends {
        let o = append.join().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(count(&home), 20);
    // This test process holds the log for a second: the append waits, then writes.
    let held = spool::home::Home::open(&home).unwrap().open_log().unwrap();
    let waiting = {
        let home = home.clone();
        std::thread::spawn(move || spool(&home, &["append"], &activity("s", "after the hold")))
    };
    std::thread::sleep(std::time::Duration::from_secs(1));
    drop(held);
    let o = waiting.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(count(&home), 21);
    // Held past the bound (10 s): exit 75, "retry", nothing written.
    let held = spool::home::Home::open(&home).unwrap().open_log().unwrap();
    let o = spool(&home, &["append"], &activity("s", "never"));
    drop(held);
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("retry"), "{}", stderr(&o));
    assert_eq!(count(&home), 21);
}

/// The README's safe restore (restore the home, ingest a peer's export of it, then write) brings
/// back the idempotency keys of the node's own events: a client retrying after the disk failure
/// gets its first event back, not a second one.
#[test]
fn a_restored_home_gets_its_own_keys_back_with_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    ok(&a, &["init", "--label", "a"], "");
    let keyed = |message: &str, key: &str| {
        format!(
            r#"{{"kind":"activity.logged","stream":"s","actor":"x","data":{{"message":"{message}"}},"key":"{key}"}}"#
        )
    };
    ok(&a, &["append"], &keyed("m1", "k1"));
    let backup = dir.path().join("a.bak");
    copy_dir(&a, &backup);
    let m2 = ok(&a, &["append"], &keyed("m2", "k2"));
    ok(&a, &["append"], &keyed("m3", "k3"));
    let all = dir.path().join("all.spool");
    ok(&a, &["export", "--out", all.to_str().unwrap()], "");
    std::fs::remove_dir_all(&a).unwrap();
    copy_dir(&backup, &a);
    ok(&a, &["ingest", all.to_str().unwrap()], "");
    // The retry answers the event that came back, as a duplicate; nothing new is written.
    let again = ok(&a, &["append"], &keyed("m2", "k2"));
    assert_eq!(
        again,
        m2.replace(r#""duplicate":false"#, r#""duplicate":true"#)
    );
    assert_eq!(count(&a), 3);
    // And another request under a restored key is a conflict.
    let o = spool(&a, &["append"], &keyed("other", "k3"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let keys: Vec<Value> = ok(&a, &["log"], "")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["key"].clone())
        .collect();
    assert_eq!(keys, ["k1", "k2", "k3"]);
}

/// `log.redb` restored without the `log.wal` beside it: the newer segment's records skip the
/// restored log's next seq, and the log is refused by name (its segment may hold acknowledged
/// events) until the segment is moved aside.
#[test]
fn a_log_restored_without_its_segment_is_refused_by_name_until_the_segment_is_moved_aside() {
    let (dir, home) = new_home();
    ok(&home, &["append"], &activity("s", "one"));
    let backup = dir.path().join("log.redb.bak");
    std::fs::copy(home.join("log.redb"), &backup).unwrap();
    ok(&home, &["append"], &activity("s", "two"));
    ok(&home, &["append"], &activity("s", "three"));
    std::fs::copy(&backup, home.join("log.redb")).unwrap();
    let o = spool(&home, &["append"], &activity("s", "x"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(
        said.contains("log.wal") && said.contains("restored without this file"),
        "{said}"
    );
    std::fs::rename(home.join("log.wal"), dir.path().join("log.wal.refused")).unwrap();
    ok(&home, &["append"], &activity("s", "x"));
    ok(&home, &["verify"], "");
}

/// A projection whose checkpoint the log no longer holds (a log restored under it) is refused
/// with a sentence that names commands that exist, not Rust's debug text.
#[test]
fn a_projection_ahead_of_a_restored_log_names_the_commands_that_rebuild_it() {
    let (dir, home) = new_home();
    ok(&home, &["append"], &activity("s", "one"));
    // The log's two files, backed up together (a log.wal newer than its log.redb is refused).
    let files = ["log.redb", "log.wal"];
    for file in files {
        std::fs::copy(home.join(file), dir.path().join(format!("{file}.bak"))).unwrap();
    }
    ok(&home, &["append"], &activity("s", "two"));
    ok(&home, &["append"], &activity("s", "three"));
    // The log goes back; the projection (at position 3) stays; other events take 2 and 3.
    for file in files {
        std::fs::copy(dir.path().join(format!("{file}.bak")), home.join(file)).unwrap();
    }
    let o = spool(
        &home,
        &["append"],
        &(activity("s", "x") + "\n" + &activity("s", "y")),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = spool(&home, &["sql", "SELECT count(*) FROM activity_log"], "");
    assert_eq!(o.status.code(), Some(1));
    let said = stderr(&o);
    assert!(
        said.contains("spool rebuild sqlite") && said.contains("spool backfill postgres"),
        "{said}"
    );
    assert!(!said.contains("Some("), "{said}");
    // The way out works.
    ok(&home, &["rebuild", "sqlite"], "");
    let n = ok(
        &home,
        &["sql", "SELECT count(*) AS n FROM activity_log"],
        "",
    );
    assert_eq!(n.trim(), r#"{"n":3}"#);
}

#[test]
fn heads_of_an_empty_node_is_an_empty_vector_and_a_newline() {
    let (_d, home) = new_home();
    assert_eq!(ok(&home, &["heads", "--json"], ""), "{}\n");
}

/// A home named `label` in `dir`.
fn labelled_home(dir: &std::path::Path, label: &str) -> std::path::PathBuf {
    let home = dir.join(label);
    ok(&home, &["init", "--label", label], "");
    home
}

fn task_event(kind: &str, data: Value) -> String {
    serde_json::json!({
        "kind": kind, "stream": format!("task/{}", data["task_id"].as_str().unwrap()),
        "actor": "user:carlos", "data": data,
    })
    .to_string()
}

/// Everything `from` holds, ingested into `to` (with `to`'s clock at `offset`).
fn exchange(offset: &str, from: &std::path::Path, to: &std::path::Path) -> Value {
    let file = from.with_extension("export.spool");
    ok(from, &["export", "--out", file.to_str().unwrap()], "");
    let report = ok_at(
        offset,
        to,
        &["ingest", "--json", file.to_str().unwrap()],
        "",
    );
    serde_json::from_str(&report).unwrap()
}

fn task_row(home: &std::path::Path, id: &str) -> Value {
    let statement = format!("SELECT title, lane FROM tasks WHERE id = '{id}'");
    json_lines(&ok(home, &["sql", &statement], ""))
        .pop()
        .unwrap_or(Value::Null)
}

/// Issue 23's skew: a desktop five hours ahead, a cloud VM that clamps its stamps, a Pi at
/// 1970, a VM clock that jumps back an hour and a laptop five hours behind, each under
/// libfaketime. Causally later writes
/// win on every node, and `--as-of` never shows an effect without its cause.
#[test]
fn causality_beats_skewed_clocks_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let (desktop, vm, pi, laptop) = (
        labelled_home(dir.path(), "desktop"),
        labelled_home(dir.path(), "vm"),
        labelled_home(dir.path(), "pi"),
        labelled_home(dir.path(), "laptop"),
    );
    common::fleet(&desktop, &[&vm, &pi, &laptop]);
    const AHEAD: &str = "+5h";
    const PI: &str = "@1970-01-01 00:10:00";
    let t1 = |kind: &str, data: Value| task_event(kind, data);
    ok_at(
        AHEAD,
        &desktop,
        &["append"],
        &t1(
            "task.created",
            serde_json::json!({"task_id": "t1", "title": "written on the desktop", "status": "todo"}),
        ),
    );
    let report = exchange("+0", &desktop, &vm);
    assert_eq!(report["clamped"], 1, "{report}");
    ok(
        &vm,
        &["append"],
        &t1(
            "task.edited",
            serde_json::json!({"task_id": "t1", "title": "edited later on the cloud VM"}),
        ),
    );
    exchange(AHEAD, &vm, &desktop);
    for home in [&desktop, &vm] {
        assert_eq!(
            task_row(home, "t1")["title"],
            "edited later on the cloud VM",
            "{}",
            home.display()
        );
    }

    // The Pi, at 1970, gets both and moves the task; its stamps are 56 years behind.
    let report = exchange(PI, &vm, &pi);
    // The two, and the desktop's three admissions the Pi joined by: all 56 years ahead of it.
    assert_eq!(report["clamped"], 5, "{report}");
    ok_at(
        PI,
        &pi,
        &["append"],
        &t1(
            "task.moved",
            serde_json::json!({"task_id": "t1", "lane": "now"}),
        ),
    );
    exchange("+0", &pi, &vm);
    // The VM's clock jumps back an hour; its edit after the Pi's move still comes after it.
    ok_at(
        "-1h",
        &vm,
        &["append"],
        &t1(
            "task.edited",
            serde_json::json!({"task_id": "t1", "title": "after the clock jumped back"}),
        ),
    );
    for (from, to, offset) in [(&vm, &desktop, AHEAD), (&vm, &pi, PI), (&desktop, &pi, PI)] {
        exchange(offset, from, to);
    }
    // A laptop five hours behind gets everything, then moves the task: its move comes after
    // everything it saw, though stamped five hours before all of it.
    let report = exchange("-5h", &vm, &laptop);
    // A run of the VM's events is held back until the signed head after it, so an event that
    // depends on it may wait a moment: all four land either way.
    let landed = report["applied"].as_u64().unwrap() + report["released"].as_u64().unwrap();
    assert_eq!(
        (landed, report["waiting"].as_u64()),
        (4, Some(0)),
        "{report}"
    );
    ok_at(
        "-5h",
        &laptop,
        &["append"],
        &t1(
            "task.moved",
            serde_json::json!({"task_id": "t1", "lane": "later"}),
        ),
    );
    for to in [&desktop, &vm, &pi] {
        let offset = if to == &desktop {
            AHEAD
        } else if to == &pi {
            PI
        } else {
            "+0"
        };
        exchange(offset, &laptop, to);
    }
    let digests: Vec<String> = [&desktop, &vm, &pi, &laptop]
        .iter()
        .map(|home| {
            let row = task_row(home, "t1");
            assert_eq!(
                row["title"],
                "after the clock jumped back",
                "{}",
                home.display()
            );
            assert_eq!(row["lane"], "later", "{}", home.display());
            ok(home, &["digest", "sqlite"], "")
        })
        .collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");

    // As of an hour from now (real time): the desktop's task is stamped five hours ahead, so
    // nothing that follows it is in, though the VM's edits are stamped before that hour.
    let as_of = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    )
    .to_string();
    let into = vm.join("as-of.sqlite");
    ok(
        &vm,
        &[
            "rebuild",
            "sqlite",
            "--as-of",
            &as_of,
            "--into",
            into.to_str().unwrap(),
        ],
        "",
    );
    let rows = ok(
        &vm,
        &[
            "sql",
            "--db",
            into.to_str().unwrap(),
            "SELECT id FROM tasks",
        ],
        "",
    );
    assert_eq!(rows, "", "an effect without its cause: {rows}");
}

/// A projection holding events a restored log lacks says so, and names both ways out; after
/// the peer's export is ingested it goes on as if nothing happened.
#[test]
fn a_projection_ahead_of_a_restored_log_waits_for_the_peers_export() {
    let (dir, home) = new_home();
    ok(&home, &["append"], &activity("s", "one"));
    let backup = dir.path().join("backup");
    copy_dir(&home, &backup);
    ok(&home, &["append"], &activity("s", "two"));
    ok(&home, &["sql", "SELECT count(*) FROM activity_log"], "");
    let all = dir.path().join("all.spool");
    ok(&home, &["export", "--out", all.to_str().unwrap()], "");
    // The log goes back (its two files), the projection beside it stays.
    std::fs::copy(backup.join("log.redb"), home.join("log.redb")).unwrap();
    std::fs::copy(backup.join("log.wal"), home.join("log.wal")).unwrap();
    let o = spool(&home, &["sql", "SELECT count(*) FROM activity_log"], "");
    assert_eq!(o.status.code(), Some(1));
    let said = stderr(&o);
    assert!(
        said.contains("up to seq 2, this log only up to seq 1")
            && said.contains("ingest a peer's export")
            && said.contains("spool rebuild sqlite"),
        "{said}"
    );
    ok(&home, &["ingest", all.to_str().unwrap()], "");
    let n = ok(
        &home,
        &["sql", "SELECT count(*) AS n FROM activity_log"],
        "",
    );
    assert_eq!(n.trim(), r#"{"n":2}"#);
}

/// A key travels with its event: a retry on another node that holds the first event gets that
/// event back; a different request under it is refused there too.
#[test]
fn a_key_answers_on_every_node_its_event_has_reached() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        labelled_home(dir.path(), "a"),
        labelled_home(dir.path(), "b"),
        labelled_home(dir.path(), "c"),
    );
    common::fleet(&a, &[&b, &c]);
    let request = |text: &str| {
        serde_json::json!({"kind": "activity.logged", "stream": "s", "actor": "agent",
                           "key": "step-7", "data": {"message": text}})
        .to_string()
    };
    let first: Value = serde_json::from_str(&ok(&a, &["append"], &request("acked"))).unwrap();
    exchange("+0", &a, &b);
    let again: Value = serde_json::from_str(&ok(&b, &["append"], &request("acked"))).unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        (&again["origin"], &again["seq"]),
        (&first["origin"], &first["seq"])
    );
    let o = refused(
        &b,
        &["append"],
        &request("something else"),
        "idempotency key",
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A node that used the key itself first keeps answering with its own event.
    let own: Value = serde_json::from_str(&ok(&c, &["append"], &request("acked"))).unwrap();
    exchange("+0", &a, &c);
    let retry: Value = serde_json::from_str(&ok(&c, &["append"], &request("acked"))).unwrap();
    assert_eq!(retry["origin"], own["origin"]);
}

/// A projection file an older build made (an older schema) is rebuilt from the log when the
/// node opens it, not refused and not misread.
#[test]
fn an_older_projection_is_rebuilt_when_opened() {
    let (_dir, home) = new_home();
    ok(&home, &["append"], &activity("s", "one"));
    ok(&home, &["sql", "SELECT count(*) FROM activity_log"], "");
    {
        let db = rusqlite::Connection::open(home.join("projection.sqlite")).unwrap();
        let version: i64 = db
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, spool::project::sqlite::SCHEMA_VERSION);
        db.pragma_update(None, "user_version", version - 1).unwrap();
    }
    ok(&home, &["append"], &activity("s", "two"));
    let n = ok(
        &home,
        &["sql", "SELECT count(*) AS n FROM activity_log"],
        "",
    );
    assert_eq!(n.trim(), r#"{"n":2}"#);
}

/// `init` makes the node's signing key, private to its owner, and the node's id is bound to
/// it; nothing the node prints or exports holds the secret.
#[test]
fn init_makes_a_private_key_the_node_id_is_bound_to() {
    use std::os::unix::fs::PermissionsExt as _;
    let (dir, home) = new_home();
    let key_path = home.join("node.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = spool::identity::NodeKey::load(&key_path).unwrap();
    let status: Value = serde_json::from_str(&ok(&home, &["status", "--json"], "")).unwrap();
    assert_eq!(status["node"]["id"], key.origin().to_hex(), "{status}");

    ok(&home, &["append"], &activity("s", "one"));
    ok(&home, &["append"], &activity("s", "two"));
    // The node's first event carries its public key; the others do not.
    let events = json_lines(&ok(&home, &["log"], ""));
    assert_eq!(events[0]["signer"], key.public().to_hex(), "{}", events[0]);
    assert!(events[1].get("signer").is_none(), "{}", events[1]);
    let secret = std::fs::read_to_string(&key_path).unwrap();
    let secret = secret.lines().nth(1).unwrap().to_owned();
    let export = dir.path().join("all.spool");
    ok(&home, &["export", "--out", export.to_str().unwrap()], "");
    let mut shown = ok(&home, &["log"], "") + &ok(&home, &["status", "--json"], "");
    shown += &String::from_utf8_lossy(&std::fs::read(&export).unwrap());
    assert!(!shown.contains(&secret));
    let secret_bytes = hex::decode(&secret).unwrap();
    let file = std::fs::read(&export).unwrap();
    assert!(!file.windows(32).any(|w| w == secret_bytes.as_slice()));
}

/// An export carries the node's own head signed with its key, right after the event it names;
/// the receiver checks it and keeps it, and passes it on when it exports in turn. A head frame
/// whose signature was changed stops the ingest by name.
#[test]
fn signed_heads_travel_with_exports_and_relays_pass_them_on() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        labelled_home(dir.path(), "a"),
        labelled_home(dir.path(), "b"),
        labelled_home(dir.path(), "c"),
    );
    common::fleet(&a, &[&b, &c]);
    for i in 0..3 {
        ok(&a, &["append"], &activity("s", &format!("a{i}")));
    }
    exchange("+0", &a, &b);
    exchange("+0", &b, &c);
    let a_home = spool::home::Home::open(&a).unwrap();
    let a_key = spool::identity::NodeKey::load(&a.join("node.key")).unwrap();
    for home in [&b, &c] {
        let log = spool::home::Home::open(home).unwrap().open_log().unwrap();
        let kept = log.read().unwrap().signed_heads(a_home.origin()).unwrap();
        // One from joining (after a's two admissions), one after its three events.
        assert_eq!(kept.len(), 2, "{}: {kept:?}", home.display());
        let (key, head) = &kept[1];
        assert_eq!((*key, head.seq), (a_key.public(), 5));
        head.verify(key).unwrap();
        assert!(log.verify(1).unwrap().ok());
    }

    // The same file with one bit of the head's signature changed.
    let file = a.with_extension("export.spool");
    let mut bytes = std::fs::read(&file).unwrap();
    // The head frame ends just before the trailer with its 64-byte signature.
    let signature_byte = bytes.len() - spool::sync::file::TRAILER_BYTES - 10;
    bytes[signature_byte] ^= 1;
    let forged = dir.path().join("forged.spool");
    std::fs::write(&forged, &bytes).unwrap();
    let d = labelled_home(dir.path(), "d");
    let args = ["ingest", forged.to_str().unwrap()];
    refused(&d, &args, "", "a forged or damaged signed head");
}

/// A node's own event re-hashed inside its own export and handed back to it used to stop the
/// node's writes (taken for a fork of its own origin). Now no signed head vouches for it: it
/// is refused by name, nothing is stored, and the node goes on writing.
#[test]
fn a_forged_own_event_is_refused_and_never_halts_the_node() {
    let (dir, b) = new_home();
    ok(&b, &["append"], &activity("s", "forge-me-0"));
    ok(&b, &["append"], &activity("s", "m1"));
    let file = dir.path().join("b.spool");
    ok(&b, &["export", "--out", file.to_str().unwrap()], "");
    let mut bytes = std::fs::read(&file).unwrap();
    // The first frame: its length, its hash, its stored bytes; the forger rewrites the text and
    // the frame's hash to match.
    let len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let (hash_at, body_at) = (20, 52);
    let body = &mut bytes[body_at..body_at + len];
    let at = body
        .windows(10)
        .position(|w| w == b"forge-me-0")
        .expect("the message in the archive");
    body[at..at + 10].copy_from_slice(b"forged!!-0");
    let hash = *blake3::hash(&bytes[body_at..body_at + len]).as_bytes();
    bytes[hash_at..hash_at + 32].copy_from_slice(&hash);
    let forged = dir.path().join("forged.spool");
    std::fs::write(&forged, &bytes).unwrap();
    let before = ok(&b, &["log"], "");
    let args = ["ingest", forged.to_str().unwrap()];
    refused(
        &b,
        &args,
        "",
        "is not on the chain the signed head after it vouches for",
    );
    assert_eq!(ok(&b, &["log"], ""), before, "nothing stored changed");
    let status: Value = serde_json::from_str(&ok(&b, &["status", "--json"], "")).unwrap();
    assert_eq!(status["halted"], Value::Null, "{status}");
    ok(&b, &["append"], &activity("s", "still writing"));
}

/// The views that read the clock, on events written now: the newest claim not released is
/// held, a bot's release ends only its own claim, and a code within its TTL is pending.
#[test]
fn the_views_read_now_holders_and_pending_codes() {
    let (_dir, home) = new_home();
    let event = |kind: &str, actor: &str, data: Value| {
        serde_json::json!({"kind": kind, "stream": "task/t1", "actor": actor, "data": data})
            .to_string()
    };
    let claim = |bot: &str| {
        event(
            "bot.claimed",
            bot,
            serde_json::json!({"bot_id": bot, "resource": "task/t1", "ttl_ms": 600_000}),
        )
    };
    let release = |bot: &str| {
        event(
            "bot.released",
            bot,
            serde_json::json!({"bot_id": bot, "resource": "task/t1"}),
        )
    };
    let holders = || {
        ok(
            &home,
            &["sql", "SELECT resource, bot_id FROM bot_holders"],
            "",
        )
    };
    ok(&home, &["append"], &claim("cli-agent-1"));
    ok(&home, &["append"], &claim("cli-agent-2"));
    assert_eq!(
        holders().trim(),
        r#"{"bot_id":"cli-agent-2","resource":"task/t1"}"#
    );
    ok(&home, &["append"], &release("cli-agent-1"));
    assert_eq!(
        holders().trim(),
        r#"{"bot_id":"cli-agent-2","resource":"task/t1"}"#,
        "another bot's release leaves the holder's claim"
    );
    ok(&home, &["append"], &release("cli-agent-2"));
    assert_eq!(holders(), "", "both claims are released");

    let in_an_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 3_600_000;
    ok(
        &home,
        &["append"],
        &event(
            "pairing.requested",
            "cockpit",
            serde_json::json!({"pairing_id": "p", "code_hash": "ab".repeat(32), "user_id": "u",
                               "device_id": "d", "expires_at_ms": in_an_hour}),
        ),
    );
    let status = ok(
        &home,
        &["sql", "SELECT status FROM pairing_tokens_live"],
        "",
    );
    assert_eq!(status.trim(), r#"{"status":"pending"}"#);
}

/// A head frame that does not follow the event it names (moved to the front of the file) is
/// refused by name, and nothing of the file is ingested.
#[test]
fn a_head_frame_out_of_place_is_refused() {
    let (dir, a) = new_home();
    ok(&a, &["append"], &activity("s", "one"));
    let file = dir.path().join("a.spool");
    ok(&a, &["export", "--out", file.to_str().unwrap()], "");
    let bytes = std::fs::read(&file).unwrap();
    // Header (16 bytes), one event frame, one head frame (4 + 152 bytes), the trailer.
    let trailer = spool::sync::file::TRAILER_BYTES;
    let head_at = bytes.len() - trailer - (4 + 152);
    let mut moved = bytes[..16].to_vec();
    moved.extend_from_slice(&bytes[head_at..bytes.len() - trailer]);
    moved.extend_from_slice(&bytes[16..head_at]);
    moved.extend_from_slice(&bytes[bytes.len() - trailer..]);
    let path = dir.path().join("moved.spool");
    std::fs::write(&path, &moved).unwrap();
    let (_d, b) = new_home();
    let args = ["ingest", path.to_str().unwrap()];
    refused(&b, &args, "", "it does not follow the event it names");
    assert_eq!(ok(&b, &["log"], ""), "");
}

/// `spool fleet` and its commands as a person uses them: admit by node file, join by export
/// (pinning the root), list, revoke; each mistake refused by name, changing nothing.
#[test]
fn fleet_commands_admit_join_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        labelled_home(dir.path(), "desk"),
        labelled_home(dir.path(), "pi"),
        labelled_home(dir.path(), "vm"),
    );
    let id = |home: &std::path::Path| spool::home::Home::open(home).unwrap().origin().to_hex();
    let file = dir.path().join("fleet.spool");
    let file = file.to_str().unwrap();
    // Not admitted yet: joining names what to do.
    ok(&a, &["export", "--out", file], "");
    refused(
        &b,
        &["fleet", "join", file],
        "",
        "no member admits this node",
    );
    ok(
        &a,
        &["fleet", "admit", b.join("node.toml").to_str().unwrap()],
        "",
    );
    let again = ok(
        &a,
        &["fleet", "admit", b.join("node.toml").to_str().unwrap()],
        "",
    );
    assert!(again.contains("already admitted"), "{again}");
    ok(&a, &["export", "--out", file], "");
    refused(
        &b,
        &["fleet", "join", file, "--root", &id(&c)],
        "",
        "not the",
    );
    ok(&b, &["fleet", "join", file, "--root", &id(&a)], "");
    let fleet: Value = serde_json::from_str(&ok(&b, &["fleet", "--json"], "")).unwrap();
    assert_eq!(fleet["root"], id(&a), "{fleet}");
    let members = fleet["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{fleet}");
    let pi = members.iter().find(|m| m["origin"] == id(&b)).unwrap();
    assert_eq!(pi["label"], "pi");
    assert_eq!(pi["admitted_by"]["origin"], id(&a));
    assert_eq!(pi["capabilities"], serde_json::json!(["sync"]));
    let listed = ok(&b, &["fleet"], "");
    assert!(
        listed.contains("root") && listed.contains("this node"),
        "{listed}"
    );

    // Revoking: by origin, once; a revoked key is never admitted again.
    refused(&a, &["fleet", "revoke", &id(&c)], "", "not a member");
    refused(&a, &["fleet", "revoke", "nonsense"], "", "32 hex digits");
    let said = ok(&a, &["fleet", "revoke", &id(&b), "--reason", "sold"], "");
    assert!(said.contains("after seq 0"), "{said}");
    refused(&a, &["fleet", "revoke", &id(&b)], "", "revoked already");
    let node_file = b.join("node.toml");
    refused(
        &a,
        &["fleet", "admit", node_file.to_str().unwrap()],
        "",
        "never admitted again",
    );
    // The Pi's writes after the revocation are refused by name, kept and listed.
    ok(&b, &["append"], &activity("s", "after the revocation"));
    let from_b = dir.path().join("b.spool");
    ok(&b, &["export", "--out", from_b.to_str().unwrap()], "");
    let before = ok(&a, &["heads", "--json"], "");
    refused(
        &a,
        &["ingest", from_b.to_str().unwrap()],
        "",
        "was revoked by origin",
    );
    assert_eq!(ok(&a, &["heads", "--json"], ""), before);
    let status = ok(&a, &["status"], "");
    assert!(status.contains("REFUSED origin"), "{status}");
    assert!(ok(&a, &["verify"], "").contains("1 refused event(s) kept as evidence"));
    // A root with a member does not join another fleet.
    ok(
        &c,
        &["fleet", "admit", a.join("node.toml").to_str().unwrap()],
        "",
    );
    let from_c = dir.path().join("c.spool");
    ok(&c, &["export", "--out", from_c.to_str().unwrap()], "");
    refused(
        &a,
        &["fleet", "join", from_c.to_str().unwrap()],
        "",
        "a root does not join another fleet",
    );
}
