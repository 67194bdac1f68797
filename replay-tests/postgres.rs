//! The Postgres projection against a real server (a throwaway cluster, `common/pg.rs`):
//! row-level security, hostile strings, two nodes projecting into one database at once, and
//! the projecting process killed mid-batch.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use common::{spool, SPOOL};
use spool::project::postgres::SCHEMA_VERSION;

/// A new node home in `dir`.
fn home(dir: &Path, label: &str) -> std::path::PathBuf {
    let home = dir.join(label);
    let out = spool(&home, &["init", "--label", label], "");
    assert!(out.status.success(), "{out:?}");
    home
}

/// Appends `lines` in batches small enough for `spool`'s output to fit a pipe.
fn append(home: &Path, lines: &[Value]) {
    for batch in lines.chunks(400) {
        let text: String = batch.iter().map(|l| format!("{l}\n")).collect();
        let out = spool(home, &["append"], &text);
        assert!(
            out.status.success(),
            "append: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn project(home: &Path, url: &str, extra: &[&str]) {
    let mut args = vec!["project", "postgres", "--url", url];
    args.extend(extra);
    let out = spool(home, &args, "");
    assert!(
        out.status.success(),
        "project: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The golden cases' events as append requests (every table of the projection).
fn case_requests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("replay-tests/cases");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for path in names {
        for line in std::fs::read_to_string(path).unwrap().lines() {
            if line.trim().is_empty() {
                continue;
            }
            let spec: Value = serde_json::from_str(line).unwrap();
            out.push(json!({"kind": spec["kind"], "stream": spec["stream"],
                            "actor": spec["actor"], "data": spec["data"]}));
        }
    }
    out
}

/// Every projected table's rows as sorted text (checkpoints excluded): equal dumps, equal rows.
fn dump(url: &str) -> Vec<(String, String)> {
    let mut client = pg::connect(url);
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' \
             AND tablename NOT LIKE 'spool\\_%' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tables
        .into_iter()
        .map(|t| {
            // Names come from the catalogue, not from data.
            let rows: String = client
                .query_one(
                    &format!(
                        "SELECT coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '') FROM {t} x"
                    ),
                    &[],
                )
                .unwrap()
                .get(0);
            (t, rows)
        })
        .collect()
}

fn checkpoint_events(url: &str) -> Vec<i64> {
    pg::connect(url)
        .query("SELECT events FROM spool_checkpoints ORDER BY node", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

const LANES: [&str; 3] = ["now", "next", "later"];

/// Runs `spool ARGS` against `node` again and again, each time SIGKILLing it at a random moment
/// of a batch: it waits for two commits, then kills after a random fraction of the time between
/// them, so kills fall anywhere between a batch's row writes and its commit. Stops when a run
/// finishes on its own or after `most` kills. `position` reads the checkpoint the command
/// commits to; `after_kill` checks the database after each kill. Returns the checkpoint seen
/// after each kill.
fn kill_repeatedly(
    node: &Path,
    args: &[&str],
    most: usize,
    rng: &mut StdRng,
    position: impl Fn() -> u64,
    after_kill: impl Fn(),
) -> Vec<u64> {
    let mut seen = Vec::new();
    for _ in 0..most {
        let mut child = Command::new(SPOOL)
            .arg("--home")
            .arg(node)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The moments of the next two commits (None: the run ended first).
        let mut commit = |after: u64| -> Option<(u64, std::time::Instant)> {
            loop {
                if child.try_wait().unwrap().is_some() {
                    return None;
                }
                let now = position();
                if now > after {
                    return Some((now, std::time::Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        let Some((first, at)) = commit(position()) else {
            break;
        };
        let Some((_, next)) = commit(first) else {
            break;
        };
        std::thread::sleep((next - at).mul_f64(rng.random_range(0.05..0.95)));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        after_kill();
        let now = position();
        assert!(
            now >= seen.last().copied().unwrap_or(0),
            "a checkpoint never goes back: {seen:?} then {now}"
        );
        seen.push(now);
    }
    seen
}

/// Runs `spool ARGS` against `node` to its end.
fn run(node: &Path, args: &[&str]) {
    let out = spool(node, args, "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// This node's checkpoint position in `schema` (0 when there is none yet).
fn position_in(url: &str, schema: &str) -> u64 {
    pg::connect(url)
        .query_opt(
            &format!("SELECT position FROM {schema}.spool_checkpoints"),
            &[],
        )
        .ok()
        .flatten()
        .map_or(0, |r| r.get::<_, i64>(0) as u64)
}

/// Random board, Loom and activity changes over a few shared tasks and runs.
fn random_requests(rng: &mut StdRng, n: usize, tag: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let task = format!("t{}", rng.random_range(0..40));
            let run = format!("run{}", rng.random_range(0..20));
            let (kind, stream, data) = match rng.random_range(0..6) {
                0 => ("task.created", format!("task/{task}"),
                      json!({"task_id": task, "title": format!("{tag} {i}"), "status": "todo"})),
                1 => ("task.scored", format!("task/{task}"),
                      json!({"task_id": task, "run_id": "r1", "i": 3, "u": 4, "c": 5, "e": 2,
                             "score": rng.random_range(0..1000) as f64 / 7.0, "rank": 1 + i % 9,
                             "lane": LANES[i % 3]})),
                2 => ("task.moved", format!("task/{task}"),
                      json!({"task_id": task, "status": "in_progress", "lane": LANES[i % 2]})),
                3 => ("loom.run_started", format!("run/{run}"),
                      json!({"run_id": run, "workflow_id": "morning-ritual", "trigger": "schedule", "host": tag})),
                4 => ("loom.step_finished", format!("run/{run}"),
                      json!({"run_id": run, "step_id": format!("s{}", i % 3), "status": "succeeded",
                             "exit_code": 0, "output_tail": format!("{tag} {i}")})),
                _ => ("activity.logged", "board".to_owned(),
                      json!({"message": format!("{tag} #{i}"), "source": "optimalos"})),
            };
            json!({"kind": kind, "stream": stream, "actor": format!("agent:{tag}"), "data": data})
        })
        .collect()
}

#[test]
fn vault_tables_deny_anon_and_authenticated_and_admit_service_role() {
    let dir = tempfile::tempdir().unwrap();
    let node = home(dir.path(), "desk");
    append(&node, &case_requests());
    let url = pg::database();
    project(&node, &url, &[]);
    let mut client = pg::connect(&url);
    let vault = [
        "vault_entries",
        "vault_recipients",
        "vault_access_log",
        "devices",
        "pairing_tokens",
        "vault_install",
        "openclaw_auth_profiles",
    ];
    // Views over them read with the reader's rights (security_invoker).
    let views = ["pairing_tokens_live", "vault_rewrap_due"];
    let count = |c: &mut postgres::Client, t: &str| -> i64 {
        c.query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .unwrap()
            .get(0)
    };
    let owner: Vec<i64> = vault.iter().map(|t| count(&mut client, t)).collect();
    assert!(
        owner.iter().all(|&n| n > 0),
        "the cases fill every vault table: {owner:?}"
    );
    for v in views {
        assert!(count(&mut client, v) > 0, "the cases show in {v}");
    }
    for t in vault {
        let forced: (bool, bool) = client
            .query_one(
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = $1",
                &[&t],
            )
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        assert_eq!(forced, (true, true), "{t}");
    }
    for role in ["anon", "authenticated"] {
        client.batch_execute(&format!("SET ROLE {role}")).unwrap();
        for t in vault {
            assert_eq!(count(&mut client, t), 0, "{role} sees no rows of {t}");
            let updated = client
                .execute(&format!("UPDATE {t} SET stamp = stamp"), &[])
                .or_else(|_| client.execute(&format!("DELETE FROM {t}"), &[]))
                .unwrap_or(0);
            assert_eq!(updated, 0, "{role} changes no row of {t}");
            let deleted = client.execute(&format!("DELETE FROM {t}"), &[]).unwrap();
            assert_eq!(deleted, 0, "{role} deletes no row of {t}");
        }
        for v in views {
            assert_eq!(count(&mut client, v), 0, "{role} sees no rows through {v}");
        }
        let insert = client.execute(
            "INSERT INTO vault_access_log (id, entry_id, device_id, recipient, unlocked_at) \
             VALUES ('x', 'e', 'd', 'r', now())",
            &[],
        );
        let error = insert.expect_err("an insert is denied");
        let error = error.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(error.contains("row-level security"), "{role}: {error}");
        client.batch_execute("RESET ROLE").unwrap();
    }
    client.batch_execute("SET ROLE service_role").unwrap();
    let service: Vec<i64> = vault.iter().map(|t| count(&mut client, t)).collect();
    assert_eq!(service, owner, "service_role sees every row");
    client.batch_execute("RESET ROLE").unwrap();
    // The other tables are not behind RLS: anon reads tasks as Supabase's API would.
    client.batch_execute("SET ROLE anon").unwrap();
    assert!(count(&mut client, "tasks") > 0);
}

#[test]
fn hostile_strings_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let node = home(dir.path(), "desk");
    let big: String = "0123456789abcdef\u{e9}\u{1f9f5}".repeat(1 << 16);
    assert!(big.len() > 1_000_000);
    let hostile = [
        "it's a \"quoted\" 'string'",
        "back\\slash \\\\ and \\x00 text",
        "'); DROP TABLE tasks; --",
        "$1 $$ dollar $$ quoting",
        "control \u{1}\u{7}\u{8}\t\n\r\u{1b}[31m \u{7f}",
        "unicode \u{202e}rtl \u{feff} \u{1f600} \u{fffd}",
        "{\"not\": \"json\"",
        "\\x4142",
    ];
    let mut lines = Vec::new();
    for (i, text) in hostile.iter().enumerate() {
        lines.push(
            json!({"kind": "activity.logged", "stream": "board", "actor": "user:x",
                          "data": {"message": text, "meta": {"k": text, "i": i}}}),
        );
    }
    lines.push(
        json!({"kind": "activity.logged", "stream": "board", "actor": "user:x",
                      "data": {"message": "big", "meta": {"blob": big}}}),
    );
    append(&node, &lines);
    let url = pg::database();
    project(&node, &url, &[]);
    let mut client = pg::connect(&url);
    for (i, text) in hostile.iter().enumerate() {
        let row = client
            .query_one(
                "SELECT message, meta->>'k' FROM activity_log WHERE (meta->>'i')::int = $1",
                &[&(i as i32)],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), *text);
        assert_eq!(row.get::<_, String>(1), *text);
    }
    let blob: String = client
        .query_one(
            "SELECT meta->>'blob' FROM activity_log WHERE message = 'big'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(blob == big, "the 1 MB string came back changed");
}

/// Two nodes holding the same events in different orders project into one database at the
/// same time; the rows equal one node's alone, and each node's checkpoint counts every event
/// once.
#[test]
fn two_nodes_projecting_at_once_leave_the_rows_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (home(dir.path(), "pi"), home(dir.path(), "desk"));
    common::fleet(&a, &[&b]);
    let mut rng = StdRng::seed_from_u64(21);
    append(&a, &random_requests(&mut rng, 3_000, "pi"));
    append(&b, &random_requests(&mut rng, 3_000, "desk"));
    append(&a, &case_requests());
    for (from, to) in [(&a, &b), (&b, &a)] {
        let file = dir.path().join("ship");
        let out = spool(from, &["export", "--out", file.to_str().unwrap()], "");
        assert!(out.status.success(), "{out:?}");
        let out = spool(to, &["ingest", file.to_str().unwrap()], "");
        assert!(out.status.success(), "{out:?}");
    }
    // And the pi's admission of the desk.
    let total = 6_000 + case_requests().len() as i64 + 1;
    let shared = pg::database();
    let run = |home: &Path| {
        Command::new(SPOOL)
            .arg("--home")
            .arg(home)
            .args([
                "project",
                "postgres",
                "--url",
                &shared,
                "--held-bytes-max",
                "20000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (run(&a), run(&b));
    for p in [pa, pb] {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let alone = pg::database();
    project(&a, &alone, &[]);
    assert_eq!(checkpoint_events(&shared), vec![total, total]);
    assert_eq!(checkpoint_events(&alone), vec![total]);
    let (x, y) = (dump(&shared), dump(&alone));
    assert!(x.iter().any(|(t, rows)| t == "tasks" && !rows.is_empty()));
    assert_eq!(x, y);
}

/// The projecting process killed at random moments, mostly while it writes a batch's rows
/// before their commit: resumed each time from its checkpoint, it ends with the rows of a clean
/// projection and every event counted once.
#[test]
fn a_projection_killed_mid_batch_resumes_to_the_clean_result() {
    let dir = tempfile::tempdir().unwrap();
    let (node, url, clean) = killed_repeatedly(dir.path(), "project", 5, "public", |_| {});
    project(&node, &url, &[]);
    assert_eq!(checkpoint_events(&url), vec![KILLED_EVENTS as i64]);
    assert_eq!(checkpoint_events(&clean), vec![KILLED_EVENTS as i64]);
    assert_eq!(dump(&url), dump(&clean));
}

/// Events of the node `killed_repeatedly` makes: enough commits (one per 1 000 events) that a
/// run is killed many times even when the projection is quick; each kill waits for two.
const KILLED_EVENTS: u64 = 40_000;

/// A node with [`KILLED_EVENTS`] events; `spool JOB postgres` run once into a clean database,
/// and again into another while being killed at random moments (checking the database with
/// `after_kill` after each kill) until it finished or was killed 25 times. Commits are made as
/// small as they go (`--held-bytes-max 1`) so kills land between them. Returns the node, the
/// killed job's database and the clean one.
fn killed_repeatedly(
    dir: &Path,
    job: &str,
    seed: u64,
    schema: &str,
    after_kill: impl Fn(&str),
) -> (std::path::PathBuf, String, String) {
    let node = home(dir, "desk");
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..KILLED_EVENTS / 5_000 {
        append(&node, &random_requests(&mut rng, 5_000, "desk"));
    }
    fn args<'a>(job: &'a str, url: &'a str) -> [&'a str; 6] {
        [job, "postgres", "--url", url, "--held-bytes-max", "1"]
    }
    let clean = pg::database();
    run(&node, &args(job, &clean));
    let url = pg::database();
    let seen = kill_repeatedly(
        &node,
        &args(job, &url),
        25,
        &mut rng,
        // A backfill's checkpoint is in its shadow schema until the swap, then in `public`
        // (a kill can land after the swap's commit).
        || position_in(&url, schema).max(position_in(&url, "public")),
        || after_kill(&url),
    );
    println!(
        "killed {job} {} times; its checkpoint was then at {seen:?}",
        seen.len()
    );
    assert!(seen.len() >= 5, "killed while it worked: {seen:?}");
    assert!(
        seen.iter().filter(|&&p| p > 0 && p < KILLED_EVENTS).count() >= 3,
        "kills between commits: {seen:?}"
    );
    (node, url, clean)
}

/// Rows in `table` (0 while the table does not exist yet).
fn count(url: &str, table: &str) -> i64 {
    let mut client = pg::connect(url);
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("public.{table}")],
        )
        .unwrap()
        .get(0);
    match exists {
        true => client
            .query_one(&format!("SELECT count(*) FROM public.{table}"), &[])
            .unwrap()
            .get(0),
        false => 0,
    }
}

/// A backfill builds the tables beside the live ones and swaps them in at once: a reader
/// polling the live tables throughout sees the old rows or the new, never a table half built;
/// the result equals a live projection, and projecting afterwards continues from the swapped
/// checkpoint.
#[test]
fn a_backfill_swaps_in_the_rows_of_a_live_projection_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = home(dir.path(), "desk");
    let mut rng = StdRng::seed_from_u64(31);
    append(&node, &random_requests(&mut rng, 2_000, "desk"));
    let url = pg::database();
    project(&node, &url, &[]);
    let before = count(&url, "activity_log");
    append(&node, &case_requests());
    append(&node, &random_requests(&mut rng, 4_000, "desk"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut client = pg::connect(&url);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = client
                    .query_one("SELECT count(*) FROM activity_log", &[])
                    .unwrap()
                    .get(0);
                seen.insert(n);
            }
            seen
        })
    };
    let out = spool(
        &node,
        &["backfill", "postgres", "--url", &url, "--json"],
        "",
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let total = 6_000 + case_requests().len() as i64;
    assert_eq!(report["events"], total);
    let after = count(&url, "activity_log");
    let seen = reader.join().unwrap();
    assert!(after > before);
    assert!(
        seen.iter().all(|n| *n == before || *n == after),
        "a reader saw {seen:?}, not only {before} or {after}"
    );
    let live = pg::database();
    project(&node, &live, &[]);
    assert_eq!(dump(&url), dump(&live));
    assert_eq!(checkpoint_events(&url), vec![total]);
    // Projecting continues from the swapped-in checkpoint.
    append(&node, &random_requests(&mut rng, 300, "desk"));
    project(&node, &url, &[]);
    project(&node, &live, &[]);
    assert_eq!(checkpoint_events(&url), vec![total + 300]);
    assert_eq!(dump(&url), dump(&live));
    let leftovers: i64 = pg::connect(&url)
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('spool_backfill', 'spool_retired')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0);
}

/// A backfill killed at random moments resumes from its own checkpoint and ends with the
/// rows of a clean projection, every event counted once; the live tables are untouched until
/// the swap.
#[test]
fn a_killed_backfill_resumes_to_the_clean_result() {
    let dir = tempfile::tempdir().unwrap();
    let (node, url, clean) =
        killed_repeatedly(dir.path(), "backfill", 41, "spool_backfill", |url| {
            // Either the swap has not happened (the shadow schema is there and the live
            // tables are empty) or it happened whole (a kill can land after its commit).
            let shadow: bool = pg::connect(url)
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'spool_backfill')",
                    &[],
                )
                .unwrap()
                .get(0);
            let live = count(url, "activity_log");
            assert!(
                (shadow && live == 0) || (!shadow && live > 0),
                "half a swap: shadow schema {shadow}, {live} live rows"
            );
        });
    let out = spool(&node, &["backfill", "postgres", "--url", &url], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(checkpoint_events(&url), vec![KILLED_EVENTS as i64]);
    assert_eq!(dump(&url), dump(&clean));
}

fn ok_json(home: &Path, args: &[&str], stdin: &str) -> Value {
    let out = spool(home, args, stdin);
    assert!(
        out.status.success(),
        "spool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn message(key: &str, text: &str) -> String {
    json!({"kind": "activity.logged", "stream": "s", "actor": "test", "key": key,
           "data": {"message": text}})
    .to_string()
}

/// README's safe restore (restore the home, ingest a peer's export, write again) keeps what it
/// promises: keys answer as before, and the Postgres checkpoint, kept as the heads applied,
/// still names the same events though the restored log holds them at other positions, so
/// `project postgres` goes on without a backfill.
#[test]
fn a_safe_restore_keeps_keys_and_the_postgres_checkpoint() {
    let url = pg::database();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (home(dir.path(), "a"), home(dir.path(), "b"));
    common::fleet(&a, &[&b]);
    let first = ok_json(&a, &["append"], &message("k1", "a1"));
    let backup = dir.path().join("a.bak");
    common::copy_dir(&a, &backup);
    let second = ok_json(&a, &["append"], &message("k2", "a2"));
    ok_json(&b, &["append"], &message("kb", "b1"));
    // a: a1, a2, b1. b: b1, a1, a2.
    let (to_a, to_b) = (dir.path().join("to-a.spool"), dir.path().join("to-b.spool"));
    run(&b, &["export", "--out", to_a.to_str().unwrap()]);
    ok_json(&a, &["ingest", "--json", to_a.to_str().unwrap()], "");
    run(&a, &["export", "--out", to_b.to_str().unwrap()]);
    ok_json(&b, &["ingest", "--json", to_b.to_str().unwrap()], "");
    project(&a, &url, &[]);
    assert_eq!(count(&url, "activity_log"), 3);

    // The disk fails; the backup (a1 only) comes back, and b's export (b1, a1, a2) with it:
    // a's log is now a1, b1, a2.
    std::fs::remove_dir_all(&a).unwrap();
    common::copy_dir(&backup, &a);
    let from_b = dir.path().join("from-b.spool");
    run(&b, &["export", "--out", from_b.to_str().unwrap()]);
    let report = ok_json(&a, &["ingest", "--json", from_b.to_str().unwrap()], "");
    assert_eq!(report["applied"], 2, "{report}");

    // A client retrying its write after the failure gets the event it wrote.
    let again = ok_json(&a, &["append"], &message("k2", "a2"));
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        (&again["seq"], &again["hash"]),
        (&second["seq"], &second["hash"])
    );
    assert_eq!(first["seq"], 2, "after a's admission of b");

    // The projection goes on from its checkpoint: nothing to apply, then the new event only.
    let summary = ok_json(&a, &["project", "postgres", "--url", &url, "--json"], "");
    assert_eq!(summary["applied"], 0, "{summary}");
    ok_json(&a, &["append"], &message("k3", "a3"));
    let summary = ok_json(&a, &["project", "postgres", "--url", &url, "--json"], "");
    assert_eq!(summary["applied"], 1, "{summary}");
    assert_eq!(count(&url, "activity_log"), 4);
    let mut client = pg::connect(&url);
    let heads: String = client
        .query_one("SELECT heads FROM spool_checkpoints", &[])
        .unwrap()
        .get(0);
    let heads: Value = serde_json::from_str(&heads).unwrap();
    let seqs: Vec<_> = heads
        .as_object()
        .unwrap()
        .values()
        .map(|h| h["seq"].clone())
        .collect();
    assert_eq!(seqs.len(), 2, "{heads}");
    assert!(
        seqs.contains(&json!(4)) && seqs.contains(&json!(1)),
        "{heads}"
    );
}

/// A database an older build laid out is refused by name, with the command that moves it up;
/// a backfill builds the current layout from the log, swaps it in and moves the version.
#[test]
fn an_older_database_is_refused_until_a_backfill_moves_it_up() {
    let url = pg::database();
    let dir = tempfile::tempdir().unwrap();
    let node = home(dir.path(), "desk");
    append(&node, &case_requests());
    project(&node, &url, &[]);
    let mut client = pg::connect(&url);
    // As version 2 left it: a status column on pairing_tokens, and the version.
    client
        .batch_execute(
            "ALTER TABLE pairing_tokens ADD COLUMN status text; \
             UPDATE spool_meta SET schema_version = 2",
        )
        .unwrap();
    let out = spool(&node, &["project", "postgres", "--url", &url], "");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("version 2, this build writes {SCHEMA_VERSION}"))
            && said.contains("spool backfill postgres"),
        "{said}"
    );
    run(&node, &["backfill", "postgres", "--url", &url]);
    let version: i64 = client
        .query_one("SELECT schema_version FROM spool_meta", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, SCHEMA_VERSION);
    let old_column: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = 'pairing_tokens' AND column_name = 'status')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!old_column);
    let live: i64 = client
        .query_one("SELECT count(*) FROM pairing_tokens_live", &[])
        .unwrap()
        .get(0);
    assert!(live > 0, "the views are back after the swap");
    project(&node, &url, &[]);
    // Version 3 lacked a removed entry's columns: opening it adds them in place (no backfill),
    // and a removal then projects.
    client
        .batch_execute(
            "DROP VIEW vault_rewrap_due, vault_unknown_recipients; \
             ALTER TABLE vault_entries DROP COLUMN removed_at, DROP COLUMN remove_reason; \
             UPDATE spool_meta SET schema_version = 3",
        )
        .unwrap();
    append(
        &node,
        &[
            json!({"kind": "vault.entry_removed", "stream": "vault/supabase-service-key",
                 "actor": "t", "data": {"entry_id": "supabase-service-key", "reason": "rotated"}}),
        ],
    );
    project(&node, &url, &[]);
    let row = client
        .query_one(
            "SELECT ciphertext IS NULL, remove_reason FROM vault_entries \
             WHERE entry_id = 'supabase-service-key'",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "rotated");
    let version: i64 = client
        .query_one("SELECT schema_version FROM spool_meta", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, SCHEMA_VERSION);
}

/// Every Postgres connection honours `sslmode` against a server that takes TLS only: `require`
/// and `prefer` encrypt, `verify-ca` checks the chain, `verify-full` the chain and the name;
/// plaintext, an unknown CA and the wrong name are refused with errors that name host, port,
/// database and cause, never the password. `spool project postgres` runs over it.
#[test]
fn every_sslmode_is_honoured_against_a_tls_only_server() {
    let (admin, port, ca_pem) = pg::start_tls_with_new_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let (other_pem, _) = pg::new_ca("another CA");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other_pem).unwrap();
    let ca_file = ca_file.to_str().unwrap();
    let url = |host: &str, extra: &str| {
        format!(
            "host={host} port={port} user=postgres password=hunter2-secret dbname=postgres {extra}"
        )
    };
    let encrypted = |url: &str| -> bool {
        let mut client =
            spool::project::postgres::connect(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0)
    };
    for extra in [
        "sslmode=require".to_owned(),
        String::new(), // prefer
        format!("sslmode=verify-ca sslrootcert={ca_file}"),
        format!("sslmode=verify-full sslrootcert={ca_file}"),
    ] {
        assert!(encrypted(&url("localhost", &extra)), "{extra}");
    }
    // verify-ca does not look at the name; verify-full does.
    assert!(encrypted(&url(
        "127.0.0.1",
        &format!("sslmode=verify-ca sslrootcert={ca_file}")
    )));
    let refused = |url: &str, said: &str| {
        let e = spool::project::postgres::connect(url)
            .err()
            .unwrap_or_else(|| panic!("{url}: connected"))
            .to_string();
        assert!(e.contains(said), "{e}");
        assert!(
            e.contains(&format!("port {port}")) && e.contains("database postgres"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "the password shown: {e}");
    };
    refused(
        &url(
            "127.0.0.1",
            &format!("sslmode=verify-full sslrootcert={ca_file}"),
        ),
        "certificate not valid for name \"127.0.0.1\"",
    );
    refused(
        &url(
            "localhost",
            &format!("sslmode=verify-ca sslrootcert={}", other_file.display()),
        ),
        "UnknownIssuer",
    );
    refused(&url("localhost", "sslmode=disable"), "no pg_hba.conf entry");
    let e = spool::project::postgres::connect(&url("localhost", "sslmode=verify-always"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("sslmode: must be") && !e.contains("verify-always"),
        "{e}"
    );
    // The URL form, and a whole projection over TLS.
    let name = format!("t{:016x}", rand::random::<u64>());
    pg::connect(&admin)
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let tls_url = format!(
        "postgresql://postgres@localhost:{port}/{name}?sslmode=verify-full&sslrootcert={}",
        ca_file.replace('/', "%2F")
    );
    let node = dir.path().join("node");
    assert!(spool(&node, &["init"], "").status.success());
    append(&node, &case_requests());
    let out = spool(&node, &["project", "postgres", "--url", &tls_url], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        count(&with_db(&admin, &name), "activity_log") > 0,
        "rows arrived over TLS"
    );
}

/// `url` (key=value) with its database replaced.
fn with_db(url: &str, name: &str) -> String {
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|p| !p.starts_with("dbname="))
        .collect();
    format!("{} dbname={name}", kept.join(" "))
}

/// Every connection bounds its statements (`STATEMENT_TIMEOUT`, as a startup option that
/// overrides a role's default), and a URL's own `options` replace it: a statement past its
/// bound fails by name instead of holding the job.
#[test]
fn statements_are_bounded_and_the_url_may_bound_them_otherwise() {
    let url = pg::database();
    let show = |url: &str| -> String {
        spool::project::postgres::connect(url)
            .unwrap()
            .query_one("SHOW statement_timeout", &[])
            .unwrap()
            .get(0)
    };
    let bound = spool::project::postgres::STATEMENT_TIMEOUT.as_secs();
    assert_eq!(show(&url), format!("{}min", bound / 60));
    let short = format!("{url} options='-c statement_timeout=150'");
    assert_eq!(show(&short), "150ms");
    let mut client = spool::project::postgres::connect(&short).unwrap();
    let e = client.batch_execute("SELECT pg_sleep(5)").unwrap_err();
    let said = spool::project::postgres::PostgresError::Sql(e).to_string();
    assert!(said.contains("statement timeout"), "{said}");
}
