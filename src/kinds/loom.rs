//! Loom, the workflow engine: definitions, registrations, runs and steps, cross-node jobs, and
//! the openclaw cron mirror (the seed's `loom_*` tables).

use super::types::{Id, Json, Label, NonEmptyText, Tail, Text, Title};
use super::{from_payload, Payload};

choices! {
    /// How a run or a mirrored cron run ended.
    pub enum RunStatus { Succeeded, Failed, Cancelled, TimedOut }

    /// How a step ended.
    pub enum StepStatus { Succeeded, Failed, Skipped, Cancelled }

    /// How a cross-node job ended.
    pub enum JobStatus { Succeeded, Failed }
}

payloads! {
    /// One step of a workflow definition.
    pub struct StepDef {
        pub step_id: Id,
        pub name: Title,
        pub command: Option<Text>,
        #[schemars(length(max = 64))]
        pub depends_on: Option<Vec<Id>>,
        /// The node the step must run on, when not the run's own.
        pub target_host: Option<Id>,
    }

    /// A node mirrored a workflow definition from its filesystem (`loom_workflow_defs`, with its
    /// steps in `loom_workflow_steps`).
    pub struct WorkflowMirrored {
        pub workflow_id: Id,
        pub name: Title,
        pub host: Id,
        pub source_path: Option<Text>,
        /// Cron expression, if scheduled.
        pub schedule: Option<Label>,
        #[schemars(length(max = 256))]
        pub steps: Vec<StepDef>,
    }

    /// A strand was registered to run on a host (`loom_workflows`).
    pub struct WorkflowRegistered {
        pub workflow_id: Id,
        pub host: Id,
        pub schedule: Option<Label>,
    }

    /// A strand registration was removed.
    pub struct WorkflowUnregistered {
        pub workflow_id: Id,
        pub host: Id,
        pub reason: Option<Text>,
    }

    /// A workflow run launched (`loom_runs`).
    pub struct RunStarted {
        pub run_id: Id,
        pub workflow_id: Id,
        /// What launched it, such as `schedule`, `manual` or `dispatch`.
        pub trigger: Label,
        pub host: Id,
    }

    /// A workflow run ended.
    pub struct RunFinished {
        pub run_id: Id,
        pub status: RunStatus,
        pub error: Option<Text>,
    }

    /// A step of a run began (`loom_step_runs`).
    pub struct StepStarted {
        pub run_id: Id,
        pub step_id: Id,
    }

    /// A step of a run ended.
    pub struct StepFinished {
        pub run_id: Id,
        pub step_id: Id,
        pub status: StepStatus,
        pub exit_code: Option<i32>,
        /// The end of the step's output: at most 4 096 characters.
        pub output_tail: Option<Tail>,
        /// What the step returned, as JSON.
        pub result: Option<Json>,
        pub error: Option<Text>,
    }

    /// Version 1 of `loom.step_finished`: the whole output and no status. Read as version 2.
    pub struct StepFinishedV1 {
        pub run_id: Id,
        pub step_id: Id,
        pub exit_code: i32,
        pub output: Text,
        pub error: Option<Text>,
    }

    /// Someone acknowledged a finished step (its `ack_at`).
    pub struct StepAcked {
        pub run_id: Id,
        pub step_id: Id,
        pub note: Option<Text>,
    }

    /// A job was queued for another node to run (`loom_job_queue`).
    pub struct JobEnqueued {
        pub job_id: Id,
        pub workflow_id: Id,
        pub target_host: Id,
        /// The job's input, as JSON.
        pub input: Option<Json>,
    }

    /// A node took a queued job. The first claim wins.
    pub struct JobClaimed {
        pub job_id: Id,
        pub host: Id,
    }

    /// A claimed job ended.
    pub struct JobCompleted {
        pub job_id: Id,
        pub host: Id,
        pub status: JobStatus,
        /// The run the job became, if any.
        pub run_id: Option<Id>,
        pub error: Option<Text>,
    }

    /// The openclaw cron mirror recorded one run of an openclaw cron job, keyed by the job's
    /// session id.
    pub struct CronRunMirrored {
        pub session_id: Id,
        pub job_name: Title,
        pub host: Id,
        pub status: RunStatus,
        pub started_at_ms: u64,
        pub finished_at_ms: Option<u64>,
        pub summary: Option<NonEmptyText>,
    }
}

/// Bytes of output a step keeps (`output_tail`).
pub const OUTPUT_TAIL_BYTES_MAX: usize = 4096;

impl Payload for WorkflowMirrored {}
impl Payload for WorkflowRegistered {}
impl Payload for WorkflowUnregistered {}
impl Payload for RunStarted {}
impl Payload for RunFinished {}
impl Payload for StepStarted {}
impl Payload for StepFinishedV1 {}
impl Payload for StepAcked {}
impl Payload for JobEnqueued {}
impl Payload for JobClaimed {}
impl Payload for JobCompleted {}
impl Payload for CronRunMirrored {}

impl Payload for StepFinished {
    fn upcast(version: u16, payload: &[u8]) -> Result<Self, String> {
        match version {
            1 => Ok(from_payload::<StepFinishedV1>(payload)?.into()),
            _ => Err(format!("no upcaster from version {version}")),
        }
    }
}

impl From<StepFinishedV1> for StepFinished {
    /// Version 1 kept the whole output and no status: the status follows from the exit code and
    /// error, and the output is cut to its last 4 KiB (on a character boundary).
    fn from(v1: StepFinishedV1) -> Self {
        let output = v1.output.0;
        let mut cut = output.len().saturating_sub(OUTPUT_TAIL_BYTES_MAX);
        while !output.is_char_boundary(cut) {
            cut += 1;
        }
        let failed = v1.exit_code != 0 || v1.error.is_some();
        StepFinished {
            run_id: v1.run_id,
            step_id: v1.step_id,
            status: if failed {
                StepStatus::Failed
            } else {
                StepStatus::Succeeded
            },
            exit_code: Some(v1.exit_code),
            output_tail: (!output.is_empty()).then(|| Tail(output[cut..].to_owned())),
            result: None,
            error: v1.error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::types::Text;

    fn v1(exit_code: i32, output: &str, error: Option<&str>) -> StepFinishedV1 {
        StepFinishedV1 {
            run_id: Id("r".into()),
            step_id: Id("s".into()),
            exit_code,
            output: Text(output.into()),
            error: error.map(|e| Text(e.into())),
        }
    }

    #[test]
    fn version_1_is_read_with_a_status_and_only_the_tail_of_its_output() {
        // 3 000 two-byte characters: the 4 KiB cut falls inside one and moves past it.
        let long = format!("start{}", "é".repeat(3000));
        let v2 = StepFinished::from(v1(0, &long, None));
        assert_eq!(v2.status, StepStatus::Succeeded);
        let tail = v2.output_tail.unwrap().0;
        assert!(tail.len() <= OUTPUT_TAIL_BYTES_MAX && tail.len() >= OUTPUT_TAIL_BYTES_MAX - 1);
        assert!(long.ends_with(&tail));
        assert_eq!(
            StepFinished::from(v1(2, "", None)).status,
            StepStatus::Failed
        );
        assert_eq!(StepFinished::from(v1(0, "", None)).output_tail, None);
        let errored = StepFinished::from(v1(0, "x", Some("lost lock")));
        assert_eq!(errored.status, StepStatus::Failed);
    }

    #[test]
    fn the_catalogue_reads_version_1_through_the_upcaster() {
        let kind = crate::kinds::lookup("loom.step_finished").unwrap();
        let payload = crate::kinds::to_payload(&v1(3, "boom", None));
        let read = kind.decode(1, &payload).unwrap();
        assert_eq!(read["status"], "failed");
        assert_eq!(read["output_tail"], "boom");
        assert!(read.get("output").is_none());
        assert!(kind.decode(3, &payload).is_err());
    }
}
