//! The vault (issue 27): secrets encrypted with age on this machine before they become events,
//! read back with this device's identity; the access logged before the secret is printed.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::Path;

use serde_json::Value;

use common::{ok, spool};

fn passphrase_file(dir: &Path, text: &str) -> String {
    let path = dir.join(format!("passphrase-{}", rand::random::<u32>()));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A home with an install and an identity sealed under `passphrase`.
fn vault_home(dir: &Path, label: &str, passphrase: &str) -> std::path::PathBuf {
    let home = dir.join(label);
    ok(&home, &["init", "--label", label], "");
    ok(&home, &["vault", "init"], "");
    let file = passphrase_file(dir, passphrase);
    ok(
        &home,
        &["vault", "identity", "new", "--passphrase-file", &file],
        "",
    );
    home
}

fn round_trip(home: &Path, dir: &Path, passphrase: &str) {
    let secret = format!("sb_secret_{:016x}", rand::random::<u64>());
    ok(home, &["vault", "put", "supabase-service-key"], &secret);
    let file = passphrase_file(dir, passphrase);
    let got = ok(
        home,
        &[
            "vault",
            "get",
            "supabase-service-key",
            "--passphrase-file",
            &file,
        ],
        "",
    );
    assert_eq!(got, secret);
    // The log holds ciphertext and the access, never the secret.
    let log = ok(home, &["log", "--stream", "vault/supabase-service-key"], "");
    assert!(!log.contains(&secret), "the secret is in the log");
    assert!(log.contains("vault.entry_written") && log.contains("vault.entry_unlocked"));
    let listed: Value =
        serde_json::from_str(ok(home, &["vault", "list", "--json"], "").trim()).unwrap();
    assert_eq!(listed[0]["entry_id"], "supabase-service-key", "{listed}");
}

#[test]
fn put_and_get_round_trip_without_and_through_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let home = vault_home(dir.path(), "desk", "correct horse");
    round_trip(&home, dir.path(), "correct horse");
    let served = daemon::start(common::SPOOL, &home);
    round_trip(&home, dir.path(), "correct horse");
    daemon::stop(served);
    // The identity file is the owner's only, and holds no identity in the clear.
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(home.join("vault.identity")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let bytes = std::fs::read(home.join("vault.identity")).unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains("AGE-SECRET-KEY"));
}

#[test]
fn a_wrong_passphrase_is_refused_without_a_hint_of_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let home = vault_home(dir.path(), "desk", "correct horse");
    let secret = "ghp_0123456789abcdef";
    ok(&home, &["vault", "put", "github-token"], secret);
    let file = passphrase_file(dir.path(), "battery staple");
    let out = spool(
        &home,
        &["vault", "get", "github-token", "--passphrase-file", &file],
        "",
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("passphrase does not open"), "{said}");
    assert!(!said.contains(secret) && !String::from_utf8_lossy(&out.stdout).contains(secret));
    // Nothing was logged as unlocked.
    let log = ok(&home, &["log", "--stream", "vault/github-token"], "");
    assert!(!log.contains("vault.entry_unlocked"), "{log}");
}

#[test]
fn forged_vault_entries_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let home = vault_home(dir.path(), "desk", "p");
    let fingerprint = "8cd03722eebe24b3c248b79f88ccc009491c250a8d2f0f91f3478ca10dc19c67";
    let forged = serde_json::json!({
        "kind": "vault.entry_written", "stream": "vault/x", "actor": "a",
        "data": {"entry_id": "x", "ciphertext": "-----BEGIN AGE ENCRYPTED FILE-----\nAAAA\n-----END AGE ENCRYPTED FILE-----\n", "recipients": [fingerprint]}
    });
    let out = spool(&home, &["append"], &(forged.to_string() + "\n"));
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("ciphertext") && said.contains("not a parseable age file"),
        "{said}"
    );
}

/// An entry's latest ciphertext, read from the log as any node holds it.
fn ciphertext(home: &Path, name: &str) -> String {
    let log = ok(home, &["log", "--stream", &format!("vault/{name}")], "");
    common::json_lines(&log)
        .iter()
        .rev()
        .find_map(|e| e["data"]["ciphertext"].as_str().map(str::to_owned))
        .expect("a ciphertext")
}

/// `age -d -i IDENTITY` on `armored`: the plaintext, or `None` if age refused.
fn age_decrypt(dir: &Path, identity: &Path, armored: &str) -> Option<String> {
    let file = dir.join(format!("entry-{}.age", rand::random::<u32>()));
    std::fs::write(&file, armored).unwrap();
    let out = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(&file)
        .output()
        .expect("the age command (ops/ensure-age installs it)");
    out.status
        .success()
        .then(|| String::from_utf8(out.stdout).unwrap())
}

/// A recipient made by `age-keygen` is added: every entry is rewrapped to it, and the `age`
/// command decrypts spool's ciphertext with that identity. Once removed, the entries are
/// rewrapped without it: age can no longer decrypt them, this device still can.
#[test]
fn recipients_are_added_and_removed_with_a_rewrap_and_age_reads_the_entries() {
    let dir = tempfile::tempdir().unwrap();
    let home = vault_home(dir.path(), "desk", "correct horse");
    let pass = passphrase_file(dir.path(), "correct horse");
    let secrets: Vec<(String, String)> = (0..3)
        .map(|i| {
            (
                format!("key-{i}"),
                format!("secret-{i}-{:016x}", rand::random::<u64>()),
            )
        })
        .collect();
    for (name, secret) in &secrets {
        ok(&home, &["vault", "put", name], secret);
    }
    let identity = dir.path().join("laptop.agekey");
    let made = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .expect("age-keygen (ops/ensure-age installs it)");
    assert!(made.status.success());
    let public = String::from_utf8_lossy(&made.stderr)
        .split_whitespace()
        .find(|w| w.starts_with("age1"))
        .expect("age-keygen prints the public key")
        .to_owned();
    // Before: not a recipient.
    assert_eq!(
        age_decrypt(dir.path(), &identity, &ciphertext(&home, "key-0")),
        None
    );
    let added: Value = serde_json::from_str(
        ok(
            &home,
            &[
                "vault",
                "recipient",
                "add",
                &public,
                "--device",
                "laptop",
                "--label",
                "old",
                "--passphrase-file",
                &pass,
                "--json",
            ],
            "",
        )
        .trim(),
    )
    .unwrap();
    assert_eq!(
        added["rewrap"]["rewrapped"].as_array().unwrap().len(),
        3,
        "{added}"
    );
    for (name, secret) in &secrets {
        let read = age_decrypt(dir.path(), &identity, &ciphertext(&home, name));
        assert_eq!(read.as_deref(), Some(secret.as_str()), "{name}");
    }
    // Removed: rewrapped without it.
    let id = added["recipient_id"].as_str().unwrap();
    ok(
        &home,
        &[
            "vault",
            "recipient",
            "remove",
            id,
            "--passphrase-file",
            &pass,
        ],
        "",
    );
    for (name, secret) in &secrets {
        assert_eq!(
            age_decrypt(dir.path(), &identity, &ciphertext(&home, name)),
            None,
            "{name}: the removed identity still decrypts it"
        );
        let got = ok(
            &home,
            &["vault", "get", name, "--passphrase-file", &pass],
            "",
        );
        assert_eq!(&got, secret);
    }
    let listed: Value =
        serde_json::from_str(ok(&home, &["vault", "list", "--json"], "").trim()).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["rewrap_due"] == false),
        "{listed}"
    );
}
