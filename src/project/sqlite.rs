//! The SQLite target: the local tables (`projections/sqlite/schema.sql`) in one file, with the
//! checkpoint written in the same transaction as the rows it covers.
//!
//! Boundary: the only module that imports rusqlite. Table and column names come from the
//! projector's constants; every value is a bound parameter.

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, ToSql};

use super::merge::Row;
use super::sql;
use super::{Applied, Checkpoint, Target, Val, INSERT_RUN_BYTES};
use crate::event::Hash;

/// The DDL, shipped as files so it can be read and diffed: the tables, and their secondary
/// indexes (idempotent), which a rebuild creates after its rows.
pub const SCHEMA: &str = include_str!("../../projections/sqlite/schema.sql");
pub const INDEXES: &str = include_str!("../../projections/sqlite/indexes.sql");
/// Prepared statements kept: more than the projector's distinct write shapes.
const STATEMENTS_CACHED: usize = 512;
/// Page size of a new projection file. 3 interleaved runs of a rebuild of the 1M-event bench
/// log: 250/323/322k events/s at SQLite's default 4 096, 334/344/343k at 8 192 (16 384 gave the
/// same as 8 192, with twice the bytes per page a live commit writes to the WAL).
pub const PAGE_BYTES: i64 = 8192;
/// Page cache of a rebuild, in KiB (a live projection keeps SQLite's default).
pub const REBUILD_CACHE_KIB: i64 = 64 * 1024;
/// Memory for upserts held until commit, in a rebuild and in a live projection. The larger
/// it is, the fewer times a rebuild writes a row that many events change.
pub const HELD_BYTES_REBUILD: usize = 256 << 20;
pub const HELD_BYTES_LIVE: usize = 32 << 20;
/// Inserts of one shape are written in runs of this many rows (one statement lookup a run).
const INSERT_RUN: usize = 4_096;
/// A commit of at least this many merged rows frees them on a thread of its own.
const FREED_APART_ROWS: usize = 10_000;
/// Bumped whenever `SCHEMA` changes: an older file is rebuilt (`jobs::open_projection` does it
/// when the node opens its projection), not misread.
pub const SCHEMA_VERSION: i64 = 5;
/// How long one `spool sql` statement may run.
pub const QUERY_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest string or blob one statement may make.
pub const QUERY_VALUE_BYTES_MAX: i32 = 16 << 20;
/// SQLite's memory for one statement, in all (its page cache included).
pub const QUERY_MEMORY_BYTES_MAX: i64 = 256 << 20;
/// The views (readings that depend on when they are read, or join tables): made on every open
/// of a writable file, so a file made by an older build gets them too.
const VIEWS: &str = include_str!("../../projections/sqlite/views.sql");

#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    #[error("syncing the projection file: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the statement was stopped: {0} (`spool sql`'s limits: 10 s, 256 MiB, 16 MiB a value)"
    )]
    QueryLimit(String),
    #[error("{path}: projection schema version {found}, this build writes {SCHEMA_VERSION}; rebuild it (`spool rebuild sqlite`)")]
    OtherSchema { path: String, found: i64 },
    #[error("{0}; rebuild the projection (`spool rebuild sqlite`)")]
    Checkpoint(String),
}

/// An open projection file.
pub struct Sqlite {
    conn: Connection,
    /// Statement shapes with their SQL, built once, and the open transaction's inserts.
    shapes: sql::Shapes<Shape>,
    /// How many bytes of merged rows the replay may hold before it commits.
    held_bytes_max: usize,
    /// A rebuild creates the secondary indexes in [`Sqlite::finish`].
    indexes_deferred: bool,
    /// The thread freeing the last large batch of merged rows, joined before the next one.
    freeing: Option<std::thread::JoinHandle<()>>,
}

/// How durable the file's commits are. A rebuild into a new file needs none until it is
/// complete (it is synced and renamed into place); a live projection keeps WAL's guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Live,
    Rebuild,
}

impl Sqlite {
    /// Opens the projection at `path`, creating it (schema and an empty checkpoint) if absent.
    pub fn open(path: &Path, durability: Durability) -> Result<Sqlite, SqliteError> {
        let conn = Connection::open(path)?;
        // Takes effect only on a new file (before its first table and before WAL).
        conn.pragma_update(None, "page_size", PAGE_BYTES)?;
        match durability {
            Durability::Live => {
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
            }
            Durability::Rebuild => {
                conn.pragma_update(None, "journal_mode", "OFF")?;
                conn.pragma_update(None, "synchronous", "OFF")?;
                // Pages spilled mid-transaction are written and read back; keep them (bounded).
                conn.pragma_update(None, "cache_size", -REBUILD_CACHE_KIB)?;
            }
        }
        // One statement per write shape (table and column groups): keep them all prepared.
        conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
        let mut db = Sqlite::checked(conn, path, true)?;
        match durability {
            Durability::Live => db.conn.execute_batch(INDEXES)?,
            Durability::Rebuild => {
                db.held_bytes_max = HELD_BYTES_REBUILD;
                db.indexes_deferred = true;
            }
        }
        Ok(db)
    }

    /// Sets how many bytes of merged rows a replay into this target holds before it commits.
    pub fn hold_at_most(&mut self, bytes: usize) {
        self.held_bytes_max = bytes;
    }

    /// Opens an existing projection read-only (for queries and digests).
    pub fn open_read_only(path: &Path) -> Result<Sqlite, SqliteError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Sqlite::checked(conn, path, false)
    }

    /// Refuses another schema version; with `create`, lays out an empty file.
    fn checked(conn: Connection, path: &Path, create: bool) -> Result<Sqlite, SqliteError> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == 0 && create {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA)?;
            tx.execute(
                "INSERT INTO spool_checkpoint (id, position, hash, events) VALUES (1, 0, ?1, 0)",
                [Hash::ZERO.0.as_slice()],
            )?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        } else if version != SCHEMA_VERSION {
            return Err(SqliteError::OtherSchema {
                path: path.display().to_string(),
                found: version,
            });
        }
        if create {
            conn.execute_batch(VIEWS)?;
        }
        Ok(Sqlite {
            conn,
            shapes: sql::Shapes::default(),
            held_bytes_max: HELD_BYTES_LIVE,
            indexes_deferred: false,
            freeing: None,
        })
    }

    /// The last position applied, its hash, and how many events were applied.
    pub fn checkpoint(&self) -> Result<(u64, Hash, u64), SqliteError> {
        Ok(self.conn.query_row(
            "SELECT position, hash, events FROM spool_checkpoint WHERE id = 1",
            [],
            |r| {
                let hash: Vec<u8> = r.get(1)?;
                let hash = Hash(hash.try_into().unwrap_or([0; 32]));
                Ok((r.get::<_, i64>(0)? as u64, hash, r.get::<_, i64>(2)? as u64))
            },
        )?)
    }

    /// The projected tables, by name (the checkpoint excluded).
    pub fn tables(&self) -> Result<Vec<String>, SqliteError> {
        let mut stmt = self.conn.prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             AND name != 'spool_checkpoint' ORDER BY name",
        )?;
        let names = stmt.query_map([], |r| r.get(0))?;
        Ok(names.collect::<Result<_, _>>()?)
    }

    /// A canonical hash of every projected row: tables by name, rows by primary key, each value
    /// with its type. Equal on every node holding equal events. Also the row count per table.
    pub fn digest(&self) -> Result<(Hash, Vec<(String, u64)>), SqliteError> {
        let mut hasher = blake3::Hasher::new();
        let mut counts = Vec::new();
        for table in self.tables()? {
            let key = self.primary_key(&table)?;
            // Names come from the schema, not from data.
            let sql = format!("SELECT * FROM \"{table}\" ORDER BY {}", key.join(", "));
            let mut stmt = self.conn.prepare(&sql)?;
            let columns = stmt.column_count();
            hasher.update(&(table.len() as u64).to_le_bytes());
            hasher.update(table.as_bytes());
            let mut rows = stmt.query([])?;
            let mut n = 0u64;
            while let Some(row) = rows.next()? {
                for i in 0..columns {
                    hash_value(&mut hasher, row.get_ref(i)?);
                }
                n += 1;
            }
            hasher.update(&n.to_le_bytes());
            counts.push((table, n));
        }
        Ok((Hash(*hasher.finalize().as_bytes()), counts))
    }

    /// How many events the projection skipped because this build could not read them.
    pub fn unreadable(&self) -> Result<u64, SqliteError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM spool_unreadable", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn primary_key(&self, table: &str) -> Result<Vec<String>, SqliteError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, pk FROM pragma_table_info(?1) WHERE pk > 0 ORDER BY pk")?;
        let cols = stmt.query_map([table], |r| r.get::<_, String>(0))?;
        let mut out: Vec<String> = cols
            .map(|c| c.map(|c| format!("\"{c}\"")))
            .collect::<Result<_, _>>()?;
        if out.is_empty() {
            out.push("rowid".into());
        }
        Ok(out)
    }

    /// Every row of `table` in primary-key order, as JSON objects (for tests and tools).
    pub fn rows(
        &self,
        table: &str,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, SqliteError> {
        if !self.tables()?.iter().any(|t| t == table) {
            return Err(SqliteError::Sql(rusqlite::Error::InvalidParameterName(
                table.to_owned(),
            )));
        }
        let key = self.primary_key(table)?;
        let mut out = Vec::new();
        self.query_rows(
            &format!("SELECT * FROM \"{table}\" ORDER BY {}", key.join(", ")),
            &mut |names, values| {
                out.push(names.iter().cloned().zip(values).collect());
            },
        )?;
        Ok(out)
    }

    /// Runs one read-only statement; calls `row` with the column names and each row's values.
    /// The statement is bounded: [`QUERY_TIME_MAX`], [`QUERY_VALUE_BYTES_MAX`] for any one
    /// string or blob it makes, and [`QUERY_MEMORY_BYTES_MAX`] of SQLite's memory in all.
    pub fn query(
        &mut self,
        sql: &str,
        mut row: impl FnMut(&[String], Vec<serde_json::Value>),
    ) -> Result<(), SqliteError> {
        use rusqlite::limits::Limit;
        self.conn
            .set_limit(Limit::SQLITE_LIMIT_LENGTH, QUERY_VALUE_BYTES_MAX)?;
        self.conn
            .pragma_update(None, "hard_heap_limit", QUERY_MEMORY_BYTES_MAX)?;
        let deadline = std::time::Instant::now() + QUERY_TIME_MAX;
        self.conn
            .progress_handler(10_000, Some(move || std::time::Instant::now() > deadline))?;
        let ran = self.query_rows(sql, &mut row);
        self.conn.progress_handler(0, None::<fn() -> bool>)?;
        ran.map_err(|e| match e {
            SqliteError::Sql(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::OperationInterrupted =>
            {
                SqliteError::QueryLimit(format!("it ran past {} s", QUERY_TIME_MAX.as_secs()))
            }
            SqliteError::Sql(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::OutOfMemory =>
            {
                SqliteError::QueryLimit(format!(
                    "it needed more than {} MiB of memory",
                    QUERY_MEMORY_BYTES_MAX >> 20
                ))
            }
            SqliteError::Sql(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::TooBig =>
            {
                SqliteError::QueryLimit(format!(
                    "it made a value over {} MiB",
                    QUERY_VALUE_BYTES_MAX >> 20
                ))
            }
            other => other,
        })
    }

    fn query_rows(
        &self,
        sql: &str,
        row: &mut impl FnMut(&[String], Vec<serde_json::Value>),
    ) -> Result<(), SqliteError> {
        let mut stmt = self.conn.prepare(sql)?;
        let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let values = (0..names.len())
                .map(|i| r.get_ref(i).map(json_value))
                .collect::<Result<Vec<_>, _>>()?;
            row(&names, values);
        }
        Ok(())
    }

    /// Completes a rebuild: creates the secondary indexes it deferred and makes the file
    /// durable (a rebuild writes without syncing) before it is renamed into place.
    pub fn finish(self) -> Result<(), SqliteError> {
        if self.indexes_deferred {
            self.conn.execute_batch(INDEXES)?;
        }
        let path = self.conn.path().map(std::path::PathBuf::from);
        self.conn.close().map_err(|(_, e)| SqliteError::Sql(e))?;
        if let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(path)?.sync_all()?;
        }
        Ok(())
    }
}

fn hash_value(hasher: &mut blake3::Hasher, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => {
            hasher.update(&[0]);
        }
        ValueRef::Integer(i) => {
            hasher.update(&[1]);
            hasher.update(&i.to_le_bytes());
        }
        ValueRef::Real(f) => {
            hasher.update(&[2]);
            hasher.update(&f.to_bits().to_le_bytes());
        }
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            hasher.update(&[if matches!(value, ValueRef::Text(_)) {
                3
            } else {
                4
            }]);
            hasher.update(&(t.len() as u64).to_le_bytes());
            hasher.update(t);
        }
    }
}

fn json_value(value: ValueRef<'_>) -> serde_json::Value {
    match value {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(f) => f.into(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
        ValueRef::Blob(b) => hex::encode(b).into(),
    }
}

impl ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Val::Real(f) => ToSqlOutput::Borrowed(ValueRef::Real(*f)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

/// One statement's shape (table, columns and groups) with its SQL, and the open transaction's
/// rows waiting for it.
struct Shape {
    /// Its place among the shapes.
    id: usize,
    sql: String,
    inserts: Vec<Vec<(&'static str, Val)>>,
    /// What `inserts` hold in values.
    inserts_bytes: usize,
}

impl Shape {
    fn new(id: usize, sql: String) -> Result<Shape, SqliteError> {
        Ok(Shape {
            id,
            sql,
            inserts: Vec::new(),
            inserts_bytes: 0,
        })
    }
}

/// Writes the inserts waiting in `shape` with its one prepared statement.
fn execute(conn: &Connection, shape: &mut Shape) -> Result<(), SqliteError> {
    if shape.inserts.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(&shape.sql)?;
    shape.inserts_bytes = 0;
    for row in shape.inserts.drain(..) {
        for (i, (_, v)) in row.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, v)?;
        }
        stmt.raw_execute()?;
    }
    Ok(())
}

/// Writes one merged row with its shape's statement (key, then each group's columns and stamp).
fn upsert(stmt: &mut rusqlite::CachedStatement<'_>, row: &Row) -> Result<(), SqliteError> {
    let mut i = 0;
    for (_, v) in &row.key {
        i += 1;
        stmt.raw_bind_parameter(i, v)?;
    }
    for (g, stamp) in row.groups.iter().zip(&row.stamps) {
        for (_, v) in &g.cols {
            i += 1;
            stmt.raw_bind_parameter(i, v)?;
        }
        i += 1;
        stmt.raw_bind_parameter(i, &stamp[..])?;
    }
    stmt.raw_execute()?;
    Ok(())
}

impl Target for Sqlite {
    type Error = SqliteError;

    fn checkpoint(&mut self) -> Result<Checkpoint, SqliteError> {
        let (position, hash, _) = Sqlite::checkpoint(self)?;
        let heads: Option<String> =
            self.conn
                .query_row("SELECT heads FROM spool_checkpoint WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
        let heads = heads
            .map(|text| super::parse_heads(&text))
            .transpose()
            .map_err(SqliteError::Checkpoint)?;
        Ok(Checkpoint {
            position,
            hash,
            heads,
        })
    }

    fn held_bytes_max(&self) -> usize {
        self.held_bytes_max
    }

    /// Starts from nothing: a transaction left open by a failed replay is rolled back, and
    /// its waiting rows dropped.
    fn begin(&mut self) -> Result<(), SqliteError> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
        }
        for shape in self.shapes.iter_mut() {
            shape.inserts.clear();
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Inserts of one shape wait and are written in runs of [`INSERT_RUN`].
    fn insert(
        &mut self,
        table: &'static str,
        cols: Vec<(&'static str, Val)>,
    ) -> Result<(), SqliteError> {
        let names = std::iter::once(table).chain(cols.iter().map(|c| c.0));
        let id = self.shapes.len();
        let shape = self.shapes.find(names, || {
            let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
            Shape::new(id, sql::insert(table, &names, &sql::values(names.len())))
        })?;
        shape.inserts_bytes += cols.iter().map(|c| c.1.held_bytes()).sum::<usize>();
        shape.inserts.push(cols);
        if shape.inserts.len() >= INSERT_RUN || shape.inserts_bytes >= INSERT_RUN_BYTES {
            execute(&self.conn, shape)?;
        }
        Ok(())
    }

    /// Writes the waiting inserts, then the merged rows in (table, key) order, each with its
    /// shape's prepared statement, so every table is written front to back; the checkpoint;
    /// and commits.
    fn commit(
        &mut self,
        rows: Vec<Row>,
        position: u64,
        hash: Hash,
        applied: u64,
        heads: &Applied,
    ) -> Result<(), SqliteError> {
        for shape in self.shapes.iter_mut() {
            execute(&self.conn, shape)?;
        }
        let mut statements: Vec<Option<rusqlite::CachedStatement<'_>>> = Vec::new();
        let mut last: Option<(&Row, usize)> = None;
        for row in &rows {
            // Rows come sorted by table, so a row mostly has the shape of the one before it.
            let id = match last {
                Some((prev, id)) if same_names(sql::row_shape(prev), sql::row_shape(row)) => id,
                _ => {
                    let id = self.shapes.len();
                    self.shapes
                        .find(sql::row_shape(row), || {
                            Shape::new(id, sql::upsert(row, &sql::values(sql::columns(row).len())))
                        })?
                        .id
                }
            };
            last = Some((row, id));
            if statements.len() <= id {
                statements.resize_with(id + 1, || None);
            }
            let stmt = match &mut statements[id] {
                Some(stmt) => stmt,
                slot => slot.insert(self.conn.prepare_cached(&self.shapes.list[id].1.sql)?),
            };
            upsert(stmt, row)?;
        }
        drop(statements);
        // Freeing a large batch (about ten allocations a row, made on the projecting thread) took
        // a third of this commit's time in the rebuild bench's profile: another thread does it
        // while this one writes the pages. One batch at a time, so memory stays bounded.
        if rows.len() >= FREED_APART_ROWS {
            if let Some(previous) = self.freeing.take() {
                let _ = previous.join();
            }
            self.freeing = std::thread::Builder::new()
                .name("spool-free".into())
                .spawn(move || drop(rows))
                .ok();
        }
        self.conn.execute(
            "UPDATE spool_checkpoint SET position = ?1, hash = ?2, events = events + ?3, \
             heads = ?4 WHERE id = 1",
            rusqlite::params![
                position as i64,
                hash.0.as_slice(),
                applied as i64,
                super::heads_text(heads)
            ],
        )?;
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }
}

/// Whether two statement shapes name the same constants: compared by address and length, which
/// is exact when it says yes; a no only sends the caller to [`sql::Shapes::find`].
fn same_names<'a>(a: impl Iterator<Item = &'a str>, b: impl Iterator<Item = &'a str>) -> bool {
    let at = |s: &str| (s.as_ptr(), s.len());
    a.map(at).eq(b.map(at))
}
