//! The task board and its AI triage: tasks, scores, overrides and locks, briefs, triage runs
//! (the seed's `tasks`, `score_history`, `score_overrides`, `briefs`, `triage_runs`).

use super::types::{Id, Label, NonEmptyText, Text, Title};
use super::{DataError, Payload};

choices! {
    /// One of the four triage dimensions (I, U, C, E), each scored 0 to 10.
    pub enum Dimension { I, U, C, E }
}

payloads! {
    /// A task was put on the board.
    pub struct TaskCreated {
        pub task_id: Id,
        pub title: Title,
        pub description: Option<Text>,
        /// Board column, such as `todo` or `in_progress`.
        pub status: Label,
        /// Triage lane, if already known.
        pub lane: Option<Label>,
        /// The v5 `track` column: which body of work the task belongs to.
        pub track: Option<Label>,
        #[schemars(length(max = 32))]
        pub tags: Option<Vec<Label>>,
    }

    /// A task's text or grouping changed; absent fields are unchanged.
    #[schemars(extend("minProperties" = 2))]
    pub struct TaskEdited {
        pub task_id: Id,
        pub title: Option<Title>,
        pub description: Option<Text>,
        pub track: Option<Label>,
        #[schemars(length(max = 32))]
        pub tags: Option<Vec<Label>>,
    }

    /// A task moved on the board: its status, its lane, or both.
    #[schemars(extend("minProperties" = 2))]
    pub struct TaskMoved {
        pub task_id: Id,
        pub status: Option<Label>,
        pub lane: Option<Label>,
    }

    /// A task left the board.
    pub struct TaskArchived {
        pub task_id: Id,
        pub reason: Option<Text>,
    }

    /// A triage run scored a task (one `score_history` row).
    pub struct TaskScored {
        pub task_id: Id,
        pub run_id: Id,
        #[schemars(range(max = 10))]
        pub i: u8,
        #[schemars(range(max = 10))]
        pub u: u8,
        #[schemars(range(max = 10))]
        pub c: u8,
        #[schemars(range(max = 10))]
        pub e: u8,
        /// The combined score the run computed from I, U, C and E.
        #[schemars(range(min = 0.0, max = 10000.0))]
        pub score: f64,
        /// 1 is the top of the board.
        #[schemars(range(min = 1))]
        pub rank: u32,
        pub lane: Label,
        pub reasoning: Option<Text>,
        pub clash_resolution: Option<Text>,
        #[schemars(length(max = 64))]
        pub sources_used: Option<Vec<Id>>,
    }

    /// The user corrected one dimension of a task's score.
    pub struct TaskScoreOverridden {
        pub task_id: Id,
        pub dimension: Dimension,
        #[schemars(range(max = 10))]
        pub old_value: u8,
        #[schemars(range(max = 10))]
        pub new_value: u8,
        pub reason: Option<Text>,
        /// The run whose score is corrected.
        pub applied_to_run_id: Option<Id>,
    }

    /// The user pinned a task to a lane: later triage runs still score it but do not move it.
    pub struct TaskScoreLocked {
        pub task_id: Id,
        pub locked_lane: Label,
        pub reason: Option<Text>,
    }

    /// The user released a task's lane lock.
    pub struct TaskScoreUnlocked {
        pub task_id: Id,
    }

    /// A Morning Ritual brief arrived for the next triage run.
    pub struct BriefAdded {
        pub brief_id: Id,
        /// Where it came from, such as `email` or `calendar`.
        pub source: Label,
        pub body: NonEmptyText,
        #[schemars(length(max = 32))]
        pub tags: Option<Vec<Label>>,
    }

    /// A triage run read a brief.
    pub struct BriefConsumed {
        pub brief_id: Id,
        pub run_id: Id,
    }

    /// A triage run began.
    pub struct TriageRunStarted {
        pub run_id: Id,
        pub model: Option<Label>,
        /// What started it, such as `morning-ritual` or `manual`.
        pub trigger: Option<Label>,
        pub host: Option<Id>,
    }

    /// A triage run finished and its scores are recorded.
    pub struct TriageRunCompleted {
        pub run_id: Id,
        pub model: Label,
        pub tokens_in: u64,
        pub tokens_out: u64,
        pub tasks_scored: u32,
        #[schemars(length(max = 64))]
        pub summaries: Option<Vec<Text>>,
    }

    /// A triage run stopped without scoring.
    pub struct TriageRunFailed {
        pub run_id: Id,
        pub error: NonEmptyText,
    }
}

impl Payload for TaskCreated {}
impl Payload for TaskArchived {}
impl Payload for TaskScoreOverridden {}
impl Payload for TaskScoreLocked {}
impl Payload for TaskScoreUnlocked {}
impl Payload for BriefAdded {}
impl Payload for BriefConsumed {}
impl Payload for TriageRunStarted {}
impl Payload for TriageRunCompleted {}
impl Payload for TriageRunFailed {}

impl Payload for TaskEdited {
    fn check(&self) -> Result<(), DataError> {
        let changes = [
            self.title.is_some(),
            self.description.is_some(),
            self.track.is_some(),
            self.tags.is_some(),
        ];
        match changes.contains(&true) {
            true => Ok(()),
            false => Err(DataError::whole("names no field to change")),
        }
    }
}

impl Payload for TaskMoved {
    fn check(&self) -> Result<(), DataError> {
        match self.status.is_some() || self.lane.is_some() {
            true => Ok(()),
            false => Err(DataError::whole("needs status, lane or both")),
        }
    }
}

impl Payload for TaskScored {
    fn check(&self) -> Result<(), DataError> {
        // JSON has no NaN; -0.0 would print differently from 0.0 in every projection.
        match self.score.is_finite() && self.score.is_sign_positive() {
            true => Ok(()),
            false => Err(DataError::at("/score", "must be a number from 0 to 10000")),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::kinds::lookup;

    #[test]
    fn a_change_event_must_change_something() {
        for kind in ["task.moved", "task.edited"] {
            let err = lookup(kind)
                .unwrap()
                .encode(&json!({"task_id": "t"}))
                .unwrap_err();
            assert_eq!(err.field, "", "{kind}: {err}");
        }
    }

    #[test]
    fn scores_are_bounded_and_never_negative_zero() {
        let kind = lookup("task.scored").unwrap();
        let mut data = json!({
            "task_id": "t", "run_id": "r", "i": 1, "u": 2, "c": 3, "e": 4,
            "score": 6.5, "rank": 1, "lane": "now",
        });
        kind.encode(&data).unwrap();
        data["i"] = json!(11);
        assert_eq!(kind.encode(&data).unwrap_err().field, "/i");
        data["i"] = json!(1);
        data["score"] = json!(-0.0);
        assert_eq!(kind.encode(&data).unwrap_err().field, "/score");
        data["score"] = json!(1e9);
        assert_eq!(kind.encode(&data).unwrap_err().field, "/score");
    }
}
