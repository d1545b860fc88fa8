//! The WAL's space: its size limit (`wal.max_size`) and what happens when it
//! is full (`wal.on_wal_full`). DESIGN.md invariant 2: every change that
//! succeeded through the mount is in the WAL or recorded as needing resync.
//!
//! # Disk use and "full"
//! Disk use counts every segment file and the preallocated spare. A spare is
//! always prepared ahead: the writer rolls onto it when the current segment
//! is full, so a change that passed [`Wal::admit`] can always append its
//! record. The WAL is *full* when no spare is ready and none can be made:
//! the disk refused one (ENOSPC...) or making it would take disk use past
//! `wal.max_size`. The limit is checked before a spare is created (and
//! right after a roll consumed one), so disk use never exceeds it: at the
//! limit the active segment still has room for the changes already admitted.
//! When the shipper's acknowledgements let [`Wal::retire`] delete segments,
//! the spare thread is woken, prepares a spare and the WAL stops being full.
//! ([`Wal::retire`] also ignores `wal.retain` while the WAL is full: keeping
//! old, acknowledged records for point-in-time replay is not worth refusing
//! or losing new ones.) [`Wal::space`] reports use, limit and state.
//!
//! # Policies when full
//! - **`fail`** (the default): [`Wal::admit`] returns [`WalError::Full`]
//!   (ENOSPC) before the change touches the backing directory, so the log
//!   never has a gap and nothing needs repair. It is the default because it
//!   is the only policy that neither stalls applications indefinitely (a
//!   mirror that is down for a day would hang every writer: `block`) nor
//!   lets the replica silently fall behind the log's guarantees until a
//!   repair pass runs (`resync`); the application sees the problem at once,
//!   like a full disk, and the operator sees it in the log and the status.
//! - **`block`**: [`Wal::admit`] waits (a condition variable woken when a
//!   spare is made, when the WAL is closed or fails, and when the daemon
//!   stops: [`Wal::stop_blocking`]) until the WAL has room. It is called
//!   before any file-system lock is taken (every caller in `fs::ops` calls it
//!   first), so a blocked writer holds nothing another change or the
//!   shipper needs. One warning is logged when writers start waiting, one
//!   line when they resume. A writer blocked in `write(2)` cannot be killed
//!   (the kernel waits for the FUSE answer); stopping the daemon (SIGTERM)
//!   releases it with ENOSPC so the unmount can proceed.
//! - **`resync`**: admission always succeeds. While the WAL is full, logging
//!   is *paused*: [`Wal::record`] does not append at all; it records every
//!   path the change names ([`Op::paths`]) in the catalog's `resync` table,
//!   once per path (an in-memory set dedupes, so a write storm costs one
//!   SQLite insert per path, not per write), and the application gets
//!   success. Logging resumes when the WAL is no longer full *and* the
//!   segments use at most half of `wal.max_size` (hysteresis, so a WAL
//!   hovering at the limit does not flap; without a limit, as soon as a
//!   spare can be made again).
//!
//! # Dirty paths after logging resumes
//! A path is *dirty* when it or an ancestor has a resync row that the
//! shipper has not cleared yet (the writer keeps the set in memory, loaded
//! from the catalog at open, and notices cleared rows once a second). A
//! replica may hold anything at a dirty path (it missed changes there), so
//! a record naming it might not apply (a rename of a file the mirror never
//! saw created, a link to it, an rmdir of a directory still holding files
//! the source removed unlogged). Rule: **a change whose paths are dirty, or
//! have a dirty ancestor or descendant, is not logged; its paths are marked
//! too** (e.g. `rename(dirty → other)` marks `other`; the repair of `other`
//! brings its whole subtree). So the log never holds a record that depends
//! on an unlogged change, and the WAL format is unchanged.
//!
//! The shipper repairs a row (path, subtree and parent metadata in line with
//! the source) after it caught up, then clears it. A change to a dirty path
//! while that repair runs is folded into the row being repaired, and the
//! repair may have read the path before the change: so an entry changed
//! again after its row was recorded is recorded once more when its row is
//! cleared (a second, usually cheap, repair pass); an entry not changed
//! again is dropped from the set and the path is logged normally from then
//! on. A path that keeps changing stays dirty and is repaired on each pass.
//! Past [`dirty::MAX_ENTRIES`] paths the whole tree (`""`) is marked instead.

use std::collections::HashSet;
use std::sync::atomic::AtomicUsize;

use super::dirty::{self, Dirty};
use super::*;

/// How long a blocked `admit` sleeps between looks (it is also woken).
const BLOCK_POLL: Duration = Duration::from_secs(1);

/// The WAL's disk use and state, for the status and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalSpace {
    /// Bytes of all segment files and the spare.
    pub used: u64,
    /// `wal.max_size` (0 = no limit but the disk).
    pub limit: u64,
    /// No spare segment is ready and none can be made.
    pub full: bool,
    /// `resync` policy: changes are marked, not logged.
    pub logging_paused: bool,
    /// Paths (or subtrees) waiting for a repair by the shipper.
    pub resync_pending: usize,
}

#[derive(Default)]
pub(super) struct Room {
    /// Writers are waiting (the warning was logged).
    waiting: bool,
    /// The daemon is stopping: `admit` no longer blocks.
    released: bool,
}

/// Space state shared by the writer's threads.
#[derive(Default)]
pub(super) struct Space {
    used: AtomicU64,
    paused: AtomicBool,
    room: Mutex<Room>,
    room_cv: Condvar,
    dirty: Mutex<Dirty>,
    dirty_len: AtomicUsize,
}

impl Shared {
    /// At open: counts the segment files and removes a stale spare (the
    /// spare thread makes a new one, within the limit), then loads the
    /// paths still waiting for a resync.
    pub(super) fn init_space(&self) -> Result<(), WalError> {
        let stale = self.dir.join(segment::SPARE_NAME);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(io_err("remove", &stale))?;
        }
        let mut used = 0;
        for (_, path) in segment::list_segments(&self.dir)? {
            used += std::fs::metadata(&path)
                .map_err(io_err("stat", &path))?
                .len();
        }
        self.space.used.store(used, Release);
        // Only unlogged changes: a row that merely asks for a repair (a
        // sync, verify, a changed exclude list) must not stop the logging.
        let rows = self.catalog.lock().unlogged_list()?;
        let mut d = self.space.dirty.lock();
        for (id, path) in rows {
            d.insert(path, id, false);
        }
        self.space.dirty_len.store(d.len(), Release);
        Ok(())
    }

    /// Whether one more segment fits under `wal.max_size`.
    pub(super) fn room_for_spare(&self) -> bool {
        let limit = self.cfg.max_size;
        limit == 0 || self.space.used.load(Acquire) + self.cfg.segment_size <= limit
    }

    /// Accounts for a spare segment just created / segment files deleted.
    pub(super) fn note_created(&self, bytes: u64) {
        self.space.used.fetch_add(bytes, AcqRel);
    }

    pub(super) fn note_removed(&self, bytes: u64) {
        let _ = self
            .space
            .used
            .fetch_update(AcqRel, Acquire, |u| Some(u.saturating_sub(bytes)));
    }

    /// The WAL became full (`why` says how); under `resync` logging pauses.
    pub(super) fn note_full(&self, why: &dyn std::fmt::Display) {
        if !self.full.swap(true, AcqRel) {
            let policy = format!("{:?}", self.cfg.on_wal_full).to_lowercase();
            log::warn!("the WAL is full: {why} (on_wal_full = {policy})");
        }
        if self.cfg.on_wal_full == OnWalFull::Resync && !self.space.paused.swap(true, AcqRel) {
            log::warn!(
                "WAL logging paused: changes go through unlogged and their paths are \
                 recorded for resync until the mirror catches up"
            );
        }
    }

    /// The limit's reason for being full, for messages.
    pub(super) fn limit_reason(&self) -> String {
        format!(
            "wal.max_size {} reached ({} bytes in use, {}-byte segments)",
            self.cfg.max_size,
            self.space.used.load(Acquire),
            self.cfg.segment_size
        )
    }

    /// A spare is ready again: the WAL is no longer full; wakes blocked writers.
    pub(super) fn note_room(&self) {
        let mut g = self.space.room.lock();
        if self.full.swap(false, AcqRel) {
            log::info!("the WAL has space for its next segment again");
        }
        if g.waiting {
            g.waiting = false;
            log::info!("writers blocked on the full WAL resume");
        }
        self.space.room_cv.notify_all();
    }

    /// Wakes blocked writers to look again (close, failure, stop).
    pub(super) fn wake_blocked(&self) {
        let _g = self.space.room.lock();
        self.space.room_cv.notify_all();
    }

    /// `block` policy: waits until the WAL has room, is closed or failed,
    /// or the daemon stops.
    pub(super) fn wait_room(&self) -> Result<(), WalError> {
        let mut g = self.space.room.lock();
        loop {
            self.usable()?;
            if g.released {
                return Err(WalError::Full);
            }
            if !self.full.load(Acquire) {
                return Ok(());
            }
            if !g.waiting {
                g.waiting = true;
                log::warn!(
                    "the WAL is full: writers wait until the mirror acknowledges records \
                     (on_wal_full = block)"
                );
            }
            self.kick_spare();
            self.space.room_cv.wait_for(&mut g, BLOCK_POLL);
        }
    }

    /// `resync` policy: resumes logging once the WAL has room and its
    /// segments use at most half the limit.
    pub(super) fn update_pause(&self) {
        if !self.space.paused.load(Acquire) || self.full.load(Acquire) {
            return;
        }
        let limit = self.cfg.max_size;
        if limit > 0 {
            let spare = if self.spare.lock().is_some() {
                self.cfg.segment_size
            } else {
                0
            };
            if self.space.used.load(Acquire).saturating_sub(spare) > limit / 2 {
                return;
            }
        }
        if self.space.paused.swap(false, AcqRel) {
            log::info!(
                "WAL logging resumed; {} path(s) await a resync by the shipper",
                self.space.dirty_len.load(Acquire)
            );
        }
    }

    /// Whether retention may keep acknowledged segments (not while full).
    pub(super) fn retention_allowed(&self) -> bool {
        !self.full.load(Acquire) && !self.space.paused.load(Acquire)
    }

    /// Records `paths` as needing a resync: one catalog row per path not
    /// already covered by a dirty path (itself or an ancestor).
    pub(super) fn mark_paths(&self, paths: &[&[u8]], reason: &str) -> Result<(), WalError> {
        let mut d = self.space.dirty.lock();
        let mut r = Ok(());
        for &p in paths {
            if d.touch_covering(p) {
                continue;
            }
            let p: &[u8] = if d.len() >= dirty::MAX_ENTRIES {
                log::warn!(
                    "more than {} paths await a resync: marking the whole tree",
                    dirty::MAX_ENTRIES
                );
                b""
            } else {
                p
            };
            let lsn = self.head.load(Acquire);
            match self.catalog.lock().add_unlogged(p, reason, lsn) {
                Ok(id) => d.insert(p.to_vec(), id, false),
                Err(e) => {
                    // Kept in memory (retried by `prune_dirty`): changes to
                    // it are still not logged.
                    d.insert(p.to_vec(), -1, true);
                    r = Err(e.into());
                }
            }
        }
        self.space.dirty_len.store(d.len(), Release);
        r
    }

    /// Whether a record naming `paths` must be marked instead of logged.
    fn must_mark(&self, paths: &[&[u8]]) -> Option<&'static str> {
        if self.space.paused.load(Acquire) {
            return Some("changed while the WAL was full");
        }
        if self.space.dirty_len.load(Acquire) == 0 {
            return None;
        }
        let d = self.space.dirty.lock();
        paths
            .iter()
            .any(|p| d.related(p))
            .then_some("changed while a resync of it was pending")
    }

    /// Forgets dirty paths whose rows the shipper cleared (re-recording
    /// those changed since). Runs on the spare thread, about once a second.
    pub(super) fn prune_dirty(&self) {
        if self.space.dirty_len.load(Acquire) == 0 {
            return;
        }
        let mut d = self.space.dirty.lock();
        let ids = match self.catalog.lock().resync_ids() {
            Ok(ids) => ids,
            Err(e) => {
                log::warn!("cannot read the resync list: {e}");
                return;
            }
        };
        let live: HashSet<i64> = ids.into_iter().collect();
        for p in d.prune(&live) {
            let lsn = self.head.load(Acquire);
            let r = self.catalog.lock().add_unlogged(
                &p,
                "changed again while its resync was pending",
                lsn,
            );
            match r {
                Ok(id) => d.insert(p, id, false),
                Err(e) => {
                    log::error!(
                        "cannot record {:?} for resync: {e}; retrying",
                        String::from_utf8_lossy(&p)
                    );
                    d.insert(p, -1, true);
                }
            }
        }
        self.space.dirty_len.store(d.len(), Release);
    }
}

impl Wal {
    /// Logs a change that already happened — or, when the WAL is full under
    /// the `resync` policy or the change names a dirty path, records its
    /// paths for resync instead: `Ok(None)` (see the module documentation).
    /// Called, like [`Wal::append`], while the caller holds the locks that
    /// order the change.
    pub fn record(&self, op: &Op<'_>) -> Result<Option<Lsn>, WalError> {
        let s = &self.inner.shared;
        s.usable()?;
        // The common case (logging, nothing dirty) does not build the path list.
        if s.space.paused.load(Acquire) || s.space.dirty_len.load(Acquire) > 0 {
            let paths = op.paths();
            if let Some(reason) = s.must_mark(&paths) {
                s.mark_paths(&paths, reason)?;
                return Ok(None);
            }
        }
        match self.append(op) {
            Err(WalError::Full) if s.cfg.on_wal_full == OnWalFull::Resync => {
                s.mark_paths(&op.paths(), "the WAL was full")?;
                Ok(None)
            }
            r => r.map(Some),
        }
    }

    /// Disk use, limit and state of the WAL.
    pub fn space(&self) -> WalSpace {
        let s = &self.inner.shared;
        WalSpace {
            used: s.space.used.load(Acquire),
            limit: s.cfg.max_size,
            full: s.full.load(Acquire),
            logging_paused: s.space.paused.load(Acquire),
            resync_pending: s.space.dirty_len.load(Acquire),
        }
    }

    /// The daemon is stopping: writers blocked on a full WAL (`block`)
    /// return ENOSPC now, and later ones are refused instead of waiting, so
    /// their files can be closed and the unmount can proceed.
    pub fn stop_blocking(&self) {
        let s = &self.inner.shared;
        s.space.room.lock().released = true;
        s.wake_blocked();
    }

    #[cfg(test)]
    pub(super) fn dirty_paths(&self) -> Vec<Vec<u8>> {
        self.inner.shared.space.dirty.lock().paths()
    }
}
