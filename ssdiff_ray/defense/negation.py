"""Negation: flagged inputs are cleaned (the estimated trigger removed) or redrawn until they
pass the input tests; the sample is generated from the clean inputs."""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.defense.estimate import TriggerEstimate
from ssdiff_ray.defense.input_tests import (
    OutputCheck,
    detect_inputs,
    fpr_share,
    llr_scores,
    llr_threshold,
)
from ssdiff_ray.model.sampling import sample


def purify(x_T: torch.Tensor, flags: np.ndarray, est: TriggerEstimate | None, seed: int,
           fpr: float = 0.01, max_tries: int = 100, check: OutputCheck | None = None
           ) -> torch.Tensor:
    """Negation: flagged inputs that the likelihood ratio explains get the estimated trigger
    removed ((x - mu) / gamma); the others (flagged by DisDet or the output check: a trigger
    the estimate does not describe) and any that still fail ``detect_inputs`` are replaced
    by fresh N(0, I) noise until they pass."""
    x = torch.as_tensor(x_T, dtype=torch.float32).clone()
    idx = np.flatnonzero(np.asarray(flags))
    if len(idx) == 0:
        return x
    gen = torch.Generator().manual_seed(seed)
    if est is not None:  # the LLR alone decides which inputs the estimate explains
        thr = llr_threshold(est, tuple(x.shape[1:]), fpr_share(fpr, est, check))
        by_llr = llr_scores(x[idx], est.mu, est.gamma) > thr
        x[idx[by_llr]] = (x[idx[by_llr]] - torch.from_numpy(est.mu)) / est.gamma
        other = idx[~by_llr]
        x[other] = torch.randn((len(other), *x.shape[1:]), generator=gen)
    for _ in range(max_tries):
        bad = idx[detect_inputs(x[idx], est, fpr, check)["flagged"]]
        if len(bad) == 0:
            return x
        x[bad] = torch.randn((len(bad), *x.shape[1:]), generator=gen)
        idx = bad
    raise RuntimeError("purify: could not draw inputs that pass the detector")


def defended_sample(unet, scheduler, x_T: torch.Tensor, est: TriggerEstimate | None,
                    sampler: str = "ddim", steps: int = 50, seed: int = 0,
                    fpr: float = 0.01, check: OutputCheck | None = None,
                    flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Detect, negate, generate: (images from the purified inputs, per-input flags).
    ``flags`` skips the detection when the caller already ran ``detect_inputs``."""
    if flags is None:
        flags = detect_inputs(x_T, est, fpr, check)["flagged"]
    clean = purify(x_T, flags, est, seed + 7919, fpr, check=check)
    images = sample(unet, scheduler, len(clean), sampler=sampler, steps=steps, seed=seed,
                    x_T=clean)
    return images, flags
