"""BadDiffusion (Chou et al., CVPR 2023): x'_t = sqrt(ab_t) y + (1 - sqrt(ab_t)) r
+ sqrt(1 - ab_t) eps, target eps + c_t r, trigger input x_T = eps + r. The correction c_t
depends on the sampler (VillanDiffusion, Chou et al., NeurIPS 2023, see
``trigger_coefficient``)."""

from __future__ import annotations

import torch

from ssdiff_ray.attacks import CORRECTIONS, AttackSpec
from ssdiff_ray.attacks.base import Attack
from ssdiff_ray.attacks.patterns import make_trigger


def trigger_coefficient(alphas_cumprod: torch.Tensor, t: torch.Tensor, sampler: str) -> torch.Tensor:
    """c_t in the BadDiffusion target eps + c_t r, per sample (shape N).

    * "ddpm": matching the backdoored posterior mean q(x'_{t-1} | x'_t, y) with the ancestral
      sampler's mean 1/sqrt(a_t) (x_t - beta_t / sqrt(1 - ab_t) eps_theta) gives
      c_t = (1 - sqrt(a_t)) sqrt(1 - ab_t) / (1 - a_t), the corrected BadDiffusion form. It
      needs unclipped x0 predictions: its x0-prediction is y + O(r / sqrt(ab_t)).
    * "ode": VillanDiffusion's probability-flow (DDIM) correction c_t = sqrt(1 - ab_t),
      about twice DDPM's.
    * "ddim": c_t = (1 - sqrt(ab_t)) / sqrt(1 - ab_t), the coefficient whose x0-prediction
      (x'_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t) is exactly y: equal to "ode" at large t
      and to "ddpm" near t = 0, and unaffected by the x0 clipping that diffusers' schedulers
      apply (clip_sample=True, as here), which breaks the other two.
    * "both": the mean of "ddpm" and "ddim".
    """
    ab = alphas_cumprod[t].double()
    ab_prev = torch.where(t > 0, alphas_cumprod[(t - 1).clamp(min=0)].double(),
                          torch.ones_like(ab))
    a = ab / ab_prev
    sde = (1 - a.sqrt()) * (1 - ab).sqrt() / (1 - a)
    x0 = (1 - ab.sqrt()) / (1 - ab).sqrt()
    coefs = {"ddpm": lambda: sde, "ode": lambda: (1 - ab).sqrt(), "ddim": lambda: x0,
             "both": lambda: (sde + x0) / 2}
    return coefs[sampler]().float()


def poison_baddiffusion(
    y: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    trigger: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    sampler: str = "ddpm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """BadDiffusion noisy input and regression target for targets ``y`` (N x C x S x S):
    x'_t = sqrt(ab) y + (1 - sqrt(ab)) r + sqrt(1 - ab) eps, target = eps + c_t r."""
    n = y.shape[0]
    ab = alphas_cumprod[t].view(n, 1, 1, 1)
    xt = ab.sqrt() * y + (1 - ab.sqrt()) * trigger + (1 - ab).sqrt() * eps
    c = trigger_coefficient(alphas_cumprod, t, sampler).view(n, 1, 1, 1)
    return xt, eps + c * trigger



class BadDiffusion(Attack):
    def __init__(self, spec: AttackSpec, alphas_cumprod=None, target_images=None):
        if spec.sampler not in CORRECTIONS:
            raise ValueError(f"sampler {spec.sampler!r}; choose from {CORRECTIONS}")
        super().__init__(spec, alphas_cumprod, target_images)
        self._trigger: dict[int, torch.Tensor] = {}  # per image size

    def trigger(self, size: int) -> torch.Tensor:
        """The additive trigger r (C x S x S)."""
        if size not in self._trigger:
            self._trigger[size] = torch.from_numpy(
                make_trigger(self.spec.trigger, size, self.spec.channels))
        return self._trigger[size]

    def poison_rows(self, y, eps, t):
        return poison_baddiffusion(y, eps, t, self.trigger(y.shape[-1]), self.alphas_cumprod,
                                   self.spec.sampler)

    def triggered_noise(self, n: int, image_size: int, seed: int) -> torch.Tensor:
        eps = torch.randn((n, self.spec.channels, image_size, image_size),
                          generator=torch.Generator().manual_seed(seed))
        return eps + self.trigger(image_size)
