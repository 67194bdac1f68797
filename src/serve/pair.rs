//! Pairing through the daemon: minting and cancelling codes on the socket, and a new device's
//! join at the peers' door. Every step is an event in the node's stream `pairing/<origin>`
//! (`pairing.requested`, `.completed`, `.attempt_failed`, `.expired`, `.cancelled`, and the
//! `device.paired` that admits the device); what is pending is read back from those events
//! (`pairing::Pairings`). One request at a time (a lock), so two devices racing for one code
//! cannot both have it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::listen::Caller;
use super::reply::{problem, refuse};
use super::{json_request, App, Streamed};
use crate::identity::origin_of;
use crate::input::AppendRequest;
use crate::node;
use crate::pairing::{self, Attempt, Pairings, State as CodeState};
use crate::wire::{self, Code, LogQuery, Problem};

/// The context the node key's pairing secret is derived for.
const SECRET_CONTEXT: &str = "spool 2026-12 pairing code hash";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This node's pairing events, read back in order.
fn load(app: &App) -> Result<Pairings, Problem> {
    let mut pairings = Pairings::default();
    let mut after = 0;
    loop {
        let page = node::log_page(
            &app.log,
            &LogQuery {
                after,
                limit: None,
                stream: Some(pairing::stream(app.name.id)),
                kind: None,
                origin: Some(app.name.id),
            },
        )?;
        for event in &page.events {
            pairings.observe(&event.kind, &event.data);
        }
        match page.events.last() {
            Some(last) => after = last.position,
            None => return Ok(pairings),
        }
    }
}

fn event(app: &App, kind: &str, data: serde_json::Value) -> AppendRequest {
    AppendRequest {
        kind: kind.into(),
        stream: pairing::stream(app.name.id),
        actor: "spool pair".into(),
        data,
        key: None,
        correlation: None,
        causation: None,
    }
}

/// Appends `events` (with a `pairing.expired` first for each code whose time passed), then
/// reads the codes back and sets how long the door stays open to keys that are no member.
fn settle(app: &App, mut events: Vec<AppendRequest>, now: u64) -> Result<Pairings, Problem> {
    let before = load(app)?;
    let mut expired: Vec<AppendRequest> = before
        .overdue(now)
        .into_iter()
        .map(|id| event(app, "pairing.expired", json!({ "pairing_id": id })))
        .collect();
    expired.append(&mut events);
    // Nothing appended: the codes are as read.
    let after = if expired.is_empty() {
        before
    } else {
        node::append(&app.log, expired)?;
        app.committed.send_replace(());
        load(app)?
    };
    app.pairing_open_until.store(after.open_until(now), Relaxed);
    Ok(after)
}

/// At start: how long the door stays open to keys that are no member.
pub(super) fn open(app: &App) {
    if let Ok(pairings) = load(app) {
        app.pairing_open_until
            .store(pairings.open_until(now_ms()), Relaxed);
    }
}

fn secret(app: &App) -> Result<[u8; 32], Problem> {
    app.key
        .as_ref()
        .map(|k| k.derive(SECRET_CONTEXT))
        .ok_or_else(|| Problem::new(Code::Forbidden, "pairing needs a node key and a fleet"))
}

/// `POST /v1/pair/code` (the socket).
pub(super) async fn code(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let request = match json_request::<wire::PairCodeRequest>(&body) {
        Ok(request) => request,
        Err(refused) => return problem(refused),
    };
    if request.device.as_ref().is_some_and(|d| d.len() > 256) {
        return problem(
            Problem::new(Code::InvalidField, "device: at most 256 bytes").field("/device"),
        );
    }
    let _one = app.pairing.lock().await;
    let work = app.clone();
    run(move || {
        let app = &work;
        let secret = secret(app)?;
        let now = now_ms();
        let pairings = settle(app, Vec::new(), now)?;
        pairings
            .may_mint(now)
            .map_err(|why| Problem::new(Code::TooLarge, why))?;
        let code = pairing::new_code();
        let pairing_id = format!("pair-{}", hex::encode(rand::random::<[u8; 8]>()));
        let expires_at_ms = now + pairing::TTL_MS;
        let device = request.device.unwrap_or_else(|| "new device".into());
        let requested = event(
            app,
            "pairing.requested",
            json!({
                "pairing_id": pairing_id,
                "code_hash": pairing::code_hash(&secret, &code),
                "user_id": "spool",
                "device_id": device,
                "expires_at_ms": expires_at_ms,
            }),
        );
        settle(app, vec![requested], now)?;
        Ok(wire::PairCode {
            pairing_id,
            code,
            expires_at_ms,
            address: app.peer_address.map(|a| a.to_string()),
            fingerprint: app.name.id,
        })
    })
    .await
}

/// `GET /v1/pair` (the socket): this node's codes, newest first (never a code).
pub(super) async fn list(State(app): State<Arc<App>>) -> Response {
    let _one = app.pairing.lock().await;
    let work = app.clone();
    run(move || {
        let pairings = settle(&work, Vec::new(), now_ms())?;
        Ok(pairings
            .codes()
            .iter()
            .rev()
            .map(|c| wire::Pairing {
                pairing_id: c.pairing_id.clone(),
                device: c.device.clone(),
                expires_at_ms: c.expires_at_ms,
                state: match &c.state {
                    CodeState::Pending => "pending",
                    CodeState::Completed { .. } => "completed",
                    CodeState::Expired => "expired",
                    CodeState::Cancelled { .. } => "cancelled",
                }
                .into(),
                device_id: match &c.state {
                    CodeState::Completed { device_id } => Some(device_id.clone()),
                    _ => None,
                },
            })
            .collect::<Vec<_>>())
    })
    .await
}

/// `POST /v1/pair/cancel` (the socket).
pub(super) async fn cancel(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let request = match json_request::<wire::PairCancel>(&body) {
        Ok(request) => request,
        Err(refused) => return problem(refused),
    };
    let _one = app.pairing.lock().await;
    let work = app.clone();
    run(move || {
        let app = &work;
        let now = now_ms();
        let pairings = settle(app, Vec::new(), now)?;
        if !pairings
            .pending(now)
            .any(|c| c.pairing_id == request.pairing_id)
        {
            return Err(Problem::new(
                Code::NotFound,
                "pairing_id: no pending code has it (`spool pair` lists them)",
            )
            .field("/pairing_id"));
        }
        let cancelled = event(
            app,
            "pairing.cancelled",
            json!({ "pairing_id": request.pairing_id, "reason": "cancelled by hand" }),
        );
        settle(app, vec![cancelled], now)?;
        Ok(json!({ "cancelled": request.pairing_id }))
    })
    .await
}

/// `POST /v1/pair/join`, at the peers' door: a device that is no member presents a code. On a
/// pending code, `pairing.completed` and the `device.paired` admitting the key its handshake
/// proved are appended in one commit, and the answer is this node's whole log as an export
/// (which the device ingests, as `spool fleet join` does). Any other code is refused by name and
/// counted; the fifth failure cancels every pending code.
pub(super) async fn join(
    State(app): State<Arc<App>>,
    axum::Extension(Caller(key)): axum::Extension<Caller>,
    body: axum::body::Bytes,
) -> Response {
    let request = match json_request::<wire::PairJoin>(&body) {
        Ok(request) => request,
        Err(refused) => return problem(refused),
    };
    let label = request.label.trim().to_owned();
    if label.is_empty()
        || label.len() > crate::home::LABEL_BYTES_MAX
        || label.chars().any(char::is_control)
    {
        return problem(
            Problem::new(
                Code::InvalidField,
                format!(
                    "label: 1 to {} bytes, no control characters",
                    crate::home::LABEL_BYTES_MAX
                ),
            )
            .field("/label"),
        );
    }
    let origin = origin_of(&key);
    let one = app.pairing.lock().await;
    let work = app.clone();
    let decided = tokio::task::spawn_blocking(move || -> Result<(), Problem> {
        let app = &work;
        let fleet = app.log.read()?.fleet(app.log.fleet_root())?;
        match fleet.as_ref().and_then(|f| f.member(origin)) {
            Some(m) if m.revoked.is_some() => {
                return Err(Problem::new(
                    Code::Forbidden,
                    "this node key was revoked; a revoked key is never admitted again (make \
                     the device a new home: a new key)",
                ))
            }
            Some(_) => {
                return Err(Problem::new(
                    Code::KeyConflict,
                    "this node key is a member of the fleet already",
                ))
            }
            None => {}
        }
        let secret = secret(app)?;
        let now = now_ms();
        let pairings = settle(app, Vec::new(), now)?;
        let attempt = match pairing::normalise(&request.code) {
            Some(code) => pairings.attempt(&pairing::code_hash(&secret, &code), now),
            None => Attempt::Wrong,
        };
        let device = origin.to_hex();
        let failed = |id: Option<&str>, failure: &str| {
            event(
                app,
                "pairing.attempt_failed",
                json!({ "device_id": device, "failure": failure, "pairing_id": id }),
            )
        };
        let (events, refusal) = match &attempt {
            Attempt::Accepted(id) => {
                let completed = event(
                    app,
                    "pairing.completed",
                    json!({ "pairing_id": id, "device_id": device }),
                );
                let paired = AppendRequest {
                    kind: "device.paired".into(),
                    stream: format!("device/{origin}"),
                    actor: "spool pair".into(),
                    data: json!({
                        "device_id": device,
                        "label": label,
                        "capabilities": ["sync"],
                        "signing_public_key": key.to_hex(),
                        "pairing_id": id,
                    }),
                    key: None,
                    correlation: None,
                    causation: None,
                };
                (vec![completed, paired], None)
            }
            Attempt::Wrong => (
                vec![failed(None, "wrong_code")],
                Some("the code is not one this node minted, or was mistyped"),
            ),
            Attempt::Expired(id) => (
                vec![failed(Some(id), "expired")],
                Some("the code expired (a code works for 60 minutes): mint another"),
            ),
            Attempt::Used(id) => (
                vec![failed(Some(id), "already_used")],
                Some("the code was used already (a code admits one device): mint another"),
            ),
            Attempt::Cancelled(id, locked) => (
                vec![failed(
                    Some(id),
                    if *locked { "too_many_attempts" } else { "expired" },
                )],
                Some("the code was cancelled: mint another"),
            ),
        };
        let after = settle(app, events, now)?;
        let Some(why) = refusal else {
            return Ok(());
        };
        if after.failures() >= pairing::FAILURES_MAX {
            let pending: Vec<AppendRequest> = after
                .pending(now)
                .map(|c| {
                    event(
                        app,
                        "pairing.cancelled",
                        json!({
                            "pairing_id": c.pairing_id,
                            "reason": format!("{} {} failed attempts", pairing::LOCKED, pairing::FAILURES_MAX),
                        }),
                    )
                })
                .collect();
            if !pending.is_empty() {
                settle(app, pending, now)?;
            }
            return Err(Problem::new(
                Code::Forbidden,
                format!(
                    "{why}; {} failed attempts: every pending code is cancelled",
                    pairing::FAILURES_MAX
                ),
            ));
        }
        Err(Problem::new(Code::Forbidden, why))
    })
    .await;
    drop(one);
    match decided {
        Ok(Ok(())) => {}
        Ok(Err(refused)) => return problem(refused),
        Err(_) => return super::reply::internal(),
    }
    // Admitted: the whole log, which carries the admission back to the device.
    let (mut writer, response) = Streamed::new("application/octet-stream");
    tokio::task::spawn_blocking(move || {
        let selection = crate::sync::Selection::default();
        match node::export(&app.log, &selection, app.key.as_deref(), &mut writer) {
            Ok(_) => {
                let _ = writer.finish();
            }
            Err(e) => tracing::warn!("a paired device's export stopped: {e}"),
        }
    });
    response
}

async fn run<T: serde::Serialize + Send + 'static>(
    work: impl FnOnce() -> Result<T, Problem> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(p)) => problem(p),
        Err(_) => refuse(Code::Internal, "a bug stopped this request"),
    }
}
