//! `spool fleet`: who this node takes events from, admitting and revoking members, and joining
//! a fleet by ingesting its export. Admissions and revocations are events (`device.paired`,
//! `device.revoked`) appended through the node like any other.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use spool::event::Origin;
use spool::home::Home;
use spool::identity::{origin_of, PublicKey};
use spool::input::AppendRequest;
use spool::membership::{Change, MEMBERS_MAX};
use spool::node::Node as _;
use spool::sync::file::ExportReader;
use spool::wire::Fleet;

use super::commands::{json_line, reach, stdout, Reach};
use super::Usage;

/// A node file read for its key is at most this long.
const NODE_FILE_BYTES_MAX: u64 = 64 * 1024;

pub fn show(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let mut reach = reach(dir)?;
    let status = reach.node().status()?;
    let mut out = stdout();
    let Some(fleet) = status.fleet else {
        if as_json {
            json_line(&mut out, &serde_json::Value::Null)?;
        } else {
            writeln!(
                out,
                "no fleet: this home was made before node keys; it takes every origin's events \
                 unsigned. A fleet needs keyed nodes: see README, \"A fleet\"."
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    if as_json {
        json_line(&mut out, &fleet)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_fleet(&mut out, &fleet, status.node.id)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn print_fleet(out: &mut impl Write, fleet: &Fleet, this: Origin) -> std::io::Result<()> {
    writeln!(out, "root {}", fleet.root)?;
    for m in &fleet.members {
        let mut notes = Vec::new();
        if m.origin == fleet.root {
            notes.push("root".to_owned());
        }
        if m.origin == this {
            notes.push("this node".to_owned());
        }
        if let Some(by) = m.admitted_by {
            notes.push(format!("admitted by {} seq {}", by.origin, by.seq));
        }
        if let Some(r) = &m.revoked {
            notes.push(format!(
                "REVOKED by {} seq {} (its events after seq {} are refused)",
                r.by.origin, r.by.seq, r.through
            ));
        }
        writeln!(
            out,
            "{}  {:<16} key {}  [{}]  {}",
            m.origin,
            m.label.as_deref().unwrap_or("-"),
            m.key.as_deref().unwrap_or("(in its first event)"),
            m.capabilities.join(","),
            notes.join("; ")
        )?;
    }
    Ok(())
}

/// A public key given as 64 hex digits, or read from a node's `node.toml`; with the node's
/// label when it came from its file.
fn key_of(given: &str) -> anyhow::Result<(PublicKey, Option<String>)> {
    if given.len() == 64 && given.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok((PublicKey::from_hex(given)?, None));
    }
    let path = PathBuf::from(given);
    let file = std::fs::File::open(&path).map_err(|e| {
        Usage(format!(
            "{}: not 64 hex digits of a public key, nor a node file to read ({e})",
            path.display()
        ))
    })?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, NODE_FILE_BYTES_MAX),
        &mut text,
    )
    .with_context(|| format!("reading {}", path.display()))?;
    let node: toml::Table = toml::from_str(&text)
        .map_err(|_| Usage(format!("{}: not a node file (node.toml)", path.display())))?;
    let key = node.get("key").and_then(|k| k.as_str()).ok_or_else(|| {
        Usage(format!(
            "{}: the node file has no `key` (a home made before node keys cannot join a fleet)",
            path.display()
        ))
    })?;
    let key = PublicKey::from_hex(key).map_err(|e| Usage(format!("{}: {e}", path.display())))?;
    let label = node
        .get("label")
        .and_then(|l| l.as_str())
        .map(str::to_owned);
    Ok((key, label))
}

pub fn admit(
    dir: &Path,
    given: &str,
    capabilities: Vec<String>,
    label: Option<String>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let (key, file_label) = key_of(given)?;
    let origin = origin_of(&key);
    let label = label
        .or(file_label)
        .unwrap_or_else(|| format!("node {}", &origin.to_hex()[..8]));
    let capabilities = match capabilities.is_empty() {
        true => vec!["sync".to_owned()],
        false => capabilities,
    };
    let mut reach = reach(dir)?;
    let fleet = reach.node().status()?.fleet.ok_or_else(no_fleet)?;
    if let Some(m) = fleet.members.iter().find(|m| m.origin == origin) {
        if m.revoked.is_some() {
            return Err(Usage(format!(
                "origin {origin} was revoked; a revoked key is never admitted again (make the \
                 node a new home: a new key, a new origin)"
            ))
            .into());
        }
    }
    let request = AppendRequest {
        kind: "device.paired".into(),
        stream: format!("device/{origin}"),
        actor: "spool fleet admit".into(),
        data: json!({
            "device_id": origin.to_hex(),
            "label": label,
            "capabilities": capabilities,
            "signing_public_key": key.to_hex(),
            "pairing_id": null,
        }),
        // Admitting twice answers the first admission.
        key: Some(format!("fleet.admit/{origin}")),
        correlation: None,
        causation: None,
    };
    let ack = reach.node().append(vec![request])?.remove(0);
    reach.refresh_projection();
    let mut out = stdout();
    if as_json {
        json_line(
            &mut out,
            &json!({"admitted": origin, "key": key.to_hex(), "by": ack}),
        )?;
    } else {
        writeln!(
            out,
            "{} origin {origin} (key {key}) as {label:?}: event seq {}; export to it, and it \
             runs `spool fleet join FILE`",
            if ack.duplicate {
                "already admitted"
            } else {
                "admitted"
            },
            ack.seq
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(
    dir: &Path,
    origin: &str,
    reason: Option<String>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let origin = Origin::from_hex(origin.trim())
        .map_err(|_| Usage("origin: must be 32 hex digits (`spool fleet` lists them)".into()))?;
    let mut reach = reach(dir)?;
    let fleet = reach.node().status()?.fleet.ok_or_else(no_fleet)?;
    let Some(member) = fleet.members.iter().find(|m| m.origin == origin) else {
        return Err(Usage(format!(
            "origin {origin} is not a member of this fleet (`spool fleet` lists them)"
        ))
        .into());
    };
    if let Some(r) = &member.revoked {
        return Err(Usage(format!(
            "origin {origin} is revoked already (by {} seq {})",
            r.by.origin, r.by.seq
        ))
        .into());
    }
    let device_id = member.device_id.clone().unwrap_or_else(|| origin.to_hex());
    let request = AppendRequest {
        kind: "device.revoked".into(),
        stream: format!("device/{origin}"),
        actor: "spool fleet revoke".into(),
        data: json!({ "device_id": device_id, "reason": reason }),
        key: None,
        correlation: None,
        causation: None,
    };
    let ack = reach.node().append(vec![request])?.remove(0);
    reach.refresh_projection();
    let after = reach.node().status()?.fleet.ok_or_else(no_fleet)?;
    let through = after
        .members
        .iter()
        .find(|m| m.origin == origin)
        .and_then(|m| m.revoked.as_ref())
        .map_or(0, |r| r.through);
    let mut out = stdout();
    if as_json {
        json_line(
            &mut out,
            &json!({"revoked": origin, "through": through, "by": ack}),
        )?;
    } else {
        writeln!(
            out,
            "revoked origin {origin}: its events after seq {through} are refused by every node \
             that receives this revocation (event seq {})",
            ack.seq
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn no_fleet() -> anyhow::Error {
    Usage(
        "this home was made before node keys and is in no fleet; make a new home with \
         `spool init` (see README, \"A fleet\")"
            .into(),
    )
    .into()
}

/// The root of the fleet whose export `file` is, found by following admissions back from this
/// node's: who admitted it, who admitted that member, and so on to a member nobody admitted.
fn root_in(file: &Path, this: Origin) -> anyhow::Result<(Origin, Origin)> {
    let input = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
    );
    let mut reader =
        ExportReader::new(input).with_context(|| format!("reading {}", file.display()))?;
    // Admitted origin → the origin that admitted it (the first admission in the file).
    let mut admitted_by: HashMap<Origin, Origin> = HashMap::new();
    while let Some(frame) = reader
        .next_frame()
        .with_context(|| format!("reading {}", file.display()))?
    {
        if let Some(Change::Paired { key, .. }) = frame.shipped.change.as_deref() {
            if admitted_by.len() < MEMBERS_MAX {
                admitted_by
                    .entry(origin_of(key))
                    .or_insert(frame.shipped.meta.id.origin);
            }
        }
    }
    let Some(&admitter) = admitted_by.get(&this) else {
        return Err(Usage(format!(
            "{}: no member admits this node (origin {this}) in it: on a member, `spool fleet \
             admit` this node's key or node.toml, then export again",
            file.display()
        ))
        .into());
    };
    let mut root = admitter;
    let mut seen = HashSet::from([this, admitter]);
    while let Some(&up) = admitted_by.get(&root) {
        if !seen.insert(up) {
            break; // A loop of admissions: the file is not a fleet's; ingest refuses it.
        }
        root = up;
    }
    Ok((root, admitter))
}

pub fn join(
    dir: &Path,
    file: &Path,
    pinned: Option<String>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let mut home = Home::open(dir)?;
    let this = home.origin();
    let Some(current) = home.fleet_root() else {
        return Err(no_fleet());
    };
    let (root, admitter) = root_in(file, this)?;
    if let Some(pinned) = pinned {
        let pinned = Origin::from_hex(pinned.trim())
            .map_err(|_| Usage("--root: must be 32 hex digits".into()))?;
        if pinned != root {
            return Err(Usage(format!(
                "{}: this file's fleet has root {root}, not the {pinned} given; nothing changed",
                file.display()
            ))
            .into());
        }
    }
    if current != root {
        if current != this {
            return Err(Usage(format!(
                "this node is in the fleet of root {current} already; a node is in one fleet"
            ))
            .into());
        }
        match reach(dir)? {
            Reach::Daemon(_) => {
                return Err(Usage(
                    "`spool serve` holds this node's log: stop it, join, then start it again"
                        .into(),
                )
                .into())
            }
            Reach::Local(mut local) => {
                let fleet = local.status()?.fleet.ok_or_else(no_fleet)?;
                if fleet.members.len() > 1 {
                    return Err(Usage(format!(
                        "this node is the root of a fleet of {} members; a root does not join \
                         another fleet",
                        fleet.members.len()
                    ))
                    .into());
                }
            }
        }
        home.join_fleet(root)?;
    }
    if !as_json {
        eprintln!("spool: joining the fleet of root {root}; this node was admitted by {admitter}");
    }
    super::commands::ingest(dir, Some(file.to_owned()), as_json)
}
