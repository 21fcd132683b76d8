"""Closed-loop HTTP clients that keep every answer with its times, for the tests that break
or change the service under load (test_faults.py, test_redeploy.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import httpx

CLIENT_TIMEOUT_S = 30.0  # a hang shows as a transport error at 30 s


@dataclass
class Answer:
    started: float
    ended: float
    status: int  # 0: no HTTP answer (reset, timeout)
    code: str = ""  # the JSON error code, or the transport error's type
    retry_after: Optional[str] = None
    json_body: bool = True
    model: str = ""  # a 200's "model"
    top1: tuple = ()  # a 200's (label, score) of its first prediction

    @property
    def ms(self) -> float:
        return (self.ended - self.started) * 1000


@dataclass
class Load:
    """``clients`` closed-loop clients posting ``bodies`` in turn until stopped."""

    url: str
    bodies: list
    clients: int = 8
    answers: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
            n = i
            while not self.stop.is_set():
                body = self.bodies[n % len(self.bodies)]
                n += 1
                started = time.monotonic()
                try:
                    r = c.post(self.url, content=body, headers={"Content-Type": "image/jpeg"})
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(started, time.monotonic(), 0,
                                               code=type(exc).__name__))
                    continue
                answer = Answer(started, time.monotonic(), r.status_code,
                                retry_after=r.headers.get("retry-after"))
                try:
                    payload = r.json()
                except ValueError:
                    payload = None
                if r.status_code == 200 and payload:
                    top = payload["predictions"][0]
                    answer.model, answer.top1 = payload["model"], (top["label"], top["score"])
                elif r.status_code != 200:
                    try:
                        answer.code = payload["error"]["code"]
                    except (KeyError, TypeError):
                        answer.json_body = False
                        answer.code = r.text[:80]
                    time.sleep(0.05)  # a client that got a refusal does not spin on it
                self.answers.append(answer)

    def run(self, seconds: float, during=None):
        """Load for ``seconds``; ``during()`` runs meanwhile (its result is returned)."""
        with ThreadPoolExecutor(self.clients) as pool:
            for i in range(self.clients):
                pool.submit(self._client, i)
            began = time.monotonic()
            try:
                result = during() if during else None
                time.sleep(max(0.0, seconds - (time.monotonic() - began)))
            finally:
                self.stop.set()
        return result


def summary(answers: list, fault_at: float) -> dict:
    """What the clients saw around ``fault_at``: counts, refusals, recovery."""
    after = [a for a in answers if a.ended >= fault_at]
    by_status: dict = {}
    for a in answers:
        by_status.setdefault(a.status, []).append(a)
    failed = [a for a in after if a.status != 200]
    in_flight = [a for a in failed if a.started < fault_at]
    served_after = [a for a in after if a.status == 200 and a.started > fault_at]
    last_failure = max((a.ended for a in failed), default=fault_at)
    back = [a for a in served_after if a.started >= last_failure]
    served = sorted(a.ms for a in by_status.get(200, []))
    return {
        "sent": len(answers), "served": len(served),
        "statuses": {str(s): len(v) for s, v in sorted(by_status.items())},
        "codes": sorted({a.code for a in failed if a.status}),
        "dropped": sorted({a.code for a in failed if not a.status}),
        "in_flight_failed": len(in_flight),
        "in_flight_answered_within_s": round(max((a.ended - fault_at for a in in_flight),
                                                 default=0.0), 2),
        "refusal_p95_ms": round(sorted(a.ms for a in failed)[int(0.95 * (len(failed) - 1))], 1)
        if failed else None,
        "first_200_after_s": round(min((a.ended for a in served_after), default=fault_at)
                                   - fault_at, 2) if served_after else None,
        "healthy_after_s": round(back[0].ended - fault_at, 2) if back else None,
        "served_p50_ms": round(served[len(served) // 2], 1) if served else None,
        "served_p99_ms": round(served[int(0.99 * (len(served) - 1))], 1) if served else None,
        "max_ms": round(max(a.ms for a in answers), 1),
    }
