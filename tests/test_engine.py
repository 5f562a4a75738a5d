"""The chunk engine's rules, with stores and a disk cache that misbehave on
cue: when a store is set aside, when the disk cache is given up, and that
one load of a chunk serves every reader waiting for it."""

import contextlib
import hashlib
import logging
import math
import os
import socket
import threading
import time

import pytest
import trio

from cafuse import chunk as chunk_module
from cafuse.diskcache import DiskCache, DiskFull
from cafuse.engine import DISK_FAILURES, FAILURE_MEMORY, ChunkEngine, _DiskWriter
from cafuse.errors import CafuseError, ChunkError
from cafuse.http import HTTPError
from cafuse.index import Index
from cafuse.seed import Seed
from cafuse.slots import Priority, Slots
from cafuse.store import HTTPOptions, HTTPStore, LocalStore, chunk_path

from memory import build_index
from servers import FaultServer


def chunk(n: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = n.to_bytes(4, "big") * (size // 4)
    return hashlib.sha256(data).digest(), data


class Store:
    """A remote store: serves its chunks, or does what ``fault`` says for
    a chunk id (an exception to raise, or "stall")."""
    blocking = False

    def __init__(self, name, chunks, fault=lambda cid, n: None, delay=0.0):
        self.name, self.chunks, self.fault, self.delay = name, dict(chunks), fault, delay
        self.calls: list[bytes] = []

    def __str__(self):
        return self.name

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        if held is not None:   # a connection at once
            held()
        self.calls.append(cid)
        what = self.fault(cid, self.calls.count(cid))
        if what == "stall":
            await trio.sleep(math.inf)
        if isinstance(what, Exception):
            raise what
        await trio.sleep(self.delay)
        return (self.chunks[cid], False) if cid in self.chunks else None

    async def aclose(self):
        pass


class TimesOut(Store):
    """Its tries get no answer within ``after`` seconds (a --timeout), as
    from a server that sends half a body and stalls; with ``first``, only
    its tries while other stores are left (its full tries answer)."""

    def __init__(self, name, chunks, after, first=False):
        super().__init__(name, chunks)
        self.after, self.first = after, first

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        began = trio.current_time()
        held()
        self.calls.append(cid)
        if others_left or not self.first:
            await trio.sleep(self.after)
            raise HTTPError(f"{self.name}: no answer within {self.after:g} s", True, began)
        return (self.chunks[cid], False) if cid in self.chunks else None


class Staggered(Store):
    """Serves each chunk after its own delay (``delays``, else ``rest``);
    refuses ``refused`` and serves ``corrupt`` wrong, if any."""

    def __init__(self, chunks, delays, refused=None, corrupt=None, rest=0.0, name="remote"):
        super().__init__(name, chunks)
        self.delays, self.refused, self.corrupt, self.rest = delays, refused, corrupt, rest

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        if held is not None:   # a connection at once
            held()
        self.calls.append(cid)
        await trio.sleep(self.delays.get(cid, self.rest))
        if cid == self.refused:
            raise HTTPError("HTTP 403", retryable=False)
        if cid == self.corrupt:
            return b"garbage", False
        return (self.chunks[cid], False) if cid in self.chunks else None


def engine(stores, deadline=10.0, **kw):
    return ChunkEngine(stores, "sha256", backoff=60.0, deadline=deadline, **kw)


async def written(eng):
    """Once the disk cache writer has made every call queued so far."""
    with trio.fail_after(5):
        while not eng._writer.idle():
            await trio.sleep(0.005)


async def test_one_chunks_refusal_does_not_set_the_store_aside():
    (a, da), (b, db) = chunk(1), chunk(2)
    refused = HTTPError("HTTP 403", retryable=False)
    store = Store("s", [(a, da), (b, db)], lambda cid, n: refused if cid == a else None)
    eng = engine([store])
    with pytest.raises(ChunkError, match="403"):
        await eng.get(a, len(da))
    assert await eng.get(b, len(db)) == db


async def test_the_last_store_left_is_never_set_aside():
    (a, da), (b, db) = chunk(1), chunk(2)
    down = HTTPError("connection refused", retryable=True)
    store = Store("s", [(a, da), (b, db)], lambda cid, n: down if cid == a else None)
    eng = engine([store])
    with pytest.raises(ChunkError, match="refused"):
        await eng.get(a, len(da))
    assert await eng.get(b, len(db)) == db       # asked, not skipped


async def test_a_store_that_looks_down_is_skipped_while_another_is_left():
    chunks = [chunk(n) for n in range(20)]
    first = chunks[0][0]

    def fault(cid, n):
        # The first chunk fails; every other request waits for ever (a
        # dead server): queued and waiting fetches must give up at once.
        return HTTPError("timed out", retryable=True) if cid == first else "stall"
    dead, good = Store("dead", chunks, fault, delay=0), Store("good", chunks)
    eng = engine([dead, good])
    with trio.fail_after(5):
        got = await eng.get_many([(cid, len(d)) for cid, d in chunks])
    assert got == [d for _cid, d in chunks]
    assert eng.stats.sources["good"] == 20
    calls = len(dead.calls)
    more = [chunk(n) for n in range(20, 30)]
    dead.chunks.update(more); good.chunks.update(more)
    await eng.get_many([(cid, len(d)) for cid, d in more])
    assert len(dead.calls) == calls              # set aside: not asked again


async def test_a_chunk_no_store_answered_in_time_names_the_stores_asked():
    (a, da), = [chunk(1)]
    eng = engine([Store("hung", [(a, da)], lambda cid, n: "stall")], deadline=0.2)
    with pytest.raises(ChunkError, match="no answer from hung; not delivered within 0.2 s"):
        await eng.get(a, len(da))


class Portal(Store):
    """Answers every chunk but those it ``serves`` with an HTML page, as a
    captive portal or a proxy's error page would, 200 OK."""

    def __init__(self, chunks, serves=()):
        super().__init__("portal", chunks)
        self.serves = set(serves)

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        if cid in self.serves:
            return await super().fetch(cid, priority, others_left, held)
        if held is not None:
            held()
        self.calls.append(cid)
        return b"<html><body>Please log in</body></html>", False


async def test_a_store_whose_copies_keep_failing_verification_is_set_aside(caplog):
    from cafuse.engine import CORRUPT_IN_A_ROW
    chunks = [chunk(n) for n in range(20)]
    only = chunk(20)
    portal = Portal(chunks + [only], serves=[only[0]])
    eng = engine([portal, Store("mirror", chunks)])
    with caplog.at_level(logging.WARNING, logger="cafuse"):
        for c in chunks:
            assert await eng.get(*_want(c)) == c[1]
        assert len(portal.calls) == CORRUPT_IN_A_ROW
        assert await eng.get(*_want(only)) == only[1]  # its last try: none other has it
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        f"chunk {chunks[0][0].hex()}: 39 bytes, index says 1000 (portal); served by mirror "
        "instead",
        f"{CORRUPT_IN_A_ROW} answers in a row did not match their chunk ids; setting store "
        "portal aside for 60 s"]


async def test_a_store_whose_copies_fail_again_on_its_return_is_set_aside_for_longer(caplog):
    chunks = [chunk(n) for n in range(6)]
    eng = ChunkEngine([Portal(chunks), Store("mirror", chunks)], "sha256", backoff=0.05)
    with caplog.at_level(logging.WARNING, logger="cafuse"), trio.fail_after(2):
        for c in chunks[:3]:
            assert await eng.get(*_want(c)) == c[1]
        while not eng._far_stores[0].available():
            await trio.sleep(0.01)
        for c in chunks[3:]:
            assert await eng.get(*_want(c)) == c[1]
    assert caplog.records[-1].getMessage().endswith("setting store portal aside for 0.1 s")


async def test_a_stores_corrupt_copies_are_warned_of_once_then_counted(caplog, monkeypatch):
    from cafuse import engine as engine_module
    monkeypatch.setattr(engine_module, "CORRUPT_WARN_EVERY", 0.5)
    chunks = [chunk(n) for n in range(11)]
    # Every other copy is good: never enough in a row to set it aside.
    flaky = Portal(chunks, serves=[cid for cid, _d in chunks[1::2]])
    eng = engine([flaky, Store("mirror", chunks)])
    with caplog.at_level(logging.WARNING, logger="cafuse"):
        for c in chunks[:-1]:
            assert await eng.get(*_want(c)) == c[1]
        await trio.sleep(0.5)
        assert await eng.get(*_want(chunks[-1])) == chunks[-1][1]
    assert len(flaky.calls) == len(chunks)        # never set aside
    assert [r.getMessage() for r in caplog.records] == [
        f"chunk {chunks[0][0].hex()}: 39 bytes, index says 1000 (portal); served by mirror "
        "instead",
        f"chunk {chunks[-1][0].hex()}: 39 bytes, index says 1000 (portal); served by mirror "
        "instead (4 more from portal since the last warning)"]


async def test_corrupt_copies_left_untold_are_counted_at_the_close(caplog):
    chunks = [chunk(n) for n in range(5)]
    flaky = Portal(chunks, serves=[cid for cid, _d in chunks[1::2]])
    eng = engine([flaky, Store("mirror", chunks)])
    with caplog.at_level(logging.WARNING, logger="cafuse"):
        for c in chunks:
            assert await eng.get(*_want(c)) == c[1]
        await eng.aclose()
    assert [r.getMessage() for r in caplog.records][1:] == [
        "2 more copies from portal did not match their chunk ids since the last warning; "
        "other stores served those chunks"]


async def test_a_store_whose_name_begins_the_problem_is_still_named():
    (x, dx), = [chunk(1)]
    eng = engine([Staggered([(x, dx)], {}, corrupt=x, name="7")])
    with pytest.raises(ChunkError, match=r": 7 bytes, index says 1000 \(7\)"):
        await eng.get(x, len(dx))


async def test_a_corrupt_copy_is_a_warning_only_if_another_store_serves_the_chunk(caplog):
    (x, dx), (y, dy) = chunk(1), chunk(2)
    bad = Staggered([(x, dx), (y, dy)], {}, corrupt=x, name="bad")
    with caplog.at_level(logging.WARNING, logger="cafuse"):
        with pytest.raises(ChunkError, match=r": 7 bytes, index says 1000 \(bad\)$"):
            await engine([bad]).get(x, len(dx))
        assert caplog.records == []
        mirror = Staggered([(x, dx)], {}, name="mirror")
        assert await engine([bad, mirror]).get(x, len(dx)) == dx
    assert [r.getMessage() for r in caplog.records] == [
        f"chunk {x.hex()}: 7 bytes, index says 1000 (bad); served by mirror instead"]


async def behind_a_hung_store(tmp_path, chunks, options, deadline):
    """``chunks`` got from a hung HTTP store (it connects, never answers)
    followed by a local store that has them."""
    for cid, data in chunks:
        path = tmp_path / chunk_path(cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        dead = HTTPStore(f"http://127.0.0.1:{hole.getsockname()[1]}", options)
        eng = ChunkEngine([dead, LocalStore(str(tmp_path))], "sha256", deadline=deadline,
                          backoff=60.0)
        try:
            return await eng.get_many([_want(c) for c in chunks])
        finally:
            await eng.aclose()


async def test_a_dead_store_with_a_queue_is_set_aside_within_the_deadline(tmp_path):
    # More chunks than connections: the first requests' failure sets the
    # store aside, and the queued ones move on, before the chunks' deadline.
    chunks = [chunk(n) for n in range(8)]
    options = HTTPOptions(connections=2, timeout=0.2, retries=3, backoff=0.01)
    with trio.fail_after(5):
        assert await behind_a_hung_store(tmp_path, chunks, options, 1.5) == \
            [d for _cid, d in chunks]


async def test_a_hung_store_hands_its_chunk_on_after_one_timeout(tmp_path):
    # Four tries of 0.4 s would outlast the 1 s deadline: with another
    # store left, a request that timed out is not tried again.
    chunks = [chunk(n) for n in range(4)]
    options = HTTPOptions(timeout=0.4, retries=3, backoff=0.01)
    with trio.fail_after(0.8):
        assert await behind_a_hung_store(tmp_path, chunks, options, 1.0) == \
            [d for _cid, d in chunks]


async def test_a_hung_store_hands_its_chunks_on_within_a_deadline_below_its_timeout(
        tmp_path):
    # No try times out within the 2 s deadline: the next store is asked
    # once a request has held a connection for a quarter of it.
    chunks = [chunk(n) for n in range(20)]
    options = HTTPOptions(connections=2, timeout=10.0, retries=3, backoff=0.01)
    with trio.fail_after(1.5):
        assert await behind_a_hung_store(tmp_path, chunks, options, 2.0) == \
            [d for _cid, d in chunks]


async def test_a_slow_store_keeps_its_request_while_the_next_is_asked():
    # The mirror lacks x: the first store's answer, 0.6 s after the
    # request (the next store was asked at 0.25 s), is not lost.
    (x, dx), = [chunk(1)]
    slow, partial = Staggered([(x, dx)], {x: 0.6}, name="slow"), Store("partial", [])
    eng = engine([slow, partial], deadline=1.0)
    with trio.fail_after(0.9):
        assert await eng.get(x, len(dx)) == dx
    assert slow.calls == [x] and partial.calls == [x]


async def test_the_first_store_to_deliver_wins():
    (x, dx), = [chunk(1)]
    slow, mirror = Staggered([(x, dx)], {x: 5.0}, name="slow"), Staggered([(x, dx)], {x: 0.1})
    eng = engine([slow, mirror], deadline=2.0)
    start = trio.current_time()
    assert await eng.get(x, len(dx)) == dx
    assert trio.current_time() - start < 1.0
    assert eng.stats.sources["remote"] == 1


async def test_requests_queued_for_a_connection_are_not_raced():
    # One connection, 0.2 s a chunk: the last of ten chunks waits 1.8 s
    # for it, past a quarter of the deadline, but holds it only 0.2 s.
    chunks = [chunk(n) for n in range(10)]
    one_line, mirror = OneLineStore("one line", chunks, delay=0.2), Store("mirror", chunks)
    eng = engine([one_line, mirror], deadline=4.0)
    assert await eng.get_many([_want(c) for c in chunks]) == [d for _c, d in chunks]
    assert mirror.calls == []


async def test_a_store_outrun_with_no_answer_since_is_set_aside_and_asked_last():
    # y: the slow store is outrun by the mirror, and has answered nothing
    # since it was asked: it is set aside.  z, which only it has, is still
    # asked of it, last.
    (y, dy), (z, dz) = chunk(1), chunk(2)
    slow = Staggered([(y, dy), (z, dz)], {y: 5.0, z: 0.3}, name="slow")
    mirror = Staggered([(y, dy)], {y: 0.05}, name="mirror")
    eng = engine([slow, mirror], deadline=2.0)
    assert await eng.get(y, len(dy)) == dy
    assert not eng._far_stores[0].available()
    with trio.fail_after(1.5):
        assert await eng.get(z, len(dz)) == dz


async def test_a_corrupt_copy_from_the_next_store_does_not_cost_a_slow_store_its_request():
    # slow needs 1.2 s of the 1.5 s deadline; the next store answers at
    # once, with a corrupt copy, after the race starts at 0.375 s: it must
    # not win (slow's request, restarted, would miss the deadline).
    (x, dx), = [chunk(1)]
    slow = Staggered([(x, dx)], {x: 1.2}, name="slow")
    corrupt = Staggered([(x, dx)], {x: 0.0}, corrupt=x, name="corrupt")
    eng = engine([slow, corrupt], deadline=1.5)
    assert await eng.get(x, len(dx)) == dx
    assert slow.calls == [x]


async def test_an_outrun_slow_store_keeps_its_other_requests_in_flight():
    # y and z need 1.6 s of a 2 s deadline from the slow store, both in
    # flight from 0 s; the mirror, with y only, is asked at 0.5 s and
    # wins y.  The slow store, silent since 0 s, is set aside, but z's
    # request, which holds a connection, goes on.
    (y, dy), (z, dz) = chunk(1), chunk(2)
    slow = Staggered([(y, dy), (z, dz)], {y: 1.6, z: 1.6}, name="slow")
    mirror = Staggered([(y, dy)], {y: 0.05}, name="mirror")
    eng = engine([slow, mirror], deadline=2.0)
    got = {}

    async def get(cid, data):
        got[cid] = await eng.get(cid, len(data))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(get, y, dy)
        nursery.start_soon(get, z, dz)
    assert got == {y: dy, z: dz}
    assert sorted(slow.calls) == sorted([y, z])     # each asked once, in either order


async def test_a_raced_request_cancelled_by_the_win_does_not_set_its_store_aside_later():
    # Three stores, deadline 1 s (hedge 0.25 s).  x: "slow" is raced at
    # 0.25 s, so "mirror" is asked (itself raced, "last" following); slow
    # answers x at 0.35 s and wins, which cancels mirror's request.  The
    # load goes on (y comes from "last" at 0.8 s).  Mirror's cancelled
    # request stays in the hedger's heap as not done, and fires at 0.5 s:
    # mirror, a healthy store, is set aside for 60 s.
    (x, dx), (y, dy) = chunk(1), chunk(2)
    slow = Staggered([(x, dx)], {x: 0.35, y: 0.0}, name="slow")
    mirror = Staggered([(x, dx)], {x: 1.0, y: 0.0}, name="mirror")
    last = Staggered([(x, dx), (y, dy)], {x: 0.0, y: 0.8}, name="last")
    eng = engine([slow, mirror, last], deadline=1.0)
    with trio.fail_after(2):
        assert await eng.get_many([(x, len(dx)), (y, len(dy))]) == [dx, dy]
    assert eng._far_stores[1].available(), "mirror was set aside, never having failed"


async def test_a_copy_verified_while_it_raced_is_not_decoded_again(monkeypatch):
    (x, dx), = [chunk(1)]
    hung = Store("hung", [(x, dx)], lambda cid, n: "stall")    # raced at 0.25 s
    mirror = Store("mirror", [(x, dx)])
    eng = engine([hung, mirror], deadline=1.0)
    decoded = []
    decode = chunk_module.decode
    monkeypatch.setattr(chunk_module, "decode",
                        lambda *args: decoded.append(args[2]) or decode(*args))
    with trio.fail_after(2):
        assert await eng.get(x, len(dx)) == dx
    assert decoded == [x]


async def test_a_raced_store_that_never_answered_is_named_in_the_error():
    # A hung store is raced at 0.25 s by a mirror that lacks the chunk;
    # the chunk then fails at the deadline.  The error must name the hung
    # store, which is where the chunk was stuck.
    (x, dx), = [chunk(1)]
    hung = Store("hung", [(x, dx)], lambda cid, n: "stall")
    mirror = Store("mirror", [])
    eng = engine([hung, mirror], deadline=1.0)
    with trio.fail_after(2), pytest.raises(ChunkError) as caught:
        await eng.get(x, len(dx))
    assert "hung" in str(caught.value), str(caught.value)


async def test_a_slow_stores_queued_requests_are_not_lost_to_a_hung_next_store():
    # A slow but working store with one connection: 0.6 s a chunk, within
    # the 2 s deadline even for the second chunk, queued behind the first
    # (delivered at 1.2 s before 9088f22).  At 0.5 s the first request is
    # raced and the store, silent since, is set aside: the queued request
    # is cancelled and goes to the next store, which hangs, so it never
    # gets its last try on the slow store and fails at the deadline.
    chunks = [chunk(1), chunk(2)]
    slow = OneLineStore("slow", chunks, delay=0.6)
    hung = Store("hung", [], lambda cid, n: "stall")
    eng = engine([slow, hung], deadline=2.0)
    with trio.fail_after(3):
        assert await eng.get_many([(c, len(d)) for c, d in chunks]) == [d for _c, d in chunks]


async def test_a_store_searched_in_the_race_is_not_asked_again_after_a_corrupt_copy():
    # slow is raced at 0.25 s; the mirror's copy is corrupt, so the search
    # ends.  slow's own copy, at 0.5 s, is corrupt too: it "wins" unverified
    # (nothing races it any more), fails to decode, and the chunk is then
    # searched again from the mirror on: the mirror is asked twice and
    # named twice in the error.
    (x, dx), = [chunk(1)]
    slow = Staggered([(x, dx)], {x: 0.5}, corrupt=x, name="slow")
    mirror = Staggered([(x, dx)], {x: 0.0}, corrupt=x, name="mirror")
    eng = engine([slow, mirror], deadline=1.0)
    with trio.fail_after(1.5), pytest.raises(ChunkError) as caught:
        await eng.get(x, len(dx))
    assert str(caught.value).count("(mirror)") == 1, str(caught.value)
    assert mirror.calls == [x]


async def test_a_queued_request_asked_while_the_next_stores_were_aside_moves_on():
    # A: one connection, hung; y holds it.  B is set aside for 0.15 s
    # (a burst of 503s), so x, asked of A meanwhile, is asked with no other
    # store left: no race hook.  B is back at 0.16 s.  At 0.25 s y is raced
    # and A, silent since, is set aside "for not answering": before
    # 8f06653 that cancelled x's queued request, which moved on to B; now
    # it stays queued on the hung store (and takes the connection y's win
    # frees), unraced, until its deadline.
    (x, dx), (y, dy) = chunk(1), chunk(2)
    a = OneLineStore("A", [(x, dx), (y, dy)], delay=0.0)
    a.fault = lambda cid, n: "stall"              # hung
    b = Store("B", [(x, dx), (y, dy)])
    eng = engine([a, b], deadline=1.0)
    got = {}

    async def get(cid, data):
        got[cid] = await eng.get(cid, len(data))
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, y, dy)
            await trio.sleep(0.01)
            eng._far_stores[1].set_aside(0.15, "after errors")
            nursery.start_soon(get, x, dx)
    assert got == {x: dx, y: dy}


async def test_a_hung_store_back_from_its_set_aside_hands_queued_chunks_on():
    # A hung store with two connections; a mirror that lacks the b chunks
    # but has g.  b1, b2 hold the connections and get the store set aside
    # (0.25 s, for 0.3 s); b3..b6, asked meanwhile, come back to it for
    # their last tries, which take the connections at 1.0 s and hold them
    # until their deadlines (1.3, 1.45 s).  g, asked at 0.6 s once the
    # store is back, queues behind them.  Before, nothing watched the last
    # tries: g got a connection at 1.45 s and was raced only after its
    # deadline (1.6 s).  Now the last tries are watched: the store still
    # silent at 1.25 s, g's queued request is raced then.
    bs = [chunk(n) for n in range(1, 7)]
    g = chunk(100)
    mirror = Store("mirror", [g])
    eng = ChunkEngine([hung_store("hung", 2), mirror], "sha256", deadline=1.0, backoff=0.3)
    got = await got_at(eng, [*zip(bs, (0, 0, 0.3, 0.3, 0.45, 0.45)), (g, 0.6)])
    assert got == {g[0]: g[1]}, f"mirror asked for g {mirror.calls.count(g[0])} times"


async def test_a_store_set_aside_then_silent_on_its_last_try_is_named_once():
    # y gets the hung store set aside at 0.25 s; x, asked at 0.3 s, skips
    # it, is missing from the mirror, and then waits on its last try there
    # until the deadline.  The error said both "hung set aside for not
    # answering" and "no answer from hung".
    (x, dx), (y, dy) = chunk(1), chunk(2)
    hung = Store("hung", [(x, dx), (y, dy)], lambda cid, n: "stall")
    mirror = Store("mirror", [])
    eng = ChunkEngine([hung, mirror], "sha256", deadline=1.0, backoff=5.0)
    errors = {}

    async def get(cid, data, at):
        await trio.sleep(at)
        try:
            await eng.get(cid, len(data))
        except ChunkError as e:
            errors[cid] = str(e)
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, y, dy, 0)
            nursery.start_soon(get, x, dx, 0.3)
    assert "no answer from hung" in errors[x] and errors[x].count("hung") == 1, errors[x]


async def test_a_store_passed_over_in_a_race_gets_its_last_try_beside_the_raced_request():
    # A hangs; B has x but was set aside (a burst of errors); C lacks it.
    # At 0.25 s A's request is raced: the search passes B over and finds
    # C without x.  B's last try waited for A's request, which held on
    # until the deadline, so x failed though B had it.
    (x, dx), = [chunk(1)]
    a = Store("A", [(x, dx)], lambda cid, n: "stall")
    b = Store("B", [(x, dx)])
    c = Store("C", [])
    eng = engine([a, b, c], deadline=1.0)
    eng._far_stores[1].set_aside(5.0, "after errors")
    with trio.fail_after(2):
        assert await eng.get(x, len(dx)) == dx
    assert b.calls == [x]


async def test_a_corrupt_copy_on_a_last_try_beside_a_raced_request_does_not_end_them():
    # A hangs; B (set aside) has a corrupt copy of x, C lacks it, D (set
    # aside) has it.  At 0.25 s A is raced: the search passes B and D
    # over, C lacks x, and the last tries beside A's request begin.  B's
    # copy is corrupt, and D's last try waited for A's request, which
    # held on until the deadline: x failed though D had it.
    (x, dx), = [chunk(1)]
    a = Store("A", [(x, dx)], lambda cid, n: "stall")
    b = Store("B", [(x, b"garbage")])
    d = Store("D", [(x, dx)])
    eng = engine([a, b, Store("C", []), d], deadline=1.0)
    eng._far_stores[1].set_aside(5.0, "after errors")
    eng._far_stores[3].set_aside(5.0, "after errors")
    with trio.fail_after(2):
        assert await eng.get(x, len(dx)) == dx
    assert b.calls == [x] and d.calls == [x]


async def test_a_hung_last_try_does_not_hold_up_the_next_store_passed_over():
    # B (set aside) hangs, C lacks x, D (set aside) has it.  The last
    # tries went in turn: B's held on until the deadline, and D was never
    # asked.
    (x, dx), = [chunk(1)]
    b = Store("B", [(x, dx)], lambda cid, n: "stall")
    d = Store("D", [(x, dx)])
    eng = engine([b, Store("C", []), d], deadline=1.0)
    eng._far_stores[0].set_aside(5.0, "after errors")
    eng._far_stores[2].set_aside(5.0, "after errors")
    with trio.fail_after(2):
        assert await eng.get(x, len(dx)) == dx
    assert d.calls == [x]


async def test_a_raced_request_that_times_out_during_the_last_tries_beside_it():
    # A is raced at 0.5 s; the search passes B1 and B2 over (set aside)
    # and finds C without x, so their last tries run beside A's request.
    # A's try times out at 0.8 s, during B1's last try: A is then to be
    # asked last too, while those last tries go on (one list changing
    # under another's feet).  B2 has x.
    (x, dx), = [chunk(1)]
    b1, b2 = Store("B1", [], delay=0.5), Store("B2", [(x, dx)])
    eng = engine([TimesOut("A", [], 0.8, first=True), b1, b2, Store("C", [])], deadline=2.0)
    for state in eng._far_stores[1:3]:
        state.set_aside(5.0, "after errors")
    with trio.fail_after(3):
        assert await eng.get(x, len(dx)) == dx
    assert b2.calls == [x]


async def test_a_slow_stores_last_try_does_not_send_new_chunks_to_a_hung_next_store():
    # slow: one connection, 0.6 s a chunk; hung: the next store.  Both are
    # set aside briefly at 0 s (a burst of 503s): a, asked then, skips
    # both, and its last try takes slow's connection at 0 s (answered at
    # 0.6 s).  h, asked at 0.55 s once both are back, is asked of slow,
    # raced in vain by hung and served at 1.2 s.  With 0ec7d13 the last
    # try, "silent" at 0.5 s, set slow aside for 60 s: h went to the hung
    # store, the last one, never raced, and failed at its deadline.
    (a, da), (h, dh) = chunk(1), chunk(2)
    slow = OneLineStore("slow", [(a, da), (h, dh)], delay=0.6)
    hung = Store("hung", [], lambda cid, n: "stall")
    eng = ChunkEngine([slow, hung], "sha256", deadline=2.0, backoff=60.0)
    got = {}

    async def get(cid, data, at):
        await trio.sleep(at)
        got[cid] = await eng.get(cid, len(data))
    with trio.fail_after(4):
        async with trio.open_nursery() as nursery:
            eng._far_stores[0].set_aside(0.1, "after errors")
            eng._far_stores[1].set_aside(0.3, "after errors")
            nursery.start_soon(get, a, da, 0)
            nursery.start_soon(get, h, dh, 0.55)
    assert got == {a: da, h: dh}


async def test_requests_queued_behind_ones_that_cannot_be_raced_are_raced():
    # A hung store with two connections; B is set aside for 0.15 s.  x1,
    # x2, asked of A meanwhile with no other store left, cannot be raced;
    # they hold A's connections until their deadlines (1.01 s).  g, asked
    # at 0.16 s once B is back, queues behind them, and was raced only
    # after its own deadline (1.16 s), though B has it.
    g = chunk(100)
    b = Store("B", [g])
    eng = ChunkEngine([hung_store("A", 2), b], "sha256", deadline=1.0, backoff=60.0)
    eng._far_stores[1].set_aside(0.15, "after errors")
    got = await got_at(eng, [(chunk(1), 0.01), (chunk(2), 0.01), (g, 0.16)])
    assert got == {g[0]: g[1]}, f"B asked for g {b.calls.count(g[0])} times"


async def test_a_request_raced_while_queued_still_sets_its_silent_store_aside():
    # A: two connections, hangs on all but s (served in 0.2 s).  B is set
    # aside until 0.05 s, so w, asked at 0, holds a connection unraced
    # until its deadline.  s holds the other from 0.1 to 0.3 s.  r1, r1b
    # queue at 0.15, 0.2 s; w's watch races them at 0.25 s (B lacks them).
    # r1 takes the connection s frees and hangs; its own hedge (0.55 s)
    # found it raced already and did nothing, and w's watch saw an answer
    # since w got its connection: A was never set aside, and g, asked at
    # 0.35 s, queued behind r1b and r1 past its deadline, though B has it.
    w, s, r1, r1b, g = (chunk(n) for n in range(1, 6))
    a = OneLineStore("A", [s], delay=0.2)
    a.slots = Slots(2)
    a.fault = lambda cid, n: None if cid == s[0] else "stall"
    b = Store("B", [g])
    eng = engine([a, b], deadline=1.0)
    eng._far_stores[1].set_aside(0.05, "after errors")
    got = await got_at(eng, [(w, 0), (s, 0.1), (r1, 0.15), (r1b, 0.2), (g, 0.35)])
    assert got.get(g[0]) == g[1], f"B asked for g {b.calls.count(g[0])} times"


async def test_a_raced_store_that_times_out_gets_its_last_try_beside_a_hung_one():
    # A's try with others left gets no answer (0.4 s, a --timeout); its
    # full tries serve x.  B (set aside) hangs; C lacks x.  At 0.25 s A is
    # raced: the search passes B over, C lacks x, and B's last try begins
    # beside A's request.  At 0.4 s A's try times out: A is to be asked
    # last too, and its last try waited for B's to end, at the deadline.
    (x, dx), = [chunk(1)]
    eng = engine([TimesOut("A", [(x, dx)], 0.4, first=True),
                  Store("B", [(x, dx)], lambda cid, n: "stall"),
                  Store("C", [])], deadline=1.0)
    eng._far_stores[1].set_aside(5.0, "after errors")
    with trio.fail_after(2):
        assert await eng.get(x, len(dx)) == dx


@pytest.mark.parametrize("back", [0.15, 0.35], ids=["before the race", "after it"])
async def test_a_request_asked_while_the_next_store_was_aside_moves_on_once_it_is_back(back):
    # B is set aside until ``back``, so x, asked of the hung store A at
    # 0.01 s, is asked with no other store left; it is raced at 0.26 s.
    # It held A's connection until its deadline, though B was back with x
    # (not raced before 5e91108; raced in vain with B still aside at
    # 1f3f333: B's last try then waited for A's answer).
    x = chunk(1)
    b = Store("B", [x])
    eng = engine([Store("A", [], lambda cid, n: "stall"), b], deadline=1.0)
    eng._far_stores[1].set_aside(back, "after errors")
    got = await got_at(eng, [(x, 0.01)])
    assert got == {x[0]: x[1]}, f"B asked for x {b.calls.count(x[0])} times"


class Cue:
    """Wakes its waiters in the order they began to wait (a trio.Event's
    order is arbitrary), in one scheduler batch, which trio runs in that
    order or reversed."""

    def __init__(self):
        self._lot = trio.lowlevel.ParkingLot()

    async def wait(self):
        await self._lot.park()

    def set(self):
        self._lot.unpark_all()


class TimesOutOnCue(Store):
    """Its tries while other stores are left time out when ``cue`` is set,
    those for the chunks in ``late`` beginning to wait for it that many
    seconds late; its full tries answer at once."""

    def __init__(self, name, chunks, cue, late):
        super().__init__(name, chunks)
        self.cue, self.late = cue, late

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        began = trio.current_time()
        held()
        self.calls.append(cid)
        if others_left:
            await trio.sleep(self.late.get(cid, 0))
            await self.cue.wait()
            raise HTTPError("no answer within the timeout", True, began)
        return (self.chunks[cid], False) if cid in self.chunks else None


class MissingOnCue(Store):
    """Says "missing" once ``cue`` is set."""

    def __init__(self, name, cue):
        super().__init__(name, [])
        self.cue = cue

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        if held is not None:
            held()
        self.calls.append(cid)
        await self.cue.wait()


async def test_a_raced_try_that_times_out_as_the_last_tries_end_joins_no_closed_nursery():
    # A's tries with others left time out at the cue (0.45 s); its full
    # tries serve the chunks.  B is set aside and says "missing" at the
    # cue; C lacks them all.  At 0.25 s A's requests are raced, B's last
    # tries begin beside them.  At the cue, for each chunk, B's last try
    # ends (closing the nursery of the last tries) and A's try times out,
    # in one scheduler batch.  Where B's ran first, A's joined the closed
    # nursery: RuntimeError, and the load failed.  Half the chunks' A
    # tries wait for the cue before B's last tries, half after, so one
    # meets that order whichever way trio runs the batch (pytest-trio
    # shuffles it: all 12 miss it once in 4096 runs).
    chunks = [chunk(n) for n in range(1, 13)]
    cue = Cue()
    a = TimesOutOnCue("A", chunks, cue, late={c[0]: 0.3 for c in chunks[6:]})
    eng = engine([a, MissingOnCue("B", cue), Store("C", [])], deadline=1.0)
    eng._far_stores[1].set_aside(5.0, "after errors")

    async def release():
        await trio.sleep(0.45)
        cue.set()
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release)
            assert await eng.get_many([_want(c) for c in chunks]) == [d for _c, d in chunks]


async def test_a_store_set_aside_behind_a_slow_one_is_not_asked_and_warned_of_per_chunk(
        caplog):
    # A is slow but healthy (0.6 s a chunk, deadline 2 s: raced at 0.5 s);
    # B, the only other store, is down and set aside.  With 5e91108 the
    # race of each of A's requests gave B its last try at once: a request
    # to the dead mirror and a warning per chunk.
    chunks = [chunk(n) for n in range(1, 5)]
    slow = Staggered(chunks, {}, rest=0.6, name="A")
    down = Store("B", chunks, lambda cid, n: HTTPError("connection refused", True))
    eng = engine([slow, down], deadline=2.0)
    eng._far_stores[1].set_aside(5.0, "after errors")
    with caplog.at_level(logging.WARNING, logger="cafuse"), trio.fail_after(4):
        for c in chunks:
            assert await eng.get(*_want(c)) == c[1]
    warned = [r.getMessage() for r in caplog.records if "store B aside" in r.getMessage()]
    assert warned == [] and down.calls == [], (warned, len(down.calls))


async def test_a_store_passed_over_gets_its_last_try_beside_a_raced_request_to_a_hung_next_one():
    # A and B hang; C has x but was set aside.  B was there to ask when A
    # was asked, so C gets its last try beside A's raced request.  But A's
    # race asks B, raced in turn with every store after it set aside, and
    # waits for it: C was never asked, and x failed.
    (x, dx), = [chunk(1)]
    c = Store("C", [(x, dx)])
    eng = engine([Store("A", [(x, dx)], lambda cid, n: "stall"),
                  Store("B", [(x, dx)], lambda cid, n: "stall"), c], deadline=1.0)
    eng._far_stores[2].set_aside(5.0, "after errors")
    with trio.fail_after(2):
        assert await eng.get(x, len(dx)) == dx
    assert c.calls == [x]


async def test_a_store_passed_over_gets_its_last_try_once_the_next_store_is_back_though_it_hangs():
    # A and B hang; C has x but is set aside for 5 s.  B is set aside too
    # until 0.1 s, so x, asked of A at 0.01 s, is asked with no other
    # store available.  B is back before A's race (0.26 s): the race asks
    # B, raced in turn at 0.51 s with C still aside, and B's search waited
    # for C to come back while A's waited for B's: C was never asked.
    x = chunk(1)
    c = Store("C", [x])
    eng = engine([Store("A", [x], lambda cid, n: "stall"),
                  Store("B", [x], lambda cid, n: "stall"), c], deadline=1.0)
    eng._far_stores[1].set_aside(0.1, "after errors")
    eng._far_stores[2].set_aside(5.0, "after errors")
    got = await got_at(eng, [(x, 0.01)])
    assert got == {x[0]: x[1]}, f"C asked for x {c.calls.count(x[0])} times"


async def test_a_store_passed_over_before_a_raced_one_is_asked_once_it_is_back():
    # S has x, set aside until 0.1 s; A hangs; C is set aside for 5 s.  x,
    # asked at 0.01 s, passes S over and is asked of A with every other
    # store aside.  S is back at 0.1 s, before A's race (0.26 s), but the
    # race waited only for C (the stores after A): x failed.
    x = chunk(1)
    s = Store("S", [x])
    eng = engine([s, Store("A", [x], lambda cid, n: "stall"), Store("C", [x])],
                 deadline=1.0)
    eng._far_stores[0].set_aside(0.1, "after errors")
    eng._far_stores[2].set_aside(5.0, "after errors")
    got = await got_at(eng, [(x, 0.01)])
    assert got == {x[0]: x[1]}, f"S asked for x {s.calls.count(x[0])} times"


async def test_a_store_set_aside_for_not_answering_that_then_fails_is_warned_of(caplog):
    # A's request is raced at 0.25 s: A is set aside "for not answering"
    # (warned).  At 0.4 s the request fails with 503s: A is set aside
    # "after errors", which cancels its requests, and that was only a
    # debug line.
    (x, dx), = [chunk(1)]

    class FailsLate(Store):
        async def fetch(self, cid, priority=None, others_left=False, held=None):
            held()
            await trio.sleep(0.4)
            raise HTTPError("HTTP 503 after 3 tries", True)
    eng = engine([FailsLate("A", []), Store("B", [(x, dx)], delay=0.5)], deadline=1.0)
    with caplog.at_level(logging.WARNING, logger="cafuse"), trio.fail_after(2):
        assert await eng.get(x, len(dx)) == dx
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("503" in message for message in warned), warned


async def test_a_store_that_fails_again_on_each_return_is_set_aside_for_longer(caplog):
    # A refuses every connection; B serves.  Set aside for 0.05 s each
    # time, A was asked again every 0.05 s of reading (about 20 times in
    # the first second here): with the defaults, 5 s aside and a 10 s
    # --timeout for a hung store, a stall every 15 s.  Failing again on
    # its return now doubles its time aside (0.05, 0.1, 0.2, 0.4 s...),
    # and an answer brings it back to the first.
    chunks = [chunk(n) for n in range(111)]
    refused = {"on": True}
    a = Store("A", chunks, lambda cid, n: HTTPError("refused", True) if refused["on"] else None)
    eng = ChunkEngine([a, Store("B", chunks, delay=0.01)], "sha256", deadline=1.0,
                      backoff=0.05)
    with trio.fail_after(5):
        for c in chunks[:100]:
            assert await eng.get(*_want(c)) == c[1]
    assert len(a.calls) <= 10, f"A asked {len(a.calls)} times in about 1 s"
    refused["on"] = False
    with trio.fail_after(5):
        while not eng._far_stores[0].available():
            await trio.sleep(0.01)
        for c in chunks[100:110]:
            assert await eng.get(*_want(c)) == c[1]
    assert a.calls[-1] == chunks[109][0]
    refused["on"] = True
    with caplog.at_level(logging.WARNING, logger="cafuse"), trio.fail_after(1):
        assert await eng.get(*_want(chunks[110])) == chunks[110][1]
    assert caplog.records[-1].getMessage().endswith("aside for 0.05 s")


def test_the_time_aside_of_a_store_that_keeps_failing_stops_doubling():
    from cafuse.engine import ASIDE_DOUBLINGS
    eng = ChunkEngine([Store("A", []), Store("B", [])], "sha256", backoff=1.0)
    state = eng._far_stores[0]
    periods = []
    for _ in range(ASIDE_DOUBLINGS + 3):
        state.down_until = 0.0                     # back, and failing again
        start = time.monotonic()
        eng._set_aside(state, HTTPError("refused", True))
        periods.append(round(state.down_until - start))
    assert periods == [2 ** min(n, ASIDE_DOUBLINGS) for n in range(ASIDE_DOUBLINGS + 3)]


async def test_a_chunk_that_failed_names_every_store_that_did_not_answer():
    # Two hung stores: the first is raced at 0.25 s, the second (the last)
    # never answers either.  Before 8f06653: "no answer from hung, hung2;
    # not delivered within 1 s".  Now the race's reason fills the problems,
    # so hung2, asked and silent, is not named at all.
    (x, dx), = [chunk(1)]
    hung = Store("hung", [(x, dx)], lambda cid, n: "stall")
    hung2 = Store("hung2", [(x, dx)], lambda cid, n: "stall")
    eng = engine([hung, hung2], deadline=1.0)
    with trio.fail_after(2), pytest.raises(ChunkError) as caught:
        await eng.get(x, len(dx))
    assert "hung2" in str(caught.value), str(caught.value)


async def test_a_hung_store_is_set_aside_when_the_next_store_lacks_what_it_holds(tmp_path):
    # --deadline below --timeout; chunks 0 and 1 hold the hung store's two
    # connections, and the local store lacks them.  When they are raced,
    # the store (silent since) is set aside, so 2..5, queued for a
    # connection, move on to the local store, which has them.
    chunks = [chunk(n) for n in range(6)]
    for cid, data in chunks[2:]:
        path = tmp_path / chunk_path(cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    options = HTTPOptions(connections=2, timeout=10.0, retries=3, backoff=0.01)
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        dead = HTTPStore(f"http://127.0.0.1:{hole.getsockname()[1]}", options)
        eng = ChunkEngine([dead, LocalStore(str(tmp_path))], "sha256", deadline=2.0,
                          backoff=60.0)
        got, lost = {}, []

        async def get(c, after):
            await trio.sleep(after)
            try:
                got[c[0]] = await eng.get(*_want(c))
            except ChunkError:
                lost.append(c[0])
        try:
            with trio.fail_after(3):
                async with trio.open_nursery() as nursery:
                    for n, c in enumerate(chunks):
                        nursery.start_soon(get, c, 0 if n < 2 else 0.05)
        finally:
            await eng.aclose()
    assert got == dict(chunks[2:]) and sorted(lost) == sorted(c[0] for c in chunks[:2])


@pytest.mark.parametrize("others_left", [False, True])
async def test_a_timed_out_request_is_tried_again_only_with_no_other_store(
        tmp_path, others_left):
    (a, da), = [chunk(1)]
    path = tmp_path / (chunk_path(a) + ".cacnk")   # served as it is: not decoded here
    path.parent.mkdir(parents=True)
    path.write_bytes(da)
    with FaultServer(tmp_path, lambda path, count: "stall" if count == 1 else None) as server:
        store = HTTPStore(server.url, HTTPOptions(timeout=0.3, retries=3, backoff=0.01))
        if others_left:
            with pytest.raises(HTTPError, match="no answer within 0.3 s"):
                await store.fetch(a, others_left=True)
        else:
            assert await store.fetch(a) == (da, True)
        await store.aclose()
        assert server.total() == (1 if others_left else 2)


async def test_a_store_that_answers_others_is_not_set_aside_for_one_stuck_request(tmp_path):
    chunks = [chunk(n) for n in range(6)]
    stuck = chunks[0][0]
    for cid, data in chunks:
        path = tmp_path / (chunk_path(cid) + ".cacnk")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with FaultServer(tmp_path, lambda path, count: "stall" if stuck.hex() in path else None) \
            as server:
        options = HTTPOptions(timeout=0.3, retries=3, backoff=0.01)
        busy = HTTPStore(server.url, options)
        mirror = Store("mirror", chunks)
        eng = engine([busy, mirror], deadline=2.0)
        eng._decode = lambda want, position, found: found[0]    # served as they are
        with trio.fail_after(1.5):
            assert await eng.get_many([_want(c) for c in chunks]) == [d for _, d in chunks]
        assert eng._far_stores[0].available()
        assert eng.stats.sources[server.url] == 5 and eng.stats.sources["mirror"] == 1
        await eng.aclose()


def served_as_cacnk(tmp_path, chunks):
    """``chunks`` as an HTTP store's files, served as they are (the
    engine's decoding is then skipped with ``as_served``)."""
    for cid, data in chunks:
        path = tmp_path / (chunk_path(cid) + ".cacnk")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def as_served(eng):
    eng._decode = lambda want, position, found: found[0]
    return eng


async def test_a_store_that_hangs_in_the_middle_of_a_load_is_set_aside(tmp_path):
    chunks = [chunk(n) for n in range(20)]
    served_as_cacnk(tmp_path, chunks)
    served = []

    def fault(path, count):                   # four answers, then a hang
        served.append(path)
        return None if len(served) <= 4 else "stall"
    with FaultServer(tmp_path, fault) as server:
        options = HTTPOptions(connections=2, timeout=0.3, retries=3, backoff=0.01)
        eng = as_served(engine([HTTPStore(server.url, options), Store("mirror", chunks)],
                               deadline=2.0))
        with trio.fail_after(1.5):
            assert await eng.get_many([_want(c) for c in chunks]) == [d for _, d in chunks]
        assert not eng._far_stores[0].available()
        await eng.aclose()


@pytest.mark.parametrize("mirror_goes_aside", [False, True])
async def test_a_store_whose_try_timed_out_serves_what_the_others_lack(
        tmp_path, mirror_goes_aside):
    (a, da), = [chunk(1)]
    served_as_cacnk(tmp_path, [(a, da)])
    with FaultServer(tmp_path, lambda path, count: "stall" if count == 1 else None) as server:
        primary = HTTPStore(server.url, HTTPOptions(timeout=0.3, retries=3, backoff=0.01))
        eng = as_served(engine([primary, Store("partial", [])], deadline=5.0))

        async def goes_aside():               # e.g. after a 503 for another chunk
            await trio.sleep(0.1)
            eng._far_stores[1].set_aside(60, "after errors")
        async with trio.open_nursery() as nursery:
            if mirror_goes_aside:
                nursery.start_soon(goes_aside)
            assert await eng.get(a, len(da)) == da
        await eng.aclose()


async def test_chunks_that_arrived_are_cached_when_a_refetch_fails(tmp_path):
    # g2 and g3 wait in the arrival channel when the refetch of the
    # corrupt chunk is refused.
    g1, g2, g3 = [chunk(n) for n in range(3)]
    bad, dbad = chunk(9)
    first = Staggered([g1, g2, g3], {bad: 0, g1[0]: 0.1, g2[0]: 0.25, g3[0]: 0.25},
                      corrupt=bad, name="first")
    mirror = Staggered([], {bad: 0.1}, refused=bad, name="mirror")
    eng = engine([first, mirror], disk=DiskCache(str(tmp_path), 1 << 20))
    slow_decode(eng, 0.2)
    with pytest.raises(ChunkError, match="403"):
        await eng.get_many([(bad, len(dbad)), _want(g1), _want(g2), _want(g3)],
                           remember=False)
    await eng.aclose()
    ids = [g1[0], g2[0], g3[0]]
    assert cached(tmp_path).present(ids) == set(ids)


class Hiccups(Store):
    """A remote store whose tries for ``hang`` get no answer in 0.1 s while
    other stores are left; with none left (its full tries) it serves them."""

    def __init__(self, chunks, hang, delays):
        super().__init__("hiccups", chunks)
        self.hang, self.delays = hang, delays

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        if held is not None:   # a connection at once
            held()
        self.calls.append(cid)
        began = trio.current_time()
        if cid in self.hang and others_left:
            await trio.sleep(0.1)
            raise HTTPError("no answer within 0.1 s", True, began)
        await trio.sleep(self.delays.get(cid, 0.02))
        return (self.chunks[cid], False) if cid in self.chunks else None


async def test_the_full_tries_of_a_stalled_store_go_on_when_it_is_set_aside():
    (w, dw), (x, dx), (z, dz) = chunk(1), chunk(2), chunk(3)
    stalls = Hiccups([(w, dw), (x, dx), (z, dz)], hang={x, z}, delays={x: 0.3})
    eng = engine([stalls, Store("partial", [(z, dz)])], deadline=5.0)
    got = {}

    async def get(cid, data, after):
        await trio.sleep(after)
        got[cid] = await eng.get(cid, len(data))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(get, w, dw, 0)       # answered at 0.02 s
        nursery.start_soon(get, x, dx, 0)       # stalls until 0.1 s, then the partial
                                                # store lacks it: full tries from 0.1 s
        nursery.start_soon(get, z, dz, 0.05)    # stalls 0.05-0.15 s, nothing answered
                                                # meanwhile: the store is set aside
    assert got == {w: dw, x: dx, z: dz}
    assert not eng._far_stores[0].available()


async def test_a_stalled_store_gets_its_full_tries_after_a_corrupt_copy_from_the_next():
    (x, dx), = [chunk(2)]
    eng = engine([Hiccups([(x, dx)], hang={x}, delays={}),
                  Staggered([(x, dx)], {}, corrupt=x, name="corrupt")], deadline=5.0)
    assert await eng.get(x, len(dx)) == dx


class Scripted(Store):
    """A remote store: for each chunk, what a try with other stores left
    does (``"stall"``: no answer in 0.1 s) and what its full tries do."""

    def __init__(self, name, with_others, full, delays=None):
        super().__init__(name, [])
        self.with_others, self.full, self.delays = with_others, full, delays or {}
        self.full_tries = []

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        if held is not None:   # a connection at once
            held()
        began = trio.current_time()
        if not others_left:
            self.full_tries.append(cid)
        what = (self.with_others if others_left else self.full).get(cid)
        if what == "stall":
            await trio.sleep(0.1)
            raise HTTPError("no answer within 0.1 s", True, began)
        await trio.sleep(self.delays.get(cid, 0.0))
        return what


async def test_a_stalled_store_gets_its_full_tries_once():
    # A and B stall on x, C lacks it; A's full tries give a corrupt copy,
    # so x is asked again from B on; B (busy with y, so not set aside)
    # must not stall a second time nor get two rounds of full tries.
    (x, dx), (y, dy) = chunk(1), chunk(2)
    a = Scripted("A", {x: "stall"}, {x: (b"garbage", False)})
    b = Scripted("B", {x: "stall", y: (dy, False)}, {x: None}, delays={y: 0.15})
    eng = engine([a, b, Scripted("C", {}, {})], deadline=5.0)
    errors = []

    async def get_x():
        with pytest.raises(ChunkError) as failed:
            await eng.get(x, len(dx))
        errors.append(str(failed.value))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(get_x)
        assert await eng.get(y, len(dy)) == dy
    assert errors[0].count("missing from B") == 1 and b.full_tries == [x], errors


async def test_concurrent_readers_of_a_large_chunk_share_one_load():
    cid, data = chunk(1, size=64 << 10)
    store = Store("s", [(cid, data)], delay=0.05)
    eng = engine([store], memory_bytes=64 << 10)  # too large to be kept in memory
    got = []

    async def read():
        got.append(await eng.get(cid, len(data)))
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(read)
    assert got == [data] * 4
    assert store.calls == [cid]


class FlakyDisk(DiskCache):
    """A real disk cache whose calls fail while ``failing`` says so."""

    def __init__(self, path):
        super().__init__(path, 1 << 30)
        self.failing = {}          # method -> exception
        self.closed = False

    def _maybe_fail(self, method):
        error = self.failing.get(method)
        if error is not None:
            raise error

    def get(self, cid):
        self._maybe_fail("get")
        return super().get(cid)

    def present(self, ids):
        self._maybe_fail("present")
        return super().present(ids)

    def put(self, cid, data):
        self._maybe_fail("put")
        return super().put(cid, data)

    def close(self):
        self.closed = True
        super().close()


async def test_a_full_disk_only_stops_new_chunks_from_being_cached(tmp_path):
    chunks = [chunk(n) for n in range(10)]
    store = Store("s", chunks)
    disk = FlakyDisk(str(tmp_path))
    eng = engine([store], disk=disk, memory_bytes=0)
    await eng.get(*_want(chunks[0]))
    await written(eng)                            # cached
    disk.failing["put"] = DiskFull("cache directory x: No space left on device")
    for c in chunks[1:]:
        await eng.get(*_want(c))
        await written(eng)
    assert eng.disk is disk and not disk.closed
    assert await eng.get(*_want(chunks[0])) == chunks[0][1]
    assert eng.stats.sources["disk cache"] == 1  # still read from
    disk.failing.clear()
    await eng.get(*_want(chunks[1]))              # cached again once there is room
    await written(eng)
    assert await eng.get(*_want(chunks[1])) == chunks[1][1]
    assert eng.stats.sources["disk cache"] == 2


async def test_the_disk_cache_is_given_up_and_closed_after_failures_in_a_row(tmp_path):
    chunks = [chunk(n) for n in range(10)]
    store = Store("s", chunks)
    disk = FlakyDisk(str(tmp_path))
    eng = engine([store], disk=disk, memory_bytes=0)
    disk.failing["present"] = CafuseError("cache index x: disk I/O error")
    await eng.get(*_want(chunks[0]))              # one failure: forgiven
    disk.failing.clear()
    await eng.get(*_want(chunks[1]))              # a success: the count starts again
    assert eng.disk is disk
    disk.failing["present"] = CafuseError("cache index x: database disk image is malformed")
    disk.failing["put"] = CafuseError("cache directory x: Input/output error")
    for c in chunks[2:2 + DISK_FAILURES]:
        assert await eng.get(*_want(c)) == c[1]   # reads go on from the store
    assert eng.disk is None and disk.closed
    await eng.aclose()


def _want(c):
    cid, data = c
    return cid, len(data)


async def test_writes_that_all_fail_give_up_the_cache_even_while_reads_work(tmp_path):
    chunks = [chunk(n) for n in range(10)]
    disk = FlakyDisk(str(tmp_path))
    eng = engine([Store("s", chunks)], disk=disk, memory_bytes=0)
    disk.failing["put"] = CafuseError("cache directory x: Input/output error")
    for c in chunks[:DISK_FAILURES]:
        await eng.get(*_want(c))                  # present works, put fails
        await written(eng)
    assert eng.disk is None and disk.closed


async def test_a_reader_that_joined_a_failed_load_fails_within_its_own_deadline():
    # Joining another reader's load and then loading again after it failed
    # used to cost up to two deadlines.
    (a, da), = [chunk(1)]
    eng = engine([Store("dead", [(a, da)], lambda cid, n: "stall")], deadline=1.0)
    ended = {}

    async def read(name):
        start = trio.current_time()
        with pytest.raises(ChunkError, match="not delivered within 1 s"):
            await eng.get(a, len(da))
        ended[name] = trio.current_time() - start
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "first")
        await trio.sleep(0.5)
        nursery.start_soon(read, "joined")
    assert ended["joined"] < 1.2


async def test_a_reader_whose_shared_load_was_cancelled_loads_it_itself():
    (a, da), = [chunk(1)]
    store = Store("slow", [(a, da)], delay=0.3)
    eng = engine([store])
    got = []

    async def owner():
        with trio.move_on_after(0.1):  # its reader went away (an interrupted read)
            await eng.get(a, len(da))

    async def joiner():
        await trio.sleep(0.05)
        got.append(await eng.get(a, len(da)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        nursery.start_soon(joiner)
    assert got == [da]
    assert len(store.calls) == 2


class OneLineStore(Store):
    """A store behind one connection (the client's places, as HTTPStore);
    ``asked`` in the order the engine asked, ``calls`` in the order served."""

    def __init__(self, name, chunks, delay):
        super().__init__(name, chunks, delay=delay)
        self.slots = Slots(1)
        self.asked = []

    async def fetch(self, cid, priority=None, others_left=False, held=None):
        self.asked.append(cid)
        async with self.slots.hold(priority or Priority()):
            return await super().fetch(cid, held=held)


def hung_store(name, connections):
    """A store that never answers, behind ``connections`` connections."""
    store = OneLineStore(name, [], delay=0.0)
    store.slots = Slots(connections)
    store.fault = lambda cid, n: "stall"
    return store


async def got_at(eng, plan):
    """The chunks ``eng`` delivers of those ``plan`` asks for, each at its
    moment (``(chunk, seconds)``)."""
    got = {}

    async def get(c, at):
        await trio.sleep(at)
        with contextlib.suppress(ChunkError):
            got[c[0]] = await eng.get(*_want(c))
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            for c, at in plan:
                nursery.start_soon(get, c, at)
    return got


async def test_a_reader_moves_the_readahead_it_waits_for_to_the_front():
    chunks = [chunk(n) for n in range(8)]
    sizes = dict(_want(c) for c in chunks)
    store = OneLineStore("s", chunks, delay=0.1)
    eng = engine([store])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: eng.get_many([_want(c) for c in chunks[:6]], urgent=False))
        with trio.fail_after(2):
            while len(store.asked) < 6 or not store.calls:
                await trio.sleep(0.005)
        last = store.asked[-1]  # queued behind the other five
        assert await eng.get(last, sizes[last]) == dict(chunks)[last]
        assert await eng.get(*_want(chunks[7])) == chunks[7][1]   # not read ahead
    assert store.calls.index(last) == 1
    # After the one request that had the line when the reader came back.
    assert store.calls.index(chunks[7][0]) == 3


async def test_a_chunk_not_delivered_in_time_fails_again_at_once_for_a_moment():
    (a, da), = [chunk(1)]
    store = Store("s", [(a, da)], lambda cid, n: "stall" if n == 1 else None)
    eng = engine([store], deadline=0.3)
    with pytest.raises(ChunkError, match="not delivered"):
        await eng.get(a, len(da))
    start = trio.current_time()
    with pytest.raises(ChunkError, match="not delivered"):
        await eng.get(a, len(da))          # the kernel's retry of a failed page
    assert trio.current_time() - start < 0.1 and len(store.calls) == 1
    await trio.sleep(FAILURE_MEMORY)
    assert await eng.get(a, len(da)) == da  # then it is asked for again


def no_answer(kind, chunks):
    """A store that gives no answer of ``kind`` for any chunk."""
    if kind == "tries timed out":
        return TimesOut("hung", chunks, after=0.2)
    return Store("hung", chunks, lambda cid, n: HTTPError("hung: HTTP 503", True))


@pytest.mark.parametrize("kind", ["tries timed out", "5xx"])
async def test_a_chunk_a_store_gave_no_answer_for_fails_again_at_once_for_a_moment(kind):
    (a, da), = [chunk(1)]
    hung, missing = no_answer(kind, [(a, da)]), Store("missing", [])
    eng = engine([missing, hung])
    with pytest.raises(ChunkError, match="missing from missing; hung: "):
        await eng.get(a, len(da))
    with pytest.raises(ChunkError, match="hung: "):
        await eng.get(a, len(da))          # the kernel's READ of the failed page
    assert len(hung.calls) == len(missing.calls) == 1
    await trio.sleep(FAILURE_MEMORY)
    with pytest.raises(ChunkError):
        await eng.get(a, len(da))
    assert len(hung.calls) == 2            # then it is asked for again


async def test_a_reader_that_joined_a_load_no_store_answered_does_not_load_it_again():
    (a, da), = [chunk(1)]
    hung = TimesOut("hung", [(a, da)], after=0.3)
    eng = engine([hung])

    async def read():
        with pytest.raises(ChunkError, match="hung: no answer within 0.3 s"):
            await eng.get(a, len(da))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.sleep(0.1)
        nursery.start_soon(read)           # joins the first reader's load
    assert len(hung.calls) == 1


def answering(answer, a, tmp_path):
    """Stores that each answer for chunk ``a`` (the first is counted)."""
    if answer == "local":
        return [Store("remote", []), LocalStore(str(tmp_path / "none"))]
    if answer == "set aside, then missing":
        return [Store("first", [], lambda cid, n: None if cid == a else HTTPError("refused", True)),
                Store("second", [])]
    corrupt, refused = a if answer == "corrupt" else None, a if answer == "refused" else None
    return [Staggered([], {}, refused=refused, corrupt=corrupt)]


@pytest.mark.parametrize("answer", ["missing", "corrupt", "refused", "local",
                                    "set aside, then missing"])
async def test_a_chunk_every_store_answered_for_is_asked_for_again_at_once(answer, tmp_path):
    (a, da), (b, db) = chunk(1), chunk(2)
    stores = answering(answer, a, tmp_path)
    eng = engine(stores)
    if answer == "set aside, then missing":
        with pytest.raises(ChunkError, match="refused"):
            await eng.get(b, len(db))      # sets the first store aside
        assert not eng._far_stores[0].available()
    for _ in range(2):
        with pytest.raises(ChunkError):
            await eng.get(a, len(da))
    assert stores[0].calls.count(a) == 2

class HungLocalStore:
    """A local directory on an NFS server that stopped answering, until
    ``release`` is set: then it serves ``chunks``."""
    blocking = True

    def __init__(self, chunks=()):
        self.release = threading.Event()
        self.chunks = dict(chunks)

    def __str__(self):
        return "/nfs/store"

    def load(self, cid):
        self.release.wait(30)
        return (self.chunks[cid], False) if cid in self.chunks else None

    async def aclose(self):
        self.release.set()


@pytest.mark.parametrize("behind_a_remote_store", [False, True])
async def test_a_hung_local_store_costs_a_deadline_not_a_hang(behind_a_remote_store):
    (a, da), = [chunk(1)]
    hung = HungLocalStore()
    stores = [Store("remote", [], lambda cid, n: HTTPError("HTTP 503", retryable=True)),
              hung] if behind_a_remote_store else [hung]
    eng = engine(stores, deadline=0.5)
    start = trio.current_time()
    with pytest.raises(ChunkError, match="within 0.5 s"):
        await eng.get(a, len(da))
    assert trio.current_time() - start < 1.5
    await eng.aclose()


async def test_a_chunk_in_is_not_held_back_by_another_retried_on_a_hung_mirror():
    (a, da), (b, db) = chunk(1), chunk(2)

    def bad_a(cid, n):
        return "corrupt" if cid == a else None
    first = Store("first", [(a, da), (b, db)], bad_a, delay=0.005)
    first.fetch = _corrupting(first)
    hung = Store("hung", [(a, da), (b, db)], lambda cid, n: "stall")
    eng = engine([first, hung], deadline=1.0)
    got = {}

    async def owner():
        with pytest.raises(ChunkError):
            await eng.get_many([(a, len(da)), (b, len(db))])

    async def joiner():
        await trio.sleep(0.002)
        start = trio.current_time()
        got["b"] = await eng.get(b, len(db))
        got["after"] = trio.current_time() - start
    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        nursery.start_soon(joiner)
    assert got["b"] == db and got["after"] < 0.5
    assert await eng.get(b, len(db)) == db       # not remembered as failed


def _corrupting(store):
    """``store.fetch``, but chunks its fault calls "corrupt" come back wrong."""
    fetch = store.fetch

    async def corrupting(cid, priority=None, others_left=False, held=None):
        if store.fault(cid, 1) == "corrupt":
            await trio.sleep(0)
            return b"x" * len(store.chunks[cid]), False
        return await fetch(cid, priority)
    return corrupting


@pytest.mark.parametrize("joined", [False, True])
async def test_readahead_that_ran_out_of_time_behind_readers_is_not_remembered(joined):
    # Queued behind two readers: 0.6 s before its turn, 0.7 s to live.  A
    # reader who comes for it at 0.65 s (``joined``: it is urgent from then
    # on) tries again within its own deadline.
    (r1, d1), (r2, d2), (a, da) = chunk(1), chunk(2), chunk(3)
    store = OneLineStore("s", [(r1, d1), (r2, d2), (a, da)], delay=0.3)
    eng = engine([store], deadline=0.7)
    got = []

    async def reader():
        await trio.sleep(0.65)
        got.append(await eng.get(a, len(da)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(eng.get, r1, len(d1))
        nursery.start_soon(eng.get, r2, len(d2))
        with trio.fail_after(2):
            while len(store.asked) < 2:
                await trio.sleep(0.005)
        if joined:
            nursery.start_soon(reader)
        with pytest.raises(ChunkError, match="not delivered"):
            await eng.get_many([(a, len(da))], urgent=False)
    if not joined:
        got.append(await eng.get(a, len(da)))  # asked again, not failed at once
    assert got == [da]


async def test_hung_local_loads_do_not_take_the_threads_that_decoding_needs():
    lacking, (y, dy) = [chunk(n) for n in range(3)], chunk(9)
    hung = HungLocalStore()
    remote = Store("remote", [(y, dy)])         # the others go on to the hung store
    eng = engine([remote, hung], deadline=0.3, threads=2)
    for x, dx in lacking:                       # more stuck threads than threads
        with pytest.raises(ChunkError, match="within 0.3 s"):
            await eng.get(x, len(dx))
    with trio.fail_after(2):
        assert await eng.get(y, len(dy)) == dy   # still decoded
    await eng.aclose()


async def test_each_chunk_is_told_its_own_problems():
    chunks = [chunk(n) for n in range(3)]
    eng = engine([Store("empty1", []), Store("empty2", [])])
    with pytest.raises(ChunkError) as failed:
        await eng.get_many([_want(c) for c in chunks])
    message = str(failed.value)
    assert message.count("missing from empty1") == 1, message


async def test_hung_local_loads_leave_trios_own_threads_alone():
    # Name lookups for new connections run on trio's default limiter.
    lacking = [chunk(n) for n in range(4)]
    eng = engine([Store("remote", []), HungLocalStore()], deadline=0.2, threads=2)
    for x, dx in lacking:
        with pytest.raises(ChunkError):
            await eng.get(x, len(dx))
    assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
    await eng.aclose()


async def test_a_hung_local_store_hands_its_chunks_on_to_the_remote_one(tmp_path):
    (a, da), (b, db), (c, dc), (d, dd) = [chunk(n) for n in range(4)]
    hung = HungLocalStore([(c, dc)])
    remote = Store("remote", [(a, da), (b, db), (d, dd)])
    disk = DiskCache(str(tmp_path), 1 << 20)
    disk.put(d, dd)
    disk.flush()
    eng = engine([hung, remote], deadline=1.0, disk=disk, threads=1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:   # more hops than threads
        for x, dx in [(a, da), (b, db)]:
            nursery.start_soon(_expect, eng, x, dx)
    assert trio.current_time() - start < 0.9     # half the deadline, then the remote
    start = trio.current_time()
    assert await eng.get(d, len(dd)) == dd       # the disk cache needs a thread
    with pytest.raises(ChunkError, match="/nfs/store skipped"):
        await eng.get(c, len(dc))                # not waited for again
    assert trio.current_time() - start < 0.2
    hung.release.set()
    with trio.fail_after(2):
        while given_up(eng):
            await trio.sleep(0.01)
    assert await eng.get(c, len(dc)) == dc       # asked again once it answers
    await eng.aclose()


async def _expect(eng, cid, data):
    assert await eng.get(cid, len(data)) == data


async def test_a_hung_local_store_alone_fails_at_once_after_one_deadline():
    (a, da), (b, db) = chunk(1), chunk(2)
    hung = HungLocalStore([(a, da), (b, db)])
    eng = engine([hung], deadline=0.4)
    with pytest.raises(ChunkError, match="/nfs/store gave no answer within 0.4 s"):
        await eng.get(a, len(da))
    start = trio.current_time()
    with pytest.raises(ChunkError, match="skipped"):
        await eng.get(b, len(db))
    assert trio.current_time() - start < 0.2
    hung.release.set()
    with trio.fail_after(2):
        while given_up(eng):
            await trio.sleep(0.01)
    assert await eng.get(b, len(db)) == db
    await eng.aclose()


class DyingLocalStore(HungLocalStore):
    """Answers its first ``answers`` loads after 0.3 s each, then hangs."""

    def __init__(self, chunks, answers):
        super().__init__(chunks)
        self.answers = answers
        self.lock = threading.Lock()

    def load(self, cid):
        with self.lock:
            self.answers -= 1
            dead = self.answers < 0
        if not dead:
            threading.Event().wait(0.3)
        return super().load(cid) if dead else (self.chunks[cid], False)


def given_up(eng, k=0):
    """Loads from local store ``k`` given up on and still running."""
    return len(eng._near_stores[k].place.given_up)


def cached(tmp_path, *chunks):
    disk = DiskCache(str(tmp_path), 1 << 20)
    for cid, data in chunks:
        disk.put(cid, data)
    disk.flush()
    return disk


async def test_loads_that_hang_after_a_wait_for_a_thread_are_set_aside(tmp_path):
    # The last two loads begin 0.3 s into their half deadline, then hang.
    chunks, (d, dd) = [chunk(n) for n in range(4)], chunk(9)
    dying = DyingLocalStore(chunks, answers=2)
    eng = engine([dying, Store("remote", chunks)], deadline=1.0,
                 disk=cached(tmp_path, (d, dd)), threads=2, memory_bytes=0)
    async with trio.open_nursery() as nursery:
        for x, dx in chunks:
            nursery.start_soon(_expect, eng, x, dx)
    assert given_up(eng) == 2
    eng.stats.sources.clear()
    with trio.fail_after(0.2):
        assert await eng.get(d, len(dd)) == dd
    assert eng.stats.sources == {"disk cache": 1}
    await eng.aclose()


async def test_a_hop_cancelled_from_outside_still_sets_its_hung_store_aside(tmp_path):
    (a, da), (d, dd) = chunk(1), chunk(9)
    eng = engine([HungLocalStore(), Store("remote", [(a, da)])], deadline=1.0,
                 disk=cached(tmp_path, (d, dd)), threads=1)
    with trio.move_on_after(0.2):       # a reader that went away
        await eng.get(a, len(da))
    assert given_up(eng) == 1
    with trio.fail_after(0.2):
        assert await eng.get(d, len(dd)) == dd
    await eng.aclose()


async def test_what_a_given_up_hop_found_is_kept(tmp_path):
    (x, dx), (y, dy) = chunk(1), chunk(2)
    eng = engine([HungLocalStore([(y, dy)])], deadline=0.3, disk=cached(tmp_path, (x, dx)))
    with pytest.raises(ChunkError, match=f"chunk {y.hex()}: /nfs/store gave no answer"):
        await eng.get_many([(x, len(dx)), (y, len(dy))])
    assert await eng.get(x, len(dx)) == dx
    assert x not in eng._failed
    await eng.aclose()


async def test_a_hung_local_store_and_a_hung_mirror_cost_one_deadline():
    (a, da), = [chunk(1)]
    eng = engine([HungLocalStore(), Store("remote", [(a, da)], lambda cid, n: "stall")],
                 deadline=1.0)
    start = trio.current_time()
    with pytest.raises(ChunkError, match="not delivered within 1 s"):
        await eng.get(a, len(da))
    assert trio.current_time() - start < 1.3
    await eng.aclose()


class SlowLocalStore(HungLocalStore):
    """A busy but working NFS directory: each load takes 0.3 s."""

    def load(self, cid):
        threading.Event().wait(0.3)
        return (self.chunks[cid], False) if cid in self.chunks else None


async def test_a_slow_local_store_is_not_skipped_after_a_reader_goes_away():
    (a, da), (b, db) = chunk(1), chunk(2)
    eng = engine([SlowLocalStore([(a, da), (b, db)])], deadline=10.0)
    got = {}

    async def leaves():
        with trio.move_on_after(0.05):
            await eng.get(a, len(da))

    async def joins():                  # the same chunk, loaded again
        await trio.sleep(0.01)
        got["a"] = await eng.get(a, len(da))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leaves)
        nursery.start_soon(joins)
    assert got["a"] == da
    assert await eng.get(b, len(db)) == db
    await eng.aclose()


async def test_a_load_given_up_young_does_not_set_a_busy_store_aside():
    # Seven readers queue for one thread; the last one's load starts 1.8 s
    # into its 2 s deadline and is given up 0.2 s old, then c comes.
    queued, (c, dc) = [chunk(n) for n in range(7)], chunk(9)
    eng = engine([SlowLocalStore(queued + [(c, dc)])], deadline=2.0, threads=1)
    got = {}

    async def read(cid, data, after=0.0):
        await trio.sleep(after)
        with contextlib.suppress(ChunkError):
            got[cid] = await eng.get(cid, len(data))
    async with trio.open_nursery() as nursery:
        for x, dx in queued:
            nursery.start_soon(read, x, dx)
        nursery.start_soon(read, c, dc, 2.05)
    assert sum(x in got for x, _ in queued) == 6 and got[c] == dc


class HungSeed:
    """A seed file on an NFS server that stopped answering."""

    def __init__(self):
        self.release = threading.Event()

    def __str__(self):
        return "/nfs/seed.img"

    def load(self, cid, size, digest):
        self.release.wait(30)

    def close(self):
        self.release.set()


class HungDiskCache(DiskCache):
    """A disk cache on an NFS home directory that stopped answering: its
    calls hang holding its lock, as its file reads and writes would."""

    def __init__(self, path, hangs_in="present"):
        super().__init__(path, 1 << 20)
        self.release = threading.Event()
        self.hangs_in = hangs_in

    def present(self, ids):
        if self.hangs_in == "present":
            return self._maybe_hang("present")
        return super().present(ids)

    def put(self, cid, data):
        self._maybe_hang("put")

    def _maybe_hang(self, call):
        if call == self.hangs_in:
            with self._lock:
                self.release.wait(30)

    def close(self):
        self.release.set()
        super().close()


@pytest.mark.parametrize("hung", ["seed", "disk cache"])
async def test_a_hung_seed_or_disk_cache_costs_half_the_deadline_once(hung, tmp_path):
    chunks = [chunk(n) for n in range(4)]
    where = {"seeds": [HungSeed()]} if hung == "seed" else \
        {"disk": HungDiskCache(str(tmp_path))}
    eng = engine([Store("remote", chunks)], deadline=1.0, threads=1, **where)
    took = []
    for x, dx in chunks:
        start = trio.current_time()
        assert await eng.get(x, len(dx)) == dx
        took.append(trio.current_time() - start)
    assert 0.45 < took[0] < 0.7 and max(took[1:]) < 0.2, took
    await eng.aclose()


async def test_the_limiter_lends_a_token_for_a_hung_thread_until_it_ends():
    (a, da), = [chunk(1)]
    hung = HungLocalStore()
    eng = engine([hung, Store("remote", [(a, da)])], deadline=0.4, threads=1)
    assert await eng.get(a, len(da)) == da
    assert eng._nearby_limiter.total_tokens == 2
    hung.release.set()
    with trio.fail_after(2):
        while eng._nearby_limiter.total_tokens > 1 or given_up(eng):
            await trio.sleep(0.01)
    assert eng._nearby_limiter.borrowed_tokens == 0
    await eng.aclose()


async def test_a_chunk_refetched_after_a_corrupt_copy_still_fails_within_the_deadline():
    (a, da), = [chunk(1)]
    bad = Store("bad", [(a, b"x" * len(da))])
    stalled = Store("stalled", [(a, da)], lambda cid, n: "stall")
    eng = engine([HungLocalStore(), bad, stalled], deadline=1.0)
    start = trio.current_time()
    with pytest.raises(ChunkError, match="does not match"):
        await eng.get(a, len(da))
    assert trio.current_time() - start < 1.2
    await eng.aclose()


class PartlyHungStore(HungLocalStore):
    """Answers at once that it lacks a chunk, but hangs on ``hangs_on``."""

    def __init__(self, hangs_on):
        super().__init__()
        self.hangs_on = hangs_on

    def load(self, cid):
        if cid == self.hangs_on:
            self.release.wait(30)


async def test_a_hung_local_store_alone_names_the_chunk_it_gave_no_answer_for():
    (x, dx), (y, dy) = chunk(1), chunk(2)
    eng = engine([PartlyHungStore(hangs_on=y)], deadline=0.3)
    with pytest.raises(ChunkError, match=f"chunk {y.hex()}: /nfs/store gave no answer"):
        await eng.get_many([(x, len(dx)), (y, len(dy))])
    await eng.aclose()


async def test_a_disk_cache_that_hangs_in_a_write_costs_one_reader_half_the_deadline(
        tmp_path):
    chunks = [chunk(n) for n in range(5)]
    disk = HungDiskCache(str(tmp_path), hangs_in="put")
    eng = engine([Store("remote", chunks)], deadline=1.0, disk=disk, threads=1)
    took = []
    for x, dx in chunks:
        start = trio.current_time()
        assert await eng.get(x, len(dx)) == dx
        took.append(trio.current_time() - start)
    # A reader's look into the cache waits for the lock the hung write
    # holds, until its hop is given up; by then the cache counts as stuck.
    assert max(took) < 0.7 and sorted(took)[-2] < 0.2, took
    start = trio.current_time()
    await eng.aclose()                    # not waited for: stuck
    assert trio.current_time() - start < 0.1


async def test_readers_sharing_a_load_get_its_chunk_before_its_disk_write(tmp_path):
    (a, da), = [chunk(1)]
    disk = HungDiskCache(str(tmp_path), hangs_in="put")
    eng = engine([Store("remote", [(a, da)], delay=0.05)], deadline=1.0, disk=disk)
    got = {}

    async def joiner():
        await trio.sleep(0.01)
        start = trio.current_time()
        assert await eng.get(a, len(da)) == da
        got["after"] = trio.current_time() - start
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect, eng, a, da)
        nursery.start_soon(joiner)
    assert got["after"] < 0.3
    await eng.aclose()


class MissingSoon(HungLocalStore):
    def load(self, cid):
        threading.Event().wait(0.05)


async def test_a_hop_that_ended_while_the_event_loop_was_busy_keeps_its_answers():
    (x, dx), = [chunk(1)]
    eng = engine([MissingSoon()], deadline=0.3)

    async def busy():
        await trio.sleep(0.01)
        time.sleep(0.4)                 # past the hop's time, after its answer
    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        with pytest.raises(ChunkError, match="missing from /nfs/store"):
            await eng.get(x, len(dx))
    assert x not in eng._failed
    await eng.aclose()


def test_a_seed_that_cannot_be_read_is_a_miss(tmp_path):
    (a, da), = [chunk(1)]
    image = tmp_path / "v1.img"
    image.write_bytes(da)
    index = Index.parse(build_index([da], feature_flags=0))
    seed = Seed(index, str(image))
    assert seed.load(a, len(da), "sha256") == da
    os.close(seed._fd)
    seed._fd = os.open(tmp_path, os.O_RDONLY)      # reads fail (EISDIR)
    assert seed.load(a, len(da), "sha256") is None
    seed.close()


def slow_decode(eng, seconds):
    decode = eng._decode

    def slow(*args):
        time.sleep(seconds)
        return decode(*args)
    eng._decode = slow


async def test_a_chunk_decoded_after_its_deadline_is_still_served_and_cached(tmp_path):
    (a, da), = [chunk(1)]
    eng = engine([Store("remote", [(a, da)], delay=0.45)], deadline=0.5,
                 disk=DiskCache(str(tmp_path), 1 << 20))
    slow_decode(eng, 0.1)                     # arrived at 0.45 s, decoded at 0.55 s
    assert await eng.get(a, len(da)) == da
    await eng.aclose()
    assert a in cached(tmp_path).present([a])


class SlowPutCache(DiskCache):
    """A working disk cache on a slow disk."""

    def put(self, cid, data):
        super().put(cid, data)
        time.sleep(0.1)


async def test_chunks_put_while_their_reader_went_away_are_committed_at_close(tmp_path):
    chunks = [chunk(n) for n in range(4)]
    eng = engine([Store("remote", chunks)], disk=SlowPutCache(str(tmp_path), 1 << 20))
    with trio.move_on_after(0.15):            # Ctrl-C in the middle of the puts
        await eng.get_many([_want(c) for c in chunks])
    await eng.aclose()
    assert cached(tmp_path).present([cid for cid, _ in chunks]) == {cid for cid, _ in chunks}


async def test_chunks_that_arrived_are_cached_when_their_load_fails(tmp_path):
    good, (bad, dbad) = [chunk(n) for n in range(3)], chunk(9)
    eng = engine([Staggered(good, {bad: 0.08}, refused=bad)],
                 disk=SlowPutCache(str(tmp_path), 1 << 20))
    with pytest.raises(ChunkError, match="403"):
        await eng.get_many([_want(c) for c in good] + [(bad, len(dbad))], remember=False)
    await eng.aclose()
    assert cached(tmp_path).present([cid for cid, _ in good]) == {cid for cid, _ in good}




class SlowDiskCache(DiskCache):
    """A working disk cache on a slow disk: puts take 20 ms, the close's
    commit 1.2 s."""

    def put(self, cid, data):
        time.sleep(0.02)
        super().put(cid, data)

    def close(self):
        time.sleep(1.2)
        super().close()


async def test_a_slow_disk_cache_gets_every_chunk_and_its_close_is_waited_for(tmp_path):
    chunks = [chunk(n) for n in range(60)]      # 1.2 s of puts: past the 1 s wait
    eng = engine([Store("remote", chunks)], disk=SlowDiskCache(str(tmp_path), 1 << 20))
    assert await eng.get_many([_want(c) for c in chunks]) == [d for _, d in chunks]
    await eng.aclose()                          # as the process would end right after
    assert cached(tmp_path).present([cid for cid, _ in chunks]) == {cid for cid, _ in chunks}



class SlowerDiskCache(DiskCache):
    """A working disk cache much slower than the stores."""

    def __init__(self, path, put_takes):
        super().__init__(path, 1 << 20)
        self.put_takes = put_takes

    def put(self, cid, data):
        with self._lock:
            time.sleep(self.put_takes)
        super().put(cid, data)


async def test_a_disk_slower_than_the_stores_still_gets_every_chunk(tmp_path):
    chunks = [chunk(n) for n in range(40)]
    eng = engine([Store("remote", chunks)], deadline=0.4,
                 disk=SlowerDiskCache(str(tmp_path), put_takes=0.02))
    for part in (chunks[:20], chunks[20:]):     # 0.4 s of puts each
        assert await eng.get_many([_want(c) for c in part]) == [d for _, d in part]
    await written(eng)
    await eng.aclose()
    assert cached(tmp_path).present([cid for cid, _ in chunks]) == {cid for cid, _ in chunks}


class TrackingSlowDisk(DiskCache):
    """A slow disk that tells which chunks it has written."""

    def __init__(self, path, put_takes):
        super().__init__(path, 1 << 30)
        self.put_takes, self.written = put_takes, []

    def put(self, cid, data):
        time.sleep(self.put_takes)
        super().put(cid, data)
        self.written.append(cid)


async def test_a_close_that_cannot_wait_for_every_write_commits_those_made(tmp_path, caplog):
    chunks = [chunk(n) for n in range(60)]
    disk = TrackingSlowDisk(str(tmp_path), put_takes=0.01)      # 0.6 s of puts
    eng = engine([Store("remote", chunks)], deadline=0.4, disk=disk)
    await eng.get_many([_want(c) for c in chunks], urgent=False)
    start = trio.current_time()
    await eng.aclose()                    # the writes waited for 0.1 s, then the close
    assert trio.current_time() - start < 0.4 and not eng._writer.running()
    written = set(disk.written)
    assert 0 < len(written) < 60 and "chunks not cached" in caplog.text
    assert cached(tmp_path).present([cid for cid, _ in chunks]) == written


def test_the_close_is_queued_behind_a_chunk_larger_than_the_queue(monkeypatch):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 4000)
    go, made = threading.Event(), []

    def call(method, *args):
        go.wait(5)
        made.append(method)
    writer = _DiskWriter(call)
    assert writer.put(b"a", b"x" * 1000)
    give_up = time.monotonic() + 1
    while writer._calls and time.monotonic() < give_up:
        time.sleep(0.005)                 # being made: the queue is empty
    assert writer.put(b"b", b"x" * 5000)  # taken alone
    assert not writer.put(b"c", b"x" * 10)
    writer.flush()
    writer.flush()                        # one is enough
    writer.close()
    go.set()
    writer._thread.join(1)
    assert made == ["put", "put", "flush", "close"] and not writer.running()


class BrokenDisk(DiskCache):
    def put(self, cid, data):
        raise RuntimeError("a bug")


async def test_a_writer_ended_by_a_bug_holds_no_load_up(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 4000)
    chunks = [chunk(n) for n in range(20)]
    eng = engine([Store("remote", chunks)], deadline=0.5,
                 disk=BrokenDisk(str(tmp_path), 1 << 20))
    with trio.fail_after(3):
        for c in chunks:
            assert await eng.get_many([_want(c)], urgent=False) == [c[1]]
    assert "writing the disk cache failed: RuntimeError('a bug')" in caplog.text
    await eng.aclose()


async def test_a_reader_never_waits_for_the_disk(tmp_path, monkeypatch):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 3000)
    ahead = [chunk(n) for n in range(40)]
    demand = [chunk(n) for n in range(100, 108)]
    eng = engine([Store("remote", ahead + demand)], deadline=2.0,
                 disk=SlowerDiskCache(str(tmp_path), put_takes=0.1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: eng.get_many([_want(c) for c in ahead], urgent=False))
        await trio.sleep(0.05)                  # the queue is full of readahead
        start = trio.current_time()
        assert await eng.get_many([_want(c) for c in demand]) == [d for _, d in demand]
        assert trio.current_time() - start < 0.2
        nursery.cancel_scope.cancel()
    eng._writer.drop_puts()
    await eng.aclose()


class HangsOnSecondPut(DiskCache):
    def __init__(self, path):
        super().__init__(path, 1 << 20)
        self.release, self.puts = threading.Event(), 0

    def put(self, cid, data):
        self.puts += 1
        if self.puts == 1:
            return super().put(cid, data)      # a row left to commit
        with self._lock:
            self.release.wait(5)


async def test_nothing_is_queued_once_the_cache_counts_as_stuck(tmp_path):
    chunks = [chunk(n) for n in range(2)]
    disk = HangsOnSecondPut(str(tmp_path))
    eng = engine([Store("remote", chunks)], deadline=0.4, disk=disk)
    try:
        for c in chunks:
            await eng.get(*_want(c))
        with trio.fail_after(1):
            while not eng._stuck(eng._disk_place):   # after 0.1 s
                await trio.sleep(0.01)
        queued = list(eng._writer._calls)
        with trio.move_on_after(0.6):
            await eng.maintain()
        assert list(eng._writer._calls) == queued
    finally:
        disk.release.set()
    await eng.aclose()


async def joined_readahead(tmp_path, monkeypatch, refused=False):
    """How long a reader waits for the last chunk of a readahead load that
    is waiting for room in the disk queue (2 chunks, 0.2 s a put)."""
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 2000)
    ahead = [chunk(n) for n in range(10)]
    late, dlate = ahead[-1]
    eng = engine([Staggered(ahead, {late: 0.05}, refused=late if refused else None)],
                 deadline=1.0,
                 disk=TrackingSlowDisk(str(tmp_path), put_takes=0.2))

    async def readahead():
        with contextlib.suppress(ChunkError):
            await eng.get_many([_want(c) for c in ahead], urgent=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(readahead)
        await trio.sleep(0.02)                   # `late` not in yet: the reader joins
        start = trio.current_time()
        with contextlib.suppress(ChunkError):
            assert await eng.get(late, len(dlate)) == dlate
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    eng._writer.drop_puts()
    await eng.aclose()
    return took


@pytest.mark.parametrize("refused", [False, True])
async def test_a_reader_joining_readahead_does_not_wait_for_the_disk(
        tmp_path, monkeypatch, refused):
    assert await joined_readahead(tmp_path, monkeypatch, refused) < 0.3


async def test_a_chunk_a_reader_joined_is_cached_like_the_rest_of_its_load(
        tmp_path, monkeypatch):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 2000)
    ahead = [chunk(n) for n in range(6)]
    wanted, dwanted = ahead[-1]
    delays = {c: 0.02 for c, _ in ahead} | {wanted: 0.06}    # in after the others
    eng = engine([Staggered(ahead, delays)], deadline=2.0,
                 disk=TrackingSlowDisk(str(tmp_path), put_takes=0.05))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: eng.get_many([_want(c) for c in ahead], urgent=False))
        await trio.sleep(0.01)
        nursery.start_soon(eng.get, wanted, len(dwanted))         # urgent now
    await written(eng)
    await eng.aclose()
    assert cached(tmp_path).present([c for c, _ in ahead]) == {c for c, _ in ahead}


async def test_waiting_for_room_leaves_a_corrupt_chunk_its_time_to_be_fetched_again(
        tmp_path, monkeypatch):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 2000)
    chunks = [chunk(n) for n in range(10)]
    first = Staggered(chunks, {chunks[-1][0]: 0.05}, corrupt=chunks[-1][0], name="first")
    eng = engine([first, Store("second", chunks)], deadline=0.5,
                 disk=TrackingSlowDisk(str(tmp_path), put_takes=0.1))   # stuck after 0.125
    got = await eng.get_many([_want(c) for c in chunks], remember=False, urgent=False)
    assert got == [d for _, d in chunks]
    eng._writer.drop_puts()
    await eng.aclose()


class BugOnPut(DiskCache):
    def put(self, cid, data):
        raise RuntimeError("a bug")


async def test_a_writer_ended_by_a_bug_leaves_the_cache_read(tmp_path):
    (a, da), (b, db) = chunk(1), chunk(2)
    cached(tmp_path, (a, da)).close()                 # from an earlier run
    eng = engine([Store("remote", [(b, db)])], disk=BugOnPut(str(tmp_path), 1 << 20))
    assert await eng.get(b, len(db)) == db            # its put breaks the writer
    with trio.fail_after(2):
        while not eng._writer.broken:
            await trio.sleep(0.005)
    assert await eng.get(a, len(da)) == da
    await eng.aclose()
    assert eng.disk._closed


async def test_a_failing_readahead_load_still_caches_what_arrived(tmp_path, monkeypatch):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 3000)   # 3 chunks, 6 forced
    good, (bad, dbad) = [chunk(n) for n in range(6)], chunk(9)
    eng = engine([Staggered(good, {bad: 0.05}, refused=bad)],
                 disk=TrackingSlowDisk(str(tmp_path), put_takes=0.05))
    with pytest.raises(ChunkError, match="403"):
        await eng.get_many([_want(c) for c in good] + [(bad, len(dbad))],
                           remember=False, urgent=False)
    await written(eng)
    await eng.aclose()
    assert cached(tmp_path).present([c for c, _ in good]) == {c for c, _ in good}


class BugOnSecondPut(DiskCache):
    def __init__(self, path):
        super().__init__(path, 1 << 20)
        self.puts = 0

    def put(self, cid, data):
        self.puts += 1
        if self.puts == 2:
            raise RuntimeError("a bug")
        super().put(cid, data)


async def test_what_was_written_before_a_bug_is_committed(tmp_path):
    chunks = [chunk(n) for n in range(2)]
    eng = engine([Store("remote", chunks)], disk=BugOnSecondPut(str(tmp_path)))
    for c in chunks:
        await eng.get(*_want(c))
    with trio.fail_after(2):
        while not eng._writer.broken or not eng._writer.idle():
            await trio.sleep(0.005)
    assert cached(tmp_path).present([chunks[0][0]]) == {chunks[0][0]}
    await eng.aclose()


class BlockedDisk(DiskCache):
    """A disk cache whose puts wait until ``go`` is set."""

    def __init__(self, path):
        super().__init__(path, 1 << 30)
        self.go = threading.Event()

    def put(self, cid, data):
        self.go.wait(10)
        super().put(cid, data)


async def test_a_chunk_read_again_while_kept_aside_is_kept_and_written_once(
        tmp_path, monkeypatch):
    # A bulk read (remember=False) fetches a chunk again each time: a run
    # of zeros in a blob, batch after batch.
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 4000)
    filler, zero = [chunk(n) for n in range(10)], chunk(99)
    disk = BlockedDisk(str(tmp_path))
    written = []
    disk.put = lambda cid, data: (written.append(cid), BlockedDisk.put(disk, cid, data))
    eng = engine([Store("remote", filler + [zero])], disk=disk)
    await eng.get_many([_want(filler[0])], remember=False)
    with trio.fail_after(5):
        while not written:     # until the writer hangs in its first put
            await trio.sleep(0.005)
    await eng.get_many([_want(c) for c in filler[1:6]], remember=False)  # 4 queued, 1 aside
    for _ in range(3):
        await eng.get_many([_want(zero)], remember=False)
    assert zero[0] in eng._deferred
    assert eng._deferred_bytes == sum(len(item[1]) for item in eng._deferred.values())
    disk.go.set()
    await eng.aclose()
    assert written.count(zero[0]) == 1


@pytest.mark.parametrize("upkeep", [False, True])
async def test_chunks_kept_aside_that_a_stuck_cache_lets_go_are_counted_at_the_close(
        tmp_path, monkeypatch, caplog, upkeep):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 2000)
    chunks = [chunk(n) for n in range(5)]
    disk = BlockedDisk(str(tmp_path))                                   # a hung disk
    eng = engine([Store("remote", chunks)], deadline=0.4, disk=disk)    # stuck after 0.1 s
    try:
        async with trio.open_nursery() as nursery:
            if upkeep:
                nursery.start_soon(eng.maintain)
            await eng.get_many([_want(c) for c in chunks])
            # One chunk is being written (hung), the others queued, kept
            # aside, or (past the room for them) not cached.
            kept = len(eng._deferred)
            assert kept == 2
            await trio.sleep(0.3)
            assert bool(eng._deferred) != upkeep    # the upkeep let them go, stuck
            queued = sum(call[0] == "put" for call in eng._writer._calls)
            nursery.cancel_scope.cancel()
        await eng.aclose()
    finally:
        disk.go.set()
    assert f"did not keep up: {queued + kept} chunks not cached" in caplog.text


async def test_failing_loads_queue_at_most_twice_the_bound(tmp_path, monkeypatch):
    # As the walk's stream-ahead does (it goes on after a failed run).
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 2000)
    disk = BlockedDisk(str(tmp_path))
    bad, dbad = chunk(999)
    loads = [[chunk(10 * k + n) for n in range(6)] for k in range(4)]
    eng = engine([Staggered([c for load in loads for c in load], {bad: 0.05}, refused=bad)],
                 disk=disk)
    for load in loads:
        with pytest.raises(ChunkError, match="403"):
            await eng.get_many([_want(c) for c in load] + [(bad, len(dbad))],
                               remember=False, urgent=False)
    assert eng._writer._bytes <= 4000
    disk.go.set()
    await eng.aclose()


async def test_a_load_waiting_for_room_stops_once_the_cache_counts_as_stuck(
        tmp_path, monkeypatch):
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 2000)
    chunks = [chunk(n) for n in range(10)]
    disk = BlockedDisk(str(tmp_path))
    eng = engine([Store("remote", chunks)], deadline=0.4, disk=disk)    # stuck after 0.1 s
    try:
        with trio.fail_after(1):
            await eng.get_many([_want(c) for c in chunks], urgent=False)
    finally:
        disk.go.set()
    await eng.aclose()


async def test_no_writer_thread_without_a_disk_cache():
    eng = engine([Store("remote", [chunk(1)])])
    await eng.get(*_want(chunk(1)))
    await eng.aclose()
    assert eng._writer._thread is None


def behind_a_slow_disk(tmp_path, monkeypatch, count, put_takes=0.05):
    """An engine whose disk writer queues 4 chunks at most, on a disk much
    slower than its store; and ``count`` chunks of that store."""
    monkeypatch.setattr("cafuse.engine.DISK_QUEUE_BYTES", 4000)
    chunks = [chunk(n) for n in range(count)]
    return engine([Store("remote", chunks)], deadline=2.0,
                  disk=SlowerDiskCache(str(tmp_path), put_takes)), chunks


async def test_loads_wait_for_room_while_the_disk_writer_is_a_queue_behind(
        tmp_path, monkeypatch):
    eng, chunks = behind_a_slow_disk(tmp_path, monkeypatch, 12)
    start = trio.current_time()
    assert await eng.get_many([_want(c) for c in chunks], urgent=False) == \
        [d for _, d in chunks]
    assert trio.current_time() - start > 0.3     # 7 or 8 puts' time at least
    await written(eng)
    await eng.aclose()
    assert cached(tmp_path).present([cid for cid, _ in chunks]) == {cid for cid, _ in chunks}


async def test_a_readers_chunks_the_full_queue_did_not_take_are_cached_later(
        tmp_path, monkeypatch):
    eng, chunks = behind_a_slow_disk(tmp_path, monkeypatch, 8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(eng.maintain)
        assert await eng.get_many([_want(c) for c in chunks]) == [d for _, d in chunks]
        with trio.fail_after(5):
            while eng._deferred or not eng._writer.idle():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert cached(tmp_path).present([cid for cid, _ in chunks]) == {cid for cid, _ in chunks}
    await eng.aclose()


async def test_the_close_queues_a_readers_chunks_left_over_up_to_the_room_for_them(
        tmp_path, monkeypatch):
    eng, chunks = behind_a_slow_disk(tmp_path, monkeypatch, 10, put_takes=0.02)
    # No upkeep runs: the close queues the 4 chunks kept waiting for room
    # (those past that room are let go, unless the writer has made room
    # meanwhile).  Before, only those the queue took were cached: 4 or 5.
    assert await eng.get_many([_want(c) for c in chunks]) == [d for _, d in chunks]
    await eng.aclose()
    assert len(cached(tmp_path).present([cid for cid, _ in chunks])) >= 8


async def test_chunks_still_to_be_decoded_are_cached_when_their_load_fails(tmp_path):
    good, (bad, dbad) = [chunk(n) for n in range(3)], chunk(9)
    # The first chunk's decoding takes 0.2 s; meanwhile the others arrive,
    # and then the refusal.
    delays = {good[1][0]: 0.05, good[2][0]: 0.05, bad: 0.1}
    eng = engine([Staggered(good + [(bad, dbad)], delays, refused=bad)],
                 disk=DiskCache(str(tmp_path), 1 << 20))
    slow_decode(eng, 0.2)
    with pytest.raises(ChunkError, match="403"):
        await eng.get_many([_want(c) for c in good] + [(bad, len(dbad))], remember=False)
    await eng.aclose()
    assert cached(tmp_path).present([cid for cid, _ in good]) == {cid for cid, _ in good}

