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

/// Statement shapes (a table, its columns and groups) with what a target keeps for each, found
/// by a hash of the names' addresses (names are the projector's constants, so this costs no
/// string hashing per row) and confirmed by comparing the names themselves.
pub struct Shapes<S> {
    pub list: Vec<(Vec<&'static str>, S)>,
    by_hash: std::collections::HashMap<u64, usize>,
}

impl<S> Default for Shapes<S> {
    fn default() -> Self {
        Shapes {
            list: Vec::new(),
            by_hash: Default::default(),
        }
    }
}

impl<S> Shapes<S> {
    /// The shape named by `names`, made by `make` on first use.
    pub fn find<E>(
        &mut self,
        names: impl Iterator<Item = &'static str> + Clone,
        make: impl FnOnce() -> Result<S, E>,
    ) -> Result<&mut S, E> {
        let mut hash = names.clone().fold(0xcbf2_9ce4_8422_2325_u64, |h, n| {
            let h = (h ^ n.as_ptr() as u64).wrapping_mul(0x0100_0000_01b3);
            (h ^ n.len() as u64).wrapping_mul(0x0100_0000_01b3)
        });
        let at = loop {
            match self.by_hash.get(&hash) {
                Some(&at) if self.list[at].0.iter().copied().eq(names.clone()) => break at,
                Some(_) => hash = hash.wrapping_add(1),
                None => {
                    self.list.push((names.collect(), make()?));
                    self.by_hash.insert(hash, self.list.len() - 1);
                    break self.list.len() - 1;
                }
            }
        };
        Ok(&mut self.list[at].1)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut S> {
        self.list.iter_mut().map(|(_, s)| s)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }
}

/// The names that make a merged row's statement shape: table, then per group its rule, stamp
/// and columns, then the key.
pub fn row_shape(row: &Row) -> impl Iterator<Item = &'static str> + Clone + '_ {
    std::iter::once(row.table)
        .chain(row.key.iter().map(|c| c.0))
        .chain(row.groups.iter().flat_map(|g| {
            [
                match g.rule {
                    Rule::Newer => ">",
                    Rule::Older => "<",
                },
                g.stamp,
            ]
            .into_iter()
            .chain(g.cols.iter().map(|c| c.0))
        }))
}
