//! The group-commit thread: fdatasync on demand or every `sync_interval`,
//! spare-segment preparation off the hot path, catalog bookkeeping, and
//! retirement of shipped segments.

use super::*;

/// Bytes of zeros written per turn of the spare lock (`zero_fill_spare`).
const ZERO_CHUNK: u64 = 1 << 20;

/// How long the commit thread sleeps when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(1);

impl Shared {
    /// Body of the `wal-commit` thread.
    pub(super) fn run(self: Arc<Self>) {
        let mut last_sync = Instant::now();
        loop {
            let (want_sync, stop) = self.wait_for_work(last_sync);
            if stop {
                break;
            }
            if want_sync {
                // A failure is recorded in the shared state and reported to waiters.
                let _ = self.sync_now();
                last_sync = Instant::now();
            }
        }
    }

    /// Body of the `wal-spare` thread: kept apart from the commit thread so
    /// a slow fdatasync never delays the next spare (nor the reverse).
    pub(super) fn run_spare(self: Arc<Self>) {
        let mut last_try: Option<Instant> = None;
        loop {
            {
                let mut st = self.spare_state.lock();
                if !st.kicked && !st.stop {
                    self.spare_wake.wait_for(&mut st, SPARE_RETRY);
                }
                if st.stop {
                    break;
                }
                st.kicked = false;
            }
            self.maintain(&mut last_try);
        }
    }

    /// Sleeps until a periodic sync is due. In `batch` mode the thread
    /// ticks every `sync_interval` while records come in (and for ten
    /// intervals after the last sync), then sleeps long until an append kicks it.
    fn wait_for_work(&self, last_sync: Instant) -> (bool, bool) {
        let batch = self.cfg.durability == Durability::Batch;
        let mut st = self.sync.lock();
        loop {
            if st.stop {
                return (false, true);
            }
            st.kicked = false;
            if std::mem::take(&mut st.sync_now) {
                return (true, false);
            }
            let ticking = batch && last_sync.elapsed() < 10 * self.cfg.sync_interval;
            if batch && !ticking {
                // Announce the long sleep before looking at the head: an append
                // that lands after the look sees the flag and kicks (`note_append`).
                self.sleeping.store(true, SeqCst);
            }
            let pending = self.head.load(SeqCst) > self.durable.load(Acquire);
            let tick = batch && (pending || ticking);
            if tick {
                self.sleeping.store(false, SeqCst);
            }
            let timeout = if tick {
                self.cfg.sync_interval
            } else {
                IDLE_WAIT
            };
            let timed_out = self.wake.wait_for(&mut st, timeout).timed_out();
            self.sleeping.store(false, SeqCst);
            if std::mem::take(&mut st.sync_now) {
                return (true, false);
            }
            if timed_out && batch && self.head.load(Acquire) > self.durable.load(Acquire) {
                return (true, false);
            }
        }
    }

    /// Called by `append` after publishing a new head: wakes an idle thread
    /// in `batch` mode so the first record after a quiet spell is synced on
    /// time, and a follower waiting for the next record. (One atomic load
    /// each when nobody sleeps.)
    pub(super) fn note_append(&self) {
        if self.sleeping.load(SeqCst) && self.sleeping.swap(false, SeqCst) {
            let mut st = self.sync.lock();
            st.kicked = true;
            self.wake.notify_one();
        }
        if self.follower_waiting.load(SeqCst) && self.follower_waiting.swap(false, SeqCst) {
            let _g = self.sync.lock();
            self.synced.notify_all();
        }
    }

    /// See [`Wal::wait_durable_beyond`]. The follower announces itself in
    /// `follower_waiting` under the `sync` lock before it looks at the head;
    /// an append stores the head before it looks at the flag and notifies
    /// under the same lock: one of the two sees the other, no wake-up is lost.
    pub(super) fn wait_durable_beyond(
        &self,
        lsn: Lsn,
        nudge: Duration,
        timeout: Duration,
    ) -> Result<Lsn, WalError> {
        let deadline = Instant::now() + timeout;
        let mut seen_pending: Option<Instant> = None;
        let mut st = self.sync.lock();
        loop {
            let durable = self.durable.load(Acquire);
            if durable > lsn {
                return Ok(durable);
            }
            self.usable_ignoring_close()?;
            let now = Instant::now();
            if now >= deadline || self.closed.load(Acquire) {
                return Ok(durable);
            }
            self.follower_waiting.store(true, SeqCst);
            let until = if self.head.load(SeqCst) > lsn {
                // Appended, not yet durable: the group commit (or we) will sync it.
                self.follower_waiting.store(false, SeqCst);
                let due = *seen_pending.get_or_insert(now) + nudge;
                if now >= due {
                    drop(st);
                    self.wait_durable(self.head.load(Acquire))?;
                    return Ok(self.durable.load(Acquire));
                }
                due.min(deadline)
            } else {
                deadline
            };
            self.synced.wait_until(&mut st, until);
        }
    }

    /// Makes every record appended so far durable.
    pub(super) fn sync_now(&self) -> Result<(), WalError> {
        let io = self.sync_io.lock();
        let r = self.sync_locked();
        drop(io);
        self.notify_synced();
        r
    }

    /// With `sync_io` held: fdatasync the segments rolled away from first,
    /// then the directory (renames), then the current segment; only then
    /// does `durable_lsn` move.
    fn sync_locked(&self) -> Result<(), WalError> {
        self.usable_ignoring_close()?;
        let (unsynced, cur, head, dir_dirty) = {
            let mut log = self.log.lock();
            let taken = std::mem::take(&mut log.unsynced);
            (
                taken,
                log.seg.clone(),
                log.next_lsn - 1,
                std::mem::take(&mut log.dir_dirty),
            )
        };
        if let Err(e) = self.sync_files(&unsynced, &cur, dir_dirty, head) {
            self.fail(&e);
            return Err(e);
        }
        if self.durable.fetch_max(head, AcqRel) < head {
            self.notify_durable();
        }
        Ok(())
    }

    /// Puts a token in every follower's channel that has none waiting
    /// (`Wal::durable_notifier`); forgets followers that went away.
    fn notify_durable(&self) {
        use crossbeam_channel::TrySendError;
        let mut subs = self.durable_subs.lock();
        subs.retain(|tx| !matches!(tx.try_send(()), Err(TrySendError::Disconnected(()))));
    }

    fn notify_synced(&self) {
        let _g = self.sync.lock();
        self.synced.notify_all();
    }

    fn sync_files(
        &self,
        unsynced: &[Arc<Active>],
        cur: &Active,
        dir_dirty: bool,
        head: Lsn,
    ) -> Result<(), WalError> {
        for seg in unsynced {
            seg.file
                .sync_data()
                .map_err(io_err("fdatasync", &seg.path))?;
            self.fsyncs.fetch_add(1, Relaxed);
        }
        if dir_dirty {
            segment::fsync_dir(&self.dir)?;
        }
        if head > self.durable.load(Acquire) {
            cur.file
                .sync_data()
                .map_err(io_err("fdatasync", &cur.path))?;
            self.fsyncs.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Waits until `lsn` (capped at the head) is durable. Group commit with a
    /// leader: the first waiter to find no sync in progress runs it in its own
    /// thread (no hand-off latency); waiters arriving meanwhile are served by
    /// the next one, so one fdatasync covers everything appended before it.
    pub(super) fn wait_durable(&self, lsn: Lsn) -> Result<(), WalError> {
        let lsn = lsn.min(self.head.load(Acquire));
        loop {
            if self.durable.load(Acquire) >= lsn {
                return Ok(());
            }
            self.usable_ignoring_close()?;
            if let Some(io) = self.sync_io.try_lock() {
                let r = self.sync_locked();
                drop(io);
                self.notify_synced();
                r?;
                continue;
            }
            let mut st = self.sync.lock();
            // The running sync notifies under `sync` after releasing `sync_io`,
            // so checking here, with `sync` held, cannot miss its wake-up.
            if self.durable.load(Acquire) < lsn
                && self.sync_io.is_locked()
                && self.failed.load(Acquire) == 0
            {
                self.synced.wait(&mut st);
            }
        }
    }

    /// Writes queued catalog rows and keeps a spare segment ready (retrying
    /// at most once per second while the disk is full).
    /// Also forgets dirty paths the shipper repaired and resumes paused
    /// logging (`resync` policy) once there is room again.
    fn maintain(&self, last_try: &mut Option<Instant>) {
        self.prefetch_active();
        self.flush_rows();
        self.prune_dirty();
        self.maintain_spare(last_try);
        self.update_pause();
    }

    fn maintain_spare(&self, last_try: &mut Option<Instant>) {
        let mut slot = self.spare.lock();
        if slot.is_some() {
            return;
        }
        if !self.room_for_spare() {
            // No I/O to retry: try as soon as a retirement frees space.
            *last_try = None;
            drop(slot);
            return self.note_full(&self.limit_reason());
        }
        let due = !self.full.load(Acquire) || last_try.is_none_or(|t| t.elapsed() >= SPARE_RETRY);
        if !due {
            return;
        }
        *last_try = Some(Instant::now());
        match self.make_spare() {
            Ok(f) => {
                *slot = Some(f);
                drop(slot);
                if let Err(e) = segment::fsync_dir(&self.dir) {
                    log::warn!("{e}");
                }
                self.note_room();
                if self.zero_spare.load(Relaxed) {
                    self.zero_fill_spare();
                }
            }
            Err(e) => self.note_full(&format!("cannot prepare the next segment: {e}")),
        }
    }

    /// Writes the preallocated spare out as zeros (`wal.zero_fill`), 1 MiB at
    /// a time under the spare lock: a roll that takes the spare meanwhile
    /// waits for one chunk at most, and no zeros land after it took it. Then
    /// flushes, unlocked (harmless if a roll took it meanwhile). On an error
    /// the spare just stays preallocated: its bytes are zeros either way.
    fn zero_fill_spare(&self) {
        let size = self.cfg.segment_size;
        let mut off = 0;
        while off < size {
            if self.spare_state.lock().stop {
                return;
            }
            let slot = self.spare.lock();
            let Some(f) = slot.as_ref() else {
                return;
            };
            let end = (off + ZERO_CHUNK).min(size);
            if let Err(e) = segment::write_zeros(f, off, end) {
                log::warn!("cannot zero-fill the spare WAL segment ({e}); it stays preallocated");
                return;
            }
            if end == size {
                self.spare_zeroed.store(true, Relaxed);
            }
            drop(slot);
            off = end;
        }
        let f = match self.spare.lock().as_ref().map(File::try_clone) {
            Some(Ok(f)) => f,
            _ => return,
        };
        if let Err(e) = f.sync_data() {
            log::warn!("cannot flush the zero-filled spare WAL segment: {e}");
        }
    }

    /// After a roll into a zero-filled segment: asks the kernel to read it
    /// into the page cache now, in the background, in large requests. A
    /// record that starts a page of written extents not in the cache would
    /// otherwise wait for that page's read (preallocated extents read as
    /// zeros without I/O, so they need none of this).
    fn prefetch_active(&self) {
        let seg = self.log.lock().seg.clone();
        if !seg.zeroed || seg.prefetched.swap(true, Relaxed) {
            return;
        }
        let len = libc::off_t::try_from(seg.capacity).unwrap_or(libc::off_t::MAX);
        // SAFETY: plain syscall on a file descriptor we own.
        let r =
            unsafe { libc::posix_fadvise(seg.file.as_raw_fd(), 0, len, libc::POSIX_FADV_WILLNEED) };
        if r != 0 {
            log::debug!(
                "posix_fadvise(WILLNEED) on {}: errno {r}",
                seg.path.display()
            );
        }
    }

    fn flush_rows(&self) {
        let rows = std::mem::take(&mut self.log.lock().rows);
        if rows.is_empty() {
            return;
        }
        let cat = self.catalog.lock();
        for row in rows {
            if let Err(e) = cat.put_segment(&row) {
                log::warn!("cannot record WAL segment {}: {e}", row.file_name);
            }
        }
    }

    /// Deletes closed segments whose last record is `<= upto` and
    /// `<= checkpoint` (kept for `wal.retain` unless the WAL is full); wakes
    /// the spare thread when space was freed. Also says whether the
    /// checkpoint alone kept one.
    pub(super) fn retire(
        &self,
        upto: Lsn,
        checkpoint: Lsn,
    ) -> Result<(Vec<PathBuf>, bool), WalError> {
        let _one_at_a_time = self.retiring.lock();
        self.flush_rows();
        let list = segment::list_segments(&self.dir)?;
        let current = self.log.lock().seg.header.first_lsn;
        let retain = self.retention_allowed();
        let mut gone = Vec::new();
        let mut held = false;
        for pair in list.windows(2) {
            let ((first, path), (next_first, _)) = (&pair[0], &pair[1]);
            if *first >= current || next_first - 1 > upto || (retain && self.within_retention(path))
            {
                break;
            }
            if next_first - 1 > checkpoint {
                held = true;
                break;
            }
            let len = std::fs::metadata(path).map_or(0, |m| m.len());
            std::fs::remove_file(path).map_err(io_err("remove", path))?;
            self.note_removed(len);
            gone.push((*first, path.clone()));
        }
        if gone.is_empty() {
            return Ok((Vec::new(), held));
        }
        self.kick_spare();
        segment::fsync_dir(&self.dir)?;
        let cat = self.catalog.lock();
        for (first, _) in &gone {
            cat.remove_segment(*first)?;
        }
        Ok((gone.into_iter().map(|g| g.1).collect(), held))
    }

    /// A segment last written less than `retain` ago is kept (point-in-time
    /// replay reaches back that far). An unreadable mtime keeps it too.
    fn within_retention(&self, path: &Path) -> bool {
        if self.cfg.retain.is_zero() {
            return false;
        }
        let age = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        age.is_none_or(|a| a < self.cfg.retain)
    }

    /// Asks the threads to stop and joins them (no final sync: `close` does that).
    pub(super) fn stop_threads(&self, threads: &Mutex<Vec<JoinHandle<()>>>) {
        {
            let mut st = self.sync.lock();
            st.stop = true;
            self.wake.notify_one();
        }
        {
            let mut st = self.spare_state.lock();
            st.stop = true;
            self.spare_wake.notify_one();
        }
        for h in std::mem::take(&mut *threads.lock()) {
            let _ = h.join();
        }
    }
}
