"""catar record decoding (casync-format.md §5): bytes in, values out.

Nothing here reads a file or awaits.  ``decode_node`` turns the bytes at an
ENTRY into an ``Entry``; the goodbye helpers decode a directory's lookup
table and search it by SipHash.  When a buffer is too short to decide,
``decode_node`` answers ``NeedMore(n)`` and the caller reads more and
retries, so the same code runs over a local file, an index over a chunk
store, or a FUSE mount's cache.
"""

import array
import bisect
import stat
import struct
import sys
from dataclasses import dataclass, field
from typing import Sequence

from .errors import FormatError

ENTRY = 0x1396FABCEA5BBB51
USER = 0xF453131AAEEACCB3
GROUP = 0x25EB6AC969396A52
XATTR = 0xB8157091F80BC486
ACL_USER = 0x297DC88B2EF12FAF
ACL_GROUP = 0x36F2ACB56CB3DD0B
ACL_GROUP_OBJ = 0x23047110441F38F3
ACL_DEFAULT = 0xFE3EEDA6823C8CD0
ACL_DEFAULT_USER = 0xBDF03DF9BD010A91
ACL_DEFAULT_GROUP = 0xA0CB1168782D1F51
FCAPS = 0xF7267DB0AFED0629
SELINUX = 0x46FAF0602FD26C59
QUOTA_PROJID = 0x161BAF2D8772A72B
SYMLINK = 0x664A6FB6830E0D6C
DEVICE = 0xAC3DACE369DFE643
PAYLOAD = 0x8B9E1D93D6DCFFC9
FILENAME = 0x6DBB6EBCB3161F0B
GOODBYE = 0xDFD35C5E8327C403
GOODBYE_TAIL_MARKER = 0x57446FA533702943

HEADER = 16
ENTRY_SIZE = 64
GOODBYE_ITEM = 24
# The smallest child a goodbye item can describe: FILENAME of a one-byte
# name, then a bare ENTRY (a fifo or socket).
MIN_CHILD = HEADER + 2 + ENTRY_SIZE

# Metadata records in the order the grammar (§5.1) allows them, with the
# largest size each may have.  Types marked repeatable may occur many times.
_META_RANK = {USER: 1, GROUP: 2, XATTR: 3, ACL_USER: 4, ACL_GROUP: 5,
              ACL_GROUP_OBJ: 6, ACL_DEFAULT: 7, ACL_DEFAULT_USER: 8,
              ACL_DEFAULT_GROUP: 9, SELINUX: 10, FCAPS: 11, QUOTA_PROJID: 12}
_REPEATABLE = {XATTR, ACL_USER, ACL_GROUP, ACL_DEFAULT_USER, ACL_DEFAULT_GROUP}
_ACL_RECORDS = {ACL_USER, ACL_GROUP, ACL_GROUP_OBJ, ACL_DEFAULT, ACL_DEFAULT_USER,
                ACL_DEFAULT_GROUP}
_MAX_SIZE = {USER: 272, GROUP: 272, XATTR: HEADER + 256 + 65536,
             ACL_USER: 32 + 256, ACL_GROUP: 32 + 256, ACL_GROUP_OBJ: 24,
             ACL_DEFAULT: 48, ACL_DEFAULT_USER: 32 + 256,
             ACL_DEFAULT_GROUP: 32 + 256, SELINUX: 4112,
             FCAPS: HEADER + 65536, QUOTA_PROJID: 24, SYMLINK: 4112,
             DEVICE: 32, FILENAME: 272}
_NO_ACL = 0xFFFFFFFFFFFFFFFF
_FILE_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
               stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}


@dataclass(slots=True, frozen=True)
class AclEntry:
    """A named ACL entry: a uid or gid, rwx bits (4/2/1), optional name."""
    id: int
    permissions: int
    name: bytes | None


@dataclass(slots=True)
class Acl:
    """POSIX ACLs as catar stores them (§5.4).

    USER_OBJ and OTHER are the mode bits; ``group_obj`` is set only when the
    access ACL has a mask (the mode's group bits then hold the mask).
    ``default`` is (user_obj, group_obj, other, mask), mask None if absent.
    """
    users: list[AclEntry] = field(default_factory=list)
    groups: list[AclEntry] = field(default_factory=list)
    group_obj: int | None = None
    default: tuple[int, int, int, int | None] | None = None
    default_users: list[AclEntry] = field(default_factory=list)
    default_groups: list[AclEntry] = field(default_factory=list)


@dataclass(slots=True)
class Entry:
    """One node of the tree: its ENTRY record, metadata and body.

    Offsets are positions in the catar stream.  ``end`` is where the node
    ends (for a directory, after its GOODBYE).  For a regular file the data
    is ``[payload, payload + size)``.
    """
    offset: int
    end: int
    name: bytes
    feature_flags: int
    mode: int
    flags: int
    uid: int
    gid: int
    mtime_ns: int
    user: bytes | None = None
    group: bytes | None = None
    # Most nodes have neither: an empty tuple and no Acl object keep a
    # decoded listing of 100,000 entries at half the memory.
    xattrs: Sequence[tuple[bytes, bytes]] = ()
    acl: Acl | None = None
    selinux: bytes | None = None
    fcaps: bytes | None = None
    quota_projid: int | None = None
    target: bytes | None = None
    rdev: tuple[int, int] | None = None
    payload: int | None = None
    size: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(slots=True, frozen=True)
class NeedMore:
    """The buffer ended too early: at least ``size`` bytes are needed."""
    size: int


class _Short(Exception):
    def __init__(self, size):
        self.size = size


def decode_node(buf: bytes, offset: int, end: int, name: bytes = b"") -> Entry | NeedMore:
    """Decode the node whose ENTRY starts ``buf`` (at stream ``offset``).

    ``end`` is where the node must end, as its parent's goodbye item (or the
    stream size, for the root) says; a record past it is a FormatError.
    """
    try:
        return _NodeParser(buf, offset, end).parse(name)
    except _Short as short:
        return NeedMore(short.size)


class _NodeParser:
    def __init__(self, buf, offset, end):
        self.buf = buf
        self.base = offset
        self.end = end
        self.pos = 0

    def fail(self, message, at=None):
        raise FormatError(message, self.base + (self.pos if at is None else at))

    def header(self):
        """Peek at the record header at pos: (size, type)."""
        if self.base + self.pos + HEADER > self.end:
            self.fail("record runs past the end of its node")
        if len(self.buf) < self.pos + HEADER:
            raise _Short(self.pos + HEADER)
        return struct.unpack_from("<2Q", self.buf, self.pos)

    def record(self, size, kind):
        """Consume a whole record of ``size`` bytes; return its body."""
        if size < HEADER or size > _MAX_SIZE.get(kind, size):
            self.fail(f"record {kind:#x} has invalid size {size}")
        if self.base + self.pos + size > self.end:
            self.fail("record runs past the end of its node")
        if len(self.buf) < self.pos + size:
            raise _Short(self.pos + size)
        body = self.buf[self.pos + HEADER:self.pos + size]
        self.pos += size
        return body

    def parse(self, name):
        size, kind = self.header()
        if kind != ENTRY or size != ENTRY_SIZE:
            self.fail("expected an ENTRY record")
        body = self.record(size, kind)
        feature_flags, mode, flags, uid, gid, mtime = struct.unpack("<6Q", body)
        if mode > 0o177777 or stat.S_IFMT(mode) not in _FILE_TYPES:
            self.fail(f"invalid mode {mode:#o}", 0)
        if uid >= 0xFFFFFFFF or gid >= 0xFFFFFFFF:
            self.fail(f"invalid uid/gid {uid}/{gid}", 0)
        entry = Entry(self.base, self.end, name, feature_flags, mode, flags,
                      uid, gid, mtime_ns(mtime))
        self.metadata(entry)
        self.body(entry)
        return entry

    def metadata(self, entry):
        rank = 0
        while self.base + self.pos < self.end:
            size, kind = self.header()
            new_rank = _META_RANK.get(kind)
            if new_rank is None:
                return
            if new_rank < rank or (new_rank == rank and kind not in _REPEATABLE):
                self.fail(f"metadata record {kind:#x} out of order")
            rank = new_rank
            at = self.pos
            self.apply(entry, kind, self.record(size, kind), at)

    def apply(self, entry, kind, body, at):
        if entry.acl is None and kind in _ACL_RECORDS:
            entry.acl = Acl()
        acl = entry.acl
        if kind == USER:
            entry.user = self.cstring(body, at)
        elif kind == GROUP:
            entry.group = self.cstring(body, at)
        elif kind == XATTR:
            if not entry.xattrs:
                entry.xattrs = []
            entry.xattrs.append(self.xattr(body, entry, at))
        elif kind in (ACL_USER, ACL_GROUP, ACL_DEFAULT_USER, ACL_DEFAULT_GROUP):
            target = {ACL_USER: acl.users, ACL_GROUP: acl.groups,
                      ACL_DEFAULT_USER: acl.default_users,
                      ACL_DEFAULT_GROUP: acl.default_groups}[kind]
            target.append(self.acl_entry(body, at))
        elif kind == ACL_GROUP_OBJ:
            (acl.group_obj,) = self.words(body, 1, at)
        elif kind == ACL_DEFAULT:
            user, group, other, mask = self.words(body, 4, at)
            acl.default = (user, group, other, None if mask == _NO_ACL else mask)
        elif kind == SELINUX:
            entry.selinux = self.cstring(body, at)
        elif kind == FCAPS:
            entry.fcaps = bytes(body)
        elif kind == QUOTA_PROJID:
            (entry.quota_projid,) = self.words(body, 1, at)

    def body(self, entry):
        fmt = stat.S_IFMT(entry.mode)
        if fmt == stat.S_IFREG:
            size, kind = self.header()
            if kind != PAYLOAD:
                self.fail("regular file without PAYLOAD")
            if size < HEADER or self.base + self.pos + size > self.end:
                self.fail(f"PAYLOAD of {size} bytes runs past the end of its node")
            entry.payload = self.base + self.pos + HEADER
            entry.size = size - HEADER
            self.pos += size
        elif fmt == stat.S_IFLNK:
            size, kind = self.header()
            if kind != SYMLINK:
                self.fail("symlink without SYMLINK record")
            at = self.pos
            entry.target = self.cstring(self.record(size, kind), at)
            entry.size = len(entry.target)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            size, kind = self.header()
            if kind != DEVICE:
                self.fail("device without DEVICE record")
            at = self.pos
            entry.rdev = self.words(self.record(size, kind), 2, at)
            if entry.rdev[0] >= 1 << 12 or entry.rdev[1] >= 1 << 20:
                self.fail(f"invalid device number {entry.rdev}", at)
        elif fmt == stat.S_IFDIR:
            _size, kind = self.header()
            if kind not in (FILENAME, GOODBYE):
                self.fail("directory ENTRY not followed by FILENAME or GOODBYE")
            return
        if self.base + self.pos != self.end:
            self.fail("node is followed by stray records")

    def cstring(self, body, at):
        if not body or body[-1] != 0 or 0 in body[:-1] or len(body) == 1:
            self.fail("bad NUL-terminated string", at)
        return bytes(body[:-1])

    def words(self, body, n, at):
        if len(body) != 8 * n:
            self.fail("record has the wrong size", at)
        return struct.unpack(f"<{n}Q", body)

    def xattr(self, body, entry, at):
        name, sep, value = bytes(body).partition(b"\0")
        if not sep or not name:
            self.fail("bad XATTR record", at)
        if entry.xattrs and entry.xattrs[-1][0] >= name:
            self.fail("XATTR records not in strictly increasing order", at)
        return name, value

    def acl_entry(self, body, at):
        if len(body) < 16:
            self.fail("ACL record too short", at)
        ident, perms = struct.unpack_from("<2Q", body)
        name = self.cstring(body[16:], at) if len(body) > 16 else None
        return AclEntry(ident, perms, name)


# The earliest time ext4 and XFS hold, 1901-12-13T20:45:52Z (-2**31 s).
EARLIEST_NS = -(1 << 31) * 10**9


def mtime_ns(stored: int) -> int:
    """An ENTRY's mtime field as ns since the epoch.  The field is
    unsigned, but casync computes ``sec * 10**9 + nsec`` in unsigned
    arithmetic, so a time before 1970 wraps modulo 2**64 (casync-format
    §5.3): a value of 2**63 or more is either that or a time after
    2262-04-11.  It is read as before 1970 back to EARLIEST_NS, and as
    after 2262 below that, up to 2486-07-02, where the two ranges meet:
    every time ext4 and XFS hold reads back as it was.  A time before
    1901, which tmpfs and btrfs can hold, reads as one after 2262."""
    wrapped = stored - (1 << 64)
    return wrapped if stored >= 1 << 63 and wrapped >= EARLIEST_NS else stored


def decode_filename(buf: bytes, offset: int) -> tuple[bytes, int] | NeedMore:
    """Decode the FILENAME record starting ``buf``: (name, record size)."""
    if len(buf) < HEADER:
        return NeedMore(HEADER)
    size, kind = struct.unpack_from("<2Q", buf)
    if kind != FILENAME or not HEADER + 2 <= size <= _MAX_SIZE[FILENAME]:
        raise FormatError("expected a FILENAME record", offset)
    if len(buf) < size:
        return NeedMore(size)
    name = bytes(buf[HEADER:size])
    if name[-1] != 0:
        raise FormatError("FILENAME is not NUL-terminated", offset)
    name = name[:-1]
    if b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FormatError(f"forbidden file name {name!r}", offset)
    return name, size


@dataclass(slots=True, frozen=True)
class GoodbyeItem:
    """A child of a directory: its FILENAME starts at ``start``; the child
    (FILENAME plus node) spans ``size`` bytes; ``hash`` is SipHash(name)."""
    start: int
    size: int
    hash: int


def decode_goodbye_tail(buf: bytes, end: int, dir_offset: int) -> int:
    """Check the 24-byte tail of the GOODBYE ending at ``end``; return the
    GOODBYE's start.  The tail must point back at the ENTRY at ``dir_offset``."""
    at = end - GOODBYE_ITEM
    if len(buf) != GOODBYE_ITEM:
        raise FormatError("goodbye tail is truncated", at)
    entry_offset, size, marker = struct.unpack("<3Q", buf)
    if marker != GOODBYE_TAIL_MARKER:
        raise FormatError("bad goodbye tail marker", at)
    start = end - size
    if size < HEADER + GOODBYE_ITEM or (size - HEADER - GOODBYE_ITEM) % GOODBYE_ITEM:
        raise FormatError(f"bad goodbye size {size}", at)
    if start < dir_offset + ENTRY_SIZE or start - entry_offset != dir_offset:
        raise FormatError("goodbye tail does not point at its directory's ENTRY", at)
    return start


class Places:
    """Where the children of a directory lie, in archive (strcmp) order:
    ``(start, size)`` of each, 16 bytes a child where a decoded
    ``GoodbyeItem`` costs some 150."""

    def __init__(self, starts: array.array, sizes: array.array):
        self._starts = starts
        self._sizes = sizes

    def __len__(self) -> int:
        return len(self._starts)

    def after(self, offset: int) -> int:
        """The number of the first child starting after ``offset``."""
        return bisect.bisect_right(self._starts, offset)

    def page(self, first: int = 0, count: int | None = None) -> list[tuple[int, int]]:
        """Children ``first`` to ``first + count`` (to the last if None)."""
        end = len(self) if count is None else first + count
        return list(zip(self._starts[first:end], self._sizes[first:end]))


def goodbye_places(buf: bytes, start: int, dir_offset: int) -> Places:
    """The children the GOODBYE record at ``start`` (``buf`` holds exactly
    it) describes, sorted by their start.  Every child must lie between the
    directory's ENTRY and this GOODBYE, without overlapping a sibling.

    No object is made per item but one int: a table of 1,000,000 items
    takes 0.5-2 s (its places in order to shuffled) and 65 MB at the
    peak, against 3.6 s and 148 MB as ``GoodbyeItem``s sorted.
    """
    count = _goodbye_count(buf, start)
    words = array.array("Q")
    words.frombytes(memoryview(buf)[HEADER:HEADER + count * GOODBYE_ITEM])
    if sys.byteorder != "little":
        words.byteswap()
    backs, sizes = words[0::3], words[1::3]
    del words
    # Each key is a child's distance back from the GOODBYE, above its
    # index: sorted by that, descending, the children come in archive order.
    shift = max(count.bit_length(), 1)
    keys = [back << shift | k for k, back in enumerate(backs)]
    del backs
    keys.sort(reverse=True)
    lowest = dir_offset + ENTRY_SIZE
    if keys and (keys[0] >> shift) > start - lowest:
        raise FormatError("goodbye item points outside its directory", start)
    mask = (1 << shift) - 1
    places = Places(array.array("Q", (start - (key >> shift) for key in keys)),
                    array.array("Q", (sizes[key & mask] for key in keys)))
    del keys
    end = lowest
    for child, size in zip(places._starts, places._sizes):
        if child < end:
            raise FormatError("goodbye items overlap", start)
        if size < MIN_CHILD:
            raise FormatError("goodbye item points outside its directory", start)
        end = child + size
    if end > start:
        raise FormatError("goodbye item points outside its directory", start)
    return places


def goodbye_search(buf: bytes, start: int, dir_offset: int, h: int) -> list[GoodbyeItem]:
    """The items of the GOODBYE record at ``start`` (``buf`` holds exactly
    it) whose hash is ``h``, by a search of its BST (§5.7) that decodes
    only the items on its way: a lookup in a directory of 100,000 entries
    decodes 17 of them, not all (88 ms).

    On equal hashes both subtrees may hold more candidates (casync's and
    desync's tie-breaks differ), so both are explored; the caller compares
    the real FILENAME bytes.  Each candidate lies inside its directory;
    overlaps between siblings are left to a listing to find.
    """
    count = _goodbye_count(buf, start)
    found, todo = [], [0]
    while todo:
        k = todo.pop()
        if k >= count:
            continue
        (pivot,) = struct.unpack_from("<Q", buf, HEADER + k * GOODBYE_ITEM + 16)
        if h < pivot:
            todo.append(2 * k + 1)
        elif h > pivot:
            todo.append(2 * k + 2)
        else:
            found.append(_goodbye_item(buf, k, start, dir_offset))
            todo += (2 * k + 1, 2 * k + 2)
    return found


def _goodbye_count(buf, start):
    """How many items the GOODBYE record ``buf`` holds (its tail aside)."""
    size, kind = struct.unpack_from("<2Q", buf)
    if kind != GOODBYE or size != len(buf):
        raise FormatError("expected a GOODBYE record", start)
    return (size - HEADER) // GOODBYE_ITEM - 1


def _goodbye_item(buf, k, start, dir_offset):
    pos = HEADER + k * GOODBYE_ITEM
    back, child_size, h = struct.unpack_from("<3Q", buf, pos)
    child = GoodbyeItem(start - back, child_size, h)
    if child.start < dir_offset + ENTRY_SIZE or child_size < MIN_CHILD \
            or child.start + child_size > start:
        raise FormatError("goodbye item points outside its directory", start + pos)
    return child
