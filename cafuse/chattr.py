"""An entry's chattr and FAT attributes, as the kernel's ioctls answer them.

casync stores them as ENTRY.flags bits of its own (casync-format.md §5.3)
and its mount answers FS_IOC_GETFLAGS and FAT_IOCTL_GET_ATTRIBUTES; this
adds FS_IOC_FSGETXATTR, which the kernel asks instead when a program wants
the XFS-style flags or the project id (`lsattr -p`).
"""

import struct

from .catar import Entry

# include/uapi/linux/fs.h and msdos_fs.h
FS_IOC_GETFLAGS = 0x80086601       # _IOR('f', 1, long); the kernel reads an int
FS_IOC_FSGETXATTR = 0x801C581F     # _IOR('X', 31, struct fsxattr)
FAT_IOCTL_GET_ATTRIBUTES = 0x80047210  # _IOR('r', 0x10, __u32)

# ENTRY.flags bit -> FS_*_FL
_CHATTR = {
    0x10000: 0x20,          # append
    0x20000: 0x80,          # noatime
    0x40000: 0x4,           # compr
    0x80000: 0x800000,      # nocow
    0x100000: 0x40,         # nodump
    0x200000: 0x10000,      # dirsync
    0x400000: 0x10,         # immutable
    0x800000: 0x8,          # sync
    0x1000000: 0x400,       # nocomp
    0x2000000: 0x20000000,  # projinherit
}
# ENTRY.flags bit -> FAT ATTR_*
_FAT = {0x2000: 0x2, 0x4000: 0x4, 0x8000: 0x20}  # hidden, system, archive
# FS_*_FL -> FS_XFLAG_*, for the flags that have one (as the kernel's
# fileattr_fill_flags maps them)
_XFLAGS = {0x8: 0x20, 0x10: 0x8, 0x20: 0x10, 0x40: 0x80, 0x80: 0x40, 0x20000000: 0x200}

_FSXATTR = struct.Struct("<IIIII8x")


def _mapped(bits: int, table: dict[int, int]) -> int:
    return sum(to for frm, to in table.items() if bits & frm)


def answer(entry: Entry, cmd: int) -> bytes | None:
    """The bytes the ioctl ``cmd`` reads out for ``entry``, or None for a
    command that is not one of these.  Only bits the archive says it
    recorded count, as in casync."""
    recorded = entry.flags & entry.feature_flags
    if cmd == FS_IOC_GETFLAGS:
        return struct.pack("<I", _mapped(recorded, _CHATTR))
    if cmd == FS_IOC_FSGETXATTR:
        xflags = _mapped(_mapped(recorded, _CHATTR), _XFLAGS)
        return _FSXATTR.pack(xflags, 0, 0, entry.quota_projid or 0, 0)
    if cmd == FAT_IOCTL_GET_ATTRIBUTES:
        return struct.pack("<I", _mapped(recorded, _FAT))
    return None
