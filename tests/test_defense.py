"""Sampling-time defense: input detection, negation, trigger estimation, model audit."""

import numpy as np
import pytest
import torch

from ssdiff_ray import config
from ssdiff_ray.attacks import AttackSpec, make_attack
from ssdiff_ray.attacks.patterns import make_trigger
from ssdiff_ray.defense import ESTIMATORS, make_estimator
from ssdiff_ray.defense.audit import audit_model, shifted_copies
from ssdiff_ray.defense.defense import Defense
from ssdiff_ray.defense.estimate import TriggerEstimate, estimate_trigger, mean_shift
from ssdiff_ray.defense.input_tests import (
    DisDet,
    LikelihoodRatio,
    TargetCheck,
    UfidCheck,
    detect_inputs,
    detection_metrics,
    llr_scores,
    standard_tests,
)
from ssdiff_ray.defense.negation import defended_sample, purify
from ssdiff_ray.defense.outputs import output_spread
from ssdiff_ray.defense.scan import (
    ScanEstimator,
    ScanOptions,
    patch_candidates,
    patch_image,
    patch_neighbours,
    scan_patches,
    scan_trigger,
)
from ssdiff_ray.model.unet import build_scheduler, build_unet


def _true_trigger_estimate(name="box", size=16):
    """The true trigger handed over as the estimate: tests using it test the detector and
    the negation alone (named ``test_detector_only_*``), never the estimator."""
    r = make_trigger(name, size)
    return TriggerEstimate(tau=r, mu=r.copy())


def _tests(est=None, check=None, size=16):
    return standard_tests((1, size, size), est, check)


def _clean(n, size=16, seed=1):
    return torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(seed))


def _trig(spec, n, size, seed):
    return make_attack(spec).triggered_noise(n, size, seed)


def test_detector_only_llr_with_the_true_trigger_separates():
    est = _true_trigger_estimate("box")
    trig = _trig(AttackSpec(trigger="box"), 1000, 16, seed=2)
    dc, dt = detect_inputs(_clean(1000), _tests(est)), detect_inputs(trig, _tests(est))
    m = detection_metrics(dc["score"], dt["score"], flags_clean=dc["flagged"],
                          flags_triggered=dt["flagged"])
    assert m["tpr"] >= 0.98 and m["fpr"] <= 0.02 and m["auroc"] > 0.99


def test_llr_matches_gaussian_formula():
    mu = np.full((1, 4, 4), 0.5, dtype=np.float32)
    x = torch.randn(5, 1, 4, 4)
    want = (x.flatten(1).double() @ torch.from_numpy(mu).flatten().double()) - (0.25 * 16) / 2
    np.testing.assert_allclose(llr_scores(x, mu), want.numpy(), rtol=1e-9, atol=1e-9)


def test_disdet_fpr_near_nominal():
    for fpr in (0.01, 0.05):
        test = DisDet((1, 16, 16))
        rate = float((test.scores(_clean(4000, seed=9)) > test.threshold(fpr)).mean())
        assert abs(rate - fpr) < max(0.6 * fpr, 0.006)
    flagged = detect_inputs(_clean(4000, seed=10), _tests(), fpr=0.02)["flagged"].mean()
    assert flagged < 0.035


def test_disdet_model_free_catches_box_and_trojdiff():
    trig = _trig(AttackSpec(trigger="box"), 500, 16, seed=3)
    assert detect_inputs(trig, _tests())["flagged"].mean() > 0.4  # model-free: weaker than LLR
    troj = _trig(AttackSpec(kind="trojdiff", trigger="blend"), 500, 16, seed=3)
    assert detect_inputs(troj, _tests())["flagged"].mean() > 0.98  # gamma < 1: variance drop


def test_detector_only_purify_returns_inputs_that_pass():
    est = _true_trigger_estimate("stop_sign")
    x = torch.cat([_clean(50), _trig(AttackSpec(trigger="stop_sign"), 50, 16, 4)])
    flags = detect_inputs(x, _tests(est))["flagged"]
    assert flags[50:].mean() > 0.9
    clean = purify(x, flags, _tests(est), seed=0)
    assert not detect_inputs(clean, _tests(est))["flagged"].any()
    assert torch.equal(clean[~torch.from_numpy(flags)], x[~torch.from_numpy(flags)])
    troj = _trig(AttackSpec(kind="trojdiff", trigger="patch"), 20, 16, 5)
    f = detect_inputs(troj, _tests())["flagged"]
    assert not detect_inputs(purify(troj, f, _tests(), seed=1), _tests())["flagged"].any()


def test_detector_only_subtract_negation_keeps_the_callers_noise_and_redraw_replaces_it():
    est = _true_trigger_estimate("stop_sign")
    eps = _clean(30)
    x = eps + torch.from_numpy(est.mu)  # triggered exactly as the estimate describes
    flags = detect_inputs(x, _tests(est))["flagged"]
    assert flags.all()
    sub = purify(x, flags, _tests(est), seed=0, negation="subtract")
    torch.testing.assert_close(sub, eps)  # (x - mu) / gamma, and eps passes the tests
    red = purify(x, flags, _tests(est), seed=0)
    assert not detect_inputs(red, _tests(est))["flagged"].any()
    assert float((red - eps).abs().mean()) > 0.5  # fresh noise, not the caller's
    with pytest.raises(ValueError, match="negation 'nope'"):
        purify(x, flags, _tests(est), seed=0, negation="nope")


def test_estimate_and_defended_sample_run_on_tiny_model():
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, seed=0)
    sched = build_scheduler(50)
    est = estimate_trigger(unet, sched, (1, 8, 8), seed=0,
                           estimator=ScanEstimator(ScanOptions(gen_steps=2, n_eps=4)))
    assert est.tau.shape == (1, 8, 8) and np.isfinite(est.tau).all()
    assert est.stats["method"] == "scan" and est.stats["held_spread_ratio"] > 0
    shift = mean_shift(unet, sched, torch.from_numpy(est.tau), torch.randn(4, 1, 8, 8))
    assert shift.shape == (1, 8, 8)
    x = torch.randn(6, 1, 8, 8)
    x[:3] += 3.0  # obviously shifted inputs
    images, flags = defended_sample(unet, sched, x, _tests(est, size=8), steps=2, seed=0)
    assert images.shape == (6, 1, 8, 8) and flags[:3].all()


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_registered_estimator_is_constructible_from_config(name):
    cfg = config.load(None, [f"defense.estimator={name}", "defense.estimate_gen_steps=3"])
    est = make_estimator(cfg.defense)
    assert est.name == name and est.options.gen_steps == 3


def test_detection_metrics_auroc():
    m = detection_metrics(np.array([0.0, 0.1, 0.2]), np.array([0.3, 5.0]), threshold=0.25)
    assert m == {"tpr": 1.0, "fpr": 0.0, "auroc": 1.0, "n_clean": 3, "n_triggered": 2}


def test_patch_candidates_and_neighbours_stay_inside_the_image():
    cands = patch_candidates(16)
    assert {a for *_, a in cands} == {1.0, -1.0}
    assert {(h, w) for _, _, h, w, _ in cands} == {(4, 4), (6, 6)}
    assert all(i + h <= 16 and j + w <= 16 for i, j, h, w, _ in cands)
    assert (12, 12, 4, 4, 1.0) in cands and (10, 10, 6, 6, -1.0) in cands  # flush with far edge
    img = patch_image((9, 9, 6, 6, 1.0), 16)
    assert img.sum() == 36 and img[0, 9, 9] == 1 and img[0, 8, 9] == 0
    p = (0, 13, 3, 3, -1.0)
    nb = patch_neighbours(p, 16)
    assert nb and all(i >= 0 and j >= 0 and h >= 2 and w >= 2 and i + h <= 16 and j + w <= 16
                      and a == -1.0 for i, j, h, w, a in nb)
    assert all(abs(i - 0) + abs(j - 13) + abs(h - 3) + abs(w - 3) <= 2 for i, j, h, w, _ in nb)
    assert (1, 13, 3, 3, -1.0) in nb and (0, 13, 2, 3, -1.0) in nb


def test_scan_trigger_returns_the_least_spread_patch_it_saw():
    """Hill climbing only accepts improvements: the returned ratio is at most the coarse
    scan's minimum on the same noise draws, and estimate_trigger's tau is that patch."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, seed=0).eval()
    sched = build_scheduler(50)
    with torch.no_grad():
        base = output_spread(unet, sched, torch.zeros(1, 8, 8), torch.randn(16, 1, 8, 8))
        patch, ratio = scan_trigger(unet, sched, 8, 1, torch.Generator().manual_seed(3), base,
                                    n_eps=8, steps=2)
        eps = torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(3))
        cands = patch_candidates(8)
        coarse = scan_patches(unet, sched, torch.stack([patch_image(c, 8) for c in cands]), eps,
                              base, steps=2)
    assert ratio <= coarse.min() + 1e-6
    i, j, h, w, a = patch
    assert i + h <= 8 and j + w <= 8 and a in (1.0, -1.0)
    solid = estimate_trigger(unet, sched, (1, 8, 8), seed=0, estimator=ScanEstimator(
        ScanOptions(gen_steps=2, prune=False))).tau[0]
    on = solid != 0
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    assert len(np.unique(solid[on])) == 1 and on.sum() <= 0.2 * 64  # one sign, small
    assert on[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # a solid rectangle
    pruned = estimate_trigger(unet, sched, (1, 8, 8), seed=0, estimator=ScanEstimator(
        ScanOptions(gen_steps=2))).tau[0]
    assert pruned[~on].sum() == 0 and 0 < (pruned != 0).sum() <= on.sum()  # a subset of it


def test_ufid_check_calibrated_on_clean_and_combined():
    """UFID's null comes from N(0, I) only; with two tests (DisDet and UFID) each gets
    fpr / 2."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, seed=0)
    sched = build_scheduler(50)
    chk = UfidCheck(unet, sched, (1, 8, 8), n_null=30, seed=0, n_perturb=3, steps=2)
    assert len(chk.null) == 30 and chk.threshold(0.01) >= np.quantile(chk.null, 0.99)
    x = _clean(10, size=8, seed=3)
    det = detect_inputs(x, _tests(check=chk, size=8), fpr=0.02)
    assert np.isfinite(det["ufid_score"]).all() and np.isfinite(det["ufid_threshold"])
    assert det["disdet_threshold"] == DisDet((1, 8, 8)).threshold(0.01)  # 2 tests: fpr / 2
    assert (det["ufid_score"] <= 0).all()  # -mean pairwise MSE


def test_detector_only_negation_with_the_true_trigger_replaces_flagged_inputs():
    """Negation: every flagged input is replaced by one that passes all active tests."""
    est = _true_trigger_estimate("box")
    x = torch.cat([_clean(30, seed=11), _trig(AttackSpec(trigger="box"), 30, 16, 12)])
    det = detect_inputs(x, _tests(est), fpr=0.02)
    assert det["flagged"][30:].all()
    clean = purify(x, det["flagged"], _tests(est), seed=3, fpr=0.02)
    assert not detect_inputs(clean, _tests(est), fpr=0.02)["flagged"].any()


def test_shifted_copies_keep_shape_and_leave_the_patch():
    tau = patch_image((9, 9, 6, 6, 1.0), 16)
    copies = shifted_copies(tau, 16, torch.Generator().manual_seed(0))
    assert copies.shape == (16, 1, 16, 16)
    assert torch.allclose(copies.flatten(1).norm(dim=1), tau.norm().expand(16))
    overlap = (copies * tau).flatten(1).sum(1) / tau.square().sum()
    assert (overlap <= 0.25).all() and len({c.numpy().tobytes() for c in copies}) == 16


def test_audit_untrained_model_is_clean():
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, seed=0)
    sched = build_scheduler(50)
    est = estimate_trigger(unet, sched, (1, 8, 8), seed=0, estimator=make_estimator(
        config.load(None, ["defense.estimate_gen_steps=2"]).defense))
    assert est.stats["method"] == "scan"  # the probe finds no target cluster, falls back
    a = audit_model(unet, sched, est, seed=0, n_random=6, n_eps=16)
    assert a["verdict"] == "clean" and np.isfinite(a["spread_z"]) and a["random_spread_std"] >= 0
    assert a["cluster_fraction"] == 0.0 and a["estimator"] == "scan"


def test_detector_only_target_check_flags_inputs_that_generate_a_given_target():
    """TargetCheck's threshold comes from N(0, I) draws; inputs near eps + tau generate
    (close to) the estimated target and score above it."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, seed=0)
    sched = build_scheduler(50)
    tau = np.full((1, 8, 8), 3.0, np.float32)  # saturates the outputs: one image
    chk = TargetCheck(unet, sched, TriggerEstimate(tau=tau, mu=tau.copy()), n_null=100,
                      steps=2)
    thr = chk.threshold(0.05)
    clean = chk.scores(_clean(200, size=8, seed=4))
    near = chk.scores(_clean(50, size=8, seed=5) + torch.from_numpy(tau))
    assert np.mean(clean > thr) <= 0.12 and np.mean(near > thr) >= 0.9
    det = detect_inputs(_clean(50, size=8, seed=5) + torch.from_numpy(tau),
                        _tests(check=chk, size=8), 0.05)
    assert det["flagged"].all() and np.isfinite(det["target_threshold"])


def test_defense_from_config_chains_estimate_detect_and_sample():
    """One Defense serves detection, defended sampling and the audit, estimating once."""
    cfg = config.load(None, ["data.image_size=8", "defense.estimator=scan",
                             "defense.estimate_gen_steps=2", "eval.steps=2"])
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, seed=0)
    d = Defense.from_config(cfg, unet, build_scheduler(50), seed=0)
    x = torch.randn(6, 1, 8, 8)
    x[:3] += 3.0
    det = d.detect(x)
    est = d.est
    assert est is not None and d.check is not None and det["flagged"][:3].all()
    images, flags = d.sample(x, flags=det["flagged"])
    assert images.shape == (6, 1, 8, 8) and (flags == det["flagged"]).all()
    # an untrained model holds no backdoor: the audit must not call it backdoored
    assert d.audit()["verdict"] == "clean" and d.est is est


def test_detector_only_likelihood_ratio_threshold_holds_its_fpr_and_every_test_gets_an_equal_share():
    est = _true_trigger_estimate("box")
    strong = LikelihoodRatio(est)  # |r| = 5.7: TERD's rule LLR > 0 is already below the FPR
    assert strong.threshold(0.05) == 0.0
    assert float((strong.scores(_clean(4000, seed=21)) > 0).mean()) < 0.05
    weak_r = 0.15 * est.tau
    weak = LikelihoodRatio(TriggerEstimate(tau=weak_r, mu=weak_r.copy()))
    rate = float((weak.scores(_clean(4000, seed=21)) > weak.threshold(0.05)).mean())
    assert weak.threshold(0.05) > 0 and abs(rate - 0.05) < 0.015  # the null's quantile
    tests = _tests(est)
    llr = strong
    det = detect_inputs(_clean(20, seed=22), tests, fpr=0.02)
    assert det["llr_threshold"] == llr.threshold(0.01)  # two tests: 0.02 / 2 each
    assert det["disdet_threshold"] == DisDet((1, 16, 16)).threshold(0.01)


def test_audit_rule_is_calibrated_on_the_population_and_scored_leave_one_out(tmp_path):
    from ssdiff_ray.defense.audit import AuditRule, calibrate_rule, leave_one_out

    rng = np.random.default_rng(0)
    # spread_ratio separates (backdoored collapse: low), spread_z is noise on both
    bd = [{"spread_ratio": r, "spread_z": z} for r, z in zip(rng.uniform(0.0, 0.3, 8),
                                                           rng.normal(5, 2, 8), strict=True)]
    cl = [{"spread_ratio": r, "spread_z": z} for r, z in zip(rng.uniform(0.6, 1.2, 8),
                                                           rng.normal(5, 2, 8), strict=True)]
    stats, truth = bd + cl, [True] * 8 + [False] * 8
    rule = calibrate_rule(stats, truth, ("spread_z", "spread_ratio"))
    assert rule.statistic == "spread_ratio" and rule.below
    assert max(s["spread_ratio"] for s in bd) < rule.threshold < min(s["spread_ratio"] for s in cl)
    loo = leave_one_out(stats, truth, ("spread_z", "spread_ratio"))
    assert loo == ["backdoored"] * 8 + ["clean"] * 8
    # an overlapping population: out-of-sample verdicts show the errors in-sample would hide
    mixed = bd[:6] + [{"spread_ratio": 0.8, "spread_z": 5.0}] * 2 + cl[:6] + \
        [{"spread_ratio": 0.1, "spread_z": 5.0}] * 2
    loo = leave_one_out(mixed, truth, ("spread_ratio",))
    assert loo[6:8] == ["clean"] * 2 and loo[14:] == ["backdoored"] * 2
    rule.save(tmp_path / "rule.json")
    back = AuditRule.load(tmp_path / "rule.json")
    assert back == rule and back.verdict({"spread_ratio": 0.0}) == "backdoored"
    with pytest.raises(ValueError, match="backdoored and clean"):
        calibrate_rule(bd, [True] * 8)


def test_a_cached_audit_is_judged_by_the_current_rule():
    from ssdiff_ray.defense.audit import AuditRule
    from ssdiff_ray.defense.cache import rejudge

    rule = AuditRule.load()
    low, high = rule.threshold * 0.5, rule.threshold * 2 + 1e-3
    for value in (low, high):
        stale = {rule.statistic: value, "verdict": "stale", "rule": "old"}
        got = rejudge(stale)
        assert got["verdict"] == rule.verdict(stale) != "stale"
        assert got["rule"].startswith(rule.statistic)
    assert {rejudge({rule.statistic: low})["verdict"],
            rejudge({rule.statistic: high})["verdict"]} == {"clean", "backdoored"}
    assert rejudge({"verdict": "clean"}) is None  # made before the statistic: recompute
