//! Out-of-band transfer: `replfs log export` of a real mount's WAL, then
//! `replfs mirror import` into an empty mirror; shipping over the network
//! then resumes from the imported LSN. Damaged, truncated and gapped exports
//! are refused without changing the mirror; importing twice is harmless.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::workload::{mixed_workload, pattern};
use common::*;

const CONVERGE: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn status(state: &Path) -> serde_json::Value {
    let out = replfs(&["status", "--json", "--state", s(state)]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn export(state: &Path, to: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["log", "export", "--state", s(state), "--to", s(to)];
    args.extend_from_slice(extra);
    replfs(&args)
}

fn import(dir: &Path, state: &Path, file: &Path) -> std::process::Output {
    replfs(&[
        "mirror",
        "import",
        "--dir",
        s(dir),
        "--state",
        s(state),
        s(file),
    ])
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &std::process::Output, what: &str, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} should have been refused");
    assert!(
        err.contains(needle),
        "{what}: expected {needle:?} in: {err}"
    );
}

fn is_empty_dir(d: &Path) -> bool {
    fs::read_dir(d).map_or(true, |mut r| r.next().is_none())
}

/// Mirror-side paths: (dir, state) created fresh.
fn fresh_mirror(rig: &Rig, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = rig.path(&format!("{name}-dir"));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    (dir, rig.path(&format!("{name}-state")))
}

#[test]
fn export_import_then_shipping_resumes() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let m = rig.mount(None);
    mixed_workload(&m.mnt);
    for i in 0..40u64 {
        fs::write(m.mnt.join(format!("bulk{i}")), pattern(300_000, i)).unwrap();
    }
    // A live export (read-only while the mount writes) works too.
    let live = rig.path("live.rplx");
    let out = ok(&export(&rig.state, &live, &[]), "live export");
    assert!(out.contains("exported LSN 1..="), "{out}");
    m.unmount();

    let file = rig.path("backlog.rplx");
    let out = ok(&export(&rig.state, &file, &[]), "export");
    assert!(out.contains("records"), "{out}");
    assert!(!rig.path("backlog.rplx.tmp").exists());
    let head = status(&rig.state)["head_lsn"].as_u64().unwrap();
    assert!(head > 50, "head {head}");

    let (mdir, mstate) = fresh_mirror(&rig, "mirror");
    let out = ok(&import(&mdir, &mstate, &file), "import");
    assert!(out.contains(&format!("applied LSN {head}")), "{out}");
    assert_same_tree(&rig.backing, &mdir);

    // Twice: harmless, nothing applied.
    let out = ok(&import(&mdir, &mstate, &file), "second import");
    assert!(out.contains("nothing to apply"), "{out}");
    assert_same_tree(&rig.backing, &mdir);

    // Now over the network: the shipper resumes from the imported LSN.
    let key = key_file(rig.tmp.path(), "key", 3);
    let mut mirror = MirrorProc::start(&mdir, &mstate, &key, free_port());
    // The daemon holds the state dir: an import is refused meanwhile.
    refused(
        &import(&mdir, &mstate, &file),
        "import during the daemon",
        "another replfs mirror",
    );
    let m = Mount::start_shipping(&rig, None, &mirror.addr(), &key);
    fs::write(m.mnt.join("after-import"), b"shipped over the network\n").unwrap();
    fs::create_dir_all(m.mnt.join("a/later")).unwrap();
    fs::write(m.mnt.join("a/later/big"), pattern(2_000_000, 77)).unwrap();
    fs::remove_file(m.mnt.join("bulk3")).unwrap();
    wait_converged(&rig.backing, &mdir, CONVERGE);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let st = status(&rig.state);
        let (h, a) = (st["head_lsn"].as_u64(), st["acked_lsn"].as_u64());
        if h == a && h.unwrap_or(0) > head {
            break;
        }
        assert!(Instant::now() < deadline, "acked never reached head: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    m.unmount();
    mirror.stop();
    assert_same_tree(&rig.backing, &mdir);
}

#[test]
fn damaged_truncated_and_gapped_exports_are_refused() {
    let rig = Rig::new();
    fs::set_permissions(&rig.backing, fs::Permissions::from_mode(0o755)).unwrap();
    let m = rig.mount(None);
    for i in 0..30u64 {
        fs::write(m.mnt.join(format!("f{i}")), pattern(200_000, i)).unwrap();
    }
    m.unmount();
    let file = rig.path("full.rplx");
    ok(&export(&rig.state, &file, &[]), "export");
    let bytes = fs::read(&file).unwrap();

    // One flipped byte in the middle.
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    let damaged = rig.path("damaged.rplx");
    fs::write(&damaged, &bad).unwrap();
    let (mdir, mstate) = fresh_mirror(&rig, "m1");
    let out = import(&mdir, &mstate, &damaged);
    refused(&out, "damaged import", "nothing was applied");
    assert!(is_empty_dir(&mdir), "the mirror dir changed");

    // Cut short.
    let cut = rig.path("cut.rplx");
    fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    refused(
        &import(&mdir, &mstate, &cut),
        "truncated import",
        "truncated",
    );
    assert!(is_empty_dir(&mdir), "the mirror dir changed");

    // Not an export at all.
    let junk = rig.path("junk");
    fs::write(&junk, b"hello").unwrap();
    refused(
        &import(&mdir, &mstate, &junk),
        "junk import",
        "replfs export",
    );

    // A gap: the mirror is at 0, the export starts at 5.
    let late = rig.path("late.rplx");
    ok(
        &export(&rig.state, &late, &["--from", "5"]),
        "export --from 5",
    );
    refused(
        &import(&mdir, &mstate, &late),
        "gapped import",
        "the mirror is at LSN 0 but the export starts at 5",
    );
    assert!(is_empty_dir(&mdir), "the mirror dir changed");

    // A range, then the rest: two imports in sequence reach the source.
    let first = rig.path("first.rplx");
    ok(
        &export(&rig.state, &first, &["--to-lsn", "4"]),
        "export range",
    );
    let out = ok(&import(&mdir, &mstate, &first), "import range");
    assert!(out.contains("applied LSN 4"), "{out}");
    // Overlapping (starts at 5 <= 4 + 1, and the full file from 1): both fine.
    ok(&import(&mdir, &mstate, &late), "import the rest");
    ok(&import(&mdir, &mstate, &file), "import the full file again");
    assert_same_tree(&rig.backing, &mdir);

    // Bad ranges of export.
    refused(
        &export(&rig.state, &rig.path("x"), &["--from", "100000"]),
        "export past head",
        "nothing to export",
    );
    assert!(!rig.path("x").exists() && !rig.path("x.tmp").exists());
}
