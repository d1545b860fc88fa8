//! Sync and verify against an in-process mirror: every message goes through
//! the wire codec, the mirror side is the real apply engine and `serve`.

use std::collections::VecDeque;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use super::delta::{Report, SyncArgs, sync};
use super::*;
use crate::apply::Applier;
use crate::exclude::Excludes;
use crate::tools::treecmp::compare_trees;

/// The mirror end of a conversation, in process.
struct LocalMirror {
    applier: Applier,
    replies: VecDeque<Msg>,
    wire: u64,
}

impl LocalMirror {
    fn new(dir: &Path) -> Self {
        LocalMirror {
            applier: Applier::open(dir).unwrap(),
            replies: VecDeque::new(),
            wire: 0,
        }
    }
}

impl Peer for LocalMirror {
    fn send(&mut self, m: &Msg) -> Result<u64> {
        let frame = crate::proto::encode_msg(m)?;
        let m = crate::proto::read_msg(&mut frame.as_slice())?;
        self.wire += frame.len() as u64;
        match m {
            Msg::ManifestReq { path, hashes } => {
                let replies = &mut self.replies;
                serve::manifest(self.applier.root(), &path, hashes, &mut |m| {
                    replies.push_back(m);
                    Ok(())
                })?;
            }
            Msg::SumsReq { path, block } => {
                let r = serve::sums(self.applier.root(), &path, block)?;
                self.replies.push_back(r);
            }
            Msg::SyncOps(b) => {
                for r in &b.records {
                    self.applier.apply_op(&r.op)?;
                }
            }
            Msg::SyncEnd { token, .. } => self.replies.push_back(Msg::SyncDone { token }),
            other => bail!("unexpected {}", other.name()),
        }
        Ok(frame.len() as u64)
    }

    fn recv(&mut self) -> Result<Msg> {
        let m = self.replies.pop_front().context("no reply")?;
        // Through the codec as well.
        let frame = crate::proto::encode_msg(&m)?;
        Ok(crate::proto::read_msg(&mut frame.as_slice())?)
    }
}

struct Rig {
    _tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
    state: std::path::PathBuf,
}

fn rig() -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        tmp.path().join("src"),
        tmp.path().join("dst"),
        tmp.path().join("state"),
    );
    for d in [&src, &dst, &state] {
        fs::create_dir(d).unwrap();
    }
    Rig {
        _tmp: tmp,
        src,
        dst,
        state,
    }
}

/// Overwrites bytes at `offset` and puts the mtime back: a change only
/// checksums can see.
fn rewrite_keeping_mtime(p: &Path, offset: u64, bytes: &[u8]) {
    let mtime = fs::metadata(p).unwrap().modified().unwrap();
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.set_modified(mtime).unwrap();
}

fn run_sync(r: &Rig, ex: &Excludes, paths: &[&[u8]]) -> (Report, u64) {
    run_sync_with(r, ex, paths, false)
}

fn run_sync_with(r: &Rig, ex: &Excludes, paths: &[&[u8]], thorough: bool) -> (Report, u64) {
    let root = manifest::open_root(&r.src).unwrap();
    let progress = Progress::default();
    let args = SyncArgs {
        root: root.as_fd(),
        excludes: ex,
        spool_dir: &r.state,
        progress: &progress,
        thorough,
    };
    let mut peer = LocalMirror::new(&r.dst);
    let paths: Vec<Vec<u8>> = paths.iter().map(|p| p.to_vec()).collect();
    let (report, horizon) = sync(&mut peer, &args, &paths, 7, &|| 42).unwrap();
    assert_eq!(horizon, 42);
    let v = progress.view();
    assert_eq!(v.files_done, v.files_total, "{v:?}");
    assert_eq!(v.bytes_done, v.bytes_total, "{v:?}");
    (report, peer.wire)
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {}", std::io::Error::last_os_error());
}

fn populate(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::write(root.join("a/b/c/deep"), b"deep").unwrap();
    fs::write(root.join("a/f1"), vec![7u8; 300_000]).unwrap();
    fs::write(root.join("a.txt"), b"top").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("a/f1", root.join("link")).unwrap();
    fs::hard_link(root.join("a/f1"), root.join("hard")).unwrap();
    fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    set_xattr(&root.join("a.txt"), "user.k", b"v");
    // Sparse: 1 MiB hole then data.
    let f = fs::File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"tail", 1 << 20).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
}

fn same(r: &Rig) {
    let d = compare_trees(&r.src, &r.dst).unwrap();
    assert!(d.is_empty(), "trees differ: {d:#?}");
}

#[test]
fn an_empty_mirror_receives_everything() {
    let r = rig();
    populate(&r.src);
    let (rep, _) = run_sync(&r, &Excludes::default(), &[b""]);
    same(&r);
    assert!(rep.created >= 10, "{rep:?}");
    assert_eq!(rep.removed, 0);
    // The sparse file's hole was not sent.
    assert!(rep.data_bytes < 300_000 + 4 + 4 + 3 + 65536, "{rep:?}");
    // A second run finds nothing to do.
    let (rep, _) = run_sync(&r, &Excludes::default(), &[b""]);
    assert_eq!(
        (rep.created, rep.removed, rep.data_bytes, rep.delta_files),
        (0, 0, 0, 0)
    );
    assert_eq!(rep.ops, 0, "{rep:?}");
}

#[test]
fn a_mirror_holding_most_of_the_data_gets_only_the_differences() {
    let r = rig();
    populate(&r.src);
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(r.src.join("big"), &big).unwrap();
    run_sync(&r, &Excludes::default(), &[b""]);
    same(&r);
    // Change 10 bytes in the middle of big, shrink a file, replace a file by
    // a directory, add junk on the mirror.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(r.src.join("big"))
        .unwrap();
    f.write_all_at(b"0123456789", 2_000_000).unwrap();
    fs::write(r.src.join("a/f1"), vec![7u8; 1000]).unwrap();
    fs::remove_file(r.src.join("empty")).unwrap();
    fs::create_dir(r.src.join("empty")).unwrap();
    fs::write(r.src.join("empty/x"), b"x").unwrap();
    fs::create_dir_all(r.dst.join("junk/deeper")).unwrap();
    fs::write(r.dst.join("junk/deeper/j"), b"j").unwrap();
    fs::write(r.dst.join("zzz"), b"z").unwrap();
    let (rep, wire) = run_sync(&r, &Excludes::default(), &[b""]);
    same(&r);
    // big and a/f1 (hard-linked as `hard`: sent once) are compared by blocks.
    assert_eq!(rep.delta_files, 2, "{rep:?}");
    assert_eq!(rep.blocks_sent, 2, "{rep:?}");
    assert!(rep.removed >= 4, "{rep:?}");
    assert!(wire < 200_000, "sent {wire} bytes for a 10-byte change");
}

#[test]
fn excluded_paths_are_not_sent_and_are_removed_from_the_mirror() {
    let r = rig();
    populate(&r.src);
    fs::write(r.src.join("x.tmp"), b"t").unwrap();
    fs::create_dir(r.src.join("cache")).unwrap();
    fs::write(r.src.join("cache/c"), b"c").unwrap();
    fs::write(r.dst.join("old.tmp"), b"o").unwrap();
    let ex = Excludes::new(&["*.tmp".to_string(), "cache".to_string()]).unwrap();
    run_sync(&r, &ex, &[b""]);
    assert!(!r.dst.join("x.tmp").exists());
    assert!(!r.dst.join("cache").exists());
    assert!(!r.dst.join("old.tmp").exists());
    fs::remove_file(r.src.join("x.tmp")).unwrap();
    fs::remove_dir_all(r.src.join("cache")).unwrap();
    run_sync(&r, &ex, &[b""]);
    same(&r);
}

#[test]
fn a_partial_repair_creates_missing_ancestors_and_leaves_the_rest() {
    let r = rig();
    populate(&r.src);
    fs::write(r.dst.join("unrelated"), b"u").unwrap();
    let (rep, _) = run_sync(&r, &Excludes::default(), &[b"a/b/c/deep", b"a/b"]);
    assert_eq!(fs::read(r.dst.join("a/b/c/deep")).unwrap(), b"deep");
    assert!(
        r.dst.join("unrelated").exists(),
        "outside the repaired paths"
    );
    assert!(!r.dst.join("a/f1").exists(), "not below a repaired path");
    assert_eq!(rep.removed, 0);
    // A path gone from the source disappears from the mirror.
    fs::write(r.dst.join("a/b/stale"), b"s").unwrap();
    run_sync(&r, &Excludes::default(), &[b"a/b/stale"]);
    assert!(!r.dst.join("a/b/stale").exists());
}

#[test]
fn verify_finds_nothing_on_a_synced_pair_and_names_damage() {
    let r = rig();
    populate(&r.src);
    run_sync(&r, &Excludes::default(), &[b""]);
    let check = |r: &Rig| {
        let root = manifest::open_root(&r.src).unwrap();
        let mut peer = LocalMirror::new(&r.dst);
        let mut spool = Spool::fetch(&mut peer, b"", true, &r.state).unwrap();
        verify::compare(root.as_fd(), &Excludes::default(), &mut spool)
            .unwrap()
            .1
    };
    assert_eq!(check(&r), vec![]);
    // Same size, same mtime, different bytes: only hashes can tell.
    rewrite_keeping_mtime(&r.dst.join("a/b/c/deep"), 0, b"DEEP");
    fs::write(r.dst.join("extra"), b"e").unwrap();
    fs::remove_file(r.dst.join("a.txt")).unwrap();
    let d = check(&r);
    let got: Vec<(&str, &str)> = d.iter().map(|d| (d.what, d.path.as_str())).collect();
    assert!(got.contains(&("content", "a/b/c/deep")), "{d:#?}");
    assert!(got.contains(&("extra", "extra")), "{d:#?}");
    assert!(got.contains(&("missing", "a.txt")), "{d:#?}");
}

#[test]
fn a_thorough_repair_finds_bytes_that_size_and_mtime_hide() {
    let r = rig();
    populate(&r.src);
    run_sync(&r, &Excludes::default(), &[b""]);
    rewrite_keeping_mtime(&r.dst.join("a/f1"), 5000, b"zz");
    let (rep, _) = run_sync(&r, &Excludes::default(), &[b"a"]);
    assert_eq!(rep.delta_files, 0, "a quick check cannot see it");
    let (rep, _) = run_sync_with(&r, &Excludes::default(), &[b"a"], true);
    assert_eq!((rep.delta_files, rep.blocks_sent), (1, 1), "{rep:?}");
    same(&r);
}

#[test]
fn collapse_keeps_the_outermost_paths() {
    let v = collapse(vec![
        b"a/b".to_vec(),
        b"a".to_vec(),
        b"c".to_vec(),
        b"a.x".to_vec(),
    ]);
    assert_eq!(v, vec![b"a".to_vec(), b"a.x".to_vec(), b"c".to_vec()]);
    assert_eq!(
        collapse(vec![b"x".to_vec(), Vec::new()]),
        vec![Vec::<u8>::new()]
    );
}
