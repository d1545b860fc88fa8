//! Failover and failback between two sites, as docs/operations.md tells an
//! administrator to do them: site A serves its data directory of volume
//! `vol1` (mounted in place) and ships to a mirror serving site B's copy
//! (`[[mirror.volume]]` in the mirror's config). Failover: unmount A, drain
//! with `replfs ship`, stop the mirror (SIGTERM), and mount B's copy in place
//! as the new source with a fresh state dir, shipping to A's address. B works
//! while A is down. Failback: a mirror on A serves A's old directory; B's
//! first connection runs a delta baseline that sends only what differs. Then
//! the same way back from B to A. Each site keeps one mirror state dir (like
//! /var/lib/replfs/mirror): new on A at the failback, and on the way back
//! B's old one, whose copy belongs to A's old source: a baseline either way.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::workload::{mixed_workload, pattern, setxattr};
use common::*;

const CONVERGE: Duration = Duration::from_secs(120);
const BIG: usize = 24 << 20;

/// Waits until nothing is left to ship or repair and the sync figures in the
/// status snapshot (refreshed about once a second) stand still; returns it.
fn settled_status(state: &Path) -> serde_json::Value {
    let deadline = Instant::now() + CONVERGE;
    let mut last: Option<serde_json::Value> = None;
    loop {
        let st = status_json(state);
        let settled = st["resync_pending"] == 0
            && st["lag_records"] == 0
            && st["link"] == "connected"
            && st["sync"]["phase"] == "idle";
        if settled && last.as_ref().is_some_and(|l| l["sync"] == st["sync"]) {
            return st;
        }
        last = settled.then_some(st.clone());
        assert!(Instant::now() < deadline, "never settled: {st}");
        std::thread::sleep(Duration::from_millis(1200));
    }
}

/// `replfs verify --state STATE --config C` (the config names the volume):
/// exit code and report.
fn verify(state: &Path) -> (i32, String) {
    let out = replfs(&[
        "verify",
        "--state",
        state.to_str().unwrap(),
        "--config",
        config_of(state).to_str().unwrap(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The sources' config: the volume id the mirror knows.
const SOURCE_CONFIG: &str = "[ship]\nvolume = \"vol1\"\n";

/// `replfs mount DIR DIR --state STATE --config C --mirror ADDR --key-file
/// KEY -f`: the site's directory served in place (C is written next to
/// STATE, see [`config_of`]).
fn mount_in_place(dir: &Path, state: &Path, mirror: &str, key: &Path) -> Mount {
    let args = [
        "--mirror".to_string(),
        mirror.to_string(),
        "--key-file".into(),
        key.to_string_lossy().into(),
    ];
    Mount::start_full(dir, dir, state, Some(SOURCE_CONFIG), &[], &args)
}

/// The config file the mount of `state` was given.
fn config_of(state: &Path) -> PathBuf {
    state.parent().unwrap().join("replfs-test.toml")
}

/// Apparent bytes of the regular files below `root` (the tree size).
fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                total += e.metadata().unwrap().len();
            }
        }
    }
    total
}

/// Data that existed before replfs: a large file and many small ones.
fn seed(root: &Path) {
    fs::write(root.join("big.img"), pattern(BIG, 1)).unwrap();
    for i in 0..400usize {
        let d = root.join(format!("docs/d{:02}", i % 20));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i:04}")), pattern(8000 + i * 37, i as u64)).unwrap();
    }
}

/// What a site changes while it is the source: new files, a few blocks of
/// the large file rewritten, removals, a rename, metadata. Returns the file
/// bytes the other copy lacks afterwards (new files and rewritten blocks).
fn work(root: &Path, round: u64) -> u64 {
    let mut changed = 0u64;
    let new = root.join(format!("new-{round}"));
    fs::create_dir(&new).unwrap();
    for i in 0..30u64 {
        let data = pattern(20_000 + i as usize, round * 1000 + i);
        changed += data.len() as u64;
        fs::write(new.join(format!("n{i:02}")), data).unwrap();
    }
    // Three 4 KiB writes in three 64 KiB blocks of the large file.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(root.join("big.img"))
        .unwrap();
    for (k, off) in [1u64 << 20, 9 << 20, 17 << 20].iter().enumerate() {
        f.write_all_at(&pattern(4096, round * 10 + k as u64), off + round * 8192)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    changed += 3 * (64 << 10);
    // Removals: ten small files and a whole directory.
    for i in 0..10usize {
        let i = i * 7 + round as usize;
        let _ = fs::remove_file(root.join(format!("docs/d{:02}/f{i:04}", i % 20)));
    }
    fs::remove_dir_all(root.join(format!("docs/d{:02}", 10 + round))).unwrap();
    // A rename, a hard link, metadata.
    // (f0023, then f0063: files no earlier round removed or renamed)
    fs::rename(
        root.join(format!("docs/d03/f{:04}", 40 * round - 17)),
        new.join("renamed"),
    )
    .unwrap();
    fs::hard_link(new.join("n00"), new.join("n00-link")).unwrap();
    fs::set_permissions(new.join("n01"), fs::Permissions::from_mode(0o600)).unwrap();
    setxattr(
        &new.join("n02"),
        "user.site",
        format!("round {round}").as_bytes(),
    );
    changed
}

/// One site's data directory, and the figures of the sync that reached it.
struct Site {
    name: &'static str,
    dir: PathBuf,
    root: PathBuf,
}

impl Site {
    fn new(tmp: &Path, name: &'static str) -> Site {
        let root = tmp.join(name);
        let dir = root.join("data");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Site { name, dir, root }
    }

    /// A fresh source state dir on this site (never reuse one across a
    /// failover).
    fn fresh_state(&self, n: u32) -> PathBuf {
        let p = self.root.join(format!("state-{n}"));
        assert!(!p.exists(), "{} is not fresh", p.display());
        p
    }

    /// `replfs mirror --config MIRROR_TOML --state MIRROR_STATE` serving
    /// this site's directory as volume `vol1`; the site's one mirror state
    /// dir is kept from one run to the next.
    fn mirror(&self, key: &Path, port: u16) -> MirrorProc {
        let cfg = self.root.join("mirror.toml");
        fs::write(
            &cfg,
            format!(
                "[[mirror.volume]]\nid = \"vol1\"\ndir = {:?}\nkey_file = {:?}\n",
                self.dir, key
            ),
        )
        .unwrap();
        MirrorProc::start_config(&self.root.join("mirror-state"), &cfg, port)
    }
}

/// A source shipping to a live mirror, both converged.
struct Pairing {
    mount: Mount,
    mirror: MirrorProc,
    state: PathBuf,
}

/// Failover from `old` (the source of `p`) to `new` (its DR copy), then
/// failback pairing: `new` becomes the source, `work` runs on it while
/// `old` is down, then a mirror with a fresh state dir serves `old`'s
/// directory and the delta baseline brings it in line.
fn switch(p: Pairing, old: &Site, new: &Site, key: &Path, round: u64) -> Pairing {
    // 1. Stop shipping: unmount the source, drain what is left.
    p.mount.unmount();
    let out = replfs(&[
        "ship",
        "--state",
        p.state.to_str().unwrap(),
        "--config",
        config_of(&p.state).to_str().unwrap(),
        "--timeout",
        "60s",
    ]);
    assert!(
        out.status.success(),
        "replfs ship: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status_json(&p.state);
    assert_eq!(st["head_lsn"], st["acked_lsn"], "nothing unshipped: {st}");
    // 2. Stop the mirror on the DR site (it must exit 0).
    let mut mirror = p.mirror;
    mirror.stop();
    assert_same_tree(&old.dir, &new.dir);
    // 3. The DR copy is the new source: mounted in place with a fresh state
    // dir, shipping to the old site's address, where nothing listens yet.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let state = new.fresh_state(round as u32);
    let mount = mount_in_place(&new.dir, &state, &addr, key);
    let changed = work(&new.dir, round);
    // What `replfs status` shows meanwhile (the snapshot is a second old at
    // most): the link retrying, and the lag growing.
    std::thread::sleep(Duration::from_millis(2100));
    let st = status_json(&state);
    assert_eq!(st["link"], "retrying", "the old site is down: {st}");
    assert!(st["lag_records"].as_u64().unwrap() > 0, "{st}");
    assert!(st["lag_bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(st["lag_seconds"].as_f64().unwrap() > 1.0, "{st}");
    // 4. Failback pairing: the old site's directory becomes the mirror's
    // replica (its copy belongs to no source or to an old one).
    let mirror = old.mirror(key, port);
    wait_converged(&new.dir, &old.dir, CONVERGE);
    let st = settled_status(&state);
    wait_converged(&new.dir, &old.dir, CONVERGE);
    let (code, text) = verify(&state);
    assert_eq!(code, 0, "replfs verify: {text}");
    assert!(text.contains("identical"), "{text}");
    let sync = &st["sync"];
    let (sent, data) = (
        sync["bytes_sent"].as_u64().unwrap(),
        sync["data_sent"].as_u64().unwrap(),
    );
    let total = tree_bytes(&new.dir);
    eprintln!(
        "failback {} -> {}: delta baseline sent {sent} bytes on the wire ({data} bytes of \
         file data) for a {total}-byte tree: {:.2}% of it; the changes made on {} while \
         {} was down were ~{changed} bytes",
        new.name,
        old.name,
        100.0 * sent as f64 / total as f64,
        new.name,
        old.name,
    );
    assert_eq!(sync["baselines"], 1, "one delta baseline: {st}");
    assert!(
        data <= changed + (64 << 10),
        "only the differing blocks and files travel: {data} bytes of data for ~{changed} \
         changed"
    );
    assert!(sent < total / 10, "{sent} of {total} bytes sent");
    Pairing {
        mount,
        mirror,
        state,
    }
}

#[test]
fn failover_then_failback_each_way_sends_only_the_differences() {
    let tmp = tempfile::Builder::new()
        .prefix("replfs-failover")
        .tempdir()
        .unwrap();
    let key = key_file(tmp.path(), "vol.key", 5);
    let a = Site::new(tmp.path(), "site-a");
    let b = Site::new(tmp.path(), "site-b");
    seed(&a.dir);

    // Normal operation: A is the source, B the DR copy.
    let mirror = b.mirror(&key, free_port());
    let state = a.fresh_state(0);
    let mount = mount_in_place(&a.dir, &state, &mirror.addr(), &key);
    fs::create_dir(a.dir.join("mixed")).unwrap();
    mixed_workload(&a.dir.join("mixed"));
    wait_converged(&a.dir, &b.dir, CONVERGE);
    let st = settled_status(&state);
    let first = st["sync"]["bytes_sent"].as_u64().unwrap();
    eprintln!(
        "first pairing A -> B (empty copy): baseline sent {first} bytes for a {}-byte tree",
        tree_bytes(&a.dir)
    );
    let p = Pairing {
        mount,
        mirror,
        state,
    };

    // Failover to B, B works, failback pairing B -> A.
    let p = switch(p, &a, &b, &key, 1);
    // And the same way back: A is the source again, B the DR copy.
    let p = switch(p, &b, &a, &key, 2);

    p.mount.unmount();
    let mut mirror = p.mirror;
    mirror.stop();
    assert_same_tree(&a.dir, &b.dir);
}
