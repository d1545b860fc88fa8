//! The benchmark harness keeps working: `bench/run.sh --quick` (seconds of
//! workloads plus a release build) runs every workload group against a real
//! mount and mirror, and its JSON holds a figure for each, with replication
//! working (no lost lag probe, the backlog drained, memory read). It checks
//! that the harness runs and measures, not speed: speed is for the full run
//! by hand (bench/README.md). Needs root, fusermount3, python3 and fio (the
//! harness installs fio when missing).

use std::path::Path;
use std::process::Command;

fn bench_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains("replfs-bench."))
        .map(str::to_owned)
        .collect()
}

/// The harness's scratch dirs in /tmp.
fn scratch_dirs() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/tmp")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("replfs-bench."))
        })
        .collect()
}

fn num(v: &serde_json::Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"))
}

#[test]
fn quick_bench_run_measures_every_workload_and_cleans_up() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let before = scratch_dirs();
    let out_dir = tempfile::tempdir().unwrap();
    let json = out_dir.path().join("bench.json");
    // Bounded: the harness stops its mount and mirror and removes its scratch
    // dir on SIGTERM as on success.
    let out = Command::new("timeout")
        .args(["--signal=TERM", "--kill-after=30", "1200"])
        .arg(root.join("bench/run.sh"))
        .args(["--quick", "--json"])
        .arg(&json)
        .current_dir(root)
        .output()
        .expect("run bench/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench/run.sh --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        bench_mounts().is_empty(),
        "mounts left: {:?}",
        bench_mounts()
    );
    let left: Vec<_> = scratch_dirs()
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert!(left.is_empty(), "scratch dirs left: {left:?}");

    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let workloads = j["workloads"].as_object().expect("workloads");
    for name in [
        "seq write 1M +fsync (MiB/s)",
        "seq read 1M cold (MiB/s)",
        "seq read 1M warm (MiB/s)",
        "4k randwrite buffered (MiB/s)",
        "4k randread warm (MiB/s)",
        "4k randread cold (MiB/s)",
        "4k append+fdatasync (ops/s)",
        "small create+4k+close (ops/s)",
        "small stat (ops/s)",
        "small unlink (ops/s)",
        "small create+4k+fsync+unlink (ops/s)",
        "build: tar x (s)",
        "build: cp -r (s)",
        "build: find|xargs cat (s)",
        "build: rm -r (s)",
    ] {
        let w = &workloads
            .get(name)
            .unwrap_or_else(|| panic!("no figures for {name:?}"));
        for side in ["native", "replfs"] {
            let v = w[side]
                .as_array()
                .unwrap_or_else(|| panic!("{name} {side}"));
            assert_eq!(v.len(), 1, "{name} {side}: one repeat in --quick");
            assert!(num(&v[0], name) > 0.0, "{name} {side}: {v:?}");
        }
        assert!(num(&w["ratio"], name) > 0.0, "{name}: ratio");
        assert!(stdout.contains(name), "{name} missing from the table");
    }

    let lag = &j["lag"];
    assert!(num(&lag["probes"], "probes") > 0.0);
    assert_eq!(
        num(&lag["lost"], "lost"),
        0.0,
        "a write never reached the mirror"
    );
    assert!(num(&lag["p99_ms"], "p99") > 0.0);

    let c = &j["compression"];
    assert!(
        num(&c["text"], "text ratio") > 1.5,
        "text-like data compresses: {c}"
    );
    let r = num(&c["random"], "random ratio");
    assert!((0.9..1.1).contains(&r), "random data does not: {r}");

    let b = &j["backlog"];
    for k in [
        "ship_mib_s",
        "drain_s",
        "disk_read_mib_s",
        "tcp_loopback_mib_s",
    ] {
        assert!(num(&b[k], k) > 0.0, "backlog {k}: {b}");
    }
    for k in ["mount_mem", "mirror_mem"] {
        assert!(num(&b[k]["VmHWM"], k) > 0.0, "backlog {k}: {b}");
    }
}
