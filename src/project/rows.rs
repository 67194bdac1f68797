//! The local tables' projector, kind by kind (DDL: `projections/sqlite/schema.sql`).

use compact_str::CompactString;
use serde::Serialize;

use super::{Context, Group, Rule, Val, Write};
use crate::kinds::devices::AttemptFailure;
use crate::kinds::types::{Json, JsonObject};
use crate::kinds::Body;

impl From<&str> for Val {
    fn from(s: &str) -> Val {
        Val::Text(s.into())
    }
}
impl From<CompactString> for Val {
    fn from(s: CompactString) -> Val {
        Val::Text(s)
    }
}
impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(v)
    }
}
impl From<f64> for Val {
    fn from(v: f64) -> Val {
        Val::Real(v)
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Val {
        v.map_or(Val::Null, Into::into)
    }
}

/// A value as JSON text (lists, enums).
fn json<T: Serialize>(value: &T) -> Val {
    Val::Text(
        serde_json::to_string(value)
            .expect("payload values serialize")
            .into(),
    )
}

/// An enum's snake_case name.
fn name<T: Serialize>(value: &T) -> Val {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => Val::Text(s.into()),
        _ => Val::Null,
    }
}

/// An optional string field: its text, or NULL.
fn opt<T: AsRef<str>>(value: &Option<T>) -> Val {
    value
        .as_ref()
        .map_or(Val::Null, |v| Val::Text(v.as_ref().into()))
}

fn text(s: &str) -> Val {
    Val::Text(s.into())
}

fn json_text(j: &Json) -> Val {
    Val::Text(j.0.as_str().into())
}

fn object_text(j: &JsonObject) -> Val {
    Val::Text(j.0.as_str().into())
}

/// A first-writer-wins group.
fn older(stamp: &'static str, cols: Vec<(&'static str, Val)>) -> Group {
    Group {
        stamp,
        rule: Rule::Older,
        cols,
    }
}

/// A last-writer-wins group.
fn newer(stamp: &'static str, cols: Vec<(&'static str, Val)>) -> Group {
    Group {
        stamp,
        rule: Rule::Newer,
        cols,
    }
}

fn upsert(
    ctx: &Context<'_>,
    table: &'static str,
    key: Vec<(&'static str, Val)>,
    groups: Vec<Group>,
) -> Write {
    Write::Upsert {
        table,
        key,
        stamp: ctx.stamp,
        groups,
    }
}

/// A `vault_entries` row: written, rewrapped and removed share one group, so the latest
/// decides, and a removed entry's row keeps no ciphertext. `values`: ciphertext, recipients,
/// rewrap_reason, removed_at, remove_reason.
fn vault_entry(ctx: &Context<'_>, entry_id: &str, values: [Val; 5]) -> Write {
    let [ciphertext, recipients, rewrap_reason, removed_at, remove_reason] = values;
    upsert(
        ctx,
        "vault_entries",
        vec![("entry_id", text(entry_id))],
        vec![newer(
            "stamp",
            vec![
                ("ciphertext", ciphertext),
                ("recipients", recipients),
                ("updated_at", Val::Text(ctx.at.clone())),
                ("rewrap_reason", rewrap_reason),
                ("removed_at", removed_at),
                ("remove_reason", remove_reason),
            ],
        )],
    )
}

fn insert(table: &'static str, cols: Vec<(&'static str, Val)>) -> Write {
    Write::Insert { table, cols }
}

/// Groups for the optional fields that are present.
fn present(fields: Vec<(&'static str, &'static str, Option<Val>)>) -> Vec<Group> {
    fields
        .into_iter()
        .filter_map(|(stamp, col, v)| v.map(|v| newer(stamp, vec![(col, v)])))
        .collect()
}

pub(super) fn writes(ctx: &Context<'_>, body: &Body) -> Vec<Write> {
    let at = || Val::Text(ctx.at.clone());
    let id = || Val::Text(ctx.id.clone());
    match body {
        Body::TaskCreated(p) => {
            let mut groups = vec![
                newer(
                    "created_stamp",
                    vec![("created_at", at()), ("created_by", text(ctx.actor))],
                ),
                newer("title_stamp", vec![("title", text(&p.title.0))]),
                newer("status_stamp", vec![("status", text(&p.status.0))]),
            ];
            groups.extend(present(vec![
                (
                    "description_stamp",
                    "description",
                    p.description.as_ref().map(|d| text(&d.0)),
                ),
                ("lane_stamp", "lane", p.lane.as_ref().map(|v| text(&v.0))),
                ("track_stamp", "track", p.track.as_ref().map(|v| text(&v.0))),
                ("tags_stamp", "tags", p.tags.as_ref().map(json)),
            ]));
            vec![upsert(
                ctx,
                "tasks",
                vec![("id", text(&p.task_id.0))],
                groups,
            )]
        }
        Body::TaskEdited(p) => {
            let groups = present(vec![
                ("title_stamp", "title", p.title.as_ref().map(|v| text(&v.0))),
                (
                    "description_stamp",
                    "description",
                    p.description.as_ref().map(|d| text(&d.0)),
                ),
                ("track_stamp", "track", p.track.as_ref().map(|v| text(&v.0))),
                ("tags_stamp", "tags", p.tags.as_ref().map(json)),
            ]);
            vec![upsert(
                ctx,
                "tasks",
                vec![("id", text(&p.task_id.0))],
                groups,
            )]
        }
        Body::TaskMoved(p) => {
            let groups = present(vec![
                (
                    "status_stamp",
                    "status",
                    p.status.as_ref().map(|v| text(&v.0)),
                ),
                ("lane_stamp", "lane", p.lane.as_ref().map(|v| text(&v.0))),
            ]);
            vec![upsert(
                ctx,
                "tasks",
                vec![("id", text(&p.task_id.0))],
                groups,
            )]
        }
        Body::TaskArchived(p) => vec![upsert(
            ctx,
            "tasks",
            vec![("id", text(&p.task_id.0))],
            vec![newer(
                "archived_stamp",
                vec![("archived_at", at()), ("archive_reason", opt(&p.reason))],
            )],
        )],
        Body::TaskScored(p) => vec![
            insert(
                "score_history",
                vec![
                    ("id", id()),
                    ("task_id", text(&p.task_id.0)),
                    ("run_id", text(&p.run_id.0)),
                    ("i", i64::from(p.i).into()),
                    ("u", i64::from(p.u).into()),
                    ("c", i64::from(p.c).into()),
                    ("e", i64::from(p.e).into()),
                    ("score", p.score.into()),
                    ("rank", i64::from(p.rank).into()),
                    ("lane", text(&p.lane.0)),
                    ("reasoning", opt(&p.reasoning)),
                    ("clash_resolution", opt(&p.clash_resolution)),
                    (
                        "sources_used",
                        p.sources_used.as_ref().map_or(Val::Null, json),
                    ),
                    ("scored_at", at()),
                ],
            ),
            upsert(
                ctx,
                "tasks",
                vec![("id", text(&p.task_id.0))],
                vec![newer(
                    "score_stamp",
                    vec![
                        ("current_score", p.score.into()),
                        ("current_lane", text(&p.lane.0)),
                        ("current_rank", i64::from(p.rank).into()),
                        ("last_scored_at", at()),
                    ],
                )],
            ),
        ],
        Body::TaskScoreOverridden(p) => vec![insert(
            "score_overrides",
            vec![
                ("id", id()),
                ("task_id", text(&p.task_id.0)),
                ("dimension", name(&p.dimension)),
                ("old_value", i64::from(p.old_value).into()),
                ("new_value", i64::from(p.new_value).into()),
                ("reason", opt(&p.reason)),
                ("applied_to_run_id", opt(&p.applied_to_run_id)),
                ("created_at", at()),
            ],
        )],
        Body::TaskScoreLocked(p) => vec![upsert(
            ctx,
            "tasks",
            vec![("id", text(&p.task_id.0))],
            vec![newer(
                "lock_stamp",
                vec![
                    ("score_locked", Val::Int(1)),
                    ("locked_lane", text(&p.locked_lane.0)),
                ],
            )],
        )],
        Body::TaskScoreUnlocked(p) => vec![upsert(
            ctx,
            "tasks",
            vec![("id", text(&p.task_id.0))],
            vec![newer(
                "lock_stamp",
                vec![("score_locked", Val::Int(0)), ("locked_lane", Val::Null)],
            )],
        )],
        Body::BriefAdded(p) => vec![upsert(
            ctx,
            "briefs",
            vec![("id", text(&p.brief_id.0))],
            vec![newer(
                "added_stamp",
                vec![
                    ("source", text(&p.source.0)),
                    ("body", text(&p.body.0)),
                    ("tags", p.tags.as_ref().map_or(Val::Null, json)),
                    ("created_at", at()),
                ],
            )],
        )],
        Body::BriefConsumed(p) => vec![upsert(
            ctx,
            "briefs",
            vec![("id", text(&p.brief_id.0))],
            vec![newer(
                "consumed_stamp",
                vec![
                    ("consumed_in_run_id", text(&p.run_id.0)),
                    ("consumed_at", at()),
                ],
            )],
        )],
        Body::TriageRunStarted(p) => vec![upsert(
            ctx,
            "triage_runs",
            vec![("id", text(&p.run_id.0))],
            vec![newer(
                "start_stamp",
                vec![
                    ("started_at", at()),
                    ("model", opt(&p.model)),
                    ("trigger", opt(&p.trigger)),
                    ("host", opt(&p.host)),
                ],
            )],
        )],
        Body::TriageRunCompleted(p) => vec![upsert(
            ctx,
            "triage_runs",
            vec![("id", text(&p.run_id.0))],
            vec![newer(
                "end_stamp",
                vec![
                    ("completed_at", at()),
                    ("end_status", text("completed")),
                    ("end_model", text(&p.model.0)),
                    ("tokens_in", (p.tokens_in as i64).into()),
                    ("tokens_out", (p.tokens_out as i64).into()),
                    ("tasks_scored", i64::from(p.tasks_scored).into()),
                    ("summaries", p.summaries.as_ref().map_or(Val::Null, json)),
                    ("error", Val::Null),
                ],
            )],
        )],
        Body::TriageRunFailed(p) => vec![upsert(
            ctx,
            "triage_runs",
            vec![("id", text(&p.run_id.0))],
            vec![newer(
                "end_stamp",
                vec![
                    ("completed_at", at()),
                    ("end_status", text("failed")),
                    ("end_model", Val::Null),
                    ("tokens_in", Val::Null),
                    ("tokens_out", Val::Null),
                    ("tasks_scored", Val::Null),
                    ("summaries", Val::Null),
                    ("error", text(&p.error.0)),
                ],
            )],
        )],
        Body::WorkflowMirrored(p) => {
            let def = upsert(
                ctx,
                "loom_workflow_defs",
                vec![("workflow_id", text(&p.workflow_id.0))],
                vec![newer(
                    "stamp",
                    vec![
                        ("name", text(&p.name.0)),
                        ("host", text(&p.host.0)),
                        ("source_path", opt(&p.source_path)),
                        ("schedule", opt(&p.schedule)),
                        ("steps", json(&p.steps)),
                        ("mirrored_at", at()),
                    ],
                )],
            );
            // One row per step, stamped like the definition: a step a later definition
            // dropped keeps an older stamp than its workflow's row.
            let steps = p.steps.iter().enumerate().map(|(i, step)| {
                upsert(
                    ctx,
                    "loom_workflow_steps",
                    vec![
                        ("workflow_id", text(&p.workflow_id.0)),
                        ("step_id", text(&step.step_id.0)),
                    ],
                    vec![newer(
                        "stamp",
                        vec![
                            ("ordinal", Val::Int(i as i64)),
                            ("name", text(&step.name.0)),
                            ("command", opt(&step.command)),
                            (
                                "depends_on",
                                step.depends_on.as_ref().map_or(Val::Null, json),
                            ),
                            ("target_host", opt(&step.target_host)),
                        ],
                    )],
                )
            });
            std::iter::once(def).chain(steps).collect()
        }
        Body::WorkflowRegistered(p) => vec![upsert(
            ctx,
            "loom_workflows",
            vec![
                ("workflow_id", text(&p.workflow_id.0)),
                ("host", text(&p.host.0)),
            ],
            vec![newer(
                "stamp",
                vec![
                    ("schedule", opt(&p.schedule)),
                    ("registered", Val::Int(1)),
                    ("reason", Val::Null),
                    ("changed_at", at()),
                ],
            )],
        )],
        Body::WorkflowUnregistered(p) => vec![upsert(
            ctx,
            "loom_workflows",
            vec![
                ("workflow_id", text(&p.workflow_id.0)),
                ("host", text(&p.host.0)),
            ],
            vec![newer(
                "stamp",
                vec![
                    ("schedule", Val::Null),
                    ("registered", Val::Int(0)),
                    ("reason", opt(&p.reason)),
                    ("changed_at", at()),
                ],
            )],
        )],
        Body::RunStarted(p) => vec![upsert(
            ctx,
            "loom_runs",
            vec![("run_id", text(&p.run_id.0))],
            vec![newer(
                "start_stamp",
                vec![
                    ("workflow_id", text(&p.workflow_id.0)),
                    ("trigger", text(&p.trigger.0)),
                    ("host", text(&p.host.0)),
                    ("started_at", at()),
                    ("source", text("loom")),
                ],
            )],
        )],
        Body::RunFinished(p) => vec![upsert(
            ctx,
            "loom_runs",
            vec![("run_id", text(&p.run_id.0))],
            vec![newer(
                "end_stamp",
                vec![
                    ("end_status", name(&p.status)),
                    ("error", opt(&p.error)),
                    ("finished_at", at()),
                    ("summary", Val::Null),
                ],
            )],
        )],
        Body::StepStarted(p) => vec![upsert(
            ctx,
            "loom_step_runs",
            vec![
                ("run_id", text(&p.run_id.0)),
                ("step_id", text(&p.step_id.0)),
            ],
            vec![newer("start_stamp", vec![("started_at", at())])],
        )],
        Body::StepFinished(p) => vec![upsert(
            ctx,
            "loom_step_runs",
            vec![
                ("run_id", text(&p.run_id.0)),
                ("step_id", text(&p.step_id.0)),
            ],
            vec![newer(
                "end_stamp",
                vec![
                    ("end_status", name(&p.status)),
                    ("exit_code", p.exit_code.map(i64::from).into()),
                    ("output_tail", opt(&p.output_tail)),
                    ("result", p.result.as_ref().map_or(Val::Null, json_text)),
                    ("error", opt(&p.error)),
                    ("finished_at", at()),
                ],
            )],
        )],
        Body::StepAcked(p) => vec![upsert(
            ctx,
            "loom_step_runs",
            vec![
                ("run_id", text(&p.run_id.0)),
                ("step_id", text(&p.step_id.0)),
            ],
            vec![newer(
                "ack_stamp",
                vec![("ack_at", at()), ("ack_note", opt(&p.note))],
            )],
        )],
        Body::JobEnqueued(p) => vec![upsert(
            ctx,
            "loom_job_queue",
            vec![("job_id", text(&p.job_id.0))],
            vec![newer(
                "enqueue_stamp",
                vec![
                    ("workflow_id", text(&p.workflow_id.0)),
                    ("target_host", text(&p.target_host.0)),
                    ("input", p.input.as_ref().map_or(Val::Null, json_text)),
                    ("enqueued_at", at()),
                ],
            )],
        )],
        Body::JobClaimed(p) => vec![upsert(
            ctx,
            "loom_job_queue",
            vec![("job_id", text(&p.job_id.0))],
            vec![older(
                "claim_stamp",
                vec![("claimed_by", text(&p.host.0)), ("claimed_at", at())],
            )],
        )],
        Body::JobCompleted(p) => vec![upsert(
            ctx,
            "loom_job_queue",
            vec![("job_id", text(&p.job_id.0))],
            vec![newer(
                "end_stamp",
                vec![
                    ("end_status", name(&p.status)),
                    ("run_id", opt(&p.run_id)),
                    ("error", opt(&p.error)),
                    ("completed_at", at()),
                ],
            )],
        )],
        Body::CronRunMirrored(p) => vec![
            upsert(
                ctx,
                "loom_runs",
                vec![("run_id", text(&p.session_id.0))],
                vec![
                    newer(
                        "start_stamp",
                        vec![
                            ("workflow_id", text("openclaw-cron-mirror")),
                            ("trigger", text(&p.job_name.0)),
                            ("host", text(&p.host.0)),
                            ("started_at", Val::Text(super::time_text(p.started_at_ms))),
                            ("source", text("openclaw-cron")),
                        ],
                    ),
                    newer(
                        "end_stamp",
                        vec![
                            ("end_status", name(&p.status)),
                            ("error", Val::Null),
                            ("finished_at", p.finished_at_ms.map(super::time_text).into()),
                            ("summary", opt(&p.summary)),
                        ],
                    ),
                ],
            ),
            // The mirror's synthetic step: the cron job itself, keyed by the session too.
            upsert(
                ctx,
                "loom_step_runs",
                vec![
                    ("run_id", text(&p.session_id.0)),
                    ("step_id", text(&p.job_name.0)),
                ],
                vec![
                    newer(
                        "start_stamp",
                        vec![("started_at", Val::Text(super::time_text(p.started_at_ms)))],
                    ),
                    newer(
                        "end_stamp",
                        vec![
                            ("end_status", name(&p.status)),
                            ("exit_code", Val::Null),
                            ("output_tail", Val::Null),
                            ("result", Val::Null),
                            ("error", Val::Null),
                            ("finished_at", p.finished_at_ms.map(super::time_text).into()),
                        ],
                    ),
                ],
            ),
        ],
        Body::NodeHeartbeat(p) => vec![upsert(
            ctx,
            "openclaw_instances",
            vec![("host", text(&p.host.0))],
            vec![newer(
                "stamp",
                vec![
                    ("role", text(&p.role.0)),
                    ("capabilities", json(&p.capabilities)),
                    ("version", opt(&p.version)),
                    ("last_heartbeat_at", at()),
                ],
            )],
        )],
        Body::BotHeartbeat(p) => vec![upsert(
            ctx,
            "bot_heartbeats",
            vec![("bot_id", text(&p.bot_id.0))],
            vec![newer(
                "stamp",
                vec![
                    ("host", text(&p.host.0)),
                    ("status", opt(&p.status)),
                    ("last_seen_at", at()),
                ],
            )],
        )],
        // One row per (resource, bot): a bot's release ends its own claim only, so a bot
        // whose claim ran out cannot release the claim another bot took since.
        Body::BotClaimed(p) => vec![upsert(
            ctx,
            "bot_claims",
            vec![
                ("resource", text(&p.resource.0)),
                ("bot_id", text(&p.bot_id.0)),
            ],
            vec![newer(
                "stamp",
                vec![("ttl_ms", (p.ttl_ms as i64).into()), ("claimed_at", at())],
            )],
        )],
        Body::BotReleased(p) => vec![upsert(
            ctx,
            "bot_claims",
            vec![
                ("resource", text(&p.resource.0)),
                ("bot_id", text(&p.bot_id.0)),
            ],
            vec![newer("release_stamp", vec![("released_at", at())])],
        )],
        Body::Logged(p) => vec![insert(
            "activity_log",
            vec![
                ("id", id()),
                ("stream", text(ctx.stream)),
                ("actor", text(ctx.actor)),
                ("message", text(&p.message.0)),
                ("source", opt(&p.source)),
                ("meta", p.meta.as_ref().map_or(Val::Null, object_text)),
                ("created_at", at()),
            ],
        )],
        Body::InstallInitialised(p) => vec![upsert(
            ctx,
            "vault_install",
            vec![("install_id", text(&p.install_id.0))],
            vec![newer(
                "stamp",
                vec![
                    ("kdf", name(&p.kdf)),
                    ("salt", text(&p.salt.0)),
                    ("memory_kib", i64::from(p.memory_kib).into()),
                    ("iterations", i64::from(p.iterations).into()),
                    ("parallelism", i64::from(p.parallelism).into()),
                    ("created_at", at()),
                ],
            )],
        )],
        // Adding and removing share the removal's group: the later of the two says whether
        // the recipient is removed, so one added again after a removal is active again.
        Body::RecipientAdded(p) => vec![upsert(
            ctx,
            "vault_recipients",
            vec![("recipient_id", text(&p.recipient_id.0))],
            vec![
                newer(
                    "add_stamp",
                    vec![
                        ("device_id", text(&p.device_id.0)),
                        ("label", text(&p.label.0)),
                        ("public_key", text(&p.public_key.0)),
                        ("fingerprint", text(&p.fingerprint.0)),
                        ("added_at", at()),
                    ],
                ),
                newer(
                    "remove_stamp",
                    vec![("removed_at", Val::Null), ("remove_reason", Val::Null)],
                ),
            ],
        )],
        Body::RecipientRemoved(p) => vec![upsert(
            ctx,
            "vault_recipients",
            vec![("recipient_id", text(&p.recipient_id.0))],
            vec![newer(
                "remove_stamp",
                vec![("removed_at", at()), ("remove_reason", opt(&p.reason))],
            )],
        )],
        Body::EntryWritten(p) => vec![vault_entry(
            ctx,
            &p.entry_id.0,
            [
                text(&p.ciphertext.0),
                json(&p.recipients),
                Val::Null,
                Val::Null,
                Val::Null,
            ],
        )],
        Body::EntryRewrapped(p) => vec![vault_entry(
            ctx,
            &p.entry_id.0,
            [
                text(&p.ciphertext.0),
                json(&p.recipients),
                opt(&p.reason),
                Val::Null,
                Val::Null,
            ],
        )],
        Body::EntryRemoved(p) => vec![vault_entry(
            ctx,
            &p.entry_id.0,
            [Val::Null, Val::Null, Val::Null, at(), opt(&p.reason)],
        )],
        Body::EntryUnlocked(p) => vec![insert(
            "vault_access_log",
            vec![
                ("id", id()),
                ("entry_id", text(&p.entry_id.0)),
                ("device_id", text(&p.device_id.0)),
                ("recipient", text(&p.recipient.0)),
                ("purpose", opt(&p.purpose)),
                ("unlocked_at", at()),
            ],
        )],
        Body::PairingRequested(p) => vec![upsert(
            ctx,
            "pairing_tokens",
            vec![("pairing_id", text(&p.pairing_id.0))],
            vec![newer(
                "request_stamp",
                vec![
                    ("code_hash", text(&p.code_hash.0)),
                    ("user_id", text(&p.user_id.0)),
                    ("device_id", text(&p.device_id.0)),
                    ("account_id", opt(&p.account_id)),
                    ("expires_at", Val::Text(super::time_text(p.expires_at_ms))),
                    ("requested_at", at()),
                ],
            )],
        )],
        Body::PairingCompleted(p) => vec![pairing_end(ctx, &p.pairing_id.0, "completed", None)],
        Body::PairingExpired(p) => vec![pairing_end(ctx, &p.pairing_id.0, "expired", None)],
        Body::PairingCancelled(p) => vec![pairing_end(
            ctx,
            &p.pairing_id.0,
            "cancelled",
            p.reason.as_ref().map(|r| r.0.as_str()),
        )],
        Body::PairingAttemptFailed(p) => {
            let mut writes = vec![insert(
                "pairing_attempts",
                vec![
                    ("id", id()),
                    ("pairing_id", opt(&p.pairing_id)),
                    ("device_id", text(&p.device_id.0)),
                    ("failure", name(&p.failure)),
                    ("attempted_at", at()),
                ],
            )];
            // Too many failed attempts lock the pairing it names: it ends there.
            if let (AttemptFailure::TooManyAttempts, Some(pairing)) = (&p.failure, &p.pairing_id) {
                writes.push(pairing_end(
                    ctx,
                    &pairing.0,
                    "locked",
                    Some("too_many_attempts"),
                ));
            }
            writes
        }
        // Pairing and revoking share the revocation's group: the later of the two says
        // whether the device is revoked, so a device paired again after a revocation is not.
        Body::DevicePaired(p) => vec![upsert(
            ctx,
            "devices",
            vec![("device_id", text(&p.device_id.0))],
            vec![
                newer(
                    "pair_stamp",
                    vec![
                        ("label", text(&p.label.0)),
                        ("capabilities", json(&p.capabilities)),
                        ("signing_public_key", text(&p.signing_public_key.0)),
                        ("pairing_id", opt(&p.pairing_id)),
                        ("paired_at", at()),
                    ],
                ),
                newer(
                    "revoke_stamp",
                    vec![("revoked_at", Val::Null), ("revoke_reason", Val::Null)],
                ),
            ],
        )],
        Body::DeviceRevoked(p) => vec![upsert(
            ctx,
            "devices",
            vec![("device_id", text(&p.device_id.0))],
            vec![newer(
                "revoke_stamp",
                vec![("revoked_at", at()), ("revoke_reason", opt(&p.reason))],
            )],
        )],
        // OpenClaw's own stores (openclaw-persistence.md): the session index, config values and
        // auth profiles (whose credential is only ever a vault reference).
        Body::SessionCreated(p) => {
            let mut groups = vec![
                older(
                    "created_stamp",
                    vec![("agent_id", opt(&p.agent_id)), ("created_at", at())],
                ),
                newer("key_stamp", vec![("session_key", text(&p.session_key.0))]),
                newer("updated_stamp", vec![("updated_at", at())]),
            ];
            if let Some(file) = &p.session_file {
                groups.push(newer("file_stamp", vec![("session_file", text(&file.0))]));
            }
            vec![upsert(
                ctx,
                "openclaw_sessions",
                vec![("session_id", text(&p.session_id.0))],
                groups,
            )]
        }
        Body::SessionUpdated(p) => {
            let mut groups = present(vec![
                (
                    "key_stamp",
                    "session_key",
                    p.session_key.as_ref().map(|k| text(&k.0)),
                ),
                (
                    "file_stamp",
                    "session_file",
                    p.session_file.as_ref().map(|f| text(&f.0)),
                ),
            ]);
            groups.push(newer("updated_stamp", vec![("updated_at", at())]));
            vec![upsert(
                ctx,
                "openclaw_sessions",
                vec![("session_id", text(&p.session_id.0))],
                groups,
            )]
        }
        Body::ConfigValueSet(p) => vec![upsert(
            ctx,
            "openclaw_config",
            vec![
                // '' is the global config; an id, that agent's override.
                (
                    "agent_id",
                    text(p.agent_id.as_ref().map_or("", |a| a.0.as_str())),
                ),
                ("path", text(&p.path.0)),
            ],
            vec![newer(
                "stamp",
                vec![("value", json_text(&p.value)), ("set_at", at())],
            )],
        )],
        Body::AuthProfileUpserted(p) => vec![upsert(
            ctx,
            "openclaw_auth_profiles",
            vec![
                ("agent_id", text(&p.agent_id.0)),
                ("profile_id", text(&p.profile_id.0)),
            ],
            vec![newer(
                "stamp",
                vec![
                    ("provider", text(&p.provider.0)),
                    ("mode", name(&p.mode)),
                    ("credential_ref", text(&p.credential_ref.0)),
                    ("expires_at", p.expires_at_ms.map(super::time_text).into()),
                    ("email", opt(&p.email)),
                    ("updated_at", at()),
                ],
            )],
        )],
    }
}

/// A pairing's end. A pairing ends once: the first end (in causal order) stands, so an expiry
/// or a cancellation that comes after the code was used or locked changes nothing.
fn pairing_end(ctx: &Context<'_>, pairing_id: &str, status: &str, reason: Option<&str>) -> Write {
    upsert(
        ctx,
        "pairing_tokens",
        vec![("pairing_id", text(pairing_id))],
        vec![older(
            "end_stamp",
            vec![
                ("end_status", text(status)),
                ("ended_at", Val::Text(ctx.at.clone())),
                ("end_reason", reason.into()),
            ],
        )],
    )
}
