//! Manifests: what a tree holds, entry by entry, in one canonical order, so
//! that the source and the mirror can compare their trees as two sorted
//! streams (and the data never has to cross the link to be compared).
//!
//! Order: pre-order, the names of a directory sorted bytewise — which is
//! the order of [`path_cmp`] (component by component). A listing of `P`
//! starts with `P`'s ancestors (each alone, the root first), then `P` and
//! everything below it. Walks never follow a symlink, never leave the root
//! (a subpath is resolved with `openat2(RESOLVE_BENEATH | NO_SYMLINKS)`),
//! and do not descend into other filesystems.

use std::cmp::Ordering;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, anyhow};

use crate::apply::sys;
use crate::exclude::Excludes;
use crate::proto::ProtoError;
use crate::proto::sync::{Cur, put16};
use crate::wal::Ts;

/// The kind of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    Socket = 5,
    CharDev = 6,
    BlockDev = 7,
}

impl Kind {
    pub fn of_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }

    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDev => "character device",
            Kind::BlockDev => "block device",
        }
    }
}

/// One node of a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the volume root; empty = the root.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Full `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Ts,
    pub rdev: u64,
    pub ino: u64,
    pub nlink: u32,
    /// Symlink target (empty otherwise).
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name (files and directories only).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// BLAKE3 of the content (regular files, when asked for).
    pub hash: Option<[u8; 32]>,
}

impl Entry {
    pub fn attr(&self) -> crate::wal::Attr {
        crate::wal::Attr {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
        }
    }
}

/// Longest xattr value carried (Linux's own limit).
const MAX_XATTR_VALUE: usize = 64 << 10;

/// Appends `e` to a MANIFEST payload.
pub fn encode_entry(e: &Entry, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    put16(out, &e.path)?;
    out.push(e.kind as u8);
    for v in [e.mode, e.uid, e.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&e.size.to_le_bytes());
    out.extend_from_slice(&e.mtime.sec.to_le_bytes());
    out.extend_from_slice(&e.mtime.nsec.to_le_bytes());
    out.extend_from_slice(&e.rdev.to_le_bytes());
    out.extend_from_slice(&e.ino.to_le_bytes());
    out.extend_from_slice(&e.nlink.to_le_bytes());
    put16(out, &e.target)?;
    let n =
        u16::try_from(e.xattrs.len()).map_err(|_| ProtoError::Encode("too many xattrs".into()))?;
    out.extend_from_slice(&n.to_le_bytes());
    for (name, value) in &e.xattrs {
        put16(out, name)?;
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    match &e.hash {
        Some(h) => {
            out.push(1);
            out.extend_from_slice(h);
        }
        None => out.push(0),
    }
    Ok(())
}

/// Decodes every entry of a MANIFEST payload (validating paths and sizes).
pub fn decode_entries(p: &[u8]) -> Result<Vec<Entry>, ProtoError> {
    let mut c = Cur::new(p, "manifest entry");
    let mut out = Vec::new();
    while !c.rest().is_empty() {
        out.push(decode_entry(&mut c)?);
    }
    Ok(out)
}

fn decode_entry(c: &mut Cur<'_>) -> Result<Entry, ProtoError> {
    let path = c.path()?;
    let kind = Kind::from_u8(c.u8()?)
        .ok_or_else(|| ProtoError::Malformed("manifest entry of an unknown kind".into()))?;
    let (mode, uid, gid) = (c.u32()?, c.u32()?, c.u32()?);
    let size = c.u64()?;
    let mtime = Ts {
        sec: c.i64()?,
        nsec: c.u32()?,
    };
    let (rdev, ino, nlink) = (c.u64()?, c.u64()?, c.u32()?);
    let target = c.bytes16()?.to_vec();
    let n = c.u16()? as usize;
    let mut xattrs = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let name = c.bytes16()?.to_vec();
        let len = c.u32()? as usize;
        if len > MAX_XATTR_VALUE || name.is_empty() || name.contains(&0) {
            return Err(ProtoError::Malformed(
                "bad xattr in a manifest entry".into(),
            ));
        }
        xattrs.push((name, c.take(len)?.to_vec()));
    }
    let hash = match c.u8()? {
        0 => None,
        1 => Some(c.take(32)?.try_into().unwrap_or([0; 32])),
        f => return Err(ProtoError::Malformed(format!("manifest hash flag {f}"))),
    };
    Ok(Entry {
        path,
        kind,
        mode,
        uid,
        gid,
        size,
        mtime,
        rdev,
        ino,
        nlink,
        target,
        xattrs,
        hash,
    })
}

/// Orders paths component by component: the order of a pre-order walk with
/// sorted names (`a` < `a/b` < `a.c`, whereas bytewise `a.c` < `a/b`).
pub fn path_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let mut ia = a.split(|&c| c == b'/').filter(|c| !c.is_empty());
    let mut ib = b.split(|&c| c == b'/').filter(|c| !c.is_empty());
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match x.cmp(y) {
                Ordering::Equal => {}
                o => return o,
            },
        }
    }
}

/// Is `path` equal to `dir` or below it?
pub fn is_within(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
}

/// The parent of a non-root path (`""` for a top-level name).
pub fn parent(path: &[u8]) -> &[u8] {
    path.iter()
        .rposition(|&c| c == b'/')
        .map_or(&path[..0], |i| &path[..i])
}

/// What a walk collects.
#[derive(Clone, Copy, Debug, Default)]
pub struct WalkOpts<'a> {
    /// Hash the content of regular files (verify).
    pub hashes: bool,
    /// Read extended attributes (off for counting walks).
    pub xattrs: bool,
    /// Paths left out (with everything below them).
    pub excludes: Option<&'a Excludes>,
}

/// Walks `sub` below `root` (an `O_PATH` or readable directory descriptor):
/// first `sub`'s ancestors (each alone), then `sub` and its subtree, calling
/// `f` for every entry in [`path_cmp`] order. Entries that vanish during the
/// walk are skipped (the tree may be live); other errors end it.
pub fn walk(
    root: BorrowedFd<'_>,
    sub: &[u8],
    opts: WalkOpts<'_>,
    f: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<()> {
    crate::wal::codec::validate_path(sub).map_err(|e| anyhow!("{e}"))?;
    let root_st = sys::fstatat(root.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
        .context("cannot stat the tree's root")?;
    let w = Walker {
        opts,
        dev: root_st.st_dev,
    };
    // The chain from the root down to `sub`: each ancestor alone.
    let comps: Vec<&[u8]> = if sub.is_empty() {
        Vec::new()
    } else {
        sub.split(|&c| c == b'/').collect()
    };
    let mut path = Vec::new();
    let mut dir = dup_dir(root)?;
    // The root itself.
    let Some(e) = w.entry(root.as_raw_fd(), c"", &path, libc::AT_EMPTY_PATH)? else {
        return Ok(());
    };
    if comps.is_empty() {
        return w.tree(dir, e, f);
    }
    let mut cur = e;
    for (i, comp) in comps.iter().enumerate() {
        let is_dir = cur.kind == Kind::Dir;
        f(cur)?;
        if !is_dir {
            return Ok(());
        }
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(comp);
        let name = CString::new(*comp).map_err(|_| anyhow!("NUL in a path"))?;
        let Some(e) = w.entry(dir.as_raw_fd(), &name, &path, libc::AT_SYMLINK_NOFOLLOW)? else {
            return Ok(());
        };
        if i + 1 == comps.len() {
            if opts.excludes.is_some_and(|x| x.is_excluded(&path)) {
                return Ok(());
            }
            if e.kind == Kind::Dir {
                match open_dir(dir.as_raw_fd(), &name) {
                    Ok(Some(d)) => return w.tree(d, e, f),
                    Ok(None) => return Ok(()),
                    Err(err) => return Err(err),
                }
            }
            return f(e);
        }
        if e.kind == Kind::Dir {
            match open_dir(dir.as_raw_fd(), &name)? {
                Some(d) => dir = d,
                None => return Ok(()),
            }
        }
        cur = e;
    }
    Ok(())
}

struct Walker<'a> {
    opts: WalkOpts<'a>,
    dev: u64,
}

impl Walker<'_> {
    /// Emits `e` (a directory open as `dir`) and everything below it.
    fn tree(&self, dir: OwnedFd, e: Entry, f: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let base = e.path.clone();
        let descend = e.kind == Kind::Dir && self.same_dev(&dir)?;
        f(e)?;
        if descend {
            self.children(&dir, &base, f)?;
        }
        Ok(())
    }

    fn same_dev(&self, dir: &OwnedFd) -> Result<bool> {
        let st = sys::fstat(dir)?;
        Ok(st.st_dev == self.dev)
    }

    fn children(
        &self,
        dir: &OwnedFd,
        base: &[u8],
        f: &mut dyn FnMut(Entry) -> Result<()>,
    ) -> Result<()> {
        let mut names = read_names(dir).with_context(|| {
            format!("cannot list directory {}", crate::apply::display_path(base))
        })?;
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let mut path = base.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            if self.opts.excludes.is_some_and(|x| x.is_excluded(&path)) {
                continue;
            }
            let Some(e) = self.entry(dir.as_raw_fd(), &name, &path, libc::AT_SYMLINK_NOFOLLOW)?
            else {
                continue;
            };
            if e.kind == Kind::Dir {
                let Some(sub) = open_dir(dir.as_raw_fd(), &name)? else {
                    continue;
                };
                self.tree(sub, e, f)?;
            } else {
                f(e)?;
            }
        }
        Ok(())
    }

    /// Stats `name` in `dir` (never following it); None when it vanished.
    fn entry(&self, dir: RawFd, name: &CStr, path: &[u8], flags: i32) -> Result<Option<Entry>> {
        let st = match sys::fstatat(dir, name, flags) {
            Ok(st) => st,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot stat {}", crate::apply::display_path(path)));
            }
        };
        let Some(kind) = Kind::of_mode(st.st_mode) else {
            return Ok(None);
        };
        let mut e = Entry {
            path: path.to_vec(),
            kind,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: if kind == Kind::Dir {
                0
            } else {
                st.st_size as u64
            },
            mtime: Ts {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            },
            rdev: st.st_rdev,
            ino: st.st_ino,
            nlink: st.st_nlink as u32,
            target: Vec::new(),
            xattrs: Vec::new(),
            hash: None,
        };
        let what = || crate::apply::display_path(path);
        match kind {
            Kind::Symlink => match sys::readlinkat(dir, name) {
                Ok(t) => e.target = t,
                Err(err) if gone(&err) => return Ok(None),
                Err(err) => return Err(err).with_context(|| format!("readlink {}", what())),
            },
            Kind::File | Kind::Dir if self.opts.xattrs || self.opts.hashes => {
                let fd = if name.is_empty() {
                    sys::openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)
                } else {
                    let fl = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOATIME;
                    open_noatime(dir, name, fl)
                };
                let fd = match fd {
                    Ok(fd) => fd,
                    Err(err) if gone(&err) => return Ok(None),
                    Err(err) => return Err(err).with_context(|| format!("open {}", what())),
                };
                if self.opts.xattrs {
                    e.xattrs = read_xattrs(&fd).with_context(|| format!("xattrs of {}", what()))?;
                }
                if self.opts.hashes && kind == Kind::File {
                    e.hash = Some(hash_fd(&fd).with_context(|| format!("reading {}", what()))?);
                }
            }
            _ => {}
        }
        Ok(Some(e))
    }
}

/// `O_NOATIME` is refused for files the caller does not own unless it is
/// root; fall back to a plain open.
fn open_noatime(dir: RawFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    match sys::openat(dir, name, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            sys::openat(dir, name, flags & !libc::O_NOATIME)
        }
        r => r,
    }
}

fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

fn dup_dir(root: BorrowedFd<'_>) -> Result<OwnedFd> {
    sys::openat(root.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)
        .context("cannot open the tree's root")
}

/// Opens a subdirectory for listing without following a symlink; None when
/// it vanished or was replaced by something else.
fn open_dir(dir: RawFd, name: &CStr) -> Result<Option<OwnedFd>> {
    let fl = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    match sys::openat(dir, name, fl) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if gone(&e) || e.raw_os_error() == Some(libc::ELOOP) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot open directory {name:?}")),
    }
}

fn read_names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // A second descriptor: `Dir` owns and closes what it is given.
    let fd = sys::openat(dir.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(io::Error::from)?;
    let mut names = Vec::new();
    for ent in d.iter() {
        let ent = ent.map_err(io::Error::from)?;
        let n = ent.file_name();
        if n == c"." || n == c".." {
            continue;
        }
        names.push(n.to_owned());
    }
    Ok(names)
}

/// All extended attributes of an open node, sorted by name.
pub fn read_xattrs(fd: &OwnedFd) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let raw = fd.as_raw_fd();
    let mut buf = vec![0u8; 1024];
    let len = loop {
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::flistxattr(raw, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in buf[..len].split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut val = vec![0u8; 256];
        loop {
            // SAFETY: valid C string and buffer.
            let n =
                unsafe { libc::fgetxattr(raw, cname.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
            if n >= 0 {
                val.truncate(n as usize);
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) if val.len() < MAX_XATTR_VALUE => val.resize(MAX_XATTR_VALUE, 0),
                Some(libc::ENODATA) => {
                    val.clear();
                    break;
                }
                _ => return Err(e),
            }
        }
        out.push((name.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

/// BLAKE3 of everything an open file holds.
pub fn hash_fd(fd: &OwnedFd) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0u64;
    loop {
        let n = pread(fd.as_raw_fd(), &mut buf, off)?;
        if n == 0 {
            return Ok(*h.finalize().as_bytes());
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
}

/// One `pread`, retried on EINTR.
pub fn pread(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    loop {
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off as i64) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Fills `buf` from `off` (short only at the end of the file).
pub fn pread_full(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = pread(fd, &mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Opens a directory tree's root for walking (`O_PATH`).
pub fn open_root(dir: &std::path::Path) -> Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| anyhow!("NUL in a path"))?;
    // SAFETY: valid C string; the descriptor is ours alone.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot open {}", dir.display()));
    }
    // SAFETY: just returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a regular file at `path` below `root` for reading, without ever
/// leaving the root or following a symlink; None when it is absent or not a
/// regular file.
pub fn open_file_beneath(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<Option<OwnedFd>> {
    if path.is_empty() {
        return Ok(None);
    }
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fl = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let fd = match crate::apply::contain::open_beneath(root, &c, fl) {
        Ok(fd) => fd,
        Err(e) if gone(&e) || e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    let st = sys::fstat(&fd)?;
    Ok((st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_order_is_preorder() {
        let mut v: Vec<&[u8]> = vec![b"a.c", b"a/b", b"", b"a", b"b", b"a/b/c", b"a-"];
        v.sort_by(|a, b| path_cmp(a, b));
        let want: Vec<&[u8]> = vec![b"", b"a", b"a/b", b"a/b/c", b"a-", b"a.c", b"b"];
        assert_eq!(v, want);
        assert!(is_within(b"a/b", b"a"));
        assert!(!is_within(b"ab", b"a"));
        assert!(is_within(b"x", b""));
        assert_eq!(parent(b"a/b/c"), b"a/b");
        assert_eq!(parent(b"a"), b"");
    }

    #[test]
    fn walk_lists_in_order_with_ancestors_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/b/f"), b"hello").unwrap();
        std::fs::write(r.join("a.c"), b"x").unwrap();
        std::fs::write(r.join("a/z"), b"").unwrap();
        std::os::unix::fs::symlink("../nowhere", r.join("a/l")).unwrap();
        let root = open_root(r).unwrap();
        let mut got = Vec::new();
        let opts = WalkOpts {
            hashes: true,
            xattrs: true,
            excludes: None,
        };
        walk(root.as_fd_borrowed(), b"", opts, &mut |e| {
            got.push(e);
            Ok(())
        })
        .unwrap();
        let paths: Vec<&[u8]> = got.iter().map(|e| e.path.as_slice()).collect();
        let want: Vec<&[u8]> = vec![b"", b"a", b"a/b", b"a/b/f", b"a/l", b"a/z", b"a.c"];
        assert_eq!(paths, want);
        let f = &got[3];
        assert_eq!(f.hash, Some(*blake3::hash(b"hello").as_bytes()));
        assert_eq!(got[4].target, b"../nowhere");
        let mut buf = Vec::new();
        for e in &got {
            encode_entry(e, &mut buf).unwrap();
        }
        assert_eq!(decode_entries(&buf).unwrap(), got);
        // A subpath: its ancestors alone, then its subtree.
        let mut sub = Vec::new();
        walk(root.as_fd_borrowed(), b"a/b", opts, &mut |e| {
            sub.push(e.path);
            Ok(())
        })
        .unwrap();
        let want: Vec<&[u8]> = vec![b"", b"a", b"a/b", b"a/b/f"];
        assert_eq!(sub, want);
        // A missing subpath: only the ancestors that exist.
        let mut miss = Vec::new();
        walk(root.as_fd_borrowed(), b"a/nope/x", opts, &mut |e| {
            miss.push(e.path);
            Ok(())
        })
        .unwrap();
        let want: Vec<&[u8]> = vec![b"", b"a"];
        assert_eq!(miss, want);
        // Excludes leave out a name and everything below it.
        let ex = Excludes::new(&["b".to_string(), "*.c".to_string()]).unwrap();
        let mut kept = Vec::new();
        let o = WalkOpts {
            excludes: Some(&ex),
            ..opts
        };
        walk(root.as_fd_borrowed(), b"", o, &mut |e| {
            kept.push(e.path);
            Ok(())
        })
        .unwrap();
        let want: Vec<&[u8]> = vec![b"", b"a", b"a/l", b"a/z"];
        assert_eq!(kept, want);
    }

    #[test]
    fn garbage_entries_are_refused_not_panicked_on() {
        let e = Entry {
            path: b"x/y".to_vec(),
            kind: Kind::File,
            mode: 0o100644,
            uid: 1,
            gid: 2,
            size: 3,
            mtime: Ts { sec: 4, nsec: 5 },
            rdev: 0,
            ino: 7,
            nlink: 1,
            target: Vec::new(),
            xattrs: vec![(b"user.a".to_vec(), b"v".to_vec())],
            hash: None,
        };
        let mut buf = Vec::new();
        encode_entry(&e, &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(decode_entries(&buf[..cut]).is_err() || cut == 0);
        }
        let mut bad = Vec::new();
        put16(&mut bad, b"../etc").unwrap();
        assert!(decode_entries(&bad).is_err());
    }

    trait Borrowed {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
    }
    impl Borrowed for OwnedFd {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
            use std::os::fd::AsFd;
            self.as_fd()
        }
    }
}
