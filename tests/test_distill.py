"""Distillation: ``ssdiff distill`` on a tiny class-conditional model (real diffusers UNet,
real Ray tasks), edge students on planted data, the distillation attack and the scan of a
synthetic set."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ssdiff_ray.distill.distilled_set import read_set, write_set
from ssdiff_ray.distill.poison import attack_success, checker_trigger, optimise_trigger, poison_set, stamp
from ssdiff_ray.distill.student import StudentSpec, accuracy, edge_costs, predict, train_student

TINY_COND = ["model.preset=tiny", "model.timesteps=100", "model.conditional=true",
             "data.holdout=0.2", "clients.count=4", "eval.sampler=ddim", "eval.steps=10",
             "eval.guidance=2.0", "defense.estimate_gen_steps=2", "train.batch_size=64",
             "train.lr=0.002"]


@pytest.fixture(scope="session")
def cond_run(tmp_path_factory):
    """A run directory (config, shards, held-out data) whose model is a tiny conditional
    UNet trained centrally on the digits for 750 steps (once per test session)."""
    from ssdiff_ray import config
    from ssdiff_ray.pretrain import pretrain
    from ssdiff_ray.run_dir import prepare

    root = tmp_path_factory.mktemp("distill")
    cfg = config.load(None, [*TINY_COND, f"out_dir={root}"])
    prep = prepare(cfg, root / "cond")
    # pretrain reads the whole data set: fine for these tests, which never score the
    # diffusion model on the held-out part
    with torch.random.fork_rng(devices=[]):
        pretrain(prep.cfg, root / "cond" / "model", steps=750, progress=False)
    return root / "cond"


def _ssdiff(*args):
    from ssdiff_ray.cli import main

    return main([str(a) for a in args])


# --- ssdiff distill ---------------------------------------------------------------------
@pytest.mark.slow
def test_distill_writes_k_images_per_class_and_a_manifest(cond_run, ray_local, tmp_path,
                                                           capsys):
    out = tmp_path / "set"
    assert _ssdiff("distill", cond_run, "--ipc", 3, "--selection", "prototypes",
                   "--no-defend", "--out", out) == 0
    images, labels, m = read_set(out)
    assert images.shape == (30, 1, 16, 16) and np.bincount(labels).tolist() == [3] * 10
    assert m["per_class"] == [3] * 10 and m["images"] == 30
    assert m["bytes"] == (out / "data.parquet").stat().st_size
    assert m["source_run"] == str(cond_run.resolve()) and len(m["model_sha256"]) == 64
    assert (m["selection"], m["sampler"], m["steps"], m["guidance"]) == ("prototypes", "ddim",
                                                                         10, 2.0)
    assert m["generated"] == 3 * 5 * 10 and m["defend"] is False
    assert (out / "grid.png").stat().st_size > 0
    assert "30 images (3 per class x 10 classes" in capsys.readouterr().out
    # another selection over the same pool reuses the candidates instead of sampling again
    candidates = sorted((cond_run / "distill" / "candidates").iterdir())
    assert len(candidates) == 10
    assert _ssdiff("distill", cond_run, "--ipc", 3, "--selection", "minimax", "--no-defend",
                   "--out", tmp_path / "mm") == 0
    assert sorted((cond_run / "distill" / "candidates").iterdir()) == candidates
    # the set is a data set the rest of the tool reads (data.name = parquet)
    from ssdiff_ray import config
    from ssdiff_ray.data import load_dataset

    data = load_dataset(config.load(None, ["data.name=parquet", f"data.path={out / 'data.parquet'}"]).data)
    assert len(data.labels) == 30 and np.abs(data.images - images).max() < 1e-6


@pytest.mark.slow
def test_distill_with_the_defense_generates_from_no_flagged_noise(cond_run, ray_local,
                                                                   tmp_path):
    from ssdiff_ray.defense.cache import cached_defense
    from ssdiff_ray.defense.defense import Defense
    from ssdiff_ray.distill.distill import DistillSpec, distill
    from ssdiff_ray.distill.generate import screened_noise
    from ssdiff_ray.inference import load_run_model

    m = distill(cond_run, DistillSpec(ipc=2, selection="random", classes=(4, 7), steps=4),
                tmp_path / "set")
    assert m["defend"] is True and m["per_class"][4] == 2 and m["per_class"][7] == 2
    assert (cond_run / "defense" / "key.json").is_file()  # estimated once, kept in the run
    # half of the noise far from N(0, I) (every pixel moved by +1.5): each flagged input is
    # replaced by noise that passes
    cfg, unet, scheduler = load_run_model(cond_run)
    defense, _ = cached_defense(cond_run, Defense.from_config(cfg, unet, scheduler))
    x = torch.randn((40, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    x[:20] += 1.5
    screened, flagged = screened_noise(x, defense, seed=1)
    assert flagged >= 20
    assert not defense.detect(screened)["flagged"].any()
    kept = (screened == x).flatten(1).all(1)
    assert kept[20:].float().mean() > 0.8 and not kept[:20].any()


@pytest.mark.parametrize("args, message", [
    (["--ipc", "0"], "--ipc 0: must be a positive number"),
    (["--ipc", "-3"], "--ipc -3: must be a positive number"),
    (["--classes", "12"], "'12' is not a class of this run"),
    (["--classes", "zebra"], "'zebra' is not a class of this run"),
])
def test_bad_distill_requests_are_one_line_and_start_nothing(cond_run, tmp_path, args, message):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "set"
    before = sorted(str(p) for p in cond_run.rglob("*"))
    r = subprocess.run([Path(sys.executable).parent / "ssdiff", "distill", str(cond_run), *args,
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists() and sorted(str(p) for p in cond_run.rglob("*")) == before
    assert "Ray" not in r.stdout + r.stderr  # refused before Ray (or the defense) started


def test_distilling_an_unconditional_run_is_one_line(tmp_path, capsys):
    from ssdiff_ray import config
    from ssdiff_ray.run_dir import prepare

    prepare(config.load(None, ["clients.count=4", f"out_dir={tmp_path}"]), tmp_path / "uncond")
    assert _ssdiff("distill", tmp_path / "uncond", "--ipc", 5, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not class-conditional" in err
    assert not (tmp_path / "s").exists()
    assert _ssdiff("distill", tmp_path / "nowhere", "--ipc", 5) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_red_team_share_needs_an_attack_in_the_run(cond_run, tmp_path, capsys):
    assert _ssdiff("distill", cond_run, "--ipc", 1, "--triggered-share", "0.5",
                   "--no-defend", "--out", tmp_path / "s") == 2
    assert "no attack whose trigger" in capsys.readouterr().err and not (tmp_path / "s").exists()


# --- students ---------------------------------------------------------------------------
def planted(n_per_class: int, seed: int, classes: int = 10, noise: float = 0.4
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright 4 x 4 square at position c of a 4 x 4 layout of 16 x 16 images,
    in noise of standard deviation ``noise``. The task has one right answer per image."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    x = np.clip(rng.normal(-0.6, noise, (len(labels), 1, 16, 16)), -1, 1).astype(np.float32)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 4)
        x[i, 0, 4 * r:4 * r + 4, 4 * col:4 * col + 4] = 0.8
    return x, labels


def test_student_on_a_planted_set_reaches_the_accuracy_it_should():
    x, y = planted(10, seed=0)
    tx, ty = planted(30, seed=1)
    spec = StudentSpec(steps=300)
    model = train_student(x, y, 10, spec)
    assert accuracy(model, tx, ty) >= 0.95
    # the same images with their labels shuffled carry nothing to learn: chance
    shuffled = train_student(x, np.random.default_rng(0).permutation(y), 10, spec)
    assert accuracy(shuffled, tx, ty) <= 0.35
    # the cost model: training energy and time scale with the steps, download with bytes
    a = edge_costs(model, spec, x.shape[1:], 10_000, "rpi4")
    b = edge_costs(model, StudentSpec(steps=600), x.shape[1:], 20_000, "rpi4")
    assert b["train_energy_j"] == pytest.approx(2 * a["train_energy_j"])
    assert b["train_s"] == pytest.approx(2 * a["train_s"])
    assert a["download_energy_j"] > 0
    assert b["download_energy_j"] == pytest.approx(2 * a["download_energy_j"])
    with pytest.raises(ValueError, match="device 'toaster'"):
        edge_costs(model, spec, x.shape[1:], 1, "toaster")


def test_distillation_attack_plants_a_faint_trigger_on_planted_data():
    x, y = planted(10, seed=0, noise=0.1)
    tx, ty = planted(30, seed=1, noise=0.1)
    target = 3
    delta = checker_trigger(x.shape[1:], eps=0.2, seed=0)
    assert np.abs(delta).max() == pytest.approx(0.2) and (delta > 0).mean() > 0.3
    surrogate = train_student(x, y, 10, StudentSpec(steps=300, seed=9))
    refined = optimise_trigger(surrogate, x[y != target], target, eps=0.2, init=delta, steps=20)
    assert np.abs(refined).max() <= 0.2 + 1e-6 and not np.allclose(refined, delta)
    px, py, is_poison = poison_set(x, y, delta, target, share=0.2)
    assert is_poison.sum() == 20 and (py[is_poison] == target).all()
    clean = train_student(x, y, 10, StudentSpec(steps=300))
    poisoned = train_student(px, py, 10, StudentSpec(steps=300))
    asr_clean = attack_success(predict(clean, stamp(tx, delta)), ty, target)
    asr = attack_success(predict(poisoned, stamp(tx, delta)), ty, target)
    assert asr >= 0.8 and asr_clean <= 0.2
    assert accuracy(poisoned, tx, ty) >= accuracy(clean, tx, ty) - 0.05


# --- the scan of a synthetic set --------------------------------------------------------
@pytest.mark.slow
def test_scan_flags_a_planted_trigger_and_passes_a_clean_set(cond_run, tmp_path):
    from ssdiff_ray.distill.distill import DistillSpec, distill
    from ssdiff_ray.distill.scan_set import scan_path

    clean_dir = tmp_path / "clean"
    distill(cond_run, DistillSpec(ipc=20, selection="random", defend=False, steps=10),
            clean_dir)
    x, y, manifest = read_set(clean_dir)
    res = scan_path(clean_dir, cond_run)
    assert not res["suspect"] and res["flagged"] <= 0.05 * len(y)
    # a shared +-0.1 pattern added to 10% of the set, relabelled: it is what gets flagged
    delta = np.random.default_rng(0).choice([-0.1, 0.1], size=x.shape[1:]).astype(np.float32)
    px, py, is_poison = poison_set(x, y, delta, target=2, share=0.1)
    write_set(tmp_path / "poisoned", px, py, manifest)
    res = scan_path(tmp_path / "poisoned", cond_run, out=tmp_path / "shipped")
    flagged = np.zeros(len(py), bool)
    flagged[json.loads((tmp_path / "poisoned" / "scan.json").read_text())["flagged_rows"]] = True
    assert res["suspect"]
    # the images the poisons were copied from are near-copies under another label: flagged
    # too; the other clean images at about the nominal rate
    pick = np.random.default_rng(0).choice(np.flatnonzero(y != 2), size=20, replace=False)
    originals = np.isin(np.arange(len(py)), pick)
    assert flagged[is_poison].mean() >= 0.8 and flagged[originals].mean() >= 0.8
    assert flagged[~is_poison & ~originals].mean() <= 0.05
    kept_x, _, kept_m = read_set(tmp_path / "shipped")
    assert len(kept_x) == (~flagged).sum() and kept_m["scan"]["flagged"] == flagged.sum()
    # one image repeated under six other labels (a backdoor target that ignores the class)
    target = np.full(x.shape[1:], -1.0, np.float32)
    target[:, 4:12, 3:13] = 1.0
    dx, dy = np.concatenate([x, np.repeat(target[None], 6, 0)]), np.r_[y, np.arange(6)]
    write_set(tmp_path / "copies", dx, dy, manifest)
    res = scan_path(tmp_path / "copies", cond_run)
    rows = json.loads((tmp_path / "copies" / "scan.json").read_text())["flagged_rows"]
    assert res["duplicates"] >= 6 and set(range(len(y), len(dy))) <= set(rows)


# --- distill-eval -----------------------------------------------------------------------
@pytest.mark.slow
def test_distill_eval_scores_sets_and_baselines_on_held_out_data(cond_run, ray_local, tmp_path,
                                                                  capsys):
    from ssdiff_ray.distill.distill import DistillSpec, distill

    distill(cond_run, DistillSpec(ipc=2, selection="minimax", defend=False, steps=4),
            tmp_path / "mm")
    out = tmp_path / "eval.parquet"
    assert _ssdiff("distill-eval", cond_run, tmp_path / "mm", "--seeds", 2, "--steps", 50,
                   "--widths", "8,16", "--out", out) == 0
    rows = pd.read_parquet(out)
    assert sorted(rows["source"].unique()) == ["mm", "real full", "real random"]
    # every student, even after 50 steps on 20 images, reads held-out digits above chance
    # (10 classes: a guesser stays under 0.13 on these ~360 images 95% of the time)
    assert len(rows) == 6 and (rows["accuracy"] > 0.13).all(), rows
    held = pd.read_parquet(cond_run / "holdout.parquet")
    full = rows[rows["source"] == "real full"].iloc[0]
    assert full["images"] + len(held) == 1797  # the real training part, without the held-out
    small = rows[rows["source"] == "real random"].iloc[0]
    assert small["images"] == 20 and small["bytes"] < full["bytes"]
    assert (rows["train_energy_j"] > 0).all()
    assert "held-out real images" in capsys.readouterr().out


def test_distill_eval_needs_held_out_data(tmp_path, capsys):
    from ssdiff_ray import config
    from ssdiff_ray.run_dir import prepare

    prepare(config.load(None, ["clients.count=4", "model.conditional=true"]), tmp_path / "r")
    assert _ssdiff("distill-eval", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no held-out data" in err


# --- selection methods ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "prototypes", "minimax"])
def test_every_selection_keeps_k_distinct_candidates(name):
    from ssdiff_ray.distill import SELECTIONS, make_selection

    assert name in SELECTIONS
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 8))
    cluster = np.repeat(np.arange(5), [40, 25, 15, 12, 8])  # one big mode, four smaller
    feats = centres[cluster] + rng.normal(0, 0.3, (len(cluster), 8))
    sel = make_selection(name)
    keep = sel.select(feats, 5, np.random.default_rng(1))
    assert len(keep) == 5 == len(set(keep.tolist()))
    if name == "random":
        assert keep.tolist() == [0, 1, 2, 3, 4]  # the first k: no choice made
        assert sel.pool_factor == 1
    else:  # diversity: one candidate from each mode, not five from the big one
        assert sorted(cluster[keep].tolist()) == [0, 1, 2, 3, 4]
    assert len(sel.select(feats[:3], 5, np.random.default_rng(1))) == 3  # fewer than k: all


def test_unknown_selection_is_refused_by_the_parser(cond_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _ssdiff("distill", cond_run, "--selection", "best", "--out", tmp_path / "s")
    assert e.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
