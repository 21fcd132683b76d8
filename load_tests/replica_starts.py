"""How long a new classifier replica took to add capacity, read from the Serve log. Pure.

Ray's controller logs its decision ("Adding 1 replica to Deployment(name='Classifier', ...)")
and each classifier replica logs its first batch with the wall-clock time and the CPU its
process had spent by then (serve_app/classifier.py). Paired in order, they give, for every
scale-up: decision -> serving, and what the start cost the cores that were serving.
``Removing N replicas`` lines give how long the newest replica served before a scale-down.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Iterable, Optional, Sequence

from load_tests.sampling import _ANSI_RE

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_ADDING = re.compile(_STAMP + r" controller .*Adding (\d+) replicas? to "
                     r"Deployment\(name='(\w+)'")
_REMOVING = re.compile(_STAMP + r" controller .*Removing (\d+) replicas? from "
                       r"Deployment\(name='(\w+)'")
_FIRST_BATCH = re.compile(r"pid=(\d+)\).*Classifier first batch: at ([\d.]+) \(epoch\), "
                          r"([\d.]+) CPU-s spent before it, init ([\d.]+)s, (\w+)"
                          r"(?:, process started at ([\d.]+))?")


def _epoch(stamp: str) -> float:
    """Ray's log stamp (the node's local time) as epoch seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse(lines: Iterable[str], deployment: str = "Classifier") -> dict[str, list]:
    """{"added": [epoch per replica], "removed": [epoch per replica], "first_batches":
    [(epoch, pid, cpu_s, init_s, mode, process start epoch or None)]}, in log order."""
    out: dict[str, list] = {"added": [], "removed": [], "first_batches": []}
    for raw in lines:
        line = _ANSI_RE.sub("", raw)
        for key, pattern in (("added", _ADDING), ("removed", _REMOVING)):
            m = pattern.search(line)
            if m and m.group(3) == deployment:
                out[key] += [_epoch(m.group(1))] * int(m.group(2))
        m = _FIRST_BATCH.search(line)
        if m:
            out["first_batches"].append((float(m.group(2)), int(m.group(1)), float(m.group(3)),
                                         float(m.group(4)), m.group(5),
                                         float(m.group(6)) if m.group(6) else None))
    return out


def starts(parsed: dict[str, list], origin: float) -> list[dict]:
    """Every replica added after ``origin`` (the load's start), paired with the first first
    batch that came after its decision; times relative to ``origin``."""
    batches = sorted(b for b in parsed["first_batches"] if b[0] >= origin)
    out = []
    for decided in sorted(t for t in parsed["added"] if t >= origin):
        match = next((b for b in batches if b[0] >= decided), None)
        entry: dict = {"decided_s": round(decided - origin, 1)}
        if match is not None:
            batches.remove(match)
            at, pid, cpu_s, init_s, mode, spawned = match
            entry.update(serving_s=round(at - origin, 1), to_serving_s=round(at - decided, 1),
                         cpu_s_before_serving=cpu_s, init_s=init_s, mode=mode, pid=pid)
            if spawned:  # Ray's part (schedule, spawn) against the process's own start
                entry["to_process_s"] = round(spawned - decided, 1)
        out.append(entry)
    return out


def removals_after_serving(parsed: dict[str, list], started: Sequence[dict],
                           origin: float) -> list[Optional[float]]:
    """For each scale-down after ``origin``: seconds since the newest replica began serving
    (None when no replica started in the run before it)."""
    out = []
    for removed in sorted(t - origin for t in parsed["removed"] if t >= origin):
        before = [s["serving_s"] for s in started if "serving_s" in s and s["serving_s"] <= removed]
        out.append(round(removed - max(before), 1) if before else None)
    return out


def served_windows(rows: Sequence[dict], decided_s: float, until_s: float,
                   width_s: float = 5.0) -> list[int]:
    """Requests served in consecutive ``width_s`` windows: the one just before the decision,
    then each after it up to ``until_s`` (rows: the experiment's 1-second timeline)."""
    def served(lo: float, hi: float) -> int:
        return sum(int(r["rps"] or 0) for r in rows if lo < float(r["t_s"]) <= hi)

    edges = [decided_s - width_s]
    while edges[-1] + width_s <= until_s:
        edges.append(edges[-1] + width_s)
    return [served(lo, lo + width_s) for lo in edges[:-1]]
