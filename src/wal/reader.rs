//! The one segment scanner (used by recovery, the reader, `log verify` and the
//! shipper) and the read-only [`WalReader`] that iterates records across segments.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec::{self, FRAME_HEADER_LEN, FrameHeader};
use super::record::{Lsn, Record};
use super::segment::{self, HEADER_LEN, SegmentHeader, io_err};
use super::writer::WalError;

/// Bytes examined at a time while scanning for zeros or frames.
const CHUNK: usize = 1 << 20;
/// Read-ahead of the window: the first read after a jump (or a
/// [`SegmentScanner::refresh`]) takes this much, each sequential one twice
/// the last, up to [`READ_MAX`]: a live tail re-reads little, a backlog is
/// read in long runs.
const READ_MIN: usize = 256 << 10;
const READ_MAX: usize = 8 << 20;

/// What a scan learned about one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub first_lsn: Lsn,
    /// LSN of the last valid record; `first_lsn - 1` when the segment is empty.
    pub last_lsn: Lsn,
    pub records: u64,
    /// Offset just past the last valid record (the header counts as used).
    pub bytes_used: u64,
    /// Size of the file on disk (preallocated).
    pub file_len: u64,
    pub created_ns: i64,
    pub salt: u64,
}

/// How the records of a segment end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Only zeros follow the last valid record.
    Clean,
    /// Debris of an unfinished write in `[offset, end)` of the last segment:
    /// no valid frame follows it. Recovery zeros it; readers stop before it.
    Torn { offset: u64, end: u64 },
}

/// A positional reader that keeps a window of the file in memory. A read
/// past the window's end that starts inside it keeps the bytes it still
/// has (each byte of a sequential scan is read from the file once), and the
/// buffer is zeroed only when it grows.
struct ChunkReader {
    file: File,
    len: u64,
    /// `buf[..filled]` holds the file's bytes from `start`.
    buf: Vec<u8>,
    filled: usize,
    start: u64,
    /// Size of the next read (see [`READ_MIN`]).
    ahead: usize,
}

impl ChunkReader {
    fn new(file: File, len: u64) -> ChunkReader {
        ChunkReader {
            file,
            len,
            buf: Vec::new(),
            filled: 0,
            start: 0,
            ahead: READ_MIN,
        }
    }

    /// Up to `n` bytes at `off` (fewer at the end of the file).
    fn bytes(&mut self, off: u64, n: usize) -> io::Result<&[u8]> {
        let end = self.start + self.filled as u64;
        let want_end = off.saturating_add(n as u64).min(self.len);
        if off < self.start || want_end > end {
            self.fill(off, n)?;
        }
        let from = (off - self.start) as usize;
        let to = ((want_end.max(off) - self.start) as usize).min(self.filled);
        Ok(&self.buf[from.min(to)..to])
    }

    /// Forgets the window (a live writer may have changed what it shows).
    fn forget(&mut self) {
        self.filled = 0;
        self.start = 0;
        self.ahead = READ_MIN;
    }

    fn fill(&mut self, off: u64, n: usize) -> io::Result<()> {
        let end = self.start + self.filled as u64;
        let sequential = self.filled > 0 && off >= self.start && off <= end;
        self.ahead = if sequential {
            (self.ahead * 2).min(READ_MAX)
        } else {
            READ_MIN
        };
        let total = (n.max(self.ahead) as u64).min(self.len.saturating_sub(off)) as usize;
        // Bytes of the window at or after `off` (fewer than `n`: else no fill).
        let mut got = if sequential {
            let from = (off - self.start) as usize;
            self.buf.copy_within(from..self.filled, 0);
            self.filled - from
        } else {
            0
        };
        if self.buf.len() < total {
            self.buf.resize(total, 0);
        }
        self.start = off;
        self.filled = got;
        while got < total {
            match self
                .file
                .read_at(&mut self.buf[got..total], off + got as u64)
            {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.filled = got;
        }
        Ok(())
    }
}

/// Index of the first non-zero byte (zeros are skipped 64 bytes at a time:
/// the end of every segment is scanned this way).
fn first_nonzero(w: &[u8]) -> Option<usize> {
    let mut chunks = w.chunks_exact(64);
    let mut at = 0;
    for c in chunks.by_ref() {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            break;
        }
        at += 64;
    }
    w[at..].iter().position(|&b| b != 0).map(|i| at + i)
}

/// A validated frame found by [`SegmentScanner::next_frame`].
pub struct RawFrame<'a> {
    pub offset: u64,
    pub header: FrameHeader,
    pub stored: &'a [u8],
}

impl RawFrame<'_> {
    /// Decompresses and decodes the body (the CRC was already checked).
    pub fn decode(&self, path: &Path) -> Result<Record, WalError> {
        let op =
            codec::decode_stored(&self.header, self.stored).map_err(|e| WalError::Corrupt {
                path: path.to_path_buf(),
                offset: self.offset,
                reason: format!("record {} does not decode: {e}", self.header.lsn),
            })?;
        Ok(Record {
            lsn: self.header.lsn,
            time_ns: self.header.time_ns,
            op,
        })
    }
}

/// Walks the frames of one segment in order, checking each (length, CRC
/// seeded with the segment salt, LSN continuity), then classifies the end.
pub struct SegmentScanner {
    path: PathBuf,
    header: SegmentHeader,
    seed: u32,
    rd: ChunkReader,
    pos: u64,
    next_lsn: Lsn,
}

impl SegmentScanner {
    /// Opens a segment and checks its header and that it matches the file name.
    pub fn open(path: &Path) -> Result<SegmentScanner, WalError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut rd = ChunkReader::new(file, len);
        let corrupt = |reason: String| WalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason,
        };
        let raw = rd
            .bytes(0, HEADER_LEN as usize)
            .map_err(io_err("read", path))?;
        let header = SegmentHeader::decode(raw).map_err(corrupt)?;
        let named = path
            .file_name()
            .and_then(|n| segment::parse_segment_file_name(&n.to_string_lossy()));
        if named != Some(header.first_lsn) {
            return Err(corrupt(format!(
                "header says first LSN {} but the file name differs",
                header.first_lsn
            )));
        }
        let seed = codec::crc_seed(header.salt);
        Ok(SegmentScanner {
            path: path.to_path_buf(),
            header,
            seed,
            rd,
            pos: HEADER_LEN,
            next_lsn: header.first_lsn,
        })
    }

    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops the cached window so the next read sees what a live writer
    /// appended since (the shipper follows the WAL this way).
    pub fn refresh(&mut self) {
        self.rd.forget();
    }

    /// The CRC seed of this segment's frames (see `codec::crc_seed`).
    pub fn crc_seed(&self) -> u32 {
        self.seed
    }

    /// LSN the next valid frame must carry.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// Offset just past the last valid frame returned so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next valid frame, or `None` at the first offset that does not hold
    /// one (then call [`Self::classify_end`]). Errors are I/O errors only.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame<'_>>, WalError> {
        let (pos, lsn, seed) = (self.pos, self.next_lsn, self.seed);
        let Some(h) = self.frame_at(pos, lsn)? else {
            return Ok(None);
        };
        let stored_len = h.stored_len();
        let stored = self
            .rd
            .bytes(pos + FRAME_HEADER_LEN as u64, stored_len)
            .map_err(io_err("read", &self.path))?;
        if stored.len() < stored_len || !codec::crc_matches(seed, &h, stored) {
            return Ok(None);
        }
        self.pos = pos + u64::from(h.frame_len);
        self.next_lsn = lsn + 1;
        Ok(Some(RawFrame {
            offset: pos,
            header: h,
            stored,
        }))
    }

    /// Is a valid frame at the cursor? (The cursor does not move.)
    pub fn has_frame(&mut self) -> Result<bool, WalError> {
        let (pos, lsn) = (self.pos, self.next_lsn);
        let found = self.next_frame()?.is_some();
        self.pos = pos;
        self.next_lsn = lsn;
        Ok(found)
    }

    /// The next valid record, decoded; `None` like [`Self::next_frame`].
    /// (No per-record allocation beyond the record itself: the shipper's loop.)
    pub fn next_record(&mut self) -> Result<Option<Record>, WalError> {
        let Some((offset, header)) = self.next_frame()?.map(|f| (f.offset, f.header)) else {
            return Ok(None);
        };
        let stored = self
            .rd
            .bytes(offset + FRAME_HEADER_LEN as u64, header.stored_len())
            .map_err(io_err("read", &self.path))?;
        let op = codec::decode_stored(&header, stored).map_err(|e| WalError::Corrupt {
            path: self.path.clone(),
            offset,
            reason: format!("record {} does not decode: {e}", header.lsn),
        })?;
        Ok(Some(Record {
            lsn: header.lsn,
            time_ns: header.time_ns,
            op,
        }))
    }

    /// A structurally plausible header at `off` carrying `lsn`, if any.
    fn frame_at(&mut self, off: u64, lsn: Lsn) -> Result<Option<FrameHeader>, WalError> {
        let raw = self
            .rd
            .bytes(off, FRAME_HEADER_LEN)
            .map_err(io_err("read", &self.path))?;
        let Some(h) = FrameHeader::parse(raw) else {
            return Ok(None);
        };
        let ok = h.lsn == lsn && h.check().is_ok() && off + u64::from(h.frame_len) <= self.rd.len;
        Ok(ok.then_some(h))
    }

    /// After `next_frame` returned `None`: only zeros follow (clean), or the
    /// debris of a torn write in the `last` segment (no valid frame after it),
    /// or corruption, reported with this segment's path and the offset.
    /// `Clean` is also the answer when a live writer completed the frame
    /// meanwhile: the data seen ends here, the next scan continues.
    pub fn classify_end(&mut self, last: bool) -> Result<SegmentEnd, WalError> {
        let x = self.pos;
        let Some(first_nz) = self.nonzero(x, true)? else {
            return Ok(SegmentEnd::Clean);
        };
        if !last {
            let why = self.diagnose(x, first_nz)?;
            return Err(self.corrupt(x, why));
        }
        if let Some(y) = self.find_valid_frame(x + 1)? {
            // A live writer may have finished the frame at `x` meanwhile (the
            // reader takes no lock): read it again before crying corruption.
            self.rd.forget();
            if self.frame_at(x, self.next_lsn)?.is_some() && self.next_frame()?.is_some() {
                self.pos = x;
                self.next_lsn -= 1;
                return Ok(SegmentEnd::Clean);
            }
            let why = format!(
                "{}; a valid record follows at offset {y}",
                self.diagnose(x, first_nz)?
            );
            return Err(self.corrupt(x, why));
        }
        let end = self.nonzero(x, false)?.map_or(x, |last_nz| last_nz + 1);
        Ok(SegmentEnd::Torn { offset: x, end })
    }

    /// After [`Self::classify_end`] reported damage at [`Self::position`]:
    /// moves to the next frame of this segment that fully validates (right
    /// salt, LSN at or after the expected one) and returns its offset and
    /// LSN, or `None` when none follows. `log verify` resynchronises this way
    /// to report every run of damage; [`Self::info`] is not meaningful after.
    pub fn skip_damage(&mut self) -> Result<Option<(u64, Lsn)>, WalError> {
        let Some(at) = self.find_valid_frame(self.pos + 1)? else {
            return Ok(None);
        };
        let raw = self
            .rd
            .bytes(at, FRAME_HEADER_LEN)
            .map_err(io_err("read", &self.path))?;
        let Some(h) = FrameHeader::parse(raw) else {
            return Ok(None);
        };
        self.pos = at;
        self.next_lsn = h.lsn;
        Ok(Some((at, h.lsn)))
    }

    /// First (or last) non-zero byte at or after `from`.
    fn nonzero(&mut self, from: u64, first: bool) -> Result<Option<u64>, WalError> {
        let mut off = from;
        let mut found = None;
        while off < self.rd.len {
            let w = self
                .rd
                .bytes(off, CHUNK)
                .map_err(io_err("read", &self.path))?;
            if w.is_empty() {
                break;
            }
            let hit = if first {
                first_nonzero(w)
            } else {
                w.iter().rposition(|&b| b != 0)
            };
            if let Some(i) = hit {
                found = Some(off + i as u64);
                if first {
                    break;
                }
            }
            off += w.len() as u64;
        }
        Ok(found)
    }

    /// Offset of a frame at or after `from` that fully validates in this
    /// segment with an LSN at or after the expected one.
    fn find_valid_frame(&mut self, from: u64) -> Result<Option<u64>, WalError> {
        let mut off = from;
        while off + FRAME_HEADER_LEN as u64 <= self.rd.len {
            let w = self
                .rd
                .bytes(off, CHUNK + FRAME_HEADER_LEN)
                .map_err(io_err("read", &self.path))?;
            let span = w.len().saturating_sub(FRAME_HEADER_LEN - 1).clamp(1, CHUNK);
            let mut candidates: Vec<(u64, FrameHeader)> = Vec::new();
            let mut i = 0;
            while i < span {
                // No frame has a zero length: skip the zeros of a preallocated
                // tail without parsing a header at every offset.
                match w[i..].iter().position(|&b| b != 0) {
                    None => break,
                    Some(k) if k > 3 => i += k - 3,
                    Some(_) => {}
                }
                if i >= span {
                    break;
                }
                if let Some(h) = FrameHeader::parse(&w[i..])
                    && h.lsn >= self.next_lsn
                    && h.lsn - self.next_lsn < (1 << 32)
                    && h.check().is_ok()
                {
                    candidates.push((off + i as u64, h));
                }
                i += 1;
            }
            for (at, h) in candidates {
                let stored = self
                    .rd
                    .bytes(at + FRAME_HEADER_LEN as u64, h.stored_len())
                    .map_err(io_err("read", &self.path))?;
                if stored.len() == h.stored_len() && codec::crc_matches(self.seed, &h, stored) {
                    return Ok(Some(at));
                }
            }
            off += span as u64;
        }
        Ok(None)
    }

    /// Why the bytes at `x` are not the next record.
    fn diagnose(&mut self, x: u64, first_nz: u64) -> Result<String, WalError> {
        let raw = self
            .rd
            .bytes(x, FRAME_HEADER_LEN)
            .map_err(io_err("read", &self.path))?;
        let Some(h) = FrameHeader::parse(raw) else {
            return Ok(format!(
                "{} stray bytes at the end of the file",
                self.rd.len - x
            ));
        };
        Ok(if h.frame_len == 0 {
            format!("end-of-records marker followed by data at offset {first_nz}")
        } else if let Err(e) = h.check() {
            format!("bad frame header: {e}")
        } else if h.lsn != self.next_lsn {
            format!("expected LSN {}, found {}", self.next_lsn, h.lsn)
        } else if x + u64::from(h.frame_len) > self.rd.len {
            format!(
                "frame of {} bytes runs past the end of the file",
                h.frame_len
            )
        } else {
            format!("CRC mismatch in record {}", h.lsn)
        })
    }

    fn corrupt(&self, offset: u64, reason: String) -> WalError {
        WalError::Corrupt {
            path: self.path.clone(),
            offset,
            reason,
        }
    }

    /// Summary of what was scanned so far.
    pub fn info(&self) -> SegmentInfo {
        SegmentInfo {
            path: self.path.clone(),
            first_lsn: self.header.first_lsn,
            last_lsn: self.next_lsn - 1,
            records: self.next_lsn - self.header.first_lsn,
            bytes_used: self.pos,
            file_len: self.rd.len,
            created_ns: self.header.created_ns,
            salt: self.header.salt,
        }
    }

    /// Scans every frame to the end and classifies it.
    pub fn scan_all(&mut self, last: bool) -> Result<SegmentEnd, WalError> {
        while self.next_frame()?.is_some() {}
        self.classify_end(last)
    }
}

/// Checks that `next` starts right after `prev` ends.
pub fn check_continuity(prev: &SegmentInfo, next: &Path, next_first: Lsn) -> Result<(), WalError> {
    if prev.last_lsn + 1 == next_first {
        return Ok(());
    }
    Err(WalError::Gap {
        prev: prev.path.clone(),
        prev_last: prev.last_lsn,
        next: next.to_path_buf(),
        next_first,
    })
}

/// Read-only access to the WAL of a state dir; safe while a mount writes it.
pub struct WalReader {
    dir: PathBuf,
}

impl WalReader {
    /// Opens `STATE/wal` without taking the writer's lock.
    pub fn open(state_dir: &Path) -> Result<WalReader, WalError> {
        let dir = segment::wal_dir(state_dir);
        std::fs::metadata(&dir).map_err(io_err("open WAL directory", &dir))?;
        Ok(WalReader { dir })
    }

    /// Scans every segment (same checks as recovery, nothing is modified).
    pub fn segments(&self) -> Result<Vec<SegmentInfo>, WalError> {
        let list = segment::list_segments(&self.dir)?;
        let mut out: Vec<SegmentInfo> = Vec::with_capacity(list.len());
        for (i, (_, path)) in list.iter().enumerate() {
            let mut sc = SegmentScanner::open(path)?;
            if let Some(prev) = out.last() {
                check_continuity(prev, path, sc.header().first_lsn)?;
            }
            sc.scan_all(i + 1 == list.len())?;
            out.push(sc.info());
        }
        Ok(out)
    }

    /// Records with LSN >= `lsn` in order, across segments. `0` means from
    /// the oldest retained record; an older LSN that was retired yields one
    /// [`WalError::NotRetained`]. Stops at the end of valid data in the last
    /// segment (a torn tail is not an error here); on corruption yields one
    /// error naming segment and offset, then ends.
    pub fn iter_from(&self, lsn: Lsn) -> RecordIter {
        self.iter_range(lsn, Lsn::MAX)
    }

    /// Like [`Self::iter_from`] but ends after record `to` without looking
    /// further: the cheap way to follow a live WAL up to its head LSN.
    pub fn iter_range(&self, from: Lsn, to: Lsn) -> RecordIter {
        RecordIter {
            dir: self.dir.clone(),
            segs: None,
            idx: 0,
            scanner: None,
            from,
            to,
            done: false,
        }
    }

    /// Checks the whole log; every problem found (at most one per run of
    /// damage, since scanning stops at the first) is returned.
    pub fn verify(&self) -> Vec<WalError> {
        self.iter_from(0).filter_map(Result::err).collect()
    }
}

/// Iterator returned by [`WalReader::iter_from`].
pub struct RecordIter {
    dir: PathBuf,
    segs: Option<Vec<(Lsn, PathBuf)>>,
    idx: usize,
    scanner: Option<SegmentScanner>,
    from: Lsn,
    to: Lsn,
    done: bool,
}

impl RecordIter {
    /// Lists the segments and picks the one holding `from`.
    fn start(&mut self) -> Result<(), WalError> {
        let segs = segment::list_segments(&self.dir)?;
        let oldest = segs.first().map_or(1, |s| s.0);
        if self.from == 0 {
            self.from = oldest;
        } else if self.from < oldest {
            return Err(WalError::NotRetained {
                lsn: self.from,
                oldest,
            });
        }
        self.idx = segs.iter().rposition(|s| s.0 <= self.from).unwrap_or(0);
        self.segs = Some(segs);
        Ok(())
    }

    /// The next record at or past `from` (None at the end).
    fn step(&mut self) -> Result<Option<Record>, WalError> {
        if self.segs.is_none() {
            self.start()?;
        }
        loop {
            let segs = self.segs.as_deref().unwrap_or_default();
            let Some((_, path)) = segs.get(self.idx) else {
                return Ok(None);
            };
            let last = self.idx + 1 == segs.len();
            let next_first = segs.get(self.idx + 1).map(|s| s.1.clone());
            let sc = match &mut self.scanner {
                Some(sc) => sc,
                None => self.scanner.insert(SegmentScanner::open(path)?),
            };
            if sc.next_lsn() > self.to {
                return Ok(None);
            }
            if let Some(f) = sc.next_frame()? {
                if f.header.lsn < self.from {
                    continue;
                }
                return f.decode(path).map(Some);
            }
            sc.classify_end(last)?;
            let Some(next) = next_first else {
                return Ok(None);
            };
            let info = sc.info();
            let next_sc = SegmentScanner::open(&next)?;
            check_continuity(&info, &next, next_sc.header().first_lsn)?;
            self.scanner = Some(next_sc);
            self.idx += 1;
        }
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step().transpose();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

#[cfg(test)]
mod tests;
