//! Records that make a replica's subtree match what BACKING holds, for the
//! changes that cross the edge of an excluded area (see `crate::exclude`):
//!
//! - [`materialize`]: the records that recreate the node at `dir/name` (and,
//!   for a directory, everything below it that is not excluded at its new
//!   path) at `path` on a replica where `path` does not exist: `Create`,
//!   `Write` chunks of at most [`CHUNK`] bytes covering the data (holes
//!   skipped with `SEEK_DATA`/`SEEK_HOLE`), a `Truncate` for a trailing hole,
//!   `SetXattr`s; `Symlink`; `Link` for a second name of an inode already
//!   recreated in the same walk; a closing `SetAttr` per directory, after its
//!   entries, so its mtime is the one BACKING has.
//! - [`remove_tree`]: the `Remove` records, bottom-up, that delete what a
//!   replica holds under `old_path` for the subtree now at `dir/name` in
//!   BACKING (entries excluded under their old names were never shipped).
//! - [`reconcile`]: for an included directory moved to another included
//!   name, the entries whose exclusion differs between old and new name.
//!
//! The caller holds the namespace lock exclusively, so nothing under the
//! walked subtree changes meanwhile; every record is handed to `emit` as it
//! is made (nothing is collected, memory does not grow with the subtree).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::error::{Errno, Res};
use super::ops::{attr_of, ts};
use super::sys;
use crate::exclude::Excludes;
use crate::wal::{NodeKind, Op, Ts};

/// Where the records go (the WAL, or a test's vector).
pub type Emit<'e> = dyn FnMut(Op<'_>) -> Res<()> + 'e;

/// What the walks of one change share beyond BACKING.
pub struct Scope<'a> {
    pub ex: &'a Excludes,
    /// For a node with several links, another name of it that the replica
    /// already holds, if one is known: the node is then linked, not copied.
    pub elsewhere: &'a dyn Fn(&libc::stat) -> Option<Vec<u8>>,
    /// Nodes with several links recreated so far in this change: the path
    /// their further names link to.
    linked: RefCell<HashMap<(u64, u64), Vec<u8>>>,
}

impl<'a> Scope<'a> {
    pub fn new(
        ex: &'a Excludes,
        elsewhere: &'a dyn Fn(&libc::stat) -> Option<Vec<u8>>,
    ) -> Scope<'a> {
        Scope {
            ex,
            elsewhere,
            linked: RefCell::new(HashMap::new()),
        }
    }

    /// A scope that knows no names outside the walks.
    pub fn alone(ex: &'a Excludes) -> Scope<'a> {
        Scope::new(ex, &|_| None)
    }
}

/// Largest data payload of one `Write` record.
pub const CHUNK: usize = 1 << 20;

fn mtime_of(st: &libc::stat) -> Ts {
    ts(st.st_mtime, st.st_mtime_nsec)
}

fn child(path: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = path.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn lstat(dir: RawFd, name: &CStr) -> Res<libc::stat> {
    sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)
}

fn open_dir(dir: RawFd, name: &CStr) -> Res<OwnedFd> {
    sys::openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// The entry names of a directory (without `.` and `..`), sorted so the
/// records come out in a stable order.
fn entries(fd: &OwnedFd) -> Res<Vec<CString>> {
    let mut buf = vec![0u8; 32 << 10];
    let mut names = Vec::new();
    let mut off = 0;
    loop {
        let batch = sys::read_dir_at(fd, off, &mut buf)?;
        let Some(last) = batch.last() else { break };
        off = last.off;
        for e in batch {
            if e.name != b"." && e.name != b".." {
                names.push(CString::new(e.name).map_err(|_| Errno(libc::EINVAL))?);
            }
        }
    }
    names.sort();
    Ok(names)
}

fn kind_of(fmt: u32) -> NodeKind {
    match fmt {
        libc::S_IFDIR => NodeKind::Dir,
        libc::S_IFIFO => NodeKind::Fifo,
        libc::S_IFSOCK => NodeKind::Socket,
        libc::S_IFCHR => NodeKind::CharDev,
        libc::S_IFBLK => NodeKind::BlockDev,
        _ => NodeKind::File,
    }
}

/// Logs the records that recreate the node `dir/name` of BACKING at `path`
/// on a replica that has nothing there; `parent_mtime` is the mtime of its
/// parent directory in BACKING. Entries below it that are excluded at their
/// new path are skipped. `path` itself must not be excluded.
pub fn materialize(
    dir: RawFd,
    name: &CStr,
    path: &[u8],
    parent_mtime: Ts,
    cx: &Scope<'_>,
    emit: &mut Emit<'_>,
) -> Res<()> {
    Materializer {
        cx,
        buf: Vec::new(),
    }
    .node(dir, name, path, parent_mtime, emit)
}

struct Materializer<'a> {
    cx: &'a Scope<'a>,
    /// Read buffer for data chunks, reused.
    buf: Vec<u8>,
}

impl Materializer<'_> {
    fn node(
        &mut self,
        dir: RawFd,
        name: &CStr,
        path: &[u8],
        parent_mtime: Ts,
        emit: &mut Emit<'_>,
    ) -> Res<()> {
        let st = lstat(dir, name)?;
        let fmt = st.st_mode & libc::S_IFMT;
        if fmt != libc::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            let known = self.cx.linked.borrow().get(&key).cloned();
            let known = known.or_else(|| (self.cx.elsewhere)(&st));
            if let Some(existing) = known {
                self.cx.linked.borrow_mut().insert(key, existing.clone());
                return emit(Op::Link {
                    existing,
                    path: path.to_vec(),
                    parent_mtime,
                });
            }
            self.cx.linked.borrow_mut().insert(key, path.to_vec());
        }
        let attr = attr_of(&st);
        match fmt {
            libc::S_IFLNK => emit(Op::Symlink {
                path: path.to_vec(),
                target: sys::readlinkat(dir, name)?,
                attr,
                parent_mtime,
            }),
            libc::S_IFREG => {
                let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK;
                let fd = sys::openat(dir, name, flags, 0)?;
                emit(Op::Create {
                    path: path.to_vec(),
                    kind: NodeKind::File,
                    rdev: 0,
                    attr,
                    parent_mtime,
                })?;
                self.data(&fd, path, &st, emit)?;
                xattrs(&fd, path, emit)
            }
            libc::S_IFDIR => {
                let fd = open_dir(dir, name)?;
                emit(Op::Create {
                    path: path.to_vec(),
                    kind: NodeKind::Dir,
                    rdev: 0,
                    attr,
                    parent_mtime,
                })?;
                xattrs(&fd, path, emit)?;
                for n in entries(&fd)? {
                    let p = child(path, n.as_bytes());
                    if !self.cx.ex.is_excluded(&p) {
                        self.node(fd.as_raw_fd(), &n, &p, attr.mtime, emit)?;
                    }
                }
                // Creating the entries changed its mtime on the replica.
                emit(Op::SetAttr {
                    path: path.to_vec(),
                    attr,
                    atime: None,
                })
            }
            _ => emit(Op::Create {
                path: path.to_vec(),
                kind: kind_of(fmt),
                rdev: st.st_rdev,
                attr,
                parent_mtime,
            }),
        }
    }

    /// `Write` records for the data extents (chunks of at most [`CHUNK`]),
    /// then a `Truncate` when the file ends in a hole.
    fn data(&mut self, fd: &OwnedFd, path: &[u8], st: &libc::stat, emit: &mut Emit<'_>) -> Res<()> {
        let (raw, size) = (fd.as_raw_fd(), st.st_size as u64);
        let attr = attr_of(st);
        let mut off = 0u64;
        let mut end_of_data = 0u64;
        while off < size {
            let start = match sys::lseek(raw, off as i64, libc::SEEK_DATA) {
                Ok(d) => d as u64,
                Err(Errno(libc::ENXIO)) => break,
                // No hole support: everything from here on is data.
                Err(_) => off,
            };
            let end = match sys::lseek(raw, start as i64, libc::SEEK_HOLE) {
                Ok(h) => (h as u64).min(size),
                Err(_) => size,
            };
            let mut pos = start;
            while pos < end {
                let want = ((end - pos) as usize).min(CHUNK);
                self.buf.resize(want, 0);
                let n = pread(raw, &mut self.buf, pos)?;
                if n == 0 {
                    break;
                }
                emit(Op::Write {
                    path: path.to_vec(),
                    offset: pos,
                    data: Cow::Borrowed(&self.buf[..n]),
                    attr,
                })?;
                pos += n as u64;
                end_of_data = pos;
            }
            if end <= off {
                break;
            }
            off = end;
        }
        if size > end_of_data {
            emit(Op::Truncate {
                path: path.to_vec(),
                size,
                attr,
            })?;
        }
        Ok(())
    }
}

fn pread(fd: RawFd, buf: &mut [u8], off: u64) -> Res<usize> {
    loop {
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off as i64) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = Errno::last();
        if e.0 != libc::EINTR {
            return Err(e);
        }
    }
}

/// Calls `f(buf, len)` with a size query first, retrying if the value grew.
fn sized(f: impl Fn(*mut libc::c_void, usize) -> libc::ssize_t) -> Res<Vec<u8>> {
    for _ in 0..8 {
        let n = f(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(Errno::last());
        }
        let mut buf = vec![0u8; n as usize];
        let m = f(buf.as_mut_ptr().cast(), buf.len());
        if m >= 0 {
            buf.truncate(m as usize);
            return Ok(buf);
        }
        if Errno::last().0 != libc::ERANGE {
            return Err(Errno::last());
        }
    }
    Err(Errno(libc::ERANGE))
}

/// A `SetXattr` record per extended attribute of an open file or directory.
fn xattrs(fd: &OwnedFd, path: &[u8], emit: &mut Emit<'_>) -> Res<()> {
    let raw = fd.as_raw_fd();
    let list = match sized(|b, n| unsafe { libc::flistxattr(raw, b.cast(), n) }) {
        Ok(l) => l,
        Err(Errno(libc::ENOTSUP)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c = CString::new(name).map_err(|_| Errno(libc::EINVAL))?;
        let value = match sized(|b, n| unsafe { libc::fgetxattr(raw, c.as_ptr(), b, n) }) {
            Ok(v) => v,
            // Removed meanwhile cannot happen under the lock; be lenient anyway.
            Err(Errno(libc::ENODATA)) => continue,
            Err(e) => return Err(e),
        };
        emit(Op::SetXattr {
            path: path.to_vec(),
            name: name.to_vec(),
            value: Cow::Owned(value),
        })?;
    }
    Ok(())
}

/// Logs, bottom-up, the `Remove` records that delete from a replica what it
/// holds under `old_path` for the subtree now at `dir/name` in BACKING.
/// Entries whose old path is excluded were never shipped and are skipped.
/// `parent_mtime` is the BACKING mtime of the directory that held `old_path`.
pub fn remove_tree(
    dir: RawFd,
    name: &CStr,
    old_path: &[u8],
    parent_mtime: Ts,
    cx: &Scope<'_>,
    emit: &mut Emit<'_>,
) -> Res<()> {
    let st = lstat(dir, name)?;
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    if is_dir {
        let fd = open_dir(dir, name)?;
        for n in entries(&fd)? {
            let p = child(old_path, n.as_bytes());
            if !cx.ex.is_excluded(&p) {
                remove_tree(fd.as_raw_fd(), &n, &p, mtime_of(&st), cx, emit)?;
            }
        }
    }
    emit(Op::Remove {
        path: old_path.to_vec(),
        dir: is_dir,
        parent_mtime,
    })
}

/// The two halves of [`reconcile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before the `Rename` record: remove the entries that become excluded,
    /// under their old names (the only names a record may give them).
    Before,
    /// After the `Rename` record: recreate the entries that become included.
    After,
}

/// For the directory `dir/name` of BACKING, moved from `old` to `new` (both
/// included): the records for the entries below it whose exclusion differs
/// between their old and new path (see [`Phase`]). Entries excluded under
/// both names are not looked into.
pub fn reconcile(
    dir: RawFd,
    name: &CStr,
    (old, new): (&[u8], &[u8]),
    phase: Phase,
    cx: &Scope<'_>,
    emit: &mut Emit<'_>,
) -> Res<()> {
    let st = lstat(dir, name)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Ok(());
    }
    let fd = open_dir(dir, name)?;
    for n in entries(&fd)? {
        let (o, w) = (child(old, n.as_bytes()), child(new, n.as_bytes()));
        let raw = fd.as_raw_fd();
        match (cx.ex.is_excluded(&o), cx.ex.is_excluded(&w), phase) {
            (false, false, _) => reconcile(raw, &n, (&o, &w), phase, cx, emit)?,
            (false, true, Phase::Before) => remove_tree(raw, &n, &o, mtime_of(&st), cx, emit)?,
            (true, false, Phase::After) => materialize(raw, &n, &w, mtime_of(&st), cx, emit)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Applier;
    use crate::wal::Record;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn c(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    fn sh(dir: &Path, script: &str) {
        let st = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    }

    /// Collects the records of `f` (owned).
    fn collect(f: impl FnOnce(&mut Emit<'_>) -> Res<()>) -> Vec<Op<'static>> {
        let mut ops = Vec::new();
        f(&mut |op: Op<'_>| {
            ops.push(op.into_owned());
            Ok(())
        })
        .unwrap();
        ops
    }

    fn apply(into: &Path, ops: &[Op<'static>]) {
        let mut a = Applier::open(into).unwrap();
        for (i, op) in ops.iter().enumerate() {
            let rec = Record {
                lsn: i as u64 + 1,
                time_ns: 0,
                op: op.clone(),
            };
            a.apply(&rec).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        }
    }

    /// A source tree with every kind of node, a sparse file, a 2.5 MiB file,
    /// hard links, xattrs and excluded entries; fixed mtimes.
    fn source(root: &Path) {
        sh(
            root,
            "mkdir -p src/d/e src/skip.tmp
             printf hello > src/f
             head -c 2621440 /dev/urandom > src/big
             truncate -s 5M src/sparse; printf mid | dd of=src/sparse bs=1 seek=1048576 conv=notrunc status=none
             printf tail | dd of=src/sparse bs=1 seek=3145728 conv=notrunc status=none
             truncate -s 9M src/sparse
             : > src/empty
             ln src/f src/d/hard; ln src/f src/d/e/hard2
             ln -s ../f src/d/link
             mkfifo src/d/fifo
             printf x > src/d/a.tmp; printf y > src/skip.tmp/inner
             python3 -c 'import os; os.setxattr(\"src/f\", \"user.k\", b\"val\"); os.setxattr(\"src/d\", \"user.dir\", b\"1\")'
             chmod 0751 src/d; chmod 4755 src/empty
             find src -exec touch -h -d '2020-01-02 03:04:05.123456789' {} +",
        );
    }

    #[test]
    fn materialized_subtree_replays_to_the_source_minus_excluded() {
        let t = tempfile::tempdir().unwrap();
        source(t.path());
        let e = ex(&["*.tmp"]);
        let root = sys::openat(libc::AT_FDCWD, &c(t.path()), libc::O_PATH, 0).unwrap();
        let pm = Ts { sec: 77, nsec: 5 };
        let ops = collect(|emit| {
            materialize(
                root.as_raw_fd(),
                c"src",
                b"x/y",
                pm,
                &Scope::alone(&e),
                emit,
            )
        });
        // Nothing names an excluded path; data comes in chunks of at most 1 MiB
        // and skips the holes of the sparse file.
        for op in &ops {
            for p in op.paths() {
                assert!(!e.is_excluded(p), "{op:?}");
            }
            assert!(op.data_len() <= CHUNK as u64);
        }
        let sparse: Vec<_> = ops
            .iter()
            .filter(|o| o.path() == b"x/y/sparse")
            .map(|o| (o.name(), o.data_len()))
            .collect();
        assert!(sparse.iter().all(|(_, n)| *n <= 4096), "{sparse:?}");
        assert!(sparse.contains(&("truncate", 0)));
        let big = ops.iter().filter(|o| o.path() == b"x/y/big").count();
        assert_eq!(big, 1 + 3, "create + three chunks");
        let links = ops.iter().filter(|o| o.name() == "link").count();
        assert_eq!(links, 2, "second and third names of f are links");
        // Replayed into a replica holding x: equal to the source minus *.tmp.
        let replica = t.path().join("replica");
        std::fs::create_dir_all(replica.join("x")).unwrap();
        apply(&replica, &ops);
        let expected = t.path().join("expected");
        sh(
            t.path(),
            "cp -a src expected && rm -rf expected/d/a.tmp expected/skip.tmp
             touch -h -d '2020-01-02 03:04:05.123456789' expected expected/d",
        );
        let diffs = crate::tools::compare_trees(&expected, &replica.join("x/y")).unwrap();
        assert!(diffs.is_empty(), "{diffs:#?}");
        let st = std::fs::metadata(replica.join("x")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((st.mtime(), st.mtime_nsec()), (77, 5), "parent mtime");
    }

    #[test]
    fn remove_tree_deletes_what_was_shipped_bottom_up() {
        let t = tempfile::tempdir().unwrap();
        source(t.path());
        let e = ex(&["*.tmp"]);
        let root = sys::openat(libc::AT_FDCWD, &c(t.path()), libc::O_PATH, 0).unwrap();
        let pm = Ts { sec: 1, nsec: 0 };
        let ops = collect(|emit| {
            materialize(root.as_raw_fd(), c"src", b"y", pm, &Scope::alone(&e), emit)
        });
        let replica = t.path().join("replica");
        std::fs::create_dir_all(&replica).unwrap();
        apply(&replica, &ops);
        // The subtree moved in BACKING (to an excluded name, say): the replica
        // still knows it as y.
        std::fs::rename(t.path().join("src"), t.path().join("moved.tmp")).unwrap();
        let pm = Ts { sec: 99, nsec: 0 };
        let rm = collect(|emit| {
            remove_tree(
                root.as_raw_fd(),
                c"moved.tmp",
                b"y",
                pm,
                &Scope::alone(&e),
                emit,
            )
        });
        assert!(
            rm.iter()
                .all(|o| o.name() == "unlink" || o.name() == "rmdir")
        );
        assert_eq!(rm.last().unwrap().path(), b"y");
        assert!(rm.iter().all(|o| !e.is_excluded(o.path())), "{rm:?}");
        apply(&replica, &rm);
        assert_eq!(std::fs::read_dir(&replica).unwrap().count(), 0);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&replica).unwrap().mtime(), 99);
    }

    #[test]
    fn reconcile_finds_entries_whose_status_flips() {
        let t = tempfile::tempdir().unwrap();
        sh(
            t.path(),
            "mkdir -p a/cache/sub a/keep; printf 1 > a/cache/sub/f; printf 2 > a/keep/g
             printf 3 > a/keep/h.tmp",
        );
        // `a` was known as `old` where old/cache was included; it is now
        // `top` where top/cache/** is excluded... and the reverse.
        let e = ex(&["*.tmp", "top/cache/**"]);
        let root = sys::openat(libc::AT_FDCWD, &c(t.path()), libc::O_PATH, 0).unwrap();
        let r = root.as_raw_fd();
        let run = |names: (&[u8], &[u8]), phase: Phase| -> Vec<(&'static str, Vec<u8>)> {
            collect(|emit| reconcile(r, c"a", names, phase, &Scope::alone(&e), emit))
                .iter()
                .map(|o| (o.name(), o.path().to_vec()))
                .collect()
        };
        assert_eq!(
            run((b"old", b"top"), Phase::Before),
            vec![
                ("unlink", b"old/cache/sub/f".to_vec()),
                ("rmdir", b"old/cache/sub".to_vec())
            ]
        );
        assert!(run((b"old", b"top"), Phase::After).is_empty());
        assert_eq!(
            run((b"top", b"old"), Phase::After),
            vec![
                ("create", b"old/cache/sub".to_vec()),
                ("create", b"old/cache/sub/f".to_vec()),
                ("write", b"old/cache/sub/f".to_vec()),
                ("setattr", b"old/cache/sub".to_vec()),
            ]
        );
        assert!(run((b"top", b"old"), Phase::Before).is_empty());
    }
}
