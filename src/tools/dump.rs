//! `replfs log dump`: prints WAL records as a table or as JSON lines.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::{Precision, format_ts, ts_from_ns};
use crate::apply::{display_path, escape_bytes};
use crate::wal::{Attr, Lsn, NodeKind, Op, Record, Ts, WalReader};

/// Prints the records with `from <= LSN <= to` of the WAL in `state`, as a
/// table or, with `json`, one JSON object per line. Returns how many records
/// were printed. A corrupt log prints what is readable and then fails with an
/// error naming the segment and offset.
pub fn dump(
    state: &Path,
    from: Option<Lsn>,
    to: Option<Lsn>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        bail!("--from {f} is after --to {t}");
    }
    let reader = WalReader::open(state)
        .with_context(|| format!("cannot open the WAL in {}", state.display()))?;
    dump_records(reader.iter_from(from.unwrap_or(0)), from, to, json, out)
}

/// [`dump`] over any record source (the WAL reader, or a list in tests).
pub(crate) fn dump_records<I, E>(
    records: I,
    from: Option<Lsn>,
    to: Option<Lsn>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = Result<Record, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    if !json {
        writeln!(
            out,
            "{:>10} {:<24} {:<11} {:>10} PATH  DETAIL",
            "LSN", "TIME", "OP", "LEN"
        )?;
    }
    let (mut printed, mut last) = (0u64, None);
    for item in records {
        let rec = item.with_context(|| match last {
            Some(lsn) => format!("cannot read the log after LSN {lsn}"),
            None => "cannot read the log".to_string(),
        })?;
        if from.is_some_and(|f| rec.lsn < f) {
            continue;
        }
        if to.is_some_and(|t| rec.lsn > t) {
            break;
        }
        let line = if json {
            json_line(&rec)
        } else {
            table_row(&rec)
        };
        writeln!(out, "{line}")?;
        printed += 1;
        last = Some(rec.lsn);
    }
    Ok(printed)
}

fn json_line(rec: &Record) -> String {
    let mut obj = Map::new();
    obj.insert("lsn".into(), json!(rec.lsn));
    obj.insert(
        "time".into(),
        json!(format_ts(ts_from_ns(rec.time_ns), Precision::Nanos)),
    );
    obj.insert("time_ns".into(), json!(rec.time_ns));
    obj.insert("op".into(), json!(rec.op.name()));
    obj.insert("path".into(), json!(escape_bytes(rec.op.path())));
    obj.insert("len".into(), json!(rec.op.data_len()));
    for (key, value) in op_fields(&rec.op) {
        obj.insert(key.into(), value);
    }
    Value::Object(obj).to_string()
}

fn table_row(rec: &Record) -> String {
    let time = format_ts(ts_from_ns(rec.time_ns), Precision::Millis);
    let detail: Vec<String> = op_fields(&rec.op)
        .into_iter()
        .filter(|(key, _)| !key.ends_with("parent_mtime"))
        .map(|(key, value)| match value {
            Value::String(s) => format!("{key}={s}"),
            other => format!("{key}={other}"),
        })
        .collect();
    let op = rec.op.name();
    let path = display_path(rec.op.path());
    format!(
        "{:>10} {time:<24} {op:<11} {:>10} {path}  {}",
        rec.lsn,
        rec.op.data_len(),
        detail.join(" ")
    )
}

fn mode(m: u32) -> Value {
    json!(format!("0{m:o}"))
}

fn time(ts: Ts) -> Value {
    json!(format_ts(ts, Precision::Nanos))
}

fn attr_fields(a: &Attr) -> Vec<(&'static str, Value)> {
    vec![
        ("mode", mode(a.mode)),
        ("uid", json!(a.uid)),
        ("gid", json!(a.gid)),
        ("mtime", time(a.mtime)),
    ]
}

/// Op-specific fields, shared by the JSON and table output.
fn op_fields(op: &Op<'_>) -> Vec<(&'static str, Value)> {
    let mut f: Vec<(&'static str, Value)> = Vec::new();
    match op {
        Op::Create {
            kind,
            rdev,
            attr,
            parent_mtime,
            ..
        } => {
            f.push(("kind", json!(kind_name(*kind))));
            if matches!(kind, NodeKind::CharDev | NodeKind::BlockDev) {
                f.push(("rdev", json!(format!("{rdev:#x}"))));
            }
            f.extend(attr_fields(attr));
            f.push(("parent_mtime", time(*parent_mtime)));
        }
        Op::Symlink {
            target,
            attr,
            parent_mtime,
            ..
        } => {
            f.push(("target", json!(escape_bytes(target))));
            f.extend(attr_fields(attr).into_iter().filter(|(k, _)| *k != "mode"));
            f.push(("parent_mtime", time(*parent_mtime)));
        }
        Op::Link {
            existing,
            parent_mtime,
            ..
        } => {
            f.push(("existing", json!(escape_bytes(existing))));
            f.push(("parent_mtime", time(*parent_mtime)));
        }
        Op::Remove { parent_mtime, .. } => f.push(("parent_mtime", time(*parent_mtime))),
        Op::Rename {
            to,
            flags,
            from_parent_mtime,
            to_parent_mtime,
            ..
        } => {
            f.push(("to", json!(escape_bytes(to))));
            if *flags != 0 {
                f.push(("flags", json!(rename_flags(*flags))));
            }
            f.push(("from_parent_mtime", time(*from_parent_mtime)));
            f.push(("to_parent_mtime", time(*to_parent_mtime)));
        }
        _ => data_op_fields(op, &mut f),
    }
    f
}

fn data_op_fields(op: &Op<'_>, f: &mut Vec<(&'static str, Value)>) {
    match op {
        Op::Write { offset, attr, .. } => {
            f.push(("offset", json!(offset)));
            f.extend(attr_fields(attr));
        }
        Op::Truncate { size, attr, .. } => {
            f.push(("size", json!(size)));
            f.extend(attr_fields(attr));
        }
        Op::SetAttr { attr, atime, .. } => {
            f.extend(attr_fields(attr));
            if let Some(a) = atime {
                f.push(("atime", time(*a)));
            }
        }
        Op::SetXattr { name, .. } | Op::RemoveXattr { name, .. } => {
            f.push(("name", json!(escape_bytes(name))))
        }
        Op::Fallocate {
            mode,
            offset,
            len,
            attr,
            ..
        } => {
            f.push(("flags", json!(falloc_flags(*mode))));
            f.push(("offset", json!(offset)));
            f.push(("length", json!(len)));
            f.extend(attr_fields(attr));
        }
        Op::Resync { reason, .. } => f.push(("reason", json!(reason))),
        _ => {}
    }
}

fn kind_name(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::File => "file",
        NodeKind::Dir => "dir",
        NodeKind::Fifo => "fifo",
        NodeKind::Socket => "socket",
        NodeKind::CharDev => "chardev",
        NodeKind::BlockDev => "blockdev",
    }
}

/// Names the set bits of a flag word, with any unknown remainder in hex.
fn flag_names(bits: u32, names: &[(u32, &str)], none: &str) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let rest = names.iter().fold(bits, |acc, (b, _)| acc & !b);
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    if parts.is_empty() {
        none.to_string()
    } else {
        parts.join("|")
    }
}

fn rename_flags(flags: u32) -> String {
    let names = [
        (libc::RENAME_NOREPLACE, "noreplace"),
        (libc::RENAME_EXCHANGE, "exchange"),
        (libc::RENAME_WHITEOUT, "whiteout"),
    ];
    flag_names(flags, &names, "none")
}

fn falloc_flags(mode: i32) -> String {
    let names = [
        (libc::FALLOC_FL_KEEP_SIZE, "keep_size"),
        (libc::FALLOC_FL_PUNCH_HOLE, "punch_hole"),
        (libc::FALLOC_FL_COLLAPSE_RANGE, "collapse_range"),
        (libc::FALLOC_FL_ZERO_RANGE, "zero_range"),
        (libc::FALLOC_FL_INSERT_RANGE, "insert_range"),
        (libc::FALLOC_FL_UNSHARE_RANGE, "unshare_range"),
    ];
    let names: Vec<(u32, &str)> = names.iter().map(|(b, n)| (*b as u32, *n)).collect();
    flag_names(mode as u32, &names, "allocate")
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("bad checksum in segment {0} at offset {1}")]
    struct Corrupt(&'static str, u64);

    const T0: i64 = 1_700_000_000_123_456_789;

    fn attr() -> Attr {
        Attr {
            mode: libc::S_IFREG | 0o4755,
            uid: 1000,
            gid: 100,
            mtime: Ts {
                sec: 1_700_000_000,
                nsec: 5,
            },
        }
    }

    fn log() -> Vec<Result<Record, Corrupt>> {
        let pm = Ts {
            sec: 1_700_000_000,
            nsec: 0,
        };
        let ops = vec![
            Op::Create {
                path: b"dir/a b".to_vec(),
                kind: NodeKind::File,
                rdev: 0,
                attr: attr(),
                parent_mtime: pm,
            },
            Op::Write {
                path: b"dir/a b".to_vec(),
                offset: 4096,
                data: Cow::Owned(vec![7; 10]),
                attr: attr(),
            },
            Op::Rename {
                from: b"x\n\xff".to_vec(),
                to: b"y".to_vec(),
                flags: libc::RENAME_NOREPLACE,
                from_parent_mtime: pm,
                to_parent_mtime: pm,
            },
            Op::Fallocate {
                path: b"f".to_vec(),
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset: 0,
                len: 8192,
                attr: attr(),
            },
            Op::SetXattr {
                path: vec![],
                name: b"user.k".to_vec(),
                value: Cow::Owned(b"abc".to_vec()),
            },
        ];
        ops.into_iter()
            .zip(1u64..)
            .map(|(op, lsn)| {
                Ok(Record {
                    lsn,
                    time_ns: T0 + lsn as i64,
                    op,
                })
            })
            .collect()
    }

    fn run(
        recs: Vec<Result<Record, Corrupt>>,
        from: Option<Lsn>,
        to: Option<Lsn>,
        json: bool,
    ) -> (anyhow::Result<u64>, String) {
        let mut out = Vec::new();
        let res = dump_records(recs, from, to, json, &mut out);
        (res, String::from_utf8(out).expect("utf8"))
    }

    #[test]
    fn table_shows_time_op_path_len_and_detail() {
        let (res, out) = run(log(), None, None, false);
        assert_eq!(res.expect("dump"), 5);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].contains("LSN") && lines[0].contains("TIME"),
            "{out}"
        );
        assert!(
            lines[1].contains("2023-11-14T22:13:20.123Z") && lines[1].contains("create"),
            "{out}"
        );
        assert!(
            lines[1].contains("dir/a b")
                && lines[1].contains("mode=0104755")
                && lines[1].contains("kind=file"),
            "{out}"
        );
        assert!(!lines[1].contains("parent_mtime"), "{out}");
        assert!(
            lines[2].contains(" 10 ") && lines[2].contains("offset=4096"),
            "{out}"
        );
        assert!(
            lines[3].contains("x\\n\\xff") && lines[3].contains("to=y flags=noreplace"),
            "{out}"
        );
        assert!(
            lines[4].contains("flags=keep_size|punch_hole") && lines[4].contains("length=8192"),
            "{out}"
        );
        assert!(
            lines[5].contains("setxattr")
                && lines[5].contains(" . ")
                && lines[5].contains("name=user.k"),
            "{out}"
        );
    }

    #[test]
    fn json_lines_carry_the_documented_fields() {
        let (res, out) = run(log(), Some(2), Some(3), true);
        assert_eq!(res.expect("dump"), 2);
        let objs: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(objs[0]["lsn"], 2);
        assert_eq!(objs[0]["time"], "2023-11-14T22:13:20.123456791Z");
        assert_eq!(objs[0]["time_ns"], T0 + 2);
        assert_eq!(
            (&objs[0]["op"], &objs[0]["path"], &objs[0]["len"]),
            (&json!("write"), &json!("dir/a b"), &json!(10))
        );
        assert_eq!(
            (&objs[0]["offset"], &objs[0]["mode"], &objs[0]["uid"]),
            (&json!(4096), &json!("0104755"), &json!(1000))
        );
        assert_eq!(objs[0]["mtime"], "2023-11-14T22:13:20.000000005Z");
        assert_eq!(
            (&objs[1]["op"], &objs[1]["to"], &objs[1]["len"]),
            (&json!("rename"), &json!("y"), &json!(0))
        );
        assert!(objs[1]["from_parent_mtime"].is_string());
    }

    #[test]
    fn corrupt_log_prints_what_is_readable_then_fails() {
        let mut recs = log();
        recs.truncate(2);
        recs.push(Err(Corrupt("0000000000000001.wal", 8192)));
        let (res, out) = run(recs, None, None, true);
        assert_eq!(out.lines().count(), 2);
        let msg = format!("{:#}", res.expect_err("corrupt"));
        assert!(
            msg.contains("after LSN 2") && msg.contains("0000000000000001.wal at offset 8192"),
            "{msg}"
        );
    }
}
