"""The real casync as the oracle, and a walk of a real directory tree."""

import fcntl
import hashlib
import os
import re
import stat
import struct
import subprocess

TIMEOUT = 300

MTREE_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link",
               stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
               stat.S_IFSOCK: "socket"}

# chattr bits casync stores (casync-format §5.3), from linux/fs.h
FS_IOC_GETFLAGS = 0x80086601
CHATTR_STORED = (0x20 | 0x80 | 0x4 | 0x800000 | 0x40 | 0x10000 | 0x10 | 0x8 | 0x400
                 | 0x20000000)


def casync(*args, store=None) -> str:
    """Run casync (without any CASYNC_* environment); its stdout."""
    cmd = ["casync"] + ([f"--store={store}"] if store else []) + [str(a) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASYNC_")}
    done = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode("utf-8", "surrogateescape")


def make(output, source, store=None, chunk_size=None, compression=None, digest=None,
         extra_args=()) -> str:
    """``casync make``; returns the digest it prints."""
    options = []
    if chunk_size:
        options.append(f"--chunk-size={chunk_size}")
    if compression:
        options.append(f"--compression={compression}")
    if digest:
        options.append(f"--digest={digest}")
    return casync(*options, *extra_args, "make", output, source, store=store).strip()


def unescape(text: str) -> bytes:
    """Names in ``casync list``/``mtree`` output escape space, ``#``, ``\\``,
    control characters, DEL and every byte >= 0x80 as ``\\ooo`` (octal)."""
    raw = text.encode("utf-8", "surrogateescape")
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)


def list_(path, store) -> list[tuple[bytes, str]]:
    """``casync list``: [(relative path, ``ls``-style mode string)] in archive
    order; the root is b"."."""
    out = []
    for line in casync("list", path, store=store).splitlines():
        mode, name = line.split(" ", 1)
        out.append((unescape(name), mode))
    return out


def mtree(path, store) -> dict[bytes, dict[str, str]]:
    """``casync mtree`` as {relative path: {key: value}} in archive order; the
    root is b".".  Values are strings, except ``link`` (bytes)."""
    out = {}
    for line in casync("mtree", path, store=store).splitlines():
        name, *fields = line.split(" ")
        values = dict(field.split("=", 1) for field in fields)
        if "link" in values:
            values["link"] = unescape(values["link"])
        out[unescape(name)] = values
    return out


def mtree_mtime_ns(values: dict[str, str]) -> int:
    """An mtree ``time=S.N`` as signed ns; casync prints pre-1970 times
    wrapped modulo 2**64 (casync-format §5.3), which makes them look like
    times after 2262: a field of 2**63 or more is taken as before 1970 if
    that is after 1901-12-13 (-2**31 s, the earliest ext4 holds)."""
    seconds, nanos = values["time"].split(".")
    field = (int(seconds) * 10**9 + int(nanos)) % 2**64
    signed = field - 2**64
    return signed if field >= 2**63 and signed >= -2**31 * 10**9 else field


def extract(index, store, dest) -> None:
    casync("extract", index, dest, store=store)


def digest(path, store, subpath=None) -> str:
    """``casync digest`` of an index, archive or blob (or one path in it)."""
    return casync("digest", path, *([subpath] if subpath else []), store=store).strip()


def walk_fs(root) -> dict[bytes, dict]:
    """``describe`` of each path below ``root`` (not the root itself)."""
    root = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = describe(path)
    return out


def describe(path) -> dict:
    """Everything casync can store about one path, read without following
    symlinks.  Keys: type (as casync mtree names it), mode, uid, gid,
    mtime_ns; size and sha256 for files; target for symlinks; rdev
    (major, minor) for devices; chattr (stored bits only) for files and
    directories; xattrs (all of them, including security.capability and
    system.posix_acl_*) except on symlinks."""
    st = os.lstat(path)
    info = {"type": MTREE_TYPES[stat.S_IFMT(st.st_mode)], "mode": st.st_mode,
            "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
    if stat.S_ISREG(st.st_mode):
        info["size"] = st.st_size
        info["sha256"] = sha256_file(path)
    elif stat.S_ISLNK(st.st_mode):
        info["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        info["chattr"] = chattr(path)
    if not stat.S_ISLNK(st.st_mode):
        info["xattrs"] = {name: os.getxattr(path, name, follow_symlinks=False)
                          for name in sorted(os.listxattr(path, follow_symlinks=False))}
    return info


def chattr(path) -> int:
    """The chattr flags casync stores, or 0 where the file system has none."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        flags = fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)
    except OSError:
        return 0
    finally:
        os.close(fd)
    return struct.unpack("=l", flags[:4])[0] & CHATTR_STORED


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
