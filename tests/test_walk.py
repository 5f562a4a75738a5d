"""Running ahead of a walk (walk.py), without FUSE: what would be pushed
into the page cache, checked against the archive's own bytes."""

import dataclasses
import os
import shutil
from types import SimpleNamespace

import trio

from cafuse.catar import Entry
from cafuse.errors import CafuseError
from cafuse import walk
from cafuse.mount import LISTED_ENTRIES, PAGED_PLACES, Listings
from cafuse.walk import (PUSH_FILE_MAX, PUSH_FILES, RUN_GAP, WALK_FILES, WALK_GAP, WalkAhead,
                         _runs, node_of)

from reading import open_made


def entry(payload, size):
    return Entry(offset=payload - 100, end=payload + size, name=b"f", feature_flags=0,
                 mode=0o100644, flags=0, uid=0, gid=0, mtime_ns=0, payload=payload,
                 size=size)


def test_runs_group_neighbours_only():
    a, b, c = entry(1000, 10), entry(1010 + RUN_GAP, 5), entry(1015 + 2 * RUN_GAP + 1, 1)
    assert _runs([a, b, c]) == [[a, b], [c]]
    assert _runs([]) == []


def start_walk(ahead, gap=0, size=0):
    """Reads as tar makes them: whole files, each ``gap`` bytes after the
    last (empty ones at offset 0 by default, which skips none of the
    archive's files)."""
    payload = 0
    for _ in range(WALK_FILES + 1):
        e = entry(payload, size)
        ahead.read(None, e, e.payload, e.size)
        payload += size + gap


def test_what_makes_a_walk():
    async def check():
        ahead = WalkAhead(SimpleNamespace(source=None), Listings(LISTED_ENTRIES),
                          Listings(PAGED_PLACES),
                          lambda node: True, lambda *a: True)
        start_walk(ahead, gap=WALK_GAP + 1, size=10)  # modules here and there: no walk
        assert not ahead.walking()
        big = entry(1 << 30, 100 << 20)  # one big file read sequentially: no walk
        for k in range(10):
            ahead.read(None, big, big.payload + k * (1 << 20), 1 << 20)
        assert not ahead.walking()
        start_walk(ahead, gap=300, size=10)
        assert ahead.walking()
    trio.run(check)


def walk_ahead(made, known=lambda node: True, listed=LISTED_ENTRIES):
    """A WalkAhead over a fixture archive, and the stores it makes."""
    inp = open_made(made)
    archive = inp.archive()
    stored = []
    listings = Listings(listed)
    ahead = WalkAhead(archive, listings, Listings(PAGED_PLACES), known,
                      lambda node, offset, data: stored.append((node, offset, bytes(data)))
                      or True)
    return archive, ahead, listings, stored


async def push_root(archive, ahead, listings, first_read: bool):
    """Pretend the kernel listed the root, then (maybe) a forward read."""
    root = await archive.root()
    listings[1] = children = await archive.listdir(root)
    if first_read:
        start_walk(ahead)
    ahead.listed(1, children)
    await run_ahead(ahead)
    return children


async def run_ahead(ahead):
    """Run the walk ahead until it has worked through its queues."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ahead.run)
        await drained(ahead)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def drained(ahead):
    """Wait until the walk ahead has worked through its queues."""
    with trio.fail_after(30):
        while ahead._files or ahead._dirs or ahead._paging:
            await trio.sleep(0.01)


def test_a_walk_gets_the_files_of_what_it_lists(casync_archive):
    made = casync_archive("full")
    archive, ahead, listings, stored = walk_ahead(made)
    children = trio.run(push_root, archive, ahead, listings, True)
    files = {node_of(c): c for c in children
             if c.payload is not None and 0 < c.size <= PUSH_FILE_MAX}
    assert files, "the fixture's root has regular files"
    got = {}
    for node, offset, data in stored:
        got.setdefault(node, bytearray())
        assert offset == len(got[node])  # pieces in order, no holes
        got[node] += data
    assert set(got) == set(files)
    for node, data in got.items():
        assert bytes(data) == (made.tree / os.fsdecode(files[node].name)).read_bytes()
    # Subdirectories were listed ahead of the walk.
    assert all(node_of(c) in listings for c in children if c.is_dir)


def test_no_walk_no_push(casync_archive):
    made = casync_archive("full")
    archive, ahead, listings, stored = walk_ahead(made)
    trio.run(push_root, archive, ahead, listings, False)
    assert stored == []


def test_nodes_the_kernel_does_not_hold_are_not_pushed(casync_archive):
    made = casync_archive("full")
    archive, ahead, listings, stored = walk_ahead(made, known=lambda node: False)
    trio.run(push_root, archive, ahead, listings, True)
    assert stored == []


def test_a_store_outage_costs_the_walk_its_pushes_not_its_life(casync_archive, tmp_path):
    made = casync_archive("full")
    store = tmp_path / "store"
    shutil.copytree(made.store, store)
    archive, ahead, listings, stored = walk_ahead(dataclasses.replace(made, store=store))

    async def check():
        root = await archive.root()
        listings[1] = children = await archive.listdir(root)
        sub = await archive.lookup(await archive.lookup(root, b"dir"), b"sub")
        sub_children = await archive.listdir(sub)
        archive.source.engine._memory.clear()
        store.rename(tmp_path / "away")                     # the store goes down
        start_walk(ahead)
        ahead.listed(1, children)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ahead.run)
            await drained(ahead)
            assert stored == []                              # nothing pushed, nothing wrong
            (tmp_path / "away").rename(store)                # the store is back
            listings[node_of(sub)] = sub_children
            ahead.listed(node_of(sub), sub_children)         # the walk goes on
            with trio.fail_after(30):
                while not stored:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert stored == [(node_of(sub_children[0]), 0, b"deep\n")]
    trio.run(check)


async def walk_into(archive, ahead, listings, name, at_end=False):
    """The walk reads the first files of the large directory ``name`` of
    the root (or ends a streak of reads with its last), which the kernel
    has listed a reply at a time; returns it."""
    root = await archive.root()
    listings[1] = await archive.listdir(root)
    directory = await archive.lookup(root, name)
    ahead.paged[node_of(directory)] = places = await archive.places(directory)
    first = len(places) - WALK_FILES - 1 if at_end else 0
    for e in await archive.entries(places.page(first, WALK_FILES + at_end)):
        ahead.read(node_of(directory), e, e.payload, e.size)
    return directory


def test_a_walk_through_a_directory_too_large_to_list_whole_gets_its_files(casync_archive):
    made = casync_archive("twobigdirs")          # a/ and b/, 1500 files each
    archive, ahead, listings, stored = walk_ahead(made, listed=1000)

    async def check():
        children = await archive.listdir(await walk_into(archive, ahead, listings, b"a"))
        queued = []
        enqueue = ahead._enqueue
        ahead._enqueue = lambda page: queued.append(len(page)) or enqueue(page)
        await run_ahead(ahead)
        return children, queued
    children, queued = trio.run(check)
    pushed = {node: data for node, _offset, data in stored}
    assert pushed == {node_of(c): b"%d\n" % int(c.name[4:]) for c in children[WALK_FILES:]}
    assert max(queued) <= PUSH_FILES        # decoded as the queue ran low, not all at once


def test_a_large_directory_of_subdirectories_is_paged_as_they_are_listed(casync_archive):
    made = casync_archive("manydirs")            # d/ with 1100 subdirectories
    archive, ahead, listings, stored = walk_ahead(made, listed=1000)

    async def check():
        root = await archive.root()
        listings[1] = await archive.listdir(root)
        d = await archive.lookup(root, b"d")
        ahead.paged[node_of(d)] = places = await archive.places(d)
        read = []
        for first in range(WALK_FILES):               # tar reads s00000/f ... s00003/f
            sub = (await archive.entries(places.page(first, 1)))[0]
            read.append(sub)
            f = await archive.lookup(sub, b"f")
            ahead.read(node_of(d), f, f.payload, f.size)
        waiting = []
        enqueue = ahead._enqueue
        ahead._enqueue = lambda page: enqueue(page) or waiting.append(len(ahead._dirs))
        await run_ahead(ahead)
        return waiting, await archive.listdir(d)
    waiting, subdirs = trio.run(check)
    assert max(waiting) <= 2 * PUSH_FILES      # listed as they come, not all queued
    # All were listed ahead; the 1000-entry cache still holds the latest.
    assert all(node_of(sub) in listings for sub in subdirs[-900:])


def test_a_page_that_fails_is_skipped_not_retried(casync_archive):
    made = casync_archive("twobigdirs")
    archive, ahead, listings, stored = walk_ahead(made, listed=1000)

    async def check():
        await walk_into(archive, ahead, listings, b"a")
        calls = []

        async def failing(page):
            calls.append(page[0])
            raise CafuseError("a chunk of these records is missing")
        archive.entries = failing
        await run_ahead(ahead)
        return calls
    calls = trio.run(check)
    assert len(calls) == len(set(calls)) > 1     # each page tried once, the walk went on


def test_a_walk_that_reaches_a_large_directory_at_its_last_child_goes_on(casync_archive):
    made = casync_archive("twobigdirs")
    archive, ahead, listings, stored = walk_ahead(made, listed=1000)

    async def check():
        await walk_into(archive, ahead, listings, b"a", at_end=True)
        assert ahead._paging is None               # nothing after it to page
        with trio.move_on_after(0.5):
            await ahead.run()                      # did not end with an error
    trio.run(check)



def test_children_the_walk_does_not_queue_are_paged_no_further_than_the_stream_ahead(
        casync_archive, monkeypatch):
    made = casync_archive("twobigdirs")
    monkeypatch.setattr(walk, "PUSH_FILE_MAX", 0)       # as if all were too large to push
    monkeypatch.setattr(walk, "STREAM_AHEAD", 16 << 10)
    archive, ahead, listings, stored = walk_ahead(made, listed=1000)

    async def check():
        await walk_into(archive, ahead, listings, b"a")
        ends, entries = [], archive.entries

        async def decoding(places):
            ends.extend(start + size for start, size in places)
            return await entries(places)
        archive.entries = decoding
        with trio.move_on_after(0.5):
            await ahead.run()
        return max(ends) - ahead.position
    beyond = trio.run(check)
    assert beyond < (16 << 10) + PUSH_FILES * 200       # one page past the stream-ahead



def test_a_new_walk_does_not_go_on_with_the_last_ones_directory(casync_archive, monkeypatch):
    made = casync_archive("twobigdirs")
    monkeypatch.setattr(walk, "PUSH_FILE_MAX", 0)       # a/'s files: too large to push
    monkeypatch.setattr(walk, "STREAM_AHEAD", 16 << 10)
    monkeypatch.setattr(walk, "WALK_SECONDS", 0.3)
    archive, ahead, listings, stored = walk_ahead(made, listed=1000)

    async def check():
        a = await walk_into(archive, ahead, listings, b"a")
        b = await archive.lookup(await archive.root(), b"b")
        listings[node_of(b)] = b_children = await archive.listdir(b)
        decoded, entries = [], archive.entries

        async def decoding(places):
            decoded.extend(start for start, _ in places)
            return await entries(places)
        archive.entries = decoding
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ahead.run)
            await trio.sleep(0.6)                       # a/'s walk stops at the gate, ends
            decoded.clear()
            monkeypatch.setattr(walk, "PUSH_FILE_MAX", 1 << 20)
            for e in b_children[:WALK_FILES + 1]:       # a new walk, in b/
                ahead.read(node_of(b), e, e.payload, e.size)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        return [start for start in decoded if a.offset < start < a.end]
    assert trio.run(check) == []
