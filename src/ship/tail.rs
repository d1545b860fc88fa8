//! Follows a live WAL from a position: the shipper's reader. Built on the one
//! segment scanner, so it checks every frame exactly as recovery does.

use std::path::{Path, PathBuf};

use crate::wal::reader::{RawFrame, SegmentEnd, SegmentScanner};
use crate::wal::segment::{self, list_segments};
use crate::wal::{Lsn, Record, WalError};

/// A cursor on the WAL that yields records in LSN order and, at the end of
/// the written data, waits for the writer instead of treating it as the end.
pub struct Tail {
    dir: PathBuf,
    scanner: SegmentScanner,
}

impl Tail {
    /// Positions the cursor on record `from`. Fails with
    /// [`WalError::NotRetained`] when that record was already retired.
    pub fn open(state: &Path, from: Lsn) -> Result<Tail, WalError> {
        let dir = segment::wal_dir(state);
        let segs = list_segments(&dir)?;
        let oldest = segs.first().map(|(l, _)| *l).unwrap_or(1);
        if from < oldest {
            return Err(WalError::NotRetained { lsn: from, oldest });
        }
        let (_, path) = segs
            .iter()
            .rev()
            .find(|(first, _)| *first <= from)
            .ok_or(WalError::NotRetained { lsn: from, oldest })?;
        let mut scanner = SegmentScanner::open(path)?;
        while scanner.next_lsn() < from {
            if scanner.next_frame()?.is_none() {
                // `from` is not written yet: wait at the end of the data.
                scanner.refresh();
                break;
            }
        }
        Ok(Tail { dir, scanner })
    }

    /// LSN of the next record this cursor yields.
    pub fn next_lsn(&self) -> Lsn {
        self.scanner.next_lsn()
    }

    /// Records up to `durable` are complete. If the cursor still finds none
    /// at its position and the bytes there are debris rather than the clean
    /// end of a segment (a roll, or a frame a live writer just finished), the
    /// log is damaged: the error names the segment and offset.
    pub fn check_stuck(&mut self, durable: Lsn) -> Result<(), WalError> {
        if durable < self.next_lsn() {
            return Ok(());
        }
        self.scanner.refresh();
        match self.scanner.classify_end(true)? {
            SegmentEnd::Clean => Ok(()),
            SegmentEnd::Torn { offset, .. } => Err(WalError::Corrupt {
                path: self.scanner.path().to_path_buf(),
                offset,
                reason: format!("record {} is durable but cannot be read", self.next_lsn()),
            }),
        }
    }

    /// The segment the cursor is in (for messages).
    pub fn segment_path(&self) -> &Path {
        self.scanner.path()
    }

    /// The next record, or `None` when none is written yet.
    pub fn next_record(&mut self) -> Result<Option<Record>, WalError> {
        loop {
            if let Some(rec) = self.scanner.next_record()? {
                return Ok(Some(rec));
            }
            if !self.next_segment()? {
                return Ok(None);
            }
        }
    }

    /// The next frame (checked like [`Tail::next_record`]'s, not decoded),
    /// handed to `f` with its segment's CRC seed while it is borrowed from
    /// the read window; `None` when none is written yet.
    pub fn next_frame_with<R>(
        &mut self,
        f: impl FnOnce(&RawFrame<'_>, u32) -> R,
    ) -> Result<Option<R>, WalError> {
        loop {
            let seed = self.scanner.crc_seed();
            if let Some(frame) = self.scanner.next_frame()? {
                return Ok(Some(f(&frame, seed)));
            }
            if !self.next_segment()? {
                return Ok(None);
            }
        }
    }

    /// At the end of the data in this segment: moves to the next segment if
    /// the writer has made it (true), else refreshes the window (false).
    fn next_segment(&mut self) -> Result<bool, WalError> {
        // End of data here: the writer may have moved to the next segment.
        let next = self
            .dir
            .join(segment::segment_file_name(self.scanner.next_lsn()));
        if next.exists() && next != self.scanner.path() {
            // The writer finished this segment before it made the next
            // one: read its end again (the window may predate it), then
            // it must end cleanly before the next one takes over.
            self.scanner.refresh();
            if self.scanner.has_frame()? {
                return Ok(true);
            }
            self.scanner.classify_end(false)?;
            self.scanner = SegmentScanner::open(&next)?;
            return Ok(true);
        }
        self.scanner.refresh();
        Ok(false)
    }
}
