//! What the core logs when a change touches excluded paths: the behaviour,
//! and its limits, are described in `crate::exclude` ("In the mount"); the
//! records rebuilding or removing a replica's subtree come from
//! `fs::materialize`. No record ever names an excluded path.

use super::*;
use crate::fs::materialize::{self, Emit, Phase, Scope};

/// Where a change to a node is logged.
pub(super) enum Target {
    /// Under this path, or `None`: the node has no known path (a resync).
    Log(Option<Vec<u8>>),
    /// Every known name of the node is excluded: not logged.
    Skip,
}

impl Target {
    pub(super) fn logged(&self) -> bool {
        matches!(self, Target::Log(_))
    }
}

/// A rename that happened in BACKING: each side's parent, entry name, path.
pub(super) struct Renamed<'a> {
    pub from: (&'a Arc<Inode>, &'a CStr, Vec<u8>),
    pub to: (&'a Arc<Inode>, &'a CStr, Vec<u8>),
    pub flags: u32,
    /// The node moved, and the one that was at `to`, before the rename.
    pub src: libc::stat,
    pub dst: Option<libc::stat>,
    /// Both parents' mtimes after it.
    pub mtimes: (Ts, Ts),
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

impl Core {
    /// Where a change to `node` is logged: its first known name that is not
    /// excluded (cheap when the list is empty or the first name is included).
    pub(super) fn target(&self, node: &Inode) -> Target {
        let first = node.path();
        if self.excludes.is_empty() {
            return Target::Log(first);
        }
        match first {
            None => Target::Log(None),
            Some(p) if !self.excludes.is_excluded(&p) => Target::Log(Some(p)),
            Some(_) => node
                .paths()
                .into_iter()
                .find(|p| !self.excludes.is_excluded(p))
                .map_or(Target::Skip, |p| Target::Log(Some(p))),
        }
    }

    /// An entry under an excluded name was added to or removed from `dir`:
    /// logs the directory's metadata when the directory itself is logged.
    pub(super) fn dir_changed(&self, dir: &Inode) -> Res<u64> {
        let Some(path) = dir.path() else { return Ok(0) };
        if self.excludes.is_excluded(&path) {
            return Ok(0);
        }
        let st = sys::fstat(dir.raw())?;
        let op = Op::SetAttr {
            path,
            attr: attr_of(&st),
            atime: None,
        };
        self.log(Some(dir), op)
    }

    /// Logs the records `make` emits; returns the last LSN (0 for none). If
    /// they cannot all be logged, the replica's copy of `roots` is half
    /// built: those paths are recorded as needing resync.
    pub(super) fn log_many(
        &self,
        roots: &[&[u8]],
        make: impl FnOnce(&mut Emit<'_>) -> Res<()>,
    ) -> Res<u64> {
        let mut last = 0;
        let r = make(&mut |op: Op<'_>| {
            last = self.log(None, op)?;
            Ok(())
        });
        if let Err(e) = r {
            for root in roots {
                error!(
                    "cannot log the records rebuilding {:?}: {e}; marking it for resync",
                    String::from_utf8_lossy(root)
                );
                if let Err(e2) = self.wal.mark_resync(root, "rebuilding records not logged") {
                    error!("cannot record it for resync either: {e2}");
                }
            }
            return Err(e);
        }
        Ok(last)
    }

    /// A name the replica holds for the node with stat `st`, if the mount
    /// knows one: an included name outside the subtrees this change rebuilds.
    /// `moved` lists them, each with the name the replica knew it by (`None`:
    /// nothing of it is on the replica); a name inside one of them is held
    /// when its old name was included (then a `Rename` record took it along).
    fn elsewhere(&self, st: &libc::stat, moved: &[(&[u8], Option<&[u8]>)]) -> Option<Vec<u8>> {
        let node = self.inodes.by_key((st.st_dev, st.st_ino))?;
        let held = |p: &[u8]| {
            moved.iter().all(|(new, old)| {
                let Some(rest) = p.strip_prefix(*new) else {
                    return true;
                };
                if !(rest.is_empty() || rest[0] == b'/') {
                    return true;
                }
                old.is_some_and(|o| !self.excludes.is_excluded(&[o, rest].concat()))
            })
        };
        node.paths()
            .into_iter()
            .find(|p| !self.excludes.is_excluded(p) && held(p))
    }

    /// The walk scope of a change rebuilding the subtrees `moved` (see
    /// [`Core::elsewhere`]).
    pub(super) fn with_scope<T>(
        &self,
        moved: &[(&[u8], Option<&[u8]>)],
        f: impl FnOnce(&Scope<'_>) -> T,
    ) -> T {
        let elsewhere = |st: &libc::stat| self.elsewhere(st, moved);
        f(&Scope::new(&self.excludes, &elsewhere))
    }

    /// Logs a rename that happened in BACKING when excludes are configured.
    pub(super) fn log_rename(&self, r: &Renamed<'_>) -> Res<u64> {
        let (from, to) = (&r.from.2[..], &r.to.2[..]);
        let (exf, ext) = (
            self.excludes.is_excluded(from),
            self.excludes.is_excluded(to),
        );
        // What the replica holds below the names this change rebuilds.
        let moved: &[(&[u8], Option<&[u8]>)] = match (exf, ext) {
            (false, false) => &[(to, Some(from)), (from, Some(to))],
            (true, false) => &[(to, None)],
            (false, true) => &[(from, None)],
            (true, true) => &[],
        };
        let moved = if r.flags & libc::RENAME_EXCHANGE == 0 && !(exf || ext) {
            &moved[..1]
        } else {
            moved
        };
        self.with_scope(moved, |cx| self.log_rename_in(r, cx))
    }

    fn log_rename_in(&self, r: &Renamed<'_>, cx: &Scope<'_>) -> Res<u64> {
        let ex = &self.excludes;
        let (fp, fname, from) = (r.from.0, r.from.1, &r.from.2[..]);
        let (tp, tname, to) = (r.to.0, r.to.1, &r.to.2[..]);
        let exchange = r.flags & libc::RENAME_EXCHANGE != 0;
        let rename = || Op::Rename {
            from: from.to_vec(),
            to: to.to_vec(),
            flags: r.flags,
            from_parent_mtime: r.mtimes.0,
            to_parent_mtime: r.mtimes.1,
        };
        let other_parent = |lsn: u64, dir: &Inode| -> Res<u64> {
            if fp.ino == tp.ino {
                return Ok(lsn);
            }
            Ok(self.dir_changed(dir)?.max(lsn))
        };
        match (ex.is_excluded(from), ex.is_excluded(to)) {
            (false, false) => {
                let differ = ex.may_differ_below(from, to);
                let walk_src = differ && is_dir(&r.src);
                let walk_dst = differ && exchange && r.dst.as_ref().is_some_and(is_dir);
                if !walk_src && !walk_dst {
                    return self.log(None, rename());
                }
                self.log_many(&[from, to], |emit| {
                    for phase in [Phase::Before, Phase::After] {
                        if phase == Phase::After {
                            emit(rename())?;
                        }
                        // What was `from` is now at `to`, and for an exchange
                        // what was `to` at `from`.
                        if walk_src {
                            materialize::reconcile(tp.raw(), tname, (from, to), phase, cx, emit)?;
                        }
                        if walk_dst {
                            materialize::reconcile(fp.raw(), fname, (to, from), phase, cx, emit)?;
                        }
                    }
                    Ok(())
                })
            }
            (true, false) => {
                // `to` now holds what the replica never had.
                let lsn = self.log_many(&[to], |emit| {
                    if let Some(d) = &r.dst {
                        if exchange {
                            materialize::remove_tree(fp.raw(), fname, to, r.mtimes.1, cx, emit)?;
                        } else {
                            emit(Op::Remove {
                                path: to.to_vec(),
                                dir: is_dir(d),
                                parent_mtime: r.mtimes.1,
                            })?;
                        }
                    }
                    materialize::materialize(tp.raw(), tname, to, r.mtimes.1, cx, emit)
                })?;
                other_parent(lsn, fp)
            }
            (false, true) => {
                // The replica's `from` went where it must not follow.
                let lsn = self.log_many(&[from], |emit| {
                    materialize::remove_tree(tp.raw(), tname, from, r.mtimes.0, cx, emit)?;
                    if exchange {
                        materialize::materialize(fp.raw(), fname, from, r.mtimes.0, cx, emit)?;
                    }
                    Ok(())
                })?;
                other_parent(lsn, tp)
            }
            (true, true) => {
                let lsn = self.dir_changed(fp)?;
                other_parent(lsn, tp)
            }
        }
    }
}
