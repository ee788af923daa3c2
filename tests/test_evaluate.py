"""``ssdiff evaluate MODEL --like RUN``: a saved model scored in a run's quality space, with
the run's sampler and final-evaluation seed, so the figures pair with the run's own."""

import json
from pathlib import Path

import pytest
from conftest import TINY

from ssdiff_ray import cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_local):
    from ssdiff_ray import api, config

    out = tmp_path_factory.mktemp("evaluate")
    cfg = config.load(None, [*TINY, f"out_dir={out}", "name=fed", "rounds=2", "clients.pools=1"])
    return api.run(cfg, progress=False)["run_dir"]


def _evaluate(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_runs_own_model_scores_exactly_the_runs_final_figures(run_dir, capsys):
    rc, out, _ = _evaluate(capsys, f"{run_dir}/model", "--like", run_dir)
    assert rc == 0 and "fid" in out and "precision" in out
    res = json.loads((Path(run_dir) / "evaluations" / "model.json").read_text())
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    for k in ("fid", "precision", "recall", "bad_sample_share", "classes_present"):
        assert res[k] == pytest.approx(summary[k], rel=1e-6), k
        assert res["run"][k] == pytest.approx(summary[k], rel=1e-6)
    assert (Path(run_dir) / "evaluations" / "model.png").is_file()
    # a second evaluation of the same model is written beside the first, never over it
    assert _evaluate(capsys, f"{run_dir}/model", "--like", run_dir)[0] == 0
    assert (Path(run_dir) / "evaluations" / "model-2.json").is_file()


def test_a_centrally_trained_model_is_scored_in_the_runs_space(run_dir, tmp_path, capsys):
    from ssdiff_ray import config
    from ssdiff_ray.pretrain import pretrain

    central = tmp_path / "central"
    pretrain(config.load(f"{run_dir}/config.toml"), central, steps=1, progress=False)
    rc, _, _ = _evaluate(capsys, central, "--like", run_dir, "--out", tmp_path / "c.json")
    res = json.loads((tmp_path / "c.json").read_text())
    assert rc == 0 and (tmp_path / "c.png").is_file()
    # one Adam step from scratch is far from the federated model (two rounds of training)
    assert res["fid"] > res["run"]["fid"]


def test_bad_model_run_or_out_is_one_line(run_dir, tmp_path, capsys):
    from ssdiff_ray import config
    from ssdiff_ray.pretrain import pretrain

    rgb = tmp_path / "rgb"
    pretrain(config.load(None, [*TINY, "data.name=colour_digits"]), rgb, steps=1, progress=False)
    rc, _, err = _evaluate(capsys, rgb, "--like", run_dir)
    assert rc == 2 and "MODEL" in err and "3 channels" in err and len(err.splitlines()) == 1
    rc, _, err = _evaluate(capsys, f"{run_dir}/model", "--like", tmp_path)
    assert rc == 2 and "not a run directory" in err
    (tmp_path / "taken.json").write_text("{}")
    rc, _, err = _evaluate(capsys, f"{run_dir}/model", "--like", run_dir, "--out",
                           tmp_path / "taken.json")
    assert rc == 2 and "exists" in err and (tmp_path / "taken.json").read_text() == "{}"
    rc, _, err = _evaluate(capsys, tmp_path / "nothing", "--like", run_dir)
    assert rc == 2 and "no such directory" in err
