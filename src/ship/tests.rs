//! Tests of the shipper's stream against a fake mirror on 127.0.0.1 that
//! speaks the protocol and acknowledges only when the test says so.

use std::borrow::Cow;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::*;
use crate::config::{Durability, WalConfig};
use crate::proto::{ReadyInfo, server_handshake};
use crate::wal::Attr;

const KEY: [u8; 32] = [7; 32];

/// A mirror that completes the handshake (READY at LSN 0 for this source,
/// no repairs), reports every BATCH it reads and sends the ACKs it is given.
struct FakeMirror {
    addr: String,
    /// (when it was read, first LSN, last LSN) of each batch.
    batches: Receiver<(Instant, Lsn, Lsn)>,
    acks: Sender<Lsn>,
}

impl FakeMirror {
    fn start(source: String) -> FakeMirror {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (btx, batches) = crossbeam_channel::unbounded();
        let (acks, arx) = crossbeam_channel::unbounded::<Lsn>();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            server_handshake(&mut s, &|_| Some(Key::from_bytes(&KEY))).unwrap();
            let ready = ReadyInfo { applied: 0, source };
            proto::write_msg(&mut s, &Msg::Ready(ready)).unwrap();
            proto::write_msg(&mut s, &Msg::Repairs { paths: Vec::new() }).unwrap();
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || {
                for lsn in arx {
                    if proto::write_msg(&mut w, &Msg::Ack { lsn }).is_err() {
                        return;
                    }
                }
            });
            let mut r = std::io::BufReader::new(s);
            loop {
                match proto::read_msg(&mut r) {
                    Ok(Msg::Batch(b)) => {
                        let (first, last) = (b.records[0].lsn, b.last_lsn().unwrap());
                        if btx.send((Instant::now(), first, last)).is_err() {
                            return;
                        }
                    }
                    // PING (keepalive, 15 s): not answered, the tests are shorter.
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        FakeMirror {
            addr,
            batches,
            acks,
        }
    }

    /// The next batch (fails the test after 10 s).
    fn batch(&self) -> (Instant, Lsn, Lsn) {
        self.batches
            .recv_timeout(Duration::from_secs(10))
            .expect("a batch within 10 s")
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    wal: Wal,
    mirror: FakeMirror,
    shipper: Option<Shipper>,
    next: u64,
}

impl Setup {
    fn new(cfg: ShipConfig) -> Setup {
        Setup::with_durability(cfg, Durability::Batch)
    }

    fn with_durability(cfg: ShipConfig, durability: Durability) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let wcfg = WalConfig {
            durability,
            segment_size: 4 << 20,
            ..WalConfig::default()
        };
        let (wal, _) = Wal::open(dir.path(), &wcfg).unwrap();
        let source = Catalog::open(dir.path()).unwrap().source_id().unwrap();
        let mirror = FakeMirror::start(source);
        let args = ShipArgs {
            state: dir.path().to_path_buf(),
            target: Target {
                addr: mirror.addr.clone(),
                volume: "default".into(),
                key: Arc::new(Key::from_bytes(&KEY)),
            },
            cfg,
            throttle: Arc::new(Throttle::with_system_clock(&Default::default())),
            backing: None,
            excludes: Excludes::new(&[]).unwrap(),
        };
        let shipper = Shipper::start(wal.clone(), args);
        Setup {
            _dir: dir,
            wal,
            mirror,
            shipper: Some(shipper),
            next: 0,
        }
    }

    /// Appends a record and makes it durable (as an fsync through the mount
    /// would); returns its LSN and when it became durable.
    fn durable_record(&mut self) -> (Lsn, Instant) {
        let lsn = self.record();
        self.wal.sync(lsn).unwrap();
        (lsn, Instant::now())
    }

    /// Appends a record (nothing syncs it but the WAL's own policy).
    fn record(&mut self) -> Lsn {
        self.next += 1;
        let op = Op::Write {
            path: b"f".to_vec(),
            offset: self.next * 100,
            data: Cow::Owned(vec![self.next as u8; 100]),
            attr: Attr::default(),
        };
        self.wal.append(&op).unwrap()
    }

    fn acked(&self) -> Lsn {
        let s = self.shipper.as_ref().unwrap();
        s.stats.acked_lsn.load(Ordering::Acquire)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(s) = self.shipper.take() {
            s.stop();
        }
    }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// While batches wait for their ACK (a mirror's group commit, one syncfs,
/// can take long), records that become durable are shipped at once, not
/// when the next ACK comes or the shipper's wait for one times out.
#[test]
fn a_live_stream_refills_the_window_while_acks_are_held_back() {
    let mut t = Setup::new(ShipConfig::default());
    let (first, _) = t.durable_record();
    let (_, _, last) = t.mirror.batch();
    assert_eq!(last, first);
    let mut delays = Vec::new();
    for _ in 0..9 {
        let (lsn, durable_at) = t.durable_record();
        let (got, from, last) = t.mirror.batch();
        assert_eq!((from, last), (lsn, lsn), "one batch per durable record");
        delays.push(got.saturating_duration_since(durable_at));
    }
    assert_eq!(t.acked(), 0, "nothing was acknowledged meanwhile");
    delays.sort();
    let median = delays[delays.len() / 2];
    // Before the fix each of these waited for the ack timeout (200 ms).
    assert!(
        median < IN_FLIGHT_WAIT / 2,
        "durable records wait for an ack: delays {delays:?}"
    );
    // Acks still retire what is in flight, in order.
    t.mirror.acks.send(5).unwrap();
    wait_for("ack 5", || t.acked() == 5);
    t.mirror.acks.send(t.next).unwrap();
    wait_for("the last ack", || t.acked() == t.next);
}

/// With `durability = "os"` nothing syncs the WAL on its own: an idle
/// shipper has the records it waits for synced, so they ship all the same.
#[test]
fn records_that_nobody_syncs_are_synced_and_shipped() {
    let mut t = Setup::with_durability(ShipConfig::default(), Durability::Os);
    for _ in 0..3 {
        let lsn = t.record();
        let (_, _, last) = t.mirror.batch();
        assert_eq!(last, lsn);
        assert!(
            t.wal.durable_lsn() >= lsn,
            "only durable records are shipped"
        );
        t.mirror.acks.send(lsn).unwrap();
        wait_for("the ack", || t.acked() == lsn);
    }
}

/// A full window waits for an ACK, however many records become durable.
#[test]
fn a_full_window_waits_for_an_ack() {
    let cfg = ShipConfig {
        window: 2,
        ..ShipConfig::default()
    };
    let mut t = Setup::new(cfg);
    for i in 1..=2 {
        let (lsn, _) = t.durable_record();
        assert_eq!(lsn, i);
        let (_, _, last) = t.mirror.batch();
        assert_eq!(last, lsn);
    }
    let (l3, _) = t.durable_record();
    let (l4, _) = t.durable_record();
    assert!(
        t.mirror
            .batches
            .recv_timeout(Duration::from_millis(400))
            .is_err(),
        "a third batch with two unacknowledged ones in flight"
    );
    t.mirror.acks.send(1).unwrap();
    let (_, from, last) = t.mirror.batch();
    assert_eq!(
        (from, last),
        (l3, l4),
        "the records that waited, in one batch"
    );
    t.mirror.acks.send(l4).unwrap();
    wait_for("the last ack", || t.acked() == l4);
}
