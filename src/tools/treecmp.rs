//! Compares two directory trees the way a replica must match its source:
//! file types, bytes, permission bits, owners, mtimes (ns), symlink targets,
//! `user.*` xattrs, hard-link structure and, optionally, sparse holes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::apply::display_path;

/// What [`compare_trees_with`] checks beyond the always-compared attributes.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompareOptions {
    /// Compare the data/hole layout of regular files (`SEEK_DATA`/`SEEK_HOLE`);
    /// only meaningful when both trees live on the same kind of filesystem.
    pub holes: bool,
}

/// Lists every difference between the trees under `a` and `b` (the roots
/// themselves included, shown as `.`); empty when they are identical.
/// Symlinks are never followed.
pub fn compare_trees(a: &Path, b: &Path) -> io::Result<Vec<String>> {
    compare_trees_with(a, b, CompareOptions::default())
}

/// [`compare_trees`] with options.
pub fn compare_trees_with(a: &Path, b: &Path, opts: CompareOptions) -> io::Result<Vec<String>> {
    let (ta, tb) = (list_tree(a)?, list_tree(b)?);
    let mut diffs = Vec::new();
    let mut links = Vec::new();
    for (rel, ma) in &ta {
        let name = display_path(rel);
        let Some(mb) = tb.get(rel) else {
            diffs.push(format!("{name}: only in {}", a.display()));
            continue;
        };
        let (pa, pb) = (join(a, rel), join(b, rel));
        compare_entry(
            &Pair {
                name: &name,
                pa: &pa,
                pb: &pb,
                ma,
                mb,
            },
            opts,
            &mut diffs,
        )?;
        if !ma.is_dir() && (ma.nlink() > 1 || mb.nlink() > 1) {
            links.push(Linked {
                name,
                a: (ma.dev(), ma.ino()),
                b: (mb.dev(), mb.ino()),
            });
        }
    }
    for rel in tb.keys().filter(|rel| !ta.contains_key(*rel)) {
        diffs.push(format!("{}: only in {}", display_path(rel), b.display()));
    }
    compare_links(&links, &mut diffs);
    Ok(diffs)
}

/// One path present in both trees, with its metadata on each side.
struct Pair<'a> {
    name: &'a str,
    pa: &'a Path,
    pb: &'a Path,
    ma: &'a Metadata,
    mb: &'a Metadata,
}

fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel))
    }
}

/// Every path under `root` (relative, as bytes; the root is empty) with its
/// `lstat` metadata, sorted.
fn list_tree(root: &Path) -> io::Result<BTreeMap<Vec<u8>, Metadata>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let path = join(root, &rel);
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                let name = entry?.file_name();
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(name.as_bytes());
                stack.push(child);
            }
        }
        out.insert(rel, meta);
    }
    Ok(out)
}

fn compare_entry(p: &Pair<'_>, opts: CompareOptions, diffs: &mut Vec<String>) -> io::Result<()> {
    let (ma, mb) = (p.ma, p.mb);
    let (ka, kb) = (ma.mode() & libc::S_IFMT, mb.mode() & libc::S_IFMT);
    if ka != kb {
        diffs.push(format!("{}: type {} vs {}", p.name, kind(ka), kind(kb)));
        return Ok(());
    }
    let mut differ = |what: &str, x: String, y: String| {
        if x != y {
            diffs.push(format!("{}: {what} {x} vs {y}", p.name));
        }
    };
    if ka != libc::S_IFLNK {
        differ(
            "mode",
            format!("{:04o}", ma.mode() & 0o7777),
            format!("{:04o}", mb.mode() & 0o7777),
        );
    }
    differ("uid", ma.uid().to_string(), mb.uid().to_string());
    differ("gid", ma.gid().to_string(), mb.gid().to_string());
    differ("mtime", mtime(ma), mtime(mb));
    if ka == libc::S_IFCHR || ka == libc::S_IFBLK {
        differ(
            "rdev",
            format!("{:#x}", ma.rdev()),
            format!("{:#x}", mb.rdev()),
        );
    }
    if ka == libc::S_IFLNK {
        let (ta, tb) = (fs::read_link(p.pa)?, fs::read_link(p.pb)?);
        differ("symlink target", format!("{ta:?}"), format!("{tb:?}"));
    }
    differ(
        "user xattrs",
        format!("{:?}", user_xattrs(p.pa)?),
        format!("{:?}", user_xattrs(p.pb)?),
    );
    if ka == libc::S_IFREG {
        compare_files(p, opts, diffs)?;
    }
    Ok(())
}

fn kind(ifmt: u32) -> &'static str {
    match ifmt {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "char device",
        libc::S_IFBLK => "block device",
        _ => "unknown",
    }
}

fn mtime(m: &Metadata) -> String {
    format!("{}.{:09}", m.mtime(), m.mtime_nsec())
}

fn compare_files(p: &Pair<'_>, opts: CompareOptions, diffs: &mut Vec<String>) -> io::Result<()> {
    if p.ma.len() != p.mb.len() {
        diffs.push(format!("{}: size {} vs {}", p.name, p.ma.len(), p.mb.len()));
        return Ok(());
    }
    let (mut fa, mut fb) = (File::open(p.pa)?, File::open(p.pb)?);
    if let Some(at) = first_difference(&mut fa, &mut fb)? {
        diffs.push(format!("{}: content differs at byte {at}", p.name));
    }
    if opts.holes {
        let (ha, hb) = (data_map(&fa, p.ma.len())?, data_map(&fb, p.mb.len())?);
        if ha != hb {
            diffs.push(format!("{}: data/hole layout {ha:?} vs {hb:?}", p.name));
        }
    }
    Ok(())
}

/// Offset of the first differing byte of two readers, if any.
fn first_difference(a: &mut File, b: &mut File) -> io::Result<Option<u64>> {
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut pos = 0u64;
    loop {
        let na = read_full(a, &mut ba)?;
        let nb = read_full(b, &mut bb)?;
        let same = na.min(nb);
        if let Some(i) = ba[..same].iter().zip(&bb[..same]).position(|(x, y)| x != y) {
            return Ok(Some(pos + i as u64));
        }
        if na != nb {
            return Ok(Some(pos + same as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        pos += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The data extents of a file as `(start, end)` pairs, via SEEK_DATA/SEEK_HOLE.
pub fn data_map(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(f, pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(f, start, libc::SEEK_HOLE)?.unwrap_or(len);
        extents.push((start, end));
        pos = end;
    }
    Ok(extents)
}

/// `lseek`, with ENXIO (no more data) as `None`.
fn seek(f: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: plain syscall on an open file.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(u64::try_from(r).ok());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// The `user.*` extended attributes of a path (not following a symlink),
/// sorted by name.
pub fn user_xattrs(path: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let names = xattr_call(|buf, len| {
        // SAFETY: valid C string and a buffer of `len` bytes (or null with 0).
        unsafe { libc::llistxattr(c.as_ptr(), buf.cast(), len) }
    })?;
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let value = xattr_call(|buf, len| {
            // SAFETY: valid C strings and a buffer of `len` bytes (or null with 0).
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        })?;
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    Ok(out)
}

/// Runs a size-query-then-fetch xattr call, retrying if the value grew.
fn xattr_call(call: impl Fn(*mut u8, usize) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        let size = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
        let mut buf = vec![0u8; size];
        let n = call(buf.as_mut_ptr(), buf.len());
        match usize::try_from(n) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(_) if io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
}

/// `(st_dev, st_ino)`: identifies an inode within one tree.
type InodeKey = (u64, u64);

/// A non-directory present in both trees and hard-linked in at least one.
struct Linked {
    name: String,
    a: InodeKey,
    b: InodeKey,
}

/// Hard-link structure: paths sharing an inode on one side must share one
/// on the other.
fn compare_links(links: &[Linked], diffs: &mut Vec<String>) {
    let mut first_a: HashMap<InodeKey, &Linked> = HashMap::new();
    let mut first_b: HashMap<InodeKey, &Linked> = HashMap::new();
    for l in links {
        let fa = *first_a.entry(l.a).or_insert(l);
        if fa.b != l.b {
            diffs.push(format!(
                "{}: hard link to {} in the first tree, not in the second",
                l.name, fa.name
            ));
        }
        let fb = *first_b.entry(l.b).or_insert(l);
        if fb.a != l.a {
            diffs.push(format!(
                "{}: hard link to {} in the second tree, not in the first",
                l.name, fb.name
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn set_xattr(path: &Path, name: &std::ffi::CStr, value: &[u8]) {
        let c = CString::new(path.as_os_str().as_bytes()).expect("cstring");
        // SAFETY: valid C strings and value buffer.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr: {}", io::Error::last_os_error());
    }

    fn set_mtime(path: &Path, sec: i64, nsec: i64) {
        let c = CString::new(path.as_os_str().as_bytes()).expect("cstring");
        let t = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            },
        ];
        // SAFETY: valid C string and timespec array.
        let r = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                t.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(r, 0);
    }

    /// f (with an xattr), h (hard link to f), s -> f, d/g, all at fixed times.
    fn make_tree(root: &Path) {
        fs::write(root.join("f"), b"content").expect("f");
        fs::hard_link(root.join("f"), root.join("h")).expect("h");
        symlink("f", root.join("s")).expect("s");
        fs::create_dir(root.join("d")).expect("d");
        fs::write(root.join("d/g"), b"g").expect("g");
        set_xattr(&root.join("f"), c"user.k", b"v");
        for rel in ["f", "s", "d/g", "d", ""] {
            set_mtime(&root.join(rel), 1000, 5);
        }
    }

    fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        for root in [&a, &b] {
            fs::create_dir(root).expect("mkdir");
            make_tree(root);
        }
        (tmp, a, b)
    }

    /// Applies `change` to tree b and returns the differences found.
    fn diff_after(change: impl FnOnce(&Path)) -> Vec<String> {
        let (_tmp, a, b) = pair();
        assert_eq!(
            compare_trees(&a, &b).expect("compare"),
            Vec::<String>::new()
        );
        change(&b);
        compare_trees(&a, &b).expect("compare")
    }

    fn assert_one(diffs: Vec<String>, needle: &str) {
        assert!(
            diffs.iter().any(|d| d.contains(needle)),
            "{needle:?} not in {diffs:?}"
        );
    }

    #[test]
    fn reports_each_kind_of_difference() {
        assert_one(
            diff_after(|b| fs::write(b.join("d/g"), b"G").expect("w")),
            "d/g: content differs at byte 0",
        );
        assert_one(
            diff_after(|b| fs::write(b.join("d/g"), b"gg").expect("w")),
            "d/g: size 1 vs 2",
        );
        assert_one(
            diff_after(|b| set_mtime(&b.join("d"), 1000, 6)),
            "d: mtime 1000.000000005 vs 1000.000000006",
        );
        assert_one(diff_after(|b| set_mtime(&b.join("s"), 1, 0)), "s: mtime");
        assert_one(diff_after(|b| set_mtime(b, 1, 0)), ".: mtime");
        assert_one(
            diff_after(|b| {
                fs::set_permissions(
                    b.join("d/g"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o4600),
                )
                .expect("chmod")
            }),
            "d/g: mode",
        );
        assert_one(
            diff_after(|b| set_xattr(&b.join("f"), c"user.k", b"w")),
            "f: user xattrs",
        );
        assert_one(
            diff_after(|b| set_xattr(&b.join("d"), c"user.new", b"")),
            "d: user xattrs",
        );
        assert_one(
            diff_after(|b| fs::remove_file(b.join("d/g")).expect("rm")),
            "d/g: only in",
        );
        assert_one(
            diff_after(|b| fs::write(b.join("extra"), b"").expect("w")),
            "extra: only in",
        );
        let retarget = |b: &Path| {
            fs::remove_file(b.join("s")).expect("rm");
            symlink("h", b.join("s")).expect("ln");
            set_mtime(&b.join("s"), 1000, 5);
        };
        assert_one(diff_after(retarget), "s: symlink target");
        let to_dir = |b: &Path| {
            fs::remove_file(b.join("d/g")).expect("rm");
            fs::create_dir(b.join("d/g")).expect("mkdir");
        };
        assert_one(diff_after(to_dir), "d/g: type file vs directory");
    }

    #[test]
    fn reports_owner_changes() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        assert_one(
            diff_after(|b| {
                std::os::unix::fs::lchown(b.join("s"), Some(12), Some(34)).expect("chown")
            }),
            "s: uid 0 vs 12",
        );
    }

    #[test]
    fn reports_broken_and_extra_hard_links() {
        let unlink = |b: &Path| {
            fs::remove_file(b.join("h")).expect("rm");
            fs::write(b.join("h"), b"content").expect("w");
            set_mtime(&b.join("h"), 1000, 5);
            set_xattr(&b.join("h"), c"user.k", b"v");
        };
        assert_one(
            diff_after(unlink),
            "h: hard link to f in the first tree, not in the second",
        );
        let (_tmp, a, b) = pair();
        unlink(&a);
        set_mtime(&a, 1000, 5);
        assert_eq!(
            compare_trees(&a, &b).expect("cmp"),
            vec!["h: hard link to f in the second tree, not in the first".to_string()]
        );
    }

    #[test]
    fn hole_layout_is_compared_on_request() {
        let (_tmp, a, b) = pair();
        for (root, sparse) in [(&a, true), (&b, false)] {
            let f = File::create(root.join("big")).expect("create");
            if sparse {
                f.set_len(1 << 20).expect("truncate");
            } else {
                std::io::Write::write_all(&mut &f, &vec![0u8; 1 << 20]).expect("write");
                f.sync_all().expect("sync");
            }
            set_mtime(&root.join("big"), 1000, 5);
            set_mtime(root, 1000, 5);
        }
        assert_eq!(compare_trees(&a, &b).expect("cmp"), Vec::<String>::new());
        let diffs = compare_trees_with(&a, &b, CompareOptions { holes: true }).expect("cmp");
        assert_one(diffs, "big: data/hole layout");
    }
}
