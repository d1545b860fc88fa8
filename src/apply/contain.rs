//! Containment (invariant 6): record paths are validated component by
//! component and their parent directory is resolved beneath the root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | ...)`, so no record can
//! reach outside the root, whatever it names and whatever symlinks were
//! planted in the tree. The final component is left to `*at` calls made with
//! `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW` by the caller.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::Failure;

/// How often `openat2` is retried when the kernel reports a racing rename or
/// mount (`EAGAIN`); without `..` components this should never happen.
const EAGAIN_RETRIES: usize = 16;

/// A directory the final step of an operation is relative to: the root
/// itself (borrowed) or a subdirectory resolved beneath it.
pub(super) enum DirFd<'r> {
    Root(BorrowedFd<'r>),
    Sub(OwnedFd),
}

impl AsRawFd for DirFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            DirFd::Root(fd) => fd.as_raw_fd(),
            DirFd::Sub(fd) => fd.as_raw_fd(),
        }
    }
}

/// A named entry: its (safely resolved) parent directory and its last
/// component, which the caller must never follow if it is a symlink.
pub(super) struct Entry<'r> {
    pub dir: DirFd<'r>,
    pub name: CString,
}

impl Entry<'_> {
    /// The `(dirfd, name, extra_flags)` triple for `*at` calls on this entry.
    pub fn at(&self) -> At<'_> {
        (self.dir.as_raw_fd(), self.name.as_c_str(), 0)
    }
}

/// `(dirfd, name, extra *at flags)` addressing one node for `*at` calls.
pub(super) type At<'a> = (RawFd, &'a CStr, libc::c_int);

/// What a record path designates: the root itself or an entry below it.
pub(super) enum Node<'r> {
    Root(BorrowedFd<'r>),
    Entry(Entry<'r>),
}

impl Node<'_> {
    /// The `(dirfd, name, extra_flags)` triple for `*at` calls on this node:
    /// the root is addressed as its own fd with `AT_EMPTY_PATH`.
    pub fn at(&self) -> At<'_> {
        match self {
            Node::Root(fd) => (fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH),
            Node::Entry(e) => e.at(),
        }
    }
}

/// Splits a record path into validated components. The empty path (the root)
/// yields no components.
pub(super) fn components(path: &[u8]) -> Result<Vec<&[u8]>, Failure> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path.first() == Some(&b'/') {
        return Err(Failure::Unsafe("absolute path".into()));
    }
    path.split(|&b| b == b'/')
        .map(|c| check_component(c).map(|()| c))
        .collect()
}

fn check_component(c: &[u8]) -> Result<(), Failure> {
    let why = match c {
        b"" => "empty path component",
        b"." => "`.` path component",
        b".." => "`..` path component",
        _ if c.contains(&0) => "NUL byte in path",
        _ => return Ok(()),
    };
    Err(Failure::Unsafe(why.into()))
}

/// Resolves the node a record path names: the root for the empty path.
pub(super) fn node<'r>(root: BorrowedFd<'r>, path: &[u8]) -> Result<Node<'r>, Failure> {
    if path.is_empty() {
        Ok(Node::Root(root))
    } else {
        entry(root, path).map(Node::Entry)
    }
}

/// Resolves the parent directory of `path` beneath `root` and returns it with
/// the last component. The root itself is refused: it has no name to create,
/// remove or rename.
pub(super) fn entry<'r>(root: BorrowedFd<'r>, path: &[u8]) -> Result<Entry<'r>, Failure> {
    let comps = components(path)?;
    let Some((last, parents)) = comps.split_last() else {
        return Err(Failure::Unsafe(
            "the root cannot be the target of this operation".into(),
        ));
    };
    let name = cstring(last)?;
    if parents.is_empty() {
        return Ok(Entry {
            dir: DirFd::Root(root),
            name,
        });
    }
    let rel = cstring(&parents.join(&b'/'))?;
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    let dir = open_beneath(root, &rel, flags).map_err(parent_failure)?;
    Ok(Entry {
        dir: DirFd::Sub(dir),
        name,
    })
}

/// Names the containment refusals openat2 reports, so an operator sees
/// "traverses a symlink" rather than a bare ELOOP.
fn parent_failure(e: io::Error) -> Failure {
    match e.raw_os_error() {
        Some(libc::ELOOP) => Failure::Unsafe("parent path traverses a symlink".into()),
        Some(libc::EXDEV) => {
            Failure::Unsafe("parent path leaves the root or crosses a mount".into())
        }
        _ => Failure::os("resolve parent directory", e),
    }
}

/// Converts a validated path component (no NUL) to a C string.
pub(super) fn cstring(bytes: &[u8]) -> Result<CString, Failure> {
    CString::new(bytes).map_err(|_| Failure::Unsafe("NUL byte in name".into()))
}

/// `openat2(root, rel, flags)` that refuses to leave `root`, to follow any
/// symlink (even magic links) or to cross a mount point.
pub(crate) fn open_beneath(
    root: BorrowedFd<'_>,
    rel: &CStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain old data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    for _ in 0..EAGAIN_RETRIES {
        // SAFETY: valid fd, NUL-terminated path and a live open_how of the given size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                rel.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor to us.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EAGAIN) {
            return Err(err);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}
