"""The run's security wiring: which clients attack, and attack/defense evaluation.

Glue between the config and ``attacks`` / ``defense`` / ``screening`` (core, no Ray).
"""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.attacks import (
    AttackSpec,
    ClientAttack,
    attack_metrics,
    choose_malicious,
    make_target,
    target_class,
    triggered_noise,
)
from ssdiff_ray.config import Config


def attack_spec(cfg: Config) -> AttackSpec | None:
    """The attack the config describes (None when ``attack.kind = 'none'``)."""
    a = cfg.attack
    if a.kind == "none":
        return None
    ids = choose_malicious(cfg.clients.count, a.malicious_fraction, cfg.seed)
    return AttackSpec(kind=a.kind, trigger=a.trigger, target=a.target,
                      poison_rate=a.poison_rate, gamma=a.gamma, scale=a.scale,
                      malicious_ids=ids)


def target_images(cfg: Config, spec: AttackSpec) -> np.ndarray:
    """The backdoor's target: one fixed image, or the dataset's images of the target class."""
    k = target_class(spec.target)
    if k is None:
        return make_target(spec.target, cfg.data.image_size)[None]
    from ssdiff_ray.runtime import load_dataset

    images, labels = load_dataset(cfg)
    return images[labels == k]


def client_attack(cfg: Config, alphas_cumprod: torch.Tensor) -> ClientAttack | None:
    spec = attack_spec(cfg)
    if spec is None:
        return None
    tgt = target_images(cfg, spec) if target_class(spec.target) is not None else None
    return ClientAttack(spec, alphas_cumprod, tgt, cfg.data.image_size)


def estimate_trigger(cfg: Config, unet, scheduler, seed: int):
    """``defense.estimate_trigger`` as the run's config says (estimator, its DDIM steps)."""
    from ssdiff_ray import defense

    with torch.enable_grad():
        return defense.estimate_trigger(unet, scheduler, cfg.data.image_size, seed,
                                        method=cfg.defense.estimator,
                                        gen_steps=cfg.defense.estimate_gen_steps)


def evaluate_attack(cfg: Config, unet, scheduler, classifier, clean_images: np.ndarray | None,
                    evaluator, seed: int) -> dict:
    """ASR without and with the sampling defense, detection TPR/FPR/AUROC, defended FID.

    ``clean_images`` are the undefended clean samples of this evaluation (for the FID of
    the defended clean samples to compare against).
    """
    from ssdiff_ray import defense
    from ssdiff_ray.model import sample

    spec = attack_spec(cfg)
    n, size, e = cfg.attack.eval_samples, cfg.data.image_size, cfg.eval
    tgt = target_images(cfg, spec)
    x_trig = triggered_noise(spec, n, size, seed)
    attacked = sample(unet, scheduler, n, sampler=e.sampler, steps=e.steps, seed=seed,
                      x_T=x_trig)
    m = attack_metrics(attacked, spec, tgt, classifier)
    out = {"asr": m["asr"], "attack_mse": m["mse"], "attack_ssim": m["ssim"]}
    if not cfg.defense.enabled:
        return out
    est = estimate_trigger(cfg, unet, scheduler, seed) if cfg.defense.estimate_trigger else None
    check = (defense.TargetCheck(unet, scheduler, est, seed=seed, steps=e.steps)
             if est is not None and cfg.defense.target_check else None)
    x_clean = torch.randn(x_trig.shape, generator=torch.Generator().manual_seed(seed + 5))
    det_t = defense.detect_inputs(x_trig, est, cfg.defense.fpr, check)
    det_c = defense.detect_inputs(x_clean, est, cfg.defense.fpr, check)
    dm = defense.detection_metrics(det_c["score"], det_t["score"],
                                   flags_clean=det_c["flagged"], flags_triggered=det_t["flagged"])
    defended, _ = defense.defended_sample(unet, scheduler, x_trig, est, e.sampler, e.steps, seed,
                                          cfg.defense.fpr, check, flags=det_t["flagged"])
    out.update(asr_defended=attack_metrics(defended, spec, tgt, classifier)["asr"],
               detect_tpr=dm["tpr"], detect_fpr=dm["fpr"], detect_auroc=dm["auroc"])
    if clean_images is not None and evaluator is not None:
        n_clean = len(clean_images)
        x0 = torch.randn((n_clean, 1, size, size),
                         generator=torch.Generator().manual_seed(seed + 11))
        clean_def, _ = defense.defended_sample(unet, scheduler, x0, est, e.sampler, e.steps,
                                               seed, cfg.defense.fpr, check)
        out["fid_defended"] = float(evaluator.fid(clean_def))
    return out
