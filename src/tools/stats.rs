//! `replfs log stats`: the change rate of the retained log, where it lands,
//! what coalescing would save, and the link bandwidth a given RPO needs.
//!
//! The log is streamed once; memory holds one counter per minute of the
//! log's span, one per directory, the interval sets of the current minute
//! and one counter per second of an RPO window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::{Precision, format_ts, ts_from_ns};
use crate::apply::display_path;
use crate::wal::codec::{FRAME_HEADER_LEN, encode_body};
use crate::wal::{Op, Record, WalReader};

/// The RPO assumed when `--rpo` is not given.
pub const DEFAULT_RPO: Duration = Duration::from_secs(15 * 60);
/// Share of the link left for payload once protocol overhead is paid (~30%).
pub const LINK_EFFICIENCY: f64 = 0.7;
/// The night in which a day's changes must be caught up.
pub const NIGHT: Duration = Duration::from_secs(8 * 3600);
const TOP_DIRS: usize = 10;
const NS_PER_SEC: i64 = 1_000_000_000;
const DAY_SECS: f64 = 86_400.0;

/// Parses `--rpo` (`30s`, `15m`, `1h`; default 15m); at least one second.
pub fn parse_rpo(s: Option<&str>) -> anyhow::Result<Duration> {
    let Some(s) = s else {
        return Ok(DEFAULT_RPO);
    };
    let d = humantime::parse_duration(s.trim())
        .with_context(|| format!("bad --rpo {s:?}: expected a duration like 30s, 15m or 1h"))?;
    if d < Duration::from_secs(1) {
        bail!("bad --rpo {s:?}: the RPO must be at least 1s");
    }
    Ok(d)
}

/// Records, record bytes and payload bytes of one period.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Amount {
    pub records: f64,
    pub bytes: f64,
    pub data_bytes: f64,
}

impl Amount {
    fn add(&mut self, bytes: u64, data: u64) {
        self.records += 1.0;
        self.bytes += bytes as f64;
        self.data_bytes += data as f64;
    }

    fn max(self, o: Amount) -> Amount {
        Amount {
            records: self.records.max(o.records),
            bytes: self.bytes.max(o.bytes),
            data_bytes: self.data_bytes.max(o.data_bytes),
        }
    }

    fn scaled(self, k: f64) -> Amount {
        Amount {
            records: self.records * k,
            bytes: self.bytes * k,
            data_bytes: self.data_bytes * k,
        }
    }
}

/// Average and peak of one period length; each field peaks independently.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    pub avg: Amount,
    pub peak: Amount,
    /// Start of the period with the most record bytes (ns since the epoch).
    pub peak_at_ns: i64,
}

/// What `log stats` computed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsReport {
    pub records: u64,
    /// Record bytes: frame header + uncompressed body.
    pub bytes: u64,
    /// Write data and xattr values.
    pub data_bytes: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub first_ns: i64,
    pub last_ns: i64,
    pub per_minute: Rate,
    pub per_hour: Rate,
    /// Directories by record bytes, largest first (at most 10).
    pub top_dirs: Vec<(String, u64)>,
    pub coalesce_saving_bytes: u64,
    pub rpo: Duration,
    /// Most record bytes logged in any window of `rpo` (1 s resolution).
    pub peak_rpo_window_bytes: u64,
}

/// Streams the WAL of `state` and computes its statistics for `rpo`.
pub fn stats(state: &Path, rpo: Duration) -> anyhow::Result<StatsReport> {
    let reader = WalReader::open(state)
        .with_context(|| format!("cannot open the WAL in {}", state.display()))?;
    let mut acc = Acc::new(rpo);
    for item in reader.iter_from(0) {
        let rec = item.with_context(|| match acc.report.records {
            0 => "cannot read the log (see `replfs log verify`)".to_string(),
            _ => format!(
                "cannot read the log after LSN {} (see `replfs log verify`)",
                acc.report.last_lsn
            ),
        })?;
        acc.feed(&rec);
    }
    Ok(acc.finish())
}

/// Everything accumulated while streaming.
struct Acc {
    report: StatsReport,
    minutes: BTreeMap<i64, Amount>,
    dirs: HashMap<Vec<u8>, u64>,
    coalesce: Coalescer,
    window: Window,
    scratch: Vec<u8>,
}

impl Acc {
    fn new(rpo: Duration) -> Acc {
        let secs = i64::try_from(rpo.as_secs()).unwrap_or(i64::MAX).max(1);
        Acc {
            report: StatsReport {
                rpo,
                ..StatsReport::default()
            },
            minutes: BTreeMap::new(),
            dirs: HashMap::new(),
            coalesce: Coalescer::default(),
            window: Window::new(secs),
            scratch: Vec::new(),
        }
    }

    fn feed(&mut self, rec: &Record) {
        let bytes = self.record_bytes(&rec.op);
        let data = rec.op.data_len();
        let r = &mut self.report;
        if r.records == 0 {
            (r.first_lsn, r.first_ns, r.last_ns) = (rec.lsn, rec.time_ns, rec.time_ns);
        }
        r.records += 1;
        r.bytes += bytes;
        r.data_bytes += data;
        r.last_lsn = rec.lsn;
        r.first_ns = r.first_ns.min(rec.time_ns);
        r.last_ns = r.last_ns.max(rec.time_ns);
        let minute = rec.time_ns.div_euclid(60 * NS_PER_SEC);
        self.minutes.entry(minute).or_default().add(bytes, data);
        *self
            .dirs
            .entry(parent_dir(rec.op.path()).to_vec())
            .or_default() += bytes;
        self.coalesce.feed(minute, &rec.op);
        self.window.add(rec.time_ns.div_euclid(NS_PER_SEC), bytes);
    }

    /// Size of the record as logged before compression: frame header + body.
    fn record_bytes(&mut self, op: &Op<'_>) -> u64 {
        self.scratch.clear();
        let body = match encode_body(op, &mut self.scratch) {
            Ok(tail) => self.scratch.len() + tail.len(),
            // A decoded record always re-encodes; count its payload if not.
            Err(_) => op.data_len() as usize,
        };
        (FRAME_HEADER_LEN + body) as u64
    }

    fn finish(mut self) -> StatsReport {
        let span = self.report.span_seconds();
        self.report.per_minute = rate(self.minutes.iter().map(|(m, a)| (*m, *a)), 60, span);
        let mut hours: BTreeMap<i64, Amount> = BTreeMap::new();
        for (m, a) in &self.minutes {
            let h = hours.entry(m.div_euclid(60)).or_default();
            *h = Amount {
                records: h.records + a.records,
                bytes: h.bytes + a.bytes,
                data_bytes: h.data_bytes + a.data_bytes,
            };
        }
        self.report.per_hour = rate(hours.into_iter(), 3600, span);
        let mut dirs: Vec<(Vec<u8>, u64)> = self.dirs.into_iter().collect();
        dirs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        dirs.truncate(TOP_DIRS);
        self.report.top_dirs = dirs
            .into_iter()
            .map(|(d, n)| (display_path(&d), n))
            .collect();
        self.report.coalesce_saving_bytes = self.coalesce.saved;
        self.report.peak_rpo_window_bytes = self.window.peak;
        self.report
    }
}

/// Average over the span (a span shorter than the period counts as one
/// period: nothing is extrapolated) and peak over calendar periods of
/// `period` seconds, keyed by period index.
fn rate(periods: impl Iterator<Item = (i64, Amount)>, period: i64, span: f64) -> Rate {
    let mut out = Rate::default();
    let mut total = Amount::default();
    let mut best = -1.0;
    for (key, a) in periods {
        total = Amount {
            records: total.records + a.records,
            bytes: total.bytes + a.bytes,
            data_bytes: total.data_bytes + a.data_bytes,
        };
        out.peak = out.peak.max(a);
        if a.bytes > best {
            best = a.bytes;
            out.peak_at_ns = key.saturating_mul(period).saturating_mul(NS_PER_SEC);
        }
    }
    let period = period as f64;
    out.avg = total.scaled(period / span.max(period));
    out
}

/// The directory a path lies in (`a/b/c` -> `a/b`; `c` -> the root).
fn parent_dir(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => &[],
    }
}

/// Write bytes that a later write in the same calendar minute covers again
/// (same path, overlapping range): only the last version needs shipping.
/// A change of the file's identity (create, link, remove, rename, resync of
/// it or of a directory above it) ends its run: earlier bytes no longer count.
#[derive(Default)]
struct Coalescer {
    minute: i64,
    files: BTreeMap<Vec<u8>, BTreeMap<u64, u64>>,
    saved: u64,
}

impl Coalescer {
    fn feed(&mut self, minute: i64, op: &Op<'_>) {
        if minute != self.minute {
            self.files.clear();
            self.minute = minute;
        }
        match op {
            Op::Write {
                path, offset, data, ..
            } => {
                let end = offset.saturating_add(data.len() as u64);
                let set = self.files.entry(path.clone()).or_default();
                self.saved += add_range(set, *offset, end);
            }
            Op::Create { path, .. } | Op::Symlink { path, .. } | Op::Link { path, .. } => {
                self.files.remove(path);
            }
            Op::Remove { path, .. } | Op::Resync { path, .. } => self.forget_tree(path),
            Op::Rename { from, to, .. } => {
                self.forget_tree(from);
                self.forget_tree(to);
            }
            _ => {}
        }
    }

    /// Forgets `path` and everything below it (all when it is the root).
    fn forget_tree(&mut self, path: &[u8]) {
        if path.is_empty() {
            self.files.clear();
            return;
        }
        let below: Vec<Vec<u8>> = self
            .files
            .range(path.to_vec()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(path))
            .filter(|k| k.len() == path.len() || k[path.len()] == b'/')
            .cloned()
            .collect();
        for k in below {
            self.files.remove(&k);
        }
    }
}

/// Adds `[start, end)` to a set of disjoint, non-touching ranges (start ->
/// end) and returns how many of its bytes the set already held.
fn add_range(set: &mut BTreeMap<u64, u64>, start: u64, end: u64) -> u64 {
    if start >= end {
        return 0;
    }
    let touching: Vec<(u64, u64)> = set
        .range(..=end)
        .rev()
        .take_while(|(_, e)| **e >= start)
        .map(|(s, e)| (*s, *e))
        .collect();
    let (mut lo, mut hi, mut overlap) = (start, end, 0);
    for (s, e) in touching {
        overlap += e.min(end).saturating_sub(s.max(start));
        (lo, hi) = (lo.min(s), hi.max(e));
        set.remove(&s);
    }
    set.insert(lo, hi);
    overlap
}

/// The largest sum of bytes over any `len` consecutive seconds.
struct Window {
    len: i64,
    secs: VecDeque<(i64, u64)>,
    sum: u64,
    peak: u64,
}

impl Window {
    fn new(len: i64) -> Window {
        Window {
            len,
            secs: VecDeque::new(),
            sum: 0,
            peak: 0,
        }
    }

    fn add(&mut self, sec: i64, bytes: u64) {
        match self.secs.back_mut() {
            // A clock stepped back: count the record in the latest second.
            Some((last, n)) if sec <= *last => *n += bytes,
            _ => self.secs.push_back((sec, bytes)),
        }
        self.sum += bytes;
        let newest = self.secs.back().map_or(sec, |s| s.0);
        while let Some(&(s, n)) = self.secs.front() {
            if s > newest.saturating_sub(self.len) {
                break;
            }
            self.secs.pop_front();
            self.sum -= n;
        }
        self.peak = self.peak.max(self.sum);
    }
}

impl StatsReport {
    /// Seconds from the first to the last record's time.
    pub fn span_seconds(&self) -> f64 {
        self.last_ns.saturating_sub(self.first_ns) as f64 / 1e9
    }

    pub fn rpo_seconds(&self) -> f64 {
        self.rpo.as_secs_f64()
    }

    /// Payload rate (bytes/s) that keeps the backlog within one RPO:
    /// the most bytes logged in any RPO-long window, divided by the RPO.
    pub fn bytes_per_sec_for_rpo(&self) -> f64 {
        self.peak_rpo_window_bytes as f64 / self.rpo_seconds()
    }

    /// Record bytes of an average day (a span under a day counts as one day).
    pub fn bytes_per_day(&self) -> f64 {
        self.bytes as f64 * DAY_SECS / self.span_seconds().max(DAY_SECS)
    }

    /// Payload rate (bytes/s) that ships a day's changes in one night.
    pub fn bytes_per_sec_for_night(&self) -> f64 {
        self.bytes_per_day() / NIGHT.as_secs_f64()
    }

    pub fn mbit_for_rpo(&self) -> f64 {
        link_mbit(self.bytes_per_sec_for_rpo())
    }

    pub fn mbit_for_night_catchup(&self) -> f64 {
        link_mbit(self.bytes_per_sec_for_night())
    }
}

/// Link Mbit/s for a payload rate, protocol overhead included.
pub fn link_mbit(payload_bytes_per_sec: f64) -> f64 {
    payload_bytes_per_sec * 8.0 / LINK_EFFICIENCY / 1e6
}

/// `1536` -> `1.5 KiB`.
pub(crate) fn fmt_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A rate with three significant digits (`0.00358`, `3.44`, `1234`).
fn fmt_num(x: f64) -> String {
    if !x.is_finite() || x == 0.0 || x >= 100.0 {
        return format!("{x:.0}");
    }
    let decimals = (2.0 - x.abs().log10().floor()).clamp(0.0, 12.0) as usize;
    format!("{x:.decimals$}")
}

fn fmt_secs(s: f64) -> String {
    humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
}

fn fmt_time(ns: i64) -> String {
    format_ts(ts_from_ns(ns), Precision::Millis)
}

impl StatsReport {
    /// The human report: totals, rates, top directories, coalescing, bandwidth.
    pub fn render(&self) -> String {
        let mut o = String::new();
        if self.records == 0 {
            o.push_str("the log holds no records: no change rate to report\n");
            return o;
        }
        self.render_totals(&mut o);
        self.render_rates(&mut o);
        self.render_dirs(&mut o);
        self.render_coalescing(&mut o);
        self.render_bandwidth(&mut o);
        o
    }

    fn render_totals(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "log:      {} records, LSN {}..={}, {} .. {} (span {})",
            self.records,
            self.first_lsn,
            self.last_lsn,
            fmt_time(self.first_ns),
            fmt_time(self.last_ns),
            fmt_secs(self.span_seconds())
        );
        let _ = writeln!(
            o,
            "bytes:    {} in records (frame header + uncompressed body), {} of data \
             (write data, xattr values)\n",
            fmt_bytes(self.bytes as f64),
            fmt_bytes(self.data_bytes as f64)
        );
    }

    fn render_rates(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "{:<17} {:>12} {:>12} {:>12}",
            "rate", "records", "bytes", "data"
        );
        let row = |o: &mut String, label: &str, a: &Amount, note: String| {
            let _ = writeln!(
                o,
                "{label:<17} {:>12.1} {:>12} {:>12}{note}",
                a.records,
                fmt_bytes(a.bytes),
                fmt_bytes(a.data_bytes)
            );
        };
        for (name, r) in [("minute", &self.per_minute), ("hour", &self.per_hour)] {
            row(o, &format!("per {name:<6} avg"), &r.avg, String::new());
            let at = format!("   (busiest {name} from {})", fmt_time(r.peak_at_ns));
            row(o, &format!("per {name:<6} peak"), &r.peak, at);
        }
        o.push_str(
            "(averages are over the log's span, a span shorter than the period counting as \
             one period; peaks are over calendar minutes and hours)\n\n",
        );
    }

    fn render_dirs(&self, o: &mut String) {
        o.push_str(
            "top directories by bytes changed (record bytes; a change to a/b/c counts for a/b):\n",
        );
        for (dir, n) in &self.top_dirs {
            let _ = writeln!(o, "  {:>12}  {dir}", fmt_bytes(*n as f64));
        }
        o.push('\n');
    }

    fn render_coalescing(&self, o: &mut String) {
        let pct = match self.data_bytes {
            0 => 0.0,
            d => 100.0 * self.coalesce_saving_bytes as f64 / d as f64,
        };
        let _ = writeln!(
            o,
            "coalescing: {} of {} of data ({pct:.1}%) would not need shipping\n  method: \
             within each calendar minute, for each path, the bytes of a write that a later \
             write in the same minute covers again (an interval set per path, reset every \
             minute and when the file is created, linked, removed or renamed): only the last \
             version of each byte needs shipping.\n",
            fmt_bytes(self.coalesce_saving_bytes as f64),
            fmt_bytes(self.data_bytes as f64)
        );
    }

    fn render_bandwidth(&self, o: &mut String) {
        let rpo = fmt_secs(self.rpo_seconds());
        let (m_rpo, m_night) = (self.mbit_for_rpo(), self.mbit_for_night_catchup());
        let _ = writeln!(
            o,
            "link bandwidth needed (Mbit/s include ~30% protocol overhead: payload / {LINK_EFFICIENCY}):\n  \
             RPO {rpo}: {} Mbit/s ({} MB/s) = most record bytes in any {rpo} window \
             ({}) / {} s / {LINK_EFFICIENCY}; at this rate the backlog never exceeds one RPO of changes\n  \
             night catch-up: {} Mbit/s ({} MB/s) = record bytes per day ({}) / 8h / {LINK_EFFICIENCY}",
            fmt_num(m_rpo),
            fmt_num(m_rpo / 8.0),
            fmt_bytes(self.peak_rpo_window_bytes as f64),
            self.rpo_seconds(),
            fmt_num(m_night),
            fmt_num(m_night / 8.0),
            fmt_bytes(self.bytes_per_day()),
        );
        if self.span_seconds() < DAY_SECS {
            o.push_str("  (the log spans less than a day: a day's changes are taken to be all the retained ones)\n");
        }
        o.push_str("  (bytes are uncompressed; lz4 on the link can lower what is sent)\n");
    }

    /// The report as one JSON object (and a newline).
    pub fn to_json(&self) -> String {
        let rate = |r: &Rate| {
            json!({
                "avg": r.avg.bytes, "peak": r.peak.bytes,
                "avg_records": r.avg.records, "peak_records": r.peak.records,
                "avg_data_bytes": r.avg.data_bytes, "peak_data_bytes": r.peak.data_bytes,
                "peak_at": fmt_time(r.peak_at_ns),
            })
        };
        let dirs: Vec<_> = self
            .top_dirs
            .iter()
            .map(|(d, n)| json!({"dir": d, "bytes": n}))
            .collect();
        let v = json!({
            "records": self.records, "bytes": self.bytes, "data_bytes": self.data_bytes,
            "first_lsn": self.first_lsn, "last_lsn": self.last_lsn,
            "span_seconds": self.span_seconds(),
            "per_minute": rate(&self.per_minute), "per_hour": rate(&self.per_hour),
            "top_dirs": dirs,
            "coalesce_saving_bytes": self.coalesce_saving_bytes,
            "rpo_seconds": self.rpo_seconds(),
            "peak_rpo_window_bytes": self.peak_rpo_window_bytes,
            "bytes_per_day": self.bytes_per_day(),
            "mbit_for_rpo": self.mbit_for_rpo(),
            "mbit_for_night_catchup": self.mbit_for_night_catchup(),
            "mbyte_s_for_rpo": self.mbit_for_rpo() / 8.0,
            "mbyte_s_for_night_catchup": self.mbit_for_night_catchup() / 8.0,
        });
        format!("{v}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_count_only_bytes_already_held() {
        let mut s = BTreeMap::new();
        assert_eq!(add_range(&mut s, 0, 100), 0);
        assert_eq!(add_range(&mut s, 50, 150), 50);
        assert_eq!(add_range(&mut s, 200, 300), 0);
        assert_eq!(add_range(&mut s, 150, 200), 0);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(add_range(&mut s, 0, 300), 300);
        assert_eq!(add_range(&mut s, 7, 7), 0);
        assert_eq!(add_range(&mut s, u64::MAX - 1, u64::MAX), 0);
    }

    fn write(path: &str, offset: u64, len: usize) -> Op<'static> {
        Op::Write {
            path: path.into(),
            offset,
            data: vec![0u8; len].into(),
            attr: Default::default(),
        }
    }

    #[test]
    fn coalescing_is_per_minute_per_path_and_ends_at_renames() {
        let mut c = Coalescer::default();
        c.feed(1, &write("d/a", 0, 10));
        c.feed(1, &write("d/b", 0, 10));
        c.feed(1, &write("d/a", 5, 10));
        assert_eq!(c.saved, 5);
        c.feed(2, &write("d/a", 0, 10));
        assert_eq!(c.saved, 5, "a new minute starts afresh");
        let rename = Op::Rename {
            from: "d".into(),
            to: "e".into(),
            flags: 0,
            from_parent_mtime: Default::default(),
            to_parent_mtime: Default::default(),
        };
        c.feed(2, &write("dd", 0, 10));
        c.feed(2, &rename);
        c.feed(2, &write("d/a", 0, 10));
        c.feed(2, &write("dd", 0, 10));
        assert_eq!(c.saved, 15, "d/a forgotten by the rename, dd kept");
    }

    #[test]
    fn window_finds_the_busiest_stretch() {
        let mut w = Window::new(60);
        for (sec, n) in [(0, 10), (30, 10), (59, 10), (60, 5), (119, 1), (200, 3)] {
            w.add(sec, n);
        }
        assert_eq!(w.peak, 30);
        w.add(100, 100); // clock stepped back: counted at second 200
        assert_eq!(w.peak, 103);
    }

    #[test]
    fn parses_rpo_and_shapes_directories() {
        assert_eq!(parse_rpo(None).unwrap(), DEFAULT_RPO);
        assert_eq!(parse_rpo(Some("1m")).unwrap(), Duration::from_secs(60));
        assert!(parse_rpo(Some("10ms")).is_err());
        assert!(parse_rpo(Some("soon")).is_err());
        assert_eq!(parent_dir(b"a/b/c"), b"a/b");
        assert_eq!(parent_dir(b"c"), b"");
        assert_eq!(fmt_bytes(1536.0), "1.5 KiB");
        let nums: Vec<String> = [0.0, 0.003581, 3.4374, 42.26, 1234.4].map(fmt_num).into();
        assert_eq!(nums, ["0", "0.00358", "3.44", "42.3", "1234"]);
        assert!((link_mbit(1e6) - 8.0 / 0.7).abs() < 1e-9);
    }
}
