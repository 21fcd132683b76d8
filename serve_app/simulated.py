"""The simulated accelerator's arithmetic: how long a batch holds a replica, and answers that
look like a classifier's. No torch and no Ray here: the simulated classifier replica
(serve_app/simulated_classifier.py) and the fleet simulator (load_tests/simulate.py) share it,
so both run the same latency profile.
"""

from __future__ import annotations

import bisect
import json
import random
import zlib
from functools import lru_cache
from pathlib import Path

from serve_app.config import SimulatedModelConfig


def service_time_s(profile: SimulatedModelConfig, n: int) -> float:
    """Seconds a batch of ``n`` images holds the replica.

    A linear profile is ``base_ms + per_image_ms * n``; a table is interpolated linearly between
    its batch sizes, and beyond them extended along its last (or first) two points (a single
    point is a constant), never below 0.
    """
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    if profile.service_ms is None:
        return (profile.base_ms + profile.per_image_ms * n) / 1000.0
    sizes, times = _table(tuple(sorted(profile.service_ms.items())))
    if len(sizes) == 1:
        return times[0] / 1000.0
    i = bisect.bisect_left(sizes, n)
    if i < len(sizes) and sizes[i] == n:
        return times[i] / 1000.0
    i = min(max(i, 1), len(sizes) - 1)  # the segment n falls in, or the nearest end one
    (n0, t0), (n1, t1) = (sizes[i - 1], times[i - 1]), (sizes[i], times[i])
    return max(0.0, t0 + (t1 - t0) * (n - n0) / (n1 - n0)) / 1000.0


@lru_cache(maxsize=32)
def _table(items: tuple[tuple[int, float], ...]) -> tuple[list[int], list[float]]:
    return [n for n, _ in items], [t for _, t in items]


def load_profile(spec: str) -> SimulatedModelConfig:
    """A profile from the command line: ``A+Bn`` (ms, linear, e.g. ``20+5n``) or a JSON file,
    either ``{"batch size": ms, ...}`` or a ``simulated:`` mapping (base_ms, service_ms, ...)."""
    text = spec.replace(" ", "")
    if text.endswith("n") and "+" in text:
        base, per = text[:-1].split("+", 1)
        return SimulatedModelConfig(base_ms=float(base), per_image_ms=float(per or 1))
    data = json.loads(Path(spec).read_text())
    if all(str(k).isdigit() for k in data):
        data = {"service_ms": {int(k): float(v) for k, v in data.items()}}
    return SimulatedModelConfig.model_validate(data)


def categories(num_classes: int) -> tuple[str, ...]:
    """Labels of a simulated model: ``simulated_0`` ... (they say what they are)."""
    return tuple(f"simulated_{i}" for i in range(num_classes))


def top_k(image_key: bytes, k: int, labels: tuple[str, ...], seed: int = 0) -> list[dict]:
    """``k`` distinct labels with falling scores that sum to under 1, chosen by the image's
    bytes and the seed: the same image always gets the same answer, as from a real model."""
    k = max(1, min(int(k), len(labels)))
    rng = random.Random(zlib.crc32(image_key) ^ (seed * 0x9E3779B1))
    ids = rng.sample(range(len(labels)), k)
    return [{"label": labels[i], "class_id": i, "score": 0.5 ** (rank + 1)}
            for rank, i in enumerate(ids)]
