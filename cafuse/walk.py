"""Running ahead of a walk: files pushed into the kernel's page cache.

A walk of a mounted tree (tar, cp -a, rsync) lists each directory and reads
its files in the order the archive holds them, so once a tree's reads move
forward, what comes next is known: the archive's next bytes, in order,
and among them the rest of the directory being read and the files and
subdirectories of each directory the walk lists.  The next 24 MiB are kept
fetched; those files are written into the page cache with NOTIFY_STORE, in
batches, and those subdirectories are listed before the walk asks: the
walk then reads without a round trip to this process.

The kernel accepts a store only for a node it knows, that is one it was
told of by a listing or lookup; so a directory's files are pushed only
once the walk has listed it.
"""

import heapq
import itertools
import logging
from collections.abc import Callable

import trio

from .archive import Archive
from .catar import Entry
from .errors import CafuseError

log = logging.getLogger("cafuse")

WALK_SECONDS = 2.0           # a walk is over this long after its last sign
WALK_FILES = 4               # files read in archive order, one after the other, make a walk
WALK_GAP = 64 << 10          # bytes between them at most (records, goodbye tables)
PUSH_FILE_MAX = 16 << 20     # larger files are left to readahead
PUSH_BATCH = 4 << 20         # bytes fetched per round
PUSH_FILES = 64              # files per round, at most
PUSH_PIECE = 1 << 20         # bytes per NOTIFY_STORE
STREAM_AHEAD = 24 << 20      # archive bytes kept fetched ahead of a walk
STREAM_RUN = 4 << 20         # fetched at a time
RUN_GAP = 64 << 10           # files this close are read from the stream in one go


def node_of(entry: Entry) -> int:
    return entry.offset + 1


class WalkAhead:
    """Pushes the files a walk is about to read.

    ``listings`` is the file system's cache of decoded directories (node ->
    children in archive order), ``paged`` that of the places (``Places``)
    of directories too large for it; ``known(node)`` tells whether the kernel
    holds a node; ``store(node, offset, data)`` writes into its page cache
    and may block (it runs in a worker thread: the kernel may hold a page
    locked for a READ that only the request loop can answer).
    """

    def __init__(self, archive: Archive, listings, paged, known: Callable[[int], bool],
                 store: Callable[[int, int, bytes], bool]):
        self.archive = archive
        self.stream = archive.source
        self.listings = listings
        self.paged = paged
        self.known = known
        self.store = store
        self.read_end = 0             # where the walk's last read ended
        self._until = 0.0             # the walk is on until then
        self._files: list = []        # heap of (payload offset, seq, entry)
        self._dirs: list = []         # heap of (offset, seq, entry) to list early
        self._queued = set()          # directories whose files were queued
        self._paging = None           # (Places, next child) of a large one, queued in turn
        self._seq = itertools.count()
        self._wanted = trio.Event()
        self._storing = trio.CapacityLimiter(1)
        self.position = 0             # how far into the archive the walk has got
        self._fetched = 0             # the archive is fetched up to here for it
        self._last_file_end = -1      # where the file read last from its start ends
        self._streak = 0              # files read in a row, each just after the last
        self._moved = trio.Event()

    def walking(self) -> bool:
        return trio.current_time() < self._until

    def read(self, directory: int | None, entry: Entry, offset: int, size: int) -> None:
        """A tree read of ``entry`` (in ``directory``): archive bytes
        ``[offset, offset+size)``.  A walk is a run of WALK_FILES files,
        each read from its start, each starting at most WALK_GAP bytes
        after the one before ended: tar does that, a program loading a
        few modules or libraries does not."""
        self.read_end = offset + size
        if offset == entry.payload:
            follows = 0 <= entry.payload - self._last_file_end <= WALK_GAP
            self._streak = self._streak + 1 if follows else 0
            self._last_file_end = entry.payload + entry.size
        if self._streak < WALK_FILES:
            return
        if not self.walking():  # a new walk, from here: nothing of the last
            self.position = self._fetched = offset + size
            self._forget()
        self._until = trio.current_time() + WALK_SECONDS
        self._advance(offset + size)
        if directory is None or directory in self._queued:
            return
        children = self.listings.get(directory)
        if children is not None:
            start = next((k for k, c in enumerate(children) if c.offset > entry.offset),
                         len(children))
            self._queue(directory, children[start:])
        elif (places := self.paged.get(directory)) is not None:
            # Too large to queue at once: its children are decoded as the
            # queue runs low.
            self._queued.add(directory)
            first = places.after(entry.offset)
            if first < len(places):
                self._paging = (places, first)
                self._wanted.set()

    def _advance(self, offset: int) -> None:
        if offset > self.position:
            self.position = offset
            self._moved.set()
            if self._paging is not None:
                self._wanted.set()

    def listed(self, directory: int, children: list[Entry]) -> None:
        """The kernel just asked for the start of a directory's listing."""
        if self.walking() and children:
            self._advance(children[0].offset)
        if self.walking() and directory not in self._queued:
            self._until = trio.current_time() + WALK_SECONDS
            self._queue(directory, children)

    def _queue(self, directory, children):
        self._queued.add(directory)
        self._enqueue(children)
        self._wanted.set()

    def _enqueue(self, children):
        for child in children:
            if child.payload is not None and 0 < child.size <= PUSH_FILE_MAX:
                heapq.heappush(self._files, (child.payload, next(self._seq), child))
            elif child.is_dir and not self._listed(node_of(child)):
                heapq.heappush(self._dirs, (child.offset, next(self._seq), child))

    def _listed(self, node):
        return node in self.listings or node in self.paged

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stream_ahead)
            await self._run()

    async def _stream_ahead(self):
        """While a walk lasts, keep the archive's next STREAM_AHEAD bytes
        fetched: listings and files alike come from them, in this order."""
        while True:
            start = max(self._fetched, self.position)
            size = min(STREAM_RUN, self.stream.size - start,
                       self.position + STREAM_AHEAD - start)
            if not self.walking() or size <= 0:
                await self._moved.wait()
                self._moved = trio.Event()
                continue
            try:
                await self.stream.preload([(start, size)], urgent=False)
            except CafuseError:
                pass  # whoever needs these bytes will say
            self._fetched = start + size

    async def _run(self) -> None:
        """Work through the queues in archive order while the walk lasts."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            while (self._files or self._dirs or self._page_due()) and self.walking():
                try:
                    await self._step()
                except CafuseError as e:
                    log.info("running ahead of a walk: %s", e)
                except Exception as e:  # only an optimisation: never the mount's end
                    log.error("running ahead of a walk failed: %r", e)
                    self._until = 0.0
                await trio.lowlevel.checkpoint()
            if not self.walking():
                self._forget()

    def _forget(self):
        """Drop what a walk had queued."""
        self._files.clear()
        self._dirs.clear()
        self._queued.clear()
        self._paging = None

    def _page_due(self) -> bool:
        """Whether the next children of a large directory are to be queued:
        the queues run low, and when they are empty (its children may be
        files too large to push, or symlinks) the next lies within the
        stream-ahead."""
        if self._paging is None or len(self._files) + len(self._dirs) >= PUSH_FILES:
            return False
        if self._files or self._dirs:
            return True
        places, first = self._paging
        return places.page(first, 1)[0][0] < self.position + STREAM_AHEAD

    async def _step(self):
        if self._page_due():
            places, first = self._paging
            end = min(first + PUSH_FILES, len(places))
            self._paging = (places, end) if end < len(places) else None  # even if it fails
            self._enqueue(await self.archive.entries(places.page(first, end - first)))
            return
        if self._dirs and (not self._files or self._dirs[0][0] < self._files[0][0]):
            # The walk lists this directory next: list it now.
            directory = heapq.heappop(self._dirs)[2]
            node = node_of(directory)
            if not self._listed(node):
                places = await self.archive.places(directory)
                if len(places) <= self.listings.max_entries:
                    self.listings[node] = await self.archive.entries(places.page())
                else:  # listed a reply at a time
                    self.paged[node] = places
            return
        batch = self._take()
        if batch:
            self._advance(batch[0].payload)
            await self._push(batch)

    def _take(self) -> list[Entry]:
        """The next batch of files, less those the walk has read itself."""
        batch, total = [], 0
        while self._files and total < PUSH_BATCH and len(batch) < PUSH_FILES:
            entry = heapq.heappop(self._files)[2]
            if entry.payload + entry.size > self.read_end:
                batch.append(entry)
                total += entry.size
        return batch

    async def _push(self, batch):
        await self.stream.preload([(e.payload, e.size) for e in batch], urgent=False)
        files = []
        for run in _runs([e for e in batch if self.known(node_of(e))]):
            start = run[0].payload
            data = await self.stream.read(start, run[-1].payload + run[-1].size - start,
                                          urgent=False)
            await trio.lowlevel.checkpoint()  # a FUSE request may be waiting
            view = memoryview(data)
            files.extend((e, view[e.payload - start:e.payload - start + e.size]) for e in run)
        await trio.to_thread.run_sync(self._store_all, files, limiter=self._storing)

    def _store_all(self, files):
        stored = 0
        for entry, data in files:
            if entry.payload + entry.size <= self.read_end:
                continue  # the walk got there first
            for piece in range(0, len(data), PUSH_PIECE):
                if not self.store(node_of(entry), piece, data[piece:piece + PUSH_PIECE]):
                    break
            else:
                stored += 1
        log.debug("pushed %d of %d files ahead of a walk", stored, len(files))


def _runs(files: list[Entry]) -> list[list[Entry]]:
    """Files (in archive order) grouped where each starts close to the end
    of the one before: one stream read for each group."""
    runs: list[list[Entry]] = []
    for entry in files:
        if runs and entry.payload - (runs[-1][-1].payload + runs[-1][-1].size) <= RUN_GAP:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs
