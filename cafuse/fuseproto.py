"""The FUSE wire protocol, sans I/O: request bytes in, reply bytes out.

Layouts and flags are those of the kernel's ``include/uapi/linux/fuse.h``
(protocol 7.31; the kernel speaks every older minor version too).  Only what
a read-only file system needs is here; every other opcode is answered ENOSYS
by the session, which the kernel remembers where the protocol allows.
"""

import struct
from dataclasses import dataclass

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, READLINK = 1, 2, 3, 5
OPEN, READ, STATFS, RELEASE = 14, 15, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT = 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, ACCESS = 27, 28, 29, 34
INTERRUPT, DESTROY, IOCTL, BATCH_FORGET, READDIRPLUS = 36, 38, 39, 42, 44

NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags we ask for (the kernel grants the subset it offered).
ASYNC_READ = 1 << 0
DO_READDIRPLUS = 1 << 13
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23

FOPEN_KEEP_CACHE = 1 << 1

MAJOR, MINOR = 7, 31
MAX_PAGES_WANTED = 256          # 1 MiB requests: the kernel's ceiling
MAX_WRITE = 128 * 1024          # nothing is written; the kernel wants a value
BUFFER_SIZE = MAX_PAGES_WANTED * 4096 + 4096  # a whole request with its header

_IN_HEADER = struct.Struct("<IIQQIIIHH")
_OUT_HEADER = struct.Struct("<IiQ")
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ENTRY_OUT = struct.Struct("<QQQQII")
_ATTR_OUT = struct.Struct("<QII")
_INIT_IN = struct.Struct("<IIII")
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
_OPEN_IN = struct.Struct("<II")
_OPEN_OUT = struct.Struct("<QII")
_READ_IN = struct.Struct("<QQI")
_RELEASE_IN = struct.Struct("<Q")
_FORGET_IN = struct.Struct("<Q")
_BATCH_FORGET_IN = struct.Struct("<II")
_FORGET_ONE = struct.Struct("<QQ")
_GETXATTR_IN = struct.Struct("<II")
_GETXATTR_OUT = struct.Struct("<II")
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")
_DIRENT = struct.Struct("<QQII")
_IOCTL_IN = struct.Struct("<QIIQII")
_IOCTL_OUT = struct.Struct("<iIII")
_NOTIFY_STORE_OUT = struct.Struct("<QQII")
NOTIFY_STORE = 4


class ProtocolError(Exception):
    """The kernel sent something this module cannot read."""


@dataclass(slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview


def parse_request(buf: bytes) -> Request:
    if len(buf) < _IN_HEADER.size:
        raise ProtocolError(f"short request: {len(buf)} bytes")
    length, opcode, unique, nodeid, uid, gid, pid, _, _ = _IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"request of {len(buf)} bytes says it has {length}")
    return Request(opcode, unique, nodeid, uid, gid, pid, memoryview(buf)[_IN_HEADER.size:])


def reply_header(unique: int, payload_size: int, error: int = 0) -> bytes:
    """The header of a reply; ``error`` is a positive errno (sent negated)."""
    return _OUT_HEADER.pack(_OUT_HEADER.size + payload_size, -error, unique)


# --- request bodies -------------------------------------------------------

def name_arg(body: memoryview) -> bytes:
    """The NUL-terminated name of LOOKUP (and of GETXATTR after its struct)."""
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def init_arg(body: memoryview) -> tuple[int, int, int, int]:
    """(major, minor, max_readahead, flags) of an INIT request."""
    return _INIT_IN.unpack_from(body)


def open_arg(body: memoryview) -> int:
    return _OPEN_IN.unpack_from(body)[0]


def read_arg(body: memoryview) -> tuple[int, int, int]:
    """(fh, offset, size) of READ, READDIR and READDIRPLUS."""
    return _READ_IN.unpack_from(body)


def release_arg(body: memoryview) -> int:
    return _RELEASE_IN.unpack_from(body)[0]


def forget_arg(nodeid: int, body: memoryview) -> list[tuple[int, int]]:
    return [(nodeid, _FORGET_IN.unpack_from(body)[0])]


def batch_forget_arg(body: memoryview) -> list[tuple[int, int]]:
    count, _ = _BATCH_FORGET_IN.unpack_from(body)
    return [_FORGET_ONE.unpack_from(body, _BATCH_FORGET_IN.size + k * _FORGET_ONE.size)
            for k in range(count)]


def getxattr_arg(body: memoryview) -> tuple[int, bytes]:
    """(size, name) of GETXATTR; size 0 asks for the value's length."""
    size, _ = _GETXATTR_IN.unpack_from(body)
    return size, name_arg(body[_GETXATTR_IN.size:])


def listxattr_arg(body: memoryview) -> int:
    return _GETXATTR_IN.unpack_from(body)[0]


def ioctl_arg(body: memoryview) -> tuple[int, int]:
    """(cmd, out_size) of IOCTL: the command and the room for its answer."""
    _, _, cmd, _, _, out_size = _IOCTL_IN.unpack_from(body)
    return cmd, out_size


# --- reply bodies ---------------------------------------------------------

@dataclass(slots=True, frozen=True)
class Attr:
    ino: int
    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1

    def pack(self) -> bytes:
        sec, nsec = divmod(self.mtime_ns, 1_000_000_000)
        sec &= 0xFFFF_FFFF_FFFF_FFFF  # pre-1970 times travel as two's complement
        return _ATTR.pack(self.ino, self.size, (self.size + 511) // 512, sec, sec, sec,
                          nsec, nsec, nsec, self.mode, self.nlink, self.uid, self.gid,
                          self.rdev, 4096, 0)


def _valid(timeout: float) -> tuple[int, int]:
    sec = int(timeout)
    return sec, int((timeout - sec) * 1e9)


def entry_out(attr: Attr | None, timeout: float) -> bytes:
    """A LOOKUP reply.  ``None`` is a negative entry: the kernel caches the
    absence of the name for ``timeout`` instead of asking again."""
    sec, nsec = _valid(timeout)
    if attr is None:
        return _ENTRY_OUT.pack(0, 0, sec, 0, nsec, 0) + bytes(_ATTR.size)
    return _ENTRY_OUT.pack(attr.ino, 0, sec, sec, nsec, nsec) + attr.pack()


def attr_out(attr: Attr, timeout: float) -> bytes:
    sec, nsec = _valid(timeout)
    return _ATTR_OUT.pack(sec, nsec, 0) + attr.pack()


def init_out(kernel_minor: int, max_readahead: int, kernel_flags: int,
             wanted: int) -> bytes:
    return _INIT_OUT.pack(MAJOR, min(MINOR, kernel_minor), max_readahead,
                          kernel_flags & wanted, 64, 48, MAX_WRITE, 1,
                          MAX_PAGES_WANTED, 0, 0)


def open_out(fh: int, flags: int) -> bytes:
    return _OPEN_OUT.pack(fh, flags, 0)


def statfs_out(blocks: int, files: int, bsize: int = 4096, namelen: int = 255) -> bytes:
    return _STATFS_OUT.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0)


def notify_store(nodeid: int, offset: int, size: int) -> bytes:
    """Header and body of a NOTIFY_STORE, before its ``size`` data bytes:
    the kernel puts them in the node's page cache, unasked."""
    total = _OUT_HEADER.size + _NOTIFY_STORE_OUT.size + size
    return (_OUT_HEADER.pack(total, NOTIFY_STORE, 0)
            + _NOTIFY_STORE_OUT.pack(nodeid, offset, size, 0))


def xattr_out(value: bytes, size: int) -> bytes:
    """The reply to GETXATTR/LISTXATTR: the length alone when ``size`` is 0;
    the caller raises ERANGE when ``size`` is too small."""
    return _GETXATTR_OUT.pack(len(value), 0) if size == 0 else value


def ioctl_out(data: bytes) -> bytes:
    """A successful IOCTL's reply: result 0, then the bytes it reads out."""
    return _IOCTL_OUT.pack(0, 0, 0, 0) + data


def dirent_type(mode: int) -> int:
    return (mode >> 12) & 0o17


class DirentBuffer:
    """The body of a READDIRPLUS (``plus``) or READDIR reply, filled entry
    by entry up to the size the kernel asked for."""

    def __init__(self, size: int, plus: bool = True):
        self.size = size
        self.plus = plus
        self.parts: list[bytes] = []
        self.used = 0

    def add(self, name: bytes, attr: Attr, next_offset: int, timeout: float) -> bool:
        """Append one entry; False (nothing appended) once it would not fit."""
        padded = (len(name) + 7) & ~7
        entry = entry_out(attr, timeout) if self.plus else b""
        need = len(entry) + _DIRENT.size + padded
        if self.used + need > self.size:
            return False
        self.parts.append(entry)
        self.parts.append(_DIRENT.pack(attr.ino, next_offset, len(name),
                                       dirent_type(attr.mode)))
        self.parts.append(name + bytes(padded - len(name)))
        self.used += need
        return True

    def room(self) -> int:
        """How many more entries fit at most (names of up to 8 bytes)."""
        smallest = _DIRENT.size + 8
        if self.plus:
            smallest += _ENTRY_OUT.size + _ATTR.size
        return (self.size - self.used) // smallest

    def payload(self) -> bytes:
        return b"".join(self.parts)
