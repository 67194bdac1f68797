//! The event catalogue, for every kind and version: the shipped schema is the one derived from
//! the payload type, the golden file decodes (forever), and the example round-trips and bad data
//! is refused with the field named.
//!
//! `SPOOL_BLESS=1 cargo test --test catalogue` writes schema files that are empty and completes
//! golden files that have an example (`stream`, `data`) but no `stored` bytes yet. It never
//! changes a complete file: a released version's bytes are frozen.

use std::path::PathBuf;

use serde_json::{json, Value};
use spool::event::{self, Dep, Event, Hash, Origin};
use spool::kinds::{self, KindSpec, CATALOGUE, SUPERSEDED};

fn bless() -> bool {
    std::env::var("SPOOL_BLESS").is_ok_and(|v| v == "1")
}

fn every_version() -> impl Iterator<Item = &'static KindSpec> {
    CATALOGUE.iter().chain(SUPERSEDED).copied()
}

fn file(spec: &KindSpec, suffix: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(spec.name)
        .join(format!("v{}.{suffix}", spec.version))
}

fn read_json(path: &PathBuf) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (every kind version needs one)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write_json(path: &PathBuf, value: &Value) {
    let text = serde_json::to_string_pretty(value).unwrap() + "\n";
    std::fs::write(path, text).unwrap();
}

/// The example data of a kind version, from its golden file.
fn example(spec: &KindSpec) -> Value {
    read_json(&file(spec, "golden.json"))["data"].clone()
}

/// The envelope every golden event has, so golden files freeze the envelope layout too.
fn golden_event(spec: &KindSpec, stream: &str, payload: Vec<u8>) -> Event {
    Event {
        origin: Origin([0x5e; 16]),
        seq: 1,
        hlc: (1_763_683_200_000 << 16) | 1,
        prev: Hash::ZERO,
        deps: vec![Dep {
            origin: Origin([0xd0; 16]),
            seq: 7,
        }],
        stream: stream.to_owned(),
        actor: "golden".to_owned(),
        kind: spec.name.to_owned(),
        version: spec.version,
        correlation: Some("golden-correlation".to_owned()),
        causation: None,
        key: Some(format!("golden:{}:v{}", spec.name, spec.version)),
        payload,
        signer: None,
    }
}

#[test]
fn shipped_schemas_are_the_ones_derived_from_the_types() {
    let mut written = Vec::new();
    for spec in every_version() {
        let path = file(spec, "schema.json");
        let derived = serde_json::to_string_pretty(&spec.derived_schema()).unwrap() + "\n";
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        if shipped.trim().is_empty() && bless() {
            std::fs::write(&path, &derived).unwrap();
            written.push(path.display().to_string());
            continue;
        }
        assert_eq!(
            shipped,
            derived,
            "{}: the schema derived from the payload type differs. A released version never \
             changes: add a new version with an upcaster instead.",
            path.display()
        );
        assert_eq!(
            spec.schema,
            shipped,
            "{}: rebuild to embed it",
            path.display()
        );
    }
    assert!(
        written.is_empty(),
        "wrote {written:?}; rebuild and run again"
    );
}

#[test]
fn every_golden_file_decodes_forever() {
    let mut completed = Vec::new();
    for spec in every_version() {
        let path = file(spec, "golden.json");
        let mut golden = read_json(&path);
        let stream = golden["stream"].as_str().expect("golden stream").to_owned();
        let data = golden["data"].clone();
        let current = kinds::lookup(spec.name).expect("a golden file of a known kind");
        if golden.get("stored").is_none() && bless() {
            let payload = spec
                .encode(&data)
                .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            let reads_as = current.decode(spec.version, &payload).unwrap();
            let stored = event::encode(&golden_event(spec, &stream, payload));
            golden["stored"] = hex::encode(&stored).into();
            golden["hash"] = Hash::of(&stored).to_hex().into();
            if reads_as != data {
                golden["reads_as"] = reads_as;
            }
            write_json(&path, &golden);
            completed.push(path.display().to_string());
            continue;
        }
        let what = path.display();
        let stored = hex::decode(golden["stored"].as_str().expect("stored bytes")).unwrap();
        let hash = Hash::from_hex(golden["hash"].as_str().expect("hash")).unwrap();
        assert_eq!(Hash::of(&stored), hash, "{what}: hash of the stored bytes");
        let view = event::decode(&stored).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!((view.kind(), view.version()), (spec.name, spec.version));
        // The envelope and the payload encode exactly as they did when the file was made.
        assert_eq!(
            view.to_event(),
            golden_event(spec, &stream, view.payload().to_vec()),
            "{what}: envelope"
        );
        let payload = spec.encode(&data).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            payload,
            view.payload(),
            "{what}: the payload encodes differently"
        );
        let expected = golden.get("reads_as").unwrap_or(&data);
        let read = current.decode(view.version(), view.payload());
        assert_eq!(
            read.as_ref(),
            Ok(expected),
            "{what}: read as the current version"
        );
    }
    assert!(completed.is_empty(), "completed {completed:?}; run again");
}

#[test]
fn every_superseded_version_is_still_readable() {
    for spec in SUPERSEDED {
        let current = kinds::lookup(spec.name).unwrap();
        assert!(current.version > spec.version);
        assert!(current.readable.contains(&spec.version), "{}", spec.name);
    }
    assert!(!SUPERSEDED.is_empty(), "at least one upcaster ships");
}

#[test]
fn every_kind_round_trips_its_example() {
    for spec in CATALOGUE {
        let data = example(spec);
        let payload = spec
            .encode(&data)
            .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        assert_eq!(
            spec.decode(spec.version, &payload).unwrap(),
            data,
            "{}",
            spec.name
        );
    }
}

#[test]
fn every_kind_refuses_bad_data_and_names_the_field() {
    for spec in every_version() {
        let name = spec.name;
        let schema: Value = serde_json::from_str(spec.schema).unwrap();
        let data = example(spec);

        let mut extra = data.clone();
        extra["not_a_field"] = json!(true);
        let err = spec.encode(&extra).unwrap_err();
        assert!(err.problem.contains("not_a_field"), "{name}: {err}");

        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} requires no field"))
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        for field in &required {
            let mut missing = data.clone();
            missing.as_object_mut().unwrap().remove(*field);
            let err = spec.encode(&missing).unwrap_err();
            assert_eq!(
                err.field,
                format!("/{field}"),
                "{name} without {field}: {err}"
            );
            assert!(
                err.problem.contains("missing"),
                "{name} without {field}: {err}"
            );
        }

        let field = required[0];
        let mut wrong = data.clone();
        wrong[field] = match schema["properties"][field]["type"].as_str() {
            Some("string") => json!(12345),
            _ => json!("not the right type"),
        };
        let err = spec.encode(&wrong).unwrap_err();
        assert_eq!(err.field, format!("/{field}"), "{name}: {err}");
        assert!(
            !err.to_string().contains("12345"),
            "{name} echoed the value: {err}"
        );

        assert_eq!(spec.encode(&json!([1, 2])).unwrap_err().field, "", "{name}");
    }
}

#[test]
fn the_required_kind_names_are_all_there() {
    let required = [
        "task.created",
        "task.scored",
        "task.score_overridden",
        "task.score_locked",
        "brief.added",
        "triage.run_started",
        "triage.run_completed",
        "loom.run_started",
        "loom.run_finished",
        "loom.step_started",
        "loom.step_finished",
        "loom.step_acked",
        "loom.job_enqueued",
        "loom.job_claimed",
        "activity.logged",
        "vault.recipient_added",
        "vault.recipient_removed",
        "vault.entry_written",
        "vault.entry_rewrapped",
        "vault.entry_unlocked",
        "pairing.requested",
        "pairing.completed",
        "pairing.expired",
        "device.paired",
        "device.revoked",
    ];
    for name in required {
        assert!(kinds::lookup(name).is_some(), "{name} is missing");
    }
    let mut names: Vec<_> = CATALOGUE.iter().map(|k| k.name).collect();
    for name in &names {
        let (domain, verb) = name.split_once('.').expect("domain.verb");
        assert!(!domain.is_empty() && !verb.is_empty(), "{name}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'));
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CATALOGUE.len(), "a kind is registered twice");
}

#[test]
fn the_readme_for_client_developers_lists_every_kind() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/README.md")).unwrap();
    for spec in CATALOGUE {
        assert!(
            readme.contains(&format!("| `{}` |", spec.name)),
            "{} is not in schemas/README.md",
            spec.name
        );
    }
}
