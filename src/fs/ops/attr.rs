//! setattr: chmod, chown, truncate, utimens (UTIME_NOW / UTIME_OMIT).

use super::*;

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
    pub(super) fn timespec(t: Option<TimeSet>) -> libc::timespec {
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
        // A node known only by excluded names: changed, not logged.
        let (path, logged) = match self.target(&node) {
            Target::Log(path) => (path, true),
            Target::Skip => (None, false),
        };
        let _m = logged.then(|| self.mark(&[path.as_deref()]));
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
            if logged {
                last = self.log_node(&node, path.clone(), &st, |path| Op::Truncate {
                    path,
                    size,
                    attr: attr_of(&st),
                })?;
            }
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
            if logged {
                last = self.log_node(&node, path, &st, |path| Op::SetAttr {
                    path,
                    attr: attr_of(&st),
                    atime,
                })?;
            }
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
