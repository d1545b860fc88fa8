//! Group commit on the mirror: a connection's batches are applied by its
//! thread, and a second thread makes them durable and acknowledges them.
//!
//! The connection thread applies a batch and queues its ACK; the persister
//! takes everything queued, runs one `syncfs` of the replica's filesystem
//! and one catalog update for the last position applied before it started
//! (see [`Volume::persist_upto`]), then sends the ACKs it covered — one per
//! BATCH, in order. Meanwhile the connection thread reads and applies the
//! next batches, so the disk writes back one group while the next is being
//! applied, and a shipper keeping several batches in flight (its window)
//! pays one flush per group instead of one per batch. An ACK is never sent
//! before the syncfs that covers its records has returned.
//!
//! The queue is bounded ([`MAX_QUEUED`]): a peer that sends batches without
//! reading its ACKs is held up, not buffered for.

use std::collections::VecDeque;
use std::net::TcpStream;

use parking_lot::{Condvar, Mutex};

use super::volume::{Applied, BatchError, Ctx, Volume};
use crate::proto::{self, Msg};
use crate::wal::Lsn;

/// Most batches waiting for a persist (beyond, the connection thread waits).
const MAX_QUEUED: usize = 4096;
/// While more batches are already arriving, the persister lets the group
/// grow (a syncfs per batch costs a journal commit each) until this many
/// batch bytes are queued or the oldest has waited [`GROUP_WAIT`]. An idle
/// link is never held up: when nothing more has arrived, what is queued is
/// persisted at once.
const GROUP_BYTES: u64 = 8 << 20;
const GROUP_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Something the persister must make durable; `ack`: the ACK to send after.
#[derive(Clone, Copy, Debug)]
struct Pending {
    upto: Applied,
    ack: Option<Lsn>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    /// Batch bytes in `queue`, and when its oldest entry was queued.
    queued_bytes: u64,
    oldest: Option<std::time::Instant>,
    /// More input had arrived when the last batch was queued.
    more: bool,
    /// The persister holds entries taken from the queue.
    busy: bool,
    closed: bool,
    /// Why the persister stopped (the connection is then closed).
    failed: Option<String>,
}

/// Shared by a connection thread and its persister.
pub(super) struct Acks<'a> {
    vol: &'a Volume,
    sock: &'a TcpStream,
    /// Held while a frame is written, by either thread.
    pub send: &'a Mutex<()>,
    state: Mutex<State>,
    cv: Condvar,
}

impl<'a> Acks<'a> {
    pub fn new(vol: &'a Volume, sock: &'a TcpStream, send: &'a Mutex<()>) -> Acks<'a> {
        Acks {
            vol,
            sock,
            send,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    /// Queues `upto` (applied) for a persist and, if `ack`, the ACK of the
    /// batch of `bytes` that ended there; `more`: the next input has already
    /// arrived (see [`GROUP_BYTES`]). Err: the persister failed (its reason).
    pub fn push(
        &self,
        upto: Applied,
        ack: Option<Lsn>,
        bytes: u64,
        more: bool,
    ) -> Result<(), String> {
        let mut st = self.state.lock();
        st.more = more;
        while st.queue.len() >= MAX_QUEUED && st.failed.is_none() {
            self.cv.wait(&mut st);
        }
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        st.queue.push_back(Pending { upto, ack });
        st.queued_bytes += bytes;
        st.oldest.get_or_insert_with(std::time::Instant::now);
        self.cv.notify_all();
        Ok(())
    }

    /// Waits until everything queued is persisted and acknowledged.
    pub fn flush(&self) -> Result<(), String> {
        let mut st = self.state.lock();
        st.more = false;
        self.cv.notify_all();
        while (st.busy || !st.queue.is_empty()) && st.failed.is_none() {
            self.cv.wait(&mut st);
        }
        st.failed.clone().map_or(Ok(()), Err)
    }

    /// Flushes, then ends the persister.
    pub fn close(&self) -> Result<(), String> {
        let r = self.flush();
        let mut st = self.state.lock();
        st.closed = true;
        self.cv.notify_all();
        r
    }

    /// The persister's loop (run it in a scoped thread; it returns after
    /// [`Acks::close`] or a failure).
    pub fn run(&self, cx: &Ctx<'_>) {
        loop {
            let taken: Vec<Pending> = {
                let mut st = self.state.lock();
                loop {
                    if st.failed.is_some() || (st.queue.is_empty() && st.closed) {
                        return;
                    }
                    if st.queue.is_empty() {
                        self.cv.wait(&mut st);
                        continue;
                    }
                    // More is on its way: let the group grow a little.
                    let until = st.oldest.map(|t| t + GROUP_WAIT);
                    let grow = st.more && !st.closed && st.queued_bytes < GROUP_BYTES;
                    match until {
                        Some(u) if grow && std::time::Instant::now() < u => {
                            self.cv.wait_until(&mut st, u);
                        }
                        _ => break,
                    }
                }
                st.busy = true;
                st.queued_bytes = 0;
                st.oldest = None;
                let t = st.queue.drain(..).collect();
                self.cv.notify_all();
                t
            };
            let result = self.persist(&taken, cx);
            let mut st = self.state.lock();
            st.busy = false;
            if let Err(e) = result {
                st.failed = Some(e);
            }
            self.cv.notify_all();
        }
    }

    fn persist(&self, taken: &[Pending], cx: &Ctx<'_>) -> Result<(), String> {
        let Some(last) = taken.iter().map(|p| p.upto).max_by_key(|a| a.lsn) else {
            return Ok(());
        };
        self.vol.persist_upto(last, cx).map_err(|e| match e {
            BatchError::Stopped(_) => "volume taken over by another shipper".to_string(),
            other => other.to_string(),
        })?;
        let mut frames = Vec::new();
        for lsn in taken.iter().filter_map(|p| p.ack) {
            frames.extend(proto::encode_msg(&Msg::Ack { lsn }).map_err(|e| e.to_string())?);
        }
        if frames.is_empty() {
            return Ok(());
        }
        let _g = self.send.lock();
        use std::io::Write;
        (&mut &*self.sock)
            .write_all(&frames)
            .map_err(|e| format!("cannot send Ack: {e}"))
    }
}
