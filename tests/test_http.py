"""Remote stores: nginx on loopback, and faults injected by our own server.

Whatever the network does, the result is the right bytes or one clear error
within the deadline: never a hang, never a wrong byte, never a corrupt cache
entry.
"""

import os
import shutil
import signal
import subprocess
import time

import pytest

from command import CAFUSE, fails, run
from casync_fixtures import require
from servers import FaultServer, Nginx, dead_url, kill_quietly, self_signed

FAST = ["--timeout", "0.5", "--retries", "1", "--deadline", "5"]


@pytest.fixture(scope="module")
def blob(casync_archive):
    return casync_archive("blob1m", chunk_size="16K")


@pytest.fixture(scope="module")
def tree(casync_archive):
    return casync_archive("full")


@pytest.fixture(scope="module")
def nginx(blob, tree, tmp_path_factory):
    """nginx serving both archives: /blob/… and /tree/…"""
    require(shutil.which("nginx") is not None, "needs nginx (make setup)")
    root = tmp_path_factory.mktemp("www")
    for name, made in (("blob", blob), ("tree", tree)):
        (root / name).mkdir()
        shutil.copy(made.index, root / name / made.index.name)
        os.symlink(made.store, root / name / "default.castr")
    with Nginx(root, tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture
def cache(tmp_path):
    return ["--cache-dir", str(tmp_path / "cache")]


def test_blob_over_http(nginx, blob, cache):
    url = f"{nginx.url}/blob/{blob.index.name}"
    assert run("cat", *cache, url).stdout == blob.tree.read_bytes()
    assert "blob index" in run("info", url).stdout.decode()


def test_tree_over_http(nginx, tree, cache):
    url = f"{nginx.url}/tree/{tree.index.name}"
    assert run("cat", *cache, url, "dir/sub/deep.txt").stdout == b"deep\n"
    local = run("ls", "-lR", tree.index).stdout
    assert run("ls", "-lR", *cache, "-s", f"{nginx.url}/tree/default.castr", url).stdout == local


def test_https_with_ca_file_or_insecure(nginx, blob, cache, tmp_path):
    cert, key = self_signed(tmp_path)
    with Nginx(nginx.root, tmp_path / "nginx-tls", tls=(cert, key)) as server:
        url = f"{server.url}/blob/{blob.index.name}"
        fails("cat", *cache, *FAST, url, match="certificate verify failed")
        assert run("cat", *cache, "--ca-file", cert, url).stdout == blob.tree.read_bytes()
        assert run("cat", "--no-cache", "--insecure", url).stdout == blob.tree.read_bytes()


def test_index_url_404(nginx):
    fails("info", f"{nginx.url}/blob/nope.caibx", match="HTTP 404")


def test_disk_cache_serves_when_the_store_is_gone(nginx, blob, cache):
    store = f"{nginx.url}/blob/default.castr"
    run("cat", *cache, "-s", store, blob.index)
    out = run("cat", *cache, "-s", dead_url(), *FAST, blob.index).stdout
    assert out == blob.tree.read_bytes()
    assert cache_entries(cache) == (blob.index.stat().st_size - 104) // 40


def test_rotten_cache_entry_is_never_served(nginx, blob, cache, tmp_path):
    store = f"{nginx.url}/blob/default.castr"
    run("cat", *cache, "-s", store, blob.index)
    [pack] = (tmp_path / "cache" / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    data[40] ^= 1  # inside the first record's chunk bytes
    pack.write_bytes(data)
    fails("cat", *cache, "-s", dead_url(), *FAST, blob.index, match="chunk")
    assert run("cat", *cache, "-s", store, blob.index).stdout == blob.tree.read_bytes()
    out = run("cat", *cache, "-s", dead_url(), *FAST, blob.index).stdout
    assert out == blob.tree.read_bytes()  # the chunk was fetched and cached again


def cache_entries(cache) -> int:
    stats = run("cache", "stats", *cache).stdout.decode()
    return int(stats.split("Entries:")[1].split()[0])


def faulty(blob, fault):
    return FaultServer(blob.store, fault)


@pytest.mark.parametrize("fault", ["500", "503", "429", "reset", "truncate", "stall"])
def test_transient_faults_are_retried(blob, fault, cache):
    # Every chunk fails on its first request only.
    with faulty(blob, lambda path, n: fault if n == 1 else None) as server:
        out = run("cat", *cache, "-s", server.url, *FAST, "--retries", "2", blob.index)
        assert out.stdout == blob.tree.read_bytes()


@pytest.mark.parametrize("fault", ["500", "reset", "truncate", "stall", "trickle"])
def test_persistent_faults_fail_within_the_deadline(blob, fault, cache, tmp_path):
    with faulty(blob, lambda path, n: fault) as server:
        start = time.monotonic()
        fails("cat", *cache, "-o", tmp_path / "out", "-s", server.url, *FAST, blob.index,
              match="chunk ", timeout=60)
        assert time.monotonic() - start < 15
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("status", ["301", "302", "307", "308"])
def test_redirects_of_chunks_and_of_the_index_are_followed(blob, status, tmp_path, cache):
    # As casync's HTTP helper does: a store moved elsewhere, or a CDN.
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(blob.index, www / blob.index.name)
    os.symlink(blob.store, www / "store")
    with FaultServer(www, lambda path, n: None if path.startswith("/moved/") else status) \
            as server:
        out = run("cat", *cache, "-s", f"{server.url}/store", *FAST,
                  f"{server.url}/{blob.index.name}")
    assert out.stdout == blob.tree.read_bytes()


def test_no_message_names_the_password_of_a_url(nginx, blob, tree, cache):
    secret = nginx.url.replace("http://", "http://u:s3cret@")
    for args in (("ls", f"{secret}/blob/{blob.index.name}"),   # a blob has no tree
                 ("cat", f"{secret}/tree/{tree.index.name}")):  # no PATH given
        err = fails(*args, *cache, match=nginx.url.removeprefix("http://"))
        assert "s3cret" not in err


def test_an_early_hints_answer_before_each_chunk_is_skipped(blob, cache):
    with faulty(blob, lambda path, n: "hints") as server:
        out = run("cat", *cache, "-s", server.url, *FAST, blob.index)
    assert out.stdout == blob.tree.read_bytes()


def peak_rss_kib(proc: subprocess.Popen) -> int:
    """The VmHWM of ``proc``, looked at until it ends.  (Not ru_maxrss: a
    child started with vfork and exec carries its parent's peak over.)"""
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([peak, *(int(line.split()[1]) for line in f
                                    if line.startswith("VmHWM:"))])
        except OSError:
            pass
        time.sleep(0.01)
    return peak


def test_a_store_announcing_gigabytes_is_refused_without_filling_the_memory(blob, cache):
    # 16 connections each taking in up to 256 MiB made a mount of this
    # blob (no chunk over 64 KiB) grow to 3.7 GB.
    with faulty(blob, lambda path, n: "huge") as server:
        proc = subprocess.Popen([CAFUSE, "cat", *cache, "-s", server.url, *FAST,
                                 str(blob.index)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        peak = peak_rss_kib(proc)
    err = proc.stderr.read().decode()
    assert proc.returncode == 1, err
    assert "the answer announces 5000000000 bytes" in err and "Traceback" not in err
    assert 0 < peak < 150 << 10, f"peak RSS {peak >> 10} MiB"


def test_corrupt_bytes_are_never_served(blob, cache, tmp_path):
    with faulty(blob, lambda path, n: "corrupt") as server:
        fails("cat", *cache, "-s", server.url, *FAST, blob.index, match="chunk ")
    assert cache_entries(cache) == 0


def test_failover_to_a_second_store(nginx, blob, cache):
    good = f"{nginx.url}/blob/default.castr"
    # The first store lacks every other chunk and corrupts the rest.
    with faulty(blob, lambda path, n: "404" if hash(path) % 2 else "corrupt") as server:
        out = run("cat", *cache, "-s", server.url, "-s", good, *FAST, blob.index)
    assert out.stdout == blob.tree.read_bytes()


def test_a_dead_store_costs_one_deadline_not_one_per_chunk(nginx, blob, cache):
    good = f"{nginx.url}/blob/default.castr"
    with faulty(blob, lambda path, n: "stall") as server:
        start = time.monotonic()
        out = run("cat", *cache, "-s", server.url, "-s", good, "--timeout", "1",
                  "--retries", "0", "--connections", "4", blob.index)
        elapsed = time.monotonic() - start
        assert out.stdout == blob.tree.read_bytes()
        assert server.total() <= 16  # the requests already in flight, no more
        assert elapsed < 10


def test_headers_are_sent_and_never_logged(blob, cache):
    seen = []

    def fault(path, n):
        return None

    with faulty(blob, fault) as server:
        original = server.handle

        def handle(h):
            seen.append(h.headers.get("Authorization"))
            original(h)

        server.handle = handle
        done = run("cat", *cache, "-v", "-v", "-s", server.url, "-H", "Authorization: Bearer s3cret",
                   blob.index)
    assert set(seen) == {"Bearer s3cret"}
    assert b"s3cret" not in done.stderr


def test_prefetch_then_read_offline(nginx, tree, cache):
    store = f"{nginx.url}/tree/default.castr"
    done = run("prefetch", *cache, "-s", store, tree.index)
    summary = done.stdout.decode()
    chunks = (tree.index.stat().st_size - 104) // 40
    assert f"from {store}: " in summary and "Transferred" in summary
    assert run("cat", *cache, "-s", dead_url(), *FAST, tree.index, "random.bin").stdout == \
        (tree.tree / "random.bin").read_bytes()
    again = run("prefetch", *cache, "-s", store, tree.index).stdout.decode()
    assert "from disk cache" in again and f"from {store}" not in again
    assert chunks >= 1


def test_kill_during_prefetch_leaves_a_usable_cache(blob, cache, tmp_path):
    with faulty(blob, lambda path, n: "trickle" if hash(path) % 3 == 0 else None) as slow:
        proc = subprocess.Popen([CAFUSE, "prefetch", *cache, "-s", slow.url, "--timeout",
                                 "30", str(blob.index)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            kill_quietly(proc)
    with faulty(blob, lambda path, n: None) as good:
        run("prefetch", *cache, "-s", good.url, blob.index)
        fetched_again = good.total()
    assert fetched_again < (blob.index.stat().st_size - 104) // 40  # kept what it had
    out = run("cat", *cache, "-s", dead_url(), *FAST, blob.index).stdout
    assert out == blob.tree.read_bytes()


def test_two_processes_fill_one_cache(nginx, blob, cache):
    store = f"{nginx.url}/blob/default.castr"
    procs = [subprocess.Popen([CAFUSE, "prefetch", *cache, "-s", store, str(blob.index)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    out = run("cat", *cache, "-s", dead_url(), *FAST, blob.index).stdout
    assert out == blob.tree.read_bytes()


def test_cache_prune(nginx, blob, cache):
    # A 2 MiB budget makes packs of 128 KiB, so pruning can keep some.
    run("prefetch", *cache, "--cache-size", "2M", "-s", f"{nginx.url}/blob/default.castr",
        blob.index)
    run("cache", "prune", *cache, "--max-size", "300K")
    stats = run("cache", "stats", *cache).stdout.decode()
    size = int(stats.split("Size:")[1].split()[0])
    assert 0 < size <= 300 * 1024


def test_small_cache_stays_bounded(nginx, blob, cache, tmp_path):
    run("cat", *cache, "--cache-size", "200K", "-s",
        f"{nginx.url}/blob/default.castr", blob.index)
    # The budget counts chunk data; the SQLite index beside it is extra.
    total = sum(p.stat().st_size for p in (tmp_path / "cache" / "packs").iterdir())
    assert 0 < total <= 200 * 1024


def test_full_disk_degrades_to_memory(nginx, blob, tmp_path):
    require(os.geteuid() == 0, "needs root to mount a tiny tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        done = run("cat", "--cache-dir", small / "cache", "-s",
                   f"{nginx.url}/blob/default.castr", blob.index)
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert done.stdout == blob.tree.read_bytes()
    warnings = [line for line in done.stderr.decode().splitlines() if "cache" in line]
    assert len(warnings) == 1 and ("No space left" in warnings[0] or "full" in warnings[0])


def test_seed_supplies_shared_chunks(nginx, casync_archive, tmp_path, cache):
    v1 = casync_archive("blob1m", chunk_size="16K")
    v2_file = tmp_path / "v2.bin"
    data = bytearray(v1.tree.read_bytes())
    data[500_000:500_010] = b"0123456789"  # v2 differs from v1 in one place
    v2_file.write_bytes(data)
    v2 = tmp_path / "v2.caibx"
    subprocess.run(["casync", "make", "--chunk-size=16K", f"--store={v1.store}", str(v2),
                    str(v2_file)], check=True, capture_output=True, timeout=60)
    store = f"{nginx.url}/blob/default.castr"
    done = run("prefetch", *cache, "-s", store, "--seed", f"{v1.index}:{v1.tree}", v2)
    summary = done.stdout.decode()
    from_seed = int(summary.split("from seed: ")[1].split()[0])
    from_store = int(summary.split(f"from {store}: ")[1].split()[0])
    assert from_seed > 10 * from_store > 0
    # Offline, the seed and the cache (which holds what the store sent) suffice.
    out = run("cat", *cache, "-s", dead_url(), *FAST, "--seed", f"{v1.index}:{v1.tree}", v2)
    assert out.stdout == bytes(data)
