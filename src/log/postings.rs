//! The stream postings of events written since the last flush of the `streams` table.
//!
//! Invariant: `drain` gives, for every stream pushed, exactly the positions pushed with it, in
//! the order pushed. Streams are grouped by a seeded 64-bit hash, and names are compared when
//! drained, so two streams whose hashes collide are still told apart.
//!
//! Boundary: memory only; the writer decides when to flush and writes the result.

use std::hash::BuildHasher;

/// Postings in push order: one flat entry per event, so the writer's per-event cost is a hash
/// and a push (a map of per-stream lists cost it a third of its time in `benches/append.rs`).
pub(super) struct Postings<S = foldhash::fast::RandomState> {
    hasher: S,
    entries: Vec<(u64, u64, String)>,
}

impl Default for Postings {
    fn default() -> Self {
        Postings::with_hasher(foldhash::fast::RandomState::default())
    }
}

impl<S: BuildHasher> Postings<S> {
    fn with_hasher(hasher: S) -> Self {
        Postings {
            hasher,
            entries: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, stream: String, position: u64) {
        let hash = self.hasher.hash_one(stream.as_str());
        self.entries.push((hash, position, stream));
    }

    /// Events pushed since the last drain.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Takes every posting: `(stream, positions)` sorted by stream.
    pub(super) fn drain(&mut self) -> Vec<(String, Vec<u64>)> {
        let mut entries = std::mem::take(&mut self.entries);
        // Positions are pushed ascending, so a stable sort on the hash keeps them ascending.
        entries.sort_by_key(|e| e.0);
        let mut out = Vec::new();
        let mut rest = entries.as_mut_slice();
        while let Some((&mut (hash, ..), _)) = rest.split_first_mut() {
            let same = rest.iter().take_while(|e| e.0 == hash).count();
            let (group, tail) = rest.split_at_mut(same);
            if group.iter().any(|e| e.2 != group[0].2) {
                group.sort_by(|a, b| a.2.cmp(&b.2)); // Stable: positions stay ascending.
            }
            let mut group = &mut group[..];
            while let Some((first, _)) = group.split_first_mut() {
                let name = std::mem::take(&mut first.2);
                let n = 1 + group[1..].iter().take_while(|e| e.2 == name).count();
                out.push((name, group[..n].iter().map(|e| e.1).collect()));
                group = &mut group[n..];
            }
            rest = tail;
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasherDefault;

    /// Every stream hashes alike.
    #[derive(Default)]
    struct Colliding;
    impl std::hash::Hasher for Colliding {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    fn check<S: BuildHasher>(mut postings: Postings<S>) {
        let pushes = [("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("b", 6)];
        for (stream, position) in pushes {
            postings.push(stream.into(), position);
        }
        assert_eq!(postings.len(), 6);
        let expected = vec![
            ("a".to_owned(), vec![2, 5]),
            ("b".to_owned(), vec![1, 3, 6]),
            ("c".to_owned(), vec![4]),
        ];
        assert_eq!(postings.drain(), expected);
        assert_eq!(postings.len(), 0);
        assert!(postings.drain().is_empty());
    }

    #[test]
    fn groups_positions_by_stream_in_push_order() {
        check(Postings::default());
    }

    #[test]
    fn colliding_hashes_still_separate_streams() {
        check(Postings::with_hasher(
            BuildHasherDefault::<Colliding>::default(),
        ));
    }
}
