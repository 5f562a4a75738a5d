"""Real FUSE mounts of casync archives, compared with casync and the source."""

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import oracle
from command import CAFUSE
from conftest import in_the_foreground, is_mounted, mounted, start_foreground, teardown_mount
from servers import FaultServer, Nginx, dead_url, kill_quietly
from touch import sh, walk

TESTS = Path(__file__).resolve().parent.parent / "tests"

pytestmark = pytest.mark.usefixtures("fuse_ready")


@pytest.fixture(scope="module")
def full(casync_archive):
    return casync_archive("full")


def test_tree_mount_matches_casync_extract(full, tmp_path):
    oracle.extract(full.index, full.store, tmp_path / "extracted")
    expected = walk(tmp_path / "extracted", TESTS)
    with mounted(full.index, tmp_path / "mnt", "--no-cache", "-s", full.store) as mnt:
        got = walk(mnt, TESTS)
        root = oracle.describe(mnt)
    assert set(got) == set(expected)
    for path, info in expected.items():
        assert got[path] == info, path
    assert root == oracle.describe(tmp_path / "extracted")


def test_inode_numbers_are_stable_and_listed(full, tmp_path):
    def inodes(mnt):
        out = {}
        for dirpath, _dirs, _files in os.walk(mnt):
            for entry in os.scandir(dirpath):
                st = entry.stat(follow_symlinks=False)
                assert entry.inode() == st.st_ino, entry.path  # d_ino is st_ino
                out[os.path.relpath(entry.path, mnt)] = st.st_ino
        return out
    with mounted(full.index, tmp_path / "a", "--no-cache", "-s", full.store) as mnt:
        first = inodes(mnt)
    with mounted(full.index, tmp_path / "b", "--no-cache", "-s", full.store) as mnt:
        os.listdir(mnt / "dir")  # another order of first sight
        second = inodes(mnt)
    assert first == second
    assert len(set(first.values())) == len(first)  # no hard links in the archive


def test_tar_of_a_mount_is_the_tree(tmp_path):
    """A walk in archive order gets its next files pushed into the page
    cache; what tar reads must still be every byte of every file."""
    rng = random.Random(4)
    src = tmp_path / "src"
    for d in range(4):
        (src / f"d{d}" / "sub").mkdir(parents=True)
        for i in range(150):
            size = rng.choice([0, 1, 100, 5000, 70_000, 300_000])
            (src / f"d{d}" / f"f{i:03d}").write_bytes(rng.randbytes(size))
        (src / f"d{d}" / "sub" / "big").write_bytes(rng.randbytes(3 << 20))
    (src / "huge").write_bytes(rng.randbytes(20 << 20))
    oracle.make(tmp_path / "t.caidx", src, store=tmp_path / "store")
    log, out = tmp_path / "mount.log", tmp_path / "out"
    out.mkdir()
    with mounted(tmp_path / "t.caidx", tmp_path / "mnt", "--no-cache", "-vv", "--log-file",
                 log, "-s", tmp_path / "store") as mnt:
        sh("sh", "-c", f"tar -C {mnt} -cf - . | tar -C {out} -xf -")
    assert {p: i.get("sha256") for p, i in oracle.walk_fs(out).items()} == \
        {p: i.get("sha256") for p, i in oracle.walk_fs(src).items()}
    assert "ahead of a walk" in log.read_text()


def test_sigterm_during_a_walk_never_hangs(tmp_path):
    """SIGTERM while tar reads a mount being pushed to: the mount process
    ends within seconds and tar gets errors, never a hang (a page push can
    wait for a READ of the same page, which only a live session answers)."""
    rng = random.Random(7)
    src = tmp_path / "src"
    for d in range(40):
        (src / f"d{d:02d}").mkdir(parents=True)
        for i in range(60):
            (src / f"d{d:02d}" / f"f{i:02d}").write_bytes(rng.randbytes(rng.choice([300, 30_000])))
    www = tmp_path / "www"
    www.mkdir()
    oracle.make(www / "t.caidx", src, store=www / "store")
    mnt = tmp_path / "mnt"
    with Nginx(www, tmp_path / "nginx") as nginx:
        for attempt in range(4):
            with in_the_foreground(f"{nginx.url}/t.caidx", mnt, "--no-cache",
                                   "-s", f"{nginx.url}/store") as proc:
                tar = subprocess.Popen(f"tar -C {mnt} -cf - . | wc -c", shell=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(0.1 + 0.1 * attempt)
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(timeout=20) == 0, proc.stderr.read()
                    tar.wait(timeout=60)
                    assert not is_mounted(mnt)
                finally:
                    kill_quietly(tar)


def test_acls_and_capabilities_seen_by_tools(full, tmp_path):
    with mounted(full.index, tmp_path / "mnt", "--no-cache", "-s", full.store) as mnt:
        acl = sh("getfacl", "-n", mnt / "acl.txt").stdout.decode()
        assert "user:65534:r--" in acl and "group:65534:rw-" in acl
        default = sh("getfacl", "-n", "-d", mnt / "dacl").stdout.decode()
        assert "user:65534:r-x" in default and "group:65534:r--" in default
        assert "cap_net_raw=ep" in sh("getcap", mnt / "cap").stdout.decode()


def test_chattr_flags_are_answered_as_casync_extract_restores_them(tmp_path):
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "file").write_text("file\n")
    sh("chattr", "+S", "+A", tree / "file")
    sh("chattr", "+D", "+A", tree / "dir")
    index, store = tmp_path / "t.caidx", tmp_path / "store"
    sh("casync", "make", "--with=best", f"--store={store}", index, tree)
    oracle.extract(index, store, tmp_path / "extracted")
    with mounted(index, tmp_path / "mnt", "--no-cache", "-s", store) as mnt:
        for name, flags in (("file", 0x8 | 0x80), ("dir", 0x10000 | 0x80)):
            assert oracle.chattr(mnt / name) == oracle.chattr(tmp_path / "extracted" / name)
            assert oracle.chattr(mnt / name) == flags
        listed = sh("lsattr", "-d", mnt / "file", mnt / "dir").stdout.decode().split()
        assert listed[0].replace("-", "") == "SA" and listed[2].replace("-", "") == "DA"


def test_edge_tree_matches_the_source(casync_archive, tmp_path):
    made = casync_archive("edge")
    with mounted(made.index, tmp_path / "mnt", "--no-cache", "-s", made.store) as mnt:
        got = walk(mnt, TESTS)
    expected = walk(made.tree, TESTS)
    assert got == expected


def test_blob_mount_is_the_blob(casync_archive, tmp_path):
    made = casync_archive("blob5m", chunk_size="16K")
    with mounted(made.index, tmp_path / "mnt", "--no-cache", "-s", made.store) as mnt:
        assert sorted(os.listdir(mnt)) == ["blob5m"]
        st = os.stat(mnt / "blob5m")
        assert st.st_size == made.tree.stat().st_size and stat.S_IMODE(st.st_mode) == 0o444
        sh("cmp", mnt / "blob5m", made.tree)
        done = sh("sh", "-c", f"echo x > {mnt / 'blob5m'}", check=False)
        assert done.returncode != 0


def test_a_blob_mounted_by_a_url_with_a_query_is_named_after_the_index(casync_archive,
                                                                         tmp_path):
    made = casync_archive("blob5m", chunk_size="16K")
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(made.index, www)
    os.symlink(made.store, www / "default.castr")
    with Nginx(www, tmp_path / "nginx") as nginx:
        url = f"{nginx.url}/{made.index.name}?signature=a/b"
        with mounted(url, tmp_path / "mnt", "--no-cache") as mnt:
            assert os.listdir(mnt) == ["blob5m"]
            sh("cmp", mnt / "blob5m", made.tree)


def test_a_seed_serves_a_mount_and_the_disk_cache_keeps_its_bound(casync_archive,
                                                                     tmp_path):
    made = casync_archive("blob5m", chunk_size="16K")
    empty = tmp_path / "empty-store"
    empty.mkdir()
    cache = tmp_path / "cache"
    with mounted(made.index, tmp_path / "seeded", "--no-cache", "-s", empty,
                 "--seed", f"{made.index}:{made.tree}") as mnt:
        sh("cmp", mnt / "blob5m", made.tree)  # every chunk from the seed
    with FaultServer(made.store) as server, \
            mounted(made.index, tmp_path / "bounded", "--cache-dir", cache, "--cache-size", "1M",
                    "-s", server.url) as mnt:  # a remote store: its chunks are cached
        sh("cmp", mnt / "blob5m", made.tree)
    packs = sum(p.stat().st_size for p in (cache / "packs").iterdir())
    assert 0 < packs <= 1 << 20


def test_repeated_stats_and_reads_are_answered_by_the_kernel(full, tmp_path):
    """With the mount process stopped, what was read once is read again:
    only the kernel's caches can have answered."""
    mnt = tmp_path / "mnt"
    proc = start_foreground(full.index, mnt, "--no-cache", "-s", full.store)
    try:
        # (Not ls -l, which asks for security.selinux: the kernel keeps no
        # xattrs but ACLs; nor find, which asks for statfs.)
        script = (f"cat {mnt}/hello.txt {mnt}/random.bin | sha256sum; "
                  f"ls -R {mnt}/dir; stat -c '%n %s %a %u %g %y' {mnt}/dir/* {mnt}/dir/*/*; "
                  f"readlink {mnt}/symlink {mnt}/longlink")
        first = sh("sh", "-c", script).stdout
        proc.send_signal(signal.SIGSTOP)
        try:
            assert sh("sh", "-c", script, timeout=10).stdout == first
        finally:
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        teardown_mount(mnt)


IMAGE_MAKERS = {
    "ext4": lambda src, img: sh("mkfs.ext4", "-q", "-F", "-d", src, img, "8M"),
    "squashfs": lambda src, img: sh("mksquashfs", src, img, "-quiet", "-noappend"),
    "erofs": lambda src, img: sh("mkfs.erofs", img, src),
}


@pytest.mark.parametrize("fstype", sorted(IMAGE_MAKERS))
def test_loop_mount_of_a_blob_image(fstype, tmp_path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "os-release").write_text("NAME=cafuse-test\n")
    (src / "data.bin").write_bytes(os.urandom(2 << 20))
    img = tmp_path / f"image.{fstype}"
    IMAGE_MAKERS[fstype](src, img)
    index = tmp_path / "image.caibx"
    store = tmp_path / "store"
    sh("casync", "make", f"--store={store}", index, img)
    with mounted(index, tmp_path / "mnt", "--no-cache", "-s", store) as mnt:
        loop = sh("losetup", "-r", "-f", "--show", mnt / "image").stdout.decode().strip()
        inner = tmp_path / "inner"
        inner.mkdir()
        try:
            sh("mount", "-o", "ro", "-t", fstype, loop, inner)
            try:
                assert (inner / "etc" / "os-release").read_text() == "NAME=cafuse-test\n"
                sh("cmp", inner / "data.bin", src / "data.bin")
            finally:
                sh("umount", inner)
        finally:
            sh("losetup", "-d", loop)


def test_background_errors_leave_nothing_mounted(full, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    junk = tmp_path / "junk.caidx"
    junk.write_bytes(b"not an index" * 20)
    cases = [
        ([junk, mnt], "not a casync index"),
        ([full.index, tmp_path / "missing"], "not an existing directory"),
        (["-s", tmp_path / "nostore", full.index, mnt], "chunk store not found"),
        (["-o", "allow_other,rw", "-s", full.store, full.index, mnt], "read-only"),
        (["--retries", "0", "-s", dead_url(), full.index, mnt], "cannot connect"),
        (["--log-file", tmp_path / "no" / "log", "-s", full.store, full.index, mnt],
         "no/log: No such file or directory"),
    ]
    for args, message in cases:
        done = subprocess.run([CAFUSE, "mount", "--background", "--no-cache",
                               *map(str, args)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert not is_mounted(mnt)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_background_mount_given_up_takes_its_child_along(full, tmp_path, signum):
    # The store stalls, so the child is still mounting when the command
    # that waits for it is stopped: the child must not go on alone.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with FaultServer(full.store, lambda path, count: "stall") as server:
        proc = subprocess.Popen([CAFUSE, "mount", "--background", "--no-cache",
                                 "--deadline", "60", "-s", server.url, full.index, mnt],
                                stderr=subprocess.PIPE)
        try:
            time.sleep(2)
            proc.send_signal(signum)
            assert proc.wait(timeout=15) == 128 + signum
        finally:
            kill_quietly(proc)
        left = subprocess.run(["pgrep", "-f", f"cafuse mount .*{mnt}"],
                              capture_output=True, text=True).stdout.split()
        assert left == [] and not is_mounted(mnt)
        assert proc.stderr.read() == b""


def test_a_background_mount_leaves_its_directory_and_keeps_relative_paths(full, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(full.index.parent, work)
    (work / "mnt").mkdir()
    done = subprocess.run([CAFUSE, "mount", "--background", "--cache-dir", "cache",
                           "--log-file", "log", "-s", "default.castr", full.index.name, "mnt"],
                          cwd=work, capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stderr
        daemon = subprocess.run(["pgrep", "-f", "-n", "cafuse mount --background"],
                                capture_output=True, text=True).stdout.split()
        assert daemon and os.readlink(f"/proc/{daemon[0]}/cwd") == "/"
        for path in (full.tree / "dir" / "sub" / "deep.txt", full.tree / "hello.txt"):
            relative = path.relative_to(full.tree)
            assert (work / "mnt" / relative).read_bytes() == path.read_bytes()
        assert (work / "cache" / "index.sqlite").exists()
        assert (work / "log").exists()
    finally:
        teardown_mount(work / "mnt")


def test_auto_unmount_is_taken_as_said(full, tmp_path):
    # fusermount3 stays alive to honour auto_unmount: waiting for it to exit
    # held the mount up for 60 s, then failed.  The watchdog does that job.
    start = time.monotonic()
    with mounted(full.index, tmp_path / "mnt", "-o", "auto_unmount", "--no-cache",
                 "-s", full.store) as mnt:
        assert time.monotonic() - start < 20
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(full.tree))


def test_busy_mountpoint(full, tmp_path):
    with mounted(full.index, tmp_path / "mnt", "--no-cache", "-s", full.store) as mnt:
        done = subprocess.run([CAFUSE, "mount", "--background", str(full.index), str(mnt)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "already mounted" in done.stderr


def test_a_foreground_mount_logs_to_its_log_file(full, tmp_path):
    log = tmp_path / "mount.log"
    with in_the_foreground(full.index, tmp_path / "mnt", "-v", "--no-cache", "-s", full.store,
                           "--log-file", log) as proc:
        subprocess.run([CAFUSE, "umount", str(tmp_path / "mnt")], check=True, timeout=60)
        assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    assert f"cafuse: INFO: mounted {full.index} on {tmp_path / 'mnt'}" in log.read_text()


@contextmanager
def a_file_open_in_a_mount(full, mnt):
    """A foreground mount of ``full`` at ``mnt``, hello.txt open in it:
    yields the mount process and the descriptor.  Once it is closed, the
    process must end well (detached, it serves until nothing is open);
    what is mounted at ``mnt`` then is the caller's."""
    proc = start_foreground(full.index, mnt, "--no-cache", "-s", full.store)
    try:
        fd = os.open(mnt / "hello.txt", os.O_RDONLY)
        try:
            yield proc, fd
        finally:
            os.close(fd)
        assert proc.wait(timeout=60) == 0
    except BaseException:
        kill_quietly(proc)
        teardown_mount(mnt)
        raise


def test_a_busy_mount_is_detached_only_when_asked(full, tmp_path):
    mnt = tmp_path / "mnt"
    with a_file_open_in_a_mount(full, mnt) as (proc, fd):
        done = subprocess.run([CAFUSE, "umount", str(mnt)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1 and "in use; -l detaches it" in done.stderr
        assert is_mounted(mnt)
        subprocess.run([CAFUSE, "umount", "-l", str(mnt)], check=True, timeout=60)
        assert not is_mounted(mnt)
        # What is open keeps working, served by the mount process.
        assert os.pread(fd, 1000, 0) == (full.tree / "hello.txt").read_bytes()
        assert proc.poll() is None


def test_a_detached_mounts_end_leaves_the_next_mount_there_alone(full, tmp_path):
    # Once detached (umount -l), the mount point is free while the mount
    # process still serves what is open; at its end it unmounted whatever
    # was mounted there by then.
    mnt = tmp_path / "mnt"
    try:
        with a_file_open_in_a_mount(full, mnt):
            subprocess.run([CAFUSE, "umount", "-l", str(mnt)], check=True, timeout=60)
            sh("mount", "-t", "tmpfs", "tmpfs", mnt)
        assert is_mounted(mnt)
    finally:
        teardown_mount(mnt)


def test_umount_leaves_other_file_systems_alone(tmp_path):
    other = tmp_path / "tmpfs"
    other.mkdir()
    sh("mount", "-t", "tmpfs", "tmpfs", other)
    try:
        done = subprocess.run([CAFUSE, "umount", str(other)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1
        assert done.stderr == f"cafuse: error: {other}: not a cafuse mount (a tmpfs mount)\n"
        assert is_mounted(other)
    finally:
        sh("umount", other)


def test_a_mountpoint_with_a_space_a_non_ascii_name_and_a_symlink(full, tmp_path):
    odd = tmp_path / "mnt żółw"
    link = tmp_path / "link"
    odd.mkdir()
    link.symlink_to(odd.name)
    with mounted(full.index, link, "--no-cache", "-s", full.store):
        assert is_mounted(odd)
        assert sorted(os.listdir(odd)) == sorted(os.listdir(full.tree))
        done = subprocess.run([CAFUSE, "mount", "--background", str(full.index), str(odd)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "already mounted" in done.stderr
        done = subprocess.run([CAFUSE, "umount", str(link)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(odd)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                    signal.SIGKILL])
def test_signal_unmounts_cleanly(full, tmp_path, signum):
    """SIGTERM, SIGINT and SIGHUP unmount and exit 0; after SIGKILL, the
    mount's watchdog takes it down: nothing dead is left behind."""
    mnt = tmp_path / "mnt"
    with in_the_foreground(full.index, mnt, "--no-cache", "-s", full.store) as proc:
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(full.tree))
        proc.send_signal(signum)
        code = proc.wait(timeout=30)
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 0), proc.stderr.read()
        deadline = time.monotonic() + 10
        while is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(mnt)


def test_a_signal_the_mount_was_started_ignoring_stays_ignored(full, tmp_path):
    """As under nohup: a hangup leaves the mount serving; SIGTERM ends it."""
    mnt = tmp_path / "mnt"
    with in_the_foreground(full.index, mnt, "--no-cache", "-s", full.store,
                           ignoring=(signal.SIGHUP,)) as proc:
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None and is_mounted(mnt)
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(full.tree))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert not is_mounted(mnt)


def test_the_mount_table_shows_a_url_without_its_password(full, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(full.index, www / full.index.name)
    os.symlink(full.store, www / "default.castr")
    with FaultServer(www) as server:
        url = f"{server.url.replace('http://', 'http://u:s3cret@')}/{full.index.name}"
        with mounted(url, tmp_path / "mnt", "--no-cache") as mnt:
            line, = [m for m in Path("/proc/mounts").read_text().splitlines() if str(mnt) in m]
            assert "s3cret" not in line and f"{server.url}/{full.index.name}" in line
            assert sorted(os.listdir(mnt)) == sorted(os.listdir(full.tree))


def test_store_outage_gives_eio_then_recovers(casync_archive, tmp_path):
    made = casync_archive("full")
    down = {"on": False}
    with FaultServer(made.store, lambda path, n: "503" if down["on"] else None) as server:
        log = tmp_path / "mount.log"
        with mounted(made.index, tmp_path / "mnt", "--no-cache", "-s", server.url,
                     "--timeout", "0.5", "--retries", "0", "--deadline", "3",
                     "--log-file", log) as mnt:
            assert sh("cat", mnt / "hello.txt").stdout == b"hello casync\n"
            down["on"] = True
            start = time.monotonic()
            failed = sh("cat", mnt / "random.bin", check=False, timeout=30)
            assert failed.returncode != 0 and b"Input/output error" in failed.stderr
            assert time.monotonic() - start < 3 + 2  # the deadline, once
            errors = [line for line in log.read_text().splitlines() if "ERROR" in line]
            assert "ERROR: read of /random.bin, bytes 0.." in errors[0]  # the file named
            assert len(set(errors)) == len(errors)  # each once, though the kernel asks again
            assert sh("cat", mnt / "hello.txt").stdout == b"hello casync\n"  # cached
            down["on"] = False
            time.sleep(5.5)  # the store's set-aside period ends
            assert sh("cat", mnt / "random.bin").stdout == (made.tree / "random.bin").read_bytes()


def test_a_hung_store_holds_up_only_the_reads_that_need_it(casync_archive, tmp_path):
    made = casync_archive("full", chunk_size="4K")
    stall = {"on": False}
    with FaultServer(made.store, lambda path, n: "stall" if stall["on"] else None) as server:
        with mounted(made.index, tmp_path / "mnt", "--no-cache", "-s", server.url,
                     "--timeout", "60", "--retries", "0", "--deadline", "6") as mnt:
            hello = sh("cat", mnt / "hello.txt").stdout
            listing = sorted(os.listdir(mnt / "dir"))
            stall["on"] = True
            asked = time.monotonic()
            hung = subprocess.Popen(["cat", str(mnt / "random.bin")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(1)
                assert hung.poll() is None  # waiting for the store
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")  # from here the daemon answers, not the kernel's caches
                start = time.monotonic()
                assert sh("cat", mnt / "hello.txt").stdout == hello
                assert sorted(os.listdir(mnt / "dir")) == listing
                assert time.monotonic() - start < 2
                assert hung.wait(timeout=30) != 0
                assert b"Input/output error" in hung.stderr.read()
                # At the deadline: the kernel's second READ of a page whose
                # readahead failed is answered at once, not after another.
                assert time.monotonic() - asked < 6 + 2
            finally:
                kill_quietly(hung)


def test_one_read_fails_within_the_deadline_when_the_tries_time_out(casync_archive, tmp_path):
    # Headers, then a byte every 0.05 s: each try times out (an HTTPError,
    # not the deadline), and the kernel's READ of the failed page, or a
    # reader that joined the failed load, must not load the chunk again.
    made = casync_archive("full", chunk_size="4K")
    trickle = {"on": False}
    with FaultServer(made.store, lambda path, n: "trickle" if trickle["on"] else None) as server:
        with mounted(made.index, tmp_path / "mnt", "--no-cache", "-s", server.url,
                     "--timeout", "2", "--retries", "1", "--deadline", "8") as mnt:
            os.listdir(mnt)
            trickle["on"] = True
            fd = os.open(mnt / "random.bin", os.O_RDONLY)
            try:
                start = time.monotonic()
                with pytest.raises(OSError, match="Input/output error"):
                    os.pread(fd, 131072, 0)
                assert time.monotonic() - start < 8 + 1.5  # 12 s: the chunk asked for thrice
            finally:
                os.close(fd)


def test_a_hung_local_store_hands_its_reads_on_to_the_next_store(casync_archive, tmp_path):
    # Every chunk file a FIFO: open() blocks as on an NFS server that stopped.
    made = casync_archive("full", chunk_size="4K")
    hung = tmp_path / "nfs"
    for chunk_file in made.store.rglob("*.cacnk"):
        fifo = hung / chunk_file.relative_to(made.store)
        fifo.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(fifo)
    with FaultServer(made.store) as server:
        start = time.monotonic()
        with mounted(made.index, tmp_path / "mnt", "--no-cache", "-s", hung,
                     "-s", server.url, "--deadline", "4") as mnt:
            assert sh("cat", mnt / "random.bin").stdout == \
                (made.tree / "random.bin").read_bytes()
            # Half the deadline once; then the stuck store is skipped.
            assert time.monotonic() - start < 2 + 3
            assert sh("cat", mnt / "hello.txt").stdout == b"hello casync\n"


def test_listing_the_root_fetches_few_chunks(casync_archive, tmp_path):
    made = casync_archive("full", chunk_size="4K")
    chunks = (made.index.stat().st_size - 104) // 40
    with FaultServer(made.store) as server:
        with mounted(made.index, tmp_path / "mnt", "--no-cache", "-s", server.url) as mnt:
            names = sh("ls", mnt).stdout.decode().split()
            assert "random.bin" in names
            assert server.total() < chunks // 4, (server.total(), chunks)


def test_overlay_chroot_on_a_lazy_root(tmp_path):
    busybox = Path("/bin/busybox")
    assert busybox.exists()
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    sh("cp", busybox, root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "ls"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "motd").write_text("hello from a lazy root\n")
    index, store = tmp_path / "root.caidx", tmp_path / "store"
    sh("casync", "make", f"--store={store}", index, root)
    lower, ov, merged = tmp_path / "lower", tmp_path / "ov", tmp_path / "merged"
    ov.mkdir()
    merged.mkdir()
    with mounted(index, lower, "--no-cache", "-s", store):
        sh("mount", "-t", "tmpfs", "tmpfs", ov)  # the upper layer, as a runtime would
        try:
            (ov / "upper").mkdir()
            (ov / "work").mkdir()
            sh("mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={lower},upperdir={ov / 'upper'},workdir={ov / 'work'}", merged)
            try:
                out = sh("chroot", merged, "/bin/sh", "-c",
                         "cat /etc/motd && echo written > /etc/new && cat /etc/new").stdout
                assert out == b"hello from a lazy root\nwritten\n"
                assert (ov / "upper" / "etc" / "new").read_text() == "written\n"
            finally:
                sh("umount", merged)
        finally:
            sh("umount", ov)


def as_nobody(*cmd):
    return sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd,
              check=False)


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cafuse-other-"))
    os.chmod(path, 0o755)
    yield path
    for mnt in path.iterdir():
        teardown_mount(mnt)
    shutil.rmtree(path)


def test_other_users_see_what_modes_and_acls_allow(tmp_path, public_dir):
    tree = tmp_path / "tree"
    tree.mkdir()
    os.chmod(tree, 0o755)
    (tree / "public").write_text("public\n")
    os.chmod(tree / "public", 0o644)
    (tree / "secret").write_text("secret\n")
    os.chmod(tree / "secret", 0o600)
    (tree / "shared").write_text("shared\n")
    os.chmod(tree / "shared", 0o640)
    sh("setfacl", "-m", "u:nobody:r--", tree / "shared")  # readable only through the ACL
    index, store = tmp_path / "t.caidx", tmp_path / "store"
    sh("casync", "make", f"--store={store}", index, tree)
    with mounted(index, public_dir / "mine", "--no-cache", "-s", store) as mnt:
        assert as_nobody("cat", mnt / "public").returncode != 0  # FUSE's default
    with mounted(index, public_dir / "all", "--no-cache", "-s", store, "-o",
                 "allow_other") as mnt:
        assert as_nobody("cat", mnt / "public").stdout == b"public\n"
        assert as_nobody("cat", mnt / "shared").stdout == b"shared\n"
        denied = as_nobody("cat", mnt / "secret")
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def test_trusted_xattrs_are_listed_only_to_callers_with_cap_sys_admin(tmp_path, public_dir):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("f\n")
    os.chmod(tree / "f", 0o644)
    os.setxattr(tree / "f", "trusted.t", b"1")
    os.setxattr(tree / "f", "user.u", b"2")
    index, store = tmp_path / "t.caidx", tmp_path / "store"
    sh("casync", "make", f"--store={store}", index, tree)
    listing = [sys.executable, "-c", "import os, sys; print(sorted(os.listxattr(sys.argv[1])))"]
    no_sys_admin = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    with mounted(index, public_dir / "all", "--no-cache", "-s", store, "-o",
                 "allow_other") as mnt:
        assert sh(*listing, mnt / "f").stdout == b"['trusted.t', 'user.u']\n"
        assert as_nobody(*listing, mnt / "f").stdout == b"['user.u']\n"
        # root without the capability, or with it only in a user namespace
        # of its own, as ext4 answers them
        for without in (no_sys_admin, ["unshare", "--user", "--map-root-user"]):
            source = sh(*without, *listing, tree / "f").stdout
            assert source == b"['user.u']\n"
            assert sh(*without, *listing, mnt / "f").stdout == source


@pytest.fixture
def fuse_for_users():
    """/dev/fuse as Debian's udev rule leaves it (0666): fusermount3 opens it
    as the calling user.  Some machines (this project's CI among them) ship
    it 0600; it is put back afterwards."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    yield
    os.chmod("/dev/fuse", mode)


def as_user(*cmd):
    """``cmd`` as nobody, with no capability but reading any file: enough
    to run this checkout's venv wherever it lives (/root is 0700), and far
    from root's powers to mount."""
    return sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
              "env", "HOME=/nonexistent", *cmd, check=False)


def test_a_user_mounts_reads_and_unmounts(full, public_dir, fuse_for_users):
    mnt, cache = public_dir / "mine", public_dir / "cache"
    mnt.mkdir()
    cache.mkdir()
    os.chown(mnt, 65534, 65534)
    os.chown(cache, 65534, 65534)
    done = as_user(CAFUSE, "mount", "--background", "--cache-dir", cache, "-s", full.store,
                   full.index, mnt)
    assert done.returncode == 0, done.stderr
    owner = next(line for line in open("/proc/self/mounts") if f" {mnt} " in line)
    assert "user_id=65534" in owner
    for name in ("hello.txt", "random.bin", "dir/sub/deep.txt"):
        assert as_user("cat", mnt / name).stdout == (full.tree / name).read_bytes()
    denied = sh("cat", mnt / "hello.txt", check=False)  # not even root, without allow_other
    assert denied.returncode != 0
    done = as_user(CAFUSE, "umount", mnt)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)


def test_a_users_killed_mount_is_taken_down(full, public_dir, fuse_for_users):
    mnt = public_dir / "mine"
    mnt.mkdir()
    os.chown(mnt, 65534, 65534)
    done = as_user(CAFUSE, "mount", "--background", "--no-cache", "-s", full.store,
                   full.index, mnt)
    assert done.returncode == 0, done.stderr
    daemon = int(sh("pgrep", "-u", "65534", "-f", f"mount .*{mnt}").stdout.split()[0])
    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mnt)  # the watchdog unmounted it, as that user
