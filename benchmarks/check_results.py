"""Are README's figures backed by current results files?

    python benchmarks/check_results.py

Fails (exit 1) when
- a README paragraph, list or table states a measured figure (seconds, %, MiB, FID, ASR, p95 ...)
  and names no ``results/`` file (a table, or a block introduced by one ending in ":", may
  lean on the block before);
- README names a results file that does not exist;
- a results JSON records no provenance (commit and command; ``provenance.py`` writes it);
- README cites a results file whose code is older than the modules it measures (``MEASURES``:
  some commit after the file's own touched them), unless ``results/stale.toml`` lists the file
  with a reason *and* the README block citing it says "stale".

It prints every stale results file, cited or not, so what needs a rerun is never hidden.
"""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = ["ssdiff_ray/driver", "actors", "ssdiff_ray/train.py", "ssdiff_ray/codec.py",
          "ssdiff_ray/aggregation", "ssdiff_ray/planner.py", "ssdiff_ray/client_state.py",
          "ssdiff_ray/client_state_file.py"]
MODEL = ["ssdiff_ray/model"]
QUALITY = ["ssdiff_ray/metrics", "ssdiff_ray/evaluation.py", "ssdiff_ray/data"]
DEFENSE = ["ssdiff_ray/attacks", "ssdiff_ray/defense", "ssdiff_ray/attack_eval.py"]

# benchmark (script stem) -> the code its figures measure: a change there makes them stale.
MEASURES: dict[str, list[str]] = {
    "actor_startup": [*DRIVER, *MODEL],
    "batched": ["ssdiff_ray/batched.py", "ssdiff_ray/train.py", *MODEL],
    "centralized_gap": [*DRIVER, *MODEL, *QUALITY, "ssdiff_ray/policies", "ssdiff_ray/config.py",
                        "ssdiff_ray/pretrain.py", "ssdiff_ray/evaluate_model.py"],
    "client_state": [*DRIVER, "ssdiff_ray/driver/stress.py"],
    "codec_throughput": ["ssdiff_ray/codec.py"],
    "config_walk": ["ssdiff_ray/config.py", "ssdiff_ray/cli.py", *DRIVER],
    "distill": ["ssdiff_ray/distill", *MODEL, *DEFENSE, *QUALITY],
    "estimate_time": [*DEFENSE, *MODEL, "ssdiff_ray/inference.py"],
    "fid_bounds": QUALITY,
    "floor": DRIVER,
    "gen_batch": MODEL,
    "gpu_check": [*DRIVER, "ssdiff_ray/batched.py", *MODEL],
    "gradient_inversion": [*DEFENSE, *MODEL],
    "lora": [*DRIVER, *MODEL, *QUALITY],
    "main_job": [*DRIVER, *MODEL, *QUALITY, "ssdiff_ray/policies", "ssdiff_ray/config.py"],
    "peak_rss": DRIVER,
    "policies": [*DRIVER, *MODEL, *QUALITY, "ssdiff_ray/policies", "ssdiff_ray/energy.py",
                 "ssdiff_ray/devices.py"],
    "round_split": [*DRIVER, *QUALITY],
    "samplers": [*MODEL, *QUALITY],
    "security": [*DRIVER, *MODEL, *DEFENSE, *QUALITY],
    "security_matrix": [*MODEL, *DEFENSE, *QUALITY, "ssdiff_ray/inference.py",
                        "ssdiff_ray/pretrain.py"],
    "serve": ["ssdiff_ray/service", *MODEL, *DEFENSE],
    "serve_fuzz": ["ssdiff_ray/service"],
    "solver_time": ["ssdiff_ray/policies/energy_optimal.py", "ssdiff_ray/devices.py",
                    "ssdiff_ray/energy.py"],
    "stress": [*DRIVER, "ssdiff_ray/driver/stress.py"],
    "tracking_overhead": ["ssdiff_ray/tracking", *DRIVER],
    "trojdiff_shift": [*DEFENSE, *MODEL],
    "tuning_overhead": ["tuning", *DRIVER],
    "tuning_study": ["tuning", *DRIVER, *QUALITY, "ssdiff_ray/policies"],
}
# results whose name does not start with their benchmark's
BENCHMARK_OF = {"colour_digits": "main_job", "gpu": "gpu_check"}

FIGURE = re.compile(
    r"(?<![\w.=/-])\d[\d,]*(\.\d+)?\s?(s|ms|MiB|GiB|MB/s|req/s|%)(?![\w/])"
    r"|\b(FID|ASR|TPR|FPR|AUROC|p50|p95|p99)\s\d")
CITE = re.compile(r"results/([\w./-]*[\w/])")


def benchmark_of(rel: str) -> str | None:
    """``lora_seed1.md`` -> ``lora``: the longest benchmark name the file's name starts with."""
    first = rel.split("/")[0]
    stem = first.split(".")[0]
    if stem in BENCHMARK_OF:
        return BENCHMARK_OF[stem]
    names = [b for b in MEASURES if stem == b or stem.startswith(b + "_")]
    return max(names, key=len) if names else None


def _git(root: Path, *args: str) -> str | None:
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def changed_since(root: Path, commit: str, paths: list[str]) -> list[str] | None:
    """Commits after ``commit`` that touched ``paths`` (None: the commit is not in history)."""
    if _git(root, "cat-file", "-e", f"{commit}^{{commit}}") is None:
        return None
    out = _git(root, "log", "--format=%h %s", f"{commit}..HEAD", "--", *paths)
    return out.splitlines() if out else []


def provenance(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    p = data.get("provenance") if isinstance(data, dict) else None
    return p if isinstance(p, dict) and p.get("commit") and p.get("command") else None


def jsons_for(results: Path, rel: str) -> list[Path]:
    """The results JSON files holding the figures of a cited path (``security.md`` ->
    ``security.json``; a grid folder -> its benchmark's JSON files)."""
    path = results / rel
    if path.suffix == ".json":
        return [path]
    if path.is_file() and path.with_suffix(".json").is_file():
        return [path.with_suffix(".json")]
    if path.is_dir():
        inside = sorted(path.rglob("*.json"))
        if inside:
            return inside
    bench = benchmark_of(rel)
    return sorted(p for p in results.glob("*.json") if benchmark_of(p.name) == bench)


def readme_blocks(text: str) -> list[str]:
    """Paragraphs, lists and tables (blank-line separated), code blocks left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def check(root: Path = ROOT) -> tuple[list[str], dict[str, tuple[list[str], str | None]]]:
    """(problems, stale results file -> (the commits since that touched its code, the reason
    ``stale.toml`` gives or None))."""
    results = root / "benchmarks" / "results"
    stale_ok = {}
    if (results / "stale.toml").is_file():
        stale_ok = tomllib.loads((results / "stale.toml").read_text())
    problems: list[str] = []
    stale: dict[str, list[str]] = {}
    for path in sorted(results.rglob("*.json")):
        rel = str(path.relative_to(results))
        prov = provenance(path)
        if prov is None:
            problems.append(f"{rel}: no provenance (commit and command): rerun its benchmark")
            continue
        bench = benchmark_of(rel)
        if bench is None:
            problems.append(f"{rel}: no benchmark in MEASURES makes it")
            continue
        later = changed_since(root, prov["commit"], MEASURES[bench])
        if later is None:
            print(f"warning: {rel}: commit {prov['commit'][:12]} is not in this clone's history; "
                  "staleness not checked")
        elif later or prov.get("dirty"):
            stale[rel] = later or ["(measured on an edited tree)"]

    blocks = readme_blocks((root / "README.md").read_text())
    for i, block in enumerate(blocks):
        cites = CITE.findall(block)
        for rel in cites:
            if not (results / rel).exists():
                problems.append(f"README names results/{rel}, which does not exist")
                continue
            for js in jsons_for(results, rel):
                key = str(js.relative_to(results))
                if key not in stale:
                    continue
                if key in stale_ok and "stale" in block.lower():
                    continue
                problems.append(f"README cites results/{rel}, but {key} is older than the code "
                                f"it measures ({len(stale[key])} commits since, e.g. "
                                f"{stale[key][0]}): rerun it, or list it in results/stale.toml "
                                "and say 'stale' where README cites it")
        # a table, or a block the one before introduces ("...(`results/x.md`):"), may lean
        # on the citation just before it
        leans = i and CITE.search(blocks[i - 1]) and (block.lstrip().startswith("|")
                                                      or blocks[i - 1].rstrip().endswith(":"))
        if FIGURE.search(block) and not cites and not leans:
            first = FIGURE.search(block).group(0)
            problems.append(f"README states a figure ({first!r} in {block.strip()[:70]!r}...) "
                            "with no results file named in it or in the block before")
    for rel in stale:
        stale[rel] = (stale[rel], stale_ok.get(rel, {}).get("why"))
    return problems, stale


def main() -> int:
    problems, stale = check()
    for rel, (later, why) in sorted(stale.items()):
        why = why or "not listed in results/stale.toml"
        print(f"stale: {rel}: {len(later)} commits since touched what it measures ({why})")
    for p in problems:
        print(f"error: {p}")
    print(f"{len(problems)} problems, {len(stale)} stale results files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
