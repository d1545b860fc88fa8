//! `wal.max_size` and the WAL-full policies on a real mount: a tiny WAL
//! (4 MiB segments, 12 MiB limit) and a mirror that is down (its port has no
//! listener) until the test starts it. DESIGN.md invariant 2: a change that
//! succeeded is in the WAL or recorded for resync; a refused one never
//! happened.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::workload::pattern;
use common::*;

const FILE: usize = 256 << 10;
const CONVERGE: Duration = Duration::from_secs(90);

/// A rig whose mirror is down: `port` has no listener until [`Down::mirror_up`].
struct Down {
    rig: Rig,
    key: PathBuf,
    port: u16,
    mdir: PathBuf,
}

impl Down {
    fn new() -> Down {
        let Site { rig, key, mdir } = Site::new(9);
        Down {
            rig,
            key,
            port: free_port(),
            mdir,
        }
    }

    fn mount(&self, policy: &str) -> Mount {
        let config = format!(
            "[wal]\nsegment_size = \"4MiB\"\nmax_size = \"12MiB\"\non_wal_full = \"{policy}\"\n\
             [ship]\nmin_backoff = \"100ms\"\nmax_backoff = \"500ms\"\n"
        );
        let args = [
            "--mirror".to_string(),
            format!("127.0.0.1:{}", self.port),
            "--key-file".into(),
            self.key.to_string_lossy().into(),
        ];
        let r = &self.rig;
        Mount::start_full(&r.backing, &r.mnt, &r.state, Some(&config), &[], &args)
    }

    fn mirror_up(&self) -> MirrorProc {
        MirrorProc::start(
            &self.mdir,
            &self.rig.path("mirror-state"),
            &self.key,
            self.port,
        )
    }

    fn wal_bytes(&self) -> u64 {
        fs::read_dir(self.rig.state.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    fn resync_paths(&self) -> Vec<String> {
        replfs::catalog::Catalog::open(&self.rig.state)
            .unwrap()
            .resync_list()
            .unwrap()
            .into_iter()
            .map(|r| String::from_utf8(r.path).unwrap())
            .collect()
    }
}

fn data(i: usize) -> Vec<u8> {
    pattern(FILE, i as u64)
}

/// Writes `f{i}` of 256 KiB through the mount.
fn write_file(mnt: &Path, i: usize) -> std::io::Result<()> {
    fs::write(mnt.join(format!("f{i}")), data(i))
}

/// A child shell writing `n` files of 256 KiB through the mount; exits 3 on
/// the first failed write.
fn writer_child(mnt: &Path, from: usize, n: usize) -> Child {
    let script = format!(
        "for i in $(seq {from} {}); do head -c {FILE} /dev/urandom > w$i || exit 3; done",
        from + n - 1
    );
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(mnt)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer")
}

/// Waits until the child is blocked: alive, and BACKING has not changed
/// for 2 s (bounded by 60 s).
fn wait_blocked(child: &mut Child, backing: &Path) {
    let count = || fs::read_dir(backing).unwrap().count();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (count(), Instant::now());
    while since.elapsed() < Duration::from_secs(2) {
        assert!(Instant::now() < deadline, "the writer never blocked");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the writer ended instead of blocking: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
        let n = count();
        if n != last {
            (last, since) = (n, Instant::now());
        }
    }
}

#[test]
fn fail_mode_refuses_with_enospc_loses_nothing_and_recovers_with_the_mirror() {
    let t = Down::new();
    let m = t.mount("fail");
    let mnt = &t.rig.mnt;
    let mut refused = None;
    for i in 0..200 {
        if let Err(e) = write_file(mnt, i) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "f{i}: {e}");
            refused = Some(i);
            break;
        }
    }
    let refused = refused.expect("the WAL never refused a write");
    assert!(refused >= 20, "refused after only {refused} files");
    assert!(
        t.wal_bytes() <= 12 << 20,
        "WAL uses {} bytes",
        t.wal_bytes()
    );
    // Still refused; what was refused is not in BACKING.
    let e = fs::write(mnt.join("more"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(!t.rig.backing.join("more").exists());
    let partial = t.rig.backing.join(format!("f{refused}"));
    if let Ok(got) = fs::read(&partial) {
        assert!(got.len() < FILE && data(refused).starts_with(&got));
    }
    // Nothing lost: the WAL replays to exactly BACKING.
    std::thread::sleep(Duration::from_millis(100));
    let replayed = t.rig.replay("replayed", &[]);
    assert_same_tree(&replayed, &t.rig.backing);
    // The mirror comes up: the backlog drains and writes are accepted again.
    let _mirror = t.mirror_up();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = fs::write(mnt.join("more"), b"x") {
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(Instant::now() < deadline, "writes still refused after 60s");
        std::thread::sleep(Duration::from_millis(100));
    }
    write_file(mnt, refused).unwrap();
    wait_converged(&t.rig.backing, &t.mdir, CONVERGE);
    m.unmount();
    assert!(t.wal_bytes() <= 12 << 20);
}

#[test]
fn block_mode_blocks_the_writer_until_the_mirror_drains_the_wal() {
    let t = Down::new();
    let m = t.mount("block");
    let mut w = writer_child(&t.rig.mnt, 0, 80);
    wait_blocked(&mut w, &t.rig.backing);
    let blocked_at = fs::read_dir(&t.rig.backing).unwrap().count();
    assert!(
        blocked_at < 80,
        "all 80 files (20 MiB) went into a 12 MiB WAL"
    );
    assert!(t.wal_bytes() <= 12 << 20);
    let _mirror = t.mirror_up();
    assert_eq!(
        wait_timeout(&mut w, Duration::from_secs(120)),
        Some(0),
        "the writer did not finish once the mirror was up"
    );
    assert_eq!(fs::read_dir(&t.rig.backing).unwrap().count(), 80);
    wait_converged(&t.rig.backing, &t.mdir, CONVERGE);
    m.unmount();
}

#[test]
fn block_mode_unmount_does_not_hang_with_a_blocked_writer() {
    let t = Down::new();
    let mut m = t.mount("block");
    let mut w = writer_child(&t.rig.mnt, 0, 80);
    wait_blocked(&mut w, &t.rig.backing);
    // Stopping the daemon releases the blocked writer (ENOSPC) ...
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    let code = wait_timeout(&mut w, Duration::from_secs(10));
    assert_eq!(code, Some(3), "the blocked writer was not released");
    // ... and the unmount completes: by the daemon itself, or by
    // fusermount3 once the writer's file is closed.
    let mut child = m.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&t.rig.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "fusermount3 -u failed");
    }
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(30)),
        Some(0),
        "the daemon did not exit cleanly"
    );
    assert!(!is_mounted(&t.rig.mnt));
    // Nothing lost: the WAL replays to exactly BACKING.
    let replayed = t.rig.replay("replayed", &[]);
    assert_same_tree(&replayed, &t.rig.backing);
}

/// Writes past the limit in `resync` mode: every write succeeds. Returns
/// the number of files written.
fn overfill_resync(t: &Down) -> usize {
    let mnt = &t.rig.mnt;
    let n = 70; // 17.5 MiB into a 12 MiB WAL
    for i in 0..n {
        write_file(mnt, i).unwrap_or_else(|e| panic!("f{i}: {e}"));
    }
    fs::create_dir(mnt.join("late")).unwrap();
    fs::write(mnt.join("late/a"), b"after the limit").unwrap();
    fs::rename(mnt.join("f0"), mnt.join("late/f0")).unwrap();
    fs::rename(mnt.join(format!("f{}", n - 1)), mnt.join("late/last")).unwrap();
    n
}

#[test]
fn resync_mode_writes_succeed_and_unlogged_paths_are_in_the_catalog() {
    let t = Down::new();
    let m = t.mount("resync");
    let n = overfill_resync(&t);
    assert!(
        t.wal_bytes() <= 12 << 20,
        "WAL uses {} bytes",
        t.wal_bytes()
    );
    let marked = t.resync_paths();
    let mut dedup = marked.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        marked.len(),
        "a path recorded twice: {marked:?}"
    );
    // Once per path: "late/last" is covered by "late" (a subtree).
    let covered = |p: &str| {
        marked
            .iter()
            .any(|m| p == m || p.starts_with(&format!("{m}/")))
    };
    for p in ["late", format!("f{}", n - 2).as_str(), "f0"] {
        assert!(marked.iter().any(|m| m == p), "{p} not in {marked:?}");
    }
    assert!(!marked.iter().any(|m| m == "late/last"), "{marked:?}");
    // Nothing lost: every file that the WAL does not reproduce is marked.
    std::thread::sleep(Duration::from_millis(100));
    let replayed = t.rig.replay("replayed", &[]);
    let mut unlogged = 0;
    for i in 1..n - 1 {
        let name = format!("f{i}");
        if fs::read(replayed.join(&name)).ok() != Some(data(i)) {
            unlogged += 1;
            assert!(covered(&name), "{name} neither logged nor marked");
        }
    }
    assert!(unlogged > 0, "the limit was never reached");
    for p in ["late/a", "late/f0", "late/last"] {
        assert!(covered(p), "{p} neither logged nor marked");
    }
    m.unmount();
}

#[test]
fn resync_mode_logs_again_once_the_mirror_drains() {
    let t = Down::new();
    let m = t.mount("resync");
    let n = overfill_resync(&t);
    let _mirror = t.mirror_up();
    // New paths replicate again once logging resumed (each is a new name:
    // one created while logging was still paused stays marked).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut k = 0;
    loop {
        let name = format!("x{k}");
        fs::write(t.rig.mnt.join(&name), name.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let got = (0..=k).find(|j| {
            let name = format!("x{j}");
            fs::read(t.mdir.join(&name)).ok().as_deref() == Some(name.as_bytes())
        });
        if got.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "nothing logged after the drain");
        k += 1;
    }
    // A path marked while logging was paused may still be marked (then its
    // change is recorded, not logged) or already repaired (then logged):
    // either way the change reaches the mirror.
    let name = format!("f{}", n - 2);
    fs::write(t.rig.mnt.join(&name), b"changed again").unwrap();
    let deadline = Instant::now() + CONVERGE;
    while fs::read(t.mdir.join(&name)).ok().as_deref() != Some(&b"changed again"[..]) {
        assert!(Instant::now() < deadline, "{name} never reached the mirror");
        std::thread::sleep(Duration::from_millis(100));
    }
    m.unmount();
}

/// The shipper repairs the catalog's resync rows (a checksum sync once
/// caught up, then `Catalog::clear_resync`): the mirror converges.
#[test]
fn resync_mode_converges_after_repair() {
    let t = Down::new();
    let m = t.mount("resync");
    overfill_resync(&t);
    let _mirror = t.mirror_up();
    // Changes after the mirror is back are logged (or marked) as usual.
    fs::write(t.rig.mnt.join("after"), b"mirror is back").unwrap();
    wait_converged(&t.rig.backing, &t.mdir, CONVERGE);
    m.unmount();
}
