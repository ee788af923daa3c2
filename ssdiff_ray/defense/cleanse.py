"""Backdoor removal by fine-tuning, from the model and its estimated trigger alone.

Elijah (An et al., AAAI 2024) pulls the model's output on a triggered input eps + tau
towards its output on the clean eps, with a term that keeps clean behaviour. Elijah does
this at t = T, where a backdoor tuned to ancestral DDPM shows its shift; a backdoor tuned
to DDIM (ours, ``attacks.baddiffusion``) answers eps + tau like a clean model at t = T and
acts along the trajectory instead, so the pull here is applied at every t:

* the frozen model's own clean generations are the x0 (no data is needed), noised to
  x_t = sqrt(ab) x0 + sqrt(1 - ab) eps;
* the triggered input carries tau as a triggered trajectory would,
  x'_t = x_t + (1 - sqrt(ab)) tau, and its target is the frozen model's clean output plus
  c_t tau, with c_t the DDIM coefficient (``trigger_coefficient``): the x0-prediction of
  x'_t is then that of x_t, so a triggered start generates what the clean one would;
* the clean term keeps eps_theta(x_t) on the frozen model's output.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ssdiff_ray.attacks.baddiffusion import trigger_coefficient
from ssdiff_ray.model.sampling import sample
from ssdiff_ray.model.unet import null_label, predict_eps


@dataclass
class CleanseOptions:
    steps: int = 500          # Adam steps
    batch: int = 32
    lr: float = 5e-4
    clean_images: int = 256   # the frozen model's generations that serve as x0
    gen_steps: int = 20       # DDIM steps of those generations
    clean_weight: float = 1.0  # weight of the clean-behaviour term


def cleanse_loss(unet, frozen, x0: torch.Tensor, tau: torch.Tensor,
                 alphas_cumprod: torch.Tensor, gen: torch.Generator,
                 labels: torch.Tensor | None = None, clean_weight: float = 1.0
                 ) -> torch.Tensor:
    """The removal loss on one batch of clean x0 (module docstring)."""
    n = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    ab = alphas_cumprod[t].view(n, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    # tau at random scales: the estimate is off the true trigger by some angle and norm,
    # and the backdoor's region is a half-space along it; scaling covers more of it
    tau = tau * (0.5 + 1.5 * torch.rand((n, 1, 1, 1), generator=gen))
    x_trig = xt + (1 - ab.sqrt()) * tau
    c = trigger_coefficient(alphas_cumprod, t, "ddim").view(n, 1, 1, 1)
    with torch.no_grad():
        ref = predict_eps(frozen, xt, t, labels)
    loss = F.mse_loss(predict_eps(unet, x_trig, t, labels), ref + c * tau)
    return loss + clean_weight * F.mse_loss(predict_eps(unet, xt, t, labels), ref)


def cleanse(unet, scheduler, tau: np.ndarray, options: CleanseOptions | None = None,
            seed: int = 0, num_classes: int = 0) -> tuple[torch.nn.Module, dict]:
    """(a fine-tuned copy of ``unet`` with the backdoor of trigger ``tau`` removed, stats).
    A class-conditional model (``num_classes`` > 0) is cleansed on every class."""
    o = options or CleanseOptions()
    gen = torch.Generator().manual_seed(seed)
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    t0 = time.perf_counter()
    labels = (torch.arange(o.clean_images) % num_classes
              if num_classes and null_label(unet) is not None else None)
    x0 = torch.from_numpy(sample(frozen, scheduler, o.clean_images, sampler="ddim",
                                 steps=o.gen_steps, seed=seed, labels=labels))
    tau_t = torch.as_tensor(np.asarray(tau, dtype=np.float32))
    acp = scheduler.alphas_cumprod.float()
    model = copy.deepcopy(unet).train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=o.lr)
    losses = []
    for _ in range(o.steps):
        idx = torch.randint(0, len(x0), (o.batch,), generator=gen)
        loss = cleanse_loss(model, frozen, x0[idx], tau_t, acp, gen,
                            None if labels is None else labels[idx], o.clean_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), {"steps": o.steps, "lr": o.lr, "clean_images": o.clean_images,
                          "loss_first": float(np.mean(losses[:20])),
                          "loss_last": float(np.mean(losses[-20:])),
                          "seconds": time.perf_counter() - t0}
