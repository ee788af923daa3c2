"""TrojDiff (Chen et al., CVPR 2023): x'_t = sqrt(ab_t) y + sqrt(1 - ab_t)(gamma eps + mu),
target eps, trigger input x_T ~ N(mu, gamma^2 I) (blend: everywhere, patch: in a corner)."""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.attacks import AttackSpec
from ssdiff_ray.attacks.base import Attack
from ssdiff_ray.attacks.patterns import make_troj_trigger


def poison_trojdiff(
    y: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    mu: torch.Tensor,
    gamma_map: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TrojDiff noisy input and target: x'_t = sqrt(ab) y + sqrt(1 - ab)(gamma eps + mu),
    target eps. ``gamma_map`` is gamma inside the trigger mask and 1 outside (patch)."""
    n = y.shape[0]
    ab = alphas_cumprod[t].view(n, 1, 1, 1)
    return ab.sqrt() * y + (1 - ab).sqrt() * (gamma_map * eps + mu), eps


def troj_params(spec: AttackSpec, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, gamma_map), each C x S x S, of the TrojDiff trigger distribution N(mu, gamma^2)."""
    delta, mask = make_troj_trigger(spec.trigger, image_size, spec.channels)
    mu = (1.0 - spec.gamma) * delta * mask
    gamma_map = np.where(mask > 0, spec.gamma, 1.0).astype(np.float32)
    return mu.astype(np.float32), gamma_map



class TrojDiff(Attack):
    def __init__(self, spec: AttackSpec, alphas_cumprod=None, target_images=None):
        super().__init__(spec, alphas_cumprod, target_images)
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per image size

    def params(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, gamma_map) of the trigger distribution, as tensors."""
        if size not in self._params:
            mu, gm = troj_params(self.spec, size)
            self._params[size] = (torch.from_numpy(mu), torch.from_numpy(gm))
        return self._params[size]

    def poison_rows(self, y, eps, t):
        mu, gamma_map = self.params(y.shape[-1])
        return poison_trojdiff(y, eps, t, mu, gamma_map, self.alphas_cumprod)

    def triggered_noise(self, n: int, image_size: int, seed: int) -> torch.Tensor:
        eps = torch.randn((n, self.spec.channels, image_size, image_size),
                          generator=torch.Generator().manual_seed(seed))
        mu, gamma_map = self.params(image_size)
        return gamma_map * eps + mu
