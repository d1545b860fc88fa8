//! Thin, errno-returning wrappers over the *at syscalls the passthrough uses.
//!
//! Everything resolves relative to an inode's O_PATH descriptor or a directory
//! descriptor; no absolute backing path is ever built (PATH_MAX safety).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use super::error::{Errno, Res};

fn cvt(r: libc::c_int) -> Res<libc::c_int> {
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

fn cvt_size(r: libc::ssize_t) -> Res<usize> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

/// A name from the kernel as a C string (names never hold NUL; refuse if one does).
pub fn cname(name: &OsStr) -> Res<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno(libc::EINVAL))
}

/// `/proc/self/fd/N`: reopens an O_PATH descriptor with real access modes.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a formatted number")
}

pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> Res<OwnedFd> {
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the inode behind an O_PATH descriptor with `flags`.
pub fn reopen(fd: RawFd, flags: i32) -> Res<OwnedFd> {
    let p = proc_path(fd);
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
    openat(libc::AT_FDCWD, &p, flags, 0)
}

pub fn fstat(fd: RawFd) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub fn fstatat(dir: RawFd, name: &CStr, flags: i32) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

pub fn pwrite_all(fd: RawFd, mut data: &[u8], mut off: u64) -> Res<()> {
    while !data.is_empty() {
        let n = cvt_size(unsafe {
            libc::pwrite(fd, data.as_ptr().cast(), data.len(), off as libc::off_t)
        })?;
        if n == 0 {
            return Err(Errno(libc::EIO));
        }
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

/// Reads up to `len` bytes at `off` (short only at end of file).
pub fn pread_full(fd: RawFd, len: usize, off: u64) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = cvt_size(unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> Res<()> {
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> Res<()> {
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> Res<()> {
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn readlinkat(dir: RawFd, name: &CStr) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = cvt_size(unsafe {
        libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn linkat(olddir: RawFd, oldname: &CStr, newdir: RawFd, newname: &CStr, flags: i32) -> Res<()> {
    cvt(unsafe { libc::linkat(olddir, oldname.as_ptr(), newdir, newname.as_ptr(), flags) })
        .map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> Res<()> {
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(od: RawFd, on: &CStr, nd: RawFd, nn: &CStr, flags: u32) -> Res<()> {
    cvt(unsafe { libc::renameat2(od, on.as_ptr(), nd, nn.as_ptr(), flags) }).map(drop)
}

pub fn fchownat(dir: RawFd, name: &CStr, uid: u32, gid: u32, flags: i32) -> Res<()> {
    cvt(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, flags) }).map(drop)
}

pub fn fchmodat(dir: RawFd, name: &CStr, mode: u32) -> Res<()> {
    cvt(unsafe { libc::fchmodat(dir, name.as_ptr(), mode, 0) }).map(drop)
}

pub fn utimensat(dir: RawFd, name: &CStr, times: &[libc::timespec; 2], flags: i32) -> Res<()> {
    cvt(unsafe { libc::utimensat(dir, name.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

pub fn futimens(fd: RawFd, times: &[libc::timespec; 2]) -> Res<()> {
    cvt(unsafe { libc::futimens(fd, times.as_ptr()) }).map(drop)
}

pub fn ftruncate(fd: RawFd, size: u64) -> Res<()> {
    cvt(unsafe { libc::ftruncate(fd, size as libc::off_t) }).map(drop)
}

pub fn fallocate(fd: RawFd, mode: i32, off: u64, len: u64) -> Res<()> {
    cvt(unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) }).map(drop)
}

pub fn fsync(fd: RawFd, datasync: bool) -> Res<()> {
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn lseek(fd: RawFd, off: i64, whence: i32) -> Res<i64> {
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

pub fn copy_file_range(fin: RawFd, off_in: u64, fout: RawFd, off_out: u64, len: u64) -> Res<usize> {
    let mut oi = off_in as libc::loff_t;
    let mut oo = off_out as libc::loff_t;
    cvt_size(unsafe { libc::copy_file_range(fin, &mut oi, fout, &mut oo, len as usize, 0) })
}

pub fn fstatvfs(fd: RawFd) -> Res<libc::statvfs> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok(st)
}

pub fn faccessat(dir: RawFd, name: &CStr, mask: i32) -> Res<()> {
    cvt(unsafe { libc::faccessat(dir, name.as_ptr(), mask, 0) }).map(drop)
}

/// Extended attributes through `/proc/self/fd/N` of an O_PATH descriptor
/// (O_PATH descriptors don't support the f*xattr calls).
/// With `size == 0` only the value's length is returned (`Xattr::Size`).
pub fn getxattr(fd: RawFd, name: &CStr, size: usize) -> Res<Xattr> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let n = cvt_size(unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), ptr, size) })?;
    Ok(Xattr::of(buf, n, size))
}

pub fn listxattr(fd: RawFd, size: usize) -> Res<Xattr> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let n = cvt_size(unsafe { libc::listxattr(p.as_ptr(), ptr, size) })?;
    Ok(Xattr::of(buf, n, size))
}

/// The answer to a get/list xattr call: a size probe or the bytes.
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

impl Xattr {
    fn of(mut buf: Vec<u8>, n: usize, size: usize) -> Xattr {
        if size == 0 {
            Xattr::Size(n as u32)
        } else {
            buf.truncate(n);
            Xattr::Data(buf)
        }
    }
}

pub fn setxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> Res<()> {
    let p = proc_path(fd);
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(fd: RawFd, name: &CStr) -> Res<()> {
    let p = proc_path(fd);
    cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// One directory entry as returned by getdents64.
pub struct DirEnt {
    pub ino: u64,
    pub off: i64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

/// Reads a batch of entries starting at the directory offset `off`.
pub fn read_dir_at(fd: &OwnedFd, off: i64, buf: &mut [u8]) -> Res<Vec<DirEnt>> {
    lseek(fd.as_raw_fd(), off, libc::SEEK_SET)?;
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(Errno::last());
    }
    Ok(parse_dirents(&buf[..n as usize]))
}

fn parse_dirents(mut b: &[u8]) -> Vec<DirEnt> {
    let mut out = Vec::new();
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    while b.len() >= 19 {
        let ino = u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes"));
        let off = i64::from_ne_bytes(b[8..16].try_into().expect("8 bytes"));
        let reclen = u16::from_ne_bytes([b[16], b[17]]) as usize;
        if reclen < 19 || reclen > b.len() {
            break;
        }
        let dtype = b[18];
        let raw = &b[19..reclen];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        out.push(DirEnt {
            ino,
            off,
            dtype,
            name: raw[..end].to_vec(),
        });
        b = &b[reclen..];
    }
    out
}
