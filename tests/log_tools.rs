//! `replfs log verify` and `replfs log stats` end to end: a real multi-segment
//! WAL is written through the library (no FUSE), damaged in known ways, and
//! the real binary must report exactly that damage and the known workload.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use replfs::config::WalConfig;
use replfs::wal::reader::SegmentScanner;
use replfs::wal::{Attr, Lsn, NodeKind, Op, Wal, WalReader};
use serde_json::Value;

const SEGMENT_SIZE: u64 = 4 << 20;
/// Payload of every write: 300 of them make 9 000 000 data bytes (> 8 MiB,
/// so the log spans three 4 MiB segments).
const WRITE_LEN: usize = 30_000;
const WRITES: u64 = 300;
const FILES: [&str; 4] = ["data/sub/f0", "data/sub/f1", "data/sub/f2", "data/sub/f3"];
const HOT: &str = "hot/h";

/// A WAL written to a temp state dir, and what went into it.
struct Built {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    /// Last LSN written.
    total: Lsn,
    /// (original, overwrite) LSNs of writes to the same path and range.
    pairs: Vec<(Lsn, Lsn)>,
}

fn attr() -> Attr {
    Attr {
        mode: 0o100644,
        ..Attr::default()
    }
}

fn create(path: &str) -> Op<'static> {
    Op::Create {
        path: path.into(),
        kind: NodeKind::File,
        rdev: 0,
        attr: attr(),
        parent_mtime: Default::default(),
    }
}

fn write(path: &str, offset: u64, fill: u8) -> Op<'static> {
    Op::Write {
        path: path.into(),
        offset,
        data: vec![fill; WRITE_LEN].into(),
        attr: attr(),
    }
}

/// 5 creates, 220 writes to distinct ranges of `data/sub/f*`, and 40 pairs
/// of writes to `hot/h` where the second covers exactly the first.
fn build() -> Built {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let cfg = WalConfig {
        segment_size: SEGMENT_SIZE,
        ..Default::default()
    };
    let (wal, _) = Wal::open(&state, &cfg).expect("open wal");
    for p in FILES.iter().chain([&HOT]) {
        wal.append(&create(p)).expect("append create");
    }
    let mut pairs = Vec::new();
    for k in 0..220u64 {
        let f = FILES[(k % 4) as usize];
        wal.append(&write(f, (k / 4) * WRITE_LEN as u64, k as u8))
            .expect("append write");
        if k % 5 == 0 && pairs.len() < 40 {
            let off = pairs.len() as u64 * WRITE_LEN as u64;
            let a = wal.append(&write(HOT, off, 1)).expect("append");
            let b = wal.append(&write(HOT, off, 2)).expect("append");
            pairs.push((a, b));
        }
    }
    let total = wal.head_lsn();
    wal.sync(total).expect("sync");
    wal.close().expect("close");
    drop(wal);
    assert_eq!(total, 5 + WRITES);
    Built {
        _tmp: tmp,
        state,
        total,
        pairs,
    }
}

/// Runs the real binary: (exit code, stdout, stderr).
fn replfs(args: &[&str], state: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_replfs"))
        .args(args)
        .arg("--state")
        .arg(state)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run replfs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(args: &[&str], state: &Path, want_code: i32) -> Value {
    let (code, out, err) = replfs(args, state);
    assert_eq!(code, want_code, "stdout:\n{out}\nstderr:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn segments(state: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(state.join("wal"))
        .expect("read wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// (offset, LSN) of every frame of a segment.
fn frames(seg: &Path) -> Vec<(u64, Lsn)> {
    let mut sc = SegmentScanner::open(seg).expect("open segment");
    let mut out = Vec::new();
    while let Some(f) = sc.next_frame().expect("scan") {
        out.push((f.offset, f.header.lsn));
    }
    out
}

fn problems(v: &Value) -> &Vec<Value> {
    v["problems"].as_array().expect("problems array")
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn verify_passes_a_sound_multi_segment_log() {
    let b = build();
    assert_eq!(segments(&b.state).len(), 3, "the workload spans 3 segments");
    let v = json_of(&["log", "verify", "--json"], &b.state, 0);
    assert_eq!(v["ok"], true);
    assert_eq!(v["segments"], 3);
    assert_eq!(v["records"], b.total);
    assert_eq!(
        (v["first_lsn"].as_u64(), v["last_lsn"].as_u64()),
        (Some(1), Some(b.total))
    );
    assert!(problems(&v).is_empty(), "{v}");

    let (code, out, _) = replfs(&["log", "verify"], &b.state);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("records: {} (LSN 1..={})", b.total, b.total)),
        "{out}"
    );
    assert!(out.contains("the log is sound"), "{out}");
}

#[test]
fn verify_reports_a_flipped_bit_and_reads_on_past_it() {
    let b = build();
    let seg = segments(&b.state)[1].clone();
    let fr = frames(&seg);
    let (off, lsn) = fr[3];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .expect("open");
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, off + 500).expect("read");
    f.write_all_at(&[byte[0] ^ 0x08], off + 500).expect("flip");

    let v = json_of(&["log", "verify", "--json"], &b.state, 1);
    assert_eq!(v["ok"], false);
    assert_eq!(
        v["records"],
        b.total - 1,
        "every other record still counted: {v}"
    );
    assert_eq!(v["last_lsn"], b.total);
    let p = problems(&v);
    assert_eq!(p.len(), 1, "{v}");
    assert_eq!(p[0]["segment"], name(&seg));
    assert_eq!(p[0]["offset"], off);
    assert_eq!(p[0]["severity"], "error");
    let msg = p[0]["message"].as_str().expect("message");
    let (next_off, _) = fr[4];
    for want in [
        format!("CRC mismatch in record {lsn}"),
        format!("records {}..={} are readable", fr[0].1, lsn - 1),
        format!(
            "record {lsn} is lost; {}.. are readable from offset {next_off}",
            lsn + 1
        ),
    ] {
        assert!(msg.contains(&want), "{want:?} not in {msg:?}");
    }

    let (code, out, _) = replfs(&["log", "verify"], &b.state);
    assert_eq!(code, 1);
    assert!(
        out.contains(&format!("error: {} at offset {off}", name(&seg))),
        "{out}"
    );
    assert!(out.contains("NOT sound"), "{out}");
}

#[test]
fn verify_reports_a_truncated_middle_segment() {
    let b = build();
    let segs = segments(&b.state);
    let fr = frames(&segs[1]);
    let (cut, lsn) = fr[5];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[1])
        .expect("open");
    f.set_len(cut + 100).expect("truncate");

    let v = json_of(&["log", "verify", "--json"], &b.state, 1);
    let p = problems(&v);
    assert!(
        p.iter().any(|x| x["segment"] == name(&segs[1])
            && x["offset"] == cut
            && x["message"]
                .as_str()
                .is_some_and(|m| m.contains("runs past the end"))),
        "{v}"
    );
    let lost = frames(&segs[2])[0].1 - lsn;
    assert!(
        p.iter().any(|x| x["segment"] == name(&segs[2])
            && x["message"].as_str().is_some_and(|m| m.contains("LSN gap"))),
        "{v}"
    );
    assert_eq!(v["records"], b.total - lost, "{v}");
}

#[test]
fn verify_names_the_gap_left_by_a_missing_segment() {
    let b = build();
    let segs = segments(&b.state);
    let (first_missing, next_first) = (frames(&segs[1])[0].1, frames(&segs[2])[0].1);
    std::fs::remove_file(&segs[1]).expect("delete");

    let v = json_of(&["log", "verify", "--json"], &b.state, 1);
    let p = problems(&v);
    assert_eq!(p.len(), 1, "{v}");
    assert_eq!(p[0]["segment"], name(&segs[2]));
    assert_eq!(p[0]["offset"], 0);
    let msg = p[0]["message"].as_str().expect("message");
    assert!(msg.contains(&name(&segs[0])), "{msg}");
    let missing = format!("records {first_missing}..={} are missing", next_first - 1);
    assert!(msg.contains(&missing), "{msg}");
    assert_eq!(v["segments"], 2);
}

#[test]
fn verify_warns_about_a_torn_tail_and_fails_to_run_without_a_state_dir() {
    let b = build();
    let last = segments(&b.state)[2].clone();
    let end = frames(&last).last().map(|&(off, _)| off).expect("frames");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open");
    // A frame header cut short: the debris of an unfinished append.
    let debris_at = end + 30_085;
    f.write_all_at(&[0x40, 0, 0, 0, 1, 2, 3], debris_at)
        .expect("debris");

    let v = json_of(&["log", "verify", "--json"], &b.state, 0);
    let p = problems(&v);
    assert_eq!(p.len(), 1, "{v}");
    assert_eq!(p[0]["severity"], "warning");
    let msg = p[0]["message"].as_str().expect("message");
    assert!(msg.starts_with("torn tail at offset"), "{msg}");
    assert!(msg.contains("will be cut on next mount"), "{msg}");

    let (code, _, err) = replfs(&["log", "verify"], &b.state.join("nope"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no such state directory"), "{err}");
}

#[test]
fn verify_while_a_writer_appends_finds_no_corruption() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let cfg = WalConfig {
        segment_size: SEGMENT_SIZE,
        ..Default::default()
    };
    let (wal, _) = Wal::open(&state, &cfg).expect("open wal");
    wal.append(&create("live")).expect("append");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Small appends, paced, as a mount would make them; `admit` first so the
    // spare segment keeps up (a refused change is simply retried).
    let writer = {
        let (wal, stop) = (wal.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut off = 0;
            for _ in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let op = Op::Write {
                    path: "live".into(),
                    offset: off,
                    data: vec![7u8; 3000].into(),
                    attr: attr(),
                };
                if wal.admit().is_ok() && wal.append(&op).is_ok() {
                    off += 3000;
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        })
    };
    for _ in 0..5 {
        let v = json_of(&["log", "verify", "--json"], &state, 0);
        let errors = problems(&v).iter().filter(|p| p["severity"] == "error");
        assert_eq!(errors.count(), 0, "{v}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    wal.close().expect("close");
}

/// The coalescing saving the workload was built to have: each overwritten
/// write counts when it and its overwrite fall in the same calendar minute.
fn expected_saving(b: &Built) -> u64 {
    let times: Vec<i64> = WalReader::open(&b.state)
        .expect("reader")
        .iter_from(0)
        .map(|r| r.expect("record").time_ns)
        .collect();
    let minute = |lsn: Lsn| times[(lsn - 1) as usize].div_euclid(60_000_000_000);
    let same = b.pairs.iter().filter(|(a, o)| minute(*a) == minute(*o));
    same.count() as u64 * WRITE_LEN as u64
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn stats_report_the_known_workload_and_the_bandwidth_formula() {
    let b = build();
    let v = json_of(&["log", "stats", "--json"], &b.state, 0);
    let data = v["data_bytes"].as_f64().expect("data_bytes");
    assert!((data - 9_000_000.0).abs() <= 90_000.0, "{v}");
    assert_eq!(v["records"], b.total);
    let bytes = v["bytes"].as_f64().expect("bytes");
    assert!(bytes > data && bytes < data * 1.01, "{v}");
    assert_eq!(v["coalesce_saving_bytes"], expected_saving(&b), "{v}");
    assert!(v["coalesce_saving_bytes"].as_u64() > Some(0), "{v}");
    assert_eq!(v["top_dirs"][0]["dir"], "data/sub", "{v}");
    assert_eq!(v["top_dirs"][1]["dir"], "hot", "{v}");
    assert_eq!(v["rpo_seconds"], 900.0);
    let peak_min = v["per_minute"]["peak"].as_f64().expect("peak");
    assert!(
        peak_min <= bytes && v["per_minute"]["avg"].as_f64() > Some(0.0),
        "{v}"
    );

    // mbit = most bytes in any RPO window / RPO seconds * 8 / 0.7 / 1e6.
    let v1 = json_of(&["log", "stats", "--json", "--rpo", "1m"], &b.state, 0);
    assert_eq!(v1["rpo_seconds"], 60.0);
    for (r, secs) in [(&v, 900.0), (&v1, 60.0)] {
        let window = r["peak_rpo_window_bytes"].as_f64().expect("window");
        let want = window / secs * 8.0 / 0.7 / 1e6;
        assert!(
            close(r["mbit_for_rpo"].as_f64().expect("mbit"), want),
            "{r}"
        );
        assert!(window <= bytes && window >= peak_min.min(bytes), "{r}");
    }
    if v["span_seconds"].as_f64() < Some(59.0) {
        // The whole log fits in both windows: a 15x shorter RPO needs 15x the rate.
        let ratio =
            v1["mbit_for_rpo"].as_f64().expect("1m") / v["mbit_for_rpo"].as_f64().expect("15m");
        assert!(close(ratio, 15.0), "{ratio}");
    }
    // A log shorter than a day: the day's changes are all of it, in 8 h.
    let night = bytes / (8.0 * 3600.0) * 8.0 / 0.7 / 1e6;
    assert!(
        close(v["mbit_for_night_catchup"].as_f64().expect("night"), night),
        "{v}"
    );
    assert_eq!(v1["mbit_for_night_catchup"], v["mbit_for_night_catchup"]);
}

#[test]
fn stats_human_report_explains_its_method() {
    let b = build();
    let (code, out, err) = replfs(&["log", "stats", "--rpo", "1m"], &b.state);
    assert_eq!(code, 0, "{err}");
    for want in [
        "per minute peak",
        "data/sub",
        "coalescing:",
        "method:",
        "RPO 1m:",
        "Mbit/s",
        "night catch-up",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    let (code, _, err) = replfs(&["log", "stats", "--rpo", "soon"], &b.state);
    assert_eq!(code, 2, "{err}");
}

/// Random damage anywhere never makes verify panic, and damage to the
/// records of a segment that is not the last is always an error.
#[test]
fn verify_survives_random_damage() {
    let b = build();
    let segs = segments(&b.state);
    let used: Vec<u64> = segs
        .iter()
        .map(|s| frames(s).last().map_or(64, |&(off, _)| off + 30_000))
        .collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..24 {
        let i = (next() % 3) as usize;
        let at = next() % used[i];
        let len = if round % 3 == 0 { 64 } else { 1 };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segs[i])
            .expect("open");
        let mut saved = vec![0u8; len];
        f.read_exact_at(&mut saved, at).expect("read");
        let junk: Vec<u8> = saved.iter().map(|&x| x ^ (next() as u8 | 1)).collect();
        f.write_all_at(&junk, at).expect("damage");
        let report = replfs::tools::verify(&b.state).expect("verify runs");
        if i < 2 {
            assert!(!report.ok(), "{i} @ {at}: {report:?}");
        }
        f.write_all_at(&saved, at).expect("restore");
    }
    assert!(replfs::tools::verify(&b.state).expect("verify").ok());
}
