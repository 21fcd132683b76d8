"""serve_app.batching.CallBatcher: grouping without added latency, per-item failures."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.batching import CallBatcher


class Downstream:
    """A fake downstream call: records each group and finishes it when the test says so."""

    def __init__(self, fail_items=(), raise_on=None):
        self.groups: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_items = set(fail_items)
        self.raise_on = raise_on

    async def __call__(self, items: list[int]) -> list:
        self.groups.append(list(items))
        await self.release.wait()
        if self.raise_on is not None and self.raise_on in items:
            raise RuntimeError("downstream down")
        return [ValueError(f"bad {i}") if i in self.fail_items else i * 10 for i in items]


async def settle():
    """Let every ready task run (submitters, then the calls they started)."""
    for _ in range(3):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_a_lone_request_leaves_at_once():
    async def scenario():
        down = Downstream()
        batcher = CallBatcher(down, max_batch_size=16, max_in_flight=2)
        task = asyncio.ensure_future(batcher.submit(1))
        await settle()
        assert down.groups == [[1]]  # sent without waiting for company
        down.release.set()
        assert await task == 10
    run(scenario())


def test_requests_queue_while_slots_are_busy_then_leave_together():
    async def scenario():
        down = Downstream()
        batcher = CallBatcher(down, max_batch_size=4, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        await settle()
        assert down.groups == [[0]] and batcher.queued == 6 and batcher.in_flight_items == 1
        down.release.set()
        results = await asyncio.gather(first, *rest)
        assert results == [i * 10 for i in range(7)]
        assert down.groups == [[0], [1, 2, 3, 4], [5, 6]]  # capped at max_batch_size, in order
        assert (batcher.calls, batcher.items, batcher.queued, batcher.in_flight_items) == (3, 7, 0, 0)
    run(scenario())


def test_slots_run_in_parallel():
    async def scenario():
        down = Downstream()
        batcher = CallBatcher(down, max_batch_size=8, max_in_flight=3)
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await settle()
        assert down.groups == [[0], [1], [2]]  # one each while slots are free
        down.release.set()
        assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]
        assert down.groups[3:] == [[3, 4]]
    run(scenario())


def test_an_item_error_fails_that_item_alone():
    async def scenario():
        down = Downstream(fail_items={2})
        down.release.set()
        batcher = CallBatcher(down, max_batch_size=8, max_in_flight=1)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)),
                                       return_exceptions=True)
        assert results[:2] == [0, 10] and results[3] == 30
        assert isinstance(results[2], ValueError) and str(results[2]) == "bad 2"
    run(scenario())


def test_a_failed_call_fails_its_group_and_frees_the_slot():
    async def scenario():
        down = Downstream(raise_on=1)
        batcher = CallBatcher(down, max_batch_size=8, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        group = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        down.release.set()
        assert await first == 0
        outcomes = await asyncio.gather(*group, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert await batcher.submit(3) == 30  # the slot came back
    run(scenario())


def test_a_wrong_number_of_results_is_an_error():
    async def scenario():
        async def short(items):
            return items[:-1]
        batcher = CallBatcher(short, max_batch_size=8, max_in_flight=1)
        with pytest.raises(RuntimeError, match="returned 0 results"):
            await batcher.submit(1)
    run(scenario())


def test_requests_that_gave_up_are_not_sent():
    async def scenario():
        down = Downstream()
        batcher = CallBatcher(down, max_batch_size=8, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(1), 0.01)  # the client's timeout
        kept = asyncio.ensure_future(batcher.submit(2))
        await settle()
        down.release.set()
        assert (await first, await kept) == (0, 20)
        assert down.groups == [[0], [2]]
    run(scenario())


@pytest.mark.parametrize("size,slots", [(0, 1), (1, 0)])
def test_limits_must_be_positive(size, slots):
    with pytest.raises(ValueError):
        CallBatcher(Downstream(), max_batch_size=size, max_in_flight=slots)


def test_on_dispatch_hears_each_group_and_how_long_its_items_waited():
    async def scenario():
        down, heard = Downstream(), []
        batcher = CallBatcher(down, max_batch_size=4, max_in_flight=1, on_dispatch=heard.append)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 4)]
        await asyncio.sleep(0.05)  # they wait for the only slot
        down.release.set()
        await asyncio.gather(first, *rest)
        assert [len(waits) for waits in heard] == [1, 3]
        assert heard[0][0] < 0.01 and all(0.04 <= w < 1 for w in heard[1])
    run(scenario())


def test_a_full_queue_refuses_at_once_and_frees_as_groups_leave():
    from serve_app.batching import QueueFull

    async def scenario():
        down = Downstream()
        batcher = CallBatcher(down, max_batch_size=2, max_in_flight=1, max_queued=3)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        await settle()
        with pytest.raises(QueueFull, match="3 items"):
            await batcher.submit(4)
        assert batcher.queued == 3 and down.groups == [[0]]
        down.release.set()
        assert await asyncio.gather(first, *waiting) == [0, 10, 20, 30]
        assert await batcher.submit(5) == 50  # room again
    run(scenario())


def test_requests_that_gave_up_do_not_fill_the_queue():
    async def scenario():
        down = Downstream()
        batcher = CallBatcher(down, max_batch_size=2, max_in_flight=1, max_queued=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        gone = asyncio.ensure_future(batcher.submit(1))
        await settle()
        gone.cancel()  # the client went away; its entry is still in the queue
        await settle()
        kept = asyncio.ensure_future(batcher.submit(2))
        await settle()
        down.release.set()
        assert await asyncio.gather(first, kept) == [0, 20]
    run(scenario())


def test_fail_pending_fails_the_waiting_items_and_lets_the_calls_in_flight_finish():
    import asyncio

    from serve_app.batching import CallBatcher

    async def scenario():
        release = asyncio.Event()

        async def call(items):
            await release.wait()
            return items

        b = CallBatcher(call, max_batch_size=1, max_in_flight=1)
        running = asyncio.ensure_future(b.submit("a"))
        waiting = [asyncio.ensure_future(b.submit(x)) for x in "bc"]
        await asyncio.sleep(0.01)
        failed = b.fail_pending(RuntimeError("down"))
        release.set()
        results = await asyncio.gather(running, *waiting, return_exceptions=True)
        return failed, results, b.queued

    failed, results, queued = asyncio.run(scenario())
    assert failed == 2 and queued == 0
    assert results[0] == "a"
    assert all(isinstance(r, RuntimeError) and str(r) == "down" for r in results[1:])
