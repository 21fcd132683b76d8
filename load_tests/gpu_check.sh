#!/usr/bin/env bash
# The throughput benchmark for configs/gpu.yaml on a machine with an NVIDIA GPU: raw (in one
# process, on the GPU) and served, in under 5 minutes; prints the table, writes JSON.
#
#   bash load_tests/gpu_check.sh            # from the repository root
#   OUT=/some/dir PYTHON=/path/python bash load_tests/gpu_check.sh
#
# Python: $PYTHON, else .venv if it has torch + Ray Serve, else the system python3 if it has
# them, else a fresh .venv-gpu with the project installed (needs a package index).
# Weights: resnet50 IMAGENET1K_V2 from the torch cache when it is there; otherwise random
# weights (--model resnet50): throughput does not depend on the weights, and the machine may
# have no internet to download them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/serve_app_gpu}
mkdir -p "$OUT"
start=$(date +%s)

if ! nvidia-smi -L; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed)" >&2
    exit 2
fi

has_stack() { "$1" -c 'import torch, torchvision, ray.serve, fastapi, psutil, skimage' 2>/dev/null; }
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]] && has_stack .venv/bin/python; then
        PY=.venv/bin/python
    elif has_stack python3; then
        PY=python3
    else
        python3 -m venv .venv-gpu
        .venv-gpu/bin/python -m pip install --quiet --upgrade pip
        .venv-gpu/bin/python -m pip install --quiet -e '.[load]'
        PY=.venv-gpu/bin/python
    fi
fi
# The project itself (editable, no dependency changes) when this python lacks it.
"$PY" -c 'import serve_app, load_tests.bench' 2>/dev/null || "$PY" -m pip install --quiet --no-deps -e .
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch cannot see the GPU (CPU-only wheel or driver mismatch)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

MODEL_ARGS=()
if ! timeout 60 "$PY" -c 'from torchvision.models import resnet50, ResNet50_Weights
resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)' >/dev/null 2>&1; then
    echo "gpu_check: resnet50 IMAGENET1K_V2 weights unavailable offline; using random weights"
    MODEL_ARGS=(--model resnet50)
fi

# Budget: raw ~40 s, service start ~60-90 s, 5 levels x (4 + 12) s, stop ~10 s.
left=$(( 290 - ($(date +%s) - start) ))
echo "gpu_check: benchmark with ${left}s left of the 5-minute budget"
timeout --signal=TERM --kill-after=20 "$left" \
    "$PY" -m load_tests.bench --config configs/gpu.yaml "${MODEL_ARGS[@]}" \
        --threads "$(nproc)" --batch-sizes 1,2,4,8,16,32 --raw-seconds 2 \
        --duration 12 --warmup 4 --concurrency 1,8,32,64,128 \
        --json "$OUT/gpu_bench.json"
echo "gpu_check: done in $(( $(date +%s) - start ))s; JSON in $OUT/gpu_bench.json"
