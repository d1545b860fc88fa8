//! `replfs verify`: compares the source tree with the mirror's copy through
//! the protocol while both keep running. Each side hashes its own files
//! (BLAKE3), so no data crosses the link; only listings do.
//!
//! A difference on a path that a record the mirror has not applied yet
//! touches (or below it, or the directory holding it) is "in flight", not a
//! defect: the copy is compared "up to the acknowledged LSN". Paths waiting
//! in the catalog for a repair are known differences and keep the result
//! from being "identical".

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::manifest::{self, Entry, Kind, WalkOpts, is_within, path_cmp};
use super::{Peer, Spool};
use crate::apply::display_path;
use crate::exclude::Excludes;
use crate::proto::{self, Msg, Role};
use crate::ship::Target;
use crate::wal::{Lsn, WalError, WalReader};

/// One way the two trees differ.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Difference {
    pub path: String,
    /// "missing" (on the mirror), "extra" (only on the mirror), "type",
    /// "content" or "metadata".
    pub what: &'static str,
    pub detail: String,
    /// The path's raw bytes (for `--repair`).
    #[serde(skip)]
    pub raw: Vec<u8>,
}

/// What `replfs verify` found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub source: String,
    pub mirror: String,
    pub volume: String,
    /// The mirror had applied every record up to here when the comparison began.
    pub applied_lsn: Lsn,
    pub entries_source: u64,
    pub entries_mirror: u64,
    /// Differences not explained by records in flight.
    pub differences: Vec<Difference>,
    /// Differences on paths that records after `applied_lsn` change.
    pub in_flight: Vec<Difference>,
    /// Paths the source has recorded as needing a repair.
    pub resync_pending: u64,
    pub identical: bool,
}

/// Merges the source walk of `root` with the mirror's listing; returns the
/// number of source entries and every difference.
pub fn compare(
    root: std::os::fd::BorrowedFd<'_>,
    excludes: &Excludes,
    spool: &mut Spool,
) -> Result<(u64, Vec<Difference>)> {
    let mut diffs = Vec::new();
    let mut n = 0u64;
    let opts = WalkOpts {
        hashes: true,
        xattrs: true,
        excludes: Some(excludes),
    };
    manifest::walk(root, b"", opts, &mut |s| {
        n += 1;
        while let Some(m) = spool.peek()? {
            if path_cmp(&m.path, &s.path) != std::cmp::Ordering::Less {
                break;
            }
            let m = spool.take()?.expect("peeked");
            diffs.push(diff(
                &m.path,
                "extra",
                format!("{} only on the mirror", m.kind.name()),
            ));
        }
        match spool.peek()? {
            Some(m) if m.path == s.path => {
                let m = spool.take()?.expect("peeked");
                compare_entry(&s, &m, &mut diffs);
            }
            _ => diffs.push(diff(
                &s.path,
                "missing",
                format!("{} not on the mirror", s.kind.name()),
            )),
        }
        Ok(())
    })?;
    while let Some(m) = spool.take()? {
        diffs.push(diff(
            &m.path,
            "extra",
            format!("{} only on the mirror", m.kind.name()),
        ));
    }
    Ok((n, diffs))
}

fn diff(path: &[u8], what: &'static str, detail: String) -> Difference {
    Difference {
        path: display_path(path),
        what,
        detail,
        raw: path.to_vec(),
    }
}

/// Records the paths of `report`'s differences (not those in flight) in the
/// catalog for repair; returns how many.
pub fn record_repairs(state: &Path, report: &VerifyReport) -> Result<usize> {
    let cat = crate::catalog::Catalog::open(state)?;
    let paths = super::collapse(report.differences.iter().map(|d| d.raw.clone()).collect());
    for p in &paths {
        cat.add_resync(p, "replfs verify found a difference", report.applied_lsn)?;
    }
    Ok(paths.len())
}

fn compare_entry(s: &Entry, m: &Entry, out: &mut Vec<Difference>) {
    if s.kind != m.kind {
        let d = format!(
            "{} on the source, {} on the mirror",
            s.kind.name(),
            m.kind.name()
        );
        return out.push(diff(&s.path, "type", d));
    }
    if s.kind == Kind::Symlink && s.target != m.target {
        let d = format!(
            "symlink to {:?} on the source, to {:?} on the mirror",
            String::from_utf8_lossy(&s.target),
            String::from_utf8_lossy(&m.target)
        );
        return out.push(diff(&s.path, "type", d));
    }
    if matches!(s.kind, Kind::CharDev | Kind::BlockDev) && s.rdev != m.rdev {
        return out.push(diff(&s.path, "type", "device numbers differ".into()));
    }
    if s.kind == Kind::File {
        if s.size != m.size {
            let d = format!("{} bytes on the source, {} on the mirror", s.size, m.size);
            out.push(diff(&s.path, "content", d));
        } else if s.hash != m.hash {
            out.push(diff(
                &s.path,
                "content",
                "same size, different bytes".into(),
            ));
        }
    }
    let mut fields = Vec::new();
    if s.kind != Kind::Symlink && s.mode & 0o7777 != m.mode & 0o7777 {
        fields.push(format!(
            "mode {:o} vs {:o}",
            s.mode & 0o7777,
            m.mode & 0o7777
        ));
    }
    if (s.uid, s.gid) != (m.uid, m.gid) {
        fields.push(format!("owner {}:{} vs {}:{}", s.uid, s.gid, m.uid, m.gid));
    }
    if s.mtime != m.mtime {
        fields.push(format!(
            "mtime {}.{:09} vs {}.{:09}",
            s.mtime.sec, s.mtime.nsec, m.mtime.sec, m.mtime.nsec
        ));
    }
    if s.xattrs != m.xattrs {
        fields.push("extended attributes".into());
    }
    if s.kind != Kind::Dir && s.nlink != m.nlink {
        fields.push(format!("{} links vs {}", s.nlink, m.nlink));
    }
    if !fields.is_empty() {
        out.push(diff(&s.path, "metadata", fields.join(", ")));
    }
}

/// A plain blocking connection as a [`Peer`] (the verifier's).
struct StreamPeer {
    r: std::io::BufReader<TcpStream>,
    w: TcpStream,
}

impl Peer for StreamPeer {
    fn send(&mut self, m: &Msg) -> Result<u64> {
        Ok(proto::write_msg(&mut self.w, m)?)
    }

    fn recv(&mut self) -> Result<Msg> {
        loop {
            match proto::read_msg(&mut self.r)? {
                Msg::Pong => continue,
                Msg::Error { msg } => bail!("the mirror refused: {msg}"),
                m => return Ok(m),
            }
        }
    }
}

/// How long `verify` waits for the mirror's next listing frame.
const VERIFY_READ_TIMEOUT: Duration = Duration::from_secs(3600);

/// Connects to the mirror as a verifier and compares `backing` with it.
pub fn run(
    state: &Path,
    target: &Target,
    backing: &Path,
    excludes: &Excludes,
    timeout: Duration,
) -> Result<VerifyReport> {
    let cat = crate::catalog::Catalog::open(state)?;
    let source_id = cat.source_id()?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&target.addr)
        .with_context(|| format!("cannot resolve {}", target.addr))?
        .next()
        .with_context(|| format!("{} resolves to no address", target.addr))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to the mirror at {}", target.addr))?;
    // The mirror hashes every file before its listing is complete: a big
    // file can keep it silent for long.
    s.set_read_timeout(Some(timeout.max(VERIFY_READ_TIMEOUT)))?;
    s.set_write_timeout(Some(timeout))?;
    let ready = proto::client_handshake_as(&mut s, &target.volume, &target.key, Role::Verifier)
        .with_context(|| format!("mirror {}", target.addr))?;
    if ready.source != source_id {
        bail!(
            "the mirror's copy of volume {} {}: a baseline has not completed yet",
            target.volume,
            if ready.source.is_empty() {
                "was never paired with a source".to_string()
            } else {
                format!(
                    "belongs to source {}, not this one ({source_id})",
                    ready.source
                )
            }
        );
    }
    let mut peer = StreamPeer {
        r: std::io::BufReader::with_capacity(256 << 10, s.try_clone()?),
        w: s,
    };
    let mut spool = Spool::fetch(&mut peer, b"", true, state)?;
    let root = manifest::open_root(backing)?;
    let (entries_source, diffs) = compare(root.as_fd(), excludes, &mut spool)?;
    // Paths the mirror may not have applied yet.
    let touched = touched_since(state, ready.applied)?;
    let resync: Vec<Vec<u8>> = cat.resync_list()?.into_iter().map(|r| r.path).collect();
    let (mut differences, mut in_flight) = (Vec::new(), Vec::new());
    for d in diffs {
        let p = d.raw.as_slice();
        if touched
            .iter()
            .any(|t| is_within(p, t) || manifest::parent(t) == p)
        {
            in_flight.push(d);
        } else {
            differences.push(d);
        }
    }
    let identical = differences.is_empty() && resync.is_empty();
    Ok(VerifyReport {
        source: backing.display().to_string(),
        mirror: target.addr.clone(),
        volume: target.volume.clone(),
        applied_lsn: ready.applied,
        entries_source,
        entries_mirror: spool.entries,
        differences,
        in_flight,
        resync_pending: resync.len() as u64,
        identical,
    })
}

/// Paths named by the records after `applied` (both names of renames and links).
fn touched_since(state: &Path, applied: Lsn) -> Result<Vec<Vec<u8>>> {
    let reader = WalReader::open(state)?;
    let mut out = std::collections::BTreeSet::new();
    for rec in reader.iter_from(applied + 1) {
        match rec {
            Ok(r) => {
                for p in r.op.paths() {
                    out.insert(p.to_vec());
                }
            }
            Err(WalError::NotRetained { lsn, oldest }) => bail!(
                "the mirror needs LSN {lsn} but the WAL starts at {oldest}: a baseline is pending"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out.into_iter().collect())
}

/// The human report.
pub fn render(r: &VerifyReport) -> String {
    let mut out = format!(
        "source {} ({} entries) vs mirror {} volume {} ({} entries), applied LSN {}\n",
        r.source, r.entries_source, r.mirror, r.volume, r.entries_mirror, r.applied_lsn
    );
    for d in &r.differences {
        out.push_str(&format!("  {:<9} {}: {}\n", d.what, d.path, d.detail));
    }
    for d in &r.in_flight {
        out.push_str(&format!(
            "  in flight {}: {} ({})\n",
            d.path, d.what, d.detail
        ));
    }
    if r.resync_pending > 0 {
        out.push_str(&format!(
            "{} path(s) are recorded on the source as needing a repair (not yet done)\n",
            r.resync_pending
        ));
    }
    out.push_str(&if r.identical {
        format!(
            "identical up to the applied LSN ({} change(s) in flight)\n",
            r.in_flight.len()
        )
    } else {
        format!(
            "{} difference(s) ({} more in flight)\n",
            r.differences.len(),
            r.in_flight.len()
        )
    });
    out
}
