//! A realistic mixed workload shared by the mount and replication tests.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

pub fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|i| {
            if i % 7 == 0 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            (x >> 33) as u8 ^ (i as u8)
        })
        .collect()
}

pub fn renameat2(a: &Path, b: &Path, flags: u32) -> std::io::Result<()> {
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(a).as_ptr(),
            libc::AT_FDCWD,
            c(b).as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64), nofollow: bool) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), ts.as_ptr(), flags) };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::setxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn removexattr(p: &Path, name: &str) {
    let n = CString::new(name).unwrap();
    let r = unsafe { libc::removexattr(c(p).as_ptr(), n.as_ptr()) };
    assert_eq!(r, 0, "removexattr: {}", std::io::Error::last_os_error());
}

/// Files, directories, renames over existing files, directory renames,
/// truncates, sparse files, hard links, symlinks, xattrs, chmod/chown/utimens,
/// fifos, sockets, RENAME_NOREPLACE / RENAME_EXCHANGE, copy_file_range.
pub fn mixed_workload(m: &Path) {
    fs::create_dir_all(m.join("a/b/c")).unwrap();
    for (i, len) in [0usize, 1, 4095, 4096, (1 << 20) + 13, 3 << 20]
        .iter()
        .enumerate()
    {
        fs::write(m.join(format!("a/b/f{i}")), pattern(*len, i as u64)).unwrap();
    }
    // Overwrite in the middle, append.
    let mut f = OpenOptions::new()
        .write(true)
        .open(m.join("a/b/f4"))
        .unwrap();
    f.seek(SeekFrom::Start(4000)).unwrap();
    f.write_all(&pattern(10_000, 99)).unwrap();
    drop(f);
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.join("a/b/f3"))
        .unwrap();
    f.write_all(b"appended line\n").unwrap();
    drop(f);
    // Save by rename over an existing file (editors).
    fs::write(m.join("a/doc.txt"), b"version 1\n").unwrap();
    let mut t = File::create(m.join("a/.doc.txt.swp")).unwrap();
    t.write_all(b"version 2, saved by rename\n").unwrap();
    t.sync_all().unwrap();
    drop(t);
    fs::rename(m.join("a/.doc.txt.swp"), m.join("a/doc.txt")).unwrap();
    // Directory rename, then writes through the new path.
    fs::rename(m.join("a/b"), m.join("a/b2")).unwrap();
    fs::write(
        m.join("a/b2/c/inside"),
        b"written after the directory moved",
    )
    .unwrap();
    // Truncate: shrink and extend.
    OpenOptions::new()
        .write(true)
        .open(m.join("a/b2/f5"))
        .unwrap()
        .set_len(100_000)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(m.join("a/b2/f2"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // Sparse file and a punched hole.
    let mut s = File::create(m.join("sparse")).unwrap();
    s.seek(SeekFrom::Start(10 << 20)).unwrap();
    s.write_all(&pattern(4096, 7)).unwrap();
    drop(s);
    let h = OpenOptions::new()
        .write(true)
        .open(m.join("a/b2/f5"))
        .unwrap();
    let r = unsafe {
        libc::fallocate(
            h.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            8192,
            65536,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    let r = unsafe { libc::fallocate(h.as_raw_fd(), 0, 0, 200_000) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    drop(h);
    // Hard links: write through the second name, drop the first.
    fs::write(m.join("hl1"), b"hard link content").unwrap();
    fs::hard_link(m.join("hl1"), m.join("a/hl2")).unwrap();
    fs::hard_link(m.join("hl1"), m.join("hl3")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(m.join("a/hl2"))
        .unwrap()
        .write_all(b" + more")
        .unwrap();
    fs::remove_file(m.join("hl1")).unwrap();
    assert_eq!(fs::metadata(m.join("hl3")).unwrap().nlink(), 2);
    // Symlinks, including an owner change on the link itself.
    symlink("b2/f1", m.join("a/rel-link")).unwrap();
    symlink("/etc/hostname", m.join("abs-link")).unwrap();
    std::os::unix::fs::lchown(m.join("abs-link"), Some(1234), Some(1234)).unwrap();
    set_times(
        &m.join("abs-link"),
        (1_600_000_000, 0),
        (1_600_000_001, 123_456_789),
        true,
    );
    // Xattrs on a file and a directory.
    setxattr(&m.join("a/doc.txt"), "user.origin", b"replfs test");
    setxattr(&m.join("a/doc.txt"), "user.drop", b"x");
    removexattr(&m.join("a/doc.txt"), "user.drop");
    setxattr(&m.join("a"), "user.dir", &pattern(300, 3));
    // chmod / chown / utimens (specific, UTIME_OMIT, UTIME_NOW).
    fs::set_permissions(m.join("a/b2/f0"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(m.join("suid"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(m.join("suid"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(m.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(m.join("a/b2/f1"), Some(2000), Some(3000)).unwrap();
    set_times(
        &m.join("a/b2/f1"),
        (1_500_000_000, 1),
        (1_400_000_000, 999_999_999),
        false,
    );
    set_times(
        &m.join("a/b2/f3"),
        (0, libc::UTIME_OMIT),
        (1_300_000_000, 5),
        false,
    );
    set_times(
        &m.join("a/b2/f4"),
        (0, libc::UTIME_NOW),
        (0, libc::UTIME_NOW),
        false,
    );
    // Special files.
    let r = unsafe { libc::mkfifo(c(&m.join("fifo")).as_ptr(), 0o620) };
    assert_eq!(r, 0, "mkfifo: {}", std::io::Error::last_os_error());
    let sock = std::os::unix::net::UnixListener::bind(m.join("sock")).unwrap();
    drop(sock);
    // Removals.
    fs::create_dir_all(m.join("gone/deeper")).unwrap();
    fs::write(m.join("gone/deeper/x"), b"x").unwrap();
    fs::remove_dir_all(m.join("gone")).unwrap();
    // renameat2 flags.
    fs::write(m.join("ex1"), b"exchange one").unwrap();
    fs::create_dir(m.join("ex2")).unwrap();
    fs::write(m.join("ex2/in"), b"inside ex2").unwrap();
    renameat2(&m.join("ex1"), &m.join("ex2"), libc::RENAME_EXCHANGE).unwrap();
    let e = renameat2(&m.join("a/doc.txt"), &m.join("ex1"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    renameat2(
        &m.join("a/doc.txt"),
        &m.join("doc-moved.txt"),
        libc::RENAME_NOREPLACE,
    )
    .unwrap();
    // copy_file_range (std::fs::copy uses it on Linux).
    fs::copy(m.join("a/b2/f4"), m.join("copied")).unwrap();
    // Directory metadata last, so nothing after it changes the directory.
    fs::set_permissions(m.join("a/b2/c"), fs::Permissions::from_mode(0o2750)).unwrap();
}

/// A shared writable mapping of the first `len` bytes of `f`.
pub fn map_shared(f: &std::fs::File, len: usize) -> *mut libc::c_void {
    // SAFETY: a fresh mapping of a descriptor the caller keeps open.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(f),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    addr
}
