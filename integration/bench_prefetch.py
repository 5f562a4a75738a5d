"""Benchmark: `cafuse prefetch` of the ~400 MB ext4 image's index from nginx
on loopback into an empty cache, against `casync extract` of the same index
from the same nginx; and the HTTP clients' request rates.

    python integration/bench_prefetch.py [--workdir DIR] [--runs N] [--write]

The image comes from bench_cat.py (built once, cached in the workdir).
MB = 10^6 bytes of decompressed data.
"""

import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_cat import bench_args, build_image, cafuse_cmd, machine, write_docs  # noqa: E402
from servers import Nginx  # noqa: E402

from cafuse.http import Client  # noqa: E402


def chunk_paths(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*.cacnk"))


async def rate_h11(base: str, paths: list[str], concurrency: int) -> tuple[float, float]:
    client = Client(base, concurrency)
    return await _rate(lambda p: client.get(p), paths, concurrency, client.aclose)


async def rate_httpx(base: str, paths: list[str], concurrency: int) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = httpx.AsyncClient(base_url=base, limits=limits)
    return await _rate(lambda p: client.get("/" + p), paths, concurrency, client.aclose)


async def _rate(get, paths, concurrency, close):
    todo = iter(paths)
    received = [0]

    async def worker():
        for path in todo:
            response = await get(path)
            received[0] += len(response.content if hasattr(response, "content")
                               else response.body)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    await close()
    return len(paths) / elapsed, received[0] / elapsed / 1e6


def timed_peak(cmd) -> tuple[float, int, str]:
    """Seconds, peak RSS in KB (GNU time), and stdout of ``cmd``."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True,
                          text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {done.stderr}")
    return elapsed, int(done.stderr.strip().splitlines()[-1]), done.stdout


def distinct_bytes(summary: str) -> int:
    match = re.search(r"Prefetched \d+ distinct chunks \(([\d.]+) (\w+)\)", summary)
    value, unit = float(match.group(1)), match.group(2)
    return int(value * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit])


def bench(work: Path, runs: int) -> dict:
    index = build_image(work, 400)
    www = work / "www"
    www.mkdir(exist_ok=True)
    for name, target in (("img.caibx", index), ("store", work / "store")):
        if not (www / name).exists():
            os.symlink(target, www / name)
    image_size = (work / "img.ext4").stat().st_size
    results = {"prefetch": [], "casync": [], "rss_kb": 0}
    with Nginx(www, Path(tempfile.mkdtemp(prefix="nginx-"))) as nginx:
        store_url = f"{nginx.url}/store"
        paths = chunk_paths(work / "store")
        sample = random.Random(1).sample(paths, min(3000, len(paths)))
        results["h11"] = trio.run(rate_h11, store_url, sample, 8)
        results["httpx"] = trio.run(rate_httpx, store_url, sample, 8)
        for _ in range(runs):
            cache = Path(tempfile.mkdtemp(prefix="cafuse-cache-"))
            try:
                elapsed, peak, out = timed_peak(cafuse_cmd() + [
                    "prefetch", "--cache-dir", str(cache), "-s", store_url,
                    f"{nginx.url}/img.caibx"])
            finally:
                shutil.rmtree(cache)
            results["prefetch"].append(distinct_bytes(out) / elapsed / 1e6)
            results["distinct"] = distinct_bytes(out)
            results["rss_kb"] = max(results["rss_kb"], peak)
            results["summary"] = out
            target = Path("/dev/shm/cafuse-bench-extract.out")
            target.unlink(missing_ok=True)
            start = time.perf_counter()
            subprocess.run(["casync", f"--store={store_url}", "extract",
                            f"{nginx.url}/img.caibx", str(target)], check=True,
                           timeout=1800, capture_output=True)
            results["casync"].append(image_size / (time.perf_counter() - start) / 1e6)
            target.unlink()
    results["image_size"] = image_size
    return results


def report(r: dict) -> str:
    ours, theirs = statistics.median(r["prefetch"]), statistics.median(r["casync"])
    return "\n".join([
        f"## prefetch from nginx on loopback — {datetime.now(timezone.utc):%Y-%m-%d}", "",
        f"Machine: {machine()}. nginx (one worker) serves the zstd store of the "
        f"{r['image_size'] / 1e6:.0f} MB ext4 image of the section above on 127.0.0.1, "
        "competing with the client for the two cores. Command: "
        "`python integration/bench_prefetch.py` (part of `make bench`).", "",
        "| reader | median MB/s | runs |", "| --- | --- | --- |",
        f"| `cafuse prefetch` into an empty disk cache | {ours:.0f} | "
        f"{', '.join(f'{v:.0f}' for v in r['prefetch'])} |",
        f"| `casync extract` from the same nginx | {theirs:.0f} | "
        f"{', '.join(f'{v:.0f}' for v in r['casync'])} |", "",
        f"cafuse / casync: **{ours / theirs:.1f}×**. cafuse's rate counts the "
        f"{r['distinct'] / 1e6:.0f} MB of distinct chunks (an ext4 image repeats its "
        "zero blocks; prefetch fetches each chunk once); casync's counts the whole "
        f"image. Peak RSS of `cafuse prefetch`: {r['rss_kb'] / 1024:.0f} MB.", "",
        "HTTP clients on trio, 8 connections, GETs of 3,000 chunk files (the cost "
        "that bounds the chunk rate):", "",
        "| client | requests/s | MB/s (compressed) |", "| --- | --- | --- |",
        f"| cafuse.http (h11 driven directly) | {r['h11'][0]:.0f} | {r['h11'][1]:.0f} |",
        f"| httpx.AsyncClient | {r['httpx'][0]:.0f} | {r['httpx'][1]:.0f} |", "",
        "Summary printed by the last prefetch run:", "", "```", r["summary"].strip(),
        "```", ""])


def main():
    args = bench_args(__doc__, Path("/var/tmp/cafuse-bench"))
    text = report(bench(args.workdir, args.runs))
    print(text)
    if args.write:
        write_docs(text)


if __name__ == "__main__":
    main()
