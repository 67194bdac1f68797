//! Bytes flipped in a copy of the log: `verify` fails and names the event; nothing crashes.

mod common;

use std::path::Path;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn home_with_needles(dir: &Path) -> std::path::PathBuf {
    let home = dir.join("node");
    ok(&home, &["init"], "");
    let lines: Vec<String> = (0..50)
        .map(|i| activity("s", &format!("needle-{i:03}")))
        .collect();
    ok(&home, &["append"], &lines.join("\n"));
    home
}

fn copy_home(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Flips one bit in every copy of `needle` in the file; returns how many it found.
fn flip_needle(file: &Path, needle: &[u8]) -> usize {
    let mut bytes = std::fs::read(file).unwrap();
    let mut hits = 0;
    for i in 0..bytes.len() - needle.len() {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i + needle.len() - 1] ^= 0x01;
            hits += 1;
        }
    }
    std::fs::write(file, bytes).unwrap();
    hits
}

#[test]
fn verify_names_the_damaged_event() {
    let dir = tempfile::tempdir().unwrap();
    let home = home_with_needles(dir.path());
    let events = json_lines(&ok(&home, &["log"], ""));
    let target = &events[17];
    assert_eq!(target["data"]["message"], "needle-017");

    let damaged = dir.path().join("damaged");
    copy_home(&home, &damaged);
    assert!(flip_needle(&damaged.join("log.redb"), b"needle-017") > 0);

    let o = spool(&damaged, &["verify"], "");
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    for want in [
        target["origin"].as_str().unwrap(),
        "seq 18",
        "hash mismatch",
        target["hash"].as_str().unwrap(),
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }

    let o = spool(&damaged, &["verify", "--json"], "");
    assert_eq!(o.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["ok"], false);
    let first = &report["problems"][0];
    assert_eq!(first["problem"], "hash_mismatch");
    assert_eq!(first["id"]["seq"], 18);
    assert_eq!(first["id"]["origin"], target["origin"]);
    assert_eq!(first["expected"], target["hash"]);
    assert_ne!(first["actual"], target["hash"]);

    // Reading past the damage is refused with the same facts, not returned.
    let o = spool(&damaged, &["log"], "");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("hash mismatch"), "{}", stderr(&o));
    // So is a rebuild (the replay's reading thread meets the damage and hands it on): it fails,
    // naming it, and the projection in place keeps its rows.
    let before = ok(&damaged, &["digest", "sqlite"], "");
    let o = spool(&damaged, &["rebuild", "sqlite"], "");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("hash mismatch"), "{}", stderr(&o));
    assert_eq!(ok(&damaged, &["digest", "sqlite"], ""), before);
    // The original is untouched and still verifies.
    ok(&home, &["verify"], "");
}

#[test]
fn random_damage_never_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let home = home_with_needles(dir.path());
    let clean = std::fs::read(home.join("log.redb")).unwrap();
    // Aim at the live events (blocks pack them into a few KiB of a mostly free file), with a page
    // of margin on each side for block footers and the tree around them.
    let find = |needle: &[u8]| {
        clean
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    let lo = find(b"needle-000").saturating_sub(4096);
    let hi = (find(b"needle-049") + 4096).min(clean.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut failed = 0;
    for round in 0..60 {
        let damaged = dir.path().join(format!("d{round}"));
        copy_home(&home, &damaged);
        let mut bytes = clean.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(lo..hi);
            bytes[i] ^= 1 << rng.random_range(0..8);
        }
        std::fs::write(damaged.join("log.redb"), &bytes).unwrap();
        for args in [&["verify"][..], &["log"][..], &["status"][..]] {
            let o = spool(&damaged, args, "");
            let code = o.status.code();
            assert!(
                matches!(code, Some(0) | Some(1)),
                "round {round} {args:?}: exit {:?}\n{}",
                o.status,
                stderr(&o)
            );
            // A panic is a bug, said as such (and Rust's own hook says "panicked").
            let said = stderr(&o);
            assert!(
                !said.contains("a bug") && !said.contains("panicked"),
                "{said}"
            );
            if args == ["verify"] && code == Some(1) {
                failed += 1;
            }
        }
        std::fs::remove_dir_all(&damaged).unwrap();
    }
    eprintln!("random damage: verify failed on {failed} of 60 damaged copies");
    assert!(
        failed >= 20,
        "verify caught only {failed} of 60 flips aimed at live events"
    );
}
