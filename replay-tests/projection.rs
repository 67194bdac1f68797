//! The SQLite projection: golden cases (events in, normalised tables out) through one `check`,
//! and the convergence property (any causal order of the same events, the same digest).
//!
//! A case is `replay-tests/cases/<name>.jsonl`: one event per line, `{"origin": "a", "at_ms":
//! ..., "deps": {"b": 2}, "kind", "stream", "actor", "data"}` (seqs and chain links are filled
//! in). Its expected tables are `<name>.tables.json`, rewritten only by `SPOOL_BLESS=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use spool::event::{self, Dep, Event, Hash, Origin};
use spool::kinds;
use spool::log::{Log, LogOptions, Shipped};
use spool::project::sqlite::{Durability, Sqlite};
use spool::project::{self, Until};

/// One event of a case, before its chain is known.
struct Spec {
    origin: char,
    at_ms: u64,
    deps: BTreeMap<char, u64>,
    kind: String,
    stream: String,
    actor: String,
    data: Value,
    /// As a newer build would write it: another version, or another kind's name, for a
    /// payload encoded as `kind` (the kind this build knows).
    stamped_version: Option<u16>,
    stamped_kind: Option<String>,
}

fn origin(label: char) -> Origin {
    Origin([label as u8; 16])
}

/// Chains the specs per origin into shipped events, in the given order.
fn build(specs: &[Spec]) -> Vec<Shipped> {
    let mut heads: BTreeMap<char, (u64, Hash)> = BTreeMap::new();
    specs
        .iter()
        .map(|s| {
            let (seq, prev) = heads.get(&s.origin).copied().unwrap_or((0, Hash::ZERO));
            let kind = kinds::lookup(&s.kind).unwrap_or_else(|| panic!("kind {}", s.kind));
            let payload = kind
                .encode(&s.data)
                .unwrap_or_else(|e| panic!("{}: {e}", s.kind));
            let event = Event {
                origin: origin(s.origin),
                seq: seq + 1,
                hlc: s.at_ms << 16,
                prev,
                deps: s
                    .deps
                    .iter()
                    .map(|(o, seq)| Dep {
                        origin: origin(*o),
                        seq: *seq,
                    })
                    .collect(),
                stream: s.stream.clone(),
                actor: s.actor.clone(),
                kind: s.stamped_kind.clone().unwrap_or_else(|| s.kind.clone()),
                version: s.stamped_version.unwrap_or(kind.version),
                correlation: None,
                causation: None,
                key: None,
                payload,
                signer: None,
            };
            let bytes = event::encode(&event);
            let hash = Hash::of(&bytes);
            heads.insert(s.origin, (seq + 1, hash));
            Shipped::verify(hash, bytes).unwrap()
        })
        .collect()
}

fn read_case(path: &Path) -> Vec<Spec> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            let label = |v: &Value| v.as_str().unwrap().chars().next().unwrap();
            Spec {
                origin: label(&v["origin"]),
                at_ms: v["at_ms"].as_u64().unwrap(),
                deps: v["deps"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, s)| (k.chars().next().unwrap(), s.as_u64().unwrap()))
                            .collect()
                    })
                    .unwrap_or_default(),
                kind: v["kind"].as_str().unwrap().to_owned(),
                stream: v["stream"].as_str().unwrap().to_owned(),
                actor: v["actor"].as_str().unwrap().to_owned(),
                data: v["data"].clone(),
                stamped_version: v["stamped_version"].as_u64().map(|n| n as u16),
                stamped_kind: v["stamped_kind"].as_str().map(str::to_owned),
            }
        })
        .collect()
}

/// An empty node that receives the cases' events.
fn node() -> (tempfile::TempDir, Log) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let log = Log::create(&path, Origin([0xee; 16]), LogOptions::default()).unwrap();
    (dir, log)
}

/// Ingests the events (in this order; the log applies them causally) into a fresh node and
/// rebuilds its projection. Returns the projection, kept alive with its directory.
fn project(events: Vec<Shipped>) -> (tempfile::TempDir, Sqlite) {
    let (dir, log) = node();
    let report = log.ingest(events).unwrap();
    assert!(report.refused.is_none(), "{report:?}");
    assert_eq!(
        report.waiting, 0,
        "every event's dependencies are in the case"
    );
    let path = dir.path().join("projection.sqlite");
    let mut target = Sqlite::open(&path, Durability::Rebuild).unwrap();
    project::replay(
        &log.read().unwrap(),
        &mut target,
        0,
        Until::default(),
        |_| {},
    )
    .unwrap();
    (dir, target)
}

/// The non-empty tables, rows in key order, without stamp columns (binary ordering keys; the
/// digest covers them).
fn normalised(db: &Sqlite) -> Value {
    let mut out = serde_json::Map::new();
    for table in db.tables().unwrap() {
        let rows: Vec<Value> = db
            .rows(&table)
            .unwrap()
            .into_iter()
            .map(|mut row| {
                row.retain(|col, _| !(col == "stamp" || col.ends_with("_stamp")));
                Value::Object(row)
            })
            .collect();
        if !rows.is_empty() {
            out.insert(table, Value::Array(rows));
        }
    }
    Value::Object(out)
}

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("replay-tests/cases")
}

/// Runs one golden case: the tables after its events, in file order and in shuffled orders
/// (the log applies each causally), must be the expected ones.
fn check(name: &str) -> Value {
    let specs = read_case(&cases_dir().join(format!("{name}.jsonl")));
    let events = build(&specs);
    let (_dir, db) = project(events.clone());
    let tables = normalised(&db);
    let digest = db.digest().unwrap().0;
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..3 {
        let mut shuffled = events.clone();
        shuffled.shuffle(&mut rng);
        let (_d, other) = project(shuffled);
        assert_eq!(normalised(&other), tables, "{name}: another causal order");
        assert_eq!(other.digest().unwrap().0, digest, "{name}: digest");
    }
    let expected_path = cases_dir().join(format!("{name}.tables.json"));
    if std::env::var("SPOOL_BLESS").is_ok_and(|v| v == "1") {
        let text = serde_json::to_string_pretty(&tables).unwrap() + "\n";
        std::fs::write(&expected_path, text).unwrap();
    }
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(&expected_path).unwrap_or_else(|e| {
            panic!("{}: {e} (SPOOL_BLESS=1 writes it)", expected_path.display())
        }),
    )
    .unwrap();
    assert_eq!(
        tables,
        expected,
        "{name}: tables differ from {}",
        expected_path.display()
    );
    tables
}

#[test]
fn golden_cases_cover_every_table() {
    let mut covered = std::collections::BTreeSet::new();
    for name in [
        "board",
        "loom",
        "fleet",
        "vault",
        "concurrent",
        "unreadable",
        "clocks",
        "pairing",
        "repaired",
        "claims",
        "rewrap",
        "cron",
        "lanes",
        "openclaw",
    ] {
        let tables = check(name);
        covered.extend(tables.as_object().unwrap().keys().cloned());
    }
    let (_d, empty) = project(Vec::new());
    for table in empty.tables().unwrap() {
        assert!(covered.contains(&table), "no golden case fills {table}");
    }
}

#[test]
fn concurrent_writes_resolve_by_stamp_and_claims_by_the_first() {
    let tables = check("concurrent");
    let task = &tables["tasks"][0];
    assert_eq!(task["title"], "Title from c, later", "the newer stamp wins");
    assert_eq!(task["lane"], "now");
    assert_eq!(task["tags"], json!("[\"c\"]"));
    assert_eq!(
        tables["loom_job_queue"][0]["claimed_by"], "c-host",
        "the first claim wins"
    );
}

/// The `clocks` case: a desktop five hours ahead (d), a cloud VM whose clock clamped the
/// desktop's stamps (v), a Pi at 1970 (p) and a node whose clock jumps back (j).
#[test]
fn causality_beats_clocks_ahead_behind_at_1970_and_jumping_back() {
    let tables = check("clocks");
    let task = |id: &str| {
        tables["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()
            .clone()
    };
    let t1 = task("t1");
    assert_eq!(
        t1["title"], "edited later on the cloud VM",
        "an edit depending on the desktop's event wins over it, though stamped five hours before"
    );
    assert_eq!(
        t1["lane"], "later",
        "a move after the Pi's, from a clock behind it"
    );
    assert_eq!(
        t1["tags"],
        json!("[\"concurrent with the pi, five hours ahead\"]"),
        "concurrent edits still go to the later clock"
    );
    assert_eq!(
        task("t2")["title"],
        "after the clock jumped back ten seconds"
    );
    assert_eq!(tables["briefs"][0]["consumed_in_run_id"], "r1");

    // As of an hour after the VM's clock: the VM's edit is stamped before it, but its cause (the
    // desktop's event, five hours ahead) is not, so neither is in; j's tasks, which depend on
    // nothing ahead, are.
    let (dir, log) = node();
    log.ingest(build(&read_case(&cases_dir().join("clocks.jsonl"))))
        .unwrap();
    let path = dir.path().join("as-of.sqlite");
    let mut db = Sqlite::open(&path, Durability::Rebuild).unwrap();
    let until = Until {
        position: None,
        time_ms: Some(1_763_625_600_000 + 3_600_000),
    };
    project::replay(&log.read().unwrap(), &mut db, 0, until, |_| {}).unwrap();
    let tasks = db.rows("tasks").unwrap();
    let ids: Vec<_> = tasks.iter().map(|t| t["id"].clone()).collect();
    assert_eq!(ids, [json!("t2")], "{tasks:?}");
    assert_eq!(tasks[0]["title"], "after the clock jumped back ten seconds");
    assert!(db.rows("briefs").unwrap().is_empty());
}

#[test]
fn as_of_a_position_or_a_time_gives_the_state_then() {
    let specs = read_case(&cases_dir().join("board.jsonl"));
    let events = build(&specs);
    let (dir, log) = node();
    log.ingest(events).unwrap();
    let reader = log.read().unwrap();
    let as_of = |until: Until| {
        let path = dir
            .path()
            .join(format!("p{}.sqlite", rand::random::<u32>()));
        let mut db = Sqlite::open(&path, Durability::Rebuild).unwrap();
        project::replay(&reader, &mut db, 0, until, |_| {}).unwrap();
        db
    };
    // After event 6 (t1 scored), before the triage run completed.
    let db = as_of(Until {
        position: Some(6),
        time_ms: None,
    });
    let runs = db.rows("triage_runs").unwrap();
    assert_eq!(runs[0]["status"], "running");
    assert_eq!(db.rows("score_history").unwrap().len(), 1);
    // The same moment by time: everything stamped up to 1763625605000 ms.
    let by_time = as_of(Until {
        position: None,
        time_ms: Some(1_763_625_605_000),
    });
    assert_eq!(by_time.digest().unwrap().0, db.digest().unwrap().0);
    assert_eq!(by_time.checkpoint().unwrap().2, 6);
}

const LANES: [&str; 3] = ["now", "next", "later"];

/// Random events of three origins over shared tasks, runs and jobs, each depending on what its
/// origin had seen.
fn random_specs(rng: &mut StdRng, n: usize) -> Vec<Spec> {
    let labels = ['a', 'b', 'c'];
    let mut seen: BTreeMap<char, BTreeMap<char, (u64, u64)>> = BTreeMap::new();
    let mut count: BTreeMap<char, (u64, u64)> = BTreeMap::new();
    let mut out = Vec::new();
    for i in 0..n {
        let o = labels[rng.random_range(0..3)];
        let task = format!("t{}", rng.random_range(0..4));
        let run = format!("r{}", rng.random_range(0..3));
        let job = format!("j{}", rng.random_range(0..3));
        let (kind, stream, data) = match rng.random_range(0..10) {
            0 => (
                "task.created",
                format!("task/{task}"),
                json!({"task_id": task, "title": format!("T {i}"), "status": "todo"}),
            ),
            1 => (
                "task.edited",
                format!("task/{task}"),
                json!({"task_id": task, "title": format!("edit {i}")}),
            ),
            2 => (
                "task.moved",
                format!("task/{task}"),
                json!({"task_id": task, "lane": LANES[i % 3]}),
            ),
            3 => (
                "task.scored",
                format!("task/{task}"),
                json!({"task_id": task, "run_id": run, "i": i % 11, "u": 3, "c": 4, "e": 5, "score": ((i % 4_000) as f64) / 4.0, "rank": 1 + i % 7, "lane": "now"}),
            ),
            4 => (
                "task.score_locked",
                format!("task/{task}"),
                json!({"task_id": task, "locked_lane": "later"}),
            ),
            5 => (
                "task.score_unlocked",
                format!("task/{task}"),
                json!({"task_id": task}),
            ),
            6 => (
                "loom.job_claimed",
                format!("job/{job}"),
                json!({"job_id": job, "host": format!("h{o}")}),
            ),
            7 => (
                "loom.step_finished",
                format!("run/{run}"),
                json!({"run_id": run, "step_id": "s", "status": "succeeded", "exit_code": i % 3}),
            ),
            8 => (
                "fleet.heartbeat_recorded",
                "node/x".to_owned(),
                json!({"host": "x", "role": format!("r{i}"), "capabilities": []}),
            ),
            _ => (
                "activity.logged",
                "board".to_owned(),
                json!({"message": format!("m{i}")}),
            ),
        };
        // What this origin knows: a random part of the others' events so far.
        let mut deps = BTreeMap::new();
        let mut at = count.get(&o).map_or(1_763_625_600_000, |c| c.1);
        for other in labels.iter().filter(|l| **l != o) {
            if let Some(&(seq, at_other)) = count.get(other) {
                if rng.random_bool(0.5) {
                    let known = seen.entry(o).or_default().entry(*other).or_insert((0, 0));
                    let upto = rng.random_range(known.0..=seq);
                    if upto > 0 {
                        *known = (upto, at_other);
                        deps.insert(*other, upto);
                        at = at.max(at_other);
                    }
                }
            }
        }
        // Stamps move past everything known (the HLC rule), plus some concurrency skew.
        let at = at + rng.random_range(1..500);
        let c = count.entry(o).or_insert((0, 0));
        *c = (c.0 + 1, at);
        out.push(Spec {
            origin: o,
            at_ms: at,
            deps,
            kind: kind.to_owned(),
            stream,
            actor: "test".into(),
            data,
            stamped_version: None,
            stamped_kind: None,
        });
    }
    out
}

#[test]
fn any_causal_order_of_the_same_events_gives_the_same_digest() {
    for seed in 0..12 {
        let mut rng = StdRng::seed_from_u64(seed);
        let specs = random_specs(&mut rng, 150);
        assert_orders_converge(&specs, &mut rng, 4, seed);
    }
}

/// The events of `specs` projected in file order and in `shuffles` shuffled orders (the log
/// applies each causally) give one digest.
fn assert_orders_converge(specs: &[Spec], rng: &mut StdRng, shuffles: usize, seed: u64) {
    let events = build(specs);
    let (_d, first) = project(events.clone());
    let digest = first.digest().unwrap().0;
    for _ in 0..shuffles {
        let mut order = events.clone();
        order.shuffle(rng);
        let (_d, db) = project(order);
        assert_eq!(db.digest().unwrap().0, digest, "seed {seed}");
    }
}

/// The `data` of each current kind's golden event (`schemas/KIND/vN.golden.json`).
fn golden_data() -> Vec<(&'static kinds::KindSpec, Value)> {
    kinds::CATALOGUE
        .iter()
        .map(|spec| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("schemas")
                .join(spec.name)
                .join(format!("v{}.golden.json", spec.version));
            let golden: Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            (*spec, golden["data"].clone())
        })
        .collect()
}

/// Free-text fields a random event varies, so that which write wins shows in the rows.
const VARIED_TEXT: [&str; 9] = [
    "title",
    "message",
    "body",
    "summary",
    "reasoning",
    "reason",
    "note",
    "description",
    "label",
];

/// Random events of every kind, from each kind's golden payload with its ids drawn from small
/// pools (so events of all kinds meet on the same rows) and its free text varied. Four origins;
/// `d`'s clock runs five hours ahead, and the others clamp what they learn from it to a minute
/// past their own clock, as a node's HLC does: their later events carry stamps *below* the
/// events they depend on.
fn random_specs_of_every_kind(rng: &mut StdRng, n: usize) -> Vec<Spec> {
    const START: u64 = 1_763_625_600_000;
    const AHEAD: u64 = 5 * 3_600_000;
    const DRIFT: u64 = 60_000;
    let labels = ['a', 'b', 'c', 'd'];
    let goldens = golden_data();
    // Per origin: events written, the last stamp, and what it has seen of each other origin.
    let mut written: BTreeMap<char, (u64, u64)> = BTreeMap::new();
    let mut seen: BTreeMap<char, BTreeMap<char, u64>> = BTreeMap::new();
    let mut stamps: BTreeMap<(char, u64), u64> = BTreeMap::new();
    let mut out = Vec::new();
    for i in 0..n {
        let o = labels[rng.random_range(0..labels.len())];
        let (kind, golden) = &goldens[rng.random_range(0..goldens.len())];
        let mut data = golden.clone();
        if let Some(map) = data.as_object_mut() {
            for (key, value) in map.iter_mut() {
                if key.ends_with("_id") && value.is_string() {
                    *value = json!(format!("{key}-{}", rng.random_range(0..2)));
                } else if VARIED_TEXT.contains(&key.as_str()) && value.is_string() {
                    *value = json!(format!("{key} {i}"));
                }
            }
        }
        let wall = START + i as u64 * 1_000 + if o == 'd' { AHEAD } else { 0 };
        let (seq, last) = written.get(&o).copied().unwrap_or((0, 0));
        let mut at = wall.max(last + 1);
        let mut deps = BTreeMap::new();
        for other in labels.iter().filter(|l| **l != o) {
            let Some(&(their_seq, _)) = written.get(other) else {
                continue;
            };
            let known = seen.entry(o).or_default().entry(*other).or_insert(0);
            if rng.random_bool(0.5) && their_seq > *known {
                let upto = rng.random_range(*known + 1..=their_seq);
                *known = upto;
                deps.insert(*other, upto);
                // The HLC moves past what it learns, clamped to a minute ahead of this clock.
                at = at.max((stamps[&(*other, upto)] + 1).min(wall + DRIFT));
            }
        }
        written.insert(o, (seq + 1, at));
        stamps.insert((o, seq + 1), at);
        out.push(Spec {
            origin: o,
            at_ms: at,
            deps,
            kind: kind.name.to_owned(),
            stream: format!("s/{}", rng.random_range(0..3)),
            actor: "test".into(),
            data,
            stamped_version: None,
            stamped_kind: None,
        });
    }
    out
}

/// The convergence property over every kind, with a clock five hours ahead: any causal order of
/// the same events gives the same rows, and they are the rows of the order the events were
/// written in.
#[test]
fn any_causal_order_of_events_of_every_kind_with_a_clock_ahead_gives_the_same_digest() {
    let mut kinds_seen = std::collections::BTreeSet::new();
    for seed in 0..8 {
        let mut rng = StdRng::seed_from_u64(seed);
        let specs = random_specs_of_every_kind(&mut rng, 300);
        kinds_seen.extend(specs.iter().map(|s| s.kind.clone()));
        assert_orders_converge(&specs, &mut rng, 3, seed);
    }
    assert_eq!(
        kinds_seen.len(),
        kinds::CATALOGUE.len(),
        "every kind was drawn"
    );
}

/// Each current kind's golden event (`schemas/KIND/vN.golden.json`) and the writes the
/// projector makes of it.
fn golden_writes() -> Vec<(&'static kinds::KindSpec, Vec<spool::project::Write>)> {
    use spool::project::{writes, Context};
    golden_data()
        .into_iter()
        .map(|(spec, data)| {
            let payload = spec.encode(&data).unwrap();
            let body = kinds::body(spec.name, spec.version, &payload).unwrap();
            let ctx = Context {
                id: "o:1".into(),
                stamp: [1; 24],
                at: "2026-01-01T00:00:00.000Z".into(),
                actor: "a",
                stream: "s",
            };
            (spec, writes(&ctx, &body))
        })
        .collect()
}

/// The append-only tables (whose key index a bulk load may build after its rows) are exactly
/// those that only ever receive inserts.
#[test]
fn the_append_only_tables_are_the_ones_only_inserted_into() {
    use spool::project::{Write, APPEND_ONLY};
    let (mut inserted, mut upserted) = (BTreeMap::new(), BTreeMap::new());
    for (spec, ws) in golden_writes() {
        for w in ws {
            match w {
                Write::Insert { table, .. } => inserted.insert(table, spec.name),
                Write::Upsert { table, .. } => upserted.insert(table, spec.name),
            };
        }
    }
    let inserted: Vec<&str> = inserted.into_keys().collect();
    // The replay itself inserts the list of events it could not read.
    let listed: Vec<&str> = APPEND_ONLY
        .iter()
        .copied()
        .filter(|t| *t != spool::project::UNREADABLE)
        .collect();
    assert_eq!(inserted, listed);
    for table in APPEND_ONLY {
        assert!(!upserted.contains_key(table), "{table} also gets upserts");
    }
}

/// A group must always write the same columns: otherwise which columns survive would depend on
/// which write arrived last, not on the stamps.
#[test]
fn every_write_to_a_column_group_sets_the_same_columns() {
    use spool::project::Write;
    let mut seen: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (spec, ws) in golden_writes() {
        for w in ws {
            if let Write::Upsert { table, groups, .. } = w {
                for g in groups {
                    let cols: Vec<String> = g.cols.iter().map(|c| c.0.to_owned()).collect();
                    let key = (table.to_owned(), g.stamp.to_owned());
                    match seen.get(&key) {
                        Some(before) => assert_eq!(before, &cols, "{}: {key:?}", spec.name),
                        None => {
                            seen.insert(key, cols);
                        }
                    }
                }
            }
        }
    }
    assert!(seen.len() > 20);
}

/// Counts a target's commits; fails the `fail_at`th one.
struct Commits<'a> {
    db: &'a mut Sqlite,
    count: usize,
    fail_at: Option<usize>,
}

impl project::Target for Commits<'_> {
    type Error = spool::project::sqlite::SqliteError;
    fn checkpoint(&mut self) -> Result<project::Checkpoint, Self::Error> {
        project::Target::checkpoint(&mut *self.db)
    }
    fn held_bytes_max(&self) -> usize {
        self.db.held_bytes_max()
    }
    fn begin(&mut self) -> Result<(), Self::Error> {
        self.db.begin()
    }
    fn insert(
        &mut self,
        table: &'static str,
        cols: Vec<(&'static str, project::Val)>,
    ) -> Result<(), Self::Error> {
        self.db.insert(table, cols)
    }
    fn commit(
        &mut self,
        rows: Vec<project::merge::Row>,
        position: u64,
        hash: Hash,
        applied: u64,
        heads: &project::Applied,
    ) -> Result<(), Self::Error> {
        self.count += 1;
        if self.fail_at == Some(self.count) {
            return Err(rusqlite::Error::InvalidQuery.into());
        }
        self.db.commit(rows, position, hash, applied, heads)
    }
}

/// What `Sqlite::digest` gives: the hash of the rows and each table's row count.
type Digest = (Hash, Vec<(String, u64)>);

/// The digest and commit count of a rebuild of `events` holding every merged row until the end
/// ("whole") and of one committing whenever a row is held ("split"), each checked to have
/// applied and checkpointed every event.
fn whole_and_split(events: Vec<Shipped>) -> [(Digest, usize); 2] {
    let count = events.len() as u64;
    let (dir, log) = node();
    log.ingest(events).unwrap();
    let reader = log.read().unwrap();
    [("whole", usize::MAX), ("split", 1)].map(|(name, budget)| {
        let mut db = Sqlite::open(&dir.path().join(name), Durability::Rebuild).unwrap();
        db.hold_at_most(budget);
        let mut target = Commits {
            db: &mut db,
            count: 0,
            fail_at: None,
        };
        let applied = project::replay(&reader, &mut target, 0, Until::default(), |_| {}).unwrap();
        let commits = target.count;
        assert_eq!(applied, count, "{name}");
        assert_eq!(db.checkpoint().unwrap().0, count, "{name}");
        assert_eq!(db.checkpoint().unwrap().2, count, "{name}");
        (db.digest().unwrap(), commits)
    })
}

/// A replay that commits whenever the target's memory is full writes the same rows as one that
/// commits once, including inserts written in runs before their commit.
#[test]
fn commits_forced_by_held_memory_give_the_same_rows() {
    let mut rng = StdRng::seed_from_u64(7);
    let [(whole, once), (split, many)] = whole_and_split(build(&random_specs(&mut rng, 50_000)));
    assert_eq!((once, many > 1), (1, true), "{once} and {many} commits");
    assert!(whole
        .1
        .iter()
        .any(|(t, n)| t == "activity_log" && *n > 4_096));
    assert_eq!(whole, split);
}

/// A batch of more merged rows than a commit frees in place (the SQLite target hands the rows
/// of a large commit to another thread) writes every row, as commits of one row at a time do.
#[test]
fn a_commit_of_many_merged_rows_writes_every_row() {
    let tasks = 12_000;
    let specs: Vec<Spec> = (0..tasks * 2)
        .map(|i| {
            let task = format!("t{}", i % tasks);
            let (kind, data) = match i < tasks {
                true => (
                    "task.created",
                    json!({"task_id": task, "title": format!("T {i}"), "status": "todo"}),
                ),
                false => ("task.moved", json!({"task_id": task, "lane": LANES[i % 3]})),
            };
            Spec {
                origin: ['a', 'b', 'c'][i % 3],
                at_ms: 1_000 + i as u64,
                deps: BTreeMap::new(),
                kind: kind.into(),
                stream: format!("task/{task}"),
                actor: "test".into(),
                data,
                stamped_version: None,
                stamped_kind: None,
            }
        })
        .collect();
    let [(whole, once), (split, many)] = whole_and_split(build(&specs));
    assert_eq!((once, many > 1), (1, true), "{once} and {many} commits");
    assert!(
        whole.1.contains(&("tasks".to_owned(), tasks as u64)),
        "{whole:?}"
    );
    assert_eq!(whole, split);
}

/// A failing target stops the replay (and its reading and projecting threads) with the error;
/// what was committed before stays, and a catch-up finishes the rest.
#[test]
fn a_failed_commit_stops_the_replay_and_a_catch_up_resumes_it() {
    let mut rng = StdRng::seed_from_u64(8);
    let events = build(&random_specs(&mut rng, 5_000));
    let (dir, log) = node();
    log.ingest(events).unwrap();
    let reader = log.read().unwrap();
    let mut db = Sqlite::open(&dir.path().join("p"), Durability::Rebuild).unwrap();
    db.hold_at_most(1);
    let mut target = Commits {
        db: &mut db,
        count: 0,
        fail_at: Some(3),
    };
    let error = project::replay(&reader, &mut target, 0, Until::default(), |_| {}).unwrap_err();
    assert!(matches!(error, project::ReplayError::Target(_)), "{error}");
    drop(db);
    let mut db = Sqlite::open(&dir.path().join("p"), Durability::Rebuild).unwrap();
    let (position, _, applied) = db.checkpoint().unwrap();
    assert_eq!((position, applied), (2_000, 2_000), "two chunks committed");
    assert_eq!(project::catch_up(&reader, &mut db, |_| {}).unwrap(), 3_000);
    let (_d, whole) = project(build(&random_specs(&mut StdRng::seed_from_u64(8), 5_000)));
    assert_eq!(db.digest().unwrap(), whole.digest().unwrap());
}

/// A rebuild writes its rows first and creates the secondary indexes when it finishes; a live
/// projection has them from the start. Either way the finished file has every index.
#[test]
fn a_finished_rebuild_and_a_live_projection_have_every_index() {
    let indexes = |path: &Path| {
        let mut names = Vec::new();
        Sqlite::open_read_only(path)
            .unwrap()
            .query(
                "SELECT name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
                |_, row| names.push(row[0].as_str().unwrap().to_owned()),
            )
            .unwrap();
        names
    };
    let events = build(&random_specs(&mut StdRng::seed_from_u64(9), 2_000));
    let (dir, log) = node();
    log.ingest(events).unwrap();
    let reader = log.read().unwrap();
    let rebuilt = dir.path().join("rebuilt");
    let mut db = Sqlite::open(&rebuilt, Durability::Rebuild).unwrap();
    project::replay(&reader, &mut db, 0, Until::default(), |_| {}).unwrap();
    assert!(indexes(&rebuilt).is_empty(), "deferred while rows go in");
    let digest = db.digest().unwrap();
    db.finish().unwrap();
    let live = dir.path().join("live");
    let mut db = Sqlite::open(&live, Durability::Live).unwrap();
    project::catch_up(&reader, &mut db, |_| {}).unwrap();
    assert_eq!(db.digest().unwrap(), digest);
    assert_eq!(
        indexes(&rebuilt),
        ["activity_log_time", "score_history_task"]
    );
    assert_eq!(indexes(&live), indexes(&rebuilt));
}

/// Runs `sql` on the projection of case `name` (in file order).
fn query(name: &str, sql: &str) -> Vec<serde_json::Map<String, Value>> {
    let events = build(&read_case(&cases_dir().join(format!("{name}.jsonl"))));
    let (_dir, mut db) = project(events);
    let mut out = Vec::new();
    db.query(sql, |names, values| {
        out.push(names.iter().cloned().zip(values).collect())
    })
    .unwrap();
    out
}

/// The row of `table` in `tables` whose `column` is `value`.
fn row<'a>(tables: &'a Value, table: &str, column: &str, value: &str) -> &'a Value {
    tables[table]
        .as_array()
        .unwrap_or_else(|| panic!("no {table}"))
        .iter()
        .find(|r| r[column] == value)
        .unwrap_or_else(|| panic!("no {table} row with {column} = {value}"))
}

#[test]
fn a_pairing_ends_by_its_first_end_and_reads_expired_after_its_ttl() {
    let tables = check("pairing");
    let locked = row(&tables, "pairing_tokens", "pairing_id", "p-locked");
    assert_eq!(locked["end_status"], "locked", "too many attempts lock it");
    assert_eq!(locked["end_reason"], "too_many_attempts");
    let used = row(&tables, "pairing_tokens", "pairing_id", "p-used");
    assert_eq!(
        used["end_status"], "completed",
        "a later expiry does not undo its use"
    );
    let live = query(
        "pairing",
        "SELECT pairing_id, status FROM pairing_tokens_live ORDER BY pairing_id",
    );
    let statuses: Vec<_> = live
        .iter()
        .map(|r| (r["pairing_id"].clone(), r["status"].clone()))
        .collect();
    assert_eq!(
        statuses,
        [
            (json!("p-1970"), json!("expired")),
            (json!("p-locked"), json!("locked")),
            (json!("p-used"), json!("completed")),
        ]
    );
}

#[test]
fn a_device_paired_again_and_a_recipient_added_again_are_active_again() {
    let tables = check("repaired");
    let device = row(&tables, "devices", "device_id", "pixel-9");
    assert_eq!(device["revoked_at"], Value::Null, "{device}");
    assert_eq!(device["label"], "Carlos's phone (found)");
    let recipient = row(&tables, "vault_recipients", "recipient_id", "rcp-oracle");
    assert_eq!(recipient["removed_at"], Value::Null, "{recipient}");
    assert_eq!(
        recipient["fingerprint"],
        "e65e0ad5d554db20cb7a6f70e2e64b6bb012765c480aa6dbf732c70f6242edbe"
    );
}

#[test]
fn only_the_holder_releases_its_claim() {
    let tables = check("claims");
    let claims = tables["bot_claims"].as_array().unwrap();
    let of = |bot: &str, resource: &str| {
        claims
            .iter()
            .find(|c| c["bot_id"] == bot && c["resource"] == resource)
            .unwrap()
            .clone()
    };
    assert_eq!(of("cli-agent-2", "task/t1")["status"], "held");
    assert_eq!(of("cli-agent-1", "task/t1")["status"], "released");
    assert_eq!(of("cli-agent-2", "task/t2")["status"], "released");
    // The newest claim not released is the holder (its TTL is long past in this case's time,
    // so the view, which reads the clock, lists nobody).
    let holders = query("claims", "SELECT resource, bot_id FROM bot_holders");
    assert!(holders.is_empty(), "{holders:?}");
}

#[test]
fn a_removed_recipient_marks_the_entries_that_need_a_rewrap() {
    check("rewrap");
    let due = query(
        "rewrap",
        "SELECT entry_id, recipient_id FROM vault_rewrap_due ORDER BY entry_id",
    );
    let due: Vec<_> = due
        .iter()
        .map(|r| (r["entry_id"].clone(), r["recipient_id"].clone()))
        .collect();
    assert_eq!(due, [(json!("github-token"), json!("rcp-laptop-old"))]);
    // npm-token was removed: its row keeps no ciphertext and lists no recipient.
    let tables = check("rewrap");
    let removed = row(&tables, "vault_entries", "entry_id", "npm-token");
    assert_eq!(removed["ciphertext"], Value::Null, "{removed}");
    assert_eq!(removed["recipients"], Value::Null, "{removed}");
    assert_eq!(removed["remove_reason"], "rotated", "{removed}");
    assert!(query("rewrap", "SELECT * FROM vault_unknown_recipients").is_empty());
}

#[test]
fn the_cron_mirror_makes_a_run_and_its_step() {
    let tables = check("cron");
    let step = row(&tables, "loom_step_runs", "run_id", "6f1e");
    assert_eq!(step["step_id"], "memory-compaction");
    assert_eq!(step["status"], "succeeded");
    let running = row(&tables, "loom_step_runs", "run_id", "7a2b");
    assert_eq!(running["status"], "timed_out");
    assert_eq!(running["finished_at"], Value::Null);
    assert_eq!(
        row(&tables, "loom_runs", "run_id", "6f1e")["status"],
        "succeeded"
    );
}

#[test]
fn the_lane_shown_is_the_later_of_the_move_and_the_score_unless_locked() {
    let tables = check("lanes");
    let shown = |id: &str| row(&tables, "tasks", "id", id)["shown_lane"].clone();
    assert_eq!(shown("t1"), "next", "the user's move after the score");
    assert_eq!(shown("t2"), "now", "the score after the user's move");
    assert_eq!(shown("t3"), "now", "a locked score keeps its lane");
}

#[test]
fn openclaws_stores_are_projected_with_credentials_as_vault_references() {
    let tables = check("openclaw");
    let session = row(&tables, "openclaw_sessions", "session_id", "6f1e");
    assert_eq!(session["session_key"], "telegram:carlos");
    assert_eq!(session["session_file"], "profile/telegram:carlos.v2.json");
    assert_eq!(session["agent_id"], "main");
    let config = tables["openclaw_config"].as_array().unwrap();
    let model = config
        .iter()
        .find(|c| c["agent_id"] == "main" && c["path"] == "memory.embedding.model")
        .unwrap();
    assert_eq!(
        model["value"], "\"text-embedding-3-large\"",
        "the later write"
    );
    assert!(config
        .iter()
        .any(|c| c["agent_id"] == "" && c["path"] == "gateway.port" && c["value"] == "18789"));
    for profile in tables["openclaw_auth_profiles"].as_array().unwrap() {
        let reference = profile["credential_ref"].as_str().unwrap();
        assert!(reference.starts_with("vault:"), "{profile}");
    }
}
