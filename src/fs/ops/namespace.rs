//! Namespace changes: create nodes, link, remove, rename (under the exclusive namespace lock).

use super::*;

// ---- namespace changes ----------------------------------------------------

impl Core {
    /// Gives a new node to the caller (the group of a setgid parent is kept by
    /// the backing filesystem itself). Re-applies suid/sgid that chown cleared.
    pub(super) fn own(
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
    pub(super) fn created(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        path: Vec<u8>,
        kind: NodeKind,
        rdev: u64,
    ) -> Res<(Arc<Inode>, libc::stat, u64)> {
        let (node, st) = self.lookup_locked(parent.ino, name)?;
        if self.excludes.is_excluded(&path) {
            return Ok((node, st, self.dir_changed(parent)?));
        }
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

    /// The shape mknod and mkdir share: under the namespace lock, mark the
    /// path, make the node with `make`, give it to the caller, register and
    /// log it, then wait for durability if the mode asks for it.
    fn new_node(
        &self,
        who: Caller,
        (parent, name): (u64, &OsStr),
        own_mode: u32,
        (kind, rdev): (NodeKind, u64),
        make: impl FnOnce(&Inode, &CStr) -> Res<()>,
    ) -> Res<(Arc<Inode>, libc::stat)> {
        let NewEntry {
            m,
            ns,
            p,
            c,
            pst,
            path,
        } = self.new_entry(parent, name)?;
        make(&p, &c)?;
        self.own(&pst, &p, &c, who, own_mode)?;
        let (node, st, lsn) = self.created(&p, name, path, kind, rdev)?;
        drop((m, ns));
        self.commit(lsn)?;
        Ok((node, st))
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
        let mode = mode & !(umask & 0o777);
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFSOCK => NodeKind::Socket,
            libc::S_IFCHR => NodeKind::CharDev,
            libc::S_IFBLK => NodeKind::BlockDev,
            _ => NodeKind::File,
        };
        self.new_node(who, (parent, name), mode, (kind, rdev as u64), |p, c| {
            sys::mknodat(p.raw(), c, mode, rdev as u64)
        })
    }

    pub fn mkdir(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Res<(Arc<Inode>, libc::stat)> {
        let mode = mode & !(umask & 0o777) & 0o7777;
        // The backing filesystem passes a setgid parent's bit on by itself.
        self.new_node(
            who,
            (parent, name),
            mode & !libc::S_ISGID,
            (NodeKind::Dir, 0),
            |p, c| sys::mkdirat(p.raw(), c, mode),
        )
    }

    pub fn symlink(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> Res<(Arc<Inode>, libc::stat)> {
        use std::os::unix::ffi::OsStrExt;
        let NewEntry {
            m,
            ns,
            p,
            c,
            pst,
            path,
        } = self.new_entry(parent, name)?;
        sys::symlinkat(&cname(target)?, p.raw(), &c)?;
        self.own(&pst, &p, &c, who, libc::S_IFLNK)?;
        let (node, st) = self.lookup_locked(p.ino, name)?;
        if self.excludes.is_excluded(&path) {
            let lsn = self.dir_changed(&p)?;
            drop((m, ns));
            self.commit(lsn)?;
            return Ok((node, st));
        }
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
        // Before the new name is known: a link from a name that is the
        // only one known and excluded recreates the file at the new name.
        let existing = self.target(&node);
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
        let excluded = self.excludes.is_excluded(&path);
        let op = match existing {
            _ if excluded => None,
            Target::Log(Some(existing)) => Some(Op::Link {
                existing,
                path,
                parent_mtime: mtime_of(&pst),
            }),
            Target::Log(None) => Some(Op::Resync {
                path,
                reason: "hard link to an inode with no known path".into(),
            }),
            Target::Skip => {
                let pm = mtime_of(&pst);
                let lsn = self.with_scope(&[(&path, None)], |cx| {
                    self.log_many(&[&path], |emit| {
                        crate::fs::materialize::materialize(np.raw(), &c, &path, pm, cx, emit)
                    })
                })?;
                node.note_lsn(lsn);
                None
            }
        };
        let lsn = match op {
            Some(op) => self.log(Some(&node), op)?,
            None if excluded => self.dir_changed(&np)?,
            None => node.last_lsn.load(Ordering::Acquire),
        };
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
        let lsn = if self.excludes.is_excluded(&path) {
            self.dir_changed(&p)?
        } else {
            let pst = sys::fstat(p.raw())?;
            let op = Op::Remove {
                path,
                dir,
                parent_mtime: mtime_of(&pst),
            };
            self.log(Some(&p), op)?
        };
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
        let lsn = if self.excludes.is_empty() {
            let op = Op::Rename {
                from,
                to,
                flags,
                from_parent_mtime: mtime_of(&pst),
                to_parent_mtime: mtime_of(&npst),
            };
            self.log(None, op)?
        } else {
            self.log_rename(&excluded::Renamed {
                from: (&p, &c, from),
                to: (&np, &nc, to),
                flags,
                src,
                dst,
                mtimes: (mtime_of(&pst), mtime_of(&npst)),
            })?
        };
        p.note_lsn(lsn);
        np.note_lsn(lsn);
        // fsync of a file whose content was logged anew waits for it too.
        for st in std::iter::once(&src).chain(dst.as_ref()) {
            if let Some(n) = self.inodes.by_key((st.st_dev, st.st_ino)) {
                n.note_lsn(lsn);
            }
        }
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
