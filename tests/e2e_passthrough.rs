//! Kernel FUSE passthrough for read-only opens (`mount.passthrough`), end to
//! end: a real mount, a real mirror on 127.0.0.1. Reads through read-only
//! opens are served by the kernel (the daemon's READ counter in `replfs
//! status --json` does not move); read-only and writable opens of one file
//! mix in every order without EIO and see each other's bytes; every write
//! made while a passthrough open exists is logged and replicated (the WAL
//! replays to BACKING, the mirror converges byte for byte).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::workload::pattern;
use common::*;

const CONVERGE: Duration = Duration::from_secs(90);
const MIB: usize = 1 << 20;

/// The mount section of `replfs status --json`.
fn mount_stats(state: &Path) -> serde_json::Value {
    let st = status_json(state);
    assert!(st["mount"].is_object(), "status has a mount section: {st}");
    st["mount"].clone()
}

fn counter(state: &Path, name: &str) -> u64 {
    mount_stats(state)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("status mount.{name} is a number"))
}

/// Whether passthrough is in force. Off only when the test suite runs
/// with the writeback cache (REPLFS_TEST_WRITEBACK_CACHE), the kernel
/// lacks FUSE_PASSTHROUGH, or stores through shared mappings cannot be
/// tracked there (BACKING not on ext4/XFS/btrfs, Linux before 6.13); any
/// other "off" is a failure.
fn passthrough_on(state: &Path) -> bool {
    let s = mount_stats(state)["passthrough"]
        .as_str()
        .expect("passthrough state")
        .to_string();
    if s == "on" {
        return true;
    }
    assert!(
        s.contains("writeback_cache") || s.contains("lacks FUSE_PASSTHROUGH") || untrackable(&s),
        "passthrough unexpectedly off: {s}"
    );
    assert!(
        !(s.contains("lacks FUSE_PASSTHROUGH") && kernel_config_has_passthrough() == Some(true)),
        "the kernel is built with CONFIG_FUSE_PASSTHROUGH but the mount says: {s}"
    );
    eprintln!("passthrough is {s}: checking the fallback only");
    false
}

/// Passthrough off because stores through shared mappings of BACKING
/// could not be caught here (`mapwatch::stores_trackable`).
fn untrackable(state: &str) -> bool {
    state.contains("where stores through shared mappings are tracked")
        || state.contains("multigrain timestamps")
}

/// Whether the running kernel was built with FUSE passthrough, from
/// /proc/config.gz (None: the kernel does not publish its config).
fn kernel_config_has_passthrough() -> Option<bool> {
    let out = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().any(|l| l == "CONFIG_FUSE_PASSTHROUGH=y"))
}

#[test]
fn this_kernel_serves_passthrough_when_it_is_built_with_it() {
    // The other tests here fall back to checking the cached path on a
    // kernel without FUSE passthrough; on one built with it (as on this
    // project's machines) that fallback must not hide a broken setup.
    let rig = Rig::new();
    let m = rig.mount(Some(ON));
    let s = mount_stats(&rig.state)["passthrough"]
        .as_str()
        .expect("passthrough state")
        .to_string();
    m.unmount();
    let writeback = std::env::var_os("REPLFS_TEST_WRITEBACK_CACHE").is_some_and(|v| v != "0");
    match kernel_config_has_passthrough() {
        Some(true) if !writeback => assert!(
            s == "on" || untrackable(&s),
            "CONFIG_FUSE_PASSTHROUGH=y: {s}"
        ),
        Some(true) => assert!(s.contains("writeback_cache"), "{s}"),
        Some(false) => assert!(s.contains("lacks FUSE_PASSTHROUGH"), "{s}"),
        None => eprintln!("no /proc/config.gz: passthrough is {s}, not checked"),
    }
}

fn read_all(mut f: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).expect("read through the mount");
    v
}

fn ro(p: &Path) -> File {
    File::open(p).unwrap_or_else(|e| panic!("open {} read-only: {e}", p.display()))
}

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", p.display()))
}

/// A mapping of `len` bytes of `f`, unmapped on drop.
struct Map {
    p: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize, shared_write: bool) -> std::io::Result<Map> {
        let (prot, flags) = if shared_write {
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
        } else {
            (libc::PROT_READ, libc::MAP_PRIVATE)
        };
        // SAFETY: a fresh mapping of an open file; only used through `Map`.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, f.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Map { p: p.cast(), len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable at `p` until drop.
        unsafe { std::slice::from_raw_parts(self.p, self.len) }
    }

    fn write(&mut self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: within the mapping, which is writable (shared_write).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.p.add(off), data.len()) };
        // SAFETY: msync of the whole mapping.
        let r = unsafe { libc::msync(self.p.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(r, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Map {
    /// A store without msync: it stays a dirty page until written back.
    fn store(&mut self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: within the mapping, which is writable (shared_write).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.p.add(off), data.len()) };
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.p.cast(), self.len) };
    }
}

/// `mount.passthrough` is on by default; every mount here says so anyway.
const ON: &str = "[mount]\npassthrough = true\n";

/// `config` holds top-level keys only; the `[mount]` table comes after them.
fn mount_shipping(p: &Pair, config: Option<&str>) -> Mount {
    let config = format!("{}{ON}", config.unwrap_or(""));
    Mount::start_shipping(&p.rig, Some(&config), &p.mirror.addr(), &p.key)
}

/// Waits until the mirror equals BACKING and no repair is pending: no sync
/// running (a baseline records the files written while it ran for repair
/// before it shows idle) and none waiting.
fn converge(p: &Pair) {
    wait_converged(&p.rig.backing, &p.mdir, CONVERGE);
    wait_status(&p.rig.state, CONVERGE, "repairs never finished", |st| {
        (st["sync"].is_null() || st["sync"]["phase"] == "idle")
            && st["resync_pending"] == 0
            && st["acked_lsn"] == st["head_lsn"]
    });
    wait_converged(&p.rig.backing, &p.mdir, CONVERGE);
}

fn verify_identical(state: &Path) {
    let out = replfs(&["verify", "--state", state.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn read_only_reads_are_served_by_the_kernel_not_the_daemon() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let data = pattern(8 * MIB, 11);
    fs::write(rig.backing.join("big"), &data).unwrap();

    // Passthrough on.
    let m = rig.mount(Some(ON));
    let on = passthrough_on(&rig.state);
    let before = counter(&rig.state, "read_requests");
    assert_eq!(read_all(ro(&rig.mnt.join("big"))), data);
    let f = ro(&rig.mnt.join("big"));
    let mut buf = vec![0u8; 4096];
    for i in (0..2048u64).rev().step_by(7) {
        f.read_exact_at(&mut buf, i * 4096).unwrap();
        assert_eq!(buf[..], data[i as usize * 4096..][..4096]);
    }
    drop(f);
    let after = counter(&rig.state, "read_requests");
    if on {
        assert_eq!(
            after, before,
            "8 MiB read through read-only opens: the daemon served no READ"
        );
        assert!(counter(&rig.state, "passthrough_opens") >= 2);
    }
    m.unmount();

    // Off: the same reads go through the daemon.
    let m = rig.mount(Some("[mount]\npassthrough = false\n"));
    let st = mount_stats(&rig.state);
    assert!(
        st["passthrough"].as_str().unwrap().starts_with("off"),
        "{st}"
    );
    assert_eq!(read_all(ro(&rig.mnt.join("big"))), data);
    let bytes = counter(&rig.state, "read_bytes");
    assert!(
        bytes >= data.len() as u64,
        "without passthrough the daemon served the 8 MiB ({bytes} bytes)"
    );
    assert!(counter(&rig.state, "read_requests") > 0);
    assert_eq!(counter(&rig.state, "passthrough_opens"), 0);
    m.unmount();
}

#[test]
fn mixed_opens_work_in_every_order_and_replicate() {
    let p = Pair::new(21);
    let m = mount_shipping(&p, Some("exclude = [\"*.tmp\"]\n"));
    let on = passthrough_on(&p.rig.state);
    let mnt = &p.rig.mnt;
    let base = pattern(256 * 1024, 3);
    for name in ["a", "b", "c", "d", "e", "f", "g.tmp", "h"] {
        fs::write(mnt.join(name), &base).unwrap();
    }

    // (a) read-only, then read-write: the writer's bytes are seen by both.
    let r = ro(&mnt.join("a"));
    let w = rw(&mnt.join("a"));
    w.write_all_at(b"written-after-ro", 1000).unwrap();
    let mut got = [0u8; 16];
    r.read_exact_at(&mut got, 1000).unwrap();
    assert_eq!(&got, b"written-after-ro");
    w.read_exact_at(&mut got, 1000).unwrap();
    assert_eq!(&got, b"written-after-ro");
    drop(w);
    assert_eq!(read_all(&r).len(), base.len());
    drop(r);
    if on {
        assert!(counter(&p.rig.state, "passthrough_dio_opens") >= 1);
    }

    // (b) read-write, then read-only (cached: a writer is open).
    let w = rw(&mnt.join("b"));
    w.write_all_at(b"written-before-ro", 5000).unwrap();
    let r = ro(&mnt.join("b"));
    r.read_exact_at(&mut got, 5000).unwrap();
    assert_eq!(&got, b"written-before-r");
    w.write_all_at(b"second", 0).unwrap();
    let mut six = [0u8; 6];
    r.read_exact_at(&mut six, 0).unwrap();
    assert_eq!(&six, b"second");
    drop((r, w));

    // (c) both open, interleaved writes and reads, then a truncate by
    // path and an O_TRUNC open while the reader stays open.
    let r = ro(&mnt.join("c"));
    let w = rw(&mnt.join("c"));
    for i in 0..48u64 {
        let chunk = pattern(4096, 100 + i);
        w.write_all_at(&chunk, i * 4096 + 17).unwrap();
        let mut back = vec![0u8; 4096];
        r.read_exact_at(&mut back, i * 4096 + 17).unwrap();
        assert_eq!(back, chunk, "reader sees write {i}");
        let mut tail = vec![0u8; 100];
        w.read_exact_at(&mut tail, 200_000).unwrap();
        assert_eq!(tail[..], base[200_000..200_100], "writer reads {i}");
    }
    drop(w);
    let f = OpenOptions::new().write(true).open(mnt.join("c")).unwrap();
    f.set_len(100_000).unwrap();
    drop(f);
    assert_eq!(r.metadata().unwrap().len(), 100_000);
    let mut end = [0u8; 1];
    assert_eq!(r.read_at(&mut end, 100_000).unwrap(), 0, "EOF at new size");
    let t = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(mnt.join("c"))
        .unwrap();
    t.write_all_at(b"fresh", 0).unwrap();
    drop(t);
    let mut five = [0u8; 5];
    r.read_exact_at(&mut five, 0).unwrap();
    assert_eq!(&five, b"fresh");
    assert_eq!(r.metadata().unwrap().len(), 5);
    drop(r);

    // (d) MAP_PRIVATE of a read-only open.
    let r = ro(&mnt.join("d"));
    let map = Map::new(&r, base.len(), false).expect("MAP_PRIVATE of a read-only open");
    assert_eq!(map.bytes(), &base[..]);
    drop((map, r));

    // (e) shared writable mmap of a read-write open with no read-only open:
    // cached mode, the stores reach the daemon and the log.
    let w = rw(&mnt.join("e"));
    let mut map = Map::new(&w, base.len(), true).expect("shared writable mmap");
    map.write(4096, b"stored-through-mmap");
    drop((map, w));
    let r = ro(&mnt.join("e"));
    let mut s = [0u8; 19];
    r.read_exact_at(&mut s, 4096).unwrap();
    assert_eq!(&s, b"stored-through-mmap");
    drop(r);

    // (f) shared writable mmap of a read-write open while a read-only open
    // exists: the kernel maps BACKING itself; replfs notices at release
    // and has the file repaired on the mirror. An excluded file likewise,
    // and it stays local.
    for name in ["f", "g.tmp"] {
        let r = ro(&mnt.join(name));
        let w = rw(&mnt.join(name));
        let mut map = Map::new(&w, base.len(), true).expect("shared writable mmap, mixed");
        map.write(8192, b"mmap-while-passthrough");
        let mut back = [0u8; 22];
        r.read_exact_at(&mut back, 8192).unwrap();
        assert_eq!(&back, b"mmap-while-passthrough");
        drop((map, w, r));
    }
    if on {
        let resyncs: Vec<String> = p
            .rig
            .dump()
            .iter()
            .filter(|r| r["op"] == "resync")
            .map(|r| r["path"].as_str().unwrap_or("?").to_string())
            .collect();
        assert_eq!(resyncs, ["f"], "the mmap stores are recorded for repair");
    }

    // (h) pages the FUSE page cache kept from a cached open are dropped
    // when the file was written in passthrough mode (around that cache).
    let w = rw(&mnt.join("h"));
    assert_eq!(read_all(&mut &w), base, "cached read fills the page cache");
    drop(w);
    let r = ro(&mnt.join("h"));
    let w = rw(&mnt.join("h"));
    w.write_all_at(b"written-in-passthrough-mode", 0).unwrap();
    let mut map = Map::new(&w, base.len(), true).expect("shared writable mmap, mixed");
    map.write(65536, b"mapped-in-passthrough-mode");
    drop((map, w, r));
    let w = rw(&mnt.join("h"));
    let mut h = [0u8; 27];
    w.read_exact_at(&mut h, 0).unwrap();
    assert_eq!(&h, b"written-in-passthrough-mode", "no stale cached page");
    w.read_exact_at(&mut h[..26], 65536).unwrap();
    assert_eq!(
        &h[..26],
        b"mapped-in-passthrough-mode",
        "no stale cached page"
    );
    drop(w);

    // (g) exec: the kernel maps a passthrough open MAP_PRIVATE.
    fs::copy("/bin/true", mnt.join("true")).unwrap();
    fs::set_permissions(mnt.join("true"), fs::Permissions::from_mode(0o755)).unwrap();
    let r = ro(&mnt.join("true"));
    let st = std::process::Command::new(mnt.join("true"))
        .status()
        .expect("exec through the mount");
    assert!(st.success());
    drop(r);

    // Everything replicated byte for byte (the excluded file stays local).
    fs::remove_file(mnt.join("g.tmp")).unwrap();
    converge(&p);
    assert_eq!(
        &fs::read(p.mdir.join("f")).unwrap()[8192..8214],
        b"mmap-while-passthrough"
    );
    verify_identical(&p.rig.state);
    m.unmount();
}

#[test]
fn writes_while_a_passthrough_open_exists_are_logged_and_replicated() {
    let p = Pair::new(22);
    let m = mount_shipping(&p, None);
    let on = passthrough_on(&p.rig.state);
    let mnt = &p.rig.mnt;
    fs::write(mnt.join("log.txt"), b"").unwrap();
    fs::write(mnt.join("data.bin"), pattern(2 * MIB, 5)).unwrap();

    // A long-lived reader (tail -f style) while the file is appended to by
    // writers that come and go, and a random rewriter on another file.
    let mut tail = ro(&mnt.join("log.txt"));
    let reader = ro(&mnt.join("data.bin"));
    let mut seen = Vec::new();
    let mut expect = Vec::new();
    for i in 0..200u32 {
        let line = format!("line {i}: {}\n", "x".repeat((i % 50) as usize));
        let mut a = OpenOptions::new()
            .append(true)
            .open(mnt.join("log.txt"))
            .unwrap();
        std::io::Write::write_all(&mut a, line.as_bytes()).unwrap();
        drop(a);
        expect.extend_from_slice(line.as_bytes());
        tail.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, expect, "the reader follows the appends ({i})");
        if i % 10 == 0 {
            let w = rw(&mnt.join("data.bin"));
            let chunk = pattern(65536, u64::from(i));
            let off = u64::from(i) * 9973;
            w.write_all_at(&chunk, off).unwrap();
            w.sync_data().unwrap();
            drop(w);
            let mut back = vec![0u8; chunk.len()];
            reader.read_exact_at(&mut back, off).unwrap();
            assert_eq!(back, chunk);
        }
    }
    drop((tail, reader));
    if on {
        let st = mount_stats(&p.rig.state);
        assert!(st["passthrough_dio_opens"].as_u64().unwrap() >= 200, "{st}");
    }

    // FUSE_HANDLE_KILLPRIV_V2 through a direct-I/O passthrough open: an
    // unprivileged writer clears suid and sgid (group-executable), and the
    // new mode is logged like the write.
    fs::set_permissions(p.rig.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(mnt.join("suid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(mnt.join("suid"), fs::Permissions::from_mode(0o6777)).unwrap();
    let r = ro(&mnt.join("suid"));
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!(
            "printf 'exit 0\\n' >> '{}'",
            mnt.join("suid").display()
        ))
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "unprivileged append: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(r);
    let mode = fs::metadata(mnt.join("suid")).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o777, "suid and sgid cleared: {mode:o}");
    assert_eq!(fs::read(mnt.join("suid")).unwrap(), b"#!/bin/sh\nexit 0\n");
    // Writes through the daemon are not mistaken for changes behind it.
    let resyncs = p.rig.dump().iter().filter(|r| r["op"] == "resync").count();
    assert_eq!(resyncs, 0, "no resync for writes replfs logged itself");
    converge(&p);
    verify_identical(&p.rig.state);
    m.unmount();
    // Every change is in the WAL itself: it replays to BACKING.
    let replayed = p.rig.replay("replayed", &[]);
    assert_same_tree(&p.rig.backing, &replayed);
}

/// A shared writable mapping of a writable passthrough open maps BACKING
/// itself and outlives `close()`: its stores never reach the daemon, while
/// the file is open or after the RELEASE. The mount watches the inode while
/// it is open or mapped and has the file repaired within about a second of
/// each store (no msync needed), including stores to a page already dirty.
#[test]
fn stores_through_a_mapping_that_outlives_its_open_are_replicated() {
    let p = Pair::new(23);
    let m = mount_shipping(&p, None);
    let mnt = &p.rig.mnt;
    let base = pattern(256 << 10, 5);
    fs::write(mnt.join("db"), &base).unwrap();
    converge(&p);
    let on = passthrough_on(&p.rig.state);
    let r = ro(&mnt.join("db"));
    let w = rw(&mnt.join("db"));
    let mut map = Map::new(&w, base.len(), true).expect("shared writable mmap");
    let mut want = base.clone();
    let mut store = |map: &mut Map, off: usize, data: &[u8], wait: bool| {
        map.store(off, data);
        want[off..off + data.len()].copy_from_slice(data);
        assert!(
            map.bytes() == &want[..],
            "the mapping reads back its stores"
        );
        if wait {
            wait_converged(&p.rig.backing, &p.mdir, CONVERGE);
            let mirror = fs::read(p.mdir.join("db")).unwrap();
            assert!(mirror == want, "the mirror holds every store so far");
        }
    };
    // While the writable open is still open (no release to look at) ...
    store(&mut map, 4096, b"while open", true);
    // ... and after its close.
    drop(w);
    store(&mut map, 0, b"after close", true);
    // The same page again, then it and another one at once.
    store(&mut map, 100, b"same page, later", true);
    store(&mut map, 200, b"first page", true);
    store(&mut map, 70_000, b"two pages at once", false);
    store(&mut map, 300, b"and the first", true);
    drop(map);
    drop(r);
    converge(&p);
    if on {
        let resyncs = p
            .rig
            .dump()
            .iter()
            .filter(|r| r["op"] == "resync" && r["path"] == "db")
            .count();
        assert!(resyncs >= 5, "one repair per store at least: {resyncs}");
    }
    verify_identical(&p.rig.state);
    m.unmount();
}
