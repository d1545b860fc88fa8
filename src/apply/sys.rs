//! Thin `io::Result` wrappers over the `*at` system calls the apply engine
//! uses; each takes a directory fd and a single name, never a full path.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::wal::Ts;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_long(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `fstatat(dir, name, flags)`; pass `AT_SYMLINK_NOFOLLOW` to stat a link itself.
pub fn fstatat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid C string and a buffer of the right type for the kernel to fill.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it initialised the buffer.
    Ok(unsafe { st.assume_init() })
}

/// `fstat` of an open descriptor.
pub fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    fstatat(
        fd.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
    )
}

/// Whether `name` exists in `dir` (without following it).
pub fn exists(dir: RawFd, name: &CStr) -> io::Result<bool> {
    match fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `openat(dir, name, flags)`; the caller includes `O_NOFOLLOW` where needed.
pub fn openat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    openat_mode(dir, name, flags, 0)
}

/// `openat` with a creation mode (for `O_CREAT`).
pub fn openat_mode(
    dir: RawFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CLOEXEC;
    // SAFETY: valid C string; the returned fd is owned by nobody else.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags, libc::c_uint::from(mode)) })?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: libc::mode_t, dev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode, dev as libc::dev_t) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// `readlinkat` of a symlink's target bytes.
pub fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid C string and a writable buffer of the given length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    buf.truncate(n);
    Ok(buf)
}

/// `linkat` without `AT_SYMLINK_FOLLOW`: a symlink is linked, not its target.
pub fn linkat(odir: RawFd, oname: &CStr, ndir: RawFd, nname: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::linkat(odir, oname.as_ptr(), ndir, nname.as_ptr(), 0) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    odir: RawFd,
    oname: &CStr,
    ndir: RawFd,
    nname: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid C strings; the raw syscall avoids depending on a libc wrapper.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            odir,
            oname.as_ptr(),
            ndir,
            nname.as_ptr(),
            flags,
        )
    };
    cvt_long(r).map(drop)
}

/// `fchownat(..., flags | AT_SYMLINK_NOFOLLOW)`.
pub fn lchownat(dir: RawFd, name: &CStr, uid: u32, gid: u32, flags: libc::c_int) -> io::Result<()> {
    let flags = flags | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: valid C string.
    cvt(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, flags) }).map(drop)
}

/// chmod that never follows a symlink at the final component: `fchmodat2`
/// with `AT_SYMLINK_NOFOLLOW` (Linux 6.6), else an `O_PATH` descriptor
/// reopened through `/proc/self/fd`. A symlink gives `EOPNOTSUPP`.
pub fn lchmodat(dir: RawFd, name: &CStr, mode: u32, flags: libc::c_int) -> io::Result<()> {
    let flags = flags | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: valid C string.
    let r = unsafe { libc::syscall(libc::SYS_fchmodat2, dir, name.as_ptr(), mode, flags) };
    match cvt_long(r) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => lchmod_proc(dir, name, mode),
        other => other.map(drop),
    }
}

fn lchmod_proc(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // An empty name addresses `dir` itself (an O_PATH or open descriptor).
    let opened = if name.is_empty() {
        None
    } else {
        Some(openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW)?)
    };
    let fd = opened.as_ref().map_or(dir, AsRawFd::as_raw_fd);
    if fstatat(fd, c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)?.st_mode & libc::S_IFMT
        == libc::S_IFLNK
    {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    let proc = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C string naming our own descriptor.
    cvt(unsafe { libc::chmod(proc.as_ptr(), mode) }).map(drop)
}

fn timespec(ts: Option<Ts>) -> libc::timespec {
    match ts {
        Some(t) => libc::timespec {
            tv_sec: t.sec as libc::time_t,
            tv_nsec: t.nsec as libc::c_long,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// `utimensat(..., flags | AT_SYMLINK_NOFOLLOW)` setting mtime, and atime
/// only when given (`UTIME_OMIT` otherwise).
pub fn lutimensat(
    dir: RawFd,
    name: &CStr,
    atime: Option<Ts>,
    mtime: Ts,
    flags: libc::c_int,
) -> io::Result<()> {
    let times = [timespec(atime), timespec(Some(mtime))];
    let flags = flags | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: valid C string and a two-element timespec array.
    cvt(unsafe { libc::utimensat(dir, name.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

/// Writes all of `data` at `offset`, retrying short writes and EINTR.
pub fn pwrite_all(fd: &OwnedFd, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        let off =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: the buffer is valid for data.len() bytes.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), off) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

pub fn ftruncate(fd: &OwnedFd, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned descriptor.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), off_t(size)?) }).map(drop)
}

pub fn fallocate(fd: &OwnedFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned descriptor.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off_t(offset)?, off_t(len)?) }).map(drop)
}

pub fn fsetxattr(fd: &OwnedFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: valid C string and value buffer of the given length.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    cvt(r).map(drop)
}

pub fn fremovexattr(fd: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `syncfs` of the filesystem holding `dir` (opened for reading: O_PATH
/// descriptors are not accepted by syncfs).
pub fn syncfs(dir: RawFd) -> io::Result<()> {
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    // SAFETY: plain syscall on an owned descriptor.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    #[test]
    fn proc_chmod_fallback_sets_bits_and_refuses_symlinks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("f"), b"x").expect("write");
        symlink("f", tmp.path().join("l")).expect("symlink");
        let dir = openat(
            libc::AT_FDCWD,
            &std::ffi::CString::new(tmp.path().as_os_str().as_encoded_bytes()).expect("c"),
            libc::O_PATH,
        )
        .expect("open dir");
        lchmod_proc(dir.as_raw_fd(), c"f", 0o4710).expect("chmod");
        let m = std::fs::metadata(tmp.path().join("f")).expect("stat");
        assert_eq!(m.mode() & 0o7777, 0o4710);
        let err = lchmod_proc(dir.as_raw_fd(), c"l", 0o600).expect_err("symlink");
        assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
        lchmod_proc(dir.as_raw_fd(), c"", 0o711).expect("dir itself");
        assert_eq!(
            std::fs::metadata(tmp.path()).expect("stat").mode() & 0o7777,
            0o711
        );
        let file = openat(dir.as_raw_fd(), c"f", libc::O_RDONLY).expect("open f");
        lchmod_proc(file.as_raw_fd(), c"", 0o640).expect("open file");
        assert_eq!(
            std::fs::metadata(tmp.path().join("f"))
                .expect("stat")
                .mode()
                & 0o7777,
            0o640
        );
    }
}
