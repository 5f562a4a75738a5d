"""The real casync as the oracle, and a walk of a real directory tree."""

import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path

TIMEOUT = 300


def casync(*args, store=None) -> str:
    cmd = ["casync"] + ([f"--store={store}"] if store else []) + [str(a) for a in args]
    done = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode("utf-8", "surrogateescape")


def make(output, source, store=None, chunk_size=None, compression=None, digest=None) -> str:
    """``casync make``; returns the digest it prints."""
    options = []
    if chunk_size:
        options.append(f"--chunk-size={chunk_size}")
    if compression:
        options.append(f"--compression={compression}")
    if digest:
        options.append(f"--digest={digest}")
    return casync(*options, "make", output, source, store=store).strip()


def _unescape(text: str) -> bytes:
    """mtree's names escape bytes as \\ooo (octal)."""
    raw = text.encode("utf-8", "surrogateescape")
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)


def mtree(index, store) -> dict[bytes, dict[str, str]]:
    """``casync mtree`` as {relative path (bytes): {key: value}}; the root is b"."."""
    out = {}
    for line in casync("mtree", index, store=store).splitlines():
        name, *fields = line.split(" ")
        values = dict(field.split("=", 1) for field in fields)
        if "link" in values:
            values["link"] = _unescape(values["link"])
        out[_unescape(name)] = values
    return out


def extract(index, store, dest) -> None:
    casync("extract", index, dest, store=store)


def digest(index, store, path=None) -> str:
    return casync("digest", index, *([path] if path else []), store=store).strip()


def walk_fs(root) -> dict[bytes, dict]:
    """Everything casync stores about each path below ``root`` (not the root)."""
    root = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = describe(path)
    return out


def describe(path: bytes) -> dict:
    st = os.lstat(path)
    info = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns}
    if stat.S_ISREG(st.st_mode):
        info["size"] = st.st_size
        with open(path, "rb") as f:
            info["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        info["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if not stat.S_ISLNK(st.st_mode):
        info["xattrs"] = {name: os.getxattr(path, name, follow_symlinks=False)
                          for name in sorted(os.listxattr(path, follow_symlinks=False))}
    return info


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
