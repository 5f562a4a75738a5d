"""Places among requests in flight: urgent requests (a reader waits) go
before readahead, and a reader that comes to wait for readahead makes it
urgent."""

import trio
import trio.testing

from cafuse.slots import Priority, Slots


async def test_urgent_requests_go_first_each_kind_in_order():
    slots, order = Slots(1), []

    async def request(name, priority):
        async with slots.hold(priority):
            order.append(name)
            await trio.sleep(0.01)
    async with trio.open_nursery() as nursery:
        for name, urgent in [("first", True), ("ahead1", False), ("ahead2", False),
                             ("read1", True), ("read2", True)]:
            nursery.start_soon(request, name, Priority(urgent))
            await trio.testing.wait_all_tasks_blocked()  # in this order
    assert order == ["first", "read1", "read2", "ahead1", "ahead2"]


async def test_a_waiting_request_made_urgent_moves_ahead():
    slots, order = Slots(1), []
    promoted = Priority(urgent=False)

    async def request(name, priority):
        async with slots.hold(priority):
            order.append(name)
            await trio.sleep(0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "first", Priority())
        await trio.testing.wait_all_tasks_blocked()
        for name, priority in [("ahead", Priority(urgent=False)), ("wanted", promoted),
                               ("read", Priority())]:
            nursery.start_soon(request, name, priority)
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        promoted.make_urgent()
    assert order == ["first", "read", "wanted", "ahead"]


async def test_a_cancelled_waiter_leaves_the_queue():
    slots, order = Slots(1), []
    scope = trio.CancelScope()

    async def request(name, cancel_scope=None):
        with cancel_scope or trio.CancelScope():
            async with slots.hold(Priority()):
                order.append(name)
                await trio.sleep(0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "cancelled", scope)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "last")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert order == ["first", "last"]
    with trio.fail_after(1):
        async with slots.hold(Priority()):  # the one place is free again
            pass
