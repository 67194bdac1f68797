//! Argument parsing, output and exit codes. The only place that uses clap and anyhow.

mod commands;
mod demo;
mod fleet;
mod hub;
mod pair;
mod peer;
mod vault;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use spool::home::HomeError;
use spool::input::InputError;

#[derive(Parser, Debug)]
#[command(
    name = "spool",
    version,
    about = "An event-sourced, hash-chained log for a fleet of nodes",
    long_about = None
)]
pub struct Cli {
    /// The node's home directory.
    #[arg(long, global = true, env = "SPOOL_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a node: its identity, config and empty log. Prints the node id.
    Init {
        /// A human label for the node (default: the host name).
        #[arg(long)]
        label: Option<String>,
    },
    /// Append one event from flags, or a batch of JSON lines from stdin (all or nothing).
    Append(AppendArgs),
    /// Print events as JSON lines.
    Log(LogArgs),
    /// Check every chain, archive and index. Exit 1 on any problem.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Print the node, its heads per origin, the event count and the file size.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The event catalogue: kinds, versions and JSON Schemas.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Print the version vector: the highest seq held of each origin (--json: the form
    /// `export --since` takes). Through a daemon that syncs with a hub, each line also says what
    /// the hub holds of the origin (`status --json`: `daemon.hub.origins`).
    Heads {
        #[arg(long)]
        json: bool,
    },
    /// Write events as an export file (stdout or --out): every origin's, those of --origin, or
    /// only what --since lacks.
    Export(ExportArgs),
    /// Rebuild a projection from the log (into a new file, then swapped in).
    #[command(subcommand)]
    Rebuild(RebuildCommand),
    /// Keep a database's tables current from this node's log (from its checkpoint there).
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Build a database's tables anew from this node's log beside the live ones, then swap
    /// them in at once (resumes after an interruption).
    #[command(subcommand)]
    Backfill(BackfillCommand),
    /// A canonical hash of a projection's rows: equal on every node holding equal events.
    #[command(subcommand)]
    Digest(DigestCommand),
    /// Run one read-only SQL statement on the node's projection; rows as JSON lines.
    Sql {
        statement: String,
        /// Another projection file (default: the node's, brought up to date first).
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
    },
    /// A week of the seed's activity on three nodes in fresh homes, exchanged with export
    /// files, projected and verified; prints what it did and where to look.
    Demo {
        /// Where to create the three homes (default: a new temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run the node's writer: a JSON API on the Unix socket `spool.sock` in the home (and
    /// with --http on a loopback address, bearer token in `serve.token`), keeping the
    /// projection live, until SIGTERM or SIGINT.
    Serve {
        /// Also serve HTTP on this loopback address (e.g. 127.0.0.1:7421).
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
    },
    /// Sync with the fleet's Postgres hub: push what it lacks, pull what this node lacks.
    #[command(subcommand)]
    Sync(SyncCommand),
    /// The vault: secrets encrypted on this machine with age to every recipient before they
    /// become events (see README, "The vault").
    #[command(subcommand)]
    Vault(VaultCommand),
    /// Pairing codes: a member mints one (through its daemon, whose `[peer] listen` door takes
    /// the join); a new device joins the fleet with it. Without a subcommand: this node's codes.
    Pair {
        #[command(subcommand)]
        command: Option<PairCommand>,
        #[arg(long)]
        json: bool,
    },
    /// The fleet this node takes events from: members, keys, who admitted whom, who is revoked.
    Fleet {
        #[command(subcommand)]
        command: Option<FleetCommand>,
        #[arg(long)]
        json: bool,
    },
    /// Apply an export file (a path, or stdin) in causal order.
    Ingest {
        /// The export file (default: standard input).
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SyncCommand {
    /// Push this node's events to the hub and pull what it lacks (every pulled event checked as
    /// an ingested file's are); without --once, again whenever another node pushes (LISTEN) or
    /// every 30 s, reconnecting with backoff, until interrupted.
    Hub {
        /// The hub's connection string (TLS as `sslmode` says; see README, "The hub").
        #[arg(long, env = "SPOOL_HUB_URL", hide_env_values = true)]
        url: String,
        /// One push and one pull, then exit (2 if an origin's pull was refused).
        #[arg(long)]
        once: bool,
        #[arg(long)]
        json: bool,
    },
    /// Exchange events with a peer over TLS with the node keys, both directions at once (each
    /// side must be a current member of the other's fleet); without --once, again every 30 s,
    /// reconnecting with backoff, until interrupted. While `spool serve` runs, list the peer
    /// in `[[peers]]` of spool.toml instead.
    Peer {
        /// Where the peer listens (`[peer] listen` there): host:port.
        address: String,
        /// Accept only this member there (its origin id, 32 hex digits).
        #[arg(long)]
        origin: Option<String>,
        /// One exchange, then exit (2 if either side refused the other's events).
        #[arg(long)]
        once: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VaultCommand {
    /// Make the install: the Argon2id salt and parameters every device's identity is sealed
    /// with (`vault.install_initialised`).
    Init {
        #[arg(long)]
        json: bool,
    },
    /// This device's identity.
    #[command(subcommand)]
    Identity(VaultIdentityCommand),
    /// Encrypt the secret read from standard input (or a hidden prompt) to every current
    /// recipient and write it as NAME (`vault.entry_written`).
    Put {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Decrypt NAME with this device's identity; the access is logged (`vault.entry_unlocked`)
    /// before the secret is printed.
    Get {
        name: String,
        /// A file holding the passphrase (else SPOOL_VAULT_PASSPHRASE, else a prompt).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Why it is read (kept in the access log).
        #[arg(long)]
        purpose: Option<String>,
    },
    /// Remove NAME (`vault.entry_removed`): it is no longer listed or read, and its row keeps
    /// no ciphertext. The log keeps what was written before: rotate the secret where it is
    /// used if a copy may have leaked.
    Rm {
        name: String,
        /// Why (kept with the removal).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The entries: names, their recipients, and which carry a removed recipient.
    List {
        #[arg(long)]
        json: bool,
    },
    /// The current recipients.
    Recipients {
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a recipient; every entry is then rewrapped to the new set.
    #[command(subcommand)]
    Recipient(VaultRecipientCommand),
    /// Rewrap every entry this device can read to the current recipients (after a device
    /// registered itself with `vault identity new`, or a rewrap was cut short).
    Rewrap {
        /// A file holding this device's passphrase (else SPOOL_VAULT_PASSPHRASE, else a prompt).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VaultRecipientCommand {
    /// Add an age X25519 recipient (`age1…`, from `age-keygen` or another device's
    /// `vault identity new`) and rewrap every entry this device can read to include it.
    Add {
        key: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        label: String,
        /// A file holding this device's passphrase (else SPOOL_VAULT_PASSPHRASE, else a prompt).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a recipient (its id or fingerprint) and rewrap every entry without it.
    Remove {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// A file holding this device's passphrase (else SPOOL_VAULT_PASSPHRASE, else a prompt).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VaultIdentityCommand {
    /// Make this device's age identity, sealed under a passphrase in `vault.identity` (0600,
    /// never in the log), and register its public key as a recipient (`vault.recipient_added`).
    New {
        #[arg(long)]
        label: Option<String>,
        /// A file holding the passphrase (else SPOOL_VAULT_PASSPHRASE, else a prompt).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PairCommand {
    /// Mint a code (8 characters, 60 minutes, one device; at most 3 pending) and print it with
    /// this node's address and fingerprint.
    Code {
        /// The device it is for (recorded with the pairing).
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a pending code.
    Cancel { pairing_id: String },
    /// On a new device (a fresh home, no daemon running): present CODE to the member at
    /// ADDRESS, whose key must hash to --origin (the fingerprint it printed); once admitted,
    /// take the fleet's log and list the member in `[[peers]]`.
    Join {
        address: String,
        code: String,
        /// The member's fingerprint (its origin id, 32 hex digits).
        #[arg(long)]
        origin: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCommand {
    /// Admit a node by its public key (64 hex digits) or its node.toml: a `device.paired`
    /// event; every member that receives it takes the node's events from then on.
    Admit {
        /// The node's public key, or the path of its node.toml.
        key: String,
        /// What it may do, comma-separated (default: sync).
        #[arg(long, value_delimiter = ',')]
        capabilities: Vec<String>,
        /// A label (default: the node file's, or its origin's first digits).
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a member: a `device.revoked` event; its events after the last one this node
    /// holds are refused by every node that receives it. For good: a revoked key is never
    /// admitted again.
    Revoke {
        /// The member's origin (32 hex digits; `spool fleet` lists them).
        origin: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Join the fleet whose export FILE admits this node (its root is found by following the
    /// admissions back), then ingest it. Stop `spool serve` first.
    Join {
        file: PathBuf,
        /// Refuse unless the fleet's root is this origin (as a member's `spool fleet` shows).
        #[arg(long, value_name = "ORIGIN")]
        root: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RebuildCommand {
    /// The local SQLite tables.
    Sqlite {
        /// Write here (default: the node's projection, replaced when done).
        #[arg(long, value_name = "PATH")]
        into: Option<PathBuf>,
        /// Only the events up to this log position, or stamped at or before this RFC 3339
        /// time (requires --into).
        #[arg(long, value_name = "POS|RFC3339", requires = "into")]
        as_of: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ProjectCommand {
    /// The Supabase table families in a Postgres database (schema created if absent).
    Postgres {
        /// A connection string: `postgresql://user@host/db` or `host=/run/postgresql dbname=db`.
        #[arg(long, env = "SPOOL_PG_URL", hide_env_values = true)]
        url: String,
        /// Keep going: apply new events as they are appended, until interrupted.
        #[arg(long)]
        follow: bool,
        /// Memory for merged rows before a commit (default 64 MiB); smaller commits more often.
        #[arg(long, value_name = "BYTES")]
        held_bytes_max: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BackfillCommand {
    /// The Supabase table families: shadow tables by binary COPY up to the log's end, then one
    /// transaction swaps them in (this node's checkpoint comes along; other nodes re-apply).
    Postgres {
        /// A connection string: `postgresql://user@host/db` or `host=/run/postgresql dbname=db`.
        #[arg(long, env = "SPOOL_PG_URL", hide_env_values = true)]
        url: String,
        /// Memory for merged rows before a commit (default 256 MiB); smaller commits more often.
        #[arg(long, value_name = "BYTES")]
        held_bytes_max: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DigestCommand {
    /// The local SQLite tables.
    Sqlite {
        /// Another projection file (default: the node's, brought up to date first).
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A version vector (`spool heads --json` of the receiving node, or origin:seq,...):
    /// export only what it lacks.
    #[arg(long, value_name = "VECTOR")]
    since: Option<String>,
    /// Only this origin's events (32 hex digits); repeatable.
    #[arg(long, value_name = "HEX")]
    origin: Vec<String>,
    /// Write here instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum SchemaCommand {
    /// One line per kind: name, current version, readable versions, what it records.
    List {
        #[arg(long)]
        json: bool,
    },
    /// The JSON Schema of a kind (its current version, or --version N of a superseded one).
    Show {
        kind: String,
        #[arg(long)]
        version: Option<u16>,
    },
}

#[derive(Args, Debug)]
pub struct AppendArgs {
    /// Event kind, e.g. activity.logged (without it, events are read from stdin).
    #[arg(long, requires_all = ["stream", "actor", "data"])]
    kind: Option<String>,
    /// The aggregate the event belongs to, e.g. task/42.
    #[arg(long, requires = "kind")]
    stream: Option<String>,
    /// Who caused it: a user, an agent, a strand.
    #[arg(long, requires = "kind")]
    actor: Option<String>,
    /// The event's data as a JSON object.
    #[arg(long, requires = "kind")]
    data: Option<String>,
    /// Idempotency key: a repeat returns the first event and writes nothing.
    #[arg(long, requires = "kind")]
    key: Option<String>,
    #[arg(long, requires = "kind")]
    correlation: Option<String>,
    #[arg(long, requires = "kind")]
    causation: Option<String>,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Only events after this position.
    #[arg(long, default_value_t = 0, value_name = "POS")]
    after: u64,
    /// At most this many events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    #[arg(long)]
    stream: Option<String>,
    #[arg(long)]
    kind: Option<String>,
    /// Only events of this origin (32 hex digits).
    #[arg(long, value_name = "HEX")]
    origin: Option<String>,
}

/// A failure that passes: another process held the log for a moment. Exit code 75
/// (`EX_TEMPFAIL`): retry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Retry(String);

/// A failure caused by what the user gave us, not by the system: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(String);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // A panic is a bug: the hook says where (once, as a sentence), and the exit code is 1.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map_or_else(|| "an unknown place".to_owned(), ToString::to_string);
        eprintln!(
            "spool: a bug stopped this command at {location} ({}); please report it. \
             Nothing acknowledged is lost: every write commits whole or not at all.",
            spool::serve::panic_message(info.payload())
        );
    }));
    match std::panic::catch_unwind(|| commands::run(cli)) {
        Ok(Ok(code)) => code,
        // Whoever read the output stopped reading (`spool log | head`): done, quietly.
        Ok(Err(error)) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Ok(Err(error)) => {
            eprintln!("spool: {}", sentence(&error));
            if error.chain().any(|cause| cause.is::<Retry>()) {
                ExitCode::from(75)
            } else if is_bad_input(&error) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// The error and its causes as one sentence.
fn sentence(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(|e| e.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    })
}

fn is_bad_input(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<InputError>()
            || cause.is::<Usage>()
            || cause
                .downcast_ref::<spool::wire::Problem>()
                .is_some_and(|p| p.code.is_bad_request())
            || matches!(
                cause.downcast_ref::<HomeError>(),
                Some(
                    HomeError::NotAHome(_)
                        | HomeError::AlreadyAHome(_)
                        | HomeError::BadFile { .. }
                        | HomeError::BadLabel(_)
                )
            )
    })
}
