//! SQL text shared by the targets: the statements that write append-only and merged rows. Table
//! and column names are the projector's constants, never event data; values are parameters.
//!
//! Boundary: text only; each target supplies how its values arrive (`VALUES (?, ...)` in
//! SQLite, a JSON record set in Postgres) and runs the statements itself.

use std::fmt::Write as _;

use super::merge::Row;
use super::Rule;

/// The columns of a merged row in the order its values are bound: the key, then per group its
/// columns and its stamp column.
pub fn columns(row: &Row) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = row.key.iter().map(|c| c.0).collect();
    for g in &row.groups {
        names.extend(g.cols.iter().map(|c| c.0));
        names.push(g.stamp);
    }
    names
}

/// Inserts rows whose key is absent: `source` yields the values of `names`.
pub fn insert(table: &str, names: &[&str], source: &str) -> String {
    format!(
        "INSERT INTO {table} ({}) {source} ON CONFLICT DO NOTHING",
        names.join(", ")
    )
}

/// Creates each row if absent, and writes each of its groups only if the group's stamp wins
/// against the stored one (a stored NULL stamp always loses). `source` yields the values of
/// [`columns`].
pub fn upsert(row: &Row, source: &str) -> String {
    let table = row.table;
    let keys: Vec<&str> = row.key.iter().map(|c| c.0).collect();
    let mut sets = Vec::new();
    for g in &row.groups {
        let s = g.stamp;
        let op = match g.rule {
            Rule::Newer => ">",
            Rule::Older => "<",
        };
        let wins = format!("({table}.{s} IS NULL OR excluded.{s} {op} {table}.{s})");
        for col in g.cols.iter().map(|c| c.0).chain([s]) {
            sets.push(format!(
                "{col} = CASE WHEN {wins} THEN excluded.{col} ELSE {table}.{col} END"
            ));
        }
    }
    let mut sql = format!(
        "INSERT INTO {table} ({}) {source} ON CONFLICT ({}) DO ",
        columns(row).join(", "),
        keys.join(", ")
    );
    match sets.is_empty() {
        true => sql.push_str("NOTHING"),
        false => {
            let _ = write!(sql, "UPDATE SET {}", sets.join(", "));
        }
    }
    sql
}

/// `VALUES (?, ?, ...)` for `n` values (SQLite's parameters).
pub fn values(n: usize) -> String {
    format!("VALUES ({})", vec!["?"; n].join(", "))
}
