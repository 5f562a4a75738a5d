"""The FUSE file systems: a .caibx as one read-only file, a .caidx as a tree.

Both serve reads through the same IndexStream, so caching, prefetch and
fault handling are the stream's and the engine's.  The archive is immutable,
so the kernel may keep everything: long entry and attribute timeouts,
``keep_cache`` on every open, inode numbers derived from archive offsets
(ENTRY offset + 1; the root's is 0, which makes it ROOT_INODE) and an
mtime that never changes.  A repeated stat or re-read never reaches Python.

Any error below (a chunk no store can deliver, malformed archive bytes)
becomes EIO for that one request, with one log line; the mount stays up.
"""

import errno
import logging
import os
import stat
from contextlib import contextmanager

import cachetools
import pyfuse3
import trio

from . import acl
from .archive import Archive
from .catar import Entry
from .errors import CafuseError
from .stream import IndexStream

log = logging.getLogger("cafuse")

TIMEOUT = 24 * 3600.0        # entry and attribute timeouts: the archive never changes
SMALL_FILE = 1 << 20         # opening a file up to this size fetches all of it
READAHEAD_MAX = 32           # chunks ahead of a sequential reader, at most
PREFETCH_TASKS = 4           # background prefetches at once; more are dropped
LISTED_ENTRIES = 100_000     # directory entries kept decoded for readdir


@contextmanager
def _errors_as_eio(what):
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except CafuseError as e:
        log.error("%s: %s", what, e)
        raise pyfuse3.FUSEError(errno.EIO) from None


class _Base(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_acl = True

    def __init__(self, stream: IndexStream, mtime_ns: int):
        super().__init__()
        self.stream = stream
        self.mtime_ns = mtime_ns
        self.nursery: trio.Nursery | None = None  # set by the runner
        self._prefetching = 0  # background prefetches running
        self._sequential: dict[int, tuple[int, int]] = {}  # fh -> (next offset, window)

    def prefetch(self, offset: int, size: int) -> None:
        """Fetch the chunks of a byte range in the background, if a slot is
        free; a demand read is never kept waiting for this."""
        if self.nursery is None or size <= 0 or self._prefetching >= PREFETCH_TASKS:
            return
        self._prefetching += 1
        self.nursery.start_soon(self._prefetch, offset, size)

    async def _prefetch(self, offset, size):
        try:
            await self.stream.read(offset, size)
        except CafuseError as e:
            log.info("prefetch of bytes %d..%d: %s", offset, offset + size, e)
        finally:
            self._prefetching -= 1

    async def read_range(self, fh: int, start: int, offset: int, size: int, end: int):
        """Read ``[start+offset, ...)`` of the stream for handle ``fh`` and
        widen a readahead window while the reader goes sequentially."""
        size = max(0, min(size, end - start - offset))
        log.debug("read fh %d: %d bytes at %d", fh, size, offset)
        with _errors_as_eio(f"read of bytes {start + offset}..{start + offset + size}"):
            data = await self.stream.read(start + offset, size)
        expected, window = self._sequential.get(fh, (None, 1))
        window = min(window * 2, READAHEAD_MAX) if offset == expected else 1
        self._sequential[fh] = (offset + size, window)
        if offset == expected:
            index = self.stream.index
            ahead = start + offset + size
            if ahead < end:
                last = min(index.locate(ahead) + window, len(index) - 1)
                self.prefetch(ahead, min(index.end(last), end) - ahead)
        return data

    async def release(self, fh):
        self._sequential.pop(fh, None)

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = (self.stream.size + 4095) // 4096
        st.f_bfree = st.f_bavail = 0
        st.f_files = 1
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    def _attrs(self, inode, mode, size, uid=0, gid=0, mtime_ns=None, rdev=0, nlink=1):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = mode
        a.st_nlink = nlink
        a.st_uid, a.st_gid = uid, gid
        a.st_rdev = rdev
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = \
            self.mtime_ns if mtime_ns is None else mtime_ns
        return a


class BlobFS(_Base):
    """One read-only regular file, ``name``, holding the blob."""

    FILE_INODE = pyfuse3.ROOT_INODE + 1

    def __init__(self, stream: IndexStream, name: str, mtime_ns: int):
        super().__init__(stream, mtime_ns)
        self.name = os.fsencode(name)
        self._next_fh = 1

    async def getattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return self._attrs(inode, stat.S_IFDIR | 0o555, 0, nlink=2)
        if inode == self.FILE_INODE:
            return self._attrs(inode, stat.S_IFREG | 0o444, self.stream.size)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return await self.getattr(self.FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, await self.getattr(self.FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != self.FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # A handle per open, so that each reader has its own readahead window.
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        return await self.read_range(fh, 0, off, size, self.stream.size)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []


class TreeFS(_Base):
    """The directory tree of a catar stream, served through goodbye tables.

    ``_entries`` holds the entries the kernel knows (lookup counts, as
    pyfuse3 asks: the kernel's forget() drops them), so memory follows the
    kernel's dentry cache, not the archive's size.
    """

    def __init__(self, stream: IndexStream, root: Entry, mtime_ns: int):
        super().__init__(stream, mtime_ns)
        self.archive = Archive(stream)
        self._entries: dict[int, Entry] = {pyfuse3.ROOT_INODE: root}
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, Entry] = {}
        self._listings: dict[int, list[Entry]] = {}  # dir fh -> children
        # Listings of recently opened directories, bounded by entry count, so
        # that walking the tree again does not decode every record again.
        self._dirs = cachetools.LRUCache(LISTED_ENTRIES, getsizeof=len)
        self._next_fh = 1

    @staticmethod
    def inode_of(entry: Entry) -> int:
        return entry.offset + 1

    def _entry(self, inode) -> Entry:
        try:
            return self._entries[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _remember(self, entry: Entry) -> pyfuse3.EntryAttributes:
        inode = self.inode_of(entry)
        self._entries.setdefault(inode, entry)
        self._lookups[inode] = self._lookups.get(inode, 0) + 1
        return self._entry_attrs(entry)

    def _entry_attrs(self, e: Entry):
        rdev = os.makedev(*e.rdev) if e.rdev else 0
        nlink = 2 if e.is_dir else 1
        return self._attrs(self.inode_of(e), e.mode, e.size, e.uid, e.gid, e.mtime_ns,
                           rdev, nlink)

    async def getattr(self, inode, ctx=None):
        return self._entry_attrs(self._entry(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._entry(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        with _errors_as_eio(f"lookup of {name!r}"):
            child = await self.archive.lookup(parent, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._remember(child)

    async def forget(self, inode_list):
        for inode, count in inode_list:
            left = self._lookups.get(inode, 0) - count
            if left > 0:
                self._lookups[inode] = left
            else:
                self._lookups.pop(inode, None)
                if inode != pyfuse3.ROOT_INODE:
                    self._entries.pop(inode, None)

    async def opendir(self, inode, ctx):
        directory = self._entry(inode)
        if not directory.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        children = self._dirs.get(inode)
        if children is None:
            with _errors_as_eio(f"listing of directory at offset {directory.offset}"):
                children = await self.archive.listdir(directory)
            self._dirs[inode] = children
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._listings[fh] = children
        return fh

    async def readdir(self, fh, start_id, token):
        children = self._listings[fh]
        for k in range(start_id, len(children)):
            child = children[k]
            if not pyfuse3.readdir_reply(token, child.name, self._entry_attrs(child), k + 1):
                return
            inode = self.inode_of(child)
            self._entries.setdefault(inode, child)
            self._lookups[inode] = self._lookups.get(inode, 0) + 1

    async def releasedir(self, fh):
        self._listings.pop(fh, None)

    async def readlink(self, inode, ctx):
        entry = self._entry(inode)
        if entry.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target

    async def open(self, inode, flags, ctx):
        entry = self._entry(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if entry.payload is None:
            raise pyfuse3.FUSEError(errno.EISDIR if entry.is_dir else errno.EINVAL)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._handles[fh] = entry
        if 0 < entry.size <= SMALL_FILE and len(self.stream.index.span(entry.payload,
                                                                      entry.size)) > 1:
            # All of a small file at once; within one chunk, the first read
            # fetches it as fast.
            self.prefetch(entry.payload, entry.size)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        entry = self._handles[fh]
        return await self.read_range(fh, entry.payload, off, size, entry.payload + entry.size)

    async def release(self, fh):
        self._handles.pop(fh, None)
        await super().release(fh)

    def _xattrs(self, entry: Entry) -> dict[bytes, bytes]:
        out = dict(entry.xattrs)
        if entry.fcaps is not None:
            out[b"security.capability"] = entry.fcaps
        if entry.selinux is not None:
            out[b"security.selinux"] = entry.selinux + b"\0"
        for name, value in acl.xattrs(entry).items():
            out[name.encode()] = value
        return out

    async def getxattr(self, inode, name, ctx):
        try:
            return self._xattrs(self._entry(inode))[name]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    async def listxattr(self, inode, ctx):
        return list(self._xattrs(self._entry(inode)))
