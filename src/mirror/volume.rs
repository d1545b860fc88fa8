//! One replicated volume on the mirror: its apply engine, its persisted
//! position, and which shipper currently owns it.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use log::{debug, info, warn};
use parking_lot::Mutex;

use super::state::{MirrorDb, Position, PositionFile};
use crate::apply::{Applier, ApplyError, display_path};
use crate::proto::{Batch, RecordRef};
use crate::wal::{Lsn, Op};

/// A volume served by this mirror.
pub(super) struct Volume {
    pub id: String,
    pub dir: PathBuf,
    /// A second handle on the replica root for verifiers, which list the
    /// tree without holding up the shipper.
    /// Also what a persist runs `syncfs` on, without the apply lock.
    reader: Applier,
    inner: Mutex<Inner>,
    session: Mutex<Option<Session>>,
    /// Serialises the catalog updates of persists and baselines, so a
    /// connection that lost the volume never writes a position after its
    /// successor did (see [`Volume::persist_upto`]).
    persist_lock: Mutex<()>,
    /// Records up to this LSN are in doubt after a machine crash (0: none):
    /// see [`Volume::open`]. Kept in `mirror.db` until a persisted
    /// position passes it.
    doubt: AtomicU64,
}

/// A position reached by applying: the last applied LSN and the log time
/// of that record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Applied {
    pub lsn: Lsn,
    pub time_ns: i64,
}

struct Inner {
    applier: Applier,
    pos: PositionFile,
    applied: Lsn,
    applied_time_ns: i64,
    /// An exchange that a previous run may or may not have applied.
    exchange_in_doubt: Option<Lsn>,
    /// The source the replica was last baselined from ("" = none).
    source: String,
    /// Records up to here may be skipped when they cannot apply (a sync
    /// went past them; the shipper repairs what they touched).
    horizon: Lsn,
    /// Paths named by records re-applied in doubt since the last flush to
    /// the catalog, and the position before the first of them.
    doubt_paths: BTreeSet<Vec<u8>>,
    before_doubt: Option<Applied>,
    /// Paths recorded for repair and not yet sent to the shipper.
    unsent: Vec<Vec<u8>>,
}

/// The connection that currently owns a volume.
struct Session {
    conn: u64,
    peer: SocketAddr,
    stream: TcpStream,
    alive: Arc<Liveness>,
}

/// Shared between a connection thread and the volume's session slot.
pub(super) struct Liveness {
    /// Milliseconds since [`epoch`] at the last frame or applied record.
    last: AtomicU64,
    /// Set to make the owner stop between two records (takeover, shutdown).
    pub stop: AtomicBool,
}

fn epoch() -> Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Liveness {
    pub(super) fn new() -> Arc<Liveness> {
        Arc::new(Liveness {
            last: AtomicU64::new(now_ms()),
            stop: AtomicBool::new(false),
        })
    }

    pub fn touch(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// Why a batch was not (fully) applied; the connection is closed after it.
#[derive(Debug, thiserror::Error)]
pub(super) enum BatchError {
    #[error("expected LSN {expected}, the batch starts at LSN {got}")]
    Gap { expected: Lsn, got: Lsn },
    #[error("cannot apply {0}")]
    Apply(ApplyError),
    #[error("{0:#}")]
    Persist(anyhow::Error),
    #[error("stopped after LSN {0} (mirror shutting down or volume taken over)")]
    Stopped(Lsn),
}

/// Who is applying, for the log.
pub(super) struct Ctx<'a> {
    pub peer: SocketAddr,
    pub db: &'a Mutex<MirrorDb>,
    pub alive: &'a Liveness,
    pub shutdown: &'a AtomicBool,
}

/// Returned by [`Volume::claim`]; releases the volume when dropped.
pub(super) struct Claim {
    vol: Arc<Volume>,
    conn: u64,
    pub alive: Arc<Liveness>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut s = self.vol.session.lock();
        if s.as_ref().is_some_and(|s| s.conn == self.conn) {
            *s = None;
        }
    }
}

impl Volume {
    /// Opens the volume's apply root and position. The catalog's position
    /// is durable (recorded after a `syncfs`); the position file, written
    /// after every record, may be ahead of it. When the file was written
    /// during this boot, the page cache held every change before it, so it
    /// is the position. When it was written during another boot, the
    /// machine went down since: the file may have reached the disk while
    /// some of the changes before it did not. Then the records after the
    /// catalog's position are applied again, tolerating those the tree has
    /// already outrun, never re-applying an exchange, and every path they
    /// name is recorded for the shipper to repair.
    pub fn open(id: &str, dir: &Path, state: &Path, db: &MirrorDb) -> Result<Volume> {
        let applier = Applier::open(dir)?;
        let reader = Applier::open(dir)?;
        db.ensure_volume(id, &dir.display().to_string())?;
        let (source, horizon) = db.source(id)?;
        let row = db.volume(id)?;
        let (cat_lsn, cat_time) = row.map_or((0, 0), |r| (r.applied_lsn, r.applied_time_ns));
        let (pos, from_file) = PositionFile::open(state, id)?;
        let file = from_file.unwrap_or_default();
        let mut doubt = db.in_doubt(id)?;
        let (applied, applied_time_ns) = if file.applied <= cat_lsn {
            (cat_lsn, cat_time)
        } else if pos.same_boot(&file) {
            info!(
                "volume {id}: position file is ahead of the catalog ({} > {cat_lsn}): \
                 the last run stopped inside a batch",
                file.applied
            );
            (file.applied, file.time_ns)
        } else {
            // Recorded before the file is rewritten below: that erases the
            // evidence.
            doubt = doubt.max(file.applied).max(file.exchange);
            db.set_in_doubt(id, doubt)?;
            warn!(
                "volume {id}: the position file (LSN {}) was written before the machine \
                 restarted and is ahead of the catalog (LSN {cat_lsn}): records up to LSN \
                 {doubt} may be partly on disk; they are applied again and what they touch \
                 is repaired from the source",
                file.applied
            );
            (cat_lsn, cat_time)
        };
        if doubt != 0 && doubt <= applied {
            doubt = 0;
            db.set_in_doubt(id, 0)?;
        }
        let exchange_in_doubt =
            (file.applied == applied && file.exchange == applied + 1).then_some(file.exchange);
        pos.write(Position {
            applied,
            time_ns: applied_time_ns,
            exchange: exchange_in_doubt.unwrap_or(0),
            ..Position::default()
        })?;
        info!(
            "volume {id}: serving {} at applied LSN {applied}",
            dir.display()
        );
        Ok(Volume {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
            reader,
            inner: Mutex::new(Inner {
                applier,
                pos,
                applied,
                applied_time_ns,
                exchange_in_doubt,
                source,
                horizon,
                doubt_paths: BTreeSet::new(),
                before_doubt: None,
                unsent: Vec::new(),
            }),
            session: Mutex::new(None),
            persist_lock: Mutex::new(()),
            doubt: AtomicU64::new(doubt),
        })
    }

    /// The applied LSN (waits for a batch in progress).
    pub fn applied(&self) -> Lsn {
        self.inner.lock().applied
    }

    /// What READY tells a shipper.
    pub fn ready(&self) -> crate::proto::ReadyInfo {
        let inner = self.inner.lock();
        crate::proto::ReadyInfo {
            applied: inner.applied,
            source: inner.source.clone(),
        }
    }

    /// What READY tells a shipper, made durable first: the shipper takes it
    /// as acknowledged and retires its WAL up to it, and a connection that
    /// lost the volume to a takeover may have applied batches its persister
    /// never covered. One syncfs and one catalog write per connection.
    pub fn ready_durable(&self, db: &Mutex<MirrorDb>) -> Result<crate::proto::ReadyInfo> {
        let inner = self.inner.lock();
        self.reader
            .sync()
            .map_err(|e| anyhow::anyhow!("syncfs of {}: {e}", self.dir.display()))?;
        let _catalog = self.persist_lock.lock();
        self.record_applied(&db.lock(), inner.applied, inner.applied_time_ns)?;
        Ok(crate::proto::ReadyInfo {
            applied: inner.applied,
            source: inner.source.clone(),
        })
    }

    /// SYNC_BEGIN: the replica now belongs to `source`, at `lsn` of its log
    /// (a baseline of the whole tree follows). Persisted before the Ack.
    pub fn sync_begin(&self, lsn: Lsn, source: &str, cx: &Ctx<'_>) -> Result<Lsn, BatchError> {
        let _catalog = self.persist_lock.lock();
        let mut inner = self.inner.lock();
        let now = crate::wal::segment::now_ns();
        info!(
            "volume {} peer {}: baseline from source {source:?} begins at LSN {lsn} \
             (was {:?} at LSN {})",
            self.id, cx.peer, inner.source, inner.applied
        );
        inner
            .pos
            .write(Position {
                applied: lsn,
                time_ns: now,
                exchange: 0,
                ..Position::default()
            })
            .map_err(BatchError::Persist)?;
        inner.pos.sync().map_err(BatchError::Persist)?;
        cx.db
            .lock()
            .begin_baseline(&self.id, source, lsn, now)
            .map_err(BatchError::Persist)?;
        inner.applied = lsn;
        inner.applied_time_ns = now;
        inner.exchange_in_doubt = None;
        inner.source = source.to_owned();
        // The baseline voided the repair requests and the doubt.
        self.doubt.store(0, Ordering::SeqCst);
        inner.doubt_paths.clear();
        inner.before_doubt = None;
        inner.unsent.clear();
        Ok(lsn)
    }

    /// SYNC_OPS: applies ops that bring the replica in line (the position
    /// does not move).
    pub fn apply_sync(&self, batch: &Batch, cx: &Ctx<'_>) -> Result<(), BatchError> {
        let mut inner = self.inner.lock();
        for rec in &batch.records {
            if cx.alive.stop.load(Ordering::SeqCst) || cx.shutdown.load(Ordering::SeqCst) {
                return Err(BatchError::Stopped(inner.applied));
            }
            inner.applier.apply_op(&rec.op).map_err(BatchError::Apply)?;
            cx.alive.touch();
        }
        Ok(())
    }

    /// SYNC_END: everything synced so far is made durable, and records up to
    /// `horizon` may be skipped when they no longer apply.
    pub fn sync_end(&self, horizon: Lsn, cx: &Ctx<'_>) -> Result<(), BatchError> {
        let _catalog = self.persist_lock.lock();
        let mut inner = self.inner.lock();
        self.persist(&inner, cx)?;
        cx.db
            .lock()
            .set_horizon(&self.id, horizon)
            .map_err(BatchError::Persist)?;
        inner.horizon = horizon;
        Ok(())
    }

    /// MANIFEST_REQ. The shipper's listing is taken under the volume lock
    /// (nothing changes meanwhile); a verifier's is not (the shipper keeps
    /// applying: the verifier accounts for records in flight).
    pub fn manifest(
        &self,
        path: &[u8],
        hashes: bool,
        shipper: bool,
        send: &mut dyn FnMut(crate::proto::Msg) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if shipper {
            let inner = self.inner.lock();
            crate::sync::serve::manifest(inner.applier.root(), path, hashes, send)
        } else {
            crate::sync::serve::manifest(self.reader.root(), path, hashes, send)
        }
    }

    /// SUMS_REQ.
    pub fn sums(&self, path: &[u8], block: u32) -> anyhow::Result<crate::proto::Msg> {
        crate::sync::serve::sums(self.reader.root(), path, block)
    }

    /// Makes connection `conn` the volume's only shipper. A current owner
    /// silent for at least `takeover_after` is presumed dead: its socket is
    /// shut down and it stops between two records. Otherwise `Err` names it.
    pub fn claim(
        self: &Arc<Self>,
        conn: u64,
        peer: SocketAddr,
        stream: &TcpStream,
        takeover_after: Duration,
    ) -> Result<Claim, String> {
        let mut slot = self.session.lock();
        if let Some(old) = slot.as_ref() {
            let idle = old.alive.idle();
            if idle < takeover_after {
                return Err(format!(
                    "volume {} is busy: shipper {} is connected (active {} ms ago)",
                    self.id,
                    old.peer,
                    idle.as_millis()
                ));
            }
            warn!(
                "volume {}: peer {peer} takes over from {} (silent for {} s)",
                self.id,
                old.peer,
                idle.as_secs()
            );
            old.alive.stop.store(true, Ordering::SeqCst);
            let _ = old.stream.shutdown(std::net::Shutdown::Both);
        }
        let alive = Liveness::new();
        let stream = stream
            .try_clone()
            .map_err(|e| format!("cannot clone the socket: {e}"))?;
        *slot = Some(Session {
            conn,
            peer,
            stream,
            alive: alive.clone(),
        });
        Ok(Claim {
            vol: self.clone(),
            conn,
            alive,
        })
    }

    /// Applies a batch in LSN order, skipping records already applied, and
    /// persists the position: syncfs, catalog. Returns the LSN to
    /// acknowledge. (The server applies and persists apart instead, so that
    /// one persist covers several batches: [`Volume::apply_records`].)
    pub fn apply_batch(&self, batch: &Batch, cx: &Ctx<'_>) -> Result<Lsn, BatchError> {
        let (reached, result) = self.apply_records(batch, cx);
        let persisted = self.persist_upto(reached, cx);
        result.and(persisted).map(|()| reached.lsn)
    }

    /// Applies a batch in LSN order, skipping records already applied,
    /// without making anything durable. Returns the position reached (also
    /// when a record fails: the records before it stay applied and must be
    /// persisted all the same) and whether the whole batch was applied.
    pub fn apply_records(&self, batch: &Batch, cx: &Ctx<'_>) -> (Applied, Result<(), BatchError>) {
        let refs: Vec<RecordRef<'_>> = batch
            .records
            .iter()
            .map(|r| RecordRef {
                lsn: r.lsn,
                time_ns: r.time_ns,
                op: r.op.reborrow(),
            })
            .collect();
        self.apply_refs(&refs, cx)
    }

    /// [`Volume::apply_records`] of records that borrow their data (from
    /// the received frame: see `proto::Section`).
    pub fn apply_refs(
        &self,
        records: &[RecordRef<'_>],
        cx: &Ctx<'_>,
    ) -> (Applied, Result<(), BatchError>) {
        let mut inner = self.inner.lock();
        let start = inner.applied + 1;
        let first = records.first().map_or(start, |r| r.lsn);
        let reached = |inner: &Inner| Applied {
            lsn: inner.applied,
            time_ns: inner.applied_time_ns,
        };
        if first > start {
            let gap = BatchError::Gap {
                expected: start,
                got: first,
            };
            return (reached(&inner), Err(gap));
        }
        let mut result = Ok(());
        for rec in records.iter().filter(|r| r.lsn >= start) {
            if cx.alive.stop.load(Ordering::SeqCst) || cx.shutdown.load(Ordering::SeqCst) {
                result = Err(BatchError::Stopped(inner.applied));
                break;
            }
            if let Err(e) = self.apply_one(&mut inner, rec, cx) {
                result = Err(e);
                break;
            }
            cx.alive.touch();
        }
        if let Err(e) = self.flush_doubt(&mut inner, cx) {
            result = Err(e);
        }
        (reached(&inner), result)
    }

    /// Records the paths of the records re-applied in doubt in the catalog,
    /// in one transaction, before any persist can move the position past
    /// them. If that fails, the position goes back to before the first of
    /// them (they are applied again next time: they are in doubt).
    fn flush_doubt(&self, inner: &mut Inner, cx: &Ctx<'_>) -> Result<(), BatchError> {
        let Some(before) = inner.before_doubt.take() else {
            return Ok(());
        };
        let paths: Vec<Vec<u8>> = std::mem::take(&mut inner.doubt_paths).into_iter().collect();
        let reason = "applied again after a machine crash of the mirror";
        let recorded = cx
            .db
            .lock()
            .add_resyncs(&self.id, &paths, reason, inner.applied);
        match recorded {
            Ok(()) => {
                let now = Position {
                    applied: inner.applied,
                    time_ns: inner.applied_time_ns,
                    ..Position::default()
                };
                inner.pos.write(now).map_err(BatchError::Persist)?;
                info!(
                    "volume {} peer {}: {} path(s) named by records in doubt (up to LSN {}) \
                     recorded for repair",
                    self.id,
                    cx.peer,
                    paths.len(),
                    inner.applied
                );
                inner.unsent.extend(paths);
                Ok(())
            }
            Err(e) => {
                inner.applied = before.lsn;
                inner.applied_time_ns = before.time_ns;
                let back = Position {
                    applied: before.lsn,
                    time_ns: before.time_ns,
                    ..Position::default()
                };
                let _ = inner.pos.write(back);
                Err(BatchError::Persist(e))
            }
        }
    }

    /// Paths recorded for repair since the last call, for a REPAIRS message
    /// (the catalog keeps them until a sync of a later connection ends).
    pub fn take_repairs(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.inner.lock().unsent)
    }

    /// Makes everything applied so far durable (`syncfs` of the replica's
    /// filesystem), then records `upto` — a position applied before the
    /// call — in `mirror.db`: an ACK up to it may follow. Runs without the
    /// apply lock, so the next batches are applied meanwhile (the syncfs
    /// covers some of them too; their position is recorded by a later
    /// persist). A connection that lost the volume to a takeover does not
    /// touch the catalog any more (its successor persists what it applied).
    pub fn persist_upto(&self, upto: Applied, cx: &Ctx<'_>) -> Result<(), BatchError> {
        self.reader.sync().map_err(|e| {
            BatchError::Persist(anyhow::anyhow!("syncfs of {}: {e}", self.dir.display()))
        })?;
        let _catalog = self.persist_lock.lock();
        if cx.alive.stop.load(Ordering::SeqCst) {
            return Err(BatchError::Stopped(upto.lsn));
        }
        self.record_applied(&cx.db.lock(), upto.lsn, upto.time_ns)
            .map_err(BatchError::Persist)
    }

    /// Records a durable position in the catalog; once it passes the
    /// records in doubt, they are no longer.
    fn record_applied(&self, db: &MirrorDb, lsn: Lsn, time_ns: i64) -> Result<()> {
        let now = crate::wal::segment::now_ns();
        db.set_applied(&self.id, lsn, time_ns, now)?;
        let doubt = self.doubt.load(Ordering::SeqCst);
        if doubt != 0 && lsn >= doubt {
            db.set_in_doubt(&self.id, 0)?;
            // (A baseline may have reset it meanwhile: then it stays 0.)
            let _ = self
                .doubt
                .compare_exchange(doubt, 0, Ordering::SeqCst, Ordering::SeqCst);
            info!(
                "volume {}: the records in doubt since the machine restarted are all applied \
                 again (persisted LSN {lsn})",
                self.id
            );
        }
        Ok(())
    }

    fn apply_one(
        &self,
        inner: &mut Inner,
        rec: &RecordRef<'_>,
        cx: &Ctx<'_>,
    ) -> Result<(), BatchError> {
        let doubt = inner.exchange_in_doubt.take() == Some(rec.lsn);
        let in_doubt = rec.lsn <= self.doubt.load(Ordering::SeqCst);
        if in_doubt {
            if inner.before_doubt.is_none() {
                inner.before_doubt = Some(Applied {
                    lsn: inner.applied,
                    time_ns: inner.applied_time_ns,
                });
            }
            for p in rec.op.paths() {
                inner.doubt_paths.insert(p.to_vec());
            }
        }
        match &rec.op {
            Op::Resync { path, reason } => {
                warn!(
                    "volume {} peer {} LSN {}: {} needs resync from the source: {reason}",
                    self.id,
                    cx.peer,
                    rec.lsn,
                    display_path(path)
                );
                let db = cx.db.lock();
                db.add_resync(&self.id, path, reason, rec.lsn)
                    .map_err(BatchError::Persist)?;
            }
            Op::Rename {
                from, to, flags, ..
            } if flags & libc::RENAME_EXCHANGE != 0 => {
                if in_doubt {
                    // Applied or not, on disk or not: the repair of both
                    // names (recorded above) settles it.
                    warn!(
                        "volume {} LSN {}: {} <-> {}: exchange in doubt after a machine \
                         crash; not applied again, both names will be repaired",
                        self.id,
                        rec.lsn,
                        display_path(from),
                        display_path(to)
                    );
                } else if doubt {
                    self.exchange_in_doubt(rec.lsn, from, to, cx)?;
                } else {
                    inner
                        .pos
                        .write(Position {
                            applied: inner.applied,
                            time_ns: inner.applied_time_ns,
                            exchange: rec.lsn,
                            ..Position::default()
                        })
                        .map_err(BatchError::Persist)?;
                    inner
                        .applier
                        .apply_at(rec.lsn, &rec.op)
                        .map_err(BatchError::Apply)?;
                }
            }
            _ => match inner.applier.apply_at(rec.lsn, &rec.op) {
                Ok(()) => {}
                Err(e) if rec.lsn <= inner.horizon && outrun(&e) => {
                    debug!(
                        "volume {} LSN {}: skipped, a sync went past it: {e}",
                        self.id, rec.lsn
                    );
                }
                Err(e) if in_doubt && outrun(&e) => {
                    debug!(
                        "volume {} LSN {}: skipped, in doubt and already outrun: {e}",
                        self.id, rec.lsn
                    );
                }
                Err(e) => return Err(BatchError::Apply(e)),
            },
        }
        inner.applied = rec.lsn;
        inner.applied_time_ns = rec.time_ns;
        if in_doubt {
            // The file moves once their paths are in the catalog
            // (`flush_doubt`): a restart before that applies them again.
            return Ok(());
        }
        inner
            .pos
            .write(Position {
                applied: rec.lsn,
                time_ns: rec.time_ns,
                exchange: 0,
                ..Position::default()
            })
            .map_err(BatchError::Persist)
    }

    /// A previous run was killed while applying this exchange: re-applying
    /// it would swap the names back if it had happened, so it is not
    /// applied again and both names are recorded as needing resync.
    fn exchange_in_doubt(
        &self,
        lsn: Lsn,
        from: &[u8],
        to: &[u8],
        cx: &Ctx<'_>,
    ) -> Result<(), BatchError> {
        let reason = "RENAME_EXCHANGE interrupted by a mirror crash: may or may not be applied";
        warn!(
            "volume {} LSN {lsn}: {} <-> {}: {reason}; recorded for resync",
            self.id,
            display_path(from),
            display_path(to)
        );
        let db = cx.db.lock();
        for p in [from, to] {
            db.add_resync(&self.id, p, reason, lsn)
                .map_err(BatchError::Persist)?;
        }
        Ok(())
    }

    /// Makes everything applied durable, then records the position.
    fn persist(&self, inner: &Inner, cx: &Ctx<'_>) -> Result<(), BatchError> {
        let io = |what: &str, e: std::io::Error| {
            BatchError::Persist(anyhow::anyhow!("{what} of {}: {e}", self.dir.display()))
        };
        inner.applier.sync().map_err(|e| io("syncfs", e))?;
        inner.pos.sync().map_err(BatchError::Persist)?;
        self.record_applied(&cx.db.lock(), inner.applied, inner.applied_time_ns)
            .map_err(BatchError::Persist)
    }
}

/// Is `e` the kind of failure a record meets when the tree is already past
/// it (an entry missing or of another kind, a directory that is now a
/// symlink)? Skipping such a record does nothing, so containment holds;
/// failures of the mirror itself (I/O, space, quota) are never skipped.
fn outrun(e: &ApplyError) -> bool {
    match e {
        ApplyError::Record { .. } => !matches!(
            e.raw_os_error(),
            Some(
                libc::EIO
                    | libc::ENOSPC
                    | libc::EDQUOT
                    | libc::EROFS
                    | libc::ENOMEM
                    | libc::EMFILE
                    | libc::ENFILE
                    | libc::EACCES
                    | libc::EPERM
            )
        ),
        ApplyError::Root { .. } => false,
    }
}

#[cfg(test)]
pub(super) fn test_liveness() -> Liveness {
    Liveness {
        last: AtomicU64::new(now_ms()),
        stop: AtomicBool::new(false),
    }
}
