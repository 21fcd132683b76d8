"""Throughput benchmark: the served app against the raw model and a naive FastAPI server.

    python -m load_tests.bench --config configs/local.yaml --model resnet18 \\
        --duration 20 --concurrency 1,8,32,64 --naive --json /tmp/bench.json

In one run it measures

* raw: decode + preprocess + forward in this process with ``--threads`` torch threads, at every
  batch size in ``--batch-sizes`` (best img/s, its batch size, single-image latency), plus the
  CPU each stage costs per image, used to tell model work from serving overhead;
* served: ``serve run`` on the config (or ``--url``), driven by a closed-loop client posting
  real 640x480 JPEG photos, with the classifier's mean batch size and CPU ms per request by
  process group (ingress, proxy, preprocessor, classifier, raylet, other Ray processes);
* naive (``--naive``): :mod:`load_tests.naive_server` on the same model and threads.

``--model NAME`` serves torchvision's NAME with random seeded weights (speed does not depend
on the weights). Everything is loopback-only and bounded by ``--duration`` and
``--max-requests``; every process started here is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from load_tests.client import run_load
from load_tests.processes import REPLICA
from load_tests.sampling import Sampler, ServeStatusClient, dashboard_url_from_log
from serve_app import topology

APP_NAME = "serve_app"
GROUPS = ("ingress", "proxy", "preprocessor", "classifier", "raylet", "other_ray")


# ---------------------------------------------------------------- pure parts (unit-tested)

def parse_int_list(text: str) -> list[int]:
    """``"1,8,32"`` to ``[1, 8, 32]``; positive values only."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, got {text!r}")
    return values


def apply_override(config: dict, assignment: str) -> None:
    """Apply ``Deployment.key.sub=value`` (a deployments entry, by name) or ``args.key=value``
    or ``top.key=value`` to a Serve config in place. The value is parsed as YAML; a ``null``
    under ``Deployment.`` deletes the key (e.g. ``Classifier.autoscaling_config=null``)."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise ValueError(f"override {assignment!r} is not KEY=VALUE")
    value = yaml.safe_load(raw)
    keys = path.split(".")
    app = config["applications"][0]
    deployment_names = {d.get("name") for d in app.get("deployments") or []}
    if keys[0] == "args":
        node, keys = app.setdefault("args", {}), keys[1:]
    elif keys[0] in deployment_names or keys[0] in ("Ingress", "Preprocessor", "Classifier"):
        deployments = app.setdefault("deployments", [])
        node = next((d for d in deployments if d.get("name") == keys[0]), None)
        if node is None:
            node = {"name": keys[0]}
            deployments.append(node)
        keys = keys[1:]
    else:
        node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is None and keys[-1] in node and path.split(".")[0] != "args":
        del node[keys[-1]]
        if node is not config and keys == ["autoscaling_config"]:
            # Ray refuses an application-level policy over a deployment that does not
            # autoscale ("Autoscaling config is not set"): fixed replicas mean no app policy.
            app.pop("autoscaling_policy", None)
    else:
        node[keys[-1]] = value


def group_of(cmdline: str, app: str = APP_NAME) -> Optional[str]:
    """The process group a Ray process belongs to, from its proctitle / command line."""
    match = REPLICA.search(cmdline)
    if match:
        if match.group(1) != app:
            return "other_ray"
        role = topology.role(match.group(2))  # Classifier_<model> too (several models)
        return role.lower() if role else "other_ray"
    if "ray::ProxyActor" in cmdline or re.search(r"(^|/)haproxy(\s|$)", cmdline):
        return "proxy"  # Ray's Python proxy, or HAProxy with RAY_SERVE_ENABLE_HA_PROXY=1
    if re.search(r"(^|/)raylet(\s|$)", cmdline):
        return "raylet"
    if "ray" in cmdline or "serve" in cmdline:
        return "other_ray"
    return None


def cpu_by_group(start: dict[int, tuple], end: dict[int, tuple]) -> dict[str, float]:
    """CPU seconds each group used between two snapshots {pid: (group, cpu_s)}.

    A process first seen at ``end`` counts from zero (it started inside the window); one gone
    by ``end`` is lost (its last reading cannot be known), which the caller should avoid by
    keeping replica counts fixed.
    """
    used = {g: 0.0 for g in GROUPS}
    for pid, (group, cpu, *_) in end.items():
        before = start.get(pid)
        delta = cpu - (before[1] if before and before[0] == group else 0.0)
        used[group] = used.get(group, 0.0) + max(0.0, delta)
    return used


def interpolate_by_batch(table: dict[int, float], batch: float) -> float:
    """A per-image cost at a (possibly fractional) mean batch size, linear in log2(batch)
    between the measured sizes, clamped to the ends."""
    if not table:
        return math.nan
    sizes = sorted(table)
    if batch <= sizes[0]:
        return table[sizes[0]]
    if batch >= sizes[-1]:
        return table[sizes[-1]]
    for lo, hi in zip(sizes, sizes[1:]):
        if lo <= batch <= hi:
            t = (math.log2(batch) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return table[lo] + t * (table[hi] - table[lo])
    return table[sizes[-1]]


def model_forward_cpu_ms(forward_cpu: dict[str, dict[str, float]], batch: float) -> float:
    """The forward pass's own CPU per image at ``batch``: the least over the thread counts
    raw measured. More threads add synchronisation, and raw spins while it waits (OpenMP's
    default) where a replica may sleep (OMP_WAIT_POLICY=PASSIVE): subtracting a multi-thread
    figure would hide serving overhead instead of isolating the model."""
    costs = [interpolate_by_batch({int(k): v for k, v in table.items()}, batch)
             for table in forward_cpu.values() if table]
    return min(costs) if costs else math.nan


def cpu_ms_per_request(used_s: dict[str, float], requests: int, decode_ms: float,
                       forward_ms: float) -> dict[str, float]:
    """CPU ms per request by group, the total, and ``overhead``: the total less the model's
    own work (decode + preprocess, and the forward pass at the batch size seen)."""
    if requests <= 0:
        return {}
    out = {g: round(used_s.get(g, 0.0) * 1000 / requests, 2) for g in GROUPS}
    total = sum(used_s.get(g, 0.0) for g in GROUPS) * 1000 / requests
    out["total"] = round(total, 2)
    out["overhead"] = round(total - decode_ms - forward_ms, 2)
    return out


def replicas_text(ranges: Optional[dict[str, list[int]]]) -> str:
    """``1/1/1-2``: running Ingress/Preprocessor/Classifier replicas while a level was
    measured (a range where autoscaling moved them)."""
    if not ranges:
        return "-"
    parts = []
    for name in ("Ingress", "Preprocessor", "Classifier"):
        low, high = ranges.get(name, [None, None])
        parts.append("?" if low is None else str(low) if low == high else f"{low}-{high}")
    return "/".join(parts)


def format_table(result: dict) -> str:
    """The one table the benchmark prints: raw, served rows, naive rows."""
    raw = result.get("raw") or {}
    lines = []
    if raw:
        lines.append(f"model {result['model']} ({raw.get('device', 'cpu')}): raw best {raw['best_img_s']:.1f} img/s at batch "
                     f"{raw['best_batch_size']}, bs1 {raw['bs1_ms']:.1f} ms, "
                     f"{raw['threads']} threads; decode+preprocess {raw['decode_cpu_ms']:.2f} "
                     f"CPU ms/img")
    head = (f"{'target':<7}{'conc':>5}{'req/s':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'err':>5}"
            f"{'batch':>6}{'call':>5}{'/raw':>6} | cpu ms/req: {'ingr':>5}{'proxy':>6}{'prep':>6}"
            f"{'clf':>6}{'rlet':>5}{'other':>6}{'total':>7}{'ovhd':>6} | replicas I/P/C")
    lines += [head, "-" * len(head)]

    def num(value: Any, width: int, digits: int = 1) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{'-':>{width}}"
        return f"{value:>{width}.{digits}f}"

    for target in ("served", "naive"):
        for row in result.get(target) or []:
            cpu = row.get("cpu_ms_per_request") or {}
            lines.append(
                f"{target:<7}{row['concurrency']:>5}{num(row['rps'], 8)}{num(row['p50_ms'], 8)}"
                f"{num(row['p95_ms'], 8)}{num(row['p99_ms'], 8)}{row['errors']:>5}"
                f"{num(row.get('mean_batch'), 6)}{num(row.get('images_per_call'), 5)}"
                f"{num(row.get('ratio'), 6, 2)} | {'':>11}"
                f"{num(cpu.get('ingress'), 5)}{num(cpu.get('proxy'), 6)}"
                f"{num(cpu.get('preprocessor'), 6)}{num(cpu.get('classifier'), 6)}"
                f"{num(cpu.get('raylet'), 5)}{num(cpu.get('other_ray'), 6)}"
                f"{num(cpu.get('total'), 7)}{num(cpu.get('overhead'), 6)}"
                f" | {replicas_text(row.get('replicas'))}")
    if "ratio" in result:
        lines.append(f"served/raw at saturation: {result['ratio']:.2f}")
    return "\n".join(lines)


def missing_keys(result: dict) -> list[str]:
    """Keys the issue promises in the JSON that this result lacks (for the smoke test)."""
    missing = [k for k in ("model", "raw", "served", "ratio", "cpu_ms_per_request")
               if k not in result]
    for k in ("best_img_s", "best_batch_size", "bs1_ms"):
        if k not in (result.get("raw") or {}):
            missing.append(f"raw.{k}")
    for i, row in enumerate(result.get("served") or []):
        for k in ("concurrency", "rps", "p50_ms", "p95_ms", "p99_ms", "errors", "mean_batch"):
            if k not in row:
                missing.append(f"served[{i}].{k}")
    if not result.get("served"):
        missing.append("served[]")
    return missing


# ---------------------------------------------------------------- raw reference

def measure_raw(model_cfg: dict, photos: Sequence[bytes], threads: int,
                batch_sizes: Sequence[int], seconds: float, extra_threads: Iterable[int] = (),
                max_image_pixels: int = 40_000_000, device: str = "cpu") -> dict:
    """Decode + preprocess + forward in this process, per batch size; and the CPU per image of
    decoding and of the forward pass (at ``threads`` and any ``extra_threads``)."""
    import torch

    from serve_app import imaging
    from serve_app.classifier import Predictor
    from serve_app.config import ModelConfig

    torch.set_num_threads(threads)
    predictor = Predictor(ModelConfig.model_validate(model_cfg), torch.device(device),
                          build=True)
    spec = predictor.info.transform

    def images(n: int, offset: int) -> list[bytes]:
        return [photos[(offset + i) % len(photos)] for i in range(n)]

    # Decode + preprocess alone: its CPU per image (single-threaded work).
    for data in photos:
        imaging.preprocess(data, spec, max_image_pixels)
    cpu0, n = time.process_time(), 0
    deadline = time.perf_counter() + min(2.0, seconds)
    while time.perf_counter() < deadline or n < len(photos):
        imaging.preprocess(photos[n % len(photos)], spec, max_image_pixels)
        n += 1
    decode_cpu_ms = (time.process_time() - cpu0) * 1000 / n

    by_batch: dict[int, float] = {}
    forward_cpu: dict[int, dict[int, float]] = {threads: {}}
    bs1_times: list[float] = []
    for bs in batch_sizes:
        predictor.predict(torch.stack([imaging.preprocess(d, spec, max_image_pixels)
                                       for d in images(bs, 0)]))  # warm this shape
        done, iters, elapsed, fwd_cpu = 0, 0, 0.0, 0.0
        while iters < 2 or elapsed < seconds:
            start = time.perf_counter()
            batch = torch.stack([imaging.preprocess(d, spec, max_image_pixels)
                                 for d in images(bs, done)])
            c0 = time.process_time()
            predictor.predict(batch)
            fwd_cpu += time.process_time() - c0
            took = time.perf_counter() - start
            elapsed += took
            iters += 1
            done += bs
            if bs == 1:
                bs1_times.append(took)
        by_batch[bs] = done / elapsed
        forward_cpu[threads][bs] = fwd_cpu * 1000 / done

    for extra in sorted(set(extra_threads) - {threads}):
        torch.set_num_threads(extra)
        forward_cpu[extra] = {}
        for bs in batch_sizes:
            batch = torch.stack([imaging.preprocess(d, spec, max_image_pixels)
                                 for d in images(bs, 0)])
            predictor.predict(batch)
            c0, iters = time.process_time(), 0
            w0 = time.perf_counter()
            while iters < 2 or time.perf_counter() - w0 < seconds / 2:
                predictor.predict(batch)
                iters += 1
            forward_cpu[extra][bs] = (time.process_time() - c0) * 1000 / (iters * bs)
    torch.set_num_threads(threads)

    best = max(by_batch, key=by_batch.get)
    bs1_times.sort()
    return {
        "threads": threads,
        "device": device,
        "best_img_s": round(by_batch[best], 2),
        "best_batch_size": best,
        "bs1_ms": round(bs1_times[len(bs1_times) // 2] * 1000, 2) if bs1_times else None,
        "by_batch_size": {str(k): round(v, 2) for k, v in by_batch.items()},
        "decode_cpu_ms": round(decode_cpu_ms, 3),
        "forward_cpu_ms": {str(t): {str(k): round(v, 3) for k, v in table.items()}
                           for t, table in forward_cpu.items()},
    }


# ---------------------------------------------------------------- processes and CPU

def _label(cmdline: str) -> str:
    """A short name for a process: its proctitle, or its program's file name."""
    first = cmdline.split()[0] if cmdline.split() else "?"
    if first.startswith("ray::"):
        return first
    parts = cmdline.split()
    script = next((Path(p).name for p in parts[1:3] if p.endswith(".py")), "")
    return f"{Path(first).name} {script}".strip()


def other_detail(start: dict, end: dict, requests: int) -> dict[str, float]:
    """CPU ms per request of each process in ``other_ray``, by label: what the rest is."""
    out: dict[str, float] = {}
    for pid, entry in end.items():
        if entry[0] != "other_ray":
            continue
        before = start.get(pid)
        delta = entry[1] - (before[1] if before else 0.0)
        out[entry[2]] = out.get(entry[2], 0.0) + delta * 1000 / max(1, requests)
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def snapshot(root_pid: Optional[int], app: str = APP_NAME) -> dict[int, tuple]:
    """{pid: (group, user+system CPU seconds, label)} for the process tree under ``root_pid`` (all
    of the machine's Ray processes when None)."""
    import psutil

    if root_pid is not None:
        try:
            root = psutil.Process(root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
    else:
        procs = list(psutil.process_iter())
    out = {}
    for proc in procs:
        try:
            cmdline = " ".join(proc.cmdline()) or proc.name()
            group = group_of(cmdline, app)
            if group is None:
                if root_pid is None:
                    continue
                group = "other_ray"
            times = proc.cpu_times()
            out[proc.pid] = (group, times.user + times.system, _label(cmdline))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def cluster_address(root_pid: int) -> Optional[tuple[str, dict[str, str]]]:
    """The GCS address of the cluster under ``root_pid`` and the RAY_AUTH_* settings a driver
    needs to join it, from its processes' arguments and environment (gcs_server itself is
    started with port 0; the others are told the real one)."""
    import psutil

    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            match = re.search(r"--gcs-address=(\S+)", " ".join(proc.cmdline()))
            if match:
                auth = {k: v for k, v in proc.environ().items() if k.startswith("RAY_AUTH")}
                return match.group(1), auth
        except psutil.Error:
            continue
    return None


class _LineReader:
    """Lines from a pipe with a timeout (a buffered file object would hide lines from select)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def readline(self, timeout_s: float) -> str:
        import select

        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError(f"no answer from the stats driver in {timeout_s}s")
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return ""
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode() + "\n"


class ClassifierStats:
    """Sums the classifier replicas' ``stats()`` counters, through a Ray driver in a child
    process (so this process stays a plain HTTP client). Requests are queued with
    :meth:`request` and answered in order by :meth:`collect`."""

    def __init__(self, address: str, env: dict[str, str], app: str = APP_NAME):
        self._stderr = tempfile.TemporaryFile()  # shown when the driver fails to start
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "load_tests.bench", "--stats-driver", address, "--app", app],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env={**os.environ, **env})
        self.lines = _LineReader(self.proc.stdout.fileno())
        try:
            ready = self.lines.readline(120)
        except TimeoutError:
            ready = ""
        if not ready.startswith("ready"):
            self.close()
            self._stderr.seek(0)
            tail = self._stderr.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"stats driver did not start: {ready!r}\n{tail}")

    def request(self) -> None:
        self.proc.stdin.write("snap\n")
        self.proc.stdin.flush()

    def collect(self) -> dict[str, dict]:
        line = self.lines.readline(120)
        return {s["replica"]: s for s in json.loads(line)}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _stats_driver(address: str, app: str) -> None:
    """Child-process side of :class:`ClassifierStats`."""
    import logging

    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR,
             configure_logging=False)
    handle = serve.get_deployment_handle("Classifier", app_name=app)
    handle.stats.remote().result(timeout_s=60)
    print("ready", flush=True)
    for _ in sys.stdin:
        status = serve.status().applications[app].deployments["Classifier"]
        running = max(1, status.replica_states.get("RUNNING", 1))
        seen: dict[str, dict] = {}
        for _ in range(20 * running):
            stats = handle.stats.remote().result(timeout_s=60)
            seen[stats["replica"]] = stats
            if len(seen) >= running:
                break
        print(json.dumps(list(seen.values())), flush=True)
    ray.shutdown()


def batch_delta(before: dict[str, dict], after: dict[str, dict]) -> tuple[int, int, int]:
    """(batches, images, calls) the classifier ran between two stats snapshots, over all
    replicas. A call is one group of images from the ingress (serve_app/batching.py)."""
    batches = images = calls = 0
    for rid, s in after.items():
        b = before.get(rid, {})
        batches += s["batches"] - b.get("batches", 0)
        images += s["images"] - b.get("images", 0)
        calls += s.get("calls", 0) - b.get("calls", 0)
    return batches, images, calls


# ---------------------------------------------------------------- runs

@dataclass
class Target:
    """A running server to drive: its URL, the process tree to account, a stats source."""

    url: str
    root_pid: Optional[int]
    stats: Optional[ClassifierStats] = None
    replicas: Optional["ServeStatusClient"] = None  # replica counts, sampled while measuring


def drive(target: Target, photos: Sequence[bytes], levels: Sequence[int], duration: float,
          warmup: float, max_requests: int, raw: Optional[dict], app: str = APP_NAME, single_group: Optional[str] = None) -> list[dict]:
    """One closed-loop run per concurrency level, with CPU and batch accounting."""
    rows = []
    for level in levels:
        snaps: dict[str, Any] = {}
        sampler = Sampler(target.replicas) if target.replicas is not None else None

        def on_window(edge: str) -> None:
            snaps[edge] = snapshot(target.root_pid, app)
            if target.stats is not None:
                target.stats.request()
            if sampler is not None:
                sampler.start() if edge == "start" else sampler.stop()

        result = run_load(target.url + "/v1/classify", photos, level, duration,
                          warmup_s=warmup, max_requests=max_requests, on_window=on_window)
        row = result.summary()
        if result.first_error:
            row["first_error"] = result.first_error
        if result.statuses:
            row["statuses"] = {str(k): v for k, v in sorted(result.statuses.items())}
        mean_batch = mean_call = None
        if target.stats is not None and "start" in snaps:
            before = target.stats.collect()
            after = target.stats.collect() if "end" in snaps else before
            batches, images, calls = batch_delta(before, after)
            mean_batch = round(images / batches, 2) if batches else None
            mean_call = round(images / calls, 2) if calls else None
            row["classifier_replicas"] = len(after)
        row["mean_batch"] = mean_batch
        row["images_per_call"] = mean_call
        if sampler is not None:
            sampler.stop()
            # [min, max] running per deployment while measured: an autoscaling config's
            # topology is part of the result.
            row["replicas"] = sampler.running_range()
        if "start" in snaps and "end" in snaps and result.completed:
            if single_group:  # the naive server: one process, everything is "the model"
                used = sum(e[1] for e in snaps["end"].values()) - sum(
                    e[1] for e in snaps["start"].values())
                row["cpu_ms_per_request"] = {"total": round(used * 1000 / result.completed, 2)}
            else:
                used = cpu_by_group(snaps["start"], snaps["end"])
                decode = raw["decode_cpu_ms"] if raw else 0.0
                forward = (model_forward_cpu_ms(raw["forward_cpu_ms"], mean_batch or 1.0)
                           if raw else 0.0)
                row["cpu_ms_per_request"] = cpu_ms_per_request(used, result.completed, decode,
                                                               forward)
                row["other_ray_detail"] = other_detail(snaps["start"], snaps["end"],
                                                       result.completed)
        if raw:
            row["ratio"] = round(row["rps"] / raw["best_img_s"], 3)
        rows.append(row)
        print(f"  {'naive' if single_group else 'served'} c={level}: {row['rps']} req/s, "
              f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, errors {row['errors']}, "
              f"batch {mean_batch}, images per call {mean_call}", flush=True)
    return rows


def edit_config(model: Optional[str], overrides: Sequence[str]):
    """The config edit for ``--model`` and ``--set``. ``--model`` swaps the network for one
    with random weights and keeps the file's other model settings (dtype, compile, ...)."""
    def edit(config: dict) -> None:
        if model:
            kept = {k: v for k, v in (config["applications"][0].get("args") or {})
                    .get("model", {}).items() if k not in ("name", "weights", "weights_path")}
            apply_override(config, "args.model=" + json.dumps(
                {**kept, "name": model, "weights": None}))
        for assignment in overrides:
            apply_override(config, assignment)
    return edit


def edited_config(args: argparse.Namespace) -> dict:
    """The Serve config the run serves: ``--config`` after ``--model`` and ``--set``."""
    from serve_app import configfile

    data = configfile.load(args.config)
    edit_config(args.model, args.set)(data)
    return data


def run_served(args: argparse.Namespace, photos: Sequence[bytes], raw: Optional[dict]
               ) -> tuple[list[dict], dict]:
    """The served rows, and what the run used (classifier threads, deployment options)."""
    from serve_app.launch import ServeProcess

    env = dict(e.split("=", 1) for e in args.env)
    if args.url:
        target = Target(args.url.rstrip("/"), None)
        return drive(target, photos, args.concurrency, args.duration, args.warmup,
                     args.max_requests, raw), {}
    # A compiled config is measured compiled: build its artifact first (a no-op once built),
    # rather than measure the eager network a replica serves while it builds in the background.
    from serve_app.compiling import compile_config

    if compile_config(edited_config(args), args.config) != 0:
        raise RuntimeError("could not build the compiled model the config asks for")
    log_path = Path(args.json).with_suffix(".serve.log") if args.json else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with ServeProcess(args.config, edit=edit_config(args.model, args.set), env=env,
                      log_path=log_path) as svc:
        found = cluster_address(svc.proc.pid)
        stats = ClassifierStats(*found) if found else None
        dashboard = dashboard_url_from_log(svc.log_path.read_text(errors="replace"))
        replicas = ServeStatusClient(dashboard, APP_NAME) if dashboard else None
        try:
            threads = 1
            if stats is not None:
                stats.request()
                first = stats.collect()
                threads = next(iter(first.values()))["threads"] if first else 1
            target = Target(svc.url, svc.proc.pid, stats, replicas)
            rows = drive(target, photos, args.concurrency, args.duration, args.warmup,
                         args.max_requests, raw)
        finally:
            if stats is not None:
                stats.close()
        deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"}
                       for d in svc.config["applications"][0].get("deployments", [])}
        return rows, {"classifier_threads": threads, "deployments": deployments}


def run_naive(args: argparse.Namespace, photos: Sequence[bytes], model_cfg: dict) -> list[dict]:
    """The naive server on the same model and threads, driven like the served app."""
    from serve_app.launch import free_port, http_get

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "load_tests.naive_server", "--model", json.dumps(model_cfg),
         "--threads", str(args.threads), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while http_get(url + "/healthz", timeout=2)[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"naive server did not start: {proc.stderr.read()[-2000:]!r}")
            time.sleep(0.3)
        return drive(Target(url, proc.pid), photos, args.concurrency, args.duration,
                     args.warmup, args.max_requests, None, single_group="naive")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def raw_device(args: argparse.Namespace) -> str:
    """cuda when the config gives the classifier a GPU and this machine has one, else cpu."""
    from serve_app import configfile

    options = configfile.deployment_options(edited_config(args)["applications"][0], "Classifier")
    if (options.get("ray_actor_options") or {}).get("num_gpus", 0) > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def model_config_of(args: argparse.Namespace) -> dict:
    """The ModelConfig (as a dict) the served app will use after --model and --set."""
    from serve_app.config import parse_app_config

    return parse_app_config(edited_config(args)["applications"][0].get("args")).model.model_dump()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--model", help="serve this torchvision model with random weights")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per level")
    parser.add_argument("--concurrency", type=parse_int_list, default=[1, 8, 32, 64])
    parser.add_argument("--max-requests", type=int, default=50_000, help="cap per level")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for raw and naive (the machine's CPUs)")
    parser.add_argument("--batch-sizes", type=parse_int_list, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="per raw batch size")
    parser.add_argument("--no-raw", action="store_true")
    parser.add_argument("--no-served", action="store_true")
    parser.add_argument("--naive", action="store_true", help="also drive the naive server")
    parser.add_argument("--url", help="drive an already running service instead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="config override, e.g. Classifier.max_ongoing_requests=64")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for serve run, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--stats-driver", help=argparse.SUPPRESS)
    parser.add_argument("--app", default=APP_NAME, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    # `timeout` and CI runners stop with SIGTERM: unwind, so ServeProcess stops the cluster.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.stats_driver:
        _stats_driver(args.stats_driver, args.app)
        return 0

    from load_tests.photos import photos_jpeg

    photos = [data for _, data in photos_jpeg()]
    model_cfg = model_config_of(args)
    result: dict[str, Any] = {
        "model": model_cfg["name"],
        "model_config": model_cfg,
        "command": "python -m load_tests.bench " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "config": args.config,
        "overrides": args.set,
        "env": args.env,
        "cpus": os.cpu_count(),
        "duration_s": args.duration,
        "photos": len(photos),
    }
    raw = None
    if not args.no_raw:
        print(f"raw: {model_cfg['name']}, {args.threads} threads, batch sizes "
              f"{args.batch_sizes}", flush=True)
        device = raw_device(args)
        raw = measure_raw(model_cfg, photos, args.threads, args.batch_sizes, args.raw_seconds,
                          extra_threads=(1, args.threads), device=device)
        result["raw"] = raw
        print(f"  {raw['by_batch_size']} img/s; bs1 {raw['bs1_ms']} ms", flush=True)
    if not args.no_served:
        rows, info = run_served(args, photos, raw)
        result["served"] = rows
        result.update(info)
        if rows:
            peak = max(rows, key=lambda r: r["rps"])
            if raw:
                result["ratio"] = round(peak["rps"] / raw["best_img_s"], 3)
            result["cpu_ms_per_request"] = peak.get("cpu_ms_per_request", {})
            result["saturation_concurrency"] = peak["concurrency"]
    if args.naive:
        result["naive"] = run_naive(args, photos, model_cfg)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    errors = sum(r["errors"] for r in result.get("served", []) + result.get("naive", []))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
