"""Whether a model's replicas can take a request now, learned from the calls themselves.

When a replica dies, Ray's router drops it and holds new requests until another replica of
the deployment is up: with one classifier replica (``min_replicas: 1``) that is the whole
replacement's start, and every client waits it out. So the ingress does not wait blindly:
after a call fails because its replica was lost, or has had no answer for a while (Ray
re-sends a call whose replica died and holds it for the replacement), it probes the model (a
``ready`` call under a short timeout). If nothing answers and the controller counts no
running replica of one of the model's deployments, the model is *down*: new requests get 503 +
Retry-After at once, so do those waiting, and the probe repeats until a replica answers. A
surviving replica answers the first probe, and nothing is refused; while the controller still
counts running replicas (a rollout, a busy machine, a dead replica not yet counted out) the
requests wait and the probe repeats. Pure asyncio, no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

logger = logging.getLogger("ray.serve")


class Availability:
    """``probe()``: one cheap call through the model's deployments; raises or hangs when no
    replica can take it. ``on_down()``: called once when the model goes down (the ingress fails
    the requests waiting in its grouping queue)."""

    def __init__(self, name: str, probe: Callable[[], Awaitable[object]], timeout_s: float,
                 interval_s: float, on_down: Optional[Callable[[], None]] = None,
                 none_running: Optional[Callable[[], Awaitable[bool]]] = None):
        """``none_running()``: whether the controller counts no running replica of one of the
        model's deployments, asked before a failed probe takes the model down (None: the probe
        alone decides)."""
        if timeout_s <= 0 or interval_s <= 0:
            raise ValueError("timeout_s and interval_s must be > 0")
        self.name = name
        self._probe = probe
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._on_down = on_down
        self._none_running = none_running
        self.down_since: Optional[float] = None
        self.losses = 0  # calls that failed with a lost replica, since start
        self._task: Optional[asyncio.Task] = None
        self._answered_at = float("-inf")  # when a probe last got its answer
        self.ever_answered = False

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def lost(self) -> None:
        """A call failed because its replica stopped: find out whether any other is up."""
        self.losses += 1
        self._start()

    def answered(self) -> None:
        """A call got its answer: this replica's routers know the model's replicas."""
        self.ever_answered = True

    def check(self) -> None:
        """For a call with no answer yet after a while: Ray re-sends a call whose replica died
        and holds it until a replacement is up, so no call fails and only the wait tells. At
        most one probe per ``interval_s`` (under overload every call is slow), and only once
        the model has answered here: a new replica's first calls wait while its routers learn
        the replicas (seconds, on a busy machine), and that wait is no outage."""
        if self.ever_answered and time.monotonic() - self._answered_at >= self.interval_s:
            self._start()

    def _start(self) -> None:
        if self._task is None or self._task.done():  # a check under way is not repeated
            self._task = asyncio.ensure_future(self._watch())

    async def _outage(self) -> bool:
        """After a failed probe: an outage only if the controller counts no running replica.
        While a rollout swaps replicas, Ray held calls for over 3 s with both versions running
        (twice in CI runs), and a probe after a GPU node was lost found its dead replicas
        while two others served (test_multinode); refusing then turned a wait into failed
        requests. A killed replica is counted out (serve_app/replica_counts.py: by the GCS
        within about a second, by the controller at its next health check), and the next
        failed probe then refuses."""
        if self._none_running is None:
            return True
        try:
            return await self._none_running()
        except Exception:
            return False  # cannot tell: a slow call alone does not refuse requests

    async def _answers(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._probe()
            return True
        except Exception:
            # A cancel that lands as the probe fails must still stop the watcher (wait_for
            # could swallow it, and the loop would never end).
            if asyncio.current_task().cancelling():
                raise asyncio.CancelledError from None
            return False

    async def _watch(self) -> None:
        waiting = False
        while not await self._answers():
            if self.down_since is None and not await self._outage():
                if not waiting:
                    logger.info("%s did not answer a probe, but the controller counts running "
                                "replicas (a rollout?): its requests wait", self.name)
                    waiting = True
                await asyncio.sleep(self.interval_s)
                continue
            if self.down_since is None:
                self.down_since = time.monotonic()
                logger.warning("No replica of %s answers; refusing its requests with 503 until "
                               "one does", self.name)
                if self._on_down is not None:
                    self._on_down()
            await asyncio.sleep(self.interval_s)
        self._answered_at = time.monotonic()
        self.ever_answered = True
        if self.down_since is not None:
            logger.info("%s answers again after %.1fs down", self.name,
                        time.monotonic() - self.down_since)
            self.down_since = None
