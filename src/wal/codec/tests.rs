//! Tests of the record codec: every op round-trips, hostile bytes never panic.

use std::borrow::Cow;

use proptest::prelude::*;

use super::*;
use crate::wal::record::{Attr, NodeKind, Ts};

fn ts(sec: i64, nsec: u32) -> Ts {
    Ts { sec, nsec }
}

fn attr() -> Attr {
    Attr {
        mode: 0o100644,
        uid: 1000,
        gid: 100,
        mtime: ts(1_700_000_000, 5),
    }
}

/// One of every op, with some edge values (root path, negative times, hard names).
pub(crate) fn sample_ops() -> Vec<Op<'static>> {
    let p = |s: &str| s.as_bytes().to_vec();
    vec![
        Op::Create {
            path: p("a/b"),
            kind: NodeKind::CharDev,
            rdev: 0x0103,
            attr: attr(),
            parent_mtime: ts(-5, 999_999_999),
        },
        Op::Create {
            path: p("dir"),
            kind: NodeKind::Dir,
            rdev: 0,
            attr: attr(),
            parent_mtime: ts(0, 0),
        },
        Op::Symlink {
            path: p("l"),
            target: p("/abs/../x"),
            attr: attr(),
            parent_mtime: ts(1, 2),
        },
        Op::Link {
            existing: p("a/b"),
            path: p("c d"),
            parent_mtime: ts(3, 4),
        },
        Op::Remove {
            path: p("x"),
            dir: true,
            parent_mtime: ts(5, 6),
        },
        Op::Rename {
            from: p("x"),
            to: p("y/z"),
            flags: 2,
            from_parent_mtime: ts(7, 8),
            to_parent_mtime: ts(9, 10),
        },
        Op::Write {
            path: p("f"),
            offset: 1 << 40,
            data: Cow::Owned(b"hello".repeat(300)),
            attr: attr(),
        },
        Op::Write {
            path: p("f"),
            offset: 0,
            data: Cow::Owned(Vec::new()),
            attr: attr(),
        },
        Op::Truncate {
            path: p("f"),
            size: 12345,
            attr: attr(),
        },
        Op::SetAttr {
            path: Vec::new(),
            attr: attr(),
            atime: Some(ts(11, 12)),
        },
        Op::SetAttr {
            path: p("f"),
            attr: attr(),
            atime: None,
        },
        Op::SetXattr {
            path: p("f"),
            name: p("user.k"),
            value: Cow::Owned(vec![0, 1, 2]),
        },
        Op::RemoveXattr {
            path: p("f"),
            name: p("trusted.x"),
        },
        Op::Fallocate {
            path: p("f"),
            mode: 3,
            offset: 4096,
            len: 8192,
            attr: attr(),
        },
        Op::Resync {
            path: Vec::new(),
            reason: "WAL full: é".into(),
        },
    ]
}

#[test]
fn every_op_roundtrips_as_body_and_frame() {
    for op in sample_ops() {
        let body = encode_body_vec(&op).unwrap();
        assert_eq!(decode_body(op_code(&op), &body).unwrap(), op);
        let frame = encode_frame(42, 7, -1, &op, 16).unwrap();
        let (rec, len) = decode_frame(42, &frame).unwrap();
        assert_eq!((rec.lsn, rec.time_ns, len), (7, -1, frame.len()));
        assert_eq!(rec.op, op);
    }
}

#[test]
fn compressible_bodies_are_compressed_and_random_ones_are_not() {
    let text = Op::Write {
        path: b"t".to_vec(),
        offset: 0,
        data: Cow::Owned(b"lorem ipsum ".repeat(400)),
        attr: attr(),
    };
    let body = PreparedBody::new(&text, 512, 0).unwrap();
    assert_eq!(body.flags, FLAG_LZ4);
    assert!(body.stored_len() < 1000);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..20000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let rand = Op::Write {
        path: b"r".to_vec(),
        offset: 0,
        data: Cow::Borrowed(&noise),
        attr: attr(),
    };
    assert_eq!(PreparedBody::new(&rand, 512, 0).unwrap().flags, 0);
    assert_eq!(
        PreparedBody::new(&text, 1 << 20, 0).unwrap().flags,
        0,
        "below compress_min"
    );
}

#[test]
fn frames_from_another_segment_do_not_validate() {
    let frame = encode_frame(1, 1, 0, &sample_ops()[0], 0).unwrap();
    assert!(decode_frame(2, &frame).is_err());
}

#[test]
fn a_body_summed_for_another_segment_is_resummed() {
    let op = &sample_ops()[6];
    let body = PreparedBody::new(op, 0, crc_seed(1)).unwrap();
    let mut frame = body.header(crc_seed(2), 9, 0).to_vec();
    for part in body.parts() {
        frame.extend_from_slice(part);
    }
    assert_eq!(decode_frame(2, &frame).unwrap().0.op, *op);
}

#[test]
fn bad_paths_are_refused_on_both_sides() {
    for bad in [
        &b"/abs"[..],
        b"a//b",
        b"a/",
        b"./a",
        b"a/..",
        b"a\0b",
        &[b'n'; 256][..],
        &[b'a'; 4097][..],
    ] {
        assert!(
            validate_path(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        let op = Op::Truncate {
            path: bad.to_vec(),
            size: 0,
            attr: attr(),
        };
        assert!(encode_body_vec(&op).is_err());
        let mut body = vec![];
        body.extend_from_slice(&(bad.len() as u16).to_le_bytes());
        body.extend_from_slice(bad);
        body.extend_from_slice(&[0; 32]);
        assert!(decode_body(7, &body).is_err());
    }
    for good in [
        &b""[..],
        b"a",
        b"a/b/c",
        b"...",
        b".x/..y",
        &[b'n'; 255][..],
    ] {
        validate_path(good).unwrap();
    }
}

#[test]
fn limits_are_enforced() {
    let big = vec![0u8; MAX_DATA_LEN + 1];
    let op = Op::Write {
        path: b"f".to_vec(),
        offset: 0,
        data: Cow::Borrowed(&big),
        attr: attr(),
    };
    assert!(matches!(
        encode_body_vec(&op),
        Err(CodecError::TooLong { .. })
    ));
    let op = Op::Write {
        path: b"f".to_vec(),
        offset: u64::MAX,
        data: Cow::Borrowed(b"x"),
        attr: attr(),
    };
    assert!(encode_body_vec(&op).is_err());
    let mut a = attr();
    a.mtime.nsec = 1_000_000_000;
    assert!(
        encode_body_vec(&Op::Truncate {
            path: vec![],
            size: 0,
            attr: a
        })
        .is_err()
    );
    let full = vec![7u8; MAX_DATA_LEN];
    let mut long_path = [[b'p'; 255].as_slice(), b"/"].concat().repeat(16);
    long_path.truncate(MAX_PATH_LEN - 1);
    validate_path(&long_path).unwrap();
    let op = Op::Write {
        path: long_path,
        offset: 0,
        data: Cow::Borrowed(&full),
        attr: attr(),
    };
    let frame = encode_frame(0, 1, 0, &op, usize::MAX).unwrap();
    assert!(frame.len() <= MAX_FRAME_LEN);
}

#[test]
fn every_truncation_of_every_frame_is_an_error() {
    for op in sample_ops() {
        let frame = encode_frame(5, 1, 0, &op, 16).unwrap();
        for cut in 0..frame.len() {
            assert!(decode_frame(5, &frame[..cut]).is_err());
        }
        let body = encode_body_vec(&op).unwrap();
        for cut in 0..body.len() {
            assert!(decode_body(op_code(&op), &body[..cut]).is_err());
        }
    }
}

fn arb_ts() -> impl Strategy<Value = Ts> {
    (any::<i64>(), 0u32..1_000_000_000).prop_map(|(sec, nsec)| Ts { sec, nsec })
}

fn arb_attr() -> impl Strategy<Value = Attr> {
    (any::<u32>(), any::<u32>(), any::<u32>(), arb_ts()).prop_map(|(mode, uid, gid, mtime)| Attr {
        mode,
        uid,
        gid,
        mtime,
    })
}

fn arb_path() -> impl Strategy<Value = Vec<u8>> {
    let comp = prop::collection::vec(
        prop::num::u8::ANY.prop_filter("no / or NUL", |&c| c != b'/' && c != 0),
        1..12,
    )
    .prop_filter("no dots", |c| c != b"." && c != b"..");
    prop::collection::vec(comp, 0..4).prop_map(|cs| cs.join(&b'/'))
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..max),
        (any::<u8>(), 0..max).prop_map(|(b, n)| vec![b; n]),
    ]
}

fn arb_op() -> impl Strategy<Value = Op<'static>> {
    let name = prop::collection::vec(1u8..=255, 1..40);
    prop_oneof![
        (arb_path(), 0usize..6, any::<u64>(), arb_attr(), arb_ts()).prop_map(
            |(path, k, rdev, attr, parent_mtime)| Op::Create {
                path,
                kind: NodeKind::ALL[k],
                rdev,
                attr,
                parent_mtime
            }
        ),
        (
            arb_path(),
            prop::collection::vec(1u8..=255, 0..100),
            arb_attr(),
            arb_ts()
        )
            .prop_map(|(path, target, attr, parent_mtime)| Op::Symlink {
                path,
                target,
                attr,
                parent_mtime
            }),
        (arb_path(), arb_path(), arb_ts()).prop_map(|(existing, path, parent_mtime)| Op::Link {
            existing,
            path,
            parent_mtime
        }),
        (arb_path(), any::<bool>(), arb_ts()).prop_map(|(path, dir, parent_mtime)| Op::Remove {
            path,
            dir,
            parent_mtime
        }),
        (arb_path(), arb_path(), any::<u32>(), arb_ts(), arb_ts()).prop_map(
            |(from, to, flags, a, b)| Op::Rename {
                from,
                to,
                flags,
                from_parent_mtime: a,
                to_parent_mtime: b
            }
        ),
        (arb_path(), 0u64..(1 << 50), arb_bytes(3000), arb_attr()).prop_map(
            |(path, offset, d, attr)| Op::Write {
                path,
                offset,
                data: Cow::Owned(d),
                attr
            }
        ),
        (arb_path(), 0u64..(1 << 62), arb_attr()).prop_map(|(path, size, attr)| Op::Truncate {
            path,
            size,
            attr
        }),
        (arb_path(), arb_attr(), prop::option::of(arb_ts()))
            .prop_map(|(path, attr, atime)| Op::SetAttr { path, attr, atime }),
        (arb_path(), name.clone(), arb_bytes(600)).prop_map(|(path, name, v)| Op::SetXattr {
            path,
            name,
            value: Cow::Owned(v)
        }),
        (arb_path(), name).prop_map(|(path, name)| Op::RemoveXattr { path, name }),
        (
            arb_path(),
            any::<i32>(),
            0u64..(1 << 60),
            0u64..(1 << 60),
            arb_attr()
        )
            .prop_map(|(path, mode, offset, len, attr)| Op::Fallocate {
                path,
                mode,
                offset,
                len,
                attr
            }),
        (arb_path(), ".{0,50}").prop_map(|(path, reason)| Op::Resync { path, reason }),
    ]
}

proptest! {
    #[test]
    fn prop_roundtrip(op in arb_op(), salt in any::<u64>(), lsn in any::<u64>(), t in any::<i64>(), cmin in 0usize..2000) {
        let frame = encode_frame(salt, lsn, t, &op, cmin).unwrap();
        let (rec, len) = decode_frame(salt, &frame).unwrap();
        prop_assert_eq!(len, frame.len());
        prop_assert_eq!(rec, Record { lsn, time_ns: t, op });
    }

    #[test]
    fn prop_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), code in any::<u8>()) {
        let _ = decode_body(code, &bytes);
        let _ = decode_frame(0, &bytes);
        if let Some(h) = FrameHeader::parse(&bytes) {
            let _ = decode_stored(&h, bytes.get(FRAME_HEADER_LEN..).unwrap_or(&[]));
        }
    }

    #[test]
    fn prop_mutated_frames_never_panic(op in arb_op(), pos in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut frame = encode_frame(3, 1, 0, &op, 0).unwrap();
        let i = pos.index(frame.len());
        frame[i] = byte;
        let _ = decode_frame(3, &frame);
        let body = encode_body_vec(&op).unwrap();
        let _ = decode_body(op_code(&op), &body[..cut.index(body.len() + 1)]);
        // Decoding the stored body without the CRC check exercises the decompressor.
        if let Some(h) = FrameHeader::parse(&frame) {
            let end = (h.frame_len as usize).clamp(FRAME_HEADER_LEN, frame.len());
            let _ = decode_stored(&h, &frame[FRAME_HEADER_LEN..end]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The shipper forwards a segment's frame with its CRC re-seeded for the
    /// wire instead of re-summed: both must agree for every op and length.
    #[test]
    fn prop_a_reseeded_crc_equals_the_crc_summed_with_the_other_seed(
        op in arb_op(),
        data in prop::collection::vec(any::<u8>(), 0..70_000),
        a in any::<u64>(),
        b in any::<u64>(),
        lsn in any::<u64>(),
    ) {
        let write = Op::Write { path: b"f".to_vec(), offset: 0, data: Cow::Borrowed(&data), attr: attr() };
        for op in [&op, &write] {
            let fa = encode_frame(a, lsn, 7, op, 0).unwrap();
            let fb = encode_frame(b, lsn, 7, op, 0).unwrap();
            let (ha, hb) = (FrameHeader::parse(&fa).unwrap(), FrameHeader::parse(&fb).unwrap());
            prop_assert_eq!(reseed_crc(ha.crc, crc_seed(a), crc_seed(b), ha.stored_len()), hb.crc);
            // And the borrowed decoder reads what the owning one reads.
            let stored = &fa[FRAME_HEADER_LEN..];
            prop_assert_eq!(decode_stored_ref(&ha, stored).unwrap().into_owned(), decode_stored(&ha, stored).unwrap());
        }
    }
}
