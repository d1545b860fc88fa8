//! Changes in flight: the paths of changes between "applied to BACKING" and
//! "appended to the WAL", kept in a shared memory map of `STATE/inflight`.
//!
//! A MAP_SHARED page lives in the page cache, so it survives a kill -9 of the
//! mount without a syscall per change. On the next start, every slot still
//! marked busy names a path whose change may be in BACKING but not in the log:
//! those paths are logged as needing resync (DESIGN.md invariant 2).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

/// Matches the maximum of `mount.threads`.
pub const SLOTS: usize = 64;
const PATH_MAX: usize = 4096;
/// state u32, two lengths u32, padding, then two paths.
const HEADER: usize = 16;
const SLOT: usize = HEADER + 2 * PATH_MAX;
const FILE_LEN: usize = SLOTS * SLOT;

pub struct Inflight {
    map: *mut u8,
    /// Bit i set = slot i taken.
    used: AtomicU64,
}

// The map is only touched through slots claimed exclusively via `used`.
unsafe impl Send for Inflight {}
unsafe impl Sync for Inflight {}

/// Clears its slot when dropped (after the change is in the WAL).
pub struct Mark<'a> {
    owner: &'a Inflight,
    slot: Option<usize>,
}

impl Inflight {
    /// Maps `STATE/inflight`, returning the paths left busy by a crashed run.
    pub fn open(state: &Path) -> Result<(Inflight, Vec<Vec<u8>>)> {
        let path = state.join("inflight");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.set_len(FILE_LEN as u64)?;
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            bail!(
                "cannot map {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        let me = Inflight {
            map: map.cast(),
            used: AtomicU64::new(0),
        };
        let left = me.collect_left_over();
        Ok((me, left))
    }

    fn state(&self, slot: usize) -> &AtomicU32 {
        unsafe { &*(self.map.add(slot * SLOT) as *const AtomicU32) }
    }

    fn collect_left_over(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for s in 0..SLOTS {
            if self.state(s).load(Ordering::Acquire) == 0 {
                continue;
            }
            let base = unsafe { self.map.add(s * SLOT) };
            for k in 0..2 {
                let len =
                    unsafe { std::ptr::read_unaligned(base.add(4 + 4 * k) as *const u32) } as usize;
                if len == 0 || len > PATH_MAX {
                    continue;
                }
                let p = unsafe { std::slice::from_raw_parts(base.add(HEADER + k * PATH_MAX), len) };
                out.push(p[1..].to_vec());
            }
            self.state(s).store(0, Ordering::Release);
        }
        out
    }

    /// Marks a change to `paths` (one or two) as in flight. Each FUSE worker
    /// holds at most one mark and `mount.threads` is at most `SLOTS`, so a
    /// slot is always free; were none free the mark would be skipped rather
    /// than block a writer.
    pub fn begin(&self, paths: &[&[u8]]) -> Mark<'_> {
        let Some(slot) = self.claim() else {
            return Mark {
                owner: self,
                slot: None,
            };
        };
        let base = unsafe { self.map.add(slot * SLOT) };
        for (k, p) in paths.iter().take(2).enumerate() {
            // Stored with a leading '/' so the root ("") is distinguishable from "unused".
            let n = (p.len() + 1).min(PATH_MAX);
            unsafe {
                *base.add(HEADER + k * PATH_MAX) = b'/';
                std::ptr::copy_nonoverlapping(
                    p.as_ptr(),
                    base.add(HEADER + k * PATH_MAX + 1),
                    n - 1,
                );
                std::ptr::write_unaligned(base.add(4 + 4 * k) as *mut u32, n as u32);
            }
        }
        if paths.len() < 2 {
            unsafe { std::ptr::write_unaligned(base.add(8) as *mut u32, 0) };
        }
        self.state(slot).store(1, Ordering::Release);
        Mark {
            owner: self,
            slot: Some(slot),
        }
    }

    fn claim(&self) -> Option<usize> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let free = (!cur).trailing_zeros() as usize;
            if free >= SLOTS {
                return None;
            }
            match self.used.compare_exchange_weak(
                cur,
                cur | (1 << free),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(free),
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for Mark<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            self.owner.state(s).store(0, Ordering::Release);
            self.owner.used.fetch_and(!(1 << s), Ordering::AcqRel);
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.map.cast(), FILE_LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_slots_survive_and_are_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let (f, left) = Inflight::open(dir.path()).unwrap();
        assert!(left.is_empty());
        let done = f.begin(&[b"a/done"]);
        drop(done);
        let crashed = f.begin(&[b"x/from", b"y/to"]);
        let root = f.begin(&[b""]);
        std::mem::forget(crashed);
        std::mem::forget(root);
        drop(f);
        let (_f, mut left) = Inflight::open(dir.path()).unwrap();
        left.sort();
        assert_eq!(
            left,
            vec![b"".to_vec(), b"x/from".to_vec(), b"y/to".to_vec()]
        );
        let (_g, again) = Inflight::open(dir.path()).unwrap();
        assert!(again.is_empty(), "reported once, then cleared");
    }

    #[test]
    fn slots_are_reused_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = Inflight::open(dir.path()).unwrap();
        let marks: Vec<_> = (0..SLOTS).map(|_| f.begin(&[b"p"])).collect();
        let extra = f.begin(&[b"q"]);
        assert!(
            extra.slot.is_none(),
            "no slot left: mark skipped, not blocked"
        );
        drop(marks);
        assert!(f.begin(&[b"r"]).slot.is_some());
    }
}
