//! The source's side of a sync: walk the backing tree, merge it with the
//! mirror's manifest, and send the ops that make the mirror's copy equal
//! (see the module doc of `sync` for when and why).
//!
//! Ops are WAL ops (`wal::Op`, LSN 0) sent in SYNC_OPS frames and applied by
//! the mirror's apply engine, so containment and metadata rules are the
//! same as for the log. Order of the ops:
//! - an entry missing on the mirror is created with its metadata, a file's
//!   data after a `Truncate` to its size (all-zero chunks are left as holes);
//! - a file whose size or mtime differs gets the mirror's block checksums and
//!   only the blocks that differ (an all-zero block becomes a punched hole);
//! - an entry of another kind (or another symlink target or device number)
//!   is removed, with its subtree, and created again;
//! - entries only on the mirror are removed, children before parents;
//! - a directory gets its final metadata after everything below it changed;
//! - a file with several links on the source is copied once and linked.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};

use super::manifest::{self, Entry, Kind, WalkOpts, is_within, path_cmp};
use super::{Peer, Progress, Spool, serve};
use crate::exclude::Excludes;
use crate::proto::{Batch, Msg};
use crate::wal::{Attr, Lsn, NodeKind, Op, Record, Ts};

/// Data carried by one `Write` op.
const CHUNK: usize = 1 << 20;
/// Ops are sent when this many bytes or ops are queued.
const FLUSH_BYTES: u64 = 4 << 20;
const FLUSH_OPS: usize = 4096;

/// What a sync needs on the source side.
pub struct SyncArgs<'a> {
    /// The backing directory (any descriptor of it).
    pub root: BorrowedFd<'a>,
    pub excludes: &'a Excludes,
    /// Where the mirror's manifest is spooled (the state dir).
    pub spool_dir: &'a Path,
    pub progress: &'a Progress,
    /// Compare every regular file by block checksums, even when size and
    /// mtime match (repairs: a replayed record may have given a file the
    /// source's mtime while its bytes differ).
    pub thorough: bool,
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries examined on the source.
    pub entries: u64,
    /// Entries created on the mirror (or recreated: other kind).
    pub created: u64,
    /// Files whose blocks were compared, and blocks sent for them.
    pub delta_files: u64,
    pub blocks_sent: u64,
    /// Entries removed from the mirror.
    pub removed: u64,
    /// Entries whose metadata only was set.
    pub meta_only: u64,
    /// File data sent, before compression.
    pub data_bytes: u64,
    /// Ops sent.
    pub ops: u64,
}

/// Brings the mirror's copy of each of `paths` (subtrees; `""` = all) in
/// line with the source, then makes it durable on the mirror (SYNC_END,
/// with `horizon()` read at the end: the head of the log the copy may have
/// gone past). Returns what was done and that horizon.
pub fn sync(
    peer: &mut dyn Peer,
    a: &SyncArgs<'_>,
    paths: &[Vec<u8>],
    token: u64,
    horizon: &dyn Fn() -> Lsn,
) -> Result<(Report, Lsn)> {
    let paths = super::collapse(paths.to_vec());
    let p = a.progress;
    p.start();
    for path in &paths {
        count(peer, a, path)?;
    }
    let mut m = Merger {
        peer,
        a,
        ops: Vec::new(),
        ops_bytes: 0,
        stack: Vec::new(),
        dels: Vec::new(),
        links: HashMap::new(),
        report: Report::default(),
    };
    for path in &paths {
        p.phase.store(2, Ordering::Relaxed);
        let mut spool = Spool::fetch(m.peer, path, false, a.spool_dir)?;
        p.phase.store(3, Ordering::Relaxed);
        m.run(path, &mut spool)?;
    }
    m.flush()?;
    let horizon = horizon();
    m.peer.send(&Msg::SyncEnd { token, horizon })?;
    match m.peer.recv()? {
        Msg::SyncDone { token: t } if t == token => {}
        Msg::Error { msg } => bail!("the mirror refused the sync: {msg}"),
        other => bail!("expected SyncDone from the mirror, got {}", other.name()),
    }
    // The phase goes back to idle with the caller, once it has recorded the
    // paths that changed meanwhile (status must not show an idle sync with
    // those repairs not yet pending).
    Ok((m.report, horizon))
}

/// Adds the entries and bytes below `path` to the totals.
fn count(peer: &mut dyn Peer, a: &SyncArgs<'_>, path: &[u8]) -> Result<()> {
    let opts = WalkOpts {
        hashes: false,
        xattrs: false,
        excludes: Some(a.excludes),
    };
    manifest::walk(a.root, path, opts, &mut |e| {
        peer.keepalive()?;
        a.progress.files_total.fetch_add(1, Ordering::Relaxed);
        if e.kind == Kind::File {
            a.progress.bytes_total.fetch_add(e.size, Ordering::Relaxed);
        }
        Ok(())
    })
}

struct DirState {
    e: Entry,
    changed: bool,
}

struct Merger<'a, 'b> {
    peer: &'a mut dyn Peer,
    a: &'a SyncArgs<'b>,
    ops: Vec<Record>,
    ops_bytes: u64,
    /// Source directories being visited (ancestors of the current entry).
    stack: Vec<DirState>,
    /// Mirror entries to remove, in listing order (removed in reverse).
    dels: Vec<Entry>,
    /// Source inode of a multiply-linked file -> (its first path, the
    /// mirror inode at that path when kept as it was).
    links: HashMap<u64, (Vec<u8>, Option<u64>)>,
    report: Report,
}

fn node_kind(k: Kind) -> Option<NodeKind> {
    Some(match k {
        Kind::File => NodeKind::File,
        Kind::Dir => NodeKind::Dir,
        Kind::Fifo => NodeKind::Fifo,
        Kind::Socket => NodeKind::Socket,
        Kind::CharDev => NodeKind::CharDev,
        Kind::BlockDev => NodeKind::BlockDev,
        Kind::Symlink => return None,
    })
}

/// Can `m` on the mirror become `s` without being replaced?
fn same_identity(s: &Entry, m: &Entry) -> bool {
    s.kind == m.kind
        && match s.kind {
            Kind::Symlink => s.target == m.target,
            Kind::CharDev | Kind::BlockDev => s.rdev == m.rdev,
            _ => true,
        }
}

fn attr_differs(s: &Entry, m: &Entry) -> bool {
    s.uid != m.uid
        || s.gid != m.gid
        || s.mtime != m.mtime
        || (s.kind != Kind::Symlink && s.mode != m.mode)
}

impl Merger<'_, '_> {
    fn run(&mut self, path: &[u8], spool: &mut Spool) -> Result<()> {
        let opts = WalkOpts {
            hashes: false,
            xattrs: true,
            excludes: Some(self.a.excludes),
        };
        let root = self.a.root;
        manifest::walk(root, path, opts, &mut |s| {
            self.peer.keepalive()?;
            while let Some(m) = spool.peek()? {
                if path_cmp(&m.path, &s.path) != std::cmp::Ordering::Less {
                    break;
                }
                let m = spool.take()?.expect("peeked");
                self.extra(m);
            }
            let m = match spool.peek()? {
                Some(m) if m.path == s.path => spool.take()?,
                _ => None,
            };
            self.flush_dels()?;
            self.pop_to(Some(&s.path))?;
            self.visit(s, m, spool)
        })?;
        while let Some(m) = spool.take()? {
            self.extra(m);
        }
        self.flush_dels()?;
        self.pop_to(None)
    }

    fn push(&mut self, op: Op<'static>) -> Result<()> {
        self.ops_bytes += op.data_len() + 64;
        self.ops.push(Record {
            lsn: 0,
            time_ns: 0,
            op,
        });
        self.report.ops += 1;
        if self.ops_bytes >= FLUSH_BYTES || self.ops.len() >= FLUSH_OPS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.ops);
        self.ops_bytes = 0;
        let n = self.peer.send(&Msg::SyncOps(Batch { records }))?;
        self.a.progress.bytes_sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// The mtime the parent of `path` must keep (the source's), if known.
    fn parent_mtime(&self, path: &[u8]) -> Ts {
        let parent = manifest::parent(path);
        self.stack
            .iter()
            .rev()
            .find(|d| d.e.path == parent)
            .map_or_else(Ts::default, |d| d.e.mtime)
    }

    /// Notes that the directory holding `path` changed.
    fn touch_parent(&mut self, path: &[u8]) {
        if path.is_empty() {
            return;
        }
        if let Some(d) = self
            .stack
            .iter_mut()
            .rev()
            .find(|d| is_within(path, &d.e.path) && d.e.path != path)
        {
            d.changed = true;
        }
    }

    fn extra(&mut self, m: Entry) {
        self.touch_parent(&m.path);
        self.dels.push(m);
    }

    /// Removes the queued mirror entries, deepest first.
    fn flush_dels(&mut self) -> Result<()> {
        while let Some(m) = self.dels.pop() {
            if m.path.is_empty() {
                continue;
            }
            let parent_mtime = self.parent_mtime(&m.path);
            self.push(Op::Remove {
                path: m.path,
                dir: m.kind == Kind::Dir,
                parent_mtime,
            })?;
            self.report.removed += 1;
        }
        Ok(())
    }

    /// Leaves the directories that do not contain `next` (all when None),
    /// giving each that changed its final metadata.
    fn pop_to(&mut self, next: Option<&[u8]>) -> Result<()> {
        while let Some(top) = self.stack.last() {
            if next.is_some_and(|n| is_within(n, &top.e.path) && n != top.e.path) {
                break;
            }
            let d = self.stack.pop().expect("checked");
            if d.changed {
                self.push(Op::SetAttr {
                    path: d.e.path.clone(),
                    attr: d.e.attr(),
                    atime: None,
                })?;
            }
        }
        Ok(())
    }

    /// Queues the mirror entry `m` and (for a directory) everything listed
    /// below it for removal.
    fn replace(&mut self, m: Entry, spool: &mut Spool) -> Result<()> {
        let base = m.path.clone();
        let is_dir = m.kind == Kind::Dir;
        self.extra(m);
        if is_dir {
            while let Some(n) = spool.peek()? {
                if !is_within(&n.path, &base) {
                    break;
                }
                let n = spool.take()?.expect("peeked");
                self.dels.push(n);
            }
        }
        self.flush_dels()
    }

    fn visit(&mut self, s: Entry, m: Option<Entry>, spool: &mut Spool) -> Result<()> {
        self.report.entries += 1;
        let p = self.a.progress;
        p.files_done.fetch_add(1, Ordering::Relaxed);
        if s.kind == Kind::File {
            p.bytes_done.fetch_add(s.size, Ordering::Relaxed);
        }
        // A further name of a multiply-linked file: link it to the first.
        if s.kind == Kind::File && s.nlink > 1 {
            if let Some((first, mino)) = self.links.get(&s.ino).cloned() {
                if m.as_ref()
                    .is_some_and(|m| m.kind == Kind::File && Some(m.ino) == mino)
                {
                    return Ok(());
                }
                if let Some(m) = m {
                    self.replace(m, spool)?;
                }
                let parent_mtime = self.parent_mtime(&s.path);
                self.touch_parent(&s.path);
                self.report.created += 1;
                return self.push(Op::Link {
                    existing: first,
                    path: s.path,
                    parent_mtime,
                });
            }
        }
        let mut dir_meta = false;
        let kept = match m {
            Some(m) if s.path.is_empty() || same_identity(&s, &m) => {
                // A file sharing its inode with names the source does not
                // link together must not be written in place.
                if s.kind == Kind::File && m.nlink > 1 && m.nlink != s.nlink {
                    self.replace(m, spool)?;
                    self.create(&s)?;
                    None
                } else {
                    let ino = m.ino;
                    dir_meta = self.update(&s, &m)?;
                    Some(ino)
                }
            }
            Some(m) => {
                self.replace(m, spool)?;
                self.create(&s)?;
                None
            }
            None => {
                self.create(&s)?;
                None
            }
        };
        if s.kind == Kind::File && s.nlink > 1 {
            self.links.insert(s.ino, (s.path.clone(), kept));
        }
        if s.kind == Kind::Dir {
            let changed = kept.is_none() || dir_meta;
            self.stack.push(DirState { e: s, changed });
        }
        Ok(())
    }

    fn create(&mut self, s: &Entry) -> Result<()> {
        let parent_mtime = self.parent_mtime(&s.path);
        self.touch_parent(&s.path);
        self.report.created += 1;
        let attr = s.attr();
        match node_kind(s.kind) {
            None => {
                return self.push(Op::Symlink {
                    path: s.path.clone(),
                    target: s.target.clone(),
                    attr,
                    parent_mtime,
                });
            }
            Some(kind) => self.push(Op::Create {
                path: s.path.clone(),
                kind,
                rdev: s.rdev,
                attr: if kind == NodeKind::File {
                    poisoned(attr)
                } else {
                    attr
                },
                parent_mtime,
            })?,
        }
        self.set_xattrs(s, &[])?;
        if s.kind == Kind::File {
            let attr = if self.copy_file(s)? {
                attr
            } else {
                poisoned(attr)
            };
            self.push(Op::SetAttr {
                path: s.path.clone(),
                attr,
                atime: None,
            })?;
        }
        Ok(())
    }

    /// Sends a new file's data (its size first, then every chunk that is not
    /// all zeros). False when the file changed or vanished while it was read
    /// (see [`poisoned`]).
    fn copy_file(&mut self, s: &Entry) -> Result<bool> {
        // The real mtime comes last (SetAttr): a copy cut short keeps one no
        // file has, so the next sync does not take it for complete.
        let attr = poisoned(s.attr());
        self.push(Op::Truncate {
            path: s.path.clone(),
            size: s.size,
            attr,
        })?;
        let Some(fd) = manifest::open_file_beneath(self.a.root, &s.path)? else {
            return Ok(false); // gone meanwhile: its removal is in the log
        };
        self.send_blocks(s, &fd, CHUNK, &[], attr)?;
        Ok(unchanged(&fd, s))
    }

    /// Sends the `block`-sized blocks of the open file whose checksums are
    /// not in `sums` (the mirror's; empty for a new file): data as writes,
    /// an all-zero block as a punched hole where the mirror has data there
    /// and as nothing beyond its end (a hole already). Returns the blocks
    /// that changed.
    fn send_blocks(
        &mut self,
        s: &Entry,
        fd: &std::os::fd::OwnedFd,
        block: usize,
        sums: &[[u8; crate::proto::sync::SUM_LEN]],
        attr: Attr,
    ) -> Result<u64> {
        let mut buf = vec![0u8; block];
        let (mut off, mut changed) = (0u64, 0u64);
        for i in 0.. {
            let n = manifest::pread_full(fd.as_raw_fd(), &mut buf, off)
                .with_context(|| format!("reading {}", crate::apply::display_path(&s.path)))?;
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            let mirror = sums.get(i);
            if mirror.is_some_and(|h| *h == serve::block_sum(data)) {
                off += n as u64;
                continue;
            }
            if data.iter().any(|&b| b != 0) {
                self.write(s, off, data, attr)?;
                changed += 1;
            } else if mirror.is_some() {
                self.push(Op::Fallocate {
                    path: s.path.clone(),
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset: off,
                    len: n as u64,
                    attr,
                })?;
                changed += 1;
            }
            off += n as u64;
        }
        Ok(changed)
    }

    fn write(&mut self, s: &Entry, off: u64, data: &[u8], attr: Attr) -> Result<()> {
        self.report.data_bytes += data.len() as u64;
        self.a
            .progress
            .data_sent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        for (i, piece) in data.chunks(CHUNK).enumerate() {
            self.push(Op::Write {
                path: s.path.clone(),
                offset: off + (i * CHUNK) as u64,
                data: piece.to_vec().into(),
                attr,
            })?;
        }
        Ok(())
    }

    /// Brings `m` in line with `s`; for a directory, returns whether its
    /// metadata must be set when it is left (instead of setting it now).
    fn update(&mut self, s: &Entry, m: &Entry) -> Result<bool> {
        let mut meta = attr_differs(s, m);
        let mut attr = s.attr();
        if s.kind == Kind::File && (self.a.thorough || s.size != m.size || s.mtime != m.mtime) {
            let (sent, consistent) = self.delta(s, m)?;
            if !consistent {
                attr = poisoned(attr);
            }
            meta |= sent || !consistent;
        }
        if s.xattrs != m.xattrs {
            self.set_xattrs(s, &m.xattrs)?;
            meta = true;
        }
        if meta {
            self.report.meta_only += 1;
            if s.kind == Kind::Dir {
                // Set when the directory is left (its children may change it).
                return Ok(true);
            }
            self.push(Op::SetAttr {
                path: s.path.clone(),
                attr,
                atime: None,
            })?;
        }
        Ok(false)
    }

    fn set_xattrs(&mut self, s: &Entry, have: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        if !matches!(s.kind, Kind::File | Kind::Dir) {
            return Ok(());
        }
        for (name, value) in &s.xattrs {
            if !have.iter().any(|(n, v)| n == name && v == value) {
                self.push(Op::SetXattr {
                    path: s.path.clone(),
                    name: name.clone(),
                    value: value.clone().into(),
                })?;
            }
        }
        for (name, _) in have {
            if !s.xattrs.iter().any(|(n, _)| n == name) {
                self.push(Op::RemoveXattr {
                    path: s.path.clone(),
                    name: name.clone(),
                })?;
            }
        }
        Ok(())
    }

    /// Sends only the blocks of `s` that differ from the mirror's copy.
    /// Returns whether anything was sent, and false second when the file
    /// changed or vanished while it was read.
    fn delta(&mut self, s: &Entry, m: &Entry) -> Result<(bool, bool)> {
        self.flush()?;
        let block = serve::block_for(s.size.max(m.size));
        // The mirror reads the whole file first (at 20 MiB/s at worst).
        self.peer
            .allow(std::time::Duration::from_secs(m.size / (20 << 20)));
        self.peer.send(&Msg::SumsReq {
            path: s.path.clone(),
            block,
        })?;
        let (size, sums) = match self.peer.recv()? {
            Msg::Sums {
                size,
                block: b,
                sums,
            } if b == block => (size, sums),
            Msg::Error { msg } => bail!("the mirror refused: {msg}"),
            other => bail!("expected Sums from the mirror, got {}", other.name()),
        };
        if size.is_none() {
            bail!(
                "{} is no longer a regular file on the mirror",
                crate::apply::display_path(&s.path)
            );
        }
        let attr = poisoned(s.attr());
        if size != Some(s.size) {
            self.push(Op::Truncate {
                path: s.path.clone(),
                size: s.size,
                attr,
            })?;
        }
        let Some(fd) = manifest::open_file_beneath(self.a.root, &s.path)? else {
            return Ok((true, false));
        };
        let changed = self.send_blocks(s, &fd, block as usize, &sums, attr)?;
        self.report.blocks_sent += changed;
        let sent = size != Some(s.size) || changed > 0;
        if sent {
            self.report.delta_files += 1;
        }
        Ok((sent, unchanged(&fd, s)))
    }
}

/// Is the open file still the one the walk saw (same inode, size, mtime)
/// now that it has been read? If not, what was sent mixes states.
fn unchanged(fd: &std::os::fd::OwnedFd, s: &Entry) -> bool {
    crate::apply::sys::fstat(fd).is_ok_and(|st| {
        st.st_ino == s.ino
            && st.st_size as u64 == s.size
            && (st.st_mtime, st.st_mtime_nsec as u32) == (s.mtime.sec, s.mtime.nsec)
    })
}

/// The metadata given to a file while its data is being sent, and kept when
/// the copy may mix states (it changed while being read): an mtime no real
/// file has, so that neither an interrupted sync nor the repair that follows
/// (every change after the walk's start is in the log, so the path is
/// repaired) takes it for equal on size and mtime.
fn poisoned(mut attr: Attr) -> Attr {
    attr.mtime = Ts { sec: 0, nsec: 1 };
    attr
}
