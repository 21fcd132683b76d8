"""How many pixels one preprocessor replica decodes at once: a semaphore weighted by pixels.

The per-image limit (``args.max_image_pixels``) bounds one decode; it does not bound a
replica that decodes many at once. Ray runs a sync replica method in a thread pool as large as
``max_ongoing_requests`` (16 in configs/local.yaml), and a 40 MP image costs ~0.6-1 GB while
it is decoded and resized (docs/reliability.md), so a burst of large images could take the
replica's memory to many GB. Each decode reserves its image's width*height here first and
waits while the budget is spent. Threads only, no Ray: the preprocessor's calls run in
threads, and the tests drive it without a cluster.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Optional


class PixelBudget:
    """At most ``limit`` pixels reserved at once, granted first come, first served.

    FIFO, so a large image is not starved by a stream of small ones that would each fit. A
    reservation over the whole budget is granted alone (it waits for everything else to
    finish): it never deadlocks, and the bound is then that one image.
    """

    def __init__(self, limit: Optional[int]):
        """``limit``: pixels, or ``None`` for no bound (a reservation never waits)."""
        if limit is not None and limit <= 0:
            raise ValueError(f"a pixel budget must be positive, got {limit}")
        self.limit = limit
        self._cond = threading.Condition()
        self._in_use = 0
        self._queue: deque[object] = deque()
        self.peak = 0  # the most pixels reserved at once so far (tests, measurements)

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _fits(self, ticket: object, pixels: int) -> bool:
        return self._queue[0] is ticket and (self._in_use == 0
                                             or self._in_use + pixels <= self.limit)

    def acquire(self, pixels: int) -> int:
        """Wait until ``pixels`` fit, then reserve them; returns what was reserved."""
        pixels = max(0, int(pixels))
        with self._cond:
            if self.limit is not None:
                ticket = object()
                self._queue.append(ticket)
                try:
                    self._cond.wait_for(lambda: self._fits(ticket, pixels))
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the next in line may fit as well
            self._in_use += pixels
            self.peak = max(self.peak, self._in_use)
        return pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self._in_use -= pixels
            self._cond.notify_all()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block."""
        held = self.acquire(pixels)
        try:
            yield
        finally:
            self.release(held)
