//! Containment tests: no record, however hostile, changes anything outside
//! the root, even through symlinks planted in the tree.

use std::borrow::Cow;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::tests::{apply_one, attr, is_root, owners, p, reg, ts};
use super::{ApplyError, Failure};
use crate::tools::treecmp::compare_trees;
use crate::wal::{NodeKind, Op};

/// Every record kind aimed at `path` (and, for two-path records, from/to it).
fn hostile_ops(path: &str) -> Vec<Op<'static>> {
    let (o, _) = owners();
    let a = attr(reg(0o777), o, ts(1, 0));
    let pm = ts(1, 0);
    vec![
        Op::Create {
            path: p(path),
            kind: NodeKind::File,
            rdev: 0,
            attr: a,
            parent_mtime: pm,
        },
        Op::Create {
            path: p(path),
            kind: NodeKind::Dir,
            rdev: 0,
            attr: attr(libc::S_IFDIR | 0o777, o, pm),
            parent_mtime: pm,
        },
        Op::Symlink {
            path: p(path),
            target: p("/etc"),
            attr: a,
            parent_mtime: pm,
        },
        Op::Link {
            existing: p(path),
            path: p("in"),
            parent_mtime: pm,
        },
        Op::Link {
            existing: p("in"),
            path: p(path),
            parent_mtime: pm,
        },
        Op::Remove {
            path: p(path),
            dir: false,
            parent_mtime: pm,
        },
        Op::Remove {
            path: p(path),
            dir: true,
            parent_mtime: pm,
        },
        Op::Rename {
            from: p(path),
            to: p("in2"),
            flags: 0,
            from_parent_mtime: pm,
            to_parent_mtime: pm,
        },
        Op::Rename {
            from: p("in"),
            to: p(path),
            flags: 0,
            from_parent_mtime: pm,
            to_parent_mtime: pm,
        },
        Op::Write {
            path: p(path),
            offset: 0,
            data: Cow::Owned(b"pwned".to_vec()),
            attr: a,
        },
        Op::Truncate {
            path: p(path),
            size: 0,
            attr: a,
        },
        Op::Fallocate {
            path: p(path),
            mode: 0,
            offset: 0,
            len: 4096,
            attr: a,
        },
        Op::SetAttr {
            path: p(path),
            attr: a,
            atime: Some(pm),
        },
        Op::SetAttr {
            path: p(path),
            attr: attr(libc::S_IFLNK | 0o777, o, pm),
            atime: Some(pm),
        },
        Op::SetAttr {
            path: p(path),
            attr: attr(libc::S_IFDIR | 0o777, (0, 0), pm),
            atime: None,
        },
        Op::SetXattr {
            path: p(path),
            name: p("user.pwned"),
            value: Cow::Owned(b"1".to_vec()),
        },
        Op::RemoveXattr {
            path: p(path),
            name: p("user.keep"),
        },
    ]
}

/// A playground: `outside/` with a file and an xattr, and `root/` holding
/// `in` (a file) and symlinks planted towards `outside`.
struct Rig {
    _tmp: tempfile::TempDir,
    outside: std::path::PathBuf,
    pristine: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (outside, pristine, root) = (
            tmp.path().join("outside"),
            tmp.path().join("pristine"),
            tmp.path().join("root"),
        );
        for dir in [&outside, &pristine] {
            fs::create_dir(dir).expect("mkdir");
            fs::write(dir.join("secret"), b"secret").expect("write");
            fs::create_dir(dir.join("x")).expect("mkdir");
            xattr(&dir.join("secret"));
        }
        fs::create_dir(&root).expect("mkdir");
        fs::write(root.join("in"), b"inside").expect("write");
        symlink(&outside, root.join("evil")).expect("symlink");
        symlink(outside.join("secret"), root.join("evilf")).expect("symlink");
        symlink("../outside", root.join("rel")).expect("symlink");
        let rig = Rig {
            _tmp: tmp,
            outside,
            pristine,
            root,
        };
        rig.sync_times();
        rig
    }

    /// Gives `pristine` the same times as `outside`, so the two compare equal.
    fn sync_times(&self) {
        for rel in ["secret", "x", ""] {
            let m = fs::metadata(self.outside.join(rel)).expect("stat");
            let f = fs::File::open(self.pristine.join(rel)).expect("open");
            f.set_modified(m.modified().expect("mtime"))
                .expect("set mtime");
        }
    }

    fn assert_outside_untouched(&self) {
        let diffs = compare_trees(&self.outside, &self.pristine).expect("compare");
        assert!(diffs.is_empty(), "outside changed: {diffs:?}");
        let mut names: Vec<_> = fs::read_dir(self.outside.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["outside", "pristine", "root"]);
    }
}

fn xattr(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("cstring");
    // SAFETY: valid C strings and value buffer.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"user.keep".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn assert_unsafe(res: Result<(), ApplyError>, what: &str) {
    match res {
        Err(ApplyError::Record {
            failure: Failure::Unsafe(_),
            ..
        }) => {}
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn malformed_paths_are_refused() {
    let rig = Rig::new();
    for bad in [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "..",
        ".",
        "./in",
        "a/./b",
        "a//b",
        "in/",
        "/",
        "x\0y",
        "../outside/secret",
    ] {
        for op in hostile_ops(bad) {
            assert_unsafe(apply_one(&rig.root, op), bad);
        }
    }
    rig.assert_outside_untouched();
    assert_eq!(fs::read(rig.root.join("in")).expect("in"), b"inside");
}

#[test]
fn paths_through_planted_symlinks_are_refused() {
    let rig = Rig::new();
    for bad in [
        "evil/secret",
        "evil/new",
        "evil/x/y",
        "rel/secret",
        "evilf/x",
    ] {
        for op in hostile_ops(bad) {
            let name = format!("{bad}: {op:?}");
            let res = apply_one(&rig.root, op);
            assert!(res.is_err(), "{name} succeeded");
        }
    }
    rig.assert_outside_untouched();
}

#[test]
fn planted_symlink_as_final_component_is_never_followed() {
    let rig = Rig::new();
    for name in ["evil", "evilf", "rel"] {
        for op in hostile_ops(name) {
            // Some of these legitimately act on the link itself (remove,
            // rename, chown of the link); none may reach its target.
            let _ = apply_one(&rig.root, op);
        }
        rig.assert_outside_untouched();
    }
}

#[test]
fn data_records_never_open_fifos_or_devices() {
    let rig = Rig::new();
    let fifo = std::ffi::CString::new(rig.root.join("fifo").as_os_str().as_encoded_bytes())
        .expect("cstring");
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let (o, _) = owners();
    let write = |path: &str| Op::Write {
        path: p(path),
        offset: 0,
        data: Cow::Owned(b"x".to_vec()),
        attr: attr(reg(0o600), o, ts(1, 0)),
    };
    let err = apply_one(&rig.root, write("fifo")).expect_err("fifo");
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
    if is_root() {
        let null = Op::Create {
            path: p("null"),
            kind: NodeKind::CharDev,
            rdev: libc::makedev(1, 2),
            attr: attr(libc::S_IFCHR | 0o666, o, ts(1, 0)),
            parent_mtime: ts(1, 0),
        };
        apply_one(&rig.root, null).expect("mknod");
        let err = apply_one(&rig.root, write("null")).expect_err("device");
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
}

#[test]
fn symlinks_inside_the_root_are_not_traversed_either() {
    let rig = Rig::new();
    fs::create_dir(rig.root.join("sub")).expect("mkdir");
    symlink("sub", rig.root.join("lnk")).expect("symlink");
    for op in hostile_ops("lnk/f") {
        assert_unsafe(apply_one(&rig.root, op), "lnk/f");
    }
    assert_eq!(fs::read_dir(rig.root.join("sub")).expect("list").count(), 0);
}
