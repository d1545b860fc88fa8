//! Unit tests of the mirror: layout checks, batch application and
//! positions, volume ownership. The network is covered by
//! `tests/mirror_hostile.rs`.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use parking_lot::Mutex;

use super::volume::{BatchError, Ctx, Volume};
use super::*;
use crate::proto::Batch;
use crate::wal::{Attr, Lsn, NodeKind, Op, Record, Ts};

fn key() -> Key {
    Key::from_bytes(b"0123456789abcdef")
}

fn spec(id: &str, dir: &Path) -> VolumeSpec {
    VolumeSpec {
        id: id.into(),
        dir: dir.to_path_buf(),
        key: key(),
    }
}

#[test]
fn the_state_dir_and_volume_dirs_are_kept_apart() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    fs::create_dir_all(a.join("inner")).unwrap();
    fs::create_dir_all(&b).unwrap();
    let err =
        |state: &Path, vols: &[VolumeSpec]| format!("{:#}", check_layout(state, vols).unwrap_err());
    assert!(err(&a.join("inner"), &[spec("v", &a)]).contains("state dir"));
    assert!(err(&a, &[spec("v", &a.join("inner"))]).contains("inside the state dir"));
    assert!(err(&a, &[spec("v", &a)]).contains("inside"));
    assert!(err(&b, &[spec("v", &a), spec("w", &a.join("inner"))]).contains("overlap"));
    check_layout(&b, &[spec("v", &a)]).unwrap();
    // Checked before anything is created, through symlinks and `..`.
    std::os::unix::fs::symlink(&a, t.path().join("l")).unwrap();
    let new_in_a = t.path().join("l/new/../new2/state");
    assert!(err(&new_in_a, &[spec("v", &a)]).contains("state dir"));
    assert!(!a.join("new2").exists());
    assert_eq!(
        resolve(&new_in_a).unwrap(),
        a.canonicalize().unwrap().join("new2/state")
    );
    assert!(check_volumes(&[spec("v", &a), spec("v", &b)]).is_err());
    assert!(check_volumes(&[spec("../x", &a)]).is_err());
    assert!(check_volumes(&[]).is_err());
}

#[test]
fn options_come_from_the_cli_and_the_config() {
    let t = tempfile::tempdir().unwrap();
    let kf = t.path().join("k");
    fs::write(&kf, "0123456789abcdef\n").unwrap();
    let mut cfg = MirrorConfig::default();
    let state = t.path().join("s");
    let e = MirrorOptions::from_cli(None, None, state.clone(), None, &cfg).unwrap_err();
    assert!(format!("{e:#}").contains("--listen"));
    cfg.listen = Some("127.0.0.1:7450".into());
    let e = MirrorOptions::from_cli(None, Some(t.path().join("d")), state.clone(), None, &cfg);
    assert!(format!("{:#}", e.unwrap_err()).contains("--key-file"));
    let o = MirrorOptions::from_cli(
        Some("127.0.0.1:0".into()),
        Some(t.path().join("d")),
        state,
        Some(kf),
        &cfg,
    )
    .unwrap();
    assert_eq!(o.listen, "127.0.0.1:0");
    assert_eq!(o.volumes[0].id, DEFAULT_VOLUME);
    assert_eq!(o.volumes[0].key, key());
}

/// A volume on a fresh tempdir, with its catalog.
struct Rig {
    _t: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    db: Mutex<MirrorDb>,
    vol: Arc<Volume>,
    stop: AtomicBool,
}

impl Rig {
    fn new() -> Rig {
        let t = tempfile::tempdir().unwrap();
        let (dir, state) = (t.path().join("dir"), t.path().join("state"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&state).unwrap();
        let db = MirrorDb::open(&state).unwrap();
        let vol = Arc::new(Volume::open("v", &dir, &state, &db).unwrap());
        Rig {
            _t: t,
            dir,
            state,
            db: Mutex::new(db),
            vol,
            stop: AtomicBool::new(false),
        }
    }

    fn reopen(&mut self) {
        self.vol = Arc::new(Volume::open("v", &self.dir, &self.state, &self.db.lock()).unwrap());
    }

    fn apply(&self, b: &Batch) -> Result<Lsn, BatchError> {
        let alive = volume::test_liveness();
        self.vol.apply_batch(b, &self.cx(&alive))
    }

    /// The context of a connection whose liveness is `alive`.
    fn cx<'a>(&'a self, alive: &'a volume::Liveness) -> Ctx<'a> {
        Ctx {
            peer: "127.0.0.1:1".parse().unwrap(),
            db: &self.db,
            alive,
            shutdown: &self.stop,
        }
    }
}

fn attr(mode: u32) -> Attr {
    Attr {
        mode,
        uid: 0,
        gid: 0,
        mtime: Ts { sec: 1000, nsec: 0 },
    }
}

fn create(path: &str) -> Op<'static> {
    Op::Create {
        path: path.as_bytes().to_vec(),
        kind: NodeKind::File,
        rdev: 0,
        attr: attr(0o100644),
        parent_mtime: Ts { sec: 1, nsec: 0 },
    }
}

fn write(path: &str, at: u64, data: &[u8]) -> Op<'static> {
    Op::Write {
        path: path.as_bytes().to_vec(),
        offset: at,
        data: data.to_vec().into(),
        attr: attr(0o100644),
    }
}

fn batch(first: Lsn, ops: Vec<Op<'static>>) -> Batch {
    Batch {
        records: ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| Record {
                lsn: first + i as u64,
                time_ns: 100 + first as i64 + i as i64,
                op,
            })
            .collect(),
    }
}

#[test]
fn batches_apply_in_order_and_resends_are_skipped() {
    let mut r = Rig::new();
    assert_eq!(
        r.apply(&batch(1, vec![create("f"), write("f", 0, b"abc")]))
            .unwrap(),
        2
    );
    // A re-sent batch and one overlapping the applied position.
    assert_eq!(
        r.apply(&batch(1, vec![create("f"), write("f", 0, b"abc")]))
            .unwrap(),
        2
    );
    let b = batch(2, vec![write("f", 0, b"abc"), write("f", 3, b"de")]);
    assert_eq!(r.apply(&b).unwrap(), 3);
    assert_eq!(fs::read(r.dir.join("f")).unwrap(), b"abcde");
    let e = r.apply(&batch(5, vec![create("g")])).unwrap_err();
    assert!(
        matches!(
            e,
            BatchError::Gap {
                expected: 4,
                got: 5
            }
        ),
        "{e}"
    );
    let row = r.db.lock().volume("v").unwrap().unwrap();
    assert_eq!((row.applied_lsn, row.applied_time_ns), (3, 103));
    r.reopen();
    assert_eq!(r.vol.applied(), 3);
    assert!(
        fs::read_dir(&r.dir).unwrap().count() == 1,
        "no bookkeeping in DIR"
    );
}

#[test]
fn resync_records_are_stored_in_the_catalog() {
    let r = Rig::new();
    let op = Op::Resync {
        path: b"x/y".to_vec(),
        reason: "WAL full".into(),
    };
    assert_eq!(r.apply(&batch(1, vec![op])).unwrap(), 1);
    let rows = r.db.lock().resync_list("v").unwrap();
    assert_eq!((rows[0].path.as_slice(), rows[0].lsn), (&b"x/y"[..], 1));
}

#[test]
fn the_position_file_wins_when_ahead_of_the_catalog() {
    let mut r = Rig::new();
    r.apply(&batch(1, vec![create("f")])).unwrap();
    // A kill -9 inside a batch: records applied, file written, no catalog update.
    let (pf, _) = PositionFile::open(&r.state, "v").unwrap();
    pf.write(Position {
        applied: 7,
        time_ns: 9,
        ..Position::default()
    })
    .unwrap();
    r.reopen();
    assert_eq!(r.vol.applied(), 7, "written during this boot: trusted");
    assert_eq!(r.db.lock().in_doubt("v").unwrap(), 0);
}

/// The volume's applied LSN and the bound of the records in doubt.
fn applied_and_doubt(r: &Rig) -> (Lsn, Lsn) {
    (r.vol.applied(), r.db.lock().in_doubt("v").unwrap())
}

/// The position file as a run before the machine restarted left it.
fn position_from_another_boot(r: &Rig, applied: Lsn, exchange: Lsn) {
    let (pf, _) = PositionFile::open(&r.state, "v").unwrap();
    pf.write_as(Position {
        applied,
        time_ns: 0,
        exchange,
        boot: [0xab; 16],
    })
    .unwrap();
}

/// A rig whose LSNs 1..=3 made the files `a` ("A") and `b` (empty).
fn rig_with_a_and_b() -> Rig {
    let r = Rig::new();
    r.apply(&batch(
        1,
        vec![create("a"), create("b"), write("a", 0, b"A")],
    ))
    .unwrap();
    r
}

fn exchange(a: &str, b: &str) -> Op<'static> {
    Op::Rename {
        from: a.as_bytes().to_vec(),
        to: b.as_bytes().to_vec(),
        flags: libc::RENAME_EXCHANGE,
        from_parent_mtime: Ts::default(),
        to_parent_mtime: Ts::default(),
    }
}

fn repair_rows(r: &Rig) -> Vec<String> {
    let mut p: Vec<String> = (r.db.lock().resync_list("v").unwrap())
        .into_iter()
        .map(|row| String::from_utf8(row.path).unwrap())
        .collect();
    p.sort();
    p
}

#[test]
fn after_a_machine_crash_the_records_past_the_catalog_are_applied_again_in_doubt() {
    let mut r = rig_with_a_and_b();
    // The last run applied up to LSN 8, but only the catalog's LSN 3 is
    // known to be on disk: the file was written before the machine restarted.
    position_from_another_boot(&r, 8, 0);
    r.reopen();
    assert_eq!(r.vol.applied(), 3, "the catalog's durable position");
    assert_eq!(r.db.lock().in_doubt("v").unwrap(), 8);
    // The shipper resends from LSN 4. A write to a file that a later record
    // (already on disk) removed is outrun, not an error; the exchange may
    // have happened: it is not applied again.
    let b = batch(
        4,
        vec![
            create("c"),
            write("c", 0, b"C"),
            exchange("a", "b"),
            write("gone", 0, b"x"),
            create("d"),
        ],
    );
    assert_eq!(r.apply(&b).unwrap(), 8);
    assert_eq!(fs::read(r.dir.join("a")).unwrap(), b"A", "not swapped");
    assert_eq!(fs::read(r.dir.join("c")).unwrap(), b"C");
    assert!(r.dir.join("d").exists());
    // Every path they name is to be repaired from the source, and is handed
    // to the connection once for a REPAIRS message.
    assert_eq!(repair_rows(&r), ["a", "b", "c", "d", "gone"]);
    assert_eq!(r.vol.take_repairs().len(), 5);
    assert!(r.vol.take_repairs().is_empty());
    assert_eq!(r.db.lock().in_doubt("v").unwrap(), 0, "persisted past it");
    // Past the doubt a record that cannot apply is an error again.
    let e = r
        .apply(&batch(9, vec![write("gone", 0, b"x")]))
        .unwrap_err();
    assert!(matches!(e, BatchError::Apply(_)), "{e}");
}

#[test]
fn the_doubt_outlives_restarts_until_a_persist_passes_it() {
    let mut r = Rig::new();
    r.apply(&batch(1, vec![create("a")])).unwrap();
    position_from_another_boot(&r, 6, 7);
    r.reopen();
    assert_eq!(r.vol.applied(), 1);
    assert_eq!(
        r.db.lock().in_doubt("v").unwrap(),
        7,
        "the exchange being applied at the crash is in doubt too"
    );
    r.apply(&batch(2, vec![create("b"), write("b", 0, b"B")]))
        .unwrap();
    // A restart of the process now (same boot) and one after another
    // machine crash both keep the bound.
    r.reopen();
    assert_eq!(applied_and_doubt(&r), (3, 7));
    position_from_another_boot(&r, 4, 0);
    r.reopen();
    assert_eq!(applied_and_doubt(&r), (3, 7));
    let b = batch(
        4,
        vec![
            write("gone", 0, b"x"),
            create("c"),
            exchange("a", "c"),
            write("a", 0, b"A"),
        ],
    );
    assert_eq!(r.apply(&b).unwrap(), 7);
    assert!(repair_rows(&r).contains(&"gone".to_string()));
    assert_eq!(r.db.lock().in_doubt("v").unwrap(), 0);
    // A stale file from another boot that is not ahead of the catalog puts
    // nothing in doubt.
    position_from_another_boot(&r, 7, 0);
    r.reopen();
    assert_eq!(applied_and_doubt(&r), (7, 0));
}

#[test]
fn a_baseline_voids_the_doubt() {
    let mut r = Rig::new();
    r.apply(&batch(1, vec![create("a")])).unwrap();
    position_from_another_boot(&r, 5, 0);
    r.reopen();
    let alive = volume::test_liveness();
    let cx = r.cx(&alive);
    r.vol.sync_begin(100, "src", &cx).unwrap();
    assert_eq!(r.db.lock().in_doubt("v").unwrap(), 0);
    // LSN 101 of the new source is not in doubt: applied strictly.
    let e = r
        .apply(&batch(101, vec![write("gone", 0, b"x")]))
        .unwrap_err();
    assert!(matches!(e, BatchError::Apply(_)), "{e}");
    assert!(repair_rows(&r).is_empty());
}

#[test]
fn an_exchange_in_doubt_is_not_reapplied_but_recorded() {
    let mut r = rig_with_a_and_b();
    let (pf, _) = PositionFile::open(&r.state, "v").unwrap();
    pf.write(Position {
        applied: 3,
        time_ns: 0,
        exchange: 4,
        ..Position::default()
    })
    .unwrap();
    r.reopen();
    let xchg = exchange("a", "b");
    assert_eq!(r.apply(&batch(4, vec![xchg.clone()])).unwrap(), 4);
    assert_eq!(fs::read(r.dir.join("a")).unwrap(), b"A", "not swapped");
    assert_eq!(r.db.lock().resync_list("v").unwrap().len(), 2);
    // The next exchange is applied normally.
    assert_eq!(r.apply(&batch(5, vec![xchg])).unwrap(), 5);
    assert_eq!(fs::read(r.dir.join("b")).unwrap(), b"A");
}

#[test]
fn a_stop_request_ends_the_batch_between_records_and_persists() {
    let r = Rig::new();
    r.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = r.apply(&batch(1, vec![create("f")])).unwrap_err();
    assert!(matches!(e, BatchError::Stopped(0)), "{e}");
}

#[test]
fn a_hostile_record_stops_the_batch_after_persisting_the_good_ones() {
    let r = Rig::new();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), r.dir.join("link")).unwrap();
    let b = batch(1, vec![create("ok"), create("link/evil")]);
    let e = r.apply(&b).unwrap_err();
    assert!(matches!(e, BatchError::Apply(_)), "{e}");
    assert_eq!(r.vol.applied(), 1);
    assert_eq!(r.db.lock().volume("v").unwrap().unwrap().applied_lsn, 1);
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

fn pair() -> (TcpStream, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, peer) = l.accept().unwrap();
    drop(c);
    (s, peer)
}

#[test]
fn one_shipper_per_volume_unless_the_owner_went_silent() {
    let r = Rig::new();
    let (s1, p1) = pair();
    let (s2, p2) = pair();
    let first = r.vol.claim(1, p1, &s1, Duration::from_secs(30)).unwrap();
    let busy = r
        .vol
        .claim(2, p2, &s2, Duration::from_secs(30))
        .err()
        .unwrap();
    assert!(busy.contains("busy"), "{busy}");
    // With a zero takeover delay the silent owner is replaced and told to stop.
    let second = r.vol.claim(2, p2, &s2, Duration::ZERO).unwrap();
    assert!(first.alive.stop.load(std::sync::atomic::Ordering::SeqCst));
    drop(first); // the old owner leaving does not free the new owner's claim
    assert!(r.vol.claim(3, p1, &s1, Duration::from_secs(30)).is_err());
    drop(second);
    assert!(r.vol.claim(3, p1, &s1, Duration::from_secs(30)).is_ok());
}

#[test]
fn applying_moves_the_catalog_only_when_a_persist_covers_it() {
    let r = Rig::new();
    let alive = volume::test_liveness();
    let cx = r.cx(&alive);
    let catalog = || {
        r.db.lock()
            .volume("v")
            .unwrap()
            .map_or(0, |v| v.applied_lsn)
    };
    let (reached, res) = r
        .vol
        .apply_records(&batch(1, vec![create("a"), create("b")]), &cx);
    res.unwrap();
    assert_eq!(reached.lsn, 2);
    assert_eq!(
        catalog(),
        0,
        "applied, not yet durable: no position recorded"
    );
    let (later, res) = r.vol.apply_records(&batch(3, vec![create("c")]), &cx);
    res.unwrap();
    // A persist records what was applied before it started, not more.
    r.vol.persist_upto(reached, &cx).unwrap();
    assert_eq!(catalog(), 2);
    r.vol.persist_upto(later, &cx).unwrap();
    assert_eq!(catalog(), 3);
    // A re-sent batch is skipped and reports the applied position.
    let (again, res) = r.vol.apply_records(&batch(1, vec![create("a")]), &cx);
    res.unwrap();
    assert_eq!(again.lsn, 3);
    // A batch past a gap applies nothing.
    let (gap, res) = r.vol.apply_records(&batch(9, vec![create("z")]), &cx);
    assert!(matches!(
        res,
        Err(BatchError::Gap {
            expected: 4,
            got: 9
        })
    ));
    assert_eq!(gap.lsn, 3);
    // A connection that lost the volume to a takeover no longer writes the
    // catalog (its successor persists what it applied).
    let (more, res) = r.vol.apply_records(&batch(4, vec![create("d")]), &cx);
    res.unwrap();
    alive.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        r.vol.persist_upto(more, &cx),
        Err(BatchError::Stopped(4))
    ));
    assert_eq!(catalog(), 3);
    assert!(r.dir.join("d").exists());
    // ... and the successor's READY, which the shipper takes as acknowledged,
    // reports it only once it is durable.
    let ready = r.vol.ready_durable(&r.db).unwrap();
    assert_eq!((ready.applied, catalog()), (4, 4));
}

#[test]
fn records_in_doubt_whose_paths_cannot_be_recorded_are_applied_again() {
    let mut r = rig_with_a_and_b();
    position_from_another_boot(&r, 5, 0);
    r.reopen();
    // The catalog refuses the repair rows (here: their table is away).
    let raw = rusqlite::Connection::open(r.state.join(state::MIRROR_DB)).unwrap();
    raw.execute_batch("ALTER TABLE resync RENAME TO resync_away")
        .unwrap();
    let b = batch(4, vec![create("c"), create("d")]);
    let e = r.apply(&b).unwrap_err();
    assert!(matches!(e, BatchError::Persist(_)), "{e}");
    assert_eq!(r.vol.applied(), 3, "back to before the records in doubt");
    // The position file did not move past them either: a restart (same
    // boot) applies them again, and records their paths this time.
    r.reopen();
    assert_eq!(r.vol.applied(), 3);
    raw.execute_batch("ALTER TABLE resync_away RENAME TO resync")
        .unwrap();
    assert_eq!(r.apply(&b).unwrap(), 5);
    assert_eq!(repair_rows(&r), ["c", "d"]);
}
