//! The mirror's side of a sync: listings and block checksums of its tree.
//! Everything is resolved beneath the replica root, never following a
//! symlink (see `manifest`).

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::Result;

use super::manifest::{self, WalkOpts};
use crate::proto::Msg;
use crate::proto::sync::SUM_LEN;

/// Entries per MANIFEST frame are cut at about this many bytes.
const MANIFEST_FRAME: usize = 1 << 20;

/// Lists `path` below `root` and hands the MANIFEST frames to `send` (the
/// last one flagged `last`, possibly empty).
pub fn manifest(
    root: BorrowedFd<'_>,
    path: &[u8],
    hashes: bool,
    send: &mut dyn FnMut(Msg) -> Result<()>,
) -> Result<()> {
    let mut buf = Vec::with_capacity(MANIFEST_FRAME + 4096);
    let opts = WalkOpts {
        hashes,
        xattrs: true,
        excludes: None,
    };
    manifest::walk(root, path, opts, &mut |e| {
        manifest::encode_entry(&e, &mut buf)?;
        if buf.len() >= MANIFEST_FRAME {
            send(Msg::Manifest {
                last: false,
                entries: std::mem::take(&mut buf),
            })?;
        }
        Ok(())
    })?;
    send(Msg::Manifest {
        last: true,
        entries: buf,
    })
}

/// Checksums of the `block`-byte blocks of the regular file at `path`.
pub fn sums(root: BorrowedFd<'_>, path: &[u8], block: u32) -> Result<Msg> {
    let Some(fd) = manifest::open_file_beneath(root, path)? else {
        return Ok(Msg::Sums {
            size: None,
            block,
            sums: Vec::new(),
        });
    };
    let mut buf = vec![0u8; block as usize];
    let mut sums = Vec::new();
    let mut off = 0u64;
    loop {
        let n = manifest::pread_full(fd.as_raw_fd(), &mut buf, off)?;
        if n == 0 {
            break;
        }
        sums.push(block_sum(&buf[..n]));
        off += n as u64;
        if sums.len() >= crate::proto::sync::MAX_SUMS {
            break;
        }
    }
    Ok(Msg::Sums {
        size: Some(off),
        block,
        sums,
    })
}

/// The checksum of one block (BLAKE3, truncated).
pub fn block_sum(data: &[u8]) -> [u8; SUM_LEN] {
    let h = blake3::hash(data);
    let mut out = [0u8; SUM_LEN];
    out.copy_from_slice(&h.as_bytes()[..SUM_LEN]);
    out
}

/// The block size used for a file of `size` bytes: 64 KiB, or bigger so
/// that a file has at most 65536 blocks.
pub fn block_for(size: u64) -> u32 {
    let want = size.div_ceil(65536).next_power_of_two();
    want.clamp(64 << 10, crate::proto::sync::MAX_BLOCK as u64) as u32
}
