//! Baseline and delta sync, verify and coalescing end to end: a real mount
//! with data that existed before it, a real mirror on 127.0.0.1, trees
//! compared byte for byte.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::workload::{mixed_workload, pattern};
use common::*;

const CONVERGE: Duration = Duration::from_secs(90);

impl Pair {
    fn mount(&self, config: Option<&str>) -> Mount {
        Mount::start_shipping(&self.rig, config, &self.mirror.addr(), &self.key)
    }

    fn status(&self) -> serde_json::Value {
        status_json(&self.rig.state)
    }

    /// Waits until the mirror equals BACKING and nothing is left to repair.
    /// The trees are identical and the shipper is done: connected, no sync
    /// running (an empty tree is identical before its baseline has even
    /// begun), nothing to ship, no repair waiting.
    fn converge(&self) {
        wait_converged(&self.rig.backing, &self.mdir, CONVERGE);
        wait_status(&self.rig.state, CONVERGE, "shipper not settled", |st| {
            st["link"] == "connected"
                && st["sync"]["phase"] == "idle"
                && st["sync"]["baselines"].as_u64() >= Some(1)
                && st["lag_records"] == 0
                && st["resync_pending"] == 0
        });
        wait_converged(&self.rig.backing, &self.mdir, CONVERGE);
    }

    fn verify(&self, json: bool) -> (i32, String) {
        let mut a = vec!["verify", "--state", self.rig.state.to_str().unwrap()];
        if json {
            a.push("--json");
        }
        let out = replfs(&a);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 1,
            "verify failed ({code}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code, text)
    }
}

/// The status once the mirror acknowledged the head and the daemon's
/// snapshot (refreshed every second) has caught up with it.
fn settled_status(state: &Path) -> serde_json::Value {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let st = status_json(state);
        if st["acked_lsn"] == st["head_lsn"] && st["resync_pending"] == 0 {
            std::thread::sleep(Duration::from_millis(1500));
            return status_json(state);
        }
        assert!(Instant::now() < deadline, "never settled: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` files of `size` bytes in `dirs` directories below `root`.
fn make_files(root: &Path, n: usize, dirs: usize, size: usize) -> u64 {
    let mut total = 0;
    for i in 0..n {
        let d = root.join(format!("d{:03}", i % dirs));
        fs::create_dir_all(&d).unwrap();
        let data = pattern(size + i % 97, i as u64);
        total += data.len() as u64;
        fs::write(d.join(format!("f{i:05}")), data).unwrap();
    }
    total
}

#[test]
fn thousands_of_preexisting_files_reach_an_empty_mirror_and_verify_clean() {
    let p = Pair::new(9);
    make_files(&p.rig.backing, 3000, 40, 700);
    fs::create_dir_all(p.rig.backing.join("deep/er/est")).unwrap();
    std::os::unix::fs::symlink("../../d000", p.rig.backing.join("deep/er/link")).unwrap();
    let m = p.mount(None);
    p.converge();
    let st = settled_status(&p.rig.state);
    assert_eq!(st["sync"]["baselines"], 1, "{st}");
    assert_eq!(st["sync"]["files_done"], st["sync"]["files_total"], "{st}");
    let (code, text) = p.verify(false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("identical"), "{text}");
    // The mirror is damaged behind replfs's back: same size, same mtime.
    let victim = p.mdir.join("d007/f00007");
    let mtime = fs::metadata(&victim).unwrap().modified().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&victim).unwrap();
    f.write_all_at(b"XX", 10).unwrap();
    f.set_modified(mtime).unwrap();
    fs::remove_file(p.mdir.join("d001/f00001")).unwrap();
    let (code, text) = p.verify(false);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("content   d007/f00007"), "{text}");
    assert!(text.contains("missing   d001/f00001"), "{text}");
    let (code, json) = p.verify(true);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["identical"], false);
    // The file's content, the missing file, and its directory's mtime.
    assert_eq!(v["differences"].as_array().unwrap().len(), 3, "{v}");
    // `--repair` hands them to the running mount, which compares blocks.
    let out = replfs(&[
        "verify",
        "--repair",
        "--state",
        p.rig.state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("recorded for repair"));
    p.converge();
    let (code, text) = p.verify(false);
    assert_eq!(code, 0, "{text}");
    m.unmount();
}

#[test]
fn a_mirror_holding_most_of_the_data_receives_only_the_differences() {
    let p = Pair::new(9);
    let total = make_files(&p.rig.backing, 200, 10, 64 << 10);
    // The DR copy was seeded out of band (e.g. from a backup)...
    sh(
        p.rig.tmp.path(),
        &format!("cp -a {}/. {}/", p.rig.backing.display(), p.mdir.display()),
    );
    // ... and the source moved on a little since: 5 files changed in place,
    // one removed, one added; the mirror holds a file the source never had.
    for i in [3usize, 50, 77, 120, 199] {
        let f = p.rig.backing.join(format!("d{:03}/f{i:05}", i % 10));
        let h = fs::OpenOptions::new().write(true).open(&f).unwrap();
        h.write_all_at(b"changed!", 30_000).unwrap();
    }
    fs::remove_file(p.rig.backing.join("d004/f00004")).unwrap();
    fs::write(p.rig.backing.join("new"), b"new file").unwrap();
    fs::write(p.mdir.join("stale"), b"only on the mirror").unwrap();
    let m = p.mount(None);
    p.converge();
    let st = settled_status(&p.rig.state);
    let sent = st["sync"]["bytes_sent"].as_u64().unwrap();
    let data = st["sync"]["data_sent"].as_u64().unwrap();
    eprintln!(
        "delta baseline: {sent} bytes on the wire ({data} of file data) for a {total}-byte tree ({:.4} of it)",
        sent as f64 / total as f64
    );
    assert!(
        data <= 5 * (64 << 10) + 100,
        "only the changed blocks travel: {data}"
    );
    assert!(sent < total / 20, "{sent} of {total} bytes sent");
    assert_eq!(p.verify(false).0, 0);
    m.unmount();
}

#[test]
fn writes_during_the_baseline_are_not_lost() {
    let p = Pair::new(9);
    // Enough data that the baseline takes a few seconds at the throttle.
    make_files(&p.rig.backing, 60, 6, 1 << 20);
    let cfg = "[throttle]\nrate = \"16MiB/s\"\n";
    let m = p.mount(Some(cfg));
    // Change the tree through the mount while the baseline runs: new files,
    // rewrites of files not yet copied, renames of directories, removals.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut i = 0u64;
    while Instant::now() < deadline && i < 200 {
        let d = p.rig.mnt.join(format!("d{:03}", i % 6));
        fs::write(d.join(format!("new{i}")), pattern(5000, i)).unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(d.join(format!("f{:05}", (i * 7 % 60) as usize)))
            .ok();
        if let Some(f) = f {
            f.write_all_at(&pattern(4096, i + 1), (i * 4096) % (1 << 20))
                .unwrap();
        }
        if i % 50 == 10 {
            fs::rename(
                p.rig.mnt.join(format!("d{:03}", i % 6)),
                p.rig.mnt.join(format!("renamed{i}")),
            )
            .unwrap();
            fs::create_dir(p.rig.mnt.join(format!("d{:03}", i % 6))).unwrap();
        }
        if i % 13 == 0 {
            let _ = fs::remove_file(d.join(format!("new{}", i / 2)));
        }
        i += 1;
    }
    mixed_workload(&p.rig.mnt);
    let st = p.status();
    assert!(
        st["sync"]["baselines"].as_u64().unwrap_or(0) <= 1,
        "one baseline: {st}"
    );
    p.converge();
    let (code, text) = p.verify(false);
    assert_eq!(code, 0, "{text}");
    m.unmount();
}

#[test]
fn coalescing_cuts_the_bytes_sent_for_overwrites() {
    fn run(coalesce: bool) -> (u64, u64) {
        let p = Pair::new(9);
        let cfg = format!("[ship]\ncoalesce = {coalesce}\nbatch_bytes = \"8MiB\"\n");
        let m = p.mount(Some(&cfg));
        p.converge();
        // The mirror is down while the application rewrites the same blocks:
        // the shipper falls behind.
        let mut mirror = p.mirror;
        mirror.stop();
        let f = fs::File::create(p.rig.mnt.join("db")).unwrap();
        for round in 0..40u64 {
            for blk in 0..16u64 {
                f.write_all_at(&pattern(16 << 10, round * 100 + blk), blk * (16 << 10))
                    .unwrap();
            }
        }
        f.sync_all().unwrap();
        drop(f);
        mirror.restart();
        wait_converged(&p.rig.backing, &p.mdir, CONVERGE);
        let st = settled_status(&p.rig.state);
        m.unmount();
        (
            st["wire_bytes"].as_u64().unwrap(),
            st["coalesced_records"].as_u64().unwrap(),
        )
    }
    let (plain, none) = run(false);
    let (coalesced, dropped) = run(true);
    eprintln!(
        "overwrite workload: {plain} wire bytes plain, {coalesced} coalesced \
         ({dropped} records left out): ratio {:.3}",
        coalesced as f64 / plain as f64
    );
    assert_eq!(none, 0);
    assert!(dropped > 100, "{dropped}");
    assert!(coalesced * 3 < plain, "{coalesced} vs {plain}");
}

#[test]
fn paths_the_mirror_doubts_are_repaired_by_checksums() {
    let p = Pair::new(9);
    make_files(&p.rig.backing, 20, 2, 10_000);
    let m = p.mount(None);
    p.converge();
    // The mirror learns (e.g. from an exchange interrupted by its crash)
    // that d001/f00003 may be wrong; and indeed it is, with the source's
    // size and mtime, so only a checksum can tell.
    let mut mirror = p.mirror;
    mirror.stop();
    let victim = p.mdir.join("d001/f00003");
    let mtime = fs::metadata(&victim).unwrap().modified().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&victim).unwrap();
    f.write_all_at(b"rotten", 100).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let db = rusqlite::Connection::open(mirror.state.join("mirror.db")).unwrap();
    db.execute(
        "INSERT INTO resync (volume, path, reason, lsn, time_ns) VALUES ('default', ?1, 'test', 1, 0)",
        [b"d001/f00003".to_vec()],
    )
    .unwrap();
    drop(db);
    mirror.restart();
    let pair = Pair {
        rig: p.rig,
        key: p.key,
        mdir: p.mdir,
        mirror,
    };
    pair.converge();
    let db = rusqlite::Connection::open(pair.mirror.state.join("mirror.db")).unwrap();
    let left: i64 = db
        .query_row("SELECT COUNT(*) FROM resync", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "the mirror's request is dropped once repaired");
    assert_eq!(settled_status(&pair.rig.state)["sync"]["repairs"], 1);
    m.unmount();
}

#[test]
fn verify_while_both_run_lists_lag_as_in_flight() {
    let p = Pair::new(9);
    make_files(&p.rig.backing, 50, 5, 20_000);
    // A slow link keeps the mirror behind the writer.
    let m = p.mount(Some("[throttle]\nrate = \"256KiB/s\"\n"));
    p.converge();
    let mnt = p.rig.mnt.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..300u64 {
            let d = mnt.join(format!("d{:03}", i % 5));
            fs::write(d.join(format!("w{}", i % 40)), pattern(8000, i)).unwrap();
            if i % 7 == 0 {
                let _ = fs::remove_file(d.join(format!("w{}", (i + 3) % 40)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut in_flight_seen = 0;
    for _ in 0..3 {
        let (code, json) = p.verify(true);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(code, 0, "only changes in flight differ: {v}");
        in_flight_seen += v["in_flight"].as_array().unwrap().len();
    }
    writer.join().unwrap();
    assert!(in_flight_seen > 0, "the mirror was behind while verifying");
    p.converge();
    assert_eq!(p.verify(false).0, 0);
    m.unmount();
}

#[test]
fn a_baseline_cut_by_a_mirror_crash_starts_over_and_completes() {
    let p = Pair::new(9);
    make_files(&p.rig.backing, 40, 4, 1 << 20);
    // Slow enough that the mirror dies in the middle of the copy.
    let m = p.mount(Some("[throttle]\nrate = \"8MiB/s\"\n"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.status()["sync"]["bytes_done"].as_u64().unwrap_or(0) < (8 << 20) {
        assert!(Instant::now() < deadline, "the baseline never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    let Pair {
        rig,
        key,
        mdir,
        mut mirror,
    } = p;
    mirror.kill9();
    fs::write(rig.mnt.join("during-the-outage"), b"x").unwrap();
    mirror.restart();
    let p = Pair {
        rig,
        key,
        mdir,
        mirror,
    };
    p.converge();
    let st = settled_status(&p.rig.state);
    assert_eq!(st["sync"]["baselines"], 1, "one finished baseline: {st}");
    assert_eq!(p.verify(false).0, 0);
    m.unmount();
}

#[test]
fn a_mount_killed_during_its_baseline_is_finished_by_replfs_ship() {
    let p = Pair::new(9);
    make_files(&p.rig.backing, 30, 3, 1 << 20);
    let m = p.mount(Some("[throttle]\nrate = \"8MiB/s\"\n"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.status()["sync"]["bytes_done"].as_u64().unwrap_or(0) < (6 << 20) {
        assert!(Instant::now() < deadline, "the baseline never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    m.kill9();
    // No mount: `replfs ship` finds the backing dir and the unfinished
    // baseline in the state dir, and completes both.
    let out = replfs(&["ship", "--state", p.rig.state.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "ship: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not finish"),
        "the baseline starts over"
    );
    wait_converged(&p.rig.backing, &p.mdir, CONVERGE);
    assert_eq!(p.verify(false).0, 0);
}
