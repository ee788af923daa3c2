"""Are two runs the same run? Compares their ledgers (every column but timings) and the
saved model weights, e.g. the main job before and after a refactoring, same seed.

    python benchmarks/compare_runs.py runs/before runs/after

Prints one line per file and exits 1 on any difference (the first differing column named).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

# measured wall-clock seconds differ between any two runs; everything else must not
TIMING = {"wall_s", "train_wall_s", "train_s", "encode_s", "decode_s", "aggregate_s", "eval_s"}


def compare_table(a: Path, b: Path) -> str | None:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    cols = [c for c in x.columns if c not in TIMING]
    if set(cols) != {c for c in y.columns if c not in TIMING}:
        return f"columns differ: {sorted(set(cols) ^ {c for c in y.columns if c not in TIMING})}"
    if len(x) != len(y):
        return f"{len(x)} rows vs {len(y)}"
    for c in cols:
        u, v = x[c].to_numpy(), y[c].to_numpy()
        same = (np.array_equal(u, v, equal_nan=True) if u.dtype.kind == "f"
                else np.array_equal(u.astype(str), v.astype(str)))
        if not same:
            return f"column {c!r} differs"
    return None


def compare_model(a: Path, b: Path) -> str | None:
    from safetensors.numpy import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if not files or files != sorted(p.relative_to(b) for p in b.rglob("*.safetensors")):
        return "different weight files"
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        if x.keys() != y.keys():
            return f"{f}: different tensors"
        for k in x:
            if not np.array_equal(x[k], y[k]):
                return f"{f}: tensor {k!r} differs (max |diff| {np.abs(x[k] - y[k]).max():.3g})"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    a, b = Path(argv[0]), Path(argv[1])
    bad = 0
    for name, fn in (("rounds.parquet", compare_table), ("clients.parquet", compare_table),
                     ("model", compare_model)):
        missing = [str(p / name) for p in (a, b) if not (p / name).exists()]
        diff = f"missing {', '.join(missing)}" if missing else fn(a / name, b / name)
        print(f"{name}: {'identical' if diff is None else diff}")
        bad += diff is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
