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

/// Appends the batch payload to `out`: the records are framed straight
/// into it, and replaced by their lz4 block when compression pays.
pub(super) fn encode(b: &Batch, out: &mut Vec<u8>, seq: Seq) -> Result<(), ProtoError> {
    check_sequence(&b.records, seq).map_err(ProtoError::Encode)?;
    let head = out.len();
    let section = head + BATCH_HEADER_LEN;
    out.resize(section, 0);
    let size: u64 = b
        .records
        .iter()
        .map(|r| REC_HEADER_LEN as u64 + 64 + r.op.data_len())
        .sum();
    out.reserve(size.min(MAX_FRAME as u64) as usize);
    for rec in &b.records {
        append_record(out, section, rec.lsn, rec.time_ns, &rec.op)?;
    }
    seal_section(out, section, b.records.len() as u32);
    if out.len() - head > MAX_FRAME {
        return Err(ProtoError::TooLarge {
            len: out.len() - head,
            max: MAX_FRAME,
        });
    }
    Ok(())
}

/// Exact bytes `op` adds to a batch's record section (before the batch is
/// compressed): a shipper keeps the sum under [`MAX_BATCH_RAW`]. Cheap: only
/// the fixed fields and names are encoded; the payload is neither copied
/// nor summed.
pub fn record_wire_len(op: &Op<'_>) -> Result<usize, ProtoError> {
    let mut head = Vec::with_capacity(64);
    let tail = codec::encode_body(op, &mut head).map_err(|e| ProtoError::Encode(e.to_string()))?;
    Ok(REC_HEADER_LEN + head.len() + tail.len())
}

/// Appends one record, framed with a [`WIRE_SALT`] CRC, to the record
/// section that starts at `section` in `out` (its LSN already checked).
fn append_record(
    out: &mut Vec<u8>,
    section: usize,
    lsn: u64,
    time_ns: i64,
    op: &Op<'_>,
) -> Result<(), ProtoError> {
    let seed = codec::crc_seed(WIRE_SALT);
    let body = PreparedBody::new(op, usize::MAX, seed)
        .map_err(|e| ProtoError::Encode(format!("record LSN {lsn}: {e}")))?;
    room(out.len() - section + REC_HEADER_LEN + body.stored_len())?;
    out.extend_from_slice(&body.header(seed, lsn, time_ns));
    for part in body.parts() {
        out.extend_from_slice(part);
    }
    Ok(())
}

/// A record section of `len` bytes is within [`MAX_BATCH_RAW`].
fn room(len: usize) -> Result<(), ProtoError> {
    if len > MAX_BATCH_RAW {
        return Err(ProtoError::TooLarge {
            len,
            max: MAX_BATCH_RAW,
        });
    }
    Ok(())
}

/// Replaces the record section at `section` in `out` by its lz4 block when
/// that pays, and fills the batch header just before it.
fn seal_section(out: &mut Vec<u8>, section: usize, count: u32) {
    let raw_len = out.len() - section;
    let flags = match compress_if_pays(&out[section..]) {
        Some(c) => {
            out.truncate(section);
            out.extend_from_slice(&c);
            FLAG_BATCH_LZ4
        }
        None => 0,
    };
    let head = section - BATCH_HEADER_LEN;
    out[head] = flags;
    out[head + 1..head + 5].copy_from_slice(&count.to_le_bytes());
    out[head + 5..head + 9].copy_from_slice(&(raw_len as u32).to_le_bytes());
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

/// The lz4 block of `raw` when it saves at least 1/8. A large section is
/// first judged by a few samples spread over it: data that does not shrink
/// (already compressed or encrypted) is sent as is after compressing
/// [`SAMPLES`] × [`SAMPLE_LEN`] bytes, not the whole section.
fn compress_if_pays(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < COMPRESS_MIN {
        return None;
    }
    if raw.len() >= 4 * SAMPLES * SAMPLE_LEN {
        let step = (raw.len() - SAMPLE_LEN) / (SAMPLES - 1);
        let shrunk: usize = (0..SAMPLES)
            .map(|k| lz4_flex::block::compress(&raw[k * step..k * step + SAMPLE_LEN]).len())
            .sum();
        if !pays(shrunk, SAMPLES * SAMPLE_LEN) {
            return None;
        }
    }
    let out = lz4_flex::block::compress(raw);
    pays(out.len(), raw.len()).then_some(out)
}

/// Does a block of `n` bytes for `raw` bytes save at least 1/8?
fn pays(n: usize, raw: usize) -> bool {
    n > 0 && n <= raw - raw / 8
}

/// Samples judged before a large section is compressed, and their size.
const SAMPLES: usize = 4;
const SAMPLE_LEN: usize = 8 << 10;

/// Parses and fully validates a batch payload.
pub(super) fn decode(p: &[u8], seq: Seq) -> Result<Batch, ProtoError> {
    let records = section(p)?
        .records_seq(seq)?
        .into_iter()
        .map(|r| Record {
            lsn: r.lsn,
            time_ns: r.time_ns,
            op: r.op.into_owned(),
        })
        .collect();
    Ok(Batch { records })
}

/// A BATCH payload's record section (decompressed when it was), its header
/// checked: [`Section::records`] validates and decodes the records, which
/// borrow their data from it (the mirror applies writes without copying
/// them out of the frame).
pub struct Section<'a> {
    raw: Cow<'a, [u8]>,
    count: usize,
}

/// A decoded record borrowing its data (see [`Section`]).
#[derive(Debug)]
pub struct RecordRef<'a> {
    pub lsn: u64,
    pub time_ns: i64,
    pub op: Op<'a>,
}

/// Checks a BATCH payload's header and decompresses its section.
pub fn section(p: &[u8]) -> Result<Section<'_>, ProtoError> {
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
    Ok(Section { raw, count })
}

impl Section<'_> {
    /// Every record of a BATCH, fully validated (any failure: the whole
    /// batch is malformed).
    pub fn records(&self) -> Result<Vec<RecordRef<'_>>, ProtoError> {
        self.records_seq(Seq::Log)
    }

    fn records_seq(&self, seq: Seq) -> Result<Vec<RecordRef<'_>>, ProtoError> {
        decode_records(&self.raw, self.count, seq)
    }
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

fn decode_records(raw: &[u8], count: usize, seq: Seq) -> Result<Vec<RecordRef<'_>>, ProtoError> {
    let mut records: Vec<RecordRef<'_>> = Vec::with_capacity(count.min(1024));
    let mut off = 0;
    for i in 0..count {
        let rest = raw.get(off..).unwrap_or_default();
        let (h, op, len) = codec::decode_frame_ref(WIRE_SALT, rest).map_err(|e| {
            let lsn = FrameHeader::parse(rest).map_or(0, |h| h.lsn);
            ProtoError::Malformed(format!(
                "batch record {i} (claimed LSN {lsn}) at offset {off}: {e}"
            ))
        })?;
        check_next(records.last().map(|r| r.lsn), h.lsn, seq).map_err(ProtoError::Malformed)?;
        records.push(RecordRef {
            lsn: h.lsn,
            time_ns: h.time_ns,
            op,
        });
        off += len;
    }
    if off != raw.len() {
        return malformed(format!(
            "{} bytes after the last of {count} batch records",
            raw.len() - off
        ));
    }
    Ok(records)
}

/// Builds a BATCH frame record by record, straight into the buffer that is
/// sent: a shipper encodes each record once, and forwards a large
/// uncompressed WAL frame as it is stored, with only its CRC re-seeded for
/// the wire ([`BatchBuilder::push_frame`]). [`BatchBuilder::finish`]
/// compresses the section when that pays and seals the frame; the result
/// is exactly what `encode_msg(&Msg::Batch(..))` gives for the same records.
pub struct BatchBuilder {
    /// Frame header, batch header, then the record section.
    buf: Vec<u8>,
    count: u32,
    last: Option<u64>,
}

/// Where the record section starts in [`BatchBuilder`]'s buffer.
const SECTION_AT: usize = super::FRAME_HEADER_LEN + BATCH_HEADER_LEN;

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        BatchBuilder {
            buf: vec![0; SECTION_AT],
            count: 0,
            last: None,
        }
    }

    pub fn records(&self) -> usize {
        self.count as usize
    }

    /// Bytes of the record section so far (before compression).
    pub fn raw_len(&self) -> usize {
        self.buf.len() - SECTION_AT
    }

    pub fn last_lsn(&self) -> Option<u64> {
        self.last
    }

    /// Appends a record (its LSN must be greater than the last one's).
    pub fn push(&mut self, lsn: u64, time_ns: i64, op: &Op<'_>) -> Result<(), ProtoError> {
        check_next(self.last, lsn, Seq::Log).map_err(ProtoError::Encode)?;
        append_record(&mut self.buf, SECTION_AT, lsn, time_ns, op)?;
        self.count += 1;
        self.last = Some(lsn);
        Ok(())
    }

    /// Appends a WAL frame as stored in a segment whose CRC seed is `seed`:
    /// `h` and `stored` must have passed the segment's CRC check and
    /// `stored` must decode (the caller checks both); a compressed body is
    /// refused (`Encode`: records are never compressed one by one on the
    /// wire). The CRC is re-seeded, the body copied once and not summed.
    pub fn push_frame(
        &mut self,
        h: &FrameHeader,
        stored: &[u8],
        seed: u32,
    ) -> Result<(), ProtoError> {
        check_next(self.last, h.lsn, Seq::Log).map_err(ProtoError::Encode)?;
        if h.flags != 0 || stored.len() != h.stored_len() {
            return Err(ProtoError::Encode(format!(
                "record LSN {}: a compressed or cut frame is not forwarded",
                h.lsn
            )));
        }
        room(self.raw_len() + REC_HEADER_LEN + stored.len())?;
        let wire = FrameHeader {
            crc: codec::reseed_crc(h.crc, seed, codec::crc_seed(WIRE_SALT), stored.len()),
            ..*h
        };
        self.buf.extend_from_slice(&wire.to_bytes());
        self.buf.extend_from_slice(stored);
        self.count += 1;
        self.last = Some(h.lsn);
        Ok(())
    }

    /// The whole BATCH frame, ready to send.
    pub fn finish(mut self) -> Result<Vec<u8>, ProtoError> {
        if self.count == 0 {
            return Err(ProtoError::Encode("empty batch".into()));
        }
        seal_section(&mut self.buf, SECTION_AT, self.count);
        self.buf[4] = super::frame_type::BATCH;
        super::seal_frame(&mut self.buf, MAX_FRAME)?;
        Ok(self.buf)
    }
}
