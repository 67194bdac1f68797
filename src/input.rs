//! Client input: a JSON append request (from CLI flags, stdin lines, or later the daemon's API)
//! turned into a validated [`NewEvent`].
//!
//! Invariant: a `NewEvent` that leaves this module names a known kind, carries a payload that passed
//! the kind's schema and is within every stated limit. Whatever is refused is refused with an error
//! naming the line and the field, before anything reaches the log.
//!
//! Boundary: knows serde_json and the kinds catalogue; nothing about storage.

use std::io::BufRead;

use serde_json::Value;

use crate::event::{DEPS_MAX, NAME_BYTES_MAX, PAYLOAD_BYTES_MAX};
use crate::kinds::{self, DataError};

/// Upper bound on events in one atomic batch.
pub const BATCH_EVENTS_MAX: usize = 100_000;
/// Upper bound on one JSON line of input.
pub const LINE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Upper bound on the JSON text of one atomic batch.
pub const BATCH_BYTES_MAX: usize = 256 * 1024 * 1024;

pub use crate::event::NewEvent;

/// The JSON shape of one append request.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendRequest {
    pub kind: String,
    pub stream: String,
    pub actor: String,
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("line {line}: {error}")]
    Line { line: usize, error: Box<InputError> },
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("field `{field}`: {problem}")]
    Field { field: String, problem: String },
    #[error("kind: unknown event kind {} (`spool schema list` shows the kinds)", shown(.0))]
    UnknownKind(String),
    #[error("{kind}: {error}")]
    Data { kind: String, error: DataError },
    #[error("{kind}: encoded payload is {bytes} bytes, over the limit of {PAYLOAD_BYTES_MAX}")]
    PayloadTooLarge { kind: String, bytes: usize },
    #[error("a batch holds at most {BATCH_EVENTS_MAX} events")]
    BatchTooLarge,
    #[error("a batch holds 1 to {BATCH_EVENTS_MAX} events")]
    BatchSize,
    #[error("a batch holds at most {BATCH_BYTES_MAX} bytes of JSON")]
    BatchBytesTooLarge,
    #[error("a line holds at most {LINE_BYTES_MAX} bytes")]
    LineTooLong,
    #[error("no events given (expected JSON lines on standard input)")]
    Empty,
    #[error("reading input: {0}")]
    Read(String),
}

/// How a refusal shows a value it names: at most a cut, escaped prefix, so neither a secret
/// nor a megabyte is echoed back or logged.
pub fn shown(value: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 24;
    let mut out: String = value
        .chars()
        .take(SHOWN_CHARS_MAX)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().nth(SHOWN_CHARS_MAX).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
}

/// Parses one JSON request text.
pub fn parse_request(text: &str) -> Result<NewEvent, InputError> {
    new_event(parse_append(text)?)
}

/// Reads one JSON request text as a request, not yet validated against its kind.
pub fn parse_append(text: &str) -> Result<AppendRequest, InputError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().clone();
        refusal(&path, e.into_inner())
    })
}

/// A request body of the daemon's `POST /v1/events`: one request (an object) or a batch (an
/// array of 1 to [`BATCH_EVENTS_MAX`]), validated as a whole.
pub struct Body {
    pub events: Vec<NewEvent>,
    /// The body was one object rather than an array.
    pub single: bool,
}

/// Why a body was refused: the error, and the field it names (a JSON path, `[3].data/title`
/// style) when there is one.
#[derive(Debug)]
pub struct BodyError {
    pub error: InputError,
    pub field: Option<String>,
    /// The event of a batch that was refused.
    pub index: Option<usize>,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "event {i}: {}", self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

/// Parses and validates a request body straight from its bytes. The common case (a valid body)
/// is read once; only a refused body is read again, tracking paths, to name the field.
pub fn parse_body(bytes: &[u8]) -> Result<Body, BodyError> {
    let refuse = |error: InputError, field: Option<String>, index: Option<usize>| BodyError {
        error,
        field,
        index,
    };
    let single = bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[');
    let requests = if single {
        serde_json::from_slice::<AppendRequest>(bytes).map(|r| vec![r])
    } else {
        serde_json::from_slice::<Vec<AppendRequest>>(bytes)
    };
    let requests = match requests {
        Ok(requests) => requests,
        Err(_) => {
            let (error, path) = match single {
                true => tracked::<AppendRequest>(bytes).map(|_| ()),
                false => tracked::<Vec<AppendRequest>>(bytes).map(|_| ()),
            }
            .expect_err("a body that failed to parse fails again");
            let segments: Vec<&serde_path_to_error::Segment> = path
                .as_ref()
                .map(|p| p.iter().collect())
                .unwrap_or_default();
            let mut segments = segments.into_iter();
            let index = match (single, segments.next()) {
                (false, Some(serde_path_to_error::Segment::Seq { index })) => Some(*index),
                _ => None,
            };
            let field = match index {
                Some(_) => segments
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("."),
                None => path.as_ref().map_or_else(String::new, ToString::to_string),
            };
            let error = match &error {
                // Named by the object holding it (the refusal says why).
                InputError::Field {
                    field: holder,
                    problem,
                } if problem.starts_with("has an unknown field") => {
                    let holder = match (index, field.rsplit_once('.')) {
                        (_, Some((parent, _))) => parent.to_owned(),
                        (None, None) => holder.clone(),
                        (Some(_), None) => "(the request)".to_owned(),
                    };
                    InputError::Field {
                        field: holder,
                        problem: problem.clone(),
                    }
                }
                // A request's own field is missing (`data` is any JSON, so only those can be).
                InputError::Field {
                    field: own,
                    problem,
                } if problem == "is missing" => InputError::Field {
                    field: own.rsplit('.').next().unwrap_or(own).to_owned(),
                    problem: problem.clone(),
                },
                // The element itself is not an object.
                InputError::Field { problem, .. } if field.is_empty() => {
                    InputError::Json(problem.clone())
                }
                InputError::Field { problem, .. } => InputError::Field {
                    field: field.clone(),
                    problem: problem.clone(),
                },
                other => other.clone(),
            };
            let field = match &error {
                InputError::Field { field, .. } => Some(field.clone()),
                _ => None,
            };
            return Err(refuse(error, field, index));
        }
    };
    if requests.is_empty() || requests.len() > BATCH_EVENTS_MAX {
        return Err(refuse(InputError::BatchSize, None, None));
    }
    let mut events = Vec::with_capacity(requests.len());
    for (i, request) in requests.into_iter().enumerate() {
        let event = new_event(request).map_err(|error| {
            let field = match &error {
                InputError::Field { field, .. } => Some(field.clone()),
                InputError::Data { error, .. } => Some(format!("data{}", error.field)),
                _ => None,
            };
            refuse(error, field, (!single).then_some(i))
        })?;
        events.push(event);
    }
    Ok(Body { events, single })
}

/// Reads `bytes` as a `T`, tracking the path, to explain why it is refused.
fn tracked<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, (InputError, Option<serde_path_to_error::Path>)> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut *de);
    // Bytes after the value: refused as the first read refused them.
    if parsed.is_ok() {
        if let Err(e) = de.end() {
            return Err((InputError::Json(e.to_string()), None));
        }
    }
    parsed.map_err(|e| {
        let path = e.path().clone();
        let error = refusal(&path, e.into_inner());
        (error, Some(path))
    })
}

/// A JSON refusal at `path`: a syntax error as such, a field's by its path and rule. An unknown
/// field is named by the object holding it, not by its own name, which is the client's text.
fn refusal(path: &serde_path_to_error::Path, inner: serde_json::Error) -> InputError {
    let field = path.to_string();
    let problem = strip_position(&inner.to_string());
    if inner.is_syntax() || inner.is_eof() {
        return InputError::Json(inner.to_string());
    }
    // A missing field is named (its name is the request type's, not the client's text).
    if let Some(name) = problem
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name)
    {
        let holder: Vec<String> = path.iter().map(ToString::to_string).collect();
        let mut field = holder.join(".");
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(name);
        return InputError::Field {
            field,
            problem: "is missing".into(),
        };
    }
    if problem.starts_with("unknown field") {
        let segments: Vec<String> = path.iter().map(ToString::to_string).collect();
        let holder = segments[..segments.len().saturating_sub(1)].join(".");
        return InputError::Field {
            field: if holder.is_empty() {
                "(the request)".into()
            } else {
                holder
            },
            problem: format!("has an {problem}"),
        };
    }
    match field.as_str() {
        "." => InputError::Json(problem),
        _ => InputError::Field { field, problem },
    }
}

/// Validates a request and encodes its data.
pub fn new_event(request: AppendRequest) -> Result<NewEvent, InputError> {
    check_name("stream", &request.stream)?;
    check_name("actor", &request.actor)?;
    for (field, value) in [
        ("key", &request.key),
        ("correlation", &request.correlation),
        ("causation", &request.causation),
    ] {
        if let Some(value) = value {
            check_name(field, value)?;
        }
    }
    let spec = kinds::lookup(&request.kind)
        .ok_or_else(|| InputError::UnknownKind(request.kind.clone()))?;
    if let Some(field) = has_nul(&request.data)
        .then(|| nul_at(&request.data, "data"))
        .flatten()
    {
        return Err(InputError::Field {
            field,
            problem: "contains a NUL character (U+0000), which a Postgres text column cannot hold"
                .to_owned(),
        });
    }
    let payload = spec
        .encode(&request.data)
        .map_err(|error| InputError::Data {
            kind: spec.name.to_owned(),
            error,
        })?;
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(InputError::PayloadTooLarge {
            kind: spec.name.to_owned(),
            bytes: payload.len(),
        });
    }
    Ok(NewEvent {
        stream: request.stream,
        actor: request.actor,
        kind: request.kind,
        version: spec.version,
        correlation: request.correlation,
        causation: request.causation,
        key: request.key,
        payload,
    })
}

/// The rules `append` enforces, applied to an event another node wrote: its names within their
/// limits and free of control characters, a seq from 1, at most [`DEPS_MAX`] deps, and a payload
/// within its limit that, for a kind and version this build reads, decodes and passes the kind's
/// schema and holds no NUL. An event of a kind or version this build cannot read is kept (its
/// chain needs it) and skipped by projections until an upgrade reads it.
pub fn check_shipped(event: &crate::event::EventRef<'_>) -> Result<(), InputError> {
    check_name("stream", event.stream())?;
    check_name("actor", event.actor())?;
    check_name("kind", event.kind())?;
    for (field, value) in [
        ("key", event.key()),
        ("correlation", event.correlation()),
        ("causation", event.causation()),
    ] {
        if let Some(value) = value {
            check_name(field, value)?;
        }
    }
    let field = |field: &str, problem: &str| InputError::Field {
        field: field.to_owned(),
        problem: problem.to_owned(),
    };
    if event.seq() == 0 {
        return Err(field("seq", "must be 1 or more"));
    }
    if event.deps_len() > DEPS_MAX {
        return Err(field("deps", "names more origins than the limit of 1024"));
    }
    let payload = event.payload();
    let spec = match kinds::lookup(event.kind()) {
        Some(spec) if spec.readable.contains(&event.version()) => spec,
        _ => return Ok(()),
    };
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(InputError::PayloadTooLarge {
            kind: spec.name.to_owned(),
            bytes: payload.len(),
        });
    }
    let refused = |error| InputError::Data {
        kind: spec.name.to_owned(),
        error,
    };
    // In the order `new_event` checks a request: NUL characters, then the schema.
    let data = spec
        .stored_json(event.version(), payload)
        .map_err(refused)?;
    if let Some(path) = has_nul(&data).then(|| nul_at(&data, "data")).flatten() {
        return Err(field(&path, "contains a NUL character (U+0000)"));
    }
    spec.validate(&data).map_err(refused)
}

/// Reads JSON lines (blank lines skipped) into one batch, refusing the whole batch on any error.
pub fn parse_lines(input: impl BufRead) -> Result<Vec<NewEvent>, InputError> {
    read_lines(input, |_, text| parse_request(text))
}

/// Reads JSON lines (blank lines skipped) with `each`, refusing the whole batch on the first
/// error, named by its line; every limit of a batch is checked.
pub fn read_lines<T>(
    mut input: impl BufRead,
    mut each: impl FnMut(usize, &str) -> Result<T, InputError>,
) -> Result<Vec<T>, InputError> {
    let mut events = Vec::new();
    let mut line = Vec::new();
    let mut total = 0usize;
    for number in 1.. {
        line.clear();
        let n = std::io::Read::take(&mut input, LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| InputError::Read(e.to_string()))?;
        if n == 0 {
            break;
        }
        let at_line = |error| InputError::Line {
            line: number,
            error: Box::new(error),
        };
        if n > LINE_BYTES_MAX {
            return Err(at_line(InputError::LineTooLong));
        }
        total += n;
        if total > BATCH_BYTES_MAX {
            return Err(at_line(InputError::BatchBytesTooLarge));
        }
        let text = std::str::from_utf8(&line)
            .map_err(|e| at_line(InputError::Json(format!("not UTF-8: {e}"))))?;
        if text.trim().is_empty() {
            continue;
        }
        if events.len() == BATCH_EVENTS_MAX {
            return Err(at_line(InputError::BatchTooLarge));
        }
        events.push(each(number, text).map_err(at_line)?);
    }
    if events.is_empty() {
        return Err(InputError::Empty);
    }
    Ok(events)
}

fn check_name(field: &str, value: &str) -> Result<(), InputError> {
    let problem = if value.is_empty() {
        "must not be empty".to_owned()
    } else if value.len() > NAME_BYTES_MAX {
        format!(
            "is {} bytes, over the limit of {NAME_BYTES_MAX}",
            value.len()
        )
    } else if value.chars().any(char::is_control) {
        "must not contain control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(InputError::Field {
        field: field.to_owned(),
        problem,
    })
}

/// Whether any string (or object key) in `value` holds a NUL character (no allocation: the
/// path is built only for a refusal).
fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The path of the first string (or object key) in `value` holding a NUL character.
fn nul_at(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_at(v, &format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            let here = format!("{path}.{}", k.replace('\0', "\\u0000"));
            match k.contains('\0') {
                true => Some(here),
                false => nul_at(v, &here),
            }
        }),
        _ => None,
    }
}

/// serde_json appends " at line 1 column 9" to its messages; the field name says more. serde
/// also quotes the value it refused (`invalid type: string "…"`, ``unknown field `…` ``): the
/// quote goes, the rule stays.
fn strip_position(message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    let expected = message.find(", expected").map_or("", |i| &message[i..]);
    for (start, rule) in [
        ("invalid type: ", "invalid type"),
        ("invalid value: ", "invalid value"),
        ("unknown field", "unknown field"),
        ("unknown variant", "unknown variant"),
    ] {
        if message.starts_with(start) {
            let what = match start {
                "invalid type: " => message
                    .trim_start_matches(start)
                    .split([' ', ','])
                    .next()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            return format!("{rule}{what}{expected}");
        }
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: &str, stream: &str, data: &str) -> String {
        format!(r#"{{"kind":"{kind}","stream":"{stream}","actor":"me","data":{data}}}"#)
    }

    #[test]
    fn a_good_request_becomes_an_event() {
        let e = parse_request(&line("activity.logged", "board", r#"{"message":"hi"}"#)).unwrap();
        assert_eq!(
            (e.kind.as_str(), e.version, e.stream.as_str()),
            ("activity.logged", 1, "board")
        );
    }

    #[test]
    fn refusals_name_what_was_wrong() {
        let check = |text: &str, want: &str| {
            let err = parse_request(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err:?} lacks {want:?}");
        };
        check("{not json", "not valid JSON");
        check(
            &line("nope.done", "s", r#"{"message":"m"}"#),
            "unknown event kind \"nope.done\"",
        );
        check(
            &line("activity.logged", "", r#"{"message":"m"}"#),
            "field `stream`: must not be empty",
        );
        check(
            &line("activity.logged", "s", r#"{"message":7}"#),
            "data/message",
        );
        check(
            r#"{"kind":"activity.logged","stream":5,"actor":"a","data":{}}"#,
            "field `stream`: invalid type (integer), expected a string",
        );
        check(
            r#"{"kind":"activity.logged","stream":"s","actor":"a","data":{"message":"m"},"extra":1}"#,
            "field `(the request)`: has an unknown field, expected one of",
        );
        check(
            r#"{"kind":"activity.logged","stream":"s","data":{}}"#,
            "field `actor`: is missing",
        );
        let long = "x".repeat(NAME_BYTES_MAX + 1);
        check(
            &line("activity.logged", &long, r#"{"message":"m"}"#),
            "over the limit",
        );
    }

    #[test]
    fn a_nul_character_anywhere_in_the_data_is_refused_by_its_path() {
        for (data, field) in [
            (r#"{"message":"a\u0000b"}"#, "data.message"),
            (
                r#"{"message":"m","meta":{"k":["x","\u0000"]}}"#,
                "data.meta.k[1]",
            ),
            (
                r#"{"message":"m","meta":{"a\u0000":1}}"#,
                "data.meta.a\\u0000",
            ),
        ] {
            let err = parse_request(&line("activity.logged", "board", data)).unwrap_err();
            match err {
                InputError::Field { field: f, problem } => {
                    assert_eq!(f, field);
                    assert!(problem.contains("NUL"), "{problem}");
                }
                other => panic!("{data}: {other}"),
            }
        }
        assert!(parse_request(&line(
            "activity.logged",
            "board",
            r#"{"message":"a\\u0000b"}"#
        ))
        .is_ok());
    }

    #[test]
    fn a_batch_is_refused_whole_with_the_line_named() {
        let good = line("activity.logged", "s", r#"{"message":"m"}"#);
        let bad = line("activity.logged", "s", r#"{"message":1}"#);
        let text = format!("{good}\n\n{bad}\n{good}\n");
        let err = parse_lines(text.as_bytes()).unwrap_err();
        assert!(matches!(err, InputError::Line { line: 3, .. }), "{err}");
        assert_eq!(
            parse_lines(format!("{good}\n{good}").as_bytes())
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            parse_lines("\n \n".as_bytes()).unwrap_err(),
            InputError::Empty
        );
    }

    #[test]
    fn a_request_body_is_one_event_or_a_batch_refused_by_event_and_field() {
        let good = line("activity.logged", "s", r#"{"message":"m"}"#);
        let one = parse_body(good.as_bytes()).unwrap();
        assert!(one.single && one.events.len() == 1);
        let many = parse_body(format!(" [{good},{good}]").as_bytes()).unwrap();
        assert!(!many.single && many.events.len() == 2);

        let refused = |body: String| parse_body(body.as_bytes()).err().unwrap();
        // A field of the envelope, in the second event.
        let e = refused(format!(
            r#"[{good},{{"kind":"activity.logged","stream":7,"actor":"a","data":{{}}}}]"#
        ));
        assert_eq!((e.index, e.field.as_deref()), (Some(1), Some("stream")));
        assert!(e.to_string().starts_with("event 1: field `stream`"), "{e}");
        // A field of the data, found by its schema.
        let e = refused(format!(
            "[{good},{}]",
            line("activity.logged", "s", r#"{"message":1}"#)
        ));
        assert_eq!(
            (e.index, e.field.as_deref()),
            (Some(1), Some("data/message"))
        );
        // An element that is not an object, an empty batch, and text that is not JSON.
        let e = refused(format!("[{good},5]"));
        assert_eq!((e.index, e.field.as_deref()), (Some(1), None));
        assert!(matches!(e.error, InputError::Json(_)), "{e}");
        assert_eq!(refused("[]".into()).error, InputError::BatchSize);
        assert!(matches!(
            refused("{not json".into()).error,
            InputError::Json(_)
        ));
        // A single request names the field without an index.
        let e = refused(
            r#"{"kind":"activity.logged","stream":"s","actor":"a","data":{},"extra":1}"#.into(),
        );
        assert_eq!(e.index, None);
        assert_eq!(e.field.as_deref(), Some("(the request)"));
        // The unknown field's name is the client's text: not echoed.
        assert!(!e.to_string().contains("extra"), "{e}");
        let e = refused(format!(
            r#"[{good},{{"kind":"activity.logged","stream":"s","actor":"a","data":{{}},"secret-ish":1}}]"#
        ));
        assert_eq!(
            (e.index, e.field.as_deref()),
            (Some(1), Some("(the request)"))
        );
        assert!(!e.to_string().contains("secret-ish"), "{e}");
        // Bytes after a valid body are refused (they once panicked the path-tracking re-read).
        for tail in [" x", "x", " {}", "]", " [1]"] {
            let e = refused(format!("{good}{tail}"));
            assert!(matches!(e.error, InputError::Json(_)), "{tail:?}: {e}");
            let e = refused(format!("[{good}]{tail}"));
            assert!(matches!(e.error, InputError::Json(_)), "{tail:?}: {e}");
        }
    }
}
