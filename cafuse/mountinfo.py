"""What /proc/self/mountinfo says of a mount point.

Only the mount table is read: a stat of the mount point itself would reach
the FUSE daemon behind it, which may be hung, or be this very process
before it serves.
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
