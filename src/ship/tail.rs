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
        self.read_next(|s| s.next_record())
    }

    /// The next frame (checked like [`Tail::next_record`]'s, not decoded),
    /// handed to `f` with its segment's CRC seed while it is borrowed from
    /// the read window; `None` when none is written yet.
    pub fn next_frame_with<R>(
        &mut self,
        f: impl FnOnce(&RawFrame<'_>, u32) -> R,
    ) -> Result<Option<R>, WalError> {
        let mut f = Some(f);
        self.read_next(|s| {
            let seed = s.crc_seed();
            Ok(s.next_frame()?
                .and_then(|frame| f.take().map(|f| f(&frame, seed))))
        })
    }

    /// `read` at the cursor, across segment ends; at the end of the data it
    /// looks once more after refreshing the window (see `next_segment`).
    fn read_next<R>(
        &mut self,
        mut read: impl FnMut(&mut SegmentScanner) -> Result<Option<R>, WalError>,
    ) -> Result<Option<R>, WalError> {
        let mut refreshed = false;
        loop {
            if let Some(r) = read(&mut self.scanner)? {
                return Ok(Some(r));
            }
            if !self.next_segment()? {
                if refreshed {
                    return Ok(None);
                }
                refreshed = true;
            }
        }
    }

    /// At the end of the data in this segment: moves to the next segment if
    /// the writer has made it (true), else refreshes the window (false).
    /// The window read ahead may predate the writer's latest frames (it
    /// shows the preallocated zeros that were there), so the callers look
    /// once more after a refresh before they report that nothing is
    /// written: a record made durable since the last look is found at the
    /// first call, not at the next one (the shipper may only come back
    /// when an ack arrives).
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::config::{Durability, WalConfig};
    use crate::wal::{Attr, Op, Wal};

    fn op(i: u64) -> Op<'static> {
        Op::Write {
            path: b"f".to_vec(),
            offset: i * 10,
            data: Cow::Owned(vec![i as u8; 10]),
            attr: Attr::default(),
        }
    }

    /// The read window holds the zeros after the last frame read; a frame
    /// written after that is found at the first call, not the second.
    #[test]
    fn a_frame_written_after_the_window_was_read_is_found_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig {
            durability: Durability::Os,
            segment_size: 4 << 20,
            ..WalConfig::default()
        };
        let (wal, _) = Wal::open(dir.path(), &cfg).unwrap();
        wal.append(&op(1)).unwrap();
        let mut tail = Tail::open(dir.path(), 1).unwrap();
        for i in 2..6 {
            let got = tail.next_frame_with(|f, _| f.header.lsn).unwrap();
            assert_eq!(got, Some(i - 1));
            wal.append(&op(i)).unwrap();
        }
        for i in 6..10 {
            let got = tail.next_record().unwrap().map(|r| r.lsn);
            assert_eq!(got, Some(i - 1));
            wal.append(&op(i)).unwrap();
        }
        assert_eq!(tail.next_record().unwrap().map(|r| r.lsn), Some(9));
        assert!(tail.next_record().unwrap().is_none());
        assert!(tail.next_frame_with(|_, _| ()).unwrap().is_none());
    }
}
