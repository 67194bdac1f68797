//! `spool vault`: secrets encrypted on this machine (`spool::vault`, age) before they become
//! events appended through the node (its daemon when one runs). What the vault holds is read
//! back from its events: the install (`vault/install`), the recipients (`vault/recipients`),
//! each entry's latest ciphertext (`vault/NAME`).

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Value};

use spool::home::Home;
use spool::input::AppendRequest;
use spool::node::Node;
use spool::vault::{self, Identity, Kdf};
use spool::wire::LogQuery;

use super::commands::{json_line, reach, stdout};
use super::{Usage, VaultCommand, VaultIdentityCommand, VaultRecipientCommand};

/// The sealed identity's file in the home.
const IDENTITY_FILE: &str = "vault.identity";
/// A secret is at most this long.
const SECRET_BYTES_MAX: u64 = 64 * 1024;
/// Entries rewrapped per commit.
const REWRAP_BATCH: usize = 100;
/// A passphrase file is at most this long.
const PASSPHRASE_BYTES_MAX: u64 = 4 * 1024;

pub fn run(dir: &Path, command: VaultCommand) -> anyhow::Result<ExitCode> {
    let mut out = stdout();
    match command {
        VaultCommand::Init { json } => init(dir, &mut out, json)?,
        VaultCommand::Identity(VaultIdentityCommand::New {
            label,
            passphrase_file,
            json,
        }) => identity_new(dir, label, passphrase_file.as_deref(), &mut out, json)?,
        VaultCommand::Put { name, json } => put(dir, &name, &mut out, json)?,
        VaultCommand::Get {
            name,
            passphrase_file,
            purpose,
        } => get(dir, &name, passphrase_file.as_deref(), purpose, &mut out)?,
        VaultCommand::List { json } => list(dir, &mut out, json)?,
        VaultCommand::Rm { name, reason, json } => rm(dir, &name, reason, &mut out, json)?,
        VaultCommand::Recipient(VaultRecipientCommand::Add {
            key,
            device,
            label,
            passphrase_file,
            json,
        }) => {
            let public_key = vault::recipient(&key)?.to_string();
            let fingerprint = vault::fingerprint(&public_key);
            let mut reach = reach(dir)?;
            let node = reach.node();
            let state = State::read(node)?;
            state.kdf()?;
            if state.recipients.contains_key(&fingerprint) {
                return Err(Usage(format!("{fingerprint} is a recipient already")).into());
            }
            if state.removed.contains(&fingerprint) {
                return Err(Usage(format!(
                    "{fingerprint} was removed; a removed key is not added again (make a new one)"
                ))
                .into());
            }
            let identity = unlock(dir, &state, passphrase_file.as_deref())?;
            let recipient_id = format!("rcp-{}", &fingerprint[..16]);
            append(
                node,
                "vault.recipient_added",
                "vault/recipients",
                json!({
                    "recipient_id": recipient_id, "device_id": device, "label": label,
                    "public_key": public_key, "fingerprint": fingerprint,
                }),
            )?;
            let done = rewrap(node, &identity, "recipient added")?;
            reach.refresh_projection();
            report(&mut out, json, &recipient_id, &done)?;
        }
        VaultCommand::Rewrap {
            passphrase_file,
            json,
        } => {
            let mut reach = reach(dir)?;
            let node = reach.node();
            let state = State::read(node)?;
            let identity = unlock(dir, &state, passphrase_file.as_deref())?;
            let done = rewrap(node, &identity, "recipients changed")?;
            reach.refresh_projection();
            report(&mut out, json, "rewrap", &done)?;
        }
        VaultCommand::Recipient(VaultRecipientCommand::Remove {
            id,
            reason,
            passphrase_file,
            json,
        }) => {
            let mut reach = reach(dir)?;
            let node = reach.node();
            let state = State::read(node)?;
            let Some((fingerprint, r)) = state
                .recipients
                .iter()
                .find(|(f, r)| **f == id || r.recipient_id == id)
            else {
                return Err(Usage(
                    "no current recipient has the id or fingerprint given (`spool vault recipients`)"
                        .into(),
                )
                .into());
            };
            let (fingerprint, recipient_id) = (fingerprint.clone(), r.recipient_id.clone());
            if state.recipients.len() == 1 {
                return Err(Usage(
                    "it is the last recipient: the entries would be readable by nobody".into(),
                )
                .into());
            }
            let identity = unlock(dir, &state, passphrase_file.as_deref())?;
            append(
                node,
                "vault.recipient_removed",
                "vault/recipients",
                json!({ "recipient_id": recipient_id, "fingerprint": fingerprint, "reason": reason }),
            )?;
            let done = rewrap(node, &identity, "recipient removed")?;
            reach.refresh_projection();
            report(&mut out, json, &recipient_id, &done)?;
        }
        VaultCommand::Recipients { json } => {
            let recipients = State::read(&mut *reach(dir)?.node())?.recipients;
            if json {
                json_line(&mut out, &recipients)?;
            } else {
                for (fingerprint, r) in &recipients {
                    writeln!(
                        out,
                        "{fingerprint}  {}  {}  {}",
                        r.public_key, r.device_id, r.label
                    )?;
                }
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// A recipient, as its `vault.recipient_added` says.
#[derive(Clone, Debug, serde::Serialize)]
struct Recipient {
    recipient_id: String,
    public_key: String,
    device_id: String,
    label: String,
}

/// The vault as its events leave it.
#[derive(Default)]
struct State {
    kdf: Option<Kdf>,
    /// Current recipients, by fingerprint.
    recipients: BTreeMap<String, Recipient>,
    /// Fingerprints removed.
    removed: Vec<String>,
}

/// Every event `query` selects, oldest first, page by page.
fn events(node: &mut dyn Node, mut query: LogQuery) -> anyhow::Result<Vec<spool::wire::Event>> {
    let mut all = Vec::new();
    loop {
        let page = node.log(&query)?;
        match page.events.last() {
            Some(last) => query.after = last.position,
            None => return Ok(all),
        }
        all.extend(page.events);
    }
}

/// Every event of `stream`, oldest first.
fn stream_events(node: &mut dyn Node, stream: &str) -> anyhow::Result<Vec<spool::wire::Event>> {
    events(
        node,
        LogQuery {
            stream: Some(stream.to_owned()),
            ..Default::default()
        },
    )
}

impl State {
    fn read(node: &mut dyn Node) -> anyhow::Result<State> {
        let mut state = State::default();
        for event in stream_events(node, "vault/install")? {
            let d = &event.data;
            let number = |f: &str| d[f].as_u64().and_then(|n| u32::try_from(n).ok());
            if let (Some(salt), Some(memory_kib), Some(iterations), Some(parallelism)) = (
                d["salt"].as_str().and_then(|s| hex::decode(s).ok()),
                number("memory_kib"),
                number("iterations"),
                number("parallelism"),
            ) {
                // The first install counts: a later one (another node's, synced) changes nothing.
                state.kdf.get_or_insert(Kdf {
                    salt,
                    memory_kib,
                    iterations,
                    parallelism,
                });
            }
        }
        for event in stream_events(node, "vault/recipients")? {
            let d = &event.data;
            let text = |f: &str| d[f].as_str().unwrap_or_default().to_owned();
            match event.kind.as_str() {
                "vault.recipient_added" => {
                    let fingerprint = text("fingerprint");
                    if !state.removed.contains(&fingerprint) {
                        state.recipients.insert(
                            fingerprint,
                            Recipient {
                                recipient_id: text("recipient_id"),
                                public_key: text("public_key"),
                                device_id: text("device_id"),
                                label: text("label"),
                            },
                        );
                    }
                }
                "vault.recipient_removed" => {
                    let fingerprint = text("fingerprint");
                    state.recipients.remove(&fingerprint);
                    state.removed.push(fingerprint);
                }
                _ => {}
            }
        }
        Ok(state)
    }

    fn kdf(&self) -> anyhow::Result<&Kdf> {
        self.kdf
            .as_ref()
            .ok_or_else(|| Usage("the vault has no install yet: `spool vault init`".into()).into())
    }
}

fn append(node: &mut dyn Node, kind: &str, stream: &str, data: Value) -> anyhow::Result<()> {
    node.append(vec![AppendRequest {
        kind: kind.into(),
        stream: stream.into(),
        actor: "spool vault".into(),
        data,
        key: None,
        correlation: None,
        causation: None,
    }])?;
    Ok(())
}

fn init(dir: &Path, out: &mut impl Write, as_json: bool) -> anyhow::Result<()> {
    let mut reach = reach(dir)?;
    let node = reach.node();
    if State::read(node)?.kdf.is_some() {
        return Err(Usage("the vault has an install already".into()).into());
    }
    let kdf = Kdf::generate();
    let install_id = format!("install-{}", hex::encode(rand::random::<[u8; 8]>()));
    append(
        node,
        "vault.install_initialised",
        "vault/install",
        json!({
            "install_id": install_id,
            "kdf": "argon2id",
            "salt": hex::encode(&kdf.salt),
            "memory_kib": kdf.memory_kib,
            "iterations": kdf.iterations,
            "parallelism": kdf.parallelism,
        }),
    )?;
    reach.refresh_projection();
    if as_json {
        json_line(out, &json!({ "install_id": install_id }))?;
    } else {
        writeln!(
            out,
            "vault install {install_id}: Argon2id, 64 MiB, 3 passes"
        )?;
    }
    Ok(())
}

/// The passphrase: from `file`, else `SPOOL_VAULT_PASSPHRASE`, else a prompt on the terminal.
fn passphrase(file: Option<&Path>, confirm: bool) -> anyhow::Result<zeroize::Zeroizing<String>> {
    if let Some(file) = file {
        let mut text = String::new();
        std::fs::File::open(file)
            .with_context(|| format!("--passphrase-file {}", file.display()))?
            .take(PASSPHRASE_BYTES_MAX)
            .read_to_string(&mut text)
            .with_context(|| format!("--passphrase-file {}", file.display()))?;
        let text = text.trim_end_matches(['\n', '\r']).to_owned();
        return Ok(zeroize::Zeroizing::new(text));
    }
    if let Ok(text) = std::env::var("SPOOL_VAULT_PASSPHRASE") {
        return Ok(zeroize::Zeroizing::new(text));
    }
    let first = zeroize::Zeroizing::new(rpassword::prompt_password("vault passphrase: ").map_err(
        |_| {
            Usage(
                "no passphrase: give --passphrase-file or SPOOL_VAULT_PASSPHRASE, or run on a \
                 terminal"
                    .into(),
            )
        },
    )?);
    if confirm {
        let again = zeroize::Zeroizing::new(rpassword::prompt_password("again: ")?);
        if *again != *first {
            return Err(Usage("the two passphrases differ; nothing changed".into()).into());
        }
    }
    Ok(first)
}

fn identity_new(
    dir: &Path,
    label: Option<String>,
    passphrase_file: Option<&Path>,
    out: &mut impl Write,
    as_json: bool,
) -> anyhow::Result<()> {
    let home = Home::open(dir)?;
    let path = dir.join(IDENTITY_FILE);
    if path.exists() {
        return Err(Usage(format!(
            "{} exists: this device has a vault identity already",
            path.display()
        ))
        .into());
    }
    let mut reach = reach(dir)?;
    let node = reach.node();
    let state = State::read(node)?;
    let kdf = state.kdf()?.clone();
    let passphrase = passphrase(passphrase_file, true)?;
    if passphrase.is_empty() {
        return Err(Usage("the passphrase is empty".into()).into());
    }
    let identity = Identity::generate();
    let sealed = identity.seal(passphrase.as_bytes(), &kdf)?;
    // Written whole and synced before the recipient is announced; 0600 from its creation.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        file.write_all(&sealed)?;
        file.sync_all()?;
    }
    let public_key = identity.recipient();
    let fingerprint = vault::fingerprint(&public_key);
    let label = label.unwrap_or_else(|| home.label().to_owned());
    let recipient_id = format!("rcp-{}", &fingerprint[..16]);
    append(
        node,
        "vault.recipient_added",
        "vault/recipients",
        json!({
            "recipient_id": recipient_id,
            "device_id": home.origin().to_hex(),
            "label": label,
            "public_key": public_key,
            "fingerprint": fingerprint,
        }),
    )?;
    reach.refresh_projection();
    if as_json {
        json_line(
            out,
            &json!({"recipient_id": recipient_id, "public_key": public_key, "fingerprint": fingerprint}),
        )?;
    } else {
        writeln!(
            out,
            "identity {public_key} (fingerprint {fingerprint}) in {}",
            path.display()
        )?;
    }
    Ok(())
}

/// An entry's name: its stream is `vault/NAME`.
fn entry_stream(name: &str) -> anyhow::Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !matches!(name, "install" | "recipients")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(Usage(
            "NAME: 1 to 200 of a-z, A-Z, 0-9, '-', '_', '.' (not `install` or `recipients`)".into(),
        )
        .into());
    }
    Ok(format!("vault/{name}"))
}

fn put(dir: &Path, name: &str, out: &mut impl Write, as_json: bool) -> anyhow::Result<()> {
    let stream = entry_stream(name)?;
    let secret = if std::io::stdin().is_terminal() {
        zeroize::Zeroizing::new(
            rpassword::prompt_password(format!("secret for {name}: "))?.into_bytes(),
        )
    } else {
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        std::io::stdin()
            .take(SECRET_BYTES_MAX + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > SECRET_BYTES_MAX {
            return Err(Usage(format!("the secret is over {SECRET_BYTES_MAX} bytes")).into());
        }
        bytes
    };
    if secret.is_empty() {
        return Err(Usage("the secret is empty".into()).into());
    }
    let mut reach = reach(dir)?;
    let node = reach.node();
    let state = State::read(node)?;
    state.kdf()?;
    if state.recipients.is_empty() {
        return Err(Usage(
            "the vault has no recipient: `spool vault identity new` on a device".into(),
        )
        .into());
    }
    let keys: Vec<String> = state
        .recipients
        .values()
        .map(|r| r.public_key.clone())
        .collect();
    let fingerprints: Vec<&String> = state.recipients.keys().collect();
    let ciphertext = vault::encrypt(&secret, &keys)?;
    append(
        node,
        "vault.entry_written",
        &stream,
        json!({ "entry_id": name, "ciphertext": ciphertext, "recipients": fingerprints }),
    )?;
    reach.refresh_projection();
    if as_json {
        json_line(
            out,
            &json!({ "entry_id": name, "recipients": fingerprints }),
        )?;
    } else {
        writeln!(
            out,
            "{name}: encrypted to {} recipients",
            fingerprints.len()
        )?;
    }
    Ok(())
}

/// An entry's latest ciphertext, from its own stream.
fn latest(node: &mut dyn Node, name: &str) -> anyhow::Result<Option<Latest>> {
    let stream = entry_stream(name)?;
    Ok(stream_events(node, &stream)?
        .iter()
        .filter_map(entry_of)
        .map(|(_, latest)| latest)
        .next_back()
        .filter(|latest| !latest.removed))
}

fn rm(
    dir: &Path,
    name: &str,
    reason: Option<String>,
    out: &mut impl Write,
    as_json: bool,
) -> anyhow::Result<()> {
    let stream = entry_stream(name)?;
    let mut reach = reach(dir)?;
    let node = reach.node();
    if latest(node, name)?.is_none() {
        return Err(Usage(format!("no entry {name} (`spool vault list`)")).into());
    }
    append(
        node,
        "vault.entry_removed",
        &stream,
        json!({"entry_id": name, "reason": reason}),
    )?;
    reach.refresh_projection();
    if as_json {
        json_line(out, &json!({"entry_id": name, "removed": true}))?;
    } else {
        writeln!(
            out,
            "removed {name}; the log keeps its earlier ciphertext: rotate the secret where it is used if a copy may have leaked"
        )?;
    }
    Ok(())
}

fn get(
    dir: &Path,
    name: &str,
    passphrase_file: Option<&Path>,
    purpose: Option<String>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let home = Home::open(dir)?;
    let path = dir.join(IDENTITY_FILE);
    let mut sealed = Vec::new();
    std::fs::File::open(&path)
        .with_context(|| format!("{}: this device has no vault identity", path.display()))?
        .take(64 * 1024)
        .read_to_end(&mut sealed)?;
    let mut reach = reach(dir)?;
    let node = reach.node();
    let state = State::read(node)?;
    let kdf = state.kdf()?.clone();
    let Some(Latest { ciphertext, .. }) = latest(node, name)? else {
        return Err(Usage(format!("no entry {name} (`spool vault list`)")).into());
    };
    let passphrase = passphrase(passphrase_file, false)?;
    let identity = Identity::open(&sealed, passphrase.as_bytes(), &kdf)?;
    let plain = identity.decrypt(&ciphertext).map_err(|_| {
        Usage(format!(
            "{name} is not encrypted to this device's identity (rewrapped without it, or written before it was a recipient)"
        ))
    })?;
    // The access is logged, durable, before the secret leaves.
    append(
        node,
        "vault.entry_unlocked",
        &entry_stream(name)?,
        json!({
            "entry_id": name,
            "device_id": home.origin().to_hex(),
            "recipient": vault::fingerprint(&identity.recipient()),
            "purpose": purpose,
        }),
    )?;
    reach.refresh_projection();
    out.write_all(&plain)?;
    Ok(())
}

/// An entry's latest ciphertext and the fingerprints it is encrypted to (both empty once it
/// is removed).
struct Latest {
    position: u64,
    ciphertext: String,
    recipients: Vec<String>,
    removed: bool,
}

/// The kinds that say what an entry now is.
const ENTRY_KINDS: [&str; 3] = [
    "vault.entry_written",
    "vault.entry_rewrapped",
    "vault.entry_removed",
];

/// An entry event's name and what it says the entry now is (`None` for other events).
fn entry_of(event: &spool::wire::Event) -> Option<(String, Latest)> {
    if !ENTRY_KINDS.contains(&event.kind.as_str()) {
        return None;
    }
    let d = &event.data;
    if event.kind == "vault.entry_removed" {
        let latest = Latest {
            position: event.position,
            ciphertext: String::new(),
            recipients: Vec::new(),
            removed: true,
        };
        return Some((d["entry_id"].as_str()?.to_owned(), latest));
    }
    let recipients = d["recipients"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    Some((
        d["entry_id"].as_str()?.to_owned(),
        Latest {
            position: event.position,
            ciphertext: d["ciphertext"].as_str()?.to_owned(),
            recipients,
            removed: false,
        },
    ))
}

/// Every entry's latest ciphertext, by name: one scan of the log's entry events of each kind
/// (the later position wins), not a query per entry.
fn entries(node: &mut dyn Node) -> anyhow::Result<BTreeMap<String, Latest>> {
    let mut latest: BTreeMap<String, Latest> = BTreeMap::new();
    for kind in ENTRY_KINDS {
        let query = LogQuery {
            kind: Some(kind.into()),
            ..Default::default()
        };
        for (name, entry) in events(node, query)?.iter().filter_map(entry_of) {
            if latest
                .get(&name)
                .is_none_or(|l| l.position < entry.position)
            {
                latest.insert(name, entry);
            }
        }
    }
    latest.retain(|_, entry| !entry.removed);
    Ok(latest)
}

/// This device's identity, opened with its passphrase.
fn unlock(dir: &Path, state: &State, passphrase_file: Option<&Path>) -> anyhow::Result<Identity> {
    let path = dir.join(IDENTITY_FILE);
    let mut sealed = Vec::new();
    std::fs::File::open(&path)
        .with_context(|| format!("{}: this device has no vault identity", path.display()))?
        .take(64 * 1024)
        .read_to_end(&mut sealed)?;
    let passphrase = passphrase(passphrase_file, false)?;
    Ok(Identity::open(
        &sealed,
        passphrase.as_bytes(),
        state.kdf()?,
    )?)
}

/// What a rewrap did: entries rewrapped, and those this device could not read.
#[derive(serde::Serialize)]
struct Rewrapped {
    rewrapped: Vec<String>,
    unreadable: Vec<String>,
}

/// Every entry re-encrypted to the current recipients (one `vault.entry_rewrapped` each, at
/// most [`REWRAP_BATCH`] a commit), with a progress bar; an entry this device cannot read is
/// left as it is and named.
fn rewrap(node: &mut dyn Node, identity: &Identity, reason: &str) -> anyhow::Result<Rewrapped> {
    let state = State::read(node)?;
    let keys: Vec<String> = state
        .recipients
        .values()
        .map(|r| r.public_key.clone())
        .collect();
    let fingerprints: Vec<&String> = state.recipients.keys().collect();
    let entries = entries(node)?;
    let bar = indicatif::ProgressBar::new(entries.len() as u64);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut done = Rewrapped {
        rewrapped: Vec::new(),
        unreadable: Vec::new(),
    };
    let mut batch = Vec::new();
    for (name, entry) in entries {
        bar.inc(1);
        let Ok(plain) = identity.decrypt(&entry.ciphertext) else {
            done.unreadable.push(name);
            continue;
        };
        let ciphertext = vault::encrypt(&plain, &keys)?;
        batch.push(AppendRequest {
            kind: "vault.entry_rewrapped".into(),
            stream: entry_stream(&name)?,
            actor: "spool vault".into(),
            data: json!({
                "entry_id": name, "ciphertext": ciphertext, "recipients": fingerprints,
                "reason": reason,
            }),
            key: None,
            correlation: None,
            causation: None,
        });
        done.rewrapped.push(name);
        if batch.len() == REWRAP_BATCH {
            node.append(std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        node.append(batch)?;
    }
    bar.finish_and_clear();
    Ok(done)
}

fn report(
    out: &mut impl Write,
    as_json: bool,
    recipient_id: &str,
    done: &Rewrapped,
) -> anyhow::Result<()> {
    if as_json {
        json_line(
            out,
            &json!({ "recipient_id": recipient_id, "rewrap": done }),
        )?;
    } else {
        writeln!(
            out,
            "{recipient_id}: {} entries rewrapped",
            done.rewrapped.len()
        )?;
        for name in &done.unreadable {
            writeln!(
                out,
                "NOT REWRAPPED {name}: not encrypted to this device's identity; rewrap it from a \
                 device that can read it"
            )?;
        }
    }
    Ok(())
}

fn list(dir: &Path, out: &mut impl Write, as_json: bool) -> anyhow::Result<()> {
    let mut reach = reach(dir)?;
    let node = reach.node();
    let state = State::read(node)?;
    let mut listed = Vec::new();
    for (name, entry) in entries(node)? {
        let stale = entry.recipients.iter().any(|f| state.removed.contains(f));
        listed.push(json!({
            "entry_id": name,
            "recipients": entry.recipients,
            "rewrap_due": stale,
        }));
    }
    let entries = listed;
    if as_json {
        json_line(out, &entries)?;
    } else {
        for e in &entries {
            writeln!(
                out,
                "{}  {} recipients{}",
                e["entry_id"].as_str().unwrap_or_default(),
                e["recipients"].as_array().map_or(0, Vec::len),
                if e["rewrap_due"] == true {
                    "  REWRAP DUE: still encrypted to a removed recipient"
                } else {
                    ""
                }
            )?;
        }
    }
    Ok(())
}
