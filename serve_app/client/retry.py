"""When to retry and how long to wait: pure arithmetic, no I/O, so it is tested without a network.

The clients in serve_app.client.api call :func:`next_delay` after each failed attempt and sleep
for what it returns, or give up when it returns ``None``.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from dataclasses import dataclass, field
from datetime import timezone

#: Statuses worth another attempt: an overloaded or not-yet-ready service (503), and a proxy
#: that could not reach it (502) or gave up waiting (504). A 500 is a bug and is not retried.
RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a client tries: bounded both in attempts and in total time.

    ``max_attempts`` counts the first try (1 = never retry). ``max_elapsed_s`` is the budget
    from the first attempt's start; no wait is started that would end past it.
    """

    max_attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_elapsed_s: float = 30.0
    retry_statuses: frozenset[int] = field(default=RETRY_STATUSES)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.backoff_s, self.max_backoff_s, self.max_elapsed_s) < 0:
            raise ValueError("backoff_s, max_backoff_s and max_elapsed_s must not be negative")
        object.__setattr__(self, "retry_statuses", frozenset(self.retry_statuses))


def backoff_cap(policy: RetryPolicy, attempt: int) -> float:
    """The upper bound of the jittered wait after failed attempt number ``attempt`` (1-based):
    ``backoff_s * 2**(attempt-1)``, capped at ``max_backoff_s``."""
    exponent = min(max(attempt - 1, 0), 64)  # 2**64 * anything already exceeds any cap
    return min(policy.max_backoff_s, policy.backoff_s * 2.0**exponent)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: integer seconds or an HTTP date.

    ``now`` is the wall-clock time (epoch seconds) a date is measured from. A date in the past
    means 0; a missing or malformed header means ``None`` (no server hint).
    """
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d*)?", value):  # RFC 9110 says integer; accept "1.5" too
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: RFC 9110 dates are GMT anyway
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def next_delay(policy: RetryPolicy, attempt: int, *, retry_after: float | None,
               remaining_s: float, rng: random.Random | None = None) -> float | None:
    """Seconds to sleep before the next attempt, or ``None`` to give up now.

    ``attempt`` is how many attempts have failed so far (1 after the first). The wait is full
    jitter, ``uniform(0, backoff_cap)``, raised to ``retry_after`` when the server sent one:
    the server's hint is honoured even above ``max_backoff_s``. A wait that would not end
    within ``remaining_s`` (what is left of ``max_elapsed_s``) means give up rather than
    sleep for nothing, and so does running out of attempts.
    """
    if attempt >= policy.max_attempts:
        return None
    delay = (rng or random).uniform(0.0, backoff_cap(policy, attempt))
    if retry_after is not None:
        delay = max(delay, retry_after)
    if delay > remaining_s:
        return None
    return delay
