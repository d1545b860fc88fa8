//! Log inspection tools behind `replfs log …` and `replfs verify`: dump,
//! replay into a directory, and tree comparison.

pub mod dump;
pub mod export;
pub mod replay;
pub mod stats;
pub mod treecmp;
pub mod verify;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use dump::dump;
pub use export::{ExportReport, export};
pub use replay::{ReplayReport, ResyncMarker, Until, parse_time, replay};
pub use stats::{StatsReport, parse_rpo, stats};
pub use treecmp::{CompareOptions, compare_trees, compare_trees_with};
pub use verify::{Problem, Severity, VerifyReport, verify};

use crate::wal::Ts;

/// Seconds of 10000-01-01T00:00:00Z: RFC 3339 cannot express later times.
const RFC3339_END_SECS: i64 = 253_402_300_800;

/// How many fractional digits a formatted timestamp carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Millis,
    Nanos,
}

/// Formats a timestamp as RFC 3339 UTC (`2024-05-01T12:00:00.123Z`); a time
/// RFC 3339 cannot express (before 1970 or after 9999) is shown as
/// `@<seconds>.<nanoseconds>` rather than failing.
pub fn format_ts(ts: Ts, precision: Precision) -> String {
    let in_range = (0..RFC3339_END_SECS).contains(&ts.sec) && ts.nsec < 1_000_000_000;
    if !in_range {
        return format!("@{}.{:09}", ts.sec, ts.nsec);
    }
    let t = UNIX_EPOCH + Duration::new(ts.sec.unsigned_abs(), ts.nsec);
    match precision {
        Precision::Millis => humantime::format_rfc3339_millis(t).to_string(),
        Precision::Nanos => humantime::format_rfc3339_nanos(t).to_string(),
    }
}

/// Splits nanoseconds since the epoch into a [`Ts`].
pub fn ts_from_ns(ns: i64) -> Ts {
    // rem_euclid of 1e9 always fits in u32.
    let nsec = u32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0);
    Ts {
        sec: ns.div_euclid(1_000_000_000),
        nsec,
    }
}

/// Nanoseconds since the epoch of a `SystemTime`, if representable.
fn ns_since_epoch(t: SystemTime) -> Option<i64> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

/// Log tools end to end: changes made to a source tree are logged to a real
/// WAL, dumped, and replayed into a copy that must compare equal.
#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::path::Path;

    use super::*;
    use crate::config::WalConfig;
    use crate::wal::{Attr, NodeKind, Op, Wal};

    #[test]
    fn formats_times_in_and_out_of_range() {
        let ts = Ts {
            sec: 1_700_000_000,
            nsec: 123_456_789,
        };
        assert_eq!(format_ts(ts, Precision::Millis), "2023-11-14T22:13:20.123Z");
        assert_eq!(
            format_ts(ts, Precision::Nanos),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(
            format_ts(Ts { sec: -1, nsec: 5 }, Precision::Nanos),
            "@-1.000000005"
        );
        let far = Ts {
            sec: i64::MAX,
            nsec: 0,
        };
        assert_eq!(
            format_ts(far, Precision::Millis),
            format!("@{}.000000000", i64::MAX)
        );
        assert_eq!(
            ts_from_ns(-1),
            Ts {
                sec: -1,
                nsec: 999_999_999
            }
        );
    }

    fn mtime(path: &Path) -> Ts {
        let m = fs::symlink_metadata(path).expect("stat");
        Ts {
            sec: m.mtime(),
            nsec: m.mtime_nsec() as u32,
        }
    }

    fn attr(path: &Path) -> Attr {
        let m = fs::symlink_metadata(path).expect("stat");
        Attr {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            mtime: mtime(path),
        }
    }

    /// Records what a passthrough would log: each change made to `src`
    /// followed by the metadata it left behind.
    struct Recorder<'a> {
        src: &'a Path,
        ops: Vec<Op<'static>>,
    }

    impl Recorder<'_> {
        fn p(&self, rel: &str) -> std::path::PathBuf {
            self.src.join(rel)
        }

        fn parent_mtime(&self, rel: &str) -> Ts {
            let parent = Path::new(rel).parent().unwrap_or(Path::new(""));
            mtime(&self.src.join(parent))
        }

        fn create(&mut self, rel: &str, kind: NodeKind) {
            let (attr, parent_mtime) = (attr(&self.p(rel)), self.parent_mtime(rel));
            self.ops.push(Op::Create {
                path: rel.into(),
                kind,
                rdev: 0,
                attr,
                parent_mtime,
            });
        }

        fn write(&mut self, rel: &str, offset: u64, data: &[u8]) {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(self.p(rel))
                .expect("open");
            std::os::unix::fs::FileExt::write_all_at(&f, data, offset).expect("write");
            let data = Cow::Owned(data.to_vec());
            self.ops.push(Op::Write {
                path: rel.into(),
                offset,
                data,
                attr: attr(&self.p(rel)),
            });
        }

        fn set_attr(&mut self, rel: &str) {
            self.ops.push(Op::SetAttr {
                path: rel.into(),
                attr: attr(&self.p(rel)),
                atime: None,
            });
        }
    }

    /// Builds a small tree in `src` and returns the ops that describe it.
    fn record_changes(src: &Path) -> Vec<Op<'static>> {
        let mut r = Recorder {
            src,
            ops: Vec::new(),
        };
        fs::create_dir(r.p("d")).expect("mkdir");
        r.create("d", NodeKind::Dir);
        fs::write(r.p("d/f"), b"").expect("create");
        r.create("d/f", NodeKind::File);
        r.write("d/f", 0, b"hello");
        r.write("d/f", 1 << 20, b"tail");
        fs::set_permissions(r.p("d/f"), fs::Permissions::from_mode(0o4750)).expect("chmod");
        r.set_attr("d/f");
        symlink("f", r.p("d/s")).expect("symlink");
        let (attr, parent_mtime) = (attr(&r.p("d/s")), r.parent_mtime("d/s"));
        r.ops.push(Op::Symlink {
            path: "d/s".into(),
            target: "f".into(),
            attr,
            parent_mtime,
        });
        fs::hard_link(r.p("d/f"), r.p("h")).expect("link");
        let parent_mtime = r.parent_mtime("h");
        r.ops.push(Op::Link {
            existing: "d/f".into(),
            path: "h".into(),
            parent_mtime,
        });
        fs::rename(r.p("h"), r.p("d/h2")).expect("rename");
        let (from_parent_mtime, to_parent_mtime) = (mtime(src), mtime(&r.p("d")));
        r.ops.push(Op::Rename {
            from: "h".into(),
            to: "d/h2".into(),
            flags: 0,
            from_parent_mtime,
            to_parent_mtime,
        });
        r.set_attr("");
        r.ops
    }

    #[test]
    fn dump_and_replay_a_real_wal_reproduce_the_source() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (src, state, into) = (
            tmp.path().join("src"),
            tmp.path().join("state"),
            tmp.path().join("into"),
        );
        fs::create_dir(&src).expect("mkdir");
        let ops = record_changes(&src);
        let (wal, _) = Wal::open(&state, &WalConfig::default()).expect("open wal");
        for op in &ops {
            wal.append(op).expect("append");
        }
        wal.sync(ops.len() as u64).expect("sync");
        wal.close().expect("close");
        drop(wal);

        let mut out = Vec::new();
        assert_eq!(
            dump(&state, None, None, true, &mut out).expect("dump"),
            ops.len() as u64
        );
        let first: serde_json::Value =
            serde_json::from_slice(out.split(|&b| b == b'\n').next().expect("line")).expect("json");
        assert_eq!(
            (&first["lsn"], &first["op"], &first["path"]),
            (&1.into(), &"create".into(), &"d".into())
        );

        let report = replay(&state, &into, Until::End, false).expect("replay");
        assert_eq!(
            (report.records, report.last_lsn, report.bytes_written),
            (ops.len() as u64, Some(ops.len() as u64), 9)
        );
        let diffs =
            compare_trees_with(&src, &into, CompareOptions { holes: true }).expect("compare");
        assert!(diffs.is_empty(), "{diffs:?}");

        let err = replay(&state, &tmp.path().join("x"), Until::Lsn(99), false).expect_err("beyond");
        assert!(format!("{err:#}").contains("beyond the end"), "{err:#}");
    }
}
