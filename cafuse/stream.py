"""Byte sources: the reassembled stream of an index, and a local file.

Both offer ``size`` and ``async read(offset, size)``, the interface the
catar navigation (archive.py) and ``cafuse cat`` read through.
"""

import os
from collections import deque
from collections.abc import Callable

import cachetools
import trio

from . import chunk
from .errors import CafuseError, ChunkError, single_errors
from .index import Index

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class IndexStream:
    """The stream an index describes, assembled from chunk stores.

    Chunks are looked for in ``stores`` in order, decompressed and verified
    in worker threads (zstd and hashlib release the GIL), and kept in a
    memory LRU bounded to ``cache_bytes``.  Concurrent reads of one chunk
    share one load.
    """

    def __init__(self, index: Index, stores, cache_bytes=DEFAULT_CACHE_BYTES,
                 threads: int = 4):
        self.index = index
        self.stores = list(stores)
        self.size = index.size
        self._cache = cachetools.LRUCache(cache_bytes, getsizeof=len)
        self._loading: dict[int, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(threads)

    async def read(self, offset: int, size: int) -> bytes:
        span = self.index.span(offset, size)
        if not span:
            return b""
        if len(span) == 1:
            data = await self.chunk(span[0])
            start = offset - self.index.start(span[0])
            return data[start:start + size]
        parts = {}

        async def fetch(i):
            parts[i] = await self.chunk(i)

        with single_errors():
            async with trio.open_nursery() as nursery:
                for i in span:
                    nursery.start_soon(fetch, i)
        data = b"".join(parts[i] for i in span)
        start = offset - self.index.start(span[0])
        return data[start:start + size]

    async def copy(self, offset: int, size: int, write: Callable[[bytes], object],
                   ahead: int = 4) -> None:
        """Pass bytes ``[offset, offset+size)`` to ``write`` in order.

        Chunks load in batches of about ``_BATCH_BYTES``, one worker-thread
        hop per batch (a hop costs about as much as decoding a small chunk),
        with up to ``ahead`` batches in flight.  Bypasses the memory cache.
        """
        batches = _batches(self.index, self.index.span(offset, size))
        stop = min(offset + size, self.size)
        window = deque()  # (event, results) per batch in flight, in order

        async def load(batch, slot):
            slot[1].extend(await trio.to_thread.run_sync(
                lambda: [self._load(i) for i in batch], limiter=self._limiter))
            slot[0].set()

        def start_next(nursery):
            batch = next(batches, None)
            if batch is not None:
                slot = (trio.Event(), [])
                window.append((batch, slot))
                nursery.start_soon(load, batch, slot)

        with single_errors():
            async with trio.open_nursery() as nursery:
                for _ in range(ahead):
                    start_next(nursery)
                while window:
                    batch, (event, results) = window.popleft()
                    await event.wait()
                    start_next(nursery)
                    for i, data in zip(batch, results):
                        start, end = self.index.start(i), self.index.end(i)
                        write(data[max(offset, start) - start:min(stop, end) - start])

    async def chunk(self, i: int) -> bytes:
        """The verified bytes of chunk ``i``."""
        data = self._cache.get(i)
        if data is not None:
            return data
        loading = self._loading.get(i)
        if loading is not None:
            await loading.wait()
            return await self.chunk(i)
        self._loading[i] = event = trio.Event()
        try:
            data = await trio.to_thread.run_sync(self._load, i, limiter=self._limiter)
            self._cache[i] = data
        finally:
            del self._loading[i]
            event.set()
        return data

    def _load(self, i: int) -> bytes:
        """Find chunk ``i`` in the stores and decode it (blocking)."""
        chunk_id, size = self.index.chunk_id(i), self.index.chunk_size(i)
        problems = []
        for store in self.stores:
            found = store.load(chunk_id)
            if found is None:
                continue
            try:
                return chunk.decode(*found, chunk_id, size, self.index.digest)
            except ChunkError as e:
                problems.append(f"{e} in {store}")
        if problems:
            raise ChunkError("; ".join(problems))
        where = ", ".join(str(s) for s in self.stores)
        raise ChunkError(f"chunk {chunk_id.hex()} (stream bytes "
                         f"{self.index.start(i)}..{self.index.end(i)}) is missing "
                         f"from {where}")


class FileSource:
    """A local file (e.g. a .catar) as a byte source."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    async def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, max(0, min(size, self.size - offset)), offset)

    async def copy(self, offset: int, size: int, write: Callable[[bytes], object]) -> None:
        stop = min(offset + size, self.size)
        while offset < stop:
            data = os.pread(self._fd, min(1 << 20, stop - offset), offset)
            if not data:
                raise CafuseError(f"{self.path}: file shrank while reading")
            write(data)
            offset += len(data)

    def close(self) -> None:
        os.close(self._fd)


_BATCH_BYTES = 1 << 20


def _batches(index: Index, span: range):
    """Consecutive runs of chunks from ``span``, each about _BATCH_BYTES."""
    batch, size = [], 0
    for i in span:
        batch.append(i)
        size += index.chunk_size(i)
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
