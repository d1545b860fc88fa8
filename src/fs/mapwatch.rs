//! Shared writable mappings that outlive their passthrough open.
//!
//! A writable open of an inode that is in passthrough mode gets
//! FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO (see `iomode`): its reads and writes
//! reach the daemon, but an `mmap` of it maps BACKING's file itself, and the
//! mapping outlives `close()` (the RELEASE arrives at close, not at
//! `munmap`). Stores through it change BACKING behind replfs. They are
//! caught by their effect on the inode's ctime, which a store moves when it
//! makes a clean page dirty (`page_mkwrite` → `file_update_time`):
//!
//! - at RELEASE the backing file is flushed (`fdatasync`): every dirty page
//!   is written back and write-protected, so any later store faults and
//!   moves the ctime; then a ctime other than the one the last logged change
//!   left is logged as a `Resync` of the path (`Core::check_unlogged`);
//! - the inode is watched from its first writable passthrough open until
//!   none is open and no process maps it: once a second the watcher looks
//!   for a shared writable mapping of it in `/proc/*/maps` (listed under the
//!   FUSE inode, or under BACKING's for a mapping of BACKING itself). If
//!   there is one, or if the ctime moved, it flushes the backing file and
//!   compares the ctime again. A round with neither an open nor a mapping
//!   left is the last one.
//!
//! A store is therefore either before a flush and seen by the comparison
//! that follows it (the repair reads the file after the Resync record), or
//! after it and moves the ctime for the next round (a new mapping's first
//! store to a page faults as well): the mirror is repaired within about a
//! second of a store, and nothing is left unlogged and unrecorded
//! (DESIGN.md invariant 2).

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::inodes::Inode;

/// How often watched inodes are looked at.
pub const ROUND: Duration = Duration::from_secs(1);

/// A watched inode, with a descriptor of BACKING (to flush and stat it).
pub struct Watched {
    pub node: Arc<Inode>,
    pub fd: OwnedFd,
}

/// The inodes released by a writable passthrough open, until no process
/// maps them shared and writable.
#[derive(Default)]
pub struct MapWatch {
    watched: Mutex<HashMap<u64, Watched>>,
    wake: Condvar,
    /// Held while a round runs (a last round waits for it).
    round: Mutex<()>,
    /// Writable passthrough opens per inode (watched at least while any).
    dio_opens: Mutex<HashMap<u64, u32>>,
    stop: AtomicBool,
    /// st_dev of the mount (how `/proc/PID/maps` lists a mapping made
    /// through it); 0 while unknown (then any device matches the inode
    /// number: an extra round, never a missed mapping).
    pub fuse_dev: AtomicU64,
}

impl MapWatch {
    /// A writable passthrough open of `node` starts: watched from now on
    /// (`fd` gives a descriptor of BACKING to flush and stat).
    pub fn opened(&self, node: &Arc<Inode>, fd: impl FnOnce() -> std::io::Result<OwnedFd>) {
        *self.dio_opens.lock().entry(node.ino).or_default() += 1;
        self.watch(node, fd);
    }

    /// Watches `node` unless it is already (`fd` is only called then).
    pub fn watch(&self, node: &Arc<Inode>, fd: impl FnOnce() -> std::io::Result<OwnedFd>) {
        let mut w = self.watched.lock();
        if let std::collections::hash_map::Entry::Vacant(e) = w.entry(node.ino) {
            match fd() {
                Ok(fd) => {
                    e.insert(Watched {
                        node: node.clone(),
                        fd,
                    });
                    self.wake.notify_one();
                }
                Err(err) => log::warn!(
                    "passthrough: inode {}: cannot watch for stores through mappings: {err}",
                    node.ino
                ),
            }
        }
    }

    /// A writable passthrough open of `ino` was released (the inode stays
    /// watched until a round finds no mapping and no open).
    pub fn released(&self, ino: u64) {
        let mut o = self.dio_opens.lock();
        if let Some(n) = o.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                o.remove(&ino);
            }
        }
    }

    /// Is a writable passthrough open of `ino` open?
    pub fn has_open(&self, ino: u64) -> bool {
        self.dio_opens.lock().contains_key(&ino)
    }

    /// Waits until something is watched and a round is due, then takes
    /// the watched inodes out (`put_back` returns those still mapped),
    /// holding the round lock. None: stopping.
    pub fn next_round(&self) -> Option<(MutexGuard<'_, ()>, Vec<Watched>)> {
        let mut w = self.watched.lock();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            if w.is_empty() {
                self.wake.wait(&mut w);
                continue;
            }
            self.wake.wait_for(&mut w, ROUND);
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            drop(w);
            let round = self.round.lock();
            let taken = self.watched.lock().drain().map(|(_, v)| v).collect();
            return Some((round, taken));
        }
    }

    /// Stops the watcher and takes every watched inode out for a last
    /// round, after the one in progress (if any).
    pub fn finish(&self) -> (MutexGuard<'_, ()>, Vec<Watched>) {
        self.stop();
        let round = self.round.lock();
        let taken = self.watched.lock().drain().map(|(_, v)| v).collect();
        (round, taken)
    }

    /// Returns inodes still mapped after a round (a newer entry for the same
    /// inode, added meanwhile, wins).
    pub fn put_back(&self, still: Vec<Watched>) {
        let mut w = self.watched.lock();
        for v in still {
            w.entry(v.node.ino).or_insert(v);
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _g = self.watched.lock();
        self.wake.notify_all();
    }

    /// Which of `nodes` some process maps shared and writable.
    pub fn mapped(&self, nodes: &[&Inode]) -> HashSet<u64> {
        let fuse_dev = self.fuse_dev.load(Ordering::Relaxed);
        let mut keys: HashMap<(u64, u64), u64> = HashMap::new();
        let mut by_ino: HashMap<u64, u64> = HashMap::new();
        for n in nodes {
            keys.insert(n.key, n.ino);
            if fuse_dev != 0 {
                keys.insert((fuse_dev, n.ino), n.ino);
            } else {
                by_ino.insert(n.ino, n.ino);
            }
        }
        let mut found = HashSet::new();
        for_each_shared_writable_mapping(|dev, ino| {
            if let Some(&i) = keys.get(&(dev, ino)).or_else(|| by_ino.get(&ino)) {
                found.insert(i);
            }
        });
        found
    }
}

/// Whether stores through shared mappings of BACKING can be caught (see
/// the module doc): the backing filesystem must move the ctime of a file
/// at the first store to each clean page with a fine-grained timestamp
/// (multigrain timestamps: Linux 6.13+, ext4, XFS, btrfs). Err: why not.
pub fn stores_trackable(backing: std::os::fd::BorrowedFd<'_>) -> Result<(), String> {
    use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, fstatfs};
    let fs = fstatfs(backing).map_err(|e| format!("cannot statfs BACKING: {e}"))?;
    let t = fs.filesystem_type();
    if ![EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, BTRFS_SUPER_MAGIC].contains(&t) {
        return Err(format!(
            "BACKING's file system (type {:#x}) is not ext4, XFS or btrfs, where stores \
             through shared mappings are tracked",
            t.0
        ));
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if !kernel_at_least(&release, (6, 13)) {
        return Err(format!(
            "Linux {release}: multigrain timestamps (6.13+) are needed to track stores \
             through shared mappings"
        ));
    }
    Ok(())
}

/// Is a kernel release string ("6.18.44-fc") at least `major.minor`?
fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

/// Calls `f(dev, ino)` for every shared writable file mapping of every
/// process (`/proc/PID/maps`; processes that vanish or cannot be read are
/// skipped).
fn for_each_shared_writable_mapping(mut f: impl FnMut(u64, u64)) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        if !e.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(text) = std::fs::read(e.path().join("maps")) else {
            continue;
        };
        for line in text.split(|&b| b == b'\n') {
            if let Some((dev, ino)) = shared_writable(line) {
                f(dev, ino);
            }
        }
    }
}

/// The (st_dev, st_ino) of a `/proc/PID/maps` line mapping a file shared and
/// writable (`rw-s`), else None.
fn shared_writable(line: &[u8]) -> Option<(u64, u64)> {
    let mut f = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let (_range, perms, _off, dev, ino) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    if perms.len() != 4 || perms[1] != b'w' || perms[3] != b's' {
        return None;
    }
    let (maj, min) = std::str::from_utf8(dev).ok()?.split_once(':')?;
    let dev = libc::makedev(
        u32::from_str_radix(maj, 16).ok()?,
        u32::from_str_radix(min, 16).ok()?,
    );
    let ino: u64 = std::str::from_utf8(ino).ok()?.parse().ok()?;
    (ino != 0).then_some((dev, ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_are_parsed() {
        let l = b"7f2f477b6000-7f2f477c6000 rw-s 00000000 00:27 10174482                   /m/f";
        assert_eq!(shared_writable(l), Some((libc::makedev(0, 0x27), 10174482)));
        let l = b"7f2f477b6000-7f2f477c6000 rw-s 00001000 fe:01 12 /m/a file with spaces";
        assert_eq!(shared_writable(l), Some((libc::makedev(0xfe, 1), 12)));
        for other in [
            &b"7f2f477b6000-7f2f477c6000 rw-p 00000000 00:27 10174482 /m/f"[..],
            b"7f2f477b6000-7f2f477c6000 r--s 00000000 00:27 10174482 /m/f",
            b"7ffd1000-7ffd2000 rw-s 00000000 00:00 0 ",
            b"7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]",
            b"garbage",
            b"",
            b"a b c zz:zz 5",
        ] {
            assert_eq!(
                shared_writable(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn kernel_releases_compare() {
        assert!(kernel_at_least("6.18.44-fc-v445", (6, 13)));
        assert!(kernel_at_least("6.13.0", (6, 13)));
        assert!(kernel_at_least("7.0.1", (6, 13)));
        assert!(!kernel_at_least("6.12.9-amd64", (6, 13)));
        assert!(!kernel_at_least("5.19", (6, 13)));
        assert!(!kernel_at_least("", (6, 13)));
        assert!(!kernel_at_least("garbage", (6, 13)));
    }

    #[test]
    fn a_mapping_of_this_process_is_found() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let md = f.metadata().unwrap();
        let key = (md.dev(), md.ino());
        let seen = |key: (u64, u64)| {
            let mut hit = false;
            for_each_shared_writable_mapping(|d, i| hit |= (d, i) == key);
            hit
        };
        assert!(!seen(key));
        // SAFETY: a fresh mapping of a file we own, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        assert!(seen(key));
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 4096) };
        assert!(!seen(key));
    }
}
