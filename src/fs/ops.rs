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
use crate::config::{Config, OnWalFull};
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
    on_full: OnWalFull,
    inflight: Inflight,
    /// Test failpoint (env `REPLFS_FAILPOINT=crash-before-log:PATH`): abort
    /// after changing PATH in BACKING, before its record is appended.
    crash_before_log: Option<Vec<u8>>,
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
            on_full: cfg.wal.on_wal_full,
            inflight,
            crash_before_log: std::env::var_os("REPLFS_FAILPOINT").and_then(|v| {
                use std::os::unix::ffi::OsStrExt;
                v.as_bytes()
                    .strip_prefix(b"crash-before-log:")
                    .map(<[u8]>::to_vec)
            }),
        })
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

    /// d_ino for a readdir entry: the table's number when known, else the backing one.
    pub fn dirent_ino(&self, backing_ino: u64) -> u64 {
        self.inodes.dirent_ino(backing_ino)
    }

    /// Before a change touches the backing directory: may the WAL take it?
    fn admit(&self) -> Res<()> {
        match self.wal.admit() {
            Ok(()) => Ok(()),
            Err(e) if self.on_full == OnWalFull::Resync => {
                warn!("WAL cannot take records ({e}); change will be marked for resync");
                Ok(())
            }
            Err(e) => Err(Errno::from(e)),
        }
    }

    /// Logs a change that already happened. On failure the change cannot be
    /// undone: it is reported loudly and the caller gets EIO.
    fn log(&self, node: Option<&Inode>, op: Op<'_>) -> Res<u64> {
        if self.crash_before_log.as_deref() == Some(op.path()) {
            error!("failpoint: crashing between the change and its log record");
            std::process::abort();
        }
        match self.wal.append(&op) {
            Ok(lsn) => {
                if let Some(n) = node {
                    n.note_lsn(lsn);
                }
                Ok(lsn)
            }
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

    /// Marks a change to these paths as in flight until the mark is dropped
    /// (after the record is appended). An unknown path marks the whole tree.
    fn mark(&self, paths: &[Option<&[u8]>]) -> Mark<'_> {
        let p: Vec<&[u8]> = paths.iter().map(|p| p.unwrap_or(b"")).collect();
        self.inflight.begin(&p)
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

/// What `setattr` may change.
#[derive(Default, Debug)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub fh: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    Now,
    At(i64, u32),
}

impl TimeSet {
    fn timespec(t: Option<TimeSet>) -> libc::timespec {
        match t {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(TimeSet::Now) => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(TimeSet::At(s, n)) => libc::timespec {
                tv_sec: s,
                tv_nsec: n as i64,
            },
        }
    }
}

impl Core {
    pub fn setattr(&self, ino: u64, a: &SetAttr) -> Res<libc::stat> {
        self.admit()?;
        let _ns = self.ns.read();
        let node = self.node(ino)?;
        let _d = node.data.lock();
        let path = node.path();
        let _m = self.mark(&[path.as_deref()]);
        let handle = a.fh.and_then(|fh| self.handle(fh).ok());
        let mut last = 0;
        if let Some(size) = a.size {
            match &handle {
                Some(h) => sys::ftruncate(h.fd.as_raw_fd(), size)?,
                None => {
                    let f = sys::reopen(node.raw(), libc::O_WRONLY)?;
                    sys::ftruncate(f.as_raw_fd(), size)?
                }
            }
            let st = sys::fstat(node.raw())?;
            last = self.log_node(&node, path.clone(), &st, |path| Op::Truncate {
                path,
                size,
                attr: attr_of(&st),
            })?;
        }
        if a.mode.is_some()
            || a.uid.is_some()
            || a.gid.is_some()
            || a.atime.is_some()
            || a.mtime.is_some()
        {
            self.set_meta(&node, a)?;
            let st = sys::fstat(node.raw())?;
            let atime = a.atime.map(|_| ts(st.st_atime, st.st_atime_nsec));
            last = self.log_node(&node, path, &st, |path| Op::SetAttr {
                path,
                attr: attr_of(&st),
                atime,
            })?;
        }
        let st = sys::fstat(node.raw())?;
        drop((_m, _d, _ns));
        self.commit(last)?;
        Ok(st)
    }

    fn set_meta(&self, node: &Inode, a: &SetAttr) -> Res<()> {
        if a.uid.is_some() || a.gid.is_some() {
            let uid = a.uid.unwrap_or(u32::MAX);
            let gid = a.gid.unwrap_or(u32::MAX);
            sys::fchownat(
                node.raw(),
                NOFOLLOW_EMPTY,
                uid,
                gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        if let Some(mode) = a.mode {
            if node.is_symlink() {
                return Err(Errno(libc::EOPNOTSUPP));
            }
            sys::fchmodat(libc::AT_FDCWD, &sys::proc_path(node.raw()), mode & 0o7777)?;
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let times = [TimeSet::timespec(a.atime), TimeSet::timespec(a.mtime)];
            if node.is_symlink() {
                let (parent, name) = node.first_link().ok_or(Errno(libc::ENOENT))?;
                sys::utimensat(
                    parent.raw(),
                    &cname(&name)?,
                    &times,
                    libc::AT_SYMLINK_NOFOLLOW,
                )?;
            } else {
                sys::utimensat(libc::AT_FDCWD, &sys::proc_path(node.raw()), &times, 0)?;
            }
        }
        Ok(())
    }
}

// ---- namespace changes ----------------------------------------------------

impl Core {
    /// Gives a new node to the caller (the group of a setgid parent is kept by
    /// the backing filesystem itself). Re-applies suid/sgid that chown cleared.
    fn own(
        &self,
        parent_st: &libc::stat,
        dir: &Inode,
        name: &CStr,
        who: Caller,
        mode: u32,
    ) -> Res<()> {
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
            u32::MAX
        } else {
            who.gid
        };
        sys::fchownat(dir.raw(), name, who.uid, gid, libc::AT_SYMLINK_NOFOLLOW)?;
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 && mode & libc::S_IFMT != libc::S_IFLNK {
            let st = sys::fstatat(dir.raw(), name, libc::AT_SYMLINK_NOFOLLOW)?;
            let want = (st.st_mode & 0o7777) | (mode & (libc::S_ISUID | libc::S_ISGID));
            sys::fchmodat(dir.raw(), name, want)?;
        }
        Ok(())
    }

    /// Registers and logs a node just created at `parent/name`.
    fn created(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        path: Vec<u8>,
        kind: NodeKind,
        rdev: u64,
    ) -> Res<(Arc<Inode>, libc::stat, u64)> {
        let (node, st) = self.lookup_locked(parent.ino, name)?;
        let pst = sys::fstat(parent.raw())?;
        let op = Op::Create {
            path,
            kind,
            rdev,
            attr: attr_of(&st),
            parent_mtime: mtime_of(&pst),
        };
        let lsn = self.log(Some(&node), op)?;
        parent.note_lsn(lsn);
        Ok((node, st, lsn))
    }

    pub fn mknod(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Res<(Arc<Inode>, libc::stat)> {
        self.admit()?;
        let ns = self.ns.write();
        let p = self.node(parent)?;
        let c = cname(name)?;
        let pst = sys::fstat(p.raw())?;
        let mode = mode & !(umask & 0o777);
        let path = Self::child_path(&p, name)?;
        let m = self.mark(&[Some(&path)]);
        sys::mknodat(p.raw(), &c, mode, rdev as u64)?;
        self.own(&pst, &p, &c, who, mode)?;
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFSOCK => NodeKind::Socket,
            libc::S_IFCHR => NodeKind::CharDev,
            libc::S_IFBLK => NodeKind::BlockDev,
            _ => NodeKind::File,
        };
        let (node, st, lsn) = self.created(&p, name, path, kind, rdev as u64)?;
        drop((m, ns));
        self.commit(lsn)?;
        Ok((node, st))
    }

    pub fn mkdir(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Res<(Arc<Inode>, libc::stat)> {
        self.admit()?;
        let ns = self.ns.write();
        let p = self.node(parent)?;
        let c = cname(name)?;
        let pst = sys::fstat(p.raw())?;
        let mode = mode & !(umask & 0o777) & 0o7777;
        let path = Self::child_path(&p, name)?;
        let m = self.mark(&[Some(&path)]);
        sys::mkdirat(p.raw(), &c, mode)?;
        self.own(&pst, &p, &c, who, mode & !libc::S_ISGID)?;
        let (node, st, lsn) = self.created(&p, name, path, NodeKind::Dir, 0)?;
        drop((m, ns));
        self.commit(lsn)?;
        Ok((node, st))
    }

    pub fn symlink(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> Res<(Arc<Inode>, libc::stat)> {
        use std::os::unix::ffi::OsStrExt;
        self.admit()?;
        let ns = self.ns.write();
        let p = self.node(parent)?;
        let c = cname(name)?;
        let pst = sys::fstat(p.raw())?;
        let path = Self::child_path(&p, name)?;
        let m = self.mark(&[Some(&path)]);
        sys::symlinkat(&cname(target)?, p.raw(), &c)?;
        self.own(&pst, &p, &c, who, libc::S_IFLNK)?;
        let (node, st) = self.lookup_locked(p.ino, name)?;
        let pst = sys::fstat(p.raw())?;
        let op = Op::Symlink {
            path,
            target: target.as_bytes().to_vec(),
            attr: attr_of(&st),
            parent_mtime: mtime_of(&pst),
        };
        let lsn = self.log(Some(&node), op)?;
        drop((m, ns));
        self.commit(lsn)?;
        Ok((node, st))
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Res<(Arc<Inode>, libc::stat)> {
        self.admit()?;
        let ns = self.ns.write();
        let node = self.node(ino)?;
        let np = self.node(newparent)?;
        let c = cname(newname)?;
        let existing = node.path();
        let path = Self::child_path(&np, newname)?;
        let m = self.mark(&[Some(&path)]);
        sys::linkat(
            node.raw(),
            NOFOLLOW_EMPTY,
            np.raw(),
            &c,
            libc::AT_EMPTY_PATH,
        )?;
        let (node, st) = self.lookup_locked(np.ino, newname)?;
        let pst = sys::fstat(np.raw())?;
        let op = match existing {
            Some(existing) => Op::Link {
                existing,
                path,
                parent_mtime: mtime_of(&pst),
            },
            None => Op::Resync {
                path,
                reason: "hard link to an inode with no known path".into(),
            },
        };
        let lsn = self.log(Some(&node), op)?;
        drop((m, ns));
        self.commit(lsn)?;
        Ok((node, st))
    }

    pub fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        self.admit()?;
        let ns = self.ns.write();
        let p = self.node(parent)?;
        let c = cname(name)?;
        let st = sys::fstatat(p.raw(), &c, libc::AT_SYMLINK_NOFOLLOW)?;
        let path = Self::child_path(&p, name)?;
        let m = self.mark(&[Some(&path)]);
        sys::unlinkat(p.raw(), &c, if dir { libc::AT_REMOVEDIR } else { 0 })?;
        if let Some(n) = self.inodes.by_key((st.st_dev, st.st_ino)) {
            n.remove_link(&p, name);
        }
        let pst = sys::fstat(p.raw())?;
        let lsn = self.log(
            Some(&p),
            Op::Remove {
                path,
                dir,
                parent_mtime: mtime_of(&pst),
            },
        )?;
        drop((m, ns));
        self.commit(lsn)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        self.admit()?;
        let ns = self.ns.write();
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        let (c, nc) = (cname(name)?, cname(newname)?);
        let src = sys::fstatat(p.raw(), &c, libc::AT_SYMLINK_NOFOLLOW)?;
        let dst = sys::fstatat(np.raw(), &nc, libc::AT_SYMLINK_NOFOLLOW).ok();
        let (from, to) = (Self::child_path(&p, name)?, Self::child_path(&np, newname)?);
        let m = self.mark(&[Some(&from), Some(&to)]);
        sys::renameat2(p.raw(), &c, np.raw(), &nc, flags)?;
        self.rename_links((&p, name), (&np, newname), &src, dst.as_ref(), flags);
        let (pst, npst) = (sys::fstat(p.raw())?, sys::fstat(np.raw())?);
        let op = Op::Rename {
            from,
            to,
            flags,
            from_parent_mtime: mtime_of(&pst),
            to_parent_mtime: mtime_of(&npst),
        };
        let lsn = self.log(Some(&p), op)?;
        np.note_lsn(lsn);
        drop((m, ns));
        self.commit(lsn)
    }

    /// Keeps the inode table's names in step with a rename that succeeded.
    fn rename_links(
        &self,
        (p, name): (&Arc<Inode>, &OsStr),
        (np, newname): (&Arc<Inode>, &OsStr),
        src: &libc::stat,
        dst: Option<&libc::stat>,
        flags: u32,
    ) {
        let moved = self.inodes.by_key((src.st_dev, src.st_ino));
        let other = dst.and_then(|d| self.inodes.by_key((d.st_dev, d.st_ino)));
        if flags & libc::RENAME_EXCHANGE != 0 {
            if let Some(o) = &other {
                o.move_link((np, newname), (p, name));
            }
        } else if let Some(o) = &other {
            o.remove_link(np, newname);
        }
        if let Some(m) = moved {
            m.move_link((p, name), (np, newname));
        }
    }
}

// ---- files -------------------------------------------------------------

/// Flags the backing open must not see: the kernel already did their work
/// (O_TRUNC arrives as a setattr; O_APPEND offsets are computed by the kernel).
const STRIP_OPEN: i32 =
    libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECT;

impl Core {
    pub fn open(&self, ino: u64, flags: i32) -> Res<u64> {
        let node = self.node(ino)?;
        // The kernel never opens a symlink through FUSE; the O_PATH descriptor
        // is reopened through its /proc magic link, which must be followed.
        let fd = sys::reopen(node.raw(), flags & !STRIP_OPEN & !libc::O_NOFOLLOW)?;
        Ok(self.add_handle(node, fd))
    }

    pub fn opendir(&self, ino: u64) -> Res<u64> {
        let node = self.node(ino)?;
        let fd = sys::reopen(node.raw(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(self.add_handle(node, fd))
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// create(2) with O_CREAT: a new file, or the existing one when it raced in
    /// (then O_TRUNC, if asked, is logged as a truncate).
    pub fn create(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Res<(Arc<Inode>, libc::stat, u64)> {
        self.admit()?;
        let ns = self.ns.write();
        let p = self.node(parent)?;
        let c = cname(name)?;
        let pst = sys::fstat(p.raw())?;
        let mode = (mode & !(umask & 0o777)) & 0o7777;
        let open_flags = (flags & !STRIP_OPEN) | libc::O_NOFOLLOW;
        let path = Self::child_path(&p, name)?;
        let m = self.mark(&[Some(&path)]);
        let (fd, lsn, node, st) =
            match sys::openat(p.raw(), &c, open_flags | libc::O_CREAT | libc::O_EXCL, mode) {
                Ok(fd) => {
                    self.own(&pst, &p, &c, who, mode)?;
                    let (node, st, lsn) = self.created(&p, name, path, NodeKind::File, 0)?;
                    (fd, lsn, node, st)
                }
                Err(Errno(libc::EEXIST)) if flags & libc::O_EXCL == 0 => {
                    let fd = sys::openat(p.raw(), &c, open_flags, 0)?;
                    let (node, _) = self.lookup_locked(p.ino, name)?;
                    let mut lsn = 0;
                    if flags & libc::O_TRUNC != 0 {
                        sys::ftruncate(fd.as_raw_fd(), 0)?;
                        let st = sys::fstat(fd.as_raw_fd())?;
                        lsn = self.log_node(&node, Some(path), &st, |path| Op::Truncate {
                            path,
                            size: 0,
                            attr: attr_of(&st),
                        })?;
                    }
                    let st = sys::fstat(fd.as_raw_fd())?;
                    (fd, lsn, node, st)
                }
                Err(e) => return Err(e),
            };
        drop((m, ns));
        self.commit(lsn)?;
        let fh = self.add_handle(node.clone(), fd);
        Ok((node, st, fh))
    }

    pub fn read(&self, fh: u64, off: u64, size: u32) -> Res<Vec<u8>> {
        let h = self.handle(fh)?;
        sys::pread_full(h.fd.as_raw_fd(), size as usize, off)
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8], kill_suidgid: bool) -> Res<u32> {
        self.admit()?;
        let h = self.handle(fh)?;
        let ns = self.ns.read();
        let d = h.node.data.lock();
        let path = h.node.path();
        let m = self.mark(&[path.as_deref()]);
        let fd = h.fd.as_raw_fd();
        sys::pwrite_all(fd, data, off)?;
        let mut st = sys::fstat(fd)?;
        if kill_suidgid && st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            self.kill_suidgid(&h.node, &st)?;
            st = sys::fstat(fd)?;
        }
        let lsn = self.log_node(&h.node, path, &st, |path| Op::Write {
            path,
            offset: off,
            data: Cow::Borrowed(data),
            attr: attr_of(&st),
        })?;
        drop((m, d, ns));
        self.commit(lsn)?;
        Ok(data.len() as u32)
    }

    /// FUSE_HANDLE_KILLPRIV_V2: a write by an unprivileged writer clears
    /// suid (and sgid when group-executable) and file capabilities.
    fn kill_suidgid(&self, node: &Inode, st: &libc::stat) -> Res<()> {
        let mut mode = st.st_mode & 0o7777 & !libc::S_ISUID;
        if st.st_mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        sys::fchmodat(libc::AT_FDCWD, &sys::proc_path(node.raw()), mode)?;
        match sys::removexattr(node.raw(), c"security.capability") {
            Ok(()) | Err(Errno(libc::ENODATA)) | Err(Errno(libc::EOPNOTSUPP)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// fsync/fdatasync: the backing file and every WAL record of this inode
    /// up to now are durable when this returns.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Res<()> {
        let h = self.handle(fh)?;
        sys::fsync(h.fd.as_raw_fd(), datasync)?;
        let lsn = h.node.last_lsn.load(Ordering::Acquire);
        self.wal.sync(lsn).map_err(Errno::from)
    }

    /// fsyncdir: the directory and every record logged so far are durable.
    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Res<()> {
        let h = self.handle(fh)?;
        sys::fsync(h.fd.as_raw_fd(), datasync)?;
        self.wal.sync(self.wal.head_lsn()).map_err(Errno::from)
    }

    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Res<()> {
        self.admit()?;
        let h = self.handle(fh)?;
        let ns = self.ns.read();
        let d = h.node.data.lock();
        let path = h.node.path();
        let m = self.mark(&[path.as_deref()]);
        let fd = h.fd.as_raw_fd();
        sys::fallocate(fd, mode, off, len)?;
        let st = sys::fstat(fd)?;
        let lsn = self.log_node(&h.node, path, &st, |path| Op::Fallocate {
            path,
            mode,
            offset: off,
            len,
            attr: attr_of(&st),
        })?;
        drop((m, d, ns));
        self.commit(lsn)
    }

    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> Res<i64> {
        let h = self.handle(fh)?;
        sys::lseek(h.fd.as_raw_fd(), off, whence)
    }

    /// copy_file_range: copied by the backing filesystem, logged as the bytes
    /// that landed in the destination (read back under the destination's lock).
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Res<u32> {
        self.admit()?;
        let (hi, ho) = (self.handle(fh_in)?, self.handle(fh_out)?);
        let ns = self.ns.read();
        let same = Arc::ptr_eq(&hi.node, &ho.node);
        let (_a, _b) = if same || ho.node.ino < hi.node.ino {
            (ho.node.data.lock(), (!same).then(|| hi.node.data.lock()))
        } else {
            let b = hi.node.data.lock();
            (ho.node.data.lock(), Some(b))
        };
        let len = len.min(1 << 30);
        let path = ho.node.path();
        let m = self.mark(&[path.as_deref()]);
        let n = sys::copy_file_range(hi.fd.as_raw_fd(), off_in, ho.fd.as_raw_fd(), off_out, len)?;
        let fd = ho.fd.as_raw_fd();
        let st = sys::fstat(fd)?;
        let mut lsn = 0;
        let mut done = 0usize;
        while done < n {
            let chunk = (n - done).min(1 << 20);
            let off = off_out + done as u64;
            let data = sys::pread_full(fd, chunk, off)?;
            lsn = self.log_node(&ho.node, path.clone(), &st, |path| Op::Write {
                path,
                offset: off,
                data: Cow::Owned(data),
                attr: attr_of(&st),
            })?;
            done += chunk;
        }
        drop((m, _a, _b, ns));
        self.commit(lsn)?;
        Ok(n as u32)
    }
}

// ---- extended attributes -------------------------------------------------

impl Core {
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Res<sys::Xattr> {
        let node = self.node(ino)?;
        sys::getxattr(node.raw(), &cname(name)?, size as usize)
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Res<sys::Xattr> {
        let node = self.node(ino)?;
        sys::listxattr(node.raw(), size as usize)
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Res<()> {
        use std::os::unix::ffi::OsStrExt;
        self.admit()?;
        let ns = self.ns.read();
        let node = self.node(ino)?;
        let d = node.data.lock();
        let path = node.path();
        let m = self.mark(&[path.as_deref()]);
        sys::setxattr(node.raw(), &cname(name)?, value, flags)?;
        let st = sys::fstat(node.raw())?;
        let lsn = self.log_node(&node, path, &st, |path| Op::SetXattr {
            path,
            name: name.as_bytes().to_vec(),
            value: Cow::Borrowed(value),
        })?;
        drop((m, d, ns));
        self.commit(lsn)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Res<()> {
        use std::os::unix::ffi::OsStrExt;
        self.admit()?;
        let ns = self.ns.read();
        let node = self.node(ino)?;
        let d = node.data.lock();
        let path = node.path();
        let m = self.mark(&[path.as_deref()]);
        sys::removexattr(node.raw(), &cname(name)?)?;
        let st = sys::fstat(node.raw())?;
        let lsn = self.log_node(&node, path, &st, |path| Op::RemoveXattr {
            path,
            name: name.as_bytes().to_vec(),
        })?;
        drop((m, d, ns));
        self.commit(lsn)
    }
}

// ---- directories -------------------------------------------------------

impl Core {
    /// Entries of a directory from offset `off` (0 = start), with the offset
    /// of the entry after each.
    pub fn readdir(&self, fh: u64, off: i64, buf: &mut [u8]) -> Res<Vec<sys::DirEnt>> {
        let h = self.handle(fh)?;
        let _g = h.dir_lock.lock();
        let mut ents = sys::read_dir_at(&h.fd, off, buf)?;
        for e in &mut ents {
            e.ino = self.dirent_ino(e.ino);
        }
        Ok(ents)
    }

    /// Flushes the WAL and reports how it ended (unmount / SIGTERM).
    pub fn shutdown(&self) {
        if let Err(e) = self.wal.close() {
            error!("closing the WAL failed: {e}");
        }
    }
}
