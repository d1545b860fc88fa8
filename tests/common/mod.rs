//! Test rig: a real `replfs mount` process in the foreground, unmounted (and
//! killed if need be) on drop, so a failing test leaves no mount behind.

#![allow(dead_code)]

pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_replfs");

/// A scratch area: backing, mount point and state dirs under one tempdir.
pub struct Rig {
    pub tmp: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub state: PathBuf,
}

impl Rig {
    pub fn new() -> Rig {
        let tmp = tempfile::Builder::new()
            .prefix("replfs-test")
            .tempdir()
            .expect("tempdir");
        let backing = tmp.path().join("backing");
        let mnt = tmp.path().join("mnt");
        let state = tmp.path().join("state");
        for d in [&backing, &mnt, &state] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        Rig {
            tmp,
            backing,
            mnt,
            state,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Mounts with an optional config text.
    pub fn mount(&self, config: Option<&str>) -> Mount {
        Mount::start(&self.backing, &self.mnt, &self.state, config)
    }

    /// `replfs log replay` of the whole log into a fresh directory.
    pub fn replay(&self, name: &str, extra: &[&str]) -> PathBuf {
        let into = self.path(name);
        let out = Command::new(BIN)
            .args(["log", "replay", "--state"])
            .arg(&self.state)
            .arg("--into")
            .arg(&into)
            .args(extra)
            .output()
            .expect("run replay");
        assert!(
            out.status.success(),
            "replay failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        into
    }

    /// `replfs log dump --json` parsed into JSON values.
    pub fn dump(&self) -> Vec<serde_json::Value> {
        let out = replfs(&[
            "log",
            "dump",
            "--json",
            "--state",
            self.state.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("dump line is JSON"))
            .collect()
    }
}

pub fn replfs(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run replfs")
}

/// A live mount served by a child `replfs mount -f`.
pub struct Mount {
    pub child: Option<Child>,
    pub mnt: PathBuf,
}

pub fn is_mounted(mnt: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let m = mnt.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*m))
}

impl Mount {
    pub fn start(backing: &Path, mnt: &Path, state: &Path, config: Option<&str>) -> Mount {
        Self::start_env(backing, mnt, state, config, &[])
    }

    pub fn start_env(
        backing: &Path,
        mnt: &Path,
        state: &Path,
        config: Option<&str>,
        env: &[(&str, &str)],
    ) -> Mount {
        Self::start_full(backing, mnt, state, config, env, &[])
    }

    /// Mounts shipping to `mirror` with the key file `key`.
    pub fn start_shipping(rig: &Rig, config: Option<&str>, mirror: &str, key: &Path) -> Mount {
        let args = [
            "--mirror".to_string(),
            mirror.to_string(),
            "--key-file".into(),
            key.to_string_lossy().into(),
        ];
        Self::start_full(&rig.backing, &rig.mnt, &rig.state, config, &[], &args)
    }

    pub fn start_full(
        backing: &Path,
        mnt: &Path,
        state: &Path,
        config: Option<&str>,
        env: &[(&str, &str)],
        args: &[String],
    ) -> Mount {
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied());
        cmd.arg("mount")
            .arg(backing)
            .arg(mnt)
            .arg("--state")
            .arg(state)
            .arg("-f")
            .args(args);
        let config = test_overrides(config);
        if let Some(text) = config.as_deref() {
            let cfg = state
                .parent()
                .expect("state has a parent")
                .join("replfs-test.toml");
            std::fs::write(&cfg, text).expect("write config");
            cmd.arg("--config").arg(cfg);
        }
        cmd.env("RUST_LOG", "info").stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn replfs mount");
        let mut m = Mount {
            child: Some(child),
            mnt: mnt.to_path_buf(),
        };
        m.wait_mounted();
        m
    }

    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("replfs mount exited before mounting: {st}");
            }
            assert!(Instant::now() < deadline, "mount did not appear within 20s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Clean unmount: `fusermount3 -u`, then the daemon must exit 0.
    pub fn unmount(mut self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .expect("fusermount3");
        assert!(st.success(), "fusermount3 -u failed");
        let code = wait_timeout(self.child.as_mut().expect("child"), Duration::from_secs(30));
        self.child = None;
        assert_eq!(
            code,
            Some(0),
            "replfs mount did not exit cleanly after unmount"
        );
    }

    /// Waits for the daemon to die by itself (a failpoint), then detaches the mount.
    pub fn wait_crashed(mut self) {
        if let Some(mut c) = self.child.take() {
            let code = wait_timeout(&mut c, Duration::from_secs(20));
            assert_ne!(code, Some(0), "the daemon was expected to crash");
        }
        detach(&self.mnt);
    }

    /// kill -9 of the daemon, then detach the dead mount.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach(&self.mnt);
    }
}

/// `REPLFS_TEST_WRITEBACK_CACHE=1` runs every mount of the suites with
/// `mount.writeback_cache = true` (tests that set `[mount]` themselves keep
/// their own section).
fn test_overrides(config: Option<&str>) -> Option<String> {
    if std::env::var_os("REPLFS_TEST_WRITEBACK_CACHE").is_none_or(|v| v == "0") {
        return config.map(str::to_string);
    }
    let text = config.unwrap_or("");
    if text.contains("[mount]") {
        return Some(text.replacen("[mount]", "[mount]\nwriteback_cache = true", 1));
    }
    Some(format!("{text}\n[mount]\nwriteback_cache = true\n"))
}

fn detach(mnt: &Path) {
    for _ in 0..50 {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child up to `t`; kills it past that. Returns the exit code.
pub fn wait_timeout(c: &mut Child, t: Duration) -> Option<i32> {
    let deadline = Instant::now() + t;
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                eprintln!("replfs mount did not exit after unmount; killed");
            }
            detach(&self.mnt);
        }
    }
}

/// Asserts two trees are identical (content and metadata), listing differences.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let diffs = replfs::tools::compare_trees(a, b).expect("compare trees");
    assert!(
        diffs.is_empty(),
        "{} and {} differ:\n{}",
        a.display(),
        b.display(),
        diffs.join("\n")
    );
}

/// Runs a shell snippet in `dir`, panicking with its output on failure.
pub fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "script failed in {}:\n{script}\nstdout: {}\nstderr: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a 32-byte key file (mode 0600) and returns its path.
pub fn key_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A real `replfs mirror` process on 127.0.0.1.
pub struct MirrorProc {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub state: PathBuf,
    pub key: PathBuf,
}

impl MirrorProc {
    pub fn start(dir: &Path, state: &Path, key: &Path, port: u16) -> MirrorProc {
        let args = [
            "--dir".to_string(),
            dir.to_string_lossy().into(),
            "--key-file".into(),
            key.to_string_lossy().into(),
        ];
        Self::start_args(dir, state, key, port, &args)
    }

    /// A mirror serving the volumes of a config file (no `--dir`).
    pub fn start_config(state: &Path, config: &Path, port: u16) -> MirrorProc {
        let args = ["--config".to_string(), config.to_string_lossy().into()];
        Self::start_args(Path::new(""), state, Path::new(""), port, &args)
    }

    fn start_args(dir: &Path, state: &Path, key: &Path, port: u16, args: &[String]) -> MirrorProc {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::create_dir_all(state).unwrap();
        let child = Command::new(BIN)
            .args(["mirror", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state")
            .arg(state)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn replfs mirror");
        let mut m = MirrorProc {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
            state: state.to_path_buf(),
            key: key.to_path_buf(),
        };
        m.wait_listening();
        m
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("replfs mirror exited before listening: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "mirror did not listen within 20s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: the mirror must exit 0.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            assert_eq!(
                wait_timeout(&mut c, Duration::from_secs(20)),
                Some(0),
                "mirror exit code"
            );
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        *self = MirrorProc::start(&self.dir, &self.state, &self.key, self.port);
    }
}

impl Drop for MirrorProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `replfs status --json --state STATE` (the command must succeed).
pub fn status_json(state: &Path) -> serde_json::Value {
    let out = replfs(&["status", "--json", "--state", state.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// Polls `replfs status --json` until `done` holds for it (and returns it),
/// failing with `what` and the last status after `timeout`.
pub fn wait_status(
    state: &Path,
    timeout: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status_json(state);
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A source rig with a key file and an empty replica directory beside it
/// (`mirror-dir`, mode 0755 like BACKING), for a mirror to serve.
pub struct Site {
    pub rig: Rig,
    pub key: PathBuf,
    pub mdir: PathBuf,
}

impl Site {
    pub fn new(key_seed: u8) -> Site {
        use std::os::unix::fs::PermissionsExt;
        let rig = Rig::new();
        let mode = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(&rig.backing, mode.clone()).unwrap();
        let key = key_file(rig.tmp.path(), "key", key_seed);
        let mdir = rig.path("mirror-dir");
        std::fs::create_dir_all(&mdir).unwrap();
        std::fs::set_permissions(&mdir, mode).unwrap();
        Site { rig, key, mdir }
    }
}

/// A [`Site`] with a mirror serving its replica dir on a free port; each
/// test file adds the `mount` it needs.
pub struct Pair {
    pub rig: Rig,
    pub key: PathBuf,
    pub mdir: PathBuf,
    pub mirror: MirrorProc,
}

impl Pair {
    pub fn new(key_seed: u8) -> Pair {
        let Site { rig, key, mdir } = Site::new(key_seed);
        let mirror = MirrorProc::start(&mdir, &rig.path("mirror-state"), &key, free_port());
        Pair {
            rig,
            key,
            mdir,
            mirror,
        }
    }
}

/// Waits until the trees are identical, or fails listing the differences.
pub fn wait_converged(a: &Path, b: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        // The mirror is live (a repair may remove and recreate entries while
        // it is listed): a listing error is a difference like any other.
        let diffs = replfs::tools::compare_trees(a, b)
            .unwrap_or_else(|e| vec![format!("cannot compare the trees yet: {e}")]);
        if diffs.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{} and {} did not converge within {timeout:?}:\n{}",
                a.display(),
                b.display(),
                diffs
                    .iter()
                    .take(40)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP proxy on 127.0.0.1 whose connections can be cut at will (a link
/// that drops). Threads end when the proxy is dropped.
pub struct Proxy {
    pub port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c2, s2) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((down, _)) => {
                        down.set_nonblocking(false).unwrap();
                        let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                            continue;
                        };
                        let mut g = c2.lock().unwrap();
                        g.push(down.try_clone().unwrap());
                        g.push(up.try_clone().unwrap());
                        drop(g);
                        pump(down.try_clone().unwrap(), up.try_clone().unwrap());
                        pump(up, down);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy { port, conns, stop }
    }

    /// Cuts every open connection (both directions).
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}
