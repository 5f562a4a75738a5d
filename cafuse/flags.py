"""casync feature flags (casync-format.md §6): the bits and their names."""

WITH_16BIT_UIDS = 0x1
WITH_32BIT_UIDS = 0x2
WITH_USER_NAMES = 0x4
WITH_SEC_TIME = 0x8
WITH_USEC_TIME = 0x10
WITH_NSEC_TIME = 0x20
WITH_2SEC_TIME = 0x40
WITH_READ_ONLY = 0x80
WITH_PERMISSIONS = 0x100
WITH_SYMLINKS = 0x200
WITH_DEVICE_NODES = 0x400
WITH_FIFOS = 0x800
WITH_SOCKETS = 0x1000
WITH_XATTRS = 0x10000000
WITH_ACL = 0x20000000
WITH_SELINUX = 0x40000000
WITH_FCAPS = 0x80000000
WITH_QUOTA_PROJID = 0x100000000
EXCLUDE_FILE = 0x1000000000000000
SHA512_256 = 0x2000000000000000
EXCLUDE_SUBMOUNTS = 0x4000000000000000
EXCLUDE_NODUMP = 0x8000000000000000

# Every defined bit; casync rejects anything else as "too new".
KNOWN = 0xF0000001FFFFFFFF

_NAMES = {
    0x1: "16bit-uids",
    0x2: "32bit-uids",
    0x4: "user-names",
    0x8: "sec-time",
    0x10: "usec-time",
    0x20: "nsec-time",
    0x40: "2sec-time",
    0x80: "read-only",
    0x100: "permissions",
    0x200: "symlinks",
    0x400: "device-nodes",
    0x800: "fifos",
    0x1000: "sockets",
    0x2000: "flag-hidden",
    0x4000: "flag-system",
    0x8000: "flag-archive",
    0x10000: "flag-append",
    0x20000: "flag-noatime",
    0x40000: "flag-compr",
    0x80000: "flag-nocow",
    0x100000: "flag-nodump",
    0x200000: "flag-dirsync",
    0x400000: "flag-immutable",
    0x800000: "flag-sync",
    0x1000000: "flag-nocomp",
    0x2000000: "flag-projinherit",
    0x4000000: "subvolume",
    0x8000000: "subvolume-ro",
    0x10000000: "xattrs",
    0x20000000: "acl",
    0x40000000: "selinux",
    0x80000000: "fcaps",
    0x100000000: "quota-projid",
    EXCLUDE_FILE: "exclude-file",
    SHA512_256: "sha512-256",
    EXCLUDE_SUBMOUNTS: "exclude-submounts",
    EXCLUDE_NODUMP: "exclude-nodump",
}


def names(flags: int) -> list[str]:
    """The names of the bits set in ``flags``, lowest bit first."""
    out = [name for bit, name in _NAMES.items() if flags & bit]
    unknown = flags & ~KNOWN
    if unknown:
        out.append(f"unknown:{unknown:#x}")
    return out


def digest_name(flags: int) -> str:
    """The chunk digest an index with these flags uses (§3)."""
    return "sha512-256" if flags & SHA512_256 else "sha256"
