"""POSIX ACLs in the kernel's xattr format (``system.posix_acl_*``).

catar keeps only the named entries and the masks (§5.4); the owner, owning
group and other entries come from the mode.  The kernel's format
(linux/posix_acl_xattr.h) is a le32 version 2, then (le16 tag, le16 perm,
le32 id) entries sorted by tag, then id.
"""

import struct

from .catar import Entry

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"


def xattrs(entry: Entry) -> dict[str, bytes]:
    """The ACL xattrs a file system would report for ``entry``; none when
    the mode alone says everything."""
    out = {}
    acl = entry.acl
    if acl is None:
        return out
    if acl.users or acl.groups or acl.group_obj is not None:
        mode = entry.mode
        group_obj = acl.group_obj if acl.group_obj is not None else (mode >> 3) & 7
        out[ACCESS] = _encode((mode >> 6) & 7, acl.users, group_obj, acl.groups,
                              (mode >> 3) & 7, mode & 7)
    if acl.default is not None:
        user_obj, group_obj, other, mask = acl.default
        out[DEFAULT] = _encode(user_obj, acl.default_users, group_obj,
                               acl.default_groups, mask, other)
    return out


def _encode(user_obj, users, group_obj, groups, mask, other) -> bytes:
    entries = [(USER_OBJ, user_obj, UNDEFINED_ID)]
    entries += [(USER, e.permissions, e.id) for e in sorted(users, key=_by_id)]
    entries.append((GROUP_OBJ, group_obj, UNDEFINED_ID))
    entries += [(GROUP, e.permissions, e.id) for e in sorted(groups, key=_by_id)]
    if mask is not None:
        entries.append((MASK, mask, UNDEFINED_ID))
    entries.append((OTHER, other, UNDEFINED_ID))
    return struct.pack("<I", VERSION) + b"".join(
        struct.pack("<HHI", tag, perm & 7, ident) for tag, perm, ident in entries)


def _by_id(entry):
    return entry.id
