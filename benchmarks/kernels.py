"""Dense vs sparse linear kernels (CSR/BSR on CPU, 2:4 semi-structured on CUDA), side by side in one run.

    python benchmarks/kernels.py                  # CPU: torch.set_num_threads(1), then 2; full grid
    python benchmarks/kernels.py --quick          # 768x768 and 4096x4096, sparsity 0.5/0.9
    python benchmarks/kernels.py --device cuda    # GPU: 2:4 vs dense bf16, CSR vs dense fp32

Writes benchmarks/results/kernels.json (merged, one entry per device/thread count). The code lives in
compressor/kernels/bench.py so that `compress bench-kernels` runs the same thing.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")
    argv = sys.argv[1:]
    if not any(a.startswith("--out") for a in argv):
        argv += ["--out", str(Path(__file__).resolve().parent / "results" / "kernels.json")]
    main(argv)
