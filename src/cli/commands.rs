//! One function per command. Each opens what it needs, does one thing, and prints.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use spool::event::Origin;
use spool::files::{Existing, NewFile};
use spool::home::{Home, SERVE_TOKEN};
use spool::input::{self, AppendRequest, InputError, NewEvent};
use spool::jobs;
use spool::kinds;
use spool::log::{Filter, Log};
use spool::project;
use spool::project::sqlite::{Durability, Sqlite};
use spool::sync::{file as shipping, Selection, Vector};

use super::{
    AppendArgs, BackfillCommand, Cli, Command, DigestCommand, ExportArgs, LogArgs, ProjectCommand,
    RebuildCommand, SchemaCommand, Usage,
};

/// Events read per page by `spool log`: bounds its memory whatever the log's size.
const PAGE_EVENTS: usize = 1000;

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
        Command::Rebuild(RebuildCommand::Sqlite { into, as_of }) => rebuild(&home, into, as_of),
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
    println!("{}", home.origin());
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

fn append(dir: &Path, args: AppendArgs) -> anyhow::Result<ExitCode> {
    // Checked here, whether the daemon or this process then writes them: a refusal names the
    // flag or line either way. The daemon is sent the requests as given.
    let (events, requests): (Vec<NewEvent>, Vec<Value>) = match args.kind {
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
            let sent = json!({"kind": request.kind, "stream": request.stream,
                              "actor": request.actor, "data": request.data, "key": request.key,
                              "correlation": request.correlation, "causation": request.causation});
            (vec![input::new_event(request)?], vec![sent])
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(Usage(
                    "give --kind, --stream, --actor and --data, or pipe JSON lines on stdin".into(),
                )
                .into());
            }
            input::read_lines(stdin.lock(), |text| {
                let event = input::parse_request(text)?;
                let sent =
                    serde_json::from_str(text).map_err(|e| InputError::Json(e.to_string()))?;
                Ok((event, sent))
            })?
            .into_iter()
            .unzip()
        }
    };
    let socket = dir.join(spool::serve::SOCKET);
    if socket.exists() {
        if let Some(code) = append_through_daemon(&socket, &Value::Array(requests))? {
            return Ok(code);
        }
    }
    let home = Home::open(dir)?;
    let log = home.open_log()?;
    let appended = log.append(events)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for a in appended {
        writeln!(out, "{}", serde_json::to_string(&input::appended_json(&a))?)?;
    }
    out.flush()?;
    refresh_projection(&home, &log);
    Ok(ExitCode::SUCCESS)
}

/// Times `append` retries a batch the daemon answered busy.
const BUSY_RETRIES: u32 = 50;

/// Appends through a running `spool serve` (the log is its to write). `None` when no daemon
/// answers on the socket (a stale socket): the caller then opens the log itself.
fn append_through_daemon(socket: &Path, body: &Value) -> anyhow::Result<Option<ExitCode>> {
    let body = serde_json::to_vec(&body)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = runtime.block_on(async {
        let mut client = match spool::serve::client::Client::connect(socket).await {
            Ok(client) => client,
            Err(_) => return Ok(None),
        };
        for attempt in 0.. {
            let (status, reply) = client.request("POST", "/v1/events", body.clone()).await?;
            if status == 503 && attempt < BUSY_RETRIES && reply.windows(4).any(|w| w == b"busy") {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            return Ok::<_, anyhow::Error>(Some((status, reply)));
        }
        unreachable!("the loop returns")
    })?;
    let Some((status, reply)) = answer else {
        return Ok(None);
    };
    let reply: Value = serde_json::from_slice(&reply).context("the daemon's answer")?;
    match status {
        200 => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            for line in reply.as_array().into_iter().flatten() {
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            Ok(Some(ExitCode::SUCCESS))
        }
        400 | 413 => Err(Usage(reply["error"].as_str().unwrap_or("refused").to_owned()).into()),
        _ => anyhow::bail!(
            "spool serve answered {status}: {}",
            reply["error"].as_str().unwrap_or("")
        ),
    }
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

fn log(dir: &Path, args: LogArgs) -> anyhow::Result<ExitCode> {
    let origin = args
        .origin
        .as_deref()
        .map(Origin::from_hex)
        .transpose()
        .map_err(|e| Usage(format!("--origin: {e}")))?;
    let filter = Filter {
        stream: args.stream,
        kind: args.kind,
        origin,
    };
    let home = Home::open(dir)?;
    if let Some(code) = log_through_daemon(dir, args.after, args.limit, &filter)? {
        return Ok(code);
    }
    let log = home.open_log()?;
    let reader = log.read()?;
    let mut remaining = args.limit.unwrap_or(u64::MAX);
    let mut after = args.after;
    let mut out = BufWriter::new(std::io::stdout().lock());
    while remaining > 0 {
        let page = reader.scan(after, PAGE_EVENTS, &filter)?;
        let Some(last) = page.last_examined else {
            break;
        };
        for record in page
            .records
            .iter()
            .take(remaining.min(PAGE_EVENTS as u64) as usize)
        {
            writeln!(out, "{}", input::event_json(record))?;
            remaining -= 1;
        }
        after = last;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `spool log` while the daemon holds the log: the same pages, asked of it. `None` when no
/// daemon answers.
fn log_through_daemon(
    dir: &Path,
    mut after: u64,
    limit: Option<u64>,
    filter: &Filter,
) -> anyhow::Result<Option<ExitCode>> {
    let mut remaining = limit.unwrap_or(u64::MAX);
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut first = true;
    while remaining > 0 {
        let query = serde_urlencoded::to_string([
            ("after", Some(after.to_string())),
            ("limit", Some(remaining.min(PAGE_EVENTS as u64).to_string())),
            ("stream", filter.stream.clone()),
            ("kind", filter.kind.clone()),
            ("origin", filter.origin.map(|o| o.to_hex())),
        ])?;
        let path = format!("/v1/log?{query}");
        let page = match (daemon_get(dir, &path)?, first) {
            (Some(page), _) => page,
            (None, true) => return Ok(None),
            (None, false) => anyhow::bail!("spool serve stopped answering"),
        };
        first = false;
        for event in page["events"].as_array().into_iter().flatten() {
            writeln!(out, "{event}")?;
            remaining -= 1;
        }
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    out.flush()?;
    Ok(Some(ExitCode::SUCCESS))
}

fn verify(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let report = match daemon_get(dir, "/v1/verify")? {
        Some(report) => report,
        None => {
            let home = Home::open(dir)?;
            let log = home.open_log()?;
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            let started = Instant::now();
            let report = log.verify(threads).context("verify")?;
            report.to_json(started.elapsed().as_secs_f64())
        }
    };
    let ok = report["ok"] == true;
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    if as_json {
        println!("{report}");
    } else if ok {
        let seconds = report["seconds"].as_f64().unwrap_or(0.0);
        println!(
            "ok: {} events of {} origins, {} bytes, checked in {seconds:.3} s ({:.0} events/s)",
            n("events"),
            n("origins"),
            n("bytes"),
            n("events") as f64 / seconds.max(1e-9)
        );
    } else {
        let messages: Vec<&str> = report["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["message"].as_str())
            .collect();
        if let Some((first, rest)) = messages.split_first() {
            println!("FAILED: {first}");
            for p in rest {
                println!("  also: {p}");
            }
        }
        println!(
            "{} problem(s) in {} events of {} origins",
            n("problems_total"),
            n("events"),
            n("origins")
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `GET path` from a running `spool serve`: `None` when no daemon answers on the socket.
fn daemon_get(dir: &Path, path: &str) -> anyhow::Result<Option<Value>> {
    let mut body = Vec::new();
    let answered = daemon_call(dir, "GET", path, Vec::new(), |piece| {
        body.extend_from_slice(piece);
        Ok(())
    })?;
    match answered {
        None => Ok(None),
        Some(()) => Ok(Some(
            serde_json::from_slice(&body).context("the daemon's answer")?,
        )),
    }
}

/// One request to a running `spool serve`, handing the answer's body to `piece` as it arrives:
/// `None` when no daemon answers on the socket. A refusal becomes an error with the daemon's
/// reason; a body the daemon cut short (its job failed midway) becomes an error too.
fn daemon_call(
    dir: &Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
    mut piece: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> anyhow::Result<Option<()>> {
    let socket = dir.join(spool::serve::SOCKET);
    if !socket.exists() {
        return Ok(None);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut refusal = Vec::new();
    let answered = runtime.block_on(async {
        let Ok(mut client) = spool::serve::client::Client::connect(&socket).await else {
            return Ok(None);
        };
        client
            .request_streaming(method, path, body, |status, bytes| match status {
                200 => piece(bytes),
                _ => {
                    refusal.extend_from_slice(bytes);
                    Ok(())
                }
            })
            .await
            .map(Some)
    })?;
    match answered {
        None => Ok(None),
        Some(200) => Ok(Some(())),
        Some(status) => {
            let answer: Value = serde_json::from_slice(&refusal).unwrap_or(Value::Null);
            anyhow::bail!(
                "spool serve answered {status}: {}",
                answer["error"].as_str().unwrap_or("")
            )
        }
    }
}

/// Runs a long job in a running `spool serve` (which holds the log), showing its progress:
/// `None` when no daemon answers on the socket.
fn daemon_job(dir: &Path, path: &str, request: Value, what: &str) -> anyhow::Result<Option<Value>> {
    let bar = progress_bar(0, what);
    let mut pending = Vec::new();
    let mut outcome: Option<Value> = None;
    let body = serde_json::to_vec(&request).expect("JSON");
    let answered = daemon_call(dir, "POST", path, body, |piece| {
        pending.extend_from_slice(piece);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let value: Value = serde_json::from_slice(&line)
                .map_err(|e| std::io::Error::other(format!("the daemon's answer: {e}")))?;
            match value.get("progress") {
                Some(p) => shown(&bar)(
                    p["done"].as_u64().unwrap_or(0),
                    p["total"].as_u64().unwrap_or(0),
                ),
                None => outcome = Some(value),
            }
        }
        Ok(())
    });
    bar.finish_and_clear();
    if answered?.is_none() {
        return Ok(None);
    }
    match outcome {
        Some(v) if v.get("result").is_some() => Ok(Some(v["result"].clone())),
        Some(v) => anyhow::bail!("{}", v["error"].as_str().unwrap_or("the job failed")),
        None => anyhow::bail!("spool serve stopped before the job finished"),
    }
}

/// `spool status` while the daemon holds the log: its view, with the writer and projection.
fn status_from_daemon(home: &Home, status: Value, as_json: bool) -> ExitCode {
    if as_json {
        println!("{status}");
        return ExitCode::SUCCESS;
    }
    println!("node    {} ({})", home.origin(), home.label());
    println!("home    {} (through spool serve)", home.dir().display());
    println!("events  {}", status["events"]);
    println!("file    {} bytes", status["file_bytes"]);
    for h in status["heads"].as_array().into_iter().flatten() {
        println!(
            "  {}  seq {}  {}",
            h["origin"].as_str().unwrap_or(""),
            h["seq"],
            h["hash"].as_str().unwrap_or("")
        );
    }
    println!(
        "waiting {} shipped event(s) wait for their dependencies",
        status["waiting"]
    );
    println!(
        "writer  {} commits, {} events since it started",
        status["writer"]["commits"], status["writer"]["events"]
    );
    println!(
        "projection at position {}, {} events behind",
        status["projection"]["position"], status["projection"]["lag_events"]
    );
    if let Some(reason) = status["halted"].as_str() {
        println!("HALTED  own writes are stopped: {reason}");
    }
    print_unreadable(status["unreadable"].as_u64().unwrap_or(0));
    ExitCode::SUCCESS
}

/// The line `status` shows when the projection skipped events this build cannot read.
fn print_unreadable(unreadable: u64) {
    if unreadable > 0 {
        println!(
            "UNREADABLE {unreadable} events of kinds this build cannot read: upgrade spool \
             (they are kept; a rebuild projects them then)"
        );
    }
}

/// Events the node's projection skipped as unreadable (0 when it has no projection yet).
fn unreadable(home: &Home) -> u64 {
    let path = home.projection_path();
    if !path.exists() {
        return 0;
    }
    Sqlite::open_read_only(&path)
        .and_then(|db| db.unreadable())
        .unwrap_or(0)
}

fn status(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    if let Some(status) = daemon_get(dir, "/v1/status")? {
        return Ok(status_from_daemon(&home, status, as_json));
    }
    let log = home.open_log()?;
    let stats = log.stats()?;
    let reader = log.read()?;
    let (pending, forks, halted) = (reader.pending()?, reader.forks()?, reader.halted()?);
    if as_json {
        let heads: Vec<Value> = stats
            .heads
            .iter()
            .map(|h| json!({"origin": h.origin, "seq": h.seq, "hash": h.hash, "local": h.origin == home.origin()}))
            .collect();
        println!(
            "{}",
            json!({
                "node": {"id": home.origin(), "label": home.label()},
                "home": home.dir(),
                "events": stats.events,
                "file_bytes": stats.file_bytes,
                "heads": heads,
                "waiting": pending,
                "forks": forks,
                "halted": halted,
                "unreadable": unreadable(&home),
            })
        );
    } else {
        println!("node    {} ({})", home.origin(), home.label());
        println!("home    {}", home.dir().display());
        println!("events  {}", stats.events);
        println!("file    {} bytes", stats.file_bytes);
        println!("heads   {} origin(s)", stats.heads.len());
        for h in &stats.heads {
            let mark = if h.origin == home.origin() {
                " (this node)"
            } else {
                ""
            };
            println!("  {}  seq {}  {}{mark}", h.origin, h.seq, h.hash);
        }
        println!("waiting {pending} shipped event(s) wait for their dependencies");
        for f in &forks {
            let held = f.held.map_or("none".to_owned(), |h| h.to_hex());
            println!(
                "FORK    origin {} seq {}: holds {held}, refused {} (kept as evidence)",
                f.id.origin, f.id.seq, f.refused
            );
        }
        if let Some(reason) = &halted {
            println!("HALTED  own writes are stopped: {reason}");
        }
        print_unreadable(unreadable(&home));
    }
    Ok(ExitCode::SUCCESS)
}

fn schema_list(as_json: bool) -> anyhow::Result<ExitCode> {
    for kind in kinds::CATALOGUE {
        let description = kind.description().replace('\n', " ");
        if as_json {
            println!(
                "{}",
                json!({
                    "kind": kind.name,
                    "version": kind.version,
                    "readable": kind.readable,
                    "description": description,
                })
            );
        } else {
            let versions = match kind.readable {
                [_] => String::new(),
                all => format!(" (reads {all:?})"),
            };
            let name_version = format!("{} v{}{versions}", kind.name, kind.version);
            println!("{name_version:<42} {description}");
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
    print!("{}", spec.schema);
    Ok(ExitCode::SUCCESS)
}

fn heads(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    if let Some(status) = daemon_get(dir, "/v1/status")? {
        let heads = status["heads"].as_array().cloned().unwrap_or_default();
        if as_json {
            let vector: serde_json::Map<String, Value> = heads
                .iter()
                .map(|h| {
                    (
                        h["origin"].as_str().unwrap_or("").to_owned(),
                        h["seq"].clone(),
                    )
                })
                .collect();
            println!("{}", Value::Object(vector));
        } else {
            for h in &heads {
                println!(
                    "{}  seq {}  {}",
                    h["origin"].as_str().unwrap_or(""),
                    h["seq"],
                    h["hash"].as_str().unwrap_or("")
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let log = home.open_log()?;
    let heads = log.read()?.heads()?;
    if as_json {
        let vector = Vector(heads.iter().map(|h| (h.origin, h.seq)).collect());
        println!("{vector}");
    } else {
        for h in &heads {
            println!("{}  seq {}  {}", h.origin, h.seq, h.hash);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn export(dir: &Path, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let selection = Selection::parse(&args.origin, args.since.as_deref())
        .map_err(|(part, e)| Usage(format!("--{part}: {e}")))?;
    if args.out.is_none() && std::io::stdout().is_terminal() {
        return Err(
            Usage("the export is binary: redirect it to a file or give --out FILE".into()).into(),
        );
    }
    let home = Home::open(dir)?;
    let request = json!({"origins": args.origin, "since": args.since});
    // Through the daemon when it holds the log, else from the file.
    let export = |out: &mut dyn Write| -> anyhow::Result<u64> {
        if let Some(count) = export_through_daemon(dir, &request, out)? {
            return Ok(count);
        }
        let log = home.open_log()?;
        let reader = log.read()?;
        Ok(shipping::export(&reader, &selection, out, |_| {})?.0)
    };
    let count = match &args.out {
        Some(path) => {
            // Written into a file of its own beside the target and moved over it whole, so a
            // reader never sees half a file; only a regular file is replaced, and a failed
            // export removes only the file it made.
            let mut partial = NewFile::create(path, Existing::ReplaceRegular)
                .map_err(|e| Usage(format!("--out {e}")))?;
            let mut out = BufWriter::new(partial.file());
            let count = export(&mut out)?;
            out.flush()?;
            drop(out);
            partial.place()?;
            count
        }
        None => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            let count = export(&mut out)?;
            out.flush()?;
            count
        }
    };
    eprintln!("spool: exported {count} events");
    Ok(ExitCode::SUCCESS)
}

/// `spool export` while the daemon holds the log: its export file, copied to `out` as it comes,
/// the last bytes kept to read the event count from the trailer (which also shows the file is
/// whole). `None` when no daemon answers.
fn export_through_daemon(
    dir: &Path,
    request: &Value,
    out: &mut dyn Write,
) -> anyhow::Result<Option<u64>> {
    // The trailer ends the file: the mark, the event count, the digest.
    const TRAILER_BYTES: usize = 4 + 8 + 32;
    let mut tail: Vec<u8> = Vec::new();
    let body = serde_json::to_vec(request).expect("JSON");
    let answered = daemon_call(dir, "POST", "/v1/export", body, |piece| {
        out.write_all(piece)?;
        tail.extend_from_slice(piece);
        tail.drain(..tail.len().saturating_sub(TRAILER_BYTES));
        Ok(())
    })?;
    if answered.is_none() {
        return Ok(None);
    }
    let trailer = tail
        .len()
        .checked_sub(TRAILER_BYTES)
        .map(|at| &tail[at..])
        .filter(|t| t[..4] == [0xff; 4])
        .context("the daemon's export ended without its trailer")?;
    Ok(Some(u64::from_le_bytes(
        trailer[4..12].try_into().expect("8 bytes"),
    )))
}

fn ingest(dir: &Path, file: Option<PathBuf>, as_json: bool) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    let socket = dir.join(spool::serve::SOCKET);
    if socket.exists() {
        if let Some(summary) = ingest_through_daemon(&socket, file.as_deref())? {
            return print_ingest(&summary, as_json);
        }
    }
    let log = home.open_log()?;
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
    let summary = shipping::ingest(&log, input, |_| {})?;
    refresh_projection(&home, &log);
    print_ingest(&summary.to_json(), as_json)
}

/// Prints an ingest's summary (its JSON form, from this process or the daemon).
fn print_ingest(summary: &Value, as_json: bool) -> anyhow::Result<ExitCode> {
    let stopped = summary["stopped"].as_str().map(str::to_owned);
    let n = |k: &str| summary[k].as_u64().unwrap_or(0);
    if as_json {
        println!("{summary}");
    } else {
        println!(
            "read {} events: {} applied ({} of them released from waiting), {} waiting for their dependencies, {} already held",
            n("read"), n("applied"), n("released"), n("waiting"), n("duplicates")
        );
        if n("clamped") > 0 {
            println!(
                "{} stamps were far ahead of this node's clock and were clamped",
                n("clamped")
            );
        }
    }
    match stopped {
        Some(why) => Err(Usage(why).into()),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Events sent in one ingest request to the daemon (each request's events are durable before
/// the next is sent).
const DAEMON_INGEST_EVENTS: usize = 10_000;
/// Bytes of one ingest request to the daemon (its limit is larger).
const DAEMON_INGEST_BYTES: usize = 32 << 20;

/// Ingests through a running `spool serve`: the file's frames are checked here and sent in
/// bounded pieces, each an export file of its own. `None` when no daemon answers.
fn ingest_through_daemon(socket: &Path, file: Option<&Path>) -> anyhow::Result<Option<Value>> {
    let input: Box<dyn std::io::Read> = match file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let Ok(mut client) = runtime.block_on(spool::serve::client::Client::connect(socket)) else {
        return Ok(None);
    };
    let mut total = json!({"ok": true, "read": 0, "applied": 0, "released": 0, "waiting": 0,
                           "duplicates": 0, "clamped": 0, "stopped": null, "refused": null});
    let mut reader = match shipping::ExportReader::new(input) {
        Ok(reader) => reader,
        Err(e) => {
            total["ok"] = false.into();
            total["stopped"] = format!("{e}").into();
            return Ok(Some(total));
        }
    };
    let mut file_error = None;
    loop {
        let mut piece = shipping::ExportWriter::new(Vec::new())?;
        let (mut events, mut bytes) = (0, 0);
        while events < DAEMON_INGEST_EVENTS && bytes < DAEMON_INGEST_BYTES {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    piece.push(&frame.shipped.meta.hash, &frame.shipped.bytes)?;
                    events += 1;
                    bytes += frame.shipped.bytes.len();
                }
                Ok(None) => break,
                Err(e) => {
                    file_error = Some(e);
                    break;
                }
            }
        }
        if events > 0 {
            let (_, body) = piece.finish()?;
            let (status, reply) = runtime.block_on(client.request("POST", "/v1/ingest", body))?;
            let reply: Value = serde_json::from_slice(&reply).context("the daemon's answer")?;
            if status != 200 {
                anyhow::bail!(
                    "spool serve answered {status}: {}",
                    reply["error"].as_str().unwrap_or("")
                );
            }
            for k in [
                "read",
                "applied",
                "released",
                "waiting",
                "duplicates",
                "clamped",
            ] {
                total[k] = (total[k].as_u64().unwrap_or(0) + reply[k].as_u64().unwrap_or(0)).into();
            }
            if reply["ok"] != true {
                total["ok"] = false.into();
                total["stopped"] = reply["stopped"].clone();
                total["refused"] = reply["refused"].clone();
                return Ok(Some(total));
            }
        }
        if let Some(e) = file_error {
            total["ok"] = false.into();
            total["stopped"] = format!("{e}; everything before it was ingested").into();
            return Ok(Some(total));
        }
        if events < DAEMON_INGEST_EVENTS && bytes < DAEMON_INGEST_BYTES {
            return Ok(Some(total));
        }
    }
}

/// Brings the node's projection up to the log's end. The events are already durable, so a
/// failure here is a warning with the way out, never a failed append.
fn refresh_projection(home: &Home, log: &Log) {
    if let Err(error) = catch_up(home, log) {
        eprintln!(
            "spool: warning: the projection was not updated ({error:#}); `spool rebuild sqlite` rebuilds it"
        );
    }
}

fn catch_up(home: &Home, log: &Log) -> anyhow::Result<u64> {
    let mut target = Sqlite::open(&home.projection_path(), Durability::Live)?;
    Ok(project::catch_up(&log.read()?, &mut target, |_| {})?)
}

/// The projection to read: `--db`, or the node's brought up to date.
fn projection(dir: &Path, db: Option<PathBuf>) -> anyhow::Result<Sqlite> {
    let path = match db {
        Some(path) => path,
        None => {
            let home = Home::open(dir)?;
            // A running daemon keeps the projection current: wait for it to reach what the
            // log held when asked, so a read follows the writes before it.
            match daemon_get(dir, "/v1/status")? {
                Some(status) => wait_projected(dir, &status)?,
                None => {
                    let log = home.open_log()?;
                    catch_up(&home, &log)?;
                }
            }
            home.projection_path()
        }
    };
    if !path.is_file() {
        return Err(Usage(format!("{}: no such projection file", path.display())).into());
    }
    Ok(Sqlite::open_read_only(&path)?)
}

/// Longest wait for the daemon's projection to reach the log's end before reading it anyway.
const PROJECTED_WAIT: Duration = Duration::from_secs(30);

/// Waits until the daemon's projection holds every event its log held at `status`.
fn wait_projected(dir: &Path, status: &Value) -> anyhow::Result<()> {
    let target = status["events"].as_u64().unwrap_or(0);
    let started = Instant::now();
    let mut status = status.clone();
    while status["projection"]["position"].as_u64().unwrap_or(0) < target {
        if started.elapsed() > PROJECTED_WAIT {
            eprintln!(
                "spool: the projection is {} events behind the log; reading it as it is",
                status["projection"]["lag_events"]
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        status = daemon_get(dir, "/v1/status")?.context("spool serve stopped answering")?;
    }
    Ok(())
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
    let home = Home::open(dir)?;
    let job = jobs::PostgresJob {
        url,
        node: home.origin(),
        held_bytes_max,
    };
    let request = json!({"url": url, "held_bytes_max": held_bytes_max});
    // Projecting from the file, one connection serves every pass.
    let mut target = None;
    loop {
        let summary = match daemon_job(
            dir,
            "/v1/jobs/project-postgres",
            request.clone(),
            "projecting",
        )? {
            Some(summary) => summary,
            None => match home.open_log() {
                Ok(log) => {
                    let target = match &mut target {
                        Some(target) => target,
                        None => target.insert(jobs::postgres_target(&job)?),
                    };
                    let reader = log.read()?;
                    let bar = progress_bar(0, "projecting");
                    let summary = jobs::project_postgres(&reader, target, shown(&bar));
                    bar.finish_and_clear();
                    summary?
                }
                // Another spool command has the log for a moment: look again at the next tick.
                Err(spool::home::HomeError::Log(spool::log::LogError::Locked { .. })) if follow => {
                    std::thread::sleep(FOLLOW_POLL);
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        let applied = summary["applied"].as_u64().unwrap_or(0);
        if applied > 0 || !follow {
            if as_json {
                println!("{summary}");
            } else {
                println!(
                    "projected {applied} events into Postgres up to position {} in {:.2} s ({} applied there by this node in all)",
                    summary["position"], summary["seconds"].as_f64().unwrap_or(0.0), summary["events"]
                );
            }
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

fn backfill_postgres(
    dir: &Path,
    url: &str,
    held_bytes_max: Option<usize>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let home = Home::open(dir)?;
    let request = json!({"url": url, "held_bytes_max": held_bytes_max});
    let summary = match daemon_job(dir, "/v1/jobs/backfill-postgres", request, "backfilling")? {
        Some(summary) => summary,
        None => {
            let log = home.open_log()?;
            let reader = log.read()?;
            let job = jobs::PostgresJob {
                url,
                node: home.origin(),
                held_bytes_max,
            };
            let bar = progress_bar(0, "backfilling");
            let summary = jobs::backfill_postgres(&reader, &job, shown(&bar));
            bar.finish_and_clear();
            summary?
        }
    };
    if as_json {
        println!("{summary}");
    } else {
        if summary["resumed_from"].as_u64().unwrap_or(0) > 0 {
            println!(
                "resumed the backfill from position {}",
                summary["resumed_from"]
            );
        }
        println!(
            "backfilled {} events up to position {} (pinned at {}, {} from the tail) and swapped the tables in; this run applied {} in {:.2} s ({:.0} events/s)",
            summary["events"], summary["position"], summary["pinned"], summary["tail"], summary["applied"],
            summary["seconds"].as_f64().unwrap_or(0.0), summary["events_per_second"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
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

fn rebuild(dir: &Path, into: Option<PathBuf>, as_of: Option<String>) -> anyhow::Result<ExitCode> {
    let until = jobs::as_of(as_of.as_deref()).map_err(|e| Usage(e.to_string()))?;
    let home = Home::open(dir)?;
    // The daemon's working directory is not ours: it is given an absolute path.
    let into = into.map(std::path::absolute).transpose()?;
    // The same rule as the daemon's, checked here first so the refusal is the same either way.
    let target = home
        .places()
        .rebuild_target(into.as_deref())
        .map_err(|e| Usage(e.to_string()))?;
    let request = json!({"into": into, "as_of": as_of});
    let summary = match daemon_job(dir, "/v1/jobs/rebuild", request, "rebuilding")? {
        Some(summary) => summary,
        None => {
            let log = home.open_log()?;
            let reader = log.read()?;
            let bar = progress_bar(0, "rebuilding");
            let built = jobs::rebuild(&reader, &target, until, shown(&bar));
            bar.finish_and_clear();
            let (partial, summary) = built?;
            jobs::swap_in(partial, &target)?;
            summary
        }
    };
    println!(
        "rebuilt {}: {} events up to position {} in {:.2} s ({:.0} events/s)",
        summary["path"].as_str().unwrap_or(""),
        summary["applied"],
        summary["position"],
        summary["seconds"].as_f64().unwrap_or(0.0),
        summary["events_per_second"].as_f64().unwrap_or(0.0)
    );
    Ok(ExitCode::SUCCESS)
}

fn digest(dir: &Path, db: Option<PathBuf>, as_json: bool) -> anyhow::Result<ExitCode> {
    let projection = projection(dir, db)?;
    let (position, _, events) = projection.checkpoint()?;
    let (hash, counts) = projection.digest()?;
    if as_json {
        let tables: serde_json::Map<String, Value> =
            counts.into_iter().map(|(t, n)| (t, n.into())).collect();
        println!(
            "{}",
            json!({"digest": hash, "position": position, "events": events, "tables": tables})
        );
    } else {
        println!("{hash}  ({events} events up to position {position})");
        for (table, n) in counts {
            println!("  {table:<20} {n} rows");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn sql(dir: &Path, statement: &str, db: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut projection = projection(dir, db)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut failed = None;
    projection
        .query(statement, |names, values| {
            let row: serde_json::Map<String, Value> = names.iter().cloned().zip(values).collect();
            if let Err(e) = writeln!(out, "{}", Value::Object(row)) {
                failed.get_or_insert(e);
            }
        })
        .map_err(|e| Usage(format!("sql: {e}")))?;
    out.flush()?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(ExitCode::SUCCESS)
}
