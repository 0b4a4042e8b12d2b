"""Plant bugs in the pruner's position map and show which zero-channel oracle catches them.

    PYTHONPATH=$PWD python scripts/mutate_pruner.py [model ...]

For every mutation of graphs/mutations.py and every zoo model given (default: a CNN, a concat, a residual,
a split and two transformer models), prunes a random 30 % selection with the bug planted and runs the old
oracle (compressor/graph/oracle.py, shares the pruner's Plan) and the independent one (graphs/zero_oracle.py).
Prints one row per (mutation, model): PASS means the oracle accepted the pruned model; "outputs only" is the
new oracle without its initializer check (zeroed original vs pruned in onnxruntime alone).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphs  # noqa: E402
from graphs.mutations import MUTATIONS, case, verdicts  # noqa: E402

DEFAULT = ["cnn", "concat", "residual", "split", "bert", "llama"]


def main(names: list[str]) -> int:
    rows, escaped = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        cases = {}
        for name in names:
            path = Path(tmp) / f"{name}.onnx"
            graphs.export(name, path)
            model = onnx.load(str(path))
            cases[name] = (model, *case(model))
        for name, (model, a, atoms) in cases.items():
            v = verdicts(model, a, atoms, None)
            rows.append(("(none)", name, v))
        for mut in MUTATIONS:
            for name, (model, a, atoms) in cases.items():
                v = verdicts(model, a, atoms, mut)
                rows.append((mut, name, v))
                escaped += v["changed"] and v["new"]
    print(f"| {'mutation':<15} | {'model':<9} | changes cut | old oracle | new oracle | outputs only | new oracle's first finding")
    print(f"|{'-' * 17}|{'-' * 11}|-------------|------------|------------|--------------|{'-' * 40}")
    for mut, name, v in rows:
        ch = "-" if mut == "(none)" else ("yes" if v["changed"] else "no")
        print(f"| {mut:<15} | {name:<9} | {ch:<11} | {'PASS' if v['old'] else 'FAIL':<10} | "
              f"{'PASS' if v['new'] else 'FAIL':<10} | {'PASS' if v['new_outputs'] else 'FAIL':<12} | {v['why'][:70]}")
    print(f"\nmutations that changed the cut and passed the new oracle: {escaped}")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
