//! `spool demo`: a week of the seed's activity on three nodes, in fresh homes, with no server.
//! The nodes write concurrently, exchange export files every evening, project, verify and
//! compare digests.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use spool::home::Home;
use spool::input::{new_event, AppendRequest, NewEvent};
use spool::log::Log;
use spool::project::sqlite::{Durability, Sqlite};
use spool::project::{self};
use spool::sync::file as shipping;
use spool::sync::{Selection, Vector};

const NODES: [&str; 3] = ["oracle", "pop-os", "ccx13"];
const LANES: [&str; 3] = ["now", "next", "later"];
const DAYS: u64 = 7;
const ROLES: [&str; 3] = ["edge", "primary", "worker"];
const TRACKS: [&str; 3] = ["infra", "content", "finance"];

struct Node {
    name: &'static str,
    home: Home,
    log: Log,
}

pub fn run(dir: Option<PathBuf>, seed: u64) -> anyhow::Result<ExitCode> {
    let dir = match dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("spool-demo-{}", std::process::id())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        return Err(
            super::Usage(format!("{} is not empty; give a new --dir", dir.display())).into(),
        );
    }
    std::fs::create_dir_all(&dir)?;
    println!("spool demo: a week of three nodes in {}", dir.display());
    let mut homes: Vec<Home> = NODES
        .iter()
        .map(|name| Home::init(&dir.join(name), name))
        .collect::<Result<_, _>>()?;
    let root_log = found_fleet(&dir, &mut homes)?;
    let mut logs = vec![Some(root_log)];
    for home in &homes[1..] {
        logs.push(Some(join(&dir, home)?));
    }
    let nodes: Vec<Node> = NODES
        .iter()
        .zip(homes)
        .zip(logs)
        .map(|((name, home), log)| Node {
            name,
            home,
            log: log.expect("opened above"),
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tasks = 0u64;
    let mut files = 0;
    for day in 1..=DAYS {
        // The three nodes write their day at the same time.
        let days: Vec<Vec<NewEvent>> = (0..3)
            .map(|i| day_of(i, day, &mut rng, &mut tasks))
            .collect::<anyhow::Result<_>>()?;
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let handles: Vec<_> = nodes
                .iter()
                .zip(days)
                .map(|(node, events)| scope.spawn(move || append_in_batches(&node.log, events)))
                .collect();
            for h in handles {
                h.join().expect("a demo writer panicked")?;
            }
            Ok(())
        })?;
        // Evening: each node sends every other what it lacks, as files.
        for from in &nodes {
            for to in &nodes {
                if from.name == to.name {
                    continue;
                }
                let since = vector(&to.log)?;
                let path = dir.join(format!("day{day}-{}-to-{}.spool", from.name, to.name));
                let out = std::io::BufWriter::new(std::fs::File::create(&path)?);
                let selection = Selection {
                    since,
                    ..Selection::default()
                };
                let key = from.home.node_key()?;
                shipping::export(&from.log.read()?, &selection, out, key.as_ref(), |_| {})?;
                let summary = shipping::ingest(
                    &to.log,
                    std::io::BufReader::new(std::fs::File::open(&path)?),
                    |_| {},
                )?;
                if summary.file_error.is_some() || summary.refused.is_some() {
                    anyhow::bail!("day {day}: {} -> {}: {summary:?}", from.name, to.name);
                }
                files += 1;
            }
        }
        let counts: Vec<String> = nodes
            .iter()
            .map(|n| Ok(format!("{} {}", n.name, n.log.read()?.len()?)))
            .collect::<anyhow::Result<_>>()?;
        println!(
            "  day {day}: {} events held ({})",
            total(&nodes)?,
            counts.join(", ")
        );
    }
    println!("  {files} export files exchanged");
    let mut digests = Vec::new();
    for node in &nodes {
        let path = node.home.projection_path();
        let mut db = Sqlite::open(&path, Durability::Live)?;
        project::catch_up(&node.log.read()?, &mut db, |_| {})?;
        let report = node.log.verify(2)?;
        anyhow::ensure!(
            report.ok(),
            "{}: verify found {:?}",
            node.name,
            report.problems
        );
        let (digest, _) = db.digest()?;
        println!(
            "  {:<7} {} events verified, heads {}, projection digest {digest}",
            node.name,
            report.events,
            vector(&node.log)?
        );
        digests.push(digest);
    }
    let same = digests.windows(2).all(|w| w[0] == w[1]);
    println!(
        "{}",
        if same {
            "all three nodes hold the same events and identical tables"
        } else {
            "DIVERGED: the projections differ"
        }
    );
    let desk = dir.join("pop-os");
    println!("look around:");
    println!("  spool --home {} status", desk.display());
    println!(
        "  spool --home {} sql \"SELECT id, title, shown_lane, current_score FROM tasks ORDER BY current_rank LIMIT 5\"",
        desk.display()
    );
    println!(
        "  spool --home {} log --kind task.scored --limit 3",
        desk.display()
    );
    println!(
        "  spool --home {} digest sqlite",
        dir.join("oracle").display()
    );
    Ok(if same {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The day-0 file: the first node's admissions of the others.
const FLEET_FILE: &str = "day0-fleet.spool";

/// Day 0: the first node founds the fleet and admits the others by their keys (as `spool fleet
/// admit` does) and exports; returns its log.
fn found_fleet(dir: &std::path::Path, homes: &mut [Home]) -> anyhow::Result<Log> {
    let (root, others) = homes.split_first_mut().expect("three nodes");
    let admissions = others
        .iter()
        .map(|home| {
            let key = home.public_key().context("a new home has a key")?;
            request(
                "device.paired",
                format!("device/{}", home.origin()),
                "spool demo",
                json!({"device_id": home.origin().to_hex(), "label": home.label(),
                       "capabilities": ["sync"], "signing_public_key": key.to_hex(),
                       "pairing_id": null}),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let log = root.open_log()?;
    log.append(admissions)?;
    let out = std::io::BufWriter::new(std::fs::File::create(dir.join(FLEET_FILE))?);
    let key = root.node_key()?;
    shipping::export(
        &log.read()?,
        &Selection::default(),
        out,
        key.as_ref(),
        |_| {},
    )?;
    for home in others {
        home.join_fleet(root.origin())?;
    }
    Ok(log)
}

/// A node joins by ingesting the day-0 file (as `spool fleet join` does); returns its log.
fn join(dir: &std::path::Path, home: &Home) -> anyhow::Result<Log> {
    let log = home.open_log()?;
    let file = std::fs::File::open(dir.join(FLEET_FILE))?;
    let summary = shipping::ingest(&log, std::io::BufReader::new(file), |_| {})?;
    if let Some(why) = summary.stopped() {
        anyhow::bail!("{} joining the fleet: {why}", home.label());
    }
    Ok(log)
}

fn vector(log: &Log) -> anyhow::Result<Vector> {
    Ok(Vector(
        log.read()?
            .heads()?
            .iter()
            .map(|h| (h.origin, h.seq))
            .collect(),
    ))
}

fn total(nodes: &[Node]) -> anyhow::Result<u64> {
    let mut all = Vector::default();
    for n in nodes {
        for (o, s) in vector(&n.log)?.0 {
            let e = all.0.entry(o).or_default();
            *e = (*e).max(s);
        }
    }
    Ok(all.0.values().sum())
}

fn append_in_batches(log: &Log, events: Vec<NewEvent>) -> anyhow::Result<()> {
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        log.append(events.by_ref().take(25).collect())
            .context("appending the demo's events")?;
    }
    Ok(())
}

fn request(kind: &str, stream: String, actor: &str, data: Value) -> anyhow::Result<NewEvent> {
    Ok(new_event(AppendRequest {
        kind: kind.into(),
        stream,
        actor: actor.into(),
        data,
        key: None,
        correlation: None,
        causation: None,
    })?)
}

/// One node's day: the desk runs the board and its Morning Ritual triage, the Pi runs strands
/// and the openclaw cron mirror, the cloud VM takes dispatched jobs; all report heartbeats.
fn day_of(
    node: usize,
    day: u64,
    rng: &mut StdRng,
    tasks: &mut u64,
) -> anyhow::Result<Vec<NewEvent>> {
    let host = NODES[node];
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(request(
            "fleet.heartbeat_recorded",
            format!("node/{host}"),
            &format!("host:{host}"),
            json!({"host": host, "role": ROLES[node], "capabilities": ["loom"], "version": format!("0.14.{day}")}),
        )?);
    }
    match node {
        1 => {
            for _ in 0..rng.random_range(3..7) {
                *tasks += 1;
                let t = format!("t{}", *tasks);
                out.push(request("task.created", format!("task/{t}"), "user:carlos", json!({"task_id": t, "title": format!("Task {} of day {day}", *tasks), "status": "todo", "track": TRACKS[rng.random_range(0..3)]}))?);
            }
            let run = format!("triage-d{day}");
            out.push(request("brief.added", format!("brief/b{day}"), "strand:morning-ritual", json!({"brief_id": format!("b{day}"), "source": "email", "body": format!("Overnight mail for day {day}")}))?);
            out.push(request("triage.run_started", format!("triage/{run}"), "agent:triage", json!({"run_id": run, "model": "claude-sonnet-4", "trigger": "morning-ritual", "host": host}))?);
            out.push(request(
                "brief.consumed",
                format!("brief/b{day}"),
                "agent:triage",
                json!({"brief_id": format!("b{day}"), "run_id": run}),
            )?);
            for t in 1..=*tasks {
                let (i, u, c, e) = (
                    rng.random_range(1..11),
                    rng.random_range(1..11),
                    rng.random_range(1..11),
                    rng.random_range(1..11),
                );
                let score = f64::from(i * u * c) / f64::from(e) / 10.0;
                out.push(request("task.scored", format!("task/t{t}"), "agent:triage", json!({"task_id": format!("t{t}"), "run_id": run, "i": i, "u": u, "c": c, "e": e, "score": (score * 100.0).round() / 100.0, "rank": t, "lane": LANES[rng.random_range(0..3)], "reasoning": "weighted I·U·C over E"}))?);
            }
            out.push(request("triage.run_completed", format!("triage/{run}"), "agent:triage", json!({"run_id": run, "model": "claude-sonnet-4", "tokens_in": rng.random_range(10_000..30_000), "tokens_out": rng.random_range(1_000..4_000), "tasks_scored": *tasks}))?);
            let t = format!("t{}", rng.random_range(1..=*tasks));
            out.push(request("task.score_overridden", format!("task/{t}"), "user:carlos", json!({"task_id": t, "dimension": "u", "old_value": 3, "new_value": 9, "reason": "deadline moved up", "applied_to_run_id": run}))?);
            if day.is_multiple_of(3) {
                out.push(request(
                    "task.score_locked",
                    format!("task/{t}"),
                    "user:carlos",
                    json!({"task_id": t, "locked_lane": "now"}),
                )?);
            }
            let moved = format!("t{}", rng.random_range(1..=*tasks));
            out.push(request(
                "task.moved",
                format!("task/{moved}"),
                "user:carlos",
                json!({"task_id": moved, "status": "in_progress", "lane": "now"}),
            )?);
            out.push(request("activity.logged", "board".into(), "strand:morning-ritual", json!({"message": format!("Morning Ritual scored {} tasks", *tasks), "source": "loom", "meta": {"run_id": run}}))?);
        }
        0 => {
            for k in 0..4 {
                let run = format!("run-d{day}-{k}");
                out.push(request("loom.run_started", format!("run/{run}"), "strand:openclaw-cron-mirror", json!({"run_id": run, "workflow_id": "openclaw-cron-mirror", "trigger": "schedule", "host": host}))?);
                for step in ["read-cron", "write-runs"] {
                    out.push(request(
                        "loom.step_started",
                        format!("run/{run}"),
                        "strand:openclaw-cron-mirror",
                        json!({"run_id": run, "step_id": step}),
                    )?);
                    out.push(request("loom.step_finished", format!("run/{run}"), "strand:openclaw-cron-mirror", json!({"run_id": run, "step_id": step, "status": "succeeded", "exit_code": 0, "output_tail": "ok\n"}))?);
                }
                out.push(request(
                    "loom.run_finished",
                    format!("run/{run}"),
                    "strand:openclaw-cron-mirror",
                    json!({"run_id": run, "status": "succeeded"}),
                )?);
                let session = format!("s-d{day}-{k}");
                let start = 1_763_625_600_000 + day * 86_400_000 + k * 300_000;
                out.push(request("loom.cron_run_mirrored", format!("cron/{session}"), "strand:openclaw-cron-mirror", json!({"session_id": session, "job_name": "memory-compaction", "host": host, "status": "succeeded", "started_at_ms": start, "finished_at_ms": start + 31_000}))?);
            }
            out.push(request(
                "loom.step_acked",
                format!("run/run-d{day}-0"),
                "user:carlos",
                json!({"run_id": format!("run-d{day}-0"), "step_id": "write-runs"}),
            )?);
        }
        _ => {
            for k in 0..3 {
                let job = format!("job-d{day}-{k}");
                out.push(request(
                    "loom.job_enqueued",
                    format!("job/{job}"),
                    "strand:dispatch",
                    json!({"job_id": job, "workflow_id": "phoenix-export", "target_host": host}),
                )?);
                out.push(request(
                    "loom.job_claimed",
                    format!("job/{job}"),
                    &format!("host:{host}"),
                    json!({"job_id": job, "host": host}),
                )?);
                out.push(request(
                    "loom.job_completed",
                    format!("job/{job}"),
                    &format!("host:{host}"),
                    json!({"job_id": job, "host": host, "status": "succeeded"}),
                )?);
            }
            out.push(request(
                "bot.heartbeat_recorded",
                "bot/cli-1".into(),
                "bot:cli-1",
                json!({"bot_id": "cli-1", "host": host, "status": "idle"}),
            )?);
        }
    }
    out.push(request(
        "activity.logged",
        "board".into(),
        &format!("host:{host}"),
        json!({"message": format!("{host} finished day {day}"), "source": "cli"}),
    )?);
    Ok(out)
}
