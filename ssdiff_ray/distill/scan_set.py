"""A scan of a synthetic set before it ships: does part of it carry a shared additive
trigger?

A generated image lies where the diffusion model puts its images, so the model's own
denoiser (x noised lightly, then its x0 prediction) returns it nearly unchanged; an added
perturbation that is no part of the model's distribution is removed, and it stays in the
residual x - denoise(x). A trigger shared by many images makes their residuals point the
same way: the set's leading residual direction (after the mean residual of fresh, clean
generations, the model's own bias, is taken out) is the estimated trigger. Each image's
score is its residual's projection on that direction; the threshold is the (1 - alpha)
quantile of the same score over fresh generations of the model, which are clean, so alpha
is the false-positive rate of one image; a binomial test over the set says whether it
holds more flagged images than alpha explains.

A second test per image catches a backdoor whose target ignores the class (BadDiffusion's
fixed target, generated from triggered noise under every label): a near-copy of an image
that carries another label. Its threshold is the alpha quantile of the same distance for
fresh clean generations.

The sampling defense's estimate (``defense/``) is a trigger in the noise that starts
sampling; a trigger added to finished images is another object, so the scan estimates its
own from the set it checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from ssdiff_ray.model.sampling import sample
from ssdiff_ray.model.unet import predict_eps


@dataclass
class ScanResult:
    flagged: np.ndarray      # per image
    scores: np.ndarray       # |projection of the residual on the estimated trigger|
    threshold: float
    trigger: np.ndarray      # the estimated trigger direction, C x S x S, unit norm
    p_value: float           # P(at least this many flagged | a clean set)
    suspect: bool            # p_value < the test's level
    duplicate: np.ndarray    # per image: a near-copy of an image with another label


    def summary(self) -> dict:
        return {"images": int(len(self.flagged)), "flagged": int(self.flagged.sum()),
                "duplicates": int(self.duplicate.sum()),
                "threshold": self.threshold, "p_value": self.p_value, "suspect": self.suspect}


@torch.no_grad()
def residuals(unet, scheduler, images: np.ndarray, labels: np.ndarray, t_frac: float = 0.05,
              draws: int = 4, seed: int = 0) -> np.ndarray:
    """N x D: x - mean over ``draws`` noise draws of the model's x0 prediction at the step
    ``t_frac`` of the way through the schedule."""
    t = int(t_frac * (len(scheduler.alphas_cumprod) - 1))
    x0 = torch.as_tensor(np.asarray(images, np.float32))
    lab = torch.as_tensor(np.array(labels, np.int64))  # a copy: may be read-only
    ab = float(scheduler.alphas_cumprod[t])
    gen = torch.Generator().manual_seed(seed)
    tt = torch.full((len(x0),), t)
    pred = torch.zeros_like(x0)
    for _ in range(draws):
        noise = torch.randn(x0.shape, generator=gen)
        xt = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise
        eps = predict_eps(unet, xt, tt, lab)
        pred += ((xt - (1 - ab) ** 0.5 * eps) / ab**0.5).clamp(-1, 1) / draws
    return (x0 - pred).flatten(1).numpy()


def scan_set(unet, scheduler, images: np.ndarray, labels: np.ndarray, alpha: float = 0.01,
             level: float = 0.01, reference: int = 400, sampler: str = "ddim",
             steps: int = 25, guidance: float = 2.0, seed: int = 0) -> ScanResult:
    """Scan ``images`` (with their ``labels``) against ``reference`` fresh generations.

    Cross-fitted: the direction that scores one half of the set is estimated on the other
    half, so a clean set's scores are not inflated by fitting (the leading direction of
    any set is, by construction, where that set's own residuals are largest)."""
    from ssdiff_ray.images import from_png, to_png

    rng = np.random.default_rng(seed)
    ref_labels = rng.choice(np.asarray(labels), size=reference)
    ref = sample(unet, scheduler, reference, sampler=sampler, steps=steps, seed=seed + 1,
                 labels=ref_labels, guidance=guidance)
    ref = np.stack([from_png(to_png(im)) for im in ref])  # 8 bits, as the set is stored
    ref_r = residuals(unet, scheduler, ref, ref_labels, seed=seed + 2)
    # what every clean generation leaves (the model's own bias) is no trigger: taken out
    bias = ref_r.mean(0)
    ref_r = ref_r - bias
    r = residuals(unet, scheduler, images, labels, seed=seed) - bias
    half = rng.permutation(len(r)) % 2 == 0
    directions = [_leading(r[~half]), _leading(r[half])]  # scores half, then the other half
    scores, threshold = np.zeros(len(r)), np.zeros(len(r))
    for part, u in zip((half, ~half), directions):
        scores[part] = np.abs(r[part] @ u)
        threshold[part] = np.quantile(np.abs(ref_r @ u), 1 - alpha)
    # a backdoor whose target ignores the label leaves the same image under many labels
    set_flat, labels = np.asarray(images).reshape(len(images), -1), np.asarray(labels)
    near = _other_label_distance(set_flat, labels, set_flat, labels, same_set=True)
    ref_near = _other_label_distance(ref.reshape(len(ref), -1), ref_labels, set_flat, labels)
    duplicate = near < np.quantile(ref_near, alpha)
    flagged = (scores > threshold) | duplicate
    p = float(binom.sf(int(flagged.sum()) - 1, len(flagged), 2 * alpha))  # two tests per image
    trigger = _leading(r)
    return ScanResult(flagged, scores, float(threshold.mean()),
                      trigger.reshape(images.shape[1:]), p, p < level, duplicate)


def _other_label_distance(x: np.ndarray, x_labels: np.ndarray, pool: np.ndarray,
                          pool_labels: np.ndarray, same_set: bool = False) -> np.ndarray:
    """Per row of x: RMS pixel distance to the nearest row of ``pool`` with another label."""
    d2 = (x**2).sum(1)[:, None] + (pool**2).sum(1)[None] - 2 * x @ pool.T
    d2[x_labels[:, None] == pool_labels[None]] = np.inf
    if same_set:
        np.fill_diagonal(d2, np.inf)
    return np.sqrt(np.maximum(d2.min(1), 0) / x.shape[1])


def _leading(r: np.ndarray) -> np.ndarray:
    """The leading right-singular vector of the residuals (unit norm, sign: mean along it > 0)."""
    u = np.linalg.svd(r, full_matrices=False)[2][0]
    return u if (r @ u).mean() >= 0 else -u


def scan_path(set_dir, run_dir, alpha: float = 0.01, out=None) -> dict:
    """``ssdiff distill-scan``: scan a set on disk with ``run_dir``'s model, the one that
    made it, named by the caller (a set's own manifest could name any model that calls it
    clean); writes ``scan.json`` beside it and, with ``out``, the set without the flagged
    images. Returns the summary."""
    import json
    from pathlib import Path

    from ssdiff_ray.distill import DistillError
    from ssdiff_ray.distill.distilled_set import read_set, write_set
    from ssdiff_ray.inference import RunModelError, load_run_model

    if not 0 < alpha < 1:
        raise DistillError(f"--alpha {alpha}: must lie in (0, 1)")
    if not run_dir:
        raise DistillError(f"{set_dir}: name the run whose model made the set (--run RUN); "
                           "the set's own manifest is not trusted to pick its judge")
    images, labels, manifest = read_set(set_dir)
    try:
        cfg, unet, scheduler = load_run_model(run_dir)
    except RunModelError as e:
        raise DistillError(f"{set_dir}: its model: {e}") from None
    if images.shape[1:] != (unet.config.in_channels, cfg.data.image_size, cfg.data.image_size):
        raise DistillError(f"{set_dir}: images of shape {images.shape[1:]}, the model at "
                           f"{run_dir} makes {unet.config.in_channels} x {cfg.data.image_size}"
                           f" x {cfg.data.image_size}")
    res = scan_set(unet, scheduler, images, labels, alpha=alpha,
                   sampler=manifest.get("sampler", "ddim"), steps=manifest.get("steps", 25),
                   guidance=manifest.get("guidance", 2.0))
    summary = {**res.summary(), "alpha": alpha, "run": str(run_dir)}
    Path(set_dir, "scan.json").write_text(json.dumps(
        {**summary, "flagged_rows": np.flatnonzero(res.flagged).tolist()}, indent=2))
    if out:
        keep = ~res.flagged
        m = write_set(out, images[keep], labels[keep], {**manifest, "scan": summary})
        summary["out"] = str(out)
        summary["kept"] = m["images"]
    return summary
