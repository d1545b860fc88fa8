//! The only file that knows `fuser`: convert arguments, call the core, reply
//! with the result or the errno.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno as FErrno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use log::{debug, info, warn};

use super::error::Errno;
use super::inodes::Inode;
use super::iomode::{Granted, IoModes, Mode};
use super::ops::{Caller, Core, SetAttr, TimeSet};
use super::sys::Xattr;
use crate::config::MountConfig;

/// The fuser adapter around the passthrough core.
pub struct ReplFs {
    pub core: Arc<Core>,
    ttl: Duration,
    /// Open flags of regular files and directories: with a non-zero
    /// `mount.attr_timeout` (nothing changes BACKING behind the mount) the
    /// kernel keeps file pages and directory listings across opens. Every
    /// change passes through this mount, and the kernel drops or updates
    /// what a change through it makes stale (writes, truncate, hole
    /// punching, copy_file_range, entries added or removed).
    file_open: FopenFlags,
    dir_open: FopenFlags,
    /// `mount.writeback_cache`: asked of the kernel at init.
    writeback_cache: bool,
    /// `mount.passthrough`: asked of the kernel at init (not with the
    /// writeback cache: the kernel refuses both together).
    want_passthrough: bool,
    /// The kernel granted passthrough: every open of a regular file is
    /// counted in `io` (see `iomode`).
    passthrough: bool,
    /// New read-only passthrough opens allowed (cleared when the kernel
    /// refuses backing files, e.g. EPERM without CAP_SYS_ADMIN).
    new_passthrough: AtomicBool,
    io: IoModes<BackingId>,
    /// Why stores through shared mappings of BACKING could not be caught
    /// here (`mapwatch::stores_trackable`): then no passthrough.
    untrackable: Option<String>,
}

impl ReplFs {
    pub fn new(core: Arc<Core>, cfg: &MountConfig) -> ReplFs {
        *core.stats.passthrough.lock() = if cfg.passthrough {
            "not negotiated yet".into()
        } else {
            "off (mount.passthrough = false)".into()
        };
        let ttl = cfg.attr_timeout;
        // FOPEN_NOFLUSH: no FLUSH round trip at every close(2). The daemon
        // has nothing to do at FLUSH (every write was logged when it
        // arrived; POSIX locks are the kernel's own), and pages dirtied
        // through a shared mapping are still written back at munmap (the
        // kernel's vma close) or by the flusher. Under the writeback cache
        // the kernel ignores the flag and flushes at close as before.
        let (file_open, dir_open) = if ttl.is_zero() {
            (FopenFlags::FOPEN_NOFLUSH, FopenFlags::empty())
        } else {
            (
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            )
        };
        ReplFs {
            ttl,
            file_open,
            dir_open,
            writeback_cache: cfg.writeback_cache,
            want_passthrough: cfg.passthrough,
            passthrough: false,
            new_passthrough: AtomicBool::new(false),
            io: IoModes::default(),
            untrackable: core
                .node(crate::fs::inodes::ROOT_INO)
                .map_err(|e| format!("cannot open BACKING: {e}"))
                .and_then(|root| {
                    crate::fs::mapwatch::stores_trackable(std::os::fd::AsFd::as_fd(&root.fd))
                })
                .err(),
            core,
        }
    }

    fn set_passthrough_state(&self, s: impl Into<String>) {
        *self.core.stats.passthrough.lock() = s.into();
    }

    /// Decides and counts the I/O mode of a new open of a regular file
    /// (before the reply: see `iomode`). `fh` is the daemon's open handle.
    /// `register` makes a backing id of a descriptor (`ReplyOpen::open_backing`).
    fn io_open(
        &self,
        ino: u64,
        fh: u64,
        read_only: bool,
        register: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Granted<BackingId> {
        use std::os::fd::AsFd;
        let new_pt = self.new_passthrough.load(Ordering::Acquire);
        let g = self.io.open(ino, fh, read_only, new_pt, || {
            // The kernel takes its own reference to the backing file.
            let h = self
                .core
                .handle(fh)
                .map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
            register(h.fd.as_fd())
        });
        let stats = &self.core.stats;
        match g.mode {
            Mode::Cached => stats.cached_opens.fetch_add(1, Ordering::Relaxed),
            Mode::Passthrough => stats.passthrough_opens.fetch_add(1, Ordering::Relaxed),
            Mode::PassthroughDio => stats.passthrough_dio_opens.fetch_add(1, Ordering::Relaxed),
        };
        if g.first_dio {
            // Baseline for `check_unlogged` at its release.
            if let Err(e) = self.core.note_baseline(fh) {
                warn!("passthrough: inode {ino}: cannot stat the backing file: {e}");
            }
        }
        if g.mode == Mode::PassthroughDio {
            if let Err(e) = self.core.watch_dio_open(fh) {
                warn!("passthrough: inode {ino}: cannot watch for mapped stores: {e}");
            }
        }
        if let Some(e) = &g.backing_error {
            self.backing_failed(ino, e);
        }
        g
    }

    /// The kernel refused a backing file: permanent reasons stop new
    /// passthrough opens (already open ones keep working).
    fn backing_failed(&self, ino: u64, e: &std::io::Error) {
        let permanent = matches!(
            e.raw_os_error(),
            Some(libc::EPERM | libc::ELOOP | libc::EINVAL | libc::ENOTTY | libc::EOPNOTSUPP)
        );
        if permanent && self.new_passthrough.swap(false, Ordering::AcqRel) {
            warn!(
                "passthrough: the kernel refused a backing file ({e}); reads go through \
                 replfs from now on{}",
                if e.raw_os_error() == Some(libc::EPERM) {
                    " (passthrough needs CAP_SYS_ADMIN: run the mount as root)"
                } else {
                    ""
                }
            );
            self.set_passthrough_state(format!("off (the kernel refused a backing file: {e})"));
        } else if !permanent {
            debug!("passthrough: inode {ino}: backing file refused ({e}); cached open");
        }
    }

    fn reply_open(&self, reply: ReplyOpen, fh: u64, g: Granted<BackingId>) {
        let fh = FileHandle(fh);
        match (g.mode, &g.backing) {
            (Mode::Passthrough, Some(b)) => {
                reply.opened_passthrough(fh, FopenFlags::FOPEN_NOFLUSH, b)
            }
            (Mode::PassthroughDio, Some(b)) => reply.opened_passthrough(fh, DIO_OPEN, b),
            _ => reply.opened(fh, self.file_open),
        }
    }

    fn entry(&self, reply: ReplyEntry, r: Result<(Arc<Inode>, libc::stat), Errno>) {
        match r {
            Ok((node, st)) => reply.entry(&self.ttl, &file_attr(node.ino, &st), Generation(0)),
            Err(e) => reply.error(ferr(e)),
        }
    }
}

/// The open flags of a writable passthrough open while read-only
/// passthrough opens of the file exist: its reads and writes reach the
/// daemon uncached, and close(2) sends no FLUSH (see `ReplFs::new`).
const DIO_OPEN: FopenFlags = FopenFlags::FOPEN_DIRECT_IO.union(FopenFlags::FOPEN_NOFLUSH);

fn ferr(e: Errno) -> FErrno {
    FErrno::from_i32(e.0)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dtype_kind(d: u8) -> FileType {
    match d {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub fn file_attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn time_set(t: Option<TimeOrNow>) -> Option<TimeSet> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSet::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let (mut s, mut n) = (-(d.as_secs() as i64), d.subsec_nanos());
                if n > 0 {
                    s -= 1;
                    n = 1_000_000_000 - n;
                }
                TimeSet::At(s, n)
            }
        },
    })
}

fn xattr_reply(reply: ReplyXattr, r: Result<Xattr, Errno>) {
    match r {
        Ok(Xattr::Size(n)) => reply.size(n),
        Ok(Xattr::Data(d)) => reply.data(&d),
        Err(e) => reply.error(ferr(e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(ferr(e)),
    }
}

impl ReplFs {
    fn init_passthrough(&mut self, config: &mut KernelConfig, asked: bool, granted: InitFlags) {
        let state = if !self.want_passthrough {
            "off (mount.passthrough = false)".to_string()
        } else if let Some(why) = &self.untrackable {
            info!("mount.passthrough: off, {why}; reads go through replfs");
            format!("off ({why})")
        } else if !asked {
            info!("mount.passthrough: off, the kernel refuses it with the writeback cache");
            "off (mount.writeback_cache is on)".to_string()
        } else if !granted.contains(InitFlags::FUSE_PASSTHROUGH) {
            warn!(
                "mount.passthrough: the kernel lacks FUSE_PASSTHROUGH (Linux 6.9+, \
                 CONFIG_FUSE_PASSTHROUGH); reads go through replfs"
            );
            "off (the kernel lacks FUSE_PASSTHROUGH)".to_string()
        } else if let Err(e) = config.set_max_stack_depth(1) {
            // Cannot happen (1 is within the kernel's limit of 2).
            warn!("mount.passthrough: max_stack_depth 1 refused ({e}); off");
            "off (max_stack_depth refused)".to_string()
        } else {
            // Depth 1: BACKING must not itself be a stacking filesystem
            // (overlayfs, another FUSE passthrough); this mount may be
            // stacked under overlayfs. The kernel refuses a backing file
            // on a stacked BACKING (ELOOP): then reads go through replfs.
            info!("passthrough on: read-only opens are read by the kernel from BACKING");
            self.passthrough = true;
            self.new_passthrough.store(true, Ordering::Release);
            "on".to_string()
        };
        self.set_passthrough_state(state);
    }
}

impl Filesystem for ReplFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let mut wanted = InitFlags::FUSE_HANDLE_KILLPRIV_V2 | InitFlags::FUSE_PARALLEL_DIROPS;
        if !self.ttl.is_zero() {
            // A symlink's target never changes (a new target is a new inode).
            wanted |= InitFlags::FUSE_CACHE_SYMLINKS;
        }
        if self.writeback_cache {
            wanted |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let ask_passthrough = self.want_passthrough && !self.writeback_cache;
        if ask_passthrough {
            wanted |= InitFlags::FUSE_PASSTHROUGH;
        }
        let granted = match config.add_capabilities(wanted) {
            Ok(()) => wanted,
            Err(missing) => {
                debug!("kernel lacks capabilities {missing:?}");
                let _ = config.add_capabilities(wanted - missing);
                wanted - missing
            }
        };
        if self.writeback_cache {
            if granted.contains(InitFlags::FUSE_WRITEBACK_CACHE) {
                info!("writeback cache on: writes reach the WAL at writeback, close or fsync");
                self.core.set_writeback_cache();
            } else {
                warn!(
                    "mount.writeback_cache: the kernel lacks FUSE_WRITEBACK_CACHE; writing through"
                );
            }
        }
        self.init_passthrough(config, ask_passthrough, granted);
        Ok(())
    }

    fn destroy(&mut self) {
        self.core.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.core
            .stats
            .lookup_requests
            .fetch_add(1, Ordering::Relaxed);
        match self.core.lookup(parent.0, name) {
            // A negative entry (node id 0) the kernel keeps for the entry
            // timeout: a name probed again (a search path, a build's
            // include dirs) costs no round trip. Every change goes through
            // the mount, and a create through it replaces the negative
            // entry: the assumption the attribute timeout already makes.
            Err(Errno(libc::ENOENT)) if !self.ttl.is_zero() => {
                // SAFETY: an all-zero `stat` is a valid value.
                let none: libc::stat = unsafe { std::mem::zeroed() };
                reply.entry(&self.ttl, &file_attr(0, &none), Generation(0))
            }
            r => self.entry(reply, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino.0) {
            Ok((node, st)) => reply.attr(&self.ttl, &file_attr(node.ino, &st)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_set(atime),
            mtime: time_set(mtime),
            fh: fh.map(|f| f.0),
        };
        match self.core.setattr(ino.0, &a) {
            Ok(st) => reply.attr(&self.ttl, &file_attr(ino.0, &st)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.core
                .mknod(caller(req), parent.0, name, mode, umask, rdev),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.core.mkdir(caller(req), parent.0, name, mode, umask),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.remove(parent.0, name, true));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.core
                .symlink(caller(req), parent.0, link_name, target.as_os_str()),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.core
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, self.core.link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fh = match self.core.open(ino.0, flags.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(ferr(e)),
        };
        if !self.passthrough {
            self.core.stats.cached_opens.fetch_add(1, Ordering::Relaxed);
            return reply.opened(FileHandle(fh), self.file_open);
        }
        // OPEN comes for regular files only (the kernel opens device
        // nodes and FIFOs itself).
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY && flags.0 & libc::O_TRUNC == 0;
        let g = self.io_open(ino.0, fh, read_only, |fd| reply.open_backing(fd));
        self.reply_open(reply, fh, g);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.core.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.core.write(fh.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do: every write was logged when it arrived. Counted,
        // because opens say FOPEN_NOFLUSH to spare close(2) this round trip.
        self.core
            .stats
            .flush_requests
            .fetch_add(1, Ordering::Relaxed);
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self.passthrough && self.io.release(fh.0) == Some(Mode::PassthroughDio) {
            // Its mmap mapped BACKING itself: look for unlogged changes.
            if let Err(e) = self.core.check_unlogged(fh.0) {
                warn!("passthrough: release of inode {}: {e}", ino.0);
            }
        }
        self.core.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), self.dir_open),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut buf = vec![0u8; 32 * 1024];
        let mut off = offset as i64;
        loop {
            let ents = match self.core.readdir(fh.0, off, &mut buf) {
                Ok(e) => e,
                Err(e) => return reply.error(ferr(e)),
            };
            if ents.is_empty() {
                break;
            }
            for e in ents {
                let name = <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&e.name);
                if reply.add(INodeNo(e.ino), e.off as u64, dtype_kind(e.dtype), name) {
                    return reply.ok();
                }
                off = e.off;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.fsyncdir(fh.0, datasync));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, self.core.getxattr(ino.0, name, size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, self.core.listxattr(ino.0, size));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        empty(reply, self.core.access(ino.0, mask.bits()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .core
            .create(caller(req), parent.0, name, mode, umask, flags)
        {
            Ok((node, st, fh)) => {
                let attr = file_attr(node.ino, &st);
                if !self.passthrough {
                    self.core.stats.cached_opens.fetch_add(1, Ordering::Relaxed);
                    return reply.created(
                        &self.ttl,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        self.file_open,
                    );
                }
                // An existing file (O_CREAT without O_EXCL racing with its
                // creation) may be in passthrough mode: counted like a
                // writable open.
                let g = self.io_open(node.ino, fh, false, |fd| reply.open_backing(fd));
                match (g.mode, &g.backing) {
                    (Mode::PassthroughDio, Some(b)) => reply.created_passthrough(
                        &self.ttl,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        DIO_OPEN,
                        b,
                    ),
                    _ => reply.created(
                        &self.ttl,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        self.file_open,
                    ),
                }
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.fallocate(fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.core.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls are passed through (they could change data unlogged).
        debug!("ioctl {cmd:#x}: ENOTTY");
        reply.error(FErrno::ENOTTY);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // ENOSYS tells the kernel to use its default: regular files are always ready.
        reply.error(FErrno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if !flags.is_empty() {
            warn!("copy_file_range with flags {flags:?}: EINVAL");
            return reply.error(FErrno::EINVAL);
        }
        match self
            .core
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(ferr(e)),
        }
    }
}
