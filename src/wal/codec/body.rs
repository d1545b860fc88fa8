//! Record bodies: the per-op field layouts (tables in `docs/wal-format.md`),
//! path and limit validation on both the encode and the decode side.

use std::borrow::Cow;

use super::*;
use crate::wal::record::{Attr, NodeKind, Ts};

/// Checks a volume-relative path: empty (the root) or `/`-separated
/// components that are non-empty, not `.`/`..`, at most 255 bytes, no NUL.
pub fn validate_path(p: &[u8]) -> Result<(), CodecError> {
    let bad = |reason| {
        let shown: Vec<u8> = p.iter().copied().take(100).collect();
        Err(CodecError::BadPath {
            path: String::from_utf8_lossy(&shown).into_owned(),
            reason,
        })
    };
    if p.len() > MAX_PATH_LEN {
        return Err(CodecError::TooLong {
            what: "path",
            len: p.len(),
            max: MAX_PATH_LEN,
        });
    }
    if p.is_empty() {
        return Ok(());
    }
    if p.contains(&0) {
        return bad("contains NUL");
    }
    if p[0] == b'/' {
        return bad("absolute");
    }
    for comp in p.split(|&c| c == b'/') {
        match comp {
            b"" => return bad("empty component"),
            b"." | b".." => return bad("'.' or '..' component"),
            c if c.len() > MAX_NAME_LEN => return bad("component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

fn check_name(name: &[u8]) -> Result<(), CodecError> {
    check_len("xattr name", name.len(), MAX_NAME_LEN)?;
    if name.is_empty() || name.contains(&0) {
        return invalid("xattr name (empty or contains NUL)");
    }
    Ok(())
}

fn check_range(what: &str, offset: u64, len: u64) -> Result<(), CodecError> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => invalid(format!("{what} range {offset}+{len}")),
    }
}

/// Appends little-endian fields to a body buffer, validating as it goes.
struct Enc<'o>(&'o mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn ts(&mut self, t: &Ts) -> Result<(), CodecError> {
        if t.nsec >= 1_000_000_000 {
            return invalid(format!("timestamp nanoseconds {}", t.nsec));
        }
        self.u64(t.sec as u64);
        self.u32(t.nsec);
        Ok(())
    }
    fn attr(&mut self, a: &Attr) -> Result<(), CodecError> {
        self.u32(a.mode);
        self.u32(a.uid);
        self.u32(a.gid);
        self.ts(&a.mtime)
    }
    /// u16 length + bytes (lengths were checked against limits below 64 KiB).
    fn short(&mut self, b: &[u8]) {
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    fn path(&mut self, p: &[u8]) -> Result<(), CodecError> {
        validate_path(p)?;
        self.short(p);
        Ok(())
    }
}

fn kind_code(k: NodeKind) -> u8 {
    NodeKind::ALL.iter().position(|&x| x == k).unwrap_or(0) as u8
}

/// The op code stored in the frame header (table in `docs/wal-format.md`).
pub fn op_code(op: &Op<'_>) -> u8 {
    match op {
        Op::Create { .. } => OP_CREATE,
        Op::Symlink { .. } => OP_SYMLINK,
        Op::Link { .. } => OP_LINK,
        Op::Remove { .. } => OP_REMOVE,
        Op::Rename { .. } => OP_RENAME,
        Op::Write { .. } => OP_WRITE,
        Op::Truncate { .. } => OP_TRUNCATE,
        Op::SetAttr { .. } => OP_SETATTR,
        Op::SetXattr { .. } => OP_SETXATTR,
        Op::RemoveXattr { .. } => OP_REMOVEXATTR,
        Op::Fallocate { .. } => OP_FALLOCATE,
        Op::Resync { .. } => OP_RESYNC,
    }
}

/// Appends the body of `op` to `out` and returns its trailing payload (write
/// data / xattr value), which is *not* copied: the body is `out ++ payload`.
/// Fails when the op is invalid (bad path, over a limit), so nothing the
/// decoder would reject ever reaches the log.
pub fn encode_body<'a>(op: &'a Op<'_>, out: &mut Vec<u8>) -> Result<&'a [u8], CodecError> {
    let mut e = Enc(out);
    match op {
        Op::Create {
            path,
            kind,
            rdev,
            attr,
            parent_mtime,
        } => {
            e.path(path)?;
            e.u8(kind_code(*kind));
            e.u64(*rdev);
            e.attr(attr)?;
            e.ts(parent_mtime)?;
        }
        Op::Symlink {
            path,
            target,
            attr,
            parent_mtime,
        } => {
            e.path(path)?;
            check_len("symlink target", target.len(), MAX_PATH_LEN)?;
            if target.contains(&0) {
                return invalid("symlink target (contains NUL)");
            }
            e.short(target);
            e.attr(attr)?;
            e.ts(parent_mtime)?;
        }
        Op::Link {
            existing,
            path,
            parent_mtime,
        } => {
            e.path(existing)?;
            e.path(path)?;
            e.ts(parent_mtime)?;
        }
        Op::Remove {
            path,
            dir,
            parent_mtime,
        } => {
            e.path(path)?;
            e.u8(*dir as u8);
            e.ts(parent_mtime)?;
        }
        Op::Rename {
            from,
            to,
            flags,
            from_parent_mtime,
            to_parent_mtime,
        } => {
            e.path(from)?;
            e.path(to)?;
            e.u32(*flags);
            e.ts(from_parent_mtime)?;
            e.ts(to_parent_mtime)?;
        }
        _ => return encode_data_body(op, e),
    }
    Ok(&[])
}

fn encode_data_body<'a>(op: &'a Op<'_>, mut e: Enc<'_>) -> Result<&'a [u8], CodecError> {
    match op {
        Op::Write {
            path,
            offset,
            data,
            attr,
        } => {
            e.path(path)?;
            check_len("write data", data.len(), MAX_DATA_LEN)?;
            check_range("write", *offset, data.len() as u64)?;
            e.u64(*offset);
            e.attr(attr)?;
            e.u32(data.len() as u32);
            return Ok(data);
        }
        Op::Truncate { path, size, attr } => {
            e.path(path)?;
            check_range("truncate", *size, 0)?;
            e.u64(*size);
            e.attr(attr)?;
        }
        Op::SetAttr { path, attr, atime } => {
            e.path(path)?;
            e.attr(attr)?;
            e.u8(atime.is_some() as u8);
            if let Some(t) = atime {
                e.ts(t)?;
            }
        }
        Op::SetXattr { path, name, value } => {
            e.path(path)?;
            check_name(name)?;
            check_len("xattr value", value.len(), MAX_XATTR_VALUE_LEN)?;
            e.short(name);
            e.u32(value.len() as u32);
            return Ok(value);
        }
        Op::RemoveXattr { path, name } => {
            e.path(path)?;
            check_name(name)?;
            e.short(name);
        }
        Op::Fallocate {
            path,
            mode,
            offset,
            len,
            attr,
        } => {
            e.path(path)?;
            check_range("fallocate", *offset, *len)?;
            e.u32(*mode as u32);
            e.u64(*offset);
            e.u64(*len);
            e.attr(attr)?;
        }
        Op::Resync { path, reason } => {
            e.path(path)?;
            check_len("resync reason", reason.len(), MAX_REASON_LEN)?;
            e.short(reason.as_bytes());
        }
        _ => return invalid("op kind in encode_data_body"),
    }
    Ok(&[])
}

/// The whole body of `op` in one buffer (tools and tests; the writer avoids the copy).
pub fn encode_body_vec(op: &Op<'_>) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64 + op.data_len() as usize);
    let tail = encode_body(op, &mut out)?;
    out.extend_from_slice(tail);
    Ok(out)
}

/// Reads little-endian fields from a body, never past its end.
struct Dec<'a> {
    b: &'a [u8],
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.b.len() < n {
            return Err(CodecError::Truncated(what));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, CodecError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => invalid(format!("{what} flag {v}")),
        }
    }
    fn ts(&mut self, what: &'static str) -> Result<Ts, CodecError> {
        let sec = self.u64(what)? as i64;
        let nsec = self.u32(what)?;
        if nsec >= 1_000_000_000 {
            return invalid(format!("{what} nanoseconds {nsec}"));
        }
        Ok(Ts { sec, nsec })
    }
    fn attr(&mut self) -> Result<Attr, CodecError> {
        let (mode, uid, gid) = (self.u32("mode")?, self.u32("uid")?, self.u32("gid")?);
        Ok(Attr {
            mode,
            uid,
            gid,
            mtime: self.ts("mtime")?,
        })
    }
    fn short(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], CodecError> {
        let len = self.u16(what)? as usize;
        check_len(what, len, max)?;
        self.take(len, what)
    }
    fn long(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], CodecError> {
        let len = self.u32(what)? as usize;
        check_len(what, len, max)?;
        self.take(len, what)
    }
    fn path(&mut self, what: &'static str) -> Result<Vec<u8>, CodecError> {
        let p = self.short(what, MAX_PATH_LEN)?;
        validate_path(p)?;
        Ok(p.to_vec())
    }
    fn name(&mut self) -> Result<Vec<u8>, CodecError> {
        let n = self.short("xattr name", MAX_NAME_LEN)?;
        check_name(n)?;
        Ok(n.to_vec())
    }
    fn finish(self) -> Result<(), CodecError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            invalid(format!(
                "{} trailing bytes after the record body",
                self.b.len()
            ))
        }
    }
}

/// Decodes a body (uncompressed) stored under `code`. Never panics.
pub fn decode_body(code: u8, body: &[u8]) -> Result<Op<'static>, CodecError> {
    decode_body_ref(code, body).map(Op::into_owned)
}

/// [`decode_body`] borrowing the data of writes and xattr values from
/// `body` instead of copying them (the same checks).
pub fn decode_body_ref(code: u8, body: &[u8]) -> Result<Op<'_>, CodecError> {
    check_len("record body", body.len(), MAX_BODY_LEN)?;
    let mut d = Dec { b: body };
    let op = match code {
        OP_CREATE => decode_create(&mut d)?,
        OP_SYMLINK => decode_symlink(&mut d)?,
        OP_LINK => Op::Link {
            existing: d.path("link source")?,
            path: d.path("path")?,
            parent_mtime: d.ts("parent mtime")?,
        },
        OP_REMOVE => Op::Remove {
            path: d.path("path")?,
            dir: d.bool("dir")?,
            parent_mtime: d.ts("parent mtime")?,
        },
        OP_RENAME => Op::Rename {
            from: d.path("rename source")?,
            to: d.path("rename target")?,
            flags: d.u32("rename flags")?,
            from_parent_mtime: d.ts("parent mtime")?,
            to_parent_mtime: d.ts("parent mtime")?,
        },
        OP_WRITE => decode_write(&mut d)?,
        _ => decode_meta(code, &mut d)?,
    };
    d.finish()?;
    Ok(op)
}

fn decode_create<'a>(d: &mut Dec<'a>) -> Result<Op<'a>, CodecError> {
    let path = d.path("path")?;
    let code = d.u8("node kind")?;
    let Some(&kind) = NodeKind::ALL.get(code as usize) else {
        return invalid(format!("node kind {code}"));
    };
    let rdev = d.u64("rdev")?;
    Ok(Op::Create {
        path,
        kind,
        rdev,
        attr: d.attr()?,
        parent_mtime: d.ts("parent mtime")?,
    })
}

fn decode_symlink<'a>(d: &mut Dec<'a>) -> Result<Op<'a>, CodecError> {
    let path = d.path("path")?;
    let target = d.short("symlink target", MAX_PATH_LEN)?;
    if target.contains(&0) {
        return invalid("symlink target (contains NUL)");
    }
    let target = target.to_vec();
    Ok(Op::Symlink {
        path,
        target,
        attr: d.attr()?,
        parent_mtime: d.ts("parent mtime")?,
    })
}

fn decode_write<'a>(d: &mut Dec<'a>) -> Result<Op<'a>, CodecError> {
    let path = d.path("path")?;
    let offset = d.u64("offset")?;
    let attr = d.attr()?;
    let data = d.long("write data", MAX_DATA_LEN)?;
    check_range("write", offset, data.len() as u64)?;
    Ok(Op::Write {
        path,
        offset,
        data: Cow::Borrowed(data),
        attr,
    })
}

fn decode_meta<'a>(code: u8, d: &mut Dec<'a>) -> Result<Op<'a>, CodecError> {
    let path = d.path("path")?;
    Ok(match code {
        OP_TRUNCATE => {
            let size = d.u64("size")?;
            check_range("truncate", size, 0)?;
            Op::Truncate {
                path,
                size,
                attr: d.attr()?,
            }
        }
        OP_SETATTR => {
            let attr = d.attr()?;
            let atime = if d.bool("atime present")? {
                Some(d.ts("atime")?)
            } else {
                None
            };
            Op::SetAttr { path, attr, atime }
        }
        OP_SETXATTR => {
            let name = d.name()?;
            let value = d.long("xattr value", MAX_XATTR_VALUE_LEN)?;
            Op::SetXattr {
                path,
                name,
                value: Cow::Borrowed(value),
            }
        }
        OP_REMOVEXATTR => Op::RemoveXattr {
            path,
            name: d.name()?,
        },
        OP_FALLOCATE => {
            let mode = d.u32("fallocate mode")? as i32;
            let (offset, len) = (d.u64("offset")?, d.u64("length")?);
            check_range("fallocate", offset, len)?;
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
                attr: d.attr()?,
            }
        }
        OP_RESYNC => {
            let reason = d.short("resync reason", MAX_REASON_LEN)?;
            let Ok(reason) = String::from_utf8(reason.to_vec()) else {
                return invalid("resync reason (not UTF-8)");
            };
            Op::Resync { path, reason }
        }
        other => return invalid(format!("op code {other}")),
    })
}
