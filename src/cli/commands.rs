//! One function per command. Each opens what it needs, does one thing, and prints.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use spool::event::Origin;
use spool::files::{Existing, NewFile};
use spool::home::{Home, SERVE_TOKEN};
use spool::input::{self, AppendRequest, InputError};
use spool::kinds;
use spool::node::{self, Local, Node};
use spool::project::sqlite::Sqlite;
use spool::serve::client::Remote;
use spool::wire::{ExportRequest, LogQuery, PostgresRequest, RebuildRequest};

use spool::home::HomeError;
use spool::log::LogError;

use super::{
    AppendArgs, BackfillCommand, Cli, Command, DigestCommand, ExportArgs, FleetCommand, LogArgs,
    ProjectCommand, RebuildCommand, Retry, SchemaCommand, SyncCommand, Usage,
};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Demo { dir, seed } = cli.command {
        return super::demo::run(dir, seed);
    }
    let home = match cli.home {
        Some(dir) => dir,
        None => default_home()?,
    };
    match cli.command {
        Command::Init { label } => init(&home, label),
        Command::Serve { http } => serve(&home, http),
        Command::Append(args) => append(&home, args),
        Command::Log(args) => log(&home, args),
        Command::Verify { json } => verify(&home, json),
        Command::Status { json } => status(&home, json),
        Command::Schema(SchemaCommand::List { json }) => schema_list(json),
        Command::Schema(SchemaCommand::Show { kind, version }) => schema_show(&kind, version),
        Command::Heads { json } => heads(&home, json),
        Command::Export(args) => export(&home, args),
        Command::Ingest { file, json } => ingest(&home, file, json),
        Command::Rebuild(RebuildCommand::Sqlite { into, as_of, json }) => {
            rebuild(&home, into, as_of, json)
        }
        Command::Project(ProjectCommand::Postgres {
            url,
            follow,
            held_bytes_max,
            json,
        }) => project_postgres(&home, &url, follow, held_bytes_max, json),
        Command::Backfill(BackfillCommand::Postgres {
            url,
            held_bytes_max,
            json,
        }) => backfill_postgres(&home, &url, held_bytes_max, json),
        Command::Digest(DigestCommand::Sqlite { db, json }) => digest(&home, db, json),
        Command::Sql { statement, db } => sql(&home, &statement, db),
        Command::Sync(SyncCommand::Hub { url, once, json }) => {
            super::hub::run(&home, &url, once, json)
        }
        Command::Sync(SyncCommand::Peer {
            address,
            origin,
            once,
            json,
        }) => super::peer::run(&home, &address, origin.as_deref(), once, json),
        Command::Pair { command, json } => super::pair::run(&home, command, json),
        Command::Vault(command) => super::vault::run(&home, command),
        Command::Fleet {
            command: None,
            json,
        } => super::fleet::show(&home, json),
        Command::Fleet {
            command:
                Some(FleetCommand::Admit {
                    key,
                    capabilities,
                    label,
                    json,
                }),
            ..
        } => super::fleet::admit(&home, &key, capabilities, label, json),
        Command::Fleet {
            command:
                Some(FleetCommand::Revoke {
                    origin,
                    reason,
                    json,
                }),
            ..
        } => super::fleet::revoke(&home, &origin, reason, json),
        Command::Fleet {
            command: Some(FleetCommand::Join { file, root, json }),
            ..
        } => super::fleet::join(&home, &file, root, json),
        Command::Demo { .. } => unreachable!("handled above"),
    }
}

fn default_home() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .ok_or_else(|| Usage("no home directory: give --home DIR or set SPOOL_HOME".into()))?;
    Ok(PathBuf::from(home).join(".spool"))
}

fn init(dir: &Path, label: Option<String>) -> anyhow::Result<ExitCode> {
    let label = label.unwrap_or_else(host_name);
    let home = Home::init(dir, &label)?;
    writeln!(stdout(), "{}", home.origin())?;
    eprintln!(
        "spool: node {:?} created in {}",
        home.label(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

fn serve(dir: &Path, http: Option<std::net::SocketAddr>) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    let log = home.open_log()?;
    let socket = home.dir().join(spool::serve::SOCKET);
    let http = match http {
        Some(addr) => Some((addr, serve_token(home.dir())?)),
        None => None,
    };
    eprintln!(
        "spool serve: node {} ({}), socket {}{}",
        home.origin(),
        home.label(),
        socket.display(),
        http.as_ref().map_or(String::new(), |(a, _)| format!(
            ", http://{a} (bearer token in {})",
            home.dir().join(SERVE_TOKEN).display()
        ))
    );
    spool::serve::run(
        log,
        spool::serve::Options {
            socket,
            http,
            places: home.places(),
            name: spool::wire::NodeName {
                id: home.origin(),
                label: home.label().to_owned(),
            },
            access: home.config().serve.clone(),
            key: home.node_key()?.map(std::sync::Arc::new),
            hub: std::env::var("SPOOL_HUB_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .or_else(|| home.config().hub.url.clone()),
            peer_listen: home.config().peer.listen,
            peers: home.config().peers.clone(),
        },
    )?;
    eprintln!("spool serve: stopped; everything acknowledged is durable");
    Ok(ExitCode::SUCCESS)
}

fn serve_token(dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(SERVE_TOKEN);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(token)
}

/// Where the node's log is reached: the daemon when one answers on the socket, else the log
/// opened in this process.
pub(super) enum Reach {
    Local(Box<Local>),
    Daemon(Remote),
}

impl Reach {
    pub(super) fn node(&mut self) -> &mut dyn Node {
        match self {
            Reach::Local(local) => local.as_mut(),
            Reach::Daemon(remote) => remote,
        }
    }

    /// After a write from this process, brings the node's projection up to the log's end (the
    /// daemon keeps its own current). The events are already durable, so a failure here is a
    /// warning with the way out, never a failed write.
    pub(super) fn refresh_projection(&self) {
        if let Reach::Local(local) = self {
            if let Err(problem) = local.catch_up() {
                eprintln!("spool: warning: the projection was not updated ({problem})");
            }
        }
    }
}

/// The node in `dir`, reached through its daemon when one runs. A program of another user in
/// the socket's group reaches the daemon without reading anything else of the home.
pub(super) fn reach(dir: &Path) -> anyhow::Result<Reach> {
    let socket = dir.join(spool::serve::SOCKET);
    match socket.try_exists() {
        Ok(true) => {
            if let Some(remote) = Remote::connect(&socket)? {
                return Ok(Reach::Daemon(remote));
            }
        }
        Ok(false) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow::bail!(
                "{}: permission denied: this user may not enter the node's home; run as \
                 the daemon's user, or set `[serve] socket_group` (and `socket_mode = \"0660\"`) \
                 in spool.toml and join that group",
                socket.display()
            );
        }
        Err(e) => return Err(e.into()),
    }
    let home = Home::open(dir)?;
    let started = std::time::Instant::now();
    loop {
        match Local::open(home.clone()) {
            Ok(local) => return Ok(Reach::Local(Box::new(local))),
            // Another spool process holds the log for a moment (a `project --follow` pass, a
            // rebuild): wait a bounded time, going through a daemon if one starts meanwhile.
            Err(HomeError::Log(LogError::Locked { path })) => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(Retry(format!(
                        "{}: another spool process has held the log for {} s; retry (or run \
                         `spool serve`, which lets every command share it)",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    ))
                    .into());
                }
                std::thread::sleep(Duration::from_millis(50));
                if let Ok(true) = socket.try_exists() {
                    if let Some(remote) = Remote::connect(&socket)? {
                        return Ok(Reach::Daemon(remote));
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long a command waits for another spool process to let go of the log.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Standard output, buffered. A reader that closed it (`spool log | head`) ends the command
/// quietly: `main` treats the broken pipe as success.
pub(super) fn stdout() -> BufWriter<std::io::StdoutLock<'static>> {
    BufWriter::new(std::io::stdout().lock())
}

/// One JSON line.
pub(super) fn json_line(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn append(dir: &Path, args: AppendArgs) -> anyhow::Result<ExitCode> {
    // The stdin lines of the requests (a refusal names the line), or none for flags.
    let (requests, lines): (Vec<AppendRequest>, Option<Vec<usize>>) = match args.kind {
        Some(kind) => {
            let data_text = args.data.unwrap_or_default();
            let data: Value = serde_json::from_str(&data_text).map_err(|e| InputError::Field {
                field: "data".into(),
                problem: format!("not valid JSON: {e}"),
            })?;
            let request = AppendRequest {
                kind,
                stream: args.stream.unwrap_or_default(),
                actor: args.actor.unwrap_or_default(),
                data,
                key: args.key,
                correlation: args.correlation,
                causation: args.causation,
            };
            (vec![request], None)
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(Usage(
                    "give --kind, --stream, --actor and --data, or pipe JSON lines on stdin".into(),
                )
                .into());
            }
            let read = input::read_lines(stdin.lock(), |number, text| {
                Ok((input::parse_append(text)?, number))
            })?;
            let (requests, lines) = read.into_iter().unzip();
            (requests, Some(lines))
        }
    };
    let mut reach = reach(dir)?;
    let acks = reach.node().append(requests).map_err(|mut problem| {
        // A line of stdin is named by its number, as a refusal of `parse_append` is.
        // A batch from stdin names the line; one event from flags has no place to name.
        if let Some(line) = problem
            .index
            .take()
            .and_then(|i| lines.as_ref()?.get(i).copied())
        {
            problem.message = format!("line {line}: {}", problem.message);
        }
        problem
    })?;
    let mut out = stdout();
    for ack in &acks {
        json_line(&mut out, ack)?;
    }
    out.flush()?;
    reach.refresh_projection();
    Ok(ExitCode::SUCCESS)
}

fn log(dir: &Path, args: LogArgs) -> anyhow::Result<ExitCode> {
    let origin = args
        .origin
        .as_deref()
        .map(Origin::from_hex)
        .transpose()
        .map_err(|e| Usage(format!("--origin: {e}")))?;
    let mut reach = reach(dir)?;
    let mut query = LogQuery {
        after: args.after,
        limit: None,
        stream: args.stream,
        kind: args.kind,
        origin,
    };
    let mut remaining = args.limit.unwrap_or(u64::MAX);
    let mut out = stdout();
    while remaining > 0 {
        query.limit = Some(remaining.min(node::LOG_PAGE_EVENTS as u64));
        let page = reach.node().log(&query)?;
        for event in page.events.iter().take(remaining as usize) {
            json_line(&mut out, event)?;
            remaining -= 1;
        }
        match page.next {
            Some(next) => query.after = next,
            None => break,
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let mut reach = reach(dir)?;
    let report = reach.node().verify()?;
    let mut out = stdout();
    if as_json {
        json_line(&mut out, &report)?;
    } else if report.ok {
        writeln!(
            out,
            "ok: {} events of {} origins and {} signed heads, {} bytes, checked in {:.3} s ({:.0} events/s)",
            report.events,
            report.origins,
            report.signatures,
            report.bytes,
            report.seconds,
            report.events as f64 / report.seconds.max(1e-9)
        )?;
        if report.refused > 0 {
            writeln!(
                out,
                "note: {} refused event(s) kept as evidence; `spool status` names them",
                report.refused
            )?;
        }
    } else {
        if let Some((first, rest)) = report.problems.split_first() {
            writeln!(out, "FAILED: {}", first.message)?;
            for p in rest {
                writeln!(out, "  also: {}", p.message)?;
            }
        }
        writeln!(
            out,
            "{} problem(s) in {} events of {} origins",
            report.problems_total, report.events, report.origins
        )?;
    }
    out.flush()?;
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let mut reach = reach(dir)?;
    let status = reach.node().status()?;
    let mut out = stdout();
    if as_json {
        json_line(&mut out, &status)?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let through = match status.daemon {
        Some(_) => " (through spool serve)",
        None => "",
    };
    writeln!(out, "node    {} ({})", status.node.id, status.node.label)?;
    writeln!(out, "home    {}{through}", status.home)?;
    writeln!(out, "events  {}", status.events)?;
    writeln!(out, "file    {} bytes", status.file_bytes)?;
    writeln!(out, "heads   {} origin(s)", status.heads.len())?;
    for h in &status.heads {
        let mark = if h.local { " (this node)" } else { "" };
        writeln!(out, "  {}  seq {}  {}{mark}", h.origin, h.seq, h.hash)?;
    }
    writeln!(
        out,
        "waiting {} shipped event(s) wait for their dependencies",
        status.waiting
    )?;
    for f in &status.forks {
        let held = f.held.map_or("none".to_owned(), |h| h.to_hex());
        writeln!(
            out,
            "FORK    origin {} seq {}: holds {held}, refused {} (kept as evidence)",
            f.id.origin, f.id.seq, f.refused
        )?;
    }
    for r in &status.refused {
        writeln!(
            out,
            "REFUSED origin {} seq {} ({}): {} (kept as evidence)",
            r.id.origin, r.id.seq, r.hash, r.reason
        )?;
    }
    if status.refused_count > status.refused.len() as u64 {
        writeln!(
            out,
            "REFUSED and {} more (`spool status --json` lists the first {})",
            status.refused_count - status.refused.len() as u64,
            status.refused.len()
        )?;
    }
    match &status.fleet {
        Some(fleet) => writeln!(
            out,
            "fleet   root {}, {} member(s), {} revoked (`spool fleet` lists them)",
            fleet.root,
            fleet.members.len(),
            fleet.members.iter().filter(|m| m.revoked.is_some()).count()
        )?,
        None => writeln!(
            out,
            "fleet   none: this home was made before node keys and takes every origin's events unsigned"
        )?,
    }
    if let Some(reason) = &status.halted {
        writeln!(out, "HALTED  own writes are stopped: {reason}")?;
    }
    if status.unreadable > 0 {
        writeln!(
            out,
            "UNREADABLE {} events of kinds this build cannot read: upgrade spool \
             (they are kept; a rebuild projects them then)",
            status.unreadable
        )?;
    }
    if let Some(d) = &status.daemon {
        writeln!(
            out,
            "writer  {} commits, {} events since it started",
            d.commits, d.appended
        )?;
        writeln!(
            out,
            "projection at position {}, {} events behind",
            d.projected, d.lag_events
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn heads(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let mut reach = reach(dir)?;
    let mut out = stdout();
    if as_json {
        let heads = reach.node().heads()?;
        json_line(&mut out, &heads)?;
    } else {
        let status = reach.node().status()?;
        // With a daemon that syncs with a hub, what the hub holds of each origin beside it.
        let hub = status.daemon.and_then(|d| d.hub);
        let origins = hub.as_ref().map(|h| &h.origins);
        for h in &status.heads {
            write!(out, "{}  seq {}  {}", h.origin, h.seq, h.hash)?;
            match origins.and_then(|o| o.get(&h.origin)) {
                Some(o) => writeln!(out, "  hub seq {} ({} behind)", o.hub_holds, o.lag)?,
                None => writeln!(out)?,
            }
        }
        let held = |origin| status.heads.iter().any(|h| h.origin == origin);
        for (origin, o) in origins.into_iter().flatten().filter(|(o, _)| !held(**o)) {
            writeln!(
                out,
                "{origin}  none held  hub seq {} ({} behind)",
                o.hub_holds, o.lag
            )?;
        }
        if let Some(hub) = &hub {
            for (origin, o) in &hub.origins {
                if let Some(why) = &o.refused {
                    writeln!(out, "REFUSED from the hub: origin {origin}: {why}")?;
                }
            }
            if let Some(error) = &hub.last_error {
                writeln!(out, "hub: the last attempt failed: {error}")?;
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn export(dir: &Path, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let request = ExportRequest {
        origins: args.origin,
        since: args.since,
    };
    // Checked before anything is written.
    node::selection(&request).map_err(|p| match p.field.as_deref() {
        Some("/origins") => Usage(format!("--origin: {}", p.message)),
        _ => Usage(format!("--since: {}", p.message)),
    })?;
    if args.out.is_none() && std::io::stdout().is_terminal() {
        return Err(
            Usage("the export is binary: redirect it to a file or give --out FILE".into()).into(),
        );
    }
    let mut reach = reach(dir)?;
    let count = match &args.out {
        Some(path) => {
            // Written into a file of its own beside the target and moved over it whole, so a
            // reader never sees half a file; only a regular file is replaced, and a failed
            // export removes only the file it made.
            let mut partial = NewFile::create(path, Existing::ReplaceRegular)
                .map_err(|e| Usage(format!("--out {e}")))?;
            let mut out = BufWriter::new(partial.file());
            let count = reach.node().export(&request, &mut out)?;
            out.flush()?;
            drop(out);
            partial.place()?;
            count
        }
        None => {
            let mut out = stdout();
            let count = reach.node().export(&request, &mut out)?;
            out.flush()?;
            count
        }
    };
    eprintln!("spool: exported {count} events");
    Ok(ExitCode::SUCCESS)
}

pub(super) fn ingest(dir: &Path, file: Option<PathBuf>, as_json: bool) -> anyhow::Result<ExitCode> {
    let input: Box<dyn std::io::Read + Send> = match &file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(Usage("give an export file, or pipe one on stdin".into()).into());
            }
            Box::new(std::io::BufReader::new(stdin))
        }
    };
    let mut reach = reach(dir)?;
    let summary = reach.node().ingest(input)?;
    reach.refresh_projection();
    let mut out = stdout();
    if as_json {
        json_line(&mut out, &summary)?;
    } else {
        writeln!(
            out,
            "read {} events: {} applied, {} waiting for their dependencies, {} already held",
            summary.read, summary.applied, summary.waited, summary.duplicates
        )?;
        if summary.released > 0 {
            writeln!(
                out,
                "{} waiting events were released and applied",
                summary.released
            )?;
        }
        if summary.clamped > 0 {
            writeln!(
                out,
                "{} stamps were far ahead of this node's clock and were clamped",
                summary.clamped
            )?;
        }
    }
    out.flush()?;
    match summary.stopped {
        Some(why) => Err(Usage(why).into()),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The projection to read: `--db`, or the node's, holding every event the log held when asked.
fn projection(dir: &Path, db: Option<PathBuf>) -> anyhow::Result<Sqlite> {
    let path = match db {
        Some(path) => path,
        None => reach(dir)?.node().projection()?,
    };
    if !path.is_file() {
        return Err(Usage(format!("{}: no such projection file", path.display())).into());
    }
    Ok(Sqlite::open_read_only(&path)?)
}

/// How often `--follow` looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

fn project_postgres(
    dir: &Path,
    url: &str,
    follow: bool,
    held_bytes_max: Option<usize>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let request = PostgresRequest {
        url: url.to_owned(),
        held_bytes_max,
    };
    // Projecting from the file, one connection serves every pass.
    let mut held: Option<Reach> = None;
    let mut out = stdout();
    loop {
        let reach = match &mut held {
            Some(reach) => reach,
            None => match self::reach(dir) {
                Ok(reach) => held.insert(reach),
                // Another spool command has the log for a moment: look again at the next tick.
                Err(e) if follow && is_locked(&e) => {
                    std::thread::sleep(FOLLOW_POLL);
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let summary = with_bar("projecting", |progress| {
            reach.node().project_postgres(&request, progress)
        })?;
        if summary.applied > 0 || !follow {
            if as_json {
                json_line(&mut out, &summary)?;
            } else {
                writeln!(
                    out,
                    "projected {} events into Postgres up to position {} in {:.2} s ({} applied there by this node in all)",
                    summary.applied, summary.position, summary.seconds, summary.events
                )?;
            }
            out.flush()?;
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        // The daemon's socket is asked again each pass: a daemon started meanwhile takes over.
        if let Some(Reach::Daemon(_)) = held {
            held = None;
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

fn is_locked(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Retry>().is_some()
}

fn backfill_postgres(
    dir: &Path,
    url: &str,
    held_bytes_max: Option<usize>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let request = PostgresRequest {
        url: url.to_owned(),
        held_bytes_max,
    };
    let mut reach = reach(dir)?;
    let summary = with_bar("backfilling", |progress| {
        reach.node().backfill_postgres(&request, progress)
    })?;
    let mut out = stdout();
    if as_json {
        json_line(&mut out, &summary)?;
    } else {
        if summary.resumed_from > 0 {
            writeln!(
                out,
                "resumed the backfill from position {}",
                summary.resumed_from
            )?;
        }
        writeln!(
            out,
            "backfilled {} events up to position {} (pinned at {}, {} from the tail) and swapped the tables in; this run applied {} in {:.2} s ({:.0} events/s)",
            summary.events, summary.position, summary.pinned, summary.tail, summary.applied,
            summary.seconds, summary.events_per_second
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn schema_list(as_json: bool) -> anyhow::Result<ExitCode> {
    let mut out = stdout();
    for kind in kinds::CATALOGUE {
        let description = kind.description().replace('\n', " ");
        if as_json {
            json_line(
                &mut out,
                &json!({
                    "kind": kind.name,
                    "version": kind.version,
                    "readable": kind.readable,
                    "description": description,
                }),
            )?;
        } else {
            let versions = match kind.readable {
                [_] => String::new(),
                all => format!(" (reads {all:?})"),
            };
            let name_version = format!("{} v{}{versions}", kind.name, kind.version);
            writeln!(out, "{name_version:<42} {description}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn schema_show(name: &str, version: Option<u16>) -> anyhow::Result<ExitCode> {
    let current = kinds::lookup(name).ok_or_else(|| InputError::UnknownKind(name.to_owned()))?;
    let version = version.unwrap_or(current.version);
    let spec = std::iter::once(current)
        .chain(kinds::SUPERSEDED.iter().copied())
        .find(|k| k.name == name && k.version == version)
        .ok_or_else(|| {
            let readable = current.readable;
            Usage(format!(
                "{name} has no version {version} (it reads {readable:?})"
            ))
        })?;
    write!(stdout(), "{}", spec.schema)?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a job with a progress bar on standard error, cleared when it ends.
fn with_bar<T>(
    what: &str,
    job: impl FnOnce(node::ProgressFn) -> Result<T, spool::wire::Problem>,
) -> Result<T, spool::wire::Problem> {
    let bar = progress_bar(0, what);
    let result = job(&mut shown(&bar));
    bar.finish_and_clear();
    result
}

/// A job's progress (events done, events in all) shown on `bar`.
fn shown(bar: &indicatif::ProgressBar) -> impl FnMut(u64, u64) + '_ {
    |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}

/// A progress bar on standard error (hidden when it is not a terminal) with rate and ETA.
fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} events, {{per_sec}}, ETA {{eta}}"
        ))
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

fn rebuild(
    dir: &Path,
    into: Option<PathBuf>,
    as_of: Option<String>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    // The daemon's working directory is not ours: it is given an absolute path.
    let into = into.map(std::path::absolute).transpose()?;
    let request = RebuildRequest { into, as_of };
    let mut reach = reach(dir)?;
    let summary = with_bar("rebuilding", |progress| {
        reach.node().rebuild(&request, progress)
    })?;
    let mut out = stdout();
    if as_json {
        json_line(&mut out, &summary)?;
    } else {
        writeln!(
            out,
            "rebuilt {}: {} events up to position {} in {:.2} s ({:.0} events/s)",
            summary.path.display(),
            summary.applied,
            summary.position,
            summary.seconds,
            summary.events_per_second
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn digest(dir: &Path, db: Option<PathBuf>, as_json: bool) -> anyhow::Result<ExitCode> {
    let projection = projection(dir, db)?;
    let (position, _, events) = projection.checkpoint()?;
    let (hash, counts) = projection.digest()?;
    let mut out = stdout();
    if as_json {
        let tables: serde_json::Map<String, Value> =
            counts.into_iter().map(|(t, n)| (t, n.into())).collect();
        let digest =
            json!({"digest": hash, "position": position, "events": events, "tables": tables});
        json_line(&mut out, &digest)?;
    } else {
        writeln!(out, "{hash}  ({events} events up to position {position})")?;
        for (table, n) in counts {
            writeln!(out, "  {table:<20} {n} rows")?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn sql(dir: &Path, statement: &str, db: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut projection = projection(dir, db)?;
    let mut out = stdout();
    let mut failed = None;
    projection
        .query(statement, |names, values| {
            if failed.is_some() {
                return;
            }
            let row: serde_json::Map<String, Value> = names.iter().cloned().zip(values).collect();
            if let Err(e) = writeln!(out, "{}", Value::Object(row)) {
                failed = Some(e);
            }
        })
        .map_err(|e| Usage(format!("sql: {e}")))?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
