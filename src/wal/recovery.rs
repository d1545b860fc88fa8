//! Recovery policy at open: scan every segment with the one scanner, check
//! LSN continuity, cut a torn tail of the last segment, fail on corruption,
//! and bring the catalog in step with the disk (the disk is the truth).

use std::path::{Path, PathBuf};

use super::reader::{SegmentEnd, SegmentInfo, SegmentScanner, check_continuity};
use super::record::Lsn;
use super::segment::{self, io_err};
use super::writer::WalError;
use crate::catalog::{Catalog, SegmentRow};

/// What recovery found; the writer continues after the last valid record.
pub(crate) struct Recovered {
    pub segments: Vec<SegmentInfo>,
    pub truncated_tail: Option<(PathBuf, u64, u64)>,
    pub removed: Vec<PathBuf>,
    pub repairs: Vec<String>,
}

/// Scans `dir` and repairs what a crash can leave behind.
pub(crate) fn recover(dir: &Path, catalog: &Catalog) -> Result<Recovered, WalError> {
    let mut list = segment::list_segments(dir)?;
    let removed = drop_unborn_last(dir, &mut list)?;
    let (segments, truncated_tail) = scan_segments(&list)?;
    let repairs = reconcile(dir, catalog, &segments)?;
    Ok(Recovered {
        segments,
        truncated_tail,
        removed,
        repairs,
    })
}

/// Removes a last segment that is all zeros: renamed into place but its
/// header never reached the disk, so no record in it was ever durable.
fn drop_unborn_last(dir: &Path, list: &mut Vec<(Lsn, PathBuf)>) -> Result<Vec<PathBuf>, WalError> {
    let Some((_, path)) = list.last() else {
        return Ok(Vec::new());
    };
    if !is_all_zero(path)? {
        return Ok(Vec::new());
    }
    log::warn!(
        "removing WAL segment {} whose creation never completed",
        path.display()
    );
    std::fs::remove_file(path).map_err(io_err("remove", path))?;
    segment::fsync_dir(dir)?;
    let path = path.clone();
    list.pop();
    Ok(vec![path])
}

type Cut = Option<(PathBuf, u64, u64)>;

/// Scans every segment in order, checking continuity; cuts a torn tail of the last.
fn scan_segments(list: &[(Lsn, PathBuf)]) -> Result<(Vec<SegmentInfo>, Cut), WalError> {
    let mut segments: Vec<SegmentInfo> = Vec::with_capacity(list.len());
    let mut cut = None;
    for (i, (_, path)) in list.iter().enumerate() {
        let mut sc = SegmentScanner::open(path)?;
        if let Some(prev) = segments.last() {
            check_continuity(prev, path, sc.header().first_lsn)?;
        }
        if let SegmentEnd::Torn { offset, end } = sc.scan_all(i + 1 == list.len())? {
            let file = segment::open_rw(path)?;
            segment::zero_range(&file, path, offset, end)?;
            log::warn!(
                "cut a torn WAL tail: {} bytes at offset {offset} of {}",
                end - offset,
                path.display()
            );
            cut = Some((path.clone(), offset, end - offset));
        }
        segments.push(sc.info());
    }
    Ok((segments, cut))
}

/// True when every byte of the file is zero.
fn is_all_zero(path: &Path) -> Result<bool, WalError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(io_err("open", path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = file.read_at(&mut buf, off).map_err(io_err("read", path))?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        off += n as u64;
    }
}

/// The catalog row describing a scanned segment (`last` = still current).
fn row_for(info: &SegmentInfo, last: bool) -> SegmentRow {
    SegmentRow {
        first_lsn: info.first_lsn,
        file_name: segment::segment_file_name(info.first_lsn),
        created_ns: info.created_ns,
        last_lsn: (!last).then_some(info.last_lsn),
        bytes: info.bytes_used,
    }
}

/// Makes the catalog list exactly the segments on disk (the disk is the
/// truth); every repair is returned and logged as a warning.
fn reconcile(dir: &Path, cat: &Catalog, disk: &[SegmentInfo]) -> Result<Vec<String>, WalError> {
    let rows = cat.segments()?;
    let mut notes = drop_missing_rows(dir, cat, &rows, disk)?;
    notes.extend(update_rows(cat, &rows, disk)?);
    for n in &notes {
        log::warn!("{n}");
    }
    Ok(notes)
}

/// Rows whose file is gone: before the first segment (retired) or after the
/// last (never durable) they are dropped; in the middle it is an error.
fn drop_missing_rows(
    dir: &Path,
    cat: &Catalog,
    rows: &[SegmentRow],
    disk: &[SegmentInfo],
) -> Result<Vec<String>, WalError> {
    let mut notes = Vec::new();
    let missing = rows
        .iter()
        .filter(|r| !disk.iter().any(|d| d.first_lsn == r.first_lsn));
    for row in missing {
        let path = dir.join(&row.file_name);
        let (Some(first), Some(last)) = (disk.first(), disk.last()) else {
            let detail = format!(
                "the catalog lists {} segment(s) and the WAL directory has none",
                rows.len()
            );
            return Err(WalError::MissingSegment { path, detail });
        };
        let (first, last) = (first.first_lsn, last.first_lsn);
        if row.first_lsn > first && row.first_lsn < last {
            let detail = format!("it lies between segments {first} and {last} that are on disk");
            return Err(WalError::MissingSegment { path, detail });
        }
        let why = if row.first_lsn < first {
            "retired"
        } else {
            "never became durable"
        };
        notes.push(format!(
            "catalog listed missing segment {} ({why}); entry removed",
            path.display()
        ));
        cat.remove_segment(row.first_lsn)?;
    }
    Ok(notes)
}

/// Adds or corrects the row of every segment on disk.
fn update_rows(
    cat: &Catalog,
    rows: &[SegmentRow],
    disk: &[SegmentInfo],
) -> Result<Vec<String>, WalError> {
    let mut notes = Vec::new();
    for (i, info) in disk.iter().enumerate() {
        let want = row_for(info, i + 1 == disk.len());
        match rows.iter().find(|r| r.first_lsn == info.first_lsn) {
            None => notes.push(format!(
                "segment {} was not in the catalog; added",
                info.path.display()
            )),
            Some(r) if r.last_lsn.is_some() && r.last_lsn != want.last_lsn => notes.push(format!(
                "catalog said segment {} ends at LSN {:?}, the disk says {}; catalog updated",
                info.path.display(),
                r.last_lsn,
                info.last_lsn
            )),
            Some(r) if *r == want => continue,
            Some(_) => {}
        }
        cat.put_segment(&want)?;
    }
    Ok(notes)
}
