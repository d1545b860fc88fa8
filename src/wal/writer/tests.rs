//! Tests of the writer: recovery cases, segment rolls, group commit, full disk.

use std::borrow::Cow;
use std::collections::HashMap;

use super::*;
use crate::wal::reader::{SegmentScanner, WalReader};
use crate::wal::record::{Attr, Record};

pub(crate) fn cfg(durability: Durability) -> WalConfig {
    WalConfig {
        durability,
        segment_size: 4 << 20,
        ..WalConfig::default()
    }
}

pub(crate) fn write_op(i: u64, len: usize) -> Op<'static> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    Op::Write {
        path: format!("d/f{}", i % 7).into_bytes(),
        offset: i * 10,
        data: Cow::Owned(data),
        attr: Attr::default(),
    }
}

fn open(dir: &Path, c: &WalConfig) -> (Wal, RecoveryReport) {
    Wal::open(dir, c).unwrap()
}

fn all_records(dir: &Path) -> Vec<Record> {
    WalReader::open(dir)
        .unwrap()
        .iter_from(0)
        .collect::<Result<_, _>>()
        .unwrap()
}

fn seg_paths(dir: &Path) -> Vec<PathBuf> {
    segment::list_segments(&segment::wal_dir(dir))
        .unwrap()
        .into_iter()
        .map(|s| s.1)
        .collect()
}

/// Offsets of the valid frames of a segment, plus the end of the last one.
fn frame_offsets(path: &Path) -> (Vec<u64>, u64) {
    let mut sc = SegmentScanner::open(path).unwrap();
    let mut offs = vec![];
    while let Some(f) = sc.next_frame().unwrap() {
        offs.push(f.offset);
    }
    (offs, sc.position())
}

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    segment::open_rw(path)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

fn flip_bit(path: &Path, off: u64) {
    let f = segment::open_rw(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x04], off).unwrap();
}

#[test]
fn reopen_after_close_continues_lsns() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!(
        (
            rep.head_lsn,
            rep.unclean_shutdown,
            rep.truncated_tail.clone()
        ),
        (0, false, None)
    );
    for i in 1..=100 {
        assert_eq!(wal.append(&write_op(i, 100)).unwrap(), i);
    }
    wal.close().unwrap();
    wal.close().unwrap();
    assert!(matches!(wal.append(&write_op(0, 1)), Err(WalError::Closed)));
    drop(wal);
    let (wal, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!(
        (rep.head_lsn, rep.unclean_shutdown, rep.segments),
        (100, false, 1)
    );
    assert_eq!(wal.append(&write_op(101, 100)).unwrap(), 101);
    drop(wal);
    let recs = all_records(dir.path());
    assert_eq!(recs.len(), 101);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!((r.lsn, &r.op), (i as u64 + 1, &write_op(i as u64 + 1, 100)));
    }
    let (_, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert!(rep.unclean_shutdown, "dropped without close");
}

#[test]
fn second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_wal, _) = open(dir.path(), &cfg(Durability::Batch));
    let err = Wal::open(dir.path(), &cfg(Durability::Batch))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("is in use by another replfs process"),
        "{err}"
    );
}

/// Appends `n` records of `len` bytes, closes, returns the last segment.
fn log_of(dir: &Path, n: u64, len: usize) -> PathBuf {
    let (wal, _) = open(dir, &cfg(Durability::Batch));
    for i in 1..=n {
        wal.append(&write_op(i, len)).unwrap();
    }
    wal.close().unwrap();
    seg_paths(dir).pop().unwrap()
}

#[test]
fn torn_tail_cut_mid_record_is_cut_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let seg = log_of(dir.path(), 10, 300);
    let (offs, end) = frame_offsets(&seg);
    let f = segment::open_rw(&seg).unwrap();
    f.set_len(offs[9] + 100).unwrap();
    drop(f);
    let (wal, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!(rep.truncated_tail, Some((seg.clone(), offs[9], 100)));
    assert_eq!(rep.head_lsn, 9);
    assert_eq!(wal.append(&write_op(10, 300)).unwrap(), 10);
    assert_eq!(wal.append(&write_op(11, 300)).unwrap(), 11);
    wal.close().unwrap();
    assert_eq!(all_records(dir.path()).len(), 11);
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        4 << 20,
        "re-extended"
    );
    assert!(frame_offsets(&seg).1 > end);
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    for gap in [0u64, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let seg = log_of(dir.path(), 5, 300);
        let (_, end) = frame_offsets(&seg);
        let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        poke(&seg, end + gap, &garbage);
        let (wal, rep) = open(dir.path(), &cfg(Durability::Batch));
        assert_eq!(
            rep.truncated_tail,
            Some((seg.clone(), end, gap + 200)),
            "gap {gap}"
        );
        assert_eq!(wal.append(&write_op(6, 10)).unwrap(), 6);
        drop(wal);
        assert_eq!(all_records(dir.path()).len(), 6);
    }
}

#[test]
fn flipped_bit_in_the_middle_of_the_last_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let seg = log_of(dir.path(), 10, 300);
    let (offs, _) = frame_offsets(&seg);
    flip_bit(&seg, offs[4] + 100);
    let err = Wal::open(dir.path(), &cfg(Durability::Batch))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, WalError::Corrupt { offset, .. } if offset == offs[4]),
        "{msg}"
    );
    assert!(
        msg.contains(&seg.display().to_string()) && msg.contains(&offs[4].to_string()),
        "{msg}"
    );
    let items: Vec<_> = WalReader::open(dir.path()).unwrap().iter_from(0).collect();
    assert_eq!(items.len(), 5);
    assert!(items[4].is_err());
}

#[test]
fn flipped_bit_in_an_earlier_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 20, 512 << 10);
    let segs = seg_paths(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let (offs, _) = frame_offsets(&segs[0]);
    let last = *offs.last().unwrap();
    flip_bit(&segs[0], last + 40);
    let err = Wal::open(dir.path(), &cfg(Durability::Batch))
        .err()
        .unwrap();
    assert!(
        matches!(&err, WalError::Corrupt { path, offset, .. } if *path == segs[0] && *offset == last),
        "{err}"
    );
}

#[test]
fn lsns_are_continuous_across_rolls_and_a_missing_segment_is_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 30, 600 << 10);
    let infos = WalReader::open(dir.path()).unwrap().segments().unwrap();
    assert!(infos.len() >= 5);
    for w in infos.windows(2) {
        assert_eq!(w[0].last_lsn + 1, w[1].first_lsn);
    }
    let recs = all_records(dir.path());
    assert_eq!(
        recs.iter().map(|r| r.lsn).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    let (wal, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!((rep.head_lsn, rep.segments), (30, infos.len()));
    drop(wal);
    std::fs::remove_file(&infos[2].path).unwrap();
    let err = Wal::open(dir.path(), &cfg(Durability::Batch))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains(&infos[1].path.display().to_string()), "{msg}");
    assert!(msg.contains(&infos[3].path.display().to_string()), "{msg}");
}

#[test]
fn concurrent_appends_get_contiguous_lsns_and_all_decode() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                let mut mine = vec![];
                for i in 0..400u64 {
                    let op = write_op(
                        t * 1000 + i,
                        if i % 50 == 0 {
                            200_000
                        } else {
                            (i % 9) as usize * 300
                        },
                    );
                    let lsn = wal.append(&op).unwrap();
                    if i % 100 == 0 {
                        wal.sync(lsn).unwrap();
                        assert!(wal.durable_lsn() >= lsn);
                    }
                    mine.push((lsn, op));
                }
                mine
            })
        })
        .collect();
    let expect: HashMap<Lsn, Op<'static>> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(expect.len(), 1600);
    wal.close().unwrap();
    let recs = all_records(dir.path());
    assert_eq!(recs.len(), 1600);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.lsn, i as u64 + 1);
        assert_eq!(&r.op, &expect[&r.lsn]);
    }
}

#[test]
fn sync_returns_only_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Os));
    let lsn = wal.append(&write_op(1, 10)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(wal.durable_lsn(), 0, "os mode syncs only on request");
    wal.commit(lsn).unwrap();
    assert_eq!(wal.durable_lsn(), 0);
    let before = wal.fsync_count();
    wal.sync(lsn).unwrap();
    assert!(wal.durable_lsn() >= lsn && wal.fsync_count() > before);
    wal.sync(lsn).unwrap();
    wal.sync(999).unwrap(); // beyond the head: waits for the head only
    drop(wal);

    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Always));
    let lsn = wal.append(&write_op(1, 10)).unwrap();
    wal.commit(lsn).unwrap();
    assert!(wal.durable_lsn() >= lsn);
    drop(wal);

    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    std::thread::sleep(Duration::from_millis(30));
    let lsn = wal.append(&write_op(1, 10)).unwrap();
    let t0 = Instant::now();
    while wal.durable_lsn() < lsn {
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "batch sync did not happen"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sync_soon_makes_the_record_durable_on_the_commit_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Os));
    let lsn = wal.append(&write_op(1, 10)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(wal.durable_lsn(), 0, "os mode syncs only on request");
    let before = wal.fsync_count();
    wal.sync_soon(lsn);
    // Not waited for here: the commit thread does it by itself.
    wait_for("the commit thread's sync", || wal.durable_lsn() >= lsn);
    assert_eq!(wal.fsync_count(), before + 1);
    // Already durable: no further sync is started.
    wal.sync_soon(lsn);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(wal.fsync_count(), before + 1);
    wal.sync(lsn).unwrap();
    assert_eq!(wal.fsync_count(), before + 1);
}

#[test]
fn a_follower_is_woken_by_appends_and_syncs_without_polling() {
    // `os` mode: nothing syncs by itself, so the follower's nudge must.
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Os));
    // Nothing appended: the wait times out with the durable LSN as it is.
    let t0 = Instant::now();
    let d = wal
        .wait_durable_beyond(0, Duration::ZERO, Duration::from_millis(30))
        .unwrap();
    assert_eq!(d, 0);
    assert!(t0.elapsed() >= Duration::from_millis(30));
    // An append during a long wait wakes it; the nudge makes it durable.
    let w = wal.clone();
    let follower = std::thread::spawn(move || {
        let t0 = Instant::now();
        let d = w
            .wait_durable_beyond(0, Duration::from_millis(5), Duration::from_secs(20))
            .unwrap();
        (d, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50));
    let t1 = Instant::now();
    let lsn = wal.append(&write_op(1, 10)).unwrap();
    let (d, waited) = follower.join().unwrap();
    assert!(d >= lsn && wal.durable_lsn() >= lsn, "durable {d}");
    assert!(
        waited < Duration::from_secs(10),
        "woken, not timed out: {waited:?}"
    );
    assert!(t1.elapsed() < Duration::from_secs(5));
    // Already durable beyond: returns at once.
    let d = wal
        .wait_durable_beyond(0, Duration::ZERO, Duration::from_secs(20))
        .unwrap();
    assert!(d >= lsn);
    // A sync by someone else (an fsync through the mount) wakes a follower
    // whose nudge is far away.
    let w = wal.clone();
    let follower = std::thread::spawn(move || {
        w.wait_durable_beyond(lsn, Duration::from_secs(30), Duration::from_secs(30))
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(30));
    let lsn2 = wal.append(&write_op(2, 10)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let t2 = Instant::now();
    wal.sync(lsn2).unwrap();
    assert!(follower.join().unwrap() >= lsn2);
    assert!(t2.elapsed() < Duration::from_secs(10));
    // Closing the WAL releases a waiter.
    let w = wal.clone();
    let follower = std::thread::spawn(move || {
        w.wait_durable_beyond(lsn2, Duration::from_secs(30), Duration::from_secs(30))
    });
    std::thread::sleep(Duration::from_millis(30));
    let t3 = Instant::now();
    wal.close().unwrap();
    let _ = follower.join().unwrap();
    assert!(t3.elapsed() < Duration::from_secs(10));
}

#[test]
fn admit_fails_with_full_when_no_spare_can_be_made() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    let spare = segment::wal_dir(dir.path()).join(segment::SPARE_NAME);
    let t0 = Instant::now();
    while wal.inner.shared.spare.lock().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(5), "no spare prepared");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(spare.exists());
    wal.inject_spare_failure(true);
    let big = write_op(1, 512 << 10);
    let mut appended = 0;
    let t0 = Instant::now();
    while wal.admit().is_ok() {
        wal.append(&big).unwrap();
        appended += 1;
        assert!(t0.elapsed() < Duration::from_secs(10), "never became full");
        std::thread::sleep(Duration::from_millis(2));
    }
    let err = wal.admit().unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    // Records already admitted still fit in the current segment ...
    assert!(wal.append(&write_op(2, 100)).is_ok());
    // ... until it is full: then append reports Full, never a silent drop.
    let err = (0..20).find_map(|_| wal.append(&big).err()).unwrap();
    assert!(matches!(err, WalError::Full), "{err}");
    wal.inject_spare_failure(false);
    let t0 = Instant::now();
    while wal.admit().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5), "spare never retried");
        std::thread::sleep(Duration::from_millis(20));
    }
    wal.append(&big).unwrap();
    wal.close().unwrap();
    assert!(appended > 0);
    let recs = all_records(dir.path());
    assert_eq!(recs.last().unwrap().lsn, recs.len() as u64);
}

#[test]
fn empty_segment_whose_header_never_landed_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 3, 10);
    let ghost = segment::wal_dir(dir.path()).join(segment::segment_file_name(4));
    let f = File::create(&ghost).unwrap();
    segment::preallocate(&f, 1 << 20).unwrap();
    let (wal, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!(rep.removed_segments, vec![ghost.clone()]);
    assert!(!ghost.exists());
    assert_eq!(wal.append(&write_op(4, 10)).unwrap(), 4);
}

#[test]
fn retire_deletes_shipped_segments_and_catalog_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    for i in 1..=20 {
        wal.append(&write_op(i, 600 << 10)).unwrap();
    }
    wal.sync(20).unwrap();
    let before = WalReader::open(dir.path()).unwrap().segments().unwrap();
    let gone = wal.retire(before[2].last_lsn).unwrap();
    assert_eq!(
        gone,
        before[..3]
            .iter()
            .map(|s| s.path.clone())
            .collect::<Vec<_>>()
    );
    assert!(
        wal.retire(u64::MAX).unwrap().len() == before.len() - 4,
        "all but the current one"
    );
    wal.close().unwrap();
    let rdr = WalReader::open(dir.path()).unwrap();
    assert!(matches!(
        rdr.iter_from(1).next(),
        Some(Err(WalError::NotRetained { .. }))
    ));
    drop(wal);
    let (_, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!((rep.head_lsn, rep.segments), (20, 1));
    assert!(rep.catalog_repairs.is_empty(), "{:?}", rep.catalog_repairs);
}

#[test]
fn catalog_is_repaired_but_a_missing_middle_segment_fails() {
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 20, 600 << 10);
    let cat = Catalog::open(dir.path()).unwrap();
    let rows = cat.segments().unwrap();
    cat.remove_segment(rows[1].first_lsn).unwrap();
    let mut ghost = rows[0].clone();
    ghost.first_lsn = rows.last().unwrap().first_lsn + 100;
    ghost.file_name = segment::segment_file_name(ghost.first_lsn);
    cat.put_segment(&ghost).unwrap();
    let (wal, rep) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!(rep.catalog_repairs.len(), 2, "{:?}", rep.catalog_repairs);
    drop(wal);
    let mut bogus = rows[1].clone();
    bogus.first_lsn += 1;
    bogus.file_name = segment::segment_file_name(bogus.first_lsn);
    cat.put_segment(&bogus).unwrap();
    let err = Wal::open(dir.path(), &cfg(Durability::Batch))
        .err()
        .unwrap();
    assert!(matches!(err, WalError::MissingSegment { .. }), "{err}");
}

#[test]
fn invalid_records_are_refused_without_using_an_lsn_and_errnos_map() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    let bad = Op::Remove {
        path: b"../escape".to_vec(),
        dir: false,
        parent_mtime: Default::default(),
    };
    let err = wal.append(&bad).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    assert_eq!(wal.append(&write_op(1, 10)).unwrap(), 1);
    let io = WalError::Io {
        op: "write",
        path: "x".into(),
        err: io::Error::from_raw_os_error(libc::EROFS),
    };
    assert_eq!(io.errno(), libc::EROFS);
    let other = WalError::Io {
        op: "write",
        path: "x".into(),
        err: io::Error::other("?"),
    };
    assert_eq!(other.errno(), libc::EIO);
    let corrupt = WalError::Corrupt {
        path: "s.wal".into(),
        offset: 7,
        reason: "x".into(),
    };
    assert_eq!(corrupt.errno(), libc::EIO);
    assert_eq!(WalError::Full.errno(), libc::ENOSPC);
    let small = WalConfig {
        segment_size: 1 << 20,
        ..cfg(Durability::Batch)
    };
    drop(wal);
    assert!(matches!(
        Wal::open(dir.path(), &small),
        Err(WalError::Config(_))
    ));
}

#[test]
fn wal_and_reader_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Wal>();
    check::<WalReader>();
}

#[test]
fn retention_keeps_acknowledged_segments_for_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Durability::Batch);
    c.retain = std::time::Duration::from_secs(3600);
    let (wal, _) = open(dir.path(), &c);
    for i in 1..=20 {
        wal.append(&write_op(i, 600 << 10)).unwrap();
    }
    wal.sync(20).unwrap();
    assert!(
        wal.retire(20).unwrap().is_empty(),
        "inside the retention window"
    );
    wal.close().unwrap();
    drop(wal);
    let c = cfg(Durability::Batch);
    let (wal, _) = open(dir.path(), &c);
    assert!(!wal.retire(20).unwrap().is_empty(), "no retention: retired");
}

// ---- wal.max_size and the WAL-full policies --------------------------------

fn limited(policy: OnWalFull) -> WalConfig {
    WalConfig {
        max_size: 12 << 20,
        on_wal_full: policy,
        ..cfg(Durability::Batch)
    }
}

/// Bytes of every file in the WAL directory (segments and spare).
fn disk_use(dir: &Path) -> u64 {
    std::fs::read_dir(segment::wal_dir(dir))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Appends 512 KiB records (admitted first) until the WAL is full, checking
/// after each that disk use stays within the limit. Returns the count.
fn fill(wal: &Wal, dir: &Path) -> u64 {
    let limit = wal.space().limit;
    for i in 1..=200 {
        if wal.space().full {
            return i - 1;
        }
        wal.admit().unwrap();
        wal.append(&write_op(i, 512 << 10)).unwrap();
        assert!(disk_use(dir) <= limit, "{} > {limit}", disk_use(dir));
    }
    panic!("the WAL never became full");
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Acknowledges everything: the retired segments free space.
fn ack_all(wal: &Wal) {
    wal.sync(wal.head_lsn()).unwrap();
    assert!(!wal.retire(wal.head_lsn()).unwrap().is_empty());
}

#[test]
fn max_size_fail_refuses_admission_until_retire_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &limited(OnWalFull::Fail));
    let n = fill(&wal, dir.path());
    assert!(n >= 12, "only {n} records of 512 KiB before full");
    assert_eq!(wal.admit().unwrap_err().errno(), libc::ENOSPC);
    let sp = wal.space();
    assert!(
        sp.full && !sp.logging_paused && sp.used <= sp.limit,
        "{sp:?}"
    );
    assert_eq!(sp.used, disk_use(dir.path()));
    // A change admitted before the WAL became full still has room.
    wal.append(&write_op(999, 512 << 10)).unwrap();
    // The spare thread's retries do not pass the limit either.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(disk_use(dir.path()) <= sp.limit);
    assert!(wal.admit().is_err());
    ack_all(&wal);
    wait_for("admission after retire", || wal.admit().is_ok());
    assert!(!wal.space().full);
    // And the cycle repeats: full again, never past the limit.
    fill(&wal, dir.path());
    assert!(wal.admit().is_err());
    wal.close().unwrap();
    let recs = all_records(dir.path());
    assert_eq!(recs.last().unwrap().lsn, wal.head_lsn());
}

#[test]
fn max_size_block_waits_for_retire_and_errors_on_close_or_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &limited(OnWalFull::Block));
    fill(&wal, dir.path());
    let blocked = |wal: &Wal| {
        let (tx, rx) = std::sync::mpsc::channel();
        let w = wal.clone();
        std::thread::spawn(move || tx.send(w.admit()).unwrap());
        let r = rx.recv_timeout(Duration::from_millis(300));
        assert!(r.is_err(), "admit returned while full: {r:?}");
        rx
    };
    let rx = blocked(&wal);
    ack_all(&wal);
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("woken by retire");
    assert!(r.is_ok(), "{r:?}");
    fill(&wal, dir.path());
    let rx = blocked(&wal);
    wal.stop_blocking();
    let r = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("released by stop");
    assert_eq!(r.unwrap_err().errno(), libc::ENOSPC);
    assert!(wal.admit().is_err(), "no blocking once stopping");
    drop(wal);

    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &limited(OnWalFull::Block));
    fill(&wal, dir.path());
    let rx = blocked(&wal);
    let t0 = Instant::now();
    wal.close().unwrap();
    let r = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("woken by close");
    assert!(matches!(r, Err(WalError::Closed)), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

fn resync_rows(dir: &Path) -> Vec<(i64, String)> {
    Catalog::open(dir)
        .unwrap()
        .resync_list()
        .unwrap()
        .into_iter()
        .map(|r| (r.id, String::from_utf8(r.path).unwrap()))
        .collect()
}

fn rename(from: &str, to: &str) -> Op<'static> {
    Op::Rename {
        from: from.into(),
        to: to.into(),
        flags: 0,
        from_parent_mtime: Default::default(),
        to_parent_mtime: Default::default(),
    }
}

fn write_to(path: &str) -> Op<'static> {
    Op::Write {
        path: path.into(),
        offset: 0,
        data: Cow::Borrowed(b"x"),
        attr: Attr::default(),
    }
}

#[test]
fn max_size_resync_marks_paths_once_and_resumes_logging_with_dirty_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &limited(OnWalFull::Resync));
    let mut i = 0;
    while !wal.space().logging_paused {
        i += 1;
        assert!(i < 200, "logging never paused");
        wal.admit().unwrap();
        assert!(wal.record(&write_op(i, 512 << 10)).unwrap().is_some());
    }
    let head = wal.head_lsn();
    // Full: admitted, not logged, each path recorded once.
    for j in 0..500 {
        wal.admit().unwrap();
        assert_eq!(wal.record(&write_op(j, 10)).unwrap(), None);
    }
    assert_eq!(wal.record(&rename("d/f1", "e/x")).unwrap(), None);
    assert_eq!(wal.head_lsn(), head, "nothing appended while paused");
    let mut paths: Vec<String> = resync_rows(dir.path()).into_iter().map(|r| r.1).collect();
    paths.sort();
    let mut want: Vec<String> = (0..7).map(|k| format!("d/f{k}")).collect();
    want.push("e/x".into());
    assert_eq!(paths, want);
    assert!(disk_use(dir.path()) <= 12 << 20);
    // Space comes back: logging resumes (under half the limit).
    ack_all(&wal);
    wait_for("logging resumes", || !wal.space().logging_paused);
    assert_eq!(wal.space().resync_pending, 8);
    // Dirty paths, their subtrees and anything renamed from/into them stay
    // marked; clean paths are logged.
    assert_eq!(wal.record(&write_to("d/f1")).unwrap(), None);
    assert_eq!(wal.record(&write_to("e/x/y")).unwrap(), None);
    assert_eq!(wal.record(&rename("e", "g")).unwrap(), None, "e holds e/x");
    assert_eq!(wal.record(&rename("d/f2", "h")).unwrap(), None);
    assert!(wal.record(&write_to("d/other")).unwrap().is_some());
    assert!(wal.record(&write_to("zz")).unwrap().is_some());
    let rows = resync_rows(dir.path());
    let names: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert!(names.contains(&"g") && names.contains(&"h") && names.contains(&"e"));
    assert_eq!(wal.space().resync_pending, rows.len());
    // The shipper repairs and clears every row: paths changed again after
    // their row was recorded come back once; the others are forgotten.
    let cat = Catalog::open(dir.path()).unwrap();
    cat.clear_resync(rows.last().unwrap().0).unwrap();
    wait_for("prune", || wal.space().resync_pending < rows.len());
    let again: Vec<String> = resync_rows(dir.path()).into_iter().map(|r| r.1).collect();
    assert!(again.contains(&"d/f1".to_string()), "{again:?}");
    assert!(!again.contains(&"g".to_string()), "{again:?}");
    assert_eq!(wal.space().resync_pending, again.len());
    cat.clear_resync(i64::MAX).unwrap();
    wait_for("all clean", || wal.space().resync_pending == 0);
    assert!(resync_rows(dir.path()).is_empty());
    assert!(wal.record(&write_to("d/f1")).unwrap().is_some());
    wal.close().unwrap();
}

#[test]
fn dirty_paths_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    wal.mark_resync(b"a/b", "test").unwrap();
    assert_eq!(wal.record(&write_to("a/b/c")).unwrap(), None);
    assert_eq!(resync_rows(dir.path()).len(), 1, "covered: no second row");
    wal.close().unwrap();
    drop(wal);
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    assert_eq!(wal.dirty_paths(), vec![b"a/b".to_vec()]);
    assert!(wal.record(&write_to("a/c")).unwrap().is_some(), "a sibling");
    assert_eq!(wal.record(&rename("a", "z")).unwrap(), None, "holds a/b");
    assert_eq!(
        wal.record(&write_to("a/c")).unwrap(),
        None,
        "a is dirty now"
    );
}

#[test]
fn repair_only_rows_do_not_stop_the_logging() {
    let dir = tempfile::tempdir().unwrap();
    // Rows a sync, verify or a changed exclude list leave: the changes are
    // in the log, the mirror only needs its copy brought in line.
    let cat = crate::catalog::Catalog::open(dir.path()).unwrap();
    cat.add_resync(b"", "exclude list changed", 0).unwrap();
    cat.add_resync(b"a", "changed while the mirror was being synced", 0)
        .unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Batch));
    assert!(wal.dirty_paths().is_empty());
    assert!(wal.record(&write_to("a/b")).unwrap().is_some(), "logged");
    // An unlogged change does stop it for its path.
    wal.mark_resync(b"a", "test").unwrap();
    assert_eq!(wal.record(&write_to("a/b")).unwrap(), None);
    assert_eq!(resync_rows(dir.path()).len(), 3);
    wal.close().unwrap();
}

/// Whether any extent of the file is still "unwritten" (FIEMAP); `None` when
/// the file system cannot tell.
fn has_unwritten_extents(path: &Path) -> Option<bool> {
    use std::os::fd::AsRawFd;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
    const EXTENTS: usize = 64;
    // struct fiemap (32 bytes) followed by EXTENTS struct fiemap_extent (56 bytes).
    let mut buf = vec![0u64; (32 + 56 * EXTENTS) / 8];
    buf[1] = u64::MAX; // fm_length
    buf[3] = EXTENTS as u64; // fm_extent_count (low half), fm_reserved 0
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: the buffer is as large as the extent count says.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    let mapped = (buf[2] >> 32) as usize;
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), buf.len() * 8) };
    Some((0..mapped.min(EXTENTS)).any(|i| {
        let at = 32 + 56 * i + 40;
        u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) & FIEMAP_EXTENT_UNWRITTEN != 0
    }))
}

#[test]
fn zero_fill_policy_follows_the_fill_rate() {
    let mut c = cfg(Durability::Batch);
    c.segment_size = 64 << 20;
    assert!(c.zero_fill_after(Duration::from_secs(2)), "32 MiB/s: slow");
    assert!(
        !c.zero_fill_after(Duration::from_millis(100)),
        "640 MiB/s: streaming"
    );
    c.zero_fill = crate::config::ZeroFill::Always;
    assert!(c.zero_fill_after(Duration::ZERO));
    c.zero_fill = crate::config::ZeroFill::Never;
    assert!(!c.zero_fill_after(Duration::from_secs(3600)));
}

#[test]
fn spares_are_zero_filled_or_preallocated_as_configured_and_records_roll_into_both() {
    use crate::config::ZeroFill;
    for (mode, unwritten) in [(ZeroFill::Always, false), (ZeroFill::Never, true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(Durability::Batch);
        c.zero_fill = mode;
        let (wal, _) = open(dir.path(), &c);
        let spare = dir.path().join("wal").join(segment::SPARE_NAME);
        wait_for("a spare", || {
            spare.exists() && wal.inner.shared.spare.lock().is_some()
        });
        if !unwritten {
            // Zero-filled after it was installed, by the spare thread.
            wait_for("a zero-filled spare", || {
                has_unwritten_extents(&spare) != Some(true)
            });
        }
        let len = std::fs::metadata(&spare).unwrap().len();
        assert_eq!(len, c.segment_size);
        let data = std::fs::read(&spare).unwrap();
        assert!(
            data.iter().all(|&b| b == 0),
            "{mode:?}: a spare is all zeros"
        );
        if let Some(u) = has_unwritten_extents(&spare) {
            assert_eq!(u, unwritten, "{mode:?}: unwritten extents");
        }
        // Roll into the spare and beyond (the next spares are zero-filled
        // while records arrive: a roll may take one mid-way); every record
        // reads back after a reopen.
        let per = 200 << 10;
        let n = 2 * c.segment_size / per as u64 + 2;
        for i in 0..n {
            wal.append(&write_op(i, per)).unwrap();
        }
        wal.sync(wal.head_lsn()).unwrap();
        drop(wal);
        let (wal, rep) = open(dir.path(), &c);
        assert_eq!(rep.head_lsn, n);
        assert!(seg_paths(dir.path()).len() >= 3, "{mode:?}: rolled twice");
        assert_eq!(all_records(dir.path()).len() as u64, n);
        drop(wal);
    }
}

/// Fraction of the file's pages in the page cache (mincore).
fn resident_fraction(path: &Path) -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096;
    // SAFETY: a read-only shared mapping of a file we keep open meanwhile.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    unsafe { libc::munmap(p, len) };
    assert_eq!(r, 0);
    vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64
}

#[test]
fn a_zero_filled_segment_is_read_into_the_page_cache_when_records_start_using_it() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Durability::Batch);
    c.zero_fill = crate::config::ZeroFill::Always;
    let (wal, _) = open(dir.path(), &c);
    let spare = dir.path().join("wal").join(segment::SPARE_NAME);
    wait_for("a zero-filled spare", || {
        wal.inner.shared.spare_zeroed.load(Relaxed)
    });
    // Evict the spare's (clean, once flushed) pages, as memory pressure would.
    let f = std::fs::File::open(&spare).unwrap();
    f.sync_data().unwrap();
    // SAFETY: plain syscall on a file descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let evicted = resident_fraction(&spare);
    let before = seg_paths(dir.path()).len();
    let mut i = 0;
    while seg_paths(dir.path()).len() == before {
        wal.append(&write_op(i, 100 << 10)).unwrap();
        i += 1;
        assert!(i < 1000, "no roll");
    }
    let active = seg_paths(dir.path()).pop().unwrap();
    wait_for("the active segment's pages in the cache", || {
        resident_fraction(&active) > 0.9
    });
    eprintln!("resident after eviction {evicted:.2}, after the roll > 0.9");
}

#[test]
fn the_durable_notifier_holds_one_token_per_advance_and_forgets_dropped_followers() {
    // `os` mode: durable moves only when asked, so every token is accounted for.
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path(), &cfg(Durability::Os));
    let rx = wal.durable_notifier();
    let lsn = wal.append(&write_op(1, 10)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert!(rx.try_recv().is_err(), "an append alone is not durable");
    wal.sync(lsn).unwrap();
    assert!(rx.try_recv().is_ok(), "a sync that advanced durable_lsn");
    assert!(rx.try_recv().is_err());
    // Nothing new: a sync does not advance, no token.
    wal.sync(lsn).unwrap();
    assert!(rx.try_recv().is_err());
    // Two advances before the follower looks: one token (a wake-up, not a count).
    for i in 2..4 {
        let l = wal.append(&write_op(i, 10)).unwrap();
        wal.sync(l).unwrap();
    }
    assert!(rx.try_recv().is_ok());
    assert!(rx.try_recv().is_err());
    assert_eq!(wal.durable_lsn(), 3);
    // A token wakes a blocked receiver (another thread syncs).
    let w = wal.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        let l = w.append(&write_op(4, 10)).unwrap();
        w.sync(l).unwrap();
    });
    assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
    t.join().unwrap();
    // Dropped receivers are forgotten at the next advance.
    let rx2 = wal.durable_notifier();
    assert_eq!(wal.inner.shared.durable_subs.lock().len(), 2);
    drop(rx2);
    let l = wal.append(&write_op(5, 10)).unwrap();
    wal.sync(l).unwrap();
    assert_eq!(wal.inner.shared.durable_subs.lock().len(), 1);
    assert!(rx.try_recv().is_ok());
}
