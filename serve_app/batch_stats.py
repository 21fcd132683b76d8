"""What a replica tells the autoscaling policy about its batches and its load, as plain
bookkeeping: no Ray, no torch. The classifier replicas (serve_app/classifier_base.py) and the
simulator's model of them (load_tests/simulation/) both count through these classes, so the
policy reads the same numbers from either.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional

# Keys of the classifier's report (read by serve_app/autoscaling.py).
MAX_BATCH_SIZE = "max_batch_size"
BATCH_FILL = "batch_fill"
BATCH_LATENCY_S = "batch_latency_s"
IMAGES_IN_FLIGHT = "images_in_flight"
#: Images/s one replica clears at a full batch, from the latencies it measured per batch size.
FULL_BATCH_THROUGHPUT = "full_batch_throughput"

#: Weight of the newest batch in a batch size's latency (an exponential moving average).
LATENCY_EMA = 0.2


def full_batch_latency(latency_by_size: Mapping[int, float], max_batch_size: int) -> float:
    """Seconds a batch of ``max_batch_size`` takes, from the mean latency of each size seen.

    Measured when that size ran; else the least-squares line ``a + b * n`` through the sizes
    seen (a batched accelerator's shape), never below the slowest size measured; from one size
    alone, as if batching gained nothing (``t(n0) * B / n0``), which errs towards more replicas.
    """
    if not latency_by_size:
        raise ValueError("no batch has run")
    if max_batch_size in latency_by_size:
        return latency_by_size[max_batch_size]
    sizes = sorted(latency_by_size)
    if len(sizes) == 1:
        n0 = sizes[0]
        return latency_by_size[n0] * max_batch_size / n0
    mean_n = sum(sizes) / len(sizes)
    mean_t = sum(latency_by_size[n] for n in sizes) / len(sizes)
    spread = sum((n - mean_n) ** 2 for n in sizes)
    slope = max(0.0, sum((n - mean_n) * (latency_by_size[n] - mean_t) for n in sizes) / spread)
    fitted = mean_t + slope * (max_batch_size - mean_n)
    return max(fitted, max(latency_by_size.values()))


class BatchCounter:
    """A classifier replica's batches, what it holds now, and its report to the policy."""

    def __init__(self) -> None:
        self.batches = 0
        self.images = 0
        self.busy_s = 0.0
        self.images_in_flight = 0
        self.latency_by_size: dict[int, float] = {}
        self._reported = (0, 0, 0.0)  # the counters at the last report
        self._last: dict[str, float] = {}

    def batch(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.images += size
        self.busy_s += seconds
        old = self.latency_by_size.get(size)
        self.latency_by_size[size] = seconds if old is None else (
            old + LATENCY_EMA * (seconds - old))

    def report(self, max_batch_size: int) -> dict[str, float]:
        """The batch size, the images held now (a call carries several, so Ray's request count
        understates the load), the mean fill and latency of the batches since the last report
        (the last known values when none ran, so an idle replica still reports its speed),
        and the throughput of a full batch."""
        now = (self.batches, self.images, self.busy_s)
        batches, images, busy = (a - b for a, b in zip(now, self._reported))
        self._reported = now
        if batches:
            self._last = {BATCH_FILL: images / batches, BATCH_LATENCY_S: busy / batches}
        if self.latency_by_size:
            latency = full_batch_latency(self.latency_by_size, max_batch_size)
            if latency > 0:
                self._last[FULL_BATCH_THROUGHPUT] = max_batch_size / latency
        return {MAX_BATCH_SIZE: float(max_batch_size),
                IMAGES_IN_FLIGHT: float(self.images_in_flight), **self._last}


class RateMeter:
    """Events per second between two reads: the ingress's images offered to a model, those it
    refused included, so the policy sees demand that no queue holds. With ``total``, the rate
    of that running total instead of :meth:`add`'s count: ``time.process_time`` gives the
    CPU-seconds per second a process spends (the Ingress's own load)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 total: Optional[Callable[[], float]] = None) -> None:
        self.clock = clock
        self.count = 0
        self._total = total if total is not None else (lambda: self.count)
        self._last: Optional[tuple[float, float]] = None
        self._rate = 0.0

    def add(self, n: int = 1) -> None:
        self.count += n

    def rate(self) -> float:
        now, total = self.clock(), self._total()
        if self._last is not None and now > self._last[0]:
            self._rate = (total - self._last[1]) / (now - self._last[0])
        self._last = (now, total)
        return self._rate
