//! Opening the writer: the state-dir lock, recovery, and positioning the
//! log after the last valid record (or creating the first segment).

use super::*;

pub(super) fn lock_state(state_dir: &Path) -> Result<File, WalError> {
    let path = state_dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(WalError::Locked(state_dir.to_path_buf()));
        }
        return Err(io_err("lock", &path)(e));
    }
    Ok(f)
}

/// Runs recovery and positions the log after the last valid record.
pub(super) fn recover_log(
    dir: &Path,
    cfg: &WalConfig,
    catalog: &Catalog,
) -> Result<(Log, RecoveryReport), WalError> {
    let unclean = catalog.clean_shutdown()?;
    let rec = recovery::recover(dir, catalog)?;
    let (seg, off, next_lsn) = match rec.segments.last() {
        Some(last) => reopen_last(last, cfg)?,
        None => create_first(dir, cfg, catalog)?,
    };
    catalog.set_clean_shutdown(false)?;
    catalog.set(
        crate::catalog::KEY_FORMAT_VERSION,
        &segment::FORMAT_VERSION.to_string(),
    )?;
    catalog.volume_id()?;
    let report = RecoveryReport {
        head_lsn: next_lsn - 1,
        first_lsn: rec
            .segments
            .first()
            .map_or(seg.header.first_lsn, |s| s.first_lsn),
        segments: rec.segments.len().max(1),
        truncated_tail: rec.truncated_tail,
        unclean_shutdown: unclean == Some(false) || (unclean.is_none() && !rec.segments.is_empty()),
        removed_segments: rec.removed,
        catalog_repairs: rec.repairs,
    };
    let log = Log {
        seg: Arc::new(seg),
        off,
        next_lsn,
        unsynced: vec![],
        dir_dirty: false,
        rows: vec![],
        rolled_at: std::time::Instant::now(),
    };
    Ok((log, report))
}

/// Continues in the last recovered segment, re-extending it if it was cut short.
fn reopen_last(
    last: &crate::wal::reader::SegmentInfo,
    cfg: &WalConfig,
) -> Result<(Active, u64, Lsn), WalError> {
    let file = segment::open_rw(&last.path)?;
    let mut capacity = last.file_len;
    if capacity < cfg.segment_size && segment::preallocate(&file, cfg.segment_size).is_ok() {
        capacity = cfg.segment_size;
    }
    let header = SegmentHeader {
        version: segment::FORMAT_VERSION,
        header_len: HEADER_LEN as u16,
        first_lsn: last.first_lsn,
        created_ns: last.created_ns,
        salt: last.salt,
    };
    let seed = codec::crc_seed(header.salt);
    let seg = Active {
        file,
        path: last.path.clone(),
        header,
        seed,
        capacity,
        zeroed: false,
        prefetched: AtomicBool::new(false),
    };
    Ok((seg, last.bytes_used, last.last_lsn + 1))
}

/// A new state dir: the first segment starts at LSN 1 (zero-filled unless
/// `wal.zero_fill = "never"`: nothing is known yet of the write rate).
fn create_first(
    dir: &Path,
    cfg: &WalConfig,
    cat: &Catalog,
) -> Result<(Active, u64, Lsn), WalError> {
    let zero = cfg.zero_fill != crate::config::ZeroFill::Never;
    let file = segment::create_spare(dir, cfg.segment_size, zero)?;
    let header = SegmentHeader::new(1);
    let path = segment::activate_spare(&file, dir, &header)?;
    file.sync_data().map_err(io_err("fdatasync", &path))?;
    segment::fsync_dir(dir)?;
    let seed = codec::crc_seed(header.salt);
    let seg = Active {
        file,
        path,
        header,
        seed,
        capacity: cfg.segment_size,
        // Just written: its pages are in the page cache.
        zeroed: false,
        prefetched: AtomicBool::new(false),
    };
    cat.put_segment(&row_of(&seg, None, HEADER_LEN))?;
    Ok((seg, HEADER_LEN, 1))
}
