//! Apply-engine tests: a record sequence rebuilds the expected tree, and
//! re-applying any record is harmless.

use std::borrow::Cow;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{Applier, ApplyError, Failure};
use crate::tools::treecmp::{compare_trees, data_map, user_xattrs};
use crate::wal::{Attr, NodeKind, Op, Record, Ts};

pub(super) fn ts(sec: i64, nsec: u32) -> Ts {
    Ts { sec, nsec }
}

pub(super) fn attr(mode: u32, (uid, gid): (u32, u32), mtime: Ts) -> Attr {
    Attr {
        mode,
        uid,
        gid,
        mtime,
    }
}

pub(super) fn p(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Owners to give created nodes: other users when running as root, else us.
pub(super) fn owners() -> ((u32, u32), (u32, u32)) {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if uid == 0 {
        ((1001, 1002), (2001, 2002))
    } else {
        ((uid, gid), (uid, gid))
    }
}

pub(super) fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Numbers the ops as records from LSN 1.
pub(super) fn records(ops: Vec<Op<'static>>) -> Vec<Record> {
    let base = 1_700_000_000_000_000_000i64;
    ops.into_iter()
        .zip(1u64..)
        .map(|(op, lsn)| Record {
            lsn,
            time_ns: base + lsn as i64 * 1000,
            op,
        })
        .collect()
}

pub(super) fn apply_one(dir: &Path, op: Op<'static>) -> Result<(), ApplyError> {
    Applier::open(dir)?.apply(&Record {
        lsn: 7,
        time_ns: 0,
        op,
    })
}

pub(super) fn reg(mode: u32) -> u32 {
    libc::S_IFREG | mode
}

pub(super) fn dir(mode: u32) -> u32 {
    libc::S_IFDIR | mode
}

fn mtime_of(path: &Path) -> Ts {
    let m = fs::symlink_metadata(path).expect("stat");
    ts(m.mtime(), m.mtime_nsec() as u32)
}

fn write(path: &str, offset: u64, data: &[u8], a: Attr) -> Op<'static> {
    Op::Write {
        path: p(path),
        offset,
        data: Cow::Owned(data.to_vec()),
        attr: a,
    }
}

fn create(path: &str, kind: NodeKind, a: Attr, pm: Ts) -> Op<'static> {
    Op::Create {
        path: p(path),
        kind,
        rdev: 0,
        attr: a,
        parent_mtime: pm,
    }
}

/// A sequence touching every kind of record except devices and exchange.
fn sequence() -> Vec<Record> {
    let (o, o2) = owners();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    records(vec![
        create(
            "d",
            NodeKind::Dir,
            attr(dir(0o755), o, ts(100, 1)),
            ts(100, 2),
        ),
        create(
            "d/f",
            NodeKind::File,
            attr(reg(0o640), o, ts(101, 3)),
            ts(101, 4),
        ),
        write("d/f", 0, b"hello world", attr(reg(0o640), o, ts(102, 5))),
        write("d/f", 20, b"!", attr(reg(0o640), o, ts(103, 6))),
        Op::Symlink {
            path: p("d/s"),
            target: p("f"),
            attr: attr(libc::S_IFLNK | 0o777, o, ts(104, 7)),
            parent_mtime: ts(104, 8),
        },
        Op::Link {
            existing: p("d/f"),
            path: p("d/h"),
            parent_mtime: ts(105, 9),
        },
        Op::SetXattr {
            path: p("d/f"),
            name: p("user.k"),
            value: Cow::Owned(b"v\0bin".to_vec()),
        },
        Op::SetXattr {
            path: p("d"),
            name: p("user.dk"),
            value: Cow::Owned(b"dv".to_vec()),
        },
        create(
            "d/p",
            NodeKind::Fifo,
            attr(libc::S_IFIFO | 0o600, o, ts(106, 1)),
            ts(106, 2),
        ),
        create(
            "sparse",
            NodeKind::File,
            attr(reg(0o600), o, ts(107, 0)),
            ts(107, 1),
        ),
        write(
            "sparse",
            0,
            &[b'a'; 1 << 17],
            attr(reg(0o600), o, ts(107, 2)),
        ),
        Op::Fallocate {
            path: p("sparse"),
            mode: punch,
            offset: 0,
            len: 1 << 16,
            attr: attr(reg(0o600), o, ts(108, 0)),
        },
        Op::SetAttr {
            path: p("d/f"),
            attr: attr(reg(0o6755), o2, ts(109, 5)),
            atime: Some(ts(50, 0)),
        },
        create(
            "e",
            NodeKind::Dir,
            attr(dir(0o700), o, ts(110, 0)),
            ts(110, 1),
        ),
        Op::Rename {
            from: p("d/h"),
            to: p("e/h2"),
            flags: 0,
            from_parent_mtime: ts(111, 1),
            to_parent_mtime: ts(111, 2),
        },
        Op::Remove {
            path: p("d/p"),
            dir: false,
            parent_mtime: ts(112, 0),
        },
        Op::RemoveXattr {
            path: p("d"),
            name: p("user.dk"),
        },
        Op::Truncate {
            path: p("d/f"),
            size: 5,
            attr: attr(reg(0o6755), o2, ts(113, 0)),
        },
        Op::Resync {
            path: p("e"),
            reason: "test".into(),
        },
        create(
            "d/gone",
            NodeKind::Dir,
            attr(dir(0o755), o, ts(114, 0)),
            ts(114, 1),
        ),
        Op::Remove {
            path: p("d/gone"),
            dir: true,
            parent_mtime: ts(115, 0),
        },
        Op::SetAttr {
            path: vec![],
            attr: attr(dir(0o750), o, ts(200, 0)),
            atime: None,
        },
        Op::SetXattr {
            path: vec![],
            name: p("user.root"),
            value: Cow::Owned(b"r".to_vec()),
        },
    ])
}

#[test]
fn sequence_builds_the_expected_tree() {
    let (o, o2) = owners();
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let mut applier = Applier::open(root).expect("open");
    for rec in sequence() {
        applier.apply(&rec).unwrap_or_else(|e| panic!("{e}"));
    }
    let f = fs::symlink_metadata(root.join("d/f")).expect("d/f");
    assert_eq!(fs::read(root.join("d/f")).expect("read"), b"hello");
    assert_eq!((f.mode(), f.uid(), f.gid()), (reg(0o6755), o2.0, o2.1));
    assert_eq!(mtime_of(&root.join("d/f")), ts(113, 0));
    assert_eq!((f.atime(), f.atime_nsec()), (50, 0));
    assert_eq!(
        user_xattrs(&root.join("d/f"))
            .expect("xattrs")
            .get("user.k")
            .map(Vec::as_slice),
        Some(&b"v\0bin"[..])
    );
    assert!(user_xattrs(&root.join("d")).expect("xattrs").is_empty());
    assert_eq!(
        user_xattrs(root)
            .expect("xattrs")
            .get("user.root")
            .map(Vec::as_slice),
        Some(&b"r"[..])
    );

    let h2 = fs::symlink_metadata(root.join("e/h2")).expect("e/h2");
    assert_eq!((h2.ino(), h2.nlink()), (f.ino(), 2));
    let s = fs::symlink_metadata(root.join("d/s")).expect("d/s");
    assert!(s.file_type().is_symlink());
    assert_eq!(
        fs::read_link(root.join("d/s")).expect("readlink"),
        Path::new("f")
    );
    assert_eq!(
        (s.uid(), s.gid(), mtime_of(&root.join("d/s"))),
        (o.0, o.1, ts(104, 7))
    );
    assert!(!root.join("d/p").exists() && !root.join("d/gone").exists());

    let d = fs::symlink_metadata(root.join("d")).expect("d");
    assert_eq!(
        (d.mode(), mtime_of(&root.join("d"))),
        (dir(0o755), ts(115, 0))
    );
    assert_eq!(mtime_of(&root.join("e")), ts(111, 2));
    let r = fs::symlink_metadata(root).expect("root");
    assert_eq!(
        (r.mode(), r.uid(), mtime_of(root)),
        (dir(0o750), o.0, ts(200, 0))
    );

    let sparse = fs::File::open(root.join("sparse")).expect("sparse");
    assert_eq!(
        data_map(&sparse, 1 << 17).expect("map"),
        vec![(1 << 16, 1 << 17)]
    );
    let data = fs::read(root.join("sparse")).expect("read");
    assert!(data[..1 << 16].iter().all(|&b| b == 0) && data[1 << 16..].iter().all(|&b| b == b'a'));
}

#[test]
fn fifo_is_created_with_its_metadata() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (o, _) = owners();
    apply_one(
        tmp.path(),
        create(
            "p",
            NodeKind::Fifo,
            attr(libc::S_IFIFO | 0o640, o, ts(5, 6)),
            ts(7, 8),
        ),
    )
    .expect("fifo");
    let m = fs::symlink_metadata(tmp.path().join("p")).expect("stat");
    assert!(m.file_type().is_fifo());
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), mtime_of(&tmp.path().join("p"))),
        (0o640, o.0, ts(5, 6))
    );
    assert_eq!(mtime_of(tmp.path()), ts(7, 8));
}

#[test]
fn devices_are_created_when_root() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let rdev = libc::makedev(1, 3);
    let op = Op::Create {
        path: p("null"),
        kind: NodeKind::CharDev,
        rdev,
        attr: attr(libc::S_IFCHR | 0o600, (0, 0), ts(1, 0)),
        parent_mtime: ts(2, 0),
    };
    apply_one(tmp.path(), op.clone()).expect("mknod");
    apply_one(tmp.path(), op).expect("re-apply");
    let m = fs::symlink_metadata(tmp.path().join("null")).expect("stat");
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), rdev);
}

#[test]
fn reapplying_every_record_is_harmless() {
    let (once, twice) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let (mut a, mut b) = (
        Applier::open(once.path()).expect("a"),
        Applier::open(twice.path()).expect("b"),
    );
    for rec in sequence() {
        a.apply(&rec).expect("apply");
        b.apply(&rec).expect("apply");
        b.apply(&rec).unwrap_or_else(|e| panic!("re-apply: {e}"));
        let diffs = compare_trees(once.path(), twice.path()).expect("compare");
        assert!(diffs.is_empty(), "after LSN {}: {diffs:?}", rec.lsn);
    }
}

#[test]
fn recreate_keeps_existing_content_and_mismatched_kind_is_a_conflict() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (o, _) = owners();
    let mk = create("f", NodeKind::File, attr(reg(0o600), o, ts(1, 0)), ts(1, 1));
    apply_one(tmp.path(), mk.clone()).expect("create");
    apply_one(
        tmp.path(),
        write("f", 0, b"data", attr(reg(0o600), o, ts(2, 0))),
    )
    .expect("write");
    apply_one(tmp.path(), mk).expect("re-create");
    assert_eq!(fs::read(tmp.path().join("f")).expect("read"), b"data");
    let err = apply_one(
        tmp.path(),
        create("f", NodeKind::Dir, attr(dir(0o700), o, ts(1, 0)), ts(1, 1)),
    )
    .expect_err("kind");
    assert!(
        matches!(
            err,
            ApplyError::Record {
                failure: Failure::Conflict(_),
                ..
            }
        ),
        "{err}"
    );
    let other = Op::Symlink {
        path: p("f"),
        target: p("x"),
        attr: attr(libc::S_IFLNK | 0o777, o, ts(1, 0)),
        parent_mtime: ts(1, 0),
    };
    assert!(apply_one(tmp.path(), other).is_err());
}

#[test]
fn rename_noreplace_and_exchange() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (o, _) = owners();
    let rename = |from: &str, to: &str, flags: u32| Op::Rename {
        from: p(from),
        to: p(to),
        flags,
        from_parent_mtime: ts(30, 1),
        to_parent_mtime: ts(30, 2),
    };
    for op in [
        create("a", NodeKind::File, attr(reg(0o644), o, ts(1, 0)), ts(1, 1)),
        write("a", 0, b"A", attr(reg(0o644), o, ts(2, 0))),
        create("b", NodeKind::File, attr(reg(0o644), o, ts(1, 0)), ts(1, 1)),
        write("b", 0, b"B", attr(reg(0o644), o, ts(2, 0))),
        create("x", NodeKind::Dir, attr(dir(0o755), o, ts(1, 0)), ts(1, 1)),
        rename("a", "x/a", libc::RENAME_NOREPLACE),
        rename("a", "x/a", libc::RENAME_NOREPLACE),
    ] {
        apply_one(root, op).unwrap_or_else(|e| panic!("{e}"));
    }
    let err = apply_one(root, rename("x/a", "b", libc::RENAME_NOREPLACE)).expect_err("noreplace");
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "{err}");
    assert_eq!(fs::read(root.join("x/a")).expect("x/a"), b"A");
    apply_one(root, rename("x/a", "b", libc::RENAME_EXCHANGE)).expect("exchange");
    assert_eq!(fs::read(root.join("x/a")).expect("x/a"), b"B");
    assert_eq!(fs::read(root.join("b")).expect("b"), b"A");
    assert_eq!(
        (mtime_of(&root.join("x")), mtime_of(root)),
        (ts(30, 1), ts(30, 2))
    );
    let err = apply_one(root, rename("x/a", "b", libc::RENAME_WHITEOUT)).expect_err("whiteout");
    assert!(
        matches!(
            err,
            ApplyError::Record {
                failure: Failure::Unsafe(_),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn link_reapply_checks_the_inode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (o, _) = owners();
    for name in ["a", "b"] {
        apply_one(
            tmp.path(),
            create(
                name,
                NodeKind::File,
                attr(reg(0o644), o, ts(1, 0)),
                ts(1, 1),
            ),
        )
        .expect("create");
    }
    let link = Op::Link {
        existing: p("a"),
        path: p("b"),
        parent_mtime: ts(3, 0),
    };
    let err = apply_one(tmp.path(), link).expect_err("different inode");
    assert!(
        matches!(
            err,
            ApplyError::Record {
                failure: Failure::Conflict(_),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn errors_name_lsn_op_path_and_os_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (o, _) = owners();
    let err = apply_one(
        tmp.path(),
        write("missing/f", 0, b"x", attr(reg(0o644), o, ts(1, 0))),
    )
    .expect_err("missing");
    let msg = err.to_string();
    assert!(
        msg.contains("LSN 7") && msg.contains("write") && msg.contains("missing/f"),
        "{msg}"
    );
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    let root_err = Applier::open(&tmp.path().join("nope")).expect_err("no root");
    assert!(root_err.to_string().contains("nope"), "{root_err}");
}
