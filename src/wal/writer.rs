//! The WAL writer: admission, LSN assignment with one vectored `pwrite` per
//! record, segment roll onto a preallocated spare, and group commit (one
//! `fdatasync` serves every waiter; a background thread syncs in `batch` mode).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering::*};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::codec::{self, CodecError, FRAME_HEADER_LEN, MAX_FRAME_LEN, PreparedBody};
use super::record::{Lsn, Op};
use super::recovery;
use super::segment::{self, HEADER_LEN, SegmentHeader, io_err};
use crate::catalog::{Catalog, CatalogError, SegmentRow};
use crate::config::{Durability, OnWalFull, WalConfig, ZeroFill};

/// Name of the lock file in the state dir (flock'ed by the one writer).
pub const LOCK_FILE: &str = "lock";
/// How often a failed spare preparation is retried.
const SPARE_RETRY: Duration = Duration::from_secs(1);

/// Everything the WAL can fail with; [`WalError::errno`] maps it for FUSE.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("the WAL is full: wal.max_size reached or no disk space for its next segment")]
    Full,
    #[error("{op} {}: {err}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("corrupt WAL segment {} at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "WAL LSN gap: {} ends at LSN {prev_last} but the next segment {} starts at LSN {next_first}",
        prev.display(),
        next.display()
    )]
    Gap {
        prev: PathBuf,
        prev_last: Lsn,
        next: PathBuf,
        next_first: Lsn,
    },
    #[error("WAL segment {} is listed in the catalog but missing: {detail}", path.display())]
    MissingSegment { path: PathBuf, detail: String },
    #[error("LSN {lsn} is no longer in the WAL (oldest retained: {oldest})")]
    NotRetained { lsn: Lsn, oldest: Lsn },
    #[error("state dir {} is in use by another replfs process", .0.display())]
    Locked(PathBuf),
    #[error("invalid WAL record: {0}")]
    Record(#[from] CodecError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("invalid WAL configuration: {0}")]
    Config(String),
    #[error("the WAL is closed")]
    Closed,
    #[error("the WAL stopped after an I/O error: {msg} (restart to recover)")]
    Failed { errno: i32, msg: String },
}

impl WalError {
    /// The errno a file-system call reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            WalError::Full => libc::ENOSPC,
            WalError::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
            WalError::Failed { errno, .. } => *errno,
            WalError::Locked(_) => libc::EBUSY,
            WalError::Record(CodecError::TooLong { what: "path", .. }) => libc::ENAMETOOLONG,
            WalError::Record(_) | WalError::Config(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

/// What [`Wal::open`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Last LSN in the log (0 if none); the next append gets `head_lsn + 1`.
    pub head_lsn: Lsn,
    /// Oldest LSN still in the log.
    pub first_lsn: Lsn,
    pub segments: usize,
    /// (segment, offset, bytes cut) when a torn tail was zeroed.
    pub truncated_tail: Option<(PathBuf, u64, u64)>,
    /// The previous writer did not close the WAL (crash or kill).
    pub unclean_shutdown: bool,
    /// Empty segments whose creation never completed, deleted.
    pub removed_segments: Vec<PathBuf>,
    /// Catalog entries repaired to match the disk (also logged as warnings).
    pub catalog_repairs: Vec<String>,
}

/// The segment being appended to.
struct Active {
    file: File,
    path: PathBuf,
    header: SegmentHeader,
    seed: u32,
    capacity: u64,
    /// Written out as zeros (`wal.zero_fill`): its pages must be in the page
    /// cache before records land in them, or a record's first bytes in a page
    /// cost a read of that page (`prefetch_active`).
    zeroed: bool,
    prefetched: AtomicBool,
}

/// State guarded by the append lock.
struct Log {
    seg: Arc<Active>,
    off: u64,
    next_lsn: Lsn,
    /// Segments rolled away from but not yet fdatasynced.
    unsynced: Vec<Arc<Active>>,
    /// A segment was renamed into place since the last directory fsync.
    dir_dirty: bool,
    /// Catalog rows to write off the hot path.
    rows: Vec<SegmentRow>,
    /// When the current segment was started (or the WAL opened).
    rolled_at: Instant,
}

#[derive(Default)]
struct SyncState {
    /// Wake the commit thread to re-plan (a batch-mode append after a quiet spell).
    kicked: bool,
    /// Wake the commit thread to sync now (`Wal::sync_soon`).
    sync_now: bool,
    stop: bool,
}

#[derive(Default)]
struct SpareState {
    /// A spare is wanted, or catalog rows are queued.
    kicked: bool,
    stop: bool,
}

struct Shared {
    cfg: WalConfig,
    dir: PathBuf,
    log: Mutex<Log>,
    /// The preallocated segment in reserve; created under this lock.
    spare: Mutex<Option<File>>,
    head: AtomicU64,
    durable: AtomicU64,
    /// Guards the commit thread's state; `wake` wakes the thread, `synced`
    /// wakes `sync` callers when a sync finished (or the WAL failed).
    sync: Mutex<SyncState>,
    wake: Condvar,
    synced: Condvar,
    spare_state: Mutex<SpareState>,
    spare_wake: Condvar,
    full: AtomicBool,
    /// Disk use, the WAL-full policies and the paths awaiting resync.
    space: space::Space,
    closed: AtomicBool,
    failed: AtomicI32,
    failure: Mutex<String>,
    catalog: Mutex<Catalog>,
    fail_spare: AtomicBool,
    fsyncs: AtomicU64,
    /// The spare thread writes the next spare out as zeros (see
    /// [`WalConfig::zero_fill`]); decided at each roll from how long the
    /// segment took to fill.
    zero_spare: AtomicBool,
    /// The spare in the slot has been zero-filled all through.
    spare_zeroed: AtomicBool,
    /// CRC seed of the current segment, read without the lock by `append`.
    seed: AtomicU32,
    /// The thread sleeps without a sync deadline (batch mode); see `note_append`.
    sleeping: AtomicBool,
    /// A follower waits in `wait_durable_beyond` for the next append.
    follower_waiting: AtomicBool,
    /// Followers told (one token at most waiting each) whenever `durable`
    /// advances: see [`Wal::durable_notifier`].
    durable_subs: Mutex<Vec<crossbeam_channel::Sender<()>>>,
    /// The BACKING checkpoint (see [`Wal::set_backing_checkpoint`]); no
    /// segment holding a record past it is retired. `Lsn::MAX` when none was
    /// ever recorded (a state dir from before checkpoints).
    backing_checkpoint: AtomicU64,
    /// Told when retirement waits for the BACKING checkpoint.
    checkpoint_kick: Mutex<Option<crossbeam_channel::Sender<()>>>,
    /// The last acknowledged LSN given to [`Wal::retire`]: a new checkpoint
    /// retires what it held back without waiting for the next ack.
    last_acked: AtomicU64,
    /// Serialises retirement (the shipper after acks, a new checkpoint).
    retiring: Mutex<()>,
    /// Held while syncing: serialises syncs so durable_lsn never passes an
    /// unsynced segment; whoever holds it is the group-commit leader.
    sync_io: Mutex<()>,
    _lock: File,
}

struct Inner {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn spawn(&self, name: &str, body: fn(Arc<Shared>)) -> Result<(), WalError> {
        let s = self.shared.clone();
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(s))
            .map_err(io_err("spawn thread", &self.shared.dir))?;
        self.threads.lock().push(h);
        Ok(())
    }
}

impl Drop for Inner {
    /// Stops the threads without a final sync or the clean-shutdown mark
    /// (what a crash leaves, minus the lost page cache).
    fn drop(&mut self) {
        self.shared.stop_threads(&self.threads);
    }
}

/// The write-ahead log of one state dir. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

impl Wal {
    /// Locks the state dir, recovers the log (cuts a torn tail, fails on
    /// corruption naming segment and offset) and starts the background
    /// threads (`wal-commit`: group commit; `wal-spare`: spare segments).
    pub fn open(state_dir: &Path, cfg: &WalConfig) -> Result<(Wal, RecoveryReport), WalError> {
        if cfg.segment_size < HEADER_LEN + 2 * MAX_FRAME_LEN as u64 {
            let msg = format!(
                "wal.segment_size {} is too small for the largest record",
                cfg.segment_size
            );
            return Err(WalError::Config(msg));
        }
        let dir = segment::wal_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let lock = open::lock_state(state_dir)?;
        let catalog = Catalog::open(state_dir)?;
        let (log, report) = open::recover_log(&dir, cfg, &catalog)?;
        let checkpoint = catalog
            .get(crate::catalog::KEY_BACKING_CHECKPOINT)?
            .and_then(|v| v.parse::<Lsn>().ok());
        let shared = Arc::new(Shared::new(cfg, dir, log, catalog, lock));
        if let Some(c) = checkpoint {
            shared.backing_checkpoint.store(c, Release);
        }
        shared.init_space()?;
        let inner = Inner {
            shared,
            threads: Mutex::new(Vec::new()),
        };
        inner.spawn("wal-commit", Shared::run)?;
        inner.spawn("wal-spare", Shared::run_spare)?;
        Ok((
            Wal {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// Called before a change, with no file-system lock held. When the WAL
    /// is full: `fail` returns `Err(Full)` so the change is refused before
    /// it happens; `block` waits for room (or until the WAL is closed or
    /// [`Wal::stop_blocking`]); `resync` admits (see [`Wal::record`]).
    pub fn admit(&self) -> Result<(), WalError> {
        let s = &self.inner.shared;
        s.usable()?;
        if !s.full.load(Acquire) {
            return Ok(());
        }
        match s.cfg.on_wal_full {
            OnWalFull::Fail => {
                s.kick_spare();
                Err(WalError::Full)
            }
            OnWalFull::Block => s.wait_room(),
            OnWalFull::Resync => Ok(()),
        }
    }

    /// Logs a change that already happened; returns its LSN once the record
    /// is in the page cache (one `pwritev`).
    pub fn append(&self, op: &Op<'_>) -> Result<Lsn, WalError> {
        let s = &self.inner.shared;
        s.usable()?;
        // 0 = never: compression then happens off the write path, in the shipper.
        let min = match s.cfg.compress_min {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let body = PreparedBody::new(op, min, s.seed.load(Relaxed))?;
        let frame_len = (FRAME_HEADER_LEN + body.stored_len()) as u64;
        let mut log = s.log.lock();
        if s.closed.load(Acquire) {
            return Err(WalError::Closed);
        }
        if log.off + frame_len > log.seg.capacity {
            s.roll(&mut log)?;
        }
        let lsn = log.next_lsn;
        let hdr = body.header(log.seg.seed, lsn, segment::now_ns());
        let [a, b] = body.parts();
        write_frame(&log.seg.file, log.off, [&hdr, a, b])
            .map_err(io_err("write", &log.seg.path))?;
        log.off += frame_len;
        log.next_lsn = lsn + 1;
        s.head.store(lsn, SeqCst);
        drop(log);
        s.note_append();
        Ok(lsn)
    }

    /// After the caller released its locks: in `always` mode waits until
    /// `lsn` is durable, otherwise returns at once.
    pub fn commit(&self, lsn: Lsn) -> Result<(), WalError> {
        match self.inner.shared.cfg.durability {
            Durability::Always => self.sync(lsn),
            Durability::Batch | Durability::Os => Ok(()),
        }
    }

    /// Waits until every record up to `lsn` (capped at the head) is durable.
    pub fn sync(&self, lsn: Lsn) -> Result<(), WalError> {
        self.inner.shared.wait_durable(lsn)
    }

    /// Starts making `lsn` durable on the commit thread and returns at once,
    /// so the caller's own flush (the backing file's fdatasync) runs
    /// alongside the WAL's; [`Wal::sync`] then waits for it (or finds it done).
    pub fn sync_soon(&self, lsn: Lsn) {
        let s = &self.inner.shared;
        if s.durable.load(Acquire) >= lsn.min(s.head.load(Acquire)) {
            return;
        }
        let mut st = s.sync.lock();
        st.sync_now = true;
        s.wake.notify_one();
    }

    /// For a follower of the log (the shipper): waits until a record after
    /// `lsn` is durable and returns the durable LSN, or returns it as it is
    /// after `timeout` (also at once when the WAL is closed). No polling: the
    /// wait is woken by the group commit when a sync completes and by the
    /// first append after the wait began. A record appended after `lsn` that
    /// is still not durable `nudge` after the wait saw it is synced by the
    /// caller itself (group commit, one fdatasync for everything appended),
    /// so a follower sees a record at most about `nudge` + one fdatasync
    /// after its append, whatever `wal.durability` says.
    pub fn wait_durable_beyond(
        &self,
        lsn: Lsn,
        nudge: Duration,
        timeout: Duration,
    ) -> Result<Lsn, WalError> {
        self.inner.shared.wait_durable_beyond(lsn, nudge, timeout)
    }

    /// A channel that holds a token whenever [`Wal::durable_lsn`] advanced
    /// since the receiver last took one (at most one token waits: a burst of
    /// syncs is one wake-up). For a follower that waits on something else
    /// too (the shipper waits for the mirror's acks with `select!`); it
    /// should re-read `durable_lsn` after each token, and read it once after
    /// subscribing. Nothing syncs on its behalf: see
    /// [`Wal::wait_durable_beyond`] for that. Dropping the receiver
    /// unsubscribes (the sender is dropped at the next advance).
    pub fn durable_notifier(&self) -> crossbeam_channel::Receiver<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.inner.shared.durable_subs.lock().push(tx);
        rx
    }

    /// LSN of the last appended record (0 if none).
    pub fn head_lsn(&self) -> Lsn {
        self.inner.shared.head.load(Acquire)
    }

    /// The segment being written, with the bytes used in it so far.
    pub fn current_segment(&self) -> crate::catalog::SegmentRow {
        self.inner.shared.current_row()
    }

    /// Every record up to this LSN is on stable storage.
    pub fn durable_lsn(&self) -> Lsn {
        self.inner.shared.durable.load(Acquire)
    }

    /// Number of `fdatasync` calls made on segments so far (benchmarks, stats).
    pub fn fsync_count(&self) -> u64 {
        self.inner.shared.fsyncs.load(Relaxed)
    }

    /// Records in the catalog that `path` needs a resync (a change that
    /// could not be logged); later changes naming it are marked too, not
    /// logged, until the shipper cleared the row (see [`Wal::record`]).
    pub fn mark_resync(&self, path: &[u8], reason: &str) -> Result<(), WalError> {
        self.inner.shared.mark_paths(&[path], reason)
    }

    /// Deletes closed segments whose records are all `<= acked`, durable and
    /// within the BACKING checkpoint (the shipper calls this once the mirror
    /// acknowledged them). A segment kept only by the checkpoint asks for one
    /// (see [`Wal::checkpoint_requests`]).
    pub fn retire(&self, acked: Lsn) -> Result<Vec<PathBuf>, WalError> {
        let s = &self.inner.shared;
        s.last_acked.fetch_max(acked, AcqRel);
        let (gone, held) = s.retire(
            acked.min(self.durable_lsn()),
            s.backing_checkpoint.load(Acquire),
        )?;
        if held && let Some(tx) = s.checkpoint_kick.lock().as_ref() {
            let _ = tx.try_send(());
        }
        Ok(gone)
    }

    /// The BACKING checkpoint recorded in the catalog, if any.
    pub fn backing_checkpoint(&self) -> Option<Lsn> {
        let c = self.inner.shared.backing_checkpoint.load(Acquire);
        (c != Lsn::MAX).then_some(c)
    }

    /// Records that every change logged at or below `lsn` is durable in
    /// BACKING (the caller made it so, e.g. with `syncfs`), in the catalog
    /// first; then retires the acknowledged segments it held back.
    pub fn set_backing_checkpoint(&self, lsn: Lsn) -> Result<(), WalError> {
        let s = &self.inner.shared;
        let lsn = lsn.min(s.head.load(Acquire));
        s.catalog
            .lock()
            .set(crate::catalog::KEY_BACKING_CHECKPOINT, &lsn.to_string())?;
        let c = &s.backing_checkpoint;
        let _ = c.fetch_update(AcqRel, Acquire, |old| {
            (old == Lsn::MAX || old < lsn).then_some(lsn)
        });
        let acked = s.last_acked.load(Acquire);
        if acked > 0 && !s.closed.load(Acquire) {
            self.retire(acked)?;
        }
        Ok(())
    }

    /// A channel that gets a token whenever a segment the mirror has
    /// acknowledged is kept only because it lies past the BACKING checkpoint
    /// (the mount then checkpoints early). Replaces any earlier one.
    pub fn checkpoint_requests(&self) -> crossbeam_channel::Receiver<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        *self.inner.shared.checkpoint_kick.lock() = Some(tx);
        rx
    }

    /// Syncs everything, stops the threads, marks a clean shutdown. Idempotent.
    pub fn close(&self) -> Result<(), WalError> {
        let s = &self.inner.shared;
        let was_closed = {
            // Under the append lock: no append slips in after the final sync.
            let _log = s.log.lock();
            s.closed.swap(true, AcqRel)
        };
        s.wake_blocked();
        if was_closed {
            return s.usable_ignoring_close();
        }
        let synced = s.sync_now();
        s.stop_threads(&self.inner.threads);
        synced?;
        let cat = s.catalog.lock();
        for row in std::mem::take(&mut s.log.lock().rows) {
            cat.put_segment(&row)?;
        }
        cat.put_segment(&s.current_row())?;
        cat.set_clean_shutdown(true)?;
        Ok(())
    }

    /// Test and fault-injection seam: while set, preparing a spare segment
    /// fails as if the disk were full.
    #[doc(hidden)]
    pub fn inject_spare_failure(&self, fail: bool) {
        self.inner.shared.fail_spare.store(fail, Release);
        self.inner.shared.kick_spare();
    }
}

fn row_of(seg: &Active, last_lsn: Option<Lsn>, bytes: u64) -> SegmentRow {
    SegmentRow {
        first_lsn: seg.header.first_lsn,
        file_name: segment::segment_file_name(seg.header.first_lsn),
        created_ns: seg.header.created_ns,
        last_lsn,
        bytes,
    }
}

/// One vectored positional write of a whole frame (finishing short writes).
fn write_frame(file: &File, off: u64, parts: [&[u8]; 3]) -> io::Result<()> {
    let iov = [
        IoSlice::new(parts[0]),
        IoSlice::new(parts[1]),
        IoSlice::new(parts[2]),
    ];
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let start =
        libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let done = loop {
        match nix::sys::uio::pwritev(file, &iov, start) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    };
    if done == total {
        return Ok(());
    }
    // A short write (rare): finish each part with plain pwrites.
    let mut pos = 0;
    for p in parts {
        let skip = done.saturating_sub(pos).min(p.len());
        if skip < p.len() {
            file.write_all_at(&p[skip..], off + (pos + skip) as u64)?;
        }
        pos += p.len();
    }
    Ok(())
}

impl Shared {
    fn new(cfg: &WalConfig, dir: PathBuf, log: Log, catalog: Catalog, lock: File) -> Shared {
        let (head, seed) = (log.next_lsn - 1, log.seg.seed);
        Shared {
            cfg: cfg.clone(),
            dir,
            log: Mutex::new(log),
            spare: Mutex::new(None),
            head: AtomicU64::new(head),
            durable: AtomicU64::new(head),
            sync: Mutex::new(SyncState::default()),
            wake: Condvar::new(),
            synced: Condvar::new(),
            spare_state: Mutex::new(SpareState {
                kicked: true,
                stop: false,
            }),
            spare_wake: Condvar::new(),
            full: AtomicBool::new(false),
            space: space::Space::default(),
            closed: AtomicBool::new(false),
            failed: AtomicI32::new(0),
            failure: Mutex::new(String::new()),
            catalog: Mutex::new(catalog),
            fail_spare: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            zero_spare: AtomicBool::new(cfg.zero_fill != ZeroFill::Never),
            spare_zeroed: AtomicBool::new(false),
            seed: AtomicU32::new(seed),
            sleeping: AtomicBool::new(false),
            follower_waiting: AtomicBool::new(false),
            durable_subs: Mutex::new(Vec::new()),
            backing_checkpoint: AtomicU64::new(Lsn::MAX),
            checkpoint_kick: Mutex::new(None),
            last_acked: AtomicU64::new(0),
            retiring: Mutex::new(()),
            sync_io: Mutex::new(()),
            _lock: lock,
        }
    }

    fn usable(&self) -> Result<(), WalError> {
        if self.closed.load(Acquire) {
            return Err(WalError::Closed);
        }
        self.usable_ignoring_close()
    }

    fn usable_ignoring_close(&self) -> Result<(), WalError> {
        match self.failed.load(Acquire) {
            0 => Ok(()),
            errno => Err(WalError::Failed {
                errno,
                msg: self.failure.lock().clone(),
            }),
        }
    }

    /// Enters the failed state (after a failed fdatasync nothing is trusted).
    fn fail(&self, e: &WalError) {
        log::error!("WAL failed: {e}");
        *self.failure.lock() = e.to_string();
        self.failed.store(e.errno().max(1), Release);
        {
            let _g = self.sync.lock();
            self.synced.notify_all();
        }
        self.wake_blocked();
    }

    /// Wakes the spare thread (a spare is wanted or rows are queued).
    fn kick_spare(&self) {
        let mut st = self.spare_state.lock();
        st.kicked = true;
        self.spare_wake.notify_one();
    }

    /// Switches to the spare segment (creating one now if none is ready).
    fn roll(&self, log: &mut Log) -> Result<(), WalError> {
        let mut slot = self.spare.lock();
        let zeroed = self.spare_zeroed.swap(false, Relaxed);
        let spare = match slot.take() {
            Some(f) => f,
            None => self
                .make_spare()
                .inspect_err(|e| self.note_full(&format!("cannot prepare the next segment: {e}")))
                .map_err(|_| WalError::Full)?,
        };
        let header = SegmentHeader::new(log.next_lsn);
        let path = match segment::activate_spare(&spare, &self.dir, &header) {
            Ok(p) => p,
            Err(e) => {
                *slot = Some(spare);
                self.spare_zeroed.store(zeroed, Relaxed);
                return Err(e);
            }
        };
        drop(slot);
        // Disk use cannot pass the limit: no spare now means full now, while
        // the new segment still has room for every change already admitted.
        if !self.room_for_spare() {
            self.note_full(&self.limit_reason());
        }
        let seed = codec::crc_seed(header.salt);
        let new = Arc::new(Active {
            file: spare,
            path,
            header,
            seed,
            capacity: self.cfg.segment_size,
            zeroed,
            prefetched: AtomicBool::new(false),
        });
        self.seed.store(seed, Relaxed);
        let old = std::mem::replace(&mut log.seg, new);
        log.rows.push(row_of(&old, Some(log.next_lsn - 1), log.off));
        log.rows.push(row_of(&log.seg, None, HEADER_LEN));
        log.unsynced.push(old);
        log.off = HEADER_LEN;
        log.dir_dirty = true;
        let filled = std::mem::replace(&mut log.rolled_at, Instant::now()).elapsed();
        self.zero_spare
            .store(self.cfg.zero_fill_after(filled), Relaxed);
        self.kick_spare();
        Ok(())
    }

    /// Creates the spare segment, preallocated, within `wal.max_size` (else
    /// `Full`). The spare thread may then zero-fill it (`zero_fill_spare`).
    fn make_spare(&self) -> Result<File, WalError> {
        if !self.room_for_spare() {
            return Err(WalError::Full);
        }
        if self.fail_spare.load(Acquire) {
            let path = self.dir.join(segment::SPARE_NAME);
            return Err(io_err("preallocate", &path)(io::Error::from_raw_os_error(
                libc::ENOSPC,
            )));
        }
        let f = segment::create_spare(&self.dir, self.cfg.segment_size, false)?;
        self.note_created(self.cfg.segment_size);
        Ok(f)
    }

    fn current_row(&self) -> SegmentRow {
        let log = self.log.lock();
        row_of(&log.seg, None, log.off)
    }
}

mod commit;
mod dirty;
mod open;
mod space;

pub use space::WalSpace;

#[cfg(test)]
mod tests;
