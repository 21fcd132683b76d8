"""The replica processes of a local Serve cluster, found by their process titles
(``ray::ServeReplica:<app>:<deployment>``), for CPU and memory readings."""

from __future__ import annotations

import re

#: A replica's process title: application, then deployment (a method suffix may follow).
REPLICA = re.compile(r"ray::ServeReplica:([^:\s]+):([\w-]+)")


def replica_pids(root_pid: int, app: str) -> dict[int, str]:
    """{pid: deployment} of ``app``'s replicas in the process tree under ``root_pid``."""
    import psutil

    out = {}
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for proc in procs:
        try:
            match = REPLICA.search(" ".join(proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if match and match.group(1) == app:
            out[proc.pid] = match.group(2)
    return out


def memory_mib(pids: dict[int, str], private: bool = False) -> dict[int, float]:
    """RSS (or, with ``private``, USS) in MiB of each live pid."""
    import psutil

    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            value = proc.memory_full_info().uss if private else proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[pid] = round(value / 2**20, 1)
    return out


def cpu_seconds(pids: dict[int, str]) -> dict[int, float]:
    """User + system CPU-seconds each live pid has spent (children not counted)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[pid] = times.user + times.system
    return out


def reset_peak(pid: int) -> bool:
    """Start ``pid``'s peak RSS (VmHWM) over from its current RSS (Linux's ``clear_refs`` 5);
    False where that is not allowed, e.g. another user's process."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(pid: int) -> float | None:
    """``pid``'s peak RSS (VmHWM) in MiB since it started or since :func:`reset_peak`; the
    kernel's own high-water mark, so no sampler can miss a short peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
