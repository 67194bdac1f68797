//! The vault's rewrap: `spool vault recipient add` on a home holding 1 000 entries encrypted to
//! 5 recipients rewraps each to 6 (decrypt with this device's identity, encrypt with age, one
//! `vault.entry_rewrapped` each, 100 a commit), beside the age encryption of the same 1 000
//! secrets to the same 6 recipients alone, in the same run.
//!
//! `cargo bench --bench vault`. `SPOOL_BENCH_RUNS` (default 3) rounds, medians;
//! `SPOOL_BENCH_ENTRIES` (default 1 000).

mod live;
mod workload;

use std::time::Instant;

use spool::home::Home;
use spool::input::{new_event, AppendRequest};
use spool::vault::{self, Identity};
use workload::{env_or, median};

fn main() {
    let runs: usize = env_or("SPOOL_BENCH_RUNS", 3usize).max(1);
    let entries: usize = env_or("SPOOL_BENCH_ENTRIES", 1_000usize).max(1);
    println!("spool vault bench: {entries} entries to 6 recipients, {runs} runs, medians");
    let (mut rewraps, mut encryptions) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("desk");
        let pass = dir.path().join("passphrase");
        std::fs::write(&pass, "correct horse").unwrap();
        let pass = pass.to_str().unwrap();
        live::run(&home, &["init", "--label", "desk"]);
        live::run(&home, &["vault", "init"]);
        live::run(
            &home,
            &["vault", "identity", "new", "--passphrase-file", pass],
        );
        let others: Vec<String> = (0..5).map(|_| Identity::generate().recipient()).collect();
        for (i, key) in others[..4].iter().enumerate() {
            let device = format!("device-{i}");
            live::run(
                &home,
                &[
                    "vault",
                    "recipient",
                    "add",
                    key,
                    "--device",
                    &device,
                    "--label",
                    "bench",
                    "--passphrase-file",
                    pass,
                ],
            );
        }
        // The entries, encrypted to the 5 recipients and appended in-process.
        let recipients: Vec<(String, String)> = {
            let log = Home::open(&home).unwrap().open_log().unwrap();
            let page = spool::node::log_page(
                &log,
                &spool::wire::LogQuery {
                    stream: Some("vault/recipients".into()),
                    ..Default::default()
                },
            )
            .unwrap();
            page.events
                .iter()
                .map(|e| {
                    (
                        e.data["fingerprint"].as_str().unwrap().to_owned(),
                        e.data["public_key"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        assert_eq!(recipients.len(), 5);
        let keys: Vec<String> = recipients.iter().map(|r| r.1.clone()).collect();
        let fingerprints: Vec<&String> = recipients.iter().map(|r| &r.0).collect();
        let secrets: Vec<String> = (0..entries)
            .map(|i| format!("secret-{i}-{:032x}", rand::random::<u128>()))
            .collect();
        {
            let log = Home::open(&home).unwrap().open_log().unwrap();
            for chunk in secrets.chunks(100).enumerate() {
                let (c, chunk) = chunk;
                let events = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, secret)| {
                        let name = format!("entry-{}", c * 100 + i);
                        new_event(AppendRequest {
                            kind: "vault.entry_written".into(),
                            stream: format!("vault/{name}"),
                            actor: "bench".into(),
                            data: serde_json::json!({
                                "entry_id": name,
                                "ciphertext": vault::encrypt(secret.as_bytes(), &keys).unwrap(),
                                "recipients": fingerprints,
                            }),
                            key: None,
                            correlation: None,
                            causation: None,
                        })
                        .unwrap()
                    })
                    .collect();
                log.append(events).unwrap();
            }
        }
        // The rewrap to 6, through the command as a user runs it.
        let started = Instant::now();
        live::run(
            &home,
            &[
                "vault",
                "recipient",
                "add",
                &others[4],
                "--device",
                "device-5",
                "--label",
                "bench",
                "--passphrase-file",
                pass,
            ],
        );
        rewraps.push(entries as f64 / started.elapsed().as_secs_f64());
        // The peer: age's encryption of the same secrets to the same 6, alone.
        let six: Vec<String> = keys.iter().cloned().chain([others[4].clone()]).collect();
        let started = Instant::now();
        for secret in &secrets {
            std::hint::black_box(vault::encrypt(secret.as_bytes(), &six).unwrap());
        }
        encryptions.push(entries as f64 / started.elapsed().as_secs_f64());
    }
    let (rewrap, encrypt) = (median(rewraps), median(encryptions));
    println!("{:<58} {:>14}", "figure", "entries/s");
    println!(
        "{:<58} {rewrap:>14.0}",
        "spool vault recipient add: rewrap to 6 recipients"
    );
    println!(
        "{:<58} {encrypt:>14.0}",
        "age encryption alone, 6 recipients"
    );
    println!("{:<58} {:>13.2}x", "rewrap / encryption", rewrap / encrypt);
}
