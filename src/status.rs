//! What `replfs status` shows: the link, the positions, the lag in records,
//! bytes and seconds (the current RPO), rates, the throttle in force and WAL
//! disk use. A running daemon keeps a fresh snapshot (refreshed every second
//! by its monitor thread, which also watches the RPO target); without a
//! daemon the figures come from the catalog and the WAL on disk.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::catalog::SegmentRow;
use crate::wal::reader::SegmentScanner;
use crate::wal::segment::{self, list_segments};
use crate::wal::{Lsn, WalReader};

/// Catalog keys the daemon keeps up to date for offline status.
pub const KEY_ACKED: &str = "ship.acked_lsn";
pub const KEY_HEAD: &str = "wal.head_lsn";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// A daemon (mount or ship) answered; otherwise figures are from disk.
    pub daemon: bool,
    pub volume: Option<String>,
    pub mirror: Option<String>,
    /// "connected", "retrying", "not configured", or "down" (no daemon).
    pub link: String,
    pub link_since: Option<String>,
    pub last_error: Option<String>,
    pub head_lsn: Lsn,
    pub acked_lsn: Lsn,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// Age of the oldest change the mirror has not acknowledged (the RPO now).
    pub lag_seconds: f64,
    pub rpo_target_seconds: Option<f64>,
    pub rpo_exceeded: bool,
    pub rate_10s_bytes_per_sec: f64,
    pub rate_1m_bytes_per_sec: f64,
    /// `null` = unlimited.
    pub throttle_bytes_per_sec: Option<u64>,
    pub throttle_burst_bytes: Option<u64>,
    pub throttle_reason: Option<String>,
    pub wal_disk_bytes: u64,
    pub wal_segments: usize,
    /// Raw record bytes shipped / wire bytes (after lz4); `null` before any.
    pub compression_ratio: Option<f64>,
    /// A baseline or repair in progress (or the last one's figures).
    #[serde(default)]
    pub sync: Option<crate::sync::ProgressView>,
    /// Paths recorded as needing a repair by sync (catalog `resync` rows).
    #[serde(default)]
    pub resync_pending: u64,
    /// Records left out of batches by coalescing since start.
    #[serde(default)]
    pub coalesced_records: u64,
    /// Batch bytes put on the wire since start (after lz4), and the record
    /// bytes they carried (syncs count in `sync.bytes_sent`).
    #[serde(default)]
    pub wire_bytes: u64,
    #[serde(default)]
    pub raw_bytes: u64,
    /// Every change logged up to this LSN is durable in BACKING (the last
    /// checkpoint of a mount, `crate::fs::checkpoint`); `null` before any.
    #[serde(default)]
    pub backing_checkpoint_lsn: Option<Lsn>,
    /// The FUSE mount's own figures (`null` for `replfs ship` and offline).
    #[serde(default)]
    pub mount: Option<MountView>,
}

/// Counters of the FUSE mount, shared by the fuser adapter, the core and the
/// status monitor.
#[derive(Debug, Default)]
pub struct MountStats {
    /// READ requests the daemon served (reads of passthrough opens never
    /// reach it: the kernel reads the backing file itself).
    pub read_requests: std::sync::atomic::AtomicU64,
    pub read_bytes: std::sync::atomic::AtomicU64,
    /// Opens by mode: kernel passthrough (read-only), passthrough with
    /// direct I/O (writable while passthrough opens exist: reads and writes
    /// reach the daemon), cached (through the daemon and the page cache).
    pub passthrough_opens: std::sync::atomic::AtomicU64,
    pub passthrough_dio_opens: std::sync::atomic::AtomicU64,
    pub cached_opens: std::sync::atomic::AtomicU64,
    /// FLUSH requests (one per close(2) of a file unless the open said
    /// FOPEN_NOFLUSH, which replfs does except under the writeback cache).
    pub flush_requests: std::sync::atomic::AtomicU64,
    /// LOOKUP requests (names the kernel had no valid entry for, negative
    /// ones included).
    pub lookup_requests: std::sync::atomic::AtomicU64,
    /// Whether passthrough is in force, and why not ("off: ...").
    pub passthrough: parking_lot::Mutex<String>,
}

/// What `status --json` shows of [`MountStats`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MountView {
    pub passthrough: String,
    pub read_requests: u64,
    pub read_bytes: u64,
    pub passthrough_opens: u64,
    pub passthrough_dio_opens: u64,
    pub cached_opens: u64,
    #[serde(default)]
    pub flush_requests: u64,
    #[serde(default)]
    pub lookup_requests: u64,
}

impl MountStats {
    pub fn view(&self) -> MountView {
        use std::sync::atomic::Ordering::Relaxed;
        MountView {
            passthrough: self.passthrough.lock().clone(),
            read_requests: self.read_requests.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            passthrough_opens: self.passthrough_opens.load(Relaxed),
            passthrough_dio_opens: self.passthrough_dio_opens.load(Relaxed),
            cached_opens: self.cached_opens.load(Relaxed),
            flush_requests: self.flush_requests.load(Relaxed),
            lookup_requests: self.lookup_requests.load(Relaxed),
        }
    }
}

/// Finds the oldest unacknowledged record and the WAL bytes from it to the
/// head. Keeps its scanner between calls: the acked LSN only moves forward,
/// so each call reads only what was acknowledged since the last one.
pub struct BacklogProbe {
    state: PathBuf,
    scanner: Option<SegmentScanner>,
    /// (LSN, time_ns, segment first LSN, offset) of the last record found.
    found: Option<(Lsn, i64, Lsn, u64)>,
}

impl BacklogProbe {
    pub fn new(state: &Path) -> BacklogProbe {
        BacklogProbe {
            state: state.to_path_buf(),
            scanner: None,
            found: None,
        }
    }

    /// `segs`: every retained segment with its bytes used (current included).
    /// Returns (time_ns of record acked+1, lag bytes), or None without backlog.
    pub fn measure(
        &mut self,
        acked: Lsn,
        head: Lsn,
        segs: &[SegmentRow],
    ) -> Result<Option<(i64, u64)>> {
        if acked >= head {
            return Ok(None);
        }
        let Some((time, seg_first, off)) = self.locate(acked + 1)? else {
            return Ok(None);
        };
        let mut bytes = 0u64;
        for s in segs.iter().filter(|s| s.first_lsn >= seg_first) {
            bytes += if s.first_lsn == seg_first {
                s.bytes.saturating_sub(off)
            } else {
                s.bytes.saturating_sub(segment::HEADER_LEN)
            };
        }
        Ok(Some((time, bytes)))
    }

    fn locate(&mut self, lsn: Lsn) -> Result<Option<(i64, Lsn, u64)>> {
        if let Some((l, t, seg, off)) = self.found
            && l == lsn
        {
            return Ok(Some((t, seg, off)));
        }
        let dir = segment::wal_dir(&self.state);
        let segs = list_segments(&dir)?;
        let Some((first, path)) = segs.iter().rev().find(|(f, _)| *f <= lsn) else {
            return Ok(None);
        };
        let reuse = self
            .scanner
            .as_ref()
            .is_some_and(|s| s.header().first_lsn == *first && s.next_lsn() <= lsn);
        if !reuse {
            self.scanner = Some(SegmentScanner::open(path)?);
        }
        let sc = self.scanner.as_mut().expect("set above");
        sc.refresh();
        while sc.next_lsn() < lsn {
            if sc.next_frame()?.is_none() {
                return Ok(None);
            }
        }
        let off = sc.position();
        let Some(frame) = sc.next_frame()? else {
            return Ok(None);
        };
        let t = frame.header.time_ns;
        // The scanner now stands after `lsn`: a repeat call for the same LSN
        // uses `found`, a later one continues from here.
        self.found = Some((lsn, t, *first, off));
        Ok(Some((t, *first, off)))
    }
}

/// Bytes the WAL's files take on disk (segments are preallocated), and their count.
pub fn wal_disk_use(state: &Path) -> (u64, usize) {
    let dir = segment::wal_dir(state);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return (0, 0);
    };
    let mut bytes = 0;
    let mut n = 0;
    for e in rd.flatten() {
        if let Ok(md) = e.metadata() {
            bytes += std::os::unix::fs::MetadataExt::blocks(&md) * 512;
            if e.path().extension().is_some_and(|x| x == "wal") {
                n += 1;
            }
        }
    }
    (bytes, n)
}

pub fn now_ns() -> i64 {
    segment::now_ns()
}

/// Status without a daemon: positions from the catalog, the log from disk.
pub fn offline(state: &Path) -> Result<Status> {
    let cat = crate::catalog::Catalog::open(state)?;
    let acked: Lsn = cat
        .get(KEY_ACKED)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let reader = WalReader::open(state)?;
    let infos = reader.segments()?;
    let head = infos.last().map(|s| s.last_lsn).unwrap_or(0);
    let segs: Vec<SegmentRow> = infos
        .iter()
        .map(|i| SegmentRow {
            first_lsn: i.first_lsn,
            file_name: String::new(),
            created_ns: i.created_ns,
            last_lsn: Some(i.last_lsn),
            bytes: i.bytes_used,
        })
        .collect();
    let mut st = Status {
        link: "down".into(),
        mirror: cat.get("ship.mirror")?,
        head_lsn: head,
        acked_lsn: acked.min(head),
        ..Status::default()
    };
    fill_backlog(&mut st, &mut BacklogProbe::new(state), &segs)?;
    (st.wal_disk_bytes, st.wal_segments) = wal_disk_use(state);
    st.resync_pending = cat.resync_count()?;
    st.backing_checkpoint_lsn = cat
        .get(crate::catalog::KEY_BACKING_CHECKPOINT)?
        .and_then(|v| v.parse().ok());
    Ok(st)
}

/// Fills lag records / bytes / seconds from the positions in `st`.
pub fn fill_backlog(st: &mut Status, probe: &mut BacklogProbe, segs: &[SegmentRow]) -> Result<()> {
    st.lag_records = st.head_lsn.saturating_sub(st.acked_lsn);
    match probe.measure(st.acked_lsn, st.head_lsn, segs)? {
        Some((t, bytes)) => {
            st.lag_bytes = bytes;
            st.lag_seconds = ((now_ns() - t).max(0) as f64) / 1e9;
        }
        None => {
            st.lag_bytes = 0;
            st.lag_seconds = 0.0;
        }
    }
    Ok(())
}

pub fn human_bytes(b: f64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", U[i])
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The human table of `replfs status`.
pub fn render(st: &Status) -> String {
    let mut out = Vec::new();
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let link = match (&st.link_since, &st.last_error) {
        (Some(since), Some(e)) if st.link != "connected" => {
            format!("{} since {since} ({e})", st.link)
        }
        (Some(since), _) => format!("{} since {since}", st.link),
        _ => st.link.clone(),
    };
    out.push(("link", link));
    out.push((
        "mirror",
        format!("{} (volume {})", opt(&st.mirror), opt(&st.volume)),
    ));
    out.push(("head LSN", st.head_lsn.to_string()));
    out.push(("acked LSN", st.acked_lsn.to_string()));
    let rpo = match st.rpo_target_seconds {
        Some(t) if st.rpo_exceeded => format!("  RPO TARGET {t:.0}s EXCEEDED"),
        Some(t) => format!("  (RPO target {t:.0}s)"),
        None => String::new(),
    };
    out.push((
        "lag",
        format!(
            "{} records, {}, {:.1} s{rpo}",
            st.lag_records,
            human_bytes(st.lag_bytes as f64),
            st.lag_seconds
        ),
    ));
    out.push((
        "ship rate",
        format!(
            "{}/s (10 s), {}/s (1 min)",
            human_bytes(st.rate_10s_bytes_per_sec),
            human_bytes(st.rate_1m_bytes_per_sec)
        ),
    ));
    let throttle = match st.throttle_bytes_per_sec {
        Some(r) => format!("{}/s", human_bytes(r as f64)),
        None => "unlimited".into(),
    };
    out.push((
        "throttle",
        format!("{throttle} ({})", opt(&st.throttle_reason)),
    ));
    out.push((
        "WAL on disk",
        format!(
            "{} in {} segment(s)",
            human_bytes(st.wal_disk_bytes as f64),
            st.wal_segments
        ),
    ));
    if let Some(r) = st.compression_ratio {
        out.push(("compression", format!("{r:.2}x")));
    }
    if let Some(v) = &st.sync {
        if v.phase != "idle" {
            out.push(("sync", v.line()));
        } else {
            out.push((
                "sync",
                format!(
                    "idle ({} baseline(s), {} repair(s) since start)",
                    v.baselines, v.repairs
                ),
            ));
        }
    }
    if st.resync_pending > 0 {
        out.push((
            "resync",
            format!(
                "{} path(s) waiting to be repaired on the mirror",
                st.resync_pending
            ),
        ));
    }
    if st.coalesced_records > 0 {
        out.push((
            "coalesced",
            format!("{} records left out of batches", st.coalesced_records),
        ));
    }
    if let Some(m) = &st.mount {
        out.push((
            "passthrough",
            format!(
                "{} ({} read-only passthrough, {} direct-I/O, {} cached opens; {} READs served)",
                m.passthrough,
                m.passthrough_opens,
                m.passthrough_dio_opens,
                m.cached_opens,
                m.read_requests
            ),
        ));
    }
    if let Some(c) = st.backing_checkpoint_lsn {
        out.push(("BACKING durable", format!("up to LSN {c} (checkpoint)")));
    }
    if !st.daemon {
        out.push((
            "note",
            "no mount or ship daemon is running: figures from disk".into(),
        ));
    }
    out.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect()
}
