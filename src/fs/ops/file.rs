//! Open files: open/create, read, write, fsync, fallocate, lseek, copy_file_range.

use super::*;

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
        let flags = flags & !STRIP_OPEN & !libc::O_NOFOLLOW;
        let fd = self.open_rw(flags, |f| sys::reopen(node.raw(), f))?;
        Ok(self.add_handle(node, fd))
    }

    /// With the writeback cache the kernel reads pages it must complete
    /// (a partial-page write) through whatever handle it writes with, a
    /// write-only one included: those are opened read-write when BACKING
    /// lets us (else `read` falls back to a read-only descriptor of its own).
    fn open_rw(&self, flags: i32, open: impl Fn(i32) -> Res<OwnedFd>) -> Res<OwnedFd> {
        if flags & libc::O_ACCMODE == libc::O_WRONLY && self.writeback.load(Ordering::Acquire) {
            match open((flags & !libc::O_ACCMODE) | libc::O_RDWR) {
                Err(Errno(libc::EACCES)) | Err(Errno(libc::EPERM)) => {}
                r => return r,
            }
        }
        open(flags)
    }

    pub fn opendir(&self, ino: u64) -> Res<u64> {
        let node = self.node(ino)?;
        let fd = sys::reopen(node.raw(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(self.add_handle(node, fd))
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// The kernel maps the backing file itself when a passthrough open is
    /// mmapped (`fuse.rs`): stores through a shared writable mapping of a
    /// writable passthrough open (direct I/O) change BACKING behind replfs.
    /// This takes the inode's ctime as the baseline when such an open
    /// starts and no other one is open ...
    pub fn note_baseline(&self, fh: u64) -> Res<()> {
        let h = self.handle(fh)?;
        let _d = h.node.data.lock();
        h.node.note_ctime(&sys::fstat(h.fd.as_raw_fd())?);
        Ok(())
    }

    /// A writable passthrough open starts: its inode is watched for stores
    /// through shared mappings until none is open and none is mapped
    /// (`crate::fs::mapwatch`).
    pub fn watch_dio_open(&self, fh: u64) -> Res<()> {
        let h = self.handle(fh)?;
        self.mapwatch.opened(&h.node, || h.fd.try_clone());
        Ok(())
    }

    /// ... and at its release flushes the backing file (every dirty page
    /// written back and write-protected: a later store through a mapping
    /// that outlives the open faults and moves the ctime) and compares: a
    /// ctime other than the one the last logged change left means a change
    /// replfs did not see; the path is then logged as needing resync
    /// (DESIGN.md invariant 2). The watch goes on while the file is mapped.
    /// Changes by replfs that do not go through `log_node` (link, rename)
    /// make this err on the safe side. Returns whether a resync was logged.
    pub fn check_unlogged(&self, fh: u64) -> Res<bool> {
        let h = self.handle(fh)?;
        self.mapwatch.released(h.node.ino);
        // (Watched since the open; here too in case that failed.)
        self.mapwatch.watch(&h.node, || h.fd.try_clone());
        self.check_stores(&h.node, h.fd.as_raw_fd(), true)
    }

    /// One round of `mapwatch`: checks every watched inode, and keeps
    /// watching those that are open for writing in passthrough mode or that
    /// some process maps. `last`: the mount is going away (nothing can map
    /// it any more).
    pub fn mapwatch_round(&self, watched: Vec<crate::fs::mapwatch::Watched>, last: bool) {
        if watched.is_empty() {
            return;
        }
        let nodes: Vec<&Inode> = watched.iter().map(|w| &*w.node).collect();
        let mapped = if last {
            Default::default()
        } else {
            self.mapwatch.mapped(&nodes)
        };
        log::debug!(
            "mapwatch: {} inode(s) watched, {} mapped",
            watched.len(),
            mapped.len()
        );
        let mut still = Vec::new();
        for w in watched {
            let is_mapped = last || mapped.contains(&w.node.ino);
            if let Err(e) = self.check_stores(&w.node, w.fd.as_raw_fd(), is_mapped) {
                warn!(
                    "passthrough: checking inode {} for stores through a mapping: {e}",
                    w.node.ino
                );
            }
            if !last && (is_mapped || self.mapwatch.has_open(w.node.ino)) {
                still.push(w);
            }
        }
        self.mapwatch.put_back(still);
    }

    /// Logs a resync of `node`'s path if its ctime is not the one the last
    /// logged change left, after flushing `fd` (BACKING) so that later
    /// stores fault and move the ctime. `mapped`: flush even if the ctime
    /// has not moved (dirty pages may be writable).
    fn check_stores(&self, node: &Inode, fd: std::os::fd::RawFd, mapped: bool) -> Res<bool> {
        let unchanged = |st: &libc::stat| {
            crate::fs::inodes::ctime_ns(st) == node.logged_ctime.load(Ordering::Acquire)
        };
        if !mapped && unchanged(&sys::fstat(fd)?) {
            return Ok(false);
        }
        sys::fsync(fd, true)?;
        // Without locks first: the usual answer. A change in progress only
        // sends this to the locked look below, which sees it finished.
        if unchanged(&sys::fstat(fd)?) {
            return Ok(false);
        }
        let ns = self.ns.read();
        let d = node.data.lock();
        let st = sys::fstat(fd)?;
        if unchanged(&st) {
            return Ok(false);
        }
        let Target::Log(path) = self.target(node) else {
            return Ok(false);
        };
        warn!(
            "{} changed behind replfs through a shared writable mmap of a passthrough \
             open; logging it as needing resync",
            path.as_deref()
                .map_or("a file with no known path".into(), |p| format!(
                    "{:?}",
                    String::from_utf8_lossy(p)
                ))
        );
        let lsn = self.log_node(node, path, &st, |path| Op::Resync {
            path,
            reason: "changed through a shared mmap of a passthrough open".into(),
        })?;
        drop((d, ns));
        self.commit(lsn)?;
        Ok(true)
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
        let mode = (mode & !(umask & 0o777)) & 0o7777;
        let open_flags = (flags & !STRIP_OPEN) | libc::O_NOFOLLOW;
        let NewEntry {
            m,
            ns,
            p,
            c,
            pst,
            path,
        } = self.new_entry(parent, name)?;
        let created = self.open_rw(open_flags, |f| {
            sys::openat(p.raw(), &c, f | libc::O_CREAT | libc::O_EXCL, mode)
        });
        let (fd, lsn, node, st) = match created {
            Ok(fd) => {
                self.own(&pst, &p, &c, who, mode)?;
                let (node, st, lsn) = self.created(&p, name, path, NodeKind::File, 0)?;
                (fd, lsn, node, st)
            }
            Err(Errno(libc::EEXIST)) if flags & libc::O_EXCL == 0 => {
                let fd = self.open_rw(open_flags, |f| sys::openat(p.raw(), &c, f, 0))?;
                let (node, _) = self.lookup_locked(p.ino, name)?;
                let mut lsn = 0;
                if flags & libc::O_TRUNC != 0 {
                    sys::ftruncate(fd.as_raw_fd(), 0)?;
                    let st = sys::fstat(fd.as_raw_fd())?;
                    if let Target::Log(path) = self.target(&node) {
                        lsn = self.log_node(&node, path, &st, |path| Op::Truncate {
                            path,
                            size: 0,
                            attr: attr_of(&st),
                        })?;
                    }
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
        self.stats.read_requests.fetch_add(1, Ordering::Relaxed);
        let data = match sys::pread_full(h.fd.as_raw_fd(), size as usize, off) {
            // A write-only handle the writeback cache reads through (see `open_rw`).
            Err(Errno(libc::EBADF)) if self.writeback.load(Ordering::Acquire) => {
                let r = sys::reopen(h.node.raw(), libc::O_RDONLY)?;
                sys::pread_full(r.as_raw_fd(), size as usize, off)
            }
            r => r,
        }?;
        self.stats
            .read_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8], kill_suidgid: bool) -> Res<u32> {
        let h = self.handle(fh)?;
        let fd = h.fd.as_raw_fd();
        let apply = || {
            // With the writeback cache the kernel keeps the file's mtime
            // (the time of the write(2), not of its writeback) and sends it
            // in a setattr, which a write arriving later must not undo.
            let keep = self.writeback.load(Ordering::Acquire);
            let before = if keep { Some(sys::fstat(fd)?) } else { None };
            sys::pwrite_all(fd, data, off)?;
            if let Some(b) = before {
                let times = [
                    TimeSet::timespec(None),
                    TimeSet::timespec(Some(TimeSet::At(b.st_mtime, b.st_mtime_nsec as u32))),
                ];
                sys::futimens(fd, &times)?;
            }
            let st = sys::fstat(fd)?;
            if kill_suidgid && st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                self.kill_suidgid(&h.node, &st)?;
                return sys::fstat(fd);
            }
            Ok(st)
        };
        self.change(&h.node, apply, |path, st| Op::Write {
            path,
            offset: off,
            data: Cow::Borrowed(data),
            attr: attr_of(st),
        })?;
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
    /// up to now are durable when this returns. The WAL's fdatasync runs on
    /// its commit thread while this one flushes the backing file: the two
    /// flushes overlap instead of adding up.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Res<()> {
        let h = self.handle(fh)?;
        let lsn = h.node.last_lsn.load(Ordering::Acquire);
        self.wal.sync_soon(lsn);
        sys::fsync(h.fd.as_raw_fd(), datasync)?;
        self.wal.sync(lsn).map_err(Errno::from)
    }

    /// fsyncdir: the directory and every record logged so far are durable.
    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Res<()> {
        let h = self.handle(fh)?;
        let lsn = self.wal.head_lsn();
        self.wal.sync_soon(lsn);
        sys::fsync(h.fd.as_raw_fd(), datasync)?;
        self.wal.sync(lsn).map_err(Errno::from)
    }

    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Res<()> {
        let h = self.handle(fh)?;
        let fd = h.fd.as_raw_fd();
        let apply = || sys::fallocate(fd, mode, off, len).and_then(|()| sys::fstat(fd));
        self.change(&h.node, apply, |path, st| Op::Fallocate {
            path,
            mode,
            offset: off,
            len,
            attr: attr_of(st),
        })
        .map(drop)
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
        let Target::Log(path) = self.target(&ho.node) else {
            let n =
                sys::copy_file_range(hi.fd.as_raw_fd(), off_in, ho.fd.as_raw_fd(), off_out, len)?;
            return Ok(n as u32);
        };
        let m = self.mark(&[path.as_deref()]);
        let n = sys::copy_file_range(hi.fd.as_raw_fd(), off_in, ho.fd.as_raw_fd(), off_out, len)?;
        // The destination may be open write-only: read it back through a
        // descriptor of its own.
        let reader = sys::reopen(ho.node.raw(), libc::O_RDONLY)?;
        let fd = reader.as_raw_fd();
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
