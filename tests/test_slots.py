"""Places among requests in flight: urgent requests (a reader waits) go
before readahead, and a reader that comes to wait for readahead makes it
urgent."""

import trio
import trio.testing

from cafuse.slots import Priority, Slots


class Requests:
    """Requests on one place, in the order they get it; "first" holds it
    until ``let_go()``, however slow the machine."""

    def __init__(self, slots):
        self.slots, self.order, self._first_done = slots, [], trio.Event()

    async def request(self, name, priority, cancel_scope=None):
        with cancel_scope or trio.CancelScope():
            async with self.slots.hold(priority):
                self.order.append(name)
                if name == "first":
                    await self._first_done.wait()

    def let_go(self):
        self._first_done.set()


async def test_urgent_requests_go_first_each_kind_in_order():
    requests = Requests(Slots(1))
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            for name, urgent in [("first", True), ("ahead1", False), ("ahead2", False),
                                 ("read1", True), ("read2", True)]:
                nursery.start_soon(requests.request, name, Priority(urgent))
                await trio.testing.wait_all_tasks_blocked()  # in this order
            requests.let_go()
    assert requests.order == ["first", "read1", "read2", "ahead1", "ahead2"]


async def test_a_waiting_request_made_urgent_moves_ahead():
    requests = Requests(Slots(1))
    promoted = Priority(urgent=False)
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            for name, priority in [("first", Priority()), ("ahead", Priority(urgent=False)),
                                   ("wanted", promoted), ("read", Priority())]:
                nursery.start_soon(requests.request, name, priority)
                await trio.testing.wait_all_tasks_blocked()
            promoted.make_urgent()
            requests.let_go()
    assert requests.order == ["first", "read", "wanted", "ahead"]


async def test_a_cancelled_waiter_leaves_the_queue():
    slots = Slots(1)
    requests, scope = Requests(slots), trio.CancelScope()
    with trio.fail_after(1):  # a place handed to the cancelled waiter is lost
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requests.request, "first", Priority())
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(requests.request, "cancelled", Priority(), scope)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(requests.request, "last", Priority())
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            requests.let_go()
    assert requests.order == ["first", "last"]
    with trio.fail_after(1):
        async with slots.hold(Priority()):  # the one place is free again
            pass
