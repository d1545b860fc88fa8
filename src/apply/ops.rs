//! One function per record kind: perform the change beneath the root, then
//! set the recorded metadata of the target and of its parent directory.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use log::warn;

use super::contain::{self, At, DirFd, Entry, Node};
use super::{Failure, IoStep, sys};
use crate::wal::{Attr, NodeKind, Op, Ts};

const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;

/// Applies one operation beneath `root`.
pub(super) fn apply_op(root: BorrowedFd<'_>, op: &Op<'_>) -> Result<(), Failure> {
    match op {
        Op::Create {
            path,
            kind,
            rdev,
            attr,
            parent_mtime,
        } => create(root, path, *kind, *rdev, attr, *parent_mtime),
        Op::Symlink {
            path,
            target,
            attr,
            parent_mtime,
        } => symlink(root, path, target, attr, *parent_mtime),
        Op::Link {
            existing,
            path,
            parent_mtime,
        } => link(root, existing, path, *parent_mtime),
        Op::Remove {
            path,
            dir,
            parent_mtime,
        } => remove(root, path, *dir, *parent_mtime),
        Op::Rename {
            from,
            to,
            flags,
            from_parent_mtime,
            to_parent_mtime,
        } => rename(
            root,
            from,
            to,
            *flags,
            (*from_parent_mtime, *to_parent_mtime),
        ),
        Op::Write {
            path,
            offset,
            data,
            attr,
        } => with_regular(root, path, attr, |fd| {
            sys::pwrite_all(fd, data, *offset).step("write")
        }),
        Op::Truncate { path, size, attr } => with_regular(root, path, attr, |fd| {
            sys::ftruncate(fd, *size).step("truncate")
        }),
        Op::Fallocate {
            path,
            mode,
            offset,
            len,
            attr,
        } => with_regular(root, path, attr, |fd| {
            sys::fallocate(fd, *mode, *offset, *len).step("fallocate")
        }),
        Op::SetAttr { path, attr, atime } => {
            set_attr(contain::node(root, path)?.at(), attr, *atime)
        }
        Op::SetXattr { path, name, value } => set_xattr(root, path, name, Some(value)),
        Op::RemoveXattr { path, name } => set_xattr(root, path, name, None),
        Op::Resync { .. } => Ok(()),
    }
}

/// chown, then chmod (chown clears suid/sgid), then mtime (atime only when
/// recorded). Never follows a symlink at the node; symlinks get no chmod.
fn set_attr(at: At<'_>, attr: &Attr, atime: Option<Ts>) -> Result<(), Failure> {
    let (dir, name, flags) = at;
    sys::lchownat(dir, name, attr.uid, attr.gid, flags).step("chown")?;
    if attr.mode & libc::S_IFMT != libc::S_IFLNK {
        match sys::lchmodat(dir, name, attr.mode & 0o7777, flags) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Err(Failure::Conflict(
                    "is a symlink, record expects another kind".into(),
                ));
            }
            r => r.step("chmod")?,
        }
    }
    sys::lutimensat(dir, name, atime, attr.mtime, flags).step("set times")
}

/// Sets a directory's recorded mtime; done after the entry change in it.
fn set_dir_mtime(dir: &DirFd<'_>, mtime: Ts) -> Result<(), Failure> {
    sys::lutimensat(dir.as_raw_fd(), c"", None, mtime, libc::AT_EMPTY_PATH).step("set parent mtime")
}

fn make_node(e: &Entry<'_>, kind: NodeKind, rdev: u64) -> std::io::Result<()> {
    let (dir, name) = (e.dir.as_raw_fd(), e.name.as_c_str());
    match kind {
        NodeKind::Dir => sys::mkdirat(dir, name, 0o700),
        // O_EXCL fails on any existing name, a (dangling) symlink included.
        NodeKind::File => {
            let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW;
            sys::openat_mode(dir, name, flags, 0o600).map(drop)
        }
        NodeKind::Fifo => sys::mknodat(dir, name, libc::S_IFIFO | 0o600, 0),
        NodeKind::Socket => sys::mknodat(dir, name, libc::S_IFSOCK | 0o600, 0),
        NodeKind::CharDev => sys::mknodat(dir, name, libc::S_IFCHR | 0o600, rdev),
        NodeKind::BlockDev => sys::mknodat(dir, name, libc::S_IFBLK | 0o600, rdev),
    }
}

fn kind_bits(kind: NodeKind) -> u32 {
    match kind {
        NodeKind::Dir => libc::S_IFDIR,
        NodeKind::File => libc::S_IFREG,
        NodeKind::Fifo => libc::S_IFIFO,
        NodeKind::Socket => libc::S_IFSOCK,
        NodeKind::CharDev => libc::S_IFCHR,
        NodeKind::BlockDev => libc::S_IFBLK,
    }
}

/// Human name of the file type in `st_mode`, for conflict messages.
pub(super) fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        _ => "unknown file type",
    }
}

fn create(
    root: BorrowedFd<'_>,
    path: &[u8],
    kind: NodeKind,
    rdev: u64,
    attr: &Attr,
    pmtime: Ts,
) -> Result<(), Failure> {
    let e = contain::entry(root, path)?;
    match make_node(&e, kind, rdev) {
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => same_node(&e, kind, rdev)?,
        r => r.step("create")?,
    }
    set_attr(e.at(), attr, None)?;
    set_dir_mtime(&e.dir, pmtime)
}

/// Idempotent re-create: an existing node of the same kind (and device
/// number) is accepted as is; it is never truncated.
fn same_node(e: &Entry<'_>, kind: NodeKind, rdev: u64) -> Result<(), Failure> {
    let st = sys::fstatat(e.dir.as_raw_fd(), &e.name, libc::AT_SYMLINK_NOFOLLOW)
        .step("stat existing")?;
    let want = kind_bits(kind);
    if st.st_mode & libc::S_IFMT != want {
        let msg = format!(
            "exists as a {}, record creates a {}",
            type_name(st.st_mode),
            type_name(want)
        );
        return Err(Failure::Conflict(msg));
    }
    let is_dev = matches!(kind, NodeKind::CharDev | NodeKind::BlockDev);
    if is_dev && st.st_rdev as u64 != rdev {
        return Err(Failure::Conflict(format!(
            "device exists with rdev {:#x}, record says {rdev:#x}",
            st.st_rdev
        )));
    }
    Ok(())
}

fn symlink(
    root: BorrowedFd<'_>,
    path: &[u8],
    target: &[u8],
    attr: &Attr,
    pmtime: Ts,
) -> Result<(), Failure> {
    let e = contain::entry(root, path)?;
    let ctarget = contain::cstring(target)?;
    match sys::symlinkat(&ctarget, e.dir.as_raw_fd(), &e.name) {
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            let existing = match sys::readlinkat(e.dir.as_raw_fd(), &e.name) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                r => Some(r.step("read existing symlink")?),
            };
            if existing.as_deref() != Some(target) {
                return Err(Failure::Conflict(
                    "exists and is not the same symlink".into(),
                ));
            }
        }
        r => r.step("symlink")?,
    }
    let (dir, name) = (e.dir.as_raw_fd(), e.name.as_c_str());
    sys::lchownat(dir, name, attr.uid, attr.gid, 0).step("chown")?;
    sys::lutimensat(dir, name, None, attr.mtime, 0).step("set times")?;
    set_dir_mtime(&e.dir, pmtime)
}

fn link(root: BorrowedFd<'_>, existing: &[u8], path: &[u8], pmtime: Ts) -> Result<(), Failure> {
    let src = contain::entry(root, existing)?;
    let dst = contain::entry(root, path)?;
    let (sd, dd) = (src.dir.as_raw_fd(), dst.dir.as_raw_fd());
    match sys::linkat(sd, &src.name, dd, &dst.name) {
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            let a =
                sys::fstatat(sd, &src.name, libc::AT_SYMLINK_NOFOLLOW).step("stat link source")?;
            let b = sys::fstatat(dd, &dst.name, libc::AT_SYMLINK_NOFOLLOW).step("stat existing")?;
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
                return Err(Failure::Conflict(
                    "exists and is not a link to the same inode".into(),
                ));
            }
        }
        r => r.step("link")?,
    }
    set_dir_mtime(&dst.dir, pmtime)
}

fn remove(root: BorrowedFd<'_>, path: &[u8], dir: bool, pmtime: Ts) -> Result<(), Failure> {
    let e = contain::entry(root, path)?;
    let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
    match sys::unlinkat(e.dir.as_raw_fd(), &e.name, flags) {
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
        r => r.step(if dir { "rmdir" } else { "unlink" })?,
    }
    set_dir_mtime(&e.dir, pmtime)
}

fn rename(
    root: BorrowedFd<'_>,
    from: &[u8],
    to: &[u8],
    flags: u32,
    pmtimes: (Ts, Ts),
) -> Result<(), Failure> {
    if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
        return Err(Failure::Unsafe(format!(
            "unsupported rename flags {flags:#x}"
        )));
    }
    let f = contain::entry(root, from)?;
    let t = contain::entry(root, to)?;
    let (fd, td) = (f.dir.as_raw_fd(), t.dir.as_raw_fd());
    match sys::renameat2(fd, &f.name, td, &t.name, flags) {
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EEXIST)) => {
            let redo = flags & RENAME_EXCHANGE == 0
                && !sys::exists(fd, &f.name).step("stat rename source")?
                && sys::exists(td, &t.name).step("stat rename target")?;
            if !redo {
                return Err(Failure::os("rename", err));
            }
        }
        r => r.step("rename")?,
    }
    set_dir_mtime(&f.dir, pmtimes.0)?;
    set_dir_mtime(&t.dir, pmtimes.1)
}

/// Opens an existing regular file for writing without following a symlink
/// and without opening anything else (a device or fifo planted or created
/// under that name is refused, never opened for writing).
fn open_regular(e: &Entry<'_>) -> Result<OwnedFd, Failure> {
    let dir = e.dir.as_raw_fd();
    let st = sys::fstatat(dir, &e.name, libc::AT_SYMLINK_NOFOLLOW).step("stat")?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Failure::Conflict(format!(
            "is a {}, not a regular file",
            type_name(st.st_mode)
        )));
    }
    let flags = libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = sys::openat(dir, &e.name, flags).step("open")?;
    let now = sys::fstat(&fd).step("stat open file")?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Failure::Conflict("was replaced while being opened".into()));
    }
    Ok(fd)
}

/// Runs a data change on the regular file at `path`, then sets its metadata
/// through the same descriptor (so the mtime lands after the data).
fn with_regular<F>(root: BorrowedFd<'_>, path: &[u8], attr: &Attr, change: F) -> Result<(), Failure>
where
    F: FnOnce(&OwnedFd) -> Result<(), Failure>,
{
    let e = contain::entry(root, path)?;
    let fd = open_regular(&e)?;
    change(&fd)?;
    set_attr((fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH), attr, None)
}

/// Sets (`Some`) or removes (`None`) an xattr on a regular file or directory.
/// Other kinds cannot carry `user.*` xattrs on Linux; records for them are
/// skipped with a warning rather than opening a device or fifo.
fn set_xattr(
    root: BorrowedFd<'_>,
    path: &[u8],
    name: &[u8],
    value: Option<&[u8]>,
) -> Result<(), Failure> {
    let node = contain::node(root, path)?;
    let cname = contain::cstring(name)?;
    let Some(fd) = open_for_xattr(&node)? else {
        let (name, path) = (super::escape_bytes(name), super::display_path(path));
        warn!("xattr {name} on {path} skipped: not a regular file or directory");
        return Ok(());
    };
    match value {
        Some(v) => sys::fsetxattr(&fd, &cname, v).step("setxattr"),
        None => match sys::fremovexattr(&fd, &cname) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
            r => r.step("removexattr"),
        },
    }
}

fn open_for_xattr(node: &Node<'_>) -> Result<Option<OwnedFd>, Failure> {
    let (dir, name, flags) = node.at();
    let st = sys::fstatat(dir, name, flags | libc::AT_SYMLINK_NOFOLLOW).step("stat")?;
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFDIR {
        return Ok(None);
    }
    let name = if name.is_empty() { c"." } else { name };
    let oflags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = sys::openat(dir, name, oflags).step("open")?;
    let now = sys::fstat(&fd).step("stat open file")?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Failure::Conflict("was replaced while being opened".into()));
    }
    Ok(Some(fd))
}
