"""Benchmark: cafuse mount against casync mount over the same nginx.

    python integration/bench_mount.py [--workdir DIR] [--write]

Needs root (FUSE, chroot, overlay, loop devices) and debootstrap: a Debian
bookworm minbase root file system (with python3-minimal) is built once in
the workdir, archived with casync (.caidx of the tree, .caibx of an ext4
image of it) and served by nginx on 127.0.0.1.  Measured, for both mounts
where both can do it:

- cold `tar -cf - .` of the mounted tree (an empty disk cache; the page
  cache dropped, so nginx reads the store from disk), with the mount
  process's CPU time; then warm in the same mount (WARM_RUNS times); then
  (cafuse) after a remount with a warm disk cache (the page cache dropped
  again), with the mount process's CPU time; then (cafuse) with every
  chunk already in the mount's memory and the kernel's caches dropped,
  the ceiling of its serving through FUSE; then cold again with
  the store in the page cache (a server that has it in memory);
- for reference, `tar -cf - .` of the same tree on the local disk, with
  the page cache dropped and warm;
- `chroot … python3 -c 'print(1)'` in an overlay on a cold mount: time
  and chunks fetched (medians of PYTHON_RUNS);
- reading /etc/os-release from the ext4 image loop-mounted off a cold
  .caibx mount: chunks fetched (cafuse; casync mount takes no .caibx);
- `ls -l` of a 10,000-entry directory, warm;
- the cafuse mount's peak RSS.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_cat import cafuse_cmd, machine, write_docs  # noqa: E402
from servers import Nginx  # noqa: E402

TIMEOUT = 1800
WARM_RUNS = 5    # this kind of VM has slow spells of its own: the median of these
PYTHON_RUNS = 3
IN_MEMORY_BYTES = 1 << 30
IN_MEMORY_RUNS = 3


def sh(*cmd, **kwargs):
    return subprocess.run([str(c) for c in cmd], check=True, timeout=TIMEOUT,
                          capture_output=True, **kwargs)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def build(work: Path) -> Path:
    """www/ with root.caidx, img.caibx, big.caidx and their stores."""
    www = work / "www"
    if (www / "done").exists():
        return www
    root = work / "minbase"
    if not root.exists():
        sh("debootstrap", "--variant=minbase", "--include=python3-minimal", "bookworm",
           root, "http://deb.debian.org/debian")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        shutil.rmtree(root / junk, ignore_errors=True)
    www.mkdir(parents=True, exist_ok=True)
    sh("casync", "make", f"--store={www / 'store'}", www / "root.caidx", root)
    image = work / "root.ext4"
    sh("mkfs.ext4", "-q", "-F", "-d", root, image, "400M")
    sh("casync", "make", f"--store={www / 'store'}", www / "img.caibx", image)
    big = work / "bigdir"
    (big / "big").mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        (big / "big" / f"file{i:05d}").write_bytes(b"%d\n" % i)
    sh("casync", "make", f"--store={www / 'store'}", www / "big.caidx", big)
    (www / "done").touch()
    return www


def in_memory_cmd() -> list[str]:
    """cafuse with its memory bound raised to IN_MEMORY_BYTES, so that it
    keeps every chunk of the tree in memory."""
    code = ("import dataclasses, sys; from cafuse import cli; options = cli.options; "
            "cli.options = lambda args: dataclasses.replace(options(args), "
            f"memory_bytes={IN_MEMORY_BYTES}); sys.exit(cli.main())")
    return [sys.executable, "-c", code]


@contextmanager
def mount(kind: str, url: str, store: str, mnt: Path, cache: Path | None,
          command: list[str] | None = None):
    """A cafuse (``command``, if given) or casync mount, taken down
    afterwards; yields its pid."""
    mnt.mkdir(parents=True, exist_ok=True)
    if kind == "cafuse":
        cache_args = ["--cache-dir", str(cache)] if cache else ["--no-cache"]
        cmd = (command or cafuse_cmd()) + ["mount", *cache_args, "-s", store, url, str(mnt)]
    else:
        cmd = ["casync", f"--store={store}", "mount", url, str(mnt)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} mount did not come up")
            time.sleep(0.02)
        yield proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def warm_store(www: Path) -> None:
    """Read every chunk file, so nginx serves the store from memory."""
    for path in (www / "store").rglob("*.cacnk"):
        path.read_bytes()


def tar_rate(mnt: Path) -> tuple[float, int]:
    """MB/s of `tar -cf - .` and the bytes tar wrote."""
    start = time.perf_counter()
    done = subprocess.run(f"tar -C {mnt} -cf - . | wc -c", shell=True, check=True,
                          capture_output=True, text=True, timeout=TIMEOUT)
    size = int(done.stdout)
    return size / (time.perf_counter() - start) / 1e6, size


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_tar(nginx, kind, work) -> dict:
    url, store = f"{nginx.url}/root.caidx", f"{nginx.url}/store"
    cache = work / f"cache-{kind}"
    shutil.rmtree(cache, ignore_errors=True)
    out = {}
    drop_caches()
    with mount(kind, url, store, work / f"mnt-{kind}", cache if kind == "cafuse" else None) \
            as pid:
        cpu = cpu_seconds(pid)
        out["cold"], out["tar_bytes"] = tar_rate(work / f"mnt-{kind}")
        out["cold_cpu"] = cpu_seconds(pid) - cpu
        out["warm_runs"] = [tar_rate(work / f"mnt-{kind}")[0] for _ in range(WARM_RUNS)]
        out["warm"] = statistics.median(out["warm_runs"])
        if kind == "cafuse":
            out["rss"] = peak_rss_mb(pid)
    if kind == "cafuse":
        drop_caches()
        with mount(kind, url, store, work / f"mnt-{kind}", cache) as pid:
            cpu = cpu_seconds(pid)
            out["remount"], _ = tar_rate(work / f"mnt-{kind}")
            out["remount_cpu"] = cpu_seconds(pid) - cpu
        with mount(kind, url, store, work / f"mnt-{kind}", cache, in_memory_cmd()):
            tar_rate(work / f"mnt-{kind}")  # every chunk into its memory
            out["in_memory_runs"] = []
            for _ in range(IN_MEMORY_RUNS):
                drop_caches()
                out["in_memory_runs"].append(tar_rate(work / f"mnt-{kind}")[0])
            out["in_memory"] = statistics.median(out["in_memory_runs"])
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    warm_store(work / "www")
    with mount(kind, url, store, work / f"mnt-{kind}", cache if kind == "cafuse" else None):
        out["cold_warm_store"], _ = tar_rate(work / f"mnt-{kind}")
    return out


def bench_local_tar(work) -> dict:
    """The same tree on the local disk: what the kernel's own file system
    does, with the page cache dropped and then warm."""
    drop_caches()
    cold, _ = tar_rate(work / "minbase")
    warm = statistics.median(tar_rate(work / "minbase")[0] for _ in range(WARM_RUNS))
    return {"cold": cold, "warm": warm}


def bench_python(nginx, kind, work) -> dict:
    """Seconds and chunks of each of PYTHON_RUNS cold starts, and their
    medians (casync's time varied from 0.7 to 3.5 s from one run to the
    next)."""
    runs = [python_start(nginx, kind, work) for _ in range(PYTHON_RUNS)]
    return {"runs": runs, "seconds": statistics.median(r["seconds"] for r in runs),
            "chunks": statistics.median(r["chunks"] for r in runs)}


def python_start(nginx, kind, work) -> dict:
    url, store = f"{nginx.url}/root.caidx", f"{nginx.url}/store"
    mnt, ov, merged = work / f"py-{kind}", work / f"ov-{kind}", work / f"merged-{kind}"
    for d in (ov, merged):
        d.mkdir(parents=True, exist_ok=True)
    drop_caches()
    before = nginx.chunk_requests()
    with mount(kind, url, store, mnt, None):
        sh("mount", "-t", "tmpfs", "tmpfs", ov)
        try:
            (ov / "upper").mkdir()
            (ov / "work").mkdir()
            sh("mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={mnt},upperdir={ov / 'upper'},workdir={ov / 'work'}", merged)
            try:
                start = time.perf_counter()
                out = sh("chroot", merged, "/usr/bin/python3", "-c", "print(1)").stdout
                elapsed = time.perf_counter() - start
                assert out == b"1\n"
            finally:
                sh("umount", merged)
        finally:
            sh("umount", ov)
    return {"seconds": elapsed, "chunks": nginx.chunk_requests() - before}


def bench_loop(nginx, work, total_chunks) -> dict:
    mnt, inner = work / "blob", work / "inner"
    inner.mkdir(exist_ok=True)
    drop_caches()
    before = nginx.chunk_requests()
    with mount("cafuse", f"{nginx.url}/img.caibx", f"{nginx.url}/store", mnt, None):
        loop = sh("losetup", "-r", "-f", "--show", mnt / "img").stdout.decode().strip()
        try:
            sh("mount", "-o", "ro", "-t", "ext4", loop, inner)
            try:
                text = (inner / "etc" / "os-release").read_text()
                assert "bookworm" in text
            finally:
                sh("umount", inner)
        finally:
            sh("losetup", "-d", loop)
    fetched = nginx.chunk_requests() - before
    return {"chunks": fetched, "share": fetched / total_chunks}


def bench_ls(nginx, kind, work) -> list[float]:
    """Seconds of three warm `ls -l` runs (this kind of VM has slow spells)."""
    mnt = work / f"ls-{kind}"
    with mount(kind, f"{nginx.url}/big.caidx", f"{nginx.url}/store", mnt, None):
        sh("ls", "-l", mnt / "big")  # cold: fills the kernel's caches
        runs = []
        for _ in range(3 if kind == "cafuse" else 1):  # casync's takes 10 s
            start = time.perf_counter()
            sh("ls", "-l", mnt / "big")
            runs.append(time.perf_counter() - start)
        return runs


def index_chunks(path: Path) -> int:
    return (path.stat().st_size - 104) // 40


def runs(result: dict, key: str) -> str:
    return ", ".join(f"{run[key]:.2f}" if key == "seconds" else f"{run[key]}"
                     for run in result["runs"])


def report(r: dict, www: Path) -> str:
    c, k = r["tar"]["cafuse"], r["tar"]["casync"]
    py_c, py_k = r["python"]["cafuse"], r["python"]["casync"]
    lines = [
        f"## mount against casync mount — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
        f"Machine: {machine()}. Debian bookworm minbase root file system with "
        f"python3-minimal ({c['tar_bytes'] / 1e6:.0f} MB as tar, "
        f"{index_chunks(www / 'root.caidx')} chunks), served by nginx on 127.0.0.1; "
        "page cache dropped before each cold run. Command: "
        "`python integration/bench_mount.py` (part of `make bench`, as root).", "",
        "| measure | cafuse mount | casync mount | ratio |", "| --- | --- | --- | --- |",
        f"| cold `tar -cf - .` MB/s | {c['cold']:.0f} | {k['cold']:.0f} | "
        f"**{c['cold'] / k['cold']:.1f}×** |",
        f"| CPU seconds of the mount process in it | {c['cold_cpu']:.2f} | "
        f"{k['cold_cpu']:.2f} | {c['cold_cpu'] / k['cold_cpu']:.2f}× |",
        f"| cold `tar -cf - .` MB/s, store in the server's page cache | "
        f"{c['cold_warm_store']:.0f} | {k['cold_warm_store']:.0f} | "
        f"**{c['cold_warm_store'] / k['cold_warm_store']:.1f}×** |",
        f"| warm re-read in the same mount, MB/s (median of {WARM_RUNS}: "
        f"{', '.join(f'{r:.0f}' for r in c['warm_runs'])}) | {c['warm']:.0f} | "
        f"{k['warm']:.0f} | {c['warm'] / k['warm']:.1f}× |",
        f"| remount with a warm disk cache, MB/s | {c['remount']:.0f} | (no cache) | |",
        f"| CPU seconds of the mount process in it | {c['remount_cpu']:.2f} | | |",
        f"| the same tar, every chunk already in the mount's memory, the kernel's "
        f"caches dropped (memory bound raised to {IN_MEMORY_BYTES >> 30} GiB): cafuse's "
        f"own ceiling here, MB/s (median of {IN_MEMORY_RUNS}: "
        f"{', '.join(f'{r:.0f}' for r in c['in_memory_runs'])}) | {c['in_memory']:.0f} | | |",
        f"| chroot overlay `python3 -c 'print(1)'`, cold, s (median of {PYTHON_RUNS}: "
        f"{runs(py_c, 'seconds')} / {runs(py_k, 'seconds')}) | {py_c['seconds']:.2f} | "
        f"{py_k['seconds']:.2f} | {py_c['seconds'] / py_k['seconds']:.2f}× the time |",
        f"| chunks fetched for it (median; {runs(py_c, 'chunks')} / {runs(py_k, 'chunks')}) | "
        f"{py_c['chunks']:.0f} | {py_k['chunks']:.0f} | |",
        f"| `ls -l` of 10,000 entries, warm, s (cafuse: median of 3: "
        f"{', '.join(f'{t:.3f}' for t in r['ls']['cafuse'])}) | "
        f"{statistics.median(r['ls']['cafuse']):.3f} | {r['ls']['casync'][0]:.3f} | |",
        f"| peak RSS of the mount process, MB | {c['rss']:.0f} | | |", "",
        f"For reference, `tar -cf - .` of the same tree on the local ext4 disk: "
        f"{r['local']['cold']:.0f} MB/s with the page cache dropped, "
        f"{r['local']['warm']:.0f} MB/s warm (median of {WARM_RUNS}).", "",
        f"Loop-mounted ext4 image of the same tree from a cold .caibx mount: reading "
        f"/etc/os-release fetched {r['loop']['chunks']} of "
        f"{index_chunks(www / 'img.caibx')} chunks ({r['loop']['share']:.1%}).", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cafuse-bench-mount"))
    parser.add_argument("--write", action="store_true",
                        help="append the results to docs/benchmarks.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_mount.py needs root (FUSE, chroot, overlay, loop devices)")
    www = build(args.workdir)
    with Nginx(www, Path(tempfile.mkdtemp(prefix="nginx-")), log_requests=True) as nginx:
        results = {
            "tar": {kind: bench_tar(nginx, kind, args.workdir) for kind in ("cafuse", "casync")},
            "python": {kind: bench_python(nginx, kind, args.workdir)
                       for kind in ("cafuse", "casync")},
            "loop": bench_loop(nginx, args.workdir, index_chunks(www / "img.caibx")),
            "ls": {kind: bench_ls(nginx, kind, args.workdir) for kind in ("cafuse", "casync")},
            "local": bench_local_tar(args.workdir),
        }
    text = report(results, www)
    print(text)
    if args.write:
        write_docs(text)


if __name__ == "__main__":
    main()
