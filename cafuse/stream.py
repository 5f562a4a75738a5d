"""Byte sources: the reassembled stream of an index, and a local file.

Both offer ``size`` and ``async read(offset, size)``, the interface the
catar navigation (archive.py) and ``cafuse cat`` read through.
"""

import os
from collections import deque
from collections.abc import Callable

import trio

from .engine import CORES, ChunkEngine
from .errors import CafuseError, single_errors
from .index import Index

_BATCH_BYTES = 2 << 20
# Runs in flight for bulk reads: one per core keeps both busy; more only
# adds contention (measured by integration/bench_cat.py).
_AHEAD = CORES


class IndexStream:
    """The stream an index describes, its chunks from a ChunkEngine."""

    def __init__(self, index: Index, engine: ChunkEngine):
        self.index = index
        self.engine = engine
        self.size = index.size

    def _wanted(self, chunks):
        return [(self.index.chunk_id(i), self.index.chunk_size(i)) for i in chunks]

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """Bytes ``[offset, offset+size)`` if all their chunks are in memory,
        else None: no await, for callers that can answer at once."""
        span = self.index.span(offset, size)
        parts = []
        for i in span:
            data = self.engine.peek(self.index.chunk_id(i))
            if data is None:
                return None
            parts.append(data)
        if not parts:
            return b""
        return _cut(parts, offset - self.index.start(span[0]), size)

    async def read(self, offset: int, size: int, urgent: bool = True) -> bytes:
        """Bytes ``[offset, offset+size)``; not ``urgent`` for reading
        ahead of a reader (engine.get_many)."""
        data = self.read_cached(offset, size)  # the common case: all in memory
        if data is not None:
            return data
        span = self.index.span(offset, size)
        parts = await self.engine.get_many(self._wanted(span), urgent=urgent)
        return _cut(parts, offset - self.index.start(span[0]), size)

    async def preload(self, ranges: list[tuple[int, int]], urgent: bool = True) -> None:
        """Bring the chunks under ``(offset, size)`` ranges into the memory
        cache, all at once: a caller about to read many small ranges then
        waits for one round of concurrent fetches, not one per range.  Not
        ``urgent`` when running ahead of a reader (engine.get_many)."""
        chunks = sorted({i for offset, size in ranges for i in self.index.span(offset, size)})
        if chunks:
            await self.engine.get_many(self._wanted(chunks), urgent=urgent)

    async def copy(self, offset: int, size: int, write: Callable[[bytes], object],
                   ahead: int = _AHEAD) -> None:
        """Pass bytes ``[offset, offset+size)`` to ``write`` in order.

        Chunks are asked for in runs of about 2 MiB (the engine serves a run
        with one worker-thread hop, which costs about as much as decoding a
        small chunk), with up to ``ahead`` runs in flight.  The chunks are
        kept out of the memory cache, which a bulk read would only flush.
        """
        batches = _batches(self.index, self.index.span(offset, size))
        stop = min(offset + size, self.size)
        window = deque()  # (chunks, event, results) per run in flight, in order

        async def load(batch, event, results):
            results.extend(await self.engine.get_many(self._wanted(batch), remember=False))
            event.set()

        def start_next(nursery):
            batch = next(batches, None)
            if batch is not None:
                window.append((batch, trio.Event(), []))
                nursery.start_soon(load, *window[-1])

        with single_errors():
            async with trio.open_nursery() as nursery:
                for _ in range(ahead):
                    start_next(nursery)
                while window:
                    batch, event, results = window.popleft()
                    await event.wait()
                    start_next(nursery)
                    for i, data in zip(batch, results):
                        start, end = self.index.start(i), self.index.end(i)
                        write(data[max(offset, start) - start:min(stop, end) - start])

    async def aclose(self) -> None:
        await self.engine.aclose()


def _cut(parts: list[bytes], start: int, size: int) -> bytes:
    """Bytes ``[start, start+size)`` of the chunks ``parts`` end to end,
    copying only those (a read of 1 MiB across two 64 MiB chunks)."""
    if len(parts) == 1:
        return parts[0][start:start + size]
    views = [memoryview(part) for part in parts]
    views[0] = views[0][start:]
    views[-1] = views[-1][:max(0, size - sum(len(v) for v in views[:-1]))]
    return b"".join(views)


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


class FileSource:
    """A local file (e.g. a .catar) as a byte source."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    async def read(self, offset: int, size: int, urgent: bool = True) -> bytes:
        return os.pread(self._fd, max(0, min(size, self.size - offset)), offset)

    async def preload(self, ranges: list[tuple[int, int]], urgent: bool = True) -> None:
        pass

    async def copy(self, offset: int, size: int, write: Callable[[bytes], object]) -> None:
        stop = min(offset + size, self.size)
        while offset < stop:
            data = os.pread(self._fd, min(1 << 20, stop - offset), offset)
            if not data:
                raise CafuseError(f"{self.path}: file shrank while reading")
            write(data)
            offset += len(data)

    async def aclose(self) -> None:
        os.close(self._fd)
