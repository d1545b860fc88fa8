//! Packaging: the mount helper (with a fake and with the real binary),
//! `--version`, generated man pages and completions, the systemd units
//! (`systemd-analyze verify` when installed) and the Debian package (built
//! and inspected when `cargo deb` is installed; its asset list is checked
//! either way).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_replfs");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn helper() -> PathBuf {
    root().join("packaging/mount.replfs")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("replfs-pkg")
        .tempdir()
        .expect("tempdir")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fake replfs that writes its argv, one argument a line, to $ARGV_OUT.
fn fake_replfs(dir: &Path) -> PathBuf {
    let p = dir.join("fake-replfs");
    std::fs::write(
        &p,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > \"$ARGV_OUT\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn run_helper(fake: &Path, argv_out: &Path, args: &[&str]) -> Output {
    Command::new(helper())
        .args(args)
        .env("REPLFS_BIN", fake)
        .env("ARGV_OUT", argv_out)
        .output()
        .expect("run mount.replfs")
}

#[test]
fn mount_helper_maps_fstab_options() {
    let tmp = tempdir();
    let fake = fake_replfs(tmp.path());
    let out = tmp.path().join("argv");
    // As mount(8) calls it for the fstab line
    // `/srv/b /srv/m replfs state=...,mirror=...,key_file=...,config=...,_netdev 0 0`.
    let o = run_helper(
        &fake,
        &out,
        &[
            "/srv/b",
            "/srv/my mnt",
            "-n",
            "-o",
            "rw,state=/var/lib/replfs/x,mirror=host:7450,key_file=/etc/replfs/x.key,\
             config=/etc/replfs/x.toml,_netdev,nofail,x-systemd.automount,comment=dr,defaults",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let argv = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        argv.lines().collect::<Vec<_>>(),
        [
            "mount",
            "/srv/b",
            "/srv/my mnt",
            "--state",
            "/var/lib/replfs/x",
            "--config",
            "/etc/replfs/x.toml",
            "--mirror",
            "host:7450",
            "--key-file",
            "/etc/replfs/x.key",
        ]
    );

    // `mount -t replfs B M -o state=S`: only the state dir.
    std::fs::remove_file(&out).unwrap();
    let o = run_helper(&fake, &out, &["-o", "state=/s", "/b", "/m"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "mount\n/b\n/m\n--state\n/s\n"
    );

    // -f (fake): print the command, run nothing.
    std::fs::remove_file(&out).unwrap();
    let o = run_helper(&fake, &out, &["/b", "/m", "-fv", "-o", "state=/s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.exists(), "-f must not run replfs");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mount /b /m --state /s"),
        "{}",
        text(&o)
    );
}

#[test]
fn mount_helper_refuses_bad_options() {
    let tmp = tempdir();
    let fake = fake_replfs(tmp.path());
    let out = tmp.path().join("argv");
    for (opts, msg) in [
        ("state=/s,bogus=1", "unknown option 'bogus=1'"),
        ("state=/s,ro", "read-only"),
        ("mirror=h:1", "state=DIR is required"),
        ("state=", "needs a value"),
    ] {
        let o = run_helper(&fake, &out, &["/b", "/m", "-o", opts]);
        assert_eq!(o.status.code(), Some(1), "{opts}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(msg),
            "{opts}: {}",
            text(&o)
        );
        assert!(!out.exists(), "{opts}: replfs must not run");
    }
    // Missing MOUNTPOINT: usage.
    let o = run_helper(&fake, &out, &["/b", "-o", "state=/s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("usage"));
    // replfs itself failing is a mount failure: 32.
    let o = Command::new(helper())
        .args(["/b", "/m", "-o", "state=/s"])
        .env("REPLFS_BIN", "/bin/false")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(32), "{}", text(&o));
}

#[test]
fn version_names_format_versions() {
    for flag in ["--version", "-V"] {
        let o = Command::new(BIN).arg(flag).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.starts_with("replfs "), "{s}");
        assert!(s.contains(env!("CARGO_PKG_VERSION")), "{s}");
        assert!(
            s.contains(&format!(
                "WAL format {}",
                replfs::wal::segment::FORMAT_VERSION
            )),
            "{s}"
        );
        assert!(
            s.contains(&format!("protocol {}", replfs::proto::PROTO_VERSION)),
            "{s}"
        );
    }
}

#[test]
fn generates_man_pages_and_completions() {
    let tmp = tempdir();
    let man = tmp.path().join("man");
    let o = Command::new(BIN).arg("gen-man").arg(&man).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for page in [
        "replfs.1",
        "replfs-mount.1",
        "replfs-mirror.1",
        "replfs-ship.1",
        "replfs-status.1",
        "replfs-throttle.1",
        "replfs-log-dump.1",
        "replfs-log-replay.1",
    ] {
        let s = std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(s.contains(".TH"), "{page} is not roff");
    }
    let mount = std::fs::read_to_string(man.join("replfs-mount.1")).unwrap();
    assert!(mount.contains("key\\-file"), "{mount}");
    // The packaging subcommands stay out of the pages and the help.
    assert!(!man.join("replfs-gen-man.1").exists());
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("gen-man"));

    let comp = tmp.path().join("comp");
    for (shell, file) in [
        ("bash", "replfs.bash"),
        ("zsh", "_replfs"),
        ("fish", "replfs.fish"),
    ] {
        let o = Command::new(BIN)
            .args(["gen-completions", shell])
            .arg(&comp)
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}: {}", text(&o));
        let s = std::fs::read_to_string(comp.join(file)).unwrap();
        assert!(s.contains("mount") && s.contains("throttle"), "{shell}");
    }
    let o = Command::new("bash")
        .arg("-n")
        .arg(comp.join("replfs.bash"))
        .output()
        .unwrap();
    assert!(o.status.success(), "bash completion: {}", text(&o));
}

#[test]
fn systemd_units_verify() {
    let units = root().join("packaging/systemd");
    let mirror = std::fs::read_to_string(units.join("replfs-mirror.service")).unwrap();
    let mount = std::fs::read_to_string(units.join("replfs-mount@.service")).unwrap();
    for needle in [
        "ExecStart=/usr/bin/replfs mirror --config /etc/replfs/mirror.toml --state /var/lib/replfs/mirror",
        "After=network-online.target",
        "Wants=network-online.target",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(mirror.contains(needle), "mirror unit lacks {needle}");
    }
    for needle in [
        "EnvironmentFile=/etc/replfs/%i.env",
        "--state /var/lib/replfs/%i --config /etc/replfs/%i.toml",
        " -f\n",
        "ExecStop=-/bin/sh -c ",
        "/usr/bin/fusermount3 -u \"$${MOUNTPOINT}\" || /usr/bin/fusermount3 -uz",
        "ExecStartPost=",
        "After=network-online.target",
        "Restart=on-failure",
    ] {
        assert!(mount.contains(needle), "mount unit lacks {needle}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("systemd-analyze not installed: unit syntax not verified");
        return;
    }
    // Verify copies that run the binary under test (/usr/bin/replfs is not
    // installed here), the template as an instance.
    let tmp = tempdir();
    let fix = |s: &str| s.replace("/usr/bin/replfs", BIN);
    let a = tmp.path().join("replfs-mirror.service");
    let b = tmp.path().join("replfs-mount@vol1.service");
    std::fs::write(&a, fix(&mirror)).unwrap();
    std::fs::write(tmp.path().join("replfs-mount@.service"), fix(&mount)).unwrap();
    std::fs::write(&b, fix(&mount)).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "systemd-analyze verify: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("replfs-m"),
        "systemd-analyze complains: {err}"
    );
}

/// The asset list in Cargo.toml: sources that exist in the tree, and
/// generated ones under target/packaging/ that build-deb.sh produces.
fn deb_assets() -> Vec<(String, String)> {
    let cargo: toml::Value =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let deb = &cargo["package"]["metadata"]["deb"];
    assert!(
        deb["depends"].as_str().unwrap().contains("fuse3"),
        "the package must depend on fuse3"
    );
    deb["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (
                a[0].as_str().unwrap().to_string(),
                a[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn deb_assets_are_complete() {
    let assets = deb_assets();
    let dests: Vec<&str> = assets.iter().map(|(_, d)| d.as_str()).collect();
    for d in [
        "usr/bin/",
        "sbin/mount.replfs",
        "lib/systemd/system/",
        "etc/replfs/replfs.example.toml",
        "usr/share/man/man1/",
        "usr/share/bash-completion/completions/replfs",
    ] {
        assert!(dests.contains(&d), "no asset installs to {d}");
    }
    let script = std::fs::read_to_string(root().join("packaging/build-deb.sh")).unwrap();
    for (src, _) in &assets {
        if let Some(generated) = src.strip_prefix("target/packaging/") {
            // Produced by build-deb.sh: check it names what gen-* write.
            let name = generated.rsplit('/').next().unwrap();
            assert!(
                ["*.1.gz", "replfs.bash", "_replfs", "replfs.fish"].contains(&name),
                "unexpected generated asset {src}"
            );
            assert!(script.contains("gen-man") && script.contains("gen-completions"));
        } else if src != "target/release/replfs" {
            assert!(root().join(src).exists(), "asset {src} missing");
        }
    }
}

#[test]
fn the_deb_package_holds_and_runs_what_it_should() {
    let have_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    // CI installs cargo-deb (.ci/run): there the package must be built.
    assert!(
        have_cargo_deb || std::env::var_os("CI").is_none(),
        "cargo-deb is missing on CI: .ci/run installs it"
    );
    if !have_cargo_deb {
        println!(
            "cargo-deb not installed: .deb not built (asset list checked by deb_assets_are_complete)"
        );
        return;
    }
    let o = Command::new(root().join("packaging/build-deb.sh"))
        .current_dir(root())
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(o.status.success(), "build-deb.sh: {}", text(&o));
    let debs: Vec<PathBuf> = std::fs::read_dir(root().join("target/debian"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("replfs_{}", env!("CARGO_PKG_VERSION"))) && n.ends_with(".deb")
        })
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    let o = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&debs[0])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let list = String::from_utf8_lossy(&o.stdout);
    for f in [
        "./usr/bin/replfs",
        "./sbin/mount.replfs",
        "./lib/systemd/system/replfs-mirror.service",
        "./lib/systemd/system/replfs-mount@.service",
        "./etc/replfs/replfs.example.toml",
        "./usr/share/man/man1/replfs.1.gz",
        "./usr/share/man/man1/replfs-mount.1.gz",
        "./usr/share/bash-completion/completions/replfs",
        "./usr/share/zsh/vendor-completions/_replfs",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(f)),
            "{f} not in the package:\n{list}"
        );
    }
    let o = Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&debs[0])
        .arg("conffiles")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/etc/replfs/replfs.example.toml"),
        "{}",
        text(&o)
    );
    let o = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&debs[0])
        .arg("Depends")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("fuse3"),
        "{}",
        text(&o)
    );
    // The packaged binary runs and names its formats.
    let root_dir = tempfile::tempdir().unwrap();
    let o = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&debs[0])
        .arg(root_dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new(root_dir.path().join("usr/bin/replfs"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("protocol"),
        "{}",
        text(&o)
    );
}

fn is_mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let m = mnt.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*m))
}

/// Whether a daemon answers `replfs status` on STATE; None when status
/// itself failed (a daemon closing its control socket mid-request).
fn daemon_running(state: &Path) -> Option<bool> {
    let o = Command::new(BIN)
        .args(["status", "--json", "--state"])
        .arg(state)
        .output()
        .unwrap();
    if !o.status.success() {
        eprintln!("status failed (retrying): {}", text(&o));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    Some(v["daemon"].as_bool().expect("status has daemon"))
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
            if is_mounted(&self.0) {
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.0).status();
            }
        }
    }
}

#[test]
fn mount_helper_mounts_for_real() {
    let tmp = tempdir();
    let (backing, mnt, state) = (
        tmp.path().join("backing"),
        tmp.path().join("mnt"),
        tmp.path().join("state"),
    );
    for d in [&backing, &mnt, &state] {
        std::fs::create_dir(d).unwrap();
    }
    let guard = Unmount(mnt.clone());
    let o = Command::new(helper())
        .arg(&backing)
        .arg(&mnt)
        .arg("-o")
        .arg(format!("state={},_netdev,defaults", state.display()))
        .env("REPLFS_BIN", BIN)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount.replfs: {}", text(&o));
    // The helper returns once the daemon says the mount is live.
    assert!(is_mounted(&mnt), "not in mountinfo after mount.replfs");
    std::fs::write(mnt.join("hello"), b"through the mount\n").unwrap();
    assert_eq!(
        std::fs::read(backing.join("hello")).unwrap(),
        b"through the mount\n"
    );
    assert_eq!(
        daemon_running(&state),
        Some(true),
        "no daemon answers on the state dir"
    );

    let o = Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(o.status.success(), "fusermount3 -u: {}", text(&o));
    assert!(!is_mounted(&mnt));
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon_running(&state) != Some(false) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not exit within 30s of the unmount"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The change was logged: the WAL holds the create and the write.
    let o = Command::new(BIN)
        .args(["log", "dump", "--json", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello"));
    drop(guard);
}

/// Runs `replfs mirror` until it listens, then SIGTERM; returns its stderr.
/// With `journal`, JOURNAL_STREAM names the stderr file as systemd would.
fn mirror_stderr(journal: bool, extra_env: &[(&str, &str)]) -> String {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempdir();
    let (dir, state, key, err) = (
        tmp.path().join("dir"),
        tmp.path().join("state"),
        tmp.path().join("key"),
        tmp.path().join("stderr"),
    );
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let f = std::fs::File::create(&err).unwrap();
    let md = f.metadata().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(BIN);
    cmd.args(["mirror", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--dir")
        .arg(&dir)
        .arg("--state")
        .arg(&state)
        .arg("--key-file")
        .arg(&key)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .envs(extra_env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(f);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()));
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the mirror did not listen");
        assert!(child.try_wait().unwrap().is_none(), "the mirror exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // That probe closed without a handshake: wait for the mirror's warning.
    while !std::fs::read_to_string(&err).unwrap().contains("handshake") {
        assert!(Instant::now() < deadline, "no handshake warning");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the mirror did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(&err).unwrap()
}

#[test]
fn under_systemd_log_lines_carry_syslog_priorities_for_the_journal() {
    // stderr is the journal stream: `<N>` priority, module, no timestamp.
    let out = mirror_stderr(true, &[]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>replfs::mirror: mirror listening on 127.0.0.1:")),
        "{out}"
    );
    // The probe connection closed without a handshake: a warning.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>replfs::mirror::server: peer 127.0.0.1:")),
        "{out}"
    );
    for l in &lines {
        let ok = ["<3>", "<4>", "<6>", "<7>"]
            .iter()
            .any(|p| l.starts_with(p));
        assert!(
            ok && !l.contains("Z INFO") && !l.contains("Z WARN"),
            "{l:?} in\n{out}"
        );
    }
    // RUST_LOG still rules.
    let out = mirror_stderr(true, &[("RUST_LOG", "warn")]);
    assert!(!out.contains("<6>"), "{out}");
    assert!(out.contains("<4>replfs::mirror::server: peer "), "{out}");
    // A JOURNAL_STREAM that is not this stderr (inherited by a process whose
    // stderr was redirected) keeps the ordinary format.
    let tmp = tempdir();
    let other = std::fs::File::create(tmp.path().join("x")).unwrap();
    let md = std::os::unix::fs::MetadataExt::ino(&other.metadata().unwrap());
    let out = mirror_stderr(false, &[("JOURNAL_STREAM", &format!("1:{md}"))]);
    assert!(!out.contains("<6>"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("[20") && l.contains(" INFO  replfs::mirror] mirror listening")),
        "{out}"
    );
}

/// The shell command of `KEY=-/bin/sh -c '...'` in the mount unit, as
/// systemd runs it (`$$` is a literal `$`).
fn unit_sh(key: &str) -> String {
    let unit =
        std::fs::read_to_string(root().join("packaging/systemd/replfs-mount@.service")).unwrap();
    let line = unit
        .lines()
        .find(|l| l.starts_with(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the mount unit"));
    let cmd = line[key.len() + 1..].trim_start_matches('-');
    let script = cmd
        .strip_prefix("/bin/sh -c '")
        .and_then(|s| s.strip_suffix('\''))
        .unwrap_or_else(|| panic!("{key} is not /bin/sh -c '...': {line}"));
    script.replace("$$", "$")
}

fn run_unit_sh(key: &str, mountpoint: &Path) -> Output {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(unit_sh(key))
        .env("MOUNTPOINT", mountpoint)
        .output()
        .unwrap()
}

/// The topmost filesystem type mounted at `mnt`, if any.
fn top_fstype(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let m = mnt.to_string_lossy();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&*m))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|t| t.split(' ').next())
        .map(str::to_string)
}

/// Unmounts the tmpfs (and anything above it) on drop.
struct TmpfsGuard(PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        for _ in 0..5 {
            if top_fstype(&self.0).is_none() {
                return;
            }
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn spawn_in_place_mount(dir: &Path, state: &Path) -> std::process::Child {
    let mut c = Command::new(BIN)
        .args(["mount"])
        .arg(dir)
        .arg(dir)
        .arg("--state")
        .arg(state)
        .arg("-f")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // ExecStartPost returns once the mount is live.
    let o = run_unit_sh("ExecStartPost", dir);
    assert!(o.status.success(), "ExecStartPost: {}", text(&o));
    assert_eq!(top_fstype(dir).as_deref(), Some("fuse"));
    assert!(c.try_wait().unwrap().is_none());
    c
}

fn wait_exit(c: &mut std::process::Child, what: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{what}: the daemon did not exit within 30s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The mount unit's ExecStartPost and ExecStop, run as systemd would, on a
/// mount in place over BACKING's own filesystem (a tmpfs here): the start
/// waits for the live mount; a busy mount is detached lazily and the daemon
/// flushes and exits 0 when its last file closes (what was written after
/// the detach is logged); once replfs is gone ExecStop leaves BACKING's
/// filesystem alone; after a kill -9 it removes the dead mount.
#[test]
fn mount_unit_start_and_stop_commands_in_place() {
    use std::io::Write;
    if Command::new("findmnt").arg("--version").output().is_err() {
        println!("findmnt not installed: unit commands not run");
        return;
    }
    let tmp = tempdir();
    let (dir, state) = (tmp.path().join("data"), tmp.path().join("state"));
    std::fs::create_dir(&dir).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "replfs-test-tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount -t tmpfs");
    let _guard = TmpfsGuard(dir.clone());
    std::fs::write(dir.join("before"), b"on the tmpfs").unwrap();

    // Busy stop: a file held open through the mount.
    let mut daemon = spawn_in_place_mount(&dir, &state);
    let mut held = std::fs::File::create(dir.join("held")).unwrap();
    let o = run_unit_sh("ExecStop", &dir);
    assert!(o.status.success(), "ExecStop: {}", text(&o));
    assert_eq!(top_fstype(&dir).as_deref(), Some("tmpfs"), "detached");
    // systemd's SIGTERM follows ExecStop: the daemon keeps serving the
    // open file until it is closed.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "exited with a file open"
    );
    held.write_all(b"written after the detach").unwrap();
    drop(held);
    assert_eq!(wait_exit(&mut daemon, "busy stop"), Some(0));
    assert_eq!(
        std::fs::read(dir.join("held")).unwrap(),
        b"written after the detach"
    );
    let o = Command::new(BIN)
        .args(["log", "dump", "--json", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&o.stdout);
    assert!(
        dump.lines()
            .any(|l| l.contains("\"write\"") && l.contains("held")),
        "{dump}"
    );

    // replfs already gone: ExecStop must not unmount BACKING's filesystem.
    let o = run_unit_sh("ExecStop", &dir);
    assert!(o.status.success(), "ExecStop: {}", text(&o));
    assert_eq!(top_fstype(&dir).as_deref(), Some("tmpfs"));
    assert!(dir.join("before").exists());

    // Crash: ExecStop removes the dead mount so that a restart can mount.
    let mut daemon = spawn_in_place_mount(&dir, &state);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let o = run_unit_sh("ExecStop", &dir);
    assert!(o.status.success(), "ExecStop: {}", text(&o));
    assert_eq!(top_fstype(&dir).as_deref(), Some("tmpfs"), "{}", text(&o));
    let mut daemon = spawn_in_place_mount(&dir, &state);
    let o = run_unit_sh("ExecStop", &dir);
    assert!(o.status.success(), "ExecStop: {}", text(&o));
    assert_eq!(wait_exit(&mut daemon, "clean stop"), Some(0));
    assert_eq!(top_fstype(&dir).as_deref(), Some("tmpfs"));
    assert!(dir.join("held").exists() && dir.join("before").exists());
}
