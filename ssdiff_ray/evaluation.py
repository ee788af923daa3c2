"""What an evaluation round measures: sample quality (``metrics.quality``) and, when the run
has an attack, attack success with and without the defense."""

from __future__ import annotations

import numpy as np

from ssdiff_ray.config import Config
from ssdiff_ray.data import load_dataset
from ssdiff_ray.metrics.quality import QualityEvaluator
from ssdiff_ray.model.sampling import sample


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often among ``n`` samples."""
    return np.arange(n) % num_classes


class Evaluator:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dataset = load_dataset(cfg.data)
        self.quality = QualityEvaluator(self.dataset.images, self.dataset.labels,
                                        inception_weights=cfg.eval.inception_weights)

    def generate(self, unet, scheduler, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``n`` samples as the config says; a conditional model generates every class
        equally often, with guidance. Returns (images, requested labels or None)."""
        e = self.cfg.eval
        labels = (balanced_labels(n, self.cfg.data.num_classes) if self.cfg.model.conditional
                  else None)
        images = sample(unet, scheduler, n, sampler=e.sampler, steps=e.steps, seed=seed,
                        labels=labels, guidance=e.guidance)
        return images, labels

    def evaluate(self, unet, scheduler, seed: int, with_attack: bool = True
                 ) -> tuple[dict, np.ndarray]:
        """Sample ``eval.samples`` images: (metrics, the first ``eval.grid`` of them)."""
        images, labels = self.generate(unet, scheduler, self.cfg.eval.samples, seed)
        metrics = self.quality.evaluate(images, labels)
        if with_attack and self.cfg.attack.kind != "none":
            from ssdiff_ray.attack_eval import evaluate_attack

            metrics.update(evaluate_attack(self.cfg, unet, scheduler, self.dataset,
                                           self.quality.classifier, images, self.quality, seed))
        return metrics, images[:self.cfg.eval.grid]

    def fid_floor(self) -> float:
        return float(self.quality.fid_floor())
