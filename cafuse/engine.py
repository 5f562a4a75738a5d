"""The chunk engine: "give me chunk X", from the nearest place that has it.

Order of search: the memory LRU, the disk cache, seeds, then the stores in
the order given.  Only chunks from remote stores are written to the disk
cache; seeds and local stores are close enough.  Every chunk from a seed or
store is verified against its id before it is cached or returned.
Concurrent requests for one chunk share one load.  A store that looks down
(after its own retries) is set aside for a back-off period while another
store is left, so one dead mirror costs one deadline, not one per chunk; it
is tried again when the period ends, and meanwhile last, for a chunk that
no other store has.  A remote store slow to answer one chunk is raced by
the next stores.  The disk cache, a seed or a local
store (read in worker threads, which a hung NFS server never lets go) is
skipped while a read from it that was given up on has run for a quarter
of the deadline, until those reads return.  A chunk that no source can
deliver raises ChunkError naming the chunk and what each store said.
"""

import collections
import contextlib
import heapq
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import cachetools
import trio

from . import chunk
from .diskcache import DiskCache, DiskFull
from .errors import CafuseError, ChunkError, ChunkTimeout, ChunkUnanswered, single_errors
from .http import HTTPError
from .slots import Priority

log = logging.getLogger("cafuse")

DEFAULT_MEMORY_BYTES = 64 << 20
ASIDE_DOUBLINGS = 6  # a store failing on each return: aside up to 64 times --backoff
DISK_FAILURES = 3    # failed disk cache calls in a row before going on without it
# A chunk not delivered within its deadline, or because a store gave no
# answer (ChunkUnanswered), fails again at once for this long: the kernel
# follows a failed READ with a READ of the same page, which must not cost
# that wait again.  (Failures where every store answered, a 404, a corrupt
# copy or a local store's error, are not remembered: trying again costs
# little, and the chunk may have been added.)
FAILURE_MEMORY = 1.0
DISK_WARN_EVERY = 60.0  # seconds between warnings about the disk cache
# A remote store whose copies fail verification this many times in a row,
# with no good one between (an HTML page from a captive portal or a proxy,
# an empty body), is set aside like one that looks down.
CORRUPT_IN_A_ROW = 3
# After its first, a store's corrupt copies are warned of at most this
# often (with a count): a bad mirror must not log a line per chunk.
CORRUPT_WARN_EVERY = 60.0
# Chunks waiting for the disk cache writer, at most: when the disk falls
# this far behind the stores, loads nobody waits for wait for it.
DISK_QUEUE_BYTES = 32 << 20
DISK_QUEUE_POLL = 0.01  # seconds between looks for room in a full queue
_DISK_READS = frozenset({"get", "present"})
# Worker threads for decoding, hashing and cache I/O: one per core.  More
# only adds contention (prefetch from nginx: 2.05 s with 2, 2.5 s with 4).
CORES = len(os.sched_getaffinity(0))


@dataclass
class Stats:
    """Where chunks came from; ``sources`` counts by name ("memory",
    "disk cache", "seed", or a store's URL/path)."""
    sources: Counter = field(default_factory=Counter)
    transferred: int = 0      # bytes received from stores (compressed)


class _Place:
    """The disk cache, a seed or a local store, as read in worker threads:
    the calls into it that the event loop gave up on while they ran
    (``given_up``: their hop -> when the call began, monotonic), and
    whether it has been said to be stuck."""
    __slots__ = ("name", "given_up", "warned")

    def __init__(self, name: str):
        self.name = name
        self.given_up: dict[_Hop, float] = {}
        self.warned = False


class _StoreState:
    def __init__(self, store):
        self.store = store
        self.place = _Place(str(store))   # as a local store read in a hop
        self.down_until = 0.0
        self.why_aside = ""              # "after errors", or why it was set aside
        self.answered = -math.inf        # when it last answered a fetch (trio's clock)
        # Set-asides since it last answered well: a 404, or a copy that
        # matched its id.
        self.strikes = 0
        self.corrupt = 0                 # copies in a row that did not match their ids
        self._fetches: set[_Fetch] = set()

    def available(self) -> bool:
        return self.down_until <= time.monotonic()

    @contextlib.contextmanager
    def fetching(self, then=None, race=None):
        """One fetch from this store, cancelled if the store is set aside
        meanwhile (or, if it is set aside as silent and the fetch still
        waits for a connection, ``race()``d); its ``held()`` says it holds
        a connection (and calls ``then()``)."""
        fetch = _Fetch(then, race)
        self._fetches.add(fetch)
        try:
            with fetch.scope:
                yield fetch
        finally:
            self._fetches.discard(fetch)

    def race_queued(self) -> None:
        """Search the next stores beside the fetches still queued for a
        connection, those that can be raced."""
        for fetch in list(self._fetches):
            if not fetch.holding and fetch.race is not None:
                fetch.race()

    def set_aside(self, seconds: float, why: str, silent: bool = False) -> None:
        """Skip this store for ``seconds``.  Fetches waiting on it give up
        now, unless it is only ``silent`` (slow or hung, no one can tell
        yet): then those holding a connection go on, and those queued for
        one are raced by the next stores where they stand, or give up if
        they cannot be raced."""
        self.down_until = time.monotonic() + seconds
        self.why_aside = why
        for fetch in list(self._fetches):
            if silent and fetch.holding:
                continue
            if silent and fetch.race is not None:
                fetch.race()
            else:
                fetch.scope.cancel()


class _Fetch:
    __slots__ = ("scope", "holding", "then", "race")

    def __init__(self, then, race):
        self.scope = trio.CancelScope()
        self.holding = False
        self.then, self.race = then, race

    def held(self) -> None:
        self.holding = True
        if self.then is not None:
            self.then()


class _Shared:
    """A load of one chunk that other demand readers wait for; ``data`` is
    the chunk once loaded (kept for them even when it is too large for the
    memory LRU), ``error`` why the load failed, if it said."""
    __slots__ = ("done", "data", "error", "priority")

    def __init__(self, priority: Priority):
        self.priority = priority
        self.done = trio.Event()
        self.data = None
        self.error = None


_LATER = object()    # what _ask says of a store to ask again last


class _Race:
    """One chunk's search of the stores: the copy that won (``won``: the
    store's position and the fetched bytes), whether a request was ever
    raced (``raced``: then every copy is verified before it wins), the
    requests still running while the next stores are searched
    (``rivals``: _Ask), the scopes of those searches (``searches``), and
    the nursery of the last tries (``tries``), open to more while
    ``trying`` counts some still running, and whether a raced request
    was asked while another store was available (``others``)."""
    __slots__ = ("won", "raced", "rivals", "searches", "tries", "trying", "others")

    def __init__(self):
        self.won = None
        self.raced = False
        self.rivals = set()
        self.searches = set()
        self.tries = None
        self.trying = 0
        self.others = False


class _Ask:
    """A remote store's request for a chunk that the next stores could
    serve.  ``scope`` holds the request; ``held`` is when it got its
    connection; ``searched`` is set, once it is raced, when the search of
    the next stores (``go_on()``, a task of its own) ends; ``waiting`` is
    the scope of that search's wait for a store to come back, if it
    waits."""
    __slots__ = ("state", "scope", "held", "done", "go_on", "searched", "waiting")

    def __init__(self, state, go_on):
        self.state, self.go_on = state, go_on
        self.scope = trio.CancelScope()
        self.held = math.inf
        self.done = False
        self.searched = None
        self.waiting = None

    def race(self) -> None:
        """Search the next stores beside this request (once)."""
        if self.searched is None and not self.done:
            self.searched = trio.Event()
            self.go_on()


class _Watch:
    """A request that cannot be raced (a last try, or one to the last
    store), on the hedger's clock all the same: ``held`` is when it got
    its connection."""
    __slots__ = ("state", "held", "done")

    def __init__(self, state):
        self.state, self.held, self.done = state, math.inf, False


class _Hedger:
    """The clock of a load's races: when a request has held its
    connection for ``after`` seconds without an answer, it ``fire``s, and
    again each ``after`` seconds while ``fire`` says so.  It keeps time in
    the load's task that waits for arrivals (``receive``): a timer task
    per load, or per chunk, costs the event loop more than the rest of a
    chunk's load."""

    def __init__(self, after, fire):
        self._after, self._fire = after, fire
        self._due = []              # (when, count, _Ask), a heap
        self._count = 0
        self._waiting = None        # the scope of receive()'s wait, while it waits

    def held(self, ask: _Ask | _Watch) -> None:
        ask.held = trio.current_time()
        self._due_at(ask.held + self._after, ask)

    def _due_at(self, when, ask):
        heapq.heappush(self._due, (when, self._count, ask))
        self._count += 1
        if self._waiting is not None and when < self._waiting.deadline:
            self._waiting.deadline = when

    async def receive(self, channel):
        """``channel.receive()``, firing what comes due meanwhile."""
        while True:
            now = trio.current_time()
            while self._due and self._due[0][0] <= now:
                ask = heapq.heappop(self._due)[2]
                if not ask.done and self._fire(ask):
                    self._due_at(now + self._after, ask)
            self._waiting = trio.CancelScope(deadline=self._due[0][0] if self._due else math.inf)
            try:
                with self._waiting:
                    return await channel.receive()
            finally:
                self._waiting = None


@dataclass
class _Load:
    """What a chunk's search needs of its load: a nursery for the searches
    a hedge starts, the hedger (None where no store can be raced), and
    the load's deadline."""
    nursery: trio.Nursery
    hedger: _Hedger | None
    until: float


class _Abandoned(Exception):
    """Raised in a hop's thread once the event loop has given up on it."""


class _Hop:
    """One worker-thread hop through the disk cache, seeds and leading
    local stores for several chunks, which the event loop may abandon.
    What the thread found before that is kept (``found``), and so is the
    call it was in (``within``: its ``_Place`` and when it began).  An
    abandoned thread still running keeps its limiter token, so the
    limiter is ``lent`` one more until the thread ends.  The disk
    writer's hop is ``detached``: abandoned from the start (nobody waits
    for it), it goes on with its calls, each counted as given up."""
    __slots__ = ("found", "started", "finished", "abandoned", "within", "lent", "detached")

    def __init__(self, n: int, detached: bool = False):
        self.found = [None] * n
        self.started = False
        self.finished = False
        self.abandoned = False
        self.within = None
        self.lent = False
        self.detached = detached


class _DiskWriter:
    """The one thread that writes the disk cache: ``put`` queues a chunk
    and returns, and the thread makes the calls in order.  The queue holds
    DISK_QUEUE_BYTES of chunks at most (or one larger chunk), twice that
    for puts that ``force`` their way: ``put`` says whether there was room
    (a chunk queued or being written already is taken at once).  Flushes
    and the close are always taken, a flush only when none is queued.
    ``call(method, *args)`` makes one call (blocking); after a
    call that raises anything but a disk error (a bug), the cache is
    ``broken``: what was written is committed, and it takes no more puts
    or new flushes (but is still read, and closed at the end)."""

    def __init__(self, call):
        self._call = call
        self._calls = collections.deque()
        self._unmade = 0          # calls queued or being made
        self._putting = set()     # ids of the chunks queued or being written
        self._bytes = 0
        self._flush_queued = False
        self._ready = threading.Condition()
        self._thread = None
        self.closed = False       # no more calls are taken
        self.broken = False       # no more puts or new flushes are taken

    def put(self, chunk_id, data, force=False) -> bool:
        with self._ready:
            bound = 2 * DISK_QUEUE_BYTES if force else DISK_QUEUE_BYTES
            if self.broken:
                return False
            if chunk_id in self._putting:  # a bulk read fetches a chunk again
                return True
            if self._calls and self._bytes + len(data) > bound:
                return False
            queued = self._queue("put", (chunk_id, data), len(data))
            if queued:
                self._putting.add(chunk_id)
            return queued

    def flush(self) -> None:
        with self._ready:
            if not self._flush_queued and not self.broken:
                self._flush_queued = self._queue("flush", (), 0)

    def close(self) -> None:
        """Queue the cache's close, the last call."""
        with self._ready:
            self._queue("close", (), 0)
            self.closed = True

    def stop(self) -> None:
        """End the thread (if any) once the calls queued are made (they do
        nothing: the cache is gone)."""
        with self._ready:
            self.closed = True
            self._ready.notify()

    def drop_puts(self) -> int:
        """Forget the chunks still queued; how many there were."""
        with self._ready:
            puts = [call for call in self._calls if call[0] == "put"]
            self._calls = collections.deque(c for c in self._calls if c[0] != "put")
            self._bytes = 0
            self._unmade -= len(puts)
            self._putting.difference_update(args[0] for _, args, _ in puts)
        return len(puts)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def idle(self) -> bool:
        """Whether every call queued so far has been made."""
        with self._ready:
            return not self._unmade

    def _queue(self, method, args, size):
        if self.closed:
            return False
        self._calls.append((method, args, size))
        self._unmade += 1
        self._bytes += size
        self._ready.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="cafuse disk cache writer")
            self._thread.start()
        return True

    def _run(self):
        while True:
            with self._ready:
                while not self._calls and not self.closed:
                    self._ready.wait()
                if not self._calls:
                    return
                method, args, size = self._calls.popleft()
                self._bytes -= size
                self._flush_queued &= method != "flush"
            try:
                self._call(method, *args)
            except Exception as e:
                self._broke(method, e)
            with self._ready:
                self._unmade -= 1
                if method == "put":
                    self._putting.discard(args[0])
            if method == "close":
                return

    def _broke(self, method, error):
        log.error("writing the disk cache failed: %r; it is written no more", error)
        with self._ready:
            self.broken = True
            self.drop_puts()
        if method == "put":  # commit what was written before
            try:
                self._call("flush")
            except Exception as e:
                log.error("committing the disk cache failed: %r", e)


class ChunkEngine:
    def __init__(self, stores, digest: str, disk: DiskCache | None = None,
                 seeds=(), memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 threads: int = CORES, deadline: float = 60.0, backoff: float = 5.0):
        self.digest = digest
        self.disk = disk
        self.seeds = list(seeds)
        self.deadline = deadline
        self.backoff = backoff
        self.stats = Stats()
        # A place whose given-up call has run this long is skipped.
        self._stuck_after = deadline / 4
        # A remote store that has not answered a chunk this long after the
        # request got a connection: the next stores are asked too.
        self._hedge_after = deadline / 4
        self._disk_place = _Place("the disk cache")
        self._writer_hop = _Hop(0, detached=True)
        self._writer_hop.abandoned = True
        self._writer = _DiskWriter(self._write_call)
        # Chunks of loads a reader waits for that the full queue did not
        # take, for ``maintain`` to queue once it has room: id -> (id,
        # data, store position), in order; a chunk read again is kept once.
        self._deferred: dict[bytes, tuple] = {}
        self._deferred_bytes = 0
        self._let_go = 0          # of them, once the cache took no more
        self._seed_places = [_Place(str(seed)) for seed in self.seeds]
        states = [_StoreState(s) for s in stores]
        # Local stores ahead of the first remote one are read in the same
        # worker-thread hop as the disk cache and seeds.
        split = next((k for k, s in enumerate(states) if not s.store.blocking), len(states))
        self._near_stores, self._far_stores = states[:split], states[split:]
        self._raced = any(not s.store.blocking for s in self._far_stores[:-1])
        self._memory = cachetools.LRUCache(memory_bytes, getsizeof=len) \
            if memory_bytes else None
        self._big: tuple[bytes | None, bytes] = (None, b"")  # see _remember
        self._loading: dict[bytes, _Shared] = {}
        self._failed = cachetools.TTLCache(4096, FAILURE_MEMORY)
        self._limiter = trio.CapacityLimiter(threads)
        # Loads that may be abandoned at a deadline (disk cache, seeds and
        # local stores: a hung NFS server never returns) keep their tokens
        # until their threads end, so they have tokens of their own: stuck
        # threads must not take those that decoding needs, nor trio's
        # default ones, which name lookups for new connections need.
        self._nearby_limiter = trio.CapacityLimiter(threads)
        self._far_local_limiter = trio.CapacityLimiter(threads)
        self._disk_lock = threading.Lock()
        self._hop_lock = threading.Lock()
        # Failed cache calls in a row, reads (get, present) and writes (put,
        # flush) apart: reads that work must not hide writes that all fail.
        self._disk_failures = {True: 0, False: 0}
        self._disk_warned = -DISK_WARN_EVERY
        # Per store, when a copy that did not match its id was last warned
        # of, and how many have not been since.
        self._corrupt_told: dict[str, tuple[float, int]] = {}

    @property
    def remote_stores(self) -> set[str]:
        """The names of the stores whose chunks go to the disk cache."""
        return {str(state.store) for state in self._far_stores if not state.store.blocking}

    async def get(self, chunk_id: bytes, size: int, remember: bool = True) -> bytes:
        """The verified chunk; ``remember=False`` keeps it out of the memory
        LRU (for bulk reads that would only flush it)."""
        return (await self.get_many([(chunk_id, size)], remember))[0]

    async def get_many(self, wanted: list[tuple[bytes, int]],
                       remember: bool = True, urgent: bool = True) -> list[bytes]:
        """Several chunks at once: the local part of the search runs in one
        worker-thread hop for all of them, the remote part concurrently.

        With ``remember`` (demand reads), a chunk another task is already
        loading is waited for, not loaded twice.  Bulk reads
        (``remember=False``) load what they need themselves: waiting for a
        chunk they would then not find in memory would only cost a second
        load.  Loads that nobody waits for yet (readahead) are not
        ``urgent``: their fetches yield their turn to urgent ones, until an
        urgent reader comes to wait for them."""
        joined = trio.current_time()
        results = [self._from_memory(cid) for cid, _size in wanted]
        for k, (cid, _size) in enumerate(wanted):
            failed = self._failed.get(cid) if results[k] is None and self._failed else None
            if failed is not None:
                raise type(failed)(str(failed))
        mine, theirs, priority, shares = {}, [], {}, {}
        for k, (cid, _size) in enumerate(wanted):
            if results[k] is not None:
                continue
            if remember and cid in self._loading:
                shared = self._loading[cid]
                if urgent:
                    shared.priority.make_urgent()
                theirs.append((k, shared))
            elif cid in mine:
                mine[cid].append(k)
            else:
                mine[cid] = [k]
                priority[cid] = Priority(urgent)
                if remember:
                    self._loading[cid] = shares[cid] = _Shared(priority[cid])
        if mine:
            await self._load_shared(wanted, mine, results, priority, shares)
        for k, shared in theirs:
            await shared.done.wait()
            data = shared.data
            if data is None:
                data = await self._again(wanted[k], remember, urgent, shared.error, joined)
            else:
                self._account("memory")
            results[k] = data
        return results

    async def _load_shared(self, wanted, mine, results, priority, shares):
        """Load ``mine``; each chunk goes to the readers waiting for it
        (its ``shares`` entry) as soon as it is here, not when the whole
        load is, and a load that fails tells them why."""
        def on_arrival(cid, data):
            shared = shares.pop(cid, None)
            if shared is not None:
                self._remember(cid, data, shared.priority.urgent)
                self._settle(cid, shared, data, None)
        error = None
        try:
            await self._load(wanted, mine, results, priority, on_arrival)
            self._flush_disk()
        except CafuseError as e:
            error = e
            if isinstance(e, ChunkTimeout):
                # Its other chunks were given up with it: the same read,
                # asked again at once, would wait for them a second deadline.
                for cid, ks in mine.items():
                    if results[ks[0]] is None and cid not in self._failed:
                        self._remember_failure(cid, priority[cid], ChunkTimeout(
                            f"chunk {cid.hex()}: given up: {e}"))
            raise
        finally:
            for cid, shared in shares.items():
                self._settle(cid, shared, None, error)

    def _settle(self, cid, shared, data, error):
        if self._loading.get(cid) is shared:
            del self._loading[cid]
        shared.data, shared.error = data, error
        shared.done.set()

    async def _again(self, want, remember, urgent, error, joined):
        """A chunk whose load by another task failed (or was cancelled with
        its reader), loaded again within what is left of this reader's own
        deadline; when nothing is left, that load's error.  (If a store gave
        no answer for the chunk, a reader's load remembered that failure,
        and ``get_many`` raises it at once.)"""
        with trio.move_on_at(joined + self.deadline):
            return (await self.get_many([want], remember, urgent))[0]
        raise error or ChunkError(f"chunk {want[0].hex()}: not delivered within "
                                  f"{self.deadline:g} s")

    async def _load(self, wanted, mine, results, priority, on_arrival):
        until = trio.current_time() + self.deadline
        firsts = [ks[0] for ks in mine.values()]
        nearby, gave_up = await self._look_nearby(wanted, firsts)
        far = []
        for k, outcome in zip(firsts, nearby):
            source, data, raw_size, problems = outcome or (None, None, 0, [gave_up])
            if data is None:
                far.append((k, problems))
            else:
                self._warn_corrupt(problems, wanted[k][0], source)
                self._account(source, raw_size)
                results[k] = data
                on_arrival(wanted[k][0], data)
        if far and gave_up and not self._far_stores:
            # Named: a chunk the hop gave no answer for, not one it had found missing.
            k = next(k for k, outcome in zip(firsts, nearby) if outcome is None)
            raise ChunkTimeout(f"chunk {wanted[k][0].hex()}: {gave_up}")
        if far:
            await _FarLoad(self, wanted, results, priority, on_arrival).run(far, until)
        for ks in mine.values():
            for k in ks[1:]:
                results[k] = results[ks[0]]

    def _remember(self, chunk_id, data, urgent=True):
        """Keep a chunk in memory.  A chunk may be up to 128 MiB; one that
        would crowd the LRU is kept alone, the last one a reader waited
        for: its reader's next reads (1 MiB each, from the kernel) would
        otherwise decode it again each time."""
        if self._memory is None:
            return
        if len(data) <= self._memory.maxsize // 4:
            self._memory[chunk_id] = data
        elif urgent:
            self._big = (chunk_id, data)

    def peek(self, chunk_id: bytes) -> bytes | None:
        """The chunk if it is in memory, else None, at once."""
        return self._from_memory(chunk_id)

    def _from_memory(self, chunk_id):
        data = self._memory.get(chunk_id) if self._memory is not None else None
        if data is None and self._big[0] == chunk_id:
            data = self._big[1]
        if data is not None:
            self._account("memory")
        return data

    async def _look_nearby(self, wanted, firsts):
        """``_nearby`` of each first of ``wanted``, in one worker-thread hop
        (none when there is nowhere near to look): its outcome, or None
        where the hop gave no answer.

        The hop is abandoned, not waited for, at its time limit (or when
        its reader goes): a local store on a hung NFS server never returns.
        When remote stores follow, that limit is half the deadline, and the
        chunks the hop had not found go on to them.  Also returned: what to
        say of those chunks if it was abandoned, else None."""
        if self.disk is None and not self.seeds and not self._near_stores:
            return [(None, None, 0, []) for _ in firsts], None  # a problems list each
        hop = _Hop(len(firsts))

        def look():
            cached = self._near_call(hop, self._disk_place, self._disk_call, "present",
                                     [wanted[k][0] for k in firsts]) or set()
            for i, k in enumerate(firsts):
                outcome = self._nearby(hop, *wanted[k], wanted[k][0] in cached)
                with self._hop_lock:
                    if hop.abandoned:
                        return
                    hop.found[i] = outcome
        limit = self.deadline / 2 if self._far_stores else self.deadline
        problem = await self._in_thread(hop, look, limit)
        # (Given up between its last answer and its end, it left nothing out.)
        return hop.found, problem if None in hop.found else None

    async def _in_thread(self, hop, work, limit):
        """Run ``work()``, which makes its calls into local places with
        ``_near_call``, in a worker thread for ``hop``, abandoned after
        ``limit`` seconds or when cancelled from outside.  None once it has
        finished; else what to say of what it had not done."""
        trio_token = trio.lowlevel.current_trio_token()

        def run():
            with self._hop_lock:
                hop.started = True
            try:
                work()
            except _Abandoned:
                pass
            finally:
                with self._hop_lock:
                    hop.finished = True
                    lent = hop.lent
                if lent:
                    with contextlib.suppress(trio.RunFinishedError):
                        trio_token.run_sync_soon(self._take_back_token)
        try:
            with trio.move_on_after(limit):
                await trio.to_thread.run_sync(run, limiter=self._nearby_limiter,
                                              abandon_on_cancel=True)
                return None
        except BaseException:  # cancelled from outside: its thread is left too
            self._abandon(hop, limit)
            raise
        return self._abandon(hop, limit)

    def _abandon(self, hop, limit):
        """Give up on ``hop`` (None if its thread has just finished after
        all); what to say of what it had not done.  The call it is in is
        counted against its place, and while its thread runs on (holding
        its token) the limiter has one more."""
        with self._hop_lock:
            if hop.finished:
                return None
            hop.abandoned = True
            within = hop.within
            if within is not None:
                place, began = within
                place.given_up[hop] = began
            hop.lent = hop.started
        if hop.lent:
            self._nearby_limiter.total_tokens += 1
        if within is not None:
            return f"{within[0].name} gave no answer within {limit:g} s"
        if not hop.started:
            return ("no worker thread was free for the disk cache, seeds and local "
                    f"stores within {limit:g} s")
        return f"the disk cache, seeds and local stores gave no answer within {limit:g} s"

    def _take_back_token(self):
        self._nearby_limiter.total_tokens -= 1

    def _nearby(self, hop, chunk_id, size, cached):
        """Disk cache (if ``cached`` says it lists the chunk), seeds, leading
        local stores (blocking, in ``hop``'s thread): (source, data or
        None, bytes read from a store, problems)."""
        if cached:
            data = self._near_call(hop, self._disk_place, self._disk_call, "get", chunk_id)
            if data is not None and len(data) == size:
                return "disk cache", data, 0, []
        for seed, place in zip(self.seeds, self._seed_places):
            if not self._stuck(place):
                data = self._near_call(hop, place, seed.load, chunk_id, size, self.digest)
                if data is not None:
                    return "seed", data, 0, []
        problems = []
        for state in self._near_stores:
            if self._stuck(state.place):
                problems.append(f"{state.store} skipped: an earlier load from it "
                                "has not returned")
                continue
            try:
                found = self._near_call(hop, state.place, state.store.load, chunk_id)
            except CafuseError as e:
                problems.append(_problem(e, chunk_id, state.store))
                continue
            if found is None:
                problems.append(f"missing from {state.store}")
                continue
            try:
                data = chunk.decode(*found, chunk_id, size, self.digest)
            except ChunkError as e:
                problems.append(_problem(e, chunk_id, state.store, _Corrupt))
                continue
            return str(state.store), data, len(found[0]), problems
        return None, None, 0, problems

    def _stuck(self, place):
        """Whether a call into ``place`` that was given up on has run for
        ``_stuck_after`` (a young one may only have been slow)."""
        now = time.monotonic()
        with self._hop_lock:
            stuck = any(now - began >= self._stuck_after for began in place.given_up.values())
            tell = stuck and not place.warned
            place.warned |= stuck
        if tell:
            log.warning("%s has not answered for %g s; skipping it until it does",
                        place.name, self._stuck_after)
        return stuck

    def _near_call(self, hop, place, call, *args):
        """``call(*args)`` (blocking), as the call ``hop`` is in, at ``place``."""
        with self._hop_lock:
            now = time.monotonic()
            if hop.abandoned:
                if not hop.detached:
                    raise _Abandoned
                place.given_up[hop] = now
            hop.within = (place, now)
        try:
            return call(*args)
        finally:
            with self._hop_lock:
                hop.within = None
                place.given_up.pop(hop, None)
                back = place.warned and not place.given_up
                if back:
                    place.warned = False
            if back:
                log.warning("%s answered again", place.name)

    async def _far_again(self, want, problems, position, error, priority, passed, load):
        """After ``error`` from the store at ``position``: the next stores,
        until the load's deadline, then those ``passed`` over; the chunk
        and the store's position."""
        while True:
            self._corrupt_copy(problems, want[0], position, error)
            position, found = await self._fetch_with_deadline(want, problems, position + 1,
                                                              priority, passed, load)
            outcome = await trio.to_thread.run_sync(self._decode, want, position, found,
                                                    limiter=self._limiter)
            if not isinstance(outcome, ChunkError):
                self._served(problems, want[0], position, found)
                return outcome, position
            error = outcome

    async def _fetch_with_deadline(self, want, problems, start, priority, passed, load):
        """(store position, (raw bytes, compressed)) from the first of the
        remaining stores, from ``start`` on, that has the chunk, by the
        load's deadline.  A store ``passed`` over (set aside, timed out
        while others were left, or outrun: its position -> whether it has
        had its last try) gets its full tries once, after them, if none of
        them had the chunk."""
        chunk_id = want[0]
        with trio.move_on_at(load.until):
            race = _Race()
            await self._search(race, want, problems, start, priority, passed, load)
            if race.won is None:
                await self._last_tries(race, want, problems, priority, passed, load)
            if race.won is None:
                raise self._failure(chunk_id, priority, problems)
            return race.won
        # The searches a race started end at the same deadline: let them
        # say which of their stores never answered.
        await trio.lowlevel.checkpoint()
        told = _said(problems) or ["no answer from " + ", ".join(
            str(state.store) for state in self._far_stores[start:])]  # none was asked yet
        told.append(f"not delivered within {self.deadline:g} s")
        error = ChunkTimeout(f"chunk {chunk_id.hex()}: " + "; ".join(told))
        self._remember_failure(chunk_id, priority, error)
        raise error

    def _failure(self, chunk_id, priority, problems) -> ChunkError:
        """The error of a chunk that every store was asked for in vain;
        remembered if a store's last word on it was no answer."""
        message = f"chunk {chunk_id.hex()}: " + "; ".join(_said(problems) or ["no stores"])
        if not _unanswered(problems):
            return ChunkError(message)
        error = ChunkUnanswered(message)
        self._remember_failure(chunk_id, priority, error)
        return error

    def _remember_failure(self, chunk_id, priority, error):
        """Only for a chunk a reader waited for all along: readahead may
        run out of its deadline queued behind readers, which says nothing
        of the store, also when a reader came to wait for it at the end
        (that reader tries again within its own deadline)."""
        if priority.from_start:
            self._failed.expire()
            self._failed[chunk_id] = error

    async def _last_tries(self, race, want, problems, priority, passed, load):
        """The last tries of the stores passed over, all at once (any of
        them may hang), until a copy wins ``race``; with more than one,
        each copy is verified before it wins.  A store passed over
        meanwhile (a raced request that timed out) joins them, or gets its
        own after them."""
        while race.won is None:
            left = [position for position, had_it in passed.items() if not had_it]
            if not left:
                return
            race.raced = race.raced or len(left) > 1
            try:
                async with trio.open_nursery() as race.tries:
                    race.searches.add(race.tries.cancel_scope)  # a win ends the others
                    for position in left:
                        passed[position] = True
                        race.trying += 1
                        race.tries.start_soon(self._last_try, race, want, problems, priority,
                                              position, load)
                race.searches.discard(race.tries.cancel_scope)
            finally:
                race.tries = None

    async def _last_try(self, race, want, problems, priority, position, load):
        try:
            found = await self._ask_watched(load, self._far_stores[position], want[0],
                                            problems, priority, False, last_try=True)
            if found is not None:
                await self._claim(race, want, problems, position, found)
        finally:
            # The nursery closes as its last task ends, before _last_tries
            # runs again: none may join it from then on.
            race.trying -= 1

    async def _search(self, race, want, problems, start, priority, passed, load):
        """Ask the stores from ``start`` on, in order, until one wins ``race``."""
        for position in range(start, len(self._far_stores)):
            state = self._far_stores[position]
            if race.won is not None:
                return
            if position in passed:
                continue
            if not state.available():
                problems.append(_Aside.of(state))
                passed[position] = False
                continue
            others_left = any(other.available() for other in self._far_stores[position + 1:])
            # Raced even if the next stores are all set aside now: by the
            # time it is raced they may be back, or get their last tries.
            if (position + 1 < len(self._far_stores) and not state.store.blocking
                    and load.hedger is not None):
                if await self._ask_racing(race, want, problems, position, priority, passed,
                                          load, others_left):
                    return
                continue
            found = await self._ask_watched(load, state, want[0], problems, priority,
                                            others_left)
            if found is _LATER:
                passed[position] = False
            elif found is not None and await self._claim(race, want, problems, position, found):
                return

    async def _ask_racing(self, race, want, problems, position, priority, passed, load,
                          others_left):
        """Ask a remote store that others follow.  If its request holds a
        connection for a quarter of the deadline without an answer, the
        hedger starts the search of the next stores beside it (keeping the
        request: a slow store's answer is not lost); the first copy that
        verifies wins.  Whether the search is over (won, or the next
        stores searched)."""
        state = self._far_stores[position]

        async def go_on():
            race.raced = True
            if not ask.done:
                race.rivals.add(ask)
            with trio.move_on_at(load.until) as scope:
                race.searches.add(scope)
                await self._search(race, want, problems, position + 1, priority, passed, load)
                if race.won is None and not ask.done and not race.others:
                    # Not a dead mirror's request per chunk beside a slow
                    # store's: the stores set aside are asked once back.
                    await self._until_one_is_back(ask, [
                        self._far_stores[p] for p, had_it in passed.items() if not had_it])
                if race.won is None and not ask.done:
                    await self._last_tries(race, want, problems, priority, passed, load)
            race.searches.discard(scope)
            ask.searched.set()
        ask = _Ask(state, lambda: load.nursery.start_soon(go_on))
        # A request of the race's own search was asked of a store that is
        # there: the stores passed over are no dead mirrors behind it alone.
        race.others = race.others or others_left or race.raced
        found = None
        try:
            with ask.scope:
                found = await self._ask(
                    state, want[0], problems, priority, others_left,
                    lambda: load.hedger.held(ask), race=ask.race)
        finally:  # also when a rival's win cancels this search
            ask.done = True
            if ask.waiting is not None:
                ask.waiting.cancel()
        race.rivals.discard(ask)
        if found is _LATER and race.trying:  # last tries are on: join them
            passed[position] = race.raced = True
            race.trying += 1
            race.tries.start_soon(self._last_try, race, want, problems, priority, position, load)
        elif found is _LATER:
            passed[position] = False
        elif found is not None and await self._claim(race, want, problems, position, found):
            return True
        if ask.searched is None:
            return race.won is not None
        if race.won is None:
            await ask.searched.wait()
        return True

    @staticmethod
    async def _until_one_is_back(ask, stores):
        """Wait while every one of ``stores`` (if any) is set aside, until
        the first is back or ``ask``'s request ends."""
        with trio.CancelScope() as ask.waiting:
            while stores and not any(state.available() for state in stores):
                back = min(state.down_until for state in stores)
                await trio.sleep(max(0.0, back - time.monotonic()))

    async def _ask_watched(self, load, state, chunk_id, problems, priority, others_left,
                           last_try=False):
        """``_ask`` for a request that cannot be raced (a last try, or one
        to the last store), watched by the load's
        hedger: while it holds a connection without an answer, the
        requests queued behind it must not wait for its deadline."""
        watch = _Watch(state)
        held = None if load.hedger is None else lambda: load.hedger.held(watch)
        try:
            return await self._ask(state, chunk_id, problems, priority, others_left, held,
                                   last_try)
        finally:
            watch.done = True

    def _hedge(self, ask) -> bool:
        """A request has held its connection for a quarter of the deadline
        without an answer: the next stores are searched beside it.  A store
        that has answered nothing since is slow or hung: it is set aside
        for new requests, and those queued for it are raced too where they
        stand (a slow store may be the only one with their chunks).  A
        request that cannot be raced (a _Watch) only gets those queued
        behind it raced, each time it comes due (True: again later); the
        store is not set aside for it, since a slow store's last try says
        nothing new of the store."""
        if isinstance(ask, _Watch):
            if ask.state.answered < ask.held:
                ask.state.race_queued()
            return True
        if ask.done:
            return False
        # Also when it was raced while still queued: then nobody has yet
        # said that the store is silent.
        if ask.state.answered < ask.held and ask.state.available():
            self._set_aside(ask.state, HTTPError(
                f"no answer from {ask.state.store} within {self._hedge_after:g} s", True),
                silent=True)
        ask.race()
        return False

    async def _claim(self, race, want, problems, position, found):
        """Whether the race is over with the copy from ``position``: it
        wins at once if the chunk was never raced, else once it verifies (a
        corrupt copy must not cost a good store its request); the requests
        and searches it outruns are given up.  False if it is corrupt: the
        search goes on."""
        if race.won is None and race.raced:
            outcome = await trio.to_thread.run_sync(self._decode, want, position, found,
                                                    limiter=self._limiter)
            if isinstance(outcome, ChunkError):
                self._corrupt_copy(problems, want[0], position, outcome)
                return False
            found = _Verified(found, outcome)
        if race.won is None:
            race.won = position, found
            for rival in race.rivals:
                rival.scope.cancel()
            for search in race.searches:  # the claimant's own has nothing left to wait for
                search.cancel()
        return True

    async def _ask(self, state, chunk_id, problems, priority, others_left, held=None,
                   last_try=False, race=None):
        """The chunk from one store; None (and why, in ``problems``) if it
        has not got it, _LATER if it is to be asked again last: a try
        timed out while ``others_left``, or the store was set aside
        meanwhile.  ``held()`` is called once the request holds a
        connection; ``race()`` starts a search of the next stores beside a
        request still queued when the store is set aside as silent.  A
        ``last_try`` goes on when the store is set aside."""
        try:
            if state.store.blocking:
                found = await trio.to_thread.run_sync(state.store.load, chunk_id,
                                                      limiter=self._far_local_limiter,
                                                      abandon_on_cancel=True)
            elif last_try:
                found = await state.store.fetch(chunk_id, priority, others_left, held)
            else:
                with state.fetching(held, race) as fetch:
                    found = await state.store.fetch(chunk_id, priority, others_left,
                                                    fetch.held)
                if fetch.scope.cancelled_caught:
                    problems.append(_Aside.of(state))
                    return _LATER
            state.answered = trio.current_time()
            if found is None:   # a copy, once it matches its id (_served)
                state.strikes = 0
        except trio.Cancelled:  # the deadline, most often: named if it fails
            problems.append(_Silent(state.store))
            raise
        except CafuseError as e:
            looks_down = getattr(e, "retryable", False)
            problems.append(_problem(e, chunk_id, state.store, _NoAnswer if looks_down else _Word))
            later = getattr(e, "timed_out", False) and others_left
            # A store that answered another chunk since the try began is
            # not down: only this request got stuck.
            if not (later and state.answered > e.began):
                self._set_aside(state, e)
            return _LATER if later else None
        if found is None:
            problems.append(_Word(f"missing from {state.store}", state.store))
        return found

    def _decode(self, want, position, found):
        """Decode and verify a fetched chunk (blocking, in a thread); the
        ChunkError is returned, not raised, so one bad chunk of a batch does
        not lose the others."""
        if isinstance(found, _Verified):
            return found.data
        chunk_id, size = want
        try:
            return chunk.decode(*found, chunk_id, size, self.digest)
        except ChunkError as e:
            return e

    def _put_disk(self, chunks, force=False):
        """Queue chunks (``(id, data, store position)``) from remote stores
        for the disk cache (local ones are close enough); those the full
        queue did not take (with ``force``, up to twice its bound).
        Nothing is queued once the cache counts as stuck."""
        if not self._takes_puts():
            return []
        left = [(cid, data, position) for cid, data, position in chunks
                if not self._far_stores[position].store.blocking]
        while left and self._writer.put(left[0][0], left[0][1], force):
            kept = self._deferred.pop(left[0][0], None)  # taken from a later load
            if kept is not None:
                self._deferred_bytes -= len(kept[1])
            del left[0]
        return left

    def _takes_puts(self) -> bool:
        return not (self.disk is None or self._writer.closed or self._writer.broken
                    or self._stuck(self._disk_place))

    async def _put_disk_patiently(self, chunks):
        """``_put_disk`` of the list ``chunks``, waiting for room in the
        queue: a disk slower than the stores slows the load down to its
        pace rather than lose chunks (unless the load goes away).  The list
        keeps what is still to be queued."""
        while chunks:
            await trio.sleep(DISK_QUEUE_POLL)
            chunks[:] = self._put_disk(chunks)

    def _defer_puts(self, chunks):
        """Keep what ``_put_disk`` left of a load a reader waits for (which
        must not wait for room) until ``maintain`` finds room for it: up
        to DISK_QUEUE_BYTES of chunks; the others are not cached."""
        dropped = 0
        for item in chunks:
            if item[0] in self._deferred:
                continue
            if self._deferred_bytes + len(item[1]) > DISK_QUEUE_BYTES:
                dropped += 1
            else:
                self._deferred[item[0]] = item
                self._deferred_bytes += len(item[1])
        if dropped:
            log.debug("%d chunks not cached: the disk cache is behind", dropped)

    def _put_deferred(self) -> None:
        """Queue the deferred chunks the writer has room for, in order;
        once the cache takes no more, let them all go (counted, for the
        close to say)."""
        if not self._deferred:
            return
        if not self._takes_puts():
            dropped = self._drop_deferred()
            log.debug("%d chunks not cached: the disk cache takes no more", dropped)
            return
        self._put_disk(list(self._deferred.values()))  # what it takes leaves _deferred

    def _drop_deferred(self) -> int:
        dropped = len(self._deferred)
        self._let_go += dropped
        self._deferred.clear()
        self._deferred_bytes = 0
        return dropped

    def _flush_disk(self):
        if self.disk is not None and self.disk.flush_due() \
                and not self._stuck(self._disk_place):
            self._writer.flush()

    def _write_call(self, method, *args):
        """A call of the disk writer, counted against the disk cache while
        it runs: once one has run for a quarter of the deadline, the cache
        counts as stuck (a hung NFS home directory)."""
        self._near_call(self._writer_hop, self._disk_place, self._disk_call, method, *args)

    def _disk_call(self, method, *args):
        """A disk cache call (in a worker thread); a failure is a miss, or
        a chunk not cached, and so is a call while the cache is stuck."""
        disk = self.disk
        if disk is None or self._stuck(self._disk_place):
            return None
        try:
            result = getattr(disk, method)(*args)
        except (CafuseError, OSError, sqlite3.Error) as e:
            self._disk_failed(disk, method in _DISK_READS, e)
            return None
        self._disk_failures[method in _DISK_READS] = 0
        return result

    def _disk_failed(self, disk, reading, error):
        """A full disk only keeps new chunks out of the cache; any other
        failure is forgiven until DISK_FAILURES reads or writes fail in a
        row (a broken index, a vanished directory), when the engine closes
        the cache and goes on without it."""
        with self._disk_lock:  # several worker threads may fail at once
            if self.disk is not disk:
                return
            if isinstance(error, DiskFull):
                self._warn_about_disk(f"{error}; new chunks are not cached")
                return
            self._disk_failures[reading] += 1
            if self._disk_failures[reading] < DISK_FAILURES:
                self._warn_about_disk(str(error))
                return
            self.disk = None
        log.warning("%s; going on without the disk cache", error)
        try:
            disk.close()
        except (CafuseError, OSError, sqlite3.Error):
            pass  # it is broken: that is why it is closed

    def _warn_about_disk(self, message):
        now = time.monotonic()
        if now - self._disk_warned >= DISK_WARN_EVERY:
            self._disk_warned = now
            log.warning("%s", message)

    def _set_aside(self, state, error, silent=False):
        """After ``error`` (its own retries spent), skip a store that looks
        down (no connection, timeouts, 5xx) for a while, so a dead mirror
        costs one deadline, not one per chunk.  An answer about one chunk
        (a 403, a body too large) says nothing of the others."""
        if getattr(error, "retryable", False):
            self._put_aside(state, "for not answering" if silent else "after errors",
                            str(error), silent)

    def _corrupt_copy(self, problems, chunk_id, position, error):
        """A copy from the store at ``position`` that does not match its id
        (``error``), told in ``problems``.  A remote store whose copies
        keep failing (CORRUPT_IN_A_ROW, no good one between) is set aside:
        it answers, but asking it first for every chunk costs a request
        and a warning each."""
        state = self._far_stores[position]
        problems.append(_problem(error, chunk_id, state.store, _Corrupt))
        state.corrupt += 1
        if state.corrupt >= CORRUPT_IN_A_ROW and not state.store.blocking:
            state.corrupt = 0   # on its return, as many again
            self._put_aside(state, "for answers that do not match their chunk ids",
                            f"{CORRUPT_IN_A_ROW} answers in a row did not match their chunk ids")

    def _served(self, problems, chunk_id, position, found):
        """The store at ``position`` served a copy that matched its id: it
        answered well."""
        state = self._far_stores[position]
        state.corrupt = state.strikes = 0
        self._warn_corrupt(problems, chunk_id, str(state.store))
        self._account(str(state.store), len(found[0]))

    def _put_aside(self, state, why, said, silent=False):
        """Skip a store for a while (``why``, after what ``said``); twice
        as long each time it fails again on its return, until it answers
        well.  The last store left is never skipped: there is nothing to
        skip to, and its next answer may well be a good one."""
        if not any(other.available() for other in self._far_stores if other is not state):
            return
        back = state.available()  # else its time aside is only renewed
        news = back or state.why_aside != why
        if back:
            state.strikes += 1
        seconds = self.backoff * 2 ** min(max(state.strikes - 1, 0), ASIDE_DOUBLINGS)
        state.set_aside(seconds, why, silent)
        log.log(logging.WARNING if news else logging.DEBUG,
                "%s; setting store %s aside for %g s", said, state.store, seconds)

    def _warn_corrupt(self, problems, chunk_id, source):
        """Warn of the copies in ``problems`` that did not match their ids,
        now that ``source`` served the chunk: a store's first one, then at
        most one per CORRUPT_WARN_EVERY, with how many went untold."""
        now = time.monotonic()
        for problem in problems:
            if not isinstance(problem, _Corrupt):
                continue
            last, untold = self._corrupt_told.get(problem.store, (-math.inf, 0))
            if now - last < CORRUPT_WARN_EVERY:
                self._corrupt_told[problem.store] = last, untold + 1
                continue
            self._corrupt_told[problem.store] = now, 0
            more = f" ({untold} more from {problem.store} since the last warning)" \
                if untold else ""
            log.warning("chunk %s: %s; served by %s instead%s", chunk_id.hex(), problem,
                        source, more)

    def _account(self, source, raw_size=0):
        self.stats.sources[source] += 1
        self.stats.transferred += raw_size

    async def maintain(self) -> None:
        """Run beside the work (in its nursery): commits cache rows that
        would otherwise wait for the next write, so a process killed while
        slow fetches hang keeps what it had fetched."""
        while True:
            await trio.sleep(DISK_QUEUE_POLL if self._deferred else 0.25)
            self._put_deferred()
            self._flush_disk()

    async def finish_writes(self) -> None:
        """Wait until the disk cache writer has made every call queued so
        far, for as long as its calls go on returning (not once the cache
        counts as stuck): for ``cafuse prefetch``, whose job is the cache,
        where ``aclose`` would drop what a slow disk has still to write."""
        while (self._deferred or not self._writer.idle()) and self.disk is not None \
                and not self._stuck(self._disk_place):
            await trio.sleep(DISK_QUEUE_POLL)
            self._put_deferred()

    async def aclose(self) -> None:
        for store, (_last, untold) in self._corrupt_told.items():
            if untold:
                log.warning("%d more copies from %s did not match their chunk ids since the "
                            "last warning; other stores served those chunks", untold, store)
        for state in self._near_stores + self._far_stores:
            await state.store.aclose()
        for seed in self.seeds:
            seed.close()
        if self.disk is None:
            self._writer.stop()
            return
        # The chunks kept aside, the writer's queue, then its last call,
        # the cache's close, are waited for (the process may end right
        # after), unless the cache is stuck: a quarter of the deadline, and
        # as long again for the close once the chunks still queued are
        # dropped.
        until = trio.current_time() + self._stuck_after
        await self._drain_deferred(until)
        dropped = self._let_go
        self._writer.close()
        if not await self._writer_done(until):
            dropped += self._writer.drop_puts()
            await self._writer_done(trio.current_time() + self._stuck_after)
        if dropped:
            log.warning("the disk cache did not keep up: %d chunks not cached", dropped)

    async def _drain_deferred(self, until) -> None:
        """Queue the deferred chunks as the writer makes room, until
        ``until`` and not while the cache is stuck; those left are let go."""
        with trio.move_on_at(until):
            self._put_deferred()
            while self._deferred:
                await trio.sleep(DISK_QUEUE_POLL)
                self._put_deferred()
        self._drop_deferred()

    async def _writer_done(self, until) -> bool:
        """Wait for the writer's end, until ``until`` at most, and not
        while the cache is stuck."""
        with trio.move_on_at(until):
            while self._writer.running():
                if self._stuck(self._disk_place):
                    return False
                await trio.sleep(0.01)
            return True
        return False


class _FarLoad:
    """The chunks of a load that only the remote (far) stores can give,
    fetched concurrently; what has arrived is decoded in one worker-thread
    hop per group (a hop per chunk costs the event loop, which is what
    bounds remote fetching).  A chunk that does not decode to its id is
    fetched again from the next store.  All of it ends at the load's
    deadline.  A chunk that cannot be had fails the load once the chunks
    that arrived before it are decoded and cached."""

    def __init__(self, engine: "ChunkEngine", wanted, results, priority, on_arrival):
        self.engine = engine
        self.wanted, self.results = wanted, results
        self.priority, self.on_arrival = priority, on_arrival
        self.hedger = _Hedger(engine._hedge_after, engine._hedge) if engine._raced else None
        self.waiting = []     # its chunks that wait for room in the disk queue, in groups

    def _priority(self, k) -> Priority:
        return self.priority[self.wanted[k][0]]

    async def run(self, far, until):
        """Fetch ``far`` (pairs of a position in ``wanted`` and the list of
        problems met so far) into ``results``, by ``until``."""
        # A fetch tells its chunk or its error; a chunk fetched again after
        # a corrupt copy (``_again``) tells its error, or that it is done.
        self._arrived_in, self._arrived = trio.open_memory_channel(2 * len(far))
        # Nobody waits for this load (readahead, prefetch): a disk slower
        # than the stores may slow it down, but not the readers who join it.
        self.patient = not any(self._priority(k).urgent for k, _problems in far)
        self.passed = {k: {} for k, _problems in far}   # stores to ask last, per chunk
        with single_errors():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.load = _Load(nursery, self.hedger, until)
                nursery.start_soon(self._decode_arrivals, len(far))
                for k, problems in far:
                    nursery.start_soon(self._fetch, k, problems)

    async def _fetch(self, k, problems):
        try:
            position, found = await self.engine._fetch_with_deadline(
                self.wanted[k], problems, 0, self._priority(k), self.passed[k], self.load)
        except CafuseError as e:
            self._arrived_in.send_nowait((k, problems, None, e))
        else:
            self._arrived_in.send_nowait((k, problems, position, found))

    async def _again(self, k, problems, position, error):
        want = self.wanted[k]
        try:
            self.results[k], position = await self.engine._far_again(
                want, problems, position, error, self._priority(k), self.passed[k], self.load)
        except CafuseError as e:
            self._arrived_in.send_nowait((k, problems, None, e))
            return
        self.on_arrival(want[0], self.results[k])
        self._keep([(want[0], self.results[k], position)])
        self._arrived_in.send_nowait((k, problems, None, None))

    async def _decode_arrivals(self, left):
        while left:
            group = await self._next_group()
            left -= len(group)
            left += await self._deliver([item for item in group if item[2] is not None])
            failures = [found for _k, _problems, position, found in group
                        if position is None and found is not None]
            if failures:
                # What arrived before is cached all the same, past the
                # queue's bound (up to twice it).
                dropped = sum(len(self.engine._put_disk(chunks, force=True))
                              for chunks in self.waiting)
                if dropped:
                    log.debug("%d chunks not cached: the disk cache is behind", dropped)
                raise failures[0]

    async def _next_group(self):
        """What has arrived: at least one, all that there is."""
        group = [await (self.hedger.receive(self._arrived) if self.hedger
                        else self._arrived.receive())]
        while True:
            try:
                group.append(self._arrived.receive_nowait())
            except trio.WouldBlock:
                return group

    async def _deliver(self, group) -> int:
        """Decode the chunks of ``group`` in one hop; hand on and cache
        those that decode to their ids, and fetch the others again (not to
        hold up the rest).  How many are fetched again."""
        engine = self.engine
        outcomes = await trio.to_thread.run_sync(
            lambda: [engine._decode(self.wanted[k], position, found)
                     for k, _problems, position, found in group],
            limiter=engine._limiter) if group else []
        delivered, again = [], 0
        for (k, problems, position, found), outcome in zip(group, outcomes):
            if isinstance(outcome, ChunkError):
                self._nursery.start_soon(self._again, k, problems, position, outcome)
                again += 1
                continue
            engine._served(problems, self.wanted[k][0], position, found)
            self.results[k] = outcome
            self.on_arrival(self.wanted[k][0], outcome)
            delivered.append((self.wanted[k][0], outcome, position))
        self._keep(delivered)
        return again

    def _keep(self, delivered):
        """Queue ``delivered`` for the disk cache; what the full queue did
        not take waits for room if nobody waits for this load, else is
        kept aside for ``maintain``."""
        left = self.engine._put_disk(delivered)
        if left and self.patient:
            self.waiting.append(left)
            self._nursery.start_soon(self.engine._put_disk_patiently, left)
        elif left:
            self.engine._defer_puts(left)


class _Verified(tuple):
    """A fetched copy, (raw bytes, compressed), that was decoded and
    verified while it raced: its ``data`` is not decoded again."""

    def __new__(cls, found, data):
        copy = super().__new__(cls, found)
        copy.data = data
        return copy


class _Word(str):
    """What a store (``store``: its name) said of a chunk, for the chunk's
    error; ``answered`` is False when it gave no answer."""
    answered = True

    def __new__(cls, text, store):
        word = super().__new__(cls, text)
        word.store = str(store)
        return word


class _NoAnswer(_Word):
    """A store that looks down: its tries timed out or failed (no
    connection, 5xx, 429)."""
    answered = False


class _Corrupt(_Word):
    """A copy not matching its id: a warning if another store then serves
    the chunk (if none does, the chunk's error says it)."""


class _Silent(str):
    """A store whose request for a chunk was still out when it was given
    up (at the deadline, or outrun)."""


class _Aside(_NoAnswer):
    """A store skipped for a chunk because it was set aside."""

    @classmethod
    def of(cls, state: _StoreState) -> "_Aside":
        return cls(f"{state.store} set aside {state.why_aside}", state.store)


def _said(problems) -> list[str]:
    """``problems`` for an error line: the stores that never answered
    named once, together, last (and not also as set aside)."""
    silent = dict.fromkeys(problem for problem in problems if isinstance(problem, _Silent))
    told = [problem for problem in problems if not isinstance(problem, _Silent)
            and not (isinstance(problem, _Aside) and problem.store in silent)]
    if silent:
        told.append("no answer from " + ", ".join(silent))
    return told


def _unanswered(problems) -> bool:
    """Whether a store's last word on a chunk was no answer (a store set
    aside, say, gets a last try, whose word counts)."""
    last = {word.store: word for word in problems if isinstance(word, _Word)}
    return not all(word.answered for word in last.values())


def _problem(error, chunk_id, store, kind=_Word) -> _Word:
    """What ``store`` said of a chunk, for the error that lists what every
    store said (and names the chunk once)."""
    text = str(error).removeprefix(f"chunk {chunk_id.hex()}: ")
    named = text.startswith((f"{store}/", f"{store}:"))
    return kind(text if named else f"{text} ({store})", store)
