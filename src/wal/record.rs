//! WAL record types: the operations a replica replays (their binary codec is `codec.rs`).
//!
//! Every record describes a change that already succeeded on the backing
//! directory, with the resulting metadata a replica needs to reproduce it
//! exactly. Paths are relative to the volume root (no leading `/`, no `.`/`..`
//! components, no empty components, no NUL); the root itself is the empty path.

use std::borrow::Cow;

/// Log sequence number: 1 for the first record ever written, contiguous.
pub type Lsn = u64;

/// A timestamp with nanosecond precision (seconds since the Unix epoch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ts {
    pub sec: i64,
    pub nsec: u32,
}

/// Metadata of an inode after a change: what a replica sets after applying it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Attr {
    /// Full `st_mode`, including the file-type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Ts,
}

/// The kind of node a `Create` record makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeKind {
    File,
    Dir,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// One change to the tree. `Cow` lets the write path encode borrowed bytes
/// without copying them; decoded records own their data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// A new node (file, directory, fifo, socket, device) at `path`.
    Create {
        path: Vec<u8>,
        kind: NodeKind,
        rdev: u64,
        attr: Attr,
        parent_mtime: Ts,
    },
    /// A new symbolic link at `path` pointing at `target` (stored verbatim).
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
        attr: Attr,
        parent_mtime: Ts,
    },
    /// A new hard link `path` to the existing node at `existing`.
    Link {
        existing: Vec<u8>,
        path: Vec<u8>,
        parent_mtime: Ts,
    },
    /// `unlink` (dir = false) or `rmdir` (dir = true).
    Remove {
        path: Vec<u8>,
        dir: bool,
        parent_mtime: Ts,
    },
    /// `renameat2(from, to, flags)`; flags are RENAME_NOREPLACE / RENAME_EXCHANGE bits.
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
        flags: u32,
        from_parent_mtime: Ts,
        to_parent_mtime: Ts,
    },
    /// Data written at `offset`; `attr` is the file's metadata afterwards
    /// (mtime, and mode if the write cleared suid/sgid).
    Write {
        path: Vec<u8>,
        offset: u64,
        data: Cow<'a, [u8]>,
        attr: Attr,
    },
    /// The file's size set to `size` (truncate / extend).
    Truncate {
        path: Vec<u8>,
        size: u64,
        attr: Attr,
    },
    /// chmod / chown / utimens: set mode, owner and mtime to `attr`, and atime
    /// when it was set explicitly.
    SetAttr {
        path: Vec<u8>,
        attr: Attr,
        atime: Option<Ts>,
    },
    SetXattr {
        path: Vec<u8>,
        name: Vec<u8>,
        value: Cow<'a, [u8]>,
    },
    RemoveXattr {
        path: Vec<u8>,
        name: Vec<u8>,
    },
    /// `fallocate(mode, offset, len)` (preallocate, punch hole, zero range...).
    Fallocate {
        path: Vec<u8>,
        mode: i32,
        offset: u64,
        len: u64,
        attr: Attr,
    },
    /// The state of `path` (empty = the whole tree) on a replica can no longer
    /// be derived from the log and must be resynchronised from the source.
    Resync {
        path: Vec<u8>,
        reason: String,
    },
}

/// A decoded record: its position, when it was logged, and the change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    /// Wall-clock time the record was logged, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    pub op: Op<'static>,
}

impl Ts {
    /// The current wall-clock time.
    pub fn now() -> Ts {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ts {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

impl NodeKind {
    /// All kinds, in op-code order (see `docs/wal-format.md`).
    pub const ALL: [NodeKind; 6] = [
        NodeKind::File,
        NodeKind::Dir,
        NodeKind::Fifo,
        NodeKind::Socket,
        NodeKind::CharDev,
        NodeKind::BlockDev,
    ];
}

impl Op<'_> {
    /// Short lowercase name for logs and `log dump` ("write", "rename", ...).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Remove { dir: false, .. } => "unlink",
            Op::Remove { dir: true, .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::SetAttr { .. } => "setattr",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Fallocate { .. } => "fallocate",
            Op::Resync { .. } => "resync",
        }
    }

    /// The path the change is about: the new name for `Create`/`Symlink`/`Link`,
    /// the source for `Rename` (see [`Op::paths`] for both).
    pub fn path(&self) -> &[u8] {
        match self {
            Op::Create { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. }
            | Op::Remove { path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::SetAttr { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::Fallocate { path, .. }
            | Op::Resync { path, .. } => path,
            Op::Rename { from, .. } => from,
        }
    }

    /// Every path the record names: one, or two for `Link` (existing, new)
    /// and `Rename` (from, to). Excludes and resync bookkeeping use this.
    pub fn paths(&self) -> Vec<&[u8]> {
        match self {
            Op::Link { existing, path, .. } => vec![existing, path],
            Op::Rename { from, to, .. } => vec![from, to],
            other => vec![other.path()],
        }
    }

    /// Payload bytes carried: write data or xattr value length, else 0.
    pub fn data_len(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            Op::SetXattr { value, .. } => value.len() as u64,
            _ => 0,
        }
    }

    /// The same op borrowing its payload from this one (write data and
    /// xattr values are not copied; paths and names are).
    pub fn reborrow(&self) -> Op<'_> {
        match self {
            Op::Write {
                path,
                offset,
                data,
                attr,
            } => Op::Write {
                path: path.clone(),
                offset: *offset,
                data: Cow::Borrowed(data),
                attr: *attr,
            },
            Op::SetXattr { path, name, value } => Op::SetXattr {
                path: path.clone(),
                name: name.clone(),
                value: Cow::Borrowed(value),
            },
            other => other.clone(),
        }
    }

    /// A copy that owns its payload (what a decoded [`Record`] holds).
    pub fn into_owned(self) -> Op<'static> {
        match self {
            Op::Write {
                path,
                offset,
                data,
                attr,
            } => Op::Write {
                path,
                offset,
                data: Cow::Owned(data.into_owned()),
                attr,
            },
            Op::SetXattr { path, name, value } => Op::SetXattr {
                path,
                name,
                value: Cow::Owned(value.into_owned()),
            },
            Op::Create {
                path,
                kind,
                rdev,
                attr,
                parent_mtime,
            } => Op::Create {
                path,
                kind,
                rdev,
                attr,
                parent_mtime,
            },
            Op::Symlink {
                path,
                target,
                attr,
                parent_mtime,
            } => Op::Symlink {
                path,
                target,
                attr,
                parent_mtime,
            },
            Op::Link {
                existing,
                path,
                parent_mtime,
            } => Op::Link {
                existing,
                path,
                parent_mtime,
            },
            Op::Remove {
                path,
                dir,
                parent_mtime,
            } => Op::Remove {
                path,
                dir,
                parent_mtime,
            },
            Op::Rename {
                from,
                to,
                flags,
                from_parent_mtime,
                to_parent_mtime,
            } => Op::Rename {
                from,
                to,
                flags,
                from_parent_mtime,
                to_parent_mtime,
            },
            Op::Truncate { path, size, attr } => Op::Truncate { path, size, attr },
            Op::SetAttr { path, attr, atime } => Op::SetAttr { path, attr, atime },
            Op::RemoveXattr { path, name } => Op::RemoveXattr { path, name },
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
                attr,
            } => Op::Fallocate {
                path,
                mode,
                offset,
                len,
                attr,
            },
            Op::Resync { path, reason } => Op::Resync { path, reason },
        }
    }
}
