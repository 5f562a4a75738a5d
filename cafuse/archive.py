"""Random access to a catar stream through its goodbye tables (§5.9).

``Archive`` navigates a catar held by any byte source (an object with a
``size`` and ``async read(offset, size)``): a local .catar file, an index
over chunk stores, or a FUSE mount's cache.  It never reads more than the
records it needs: looking a name up reads the directory's goodbye table and
the matching FILENAME; listing reads each child's FILENAME and ENTRY, never
their payloads.
"""

import stat
from collections import deque
from typing import Protocol

import cachetools
import trio

from . import catar
from .errors import FormatError, NotFoundError
from .siphash import siphash24

# First read when decoding a node: enough for the FILENAME, the ENTRY and the
# usual metadata in one go.
_NODE_WINDOW = 1024
# Children whose records a listing preloads at once: enough to keep every
# connection busy, few enough that the chunks stay in the memory cache.
_LIST_BATCH = 256
# As the kernel's limit on symlinks followed in one path walk.
_MAX_SYMLINKS = 40
_CHECKED_TABLES = 65536
_BIG_TABLE = 10_000 * catar.GOODBYE_ITEM   # goodbye tables sorted in a worker thread


class ByteSource(Protocol):
    size: int

    async def read(self, offset: int, size: int, urgent: bool = True) -> bytes:
        """Bytes ``[offset, offset+size)``, shorter only at the end; not
        ``urgent`` when nobody waits for them yet."""

    async def preload(self, ranges: list[tuple[int, int]], urgent: bool = True) -> None:
        """A hint: these ``(offset, size)`` ranges are about to be read (by
        a reader that waits for them, if ``urgent``)."""


class Archive:
    def __init__(self, source: ByteSource):
        self.source = source
        # Directories whose goodbye tables were checked whole (by offset),
        # and those being checked (offset -> an Event set when done, and
        # where the check's error will be).
        self._checked = cachetools.LRUCache(_CHECKED_TABLES)
        self._checking: dict[int, tuple[trio.Event, list]] = {}

    async def root(self) -> catar.Entry:
        """The root directory (the ENTRY at offset 0)."""
        end = self.source.size
        if end < catar.ENTRY_SIZE + catar.HEADER + catar.GOODBYE_ITEM:
            raise FormatError(f"catar stream of {end} bytes is too short", 0)
        entry = await self._node(0, end, b"")
        if not entry.is_dir:
            raise FormatError("the archive's root is not a directory", 0)
        return entry

    async def _goodbye(self, directory):
        """The start and the bytes of ``directory``'s GOODBYE record."""
        tail = await self._exact(directory.end - catar.GOODBYE_ITEM, catar.GOODBYE_ITEM)
        start = catar.decode_goodbye_tail(tail, directory.end, directory.offset)
        return start, await self._exact(start, directory.end - start)

    async def listdir(self, directory: catar.Entry) -> list[catar.Entry]:
        """The entries of ``directory`` in archive (strcmp) order."""
        return await self.entries((await self.places(directory)).page())

    async def places(self, directory: catar.Entry) -> catar.Places:
        """Where the children of ``directory`` lie, in archive (strcmp) order."""
        start, table = await self._goodbye(directory)
        places = await self._places(table, start, directory.offset)
        self._checked[directory.offset] = True
        return places

    async def _places(self, table, start, dir_offset):
        # A million items take half a second or more: not in the event loop.
        if len(table) < _BIG_TABLE:
            return catar.goodbye_places(table, start, dir_offset)
        return await trio.to_thread.run_sync(catar.goodbye_places, table, start, dir_offset)

    async def entries(self, places: list[tuple[int, int]]) -> list[catar.Entry]:
        """The children at these ``(start, size)`` places, decoded."""
        out = []
        for k in range(0, len(places), _LIST_BATCH):
            batch = places[k:k + _LIST_BATCH]
            await self.source.preload([(start, min(_NODE_WINDOW, size)) for start, size in batch])
            for start, size in batch:
                out.append(await self.child(start, size))
                # Reads served from memory never yield: let other tasks (a
                # FUSE request waiting for this process) in now and then.
                if len(out) % 32 == 0:
                    await trio.lowlevel.checkpoint()
        return out

    async def lookup(self, directory: catar.Entry, name: bytes) -> catar.Entry | None:
        """The child ``name`` of ``directory``, or None."""
        start, table = await self._goodbye(directory)
        for item in catar.goodbye_search(table, start, directory.offset, siphash24(name)):
            child = await self.child(item.start, item.size)
            if child.name == name:
                return child
        # "No such name" is kept by the kernel for a day: said only of a
        # table whose items all lie where they should (the search reads
        # few of them).
        await self._check(table, start, directory.offset)
        return None

    async def _check(self, table, start, dir_offset):
        """Check a goodbye table's places once, also for lookups that come
        while a thread sorts it."""
        while dir_offset not in self._checked:
            checking = self._checking.get(dir_offset)
            if checking is not None:
                done, failed = checking
                await done.wait()
                if failed:
                    raise failed[0]
                continue
            done, failed = self._checking[dir_offset] = trio.Event(), []
            try:
                await self._places(table, start, dir_offset)
                self._checked[dir_offset] = True
            except FormatError as e:
                failed.append(e)
                raise
            finally:
                del self._checking[dir_offset]
                done.set()

    async def child(self, start: int, size: int) -> catar.Entry:
        """Decode the child whose goodbye item says it spans ``size`` bytes
        from ``start`` (its FILENAME, then its node)."""
        buf = await self.source.read(start, min(_NODE_WINDOW, size))
        decoded = catar.decode_filename(buf, start)
        if isinstance(decoded, catar.NeedMore):
            raise FormatError("FILENAME runs past its goodbye item", start)
        name, length = decoded
        return await self._node(start + length, start + size, name, buf[length:])

    async def resolve(self, path: str | bytes, follow: bool = False) -> catar.Entry:
        """The entry at ``path``, relative to the root, resolved the way the
        kernel would: symlinks in the middle are followed (an absolute target
        starts again at the root), ``..`` goes up, and a symlink at the end
        is followed only when ``follow`` is set."""
        if isinstance(path, str):
            path = path.encode("utf-8", "surrogateescape")
        root = await self.root()
        stack, parts, links = [root], deque(path.split(b"/")), 0
        while parts:
            part = parts.popleft()
            if not stack[-1].is_dir:  # "file/", "file/." and "file/.." too
                raise NotFoundError(f"{_show(path)}: not a directory")
            if part in (b"", b"."):
                continue
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            child = await self.lookup(stack[-1], part)
            if child is None:
                raise NotFoundError(f"{_show(path)}: no such file or directory")
            if stat.S_ISLNK(child.mode) and (parts or follow):
                links += 1
                if links > _MAX_SYMLINKS:
                    raise NotFoundError(f"{_show(path)}: too many levels of symbolic links")
                if child.target.startswith(b"/"):
                    del stack[1:]
                parts.extendleft(reversed(child.target.split(b"/")))
                continue
            stack.append(child)
        return stack[-1]

    async def read(self, entry: catar.Entry, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of a regular file's content."""
        if entry.payload is None:
            raise ValueError("not a regular file")
        size = max(0, min(size, entry.size - offset))
        return await self.source.read(entry.payload + offset, size) if size else b""

    async def walk(self, directory: catar.Entry, prefix: bytes = b""):
        """Yield ``(path, entry)`` for everything below ``directory``, depth
        first in archive order; ``path`` is relative and ``/``-joined."""
        for child in await self.listdir(directory):
            path = prefix + child.name
            yield path, child
            if child.is_dir:
                async for item in self.walk(child, path + b"/"):
                    yield item

    async def _node(self, offset, end, name, buf=b""):
        """Decode the node at ``offset``; ``buf``, if given, holds its first
        bytes, and is often all that is needed."""
        if not buf:
            buf = await self._exact(offset, min(_NODE_WINDOW, end - offset))
        while True:
            decoded = catar.decode_node(buf, offset, end, name)
            if not isinstance(decoded, catar.NeedMore):
                return decoded
            # decode_node asks only for bytes inside [offset, end).
            buf = await self._exact(offset, max(decoded.size, min(2 * len(buf), end - offset)))

    async def _exact(self, offset, size):
        buf = await self.source.read(offset, size)
        if len(buf) != size:
            raise FormatError("catar stream is truncated", offset + len(buf))
        return buf


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
