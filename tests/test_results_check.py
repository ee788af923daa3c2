"""benchmarks/check_results.py: README figures name current results files. On this repository,
and on a small git repository where each rule is broken once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import check_results  # noqa: E402


def test_readme_figures_are_backed_by_current_results_files():
    problems, stale = check_results.check(ROOT)
    assert problems == []
    # every stale file is waived with a reason (printed by the script on each CI run)
    assert all(why for _, why in stale.values()), stale


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A repository with one module, one results file made at its commit, and a README
    citing it."""
    (tmp_path / "ssdiff_ray").mkdir()
    (tmp_path / "ssdiff_ray" / "codec.py").write_text("BITS = 8\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "codec")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "codec_throughput.json").write_text(json.dumps(
        {"mb_s": 900, "provenance": {"commit": _git(tmp_path, "rev-parse", "HEAD"),
                                     "command": "python benchmarks/codec_throughput.py"}}))
    (tmp_path / "README.md").write_text(
        "# t\n\nThe codec encodes at 900 MB/s (`results/codec_throughput.json`).\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "results")
    return tmp_path


def test_a_current_results_file_passes_and_a_results_only_commit_keeps_it_current(repo):
    assert check_results.check(repo) == ([], {})


def test_code_changed_after_the_results_makes_the_cited_figure_fail(repo):
    (repo / "ssdiff_ray" / "codec.py").write_text("BITS = 4\n")
    _git(repo, "commit", "-qam", "faster codec")
    problems, stale = check_results.check(repo)
    assert list(stale) == ["codec_throughput.json"]
    assert len(problems) == 1 and "older than the code it measures" in problems[0]
    assert "faster codec" in problems[0]
    # waived with a reason, but README must say the figure is stale where it cites it
    (repo / "benchmarks" / "results" / "stale.toml").write_text(
        '["codec_throughput.json"]\nwhy = "needs the 2-core machine"\n')
    assert len(check_results.check(repo)[0]) == 1
    readme = repo / "README.md"
    readme.write_text(readme.read_text().replace("900 MB/s", "900 MB/s, stale,"))
    problems, stale = check_results.check(repo)
    assert problems == [] and stale["codec_throughput.json"][1] == "needs the 2-core machine"


def test_a_figure_without_a_results_file_and_a_missing_or_unstamped_file_fail(repo):
    readme = repo / "README.md"
    readme.write_text(readme.read_text() + "\nA round takes 3.2 s on a laptop.\n\n"
                      "Memory: see `results/gone.json`.\n")
    (repo / "benchmarks" / "results" / "floor.json").write_text('{"ratio": 1.1}')
    problems = check_results.check(repo)[0]
    assert len(problems) == 3, problems
    assert any("'3.2 s'" in p and "no results file" in p for p in problems)
    assert any("results/gone.json, which does not exist" in p for p in problems)
    assert any(p.startswith("floor.json: no provenance") for p in problems)


def test_a_table_after_a_paragraph_naming_its_results_file_passes(repo):
    readme = repo / "README.md"
    readme.write_text(readme.read_text() + "\nMeasured (`results/codec_throughput.json`):\n\n"
                      "| size | MB/s |\n|---|---|\n| 1 M | 900 MB/s |\n")
    assert check_results.check(repo)[0] == []


def test_provenance_records_commit_command_and_config(tmp_path):
    from provenance import write_json

    write_json(tmp_path / "r.json", [{"a": 1}], {"rounds": 2})
    rec = json.loads((tmp_path / "r.json").read_text())
    p = rec["provenance"]
    assert rec["rows"] == [{"a": 1}] and p["config"] == {"rounds": 2}
    assert p["commit"] == _git(ROOT, "rev-parse", "HEAD") and p["command"].startswith("python ")
