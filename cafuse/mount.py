"""The FUSE file systems: a .caibx as one read-only file, a .caidx as a tree.

Both serve reads through the same IndexStream, so caching, prefetch and
fault handling are the stream's and the engine's.  The archive is immutable,
so the kernel may keep everything: long entry and attribute timeouts, cached
negative lookups, symlinks and directory listings, page cache kept across
opens, inode numbers derived from archive offsets (ENTRY offset + 1; the
root's is 0, which makes it the FUSE root, 1) and an mtime that never
changes.  A repeated stat, listing or re-read never reaches Python.

Each handler takes a request and returns the reply body at once when it
can, or a coroutine when it must read the archive (see fusesession).  Any
error below (a chunk no store can deliver, malformed archive bytes) becomes
EIO for that one request, with one log line; the mount stays up.
"""

import errno
import logging
import os
import stat
from contextlib import contextmanager

import cachetools
import trio

from . import acl, chattr
from . import fuseproto as proto
from .archive import Archive
from .catar import Entry
from .errors import CafuseError
from .fusesession import FuseError
from .listing import quote
from .stream import IndexStream
from .walk import WalkAhead, node_of

log = logging.getLogger("cafuse")

ROOT = 1                     # the FUSE root node id
TIMEOUT = 24 * 3600.0        # entry and attribute timeouts: the archive never changes
SMALL_FILE = 1 << 20         # reading the start of a file up to this size fetches all of it
READAHEAD_MAX = 32           # chunks ahead of a sequential reader, at most
READAHEAD_BYTES = 16 << 20   # and bytes (but one chunk at least): big chunks
PREFETCH_TASKS = 4           # background prefetches at once; more are dropped
LISTED_ENTRIES = 100_000     # directory entries kept decoded for readdir
# A directory of more entries is decoded a reply at a time, and only its
# children's places are kept: 16 bytes each, this many at most.
PAGED_PLACES = 2_000_000
PAGE_BATCH = 32              # its children decoded at a time while a reply fills
READERS = 4096               # sequential-read windows remembered
ARCHIVE_GAP = 1 << 20        # a tree read this far past the last is still "forward"

INIT_FLAGS = (proto.ASYNC_READ | proto.DO_READDIRPLUS | proto.PARALLEL_DIROPS
              | proto.POSIX_ACL | proto.MAX_PAGES | proto.CACHE_SYMLINKS)


# Error lines logged in the last seconds: the kernel asks again at once for
# a page whose read failed, and one line says it.
_logged = cachetools.TTLCache(maxsize=64, ttl=2.0)


@contextmanager
def _errors_as_eio(what):
    try:
        yield
    except CafuseError as e:
        line = f"{what}: {e}"
        if line in _logged:
            log.debug("%s", line)
        else:
            log.error("%s", line)
            _logged[line] = True
        raise FuseError(errno.EIO) from None


class _Base:
    def __init__(self, stream: IndexStream, mtime_ns: int):
        self.stream = stream
        self.mtime_ns = mtime_ns
        self.nursery: trio.Nursery | None = None  # set by the runner
        self.session = None                       # set by the runner
        self._prefetching = 0  # background prefetches running
        # reader -> (where its last read ended, window in chunks, where the
        # readahead issued so far ends); a blob's readers are (node, fh), a
        # tree has one reader, "tree"
        self._sequential = cachetools.LRUCache(READERS)

    async def background(self) -> None:
        """Work of the file system's own, run beside the session."""

    def handlers(self) -> dict:
        """Opcode -> handler, for fusesession.Session."""
        return {
            proto.LOOKUP: self.lookup, proto.GETATTR: self.getattr,
            proto.READ: self.read, proto.STATFS: self.statfs,
            proto.READDIRPLUS: self.readdir, proto.READDIR: self.readdir,
            proto.GETXATTR: self.getxattr, proto.LISTXATTR: self.listxattr,
            proto.FORGET: self.forget, proto.BATCH_FORGET: self.forget,
            proto.RELEASE: self.release,
        }

    def prefetch(self, offset: int, size: int) -> bool:
        """Fetch the chunks of a byte range in the background, if a slot is
        free (True then); a demand read is never kept waiting for this."""
        if self.nursery is None or size <= 0 or self._prefetching >= PREFETCH_TASKS:
            return False
        self._prefetching += 1
        self.nursery.start_soon(self._prefetch, offset, size)
        return True

    async def _prefetch(self, offset, size):
        try:
            await self.stream.preload([(offset, size)], urgent=False)
        except CafuseError as e:
            log.info("prefetch of bytes %d..%d: %s", offset, offset + size, e)
        finally:
            self._prefetching -= 1

    async def read_range(self, reader, offset: int, size: int, end: int):
        """Bytes ``[offset, offset+size)`` of the stream, cut at ``end``, for
        ``reader``, with readahead (``_read_ahead``)."""
        size = max(0, min(size, end - offset))
        with _errors_as_eio(f"read of {quote(self.name)}, bytes {offset}..{offset + size}"):
            data = await self.stream.read(offset, size)
        self._read_ahead(reader, offset, offset + size, end, 0)
        return data

    def _read_ahead(self, reader, start, stop, end, slack) -> None:
        """While ``reader``'s reads go forward (each starting at most
        ``slack`` bytes after the last one ended), a window of following
        chunks, up to ``end``, is prefetched and doubles up to
        READAHEAD_MAX chunks (READAHEAD_BYTES at most, past one chunk)."""
        last, window, frontier = self._sequential.get(reader, (None, 0, stop))
        if last is not None and last <= start <= last + slack:
            window = min(max(window * 2, 1), READAHEAD_MAX)
        else:
            window, frontier = 0, stop
        if window and stop < end:
            index = self.stream.index
            target = min(index.end(min(index.locate(stop) + window, len(index) - 1)), end,
                         stop + READAHEAD_BYTES)
            begin = max(frontier, stop)
            if target > begin and self.prefetch(begin, target - begin):
                frontier = target
        self._sequential[reader] = (stop, window, frontier)

    def release(self, req):
        self._sequential.pop((req.nodeid, proto.release_arg(req.body)), None)
        return b""

    def forget(self, req):
        return None

    def statfs(self, req):
        return proto.statfs_out((self.stream.size + 4095) // 4096, 1)

    def getxattr(self, req):
        size, name = proto.getxattr_arg(req.body)
        try:
            value = self.xattrs(req.nodeid)[name]
        except KeyError:
            raise FuseError(errno.ENODATA) from None
        return _sized(value, size)

    def listxattr(self, req):
        names = list(self.xattrs(req.nodeid))
        if any(name.startswith(b"trusted.") for name in names) and not _sys_admin(req):
            names = [name for name in names if not name.startswith(b"trusted.")]
        return _sized(b"".join(name + b"\0" for name in names),
                      proto.listxattr_arg(req.body))

    def xattrs(self, node: int) -> dict[bytes, bytes]:
        return {}

    def _attr(self, node, mode, size, uid=0, gid=0, mtime_ns=None, rdev=0, nlink=1):
        return proto.Attr(node, mode, size, uid, gid,
                          self.mtime_ns if mtime_ns is None else mtime_ns, rdev, nlink)


_WHOLE_MAP = [b"0", b"0", b"4294967295"]


def _whole_map(pid) -> bool:
    with open(f"/proc/{pid}/uid_map", "rb") as f:
        return f.read().split() == _WHOLE_MAP


def _sys_admin(req) -> bool:
    """Whether the caller has CAP_SYS_ADMIN in the initial user namespace,
    without which the kernel hides trusted.* xattrs (ext4 and tmpfs leave
    them out of its listing too; a getxattr of one never reaches us).  FUSE
    gives the caller's pid; /proc, readable by anyone, its effective
    capabilities and its user namespace's uid map, which the initial
    namespace has whole (a namespace made by root may have it too: where
    this process is in the initial one, the caller must be in this one).
    A caller gone, or not to be seen (pid 0: another pid namespace), is
    judged by being root."""
    try:
        if not _whole_map(req.pid):
            return False
        if _whole_map("self") and _namespace(req.pid) not in (None, _namespace("self")):
            return False
        with open(f"/proc/{req.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line[7:], 16) >> 21 & 1)
    except (OSError, ValueError):
        pass
    return req.uid == 0


def _namespace(pid) -> int | None:
    """The user namespace of ``pid``, if this process may look."""
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino
    except PermissionError:
        return None


def _sized(value: bytes, size: int) -> bytes:
    if size and len(value) > size:
        raise FuseError(errno.ERANGE)
    return proto.xattr_out(value, size)


class BlobFS(_Base):
    """One read-only regular file, ``name``, holding the blob.  Each open
    gets a handle of its own, so that each reader (a loop device, a cp
    beside it) has its own readahead window."""

    FILE = ROOT + 1

    def __init__(self, stream: IndexStream, name: str, mtime_ns: int):
        super().__init__(stream, mtime_ns)
        self.name = os.fsencode(name)
        self._next_fh = 1

    def handlers(self):
        return {**super().handlers(), proto.OPEN: self.open}

    def _node_attr(self, node):
        if node == ROOT:
            return self._attr(node, stat.S_IFDIR | 0o555, 0, nlink=2)
        if node == self.FILE:
            return self._attr(node, stat.S_IFREG | 0o444, self.stream.size)
        raise FuseError(errno.ENOENT)

    def getattr(self, req):
        return proto.attr_out(self._node_attr(req.nodeid), TIMEOUT)

    def lookup(self, req):
        if req.nodeid == ROOT and proto.name_arg(req.body) == self.name:
            return proto.entry_out(self._node_attr(self.FILE), TIMEOUT)
        return proto.entry_out(None, TIMEOUT)

    def readdir(self, req):
        if req.nodeid != ROOT:
            raise FuseError(errno.ENOTDIR)
        _, offset, size = proto.read_arg(req.body)
        out = proto.DirentBuffer(size, plus=req.opcode == proto.READDIRPLUS)
        root = self._node_attr(ROOT)
        entries = [(b".", root), (b"..", root), (self.name, self._node_attr(self.FILE))]
        for k in range(offset, len(entries)):
            if not out.add(*entries[k], k + 1, TIMEOUT):
                break
        return out.payload()

    def open(self, req):
        if req.nodeid != self.FILE:
            raise FuseError(errno.EISDIR)
        if proto.open_arg(req.body) & os.O_ACCMODE != os.O_RDONLY:
            raise FuseError(errno.EROFS)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return proto.open_out(fh, proto.FOPEN_KEEP_CACHE)

    def read(self, req):
        fh, offset, size = proto.read_arg(req.body)
        return self.read_range((req.nodeid, fh), offset, size, self.stream.size)


class Listings:
    """Directory listings (node -> its children in archive order, decoded
    or as ``Places``), so that a listing read in several requests is read
    once: least recently used out first, bounded by their entries.  A
    directory larger than the whole bound is kept too, alone (the latest
    such one): reading it again for each page of its listing would cost its
    size squared."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._lru = cachetools.LRUCache(max_entries, getsizeof=len)
        self._huge: tuple[int, list] | None = None

    def get(self, node: int) -> list | None:
        if self._huge is not None and self._huge[0] == node:
            return self._huge[1]
        return self._lru.get(node)

    def __contains__(self, node: int) -> bool:
        return self.get(node) is not None

    def __setitem__(self, node: int, children: list) -> None:
        if len(children) > self.max_entries:
            self._huge = (node, children)
        else:
            self._lru[node] = children


class TreeFS(_Base):
    """The directory tree of a catar stream, served through goodbye tables.

    ``_entries`` holds the entries the kernel knows (their lookup counts:
    the kernel's FORGET drops them), so memory follows the kernel's inode
    cache, not the archive's size.  There is no OPEN or OPENDIR: they are
    answered ENOSYS, after which the kernel sends no OPEN, FLUSH, RELEASE,
    OPENDIR or RELEASEDIR again and keeps file pages and directory listings
    itself; READ and READDIRPLUS name their node, which is all they need.
    """

    def __init__(self, stream: IndexStream, root: Entry, mtime_ns: int):
        super().__init__(stream, mtime_ns)
        self.archive = Archive(stream)
        self._entries: dict[int, Entry] = {ROOT: root}
        self._lookups: dict[int, int] = {}
        self._parents: dict[int, int] = {}  # node -> its directory's, for listed nodes
        self._dirs = Listings(LISTED_ENTRIES)
        self._paged = Listings(PAGED_PLACES)  # node -> Places, for larger ones
        self.walk = WalkAhead(self.archive, self._dirs, self._paged,
                              self._lookups.__contains__,
                              lambda node, offset, data: self.session.store(node, offset, data))

    def handlers(self):
        return {**super().handlers(), proto.READLINK: self.readlink,
                proto.IOCTL: self.ioctl}

    inode_of = staticmethod(node_of)

    def _entry(self, node) -> Entry:
        try:
            return self._entries[node]
        except KeyError:
            raise FuseError(errno.ESTALE) from None

    def _remember(self, entry: Entry) -> None:
        node = self.inode_of(entry)
        self._entries.setdefault(node, entry)
        self._lookups[node] = self._lookups.get(node, 0) + 1

    def _entry_attr(self, e: Entry) -> proto.Attr:
        rdev = os.makedev(*e.rdev) if e.rdev else 0
        return self._attr(self.inode_of(e), e.mode, e.size, e.uid, e.gid, e.mtime_ns,
                          rdev, 2 if e.is_dir else 1)

    def getattr(self, req):
        return proto.attr_out(self._entry_attr(self._entry(req.nodeid)), TIMEOUT)

    def lookup(self, req):
        parent = self._entry(req.nodeid)
        if not parent.is_dir:
            raise FuseError(errno.ENOTDIR)
        return self._lookup(req.nodeid, parent, proto.name_arg(req.body))

    async def _lookup(self, node, parent, name):
        with _errors_as_eio(f"lookup of {self._path(node, name)}"):
            child = await self.archive.lookup(parent, name)
        if child is None:
            return proto.entry_out(None, TIMEOUT)
        self._remember(child)
        self._parents[self.inode_of(child)] = node
        return proto.entry_out(self._entry_attr(child), TIMEOUT)

    def forget(self, req):
        if req.opcode == proto.FORGET:
            forgotten = proto.forget_arg(req.nodeid, req.body)
        else:
            forgotten = proto.batch_forget_arg(req.body)
        for node, count in forgotten:
            left = self._lookups.get(node, 0) - count
            if left > 0:
                self._lookups[node] = left
            else:
                self._lookups.pop(node, None)
                self._parents.pop(node, None)
                if node != ROOT:
                    self._entries.pop(node, None)
        return None

    def readdir(self, req):
        directory = self._entry(req.nodeid)
        if not directory.is_dir:
            raise FuseError(errno.ENOTDIR)
        _, offset, size = proto.read_arg(req.body)
        out = proto.DirentBuffer(size, plus=req.opcode == proto.READDIRPLUS)
        children = self._dirs.get(req.nodeid)
        if children is None:
            return self._list_then_reply(req.nodeid, directory, offset, out)
        return self._listing(req.nodeid, children, offset, out)

    async def _list_then_reply(self, node, directory, offset, out):
        with _errors_as_eio(f"listing of {self._path(node)}"):
            places = self._paged.get(node)
            if places is None:
                places = await self.archive.places(directory)
                if len(places) <= LISTED_ENTRIES:
                    children = await self.archive.entries(places.page())
                    self._dirs[node] = children
                    return self._listing(node, children, offset, out)
                self._paged[node] = places
            await self._page(node, places, offset, out)
        return out.payload()

    async def _page(self, node, places, offset, out):
        """Fill ``out`` from ``offset`` on, decoding the children a few at a
        time until it is full."""
        first, sent = max(offset - 2, 0), []  # after "." and ".."
        while first < len(places) and out.room():
            batch = await self.archive.entries(places.page(first, min(out.room(), PAGE_BATCH)))
            full = not self._add_dirents(node, batch, offset, out, sent, first)
            first += len(batch)
            offset = first + 2
            if full:
                break
        self._sent(node, sent, out)  # only now: a batch may still have failed

    def _listing(self, node, children, offset, out):
        """The reply from a whole listing, which a walk may want too."""
        if offset == 0 and out.plus:
            self.walk.listed(node, children)
        sent = []
        self._add_dirents(node, children, offset, out, sent)
        self._sent(node, sent, out)
        return out.payload()

    def _add_dirents(self, node, children, offset, out, sent, first=0) -> bool:
        """Entries from ``offset`` on: "." and ".." (which the kernel does
        not count as lookups), then the children, at offsets 3, 4, ...,
        each also appended to ``sent``; ``children`` starts with child
        number ``first``.  False once ``out`` is full."""
        dots = self._dots(node)
        for k in range(offset, len(dots)):
            if not out.add(*dots[k], k + 1, TIMEOUT):
                return False
        for k in range(max(offset - len(dots), first), first + len(children)):
            child = children[k - first]
            if not out.add(child.name, self._entry_attr(child), k + 1 + len(dots), TIMEOUT):
                return False
            sent.append(child)
        return True

    def _sent(self, node, children, out):
        """Each entry of a READDIRPLUS reply counts as a lookup."""
        if out.plus:
            for child in children:
                self._remember(child)
                self._parents[self.inode_of(child)] = node

    def _path(self, node, name: bytes | None = None) -> str:
        """Where ``node`` (or its child ``name``) is in the tree, for
        messages; the kernel holds every node above one it holds."""
        names = [] if name is None else [name]
        while node != ROOT and (entry := self._entries.get(node)) is not None:
            names.append(entry.name)
            node = self._parents.get(node, ROOT)
        return "/" + "/".join(quote(n) for n in reversed(names))

    def _dots(self, node):
        own = self._entry_attr(self._entry(node))
        parent = self._entries.get(self._parents.get(node))  # the root is its own
        return [(b".", own), (b"..", own if parent is None else self._entry_attr(parent))]

    def ioctl(self, req):
        """chattr and FAT attributes (``lsattr``); the kernel sends ioctls
        of regular files and directories only."""
        cmd, out_size = proto.ioctl_arg(req.body)
        data = chattr.answer(self._entry(req.nodeid), cmd)
        if data is None or len(data) > out_size:
            raise FuseError(errno.ENOTTY)
        return proto.ioctl_out(data)

    def readlink(self, req):
        entry = self._entry(req.nodeid)
        if entry.target is None:
            raise FuseError(errno.EINVAL)
        return entry.target

    def read(self, req):
        entry = self._entry(req.nodeid)
        if entry.payload is None:
            raise FuseError(errno.EISDIR if entry.is_dir else errno.EINVAL)
        _, offset, size = proto.read_arg(req.body)
        size = max(0, min(size, entry.size - offset))
        if offset == 0 and size < entry.size <= SMALL_FILE:
            # The rest of a small file at once, while this read is served.
            self.prefetch(entry.payload + size, entry.size - size)
        start = entry.payload + offset
        data = self.stream.read_cached(start, size)
        if data is None:
            return self._read_tree(req.nodeid, entry, start, size)
        self._after_read(req.nodeid, entry, start, size)
        return data

    async def _read_tree(self, node, entry, offset, size):
        start = offset - entry.payload
        with _errors_as_eio(f"read of {self._path(node)}, bytes {start}..{start + size}"):
            data = await self.stream.read(offset, size)
        self._after_read(node, entry, offset, size)
        return data

    def _after_read(self, node, entry, offset, size):
        # One reader for the whole tree, in archive order: a walk (tar, cp -a)
        # reads files in that order, so the chunks after the file being read
        # are those of the next files, and the window runs across files.
        self._read_ahead("tree", offset, offset + size, self.stream.size, ARCHIVE_GAP)
        self.walk.read(self._parents.get(node), entry, offset, size)

    async def background(self):
        await self.walk.run()

    def xattrs(self, node):
        entry = self._entry(node)
        out = dict(entry.xattrs)
        if entry.fcaps is not None:
            out[b"security.capability"] = entry.fcaps
        if entry.selinux is not None:
            out[b"security.selinux"] = entry.selinux + b"\0"
        for name, value in acl.xattrs(entry).items():
            out[name.encode()] = value
        return out
