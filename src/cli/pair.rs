//! `spool pair`: pairing codes. A member mints and cancels them through its daemon (whose
//! peers' door takes the joins); a new device joins with one over TLS with the node keys,
//! pinning the member's fingerprint, and takes the fleet's log as `spool fleet join` does.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use spool::event::Origin;
use spool::home::Home;
use spool::identity::origin_of;
use spool::serve::peer::{self, Link};
use spool::wire::{PairCancel, PairCodeRequest, PairJoin, Problem};

use super::commands::{json_line, reach, stdout, Reach};
use super::{PairCommand, Usage};

/// A paired device's answer (the member's whole log) may take this long to arrive.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

pub fn run(dir: &Path, command: Option<PairCommand>, as_json: bool) -> anyhow::Result<ExitCode> {
    match command {
        Some(PairCommand::Join {
            address,
            code,
            origin,
            json,
        }) => join(dir, &address, &code, &origin, json),
        command => {
            let Reach::Daemon(mut daemon) = reach(dir)? else {
                return Err(Usage(
                    "pairing runs in `spool serve` (its `[peer] listen` door takes the joins): \
                     start it"
                        .into(),
                )
                .into());
            };
            let mut out = stdout();
            match command {
                Some(PairCommand::Code { device, json }) => {
                    let code = daemon.pair_code(&PairCodeRequest { device })?;
                    if json {
                        json_line(&mut out, &code)?;
                    } else {
                        let minutes = spool::pairing::TTL_MS / 60_000;
                        writeln!(out, "code        {}", code.code)?;
                        writeln!(
                            out,
                            "address     {}",
                            code.address.as_deref().unwrap_or(
                                "(none: set `[peer] listen` in spool.toml and restart spool serve)"
                            )
                        )?;
                        writeln!(out, "fingerprint {}", code.fingerprint)?;
                        writeln!(
                            out,
                            "on the new device, within {minutes} minutes: spool pair join {} {} --origin {}",
                            code.address.as_deref().unwrap_or("ADDRESS"),
                            code.code,
                            code.fingerprint
                        )?;
                    }
                }
                Some(PairCommand::Cancel { pairing_id }) => {
                    let done = daemon.pair_cancel(&PairCancel { pairing_id })?;
                    json_line(&mut out, &done)?;
                }
                _ => {
                    let pairings = daemon.pairings()?;
                    if as_json {
                        json_line(&mut out, &pairings)?;
                    } else {
                        for p in &pairings {
                            writeln!(
                                out,
                                "{}  {:<10} {:<20} expires {}{}",
                                p.pairing_id,
                                p.state,
                                p.device,
                                p.expires_at_ms,
                                p.device_id
                                    .as_deref()
                                    .map(|d| format!("  admitted {d}"))
                                    .unwrap_or_default()
                            )?;
                        }
                    }
                }
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn join(
    dir: &Path,
    address: &str,
    code: &str,
    fingerprint: &str,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    let member = Origin::from_hex(fingerprint.trim())
        .map_err(|_| Usage("--origin: the member's fingerprint, 32 hex digits".into()))?;
    if spool::pairing::normalise(code).is_none() {
        return Err(Usage(format!(
            "the code is {} characters from A-Z and 2-9",
            spool::pairing::CODE_LEN
        ))
        .into());
    }
    if let Reach::Daemon(_) = reach(dir)? {
        return Err(Usage(
            "`spool serve` holds this node's log: stop it, pair, then start it again".into(),
        )
        .into());
    }
    let Some(key) = home.node_key()? else {
        return Err(Usage("this home was made before node keys: make a new one".into()).into());
    };
    // Only the member whose key hashes to the fingerprint is believed at the address.
    let admit = peer::admit(move |k| origin_of(k) == member, Some(member));
    let link = Link::new(address, &key, admit).map_err(anyhow::Error::msg)?;
    let request = PairJoin {
        code: code.to_owned(),
        label: home.label().to_owned(),
    };
    let body = serde_json::to_vec(&request)?;
    let received = dir.join("pairing.spool");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&received)
            .with_context(|| format!("writing {}", received.display()))?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut refused = Vec::new();
    let answered = runtime.block_on(async {
        let (mut client, _) = link.connect().await.map_err(anyhow::Error::msg)?;
        let sent = client.send("POST", "/v1/pair/join", body, |status, piece| {
            if status != 200 {
                refused.extend_from_slice(piece);
                return Ok(());
            }
            file.write_all(piece)
        });
        tokio::time::timeout(JOIN_TIMEOUT, sent)
            .await
            .map_err(|_| anyhow::anyhow!("{address}: the fleet's log did not arrive in time"))?
            .map_err(|e| anyhow::anyhow!("{address}: {e}"))
    });
    let (status, _) = match answered {
        Ok(answer) => answer,
        Err(e) => {
            let _ = std::fs::remove_file(&received);
            return Err(e);
        }
    };
    file.flush()?;
    drop(file);
    if status != 200 {
        let _ = std::fs::remove_file(&received);
        let said = serde_json::from_slice::<Problem>(&refused)
            .map(|p| p.message)
            .unwrap_or_else(|_| format!("{status} without a reason"));
        return Err(Usage(format!("{address} refused the pairing: {said}")).into());
    }
    // Admitted: join the fleet the member's log describes, and ingest it.
    let joined = super::fleet::join(dir, &received, None, as_json);
    let _ = std::fs::remove_file(&received);
    let code = joined?;
    // Keep syncing with the member once this node's daemon runs.
    let config = dir.join("spool.toml");
    let mut text = std::fs::read_to_string(&config).unwrap_or_default();
    if !text.contains(&format!("address = {address:?}")) {
        text.push_str(&format!(
            "\n[[peers]]\naddress = {address:?}\norigin = \"{member}\"\n"
        ));
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    }
    if !as_json {
        eprintln!(
            "spool: paired with {member} at {address}; it is listed in [[peers]] of {}",
            config.display()
        );
    }
    Ok(code)
}
