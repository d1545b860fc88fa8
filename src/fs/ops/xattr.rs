//! Extended attributes: get, list, set, remove.

use std::os::unix::ffi::OsStrExt;

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
        let node = self.node(ino)?;
        let c = cname(name)?;
        let apply =
            || sys::setxattr(node.raw(), &c, value, flags).and_then(|()| sys::fstat(node.raw()));
        self.change(&node, apply, |path, _| Op::SetXattr {
            path,
            name: name.as_bytes().to_vec(),
            value: Cow::Borrowed(value),
        })
        .map(drop)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Res<()> {
        let node = self.node(ino)?;
        let c = cname(name)?;
        let apply = || sys::removexattr(node.raw(), &c).and_then(|()| sys::fstat(node.raw()));
        self.change(&node, apply, |path, _| Op::RemoveXattr {
            path,
            name: name.as_bytes().to_vec(),
        })
        .map(drop)
    }
}
