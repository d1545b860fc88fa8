//! The in-memory set of paths waiting for a resync (mirrors the catalog's
//! `resync` table while the writer runs): a change to a path covered by it
//! is marked, not logged, until the shipper has repaired the path and
//! cleared its row. See `space.rs` for the rules.

use std::collections::{BTreeMap, HashSet};

/// Above this many entries the next new path marks the whole tree instead
/// (invariant 7: memory does not grow with the amount of unlogged change).
pub(super) const MAX_ENTRIES: usize = 65_536;

#[derive(Debug)]
struct Entry {
    /// Id of the catalog row that asks for this path's repair.
    id: i64,
    /// Changed again after its row was recorded: the repair may have read
    /// the path before that change, so the row is recorded again once cleared.
    touched: bool,
}

/// Paths (empty = the whole tree) with their catalog row ids.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    map: BTreeMap<Vec<u8>, Entry>,
}

/// `path` and every ancestor of it, shortest first ("" is the root).
fn self_and_ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let cuts = path
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .map(|(i, _)| i);
    std::iter::once(0)
        .chain(cuts)
        .chain((!path.is_empty()).then_some(path.len()))
        .map(move |i| &path[..i])
}

impl Dirty {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Adds a path with the id of its catalog row; `touched` makes the
    /// next [`Dirty::prune`] after the row is gone record it again (used
    /// when recording the row failed: id -1).
    pub fn insert(&mut self, path: Vec<u8>, id: i64, touched: bool) {
        self.map.insert(path, Entry { id, touched });
    }

    /// Whether `path` or one of its ancestors is dirty; if so, notes that
    /// the covering entry changed again.
    pub fn touch_covering(&mut self, path: &[u8]) -> bool {
        let key = self_and_ancestors(path).find(|p| self.map.contains_key(*p));
        match key.and_then(|k| self.map.get_mut(k)) {
            Some(e) => {
                e.touched = true;
                true
            }
            None => false,
        }
    }

    /// Whether a record naming `path` could disagree with what a replica
    /// holds: the path, an ancestor or a descendant of it is dirty.
    pub fn related(&self, path: &[u8]) -> bool {
        if self_and_ancestors(path).any(|p| self.map.contains_key(p)) {
            return true;
        }
        if path.is_empty() {
            return !self.map.is_empty();
        }
        let mut lo = path.to_vec();
        lo.push(b'/');
        let mut hi = path.to_vec();
        hi.push(b'/' + 1);
        self.map.range(lo..hi).next().is_some()
    }

    /// Drops the entries whose catalog row was cleared (`live` holds the
    /// ids still waiting). Returns the paths changed since their row was
    /// recorded: the caller records them again and re-inserts them.
    pub fn prune(&mut self, live: &HashSet<i64>) -> Vec<Vec<u8>> {
        let mut again = Vec::new();
        self.map.retain(|path, e| {
            if live.contains(&e.id) {
                return true;
            }
            if e.touched {
                again.push(path.clone());
            }
            false
        });
        again
    }

    /// Every path, for tests and status.
    #[cfg(test)]
    pub fn paths(&self) -> Vec<Vec<u8>> {
        self.map.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_and_descendants() {
        let v: Vec<&[u8]> = self_and_ancestors(b"a/b/c").collect();
        assert_eq!(v, vec![&b""[..], b"a", b"a/b", b"a/b/c"]);
        assert_eq!(self_and_ancestors(b"").collect::<Vec<_>>(), vec![&b""[..]]);
        let mut d = Dirty::default();
        d.insert(b"a/b".to_vec(), 1, false);
        assert!(d.related(b"a/b/c") && d.related(b"a/b") && d.related(b"a") && d.related(b""));
        assert!(!d.related(b"a/bc") && !d.related(b"a/b0") && !d.related(b"x"));
        assert!(d.touch_covering(b"a/b/c/d") && !d.touch_covering(b"a"));
        assert!(!d.touch_covering(b"a/bc"));
        d.insert(b"x".to_vec(), 2, false);
        let again = d.prune(&HashSet::from([2]));
        assert_eq!(again, vec![b"a/b".to_vec()]);
        assert_eq!(d.paths(), vec![b"x".to_vec()]);
        assert!(d.prune(&HashSet::new()).is_empty());
        assert_eq!(d.len(), 0);
    }
}
