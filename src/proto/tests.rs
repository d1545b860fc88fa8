//! Tests of the wire protocol: every message round-trips, hostile bytes are
//! refused without panicking or allocating, the handshake authenticates.

use std::borrow::Cow;
use std::io::Cursor;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use proptest::prelude::*;

use super::handshake as hs;
use super::*;
use crate::wal::codec::{self, FrameHeader};
use crate::wal::{Attr, NodeKind, Op, Ts};

fn ts(sec: i64) -> Ts {
    Ts { sec, nsec: 7 }
}

fn attr(mode: u32) -> Attr {
    Attr {
        mode,
        uid: 1000,
        gid: 100,
        mtime: ts(1_700_000_000),
    }
}

fn p(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// One op of every kind.
fn every_op() -> Vec<Op<'static>> {
    vec![
        Op::Create {
            path: p("d"),
            kind: NodeKind::Dir,
            rdev: 0,
            attr: attr(0o40755),
            parent_mtime: ts(1),
        },
        Op::Symlink {
            path: p("d/l"),
            target: p("../x"),
            attr: attr(0o120777),
            parent_mtime: ts(2),
        },
        Op::Link {
            existing: p("d/f"),
            path: p("d/g"),
            parent_mtime: ts(3),
        },
        Op::Remove {
            path: p("d/g"),
            dir: false,
            parent_mtime: ts(4),
        },
        Op::Rename {
            from: p("d/f"),
            to: p("e"),
            flags: 0,
            from_parent_mtime: ts(5),
            to_parent_mtime: ts(6),
        },
        Op::Write {
            path: p("e"),
            offset: 10,
            data: Cow::Owned(b"payload".to_vec()),
            attr: attr(0o100644),
        },
        Op::Truncate {
            path: p("e"),
            size: 3,
            attr: attr(0o100644),
        },
        Op::SetAttr {
            path: Vec::new(),
            attr: attr(0o40700),
            atime: Some(ts(8)),
        },
        Op::SetXattr {
            path: p("e"),
            name: p("user.a"),
            value: Cow::Owned(vec![1, 2, 3]),
        },
        Op::RemoveXattr {
            path: p("e"),
            name: p("user.a"),
        },
        Op::Fallocate {
            path: p("e"),
            mode: 0,
            offset: 0,
            len: 4096,
            attr: attr(0o100644),
        },
        Op::Resync {
            path: p("e"),
            reason: "test".into(),
        },
    ]
}

fn batch_of(first: Lsn, ops: Vec<Op<'static>>) -> Batch {
    let records = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            lsn: first + i as u64,
            time_ns: 1_000 + i as i64,
            op,
        })
        .collect();
    Batch { records }
}

fn roundtrip(m: &Msg) -> (Msg, u64) {
    let mut buf = Vec::new();
    let n = write_msg(&mut buf, m).unwrap();
    assert_eq!(n as usize, buf.len());
    let mut c = Cursor::new(buf);
    let back = read_msg(&mut c).unwrap();
    assert!(matches!(read_msg(&mut c), Err(ProtoError::Closed)));
    (back, n)
}

#[test]
fn every_message_roundtrips() {
    let msgs = [
        Msg::Ack { lsn: 77 },
        Msg::Ready(ReadyInfo::default()),
        Msg::Ready(ReadyInfo {
            applied: u64::MAX,
            source: "0123456789abcdef".into(),
        }),
        Msg::SyncBegin {
            lsn: 9,
            source: "src-1".into(),
        },
        Msg::ManifestReq {
            path: b"a/b".to_vec(),
            hashes: true,
        },
        Msg::Manifest {
            last: true,
            entries: Vec::new(),
        },
        Msg::SumsReq {
            path: b"f".to_vec(),
            block: 65536,
        },
        Msg::Sums {
            size: Some(3),
            block: 4096,
            sums: vec![[1; 16], [2; 16]],
        },
        Msg::Sums {
            size: None,
            block: 4096,
            sums: vec![],
        },
        Msg::SyncOps(Batch {
            records: every_op()
                .into_iter()
                .map(|op| Record {
                    lsn: 0,
                    time_ns: 0,
                    op,
                })
                .collect(),
        }),
        Msg::SyncEnd {
            token: 5,
            horizon: 6,
        },
        Msg::SyncDone { token: 5 },
        Msg::Repairs { paths: vec![] },
        Msg::Repairs {
            paths: vec![Vec::new(), b"a/b".to_vec()],
        },
        Msg::Error {
            msg: "expected LSN 5".into(),
        },
        Msg::Ping,
        Msg::Pong,
        Msg::Batch(batch_of(5, every_op())),
    ];
    for m in &msgs {
        assert_eq!(&roundtrip(m).0, m, "{}", m.name());
    }
}

#[test]
fn compressible_batches_are_compressed() {
    let data = b"the same line of text, again and again\n".repeat(2000);
    let b = batch_of(
        1,
        vec![Op::Write {
            path: p("big"),
            offset: 0,
            data: Cow::Owned(data.clone()),
            attr: attr(0o100644),
        }],
    );
    let frame = encode_msg(&Msg::Batch(b.clone())).unwrap();
    assert_eq!(frame[FRAME_HEADER_LEN], FLAG_BATCH_LZ4);
    assert!(frame.len() < data.len() / 4, "{} bytes", frame.len());
    let (back, _) = roundtrip(&Msg::Batch(b.clone()));
    assert_eq!(back, Msg::Batch(b));
}

#[test]
fn record_wire_len_is_exact_and_batches_over_the_limit_are_refused() {
    let ops = every_op();
    let b = batch_of(1, ops.clone());
    let sum: usize = ops.iter().map(|o| record_wire_len(o).unwrap()).sum();
    let frame = encode_msg(&Msg::Batch(b)).unwrap();
    let raw_len = u32::from_le_bytes(frame[10..14].try_into().unwrap()) as usize;
    assert_eq!(raw_len, sum);
    // 33 incompressible 1 MiB writes do not fit in one batch.
    let mut data = vec![0u8; 1 << 20];
    getrandom::fill(&mut data).unwrap();
    let big: Vec<_> = (0..33)
        .map(|_| Op::Write {
            path: p("f"),
            offset: 0,
            data: Cow::Owned(data.clone()),
            attr: attr(0o100644),
        })
        .collect();
    let e = encode_msg(&Msg::Batch(batch_of(1, big))).unwrap_err();
    assert!(
        matches!(
            e,
            ProtoError::TooLarge {
                max: MAX_BATCH_RAW,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn long_error_text_is_cut_on_a_char_boundary() {
    let msg = "é".repeat(MAX_ERROR_LEN);
    let (back, _) = roundtrip(&Msg::Error { msg });
    let Msg::Error { msg } = back else { panic!() };
    assert!(msg.len() <= MAX_ERROR_LEN && msg.chars().all(|c| c == 'é'));
}

#[test]
fn invalid_batches_are_not_encoded() {
    let empty = Msg::Batch(Batch { records: vec![] });
    assert!(matches!(encode_msg(&empty), Err(ProtoError::Encode(_))));
    let mut b = batch_of(1, every_op());
    b.records[3].lsn = 9;
    assert!(matches!(
        encode_msg(&Msg::Batch(b)),
        Err(ProtoError::Encode(_))
    ));
    let bad_path = batch_of(
        1,
        vec![Op::Truncate {
            path: p("../x"),
            size: 0,
            attr: attr(0o100644),
        }],
    );
    assert!(matches!(
        encode_msg(&Msg::Batch(bad_path)),
        Err(ProtoError::Encode(_))
    ));
}

// ---- hand-made hostile frames ----

/// A record frame as the wire carries it.
fn rec_frame(lsn: Lsn, op: &Op<'_>) -> Vec<u8> {
    codec::encode_frame(WIRE_SALT, lsn, 1, op, usize::MAX).unwrap()
}

/// Re-seals a record frame's CRC after its body was edited.
fn reseal(frame: &mut [u8]) {
    let mut h = FrameHeader::parse(frame).unwrap();
    let body = crc32c::crc32c_append(codec::crc_seed(WIRE_SALT), &frame[32..]);
    h.crc = codec::seal_crc(body, &h.to_bytes());
    frame[..32].copy_from_slice(&h.to_bytes());
}

/// A whole BATCH frame around raw record frames (uncompressed).
fn batch_frame(recs: &[Vec<u8>]) -> Vec<u8> {
    let raw: Vec<u8> = recs.concat();
    let mut payload = vec![0u8];
    payload.extend_from_slice(&(recs.len() as u32).to_le_bytes());
    payload.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    payload.extend_from_slice(&raw);
    frame(frame_type::BATCH, &payload)
}

fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.push(ty);
    f.extend_from_slice(payload);
    f
}

fn truncate_op(path: &str) -> Op<'static> {
    Op::Truncate {
        path: p(path),
        size: 1,
        attr: attr(0o100644),
    }
}

fn read_bytes(b: &[u8]) -> Result<Msg, ProtoError> {
    read_msg(&mut Cursor::new(b))
}

#[test]
fn hand_made_batch_frames_match_the_encoder() {
    let ops = [truncate_op("a"), truncate_op("b")];
    let f = batch_frame(&[rec_frame(4, &ops[0]), rec_frame(5, &ops[1])]);
    let Msg::Batch(b) = read_bytes(&f).unwrap() else {
        panic!()
    };
    assert_eq!((b.records[0].lsn, b.last_lsn()), (4, Some(5)));
}

#[test]
fn lsns_that_do_not_increase_are_malformed() {
    let op = truncate_op("a");
    // A gap is a record the shipper coalesced away: allowed.
    let f = batch_frame(&[rec_frame(4, &op), rec_frame(6, &op)]);
    assert!(read_bytes(&f).is_ok());
    for lsns in [[4, 4], [5, 4], [0, 1]] {
        let f = batch_frame(&[rec_frame(lsns[0], &op), rec_frame(lsns[1], &op)]);
        assert!(
            matches!(read_bytes(&f), Err(ProtoError::Malformed(_))),
            "{lsns:?}"
        );
    }
}

#[test]
fn a_bad_record_crc_is_malformed() {
    let mut r = rec_frame(1, &truncate_op("abc"));
    let last = r.len() - 1;
    r[last] ^= 1;
    let e = read_bytes(&batch_frame(&[r])).unwrap_err();
    assert!(format!("{e}").contains("CRC"), "{e}");
}

#[test]
fn escaping_paths_inside_a_batch_are_malformed() {
    for (good, evil) in [("xx/yy", "../yy"), ("xetc/x", "/etc/x"), ("a/b/c", "a/../")] {
        let mut r = rec_frame(1, &truncate_op(good));
        let at = r.windows(good.len()).position(|w| w == good.as_bytes());
        let at = at.unwrap();
        r[at..at + good.len()].copy_from_slice(evil.as_bytes());
        reseal(&mut r);
        let e = read_bytes(&batch_frame(&[r])).unwrap_err();
        assert!(
            matches!(&e, ProtoError::Malformed(m) if m.contains("path")),
            "{evil}: {e}"
        );
    }
}

#[test]
fn oversized_frames_are_refused_before_reading_the_payload() {
    // Only the header exists: a reader that tried to read 1 GiB would get
    // an EOF error, not TooLarge.
    let mut hdr = (1u32 << 30).to_le_bytes().to_vec();
    hdr.push(frame_type::BATCH);
    assert!(matches!(
        read_bytes(&hdr),
        Err(ProtoError::TooLarge { len, max: MAX_FRAME }) if len == 1 << 30
    ));
    // At the limit, a frame that never arrives is an I/O error.
    let mut hdr = (MAX_FRAME as u32).to_le_bytes().to_vec();
    hdr.push(frame_type::BATCH);
    assert!(matches!(read_bytes(&hdr), Err(ProtoError::Io(_))));
}

#[test]
fn lz4_size_claims_are_bounded() {
    let mut payload = vec![FLAG_BATCH_LZ4];
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&(MAX_BATCH_RAW as u32).to_le_bytes());
    payload.extend_from_slice(&[0x1f; 16]);
    let e = read_bytes(&frame(frame_type::BATCH, &payload)).unwrap_err();
    assert!(
        matches!(&e, ProtoError::Malformed(m) if m.contains("claims")),
        "{e}"
    );
    let mut payload = vec![FLAG_BATCH_LZ4];
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&(u32::MAX).to_le_bytes());
    let e = read_bytes(&frame(frame_type::BATCH, &payload)).unwrap_err();
    assert!(matches!(e, ProtoError::TooLarge { .. }), "{e}");
}

#[test]
fn other_bad_frames_are_malformed() {
    let bad = [
        frame(0, &[]),
        frame(200, &[]),
        frame(frame_type::PING, &[1]),
        frame(frame_type::ACK, &[1, 2, 3]),
        frame(frame_type::HELLO, &[0; 40]),
        frame(frame_type::BATCH, &[0; 9]),
        frame(frame_type::BATCH, &[2, 1, 0, 0, 0, 32, 0, 0, 0]),
        // More paths than a REPAIRS may hold, with room for them all in the
        // frame: refused before any of it is reserved.
        frame(frame_type::REPAIRS, &{
            let n = (MAX_REPAIRS + 1) as u32;
            let mut p = n.to_le_bytes().to_vec();
            for _ in 0..n {
                p.extend_from_slice(&[1, 0, b'a']);
            }
            p
        }),
    ];
    for f in &bad {
        assert!(
            matches!(read_bytes(f), Err(ProtoError::Malformed(_))),
            "{f:?}"
        );
    }
    assert!(matches!(read_bytes(&[1, 0]), Err(ProtoError::Io(_))));
    assert!(matches!(read_bytes(&[]), Err(ProtoError::Closed)));
    // The most a REPAIRS may hold is read.
    let mut p = (MAX_REPAIRS as u32).to_le_bytes().to_vec();
    for _ in 0..MAX_REPAIRS {
        p.extend_from_slice(&[1, 0, b'a']);
    }
    match read_bytes(&frame(frame_type::REPAIRS, &p)) {
        Ok(Msg::Repairs { paths }) => assert_eq!(paths.len(), MAX_REPAIRS),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = read_bytes(&bytes);
    }

    #[test]
    fn prop_arbitrary_payloads_never_panic(ty in 0u8..12, payload in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = read_bytes(&frame(ty, &payload));
    }

    #[test]
    fn prop_mutated_batches_never_panic(pos in any::<prop::sample::Index>(), byte in any::<u8>(), compress in any::<bool>()) {
        let mut ops = every_op();
        if compress {
            ops.push(Op::Write { path: p("z"), offset: 0, data: Cow::Owned(vec![b'a'; 3000]), attr: attr(0o100644) });
        }
        let mut f = encode_msg(&Msg::Batch(batch_of(1, ops))).unwrap();
        let i = pos.index(f.len() - FRAME_HEADER_LEN) + FRAME_HEADER_LEN;
        f[i] = byte;
        let _ = read_bytes(&f);
    }
}

// ---- handshake over loopback ----

type ServerResult = Result<String, ProtoError>;

/// A server thread on 127.0.0.1 that knows `vol1` with `key`; returns the
/// client end and the server's result.
fn with_server<T>(
    key: &'static [u8],
    client: impl FnOnce(&mut TcpStream) -> T,
) -> (T, ServerResult) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let key_for = |v: &str| (v == "vol1").then(|| Key::from_bytes(key));
        let r = server_handshake(&mut s, &key_for);
        if r.is_ok() {
            let ready = ReadyInfo {
                applied: 42,
                source: String::new(),
            };
            write_msg(&mut s, &Msg::Ready(ready)).unwrap();
        }
        r
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let out = client(&mut c);
    (out, server.join().unwrap().map(|(v, _role)| v))
}

const KEY: &[u8] = b"0123456789abcdef-the-right-key";

#[test]
fn handshake_succeeds_with_the_right_key() {
    let (c, s) = with_server(KEY, |c| client_handshake(c, "vol1", &Key::from_bytes(KEY)));
    assert_eq!(c.unwrap().applied, 42);
    assert_eq!(s.unwrap(), "vol1");
}

#[test]
fn a_client_with_the_wrong_key_detects_the_mismatch_first() {
    let wrong = Key::from_bytes(b"0123456789abcdef-a-wrong-key");
    let (c, s) = with_server(KEY, |c| client_handshake(c, "vol1", &wrong));
    assert!(matches!(c, Err(ProtoError::AuthFailed(_))), "{c:?}");
    assert!(
        matches!(&s, Err(ProtoError::AuthFailed(m)) if m.contains("keys differ")),
        "{s:?}"
    );
}

/// A client that ignores the server's proof and answers with its own key:
/// what an attacker would do. Returns the server's reply text.
fn reckless_client(c: &mut TcpStream, vol: &str, key: &[u8]) -> Result<String, ProtoError> {
    let nc = [7u8; NONCE_LEN];
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&PROTO_VERSION.to_le_bytes());
    hello.extend_from_slice(&nc);
    hello.push(vol.len() as u8);
    hello.extend_from_slice(vol.as_bytes());
    write_frame(c, frame_type::HELLO, &hello)?;
    let (ty, ch) = read_frame(c, HANDSHAKE_MAX)?;
    assert_eq!(ty, frame_type::CHALLENGE);
    let ns: [u8; NONCE_LEN] = ch[2..34].try_into().unwrap();
    let mut pr = hs::proof(&Key::from_bytes(key), hs::CLIENT_LABEL, &nc, &ns, vol).to_vec();
    pr.push(Role::Shipper as u8);
    write_frame(c, frame_type::AUTH, &pr)?;
    let (ty, reply) = read_frame(c, HANDSHAKE_MAX)?;
    assert_eq!(ty, frame_type::ERROR);
    Ok(String::from_utf8(reply).unwrap())
}

#[test]
fn the_server_refuses_a_wrong_client_proof() {
    let (c, s) = with_server(KEY, |c| reckless_client(c, "vol1", b"not the key at all!"));
    let wrong_key_reply = c.unwrap();
    assert!(
        matches!(&s, Err(ProtoError::AuthFailed(m)) if m.contains("wrong key")),
        "{s:?}"
    );
    // An unknown volume gets the very same answer on the wire.
    let (c, s) = with_server(KEY, |c| reckless_client(c, "nope", KEY));
    assert_eq!(c.unwrap(), wrong_key_reply);
    assert!(
        matches!(&s, Err(ProtoError::AuthFailed(m)) if m.contains("unknown volume")),
        "{s:?}"
    );
}

#[test]
fn an_unknown_volume_is_refused() {
    let (c, s) = with_server(KEY, |c| client_handshake(c, "other", &Key::from_bytes(KEY)));
    assert!(matches!(c, Err(ProtoError::AuthFailed(_))), "{c:?}");
    assert!(
        matches!(&s, Err(ProtoError::AuthFailed(m)) if m.contains("unknown volume")),
        "{s:?}"
    );
}

#[test]
fn a_replayed_server_proof_is_not_a_client_proof() {
    // The proofs of the two roles differ even with the same nonces.
    let k = Key::from_bytes(KEY);
    let (a, b) = ([1u8; 32], [2u8; 32]);
    assert_ne!(
        hs::proof(&k, hs::SERVER_LABEL, &a, &b, "v"),
        hs::proof(&k, hs::CLIENT_LABEL, &a, &b, "v")
    );
}

#[test]
fn a_version_mismatch_is_reported_to_both_sides() {
    let (c, s) = with_server(KEY, |c| {
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&9u16.to_le_bytes());
        hello.extend_from_slice(&[0; NONCE_LEN]);
        hello.extend_from_slice(&[4, b'v', b'o', b'l', b'1']);
        write_frame(c, frame_type::HELLO, &hello).unwrap();
        read_frame(c, HANDSHAKE_MAX).unwrap()
    });
    assert_eq!(c.0, frame_type::ERROR);
    assert!(String::from_utf8_lossy(&c.1).contains("version 9"));
    assert!(matches!(s, Err(ProtoError::Version { ours: 2, theirs: 9 })));
}

#[test]
fn garbage_instead_of_hello_is_refused() {
    let (_, s) = with_server(KEY, |c| {
        std::io::Write::write_all(c, b"GET / HTTP/1.1\r\n\r\n").unwrap()
    });
    assert!(matches!(s, Err(ProtoError::TooLarge { .. })), "{s:?}");
    let (_, s) = with_server(KEY, |c| write_frame(c, frame_type::HELLO, b"hi").unwrap());
    assert!(matches!(s, Err(ProtoError::Malformed(_))), "{s:?}");
}

#[test]
fn keys_load_from_files_and_never_print() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("k");
    std::fs::write(&f, b"0123456789abcdefXYZ\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k = Key::load(&f).unwrap();
    assert_eq!(k, Key::from_bytes(b"0123456789abcdefXYZ"));
    assert!(!format!("{k:?}").contains("0123"));
    std::fs::write(&f, b"short\n").unwrap();
    assert!(format!("{:#}", Key::load(&f).unwrap_err()).contains("at least 16"));
    std::fs::write(&f, b"\n").unwrap();
    assert!(format!("{:#}", Key::load(&f).unwrap_err()).contains("empty"));
    assert!(Key::load(&dir.path().join("missing")).is_err());
}

#[test]
fn volume_ids_are_checked() {
    for ok in ["default", "vol-1", "a.b_c"] {
        assert!(check_volume_id(ok).is_ok(), "{ok}");
    }
    let long = "x".repeat(65);
    for bad in ["", ".hidden", "a/b", "a b", long.as_str(), "é"] {
        assert!(check_volume_id(bad).is_err(), "{bad}");
    }
}

// ---- BatchBuilder (the shipper's encoder) ----

/// A write whose data is `len` bytes: random-looking (an LCG) or text-like.
fn sized_write(len: usize, random: bool, seed: u64) -> Op<'static> {
    let mut x = seed | 1;
    let data = (0..len)
        .map(|i| {
            if random {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            } else {
                b"the quick brown fox "[i % 20]
            }
        })
        .collect();
    Op::Write {
        path: p("big"),
        offset: seed * 7,
        data: Cow::Owned(data),
        attr: attr(0o100644),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A batch built record by record — small records re-encoded, large ones
    /// forwarded from a segment frame with the CRC re-seeded — is the frame
    /// the one encoder makes, and the receiver decodes the same records.
    #[test]
    fn prop_a_built_batch_is_the_encoded_batch(
        sizes in prop::collection::vec((0usize..80_000, any::<bool>(), any::<bool>()), 1..6),
        salt in any::<u64>(),
        first in 1u64..1 << 40,
    ) {
        let mut ops = every_op();
        ops.truncate(3);
        for (i, (len, random, _)) in sizes.iter().enumerate() {
            ops.push(sized_write(*len, *random, i as u64));
        }
        let batch = batch_of(first, ops);
        let mut b = BatchBuilder::new();
        let forward: Vec<bool> = [false; 3].into_iter().chain(sizes.iter().map(|s| s.2)).collect();
        for (rec, fwd) in batch.records.iter().zip(&forward) {
            if *fwd {
                // As stored in a segment with `salt`, uncompressed.
                let f = codec::encode_frame(salt, rec.lsn, rec.time_ns, &rec.op, usize::MAX).unwrap();
                let h = FrameHeader::parse(&f).unwrap();
                b.push_frame(&h, &f[codec::FRAME_HEADER_LEN..], codec::crc_seed(salt)).unwrap();
            } else {
                b.push(rec.lsn, rec.time_ns, &rec.op).unwrap();
            }
        }
        prop_assert_eq!(b.records(), batch.records.len());
        prop_assert_eq!(b.last_lsn(), batch.last_lsn());
        let built = b.finish().unwrap();
        prop_assert_eq!(&built, &encode_msg(&Msg::Batch(batch.clone())).unwrap());
        let back = read_bytes(&built).unwrap();
        prop_assert!(matches!(back, Msg::Batch(ref got) if *got == batch));
    }
}

#[test]
fn the_builder_refuses_what_the_encoder_refuses() {
    assert!(matches!(
        BatchBuilder::new().finish(),
        Err(ProtoError::Encode(_))
    ));
    let mut b = BatchBuilder::new();
    b.push(5, 0, &truncate_op("a")).unwrap();
    // LSNs must increase.
    assert!(matches!(
        b.push(5, 0, &truncate_op("b")),
        Err(ProtoError::Encode(_))
    ));
    // A compressed segment frame is not forwarded.
    let op = sized_write(4096, false, 1);
    let f = codec::encode_frame(9, 6, 0, &op, 64).unwrap();
    let h = FrameHeader::parse(&f).unwrap();
    assert_ne!(h.flags, 0, "the text body was compressed");
    let e = b.push_frame(&h, &f[codec::FRAME_HEADER_LEN..], codec::crc_seed(9));
    assert!(matches!(e, Err(ProtoError::Encode(_))), "{e:?}");
    // A random section is sent as is (the samples do not shrink), a text one
    // compressed.
    let mut r = BatchBuilder::new();
    r.push(1, 0, &sized_write(1 << 20, true, 3)).unwrap();
    let f = r.finish().unwrap();
    assert_eq!(f[FRAME_HEADER_LEN] & FLAG_BATCH_LZ4, 0);
    let mut t = BatchBuilder::new();
    t.push(1, 0, &sized_write(1 << 20, false, 3)).unwrap();
    let f = t.finish().unwrap();
    assert_eq!(f[FRAME_HEADER_LEN] & FLAG_BATCH_LZ4, FLAG_BATCH_LZ4);
    assert!(f.len() < 100_000);
}
