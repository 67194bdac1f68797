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
