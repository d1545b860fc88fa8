//! End-to-end: a real FUSE mount, a realistic workload through it, and the
//! WAL replayed into an empty directory must equal BACKING byte for byte,
//! metadata included (DESIGN.md invariants 1 and 2).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};

use common::workload::{map_shared, mixed_workload, pattern};
use common::*;

fn prepare_root(rig: &Rig) {
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn mixed_workload_replays_to_identical_tree() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    mixed_workload(&rig.mnt);
    assert_same_tree(&rig.mnt, &rig.backing);
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
}

#[test]
fn dump_lists_every_record_in_lsn_order_as_json() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    fs::create_dir(rig.mnt.join("d")).unwrap();
    fs::write(rig.mnt.join("d/file"), vec![b'z'; 5000]).unwrap();
    fs::rename(rig.mnt.join("d/file"), rig.mnt.join("d/renamed")).unwrap();
    fs::remove_file(rig.mnt.join("d/renamed")).unwrap();
    m.unmount();
    let recs = rig.dump();
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(
            r["lsn"].as_u64(),
            Some(i as u64 + 1),
            "LSNs are contiguous from 1: {r}"
        );
        for k in ["time", "op", "path", "len"] {
            assert!(r.get(k).is_some(), "record lacks {k}: {r}");
        }
    }
    let ops: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| (r["op"].as_str().unwrap(), r["path"].as_str().unwrap()))
        .collect();
    let pos = |op: &str, path: &str| ops.iter().position(|&(o, p)| o == op && p == path);
    let mkdir = pos("create", "d")
        .or(pos("mkdir", "d"))
        .expect("mkdir logged");
    let write = pos("write", "d/file").expect("write logged");
    let rename = pos("rename", "d/file").expect("rename logged");
    let unlink = pos("unlink", "d/renamed")
        .or(pos("remove", "d/renamed"))
        .expect("unlink logged");
    assert!(
        mkdir < write && write < rename && rename < unlink,
        "{ops:?}"
    );
    let written: u64 = recs
        .iter()
        .filter(|r| r["op"] == "write")
        .map(|r| r["len"].as_u64().unwrap())
        .sum();
    assert_eq!(written, 5000);
    // The human table works too and shows the same number of records.
    let out = replfs(&["log", "dump", "--state", rig.state.to_str().unwrap()]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().count() >= recs.len(), "{table}");
    // --from / --to select a range.
    let out = replfs(&[
        "log",
        "dump",
        "--json",
        "--from",
        "2",
        "--to",
        "3",
        "--state",
        rig.state.to_str().unwrap(),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

#[test]
fn real_applications_through_the_mount() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    let mnt = rig.mnt.clone();
    // A source tree to work on, made outside the mount.
    let src = rig.path("src");
    fs::create_dir_all(src.join("lib/deep")).unwrap();
    for i in 0..40 {
        fs::write(
            src.join(format!("lib/file{i}.c")),
            format!("int f{i}(void) {{ return {i}; }}\n").repeat(50),
        )
        .unwrap();
    }
    fs::write(src.join("lib/deep/blob.bin"), pattern(300_000, 5)).unwrap();
    sh(
        &mnt,
        &format!(
            "tar -C {} -cf - . | tar -xf - && mkdir tree && tar -C {} -cf - . | tar -C tree -xpf -",
            src.display(),
            src.display()
        ),
    );
    sh(
        &mnt,
        "cp -a tree tree-copy && rm -r tree-copy/lib/deep && sed -i 's/return/yield/' tree-copy/lib/file1.c",
    );
    sh(
        &mnt,
        &format!(
            "rsync -a --delete {}/ mirror-by-rsync/ && rsync -a --delete tree/ mirror-by-rsync/",
            src.display()
        ),
    );
    sh(
        &mnt,
        "git init -q repo && cd repo && cp -r ../lib . && git add -A && \
              git -c user.email=t@example.invalid -c user.name=t commit -qm first && \
              echo change >> lib/file3.c && git -c user.email=t@example.invalid -c user.name=t commit -qam second && \
              git gc -q && git fsck --no-progress",
    );
    sh(
        &mnt,
        "sqlite3 db.sqlite 'create table t(k integer primary key, v text); \
              with recursive n(i) as (select 1 union all select i+1 from n where i < 2000) insert into t(v) select printf(\"row %d\", i) from n; \
              update t set v = v || \"!\" where k % 3 = 0; delete from t where k % 5 = 0; vacuum;' && \
              test \"$(sqlite3 db.sqlite 'select count(*) from t')\" = 1600",
    );
    sh(
        &mnt,
        "find . -type f -name '*.c' | xargs cat > all.txt && test -s all.txt && rm -rf tree/lib/deep",
    );
    assert_same_tree(&mnt, &rig.backing);
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
}

#[test]
fn concurrent_writers_log_a_valid_serialization() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    fs::write(rig.mnt.join("shared"), vec![0u8; 1 << 20]).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let mnt = rig.mnt.clone();
            s.spawn(move || {
                let dir = mnt.join(format!("t{t}"));
                fs::create_dir(&dir).unwrap();
                let shared = OpenOptions::new()
                    .write(true)
                    .open(mnt.join("shared"))
                    .unwrap();
                for i in 0..150u64 {
                    let p = dir.join(format!("f{}", i % 17));
                    fs::write(&p, pattern(100 + (i as usize * 37) % 9000, t * 1000 + i)).unwrap();
                    if i % 3 == 0 {
                        let _ = fs::rename(&p, dir.join(format!("r{}", i % 5)));
                    }
                    // Overlapping writes to one file from every thread.
                    let off = (i * 4096 + t * 1000) % ((1 << 20) - 8192);
                    std::os::unix::fs::FileExt::write_all_at(
                        &shared,
                        &pattern(8192, t * 7 + i),
                        off,
                    )
                    .unwrap();
                    if i % 50 == 0 {
                        // Moves between directories race with the other threads' writes.
                        let other = mnt.join(format!("t{}", (t + 1) % 4));
                        let _ = fs::rename(dir.join("r0"), other.join(format!("from{t}-{i}")));
                    }
                }
            });
        }
    });
    assert_same_tree(&rig.mnt, &rig.backing);
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
}

#[test]
fn permissions_and_ownership_follow_the_caller() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    fs::create_dir(rig.mnt.join("pub")).unwrap();
    fs::set_permissions(rig.mnt.join("pub"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(rig.mnt.join("pub/root-only"), b"secret").unwrap();
    fs::set_permissions(
        rig.mnt.join("pub/root-only"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let as_user = |script: &str| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                "bash",
                "-c",
                script,
            ])
            .current_dir(rig.mnt.join("pub"))
            .output()
            .unwrap()
    };
    let out = as_user("echo mine > user-file && mkdir user-dir && ln -s user-file user-link");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["user-file", "user-dir", "user-link"] {
        let md = fs::symlink_metadata(rig.mnt.join("pub").join(name)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (1000, 1000),
            "{name} belongs to the caller"
        );
    }
    let out = as_user("cat root-only");
    assert!(
        !out.status.success(),
        "other users cannot read a 0600 root file"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = as_user("rm root-only");
    assert!(
        !out.status.success(),
        "sticky directory protects root's file"
    );
    // setgid directories pass their group on.
    fs::create_dir(rig.mnt.join("sgid")).unwrap();
    std::os::unix::fs::chown(rig.mnt.join("sgid"), Some(0), Some(4242)).unwrap();
    fs::set_permissions(rig.mnt.join("sgid"), fs::Permissions::from_mode(0o2777)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "bash",
            "-c",
            "touch f && mkdir d",
        ])
        .current_dir(rig.mnt.join("sgid"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(rig.mnt.join("sgid/f")).unwrap().gid(), 4242);
    let d = fs::metadata(rig.mnt.join("sgid/d")).unwrap();
    assert_eq!(d.gid(), 4242);
    assert!(d.mode() & 0o2000 != 0, "new directory inherits setgid");
    assert_same_tree(&rig.mnt, &rig.backing);
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
}

#[test]
fn mmap_writes_and_o_append_are_logged() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    let p = rig.mnt.join("mapped");
    fs::write(&p, vec![b'.'; 8192]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    unsafe {
        let addr = map_shared(&f, 8192);
        std::ptr::copy_nonoverlapping(b"through mmap".as_ptr(), (addr as *mut u8).add(100), 12);
        assert_eq!(libc::msync(addr, 8192, libc::MS_SYNC), 0);
        libc::munmap(addr, 8192);
    }
    drop(f);
    let mut a = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_APPEND)
        .open(&p)
        .unwrap();
    a.write_all(b"tail1").unwrap();
    a.write_all(b"tail2").unwrap();
    drop(a);
    let content = fs::read(&p).unwrap();
    assert_eq!(&content[100..112], b"through mmap");
    assert!(content.ends_with(b"tail1tail2"));
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
}

/// Opens say FOPEN_NOFLUSH: close(2) costs no FLUSH round trip. Pages
/// dirtied through a shared mapping after the close still reach BACKING and
/// the log (the kernel writes them back at munmap).
#[test]
fn close_sends_no_flush_and_stores_after_close_still_reach_the_log() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(Some("[mount]\npassthrough = false\n"));
    let flushes = || {
        status_json(&rig.state)["mount"]["flush_requests"]
            .as_u64()
            .unwrap()
    };
    let writeback = std::env::var_os("REPLFS_TEST_WRITEBACK_CACHE").is_some_and(|v| v != "0");
    let before = flushes();
    for i in 0..20u64 {
        fs::write(rig.mnt.join(format!("f{i}")), pattern(5000, i)).unwrap();
    }
    let f = OpenOptions::new()
        .write(true)
        .open(rig.mnt.join("f3"))
        .unwrap();
    f.write_all_at(b"again", 10).unwrap();
    drop(f);
    assert_eq!(fs::read(rig.mnt.join("f4")).unwrap(), pattern(5000, 4));
    if writeback {
        assert!(flushes() > before, "the writeback cache flushes at close");
    } else {
        assert_eq!(flushes(), before, "22 closes, no FLUSH");
    }

    let p = rig.mnt.join("mapped");
    fs::write(&p, vec![b'.'; 8192]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    unsafe {
        let addr = map_shared(&f, 8192);
        drop(f);
        std::ptr::copy_nonoverlapping(b"after close".as_ptr(), (addr as *mut u8).add(4100), 11);
        assert_eq!(libc::munmap(addr, 8192), 0);
    }
    let mut want = vec![b'.'; 8192];
    want[4100..4111].copy_from_slice(b"after close");
    assert_eq!(fs::read(&p).unwrap(), want);
    assert_eq!(
        fs::read(rig.backing.join("mapped")).unwrap(),
        want,
        "in BACKING after munmap"
    );
    assert_same_tree(&rig.mnt, &rig.backing);
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
}

/// A name looked up and not found is remembered by the kernel (a negative
/// entry for the entry timeout): probing it again costs no LOOKUP, and a
/// create of that name through the mount, in any of the ways there are,
/// replaces the entry.
#[test]
fn missing_names_are_cached_and_creates_replace_them() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    let lookups = || {
        status_json(&rig.state)["mount"]["lookup_requests"]
            .as_u64()
            .unwrap()
    };
    let absent = |p: &std::path::Path| {
        let e = fs::symlink_metadata(p).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{}", p.display());
    };
    let mnt = &rig.mnt;
    fs::write(mnt.join("src"), b"source").unwrap();
    let names = ["created", "renamed", "linked", "symlinked", "dir", "node"];
    for n in names {
        absent(&mnt.join(n));
    }
    let before = lookups();
    for _ in 0..50 {
        for n in names {
            absent(&mnt.join(n));
        }
    }
    assert_eq!(lookups(), before, "300 probes of missing names, no LOOKUP");
    fs::write(mnt.join("created"), b"new").unwrap();
    fs::write(mnt.join("tmp"), b"moved").unwrap();
    fs::rename(mnt.join("tmp"), mnt.join("renamed")).unwrap();
    fs::hard_link(mnt.join("src"), mnt.join("linked")).unwrap();
    std::os::unix::fs::symlink("src", mnt.join("symlinked")).unwrap();
    fs::create_dir(mnt.join("dir")).unwrap();
    let node = common::workload::c(&mnt.join("node"));
    assert_eq!(
        unsafe { libc::mknod(node.as_ptr(), libc::S_IFIFO | 0o644, 0) },
        0
    );
    assert_eq!(fs::read(mnt.join("created")).unwrap(), b"new");
    assert_eq!(fs::read(mnt.join("renamed")).unwrap(), b"moved");
    assert_eq!(fs::read(mnt.join("linked")).unwrap(), b"source");
    assert_eq!(fs::read(mnt.join("symlinked")).unwrap(), b"source");
    assert!(fs::metadata(mnt.join("dir")).unwrap().is_dir());
    assert!(
        fs::symlink_metadata(mnt.join("node"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    fs::remove_file(mnt.join("created")).unwrap();
    absent(&mnt.join("created"));
    assert_same_tree(mnt, &rig.backing);
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);

    // attr_timeout = 0: nothing is cached, every probe asks the daemon
    // (the writeback cache refuses a zero timeout).
    if std::env::var_os("REPLFS_TEST_WRITEBACK_CACHE").is_some_and(|v| v != "0") {
        return;
    }
    let m = rig.mount(Some("[mount]\nattr_timeout = \"0s\"\n"));
    let before = lookups();
    for _ in 0..10 {
        absent(&mnt.join("created"));
    }
    assert!(
        lookups() >= before + 10,
        "uncached: {} LOOKUPs",
        lookups() - before
    );
    m.unmount();
}

#[test]
fn seek_data_hole_statfs_and_locks_work_through_the_mount() {
    let rig = Rig::new();
    prepare_root(&rig);
    let m = rig.mount(None);
    let p = rig.mnt.join("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(&pattern(4096, 1), 8 << 20).unwrap();
    let fd = f.as_raw_fd();
    let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert_eq!(data, 8 << 20, "the first data is at 8 MiB");
    assert_eq!(hole, 0, "the file starts with a hole");
    // flock: a second exclusive lock on another open file description fails.
    let g = File::open(&p).unwrap();
    assert_eq!(unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }, 0);
    assert_eq!(
        unsafe { libc::flock(g.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        -1
    );
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EWOULDBLOCK)
    );
    unsafe { libc::flock(fd, libc::LOCK_UN) };
    // POSIX record locks (fcntl) are seen across processes.
    let lock = |fd: i32, ty: i32| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        unsafe { libc::fcntl(fd, libc::F_SETLK, &fl) }
    };
    assert_eq!(lock(fd, libc::F_WRLCK), 0);
    let out = std::process::Command::new("flock")
        .args(["--nonblock", p.to_str().unwrap(), "true"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flock(1) is independent of the POSIX lock"
    );
    let probe = std::process::Command::new("python3")
        .args(["-c", "import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !probe.status.success(),
        "another process cannot take the POSIX write lock"
    );
    assert_eq!(lock(fd, libc::F_UNLCK), 0);
    // statfs answers with the backing filesystem's figures.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(rig.mnt.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bsize > 0);
    drop((f, g));
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
}
