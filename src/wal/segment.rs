//! Segment files: names, the versioned header, creation from a preallocated
//! spare, and the small file-system helpers (fsync of the directory, zeroing).
//!
//! A segment is `STATE/wal/{first_lsn:020}.wal`, preallocated to the
//! configured size; frames follow the header and the unwritten tail is zeros.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::Lsn;
use super::writer::WalError;

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"RPLFSWAL";
/// The segment format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of a version-1 header; frames start right after it.
pub const HEADER_LEN: u64 = 64;
/// The preallocated segment kept in reserve until the current one is full.
pub const SPARE_NAME: &str = "spare.tmp";
const SEGMENT_SUFFIX: &str = ".wal";
const LSN_DIGITS: usize = 20;

/// `STATE/wal`: where the segments live.
pub fn wal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("wal")
}

/// The file name of the segment whose first record is `first_lsn`.
pub fn segment_file_name(first_lsn: Lsn) -> String {
    format!("{first_lsn:0width$}{SEGMENT_SUFFIX}", width = LSN_DIGITS)
}

/// The inverse of [`segment_file_name`]: `Some(first_lsn)` for segment names only.
pub fn parse_segment_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != LSN_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Builds a [`WalError::Io`] naming the operation and the file.
pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalError + 'a {
    move |err| WalError::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

/// The segments in `dir`, sorted by first LSN. Other files are ignored
/// (with a warning, except the spare and the lock).
pub fn list_segments(dir: &Path) -> Result<Vec<(Lsn, PathBuf)>, WalError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match parse_segment_file_name(&name) {
            Some(lsn) => out.push((lsn, entry.path())),
            None if name == SPARE_NAME => {}
            None => log::warn!(
                "ignoring unexpected file {} in the WAL directory",
                entry.path().display()
            ),
        }
    }
    out.sort();
    Ok(out)
}

/// The fixed header at offset 0 of every segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u16,
    pub header_len: u16,
    pub first_lsn: Lsn,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: i64,
    /// Random per-segment value seeding every frame CRC.
    pub salt: u64,
}

impl SegmentHeader {
    pub fn new(first_lsn: Lsn) -> SegmentHeader {
        SegmentHeader {
            version: FORMAT_VERSION,
            header_len: HEADER_LEN as u16,
            first_lsn,
            created_ns: now_ns(),
            salt: new_salt(),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&self.header_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a header; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        let Some(b) = b.get(..HEADER_LEN as usize) else {
            return Err(format!("file shorter than the {HEADER_LEN}-byte header"));
        };
        if b[0..8] != MAGIC {
            return Err("not a replfs WAL segment (bad magic)".into());
        }
        let le64 = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let crc = u32::from_le_bytes([b[60], b[61], b[62], b[63]]);
        if crc != crc32c::crc32c(&b[..60]) {
            return Err("segment header CRC mismatch".into());
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(format!(
                "unsupported format version {version} (this build reads {FORMAT_VERSION})"
            ));
        }
        let header_len = u16::from_le_bytes([b[10], b[11]]);
        if u64::from(header_len) != HEADER_LEN {
            return Err(format!(
                "header length {header_len} (version 1 has {HEADER_LEN})"
            ));
        }
        let (first_lsn, created_ns, salt) = (le64(16), le64(24) as i64, le64(32));
        if first_lsn == 0 {
            return Err("first LSN 0".into());
        }
        Ok(SegmentHeader {
            version,
            header_len,
            first_lsn,
            created_ns,
            salt,
        })
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_nanos().min(i64::MAX as u128) as i64
}

/// A random salt from the kernel; falls back to time and pid mixing.
pub fn new_salt() -> u64 {
    let mut v = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte `v`.
    let n = unsafe { libc::getrandom((&raw mut v).cast(), 8, 0) };
    if n != 8 {
        v = (now_ns() as u64).rotate_left(17)
            ^ u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    v
}

/// Preallocates `len` bytes to `file` (`fallocate`, so ENOSPC shows up now, not on append).
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    loop {
        // SAFETY: plain syscall on a file descriptor we own.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Creates `wal_dir/spare.tmp` holding `size` bytes of zeros. Preallocated
/// (`fallocate`: instant, but the extents stay "unwritten", so every later
/// fdatasync of a record in them also writes the extent conversion: a
/// journal commit, or the inode and extent blocks), or with `zero_fill` written out as zeros and
/// flushed here, off the write path, so a later fdatasync only flushes data.
/// On failure the partial file is removed so it holds no space.
pub fn create_spare(wal_dir: &Path, size: u64, zero_fill: bool) -> Result<File, WalError> {
    let path = wal_dir.join(SPARE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    let made = if zero_fill {
        write_zeros(&file, 0, size).and_then(|()| file.sync_data())
    } else {
        preallocate(&file, size)
    };
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(io_err("preallocate", &path)(e));
    }
    Ok(file)
}

/// Writes zeros over `[from, to)`.
pub fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut off = from;
    while off < to {
        let n = (to - off).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Puts the spare into use as the segment starting at `header.first_lsn`:
/// writes the header, then renames it to its final name. The caller fsyncs
/// the directory before any record in it counts as durable.
pub fn activate_spare(
    spare: &File,
    wal_dir: &Path,
    header: &SegmentHeader,
) -> Result<PathBuf, WalError> {
    let from = wal_dir.join(SPARE_NAME);
    spare
        .write_all_at(&header.encode(), 0)
        .map_err(io_err("write header", &from))?;
    let to = wal_dir.join(segment_file_name(header.first_lsn));
    std::fs::rename(&from, &to).map_err(io_err("rename spare", &to))?;
    Ok(to)
}

/// fsync of a directory, so created, renamed and deleted entries persist.
pub fn fsync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Writes zeros over `[from, to)` and makes them durable (cutting a torn tail).
pub fn zero_range(file: &File, path: &Path, from: u64, to: u64) -> Result<(), WalError> {
    write_zeros(file, from, to).map_err(io_err("zero torn tail", path))?;
    file.sync_data().map_err(io_err("fdatasync", path))
}
/// Opens a segment for reading and appending.
pub fn open_rw(path: &Path) -> Result<File, WalError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_and_reject_others() {
        for lsn in [1, 42, u64::MAX] {
            let name = segment_file_name(lsn);
            assert_eq!(name.len(), 24);
            assert_eq!(parse_segment_file_name(&name), Some(lsn));
        }
        assert_eq!(segment_file_name(7), "00000000000000000007.wal");
        for bad in [
            "7.wal",
            "0000000000000000000x.wal",
            "00000000000000000007.wa",
            SPARE_NAME,
            "99999999999999999999.wal",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_roundtrips_and_detects_damage() {
        let h = SegmentHeader::new(1234);
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        for i in 0..b.len() {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(SegmentHeader::decode(&d).is_err(), "byte {i}");
        }
        assert!(SegmentHeader::decode(&b[..63]).is_err());
        assert_ne!(SegmentHeader::new(1).salt, SegmentHeader::new(1).salt);
    }
}
