"""Input tests: is this initial noise x_T triggered? Each test is a small object with
``scores`` (higher = more suspicious) and a ``threshold`` at a false-positive rate, set from
N(0, I) draws only: no triggered data is used.

* ``DisDet``: a model-free DisDet-style test (Sui et al., 2024) of x_T against N(0, I):
  mean, variance, kurtosis, local-window mean and energy.
* ``LikelihoodRatio``: TERD's log N(x; mu, gamma^2) - log N(x; 0, I) with the estimated
  trigger distribution.
* Output checks read the model's generation from x_T: ``TargetCheck`` (does it land on the
  estimated target?) and ``UfidCheck`` (UFID's output consistency, Guan et al., 2024).

``detect_inputs`` flags an input when any test does, each test at an equal share of the
nominal FPR (Bonferroni). A new test is one class here, added where ``Defense`` lists its
tests.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ssdiff_ray.defense.estimate import TriggerEstimate
from ssdiff_ray.model.sampling import sample

NULL_DRAWS = 20000  # N(0, I) draws that set the thresholds


class InputTest:
    """One test of x_T. ``relative`` puts its scores on a common scale (1 = at the
    threshold) so that several tests combine into one score for ROC curves."""

    name = "base"

    def scores(self, x_T: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def threshold(self, fpr: float) -> float:
        raise NotImplementedError

    def relative(self, scores: np.ndarray, threshold: float) -> np.ndarray:
        raise NotImplementedError


def fpr_share(fpr: float, tests: list[InputTest]) -> float:
    """Each active test's part of the nominal FPR (Bonferroni)."""
    return fpr / max(1, len(tests))


def detect_inputs(x_T: torch.Tensor, tests: list[InputTest], fpr: float = 0.01) -> dict:
    """Flag triggered initial noise: any test above its threshold at ``fpr / len(tests)``,
    so clean N(0, I) inputs are flagged with probability <= ``fpr``.

    Returns ``flagged``, ``score`` (the max over the tests of their relative scores) and,
    per test, ``<name>_score`` and ``<name>_threshold``.
    """
    x_T = torch.as_tensor(x_T, dtype=torch.float32)
    share = fpr_share(fpr, tests)
    out: dict = {"flagged": np.zeros(len(x_T), bool), "score": np.zeros(len(x_T))}
    for test in tests:
        s, thr = test.scores(x_T), test.threshold(share)
        out["flagged"] |= s > thr
        out["score"] = np.maximum(out["score"], test.relative(s, thr))
        out[f"{test.name}_score"], out[f"{test.name}_threshold"] = s, thr
    return out


def standard_tests(shape: tuple[int, ...], est: TriggerEstimate | None = None,
                   check: OutputCheck | None = None) -> list[InputTest]:
    """DisDet, the likelihood ratio with an estimate, and an output check, if given."""
    return [DisDet(shape), *([LikelihoodRatio(est)] if est is not None else []),
            *([check] if check is not None else [])]


def detection_metrics(
    scores_clean: np.ndarray, scores_triggered: np.ndarray, threshold: float | None = None,
    flags_clean: np.ndarray | None = None, flags_triggered: np.ndarray | None = None,
) -> dict:
    """TPR and FPR at the detector's decision (flags, or score > threshold) and AUROC of the
    scores (Mann-Whitney, ties counted half)."""
    sc, st = np.asarray(scores_clean, float), np.asarray(scores_triggered, float)
    if flags_clean is None:
        thr = 1.0 if threshold is None else threshold
        flags_clean, flags_triggered = sc > thr, st > thr
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([sc, st]))
    auroc = (ranks[len(sc):].sum() - len(st) * (len(st) + 1) / 2) / (len(sc) * len(st))
    return {"tpr": float(np.mean(flags_triggered)), "fpr": float(np.mean(flags_clean)),
            "auroc": float(auroc), "n_clean": len(sc), "n_triggered": len(st)}


# ----------------------------------------------------------------------------- model-free


def _window_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max |z| over local windows of the window mean and of the window energy (sum x^2),
    for windows of ~S/5, S/4 and S/3 pixels: a trigger patch shifts one or the other."""
    s = x.shape[-1]
    zm, ze = [], []
    for w in sorted({max(2, round(s / 5)), max(2, s // 4), max(3, round(s / 3))}):
        n = w * w * x.shape[1]
        mean = F.avg_pool2d(x, w, stride=1) * n  # window sums over channels and pixels
        energy = F.avg_pool2d(x * x, w, stride=1) * n
        zm.append((mean / np.sqrt(n)).abs().flatten(1).amax(1))
        ze.append(((energy - n) / np.sqrt(2 * n)).abs().flatten(1).amax(1))
    return torch.stack(zm, 1).amax(1), torch.stack(ze, 1).amax(1)


def disdet_stats(x: torch.Tensor) -> np.ndarray:
    """N x 5 statistics of x_T that are ~N(0, 1)-scaled under x_T ~ N(0, I): global mean,
    variance, kurtosis (z-scores) and local-window mean / energy (max |z|)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    flat = x.flatten(1).double()
    d = flat.shape[1]
    z_mean = flat.mean(1) * np.sqrt(d)
    m2 = (flat**2).mean(1)
    z_var = (m2 - 1) * np.sqrt(d / 2)
    z_kurt = ((flat**4).mean(1) / m2.clamp_min(1e-12) ** 2 - 3) / np.sqrt(24 / d)
    zm, ze = _window_stats(x)
    return torch.stack([z_mean, z_var, z_kurt, zm.double(), ze.double()], 1).numpy()


class _Null:
    """Null (x_T ~ N(0, I)) calibration of the DisDet statistics, per input shape, cached."""

    _cache: ClassVar[dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

    @classmethod
    def get(cls, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if shape not in cls._cache:
            g = torch.Generator().manual_seed(12345)
            stats = np.concatenate([
                disdet_stats(torch.randn((2000, *shape), generator=g))
                for _ in range(NULL_DRAWS // 2000)
            ])
            loc, scale = np.median(stats, 0), stats.std(0)
            scores = np.abs((stats - loc) / scale).max(1)
            cls._cache[shape] = (loc, scale, np.sort(scores))
        return cls._cache[shape]


class DisDet(InputTest):
    """Model-free: the largest standardized |statistic| against its N(0, I) null."""

    name = "disdet"

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def scores(self, x_T: torch.Tensor) -> np.ndarray:
        loc, scale, _ = _Null.get(self.shape)
        return np.abs((disdet_stats(x_T) - loc) / scale).max(1)

    def threshold(self, fpr: float) -> float:
        """Upper ``1 - fpr`` quantile of the score under N(0, I)."""
        return float(np.quantile(_Null.get(self.shape)[2], 1 - fpr))

    def relative(self, scores, threshold):
        return scores / threshold


# ----------------------------------------------------------------------------- likelihood ratio


def llr_scores(x: torch.Tensor, mu: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """TERD: log N(x; mu, gamma^2 I) - log N(x; 0, I) per input (> 0 favours the trigger)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten(1)
    m = torch.as_tensor(np.asarray(mu), dtype=torch.float64).flatten()
    d = x.shape[1]
    s = -d * np.log(gamma) - ((x - m) ** 2).sum(1) / (2 * gamma**2) + (x**2).sum(1) / 2
    return s.numpy()


class LikelihoodRatio(InputTest):
    """TERD's likelihood ratio with the estimated trigger distribution N(mu, gamma^2 I)."""

    name = "llr"

    def __init__(self, est: TriggerEstimate):
        self.est = est
        self._null: np.ndarray | None = None  # the LLR of N(0, I) draws, sorted

    def scores(self, x_T: torch.Tensor) -> np.ndarray:
        return llr_scores(x_T, self.est.mu, self.est.gamma)

    def threshold(self, fpr: float) -> float:
        """max(0, the upper ``1 - fpr`` quantile of the LLR under N(0, I)): TERD's rule
        LLR > 0, tightened when the estimate is weak enough that 0 would exceed the FPR."""
        if self._null is None:
            g = torch.Generator().manual_seed(54321)
            draws = torch.randn((NULL_DRAWS, *self.est.mu.shape), generator=g)
            self._null = np.sort(llr_scores(draws, self.est.mu, self.est.gamma))
        return max(0.0, float(np.quantile(self._null, 1 - fpr)))

    def relative(self, scores, threshold):
        # in units of its null spread above the threshold (~ |mu|), comparable with DisDet's
        return 1 + (scores - threshold) / (max(float(np.linalg.norm(self.est.mu)), 1e-6) * 2.33)


# ----------------------------------------------------------------------------- output checks


class OutputCheck(InputTest):
    """A test of x_T through the model's generation from it. Its threshold comes from
    ``n_null`` clean N(0, I) draws (seeded, never the inputs under test): the upper
    ``1 - fpr`` quantile of their scores, extrapolated below 1 / n_null by a normal fit of
    the upper tail (conservative: the larger of the two). Subclasses define ``scores``
    and call ``calibrate``."""

    def calibrate(self, shape: tuple[int, ...], n_null: int, seed: int) -> None:
        g = torch.Generator().manual_seed(777_000 + seed)
        null = torch.randn((n_null, *shape), generator=g)
        self.null = np.sort(self.scores(null, seed=seed + 1))
        self.spread = max(float(self.null.std()), 1e-12)

    def threshold(self, fpr: float) -> float:
        from scipy.stats import norm

        emp = float(np.quantile(self.null, 1 - fpr))
        gauss = float(self.null.mean() + norm.isf(fpr) * self.null.std())
        return max(emp, gauss)

    def relative(self, scores, threshold):
        return 1 + (scores - threshold) / self.spread


def ufid_scores(unet, scheduler, x_T: torch.Tensor, n_perturb: int = 4, strength: float = 0.3,
                steps: int = 10, seed: int = 0) -> np.ndarray:
    """UFID-style consistency: outputs from x_T mixed with small fresh noise
    (sqrt(1 - s^2) x + s eps') are near-identical for a triggered input (the backdoor
    target) and diverse for a clean one. Score = -mean pairwise MSE (higher = suspicious)."""
    x_T = torch.as_tensor(x_T, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(n_perturb):
        xp = np.sqrt(1 - strength**2) * x_T + strength * torch.randn(x_T.shape, generator=g)
        outs.append(torch.from_numpy(sample(unet, scheduler, len(xp), steps=steps, x_T=xp)))
    o = torch.stack(outs, 1).flatten(2)  # N x P x D
    d = torch.cdist(o, o).square() / o.shape[-1]
    p = o.shape[1]
    return (-d.sum((1, 2)) / (p * (p - 1))).numpy()



class UfidCheck(OutputCheck):
    """UFID's consistency test (``ufid_scores``). Trigger-agnostic: needs no estimate.
    Measured on the benchmark's BadDiffusion model: TPR 0.000 at its FPR share (clean and
    triggered inputs were equally consistent at strength 0.3), so it is off by default."""

    name = "ufid"

    def __init__(self, unet, scheduler, shape: tuple[int, ...], n_null: int = 500,
                 seed: int = 0, n_perturb: int = 4, strength: float = 0.3, steps: int = 10):
        self.unet, self.scheduler = unet, scheduler
        self.kw = {"n_perturb": n_perturb, "strength": strength, "steps": steps}
        self.seed = seed
        self.calibrate(shape, n_null, seed)

    def scores(self, x_T: torch.Tensor, seed: int | None = None) -> np.ndarray:
        return ufid_scores(self.unet, self.scheduler, x_T,
                           seed=self.seed + 2 if seed is None else seed, **self.kw)


class TargetCheck(OutputCheck):
    """Output check against the estimated target: what the model generates from x_T is
    compared with ``target``: the probe's cluster of near-duplicates when it found one,
    else the mean image the model generates from eps + tau (the backdoor's collapse point,
    when there is one; off when tau's amplitude is). Score = -MSE to it (higher =
    suspicious). It flags exactly the inputs whose generation the backdoor would take
    over, even where the estimate's direction is only roughly the trigger's. It generates
    with the sampler the estimate found the backdoor under (``est.stats["sampler"]``, else
    DDIM)."""

    name = "target"

    def __init__(self, unet, scheduler, est: TriggerEstimate, n_null: int = 500,
                 seed: int = 0, steps: int = 10, n_target: int = 64):
        self.unet, self.scheduler, self.steps = unet, scheduler, steps
        self.sampler = est.stats.get("sampler", "ddim")
        tau = torch.from_numpy(est.tau)
        if "target" in est.stats:
            self.target = torch.tensor(est.stats["target"], dtype=torch.float32).view(tau.shape)
        else:
            g = torch.Generator().manual_seed(555_000 + seed)
            x = torch.randn((n_target, *tau.shape), generator=g) + tau
            self.target = torch.from_numpy(sample(unet, scheduler, n_target, sampler=self.sampler,
                                                  steps=steps, x_T=x)).mean(0)
        self.calibrate(tuple(tau.shape), n_null, seed)

    @classmethod
    def from_state(cls, unet, scheduler, target: torch.Tensor, null: np.ndarray, spread: float,
                   steps: int = 10, seed: int = 0, sampler: str = "ddim") -> TargetCheck:
        """The check as saved (``defense.cache``): its target image and sorted null scores."""
        check = cls.__new__(cls)
        check.unet, check.scheduler, check.steps = unet, scheduler, steps
        check.sampler = sampler
        check.target, check.null, check.spread = target, np.asarray(null), spread
        return check

    def scores(self, x_T: torch.Tensor, seed: int | None = None) -> np.ndarray:
        x_T = torch.as_tensor(x_T, dtype=torch.float32)
        out = torch.from_numpy(sample(self.unet, self.scheduler, len(x_T), sampler=self.sampler,
                                      steps=self.steps, x_T=x_T))
        return (-(out - self.target).square().flatten(1).mean(1)).numpy()
