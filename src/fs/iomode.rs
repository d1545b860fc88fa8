//! Which kernel I/O mode each open of a regular file gets when FUSE
//! passthrough is on (`mount.passthrough`), following the kernel's rules
//! (fs/fuse/iomode.c, Linux 6.9+):
//!
//! - an inode is in cached mode while some open of it was replied without
//!   FOPEN_PASSTHROUGH (and without FOPEN_DIRECT_IO), or in passthrough mode
//!   while some open was replied with FOPEN_PASSTHROUGH; an open whose reply
//!   conflicts with the mode the inode is in fails with EIO;
//! - while an inode is in passthrough mode *every* new open must carry
//!   FOPEN_PASSTHROUGH with the same backing file, FOPEN_DIRECT_IO ones too
//!   (`fuse_file_io_open`: "Server is expected to use FOPEN_PASSTHROUGH for
//!   all opens of an inode which is already open for passthrough");
//! - FOPEN_DIRECT_IO overrides FOPEN_PASSTHROUGH for read and write (they
//!   reach the daemon), not for mmap (the backing file is mapped).
//!
//! So: a read-only open with no cached open of the inode is a passthrough
//! open (the kernel reads BACKING, the daemon never sees the reads); a
//! writable open while passthrough opens exist is a passthrough open with
//! FOPEN_DIRECT_IO (its reads and writes reach the daemon and are logged);
//! every other open is cached, as without passthrough.
//!
//! The kernel drops an open's mode before the RELEASE reaches the daemon,
//! and the daemon counts an open before it replies: the daemon's counts are
//! never below the kernel's, so a decision taken from them never conflicts.
//! The backing id is held while passthrough opens of the inode exist (the
//! kernel wants the same backing file for all of them).
//!
//! Page cache: passthrough opens are replied without FOPEN_KEEP_CACHE, so
//! the kernel drops the inode's FUSE page cache when the first one opens,
//! and no cached open can fill it again while the inode is in passthrough
//! mode; cached opens after it read what was written meanwhile (the
//! daemon's writes and stores through a mapping of BACKING land in
//! BACKING's page cache, which passthrough reads read).
//!
//! Generic over the backing id so that the rules are testable without a
//! kernel; `fuse.rs` uses it with `fuser::BackingId`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// The mode an open was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through the daemon and the FUSE page cache.
    Cached,
    /// Kernel passthrough, read-only.
    Passthrough,
    /// FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO: writable; reads and writes reach
    /// the daemon, mmap maps the backing file.
    PassthroughDio,
}

/// The decision for a new open.
pub struct Granted<B> {
    pub mode: Mode,
    /// The backing id to reply with (passthrough modes).
    pub backing: Option<Arc<B>>,
    /// The first PassthroughDio open of the inode (now the only one).
    pub first_dio: bool,
    /// Registering the backing file failed: the open is cached instead.
    pub backing_error: Option<std::io::Error>,
}

#[derive(Default)]
struct State<B> {
    cached: u32,
    /// Passthrough opens, PassthroughDio included.
    passthrough: u32,
    dio: u32,
    backing: Option<Arc<B>>,
}

struct Inner<B> {
    inodes: HashMap<u64, State<B>>,
    /// fh -> (ino, mode) of every counted open.
    opens: HashMap<u64, (u64, Mode)>,
}

pub struct IoModes<B> {
    inner: Mutex<Inner<B>>,
}

impl<B> Default for IoModes<B> {
    fn default() -> Self {
        IoModes {
            inner: Mutex::new(Inner {
                inodes: HashMap::new(),
                opens: HashMap::new(),
            }),
        }
    }
}

impl<B> IoModes<B> {
    /// Decides the mode of open `fh` of `ino` and counts it (call before
    /// replying). `read_only`: the open cannot write. `new_passthrough`:
    /// may a read-only open become a passthrough one. `register` makes the
    /// backing id when the inode holds none; if it fails the open is cached.
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        read_only: bool,
        new_passthrough: bool,
        register: impl FnOnce() -> std::io::Result<B>,
    ) -> Granted<B> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let st = inner.inodes.entry(ino).or_insert_with(|| State {
            cached: 0,
            passthrough: 0,
            dio: 0,
            backing: None,
        });
        let mut backing_error = None;
        let granted = |mode, backing, first_dio| Granted {
            mode,
            backing,
            first_dio,
            backing_error: None,
        };
        let mut r = if st.passthrough > 0 && !read_only {
            st.passthrough += 1;
            st.dio += 1;
            granted(Mode::PassthroughDio, st.backing.clone(), st.dio == 1)
        } else if read_only && st.cached == 0 && (st.passthrough > 0 || new_passthrough) {
            let backing = match &st.backing {
                Some(b) => Ok(b.clone()),
                None => register().map(Arc::new),
            };
            match backing {
                Ok(b) => {
                    st.backing = Some(b.clone());
                    st.passthrough += 1;
                    granted(Mode::Passthrough, Some(b), false)
                }
                Err(e) => {
                    backing_error = Some(e);
                    st.cached += 1;
                    granted(Mode::Cached, None, false)
                }
            }
        } else {
            st.cached += 1;
            granted(Mode::Cached, None, false)
        };
        r.backing_error = backing_error;
        inner.opens.insert(fh, (ino, r.mode));
        r
    }

    /// Forgets open `fh` (at RELEASE); returns its mode if it was counted.
    /// The backing id is dropped with the inode's last passthrough open.
    pub fn release(&self, fh: u64) -> Option<Mode> {
        let mut dropped = None;
        let mode = {
            let mut g = self.inner.lock();
            let (ino, mode) = g.opens.remove(&fh)?;
            if let Some(st) = g.inodes.get_mut(&ino) {
                match mode {
                    Mode::Cached => st.cached = st.cached.saturating_sub(1),
                    Mode::Passthrough | Mode::PassthroughDio => {
                        st.passthrough = st.passthrough.saturating_sub(1);
                        if mode == Mode::PassthroughDio {
                            st.dio = st.dio.saturating_sub(1);
                        }
                        if st.passthrough == 0 {
                            dropped = st.backing.take();
                        }
                    }
                }
                if st.cached == 0 && st.passthrough == 0 {
                    g.inodes.remove(&ino);
                }
            }
            mode
        };
        // Closing the backing id (an ioctl) happens outside the lock.
        drop(dropped);
        Some(mode)
    }

    /// (cached, passthrough, direct-I/O passthrough) opens of `ino`.
    pub fn counts(&self, ino: u64) -> (u32, u32, u32) {
        self.inner
            .lock()
            .inodes
            .get(&ino)
            .map_or((0, 0, 0), |s| (s.cached, s.passthrough, s.dio))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A backing id that counts how many are alive.
    struct Id(&'static AtomicU32);
    impl Drop for Id {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn reg(alive: &'static AtomicU32) -> impl FnOnce() -> std::io::Result<Id> {
        move || {
            alive.fetch_add(1, Ordering::SeqCst);
            Ok(Id(alive))
        }
    }

    #[test]
    fn read_only_opens_share_one_backing_id_until_the_last_closes() {
        static ALIVE: AtomicU32 = AtomicU32::new(0);
        let m = IoModes::default();
        let a = m.open(7, 1, true, true, reg(&ALIVE));
        let b = m.open(7, 2, true, true, reg(&ALIVE));
        assert_eq!((a.mode, b.mode), (Mode::Passthrough, Mode::Passthrough));
        assert!(Arc::ptr_eq(
            a.backing.as_ref().unwrap(),
            b.backing.as_ref().unwrap()
        ));
        drop((a, b));
        assert_eq!(ALIVE.load(Ordering::SeqCst), 1);
        assert_eq!(m.release(1), Some(Mode::Passthrough));
        assert_eq!(
            ALIVE.load(Ordering::SeqCst),
            1,
            "still one passthrough open"
        );
        assert_eq!(m.release(2), Some(Mode::Passthrough));
        assert_eq!(ALIVE.load(Ordering::SeqCst), 0, "closed with the last");
        assert_eq!(m.release(2), None, "released once");
        assert_eq!(m.counts(7), (0, 0, 0));
    }

    #[test]
    fn modes_never_mix_on_an_inode() {
        static ALIVE: AtomicU32 = AtomicU32::new(0);
        let m = IoModes::default();
        // rw first: cached; a read-only open then stays cached.
        assert_eq!(m.open(1, 1, false, true, reg(&ALIVE)).mode, Mode::Cached);
        assert_eq!(m.open(1, 2, true, true, reg(&ALIVE)).mode, Mode::Cached);
        assert_eq!(m.counts(1), (2, 0, 0));
        m.release(1);
        m.release(2);
        // ro first: passthrough; a writable open is passthrough + direct I/O.
        assert_eq!(
            m.open(1, 3, true, true, reg(&ALIVE)).mode,
            Mode::Passthrough
        );
        let w = m.open(1, 4, false, true, reg(&ALIVE));
        assert_eq!(w.mode, Mode::PassthroughDio);
        assert!(w.first_dio);
        assert!(w.backing.is_some());
        let w2 = m.open(1, 5, false, true, reg(&ALIVE));
        assert!(!w2.first_dio);
        assert_eq!(m.counts(1), (0, 3, 2));
        // The reader closes first: the writers keep the inode in passthrough
        // mode, so another reader is passthrough too.
        m.release(3);
        assert_eq!(
            m.open(1, 6, true, true, reg(&ALIVE)).mode,
            Mode::Passthrough
        );
        for fh in [4, 5, 6] {
            m.release(fh);
        }
        drop((w, w2));
        assert_eq!(ALIVE.load(Ordering::SeqCst), 0);
        assert_eq!(m.counts(1), (0, 0, 0));
        assert_eq!(m.open(1, 7, false, true, reg(&ALIVE)).mode, Mode::Cached);
    }

    #[test]
    fn a_failed_registration_falls_back_to_cached() {
        let m: IoModes<()> = IoModes::default();
        let g = m.open(3, 1, true, true, || {
            Err(std::io::Error::from_raw_os_error(1))
        });
        assert_eq!(g.mode, Mode::Cached);
        assert!(g.backing_error.is_some());
        assert_eq!(m.counts(3), (1, 0, 0));
        // New passthrough opens off: read-only opens are cached.
        m.release(1);
        assert_eq!(m.open(3, 2, true, false, || Ok(())).mode, Mode::Cached);
    }

    #[test]
    fn an_inode_in_passthrough_mode_stays_there_when_new_passthrough_stops() {
        // A permanent refusal turns new passthrough off while an inode
        // already has passthrough opens: the kernel still wants every open
        // of it in passthrough mode (a cached one would fail with EIO).
        static ALIVE: AtomicU32 = AtomicU32::new(0);
        let m = IoModes::default();
        assert_eq!(
            m.open(9, 1, true, true, reg(&ALIVE)).mode,
            Mode::Passthrough
        );
        let r = m.open(9, 2, true, false, reg(&ALIVE));
        assert_eq!(r.mode, Mode::Passthrough);
        assert_eq!(
            m.open(9, 3, false, false, reg(&ALIVE)).mode,
            Mode::PassthroughDio
        );
        assert_eq!(ALIVE.load(Ordering::SeqCst), 1, "the same backing id");
        assert_eq!(m.counts(9), (0, 3, 1));
        drop(r);
        for fh in 1..=3 {
            m.release(fh);
        }
        // Once the inode left passthrough mode, new opens are cached.
        assert_eq!(m.open(9, 4, true, false, reg(&ALIVE)).mode, Mode::Cached);
    }
}
