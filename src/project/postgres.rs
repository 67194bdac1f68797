//! The Postgres target: the Supabase table families (`projections/postgres/schema.sql`), with
//! one checkpoint per projecting node written in the same transaction as the rows it covers.
//!
//! Rows travel as one JSON record set per statement (`jsonb_populate_recordset`), so a run of
//! up to [`ROWS_PER_STATEMENT`] rows is one round trip, and Postgres itself turns each value
//! into its column's type. Writes are idempotent and commutative (inserts if absent, stamped
//! upserts), so several nodes may project the same events into one database at once; two
//! transactions that wait on each other's rows are a deadlock Postgres breaks by failing one,
//! which [`is_retryable`] recognises and the caller retries from its checkpoint.
//!
//! Boundary: the only module that imports postgres. Table and column names come from the
//! projector's constants; every value is inside the JSON parameter.

use std::collections::{HashMap, HashSet};

use postgres::{Client, NoTls, Statement};

use super::merge::Row;
use super::{sql, Target, Val};
use crate::event::{Hash, Origin};

/// The DDL, shipped as a file so it can be read and diffed.
pub const SCHEMA: &str = include_str!("../../projections/postgres/schema.sql");
/// Bumped whenever `SCHEMA` changes: an older database is refused, not misread.
pub const SCHEMA_VERSION: i64 = 1;
/// Rows sent in one statement.
pub const ROWS_PER_STATEMENT: usize = 4_096;
/// Memory for merged rows held until commit.
pub const HELD_BYTES: usize = 64 << 20;
/// Serialises schema creation between nodes that start projecting at once.
const SCHEMA_LOCK: i64 = 0x7370_6f6f_6c00_0001;

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("{0}")]
    Sql(#[from] postgres::Error),
    #[error("the database's spool schema is version {found}, this build writes {SCHEMA_VERSION}")]
    OtherSchema { found: i64 },
    #[error("the checkpoint of node {node} holds a hash of {len} bytes")]
    BadCheckpoint { node: String, len: usize },
}

/// Whether a failed transaction can simply be run again (a deadlock or serialization failure
/// between concurrent projectors).
pub fn is_retryable(error: &PostgresError) -> bool {
    use postgres::error::SqlState;
    match error {
        PostgresError::Sql(e) => matches!(
            e.code(),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
        ),
        _ => false,
    }
}

/// A connection projecting one node's log into the database.
pub struct Postgres {
    client: Client,
    /// The projecting node's origin, hex: its checkpoint row.
    node: String,
    /// Columns whose values are JSON (embedded as is) or bytes (sent as `\x` hex).
    json_columns: HashSet<(String, String)>,
    byte_columns: HashSet<(String, String)>,
    /// One statement per shape (table, columns, groups), and the rows waiting for it.
    shapes: HashMap<Vec<&'static str>, Shape>,
    held_bytes_max: usize,
}

struct Shape {
    sql: String,
    statement: Option<Statement>,
    /// The JSON keys of each row, and how each column's value is written.
    columns: Vec<&'static str>,
    kinds: Vec<Column>,
    /// The waiting rows as a JSON array, and how many.
    rows: String,
    count: usize,
}

/// How a column's value is written into the JSON record set.
#[derive(Clone, Copy)]
enum Column {
    Plain,
    /// `jsonb`: the value is JSON text (validated at append) and is embedded as is.
    Json,
    /// `bytea`: Postgres's `\x` hex form.
    Bytes,
}

impl Postgres {
    /// Connects to `url` and creates the schema if the database has none.
    pub fn connect(url: &str, node: Origin) -> Result<Postgres, PostgresError> {
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute("SET client_min_messages = error")?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('spool_meta') IS NOT NULL", &[])?
            .get(0);
        if !exists {
            tx.batch_execute(SCHEMA)?;
            tx.execute(
                "INSERT INTO spool_meta (id, schema_version) VALUES (1, $1)",
                &[&SCHEMA_VERSION],
            )?;
        }
        let found: i64 = tx
            .query_one("SELECT schema_version FROM spool_meta WHERE id = 1", &[])?
            .get(0);
        tx.commit()?;
        if found != SCHEMA_VERSION {
            return Err(PostgresError::OtherSchema { found });
        }
        let mut json_columns = HashSet::new();
        let mut byte_columns = HashSet::new();
        for row in client.query(
            "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = current_schema()",
            &[],
        )? {
            let key = (row.get::<_, String>(0), row.get::<_, String>(1));
            match row.get::<_, String>(2).as_str() {
                "jsonb" | "json" => json_columns.insert(key),
                "bytea" => byte_columns.insert(key),
                _ => false,
            };
        }
        Ok(Postgres {
            client,
            node: node.to_hex(),
            json_columns,
            byte_columns,
            shapes: HashMap::new(),
            held_bytes_max: HELD_BYTES,
        })
    }

    /// Sets how many bytes of merged rows a replay into this target holds before it commits.
    pub fn hold_at_most(&mut self, bytes: usize) {
        self.held_bytes_max = bytes;
    }

    /// The checkpoint of this node: position, hash and events applied.
    pub fn checkpoint(&mut self) -> Result<(u64, Hash, u64), PostgresError> {
        let row = self.client.query_opt(
            "SELECT position, hash, events FROM spool_checkpoints WHERE node = $1",
            &[&self.node],
        )?;
        let Some(row) = row else {
            return Ok((0, Hash::ZERO, 0));
        };
        let hash: Vec<u8> = row.get(1);
        let len = hash.len();
        let hash = hash.try_into().map_err(|_| PostgresError::BadCheckpoint {
            node: self.node.clone(),
            len,
        })?;
        Ok((
            row.get::<_, i64>(0) as u64,
            Hash(hash),
            row.get::<_, i64>(2) as u64,
        ))
    }

    /// The connection, for queries.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Adds a row (`values` of `columns`) to the waiting set of its shape (`shape`: the table,
    /// columns and groups); sends the set when it is full.
    fn push(
        &mut self,
        shape: Vec<&'static str>,
        table: &'static str,
        columns: &[&'static str],
        values: &[&Val],
        sql: impl FnOnce() -> String,
    ) -> Result<(), PostgresError> {
        let (json_columns, byte_columns) = (&self.json_columns, &self.byte_columns);
        let shape = self.shapes.entry(shape).or_insert_with(|| {
            let kinds = columns
                .iter()
                .map(|c| {
                    let column = (table.to_owned(), (*c).to_owned());
                    match (
                        json_columns.contains(&column),
                        byte_columns.contains(&column),
                    ) {
                        (true, _) => Column::Json,
                        (_, true) => Column::Bytes,
                        _ => Column::Plain,
                    }
                })
                .collect();
            Shape {
                sql: sql(),
                statement: None,
                columns: columns.to_vec(),
                kinds,
                rows: String::new(),
                count: 0,
            }
        });
        shape.rows.push(if shape.count == 0 { '[' } else { ',' });
        shape.rows.push('{');
        for (i, ((name, kind), v)) in shape
            .columns
            .iter()
            .zip(&shape.kinds)
            .zip(values)
            .enumerate()
        {
            if i > 0 {
                shape.rows.push(',');
            }
            shape.rows.push('"');
            shape.rows.push_str(name);
            shape.rows.push_str("\":");
            json_value(&mut shape.rows, v, *kind);
        }
        shape.rows.push('}');
        shape.count += 1;
        if shape.count >= ROWS_PER_STATEMENT {
            send(&mut self.client, shape)?;
        }
        Ok(())
    }

    fn send_all(&mut self) -> Result<(), PostgresError> {
        for shape in self.shapes.values_mut() {
            send(&mut self.client, shape)?;
        }
        Ok(())
    }
}

/// Sends a shape's waiting rows as one statement.
fn send(client: &mut Client, shape: &mut Shape) -> Result<(), PostgresError> {
    if shape.count == 0 {
        return Ok(());
    }
    shape.rows.push(']');
    let statement = match &shape.statement {
        Some(s) => s.clone(),
        None => {
            let s = client.prepare(&shape.sql)?;
            shape.statement = Some(s.clone());
            s
        }
    };
    let rows = std::mem::take(&mut shape.rows);
    shape.count = 0;
    client.execute(&statement, &[&RecordSet(&rows)])?;
    Ok(())
}

/// The source of a statement's rows: the JSON array parameter as records of `table`.
fn record_set(table: &str, names: &[&str]) -> String {
    format!(
        "SELECT {} FROM jsonb_populate_recordset(NULL::{table}, $1)",
        names.join(", ")
    )
}

/// A JSON array of rows sent as a `jsonb` parameter (version byte, then the text).
#[derive(Debug)]
struct RecordSet<'a>(&'a str);

impl postgres::types::ToSql for RecordSet<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == postgres::types::Type::JSONB {
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(postgres::types::IsNull::No)
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        matches!(
            *ty,
            postgres::types::Type::JSONB | postgres::types::Type::JSON
        )
    }

    postgres::types::to_sql_checked!();
}

/// Writes one value as JSON: JSON columns embed their (validated) JSON text as is, byte columns
/// take Postgres's `\x` hex form, text is escaped by serde_json.
fn json_value(out: &mut String, v: &Val, kind: Column) {
    use std::fmt::Write as _;
    match (v, kind) {
        (Val::Null, _) => out.push_str("null"),
        (Val::Int(i), _) => {
            let _ = write!(out, "{i}");
        }
        (Val::Real(f), _) => {
            let _ = write!(out, "{}", serde_json::Value::from(*f));
        }
        (Val::Text(t), Column::Json) => out.push_str(t),
        (Val::Text(t), _) => {
            let _ = write!(out, "{}", serde_json::Value::from(t.as_str()));
        }
        (Val::Blob(b), _) => {
            out.push_str("\"\\\\x");
            out.push_str(&hex::encode(b));
            out.push('"');
        }
    }
}

impl Target for Postgres {
    type Error = PostgresError;

    fn checkpoint(&mut self) -> Result<(u64, Hash), PostgresError> {
        let (position, hash, _) = Postgres::checkpoint(self)?;
        Ok((position, hash))
    }

    fn held_bytes_max(&self) -> usize {
        self.held_bytes_max
    }

    /// Starts from nothing: a transaction a failed replay left open is rolled back and its
    /// waiting rows dropped.
    fn begin(&mut self) -> Result<(), PostgresError> {
        for shape in self.shapes.values_mut() {
            shape.rows.clear();
            shape.count = 0;
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
    ) -> Result<(), PostgresError> {
        let result = self.commit_rows(rows, position, hash, applied);
        self.rolled_back_on_error(result)
    }
}

impl Postgres {
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
        let columns: Vec<&'static str> = cols.iter().map(|c| c.0).collect();
        let shape = std::iter::once(table)
            .chain(columns.iter().copied())
            .collect();
        let values: Vec<&Val> = cols.iter().map(|c| &c.1).collect();
        self.push(shape, table, &columns, &values, || {
            sql::insert(table, &columns, &record_set(table, &columns))
        })
    }

    fn commit_rows(
        &mut self,
        rows: Vec<Row>,
        position: u64,
        hash: Hash,
        applied: u64,
    ) -> Result<(), PostgresError> {
        // Inserts first, then the merged rows in (table, key) order.
        self.send_all()?;
        for row in &rows {
            let columns = sql::columns(row);
            let mut shape = vec![row.table, "|"];
            for g in &row.groups {
                shape.push(match g.rule {
                    super::Rule::Newer => ">",
                    super::Rule::Older => "<",
                });
                shape.push(g.stamp);
            }
            shape.extend(columns.iter().copied());
            let stamps: Vec<Val> = row.stamps.iter().map(|s| Val::Blob(s.to_vec())).collect();
            let mut values: Vec<&Val> = row.key.iter().map(|c| &c.1).collect();
            for (g, stamp) in row.groups.iter().zip(&stamps) {
                values.extend(g.cols.iter().map(|c| &c.1));
                values.push(stamp);
            }
            let table = row.table;
            self.push(shape, table, &columns, &values, || {
                sql::upsert(row, &record_set(table, &columns))
            })?;
        }
        self.send_all()?;
        self.client.execute(
            "INSERT INTO spool_checkpoints (node, position, hash, events) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (node) DO UPDATE SET position = excluded.position, hash = excluded.hash, \
             events = spool_checkpoints.events + excluded.events, updated_at = now()",
            &[
                &self.node,
                &(position as i64),
                &hash.0.as_slice(),
                &(applied as i64),
            ],
        )?;
        self.client.batch_execute("COMMIT")?;
        Ok(())
    }
}
