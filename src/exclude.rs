//! Exclude patterns (`exclude = ["*.tmp", "cache/**"]` in the config): paths
//! served through the mount like any other but never logged, shipped or
//! synced to the mirror.
//!
//! Patterns are globs matched against the path relative to the root
//! (`globset` syntax: `*`, `?`, `[...]`, `{a,b}`, `**`), like `.gitignore`:
//! - a pattern without `/` matches a name at any depth (`*.tmp` excludes
//!   `a.tmp` and `x/y/b.tmp`);
//! - a pattern with a `/` is anchored at the root (`cache/**` excludes
//!   everything below the top-level `cache`; a leading `/` is ignored);
//! - `*` and `?` never match `/`; `**` matches any number of components.
//!
//! A path is excluded when it or any of its ancestors matches, so
//! everything below an excluded directory is excluded too.
//!
//! # In the mount (`fs::ops::excluded`, `fs::materialize`)
//! The list is compiled once when the mount starts (a SIGHUP reload does not
//! change it). The goal: the replica (and a replay of the log) equals BACKING
//! minus the excluded paths, content and metadata; no record names an
//! excluded path.
//! - A change whose paths are all excluded is applied to BACKING and not
//!   logged. Writes, `fallocate`, `copy_file_range` and xattr changes of such
//!   a file are not even marked in flight and need no room in the WAL.
//! - Adding or removing an excluded entry changes its directory's mtime:
//!   when that directory is itself replicated (`a.tmp` in the root, `cache/x`
//!   under `cache` for `cache/**`), its metadata is logged (`SetAttr`), one
//!   small record per excluded create/unlink/rename. Such changes are marked
//!   in flight; after a crash only the directory's metadata is logged again.
//! - Data and attribute changes of a file are logged under its first known
//!   name that is not excluded.
//! - Renaming out of the excluded area (`a.tmp` → `a.txt`, `cache/x` → `y`)
//!   logs, instead of the rename, the records that recreate the new name from
//!   BACKING, walked under the exclusive namespace lock: `Create`, `Write`
//!   chunks of at most 1 MiB (holes skipped), a `Truncate` for a trailing hole,
//!   xattrs, symlinks, devices and fifos, and for a directory its whole
//!   subtree except entries excluded at their new path, each directory closed
//!   by a `SetAttr` with its mtime; a second name of a file in the subtree is a
//!   `Link`, and so is a file that has a replicated name elsewhere known to
//!   the mount. A replaced target is removed first. The old parent's
//!   metadata follows when it is replicated and differs from the new parent.
//! - Renaming into the excluded area (`b.txt` → `b.tmp`) logs the removal of
//!   the old name: `Remove` records bottom-up for every replicated entry of
//!   the moved subtree (walked at its new place), then the new parent's
//!   metadata.
//! - `RENAME_EXCHANGE` with one excluded side: the replica's copy of the
//!   included side is removed (bottom-up, under its old name) and what that
//!   name holds now is recreated, as above. Both sides excluded: only the
//!   parents' metadata.
//! - Renaming an included directory to an included name normally logs the
//!   rename as is. When an anchored pattern could treat its entries
//!   differently at the new place (renaming `cache` with `cache/**`
//!   excluded, see [`Excludes::may_differ_below`]), its subtree is walked:
//!   entries that become excluded are removed under their old names before
//!   the `Rename` record, entries that become included are recreated after.
//! - `link` from an excluded name to an included one recreates the file at
//!   the new name (or links it to a replicated name the mount knows); from
//!   an included name to an excluded one, nothing but the parent's metadata.
//!
//! # Changing the list
//! The mount stores [`Excludes::fingerprint`] in the catalog
//! (`exclude.fingerprint`). When it starts with another list than the one
//! stored, it records the whole tree for resync (`resync` row with an empty
//! path, reason "exclude list changed"): the resync brings newly included
//! paths to the replica and deletes newly excluded ones from it. The first
//! mount only stores the list.
//!
//! # Known limits
//! - Hard links across the edge. A file with an excluded and an included name
//!   is replicated under the included one only when the mount knows that name
//!   (it was created, renamed or looked up since the mount started). Changes
//!   made through the excluded name while the mount knows no included name
//!   (after a remount, before anything opened the included one) are not
//!   logged: the replica's copy goes stale until a resync. Likewise a file
//!   recreated from the excluded area becomes a separate inode on the replica
//!   unless the mount knows another replicated name of it.
//! - Namespace changes and `setattr` (chmod, truncate, utimens) of excluded
//!   paths still pass WAL admission (`on_wal_full`): with `fail` they fail
//!   with ENOSPC when the WAL is full, with `block` they wait.
//! - Renames across the edge cost a walk of the moved subtree and records for
//!   all its content, under the exclusive namespace lock: moving a large tree
//!   out of an excluded area stalls other namespace changes meanwhile.
//! - Between a list change and the end of its resync, the replica may still
//!   hold entries the new list excludes; removing their directory through the
//!   mount logs only the `rmdir` of the directory, which the replica refuses
//!   (not empty) until the resync has removed them.

use anyhow::{Context, Result};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A compiled exclude list.
#[derive(Clone, Debug)]
pub struct Excludes {
    set: GlobSet,
    patterns: Vec<String>,
    /// For each anchored pattern (one with a `/`), the directory part of its
    /// literal prefix (`cache/**` → `cache`, `{a,b}/x` → empty): the only
    /// subtrees where it can match. See [`Excludes::may_differ_below`].
    anchored: Vec<Vec<u8>>,
}

impl Default for Excludes {
    fn default() -> Self {
        Excludes {
            set: GlobSet::empty(),
            patterns: Vec::new(),
            anchored: Vec::new(),
        }
    }
}

impl Excludes {
    /// Compiles the patterns; a bad one is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut b = GlobSetBuilder::new();
        let mut anchored_dirs = Vec::new();
        for p in patterns {
            let t = p.trim();
            if t.is_empty() || t == "/" {
                anyhow::bail!("exclude pattern {p:?} is empty");
            }
            let anchored = t.trim_start_matches('/');
            let anchored = anchored.trim_end_matches('/');
            let glob = if t.contains('/') && !t.trim_end_matches('/').is_empty() {
                anchored_dirs.push(literal_dir(anchored));
                anchored.to_string()
            } else {
                format!("**/{anchored}")
            };
            let g = GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .with_context(|| format!("bad exclude pattern {p:?}"))?;
            b.add(g);
        }
        let set = b.build().context("compiling the exclude patterns")?;
        Ok(Excludes {
            set,
            patterns: patterns.to_vec(),
            anchored: anchored_dirs,
        })
    }

    /// No pattern at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as given, one per line: stored by the mount so that a
    /// changed list can be detected (and the replica brought in line).
    pub fn fingerprint(&self) -> String {
        self.patterns.join("\n")
    }

    /// Is `path` (relative, `/`-separated; empty = the root) or one of its
    /// ancestors excluded? The root never is.
    pub fn is_excluded(&self, path: &[u8]) -> bool {
        if self.patterns.is_empty() || path.is_empty() {
            return false;
        }
        let mut end = 0;
        while end < path.len() {
            end = path[end..]
                .iter()
                .position(|&c| c == b'/')
                .map_or(path.len(), |i| end + i);
            if self.matches(&path[..end]) {
                return true;
            }
            end += 1;
        }
        false
    }

    /// Could a path below `a` and the same relative path below `b` differ in
    /// being excluded, when `a` and `b` themselves are not excluded? (Asked
    /// when an included directory is renamed to an included name: only then
    /// must its subtree be walked for entries whose status flips.)
    ///
    /// Patterns without `/` match single names, so they exclude the same
    /// relative paths below any included directory: never a difference. An
    /// anchored pattern can only match below the directory of its literal
    /// prefix; a difference is possible only when that directory and `a` or
    /// `b` lie one within the other. Conservative: `true` may be a false alarm.
    pub fn may_differ_below(&self, a: &[u8], b: &[u8]) -> bool {
        let nested = |x: &[u8], y: &[u8]| {
            let (short, long) = if x.len() <= y.len() { (x, y) } else { (y, x) };
            short.is_empty()
                || (long.starts_with(short)
                    && (long.len() == short.len() || long[short.len()] == b'/'))
        };
        self.anchored
            .iter()
            .any(|dir| nested(dir, a) || nested(dir, b))
    }

    fn matches(&self, path: &[u8]) -> bool {
        // Non-UTF-8 names are matched on their lossy form: a pattern can
        // only name them with wildcards anyway.
        let s = String::from_utf8_lossy(path);
        self.set.is_match(s.as_ref())
    }
}

/// The directory part of an anchored glob's literal prefix: the components
/// before the first one holding a wildcard or escape.
fn literal_dir(glob: &str) -> Vec<u8> {
    let Some(i) = glob.find(['*', '?', '[', '{', '\\']) else {
        // Fully literal: it matches that one path (and what is below it).
        return glob.as_bytes().to_vec();
    };
    // The last component of the literal part may be cut short (`ca*`).
    let lit = &glob[..i];
    lit.rfind('/')
        .map_or(&b""[..], |j| &lit.as_bytes()[..j])
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn basename_patterns_match_at_any_depth() {
        let e = ex(&["*.tmp"]);
        assert!(e.is_excluded(b"a.tmp"));
        assert!(e.is_excluded(b"x/y/b.tmp"));
        assert!(!e.is_excluded(b"x/y/b.tmpx"));
        assert!(!e.is_excluded(b"tmp"));
        assert!(!e.is_excluded(b""));
    }

    #[test]
    fn anchored_patterns_and_descendants() {
        let e = ex(&["cache/**", "/build"]);
        assert!(e.is_excluded(b"cache/a"));
        assert!(e.is_excluded(b"cache/a/b/c"));
        assert!(
            !e.is_excluded(b"cache"),
            "cache/** covers what is below cache"
        );
        assert!(!e.is_excluded(b"x/cache/a"), "anchored at the root");
        assert!(e.is_excluded(b"build"));
        assert!(e.is_excluded(b"build/out.o"), "below an excluded dir");
        assert!(!e.is_excluded(b"src/build"));
    }

    #[test]
    fn star_does_not_cross_directories() {
        let e = ex(&["logs/*.log"]);
        assert!(e.is_excluded(b"logs/a.log"));
        assert!(!e.is_excluded(b"logs/old/a.log"));
        let e = ex(&["logs/**/*.log"]);
        assert!(e.is_excluded(b"logs/old/a.log"));
    }

    #[test]
    fn bad_patterns_are_refused_by_name() {
        let err = Excludes::new(&["a[".to_string()]).unwrap_err();
        assert!(format!("{err:#}").contains("a["), "{err:#}");
        assert!(Excludes::new(&["".to_string()]).is_err());
        assert!(ex(&[]).is_empty());
        assert!(!ex(&[]).is_excluded(b"anything"));
    }

    #[test]
    fn non_utf8_names_match_wildcards() {
        let e = ex(&["*.tmp"]);
        assert!(e.is_excluded(b"d/\xff\xfe.tmp"));
    }

    #[test]
    fn subtree_status_can_differ_only_near_anchored_patterns() {
        let e = ex(&["*.tmp", "cache/**", "a/b/*.log"]);
        assert!(!e.may_differ_below(b"x", b"y"));
        assert!(!e.may_differ_below(b"cache2", b"y/z"));
        assert!(
            e.may_differ_below(b"cache", b"y"),
            "a dir renamed from or to cache"
        );
        assert!(e.may_differ_below(b"y", b"a"), "a holds a/b");
        assert!(e.may_differ_below(b"a/b/c", b"y"));
        assert!(!e.may_differ_below(b"a/c", b"y"));
        assert!(!ex(&["*.tmp"]).may_differ_below(b"", b"q"));
        assert!(
            ex(&["{a,b}/x"]).may_differ_below(b"q", b"r"),
            "no literal prefix"
        );
        assert!(
            !ex(&["/build"]).may_differ_below(b"q", b"r"),
            "literal: that path only"
        );
        assert!(
            ex(&["ca*/x"]).may_differ_below(b"q", b"r"),
            "partial first component"
        );
    }
}
