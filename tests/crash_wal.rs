//! Crashes and damaged logs: kill -9 of the mount loses no fsynced change;
//! a torn tail is cut; a corrupt record in the middle is reported with its
//! segment and offset, never skipped (DESIGN.md invariant 3).

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn segments(state: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(state.join("wal"))
        .expect("wal dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// Offset just past the last non-zero byte (the end of the written records
/// in a preallocated segment).
fn data_end(seg: &Path) -> u64 {
    let b = fs::read(seg).unwrap();
    b.iter()
        .rposition(|&x| x != 0)
        .map(|i| i as u64 + 1)
        .unwrap_or(0)
}

fn content(i: u64) -> Vec<u8> {
    format!("fsynced file {i}\n")
        .repeat(500 + (i as usize % 50))
        .into_bytes()
}

#[test]
fn kill9_loses_no_fsynced_change() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let m = rig.mount(None);
    let synced: Arc<Mutex<BTreeMap<u64, Vec<u8>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (mnt, synced, stop) = (rig.mnt.clone(), synced.clone(), stop.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut i = t;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && i < 100_000 {
                    let body = content(i);
                    let ok = (|| -> std::io::Result<()> {
                        let mut f = fs::File::create(mnt.join(format!("f{i}")))?;
                        f.write_all(&body)?;
                        // Unsynced noise in between.
                        fs::write(mnt.join(format!("noise{}", i % 7)), &body[..100])?;
                        f.sync_all()
                    })();
                    if ok.is_err() {
                        return;
                    }
                    synced.lock().unwrap().insert(i, body);
                    i += 2;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let before = synced.lock().unwrap().len();
    assert!(
        before > 10,
        "workload made progress ({before} fsynced files)"
    );
    m.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    // Restart on the same state: the WAL recovers and the mount serves again.
    let m = rig.mount(None);
    fs::write(rig.mnt.join("after-restart"), b"new life").unwrap();
    m.unmount();
    let replayed = rig.replay("replayed", &[]);
    let synced = synced.lock().unwrap();
    for (i, body) in synced.iter() {
        let name = format!("f{i}");
        assert_eq!(
            &fs::read(rig.backing.join(&name)).unwrap(),
            body,
            "backing {name}"
        );
        assert_eq!(
            &fs::read(replayed.join(&name)).unwrap(),
            body,
            "replayed {name}"
        );
    }
    assert_eq!(
        fs::read(replayed.join("after-restart")).unwrap(),
        b"new life"
    );
    let recs = rig.dump();
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(
            r["lsn"].as_u64(),
            Some(i as u64 + 1),
            "LSNs stay contiguous across the crash"
        );
    }
}

#[test]
fn crash_between_change_and_record_marks_the_path_for_resync() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let m = Mount::start_env(
        &rig.backing,
        &rig.mnt,
        &rig.state,
        None,
        &[("REPLFS_FAILPOINT", "crash-before-log:dir/victim")],
    );
    fs::create_dir(rig.mnt.join("dir")).unwrap();
    fs::write(rig.mnt.join("dir/bystander"), b"logged").unwrap();
    // The create of dir/victim reaches BACKING, then the daemon dies before logging it.
    assert!(fs::write(rig.mnt.join("dir/victim"), b"lost?").is_err());
    m.wait_crashed();
    assert!(
        rig.backing.join("dir/victim").exists(),
        "the change reached BACKING"
    );
    // The next start logs the in-flight path as needing resync, first thing.
    let m = rig.mount(None);
    m.unmount();
    let recs = rig.dump();
    let resync: Vec<_> = recs.iter().filter(|r| r["op"] == "resync").collect();
    assert_eq!(resync.len(), 1, "{recs:?}");
    assert_eq!(resync[0]["path"], "dir/victim");
    // The parent's metadata as BACKING has it follows, so its mtime converges.
    let at = recs.iter().position(|r| r["op"] == "resync").unwrap();
    assert_eq!(recs[at + 1]["op"], "setattr", "{:?}", recs[at + 1]);
    assert_eq!(recs[at + 1]["path"], "dir");
    assert!(
        recs.iter()
            .any(|r| r["op"] == "write" && r["path"] == "dir/bystander")
    );
    assert!(
        !recs
            .iter()
            .any(|r| r["op"] != "resync" && r["path"] == "dir/victim")
    );
}

/// Writes a few records through a mount and unmounts cleanly.
fn small_log(rig: &Rig, files: usize) {
    let m = rig.mount(None);
    for i in 0..files {
        fs::write(
            rig.mnt.join(format!("file{i}")),
            format!("record {i}\n").repeat(20),
        )
        .unwrap();
    }
    m.unmount();
}

#[test]
fn torn_tail_is_cut_and_logging_continues() {
    let rig = Rig::new();
    small_log(&rig, 10);
    let before = rig.dump();
    let n = before.len();
    let seg = segments(&rig.state).pop().unwrap();
    let end = data_end(&seg);
    // The last record lost its last bytes (a torn write): zero them.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0u8; 6], end - 6).unwrap();
    drop(f);
    let m = rig.mount(None);
    fs::write(rig.mnt.join("after"), b"after the cut").unwrap();
    m.unmount();
    let recs = rig.dump();
    let lsns: Vec<u64> = recs.iter().map(|r| r["lsn"].as_u64().unwrap()).collect();
    assert_eq!(
        lsns,
        (1..=lsns.len() as u64).collect::<Vec<_>>(),
        "contiguous after the cut"
    );
    let key = |r: &serde_json::Value| (r["lsn"].clone(), r["op"].clone(), r["path"].clone());
    let kept: Vec<_> = recs[..n - 1].iter().map(key).collect();
    let orig: Vec<_> = before[..n - 1].iter().map(key).collect();
    assert_eq!(kept, orig, "every whole record before the torn one is kept");
    assert_ne!(
        key(&recs[n - 1]),
        key(&before[n - 1]),
        "the torn record is gone"
    );
    assert!(
        recs[n - 1..].iter().any(|r| r["path"] == "after"),
        "logging continues at LSN {n}"
    );
}

#[test]
fn truncated_segment_is_a_torn_tail() {
    let rig = Rig::new();
    small_log(&rig, 5);
    let n = rig.dump().len();
    let seg = segments(&rig.state).pop().unwrap();
    let end = data_end(&seg);
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(end - 3)
        .unwrap();
    let recs = rig.dump();
    assert_eq!(recs.len(), n - 1, "the cut-short record is not listed");
    let m = rig.mount(None);
    fs::write(rig.mnt.join("after"), b"x").unwrap();
    m.unmount();
    let recs = rig.dump();
    assert_eq!(
        recs.last().unwrap()["lsn"].as_u64(),
        Some(recs.len() as u64)
    );
}

#[test]
fn corrupt_middle_record_is_reported_with_segment_and_offset() {
    let rig = Rig::new();
    small_log(&rig, 20);
    let seg = segments(&rig.state).pop().unwrap();
    let end = data_end(&seg);
    // Flip one bit well inside the written records (not the tail).
    let off = end / 3;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], off).unwrap();
    drop(f);
    let seg_name = seg.file_name().unwrap().to_string_lossy().to_string();
    // log dump prints what it can, then fails naming the segment and offset.
    let out = replfs(&[
        "log",
        "dump",
        "--json",
        "--state",
        rig.state.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "dump must fail on a corrupt middle record"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&seg_name), "error names the segment: {err}");
    assert!(err.contains("offset"), "error names the offset: {err}");
    // The mount refuses to start rather than silently skipping.
    let out = std::process::Command::new(BIN)
        .arg("mount")
        .arg(&rig.backing)
        .arg(&rig.mnt)
        .arg("--state")
        .arg(&rig.state)
        .arg("-f")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&seg_name) && err.contains("offset"),
        "mount error names segment and offset: {err}"
    );
    assert!(!is_mounted(&rig.mnt));
}

#[test]
fn bad_config_is_refused_with_a_clear_message() {
    let rig = Rig::new();
    let cfg = rig.path("bad.toml");
    fs::write(
        &cfg,
        "[wal]\ndurability = \"batch\"\nsegmnt_size = \"64MiB\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("mount")
        .arg(&rig.backing)
        .arg(&rig.mnt)
        .arg("--state")
        .arg(&rig.state)
        .arg("--config")
        .arg(&cfg)
        .arg("-f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("segmnt_size") && err.contains("line 3"),
        "{err}"
    );
    // A state dir inside the backing directory is refused.
    let out = std::process::Command::new(BIN)
        .arg("mount")
        .arg(&rig.backing)
        .arg(&rig.mnt)
        .arg("--state")
        .arg(rig.backing.join("state"))
        .arg("-f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must not lie inside"));
}
