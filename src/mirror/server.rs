//! The mirror's network side: the accept loop, and one thread per
//! connection that authenticates a shipper and applies its batches.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info, warn};
use parking_lot::Mutex;

use super::acks::Acks;
use super::state::MirrorDb;
use super::volume::{BatchError, Ctx, Volume};
use crate::proto::{self, Key, Msg, ProtoError, Role};
use crate::wal::Lsn;

/// Timeouts and limits of the server (see `MirrorOptions`).
#[derive(Clone, Debug)]
pub(super) struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub takeover_after: Duration,
}

/// Everything the connection threads share.
pub(super) struct Shared {
    pub limits: Limits,
    pub volumes: HashMap<String, Arc<Volume>>,
    pub keys: HashMap<String, Key>,
    pub db: Mutex<MirrorDb>,
    pub stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    active: AtomicUsize,
    next_id: AtomicU64,
    /// Held for the life of the server: one mirror per state dir.
    _lock: std::fs::File,
}

impl Shared {
    pub fn new(
        limits: Limits,
        volumes: HashMap<String, Arc<Volume>>,
        keys: HashMap<String, Key>,
        db: MirrorDb,
        lock: std::fs::File,
    ) -> Shared {
        Shared {
            limits,
            volumes,
            keys,
            db: Mutex::new(db),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            _lock: lock,
        }
    }

    /// Wakes every connection thread blocked on a read: each then finishes
    /// or stops its batch, persists, and exits.
    pub fn close_all(&self) {
        for s in self.conns.lock().values() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

/// Accepts until `shared.stop`, then closes the connections and joins them.
pub(super) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        if !wait_readable(&listener, 200) {
            continue;
        }
        match listener.accept() {
            Ok((s, peer)) => {
                if let Some(h) = start_conn(&shared, s, peer) {
                    workers.push(h);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        workers.retain(|h| !h.is_finished());
    }
    shared.close_all();
    for h in workers {
        let _ = h.join();
    }
}

/// `poll` for an incoming connection, at most `ms` milliseconds.
fn wait_readable(l: &TcpListener, ms: i32) -> bool {
    wait_readable_fd(l.as_raw_fd(), ms)
}

/// `poll` a descriptor for input, at most `ms` milliseconds.
fn wait_readable_fd(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn start_conn(shared: &Arc<Shared>, s: TcpStream, peer: SocketAddr) -> Option<JoinHandle<()>> {
    let _ = s.set_nonblocking(false);
    let _ = s.set_write_timeout(Some(shared.limits.write_timeout));
    if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.limits.max_connections {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        warn!(
            "peer {peer}: refused, already {} connections",
            shared.limits.max_connections
        );
        send_error(&s, "too many connections");
        return None;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    if let Ok(c) = s.try_clone() {
        shared.conns.lock().insert(id, c);
    }
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("mirror-conn-{id}"))
        .spawn(move || {
            serve(&sh, s, peer, id);
            sh.conns.lock().remove(&id);
            sh.active.fetch_sub(1, Ordering::SeqCst);
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            warn!("peer {peer}: cannot start a connection thread: {e}");
            shared.conns.lock().remove(&id);
            shared.active.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }
}

fn send_error(mut s: &TcpStream, msg: &str) {
    let _ = proto::write_msg(&mut s, &Msg::Error { msg: msg.into() });
}

/// One connection: handshake, claim the volume, then batches until closed.
fn serve(shared: &Shared, mut s: TcpStream, peer: SocketAddr, id: u64) {
    debug!("peer {peer}: connected (connection {id})");
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(shared.limits.handshake_timeout));
    let key_for = |v: &str| shared.keys.get(v).cloned();
    let (vol_id, role) = match proto::server_handshake(&mut s, &key_for) {
        Ok(v) => v,
        Err(e) => {
            warn!("peer {peer}: handshake refused: {e}");
            return;
        }
    };
    let Some(vol) = shared.volumes.get(&vol_id) else {
        send_error(&s, "authentication failed");
        return;
    };
    if shared.stop.load(Ordering::SeqCst) {
        send_error(&s, "mirror shutting down");
        return;
    }
    if role == Role::Verifier {
        info!("peer {peer} volume {vol_id}: verifier authenticated");
        if proto::write_msg(&mut &s, &Msg::Ready(vol.ready())).is_ok() {
            let _ = s.set_read_timeout(Some(shared.limits.idle_timeout));
            verifier_session(vol, &s, peer, &shared.stop);
        }
        return;
    }
    let claim = match vol.claim(id, peer, &s, shared.limits.takeover_after) {
        Ok(c) => c,
        Err(why) => {
            warn!("peer {peer} volume {vol_id}: refused: {why}");
            send_error(&s, "volume busy");
            return;
        }
    };
    let ready = match vol.ready_durable(&shared.db) {
        Ok(r) => r,
        Err(e) => {
            warn!("peer {peer} volume {vol_id}: persisting the applied position: {e:#}");
            send_error(&s, "mirror cannot persist its position");
            return;
        }
    };
    if let Err(e) = shared.db.lock().set_peer(&vol_id, &peer.to_string()) {
        warn!("peer {peer} volume {vol_id}: recording the peer: {e:#}");
    }
    info!(
        "peer {peer} volume {vol_id}: authenticated; applied LSN {} (source {:?})",
        ready.applied, ready.source
    );
    if let Err(e) = proto::write_msg(&mut &s, &Msg::Ready(ready)) {
        warn!("peer {peer} volume {vol_id}: cannot send Ready: {e}");
        return;
    }
    // What this copy knows it may hold wrong, for the shipper to repair;
    // dropped here once a sync of this connection has ended.
    let (paths, repairs_upto) = match shared.db.lock().resync_paths(&vol_id) {
        Ok(r) => r,
        Err(e) => {
            warn!("peer {peer} volume {vol_id}: reading the repair requests: {e:#}");
            (Vec::new(), None)
        }
    };
    let paths = repairs_for_the_wire(paths);
    if !paths.is_empty() {
        info!(
            "peer {peer} volume {vol_id}: asking for the repair of {} path(s)",
            paths.len()
        );
    }
    if let Err(e) = proto::write_msg(&mut &s, &Msg::Repairs { paths }) {
        warn!("peer {peer} volume {vol_id}: cannot send Repairs: {e}");
        return;
    }
    let _ = s.set_read_timeout(Some(shared.limits.idle_timeout));
    let cx = Ctx {
        peer,
        db: &shared.db,
        alive: &claim.alive,
        shutdown: &shared.stop,
    };
    session(vol, &s, &cx, repairs_upto);
}

/// The repair requests as sent: at most `MAX_REPAIRS` paths, else the whole tree.
fn repairs_for_the_wire(paths: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let paths = crate::sync::collapse(paths);
    if paths.len() > crate::proto::MAX_REPAIRS {
        vec![Vec::new()]
    } else {
        paths
    }
}

/// An authenticated connection: its message loop, and a persister thread
/// that makes applied batches durable and acknowledges them (group commit,
/// see `acks`); `repairs_upto` is the last resync row sent in REPAIRS
/// (cleared once a sync has ended).
fn session(vol: &Volume, s: &TcpStream, cx: &Ctx<'_>, repairs_upto: Option<i64>) {
    let send = Mutex::new(());
    let acks = Acks::new(vol, s, &send);
    std::thread::scope(|sc| {
        let persister = std::thread::Builder::new()
            .name("mirror-persist".into())
            .spawn_scoped(sc, || acks.run(cx));
        if let Err(e) = persister {
            warn!(
                "peer {} volume {}: cannot start a persister thread: {e}",
                cx.peer, vol.id
            );
            send_error(s, "mirror out of resources");
            return;
        }
        messages(vol, s, cx, repairs_upto, &acks);
        // Whatever is still queued was persisted (or failed) on the way out.
        let _ = acks.close();
    });
}

/// The message loop of [`session`].
fn messages(
    vol: &Volume,
    s: &TcpStream,
    cx: &Ctx<'_>,
    mut repairs_upto: Option<i64>,
    acks: &Acks<'_>,
) {
    let (peer, v) = (cx.peer, &vol.id);
    let mut rd = BufReader::with_capacity(256 << 10, s);
    let mut buf = Vec::new();
    loop {
        let ty = proto::read_frame_buf(&mut rd, &mut buf);
        let msg = match ty {
            Ok(t) if t == proto::frame_type::BATCH => {
                // Applied straight from the frame (write data not copied).
                match proto::batch_section(&buf).and_then(|sec| {
                    cx.alive.touch();
                    let recs = sec.records()?;
                    Ok(apply_batch_frame(
                        vol,
                        s,
                        cx,
                        acks,
                        &recs,
                        rd.buffer().is_empty(),
                    ))
                }) {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        let _ = acks.flush();
                        return read_failed(vol, s, cx, e);
                    }
                }
            }
            Ok(t) => proto::decode_msg(t, &buf),
            Err(e) => Err(e),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                // Batches already applied are persisted and acknowledged
                // first (a shutdown, a shipper that hung up).
                if let Err(why) = acks.flush() {
                    return persist_failed(vol, s, cx, &why);
                }
                return read_failed(vol, s, cx, e);
            }
        };
        cx.alive.touch();
        if !matches!(msg, Msg::Ping | Msg::Pong) {
            // Every other message is answered after the ACKs of the batches
            // before it.
            if let Err(why) = acks.flush() {
                return persist_failed(vol, s, cx, &why);
            }
        }
        let reply = match msg {
            Msg::Batch(_) => continue, // read above, as a frame
            Msg::Ping => Msg::Pong,
            Msg::Pong => continue,
            Msg::Error { msg } => {
                info!("peer {peer} volume {v}: shipper closed the connection: {msg}");
                return;
            }
            Msg::SyncBegin { lsn, source } => match vol.sync_begin(lsn, &source, cx) {
                Ok(lsn) => Msg::Ack { lsn },
                Err(e) => return sync_failed(vol, s, cx, e),
            },
            Msg::SyncOps(b) => match vol.apply_sync(&b, cx) {
                Ok(()) => continue,
                Err(e) => return sync_failed(vol, s, cx, e),
            },
            Msg::SyncEnd { token, horizon } => match vol.sync_end(horizon, cx) {
                Ok(()) => {
                    info!(
                        "peer {peer} volume {v}: sync {token} persisted (applied LSN {}, horizon LSN {horizon})",
                        vol.applied()
                    );
                    if let Some(id) = repairs_upto.take() {
                        if let Err(e) = cx.db.lock().clear_resync(v, id) {
                            warn!("volume {v}: {e:#}");
                        }
                    }
                    Msg::SyncDone { token }
                }
                Err(e) => return sync_failed(vol, s, cx, e),
            },
            Msg::ManifestReq { path, hashes } => {
                if let Err(e) = send_manifest(vol, s, &path, hashes, true) {
                    warn!("peer {peer} volume {v}: listing failed: {e:#}");
                    send_error(s, &format!("cannot list the replica: {e:#}"));
                    return;
                }
                continue;
            }
            Msg::SumsReq { path, block } => match vol.sums(&path, block) {
                Ok(m) => m,
                Err(e) => {
                    warn!("peer {peer} volume {v}: checksums failed: {e:#}");
                    send_error(s, &format!("cannot read the replica: {e:#}"));
                    return;
                }
            },
            other @ (Msg::Ack { .. }
            | Msg::Ready { .. }
            | Msg::Manifest { .. }
            | Msg::Sums { .. }
            | Msg::SyncDone { .. }
            | Msg::Repairs { .. }) => {
                warn!(
                    "peer {peer} volume {v}: protocol error: {} from a shipper; closing",
                    other.name()
                );
                send_error(s, &format!("unexpected {} message", other.name()));
                return;
            }
        };
        let sent = {
            let _g = acks.send.lock();
            proto::write_msg(&mut &*s, &reply)
        };
        if let Err(e) = sent {
            warn!("peer {peer} volume {v}: cannot send {}: {e}", reply.name());
            return;
        }
    }
}

/// Applies a received batch and queues its ACK; false: the connection
/// ends (the error was sent). `buffered_empty`: nothing more is buffered.
fn apply_batch_frame(
    vol: &Volume,
    s: &TcpStream,
    cx: &Ctx<'_>,
    acks: &Acks<'_>,
    recs: &[proto::RecordRef<'_>],
    buffered_empty: bool,
) -> bool {
    let (reached, result) = vol.apply_refs(recs, cx);
    // Records applied again in doubt (after a machine crash): the paths
    // they name go to the shipper now, ahead of the batch's ACK; the
    // catalog keeps them for the next connection's REPAIRS as well.
    let repairs = vol.take_repairs();
    if !repairs.is_empty() {
        let paths = repairs_for_the_wire(repairs);
        info!(
            "peer {} volume {}: asking for the repair of {} path(s) in doubt",
            cx.peer,
            vol.id,
            paths.len()
        );
        let sent = {
            let _g = acks.send.lock();
            proto::write_msg(&mut &*s, &Msg::Repairs { paths })
        };
        if let Err(e) = sent {
            warn!(
                "peer {} volume {}: cannot send Repairs: {e}",
                cx.peer, vol.id
            );
        }
    }
    let ack = result.is_ok().then_some(reached.lsn);
    let bytes = recs.iter().map(|r| r.op.data_len() + 64).sum();
    let more = !buffered_empty || wait_readable_fd(s.as_raw_fd(), 0);
    match (result, acks.push(reached, ack, bytes, more)) {
        (Ok(()), Ok(())) => {
            debug!(
                "peer {} volume {}: batch of {} records applied, ack LSN {} queued",
                cx.peer,
                vol.id,
                recs.len(),
                reached.lsn
            );
            true
        }
        (Ok(()), Err(why)) => {
            persist_failed(vol, s, cx, &why);
            false
        }
        (Err(e), _) => {
            // The records before the failure stay applied: persisted (no
            // ACK) before the ERROR.
            let _ = acks.flush();
            let first = recs.first().map_or(0, |r| r.lsn);
            let last = recs.last().map_or(0, |r| r.lsn);
            batch_failed(vol, s, cx, (first, last), e);
            false
        }
    }
}

/// The persister could not make applied batches durable (or the volume was
/// taken over): the connection ends without their ACKs.
fn persist_failed(vol: &Volume, s: &TcpStream, cx: &Ctx<'_>, why: &str) {
    warn!(
        "peer {} volume {}: cannot persist the position: {why}; closing",
        cx.peer, vol.id
    );
    send_error(s, why);
}

fn send_manifest(
    vol: &Volume,
    s: &TcpStream,
    path: &[u8],
    hashes: bool,
    shipper: bool,
) -> anyhow::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(256 << 10, s);
    vol.manifest(path, hashes, shipper, &mut |m| {
        proto::write_msg(&mut w, &m)?;
        Ok(())
    })?;
    use std::io::Write;
    w.flush()?;
    Ok(())
}

fn sync_failed(vol: &Volume, s: &TcpStream, cx: &Ctx<'_>, e: BatchError) {
    warn!("peer {} volume {}: sync failed: {e}", cx.peer, vol.id);
    let msg = match &e {
        BatchError::Stopped(_) => "mirror shutting down".to_string(),
        other => format!("sync: {other}"),
    };
    send_error(s, &msg);
}

/// A read-only connection: listings and checksums, no claim on the volume.
fn verifier_session(vol: &Volume, s: &TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let v = &vol.id;
    let mut rd = BufReader::with_capacity(64 << 10, s);
    while !stop.load(Ordering::SeqCst) {
        let reply = match proto::read_msg(&mut rd) {
            Ok(Msg::Ping) => Msg::Pong,
            Ok(Msg::ManifestReq { path, hashes }) => {
                if let Err(e) = send_manifest(vol, s, &path, hashes, false) {
                    warn!("peer {peer} volume {v}: verifier listing failed: {e:#}");
                    send_error(s, &format!("cannot list the replica: {e:#}"));
                    return;
                }
                continue;
            }
            Ok(Msg::SumsReq { path, block }) => match vol.sums(&path, block) {
                Ok(m) => m,
                Err(e) => {
                    send_error(s, &format!("cannot read the replica: {e:#}"));
                    return;
                }
            },
            Ok(Msg::Error { .. }) | Err(ProtoError::Closed) => return,
            Ok(other) => {
                warn!(
                    "peer {peer} volume {v}: {} from a verifier; closing",
                    other.name()
                );
                send_error(
                    s,
                    &format!("unexpected {} message from a verifier", other.name()),
                );
                return;
            }
            Err(e) => {
                debug!("peer {peer} volume {v}: verifier connection ended: {e}");
                return;
            }
        };
        if proto::write_msg(&mut &*s, &reply).is_err() {
            return;
        }
    }
}

fn read_failed(vol: &Volume, s: &TcpStream, cx: &Ctx<'_>, e: ProtoError) {
    let (peer, v) = (cx.peer, &vol.id);
    let applied = vol.applied();
    match e {
        ProtoError::Closed if cx.shutdown.load(Ordering::SeqCst) => {
            info!("peer {peer} volume {v}: closed for shutdown at applied LSN {applied}");
            send_error(s, "mirror shutting down");
        }
        ProtoError::Closed => {
            info!("peer {peer} volume {v}: disconnected at applied LSN {applied}")
        }
        e if e.is_timeout() => {
            warn!(
                "peer {peer} volume {v}: no frame for {} s; closing (applied LSN {applied})",
                idle_secs(s)
            );
            send_error(s, "idle timeout");
        }
        ProtoError::Io(e) => {
            warn!("peer {peer} volume {v}: connection lost at applied LSN {applied}: {e}")
        }
        e => {
            warn!("peer {peer} volume {v}: bad frame after applied LSN {applied}: {e}; closing");
            send_error(s, &format!("bad frame: {e}"));
        }
    }
}

fn idle_secs(s: &TcpStream) -> u64 {
    s.read_timeout().ok().flatten().map_or(0, |d| d.as_secs())
}

fn batch_failed(vol: &Volume, s: &TcpStream, cx: &Ctx<'_>, lsns: (Lsn, Lsn), e: BatchError) {
    let (peer, v) = (cx.peer, &vol.id);
    let (first, last) = lsns;
    match &e {
        BatchError::Stopped(lsn) => {
            info!("peer {peer} volume {v}: batch LSN {first}..{last} stopped at applied LSN {lsn}")
        }
        BatchError::Gap { .. } => warn!("peer {peer} volume {v}: refused batch: {e}"),
        BatchError::Apply(a) if a.raw_os_error().is_some() => {
            warn!("peer {peer} volume {v}: apply failed (mirror-side OS error): {e}")
        }
        BatchError::Apply(_) => warn!(
            "peer {peer} volume {v}: REFUSED record in batch LSN {first}..{last}: {e}; closing"
        ),
        BatchError::Persist(_) => {
            warn!("peer {peer} volume {v}: cannot persist the position: {e}")
        }
    }
    let msg = match &e {
        BatchError::Stopped(_) => "mirror shutting down".to_string(),
        other => other.to_string(),
    };
    send_error(s, &msg);
}
