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
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied());
        cmd.arg("mount")
            .arg(backing)
            .arg(mnt)
            .arg("--state")
            .arg(state)
            .arg("-f");
        if let Some(text) = config {
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
