//! The passthrough core: applies each change to the backing directory and logs
//! it, in an order that is a valid serialization (DESIGN.md invariant 1).
//!
//! Ordering: namespace changes (create, unlink, rename, link...) hold the
//! namespace lock exclusively from the backing syscall until their record is
//! in the WAL; data and attribute changes hold it shared plus the inode's data
//! lock. So two conflicting changes are logged in the order they were applied,
//! and a path computed for a record is the path the change applied to.
//! Changes that cannot conflict (different inodes, no namespace change) may be
//! logged in either order; replaying them in either order gives the same tree.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use log::{error, warn};
use parking_lot::{Mutex, RwLock};

use super::error::{Errno, Res};
use super::inflight::{Inflight, Mark};
use super::inodes::{Inode, InodeTable, ROOT_INO};
use super::sys::{self, cname};
use crate::config::Config;
use crate::exclude::Excludes;
use crate::wal::{Attr, NodeKind, Op, Ts, Wal};

/// Who asked: the request's credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// An open file or directory.
pub struct Handle {
    pub node: Arc<Inode>,
    pub fd: OwnedFd,
    /// Serialises readdir calls on a directory handle (they seek the fd).
    pub dir_lock: Mutex<()>,
}

pub struct Core {
    pub inodes: InodeTable,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    ns: RwLock<()>,
    pub wal: Wal,
    inflight: Inflight,
    /// Paths served but never logged (`crate::exclude`; see `excluded.rs`).
    pub excludes: Excludes,
    /// Test failpoint (env `REPLFS_FAILPOINT=crash-before-log:PATH`): abort
    /// after changing PATH in BACKING, before its record is appended.
    crash_before_log: Option<Vec<u8>>,
    /// The kernel granted the writeback cache (`mount.writeback_cache`).
    writeback: std::sync::atomic::AtomicBool,
    /// Counters shown by `replfs status` (READs served, opens by mode).
    pub stats: Arc<crate::status::MountStats>,
    /// Inodes some process may map shared and writable through a released
    /// passthrough open (`crate::fs::mapwatch`).
    pub mapwatch: crate::fs::mapwatch::MapWatch,
}

/// See [`Core::new_entry`]; drop `m` before `ns` (as `drop((m, ns))`).
struct NewEntry<'a> {
    m: Mark<'a>,
    ns: parking_lot::RwLockWriteGuard<'a, ()>,
    p: Arc<Inode>,
    c: std::ffi::CString,
    pst: libc::stat,
    path: Vec<u8>,
}

const NOFOLLOW_EMPTY: &CStr = c"";

pub fn ts(sec: i64, nsec: i64) -> Ts {
    Ts {
        sec,
        nsec: nsec as u32,
    }
}

pub fn attr_of(st: &libc::stat) -> Attr {
    Attr {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
    }
}

fn mtime_of(st: &libc::stat) -> Ts {
    ts(st.st_mtime, st.st_mtime_nsec)
}

fn join(parent: &[u8], name: &OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name.as_bytes());
    p
}

impl Core {
    /// (`wal.on_wal_full` is applied by the WAL itself: `Wal::admit`, `Wal::record`.)
    pub fn new(
        backing: &std::path::Path,
        wal: Wal,
        inflight: Inflight,
        cfg: &Config,
    ) -> anyhow::Result<Core> {
        use anyhow::Context;
        let c =
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(backing.as_os_str()))?;
        let fd = sys::openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot open backing directory {}", backing.display()))?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Core {
            inodes: InodeTable::new(fd, &st),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ns: RwLock::new(()),
            wal,
            inflight,
            excludes: Excludes::new(&cfg.exclude)?,
            crash_before_log: std::env::var_os("REPLFS_FAILPOINT").and_then(|v| {
                use std::os::unix::ffi::OsStrExt;
                v.as_bytes()
                    .strip_prefix(b"crash-before-log:")
                    .map(<[u8]>::to_vec)
            }),
            writeback: std::sync::atomic::AtomicBool::new(false),
            stats: Arc::new(crate::status::MountStats::default()),
            mapwatch: Default::default(),
        })
    }

    /// Called at FUSE init once the kernel granted the writeback cache.
    pub fn set_writeback_cache(&self) {
        self.writeback.store(true, Ordering::Release);
    }

    // ---- helpers -------------------------------------------------------

    pub fn node(&self, ino: u64) -> Res<Arc<Inode>> {
        self.inodes.get(ino).ok_or(Errno(libc::ESTALE))
    }

    pub fn handle(&self, fh: u64) -> Res<Arc<Handle>> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(Errno(libc::EBADF))
    }

    fn add_handle(&self, node: Arc<Inode>, fd: OwnedFd) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Handle {
            node,
            fd,
            dir_lock: Mutex::new(()),
        });
        self.handles.lock().insert(fh, h);
        fh
    }

    /// Before a change touches the backing directory, and before any lock
    /// is taken (under `on_wal_full = "block"` this may wait for the WAL to
    /// have room): may the WAL take it? Every change calls it first.
    fn admit(&self) -> Res<()> {
        self.wal.admit().map_err(Errno::from)
    }

    /// Logs a change that already happened, or records its paths for resync
    /// when the WAL says so (`resync` policy while full, or a path still
    /// waiting for a resync): then the LSN is 0 and there is nothing to
    /// commit. On failure the change cannot be undone: it is reported loudly,
    /// marked for resync, and the caller gets the error (EIO, ENOSPC...).
    fn log(&self, node: Option<&Inode>, op: Op<'_>) -> Res<u64> {
        if self.crash_before_log.as_deref() == Some(op.path()) {
            error!("failpoint: crashing between the change and its log record");
            std::process::abort();
        }
        match self.wal.record(&op) {
            Ok(Some(lsn)) => {
                if let Some(n) = node {
                    n.note_lsn(lsn);
                }
                Ok(lsn)
            }
            Ok(None) => Ok(0),
            Err(e) => {
                error!(
                    "WAL append failed for {} {:?}: {e}; the change is on the backing \
                     directory but not in the log: resync needed",
                    op.name(),
                    String::from_utf8_lossy(op.path())
                );
                for p in op.paths() {
                    if let Err(e2) = self.wal.mark_resync(p, "WAL append failed") {
                        error!(
                            "cannot record {:?} for resync either: {e2}",
                            String::from_utf8_lossy(p)
                        );
                    }
                }
                Err(Errno::from(e))
            }
        }
    }

    /// After locks are released: wait for durability when the mode asks for it.
    fn commit(&self, lsn: u64) -> Res<()> {
        self.wal.commit(lsn).map_err(Errno::from)
    }

    /// The start every new entry shares (create, mknod, mkdir, symlink): the
    /// WAL admits it, the exclusive namespace lock is taken, the parent is
    /// resolved and stat'ed, and the new path is marked in flight.
    fn new_entry(&self, parent: u64, name: &OsStr) -> Res<NewEntry<'_>> {
        self.admit()?;
        let ns = self.ns.write();
        let p = self.node(parent)?;
        let c = cname(name)?;
        let pst = sys::fstat(p.raw())?;
        let path = Self::child_path(&p, name)?;
        let m = self.mark(&[Some(&path)]);
        Ok(NewEntry {
            m,
            ns,
            p,
            c,
            pst,
            path,
        })
    }

    /// Marks a change to these paths as in flight until the mark is dropped
    /// (after the record is appended). An unknown path marks the whole tree.
    fn mark(&self, paths: &[Option<&[u8]>]) -> Mark<'_> {
        let p: Vec<&[u8]> = paths.iter().map(|p| p.unwrap_or(b"")).collect();
        self.inflight.begin(&p)
    }

    /// The one shape of a change to an existing inode's data or attributes:
    /// ordered by the shared namespace lock and the inode's data lock, marked
    /// in flight, applied (`apply` returns the inode's stat afterwards), then
    /// logged with the metadata it left; durability is awaited after unlocking.
    /// A node known only by excluded names is changed without any of that
    /// bookkeeping: it is not logged, so it needs no room in the WAL either
    /// (looked at unlocked first, confirmed under the locks).
    fn change<'a>(
        &self,
        node: &Inode,
        apply: impl FnOnce() -> Res<libc::stat>,
        record: impl FnOnce(Vec<u8>, &libc::stat) -> Op<'a>,
    ) -> Res<libc::stat> {
        let mut admitted = false;
        loop {
            if !admitted && (self.excludes.is_empty() || self.target(node).logged()) {
                self.admit()?;
                admitted = true;
            }
            let ns = self.ns.read();
            let d = node.data.lock();
            match self.target(node) {
                Target::Skip => return apply(),
                Target::Log(path) if admitted => {
                    let m = self.mark(&[path.as_deref()]);
                    let st = apply()?;
                    let lsn = self.log_node(node, path, &st, |p| record(p, &st))?;
                    drop((m, d, ns));
                    self.commit(lsn)?;
                    return Ok(st);
                }
                // Renamed out of an excluded area since the unlocked look.
                Target::Log(_) => drop((d, ns)),
            }
        }
    }

    /// Logs a data/attribute change of `node` at `path` (computed before the
    /// change, under the same locks), or a resync marker when the inode has no
    /// known path but is still linked somewhere.
    fn log_node<'a>(
        &self,
        node: &Inode,
        path: Option<Vec<u8>>,
        st: &libc::stat,
        make: impl FnOnce(Vec<u8>) -> Op<'a>,
    ) -> Res<u64> {
        node.note_ctime(st);
        match path {
            Some(p) => self.log(Some(node), make(p)),
            None if st.st_nlink > 0 => {
                warn!(
                    "change to inode with unknown path (backing ino {}); marking tree for resync",
                    st.st_ino
                );
                self.log(
                    Some(node),
                    Op::Resync {
                        path: Vec::new(),
                        reason: "change to an inode with no known path".into(),
                    },
                )
            }
            None => Ok(0),
        }
    }

    /// The path of `parent/name`; ENOENT when the parent has no known path
    /// (it was removed), so nothing is created where the log cannot name it.
    fn child_path(parent: &Inode, name: &OsStr) -> Res<Vec<u8>> {
        Ok(join(&parent.path().ok_or(Errno(libc::ENOENT))?, name))
    }

    // ---- lookups and attributes ----------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Res<(Arc<Inode>, libc::stat)> {
        let _ns = self.ns.read();
        self.lookup_locked(parent, name)
    }

    fn lookup_locked(&self, parent: u64, name: &OsStr) -> Res<(Arc<Inode>, libc::stat)> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        let fd = sys::openat(p.raw(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let node = self.inodes.lookup(&p, name, fd, &st);
        Ok((node, st))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub fn getattr(&self, ino: u64) -> Res<(Arc<Inode>, libc::stat)> {
        let node = self.node(ino)?;
        let st = sys::fstat(node.raw())?;
        Ok((node, st))
    }

    pub fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        let node = self.node(ino)?;
        sys::readlinkat(node.raw(), NOFOLLOW_EMPTY)
    }

    pub fn statfs(&self) -> Res<libc::statvfs> {
        sys::fstatvfs(self.node(ROOT_INO)?.raw())
    }

    pub fn access(&self, ino: u64, mask: i32) -> Res<()> {
        let node = self.node(ino)?;
        sys::faccessat(libc::AT_FDCWD, &sys::proc_path(node.raw()), mask)
    }
}

mod attr;
mod dir;
mod excluded;
mod file;
mod namespace;
mod xattr;

pub use attr::{SetAttr, TimeSet};
use excluded::Target;
