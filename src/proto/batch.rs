//! Batch payloads: a short header, then WAL record frames (one per record,
//! CRC32C seeded with [`WIRE_SALT`]), the whole record section lz4-compressed
//! when that saves at least 1/8.

use std::borrow::Cow;

use super::{Batch, MAX_FRAME, ProtoError, malformed};
use crate::wal::codec::{self, FRAME_HEADER_LEN as REC_HEADER_LEN, FrameHeader, PreparedBody};
use crate::wal::{Op, Record};

/// Salt of the record CRCs on the wire (`crc_seed(WIRE_SALT)`), so a WAL
/// frame copied verbatim from a segment never validates here by accident.
pub const WIRE_SALT: u64 = u64::from_le_bytes(*b"rplfsnet");
/// Batch flag bit 0: the record section is one lz4 block.
pub const FLAG_BATCH_LZ4: u8 = 1;
/// `u8 flags, u32 count, u32 raw_len`.
pub const BATCH_HEADER_LEN: usize = 9;
/// lz4 cannot expand a block by more than this factor (plus a small constant):
/// larger size claims are refused before allocating.
const LZ4_MAX_RATIO: usize = 255;
/// Largest uncompressed record section of a batch (so that an
/// incompressible batch still fits in one frame).
pub const MAX_BATCH_RAW: usize = MAX_FRAME - BATCH_HEADER_LEN;
/// Record sections smaller than this are sent as they are.
const COMPRESS_MIN: usize = 256;

/// Appends the batch payload to `out`.
pub(super) fn encode(b: &Batch, out: &mut Vec<u8>, seq: Seq) -> Result<(), ProtoError> {
    let raw = encode_records(b, seq)?;
    let compressed = compress_if_pays(&raw);
    let (flags, stored) = match &compressed {
        Some(c) => (FLAG_BATCH_LZ4, c.as_slice()),
        None => (0, raw.as_slice()),
    };
    if BATCH_HEADER_LEN + stored.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge {
            len: BATCH_HEADER_LEN + stored.len(),
            max: MAX_FRAME,
        });
    }
    out.reserve(BATCH_HEADER_LEN + stored.len());
    out.push(flags);
    out.extend_from_slice(&(b.records.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(stored);
    Ok(())
}

/// Exact bytes `op` adds to a batch's record section (before the batch is
/// compressed): a shipper keeps the sum under [`MAX_BATCH_RAW`]. Cheap: the
/// payload is summed (CRC), not copied.
pub fn record_wire_len(op: &Op<'_>) -> Result<usize, ProtoError> {
    let body =
        PreparedBody::new(op, usize::MAX, 0).map_err(|e| ProtoError::Encode(e.to_string()))?;
    Ok(REC_HEADER_LEN + body.stored_len())
}

/// The uncompressed record section: the records' WAL frames back to back.
fn encode_records(b: &Batch, seq: Seq) -> Result<Vec<u8>, ProtoError> {
    check_sequence(&b.records, seq).map_err(ProtoError::Encode)?;
    let seed = codec::crc_seed(WIRE_SALT);
    let size: u64 = b
        .records
        .iter()
        .map(|r| REC_HEADER_LEN as u64 + 64 + r.op.data_len())
        .sum();
    let mut raw = Vec::with_capacity(size.min(MAX_FRAME as u64) as usize);
    for rec in &b.records {
        let body = PreparedBody::new(&rec.op, usize::MAX, seed)
            .map_err(|e| ProtoError::Encode(format!("record LSN {}: {e}", rec.lsn)))?;
        raw.extend_from_slice(&body.header(seed, rec.lsn, rec.time_ns));
        for part in body.parts() {
            raw.extend_from_slice(part);
        }
        if raw.len() > MAX_BATCH_RAW {
            return Err(ProtoError::TooLarge {
                len: raw.len(),
                max: MAX_BATCH_RAW,
            });
        }
    }
    Ok(raw)
}

/// Non-empty, first LSN >= 1, each LSN one more than the previous.
/// How the LSNs of a record section must run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seq {
    /// BATCH: the first >= 1, strictly increasing (gaps are records the
    /// shipper coalesced away).
    Log,
    /// SYNC_OPS: every LSN is 0 (the ops are not log records).
    Sync,
}

fn check_sequence(records: &[Record], seq: Seq) -> Result<(), String> {
    let Some(first) = records.first() else {
        return Err("empty batch".into());
    };
    check_next(None, first.lsn, seq)?;
    for w in records.windows(2) {
        check_next(Some(w[0].lsn), w[1].lsn, seq)?;
    }
    Ok(())
}

/// Is `lsn` allowed after `prev` (None: the first record)?
fn check_next(prev: Option<u64>, lsn: u64, seq: Seq) -> Result<(), String> {
    match (seq, prev) {
        (Seq::Sync, _) if lsn != 0 => Err(format!("sync op with LSN {lsn} (must be 0)")),
        (Seq::Sync, _) => Ok(()),
        (Seq::Log, None) if lsn == 0 => Err("batch record with LSN 0".into()),
        (Seq::Log, Some(p)) if lsn <= p => Err(format!(
            "LSN {lsn} follows LSN {p} in a batch (must increase)"
        )),
        (Seq::Log, _) => Ok(()),
    }
}

fn compress_if_pays(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < COMPRESS_MIN {
        return None;
    }
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(raw.len())];
    let n = lz4_flex::block::compress_into(raw, &mut out).ok()?;
    if n == 0 || n > raw.len() - raw.len() / 8 {
        return None;
    }
    out.truncate(n);
    Some(out)
}

/// Parses and fully validates a batch payload.
pub(super) fn decode(p: &[u8], seq: Seq) -> Result<Batch, ProtoError> {
    if p.len() < BATCH_HEADER_LEN {
        return malformed(format!("batch payload of {} bytes", p.len()));
    }
    let flags = p[0];
    let count = u32::from_le_bytes([p[1], p[2], p[3], p[4]]) as usize;
    let raw_len = u32::from_le_bytes([p[5], p[6], p[7], p[8]]) as usize;
    let stored = &p[BATCH_HEADER_LEN..];
    if flags & !FLAG_BATCH_LZ4 != 0 {
        return malformed(format!("batch flags {flags:#x}"));
    }
    if raw_len > MAX_BATCH_RAW {
        return Err(ProtoError::TooLarge {
            len: raw_len,
            max: MAX_BATCH_RAW,
        });
    }
    if count == 0 || count > raw_len / REC_HEADER_LEN {
        return malformed(format!("batch of {count} records in {raw_len} bytes"));
    }
    let raw = if flags & FLAG_BATCH_LZ4 != 0 {
        Cow::Owned(decompress(stored, raw_len)?)
    } else if stored.len() != raw_len {
        return malformed(format!(
            "batch record section is {} bytes, header says {raw_len}",
            stored.len()
        ));
    } else {
        Cow::Borrowed(stored)
    };
    decode_records(&raw, count, seq)
}

/// Bounded decompression: the size claim is checked against what lz4 can
/// produce from `stored` before the buffer is allocated.
fn decompress(stored: &[u8], raw_len: usize) -> Result<Vec<u8>, ProtoError> {
    let bound = stored
        .len()
        .saturating_mul(LZ4_MAX_RATIO)
        .saturating_add(64);
    if raw_len > bound {
        return malformed(format!(
            "lz4 batch claims {raw_len} bytes from {} compressed bytes",
            stored.len()
        ));
    }
    let mut raw = vec![0u8; raw_len];
    match lz4_flex::block::decompress_into(stored, &mut raw) {
        Ok(n) if n == raw_len => Ok(raw),
        Ok(n) => malformed(format!(
            "lz4 batch decompressed to {n} bytes, header says {raw_len}"
        )),
        Err(e) => malformed(format!("lz4 batch: {e}")),
    }
}

fn decode_records(raw: &[u8], count: usize, seq: Seq) -> Result<Batch, ProtoError> {
    let seed_salt = WIRE_SALT;
    let mut records: Vec<Record> = Vec::with_capacity(count.min(1024));
    let mut off = 0;
    for i in 0..count {
        let rest = raw.get(off..).unwrap_or_default();
        let (rec, len) = codec::decode_frame(seed_salt, rest).map_err(|e| {
            let lsn = FrameHeader::parse(rest).map_or(0, |h| h.lsn);
            ProtoError::Malformed(format!(
                "batch record {i} (claimed LSN {lsn}) at offset {off}: {e}"
            ))
        })?;
        check_next(records.last().map(|r: &Record| r.lsn), rec.lsn, seq)
            .map_err(ProtoError::Malformed)?;
        records.push(rec);
        off += len;
    }
    if off != raw.len() {
        return malformed(format!(
            "{} bytes after the last of {count} batch records",
            raw.len() - off
        ));
    }
    Ok(Batch { records })
}
