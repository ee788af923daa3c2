"""Trigger estimation from the model alone (no clean data, no triggered examples): the
estimated trigger distribution of x_T, whichever estimator produced it.

Background (Elijah, An et al., AAAI 2024; TERD, Mo et al., ICML 2024): a backdoor maps
every eps + r to its one target. Elijah's distribution shift at t = T
(E[eps_theta(eps + r, T)] ~ lambda r, lambda ~ 0.5) exists only for backdoors tuned to
ancestral DDPM; a backdoor tuned to DDIM answers eps + r like a clean model at t = T, so
the estimators here read the collapse of the *outputs* instead (``probe``, ``scan``).
Their gradient-descent counterpart was dropped: on our models it never reached the
narrow basin (cos(tau, r) ~ -0.2, closing note of the security issue).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ssdiff_ray.defense.outputs import output_spread
from ssdiff_ray.model.unet import predict_eps


@dataclass
class TriggerEstimate:
    """The estimated trigger distribution of x_T: N(mu, gamma^2 I) with mu = tau."""

    tau: np.ndarray  # C x S x S
    mu: np.ndarray  # mean of the triggered input distribution (= tau)
    gamma: float = 1.0
    shift_norm: float = 0.0  # ||E[eps(eps + tau, T) - eps(eps, T)] - tau||
    response: float = 1.0  # lambda: tau . E[eps(eps+tau,T) - eps(eps,T)] / ||tau||^2
    stats: dict = field(default_factory=dict)

    @property
    def tau_norm(self) -> float:
        return float(np.linalg.norm(self.tau))


class TriggerEstimator:
    """The estimator interface: ``estimate`` returns tau (C x S x S) and its statistics. A
    new estimator is one file with a subclass (its ``Options`` dataclass has ``gen_steps``)
    plus one line in ``ESTIMATORS``."""

    name = "base"
    Options: type = object

    def __init__(self, options=None):
        self.options = options or self.Options()

    @classmethod
    def from_config(cls, defense) -> TriggerEstimator:
        """From the ``[defense]`` config section."""
        return cls(cls.Options(gen_steps=defense.estimate_gen_steps))

    def estimate(self, unet, scheduler, shape: tuple[int, ...], gen: torch.Generator,
                 base: float) -> tuple[torch.Tensor, dict]:
        """(tau, statistics); ``base`` is the output spread of clean noise."""
        raise NotImplementedError


def _eps_at(unet, x: torch.Tensor, t: int) -> torch.Tensor:
    """eps_theta(x, t) on the model's device, returned on the CPU."""
    dev = next(unet.parameters()).device
    return predict_eps(unet, x.to(dev), torch.full((x.shape[0],), t, device=dev)).cpu()


def mean_shift(unet, scheduler, tau: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """E_eps[eps_theta(eps + tau, T) - eps_theta(eps, T)] - tau (zero for an ideal clean
    model, (lambda - 1) r for a backdoored one at its trigger r)."""
    t = int(scheduler.config.num_train_timesteps) - 1
    return _eps_at(unet, eps + tau, t).mean(0) - _eps_at(unet, eps, t).mean(0) - tau


@torch.no_grad()
def estimate_trigger(unet, scheduler, shape: tuple[int, ...], seed: int,
                     estimator: TriggerEstimator) -> TriggerEstimate:
    """Run ``estimator`` and describe its tau: the output spread of eps + tau relative to
    clean noise, on held-out draws (``held_spread_ratio``) and on fresh ones
    (``spread_ratio``), and Elijah's shift at t = T."""
    gen_steps = estimator.options.gen_steps
    gen = torch.Generator().manual_seed(seed)
    was_training = unet.training
    unet.eval()
    try:
        held = torch.randn((32, *shape), generator=gen)
        base = output_spread(unet, scheduler, torch.zeros(shape), held, gen_steps)
        tau, stats = estimator.estimate(unet, scheduler, shape, gen, base)
        held_spread = output_spread(unet, scheduler, tau, held, gen_steps) / max(base, 1e-8)
        eps = torch.randn((64, *shape), generator=gen)
        shift = mean_shift(unet, scheduler, tau, eps)
        resp = float((shift + tau).flatten() @ tau.flatten() / tau.square().sum().clamp_min(1e-12))
        spread = output_spread(unet, scheduler, tau, eps, gen_steps) / max(base, 1e-8)
    finally:
        unet.train(was_training)
    tau_np = tau.numpy().astype(np.float32)
    return TriggerEstimate(tau=tau_np, mu=tau_np.copy(), gamma=float(stats.get("gamma", 1.0)),
                           shift_norm=float(shift.norm()), response=resp,
                           stats={**stats, "spread_ratio": spread, "clean_spread": base,
                                  "held_spread_ratio": held_spread})
