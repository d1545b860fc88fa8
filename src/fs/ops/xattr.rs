//! Extended attributes: get, list, set, remove.

use super::*;

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
