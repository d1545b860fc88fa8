#!/usr/bin/env python3
"""replfs benchmark harness: the native backing filesystem and the replfs mount
side by side, in one run, with repeats and medians (issue 7).

    bench/run.sh [--quick] [--repeats N] [--keep]

Python standard library only. Needs root (drop_caches, FUSE), fio and
fusermount3. See bench/README.md for what each workload measures.
"""
import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "replfs")
MIB = 1 << 20
GIB = 1 << 30

STARTED = []          # Popen objects we started (only these are ever killed)
MOUNTS = []           # mountpoints we mounted
SCRATCH = None
EXTRA_DIRS = []       # scratch dirs outside SCRATCH (--state-dir)
IMAGES = []           # (mountpoint, loop device) of the --fs image file systems we made
T_START = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout=600, check=True, **kw):
    return subprocess.run(cmd, check=check, timeout=timeout, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- processes

class Replfs:
    """The mirror and the mount we started, and how to stop/restart them."""

    def __init__(self, scratch, state_parent=None, mirror_parent=None):
        self.s = scratch
        self.backing = os.path.join(scratch, "backing")
        self.mnt = os.path.join(scratch, "mnt")
        # --state-dir: the mount's state dir (the WAL) on another file system.
        self.state = (tempfile.mkdtemp(prefix="replfs-bench-state.", dir=state_parent)
                      if state_parent else os.path.join(scratch, "state"))
        if state_parent:
            EXTRA_DIRS.append(self.state)
        # --mirror-dir: the replica on another file system (a remote site's disk).
        self.mirror_dir = (tempfile.mkdtemp(prefix="replfs-bench-mirror.", dir=mirror_parent)
                           if mirror_parent else os.path.join(scratch, "mirror"))
        if mirror_parent:
            EXTRA_DIRS.append(self.mirror_dir)
        # The mirror's own state goes with its replica (another file system
        # with --mirror-dir or --fs image).
        self.mstate = (os.path.join(self.mirror_dir, "..", os.path.basename(self.mirror_dir) + ".state")
                       if mirror_parent else os.path.join(scratch, "mirror-state"))
        self.mstate = os.path.normpath(self.mstate)
        if mirror_parent:
            EXTRA_DIRS.append(self.mstate)
        self.key = os.path.join(scratch, "key")
        for d in (self.backing, self.mnt, self.state, self.mirror_dir, self.mstate):
            os.makedirs(d, exist_ok=True)
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
        self.port = free_port()
        self.mirror = None
        self.mount = None
        self.config = None  # --config FILE, passed to `replfs mount`

    def start_mirror(self):
        logf = open(os.path.join(self.s, "mirror.log"), "ab")
        self.mirror = subprocess.Popen(
            [BIN, "mirror", "--listen", f"127.0.0.1:{self.port}", "--dir", self.mirror_dir,
             "--state", self.mstate, "--key-file", self.key],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        STARTED.append(self.mirror)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.mirror.poll() is not None:
                raise RuntimeError(f"mirror exited with {self.mirror.returncode}; see mirror.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mirror did not start listening within 20 s")

    def stop_mirror(self):
        stop_proc(self.mirror)
        self.mirror = None

    def start_mount(self):
        logf = open(os.path.join(self.s, "mount.log"), "ab")
        self.mount = subprocess.Popen(
            [BIN, "mount", self.backing, self.mnt, "--state", self.state,
             "--mirror", f"127.0.0.1:{self.port}", "--key-file", self.key, "-f"]
            + (["--config", self.config] if self.config else []),
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        STARTED.append(self.mount)
        MOUNTS.append(self.mnt)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.mount.poll() is not None:
                raise RuntimeError(f"mount exited with {self.mount.returncode}; see mount.log")
            if os.path.ismount(self.mnt):
                return
            time.sleep(0.05)
        raise RuntimeError("mount did not come up within 30 s")

    def stop_mount(self):
        unmount(self.mnt)
        stop_proc(self.mount)
        self.mount = None

    def status(self):
        r = run([BIN, "status", "--state", self.state, "--json"], timeout=30,
                capture_output=True, check=False)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def settle(self):
        """Before a workload: let the shipper and the mirror finish what the
        workloads before it left (lag 0), so that each workload is measured
        with its own replication running beside it, not the tail of the
        previous one's (the 1 GiB sequential write leaves 4-13 s of it)."""
        t = self.wait_drained(300)
        if t is None:
            log("settle: lag not 0 after 300 s, measuring anyway")
        elif t > 0.5:
            log(f"settle: replication idle after {t:.1f} s")

    def wait_drained(self, timeout):
        """Seconds until status shows lag_records 0 (None on timeout)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = self.status()
            # (An empty log is drained once the link is up: `--only backlog`.)
            if st and st.get("lag_records") == 0 and (
                    st.get("head_lsn", 0) > 0 or st.get("link") == "connected"):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None


def stop_proc(p, timeout=20):
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


def unmount(mnt):
    if os.path.ismount(mnt):
        r = run(["fusermount3", "-u", mnt], check=False, timeout=60, capture_output=True)
        if r.returncode != 0:
            run(["fusermount3", "-uz", mnt], check=False, timeout=60, capture_output=True)


def vm_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def cleanup():
    for m in reversed(MOUNTS):
        try:
            unmount(m)
        except Exception as e:  # noqa: BLE001 - best effort
            log(f"unmount {m}: {e}")
    for p in reversed(STARTED):
        try:
            stop_proc(p)
        except Exception as e:  # noqa: BLE001
            log(f"stop pid {p.pid}: {e}")
    keep = ARGS is not None and ARGS.keep  # None: --help, or bad arguments
    for mp, loop in reversed(IMAGES if not keep else []):
        r = run(["umount", mp], check=False, timeout=120, capture_output=True)
        if r.returncode != 0:
            log(f"umount {mp}: {r.stderr.decode().strip()}; detaching lazily")
            run(["umount", "-l", mp], check=False, timeout=60, capture_output=True)
        run(["losetup", "-d", loop], check=False, timeout=60, capture_output=True)
    if keep and IMAGES:
        log("--keep: image file systems left mounted: "
            + ", ".join(f"{mp} ({loop})" for mp, loop in IMAGES))
    if SCRATCH and os.path.isdir(SCRATCH) and not keep:
        shutil.rmtree(SCRATCH, ignore_errors=True)
    for d in EXTRA_DIRS if not keep else []:
        shutil.rmtree(d, ignore_errors=True)


def image_fs(name, size):
    """--fs image: a fresh ext4 made with mkfs.ext4's defaults (so with a
    journal) in a preallocated image file under SCRATCH, on a loop device with
    direct I/O (no second page cache on the host), mounted at SCRATCH/name.
    Inode tables and the journal are written at mkfs time, so no lazy-init
    thread writes beside the workloads. Returns the mountpoint."""
    img = os.path.join(SCRATCH, name + ".img")
    mp = os.path.join(SCRATCH, name)
    os.makedirs(mp)
    run(["fallocate", "-l", str(size), img], timeout=120)
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img], timeout=600)
    loop = run(["losetup", "--direct-io=on", "--find", "--show", img],
               capture_output=True, timeout=60).stdout.decode().strip()
    try:
        run(["mount", loop, mp], timeout=60)
    except subprocess.CalledProcessError:
        run(["losetup", "-d", loop], check=False, timeout=60)
        raise
    IMAGES.append((mp, loop))
    return mp


def describe_fs(path):
    fstype = run(["stat", "-f", "-c", "%T", path], capture_output=True).stdout.decode().strip()
    dev = run(["df", "--output=source", path], capture_output=True).stdout.decode().split()[-1]
    opts = run(["findmnt", "-n", "-o", "OPTIONS", "-T", path], capture_output=True,
               check=False).stdout.decode().strip()
    journal = ""
    if fstype == "ext2/ext3":  # stat -f's name for ext4 too
        task = f"/sys/fs/ext4/{os.path.basename(os.path.realpath(dev))}/journal_task"
        try:
            journal = " journal=" + ("no" if open(task).read().strip() == "<none>" else "yes")
        except OSError:
            pass
    return f"fs={fstype}{journal} dev={dev} options={opts}"


# ---------------------------------------------------------------- workloads

def fio(name, directory, extra, timeout=600):
    cmd = ["fio", f"--name={name}", f"--filename={os.path.join(directory, name + '.dat')}",
           "--ioengine=psync", "--fallocate=none", "--output-format=json"] + extra
    r = run(cmd, capture_output=True, timeout=timeout)
    out = r.stdout.decode()
    return json.loads(out[out.index("{"):])["jobs"][0]


def pct(lat, p="99.000000"):
    return (lat or {}).get("percentile", {}).get(p)


def wl_fio(d, sz, settle=lambda: None):
    """All fio workloads in one target dir; returns {workload: value}.
    `settle` runs before each workload (see `quiesce`)."""
    res = {}
    settle()
    j = fio("seq", d, ["--rw=write", "--bs=1M", f"--size={sz['seq']}", "--end_fsync=1"])
    res["seq write 1M +fsync (MiB/s)"] = j["write"]["bw_bytes"] / MIB
    settle()
    drop_caches()
    j = fio("seq", d, ["--rw=read", "--bs=1M", f"--size={sz['seq']}"])
    res["seq read 1M cold (MiB/s)"] = j["read"]["bw_bytes"] / MIB
    j = fio("seq", d, ["--rw=read", "--bs=1M", f"--size={sz['seq']}", "--invalidate=0"])
    res["seq read 1M warm (MiB/s)"] = j["read"]["bw_bytes"] / MIB
    # random I/O on a smaller region of the same file
    settle()
    j = fio("seq", d, ["--rw=randwrite", "--bs=4k", f"--size={sz['rand']}",
                       f"--runtime={sz['rt']}", "--randrepeat=1"])
    res["4k randwrite buffered (MiB/s)"] = j["write"]["bw_bytes"] / MIB
    settle()
    j = fio("seq", d, ["--rw=randread", "--bs=4k", f"--size={sz['rand']}",
                       f"--runtime={sz['rt']}", "--randrepeat=1", "--invalidate=0"])
    res["4k randread warm (MiB/s)"] = j["read"]["bw_bytes"] / MIB
    settle()
    drop_caches()
    j = fio("seq", d, ["--rw=randread", "--bs=4k", f"--size={sz['rand']}",
                       f"--runtime={sz['rt']}", "--time_based", "--randrepeat=1"])
    res["4k randread cold (MiB/s)"] = j["read"]["bw_bytes"] / MIB
    os.unlink(os.path.join(d, "seq.dat"))
    settle()
    j = fio("app", d, ["--rw=write", "--bs=4k", "--fdatasync=1", f"--size={sz['append']}",
                       f"--runtime={sz['rt']}"])
    res["4k append+fdatasync (ops/s)"] = j["write"]["iops"]
    sync_p99 = pct(j.get("sync", {}).get("lat_ns")) or pct(j["write"].get("clat_ns"))
    res["4k append+fdatasync sync p99 (ms, lower better)"] = (sync_p99 or 0) / 1e6
    os.unlink(os.path.join(d, "app.dat"))
    return res


def settle_inodes(seconds):
    """Before a create-heavy step: write back and wait out ext4's
    recently-deleted window. ext4 without a journal (this machine's) skips,
    when it allocates an inode, every inode deleted less than 5 s ago (300 s
    while its inode-table block is still dirty): creates right after the other
    side's `rm -r` ran up to 4x slower (perf: `recently_deleted` under
    `ext4_create`), which penalised whichever side came second. Inodes next
    to new ones stay in the longer window (their block is dirtied again), so
    the sides also alternate in order."""
    os.sync()
    time.sleep(seconds)


def wl_small(d, n, nsync):
    res = {}
    sd = os.path.join(d, "small")
    os.makedirs(sd)
    buf = os.urandom(4096)
    names = [os.path.join(sd, f"f{i:05d}") for i in range(n)]
    t = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.close(fd)
    res["small create+4k+close (ops/s)"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    res["small stat (ops/s)"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in names:
        os.unlink(p)
    res["small unlink (ops/s)"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(nsync):
        p = os.path.join(sd, f"s{i}")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
        os.unlink(p)
    res["small create+4k+fsync+unlink (ops/s)"] = nsync / (time.perf_counter() - t)
    os.rmdir(sd)
    return res


def wl_build(d, tarball):
    """Seconds per step, returned as ops/s-like 1/seconds so bigger is better."""
    res = {}
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    os.makedirs(a)
    steps = [
        ("build: tar x (s)", ["tar", "xf", tarball, "-C", a]),
        ("build: cp -r (s)", ["cp", "-r", a, b]),
        ("build: find|xargs cat (s)", ["sh", "-c", f"find '{a}' '{b}' -type f -print0 | xargs -0 cat > /dev/null"]),
        ("build: rm -r (s)", ["rm", "-r", a, b]),
    ]
    for name, cmd in steps:
        t = time.perf_counter()
        run(cmd, timeout=300)
        res[name] = time.perf_counter() - t
    return res


def make_tarball(path, limit):
    """A source-like tarball: this repo's src/tests/docs + small files of /usr/share/doc."""
    total = 0
    n = 0
    with tarfile.open(path, "w") as tf:
        roots = [os.path.join(ROOT, x) for x in ("src", "tests", "docs", "bench")] + ["/usr/share/doc"]
        for r in roots:
            for dp, dns, fns in os.walk(r):
                dns.sort()
                for fn in sorted(fns):
                    p = os.path.join(dp, fn)
                    if not os.path.isfile(p) or os.path.islink(p):
                        continue
                    s = os.path.getsize(p)
                    if s > 256 * 1024 or total + s > limit:
                        continue
                    tf.add(p, arcname=os.path.relpath(p, "/"), recursive=False)
                    total += s
                    n += 1
    return n, total


# ---------------------------------------------------------------- replication

def wl_lag(rf, probes, interval, load_rate):
    """End-to-end lag: write a small file through the mount, poll the mirror."""
    src = os.path.join(rf.mnt, "lagprobe")
    dst = os.path.join(rf.mirror_dir, "lagprobe")
    os.makedirs(src, exist_ok=True)
    stop = threading.Event()
    loaded = [0]

    def load():  # steady moderate background load: load_rate bytes/s in 64 KiB writes
        chunk = os.urandom(64 * 1024)
        with open(os.path.join(src, "load.dat"), "wb") as f:
            t0 = time.monotonic()
            while not stop.is_set() and loaded[0] < 512 * MIB:
                f.write(chunk)
                f.flush()
                loaded[0] += len(chunk)
                ahead = loaded[0] / load_rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    th = threading.Thread(target=load, daemon=True)
    th.start()
    lags, lost = [], 0
    try:
        for i in range(probes):
            body = f"probe {i} {time.time_ns()}\n".encode()
            t0 = time.perf_counter()
            with open(os.path.join(src, f"p{i}"), "wb") as f:
                f.write(body)
            target = os.path.join(dst, f"p{i}")
            while True:
                try:
                    with open(target, "rb") as f:
                        if f.read() == body:
                            lags.append(time.perf_counter() - t0)
                            break
                except OSError:
                    pass
                if time.perf_counter() - t0 > 10:
                    lost += 1
                    break
                time.sleep(0.0005)
            time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
    finally:
        stop.set()
        th.join(timeout=10)
    lags.sort()
    q = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))] * 1000 if lags else float("nan")
    return {"probes": probes, "lost": lost, "p50_ms": q(0.50), "p99_ms": q(0.99),
            "max_ms": lags[-1] * 1000 if lags else float("nan"),
            "load_mib_s": load_rate / MIB}


def write_stream(path, total, chunk_src):
    with open(path, "wb") as f:
        left = total
        while left > 0:
            n = min(left, len(chunk_src))
            f.write(chunk_src[:n])
            left -= n


def random_block_file(scratch, size):
    p = os.path.join(scratch, "random.src")
    with open(p, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    return p


def tcp_ceiling(nbytes):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = [0]

    def sink():
        c, _ = srv.accept()
        buf = bytearray(4 * MIB)
        while True:
            n = c.recv_into(buf)
            if not n:
                break
            got[0] += n
        c.close()
    th = threading.Thread(target=sink, daemon=True)
    th.start()
    s = socket.create_connection(srv.getsockname())
    block = os.urandom(4 * MIB)
    t = time.perf_counter()
    left = nbytes
    while left > 0:
        n = min(left, len(block))
        s.sendall(block[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    th.join(timeout=120)
    dt = time.perf_counter() - t
    s.close()
    srv.close()
    return got[0] / dt


def wal_files(state):
    out = []
    for dp, _, fns in os.walk(state):
        for fn in fns:
            p = os.path.join(dp, fn)
            if os.path.isfile(p) and fn.endswith(".wal"):
                out.append(p)
    return out


def dd_read_speed(files):
    drop_caches()
    total = 0
    t = time.perf_counter()
    for p in files:
        r = run(["dd", f"if={p}", "of=/dev/null", "bs=1M"], capture_output=True, timeout=300)
        total += os.path.getsize(p)
    return total, total / (time.perf_counter() - t)


def wl_compression(rf, size, text_src, rnd_src):
    out = {}
    for kind in ("text", "random"):
        rf.stop_mount()
        rf.start_mount()
        p = os.path.join(rf.mnt, f"compress-{kind}.dat")
        if kind == "text":
            with open(text_src, "rb") as f:
                data = f.read()
        else:
            with open(rnd_src, "rb") as f:
                data = f.read(64 * MIB)
        with open(p, "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(data))
                f.write(data[:n])
                left -= n
        if rf.wait_drained(120) is None:
            log(f"compression/{kind}: not drained in 120 s")
        # compression_ratio comes from the once-a-second status snapshot
        deadline = time.monotonic() + 5
        st = {}
        while time.monotonic() < deadline:
            st = rf.status() or {}
            if st.get("compression_ratio") is not None:
                break
            time.sleep(0.25)
        out[kind] = st.get("compression_ratio")
        os.unlink(p)
    return out


def wl_backlog(rf, size, rnd_src):
    """Stop the mirror, write `size` incompressible bytes, restart, time the drain."""
    if rf.wait_drained(60) is None:
        log("backlog: pre-existing lag did not drain in 60 s")
    rf.stop_mirror()
    bd = os.path.join(rf.mnt, "backlog")
    os.makedirs(bd, exist_ok=True)
    with open(rnd_src, "rb") as f:
        data = f.read()
    t = time.perf_counter()
    per = min(size, 256 * MIB)
    i = 0
    written = 0
    while written < size:
        n = min(per, size - written)
        write_stream(os.path.join(bd, f"b{i}"), n, data)
        written += n
        i += 1
    write_s = time.perf_counter() - t
    time.sleep(1.5)  # let status refresh its lag bytes
    st0 = rf.status() or {}
    lag_bytes = st0.get("lag_bytes") or written
    files = wal_files(rf.state)
    wal_total, disk_bps = dd_read_speed(files)
    tcp_bps = tcp_ceiling(lag_bytes)
    drop_caches()
    mount_mem_before = vm_status(rf.mount.pid)
    acked0 = st0.get("acked_lsn") or 0
    rf.start_mirror()
    t0 = time.monotonic()
    first = None       # (seconds, acked_lsn) at the first ack seen after the restart
    anomaly = None     # a status that said lag 0 below the head (see below)
    dt = None
    limit = max(120, size / (20 * MIB))
    while time.monotonic() - t0 < limit:
        st = rf.status() or {}
        now = time.monotonic() - t0
        if first is None and (st.get("acked_lsn") or 0) > acked0:
            first = (now, st["acked_lsn"])
        if st.get("lag_records") == 0:
            if (st.get("acked_lsn") or 0) >= (st0.get("head_lsn") or 0):
                dt = now
                break
            # Lag must be known at every moment (DESIGN invariant 8): a zero
            # lag below the head seen before the restart is a bug to report.
            if not anomaly:
                anomaly = st
                log(f"backlog: status shows lag 0 at acked LSN {st.get('acked_lsn')} below "
                    f"the head {st0.get('head_lsn')} seen before the restart: {json.dumps(st)}")
        time.sleep(0.02)
    steady = None
    if dt and first and dt > first[0]:
        recs = (st0.get("lag_records") or 1)
        frac_left = 1 - (first[1] - acked0) / recs   # records are ~equal-sized (1 MiB writes)
        steady = lag_bytes * frac_left / (dt - first[0])
    res = {
        "written_bytes": written, "write_through_mount_mib_s": written / write_s / MIB,
        "lag_records_at_start": st0.get("lag_records"), "lag_bytes_at_start": lag_bytes,
        "wal_files_bytes": wal_total, "disk_read_mib_s": disk_bps / MIB,
        "tcp_loopback_mib_s": tcp_bps / MIB,
        "drain_s": dt,
        "ship_mib_s": (lag_bytes / dt / MIB) if dt else None,
        "first_ack_s": first[0] if first else None,
        "ship_steady_mib_s": steady / MIB if steady else None,
        "mount_mem": vm_status(rf.mount.pid), "mount_mem_before_drain": mount_mem_before,
        "mirror_mem": vm_status(rf.mirror.pid),
        "status_before_drain": st0, "false_zero_lag_status": anomaly,
    }
    run(["rm", "-r", bd], timeout=300)
    return res


# ---------------------------------------------------------------- main

TARGETS = {
    "seq write 1M +fsync (MiB/s)": ">= 0.45",
    "seq read 1M cold (MiB/s)": ">= 0.95",
    "seq read 1M warm (MiB/s)": ">= 0.95",
    "4k randwrite buffered (MiB/s)": ">= 0.35",
    "4k randread warm (MiB/s)": ">= 0.9",
    "4k randread cold (MiB/s)": ">= 0.9",
    "4k append+fdatasync (ops/s)": ">= 1.0",
    "4k append+fdatasync sync p99 (ms, lower better)": "(native/replfs)",
    "small create+4k+close (ops/s)": ">= 0.5",
    "small stat (ops/s)": ">= 0.5",
    "small unlink (ops/s)": ">= 0.3",
    "small create+4k+fsync+unlink (ops/s)": "-",
    "build: tar x (s)": "- (native/replfs)",
    "build: cp -r (s)": "- (native/replfs)",
    "build: find|xargs cat (s)": "- (native/replfs)",
    "build: rm -r (s)": "- (native/replfs)",
}
LOWER_BETTER = ("(s)", "lower better")


def main():
    global SCRATCH, ARGS, BIN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (CI)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (debugging)")
    ap.add_argument("--json", metavar="FILE", help="also write all figures as JSON here")
    ap.add_argument("--no-settle", dest="settle", action="store_false",
                    help="run the workloads back to back: do not sync and wait for the mirror to "
                         "catch up (lag 0) before each one, so a workload also pays for the "
                         "replication of the ones before it")
    ap.add_argument("--settle", action="store_true", default=True, help=argparse.SUPPRESS)
    ap.add_argument("--fs", choices=("image", "here"), default=None,
                    help="image (default; --quick: here): native dir, BACKING and the WAL on a fresh "
                         "journaled ext4 in an image file on a loop device, the replica on a second "
                         "one; here: everything in a dir under /tmp, on whatever file system that is")
    ap.add_argument("--config", metavar="FILE", help="config file for `replfs mount` (e.g. writeback_cache)")
    ap.add_argument("--state-dir", metavar="DIR",
                    help="put the mount's state dir (the WAL) in a new dir under DIR, e.g. on another "
                         "device (or /dev/shm, tmpfs: an upper bound, not durable)")
    ap.add_argument("--mirror-dir", metavar="DIR",
                    help="put the mirror's replica in a new dir under DIR (e.g. /dev/shm), as if the "
                         "DR site's disk were another machine's")
    ap.add_argument("--bin", metavar="PATH",
                    help="use this replfs binary instead of building this checkout "
                         "(A/B comparisons of two builds in one session)")
    ap.add_argument("--only", metavar="GROUPS", default="local,lag,compression,backlog",
                    help="comma-separated subset of local,lag,compression,backlog (default: all)")
    ARGS = ap.parse_args()
    only = set(ARGS.only.split(","))
    if not only <= {"local", "lag", "compression", "backlog"}:
        sys.exit(f"--only: unknown group in {ARGS.only!r}")
    q = ARGS.quick
    reps = ARGS.repeats or (1 if q else 3)
    sz = {
        "seq": "64M" if q else "1G", "rand": "32M" if q else "256M",
        "append": "2M" if q else "16M", "rt": 2 if q else 10,
        "small": 1000 if q else 10000, "small_sync": 50 if q else 300,
        "tar": (4 if q else 24) * MIB,
        "probes": 30 if q else 200, "probe_interval": 0.02,
        "load": 2 * MIB if q else 4 * MIB,
        "compress": (16 if q else 64) * MIB,
        "backlog": (128 * MIB) if q else 2 * GIB,
        "inode_settle": 0.5 if q else 6.0,
    }
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root (drop_caches, FUSE mounts)")

    if ARGS.bin:
        BIN = os.path.abspath(ARGS.bin)
        log(f"binary: {BIN}")
    else:
        log("cargo build --release")
        run(["cargo", "build", "--release"], cwd=ROOT, timeout=1800)
    if shutil.which("fio") is None:
        log("installing fio")
        run(["apt-get", "install", "-y", "fio"], timeout=600,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if shutil.which("fusermount3") is None:
        sys.exit("fusermount3 missing (apt-get install fuse3)")

    fs_mode = ARGS.fs or ("here" if q else "image")
    SCRATCH = tempfile.mkdtemp(prefix="replfs-bench.", dir="/tmp")
    print(f"machine: nproc={os.cpu_count()} kernel={platform.release()} "
          f"mem={os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // MIB} MiB; "
          f"scratch {SCRATCH}: {describe_fs(SCRATCH)}")
    work, mirror_parent = SCRATCH, ARGS.mirror_dir
    if fs_mode == "image":
        work = image_fs("src", (4 if q else 12) * GIB)
        if not mirror_parent:
            mirror_parent = image_fs("replica", (2 if q else 8) * GIB)
        print(f"--fs image: native dir, BACKING, WAL in {work}: {describe_fs(work)}; "
              f"replica in {mirror_parent}"
              + ("" if ARGS.mirror_dir else f": {describe_fs(mirror_parent)}")
              + "; loop devices with direct I/O on the scratch file system above")
    cfg_text = open(ARGS.config).read().strip().replace("\n", "; ") if ARGS.config else "defaults"
    print(f"mount config: {cfg_text}; groups: {','.join(sorted(only))}; "
          + ("settle: sync and lag 0 before each workload" if ARGS.settle
             else "no settle: workloads back to back"))
    if ARGS.state_dir:
        sfs = run(["stat", "-f", "-c", "%T", ARGS.state_dir], capture_output=True).stdout.decode().strip()
        sdev = run(["df", "--output=source", ARGS.state_dir], capture_output=True).stdout.decode().split()[-1]
        print(f"state dir (WAL) under {ARGS.state_dir}: fs={sfs} dev={sdev}")
    if ARGS.mirror_dir:
        mfs = run(["stat", "-f", "-c", "%T", ARGS.mirror_dir], capture_output=True).stdout.decode().strip()
        print(f"mirror replica under {ARGS.mirror_dir}: fs={mfs}")
    print(f"mode: {'quick' if q else 'full'}, repeats={reps}, fio {run(['fio', '--version'], capture_output=True).stdout.decode().strip()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  git: "
          + run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, check=False).stdout.decode().strip(), flush=True)

    native = os.path.join(work, "native")
    os.makedirs(native)
    tarball = os.path.join(SCRATCH, "src.tar")
    nfiles, tbytes = make_tarball(tarball, sz["tar"])
    log(f"tarball: {nfiles} files, {tbytes / MIB:.1f} MiB")
    rnd_src = random_block_file(SCRATCH, 64 * MIB)

    rf = Replfs(work, ARGS.state_dir, mirror_parent)
    rf.config = os.path.abspath(ARGS.config) if ARGS.config else None
    rf.start_mirror()
    rf.start_mount()
    log(f"mirror on 127.0.0.1:{rf.port} (pid {rf.mirror.pid}), mount pid {rf.mount.pid}")

    results = {}  # workload -> {"native": [...], "replfs": [...]}
    for r in range(reps if "local" in only else 0):
        # Alternate which side goes first, so order effects (the page cache,
        # ext4's recently-deleted inodes: see settle_inodes) fall on both alike.
        sides = (("native", native), ("replfs", rf.mnt))
        for side, base in sides if r % 2 == 0 else sides[::-1]:
            d = os.path.join(base, f"run{r}")
            os.makedirs(d)
            log(f"repeat {r + 1}/{reps}: {side}: fio")
            quiesce = (lambda: None) if not ARGS.settle else (
                os.sync if side == "native" else lambda: (rf.settle(), os.sync()))
            figs = wl_fio(d, sz, quiesce)
            log(f"repeat {r + 1}/{reps}: {side}: small files")
            quiesce()
            settle_inodes(sz["inode_settle"] if fs_mode == "here" else 0)
            figs.update(wl_small(d, sz["small"], sz["small_sync"]))
            log(f"repeat {r + 1}/{reps}: {side}: build-like")
            quiesce()
            settle_inodes(sz["inode_settle"] if fs_mode == "here" else 0)
            figs.update(wl_build(d, tarball))
            os.rmdir(d)
            for k, v in figs.items():
                results.setdefault(k, {"native": [], "replfs": []})[side].append(v)

    lag = comp = bl = None
    if "lag" in only:
        log("replication: lag probes")
        lag = wl_lag(rf, sz["probes"], sz["probe_interval"], sz["load"])
    if "compression" in only:
        log("replication: compression ratio")
        comp = compression(rf, sz, tarball, rnd_src)
    if "backlog" in only:
        log(f"replication: backlog of {sz['backlog'] / MIB:.0f} MiB")
        bl = wl_backlog(rf, sz["backlog"], rnd_src)
    report(results, lag, comp, bl, sz, reps)


def compression(rf, sz, tarball, rnd_src):
    with open(os.path.join(SCRATCH, "text.src"), "wb") as out, tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            if m.isfile() and not m.name.endswith((".gz", ".xz", ".bz2", ".zst", ".png", ".jpg", ".pdf")):
                out.write(tf.extractfile(m).read())
    return wl_compression(rf, sz["compress"], os.path.join(SCRATCH, "text.src"), rnd_src)


def report(results, lag, comp, bl, sz, reps):
    print()
    print(f"{'workload':50} {'native':>12} {'replfs':>12} {'ratio':>7}  target")
    print("-" * 96)
    out_json = {"sizes": sz, "repeats": reps, "workloads": {}}
    for k, v in results.items():
        n, m = statistics.median(v["native"]), statistics.median(v["replfs"])
        lower = any(t in k for t in LOWER_BETTER)
        ratio = (n / m if m else float("nan")) if lower else (m / n if n else float("nan"))
        tgt = TARGETS.get(k, "-")
        print(f"{k:50} {n:12.2f} {m:12.2f} {ratio:7.2f}  {tgt}")
        out_json["workloads"][k] = {"native": v["native"], "replfs": v["replfs"],
                                    "native_median": n, "replfs_median": m, "ratio": ratio, "target": tgt}
    print("-" * 96)
    print("ratio = replfs/native for rates; native/replfs for times and latencies (bigger is better)")
    print()
    out_json.update(lag=lag, backlog=bl, compression=comp)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(out_json, f, indent=1)
    if lag:
        print_lag(lag, sz)
    if comp:
        fmt = lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "n/a"
        print(f"compression ratio (raw/wire): text-like {fmt(comp['text'])}, random {fmt(comp['random'])}")
    if bl:
        print_backlog(bl)
    print(f"\ntotal runtime {time.monotonic() - T_START:.0f} s")


def print_lag(lag, sz):
    print(f"replication lag ({lag['probes']} probes, 1 per {sz['probe_interval'] * 1000:.0f} ms, "
          f"{lag['load_mib_s']:.0f} MiB/s background load): p50 {lag['p50_ms']:.1f} ms, "
          f"p99 {lag['p99_ms']:.1f} ms, max {lag['max_ms']:.1f} ms, lost {lag['lost']}   target p99 < 50 ms")


def print_backlog(bl):
    ceiling = min(bl["disk_read_mib_s"], bl["tcp_loopback_mib_s"])
    ship = bl["ship_mib_s"]
    print(f"backlog {bl['written_bytes'] / MIB:.0f} MiB random written through the mount at "
          f"{bl['write_through_mount_mib_s']:.0f} MiB/s; {bl['lag_records_at_start']} records, "
          f"{bl['lag_bytes_at_start'] / MIB:.0f} MiB lag, WAL files {bl['wal_files_bytes'] / MIB:.0f} MiB")
    if ship:
        print(f"shipper drain: {ship:.1f} MiB/s in {bl['drain_s']:.1f} s; disk read (dd, cold) "
              f"{bl['disk_read_mib_s']:.0f} MiB/s; loopback TCP {bl['tcp_loopback_mib_s']:.0f} MiB/s; "
              f"ratio to min {ship / ceiling:.2f}   target >= 0.9")
        if bl["ship_steady_mib_s"]:
            print(f"  (first ack {bl['first_ack_s']:.2f} s after the mirror started; from then on "
                  f"{bl['ship_steady_mib_s']:.1f} MiB/s, ratio {bl['ship_steady_mib_s'] / ceiling:.2f})")
    else:
        print(f"shipper drain: DID NOT FINISH in time; disk read {bl['disk_read_mib_s']:.0f} MiB/s, "
              f"TCP {bl['tcp_loopback_mib_s']:.0f} MiB/s")
    if bl["false_zero_lag_status"]:
        print("WARNING: status said lag 0 below the head during the drain (see the log and "
              "false_zero_lag_status in --json)")
    mm, mi = bl["mount_mem"], bl["mirror_mem"]
    print(f"peak RSS (VmHWM): mount {mm.get('VmHWM', 0) / MIB:.1f} MiB (now {mm.get('VmRSS', 0) / MIB:.1f}), "
          f"mirror {mi.get('VmHWM', 0) / MIB:.1f} MiB (now {mi.get('VmRSS', 0) / MIB:.1f}) "
          f"with a {bl['written_bytes'] / MIB:.0f} MiB backlog   target < 100 MiB")


ARGS = None
if __name__ == "__main__":
    def _sig(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGHUP, _sig)
    try:
        main()
    finally:
        cleanup()
