//! The shipper: drains the WAL to a `replfs mirror` from the position the
//! mirror acknowledged, in order, over a connection it re-establishes with
//! capped exponential backoff (retried within 250 ms while the mirror's host
//! refuses connections). Up to `window_bytes` of batches are in flight; the
//! backlog stays on disk: memory holds the WAL reader's window (≤ 8 MiB),
//! the batch being built and at most three frames being sent — batches in
//! flight are not kept (the WAL has them).

pub mod coalesce;
pub mod config;
pub mod monitor;
pub mod tail;
pub mod throttle;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{info, warn};
use parking_lot::Mutex;

pub use config::ShipConfig;
use tail::Tail;
use throttle::Throttle;

use crate::catalog::Catalog;
use crate::exclude::Excludes;
use crate::proto::{self, BatchBuilder, Key, Msg};
use crate::sync::Peer;
use crate::sync::delta::{self, SyncArgs};
use crate::wal::codec;
use crate::wal::reader::RawFrame;
use crate::wal::{Lsn, Op, Wal, WalError};
use std::os::fd::{AsFd, OwnedFd};

/// Where the link stands, for status and logs.
#[derive(Clone, Debug, Default)]
pub struct LinkState {
    pub connected: bool,
    /// When the current state began (Unix seconds).
    pub since: i64,
    pub last_error: Option<String>,
}

/// Figures the shipper keeps up to date.
#[derive(Debug, Default)]
pub struct ShipStats {
    pub acked_lsn: AtomicU64,
    /// Bytes put on the wire (after compression), and the record bytes they carried.
    pub wire_bytes: AtomicU64,
    pub raw_bytes: AtomicU64,
    /// Records left out of batches by coalescing, and their data bytes.
    pub coalesced_records: AtomicU64,
    pub coalesced_bytes: AtomicU64,
    pub link: Mutex<LinkState>,
    /// Baseline / repair progress.
    pub sync: crate::sync::Progress,
}

/// What the shipper needs to reach the mirror.
#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub volume: String,
    pub key: Arc<Key>,
}

/// What a shipper needs besides the WAL.
pub struct ShipArgs {
    pub state: PathBuf,
    pub target: Target,
    pub cfg: ShipConfig,
    pub throttle: Arc<Throttle>,
    /// The backing directory, opened before any mount over it, for
    /// baselines and repairs (None: unknown, so
    /// a mirror that needs one cannot be served).
    pub backing: Option<Arc<OwnedFd>>,
    pub excludes: Excludes,
}

/// A shipper thread: follows the live WAL inside `replfs mount`, or drains
/// the backlog for `replfs ship`.
pub struct Shipper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<ShipStats>,
}

impl Shipper {
    /// Follows the WAL until stopped.
    pub fn start(wal: Wal, args: ShipArgs) -> Shipper {
        Self::spawn(wal, args, Mode::Follow)
    }

    /// Ships until the mirror acknowledged the head of the WAL (retrying
    /// broken links), then the thread ends: see [`Shipper::wait`].
    pub fn start_drain(wal: Wal, args: ShipArgs) -> Shipper {
        Self::spawn(wal, args, Mode::Drain)
    }

    fn spawn(wal: Wal, args: ShipArgs, mode: Mode) -> Shipper {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ShipStats::default());
        let ctx = Ctx {
            state: args.state,
            wal,
            target: args.target,
            cfg: args.cfg,
            stop: stop.clone(),
            stats: stats.clone(),
            throttle: args.throttle,
            last_retire: std::cell::Cell::new((None, 0)),
            backing: args.backing,
            excludes: args.excludes,
        };
        let thread = std::thread::Builder::new()
            .name("shipper".into())
            .spawn(move || ctx.run(mode))
            .expect("spawning the shipper thread");
        Shipper {
            stop,
            thread: Some(thread),
            stats,
        }
    }

    /// Setting this flag stops the shipper at its next step.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Waits for a draining shipper to finish; returns the acked LSN.
    pub fn wait(mut self) -> Lsn {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stats.acked_lsn.load(Ordering::Acquire)
    }

    /// Stops shipping; what is not acknowledged stays in the WAL for later.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Follow the live WAL until stopped.
    Follow,
    /// Ship up to the head, then return.
    Drain,
}

enum Outcome {
    Stopped,
    Drained,
}

struct Ctx {
    state: PathBuf,
    wal: Wal,
    target: Target,
    cfg: ShipConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<ShipStats>,
    throttle: Arc<Throttle>,
    /// When segments were last retired: retiring lists the WAL directory, so
    /// it runs at most once a second, not on every acknowledgement.
    last_retire: std::cell::Cell<(Option<Instant>, Lsn)>,
    backing: Option<Arc<OwnedFd>>,
    excludes: Excludes,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Ctx {
    fn run(&self, mode: Mode) {
        let mut backoff = self.cfg.min_backoff;
        let mut last_err = String::new();
        while !self.stop.load(Ordering::Acquire) {
            let e = match self.session(mode) {
                Ok(Outcome::Stopped | Outcome::Drained) => return self.retire(),
                Err(e) => e,
            };
            let refused = is_refused(&e);
            // A link that was up starts the backoff over: the
            // mirror is probably back in a moment (a restart).
            if self.stats.link.lock().connected {
                backoff = self.cfg.min_backoff;
                last_err.clear();
            }
            let msg = format!("{e:#}");
            if msg != last_err {
                warn!(
                    "link to mirror {} (volume {}): {msg}; retrying",
                    self.target.addr, self.target.volume
                );
                last_err = msg.clone();
            }
            self.set_link(false, Some(msg));
            // A refusal is cheap to retry and means the host is up: the
            // mirror is (re)starting; other failures back off in full.
            self.sleep(if refused {
                backoff.min(config::REFUSED_BACKOFF.max(self.cfg.min_backoff))
            } else {
                backoff
            });
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }

    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }

    fn set_link(&self, connected: bool, err: Option<String>) {
        let mut l = self.stats.link.lock();
        if l.connected != connected || l.since == 0 {
            l.since = now_secs();
        }
        l.connected = connected;
        if err.is_some() || connected {
            l.last_error = err.or(l.last_error.take());
        }
    }

    fn connect(&self) -> Result<TcpStream> {
        let addrs: Vec<_> = self
            .target
            .addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {}", self.target.addr))?
            .collect();
        let mut last = anyhow!("{} resolves to no address", self.target.addr);
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.cfg.connect_timeout) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = anyhow::Error::new(e).context(format!("cannot connect to {a}")),
            }
        }
        Err(last)
    }

    /// One connection: handshake, a baseline or repair when one is due,
    /// then stream batches and collect acks.
    fn session(&self, mode: Mode) -> Result<Outcome> {
        let mut stream = self.connect()?;
        stream.set_read_timeout(Some(self.cfg.io_timeout))?;
        stream.set_write_timeout(Some(self.cfg.io_timeout))?;
        let ready = proto::client_handshake(&mut stream, &self.target.volume, &self.target.key)?;
        let cat = Catalog::open(&self.state)?;
        let source_id = cat.source_id()?;
        match proto::read_msg(&mut stream)? {
            Msg::Repairs { paths } => {
                cat.add_resyncs(&paths, "the mirror asked for a repair", ready.applied)?;
                if !paths.is_empty() {
                    info!(
                        "mirror {} (volume {}) asks for the repair of {} path(s)",
                        self.target.addr,
                        self.target.volume,
                        paths.len()
                    );
                }
            }
            Msg::Error { msg } => bail!("the mirror refused: {msg}"),
            other => bail!("expected Repairs after Ready, got {}", other.name()),
        }
        self.set_link(true, None);
        let rx = spawn_reader(stream.try_clone()?);
        let mut peer = LinkPeer {
            cx: self,
            out: stream.try_clone()?,
            rx: &rx,
            last_io: Instant::now(),
            extra: Duration::ZERO,
        };
        let head = self.wal.head_lsn();
        let why = if let Some(l) = cat.get(KEY_BASELINE_PENDING)? {
            Some(format!("the baseline begun at LSN {l} did not finish"))
        } else if ready.source != source_id {
            Some(if ready.source.is_empty() {
                "the mirror's copy was never paired with a source".to_string()
            } else {
                format!("the mirror's copy belongs to source {}", ready.source)
            })
        } else if ready.applied > head {
            Some(format!(
                "the mirror has applied LSN {} but this WAL ends at {head}",
                ready.applied
            ))
        } else if matches!(
            Tail::open(&self.state, ready.applied + 1),
            Err(WalError::NotRetained { .. })
        ) {
            Some(format!(
                "the mirror needs LSN {} which this WAL no longer holds",
                ready.applied + 1
            ))
        } else {
            None
        };
        let applied = match why {
            Some(why) => self.baseline(&mut peer, &cat, &source_id, &why)?,
            None => {
                self.acked(ready.applied);
                if !cat.resync_list()?.is_empty() {
                    self.repair(&mut peer, &cat)?;
                }
                ready.applied
            }
        };
        info!(
            "connected to mirror {} (volume {}), resuming after LSN {applied}",
            self.target.addr, self.target.volume
        );
        let tail = match Tail::open(&self.state, applied + 1) {
            Err(WalError::NotRetained { lsn, oldest }) => bail!(
                "the mirror needs LSN {lsn} but the WAL starts at {oldest}: a baseline copy is needed"
            ),
            r => r?,
        };
        let r = self.stream(&mut stream, tail, &mut peer, &cat, mode);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        r
    }

    /// Brings a mirror whose position is unusable up by a baseline of the
    /// whole tree; returns the LSN the log resumes after.
    fn baseline(
        &self,
        peer: &mut LinkPeer<'_>,
        cat: &Catalog,
        source_id: &str,
        why: &str,
    ) -> Result<Lsn> {
        let Some(root) = self.open_backing()? else {
            bail!(
                "a baseline is needed ({why}) but this state dir does not know its backing \
                 directory: run `replfs mount` on it"
            );
        };
        self.wal.sync(self.wal.head_lsn())?;
        let l0 = self.wal.durable_lsn();
        info!(
            "volume {}: baseline to mirror {} starts at LSN {l0}: {why}",
            self.target.volume, self.target.addr
        );
        // Until it finishes, the mirror's copy is only partly this source's
        // (even though the mirror already names it): the next connection
        // starts the baseline over.
        cat.set(KEY_BASELINE_PENDING, &l0.to_string())?;
        peer.send(&Msg::SyncBegin {
            lsn: l0,
            source: source_id.to_owned(),
        })?;
        match peer.recv()? {
            Msg::Ack { lsn } if lsn == l0 => {}
            other => bail!(
                "expected the mirror's Ack of SyncBegin, got {}",
                other.name()
            ),
        }
        self.acked(l0);
        // Paths already waiting for a repair stay listed: the baseline takes
        // size and mtime on trust, the repair that follows does not.
        let job = SyncJob {
            root: &root,
            paths: &[Vec::new()],
            from: l0,
            clear: None,
            thorough: false,
        };
        self.run_sync(peer, cat, job)?;
        cat.remove(KEY_BASELINE_PENDING)?;
        self.stats.sync.baselines.fetch_add(1, Ordering::Relaxed);
        Ok(l0)
    }

    /// Repairs the paths the catalog lists as needing resync (the mirror's
    /// position is good: nothing is in flight). Thorough: a file there may
    /// carry the source's size and mtime with other bytes (a record replayed
    /// on a fuzzy copy, a change that was not logged).
    fn repair(&self, peer: &mut LinkPeer<'_>, cat: &Catalog) -> Result<()> {
        let rows = cat.resync_list()?;
        let Some(last) = rows.last().map(|r| r.id) else {
            return Ok(());
        };
        let Some(root) = self.open_backing()? else {
            bail!(
                "{} path(s) need a resync but this state dir does not know its backing \
                 directory: run `replfs mount` on it",
                rows.len()
            );
        };
        let paths = crate::sync::collapse(rows.into_iter().map(|r| r.path).collect());
        let shown: Vec<String> = paths
            .iter()
            .take(5)
            .map(|p| crate::apply::display_path(p))
            .collect();
        info!(
            "volume {}: repairing {} path(s) on the mirror: {}{}",
            self.target.volume,
            paths.len(),
            shown.join(", "),
            if paths.len() > 5 { ", ..." } else { "" }
        );
        let from = self.stats.acked_lsn.load(Ordering::Acquire);
        let job = SyncJob {
            root: &root,
            paths: &paths,
            from,
            clear: Some(last),
            thorough: true,
        };
        self.run_sync(peer, cat, job)?;
        self.stats.sync.repairs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs a sync of `paths` (`thorough`: files compared by checksums even
    /// when size and mtime match), then records every path a record after
    /// `from` touched as needing repair (the copy was fuzzy for them; see
    /// `crate::sync`), and drops the catalog rows up to `clear`.
    fn run_sync(&self, peer: &mut LinkPeer<'_>, cat: &Catalog, job: SyncJob<'_>) -> Result<()> {
        let SyncJob {
            root,
            paths,
            from,
            clear,
            thorough,
        } = job;
        let args = SyncArgs {
            root: root.as_fd(),
            excludes: &self.excludes,
            spool_dir: &self.state,
            progress: &self.stats.sync,
            thorough,
        };
        let token = crate::wal::segment::new_salt();
        let horizon = || self.wal.head_lsn();
        let started = Instant::now();
        let sent_before = self.stats.sync.bytes_sent.load(Ordering::Relaxed);
        let (report, until) = delta::sync(peer, &args, paths, token, &horizon)?;
        let sent = self.stats.sync.bytes_sent.load(Ordering::Relaxed) - sent_before;
        let touched = touched_paths(&self.state, from, until)?;
        cat.add_resyncs(&touched, "changed while the mirror was being synced", until)?;
        if let Some(id) = clear {
            cat.clear_resync(id)?;
        }
        self.stats.sync.phase.store(0, Ordering::Relaxed);
        info!(
            "volume {}: sync done in {:.1} s: {} entries examined, {} created, {} removed, \
             {} metadata-only, {} files by delta ({} blocks), {} of data, {} on the wire; \
             {} path(s) changed meanwhile will be repaired",
            self.target.volume,
            started.elapsed().as_secs_f64(),
            report.entries,
            report.created,
            report.removed,
            report.meta_only,
            report.delta_files,
            report.blocks_sent,
            crate::sync::fmt_bytes(report.data_bytes as f64),
            crate::sync::fmt_bytes(sent as f64),
            touched.len()
        );
        Ok(())
    }

    fn open_backing(&self) -> Result<Option<Arc<OwnedFd>>> {
        Ok(self.backing.clone())
    }

    fn acked(&self, lsn: Lsn) {
        self.stats.acked_lsn.fetch_max(lsn, Ordering::AcqRel);
        self.maybe_retire();
    }

    /// Retires acknowledged segments if the acked LSN moved and the last
    /// retirement is a second old (also called from the idle loop, so the
    /// last acknowledgement of a burst is not left waiting).
    fn maybe_retire(&self) {
        let (at, done) = self.last_retire.get();
        let acked = self.stats.acked_lsn.load(Ordering::Acquire);
        if acked > done && at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.retire();
        }
    }

    fn retire(&self) {
        let lsn = self.stats.acked_lsn.load(Ordering::Acquire);
        self.last_retire.set((Some(Instant::now()), lsn));
        if let Err(e) = self.wal.retire(lsn) {
            warn!(
                "volume {}: retiring WAL segments up to LSN {lsn}: {e}",
                self.target.volume
            );
        }
    }

    fn stream(
        &self,
        stream: &mut TcpStream,
        mut tail: Tail,
        peer: &mut LinkPeer<'_>,
        cat: &Catalog,
        mode: Mode,
    ) -> Result<Outcome> {
        let mut out = FrameWriter::start(stream.try_clone()?)?;
        // Batches sent and not yet acknowledged: last LSN, wire bytes.
        let mut in_flight: VecDeque<(Lsn, u64)> = VecDeque::new();
        let mut in_flight_bytes = 0u64;
        let mut last_io = Instant::now();
        let mut idle_polls = 0u32;
        // Subscribed before the first look at `durable_lsn` (in `next_batch`
        // below): no advance after that look goes unnoticed.
        let durable_rx = self.wal.durable_notifier();
        // When the catalog was last asked for paths to repair.
        let mut repair_check = Instant::now();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(Outcome::Stopped);
            }
            let mut sent = false;
            while in_flight.len() < self.cfg.window && in_flight_bytes < self.cfg.window_bytes {
                let limit = self.wal.durable_lsn();
                let Some((frame, raw, last)) = self.next_batch(&mut tail, limit, cat)? else {
                    break;
                };
                out.flush()?;
                if !self.wait_tokens(frame.len() as u64, &mut out, &mut last_io)? {
                    return Ok(Outcome::Stopped);
                }
                let len = frame.len() as u64;
                out.send_frame(frame)?;
                self.stats.wire_bytes.fetch_add(len, Ordering::Relaxed);
                self.stats.raw_bytes.fetch_add(raw, Ordering::Relaxed);
                in_flight.push_back((last, len));
                in_flight_bytes += len;
                sent = true;
            }
            if sent {
                out.flush()?;
                last_io = Instant::now();
                idle_polls = 0;
            } else if in_flight.is_empty() {
                self.maybe_retire();
                let caught_up = tail.next_lsn() > self.wal.durable_lsn();
                // A drain is not done while repairs wait: look at once.
                let due = mode == Mode::Drain || repair_check.elapsed() >= REPAIR_CHECK;
                if caught_up && due {
                    repair_check = Instant::now();
                    if !cat.resync_list()?.is_empty() {
                        // The sync writes to the socket itself.
                        out.drain()?;
                        self.repair(peer, cat)?;
                        last_io = Instant::now();
                        continue;
                    }
                }
                if mode == Mode::Drain
                    && self.stats.acked_lsn.load(Ordering::Acquire) >= self.wal.head_lsn()
                {
                    return Ok(Outcome::Drained);
                }
                idle_polls += 1;
                if idle_polls % 200 == 0 {
                    tail.check_stuck(self.wal.durable_lsn())?;
                }
                if last_io.elapsed() > self.cfg.keepalive {
                    proto::write_msg(&mut out, &Msg::Ping)?;
                    out.flush()?;
                    last_io = Instant::now();
                }
            }
            let window_open =
                in_flight.len() < self.cfg.window && in_flight_bytes < self.cfg.window_bytes;
            // One message (or a wake-up), then whatever else has arrived
            // meanwhile: a wide window brings acks in bursts.
            let mut next = if in_flight.is_empty() {
                // Idle: woken by the WAL once a record after the tail is
                // durable (the first append after the wait began, or the group
                // commit); nothing polls. Only durable records are shipped (a
                // machine crash of the source cannot un-write what the mirror
                // applied): records still unsynced after `poll_interval` are
                // synced by this wait, so the lag is one fdatasync, not a timer
                // period, and `durability = "os"` ships too.
                self.wal.wait_durable_beyond(
                    tail.next_lsn() - 1,
                    self.cfg.poll_interval,
                    IDLE_WAIT,
                )?;
                peer.rx.recv_timeout(Duration::ZERO)
            } else {
                // Batches in flight: the next ack, or, while the window has
                // room, records that became durable since the last batch
                // (a live stream keeps the window busy instead of waiting for
                // each group of acks, i.e. each of the mirror's syncfs).
                let never = crossbeam_channel::never();
                let wake = if window_open { &durable_rx } else { &never };
                crossbeam_channel::select! {
                    recv(peer.rx) -> m => m.map_err(|_| RecvTimeoutError::Disconnected),
                    recv(wake) -> _ => Err(RecvTimeoutError::Timeout),
                    default(IN_FLIGHT_WAIT) => Err(RecvTimeoutError::Timeout),
                }
            };
            if matches!(next, Err(RecvTimeoutError::Timeout)) {
                // Woken by the WAL (or timed out): acks may be waiting too.
                next = peer.rx.recv_timeout(Duration::ZERO);
            }
            loop {
                match next {
                    Ok(Ok(Msg::Ack { lsn })) => {
                        while let Some(&(l, n)) = in_flight.front() {
                            if l > lsn {
                                break;
                            }
                            in_flight.pop_front();
                            in_flight_bytes -= n;
                        }
                        self.acked(lsn);
                    }
                    Ok(Ok(Msg::Pong)) => {}
                    Ok(Ok(Msg::Repairs { paths })) => self.mirror_repairs(cat, &paths)?,
                    Ok(Ok(other)) => {
                        bail!("unexpected {} message from the mirror", other.name())
                    }
                    Ok(Err(msg)) => bail!("{msg}"),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        bail!("the mirror closed the connection")
                    }
                }
                next = match peer.rx.try_recv() {
                    Ok(m) => Ok(m),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        Err(RecvTimeoutError::Disconnected)
                    }
                };
            }
        }
    }

    /// REPAIRS in the stream: paths the mirror applied again in doubt
    /// (after a machine crash of its own); repaired once caught up.
    fn mirror_repairs(&self, cat: &Catalog, paths: &[Vec<u8>]) -> Result<()> {
        let acked = self.stats.acked_lsn.load(Ordering::Acquire);
        cat.add_resyncs(paths, "the mirror asked for a repair", acked)?;
        info!(
            "mirror {} (volume {}) asks for the repair of {} path(s) it applied in doubt",
            self.target.addr,
            self.target.volume,
            paths.len()
        );
        Ok(())
    }

    /// Waits for the throttle to grant `n` wire bytes. A slow rate can make
    /// this last longer than the mirror's idle timeout, so the link is pinged
    /// meanwhile. False when asked to stop.
    fn wait_tokens(&self, n: u64, out: &mut impl Write, last_io: &mut Instant) -> Result<bool> {
        loop {
            match self.throttle.try_acquire(n) {
                Ok(()) => return Ok(true),
                Err(wait) => {
                    if self.stop.load(Ordering::Acquire) {
                        return Ok(false);
                    }
                    if last_io.elapsed() > self.cfg.keepalive {
                        proto::write_msg(out, &Msg::Ping)?;
                        out.flush()?;
                        *last_io = Instant::now();
                    }
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                }
            }
        }
    }

    /// The BATCH frame of up to `batch_bytes` of records, none beyond
    /// `limit` (only durable records leave the source: a machine crash
    /// cannot un-write them), with its record bytes and last LSN; `None`
    /// when no record is ready.
    fn next_batch(
        &self,
        tail: &mut Tail,
        limit: Lsn,
        cat: &Catalog,
    ) -> Result<Option<(Vec<u8>, u64, Lsn)>> {
        // Under a throttle a batch never exceeds the burst.
        let max = self.throttle.max_batch().map_or(self.cfg.batch_bytes, |b| {
            b.clamp(4096, self.cfg.batch_bytes)
        });
        let mut b = BatchBuilder::new();
        if self.cfg.coalesce {
            self.coalesced_batch(tail, limit, cat, max, &mut b)?;
        } else {
            while (b.raw_len() as u64) < max
                && b.records() < self.cfg.batch_records
                && tail.next_lsn() <= limit
            {
                let took = tail.next_frame_with(|f, seed| add_frame(&mut b, f, seed))?;
                match took {
                    None => break,
                    Some(Ok(None)) => {}
                    Some(Ok(Some((path, reason, lsn)))) => {
                        // Repaired by a sync once the shipper has caught up.
                        cat.add_resync(&path, &reason, lsn)?;
                    }
                    Some(Err(e)) => {
                        return Err(e).with_context(|| {
                            format!("WAL segment {}", tail.segment_path().display())
                        });
                    }
                }
            }
        }
        let (Some(last), raw) = (b.last_lsn(), b.raw_len() as u64) else {
            return Ok(None);
        };
        Ok(Some((b.finish()?, raw, last)))
    }

    /// [`Ctx::next_batch`] with `ship.coalesce`: the records are decoded,
    /// and when more is waiting than the batch holds, writes that later
    /// writes of the batch overwrite are left out or trimmed.
    fn coalesced_batch(
        &self,
        tail: &mut Tail,
        limit: Lsn,
        cat: &Catalog,
        max: u64,
        b: &mut BatchBuilder,
    ) -> Result<()> {
        let mut records = Vec::new();
        let mut bytes = 0u64;
        while bytes < max && records.len() < self.cfg.batch_records && tail.next_lsn() <= limit {
            match tail.next_record()? {
                Some(r) => {
                    if let Op::Resync { path, reason } = &r.op {
                        cat.add_resync(path, reason, r.lsn)?;
                    }
                    bytes += proto::record_wire_len(&r.op)? as u64;
                    records.push(r);
                }
                None => break,
            }
        }
        if !records.is_empty() && limit > tail.next_lsn() {
            // Behind: more is waiting than this batch holds.
            let before = records.len() as u64;
            let (kept, saved) = coalesce::coalesce(records);
            records = kept;
            self.stats
                .coalesced_records
                .fetch_add(before - records.len() as u64, Ordering::Relaxed);
            self.stats
                .coalesced_bytes
                .fetch_add(saved, Ordering::Relaxed);
        }
        for r in &records {
            b.push(r.lsn, r.time_ns, &r.op)?;
        }
        Ok(())
    }
}

/// Frames at least this large (stored, uncompressed) are forwarded as they
/// are stored, their CRC re-seeded in O(log n) instead of re-summed; smaller
/// ones are re-encoded (summing them is cheaper than the re-seeding).
const FORWARD_MIN: usize = 16 << 10;

/// Adds a WAL frame to a batch: decoded (borrowing its data: every record is
/// checked as the mirror will check it), then forwarded or re-encoded.
/// Returns the path and reason of a `Resync` record.
fn add_frame(
    b: &mut BatchBuilder,
    f: &RawFrame<'_>,
    seed: u32,
) -> Result<Option<(Vec<u8>, String, Lsn)>> {
    let h = &f.header;
    let op = codec::decode_stored_ref(h, f.stored).map_err(|e| {
        anyhow!(
            "record {} at byte offset {} does not decode: {e}",
            h.lsn,
            f.offset
        )
    })?;
    if h.flags == 0 && f.stored.len() >= FORWARD_MIN {
        b.push_frame(h, f.stored, seed)?;
    } else {
        b.push(h.lsn, h.time_ns, &op)?;
    }
    Ok(match op {
        Op::Resync { path, reason } => Some((path, reason, h.lsn)),
        _ => None,
    })
}

/// One sync a shipper runs: `paths` below `root` (the backing dir), then
/// the paths records after `from` touched are recorded for repair and the
/// catalog's resync rows up to `clear` dropped.
struct SyncJob<'a> {
    root: &'a OwnedFd,
    paths: &'a [Vec<u8>],
    from: Lsn,
    clear: Option<i64>,
    /// Compare files by checksums even when size and mtime match.
    thorough: bool,
}

/// Frames sent to the mirror by a thread of its own, so that the next
/// batch is read from the WAL and encoded while the last one is on its way
/// (the socket blocks whenever the mirror is busy). At most [`SEND_QUEUE`]
/// frames wait; small writes (PING) are collected until `flush`.
struct FrameWriter {
    tx: Option<crossbeam_channel::Sender<Vec<u8>>>,
    small: Vec<u8>,
    /// Frames queued and not yet written.
    queued: Arc<AtomicU64>,
    /// Why the writer thread stopped.
    failed: Arc<Mutex<Option<std::io::Error>>>,
}

/// Frames waiting for the writer thread (besides the one being written).
const SEND_QUEUE: usize = 2;

impl FrameWriter {
    fn start(mut stream: TcpStream) -> Result<FrameWriter> {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(SEND_QUEUE);
        let queued = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(None));
        let (q, f) = (queued.clone(), failed.clone());
        // Not joined: it ends when the sender is dropped and the queue is
        // written, or at the first error (a shut down or timed out socket).
        std::thread::Builder::new()
            .name("ship-send".into())
            .spawn(move || {
                for frame in rx {
                    if let Err(e) = stream.write_all(&frame) {
                        *f.lock() = Some(e);
                        return;
                    }
                    q.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .context("cannot start the sender thread")?;
        Ok(FrameWriter {
            tx: Some(tx),
            small: Vec::new(),
            queued,
            failed,
        })
    }

    fn error(&self) -> std::io::Error {
        match self.failed.lock().take() {
            Some(e) => e,
            None => std::io::Error::new(std::io::ErrorKind::BrokenPipe, "sender thread ended"),
        }
    }

    /// Queues a whole frame (after any small writes before it).
    fn send_frame(&mut self, frame: Vec<u8>) -> std::io::Result<()> {
        self.flush()?;
        self.queued.fetch_add(1, Ordering::AcqRel);
        let tx = self.tx.as_ref().expect("sender present until drop");
        if tx.send(frame).is_err() {
            return Err(self.error());
        }
        Ok(())
    }

    /// Waits until everything queued is written.
    fn drain(&mut self) -> std::io::Result<()> {
        self.flush()?;
        while self.queued.load(Ordering::Acquire) > 0 {
            if self.failed.lock().is_some() {
                return Err(self.error());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Write for FrameWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.small.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.small.is_empty() {
            return Ok(());
        }
        let frame = std::mem::take(&mut self.small);
        self.send_frame(frame)
    }
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        let _ = self.flush();
        self.tx = None;
    }
}

/// Did the attempt fail because the mirror's host refused the connection?
fn is_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// Reads the mirror's messages into the channel; an error or a closed
/// connection ends it.
fn spawn_reader(stream: TcpStream) -> Receiver<Result<Msg, String>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("ship-acks".into())
        .spawn(move || {
            let mut r = std::io::BufReader::with_capacity(256 << 10, stream);
            loop {
                let sent = match proto::read_msg(&mut r) {
                    Ok(Msg::Ping) => Ok(()),
                    Ok(Msg::Error { msg }) => {
                        let _ = tx.send(Err(format!("the mirror refused: {msg}")));
                        return;
                    }
                    Ok(m) => tx.send(Ok(m)),
                    Err(e) => {
                        if !matches!(e, proto::ProtoError::Closed) {
                            let _ = tx.send(Err(format!("reading from the mirror: {e}")));
                        }
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        })
        .expect("spawning the ack reader");
    rx
}

/// The shipper's connection as a sync [`Peer`]: sends are throttled and
/// counted like batches; answers come from the reader thread.
struct LinkPeer<'a> {
    cx: &'a Ctx,
    out: TcpStream,
    rx: &'a Receiver<Result<Msg, String>>,
    /// When a frame was last sent (keepalive).
    last_io: Instant,
    /// Extra time allowed for the next answer.
    extra: Duration,
}

impl Peer for LinkPeer<'_> {
    fn send(&mut self, m: &Msg) -> Result<u64> {
        if self.cx.stop.load(Ordering::Acquire) {
            bail!("stopped");
        }
        let frame = proto::encode_msg(m)?;
        if !self
            .cx
            .wait_tokens(frame.len() as u64, &mut self.out, &mut self.last_io)?
        {
            bail!("stopped");
        }
        self.out.write_all(&frame)?;
        self.last_io = Instant::now();
        // Counted by the sync's progress (`bytes_sent`), not as batches.
        Ok(frame.len() as u64)
    }

    fn keepalive(&mut self) -> Result<()> {
        if self.cx.stop.load(Ordering::Acquire) {
            bail!("stopped");
        }
        if self.last_io.elapsed() > self.cx.cfg.keepalive {
            proto::write_msg(&mut self.out, &Msg::Ping)?;
            self.last_io = Instant::now();
        }
        Ok(())
    }

    fn allow(&mut self, extra: Duration) {
        self.extra = extra;
    }

    fn recv(&mut self) -> Result<Msg> {
        let until = Instant::now() + self.cx.cfg.io_timeout + std::mem::take(&mut self.extra);
        loop {
            if self.cx.stop.load(Ordering::Acquire) {
                bail!("stopped");
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the mirror did not answer for {} s",
                    self.cx.cfg.io_timeout.as_secs()
                );
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(Ok(Msg::Pong)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Ok(Msg::Repairs { paths })) => {
                    let cat = Catalog::open(&self.cx.state)?;
                    self.cx.mirror_repairs(&cat, &paths)?;
                }
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(msg)) => bail!("{msg}"),
                Err(RecvTimeoutError::Disconnected) => bail!("the mirror closed the connection"),
            }
        }
    }
}

/// Every path a record in `(from, to]` names (both names of a rename or
/// link), collapsed, and cut down to their parents (then to the whole tree)
/// when there are more than [`MAX_TOUCHED`].
fn touched_paths(state: &Path, from: Lsn, to: Lsn) -> Result<Vec<Vec<u8>>> {
    if to <= from {
        return Ok(Vec::new());
    }
    let reader = crate::wal::WalReader::open(state)?;
    let mut set = std::collections::BTreeSet::new();
    for rec in reader.iter_range(from + 1, to) {
        let rec = rec?;
        for p in rec.op.paths() {
            set.insert(p.to_vec());
        }
        if set.len() > 4 * MAX_TOUCHED {
            set = set
                .into_iter()
                .map(|p| crate::sync::manifest::parent(&p).to_vec())
                .collect();
        }
    }
    let mut paths = crate::sync::collapse(set.into_iter().collect());
    while paths.len() > MAX_TOUCHED {
        paths = crate::sync::collapse(
            paths
                .iter()
                .map(|p| crate::sync::manifest::parent(p).to_vec())
                .collect(),
        );
    }
    Ok(paths)
}

/// Catalog key set while a baseline runs (its LSN).
const KEY_BASELINE_PENDING: &str = "sync.baseline_pending";

/// Most paths recorded for repair after one sync.
const MAX_TOUCHED: usize = 10_000;
/// Longest idle wait for new records (the mirror's messages, a stop, a
/// repair check are seen within it).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Longest wait for an ack while batches are in flight (a stop is seen
/// within it); new durable records wake the shipper sooner while the window
/// has room.
const IN_FLIGHT_WAIT: Duration = Duration::from_millis(200);

/// How often a caught-up shipper looks for paths to repair.
const REPAIR_CHECK: Duration = Duration::from_secs(1);

/// Stores the backing directory of a mount (absolute) in the catalog, or
/// reads the one the last mount stored (for `replfs ship`).
pub fn remember_backing(state: &Path, backing: Option<&Path>) -> Result<Option<PathBuf>> {
    // (Callers open it before mounting anything over it: see `daemon`.)
    let cat = Catalog::open(state)
        .with_context(|| format!("cannot open the catalog in {}", state.display()))?;
    match backing {
        Some(b) => {
            let abs = std::fs::canonicalize(b)
                .with_context(|| format!("cannot resolve {}", b.display()))?;
            cat.set(crate::catalog::KEY_BACKING, &abs.to_string_lossy())?;
            Ok(Some(abs))
        }
        None => Ok(cat.get(crate::catalog::KEY_BACKING)?.map(PathBuf::from)),
    }
}

/// Works out where to ship: the command line wins over the config file,
/// which wins over what the last `replfs mount` of this state dir used
/// (kept in the catalog so `replfs ship --state DIR` needs nothing else).
pub fn resolve_target(
    state: &Path,
    cfg: &ShipConfig,
    mirror: Option<String>,
    key_file: Option<PathBuf>,
    remember: bool,
) -> Result<Option<Target>> {
    let cat = crate::catalog::Catalog::open(state)
        .with_context(|| format!("cannot open the catalog in {}", state.display()))?;
    let mirror = match mirror.or_else(|| cfg.mirror.clone()) {
        Some(m) => Some(m),
        None => cat.get("ship.mirror")?,
    };
    let Some(addr) = mirror else { return Ok(None) };
    let key_file = match key_file.or_else(|| cfg.key_file.clone()) {
        Some(k) => k,
        None => cat
            .get("ship.key_file")?
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("shipping to {addr} needs the shared key: --key-file FILE"))?,
    };
    let key = Key::load(&key_file)?;
    // The volume: a config that names one wins, else what the last mount used.
    let volume = match cat.get("ship.volume")? {
        Some(v) if cfg.volume == ShipConfig::default().volume => v,
        _ => cfg.volume.clone(),
    };
    if remember {
        cat.set("ship.volume", &cfg.volume)?;
        let abs = std::path::absolute(&key_file).unwrap_or(key_file.clone());
        cat.set("ship.mirror", &addr)?;
        cat.set("ship.key_file", &abs.to_string_lossy())?;
    }
    Ok(Some(Target {
        addr,
        volume,
        key: Arc::new(key),
    }))
}
