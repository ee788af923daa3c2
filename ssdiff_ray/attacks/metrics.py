"""Attack success: ASR (per-image MSE to the target), MSE, SSIM, the target-class rate."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssdiff_ray.attacks import AttackSpec, target_class


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004): Gaussian window (sigma 1.5, 11 px or the image
    size if smaller), valid positions only, K1 = 0.01, K2 = 0.03. Inputs N x C x H x W."""
    x = torch.as_tensor(np.asarray(a, dtype=np.float64))
    y = torch.as_tensor(np.asarray(b, dtype=np.float64)).expand_as(x)
    c = x.shape[1]
    size = min(11, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, 1.5).repeat(c, 1, 1, 1)
    def conv(z):
        return F.conv2d(z, w, groups=c)

    mx, my = conv(x), conv(y)
    vx, vy, cov = conv(x * x) - mx**2, conv(y * y) - my**2, conv(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return m.mean(dim=(1, 2, 3)).numpy()


def attack_metrics(
    samples: np.ndarray,
    spec: AttackSpec,
    target_image: np.ndarray,
    classifier: torch.nn.Module | None = None,
    threshold: float = 0.1,
) -> dict:
    """Backdoor success on triggered samples (N x 1 x S x S in [-1, 1]).

    ``asr``: fraction whose per-image MSE to the target, in [0, 1] scale, is below
    ``threshold`` (0.1 as in VillanDiffusion); ``mse``/``ssim``: means over samples. For a
    class target, ``target_image`` holds images of the class (the nearest one counts) and,
    with a ``classifier``, ``target_class_rate`` is the fraction classified as K, which is
    then the ASR.
    """
    x = (np.clip(np.asarray(samples, dtype=np.float32), -1, 1) + 1) / 2
    tgt = (np.asarray(target_image, dtype=np.float32).reshape(-1, *x.shape[1:]) + 1) / 2
    d = ((x[:, None] - tgt[None]) ** 2).mean(axis=(2, 3, 4))  # N x T
    nearest = d.argmin(axis=1)
    mse = d[np.arange(len(x)), nearest]
    out = {
        "asr": float((mse < threshold).mean()),
        "mse": float(mse.mean()),
        "ssim": float(ssim(x, tgt[nearest]).mean()),
        "n": len(x),
        "threshold": threshold,
    }
    k = target_class(spec.target)
    if k is not None and classifier is not None:
        with torch.no_grad():
            logits = classifier(torch.from_numpy(np.clip(samples, -1, 1).astype(np.float32)))
        out["target_class_rate"] = float((logits.argmax(1).numpy() == k).mean())
        out["asr"] = out["target_class_rate"]
    return out
