#!/usr/bin/env bash
# The one script a session with a GPU runs (issue 13): GPU tests, the default suite with CUDA visible and
# hidden, the 2:4 decisions at the issue's shapes, and the two GPU benchmarks. Logs and JSON go to $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh          # on the device machine: $OUT is set by the tool
#
# Python packages: the image's torch (CUDA build) plus the wheels carried in .whl/ (pure-python deps this
# project needs and the image lacks), installed without dependencies into /tmp/site.
# Steps run in order of importance, each under its own timeout; a failing step does not stop the others.
set -u
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
T_SCALE="${T_SCALE:-1}"  # multiply every timeout (e.g. 0.5 for a short device budget)

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

step() {  # step NAME SECONDS COMMAND...
    local name="$1" secs="$2"
    shift 2
    secs=$("$PY" -c "print(max(10, int($secs * $T_SCALE)))")
    local t0=$SECONDS
    timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.log"
}

{
    echo "date: $(date -u)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count(), 'cusparselt', getattr(torch._C, '_has_cusparselt', None), 'cslt_search', hasattr(torch, '_cslt_sparse_mm_search'))"
    "$PY" -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1 | tail -n 1
    "$PY" -c "import torch_pruning, onnxruntime, transformers; print('torch_pruning', torch_pruning.__version__, 'onnxruntime', onnxruntime.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -n 1
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# 1. every stage on CUDA, DDP over nccl
step pytest_gpu 240 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
# 2. ResNet-50 at 50 % channels: dense vs ours (device-aware widths) vs torch-pruning, bf16, CUDA graphs
step prune_speed_cuda 240 "$PY" benchmarks/prune_speed.py --device cuda --out "$OUT/prune_speed_cuda.json"
# 3. the 2:4 decision (measured, with cuSPARSELt's search) at the issue's shapes
step decisions_24 120 "$PY" - "$OUT/decisions_24.json" <<'PYEOF'
import json, sys, torch
from compressor.kernels import calibrate as KC
g = torch.Generator().manual_seed(0)
rows = []
for (o, i), n in [((4096, 4096), 4096), ((4096, 4096), 128), ((4096, 4096), 1), ((11008, 4096), 4096), ((4096, 11008), 4096)]:
    w = torch.randn(o, i, generator=g) * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(i // 4)
    d = KC.calibrate(w, None, rows=n, device="cuda", repeats=30, cache=KC.DecisionCache(), use_cache=False)
    rows.append({"shape": [o, i], "rows": n, **d.to_dict()})
    print(o, i, n, d.format, d.reason)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
PYEOF
# 4./5. the default suite with CUDA visible, then hidden
step pytest_default_cuda 300 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider
step pytest_default_nocuda 300 env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -q -m "not slow" -p no:cacheprovider
# 6. kernel micro-benchmark (2:4 vs dense bf16, CSR vs dense)
step kernels_cuda 180 "$PY" benchmarks/kernels.py --device cuda --quick --out "$OUT/kernels.json"

echo "done: $(date -u)" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
