//! Tests of the scanner's end-of-segment policy and of the reader.

use std::os::unix::fs::FileExt;

use super::*;
use crate::config::{Durability, WalConfig};
use crate::wal::codec::encode_frame;
use crate::wal::record::{Op, Ts};
use crate::wal::{Wal, segment::SegmentHeader};

fn op(i: u64) -> Op<'static> {
    Op::Resync {
        path: format!("p{i}").into_bytes(),
        reason: "x".repeat(i as usize % 50),
    }
}

/// A hand-built last segment: header, `n` frames, zeros to 64 KiB.
/// Returns the path and the offset of every frame plus the end.
fn build(dir: &Path, n: u64) -> (PathBuf, SegmentHeader, Vec<u64>) {
    let h = SegmentHeader::new(1);
    let path = dir.join(segment::segment_file_name(1));
    let f = File::create(&path).unwrap();
    f.set_len(64 << 10).unwrap();
    f.write_all_at(&h.encode(), 0).unwrap();
    let mut offs = vec![HEADER_LEN];
    for lsn in 1..=n {
        let frame = encode_frame(h.salt, lsn, 0, &op(lsn), 0).unwrap();
        let at = *offs.last().unwrap();
        f.write_all_at(&frame, at).unwrap();
        offs.push(at + frame.len() as u64);
    }
    (path, h, offs)
}

fn end_of(path: &Path, last: bool) -> Result<SegmentEnd, WalError> {
    let mut sc = SegmentScanner::open(path).unwrap();
    sc.scan_all(last)
}

#[test]
fn clean_torn_and_corrupt_ends_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (path, h, offs) = build(dir.path(), 4);
    assert_eq!(end_of(&path, true).unwrap(), SegmentEnd::Clean);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();

    // A frame of another segment (other salt) at the end: stale, never valid.
    let stale = encode_frame(h.salt ^ 1, 5, 0, &op(5), 0).unwrap();
    f.write_all_at(&stale, offs[4]).unwrap();
    let torn = SegmentEnd::Torn {
        offset: offs[4],
        end: offs[4] + stale.len() as u64,
    };
    assert_eq!(end_of(&path, true).unwrap(), torn);
    assert!(
        matches!(end_of(&path, false), Err(WalError::Corrupt { offset, .. }) if offset == offs[4])
    );

    // Record 3 damaged while record 4 is intact: corruption, not a torn tail.
    f.write_all_at(&vec![0u8; stale.len()], offs[4]).unwrap();
    f.write_all_at(&[0xFF], offs[2] + 40).unwrap();
    let err = end_of(&path, true).unwrap_err();
    assert!(
        matches!(&err, WalError::Corrupt { offset, reason, .. } if *offset == offs[2] && reason.contains("valid record follows")),
        "{err}"
    );

    // The same damage on the last record is a torn tail.
    let (path, _, offs) = build(dir.path(), 4);
    f.write_all_at(&[0xFF], offs[3] + 40).unwrap();
    assert_eq!(
        end_of(&path, true).unwrap(),
        SegmentEnd::Torn {
            offset: offs[3],
            end: offs[4]
        }
    );
}

#[test]
fn a_header_from_another_name_or_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = build(dir.path(), 1);
    let other = dir.path().join(segment::segment_file_name(2));
    std::fs::rename(&path, &other).unwrap();
    assert!(SegmentScanner::open(&other).is_err());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&other)
        .unwrap();
    f.write_all_at(&[9, 0], 8).unwrap();
    let err = SegmentScanner::open(&other).err().unwrap().to_string();
    assert!(err.contains("CRC") || err.contains("version"), "{err}");
}

fn cfg() -> WalConfig {
    WalConfig {
        durability: Durability::Batch,
        segment_size: 4 << 20,
        ..WalConfig::default()
    }
}

#[test]
fn iterates_from_any_lsn_and_follows_a_live_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), &cfg()).unwrap();
    for i in 1..=50 {
        wal.append(&op(i)).unwrap();
    }
    let rdr = WalReader::open(dir.path()).unwrap();
    let lsns = |it: RecordIter| it.map(|r| r.unwrap().lsn).collect::<Vec<_>>();
    assert_eq!(lsns(rdr.iter_from(0)), (1..=50).collect::<Vec<_>>());
    assert_eq!(lsns(rdr.iter_from(20)), (20..=50).collect::<Vec<_>>());
    assert_eq!(lsns(rdr.iter_range(10, 15)), (10..=15).collect::<Vec<_>>());
    assert!(lsns(rdr.iter_from(51)).is_empty());
    for i in 51..=60 {
        wal.append(&op(i)).unwrap();
    }
    assert_eq!(lsns(rdr.iter_from(51)), (51..=60).collect::<Vec<_>>());
    let r = rdr.iter_from(7).next().unwrap().unwrap();
    assert_eq!((r.lsn, r.op), (7, op(7)));
    let segs = rdr.segments().unwrap();
    assert_eq!(
        (segs.len(), segs[0].first_lsn, segs[0].last_lsn),
        (1, 1, 60)
    );
    assert_eq!(segs[0].file_len, 4 << 20);
    assert!(segs[0].bytes_used > HEADER_LEN);
    assert!(rdr.verify().is_empty());
    wal.close().unwrap();
}

#[test]
fn reader_reports_corruption_once_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), &cfg()).unwrap();
    for i in 1..=10 {
        wal.append(&Op::SetAttr {
            path: b"a".to_vec(),
            attr: Default::default(),
            atime: Some(Ts {
                sec: i as i64,
                nsec: 0,
            }),
        })
        .unwrap();
    }
    wal.close().unwrap();
    let seg = segment::list_segments(&segment::wal_dir(dir.path())).unwrap()[0]
        .1
        .clone();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0xAA], HEADER_LEN + 20).unwrap();
    let rdr = WalReader::open(dir.path()).unwrap();
    let items: Vec<_> = rdr.iter_from(0).collect();
    assert_eq!(items.len(), 1);
    let msg = items[0].as_ref().unwrap_err().to_string();
    assert!(
        msg.contains(&seg.display().to_string()) && msg.contains(&HEADER_LEN.to_string()),
        "{msg}"
    );
    assert_eq!(rdr.verify().len(), 1);
}

#[test]
fn a_reader_racing_a_live_writer_never_sees_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), &cfg()).unwrap();
    let writer = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            for i in 1..=40_000u64 {
                let op = if i % 5 == 0 {
                    let mut x = i | 1;
                    let data: Vec<u8> = (0..3000)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        })
                        .collect();
                    Op::Write {
                        path: b"f".to_vec(),
                        offset: 0,
                        data: data.into(),
                        attr: Default::default(),
                    }
                } else {
                    op(i)
                };
                wal.append(&op).unwrap();
            }
        })
    };
    let rdr = WalReader::open(dir.path()).unwrap();
    let mut seen = 0;
    while !writer.is_finished() {
        let mut expect = 1;
        for r in rdr.iter_from(0) {
            let r = r.unwrap();
            assert_eq!(r.lsn, expect);
            expect += 1;
        }
        seen = seen.max(expect - 1);
    }
    writer.join().unwrap();
    assert_eq!(rdr.iter_from(0).count(), 40_000);
    assert!(
        rdr.segments().unwrap().len() >= 5,
        "the writer rolled while being read"
    );
    assert!(seen > 0);
    wal.close().unwrap();
}
