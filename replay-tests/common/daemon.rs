//! Starting and stopping `spool serve` for the tests and the serve bench (included by path, as
//! `common/pg.rs` is).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback address: a port taken, read and released.
pub fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// Starts `spool serve` (the binary at `spool`) on `home` and waits for its socket.
pub fn start(spool: &str, home: &Path) -> Child {
    start_with(Command::new(spool), home)
}

/// As [`start`], with `command` running the binary (inside a network namespace, say).
pub fn start_with(mut command: Command, home: &Path) -> Child {
    let child = command
        .arg("--home")
        .arg(home)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = home.join("spool.sock");
    let started = Instant::now();
    while !socket.exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Sends signal `name` (`TERM`, `KILL`) to process `pid`.
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGTERM, then the daemon must drain and exit 0.
pub fn stop(daemon: Child) {
    send_signal(daemon.id(), "TERM");
    let status = daemon.wait_with_output().unwrap().status;
    assert!(status.success(), "exit after SIGTERM: {status}");
}
