//! Replication end to end: a real mount ships its WAL to a real `replfs
//! mirror` on 127.0.0.1; the mirror copy must become identical to BACKING,
//! through kills of the mirror, of the mount, and dropped links
//! (DESIGN.md invariants 4 and 5).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::workload::{mixed_workload, pattern, renameat2};
use common::*;

const CONVERGE: Duration = Duration::from_secs(60);

impl Pair {
    fn mount(&self, via: &str) -> Mount {
        Mount::start_shipping(&self.rig, None, via, &self.key)
    }
}

/// A steady writer in the background: files created, rewritten, renamed and
/// removed, bounded in count and time. Returns the number of files written.
fn background_writer(
    mnt: PathBuf,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..3000u64 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let d = mnt.join(format!("d{}", i % 10));
            let _ = fs::create_dir_all(&d);
            let r = fs::write(
                d.join(format!("f{}", i % 37)),
                pattern(1000 + (i as usize * 997) % 60_000, i),
            );
            if r.is_err() {
                break;
            }
            if i % 5 == 0 {
                let _ = fs::rename(
                    d.join(format!("f{}", i % 37)),
                    d.join(format!("r{}", i % 11)),
                );
            }
            if i % 13 == 0 {
                let _ = fs::remove_file(d.join(format!("r{}", i % 7)));
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Starts [`background_writer`]: returns its stop flag, progress counter and thread.
fn start_writer(mnt: &Path) -> (Arc<AtomicBool>, Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let w = background_writer(mnt.to_path_buf(), stop.clone(), done.clone());
    (stop, done, w)
}

fn wait_progress(done: &AtomicU64, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::Relaxed) < at_least && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workload_converges_on_the_mirror_and_lag_is_measured() {
    let p = Pair::new(7);
    let m = p.mount(&p.mirror.addr());
    mixed_workload(&p.rig.mnt);
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    // End-to-end lag on loopback, unthrottled: write, then poll the mirror.
    let mut lags = Vec::new();
    for i in 0..20 {
        let body = format!("lag probe {i}");
        let start = Instant::now();
        fs::write(p.rig.mnt.join(format!("probe{i}")), &body).unwrap();
        let target = p.mirror.dir.join(format!("probe{i}"));
        while fs::read_to_string(&target).ok().as_deref() != Some(&body) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "probe {i} never reached the mirror"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        lags.push(start.elapsed());
    }
    lags.sort();
    println!(
        "end-to-end lag on loopback: p50 {:?}, max {:?} over {} probes",
        lags[lags.len() / 2],
        lags[lags.len() - 1],
        lags.len()
    );
    m.unmount();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
}

#[test]
fn mirror_killed_mid_stream_converges() {
    let mut p = Pair::new(7);
    let m = p.mount(&p.mirror.addr());
    let (_stop, done, w) = start_writer(&p.rig.mnt);
    for round in 1..=3 {
        wait_progress(&done, round * 300);
        p.mirror.restart();
    }
    w.join().unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    m.unmount();
    p.mirror.stop();
}

/// Writes that catch a record applied twice or out of order: rewrites of
/// overlapping ranges (the order decides what stays), appends, and
/// `RENAME_EXCHANGE`, which swaps back if applied twice. Bounded in count
/// and time; returns how many steps were done.
fn order_sensitive_writer(mnt: PathBuf, done: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        fs::write(mnt.join("a"), b"A").unwrap();
        fs::write(mnt.join("b"), b"B").unwrap();
        let mut log = fs::File::create(mnt.join("log")).unwrap();
        for i in 0..300u64 {
            if Instant::now() > deadline {
                break;
            }
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(mnt.join(format!("f{}", i % 6)))
                .unwrap();
            f.write_all_at(&pattern(256 << 10, i), (i % 5) * 100_000)
                .unwrap();
            writeln!(log, "step {i}").unwrap();
            if i % 7 == 0 {
                renameat2(&mnt.join("a"), &mnt.join("b"), libc::RENAME_EXCHANGE).unwrap();
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// A wide window of small batches (64 KiB, up to 16 MiB in flight): the
/// mirror is killed (-9) while it drains a backlog, so many batches are in
/// flight and unacknowledged, some applied and not yet persisted. Each
/// restart resumes from the mirror's position; the replica must end up
/// identical byte for byte, and every record acknowledged, without a
/// baseline.
#[test]
fn mirror_killed_with_batches_in_flight_converges_exactly_once() {
    let mut p = Pair::new(7);
    let cfg = "[ship]\nbatch_bytes = \"64KiB\"\nwindow_bytes = \"16MiB\"\n";
    let m = Mount::start_shipping(&p.rig, Some(cfg), &p.mirror.addr(), &p.key);
    // The first pairing is a baseline (of an empty tree); none may follow.
    let paired = wait_status(&p.rig.state, CONVERGE, "first pairing", |st| {
        st["link"] == "connected" && st["sync"]["phase"] == "idle" && st["sync"]["baselines"] == 1
    });
    let done = Arc::new(AtomicU64::new(0));
    let w = order_sensitive_writer(p.rig.mnt.clone(), done.clone());
    let mut in_flight_kills = 0;
    for round in 1..=3u64 {
        // A backlog builds up while the mirror is down ...
        p.mirror.kill9();
        wait_progress(&done, round * 80);
        p.mirror.restart();
        // ... and the mirror is killed again while it drains it.
        let t0 = Instant::now();
        while status_json(&p.rig.state)["link"] != "connected"
            && t0.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(30));
        if status_json(&p.rig.state)["lag_records"].as_u64() > Some(0) {
            in_flight_kills += 1;
        }
        p.mirror.kill9();
        p.mirror.restart();
    }
    w.join().unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    let st = wait_status(&p.rig.state, CONVERGE, "not all acknowledged", |st| {
        st["lag_records"] == 0 && st["acked_lsn"] == st["head_lsn"]
    });
    assert_eq!(
        st["sync"]["baselines"], paired["sync"]["baselines"],
        "the restarts resumed from the mirror's position, no baseline: {st}"
    );
    assert!(
        in_flight_kills > 0,
        "the mirror was never killed with a backlog"
    );
    m.unmount();
    p.mirror.stop();
}

/// Rewrites the mirror's position file as a run before a machine restart
/// left it: `applied`, and another boot's id (docs/protocol.md, "Position
/// file").
fn position_from_another_boot(state: &Path, applied: u64) {
    let f = state.join("positions/default.pos");
    let mut b = fs::read(&f).unwrap();
    assert_eq!(&b[..8], b"RPLFSPOS");
    b[8..16].copy_from_slice(&applied.to_le_bytes());
    b[24..32].fill(0);
    b[32..48].fill(0x5a);
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    fs::write(&f, b).unwrap();
}

/// A machine crash of the mirror, simulated after the fact: the catalog's
/// position (recorded after a syncfs) is durable, but the position file,
/// written after every record, reached the disk while some of the changes
/// before it did not: a rewrite is lost, a create is lost, an exchange is
/// lost. The restarted mirror must not trust the file: it applies the
/// records after the catalog's position again (a write to a file that a
/// later, persisted removal took away is no error; the exchange is not
/// swapped twice) and has what they touched repaired, so the replica ends
/// up identical to BACKING without a baseline.
#[test]
fn a_machine_crash_of_the_mirror_is_caught_up_and_repaired() {
    let mut p = Pair::new(7);
    let m = p.mount(&p.mirror.addr());
    // The first pairing is a baseline (of an empty tree); none may follow.
    wait_status(&p.rig.state, CONVERGE, "first pairing", |st| {
        st["link"] == "connected" && st["sync"]["phase"] == "idle" && st["sync"]["baselines"] == 1
    });
    let mnt = &p.rig.mnt;
    fs::write(mnt.join("keep"), pattern(100_000, 1)).unwrap();
    fs::write(mnt.join("a"), b"A").unwrap();
    fs::write(mnt.join("b"), b"B").unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    let acked = || {
        wait_status(&p.rig.state, CONVERGE, "caught up", |st| {
            st["lag_records"] == 0 && st["acked_lsn"] == st["head_lsn"]
        })["acked_lsn"]
            .as_u64()
            .unwrap()
    };
    let durable = acked();
    // The records the crash leaves in doubt.
    fs::write(mnt.join("keep"), pattern(100_000, 2)).unwrap();
    fs::write(mnt.join("c"), b"C").unwrap();
    renameat2(&mnt.join("a"), &mnt.join("b"), libc::RENAME_EXCHANGE).unwrap();
    fs::write(mnt.join("g"), b"G").unwrap();
    fs::remove_file(mnt.join("g")).unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    let applied = acked();
    assert!(applied > durable);
    p.mirror.kill9();
    // What the disk held after the crash.
    let db = rusqlite::Connection::open(p.mirror.state.join("mirror.db")).unwrap();
    db.execute("UPDATE volumes SET applied_lsn = ?1", [durable as i64])
        .unwrap();
    drop(db);
    position_from_another_boot(&p.mirror.state, applied);
    let md = &p.mirror.dir;
    fs::write(md.join("keep"), pattern(100_000, 1)).unwrap();
    fs::remove_file(md.join("c")).unwrap();
    renameat2(&md.join("a"), &md.join("b"), libc::RENAME_EXCHANGE).unwrap();
    assert!(!md.join("g").exists());
    p.mirror.restart();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    let st = wait_status(&p.rig.state, CONVERGE, "repairs done", |st| {
        st["lag_records"] == 0 && st["sync"]["phase"] == "idle" && st["sync"]["repairs"] != 0
    });
    assert_eq!(st["sync"]["baselines"], 1, "no baseline: {st}");
    assert_eq!(fs::read(p.mirror.dir.join("b")).unwrap(), b"A");
    m.unmount();
    p.mirror.stop();
}

/// A machine crash of the *source*: the WAL (synced every 10 ms) and the
/// mirror hold changes that BACKING, still in the page cache, lost. The next
/// mount sees another boot id and records after the BACKING checkpoint, and
/// has their paths repaired on the mirror from BACKING, which wins.
#[test]
fn a_machine_crash_of_the_source_repairs_the_mirror_to_backing() {
    let p = Pair::new(7);
    // No periodic checkpoint during the test: the unmount takes one.
    let cfg = "[mount]\ncheckpoint_interval = \"1h\"\n";
    let mount = || Mount::start_shipping(&p.rig, Some(cfg), &p.mirror.addr(), &p.key);
    let m = mount();
    let mnt = &p.rig.mnt;
    fs::write(mnt.join("keep"), pattern(100_000, 1)).unwrap();
    fs::write(mnt.join("a"), b"A").unwrap();
    fs::write(mnt.join("b"), b"B").unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    m.unmount();
    let m = mount();
    let st = status_json(&p.rig.state);
    let checkpoint = st["backing_checkpoint_lsn"].as_u64().unwrap();
    assert_eq!(
        checkpoint,
        st["head_lsn"].as_u64().unwrap(),
        "unmount checkpoints: {st}"
    );
    // Changes after the checkpoint, shipped and applied...
    fs::write(mnt.join("keep"), pattern(100_000, 2)).unwrap();
    fs::write(mnt.join("c"), b"C").unwrap();
    fs::rename(mnt.join("a"), mnt.join("z")).unwrap();
    fs::write(mnt.join("g"), b"G").unwrap();
    fs::remove_file(mnt.join("g")).unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    wait_status(&p.rig.state, CONVERGE, "acknowledged", |st| {
        st["lag_records"] == 0 && st["acked_lsn"].as_u64() > Some(checkpoint)
    });
    // ...then the power goes: BACKING is back where the checkpoint left it
    // (its page cache is gone), the WAL kept everything, and the kernel
    // has a new boot id.
    m.kill9();
    let b = &p.rig.backing;
    fs::write(b.join("keep"), pattern(100_000, 1)).unwrap();
    fs::remove_file(b.join("c")).unwrap();
    fs::rename(b.join("z"), b.join("a")).unwrap();
    let db = rusqlite::Connection::open(p.rig.state.join("catalog.db")).unwrap();
    let n = db
        .execute(
            "UPDATE kv SET value = '00112233445566778899aabbccddeeff' WHERE key = 'backing.boot_id'",
            [],
        )
        .unwrap();
    assert_eq!(n, 1, "the mount recorded its boot id");
    drop(db);
    let m = mount();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    assert_eq!(
        fs::read(p.mirror.dir.join("keep")).unwrap(),
        pattern(100_000, 1)
    );
    assert!(!p.mirror.dir.join("c").exists() && !p.mirror.dir.join("z").exists());
    let st = wait_status(&p.rig.state, CONVERGE, "repairs done", |st| {
        st["sync"]["phase"] == "idle" && st["resync_pending"] == 0
    });
    assert_ne!(st["sync"]["repairs"], 0, "repaired, not resent: {st}");
    m.unmount();
}

#[test]
fn dropped_links_lose_nothing() {
    let p = Pair::new(7);
    let proxy = Proxy::start(p.mirror.port);
    let m = p.mount(&proxy.addr());
    let (_stop, done, w) = start_writer(&p.rig.mnt);
    for round in 1..=5 {
        wait_progress(&done, round * 200);
        proxy.cut();
    }
    w.join().unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    m.unmount();
}

/// Paths the source logged as needing resync (changes in flight at a crash).
fn resync_paths(rig: &Rig) -> Vec<String> {
    rig.dump()
        .iter()
        .filter(|r| r["op"] == "resync")
        .map(|r| r["path"].as_str().unwrap_or("").to_string())
        .collect()
}

/// After a crash of the mount, everything converges except, at most, the
/// paths logged as needing resync (resolved by the baseline machinery).
fn assert_converged_except_resync(rig: &Rig, mirror: &Path) {
    let marked = resync_paths(rig);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let diffs = replfs::tools::compare_trees(&rig.backing, mirror).unwrap();
        let unexplained: Vec<&String> = diffs
            .iter()
            .filter(|d| {
                !marked
                    .iter()
                    .any(|m| !m.is_empty() && d.contains(m.as_str()))
            })
            .collect();
        if unexplained.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not converged (resync-marked: {marked:?}):\n{unexplained:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mount_killed_mid_stream_then_ship_drains_the_backlog() {
    let mut p = Pair::new(7);
    let m = p.mount(&p.mirror.addr());
    let (stop, done, w) = start_writer(&p.rig.mnt);
    wait_progress(&done, 400);
    // Stop the mirror so a backlog builds up, then kill the mount with it.
    p.mirror.kill9();
    wait_progress(&done, 800);
    m.kill9();
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    // A remount logs in-flight paths for resync; unmount again, leaving the backlog.
    let m = p.mount(&p.mirror.addr());
    m.unmount();
    p.mirror.restart();
    let out = replfs(&["ship", "--state", p.rig.state.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "replfs ship: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("acknowledged"));
    assert_converged_except_resync(&p.rig, &p.mirror.dir);
}

#[test]
fn remount_resumes_shipping_from_the_acked_position() {
    let mut p = Pair::new(7);
    let m = p.mount(&p.mirror.addr());
    fs::write(p.rig.mnt.join("one"), b"first").unwrap();
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    m.unmount();
    p.mirror.stop();
    // Changes while the mirror is down stay in the WAL ...
    let m = p.mount(&p.mirror.addr());
    fs::write(p.rig.mnt.join("two"), pattern(200_000, 2)).unwrap();
    fs::remove_file(p.rig.mnt.join("one")).unwrap();
    m.unmount();
    // ... and reach the mirror when it is back, with the next mount.
    p.mirror.restart();
    let m = p.mount(&p.mirror.addr());
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
    m.unmount();
}

#[test]
fn a_wrong_key_is_refused() {
    let p = Pair::new(7);
    let wrong = key_file(p.rig.tmp.path(), "wrong-key", 99);
    let m = Mount::start_shipping(&p.rig, None, &p.mirror.addr(), &wrong);
    fs::write(p.rig.mnt.join("secret"), b"must not arrive").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !p.mirror.dir.join("secret").exists(),
        "nothing reaches a mirror that refused the key"
    );
    m.unmount();
    // With the right key the backlog goes through.
    let out = replfs(&[
        "ship",
        "--state",
        p.rig.state.to_str().unwrap(),
        "--key-file",
        p.key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_converged(&p.rig.backing, &p.mirror.dir, CONVERGE);
}

#[test]
fn one_mirror_serves_several_volumes_and_acked_segments_are_retired() {
    let (a, b) = (Rig::new(), Rig::new());
    let base = a.tmp.path();
    let (ka, kb) = (key_file(base, "ka", 1), key_file(base, "kb", 2));
    let (da, db) = (base.join("dr-a"), base.join("dr-b"));
    for d in [&a.backing, &b.backing, &da, &db] {
        fs::create_dir_all(d).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let cfg = base.join("mirror.toml");
    fs::write(
        &cfg,
        format!(
            "[[mirror.volume]]\nid = \"alpha\"\ndir = \"{}\"\nkey_file = \"{}\"\n\n\
             [[mirror.volume]]\nid = \"beta\"\ndir = \"{}\"\nkey_file = \"{}\"\n",
            da.display(),
            ka.display(),
            db.display(),
            kb.display()
        ),
    )
    .unwrap();
    let mirror = MirrorProc::start_config(&base.join("mirror-state"), &cfg, free_port());
    // Small segments so that shipping 24 MiB rolls several of them.
    let src_cfg =
        |vol: &str| format!("[wal]\nsegment_size = \"4MiB\"\n[ship]\nvolume = \"{vol}\"\n");
    let ma = Mount::start_shipping(&a, Some(&src_cfg("alpha")), &mirror.addr(), &ka);
    let mb = Mount::start_shipping(&b, Some(&src_cfg("beta")), &mirror.addr(), &kb);
    for i in 0..12 {
        fs::write(a.mnt.join(format!("a{i}")), pattern(2 << 20, i)).unwrap();
        fs::write(b.mnt.join(format!("b{i}")), pattern(100_000, i + 100)).unwrap();
    }
    wait_converged(&a.backing, &da, CONVERGE);
    wait_converged(&b.backing, &db, CONVERGE);
    // The mirror acknowledged everything: all but the live segment are gone.
    let segs = |state: &Path| {
        fs::read_dir(state.join("wal"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "wal")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while segs(&a.state) > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        segs(&a.state) <= 2,
        "acked segments are retired ({} left)",
        segs(&a.state)
    );
    ma.unmount();
    mb.unmount();
}

#[test]
fn ship_gives_up_after_its_timeout_when_the_mirror_is_unreachable() {
    let rig = Rig::new();
    let key = key_file(rig.tmp.path(), "key", 5);
    let m = rig.mount(None);
    fs::write(rig.mnt.join("pending"), b"backlog").unwrap();
    m.unmount();
    let dead = format!("127.0.0.1:{}", free_port());
    let start = Instant::now();
    let out = replfs(&[
        "ship",
        "--state",
        rig.state.to_str().unwrap(),
        "--mirror",
        &dead,
        "--key-file",
        key.to_str().unwrap(),
        "--timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(start.elapsed() < Duration::from_secs(15));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("acknowledged LSN 0 of"), "{err}");
}
