//! `replfs mirror import`: applies a `replfs log export` file to a volume of
//! a mirror state dir, out of band, through the same apply path as the
//! daemon ([`Volume::apply_batch`]); a shipper connecting afterwards resumes
//! from the imported position.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use log::info;
use parking_lot::Mutex;

use super::state::{self, MirrorDb};
use super::volume::{Ctx, Liveness, Volume};
use super::{DEFAULT_VOLUME, VolumeSpec, check_layout, check_volumes, create_private_dir};
use crate::proto::Key;
use crate::tools::export::ExportReader;
use crate::wal::Lsn;

/// What an import did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    pub volume: String,
    /// Applied LSN before the import.
    pub before: Lsn,
    /// Applied LSN after it.
    pub applied: Lsn,
    pub records_in_file: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.applied == self.before {
            write!(
                f,
                "volume {}: nothing to apply (the mirror is at LSN {}, the export holds LSN {}..={}); applied LSN {}",
                self.volume, self.before, self.first_lsn, self.last_lsn, self.applied
            )
        } else {
            write!(
                f,
                "volume {}: imported LSN {}..={} ({} records applied); applied LSN {}",
                self.volume,
                self.before + 1,
                self.applied,
                self.applied - self.before,
                self.applied
            )
        }
    }
}

/// Imports `file` into volume `volume` (default `default`) whose replica is
/// `dir`, with the mirror state in `state`. Refuses while a mirror holds the
/// state dir, when the file is damaged or truncated (checked completely
/// before anything is applied), or when it starts after the mirror's
/// applied LSN + 1.
pub fn import(dir: &Path, state: &Path, volume: Option<&str>, file: &Path) -> Result<ImportReport> {
    let id = volume.unwrap_or(DEFAULT_VOLUME).to_string();
    // Only used for the layout checks (no key is needed to import).
    let spec = VolumeSpec {
        id: id.clone(),
        dir: dir.to_path_buf(),
        key: Key::from_bytes(&[0u8; crate::proto::MIN_KEY_LEN]),
    };
    check_volumes(std::slice::from_ref(&spec))?;
    check_layout(state, std::slice::from_ref(&spec))?;
    // Header first: a file that is not an export changes nothing at all.
    let header = ExportReader::open(file)?.header;
    create_private_dir(state, "state dir")?;
    let _lock = state::lock_state(state).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}: stop the mirror daemon serving {} before importing",
            state.display()
        )
    })?;
    create_private_dir(dir, &format!("directory of volume {id}"))?;
    let db = MirrorDb::open(state)?;
    let vol =
        Volume::open(&id, dir, state, &db).with_context(|| format!("cannot open volume {id}"))?;
    let before = vol.applied();
    let source = vol.ready().source;
    if !source.is_empty() && source != header.volume_id {
        bail!(
            "the export holds the log of source {} but the mirror's copy of volume {id} \
             belongs to source {source}: nothing was applied",
            header.volume_id
        );
    }
    let mut report = ImportReport {
        volume: id.clone(),
        before,
        applied: before,
        records_in_file: header.last_lsn - header.first_lsn + 1,
        first_lsn: header.first_lsn,
        last_lsn: header.last_lsn,
    };
    if header.first_lsn > before + 1 {
        bail!(
            "the mirror is at LSN {before} but the export starts at {}: records {}..{} are missing \
             (export from --from {} or earlier)",
            header.first_lsn,
            before + 1,
            header.first_lsn - 1,
            before + 1
        );
    }
    // Check the whole file (framing, every record, count, CRC) before
    // applying anything: a damaged file changes nothing.
    let sum = ExportReader::open(file)?
        .verify()
        .context("the export is refused; nothing was applied")?;
    info!(
        "{}: {} records in {} batches, {} bytes, LSN {}..={} of volume {}: valid",
        file.display(),
        sum.records,
        sum.batches,
        sum.bytes,
        header.first_lsn,
        header.last_lsn,
        header.volume_id
    );
    if header.last_lsn <= before {
        return Ok(report);
    }
    let db = Mutex::new(db);
    let alive = Liveness::new();
    let shutdown = AtomicBool::new(false);
    let cx = Ctx {
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        db: &db,
        alive: &alive,
        shutdown: &shutdown,
    };
    let mut rd = ExportReader::open(file)?;
    if rd.header != header {
        bail!("{} changed while importing", file.display());
    }
    while let Some(batch) = rd.next_batch()? {
        if batch.last_lsn().is_some_and(|l| l <= vol.applied()) {
            continue;
        }
        report.applied = vol
            .apply_batch(&batch, &cx)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| {
                format!(
                    "import stopped after LSN {} (position saved)",
                    vol.applied()
                )
            })?;
    }
    report.applied = vol.applied();
    info!("volume {id}: imported up to LSN {}", report.applied);
    Ok(report)
}
