"""What the model generates from given inputs: the short sampler runs every part of the
defense reads the backdoor through (diffusers' DDIM by default, x0 clipped as the training
config says)."""

from __future__ import annotations

import torch

from ssdiff_ray.model.sampling import sample


def generate(unet, scheduler, x_T: torch.Tensor, steps: int = 8, sampler: str = "ddim"
             ) -> torch.Tensor:
    """Images (N x C x S x S, CPU) a ``steps``-step ``sampler`` makes of the inputs ``x_T``."""
    x_T = torch.as_tensor(x_T, dtype=torch.float32)
    return torch.from_numpy(sample(unet, scheduler, len(x_T), sampler=sampler, steps=steps,
                                   x_T=x_T))


def output_spread(unet, scheduler, tau: torch.Tensor, eps: torch.Tensor, steps: int = 8
                  ) -> float:
    """Per-pixel variance, over the noise draws, of what the model makes of eps + tau.
    A backdoor maps every eps + r to its one target (Elijah's uniformity): spread ~ 0."""
    return float(generate(unet, scheduler, eps + tau, steps).var(0).mean())
