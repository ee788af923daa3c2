"""What an evaluation round measures: sample quality in the run's feature space, and attack
success with and without the defense when the run has an attack."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.config import Config
from ssdiff_ray.data import load_dataset
from ssdiff_ray.fid import QualityEvaluator
from ssdiff_ray.model.sampling import sample


class Evaluator:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dataset = load_dataset(cfg.data)
        self.quality = QualityEvaluator(self.dataset.images, self.dataset.labels)

    def evaluate(self, unet, scheduler, seed: int, with_attack: bool = True
                 ) -> tuple[dict, np.ndarray]:
        """Sample ``eval.samples`` images: (metrics, the first ``eval.grid`` of them)."""
        e = self.cfg.eval
        images = sample(unet, scheduler, e.samples, sampler=e.sampler, steps=e.steps, seed=seed)
        metrics = self.quality.evaluate(images)
        if with_attack and self.cfg.attack.kind != "none":
            from ssdiff_ray.attack_eval import evaluate_attack

            metrics.update(evaluate_attack(self.cfg, unet, scheduler, self.dataset,
                                           self.quality.classifier, images, self.quality, seed))
        return metrics, images[:e.grid]

    def fid_floor(self) -> float:
        return float(self.quality.fid_floor())
