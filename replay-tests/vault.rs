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
