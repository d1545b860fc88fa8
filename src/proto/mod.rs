//! The wire protocol between the shipper and `replfs mirror`: frames,
//! messages, batches and the handshake — the one encoder and decoder of it.
//!
//! Specified as tables in `docs/protocol.md`; keep the two in step. Records
//! inside a batch are WAL record frames (`docs/wal-format.md`) produced and
//! checked by `wal::codec`, so there is exactly one codec for ops.

mod batch;
mod handshake;
mod key;
pub mod sync;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};

use crate::wal::{Lsn, Record};

pub use batch::{
    BATCH_HEADER_LEN, BatchBuilder, FLAG_BATCH_LZ4, MAX_BATCH_RAW, RecordRef, Section, WIRE_SALT,
    record_wire_len, section as batch_section,
};
pub use handshake::{
    HANDSHAKE_MAX, MAGIC, NONCE_LEN, PROOF_LEN, check_volume_id, client_handshake,
    client_handshake_as, server_handshake,
};
pub use key::{Key, MIN_KEY_LEN};

/// Protocol version spoken by this build (both ends must speak the same).
pub const PROTO_VERSION: u16 = 2;
/// Hard limit on one frame's payload (a batch's uncompressed record section
/// is limited to [`MAX_BATCH_RAW`]).
pub const MAX_FRAME: usize = 32 << 20;
/// Bytes before every payload: `u32 payload_len`, `u8 type`.
pub const FRAME_HEADER_LEN: usize = 5;
/// Longest error text carried by an `Error` message (longer text is cut).
pub const MAX_ERROR_LEN: usize = 1024;
/// Longest volume id.
pub const MAX_VOLUME_ID_LEN: usize = 64;
/// Most paths a REPAIRS message holds (a mirror asks for the whole tree
/// instead); a peer's bigger count is refused before anything is reserved.
pub const MAX_REPAIRS: usize = 10_000;

/// Frame type codes (table in `docs/protocol.md`).
pub mod frame_type {
    pub const HELLO: u8 = 1;
    pub const CHALLENGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const READY: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const PING: u8 = 6;
    pub const PONG: u8 = 7;
    pub const BATCH: u8 = 8;
    pub const ACK: u8 = 9;
    pub const SYNC_BEGIN: u8 = 10;
    pub const MANIFEST_REQ: u8 = 11;
    pub const MANIFEST: u8 = 12;
    pub const SUMS_REQ: u8 = 13;
    pub const SUMS: u8 = 14;
    pub const SYNC_OPS: u8 = 15;
    pub const SYNC_END: u8 = 16;
    pub const SYNC_DONE: u8 = 17;
    pub const REPAIRS: u8 = 18;
}
use frame_type as t;

/// Why a frame could not be sent, read or accepted.
#[derive(thiserror::Error, Debug)]
pub enum ProtoError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection cleanly between two frames.
    #[error("connection closed by the peer")]
    Closed,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("protocol version mismatch: we speak {ours}, the peer {theirs}")]
    Version { ours: u16, theirs: u16 },
    /// The peer sent an `Error` message.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// What we were asked to send is not valid (a caller bug, not the peer's).
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl ProtoError {
    /// Did a read or write time out (socket timeout expired)?
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtoError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

fn malformed<T>(msg: impl Into<String>) -> Result<T, ProtoError> {
    Err(ProtoError::Malformed(msg.into()))
}

/// A run of records in LSN order (shipper -> mirror). In a BATCH the LSNs
/// increase; a gap is a record the shipper coalesced away (the mirror counts
/// it as applied). In SYNC_OPS every LSN is 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub records: Vec<Record>,
}

impl Batch {
    /// LSN of the last record (`None` when empty).
    pub fn last_lsn(&self) -> Option<Lsn> {
        self.records.last().map(|r| r.lsn)
    }
}

/// Who a connection is: the volume's one shipper, or a read-only verifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Claims the volume: applies batches and sync ops.
    Shipper = 0,
    /// Does not claim the volume: only MANIFEST_REQ, SUMS_REQ and PING.
    Verifier = 1,
}

/// What READY tells the shipper.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadyInfo {
    /// Every record <= `applied` is applied.
    pub applied: Lsn,
    /// The source this replica was last baselined from ("" = never).
    pub source: String,
}

/// A message after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// shipper -> mirror: records to apply.
    Batch(Batch),
    /// mirror -> shipper: every record <= `lsn` is applied and persisted.
    Ack {
        lsn: Lsn,
    },
    /// mirror -> shipper after the handshake: resume from `applied + 1`.
    Ready(ReadyInfo),
    /// Either way: why the sender is closing the connection.
    Error {
        msg: String,
    },
    /// Keepalive; the mirror answers `Pong`.
    Ping,
    Pong,
    /// shipper -> mirror: a baseline of the whole tree starts; the replica is
    /// now `source`'s, positioned at `lsn` (records after it follow the
    /// sync). Answered with `Ack { lsn }` once persisted.
    SyncBegin {
        lsn: Lsn,
        source: String,
    },
    /// -> mirror: list the subtree at `path` (pre-order, names sorted), with
    /// a content hash of every regular file when `hashes`.
    ManifestReq {
        path: Vec<u8>,
        hashes: bool,
    },
    /// mirror ->: a run of manifest entries (`crate::sync::manifest`);
    /// `last` ends the listing.
    Manifest {
        last: bool,
        entries: Vec<u8>,
    },
    /// -> mirror: checksums of `path`'s blocks of `block` bytes.
    SumsReq {
        path: Vec<u8>,
        block: u32,
    },
    /// mirror ->: `size` is None when `path` is not a regular file there.
    Sums {
        size: Option<u64>,
        block: u32,
        sums: Vec<[u8; sync::SUM_LEN]>,
    },
    /// shipper -> mirror: changes that bring the replica in line (LSN 0).
    SyncOps(Batch),
    /// shipper -> mirror: make everything synced so far durable; answered
    /// with `SyncDone { token }`. Records up to `horizon` may describe
    /// states the sync already went past: the mirror skips those it cannot
    /// apply for a missing or different entry (the shipper repairs every
    /// path they touch afterwards).
    SyncEnd {
        token: u64,
        horizon: Lsn,
    },
    SyncDone {
        token: u64,
    },
    /// mirror -> shipper, right after READY: paths the mirror knows its copy
    /// may not hold right (a `RENAME_EXCHANGE` interrupted by a crash, a
    /// `Resync` record); the shipper repairs them.
    Repairs {
        paths: Vec<Vec<u8>>,
    },
}

impl Msg {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Batch(_) => "Batch",
            Msg::Ack { .. } => "Ack",
            Msg::Ready { .. } => "Ready",
            Msg::Error { .. } => "Error",
            Msg::Ping => "Ping",
            Msg::Pong => "Pong",
            Msg::SyncBegin { .. } => "SyncBegin",
            Msg::ManifestReq { .. } => "ManifestReq",
            Msg::Manifest { .. } => "Manifest",
            Msg::SumsReq { .. } => "SumsReq",
            Msg::Sums { .. } => "Sums",
            Msg::SyncOps(_) => "SyncOps",
            Msg::SyncEnd { .. } => "SyncEnd",
            Msg::SyncDone { .. } => "SyncDone",
            Msg::Repairs { .. } => "Repairs",
        }
    }
}

/// Appends a frame header with a placeholder length; [`seal_frame`] fills it.
fn start_frame(out: &mut Vec<u8>, ty: u8) {
    out.extend_from_slice(&[0, 0, 0, 0, ty]);
}

fn seal_frame(out: &mut [u8], max: usize) -> Result<(), ProtoError> {
    let len = out.len() - FRAME_HEADER_LEN;
    if len > max {
        return Err(ProtoError::TooLarge { len, max });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Encodes `m` as one whole frame (header and payload).
pub fn encode_msg(m: &Msg) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::with_capacity(64);
    match m {
        Msg::Batch(b) => {
            start_frame(&mut out, t::BATCH);
            batch::encode(b, &mut out, batch::Seq::Log)?;
        }
        Msg::SyncOps(b) => {
            start_frame(&mut out, t::SYNC_OPS);
            batch::encode(b, &mut out, batch::Seq::Sync)?;
        }
        Msg::Ack { lsn } => {
            start_frame(&mut out, t::ACK);
            out.extend_from_slice(&lsn.to_le_bytes());
        }
        Msg::Ready(r) => {
            start_frame(&mut out, t::READY);
            out.extend_from_slice(&r.applied.to_le_bytes());
            sync::put_source(&mut out, &r.source)?;
        }
        Msg::Error { msg } => {
            start_frame(&mut out, t::ERROR);
            out.extend_from_slice(truncate_utf8(msg, MAX_ERROR_LEN).as_bytes());
        }
        Msg::Ping => start_frame(&mut out, t::PING),
        Msg::Pong => start_frame(&mut out, t::PONG),
        Msg::SyncBegin { lsn, source } => {
            start_frame(&mut out, t::SYNC_BEGIN);
            out.extend_from_slice(&lsn.to_le_bytes());
            sync::put_source(&mut out, source)?;
        }
        Msg::ManifestReq { path, hashes } => {
            start_frame(&mut out, t::MANIFEST_REQ);
            out.push(u8::from(*hashes));
            sync::put16(&mut out, path)?;
        }
        Msg::Manifest { last, entries } => {
            start_frame(&mut out, t::MANIFEST);
            out.push(u8::from(*last));
            out.extend_from_slice(entries);
        }
        Msg::SumsReq { path, block } => {
            start_frame(&mut out, t::SUMS_REQ);
            out.extend_from_slice(&block.to_le_bytes());
            sync::put16(&mut out, path)?;
        }
        Msg::Sums { size, block, sums } => {
            start_frame(&mut out, t::SUMS);
            out.extend_from_slice(&size.unwrap_or(u64::MAX).to_le_bytes());
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(&(sums.len() as u32).to_le_bytes());
            for s in sums {
                out.extend_from_slice(s);
            }
        }
        Msg::SyncEnd { token, horizon } => {
            start_frame(&mut out, t::SYNC_END);
            out.extend_from_slice(&token.to_le_bytes());
            out.extend_from_slice(&horizon.to_le_bytes());
        }
        Msg::SyncDone { token } => {
            start_frame(&mut out, t::SYNC_DONE);
            out.extend_from_slice(&token.to_le_bytes());
        }
        Msg::Repairs { paths } => {
            start_frame(&mut out, t::REPAIRS);
            out.extend_from_slice(&(paths.len() as u32).to_le_bytes());
            for p in paths {
                sync::put16(&mut out, p)?;
            }
        }
    }
    seal_frame(&mut out, MAX_FRAME)?;
    Ok(out)
}

/// Sends one message; returns the bytes put on the wire. Batches are
/// encoded with the WAL codec and lz4-compressed when that saves >= 1/8.
/// Fails with `Encode` for an empty or non-contiguous batch or an invalid
/// record, and `TooLarge` when the batch exceeds [`MAX_FRAME`].
pub fn write_msg(w: &mut impl Write, m: &Msg) -> Result<u64, ProtoError> {
    let frame = encode_msg(m)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(frame.len() as u64)
}

/// Reads one message. Never panics; checks the length against
/// [`MAX_FRAME`] before reading the payload (and the buffer grows only as
/// bytes arrive); validates batches fully (see `docs/protocol.md`).
/// A clean close before the first byte of a frame is [`ProtoError::Closed`].
pub fn read_msg(r: &mut impl Read) -> Result<Msg, ProtoError> {
    let (ty, payload) = read_frame(r, MAX_FRAME)?;
    decode_msg(ty, &payload)
}

/// Reads one frame's payload into `buf` and returns its type, for
/// [`decode_msg`] or, for a BATCH, [`batch_section`]. `buf` keeps its
/// capacity for the next call (up to [`KEEP_BUF`]): a stream of large
/// batches is received without a reallocation per frame.
pub fn read_frame_buf(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<u8, ProtoError> {
    if buf.capacity() > KEEP_BUF {
        *buf = Vec::new();
    }
    read_frame_into(r, MAX_FRAME, buf)
}

/// Largest receive buffer [`read_frame_buf`] keeps between frames.
const KEEP_BUF: usize = 16 << 20;

/// Decodes the payload of a frame of type `ty` (handshake types are refused).
pub fn decode_msg(ty: u8, p: &[u8]) -> Result<Msg, ProtoError> {
    let mut c = sync::Cur::new(p, "message");
    let m = match ty {
        t::BATCH => return Ok(Msg::Batch(batch::decode(p, batch::Seq::Log)?)),
        t::SYNC_OPS => return Ok(Msg::SyncOps(batch::decode(p, batch::Seq::Sync)?)),
        t::ACK => Msg::Ack {
            lsn: u64_payload(p, "Ack")?,
        },
        t::READY => Msg::Ready(ReadyInfo {
            applied: c.u64()?,
            source: sync::get_source(&mut c)?,
        }),
        t::ERROR => {
            return Ok(Msg::Error {
                msg: error_text(p)?,
            });
        }
        t::PING | t::PONG if !p.is_empty() => return malformed("Ping/Pong with a payload"),
        t::PING => Msg::Ping,
        t::PONG => Msg::Pong,
        t::SYNC_BEGIN => Msg::SyncBegin {
            lsn: c.u64()?,
            source: sync::get_source(&mut c)?,
        },
        t::MANIFEST_REQ => {
            let hashes = match c.u8()? {
                0 => false,
                1 => true,
                f => return malformed(format!("ManifestReq flags {f:#x}")),
            };
            Msg::ManifestReq {
                hashes,
                path: c.path()?,
            }
        }
        t::MANIFEST => {
            let last = match c.u8()? {
                0 => false,
                1 => true,
                f => return malformed(format!("Manifest flags {f:#x}")),
            };
            // Entries are decoded (and validated) by `sync::manifest`.
            let entries = c.rest().to_vec();
            return Ok(Msg::Manifest { last, entries });
        }
        t::SUMS_REQ => {
            let block = c.u32()?;
            sync::check_block(block)?;
            Msg::SumsReq {
                block,
                path: c.path()?,
            }
        }
        t::SUMS => {
            let size = Some(c.u64()?).filter(|&s| s != u64::MAX);
            let block = c.u32()?;
            sync::check_block(block)?;
            let n = c.u32()? as usize;
            if n > sync::MAX_SUMS || c.rest().len() != n * sync::SUM_LEN {
                return malformed(format!("Sums of {n} checksums in {} bytes", c.rest().len()));
            }
            let sums = c
                .rest()
                .chunks_exact(sync::SUM_LEN)
                .map(|b| b.try_into().unwrap_or([0; sync::SUM_LEN]))
                .collect();
            return Ok(Msg::Sums { size, block, sums });
        }
        t::SYNC_END => Msg::SyncEnd {
            token: c.u64()?,
            horizon: c.u64()?,
        },
        t::SYNC_DONE => Msg::SyncDone {
            token: u64_payload(p, "SyncDone")?,
        },
        t::REPAIRS => {
            let n = c.u32()? as usize;
            if n > MAX_REPAIRS || n > c.rest().len() / 2 {
                return malformed(format!("Repairs of {n} paths in {} bytes", p.len()));
            }
            let mut paths = Vec::with_capacity(n);
            for _ in 0..n {
                paths.push(c.path()?);
            }
            Msg::Repairs { paths }
        }
        t::HELLO | t::CHALLENGE | t::AUTH => {
            return malformed(format!("handshake frame type {ty} after the handshake"));
        }
        _ => return malformed(format!("unknown frame type {ty}")),
    };
    if !matches!(m, Msg::Ack { .. } | Msg::SyncDone { .. }) {
        c.end()?;
    }
    Ok(m)
}

fn u64_payload(p: &[u8], what: &str) -> Result<u64, ProtoError> {
    match <[u8; 8]>::try_from(p) {
        Ok(b) => Ok(u64::from_le_bytes(b)),
        Err(_) => malformed(format!("{what} payload of {} bytes, expected 8", p.len())),
    }
}

fn error_text(p: &[u8]) -> Result<String, ProtoError> {
    if p.len() > MAX_ERROR_LEN {
        return Err(ProtoError::TooLarge {
            len: p.len(),
            max: MAX_ERROR_LEN,
        });
    }
    Ok(String::from_utf8_lossy(p).into_owned())
}

/// The longest prefix of `s` of at most `max` bytes ending on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads a frame header and a payload of at most `max` bytes.
pub(crate) fn read_frame(r: &mut impl Read, max: usize) -> Result<(u8, Vec<u8>), ProtoError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    read_header(r, &mut hdr)?;
    let mut payload = Vec::new();
    let ty = read_payload(r, hdr, max, &mut payload)?;
    Ok((ty, payload))
}

/// [`read_frame`] into `buf` (cleared first); returns the type.
fn read_frame_into(r: &mut impl Read, max: usize, buf: &mut Vec<u8>) -> Result<u8, ProtoError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    read_header(r, &mut hdr)?;
    read_payload(r, hdr, max, buf)
}

fn read_payload(
    r: &mut impl Read,
    hdr: [u8; FRAME_HEADER_LEN],
    max: usize,
    payload: &mut Vec<u8>,
) -> Result<u8, ProtoError> {
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    if len > max {
        return Err(ProtoError::TooLarge { len, max });
    }
    // Grow with the bytes that actually arrive: a peer that announces a big
    // frame and sends nothing costs no memory.
    payload.clear();
    payload.reserve(len.min(64 << 10));
    let got = r.take(len as u64).read_to_end(payload)?;
    if got != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut after {got} of {len} payload bytes"),
        )
        .into());
    }
    Ok(hdr[4])
}

/// Like `read_exact`, but a close before the first byte is `Closed`.
fn read_header(r: &mut impl Read, hdr: &mut [u8; FRAME_HEADER_LEN]) -> Result<(), ProtoError> {
    let mut n = 0;
    while n < hdr.len() {
        match r.read(&mut hdr[n..]) {
            Ok(0) if n == 0 => return Err(ProtoError::Closed),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("frame header cut after {n} bytes"),
                )
                .into());
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes one raw frame (handshake messages).
pub(crate) fn write_frame(w: &mut impl Write, ty: u8, payload: &[u8]) -> Result<(), ProtoError> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    start_frame(&mut out, ty);
    out.extend_from_slice(payload);
    seal_frame(&mut out, MAX_FRAME)?;
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}
