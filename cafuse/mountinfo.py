"""Mounts as the kernel sees them: /proc/self/mountinfo, and the FUSE
connections under /sys/fs/fuse/connections (fusectl).

Only these are read: a stat of the mount point itself would reach the FUSE
daemon behind it, which may be hung, or be this very process before it
serves.
"""

import os


def device_of(mountpoint: str) -> str | None:
    """The "major:minor" of the mount at ``mountpoint`` (the one on top),
    or None if nothing is mounted there."""
    target, device = canonical(mountpoint), None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                device = fields[2]
    return device


def canonical(path: str) -> str:
    """``path`` as mountinfo spells it; only the parent is resolved."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


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
