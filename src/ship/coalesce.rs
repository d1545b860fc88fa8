//! Coalescing (`ship.coalesce = true`): when the shipper is behind, a write
//! that later writes of the same batch overwrite entirely is left out of the
//! batch, and one they overwrite at one end is trimmed to the part that
//! survives. The WAL itself keeps every record (point-in-time replay of what
//! is retained is unchanged); only the wire is spared.
//!
//! Why it keeps order and content: the mirror applies a batch as a whole
//! before acknowledging it, so the state it reaches at the batch's end is
//! what counts. Bytes of a file that a later write of the batch sets are
//! not visible at that end whatever the earlier write put there, as long as
//! the name still designates the same file — so coverage is forgotten at any
//! namespace change (create, link, remove, rename, symlink) in between.
//! Truncate, fallocate and attribute changes in between do not matter: the
//! later write sets those bytes after them. The first record of a batch is
//! never left out (the mirror checks where a batch starts); a left-out LSN
//! is counted as applied by the mirror.

use std::collections::HashMap;

use crate::wal::{Op, Record};

/// Ranges remembered per path (beyond that, coverage stops growing).
const MAX_RANGES: usize = 64;

/// Returns the batch with overwritten writes left out or trimmed, and the
/// data bytes saved.
pub fn coalesce(records: Vec<Record>) -> (Vec<Record>, u64) {
    let mut covers: HashMap<Vec<u8>, Vec<(u64, u64)>> = HashMap::new();
    let mut keep: Vec<Option<Record>> = records.into_iter().map(Some).collect();
    let mut saved = 0u64;
    for i in (0..keep.len()).rev() {
        let Some(rec) = keep[i].as_mut() else {
            continue;
        };
        match &mut rec.op {
            Op::Write {
                path, offset, data, ..
            } => {
                let (start, end) = (*offset, *offset + data.len() as u64);
                let ranges = covers.entry(path.clone()).or_default();
                let left = subtract((start, end), ranges);
                if i > 0 && start < end {
                    match left.as_slice() {
                        [] => {
                            saved += end - start;
                            keep[i] = None;
                        }
                        [(s, e)] if (*s, *e) != (start, end) => {
                            saved += (end - start) - (e - s);
                            let cut = data[(s - start) as usize..(e - start) as usize].to_vec();
                            *data = cut.into();
                            *offset = *s;
                        }
                        _ => {}
                    }
                }
                if ranges.len() < MAX_RANGES && start < end {
                    add(ranges, (start, end));
                }
            }
            Op::Create { .. }
            | Op::Symlink { .. }
            | Op::Link { .. }
            | Op::Remove { .. }
            | Op::Rename { .. }
            | Op::Resync { .. } => covers.clear(),
            Op::Truncate { .. }
            | Op::Fallocate { .. }
            | Op::SetAttr { .. }
            | Op::SetXattr { .. }
            | Op::RemoveXattr { .. } => {}
        }
    }
    (keep.into_iter().flatten().collect(), saved)
}

/// `r` minus the union of `ranges` (sorted, disjoint), as sorted pieces.
fn subtract(r: (u64, u64), ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cur = r.0;
    for &(s, e) in ranges {
        if e <= cur || s >= r.1 {
            continue;
        }
        if s > cur {
            out.push((cur, s));
        }
        cur = cur.max(e);
        if cur >= r.1 {
            break;
        }
    }
    if cur < r.1 {
        out.push((cur, r.1));
    }
    out
}

/// Adds `r` to sorted, disjoint `ranges`, merging what touches it.
fn add(ranges: &mut Vec<(u64, u64)>, r: (u64, u64)) {
    let (mut s, mut e) = r;
    ranges.retain(|&(a, b)| {
        if b < s || a > e {
            true
        } else {
            s = s.min(a);
            e = e.max(b);
            false
        }
    });
    let at = ranges.partition_point(|&(a, _)| a < s);
    ranges.insert(at, (s, e));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{Attr, Ts};

    fn w(lsn: u64, path: &str, off: u64, data: &[u8]) -> Record {
        Record {
            lsn,
            time_ns: lsn as i64,
            op: Op::Write {
                path: path.into(),
                offset: off,
                data: data.to_vec().into(),
                attr: Attr::default(),
            },
        }
    }

    fn lsns(v: &[Record]) -> Vec<u64> {
        v.iter().map(|r| r.lsn).collect()
    }

    /// Applies writes to in-memory files (what the mirror ends up with).
    fn apply(v: &[Record]) -> HashMap<Vec<u8>, Vec<u8>> {
        let mut files: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for r in v {
            if let Op::Write {
                path, offset, data, ..
            } = &r.op
            {
                let f = files.entry(path.clone()).or_default();
                let end = *offset as usize + data.len();
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[*offset as usize..end].copy_from_slice(data);
            }
        }
        files
    }

    #[test]
    fn overwritten_writes_are_dropped_and_partial_ones_trimmed() {
        let v = vec![
            w(1, "a", 0, b"xxxx"),
            w(2, "a", 0, b"1111"),
            w(3, "b", 0, b"bb"),
            w(4, "a", 2, b"2222"),
            w(5, "a", 0, b"33"),
        ];
        let (out, saved) = coalesce(v.clone());
        // 1 is first (kept); 2 is covered by 4 and 5 entirely.
        assert_eq!(lsns(&out), vec![1, 3, 4, 5]);
        assert_eq!(saved, 4);
        assert_eq!(apply(&out), apply(&v));
    }

    #[test]
    fn a_partly_covered_write_is_trimmed() {
        let v = vec![
            w(1, "z", 0, b"q"),
            w(2, "a", 0, b"abcdefgh"),
            w(3, "a", 4, b"WXYZ"),
        ];
        let (out, saved) = coalesce(v.clone());
        assert_eq!(lsns(&out), vec![1, 2, 3]);
        assert_eq!(saved, 4);
        match &out[1].op {
            Op::Write { offset, data, .. } => {
                assert_eq!((*offset, data.as_ref()), (0, &b"abcd"[..]))
            }
            _ => unreachable!(),
        }
        assert_eq!(apply(&out), apply(&v));
    }

    #[test]
    fn a_namespace_change_in_between_keeps_earlier_writes() {
        let v = vec![
            w(1, "z", 0, b"q"),
            w(2, "a", 0, b"1111"),
            Record {
                lsn: 3,
                time_ns: 3,
                op: Op::Rename {
                    from: b"a".to_vec(),
                    to: b"b".to_vec(),
                    flags: 0,
                    from_parent_mtime: Ts::default(),
                    to_parent_mtime: Ts::default(),
                },
            },
            w(4, "a", 0, b"2222"),
        ];
        let (out, saved) = coalesce(v);
        assert_eq!(lsns(&out), vec![1, 2, 3, 4]);
        assert_eq!(saved, 0);
    }

    #[test]
    fn the_first_record_is_never_dropped_and_holes_stay_split() {
        let v = vec![w(1, "a", 0, b"1111"), w(2, "a", 0, b"2222")];
        assert_eq!(lsns(&coalesce(v).0), vec![1, 2]);
        // Covered in the middle only: two pieces survive, the write is kept whole.
        let v = vec![
            w(1, "z", 0, b"q"),
            w(2, "a", 0, b"abcdefgh"),
            w(3, "a", 2, b"XY"),
        ];
        let (out, saved) = coalesce(v.clone());
        assert_eq!((lsns(&out), saved), (vec![1, 2, 3], 0));
        assert_eq!(apply(&out), apply(&v));
    }

    #[test]
    fn ranges_subtract_and_merge() {
        let mut r = Vec::new();
        add(&mut r, (10, 20));
        add(&mut r, (30, 40));
        add(&mut r, (18, 31));
        assert_eq!(r, vec![(10, 40)]);
        assert_eq!(subtract((0, 50), &r), vec![(0, 10), (40, 50)]);
        assert_eq!(subtract((12, 38), &r), vec![]);
    }
}
