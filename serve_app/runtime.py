"""Where a replica runs: its CPU share and its device. Read from Ray's assignment, not guessed.

torch is imported where it is used: the simulated classifier's replica (no network) and the
ingress use this module without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve_app.config import threads_for_share

if TYPE_CHECKING:
    import torch


def assigned_resources() -> dict[str, float]:
    """The resources Ray reserved for this worker ({} outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # outside an actor, or Ray not started
        pass
    return {}


def cpu_threads(resources: dict[str, float] | None = None) -> int:
    """Threads for torch: the integer part of this replica's CPU share, at least 1.

    More threads than the share oversubscribes the node's cores; one probe of two replicas
    with default threads on 2 cores ran 40x slower than with one thread each.
    """
    return threads_for_share((resources if resources is not None else assigned_resources())
                             .get("CPU", 1.0))


def configure_torch_threads(resources: dict[str, float] | None = None,
                            threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads`` when given, else :func:`cpu_threads`."""
    import torch

    threads = threads or cpu_threads(resources)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def select_device(resources: dict[str, float] | None = None) -> torch.device:
    """CUDA when Ray gave this replica a GPU (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    import torch

    gpus = (resources if resources is not None else assigned_resources()).get("GPU", 0)
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def process_started_at() -> float | None:
    """When this process started (epoch seconds, Linux /proc), to tell a replica's own start
    time from Ray's time to schedule and spawn it. None where /proc is not there."""
    import os

    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def lower_priority(increment: int) -> int:
    """Raise this process's nice value by ``increment``, every thread of it (Linux nice is
    per thread; threads started later inherit their creator's). Returns the new nice value.

    On a CPU box the model replicas take every core they can; niced, they yield to the
    ingress and the proxy when those have work, so a request that is refused or dispatched is
    not stuck behind a forward pass (load_tests/RESULTS.md, docs/reliability.md)."""
    import os

    if increment <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread only
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid,
                           min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        except OSError:  # a thread that ended meanwhile
            continue
    return os.getpriority(os.PRIO_PROCESS, 0)
