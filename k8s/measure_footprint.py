"""Measure the host memory (RSS) of each serve_app replica type and of Ray's own per-node
processes, so the pod sizes in serve_app/k8s.py come from numbers, not guesses.

    .venv/bin/python k8s/measure_footprint.py                 # CPU, configs/gpu.yaml's settings
    .venv/bin/python k8s/measure_footprint.py --config configs/local.yaml
    python k8s/measure_footprint.py --device cuda             # on a GPU node: CUDA's host cost

Each replica type is measured in a fresh interpreter that imports what a replica process
imports (ray, ray.serve, the deployment's module), builds what its ``__init__`` builds and then
does its work once:

* Classifier: the configured model (resnet50 here) from a state_dict on disk, the same
  ``torch.load`` + ``load_state_dict`` path as baked weights, warmed up as ``__init__`` does,
  then one batch of ``max_batch_size``. The weights are random: same tensors, same bytes.
  With ``model.compile`` the artifact directory starts empty, as in a pod whose image has
  no artifact for its CPU: the replica serves the eager network while a child process builds
  the artifact (serve_app/artifacts.py), then swaps it in; that builder and its C++ compiler
  processes count towards the classifier's peak.
* Preprocessor: one JPEG and one RGBA PNG at the config's ``max_image_pixels`` (the
  worst single request), and one 12-megapixel JPEG (a phone photo).
* Ingress: imports only; its other cost is the request bodies it holds.
* Serve controller and proxy: what their processes import (ray.serve, no torch).
* Ray node: ``ray.init()`` on this machine, then the RSS of Ray's own processes (GCS, raylet,
  dashboard and its agents, log monitor): what a head pod runs besides replicas.

No Serve cluster is started. Numbers are MiB; ``peak`` is the process's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def _status() -> dict[str, float]:
    """This process's memory from /proc/self/status, in MiB. VmHWM (peak RSS) is reset by
    exec, unlike ru_maxrss, which a child inherits from the process that started it."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


def _rss() -> dict[str, float]:
    """Resident memory now: private (anonymous: model, tensors, heaps; charged per process)
    and file-backed (shared libraries; in a pod's cgroup once, however many replicas map them)."""
    s = _status()
    return {"rss": round(s["VmRSS"], 1), "anon": round(s["RssAnon"], 1), "file": round(s["RssFile"], 1)}


def _peak() -> float:
    return round(_status()["VmHWM"], 1)


class _ChildrenPeak:
    """The most RSS this process's children (the C++ compiler under ``model.compile``) held
    at once, sampled every 20 ms: charged to the pod while a replica starts."""

    def __init__(self):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.02):
            total = 0.0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss / MIB
                except psutil.Error:
                    pass
            self.peak = max(self.peak, round(total, 1))

    def __enter__(self) -> "_ChildrenPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _classifier(config: str, weights: str, device: str) -> dict:
    import ray  # noqa: F401  (a replica process has these loaded)
    import ray.serve  # noqa: F401
    import torch

    from serve_app.classifier import Predictor
    from serve_app.config import ModelConfig
    from serve_app.configfile import deployment_options, load
    from serve_app.runtime import configure_torch_threads

    app = load(config)["applications"][0]
    opts = deployment_options(app, "Classifier")
    batch = opts["user_config"]["max_batch_size"]
    model = dict(app["args"]["model"], weights=None, weights_path=weights)
    out = {"imports": _rss()}
    configure_torch_threads(opts["ray_actor_options"])
    cfg = ModelConfig(**model)
    predictor = Predictor(cfg, torch.device(device))
    out["loaded"] = _rss()
    # What Classifier.__init__ (at the default batch size 8) and then reconfigure warm up.
    sizes = sorted({*predictor.sizes_to_warm(8), *predictor.sizes_to_warm(batch)})
    with _ChildrenPeak() as compilers:  # model.compile: the artifact builder and its g++
        predictor.warm_up(sizes)
        if predictor.artifact is not None and not predictor.compiled:
            predictor.artifact.build_in_background(cfg, predictor.device).wait()
            predictor.use_compiled(predictor.artifact.load(), sizes)
    out["warmed_up"] = _rss()
    out["compiler_peak_rss"] = compilers.peak
    size = predictor.info.transform.crop_size
    predictor.predict(torch.zeros((batch, 3, size, size), dtype=torch.uint8))
    out[f"after_batch_{batch}"] = _rss()
    out["peak"] = _peak()
    return out


def _preprocessor(config: str, images: dict[str, str]) -> dict:
    import ray  # noqa: F401
    import ray.serve  # noqa: F401

    from serve_app.configfile import load
    from serve_app.models import describe
    from serve_app.config import parse_app_config
    from serve_app.preprocessor import Preprocessor  # noqa: F401  (the deployment's module)
    from serve_app.imaging import preprocess
    from serve_app.runtime import configure_torch_threads

    settings = parse_app_config(load(config)["applications"][0]["args"])
    spec = describe(settings.model).transform
    configure_torch_threads({"CPU": 1.0})
    out = {"imports": _rss()}
    # Smallest first: VmHWM only grows, so each step's peak is that image's own.
    for name, path in images.items():
        data = Path(path).read_bytes()
        preprocess(data, spec, settings.max_image_pixels)
        out[f"peak_after_{name}"] = _peak()
    out["peak"] = _peak()
    return out


def _ingress() -> dict:
    import ray  # noqa: F401
    import ray.serve  # noqa: F401

    import serve_app.ingress  # noqa: F401

    return {"imports": _rss(), "peak": _peak()}


def _serve_system() -> dict:
    """What the Serve controller's and each proxy's process import (no torch, no serve_app)."""
    import ray  # noqa: F401
    import ray.serve._private.controller  # noqa: F401
    import ray.serve._private.proxy  # noqa: F401

    return {"imports": _rss(), "peak": _peak()}


def _ray_node() -> dict:
    import psutil
    import ray

    ray.init(num_cpus=1, include_dashboard=True, logging_level="ERROR")
    try:
        import time

        time.sleep(5)  # let the agents finish starting
        me = psutil.Process()
        procs = {}
        for p in me.children(recursive=True):
            try:
                cmd = p.cmdline()
                mem = p.memory_full_info()
            except psutil.Error:
                continue
            # python processes are named by their script or -m module, binaries by themselves
            key = Path(cmd[0]).name
            if key.startswith("python"):
                key = Path(next((a for a in cmd[1:] if not a.startswith("-")), key)).name
            procs[key] = (mem.rss / MIB, mem.uss / MIB)
        return {"processes_rss_uss": {k: [round(r, 1), round(u, 1)] for k, (r, u) in sorted(procs.items())},
                "total_rss": round(sum(r for r, _ in procs.values()), 1),
                "total_uss": round(sum(u for _, u in procs.values()), 1)}
    finally:
        ray.shutdown()


WORKER_NODE_PROCESSES = ("raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "log_monitor.py")


def summarize(report: dict) -> dict[str, float]:
    """The numbers serve_app/k8s.py sizes pods with: private (per-process) peaks, shared
    library pages (once per pod), and Ray's own processes (USS)."""
    c, p = report["classifier"], report["preprocessor"]
    last = [v for k, v in c.items() if k.startswith("after_batch")][0]
    node = report["ray_node"]["processes_rss_uss"]
    return {
        "shared_libs": max(c["loaded"]["file"], last["file"], p["imports"]["file"]),
        "classifier_peak_private": round(c["peak"] - last["file"] + c.get("compiler_peak_rss", 0), 1),
        "preprocessor_peak_private": round(p["peak"] - p["imports"]["file"], 1),
        "ingress_private": report["ingress"]["imports"]["anon"],
        "serve_controller_or_proxy_private": report["serve_controller_or_proxy"]["imports"]["anon"],
        "ray_head_processes_uss": report["ray_node"]["total_uss"],
        "ray_worker_processes_uss": round(sum(node[k][1] for k in WORKER_NODE_PROCESSES if k in node), 1),
    }


def _make_images(limit: int, tmp: Path) -> dict[str, str]:
    """A 12 MP JPEG, a JPEG and an RGBA PNG at the pixel limit; smooth content so each stays
    under max_body_bytes, like a real photo does."""
    import numpy as np
    from PIL import Image

    out = {}
    for name, (w, h), mode, fmt in [("jpeg_12mp", (4000, 3000), "RGB", "JPEG"),
                                     ("jpeg_max", _max_size(limit), "RGB", "JPEG"),
                                     ("png_rgba_max", _max_size(limit), "RGBA", "PNG")]:
        x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, axis=0)
        channels = [x, np.fliplr(x), np.full_like(x, 128)]
        if mode == "RGBA":
            channels.append(np.full_like(x, 200))
        image = Image.fromarray(np.stack(channels, axis=-1), mode)
        buf = io.BytesIO()
        image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
        path = tmp / f"{name}.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        out[name] = str(path)
    return out


def _max_size(limit: int) -> tuple[int, int]:
    h = int((limit * 3 / 4) ** 0.5)
    return limit // h, h  # 4:3, width*height <= limit


def _child(role: str, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        # Empty caches, as in a new pod: model.compile builds its artifact from scratch.
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=cache,
                   SERVE_APP_ARTIFACT_DIR=os.path.join(cache, "artifacts"))
        proc = subprocess.run([sys.executable, __file__, "--role", role, *args], env=env,
                              cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpu.yaml"))
    parser.add_argument("--device", default="cpu", help="the classifier's device: cpu or cuda")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "classifier":
        result = _classifier(args.config, args.extra[0], args.device)
    elif args.role == "preprocessor":
        result = _preprocessor(args.config, json.loads(args.extra[0]))
    elif args.role == "ingress":
        result = _ingress()
    elif args.role == "serve_system":
        result = _serve_system()
    elif args.role == "ray_node":
        result = _ray_node()
    else:
        import torch

        from serve_app.config import ModelConfig, parse_app_config
        from serve_app.configfile import load
        from serve_app.models import build_model

        settings = parse_app_config(load(args.config)["applications"][0]["args"])
        random_weights = ModelConfig(name=settings.model.name, weights=None)
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pth"
            torch.save(build_model(random_weights).state_dict(), weights)
            images = _make_images(settings.max_image_pixels, Path(tmp))
            report = {
                "config": args.config,
                "model": settings.model.name,
                "compile": settings.model.compile,
                "max_image_pixels": settings.max_image_pixels,
                "classifier_device": args.device,
                "image_bytes": {k: Path(v).stat().st_size for k, v in images.items()},
                "classifier": _child("classifier", "--config", args.config, "--device",
                                     args.device, str(weights)),
                "preprocessor": _child("preprocessor", "--config", args.config, json.dumps(images)),
                "ingress": _child("ingress"),
                "serve_controller_or_proxy": _child("serve_system"),
                "ray_node": _child("ray_node"),
            }
        report["summary_mib"] = summarize(report)
        print(json.dumps(report, indent=2))
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()
