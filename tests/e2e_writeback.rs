//! `mount.writeback_cache = true`: writes reach replfs (BACKING and the WAL)
//! when the kernel writes its dirty pages back, merged and later. The
//! semantics applications rely on must not change: partial-page writes
//! through write-only descriptors (the kernel reads the page first),
//! O_APPEND from several descriptors, truncate under dirty pages, shared
//! writable mmap, mtime (the kernel's own, flushed at close, and explicit
//! utimens after buffered writes), fsync as the durability point across a
//! kill -9; and BACKING, the WAL replay and the mirror all converge.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::workload::{map_shared, mixed_workload, pattern, set_times};
use common::*;

const WRITEBACK: &str = "[mount]\nwriteback_cache = true\n";

fn mtime(p: &Path) -> (i64, i64) {
    let m = fs::metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

/// Drops the clean cached pages of `p` (through the mount: the FUSE inode's
/// page cache), so the next partial-page write must read the page back.
fn drop_pages(p: &Path) {
    let f = File::open(p).unwrap();
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "fadvise");
}

/// The application-visible semantics, checked through the mount; returns
/// what each file must contain.
fn semantics(m: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let mut want = Vec::new();

    // A partial-page overwrite through a write-only descriptor, with the
    // page not cached: the kernel reads it through that same handle.
    let base = pattern(3 * 4096 + 100, 1);
    fs::write(m.join("wronly"), &base).unwrap();
    drop_pages(&m.join("wronly"));
    let f = OpenOptions::new()
        .write(true)
        .open(m.join("wronly"))
        .unwrap();
    f.write_all_at(b"PARTIAL", 5000).unwrap();
    f.write_all_at(b"TAIL", base.len() as u64 - 2).unwrap();
    drop(f);
    let mut w = base.clone();
    w[5000..5007].copy_from_slice(b"PARTIAL");
    w.truncate(base.len() - 2);
    w.extend_from_slice(b"TAIL");
    assert_eq!(fs::read(m.join("wronly")).unwrap(), w, "write-only RMW");
    want.push(("wronly", w));

    // Write-only file the caller cannot read (mode 0200): still works.
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o200)
        .open(m.join("wonly-mode"))
        .unwrap();
    f.write_all_at(&pattern(10_000, 2), 0).unwrap();
    f.write_all_at(b"x", 4097).unwrap();
    drop(f);
    let mut w = pattern(10_000, 2);
    w[4097] = b'x';
    want.push(("wonly-mode", w));

    // O_APPEND from two descriptors, interleaved, plus a plain write.
    let mut a = OpenOptions::new()
        .create(true)
        .append(true)
        .open(m.join("log"))
        .unwrap();
    let mut b = OpenOptions::new().append(true).open(m.join("log")).unwrap();
    let mut w = Vec::new();
    for i in 0..200 {
        let line = format!("line {i} from {}\n", if i % 2 == 0 { "a" } else { "b" });
        if i % 2 == 0 { &mut a } else { &mut b }
            .write_all(line.as_bytes())
            .unwrap();
        w.extend_from_slice(line.as_bytes());
    }
    drop((a, b));
    assert_eq!(fs::read(m.join("log")).unwrap(), w, "O_APPEND");
    want.push(("log", w));

    // Truncate while dirty pages lie beyond the new end, then extend with
    // a write past it: the dropped bytes must not come back.
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.join("trunc"))
        .unwrap();
    f.write_all(&pattern(100_000, 3)).unwrap();
    f.set_len(5000).unwrap();
    f.seek(SeekFrom::Start(20_000)).unwrap();
    f.write_all(b"after the hole").unwrap();
    f.set_len(20_010).unwrap();
    drop(f);
    let mut w = pattern(100_000, 3);
    w.truncate(5000);
    w.resize(20_000, 0);
    w.extend_from_slice(b"after the");
    w.push(b' ');
    assert_eq!(w.len(), 20_010);
    assert_eq!(fs::read(m.join("trunc")).unwrap(), w, "truncate");
    want.push(("trunc", w));

    // Shared writable mmap, extended by ftruncate, msync'ed, then written
    // through write(2) as well.
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.join("mapped"))
        .unwrap();
    f.write_all_at(&pattern(8192, 4), 0).unwrap();
    f.set_len(3 * 4096).unwrap();
    let len = 3 * 4096;
    let p = map_shared(&f, len);
    let map = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
    map[10..20].copy_from_slice(b"via mmap!!");
    map[9000..9004].copy_from_slice(b"page");
    assert_eq!(unsafe { libc::msync(p, len, libc::MS_SYNC) }, 0, "msync");
    map[100] = b'#';
    assert_eq!(unsafe { libc::munmap(p, len) }, 0);
    f.write_all_at(b"write", 4090).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut w = pattern(8192, 4);
    w.resize(len, 0);
    w[10..20].copy_from_slice(b"via mmap!!");
    w[9000..9004].copy_from_slice(b"page");
    w[100] = b'#';
    w[4090..4095].copy_from_slice(b"write");
    assert_eq!(fs::read(m.join("mapped")).unwrap(), w, "mmap");
    want.push(("mapped", w));

    // mtime: the kernel's own time of the last write, kept at close; and an
    // explicit utimens after buffered (not yet written back) data sticks.
    let mut f = File::create(m.join("times")).unwrap();
    f.write_all(b"first").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    f.write_all(b" second").unwrap();
    let seen = mtime(&m.join("times"));
    drop(f);
    assert_eq!(
        mtime(&m.join("times")),
        seen,
        "close keeps the write's mtime"
    );
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.join("times"))
        .unwrap();
    f.write_all(b" third").unwrap();
    set_times(
        &m.join("times"),
        (1_600_000_000, 0),
        (1_500_000_000, 42),
        false,
    );
    drop(f);
    assert_eq!(
        mtime(&m.join("times")),
        (1_500_000_000, 42),
        "utimens after a buffered write"
    );
    want.push(("times", b"first second third".to_vec()));
    want
}

#[test]
fn writeback_keeps_posix_semantics_and_the_mirror_converges() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let key = key_file(rig.tmp.path(), "key", 7);
    let mdir = rig.path("mirror-dir");
    fs::create_dir_all(&mdir).unwrap();
    fs::set_permissions(&mdir, fs::Permissions::from_mode(0o755)).unwrap();
    let mirror = MirrorProc::start(&mdir, &rig.path("mirror-state"), &key, free_port());
    let m = Mount::start_shipping(&rig, Some(WRITEBACK), &mirror.addr(), &key);
    // The cache is really on: a write sits in the kernel until close.
    let mut f = File::create(rig.mnt.join("pending")).unwrap();
    f.write_all(b"pending").unwrap();
    assert_eq!(fs::metadata(rig.backing.join("pending")).unwrap().len(), 0);
    drop(f);
    assert_eq!(fs::read(rig.backing.join("pending")).unwrap(), b"pending");

    mixed_workload(&rig.mnt);
    let want = semantics(&rig.mnt);
    // Everything written back at close: the mount shows what BACKING has,
    // times included, and the mirror catches up.
    assert_same_tree(&rig.mnt, &rig.backing);
    for (name, body) in &want {
        assert_eq!(
            &fs::read(rig.backing.join(name)).unwrap(),
            body,
            "backing {name}"
        );
    }
    wait_converged(&rig.backing, &mdir, Duration::from_secs(60));
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    assert_same_tree(&rig.backing, &replayed);
    assert_same_tree(&rig.backing, &mdir);
}

/// fsync stays the durability point: a kill -9 of the mount right after
/// fsync loses nothing of the fsynced file, even with unsynced buffered
/// writes of other files around it.
#[test]
fn writeback_fsync_survives_kill9() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let m = rig.mount(Some(WRITEBACK));
    let mut bodies = Vec::new();
    for i in 0..20u64 {
        let body = pattern(1000 + 3000 * i as usize, i);
        let mut f = File::create(rig.mnt.join(format!("f{i}"))).unwrap();
        // Small writes the kernel merges into pages.
        for chunk in body.chunks(700) {
            f.write_all(chunk).unwrap();
        }
        // Unsynced, still open: may be lost, must not damage anything.
        let mut noise = File::create(rig.mnt.join(format!("noise{i}"))).unwrap();
        noise.write_all(&body[..100]).unwrap();
        f.sync_data().unwrap();
        bodies.push(body);
        std::mem::forget(noise);
    }
    m.kill9();
    let replayed = rig.replay("replayed", &[]);
    for (i, body) in bodies.iter().enumerate() {
        let name = format!("f{i}");
        assert_eq!(
            &fs::read(replayed.join(&name)).unwrap(),
            body,
            "replayed {name}"
        );
        assert_eq!(
            &fs::read(rig.backing.join(&name)).unwrap(),
            body,
            "backing {name}"
        );
    }
    let m = rig.mount(Some(WRITEBACK));
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(&fs::read(rig.mnt.join(format!("f{i}"))).unwrap(), body);
    }
    m.unmount();
}
