//! The one workload generator every bench shares: a deterministic stream of the seed's activity
//! (board refreshes, triage notes, Loom strand reports) as append requests.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use spool::input::{new_event, AppendRequest, NewEvent};

const SOURCES: [&str; 4] = ["cli", "optimalos", "loom", "openclaw"];
const ACTORS: [&str; 4] = [
    "user:carlos",
    "agent:triage",
    "strand:morning-ritual",
    "strand:openclaw-cron-mirror",
];
const WORDS: [&str; 12] = [
    "triage",
    "scored",
    "lane",
    "brief",
    "run",
    "step",
    "acked",
    "heartbeat",
    "claim",
    "board",
    "refresh",
    "strand",
];

/// The middle of a set of measurements (the machine is shared and noisy).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The floor under any durable single-event commit on this disk: `commits` small overwrites of
/// a preallocated file (no metadata to flush), each followed by one `fdatasync`, as the write-ahead
/// segment's records are written. Returns each commit's time, in order.
pub fn flush_floor(commits: usize) -> Vec<std::time::Duration> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("floor")).unwrap();
    let size = 4 * 1024 * 1024u64;
    file.write_all_at(&vec![0u8; size as usize], 0).unwrap();
    file.sync_all().unwrap();
    let record = [7u8; 300];
    (0..commits as u64)
        .map(|i| {
            let started = std::time::Instant::now();
            file.write_all_at(&record, (i * 300) % (size - 300))
                .unwrap();
            file.sync_data().unwrap();
            started.elapsed()
        })
        .collect()
}

/// An environment variable parsed, or `default` (`SPOOL_BENCH_RUNS`, `SPOOL_BENCH_SCALE`).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Workload {
    rng: StdRng,
    n: u64,
    /// How many distinct streams (tasks) events spread over.
    pub streams: u64,
}

impl Workload {
    pub fn new(seed: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            n: 0,
            streams: 5_000,
        }
    }

    /// The next change as a client would send it (about 200 bytes stored).
    pub fn request(&mut self) -> AppendRequest {
        self.n += 1;
        let words: Vec<&str> = (0..self.rng.random_range(6..14))
            .map(|_| WORDS[self.rng.random_range(0..WORDS.len())])
            .collect();
        let task = self.rng.random_range(0..self.streams);
        AppendRequest {
            kind: "activity.logged".into(),
            stream: format!("task/{task}"),
            actor: ACTORS[self.rng.random_range(0..ACTORS.len())].into(),
            data: json!({
                "message": format!("#{} {}", self.n, words.join(" ")),
                "source": SOURCES[self.rng.random_range(0..SOURCES.len())],
                "meta": {"task_id": task, "host": "pop-os"},
            }),
            key: None,
            correlation: None,
            causation: None,
        }
    }

    /// The next change as a validated event for the log.
    pub fn event(&mut self) -> NewEvent {
        new_event(self.request()).expect("the workload makes valid events")
    }

    pub fn events(&mut self, n: usize) -> Vec<NewEvent> {
        (0..n).map(|_| self.event()).collect()
    }
}

/// The fields of an `activity_log` row, for peers that write rows instead of events.
pub fn row(request: &AppendRequest) -> (String, String, String, String, String) {
    let d: &Value = &request.data;
    (
        request.stream.clone(),
        request.actor.clone(),
        d["message"].as_str().unwrap_or_default().to_owned(),
        d["source"].as_str().unwrap_or_default().to_owned(),
        d["meta"].to_string(),
    )
}

const LANES: [&str; 3] = ["now", "next", "later"];
const HOSTS: [&str; 3] = ["pop-os", "oracle", "ccx13"];

/// A day of the board, triage and Loom as append requests: tasks created, scored and moved,
/// runs and steps, heartbeats, activity. Deterministic for a seed.
pub struct Mixed {
    rng: StdRng,
    n: u64,
    tasks: u64,
}

impl Mixed {
    pub fn new(seed: u64) -> Mixed {
        Mixed {
            rng: StdRng::seed_from_u64(seed),
            n: 0,
            tasks: 0,
        }
    }

    pub fn request(&mut self) -> AppendRequest {
        self.n += 1;
        let n = self.n;
        let pick = self.rng.random_range(0..100);
        let task = if self.tasks == 0 {
            0
        } else {
            self.rng.random_range(0..self.tasks)
        };
        let run = n / 50;
        let (kind, stream, data) = match pick {
            0..=9 => {
                self.tasks += 1;
                let t = self.tasks;
                (
                    "task.created",
                    format!("task/t{t}"),
                    json!({"task_id": format!("t{t}"), "title": format!("Task {t}: renew the snapshot policy"), "status": "todo", "track": "infra"}),
                )
            }
            10..=39 => (
                "task.scored",
                format!("task/t{task}"),
                json!({"task_id": format!("t{task}"), "run_id": format!("r{run}"), "i": n % 11, "u": (n / 3) % 11, "c": 7, "e": 3, "score": (n % 1000) as f64 / 8.0, "rank": 1 + n % 40, "lane": LANES[(n % 3) as usize], "reasoning": "Backups are silently off; cheap to fix."}),
            ),
            40..=49 => (
                "task.moved",
                format!("task/t{task}"),
                json!({"task_id": format!("t{task}"), "status": "in_progress", "lane": "now"}),
            ),
            50..=59 => (
                "loom.step_finished",
                format!("run/run{run}"),
                json!({"run_id": format!("run{run}"), "step_id": format!("s{}", n % 5), "status": "succeeded", "exit_code": 0, "output_tail": "ok\n"}),
            ),
            60..=64 => (
                "loom.run_started",
                format!("run/run{run}"),
                json!({"run_id": format!("run{run}"), "workflow_id": "morning-ritual", "trigger": "schedule", "host": "pop-os"}),
            ),
            65..=69 => (
                "fleet.heartbeat_recorded",
                "node/pop-os".to_owned(),
                json!({"host": HOSTS[(n % 3) as usize], "role": "worker", "capabilities": ["loom"]}),
            ),
            _ => return self.activity(n),
        };
        AppendRequest {
            kind: kind.into(),
            stream,
            actor: ACTORS[(n % 4) as usize].into(),
            data,
            key: None,
            correlation: None,
            causation: None,
        }
    }

    fn activity(&mut self, n: u64) -> AppendRequest {
        AppendRequest {
            kind: "activity.logged".into(),
            stream: "board".into(),
            actor: ACTORS[(n % 4) as usize].into(),
            data: json!({"message": format!("#{n} board refreshed"), "source": "optimalos"}),
            key: None,
            correlation: None,
            causation: None,
        }
    }

    pub fn events(&mut self, count: usize) -> Vec<NewEvent> {
        (0..count)
            .map(|_| new_event(self.request()).expect("the workload makes valid events"))
            .collect()
    }
}
