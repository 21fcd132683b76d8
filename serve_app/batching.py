"""Grouping concurrent requests into one downstream call (the ingress's micro-batcher).

Each call between replicas costs Ray several milliseconds of CPU (router, actor call,
serialization, metrics) whatever its size, which on a GPU host is the ceiling
(load_tests/RESULTS.md). So the ingress sends the images of concurrent requests together: one
preprocessor call and one classifier call per group, not per request.

It never waits to fill a group. A request that finds a free slot leaves at once, alone, so a
lone client sees no added latency; requests that arrive while every slot is busy queue and
leave together, up to ``max_batch_size``, as soon as a slot frees up. The group size follows
the load by itself, as in Triton's dynamic batcher with no queue delay. Pure asyncio, no Ray.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Awaitable, Callable, Generic, Optional, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """``submit`` found every slot busy and ``max_queued`` items already waiting."""


class CallBatcher(Generic[T, R]):
    """Runs ``call(items)`` for groups of submitted items, at most ``max_in_flight`` at once.

    ``call`` returns one result per item, in order; an exception instance in place of a result
    fails that item alone. An exception raised by ``call`` fails every item of its group.
    ``on_dispatch(waits_s)``, if given, hears of each group as it leaves: how long each of its
    items waited for a slot (the ingress's metrics). ``max_queued`` bounds the items waiting:
    past it, ``submit`` raises :class:`QueueFull` at once (None: no bound).
    """

    def __init__(self, call: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
                 max_batch_size: int, max_in_flight: int,
                 on_dispatch: Optional[Callable[[list[float]], None]] = None,
                 max_queued: Optional[int] = None):
        if max_batch_size < 1 or max_in_flight < 1 or (max_queued is not None and max_queued < 0):
            raise ValueError("max_batch_size and max_in_flight must be >= 1, max_queued >= 0")
        self.max_queued = max_queued
        self._call = call
        self._on_dispatch = on_dispatch
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self._pending: deque[tuple[T, asyncio.Future, float]] = deque()
        self._in_flight = 0
        self._in_flight_items = 0
        self._tasks: set[asyncio.Task] = set()  # strong references until each call ends
        self.calls = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Items waiting for a free slot."""
        return len(self._pending)

    @property
    def in_flight_items(self) -> int:
        """Items in calls that have not returned yet."""
        return self._in_flight_items

    async def submit(self, item: T) -> R:
        if (self.max_queued is not None and self._in_flight >= self.max_in_flight
                and len(self._pending) >= self.max_queued):
            waiting = sum(1 for _, future, _ in self._pending if not future.done())
            if waiting >= self.max_queued:  # requests that gave up do not count
                raise QueueFull(f"{waiting} items are already waiting")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future, time.perf_counter()))
        self._dispatch()
        return await future

    def fail_pending(self, exc: BaseException) -> int:
        """Fail every item still waiting for a slot with ``exc`` (its deployment went down);
        returns how many. The calls in flight run on."""
        failed = 0
        while self._pending:
            _, future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(exc)
                failed += 1
        return failed

    def _dispatch(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            group, submitted = [], []
            while self._pending and len(group) < self.max_batch_size:
                item, future, at = self._pending.popleft()
                if not future.done():  # skip requests that timed out or went away meanwhile
                    group.append((item, future))
                    submitted.append(at)
            if not group:
                return
            if self._on_dispatch is not None:
                now = time.perf_counter()
                self._on_dispatch([now - at for at in submitted])
            self._in_flight += 1
            self._in_flight_items += len(group)
            self.calls += 1
            self.items += len(group)
            task = asyncio.ensure_future(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[tuple[T, asyncio.Future]]) -> None:
        try:
            results = await self._call([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"a call for {len(group)} items returned {len(results)} results")
        except Exception as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(group, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            for _, future in group:  # cancelled mid-call (replica shutting down)
                if not future.done():
                    future.set_exception(RuntimeError("the call ended without a result"))
            self._in_flight -= 1
            self._in_flight_items -= len(group)
            self._dispatch()
