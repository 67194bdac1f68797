//! The daemon's refusals: every answer that is not a success is JSON with a stable
//! machine-readable `code`, a sentence, and where it applies the field and the batch index. A
//! refusal names the field and the rule, never the value. A panic is a bug: logged with its
//! location, counted, answered 500 with code `internal`.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;

use crate::wire::{Code, Problem};

/// Panics since the process started, in any thread (the hook counts them).
pub static PANICS: AtomicU64 = AtomicU64::new(0);

/// A refusal as an answer: the status its code gives, the JSON body, `Retry-After` when the
/// client should retry, and `Connection: close` when the daemon will not read the rest of the
/// request (a client's keep-alive pool then opens a new connection instead of failing).
pub fn problem(problem: Problem) -> Response {
    let status =
        StatusCode::from_u16(problem.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let json = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = (status, json).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = problem.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if matches!(problem.code, Code::TooLarge | Code::Timeout) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A refusal with `code` and a sentence.
pub fn refuse(code: Code, message: impl Into<String>) -> Response {
    problem(Problem::new(code, message))
}

/// A busy answer: 503 with Retry-After.
pub fn busy(message: &str, retry_after_seconds: u64) -> Response {
    problem(Problem::new(Code::Busy, message).retry_after(retry_after_seconds))
}

/// The answer to a request that hit a bug.
pub fn internal() -> Response {
    problem(Problem::internal())
}

/// Installs the process's panic hook: every panic, in any thread, is logged as a bug with its
/// location and counted.
pub fn count_panics() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        let location = info
            .location()
            .map_or_else(|| "an unknown place".to_owned(), ToString::to_string);
        tracing::error!(
            "a bug: a thread panicked at {location}: {}; please report it",
            panic_message(info.payload())
        );
    }));
}

/// A panic's message, when it is text.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
}

/// Middleware: a handler that panics answers 500 `internal` (the hook has logged and counted
/// it) instead of dropping the connection.
pub async fn catch_panic(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match std::panic::AssertUnwindSafe(next.run(request))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(_) => internal(),
    }
}

/// Middleware: any failure answered without JSON (a route that does not exist, a method it does
/// not take) gets the JSON shape, without the text it had (which may quote the request).
pub async fn json_failures(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || is_json || status.is_redirection() {
        return response;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (Code::NotFound, "no such endpoint (README lists them)"),
        StatusCode::METHOD_NOT_ALLOWED => (
            Code::MethodNotAllowed,
            "this endpoint does not take this method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (Code::TooLarge, "the request's body is over its limit"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            Code::BadJson,
            "the request's content type is not taken here",
        ),
        s if s.is_server_error() => (Code::Internal, "the daemon could not answer this request"),
        _ => (Code::BadJson, "the request is not valid"),
    };
    let mut answer = refuse(code, message);
    for name in [header::CONNECTION, header::RETRY_AFTER, header::ALLOW] {
        if let Some(value) = response.headers().get(&name) {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}
