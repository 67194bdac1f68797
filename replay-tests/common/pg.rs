//! A throwaway PostgreSQL cluster for the tests: started once per test binary from the server
//! binaries on this machine (`ops/ensure-postgres` installs them), as `nobody` when the tests run
//! as root, listening only on a Unix socket in its own folder, and stopped and removed when the
//! test process exits. `SPOOL_TEST_PG_URL` names a server to use instead. Never skipped: a
//! missing server is a failed test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the cluster may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The admin connection string of the shared cluster.
fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("SPOOL_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => start_cluster(),
    })
}

/// A new, empty database on the cluster; returns its connection string.
pub fn database() -> String {
    let name = format!("t{:016x}", rand::random::<u64>());
    let mut admin = postgres::Client::connect(admin_url(), postgres::NoTls)
        .expect("connect to the test cluster");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create a test database");
    with_dbname(admin_url(), &name)
}

/// `url` with its database replaced by `name` (key=value form).
fn with_dbname(url: &str, name: &str) -> String {
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|part| !part.starts_with("dbname="))
        .collect();
    if url.contains("://") {
        // URL form: replace the path.
        let (base, _) = url.split_once('?').unwrap_or((url, ""));
        let cut = base.rfind('/').expect("a URL with a path");
        return format!("{}/{name}", &base[..cut]);
    }
    format!("{} dbname={name}", kept.join(" "))
}

/// A client connected to `url`.
pub fn connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("connect to the test database")
}

pub fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
    {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !path.is_empty() {
            let real = std::fs::canonicalize(&path).unwrap_or_else(|_| PathBuf::from(&path));
            return real.parent().expect("initdb has a folder").to_owned();
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect(
        "no PostgreSQL server binaries (initdb) on this machine: run ops/ensure-postgres, \
         or set SPOOL_TEST_PG_URL",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program args` as `nobody` when we are root (PostgreSQL refuses to run as root).
fn as_server_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--reset-env",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn start_cluster() -> String {
    start(None).0
}

/// A cluster that also listens on 127.0.0.1 with TLS only (`ssl=on`, `hostssl` lines and no
/// plaintext `host` line), its certificate and key from `tls`; returns its admin URL (over the
/// Unix socket) and its TCP port.
pub fn start_tls(tls: &TlsFiles) -> (String, u16) {
    let (url, port) = start(Some(tls));
    (url, port.expect("a TCP port"))
}

/// A TLS-only cluster (as [`start_tls`]) whose certificate, for `localhost`, is signed by a
/// throwaway CA made here; returns its admin URL, its TCP port and the CA's certificate (PEM).
pub fn start_tls_with_new_ca() -> (String, u16, String) {
    let (ca_pem, ca) = new_ca("spool test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let (admin, port) = start_tls(&TlsFiles {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    });
    (admin, port, ca_pem)
}

/// A throwaway CA: its certificate (PEM) and what signs with it.
pub fn new_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// A server certificate and key (PEM), written into the cluster's folder.
pub struct TlsFiles {
    pub cert_pem: String,
    pub key_pem: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn start(tls: Option<&TlsFiles>) -> (String, Option<u16>) {
    let bin = bin_dir();
    let root = is_root();
    let dir = std::env::temp_dir().join(format!(
        "spool-pg-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let data = dir.join("data");
    std::fs::create_dir_all(&dir).expect("make the cluster folder");
    if root {
        let status = Command::new("chown")
            .args(["nobody:nogroup"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown the cluster folder to nobody");
    }
    let out = as_server_user(root, &bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut listen = "-c listen_addresses=''".to_owned();
    let mut port = None;
    if let Some(tls) = tls {
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert, &tls.cert_pem).unwrap();
        std::fs::write(&key, &tls.key_pem).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if root {
            let status = Command::new("chown")
                .args(["nobody:nogroup"])
                .arg(&cert)
                .arg(&key)
                .status()
                .expect("chown");
            assert!(status.success());
        }
        // TLS or nothing over TCP; the Unix socket stays for the harness itself.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let p = free_port();
        port = Some(p);
        listen = format!(
            "-c listen_addresses=127.0.0.1 -c port={p} -c ssl=on -c ssl_cert_file='{}' \
             -c ssl_key_file='{}'",
            cert.display(),
            key.display()
        );
    }
    // The server runs until this test process exits: a shell watches our pid, then stops the
    // server and removes its folder.
    let postgres = bin.join("postgres");
    let start = if root {
        format!(
            "setpriv --reuid=nobody --regid=nogroup --clear-groups {} ",
            postgres.display()
        )
    } else {
        format!("{} ", postgres.display())
    };
    let fast = match std::env::var("SPOOL_TEST_PG_DURABLE").as_deref() {
        Ok("1") => "",
        _ => "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
    };
    let script = format!(
        "{start} -D '{data}' -k '{dir}' {listen} {fast} -c max_connections=200 \
         >'{dir}/log' 2>&1 & pg=$!; \
         while kill -0 {me} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 0.3; done; \
         kill -INT $pg 2>/dev/null; wait $pg; rm -rf '{dir}'",
        data = data.display(),
        dir = dir.display(),
        me = std::process::id(),
    );
    // Never waited on: the watcher outlives this process by design (it stops the server after).
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
    let url = format!(
        "host={} user=postgres dbname=postgres{}",
        dir.display(),
        port.map_or(String::new(), |p| format!(" port={p}"))
    );
    let started = Instant::now();
    loop {
        if postgres::Client::connect(&url, postgres::NoTls).is_ok() {
            return (url, port);
        }
        assert!(
            started.elapsed() < START_TIMEOUT,
            "the test cluster did not start: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
