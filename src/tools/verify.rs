//! `replfs log verify`: checks every segment of a WAL completely and lists
//! every problem, resynchronising after damage instead of stopping at it.
//!
//! It reads through the one scanner of `wal::reader` (header, frame length,
//! CRC, LSN continuity, end of segment) and decodes every body; nothing is
//! modified, and a mount may keep appending meanwhile.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use super::stats::fmt_bytes;
use crate::wal::reader::{SegmentEnd, SegmentScanner};
use crate::wal::segment::{self, list_segments};
use crate::wal::{Lsn, WalError};

/// How bad a problem is: errors make the log unsound (exit 1), warnings not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, located by segment file and byte offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub segment: String,
    pub offset: u64,
    pub severity: Severity,
    pub message: String,
}

/// What `log verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Segment files examined (readable or not).
    pub segments: u64,
    /// Records whose frame validated (length, CRC, LSN).
    pub records: u64,
    pub first_lsn: Option<Lsn>,
    pub last_lsn: Option<Lsn>,
    /// Bytes of those frames (headers included).
    pub bytes: u64,
    /// Size of the segment files on disk (preallocated).
    pub disk_bytes: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// Sound: no error-level problem (warnings allowed).
    pub fn ok(&self) -> bool {
        !self.problems.iter().any(|p| p.severity == Severity::Error)
    }

    fn count(&self, severity: Severity) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == severity)
            .count()
    }

    /// One line per problem, then a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            let sev = match p.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let _ = writeln!(
                out,
                "{sev}: {} at offset {}: {}",
                p.segment, p.offset, p.message
            );
        }
        let lsns = match (self.first_lsn, self.last_lsn) {
            (Some(a), Some(b)) => format!("LSN {a}..={b}"),
            _ => "no LSN".to_string(),
        };
        let _ = writeln!(
            out,
            "segments: {}  records: {} ({lsns})  bytes: {} in records, {} on disk",
            self.segments,
            self.records,
            fmt_bytes(self.bytes as f64),
            fmt_bytes(self.disk_bytes as f64),
        );
        let verdict = if self.ok() { "sound" } else { "NOT sound" };
        let _ = writeln!(
            out,
            "problems: {} error(s), {} warning(s): the log is {verdict}",
            self.count(Severity::Error),
            self.count(Severity::Warning)
        );
        out
    }

    /// The report as one JSON object (and a newline).
    pub fn to_json(&self) -> String {
        let v = json!({
            "ok": self.ok(),
            "segments": self.segments,
            "records": self.records,
            "first_lsn": self.first_lsn,
            "last_lsn": self.last_lsn,
            "bytes": self.bytes,
            "disk_bytes": self.disk_bytes,
            "problems": self.problems,
        });
        format!("{v}\n")
    }
}

/// Checks the whole WAL of `state`. Problems in the log are in the report;
/// an error means the check could not run (no such state dir, no WAL,
/// unreadable WAL directory).
pub fn verify(state: &Path) -> anyhow::Result<VerifyReport> {
    if !state.is_dir() {
        bail!("no such state directory: {}", state.display());
    }
    let dir = segment::wal_dir(state);
    if !dir.is_dir() {
        bail!("no WAL in {} (missing {})", state.display(), dir.display());
    }
    let list = list_segments(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut v = Verifier::default();
    for (i, (named, path)) in list.iter().enumerate() {
        let next_named = list.get(i + 1).map(|s| s.0);
        v.segment(path, *named, next_named);
    }
    Ok(v.report)
}

/// Walks the segments in order, remembering where the previous one ended.
#[derive(Default)]
struct Verifier {
    report: VerifyReport,
    /// LSN the next segment must start with, and the segment before it.
    expected: Option<(Lsn, String)>,
}

impl Verifier {
    fn problem(&mut self, path: &Path, offset: u64, severity: Severity, message: String) {
        self.report.problems.push(Problem {
            segment: path.display().to_string(),
            offset,
            severity,
            message,
        });
    }

    /// Verifies one segment; `next_named` is the first LSN of the next one.
    fn segment(&mut self, path: &Path, named: Lsn, next_named: Option<Lsn>) {
        self.report.segments += 1;
        let last = next_named.is_none();
        let mut sc = match SegmentScanner::open(path) {
            Ok(sc) => sc,
            Err(e) => return self.unreadable(path, named, next_named, e),
        };
        self.report.disk_bytes += sc.info().file_len;
        self.check_start(path, sc.header().first_lsn);
        if let Err(e) = self.scan(&mut sc, path, last) {
            let msg = format!("cannot read the rest of the segment: {e}");
            self.problem(path, sc.position(), Severity::Error, msg);
        }
        self.expected = Some((sc.next_lsn(), path.display().to_string()));
    }

    /// The segment must start right after the previous one.
    fn check_start(&mut self, path: &Path, first: Lsn) {
        let Some((want, prev)) = self.expected.clone() else {
            return;
        };
        let prev_last = want.saturating_sub(1);
        let msg = if first > want {
            format!(
                "LSN gap: {prev} ends at LSN {prev_last} but this segment starts at LSN {first}: \
                 {} missing (a deleted segment, or damage at the end of the previous one)",
                records(want, first - 1)
            )
        } else if first < want {
            format!(
                "LSN overlap: {prev} already holds records up to LSN {prev_last} but this segment starts at LSN {first}"
            )
        } else {
            return;
        };
        self.problem(path, 0, Severity::Error, msg);
    }

    /// A segment whose header cannot be read or checked.
    fn unreadable(&mut self, path: &Path, named: Lsn, next_named: Option<Lsn>, e: WalError) {
        if let WalError::Io { err, .. } = &e
            && err.kind() == std::io::ErrorKind::NotFound
            && self.report.records == 0
        {
            // Retired by a running shipper between listing and opening.
            self.report.segments -= 1;
            return;
        }
        self.check_start(path, named);
        self.expected = next_named.map(|n| (n, path.display().to_string()));
        if next_named.is_none() && all_zeros(path) {
            let msg = "empty last segment (its header was never written: a crash while \
                       rolling); it holds no record and will be deleted on next mount";
            return self.problem(path, 0, Severity::Warning, msg.to_string());
        }
        let (offset, why) = match e {
            WalError::Corrupt { offset, reason, .. } => (offset, reason),
            other => (0, other.to_string()),
        };
        let lost = match next_named {
            Some(n) if n > named => format!("{} unreadable", records(named, n - 1)),
            _ => format!("records from LSN {named} on are unreadable"),
        };
        self.problem(path, offset, Severity::Error, format!("{why}; {lost}"));
    }

    /// Reads every frame, resynchronising after each run of damage.
    fn scan(&mut self, sc: &mut SegmentScanner, path: &Path, last: bool) -> Result<(), WalError> {
        let mut run_start = sc.next_lsn();
        loop {
            self.read_frames(sc, path)?;
            match sc.classify_end(last) {
                Ok(SegmentEnd::Clean) => return Ok(()),
                Ok(SegmentEnd::Torn { offset, end }) => {
                    let msg = format!(
                        "torn tail at offset {offset} ({} bytes), will be cut on next mount \
                         (or an append in progress, if a mount is running)",
                        end - offset
                    );
                    self.problem(path, offset, Severity::Warning, msg);
                    return Ok(());
                }
                Err(WalError::Corrupt { offset, reason, .. }) => {
                    // Asked as if not last: the same diagnosis, without the
                    // "a valid record follows" note the resync below reports.
                    let reason = match sc.classify_end(false) {
                        Err(WalError::Corrupt { reason, .. }) => reason,
                        _ => reason,
                    };
                    match self.damage(sc, path, offset, reason, run_start)? {
                        Some(lsn) => run_start = lsn,
                        None => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reports damage at `offset` and what remains readable around it;
    /// returns the LSN scanning resumes at, if any valid frame follows.
    fn damage(
        &mut self,
        sc: &mut SegmentScanner,
        path: &Path,
        offset: u64,
        reason: String,
        run_start: Lsn,
    ) -> Result<Option<Lsn>, WalError> {
        let expected = sc.next_lsn();
        let mut msg = reason;
        if run_start < expected {
            let _ = write!(msg, "; {} readable", records(run_start, expected - 1));
        }
        let resumed = sc.skip_damage()?;
        match resumed {
            Some((at, lsn)) if lsn > expected => {
                let lost = records(expected, lsn - 1);
                let _ = write!(msg, "; {lost} lost; {lsn}.. are readable from offset {at}");
            }
            Some((at, lsn)) => {
                let _ = write!(msg, "; records {lsn}.. are readable from offset {at}");
            }
            None => msg.push_str("; nothing after it in this segment is readable"),
        }
        self.problem(path, offset, Severity::Error, msg);
        Ok(resumed.map(|(_, lsn)| lsn))
    }

    /// Counts the valid frames from the scanner's position and decodes each.
    fn read_frames(&mut self, sc: &mut SegmentScanner, path: &Path) -> Result<(), WalError> {
        while let Some(f) = sc.next_frame()? {
            let r = &mut self.report;
            r.records += 1;
            r.bytes += u64::from(f.header.frame_len);
            r.first_lsn.get_or_insert(f.header.lsn);
            r.last_lsn = Some(f.header.lsn);
            if let Err(WalError::Corrupt { offset, reason, .. }) = f.decode(path) {
                self.problem(path, offset, Severity::Error, reason);
            }
        }
        Ok(())
    }
}

/// `record 7 is` / `records 7..=9 are`: the subject of a sentence.
fn records(first: Lsn, last: Lsn) -> String {
    if first == last {
        format!("record {first} is")
    } else {
        format!("records {first}..={last} are")
    }
}

/// Is the file empty or zeros only? (An unreadable file counts as not.)
fn all_zeros(path: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) if buf[..n].iter().all(|&b| b == 0) => {}
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}
