"""Benchmark: `cafuse cat` of a ~400 MB ext4 image's .caibx from a local zstd
store, side by side with `casync extract` of the same index; where cafuse's
time goes; and opening a 1,000,000-entry index.

    python integration/bench_cat.py [--workdir DIR] [--size-mb N] [--runs N]
                                    [--index-only] [--write]

Run it with the interpreter cafuse is installed in (`make bench` uses
.venv/bin/python); `cafuse` is the console script next to that interpreter.
The image, its index and its store are built once and cached in the workdir.
Both readers run after a warm-up run, so the page cache holds the store.
MB = 10^6 bytes of decompressed data.  The Markdown section printed at the
end is appended to docs/benchmarks.md with --write.
"""

import argparse
import hashlib
import io
import os
import platform
import pstats
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from cafuse import chunk
from cafuse.index import Index
from cafuse.store import LocalStore

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
DOCS_HEADER = """\
# Benchmarks

Measured speed of cafuse, side by side with casync where both can do the
job. Each section is appended by the script it names (`make bench` runs
integration/bench_cat.py) and records its date, the machine it ran on and
the exact commands, so that numbers from different machines or commits can
be told apart.

"""
SOURCES = ["/usr/lib", "/usr/share", "/usr/bin"]
FILL = 0.75              # share of the image to fill with copied files
TIMEOUT = 1800           # seconds, for any one subprocess
BIG_INDEX_ENTRIES = 1_000_000
LOOKUPS = 100_000
CAT_TARGET_MBS = 300
INDEX_TARGETS = (1.0, 100)  # seconds to open, MB of peak RSS growth
INDEX_RUNS = 3           # fresh processes opening the big index


# --- running things --------------------------------------------------------

def cafuse_cmd() -> list[str]:
    """The cafuse console script next to this interpreter, else ``-m``."""
    script = Path(sys.executable).parent / "cafuse"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cafuse.cli"]


def sh(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, timeout=TIMEOUT, **kwargs)


def timed(cmd, stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, all threads) of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    sh(*cmd, stdout=stdout)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def say(*parts):
    print(*parts, flush=True)


# --- the image -------------------------------------------------------------

def copy_files(dest: Path, budget: int) -> int:
    """Copy regular files from SOURCES into ``dest`` until ``budget`` bytes
    are used up; returns the bytes copied."""
    copied = 0
    for top in SOURCES:
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                size = os.path.getsize(path)
                if copied + size > budget:
                    continue
                target = dest / os.path.relpath(path, "/")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(path, target)
                except OSError:
                    continue
                copied += size
            if budget - copied < 1 << 20:
                return copied
    return copied


def build_image(work: Path, size_mb: int) -> Path:
    """An ext4 image of ``size_mb`` MiB, about 3/4 full of real files, and
    its .caibx over a zstd store; reused while an image of that size exists."""
    image, index, store = work / "img.ext4", work / "img.caibx", work / "store"
    if index.exists() and image.exists() and image.stat().st_size == size_mb << 20:
        return index
    for stale in (image, index):
        stale.unlink(missing_ok=True)
    shutil.rmtree(store, ignore_errors=True)
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    say(f"building {image}: copying files from {', '.join(SOURCES)} ...")
    copied = copy_files(src, int((size_mb << 20) * FILL))
    say(f"  {copied / 1e6:.0f} MB copied; mkfs.ext4 -d, then casync make ...")
    sh("mkfs.ext4", "-q", "-F", "-d", str(src), str(image), f"{size_mb}M")
    shutil.rmtree(src)
    partial = work / "img.partial.caibx"
    sh("casync", "make", "--compression=zstd", f"--store={store}", str(partial),
       str(image), stdout=subprocess.DEVNULL)
    partial.rename(index)  # the index last: its presence marks a finished build
    return index


def describe_image(work: Path, index: Path) -> dict:
    chunk_files = list((work / "store").rglob("*.cacnk"))
    return {"image_bytes": (work / "img.ext4").stat().st_size,
            "chunks": (index.stat().st_size - 104) // 40,
            "store_files": len(chunk_files),
            "store_bytes": sum(p.stat().st_size for p in chunk_files)}


# --- cafuse cat against casync extract -------------------------------------

def extract_target(image_bytes: int, work: Path) -> Path:
    """Where casync writes (it needs a file): tmpfs if it has room."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * image_bytes:
        return shm / f"cafuse-bench-{os.getpid()}.img"
    return work / "extract.img"


def reader_commands(work: Path, index: Path, out: Path) -> dict:
    """The two commands, as lists.  cafuse gets a cache directory of its own
    in the workdir: chunks from a local store are never written to it, so it
    stays empty and cafuse reads every chunk from the store."""
    store = str(work / "store")
    return {
        "cafuse cat": cafuse_cmd() + ["cat", "-s", store, "--cache-dir",
                                      str(work / "cache"), str(index)],
        "casync extract": ["casync", "extract", f"--store={store}", str(index), str(out)],
    }


def run_reader(name: str, cmd: list[str], out: Path) -> tuple[float, float]:
    if name == "cafuse cat":
        return timed(cmd)  # stdout is /dev/null
    out.unlink(missing_ok=True)
    try:
        return timed(cmd)
    finally:
        out.unlink(missing_ok=True)


def bench_readers(commands: dict, out: Path, runs: int) -> dict:
    """Per reader, [(wall, cpu)] of ``runs`` runs after one warm-up run;
    the readers take turns, so a change in machine load hits both."""
    results = {name: [] for name in commands}
    for name, cmd in commands.items():
        run_reader(name, cmd, out)
    for k in range(runs):
        for name, cmd in commands.items():
            results[name].append(run_reader(name, cmd, out))
            wall, cpu = results[name][-1]
            say(f"  run {k + 1}: {name}: {wall:.3f} s wall, {cpu:.3f} s CPU")
    return results


def output_matches(cmd: list[str], image: Path) -> bool:
    """Whether the bytes ``cmd`` writes to stdout are the image (SHA-256)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        ours = hashlib.file_digest(proc.stdout, "sha256").hexdigest()
        proc.wait(timeout=TIMEOUT)
    with open(image, "rb") as f:
        return proc.returncode == 0 and ours == hashlib.file_digest(f, "sha256").hexdigest()


def startup_seconds() -> tuple[float, float]:
    """Median wall and CPU seconds of `cafuse --version`: interpreter start
    and the imports every command pays for."""
    runs = [timed(cafuse_cmd() + ["--version"]) for _ in range(5)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


# --- where the time goes ---------------------------------------------------

STEPS = ("read chunk files", "zstd decompression", "SHA-512/256")


def breakdown(index_path: Path, store: Path) -> dict:
    """Seconds per step that cafuse does for each chunk, one thread, all
    chunks, with cafuse's own functions."""
    index = Index.parse(index_path.read_bytes())
    local = LocalStore(str(store))
    spent = dict.fromkeys(STEPS, 0.0)
    for i in range(len(index)):
        chunk_id = index.chunk_id(i)
        t0 = time.perf_counter()
        raw, _compressed = local.load(chunk_id)
        t1 = time.perf_counter()
        data = chunk.decompress(raw, index.chunk_size(i))
        t2 = time.perf_counter()
        ok = chunk.digest(data, index.digest) == chunk_id
        t3 = time.perf_counter()
        if not ok:
            raise SystemExit(f"chunk {i} does not match its id")
        for step, seconds in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2)):
            spent[step] += seconds
    return spent


def profile(cat_cmd: list[str]) -> tuple[str, float, float]:
    """`cafuse cat` under cProfile: the top 15 by cumulative time and the top
    10 by own time, the seconds the event loop spent waiting in epoll, and
    the profiled total.  cProfile sees the main thread only (the event loop
    and the writes); the chunk work in the worker threads shows up as that
    waiting."""
    args = cat_cmd[cat_cmd.index("cat"):]
    with tempfile.TemporaryDirectory() as tmp:
        prof = os.path.join(tmp, "cat.prof")
        sh(sys.executable, "-m", "cProfile", "-o", prof, "-m", "cafuse.cli", *args,
           stdout=subprocess.DEVNULL)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).strip_dirs()
        stats.sort_stats("cumulative").print_stats(15)
        stats.sort_stats("tottime").print_stats(10)
    waiting = sum(row[2] for (_file, _line, name), row in stats.stats.items()
                  if name == "<method 'poll' of 'select.epoll' objects>")
    return text.getvalue().strip("\n"), waiting, stats.total_tt


# --- opening a big index ---------------------------------------------------

def write_big_index(path: Path, n: int = BIG_INDEX_ENTRIES) -> None:
    """A valid .caibx of ``n`` 64 KiB chunks with random ids (casync-format §2)."""
    item = struct.Struct("<Q32s")
    ids = os.urandom(32 * n)
    table = bytearray(item.size * n)
    for i in range(n):
        item.pack_into(table, item.size * i, (i + 1) * 65536, ids[32 * i:32 * i + 32])
    with open(path, "wb") as f:
        f.write(struct.pack("<6Q", 48, 0x96824D9C7B129FF9, 0xB000000000000000,
                            16 << 10, 64 << 10, 256 << 10))
        f.write(struct.pack("<2Q", 0xFFFFFFFFFFFFFFFF, 0xE75B9E112F17417D))
        f.write(table)
        f.write(struct.pack("<5Q", 0, 0, 48, 16 + 40 * n + 40, 0x4B4F050E5549ECD1))


# Runs in a fresh interpreter.  Peak RSS is VmHWM from /proc: ru_maxrss of a
# child started with vfork/exec can carry over the parent's peak.  trio runs
# once before the measurement, so its set-up is not counted.
INDEX_PROBE = f"""
import random, sys, time
import trio
from cafuse.inputs import read_index
from cafuse.store import HTTPOptions

def peak_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

trio.run(trio.sleep, 0)
before = peak_kb()
start = time.perf_counter()
index = trio.run(read_index, sys.argv[1], HTTPOptions())
opened = time.perf_counter() - start
grown_mb = (peak_kb() - before) * 1024 / 1e6
offsets = [random.randrange(index.size) for _ in range({LOOKUPS})]
start = time.perf_counter()
for offset in offsets:
    index.span(offset, 1)
rate = len(offsets) / (time.perf_counter() - start)
print(len(index), opened, grown_mb, rate)
"""


def bench_index(work: Path, runs: int) -> dict:
    """Median open time and lookup rate, largest RSS growth, over ``runs``
    fresh processes."""
    path = work / "big.caibx"
    if not path.exists() or path.stat().st_size != 104 + 40 * BIG_INDEX_ENTRIES:
        say(f"writing {path} ({BIG_INDEX_ENTRIES:,} entries) ...")
        write_big_index(path)
    rows = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", INDEX_PROBE, str(path)], check=True,
                             capture_output=True, text=True, timeout=300).stdout.split()
        if int(out[0]) != BIG_INDEX_ENTRIES:
            raise SystemExit(f"read_index saw {out[0]} entries")
        rows.append([float(x) for x in out[1:]])
    return {"bytes": path.stat().st_size,
            "open_s": statistics.median(r[0] for r in rows),
            "rss_mb": max(r[1] for r in rows),
            "lookups": statistics.median(r[2] for r in rows)}


# --- the report ------------------------------------------------------------

def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    casync = sh("casync", "--version", capture_output=True, text=True).stdout
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": len(os.sched_getaffinity(0)), "cpu": cpu,
            "kernel": platform.release(), "python": platform.python_version(),
            "casync": casync.splitlines()[0].strip(),
            "load": os.getloadavg()[0]}


def machine(info: dict | None = None) -> str:
    info = info or machine_info()
    return (f"{info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, "
            f"Python {info['python']}, {info['casync']}")


def table(header: tuple, rows: list) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def shell(cmd: list[str]) -> str:
    return " ".join(cmd)


def cat_section(image, commands, out, readers, startup, spent, waiting) -> list[str]:
    size = image["image_bytes"]
    mbs = {name: [size / wall / 1e6 for wall, _cpu in runs] for name, runs in readers.items()}
    median = {name: statistics.median(v) for name, v in mbs.items()}
    ratio = median["cafuse cat"] / median["casync extract"]
    verdict = "meets" if median["cafuse cat"] >= CAT_TARGET_MBS else "misses"
    lines = [
        f"Image: ext4, {size / 1e6:.0f} MB ({size >> 20} MiB, about "
        f"{FILL:.0%} full of files copied from {', '.join(SOURCES)}), "
        f"{image['chunks']} chunks (casync's default sizes), zstd store of "
        f"{image['store_files']} chunk files, {image['store_bytes'] / 1e6:.0f} MB.", "",
        f"Commands, each timed {len(readers['cafuse cat'])} times after one warm-up "
        "run (so the page cache holds the store), the readers taking turns:", "",
        f"- `{shell(commands['cafuse cat'])} > /dev/null`",
        f"- `{shell(commands['casync extract'])}` (casync writes a file: {out.parent}, "
        f"{'tmpfs' if str(out).startswith('/dev/shm') else 'the workdir'}; "
        "deleted after each run)", "",
        *table(("reader", "best MB/s", "median MB/s", "median wall s", "median CPU s"),
               [(name, f"{max(mbs[name]):.0f}", f"{median[name]:.0f}",
                 f"{statistics.median(w for w, _c in runs):.3f}",
                 f"{statistics.median(c for _w, c in runs):.3f}")
                for name, runs in readers.items()]), "",
        f"cafuse / casync (median MB/s): **{ratio:.2f}×**. `cafuse cat` {verdict} the "
        f"{CAT_TARGET_MBS} MB/s target. Its output matched the image (SHA-256).", "",
    ]
    return lines + breakdown_lines(size, readers["cafuse cat"], startup, spent, waiting)


def breakdown_lines(size, cat_runs, startup, spent, waiting) -> list[str]:
    wall = statistics.median(w for w, _c in cat_runs)
    cpu = statistics.median(c for _w, c in cat_runs)
    work = sum(spent.values())
    cores = len(os.sched_getaffinity(0))
    ideal = startup[0] + work / cores
    steps = [(step, f"{t:.3f}", f"{size / t / 1e6:.0f}") for step, t in spent.items()]
    steps.append(("**sum: the chunk work**", f"**{work:.3f}**", f"{size / work / 1e6:.0f}"))
    return [
        "Where cafuse's time goes. The steps cafuse does per chunk, measured "
        "in-process with its own functions (`LocalStore.load`, `chunk.decompress`, "
        "`chunk.digest`), one thread, all chunks:", "",
        *table(("step", "seconds", "MB/s alone"), steps), "",
        "Against the whole command (medians of the timed runs):", "",
        *table(("measure", "seconds"), [
            ("`cafuse cat` wall time", f"{wall:.3f}"),
            ("`cafuse cat` CPU time, all threads", f"{cpu:.3f}"),
            ("start-up: `cafuse --version` wall (CPU)",
             f"{startup[0]:.3f} ({startup[1]:.3f})"),
            ("CPU beyond the chunk work and start-up: event loop, thread hops, "
             "disk-cache lookups, writes, contention", f"{cpu - work - startup[1]:.3f}"),
            (f"ideal wall: start-up + chunk work / {cores} cores", f"{ideal:.3f}"),
            ("wall time above the ideal", f"{wall - ideal:.3f}"),
            ("event loop waiting for worker threads (epoll, one cProfile run, "
             "of its total)", f"{waiting[0]:.3f} of {waiting[1]:.3f}"),
        ]), "",
        f"On average {cpu / wall:.2f} of {cores} cores were busy.", ""]


def index_section(big: dict) -> list[str]:
    max_s, max_mb = INDEX_TARGETS
    return [
        f"Opening a synthetic {BIG_INDEX_ENTRIES:,}-entry index "
        f"({big['bytes'] / 1e6:.0f} MB, 64 KiB chunks, random ids) with "
        "`cafuse.inputs.read_index` in a fresh process (median of "
        f"{INDEX_RUNS} processes; peak RSS growth is the largest, from VmHWM):", "",
        *table(("measure", "result", "target"), [
            ("open and validate", f"{big['open_s']:.3f} s", f"< {max_s:g} s"),
            ("peak RSS growth", f"{big['rss_mb']:.0f} MB", f"< {max_mb} MB"),
            (f"`index.span(offset, 1)`, {LOOKUPS:,} random offsets",
             f"{big['lookups'] / 1e3:.0f}k lookups/s", ""),
        ]), ""]


def section(info: dict, title: str, body: list[str]) -> str:
    return "\n".join([
        f"## {title} — {info['date']}", "",
        f"Machine: {machine(info)}; 1-minute load average {info['load']:.2f} at the "
        f"start. Script: `integration/bench_cat.py` (`make bench`).", "",
        *body])


def bench_args(doc: str, workdir: Path) -> argparse.Namespace:
    """The options of a benchmark that builds in ``--workdir`` (made
    here), times each command ``--runs`` times and, with ``--write``,
    appends its report to DOCS."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=workdir)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true",
                        help="append the results to docs/benchmarks.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def write_docs(text: str) -> None:
    """Append ``text`` to DOCS (created with its header if missing), one
    blank line after what is there."""
    existing = DOCS.read_text() if DOCS.exists() else DOCS_HEADER
    DOCS.write_text(existing.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
    say(f"appended to {DOCS}")


# --- main ------------------------------------------------------------------

def bench_cat(work: Path, size_mb: int, runs: int) -> list[str]:
    index = build_image(work, size_mb)
    image = describe_image(work, index)
    say(f"image {image['image_bytes'] / 1e6:.0f} MB, {image['chunks']} chunks, "
        f"store {image['store_bytes'] / 1e6:.0f} MB in {image['store_files']} files")
    out = extract_target(image["image_bytes"], work)
    commands = reader_commands(work, index, out)
    say("timing the readers (after one warm-up run each) ...")
    readers = bench_readers(commands, out, runs)
    if not output_matches(commands["cafuse cat"], work / "img.ext4"):
        raise SystemExit("cafuse cat's output differs from the image")
    startup = startup_seconds()
    say("measuring the steps one thread at a time ...")
    spent = breakdown(index, work / "store")
    say("profiling cafuse cat (main thread) ...")
    listing, waiting, profiled = profile(commands["cafuse cat"])
    say(listing)
    return cat_section(image, commands, out, readers, startup, spent, (waiting, profiled))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cafuse-bench"),
                        help="where the image, store and big index are built and "
                        "kept (default: %(default)s)")
    parser.add_argument("--size-mb", type=int, default=400,
                        help="image size in MiB, as mkfs.ext4 reads 400M "
                        "(default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per reader, after the warm-up "
                        "(default: %(default)s)")
    parser.add_argument("--index-only", action="store_true",
                        help="only the 1,000,000-entry index benchmark")
    parser.add_argument("--write", action="store_true",
                        help=f"append the Markdown section to {DOCS.relative_to(REPO)}")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    if info["load"] > 0.5:
        say(f"warning: load average {info['load']:.2f}; other work skews the figures")
    body = [] if args.index_only else bench_cat(args.workdir, args.size_mb, args.runs)
    say("opening a big index ...")
    body += index_section(bench_index(args.workdir, INDEX_RUNS))
    title = ("Opening a big index" if args.index_only
             else "cat of a .caibx from a local store")
    text = section(info, title, body)
    say("\n" + text)
    if args.write:
        write_docs(text)


if __name__ == "__main__":
    main()
