"""Deterministic source trees and blobs for casync to archive in tests.

Everything is fixed: contents, modes, owners, mtimes, umask.  Building most
trees needs root (mknod, chown, setcap, trusted.* xattrs).
"""

import functools
import hashlib
import os
import socket
import subprocess
from pathlib import Path

T2020 = 1577836800 * 10**9                 # 2020-01-01T00:00:00Z in ns
PRE_1970 = -315619199 * 10**9 - 500000000  # 1960-01-01T00:00:00.5Z
AFTER_2262 = 10413792000 * 10**9 + 500000000  # 2300-01-01T00:00:00.5Z
DEEP_LEVELS = 50
SORT_NAMES = ("A", "a", "a.b", "a-b", "b")
UNICODE_NAMES = ("żółw.txt", "日本語", "emoji-🦀")
# Names casync list/mtree must escape, and one that is not UTF-8.
ODD_NAMES = (b"sp ace", b"back\\slash", b"new\nline", b"tab\there", b"#lead", b"a#b",
             b"eq=ual", b"del\x7f", b"bad\xffbyte", "żółw".encode())


def pseudo_random(size: int, seed: str) -> bytes:
    """SHA-256 counter stream: incompressible, reproducible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def build_blob(path: Path, size: int, seed: str = "blob") -> Path:
    path.write_bytes(pseudo_random(size, seed))
    return path


def _umask_022(build):
    """Run a builder with umask 022, restoring the caller's umask after."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        old = os.umask(0o022)
        try:
            return build(*args, **kwargs)
        finally:
            os.umask(old)
    return wrapper


def _run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _times(root: Path, mtime_ns: int = T2020):
    """Set every mtime (children first, so directories keep theirs)."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    os.utime(root, ns=(mtime_ns, mtime_ns))


@_umask_022
def build_full_tree(root: Path) -> Path:
    """Every node type and every kind of metadata casync stores, all of it
    restorable by ``casync extract``."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "hello.txt").write_bytes(b"hello casync\n")
    (root / "random.bin").write_bytes(pseudo_random(300_000, "random"))
    (root / "compressible.txt").write_bytes(b"all work and no play\n" * 20_000)
    os.link(root / "hello.txt", root / "hardlink")
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "deep.txt").write_bytes(b"deep\n")
    (root / "emptydir").mkdir()
    os.symlink("hello.txt", root / "symlink")
    os.symlink("dir/sub/deep.txt", root / "dir-link")
    os.symlink("/etc/does-not-exist", root / "dangling")
    os.symlink("x" * 1000, root / "longlink")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "socket"))
    os.mknod(root / "null", 0o20666, os.makedev(1, 3))
    os.mknod(root / "loop0", 0o60660, os.makedev(7, 0))
    for name in SORT_NAMES + UNICODE_NAMES:
        (root / name).write_bytes(name.encode() + b"\n")
    _metadata(root)
    _chattr(root)
    _deep_path(root, DEEP_LEVELS)
    _times(root)
    os.utime(root / "hello.txt", ns=(T2020 + 123456789,) * 2)
    return root


def _metadata(root: Path):
    (root / "xattrs.txt").write_bytes(b"xattrs\n")
    os.setxattr(root / "xattrs.txt", "user.comment", b"hello")
    os.setxattr(root / "xattrs.txt", "user.binary", bytes(range(256)))
    os.setxattr(root / "xattrs.txt", "user.empty", b"")
    os.setxattr(root / "xattrs.txt", "trusted.secret", b"s3cr3t")
    os.setxattr(root / "dir", "user.on-a-dir", b"\x00\xff")
    (root / "acl.txt").write_bytes(b"acl\n")
    _run("setfacl", "-m", "u:nobody:r--,g:nogroup:rw-", str(root / "acl.txt"))
    (root / "dacl").mkdir()
    _run("setfacl", "-m", "g:nogroup:rwx", str(root / "dacl"))
    _run("setfacl", "-d", "-m", "u:nobody:r-x,g:nogroup:r--", str(root / "dacl"))
    (root / "cap").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "cap", 0o755)
    _run("setcap", "cap_net_raw+ep", str(root / "cap"))
    (root / "suid").write_bytes(b"suid\n")
    os.chmod(root / "suid", 0o4755)
    (root / "sgid-dir").mkdir()
    os.chmod(root / "sgid-dir", 0o2755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "big-ids").write_bytes(b"ids\n")
    os.chown(root / "big-ids", 70000, 70001)
    (root / "nobody").write_bytes(b"nobody\n")
    os.chown(root / "nobody", 65534, 65534)


def _chattr(root: Path):
    """``chattr +A`` (FLAG_NOATIME) where the file system supports it."""
    path = root / "noatime.txt"
    path.write_bytes(b"noatime\n")
    try:
        _run("chattr", "+A", str(path))
    except (OSError, subprocess.CalledProcessError):
        pass


def _deep_path(root: Path, levels: int):
    path = root / "deep"
    for level in range(levels):
        path = path / f"d{level}"
    path.mkdir(parents=True)
    (path / "bottom.txt").write_bytes(b"bottom\n")


@_umask_022
def build_names_tree(root: Path) -> Path:
    """A file for each of ``ODD_NAMES``, and a symlink to a target with spaces."""
    root.mkdir()
    for name in ODD_NAMES:
        (root / os.fsdecode(name)).write_bytes(name + b"\n")
    os.symlink("a target with spaces", root / "link")
    _times(root)
    return root


@_umask_022
def build_longname_tree(root: Path) -> Path:
    """What casync archives but cannot extract (casync-format §13, §5.3): a
    255-byte name, and a pre-1970 mtime.  ``casync extract`` stops at either:
    "File name too long", or, on ext4, "Operation not supported" after it
    set the wrapped mtime (2544, clamped by ext4 to 2446) and read it back.
    Also an mtime after 2262, whose field, like a wrapped one, is 2**63 or
    more (casync extracts it right)."""
    root.mkdir()
    (root / ("n" * 255)).write_bytes(b"long name\n")
    (root / ("ü" * 127)).write_bytes(b"254 bytes of UTF-8\n")
    (root / "old.txt").write_bytes(b"1960\n")
    (root / "future.txt").write_bytes(b"2300\n")
    _times(root)
    os.utime(root / "old.txt", ns=(PRE_1970,) * 2)
    os.utime(root / "future.txt", ns=(AFTER_2262,) * 2)
    return root


@_umask_022
def build_bigdir_tree(root: Path, n: int = 10_000, names=("big",)) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"file{i:05d}").write_bytes(b"%d\n" % i)
    _times(root)
    return root


@_umask_022
def build_manydirs_tree(root: Path, n: int = 1100) -> Path:
    """``d/`` with ``n`` subdirectories, one small file in each."""
    for i in range(n):
        (root / "d" / f"s{i:05d}").mkdir(parents=True)
        (root / "d" / f"s{i:05d}" / "f").write_bytes(b"%d\n" % i)
    _times(root)
    return root


SPARSE_SIZE = 2 << 30
SPARSE_MARKS = {0: b"start", (1 << 30) + 7: b"middle", SPARSE_SIZE - 1: b"!"}


@_umask_022
def build_sparse_tree(root: Path) -> Path:
    """One 2 GiB sparse file, ``sparse``, with a few bytes written in it."""
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.truncate(SPARSE_SIZE)
        for offset, data in SPARSE_MARKS.items():
            f.seek(offset)
            f.write(data)
    _times(root)
    return root
