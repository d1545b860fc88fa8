//! `replfs log replay`: rebuilds a tree from the WAL, from empty, up to an
//! LSN or a point in time, with the same apply engine as the mirror.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;

use super::{Precision, format_ts, ns_since_epoch, ts_from_ns};
use crate::apply::{Applier, display_path};
use crate::wal::{Lsn, Op, Record, WalReader};

/// How far to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Every record in the log.
    End,
    /// Up to and including this LSN.
    Lsn(Lsn),
    /// Up to and including the last record logged at or before this time
    /// (nanoseconds since the Unix epoch).
    Time(i64),
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Records applied.
    pub records: u64,
    /// The last LSN applied (`None`: nothing was applied).
    pub last_lsn: Option<Lsn>,
    /// When that record was logged (ns since the epoch).
    pub last_time_ns: Option<i64>,
    /// Data bytes written by `write` records.
    pub bytes_written: u64,
    /// Resync markers met: the replayed tree is not faithful at these paths.
    pub resyncs: Vec<ResyncMarker>,
}

/// A `resync` record met during replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResyncMarker {
    pub lsn: Lsn,
    /// The path (escaped; `.` is the whole tree).
    pub path: String,
    pub reason: String,
}

impl ReplayReport {
    fn note(&mut self, rec: &Record) {
        self.records += 1;
        self.last_lsn = Some(rec.lsn);
        self.last_time_ns = Some(rec.time_ns);
        match &rec.op {
            Op::Write { data, .. } => self.bytes_written += data.len() as u64,
            Op::Resync { path, reason } => {
                let (lsn, path, reason) = (rec.lsn, display_path(path), reason.clone());
                self.resyncs.push(ResyncMarker { lsn, path, reason });
            }
            _ => {}
        }
    }
}

/// A few lines for the operator, without a trailing newline.
impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.last_lsn, self.last_time_ns) {
            (Some(lsn), Some(ns)) => {
                let at = format_ts(ts_from_ns(ns), Precision::Millis);
                write!(f, "applied {} records up to LSN {lsn} ({at})", self.records)?;
            }
            _ => write!(f, "applied no records: the tree is empty")?,
        }
        write!(f, "\ndata written: {} bytes", self.bytes_written)?;
        for m in &self.resyncs {
            let (lsn, path, reason) = (m.lsn, &m.path, &m.reason);
            write!(
                f,
                "\nwarning: LSN {lsn}: {path} needs resync from the source: {reason}"
            )?;
        }
        Ok(())
    }
}

/// Parses an `--until-time` argument (RFC 3339, UTC; `T` or a space, `Z`
/// optional) into nanoseconds since the epoch.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    let t = humantime::parse_rfc3339_weak(s).with_context(|| {
        format!("invalid time {s:?}: expected RFC 3339 UTC, e.g. 2024-05-01T12:00:00Z")
    })?;
    ns_since_epoch(t).with_context(|| format!("time {s:?} is out of range"))
}

/// Replays the WAL in `state` from LSN 1 into `into` (created if missing;
/// refused if not empty unless `force`), up to `until`. The log is read
/// twice: a first pass finds the last LSN to apply and checks it is reachable,
/// so an unreachable point (history before the oldest retained record gone,
/// an LSN past the end, a corrupt record before the point) fails without
/// touching `into`; the second pass applies.
pub fn replay(
    state: &Path,
    into: &Path,
    until: Until,
    force: bool,
) -> anyhow::Result<ReplayReport> {
    let reader = WalReader::open(state)
        .with_context(|| format!("cannot open the WAL in {}", state.display()))?;
    replay_with(|| reader.iter_from(0), into, until, force)
}

/// [`replay`] over any record source; `records()` starts a pass at the
/// oldest retained record.
pub(crate) fn replay_with<F, I, E>(
    records: F,
    into: &Path,
    until: Until,
    force: bool,
) -> anyhow::Result<ReplayReport>
where
    F: Fn() -> I,
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let target = plan(records(), until)?;
    prepare_into(into, force)?;
    let mut applier = Applier::open(into)?;
    apply_until(records(), target, &mut applier)
        .with_context(|| format!("replay into {} stopped", into.display()))
}

/// Finds the last LSN to apply (`None`: none) and checks that replaying from
/// empty can reach it.
fn plan<I, E>(records: I, until: Until) -> anyhow::Result<Option<Lsn>>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut last: Option<Lsn> = None;
    let mut target = None;
    for item in records {
        let rec = item.with_context(|| unreadable_after(last))?;
        check_sequence(last, rec.lsn, until)?;
        match until {
            Until::Lsn(0) => return Ok(None),
            Until::Lsn(n) if rec.lsn == n => return Ok(Some(n)),
            Until::Time(t) if rec.time_ns <= t => target = Some(rec.lsn),
            Until::End => target = Some(rec.lsn),
            _ => {}
        }
        last = Some(rec.lsn);
    }
    match until {
        Until::Lsn(n) if n > 0 => match last {
            Some(head) => bail!("LSN {n} is beyond the end of the log (last LSN is {head})"),
            None => bail!("LSN {n} is beyond the end of the log (the log is empty)"),
        },
        _ => Ok(target),
    }
}

fn unreadable_after(lsn: Option<Lsn>) -> String {
    match lsn {
        Some(lsn) => format!("cannot read the log after LSN {lsn}"),
        None => "cannot read the log".to_string(),
    }
}

/// Replay starts from an empty tree, so the log must start at LSN 1 and be
/// contiguous.
fn check_sequence(prev: Option<Lsn>, lsn: Lsn, until: Until) -> anyhow::Result<()> {
    match prev {
        None if lsn != 1 => {
            let older = match until {
                Until::Lsn(n) if n < lsn => format!("LSN {n} is older than the retained log; "),
                _ => String::new(),
            };
            bail!(
                "{older}the retained log starts at LSN {lsn}: the history before it is gone, \
                 so the tree cannot be rebuilt from empty"
            )
        }
        Some(p) if lsn != p + 1 => bail!("the log skips from LSN {p} to LSN {lsn}"),
        _ => Ok(()),
    }
}

/// Makes sure `into` is an empty directory (or any directory with `force`).
fn prepare_into(into: &Path, force: bool) -> anyhow::Result<()> {
    match fs::metadata(into) {
        Ok(m) if !m.is_dir() => bail!("{} exists and is not a directory", into.display()),
        Ok(_) => {
            let mut entries =
                fs::read_dir(into).with_context(|| format!("cannot list {}", into.display()))?;
            if !force && entries.next().is_some() {
                bail!(
                    "refusing to replay into {}: it is not empty (--force applies on top of it)",
                    into.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(into).with_context(|| format!("cannot create {}", into.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot access {}", into.display())),
    }
}

/// Applies records in order up to and including `target`.
fn apply_until<I, E>(
    records: I,
    target: Option<Lsn>,
    applier: &mut Applier,
) -> anyhow::Result<ReplayReport>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut report = ReplayReport::default();
    let Some(target) = target else {
        return Ok(report);
    };
    for item in records {
        let rec = item.with_context(|| unreadable_after(report.last_lsn))?;
        if rec.lsn > target {
            break;
        }
        applier.apply(&rec)?;
        report.note(&rec);
        if rec.lsn == target {
            return Ok(report);
        }
    }
    bail!("the log ended before LSN {target} (it changed during the replay?)")
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::wal::{Attr, NodeKind, Ts};

    #[derive(Debug, thiserror::Error)]
    #[error("bad checksum in segment {0} at offset {1}")]
    struct Corrupt(&'static str, u64);

    const T0: i64 = 1_700_000_000_000_000_000;

    fn rec(lsn: Lsn, op: Op<'static>) -> Record {
        Record {
            lsn,
            time_ns: T0 + lsn as i64 * 1_000_000_000,
            op,
        }
    }

    fn file_attr(sec: i64) -> Attr {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Attr {
            mode: libc::S_IFREG | 0o644,
            uid,
            gid,
            mtime: Ts { sec, nsec: 0 },
        }
    }

    /// create f; write "one"; write "two" over it; resync marker; write "three".
    fn log() -> Vec<Record> {
        let write = |data: &[u8], sec| Op::Write {
            path: b"f".to_vec(),
            offset: 0,
            data: Cow::Owned(data.to_vec()),
            attr: file_attr(sec),
        };
        let create = Op::Create {
            path: b"f".to_vec(),
            kind: NodeKind::File,
            rdev: 0,
            attr: file_attr(1),
            parent_mtime: Ts { sec: 1, nsec: 0 },
        };
        let resync = Op::Resync {
            path: b"f".to_vec(),
            reason: "wal full".into(),
        };
        vec![
            rec(1, create),
            rec(2, write(b"one", 2)),
            rec(3, write(b"two", 3)),
            rec(4, resync),
            rec(5, write(b"three", 5)),
        ]
    }

    fn source(recs: Vec<Record>) -> impl Fn() -> Vec<Result<Record, Corrupt>> {
        move || recs.iter().cloned().map(Ok).collect()
    }

    fn run(recs: Vec<Record>, until: Until) -> (tempfile::TempDir, anyhow::Result<ReplayReport>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let res = replay_with(source(recs), &tmp.path().join("into"), until, false);
        (tmp, res)
    }

    #[test]
    fn replays_to_the_end_into_a_new_directory() {
        let (tmp, res) = run(log(), Until::End);
        let report = res.expect("replay");
        assert_eq!(
            std::fs::read(tmp.path().join("into/f")).expect("f"),
            b"three"
        );
        assert_eq!(
            (report.records, report.last_lsn, report.bytes_written),
            (5, Some(5), 11)
        );
        assert_eq!(report.last_time_ns, Some(T0 + 5_000_000_000));
        assert_eq!(
            report.resyncs,
            vec![ResyncMarker {
                lsn: 4,
                path: "f".into(),
                reason: "wal full".into()
            }]
        );
        assert!(report.to_string().contains("LSN 5"), "{report}");
    }

    #[test]
    fn stops_at_an_lsn_or_a_time() {
        let (tmp, res) = run(log(), Until::Lsn(2));
        assert_eq!(res.expect("replay").last_lsn, Some(2));
        assert_eq!(std::fs::read(tmp.path().join("into/f")).expect("f"), b"one");
        let (tmp, res) = run(log(), Until::Time(T0 + 3_500_000_000));
        assert_eq!(res.expect("replay").last_lsn, Some(3));
        assert_eq!(std::fs::read(tmp.path().join("into/f")).expect("f"), b"two");
        let (tmp, res) = run(log(), Until::Time(T0));
        assert_eq!(res.expect("replay").records, 0);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("into"))
                .expect("into")
                .count(),
            0
        );
    }

    #[test]
    fn unreachable_points_fail_without_touching_the_target() {
        let (tmp, res) = run(log(), Until::Lsn(9));
        let msg = format!("{:#}", res.expect_err("beyond"));
        assert!(
            msg.contains("LSN 9 is beyond the end") && msg.contains("last LSN is 5"),
            "{msg}"
        );
        assert!(!tmp.path().join("into").exists());

        let (tmp, res) = run(log().split_off(2), Until::Lsn(2));
        let msg = format!("{:#}", res.expect_err("retired"));
        assert!(
            msg.contains("LSN 2 is older than the retained log") && msg.contains("starts at LSN 3"),
            "{msg}"
        );
        assert!(!tmp.path().join("into").exists());

        let (_tmp, res) = run(log().split_off(1), Until::End);
        assert!(format!("{:#}", res.expect_err("retired")).contains("starts at LSN 2"));
    }

    #[test]
    fn corrupt_log_is_reported_with_its_position() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let recs = log();
        let corrupt = || {
            vec![
                Ok(recs[0].clone()),
                Err(Corrupt("0000000000000001.wal", 4096)),
            ]
        };
        let res = replay_with(corrupt, &tmp.path().join("into"), Until::End, false);
        let msg = format!("{:#}", res.expect_err("corrupt"));
        assert!(
            msg.contains("after LSN 1") && msg.contains("0000000000000001.wal at offset 4096"),
            "{msg}"
        );
        assert!(!tmp.path().join("into").exists());
    }

    #[test]
    fn refuses_a_non_empty_target_unless_forced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("keep"), b"mine").expect("write");
        let res = replay_with(source(log()), tmp.path(), Until::End, false);
        assert!(format!("{:#}", res.expect_err("non-empty")).contains("not empty"));
        assert!(!tmp.path().join("f").exists());
        replay_with(source(log()), tmp.path(), Until::End, true).expect("forced");
        assert_eq!(std::fs::read(tmp.path().join("f")).expect("f"), b"three");
        assert_eq!(
            std::fs::read(tmp.path().join("keep")).expect("keep"),
            b"mine"
        );
    }

    #[test]
    fn parses_rfc3339_times() {
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z").expect("time"),
            1_700_000_000_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14 22:13:20.5").expect("time"),
            1_700_000_000_500_000_000
        );
        assert!(parse_time("yesterday").is_err());
    }
}
