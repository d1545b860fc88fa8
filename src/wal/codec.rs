//! The one encoder/decoder of record bodies and record frames: little-endian,
//! bounds-checked, validating (decoding never panics, whatever the input).
//!
//! Layouts are specified as tables in `docs/wal-format.md`; keep the two in step.

use super::record::{Lsn, Op, Record};

mod body;
pub use body::{
    decode_body, decode_body_ref, encode_body, encode_body_vec, op_code, validate_path,
};

/// Longest path (bytes) a record may carry, like `PATH_MAX`.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component or xattr name, like `NAME_MAX` / `XATTR_NAME_MAX`.
pub const MAX_NAME_LEN: usize = 255;
/// Most data one `Write` record carries (the FUSE maximum write is 1 MiB);
/// callers split bigger writes.
pub const MAX_DATA_LEN: usize = 1 << 20;
/// Largest xattr value, like `XATTR_SIZE_MAX`.
pub const MAX_XATTR_VALUE_LEN: usize = 64 << 10;
/// Longest `Resync` reason text.
pub const MAX_REASON_LEN: usize = 4096;
/// Largest uncompressed body of any record.
pub const MAX_BODY_LEN: usize = MAX_DATA_LEN + (64 << 10);
/// Bytes of the fixed frame header that precedes every body.
pub const FRAME_HEADER_LEN: usize = 32;
/// Largest frame: a body is only stored compressed when that is smaller.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + MAX_BODY_LEN;
/// Frame flag bit 0: the stored body is an lz4 block.
pub const FLAG_LZ4: u8 = 1;

const OP_CREATE: u8 = 1;
const OP_SYMLINK: u8 = 2;
const OP_LINK: u8 = 3;
const OP_REMOVE: u8 = 4;
const OP_RENAME: u8 = 5;
const OP_WRITE: u8 = 6;
const OP_TRUNCATE: u8 = 7;
const OP_SETATTR: u8 = 8;
const OP_SETXATTR: u8 = 9;
const OP_REMOVEXATTR: u8 = 10;
const OP_FALLOCATE: u8 = 11;
const OP_RESYNC: u8 = 12;
/// Probe size for the cheap "is this compressible" test of large payloads.
const SAMPLE_LEN: usize = 4096;

/// Why bytes are not a valid record (or an op cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record truncated while reading {0}")]
    Truncated(&'static str),
    #[error("{what} is {len} bytes, the limit is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("invalid {0}")]
    Invalid(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError::Invalid(msg.into()))
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), CodecError> {
    if len > max {
        Err(CodecError::TooLong { what, len, max })
    } else {
        Ok(())
    }
}

/// The fixed 32-byte header in front of every stored body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whole frame: header + stored body. 0 marks the end of a segment's records.
    pub frame_len: u32,
    pub crc: u32,
    pub lsn: Lsn,
    pub time_ns: i64,
    pub flags: u8,
    pub op_code: u8,
    pub reserved: u16,
    /// Uncompressed body length.
    pub body_len: u32,
}

impl FrameHeader {
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(&self.frame_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.crc.to_le_bytes());
        b[8..16].copy_from_slice(&self.lsn.to_le_bytes());
        b[16..24].copy_from_slice(&self.time_ns.to_le_bytes());
        b[24] = self.flags;
        b[25] = self.op_code;
        b[26..28].copy_from_slice(&self.reserved.to_le_bytes());
        b[28..32].copy_from_slice(&self.body_len.to_le_bytes());
        b
    }

    /// Parses the raw fields; `None` when fewer than 32 bytes are given.
    pub fn parse(b: &[u8]) -> Option<FrameHeader> {
        let b: &[u8; FRAME_HEADER_LEN] = b.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Some(FrameHeader {
            frame_len: u32_at(0),
            crc: u32_at(4),
            lsn: u64_at(8),
            time_ns: u64_at(16) as i64,
            flags: b[24],
            op_code: b[25],
            reserved: u16::from_le_bytes([b[26], b[27]]),
            body_len: u32_at(28),
        })
    }

    /// Bytes of the stored (possibly compressed) body.
    pub fn stored_len(&self) -> usize {
        (self.frame_len as usize).saturating_sub(FRAME_HEADER_LEN)
    }

    /// Is the frame length in the range any writer produces?
    pub fn len_plausible(&self) -> bool {
        (FRAME_HEADER_LEN..=MAX_FRAME_LEN).contains(&(self.frame_len as usize))
    }

    /// Structural checks that do not need the body (the CRC is checked apart).
    pub fn check(&self) -> Result<(), CodecError> {
        if !self.len_plausible() {
            return invalid(format!("frame length {}", self.frame_len));
        }
        if self.flags & !FLAG_LZ4 != 0 || self.reserved != 0 {
            return invalid(format!(
                "frame flags {:#x}/{:#x}",
                self.flags, self.reserved
            ));
        }
        if !(OP_CREATE..=OP_RESYNC).contains(&self.op_code) {
            return invalid(format!("op code {}", self.op_code));
        }
        check_len("record body", self.body_len as usize, MAX_BODY_LEN)?;
        let stored = self.stored_len();
        let ok = if self.flags & FLAG_LZ4 != 0 {
            stored > 0 && stored <= self.body_len as usize
        } else {
            stored == self.body_len as usize
        };
        if !ok {
            return invalid(format!(
                "stored length {stored} vs body length {}",
                self.body_len
            ));
        }
        Ok(())
    }
}

/// The CRC32C start value of a segment: derived from its salt, so frames
/// left over from another segment never validate here.
pub fn crc_seed(salt: u64) -> u32 {
    crc32c::crc32c(&salt.to_le_bytes())
}

/// The frame CRC: CRC32C started from [`crc_seed`] over the stored body,
/// then header bytes 0..4 and 8..32. `body_crc` is the seeded CRC of the body
/// alone, so the (possibly large) body is summed before the LSN is known and
/// only 28 header bytes are summed under the writer's lock.
pub fn seal_crc(body_crc: u32, hdr: &[u8; FRAME_HEADER_LEN]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c_append(body_crc, &hdr[0..4]), &hdr[8..])
}

/// Does this frame (header + stored body) carry the right CRC for `seed`?
pub fn crc_matches(seed: u32, h: &FrameHeader, stored: &[u8]) -> bool {
    seal_crc(crc32c::crc32c_append(seed, stored), &h.to_bytes()) == h.crc
}

/// [`decode_stored`] borrowing the data of an uncompressed body from
/// `stored` (a compressed one is decompressed, so its op owns its data).
pub fn decode_stored_ref<'a>(h: &FrameHeader, stored: &'a [u8]) -> Result<Op<'a>, CodecError> {
    if h.flags & FLAG_LZ4 == 0 {
        h.check()?;
        return decode_body_ref(h.op_code, stored);
    }
    decode_stored(h, stored)
}

/// The CRC a frame carries when its segment's CRC seed is `to` instead of
/// `from`, from the CRC it carries (`crc`) and its stored length, without
/// reading the body: a CRC is affine in its seed, so the two differ by the
/// seeds' difference shifted over the bytes summed (stored body + 28 header
/// bytes), which `crc32c_combine` computes in O(log n).
pub fn reseed_crc(crc: u32, from: u32, to: u32, stored_len: usize) -> u32 {
    let summed = (stored_len + FRAME_HEADER_LEN - 4) as u64;
    crc ^ mul_mod_p(x8n_mod_p(summed), from ^ to)
}

/// CRC32C's polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// `a * b` modulo the CRC polynomial (bit-reflected: bit 31 is x^0), as in
/// zlib's `multmodp`.
const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `X2N[k]` = x^(2^k) modulo the polynomial.
const X2N: [u32; 64] = {
    let mut t = [0u32; 64];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 64 {
        t[k] = p;
        p = mul_mod_p(p, p);
        k += 1;
    }
    t
};

/// x^(8n) modulo the polynomial: the operator that shifts a CRC over `n`
/// zero bytes (popcount(n) multiplications).
fn x8n_mod_p(mut n: u64) -> u32 {
    let mut p = 1u32 << 31; // x^0
    let mut k = 3;
    while n != 0 && k < X2N.len() {
        if n & 1 != 0 {
            p = mul_mod_p(X2N[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// Decompresses (if flagged) and decodes a frame's stored body.
pub fn decode_stored(h: &FrameHeader, stored: &[u8]) -> Result<Op<'static>, CodecError> {
    h.check()?;
    if h.flags & FLAG_LZ4 == 0 {
        return decode_body(h.op_code, stored);
    }
    let mut body = vec![0u8; h.body_len as usize];
    match lz4_flex::block::decompress_into(stored, &mut body) {
        Ok(n) if n == body.len() => decode_body(h.op_code, &body),
        Ok(n) => invalid(format!(
            "lz4 body decompressed to {n} bytes, header says {}",
            body.len()
        )),
        Err(e) => invalid(format!("lz4 body: {e}")),
    }
}

/// A body ready to be framed: encoded and maybe compressed before the
/// writer takes its lock, with its CRC already summed.
#[derive(Debug)]
pub struct PreparedBody<'a> {
    pub op_code: u8,
    pub flags: u8,
    /// Uncompressed body length.
    pub body_len: u32,
    /// Segment seed the body CRC was started from.
    pub seed: u32,
    /// CRC32C of the stored bytes (`head ++ tail`) started from `seed`.
    pub crc: u32,
    head: Vec<u8>,
    tail: &'a [u8],
}

impl<'a> PreparedBody<'a> {
    /// Encodes `op`; compresses it with lz4 when the body is at least
    /// `compress_min` bytes and compression saves at least 1/8; sums the body
    /// CRC from `seed` (the current segment's, re-summed if it rolls meanwhile).
    pub fn new(op: &'a Op<'_>, compress_min: usize, seed: u32) -> Result<Self, CodecError> {
        let mut head = Vec::with_capacity(64);
        let tail = encode_body(op, &mut head)?;
        let body_len = head.len() + tail.len();
        check_len("record body", body_len, MAX_BODY_LEN)?;
        let (head, tail, flags) = match try_compress(&head, tail, compress_min) {
            Some(c) => (c, &[][..], FLAG_LZ4),
            None => (head, tail, 0),
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(seed, &head), tail);
        Ok(PreparedBody {
            op_code: op_code(op),
            flags,
            body_len: body_len as u32,
            seed,
            crc,
            head,
            tail,
        })
    }

    pub fn stored_len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// The stored bytes, in order, for a vectored write.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.head, self.tail]
    }

    /// The sealed frame header for this body at `lsn` in a segment with `seed`.
    pub fn header(&self, seed: u32, lsn: Lsn, time_ns: i64) -> [u8; FRAME_HEADER_LEN] {
        let mut h = FrameHeader {
            frame_len: (FRAME_HEADER_LEN + self.stored_len()) as u32,
            crc: 0,
            lsn,
            time_ns,
            flags: self.flags,
            op_code: self.op_code,
            reserved: 0,
            body_len: self.body_len,
        };
        let body_crc = if seed == self.seed {
            self.crc
        } else {
            crc32c::crc32c_append(crc32c::crc32c_append(seed, &self.head), self.tail)
        };
        h.crc = seal_crc(body_crc, &h.to_bytes());
        h.to_bytes()
    }
}

fn try_compress(head: &[u8], tail: &[u8], min: usize) -> Option<Vec<u8>> {
    let total = head.len() + tail.len();
    if total < min.max(16) {
        return None;
    }
    if looks_random(tail) {
        return None;
    }
    if tail.len() >= 2 * SAMPLE_LEN {
        // Probe the middle of big payloads first: random data fails fast.
        let mid = tail.len() / 2 - SAMPLE_LEN / 2;
        compress_if_pays(&tail[mid..mid + SAMPLE_LEN])?;
    }
    let mut input = Vec::with_capacity(total);
    input.extend_from_slice(head);
    input.extend_from_slice(tail);
    compress_if_pays(&input)
}

/// A cheap test for data lz4 cannot shrink (already compressed or
/// encrypted): 8 spans of 64 bytes spread over the payload holding at least
/// 200 distinct byte values. Random bytes give about 221, text 40 to 80.
fn looks_random(data: &[u8]) -> bool {
    const SPAN: usize = 64;
    if data.len() < 16 * SPAN {
        return false;
    }
    let step = (data.len() - SPAN) / 7;
    let mut seen = [0u64; 4];
    for k in 0..8 {
        for &b in &data[k * step..k * step + SPAN] {
            seen[usize::from(b >> 6)] |= 1 << (b & 63);
        }
    }
    seen.iter().map(|w| w.count_ones()).sum::<u32>() >= 200
}

fn compress_if_pays(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(input.len())];
    let n = lz4_flex::block::compress_into(input, &mut out).ok()?;
    if n == 0 || n > input.len() - input.len() / 8 {
        return None;
    }
    out.truncate(n);
    Some(out)
}

/// Encodes a whole frame in one buffer (tools, tests, fixtures).
pub fn encode_frame(
    salt: u64,
    lsn: Lsn,
    time_ns: i64,
    op: &Op<'_>,
    compress_min: usize,
) -> Result<Vec<u8>, CodecError> {
    let seed = crc_seed(salt);
    let body = PreparedBody::new(op, compress_min, seed)?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.stored_len());
    out.extend_from_slice(&body.header(seed, lsn, time_ns));
    for part in body.parts() {
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// Decodes the frame at the start of `bytes` written in a segment with
/// `salt`: checks length, CRC and body. Returns the record and frame length.
pub fn decode_frame(salt: u64, bytes: &[u8]) -> Result<(Record, usize), CodecError> {
    let (h, op, len) = decode_frame_ref(salt, bytes)?;
    Ok((
        Record {
            lsn: h.lsn,
            time_ns: h.time_ns,
            op: op.into_owned(),
        },
        len,
    ))
}

/// [`decode_frame`] borrowing the data of an uncompressed body from
/// `bytes`: the header, the op and the frame length.
pub fn decode_frame_ref(
    salt: u64,
    bytes: &[u8],
) -> Result<(FrameHeader, Op<'_>, usize), CodecError> {
    let h = FrameHeader::parse(bytes).ok_or(CodecError::Truncated("frame header"))?;
    h.check()?;
    let len = h.frame_len as usize;
    let stored = bytes
        .get(FRAME_HEADER_LEN..len)
        .ok_or(CodecError::Truncated("frame body"))?;
    if !crc_matches(crc_seed(salt), &h, stored) {
        return invalid("frame CRC mismatch");
    }
    let op = decode_stored_ref(&h, stored)?;
    Ok((h, op, len))
}

#[cfg(test)]
mod tests;
