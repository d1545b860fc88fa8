//! Excludes end to end: a real mount with `exclude = [...]` ships to a real
//! `replfs mirror`; excluded paths are served but never logged, and changes
//! crossing the edge (renames and links in and out, exchanges, directories
//! whose entries change status) leave the mirror equal to BACKING minus the
//! excluded paths, content and metadata (DESIGN.md invariants 1, 2 and 4).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::workload::{pattern, renameat2, set_times, setxattr};
use common::*;
use replfs::exclude::Excludes;

const CONVERGE: Duration = Duration::from_secs(60);
const PATTERNS: [&str; 2] = ["*.tmp", "cache/**"];

fn config(patterns: &[&str]) -> String {
    let list: Vec<String> = patterns.iter().map(|p| format!("{p:?}")).collect();
    format!("exclude = [{}]\n", list.join(", "))
}

fn excludes(patterns: &[&str]) -> Excludes {
    Excludes::new(&patterns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

impl Pair {
    fn mount(&self, patterns: &[&str]) -> Mount {
        let args = [
            "--mirror".to_string(),
            self.mirror.addr(),
            "--key-file".into(),
            self.key.to_string_lossy().into(),
        ];
        let r = &self.rig;
        Mount::start_full(
            &r.backing,
            &r.mnt,
            &r.state,
            Some(&config(patterns)),
            &[],
            &args,
        )
    }
}

/// Every path below `root` (relative, `/`-separated), the root excluded.
fn all_paths(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r.to_string_lossy().into_owned());
        }
    }
    out
}

/// What the mirror must hold: a `cp -a` copy of BACKING without the
/// excluded paths, directory mtimes put back as BACKING has them.
fn expected_tree(backing: &Path, to: &Path, ex: &Excludes) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(backing)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a");
    let mut gone: Vec<String> = all_paths(to)
        .into_iter()
        .filter(|p| ex.is_excluded(p.as_bytes()))
        .collect();
    gone.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in &gone {
        let p = to.join(p);
        if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&p).unwrap();
        } else if p.symlink_metadata().is_ok() {
            fs::remove_file(&p).unwrap();
        }
    }
    // Removing entries moved the mtimes of their directories.
    let mut dirs = vec![String::new()];
    dirs.extend(
        all_paths(to)
            .into_iter()
            .filter(|p| to.join(p).symlink_metadata().unwrap().is_dir()),
    );
    for d in dirs {
        let st = std::process::Command::new("touch")
            .arg("-h")
            .arg("-r")
            .arg(backing.join(&d))
            .arg(to.join(&d))
            .status()
            .unwrap();
        assert!(st.success());
    }
}

fn assert_nothing_excluded(dir: &Path, ex: &Excludes) {
    let bad: Vec<String> = all_paths(dir)
        .into_iter()
        .filter(|p| ex.is_excluded(p.as_bytes()))
        .collect();
    assert!(
        bad.is_empty(),
        "excluded paths in {}: {bad:?}",
        dir.display()
    );
}

/// The workload: excluded and included files side by side, then every kind
/// of change across the edge.
fn workload(m: &Path) {
    sh(
        m,
        "mkdir -p d/e cache/x/sub cache/x/skip.tmp stash/keep
         printf 'one' > d/f1.txt; printf scratch > d/scratch.tmp; printf t > d/e/t.tmp
         head -c 300000 /dev/urandom > a.tmp
         printf 'bee' > b.txt
         printf k > cache/x/keep.dat; ln cache/x/keep.dat cache/x/hard.dat
         ln -s keep.dat cache/x/link; mkfifo cache/x/sub/fifo
         truncate -s 3M cache/x/sub/sparse.bin
         printf middle | dd of=cache/x/sub/sparse.bin bs=1 seek=1500000 conv=notrunc status=none
         head -c 2500000 /dev/urandom > cache/x/sub/big.bin
         printf j > cache/x/junk.tmp; printf s > cache/x/skip.tmp/in
         chmod 0640 cache/x/keep.dat; chmod 0750 cache/x/sub; chown 12:34 cache/x/sub/big.bin
         for i in 1 2 3; do printf $i >> d/scratch.tmp; printf $i >> cache/log; done
         mv d/scratch.tmp d/scratch2.tmp; rm d/e/t.tmp
         mkdir cache/gone; printf g > cache/gone/g; rm -r cache/gone
         printf stash > stash/keep/s; printf t > stash/keep/x.tmp
         fallocate -l 1M cache/fa.bin; fallocate -l 64K fa.txt; fallocate -p -o 4096 -l 4096 fa.txt
         truncate -s 10 d/trunc.tmp; truncate -s 5000 cache/x/keep.dat
         python3 -c '
import os
a = os.open(\"d/f1.txt\", os.O_RDONLY)
b = os.open(\"cache/cfr.bin\", os.O_WRONLY | os.O_CREAT, 0o644)
c = os.open(\"cfr_in.txt\", os.O_WRONLY | os.O_CREAT, 0o644)
x = os.open(\"cache/x/sub/big.bin\", os.O_RDONLY)
assert os.copy_file_range(a, b, 3) == 3
assert os.copy_file_range(x, c, 70000, 1000, 0) == 70000
'",
    );
    setxattr(&m.join("cache/x/keep.dat"), "user.k", b"v");
    setxattr(&m.join("a.tmp"), "user.t", b"tmp");
    setxattr(&m.join("a.tmp"), "user.gone", b"x");
    common::workload::removexattr(&m.join("a.tmp"), "user.gone");
    set_times(&m.join("cache/log"), (1, 0), (1_600_000_000, 5), false);
    fs::write(m.join("a.tmp"), pattern(1_300_000, 5)).unwrap();
    // Out of the excluded area: content appears on the mirror.
    fs::rename(m.join("a.tmp"), m.join("a.txt")).unwrap();
    fs::rename(m.join("cache/x"), m.join("y")).unwrap();
    // Into it: gone from the mirror.
    fs::rename(m.join("b.txt"), m.join("b.tmp")).unwrap();
    fs::rename(m.join("stash"), m.join("cache/stash")).unwrap();
    // A link from an excluded name, then writes through either name.
    fs::write(m.join("cache/l1.bin"), pattern(5000, 1)).unwrap();
    fs::hard_link(m.join("cache/l1.bin"), m.join("l1.txt")).unwrap();
    fs::write(m.join("cache/l1.bin"), pattern(7000, 2)).unwrap();
    fs::hard_link(m.join("d/f1.txt"), m.join("f1.tmp")).unwrap();
    // Exchanges with one side excluded: a file, then directories.
    fs::write(m.join("cache/swap"), b"was excluded").unwrap();
    fs::write(m.join("swapme.txt"), b"was included").unwrap();
    renameat2(
        &m.join("cache/swap"),
        &m.join("swapme.txt"),
        libc::RENAME_EXCHANGE,
    )
    .unwrap();
    sh(
        m,
        "mkdir -p xd/in cache/xd2/in2; printf 1 > xd/in/f; printf 2 > cache/xd2/in2/g
         printf 3 > cache/xd2/h.tmp",
    );
    renameat2(&m.join("xd"), &m.join("cache/xd2"), libc::RENAME_EXCHANGE).unwrap();
    // An included directory renamed to an included name where its entries
    // change status (cache/** excludes what is below `cache`, not `cache`).
    sh(
        m,
        "mv cache cache_old; mkdir newc; printf n > newc/f; mkdir newc/sub
         mv newc cache; touch -d '2021-05-06 07:08:09' y/keep.dat",
    );
}

#[test]
fn excluded_paths_stay_local_and_the_rest_converges() {
    let p = Pair::new(3);
    let ex = excludes(&PATTERNS);
    let m = p.mount(&PATTERNS);
    workload(&p.rig.mnt);
    // Reads through the mount see everything, excluded or not.
    assert_eq!(fs::read(p.rig.mnt.join("b.tmp")).unwrap(), b"bee");
    assert_eq!(fs::read(p.rig.mnt.join("cache/f")).unwrap(), b"n");
    let expected = p.rig.path("expected");
    expected_tree(&p.rig.backing, &expected, &ex);
    for must in [
        "a.txt",
        "y/keep.dat",
        "y/sub/big.bin",
        "y/sub/fifo",
        "l1.txt",
        "swapme.txt",
        "cfr_in.txt",
        "fa.txt",
        "xd/in2/g",
        "cache_old/xd2/in/f",
        "cache_old/log",
        "cache",
    ] {
        assert!(
            expected.join(must).exists(),
            "{must} expected on the mirror"
        );
    }
    wait_converged(&expected, &p.mirror.dir, CONVERGE);
    assert_nothing_excluded(&p.mirror.dir, &ex);
    assert_eq!(
        fs::read(p.mirror.dir.join("l1.txt")).unwrap(),
        pattern(7000, 2)
    );
    assert_eq!(
        fs::read(p.mirror.dir.join("swapme.txt")).unwrap(),
        b"was excluded"
    );
    m.unmount();
    // The log alone rebuilds the same tree, and never names an excluded path.
    let replayed = p.rig.replay("replayed", &[]);
    assert_same_tree(&expected, &replayed);
    let mut records = 0;
    for rec in p.rig.dump() {
        for key in ["path", "existing", "to"] {
            if let Some(path) = rec[key].as_str() {
                assert!(
                    !ex.is_excluded(path.as_bytes()),
                    "record names {path}: {rec}"
                );
            }
        }
        records += 1;
    }
    assert!(records > 20);
}

#[test]
fn a_changed_exclude_list_records_the_whole_tree_for_resync() {
    // No mirror: nothing ships, so nothing serves (and clears) the row.
    let rig = Rig::new();
    let catalog = || replfs::catalog::Catalog::open(&rig.state).unwrap();
    let m = rig.mount(Some(&config(&PATTERNS)));
    fs::write(rig.mnt.join("a.log"), b"log").unwrap();
    m.unmount();
    let c = catalog();
    assert_eq!(
        c.get("exclude.fingerprint").unwrap().as_deref(),
        Some("*.tmp\ncache/**")
    );
    assert!(
        c.resync_list().unwrap().is_empty(),
        "first mount: nothing to resync"
    );
    // Same list: nothing new.
    rig.mount(Some(&config(&PATTERNS))).unmount();
    assert!(catalog().resync_list().unwrap().is_empty());
    // Another list: the whole tree, once.
    let m = rig.mount(Some(&config(&["*.tmp", "cache/**", "*.log"])));
    fs::write(rig.mnt.join("b.log"), b"not logged").unwrap();
    m.unmount();
    let rows = catalog().resync_list().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].path, b"");
    assert_eq!(rows[0].reason, "exclude list changed");
    let dump = rig.dump();
    assert!(dump.iter().any(|r| r["path"] == "a.log"));
    assert!(
        !dump.iter().any(|r| r["path"] == "b.log"),
        "b.log is excluded now"
    );
    rig.mount(Some(&config(&["*.tmp", "cache/**", "*.log"])))
        .unmount();
    assert_eq!(catalog().resync_list().unwrap().len(), 1);
}

#[test]
fn an_excluded_change_in_flight_at_a_crash_logs_only_its_parent() {
    let rig = Rig::new();
    let cfg = config(&PATTERNS);
    fs::create_dir(rig.backing.join("cache")).unwrap();
    // Creating cache/victim logs cache's metadata: crash right before that.
    let m = Mount::start_env(
        &rig.backing,
        &rig.mnt,
        &rig.state,
        Some(&cfg),
        &[("REPLFS_FAILPOINT", "crash-before-log:cache")],
    );
    fs::write(rig.mnt.join("d.txt"), b"logged").unwrap();
    assert!(fs::write(rig.mnt.join("cache/victim"), b"x").is_err());
    m.wait_crashed();
    assert!(rig.backing.join("cache/victim").exists());
    rig.mount(Some(&cfg)).unmount();
    let recs = rig.dump();
    assert!(!recs.iter().any(|r| r["op"] == "resync"), "{recs:?}");
    let last = recs.iter().rev().find(|r| r["path"] == "cache").unwrap();
    assert_eq!(last["op"], "setattr");
    let st = fs::metadata(rig.backing.join("cache")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        last["mtime"].as_str().unwrap(),
        humantime::format_rfc3339_nanos(
            std::time::UNIX_EPOCH + Duration::new(st.mtime() as u64, st.mtime_nsec() as u32)
        )
        .to_string(),
        "cache's metadata as BACKING has it after the crash"
    );
}
