//! A batch's writes to mutable rows, merged per row before any target sees them.
//!
//! Invariant: merging is exact. Each column group's rule picks one stamp whatever the order
//! (the newest, or the oldest for first-writer-wins facts), and every write to a group sets all
//! of its columns, so keeping only each group's winner within a batch and letting the target
//! compare it against the stored row gives the rows that writing every event one by one gives.
//! A batch then writes each mutable row once, however many events changed it. Rows are found
//! by their table's and key columns' names as addresses: were one name ever two constants, a
//! row would be held twice and written twice, each group still landing only if its stamp wins,
//! so the rows would be the same.
//!
//! Boundary: pure; knows rows and stamps, nothing of SQL.

use std::cmp::Ordering;
use std::hash::{BuildHasher, Hash, Hasher};

use super::{Group, Rule, Val};

/// One mutable row's merged writes: per group, the winning columns and their stamp.
#[derive(Debug)]
pub struct Row {
    pub table: &'static str,
    pub key: Vec<(&'static str, Val)>,
    pub groups: Vec<Group>,
    pub stamps: Vec<[u8; 24]>,
}

/// The merged rows of one batch and about how much memory they hold.
#[derive(Default)]
pub struct Merged {
    rows: Vec<Row>,
    /// Finds a row by a hash of its table and key.
    index: hashbrown::HashTable<usize>,
    bytes: usize,
}

/// Bytes a held row takes besides its values (a rough count, for the memory bound).
const ROW_BYTES: usize = 160;

impl Merged {
    /// Adds one write: creates the row if this batch has not touched it, and keeps each
    /// group's write if it wins under the group's rule.
    pub fn add(
        &mut self,
        table: &'static str,
        key: Vec<(&'static str, Val)>,
        stamp: [u8; 24],
        groups: Vec<Group>,
    ) {
        let hash = row_hash(table, &key);
        let rows = &mut self.rows;
        let at = match self
            .index
            .find(hash, |&at| same_row(&rows[at], table, &key))
        {
            Some(&at) => at,
            None => {
                self.bytes += ROW_BYTES + weight(&key);
                rows.push(Row {
                    table,
                    key,
                    groups: Vec::with_capacity(groups.len()),
                    stamps: Vec::with_capacity(groups.len()),
                });
                let at = rows.len() - 1;
                self.index
                    .insert_unique(hash, at, |&at| row_hash(rows[at].table, &rows[at].key));
                at
            }
        };
        let row = &mut rows[at];
        for g in groups {
            match row.groups.iter().position(|m| m.stamp == g.stamp) {
                Some(i) if wins(g.rule, &stamp, &row.stamps[i]) => {
                    self.bytes += weight(&g.cols);
                    row.stamps[i] = stamp;
                    row.groups[i] = g;
                }
                Some(_) => {}
                None => {
                    self.bytes += weight(&g.cols);
                    row.groups.push(g);
                    row.stamps.push(stamp);
                }
            }
        }
    }

    /// About how many bytes the merged rows take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows in (table, key) order, so a target writes each index front to back, with each
    /// row's groups in stamp-column order, so equal sets of groups have one shape.
    pub fn into_rows(self) -> Vec<Row> {
        let mut rows = self.rows;
        for row in &mut rows {
            // A row has a few groups: an insertion sort, in place, moving each stamp along.
            for i in 1..row.groups.len() {
                let mut j = i;
                while j > 0 && row.groups[j - 1].stamp > row.groups[j].stamp {
                    row.groups.swap(j - 1, j);
                    row.stamps.swap(j - 1, j);
                    j -= 1;
                }
            }
        }
        rows.sort_unstable_by(|a, b| a.table.cmp(b.table).then_with(|| key_order(&a.key, &b.key)));
        rows
    }
}

/// Whether a write stamped `new` replaces one stamped `old` under `rule`.
pub fn wins(rule: Rule, new: &[u8; 24], old: &[u8; 24]) -> bool {
    match rule {
        Rule::Newer => new > old,
        Rule::Older => new < old,
    }
}

/// Whether `row` is the row of `table` with `key`: names (projector constants) compared by
/// address, as [`row_hash`] hashes the table, so a batch finds the rows it holds without comparing
/// text; values by content.
fn same_row(row: &Row, table: &'static str, key: &[(&'static str, Val)]) -> bool {
    std::ptr::eq(row.table, table)
        && row.key.len() == key.len()
        && row
            .key
            .iter()
            .zip(key)
            .all(|(a, b)| std::ptr::eq(a.0, b.0) && a.1 == b.1)
}

/// A row's hash: its table (a projector constant, by address) and its key values.
fn row_hash(table: &'static str, key: &[(&'static str, Val)]) -> u64 {
    let mut h = foldhash::fast::FixedState::default().build_hasher();
    table.as_ptr().hash(&mut h);
    for (_, v) in key {
        match v {
            Val::Null => 0u8.hash(&mut h),
            Val::Int(i) => i.hash(&mut h),
            Val::Real(f) => f.to_bits().hash(&mut h),
            Val::Text(t) => t.hash(&mut h),
            Val::Blob(b) => b.hash(&mut h),
        }
    }
    h.finish()
}

/// Key values in SQL's order: NULL, numbers, text, blobs; text and blobs bytewise.
fn key_order(a: &[(&'static str, Val)], b: &[(&'static str, Val)]) -> Ordering {
    fn rank(v: &Val) -> u8 {
        match v {
            Val::Null => 0,
            Val::Int(_) | Val::Real(_) => 1,
            Val::Text(_) => 2,
            Val::Blob(_) => 3,
        }
    }
    let one = |(x, y): (&(&str, Val), &(&str, Val))| match (&x.1, &y.1) {
        (Val::Int(x), Val::Int(y)) => x.cmp(y),
        (Val::Real(x), Val::Real(y)) => x.total_cmp(y),
        (Val::Text(x), Val::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Val::Blob(x), Val::Blob(y)) => x.cmp(y),
        (x, y) => rank(x).cmp(&rank(y)),
    };
    a.iter()
        .zip(b)
        .map(one)
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// About how many bytes `cols` take in memory.
fn weight(cols: &[(&'static str, Val)]) -> usize {
    cols.iter()
        .map(|(_, v)| match v {
            Val::Text(t) => 40 + t.len(),
            Val::Blob(b) => 40 + b.len(),
            _ => 40,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(n: u8) -> [u8; 24] {
        [n; 24]
    }

    fn group(name: &'static str, rule: Rule, v: i64) -> Group {
        Group {
            stamp: name,
            rule,
            cols: vec![("v", Val::Int(v))],
        }
    }

    #[test]
    fn each_group_keeps_its_winner_whatever_the_order() {
        let writes = [
            (stamp(2), group("a", Rule::Newer, 2)),
            (stamp(3), group("a", Rule::Newer, 3)),
            (stamp(1), group("a", Rule::Newer, 1)),
            (stamp(5), group("claim", Rule::Older, 5)),
            (stamp(4), group("claim", Rule::Older, 4)),
        ];
        let mut results = Vec::new();
        for order in [[0, 1, 2, 3, 4], [2, 1, 0, 4, 3], [1, 4, 2, 3, 0]] {
            let mut m = Merged::default();
            for i in order {
                let (s, g) = writes[i].clone();
                m.add("t", vec![("id", Val::Text("x".into()))], s, vec![g]);
            }
            let rows = m.into_rows();
            assert_eq!(rows.len(), 1);
            let got: Vec<(&str, Val, [u8; 24])> = rows[0]
                .groups
                .iter()
                .zip(&rows[0].stamps)
                .map(|(g, s)| (g.stamp, g.cols[0].1.clone(), *s))
                .collect();
            results.push(got);
        }
        assert_eq!(
            results[0],
            vec![
                ("a", Val::Int(3), stamp(3)),
                ("claim", Val::Int(4), stamp(4))
            ]
        );
        assert!(results.iter().all(|r| r == &results[0]));
    }

    #[test]
    fn rows_come_out_by_table_then_key_and_apart_by_key() {
        let mut m = Merged::default();
        for (table, key) in [("b", "2"), ("a", "10"), ("b", "1"), ("a", "9"), ("a", "10")] {
            m.add(
                table,
                vec![("id", Val::Text(key.into()))],
                stamp(1),
                vec![group("g", Rule::Newer, 0)],
            );
        }
        let got: Vec<(&str, Val)> = m
            .into_rows()
            .into_iter()
            .map(|r| (r.table, r.key[0].1.clone()))
            .collect();
        let text = |s: &str| Val::Text(s.into());
        assert_eq!(
            got,
            vec![
                ("a", text("10")),
                ("a", text("9")),
                ("b", text("1")),
                ("b", text("2"))
            ]
        );
    }

    #[test]
    fn memory_grows_with_new_rows_and_winning_writes_only() {
        let mut m = Merged::default();
        let key = || vec![("id", Val::Text("x".into()))];
        m.add("t", key(), stamp(2), vec![group("a", Rule::Newer, 1)]);
        let one = m.bytes();
        assert!(one > 0);
        m.add("t", key(), stamp(1), vec![group("a", Rule::Newer, 1)]);
        assert_eq!(m.bytes(), one, "a losing write holds nothing more");
        m.add("t", key(), stamp(3), vec![group("a", Rule::Newer, 1)]);
        assert!(m.bytes() > one);
    }
}
