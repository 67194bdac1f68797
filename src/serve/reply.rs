//! The daemon's refusals: every answer that is not a success is JSON with a stable
//! machine-readable `code`, a sentence, and where it applies the field and the batch index. A
//! refusal names the field and the rule, never the value. A panic is a bug: logged with its
//! location, counted, answered 500 with code `internal`.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;

/// Panics since the process started, in any thread (the hook counts them).
pub static PANICS: AtomicU64 = AtomicU64::new(0);

/// A refusal's JSON.
#[derive(serde::Serialize)]
struct Refusal<'a> {
    code: &'a str,
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

/// A refusal not yet made into an answer (small enough to return by value).
pub struct Refused {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl Refused {
    pub fn new(status: StatusCode, code: &'static str, message: String) -> Refused {
        Refused {
            status,
            code,
            message,
            field: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Refused {
        self.field = Some(field.into());
        self
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        refuse_field(
            self.status,
            self.code,
            &self.message,
            self.field.as_deref(),
            None,
        )
    }
}

/// A refusal with `code` and a sentence.
pub fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    refuse_field(status, code, message, None, None)
}

/// A refusal naming the field (and the event of a batch) it is about.
pub fn refuse_field(
    status: StatusCode,
    code: &str,
    message: &str,
    field: Option<&str>,
    index: Option<usize>,
) -> Response {
    let body = Refusal {
        code,
        error: message,
        field,
        index,
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = (status, json).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A busy answer: 503 with Retry-After.
pub fn busy(message: &str, retry_after_seconds: u64) -> Response {
    let mut response = refuse(StatusCode::SERVICE_UNAVAILABLE, "busy", message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
    response
}

/// The answer to a request that hit a bug.
pub fn internal() -> Response {
    refuse(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "spool hit a bug answering this request (its log says where); nothing was changed by it",
    )
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
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint (README lists them)"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this endpoint does not take this method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "the request's body is over its limit"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "bad_request",
            "the request's content type is not taken here",
        ),
        s if s.is_server_error() => ("internal", "the daemon could not answer this request"),
        _ => ("bad_request", "the request is not valid"),
    };
    let mut answer = refuse(status, code, message);
    for name in [header::CONNECTION, header::RETRY_AFTER, header::ALLOW] {
        if let Some(value) = response.headers().get(&name) {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}
