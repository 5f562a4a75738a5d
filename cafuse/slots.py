"""Places among a client's requests in flight, urgent requests first.

A reader waits for a demand read; nobody waits for readahead or a walk's
stream-ahead.  Both kinds share a store's connections, and in arrival order
a demand read would queue behind every chunk prefetched before it.  So the
waiting requests form two queues, urgent and not, each in arrival order,
and a freed place goes to the first urgent one.  A request that is still
waiting moves to the urgent queue when a reader comes to wait for it.
"""

from collections import deque
from contextlib import asynccontextmanager

import trio


class Priority:
    """The priority of one load (of one or more requests): urgent, or not
    until ``make_urgent``; ``from_start`` tells whether it was urgent for
    all its life."""

    def __init__(self, urgent: bool = True):
        self.urgent = self.from_start = urgent
        self._waiting: list[tuple["Slots", trio.Event]] = []

    def make_urgent(self) -> None:
        if not self.urgent:
            self.urgent = True
            for slots, waiter in self._waiting:
                slots._promote(waiter)


class Slots:
    """``places`` places, held with ``async with slots.hold(priority)``."""

    def __init__(self, places: int):
        self._free = places
        self._urgent: deque[trio.Event] = deque()
        self._later: deque[trio.Event] = deque()

    @asynccontextmanager
    async def hold(self, priority: Priority):
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Priority) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._free and not (self._urgent or self._later):
            self._free -= 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = trio.Event()
        (self._urgent if priority.urgent else self._later).append(waiter)
        priority._waiting.append((self, waiter))
        try:
            await waiter.wait()
        except BaseException:
            if waiter.is_set():  # handed a place just as it was cancelled
                self._release()
            else:
                (self._urgent if waiter in self._urgent else self._later).remove(waiter)
            raise
        finally:
            priority._waiting.remove((self, waiter))

    def _promote(self, waiter: trio.Event) -> None:
        if waiter in self._later:
            self._later.remove(waiter)
            self._urgent.append(waiter)

    def _release(self) -> None:
        """A place is free: to the first waiting request, urgent first."""
        queue = self._urgent or self._later
        if queue:
            queue.popleft().set()
        else:
            self._free += 1
