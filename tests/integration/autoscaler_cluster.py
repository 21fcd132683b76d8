"""A Ray cluster on this one machine whose worker node types are scaled by the real Ray
autoscaler (v2), through Ray's fake multi-node provider, with the node types of
k8s/rayservice.yaml.

- :func:`derive_kuberay_autoscaling_config` runs the KubeRay autoscaler's own translation
  (``_derive_autoscaling_config_from_ray_cr``) on ``spec.rayClusterConfig`` of the RayService.
- :func:`fake_node_types` shrinks those node types so they fit on a 2-core machine: small
  logical CPU counts, no logical ``memory`` (the fake provider would pass it on as a custom
  resource, which Ray refuses), the smallest object store, and ``min_workers`` 0 by default.
  The ``GPU`` count and the group ``labels`` (``serve-app/pool: gpu`` ...) are kept, so a
  "gpu" node declares ``GPU: 1`` without a real GPU.
- :class:`FakeProviderCluster` (a context manager) writes the config to a private temp
  dir, runs ``ray start --head`` on free ports with ``--temp-dir`` and
  ``--autoscaling-config``, waits until the v2 autoscaler reports, and on exit stops every
  process it started - found by a marker variable in their environment (inherited by the
  head's processes, the autoscaler monitor, the fake worker nodes it launches and their
  workers) or by the temp dir in their command line - by PID. It never runs ``ray stop``
  (which would stop every Ray cluster on the machine) and never calls
  ``ray.cluster_utils.AutoscalingCluster.start()`` (which force-stops every Ray process on
  the machine).
  A watchdog process (own session) does the same clean-up if the caller dies without
  reaching ``__exit__`` (SIGKILL); SIGTERM is turned into ``SystemExit`` while the cluster
  is up, so ``__exit__`` runs (but once ``ray.init`` has run, Ray's own C++ SIGTERM handler
  aborts the process soon after; the watchdog then finishes the job - seen: nothing left
  about 11 s later).

Why not the stock pieces (Ray 2.60):
- provider ``type: fake_multinode`` makes the autoscaler merge the defaults in
  ``fake_multi_node/example.yaml``, which the wheel lacks (FileNotFoundError in
  ``prepare_config``). ``type: external`` with ``module:`` naming the same
  ``FakeMultiNodeProvider`` class uses the built-in minimal defaults instead.
- The fake provider starts worker nodes inside the autoscaler monitor process
  (``ray._private.node.Node``, not ``ray start``) and connects them to
  ``provider.gcs_address`` (default ``<ip>:6379``), so the config names our GCS port.

This module imports only the standard library at import time (the watchdog runs it as a
script); ``ray`` and ``yaml`` are imported where used.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

REPO = Path(__file__).resolve().parents[2]
RAYSERVICE_YAML = REPO / "k8s" / "rayservice.yaml"

# Same values as ray.autoscaler._private.fake_multi_node.node_provider (checked at start).
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
FAKE_HEAD_NODE_TYPE = "ray.head.default"
FAKE_PROVIDER_CLASS = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"

MARKER_ENV = "SERVE_APP_FAKE_AUTOSCALER_ID"
MIN_OBJECT_STORE_BYTES = 75 * 1024 * 1024  # Ray's minimum (ray_constants)
V2_MONITOR = "autoscaler/v2/monitor.py"
V1_MONITOR = "autoscaler/_private/monitor.py"


# --------------------------------------------------------------------------- config

def load_ray_cluster_cr(path: Path | str = RAYSERVICE_YAML) -> Dict[str, Any]:
    """The RayCluster custom resource a RayService describes (its ``spec.rayClusterConfig``),
    or the file itself when it already is a RayCluster."""
    import yaml

    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    doc = next(d for d in docs if d.get("kind") in ("RayService", "RayCluster"))
    meta = doc.get("metadata", {})
    spec = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
    return {
        "apiVersion": doc.get("apiVersion", "ray.io/v1"),
        "kind": "RayCluster",
        "metadata": {"name": meta.get("name", "raycluster"),
                     "namespace": meta.get("namespace", "default")},
        "spec": copy.deepcopy(spec),
    }


def derive_kuberay_autoscaling_config(path: Path | str = RAYSERVICE_YAML) -> Dict[str, Any]:
    """What the KubeRay in-tree autoscaler would run with: Ray's own translation of the
    RayCluster spec (node types, resources, labels, idle timeout, upscaling speed)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    return _derive_autoscaling_config_from_ray_cr(load_ray_cluster_cr(path))


def fake_node_types(
    derived: Optional[Dict[str, Any]] = None,
    *,
    worker_cpus: float | Dict[str, float] = 1,
    min_workers: Optional[int | Dict[str, int]] = 0,
    max_workers: Optional[int] = 2,
    object_store_memory: int = MIN_OBJECT_STORE_BYTES,
    head_cpus: float = 0,
) -> Dict[str, Any]:
    """``available_node_types`` for the fake provider on one small machine, from the derived
    KubeRay config (derived from k8s/rayservice.yaml when not given).

    - the head group becomes ``ray.head.default`` (the fake provider's head type), with
      ``head_cpus`` CPUs and its labels;
    - every worker group keeps its name, ``GPU`` and other custom resources and its
      ``labels``; ``CPU`` becomes ``worker_cpus`` (a number, or a per-group dict; groups not
      named keep min(derived, 1)); ``memory`` is dropped; ``object_store_memory`` is set;
    - ``min_workers`` is replaced (a number for all groups, a per-group dict, or None to keep
      the derived ``minReplicas``) and ``max_workers`` is capped (None: keep).
    """
    derived = derived if derived is not None else derive_kuberay_autoscaling_config()
    head_type = derived["head_node_type"]
    out: Dict[str, Any] = {}
    for name, node_type in derived["available_node_types"].items():
        nt = copy.deepcopy(node_type)
        resources = dict(nt.get("resources", {}))
        resources.pop("memory", None)
        if name == head_type:
            resources["CPU"] = head_cpus
            resources.pop("GPU", None)
            nt.update(resources=resources, min_workers=0, max_workers=0, node_config={})
            out[FAKE_HEAD_NODE_TYPE] = nt
            continue
        if isinstance(worker_cpus, dict):
            cpus = worker_cpus.get(name, min(resources.get("CPU", 1), 1))
        else:
            cpus = worker_cpus
        resources["CPU"] = cpus
        resources["object_store_memory"] = object_store_memory
        nt["resources"] = resources
        nt["node_config"] = {}
        if min_workers is not None:
            nt["min_workers"] = (min_workers.get(name, 0) if isinstance(min_workers, dict)
                                 else min_workers)
        if max_workers is not None:
            nt["max_workers"] = min(nt["max_workers"], max_workers)
        nt["min_workers"] = min(nt["min_workers"], nt["max_workers"])
        out[name] = nt
    return out


def fake_autoscaling_config(
    node_types: Dict[str, Any],
    *,
    gcs_address: str,
    cluster_name: str = "serve-app-fake",
    idle_timeout_minutes: float = 0.25,
    upscaling_speed: float = 1000,
    **extra: Any,
) -> Dict[str, Any]:
    """The whole autoscaler config (what ``ray start --autoscaling-config`` reads)."""
    assert FAKE_HEAD_NODE_TYPE in node_types, "node_types needs the fake head type"
    config = {
        "cluster_name": cluster_name,
        "max_workers": sum(nt.get("max_workers", 0) for nt in node_types.values()),
        "provider": {
            # "fake_multinode" would need fake_multi_node/example.yaml (absent in the 2.60
            # wheel); "external" loads the same class with Ray's minimal defaults.
            "type": "external",
            "module": FAKE_PROVIDER_CLASS,
            "gcs_address": gcs_address,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": copy.deepcopy(node_types),
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": upscaling_speed,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    config.update(extra)
    return config


# --------------------------------------------------------------------------- processes

def _proc_state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def _proc_start_ticks(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def find_processes(marker: str, temp_dir: str, exclude: Iterable[int] = ()) -> List[int]:
    """Live (non-zombie) processes whose environment holds ``MARKER_ENV=marker`` or whose
    command line names ``temp_dir``."""
    want_env = f"{MARKER_ENV}={marker}".encode()
    want_cmd = temp_dir.encode()
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in skip:
            continue
        state = _proc_state(pid)
        if state is None or state in ("Z", "X"):
            continue
        hit = False
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                hit = want_env in f.read().split(b"\0")
        except OSError:
            pass
        if not hit:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    hit = want_cmd in f.read()
            except OSError:
                pass
        if hit:
            found.append(pid)
    return sorted(found)


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: Iterable[int], timeout_s: float) -> List[int]:
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if _proc_state(p) not in (None, "Z", "X")]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def kill_cluster_processes(
    find: Callable[[], List[int]], grace_s: float = 10.0, log: Callable[[str], None] = print,
) -> List[int]:
    """Stop what ``find()`` returns, by PID: the autoscaler monitor first (so it launches
    nothing more), then SIGTERM to the rest, SIGKILL after ``grace_s``; repeated until
    ``find()`` is empty (a dying raylet can still spawn). Returns what is left (should be [])."""
    pids = find()
    monitors = [p for p in pids if V2_MONITOR in proc_cmdline(p) or V1_MONITOR in proc_cmdline(p)]
    if monitors:
        _signal(monitors, signal.SIGTERM)
        _signal(_wait_gone(monitors, 5.0), signal.SIGKILL)
    deadline = time.monotonic() + 3 * grace_s + 20
    first = True
    while True:
        pids = find()
        if not pids:
            return []
        if time.monotonic() >= deadline:
            return pids
        if first:
            log(f"[fake-autoscaler] SIGTERM {len(pids)} processes: {pids}")
            _signal(pids, signal.SIGTERM)
            left = _wait_gone(pids, grace_s)
            first = False
        else:
            left = pids
        if left:
            log(f"[fake-autoscaler] SIGKILL {left}")
            _signal(left, signal.SIGKILL)
            _wait_gone(left, 5.0)


def _watchdog(parent_pid: int, parent_ticks: int, marker: str, temp_dir: str) -> None:
    """Runs in its own session: when the parent dies without having stopped the cluster
    (its stop file absent), stop every process of the cluster."""
    stop_file = os.path.join(temp_dir, "stopped")
    while True:
        if os.path.exists(stop_file) or not os.path.isdir(temp_dir):
            return
        if _proc_start_ticks(parent_pid) != parent_ticks:
            break
        time.sleep(1.0)
    if os.path.exists(stop_file):
        return
    kill_cluster_processes(lambda: find_processes(marker, temp_dir), log=lambda m: None)


# --------------------------------------------------------------------------- cluster

class FakeProviderCluster:
    """``with FakeProviderCluster(node_types) as c: ray.init(address=c.gcs_address)``.

    ``node_types`` defaults to :func:`fake_node_types` of k8s/rayservice.yaml. ``auth_mode``:
    "token" or "disabled"; default: ``$RAY_AUTH_MODE``, else "token" when a token exists
    (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ~/.ray/auth_token), else "disabled".
    With "token", ``__enter__`` also enables token auth in this process (sets
    ``RAY_AUTH_MODE=token`` and refreshes Ray's config): ``ray.init(address=...)`` with an
    explicit address does not turn it on by itself in Ray 2.60.
    """

    def __init__(
        self,
        node_types: Optional[Dict[str, Any]] = None,
        *,
        idle_timeout_minutes: float = 0.25,
        autoscaler_v2: bool = True,
        include_dashboard: bool = True,
        head_object_store_memory: int = MIN_OBJECT_STORE_BYTES,
        update_interval_s: int = 1,  # AUTOSCALER_UPDATE_INTERVAL_S must be an integer
        auth_mode: Optional[str] = None,
        extra_env: Optional[Dict[str, str]] = None,
        start_timeout_s: float = 180.0,
        stop_grace_s: float = 10.0,
        keep_temp_dir: bool = False,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
        **config_extra: Any,
    ) -> None:
        self.node_types = node_types if node_types is not None else fake_node_types()
        self.idle_timeout_minutes = idle_timeout_minutes
        self.autoscaler_v2 = autoscaler_v2
        self.include_dashboard = include_dashboard
        self.head_object_store_memory = head_object_store_memory
        self.update_interval_s = update_interval_s
        self.auth_mode = auth_mode or self._default_auth_mode()
        self.extra_env = dict(extra_env or {})
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.keep_temp_dir = keep_temp_dir
        self.log = log
        self.config_extra = config_extra
        self.marker = uuid.uuid4().hex
        self.temp_dir: Optional[str] = None
        self.config: Optional[Dict[str, Any]] = None
        self.config_path: Optional[str] = None
        self.gcs_address: Optional[str] = None
        self.ports: Dict[str, int] = {}
        self.env: Dict[str, str] = {}
        self.leftovers: Optional[List[int]] = None
        self._watchdog_proc: Optional[subprocess.Popen] = None
        self._old_sigterm = None
        self._started = False

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _default_auth_mode() -> str:
        mode = os.environ.get("RAY_AUTH_MODE")
        if mode:
            return mode.lower()
        if os.environ.get("RAY_AUTH_TOKEN"):
            return "token"
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        return "token" if os.path.exists(path) else "disabled"

    def processes(self) -> List[int]:
        """PIDs of every live process this cluster started (head, monitor, fake nodes,
        workers), not counting the watchdog."""
        if not self.temp_dir:
            return []
        exclude = [self._watchdog_proc.pid] if self._watchdog_proc else []
        return find_processes(self.marker, self.temp_dir, exclude=exclude)

    def ps(self, pids: Optional[Iterable[int]] = None, width: int = 150) -> str:
        pids = list(self.processes() if pids is None else pids)
        lines = [f"{p:>8} {proc_cmdline(p)[:width]}" for p in pids]
        return "\n".join(lines) if lines else "(none)"

    @property
    def session_dir(self) -> Optional[str]:
        if not self.temp_dir:
            return None
        latest = os.path.join(self.temp_dir, "session_latest")
        return os.path.realpath(latest) if os.path.exists(latest) else None

    def log_tail(self, prefix: str = "monitor", n_bytes: int = 6000) -> str:
        """The end of the head's log files named ``prefix*`` (e.g. "monitor")."""
        if not self.session_dir:
            return ""
        logs = Path(self.session_dir) / "logs"
        out = []
        for f in sorted(logs.glob(f"{prefix}*")):
            data = f.read_bytes()[-n_bytes:].decode(errors="replace")
            if data.strip():
                out.append(f"--- {f.name}\n{data}")
        return "\n".join(out)

    def cluster_status(self):
        from ray.autoscaler.v2.sdk import get_cluster_status

        return get_cluster_status(self.gcs_address)

    # -- start ----------------------------------------------------------------------------
    def __enter__(self) -> "FakeProviderCluster":
        try:
            self._start()
        except BaseException:
            self._stop(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop(failed=exc_type is not None)

    def _check_ray(self) -> None:
        from ray.autoscaler._private.fake_multi_node import node_provider as fake

        assert fake.FAKE_HEAD_NODE_ID == FAKE_HEAD_NODE_ID
        assert fake.FAKE_HEAD_NODE_TYPE == FAKE_HEAD_NODE_TYPE

    def _start(self) -> None:
        import ray
        from ray._private.services import get_node_ip_address

        self._check_ray()
        self.temp_dir = tempfile.mkdtemp(prefix="fakeas_", dir="/tmp")  # short: socket paths
        self._start_watchdog()
        self._install_sigterm()

        names = ["gcs", "dashboard", "dashboard_agent_listen", "dashboard_agent_grpc",
                 "runtime_env_agent", "metrics_export", "client_server", "node_manager",
                 "object_manager"]
        from serve_app.launch import free_ports

        self.ports = dict(zip(names, free_ports(len(names))))
        node_ip = get_node_ip_address()
        self.gcs_address = f"{node_ip}:{self.ports['gcs']}"

        self.config = fake_autoscaling_config(
            self.node_types, gcs_address=self.gcs_address,
            idle_timeout_minutes=self.idle_timeout_minutes, **self.config_extra)
        self.config_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=1)

        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        if env.get("CUDA_VISIBLE_DEVICES") == "":
            # "" means "no GPU": a fake node declaring GPU: 1 would then fail to start.
            del env["CUDA_VISIBLE_DEVICES"]
        env.update({
            MARKER_ENV: self.marker,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": str(int(self.update_interval_s)),
            "RAY_AUTH_MODE": self.auth_mode,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        })
        if self.autoscaler_v2:
            env.update({
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                # Not RAY_NODE_TYPE_NAME: the monitor inherits this environment and the fake
                # provider builds its worker nodes in the monitor's process, where Ray reads
                # RAY_NODE_TYPE_NAME for the ray.io/node-group label - every fake worker
                # would be labelled as the head group.
            })
        else:
            env["RAY_enable_autoscaler_v2"] = "0"
        env.update(self.extra_env)
        self.env = env

        if self.auth_mode == "token" and os.environ.get("RAY_AUTH_MODE") != "token":
            from ray._private.authentication.authentication_token_setup import (
                _enable_token_auth,
            )

            _enable_token_auth()  # this process talks to the GCS too

        head = self.node_types[FAKE_HEAD_NODE_TYPE]
        head_res = dict(head.get("resources", {}))
        labels = head.get("labels") or {}
        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head",
               f"--port={self.ports['gcs']}",
               f"--node-manager-port={self.ports['node_manager']}",
               f"--object-manager-port={self.ports['object_manager']}",
               f"--ray-client-server-port={self.ports['client_server']}",
               f"--dashboard-agent-listen-port={self.ports['dashboard_agent_listen']}",
               f"--dashboard-agent-grpc-port={self.ports['dashboard_agent_grpc']}",
               f"--runtime-env-agent-port={self.ports['runtime_env_agent']}",
               f"--metrics-export-port={self.ports['metrics_export']}",
               f"--include-dashboard={'true' if self.include_dashboard else 'false'}",
               f"--dashboard-port={self.ports['dashboard']}",
               "--dashboard-host=127.0.0.1",
               f"--num-cpus={int(head_res.pop('CPU', 0))}",
               f"--num-gpus={int(head_res.pop('GPU', 0))}",
               f"--object-store-memory={self.head_object_store_memory}",
               f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={self.config_path}",
               "--disable-usage-stats"]
        head_res.pop("object_store_memory", None)
        if head_res:
            cmd.append(f"--resources={json.dumps(head_res)}")
        if labels:
            cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        self.log(f"[fake-autoscaler] {' '.join(cmd)}")
        out = subprocess.run(cmd, env=env, cwd=self.temp_dir, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=self.start_timeout_s)
        self._started = True
        if out.returncode != 0:
            raise RuntimeError(f"ray start --head failed ({out.returncode}):\n"
                               f"{out.stdout.decode(errors='replace')[-4000:]}")
        self._wait_ready()
        ray._private.services.find_gcs_addresses.cache_clear()

    def _wait_ready(self) -> None:
        """The GCS answers and the autoscaler monitor has reported a state (v2), or at least
        runs (v1)."""
        deadline = time.monotonic() + self.start_timeout_s
        want = V2_MONITOR if self.autoscaler_v2 else V1_MONITOR
        last_err: Any = None
        while time.monotonic() < deadline:
            monitors = [p for p in self.processes() if want in proc_cmdline(p)]
            if not monitors:
                last_err = f"no {want} process"
            elif not self.autoscaler_v2:
                return
            else:
                try:
                    status = self.cluster_status()
                    version = status.stats.autoscaler_version
                    if version not in (None, "", "0"):
                        return
                    last_err = f"autoscaler_version={version!r}"
                except Exception as e:  # GCS not up yet
                    last_err = repr(e)
            time.sleep(0.5)
        raise TimeoutError(f"fake autoscaling cluster not ready in {self.start_timeout_s}s: "
                           f"{last_err}\n{self.log_tail('monitor')}")

    def _start_watchdog(self) -> None:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import autoscaler_cluster as m; "
                "m._watchdog(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])")
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        self._watchdog_proc = subprocess.Popen(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(os.getpid()),
             str(_proc_start_ticks(os.getpid())), self.marker, self.temp_dir],
            env=env, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _install_sigterm(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def _on_term(signum, frame):
                raise SystemExit(128 + signum)

            self._old_sigterm = signal.signal(signal.SIGTERM, _on_term)

    # -- stop -----------------------------------------------------------------------------
    def _disconnect_driver(self) -> None:
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        try:
            addr = ray._private.worker.global_worker.node.gcs_address
        except Exception:
            addr = None
        if addr == self.gcs_address:
            ray.shutdown()

    def _stop(self, failed: bool) -> None:
        if self.temp_dir is None:
            return
        try:
            self._disconnect_driver()
        except Exception as e:
            self.log(f"[fake-autoscaler] ray.shutdown() failed: {e!r}")
        if failed and self._started:
            tail = self.log_tail("monitor")
            if tail:
                self.log(f"[fake-autoscaler] monitor log tail:\n{tail}")
        self.leftovers = kill_cluster_processes(self.processes, grace_s=self.stop_grace_s,
                                                log=self.log)
        if self.leftovers:
            self.log(f"[fake-autoscaler] STILL RUNNING after stop:\n{self.ps(self.leftovers)}")
        try:
            Path(self.temp_dir, "stopped").touch()
        except OSError:
            pass
        if self._watchdog_proc is not None:
            try:
                self._watchdog_proc.terminate()
                self._watchdog_proc.wait(timeout=5)
            except Exception:
                self._watchdog_proc.kill()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if not self.leftovers and not failed and not self.keep_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        else:
            self.log(f"[fake-autoscaler] kept {self.temp_dir}")
        if self.leftovers:
            raise RuntimeError(f"processes of the fake cluster still running: {self.leftovers}")
