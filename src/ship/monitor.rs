//! The daemon side of status and throttling: a monitor thread that refreshes
//! the status snapshot every second, keeps positions in the catalog for
//! offline status, watches the RPO target (a warning once per crossing, and
//! an optional hook), and answers the control socket.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use log::{info, warn};
use parking_lot::Mutex;

use super::ShipStats;
use super::throttle::{Rate, Throttle};
use crate::catalog::Catalog;
use crate::control::{Handler, Request};
use crate::status::{self, BacklogProbe, Status};
use crate::wal::Wal;

/// What the monitor watches.
pub struct Monitored {
    pub state: PathBuf,
    pub wal: Wal,
    /// None when no mirror is configured.
    pub ship: Option<Arc<ShipStats>>,
    pub throttle: Arc<Throttle>,
    pub mirror: Option<String>,
    pub volume: String,
    pub rpo: Option<Duration>,
    pub rpo_hook: Option<String>,
    /// The FUSE mount's counters (None for `replfs ship`).
    pub mount: Option<Arc<status::MountStats>>,
}

pub struct Monitor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    m: Monitored,
    snapshot: Mutex<Status>,
    stop: AtomicBool,
    /// The control handler's own connection: `fresh` counts the pending
    /// repairs at each request (the monitor thread keeps the other one).
    catalog: Mutex<Catalog>,
}

impl Monitor {
    pub fn start(m: Monitored) -> Result<Monitor> {
        let shared = Arc::new(Shared {
            snapshot: Mutex::new(Status::default()),
            stop: AtomicBool::new(false),
            catalog: Mutex::new(Catalog::open(&m.state)?),
            m,
        });
        let catalog = Catalog::open(&shared.m.state)?;
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || s2.run(catalog))?;
        Ok(Monitor {
            shared,
            thread: Some(thread),
        })
    }

    pub fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(ControlHandler(self.shared.clone()))
    }

    /// Stops the thread after a last refresh (positions saved for offline status).
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wire bytes shipped, sampled once a second, for the 10 s and 1 min rates.
struct Samples(VecDeque<(Instant, u64)>);

impl Samples {
    fn push(&mut self, total: u64) {
        let now = Instant::now();
        self.0.push_back((now, total));
        while self
            .0
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(61))
        {
            self.0.pop_front();
        }
    }

    fn rate(&self, over: Duration) -> f64 {
        let Some(&(t1, b1)) = self.0.back() else {
            return 0.0;
        };
        let from = self
            .0
            .iter()
            .find(|(t, _)| t1.duration_since(*t) <= over)
            .copied();
        match from {
            Some((t0, b0)) if t1 > t0 => (b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64(),
            _ => 0.0,
        }
    }
}

fn fmt_time(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Shows a sync's progress: a line rewritten every second on a terminal
/// (foreground runs), and a log line every 10 s (journal, log file).
struct ProgressReport {
    tty: bool,
    last_log: Option<Instant>,
    active: bool,
}

impl ProgressReport {
    fn new() -> Self {
        use std::io::IsTerminal;
        ProgressReport {
            tty: std::io::stderr().is_terminal(),
            last_log: None,
            active: false,
        }
    }

    fn show(&mut self, volume: &str, v: Option<&crate::sync::ProgressView>) {
        let running = v.filter(|v| v.phase != "idle");
        match running {
            Some(v) => {
                if self.tty {
                    eprint!("\r\x1b[2K{}", v.line());
                }
                if self
                    .last_log
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    self.last_log = Some(Instant::now());
                    log::info!("volume {volume}: {}", v.line());
                }
                self.active = true;
            }
            None if self.active => {
                if self.tty {
                    eprintln!();
                }
                self.active = false;
                self.last_log = None;
            }
            None => {}
        }
    }
}

impl Shared {
    fn run(&self, catalog: Catalog) {
        let mut probe = BacklogProbe::new(&self.m.state);
        let mut samples = Samples(VecDeque::new());
        let mut exceeded = false;
        let mut progress = ProgressReport::new();
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let wire = self
                .m
                .ship
                .as_ref()
                .map_or(0, |s| s.wire_bytes.load(Ordering::Relaxed));
            samples.push(wire);
            match self.refresh(&mut probe, &samples, &catalog) {
                Ok(st) => {
                    self.watch_rpo(&st, &mut exceeded);
                    progress.show(&self.m.volume, st.sync.as_ref());
                    self.persist(&catalog, &st);
                    *self.snapshot.lock() = st;
                }
                Err(e) => warn!("volume {}: status refresh: {e:#}", self.m.volume),
            }
            if stopping {
                return;
            }
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }

    fn refresh(
        &self,
        probe: &mut BacklogProbe,
        samples: &Samples,
        catalog: &Catalog,
    ) -> Result<Status> {
        let m = &self.m;
        let mut st = Status {
            daemon: true,
            volume: Some(m.volume.clone()),
            mirror: m.mirror.clone(),
            head_lsn: m.wal.head_lsn(),
            rpo_target_seconds: m.rpo.map(|d| d.as_secs_f64()),
            ..Status::default()
        };
        match &m.ship {
            Some(s) => {
                st.acked_lsn = s.acked_lsn.load(Ordering::Acquire);
                let l = s.link.lock();
                st.link = if l.connected { "connected" } else { "retrying" }.into();
                st.link_since = (l.since > 0).then(|| fmt_time(l.since));
                st.last_error = l.last_error.clone();
                let (raw, wire) = (
                    s.raw_bytes.load(Ordering::Relaxed),
                    s.wire_bytes.load(Ordering::Relaxed),
                );
                st.compression_ratio = (wire > 0).then(|| raw as f64 / wire as f64);
                (st.wire_bytes, st.raw_bytes) = (wire, raw);
                let v = s.sync.view();
                if v.phase != "idle" || v.baselines + v.repairs > 0 {
                    st.sync = Some(v);
                }
                st.coalesced_records = s.coalesced_records.load(Ordering::Relaxed);
            }
            None => st.link = "not configured".into(),
        }
        let mut segs = catalog.segments()?;
        segs.retain(|s| s.last_lsn.is_some());
        segs.push(m.wal.current_segment());
        status::fill_backlog(&mut st, probe, &segs)?;
        st.rate_10s_bytes_per_sec = samples.rate(Duration::from_secs(10));
        st.rate_1m_bytes_per_sec = samples.rate(Duration::from_secs(60));
        self.fill_throttle(&mut st);
        (st.wal_disk_bytes, st.wal_segments) = status::wal_disk_use(&m.state);
        st.rpo_exceeded = m.rpo.is_some_and(|r| st.lag_seconds > r.as_secs_f64());
        st.resync_pending = catalog.resync_count()?;
        st.backing_checkpoint_lsn = m.wal.backing_checkpoint();
        st.mount = m.mount.as_ref().map(|s| s.view());
        Ok(st)
    }

    /// The last snapshot with the cheap figures brought up to this instant
    /// (positions, link, throttle, pending repairs, the BACKING checkpoint);
    /// lag bytes/seconds and rates are at most a second old.
    fn fresh(&self) -> Status {
        let mut st = self.snapshot.lock().clone();
        // Also before the first snapshot (the first second after a start):
        // the answer comes from a running daemon.
        st.daemon = true;
        st.volume = Some(self.m.volume.clone());
        st.mirror = self.m.mirror.clone();
        st.rpo_target_seconds = self.m.rpo.map(|d| d.as_secs_f64());
        st.head_lsn = self.m.wal.head_lsn();
        if let Some(s) = &self.m.ship {
            st.acked_lsn = s.acked_lsn.load(Ordering::Acquire);
            let l = s.link.lock();
            st.link = if l.connected { "connected" } else { "retrying" }.into();
            st.link_since = (l.since > 0).then(|| fmt_time(l.since));
            st.last_error = l.last_error.clone();
        } else {
            st.link = "not configured".into();
        }
        st.lag_records = st.head_lsn.saturating_sub(st.acked_lsn);
        if st.lag_records == 0 {
            (st.lag_bytes, st.lag_seconds, st.rpo_exceeded) = (0, 0.0, false);
        }
        // "Up to date" is lag 0 *and* nothing pending: a repair recorded
        // since the last snapshot must show at once.
        match self.catalog.lock().resync_count() {
            Ok(n) => st.resync_pending = n,
            Err(e) => warn!("volume {}: counting pending repairs: {e}", self.m.volume),
        }
        st.backing_checkpoint_lsn = self.m.wal.backing_checkpoint();
        self.fill_throttle(&mut st);
        st.mount = self.m.mount.as_ref().map(|s| s.view());
        st
    }

    fn fill_throttle(&self, st: &mut Status) {
        let f = self.m.throttle.in_force();
        st.throttle_bytes_per_sec = match f.rate {
            Rate::Unlimited => None,
            Rate::BytesPerSec(r) => Some(r),
        };
        st.throttle_burst_bytes = Some(f.burst);
        st.throttle_reason = Some(f.reason);
    }

    /// A warning once per crossing of the RPO target, and the hook if any.
    fn watch_rpo(&self, st: &Status, exceeded: &mut bool) {
        let Some(target) = self.m.rpo else { return };
        if st.rpo_exceeded && !*exceeded {
            warn!(
                "volume {}: lag {:.0} s exceeds the RPO target of {} s ({} records, {} bytes behind; link {})",
                self.m.volume,
                st.lag_seconds,
                target.as_secs(),
                st.lag_records,
                st.lag_bytes,
                st.link
            );
            self.run_hook(st);
        } else if !st.rpo_exceeded && *exceeded {
            info!(
                "volume {}: lag {:.1} s is back under the RPO target",
                self.m.volume, st.lag_seconds
            );
        }
        *exceeded = st.rpo_exceeded;
    }

    fn run_hook(&self, st: &Status) {
        let Some(hook) = &self.m.rpo_hook else { return };
        let r = std::process::Command::new("sh")
            .arg("-c")
            .arg(hook)
            .env("REPLFS_VOLUME", &self.m.volume)
            .env("REPLFS_LAG_SECONDS", format!("{:.0}", st.lag_seconds))
            .env("REPLFS_LAG_RECORDS", st.lag_records.to_string())
            .env("REPLFS_LAG_BYTES", st.lag_bytes.to_string())
            .env(
                "REPLFS_RPO_SECONDS",
                format!("{:.0}", st.rpo_target_seconds.unwrap_or(0.0)),
            )
            .stdin(std::process::Stdio::null())
            .spawn();
        match r {
            // Reaped by a helper thread so no zombie is left behind.
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(e) => warn!(
                "volume {}: RPO hook {hook:?} failed to start: {e}",
                self.m.volume
            ),
        }
    }

    fn persist(&self, catalog: &Catalog, st: &Status) {
        let r = catalog
            .set(status::KEY_ACKED, &st.acked_lsn.to_string())
            .and_then(|_| catalog.set(status::KEY_HEAD, &st.head_lsn.to_string()));
        if let Err(e) = r {
            warn!(
                "volume {}: saving positions (head LSN {}, acked LSN {}) in the catalog: {e}",
                self.m.volume, st.head_lsn, st.acked_lsn
            );
        }
    }
}

struct ControlHandler(Arc<Shared>);

impl Handler for ControlHandler {
    fn handle(&self, req: Request) -> Result<serde_json::Value> {
        let t = &self.0.m.throttle;
        match req {
            Request::Status => Ok(serde_json::to_value(self.0.fresh())?),
            Request::ThrottleShow => Ok(serde_json::to_value(t.in_force())?),
            Request::ThrottleSet { rate, burst } => {
                let rate: Rate = rate.parse().map_err(|e| anyhow!("{e:#}"))?;
                let burst = match burst {
                    Some(b) => {
                        let n = crate::config::parse_size(&b)
                            .with_context(|| format!("bad burst {b:?}"))?;
                        super::throttle::check_burst(n)?;
                        Some(n)
                    }
                    None => None,
                };
                t.set_live(rate, burst);
                Ok(serde_json::to_value(t.in_force())?)
            }
            Request::ThrottleClear => {
                t.clear_live();
                Ok(serde_json::to_value(t.in_force())?)
            }
        }
    }
}
