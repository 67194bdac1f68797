//! The OpenAPI 3.1 description of the daemon's API, built from the wire types themselves (their
//! JSON Schemas come from the same derive that serializes them), served at
//! `GET /v1/openapi.json` and shipped as `clients/openapi.json` (a test keeps the file equal).
//!
//! Boundary: describes; serves nothing (the daemon does).

use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::input::AppendRequest;
use crate::wire::{
    Ack, BackfillSummary, Code, ExportRequest, Heads, IngestSummary, JobLine, LogPage, LogQuery,
    PostgresRequest, Problem, ProjectSummary, RebuildRequest, RebuildSummary, Status, VerifyReport,
};

/// Every path the daemon serves, with its method: the description's `paths`, and what a test
/// checks the router against.
pub const ROUTES: [(&str, &str); 19] = [
    ("post", "/v1/events"),
    ("get", "/v1/events"),
    ("post", "/v1/ingest"),
    ("get", "/v1/log"),
    ("post", "/v1/export"),
    ("post", "/v1/jobs/rebuild"),
    ("post", "/v1/jobs/project-postgres"),
    ("post", "/v1/jobs/backfill-postgres"),
    ("get", "/v1/verify"),
    ("get", "/v1/heads"),
    ("get", "/v1/status"),
    ("get", "/v1/openapi.json"),
    ("get", "/metrics"),
    ("post", "/v1/peer/wait"),
    ("get", "/v1/pair"),
    ("post", "/v1/pair/code"),
    ("post", "/v1/pair/cancel"),
    ("post", "/v1/pair/join"),
    ("get", "/v1/peer/digest"),
];

/// Collects the components' schemas as operations name them.
struct Components {
    generator: SchemaGenerator,
    schemas: Map<String, Value>,
}

impl Components {
    fn new() -> Components {
        let settings = schemars::generate::SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "/components/schemas/".into();
            s.meta_schema = None;
        });
        Components {
            generator: settings.into_generator(),
            schemas: Map::new(),
        }
    }

    /// A `$ref` to `T`'s schema under `name` in the components.
    fn add<T: JsonSchema>(&mut self, name: &str) -> Value {
        let schema = self.generator.subschema_for::<T>().to_value();
        let reference = format!("#/components/schemas/{name}");
        // A named type is kept in the generator's definitions (taken at the end); an alias
        // names it as the operations do.
        if schema.get("$ref").and_then(Value::as_str) != Some(reference.as_str()) {
            self.schemas.insert(name.to_owned(), schema);
        }
        json!({"$ref": reference})
    }

    fn finish(mut self) -> Map<String, Value> {
        for (name, schema) in self.generator.take_definitions(true) {
            self.schemas.insert(name, schema);
        }
        self.schemas
    }
}

/// `LogQuery`'s fields as query parameters (those not in `except`), from its schema.
fn query_parameters(except: &[&str]) -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let schema = generator.into_root_schema_for::<LogQuery>().to_value();
    let fields = schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    fields
        .into_iter()
        .filter(|(name, _)| !except.contains(&name.as_str()))
        .map(|(name, schema)| json!({"name": name, "in": "query", "schema": schema}))
        .collect()
}

fn json_body(schema: Value) -> Value {
    json!({"content": {"application/json": {"schema": schema}}})
}

fn answer(description: &str, schema: Value) -> Value {
    let mut answer = json_body(schema);
    answer["description"] = description.into();
    answer
}

/// The description, as served.
pub fn document() -> Value {
    let mut c = Components::new();
    let problem = c.add::<Problem>("Problem");
    let refusals = json!({
        "default": answer(
            "A refusal: its `code` decides the status (see the Code schema); 503 `busy` carries \
             Retry-After; `Connection: close` when the daemon will not read the rest of the request.",
            problem.clone(),
        )
    });
    let with_refusals = |ok: Value| {
        let mut responses = refusals.clone();
        responses["200"] = ok;
        responses
    };
    let job = |request: Value, lines: Value, summary: &str| {
        json!({
            "summary": summary,
            "requestBody": json_body(request),
            "responses": with_refusals(json!({
                "description": "JSON lines: progress up to ten a second, then the result or the error",
                "content": {"application/x-ndjson": {"schema": lines}},
            })),
        })
    };
    let page_params = query_parameters(&[]);
    let log_params = query_parameters(&["limit"]);
    let append_body = json!({"oneOf": [
        c.add::<AppendRequest>("AppendRequest"),
        {"type": "array", "items": c.add::<AppendRequest>("AppendRequest"), "minItems": 1, "maxItems": crate::input::BATCH_EVENTS_MAX},
    ]});
    let acks =
        json!({"oneOf": [c.add::<Ack>("Ack"), {"type": "array", "items": c.add::<Ack>("Ack")}]});
    let postgres = c.add::<PostgresRequest>("PostgresRequest");
    let rebuild = job(
        c.add::<RebuildRequest>("RebuildRequest"),
        c.add::<JobLine<RebuildSummary>>("RebuildLine"),
        "`spool rebuild sqlite`",
    );
    let project = job(
        postgres.clone(),
        c.add::<JobLine<ProjectSummary>>("ProjectLine"),
        "One pass of `spool project postgres`",
    );
    let backfill = job(
        postgres,
        c.add::<JobLine<BackfillSummary>>("BackfillLine"),
        "`spool backfill postgres`",
    );
    let paths = json!({
        "/v1/events": {
            "post": {
                "summary": "Append one event (an object) or a batch (an array), all or nothing; answered once durable",
                "requestBody": json_body(append_body),
                "responses": with_refusals(answer("The acknowledgement (an object), or one per event in order (an array)", acks)),
            },
            "get": {
                "summary": "Server-Sent Events: each event after `after` (or the Last-Event-ID header) passing the filters, then each new one; `id` is the position, `data` an Event",
                "parameters": log_params,
                "responses": with_refusals(json!({
                    "description": "text/event-stream of Event",
                    "content": {"text/event-stream": {"schema": c.add::<crate::wire::Event>("Event")}},
                })),
            },
        },
        "/v1/ingest": {"post": {
            "summary": "Apply an export file (at most 64 MiB) in causal order",
            "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": with_refusals(answer("The summary (ok false when it stopped early: what came before is applied)", c.add::<IngestSummary>("IngestSummary"))),
        }},
        "/v1/log": {"get": {
            "summary": "One page of events",
            "parameters": page_params,
            "responses": with_refusals(answer("The page", c.add::<LogPage>("LogPage"))),
        }},
        "/v1/export": {"post": {
            "summary": "An export file, streamed as it is written (cut short, not ended, if it fails)",
            "requestBody": json_body(c.add::<ExportRequest>("ExportRequest")),
            "responses": with_refusals(json!({"description": "The export file", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})),
        }},
        "/v1/jobs/rebuild": {"post": rebuild},
        "/v1/jobs/project-postgres": {"post": project},
        "/v1/jobs/backfill-postgres": {"post": backfill},
        "/v1/verify": {"get": {
            "summary": "Check every hash, archive, chain and index",
            "responses": with_refusals(answer("The report", c.add::<VerifyReport>("VerifyReport"))),
        }},
        "/v1/heads": {"get": {
            "summary": "The version vector: origin (hex) → highest seq held",
            "responses": with_refusals(answer("The vector", c.add::<Heads>("Heads"))),
        }},
        "/v1/peer/wait": {"post": {
            "summary": "On the peers' door only (TLS with the node keys, fleet members; there too: /v1/heads, /v1/export, /v1/ingest): answered as soon as this node holds an event `since` lacks, or after `wait_ms` (at most 30 000)",
            "requestBody": json_body(c.add::<crate::wire::PeerWait>("PeerWait")),
            "responses": with_refusals(answer("This node's heads", c.add::<crate::wire::PeerState>("PeerState"))),
        }},
        "/v1/peer/digest": {"get": {
            "summary": "On the peers' door only: the live projection's digest and the events it covers (null before its first checkpoint), for the divergence alarm",
            "responses": with_refusals(answer("The digest", json!({"oneOf": [c.add::<crate::wire::ProjectionDigest>("ProjectionDigest"), {"type": "null"}]}))),
        }},
        "/v1/pair": {"get": {
            "summary": "This node's pairing codes, newest first (never a code)",
            "responses": with_refusals(answer("The codes", json!({"type": "array", "items": c.add::<crate::wire::Pairing>("Pairing")}))),
        }},
        "/v1/pair/code": {"post": {
            "summary": "Mint a pairing code (8 characters, 60 minutes, one device; at most 3 pending): `spool pair code`",
            "requestBody": json_body(c.add::<crate::wire::PairCodeRequest>("PairCodeRequest")),
            "responses": with_refusals(answer("The code, shown once, with this node's address and fingerprint", c.add::<crate::wire::PairCode>("PairCode"))),
        }},
        "/v1/pair/cancel": {"post": {
            "summary": "Cancel a pending pairing code",
            "requestBody": json_body(c.add::<crate::wire::PairCancel>("PairCancel")),
            "responses": with_refusals(answer("The pairing cancelled", json!({"type": "object"}))),
        }},
        "/v1/pair/join": {"post": {
            "summary": "On the peers' door only, open to a key that is no member while a code is pending: present a code; answered with this node's log as an export file, which admits the key the handshake proved",
            "requestBody": json_body(c.add::<crate::wire::PairJoin>("PairJoin")),
            "responses": with_refusals(json!({"description": "The export file", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})),
        }},
        "/v1/status": {"get": {
            "summary": "The node, its heads, waiting events, forks, and what only the daemon knows",
            "responses": with_refusals(answer("The status", c.add::<Status>("Status"))),
        }},
        "/v1/openapi.json": {"get": {
            "summary": "This description",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
        }},
        "/metrics": {"get": {
            "summary": "Prometheus text: classic (0.0.4) unless Accept asks for OpenMetrics",
            "responses": {"200": {"description": "The exposition", "content": {"text/plain": {}, "application/openmetrics-text": {}}}},
        }},
    });
    c.add::<Code>("Code");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "spool serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A node's API, on its Unix socket (spool.sock in the home) and, with --http, on loopback HTTP with the bearer token of serve.token. Stamps (hlc) are decimal strings.",
        },
        "components": {
            "schemas": c.finish(),
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}, {}],
        "paths": paths,
    })
}
