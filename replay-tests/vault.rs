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

/// `spool vault get NAME` with the identity's passphrase read from `pass` (a file).
fn vault_get(home: &Path, name: &str, pass: &str) -> std::process::Output {
    spool(home, &["vault", "get", name, "--passphrase-file", pass], "")
}

/// As [`vault_get`], which must succeed: the secret printed.
fn vault_got(home: &Path, name: &str, pass: &str) -> String {
    ok(home, &["vault", "get", name, "--passphrase-file", pass], "")
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
    let got = vault_got(home, "supabase-service-key", &file);
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
    let out = vault_get(&home, "github-token", &file);
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
    // The reproduction: a fingerprint that is no key's.
    let key = spool::vault::Identity::generate().recipient();
    let added = |fingerprint: &str| {
        serde_json::json!({
            "kind": "vault.recipient_added", "stream": "vault/recipients", "actor": "a",
            "data": {"recipient_id": "rcp-x", "device_id": "x", "label": "main",
                     "public_key": key, "fingerprint": fingerprint}
        })
        .to_string()
            + "\n"
    };
    let out = spool(&home, &["append"], &added(&format!("{:064x}", 7)));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("data/fingerprint") && said.contains("not the fingerprint of public_key"),
        "{said}"
    );
    // An entry encrypted to a key that is no registered recipient's, then registered, then
    // removed: refused, taken, refused.
    let real = spool::vault::fingerprint(&key);
    let entry = serde_json::json!({
        "kind": "vault.entry_written", "stream": "vault/x", "actor": "a",
        "data": {"entry_id": "x", "ciphertext": spool::vault::encrypt(b"s", std::slice::from_ref(&key)).unwrap(),
                 "recipients": [real]}
    })
    .to_string()
        + "\n";
    let out = spool(&home, &["append"], &entry);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("data/recipients/0: is not the fingerprint of a registered vault recipient"),
        "{said}"
    );
    ok(&home, &["append"], &added(&real));
    ok(&home, &["append"], &entry);
    let removed = serde_json::json!({
        "kind": "vault.recipient_removed", "stream": "vault/recipients", "actor": "a",
        "data": {"recipient_id": "rcp-x", "fingerprint": real}
    });
    ok(&home, &["append"], &(removed.to_string() + "\n"));
    // Through the daemon: the same refusal, as JSON naming the field, and nothing written.
    let served = daemon::start(common::SPOOL, &home);
    let before = ok(&home, &["heads", "--json"], "");
    let out = spool(&home, &["append"], &entry);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("data/recipients/0") && said.contains("removed vault recipient"),
        "{said}"
    );
    assert_eq!(ok(&home, &["heads", "--json"], ""), before);
    daemon::stop(served);
}

/// `vault rm`: the entry is no longer listed or read, its row keeps no ciphertext, and a `put`
/// writes it again.
#[test]
fn a_removed_entry_is_gone_from_the_list_and_the_tables_until_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let home = vault_home(dir.path(), "desk", "p");
    let pass = passphrase_file(dir.path(), "p");
    ok(&home, &["vault", "put", "old-token"], "s-1");
    ok(&home, &["vault", "put", "kept"], "s-2");
    let said = ok(
        &home,
        &["vault", "rm", "old-token", "--reason", "rotated"],
        "",
    );
    assert!(said.contains("rotate the secret"), "{said}");
    let listed = ok(&home, &["vault", "list", "--json"], "");
    assert!(
        !listed.contains("old-token") && listed.contains("kept"),
        "{listed}"
    );
    let out = vault_get(&home, "old-token", &pass);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no entry old-token"));
    let out = spool(&home, &["vault", "rm", "old-token"], "");
    assert!(!out.status.success(), "a second rm finds no entry");
    let row = ok(
        &home,
        &["sql", "SELECT ciphertext, recipients, removed_at IS NOT NULL AS removed, remove_reason FROM vault_entries WHERE entry_id = 'old-token'"],
        "",
    );
    let row: Value = serde_json::from_str(row.trim()).unwrap();
    assert_eq!(row["ciphertext"], Value::Null, "{row}");
    assert_eq!(row["recipients"], Value::Null, "{row}");
    assert_eq!(row["removed"], 1, "{row}");
    assert_eq!(row["remove_reason"], "rotated", "{row}");
    ok(&home, &["vault", "put", "old-token"], "s-3");
    let got = vault_got(&home, "old-token", &pass);
    assert_eq!(got, "s-3");
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
        let got = vault_got(&home, name, &pass);
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

#[path = "common/pg.rs"]
mod pg;

/// Every file under `dir`, its bytes.
fn files(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// 100 random secrets written through `vault put` (half through the daemon), shipped to another
/// node by file and through the hub, projected into SQLite and Postgres: no secret appears in
/// any file of either home, the Postgres dump, the daemon's log at `SPOOL_LOG=trace`, `/metrics`,
/// the daemon's answers, or the commands' own output other than `get`'s.
#[test]
fn no_secret_appears_in_plaintext_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let desk = vault_home(dir.path(), "desk", "correct horse");
    let pi = dir.path().join("pi");
    ok(&pi, &["init", "--label", "pi"], "");
    common::fleet(&desk, &[&pi]);
    let secrets: Vec<String> = (0..100)
        .map(|i| format!("s{i}-{:032x}", rand::random::<u128>()))
        .collect();
    let mut said = Vec::new();
    let mut run = |home: &Path, args: &[&str], stdin: &str| {
        let out = spool(home, args, stdin);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        said.extend_from_slice(&out.stdout);
        said.extend_from_slice(&out.stderr);
    };
    for (i, secret) in secrets[..50].iter().enumerate() {
        run(&desk, &["vault", "put", &format!("k-{i}")], secret);
    }
    // The rest through the daemon, its log at trace.
    let daemon_log = dir.path().join("daemon.log");
    let mut command = std::process::Command::new(common::SPOOL);
    command.env("SPOOL_LOG", "trace");
    let served = {
        let log = std::fs::File::create(&daemon_log).unwrap();
        let child = command
            .arg("--home")
            .arg(&desk)
            .arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !desk.join("spool.sock").exists() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child
    };
    for (i, secret) in secrets.iter().enumerate().skip(50) {
        run(&desk, &["vault", "put", &format!("k-{i}")], secret);
    }
    for args in [
        vec!["status", "--json"],
        vec!["log", "--limit", "1000"],
        vec!["vault", "list", "--json"],
        vec!["heads", "--json"],
    ] {
        run(&desk, &args, "");
    }
    let metrics = {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut client = spool::serve::client::Client::connect(&desk.join("spool.sock"))
                .await
                .unwrap();
            client
                .request("GET", "/metrics", Vec::new())
                .await
                .unwrap()
                .1
        })
    };
    // Shipped by file, and through the hub, to the Pi.
    let file = dir.path().join("desk.spool");
    run(&desk, &["export", "--out", file.to_str().unwrap()], "");
    daemon::stop(served);
    run(&pi, &["ingest", file.to_str().unwrap()], "");
    let url = pg::database();
    run(&desk, &["sync", "hub", "--url", &url, "--once"], "");
    run(&pi, &["sync", "hub", "--url", &url, "--once"], "");
    run(&desk, &["project", "postgres", "--url", &url], "");
    run(&pi, &["rebuild", "sqlite"], "");
    let dump = std::process::Command::new(pg::bin_dir().join("pg_dump"))
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let mut everything = Vec::new();
    files(dir.path(), &mut everything);
    everything.push(("pg_dump".into(), dump.stdout));
    everything.push(("/metrics".into(), metrics));
    everything.push(("the commands' output".into(), said));
    let mut looked = 0;
    for secret in &secrets {
        for (place, bytes) in &everything {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "a secret in plaintext in {}",
                place.display()
            );
            looked += 1;
        }
    }
    assert!(looked > 100 * 10, "{looked}");
    // The search finds a secret where one is: `get`'s own output.
    let pass = passphrase_file(dir.path(), "correct horse");
    let got = vault_get(&desk, "k-0", &pass);
    assert!(contains(&got.stdout, secrets[0].as_bytes()));
    // And the secrets are there, encrypted: the Pi's log holds every entry.
    let listed: Value =
        serde_json::from_str(ok(&pi, &["vault", "list", "--json"], "").trim()).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 100, "{listed}");
}

/// A second device of the fleet registers its own identity; once a device that can read the
/// entries rewraps them, the second reads what the first wrote.
#[test]
fn a_second_device_reads_once_it_is_a_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let desk = vault_home(dir.path(), "desk", "desk pass");
    let laptop = dir.path().join("laptop");
    ok(&laptop, &["init", "--label", "laptop"], "");
    let secret = format!("sb_secret_{:016x}", rand::random::<u64>());
    ok(&desk, &["vault", "put", "supabase"], &secret);
    common::fleet(&desk, &[&laptop]);
    let ship = |from: &Path, to: &Path| {
        let file = dir
            .path()
            .join(format!("ship-{}.spool", rand::random::<u32>()));
        ok(from, &["export", "--out", file.to_str().unwrap()], "");
        ok(to, &["ingest", file.to_str().unwrap()], "");
    };
    let laptop_pass = passphrase_file(dir.path(), "laptop pass");
    ok(
        &laptop,
        &[
            "vault",
            "identity",
            "new",
            "--passphrase-file",
            &laptop_pass,
        ],
        "",
    );
    // Not yet: the entry was written before the laptop was a recipient.
    let early = vault_get(&laptop, "supabase", &laptop_pass);
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stderr).contains("not encrypted to this device"));
    ship(&laptop, &desk);
    let desk_pass = passphrase_file(dir.path(), "desk pass");
    ok(
        &desk,
        &["vault", "rewrap", "--passphrase-file", &desk_pass],
        "",
    );
    ship(&desk, &laptop);
    let got = vault_got(&laptop, "supabase", &laptop_pass);
    assert_eq!(got, secret);
}
