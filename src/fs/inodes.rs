//! The inode table: FUSE inode numbers ↔ O_PATH handles on backing inodes, and
//! the names each inode is known by, from which WAL paths are built.
//!
//! Names change only under the namespace write lock (see `ops`), so a path
//! computed under the read lock is the path the change applied to.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

pub const ROOT_INO: u64 = 1;

/// st_ctime in nanoseconds (0 before 1970).
pub fn ctime_ns(st: &libc::stat) -> u64 {
    (st.st_ctime.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_ctime_nsec.max(0) as u64)
}

/// The name of a link: a parent directory and an entry name in it.
pub type Link = (Arc<Inode>, OsString);

pub struct Inode {
    pub ino: u64,
    /// O_PATH | O_NOFOLLOW descriptor on the backing inode.
    pub fd: OwnedFd,
    /// (st_dev, st_ino) of the backing inode.
    pub key: (u64, u64),
    /// `st_mode & S_IFMT`.
    pub fmt: u32,
    nlookup: AtomicU64,
    /// Every name this inode is known by; the first is used for WAL paths.
    /// Empty for the root and for unlinked inodes.
    links: Mutex<Vec<Link>>,
    /// Orders data changes to this inode against each other (write, truncate...).
    pub data: Mutex<()>,
    /// Highest LSN of a record that changed this inode (for fsync).
    pub last_lsn: AtomicU64,
    /// st_ctime (ns) the last change replfs applied and logged left: a later
    /// ctime means the inode changed behind the daemon (a shared writable
    /// mmap of a passthrough open, see `Core::check_unlogged`).
    pub logged_ctime: AtomicU64,
}

impl Inode {
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
    }

    pub fn is_symlink(&self) -> bool {
        self.fmt == libc::S_IFLNK
    }

    /// Remembers the ctime a change replfs applied (and logs) left.
    pub fn note_ctime(&self, st: &libc::stat) {
        self.logged_ctime.store(ctime_ns(st), Ordering::Release);
    }

    pub fn note_lsn(&self, lsn: u64) {
        self.last_lsn.fetch_max(lsn, Ordering::AcqRel);
    }

    /// The first known name (parent and entry name), if any.
    pub fn first_link(&self) -> Option<Link> {
        self.links.lock().first().cloned()
    }

    pub fn add_link(&self, parent: &Arc<Inode>, name: &OsStr) {
        let mut links = self.links.lock();
        if !links.iter().any(|(p, n)| p.ino == parent.ino && n == name) {
            links.push((parent.clone(), name.to_owned()));
        }
    }

    pub fn remove_link(&self, parent: &Inode, name: &OsStr) {
        self.links
            .lock()
            .retain(|(p, n)| !(p.ino == parent.ino && n == name));
    }

    /// Moves the link `old` to `new` (rename).
    pub fn move_link(&self, old: (&Inode, &OsStr), new: (&Arc<Inode>, &OsStr)) {
        let mut links = self.links.lock();
        links.retain(|(p, n)| !(p.ino == old.0.ino && n == old.1));
        links.retain(|(p, n)| !(p.ino == new.0.ino && n == new.1));
        links.insert(0, (new.0.clone(), new.1.to_owned()));
    }

    /// Every known name's path (names under a parent of unknown path left
    /// out), the first name's first.
    pub fn paths(&self) -> Vec<Vec<u8>> {
        if self.ino == ROOT_INO {
            return vec![Vec::new()];
        }
        let links = self.links.lock().clone();
        links
            .into_iter()
            .filter_map(|(parent, name)| {
                let mut p = parent.path()?;
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name.as_bytes());
                Some(p)
            })
            .collect()
    }

    /// The path relative to the volume root, or None if the inode has no known name.
    pub fn path(&self) -> Option<Vec<u8>> {
        if self.ino == ROOT_INO {
            return Some(Vec::new());
        }
        let (parent, name) = self.first_link()?;
        let mut p = parent.path()?;
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        Some(p)
    }
}

struct Table {
    by_ino: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<(u64, u64), u64>,
    /// Allocator for inodes whose backing number cannot be used as is.
    next: u64,
    root_key: (u64, u64),
}

/// First inode number handed out for inodes on other devices or colliding numbers.
const HIGH_INO: u64 = 1 << 56;

pub struct InodeTable {
    inner: Mutex<Table>,
}

impl Table {
    /// The backing inode number itself when it is on the root's device (so
    /// `st_ino` and `d_ino` agree with the backing directory), else a fresh one.
    fn pick_ino(&mut self, key: (u64, u64)) -> u64 {
        let usable = key.0 == self.root_key.0 && key.1 > ROOT_INO && key.1 < HIGH_INO;
        if usable && !self.by_ino.contains_key(&key.1) {
            return key.1;
        }
        self.next += 1;
        self.next
    }
}

impl InodeTable {
    /// The inode number a readdir entry reports for a backing inode number.
    pub fn dirent_ino(&self, backing_ino: u64) -> u64 {
        let t = self.inner.lock();
        if backing_ino == t.root_key.1 {
            return ROOT_INO;
        }
        t.by_key
            .get(&(t.root_key.0, backing_ino))
            .copied()
            .unwrap_or(backing_ino)
    }

    pub fn new(root_fd: OwnedFd, root_st: &libc::stat) -> InodeTable {
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            fd: root_fd,
            key: (root_st.st_dev, root_st.st_ino),
            fmt: libc::S_IFDIR,
            nlookup: AtomicU64::new(2),
            links: Mutex::new(Vec::new()),
            data: Mutex::new(()),
            last_lsn: AtomicU64::new(0),
            logged_ctime: AtomicU64::new(0),
        });
        let mut t = Table {
            by_ino: HashMap::new(),
            by_key: HashMap::new(),
            next: HIGH_INO,
            root_key: root.key,
        };
        t.by_key.insert(root.key, ROOT_INO);
        t.by_ino.insert(ROOT_INO, root);
        InodeTable {
            inner: Mutex::new(t),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.inner.lock().by_ino.get(&ino).cloned()
    }

    /// The inode for a backing (dev, ino) if the table already has it.
    pub fn by_key(&self, key: (u64, u64)) -> Option<Arc<Inode>> {
        let t = self.inner.lock();
        t.by_key.get(&key).and_then(|i| t.by_ino.get(i)).cloned()
    }

    /// Registers a lookup of `parent/name` → the backing inode `fd`/`st`:
    /// reuses the existing entry for that inode (hard links) or adds one.
    /// Counts one kernel lookup reference.
    pub fn lookup(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        fd: OwnedFd,
        st: &libc::stat,
    ) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        let node = {
            let mut t = self.inner.lock();
            let existing = t.by_key.get(&key).and_then(|i| t.by_ino.get(i)).cloned();
            let n = match existing {
                Some(n) => n,
                None => {
                    let ino = t.pick_ino(key);
                    let n = Arc::new(Inode {
                        ino,
                        fd,
                        key,
                        fmt: st.st_mode & libc::S_IFMT,
                        nlookup: AtomicU64::new(0),
                        links: Mutex::new(Vec::new()),
                        data: Mutex::new(()),
                        last_lsn: AtomicU64::new(0),
                        logged_ctime: AtomicU64::new(0),
                    });
                    t.by_key.insert(key, ino);
                    t.by_ino.insert(ino, n.clone());
                    n
                }
            };
            // Counted under the table lock so a concurrent forget cannot free it.
            n.nlookup.fetch_add(1, Ordering::AcqRel);
            n
        };
        node.add_link(parent, name);
        node
    }

    /// Drops `n` kernel references; frees the entry (and parents that only
    /// it kept alive) when nothing refers to it any more.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.inner.lock();
        let Some(node) = t.by_ino.get(&ino).cloned() else {
            return;
        };
        let prev = node.nlookup.fetch_sub(
            n.min(node.nlookup.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
        if prev > n {
            return;
        }
        drop(node);
        let mut pending = vec![ino];
        while let Some(i) = pending.pop() {
            Self::try_free(&mut t, i, &mut pending);
        }
    }

    fn try_free(t: &mut Table, ino: u64, pending: &mut Vec<u64>) {
        let Some(node) = t.by_ino.get(&ino) else {
            return;
        };
        // One reference is the table's; any other is a child's link to its parent.
        if node.ino == ROOT_INO
            || node.nlookup.load(Ordering::Acquire) > 0
            || Arc::strong_count(node) > 1
        {
            return;
        }
        let node = t.by_ino.remove(&ino).expect("present");
        t.by_key.remove(&node.key);
        let parents: Vec<u64> = node.links.lock().drain(..).map(|(p, _)| p.ino).collect();
        pending.extend(parents);
    }

    pub fn len(&self) -> usize {
        self.inner.lock().by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
