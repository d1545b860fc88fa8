//! Payloads of the sync messages (protocol v2): baseline/delta sync and
//! verify. Layouts are tables in `docs/protocol.md` ("Sync messages").

use super::{ProtoError, malformed};
use crate::wal::codec::validate_path;

/// Length of one block checksum in a SUMS message (BLAKE3, truncated).
pub const SUM_LEN: usize = 16;
/// Smallest and largest block of a SUMS request.
pub const MIN_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 64 << 20;
/// Most checksums in one SUMS message (16 MiB of them).
pub const MAX_SUMS: usize = 1 << 20;
/// Longest source id (a volume's pairing identity).
pub const MAX_SOURCE_ID_LEN: usize = 64;

/// A cursor over a payload that never reads past its end.
pub(crate) struct Cur<'a> {
    p: &'a [u8],
    what: &'static str,
}

impl<'a> Cur<'a> {
    pub fn new(p: &'a [u8], what: &'static str) -> Self {
        Cur { p, what }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.p.len() < n {
            return malformed(format!("{} payload cut short", self.what));
        }
        let (a, b) = self.p.split_at(n);
        self.p = b;
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }

    pub fn i64(&mut self) -> Result<i64, ProtoError> {
        Ok(self.u64()? as i64)
    }

    /// A `u16`-length-prefixed byte string.
    pub fn bytes16(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// A `u16`-length-prefixed volume path, validated like record paths.
    pub fn path(&mut self) -> Result<Vec<u8>, ProtoError> {
        let p = self.bytes16()?;
        validate_path(p).map_err(|e| ProtoError::Malformed(format!("{}: {e}", self.what)))?;
        Ok(p.to_vec())
    }

    pub fn rest(&self) -> &'a [u8] {
        self.p
    }

    pub fn end(&self) -> Result<(), ProtoError> {
        if self.p.is_empty() {
            Ok(())
        } else {
            malformed(format!(
                "{} bytes after the end of a {} payload",
                self.p.len(),
                self.what
            ))
        }
    }
}

/// Appends a `u16`-length-prefixed byte string (the caller keeps it short).
pub(crate) fn put16(out: &mut Vec<u8>, b: &[u8]) -> Result<(), ProtoError> {
    let n = u16::try_from(b.len())
        .map_err(|_| ProtoError::Encode(format!("{} bytes in a u16 field", b.len())))?;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

pub(super) fn put_source(out: &mut Vec<u8>, id: &str) -> Result<(), ProtoError> {
    if id.len() > MAX_SOURCE_ID_LEN {
        return Err(ProtoError::Encode(format!(
            "source id of {} bytes",
            id.len()
        )));
    }
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
    Ok(())
}

pub(super) fn get_source(c: &mut Cur<'_>) -> Result<String, ProtoError> {
    let n = c.u8()? as usize;
    if n > MAX_SOURCE_ID_LEN {
        return malformed(format!("source id of {n} bytes"));
    }
    let b = c.take(n)?;
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
    {
        return malformed("source id with characters outside [A-Za-z0-9._-]");
    }
    Ok(String::from_utf8_lossy(b).into_owned())
}

pub(super) fn check_block(block: u32) -> Result<(), ProtoError> {
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&block) || !block.is_power_of_two() {
        return malformed(format!(
            "block size {block} (a power of two in {MIN_BLOCK}..={MAX_BLOCK})"
        ));
    }
    Ok(())
}
