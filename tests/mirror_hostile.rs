//! `replfs mirror` against hostile and well-behaved peers over real TCP
//! (no FUSE): wrong keys, escaping paths, planted symlinks, oversized and
//! garbage frames are refused without touching anything outside DIR; a good
//! shipper's batches are applied, acknowledged and survive a restart.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use replfs::mirror::{self, MirrorHandle, MirrorOptions, VolumeSpec};
use replfs::proto::{self, Batch, Key, Msg, ProtoError};
use replfs::wal::codec::{self, FrameHeader};
use replfs::wal::{Attr, NodeKind, Op, Record, Ts};

const KEY: &[u8] = b"a-test-key-of-32-bytes-0123456789";
const VOL: &str = "vol1";

/// A tempdir with DIR (the replica), STATE, and OUTSIDE holding a canary.
struct Rig {
    _t: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    outside: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let _ = env_logger::builder().is_test(true).try_init();
        let t = tempfile::tempdir().unwrap();
        let (dir, state, outside) = (
            t.path().join("dir"),
            t.path().join("state"),
            t.path().join("outside"),
        );
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("canary"), b"canary").unwrap();
        Rig {
            _t: t,
            dir,
            state,
            outside,
        }
    }

    fn options(&self) -> MirrorOptions {
        let vols = vec![VolumeSpec {
            id: VOL.into(),
            dir: self.dir.clone(),
            key: Key::from_bytes(KEY),
        }];
        MirrorOptions::new("127.0.0.1:0", &self.state, vols)
    }

    fn spawn(&self) -> MirrorHandle {
        mirror::spawn(self.options()).unwrap()
    }

    /// Nothing outside DIR changed.
    fn assert_outside_untouched(&self) {
        assert_eq!(fs::read(self.outside.join("canary")).unwrap(), b"canary");
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["canary"], "files appeared outside DIR");
        let state: Vec<_> = fs::read_dir(self.dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut state = state;
        state.sort();
        assert_eq!(state, ["dir", "outside", "state"]);
    }
}

fn connect(addr: SocketAddr, key: &[u8]) -> Result<(TcpStream, u64), ProtoError> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let applied = proto::client_handshake(&mut s, VOL, &Key::from_bytes(key))?;
    // A shipper's connection starts with the mirror's repair requests.
    match proto::read_msg(&mut s)? {
        Msg::Repairs { .. } => {}
        other => panic!("expected Repairs, got {other:?}"),
    }
    Ok((s, applied.applied))
}

/// Reads until the mirror closes the connection; returns its last `Error`
/// text. Fails if it stays open for 5 s.
fn expect_closed(s: &mut TcpStream) -> Option<String> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut last = None;
    loop {
        match proto::read_msg(s) {
            Ok(Msg::Error { msg }) => last = Some(msg),
            Ok(m) => panic!("unexpected {m:?}"),
            Err(e) if e.is_timeout() => panic!("the mirror kept the connection open"),
            Err(_) => break,
        }
    }
    assert!(start.elapsed() < Duration::from_secs(4));
    last
}

fn ts(sec: i64) -> Ts {
    Ts { sec, nsec: 0 }
}

fn attr(mode: u32, sec: i64) -> Attr {
    // SAFETY: trivial libc getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Attr {
        mode,
        uid,
        gid,
        mtime: ts(sec),
    }
}

fn p(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn batch(first: u64, ops: Vec<Op<'static>>) -> Msg {
    let records = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            lsn: first + i as u64,
            time_ns: 1_700_000_000_000_000_000 + i as i64,
            op,
        })
        .collect();
    Msg::Batch(Batch { records })
}

/// A BATCH frame written by hand around one record whose path `good` was
/// replaced by `evil` (same length) after encoding, CRC re-sealed: what a
/// hostile shipper can send, since the encoder refuses such paths.
fn raw_batch_with_path(lsn: u64, good: &str, evil: &str) -> Vec<u8> {
    let op = Op::Create {
        path: p(good),
        kind: NodeKind::File,
        rdev: 0,
        attr: attr(0o100644, 5),
        parent_mtime: ts(5),
    };
    let mut rec = codec::encode_frame(proto::WIRE_SALT, lsn, 1, &op, usize::MAX).unwrap();
    let at = rec
        .windows(good.len())
        .position(|w| w == good.as_bytes())
        .unwrap();
    rec[at..at + evil.len()].copy_from_slice(evil.as_bytes());
    let mut h = FrameHeader::parse(&rec).unwrap();
    let body = crc32c::crc32c_append(codec::crc_seed(proto::WIRE_SALT), &rec[32..]);
    h.crc = codec::seal_crc(body, &h.to_bytes());
    rec[..32].copy_from_slice(&h.to_bytes());

    let mut payload = vec![0u8];
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&(rec.len() as u32).to_le_bytes());
    payload.extend_from_slice(&rec);
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.push(proto::frame_type::BATCH);
    frame.extend_from_slice(&payload);
    frame
}

#[test]
fn a_wrong_key_is_refused_and_others_are_still_served() {
    let rig = Rig::new();
    let m = rig.spawn();
    let e = connect(m.local_addr(), b"a-wrong-key-of-32-bytes-01234567").unwrap_err();
    assert!(
        matches!(e, ProtoError::AuthFailed(_) | ProtoError::Refused(_)),
        "{e}"
    );
    let (mut s, applied) = connect(m.local_addr(), KEY).unwrap();
    assert_eq!(applied, 0);
    proto::write_msg(&mut s, &Msg::Ping).unwrap();
    assert_eq!(proto::read_msg(&mut s).unwrap(), Msg::Pong);
    // One shipper per volume.
    let e = connect(m.local_addr(), KEY).unwrap_err();
    assert!(
        matches!(&e, ProtoError::Refused(m) if m.contains("busy")),
        "{e}"
    );
    m.shutdown().unwrap();
}

#[test]
fn escaping_paths_and_planted_symlinks_touch_nothing_outside() {
    let rig = Rig::new();
    let m = rig.spawn();
    for (good, evil) in [("xx/escape", "../escape"), ("xetc/x", "/etc/x")] {
        let (mut s, _) = connect(m.local_addr(), KEY).unwrap();
        s.write_all(&raw_batch_with_path(1, good, evil)).unwrap();
        let msg = expect_closed(&mut s).unwrap_or_default();
        assert!(msg.contains("bad frame"), "{evil}: {msg}");
    }
    std::os::unix::fs::symlink(&rig.outside, rig.dir.join("link")).unwrap();
    let hostile = [
        Op::Create {
            path: p("link/pwned"),
            kind: NodeKind::File,
            rdev: 0,
            attr: attr(0o100644, 5),
            parent_mtime: ts(5),
        },
        Op::Write {
            path: p("link/canary"),
            offset: 0,
            data: b"PWNED!".to_vec().into(),
            attr: attr(0o100644, 5),
        },
        Op::Truncate {
            path: p("link/canary"),
            size: 0,
            attr: attr(0o100644, 5),
        },
        Op::SetAttr {
            path: p("link"),
            attr: attr(0o40777, 5),
            atime: None,
        },
    ];
    for op in hostile {
        let (mut s, applied) = connect(m.local_addr(), KEY).unwrap();
        proto::write_msg(&mut s, &batch(applied + 1, vec![op.clone()])).unwrap();
        let msg = expect_closed(&mut s).unwrap_or_default();
        assert!(msg.contains("cannot apply"), "{op:?}: {msg}");
    }
    rig.assert_outside_untouched();
    m.shutdown().unwrap();
}

#[test]
fn oversized_and_garbage_frames_are_dropped_quickly() {
    let rig = Rig::new();
    let m = rig.spawn();
    // Before authentication: garbage, then a huge length, then a stray frame.
    let mut header = (1u32 << 30).to_le_bytes().to_vec();
    header.push(proto::frame_type::HELLO);
    let garbage: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &header,
        &[3, 0, 0, 0, 7, 1, 2, 3],
    ];
    for g in garbage {
        let mut s = TcpStream::connect(m.local_addr()).unwrap();
        s.write_all(g).unwrap();
        expect_closed(&mut s);
    }
    // After authentication: a 1 GiB batch header and nothing else.
    let (mut s, _) = connect(m.local_addr(), KEY).unwrap();
    let mut header = (1u32 << 30).to_le_bytes().to_vec();
    header.push(proto::frame_type::BATCH);
    s.write_all(&header).unwrap();
    let msg = expect_closed(&mut s).unwrap_or_default();
    assert!(msg.contains("exceeds the limit"), "{msg}");
    // The mirror still serves.
    let (mut s, _) = connect(m.local_addr(), KEY).unwrap();
    proto::write_msg(&mut s, &Msg::Ping).unwrap();
    assert_eq!(proto::read_msg(&mut s).unwrap(), Msg::Pong);
    rig.assert_outside_untouched();
    m.shutdown().unwrap();
}

fn good_batch() -> Msg {
    batch(
        1,
        vec![
            Op::Create {
                path: p("d"),
                kind: NodeKind::Dir,
                rdev: 0,
                attr: attr(0o40750, 100),
                parent_mtime: ts(101),
            },
            Op::Create {
                path: p("d/f"),
                kind: NodeKind::File,
                rdev: 0,
                attr: attr(0o100644, 102),
                parent_mtime: ts(103),
            },
            Op::Write {
                path: p("d/f"),
                offset: 0,
                data: b"hello, mirror\n".repeat(100).into(),
                attr: attr(0o100644, 104),
            },
            Op::Rename {
                from: p("d/f"),
                to: p("d/g"),
                flags: 0,
                from_parent_mtime: ts(105),
                to_parent_mtime: ts(105),
            },
            Op::Symlink {
                path: p("d/l"),
                target: p("g"),
                attr: attr(0o120777, 106),
                parent_mtime: ts(107),
            },
            Op::SetAttr {
                path: p("d/g"),
                attr: attr(0o100600, 108),
                atime: Some(ts(109)),
            },
        ],
    )
}

/// The tree `good_batch` makes; `fresh`: not read since (atime intact).
fn assert_tree(dir: &Path, fresh: bool) {
    use std::os::unix::fs::MetadataExt;
    let d = dir.join("d");
    assert!(!d.join("f").exists());
    // Metadata first: reading the file moves its atime.
    let g = fs::metadata(d.join("g")).unwrap();
    assert_eq!((g.mode() & 0o7777, g.mtime()), (0o600, 108));
    if fresh {
        assert_eq!(g.atime(), 109);
    }
    assert_eq!(
        fs::read(d.join("g")).unwrap(),
        b"hello, mirror\n".repeat(100)
    );
    assert_eq!(fs::read_link(d.join("l")).unwrap(), Path::new("g"));
    let dm = fs::metadata(&d).unwrap();
    assert_eq!((dm.mode() & 0o7777, dm.mtime()), (0o750, 107));
    let names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["d"], "only the replica in DIR");
}

#[test]
fn a_good_shipper_is_applied_acked_and_resumes_after_restart() {
    let rig = Rig::new();
    let m = rig.spawn();
    let (mut s, applied) = connect(m.local_addr(), KEY).unwrap();
    assert_eq!(applied, 0);
    proto::write_msg(&mut s, &good_batch()).unwrap();
    assert_eq!(proto::read_msg(&mut s).unwrap(), Msg::Ack { lsn: 6 });
    assert_tree(&rig.dir, true);
    drop(s);
    m.shutdown().unwrap();

    let m = rig.spawn();
    let (mut s, applied) = connect(m.local_addr(), KEY).unwrap();
    assert_eq!(applied, 6);
    // Re-sending the last batch is skipped: acked again, nothing changes.
    proto::write_msg(&mut s, &good_batch()).unwrap();
    assert_eq!(proto::read_msg(&mut s).unwrap(), Msg::Ack { lsn: 6 });
    assert_tree(&rig.dir, false);
    // A gap is refused.
    proto::write_msg(
        &mut s,
        &batch(
            8,
            vec![Op::Remove {
                path: p("d/l"),
                dir: false,
                parent_mtime: ts(1),
            }],
        ),
    )
    .unwrap();
    let msg = expect_closed(&mut s).unwrap_or_default();
    assert!(msg.contains("expected LSN 7"), "{msg}");
    assert_tree(&rig.dir, false);
    rig.assert_outside_untouched();
    m.shutdown().unwrap();
}

#[test]
fn shutdown_with_a_connected_shipper_is_prompt() {
    let rig = Rig::new();
    let m = rig.spawn();
    let (mut s, _) = connect(m.local_addr(), KEY).unwrap();
    let t = Instant::now();
    m.shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let msg = expect_closed(&mut s).unwrap_or_default();
    assert!(msg.contains("shutting down"), "{msg}");
    // The state dir is unlocked: a new mirror starts on it.
    rig.spawn().shutdown().unwrap();
}

#[test]
fn idle_shippers_are_dropped_and_silent_ones_replaced() {
    let rig = Rig::new();
    let mut o = rig.options();
    o.idle_timeout = Duration::from_millis(700);
    o.takeover_after = Duration::from_millis(300);
    let m = mirror::spawn(o).unwrap();
    let (mut first, _) = connect(m.local_addr(), KEY).unwrap();
    // Active: a second shipper is refused.
    proto::write_msg(&mut first, &Msg::Ping).unwrap();
    assert_eq!(proto::read_msg(&mut first).unwrap(), Msg::Pong);
    let e = connect(m.local_addr(), KEY).unwrap_err();
    assert!(
        matches!(&e, ProtoError::Refused(m) if m.contains("busy")),
        "{e}"
    );
    // Silent past the takeover delay: the newcomer wins, the old one is cut.
    std::thread::sleep(Duration::from_millis(400));
    let (mut second, _) = connect(m.local_addr(), KEY).unwrap();
    expect_closed(&mut first);
    proto::write_msg(&mut second, &Msg::Ping).unwrap();
    assert_eq!(proto::read_msg(&mut second).unwrap(), Msg::Pong);
    // No frame for the idle timeout: dropped with a reason.
    let msg = expect_closed(&mut second).unwrap_or_default();
    assert!(msg.contains("idle"), "{msg}");
    m.shutdown().unwrap();
}

#[test]
fn connections_over_the_cap_are_refused() {
    let rig = Rig::new();
    let mut o = rig.options();
    o.max_connections = 1;
    let m = mirror::spawn(o).unwrap();
    let (mut s, _) = connect(m.local_addr(), KEY).unwrap();
    let mut extra = TcpStream::connect(m.local_addr()).unwrap();
    let msg = expect_closed(&mut extra).unwrap_or_default();
    assert!(msg.contains("too many"), "{msg}");
    proto::write_msg(&mut s, &Msg::Ping).unwrap();
    assert_eq!(proto::read_msg(&mut s).unwrap(), Msg::Pong);
    drop(s);
    // The slot is freed when a connection ends.
    let t = Instant::now();
    loop {
        match connect(m.local_addr(), KEY) {
            Ok(_) => break,
            Err(e) if t.elapsed() < Duration::from_secs(3) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
    m.shutdown().unwrap();
}

/// Reads replies until the mirror's answer that is not a Pong.
fn reply(s: &mut TcpStream) -> Msg {
    loop {
        match proto::read_msg(s).unwrap() {
            Msg::Pong => continue,
            m => return m,
        }
    }
}

#[test]
fn sync_requests_never_reach_outside_the_replica() {
    let rig = Rig::new();
    let m = rig.spawn();
    fs::write(rig.dir.join("inside"), b"inside").unwrap();
    std::os::unix::fs::symlink(&rig.outside, rig.dir.join("link")).unwrap();
    std::os::unix::fs::symlink(rig.outside.join("canary"), rig.dir.join("flink")).unwrap();
    // Listing a path through a planted symlink lists nothing beyond it.
    let (mut s, _) = connect(m.local_addr(), KEY).unwrap();
    for path in ["link", "link/canary", "flink"] {
        proto::write_msg(
            &mut s,
            &Msg::ManifestReq {
                path: p(path),
                hashes: true,
            },
        )
        .unwrap();
        let Msg::Manifest { last, entries } = reply(&mut s) else {
            panic!("expected a Manifest")
        };
        assert!(last);
        let listed = replfs::sync::manifest::decode_entries(&entries).unwrap();
        let names: Vec<String> = listed
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n.is_empty() || n == "link" || n == "flink"),
            "{path}: {names:?}"
        );
        assert!(
            listed.iter().all(|e| e.hash.is_none()),
            "no file content outside"
        );
    }
    // Checksums of a file through a symlink: "not a regular file here".
    for path in ["flink", "link/canary"] {
        proto::write_msg(
            &mut s,
            &Msg::SumsReq {
                path: p(path),
                block: 4096,
            },
        )
        .unwrap();
        match reply(&mut s) {
            Msg::Sums { size, sums, .. } => assert!(size.is_none() && sums.is_empty(), "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
    // Sync ops through the symlink are refused like records.
    let op = Op::Write {
        path: p("link/canary"),
        offset: 0,
        data: b"PWNED!".to_vec().into(),
        attr: attr(0o100644, 5),
    };
    let ops = Msg::SyncOps(Batch {
        records: vec![Record {
            lsn: 0,
            time_ns: 0,
            op,
        }],
    });
    proto::write_msg(&mut s, &ops).unwrap();
    let msg = expect_closed(&mut s).unwrap_or_default();
    assert!(msg.contains("sync"), "{msg}");
    // An escaping path in a request is a malformed frame.
    let (mut s, _) = connect(m.local_addr(), KEY).unwrap();
    let mut f = vec![0u8, 0, 0, 0, proto::frame_type::MANIFEST_REQ, 0];
    f.extend_from_slice(&(9u16).to_le_bytes());
    f.extend_from_slice(b"../outside"[..9].as_ref());
    let len = (f.len() - 5) as u32;
    f[..4].copy_from_slice(&len.to_le_bytes());
    s.write_all(&f).unwrap();
    let msg = expect_closed(&mut s).unwrap_or_default();
    assert!(msg.contains("bad frame"), "{msg}");
    rig.assert_outside_untouched();
    m.shutdown().unwrap();
}

#[test]
fn a_verifier_may_list_but_not_apply() {
    let rig = Rig::new();
    let m = rig.spawn();
    fs::write(rig.dir.join("f"), b"data").unwrap();
    // A shipper holds the volume; a verifier still gets in.
    let (_shipper, _) = connect(m.local_addr(), KEY).unwrap();
    let mut s = TcpStream::connect(m.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ready =
        proto::client_handshake_as(&mut s, VOL, &Key::from_bytes(KEY), proto::Role::Verifier)
            .unwrap();
    assert_eq!(ready.applied, 0);
    proto::write_msg(
        &mut s,
        &Msg::ManifestReq {
            path: Vec::new(),
            hashes: true,
        },
    )
    .unwrap();
    let Msg::Manifest { entries, .. } = reply(&mut s) else {
        panic!("expected a Manifest")
    };
    let listed = replfs::sync::manifest::decode_entries(&entries).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].hash, Some(*blake3::hash(b"data").as_bytes()));
    proto::write_msg(&mut s, &good_batch()).unwrap();
    let msg = expect_closed(&mut s).unwrap_or_default();
    assert!(msg.contains("verifier"), "{msg}");
    assert_eq!(
        fs::read_dir(&rig.dir).unwrap().count(),
        1,
        "nothing applied"
    );
    m.shutdown().unwrap();
}
