"""Compiled models as files: compile once per machine, load in well under a second.

``torch.compile`` at replica start traced and compiled the network in every new replica
(20-60 s of CPU on 2 cores, taken from the replicas already serving). Instead, the network is
exported once with a dynamic batch dimension and compiled ahead of time by AOTInductor
(weights frozen into the package); a replica then loads the ``.pt2`` package and serves.

An artifact is keyed by everything that changes the code it holds: the model and its weights,
dtype and memory format, the device, the batch range, torch's version, the CPU's vector
instructions and flags, and the thread count Inductor compiled for. A file whose metadata
names another key (stale), or whose bytes do not match the recorded digest (corrupt), is never
loaded: it is built again. Builders hold a lock and install with an atomic rename, so replicas
that build the same artifact at once neither corrupt it nor build it twice.

    python -m serve_app compile configs/local.yaml     # build what a config needs, ahead
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from serve_app import models
from serve_app.config import ModelConfig

logger = logging.getLogger("ray.serve")

#: Bumped when the way artifacts are exported or laid out changes.
FORMAT = 1
#: Batch sizes one artifact accepts; larger batches run in chunks of this size.
MAX_BATCH = 64
#: Where artifacts live when neither ``model.artifact_dir`` nor this variable says.
DIR_ENV = "SERVE_APP_ARTIFACT_DIR"
DEFAULT_DIR = Path("~/.cache/serve_app/artifacts")

Network = Callable[[torch.Tensor], torch.Tensor]


def artifact_dir(cfg: ModelConfig) -> Path:
    return Path(cfg.artifact_dir or os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()


def effective_dtype(cfg: ModelConfig, device_type: str) -> torch.dtype:
    """Reduced precision only where it pays: on a GPU. CPU kernels for fp16 are slow."""
    name = cfg.dtype if device_type == "cuda" else "float32"
    return getattr(torch, name)


@lru_cache(maxsize=1)
def _cpu_identity() -> dict[str, str]:
    """The vector ISA torch dispatches to here, and a digest of the CPU's flags: code built
    for AVX-512 must never run on an AVX2-only machine. (Both without importing Inductor.)"""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_key(cfg: ModelConfig, device: torch.device, threads: int) -> dict[str, Any]:
    """Everything the compiled code depends on, as plain JSON. Cheap: no torchvision import
    (a classifier replica computes it at every start)."""
    weights_package = models.weights_package(cfg.name)
    key: dict[str, Any] = {
        "format": FORMAT, "model": cfg.name, "weights": cfg.weights,
        "weights_package": f"{weights_package}=={_package_version(weights_package)}",
        "dtype": str(effective_dtype(cfg, device.type)).removeprefix("torch."),
        "channels_last": cfg.channels_last, "batch": [1, MAX_BATCH],
        "torch": torch.__version__, "device": device.type, "threads": threads,
    }
    if cfg.weights_path:
        key["weights"] = None
        key["weights_sha256"] = _file_digest(cfg.weights_path)
    elif cfg.weights is None:
        key["seed"] = cfg.seed
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
        key["cuda"] = torch.version.cuda
    else:
        key.update(_cpu_identity())
    return key


@dataclass(frozen=True)
class Artifact:
    """One compiled network on disk: ``<dir>/<model>-<key digest>.pt2`` and its ``.json``."""

    key: dict[str, Any]
    directory: Path

    @classmethod
    def of(cls, cfg: ModelConfig, device: torch.device, threads: int) -> "Artifact":
        return cls(artifact_key(cfg, device, threads), artifact_dir(cfg))

    @property
    def stem(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        return f"{self.key['model']}-{digest[:16]}"

    @property
    def path(self) -> Path:
        return self.directory / f"{self.stem}.pt2"

    @property
    def meta_path(self) -> Path:
        return self.directory / f"{self.stem}.json"

    def problem(self) -> Optional[str]:
        """Why the file on disk must not be loaded (None: it may)."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return "not built yet"
        except (OSError, ValueError) as exc:
            return f"unreadable metadata ({exc})"
        if meta.get("key") != self.key:
            return "stale: built for another model, machine or torch"
        try:
            if _file_digest(self.path) != meta.get("sha256"):
                return "corrupt: the package does not match its recorded digest"
        except OSError as exc:
            return f"missing package ({exc})"
        return None

    def load(self) -> Optional[Network]:
        """The compiled network, or None (and the reason logged) when it must be built."""
        why = self.problem()
        if why is None:
            try:
                return _load_package(self.path)
            except Exception as exc:  # a package torch cannot load is as good as corrupt
                why = f"failed to load ({type(exc).__name__}: {exc})"
        logger.info("Compiled artifact %s: %s", self.path, why)
        return None

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"{self.stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def build(self, cfg: ModelConfig, device: torch.device) -> bool:
        """Export, compile, check against eager and install the artifact; False when a valid
        one was already there (another builder finished first). Holds the artifact's lock."""
        with self._lock():
            if self.problem() is None:
                return False
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=self.directory, prefix=".build-") as tmp:
                package = Path(tmp) / "model.pt2"
                _export_and_compile(cfg, device, self.key["threads"], package)
                meta = {"key": self.key, "sha256": _file_digest(package),
                        "build_s": round(time.perf_counter() - started, 1),
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                meta_tmp = Path(tmp) / "meta.json"
                meta_tmp.write_text(json.dumps(meta, indent=1) + "\n")
                # The package first, its metadata last: a reader that finds the new metadata
                # finds the new package; one that finds old metadata sees a digest mismatch.
                os.replace(package, self.path)
                os.replace(meta_tmp, self.meta_path)
            logger.info("Compiled artifact %s built in %.1fs", self.path, meta["build_s"])
            return True

    def build_in_background(self, cfg: ModelConfig, device: torch.device) -> subprocess.Popen:
        """``build`` in a child process at the lowest CPU priority, so the replicas serving
        meanwhile keep the cores (nice 19 gets ~1.5% of a core beside a busy nice-0 one)."""
        cmd = [sys.executable, "-m", "serve_app.artifacts", "--model", cfg.model_dump_json(),
               "--device", str(device), "--threads", str(self.key["threads"])]
        # nice(1) lowers the priority before Python starts, so torch's import is low too.
        nice = shutil.which("nice")
        cmd = [nice, "-n", "19", *cmd] if nice else [*cmd, "--nice", "19"]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


def _load_package(path: Path) -> Network:
    """The package's C++ runner, called directly: ``torch._inductor.aoti_load_package`` wraps
    the same loader but imports Inductor and Dynamo first, ~2 s of CPU per replica start.
    One tensor in, one out (the exported signature)."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def network(x: torch.Tensor) -> torch.Tensor:
        return loader.boxed_run([x])[0]

    return network


def _export_and_compile(cfg: ModelConfig, device: torch.device, threads: int, out: Path) -> None:
    """torch.export with a dynamic batch, AOTInductor with frozen weights, then a check that the
    package computes what the eager network does before anyone may load it."""
    from serve_app.models import build_model, describe, require_cxx

    require_cxx(device)
    dtype = effective_dtype(cfg, device.type)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg).to(device, dtype=dtype, memory_format=memory_format)
    size = describe(cfg).transform.crop_size
    probe = torch.randn((3, 3, size, size), generator=torch.Generator().manual_seed(0))
    probe = probe.to(device, dtype=dtype).contiguous(memory_format=memory_format)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # Inductor sizes its parallel loops by this
    try:
        with torch.inference_mode():
            program = torch.export.export(model, (probe,), dynamic_shapes=({0: batch},))
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(out),
                inductor_configs={"freezing": True, "compile_threads": threads})
            compiled = _load_package(out)
            for n in (1, 3):
                expected = model(probe[:n]).float().softmax(-1)
                got = compiled(probe[:n]).float().softmax(-1)
                tolerance = 1e-4 if dtype == torch.float32 else 1e-2
                if not torch.allclose(got, expected, atol=tolerance):
                    raise RuntimeError(f"compiled {cfg.name} differs from eager at batch {n} by "
                                       f"{(got - expected).abs().max().item():.2e}; not installed")
    finally:
        torch.set_num_threads(before)


def main(argv: Optional[list[str]] = None) -> int:
    """The background builder a replica starts (``Artifact.build_in_background``)."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.artifacts")
    parser.add_argument("--model", required=True, help="ModelConfig as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    logging.basicConfig(level=logging.INFO, format="serve_app.artifacts: %(message)s")
    cfg = ModelConfig.model_validate_json(args.model)
    device = torch.device(args.device)
    Artifact.of(cfg, device, args.threads).build(cfg, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
