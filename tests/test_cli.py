"""The cafuse command as a user runs it, against what casync says."""

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest

import oracle
import trees

from command import CAFUSE, fails, run
from servers import FaultServer, environ, kill_quietly


@pytest.fixture(scope="module")
def full(casync_archive):
    return casync_archive("full")


def test_info_tree(full):
    out = run("info", full.index).stdout.decode()
    index_bytes = full.index.stat().st_size
    assert "archive index (.caidx)" in out
    assert f"Chunks:        {(index_bytes - 104) // 40} " in out
    assert "Digest:        sha512-256" in out
    assert "0xb0000001ffeffe26" in out and "xattrs acl selinux fcaps" in out


def test_info_blob(casync_archive):
    made = casync_archive("blob1m", digest="sha256")
    out = run("info", made.index).stdout.decode()
    assert "blob index (.caibx)" in out
    assert f"Stream size:   {1 << 20} bytes" in out
    assert "Digest:        sha256" in out


def test_info_says_when_name_and_feature_flags_disagree(full, casync_archive, tmp_path):
    blob = casync_archive("blob1m")
    (tmp_path / "blob.caidx").write_bytes(blob.index.read_bytes())
    (tmp_path / "tree.caibx").write_bytes(full.index.read_bytes())
    first = [run("info", tmp_path / name).stdout.decode().splitlines()[0]
             for name in ("blob.caidx", "tree.caibx")]
    assert first == [
        "Type:          archive index (.caidx); its feature flags name no archive feature, "
        "as a blob's (a renamed .caibx, or an archive made --without=all)",
        "Type:          blob index (.caibx); its name says blob, but its feature flags "
        "are an archive's (a renamed .caidx?)"]
    assert ";" not in run("info", blob.index).stdout.decode().splitlines()[0]


def test_ls_root_matches_casync_list(full):
    names = run("ls", "-s", full.store, full.index).stdout.decode().splitlines()
    listed = [p for p in oracle.mtree(full.index, full.store) if b"/" not in p and p != b"."]
    assert [n.encode() for n in names] == listed  # archive (strcmp) order


def test_ls_recursive_matches_casync(full):
    paths = run("ls", "-R", full.index).stdout.decode().splitlines()
    assert [p.encode() for p in paths] == \
        [p for p in oracle.mtree(full.index, full.store) if p != b"."]


def test_ls_long(full):
    lines = run("ls", "-l", full.index).stdout.decode().splitlines()
    by_name = {line.split(" ")[-1] if " -> " not in line else line.split(" ")[-3]: line
               for line in lines}
    assert by_name["hello.txt"].split() == [
        "-rw-r--r--", "root", "root", "13", "2020-01-01", "00:00:00.123456789", "hello.txt"]
    assert by_name["big-ids"].split()[1:3] == ["70000", "70001"]
    assert by_name["nobody"].split()[1:3] == ["nobody", "nogroup"]
    assert by_name["null"].split()[0] == "crw-r--r--" and "1,3" in by_name["null"]
    assert by_name["suid"].split()[0] == "-rwsr-xr-x"
    assert by_name["sticky"].split()[0] == "drwxrwxrwt"
    assert by_name["symlink"].endswith("symlink -> hello.txt")


def test_ls_path(full):
    assert run("ls", full.index, "dir/sub").stdout == b"deep.txt\n"
    assert run("ls", full.index, "hello.txt").stdout == b"hello.txt\n"


def test_cat_file(full):
    assert run("cat", full.index, "dir/sub/deep.txt").stdout == b"deep\n"
    for path in ("hello.txt/", "hello.txt/.", "dir/sub/deep.txt/..", "dir-link/"):
        fails("cat", full.index, path, match=f"{path}: not a directory")
    data = run("cat", full.index, "random.bin").stdout
    assert data == (full.tree / "random.bin").read_bytes()
    assert run("cat", full.index, "dir-link").stdout == b"deep\n"


@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip"])
@pytest.mark.parametrize("name", ["blob5m", "blob_empty", "blob_one"])
def test_cat_blob(casync_archive, compression, name, tmp_path):
    made = casync_archive(name, compression=compression, chunk_size="16K")
    assert run("cat", made.index).stdout == made.tree.read_bytes()
    run("cat", "-o", tmp_path / "out", made.index)
    assert (tmp_path / "out").read_bytes() == made.tree.read_bytes()


@pytest.mark.slow
def test_cat_two_gib_sparse_file(casync_archive):
    made = casync_archive("sparse")
    proc = subprocess.Popen([CAFUSE, "cat", made.index, "sparse"], stdout=subprocess.PIPE)
    digest, size = hashlib.sha256(), 0
    while block := proc.stdout.read(1 << 20):
        digest.update(block)
        size += len(block)
    assert proc.wait(timeout=300) == 0
    assert size == trees.SPARSE_SIZE
    assert digest.hexdigest() == oracle.sha256_file(made.tree / "sparse")


def test_catar_file(casync_archive):
    made = casync_archive("full", kind="catar")
    assert run("cat", made.index, "hello.txt").stdout == b"hello casync\n"
    assert "catar archive" in run("info", made.index).stdout.decode()


# Bad input: one clear line, exit 1, nothing written.

def test_not_an_index(tmp_path):
    junk = tmp_path / "junk.caidx"
    junk.write_bytes(b"this is not an index\n" * 20)
    fails("info", junk, match=f"{junk}: not a casync index")
    fails("ls", junk, match="not a casync index")


def test_truncated_index(full, tmp_path):
    cut = tmp_path / "cut.caidx"
    cut.write_bytes(full.index.read_bytes()[:-7])
    fails("ls", "-s", full.store, cut, match="truncated")


def test_missing_index(tmp_path):
    fails("info", tmp_path / "nope.caibx", match="No such file or directory")


def test_missing_path(full):
    fails("cat", full.index, "no/such/file", match="no/such/file: no such file")
    fails("ls", full.index, "nope", match="nope: no such file")
    fails("cat", full.index, "dir", match="dir: is a directory")


def test_path_for_a_blob(casync_archive):
    made = casync_archive("blob1m")
    fails("cat", made.index, "x", match="PATH 'x' is not allowed")
    fails("ls", made.index, match="blob index")


def copy_store(made, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(made.store, store)
    return store


def chunk_files(store):
    return sorted(p for p in store.rglob("*.cacnk"))


def test_missing_chunk(casync_archive, tmp_path):
    made = casync_archive("blob1m", chunk_size="16K")
    store = copy_store(made, tmp_path)
    victim = chunk_files(store)[0]
    victim.unlink()
    out = tmp_path / "out"
    fails("cat", "-s", store, "-o", out, made.index,
          match=f"chunk {victim.name.removesuffix('.cacnk')}")
    assert not out.exists() and list(tmp_path.glob("out*")) == []


def test_corrupt_chunk(casync_archive, tmp_path):
    made = casync_archive("blob1m", chunk_size="16K")
    store = copy_store(made, tmp_path)
    victim = chunk_files(store)[3]
    os.chmod(victim, 0o644)
    victim.write_bytes(oracle_recompress(made, victim))
    line = fails("cat", "-s", store, "-o", tmp_path / "out", made.index,
                 match=f"chunk {victim.name.removesuffix('.cacnk')}: content does not match "
                 f"its id ({store})")
    assert line.count(victim.name.removesuffix(".cacnk")) == 1


def oracle_recompress(made, victim):
    """A well-formed zstd chunk with the wrong content (one byte changed)."""
    import zstandard
    data = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(
        victim.read_bytes()))
    data[0] ^= 1
    return zstandard.ZstdCompressor().compress(bytes(data))


def test_second_store_supplies_what_the_first_lacks(casync_archive, tmp_path):
    made = casync_archive("blob1m", chunk_size="16K")
    partial = copy_store(made, tmp_path)
    for victim in chunk_files(partial)[::2]:
        victim.unlink()
    out = run("cat", "-s", partial, "-s", made.store, made.index).stdout
    assert out == made.tree.read_bytes()


def test_missing_store(casync_archive, tmp_path):
    made = casync_archive("blob1m")
    line = fails("cat", "-s", tmp_path / "nostore", made.index, match="chunk store not found")
    assert line.count(str(tmp_path / "nostore")) == 1
    fails("cat", "-s", "", made.index, match="-s '': a store is a directory or an http(s) URL")


def test_a_blob_index_named_as_a_tree_is_named_in_the_error(casync_archive, tmp_path):
    made = casync_archive("blob1m")
    named = tmp_path / "named.caidx"
    shutil.copy(made.index, named)
    fails("ls", "-s", made.store, named, match=f"{named}: expected an ENTRY record")


def test_bad_flag(full):
    done = run("ls", "--bogus", full.index, ok=False)
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    for args in (("info", "-s", "x", full.index), ("cache", "stats", "--bogus")):
        done = run(*args, ok=False)
        usage = f"usage: cafuse {' '.join(a for a in args[:2] if not a.startswith('-'))} "
        assert done.returncode == 2 and done.stderr.decode().startswith(usage), done.stderr


def test_help_lists_only_the_environment_a_command_heeds():
    assert "environment" not in run("umount", "--help").stdout.decode()
    cache_help = run("cache", "stats", "--help").stdout.decode()
    assert "XDG_CACHE_HOME" in cache_help and "CASYNC_STORE" not in cache_help
    assert "CASYNC_STORE" in run("cat", "--help").stdout.decode()


def test_sizes_that_are_no_size_are_refused(full):
    for size in ("inf", "1e400", "nan", "1e308G", "-1M", "12X"):
        done = run("cat", f"--cache-size={size}", full.index, "hello.txt", ok=False)
        assert done.returncode == 2 and b"not a size" in done.stderr, (size, done.stderr)
        assert b"Traceback" not in done.stderr


def test_the_kind_of_an_index_without_a_suffix_comes_from_its_header(full, casync_archive,
                                                                    tmp_path):
    blob = casync_archive("blob1m")
    tree_copy, blob_copy = tmp_path / "tree-index", tmp_path / "blob-index"
    shutil.copy(full.index, tree_copy)
    shutil.copy(blob.index, blob_copy)
    assert "archive index (.caidx)" in run("info", tree_copy).stdout.decode()
    assert "blob index (.caibx)" in run("info", blob_copy).stdout.decode()
    assert run("cat", "-s", full.store, tree_copy, "hello.txt").stdout == b"hello casync\n"
    assert run("cat", "-s", blob.store, blob_copy).stdout == blob.tree.read_bytes()


def test_numbers_that_are_no_number_are_refused(full):
    for flag in ("--deadline", "--timeout", "--retries", "--connections"):
        done = run("cat", f"{flag}=nan", full.index, "hello.txt", ok=False)
        assert done.returncode == 2 and b"expected a number" in done.stderr, (flag, done.stderr)


def test_cat_output_into_a_fifo_a_symlink_and_over_a_file(casync_archive, tmp_path):
    blob = casync_archive("blob1m")
    want = blob.tree.read_bytes()
    fifo, got = tmp_path / "fifo", tmp_path / "got"
    os.mkfifo(fifo)
    with open(got, "wb") as into:
        reader = subprocess.Popen(["cat", fifo], stdout=into)
    try:
        run("cat", "-o", fifo, blob.index)
        assert reader.wait(timeout=60) == 0 and got.read_bytes() == want
    finally:
        kill_quietly(reader)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)          # written into, not replaced
    target, link = tmp_path / "target", tmp_path / "link"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link.symlink_to(target.name)
    run("cat", "-o", link, blob.index)
    assert link.is_symlink() and target.read_bytes() == want
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "got", "link", "target"]


def test_cat_output_errors_name_the_output(full, tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    for output, message in ((tmp_path / "none" / "x", "No such file or directory"),
                            (tmp_path, "is a directory"),
                            (plain / "x", "Not a directory")):
        fails("cat", "-o", output, full.index, "hello.txt", match=f"{output}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_stdout_errors_are_one_line(full):
    def with_stdout(stdout, *args, **kwargs):
        return subprocess.run([CAFUSE, *map(str, args)], stdout=stdout,
                              stderr=subprocess.PIPE, timeout=300, **kwargs)
    with open("/dev/full", "wb") as full_device:
        for args in (("cat", full.index, "random.bin"), ("ls", "-R", full.index)):
            done = with_stdout(full_device, *args)
            assert done.returncode == 1
            assert done.stderr == b"cafuse: error: stdout: No space left on device\n"
    done = with_stdout(None, "cat", full.index, "hello.txt", preexec_fn=lambda: os.close(1))
    assert done.returncode == 1 and done.stderr == b"cafuse: error: stdout: not open\n"


def test_malformed_urls_headers_and_tls_files_are_one_line(full, tmp_path):
    fails("ls", "-s", "http://[::1", "--no-cache", full.index, match="http://[::1: not a valid URL")
    fails("ls", "-s", "http://127.0.0.1:99999/", "--no-cache", full.index,
          match="http://127.0.0.1:99999/: not a valid URL")
    fails("info", "http://[::1/x.caidx", match="http://[::1/x.caidx: not a valid URL")
    fails("ls", full.index, env=environ(CAFUSE_HTTP_HEADERS="Accept: */*\ngarbage"),
          match="$CAFUSE_HTTP_HEADERS, line 2: not a header")
    https = "https://127.0.0.1:1/store"
    fails("ls", "-s", https, "--ca-file", tmp_path / "none", "--no-cache", full.index,
          match=f"{tmp_path / 'none'}: not a CA bundle: No such file or directory")
    fails("ls", "-s", https, "--ca-file", full.index, "--no-cache", full.index,
          match=f"{full.index}: not a CA bundle")
    fails("ls", "-s", https, "--client-cert", full.index, "--no-cache", full.index,
          match=f"{full.index}: not a client certificate and key")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_ends_a_command_quietly_and_leaves_no_temporary_file(casync_archive,
                                                                      tmp_path, signum):
    blob = casync_archive("blob1m")
    with FaultServer(blob.store, lambda path, count: "stall") as server:
        proc = subprocess.Popen([CAFUSE, "cat", "--no-cache", "-s", server.url, "-o",
                                 tmp_path / "out", blob.index], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum and err == b"", err
    assert list(tmp_path.iterdir()) == []


def test_cache_commands_make_no_cache_where_there_is_none(tmp_path):
    for command in ("stats", "prune"):
        fails("cache", command, "--cache-dir", tmp_path, match=f"{tmp_path}: no cafuse disk cache")
        fails("cache", command, "--cache-dir", tmp_path / "none",
              match=f"{tmp_path / 'none'}: no cafuse disk cache")
    assert list(tmp_path.iterdir()) == []


def test_prefetch_without_a_cache_to_fill_fails_before_fetching(casync_archive, tmp_path):
    made = casync_archive("blob1m")
    (tmp_path / "a-file").write_text("")
    fails("prefetch", "--cache-dir", tmp_path / "a-file", "-s", made.store, made.index,
          match=f"cache directory {tmp_path / 'a-file'}: ")
    done = run("prefetch", "--cache-dir", "", "-s", made.store, made.index, ok=False)
    assert done.returncode == 2 and b"--cache-dir: an empty name is no directory" in done.stderr


def test_a_seed_must_be_a_local_index_and_its_blob(casync_archive, tmp_path):
    made = casync_archive("blob1m")
    fails("cat", "--seed", f"{made.index}:{tmp_path}", made.index,
          match=f"seed {tmp_path}: not a regular file or block device")
    fails("cat", "--seed", "http://127.0.0.1:1/x.caibx", made.index,
          match="--seed http://127.0.0.1:1/x.caibx: a seed is a local index")


def test_a_corrupt_local_chunk_is_one_error_or_a_warning_if_another_store_has_it(
        casync_archive, tmp_path):
    blob = casync_archive("blob1m")
    bad = tmp_path / "bad"
    shutil.copytree(blob.store, bad)
    victim = sorted(bad.rglob("*.cacnk"))[0]
    victim.write_bytes(b"\x28\xb5\x2f\xfd" + b"junk" * 10)
    cid = victim.name.removesuffix(".cacnk")
    done = subprocess.run([CAFUSE, "cat", "--no-cache", "-s", bad, blob.index],
                          capture_output=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count(b"\n") == 1, done.stderr
    assert done.stderr.startswith(f"cafuse: error: chunk {cid}: ".encode()), done.stderr
    done = subprocess.run([CAFUSE, "cat", "--no-cache", "-s", bad, "-s", blob.store, blob.index],
                          capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stdout == blob.tree.read_bytes()
    assert re.fullmatch(f"cafuse: WARNING: chunk {cid}: bad zstd data: [^\n]* \\({bad}\\); "
                        f"served by {blob.store} instead\n", done.stderr.decode()), done.stderr


def test_a_mirror_that_serves_every_chunk_wrong_costs_a_few_lines_not_one_per_chunk(
        casync_archive, tmp_path):
    blob = casync_archive("blob1m", chunk_size="16K")
    chunks = len(list(blob.store.rglob("*.cacnk")))
    with FaultServer(blob.store, lambda path, n: "corrupt") as bad, \
            FaultServer(blob.store) as good:
        done = subprocess.run([CAFUSE, "cat", "--no-cache", "-s", bad.url, "-s", good.url,
                               blob.index], capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stdout == blob.tree.read_bytes()
    lines = done.stderr.decode().splitlines()
    assert chunks > 40 and len(lines) == 3, done.stderr
    # The first copy served by the next store (whichever that is) and the
    # set-aside, in either order, then the count of the copies held back.
    assert re.fullmatch(f"cafuse: WARNING: \\d+ more copies from {re.escape(bad.url)} did not "
                        "match their chunk ids since the last warning; other stores served "
                        "those chunks", lines[2]), lines
    assert ("cafuse: WARNING: 3 answers in a row did not match their chunk ids; setting "
            f"store {bad.url} aside for 5 s") in lines, lines
    corrupt = (f"cafuse: WARNING: chunk [0-9a-f]{{64}}: [^\n]* \\({re.escape(bad.url)}\\); "
               f"served by {re.escape(good.url)} instead")
    assert any(re.fullmatch(corrupt, line) for line in lines), lines


def test_cache_stats_shows_pack_bytes_no_row_lists(casync_archive, tmp_path):
    blob = casync_archive("blob1m")
    cache = tmp_path / "cache"
    with FaultServer(blob.store) as server:     # local stores are not copied into it
        run("cat", "--cache-dir", cache, "-s", server.url, blob.index)
    stats = run("cache", "stats", "--cache-dir", cache).stdout.decode()
    indexed = int(stats.split("Size:")[1].split()[0])
    assert "On disk:" not in stats
    packs = sorted((cache / "packs").iterdir())
    with open(packs[0], "ab") as pack:
        pack.write(b"x" * 1000)                    # a record whose row never came
    (cache / "packs" / "99.pack").write_bytes(b"y" * 500)   # a pack no row lists
    stats = run("cache", "stats", "--cache-dir", cache).stdout.decode()
    assert f"Size:          {indexed} bytes" in stats
    assert f"On disk:       {indexed + 1500} bytes" in stats


def sigterm_in_a_write(*cat):
    """The exit status of ``cat`` given SIGTERM while it is blocked writing
    its output into a pipe that nobody reads."""
    reading, writing = os.pipe()
    try:
        proc = subprocess.Popen(cat, stdout=writing, stderr=subprocess.PIPE)
        os.close(writing)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=10)
    finally:
        os.close(reading)
        kill_quietly(proc)


def test_a_signal_ends_a_command_blocked_in_a_write_and_nohup_is_heeded(casync_archive):
    blob = casync_archive("blob5m")
    assert sigterm_in_a_write(CAFUSE, "cat", "-s", blob.store, "--no-cache",
                              blob.index) == 128 + signal.SIGTERM
    with FaultServer(blob.store, lambda path, count: "stall") as server:
        proc = subprocess.Popen(["nohup", CAFUSE, "cat", "--no-cache", "--deadline", "3", "-s",
                                 server.url, blob.index], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        time.sleep(1)
        proc.send_signal(signal.SIGHUP)           # ignored: the deadline ends it
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and b"not delivered within 3 s" in err, err


def test_sigterm_ends_a_command_started_with_sigint_ignored(casync_archive):
    # As a script's background job starts (`cafuse cat ... &`): SIGINT stays
    # ignored, SIGTERM still ends it, waiting on a store or blocked in a write.
    blob = casync_archive("blob5m")
    ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", CAFUSE, "cat", "--no-cache"]
    with FaultServer(blob.store, lambda path, count: "stall") as server:
        proc = subprocess.Popen([*ignoring_sigint, "--deadline", "30", "-s", server.url,
                                 blob.index], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM and err == b"", err
    assert sigterm_in_a_write(*ignoring_sigint, "-s", blob.store,
                              blob.index) == 128 + signal.SIGTERM


def test_cat_output_dash_and_dev_stdout_are_stdout(casync_archive, tmp_path):
    blob = casync_archive("blob1m")
    for output in ("-", "/dev/stdout"):
        out = tmp_path / "out"
        out.write_bytes(b"earlier\n")
        with open(out, "ab") as appending:
            done = subprocess.run([CAFUSE, "cat", "-o", output, blob.index], stdout=appending,
                                  stderr=subprocess.PIPE, timeout=120)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == b"earlier\n" + blob.tree.read_bytes()
    assert run("cat", "-o", "-", blob.index).stdout == blob.tree.read_bytes()


def test_a_format_error_names_the_file_it_is_in(casync_archive, tmp_path):
    made = casync_archive("blob1m")
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(b"junk" * 100)
    line = fails("cat", "--seed", bad, made.index, match="not a casync index")
    assert line.startswith(f"cafuse: error: {bad}: "), line


def test_a_mount_of_another_type_is_refused(full, tmp_path):
    fails("mount", "-o", "ro,subtype=other", full.index, tmp_path,
          match="-o subtype=other: the type of a cafuse mount is fuse.cafuse")
