"""Waiting for a cluster to reach a state, with a message naming what never came."""

from __future__ import annotations

import time


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """``predicate()``'s first truthy value, polled every ``interval_s``; TimeoutError naming
    ``what`` after ``timeout_s`` (a bound against a hang, not a measured figure)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
