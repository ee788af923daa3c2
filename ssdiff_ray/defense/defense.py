"""One defended model: estimate its trigger once, then detect, negate and sample, or audit."""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.defense import make_estimator
from ssdiff_ray.defense.audit import audit_model
from ssdiff_ray.defense.estimate import TriggerEstimate, estimate_trigger
from ssdiff_ray.defense.input_tests import InputTest, TargetCheck, detect_inputs, standard_tests
from ssdiff_ray.defense.negation import defended_sample
from ssdiff_ray.defense.probe import ProbeEstimator


class Defense:
    """The chain estimate -> detect -> defended sample, and the audit, for one model."""

    def __init__(self, unet, scheduler, shape: tuple[int, ...], *, estimator=None,
                 estimate: bool = True, target_check: bool = True, fpr: float = 0.01,
                 sampler: str = "dpm", steps: int = 10, seed: int = 0,
                 negation: str = "redraw"):
        self.unet, self.scheduler, self.shape = unet, scheduler, tuple(shape)
        self.estimator = estimator or ProbeEstimator()
        self.use_estimate, self.use_target_check = estimate, target_check
        self.fpr, self.sampler, self.steps, self.seed = fpr, sampler, steps, seed
        self.negation = negation
        self.est: TriggerEstimate | None = None
        self.check: TargetCheck | None = None
        self.tests: list[InputTest] = []
        self._ready = False

    @classmethod
    def from_config(cls, cfg, unet, scheduler, seed: int = 0, estimator=None) -> Defense:
        """As the run config's ``[defense]`` and ``[eval]`` say; ``estimator`` overrides
        the configured one (e.g. with other options)."""
        d, e = cfg.defense, cfg.eval
        return cls(unet, scheduler, (unet.config.in_channels, cfg.data.image_size,
                                     cfg.data.image_size),
                   estimator=estimator or make_estimator(d), estimate=d.estimate_trigger,
                   target_check=d.target_check, fpr=d.fpr, sampler=e.sampler, steps=e.steps,
                   seed=seed, negation=d.negation)

    def prepare(self) -> Defense:
        """Estimate the trigger, calibrate the output check and list the input tests: the
        model-free test, the likelihood ratio with the estimate, the target check (once)."""
        if not self._ready:
            if self.use_estimate:
                self.est = estimate_trigger(self.unet, self.scheduler, self.shape, self.seed,
                                            self.estimator)
            if self.est is not None and self.use_target_check:
                self.check = TargetCheck(self.unet, self.scheduler, self.est, seed=self.seed,
                                         steps=self.steps)
            self.tests = standard_tests(self.shape, self.est, self.check)
            self._ready = True
        return self

    def detect(self, x_T: torch.Tensor) -> dict:
        """``detect_inputs`` with this model's tests."""
        self.prepare()
        return detect_inputs(x_T, self.tests, self.fpr)

    def sample(self, x_T: torch.Tensor, flags: np.ndarray | None = None, labels=None,
               guidance: float = 1.0, sampler: str | None = None, steps: int | None = None,
               seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(images generated from the negated inputs, per-input flags); ``labels`` and
        ``guidance`` for a class-conditional model; ``sampler``, ``steps`` and ``seed``
        (redraws, DDPM noise) default to the defense's own."""
        self.prepare()
        return defended_sample(self.unet, self.scheduler, x_T, self.tests,
                               sampler or self.sampler, steps or self.steps,
                               self.seed if seed is None else seed, self.fpr, flags=flags,
                               labels=labels, guidance=guidance, negation=self.negation)

    def audit(self) -> dict:
        """The model-level verdict (``audit_model``) with this model's estimate (made for
        the audit alone when the input tests run without one)."""
        est = self.est or estimate_trigger(self.unet, self.scheduler, self.shape, self.seed,
                                           self.estimator)
        return audit_model(self.unet, self.scheduler, est, self.seed)
