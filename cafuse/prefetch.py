"""``cafuse prefetch``: every chunk of an index into the disk cache."""

import logging
import time
from array import array

import trio

from .engine import ChunkEngine
from .index import Index
from .listing import size_text

log = logging.getLogger("cafuse")

_BATCH_CHUNKS = 16
_WORKERS = 8


async def prefetch(index: Index, engine: ChunkEngine, progress) -> list[str]:
    """Fetch each distinct chunk once, reporting progress to the text stream
    ``progress`` (a line rewritten in place on a terminal, a line every 10 s
    elsewhere); returns the summary lines."""
    chunks, total, batches = _distinct(index)
    done = [0, 0]  # chunks, bytes
    start = time.monotonic()

    async def worker():
        for batch in batches:
            # Not urgent: nobody waits for a chunk, so a disk cache slower
            # than the stores slows the fetching down to its pace.
            await engine.get_many(batch, remember=False, urgent=False)
            done[0] += len(batch)
            done[1] += sum(size for _cid, size in batch)

    async def report_progress():
        tty = progress.isatty()
        while True:
            await trio.sleep(0.2 if tty else 10)
            line = _progress_line(done, chunks, total, time.monotonic() - start)
            progress.write(f"\r{line}\033[K" if tty else line + "\n")
            progress.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report_progress)
        async with trio.open_nursery() as workers:
            for _ in range(_WORKERS):
                workers.start_soon(worker)
        await engine.finish_writes()
        nursery.cancel_scope.cancel()
    if progress.isatty():
        progress.write("\r\033[K")
    return _summary(engine, chunks, total, time.monotonic() - start)


def _distinct(index: Index):
    """Count, bytes, and a lazy iterator of batches of the distinct chunks.

    Memory stays small for huge indexes: chunks are told apart by the first
    8 bytes of their ids (random digests; a collision would only leave one
    chunk unfetched, never serve a wrong one) and batches are made as the
    workers take them.
    """
    seen, firsts = set(), array("Q")
    total = 0
    for i in range(len(index)):
        key = index.chunk_id(i)[:8]
        if key not in seen:
            seen.add(key)
            firsts.append(i)
            total += index.chunk_size(i)
    del seen

    def batches():
        for k in range(0, len(firsts), _BATCH_CHUNKS):
            yield [(index.chunk_id(i), index.chunk_size(i))
                   for i in firsts[k:k + _BATCH_CHUNKS]]
    return len(firsts), total, batches()


def _progress_line(done, chunks, total, elapsed):
    rate = done[1] / elapsed if elapsed else 0
    left = f", {(total - done[1]) / rate:.0f} s left" if rate else ""
    return (f"{done[0]}/{chunks} chunks, {size_text(done[1])} of {size_text(total)}, "
            f"{rate / 1e6:.1f} MB/s{left}")


def _summary(engine, chunks, total, elapsed):
    stats = engine.stats
    lines = [f"Prefetched {chunks} distinct chunks ({size_text(total)}) in {elapsed:.1f} s: "
             f"{total / elapsed / 1e6 if elapsed else 0:.1f} MB/s"]
    for source, count in sorted(stats.sources.items()):
        lines.append(f"  from {source}: {count} chunks")
    lines.append(f"Transferred {size_text(stats.transferred)} from stores.")
    near = sum(count for source, count in stats.sources.items()
               if source not in engine.remote_stores and source not in ("disk cache", "memory"))
    if near:
        lines.append(f"{near} chunks came from local stores or seeds, which are read in place: "
                     f"they are not copied into the disk cache.")
    if engine.disk is not None and total > engine.disk.max_bytes:
        log.warning("the index holds %s, more than the disk cache's bound of %s "
                    "(--cache-size): not all of it stays cached",
                    size_text(total), size_text(engine.disk.max_bytes))
    return lines
