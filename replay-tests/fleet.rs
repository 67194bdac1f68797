//! A fleet of three nodes as separate network hosts on this machine (issue 26): each daemon in a
//! network namespace of its own, the three joined by veth links to a bridge in a fourth, made
//! and removed by the test with `ip` (iproute2; `ops/ensure-iproute2`; needs root, as CI runs).
//! The nodes write at once while the test cuts one node off for a while, flaps another's link
//! and SIGKILLs a daemon mid-sync; at the end every node holds the same events, each once, the
//! same tables, and verifies. A host outside the fleet and a plaintext client are refused.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{activity, ok, spool};

/// Network namespaces and links made for one test, removed when dropped.
struct Net {
    prefix: String,
    subnet: u8,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {} (the fleet test makes network namespaces: it needs root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// `hosts` namespaces, each with `eth0` at 10.SUBNET.0.(i+1)/24 on one bridge.
    fn new(hosts: usize) -> Net {
        let prefix = format!("sp{:06x}", rand::random::<u32>() & 0xff_ffff);
        let subnet = 100 + (rand::random::<u8>() % 150);
        let mut net = Net {
            prefix: prefix.clone(),
            subnet,
            hosts: Vec::new(),
        };
        let switch = format!("{prefix}-sw");
        ip(&["netns", "add", &switch]);
        net.hosts.push(switch.clone());
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = net.host(i);
            ip(&["netns", "add", &ns]);
            net.hosts.push(ns.clone());
            let port = net.port(i);
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            let address = format!("{}/24", net.address(i));
            ip(&["-n", &ns, "addr", "add", &address, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn host(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// The bridge's end of host `i`'s link.
    fn port(&self, i: usize) -> String {
        format!("{}p{i}", self.prefix)
    }

    fn address(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, i + 1)
    }

    /// Cuts host `i` off the bridge (`false`) or joins it again.
    fn link(&self, i: usize, up: bool) {
        let switch = format!("{}-sw", self.prefix);
        let state = if up { "up" } else { "down" };
        ip(&["-n", &switch, "link", "set", &self.port(i), state]);
    }

    /// A command run on host `i`.
    fn on(&self, i: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.host(i), program]);
        command
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

const PORT: u16 = 7420;

/// Starts `spool serve` for `home` on host `i` and waits for its socket.
fn start(net: &Net, i: usize, home: &Path) -> Child {
    // A killed daemon's socket is left behind: the new one's is waited for.
    let _ = std::fs::remove_file(home.join("spool.sock"));
    daemon::start_with(net.on(i, common::SPOOL), home)
}

fn heads(home: &Path) -> Value {
    serde_json::from_str(&ok(home, &["heads", "--json"], "")).unwrap()
}

#[test]
fn three_hosts_converge_through_partitions_flaps_and_a_killed_daemon() {
    let net = Net::new(4);
    let dir = tempfile::tempdir().unwrap();
    let labels = ["desk", "pi", "vm", "stranger"];
    let homes: Vec<PathBuf> = labels
        .iter()
        .map(|label| {
            let home = dir.path().join(label);
            ok(&home, &["init", "--label", label], "");
            home
        })
        .collect();
    let config = |i: usize| {
        let mut config = format!("\n[peer]\nlisten = \"{}:{PORT}\"\n", net.address(i));
        for j in (0..3).filter(|&j| j != i) {
            config.push_str(&format!(
                "\n[[peers]]\naddress = \"{}:{PORT}\"\n",
                net.address(j)
            ));
        }
        config
    };
    // The desk starts the fleet; the Pi and the VM pair into it by code, each from its own
    // host, over the desk's door.
    std::fs::write(homes[0].join("spool.toml"), config(0)).unwrap();
    let mut daemons: Vec<Option<Child>> = vec![Some(start(&net, 0, &homes[0])), None, None];
    for i in 1..3 {
        let minted: Value =
            serde_json::from_str(ok(&homes[0], &["pair", "code", "--json"], "").trim()).unwrap();
        let out = net
            .on(i, common::SPOOL)
            .arg("--home")
            .arg(&homes[i])
            .args([
                "pair",
                "join",
                minted["address"].as_str().unwrap(),
                minted["code"].as_str().unwrap(),
                "--origin",
                minted["fingerprint"].as_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(homes[i].join("spool.toml"), config(i)).unwrap();
        daemons[i] = Some(start(&net, i, &homes[i]));
    }
    let fleet: Value = serde_json::from_str(&ok(&homes[0], &["fleet", "--json"], "")).unwrap();
    assert_eq!(fleet["members"].as_array().unwrap().len(), 3, "{fleet}");

    // Writers on every node at once, a batch every few milliseconds, while the links change.
    let written: Vec<u64> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..3)
            .map(|i| {
                let home = &homes[i];
                s.spawn(move || {
                    let mut acknowledged = 0;
                    for round in 0..40 {
                        let lines: String = (0..5)
                            .map(|k| {
                                activity("board", &format!("{} {round} {k}", labels[i])) + "\n"
                            })
                            .collect();
                        // A write refused while its daemon is down (killed below) is retried.
                        loop {
                            let out = spool(home, &["append"], &lines);
                            if out.status.success() {
                                acknowledged += 5;
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    acknowledged
                })
            })
            .collect();
        // The VM is cut off for a while.
        std::thread::sleep(Duration::from_millis(500));
        net.link(2, false);
        std::thread::sleep(Duration::from_secs(2));
        net.link(2, true);
        // The Pi's link flaps.
        for _ in 0..5 {
            net.link(1, false);
            std::thread::sleep(Duration::from_millis(150));
            net.link(1, true);
            std::thread::sleep(Duration::from_millis(150));
        }
        // The desk's daemon is killed mid-sync, and started again.
        if let Some(mut desk) = daemons[0].take() {
            desk.kill().unwrap();
            desk.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        daemons[0] = Some(start(&net, 0, &homes[0]));
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(written, vec![200, 200, 200]);

    // Every node ends with every event.
    let started = Instant::now();
    loop {
        let all: Vec<Value> = homes[..3].iter().map(|h| heads(h)).collect();
        if all.windows(2).all(|w| w[0] == w[1]) && all[0].as_object().unwrap().len() == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no convergence: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each acknowledged event exactly once, in every node's tables; the same tables everywhere.
    for home in &homes[..3] {
        for label in &labels[..3] {
            let out = ok(
                home,
                &[
                    "sql",
                    &format!(
                        "SELECT count(*) AS n, count(DISTINCT message) AS d FROM activity_log \
                         WHERE message LIKE '{label} %'"
                    ),
                ],
                "",
            );
            let counts: Value = serde_json::from_str(out.trim()).unwrap();
            assert_eq!(
                (counts["n"].as_u64(), counts["d"].as_u64()),
                (Some(200), Some(200))
            );
        }
    }
    let digests: Vec<String> = homes[..3]
        .iter()
        .map(|h| ok(h, &["digest", "sqlite"], ""))
        .collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");

    // A host outside the fleet is refused, and learns nothing.
    let desk_door = format!("{}:{PORT}", net.address(0));
    let out = net
        .on(3, common::SPOOL)
        .arg("--home")
        .arg(&homes[3])
        .args(["sync", "peer", &desk_door, "--once"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS handshake"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(heads(&homes[3]), serde_json::json!({}));
    // A plaintext client gets no HTTP answer.
    let plain = net
        .on(3, "bash")
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/{PORT}; printf 'GET /v1/heads HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n' >&3; timeout 15 cat <&3",
                net.address(0)
            ),
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains("HTTP/1.1"),
        "{plain:?}"
    );
    for daemon in daemons.into_iter().flatten() {
        daemon::stop(daemon);
    }
    for home in &homes[..3] {
        ok(home, &["verify"], "");
    }
}
