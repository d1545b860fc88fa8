//! `replfs log export`: the retained log (or a range of it) as one file, to
//! move a backlog or a baseline out of band; `replfs mirror import` applies
//! it. The format (`docs/export-format.md`) is a small header, protocol
//! `Batch` frames exactly as the wire carries them (one codec: `proto`), and
//! an end marker with the record count and a CRC32C of everything before it.
//!
//! [`ExportReader`] is the one parser of the format (used by the importer).

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::proto::{self, Batch, FRAME_HEADER_LEN, MAX_BATCH_RAW, MAX_FRAME, Msg};
use crate::wal::reader::SegmentScanner;
use crate::wal::{Lsn, Record, WalError, WalReader, segment};

/// First bytes of an export file.
pub const EXPORT_MAGIC: &[u8; 8] = b"RPLFSEXP";
/// First bytes of the end marker.
pub const END_MAGIC: &[u8; 8] = b"RPLFSEND";
/// Version of the export format written by this build.
pub const EXPORT_VERSION: u16 = 1;
/// Target uncompressed size of one batch in the file.
pub const EXPORT_BATCH_BYTES: usize = 4 << 20;
/// Fixed part of the header (before the volume id and the CRC).
const HEADER_FIXED: usize = 8 + 2 + 2 + 8 + 8 + 8 + 1;
/// `END_MAGIC`, `u64 records`, `u64 last_lsn`, `u32 crc`.
pub const END_LEN: usize = 8 + 8 + 8 + 4;

/// What the header of an export file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportHeader {
    pub version: u16,
    /// Protocol version of the batch frames.
    pub proto_version: u16,
    /// The id of the source whose log this is (`Catalog::source_id`).
    pub volume_id: String,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    /// When the export was made (ns since the epoch).
    pub created_ns: i64,
}

impl ExportHeader {
    fn encode(&self) -> Vec<u8> {
        let id = self.volume_id.as_bytes();
        let id = &id[..id.len().min(255)];
        let mut b = Vec::with_capacity(HEADER_FIXED + id.len() + 4);
        b.extend_from_slice(EXPORT_MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.proto_version.to_le_bytes());
        b.extend_from_slice(&self.first_lsn.to_le_bytes());
        b.extend_from_slice(&self.last_lsn.to_le_bytes());
        b.extend_from_slice(&self.created_ns.to_le_bytes());
        b.push(id.len() as u8);
        b.extend_from_slice(id);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and checks a header; returns it with its raw bytes.
    fn read(r: &mut impl Read) -> Result<(ExportHeader, Vec<u8>)> {
        let mut b = vec![0u8; HEADER_FIXED];
        r.read_exact(&mut b)
            .context("the file is too short to be a replfs export")?;
        if &b[..8] != EXPORT_MAGIC {
            bail!("not a replfs export (bad magic)");
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let version = u16_at(8);
        if version != EXPORT_VERSION {
            bail!(
                "export format version {version} is not supported (this build reads {EXPORT_VERSION})"
            );
        }
        let proto_version = u16_at(10);
        let (first_lsn, last_lsn, created_ns) = (u64_at(12), u64_at(20), u64_at(28) as i64);
        let id_len = b[36] as usize;
        let mut rest = vec![0u8; id_len + 4];
        r.read_exact(&mut rest)
            .context("the export header is cut short")?;
        b.extend_from_slice(&rest);
        let body = b.len() - 4;
        let crc = u32::from_le_bytes([b[body], b[body + 1], b[body + 2], b[body + 3]]);
        if crc32c::crc32c(&b[..body]) != crc {
            bail!("the export header is damaged (CRC mismatch)");
        }
        if proto_version != proto::PROTO_VERSION {
            bail!(
                "the export holds protocol version {proto_version} batches; this build speaks {}",
                proto::PROTO_VERSION
            );
        }
        if first_lsn == 0 || last_lsn < first_lsn {
            bail!("the export header claims an invalid LSN range {first_lsn}..={last_lsn}");
        }
        let volume_id = String::from_utf8_lossy(&b[HEADER_FIXED..HEADER_FIXED + id_len]).into();
        let h = ExportHeader {
            version,
            proto_version,
            volume_id,
            first_lsn,
            last_lsn,
            created_ns,
        };
        Ok((h, b))
    }
}

/// What `export` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    pub path: PathBuf,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub records: u64,
    pub batches: u64,
    pub bytes: u64,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exported LSN {}..={} ({} records, {} batches, {} bytes) to {}",
            self.first_lsn,
            self.last_lsn,
            self.records,
            self.batches,
            self.bytes,
            self.path.display()
        )
    }
}

/// A writer that keeps a running CRC32C and a byte count.
struct CrcWriter<W: Write> {
    inner: W,
    crc: u32,
    bytes: u64,
}

impl<W: Write> CrcWriter<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.bytes += b.len() as u64;
        Ok(())
    }
}

/// The LSN of the last valid record of the WAL (scans only the last segment),
/// and the oldest retained LSN.
fn wal_bounds(state: &Path) -> Result<(Lsn, Lsn)> {
    let segs = segment::list_segments(&segment::wal_dir(state))?;
    let (Some(first), Some(last)) = (segs.first(), segs.last()) else {
        bail!("the WAL in {} holds no segment", state.display());
    };
    let mut sc = SegmentScanner::open(&last.1)?;
    sc.scan_all(true)?;
    Ok((first.0, sc.info().last_lsn))
}

/// Writes the records `from..=to` of the WAL in `state` (defaults: the
/// oldest retained record, the head) to `out` via `out.tmp`, fsynced and
/// renamed. Read-only on the WAL: safe while a mount writes it.
pub fn export(
    state: &Path,
    out: &Path,
    from: Option<Lsn>,
    to: Option<Lsn>,
) -> Result<ExportReport> {
    let reader = WalReader::open(state)
        .with_context(|| format!("cannot open the WAL in {}", state.display()))?;
    let (oldest, head) =
        wal_bounds(state).with_context(|| format!("cannot read the WAL in {}", state.display()))?;
    let first = from.filter(|&f| f != 0).unwrap_or(oldest);
    if first < oldest {
        bail!(
            "LSN {first} was retired: the oldest record retained in {} is LSN {oldest}",
            state.display()
        );
    }
    let last = to.map_or(head, |t| t.min(head));
    if first > last {
        bail!(
            "nothing to export: --from {first} is past the last record to export (LSN {last}, head {head})"
        );
    }
    // The source's identity: an import into a mirror copy that belongs to
    // another source is refused.
    let volume_id = crate::catalog::Catalog::open(state)
        .and_then(|c| c.source_id())
        .context("cannot read the source id from the catalog")?;
    let header = ExportHeader {
        version: EXPORT_VERSION,
        proto_version: proto::PROTO_VERSION,
        volume_id,
        first_lsn: first,
        last_lsn: last,
        created_ns: segment::now_ns(),
    };

    let tmp = tmp_path(out);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = write_body(&reader, &header, file, out);
    match result {
        Ok((records, batches, bytes)) => {
            std::fs::rename(&tmp, out)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
            sync_parent(out)?;
            Ok(ExportReport {
                path: out.to_path_buf(),
                first_lsn: first,
                last_lsn: last,
                records,
                batches,
                bytes,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn tmp_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn sync_parent(p: &Path) -> Result<()> {
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", parent.display()))
}

/// Header, batches, end marker; fsyncs. Returns (records, batches, bytes).
fn write_body(
    reader: &WalReader,
    header: &ExportHeader,
    file: File,
    out: &Path,
) -> Result<(u64, u64, u64)> {
    let mut w = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: 0,
        bytes: 0,
    };
    let werr = || format!("cannot write {}", out.display());
    w.put(&header.encode()).with_context(werr)?;
    let (first, last) = (header.first_lsn, header.last_lsn);
    let (mut records, mut batches) = (0u64, 0u64);
    let mut pending: Vec<Record> = Vec::new();
    let mut raw = 0usize;
    let mut expect = first;
    let mut flush = |pending: &mut Vec<Record>, w: &mut CrcWriter<_>| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let batch = Batch {
            records: std::mem::take(pending),
        };
        let frame = proto::encode_msg(&Msg::Batch(batch)).context("cannot encode a batch")?;
        w.put(&frame).with_context(werr)?;
        batches += 1;
        Ok(())
    };
    for item in reader.iter_range(first, last) {
        let rec = item.map_err(|e| match e {
            WalError::NotRetained { lsn, oldest } => {
                anyhow::anyhow!("LSN {lsn} was retired while exporting (oldest retained: {oldest})")
            }
            e => anyhow::Error::new(e).context(format!("cannot read the log at LSN {expect}")),
        })?;
        if rec.lsn != expect {
            bail!("the log jumps from LSN {} to LSN {}", expect - 1, rec.lsn);
        }
        let len = proto::record_wire_len(&rec.op)
            .with_context(|| format!("record LSN {} cannot be encoded", rec.lsn))?;
        if !pending.is_empty() && (raw + len > MAX_BATCH_RAW || raw >= EXPORT_BATCH_BYTES) {
            flush(&mut pending, &mut w)?;
            raw = 0;
        }
        raw += len;
        pending.push(rec);
        records += 1;
        expect += 1;
        if raw >= EXPORT_BATCH_BYTES {
            flush(&mut pending, &mut w)?;
            raw = 0;
        }
    }
    flush(&mut pending, &mut w)?;
    if expect != last + 1 {
        bail!(
            "the log ended at LSN {} before LSN {last} (retired or damaged while exporting?)",
            expect - 1
        );
    }
    let mut end = Vec::with_capacity(END_LEN);
    end.extend_from_slice(END_MAGIC);
    end.extend_from_slice(&records.to_le_bytes());
    end.extend_from_slice(&last.to_le_bytes());
    w.put(&end).with_context(werr)?;
    let crc = w.crc;
    w.put(&crc.to_le_bytes()).with_context(werr)?;
    let bytes = w.bytes;
    let file = w
        .inner
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(werr)?;
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", out.display()))?;
    Ok((records, batches, bytes))
}

/// What [`ExportReader::verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    pub records: u64,
    pub batches: u64,
    pub bytes: u64,
}

/// Reads an export file: its header at open, then batches in order; checks
/// framing, batch contents (record CRCs, LSN continuity from the header's
/// first LSN), and at the end the record count and the file CRC.
pub struct ExportReader {
    path: PathBuf,
    rd: BufReader<File>,
    pub header: ExportHeader,
    crc: u32,
    bytes: u64,
    next_lsn: Lsn,
    records: u64,
    batches: u64,
    done: bool,
}

impl ExportReader {
    pub fn open(path: &Path) -> Result<ExportReader> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut rd = BufReader::with_capacity(1 << 20, file);
        let (header, raw) =
            ExportHeader::read(&mut rd).with_context(|| format!("{}", path.display()))?;
        Ok(ExportReader {
            path: path.to_path_buf(),
            rd,
            crc: crc32c::crc32c(&raw),
            bytes: raw.len() as u64,
            next_lsn: header.first_lsn,
            header,
            records: 0,
            batches: 0,
            done: false,
        })
    }

    fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let mut b = Vec::with_capacity(n.min(1 << 20));
        let got = (&mut self.rd).take(n as u64).read_to_end(&mut b)?;
        if got != n {
            bail!(
                "{} is truncated: {what} cut after {got} of {n} bytes at offset {}",
                self.path.display(),
                self.bytes
            );
        }
        self.crc = crc32c::crc32c_append(self.crc, &b);
        self.bytes += n as u64;
        Ok(b)
    }

    /// The next batch, or `None` after a valid end marker.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.done {
            return Ok(None);
        }
        let off = self.bytes;
        let hdr = self.take(FRAME_HEADER_LEN, "a frame header")?;
        if hdr[4] == proto::frame_type::BATCH {
            let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
            if len > MAX_FRAME {
                bail!(
                    "{}: damaged at offset {off}: a frame of {len} bytes exceeds the limit",
                    self.path.display()
                );
            }
            let payload = self.take(len, "a batch")?;
            let batch = match proto::decode_msg(hdr[4], &payload) {
                Ok(Msg::Batch(b)) => b,
                Ok(m) => bail!("unexpected {} message at offset {off}", m.name()),
                Err(e) => bail!(
                    "{}: damaged batch at offset {off}: {e}",
                    self.path.display()
                ),
            };
            let Some(first) = batch.records.first().map(|r| r.lsn) else {
                bail!("{}: empty batch at offset {off}", self.path.display());
            };
            if first != self.next_lsn {
                bail!(
                    "{}: the batch at offset {off} starts at LSN {first}, expected {}",
                    self.path.display(),
                    self.next_lsn
                );
            }
            let last = batch.last_lsn().unwrap_or(first);
            if last > self.header.last_lsn {
                bail!(
                    "{}: the batch at offset {off} goes past the header's last LSN {}",
                    self.path.display(),
                    self.header.last_lsn
                );
            }
            self.next_lsn = last + 1;
            self.records += batch.records.len() as u64;
            self.batches += 1;
            return Ok(Some(batch));
        }
        // Not a batch: must be the end marker (its 5th byte, 'S', is no frame type).
        let rest = self.take(8 + 8 + 8 - FRAME_HEADER_LEN, "the end marker")?;
        let mut m = hdr;
        m.extend_from_slice(&rest);
        if &m[..8] != END_MAGIC {
            bail!(
                "{}: damaged at offset {off}: neither a batch nor the end marker",
                self.path.display()
            );
        }
        let want_crc = self.crc;
        let mut crc = [0u8; 4];
        self.rd.read_exact(&mut crc).with_context(|| {
            format!(
                "{} is truncated: the end marker is cut",
                self.path.display()
            )
        })?;
        if u32::from_le_bytes(crc) != want_crc {
            bail!("{}: CRC mismatch: the file is damaged", self.path.display());
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&m[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let (count, last) = (u64_at(8), u64_at(16));
        if count != self.records || last != self.header.last_lsn || self.next_lsn != last + 1 {
            bail!(
                "{}: the end marker says {count} records up to LSN {last}, the file holds {} records up to LSN {}",
                self.path.display(),
                self.records,
                self.next_lsn - 1
            );
        }
        let mut extra = [0u8; 1];
        if self.rd.read(&mut extra)? != 0 {
            bail!("{}: bytes follow the end marker", self.path.display());
        }
        self.bytes += 4;
        self.done = true;
        Ok(None)
    }

    /// Reads the whole file, checking everything, without keeping batches.
    pub fn verify(mut self) -> Result<ExportSummary> {
        while self.next_batch()?.is_some() {}
        Ok(ExportSummary {
            records: self.records,
            batches: self.batches,
            bytes: self.bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::config::WalConfig;
    use crate::wal::{Attr, Op, Wal};

    fn write_op(i: u64, len: usize) -> Op<'static> {
        Op::Write {
            path: format!("f{}", i % 7).into_bytes(),
            offset: i * 10,
            data: Cow::Owned((0..len).map(|k| (k as u64 * 31 + i) as u8).collect()),
            attr: Attr {
                mode: 0o100644,
                ..Attr::default()
            },
        }
    }

    #[test]
    fn round_trip_in_several_batches_and_retired_lsns_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let cfg = WalConfig {
            segment_size: 4 << 20,
            ..WalConfig::default()
        };
        let (wal, _) = Wal::open(&state, &cfg).unwrap();
        let n = 40u64;
        for i in 0..n {
            wal.append(&write_op(i, 300_000)).unwrap();
        }
        wal.sync(n).unwrap();

        let out = tmp.path().join("x.rplx");
        let r = export(&state, &out, None, None).unwrap();
        assert_eq!((r.first_lsn, r.last_lsn, r.records), (1, n, n));
        assert!(r.batches >= 3, "{r}");
        assert_eq!(r.bytes, std::fs::metadata(&out).unwrap().len());
        let mut rd = ExportReader::open(&out).unwrap();
        let wal_recs: Vec<Record> = WalReader::open(&state)
            .unwrap()
            .iter_from(0)
            .map(Result::unwrap)
            .collect();
        let mut got = Vec::new();
        while let Some(b) = rd.next_batch().unwrap() {
            got.extend(b.records);
        }
        assert_eq!(got, wal_recs);

        // A range.
        let r = export(&state, &out, Some(5), Some(9)).unwrap();
        assert_eq!((r.first_lsn, r.last_lsn, r.records), (5, 9, 5));
        assert_eq!(
            ExportReader::open(&out).unwrap().verify().unwrap().records,
            5
        );

        // Retire the first segments: --from 1 is refused, naming the oldest.
        wal.retire(n - 5).unwrap();
        let e = export(&state, &out, Some(1), None).unwrap_err();
        assert!(format!("{e:#}").contains("was retired"), "{e:#}");
        assert!(!tmp_path(&out).exists());
        wal.close().unwrap();
    }
}
