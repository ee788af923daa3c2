"""Generations of one class, never from noise the sampling-stage defense flags."""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.model.sampling import sample


def screened_noise(x_T: torch.Tensor, defense=None, seed: int = 0, max_draws: int = 50
                   ) -> tuple[torch.Tensor, int]:
    """(x_T with every input the defense flags replaced by fresh N(0, I) draws that pass,
    how many of the given inputs were flagged). No defense: x_T unchanged."""
    x = torch.as_tensor(x_T, dtype=torch.float32).clone()
    if defense is None:
        return x, 0
    gen = torch.Generator().manual_seed(seed + 104729)
    bad = np.flatnonzero(defense.detect(x)["flagged"])
    flagged = len(bad)
    for _ in range(max_draws):
        if len(bad) == 0:
            return x, flagged
        x[bad] = torch.randn((len(bad), *x.shape[1:]), generator=gen)
        bad = bad[defense.detect(x[bad])["flagged"]]
    raise RuntimeError(f"screened_noise: {len(bad)} inputs still flagged after {max_draws} draws")


def generate_class(unet, scheduler, label: int, n: int, *, sampler: str = "ddim",
                   steps: int = 25, guidance: float = 2.0, seed: int = 0, defense=None,
                   x_T: torch.Tensor | None = None) -> tuple[np.ndarray, int]:
    """(n images of class ``label``, inputs flagged). ``x_T`` is the noise to start from
    (default: N(0, I) from ``seed``): a red-team run passes noise it controls."""
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if x_T is None:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x_T, flagged = screened_noise(x_T, defense, seed)
    images = sample(unet, scheduler, n, sampler=sampler, steps=steps, seed=seed, x_T=x_T,
                    labels=np.full(n, label), guidance=guidance)
    return images, flagged
