"""Byte ranges read through an index equal the blob casync chunked."""

import hashlib

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st


import oracle
from reading import open_made


@pytest.fixture(scope="module")
def blob(casync_archive):
    made = casync_archive("blob1m", chunk_size="4K")
    return made, made.tree.read_bytes()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ranges_cross_chunk_boundaries(blob, data):
    made, expect = blob
    stream = open_made(made).source
    offset = data.draw(st.integers(0, len(expect)))
    size = data.draw(st.integers(0, 200_000))
    got = trio.run(stream.read, offset, size)
    assert got == expect[offset:offset + size]
    pieces = []
    trio.run(stream.copy, offset, size, pieces.append)
    assert b"".join(pieces) == expect[offset:offset + size]


def test_concurrent_reads_of_one_chunk_share_one_load(blob):
    made, expect = blob
    stream = open_made(made).source
    loads = []
    store = stream.engine._near_stores[0].store
    real_load = store.load
    store.load = lambda chunk_id: loads.append(chunk_id) or real_load(chunk_id)

    async def run():
        results = [None] * 10
        async with trio.open_nursery() as nursery:
            for k in range(10):
                async def one(k=k):
                    results[k] = await stream.read(100, 50)
                nursery.start_soon(one)
        return results

    assert trio.run(run) == [expect[100:150]] * 10
    assert loads == [stream.index.chunk_id(0)]


def test_whole_stream_digest_matches_casync_digest(blob):
    made, _expect = blob
    stream = open_made(made).source
    digest = hashlib.new("sha512_256")
    trio.run(stream.copy, 0, stream.size, digest.update)
    assert digest.hexdigest() == oracle.digest(made.index, made.store) == made.digest
