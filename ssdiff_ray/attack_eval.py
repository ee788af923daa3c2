"""Attack success with and without the sampling defense, as a run's evaluation measures it."""

from __future__ import annotations

import numpy as np
import torch

from ssdiff_ray.attacks import attack_spec, make_attack
from ssdiff_ray.attacks.base import target_images
from ssdiff_ray.attacks.metrics import attack_metrics
from ssdiff_ray.defense.defense import Defense
from ssdiff_ray.defense.input_tests import detection_metrics
from ssdiff_ray.model.sampling import sample

# The fast settings of the samplers a served model offers. A backdoor may fire under one and
# not another (the security matrix's TrojDiff models: ASR 0.00 under DDIM-50, 1.00 under
# DPM-10), so an attack's success is the highest over them: the attacker picks.
ATTACK_SAMPLERS = (("ddim", 50), ("dpm", 10))


def undefended_attack(cfg, unet, scheduler, dataset, classifier, seed: int,
                      n: int | None = None, sampler: str | None = None, steps: int | None = None
                      ) -> tuple[dict, torch.Tensor, np.ndarray]:
    """The run's attack on the model as it is: (``attack_metrics`` of the generations from
    ``n`` (default ``attack.eval_samples``) triggered inputs, those inputs, the targets).
    ``sampler`` and ``steps`` default to the run's ``eval`` settings."""
    spec = attack_spec(cfg)
    n, e = n or cfg.attack.eval_samples, cfg.eval
    tgt = target_images(spec, dataset.images, dataset.labels)
    x_trig = make_attack(spec).triggered_noise(n, cfg.data.image_size, seed)
    attacked = sample(unet, scheduler, n, sampler=sampler or e.sampler, steps=steps or e.steps,
                      seed=seed, x_T=x_trig)
    return attack_metrics(attacked, spec, tgt, classifier), x_trig, tgt


def asr_by_sampler(cfg, unet, scheduler, dataset, classifier, seed: int,
                   n: int | None = None) -> dict[str, float]:
    """Undefended ASR under the run's eval sampler and each of ``ATTACK_SAMPLERS``, keyed
    "sampler-steps" (e.g. "dpm-10")."""
    settings = dict.fromkeys([(cfg.eval.sampler, cfg.eval.steps), *ATTACK_SAMPLERS])
    return {f"{s}-{k}": undefended_attack(cfg, unet, scheduler, dataset, classifier, seed, n,
                                          s, k)[0]["asr"] for s, k in settings}


def evaluate_attack(cfg, unet, scheduler, dataset, classifier, clean_images: np.ndarray | None,
                    evaluator, seed: int) -> dict:
    """ASR without and with the sampling defense, detection TPR/FPR/AUROC, defended FID.

    ``dataset`` holds the run's images and labels (the targets of a class target);
    ``clean_images`` are the undefended clean samples of this evaluation (for the FID of
    the defended clean samples to compare against).
    """
    spec = attack_spec(cfg)
    m, x_trig, tgt = undefended_attack(cfg, unet, scheduler, dataset, classifier, seed)
    out = {"asr": m["asr"], "attack_mse": m["mse"], "attack_ssim": m["ssim"]}
    if not cfg.defense.enabled:
        return out
    defense = Defense.from_config(cfg, unet, scheduler, seed)
    x_clean = torch.randn(x_trig.shape, generator=torch.Generator().manual_seed(seed + 5))
    det_t, det_c = defense.detect(x_trig), defense.detect(x_clean)
    dm = detection_metrics(det_c["score"], det_t["score"], flags_clean=det_c["flagged"],
                           flags_triggered=det_t["flagged"])
    defended, _ = defense.sample(x_trig, flags=det_t["flagged"])
    out.update(asr_defended=attack_metrics(defended, spec, tgt, classifier)["asr"],
               detect_tpr=dm["tpr"], detect_fpr=dm["fpr"], detect_auroc=dm["auroc"])
    if clean_images is not None and evaluator is not None:
        x0 = torch.randn((len(clean_images), *x_trig.shape[1:]),
                         generator=torch.Generator().manual_seed(seed + 11))
        clean_def, _ = defense.sample(x0)
        out["fid_defended"] = float(evaluator.fid(clean_def))
    return out
