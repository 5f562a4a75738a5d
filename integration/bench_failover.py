"""Benchmark: `cafuse cat` of a blob when the first store hangs.

    python integration/bench_failover.py [--workdir DIR] [--runs N] [--write]

A 20 MB blob of random bytes is archived with casync make; nginx on
127.0.0.1 serves its store (the mirror), and a server that accepts
connections and never answers stands for a hung store listed first.
Timed, each run checked against the blob (SHA-256): cafuse with the
mirror alone, then with the hung store first under two --deadline /
--timeout pairs; and casync extract from the mirror alone, from the hung
store alone (until the bench gives up), and with the mirror as an
--extra-store.
"""

import hashlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_cat import bench_args, cafuse_cmd, machine, write_docs  # noqa: E402
from servers import Nginx  # noqa: E402

BLOB_BYTES = 20_000_000
CASYNC_LIMIT = 60   # seconds casync is given against the hung store


class HungServer:
    """Accepts every connection and never answers; a context manager."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/store"
        self.held = []

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        try:
            while True:
                self.held.append(self.sock.accept()[0])
        except OSError:  # closed by __exit__
            pass

    def __exit__(self, *exc):
        self.sock.close()
        for conn in self.held:
            conn.close()


def build_blob(work: Path) -> tuple[Path, str]:
    """The blob's index (store beside it) and the blob's SHA-256."""
    blob, index = work / "blob.img", work / "www" / "blob.caibx"
    if not index.exists():
        index.parent.mkdir(parents=True, exist_ok=True)
        with open(blob, "wb") as f:
            f.write(hashlib.shake_256(b"cafuse failover").digest(BLOB_BYTES))
        subprocess.run(["casync", "make", f"--store={index.parent / 'store'}", str(index),
                        str(blob)], check=True, capture_output=True, timeout=600)
    return index, hashlib.sha256(blob.read_bytes()).hexdigest()


def seconds_or_why(cmd, digest: str, output: Path | None = None, limit: float = 600) -> str:
    """Seconds (as text) that ``cmd`` took to give the blob: on stdout, or
    in ``output``; otherwise what went wrong."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return f"gave up after {limit:g} s"
    elapsed = time.perf_counter() - start
    data = output.read_bytes() if output and output.exists() else done.stdout
    if done.returncode or hashlib.sha256(data).hexdigest() != digest:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        return f"failed: {reason[-1] if reason else 'wrong bytes'}"
    return f"{elapsed:.1f}"


def bench(work: Path, runs: int) -> list[tuple[str, list[str]]]:
    index, digest = build_blob(work)
    out = Path("/dev/shm/cafuse-bench-failover.img")
    rows = []
    with Nginx(index.parent, Path(tempfile.mkdtemp(prefix="nginx-"))) as nginx, \
            HungServer() as hung:
        mirror = f"{nginx.url}/store"
        cafuse = cafuse_cmd() + ["cat", "--no-cache"]
        cases = [
            ("cafuse cat, mirror alone", cafuse + ["-s", mirror, str(index)]),
            ("cafuse cat, hung store then mirror, --deadline 4 --timeout 10",
             cafuse + ["--deadline", "4", "--timeout", "10", "-s", hung.url, "-s", mirror,
                       str(index)]),
            ("cafuse cat, hung store then mirror, --deadline 8 --timeout 5",
             cafuse + ["--deadline", "8", "--timeout", "5", "-s", hung.url, "-s", mirror,
                       str(index)]),
        ]
        for name, cmd in cases:
            rows.append((name, [seconds_or_why(cmd, digest) for _ in range(runs)]))
        casync = ["casync", "extract"]
        cases = [
            ("casync extract, mirror alone", casync + [f"--store={mirror}"], 600),
            ("casync extract, hung store alone", casync + [f"--store={hung.url}"],
             CASYNC_LIMIT),
            ("casync extract, hung store, mirror as --extra-store",
             casync + [f"--store={hung.url}", f"--extra-store={mirror}"], CASYNC_LIMIT),
        ]
        for name, cmd, limit in cases:
            results = []
            for _ in range(runs):
                out.unlink(missing_ok=True)
                results.append(seconds_or_why(cmd + [str(index), str(out)], digest, out, limit))
            out.unlink(missing_ok=True)
            rows.append((name, results))
    return rows


def report(rows, runs: int) -> str:
    def median(results):
        times = [float(r) for r in results if r[0].isdigit()]
        return f"{statistics.median(times):.1f}" if len(times) == len(results) else "—"
    lines = [f"## failover from a hung store — {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             "", f"Machine: {machine()}. A {BLOB_BYTES / 1e6:.0f} MB blob of random bytes "
             "(casync make's default chunk sizes); nginx serves its store on 127.0.0.1, "
             "and a server that accepts connections and never answers is the hung "
             f"store. Each command run {runs} times, its output checked (SHA-256). "
             "Command: `python integration/bench_failover.py` (part of `make bench`).", "",
             "| command | median s | runs |", "| --- | --- | --- |"]
    lines += [f"| {name} | {median(results)} | {'; '.join(results)} |"
              for name, results in rows]
    return "\n".join(lines) + "\n"


def main():
    args = bench_args(__doc__, Path("/var/tmp/cafuse-bench-failover"))
    text = report(bench(args.workdir, args.runs), args.runs)
    print(text)
    if args.write:
        write_docs(text)


if __name__ == "__main__":
    main()
