"""What the chattr and FAT ioctls answer for an entry (casync-format §5.3)."""

import struct

from cafuse import chattr
from cafuse.catar import Entry

EVERY_FLAG = 0x3FFE000  # FAT hidden/system/archive and every chattr bit


def entry(flags, feature_flags=EVERY_FLAG, projid=None):
    return Entry(0, 0, b"f", feature_flags, 0o100644, flags, 0, 0, 0, quota_projid=projid)


def word(data):
    return struct.unpack("<I", data)[0]


def test_each_stored_bit_is_answered_as_the_kernel_names_it():
    # casync's flag bit -> FS_*_FL, as `lsattr` letters: a A c C d D i S m P
    for bit, fs_flag in ((0x10000, 0x20), (0x20000, 0x80), (0x40000, 0x4),
                         (0x80000, 0x800000), (0x100000, 0x40), (0x200000, 0x10000),
                         (0x400000, 0x10), (0x800000, 0x8), (0x1000000, 0x400),
                         (0x2000000, 0x20000000)):
        assert word(chattr.answer(entry(bit), chattr.FS_IOC_GETFLAGS)) == fs_flag
        assert word(chattr.answer(entry(bit), chattr.FAT_IOCTL_GET_ATTRIBUTES)) == 0
    for bit, fat in ((0x2000, 0x2), (0x4000, 0x4), (0x8000, 0x20)):
        assert word(chattr.answer(entry(bit), chattr.FAT_IOCTL_GET_ATTRIBUTES)) == fat
        assert word(chattr.answer(entry(bit), chattr.FS_IOC_GETFLAGS)) == 0


def test_bits_the_archive_did_not_record_are_not_answered():
    assert word(chattr.answer(entry(0x30000, feature_flags=0x10000),
                              chattr.FS_IOC_GETFLAGS)) == 0x20


def test_fsxattr_carries_the_xflags_and_the_project_id():
    answer = chattr.answer(entry(0x400000 | 0x20000 | 0x40000, projid=42),
                           chattr.FS_IOC_FSGETXATTR)
    xflags, extsize, nextents, projid, cowextsize = struct.unpack("<5I8x", answer)
    assert xflags == 0x8 | 0x40  # immutable, noatime; compr has no xflag
    assert (extsize, nextents, projid, cowextsize) == (0, 0, 42, 0)


def test_other_commands_are_not_answered():
    assert chattr.answer(entry(0x10000), 0x40086602) is None  # FS_IOC_SETFLAGS
