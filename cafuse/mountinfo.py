"""Mounts as the kernel sees them: /proc/self/mountinfo, and the FUSE
connections under /sys/fs/fuse/connections (fusectl).

Only these are read: a stat of the mount point itself would reach the FUSE
daemon behind it, which may be hung, or be this very process before it
serves.
"""

import os
import re

# mountinfo writes a space, tab, newline or backslash in a path as \ooo
# (the kernel's mangle_path); every other byte, UTF-8 or not, as it is.
_ESCAPE = re.compile(rb"\\([0-7]{3})")
_LINKS_MAX = 40  # the kernel's own limit of symlinks in one path


def device_of(mountpoint: str) -> str | None:
    """The "major:minor" of the mount at ``mountpoint`` (the one on top),
    or None if nothing is mounted there."""
    found = mount_at(mountpoint)
    return found and found[0]


def mount_at(mountpoint: str) -> tuple[str, str] | None:
    """The "major:minor" and the file system type (e.g. "fuse.cafuse") of
    the mount at ``mountpoint`` (the one on top), or None if nothing is
    mounted there."""
    target, found = os.fsencode(canonical(mountpoint)), None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if unescape(fields[4]) == target:
                # After the optional fields, " - " and the type.
                kind = fields[fields.index(b"-", 6) + 1]
                found = fields[2].decode(), os.fsdecode(unescape(kind))
    return found


def unescape(field: bytes) -> bytes:
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


def canonical(path: str) -> str:
    """``path`` as mountinfo spells it: absolute, every symlink resolved.
    The last component is resolved with readlink alone, never a stat,
    which on a mount point would reach the (perhaps hung) daemon."""
    for _ in range(_LINKS_MAX):
        if not os.path.isabs(path):
            path = os.path.join(os.getcwd(), path)
        parent, name = os.path.split(path.rstrip("/") or "/")
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        path = os.path.join(os.path.realpath(parent), name)
        try:
            target = os.readlink(path)
        except OSError:  # not a symlink (EINVAL), or nothing there
            return path
        path = os.path.join(os.path.dirname(path), target)  # from the link's real directory
    return path


def abort_connection(device: str) -> None:
    """Fail every request pending on the FUSE connection of ``device``
    ("major:minor"): the kernel waits for them as long as anything holds
    the daemon's end open, even a thread stuck in the kernel."""
    major, _, minor = device.partition(":")
    if not (major.isdigit() and minor.isdigit()):
        return
    try:
        with open(f"/sys/fs/fuse/connections/{os.makedev(int(major), int(minor))}/abort",
                  "w") as f:
            f.write("1")
    except OSError:
        pass  # no fusectl, or the connection is gone already
