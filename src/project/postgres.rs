//! The Postgres target: the Supabase table families (`projections/postgres/`), with one
//! checkpoint per projecting node written in the same transaction as the rows it covers.
//!
//! Two ways in, one target:
//! - live (`spool project postgres`): rows travel as one JSON record set per statement
//!   (`jsonb_populate_recordset`), up to [`ROWS_PER_STATEMENT`] rows a round trip, into `public`;
//! - backfill (`spool backfill postgres`): rows are written with binary COPY into a shadow schema
//!   (merged rows of the first commit straight in, as the tables are empty; later ones through a
//!   temporary staging table, then one stamped upsert), which [`swap`]
//!   moves into `public` in one transaction, so readers never see a half-built table.
//!
//! Writes are idempotent and commutative (inserts if absent, stamped upserts), so several nodes
//! may project the same events into one database at once. Each commit also checks that the
//! node's checkpoint is still the one its replay started from: two processes projecting one node,
//! or a backfill swapped in meanwhile, make the later commit fail as retryable instead of
//! applying events twice or skipping them. Deadlocks between projectors are retryable too.
//!
//! Boundary: the only module that imports postgres. Table and column names come from the
//! projector's constants; every value is a parameter or COPY data.

use std::collections::HashMap;
use std::time::SystemTime;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, Statement};

use super::merge::Row;
use super::{sql, Applied, Checkpoint, Target, Val, APPEND_ONLY, INSERT_RUN_BYTES};
use crate::event::{Hash, Origin};

/// Once per database: the roles and the schema version.
pub const SCHEMA: &str = include_str!("../../projections/postgres/schema.sql");
/// The API roles (`anon`, `authenticated`, `service_role`), made where missing; run before
/// `SCHEMA` and the hub's table.
pub const ROLES: &str = include_str!("../../projections/postgres/roles.sql");
/// The tables, laid out in the current schema (`public`, or a backfill's shadow).
pub const TABLES: &str = include_str!("../../projections/postgres/tables.sql");
/// The views over the tables, made in `public` at every connect and after a swap.
pub const VIEWS: &str = include_str!("../../projections/postgres/views.sql");
/// Bumped whenever the DDL changes: an older database is refused, not misread, until a
/// backfill (which builds every table in this layout and swaps them in) moves it up.
pub const SCHEMA_VERSION: i64 = 4;
/// Version 1 lacked the list of events a projection could not read (added whole by this).
const MIGRATE_1_TO_2: &str = "CREATE TABLE IF NOT EXISTS public.spool_unreadable (
  id text PRIMARY KEY,
  kind text NOT NULL, version bigint NOT NULL, stream text NOT NULL, problem text NOT NULL,
  created_at timestamptz NOT NULL
);
UPDATE public.spool_meta SET schema_version = 2 WHERE id = 1 AND schema_version = 1;";
/// Version 3 lacked a removed entry's columns (`vault.entry_removed`, which no earlier build
/// wrote, so every row it has is not removed).
const MIGRATE_3_TO_4: &str = "ALTER TABLE public.vault_entries
  ADD COLUMN IF NOT EXISTS removed_at timestamptz, ADD COLUMN IF NOT EXISTS remove_reason text;
UPDATE public.spool_meta SET schema_version = 4 WHERE id = 1 AND schema_version = 3;";
/// How long connecting may take (a server that does not answer), unless the URL says.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long sent data may stay unacknowledged, and an idle connection unprobed, before the
/// connection is given up (a server that went silent mid-job).
pub const SILENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long one statement may run (a lock another session holds, a server overloaded), unless
/// the URL gives `options` of its own: a stuck statement ends the job, or the
/// daemon's round, with an error instead of holding it forever.
pub const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Rows sent in one statement (live) or one COPY (backfill).
pub const ROWS_PER_STATEMENT: usize = 4_096;
/// Memory for merged rows held until commit, live and in a backfill.
pub const HELD_BYTES_LIVE: usize = 64 << 20;
pub const HELD_BYTES_BACKFILL: usize = 256 << 20;
/// Where a backfill builds its tables.
pub const SHADOW: &str = "spool_backfill";
/// Serialises schema creation and swaps between nodes.
const SCHEMA_LOCK: i64 = 0x7370_6f6f_6c00_0001;

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("{}", describe(.0))]
    Sql(#[from] postgres::Error),
    #[error(
        "the database's spool schema is version {found}, this build writes {SCHEMA_VERSION}{}",
        if *.found < SCHEMA_VERSION {
            "; `spool backfill postgres` builds its tables in this layout from this node's log \
             and swaps them in (other nodes then re-apply their events)"
        } else {
            "; use a newer spool"
        }
    )]
    OtherSchema { found: i64 },
    #[error("connecting to {target}: {cause}")]
    Connect { target: String, cause: String },
    #[error("the connection string is not valid: {0}")]
    Url(String),
    #[error(
        "the checkpoint of node {node}: {problem}; rebuild the tables (`spool backfill postgres`)"
    )]
    Heads { node: String, problem: String },
    #[error("the checkpoint of node {node} holds a hash of {len} bytes")]
    BadCheckpoint { node: String, len: usize },
    #[error("the checkpoint of node {node} moved while this replay ran (another projection of this node, or a backfill swapped in); it is read again")]
    CheckpointMoved { node: String },
    #[error("a backfill by node {node} is in progress in schema {SHADOW}: run `spool backfill postgres` on that node to finish it, or drop the schema to abandon it")]
    BackfillOfAnother { node: String },
    #[error("a value for {table}.{column}: {problem}")]
    Value {
        table: &'static str,
        column: &'static str,
        problem: String,
    },
}

/// Connects with bounded waits: [`CONNECT_TIMEOUT`] to connect (unless the URL sets one),
/// [`STATEMENT_TIMEOUT`] for each statement (unless the URL gives `options`), and
/// keepalives and a TCP user timeout of [`SILENT_TIMEOUT`] so that a server that goes silent
/// ends the job with an error; over TLS as the URL's `sslmode` asks (`pgtls`: `prefer` by
/// default, `require`, `verify-ca`, `verify-full`, with `sslrootcert`). A failure names host,
/// port and database, never the password.
pub fn connect(url: &str) -> Result<Client, PostgresError> {
    let (rest, tls) = crate::pgtls::split(url).map_err(PostgresError::Url)?;
    let mut config: postgres::Config = rest
        .parse()
        .map_err(|e: postgres::Error| PostgresError::Url(e.to_string()))?;
    config.ssl_mode(tls.mode.driver());
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // A startup option, not a `SET` after connecting: it holds in every session a pooler hands
    // out, and it overrides a role's default (Supabase's roles set short ones). A URL that
    // gives `options` itself is taken as it is.
    if config.get_options().is_none() {
        config.options(&format!(
            "-c statement_timeout={}",
            STATEMENT_TIMEOUT.as_millis()
        ));
    }
    config
        .keepalives(true)
        .keepalives_idle(SILENT_TIMEOUT / 2)
        .tcp_user_timeout(SILENT_TIMEOUT);
    let target = target(&config);
    let tls = crate::pgtls::client_config(&tls)
        .map(tokio_postgres_rustls::MakeRustlsConnect::new)
        .map_err(|cause| PostgresError::Connect {
            target: target.clone(),
            cause,
        })?;
    // The driver's connect timeout bounds the TCP connect only: a server that accepts and then
    // says nothing would hold the startup forever. The startup runs on a thread of its own and
    // is given CONNECT_TIMEOUT in all; past that the job fails. (The thread itself ends only
    // with its connection: the synchronous driver offers no way to cancel a startup.)
    let (send, receive) = std::sync::mpsc::channel();
    let connecting = std::thread::Builder::new()
        .name("spool-pg-connect".into())
        .spawn(move || {
            let _ = send.send(config.connect(tls));
        });
    if let Err(e) = connecting {
        return Err(PostgresError::Connect {
            target,
            cause: format!("starting the connecting thread: {e}"),
        });
    }
    let wait = CONNECT_TIMEOUT + std::time::Duration::from_secs(1);
    match receive.recv_timeout(wait) {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(PostgresError::Connect {
            target,
            cause: cause(&e),
        }),
        Err(_) => Err(PostgresError::Connect {
            target,
            cause: format!(
                "the server accepted the connection and did not answer within {} s",
                wait.as_secs()
            ),
        }),
    }
}

/// Where a connection goes: hosts, ports and database, as a person reads them.
fn target(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host {} port {} database {}",
        if hosts.is_empty() {
            "(default)".into()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".into()
        } else {
            ports.join(",")
        },
        config.get_dbname().unwrap_or("(the user's)")
    )
}

/// An error and its causes as one sentence (postgres's own Display stops at the first).
fn cause(e: &postgres::Error) -> String {
    let mut text = describe(e);
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A database error with its server message (postgres's own Display says only "db error").
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// Whether a failed transaction can simply be run again from the checkpoint: a deadlock or
/// serialization failure between concurrent projectors, or a checkpoint that moved.
pub fn is_retryable(error: &PostgresError) -> bool {
    use postgres::error::SqlState;
    match error {
        PostgresError::Sql(e) => matches!(
            e.code(),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
        ),
        PostgresError::CheckpointMoved { .. } => true,
        _ => false,
    }
}

/// How rows reach the tables.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Live,
    Backfill,
}

/// A connection projecting one node's log into the database.
pub struct Postgres {
    client: Client,
    mode: Mode,
    /// The projecting node's origin, hex: its checkpoint row.
    node: String,
    /// The checkpoint this replay continues from; a commit lands only if it is still there.
    expected: Option<u64>,
    /// Column types of the tables written, by (table, column).
    types: HashMap<(String, String), Type>,
    /// One statement per shape (table, columns, groups), and the rows waiting for it.
    shapes: sql::Shapes<Shape>,
    held_bytes_max: usize,
}

struct Shape {
    table: &'static str,
    columns: Vec<&'static str>,
    types: Vec<Type>,
    /// Live: the statement writing a JSON record set. Backfill: the upsert from the staging
    /// table (merged rows) or none (inserts are copied straight in).
    sql: String,
    statement: Option<Statement>,
    /// Backfill, merged rows: the temporary table they are copied into first.
    staging: Option<String>,
    rows: Vec<Vec<Val>>,
    /// What `rows` hold in values.
    rows_bytes: usize,
}

impl Postgres {
    /// Connects to `url` for live projection into `public`, creating the schema if the
    /// database has none.
    pub fn connect(url: &str, node: Origin) -> Result<Postgres, PostgresError> {
        Postgres::open(url, node, false)
    }

    /// As [`Postgres::connect`]; with `older_ok`, a database of an older schema is let in too
    /// (a backfill builds the current layout beside it and its swap moves the version up).
    fn open(url: &str, node: Origin, older_ok: bool) -> Result<Postgres, PostgresError> {
        let mut client = connect(url)?;
        client.batch_execute("SET client_min_messages = error")?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('public.spool_meta') IS NOT NULL", &[])?
            .get(0);
        if !exists {
            tx.batch_execute("SET LOCAL search_path = public")?;
            tx.batch_execute(ROLES)?;
            tx.batch_execute(SCHEMA)?;
            tx.batch_execute(TABLES)?;
            tx.execute(
                "INSERT INTO spool_meta (id, schema_version) VALUES (1, $1)",
                &[&SCHEMA_VERSION],
            )?;
        }
        let mut found: i64 = tx
            .query_one(
                "SELECT schema_version FROM public.spool_meta WHERE id = 1",
                &[],
            )?
            .get(0);
        if found == 1 {
            tx.batch_execute(MIGRATE_1_TO_2)?;
            found = 2;
        }
        if found == 3 {
            tx.batch_execute(MIGRATE_3_TO_4)?;
            found = 4;
        }
        if found > SCHEMA_VERSION || (found < SCHEMA_VERSION && !older_ok) {
            return Err(PostgresError::OtherSchema { found });
        }
        if found == SCHEMA_VERSION {
            tx.batch_execute("SET LOCAL search_path = public")?;
            tx.batch_execute(VIEWS)?;
        }
        tx.commit()?;
        client.batch_execute("SET search_path = public")?;
        let types = column_types(&mut client, "public")?;
        Ok(Postgres {
            client,
            mode: Mode::Live,
            node: node.to_hex(),
            expected: None,
            types,
            shapes: sql::Shapes::default(),
            held_bytes_max: HELD_BYTES_LIVE,
        })
    }

    /// Connects for a backfill: the shadow schema is created with empty tables (pinned at
    /// `pin`, the log's last position now), or found from a backfill of this node that was
    /// interrupted, which then resumes from its checkpoint. Returns the target and the pinned
    /// position.
    pub fn backfill(url: &str, node: Origin, pin: u64) -> Result<(Postgres, u64), PostgresError> {
        let mut live = Postgres::open(url, node, true)?;
        let mut tx = live.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        let state = tx.query_opt(
            &format!(
                "SELECT node, pinned FROM {SHADOW}.spool_backfill_state \
                 WHERE id = 1 AND schema_version = $1"
            ),
            &[&SCHEMA_VERSION],
        );
        let pinned = match state {
            Ok(Some(row)) => {
                let owner: String = row.get(0);
                if owner != live.node {
                    return Err(PostgresError::BackfillOfAnother { node: owner });
                }
                row.get::<_, i64>(1) as u64
            }
            // No shadow schema yet (or a half-made one from before its first commit, or one an
            // older build laid out).
            _ => {
                drop(tx);
                tx = live.client.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
                tx.batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {SHADOW} CASCADE; CREATE SCHEMA {SHADOW}; \
                     SET LOCAL search_path = {SHADOW}, public"
                ))?;
                tx.batch_execute(TABLES)?;
                // Loading keeps no index it can build afterwards, each sorted once: the
                // secondary indexes, and the keys of append-only tables (each event is applied
                // once, so their rows cannot collide). `finish_load` restores them.
                tx.execute(
                    "CREATE TABLE spool_backfill_deferred (sql text NOT NULL)",
                    &[],
                )?;
                tx.execute(
                    "INSERT INTO spool_backfill_deferred \
                     SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
                     JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND NOT i.indisunique",
                    &[&SHADOW],
                )?;
                let appended: Vec<String> = APPEND_ONLY.iter().map(|t| t.to_string()).collect();
                tx.execute(
                    "INSERT INTO spool_backfill_deferred \
                     SELECT format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', n.nspname, t.relname, \
                                   k.conname, pg_get_constraintdef(k.oid)) \
                     FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid \
                     JOIN pg_namespace n ON n.oid = t.relnamespace \
                     WHERE n.nspname = $1 AND k.contype = 'p' AND t.relname = ANY($2)",
                    &[&SHADOW, &appended],
                )?;
                tx.batch_execute(&format!(
                    "DO $$ DECLARE r record; BEGIN \
                       FOR r IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                         JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = '{SHADOW}' AND NOT i.indisunique LOOP \
                         EXECUTE format('DROP INDEX {SHADOW}.%I', r.relname); \
                       END LOOP; \
                       FOR r IN SELECT t.relname, k.conname FROM pg_constraint k \
                         JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
                         WHERE n.nspname = '{SHADOW}' AND k.contype = 'p' \
                           AND t.relname IN ({}) LOOP \
                         EXECUTE format('ALTER TABLE {SHADOW}.%I DROP CONSTRAINT %I', r.relname, r.conname); \
                       END LOOP; END $$",
                    APPEND_ONLY
                        .iter()
                        .map(|t| format!("'{t}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))?;
                tx.execute(
                    "CREATE TABLE spool_backfill_state (id int PRIMARY KEY CHECK (id = 1), \
                     node text NOT NULL, pinned bigint NOT NULL, schema_version bigint NOT NULL, \
                     started_at timestamptz NOT NULL DEFAULT now())",
                    &[],
                )?;
                tx.execute(
                    "INSERT INTO spool_backfill_state (id, node, pinned, schema_version) \
                     VALUES (1, $1, $2, $3)",
                    &[&live.node, &(pin as i64), &SCHEMA_VERSION],
                )?;
                pin
            }
        };
        tx.commit()?;
        live.client
            .batch_execute(&format!("SET search_path = {SHADOW}, public"))?;
        live.types = column_types(&mut live.client, SHADOW)?;
        live.mode = Mode::Backfill;
        live.held_bytes_max = HELD_BYTES_BACKFILL;
        Ok((live, pinned))
    }

    /// Sets how many bytes of merged rows a replay into this target holds before it commits.
    pub fn hold_at_most(&mut self, bytes: usize) {
        self.held_bytes_max = bytes;
    }

    /// The checkpoint of this node: position, hash and events applied. A replay continues from
    /// it, and its commits land only while it is still there.
    pub fn checkpoint(&mut self) -> Result<(u64, Hash, u64), PostgresError> {
        let row = self.client.query_opt(
            "SELECT position, hash, events FROM spool_checkpoints WHERE node = $1",
            &[&self.node],
        )?;
        let (position, hash, events) = match row {
            None => (0, Hash::ZERO, 0),
            Some(row) => {
                let hash: Vec<u8> = row.get(1);
                let len = hash.len();
                let hash = hash.try_into().map_err(|_| PostgresError::BadCheckpoint {
                    node: self.node.clone(),
                    len,
                })?;
                (
                    row.get::<_, i64>(0) as u64,
                    Hash(hash),
                    row.get::<_, i64>(2) as u64,
                )
            }
        };
        self.expected = Some(position);
        Ok((position, hash, events))
    }

    /// The connection, for queries.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Ends a backfill: in one transaction, the live tables are replaced by the shadow ones
    /// (with their grants, policies and indexes, and this node's checkpoint only, so other
    /// nodes re-apply their events), and the old ones dropped.
    pub fn swap(mut self) -> Result<(), PostgresError> {
        self.finish_load()?;
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        let tables: Vec<String> = tx
            .query(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 \
                 AND tablename NOT LIKE 'spool\\_backfill\\_%' ORDER BY 1",
                &[&SHADOW],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.batch_execute(
            "DROP SCHEMA IF EXISTS spool_retired CASCADE; CREATE SCHEMA spool_retired",
        )?;
        for t in &tables {
            // Names come from the catalogue (our own DDL), not from data.
            tx.batch_execute(&format!(
                "ALTER TABLE IF EXISTS public.{t} SET SCHEMA spool_retired; \
                 ALTER TABLE {SHADOW}.{t} SET SCHEMA public"
            ))?;
        }
        tx.batch_execute(&format!(
            "DROP SCHEMA spool_retired CASCADE; DROP SCHEMA {SHADOW} CASCADE"
        ))?;
        // The views read the retired tables and went with them; the layout is now this build's.
        tx.batch_execute("SET LOCAL search_path = public")?;
        tx.batch_execute(VIEWS)?;
        tx.execute(
            "UPDATE public.spool_meta SET schema_version = $1 WHERE id = 1",
            &[&SCHEMA_VERSION],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Makes the shadow tables whole before they go live: the indexes and keys deferred while
    /// loading are built, each sorted once, in one transaction that also clears the list (so a
    /// resumed backfill builds them exactly once). A duplicate key would fail here, loudly.
    fn finish_load(&mut self) -> Result<(), PostgresError> {
        let mut tx = self.client.transaction()?;
        let deferred: Vec<String> = tx
            .query(
                &format!("SELECT sql FROM {SHADOW}.spool_backfill_deferred"),
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for sql in deferred {
            // Our own DDL, as Postgres printed it.
            tx.batch_execute(&sql)?;
        }
        tx.batch_execute(&format!("DELETE FROM {SHADOW}.spool_backfill_deferred"))?;
        tx.commit()?;
        Ok(())
    }

    /// Ends a failed transaction at once, so the connection can read the checkpoint again
    /// (and a caller retry) instead of answering "transaction is aborted".
    fn rolled_back_on_error<T>(
        &mut self,
        result: Result<T, PostgresError>,
    ) -> Result<T, PostgresError> {
        if result.is_err() {
            let _ = self.client.batch_execute("ROLLBACK");
        }
        result
    }

    fn insert_row(
        &mut self,
        table: &'static str,
        cols: Vec<(&'static str, Val)>,
    ) -> Result<(), PostgresError> {
        let mode = self.mode;
        let names = std::iter::once(table).chain(cols.iter().map(|c| c.0));
        let (types, n) = (&self.types, self.shapes.len());
        let shape = self.shapes.find(names, || {
            let columns: Vec<&'static str> = cols.iter().map(|c| c.0).collect();
            new_shape(types, mode, n, table, &columns, None)
        })?;
        shape.rows_bytes += cols.iter().map(|c| c.1.held_bytes()).sum::<usize>();
        shape.rows.push(cols.into_iter().map(|c| c.1).collect());
        if shape.rows.len() >= ROWS_PER_STATEMENT || shape.rows_bytes >= INSERT_RUN_BYTES {
            send(&mut self.client, mode, shape)?;
        }
        Ok(())
    }

    fn commit_rows(
        &mut self,
        rows: Vec<Row>,
        position: u64,
        hash: Hash,
        applied: u64,
        heads: &Applied,
    ) -> Result<(), PostgresError> {
        // Inserts first, then the merged rows in (table, key) order.
        self.send_all()?;
        let mode = self.mode;
        // A backfill's first commit finds its mutable tables empty, and a batch holds one
        // merged row per key: its rows are copied straight in, as the stamped upsert would
        // have inserted them. Later commits (after a resume, the tail) upsert.
        let straight_in = mode == Mode::Backfill && self.expected == Some(0);
        for row in rows {
            let (types, n) = (&self.types, self.shapes.len());
            let shape = if straight_in {
                let columns = sql::columns(&row);
                let names = std::iter::once(row.table).chain(columns.iter().copied());
                self.shapes.find(names, || {
                    new_shape(types, mode, n, row.table, &columns, None)
                })?
            } else {
                self.shapes.find(sql::row_shape(&row), || {
                    new_shape(types, mode, n, row.table, &sql::columns(&row), Some(&row))
                })?
            };
            let mut values: Vec<Val> = Vec::with_capacity(shape.columns.len());
            values.extend(row.key.into_iter().map(|c| c.1));
            for (g, stamp) in row.groups.into_iter().zip(row.stamps) {
                values.extend(g.cols.into_iter().map(|c| c.1));
                values.push(Val::Blob(stamp.to_vec()));
            }
            shape.rows_bytes += values.iter().map(Val::held_bytes).sum::<usize>();
            shape.rows.push(values);
            let full =
                shape.rows.len() >= ROWS_PER_STATEMENT || shape.rows_bytes >= INSERT_RUN_BYTES;
            if (mode == Mode::Live || straight_in) && full {
                send(&mut self.client, mode, shape)?;
            }
        }
        self.send_all()?;
        self.advance(position, hash, applied, heads)?;
        self.client.batch_execute("COMMIT")?;
        self.expected = Some(position);
        Ok(())
    }

    /// Moves this node's checkpoint from the one the replay started from; fails as retryable
    /// if someone else moved it meanwhile.
    fn advance(
        &mut self,
        position: u64,
        hash: Hash,
        applied: u64,
        heads: &Applied,
    ) -> Result<(), PostgresError> {
        let moved = || PostgresError::CheckpointMoved {
            node: self.node.clone(),
        };
        let heads = super::heads_text(heads);
        let changed = match self.expected {
            None => return Err(moved()),
            Some(0) => self.client.execute(
                "INSERT INTO spool_checkpoints (node, position, hash, events, heads) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (node) DO NOTHING",
                &[
                    &self.node,
                    &(position as i64),
                    &hash.0.as_slice(),
                    &(applied as i64),
                    &heads,
                ],
            )?,
            Some(from) => self.client.execute(
                "UPDATE spool_checkpoints SET position = $2, hash = $3, events = events + $4, \
                 heads = $6, updated_at = now() WHERE node = $1 AND position = $5",
                &[
                    &self.node,
                    &(position as i64),
                    &hash.0.as_slice(),
                    &(applied as i64),
                    &(from as i64),
                    &heads,
                ],
            )?,
        };
        match changed {
            1 => Ok(()),
            _ => Err(moved()),
        }
    }

    fn send_all(&mut self) -> Result<(), PostgresError> {
        for shape in self.shapes.iter_mut() {
            send(&mut self.client, self.mode, shape)?;
        }
        Ok(())
    }
}

/// A new shape: its columns' types, and its statement (live) or staging table (backfill).
fn new_shape(
    types: &HashMap<(String, String), Type>,
    mode: Mode,
    n: usize,
    table: &'static str,
    columns: &[&'static str],
    merged: Option<&Row>,
) -> Result<Shape, PostgresError> {
    let types = columns
        .iter()
        .map(|c| {
            types
                .get(&(table.to_owned(), (*c).to_owned()))
                .cloned()
                .ok_or(PostgresError::Value {
                    table,
                    column: c,
                    problem: "no such column in the database".into(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (sql, staging) = match (mode, merged) {
        (Mode::Live, None) => (
            sql::insert(table, columns, &record_set(table, columns)),
            None,
        ),
        (Mode::Live, Some(row)) => (sql::upsert(row, &record_set(table, columns)), None),
        (Mode::Backfill, None) => (String::new(), None),
        (Mode::Backfill, Some(row)) => {
            let staging = format!("spool_stage_{n}");
            let source = format!("SELECT {} FROM {staging}", columns.join(", "));
            (sql::upsert(row, &source), Some(staging))
        }
    };
    Ok(Shape {
        table,
        columns: columns.to_vec(),
        types,
        sql,
        statement: None,
        staging,
        rows: Vec::new(),
        rows_bytes: 0,
    })
}

/// The column types of every table in `schema`.
fn column_types(
    client: &mut Client,
    schema: &str,
) -> Result<HashMap<(String, String), Type>, PostgresError> {
    let mut out = HashMap::new();
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1",
            &[&schema],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in tables {
        // A statement that reads no row tells each column's type.
        let stmt = client.prepare(&format!("SELECT * FROM {schema}.{t} LIMIT 0"))?;
        for c in stmt.columns() {
            out.insert((t.clone(), c.name().to_owned()), c.type_().clone());
        }
    }
    Ok(out)
}

/// Sends a shape's waiting rows: live, one statement with a JSON record set; in a backfill,
/// one binary COPY into the table (inserts) or into the staging table, then the upsert from it
/// (merged rows).
fn send(client: &mut Client, mode: Mode, shape: &mut Shape) -> Result<(), PostgresError> {
    if shape.rows.is_empty() {
        return Ok(());
    }
    let rows = std::mem::take(&mut shape.rows);
    shape.rows_bytes = 0;
    match mode {
        Mode::Live => {
            let mut json = String::from("[");
            for (i, row) in rows.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                json_row(&mut json, shape, row);
            }
            json.push(']');
            let statement = prepared(client, shape)?;
            client.execute(&statement, &[&RecordSet(&json)])?;
        }
        Mode::Backfill => {
            let into = shape.staging.clone().unwrap_or(shape.table.to_owned());
            if shape.staging.is_some() {
                // Made here, not once: a rolled-back transaction takes a new temp table with it.
                client.batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {into} ON COMMIT DELETE ROWS AS \
                     SELECT {} FROM {} WITH NO DATA",
                    shape.columns.join(", "),
                    shape.table
                ))?;
            }
            let copy = format!(
                "COPY {into} ({}) FROM STDIN (FORMAT binary)",
                shape.columns.join(", ")
            );
            let mut writer = BinaryCopyInWriter::new(client.copy_in(&copy)?, &shape.types);
            let mut values: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(shape.columns.len());
            for row in &rows {
                values.clear();
                values.extend(row.iter().map(|v| v as &(dyn ToSql + Sync)));
                writer.write(&values)?;
            }
            writer.finish()?;
            if shape.staging.is_some() {
                let statement = prepared(client, shape)?;
                client.execute(&statement, &[])?;
                client.batch_execute(&format!("TRUNCATE {into}"))?;
            }
        }
    }
    Ok(())
}

fn prepared(client: &mut Client, shape: &mut Shape) -> Result<Statement, PostgresError> {
    if shape.statement.is_none() {
        shape.statement = Some(client.prepare(&shape.sql)?);
    }
    Ok(shape.statement.clone().expect("prepared above"))
}

/// The source of a live statement's rows: the JSON array parameter as records of `table`.
fn record_set(table: &str, names: &[&str]) -> String {
    format!(
        "SELECT {} FROM jsonb_populate_recordset(NULL::{table}, $1)",
        names.join(", ")
    )
}

/// One row as a JSON object for `jsonb_populate_recordset`: JSON columns embed their
/// (validated) JSON text as is, byte columns take Postgres's `\x` hex form, text is escaped by
/// serde_json.
fn json_row(out: &mut String, shape: &Shape, row: &[Val]) {
    use std::fmt::Write as _;
    out.push('{');
    for (i, ((name, ty), v)) in shape.columns.iter().zip(&shape.types).zip(row).enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{name}\":");
        match v {
            Val::Null => out.push_str("null"),
            Val::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Val::Real(f) => {
                let _ = write!(out, "{}", serde_json::Value::from(*f));
            }
            Val::Text(t) if *ty == Type::JSONB || *ty == Type::JSON => out.push_str(t),
            Val::Text(t) => {
                let _ = write!(out, "{}", serde_json::Value::from(t.as_str()));
            }
            Val::Blob(b) => {
                let _ = write!(out, "\"\\\\x{}\"", hex::encode(b));
            }
        }
    }
    out.push('}');
}

/// A JSON array of rows sent as a `jsonb` parameter (version byte, then the text).
#[derive(Debug)]
struct RecordSet<'a>(&'a str);

impl ToSql for RecordSet<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSONB | Type::JSON)
    }

    postgres::types::to_sql_checked!();
}

/// RFC 3339 text as a time. The last one read is kept: the rows of one burst of events share
/// their millisecond.
fn timestamp(text: &str) -> Result<SystemTime, humantime::TimestampError> {
    thread_local! {
        static LAST: std::cell::RefCell<(String, SystemTime)> =
            const { std::cell::RefCell::new((String::new(), SystemTime::UNIX_EPOCH)) };
    }
    LAST.with_borrow_mut(|(last, at)| {
        if last != text {
            *at = humantime::parse_rfc3339(text)?;
            last.clear();
            last.push_str(text);
        }
        Ok(*at)
    })
}

/// A value in Postgres's binary form for its column's type (COPY): integers as the column's
/// width or boolean, RFC 3339 text as a timestamp, JSON text as jsonb.
impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) => match *ty {
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Val::Real(f) => f.to_sql(ty, out),
            Val::Text(t) => match *ty {
                Type::JSONB => {
                    out.extend_from_slice(&[1]);
                    out.extend_from_slice(t.as_bytes());
                    Ok(IsNull::No)
                }
                Type::JSON => {
                    out.extend_from_slice(t.as_bytes());
                    Ok(IsNull::No)
                }
                Type::TIMESTAMPTZ | Type::TIMESTAMP => timestamp(t)?.to_sql(ty, out),
                _ => t.as_str().to_sql(ty, out),
            },
            Val::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl Target for Postgres {
    type Error = PostgresError;

    fn checkpoint(&mut self) -> Result<Checkpoint, PostgresError> {
        let (position, hash, _) = Postgres::checkpoint(self)?;
        let row = self.client.query_opt(
            "SELECT heads FROM spool_checkpoints WHERE node = $1",
            &[&self.node],
        )?;
        let heads = row
            .and_then(|r| r.get::<_, Option<String>>(0))
            .map(|text| super::parse_heads(&text))
            .transpose()
            .map_err(|problem| PostgresError::Heads {
                node: self.node.clone(),
                problem,
            })?;
        Ok(Checkpoint {
            position,
            hash,
            heads,
        })
    }

    fn held_bytes_max(&self) -> usize {
        self.held_bytes_max
    }

    /// Starts from nothing: a transaction a failed replay left open is rolled back and its
    /// waiting rows dropped.
    fn begin(&mut self) -> Result<(), PostgresError> {
        for shape in self.shapes.iter_mut() {
            shape.rows.clear();
        }
        self.client.batch_execute("ROLLBACK; BEGIN")?;
        Ok(())
    }

    fn insert(
        &mut self,
        table: &'static str,
        cols: Vec<(&'static str, Val)>,
    ) -> Result<(), PostgresError> {
        let result = self.insert_row(table, cols);
        self.rolled_back_on_error(result)
    }

    fn commit(
        &mut self,
        rows: Vec<Row>,
        position: u64,
        hash: Hash,
        applied: u64,
        heads: &Applied,
    ) -> Result<(), PostgresError> {
        let result = self.commit_rows(rows, position, hash, applied, heads);
        self.rolled_back_on_error(result)
    }
}
