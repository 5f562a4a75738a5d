"""``cafuse prefetch`` against a disk cache slower than the store."""

import io
import logging

from cafuse.diskcache import DiskCache
from cafuse.engine import ChunkEngine
from cafuse.index import Index
from cafuse.prefetch import prefetch
from cafuse.store import LocalStore, chunk_path

from memory import build_index
from test_engine import SlowerDiskCache, Store, cached, chunk


async def test_prefetch_waits_for_a_slow_disk_to_write_every_chunk(tmp_path, caplog):
    # 40 puts of 0.02 s each: the disk is 0.8 s behind when the fetching
    # ends, eight times the quarter of the deadline that a close waits.
    chunks = [chunk(n) for n in range(40)]
    index = Index.parse(build_index([data for _cid, data in chunks], feature_flags=0))
    engine = ChunkEngine([Store("remote", chunks)], "sha256", deadline=0.4,
                         disk=SlowerDiskCache(str(tmp_path), put_takes=0.02))
    with caplog.at_level(logging.WARNING, logger="cafuse"):
        summary = await prefetch(index, engine, io.StringIO())
        await engine.aclose()
    assert summary[0].startswith("Prefetched 40 distinct chunks")
    assert cached(tmp_path).present([cid for cid, _ in chunks]) == {cid for cid, _ in chunks}
    assert not caplog.records


async def test_prefetch_says_what_it_cannot_keep_in_the_cache(tmp_path, caplog):
    chunks = [chunk(n) for n in range(10)]
    local = tmp_path / "local"
    for cid, data in chunks[:4]:
        path = local / chunk_path(cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    index = Index.parse(build_index([data for _cid, data in chunks], feature_flags=0))
    engine = ChunkEngine([LocalStore(str(local)), Store("remote", chunks[4:])], "sha256",
                         disk=DiskCache(str(tmp_path / "cache"), 4000))
    with caplog.at_level(logging.WARNING, logger="cafuse"):
        summary = await prefetch(index, engine, io.StringIO())
        await engine.aclose()
    assert "4 chunks came from local stores or seeds, which are read in place: " \
        "they are not copied into the disk cache." in summary
    assert [r.getMessage() for r in caplog.records] == [
        "the index holds 9.8 KiB, more than the disk cache's bound of 3.9 KiB "
        "(--cache-size): not all of it stays cached"]
