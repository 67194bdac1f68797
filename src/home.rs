//! A node's home directory: its identity (`node.toml`), its config (`spool.toml`) and its log
//! (`log.redb`).
//!
//! Invariant: a directory is a spool home exactly when it holds a readable `node.toml`; a node's
//! origin id is made once, at `init`, and is the one its log was created with.
//!
//! Boundary: knows toml and the file system; opens the log through `log::Log`.

use std::path::{Path, PathBuf};

use crate::event::Origin;
use crate::identity::{origin_of, NodeKey, PublicKey};
use crate::log::{Log, LogError, LogOptions};

pub const NODE_FILE: &str = "node.toml";
pub const CONFIG_FILE: &str = "spool.toml";
pub const LOG_FILE: &str = "log.redb";
/// The node's signing key (`identity::NodeKey`): mode 0600, never copied, logged or exported.
pub const KEY_FILE: &str = "node.key";
/// The HTTP listener's bearer token (mode 0600), made by `spool serve --http`.
pub const SERVE_TOKEN: &str = "serve.token";
/// Upper bound on a node label, in bytes.
pub const LABEL_BYTES_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("{0} is not a spool home (no {NODE_FILE}); create one with `spool init --home {0}`")]
    NotAHome(PathBuf),
    #[error("{0} is already a spool home")]
    AlreadyAHome(PathBuf),
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("label: {0}")]
    BadLabel(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Key(#[from] crate::identity::IdentityError),
}

/// `node.toml`.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    id: String,
    label: String,
    /// The public half of `node.key` (64 hex digits); the id is bound to it. Absent in a home
    /// made before nodes had keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// The origin id of the root of the fleet this node joined (`spool fleet join`). Absent: the
    /// node is the root of its own fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fleet: Option<String>,
}

/// `spool.toml`. Every key is optional; unknown keys are refused by name.
#[derive(serde::Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub writer: WriterConfig,
    pub clock: ClockConfig,
    pub log: LogConfig,
    pub jobs: JobsConfig,
    pub serve: ServeConfig,
    pub hub: HubConfig,
    pub peer: PeerConfig,
    pub peers: Vec<PeerEntry>,
}

/// `[peer]`: the door other members of the fleet sync through (TLS with the node keys).
#[derive(serde::Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PeerConfig {
    /// The address `spool serve` listens on for peers, e.g. "0.0.0.0:7420".
    pub listen: Option<std::net::SocketAddr>,
}

/// Peers listed in `spool.toml`, at most.
pub const PEERS_MAX: usize = 64;

/// `[[peers]]`: a member of the fleet `spool serve` keeps this node synced with.
#[derive(serde::Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// Where it listens: "host:port" (a name is looked up at each connection).
    pub address: String,
    /// Its origin id (32 hex digits), if only that member may answer there; otherwise any
    /// current member of the fleet may.
    #[serde(default)]
    pub origin: Option<String>,
}

/// `[hub]`: the fleet's Postgres hub, which `spool serve` keeps this node synced with.
#[derive(serde::Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Its connection string (or `SPOOL_HUB_URL`; see README, "The hub").
    pub url: Option<String>,
}

/// `[serve]`: who may use the daemon's socket besides its own user.
#[derive(serde::Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// A group whose members may connect to the socket (and read the HTTP token).
    pub socket_group: Option<String>,
    /// The socket's mode: "0600" (the default: the daemon's user only) or "0660" (and the
    /// group).
    pub socket_mode: Option<String>,
}

impl ServeConfig {
    /// The socket's mode bits; a mode other than 0600 or 0660 is refused by name.
    pub fn mode(&self) -> Result<u32, String> {
        match self.socket_mode.as_deref() {
            None | Some("0600") | Some("600") => Ok(0o600),
            Some("0660") | Some("660") => Ok(0o660),
            Some(_) => Err("serve.socket_mode must be \"0600\" or \"0660\"".into()),
        }
    }
}

/// `[jobs]`: where jobs run for a client (`spool rebuild --into`) may write besides the home.
#[derive(serde::Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    pub dir: Option<PathBuf>,
}

/// Every bounded setting: its key, its value, and the range it must lie in. A value outside is
/// refused by name with the range, before anything is opened: a queue of 2^40 requests or a
/// cache of 2^63 bytes is never tried.
const MIB: u64 = 1024 * 1024;

impl Config {
    fn ranges(&self) -> [(&'static str, u64, std::ops::RangeInclusive<u64>); 6] {
        let n = |v: usize| v as u64;
        [
            (
                "writer.group_events_max",
                n(self.writer.group_events_max),
                1..=100_000,
            ),
            (
                "writer.group_bytes_max",
                n(self.writer.group_bytes_max),
                MIB..=1024 * MIB,
            ),
            (
                "writer.queue_requests_max",
                n(self.writer.queue_requests_max),
                1..=65_536,
            ),
            (
                "clock.max_drift_ms",
                self.clock.max_drift_ms,
                0..=7 * 24 * 3_600_000,
            ),
            (
                "log.cache_bytes",
                n(self.log.cache_bytes),
                MIB..=16 * 1024 * MIB,
            ),
            (
                "log.kernel_cache_bytes",
                self.log.kernel_cache_bytes,
                0..=1024 * 1024 * MIB,
            ),
        ]
    }

    /// The first setting outside its range, as a sentence naming the key and the range.
    pub fn check(&self) -> Result<(), String> {
        let mode = self.serve.mode()?;
        if mode == 0o660 && self.serve.socket_group.is_none() {
            return Err("serve.socket_mode \"0660\" needs serve.socket_group".into());
        }
        if self.peers.len() > PEERS_MAX {
            return Err(format!("peers: at most {PEERS_MAX} are listed"));
        }
        for (i, peer) in self.peers.iter().enumerate() {
            let port = peer.address.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
            if peer.address.len() > 255 || !matches!(port, Some(Ok(p)) if p > 0) {
                return Err(format!(
                    "peers[{i}].address must be host:port (a name or an address, and a port)"
                ));
            }
            if let Some(origin) = &peer.origin {
                if crate::event::Origin::from_hex(origin).is_err() {
                    return Err(format!("peers[{i}].origin must be 32 hex digits"));
                }
            }
        }
        for (key, value, range) in self.ranges() {
            if !range.contains(&value) {
                return Err(format!(
                    "{key} must be from {} to {}",
                    range.start(),
                    range.end()
                ));
            }
        }
        Ok(())
    }
}

#[derive(serde::Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub cache_bytes: usize,
    pub kernel_cache_bytes: u64,
}

/// How much of the end of a node's log file stays in the kernel's page cache (`LogOptions`'
/// own default, for a log opened without a home, is all of it).
pub const KERNEL_CACHE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(serde::Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct WriterConfig {
    pub group_events_max: usize,
    pub group_bytes_max: usize,
    pub queue_requests_max: usize,
}

#[derive(serde::Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    pub max_drift_ms: u64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        let d = LogOptions::default();
        WriterConfig {
            group_events_max: d.group_events_max,
            group_bytes_max: d.group_bytes_max,
            queue_requests_max: d.queue_requests_max,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            cache_bytes: LogOptions::default().cache_bytes,
            kernel_cache_bytes: KERNEL_CACHE_BYTES,
        }
    }
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            max_drift_ms: LogOptions::default().max_drift_ms,
        }
    }
}

const CONFIG_TEMPLATE: &str = "\
# spool node configuration. Every key is optional; the values shown are the defaults.

[writer]
# Most events and payload bytes one group commit holds (a larger request commits alone).
# group_events_max = 1000
# group_bytes_max = 67108864
# Append requests that may wait for the writer before appenders block or are told to retry.
# queue_requests_max = 1024

[clock]
# A stamp from another node further ahead of this node's clock than this is clamped and reported.
# max_drift_ms = 60000

[log]
# The log file's page cache, shared by the writer and this process's readers.
# cache_bytes = 67108864
# How much of the end of the log file stays in the kernel's page cache as it grows (0: all of it).
# kernel_cache_bytes = 268435456

[jobs]
# A folder where `spool rebuild sqlite --into` may write new files besides the home.
# dir = \"/srv/spool-rebuilds\"

[serve]
# A group whose members' programs may use `spool serve`'s socket (and read serve.token):
# the socket gets this group and socket_mode, and the home becomes traversable by the group.
# socket_group = \"spool\"
# socket_mode = \"0660\"
";

/// An opened node home.
#[derive(Clone, Debug)]
pub struct Home {
    dir: PathBuf,
    origin: Origin,
    /// The public key the origin is bound to (`node.toml`), if the node has a key.
    public_key: Option<PublicKey>,
    /// The root of its fleet (`None`: a home made before keys takes every origin's events).
    fleet_root: Option<Origin>,
    label: String,
    config: Config,
}

impl Home {
    /// Makes `dir` a new node home with a fresh origin id and an empty log.
    pub fn init(dir: &Path, label: &str) -> Result<Home, HomeError> {
        check_label(label)?;
        if dir.join(NODE_FILE).exists() {
            return Err(HomeError::AlreadyAHome(dir.to_owned()));
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| HomeError::Io { path, source }
        };
        create_private_dir(dir).map_err(io(dir))?;
        // The node's key, and the origin bound to it. A key left by a failed init is used again.
        let key_path = dir.join(KEY_FILE);
        let key = match key_path.exists() {
            true => NodeKey::load(&key_path)?,
            false => {
                let key = NodeKey::generate();
                key.save_new(&key_path)?;
                key
            }
        };
        let origin = key.origin();
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.exists() {
            std::fs::write(&config_path, CONFIG_TEMPLATE).map_err(io(&config_path))?;
        }
        let home = Home {
            dir: dir.to_owned(),
            origin,
            public_key: Some(key.public()),
            fleet_root: Some(origin),
            label: label.to_owned(),
            config: Config::default(),
        };
        drop(Log::create(&home.log_path(), origin, home.log_options())?);
        // node.toml last: until it exists the directory is not a home, so a failed init can be
        // run again.
        let node = NodeFile {
            id: origin.to_hex(),
            label: label.to_owned(),
            key: Some(key.public().to_hex()),
            fleet: None,
        };
        write_node_file(dir, &node)?;
        Ok(home)
    }

    /// Makes `root` the root of this node's fleet (`node.toml`), for `spool fleet join`: from
    /// its next opening, the log takes only the events of that fleet's members.
    pub fn join_fleet(&mut self, root: Origin) -> Result<(), HomeError> {
        let node = NodeFile {
            id: self.origin.to_hex(),
            label: self.label.clone(),
            key: self.public_key.map(|k| k.to_hex()),
            fleet: (root != self.origin).then(|| root.to_hex()),
        };
        write_node_file(&self.dir, &node)?;
        self.fleet_root = Some(root);
        Ok(())
    }

    /// Opens an existing node home.
    pub fn open(dir: &Path) -> Result<Home, HomeError> {
        let node_path = dir.join(NODE_FILE);
        let text = match std::fs::read_to_string(&node_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HomeError::NotAHome(dir.to_owned()))
            }
            Err(source) => {
                return Err(HomeError::Io {
                    path: node_path,
                    source,
                })
            }
        };
        let bad = |path: &Path, message: String| HomeError::BadFile {
            path: path.to_owned(),
            message,
        };
        let node: NodeFile = toml::from_str(&text).map_err(|e| bad(&node_path, e.to_string()))?;
        let origin = Origin::from_hex(&node.id).map_err(|e| bad(&node_path, format!("id: {e}")))?;
        let public_key = match &node.key {
            None => None,
            Some(text) => {
                let key =
                    PublicKey::from_hex(text).map_err(|e| bad(&node_path, format!("key: {e}")))?;
                if origin_of(&key) != origin {
                    return Err(bad(
                        &node_path,
                        "key: the id is not the one bound to this key".into(),
                    ));
                }
                Some(key)
            }
        };
        let config_path = dir.join(CONFIG_FILE);
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                let config: Config =
                    toml::from_str(&text).map_err(|e| bad(&config_path, e.to_string()))?;
                config.check().map_err(|e| bad(&config_path, e))?;
                config
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(source) => {
                return Err(HomeError::Io {
                    path: config_path,
                    source,
                })
            }
        };
        let fleet_root = match (&public_key, &node.fleet) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(bad(
                    &node_path,
                    "fleet: a node without a key cannot be in a fleet".into(),
                ))
            }
            (Some(_), None) => Some(origin),
            (Some(_), Some(text)) => {
                Some(Origin::from_hex(text).map_err(|e| bad(&node_path, format!("fleet: {e}")))?)
            }
        };
        Ok(Home {
            dir: dir.to_owned(),
            origin,
            public_key,
            fleet_root,
            label: node.label,
            config,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// The node's signing key; `None` for a home made before nodes had keys (its origin is
    /// not bound to a key).
    pub fn node_key(&self) -> Result<Option<NodeKey>, HomeError> {
        let path = self.key_path();
        if !path.exists() {
            return Ok(None);
        }
        let key = NodeKey::load(&path)?;
        if key.origin() != self.origin {
            return Err(HomeError::BadFile {
                path,
                message: format!(
                    "the key is bound to origin {}, not to this node ({})",
                    key.origin(),
                    self.origin
                ),
            });
        }
        Ok(Some(key))
    }

    /// Where jobs may write: the home, and `[jobs] dir`.
    pub fn places(&self) -> crate::jobs::Places {
        crate::jobs::Places {
            home: self.dir.clone(),
            dir: self.config.jobs.dir.clone(),
        }
    }

    /// The node's SQLite projection, kept current after every append and ingest.
    pub fn projection_path(&self) -> PathBuf {
        self.dir.join(crate::jobs::PROJECTION)
    }

    pub fn log_options(&self) -> LogOptions {
        LogOptions {
            max_drift_ms: self.config.clock.max_drift_ms,
            group_events_max: self.config.writer.group_events_max,
            group_bytes_max: self.config.writer.group_bytes_max,
            queue_requests_max: self.config.writer.queue_requests_max,
            cache_bytes: self.config.log.cache_bytes,
            kernel_cache_bytes: self.config.log.kernel_cache_bytes,
            signer: self.public_key.map(|k| k.0),
            fleet_root: self.fleet_root,
            ..LogOptions::default()
        }
    }

    /// Opens this node's log.
    pub fn open_log(&self) -> Result<Log, HomeError> {
        Ok(Log::open(
            &self.log_path(),
            self.origin,
            self.log_options(),
        )?)
    }

    /// The public key this node's origin is bound to, if it has a key.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.public_key
    }

    /// The root of this node's fleet; `None` for a home made before keys.
    pub fn fleet_root(&self) -> Option<Origin> {
        self.fleet_root
    }
}

/// Writes `node.toml` whole (a rename: a crash leaves the old file or the new one).
fn write_node_file(dir: &Path, node: &NodeFile) -> Result<(), HomeError> {
    let text = format!(
        "# This node's identity. Never copy it to another node: two nodes with one id fork the log.\n{}",
        toml::to_string(node).expect("a node file serializes")
    );
    let node_path = dir.join(NODE_FILE);
    write_atomically(&node_path, text.as_bytes()).map_err(|source| HomeError::Io {
        path: node_path.clone(),
        source,
    })
}

fn check_label(label: &str) -> Result<(), HomeError> {
    if label.is_empty() || label.len() > LABEL_BYTES_MAX || label.chars().any(char::is_control) {
        return Err(HomeError::BadLabel(format!(
            "{label:?} must be 1 to {LABEL_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes a file so that a crash leaves either the old one or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_open() {
        let dir = tempfile::tempdir().unwrap();
        let home_dir = dir.path().join("node");
        let home = Home::init(&home_dir, "pi").unwrap();
        let again = Home::open(&home_dir).unwrap();
        assert_eq!(again.origin(), home.origin());
        assert_eq!(again.label(), "pi");
        again.open_log().unwrap();
        assert!(matches!(
            Home::init(&home_dir, "pi"),
            Err(HomeError::AlreadyAHome(_))
        ));
    }

    #[test]
    fn the_shipped_configs_hold_the_defaults_and_the_log_cache_is_set_from_spool_toml() {
        let d = LogOptions::default();
        for text in [CONFIG_TEMPLATE, include_str!("../ops/spool.toml.example")] {
            let config: Config = toml::from_str(text).unwrap();
            assert_eq!(config.log.cache_bytes, d.cache_bytes);
            assert_eq!(config.log.kernel_cache_bytes, KERNEL_CACHE_BYTES);
            assert_eq!(config.writer.group_events_max, d.group_events_max);
            assert_eq!(config.writer.group_bytes_max, d.group_bytes_max);
            assert_eq!(config.writer.queue_requests_max, d.queue_requests_max);
            assert_eq!(config.clock.max_drift_ms, d.max_drift_ms);
        }
        let dir = tempfile::tempdir().unwrap();
        let home_dir = dir.path().join("node");
        Home::init(&home_dir, "pi").unwrap();
        let home = Home::open(&home_dir).unwrap();
        assert_eq!(home.log_options().kernel_cache_bytes, KERNEL_CACHE_BYTES);
        std::fs::write(
            home_dir.join(CONFIG_FILE),
            "[log]\ncache_bytes = 1048576\nkernel_cache_bytes = 0\n",
        )
        .unwrap();
        let home = Home::open(&home_dir).unwrap();
        assert_eq!(home.log_options().cache_bytes, 1 << 20);
        assert_eq!(home.log_options().kernel_cache_bytes, 0);
        home.open_log().unwrap();
    }

    #[test]
    fn refusals_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let err = Home::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is not a spool home"), "{err}");
        assert!(matches!(
            Home::init(&dir.path().join("x"), ""),
            Err(HomeError::BadLabel(_))
        ));
        let home = dir.path().join("n");
        Home::init(&home, "n").unwrap();
        std::fs::write(home.join(CONFIG_FILE), "[writer]\ngroup_event_max = 5\n").unwrap();
        let err = Home::open(&home).unwrap_err().to_string();
        assert!(
            err.contains("spool.toml") && err.contains("group_event_max"),
            "{err}"
        );
    }

    #[test]
    fn settings_out_of_range_are_refused_by_key_with_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("n");
        Home::init(&home, "n").unwrap();
        for (text, key) in [
            (
                "[writer]\nqueue_requests_max = 1099511627777\n",
                "writer.queue_requests_max",
            ),
            (
                "[writer]\nqueue_requests_max = 0\n",
                "writer.queue_requests_max",
            ),
            (
                "[writer]\ngroup_events_max = 0\n",
                "writer.group_events_max",
            ),
            (
                "[writer]\ngroup_bytes_max = 9223372036854775807\n",
                "writer.group_bytes_max",
            ),
            (
                "[log]\ncache_bytes = 9223372036854775807\n",
                "log.cache_bytes",
            ),
            (
                "[log]\nkernel_cache_bytes = 9223372036854775807\n",
                "log.kernel_cache_bytes",
            ),
            (
                "[clock]\nmax_drift_ms = 9223372036854775807\n",
                "clock.max_drift_ms",
            ),
        ] {
            std::fs::write(home.join(CONFIG_FILE), text).unwrap();
            let err = Home::open(&home).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(" to "), "{text}: {err}");
            assert!(
                !err.contains("9223372036854775807") && !err.contains("1099511627777"),
                "{err}"
            );
        }
        std::fs::write(
            home.join(CONFIG_FILE),
            "[writer]\nqueue_requests_max = 65536\n",
        )
        .unwrap();
        Home::open(&home).unwrap().open_log().unwrap();
    }

    #[test]
    fn socket_sharing_is_checked_by_name() {
        let config = |text: &str| toml::from_str::<Config>(text).unwrap().check();
        assert_eq!(config(""), Ok(()));
        assert_eq!(
            config("[serve]\nsocket_group = \"spool\"\nsocket_mode = \"0660\"\n"),
            Ok(())
        );
        let refused = config("[serve]\nsocket_mode = \"0666\"\n").unwrap_err();
        assert!(refused.contains("serve.socket_mode must be"), "{refused}");
        assert!(
            !refused.contains("0666"),
            "the value is not echoed: {refused}"
        );
        let refused = config("[serve]\nsocket_mode = \"0660\"\n").unwrap_err();
        assert!(refused.contains("needs serve.socket_group"), "{refused}");
    }
}
