"""A seeded run gives the ledgers and weights recorded in ``tests/data/golden_run``.

The files were written by this run on main d43ed39, before the layout refactoring
(ARCHITECTURE.md): a change that moves code must leave every ledger column but the
measured timings, and every weight, bit-identical. A change that means to alter training
rewrites the files (the test's docstring of ``test_golden_run`` says how) and says so.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "golden_run"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compare_runs import compare_table  # noqa: E402

# fedavgm (a server option), doubly_adaptive (a policy option) and 4-5 bit uploads with
# error feedback: the options and the codec are inside what must not move
GOLDEN = [
    "model.preset=tiny", "model.timesteps=100", "clients.count=6", "clients.per_round=0.5",
    "clients.pools=2", "train.local_steps=2", "train.batch_size=8", "eval.samples=40",
    "eval.steps=4", "eval.grid=16", "eval.baseline=false", "eval.every=1", "rounds=3",
    "server.aggregator=fedavgm", "server.momentum=0.5", "quant.policy=doubly_adaptive",
    "quant.bits=4", "quant.convergence_window=1",
    "train.warmup_steps=0",   # the recorded run had no local warm-up (added after d43ed39)
]


def weight_digests(model_dir: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        tensors = load_file(f)
        for k in sorted(tensors):
            out[f"{f.relative_to(model_dir)}:{k}"] = hashlib.sha256(tensors[k].tobytes()).hexdigest()
    return out


@pytest.mark.slow
def test_golden_run(tmp_path):
    """To rewrite the files after a deliberate change: run this config with ``ssdiff run``
    and copy rounds.parquet, clients.parquet and the weights' digests into ``DATA``."""
    from ssdiff_ray.cli import main

    assert main(["run", "--quiet", *sum((["--set", s] for s in GOLDEN), []),
                 "--set", f"out_dir={tmp_path}", "--set", "name=golden"]) == 0
    run = tmp_path / "golden"
    for name in ("rounds.parquet", "clients.parquet"):
        assert compare_table(DATA / name, run / name) is None, name
    assert weight_digests(run / "model") == json.loads((DATA / "model_sha256.json").read_text())
